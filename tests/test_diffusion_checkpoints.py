"""Checkpoint names (``utils/diffusion/checkpoints.py``): improved-diffusion's spelling is written,
both it and this project's earlier spelling are read."""

from __future__ import annotations

import hashlib

import pytest
import torch

from utils.data import psnr_db
from utils.diffusion import create_diffusion, load_purifier
from utils.diffusion.checkpoints import (
    CheckpointName,
    checkpoint_name,
    checkpoint_steps,
    ema_checkpoints,
    find_checkpoint,
    parse_checkpoint_name,
    resolve_checkpoint,
    spellings,
)
from utils.diffusion.factory import diffusion_train_command, load_diffusion_spec
from utils.diffusion.purify import noise_and_denoise, to_model_range
from utils.fileio import UserError
from utils.options import load_yaml_file
from utils.paths import REPO_ROOT


def test_build_improved_diffusion_and_legacy_names():
    # improved-diffusion: f"model{step:06d}.pt", f"ema_{rate}_{step:06d}.pt", f"opt{step:06d}.pt"
    assert checkpoint_name("model", 3000) == "model003000.pt"
    assert checkpoint_name("opt", 3000) == "opt003000.pt"
    assert checkpoint_name("ema", 3000, 0.999) == "ema_0.999_003000.pt"
    assert checkpoint_name("ema", 250000, 0.9999) == "ema_0.9999_250000.pt"  # ECLIPSE's published name
    assert checkpoint_name("model", 1234567) == "model1234567.pt"
    assert checkpoint_name("model", 3000, legacy=True) == "model_3000.pt"
    assert checkpoint_name("opt", 3000, legacy=True) == "opt_3000.pt"
    assert checkpoint_name("ema", 3000, 0.999, legacy=True) == "ema_0.999_3000.pt"
    with pytest.raises(ValueError):
        checkpoint_name("ema", 5)
    with pytest.raises(ValueError):
        checkpoint_name("model", 5, 0.9999)
    with pytest.raises(ValueError):
        checkpoint_name("residual", 5)


@pytest.mark.parametrize(
    "name, want",
    [
        ("model003000.pt", CheckpointName("model", 3000, None, False)),
        ("model_3000.pt", CheckpointName("model", 3000, None, True)),
        ("opt000004.pt", CheckpointName("opt", 4, None, False)),
        ("opt_4.pt", CheckpointName("opt", 4, None, True)),
        ("ema_0.9999_250000.pt", CheckpointName("ema", 250000, "0.9999", False)),
        ("ema_0.999_003000.pt", CheckpointName("ema", 3000, "0.999", False)),
        ("ema_0.999_3000.pt", CheckpointName("ema", 3000, "0.999", True)),
        ("ema_1e-05_000007.pt", CheckpointName("ema", 7, "1e-05", False)),
        ("model-790000.ckpt", None),
        ("modelA.pt", None),
        ("ema_0.9999.pt", None),
        ("stage1_model.pt", None),
    ],
)
def test_parse_both_spellings(name, want):
    assert parse_checkpoint_name(name) == want


def test_round_trip():
    for kind, rate in (("model", None), ("opt", None), ("ema", 0.9999)):
        for step in (0, 7, 3000, 250000, 1000000):
            for legacy in (False, True):
                p = parse_checkpoint_name(checkpoint_name(kind, step, rate, legacy))
                assert (p.kind, p.step) == (kind, step)
                assert p.rate == (None if rate is None else "0.9999")


def test_find_and_resolve(tmp_path):
    assert spellings("ema", 250000, 0.9999) == ["ema_0.9999_250000.pt"]
    assert spellings("model", 5) == ["model000005.pt", "model_5.pt"]
    (tmp_path / "ema_0.999_3000.pt").write_bytes(b"x")
    (tmp_path / "model000010.pt").write_bytes(b"x")
    (tmp_path / "model_3000.pt").write_bytes(b"x")
    (tmp_path / "ema_0.9999_000010.pt").write_bytes(b"x")
    assert find_checkpoint(tmp_path, "ema", 3000, 0.999) == tmp_path / "ema_0.999_3000.pt"
    assert find_checkpoint(tmp_path, "ema", 3000, 0.9999) is None
    assert resolve_checkpoint(tmp_path / "ema_0.999_003000.pt") == tmp_path / "ema_0.999_3000.pt"
    assert resolve_checkpoint(tmp_path / "ema_0.9999_10.pt") == tmp_path / "ema_0.9999_000010.pt"
    missing = tmp_path / "ema_0.9999_250000.pt"
    assert resolve_checkpoint(missing) == missing  # names what was asked for
    assert resolve_checkpoint(tmp_path / "other.pt") == tmp_path / "other.pt"
    assert checkpoint_steps(tmp_path, "model") == [10, 3000]
    assert ema_checkpoints(tmp_path, 3000) == [tmp_path / "ema_0.999_3000.pt"]


def test_train_command_hint_reads_both_spellings():
    for name in ("ema_0.999_3000.pt", "ema_0.999_003000.pt"):
        cmd = diffusion_train_command("config/eclipse/cpu.yml", "test2000ps8000", name)
        assert cmd.endswith("--ema_rate 0.999 --iterations 3000")
    assert diffusion_train_command("c.yml", "test2000ps8000", "ema_0.9999_250000.pt").endswith("--iterations 250000")


def test_train_command_hint_names_the_config_from_the_repository(tmp_path):
    cmd = diffusion_train_command("cpu.yml", "test2000ps8000", "ema_0.9999_30.pt", tmp_path)
    assert cmd == f"python train_diffusion.py --config config/eclipse/cpu.yml --iterations 30 --work_dir {tmp_path}"
    assert "--work_dir" not in diffusion_train_command("cpu.yml", "test2000ps8000", "ema_0.9999_30.pt", REPO_ROOT)


def test_load_purifier_either_spelling_missing_and_noise_step(tmp_path):
    spec = load_diffusion_spec("config/eclipse/cpu.yml")
    torch.save(spec.build_model().state_dict(), tmp_path / "ema_0.9999_000030.pt")
    model, diffusion, got = load_purifier(spec, tmp_path / "ema_0.9999_30.pt", torch.device("cpu"), t=100)
    assert got is spec and not model.training and not any(p.requires_grad for p in model.parameters())
    assert diffusion.num_timesteps == create_diffusion(spec).num_timesteps == spec.build_diffusion("").num_timesteps
    with pytest.raises(UserError, match=r"--t 4001 exceeds the diffusion's 4000 steps"):
        load_purifier(spec, tmp_path / "ema_0.9999_30.pt", torch.device("cpu"), t=4001)
    with pytest.raises(UserError, match=r"diffusion checkpoint not found: .*ema_0\.9999_40\.pt; train it$"):
        load_purifier("config/eclipse/cpu.yml", tmp_path / "ema_0.9999_40.pt", torch.device("cpu"), missing="train it")
    assert len(create_diffusion(spec, "10").timestep_map) == 10


TABLE_DDPM = "diff_ckpt/cifar10/train50000ps50000/ema_0.999_012000.pt"


def test_tracked_table_ddpm_is_the_documented_trained_one(cifar_test):
    """The CPU-scale DDPM tracked for DataElixir's nine-attack table (diff_ckpt/README.md): the
    overlay names it, its checksum is the documented one, and one of the table's rounds (noise to
    step 150, 30 respaced reverse steps) brings real test images back far closer than the same
    network untrained does."""
    ckpt = REPO_ROOT / TABLE_DDPM
    assert load_yaml_file(REPO_ROOT / "config/dataelixir_cpu_r30.yaml")["diffusion_ckpt"] == TABLE_DDPM
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() in (REPO_ROOT / "diff_ckpt/README.md").read_text()
    model, base, spec = load_purifier(REPO_ROOT / "config/ddpm/cpu.yml", ckpt, torch.device("cpu"))
    torch.manual_seed(0)
    untrained = spec.build_model().eval()
    x0 = to_model_range(cifar_test.images[:32])

    def round_trip_db(net: torch.nn.Module) -> float:
        with torch.no_grad():
            out, _ = noise_and_denoise(net, base, x0, 150, respace=30, generator=torch.Generator().manual_seed(0))
        return psnr_db((out + 1) * 127.5, (x0 + 1) * 127.5, per_image=False)  # [-1, 1] to 0..255

    trained_db, untrained_db = round_trip_db(model), round_trip_db(untrained)
    # measured: 21.7 dB trained, 10.7 untrained (the noised input is about 12.8)
    assert trained_db > 19 and trained_db > untrained_db + 8, (trained_db, untrained_db)
