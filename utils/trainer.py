"""One classifier training loop for every script (victims, surrogates, backdoored models).

Data stays as uint8 tensors; each batch is augmented on the fly with batched tensor ops
(``utils.augment``), converted to float in [0, 1] and fed to the model under bf16
autocast with channels_last (a model that expects normalised input is wrapped in
``Normalized``). The loop checkpoints after every epoch and
resumes from its checkpoint, so a crash never costs more than one epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.augment import Augment, to_float
from utils.data import ImageSet
from utils.fileio import atomic_torch_save, safe_torch_load
from utils.progress import progress
from utils.run_state import same_settings_or_refuse, tensor_fingerprint
from utils.runtime import autocast, to_channels_last

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.247, 0.243, 0.261)  # BackdoorBench's values


@dataclass
class TrainConfig:
    epochs: int = 80
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    schedule: str = "constant"  # constant | cosine (per epoch, T_max=epochs) | onecycle (per step) | multistep
    milestones: tuple[int, ...] = ()  # multistep: lr *= gamma at each of these epochs (MultiStepLR)
    gamma: float = 0.1
    test_every: int = 5  # evaluate every N epochs and after the last one
    grad_clip: float | None = None
    bf16: bool = True
    channels_last: bool = True
    seed: int = 0
    drop_last: bool = True  # False: the last partial batch is a step too (a DataLoader's default)


class Normalized(nn.Module):
    """``model((x - mean) / std)``; keeps the wrapped model's state_dict keys under ``net.``."""

    def __init__(self, net: nn.Module, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return self.net((x - self.mean) / self.std)

    def features(self, x):
        return self.net.features((x - self.mean) / self.std)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
    )


def lr_at(cfg: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
    if cfg.schedule == "multistep":
        # MultiStepLR stepped once per epoch: epoch e (0-based) has passed every milestone <= e
        return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.schedule == "onecycle":
        total = cfg.epochs * steps_per_epoch
        pos = (epoch * steps_per_epoch + step) / max(total, 1)
        warm = 0.25
        if pos < warm:
            return cfg.lr * (0.04 + 0.96 * pos / warm)
        return cfg.lr * max(0.0, 1 - (pos - warm) / (1 - warm))
    raise ValueError(f"unknown schedule {cfg.schedule!r}; expected constant, cosine, onecycle or multistep")


def prepare_batch(x_uint8: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = to_float(x_uint8.to(device, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    device: torch.device,
    batch_size: int = 500,
    bf16: bool = True,
    channels_last: bool = True,
    features: bool = False,
) -> torch.Tensor:
    """Logits (or pooled features) for uint8 images, batched, in input order (on CPU)."""
    was_training = model.training
    model.eval()
    outs = []
    fn = model.features if features else model
    for i in range(0, len(images), batch_size):
        with autocast(device, bf16):
            outs.append(fn(prepare_batch(images[i : i + batch_size], device, channels_last)).float().cpu())
    model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


def accuracy(model: nn.Module, data: ImageSet, device: torch.device, bf16: bool = True, batch_size: int = 500) -> float:
    if len(data) == 0:
        return float("nan")
    logits = predict(model, data.images, device, batch_size, bf16)
    # 100 * correct / total in Python arithmetic, as the references print and log it
    return 100 * int((logits.argmax(1) == data.labels).sum()) / len(data)


def train_classifier(
    model: nn.Module,
    train: ImageSet,
    augment: Augment,
    cfg: TrainConfig,
    device: torch.device,
    tests: dict[str, ImageSet] | None = None,
    checkpoint: str | Path | None = None,
    log: Callable[[str], None] = print,
    desc: str = "train",
    optimizer: torch.optim.Optimizer | None = None,
) -> list[dict]:
    """Train ``model`` in place and return the per-epoch history.

    ``tests`` maps a name to a labelled set whose accuracy is measured every
    ``cfg.test_every`` epochs and after the last one. With ``checkpoint`` the model,
    optimiser, RNG and history are saved after each epoch and a re-run resumes there.
    """
    tests = tests or {}
    if cfg.channels_last:
        to_channels_last(model, device)
    else:
        model.to(device)
    opt = optimizer or make_optimizer(model, cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    aug_g = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    history: list[dict] = []
    start = 0
    ckpt_path = Path(checkpoint) if checkpoint else None
    # what a checkpoint must have been written with to be resumed: the data included
    keyed = {"config": asdict(cfg), "n_train": len(train)}
    if ckpt_path:
        keyed["data"] = tensor_fingerprint(train.images, train.labels)
    if ckpt_path and ckpt_path.is_file():
        state = safe_torch_load(ckpt_path, "training checkpoint")
        old = {k: state.get(k, "<missing>") for k in keyed} if isinstance(state, dict) else None
        if old and isinstance(old["config"], dict):
            # checkpoints written before drop_last existed dropped the last batch
            old["config"] = {"drop_last": True, **old["config"]}
            # older checkpoints carried two fields that never changed training
            for gone in ("normalize", "extra"):
                old["config"].pop(gone, None)
        same_settings_or_refuse(ckpt_path, old or {}, keyed, hint=f"delete {ckpt_path} to train from scratch")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        g.set_state(state["rng"])
        aug_g.set_state(state["aug_rng"].to(aug_g.device) if device.type == "cuda" else state["aug_rng"])
        history = state["history"]
        start = state["epoch"]
        log(f"{desc}: resuming from {ckpt_path} after epoch {start}")

    n = len(train)
    if cfg.drop_last:
        steps = max(1, n // cfg.batch_size) if n >= cfg.batch_size else 1
    else:
        steps = max(1, -(-n // cfg.batch_size))
    labels_all = train.labels
    for epoch in range(start, cfg.epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(n, generator=g)
        loss_sum = correct = seen = 0
        bar = progress(range(steps), desc=f"{desc} {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True)
        for step in bar:
            idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            lr = lr_at(cfg, epoch, step, steps)
            for group in opt.param_groups:
                group["lr"] = lr
            xb = augment(train.images[idx].to(device), aug_g)
            x = prepare_batch(xb, device, cfg.channels_last)
            y = labels_all[idx].to(device)
            with autocast(device, cfg.bf16):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
        bar.close()
        rec = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": 100.0 * correct / max(seen, 1),
            "seconds": time.time() - t0,
            "images_per_s": seen / max(time.time() - t0, 1e-9),
        }
        if (epoch + 1) % cfg.test_every == 0 or epoch + 1 == cfg.epochs:
            for name, data in tests.items():
                rec[name] = accuracy(model, data, device, cfg.bf16)
        history.append(rec)
        msg = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items())
        log(f"{desc}: {msg}")
        if ckpt_path:
            atomic_torch_save(
                {
                    **keyed,
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "rng": g.get_state(),
                    "aug_rng": aug_g.get_state().cpu(),
                    "history": history,
                },
                ckpt_path,
            )
    return history
