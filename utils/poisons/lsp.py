"""LSP: linear-separable synthetic perturbations (Yu et al., KDD'22); L2 budget.

The reference draws points with sklearn's ``make_classification`` (48 features =
(32/8)²·3, all informative, 10 classes, one cluster each, ``class_sep`` 10, no label
noise). Its recipe, re-implemented with numpy: each class's cluster centre is a distinct
random vertex of the hypercube {-class_sep, +class_sep}^48, and its points are standard
normal vectors times a random matrix U(-1, 1)^(48×48) plus the centre. Each image gets a
fresh point of its class, reshaped to 4×4×3, upsampled to 32×32 by 8×8 patches and scaled
to the L2 norm of the ε-RMS ball (ε = 6: √((6/255)²·3072) ≈ 1.30). The reference writes
uint8 with ``astype(uint8)``, which truncates: floor(x + δ) (``--quantize round`` for the
nearest level); the budget is then enforced on the bytes (``apply_l2``).

Other datasets: one cluster per class (N classes); at 64x64 the equivalent of the 48
features is the same 4×4×3 grid upsampled by 16×16 patches (``--patch`` defaults to a
quarter of the side), scaled to the same per-pixel RMS (an L2 radius twice CIFAR's).
"""

from __future__ import annotations

import numpy as np
import torch

from utils.data import NUM_CLASSES
from utils.fileio import UserError
from utils.poisons.common import CraftContext, CraftResult, apply_l2, l2_radius_255


def cluster_params(
    dim: int, class_sep: float, rng: np.random.Generator, num_classes: int = NUM_CLASSES
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class centres (distinct hypercube vertices) and mixing matrices."""
    if num_classes > 2**dim:  # resolve_params refuses this first; a direct call must not loop forever
        raise UserError(f"LSP: {dim} features give {2**dim} distinct cluster centres, fewer than {num_classes} classes")
    for _ in range(1000):  # the reference's draw, redrawn until the classes' vertices differ
        vertices = rng.integers(0, 2, size=(num_classes, dim))
        if len({v.tobytes() for v in vertices}) == num_classes:
            break
    else:  # classes fill much of the hypercube (few features): draw distinct vertices at once
        codes = rng.choice(2**dim, size=num_classes, replace=False)
        vertices = (codes[:, None] >> np.arange(dim)) & 1
    centres = vertices.astype(np.float64) * 2 * class_sep - class_sep
    mixing = 2 * rng.uniform(size=(num_classes, dim, dim)) - 1
    return centres, mixing


def patterns(
    labels: torch.Tensor,
    patch: int,
    class_sep: float,
    radius_255: float,
    seed: int,
    size: int = 32,
    num_classes: int = NUM_CLASSES,
) -> torch.Tensor:
    """[N, 3, size, size] perturbations in /255 units, each of L2 norm ``radius_255``."""
    rng = np.random.default_rng(seed)
    side = size // patch
    dim = side * side * 3
    centres, mixing = cluster_params(dim, class_sep, rng, num_classes)
    y = labels.numpy()
    points = np.empty((len(y), dim))
    for c in range(num_classes):  # a loop over classes: each class has its own linear map
        sel = np.nonzero(y == c)[0]
        points[sel] = rng.standard_normal((len(sel), dim)) @ mixing[c] + centres[c]
    img = points.reshape(len(y), side, side, 3).repeat(patch, 1).repeat(patch, 2)  # HWC, 8x8 blocks
    img = torch.from_numpy(np.ascontiguousarray(img.transpose(0, 3, 1, 2))).float()
    norms = img.flatten(1).norm(dim=1).clamp_min(1e-12)
    return img * (radius_255 / norms).view(-1, 1, 1, 1)


def craft(ctx: CraftContext) -> CraftResult:
    p = ctx.params
    size = ctx.clean.image_size
    radius = l2_radius_255(p["eps"], size)
    delta = patterns(ctx.clean.labels, p["patch"], p["class_sep"], radius, ctx.seed, size, ctx.num_classes)
    images = apply_l2(ctx.clean.images, delta, radius, quantize=p["quantize"])
    return CraftResult(images=images, info={"l2_radius": radius / 255.0, "features": (size // p["patch"]) ** 2 * 3})
