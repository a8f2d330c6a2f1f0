"""Runtime helpers: the channels_last guard against torch 2.13's CPU conv-backward bug, and
the malloc setting every script runs with."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import utils.fileio
from models import build_classifier
from utils.fileio import cli_main
from utils.runtime import channels_last_safe, to_channels_last
from utils.trainer import TrainConfig, train_classifier

REPO = Path(__file__).resolve().parents[1]


def test_narrow_strided_shortcuts_train_in_the_default_layout_on_cpu():
    cpu = torch.device("cpu")
    assert not channels_last_safe(build_classifier("preactresnet18", 10, 4), cpu)
    assert not channels_last_safe(build_classifier("resnet18", 10, 8), cpu)
    assert channels_last_safe(build_classifier("resnet18", 10, 16), cpu)
    assert channels_last_safe(build_classifier("resnet18", 10, 4), torch.device("cuda"))


def test_to_channels_last_converts_safe_models_and_guards_the_others():
    cpu = torch.device("cpu")
    wide = to_channels_last(build_classifier("resnet18", 10, 16), cpu)
    assert wide.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    narrow = to_channels_last(build_classifier("resnet18", 10, 4), cpu)
    assert narrow.conv1.weight.is_contiguous()
    seen = []
    narrow.conv1.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous()))
    narrow(torch.rand(3, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    assert seen == [True]  # a channels_last batch enters in the default layout


def test_width4_classifier_trains_with_two_threads(small_train):
    # the configuration that aborted the process (heap corruption in oneDNN's backward):
    # run in a child so that a regression fails this test instead of killing the session
    code = (
        "import torch, sys; sys.path.insert(0, '.'); torch.set_num_threads(2)\n"
        "from models import build_classifier\n"
        "from utils.runtime import channels_last_safe\n"
        "from utils.precision import native_bf16\n"
        "bf16 = native_bf16(torch.device('cpu'))[0]  # bf16 where it is fast, as the policy runs it\n"
        "m = build_classifier('preactresnet18', 10, 4)\n"
        "cl = channels_last_safe(m, torch.device('cpu'))\n"
        "m = m.to(memory_format=torch.channels_last) if cl else m\n"
        "for _ in range(10):\n"
        "    x = torch.rand(25, 3, 32, 32)\n"
        "    x = x.contiguous(memory_format=torch.channels_last) if cl else x\n"
        "    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):\n"
        "        m(x).float().sum().backward()\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-500:]
    # and the shared loop picks the safe layout itself
    data = small_train.subset(torch.arange(50))
    model = build_classifier("preactresnet18", 10, 4)
    cfg = TrainConfig(epochs=1, batch_size=25, lr=0.01, test_every=1)
    train_classifier(model, data, lambda x, g: x, cfg, torch.device("cpu"), log=lambda *_: None)
    assert model.conv1.weight.is_contiguous()


# a fresh process makes and frees a 64 MiB tensor 40 times, as a denoising loop does with its
# activations: the page faults of the last 10
_REUSE = """
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
from utils.fileio import keep_freed_memory
applied = keep_freed_memory()
faults = []
for _ in range(40):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 * 2**20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del x
print(applied, sum(faults[-10:]))
"""


def _steady_state_faults(tuning: str) -> tuple[str, int]:
    env = dict(os.environ, MALLOC_TUNING=tuning)
    out = subprocess.run([sys.executable, "-c", _REUSE, str(REPO)], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_kept_freed_memory_is_reused_without_page_faults():
    applied, kept = _steady_state_faults("on")
    assert applied == "True"
    off, default = _steady_state_faults("off")
    assert off == "False"  # MALLOC_TUNING=off leaves glibc's defaults
    # by default every new tensor is a fresh mmap, faulted in page by page (a few with huge pages)
    assert default >= 10 * (64 * 2**20) // (2 * 2**20)
    assert kept * 10 < default


def test_every_script_runs_with_the_malloc_setting(monkeypatch):
    calls = []
    monkeypatch.setattr(utils.fileio, "keep_freed_memory", lambda: calls.append(1))
    assert cli_main(lambda argv: argv)(["x"]) == ["x"]
    assert calls == [1]
