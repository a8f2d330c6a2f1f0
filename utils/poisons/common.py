"""Pieces every poison shares: the crafting context (options, resumable state, progress
budget), budgets and their exact enforcement on uint8 outputs, norm measurement,
differentiable augmentations and evaluation helpers. Surrogate training lives in
``utils.poisons.surrogate``, batched PGD crafting in ``utils.poisons.crafting`` and the L∞
PGD in ``utils.adversarial``; their names are importable from here too.

Units: images are uint8 ``[N, 3, S, S]`` (S = 32 on CIFAR-10); perturbations being optimised are float
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
from utils.adversarial import forward
from utils.augment import standard_augment, to_float
from utils.data import NUM_CLASSES, ImageSet
from utils.demo.recipe import poison_flags
from utils.fileio import UserError, atomic_torch_save, safe_torch_load
from utils.progress import progress
from utils.run_state import same_settings_or_refuse
from utils.runtime import to_channels_last

IMAGE_DIM = 3 * 32 * 32

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
        return poison_flags(self.name)


@dataclass
class CraftResult:
    """What a poison's ``craft`` returns: the poisoned images and what to record about them."""

    images: torch.Tensor  # uint8 [N, 3, S, S], as the clean set
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
        num_classes: int = NUM_CLASSES,
    ):
        self.clean = clean
        self.num_classes = num_classes  # the dataset's, for the surrogates' heads and class-wise patterns
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
        model = build_classifier(arch or self.arch, self.num_classes, width or self.width)
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


def l2_radius_255(eps: float, image_size: int = 32) -> float:
    """The L2 radius (in /255 units) of an ``eps``-RMS budget: ``eps * sqrt(3072)`` at 32x32.

    L2 poisons take ``--eps`` as the per-pixel RMS in /255 units, the convention of the
    LSP code (``--eps 6`` = an L2 ball through the corners of the 6/255 L∞ ball); at
    another image size the same RMS, so the radius grows with the side (x2 at 64x64)."""
    return eps * math.sqrt(IMAGE_DIM * (image_size / 32) ** 2)


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


def project_linf(delta: torch.Tensor, clean_255: torch.Tensor, eps: float) -> torch.Tensor:
    """Project a /255-unit perturbation onto the L∞ ball and onto valid pixels [0, 255]."""
    return torch.max(torch.min(delta.clamp(-eps, eps), 255.0 - clean_255), -clean_255)


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


def check_budget(spec: PoisonSpec, params: dict, norms: dict[str, float], image_size: int = 32) -> dict[str, Any]:
    """The budget and whether the written bytes respect it (they must; a violation is a bug)."""
    if spec.norm == "linf":
        limit = linf_levels(params["eps"])
        return {"norm": "linf", "eps_255": params["eps"], "limit_255": limit, "holds": norms["linf_max_255"] <= limit}
    if spec.norm == "l2":
        radius = l2_radius_255(params["eps"], image_size) / 255.0
        return {"norm": "l2", "eps_rms_255": params["eps"], "radius": radius, "holds": norms["l2_max"] <= radius + 1e-6}
    if spec.norm == "l0":
        limit = params["pixels"]
        return {"norm": "l0", "pixels": limit, "holds": norms["l0_max_pixels"] <= limit}
    return {"norm": "none", "holds": True}


# --------------------------------------------------------------------------- augmentations (float, differentiable)


def crop_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """RandomCrop(32, pad 4) + horizontal flip on float images; gathers keep it differentiable."""
    return standard_augment(x, g)


# CIFAR-10 training-set mean (adversarial_poisons' village/consts.py): the colour TAP's
# reference pads its shift with, since it shifts normalised images with zero padding
CIFAR10_MEAN_RGB = (0.4914672374725342, 0.4822617471218109, 0.4467701315879822)
# EntF's loader turns normalisation off (mean 0, std 1): its zero padding is black
BLACK_RGB = (0.0, 0.0, 0.0)


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


def shift_flip(
    x: torch.Tensor, g: torch.Generator, max_shift: float = 4.0, fill: Sequence[float] = CIFAR10_MEAN_RGB
) -> torch.Tensor:
    """The differentiable augmentation of TAP's reference (``RandomTransform``, also EntF's):
    a uniform sub-pixel shift in [-4, 4] px per axis, bilinear, padding with ``fill`` (TAP's
    mean colour by default; EntF's is black), and a horizontal flip with probability 1/2,
    drawn per image."""
    u = torch.rand(x.shape[0], 3, generator=g, device=g.device).to(x.device)
    return shift_image(x, (u[:, :2] - 0.5) * 2 * max_shift, u[:, 2] > 0.5, fill)


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


@torch.no_grad()
def eval_logits(
    model: nn.Module, images: torch.Tensor, device: torch.device, bf16: bool, batch: int = 500
) -> torch.Tensor:
    """Eval-mode logits of uint8 images (on CPU)."""
    was = model.training
    model.eval()
    out = [forward(model, to_float(images[i : i + batch].to(device)), bf16).cpu() for i in range(0, len(images), batch)]
    model.train(was)
    return torch.cat(out) if out else torch.empty(0, NUM_CLASSES)


def accuracy_and_loss(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device, bf16: bool
) -> tuple[float, float]:
    logits = eval_logits(model, images, device, bf16)
    return 100.0 * (logits.argmax(1) == labels).float().mean().item(), F.cross_entropy(logits, labels).item()


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
    target = (ctx.clean.labels + shift) % ctx.num_classes

    def rate(images: torch.Tensor) -> float:
        prob = sum(eval_logits(m, images, ctx.device, ctx.bf16).softmax(1) for m in models)
        return 100.0 * (prob.argmax(1) == target).float().mean().item()

    return {"target_pred_pct_clean": rate(ctx.clean.images), "target_pred_pct_poisoned": rate(poisoned)}
