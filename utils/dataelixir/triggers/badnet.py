"""BadNets (Gu et al., 2017) as in DataElixir's BackdoorBench fork on CIFAR-10: a 4x4
colour patch in the bottom-right corner (rows/cols 28-31); dirty-label.

The patch is the fork's ``resource/badnet/bottom_right_4by4_color.npy`` (BackdoorBench
v1's own default is a 3x3 white square), generated here: four 2x2 blocks, in reading
order yellow (255,255,0), magenta (255,0,255), cyan (0,255,255) and grey (122,122,122).
``patch_size`` scales the blocks (each block is ``patch_size/2`` wide), always anchored at
the bottom-right corner.

It is applied as BackdoorBench's ``AddMaskPatchTrigger``, per pixel and channel
``img * (patch == 0) + patch * (patch > 0)``: a zero channel of the patch keeps the
image's value, so the yellow block keeps the image's blue channel, magenta its green and
cyan its red.
"""

from __future__ import annotations

import torch

from utils.dataelixir.triggers.base import Trigger, require
from utils.options import Key, Range

# reading order: top-left, top-right, bottom-left, bottom-right block
PATCH_COLOURS = ((255, 255, 0), (255, 0, 255), (0, 255, 255), (122, 122, 122))


def badnet_patch(size: int = 4) -> torch.Tensor:
    """uint8 [3, size, size]: the four coloured blocks."""
    half = size // 2
    patch = torch.empty(3, size, size, dtype=torch.uint8)
    for k, colour in enumerate(PATCH_COLOURS):
        r, c = divmod(k, 2)
        patch[:, r * half : (r + 1) * half, c * half : (c + 1) * half] = torch.tensor(colour, dtype=torch.uint8)[
            :, None, None
        ]
    return patch


class TriggerBadNet(Trigger):
    name = "badnet"
    keys = {
        "patch_size": Key(
            4, "side of the bottom-right colour patch in pixels (even, 2-16; BackdoorBench: 4)", range=Range(2, 16)
        )
    }

    def validate(self) -> None:
        s = self.params["patch_size"]
        require(s % 2 == 0, f"badnet: patch_size must be an even number in 2..16, got {s}")
        self.patch = badnet_patch(s)

    def apply(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        s = self.params["patch_size"]
        out = images.clone()
        patch = self.patch.to(images.device)
        out[:, :, -s:, -s:] = torch.where(patch > 0, patch, out[:, :, -s:, -s:])
        return out


TRIGGER = TriggerBadNet
