"""The training recipes the references used.

* DDPM (``config/ddpm/*.yml``): Ho et al.'s CIFAR-10 recipe (hojonathanho/diffusion,
  ``scripts/run_cifar.py`` and ``diffusion_tf/tpu_utils``): Adam lr 2e-4 (TensorFlow's
  betas 0.9 / 0.999, eps 1e-8), lr * min(step / 5000, 1) warm-up, gradients clipped to
  global norm 1.0, random horizontal flips, EMA 0.9999. ECLIPSE's configs keep
  improved-diffusion's AdamW 1e-4 without any of them.
* ISS baselines (``train.py --defense``): ECLIPSE's victim recipe by default (80 epochs,
  constant lr, no weight decay), ISS's own (60 epochs, CosineAnnealingLR, weight decay 5e-4,
  one forward per step) with ``--iss_recipe iss``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import train
import train_diffusion
from utils.diffusion import training as diffusion_training
from utils.diffusion.factory import load_diffusion_spec, spec_from_dict
from utils.diffusion.training import DiffusionTrainConfig, make_optimizer
from utils.fileio import UserError
from utils.trainer import TrainConfig, lr_at

REPO = Path(__file__).resolve().parents[1]
DDPM_CONFIGS = ["config/ddpm/cifar10.yml", "config/ddpm/cpu.yml", "config/ddpm/cpu_wide.yml"]
ECLIPSE_CONFIGS = ["config/eclipse/cifar10.yml", "config/eclipse/cpu.yml"]
TINY_DDPM = {
    "model": {"architecture": "ddpm", "ch": 32, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": []},
    "diffusion": {"num_diffusion_timesteps": 10},
}


def _recipe(config: str, *flags: str) -> dict:
    args = train_diffusion.parse_args(["--config", config, *flags])
    return train_diffusion.training_recipe(args, load_diffusion_spec(REPO / config).training)


def _train_cfg(config: str, iterations: int, *flags: str) -> DiffusionTrainConfig:
    return DiffusionTrainConfig(
        iterations=iterations, batch_size=2, save_interval=1000, log_interval=1, **_recipe(config, *flags)
    )


# --------------------------------------------------------------------------- the DDPM's recipe


HO_RECIPE = {
    "optimizer": "adam",
    "lr": 2e-4,
    "weight_decay": 0.0,
    "warmup_steps": 5000,
    "grad_clip": 1.0,
    "flip": True,
    "ema_rate": 0.9999,
}
IMPROVED_RECIPE = {
    "optimizer": "adamw",
    "lr": 1e-4,
    "weight_decay": 0.0,
    "warmup_steps": 0,
    "grad_clip": 0.0,
    "flip": False,
    "ema_rate": 0.9999,
}


@pytest.mark.parametrize(
    "config, recipe, optimizer",
    [(c, HO_RECIPE, torch.optim.Adam) for c in DDPM_CONFIGS]
    + [(c, IMPROVED_RECIPE, torch.optim.AdamW) for c in ECLIPSE_CONFIGS],
)
def test_ddpm_configs_carry_ho_et_al_recipe_and_eclipse_configs_improved_diffusions(config, recipe, optimizer):
    assert _recipe(config) == recipe
    opt = make_optimizer([nn.Parameter(torch.zeros(3))], _train_cfg(config, 1))
    assert type(opt) is optimizer
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (recipe["lr"], (0.9, 0.999), 1e-8, 0.0)


def test_command_line_replaces_the_configs_values():
    r = _recipe(DDPM_CONFIGS[0], "--lr", "5e-5", "--ema_rate", "0.999", "--warmup_steps", "0", "--flip", "false")
    assert (r["lr"], r["ema_rate"], r["warmup_steps"], r["flip"]) == (5e-5, 0.999, 0, False)
    assert (r["optimizer"], r["grad_clip"]) == ("adam", 1.0)  # the others stay the config's
    r = _recipe(ECLIPSE_CONFIGS[0], "--optimizer", "adam", "--grad_clip", "1")
    assert (r["optimizer"], r["grad_clip"], r["lr"]) == ("adam", 1.0, 1e-4)


def test_training_section_keys_are_checked():
    with pytest.raises(UserError, match="training.optimizer"):
        spec_from_dict({**TINY_DDPM, "training": {"optimizer": "sgd"}}, "x.yml")
    with pytest.raises(UserError, match="unknown key"):
        spec_from_dict({**TINY_DDPM, "training": {"hflip": True}}, "x.yml")
    # YAML 1.1 reads 2e-4 as text: it is the number it spells
    assert spec_from_dict({**TINY_DDPM, "training": {"lr": "2e-4"}}, "x.yml").training["lr"] == 2e-4


def _warmup_lr(step: int, peak: float = 2e-4, warmup: int = 5000) -> float:
    """Ho et al.'s get_warmed_up_lr: peak * min(global_step / warmup, 1), global_step
    counting the updates made before this one."""
    return peak * min(step / warmup, 1.0)


def test_warmup_lr_used_by_the_update():
    """The first Adam update moves each weight by its lr times g / (|g| + eps) (m_hat / sqrt(v_hat)
    = sign(g)), so the step made at update ``step`` shows the lr used."""
    cfg = _train_cfg(DDPM_CONFIGS[0], 1)
    for step in (0, 2500, 5000, 12000):
        w = nn.Parameter(torch.zeros(50))
        opt = make_optimizer([w], cfg)
        used = diffusion_training._update(nn.ParameterList([w]), opt, (w * 3).sum(), cfg, step)
        assert used == pytest.approx(_warmup_lr(step), abs=1e-15)
        expected = torch.full_like(w, -_warmup_lr(step) * 3 / (3 + 1e-8))
        assert torch.allclose(w.detach(), expected, rtol=1e-6, atol=1e-12), step


@pytest.mark.parametrize("config,clipped", [(DDPM_CONFIGS[0], True), (ECLIPSE_CONFIGS[0], False)])
def test_gradient_clipping(config, clipped):
    cfg = _train_cfg(config, 1)
    w = nn.Parameter(torch.ones(4) * 3)
    opt = make_optimizer([w], cfg)
    diffusion_training._update(nn.ParameterList([w]), opt, (w**2).sum() * 10, cfg, 6000)
    raw = torch.full((4,), 60.0)  # d/dw of 10 * sum(w^2) at w = 3; global norm 120
    # tf.clip_by_global_norm: g * clip / max(norm, clip)
    expected = raw * 1.0 / max(raw.norm().item(), 1.0) if clipped else raw
    assert torch.allclose(w.grad, expected)


def _train_tiny(tmp_path: Path, config: str, monkeypatch, iterations: int = 3) -> dict:
    """Train a tiny DDPM with ``config``'s recipe; what the loop did: the lr it logged per
    step, the flips it made and the clip norms it applied."""
    calls: dict = {"flip": 0, "clip": []}
    real_flip, real_clip = diffusion_training.random_flip, torch.nn.utils.clip_grad_norm_

    def flip(x, g, p=0.5):
        calls["flip"] += 1
        return real_flip(x, g, p)

    def clip(params, max_norm, *a, **k):
        calls["clip"].append(max_norm)
        return real_clip(params, max_norm, *a, **k)

    monkeypatch.setattr(diffusion_training, "random_flip", flip)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    spec = spec_from_dict(TINY_DDPM, "tiny")
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cfg = _train_cfg(config, iterations)
    diffusion_training.train_diffusion(
        spec.build_model(), spec.build_diffusion(), images, cfg, tmp_path, torch.device("cpu"), log=lambda *_: None
    )
    with open(tmp_path / "progress.csv") as f:
        calls["lr"] = [float(r["lr"]) for r in csv.DictReader(f)]
    return calls


def test_ddpm_training_loop_applies_ho_recipe(tmp_path, monkeypatch):
    calls = _train_tiny(tmp_path, DDPM_CONFIGS[1], monkeypatch)
    assert calls["lr"] == pytest.approx([_warmup_lr(s) for s in range(3)], abs=1e-15)
    assert calls["flip"] == 3 and calls["clip"] == [1.0] * 3


def test_eclipse_training_loop_keeps_improved_diffusion_recipe(tmp_path, monkeypatch):
    calls = _train_tiny(tmp_path, ECLIPSE_CONFIGS[1], monkeypatch)
    assert calls["lr"] == [1e-4] * 3
    assert calls["flip"] == 0 and calls["clip"] == []


# --------------------------------------------------------------------------- the ISS baselines' recipe


def _victim(*flags: str):
    return train.parse_args(["--poison", "EM", *flags])


@pytest.mark.parametrize("defense", ["grayscale", "jpeg"])
def test_iss_baselines_default_to_eclipse_victim_recipe(defense):
    a = _victim("--defense", defense)
    assert (a.epochs, a.schedule, a.weight_decay, a.bn_updates, a.lr) == (80, "constant", 0.0, 2, 0.1)


@pytest.mark.parametrize("defense", ["grayscale", "jpeg"])
def test_iss_recipe_is_iss_own_code(defense):
    a = _victim("--defense", defense, "--iss_recipe", "iss")
    assert (a.epochs, a.schedule, a.weight_decay, a.bn_updates, a.lr) == (60, "cosine", 5e-4, 1, 0.1)
    assert a.run_name != _victim("--defense", defense).run_name  # the two recipes' runs apart
    # ISS steps CosineAnnealingLR(T_max=60) once per epoch: its lr per epoch, from torch's own scheduler
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=60)
    expected = []
    for _ in range(60):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    cfg = TrainConfig(epochs=a.epochs, lr=a.lr, schedule=a.schedule, weight_decay=a.weight_decay)
    assert [lr_at(cfg, e, 0, 391) for e in range(60)] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert expected[30] == pytest.approx(0.1 * (1 + math.cos(math.pi * 30 / 60)) / 2)


def test_command_line_replaces_the_recipes_values():
    a = _victim("--defense", "jpeg", "--iss_recipe", "iss", "--epochs", "15", "--weight_decay", "0")
    assert (a.epochs, a.schedule, a.weight_decay, a.bn_updates) == (15, "cosine", 0.0, 1)
    a = _victim("--schedule", "onecycle")
    assert (a.epochs, a.schedule, a.weight_decay) == (80, "onecycle", 0.0)


def test_pure_keeps_eclipse_recipe():
    assert (_victim("--pure").epochs, _victim("--pure").schedule) == (80, "constant")
    with pytest.raises(UserError, match="--iss_recipe"):
        _victim("--pure", "--iss_recipe", "iss")


def test_a_run_json_from_before_the_recipe_keys_reads_as_improved_diffusions_recipe():
    from utils.compat import legacy_diffusion_training

    old = {"lr": 1e-4, "weight_decay": 0.0, "flip": False, "ema_rate": 0.9999, "precision": "fp32"}
    assert legacy_diffusion_training(old) == {**old, "optimizer": "adamw", "warmup_steps": 0, "grad_clip": 0.0}
    # keys a newer run.json holds are kept as stored
    assert legacy_diffusion_training({**old, "optimizer": "adam"})["optimizer"] == "adam"


@pytest.mark.parametrize(
    "overlays",
    [
        "config/dataelixir_cpu.yaml",
        "config/dataelixir_cpu.yaml,config/dataelixir_cpu_20k.yaml",
        "config/dataelixir_cpu.yaml,config/dataelixir_cpu_20k.yaml,config/dataelixir_cpu_r30.yaml",
    ],
)
def test_dataelixir_cpu_overlays_configure_every_attack(overlays, tmp_path):
    """The CPU-scale overlay stacks give every attack a valid configuration whose classifier
    has the pooled features DataElixir's selection needs; the 20k overlay changes only the
    classifier's data, augmentation (not FTrojan's) and epochs, the r30 one only the reverse steps per round
    and the DDPM checkpoint (the same training run, 12000 iterations instead of 6000)."""
    from utils.dataelixir.attack_data import ATTACKS
    from utils.dataelixir.flow import attack_argv, resolve_flow_config
    from utils.dataelixir.models import build_model

    for attack in ATTACKS:
        cfg, _ = resolve_flow_config(attack, attack_argv(attack, overlays, 0, tmp_path, attack))
        strong = "20k" in overlays
        assert (cfg.model, cfg.subset, cfg.model_width) == ("preactresnet18", 20000 if strong else 5000, 16)
        # FTrojan's own overlay keeps it unaugmented: with crop + flip the 20k model does not learn it
        augment = "crop_flip" if strong and attack != "ftrojan" else "none"
        assert cfg.train_augment == augment and cfg.epochs == (30 if strong else 20)
        assert cfg.steps_T == 150 and cfg.rounds_n == 2 and cfg.test_subset == 1000
        assert cfg.purify_respace == (30 if "r30" in overlays else 10) and cfg.last_steps_m == 5
        iterations = "012000" if "r30" in overlays else "006000"
        assert cfg.diffusion_ckpt == f"diff_ckpt/cifar10/train50000ps50000/ema_0.999_{iterations}.pt"
        assert build_model(cfg).net.features(torch.rand(1, 3, 32, 32)).shape[1] == 8 * 16
