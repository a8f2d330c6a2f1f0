"""Class count and image size flowing into the poisons and the triggers (utils/poisons/,
utils/dataelixir/triggers/): class-wise patterns over N classes, LSP's 48 features at
32x32 and their 64x64 equivalent, AR's and OPS's per-class searches, and the triggers'
geometry at 64x64 (BackdoorBench's per-dataset settings). Synthetic images, no data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from utils.data import ImageSet
from utils.dataelixir.attack_data import build_backdoor_data
from utils.dataelixir.triggers import TRIGGERS
from utils.dataelixir.triggers.base import attack_targets
from utils.dataelixir.triggers.sig import sig_pattern
from utils.datasets import DATASETS, get_dataset
from utils.download import CIFAR10
from utils.fileio import UserError
from utils.poisons import ar, cuda, get_poison, lsp, ops, resolve_params, urp
from utils.poisons.common import l2_radius_255

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n, size, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    return ImageSet(torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8), labels)


def test_registry_entries_state_classes_size_and_official_files():
    expected = {
        "cifar10": (10, 32),
        "cifar100": (100, 32),
        "svhn": (10, 32),
        "gtsrb": (43, 32),
        "tinyimagenet": (200, 64),
    }
    for name, (classes, size) in expected.items():
        spec = get_dataset(name)
        assert (spec.num_classes, spec.image_size) == (classes, size)
        assert all(len(f.remote.md5) == 32 and f.remote.url.startswith("http") for f in spec.files)
    assert DATASETS["imagefolder"].num_classes == 0  # read off the folder
    with pytest.raises(UserError, match="unknown dataset 'mnist'"):
        get_dataset("mnist")


def test_mirror_serves_every_dataset_file_under_its_official_name(monkeypatch):
    monkeypatch.setenv("DATASETS_MIRROR", "http://127.0.0.1:9/files/")
    assert CIFAR10.resolved_url == "http://127.0.0.1:9/files/cifar-10-python.tar.gz"
    svhn_test = get_dataset("svhn").files[1].remote
    assert svhn_test.resolved_url == "http://127.0.0.1:9/files/test_32x32.mat"
    monkeypatch.setenv("SVHN_TEST_URL", "file:///copy.mat")  # a file's own override wins
    assert svhn_test.resolved_url == "file:///copy.mat"


# --------------------------------------------------------------------------- poisons


def test_classwise_poisons_have_one_pattern_per_class():
    g = torch.Generator().manual_seed(0)
    assert urp.class_patterns(8.0, 8.0, g, 100, 64).shape == (100, 3, 64, 64)
    assert cuda.class_kernels(0.3, g, 43).shape == (43, 3, 1, 3, 3)
    # CIFAR-10's draws are the defaults' draws
    a = urp.class_patterns(8.0, 8.0, torch.Generator().manual_seed(1))
    b = urp.class_patterns(8.0, 8.0, torch.Generator().manual_seed(1), 10, 32)
    assert torch.equal(a, b)


def test_lsp_keeps_48_features_at_64x64_with_twice_the_radius():
    params = resolve_params(get_poison("LSP"), {}, image_size=64)
    assert params["patch"] == 16 and resolve_params(get_poison("LSP"), {})["patch"] == 8
    labels = torch.arange(200) % 200
    delta = lsp.patterns(labels, params["patch"], 10.0, l2_radius_255(6.0, 64), 0, size=64, num_classes=200)
    assert delta.shape == (200, 3, 64, 64)
    blocks = delta.unfold(2, 16, 16).unfold(3, 16, 16)  # constant over each 16x16 patch: 4x4x3 = 48 features
    assert torch.allclose(blocks, blocks[..., :1, :1].expand_as(blocks))
    assert math.isclose(l2_radius_255(6.0, 64), 2 * l2_radius_255(6.0), rel_tol=1e-12)
    with pytest.raises(UserError, match="must divide the image side 64"):
        resolve_params(get_poison("LSP"), {"patch": 24}, image_size=64)


def test_lsp_refuses_more_classes_than_its_features_can_centre():
    # a 32x32 patch at 32x32 leaves 1x1x3 = 3 features: 8 distinct cluster centres
    for name in ("cifar10", "cifar100"):
        with pytest.raises(UserError, match=r"--patch 32 leaves 3 features .*too few for \d+ classes") as e:
            resolve_params(get_poison("LSP"), {"patch": 32}, data=get_dataset(name))
        assert "\n" not in str(e.value)
    assert resolve_params(get_poison("LSP"), {"patch": 16}, data=get_dataset("cifar100"))["patch"] == 16
    # as many classes as centres: drawn distinct, not searched for forever
    centres, _ = lsp.cluster_params(3, 10.0, np.random.default_rng(0), num_classes=8)
    assert len({c.tobytes() for c in centres}) == 8


def test_adp_defaults_to_the_datasets_config_and_checks_its_image_size(tmp_path):
    from utils.poisons import adp

    spec = get_poison("ADP")
    assert resolve_params(spec, {})["diff_config"] == "cifar10.yml"
    assert resolve_params(spec, {}, data=get_dataset("cifar10"))["diff_config"] == "cifar10.yml"
    assert resolve_params(spec, {}, data=get_dataset("svhn"))["diff_config"] == "svhn.yml"
    assert resolve_params(spec, {"diff_config": "cpu.yml"}, data=get_dataset("svhn"))["diff_config"] == "cpu.yml"
    params = resolve_params(spec, {"diff_config": "cpu_64.yml"}, data=get_dataset("cifar10"))
    with pytest.raises(UserError, match="the model takes 64x64 images, CIFAR-10 has 32x32 ones; use config/eclipse/"):
        adp.preflight(tmp_path, params, get_dataset("cifar10"))


def test_ops_searches_every_class_and_every_position_at_64x64():
    data = _images(300, 64, 100)
    choice = ops.search(data.images, data.labels, 1, num_classes=100)
    assert len(choice) == 100 and len({pair for picks in choice for pair in picks}) == 100  # distinct per class
    out = ops.apply(data.images, data.labels, choice)
    changed = (out != data.images).any(dim=1).flatten(1).sum(dim=1)
    assert changed.max() <= 1  # L0 = one pixel of 64x64


def test_ar_samples_at_64x64():
    g = torch.Generator().manual_seed(0)
    # non-negative windows: each value a convex combination of earlier ones, so a sample
    # stays finite over any size (random signed windows, which the search filters, may not)
    windows = ar.random_windows(3, g).abs()
    windows = windows / windows.sum(dim=(2, 3), keepdim=True)
    samples, norms = ar.generate(windows, g, size=64)
    assert samples.shape == (3, 3, 64, 64) and norms.shape == (3,)
    assert torch.isfinite(samples).all() and torch.isfinite(norms).all() and (norms > 0).all()


# --------------------------------------------------------------------------- triggers at 64x64


def _trigger(name, size=64, classes=200, **params):
    return TRIGGERS[name](params, seed=0, target=0, num_classes=classes, image_size=size)


def test_static_triggers_keep_64x64_images_and_scale_their_geometry():
    x = _images(4, 64, 200).images
    for name in ("badnet", "blended", "sig", "wanet", "ftrojan"):
        out = _trigger(name, patch_size=8).apply(x) if name == "badnet" else _trigger(name).apply(x)
        assert out.shape == x.shape and out.dtype == torch.uint8, name
    # SIG: f periods across the width, whatever the width
    p64, p32 = sig_pattern(40.0, 6.0, 64).flatten(), sig_pattern(40.0, 6.0, 32).flatten()
    assert torch.allclose(p64[::2], p32, atol=1e-4)
    # WaNet: the k x k grid upsampled to the image side
    assert _trigger("wanet").grid.shape == (1, 64, 64, 2)
    # FTrojan: window 32 tiles a 64x64 image with four blocks shifted alike
    pattern = _trigger("ftrojan").pattern
    assert pattern.shape[-2:] == (64, 64)
    assert torch.allclose(pattern[..., :32, :32], pattern[..., 32:, 32:])
    with pytest.raises(UserError, match="must divide the image side 32"):
        _trigger("ftrojan", size=32, window_size=64)


def test_badnet_patch_of_the_64x64_config_sits_in_the_corner():
    x = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    out = _trigger("badnet", patch_size=8).apply(x)
    assert (out[:, :, :-8, :] == 0).all() and (out[:, :, :, :-8] == 0).all()
    assert (out[:, 0, -8:-4, -8:-4] == 255).all() and (out[:, :, -4:, -4:] == 122).all()


def test_all2all_and_poisoned_data_over_n_classes():
    labels = torch.tensor([0, 41, 42])
    assert attack_targets(labels, 0, "all2all", 43).tolist() == [1, 42, 0]
    train, test = _images(430, 32, 43), _images(86, 32, 43, seed=1)
    bd = build_backdoor_data(
        "badnet",
        {"attack_target": 42, "pratio": 0.1},
        train,
        test,
        torch.device("cpu"),
        "/unused",
        print,
        num_classes=43,
    )
    assert len(bd.info["poisoned_per_class"]) == 43 and (bd.train.labels[bd.poison_indicator] == 42).all()
