"""DataElixir (AAAI 2024): purify a backdoor-poisoned training set with a diffusion model.

One small function per step of the paper, each working on whole arrays:

1. ``construct_candidates``: per training image, ``rounds_n`` rounds of "noise to step
   ``steps_T`` in one shot, ``steps_T`` ancestral reverse steps"; the last ``last_steps_m``
   reverse samples of each round are kept and the round's (clamped) output seeds the next
   round. ``1 + n*m`` candidates per sample, index 0 being the original. Candidates are
   stored as uint8 in a memory-mapped file together with the backdoored model's labels
   for them (``utils.dataelixir.candidate_store``); work is done in chunks, each marked done
   atomically, so a re-run resumes.
2. ``label_transition``: which candidates are kept, and which samples "transition".
3. ``detect_target_labels``: KL divergence per class + MAD outlier score > 2.
4. ``sort_samples``: kept / relabelled / suspicious.
5. ``ssim_3x3``, ``selection_distance``, ``select_index``: the 0.8-quantile image choice.
6.-8. ``stage2_selection``, ``final_relabel``, ``tpr_fpr``.

Steps 2-8 return small frozen dataclasses (``LabelTransition``, ``TargetDetection``, ...).
``utils.dataelixir.keys.REFERENCE_EXACT`` lists the options that reproduce the reference code's quirks.

The semantics follow the reference implementation (``utils/purify_utils.py`` of
Manu21JC/DataElixir); where it is ill-defined (empty classes in the detection, sort
ties) the choice made here is documented at the function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.augment import to_uint8
from utils.chunk_store import Log, Tick
from utils.data import NUM_CLASSES
from utils.dataelixir import candidate_store as cs
from utils.diffusion.gaussian_diffusion import truncated_steps
from utils.diffusion.purify import chunk_seed, from_model_range, noise_and_denoise, to_model_range
from utils.fileio import UserError, tensor_fingerprint
from utils.progress import progress
from utils.run_state import on_rank0
from utils.trainer import predict

KEPT, RELABELLED, SUSPICIOUS = 0, 1, 2
DECISION_NAMES = {KEPT: "kept", RELABELLED: "relabelled", SUSPICIOUS: "suspicious"}
QUANTILE = 0.8


# --------------------------------------------------------------------------- 1. candidates


def num_candidates(rounds_n: int, last_steps_m: int) -> int:
    return 1 + rounds_n * last_steps_m


def check_step_settings(
    steps_T: int, rounds_n: int, last_steps_m: int, respace: int | None = None, dense_tail: bool = False
) -> None:
    """The step counts of candidate construction, checked once for the attack scripts (before
    any work) and for direct callers; a UserError names the YAML keys."""
    if rounds_n < 1 or last_steps_m < 1 or steps_T < 1:
        raise UserError(f"rounds_n, last_steps_m and steps_T must be >= 1 (got {rounds_n}, {last_steps_m}, {steps_T})")
    if respace is not None and not 1 <= respace <= steps_T:
        raise UserError(f"purify_respace must be null or in 1..steps_T ({steps_T}), got {respace}")
    reverse_steps = respace or steps_T
    if last_steps_m > reverse_steps:
        what = f"purify_respace={respace}" if respace else f"steps_T={steps_T}"
        raise UserError(
            f"last_steps_m={last_steps_m} exceeds the {reverse_steps} reverse steps of {what}: "
            "each round keeps its last m steps"
        )
    if dense_tail and reverse_steps < steps_T and last_steps_m >= reverse_steps:
        raise UserError(
            f"purify_dense_tail needs purify_respace ({reverse_steps}) > last_steps_m ({last_steps_m}): "
            "the unspaced tail would leave no step for the rest of the chain; raise purify_respace"
        )


@torch.no_grad()
def construct_candidates(
    diffusion_model: nn.Module,
    base_diffusion: Any,
    classifier: nn.Module,
    images: torch.Tensor,
    out_dir: str | Path,
    *,
    steps_T: int,
    rounds_n: int,
    last_steps_m: int,
    batch_size: int = 1024,
    respace: int | None = None,
    dense_tail: bool = False,
    noise_offset: int = 0,
    original_round_trip: bool = False,
    seed: int = 0,
    bf16: bool = False,
    labels_bf16: bool | None = None,
    device: torch.device = torch.device("cpu"),
    max_chunks: int | None = None,
    rank: int = 0,
    world: int = 1,
    log: Log = print,
    ddpm_fingerprint: str | None = None,
) -> tuple[np.memmap, np.memmap]:
    """Build the candidate sets of uint8 ``images`` [N, 3, H, W] and label them.

    Chunk ``c`` (``batch_size`` samples) uses a generator seeded from ``(seed, c)``, so
    results do not depend on where a run was interrupted. ``max_chunks`` stops after that
    many newly finished chunks (tests use it to simulate an interruption).
    With ``world`` processes (torchrun, every rank calling with the same arguments), rank
    ``r`` builds the chunks ``c`` with ``c % world == r`` into the one store that rank 0
    creates or checks first; the bytes do not depend on ``world``.
    ``dense_tail`` (with ``respace``) takes the last ``last_steps_m`` reverse steps unspaced,
    so the kept candidates are at the paper's noise levels (a CPU-scale option).
    ``original_round_trip`` stores candidate 0 as the reference does (see :func:`reference_original`).
    The header keys the store by ``ddpm_fingerprint``, else by ``diffusion_model``'s weights.
    Returns the memory-mapped candidates and labels (read-only).
    """
    check_step_settings(steps_T, rounds_n, last_steps_m, respace, dense_tail)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    k = num_candidates(rounds_n, last_steps_m)
    steps = dict(steps_T=steps_T, rounds_n=rounds_n, last_steps_m=last_steps_m, respace=respace, dense_tail=dense_tail)
    steps.update(noise_offset=noise_offset, original_round_trip=original_round_trip)
    labels_bf16 = bf16 if labels_bf16 is None else labels_bf16
    # the labels' precision is recorded where it differs from the rounds' (older headers had one)
    other = {} if labels_bf16 == bf16 else {"labels_bf16": labels_bf16}
    ddpm = ddpm_fingerprint or tensor_fingerprint(*diffusion_model.state_dict().values())
    meta = cs.store_header(images, classifier, k, batch_size, ddpm=ddpm, **steps, seed=seed, bf16=bf16, **other)
    store = cs.candidate_chunks(out_dir, meta)
    # rank 0 alone creates or checks the store (header, file sizes) before any rank maps it
    on_rank0(lambda: store.prepare(meta, log=log), rank, world)
    classifier.eval()

    def work(c: int, tick: Tick) -> None:
        rows = store.rows(c)
        x = images[rows].to(device)
        generator = torch.Generator(device=device).manual_seed(chunk_seed(seed, c))
        out = build_chunk(
            diffusion_model, base_diffusion, x, **steps, generator=generator, bf16=bf16, on_step=lambda: tick(len(x))
        )
        flat = out.reshape(-1, *out.shape[2:])
        labels = predict(classifier, flat, device, batch_size=512, bf16=labels_bf16).argmax(1).view(len(out), k)
        store.storage.write(rows, out, labels)

    reverse_steps = len(truncated_steps(steps_T, respace, last_steps_m if dense_tail else 0))
    units = rounds_n * reverse_steps
    store.build(work, what="candidates", units_per_item=units, rank=rank, world=world, log=log, max_chunks=max_chunks)
    return cs.open_candidates(out_dir)[:2]


def reference_original(x_u8: torch.Tensor) -> torch.Tensor:
    """The original image as DataElixir's code keeps it: uint8 -> ``ToTensor`` (float32 / 255)
    -> ``x * 2 - 1`` -> clamp -> ``(x + 1) * 0.5`` -> clamp -> ``ToPILImage`` (``mul(255)``,
    truncated). The float32 round trip lowers 63 of the 256 byte values by one level; the
    exact original (our default) is the intent."""
    x = x_u8.float() / 255.0 * 2 - 1
    return to_uint8(from_model_range(x.clamp(-1, 1)))


@torch.no_grad()
def build_chunk(
    diffusion_model: nn.Module,
    base_diffusion: Any,
    x_u8: torch.Tensor,
    *,
    steps_T: int,
    rounds_n: int,
    last_steps_m: int,
    respace: int | None,
    noise_offset: int,
    generator: torch.Generator | None,
    bf16: bool,
    dense_tail: bool = False,
    original_round_trip: bool = False,
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Candidates of one batch: uint8 ``[B, 1 + n*m, 3, H, W]`` on the CPU.

    Index 0 is the original bytes (default), or with ``original_round_trip`` the
    reference's float round trip of them (:func:`reference_original`). ``on_step`` is
    called after each reverse step (progress reporting).
    """
    x = to_model_range(x_u8)
    original = reference_original(x_u8) if original_round_trip else x_u8
    out = [original.cpu().unsqueeze(1)]
    for _ in progress(range(rounds_n), desc="rounds", leave=False, dynamic_ncols=True):
        x, kept = noise_and_denoise(
            diffusion_model,
            base_diffusion,
            x,
            steps_T,
            respace=respace,
            dense_tail=last_steps_m if dense_tail else 0,
            noise_offset=noise_offset,
            generator=generator,
            bf16=bf16,
            keep_last=last_steps_m,
            on_step=on_step,
        )
        # the reference clamps to [-1, 1] before quantising (ToPILImage truncates)
        steps = torch.stack([to_uint8(from_model_range(s.clamp(-1, 1))) for s in kept], dim=1)
        out.append(steps.cpu())
        x = x.clamp(-1, 1)
    return torch.cat(out, dim=1)


# --------------------------------------------------------------------------- 2. label transition


def _majority(inter: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: the most common label (ties -> the label seen first, as ``Counter.most_common``),
    the count of the second most common label (0 if none) and the number of distinct labels."""
    b, m = inter.shape
    counts = torch.zeros(b, num_classes, dtype=torch.long)
    counts.scatter_add_(1, inter, torch.ones_like(inter))
    pos = torch.arange(m).expand(b, m)
    first = torch.full((b, num_classes), m, dtype=torch.long)
    first.scatter_reduce_(1, inter, pos, reduce="amin", include_self=True)
    key = counts * (m + 1) + (m - first)  # higher count first, then earlier first occurrence
    majority = key.argmax(1)
    top2 = counts.topk(min(2, num_classes), dim=1).values
    second = top2[:, 1] if top2.shape[1] > 1 else torch.zeros(b, dtype=torch.long)
    return majority, second, (counts > 0).sum(1)


@dataclass(frozen=True)
class LabelTransition:
    """Step 2's result per sample."""

    kept: torch.Tensor  # bool [N, K]: the candidates kept
    transition: torch.Tensor  # bool [N]: the kept labels are not all equal
    majority: torch.Tensor  # [N]: the most common intermediary label
    inter_unanimous: torch.Tensor  # bool [N]: the kept intermediaries share one label


def label_transition(preds: torch.Tensor | np.ndarray, tau: int, num_classes: int = NUM_CLASSES) -> LabelTransition:
    """Step 2 (``anomalous_samples_identification``) on labels ``[N, K]`` (column 0 = original).

    * intermediaries (columns 1..) all one label -> keep every candidate;
    * else the second most common intermediary label occurs >= ``tau`` times -> keep all;
    * else keep the original and the intermediaries with the majority label.
    """
    p = torch.as_tensor(np.asarray(preds), dtype=torch.long)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"expected labels [N, K >= 2], got {tuple(p.shape)}")
    inter = p[:, 1:]
    majority, second, distinct = _majority(inter, num_classes)
    keep_all = (distinct == 1) | (second >= tau)
    kept = torch.ones_like(p, dtype=torch.bool)
    kept[:, 1:] = keep_all[:, None] | (inter == majority[:, None])
    transition = (kept & (p != p[:, :1])).any(1)
    inter_unanimous = (~kept[:, 1:] | (inter == majority[:, None])).all(1)
    return LabelTransition(kept, transition, majority, inter_unanimous)


# --------------------------------------------------------------------------- 3. target labels


def kl_onehot(hist: np.ndarray, i: int) -> float:
    """``scipy.stats.entropy(onehot(i), hist / hist.sum())`` = ``-log q[i]`` (inf when q[i] = 0)."""
    total = hist.sum()
    if total == 0:
        return float("nan")
    q = hist[i] / total
    return float("inf") if q == 0 else float(-np.log(q))


@dataclass(frozen=True)
class TargetDetection:
    """Step 3's result per class."""

    metrics: np.ndarray  # float [C]: KL(onehot(i) || histogram of class i), NaN without transitions
    scores: np.ndarray  # float [C]: the MAD outlier scores
    median: float  # of the metrics
    mad: float  # median absolute deviation of the metrics
    targets: list[int]  # the detected target labels
    histograms: np.ndarray  # int [C, C]: kept labels of the transitioning samples per dataset label
    transitioning_per_class: list[int]
    warning: str | None = None  # why no score is defined (no transition, an infinite median)


def detect_target_labels(
    preds: torch.Tensor | np.ndarray,
    kept: torch.Tensor,
    transition: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    num_classes: int = NUM_CLASSES,
    threshold: float = 2.0,
    tail: str = "two_sided",
) -> TargetDetection:
    """Step 3: per class i, the histogram of kept labels of transitioning samples whose
    dataset label is i; ``metric = KL(onehot(i) || histogram)``;
    ``score = |metric - median| / 1.4826 / (MAD + 1e-6)``; targets: score > ``threshold``.

    ``tail="upper"`` (an option, not the paper's) drops the absolute value: only classes
    whose samples leave their label unusually often are flagged, not ones that keep it
    unusually often (a class the diffusion model favours has a low outlying metric).

    A class without transitioning samples has no histogram: the reference computes
    ``count / len`` with Python ints there, so it stops with ``ZeroDivisionError``. Here
    such a class gets metric NaN and score 0, and the median and MAD are taken over the
    other classes. Infinite metrics (class i never among its own kept labels) follow numpy's
    arithmetic as in the reference, unsmoothed: |inf - finite median| = inf -> a target. An
    infinite median makes every score NaN (``inf - inf``) and the reference detects nothing;
    so does this, with ``warning`` saying why (as when no sample transitions at all).
    """
    if tail not in ("two_sided", "upper"):
        raise ValueError(f"tail must be two_sided or upper, got {tail!r}")
    p = torch.as_tensor(np.asarray(preds), dtype=torch.long)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    w = (kept & transition[:, None]).long()
    hist = torch.zeros(num_classes, num_classes, dtype=torch.long)
    rows = y[:, None].expand_as(p)
    hist.index_put_((rows.reshape(-1), p.reshape(-1)), w.reshape(-1), accumulate=True)
    h = hist.numpy()
    metrics = np.array([kl_onehot(h[i].astype(np.float64), i) for i in range(num_classes)])
    valid = ~np.isnan(metrics)
    scores = np.zeros(num_classes)
    if valid.any():
        with np.errstate(invalid="ignore", divide="ignore"):
            v = metrics[valid]
            median = np.median(v)
            mad = np.median(np.abs(v - median))
            dev = np.abs(v - median) if tail == "two_sided" else v - median
            scores[valid] = dev / 1.4826 / (mad + 1e-6)
    else:
        median = mad = float("nan")
    with np.errstate(invalid="ignore"):
        targets = np.flatnonzero(scores > threshold)
    return TargetDetection(
        metrics=metrics,
        scores=scores,
        median=float(median),
        mad=float(mad),
        targets=targets.tolist(),
        histograms=h,
        transitioning_per_class=torch.bincount(y[transition], minlength=num_classes).tolist(),
        warning=_undefined_scores(metrics, float(median), float(mad)),
    )


def _undefined_scores(metrics: np.ndarray, median: float, mad: float) -> str | None:
    """Why the MAD scores of ``metrics`` are undefined (None when they are defined)."""
    if np.isnan(metrics).all():
        return "no sample transitions, so no class has a KL metric to score: no target label detected"
    if np.isfinite([median, mad]).all():
        return None
    inf, fin = (np.flatnonzero(f(metrics)).tolist() for f in (np.isinf, np.isfinite))
    return (
        f"the KL metric is infinite for classes {inf} (none of their transitioning samples keeps its own label) "
        f"and finite for {fin}: their median is infinite, so every MAD score is NaN (as in the reference code) "
        "and no target label is detected"
    )


# --------------------------------------------------------------------------- 4. sorting


@dataclass(frozen=True)
class Sorting:
    """Step 4's result per sample."""

    decision: torch.Tensor  # [N]: KEPT / RELABELLED / SUSPICIOUS
    label: torch.Tensor  # [N]: new (relabelled), tentative (suspicious) or dataset label (kept)


def sort_samples(ident: LabelTransition, labels: torch.Tensor | np.ndarray, targets: list[int] | np.ndarray) -> Sorting:
    """Step 4: each sample kept, relabelled or suspicious, with its label.

    * kept labels all equal -> kept with its dataset label;
    * kept intermediaries unanimous -> dataset label is a target: relabelled to their
      label (its image is chosen later by ``select_index`` among the kept candidates);
      otherwise kept;
    * mixed -> dataset label is a target: suspicious (tentative label = intermediary
      majority); otherwise kept.
    """
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    is_target = torch.zeros_like(y, dtype=torch.bool)
    for t in targets:
        is_target |= y == int(t)
    decision = torch.full_like(y, KEPT)
    relabel = ident.transition & ident.inter_unanimous & is_target
    suspicious = ident.transition & ~ident.inter_unanimous & is_target
    decision[relabel] = RELABELLED
    decision[suspicious] = SUSPICIOUS
    return Sorting(decision, torch.where(relabel | suspicious, ident.majority, y))


# --------------------------------------------------------------------------- 5. image selection


SSIM_MODES = ("per_channel", "reference")


def ssim_3x3(a: torch.Tensor, b: torch.Tensor, data_range: float = 255.0, mode: str = "per_channel") -> torch.Tensor:
    """Mean SSIM per image pair of uint8 ``[B, C, H, W]`` images with a uniform 3-wide window,
    sample covariance, K1 = 0.01, K2 = 0.03, in float64, as skimage's ``structural_similarity``.

    ``per_channel`` (default, the paper's intent): ``structural_similarity(a, b, win_size=3,
    channel_axis=-1)`` -- a 3x3 window per channel, the mean over each channel's interior
    (1-pixel border cropped), averaged over channels.

    ``reference``: what DataElixir's code computes. It calls ``structural_similarity(a, b,
    multichannel=True, win_size=3)`` on HWC arrays with scikit-image 0.24, where
    ``multichannel`` is no longer a parameter and is silently ignored: the (H, W, C) array is
    treated as a 3-D image, so the window is 3x3x3 (covariance factor 27/26) and the border
    crop removes the first and last channel too. For RGB only the green position is scored,
    its window spanning R, G and B, over the (H-2) x (W-2) interior.
    """
    if mode not in SSIM_MODES:
        raise ValueError(f"ssim mode must be one of {SSIM_MODES}, got {mode!r}")
    x = a.to(torch.float64)
    y = b.to(torch.float64)
    c = x.shape[1]
    win = 3
    if mode == "reference":
        if c < win:
            raise ValueError(f"the reference SSIM needs >= {win} channels, got {c}")
        # [B, 1, C, H, W]: a "valid" 3-D box filter = skimage's filter output after its crop
        x, y = x.unsqueeze(1), y.unsqueeze(1)
        kernel = torch.full((1, 1, win, win, win), 1.0 / win**3, dtype=torch.float64, device=x.device)

        def box(t: torch.Tensor) -> torch.Tensor:
            return F.conv3d(t, kernel)

        n_win, dims = win**3, (1, 2, 3, 4)
    else:
        kernel = torch.full((c, 1, win, win), 1.0 / (win * win), dtype=torch.float64, device=x.device)

        def box(t: torch.Tensor) -> torch.Tensor:
            return F.conv2d(t, kernel, groups=c)  # "valid" = skimage's filter output after the crop

        n_win, dims = win * win, (2, 3)
    cov_norm = n_win / (n_win - 1)
    ux, uy = box(x), box(y)
    uxx, uyy, uxy = box(x * x), box(y * y), box(x * y)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    s = s.mean(dim=dims)
    return s.flatten() if mode == "reference" else s.mean(1)


def selection_distance(ssim: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """``d = 0.5 (1 - (SSIM + 1)/2) + 0.5 (1 - (cos + 1)/2)``."""
    return 0.5 * (1 - (ssim + 1) * 0.5) + 0.5 * (1 - (cos + 1) * 0.5)


@torch.no_grad()
def candidate_distances(
    candidates: np.ndarray,
    rows: np.ndarray,
    model: nn.Module,
    device: torch.device,
    *,
    bf16: bool = False,
    samples_per_batch: int = 128,
    desc: str = "distances",
    ssim_mode: str = "per_channel",
) -> np.ndarray:
    """Distances ``[len(rows), K]`` (float64) between each listed sample's original
    (candidate 0) and each of its candidates; column 0 is 0 as in the reference. Features
    are the backdoored model's globally pooled last-stage features; ``ssim_mode`` as in
    :func:`ssim_3x3`."""
    k = candidates.shape[1]
    out = np.zeros((len(rows), k), dtype=np.float64)
    for s in progress(range(0, len(rows), samples_per_batch), desc=desc, unit="batch", dynamic_ncols=True):
        idx = rows[s : s + samples_per_batch]
        imgs = torch.from_numpy(np.ascontiguousarray(candidates[np.sort(idx)]))
        order = np.argsort(np.argsort(idx))  # memmaps are read fastest in ascending order
        imgs = imgs[torch.from_numpy(order)]
        b = len(idx)
        flat = imgs.reshape(b * k, *imgs.shape[2:])
        feats = predict(model, flat, device, batch_size=512, bf16=bf16, features=True).view(b, k, -1).double()
        cos = F.cosine_similarity(feats[:, :1], feats, dim=2)
        orig = imgs[:, :1].expand_as(imgs).reshape(b * k, *imgs.shape[2:])
        ssim = ssim_3x3(orig.to(device), flat.to(device), mode=ssim_mode).cpu().view(b, k)
        d = selection_distance(ssim, cos)
        d[:, 0] = 0.0
        out[s : s + b] = d.numpy()
    return out


def select_index(distances: torch.Tensor | np.ndarray, valid: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Step 5: per row, sort the valid candidates by distance (stable, so ties keep the
    candidate order; the reference's numpy quicksort is not guaranteed stable) and return
    the candidate index at position ``int(0.8 * #valid)``. Rows need >= 1 valid candidate."""
    d = torch.as_tensor(np.asarray(distances), dtype=torch.float64)
    v = torch.as_tensor(np.asarray(valid), dtype=torch.bool)
    count = v.sum(1)
    if (count == 0).any():
        raise ValueError("every row needs at least one valid candidate")
    d = torch.where(v, d, torch.full_like(d, float("inf")))
    order = torch.sort(d, dim=1, stable=True).indices
    pos = torch.floor(count.double() * QUANTILE).long()  # int(len * 0.8) in float64, as Python
    return order.gather(1, pos[:, None]).squeeze(1)


# --------------------------------------------------------------------------- 6.-8. two stages


@dataclass(frozen=True)
class Stage2Selection:
    """Step 7's result per suspicious sample."""

    consensus: torch.Tensor  # bool [S]: the stage-1 model gives the original the tentative label
    chosen: torch.Tensor  # [S]: the chosen candidate where consensus, else -1


def stage2_selection(
    stage1_preds: torch.Tensor, tentative: torch.Tensor, distances: torch.Tensor | np.ndarray
) -> Stage2Selection:
    """Step 7 for the suspicious samples: labels ``[S, K]`` from the stage-1 model, their
    tentative labels ``[S]`` and distances ``[S, K]``. Consensus: the stage-1 model gives
    the original the tentative label; the image is chosen among the original and the
    candidates the stage-1 model also labels so."""
    p = torch.as_tensor(np.asarray(stage1_preds), dtype=torch.long)
    t = torch.as_tensor(np.asarray(tentative), dtype=torch.long)
    consensus = p[:, 0] == t
    valid = p == t[:, None]
    valid[:, 0] = True
    chosen = torch.full_like(t, -1)
    if consensus.any():
        chosen[consensus] = select_index(torch.as_tensor(np.asarray(distances))[consensus], valid[consensus])
    return Stage2Selection(consensus, chosen)


@dataclass(frozen=True)
class FinalRelabel:
    """Step 8's result per suspicious sample."""

    label: torch.Tensor  # [S]: the stage-2 model's label of the original
    chosen: torch.Tensor  # [S]: the chosen candidate


def final_relabel(stage2_preds: torch.Tensor, distances: torch.Tensor | np.ndarray) -> FinalRelabel:
    """Step 8 for the suspicious samples: label = the stage-2 model's prediction on the
    original; image chosen among the candidates it gives that label (the original included)."""
    p = torch.as_tensor(np.asarray(stage2_preds), dtype=torch.long)
    label = p[:, 0]
    valid = p == label[:, None]
    chosen = select_index(distances, valid) if len(p) else torch.zeros(0, dtype=torch.long)
    return FinalRelabel(label, chosen)


@dataclass(frozen=True)
class DetectionRates:
    """How well the final labels find the poisoned samples (None: a denominator is 0)."""

    tpr: float | None
    fpr: float | None
    true_positives: int
    false_positives: int
    n_poisoned: int
    n_clean: int

    def as_dict(self) -> dict[str, float | int | None]:
        """As ``metrics.json`` writes it."""
        return {"TPR": self.tpr, "FPR": self.fpr, **{k: v for k, v in asdict(self).items() if k not in ("tpr", "fpr")}}


def tpr_fpr(
    final_labels: torch.Tensor | np.ndarray,
    poisoned_labels: torch.Tensor | np.ndarray,
    poison_indicator: torch.Tensor | np.ndarray,
) -> DetectionRates:
    """Predicted poisoned = final label differs from the poisoned dataset's label.
    TPR = |predicted ∩ poisoned| / |poisoned|; FPR = |predicted - poisoned| / |clean|
    (None when the denominator is 0)."""
    f = np.asarray(final_labels)
    y = np.asarray(poisoned_labels)
    pi = np.asarray(poison_indicator).astype(bool)
    pred = f != y
    tp = int((pred & pi).sum())
    fp = int((pred & ~pi).sum())
    n_p, n_c = int(pi.sum()), int((~pi).sum())
    return DetectionRates(tp / n_p if n_p else None, fp / n_c if n_c else None, tp, fp, n_p, n_c)


def gather_images(candidates: np.ndarray, rows: np.ndarray, chosen: np.ndarray) -> torch.Tensor:
    """``candidates[rows[i], chosen[i]]`` as uint8 [len(rows), 3, H, W], read in ascending row order."""
    rows = np.asarray(rows, dtype=np.int64)
    chosen = np.asarray(chosen, dtype=np.int64)
    out = np.empty((len(rows), *candidates.shape[2:]), dtype=np.uint8)
    order = np.argsort(rows, kind="stable")
    for s in range(0, len(order), 4096):
        o = order[s : s + 4096]
        out[o] = candidates[rows[o], chosen[o]]
    return torch.from_numpy(out)
