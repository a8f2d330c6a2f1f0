"""SSBA's StegaStamp training and LF's low-pass filter against BackdoorBench's definitions.

The expected values are written here from what BackdoorBench's code computes
(``resource/ssba/train.py`` + ``models.py`` run with ``--use_residual 0``;
``resource/lowFrequency/gauss_smooth.py``), not by calling the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from utils.dataelixir.triggers import TRIGGERS
from utils.dataelixir.triggers.lf import gaussian_lowpass
from utils.dataelixir.triggers.ssba import ImageLossSchedule, StegaEncoder

# --------------------------------------------------------------------------- LF


def _gauss_smooth_taps(sig: float = 6.0) -> np.ndarray:
    """gauss_smooth's kernel: kernel_size = 5 sig taps on a grid centred at
    (kernel_size - 1) / 2, stretched by 5 and read against a Gaussian of std 5 sig."""
    size = int(5 * sig)
    grid = (np.arange(size) - (size - 1) / 2) * 5
    k = np.exp(-0.5 * (grid / (5 * sig)) ** 2)
    return k / k.sum()


def _gauss_smooth_1d_response(source: int, n: int = 32, sig: float = 6.0) -> np.ndarray:
    """Response along one axis to an impulse at ``source``: gauss_smooth pads
    ``size // 2 - 1`` zeros before (even size) and cross-correlates, so output ``r`` reads
    input ``r + j - pad`` with tap ``j``."""
    k = _gauss_smooth_taps(sig)
    pad = len(k) // 2 - (1 - len(k) % 2)
    out = np.zeros(n)
    for r in range(n):
        j = source - r + pad
        if 0 <= j < len(k):
            out[r] = k[j]
    return out


@pytest.mark.parametrize("row, col", [(16, 16), (0, 31), (31, 5)])
def test_lf_lowpass_impulse_response_is_gauss_smooths(row: int, col: int) -> None:
    v = torch.zeros(1, 3, 32, 32, dtype=torch.float64)
    v[0, :, row, col] = 1.0
    out = gaussian_lowpass(v, 6.0)
    want = np.outer(_gauss_smooth_1d_response(row), _gauss_smooth_1d_response(col))
    for c in range(3):
        np.testing.assert_allclose(out[0, c].numpy(), want, rtol=1e-9, atol=1e-15)


def test_lf_lowpass_has_30_taps_and_a_half_pixel_offset() -> None:
    v = torch.zeros(1, 1, 64, 64, dtype=torch.float64)
    v[0, 0, 32, 32] = 1.0
    rows = gaussian_lowpass(v, 6.0)[0, 0].sum(1)
    assert int((rows > 0).sum()) == 30
    centroid = float((rows * torch.arange(64, dtype=torch.float64)).sum() / rows.sum())
    assert centroid == pytest.approx(31.5, abs=1e-9)


# --------------------------------------------------------------------------- SSBA


def test_ssba_defaults_are_backdoorbenchs() -> None:
    p = TRIGGERS["ssba"]({}).params
    assert (p["ssba_output"], p["ssba_l2_schedule"], p["ssba_l2_weight"], p["ssba_bits"]) == (
        "image",
        "bit_acc",
        10.0,
        100,
    )


def _constant_encoder(bits: int, logits: tuple[float, float, float]) -> StegaEncoder:
    """An encoder whose last layer outputs ``logits`` per channel, whatever the input."""
    enc = StegaEncoder(bits, 4)
    with torch.no_grad():
        enc.out.weight.zero_()
        enc.out.bias.copy_(torch.tensor(logits))
        enc.direct.weight.zero_()
        enc.direct.bias.zero_()
    return enc.eval()


def test_ssba_encoder_output_is_the_encoded_image(small_train) -> None:
    logits = (-1.0, 0.25, 2.0)
    images = small_train.images[:8]
    # --use_residual 0: the encoded image is sigmoid(last layer), the clean image is not added
    t = TRIGGERS["ssba"]({"ssba_bits": 8, "aux_width": 4})
    t.encoder = _constant_encoder(8, logits)
    out = t.apply(images)
    want = torch.tensor([round(255 / (1 + math.exp(-z))) for z in logits], dtype=torch.uint8)
    assert torch.equal(out, want.view(1, 3, 1, 1).expand_as(out))
    # the residual option adds the last layer's output to the image and clamps
    r = TRIGGERS["ssba"]({"ssba_bits": 8, "aux_width": 4, "ssba_output": "residual"})
    r.encoder = _constant_encoder(8, logits)
    want_r = (images.double() / 255 + torch.tensor(logits, dtype=torch.float64).view(1, 3, 1, 1)).clamp(0, 1)
    assert (r.apply(images).double() - (want_r * 255).round()).abs().max() <= 1


def _reference_l2_weights(accs: list[float], weight: float, wait: int, ramp: int) -> list[float]:
    """train.py's loop: the weight is computed from steps_since_l2_loss_activated (-1 until
    a batch's bit accuracy exceeds 0.9, then 0 at that step and +1 per later step)
    before each step runs."""
    since, out = -1, []
    for acc in accs:
        out.append(min(max(0, weight * (since - wait) / ramp), weight))
        if since == -1:
            if acc > 0.9:
                since = 0
        else:
            since += 1
    return out


def _run(schedule: ImageLossSchedule, accs: list[float]) -> list[float]:
    out = []
    for step, acc in enumerate(accs):
        out.append(schedule.at(step))
        schedule.observe(acc)
    return out


def test_ssba_image_loss_waits_for_bit_accuracy_then_ramps() -> None:
    rng = np.random.default_rng(0)
    # below 0.9 for 300 steps (0.9 itself does not count), above once, then anything
    accs = [0.5] * 299 + [0.9, 0.93] + list(rng.uniform(0.6, 1.0, 4500))
    reference_steps = 20 * (50000 // 64)  # the README's run, in whole batches
    for total in (reference_steps, 3 * reference_steps):  # a longer run is not stretched
        got = _run(ImageLossSchedule(10.0, "bit_acc", total), accs)
        want = _reference_l2_weights(accs, 10.0, 1000, 3000)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    assert got[1300] == 0 and got[1302] > 0 and got[4301] == 10.0
    # never above 0.9: never any image loss
    assert set(_run(ImageLossSchedule(10.0, "bit_acc", reference_steps), [0.89] * 5000)) == {0.0}


def test_ssba_image_loss_schedule_scales_with_a_shorter_run() -> None:
    # the CPU scale: 5000 images in batches of 64 for 10 epochs; 1000 and 3000 steps scaled
    # by 780 / 15620 and rounded: 50 and 150
    total = 10 * (5000 // 64)
    accs = [0.7] * 40 + [0.95] + [0.8] * (total - 41)
    got = _run(ImageLossSchedule(10.0, "bit_acc", total), accs)
    wait, ramp = round(1000 * total / 15620), round(3000 * total / 15620)
    assert (wait, ramp) == (50, 150)
    np.testing.assert_allclose(got, _reference_l2_weights(accs, 10.0, wait, ramp), rtol=1e-12, atol=0)


def test_ssba_fraction_schedule_ignores_bit_accuracy() -> None:
    total = 1000
    got = _run(ImageLossSchedule(10.0, "fraction", total), [0.5] * total)
    want = [10.0 * min(1.0, max(0.0, (s - 300) / 400)) for s in range(total)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
