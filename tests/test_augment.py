"""Batched tensor transforms reproduce torchvision's PIL pipeline."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from utils.augment import (
    compensation_augment,
    gaussian_noise,
    grayscale,
    jpeg,
    random_crop,
    random_flip,
    random_grayscale,
    standard_augment,
    to_uint8,
)


def test_grayscale_equals_pil(small_train):
    x = small_train.images[:64]
    ours = grayscale(x)
    for i in range(len(x)):
        pil = Image.fromarray(x[i].permute(1, 2, 0).numpy()).convert("L").convert("RGB")
        assert np.array_equal(ours[i].permute(1, 2, 0).numpy(), np.asarray(pil))


def test_random_crop_takes_windows_of_the_zero_padded_image(small_train):
    x = small_train.images[:200]
    out = random_crop(x, torch.Generator().manual_seed(0), padding=4)
    padded = F.pad(x, (4, 4, 4, 4))
    seen = set()
    for i in range(len(x)):
        hits = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if torch.equal(padded[i, :, dy : dy + 32, dx : dx + 32], out[i])
        ]
        assert hits, f"image {i} is not a crop"
        seen.add(hits[0])
    assert len(seen) > 40  # offsets spread over the 81 possibilities


def test_flip_and_grayscale_probabilities(small_train):
    x = small_train.images[:400]
    g = torch.Generator().manual_seed(1)
    out = random_flip(x, g)
    flipped = torch.tensor([torch.equal(o, xi.flip(2)) and not torch.equal(o, xi) for o, xi in zip(out, x)])
    assert 0.4 < flipped.float().mean() < 0.6
    out = random_grayscale(x, g, p=0.4)
    gray = (out[:, 0] == out[:, 1]).flatten(1).all(1) & (out[:, 1] == out[:, 2]).flatten(1).all(1)
    assert 0.3 < gray.float().mean() < 0.5


def test_noise_is_requantised_like_topilimage(small_train):
    x = small_train.images[:8]
    out = gaussian_noise(x, torch.Generator().manual_seed(2), std=0.05)
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    expected = ((x.float() / 255 + 0.05 * n).clamp(0, 1) * 255).to(torch.uint8)  # ToPILImage truncates
    assert torch.equal(out, expected)
    assert torch.equal(
        to_uint8(torch.tensor([0.5 / 255, 254.6 / 255]), "round"), torch.tensor([0, 255], dtype=torch.uint8)
    )
    assert torch.equal(to_uint8(torch.tensor([0.9 / 255, 1.5])), torch.tensor([0, 255], dtype=torch.uint8))
    with pytest.raises(ValueError):
        to_uint8(torch.zeros(1), "floor")


def test_compensation_is_seeded_and_changes_images(small_train):
    x = small_train.images[:64]
    aug = compensation_augment(p=0.4, std=0.05)
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == x.shape
    assert not torch.equal(a, aug(x, torch.Generator().manual_seed(4)))
    plain = standard_augment(x, torch.Generator().manual_seed(3))
    assert (a.float() - plain.float()).abs().mean() > 1  # noise and grayscale on top of crop + flip


def test_jpeg_matches_pil(small_train):
    x = small_train.images[:4]
    out = jpeg(x, 10)
    for i in range(4):
        buf = io.BytesIO()
        Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=10)
        assert np.array_equal(out[i].permute(1, 2, 0).numpy(), np.asarray(Image.open(buf).convert("RGB")))
    with pytest.raises(ValueError):
        jpeg(x, 0)
