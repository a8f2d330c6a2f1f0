"""Poisons and the Blended trigger against the arithmetic of their reference codes.

Each expected value is written here from what the reference code does (HanxunH/Unlearnable-
Examples, WenRuiUSTC/EntF, Sizhe-Chen/SEP, fshp971/robust-unlearnable-examples, BackdoorBench
v1), independently of the implementation under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.data import class_balanced_subset
from utils.dataelixir.triggers import TRIGGERS
from utils.dataelixir.triggers.blended import blended_trigger
from utils.poisons import get_craft, get_poison, resolve_params
from utils.poisons import minmin as minmin_module
from utils.poisons.common import CraftContext, shift_image
from utils.poisons.efp import efp_augment, entf_loss
from utils.poisons.minmin import MinMin, MinMinConfig
from utils.poisons.sep import truncate_like_reference

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data200(small_train):
    return small_train.subset(class_balanced_subset(small_train.labels, 200, seed=0))


def make_ctx(tmp, data, poison: str, **opts) -> CraftContext:
    return CraftContext(
        clean=data,
        params=resolve_params(get_poison(poison), opts),
        seed=0,
        device=torch.device("cpu"),
        bf16=False,
        arch="resnet18",
        width=16,
        state_dir=tmp / "state",
        resource_dir=tmp / "resource",
        progress=False,
    )


# --------------------------------------------------------------------------- EM class-wise


def test_em_classwise_surrogate_trains_on_every_image(tmp_path, data200, monkeypatch):
    """perturbation.py's universal_perturbation trains on data_loader['train_dataset'] (the full
    set, each image + its class's δ) and steps / stops on 'train_subset' (the 20 %)."""
    seen: list[torch.Tensor] = []

    def record(model, opt, x, y, bf16, grad_clip=None):
        seen.append(x.detach().clone())
        return 0.0, len(y)

    monkeypatch.setattr(minmin_module, "train_step", record)
    ctx = make_ctx(tmp_path, data200, "EM", classwise=True, train_steps=8, train_batch=64, batch_size=100, max_rounds=2)
    res = get_craft(get_poison("EM"))(ctx)
    clean = data200.images.float().flatten(1) / 255
    trained = set()
    for x in seen:
        # each trained image is within ε = 8/255 of exactly one clean image
        dist = (x.flatten(1)[:, None, :] - clean[None]).abs().amax(-1)
        near = dist.min(1)
        assert (near.values <= 8 / 255 + 1e-5).all()
        trained.update(near.indices.tolist())
    subset = set(class_balanced_subset(data200.labels, 40, 0).tolist())
    # 16 batches of 64 over 200 images: shuffled epochs reach every image, far beyond the subset
    assert len(trained) == 200 and not trained <= subset
    assert res.info["crafted_on_images"] == 40 and res.info["surrogate_trained_on_images"] == 200


def test_minmin_classwise_noise_set_and_training_set_are_separate(tmp_path, data200):
    ctx = make_ctx(tmp_path, data200, "EM", classwise=True)
    sub = data200.subset(class_balanced_subset(data200.labels, 40, 0))
    model = torch.nn.Linear(1, 1)
    loop = MinMin(ctx, MinMinConfig(eps=8, step_size=1, pgd_steps=1, classwise=True, batch_size=64), model, None, sub)
    assert len(loop.images) == 40 and len(loop.train_images) == 200
    assert len(loop.perm) == 200 and int(loop.next_batch().max()) < 200


# --------------------------------------------------------------------------- EFP / EntF


def test_efp_shift_pads_with_black_like_entf_unnormalised_loader():
    # EntF: construct_datasets(normalize=False) -> mean 0, std 1; RandomTransform's grid_sample
    # pads with zeros, i.e. black on the [0, 1] images
    assert resolve_params(get_poison("EFP"), {})["augment"] == "shift_flip"
    out = efp_augment("shift_flip")(torch.ones(64, 3, 32, 32), torch.Generator().manual_seed(3))
    u = torch.rand(64, 3, generator=torch.Generator().manual_seed(3))
    shifted = ((u[:, :2] - 0.5) * 2 * 4.0).abs().amax(1) >= 1.0  # a whole row or column outside the image
    assert shifted.sum() > 30
    assert (out[shifted].flatten(1).amin(1) < 1e-6).all()  # mean-colour padding would leave >= 0.44
    assert (out[~shifted] > 0).all()
    half = shift_image(torch.ones(1, 3, 32, 32), torch.tensor([[0.5, 0.0]]), torch.tensor([False]), (0.0, 0.0, 0.0))
    assert torch.allclose(half[0, :, :, 31], torch.full((3, 32), 0.5), atol=1e-6)  # half edge, half black


class _Identity(torch.nn.Module):
    """Features = the input itself (2-d points), to test the centroid choice alone."""

    input_layout = torch.contiguous_format

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_efp_pull_sets_the_own_distance_to_one_like_forgemaster_pull():
    # forgemaster_pull._find_close: MSE to every centroid, the own class's entry set to 1,
    # the first minimum's centroid is the target of MSELoss
    centroids = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 0.4]])
    feats = torch.tensor([[0.1, 0.0], [2.9, 0.0], [-2.0, 0.0]])
    y = torch.zeros(3, dtype=torch.long)

    def reference(f: torch.Tensor, label: int) -> float:
        dist = [float(((c - f) ** 2).mean()) for c in centroids]
        dist[label] = 1
        best = dist.index(min(dist))
        return float(((centroids[best] - f) ** 2).mean())

    got = entf_loss(centroids, "pull", False, "one")(_Identity(), feats, y, torch.arange(3))
    assert torch.allclose(got, torch.tensor([reference(f, 0) for f in feats]))
    # image 2: every other centroid is farther than 1, so the reference pulls it to its own (MSE 2)
    assert float(got[2]) == pytest.approx(2.0)
    excl = entf_loss(centroids, "pull", False, "exclude")(_Identity(), feats, y, torch.arange(3))
    assert float(excl[2]) == pytest.approx((4.0 + 0.16) / 2) and torch.allclose(excl[:2], got[:2])
    assert resolve_params(get_poison("EFP"), {"variant": "pull"})["pull_own"] == "one"


# --------------------------------------------------------------------------- SEP


def test_sep_truncate_is_the_reference_astype_of_x_times_255(data200):
    # SEP's utils/data.py: (np.load(x) * 255).astype(np.uint8) of its float32 [0, 1] images
    clean = data200.images[:50]
    g = torch.Generator().manual_seed(0)
    delta = torch.randint(-8, 9, clean.shape, generator=g).float()
    delta = torch.max(torch.min(delta, 255 - clean.float()), -clean.float())
    x = clean.numpy().astype(np.float32) / np.float32(255) + delta.numpy().astype(np.float32) * np.float32(1 / 255)
    want = (x * np.float32(255)).astype(np.uint8).astype(np.int16)
    c = clean.numpy().astype(np.int16)
    want = np.clip(want, c - 8, c + 8)  # the one-level overshoot past -ε is kept within the budget
    got = truncate_like_reference(clean, delta, 8.0).numpy().astype(np.int16)
    assert np.array_equal(got, want)
    exact = c + delta.numpy().astype(np.int16)
    lower = got != exact
    assert lower.any() and (got[lower] == exact[lower] - 1).all()  # truncation only ever drops a level
    assert np.abs(got - c).max() <= 8
    assert resolve_params(get_poison("SEP"), {})["quantize"] == "round"
    assert resolve_params(get_poison("SEP"), {"quantize": "truncate"})["quantize"] == "truncate"


# --------------------------------------------------------------------------- REM


def test_rem_final_pass_can_drop_the_last_partial_batch_like_the_reference(tmp_path, data200, monkeypatch):
    # generate_robust_em.py's regenerate_def_noise iterates the training loader (shuffle, drop_last)
    calls: list[torch.Tensor] = []
    monkeypatch.setattr(MinMin, "update_noise", lambda self, idx: calls.append(idx.clone()))
    monkeypatch.setattr(MinMin, "train_on", lambda self, idx: (0.0, len(idx)))
    monkeypatch.setattr(MinMin, "evaluate", lambda self: (0.0, 0.0))
    for drop, covered in ((False, 200), (True, 192)):
        calls.clear()
        ctx = make_ctx(tmp_path / str(drop), data200, "REM")
        cfg = MinMinConfig(
            eps=8, step_size=1, pgd_steps=1, schedule="steps", batch_size=64, max_rounds=1, final_drop_last=drop
        )
        MinMin(ctx, cfg, torch.nn.Linear(1, 1), None).run()
        final = calls[1:]  # the first call is the one training step's
        seen = torch.cat(final)
        assert len(seen) == covered and len(set(seen.tolist())) == covered
        if drop:
            assert all(len(b) == 64 for b in final) and not torch.equal(seen, torch.arange(192))
    assert resolve_params(get_poison("REM"), {})["final_drop_last"] is False


# --------------------------------------------------------------------------- Blended


def test_blended_matches_backdoorbench_float_arithmetic(small_train):
    # BackdoorBench v1: target = ToTensor()(trigger).numpy() * 255 (float32);
    # (1 - a) * img (uint8 -> float64) + a * target (float32), then astype(uint8)
    t = blended_trigger(0)
    target = (t.permute(1, 2, 0).numpy().astype(np.float32) / np.float32(255)) * np.float32(255)
    trig = TRIGGERS["blended"]({})
    for a, train in ((0.2, True), (0.2, False)):
        img = small_train.images.permute(0, 2, 3, 1).numpy()
        blend = (1 - a) * img + a * target
        assert blend.dtype == np.float64 and (a * target).dtype == np.float32
        want = np.clip(blend, 0, 255).astype(np.uint8)
        got = trig.apply(small_train.images, train=train).permute(0, 2, 3, 1).numpy()
        assert np.array_equal(got, want)
        exact = (4 * img.astype(np.int64) + t.permute(1, 2, 0).numpy().astype(np.int64)) // 5
        assert 0.01 < (want != exact).mean() < 0.05  # the reference's float artefact, reproduced
