"""The configuration keys of the attack scripts: the training and defence keys every
``attack/<name>.py`` accepts, each attack's own keys, and the checks across keys."""

from __future__ import annotations

from typing import Any

import torch

from models import CLASSIFIERS
from utils.dataelixir import defence as de
from utils.dataelixir.attack_data import ATTACKS, COMMON_KEYS
from utils.dataelixir.triggers import get_trigger
from utils.fileio import UserError
from utils.options import BF16, PRECISION, Key, Range
from utils.precision import Precision, resolve_precision

_POS, _NONNEG, _GT0 = Range(1), Range(0), Range(0, low_open=True)
# a class-balanced subset needs one image per class at least
_SUBSET = Range(10)

# --------------------------------------------------------------------------- configuration keys

# Ho et al.'s CIFAR-10 DDPM as pytorch_diffusion converted it (non-EMA, as DataElixir's code)
PAPER_DDPM_CKPT = "cifar10"

TRAIN_KEYS: dict[str, Key] = {
    "device": Key("auto", "auto (CUDA when present), cpu, cuda, cuda:N"),
    "amp": Key(
        None,
        "BackdoorBench's amp flag for the three classifier trainings: true = bf16, false = fp32, null = precision",
        bool,
        nullable=True,
    ),
    "dataset": Key("cifar10", "dataset (only cifar10)", choices=("cifar10",)),
    "dataset_path": Key(None, "CIFAR-10 folder (default: $CIFAR10_ROOT, else data/cifar10)", type=str, nullable=True),
    "subset": Key(None, "class-balanced training subset size (CPU scale; null = all 50,000)", int, True, range=_SUBSET),
    "test_subset": Key(None, "class-balanced test subset size (null = all 10,000)", int, True, range=_SUBSET),
    "model": Key("preactresnet18", "classifier architecture (BackdoorBench: preactresnet18)"),
    "model_width": Key(64, "base width of the classifier (64 = paper size)", range=_POS),
    "client_optimizer": Key("sgd", "optimiser (only sgd)", choices=("sgd",)),
    "lr_scheduler": Key(
        "CosineAnnealingLR",
        "per-epoch schedule: CosineAnnealingLR (BackdoorBench's default) or MultiStepLR (its WaNet and Input-aware)",
        choices=("CosineAnnealingLR", "MultiStepLR"),
    ),
    "batch_size": Key(128, "training batch size", range=_POS),
    "lr": Key(0.01, "learning rate of the backdoored and stage-1 models", range=_GT0),
    "sgd_momentum": Key(0.9, "SGD momentum", range=Range(0, 1, high_open=True)),
    "wd": Key(0.0005, "SGD weight decay", range=_NONNEG),
    "epochs": Key(100, "epochs of each of the three trainings (backdoored, stage 1, stage 2)", range=_POS),
    "steplr_milestones": Key([100, 200, 300, 400], "MultiStepLR: epochs at which the lr is multiplied by steplr_gamma"),
    "steplr_gamma": Key(0.1, "MultiStepLR: factor applied at each milestone", range=_GT0),
    "train_augment": Key(
        "crop_flip",
        "training augmentation: crop_flip (BackdoorBench's RandomCrop(32, 4) + flip), crop_rotate_flip "
        "(its WaNet and Input-aware: RandomCrop(32, random_crop) + RandomRotation(random_rotation) + flip) "
        "or none (CPU scale)",
        choices=("crop_flip", "crop_rotate_flip", "none"),
    ),
    "random_crop": Key(5, "crop_rotate_flip: zero padding of the random crop (BackdoorBench: 5)", range=Range(0, 16)),
    "random_rotation": Key(
        10.0, "crop_rotate_flip: largest rotation in degrees (BackdoorBench: 10)", range=Range(0, 180)
    ),
    "crop_prob": Key(1.0, "crop_rotate_flip: probability that an image is cropped", range=Range(0, 1)),
    "rotation_prob": Key(1.0, "crop_rotate_flip: probability that an image is rotated", range=Range(0, 1)),
    "rotation_interp": Key(
        "nearest",
        "crop_rotate_flip: nearest (torchvision, Input-aware) or bilinear (kornia, WaNet)",
        choices=("nearest", "bilinear"),
    ),
    "frequency_save": Key(
        100, "accepted for BackdoorBench compatibility and ignored: checkpoints are written every epoch", range=_POS
    ),
}

DEFENCE_KEYS: dict[str, Key] = {
    "purify_batch_size": Key(1024, "samples per candidate-construction chunk (one resumable unit)", range=_POS),
    "steps_T": Key(150, "DataElixir T: noise to step T, then T reverse steps", range=_POS),
    "rounds_n": Key(5, "DataElixir n: rounds of noise-and-denoise per sample", range=_POS),
    "last_steps_m": Key(10, "DataElixir m: reverse-step samples kept per round", range=_POS),
    "threshold_tau": Key(5, "DataElixir tau: label-transition threshold", range=_NONNEG),
    "ft_lr": Key(0.002, "learning rate of the stage-2 fine-tuning", range=_GT0),
    "detection_tail": Key(
        "two_sided",
        "target-label MAD score: two_sided (the paper's |metric - median|) or upper (only classes that "
        "leave their label unusually often)",
        choices=("two_sided", "upper"),
    ),
    "diffusion_config": Key("config/ddpm/cifar10.yml", "DDPM config (config/ddpm/cpu.yml for CPU scale)"),
    "diffusion_ckpt": Key(
        PAPER_DDPM_CKPT,
        "DDPM weights: cifar10 | ema_cifar10 (Ho et al.'s, pytorch_diffusion's names; downloaded once) "
        "or a path (relative to --work_dir unless absolute)",
    ),
    "noise_offset": Key(0, "0: noise to a[T-1] (exact); 1: a[T] as the reference code (off-by-one)", choices=(0, 1)),
    "ssim_mode": Key(
        "per_channel",
        "image-choice SSIM: per_channel (3x3 window per channel, the paper's intent) or reference (the 3x3x3 "
        "window DataElixir's code computes with scikit-image 0.24)",
        choices=("per_channel", "reference"),
    ),
    "original_round_trip": Key(
        False, "candidate 0 = the original after the reference code's float round trip (63 byte values drop by one)"
    ),
    "reference_exact": Key(
        False, "turn on every reference-code option: noise_offset 1, ssim_mode reference, original_round_trip true"
    ),
    "purify_respace": Key(
        None, "reverse steps per round (null = steps_T; fewer = CPU-scale deviation)", int, True, range=_POS
    ),
    "purify_dense_tail": Key(
        False,
        "with purify_respace: the last last_steps_m reverse steps unspaced, so kept candidates are at the "
        "paper's noise levels (CPU-scale option)",
    ),
    "precision": PRECISION,
    "bf16": BF16.with_default(
        None,
        "older spelling for the DDPM rounds and the candidates' labels: true = bf16, false = fp32, null = precision",
    ),
}


# the computations of the flow, and the older key that overrides each (None: none)
FLOW_COMPUTATIONS = {
    "trigger": None,
    "backdoor_training": "amp",
    "ddpm_rounds": "bf16",
    "candidate_labels": "bf16",
}


def flow_precisions(cfg: dict[str, Any], device: torch.device) -> dict[str, Precision]:
    """The precision of each computation of the flow on ``device`` (``precision``, with
    ``amp`` and ``bf16`` where given)."""
    out = {}
    for computation, older in FLOW_COMPUTATIONS.items():
        flag = None if older is None else cfg.get(older)
        requested = cfg["precision"] if flag is None else ("bf16" if flag else "fp32")
        out[computation] = resolve_precision(requested, device, computation)
    return out


def attack_keys(attack: str) -> dict[str, Key]:
    spec = ATTACKS[attack]
    common = dict(COMMON_KEYS)
    own = dict(spec.keys)
    clash = set(own) & (set(TRAIN_KEYS) | set(DEFENCE_KEYS) | set(common))
    if clash:  # pragma: no cover - a programming error in a trigger module
        raise RuntimeError(f"{attack} declares keys that the flow owns: {sorted(clash)}")
    return {**TRAIN_KEYS, **common, **own, **DEFENCE_KEYS}


def all_known_keys() -> set[str]:
    out: set[str] = set()
    for name in ATTACKS:
        out |= set(attack_keys(name))
    return out


def validate(cfg: dict[str, Any], attack: str) -> None:
    """Checks beyond each key's type and range (those are checked while parsing)."""
    if cfg["model"] not in CLASSIFIERS:
        raise UserError(f"model must be one of {', '.join(CLASSIFIERS)}, got {cfg['model']!r}")
    ms = cfg["steplr_milestones"]
    if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in ms):
        raise UserError(f"steplr_milestones must be a list of epochs >= 1, got {ms!r}")
    de.check_step_settings(
        cfg["steps_T"], cfg["rounds_n"], cfg["last_steps_m"], cfg["purify_respace"], cfg["purify_dense_tail"]
    )
    if cfg["attack_label_trans"] == "all2all" and not ATTACKS[attack].supports_all2all:
        raise UserError(f"{attack} supports only attack_label_trans all2one")
    # the trigger checks its own keys when built (cheap: its models are made later, in prepare)
    get_trigger(attack)(
        cfg,
        seed=cfg["random_seed"],
        target=cfg["attack_target"],
        label_trans=cfg["attack_label_trans"],
        pratio=cfg["pratio"],
    )
