"""WaNet (Nguyen & Tran, 2021) with BackdoorBench v1's CIFAR-10 settings, as a static
poisoned dataset.

The trigger is a smooth warping field: a random ``k x k x 2`` control grid (uniform in
[-1, 1], divided by its mean absolute value) upsampled bicubically to 32x32, scaled by
``s / 32`` and added to the identity sampling grid (times ``grid_rescale``, clamped to
[-1, 1]); images are resampled with ``grid_sample`` (bilinear, align_corners=True).
Noise mode: ``cross_ratio * n_poisoned`` further (non-poisoned) training images are warped
with the trigger grid plus per-pixel uniform noise of ``1/32`` and keep their labels, so
the model has to learn the exact warp rather than "any warp".

Deviation from BackdoorBench: the reference re-draws poisoned and cross samples in every
batch of its own training loop. DataElixir purifies a fixed training set, so here the
poisoned (``pratio``) and cross samples are drawn once with ``random_seed`` and stored as
uint8 (rounded), which is what the defence sees. The warp grid is drawn from
``random_seed`` too (the attacker's secret); the cross noise from ``random_seed + 1``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from utils.data import ImageSet
from utils.dataelixir.triggers.base import Log, Trigger
from utils.options import Key, Range

CROSS_RATIO = Range(0, 10)  # cross samples per poisoned sample (WaNet, Input-aware)


def wanet_grids(k: int, s: float, grid_rescale: float, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise_grid [1,size,size,2], trigger grid [1,size,size,2]) for ``grid_sample``."""
    g = torch.Generator().manual_seed(seed)
    ins = torch.rand(1, 2, k, k, generator=g) * 2 - 1
    ins = ins / ins.abs().mean()
    noise = F.interpolate(ins, size=size, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    lin = torch.linspace(-1, 1, steps=size)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    identity = torch.stack((xx, yy), dim=2)[None]  # grid_sample wants (x, y) order
    grid = ((identity + s * noise / size) * grid_rescale).clamp(-1, 1)
    return noise, grid


def warp(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """uint8 images resampled on ``grid`` ([1 or B, H, W, 2]), rounded back to uint8."""
    x = images.float()
    grid = grid.to(images.device).expand(len(images), -1, -1, -1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


class TriggerWaNet(Trigger):
    name = "wanet"
    keys = {
        "k": Key(
            4,
            "side of the random control grid that is upsampled into the warp field (BackdoorBench: 4)",
            range=Range(2, 32),
        ),
        "s": Key(0.5, "strength of the warp (BackdoorBench: 0.5)", range=Range(0, 32, low_open=True)),
        "grid_rescale": Key(
            1.0, "scale of the warped sampling grid (BackdoorBench: 1)", range=Range(0, 2, low_open=True)
        ),
        "cross_ratio": Key(
            2.0,
            "noise-mode samples per poisoned sample: warped with a perturbed grid, label kept (BackdoorBench: 2)",
            range=CROSS_RATIO,
        ),
    }

    def validate(self) -> None:
        p = self.params
        self.noise_grid, self.grid = wanet_grids(p["k"], p["s"], p["grid_rescale"], self.seed)

    def apply(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        return warp(images, self.grid)

    def cross_grids(self, n: int, g: torch.Generator) -> torch.Tensor:
        size = self.grid.shape[1]
        noise = torch.rand(n, size, size, 2, generator=g) * 2 - 1
        return (self.grid + noise / size).clamp(-1, 1)

    def poison_train(
        self, train: ImageSet, poison_idx: torch.Tensor, new_labels: torch.Tensor, log: Log = print
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        images, labels, extra = super().poison_train(train, poison_idx, new_labels, log)
        cross_idx = choose_cross(len(train), poison_idx, self.params["cross_ratio"], self.seed, log)
        if len(cross_idx):
            g = torch.Generator().manual_seed(self.seed + 1)
            for i in range(0, len(cross_idx), self.chunk):
                idx = cross_idx[i : i + self.chunk]
                grids = self.cross_grids(len(idx), g).to(self.device)
                images[idx] = warp(train.images[idx].to(self.device), grids).cpu()
        return images, labels, {**extra, "n_cross": len(cross_idx), "cross_indices": cross_idx.tolist()}


def choose_cross(n: int, poison_idx: torch.Tensor, cross_ratio: float, seed: int, log: Log) -> torch.Tensor:
    """Sorted indices of ``round(cross_ratio * n_poisoned)`` non-poisoned samples (capped)."""
    want = int(round(cross_ratio * len(poison_idx)))
    pool = np.setdiff1d(np.arange(n), poison_idx.numpy())
    if want > len(pool):
        log(f"note: {want} cross samples requested but only {len(pool)} non-poisoned samples exist; using all")
        want = len(pool)
    rng = np.random.default_rng(seed + 1)
    return torch.from_numpy(np.sort(rng.choice(pool, size=want, replace=False))).long()


TRIGGER = TriggerWaNet
