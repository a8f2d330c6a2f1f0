"""URP: class-wise universal random perturbation.

One pattern per class, drawn from N(0, σ²) per pixel (σ = ε by default) and clipped to the
L∞ ball, added to every image of the class and rounded to pixel levels; clipping to
[0, 255] happens per image, so saturated pixels are the only place where two images of a
class differ in their perturbation.
"""

from __future__ import annotations

import torch

from utils.poisons.common import CraftContext, CraftResult, apply_linf, linf_levels


def class_patterns(eps: float, sigma: float, g: torch.Generator) -> torch.Tensor:
    """[10, 3, 32, 32] integer-valued patterns (/255 units) in [-floor(eps), floor(eps)]."""
    k = linf_levels(eps)
    return (torch.randn(10, 3, 32, 32, generator=g) * sigma).clamp(-eps, eps).round().clamp(-k, k)


def craft(ctx: CraftContext) -> CraftResult:
    p = ctx.params
    patterns = class_patterns(p["eps"], p["sigma"], ctx.generator(1))
    images = apply_linf(ctx.clean.images, patterns[ctx.clean.labels], p["eps"])
    return CraftResult(images=images, info={"patterns": "one per class"})
