"""The base class every backdoor trigger derives from, and the helpers they share.

Every trigger works on batched ``uint8 [N, 3, S, S]`` tensors (S = ``image_size``, 32 on
CIFAR-10) and returns the same dtype and shape; its geometry follows S as BackdoorBench's
per-dataset settings do, and its auxiliary classifiers and normalised tensors use the
dataset's ``mean``/``std`` (CIFAR-10's by default). ``prepare`` trains or loads whatever
auxiliary model the trigger needs (a no-op for static triggers); ``apply`` is deterministic:
the same input and settings give the same bytes. ``poison_train`` builds the poisoned
training images; attacks whose training recipe mixes in "cross" (noise-mode) samples
override it.

Auxiliary models are cached under ``resource_dir/<attack>/<key>/`` where ``key`` hashes
every setting that changes the model (including a fingerprint of the training images and,
where it is not CIFAR-10's, the normalisation), so a cache written with other settings is
never silently reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from utils.data import CIFAR10_MEAN, CIFAR10_STD, NUM_CLASSES, ImageSet, class_balanced_subset
from utils.fileio import UserError, atomic_write_json
from utils.options import BadValue, Key, parse_text
from utils.progress import progress

Log = Callable[[str], None]


class Trigger:
    """Base class. Subclasses set the class attributes and implement ``apply``."""

    name: ClassVar[str] = ""
    clean_label: ClassVar[bool] = False
    supports_all2all: ClassVar[bool] = True
    # the attack's own configuration keys (type, range, choices, help), checked when built
    keys: ClassVar[dict[str, Key]] = {}
    # views of ``keys``: name -> default value, name -> help
    defaults: ClassVar[dict[str, Any]] = {}
    help: ClassVar[dict[str, str]] = {}
    # images per chunk handed to the device by ``apply_batched``
    chunk: ClassVar[int] = 1024

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.defaults = {k: key.default for k, key in cls.keys.items()}
        cls.help = {k: key.help for k, key in cls.keys.items()}

    def __init__(
        self,
        params: dict[str, Any],
        seed: int = 2022,
        target: int = 0,
        label_trans: str = "all2one",
        pratio: float = 0.1,
        num_classes: int = NUM_CLASSES,
        image_size: int = 32,
        mean: tuple[float, float, float] = CIFAR10_MEAN,
        std: tuple[float, float, float] = CIFAR10_STD,
    ):
        self.params = coerce_params(self.name, self.keys, params)
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        # the dataset's normalisation (``DatasetSpec.mean/std``): the auxiliary classifiers'
        # inputs, and the normalised tensors WaNet and Input-aware compute on
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.seed = int(seed)
        self.pratio = float(pratio)
        self.target = int(target)
        self.label_trans = label_trans
        self.device = torch.device("cpu")
        # the auxiliary models' precision, resolved by the caller (utils/precision.py, "trigger")
        self.precision = "fp32"
        self.aux_info: dict[str, Any] = {}
        self.validate()

    # ------------------------------------------------------------------ hooks
    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    def validate(self) -> None:
        """Raise ``UserError`` for a bad parameter value."""

    def prepare(self, train: ImageSet, device: torch.device, resource_dir: Path, log: Log = print) -> None:
        """Train or load auxiliary models; static triggers only remember the device."""
        self.device = device

    def apply(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        """Triggered copies of ``images`` (uint8 [B,3,S,S] on any device).

        ``train=True`` asks for the training-time poison where it differs from the
        test-time trigger (label-consistent adds its adversarial perturbation then)."""
        raise NotImplementedError

    def poison_train(
        self, train: ImageSet, poison_idx: torch.Tensor, new_labels: torch.Tensor, log: Log = print
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Poisoned training images and labels, plus JSON-able extras for ``info``."""
        images = train.images.clone()
        labels = train.labels.clone()
        if len(poison_idx):
            images[poison_idx] = self.apply_batched(train.images[poison_idx], train=True)
            labels[poison_idx] = new_labels
        return images, labels, {}

    def poison_test(self, images: torch.Tensor, labels: torch.Tensor, log: Log = print) -> torch.Tensor:
        """Triggered copies of test images (``labels``: their true labels) for ASR and RA;
        label-consistent overrides it to add its adversarial perturbation first."""
        return self.apply_batched(images, train=False)

    # ------------------------------------------------------------------ helpers
    def apply_batched(self, images: torch.Tensor, train: bool = False, desc: str | None = None) -> torch.Tensor:
        """``apply`` over chunks on ``self.device``; returns CPU uint8 in input order."""
        out = torch.empty_like(images, device="cpu")
        starts = range(0, len(images), self.chunk)
        if desc and len(images) > self.chunk:
            starts = progress(starts, desc=desc, leave=False, dynamic_ncols=True)
        for i in starts:
            out[i : i + self.chunk] = self.apply(images[i : i + self.chunk].to(self.device), train=train).cpu()
        return out

    def info(self) -> dict[str, Any]:
        return {"params": dict(self.params), **({"aux": self.aux_info} if self.aux_info else {})}

    def normalisation_settings(self) -> dict[str, Any]:
        """What an auxiliary model's cache key adds for the normalisation: see ``normalisation_settings``."""
        return normalisation_settings(self.mean, self.std)


# ---------------------------------------------------------------------- parameters


def coerce_params(attack: str, keys: dict[str, Key | Any], params: dict[str, Any]) -> dict[str, Any]:
    """The attack's own keys from ``params`` (defaults for missing ones), checked against
    their declarations (``keys``: Keys, or plain defaults whose type is the key's);
    other keys are ignored because the config also holds training keys."""
    out: dict[str, Any] = {}
    for name, key in keys.items():
        key = key if isinstance(key, Key) else Key(key)
        value = params.get(name, key.default)
        try:
            out[name] = parse_text(key, key.default if value is None else value)
        except BadValue as e:
            raise UserError(e.message(f"{attack}: {name}")) from None
    return out


def require(cond: bool, message: str) -> None:
    if not cond:
        raise UserError(message)


# ---------------------------------------------------------------------- aux-model cache


def normalisation_settings(mean: Sequence[float], std: Sequence[float]) -> dict[str, Any]:
    """The entries an auxiliary model's settings (its cache key) get for the input
    normalisation it was trained with: none for CIFAR-10's (the keys written before other
    datasets were normalised with their own statistics stay valid), ``mean`` and ``std``
    otherwise (so a model trained with CIFAR-10's statistics on another dataset, by an
    earlier version, or on the same images under other statistics, is not reused)."""
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if mean == tuple(CIFAR10_MEAN) and std == tuple(CIFAR10_STD):
        return {}
    return {"normalisation": {"mean": list(mean), "std": list(std)}}


def settings_key(settings: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cache_dir(resource_dir: Path, attack: str, settings: dict[str, Any], prefix: str = "") -> Path:
    """``resource_dir/<attack>/<prefix><hash of settings>/`` with the settings written
    beside the model, so a user can see what a cache was made with."""
    path = Path(resource_dir) / attack / f"{prefix}{settings_key(settings)}"
    path.mkdir(parents=True, exist_ok=True)
    if not (path / "settings.json").is_file():
        atomic_write_json(path / "settings.json", settings)
    return path


def aux_subset(train: ImageSet, n: int, seed: int) -> ImageSet:
    """The images an auxiliary model trains on: all (``n <= 0``) or a class-balanced subset."""
    if n <= 0 or n >= len(train):
        return train
    return train.subset(class_balanced_subset(train.labels, n, seed))


def attack_targets(labels: torch.Tensor, target: int, label_trans: str, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """The label an attacker assigns to a triggered sample of true class ``labels``."""
    if label_trans == "all2all":
        return (labels + 1) % num_classes
    return torch.full_like(labels, target)
