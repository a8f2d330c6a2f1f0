"""OPS: one-pixel shortcut (Wu et al., ICLR'23); L0 budget, class-wise.

For each class in turn, every (pixel position, colour in {0, 1}³) is scored by
mean|c - x(pos)| / std|c - x(pos)| over the class's images and the three channels, and the
best one not already taken by an earlier class (same position and colour) is written into
every image of the class. The statistics come from per-position first and second moments,
so the search costs a few array operations per class instead of a loop over images.
"""

from __future__ import annotations

import torch

from utils.data import NUM_CLASSES
from utils.poisons.common import CraftContext, CraftResult

COLOURS = torch.tensor([[(v >> 2) & 1, (v >> 1) & 1, v & 1] for v in range(8)], dtype=torch.float64)  # [8, 3]


def position_scores(class_images: torch.Tensor) -> torch.Tensor:
    """[S*S, 8] scores of (position, colour) for one class's uint8 images (S x S)."""
    x = class_images.double().div(255.0).flatten(2)  # [N, 3, S*S]
    m1 = x.mean(0)  # E[x] per channel and position
    m2 = (x * x).mean(0)
    # |c - x| is x for c = 0 and 1 - x for c = 1
    e1 = torch.stack([m1, 1 - m1])  # [2, 3, S*S]: E|c - x|
    e2 = torch.stack([m2, 1 - 2 * m1 + m2])  # E|c - x|²
    bits = COLOURS.long()  # [8, 3]
    ch = torch.arange(3)
    mean = e1[bits, ch].mean(1)  # [8, S*S] averaged over the channels
    second = e2[bits, ch].mean(1)
    std = (second - mean**2).clamp_min(0).sqrt()
    return (mean / std.clamp_min(1e-12)).T  # [S*S, 8]


def search(
    images: torch.Tensor, labels: torch.Tensor, pixels: int, num_classes: int = NUM_CLASSES
) -> list[list[tuple[int, int]]]:
    """Per class, the chosen (position, colour index) pairs, greedily in class order."""
    taken: set[tuple[int, int]] = set()
    choice = []
    for c in range(num_classes):
        sel = images[labels == c]
        picks = []
        if len(sel):
            scores = position_scores(sel).flatten()
            for flat in torch.argsort(scores, descending=True, stable=True).tolist():
                pair = (flat // 8, flat % 8)
                if pair not in taken:
                    picks.append(pair)
                    taken.add(pair)
                    if len(picks) == pixels:
                        break
        choice.append(picks)
    return choice


def apply(images: torch.Tensor, labels: torch.Tensor, choice: list[list[tuple[int, int]]]) -> torch.Tensor:
    out = images.clone()
    side = images.shape[-1]
    for c, picks in enumerate(choice):
        idx = torch.nonzero(labels == c).flatten()
        for pos, colour in picks:
            value = (COLOURS[colour] * 255).to(torch.uint8)
            out[idx, :, pos // side, pos % side] = value
    return out


def craft(ctx: CraftContext) -> CraftResult:
    choice = search(ctx.clean.images, ctx.clean.labels, ctx.params["pixels"], ctx.num_classes)
    images = apply(ctx.clean.images, ctx.clean.labels, choice)
    side = ctx.clean.image_size
    info = {
        "pixels_per_class": [
            [
                {"row": pos // side, "col": pos % side, "rgb": [int(v) * 255 for v in COLOURS[c].tolist()]}
                for pos, c in picks
            ]
            for picks in choice
        ]
    }
    return CraftResult(images=images, info=info)
