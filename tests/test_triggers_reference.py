"""Triggers and training recipes against BackdoorBench's arithmetic, on real CIFAR-10 images.

Each reference below is our own numpy re-derivation of what the reference code computes
(BackdoorBench v1 / v2 and DataElixir's fork), written independently of the
implementation under test: loops, scipy's DCT, OpenCV's documented fixed-point colour
formulas.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.fft import dctn, idctn

from utils.augment import crop_rotate_flip, random_rotate, rotate
from utils.dataelixir.attack_data import build_backdoor_data
from utils.dataelixir.keys import FlowConfig, all_known_keys, attack_keys
from utils.dataelixir.models import train_augment, train_config
from utils.dataelixir.triggers import TRIGGERS
from utils.dataelixir.triggers.inputaware import diversity_loss, mask_nonlinearity
from utils.options import parse_config
from utils.trainer import TrainConfig, lr_at

CPU = torch.device("cpu")


def hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


# --------------------------------------------------------------------------- BadNets


def test_badnet_keeps_the_image_where_the_patch_is_zero(small_train, cifar_test):
    # the fork's resource/badnet/bottom_right_4by4_color.npy, HWC
    ref_patch = np.zeros((32, 32, 3), dtype=np.uint8)
    ref_patch[28:30, 28:30] = (255, 255, 0)
    ref_patch[28:30, 30:32] = (255, 0, 255)
    ref_patch[30:32, 28:30] = (0, 255, 255)
    ref_patch[30:32, 30:32] = (122, 122, 122)
    trig = TRIGGERS["badnet"]({})
    for data in (small_train.images, cifar_test.images[:500]):
        img = hwc(data)
        expect = img * (ref_patch == 0) + ref_patch * (ref_patch > 0)  # AddMaskPatchTrigger
        assert np.array_equal(hwc(trig.apply(data)), expect)
    # the yellow block keeps the image's blue channel (the old code wrote 0 there)
    out = trig.apply(small_train.images)
    assert torch.equal(out[:, 2, 28:30, 28:30], small_train.images[:, 2, 28:30, 28:30])
    assert (small_train.images[:, 2, 28:30, 28:30] > 0).any()


# --------------------------------------------------------------------------- FTrojan


def _ycrcb(img: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit RGB -> YCrCb: 14-bit fixed point, round half up, saturate."""
    r, g, b = (img[..., i].astype(np.int64) for i in range(3))
    y = np.right_shift(4899 * r + 9617 * g + 1868 * b + 8192, 14)
    cr = np.right_shift(11682 * (r - y) + 128 * 16384 + 8192, 14)
    cb = np.right_shift(9241 * (b - y) + 128 * 16384 + 8192, 14)
    return np.clip(np.stack([y, cr, cb], -1), 0, 255)


def _rgb(yuv: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit YCrCb -> RGB."""
    y, cr, cb = (yuv[..., i].astype(np.int64) for i in range(3))
    cr, cb = cr - 128, cb - 128
    r = y + np.right_shift(22987 * cr + 8192, 14)
    g = y + np.right_shift(-11698 * cr - 5636 * cb + 8192, 14)
    b = y + np.right_shift(29049 * cb + 8192, 14)
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def _ftrojan_reference(img: np.ndarray, channels, window, positions, magnitude) -> np.ndarray:
    """BackdoorBench v2's ftrojann: YUV, block DCT, += magnitude, IDCT, astype(uint8)
    (clamped here, as ours), YUV -> RGB. Untouched channels skip the float round trip."""
    yuv = _ycrcb(img).astype(np.float64)
    out = yuv.copy()
    for ch in channels:
        for r0 in range(0, 32, window):
            for c0 in range(0, 32, window):
                block = dctn(yuv[r0 : r0 + window, c0 : c0 + window, ch], norm="ortho")
                for pr, pc in positions:
                    block[pr, pc] += magnitude
                out[r0 : r0 + window, c0 : c0 + window, ch] = idctn(block, norm="ortho")
    return _rgb(np.floor(np.clip(out, 0, 255)))


def test_ftrojan_defaults_are_backdoorbench_v2():
    p = TRIGGERS["ftrojan"]({}).params
    assert p == {
        "yuv_flag": True,
        "window_size": 32,
        "pos_list": [[15, 15], [31, 31]],
        "magnitude": 30.0,
        "channel_list": [1, 2],
    }


@pytest.mark.parametrize(
    "params",
    [{}, {"window_size": 8, "pos_list": [[7, 7], [3, 5]], "magnitude": 50.0, "channel_list": [0, 1, 2]}],
)
def test_ftrojan_equals_the_reference_arithmetic(params, small_train, cifar_test):
    trig = TRIGGERS["ftrojan"](params)
    p = trig.params
    for data in (small_train.images[:200], cifar_test.images[:200]):
        expect = np.stack(
            [
                _ftrojan_reference(im, p["channel_list"], p["window_size"], p["pos_list"], p["magnitude"])
                for im in hwc(data)
            ]
        )
        assert np.array_equal(hwc(trig.apply(data)), expect)


def test_ftrojan_colour_conversion_is_opencvs():
    # every value of a 64^3 grid of colours, both directions
    v = torch.arange(0, 256, 4, dtype=torch.uint8)
    grid = torch.stack(torch.meshgrid(v, v, v, indexing="ij")).reshape(1, 3, 512, 512)
    from utils.dataelixir.triggers.ftrojan import rgb_to_ycrcb, ycrcb_to_rgb

    assert np.array_equal(hwc(rgb_to_ycrcb(grid))[0], _ycrcb(hwc(grid)[0]))
    assert np.array_equal(hwc(ycrcb_to_rgb(grid.long()))[0], _rgb(hwc(grid)[0]))


# --------------------------------------------------------------------------- SIG


def test_sig_equals_the_reference_arithmetic(small_train, cifar_test):
    trig = TRIGGERS["sig"]({})
    for data in (small_train.images, cifar_test.images[:500]):
        img = hwc(data)
        pattern = np.zeros(img.shape[1:], dtype=np.float32)
        for j in range(32):  # sigTriggerAttack: delta * sin(2 pi j f / m) along the columns
            pattern[:, j] = 40 * np.sin(2 * np.pi * j * 6 / 32)
        expect = np.uint8(np.clip(np.uint32(img) + pattern, 0, 255))
        assert np.array_equal(hwc(trig.apply(data)), expect)


# --------------------------------------------------------------------------- LC


# BackdoorBench v1's labelConsistentAttack "bottom-right" trigger: ((row, col), sign)
V1_BOTTOM_RIGHT = [
    ((-1, -1), 1),
    ((-1, -2), -1),
    ((-1, -3), 1),
    ((-2, -1), -1),
    ((-2, -2), 1),
    ((-2, -3), -1),
    ((-3, -1), 1),
    ((-3, -2), -1),
    ((-3, -3), -1),
]


def _lc_reference(img: np.ndarray, amplitude: float = 1.0) -> np.ndarray:
    out = img.astype(np.float32)
    for (r, c), sign in V1_BOTTOM_RIGHT:
        out[:, r, c] += 255 * sign * amplitude
    return np.clip(out, 0, 255).astype(np.uint8)


def test_lc_default_trigger_is_v1_bottom_right(small_train, cifar_test):
    trig = TRIGGERS["lc"]({})
    assert trig.params["lc_trigger"] == "bottom-right" and trig.params["lc_test_pgd"] is True
    for data in (small_train.images, cifar_test.images[:500]):
        assert np.array_equal(hwc(trig.add_trigger(data)), _lc_reference(hwc(data)))
    half = TRIGGERS["lc"]({"reduced_amplitude": 0.5})
    assert np.array_equal(hwc(half.add_trigger(small_train.images)), _lc_reference(hwc(small_train.images), 0.5))


TINY_LC = {"aux_width": 4, "aux_epochs": 1, "aux_subset": 100, "aux_batch_size": 50, "at_steps": 1, "adv_steps": 3}


@pytest.fixture(scope="module")
def lc_sets(small_train, small_test):
    return small_train.subset(torch.arange(0, 400, 4)), small_test.subset(torch.arange(0, 200, 4))


def test_lc_asr_on_pgd_test_images_is_an_option(lc_sets, tmp_path):
    train, test = lc_sets
    msgs: list[str] = []
    d = build_backdoor_data("lc", dict(TINY_LC), train, test, CPU, tmp_path, log=msgs.append)
    trig = TRIGGERS["lc"](dict(TINY_LC))
    trig.prepare(train, CPU, tmp_path, log=msgs.append)  # loads the cached model
    src = test.subset(torch.nonzero(test.labels != 0).flatten())
    # default (v1): PGD against the true labels, then the trigger
    expect = trig.add_trigger(trig.adversarial(src.images, src.labels))
    assert torch.equal(d.test_bd.images, expect) and torch.equal(d.test_ra.images, expect)
    assert not torch.equal(d.test_bd.images, trig.add_trigger(src.images))
    assert "adversarial_test_images" in d.info["aux"]
    # the option: the trigger alone, like every other attack
    d2 = build_backdoor_data("lc", dict(TINY_LC, lc_test_pgd=False), train, test, CPU, tmp_path, log=msgs.append)
    assert torch.equal(d2.test_bd.images, trig.add_trigger(src.images))
    assert torch.equal(d2.train.images, d.train.images)  # training poisons are the same either way
    # a second run loads the cached adversarial test images
    msgs.clear()
    d3 = build_backdoor_data("lc", dict(TINY_LC), train, test, CPU, tmp_path, log=msgs.append)
    assert torch.equal(d3.test_bd.images, d.test_bd.images)
    assert any("adversarial test images" in m and "loaded" in m for m in msgs), msgs


# --------------------------------------------------------------------------- Input-aware


def test_inputaware_mask_is_backdoorbenchs_threshold_of_tanh():
    z = torch.linspace(-3, 3, 601, dtype=torch.float64)
    m = torch.tanh(z) / 2 + 0.5  # netM's output
    expect = torch.tanh(20 * m - 10) / 2 + 0.5  # netM.threshold
    assert torch.allclose(mask_nonlinearity(z), expect, atol=1e-12)
    # not the old tanh(20 z)/2 + 1/2
    assert (mask_nonlinearity(z) - (torch.tanh(20 * z) / 2 + 0.5)).abs().max() > 0.1


def test_inputaware_diversity_is_a_mean_of_per_pair_ratios():
    x1 = torch.zeros(2, 3, 2, 2)
    x2 = torch.stack([torch.full((3, 2, 2), 1.0), torch.full((3, 2, 2), 3.0)])
    o1 = torch.zeros(2, 1, 2, 2)
    o2 = torch.stack([torch.full((1, 2, 2), 2.0), torch.full((1, 2, 2), 0.5)])
    # pair 0: RMS 1 / RMS 2 = 0.5; pair 1: 3 / 0.5 = 6  -> mean 3.25
    assert diversity_loss(x1, x2, o1, o2).item() == pytest.approx(3.25, rel=1e-6)
    # a batch-level ratio would give mean distance 2 / mean distance 1.25 = 1.6
    assert diversity_loss(x1, x2, o1, o2).item() != pytest.approx(1.6, rel=1e-2)


# --------------------------------------------------------------------------- rotation, schedule


def test_rotation_is_exact_for_right_angles_and_zero(small_train):
    x = small_train.images[:16]
    assert torch.equal(rotate(x, torch.zeros(16)), x)
    assert torch.equal(rotate(x, torch.full((16,), 90.0)), torch.rot90(x, 1, (2, 3)))
    assert torch.equal(rotate(x, torch.full((16,), 180.0)), x.flip(2, 3))
    # per-image angles: image i rotated by its own angle
    angles = torch.tensor([0.0, 90.0] * 8)
    out = rotate(x, angles)
    assert torch.equal(out[0::2], x[0::2]) and torch.equal(out[1::2], torch.rot90(x[1::2], 1, (2, 3)))


def test_random_rotation_range_fill_and_determinism(small_train):
    x = torch.full((64, 3, 32, 32), 200, dtype=torch.uint8)
    out = random_rotate(x, torch.Generator().manual_seed(0), 10.0)
    assert torch.equal(out, random_rotate(x, torch.Generator().manual_seed(0), 10.0))
    # a constant image stays constant except for zero-filled corners; at most 10 degrees
    # the zeros stay within the corner triangles (|tan 10 deg| * 16 ~ 2.8 pixels from the edge)
    changed = (out != 200).any(1)
    assert changed.any() and (out[out != 200] == 0).all()
    assert not changed[:, 4:-4, 4:-4].any()
    # p = 0 leaves every image alone; bilinear works on real images and stays uint8
    assert torch.equal(random_rotate(small_train.images, torch.Generator(), 10.0, p=0.0), small_train.images)
    b = random_rotate(small_train.images[:8], torch.Generator().manual_seed(1), 10.0, mode="bilinear")
    assert b.dtype == torch.uint8 and not torch.equal(b, small_train.images[:8])
    # crop + rotation + flip: the same draws give the same batch
    aug = crop_rotate_flip(5, 10.0)
    y1 = aug(small_train.images[:32], torch.Generator().manual_seed(3))
    assert torch.equal(y1, aug(small_train.images[:32], torch.Generator().manual_seed(3)))
    assert y1.shape == (32, 3, 32, 32) and y1.dtype == torch.uint8


def test_multistep_schedule_is_multisteplr():
    cfg = TrainConfig(epochs=300, lr=0.01, schedule="multistep", milestones=(100, 200), gamma=0.1)
    lrs = [lr_at(cfg, e, 0, 10) for e in range(300)]
    assert lrs[0] == lrs[99] == 0.01
    assert lrs[100] == pytest.approx(0.001) and lrs[199] == pytest.approx(0.001)
    assert lrs[200] == pytest.approx(1e-4)


# --------------------------------------------------------------------------- YAML defaults per attack


def _resolved(attack: str) -> dict:
    cfg, _ = parse_config(
        f"attack/{attack}.py",
        ["--yaml_path", f"config/{attack}/cifar10.yaml"],
        attack_keys(attack),
        known_elsewhere=all_known_keys(),
    )
    return cfg


@pytest.mark.parametrize(
    "attack, expect",
    [
        (
            "wanet",
            {
                "lr_scheduler": "MultiStepLR",
                "steplr_milestones": [100, 200, 300, 400],
                "steplr_gamma": 0.1,
                "train_augment": "crop_rotate_flip",
                "random_crop": 5,
                "random_rotation": 10.0,
                "crop_prob": 0.8,
                "rotation_prob": 0.5,
                "rotation_image_prob": 0.5,
                "rotation_interp": "bilinear",
            },
        ),
        (
            "inputaware",
            {
                "lr_scheduler": "MultiStepLR",
                "steplr_milestones": [100, 200, 300, 400],
                "train_augment": "crop_rotate_flip",
                "random_crop": 5,
                "random_rotation": 10.0,
                "crop_prob": 1.0,
                "rotation_prob": 1.0,
                "rotation_image_prob": 1.0,
                "rotation_interp": "nearest",
            },
        ),
        ("badnet", {"lr_scheduler": "CosineAnnealingLR", "train_augment": "crop_flip"}),
        ("lc", {"lc_trigger": "bottom-right", "lc_test_pgd": True, "lr_scheduler": "CosineAnnealingLR"}),
        ("ftrojan", {"magnitude": 30.0, "channel_list": [1, 2], "pos_list": [[15, 15], [31, 31]], "yuv_flag": True}),
    ],
)
def test_yaml_defaults_per_attack(attack, expect):
    cfg = _resolved(attack)
    assert {k: cfg[k] for k in expect} == expect
    tc = train_config(FlowConfig.from_dict(cfg, attack), cfg["lr"], 50000, 0)
    lrs = {lr_at(tc, e, 0, 1) for e in range(cfg["epochs"])}
    if cfg["lr_scheduler"] == "MultiStepLR":
        assert lrs == {cfg["lr"]}  # constant over the 100 epochs
    else:
        assert len(lrs) == cfg["epochs"]  # cosine
    aug = train_augment(FlowConfig.from_dict(cfg, attack))
    x = torch.full((64, 3, 32, 32), 255, dtype=torch.uint8)
    y = aug(x, torch.Generator().manual_seed(0))
    # crop padding 5 can blank up to 5 rows; padding 4 (crop_flip) at most 4
    pad = 5 if cfg["train_augment"] == "crop_rotate_flip" else 4
    assert (y == 0).all(1).all(2).sum(1).max() == pad


def test_new_keys_are_checked():
    from utils.dataelixir.keys import validate
    from utils.fileio import UserError

    cfg = _resolved("wanet")
    with pytest.raises(UserError, match="steplr_milestones"):
        validate(FlowConfig.from_dict(dict(cfg, steplr_milestones=[100, "x"]), "wanet"))
    # ranges are checked while parsing, from the YAML or the command line
    for key, bad in (("crop_prob", "1.5"), ("random_rotation", "-1.0"), ("random_crop", "17")):
        with pytest.raises(UserError, match=key):
            parse_config(
                "attack/wanet.py",
                ["--yaml_path", "config/wanet/cifar10.yaml", f"--{key}", bad],
                attack_keys("wanet"),
                known_elsewhere=all_known_keys(),
            )
