"""Shared pieces of the attacks that train an auxiliary model (LC, LF, SSBA, Input-aware).

* ``AUX_KEYS``: the keys that size the auxiliary training (their CPU-scale values are in
  the overlay ``config/dataelixir_cpu.yaml``, the one place the DataElixir CPU recipe is
  declared).
* ``Resumable``: a checkpoint file holding the settings it was written with; a file
  written with other settings is refused (naming the keys), never silently reused.
* ``train_aux_classifier``: a cached, resumable classifier on (a subset of) the
  attacker's training set, through ``utils.trainer.train_classifier``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from models import CLASSIFIERS, build_classifier
from utils.augment import standard_augment
from utils.data import CIFAR10_MEAN, CIFAR10_STD, NUM_CLASSES, ImageSet
from utils.dataelixir.triggers.base import Log, aux_subset, cache_dir, normalisation_settings
from utils.fileio import atomic_torch_save, safe_torch_load, tensor_fingerprint
from utils.options import Key, Range
from utils.run_state import same_settings_or_refuse
from utils.trainer import Normalized, TrainConfig, train_classifier

# the keys that size an auxiliary training; each attack declares them with its own defaults
# (``Key.with_default``)
AUX_KEYS: dict[str, Key] = {
    "aux_arch": Key(
        "preactresnet18",
        "architecture of the auxiliary classifier (resnet18, preactresnet18, vgg16, ...)",
        choices=tuple(CLASSIFIERS),
    ),
    "aux_width": Key(64, "base width of the auxiliary networks (64 = paper size; 16 = CPU scale)", range=Range(1, 512)),
    "aux_epochs": Key(100, "training epochs of the auxiliary model", range=Range(1)),
    "aux_subset": Key(
        0, "training images the auxiliary model sees (class-balanced; 0 = the whole training set)", range=Range(0)
    ),
    "aux_batch_size": Key(128, "batch size of the auxiliary training", range=Range(2)),
    "aux_lr": Key(0.01, "learning rate of the auxiliary training", range=Range(0, low_open=True)),
}


def aux_keys(helps: dict[str, str] | None = None, **defaults: Any) -> dict[str, Key]:
    """``AUX_KEYS`` with one attack's defaults (in the order given) and, where the attack
    says more about a key, its own help."""
    helps = helps or {}
    return {k: AUX_KEYS[k].with_default(v, helps.get(k)) for k, v in defaults.items()}


class Resumable:
    """A checkpoint at ``path`` that only counts when its settings equal ours."""

    def __init__(self, path: Path, settings: dict[str, Any], log: Log = print, what: str = "checkpoint"):
        self.path = Path(path)
        self.settings = settings
        self.log = log
        self.what = what

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        state = safe_torch_load(self.path, self.what)
        old = state.get("settings") if isinstance(state, dict) else None
        same_settings_or_refuse(self.path, old or {}, self.settings, hint=f"delete {self.path} to rebuild it")
        return state

    def save(self, state: dict[str, Any]) -> None:
        atomic_torch_save({**state, "settings": self.settings}, self.path)


def train_aux_classifier(
    attack: str,
    p: dict[str, Any],
    train: ImageSet,
    device: torch.device,
    resource_dir: Path,
    seed: int,
    log: Log = print,
    lr_schedule: str = "cosine",
    precision: str = "fp32",
    num_classes: int = NUM_CLASSES,
    mean: tuple[float, float, float] = CIFAR10_MEAN,
    std: tuple[float, float, float] = CIFAR10_STD,
) -> tuple[nn.Module, dict[str, Any], Path]:
    """A clean classifier (BackdoorBench recipe: SGD 0.9, wd 5e-4, cosine) whose inputs are
    normalised with the dataset's ``mean``/``std``, cached in
    ``resource_dir/<attack>/clf-<key>/model.pt`` (returned with its info and folder); its
    per-epoch checkpoint makes an interrupted run resume."""
    settings = {
        "kind": "clean classifier",
        "arch": p["aux_arch"],
        "width": p["aux_width"],
        "epochs": p["aux_epochs"],
        "subset": p["aux_subset"],
        "batch_size": p["aux_batch_size"],
        "lr": p["aux_lr"],
        "schedule": lr_schedule,
        "seed": seed,
        "precision": precision,
        "data": tensor_fingerprint(train.images, train.labels),
        # nothing for CIFAR-10's statistics: the keys written before stay valid
        **normalisation_settings(mean, std),
    }
    folder = cache_dir(resource_dir, attack, settings, "clf-")
    model = Normalized(build_classifier(p["aux_arch"], num_classes, p["aux_width"]), mean, std)
    final = Resumable(folder / "model.pt", settings, log, f"{attack} auxiliary classifier")
    state = final.load()
    if state is not None:
        model.load_state_dict(state["model"])
        log(f"{attack}: loaded the auxiliary classifier from {final.path}")
        return model.to(device).eval(), state["info"], folder
    data = aux_subset(train, p["aux_subset"], seed)
    cfg = TrainConfig(
        epochs=p["aux_epochs"],
        batch_size=min(p["aux_batch_size"], len(data)),
        lr=p["aux_lr"],
        momentum=0.9,
        weight_decay=5e-4,
        schedule=lr_schedule,
        test_every=max(1, p["aux_epochs"]),
        seed=seed,
        precision=precision,
    )
    history = train_classifier(
        model,
        data,
        standard_augment,
        cfg,
        device,
        checkpoint=folder / "train_ckpt.pt",
        log=log,
        desc=f"{attack} aux classifier",
    )
    info = {
        "path": str(final.path),
        "train_images": len(data),
        # summed over the epochs, so a resumed run reports its whole training time
        "train_seconds": round(sum(h["seconds"] for h in history), 1),
        "final_train_acc": history[-1]["train_acc"] if history else None,
    }
    model.cpu()
    final.save({"model": model.state_dict(), "info": info})
    (folder / "train_ckpt.pt").unlink(missing_ok=True)
    return model.to(device).eval(), info, folder


def shuffled_batches(n: int, batch_size: int, g: torch.Generator) -> list[torch.Tensor]:
    """A fresh permutation cut into full batches (the last partial one is dropped)."""
    perm = torch.randperm(n, generator=g)
    steps = max(1, n // batch_size)
    return [perm[i * batch_size : (i + 1) * batch_size] for i in range(steps)]
