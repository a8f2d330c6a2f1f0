"""One classifier training loop for every script (victims, surrogates, backdoored models).

Data stays as uint8 tensors; each batch is augmented on the fly with batched tensor ops
(``utils.augment``), converted to float in [0, 1] and fed to the model in the precision
the policy resolved (``utils.precision``; float32 unless bf16 is chosen) with channels_last (a model that expects normalised input is wrapped in
``Normalized``). The loop checkpoints after every epoch and
resumes from its checkpoint, so a crash never costs more than one epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.augment import Augment, Mix, to_float
from utils.compat import legacy_training_config
from utils.data import CIFAR10_MEAN, CIFAR10_STD, ImageSet
from utils.fileio import atomic_torch_save, safe_torch_load, tensor_fingerprint
from utils.progress import progress
from utils.run_state import same_settings_or_refuse
from utils.runtime import autocast, to_channels_last


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
    precision: str = "fp32"  # resolved: fp32 | bf16 (utils/precision.py)
    channels_last: bool = True
    seed: int = 0
    drop_last: bool = True  # False: the last partial batch is a step too (a DataLoader's default)
    # BatchNorm running-statistics updates per step: ECLIPSE's train.py runs the network twice
    # per step (accuracy, then loss), which updates them twice; one update with momentum
    # 1 - 0.9^2 = 0.19 gives the same statistics without the second forward
    bn_updates: int = 1

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"


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


def set_bn_updates(model: nn.Module, updates: int) -> None:
    """BatchNorm momentum equivalent to ``updates`` updates per step with the same batch
    statistics: ``1 - (1 - 0.1)^updates`` (0.1, PyTorch's default, for one)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None:
            m.momentum = 1 - (1 - 0.1) ** updates


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
    bf16: bool = False,
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


def accuracy(
    model: nn.Module, data: ImageSet, device: torch.device, bf16: bool = False, batch_size: int = 500
) -> float:
    if len(data) == 0:
        return float("nan")
    logits = predict(model, data.images, device, batch_size, bf16)
    # 100 * correct / total in Python arithmetic, as the references print and log it
    return 100 * int((logits.argmax(1) == data.labels).sum()) / len(data)


LrSchedule = Callable[[int, int, int], float]
"""(epoch, step, steps per epoch) -> the learning rate of that step (epochs 0-based)."""
Perturb = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]
"""(float batch, labels, augmentation generator) -> the batch the model trains on."""
TrainStep = Callable[[torch.Tensor, Any], tuple[float, float]]
"""(float batch, labels) -> (loss, number correct) after one optimisation step; with a ``mix``
the labels are :class:`MixedLabels` and the number correct is λ-weighted."""


class MixedLabels(NamedTuple):
    """A mixed batch's two label sets and the weight ``lam`` of the first (``utils.augment.Mix``)."""

    a: torch.Tensor
    b: torch.Tensor
    lam: float


class CheckpointStore(Protocol):
    """Where a training run keeps its per-epoch state. ``load`` returns what ``save`` was
    given (``epoch``, ``model``, ``optimizer``, ``rng``, ``aug_rng``, ``history``) or None."""

    def load(self) -> dict | None: ...

    def save(self, state: dict) -> None: ...


class KeyedCheckpoint:
    """A checkpoint file that records the settings and data it was written with; a file
    written with others is refused (naming the keys) rather than resumed."""

    def __init__(self, path: Path, keyed: dict, desc: str, log: Callable[[str], None]):
        self.path, self.keyed, self.desc, self.log = path, keyed, desc, log

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        state = safe_torch_load(self.path, "training checkpoint")
        old = {k: state.get(k, "<missing>") for k in self.keyed} if isinstance(state, dict) else None
        if old and isinstance(old["config"], dict):
            old["config"] = legacy_training_config(old["config"])
        same_settings_or_refuse(self.path, old or {}, self.keyed, hint=f"delete {self.path} to train from scratch")
        self.log(f"{self.desc}: resuming from {self.path} after epoch {state['epoch']}")
        return state

    def save(self, state: dict) -> None:
        atomic_torch_save({**self.keyed, **state}, self.path)


def steps_per_epoch(n: int, cfg: TrainConfig) -> int:
    if cfg.drop_last:
        return max(1, n // cfg.batch_size) if n >= cfg.batch_size else 1
    return max(1, -(-n // cfg.batch_size))


def optimizer_step(loss: torch.Tensor, model: nn.Module, opt: torch.optim.Optimizer, grad_clip: float | None) -> None:
    """Backward and one step of ``opt`` (gradients clipped to norm ``grad_clip`` when set)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()


def cross_entropy_step(
    model: nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig, device: torch.device
) -> TrainStep:
    """The default step: cross-entropy of the model's logits (under ``cfg.precision``), SGD."""

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        with autocast(device, cfg.bf16):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
        optimizer_step(loss, model, opt, cfg.grad_clip)
        return loss.item(), (logits.argmax(1) == y).sum().item()

    return step


def mixed_cross_entropy_step(
    model: nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig, device: torch.device
) -> TrainStep:
    """The step of a mixed batch: λ·CE(a) + (1 − λ)·CE(b), the loss of Zhang et al.'s mixup and
    Yun et al.'s CutMix code; correct predictions counted λ·[a] + (1 − λ)·[b], as mixup's code does."""

    def step(x: torch.Tensor, y: MixedLabels) -> tuple[float, float]:
        with autocast(device, cfg.bf16):
            logits = model(x)
            out = logits.float()
            loss = y.lam * F.cross_entropy(out, y.a) + (1 - y.lam) * F.cross_entropy(out, y.b)
        optimizer_step(loss, model, opt, cfg.grad_clip)
        pred = logits.argmax(1)
        return loss.item(), y.lam * (pred == y.a).sum().item() + (1 - y.lam) * (pred == y.b).sum().item()

    return step


def train_classifier(
    model: nn.Module,
    train: ImageSet,
    augment: Augment,
    cfg: TrainConfig,
    device: torch.device,
    tests: dict[str, ImageSet] | None = None,
    checkpoint: str | Path | CheckpointStore | None = None,
    log: Callable[[str], None] = print,
    desc: str = "train",
    optimizer: torch.optim.Optimizer | None = None,
    *,
    generators: tuple[torch.Generator, torch.Generator] | None = None,
    lr_schedule: LrSchedule | None = None,
    perturb: Perturb | None = None,
    mix: Mix | None = None,
    step: TrainStep | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
    progress_bar: bool = True,
) -> list[dict]:
    """Train ``model`` in place and return the per-epoch history.

    ``tests`` maps a name to a labelled set whose accuracy is measured every
    ``cfg.test_every`` epochs and after the last one. With ``checkpoint`` (a path, or a
    :class:`CheckpointStore` keeping the state in its own format) the model, optimiser,
    RNG and history are saved after each epoch and a re-run resumes there.

    Hooks, for trainings that are more than this loop: ``generators`` (shuffle,
    augmentation; default seeded from ``cfg.seed``, the second on ``device``) — a batch is
    augmented and made float on its augmentation generator's device, then moved;
    ``lr_schedule`` replaces ``lr_at(cfg, ...)``; ``perturb`` rewrites each float batch
    before the forward (adversarial training); ``mix`` then mixes it with itself and the step
    trains on λ·CE(a) + (1 − λ)·CE(b) (Mixup, CutMix); ``step`` replaces the cross-entropy step;
    ``on_epoch_end`` sees each epoch's record (after testing, before it is logged and saved).
    """
    tests = tests or {}
    set_bn_updates(model, cfg.bn_updates)
    if cfg.channels_last:
        to_channels_last(model, device)
    else:
        model.to(device)
    opt = optimizer or make_optimizer(model, cfg)
    g, aug_g = generators or (
        torch.Generator().manual_seed(cfg.seed),
        torch.Generator(device=device).manual_seed(cfg.seed + 1),
    )
    schedule = lr_schedule or partial(lr_at, cfg)
    if mix is not None and step is not None:
        raise ValueError("train_classifier: a mix brings its own step; pass one of mix and step")
    step = step or (mixed_cross_entropy_step if mix else cross_entropy_step)(model, opt, cfg, device)
    store = _checkpoint_store(checkpoint, cfg, train, desc, log)
    history, start = _resume(store, model, opt, g, aug_g, device)

    def batch(idx: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The float batch the step trains on, and its labels (:class:`MixedLabels` with a ``mix``)."""
        xb = augment(train.images[idx].to(aug_g.device), aug_g)
        x = to_float(xb).to(device, non_blocking=True)
        y: Any = train.labels[idx].to(device)
        if perturb is not None:
            x = perturb(x, y, aug_g)
        if mix is not None:
            x, a, b, lam = mix(x, y, aug_g)
            y = MixedLabels(a, b, lam)
        return (x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x), y

    for epoch in range(start, cfg.epochs):
        model.train()
        steps = steps_per_epoch(len(train), cfg)
        bar = progress(
            range(steps),
            desc=f"{desc} {epoch + 1}/{cfg.epochs}",
            leave=False,
            dynamic_ncols=True,
            disable=not progress_bar,
        )
        perm = torch.randperm(len(train), generator=g)
        rec = _run_epoch(epoch, perm, cfg.batch_size, steps, bar, opt, schedule, batch, step)
        if (epoch + 1) % cfg.test_every == 0 or epoch + 1 == cfg.epochs:
            for name, data in tests.items():
                rec[name] = accuracy(model, data, device, cfg.bf16)
        if on_epoch_end is not None:
            on_epoch_end(rec)
        history.append(rec)
        msg = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items())
        log(f"{desc}: {msg}")
        if store:
            store.save(
                {
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "rng": g.get_state(),
                    "aug_rng": aug_g.get_state().cpu(),
                    "history": history,
                }
            )
    return history


def _resume(
    store: CheckpointStore | None,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    g: torch.Generator,
    aug_g: torch.Generator,
    device: torch.device,
) -> tuple[list[dict], int]:
    """The history and the first epoch to run: a stored state loaded into the model, the
    optimiser and both generators; ``[], 0`` without one."""
    state = store.load() if store else None
    if state is None:
        return [], 0
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    g.set_state(state["rng"])
    aug_g.set_state(state["aug_rng"].to(aug_g.device) if device.type == "cuda" else state["aug_rng"])
    return state["history"], state["epoch"]


def _run_epoch(
    epoch: int,
    perm: torch.Tensor,
    batch_size: int,
    steps: int,
    bar: Any,
    opt: torch.optim.Optimizer,
    schedule: LrSchedule,
    batch: Callable[[torch.Tensor], tuple[torch.Tensor, Any]],
    step: TrainStep,
) -> dict:
    """One pass over the ``steps`` batches of ``perm`` (``bar`` iterates their numbers); returns the epoch's record."""
    t0 = time.time()
    loss_sum = correct = seen = 0
    for i in bar:
        idx = perm[i * batch_size : (i + 1) * batch_size]
        lr = schedule(epoch, i, steps)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, n_correct = step(*batch(idx))
        loss_sum += loss * len(idx)
        correct += n_correct
        seen += len(idx)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
    bar.close()
    return {
        "epoch": epoch + 1,
        "lr": lr,
        "train_loss": loss_sum / max(seen, 1),
        "train_acc": 100.0 * correct / max(seen, 1),
        "seconds": time.time() - t0,
        "images_per_s": seen / max(time.time() - t0, 1e-9),
    }


def _checkpoint_store(
    checkpoint: str | Path | CheckpointStore | None,
    cfg: TrainConfig,
    train: ImageSet,
    desc: str,
    log: Callable[[str], None],
) -> CheckpointStore | None:
    if checkpoint is None or checkpoint == "":
        return None
    if not isinstance(checkpoint, (str, Path)):
        return checkpoint
    # what a checkpoint must have been written with to be resumed: the data included
    keyed = {"config": asdict(cfg), "n_train": len(train), "data": tensor_fingerprint(train.images, train.labels)}
    return KeyedCheckpoint(Path(checkpoint), keyed, desc, log)
