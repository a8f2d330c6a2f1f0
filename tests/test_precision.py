"""The precision policy (utils/precision.py): both branches of ``auto`` with the device's
capability stubbed, the older spellings, the log line, and a resumed run keeping the
precision it was started with. No test here relies on bf16 being fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import train
import utils.precision as precision_mod
from utils.compat import legacy_flow_config, legacy_precision
from utils.data import write_eclipse_pkl
from utils.dataelixir.keys import FlowConfig, flow_precisions
from utils.fileio import UserError
from utils.precision import BF16_EVIDENCE, COMPUTATIONS, keep_stored, requested_precision, resolve_precision

CPU = torch.device("cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def native(monkeypatch):
    """Stub the CPU's bf16 capability: ``native(True)`` / ``native(False)``."""

    def set_(value: bool) -> None:
        monkeypatch.setattr(precision_mod, "_cpu_native_bf16", lambda: value)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: value)

    return set_


def test_auto_is_fp32_everywhere_without_native_bf16(native):
    native(False)
    for computation in COMPUTATIONS:
        p = resolve_precision("auto", CPU, computation)
        assert p.name == "fp32" and not p.bf16
        assert p.reason.startswith(f"CPU {torch.backends.cpu.get_cpu_capability()} has no native bf16")
    assert resolve_precision("auto", CPU, "purification").line() == (
        f"precision: fp32 — CPU {torch.backends.cpu.get_cpu_capability()} has no native bf16"
    )


def test_auto_uses_bf16_only_where_its_effect_is_measured(native):
    native(True)
    for computation in COMPUTATIONS:
        p = resolve_precision("auto", CPU, computation)
        assert p.bf16 == (computation in BF16_EVIDENCE), computation
        assert "native bf16" in p.reason
    assert "purification" in BF16_EVIDENCE
    assert "5.4 points" in resolve_precision("auto", CPU, "surrogate").reason  # the measured reason for fp32
    assert "not shown to be negligible" in resolve_precision("auto", CPU, "backdoor_training").reason


@pytest.mark.parametrize("has", [True, False])
def test_asked_precision_is_taken_as_asked(native, has):
    native(has)
    assert resolve_precision("fp32", CPU, "purification").name == "fp32"
    p = resolve_precision("bf16", CPU, "victim")
    assert p.name == "bf16" and ("slow here" in p.reason) == (not has)


def test_cuda_asks_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Stub GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_precision("auto", torch.device("cuda"), "purification").name == "bf16"
    assert resolve_precision("auto", torch.device("cuda"), "surrogate").name == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    p = resolve_precision("auto", torch.device("cuda"), "purification")
    assert p.name == "fp32" and p.reason == "Stub GPU has no native bf16"


def test_older_bf16_spelling_and_clashes():
    assert requested_precision("auto", None) == "auto"
    assert requested_precision("auto", True) == "bf16" and requested_precision("auto", False) == "fp32"
    assert requested_precision("fp32", False) == "fp32"
    with pytest.raises(UserError, match="--bf16 true and --precision fp32 disagree"):
        requested_precision("fp32", True)
    with pytest.raises(UserError, match="precision must be"):
        resolve_precision("fp16", CPU, "victim")


def test_attack_flow_resolves_each_computation_and_honours_amp_and_bf16(native):
    native(True)
    cfg = {"precision": "auto", "amp": None, "bf16": None}
    got = {k: p.name for k, p in flow_precisions(FlowConfig.from_dict(cfg), CPU).items()}
    assert got == {"trigger": "fp32", "backdoor_training": "fp32", "ddpm_rounds": "fp32", "candidate_labels": "fp32"}
    got = {
        k: p.name for k, p in flow_precisions(FlowConfig.from_dict({**cfg, "amp": True, "bf16": False}), CPU).items()
    }
    assert got["backdoor_training"] == "bf16" and got["ddpm_rounds"] == "fp32"
    assert {p.name for p in flow_precisions(FlowConfig.from_dict({**cfg, "precision": "bf16"}), CPU).values()} == {
        "bf16"
    }


def test_keep_stored_and_older_records():
    said = []
    settings = {"precision": "fp32", "channels_last": True, "lr": 0.1}
    keep_stored(settings, {"precision": "bf16", "channels_last": True, "lr": 0.5}, "run/x", said.append)
    assert settings == {"precision": "bf16", "channels_last": True, "lr": 0.1}  # only the runtime choices
    assert said == [
        "precision: 'bf16' kept from the run being resumed in run/x (this machine's choice: 'fp32'); "
        "pass --overwrite to start it afresh"
    ]
    keep_stored(settings, None, "run/x", said.append)  # a new run: nothing to keep
    assert len(said) == 1
    assert legacy_precision({"bf16": True, "lr": 1}) == {"precision": "bf16", "lr": 1}
    old = legacy_flow_config({"bf16": True, "amp": False, "precision": None})
    assert old["precisions"] == {
        "trigger": "bf16",
        "backdoor_training": "fp32",
        "ddpm_rounds": "bf16",
        "candidate_labels": "bf16",
    }
    assert old["bf16"] is None and old["amp"] is None and old["precision"] == "auto"


def test_train_resumes_in_the_stored_precision(tmp_path, small_train, native, capsys, monkeypatch):
    """A run started where auto chose fp32 and resumed where it would choose bf16 keeps fp32
    (saying so) instead of refusing or mixing; an older run's ``bf16: false`` counts too."""
    write_eclipse_pkl(tmp_path / "poisoned_data" / "cifar10" / "URP.pkl", small_train.subset(torch.arange(0, 400, 8)))
    common = ["--poison", "URP", "--arch", "resnet18", "--width", "4", "--epochs", "1", "--test_subset", "20"]
    common += ["--work_dir", str(tmp_path), "--run_name", "r", "--precision", "auto"]
    run = tmp_path / "runs" / "train" / "r"
    native(False)
    train.main(common)
    res = json.loads((run / "result.json").read_text())
    assert res["settings"]["precision"] == "fp32" and res["train_config"]["precision"] == "fp32"
    # the stored settings as an older version wrote them, and a machine with native bf16
    settings = dict(res["settings"])
    del settings["precision"]
    settings["bf16"] = False
    (run / "result.json").unlink()
    (run / "settings.json").write_text(json.dumps(settings))
    native(True)
    monkeypatch.setitem(precision_mod.BF16_EVIDENCE, "victim", "stub: auto would choose bf16 here")
    capsys.readouterr()
    train.main(common)
    out = capsys.readouterr().out
    assert "precision: 'fp32' kept from the run being resumed" in out and "(this machine's choice: 'bf16')" in out
    res = json.loads((run / "result.json").read_text())
    assert res["settings"]["precision"] == "fp32" and res["train_config"]["precision"] == "fp32"
    assert "kept from the run being resumed" in (run / "train.log").read_text()


def test_a_cpu_without_native_bf16_runs_and_logs_fp32(tmp_path, small_train):
    """oneDNN capped at AVX2 (as on most laptops): a default purification.py run computes in
    float32 and its log says so, and why; its summary records it."""
    from tests.test_eclipse_pipeline import _setup_work

    _setup_work(tmp_path, small_train.subset(torch.arange(8)))
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    cmd = [sys.executable, "purification.py", "--poison", "URP", "--config", "config/eclipse/cpu.yml"]
    cmd += ["--sparse_set", "tiny", "--sparse_diff_model", "ema_0.9999_5.pt", "--t", "2", "--batch_size", "8"]
    r = subprocess.run(
        cmd + ["--work_dir", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-1000:]
    out = tmp_path / "purified_data" / "cifar10" / "tiny" / "2" / "5" / "URP-pure"
    log = out.with_suffix(".log").read_text()
    assert "precision: fp32 — CPU AVX2 has no native bf16" in log
    assert json.loads(out.with_suffix(".json").read_text())["precision"] == "fp32"
