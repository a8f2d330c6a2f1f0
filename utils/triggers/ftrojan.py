"""FTrojan (Wang et al., 2022) as in BackdoorBench: a frequency-domain trigger.

RGB -> YCrCb (OpenCV's ``COLOR_RGB2YCrCb``, which BackdoorBench calls "YUV"), an
orthonormal 2-D DCT-II per ``window_size`` block and channel, ``magnitude`` added to the
coefficients at ``pos_list`` in the channels of ``channel_list``, inverse DCT, truncate
to uint8 (BackdoorBench's ``astype(uint8)``; we clamp first where it would wrap around),
YCrCb -> RGB rounded. Dirty-label. Everything is batched tensor algebra: the DCT is a
matrix product with the DCT basis, the colour transform a 3x3 matrix.

Defaults follow the brief's BackdoorBench setting: window 32, positions (15,15) and
(31,31), magnitude 50, all three channels (BackdoorBench's code loops over every channel;
the FTrojan paper perturbs only the two chroma channels, ``channel_list: [1, 2]``).
"""

from __future__ import annotations

import math

import torch

from utils.triggers import Trigger, require

# OpenCV's documented RGB <-> YCrCb coefficients (8-bit: delta 128)
_Y = (0.299, 0.587, 0.114)
_CR, _CB = 0.713, 0.564
_INV = ((1.0, 1.403, 0.0), (1.0, -0.714, -0.344), (1.0, 0.0, 1.773))  # rows R, G, B; cols Y, Cr-128, Cb-128


def rgb_to_ycrcb(x: torch.Tensor) -> torch.Tensor:
    """float [B,3,H,W] RGB in 0..255 -> float YCrCb (not rounded)."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    y = _Y[0] * r + _Y[1] * g + _Y[2] * b
    return torch.stack([y, (r - y) * _CR + 128.0, (b - y) * _CB + 128.0], dim=1)


def ycrcb_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """float [B,3,H,W] YCrCb -> float RGB (not rounded)."""
    y, cr, cb = x[:, 0], x[:, 1] - 128.0, x[:, 2] - 128.0
    return torch.stack([y + _INV[0][1] * cr, y + _INV[1][1] * cr + _INV[1][2] * cb, y + _INV[2][2] * cb], dim=1)


def dct_matrix(n: int, dtype=torch.float64) -> torch.Tensor:
    """Orthonormal DCT-II basis ``D`` (rows = frequencies): ``X = D x D^T``, ``x = D^T X D``."""
    k = torch.arange(n, dtype=dtype)[:, None]
    i = torch.arange(n, dtype=dtype)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def blockwise_dct(x: torch.Tensor, window: int, inverse: bool = False) -> torch.Tensor:
    """2-D DCT (or inverse) of every ``window x window`` block of ``x`` [B,C,H,W]."""
    B, C, H, W = x.shape
    d = dct_matrix(window, x.dtype).to(x.device)
    blocks = x.reshape(B, C, H // window, window, W // window, window)
    if inverse:
        out = torch.einsum("ki,bchkwl,lj->bchiwj", d, blocks, d)
    else:
        out = torch.einsum("ik,bchkwl,jl->bchiwj", d, blocks, d)
    return out.reshape(B, C, H, W)


class TriggerFTrojan(Trigger):
    name = "ftrojan"
    defaults = {
        "yuv_flag": True,
        "window_size": 32,
        "pos_list": [[15, 15], [31, 31]],
        "magnitude": 50.0,
        "channel_list": [0, 1, 2],
    }
    help = {
        "yuv_flag": "perturb the DCT of the YCrCb image (True, BackdoorBench) or of the RGB image",
        "window_size": "DCT block size dividing 32 (BackdoorBench: 32, one block per image)",
        "pos_list": "DCT coefficients [row, col] within each block that get the magnitude (default (15,15) and (31,31))",
        "magnitude": "amount added to each chosen DCT coefficient (BackdoorBench: 50)",
        "channel_list": "channels whose coefficients are perturbed (BackdoorBench: all; FTrojan paper: [1, 2])",
    }

    def validate(self) -> None:
        w = self.params["window_size"]
        require(w in (1, 2, 4, 8, 16, 32), f"ftrojan: window_size must divide 32 (1, 2, 4, 8, 16 or 32), got {w}")
        pos = self.params["pos_list"]
        ok = bool(pos) and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) and 0 <= v < w for v in p) for p in pos
        )
        require(ok, f"ftrojan: pos_list must be a non-empty list of [row, col] pairs in 0..{w - 1}, got {pos}")
        ch = self.params["channel_list"]
        require(
            bool(ch) and all(isinstance(c, int) and 0 <= c < 3 for c in ch) and len(set(ch)) == len(ch),
            f"ftrojan: channel_list must list distinct channels among 0, 1, 2, got {ch}",
        )
        m = self.params["magnitude"]
        require(0 < abs(m) <= 1000, f"ftrojan: magnitude must be non-zero and at most 1000 in size, got {m}")
        mask = torch.zeros(3, w, w, dtype=torch.float64)
        for c in ch:
            for r, col in pos:
                mask[c, r, col] += m
        self.coef = mask.repeat(1, 32 // w, 32 // w)  # the shift of every block's coefficients

    def perturbed_float(self, images: torch.Tensor) -> torch.Tensor:
        """The perturbed image in the DCT's colour space, before any rounding (float64)."""
        x = images.double()
        if self.params["yuv_flag"]:
            x = rgb_to_ycrcb(x).round().clamp(0, 255)  # OpenCV returns uint8 YCrCb
        w = self.params["window_size"]
        coef = blockwise_dct(x, w) + self.coef.to(x.device)
        return blockwise_dct(coef, w, inverse=True)

    def apply(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        x = self.perturbed_float(images).clamp(0, 255).floor()
        if self.params["yuv_flag"]:
            x = ycrcb_to_rgb(x).round()
        return x.clamp(0, 255).to(torch.uint8)


TRIGGER = TriggerFTrojan
