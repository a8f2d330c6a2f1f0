"""Batched image transforms on uint8 tensors ``[B, 3, H, W]`` — no PIL in the hot path.

They reproduce torchvision's PIL pipeline bit for bit where the references use it:
``RandomCrop(32, padding=4)`` (zero fill), ``RandomHorizontalFlip``, ``RandomGrayscale``
(PIL's integer ITU-R 601-2 luma), and ``ToTensor -> +noise -> clamp -> ToPILImage``
(which truncates ``x * 255`` to uint8). Randomness comes from an explicit generator so
that a run is reproducible and resumable.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.special import betaincinv

from utils.data import CIFAR10_MEAN

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
Mix = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]
"""(float batch, labels, generator) -> (mixed batch, labels a, labels b, λ): the batch is trained
on with the loss λ·CE(a) + (1 − λ)·CE(b) (Mixup, CutMix; ``utils.trainer``)."""


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1] (``ToTensor``)."""
    return x.float().div_(255.0)


def to_uint8(x: torch.Tensor, mode: str = "truncate") -> torch.Tensor:
    """float [0, 1] -> uint8. ``truncate`` is ``ToPILImage``'s ``mul(255).byte()`` (the
    references' behaviour); ``round`` is the unbiased alternative."""
    x = x.clamp(0, 1).mul(255.0)
    if mode == "round":
        x = x.round()
    elif mode != "truncate":
        raise ValueError(f"quantisation mode must be 'truncate' or 'round', got {mode!r}")
    return x.to(torch.uint8)


def _uniform(n: int, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=g.device).to(device)


def random_crop(x: torch.Tensor, g: torch.Generator, padding: int = 4, p: float = 1.0) -> torch.Tensor:
    """Zero-pad by ``padding`` and take a random crop of the original size, per image
    (each image with probability ``p``; ``p = 1`` draws nothing extra)."""
    if p < 1:
        pick = (_uniform(x.shape[0], g, x.device) < p)[:, None, None, None]
        return torch.where(pick, random_crop(x, g, padding), x)
    B, C, H, W = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (B,), generator=g, device=g.device).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (B,), generator=g, device=g.device).to(x.device)
    # two 1-D gathers (rows, then columns) are cheaper than one 4-D fancy index
    rows = (dy[:, None] + torch.arange(H, device=x.device))[:, None, :, None].expand(B, C, H, W + 2 * padding)
    cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, None, :].expand(B, C, H, W)
    return padded.gather(2, rows).gather(3, cols)


def random_flip(x: torch.Tensor, g: torch.Generator, p: float = 0.5) -> torch.Tensor:
    flip = (_uniform(x.shape[0], g, x.device) < p)[:, None, None, None]
    return torch.where(flip, x.flip(3), x)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``convert('L')`` replicated to 3 channels: (19595 R + 38470 G + 7471 B + 2^15) >> 16."""
    xi = x.to(torch.int32)
    lum = (xi[:, 0] * 19595 + xi[:, 1] * 38470 + xi[:, 2] * 7471 + 32768) >> 16
    return lum.to(torch.uint8)[:, None].expand(-1, 3, -1, -1).contiguous()


def random_grayscale(x: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
    pick = (_uniform(x.shape[0], g, x.device) < p)[:, None, None, None]
    return torch.where(pick, grayscale(x), x)


def gaussian_noise(x: torch.Tensor, g: torch.Generator, std: float, quantize: str = "truncate") -> torch.Tensor:
    """Add N(0, std^2) on the [0, 1] scale, clamp, and re-quantise to uint8."""
    if quantize not in ("truncate", "round"):
        raise ValueError(f"quantisation mode must be 'truncate' or 'round', got {quantize!r}")
    # in place, but the same operations in the same order as ToTensor -> +noise -> ToPILImage
    y = to_float(x)
    y.add_(torch.randn(x.shape, generator=g, device=g.device).to(x.device).mul_(std)).clamp_(0, 1).mul_(255.0)
    return (y.round_() if quantize == "round" else y).to(torch.uint8)


def rotate(x: torch.Tensor, degrees: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
    """Rotate image i of uint8 ``x`` by ``degrees[i]`` about its centre, zero fill.
    ``nearest`` is torchvision's ``RandomRotation`` default (exact uint8 values);
    ``bilinear`` is kornia's, rounded back to uint8."""
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"rotation mode must be 'nearest' or 'bilinear', got {mode!r}")
    angle = degrees.to(x.device, torch.float32) * (math.pi / 180)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    # output -> input sampling coordinates; normalised coordinates of a square image keep angles
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(x.float(), grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def random_rotate(
    x: torch.Tensor, g: torch.Generator, degrees: float, p: float = 1.0, mode: str = "nearest"
) -> torch.Tensor:
    """Rotate each image, with probability ``p``, by an angle uniform in [-degrees, degrees]."""
    B = x.shape[0]
    angle = (_uniform(B, g, x.device) * 2 - 1) * degrees
    pick = _uniform(B, g, x.device) < p
    return torch.where(pick[:, None, None, None], rotate(x, angle, mode), x)


def crop_rotate_flip(
    padding: int = 5,
    degrees: float = 10.0,
    crop_p: float = 1.0,
    rotation_p: float = 1.0,
    mode: str = "nearest",
    rotation_image_p: float = 1.0,
) -> Augment:
    """BackdoorBench's WaNet / Input-aware training transform: RandomCrop(32, padding) ->
    RandomRotation(degrees) -> RandomHorizontalFlip. As WaNet's ``ProbTransform`` wrappers,
    ``crop_p`` and ``rotation_p`` are drawn once per batch: the whole batch is cropped (each
    image at its own offset) or none is; a rotated batch rotates each image with
    probability ``rotation_image_p`` (kornia's RandomRotation default: 0.5) at its own angle.
    A probability of 1 draws nothing, so Input-aware's per-image transform is the case 1, 1, 1."""

    def happens(p: float, x: torch.Tensor, g: torch.Generator) -> bool:
        return p >= 1 or bool(_uniform(1, g, x.device)[0] < p)

    def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if happens(crop_p, x, g):
            x = random_crop(x, g, padding)
        if degrees > 0 and happens(rotation_p, x, g):
            x = random_rotate(x, g, degrees, rotation_image_p, mode)
        return random_flip(x, g)

    return augment


def standard_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """RandomCrop(32, padding=4) + RandomHorizontalFlip: the usual CIFAR training transform."""
    return random_flip(random_crop(x, g), g)


def compensation_augment(
    p: float = 0.4, std: float = 0.05, quantize: str = "truncate", base: Augment = standard_augment
) -> Augment:
    """ECLIPSE's lightweight corruption compensation module, after ``base`` (crop + flip):
    RandomGrayscale(p), then Gaussian noise of ``std`` re-quantised to uint8."""

    def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x = random_grayscale(base(x, g), g, p)
        return gaussian_noise(x, g, std, quantize) if std > 0 else x

    return augment


def no_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return x


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG-compress each image once with libjpeg (PIL), as ISS's JPEG baseline does.

    This is a one-off preprocessing of the dataset, not a per-batch transform."""
    from PIL import Image

    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    hwc = x.permute(0, 2, 3, 1).contiguous().numpy()
    out = np.empty_like(hwc)
    for i, img in enumerate(hwc):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as im:
            out[i] = np.asarray(im.convert("RGB"))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def cutout(
    x: torch.Tensor,
    g: torch.Generator,
    length: int = 16,
    holes: int = 1,
    fill: tuple[float, ...] = CIFAR10_MEAN,
) -> torch.Tensor:
    """DeVries & Taylor's Cutout: per image and hole, a centre (row, column) uniform over the
    image and the square ``[c - length // 2, c + length // 2)`` (cut at the borders) set to
    ``fill``, the dataset's per-channel mean in [0, 1].

    Their mask multiplies the *normalised* input, so the square becomes 0 after ``Normalize``,
    i.e. the dataset's mean colour. The victims here take unnormalised [0, 1] images (as
    ECLIPSE's), where 0 would be black: filling with the mean is the paper's square. On uint8
    images the mean is rounded to the nearest level (at most 0.5/255 off)."""
    B, C, H, W = x.shape
    if len(fill) != C:
        raise ValueError(f"cutout: fill has {len(fill)} channels, the images {C}")
    keep = torch.ones(B, H, W, dtype=torch.bool, device=x.device)
    rows, cols = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    for _ in range(holes):
        cy = torch.randint(0, H, (B,), generator=g, device=g.device).to(x.device)
        cx = torch.randint(0, W, (B,), generator=g, device=g.device).to(x.device)
        in_rows = (rows >= (cy - length // 2).clamp(0, H)[:, None]) & (rows < (cy + length // 2).clamp(0, H)[:, None])
        in_cols = (cols >= (cx - length // 2).clamp(0, W)[:, None]) & (cols < (cx + length // 2).clamp(0, W)[:, None])
        keep &= ~(in_rows[:, :, None] & in_cols[:, None, :])
    value = torch.tensor(fill, dtype=torch.float64)
    value = value.mul(255).round().to(torch.uint8) if x.dtype == torch.uint8 else value.to(x.dtype)
    return torch.where(keep[:, None], x, value.to(x.device)[None, :, None, None])


def cutout_augment(
    length: int = 16, holes: int = 1, fill: tuple[float, ...] = CIFAR10_MEAN, base: Augment = standard_augment
) -> Augment:
    """Cutout's CIFAR-10 training transform: ``base`` (crop + flip), then Cutout filled with
    ``fill`` (the dataset's per-channel mean; CIFAR-10's by default)."""

    def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return cutout(base(x, g), g, length, holes, fill)

    return augment


def beta_draw(a: float, g: torch.Generator) -> float:
    """One Beta(a, a) draw from ``g``: the inverse CDF of a uniform from ``g`` (``torch``'s
    Beta sampler takes no generator, and a resumed run must replay the draws)."""
    u = float(torch.rand(1, generator=g, device=g.device)[0])
    return float(betaincinv(a, a, u))


def mixup(alpha: float = 1.0) -> Mix:
    """Zhang et al.'s mixup (their CIFAR-10 code): λ ~ Beta(α, α) per batch (1 for α = 0), the
    batch mixed with a random permutation of itself, λ·x + (1 − λ)·x[perm]."""

    def mix(x: torch.Tensor, y: torch.Tensor, g: torch.Generator):
        lam = beta_draw(alpha, g) if alpha > 0 else 1.0
        perm = torch.randperm(x.shape[0], generator=g, device=g.device).to(x.device)
        return lam * x + (1 - lam) * x[perm], y, y[perm], lam

    return mix


def cutmix_box(size: int, lam: float, cx: int, cy: int) -> tuple[int, int, int, int]:
    """CutMix's box for area share ``1 - lam`` centred at (cx, cy) of a square image: side
    ``int(size·√(1 − λ))``, each edge at centre ± side // 2 cut to the image."""
    cut = int(size * math.sqrt(1.0 - lam))
    lo = lambda c: min(max(c - cut // 2, 0), size)  # noqa: E731 - the edges, as the reference's np.clip
    hi = lambda c: min(max(c + cut // 2, 0), size)  # noqa: E731
    return lo(cx), lo(cy), hi(cx), hi(cy)


def cutmix(beta: float = 1.0, prob: float = 0.5) -> Mix:
    """Yun et al.'s CutMix (their CIFAR code and commands: β = 1, cutmix_prob 0.5): with
    probability ``prob`` per batch, λ ~ Beta(β, β), a box of area share 1 − λ at a uniform
    centre pasted from a random permutation of the batch, and λ set to the box's exact
    complement; other batches train as they are (λ = 1)."""

    def mix(x: torch.Tensor, y: torch.Tensor, g: torch.Generator):
        r = float(torch.rand(1, generator=g, device=g.device)[0])
        if not (beta > 0 and r < prob):
            return x, y, y, 1.0
        lam = beta_draw(beta, g)
        perm = torch.randperm(x.shape[0], generator=g, device=g.device).to(x.device)
        size = x.shape[2]
        if x.shape[3] != size:
            raise ValueError(f"CutMix here takes square images, got {tuple(x.shape[2:])}")
        cx, cy = (int(v) for v in torch.randint(0, size, (2,), generator=g, device=g.device))
        x1, y1, x2, y2 = cutmix_box(size, lam, cx, cy)
        out = x.clone()
        out[:, :, x1:x2, y1:y2] = x[perm, :, x1:x2, y1:y2]
        return out, y, y[perm], 1 - (x2 - x1) * (y2 - y1) / (size * size)

    return mix
