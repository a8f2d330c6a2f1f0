"""FTrojan (Wang et al., 2022) as in BackdoorBench: a frequency-domain trigger.

RGB -> YCrCb (OpenCV's ``COLOR_RGB2YCrCb``, which BackdoorBench calls "YUV"), an
orthonormal 2-D DCT-II per ``window_size`` block and channel, ``magnitude`` added to the
coefficients at ``pos_list`` in the channels of ``channel_list``, inverse DCT, truncate
to uint8 (BackdoorBench's ``astype(uint8)``), YCrCb -> RGB. Dirty-label.

Defaults are BackdoorBench v2's (``config/attack/ftrojannn/default.yaml``): YUV,
channels U and V only (``[1, 2]``), window 32, positions (15,15) and (31,31),
magnitude 30, pratio 0.1. (The fork DataElixir builds on perturbs all three channels;
v1's yaml uses position (31,31) only and magnitude 50.)

Arithmetic:
- the colour conversions are OpenCV's 8-bit fixed-point formulas (14-bit coefficients,
  round half up, saturated), so they give OpenCV's bytes, not a float approximation;
- the DCT is linear, so ``IDCT(DCT(x) + shift) = x + IDCT(shift)``: the trigger is a fixed
  float pattern added to the integer YCrCb image. Exact for the untouched channels (a DCT
  round trip in floating point can land just below an integer, which truncation would
  turn into a lost unit);
- deviation: BackdoorBench's ``astype(uint8)`` wraps values outside 0..255 around
  (-1 -> 255); we clamp them to 0..255 first.
"""

from __future__ import annotations

import math

import torch

from utils.dataelixir.triggers.base import Trigger, require
from utils.options import Key

# OpenCV's 8-bit YCrCb coefficients (color_yuv: yuv_shift 14)
_SHIFT = 14
_HALF = 1 << (_SHIFT - 1)
_R2Y, _G2Y, _B2Y, _CR, _CB = 4899, 9617, 1868, 11682, 9241
_CR2R, _CR2G, _CB2G, _CB2B = 22987, -11698, -5636, 29049


def rgb_to_ycrcb(x: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] RGB -> int64 YCrCb in 0..255, as OpenCV's ``COLOR_RGB2YCrCb``."""
    r, g, b = x.long().unbind(1)
    y = (r * _R2Y + g * _G2Y + b * _B2Y + _HALF) >> _SHIFT
    cr = ((r - y) * _CR + (128 << _SHIFT) + _HALF) >> _SHIFT
    cb = ((b - y) * _CB + (128 << _SHIFT) + _HALF) >> _SHIFT
    return torch.stack([y, cr, cb], dim=1).clamp(0, 255)


def ycrcb_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """integer YCrCb in 0..255 [B,3,H,W] -> uint8 RGB, as OpenCV's ``COLOR_YCrCb2RGB``."""
    y, cr, cb = x.long().unbind(1)
    cr, cb = cr - 128, cb - 128
    r = y + ((cr * _CR2R + _HALF) >> _SHIFT)
    g = y + ((cb * _CB2G + cr * _CR2G + _HALF) >> _SHIFT)
    b = y + ((cb * _CB2B + _HALF) >> _SHIFT)
    return torch.stack([r, g, b], dim=1).clamp(0, 255).to(torch.uint8)


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
    keys = {
        "yuv_flag": Key(True, "perturb the DCT of the YCrCb image (True, BackdoorBench's YUV) or of the RGB image"),
        "window_size": Key(
            32,
            "DCT block size dividing the image side (BackdoorBench: 32: one block per CIFAR image, four on a 64x64 "
            "image, each block shifted alike)",
            choices=(1, 2, 4, 8, 16, 32, 64),
        ),
        "pos_list": Key(
            [[15, 15], [31, 31]],
            "DCT coefficients [row, col] within each block that get the magnitude (BackdoorBench v2: (15,15), (31,31))",
        ),
        "magnitude": Key(30.0, "amount added to each chosen DCT coefficient (BackdoorBench v2: 30)"),
        "channel_list": Key([1, 2], "channels whose coefficients are perturbed (BackdoorBench v2: [1, 2], U and V)"),
    }

    def validate(self) -> None:
        w = self.params["window_size"]
        side = self.image_size
        require(side % w == 0, f"ftrojan: window_size must divide the image side {side}, got {w}")
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
        mask = torch.zeros(1, 3, w, w, dtype=torch.float64)
        for c in ch:
            for r, col in pos:
                mask[0, c, r, col] += m
        # the pixel-domain pattern that the coefficient shift of every block adds
        self.pattern = blockwise_dct(mask.repeat(1, 1, side // w, side // w), w, inverse=True)

    def perturbed_float(self, images: torch.Tensor) -> torch.Tensor:
        """The perturbed image in the DCT's colour space, before truncation (float64)."""
        x = rgb_to_ycrcb(images) if self.params["yuv_flag"] else images.long()
        return x.double() + self.pattern.to(images.device)

    def apply(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        x = self.perturbed_float(images).clamp(0, 255).floor()  # astype(uint8), clamped instead of wrapped
        if self.params["yuv_flag"]:
            return ycrcb_to_rgb(x)
        return x.to(torch.uint8)


TRIGGER = TriggerFTrojan
