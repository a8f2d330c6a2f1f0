"""SIG (Barni et al., 2019) as in BackdoorBench v1: a horizontal sinusoid
``v(i, j) = delta * sin(2 pi j f / 32)`` (same for every row and channel) added to the
image (float32 pattern, summed in float64 as the reference does), clipped to [0, 255]
and truncated to uint8. Clean-label: only target-class training images get the signal,
labels stay; at test time every non-target image does.
"""

from __future__ import annotations

import math

import torch

from utils.dataelixir.triggers.base import Trigger
from utils.options import Key, Range


def sig_pattern(delta: float, f: float, width: int = 32) -> torch.Tensor:
    """float32 [1, 1, 1, width]: the additive signal, broadcast over rows and channels."""
    j = torch.arange(width, dtype=torch.float64)
    return (delta * torch.sin(2 * math.pi * j * f / width)).float().view(1, 1, 1, width)


class TriggerSIG(Trigger):
    name = "sig"
    clean_label = True
    supports_all2all = False
    keys = {
        "sig_delta": Key(
            40.0, "amplitude of the sinusoid on the 0-255 scale (BackdoorBench: 40)", range=Range(0, 255, low_open=True)
        ),
        "sig_f": Key(
            6.0,
            "frequency: periods across the image width (BackdoorBench: 6)",
            range=Range(0, 16, low_open=True),
        ),
    }

    def validate(self) -> None:
        d, f = self.params["sig_delta"], self.params["sig_f"]
        self.pattern = sig_pattern(d, f, self.image_size)  # f periods across any width, as BackdoorBench

    def apply(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        # BackdoorBench adds the float32 pattern to uint32 pixels in float64, so where the
        # sine should be 0 but is -3e-14 (column 16 at f 6) truncation loses one unit: kept
        out = images.double() + self.pattern.to(images.device).double()
        return out.clamp_(0, 255).to(torch.uint8)


TRIGGER = TriggerSIG
