"""URP: class-wise universal random perturbation.

No reference code exists: ECLIPSE describes URP only as one random Gaussian noise per
class under the common 8/255 budget. The distribution used here: per class one pattern of
i.i.d. N(0, σ²) pixels with σ = ε (``--sigma``), clipped to [-ε, ε] and rounded to pixel
levels. Why σ = ε: it is the one scale the description fixes, and it spends the budget
(about a third of the pixels sit at ±ε, the mean |δ| is ~0.6 ε) while keeping a Gaussian
profile; a much smaller σ would leave most of the budget unused, a much larger one turns
the pattern into ±ε binary noise. The pattern is added to every image of the class;
clipping to [0, 255] happens per image, so saturated pixels are the only place where two
images of a class differ in their perturbation.
"""

from __future__ import annotations

import torch

from utils.data import NUM_CLASSES
from utils.poisons.common import CraftContext, CraftResult, apply_linf, linf_levels


def class_patterns(
    eps: float, sigma: float, g: torch.Generator, num_classes: int = NUM_CLASSES, size: int = 32
) -> torch.Tensor:
    """[classes, 3, size, size] integer-valued patterns (/255 units) in [-floor(eps), floor(eps)]."""
    k = linf_levels(eps)
    return (torch.randn(num_classes, 3, size, size, generator=g) * sigma).clamp(-eps, eps).round().clamp(-k, k)


def craft(ctx: CraftContext) -> CraftResult:
    p = ctx.params
    patterns = class_patterns(p["eps"], p["sigma"], ctx.generator(1), ctx.num_classes, ctx.clean.image_size)
    images = apply_linf(ctx.clean.images, patterns[ctx.clean.labels], p["eps"])
    return CraftResult(images=images, info={"patterns": "one per class"})
