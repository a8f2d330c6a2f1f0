"""poison.py end to end on tiny subsets of real CIFAR-10: outputs, resumption, bad input."""

from __future__ import annotations

import json

import pytest
import torch

import poison
from utils.data import class_balanced_subset, read_eclipse_pkl
from utils.poisons import POISONS

EM_TINY = [
    "--width", "8", "--pgd_steps", "2", "--train_steps", "3", "--train_batch", "20", "--batch_size", "20",
    "--max_rounds", "2",
]  # fmt: skip
TAP_TINY = [
    "--width", "8", "--epochs", "2", "--milestones", "1", "--train_batch", "20", "--pgd_steps", "3",
    "--step_size", "2", "--batch_size", "20", "--restarts", "2",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def run(tmp_path, *args):
    """poison.py in-process; returns its exit code."""
    try:
        code = poison.main(["--work_dir", str(tmp_path), "--no_progress", "--threads", "1", *args])
    except SystemExit as e:
        return e.code
    return code or 0


def outputs(tmp_path, name):
    base = tmp_path / "poisoned_data" / "cifar10" / name
    return {ext: base.with_suffix(ext) for ext in (".pkl", ".json", ".png", ".log")}


def test_non_model_poison_end_to_end(tmp_path, cifar_train):
    assert run(tmp_path, "--poison", "URP", "--subset", "40") == 0
    files = outputs(tmp_path, "URP")
    assert all(p.is_file() for p in files.values())
    idx = class_balanced_subset(cifar_train.labels, 40, seed=0)
    data = read_eclipse_pkl(files[".pkl"])  # the ECLIPSE format purification.py and train.py read
    assert len(data) == 40 and torch.equal(data.labels, cifar_train.labels[idx])
    d = data.images.int() - cifar_train.images[idx].int()  # same images, same (ascending) order
    assert d.abs().max() == 8
    meta = json.loads(files[".json"].read_text())
    assert meta["parameters"] == {"eps": 8.0, "sigma": 8.0} and meta["seed"] == 0
    assert meta["subset"]["indices"] == idx.tolist() and meta["n_images"] == 40
    assert meta["norms"]["linf_max_255"] == 8 and meta["norms"]["l2_mean"] > 0 and meta["budget"]["holds"]
    assert meta["crafting_seconds"] >= 0 and meta["device"].startswith("cpu")
    assert files[".png"].read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "poisoned_data" / "cifar10" / "URP.work").exists()


def test_model_poison_end_to_end(tmp_path, cifar_train):
    assert run(tmp_path, "--poison", "EM", "--classwise", "--subset", "40", *EM_TINY) == 0
    files = outputs(tmp_path, "EM-classwise")  # the class-wise variant's default name
    data = read_eclipse_pkl(files[".pkl"])
    meta = json.loads(files[".json"].read_text())
    assert len(data) == 40 and meta["parameters"]["classwise"] is True
    assert meta["surrogate_arch"] == "resnet18" and meta["surrogate_width"] == 8
    s = meta["result"]["surrogate"]
    assert {"train_acc_clean", "train_acc_poisoned"} <= set(s)
    assert meta["norms"]["linf_max_255"] <= 8
    assert "round 2" in files[".log"].read_text()


def test_stopped_run_resumes_and_matches_an_uninterrupted_one(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run(whole, "--poison", "EM", "--subset", "40", *EM_TINY) == 0
    assert run(parts, "--poison", "EM", "--subset", "40", *EM_TINY, "--stop_after", "4") == poison.PAUSED_EXIT
    work = parts / "poisoned_data" / "cifar10" / "EM.work"
    assert (work / "state.pt").is_file() and not outputs(parts, "EM")[".pkl"].exists()
    assert run(parts, "--poison", "EM", "--subset", "40", *EM_TINY) == 0
    log = outputs(parts, "EM")[".log"].read_text()
    assert "resuming after 0 rounds, in phase noise at batch 1" in log  # 3 train steps, then 1 of 2 noise batches
    assert not work.exists()
    a = read_eclipse_pkl(outputs(whole, "EM")[".pkl"])
    b = read_eclipse_pkl(outputs(parts, "EM")[".pkl"])
    assert torch.equal(a.images, b.images)  # resuming continues exactly where it stopped


def test_killed_run_resumes_from_its_last_save(tmp_path, monkeypatch):
    import utils.poisons.common as common

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run(whole, "--poison", "TAP", "--subset", "40", *TAP_TINY) == 0
    real, calls = common.project_linf, {"n": 0}

    def dies(*a, **k):  # the process dies in the middle of the second PGD batch
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(common, "project_linf", dies)
    assert run(parts, "--poison", "TAP", "--subset", "40", *TAP_TINY, "--save_every", "1e-6") == 130
    monkeypatch.setattr(common, "project_linf", real)
    assert run(parts, "--poison", "TAP", "--subset", "40", *TAP_TINY) == 0
    log = outputs(parts, "TAP")[".log"].read_text()
    assert "reusing the cached surrogate" in log and "TAP-pgd: resuming at image 20/40" in log
    a = read_eclipse_pkl(outputs(whole, "TAP")[".pkl"])
    b = read_eclipse_pkl(outputs(parts, "TAP")[".pkl"])
    assert torch.equal(a.images, b.images)


# --------------------------------------------------------------------------- bad input


def error_of(capsys, tmp_path, *args):
    assert run(tmp_path, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")  # one line, no traceback
    return err[0]


def test_unknown_poison_lists_the_valid_ones(tmp_path, capsys):
    err = error_of(capsys, tmp_path, "--poison", "XYZ")
    assert all(name in err for name in POISONS)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--poison", "EM", "--eps", "0"], "--eps 0.0 is impossible"),
        (["--poison", "EM", "--eps", "300"], "must be in (0, 255]"),
        (["--poison", "LSP", "--eps", "-2"], "must be in (0, 255]"),
        (["--poison", "URP", "--eps", "0.5"], "below one pixel level"),
        (["--poison", "OPS", "--eps", "8"], "--eps does not apply to OPS"),
        (["--poison", "EM", "--restarts", "3"], "--restarts does not apply to EM"),
        (["--poison", "URP", "--arch", "vgg16"], "uses no surrogate"),
        (["--poison", "EFP", "--variant", "sideways"], "push or pull"),
        (["--poison", "URP", "--subset", "5"], "--subset must be >= 10"),
    ],
)
def test_bad_options_are_refused(tmp_path, capsys, args, needle):
    err = error_of(capsys, tmp_path, *args)
    assert needle in err
    assert not (tmp_path / "poisoned_data").exists()  # refused before writing anything


def test_adp_without_a_diffusion_checkpoint(tmp_path, capsys):
    err = error_of(capsys, tmp_path, "--poison", "ADP", "--subset", "40")
    ckpt = tmp_path / "diff_ckpt" / "cifar10" / "test2000ps8000" / "ema_0.9999_250000.pt"
    assert str(ckpt) in err and "python train_diffusion.py --config config/eclipse/cifar10.yml" in err
    assert not (tmp_path / "poisoned_data").exists()


def test_existing_output_is_left_untouched(tmp_path, capsys):
    assert run(tmp_path, "--poison", "URP", "--subset", "40") == 0
    capsys.readouterr()
    files = outputs(tmp_path, "URP")
    before = {k: (p.read_bytes(), p.stat().st_mtime_ns) for k, p in files.items()}
    err = error_of(capsys, tmp_path, "--poison", "URP", "--subset", "40", "--seed", "1")
    assert "already exists" in err and "--overwrite" in err
    assert {k: (p.read_bytes(), p.stat().st_mtime_ns) for k, p in files.items()} == before
    assert run(tmp_path, "--poison", "URP", "--subset", "40", "--seed", "1", "--overwrite") == 0
    assert files[".pkl"].read_bytes() != before[".pkl"][0]


def test_interrupted_run_with_other_settings_is_not_resumed(tmp_path, capsys):
    assert run(tmp_path, "--poison", "EM", "--subset", "40", *EM_TINY, "--stop_after", "2") == poison.PAUSED_EXIT
    capsys.readouterr()
    err = error_of(capsys, tmp_path, "--poison", "EM", "--subset", "40", *EM_TINY, "--eps", "4")
    assert "other settings" in err
    assert run(tmp_path, "--poison", "EM", "--subset", "40", *EM_TINY, "--eps", "4", "--overwrite") == 0
    meta = json.loads(outputs(tmp_path, "EM")[".json"].read_text())
    assert meta["parameters"]["eps"] == 4 and meta["norms"]["linf_max_255"] <= 4
