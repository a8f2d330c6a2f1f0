"""Unit tests for ``utils/dataelixir/defence.py`` (DataElixir, AAAI 2024), one group per defence step.

Every case is built by hand and its expected values are worked out in the comments. The
semantics checked are those of the reference implementation (``utils/purify_utils.py``
of Manu21JC/DataElixir); where this module deviates on purpose (documented in its
docstrings) the test says so. No CIFAR-10 is needed: the diffusion model and the
classifier of the candidate tests are tiny random networks.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn as nn

from utils.augment import to_float, to_uint8
from utils.dataelixir import candidate_store as cs
from utils.dataelixir import defence as de
from utils.dataelixir.keys import apply_reference_exact
from utils.dataelixir.outputs import candidate_label_rates
from utils.diffusion.factory import spec_from_dict
from utils.diffusion.purify import chunk_seed, from_model_range, noise_and_denoise, to_model_range
from utils.fileio import UserError

L = torch.long


pytestmark = pytest.mark.usefixtures("one_thread")


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=L)


# --------------------------------------------------------------------------- 2. label transition


def test_label_transition_hand_cases():
    # column 0 = the backdoored model's label of the original, columns 1..6 = intermediaries
    preds = _t(
        [
            [3, 3, 3, 3, 3, 3, 3],  # r0: all one label, same as the original -> no transition
            [3, 5, 5, 5, 5, 5, 5],  # r1: unanimous intermediaries (5) != original (3) -> keep all, transition
            [3, 5, 3, 5, 5, 1, 5],  # r2: counts 5:4, 3:1, 1:1; second = 1 < tau -> original + the 5s
            [3, 5, 3, 5, 3, 5, 1],  # r3: counts 5:3, 3:2, 1:1; second = 2 >= tau -> keep all, mixed
            [0, 7, 2, 2, 7, 1, 1],  # r4: three-way tie 2:2:2 -> majority 7 (seen first); second 2 >= tau
            [4, 4, 4, 1, 4, 4, 4],  # r5: counts 4:5, 1:1 -> the 1 is dropped, kept labels all 4 -> no transition
        ]
    )
    out = de.label_transition(preds, tau=2, num_classes=10)
    T, F = True, False
    assert out.kept.tolist() == [
        [T, T, T, T, T, T, T],
        [T, T, T, T, T, T, T],
        [T, T, F, T, T, F, T],
        [T, T, T, T, T, T, T],
        [T, T, T, T, T, T, T],
        [T, T, T, F, T, T, T],
    ]
    assert out.transition.tolist() == [F, T, T, T, T, F]
    assert out.majority.tolist() == [3, 5, 5, 5, 7, 4]
    # r2 after filtering keeps only 5s -> unanimous; r3/r4 keep everything -> mixed
    assert out.inter_unanimous.tolist() == [T, T, T, F, F, T]


def test_label_transition_tau_boundary_and_first_seen_tie():
    # counts 2:2, 7:2, 4:2 (2 seen first). tau = 2: second count 2 >= 2 -> keep all.
    # tau = 3: 2 < 3 -> keep the original and the intermediaries equal to the majority, 2.
    row = [0, 2, 7, 7, 2, 4, 4]
    assert Counter(row[1:]).most_common(1)[0][0] == 2  # what the reference's Counter picks
    keep_all = de.label_transition(_t([row]), tau=2)
    assert keep_all.kept.all() and not keep_all.inter_unanimous[0]
    filt = de.label_transition(_t([row]), tau=3)
    assert filt.kept[0].tolist() == [True, True, False, False, True, False, False]
    assert filt.majority.tolist() == [2] and filt.inter_unanimous.tolist() == [True]
    assert filt.transition.tolist() == [True]  # kept labels {0, 2}
    # numpy input works the same way; a row without intermediaries is an error
    assert torch.equal(de.label_transition(np.array([row]), tau=3).kept, filt.kept)
    with pytest.raises(ValueError):
        de.label_transition(_t([[1], [2]]), tau=2)


def _oracle_transition(row: list[int], tau: int):
    """The step written with ``collections.Counter`` over Python lists, one row at a time."""
    inter = row[1:]
    c = Counter(inter)
    majority = c.most_common(1)[0][0]
    keep_all = len(c) == 1 or c.most_common(2)[1][1] >= tau
    kept = [True] + [keep_all or v == majority for v in inter]
    labels = [v for v, k in zip(row, kept) if k]
    return kept, len(set(labels)) != 1, majority, len(set(labels[1:])) == 1


@pytest.mark.parametrize("tau", [1, 2, 3, 5])
def test_label_transition_matches_counter_oracle(tau):
    # 3 classes over 10 intermediaries: many ties, so the first-seen tie rule is exercised
    g = torch.Generator().manual_seed(tau)
    preds = torch.randint(0, 3, (300, 11), generator=g)
    preds[:40, 1:] = preds[:40, 1:2]  # some unanimous rows
    out = de.label_transition(preds, tau=tau, num_classes=3)
    for i, row in enumerate(preds.tolist()):
        kept, trans, maj, unan = _oracle_transition(row, tau)
        assert out.kept[i].tolist() == kept, row
        assert bool(out.transition[i]) == trans, row
        assert int(out.majority[i]) == maj, row
        assert bool(out.inter_unanimous[i]) == unan, row


# --------------------------------------------------------------------------- 3. target labels


def test_kl_onehot():
    # KL(onehot(i) || q) = sum_j p_j log(p_j / q_j) = log(1 / q_i)
    h = np.array([2.0, 6.0, 0.0, 0.0])
    assert de.kl_onehot(h, 0) == pytest.approx(math.log(4))  # q0 = 2/8
    assert de.kl_onehot(h, 1) == pytest.approx(math.log(8 / 6))  # q1 = 6/8
    assert de.kl_onehot(h, 2) == math.inf  # q2 = 0
    assert math.isnan(de.kl_onehot(np.zeros(4), 1))  # no histogram
    stats = pytest.importorskip("scipy.stats")
    for i in range(3):
        assert de.kl_onehot(h, i) == pytest.approx(stats.entropy(np.eye(4)[i], h / h.sum()), rel=1e-12)


def _detection_case():
    """Five classes, four candidates per sample (original + 3 intermediaries).

    Kept labels of transitioning samples, per dataset label:
      0: [0,0,0,1]                        -> hist [3,1,0,0,0], q0 = 3/4, KL = log(4/3)
         [0,0,0,0] does not transition    -> not counted
      1: [1,2,1,1]                        -> hist [0,3,1,0,0], q1 = 3/4, KL = log(4/3)
      2: [2,4,(3),4], the 3 not kept      -> hist [0,0,1,0,2], q2 = 1/3, KL = log 3
      3: [3,4,4,4] + [4,4,4,1]            -> hist [0,1,0,1,6], q3 = 1/8, KL = log 8
         [4,4,4,4] does not transition    -> not counted (a fully converted poisoned sample)
      4: [4,4,4,4] only, no transition    -> empty histogram: KL NaN, score 0
    """
    preds = _t(
        [
            [0, 0, 0, 1],
            [0, 0, 0, 0],
            [1, 2, 1, 1],
            [2, 4, 3, 4],
            [3, 4, 4, 4],
            [4, 4, 4, 1],
            [4, 4, 4, 4],
            [4, 4, 4, 4],
        ]
    )
    labels = _t([0, 0, 1, 2, 3, 3, 3, 4])
    kept = torch.ones(preds.shape, dtype=torch.bool)
    kept[3, 2] = False
    transition = (kept & (preds != preds[:, :1])).any(1)
    assert transition.tolist() == [True, False, True, True, True, True, False, False]
    return preds, kept, transition, labels


def test_detect_target_labels_hand_case():
    preds, kept, transition, labels = _detection_case()
    det = de.detect_target_labels(preds, kept, transition, labels, num_classes=5)
    assert det.histograms.tolist() == [
        [3, 1, 0, 0, 0],
        [0, 3, 1, 0, 0],
        [0, 0, 1, 0, 2],
        [0, 1, 0, 1, 6],
        [0, 0, 0, 0, 0],
    ]
    assert det.transitioning_per_class == [1, 1, 1, 2, 0]
    m = det.metrics
    assert m[:4] == pytest.approx([math.log(4 / 3), math.log(4 / 3), math.log(3), math.log(8)], rel=1e-12)
    assert math.isnan(m[4])
    # median of the 4 valid metrics = (log(4/3) + log 3) / 2 = log 2;
    # deviations: log(3/2), log(3/2), log(3/2), log 4 -> MAD = log(3/2)
    assert det.median == pytest.approx(math.log(2), rel=1e-12)
    assert det.mad == pytest.approx(math.log(1.5), rel=1e-12)
    a = math.log(1.5)
    small = a / 1.4826 / (a + 1e-6)  # ~ 0.6745, the normal-consistency constant
    big = math.log(4) / 1.4826 / (a + 1e-6)  # ~ 2.306 > 2 -> class 3 (dominated by 4) is a target
    assert det.scores.tolist() == pytest.approx([small, small, small, big, 0.0], rel=1e-12)
    assert big == pytest.approx(2.3061, abs=1e-4)
    assert det.targets == [3]
    # the same median/MAD arithmetic written directly with numpy on the valid metrics
    v = m[:4]
    med = np.median(v)
    mad = np.median(np.abs(v - med))
    assert det.scores[:4] == pytest.approx(np.abs(v - med) / 1.4826 / (mad + 1e-6), rel=1e-12)
    # a higher threshold detects nothing
    assert de.detect_target_labels(preds, kept, transition, labels, 5, threshold=2.4).targets == []


def test_detect_target_labels_matches_reference_arithmetic_without_empty_classes():
    # with every class non-empty this is exactly the reference's arithmetic:
    # scipy.stats.entropy(onehot, q) per class, then median / MAD over all classes
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    n, k, c = 400, 6, 4
    labels = torch.randint(0, c, (n,), generator=g)
    preds = torch.where(torch.rand(n, k, generator=g) < 0.7, labels[:, None], torch.randint(0, c, (n, k), generator=g))
    preds[labels == 2, 1:] = torch.where(torch.rand(int((labels == 2).sum()), k - 1, generator=g) < 0.8, 0, 2)
    ident = de.label_transition(preds, tau=2, num_classes=c)
    det = de.detect_target_labels(preds, ident.kept, ident.transition, labels, num_classes=c)
    metrics = []
    for i in range(c):
        kept_labels = [
            int(preds[s, j])
            for s in range(n)
            if labels[s] == i and ident.transition[s]
            for j in range(k)
            if ident.kept[s, j]
        ]
        q = np.array([kept_labels.count(j) / len(kept_labels) for j in range(c)])
        metrics.append(stats.entropy(np.eye(c)[i], q))
    metrics = np.array(metrics)
    med = np.median(metrics)
    scores = np.abs(metrics - med) / 1.4826 / (np.median(np.abs(metrics - med)) + 1e-6)
    assert det.metrics == pytest.approx(metrics, rel=1e-12)
    assert det.scores == pytest.approx(scores, rel=1e-12)
    assert det.targets == np.flatnonzero(scores > 2).tolist() == [2]


def test_detect_target_labels_edge_cases():
    # no sample transitions at all: every class empty -> no target, NaN median
    preds = _t([[1, 1, 1], [0, 0, 0]])
    kept = torch.ones(2, 3, dtype=torch.bool)
    det = de.detect_target_labels(preds, kept, torch.tensor([False, False]), _t([1, 0]), num_classes=3)
    assert det.targets == [] and det.scores.tolist() == [0.0, 0.0, 0.0] and math.isnan(det.median)
    # class 0 never among its own kept labels: KL = inf, |inf - median| = inf -> a target
    preds = _t([[1, 1, 2], [1, 1, 2], [2, 2, 1], [0, 3, 0], [3, 3, 0]])
    labels = _t([0, 1, 2, 3, 3])
    kept = torch.ones(5, 3, dtype=torch.bool)
    trans = (preds != preds[:, :1]).any(1)
    det = de.detect_target_labels(preds, kept, trans, labels, num_classes=4)
    # hists: class 0 [0,2,1,0] -> q0 = 0, KL inf; class 1 [0,2,1,0] and class 2 [0,1,2,0]
    # -> q = 2/3, KL log 1.5; class 3 [2,0,0,1] + [1,0,0,2] = [3,0,0,3] -> q3 = 1/2, KL log 2.
    # median (log 1.5 + log 2)/2; deviations inf, d, d, d with d = log(4/3)/2 -> MAD d:
    # scores inf, ~0.674, ~0.674, ~0.674 -> only class 0
    assert det.histograms[3].tolist() == [3, 0, 0, 3]
    assert det.metrics[0] == math.inf
    assert det.metrics[1:] == pytest.approx([math.log(1.5), math.log(1.5), math.log(2)])
    assert det.mad == pytest.approx(math.log(4 / 3) / 2)
    assert det.scores[0] == math.inf and det.targets == [0]


def test_detect_target_labels_infinite_median_warns_instead_of_scoring_nan():
    # hand-made histograms: classes 0 and 1 never keep their own label among the kept labels
    # of their transitioning samples (their originals' labels not kept: KL = -log 0 = inf),
    # class 2 keeps it in 2 of 3 (KL log 1.5), class 3 has no transitioning sample (NaN, left
    # out). The median of [inf, inf, log 1.5] is inf: the reference's |inf - inf| = NaN gives
    # every class a NaN score, and then "target label: []"
    preds = _t([[0, 1, 1], [1, 2, 2], [2, 0, 2], [3, 3, 3]])
    labels = _t([0, 1, 2, 3])
    kept = torch.ones(4, 3, dtype=torch.bool)
    kept[0, 0] = kept[1, 0] = False
    trans = torch.tensor([True, True, True, False])
    det = de.detect_target_labels(preds, kept, trans, labels, num_classes=4)
    assert det.histograms[:3].tolist() == [[0, 2, 0, 0], [0, 0, 2, 0], [1, 0, 2, 0]]
    assert det.metrics[:2].tolist() == [math.inf, math.inf] and det.metrics[2] == pytest.approx(math.log(1.5))
    assert det.median == math.inf and np.isnan(det.scores[:3]).all() and det.scores[3] == 0.0
    assert det.targets == []
    assert det.warning is not None and "\n" not in det.warning
    assert "infinite for classes [0, 1]" in det.warning and "finite for [2]" in det.warning
    assert "no target label is detected" in det.warning
    # with a finite median the infinite class is scored (a target) and nothing is said
    preds = _t([[1, 1, 2], [1, 1, 2], [2, 2, 1], [0, 3, 0], [3, 3, 0]])
    trans = (preds != preds[:, :1]).any(1)
    det = de.detect_target_labels(preds, torch.ones(5, 3, dtype=torch.bool), trans, _t([0, 1, 2, 3, 3]), 4)
    assert det.targets == [0] and det.warning is None
    # no transition at all: nothing to score, said so
    det = de.detect_target_labels(preds, torch.ones(5, 3, dtype=torch.bool), trans & False, _t([0, 1, 2, 3, 3]), 4)
    assert det.targets == [] and "no sample transitions" in det.warning


# --------------------------------------------------------------------------- 4. sorting


def test_sort_samples_hand_case():
    preds = _t(
        [
            [6, 6, 6, 6, 6, 6],  # r0: y=6 (a target), no transition                  -> kept, label 6
            [4, 6, 6, 6, 6, 6],  # r1: y=4 target, intermediaries unanimous 6         -> relabelled to 6
            [2, 6, 6, 6, 6, 6],  # r2: y=2 not a target, unanimous                    -> kept, label 2
            [4, 6, 6, 4, 4, 6],  # r3: y=4 target, 6:3 4:2 (2 >= tau) mixed           -> suspicious, tentative 6
            [2, 6, 6, 4, 4, 6],  # r4: y=2 not a target, mixed                        -> kept, label 2
            [4, 8, 8, 8, 1, 8],  # r5: y=4 target, 8:4 1:1 -> the 1 dropped, unanimous -> relabelled to 8
            [9, 9, 9, 9, 9, 9],  # r6: y=4 target (a label flip the model learnt), no transition -> kept, 4
        ]
    )
    labels = _t([6, 4, 2, 4, 2, 4, 4])
    ident = de.label_transition(preds, tau=2)
    out = de.sort_samples(ident, labels, targets=[4, 6])
    K, R, S = de.KEPT, de.RELABELLED, de.SUSPICIOUS
    assert out.decision.tolist() == [K, R, K, S, K, R, K]
    assert out.label.tolist() == [6, 6, 2, 6, 2, 8, 4]
    # no target -> everything kept with its dataset label
    none = de.sort_samples(ident, labels, targets=np.array([], dtype=int))
    assert none.decision.tolist() == [K] * 7 and torch.equal(none.label, labels)


# --------------------------------------------------------------------------- 5. image selection


def _ssim_numpy(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """skimage.metrics.structural_similarity(a, b, win_size=3, channel_axis=-1) for HWC
    images, written out in float64: a uniform 3x3 mean filter (scipy's ``reflect``
    padding = numpy's ``symmetric``), sample covariances (x 9/8), K1 = 0.01, K2 = 0.03,
    the mean of S over the interior (1-pixel border cropped), averaged over channels."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    h, w, _ = a.shape

    def filt(x):
        p = np.pad(x, 1, mode="symmetric")
        return sum(p[i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0

    per_channel = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        ux, uy = filt(x), filt(y)
        vx = 9 / 8 * (filt(x * x) - ux * ux)
        vy = 9 / 8 * (filt(y * y) - uy * uy)
        vxy = 9 / 8 * (filt(x * y) - ux * uy)
        s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
        per_channel.append(s[1:-1, 1:-1].mean())
    return float(np.mean(per_channel))


def _ssim_pairs():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 3, 9, 11), dtype=np.uint8)  # non-square, to catch a transposition
    noisy = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    b = np.stack([noisy[0], rng.integers(0, 256, a.shape[1:], dtype=np.uint8), 255 - a[2]])
    return a, b  # a correlated pair, an unrelated pair, an anti-correlated pair


def test_ssim_3x3_hand_values():
    a, _ = _ssim_pairs()
    ta = torch.from_numpy(a)
    assert de.ssim_3x3(ta, ta).tolist() == pytest.approx([1.0] * 3, abs=1e-12)
    # flat black vs flat white: all variances 0, ux = 0, uy = 255 ->
    # S = (0 + c1)(0 + c2) / ((0 + 255^2 + c1)(0 + 0 + c2)) = c1 / (65025 + c1), c1 = 2.55^2
    black = torch.zeros(1, 3, 5, 5, dtype=torch.uint8)
    white = torch.full((1, 3, 5, 5), 255, dtype=torch.uint8)
    assert de.ssim_3x3(black, white).item() == pytest.approx(6.5025 / (65025 + 6.5025), rel=1e-12)


def test_ssim_3x3_matches_numpy_reference():
    a, b = _ssim_pairs()
    got = de.ssim_3x3(torch.from_numpy(a), torch.from_numpy(b))
    want = [_ssim_numpy(a[i].transpose(1, 2, 0), b[i].transpose(1, 2, 0)) for i in range(len(a))]
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-14)
    assert want[0] > 0.5 and abs(want[1]) < 0.2 and want[2] < -0.3  # the three pairs are what they claim


def test_ssim_3x3_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    a, b = _ssim_pairs()
    got = de.ssim_3x3(torch.from_numpy(a), torch.from_numpy(b))
    for i in range(len(a)):
        x, y = a[i].transpose(1, 2, 0), b[i].transpose(1, 2, 0)
        want = metrics.structural_similarity(x, y, win_size=3, channel_axis=-1, data_range=255)
        assert got[i].item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def _ssim_numpy_nd(a: np.ndarray, b: np.ndarray, win: int = 3, data_range: float = 255.0) -> float:
    """skimage 0.24's structural_similarity(a, b, win_size=win) with no channel_axis, for an
    array of any dimension -- what DataElixir's ``multichannel=True`` call (an ignored
    keyword there) computes on an HWC image: a uniform win^ndim mean filter (scipy's
    ``reflect`` = numpy's ``symmetric``), covariances x NP/(NP-1), NP = win^ndim, and the
    mean of S after cropping (win-1)//2 from both ends of *every* axis, the channel axis too."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    r = (win - 1) // 2
    n_p = win**a.ndim

    def filt(x):
        p = np.pad(x, r, mode="symmetric")
        out = np.zeros_like(x)
        for off in np.ndindex(*([win] * x.ndim)):
            out += p[tuple(slice(o, o + n) for o, n in zip(off, x.shape))]
        return out / n_p

    x, y = a.astype(np.float64), b.astype(np.float64)
    ux, uy = filt(x), filt(y)
    norm = n_p / (n_p - 1)
    vx = norm * (filt(x * x) - ux * ux)
    vy = norm * (filt(y * y) - uy * uy)
    vxy = norm * (filt(x * y) - ux * uy)
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return float(s[tuple(slice(r, n - r) for n in s.shape)].mean())


def test_ssim_3x3_reference_mode_matches_numpy_skimage_formula():
    a, b = _ssim_pairs()
    got = de.ssim_3x3(torch.from_numpy(a), torch.from_numpy(b), mode="reference")
    want = [_ssim_numpy_nd(a[i].transpose(1, 2, 0), b[i].transpose(1, 2, 0)) for i in range(len(a))]
    assert got.dtype == torch.float64 and got.shape == (3,)
    assert got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-14)
    # it is not the per-channel SSIM
    per_channel = de.ssim_3x3(torch.from_numpy(a), torch.from_numpy(b))
    assert (got - per_channel).abs().max() > 1e-3
    # only the middle channel's positions are scored: changing the green channel of a
    # pixel whose 3x3 neighbourhood stays changes it; so does R (inside the 3x3x3 window)
    x = torch.from_numpy(a[:1]).clone()
    y = x.clone()
    y[0, 0, 4, 5] = 255 - y[0, 0, 4, 5]
    assert de.ssim_3x3(x, y, mode="reference").item() < 1.0
    # a 1-channel image has no interior along the channel axis: refused, not NaN
    with pytest.raises(ValueError, match="channels"):
        de.ssim_3x3(x[:, :1], y[:, :1], mode="reference")
    with pytest.raises(ValueError, match="ssim mode"):
        de.ssim_3x3(x, y, mode="rgb")


def test_ssim_3x3_reference_mode_matches_skimage_0_24():
    metrics = pytest.importorskip("skimage.metrics")
    skimage = pytest.importorskip("skimage")
    if not skimage.__version__.startswith("0.24"):
        pytest.skip("DataElixir pins scikit-image 0.24")
    a, b = _ssim_pairs()
    got = de.ssim_3x3(torch.from_numpy(a), torch.from_numpy(b), mode="reference")
    for i in range(len(a)):
        x, y = a[i].transpose(1, 2, 0).copy(), b[i].transpose(1, 2, 0).copy()
        assert got[i].item() == pytest.approx(metrics.structural_similarity(x, y, multichannel=True, win_size=3))


def test_candidate_distances_ssim_mode(tiny_classifier):
    g = torch.Generator().manual_seed(4)
    cand = torch.randint(0, 256, (2, 3, 3, 32, 32), generator=g, dtype=torch.uint8).numpy()
    rows = np.array([1, 0])
    feats_model = _Features(tiny_classifier)
    per = de.candidate_distances(cand, rows, feats_model, torch.device("cpu"), bf16=False)
    ref = de.candidate_distances(cand, rows, feats_model, torch.device("cpu"), bf16=False, ssim_mode="reference")
    c = torch.from_numpy(cand[rows])
    for mode, d in (("per_channel", per), ("reference", ref)):
        s = de.ssim_3x3(c[:, :1].expand_as(c).reshape(-1, 3, 32, 32), c.reshape(-1, 3, 32, 32), mode=mode)
        feats = feats_model.features(c.reshape(-1, 3, 32, 32).float() / 255).view(2, 3, -1).double()
        cos = torch.nn.functional.cosine_similarity(feats[:, :1], feats, dim=2)
        want = de.selection_distance(s.view(2, 3), cos)
        want[:, 0] = 0
        assert d == pytest.approx(want.numpy(), abs=1e-6)
    assert not np.allclose(per, ref)


class _Features(nn.Module):
    """A classifier with the ``features`` method ``candidate_distances`` needs."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def features(self, x):
        return x.mean(dim=(2, 3)) * torch.tensor([1.0, -2.0, 3.0])


def test_reference_original_round_trip():
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    r = de.reference_original(u)
    # the reference's float32 chain lowers 63 of the 256 byte values by exactly one level
    diff = u.int() - r.int()
    assert int((diff[0, 0] != 0).sum()) == 63 and set(diff.unique().tolist()) == {0, 1}
    assert r[0, 0, 0, 0] == 0 and r[0, 0, 15, 15] == 255  # the ends survive
    # written out as torchvision does it: ToTensor (/255), x*2-1, tensor2img, ToPILImage
    x = u.float().div(255) * 2 - 1
    want = (((x.clamp(-1, 1) + 1) * 0.5).clamp(0, 1) * 255).byte()
    assert torch.equal(r, want)


def test_apply_reference_exact():
    cfg = {"noise_offset": 0, "ssim_mode": "per_channel", "original_round_trip": False, "steps_T": 150}
    assert apply_reference_exact({**cfg, "reference_exact": False}) == {**cfg, "reference_exact": False}
    on = apply_reference_exact({**cfg, "reference_exact": True})
    assert on == {
        "noise_offset": 1,
        "ssim_mode": "reference",
        "original_round_trip": True,
        "steps_T": 150,
        "reference_exact": True,
    }


def test_selection_distance():
    # d = 0.5 (1 - (s+1)/2) + 0.5 (1 - (c+1)/2) = (2 - s - c) / 4
    s = torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    c = torch.tensor([1.0, -1.0, 0.0, 0.6], dtype=torch.float64)
    assert de.selection_distance(s, c).tolist() == pytest.approx([0.0, 1.0, 0.375, 0.35])


def test_select_index_hand_cases():
    d = torch.tensor(
        [
            [0.0, 0.5, 0.1, 0.4, 0.2, 0.3],  # all 6 valid: order 0,2,4,5,3,1; position int(4.8) = 4 -> 3
            [0.0, 0.05, 0.1, 0.4, 0.01, 0.3],  # valid 0,2,3,5: order 0,2,5,3; position int(3.2) = 3 -> 3
            [0.0, 0.2, 0.2, 0.2, 0.2, 0.2],  # ties keep the candidate order: position 4 -> 4
            [0.0, 0.9, 0.8, 0.7, 0.6, 0.5],  # only the original valid: position int(0.8) = 0 -> 0
        ],
        dtype=torch.float64,
    )
    T, F = True, False
    valid = torch.tensor(
        [[T] * 6, [T, F, T, T, F, T], [T] * 6, [T, F, F, F, F, F]],
    )
    assert de.select_index(d, valid).tolist() == [3, 3, 4, 0]
    # had the invalid candidates of row 1 counted: order 0,4,1,2,5,3, position 4 -> 5
    assert de.select_index(d[1:2], torch.ones(1, 6, dtype=torch.bool)).tolist() == [5]
    with pytest.raises(ValueError):
        de.select_index(d[:1], torch.zeros(1, 6, dtype=torch.bool))


def test_select_index_position_is_python_int_of_len_times_0_8():
    # increasing distances: the sorted valid candidates are the first n in order, so the
    # chosen index is the position itself, int(n * 0.8) as Python computes it in float64
    # (n = 15: 12.000000000000002 -> 12; n = 3: 2.4000000000000004 -> 2)
    k = 51
    d = np.tile(np.arange(k, dtype=np.float64), (k, 1))
    valid = np.arange(k)[None, :] < np.arange(1, k + 1)[:, None]  # row r: the first r+1 valid
    got = de.select_index(d, valid).tolist()
    assert got == [int(n * 0.8) for n in range(1, k + 1)]


# --------------------------------------------------------------------------- 6.-8. two stages


def test_stage2_selection():
    stage1 = _t(
        [
            [2, 2, 5, 2, 2, 5],  # tentative 2, original labelled 2 -> consensus; valid 0,1,3,4
            [5, 2, 2, 2, 2, 2],  # tentative 2, original labelled 5 -> no consensus -> -1
            [7, 1, 1, 1, 1, 1],  # tentative 7, consensus, only the original valid -> 0
        ]
    )
    dist = np.array(
        [
            # valid sorted: 0 (0.0), 3 (0.2), 4 (0.3), 1 (0.4); position int(4 * 0.8) = 3 -> 1
            # (with the invalid 2 and 5 counted it would be position 4 of 6 -> candidate 4)
            [0.0, 0.4, 0.1, 0.2, 0.3, 0.05],
            [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
            [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
        ]
    )
    out = de.stage2_selection(stage1, _t([2, 2, 7]), dist)
    assert out.consensus.tolist() == [True, False, True]
    assert out.chosen.tolist() == [1, -1, 0]
    none = de.stage2_selection(stage1[1:2], _t([2]), dist[1:2])
    assert none.consensus.tolist() == [False] and none.chosen.tolist() == [-1]


def test_final_relabel():
    stage2 = _t(
        [
            [3, 3, 1, 3, 1, 3],  # label 3; valid 0,1,3,5 sorted 0 (0), 1 (.1), 5 (.2), 3 (.3); position 3 -> 3
            [8, 1, 1, 1, 1, 1],  # label 8; only the original -> 0
        ]
    )
    dist = np.array([[0.0, 0.1, 0.9, 0.3, 0.05, 0.2], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
    out = de.final_relabel(stage2, dist)
    assert out.label.tolist() == [3, 8] and out.chosen.tolist() == [3, 0]
    empty = de.final_relabel(torch.zeros(0, 6, dtype=L), np.zeros((0, 6)))
    assert empty.label.numel() == 0 and empty.chosen.numel() == 0


def test_tpr_fpr():
    final = [1, 2, 3, 9, 5, 5]
    poisoned_labels = [0, 2, 3, 0, 4, 5]
    indicator = [1, 1, 0, 0, 1, 0]
    # flagged (final != dataset label): 0, 3, 4. Poisoned 0, 1, 4 -> TP = {0, 4} = 2 of 3;
    # clean 2, 3, 5 -> FP = {3} = 1 of 3
    r = de.tpr_fpr(torch.tensor(final), torch.tensor(poisoned_labels), torch.tensor(indicator))
    assert r.tpr == pytest.approx(2 / 3) and r.fpr == pytest.approx(1 / 3)
    assert (r.true_positives, r.false_positives, r.n_poisoned, r.n_clean) == (2, 1, 3, 3)
    # metrics.json's "detection", key for key
    want = {"TPR": r.tpr, "FPR": r.fpr, "true_positives": 2, "false_positives": 1, "n_poisoned": 3, "n_clean": 3}
    assert list(r.as_dict().items()) == list(want.items())
    all_poisoned = de.tpr_fpr(np.array(final), np.array(poisoned_labels), np.ones(6))
    assert all_poisoned.tpr == pytest.approx(3 / 6) and all_poisoned.fpr is None
    all_clean = de.tpr_fpr(final, poisoned_labels, [0] * 6)
    assert all_clean.tpr is None and all_clean.fpr == pytest.approx(3 / 6)


# --------------------------------------------------------------------------- 1. candidates


@pytest.fixture(scope="module")
def tiny_ddpm():
    """A random DDPM small enough for the CPU: 32 channels (GroupNorm needs 32), one level,
    one residual block, no attention but the middle one, 10 linear diffusion steps."""
    spec = spec_from_dict(
        {
            "model": {
                "architecture": "ddpm",
                "ch": 32,
                "ch_mult": [1],
                "num_res_blocks": 1,
                "attn_resolutions": [],
                "dropout": 0.0,
            },
            "diffusion": {"num_diffusion_timesteps": 10},
        },
        "tiny",
    )
    torch.manual_seed(0)
    model = spec.build_model().eval().requires_grad_(False)
    base = spec.build_diffusion()
    assert base.num_timesteps == 10
    return model, base


@pytest.fixture(scope="module")
def tiny_classifier():
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (3, 3, 32, 32), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)


# 3 images in chunks of 2 -> 2 chunks; 2 rounds of 2 reverse steps, both kept -> K = 1 + 2*2 = 5
CAND_KW = dict(steps_T=2, rounds_n=2, last_steps_m=2, batch_size=2, seed=11, bf16=False)


def _chunk(model, base, x, seed, **kw):
    args = dict(steps_T=2, rounds_n=2, last_steps_m=2, respace=None, noise_offset=0, bf16=False)
    args.update(kw)
    return de.build_chunk(model, base, x, generator=torch.Generator().manual_seed(seed), **args)


def test_build_chunk_shape_original_and_rounds(tiny_ddpm, images):
    model, base = tiny_ddpm
    x = images[:1]
    out = _chunk(model, base, x, seed=5)
    assert out.shape == (1, 1 + 2 * 2, 3, 32, 32) and out.dtype == torch.uint8
    assert torch.equal(out[:, 0], x)  # candidate 0: the original bytes, exactly
    assert torch.equal(_chunk(model, base, x, seed=5), out)  # deterministic given the seed
    assert not torch.equal(_chunk(model, base, x, seed=6)[:, 1:], out[:, 1:])
    # layout: round r's last m reverse samples at 1 + r*m .. (oldest first), clamped then
    # truncated like ToPILImage; the next round starts from the clamped final sample
    g = torch.Generator().manual_seed(5)
    cur = to_model_range(x)
    for r in range(2):
        cur, kept = noise_and_denoise(model, base, cur, 2, generator=g, keep_last=2)
        for j, s in enumerate(kept):
            assert torch.equal(out[:, 1 + r * 2 + j], to_uint8(from_model_range(s.clamp(-1, 1))))
        cur = cur.clamp(-1, 1)


def test_build_chunk_original_round_trip(tiny_ddpm, images):
    model, base = tiny_ddpm
    x = images[:1]
    exact = _chunk(model, base, x, seed=5)
    ref = _chunk(model, base, x, seed=5, original_round_trip=True)
    assert torch.equal(ref[:, 0], de.reference_original(x)) and not torch.equal(ref[:, 0], x)
    assert torch.equal(ref[:, 1:], exact[:, 1:])  # the diffusion still starts from the exact bytes


def test_construct_candidates_round_trip_setting(tiny_ddpm, tiny_classifier, images, tmp_path):
    model, base = tiny_ddpm
    cand, _ = de.construct_candidates(
        model, base, tiny_classifier, images, tmp_path / "r", original_round_trip=True, **CAND_KW
    )
    assert np.array_equal(cand[:, 0], de.reference_original(images).numpy())
    with pytest.raises(UserError, match="original_round_trip"):
        de.construct_candidates(model, base, tiny_classifier, images, tmp_path / "r", **CAND_KW)
    # a folder written before the key existed resumes with the default (False)
    de.construct_candidates(model, base, tiny_classifier, images, tmp_path / "o", **CAND_KW)
    meta_p = tmp_path / "o" / "meta.json"
    meta = json.loads(meta_p.read_text())
    del meta["original_round_trip"]
    meta_p.write_text(json.dumps(meta))
    de.construct_candidates(model, base, tiny_classifier, images, tmp_path / "o", **CAND_KW)


def test_construct_candidates_resume_and_settings(tiny_ddpm, tiny_classifier, images, tmp_path):
    model, base = tiny_ddpm
    logs = []
    cand, preds = de.construct_candidates(model, base, tiny_classifier, images, tmp_path / "a", **CAND_KW)
    assert cand.shape == (3, 5, 3, 32, 32) and cand.dtype == np.uint8
    assert preds.shape == (3, 5) and preds.dtype == np.int16
    assert cs.candidates_complete(tmp_path / "a")
    assert np.array_equal(cand[:, 0], images.numpy())
    # labels are the classifier's argmax on [0, 1] inputs
    flat = torch.from_numpy(np.array(cand)).reshape(-1, 3, 32, 32)
    with torch.no_grad():
        want = tiny_classifier(to_float(flat)).argmax(1).view(3, 5)
    assert np.array_equal(np.asarray(preds), want.numpy())
    # chunk c uses the generator seeded from (seed, c) -> the same bytes as build_chunk on it
    c1 = de.build_chunk(
        model,
        base,
        images[2:3],
        steps_T=2,
        rounds_n=2,
        last_steps_m=2,
        respace=None,
        noise_offset=0,
        generator=torch.Generator().manual_seed(chunk_seed(11, 1)),
        bf16=False,
    )
    assert np.array_equal(cand[2:3], c1.numpy())

    # interrupted after one chunk, then completed: byte-identical to the uninterrupted run
    b = tmp_path / "b"
    de.construct_candidates(model, base, tiny_classifier, images, b, max_chunks=1, log=logs.append, **CAND_KW)
    assert not cs.candidates_complete(b)
    assert sorted(p.name for p in (b / "done").iterdir()) == ["chunk_00000"]
    cand_b, preds_b = de.construct_candidates(model, base, tiny_classifier, images, b, log=logs.append, **CAND_KW)
    assert any("1 of 2 chunks already built" in m for m in logs)
    assert cs.candidates_complete(b)
    assert (b / "candidates.u8").read_bytes() == (tmp_path / "a" / "candidates.u8").read_bytes()
    assert (b / "preds.i16").read_bytes() == (tmp_path / "a" / "preds.i16").read_bytes()
    assert np.array_equal(cand_b, cand) and np.array_equal(preds_b, preds)
    opened, opened_preds, meta = cs.open_candidates(b)
    assert meta["k"] == 5 and meta["chunks"] == 2 and np.array_equal(opened, cand)

    # other settings on an existing folder -> UserError naming the difference, nothing touched
    before = (b / "candidates.u8").read_bytes()
    for change in ({"seed": 12}, {"rounds_n": 1}, {"noise_offset": 1}, {"batch_size": 3}):
        with pytest.raises(UserError, match=next(iter(change))):
            de.construct_candidates(model, base, tiny_classifier, images, b, **{**CAND_KW, **change})
    with pytest.raises(UserError, match="other settings"):
        de.construct_candidates(model, base, tiny_classifier, images[:2], b, **CAND_KW)
    assert (b / "candidates.u8").read_bytes() == before

    # bad step counts
    for bad in ({"rounds_n": 0}, {"last_steps_m": 3}, {"steps_T": 0}):
        with pytest.raises(UserError):
            de.construct_candidates(model, base, tiny_classifier, images, tmp_path / "c", **{**CAND_KW, **bad})
    with pytest.raises(UserError, match="purify_respace=1"):
        de.construct_candidates(model, base, tiny_classifier, images, tmp_path / "c", respace=1, **CAND_KW)


class _Recorder(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = []

    def forward(self, x, t):
        self.calls.append((x.clone(), t.clone()))
        return self.net(x, t)


@pytest.mark.parametrize("offset", [0, 1])
def test_noise_offset(tiny_ddpm, images, offset):
    """``noise_offset=0``: x_T = sqrt(a[T-1]) x0 + sqrt(1 - a[T-1]) eps, then reverse steps
    T-1 .. 0 (exact DDPM indexing: step index t holds a_{t+1}). ``noise_offset=1``: noised
    to a[T] while the reverse chain still starts at T-1 -- what the reference does
    (``Diffusion.diffuse_t_steps(x, T)`` uses ``sqrt_alphas_cumprod[T]``, then
    ``denoise(..., curr_step=T)`` runs ``i = T-1 .. 0``)."""
    model, base = tiny_ddpm
    rec = _Recorder(model)
    x = images[:1]
    steps_T = 3
    _chunk(rec, base, x, seed=9, steps_T=steps_T, rounds_n=1, last_steps_m=1, noise_offset=offset)
    assert len(rec.calls) == steps_T
    assert [int(t[0]) for _, t in rec.calls] == [2, 1, 0]  # reverse steps T-1 .. 0 either way
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))  # the first draw of the chunk
    x0 = to_model_range(x)
    a = base.alphas_cumprod[steps_T - 1 + offset]
    want = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
    assert torch.allclose(rec.calls[0][0], want, atol=1e-6)
    other = base.alphas_cumprod[steps_T - offset]  # the other convention differs measurably
    assert not torch.allclose(rec.calls[0][0], math.sqrt(other) * x0 + math.sqrt(1 - other) * eps, atol=1e-4)
    # the reference's noise level for T: index T of alphas_cumprod = offset 1
    ref = np.cumprod(1 - np.linspace(1e-4, 0.02, 10))[steps_T]
    assert (a == pytest.approx(ref, rel=1e-12)) == (offset == 1)


def test_noise_offset_range(tiny_ddpm):
    model, base = tiny_ddpm
    x0 = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError):
        noise_and_denoise(model, base, x0, 10, noise_offset=1)  # would need a[10] of a 10-step process


def test_truncated_steps_dense_tail():
    from utils.diffusion.gaussian_diffusion import truncated_steps

    assert truncated_steps(150, 10) == [0, 17, 33, 50, 66, 83, 99, 116, 132, 149]
    # the last m steps unspaced, the rest spread over m .. T-1 (still ending at T-1)
    assert truncated_steps(150, 10, dense_tail=5) == [0, 1, 2, 3, 4, 5, 41, 77, 113, 149]
    assert truncated_steps(150, 6, dense_tail=5) == [0, 1, 2, 3, 4, 149]
    assert truncated_steps(150, 10, dense_tail=0) == truncated_steps(150, 10)
    assert truncated_steps(8, None, dense_tail=3) == list(range(8))  # nothing respaced: nothing to do
    for bad in (10, -1):
        with pytest.raises(ValueError, match="dense_tail"):
            truncated_steps(150, 10, dense_tail=bad)


def test_dense_tail_kept_samples_use_the_full_chain_steps(tiny_ddpm, images):
    """With a dense tail the last m reverse steps call the network at original steps m-1 .. 0
    and use the original per-step variances, so the kept candidates sit at the noise levels
    of the unspaced chain."""
    model, base = tiny_ddpm
    rec = _Recorder(model)
    x = images[:1]
    _chunk(rec, base, x, seed=3, steps_T=10, rounds_n=1, last_steps_m=2, respace=4, dense_tail=True)
    assert [int(t[0]) for _, t in rec.calls] == [9, 2, 1, 0]  # the network sees original step numbers
    rec.calls.clear()
    _chunk(rec, base, x, seed=3, steps_T=10, rounds_n=1, last_steps_m=2, respace=4)
    assert [int(t[0]) for _, t in rec.calls] == [9, 6, 3, 0]
    from utils.diffusion.purify import _truncated_process

    tail = _truncated_process(base, 10, 4, 2)
    assert np.allclose(tail.betas[:2], base.betas[:2])
    assert np.allclose(tail.posterior_variance[1:2], base.posterior_variance[1:2])


def test_construct_candidates_dense_tail_setting(tiny_ddpm, tiny_classifier, images, tmp_path):
    model, base = tiny_ddpm
    kw = {**CAND_KW, "steps_T": 6, "respace": 3}
    de.construct_candidates(model, base, tiny_classifier, images, tmp_path / "a", **kw)
    with pytest.raises(UserError, match="dense_tail"):  # another setting on the same folder
        de.construct_candidates(model, base, tiny_classifier, images, tmp_path / "a", dense_tail=True, **kw)
    with pytest.raises(UserError, match="raise purify_respace"):  # m=2 of 2 steps leaves none
        de.construct_candidates(
            model, base, tiny_classifier, images, tmp_path / "b", dense_tail=True, **{**kw, "respace": 2}
        )


def test_candidate_label_rates_hand_case():
    # 3 clean samples (labels 1, 2, 3) and 2 poisoned (dataset label 0, true 4 and 5); K = 3
    preds = np.array([[1, 1, 7], [2, 2, 2], [3, 9, 9], [0, 4, 0], [0, 0, 5]])
    dataset = np.array([1, 2, 3, 0, 0])
    true = np.array([1, 2, 3, 4, 5])
    poisoned = np.array([0, 0, 0, 1, 1])
    r = candidate_label_rates(preds, dataset, true, poisoned)
    assert r.clean_dataset_label == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert r.poisoned_true_label == pytest.approx([0.0, 0.5, 0.5])
    assert r.poisoned_dataset_label == pytest.approx([1.0, 0.5, 0.5])
    none = candidate_label_rates(preds[:3], dataset[:3], true[:3], poisoned[:3])
    assert none.poisoned_true_label == [None, None, None]


def test_detect_target_labels_upper_tail_ignores_classes_that_keep_their_label():
    # 10 transitioning samples per class, K = 2 (original, one intermediary)
    rows = []
    for c, (orig_other, inter_same) in enumerate([(0, 0), (0, 0), (5, 0), (0, 9), (0, 1)]):
        for j in range(10):
            orig = 0 if j < orig_other else c  # class 2: half its originals already predicted 0
            inter = c if j < inter_same else (c + 1) % 5
            if c == 2:
                inter = 0
            rows.append((c, orig, inter))
    labels = np.array([r[0] for r in rows])
    preds = np.array([[r[1], r[2]] for r in rows])
    kept = torch.ones(len(rows), 2, dtype=torch.bool)
    transition = torch.ones(len(rows), dtype=torch.bool)
    two = de.detect_target_labels(preds, kept, transition, labels, num_classes=5)
    up = de.detect_target_labels(preds, kept, transition, labels, num_classes=5, tail="upper")
    # metrics: -log q_i with q = 10/20, 10/20, 5/20, 19/20, 11/20
    assert two.metrics == pytest.approx([math.log(2), math.log(2), math.log(4), -math.log(0.95), -math.log(0.55)])
    assert two.targets == [2, 3]  # class 3 keeps its label unusually often: flagged too
    assert up.targets == [2]
    assert up.scores[2] == pytest.approx(two.scores[2]) and up.scores[3] == pytest.approx(-two.scores[3])
    with pytest.raises(ValueError, match="tail"):
        de.detect_target_labels(preds, kept, transition, labels, num_classes=5, tail="lower")
