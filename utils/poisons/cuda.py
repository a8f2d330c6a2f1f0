"""CUDA: convolution-based unlearnable data (Sadasivan et al., CVPR'23); not norm-bounded.

Per class a random 3×3 kernel with entries U(0, blur) (blur 0.3) and one random entry set
to 1, the same kernel for R, G and B (a depthwise convolution, zero padding 1, no bias).
Each image is convolved with its class's kernel and divided by its own maximum, as in the
reference ``final_filter_unlearnable.py``; the result ×255 is truncated to uint8 as the
reference's ``astype(np.uint8)`` does (``--quantize round`` for the nearest level).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.augment import to_float
from utils.data import NUM_CLASSES
from utils.poisons.common import CraftContext, CraftResult


def class_kernels(blur: float, g: torch.Generator, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """[classes, 3, 1, 3, 3] depthwise kernels, one per class, identical across channels."""
    k = torch.rand(num_classes, 3, 3, generator=g) * blur
    pos = torch.randint(0, 9, (num_classes,), generator=g)
    k.view(num_classes, 9)[torch.arange(num_classes), pos] = 1.0
    return k[:, None, None].expand(num_classes, 3, 1, 3, 3).contiguous()


def convolve(
    images: torch.Tensor, labels: torch.Tensor, kernels: torch.Tensor, batch: int = 5000, quantize: str = "truncate"
) -> torch.Tensor:
    out = torch.empty_like(images)
    for c in range(kernels.shape[0]):  # one convolution per class, batched over its images
        idx = torch.nonzero(labels == c).flatten()
        for b0 in range(0, len(idx), batch):
            sel = idx[b0 : b0 + batch]
            y = F.conv2d(to_float(images[sel]), kernels[c], padding=1, groups=3)
            peak = y.flatten(1).amax(dim=1).clamp_min(1e-8).view(-1, 1, 1, 1)
            scaled = (y / peak).clamp(0, 1).mul(255)
            out[sel] = (scaled.floor() if quantize == "truncate" else scaled.round()).to(torch.uint8)
    return out


def craft(ctx: CraftContext) -> CraftResult:
    kernels = class_kernels(ctx.params["blur"], ctx.generator(1), ctx.num_classes)
    images = convolve(ctx.clean.images, ctx.clean.labels, kernels, quantize=ctx.params["quantize"])
    return CraftResult(images=images, info={"kernels": kernels[:, 0, 0].tolist()})
