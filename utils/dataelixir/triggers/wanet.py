"""WaNet (Nguyen & Tran, 2021) with BackdoorBench v1's CIFAR-10 settings, as a static
poisoned dataset.

The trigger is a smooth warping field: a random ``k x k x 2`` control grid (uniform in
[-1, 1], divided by its mean absolute value) upsampled bicubically to 32x32, scaled by
``s / 32`` and added to the identity sampling grid (times ``grid_rescale``, clamped to
[-1, 1]); images are resampled with ``grid_sample`` (bilinear, align_corners=True).
Noise mode: cross samples are warped with the trigger grid plus per-pixel uniform noise
of ``1/32`` and keep their labels, so the model has to learn the exact warp rather than
"any warp".

The poisoned set is the one BackdoorBench v1 saves after training (``selection:
per_batch``): the training set in order, in batches of ``selection_batch`` (its ``bs``,
128); in each batch the first ``int(pratio * bs)`` images get the trigger and the target
label and the next ``int(that * cross_ratio)`` become cross samples: 4688 poisoned and
9376 cross samples of 50,000 at pratio 0.1. Its ``bd_train`` marks cross samples as
poisoned too (``cross_poisoned``), which is what the defence's TPR/FPR count. Images are
stored the way it stores them (``quantize: truncate``): computed on tensors normalised with
the dataset's mean/std (CIFAR-10's on CIFAR-10, as its loader), denormalised with its
inverse ``Normalize`` pair and truncated to uint8 by ``ToPILImage``. Deviation: the
reference trains its own model on poisons re-drawn in every batch; DataElixir purifies a
fixed training set, so the victim trains on this static set. The warp grid is drawn from
``random_seed`` (the attacker's secret), the cross noise from ``random_seed + 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F

from utils.augment import to_float
from utils.data import CIFAR10_MEAN, CIFAR10_STD, ImageSet
from utils.dataelixir.triggers.base import Log, Trigger
from utils.options import POSITIVE, Key, Range

CROSS_RATIO = Range(0, 10)  # cross samples per poisoned sample (WaNet, Input-aware)

# the keys WaNet and Input-aware share (each sets its own cross_ratio)
CROSS_SAMPLE_KEYS: dict[str, Key] = {
    "selection": Key(
        "per_batch",
        "which samples are poisoned: per_batch (BackdoorBench v1: the first int(pratio * selection_batch) "
        "of each batch of the training set in order, then the cross samples) or random (round(pratio * N) "
        "non-target samples and round(cross_ratio * that) cross samples, drawn with random_seed)",
        choices=("per_batch", "random"),
    ),
    "selection_batch": Key(128, "per_batch: the batch size of that selection (BackdoorBench bs: 128)", range=POSITIVE),
    "cross_poisoned": Key(
        True,
        "count cross samples as poisoned in the poison indicator, hence in TPR/FPR (BackdoorBench v1's bd_train: true)",
    ),
    "quantize": Key(
        "truncate",
        "uint8 conversion of triggered images: truncate (BackdoorBench v1: normalised tensors, denormalised, "
        "ToPILImage's truncation) or round (unbiased, in pixel space)",
        choices=("truncate", "round"),
    ),
}


@cache
def _bb_constants(
    mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, std, 1/std, -mean) as float32 [1,3,1,1]: BackdoorBench's loader
    ``Normalize(mean, std)`` and its denormaliser ``Normalize(0, 1/std)`` then
    ``Normalize(-mean, 1)``, built from the dataset's tuples as the CIFAR-10 constants always
    were (read only: shared by every call)."""
    return (
        torch.tensor(mean).view(1, 3, 1, 1),
        torch.tensor(std).view(1, 3, 1, 1),
        torch.tensor([1 / s for s in std]).view(1, 3, 1, 1),
        torch.tensor([-m for m in mean]).view(1, 3, 1, 1),
    )


def bb_normalise(
    x: torch.Tensor, mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD
) -> torch.Tensor:
    """Float [0, 1] images as BackdoorBench's loader normalises them: ``(x - mean) / std``
    with the dataset's statistics (default CIFAR-10's)."""
    m, s, _, _ = _bb_constants(tuple(mean), tuple(std))
    return (x - m.to(x.device)) / s.to(x.device)


def bb_to_uint8(
    xn: torch.Tensor, mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD
) -> torch.Tensor:
    """Images normalised with ``mean``/``std`` to uint8 as BackdoorBench v1 saves them: its
    denormaliser, then ``ToPILImage``'s ``mul(255).byte()``; the float round trip alone
    truncates about one value in five of an untouched CIFAR-10 image one grey level down,
    as the reference does."""
    _, _, inv_std, neg_mean = _bb_constants(tuple(mean), tuple(std))
    d = xn / inv_std.to(xn.device) - neg_mean.to(xn.device)
    # the clamp only catches float error at 0 and 255; conversion to uint8 truncates
    return d.mul(255).clamp_(0, 255).to(torch.uint8)


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


def warp(
    images: torch.Tensor,
    grid: torch.Tensor,
    quantize: str = "round",
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> torch.Tensor:
    """uint8 images resampled on ``grid`` ([1 or B, H, W, 2]): ``round`` in pixel space, or
    ``truncate`` on images normalised with ``mean``/``std`` as BackdoorBench v1 (``bb_to_uint8``)."""
    grid = grid.to(images.device).expand(len(images), -1, -1, -1)
    if quantize == "truncate":
        xn = bb_normalise(to_float(images), mean, std)
        return bb_to_uint8(
            F.grid_sample(xn, grid, mode="bilinear", padding_mode="zeros", align_corners=True), mean, std
        )
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def batch_selection(n: int, pratio: float, cross_ratio: float, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(poisoned, cross) indices as BackdoorBench v1 picks them from its unshuffled loader:
    per batch of ``bs`` images (the last one shorter) the first ``int(pratio * bs)``, then
    ``int(that * cross_ratio)`` (capped at the batch); where ``pratio * bs < 1`` a batch
    gets one poisoned sample with probability ``pratio * bs`` (its
    ``generalize_to_lower_pratio``)."""
    rng = np.random.default_rng(seed)
    poison: list[np.ndarray] = []
    cross: list[np.ndarray] = []
    for start in range(0, n, batch):
        bs = min(batch, n - start)
        share = pratio * bs
        n_bd = int(share) if share >= 1 else int(rng.uniform() < share)
        n_cross = min(int(n_bd * cross_ratio), bs - n_bd)
        poison.append(start + np.arange(n_bd))
        cross.append(start + n_bd + np.arange(n_cross))
    return np.concatenate(poison).astype(np.int64), np.concatenate(cross).astype(np.int64)


def choose_cross(n: int, poison_idx: torch.Tensor, cross_ratio: float, seed: int, log: Log) -> torch.Tensor:
    """Sorted indices of ``round(cross_ratio * n_poisoned)`` non-poisoned samples (capped)."""
    want = int(round(cross_ratio * len(poison_idx)))
    pool = np.setdiff1d(np.arange(n), poison_idx.numpy())
    if want > len(pool):
        log(f"note: {want} cross samples requested but only {len(pool)} non-poisoned samples exist; using all")
        want = len(pool)
    rng = np.random.default_rng(seed + 1)
    return torch.from_numpy(np.sort(rng.choice(pool, size=want, replace=False))).long()


class CrossSampleTrigger(Trigger):
    """A trigger whose poisoned set also holds cross samples (WaNet, Input-aware): which
    samples are poisoned and which are cross, and whether cross samples count as poisoned."""

    def batch_selection(self, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(poisoned, cross) indices under ``selection: per_batch``; None under ``random``."""
        p = self.params
        if p["selection"] != "per_batch":
            return None
        return batch_selection(n, self.pratio, p["cross_ratio"], p["selection_batch"], self.seed)

    def cross_indices(self, n: int, poison_idx: torch.Tensor, log: Log) -> torch.Tensor:
        chosen = self.batch_selection(n)
        if chosen is None:
            return choose_cross(n, poison_idx, self.params["cross_ratio"], self.seed, log)
        return torch.from_numpy(chosen[1]).long()

    def poison_train(
        self, train: ImageSet, poison_idx: torch.Tensor, new_labels: torch.Tensor, log: Log = print
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        images, labels, extra = super().poison_train(train, poison_idx, new_labels, log)
        cross_idx = self.cross_indices(len(train), poison_idx, log)
        if len(cross_idx):
            self.write_cross(images, train, cross_idx)
        return images, labels, {**extra, "n_cross": len(cross_idx), "cross_indices": cross_idx.tolist()}

    def write_cross(self, images: torch.Tensor, train: ImageSet, cross_idx: torch.Tensor) -> None:
        """Write the cross samples ``cross_idx`` of ``train`` into ``images`` (labels kept)."""
        raise NotImplementedError


class TriggerWaNet(CrossSampleTrigger):
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
        **CROSS_SAMPLE_KEYS,
    }

    def validate(self) -> None:
        p = self.params
        # the k x k control grid upsampled to the image side, as BackdoorBench's input_height
        self.noise_grid, self.grid = wanet_grids(p["k"], p["s"], p["grid_rescale"], self.seed, self.image_size)

    def apply(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        return warp(images, self.grid, self.params["quantize"], self.mean, self.std)

    def cross_grids(self, n: int, g: torch.Generator) -> torch.Tensor:
        size = self.grid.shape[1]
        noise = torch.rand(n, size, size, 2, generator=g) * 2 - 1
        return (self.grid + noise / size).clamp(-1, 1)

    def write_cross(self, images: torch.Tensor, train: ImageSet, cross_idx: torch.Tensor) -> None:
        g = torch.Generator().manual_seed(self.seed + 1)
        for i in range(0, len(cross_idx), self.chunk):
            idx = cross_idx[i : i + self.chunk]
            grids = self.cross_grids(len(idx), g).to(self.device)
            images[idx] = warp(
                train.images[idx].to(self.device), grids, self.params["quantize"], self.mean, self.std
            ).cpu()


TRIGGER = TriggerWaNet
