"""The triggers normalise with the dataset's own statistics (``DatasetSpec.mean/std``): the
auxiliary classifiers of LC, LF (and whatever trains through ``train_aux_classifier``) and
Input-aware wrap their network in ``Normalized(net, mean, std)``, and WaNet's and
Input-aware's BackdoorBench round trip (normalise, compute, denormalise, truncate) uses
them; CIFAR-10's numbers, and the auxiliary models' cache keys on CIFAR-10, are what they
always were. Synthetic images: no dataset is read."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from utils.data import CIFAR10_MEAN, CIFAR10_STD, ImageSet
from utils.dataelixir import phases as bp
from utils.dataelixir.attack_data import build_backdoor_data
from utils.dataelixir.keys import FlowConfig
from utils.dataelixir.record import Record
from utils.dataelixir.triggers import TRIGGERS, settings_key
from utils.dataelixir.triggers import inputaware as ia
from utils.dataelixir.triggers.aux import train_aux_classifier
from utils.dataelixir.triggers.base import normalisation_settings
from utils.dataelixir.triggers.inputaware import EncoderDecoder
from utils.dataelixir.triggers.wanet import bb_normalise, bb_to_uint8, warp
from utils.datasets import get_dataset
from utils.fileio import tensor_fingerprint
from utils.trainer import Normalized

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
SVHN, GTSRB, CIFAR = get_dataset("svhn"), get_dataset("gtsrb"), get_dataset("cifar10")
# a few optimiser steps: enough to build, train and cache each auxiliary model
TINY_AUX = {"aux_width": 4, "aux_epochs": 1, "aux_subset": 0, "aux_batch_size": 20, "aux_lr": 0.01}


def _images(n: int, classes: int = 10, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(n) % classes)


def _col(values) -> torch.Tensor:
    """A float32 [1,3,1,1] tensor of a dataset's tuple, built as BackdoorBench's Normalize holds it."""
    return torch.tensor(values).view(1, 3, 1, 1)


def _bb_saved(xn: torch.Tensor, mean, std) -> torch.Tensor:
    """BackdoorBench's denormaliser (``Normalize(0, 1/std)``, ``Normalize(-mean, 1)``), then
    ``ToPILImage``'s ``mul(255).byte()``."""
    inv_std = torch.tensor([1 / s for s in std]).view(1, 3, 1, 1)
    neg_mean = torch.tensor([-m for m in mean]).view(1, 3, 1, 1)
    return xn.div(inv_std).sub(neg_mean).mul(255).clamp(0, 255).to(torch.uint8)


def _assert_normalised_with(model: torch.nn.Module, spec_mean, spec_std) -> None:
    assert isinstance(model, Normalized)
    assert torch.equal(model.mean.cpu(), _col(spec_mean)) and torch.equal(model.std.cpu(), _col(spec_std))


# --------------------------------------------------------------------------- the statistics


def test_the_specs_differ_and_cifar10s_are_the_constants():
    assert CIFAR.mean is CIFAR10_MEAN and CIFAR.std is CIFAR10_STD
    assert SVHN.mean != CIFAR10_MEAN and SVHN.std != CIFAR10_STD
    assert (GTSRB.mean, GTSRB.std) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # BackdoorBench: no normalisation
    for name in TRIGGERS:
        assert TRIGGERS[name]({}).mean == CIFAR10_MEAN and TRIGGERS[name]({}).std == CIFAR10_STD, name
        t = TRIGGERS[name]({}, mean=SVHN.mean, std=SVHN.std)
        assert (t.mean, t.std) == (SVHN.mean, SVHN.std), name
    # the cache keys gain the statistics only where they are not CIFAR-10's
    assert normalisation_settings(CIFAR10_MEAN, CIFAR10_STD) == {}
    assert normalisation_settings(list(CIFAR10_MEAN), list(CIFAR10_STD)) == {}
    assert normalisation_settings(SVHN.mean, SVHN.std) == {
        "normalisation": {"mean": list(SVHN.mean), "std": list(SVHN.std)}
    }


def test_bb_round_trip_defaults_to_cifar10s_constants():
    x = _images(8).images.float() / 255
    ref = (x - _col(CIFAR10_MEAN)) / _col(CIFAR10_STD)
    assert torch.equal(bb_normalise(x), ref) and torch.equal(bb_normalise(x, CIFAR10_MEAN, CIFAR10_STD), ref)
    assert torch.equal(bb_to_uint8(ref), _bb_saved(ref, CIFAR10_MEAN, CIFAR10_STD))
    svhn = (x - _col(SVHN.mean)) / _col(SVHN.std)
    assert torch.equal(bb_normalise(x, SVHN.mean, SVHN.std), svhn)
    assert torch.equal(bb_to_uint8(svhn, SVHN.mean, SVHN.std), _bb_saved(svhn, SVHN.mean, SVHN.std))
    assert not torch.equal(svhn, ref)


# --------------------------------------------------------------------------- WaNet


@pytest.mark.parametrize("spec", [SVHN, GTSRB, CIFAR], ids=lambda s: s.name)
def test_wanet_round_trip_uses_the_datasets_statistics(spec):
    x = _images(64).images
    trig = TRIGGERS["wanet"]({}, seed=2022, num_classes=spec.num_classes, mean=spec.mean, std=spec.std)
    grid = trig.grid.repeat(len(x), 1, 1, 1)
    xn = (x.float() / 255 - _col(spec.mean)) / _col(spec.std)
    ref = _bb_saved(F.grid_sample(xn, grid, align_corners=True), spec.mean, spec.std)
    out = trig.apply(x)
    assert torch.equal(out, ref)
    cifar = warp(x, trig.grid, "truncate")  # the CIFAR-10 round trip, as before
    if spec is CIFAR:
        assert torch.equal(out, cifar) and torch.equal(TRIGGERS["wanet"]({}, seed=2022).apply(x), out)
    else:
        # the truncation of another round trip lands differently on some values
        assert (out != cifar).any()


def test_wanet_poisoned_set_takes_the_statistics_from_build_backdoor_data(tmp_path):
    train, test = _images(256, 43), _images(64, 43, seed=1)
    d = build_backdoor_data("wanet", {}, train, test, CPU, tmp_path, lambda _m: None, num_classes=43, **_stats(GTSRB))
    idx = torch.nonzero(d.poison_indicator).flatten()[:2]  # the first two poisoned (not cross) samples
    trig = TRIGGERS["wanet"]({}, seed=2022, num_classes=43, **_stats(GTSRB))
    assert torch.equal(d.train.images[idx], trig.apply(train.images[idx]))
    # GTSRB's mean 0, std 1: the round trip is a plain truncation of the warped [0, 1] images
    plain = F.grid_sample(train.images[idx].float() / 255, trig.grid.repeat(2, 1, 1, 1), align_corners=True)
    assert torch.equal(d.train.images[idx], plain.mul(255).clamp(0, 255).to(torch.uint8))


def test_attack_phase_passes_the_flow_datasets_statistics(tmp_path):
    cfg = FlowConfig.from_dict({"dataset": "svhn", "attack_target": 0}, "wanet")
    train, test = _images(256), _images(64, seed=1)
    ctx = bp.FlowContext(
        cfg, Record(tmp_path), tmp_path, CPU, lambda _m: None, lambda: (train, test, torch.arange(256))
    )
    bd = bp.attack_phase(ctx).data
    want = build_backdoor_data("wanet", cfg.trigger_params(), train, test, CPU, tmp_path, **_stats(SVHN))
    cifar = build_backdoor_data("wanet", cfg.trigger_params(), train, test, CPU, tmp_path)
    assert torch.equal(bd.train.images, want.train.images) and torch.equal(bd.test_bd.images, want.test_bd.images)
    assert not torch.equal(bd.train.images, cifar.train.images)


def _stats(spec) -> dict:
    return {"mean": spec.mean, "std": spec.std}


# --------------------------------------------------------------------------- Input-aware


def test_inputaware_round_trip_uses_the_datasets_statistics():
    torch.manual_seed(0)
    trig = TRIGGERS["inputaware"]({"gen_width": 4}, seed=2022, **_stats(SVHN))
    gen, mgen = EncoderDecoder(3, 4).eval(), EncoderDecoder(1, 4).eval()
    trig.gen, trig.mgen = gen, mgen
    data = _images(32)
    x, s = data.images[:16], data.images[16:]
    with torch.no_grad():
        src = (s.float() / 255).contiguous(memory_format=torch.channels_last)
        pattern, mask = ia.pattern_of(gen, src), ia.mask_of(mgen, src)
        out = trig.triggered(x, s)
        cifar = TRIGGERS["inputaware"]({"gen_width": 4}, seed=2022)
        cifar.gen, cifar.mgen = gen, mgen
        out_cifar = cifar.triggered(x, s)
    m, sd = _col(SVHN.mean), _col(SVHN.std)
    xn = (x.float() / 255 - m) / sd
    ref = _bb_saved(xn + ((pattern - m) / sd - xn) * mask, SVHN.mean, SVHN.std)
    assert torch.equal(out, ref) and (out != out_cifar).any()
    assert torch.equal(ia.normalise(src), bb_normalise(src))  # the diversity loss's default: CIFAR-10's
    assert torch.equal(trig._normalise(src), (src - m) / sd)


def _recording_normalized(monkeypatch, module) -> list:
    made = []

    def record(net, *args):
        made.append(Normalized(net, *args))
        return made[-1]

    monkeypatch.setattr(module, "Normalized", record)
    return made


@pytest.mark.parametrize("spec", [SVHN, CIFAR], ids=lambda s: s.name)
def test_inputaware_classifier_and_cache_key_use_the_statistics(spec, tmp_path, monkeypatch):
    made = _recording_normalized(monkeypatch, ia)
    cfg = {**TINY_AUX, "gen_width": 4, "mask_epochs": 1}
    trig = TRIGGERS["inputaware"](cfg, seed=0, num_classes=10, **_stats(spec))
    train = _images(40)
    trig.prepare(train, CPU, tmp_path, lambda _m: None)
    assert len(made) == 1
    _assert_normalised_with(made[0], spec.mean, spec.std)
    (folder,) = (tmp_path / "inputaware").iterdir()
    settings = json.loads((folder / "settings.json").read_text())
    if spec is CIFAR:
        assert "normalisation" not in settings
    else:
        assert settings["normalisation"] == {"mean": list(spec.mean), "std": list(spec.std)}
    assert folder.name == "gen-" + settings_key(settings)


# --------------------------------------------------------------------------- LF's and LC's classifiers


def _old_aux_key(train: ImageSet, seed: int = 0) -> str:
    """``train_aux_classifier``'s cache key as written before the statistics were threaded."""
    settings = {
        "kind": "clean classifier",
        "arch": "preactresnet18",
        "width": 4,
        "epochs": 1,
        "subset": 0,
        "batch_size": 20,
        "lr": 0.01,
        "schedule": "cosine",
        "seed": seed,
        "precision": "fp32",
        "data": tensor_fingerprint(train.images, train.labels),
    }
    return "clf-" + settings_key(settings)


def test_aux_classifier_normalises_with_the_datasets_statistics(tmp_path):
    train = _images(40)
    p = {**TINY_AUX, "aux_arch": "preactresnet18"}
    quiet = lambda _m: None  # noqa: E731
    model, _, folder = train_aux_classifier("lf", p, train, CPU, tmp_path, 0, quiet)
    _assert_normalised_with(model, CIFAR10_MEAN, CIFAR10_STD)
    # CIFAR-10's key is the one earlier versions wrote: their caches are still found
    assert folder.name == _old_aux_key(train)
    svhn, _, svhn_folder = train_aux_classifier("lf", p, train, CPU, tmp_path, 0, quiet, **_stats(SVHN))
    _assert_normalised_with(svhn, SVHN.mean, SVHN.std)
    # the same images under other statistics: another model, not the CIFAR-10 one reloaded
    assert svhn_folder != folder
    assert json.loads((svhn_folder / "settings.json").read_text())["normalisation"]["std"] == list(SVHN.std)
    msgs = []
    again, _, again_folder = train_aux_classifier("lf", p, train, CPU, tmp_path, 0, msgs.append, **_stats(SVHN))
    assert again_folder == svhn_folder and any("loaded the auxiliary classifier" in m for m in msgs)
    _assert_normalised_with(again, SVHN.mean, SVHN.std)


def test_lf_passes_the_statistics_to_its_classifier(tmp_path, monkeypatch):
    from utils.dataelixir.triggers import aux

    made = _recording_normalized(monkeypatch, aux)
    cfg = {**TINY_AUX, "lf_num_images": 4, "lf_max_passes": 1, "lf_max_iter_df": 2}
    trig = TRIGGERS["lf"](cfg, seed=0, num_classes=43, **_stats(GTSRB))
    trig.prepare(_images(40), CPU, tmp_path, lambda _m: None)
    assert len(made) == 1
    _assert_normalised_with(made[0], GTSRB.mean, GTSRB.std)


@pytest.mark.parametrize("spec", [SVHN, CIFAR], ids=lambda s: s.name)
def test_lc_adversarial_model_normalises_with_the_datasets_statistics(spec, tmp_path):
    cfg = {**TINY_AUX, "aux_arch": "preactresnet18", "at_steps": 1, "adv_steps": 1}
    trig = TRIGGERS["lc"](cfg, seed=0, num_classes=10, **_stats(spec))
    trig.prepare(_images(40), CPU, tmp_path, lambda _m: None)
    _assert_normalised_with(trig.model, spec.mean, spec.std)
    settings = json.loads((trig.folder / "settings.json").read_text())
    assert ("normalisation" in settings) == (spec is not CIFAR)
