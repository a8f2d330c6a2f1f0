"""The nine backdoor triggers and the poisoned-data builder, on tiny real CIFAR-10 data.

Static triggers are checked against their defining formula; the attacks with an
auxiliary model run with tiny settings (a few optimiser steps) and are checked for
caching (a second call loads instead of training) and for resuming after an interruption.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from utils.data import ImageSet
from utils.dataelixir.attack_data import (
    ATTACKS,
    COMMON_DEFAULTS,
    attack_targets,
    build_backdoor_data,
    select_poison_indices,
)
from utils.dataelixir.triggers import TRIGGERS, coerce_params
from utils.dataelixir.triggers.aux import Resumable
from utils.dataelixir.triggers.badnet import badnet_patch
from utils.dataelixir.triggers.blended import blended_trigger
from utils.dataelixir.triggers.ftrojan import TriggerFTrojan, blockwise_dct, rgb_to_ycrcb, ycrcb_to_rgb
from utils.dataelixir.triggers.lc import lc_trigger_mask
from utils.dataelixir.triggers.sig import sig_pattern
from utils.dataelixir.triggers.wanet import warp
from utils.fileio import UserError

CPU = torch.device("cpu")
STATIC = ["badnet", "blended", "sig", "wanet", "ftrojan"]
# a few optimiser steps each: enough to exercise training, caching and resuming
TINY = {
    "lf": {
        "aux_width": 4,
        "aux_epochs": 1,
        "aux_subset": 50,
        "aux_batch_size": 25,
        "lf_num_images": 4,
        "lf_max_passes": 1,
        "lf_max_iter_df": 5,
    },
    "lc": {"aux_width": 4, "aux_epochs": 1, "aux_subset": 100, "aux_batch_size": 50, "at_steps": 1, "adv_steps": 2},
    "ssba": {"aux_width": 4, "aux_epochs": 2, "aux_subset": 100, "aux_batch_size": 50, "aux_lr": 0.001},
    "inputaware": {
        "aux_width": 4,
        "gen_width": 4,
        "aux_epochs": 1,
        "mask_epochs": 1,
        "aux_subset": 50,
        "aux_batch_size": 25,
    },
}


def build(attack, small_train, small_test, tmp_path, log=None, **cfg):
    msgs = []
    data = build_backdoor_data(attack, cfg, small_train, small_test, CPU, tmp_path, log=log or msgs.append)
    return data, msgs


def check_common(d, train, test, target=0, trans="all2one"):
    n = len(train)
    assert d.train.images.dtype == torch.uint8 and d.train.images.shape == train.images.shape
    assert d.test_bd.images.dtype == torch.uint8 and d.test_bd.images.shape[1:] == (3, 32, 32)
    assert d.poison_indicator.dtype == torch.bool and d.poison_indicator.shape == (n,)
    assert torch.equal(d.original_labels, train.labels)
    assert d.test_clean is test
    keep = test.labels != target if trans == "all2one" else torch.ones(len(test), dtype=torch.bool)
    assert len(d.test_bd) == int(keep.sum()) == len(d.test_ra)
    assert torch.equal(d.test_ra.labels, test.labels[keep])
    assert torch.equal(d.test_bd.labels, attack_targets(test.labels[keep], target, trans))
    assert torch.equal(d.test_bd.images, d.test_ra.images)
    # untouched samples keep image and label (cross samples keep their label only)
    cross = torch.zeros(n, dtype=torch.bool)
    cross[torch.as_tensor(d.info.get("cross_indices", []), dtype=torch.long)] = True
    clean = ~d.poison_indicator & ~cross
    assert torch.equal(d.train.images[clean], train.images[clean])
    assert torch.equal(d.train.labels[~d.poison_indicator], train.labels[~d.poison_indicator])
    # WaNet / Input-aware mark their cross samples as poisoned too (cross_poisoned, BackdoorBench v1)
    assert int((d.poison_indicator & ~cross).sum()) == d.info["n_poisoned"]
    assert torch.equal(d.train.labels[cross], train.labels[cross])
    import json

    json.dumps(d.info)  # JSON-able


# --------------------------------------------------------------------------- registry, config


def test_specs_cover_the_nine_attacks():
    assert set(ATTACKS) == {"badnet", "blended", "sig", "lc", "lf", "ssba", "inputaware", "wanet", "ftrojan"}
    for name, spec in ATTACKS.items():
        assert spec.name == name and set(spec.help) >= set(spec.defaults), name
        assert all(isinstance(v, str) and v for v in spec.help.values())
        assert spec.clean_label == (name in ("sig", "lc"))
        assert spec.supports_all2all == (not spec.clean_label)
    assert COMMON_DEFAULTS == {"attack_target": 0, "attack_label_trans": "all2one", "pratio": 0.1, "random_seed": 2022}


def test_param_coercion_and_errors():
    assert coerce_params(
        "x", {"a": 4, "b": 0.2, "c": True, "d": [[1, 2]]}, {"a": "6", "b": "1", "c": "false", "d": "[[3, 4]]"}
    ) == {
        "a": 6,
        "b": 1.0,
        "c": False,
        "d": [[3, 4]],
    }
    with pytest.raises(UserError, match="patch_size"):
        coerce_params("badnet", {"patch_size": 4}, {"patch_size": "big"})
    with pytest.raises(UserError, match="patch_size"):
        coerce_params("badnet", {"patch_size": 4}, {"patch_size": 4.5})


@pytest.mark.parametrize(
    "attack,cfg,msg",
    [
        ("sig", {"attack_label_trans": "all2all"}, "clean-label"),
        ("lc", {"attack_label_trans": "all2all"}, "clean-label"),
        ("badnet", {"pratio": 0}, "pratio"),
        ("badnet", {"pratio": 1.5}, "pratio"),
        ("badnet", {"pratio": "lots"}, "pratio"),
        ("badnet", {"attack_target": 10}, "attack_target"),
        ("badnet", {"attack_target": 1.5}, "attack_target"),
        ("badnet", {"attack_label_trans": "one2one"}, "attack_label_trans"),
        ("badnet", {"random_seed": "x"}, "random_seed"),
        ("badnet", {"patch_size": 3}, "patch_size"),
        ("blended", {"attack_train_blended_alpha": 1.5}, "alpha"),
        ("blended", {"attack_trigger_img_path": "/nonexistent/kitty.png"}, "does not exist"),
        ("sig", {"sig_f": 0}, "sig_f"),
        ("wanet", {"k": 1}, "k must"),
        ("wanet", {"cross_ratio": -1}, "cross_ratio"),
        ("ftrojan", {"pos_list": [[32, 32]]}, "pos_list"),
        ("ftrojan", {"window_size": 7}, "window_size"),
        ("ftrojan", {"channel_list": [3]}, "channel_list"),
        ("lc", {"lc_trigger": "everywhere"}, "lc_trigger"),
        ("lc", {"adv_eps": 300}, "adv_eps"),
        ("lf", {"lf_range": 0}, "lf_range"),
        ("lf", {"aux_arch": "alexnet"}, "aux_arch"),
        ("ssba", {"ssba_bits": 2}, "ssba_bits"),
        ("inputaware", {"mask_density": 1.5}, "mask_density"),
        ("nosuchattack", {}, "unknown attack"),
    ],
)
def test_bad_values_raise_user_error(attack, cfg, msg, small_train, small_test, tmp_path):
    with pytest.raises(UserError, match=msg):
        build(attack, small_train, small_test, tmp_path, **cfg)


def test_tiny_pratio_that_poisons_nothing_is_an_error(small_train, small_test, tmp_path):
    with pytest.raises(UserError, match="poisons no sample"):
        build("badnet", small_train, small_test, tmp_path, pratio=0.001)


# --------------------------------------------------------------------------- selection


def test_selection_follows_the_dataelixir_fork_rule():
    labels = torch.arange(1000) % 10
    idx = select_poison_indices(labels, 0.1, 3, "all2one", False, 7)
    assert len(idx) == 100 and (labels[idx] != 3).all() and len(np.unique(idx)) == 100
    assert np.array_equal(idx, select_poison_indices(labels, 0.1, 3, "all2one", False, 7))
    assert not np.array_equal(idx, select_poison_indices(labels, 0.1, 3, "all2one", False, 8))
    assert np.array_equal(idx, np.sort(idx))
    idx = select_poison_indices(labels, 0.25, 0, "all2all", False, 7)
    assert len(idx) == 250 and len(np.unique(labels[idx])) == 10
    idx = select_poison_indices(labels, 0.05, 2, "all2one", True, 7)
    assert len(idx) == 50 and (labels[idx] == 2).all()
    notes = []
    idx = select_poison_indices(labels, 0.5, 2, "all2one", True, 7, log=notes.append)
    assert len(idx) == 100 and (labels[idx] == 2).all() and "note" in notes[0]


# --------------------------------------------------------------------------- static triggers


@pytest.mark.parametrize("attack", STATIC)
def test_static_attack_contract_and_determinism(attack, small_train, small_test, tmp_path):
    # WaNet's BackdoorBench v1 per-batch selection: tests/test_triggers_wanet_inputaware.py
    cfg = {"selection": "random", "cross_poisoned": False} if attack == "wanet" else {}
    d1, _ = build(attack, small_train, small_test, tmp_path, **cfg)
    d2, _ = build(attack, small_train, small_test, tmp_path, **cfg)
    check_common(d1, small_train, small_test)
    assert torch.equal(d1.train.images, d2.train.images) and torch.equal(d1.test_bd.images, d2.test_bd.images)
    assert torch.equal(d1.poison_indicator, d2.poison_indicator)
    n_poison = int(d1.poison_indicator.sum())
    assert d1.info["n_poisoned"] == n_poison
    if ATTACKS[attack].clean_label:
        assert n_poison == min(round(0.1 * len(small_train)), int((small_train.labels == 0).sum()))
        assert (small_train.labels[d1.poison_indicator] == 0).all()
        assert torch.equal(d1.train.labels, small_train.labels)
    else:
        assert n_poison == round(0.1 * len(small_train))
        assert (small_train.labels[d1.poison_indicator] != 0).all()
        assert (d1.train.labels[d1.poison_indicator] == 0).all()
    # the trigger changes the poisoned images
    changed = (d1.train.images[d1.poison_indicator] != small_train.images[d1.poison_indicator]).flatten(1).any(1)
    assert changed.float().mean() > 0.9


def test_other_seed_other_selection(small_train, small_test, tmp_path):
    a, _ = build("badnet", small_train, small_test, tmp_path, random_seed=1)
    b, _ = build("badnet", small_train, small_test, tmp_path, random_seed=2)
    assert not torch.equal(a.poison_indicator, b.poison_indicator)


def test_all2all_labels(small_train, small_test, tmp_path):
    d, _ = build("badnet", small_train, small_test, tmp_path, attack_label_trans="all2all", pratio=0.2)
    check_common(d, small_train, small_test, trans="all2all")
    p = d.poison_indicator
    assert int(p.sum()) == 80
    assert torch.equal(d.train.labels[p], (small_train.labels[p] + 1) % 10)
    assert len(d.test_bd) == len(small_test)


def test_badnet_patch_pixels(small_train, small_test, tmp_path):
    patch = badnet_patch(4)
    assert patch[:, 0, 0].tolist() == [255, 255, 0] and patch[:, 0, 3].tolist() == [255, 0, 255]
    assert patch[:, 3, 0].tolist() == [0, 255, 255] and patch[:, 3, 3].tolist() == [122, 122, 122]
    d, _ = build("badnet", small_train, small_test, tmp_path, attack_target=3)
    check_common(d, small_train, small_test, target=3)
    x = d.train.images[d.poison_indicator]
    on = patch > 0  # the patch's non-zero channels overwrite, its zero channels keep the image
    assert (x[:, :, 28:, 28:] == patch)[:, on].all()
    assert torch.equal(x[:, :, 28:, 28:][:, ~on], small_train.images[d.poison_indicator][:, :, 28:, 28:][:, ~on])
    assert torch.equal(x[:, :, :28], small_train.images[d.poison_indicator][:, :, :28])
    assert (d.test_bd.images[:, :, 28:, 28:] == patch)[:, on].all()


def test_blended_formula_and_user_image(small_train, small_test, tmp_path):
    from PIL import Image

    t = blended_trigger(0)
    assert t.dtype == torch.uint8 and t.shape == (3, 32, 32) and torch.equal(t, blended_trigger(0))
    assert not torch.equal(t, blended_trigger(1)) and t.float().std() > 30  # structured, full range
    d, _ = build("blended", small_train, small_test, tmp_path)
    x = small_train.images[d.poison_indicator].float()
    expect = 0.8 * x + 0.2 * t.float()
    # truncated, and one level lower where the exact blend is whole (BackdoorBench's float
    # arithmetic: tests/test_poisons_reference.py)
    assert (d.train.images[d.poison_indicator].float() - expect).abs().max() <= 1.0 + 1e-3
    # a user-supplied trigger image replaces the generated one
    arr = np.zeros((40, 40, 3), dtype=np.uint8)
    arr[:, :20] = 255
    Image.fromarray(arr).save(tmp_path / "trig.png")
    d2, _ = build(
        "blended",
        small_train,
        small_test,
        tmp_path,
        attack_trigger_img_path=str(tmp_path / "trig.png"),
        attack_test_blended_alpha=0.5,
    )
    y = d2.test_ra.images.float()
    src = small_test.images[small_test.labels != 0].float()
    assert ((y[:, :, :, :14] - (0.5 * src[:, :, :, :14] + 127.5)).abs() <= 1).all()
    assert ((y[:, :, :, 18:] - 0.5 * src[:, :, :, 18:]).abs() <= 1).all()


def test_sig_adds_the_sinusoid(small_train, small_test, tmp_path):
    d, _ = build("sig", small_train, small_test, tmp_path)
    check_common(d, small_train, small_test)
    v = sig_pattern(40, 6)
    assert abs(v.max().item() - 40) < 1e-3 and v.shape == (1, 1, 1, 32)
    assert abs(v[0, 0, 0, 0].item()) < 1e-6  # sin(0)
    x = small_train.images[d.poison_indicator].double()
    expect = (x + v.double()).clamp(0, 255).floor()
    assert torch.equal(d.train.images[d.poison_indicator].float(), expect)
    # the signal is the same in every row and channel
    delta = d.test_bd.images.float() - small_test.images[small_test.labels != 0].float()
    inside = (small_test.images[small_test.labels != 0].float() + v > 0) & (
        small_test.images[small_test.labels != 0].float() + v < 255
    )
    assert ((delta - v).abs()[inside] <= 1).all()  # column 16: the reference loses a unit (sin 6pi ~ -3e-14)


def test_ftrojan_dct_shift(small_train):
    trig = TriggerFTrojan({})
    x = small_train.images[:16]
    # OpenCV's fixed-point colour transform round trip, orthonormal DCT
    ycc = rgb_to_ycrcb(x)
    assert ycc.dtype == torch.int64 and (ycrcb_to_rgb(ycc).long() - x.long()).abs().max() <= 3
    xf = x.double()
    assert (blockwise_dct(blockwise_dct(xf, 32), 32, inverse=True) - xf).abs().max() < 1e-9
    base = ycc.double()
    shift = blockwise_dct(trig.perturbed_float(x), 32) - blockwise_dct(base, 32)
    expect = torch.zeros(3, 32, 32, dtype=torch.float64)
    for r, c in ((15, 15), (31, 31)):
        expect[1:, r, c] = 30.0  # U and V only (BackdoorBench v2)
    assert (shift - expect).abs().max() < 1e-8
    assert torch.equal(trig.perturbed_float(x)[:, 0], base[:, 0])  # Y untouched, exactly
    out = trig.apply(x)
    assert out.dtype == torch.uint8 and torch.equal(out, trig.apply(x))
    diff = (out.float() - x.float()).abs()
    assert 0.5 < diff.mean() < 10  # small but present
    # window 8, all channels, another position: every 8x8 block is shifted
    t8 = TriggerFTrojan({"window_size": 8, "pos_list": [[7, 7]], "channel_list": [0, 1, 2], "magnitude": 20})
    shift = blockwise_dct(t8.perturbed_float(x), 8) - blockwise_dct(base, 8)
    assert torch.allclose(shift[:, :, 7::8, 7::8], torch.full_like(shift[:, :, 7::8, 7::8], 20.0))


def test_wanet_warp_and_cross_samples(small_train, small_test, tmp_path):
    d, _ = build("wanet", small_train, small_test, tmp_path)
    check_common(d, small_train, small_test)
    trig = TRIGGERS["wanet"]({}, seed=2022)
    assert trig.grid.shape == (1, 32, 32, 2) and trig.grid.abs().max() <= 1
    cross = torch.as_tensor(d.info["cross_indices"])
    p = d.poison_indicator.clone()
    p[cross] = False
    assert torch.equal(d.train.images[p], warp(small_train.images[p], trig.grid, "truncate"))
    assert d.info["n_cross"] == len(cross) == round(2 * int(p.sum()))
    assert torch.equal(d.train.labels[cross], small_train.labels[cross])
    moved = (d.train.images[cross] != small_train.images[cross]).flatten(1).any(1)
    assert moved.float().mean() > 0.9
    # an identity grid leaves images unchanged: the warp itself is exact
    lin = torch.linspace(-1, 1, 32)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    ident = torch.stack((xx, yy), 2)[None]
    assert torch.equal(warp(small_train.images[:8], ident), small_train.images[:8])


def test_lc_corner_mask():
    assert torch.equal(lc_trigger_mask(), lc_trigger_mask("bottom-right"))  # v1's default
    m = lc_trigger_mask("all-corners")[0, 0]
    assert m[:3, :3].tolist() == [[1, -1, -1], [-1, 1, -1], [1, -1, 1]]
    assert torch.equal(m[-3:, -3:], m[:3, :3].flip(1)) and torch.equal(m[-3:, :3], m[:3, :3])
    assert int((m != 0).sum()) == 36 and m[3:-3].abs().sum() == 0
    b = lc_trigger_mask("bottom-right")[0, 0]
    assert int((b != 0).sum()) == 9


# --------------------------------------------------------------------------- auxiliary-model attacks


@pytest.fixture(scope="module")
def tiny_sets(small_train, small_test):
    # 200 training images (20 per class) keep the auxiliary trainings to seconds
    idx = torch.cat([torch.nonzero(small_train.labels == c).flatten()[:20] for c in range(10)]).sort().values
    return small_train.subset(idx), small_test.subset(torch.arange(0, len(small_test), 2))


@pytest.mark.parametrize("attack", ["lf", "lc", "ssba", "inputaware"])
def test_aux_attack_trains_then_loads(attack, tiny_sets, tmp_path):
    train, test = tiny_sets
    d1, log1 = build(attack, train, test, tmp_path, **TINY[attack])
    check_common(d1, train, test)
    assert not any("loaded" in m for m in log1)
    d2, log2 = build(attack, train, test, tmp_path, **TINY[attack])
    assert any("loaded" in m for m in log2), log2
    assert torch.equal(d1.train.images, d2.train.images) and torch.equal(d1.test_bd.images, d2.test_bd.images)
    assert d1.info["aux"] and (tmp_path / attack).is_dir()
    p = d1.poison_indicator.clone()
    p[torch.as_tensor(d1.info.get("cross_indices", []), dtype=torch.long)] = False
    if attack == "lc":
        assert (train.labels[p] == 0).all() and torch.equal(d1.train.labels, train.labels)
        x, o = d1.train.images[p].float(), train.images[p].float()
        mask = lc_trigger_mask()[0, 0] != 0
        corners = x[:, :, mask]
        assert ((corners == 0) | (corners == 255)).all()
        assert (x - o)[:, :, ~mask].abs().max() <= 9  # PGD within 8/255, truncated
        # test images (v1's default): PGD-perturbed, then the corner trigger
        t, src = d1.test_bd.images.float(), test.images[test.labels != 0].float()
        assert (t - src)[:, :, ~mask].abs().max() <= 9 and not torch.equal(t[:, :, ~mask], src[:, :, ~mask])
    else:
        assert (d1.train.labels[p] == 0).all()
    if attack == "lf":
        diff = d1.train.images[p].float() - train.images[p].float()
        assert diff.min() >= 0 and diff.max() <= math.ceil(0.2 * 255)  # v in [0, 0.2], added
    if attack == "inputaware":
        cross = torch.as_tensor(d1.info["cross_indices"])
        assert len(cross) == int(p.sum())  # cross_ratio 1
        assert torch.equal(d1.train.labels[cross], train.labels[cross])
    # another setting is another cache: nothing is silently reused
    cfg = dict(TINY[attack], aux_lr=0.05)
    _, log3 = build(attack, train, test, tmp_path, **cfg)
    assert not any("loaded" in m for m in log3)


def test_ssba_trigger_is_sample_specific(tiny_sets, tmp_path):
    train, test = tiny_sets
    d, _ = build("ssba", train, test, tmp_path, **TINY["ssba"])
    res = d.train.images[d.poison_indicator].float() - train.images[d.poison_indicator].float()
    assert res.abs().mean() > 0
    assert not torch.equal(res[0], res[1])  # each image its own residual


def test_aux_training_resumes_after_interruption(tiny_sets, tmp_path, monkeypatch):
    train, test = tiny_sets
    calls = {"n": 0}
    real_save = Resumable.save

    def crash_after_first_epoch(self, state):
        real_save(self, state)
        if self.path.name == "train_ckpt.pt":
            calls["n"] += 1
            raise KeyboardInterrupt

    monkeypatch.setattr(Resumable, "save", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        build("ssba", train, test, tmp_path, **TINY["ssba"])
    monkeypatch.setattr(Resumable, "save", real_save)
    assert calls["n"] == 1
    _, log = build("ssba", train, test, tmp_path, **TINY["ssba"])
    assert any("resuming" in m and "epoch 1" in m for m in log), log
    assert not list(tmp_path.glob("ssba/*/train_ckpt.pt"))  # cleaned up once finished


def test_resumable_refuses_other_settings(tmp_path):
    Resumable(tmp_path / "c.pt", {"a": 1}).save({"x": torch.ones(2)})
    assert Resumable(tmp_path / "c.pt", {"a": 1}).load()["x"].sum() == 2
    with pytest.raises(UserError, match=r"other settings \(a: 1 -> 2\); delete .*c\.pt to rebuild it"):
        Resumable(tmp_path / "c.pt", {"a": 2}).load()


def test_apply_shapes_for_every_static_trigger(small_test):
    x = small_test.images[:5]
    for name in STATIC:
        t = TRIGGERS[name]({}, seed=0)
        out = t.apply(x)
        assert out.dtype == torch.uint8 and out.shape == x.shape, name
        assert torch.equal(out, t.apply(x)), name
        assert torch.equal(t.apply_batched(x), out), name
    assert isinstance(ImageSet(out, small_test.labels[:5]), ImageSet)
