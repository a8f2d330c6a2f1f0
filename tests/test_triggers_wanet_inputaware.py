"""WaNet's and Input-aware's poisoned sets against what BackdoorBench v1 saves
(attack/wanet_attack.py, attack/inputaware_attack.py): which samples are poisoned and
cross, how cross samples are marked, how images become uint8, and the per-batch
probabilities of WaNet's crop and rotation. The references are written here from the
reference's own operations, not by calling the code under test."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from utils.augment import crop_rotate_flip
from utils.dataelixir import defence as de
from utils.dataelixir.attack_data import build_backdoor_data
from utils.dataelixir.triggers import TRIGGERS
from utils.dataelixir.triggers.inputaware import EncoderDecoder
from utils.dataelixir.triggers.wanet import batch_selection

CPU = torch.device("cpu")

# BackdoorBench v1's CIFAR-10 Normalize and its inverse pair (Normalize(0, 1/std), Normalize(-mean, 1))
BB_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
BB_STD = torch.tensor([0.247, 0.243, 0.261]).view(1, 3, 1, 1)
BB_INV_STD = torch.tensor([1 / 0.247, 1 / 0.243, 1 / 0.261]).view(1, 3, 1, 1)
BB_NEG_MEAN = torch.tensor([-0.4914, -0.4822, -0.4465]).view(1, 3, 1, 1)


def loader_tensor(images: torch.Tensor) -> torch.Tensor:
    """ToTensor (``div(255)``) then Normalize (``sub_(mean).div_(std)``)."""
    return images.float().div(255).sub(BB_MEAN).div(BB_STD)


def saved_uint8(xn: torch.Tensor) -> torch.Tensor:
    """The denormaliser, then ToPILImage's ``mul(255).byte()`` (values stay in [0, 255] up to float error)."""
    d = xn.div(BB_INV_STD).sub(BB_NEG_MEAN).mul(255)
    return d.clamp(0, 255).to(torch.uint8)


def reference_selection(n: int, pratio: float, cross_ratio: float, bs: int = 128) -> tuple[list[int], list[int]]:
    """Unshuffled loader: per batch, ``num_bd = int(pratio * bs)``, ``num_cross = int(num_bd * cross_ratio)``."""
    poison, cross = [], []
    for start in range(0, n, bs):
        b = min(bs, n - start)
        num_bd = int(pratio * b)
        num_cross = int(num_bd * cross_ratio)
        poison += range(start, start + num_bd)
        cross += range(start + num_bd, start + num_bd + num_cross)
    return poison, cross


def test_per_batch_counts_are_backdoorbench_v1s():
    poison, cross = batch_selection(50000, 0.1, 2.0, 128, seed=0)
    ref_p, ref_c = reference_selection(50000, 0.1, 2.0)
    assert poison.tolist() == ref_p and cross.tolist() == ref_c
    assert (len(poison), len(cross)) == (4688, 9376)
    # Input-aware: num_cross = num_bd
    poison, cross = batch_selection(50000, 0.1, 1.0, 128, seed=0)
    assert (len(poison), len(cross)) == (4688, 4688)
    # below one poisoned sample per batch: each batch has one with probability pratio * bs
    poison, _ = batch_selection(128 * 2000, 1 / 1280, 2.0, 128, seed=0)
    assert abs(len(poison) / 2000 - 0.1) < 0.03


def test_wanet_poisoned_set_is_v1s_saved_bd_train(small_train, small_test, tmp_path):
    d = build_backdoor_data("wanet", {}, small_train, small_test, CPU, tmp_path, log=lambda _m: None)
    ref_p, ref_c = reference_selection(len(small_train), 0.1, 2.0)
    marked = torch.zeros(len(small_train), dtype=torch.bool)
    marked[ref_p + ref_c] = True
    # v1 marks the cross samples as poisoned (one_hot[:num_bd + num_cross] = 1)
    assert torch.equal(d.poison_indicator, marked)
    assert d.info["n_poisoned"] == len(ref_p) and d.info["cross_indices"] == ref_c
    assert (d.train.labels[ref_p] == 0).all() and torch.equal(d.train.labels[ref_c], small_train.labels[ref_c])
    # TPR's denominator is poisoned + cross, FPR's the rest (DataElixir divides by poison_indicator == 1 / 0)
    rates = de.tpr_fpr(d.train.labels, d.train.labels, d.poison_indicator)
    assert (rates.n_poisoned, rates.n_clean) == (len(ref_p) + len(ref_c), len(small_train) - len(ref_p) - len(ref_c))
    # warped on normalised tensors, denormalised, truncated
    grid = TRIGGERS["wanet"]({}, seed=2022).grid
    x = small_train.images[ref_p]
    warped = F.grid_sample(loader_tensor(x), grid.repeat(len(x), 1, 1, 1), align_corners=True)
    assert torch.equal(d.train.images[ref_p], saved_uint8(warped))
    rounded = F.grid_sample(x.float(), grid.repeat(len(x), 1, 1, 1), align_corners=True).round()
    assert (d.train.images[ref_p].float() != rounded).float().mean() > 0.3  # the old rounding differs
    # test images likewise (v1's bd_test goes through the same to_pil)
    keep = small_test.labels != 0
    xt = small_test.images[keep]
    wt = F.grid_sample(loader_tensor(xt), grid.repeat(len(xt), 1, 1, 1), align_corners=True)
    assert torch.equal(d.test_bd.images, saved_uint8(wt))


def test_wanet_options_give_the_previous_set(small_train, small_test, tmp_path):
    cfg = {"selection": "random", "cross_poisoned": False, "quantize": "round"}
    d = build_backdoor_data("wanet", cfg, small_train, small_test, CPU, tmp_path, log=lambda _m: None)
    assert int(d.poison_indicator.sum()) == round(0.1 * len(small_train)) == d.info["n_poisoned"]
    assert not d.poison_indicator[d.info["cross_indices"]].any()
    p = d.poison_indicator
    grid = TRIGGERS["wanet"]({}, seed=2022).grid
    x = small_train.images[p]
    rounded = F.grid_sample(x.float(), grid.repeat(len(x), 1, 1, 1), align_corners=True).round().to(torch.uint8)
    assert torch.equal(d.train.images[p], rounded)


@pytest.mark.parametrize("quantize", ["truncate", "round"])
def test_inputaware_images_are_converted_as_v1_saves_them(small_train, quantize):
    torch.manual_seed(0)
    trig = TRIGGERS["inputaware"]({"gen_width": 4, "quantize": quantize}, seed=2022)
    gen, mgen = EncoderDecoder(3, 4).eval(), EncoderDecoder(1, 4).eval()
    trig.gen, trig.mgen = gen, mgen
    x, s = small_train.images[:16], small_train.images[16:32]
    with torch.no_grad():
        src = (s.float() / 255).contiguous(memory_format=torch.channels_last)
        pattern = (torch.tanh(gen(src)) + 1) / 2
        # BackdoorBench's threshold of its mask output
        mask = torch.tanh(20 * ((torch.tanh(mgen(src)) + 1) / 2) - 10) / 2 + 0.5
        out = trig.triggered(x, s)
    if quantize == "truncate":
        xn = loader_tensor(x)
        ref = saved_uint8(xn + (pattern.sub(BB_MEAN).div(BB_STD) - xn) * mask)
    else:
        xf = x.float() / 255
        ref = (xf + (pattern - xf) * mask).clamp(0, 1).mul(255).round().to(torch.uint8)
    # the mask formula is rewritten here (tanh(10 tanh z) in the code): allow float-level flips
    assert (out != ref).float().mean() < 1e-3 and (out.int() - ref.int()).abs().max() <= 1


def _changed(batch: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return (out != batch).flatten(1).any(1)


def test_crop_and_rotation_probabilities_are_drawn_per_batch():
    x = torch.full((64, 3, 32, 32), 255, dtype=torch.uint8)  # a flip leaves it unchanged
    # WaNet's ProbTransform(RandomCrop, p=0.8): the whole batch or nothing
    crop = crop_rotate_flip(5, 0.0, crop_p=0.5)
    fractions = [_changed(x, crop(x, torch.Generator().manual_seed(i))).float().mean().item() for i in range(40)]
    assert all(f == 0 or f > 0.9 for f in fractions)  # an offset of exactly 5 keeps 1/121 unchanged
    assert 5 < sum(f > 0 for f in fractions) < 35
    # ProbTransform(RandomRotation, p=0.5) around kornia's per-image p: all-or-none, then per image
    rot = crop_rotate_flip(5, 10.0, crop_p=0.0, rotation_p=0.5, mode="bilinear")
    fractions = [_changed(x, rot(x, torch.Generator().manual_seed(i))).float().mean().item() for i in range(40)]
    assert all(f == 0 or f > 0.85 for f in fractions) and 5 < sum(f > 0 for f in fractions) < 35
    rot = crop_rotate_flip(5, 10.0, crop_p=0.0, rotation_p=1.0, mode="bilinear", rotation_image_p=0.5)
    f = _changed(x, rot(x, torch.Generator().manual_seed(0))).float().mean().item()
    assert 0.25 < f < 0.75
