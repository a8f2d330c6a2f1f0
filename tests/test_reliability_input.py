"""Bad input to the five scripts is refused with one line on stderr (exit 2, no traceback),
before anything is written: impossible numbers, damaged state files, unwritable outputs,
corrupt images, unusable checkpoints and YAML files that are not YAML text."""

from __future__ import annotations

import errno
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_ATTACK as TINY_BASE

from utils.data import read_eclipse_pkl, write_eclipse_pkl
from utils.diffusion.factory import load_diffusion_spec
from utils.fileio import UserError

REPO = Path(__file__).resolve().parents[1]
ECLIPSE_CFG = "config/eclipse/cpu.yml"
DDPM_CFG = "config/ddpm/cpu.yml"
DDPM_CKPT = "diff_ckpt/cifar10/tiny/ema_0.999_1.pt"
# a tiny attack configuration; every refusal below happens before any of it runs
TINY_ATTACK = {
    **TINY_BASE,
    "diffusion_config": DDPM_CFG,
    "diffusion_ckpt": DDPM_CKPT,
    "steps_T": 20,
    "purify_respace": 4,
    "rounds_n": 2,
    "last_steps_m": 2,
    "purify_batch_size": 100,
}


def run_cli(script: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
        timeout=300,
    )


def one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    """The process was refused with exactly one stderr line holding every needle."""
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.returncode == 2, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def attack_argv(work: Path, name: str = "run", yaml: str = "config/badnet/cifar10.yaml", **over) -> list[str]:
    out = ["--yaml_path", yaml, "--save_folder_name", name, "--work_dir", str(work)]
    for k, v in {**TINY_ATTACK, **over}.items():
        out += [f"--{k}", str(v)]
    return out


def _save_unet(path: Path, cfg: str = ECLIPSE_CFG, poison: str | None = None) -> None:
    torch.manual_seed(0)
    state = load_diffusion_spec(REPO / cfg).build_model().state_dict()
    if poison is not None:
        state[poison] = state[poison].clone()
        state[poison].view(-1)[0] = float("nan")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


@pytest.fixture
def eclipse_work(tmp_path, small_train):
    """A work folder holding a poisoned set of 8 images and a random CPU-scale UNet."""
    write_eclipse_pkl(tmp_path / "poisoned_data/cifar10/URP.pkl", small_train.subset(torch.arange(8)))
    _save_unet(tmp_path / "diff_ckpt/cifar10/tiny/ema_0.9999_5.pt")
    return tmp_path


PURIFY = ["--poison", "URP", "--config", ECLIPSE_CFG, "--sparse_set", "tiny", "--sparse_diff_model", "ema_0.9999_5.pt"]


@pytest.fixture
def attack_work(tmp_path, cifar_root):
    """A work folder holding a random CPU-scale DDPM."""
    _save_unet(tmp_path / DDPM_CKPT, DDPM_CFG)
    return tmp_path


# --------------------------------------------------------------------------- 4 / 7: impossible values


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("train.py", ["--poison", "clean", "--subset", "-5"], "--subset must be >= 10, got -5"),
        ("train.py", ["--poison", "clean", "--test_subset", "0"], "--test_subset must be >= 10, got 0"),
        ("train.py", ["--poison", "clean", "--lr", "-1"], "--lr must be > 0, got -1"),
        ("train.py", ["--poison", "clean", "--p", "1.5"], "--p must be in [0, 1], got 1.5"),
        ("train_diffusion.py", ["--max_timestep", "0"], "--max_timestep must be >= 1, got 0"),
        ("train_diffusion.py", ["--lr", "-1"], "--lr must be > 0, got -1"),
        ("train_diffusion.py", ["--ema_rate", "1"], "--ema_rate must be in (0, 1), got 1"),
        ("purification.py", ["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
        ("poison.py", ["--poison", "URP", "--sigma", "nan"], "--sigma must be > 0, got nan"),
        ("poison.py", ["--poison", "URP", "--save_every", "0"], "--save_every must be > 0, got 0"),
    ],
)
def test_impossible_flag_values_are_refused_before_any_output(tmp_path, script, args, message):
    one_line_error(run_cli(script, *args, "--work_dir", tmp_path), message)
    assert tree(tmp_path) == []


def test_max_timestep_beyond_the_process_is_refused(tmp_path):
    res = run_cli("train_diffusion.py", "--config", ECLIPSE_CFG, "--max_timestep", "100000", "--work_dir", tmp_path)
    one_line_error(res, "--max_timestep 100000 exceeds the diffusion's")
    assert tree(tmp_path) == []


@pytest.mark.parametrize(
    "over, message",
    [
        ({"pratio": -0.1}, "pratio in --pratio: must be in (0, 1], got -0.1"),
        ({"epochs": 0}, "epochs in --epochs: must be >= 1, got 0"),
        ({"lr": -1}, "lr in --lr: must be > 0, got -1.0"),
        ({"subset": 0}, "subset in --subset: must be >= 10, got 0"),
        ({"attack_target": 10}, "attack_target must be a class of CIFAR-10, 0..9, got 10"),
        ({"patch_size": 3}, "badnet: patch_size must be an even number"),  # the trigger's own check
    ],
)
def test_attack_refuses_impossible_values_before_writing(attack_work, over, message):
    before = tree(attack_work)
    one_line_error(run_cli("attack/badnet.py", *attack_argv(attack_work, **over)), message)
    assert tree(attack_work) == before  # no record/run/config.yaml to block the corrected command


def test_yaml_ranges_apply_to_the_file_too(attack_work, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pratio: -0.1\n")
    before = tree(attack_work)
    one_line_error(run_cli("attack/badnet.py", *attack_argv(attack_work, yaml=bad)), "pratio in", "bad.yaml")
    assert tree(attack_work) == before


def test_empty_yaml_is_said_in_the_log(attack_work, tmp_path, monkeypatch):
    import utils.dataelixir.flow as flow

    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")

    def stop(*a, **k):
        raise UserError("stop here")

    monkeypatch.setattr(flow, "load_dataset", stop)
    with pytest.raises(UserError, match="stop here"):
        flow.run_attack_then_defence("badnet", attack_argv(attack_work, yaml=empty))
    log = (attack_work / "record/run/run.log").read_text()
    assert "sets no key" in log and "built-in default" in log


# --------------------------------------------------------------------------- 4: data and checkpoints


def _pkl(path: Path, images: list) -> Path:
    path.write_bytes(pickle.dumps([(img, i % 10) for i, img in enumerate(images)]))
    return path


def test_pkl_image_arrays_must_be_uint8_values(tmp_path):
    ok = np.arange(3072, dtype=np.int64) % 256
    assert read_eclipse_pkl(_pkl(tmp_path / "a.pkl", [ok])).images.flatten().max() == 255
    with pytest.raises(UserError, match=r"entry 0: image array is float32, expected uint8"):
        read_eclipse_pkl(_pkl(tmp_path / "b.pkl", [np.zeros(3072, np.float32)]))
    wraps = ok.copy()
    wraps[5] = 300  # would become 44 when cast to uint8
    with pytest.raises(UserError, match=r"entry 1: image values span 0\.\.300"):
        read_eclipse_pkl(_pkl(tmp_path / "c.pkl", [ok, wraps]))


def test_nan_checkpoint_is_refused_naming_file_and_tensor(eclipse_work):
    ckpt = eclipse_work / "diff_ckpt/cifar10/tiny/ema_0.9999_5.pt"
    name = next(iter(torch.load(ckpt, weights_only=True)))
    _save_unet(ckpt, poison=name)
    res = run_cli("purification.py", *PURIFY, "--t", "2", "--work_dir", eclipse_work)
    one_line_error(res, str(ckpt), f"tensor {name} holds NaN")
    assert not (eclipse_work / "purified_data").exists()


def _tiny_jpeg_tree(root: Path, corrupt: bool) -> Path:
    from PIL import Image

    from utils.data import CIFAR10_CLASSES

    for split in ("train", "test"):
        for c, cls in enumerate(CIFAR10_CLASSES):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (32, 32), (c * 20, i * 50, 7)).save(d / f"{i}.jpg", quality=90)
    bad = root / "train" / "cat" / "1.jpg"
    if corrupt:
        bad.write_bytes(bad.read_bytes()[:200])
    return bad


def test_corrupt_jpeg_is_named(tmp_path):
    bad = _tiny_jpeg_tree(tmp_path / "cifar", corrupt=True)
    work = tmp_path / "work"
    res = run_cli(
        "train.py",
        *("--poison", "clean", "--data_root", tmp_path / "cifar", "--work_dir", work),
        env={"CIFAR10_CACHE": str(tmp_path / "cache")},
    )
    one_line_error(res, str(bad), "cannot decode")
    assert not work.exists()


# --------------------------------------------------------------------------- 6: damaged state files


def test_damaged_result_json_of_train(tmp_path):
    res_file = tmp_path / "runs/train/clean-none-resnet18-s0-n100/result.json"
    res_file.parent.mkdir(parents=True)
    res_file.write_text('{"settings": {"lr"')
    res = run_cli("train.py", "--poison", "clean", "--subset", "100", "--work_dir", tmp_path)
    one_line_error(res, str(res_file), "is damaged", "--overwrite")


def test_damaged_run_json_of_train_diffusion(tmp_path):
    run_json = tmp_path / "diff_ckpt/cifar10/test32ps64/run.json"
    run_json.parent.mkdir(parents=True)
    run_json.write_text('{"diffusion": {"arch')
    args = ["--config", ECLIPSE_CFG, "--num_clean", "32", "--replicas", "2", "--work_dir", tmp_path]
    one_line_error(run_cli("train_diffusion.py", *args), str(run_json), "is damaged", "--overwrite")


def test_damaged_config_yaml_of_a_record(attack_work):
    cfg = attack_work / "record/run/config.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("attack: badnet\nepochs: [1,\n")
    res = run_cli("attack/badnet.py", *attack_argv(attack_work))
    one_line_error(res, str(cfg), "is damaged", "--overwrite")


def test_damaged_phases_json_of_a_record(attack_work):
    from utils.dataelixir.keys import attack_keys
    from utils.dataelixir.record import open_record
    from utils.options import parse_config

    argv = attack_argv(attack_work)
    cfg, _ = parse_config("badnet", argv, attack_keys("badnet"))
    open_record(attack_work / "record/run", {"attack": "badnet", **cfg}, False)
    phases = attack_work / "record/run/phases.json"
    phases.write_text('{"attack": {"do')
    one_line_error(run_cli("attack/badnet.py", *argv), str(phases), "is damaged", "--save_folder_name")


def test_damaged_candidates_meta_json(tmp_path):
    from utils.dataelixir.candidate_store import candidates_complete

    (tmp_path / "meta.json").write_text('{"n": 4, "k"')
    with pytest.raises(UserError, match=r"meta.json is damaged .*delete"):
        candidates_complete(tmp_path)


# --------------------------------------------------------------------------- 6: YAML files


def test_yaml_path_that_is_a_folder_or_not_utf8(attack_work, tmp_path):
    one_line_error(run_cli("attack/badnet.py", *attack_argv(attack_work, yaml=tmp_path)), str(tmp_path), "folder")
    binary = tmp_path / "x.yaml"
    binary.write_bytes(b"pratio: 0.1\n\xff\xfe\x00")
    one_line_error(run_cli("attack/badnet.py", *attack_argv(attack_work, yaml=binary)), str(binary), "not UTF-8")


# --------------------------------------------------------------------------- 6: unwritable outputs


def _block(work: Path, folder: str) -> Path:
    """A file where the output folder should be: every write below it fails (ENOTDIR)."""
    work.mkdir(parents=True, exist_ok=True)
    (work / folder).write_text("in the way\n")
    return work / folder


def test_unwritable_output_train(tmp_path):
    blocker = _block(tmp_path, "runs")
    res = run_cli("train.py", "--poison", "clean", "--subset", "100", "--epochs", "1", "--work_dir", tmp_path)
    one_line_error(res, str(blocker), "Not a directory")


def test_unwritable_output_train_diffusion(tmp_path):
    blocker = _block(tmp_path, "diff_ckpt")
    args = ["--config", ECLIPSE_CFG, "--num_clean", "32", "--iterations", "1", "--work_dir", tmp_path]
    one_line_error(run_cli("train_diffusion.py", *args), str(blocker), "Not a directory")


def test_unwritable_output_purification(eclipse_work):
    blocker = _block(eclipse_work, "purified_data")
    res = run_cli("purification.py", *PURIFY, "--t", "2", "--work_dir", eclipse_work)
    one_line_error(res, str(blocker), "Not a directory")


def test_unwritable_output_poison(tmp_path, cifar_root):
    blocker = _block(tmp_path, "poisoned_data")
    res = run_cli("poison.py", "--poison", "URP", "--subset", "100", "--work_dir", tmp_path)
    one_line_error(res, str(blocker), "Not a directory")


def test_unwritable_output_attack(attack_work):
    blocker = _block(attack_work, "record")
    one_line_error(run_cli("attack/badnet.py", *attack_argv(attack_work)), str(blocker), "Not a directory")


def test_full_disk_names_the_file(tmp_path, monkeypatch, capsys, cifar_root):
    import train_diffusion
    import utils.fileio

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(utils.fileio.os, "fsync", full)
    args = ["--config", ECLIPSE_CFG, "--num_clean", "32", "--iterations", "1", "--work_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        train_diffusion.main(args)
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    # the first write is the output lock's record (then sparse_set.json): either is named
    assert ": No space left on device (ENOSPC)" in last and (".lock" in last or "sparse_set.json" in last), last


# --------------------------------------------------------------------------- 6: purification resumed with another batch size


def test_purification_resume_with_another_batch_size_is_refused(eclipse_work):
    parts = eclipse_work / "purified_data/cifar10/tiny/2/5/.URP-pure.parts"
    parts.mkdir(parents=True)
    torch.save(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), parts / "part_00000.pt")
    before = tree(eclipse_work)
    res = run_cli("purification.py", *PURIFY, "--t", "2", "--batch_size", "8", "--work_dir", eclipse_work)
    one_line_error(res, "--batch_size 4", "--batch_size 8")
    assert tree(eclipse_work) == before  # no log, nothing purified


# --------------------------------------------------------------------------- 8 / 9: the attack's diffusion checkpoint


def test_attack_load_checks_the_ddpm_before_any_phase(attack_work):
    torch.save({"conv_in.weight": torch.zeros(1)}, attack_work / DDPM_CKPT)
    res = run_cli("attack/badnet.py", *attack_argv(attack_work))
    one_line_error(res, "does not match the configured model")
    assert not (attack_work / "record").exists()


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo never",))


def test_code_payload_checkpoint_names_the_global_and_never_suggests_unsafe_loading(attack_work):
    torch.save({"x": _Payload()}, attack_work / DDPM_CKPT)
    line = one_line_error(run_cli("attack/badnet.py", *attack_argv(attack_work)), "global posix.system")
    assert "weights_only" not in line
    assert not (attack_work / "record").exists()
