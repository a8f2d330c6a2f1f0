"""The configuration keys of the attack scripts: the training and defence keys every
``attack/<name>.py`` accepts, each attack's own keys, and the checks across keys."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from models import CLASSIFIERS
from utils.dataelixir import defence as de
from utils.dataelixir.attack_data import ATTACKS, COMMON_KEYS
from utils.dataelixir.triggers import get_trigger
from utils.datasets import DATASET_KEY, DatasetSpec, dataset_spec
from utils.fileio import UserError
from utils.options import BF16, FRACTION, GT0, NONNEG, POSITIVE, PRECISION, SUBSET, Key, Range, resolve_path
from utils.precision import Precision, resolve_precision

# a class-balanced subset needs one image per class at least

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
    "dataset": DATASET_KEY,
    "dataset_path": Key(
        None,
        "the dataset's folder, or BackdoorBench's folder holding it as <dataset>/ (default: $<DATASET>_ROOT, "
        "e.g. $CIFAR10_ROOT, else data/<dataset>)",
        type=str,
        nullable=True,
    ),
    "subset": Key(
        None,
        "class-balanced training subset size (CPU scale; null = the whole training split)",
        int,
        True,
        range=SUBSET,
    ),
    "test_subset": Key(None, "class-balanced test subset size (null = the whole test split)", int, True, range=SUBSET),
    "model": Key("preactresnet18", "classifier architecture (BackdoorBench: preactresnet18)"),
    "model_width": Key(64, "base width of the classifier (64 = paper size)", range=POSITIVE),
    "client_optimizer": Key("sgd", "optimiser (only sgd)", choices=("sgd",)),
    "lr_scheduler": Key(
        "CosineAnnealingLR",
        "per-epoch schedule: CosineAnnealingLR (BackdoorBench's default) or MultiStepLR (its WaNet and Input-aware)",
        choices=("CosineAnnealingLR", "MultiStepLR"),
    ),
    "batch_size": Key(128, "training batch size", range=POSITIVE),
    "lr": Key(0.01, "learning rate of the backdoored and stage-1 models", range=GT0),
    "sgd_momentum": Key(0.9, "SGD momentum", range=Range(0, 1, high_open=True)),
    "wd": Key(0.0005, "SGD weight decay", range=NONNEG),
    "epochs": Key(100, "epochs of each of the three trainings (backdoored, stage 1, stage 2)", range=POSITIVE),
    "steplr_milestones": Key([100, 200, 300, 400], "MultiStepLR: epochs at which the lr is multiplied by steplr_gamma"),
    "steplr_gamma": Key(0.1, "MultiStepLR: factor applied at each milestone", range=GT0),
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
    "crop_prob": Key(
        1.0, "crop_rotate_flip: probability that a batch is cropped, drawn per batch (WaNet: 0.8)", range=FRACTION
    ),
    "rotation_prob": Key(
        1.0, "crop_rotate_flip: probability that a batch goes through the rotation (WaNet: 0.5)", range=FRACTION
    ),
    "rotation_image_prob": Key(
        1.0,
        "crop_rotate_flip: probability that an image of such a batch is rotated (kornia's RandomRotation, WaNet: 0.5)",
        range=FRACTION,
    ),
    "rotation_interp": Key(
        "nearest",
        "crop_rotate_flip: nearest (torchvision, Input-aware) or bilinear (kornia, WaNet)",
        choices=("nearest", "bilinear"),
    ),
    "frequency_save": Key(
        100, "accepted for BackdoorBench compatibility and ignored: checkpoints are written every epoch", range=POSITIVE
    ),
}

DEFENCE_KEYS: dict[str, Key] = {
    "purify_batch_size": Key(1024, "samples per candidate-construction chunk (one resumable unit)", range=POSITIVE),
    "steps_T": Key(150, "DataElixir T: noise to step T, then T reverse steps", range=POSITIVE),
    "rounds_n": Key(5, "DataElixir n: rounds of noise-and-denoise per sample", range=POSITIVE),
    "last_steps_m": Key(10, "DataElixir m: reverse-step samples kept per round", range=POSITIVE),
    "threshold_tau": Key(5, "DataElixir tau: label-transition threshold", range=NONNEG),
    "ft_lr": Key(0.002, "learning rate of the stage-2 fine-tuning", range=GT0),
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
        None, "reverse steps per round (null = steps_T; fewer = CPU-scale deviation)", int, True, range=POSITIVE
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


# --------------------------------------------------------------------------- the flow's configuration

# the keys of FlowConfig's typed fields; any other key of a resolved configuration is the attack's own
FLOW_KEYS: dict[str, Key] = {**TRAIN_KEYS, **COMMON_KEYS, **DEFENCE_KEYS}


@dataclass(frozen=True)
class FlowConfig:
    """The resolved configuration of an attack script, built once from the YAML / command-line
    dict; the keys' meanings are their help texts above (``TRAIN_KEYS``, ``COMMON_KEYS``,
    ``DEFENCE_KEYS``). :meth:`to_dict` gives back the record's settings (``config.yaml``),
    key for key and in order."""

    attack: str
    # the attack's own keys (its trigger's), in their declaration order
    trigger_settings: Mapping[str, Any]
    # computation -> resolved precision name; None: resolved without a device (all fp32)
    precisions: Mapping[str, str] | None
    # TRAIN_KEYS
    device: str
    amp: bool | None
    dataset: str
    dataset_path: str | None
    subset: int | None
    test_subset: int | None
    model: str
    model_width: int
    client_optimizer: str
    lr_scheduler: str
    batch_size: int
    lr: float
    sgd_momentum: float
    wd: float
    epochs: int
    steplr_milestones: tuple[int, ...]
    steplr_gamma: float
    train_augment: str
    random_crop: int
    random_rotation: float
    crop_prob: float
    rotation_prob: float
    rotation_image_prob: float
    rotation_interp: str
    frequency_save: int
    # COMMON_KEYS
    attack_target: int
    attack_label_trans: str
    pratio: float
    random_seed: int
    # DEFENCE_KEYS
    purify_batch_size: int
    steps_T: int
    rounds_n: int
    last_steps_m: int
    threshold_tau: int
    ft_lr: float
    detection_tail: str
    diffusion_config: str
    diffusion_ckpt: str
    noise_offset: int
    ssim_mode: str
    original_round_trip: bool
    reference_exact: bool
    purify_respace: int | None
    purify_dense_tail: bool
    precision: str
    bf16: bool | None

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any], attack: str | None = None) -> FlowConfig:
        """The configuration of a resolved settings dict (``attack``: its ``attack`` entry
        unless given). A flow key it lacks takes its default: a record written before the key
        existed, or a caller that sets only the keys it uses."""
        values = {k: settings.get(k, key.default) for k, key in FLOW_KEYS.items()}
        values["steplr_milestones"] = tuple(values["steplr_milestones"])
        own = {k: v for k, v in settings.items() if k not in FLOW_KEYS and k not in ("attack", "precisions")}
        precisions = settings.get("precisions")
        return cls(
            attack=settings.get("attack", "") if attack is None else attack,
            trigger_settings=MappingProxyType(own),
            precisions=None if precisions is None else MappingProxyType(dict(precisions)),
            **values,
        )

    def to_dict(self) -> dict[str, Any]:
        """The record's settings: ``attack``, the keys in ``attack_keys`` order, then
        ``precisions`` (when resolved); written to ``config.yaml`` and compared on resume."""
        typed = {k: getattr(self, k) for k in FLOW_KEYS} | {"steplr_milestones": list(self.steplr_milestones)}

        def pick(keys: dict[str, Key]) -> dict[str, Any]:
            return {k: typed[k] for k in keys}

        out = {"attack": self.attack, **pick(TRAIN_KEYS), **pick(COMMON_KEYS), **self.trigger_settings}
        out.update(pick(DEFENCE_KEYS))
        if self.precisions is not None:
            out["precisions"] = dict(self.precisions)
        return out

    def with_precisions(self, precisions: Mapping[str, str]) -> FlowConfig:
        """The same configuration with the precisions resolved on this machine (or kept from a resumed record)."""
        return dataclasses.replace(self, precisions=MappingProxyType(dict(precisions)))

    def trigger_params(self) -> dict[str, Any]:
        """What the trigger is built from: the keys every attack shares and the attack's own."""
        return {**{k: getattr(self, k) for k in COMMON_KEYS}, **self.trigger_settings}

    def phase_seed(self, phase: str) -> int:
        """The seed of a phase's random draws, from ``(random_seed, phase)`` alone."""
        digest = hashlib.sha256(f"{self.random_seed}/{phase}".encode()).digest()
        return int.from_bytes(digest[:8], "little") % (2**63 - 1)

    def precision_of(self, computation: str) -> str:
        """The resolved precision of ``computation`` (fp32 where none was resolved)."""
        return (self.precisions or {}).get(computation, "fp32")

    def data_root(self) -> Path | None:
        """``dataset_path``, or its ``<dataset>/`` folder where there is one (BackdoorBench
        appends the dataset's name to it); None: the dataset's default root. A folder that
        does not exist yet is where the dataset is fetched to."""
        if not self.dataset_path:
            return None
        root = resolve_path(self.dataset_path, "dataset_path", must_exist=False)
        return root / self.dataset if (root / self.dataset).is_dir() else root

    def data_spec(self) -> DatasetSpec:
        """The dataset's registry entry with its class count and image size (an image
        folder's read off the folder)."""
        return dataset_spec(self.dataset, self.data_root())


# every option that reproduces a quirk of DataElixir's code, with its reference value
REFERENCE_EXACT = {"noise_offset": 1, "ssim_mode": "reference", "original_round_trip": True}


def apply_reference_exact(cfg: dict[str, Any]) -> dict[str, Any]:
    """``reference_exact: true`` turns on every option of ``REFERENCE_EXACT`` (whatever they
    were set to); otherwise ``cfg`` is returned unchanged."""
    return {**cfg, **REFERENCE_EXACT} if cfg.get("reference_exact") else cfg


# the computations of the flow, and the older key that overrides each (None: none)
FLOW_COMPUTATIONS = {
    "trigger": None,
    "backdoor_training": "amp",
    "ddpm_rounds": "bf16",
    "candidate_labels": "bf16",
}


def flow_precisions(cfg: FlowConfig, device: torch.device) -> dict[str, Precision]:
    """The precision of each computation of the flow on ``device`` (``precision``, with
    ``amp`` and ``bf16`` where given)."""
    out = {}
    for computation, older in FLOW_COMPUTATIONS.items():
        flag = None if older is None else getattr(cfg, older)
        requested = cfg.precision if flag is None else ("bf16" if flag else "fp32")
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


def validate(cfg: FlowConfig) -> None:
    """Checks beyond each key's type and range (those are checked while parsing)."""
    if cfg.model not in CLASSIFIERS:
        raise UserError(f"model must be one of {', '.join(CLASSIFIERS)}, got {cfg.model!r}")
    ms = list(cfg.steplr_milestones)
    if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in ms):
        raise UserError(f"steplr_milestones must be a list of epochs >= 1, got {ms!r}")
    de.check_step_settings(cfg.steps_T, cfg.rounds_n, cfg.last_steps_m, cfg.purify_respace, cfg.purify_dense_tail)
    if cfg.attack_label_trans == "all2all" and not ATTACKS[cfg.attack].supports_all2all:
        raise UserError(f"{cfg.attack} supports only attack_label_trans all2one")
    data = cfg.data_spec()
    if cfg.attack_target >= data.num_classes:
        raise UserError(
            f"attack_target must be a class of {data.title}, 0..{data.num_classes - 1}, got {cfg.attack_target}"
        )
    # the trigger checks its own keys when built (cheap: its models are made later, in prepare)
    get_trigger(cfg.attack)(
        cfg.trigger_params(),
        seed=cfg.random_seed,
        target=cfg.attack_target,
        label_trans=cfg.attack_label_trans,
        pratio=cfg.pratio,
        num_classes=data.num_classes,
        image_size=data.image_size,
        mean=data.mean,
        std=data.std,
    )
