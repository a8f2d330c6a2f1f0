"""ECLIPSE's baseline defences beyond ISS and AT (``train.py --defense cutout|mixup|cutmix|op``):
each transform against its paper's formula written here on real CIFAR-10 images, the mixed
batch's loss in the one training loop, and each family end to end at tiny scale with its
options stored only with it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn as nn
import torch.nn.functional as F

import train
from utils.augment import beta_draw, cutmix, cutout, cutout_augment, mixup
from utils.baselines.projection import fit_linear_model, orthonormal_basis, project_images
from utils.data import CIFAR10_MEAN, CIFAR10_STD, ImageSet
from utils.trainer import TrainConfig, train_classifier

pytestmark = pytest.mark.usefixtures("one_thread")


def _cutout_reference(img: np.ndarray, centres: list[tuple[int, int]], length: int) -> np.ndarray:
    """DeVries & Taylor's Cutout of one HWC uint8 image at the given (row, column) centres, as
    their code applies it: the mask multiplies the normalised image (``Normalize`` with
    CIFAR-10's mean and std comes first); returned in [0, 1], denormalised."""
    h, w = img.shape[:2]
    mask = np.ones((h, w), np.float64)
    for y, x in centres:
        y1, y2 = np.clip(y - length // 2, 0, h), np.clip(y + length // 2, 0, h)
        x1, x2 = np.clip(x - length // 2, 0, w), np.clip(x + length // 2, 0, w)
        mask[y1:y2, x1:x2] = 0.0
    mean, std = np.array(CIFAR10_MEAN), np.array(CIFAR10_STD)
    normalised = (img / 255.0 - mean) / std
    return normalised * mask[..., None] * std + mean


@pytest.mark.parametrize(("length", "holes"), [(16, 1), (8, 2)])
def test_cutout_is_devries_mask_on_real_images(small_train, length: int, holes: int):
    x = small_train.images[:64]
    out = cutout(x, torch.Generator().manual_seed(3), length, holes)
    g = torch.Generator().manual_seed(3)  # the same draws: per hole, the rows' centres then the columns'
    draws = [(torch.randint(0, 32, (64,), generator=g), torch.randint(0, 32, (64,), generator=g)) for _ in range(holes)]
    assert out.dtype == torch.uint8 and out.shape == x.shape
    fill = torch.tensor([round(m * 255) for m in CIFAR10_MEAN], dtype=torch.uint8)  # the mean colour, in uint8
    for i in range(len(x)):
        centres = [(int(cy[i]), int(cx[i])) for cy, cx in draws]
        ref = _cutout_reference(x[i].permute(1, 2, 0).numpy(), centres, length)
        # the paper's square is the mean colour; uint8 rounds it to the nearest level
        np.testing.assert_allclose(out[i].permute(1, 2, 0).numpy() / 255.0, ref, rtol=0, atol=0.5 / 255 + 1e-9)
        cut = (out[i] != x[i]).any(0)
        assert (out[i][:, cut] == fill[:, None]).all() and torch.equal(out[i][:, ~cut], x[i][:, ~cut])
    # a square cut at the border is smaller, never larger; at most holes · length² pixels per image
    filled = ((out == fill[None, :, None, None]) & (x != out)).any(1).flatten(1).sum(1)
    assert filled.max() <= holes * length * length and filled.float().mean() > 0.3 * length * length


def test_cutout_fill_is_the_given_mean_in_float_and_uint8():
    x = torch.zeros(2, 3, 8, 8)
    out = cutout(x, torch.Generator().manual_seed(0), 16, 1, fill=(0.1, 0.2, 0.3))  # 16 > 8: the whole image
    assert torch.equal(out, torch.tensor([0.1, 0.2, 0.3])[None, :, None, None].expand_as(x))
    full = cutout(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.Generator().manual_seed(0), 8, 1, (0.5, 0.0, 1.0))
    assert full[0, :, 0, 0].tolist() == [128, 0, 255]
    with pytest.raises(ValueError, match="fill has 3 channels, the images 1"):
        cutout(torch.zeros(1, 1, 4, 4), torch.Generator().manual_seed(0), 8)


def test_cutout_augment_is_seeded():
    x = torch.randint(1, 256, (20, 3, 32, 32), dtype=torch.uint8)
    a = cutout_augment()(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, cutout_augment()(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, cutout_augment()(x, torch.Generator().manual_seed(6)))


def test_beta_draws_follow_beta():
    g = torch.Generator().manual_seed(0)
    for a in (0.2, 1.0):
        draws = [beta_draw(a, g) for _ in range(2000)]
        assert scipy.stats.kstest(draws, scipy.stats.beta(a, a).cdf).pvalue > 0.01


def test_mixup_is_zhang_formula(small_train):
    x = small_train.images[:32].float() / 255
    y = small_train.labels[:32]
    mixed, a, b, lam = mixup(0.4)(x, y, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    ref_lam = float(scipy.stats.beta(0.4, 0.4).ppf(float(torch.rand(1, generator=g)[0])))
    perm = torch.randperm(32, generator=g)
    assert lam == pytest.approx(ref_lam, abs=1e-12) and 0 <= lam <= 1
    torch.testing.assert_close(mixed, ref_lam * x + (1 - ref_lam) * x[perm], rtol=0, atol=1e-6)
    assert torch.equal(a, y) and torch.equal(b, y[perm])
    assert mixup(0.0)(x, y, torch.Generator())[3] == 1.0  # α = 0: no mixing


def _rand_bbox_reference(size: int, lam: float, cx: int, cy: int) -> tuple[int, int, int, int]:
    """CutMix's rand_bbox for a square image, the centre given."""
    cut = int(size * np.sqrt(1.0 - lam))
    return (
        int(np.clip(cx - cut // 2, 0, size)),
        int(np.clip(cy - cut // 2, 0, size)),
        int(np.clip(cx + cut // 2, 0, size)),
        int(np.clip(cy + cut // 2, 0, size)),
    )


def test_cutmix_is_yun_formula(small_train):
    x = small_train.images[:32].float() / 255
    y = small_train.labels[:32]
    mixed_any = 0
    for seed in range(12):
        mixed, a, b, lam = cutmix(1.0, 0.5)(x, y, torch.Generator().manual_seed(seed))
        g = torch.Generator().manual_seed(seed)
        if not float(torch.rand(1, generator=g)[0]) < 0.5:  # this batch trains unmixed
            assert mixed is x and lam == 1.0 and torch.equal(b, y)
            continue
        mixed_any += 1
        lam0 = float(scipy.stats.beta(1, 1).ppf(float(torch.rand(1, generator=g)[0])))
        perm = torch.randperm(32, generator=g)
        cx, cy = (int(v) for v in torch.randint(0, 32, (2,), generator=g))
        x1, y1, x2, y2 = _rand_bbox_reference(32, lam0, cx, cy)
        ref = x.clone()
        ref[:, :, x1:x2, y1:y2] = x[perm, :, x1:x2, y1:y2]
        assert torch.equal(mixed, ref) and torch.equal(b, y[perm]) and torch.equal(a, y)
        assert lam == pytest.approx(1 - (x2 - x1) * (y2 - y1) / 1024)
    assert 2 <= mixed_any <= 10


def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4096, 10))


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(epochs=2, batch_size=16, lr=0.05, test_every=2, channels_last=False, drop_last=False, **kw)


def test_mix_step_is_the_weighted_cross_entropy(small_train):
    """A mix that does not mix (λ = 1) trains exactly as no mix; a real one trains on
    λ·CE(a) + (1 − λ)·CE(b), checked on one step against that loss written here."""
    data = ImageSet(small_train.images[:48], small_train.labels[:48])
    cpu = torch.device("cpu")
    plain, same = _tiny_net(), _tiny_net()
    h0 = train_classifier(plain, data, lambda x, g: x, _cfg(), cpu, progress_bar=False, log=lambda m: None)
    h1 = train_classifier(
        same,
        data,
        lambda x, g: x,
        _cfg(),
        cpu,
        progress_bar=False,
        log=lambda m: None,
        mix=lambda x, y, g: (x, y, y, 1.0),
    )
    assert all(torch.equal(p, q) for p, q in zip(plain.state_dict().values(), same.state_dict().values()))
    assert [h["train_loss"] for h in h0] == [h["train_loss"] for h in h1]

    one = ImageSet(data.images[:16], data.labels[:16])
    perm = torch.arange(15, -1, -1)
    fixed = lambda x, y, g: (0.7 * x + 0.3 * x[perm], y, y[perm], 0.7)  # noqa: E731
    ours, ref = _tiny_net(), _tiny_net()
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05, test_every=1, channels_last=False, momentum=0.0)
    rec = train_classifier(ours, one, lambda x, g: x, cfg, cpu, progress_bar=False, log=lambda m: None, mix=fixed)[0]
    x = one.images[torch.randperm(16, generator=torch.Generator().manual_seed(0))].float() / 255
    y = one.labels[torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    out = ref(0.7 * x + 0.3 * x[perm])
    loss = 0.7 * F.cross_entropy(out, y) + 0.3 * F.cross_entropy(out, y[perm])
    loss.backward()
    opt.step()
    assert rec["train_loss"] == pytest.approx(loss.item(), rel=1e-6)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_orthogonal_projection_matches_its_formula_and_removes_a_classwise_shortcut(small_train):
    """OP on real images carrying one ±8/255 pattern per class: the linear model learns the
    patterns, the projection (their code's sequential formula) removes most of them."""
    g = torch.Generator().manual_seed(0)
    patterns = (torch.randint(0, 2, (10, 3, 32, 32), generator=g) * 2 - 1) * 8
    poisoned = (small_train.images.int() + patterns[small_train.labels]).clamp(0, 255).to(torch.uint8)
    data = ImageSet(poisoned, small_train.labels)
    fit = fit_linear_model(data, 10, epochs=20, lr=0.05, batch_size=10, seed=0, log=lambda m: None)
    assert fit.weights.shape == (10, 3072) and fit.last_epoch_running_acc > 90
    basis = orthonormal_basis(fit.weights)
    torch.testing.assert_close(basis @ basis.T, torch.eye(10, dtype=torch.float64), rtol=0, atol=1e-10)
    projected, clipped = project_images(poisoned, basis, chunk=150)
    # the reference: each image minus its dot product with each orthonormal row, in turn
    flat = poisoned.flatten(1).double().numpy() / 255
    for q in basis.numpy():
        flat = flat - (flat @ q)[:, None] * q[None]
    ref = np.round(np.clip(flat, 0, 1) * 255).astype(np.uint8).reshape(poisoned.shape)
    assert (projected.numpy().astype(int) - ref).__abs__().max() <= 1 and (projected.numpy() == ref).mean() > 0.999
    assert 0 <= clipped < 0.2 and clipped == pytest.approx(float(((flat < 0) | (flat > 1)).mean()))
    shortcut = patterns.flatten(1).double() / 255
    left = shortcut - (shortcut @ basis.T) @ basis
    assert float((left @ basis.T).abs().max()) < 1e-10  # the patterns' share along the weights is gone
    # and that share is large: 0.70 of the patterns' norm is left (measured, 1 and 2 threads)
    assert float(left.norm() / shortcut.norm()) < 0.8
    # and what is left of the patterns in the images is much less than before
    residue = (projected.double() - small_train.images.double()).flatten(1) / 255
    before = (poisoned.double() - small_train.images.double()).flatten(1) / 255
    own = shortcut[small_train.labels]
    per_image = lambda d: (d * own).sum(1) / own.norm(dim=1) ** 2  # noqa: E731 - the pattern's coefficient
    assert per_image(residue).abs().mean() < 0.5 * per_image(before).abs().mean()


COMMON = ["--poison", "clean", "--subset", "100", "--arch", "resnet18", "--width", "8", "--epochs", "1"]


@pytest.mark.parametrize(
    ("defense", "flags"),
    [
        ("cutout", ["--cutout_length", "8"]),
        ("mixup", ["--mixup_alpha", "0.5"]),
        ("cutmix", ["--cutmix_prob", "1"]),
        ("op", ["--op_epochs", "3", "--op_batch_size", "50"]),
    ],
)
def test_train_defence_end_to_end(tmp_path, defense: str, flags: list[str]):
    argv = [*COMMON, "--defense", defense, *flags, "--batch_size", "50", "--test_subset", "100"]
    train.main([*argv, "--precision", "fp32", "--work_dir", str(tmp_path)])
    res = json.loads((tmp_path / f"runs/train/clean-{defense}-resnet18-w8-s0-n100/result.json").read_text())
    others = {k for d, keys in train.DEFENSE_KEYS.items() if d != defense for k in keys}
    assert set(train.DEFENSE_KEYS[defense]) <= set(res["settings"]) and not others & set(res["settings"])
    assert res["settings"]["defense"] == defense and len(res["history"]) == 1
    assert math.isfinite(res["final_test_acc"]) and math.isfinite(res["history"][0]["train_loss"])
    assert ("op" in res) == (defense == "op")
    if defense == "op":
        assert 0 <= res["op"]["clipped_share"] < 1 and 0 <= res["op"]["linear_train_acc"] <= 100


def test_defence_option_defaults_and_ranges():
    a = train.parse_args(["--defense", "mixup"])
    assert (a.cutout_length, a.cutout_holes, a.mixup_alpha, a.cutmix_beta, a.cutmix_prob) == (16, 1, 1.0, 1.0, 0.5)
    assert (a.op_epochs, a.op_lr, a.op_batch_size) == (20, 0.1, 1024)
    assert a.run_name == "EM-mixup-resnet18-s0"
    for bad in (["--cutout_length", "0"], ["--mixup_alpha", "-1"], ["--cutmix_prob", "1.5"], ["--op_lr", "0"]):
        with pytest.raises(train.UserError, match=bad[0]):
            train.parse_args(["--defense", "cutmix", *bad])


def test_each_defence_option_belongs_to_one_defence_choice():
    """Every option declared in utils/baselines/keys.py is stored with exactly one defence, and
    that defence is a ``train.py --defense`` choice; train.py takes them all as flags."""
    from utils.baselines.keys import DEFENSE_KEYS, DEFENSE_OPTIONS

    owned = [k for keys in DEFENSE_KEYS.values() for k in keys]
    assert sorted(owned) == sorted(DEFENSE_OPTIONS) and len(owned) == len(set(owned))
    assert set(DEFENSE_KEYS) <= set(train.KEYS["defense"].choices)
    assert set(DEFENSE_OPTIONS) <= set(train.KEYS)
