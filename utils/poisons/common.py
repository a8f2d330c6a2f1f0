"""Pieces every poison shares: the crafting context (options, resumable state, progress
budget), budgets and their exact enforcement on uint8 outputs, norm measurement,
differentiable augmentations, L∞ PGD, surrogate training and batched PGD crafting.

Units: images are uint8 ``[N, 3, 32, 32]``; perturbations being optimised are float
tensors in **/255 units** (``8.0`` means 8/255 on the [0, 1] scale), so that an L∞ budget
``eps`` is the same number the papers quote and quantisation to uint8 is a rounding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import build_classifier
from utils.augment import standard_augment, to_float
from utils.data import ImageSet
from utils.fileio import UserError, atomic_torch_save, safe_torch_load
from utils.progress import progress
from utils.run_state import same_settings_or_refuse, tensor_fingerprint
from utils.runtime import autocast, to_channels_last

IMAGE_DIM = 3 * 32 * 32
NUM_CLASSES = 10

FloatAugment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class CraftingPaused(Exception):
    """Raised after ``--stop_after`` units of work; the state is saved and a re-run resumes."""


# --------------------------------------------------------------------------- registry types


@dataclass(frozen=True)
class PoisonSpec:
    """One poison: its budget's norm, its defaults (the paper's) and where its code lives."""

    name: str
    summary: str
    norm: str  # linf | l2 | l0 | none
    kind: str  # sample-wise | class-wise
    model_based: bool
    module: str
    defaults: dict[str, Any]
    paper: str = ""
    needs_test: bool = False  # crafting evaluates on the CIFAR-10 test set (SEP's checkpoint rule)

    @property
    def cpu_flags(self) -> str:
        """Recommended CPU-scale flags at --subset 5000, from config/eclipse_cpu.yaml."""
        from utils.cpu_recipe import poison_flags

        return poison_flags(self.name)


@dataclass
class CraftResult:
    """What a poison's ``craft`` returns: the poisoned images and what to record about them."""

    images: torch.Tensor  # uint8 [N, 3, 32, 32]
    info: dict[str, Any] = field(default_factory=dict)
    surrogate: nn.Module | None = None  # for tests and the JSON's surrogate accuracy
    extra_models: list[nn.Module] = field(default_factory=list)


# --------------------------------------------------------------------------- context


class CraftContext:
    """Everything a poison needs while crafting, plus its resumable state.

    State lives in ``work_state_dir`` (``poisoned_data/cifar10/<NAME>.work/``) as one
    ``state.pt`` written atomically; every save records a fingerprint of the settings so
    that a re-run with other settings never resumes a foreign state.
    """

    def __init__(
        self,
        clean: ImageSet,
        params: dict[str, Any],
        seed: int,
        device: torch.device,
        bf16: bool,
        arch: str,
        width: int,
        state_dir: Path,
        resource_dir: Path,
        log: logging.Logger | None = None,
        save_every: float = 300.0,
        stop_after: int | None = None,
        fingerprint: str = "",
        progress: bool = True,
        work: Path | None = None,
        settings: dict[str, Any] | None = None,
        test: ImageSet | None = None,
    ):
        self.clean = clean
        self.test = test
        self.params = dict(params)
        self.seed = seed
        self.device = device
        self.bf16 = bf16
        self.arch = arch
        self.width = width
        self.state_dir = Path(state_dir)
        self.resource_dir = Path(resource_dir)
        self.log = log or logging.getLogger("poison")
        self.save_every = save_every
        self.stop_after = stop_after
        self.fingerprint = fingerprint
        self.settings = settings
        self.progress = progress
        self.work = Path(work) if work is not None else None
        self.units = 0
        self._t_start = time.time()
        self._last_save = time.time()
        self.prior_seconds = 0.0

    # -- options
    def p(self, key: str) -> Any:
        return self.params[key]

    @property
    def n(self) -> int:
        return len(self.clean)

    def generator(self, stream: int, device: torch.device | None = None) -> torch.Generator:
        """A generator for one named random stream, derived from the seed."""
        return torch.Generator(device=device or torch.device("cpu")).manual_seed(self.seed * 1_000_003 + stream)

    def elapsed(self) -> float:
        """Crafting seconds over every session of this run."""
        return self.prior_seconds + time.time() - self._t_start

    # -- state
    @property
    def state_path(self) -> Path:
        return self.state_dir / "state.pt"

    def load_state(self) -> dict | None:
        if not self.state_path.is_file():
            return None
        state = safe_torch_load(self.state_path, "crafting state")
        if not isinstance(state, dict):
            raise UserError(f"{self.state_path} is not a crafting state; pass --overwrite to discard it")
        same_settings_or_refuse(
            self.state_dir,
            *state_settings_pair(state, self.settings, self.fingerprint),
            hint="re-run with those settings to finish it, or pass --overwrite to discard it",
        )
        self.prior_seconds = float(state.get("elapsed", 0.0))
        self._t_start = time.time()
        return state

    def save_state(self, state: dict) -> None:
        state = dict(state, fingerprint=self.fingerprint, settings=self.settings, elapsed=self.elapsed())
        atomic_torch_save(state, self.state_path)
        self._last_save = time.time()

    def tick(self, state_fn: Callable[[], dict], force_save: bool = False) -> None:
        """Count one unit of work; save the state when due; pause after ``stop_after`` units."""
        self.units += 1
        paused = self.stop_after is not None and self.units >= self.stop_after
        if force_save or paused or time.time() - self._last_save >= self.save_every:
            self.save_state(state_fn())
        if paused:
            raise CraftingPaused(f"paused after {self.units} units of work (--stop_after)")

    def cleanup(self) -> None:
        shutil.rmtree(self.state_dir, ignore_errors=True)

    # -- models
    def build_surrogate(self, arch: str | None = None, width: int | None = None, seed_stream: int = 0) -> nn.Module:
        """A fresh classifier (seeded), on the device, channels_last where that is safe."""
        torch.manual_seed(self.seed * 7919 + seed_stream)
        model = build_classifier(arch or self.arch, 10, width or self.width)
        return to_channels_last(model, self.device)

    def bar(self, total: int | None, desc: str, initial: int = 0) -> Any:
        return progress(
            total=total, desc=desc, initial=initial, dynamic_ncols=True, leave=False, disable=not self.progress
        )


def state_settings_pair(state: dict, settings: dict | None, fingerprint: str) -> tuple[dict, dict]:
    """(stored, current) settings to compare for a crafting state: the full settings when
    both sides have them (so a refusal names the keys), else the fingerprints (states
    written before the settings were stored)."""
    if settings is not None and isinstance(state.get("settings"), dict):
        return state["settings"], settings
    return {"fingerprint": state.get("fingerprint")}, {"fingerprint": fingerprint}


def fingerprint_of(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- budgets


def linf_levels(eps: float) -> int:
    """The largest integer pixel change an L∞ budget of ``eps``/255 allows."""
    return int(math.floor(eps + 1e-9))


def l2_radius_255(eps: float) -> float:
    """The L2 radius (in /255 units) of an ``eps``-RMS budget: ``eps * sqrt(3072)``.

    L2 poisons take ``--eps`` as the per-pixel RMS in /255 units, the convention of the
    LSP code (``--eps 6`` = an L2 ball through the corners of the 6/255 L∞ ball)."""
    return eps * math.sqrt(IMAGE_DIM)


def apply_linf(clean: torch.Tensor, delta: torch.Tensor, eps: float) -> torch.Tensor:
    """uint8 ``clean + delta`` with ``|change| <= floor(eps)`` exactly (delta in /255 units).

    Rounding to the nearest level can only reach ``floor(eps)`` once clamped to it, and
    clipping to [0, 255] moves pixels back toward the clean value, so the budget holds on
    the bytes written."""
    k = linf_levels(eps)
    q = delta.float().round().clamp(-k, k).to(torch.int16)
    return (clean.to(torch.int16) + q.cpu()).clamp(0, 255).to(torch.uint8)


def apply_l2(
    clean: torch.Tensor, delta: torch.Tensor, radius_255: float, iters: int = 12, quantize: str = "round"
) -> torch.Tensor:
    """uint8 ``clean + delta`` whose per-image L2 change is at most ``radius_255`` (/255 units).

    ``quantize``: ``round`` to the nearest level, or ``truncate`` as numpy's
    ``astype(uint8)`` does on the (non-negative) float image, i.e. floor(clean + delta) —
    what the LSP reference writes. Either adds to the squared norm (1/12 per pixel for
    rounding, about 1/3 for truncation), so an image at the radius ends slightly outside;
    those images are shrunk a little and re-quantised, and any left after ``iters`` tries
    are rounded toward zero (which never grows a norm)."""
    clean16 = clean.to(torch.int16)
    delta = delta.detach().float().cpu().clone()
    norms = delta.flatten(1).norm(dim=1)
    over = norms > radius_255
    delta[over] *= (radius_255 / norms[over]).view(-1, 1, 1, 1)

    def quantise(d: torch.Tensor, idx: torch.Tensor, trunc: bool = False) -> torch.Tensor:
        q = d.trunc() if trunc else (d.floor() if quantize == "truncate" else d.round())
        return (clean16[idx] + q.to(torch.int16)).clamp(0, 255)

    all_idx = torch.arange(len(clean))
    out = quantise(delta, all_idx)
    for _ in range(iters):
        change = (out - clean16).float().flatten(1).norm(dim=1)
        bad = torch.nonzero(change > radius_255 + 1e-6).flatten()
        if len(bad) == 0:
            break
        delta[bad] *= (radius_255 / change[bad]).view(-1, 1, 1, 1) * 0.999
        out[bad] = quantise(delta[bad], bad)
    change = (out - clean16).float().flatten(1).norm(dim=1)
    bad = torch.nonzero(change > radius_255 + 1e-6).flatten()
    if len(bad):
        out[bad] = quantise(delta[bad], bad, trunc=True)
    return out.to(torch.uint8)


def measure_norms(clean: torch.Tensor, poisoned: torch.Tensor) -> dict[str, float]:
    """Norms of the perturbation actually written: L∞ in /255, L2 on the [0, 1] scale, L0 in pixels."""
    d = poisoned.to(torch.int16) - clean.to(torch.int16)
    linf = d.abs().flatten(1).amax(dim=1).float()
    l2 = d.float().flatten(1).norm(dim=1) / 255.0
    l0 = (d != 0).any(dim=1).flatten(1).sum(dim=1).float()
    return {
        "linf_max_255": float(linf.max()) if len(d) else 0.0,
        "linf_mean_255": float(linf.mean()) if len(d) else 0.0,
        "l2_mean": float(l2.mean()) if len(d) else 0.0,
        "l2_max": float(l2.max()) if len(d) else 0.0,
        "l0_mean_pixels": float(l0.mean()) if len(d) else 0.0,
        "l0_max_pixels": float(l0.max()) if len(d) else 0.0,
        "changed_images_fraction": float((l0 > 0).float().mean()) if len(d) else 0.0,
    }


def check_budget(spec: PoisonSpec, params: dict, norms: dict[str, float]) -> dict[str, Any]:
    """The budget and whether the written bytes respect it (they must; a violation is a bug)."""
    if spec.norm == "linf":
        limit = linf_levels(params["eps"])
        return {"norm": "linf", "eps_255": params["eps"], "limit_255": limit, "holds": norms["linf_max_255"] <= limit}
    if spec.norm == "l2":
        radius = l2_radius_255(params["eps"]) / 255.0
        return {"norm": "l2", "eps_rms_255": params["eps"], "radius": radius, "holds": norms["l2_max"] <= radius + 1e-6}
    if spec.norm == "l0":
        limit = params["pixels"]
        return {"norm": "l0", "pixels": limit, "holds": norms["l0_max_pixels"] <= limit}
    return {"norm": "none", "holds": True}


# --------------------------------------------------------------------------- augmentations (float, differentiable)


def crop_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """RandomCrop(32, pad 4) + horizontal flip on float images; gathers keep it differentiable."""
    return standard_augment(x, g)


# CIFAR-10 training-set mean (adversarial_poisons' village/consts.py): the colour the
# reference's shift pads with, since it shifts normalised images with zero padding
CIFAR10_MEAN_RGB = (0.4914672374725342, 0.4822617471218109, 0.4467701315879822)


def shift_image(
    x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor, fill: Sequence[float] = CIFAR10_MEAN_RGB
) -> torch.Tensor:
    """Bilinear sub-pixel shift of float images ``[N, C, H, W]``: output pixel (row i, col j)
    samples the input at (i + shifts[:, 1], j + shifts[:, 0]) (pixels); where ``flips``, the
    sampling grid is mirrored left-right as in the reference (= shifting by -shifts[:, 0],
    then mirroring); samples outside the image read the ``fill`` colour."""
    n, _, h, w = x.shape
    mean = torch.tensor(fill, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    shifts = shifts.to(device=x.device, dtype=x.dtype)
    # grid_sample's align_corners=True grid: -1 and 1 are the centres of the edge pixels
    gx = (
        torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)[None, None, :]
        + (shifts[:, 0] * 2 / (w - 1))[:, None, None]
    )
    gy = (
        torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)[None, :, None]
        + (shifts[:, 1] * 2 / (h - 1))[:, None, None]
    )
    gx = torch.where(flips.to(x.device)[:, None, None], -gx, gx)
    grid = torch.stack([gx.expand(n, h, w), gy.expand(n, h, w)], dim=-1)
    return F.grid_sample(x - mean, grid, mode="bilinear", padding_mode="zeros", align_corners=True) + mean


def shift_flip(x: torch.Tensor, g: torch.Generator, max_shift: float = 4.0) -> torch.Tensor:
    """The differentiable augmentation of TAP's reference (``RandomTransform``, also EntF's):
    a uniform sub-pixel shift in [-4, 4] px per axis, bilinear, mean-colour padding, and a
    horizontal flip with probability 1/2, drawn per image."""
    u = torch.rand(x.shape[0], 3, generator=g, device=g.device).to(x.device)
    return shift_image(x, (u[:, :2] - 0.5) * 2 * max_shift, u[:, 2] > 0.5)


def soft_grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma (PIL's weights) in float, replicated to 3 channels."""
    lum = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    return lum[:, None].expand(-1, 3, -1, -1)


def compensation_float(p: float = 0.4, std: float = 0.05) -> FloatAugment:
    """ECLIPSE's corruption compensation C in float: crop + flip, grayscale with
    probability ``p``, N(0, std²) noise, clamp — differentiable for crafting through it
    (the uint8 re-quantisation of the training pipeline is left out: it has no gradient)."""

    def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x = crop_flip(x, g)
        pick = (torch.rand(x.shape[0], generator=g, device=g.device).to(x.device) < p)[:, None, None, None]
        x = torch.where(pick, soft_grayscale(x), x)
        if std > 0:
            x = (x + std * torch.randn(x.shape, generator=g, device=g.device).to(x.device)).clamp(0, 1)
        return x

    return augment


AUGMENTS: dict[str, Callable[..., FloatAugment | None]] = {
    "none": lambda **_: None,
    "crop_flip": lambda **_: crop_flip,
    "shift_flip": lambda **_: shift_flip,
    "compensation": lambda p=0.4, std=0.05, **_: compensation_float(p, std),
}


# --------------------------------------------------------------------------- model helpers


def forward(model: nn.Module, x: torch.Tensor, bf16: bool, features: bool = False) -> torch.Tensor:
    """Logits (or pooled features) in float32, the network run in bf16, in the layout
    :func:`to_channels_last` chose (``features`` bypasses its input hook)."""
    x = x.contiguous(memory_format=getattr(model, "input_layout", torch.channels_last))
    with autocast(x.device, bf16):
        out = model.features(x) if features else model(x)
    return out.float()


def freeze(model: nn.Module, frozen: bool = True) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(not frozen)
    return model


@torch.no_grad()
def eval_logits(
    model: nn.Module, images: torch.Tensor, device: torch.device, bf16: bool, batch: int = 500
) -> torch.Tensor:
    """Eval-mode logits of uint8 images (on CPU)."""
    was = model.training
    model.eval()
    out = [forward(model, to_float(images[i : i + batch].to(device)), bf16).cpu() for i in range(0, len(images), batch)]
    model.train(was)
    return torch.cat(out) if out else torch.empty(0, 10)


def accuracy_and_loss(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device, bf16: bool
) -> tuple[float, float]:
    logits = eval_logits(model, images, device, bf16)
    return 100.0 * (logits.argmax(1) == labels).float().mean().item(), F.cross_entropy(logits, labels).item()


def pgd_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    step: float,
    steps: int,
    g: torch.Generator,
    bf16: bool,
    random_start: bool = True,
) -> torch.Tensor:
    """Untargeted L∞ PGD (budget and step in /255 units) on float images; returns x_adv.

    Runs with the model in eval mode and its weights frozen, and restores both."""
    if steps <= 0 or eps <= 0:
        return x.detach()
    was = model.training
    model.eval()
    grads_on = [p.requires_grad for p in model.parameters()]
    freeze(model)
    e, a = eps / 255.0, step / 255.0
    x = x.detach()
    if random_start:
        start = (torch.rand(x.shape, generator=g, device=g.device).to(x.device) * 2 - 1) * e
        adv = (x + start).clamp(0, 1)
    else:
        adv = x.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(forward(model, adv, bf16), y)
        (grad,) = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            adv = torch.min(torch.max(adv + a * grad.sign(), x - e), x + e).clamp(0, 1)
    for p, on in zip(model.parameters(), grads_on):
        p.requires_grad_(on)
    model.train(was)
    return adv.detach()


def project_linf(delta: torch.Tensor, clean_255: torch.Tensor, eps: float) -> torch.Tensor:
    """Project a /255-unit perturbation onto the L∞ ball and onto valid pixels [0, 255]."""
    return torch.max(torch.min(delta.clamp(-eps, eps), 255.0 - clean_255), -clean_255)


# --------------------------------------------------------------------------- surrogate training


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


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    bf16: bool,
    grad_clip: float | None = None,
) -> tuple[float, int]:
    """One SGD step on float images; returns (loss, number correct)."""
    model.train()
    logits = forward(model, x, bf16)
    loss = F.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.item(), int((logits.argmax(1) == y).sum())


def fit_surrogate(
    ctx: CraftContext, tag: str, model: nn.Module, data: ImageSet, cfg: SurrogateConfig
) -> tuple[list[dict], dict[str, Any]]:
    """Train ``model`` in place on clean ``data``; returns (snapshots, info).

    Used instead of ``utils.trainer.train_classifier`` because surrogates need what that
    loop has no hook for: label-aware adversarial examples (EntF's reference model),
    weight snapshots during one run (SEP) and a step schedule. Resumable per epoch from
    the crafting state; the result is cached in ``resource/poisons/`` keyed by its
    settings, the data and the seed, so other poisons and re-runs reuse it."""
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
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
    )
    g_data = ctx.generator(101)
    g_aug = ctx.generator(102, device)
    snapshots: list[dict] = []
    history: list[dict] = []
    start = 0
    state_file = ctx.state_dir / f"{tag}.pt"
    if state_file.is_file():
        st = safe_torch_load(state_file, "surrogate training state")
        if st.get("key") == key:
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            g_data.set_state(st["g_data"])
            g_aug.set_state(st["g_aug"].to(g_aug.device) if device.type == "cuda" else st["g_aug"])
            snapshots, history, start = st["snapshots"], st["history"], st["epoch"]
            ctx.log.info(f"{tag}: resuming surrogate training after epoch {start}")

    n = len(data)
    bs = min(cfg.batch_size, n)
    steps = max(1, n // bs)
    for epoch in range(start, cfg.epochs):
        perm = torch.randperm(n, generator=g_data)
        t0 = time.time()
        loss_sum = correct = seen = 0
        bar = ctx.bar(steps, f"{tag} epoch {epoch + 1}/{cfg.epochs}")
        for s in range(steps):
            for group in opt.param_groups:
                group["lr"] = cfg.lr_at(epoch, s, steps)
            idx = perm[s * bs : (s + 1) * bs]
            xb = data.images[idx].to(device)
            if cfg.augment is True:
                xb = standard_augment(xb, g_aug)
            x = to_float(xb)
            if isinstance(cfg.augment, str) and (float_aug := AUGMENTS[cfg.augment]()) is not None:
                x = float_aug(x, g_aug)
            y = data.labels[idx].to(device)
            if cfg.adv_steps:
                x = pgd_attack(model, x, y, cfg.adv_eps, cfg.adv_step, cfg.adv_steps, g_aug, bf16)
            loss, corr = train_step(model, opt, x, y, bf16, cfg.grad_clip)
            loss_sum += loss * len(idx)
            correct += corr
            seen += len(idx)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
        bar.close()
        rec = {"epoch": epoch + 1, "lr": cfg.lr_at(epoch, steps - 1, steps), "loss": loss_sum / seen}
        rec["acc"] = 100 * correct / seen
        keep = epoch + 1 in cfg.snapshots
        if cfg.snapshot_on_best_test:
            rec["test_acc"], _ = accuracy_and_loss(model, ctx.test.images, ctx.test.labels, device, bf16)
            accs = [h["test_acc"] for h in history] + [rec["test_acc"]]
            keep = improving_epochs(accs)[-1] == epoch
        rec["seconds"] = time.time() - t0
        rec["snapshot"] = keep
        history.append(rec)
        if keep:
            snapshots.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        test_msg = f", test acc {rec['test_acc']:.2f}%" if "test_acc" in rec else ""
        ctx.log.info(
            f"{tag}: epoch {epoch + 1}/{cfg.epochs} lr {rec['lr']:.4g} loss {rec['loss']:.4f} "
            f"train acc {rec['acc']:.2f}%{test_msg}{' (kept)' if keep else ''} ({rec['seconds']:.0f}s)"
        )

        def state(epoch=epoch):
            return {
                "key": key,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "g_data": g_data.get_state(),
                "g_aug": g_aug.get_state().cpu(),
                "snapshots": snapshots,
                "history": history,
                "epoch": epoch + 1,
            }

        atomic_torch_save(state(), state_file)
        ctx.tick(lambda: {"phase": tag})
    info = {"epochs": cfg.epochs, "final_train_acc": history[-1]["acc"] if history else None, "history": history}
    atomic_torch_save({"model": model.state_dict(), "snapshots": snapshots, "info": info}, cache)
    return snapshots, info


# --------------------------------------------------------------------------- batched PGD crafting


PerSampleLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def craft_pgd(
    ctx: CraftContext,
    tag: str,
    models: Sequence[nn.Module],
    loss_fn: PerSampleLoss,
    eps: float,
    step: float,
    steps: int,
    batch_size: int,
    init: str = "zero",
    augment: FloatAugment | None = None,
    restarts: int = 1,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Minimise ``loss_fn`` over an L∞ perturbation of every image, batch by batch.

    Each step moves by ``step`` (/255) against the sign of the gradient averaged over
    ``models`` (one backward per model, so an ensemble costs no extra memory), then
    projects onto the ball and [0, 255]. ``loss_fn(model, x, y_or_target, idx)`` returns
    per-sample losses. With ``restarts`` > 1 the whole set is crafted once per restart and
    the restart whose total loss over the set (at its last step, as the TAP reference
    scores a trial) is lowest is kept for every image. Progress is saved per batch;
    returns the perturbation in /255 units."""
    n, device = ctx.n, ctx.device
    labels = ctx.clean.labels if targets is None else targets
    current = torch.zeros(n, 3, 32, 32, dtype=torch.float16)
    best: torch.Tensor | None = None
    best_total, total = float("inf"), 0.0
    g = ctx.generator(201, device)
    restart, done = 0, 0
    st = ctx.load_state()
    if st and st.get("phase") == tag:
        current, done, restart = st["delta"], st["done"], st.get("restart", 0)
        best, best_total, total = st.get("best"), st.get("best_total", float("inf")), st.get("total", 0.0)
        g.set_state(st["g"].to(g.device) if device.type == "cuda" else st["g"])
        ctx.log.info(f"{tag}: resuming at image {done}/{n} (restart {restart + 1}/{restarts})")
    for m in models:
        m.eval()
        freeze(m)
    batches = list(range(0, n, batch_size))

    def state() -> dict:
        return {
            "phase": tag,
            "delta": current,
            "done": done,
            "restart": restart,
            "best": best,
            "best_total": best_total,
            "total": total,
            "g": g.get_state().cpu(),
        }

    while restart < restarts:
        desc = tag if restarts == 1 else f"{tag} restart {restart + 1}/{restarts}"
        bar = ctx.bar(len(batches), desc, initial=done // batch_size)
        for b0 in batches:
            if b0 < done:
                continue
            idx = torch.arange(b0, min(b0 + batch_size, n))
            clean255 = ctx.clean.images[idx].to(device).float()
            y = labels[idx].to(device)
            if init == "randn":
                d = torch.randn(clean255.shape, generator=g, device=g.device).to(device) * eps
            elif init == "uniform":
                d = (torch.rand(clean255.shape, generator=g, device=g.device).to(device) * 2 - 1) * eps
            else:
                d = torch.zeros_like(clean255)
            d = project_linf(d, clean255, eps)
            last = torch.zeros(len(idx), device=device)
            for _ in range(steps):
                d.requires_grad_(True)
                grad = torch.zeros_like(clean255)
                last = torch.zeros(len(idx), device=device)
                for m in models:
                    x = (clean255 + d) / 255.0
                    if augment is not None:
                        x = augment(x, g)
                    per_sample = loss_fn(m, x, y, idx)
                    grad += torch.autograd.grad(per_sample.sum(), d)[0]
                    last += per_sample.detach() / len(models)
                with torch.no_grad():
                    d = project_linf(d - step * grad.sign(), clean255, eps)
            current[idx] = d.detach().cpu().half()
            total += float(last.sum())
            done = int(idx[-1]) + 1
            bar.update(1)
            bar.set_postfix(loss=f"{total / done:.3f}")
            ctx.tick(state)
        bar.close()
        if restarts > 1:
            ctx.log.info(f"{tag}: restart {restart + 1}/{restarts} mean loss {total / n:.4f}")
        if total < best_total or best is None:
            best, best_total = current.clone() if restarts > 1 else current, total
        restart, done, total = restart + 1, 0, 0.0
    ctx.save_state(state() | {"phase": f"{tag}:done"})
    return (current if best is None else best).float()


def targeted_ce(shift: int, bf16: bool) -> PerSampleLoss:
    """Cross-entropy toward the label map ``(y + shift) mod 10`` (TAP: 1, SEP: 5)."""

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(forward(model, x, bf16), (y + shift) % NUM_CLASSES, reduction="none")

    return loss


def surrogate_report(
    ctx: CraftContext, model: nn.Module, poisoned: torch.Tensor, train_info: dict | None = None
) -> dict[str, Any]:
    """The surrogate's final accuracy/loss on the clean crafting set and on the poisoned output."""
    labels = ctx.clean.labels
    acc_c, loss_c = accuracy_and_loss(model, ctx.clean.images, labels, ctx.device, ctx.bf16)
    acc_p, loss_p = accuracy_and_loss(model, poisoned, labels, ctx.device, ctx.bf16)
    out = {
        "arch": ctx.arch,
        "width": ctx.width,
        "train_acc_clean": acc_c,
        "train_loss_clean": loss_c,
        "train_acc_poisoned": acc_p,
        "train_loss_poisoned": loss_p,
    }
    if train_info:
        out["training"] = train_info
    return out


def parse_milestones(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in str(text).split(",") if s.strip())


def target_hit_rates(
    ctx: CraftContext, models: Sequence[nn.Module], poisoned: torch.Tensor, shift: int
) -> dict[str, float]:
    """How often the (ensemble of) surrogate(s) predicts the target label, clean vs poisoned."""
    target = (ctx.clean.labels + shift) % NUM_CLASSES

    def rate(images: torch.Tensor) -> float:
        prob = sum(eval_logits(m, images, ctx.device, ctx.bf16).softmax(1) for m in models)
        return 100.0 * (prob.argmax(1) == target).float().mean().item()

    return {"target_pred_pct_clean": rate(ctx.clean.images), "target_pred_pct_poisoned": rate(poisoned)}
