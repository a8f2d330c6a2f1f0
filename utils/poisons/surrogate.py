"""Surrogate training for the poisons: standard or adversarial training with a step LR
schedule, weight snapshots during the run, resumable per epoch and cached, through
``utils.trainer.train_classifier``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from utils.adversarial import pgd_linf
from utils.augment import Augment, standard_augment
from utils.data import ImageSet
from utils.fileio import UserError, atomic_torch_save, safe_torch_load, tensor_fingerprint
from utils.poisons.common import AUGMENTS, CraftContext, accuracy_and_loss, fingerprint_of
from utils.trainer import TrainConfig, train_classifier


@dataclass
class SurrogateConfig:
    """Standard or adversarial (``adv_steps > 0``) training with a step LR schedule."""

    epochs: int
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    batch_size: int = 128
    milestones: tuple[int, ...] = ()  # epochs at which lr *= gamma
    gamma: float = 0.1
    augment: bool | str = True  # True: crop + flip on the uint8 images; a name: that AUGMENTS entry in float
    adv_eps: float = 0.0  # /255
    adv_step: float = 0.0
    adv_steps: int = 0
    grad_clip: float | None = None
    snapshots: tuple[int, ...] = ()  # epochs after which the weights are kept
    snapshot_on_best_test: bool = False  # SEP: keep the weights whenever test accuracy improves
    warmup_first_epoch: bool = False  # SEP: lr ramps linearly from 0.001 over epoch 0's batches

    def lr_at(self, epoch: int, step: int = 0, steps: int = 1) -> float:
        """The lr of batch ``step`` (of ``steps``) in ``epoch`` (0-based)."""
        if self.warmup_first_epoch and epoch == 0:
            return 0.001 + (self.lr - 0.001) * (step + 1) / steps
        return self.lr * self.gamma ** sum(epoch >= m for m in self.milestones)


def improving_epochs(test_accs: Sequence[float]) -> list[int]:
    """Indices of the epochs whose test accuracy beats every earlier one (the first always
    does): the checkpoints SEP's reference training (``vanilla.py``) writes."""
    best, out = 0.0, []
    for epoch, acc in enumerate(test_accs):
        if acc > best:
            best = acc
            out.append(epoch)
    return out


def _unchanged(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return x


class _SurrogateRun:
    """The surrogate's own records (history, snapshots) and its per-epoch state file
    (``<state_dir>/<tag>.pt``, resumed only when its key matches), as the
    :class:`~utils.trainer.CheckpointStore` and epoch hook of ``train_classifier``."""

    def __init__(self, ctx: CraftContext, tag: str, model: nn.Module, cfg: SurrogateConfig, key: str):
        self.ctx, self.tag, self.model, self.cfg, self.key = ctx, tag, model, cfg, key
        self.path = ctx.state_dir / f"{tag}.pt"
        self.snapshots: list[dict] = []
        self.history: list[dict] = []

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        st = safe_torch_load(self.path, "surrogate training state")
        if st.get("key") != self.key:
            return None
        self.snapshots, self.history = st["snapshots"], st["history"]
        self.ctx.log.info(f"{self.tag}: resuming surrogate training after epoch {st['epoch']}")
        # train_classifier's own history is not kept: the run's records are the surrogate's
        return {
            "epoch": st["epoch"],
            "model": st["model"],
            "optimizer": st["optimizer"],
            "rng": st["g_data"],
            "aug_rng": st["g_aug"],
            "history": [],
        }

    def save(self, state: dict) -> None:
        atomic_torch_save(
            {
                "key": self.key,
                "model": state["model"],
                "optimizer": state["optimizer"],
                "g_data": state["rng"],
                "g_aug": state["aug_rng"],
                "snapshots": self.snapshots,
                "history": self.history,
                "epoch": state["epoch"],
            },
            self.path,
        )
        self.ctx.tick(lambda: {"phase": self.tag})

    def epoch_end(self, trained: dict) -> None:
        """Record the epoch, test it (SEP's rule), keep a snapshot when due, log it."""
        ctx, cfg, epoch = self.ctx, self.cfg, trained["epoch"] - 1
        rec = {"epoch": epoch + 1, "lr": trained["lr"], "loss": trained["train_loss"], "acc": trained["train_acc"]}
        keep = epoch + 1 in cfg.snapshots
        if cfg.snapshot_on_best_test:
            rec["test_acc"], _ = accuracy_and_loss(self.model, ctx.test.images, ctx.test.labels, ctx.device, ctx.bf16)
            accs = [h["test_acc"] for h in self.history] + [rec["test_acc"]]
            keep = improving_epochs(accs)[-1] == epoch
        rec["seconds"] = trained["seconds"]
        rec["snapshot"] = keep
        self.history.append(rec)
        if keep:
            self.snapshots.append({k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()})
        test_msg = f", test acc {rec['test_acc']:.2f}%" if "test_acc" in rec else ""
        ctx.log.info(
            f"{self.tag}: epoch {epoch + 1}/{cfg.epochs} lr {rec['lr']:.4g} loss {rec['loss']:.4f} "
            f"train acc {rec['acc']:.2f}%{test_msg}{' (kept)' if keep else ''} ({rec['seconds']:.0f}s)"
        )


def fit_surrogate(
    ctx: CraftContext, tag: str, model: nn.Module, data: ImageSet, cfg: SurrogateConfig
) -> tuple[list[dict], dict[str, Any]]:
    """Train ``model`` in place on clean ``data``; returns (snapshots, info).

    ``train_classifier`` with hooks: the step schedule, float augmentations and
    label-aware adversarial examples (EntF's reference model) on each batch, weight
    snapshots during the run (SEP). Resumable per epoch from the crafting state; the
    result is cached in ``resource/poisons/`` keyed by its settings, the data and the
    seed, so other poisons and re-runs reuse it."""
    if cfg.snapshot_on_best_test and ctx.test is None:
        raise UserError(f"{tag}: keeping checkpoints by test accuracy needs the test set (CraftContext.test)")
    key = fingerprint_of(
        {
            "tag": tag,
            "arch": ctx.arch,
            "width": ctx.width,
            "cfg": cfg.__dict__,
            "seed": ctx.seed,
            "data": tensor_fingerprint(data.images, data.labels),
            "test": tensor_fingerprint(ctx.test.images, ctx.test.labels) if cfg.snapshot_on_best_test else None,
            "bf16": ctx.bf16,
        }
    )
    cache = ctx.resource_dir / "poisons" / f"{tag}-{ctx.arch}-w{ctx.width}-{key}.pt"
    if cache.is_file():
        blob = safe_torch_load(cache, "cached surrogate")
        model.load_state_dict(blob["model"])
        ctx.log.info(f"{tag}: reusing the cached surrogate {cache}")
        return blob["snapshots"], blob["info"]

    device, bf16 = ctx.device, ctx.bf16
    float_augment = AUGMENTS[cfg.augment]() if isinstance(cfg.augment, str) else None

    def perturb(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if float_augment is not None:
            x = float_augment(x, g)
        if cfg.adv_steps:
            x = pgd_linf(model, x, y, cfg.adv_eps, cfg.adv_step, cfg.adv_steps, g, bf16)
        return x

    run = _SurrogateRun(ctx, tag, model, cfg, key)
    uint8_augment: Augment = standard_augment if cfg.augment is True else _unchanged
    train_cfg = TrainConfig(
        epochs=cfg.epochs,
        batch_size=min(cfg.batch_size, len(data)),
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov,
        grad_clip=cfg.grad_clip,
        precision="bf16" if bf16 else "fp32",
    )
    train_classifier(
        model,
        data,
        uint8_augment,
        train_cfg,
        device,
        checkpoint=run,
        log=lambda _msg: None,  # the run logs its own lines
        desc=f"{tag} epoch",
        generators=(ctx.generator(101), ctx.generator(102, device)),
        lr_schedule=cfg.lr_at,
        perturb=perturb,
        on_epoch_end=run.epoch_end,
        progress_bar=ctx.progress,
    )
    history = run.history
    info = {"epochs": cfg.epochs, "final_train_acc": history[-1]["acc"] if history else None, "history": history}
    atomic_torch_save({"model": model.state_dict(), "snapshots": run.snapshots, "info": info}, cache)
    return run.snapshots, info
