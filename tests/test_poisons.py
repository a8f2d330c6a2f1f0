"""Each poison's defining property, on real CIFAR-10 images at tiny settings.

Budgets hold exactly on the uint8 bytes; class-wise poisons use one pattern per class and
sample-wise ones differ per image; the same seed gives the same bytes; EM lowers the
surrogate's loss; TAP/SEP move predictions to their targets; LSP is linearly separable;
AR filters single out their own class.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from utils.data import NUM_CLASSES, class_balanced_subset
from utils.fileio import UserError
from utils.poisons import POISONS, get_poison, resolve_params
from utils.poisons.ar import filters_of, responses
from utils.poisons.common import (
    CraftContext,
    apply_l2,
    apply_linf,
    check_budget,
    compensation_float,
    l2_radius_255,
    measure_norms,
)
from utils.poisons.ops import COLOURS, position_scores

# tiny settings for the model-based poisons (the defaults are the papers')
TINY = {
    "EM": dict(pgd_steps=5, train_steps=8, train_batch=64, batch_size=100, stop_acc=90.0, max_rounds=5),
    "EM-classwise": dict(classwise=True, train_steps=8, train_batch=64, batch_size=100, max_rounds=4),
    "TAP": dict(epochs=20, milestones="15", train_batch=20, pgd_steps=10, step_size=2.0, batch_size=100, restarts=2),
    # (the ensemble holds an early improving checkpoint, smooth and hard to fool: the
    # reference's 1/255 steps and a longer run give the clear move the test asks for)
    "SEP": dict(epochs=24, milestones="18", train_batch=20, checkpoints=2, pgd_steps=30, step_size=1.0, batch_size=100),
    "EFP": dict(
        epochs=4, milestones="3", train_batch=20, adv_steps=2, adv_step=2.0, pgd_steps=5, step_size=2.0, batch_size=100
    ),
    "REM": dict(
        steps=10, lr_decay_every=5, pgd_steps=2, samples=1, adv_steps=1, adv_step=2, step_size=4, train_batch=64
    ),
}
SAMPLE_WISE = ["EM", "TAP", "SEP", "EFP", "REM", "LSP", "AR"]
NON_MODEL = ["URP", "LSP", "AR", "OPS", "CUDA"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data200(small_train, small_test):
    data = small_train.subset(class_balanced_subset(small_train.labels, 200, seed=0))
    data.test = small_test  # the test set SEP's checkpoint rule reads (make_ctx passes it on)
    return data


def make_ctx(tmp, data, poison, seed=0, **opts):
    spec = get_poison(poison)
    params = resolve_params(spec, opts)
    return spec, CraftContext(
        clean=data,
        params=params,
        seed=seed,
        device=torch.device("cpu"),
        bf16=False,  # the default precision (bf16 is slow on CPUs without native bf16)
        arch="resnet18",
        width=16,
        state_dir=tmp / "state",
        resource_dir=tmp / "resource",
        progress=False,
        test=getattr(data, "test", None),
    )


def craft(tmp, data, key, seed=0):
    poison = key.split("-")[0].rstrip("0123456789")
    opts = TINY.get(key, {})
    spec, ctx = make_ctx(tmp, data, poison, seed, **opts)
    from utils.poisons import get_craft

    return spec, ctx, get_craft(spec)(ctx)


@pytest.fixture(scope="module")
def crafted(data200, tmp_path_factory):
    """Every poison (but ADP) crafted once on 200 real images."""
    out = {}
    for key in NON_MODEL + list(TINY):
        out[key] = craft(tmp_path_factory.mktemp(key), data200, key)
    return out


def delta_of(data, images):
    return images.to(torch.int16) - data.images.to(torch.int16)


# --------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("key", NON_MODEL + list(TINY))
def test_budget_holds_exactly_on_uint8(crafted, data200, key):
    spec, ctx, res = crafted[key]
    assert res.images.dtype == torch.uint8 and res.images.shape == data200.images.shape
    d = delta_of(data200, res.images)
    norms = measure_norms(data200.images, res.images)
    assert check_budget(spec, ctx.params, norms)["holds"]
    if spec.norm == "linf":
        assert d.abs().max() <= math.floor(ctx.params["eps"])
        if key != "EM-classwise":  # (class-wise EM moves by a mean of signs: slowly at this size)
            assert d.abs().max() >= math.floor(ctx.params["eps"]) - 2  # the budget is used, not just respected
    elif spec.norm == "l2":
        radius = l2_radius_255(ctx.params["eps"])
        l2 = d.float().flatten(1).norm(dim=1)
        assert (l2 <= radius + 1e-4).all() and l2.mean() > 0.9 * radius
    elif spec.norm == "l0":
        assert ((d != 0).any(1).flatten(1).sum(1) <= ctx.params["pixels"]).all()


def test_apply_linf_rounds_within_a_fractional_budget(data200):
    clean = data200.images[:50]
    delta = (torch.rand(clean.shape) * 2 - 1) * 3.5  # up to ±3.5 levels: 3.5 rounds to 4 without care
    out = apply_linf(clean, delta, 3.5)
    d = delta_of(data200.subset(range(50)), out)
    assert d.abs().max() == 3
    assert out.dtype == torch.uint8


def test_apply_l2_never_exceeds_the_radius(data200):
    clean = data200.images[:100]
    radius = l2_radius_255(6.0)
    delta = torch.randn(clean.shape)
    delta *= radius / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # every image exactly on the sphere
    out = apply_l2(clean, delta, radius)
    l2 = (out.float() - clean.float()).flatten(1).norm(dim=1)
    clipped = ((clean.float() + delta).clamp(0, 255) - clean.float()).flatten(1).norm(dim=1)
    assert (l2 <= radius + 1e-4).all()
    assert (l2 > 0.97 * clipped).all()  # only clipping at 0/255 and rounding take anything away


# --------------------------------------------------------------------------- class-wise vs sample-wise


@pytest.mark.parametrize("key", ["URP", "OPS", "EM-classwise"])
def test_classwise_poisons_use_one_pattern_per_class(crafted, data200, key):
    _, _, res = crafted[key]
    d = delta_of(data200, res.images)
    patterns = []
    for c in range(10):
        sel = data200.labels == c
        dc, xc, pc = d[sel], data200.images[sel], res.images[sel]
        if key == "OPS":
            changed = (dc != 0).any(1)  # [n, 32, 32]
            where = changed.flatten(1).any(0)
            assert where.sum() == 1  # one position for the whole class
            pos = int(torch.nonzero(where))
            values = pc.flatten(2)[:, :, pos]
            assert (values == values[0]).all()  # one colour for the whole class
            patterns.append((pos, tuple(values[0].tolist())))
        else:
            # where no image of the class is clipped, every image carries the same change
            free = ((xc > 8) & (xc < 247)).all(0)
            ref = dc[0][free]
            assert all(torch.equal(row[free], ref) for row in dc)
            patterns.append(ref[:50].tolist())
    assert len({str(p) for p in patterns}) == 10  # and the classes' patterns differ


def test_cuda_uses_one_kernel_per_class(crafted, data200):
    _, _, res = crafted["CUDA"]
    kernels = torch.tensor(res.info["kernels"])  # [10, 3, 3]
    assert kernels.shape == (10, 3, 3) and not torch.equal(kernels[0], kernels[1])
    x = data200.images.float() / 255
    for c in range(10):
        sel = data200.labels == c
        y = F.conv2d(x[sel], kernels[c].expand(3, 1, 3, 3), padding=1, groups=3)
        y = (y / y.flatten(1).amax(1).view(-1, 1, 1, 1)).mul(255).round()
        assert (y - res.images[sel].float()).abs().max() <= 1


@pytest.mark.parametrize("key", SAMPLE_WISE)
def test_samplewise_poisons_differ_per_image(crafted, data200, key):
    _, _, res = crafted[key]
    d = delta_of(data200, res.images).flatten(1)
    for c in range(10):
        dc = d[data200.labels == c]
        distinct = len({tuple(row.tolist()) for row in dc})
        assert distinct == len(dc), f"class {c}: {distinct} distinct perturbations for {len(dc)} images"


# --------------------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("key", NON_MODEL + ["EM"])
def test_same_seed_same_bytes(crafted, data200, tmp_path, key):
    _, _, first = crafted[key]
    data = data200
    if key == "EM":  # a fresh, smaller run twice instead of repeating the fixture's
        data = data200.subset(range(40))
        first = craft(tmp_path / "a", data, key)[2]
    again = craft(tmp_path / "b", data, key)[2]
    assert torch.equal(first.images, again.images)
    if key in ("URP", "LSP", "AR"):
        other = craft(tmp_path / "c", data, key, seed=1)[2]
        assert not torch.equal(first.images, other.images)


# --------------------------------------------------------------------------- what each poison does


def test_em_lowers_the_surrogates_loss(crafted):
    for key in ("EM", "EM-classwise"):
        s = crafted[key][2].info["surrogate"]
        assert s["train_loss_poisoned"] < s["train_loss_clean"], s
        assert s["train_acc_poisoned"] > s["train_acc_clean"], s


@pytest.mark.parametrize("key,shift", [("TAP", 1), ("SEP", 5)])
def test_targeted_poisons_move_predictions_to_their_targets(crafted, data200, key, shift):
    _, ctx, res = crafted[key]
    models = [res.surrogate] if key == "TAP" else res.extra_models
    target = (data200.labels + shift) % 10
    from utils.poisons.common import eval_logits

    def stats(images):
        # the ensemble's mean probabilities (SEP's gradient is the ensemble's mean too)
        prob = sum(eval_logits(m, images, ctx.device, True).softmax(1) for m in models) / len(models)
        hit = (prob.argmax(1) == target).float().mean().item()
        return hit, -prob.gather(1, target[:, None]).log().mean().item()

    hit_clean, ce_clean = stats(data200.images)
    hit_poison, ce_poison = stats(res.images)
    # tiny, barely trained surrogates are smooth and hard to fool outright, so the test asks
    # for a clear move toward the target rather than the near-100 % of trained ones
    assert ce_poison < 0.8 * ce_clean, (ce_clean, ce_poison)
    assert hit_poison > hit_clean + 0.1, (hit_clean, hit_poison)


def test_sep_checkpoint_rule_follows_the_reference():
    from utils.poisons.sep import select_checkpoints
    from utils.poisons.surrogate import SurrogateConfig, improving_epochs

    # vanilla.py writes a checkpoint whenever test accuracy beats every earlier epoch
    assert improving_epochs([10, 30, 25, 40, 40, 55, 50, 60]) == [0, 1, 3, 5, 7]
    # ens.py: every (saved // count)-th from that index, the start moved back until exactly count
    assert select_checkpoints(5, 2) == [2, 4]
    assert select_checkpoints(60, 30) == list(range(1, 60, 2))
    assert select_checkpoints(45, 30) == list(range(15, 45))
    assert select_checkpoints(30, 30) == list(range(30))
    assert select_checkpoints(3, 4) == [0, 1, 2]  # fewer saved than asked: all of them
    # epoch 0 warms the lr up linearly from 0.001 over its batches
    cfg = SurrogateConfig(epochs=3, lr=0.1, milestones=(2,), warmup_first_epoch=True)
    assert cfg.lr_at(0, 0, 10) == pytest.approx(0.001 + 0.099 / 10)
    assert cfg.lr_at(0, 9, 10) == pytest.approx(0.1) and cfg.lr_at(1) == 0.1 and cfg.lr_at(2) == pytest.approx(0.01)


def test_sep_ensemble_is_made_of_improving_checkpoints(crafted):
    _, _, res = crafted["SEP"]
    history = res.info["surrogate"]["training"]["history"]
    saved = [h["epoch"] for h in history if h["snapshot"]]
    best = 0.0
    for h in history:
        assert h["snapshot"] == (h["test_acc"] > best)
        best = max(best, h["test_acc"])
    assert saved[0] == 1 and res.info["saved_checkpoint_epochs"] == saved
    assert set(res.info["checkpoint_epochs"]) <= set(saved) and len(res.extra_models) == len(
        res.info["checkpoint_epochs"]
    )


def test_craft_pgd_keeps_the_restart_with_the_lowest_total_loss(tmp_path, data200):
    """TAP's reference scores each restart by its loss over the whole set and keeps that
    restart for every image; picking the best restart per image would mix them."""
    from utils.poisons.crafting import craft_pgd

    data = data200.subset(range(40))
    _, ctx = make_ctx(tmp_path, data, "TAP")
    seen = []  # (restart's images, x) as the loss sees them, in call order

    def loss(model, x, y, idx):
        seen.append((idx.clone(), x.detach().clone()))
        return (x - 0.5).pow(2).flatten(1).mean(1) * 100  # per-sample, differs by the random start

    delta = craft_pgd(ctx, "t", [torch.nn.Identity()], loss, eps=8, step=0.0, steps=1, batch_size=20,
                      init="randn", restarts=3)  # fmt: skip
    assert len(seen) == 6  # 3 restarts x 2 batches, one step each
    starts = torch.stack([torch.cat([x for _, x in seen[2 * r : 2 * r + 2]]) for r in range(3)])  # [3, 40, ...]
    per_image = (starts - 0.5).pow(2).flatten(2).mean(2) * 100  # [3, 40]
    best = int(per_image.sum(1).argmin())
    want = starts[best] * 255 - data.images.float()
    assert torch.allclose(delta, want, atol=0.02)  # every image from the best restart (float16 storage)
    assert not torch.equal(per_image.argmin(0), torch.full((40,), best))  # per-image choice would differ


def test_shift_is_bilinear_with_mean_colour_padding():
    from utils.poisons.common import CIFAR10_MEAN_RGB, shift_image

    ramp = (torch.arange(32.0) / 31).expand(1, 3, 32, 32).clone()  # x[c, i, j] = j / 31
    mean = torch.tensor(CIFAR10_MEAN_RGB).view(3, 1)
    out = shift_image(ramp, torch.tensor([[1.5, 0.0]]), torch.tensor([False]))[0]
    j = torch.arange(30.0)
    assert torch.allclose(out[:, :, :30], ((j + 1.5) / 31).expand(3, 32, 30), atol=1e-5)  # sub-pixel: interpolated
    assert torch.allclose(out[:, :, 30], (0.5 * 1.0 + 0.5 * mean).expand(3, 32), atol=1e-5)  # half off the edge
    assert torch.allclose(out[:, :, 31], mean.expand(3, 32), atol=1e-5)  # wholly outside: the mean colour
    flipped = shift_image(ramp, torch.tensor([[1.5, 0.0]]), torch.tensor([True]))[0]
    back = shift_image(ramp, torch.tensor([[-1.5, 0.0]]), torch.tensor([False]))[0]
    assert torch.allclose(flipped, back.flip(-1), atol=1e-5)  # the reference mirrors the shifted grid
    rows = ramp.transpose(2, 3)  # x[c, i, j] = i / 31, shifted up by a quarter pixel
    up = shift_image(rows, torch.tensor([[0.0, -0.25]]), torch.tensor([False]))[0]
    i = torch.arange(1.0, 32.0)
    assert torch.allclose(up[:, 1:, 5], ((i - 0.25) / 31).expand(3, 31), atol=1e-5)
    assert torch.allclose(up[:, 0, 5], 0.25 * mean[:, 0], atol=1e-5)  # 3/4 of pixel 0 (= 0) + 1/4 padding


def test_tap_and_efp_default_to_the_references_shift():
    from utils.poisons.common import AUGMENTS, shift_flip

    for name in ("TAP", "EFP"):
        assert resolve_params(get_poison(name), {})["augment"] == "shift_flip"
    assert AUGMENTS["shift_flip"]() is shift_flip
    assert resolve_params(get_poison("TAP"), {})["restarts"] == 8
    assert "--restarts 1" in get_poison("TAP").cpu_flags
    x = torch.rand(6, 3, 32, 32, requires_grad=True)
    shift_flip(x, torch.Generator().manual_seed(0)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_em_classwise_crafts_on_a_stratified_fifth(crafted, data200):
    """The reference's class-wise command (--use_subset) steps the patterns on 20 % of the
    images, class-stratified, and stops at error 0.1 there (the surrogate trains on every
    image: tests/test_poisons_reference.py); the patterns then cover every image."""
    params = resolve_params(get_poison("EM"), {"classwise": True})
    assert params["portion"] == 0.2 and params["stop_acc"] == 90.0 and params["pgd_steps"] == 1
    _, ctx, res = crafted["EM-classwise"]
    assert res.info["crafted_on_images"] == 40  # 20 % of 200
    from utils.poisons.minmin import MinMin, MinMinConfig

    sub = data200.subset(class_balanced_subset(data200.labels, 40, 0))
    loop = MinMin(ctx, MinMinConfig(eps=8, step_size=1, pgd_steps=1, classwise=True), res.surrogate, None, sub)
    assert len(loop.images) == 40 and torch.bincount(loop.labels, minlength=10).tolist() == [4] * 10
    with pytest.raises(Exception, match="--portion applies to EM --classwise only"):
        resolve_params(get_poison("EM"), {"portion": 0.5})


def test_lsp_and_cuda_truncate_to_uint8_like_their_references(crafted, data200):
    for name in ("LSP", "CUDA"):
        assert resolve_params(get_poison(name), {})["quantize"] == "truncate"
    # LSP: astype(uint8) of the float image = floor(clean + delta) where the budget allows it
    clean = data200.images[:4]
    delta = torch.tensor([-0.3, 0.3, 1.7, -1.2]).repeat(3072).view(4, 3, 32, 32)
    out = apply_l2(clean, delta, radius_255=1000.0, quantize="truncate")
    free = (clean > 2) & (clean < 253)
    assert torch.equal((out.int() - clean.int())[free], delta.floor().int()[free])
    rounded = apply_l2(clean, delta, radius_255=1000.0, quantize="round")
    assert torch.equal((rounded.int() - clean.int())[free], delta.round().int()[free])
    at_radius = apply_l2(clean, delta * 50, radius_255=l2_radius_255(6.0), quantize="truncate")
    assert ((at_radius.float() - clean.float()).flatten(1).norm(dim=1) <= l2_radius_255(6.0) + 1e-4).all()
    # CUDA: (conv / max) * 255 truncated
    _, _, res = crafted["CUDA"]
    kernels = torch.tensor(res.info["kernels"])
    x = data200.images.float() / 255
    for c in range(10):
        sel = data200.labels == c
        y = F.conv2d(x[sel], kernels[c].expand(3, 1, 3, 3), padding=1, groups=3)
        want = (y / y.flatten(1).amax(1).view(-1, 1, 1, 1)).clamp(0, 1).mul(255).floor()
        got = res.images[sel].float()
        # (float summation order may move a value sitting on an integer by one level)
        assert (want - got).abs().max() <= 1 and (want == got).float().mean() > 0.999


def test_efp_push_moves_features_away_from_the_own_centroid(crafted, data200):
    from utils.poisons.efp import class_centroids

    _, ctx, res = crafted["EFP"]
    cent = class_centroids(res.surrogate, ctx)

    def own_distance(images):
        from utils.adversarial import forward
        from utils.augment import to_float

        with torch.no_grad():
            f = forward(res.surrogate.eval(), to_float(images), True, features=True)
        return ((f - cent[data200.labels]) ** 2).mean(1)

    assert own_distance(res.images).mean() > 1.2 * own_distance(data200.images).mean()


def test_lsp_perturbations_are_linearly_separable(crafted, data200):
    _, _, res = crafted["LSP"]
    d = delta_of(data200, res.images).float().flatten(1) / 255
    y = data200.labels
    train, test = torch.arange(len(y)) % 2 == 0, torch.arange(len(y)) % 2 == 1
    torch.manual_seed(0)
    lin = torch.nn.Linear(d.shape[1], 10)
    opt = torch.optim.Adam(lin.parameters(), lr=0.01)
    for _ in range(200):
        loss = F.cross_entropy(lin(d[train] * 10), y[train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    held_out = (lin(d[test] * 10).argmax(1) == y[test]).float().mean()
    assert held_out >= 0.95, float(held_out)  # a linear classifier on the perturbations alone


def test_ar_filters_single_out_their_own_class(crafted, data200):
    _, _, res = crafted["AR"]
    windows = torch.tensor(res.info["ar_windows"])
    d = delta_of(data200, res.images).float() / 255
    r = responses(filters_of(windows), d)  # [N, 10]
    # the AR "perfect model": a class's filter annihilates its own process, so the
    # own-class response is the smallest and 1 - response (its logit) the largest
    assert (r.argmin(1) == data200.labels).float().mean() >= 0.95
    own = r.gather(1, data200.labels[:, None]).squeeze(1)
    assert (own < 0.5 * r.median(1).values).float().mean() >= 0.95


def test_ar_search_uses_the_reference_criteria():
    """The reference keeps a candidate only when every earlier class's filter responds to
    it with >= 10 (CIFAR-10) after rejecting raw crop norms above 50; the old search (3 and
    277) kept processes the earlier filters barely tell apart (median 4.7 on this seed)."""
    from utils.poisons.ar import NORM_BOUND, find_processes, generate

    windows = find_processes(torch.Generator().manual_seed(2), classes=5)
    g = torch.Generator().manual_seed(9)
    filters = filters_of(windows)
    lowest_vs_earlier = []
    for c in range(len(windows)):
        s, raw = generate(windows[c : c + 1].expand(20, -1, -1, -1), g)
        assert (raw <= 2 * NORM_BOUND).float().mean() >= 0.9  # stable processes
        r = responses(filters, s / s.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).median(0).values
        if c:
            lowest_vs_earlier.append(float(r[:c].min()))
    assert torch.tensor(lowest_vs_earlier).median() >= 9.0, lowest_vs_earlier


def test_ar_search_short_of_processes_is_a_one_line_error():
    from utils.poisons.ar import find_processes

    with pytest.raises(UserError, match=r"AR: found only \d+ of the 5 separable AR processes needed") as e:
        find_processes(torch.Generator().manual_seed(2), classes=5, max_candidates=40, batch=40)
    assert "\n" not in str(e.value)


def test_ar_bounded_scan_drops_exactly_the_runaway_samples():
    from utils.poisons.ar import generate, random_windows

    w = random_windows(300, torch.Generator().manual_seed(0))
    full, raw = generate(w, torch.Generator().manual_seed(1))
    cut, raw_cut = generate(w, torch.Generator().manual_seed(1), bound=50.0)
    kept = raw <= 50.0
    assert kept.any() and (~kept).any()
    assert torch.equal(raw_cut <= 50.0, kept)
    assert torch.allclose(cut[kept], full[kept]) and torch.isinf(raw_cut[~kept]).all()


def test_ops_search_matches_the_reference_score(data200):
    imgs = data200.images[data200.labels == 3]
    scores = position_scores(imgs)
    x = imgs.double().div(255).flatten(2)  # [n, 3, 1024]
    for pos, colour in [(0, 0), (517, 5), (1023, 7)]:
        v = (COLOURS[colour][None, :] - x[:, :, pos]).abs()  # [n, 3]
        assert torch.isclose(scores[pos, colour], v.mean() / v.std(unbiased=False))


def test_compensation_is_differentiable(data200):
    x = (data200.images[:8].float() / 255).requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    y = compensation_float(0.4, 0.05)(x, g)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_unet_classifier_and_adp(tmp_path, data200):
    """ADP through a random-weight CPU-scale UNet: budget, classifier head, surrogate trains."""
    from models.unet_classifier import UNetClassifier
    from utils.diffusion.factory import load_diffusion_spec

    spec = load_diffusion_spec("config/eclipse/cpu.yml")
    torch.manual_seed(0)
    ckpt = tmp_path / "diff_ckpt" / "cifar10" / "tiny" / "ema_0.9999_5.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save(spec.build_model().state_dict(), ckpt)
    clf = UNetClassifier(spec.build_model(), NUM_CLASSES)
    out = clf(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10) and clf.features(torch.rand(2, 3, 32, 32)).shape == (2, 32)

    data = data200.subset(range(0, 200, 5))
    p_spec, ctx = make_ctx(
        tmp_path,
        data,
        "ADP",
        diff_config="cpu.yml",
        sparse_set="tiny",
        sparse_diff_model="ema_0.9999_5.pt",
        pgd_steps=2,
        step_size=2.0,
        train_steps=2,
        train_batch=20,
        batch_size=40,
        max_rounds=1,
    )
    ctx.work = tmp_path
    from utils.poisons import get_craft

    res = get_craft(p_spec)(ctx)
    d = delta_of(data, res.images)
    assert res.images.dtype == torch.uint8 and 0 < d.abs().max() <= 8
    assert isinstance(res.surrogate, UNetClassifier)
    # reproducible: the classifier head is seeded, whatever the global RNG did before
    torch.rand(7)
    ctx.state_dir = tmp_path / "state2"
    assert torch.equal(get_craft(p_spec)(ctx).images, res.images)


def test_registry_is_complete():
    assert set(POISONS) == {"EM", "TAP", "REM", "SEP", "EFP", "URP", "LSP", "AR", "ADP", "OPS", "CUDA"}
    for spec in POISONS.values():
        assert spec.norm in ("linf", "l2", "l0", "none")
        resolve_params(spec, {})  # the defaults validate
