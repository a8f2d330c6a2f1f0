"""The attack scripts' flow, phase by phase (:func:`run_flow`), from the attack data to the outputs (``PHASES``).

Every phase of ``PHASES`` stores its output under ``record/<save_folder_name>/`` and is marked done in
``phases.json`` as soon as it finishes. :func:`cached_phase` loads a phase whose stored output exists instead of
running it again; otherwise it runs the phase, stores its output and marks it. Three steps between the phases are
not in ``phases.json``: the stage-1 training set (gathered every run), the stage-2 selection (stored on its own, so
a stage-2 training interrupted after it keeps it) and the report (``metrics.json``, written every run). Each phase
draws its random numbers from generators seeded from ``(random_seed, phase)`` alone, so its result does not depend
on which earlier phases ran in this process or were loaded.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from utils.data import ImageSet
from utils.dataelixir import candidate_store as cs
from utils.dataelixir import defence as de
from utils.dataelixir.attack_data import BackdoorData, build_backdoor_data
from utils.dataelixir.keys import FlowConfig
from utils.dataelixir.models import (
    build_candidates,
    build_model,
    load_model,
    predict_candidates,
    train_augment,
    train_config,
)
from utils.dataelixir.outputs import (
    candidate_label_rates,
    example_png,
    finite,
    last_metrics,
    load_attack_data,
    save_attack_data,
    write_curves,
    write_decisions,
)
from utils.dataelixir.record import PHASES, Record
from utils.fileio import atomic_torch_save, atomic_write_json, safe_torch_load
from utils.paths import resource_dir
from utils.runtime import seed_everything
from utils.trainer import train_classifier

Log = Callable[[str], None]
T = TypeVar("T")


@dataclass(frozen=True)
class FlowContext:
    """What every phase reads: the settings, the record folder and where to run."""

    cfg: FlowConfig
    rec: Record
    work: Path
    device: torch.device
    log: Log
    # the clean (sub-sampled) training and test sets and the training set's CIFAR-10 indices
    load_data: Callable[[], tuple[ImageSet, ImageSet, torch.Tensor]]
    save_folder_name: str = ""
    # tells the other torchrun ranks what to do at the candidates phase (build / skip)
    tell_ranks: Callable[[str], None] = lambda message: None
    rank: int = 0
    world: int = 1
    threads: int = dataclasses.field(default_factory=torch.get_num_threads)  # for the phases rank 0 runs alone
    shard_threads: int = dataclasses.field(default_factory=torch.get_num_threads)  # while ranks share the candidates

    @property
    def labels_bf16(self) -> bool:
        """Whether the candidates' labels and features run in bf16 (utils/precision.py)."""
        return self.cfg.precision_of("candidate_labels") == "bf16"


@dataclass(frozen=True)
class AttackResult:
    data: BackdoorData
    train_idx: torch.Tensor  # CIFAR-10 indices of the (sub-sampled) training set

    @property
    def tests(self) -> dict[str, ImageSet]:
        return {"BA": self.data.test_clean, "ASR": self.data.test_bd, "RA": self.data.test_ra}


@dataclass(frozen=True)
class Trained:
    model: torch.nn.Module
    history: list[dict]


@dataclass(frozen=True)
class Candidates:
    images: np.ndarray  # uint8 [N, K, 3, H, W], memory-mapped
    preds: np.ndarray  # int16 [N, K]: the backdoored model's labels


@dataclass(frozen=True)
class Identification:
    """Label transition, target labels, sorting and the image choice of relabelled samples."""

    kept: torch.Tensor  # bool [N, K]
    transition: torch.Tensor  # bool [N]
    majority: torch.Tensor  # [N]
    decision: torch.Tensor  # [N]: de.KEPT / RELABELLED / SUSPICIOUS
    label: torch.Tensor  # [N]: new label (relabelled), tentative (suspicious), dataset label (kept)
    chosen: torch.Tensor  # [N]: chosen candidate, -1 for suspicious samples
    dist_rows: torch.Tensor  # samples whose candidate distances were computed
    distances: torch.Tensor  # float64 [len(dist_rows), K]
    detection: dict  # target_detection.json

    def tensors(self) -> dict[str, torch.Tensor]:
        """``identification.pt``'s content."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "detection"}

    def suspicious(self) -> torch.Tensor:
        return torch.nonzero(self.decision == de.SUSPICIOUS).flatten()

    def suspicious_distances(self) -> torch.Tensor:
        susp = self.suspicious()
        if not len(susp):
            return torch.zeros(0, self.distances.shape[1], dtype=torch.float64)
        row_of = {int(r): i for i, r in enumerate(self.dist_rows.tolist())}
        return self.distances[[row_of[int(r)] for r in susp]]


@dataclass(frozen=True)
class Relabelled:
    """The final training set: every sample's label and chosen candidate, and the detection rates."""

    label: torch.Tensor
    chosen: torch.Tensor
    rates: de.DetectionRates


# --------------------------------------------------------------------------- the flow


def run_flow(ctx: FlowContext, stop_after: str | None = None) -> dict[str, Any] | None:
    """Attack, then DataElixir: ``metrics.json``'s content, or None when stopped after phase ``stop_after``."""
    cfg = ctx.cfg
    # 0. the attack: a poisoned training set and a model trained on it
    attack = cached_phase(ctx, "attack", lambda: attack_phase(ctx), attack_record(ctx))
    if stop_after == "attack":
        return None
    tests = attack.tests
    backdoored = classifier_phase(
        ctx, "backdoor_training", "backdoored", lambda: attack.data.train, cfg.lr, 0, tests, title="backdoored model"
    )
    report_attack(ctx, backdoored)
    if stop_after == "backdoor_training":
        return None
    # 1. the candidate sets, labelled by the backdoored model
    cands = cached_phase(
        ctx, "candidates", lambda: candidates_phase(ctx, attack.data.train.images), candidates_record(ctx)
    )
    if stop_after == "candidates":
        return None
    # 2.-5. label transitions, target labels, sorting, the relabelled samples' images
    ident = cached_phase(
        ctx,
        "identification",
        lambda: identification_phase(ctx, attack.data.train.labels, cands, backdoored.model),
        identification_record(ctx),
    )
    if stop_after == "identification":
        return None
    # 6. stage 1: a fresh model on the non-suspicious samples
    purified = stage1_set(ident, cands)
    stage1 = classifier_phase(
        ctx, "stage1", "stage1", lambda: stage1_data(ctx, purified), cfg.lr, 1, tests, title="DataElixir stage 1"
    )
    if stop_after == "stage1":
        return None
    # 7. stage 2: the suspicious samples the stage-1 model agrees on join; the stage-1 model is fine-tuned
    selection = cached_phase(ctx, None, lambda: selection_phase(ctx, ident, cands, stage1.model), selection_record(ctx))
    stage2 = classifier_phase(
        ctx,
        "stage2",
        "stage2",
        lambda: stage2_data(ctx, ident, cands, selection, purified),
        cfg.ft_lr,
        2,
        tests,
        title="DataElixir stage 2 (defended model)",
        init=stage1.model,
    )
    if stop_after == "stage2":
        return None
    # 8. the suspicious samples relabelled by the stage-2 model; the outputs
    final = cached_phase(ctx, "final", lambda: final_phase(ctx, attack.data, cands, ident, selection, stage2.model))
    return report(ctx, attack.data, cands, ident, selection, final, backdoored=backdoored, stage1=stage1, stage2=stage2)


# --------------------------------------------------------------------------- the resume rule


@dataclass(frozen=True)
class Stored(Generic[T]):
    """A phase's output in the record folder: whether it is there, how to read it back and
    how to write it (a phase that writes as it goes stores nothing at the end)."""

    present: Callable[[], bool]
    load: Callable[[], T]
    save: Callable[[T], None] = lambda out: None


def cached_phase(ctx: FlowContext, phase: str | None, compute: Callable[[], T], stored: Stored[T] | None = None) -> T:
    """``compute()``, or its stored output. ``phase``: its ``phases.json`` entry (None: a
    step between phases). The output is loaded when it is stored and its phase (if any) is
    marked done; otherwise it is computed, saved (each file atomically) and then the phase
    marked done. A phase without ``stored`` runs every time and keeps the time of its first run.
    ``compute`` starts with the global generators (Python, NumPy, torch on every device) seeded
    by ``cfg.phase_seed(phase)``: a model's initialisation, say, does not depend on the earlier phases."""
    if stored is not None and (phase is None or ctx.rec.done(phase)) and stored.present():
        if phase:
            ctx.log(f"phase {phase}: done earlier")
        return stored.load()
    t0 = time.time()
    seed_everything(ctx.cfg.phase_seed(phase or "between phases"))
    out = compute()
    if stored is not None:
        stored.save(out)
    if phase and (stored is not None or not ctx.rec.done(phase)):
        # after an interruption this is the time of the resuming run only
        ctx.rec.mark(phase, time.time() - t0)
    return out


# --------------------------------------------------------------------------- the attack


def attack_phase(ctx: FlowContext) -> AttackResult:
    """Poison the clean training set and make the triggered test sets."""
    cfg = ctx.cfg
    train, test, train_idx = ctx.load_data()
    data = cfg.data_spec()
    bd = build_backdoor_data(
        cfg.attack,
        cfg.trigger_params(),
        train,
        test,
        ctx.device,
        resource_dir(ctx.work),
        ctx.log,
        precision=cfg.precision_of("trigger"),
        num_classes=data.num_classes,
        mean=data.mean,
        std=data.std,
    )
    return AttackResult(bd, train_idx)


def store_attack(ctx: FlowContext, out: AttackResult) -> None:
    save_attack_data(ctx.rec.path("attack_data.pt"), out.data, out.train_idx)
    poison_idx = torch.nonzero(out.data.poison_indicator).flatten()
    atomic_write_json(
        ctx.rec.path("poison_indices.json"),
        {
            "indices": poison_idx.tolist(),
            "cifar10_train_indices": out.train_idx[poison_idx].tolist(),
            "note": "indices: positions in the (sub-sampled) training set; cifar10_train_indices: in CIFAR-10",
        },
    )
    atomic_write_json(ctx.rec.path("attack_info.json"), finite(out.data.info))


def attack_record(ctx: FlowContext) -> Stored[AttackResult]:
    return Stored(
        lambda: ctx.rec.path("attack_data.pt").is_file(),
        lambda: AttackResult(*load_attack_data(ctx.rec.path("attack_data.pt"))),
        lambda out: store_attack(ctx, out),
    )


def report_attack(ctx: FlowContext, backdoored: Trained) -> None:
    backdoored.model.eval()
    m = last_metrics(backdoored.history)
    ctx.log(f"attack: BA {m['BA']} ASR {m['ASR']} RA {m['RA']}")


# --------------------------------------------------------------------------- the three trainings


def train_phase(
    ctx: FlowContext,
    name: str,
    data: ImageSet,
    lr: float,
    seed_offset: int,
    tests: dict[str, ImageSet],
    init: torch.nn.Module | None = None,
) -> Trained:
    """One of the three classifier trainings (fresh, or fine-tuned from ``init``), resumable
    per epoch from ``ckpt/<name>.ckpt``."""
    augment = train_augment(ctx.cfg)
    model = build_model(ctx.cfg)
    if init is not None:
        model.load_state_dict(init.state_dict())
    history = train_classifier(
        model,
        data,
        augment,
        train_config(ctx.cfg, lr, len(data), seed_offset),
        ctx.device,
        tests=tests,
        checkpoint=ctx.rec.path("ckpt", f"{name}.ckpt"),
        log=ctx.log,
        desc=name,
    )
    return Trained(model, history)


def trained_record(ctx: FlowContext, name: str, title: str) -> Stored[Trained]:
    """``<name>_model.pt`` and ``<name>_history.json``; the curves are written with them."""
    model_file, history_file = ctx.rec.path(f"{name}_model.pt"), ctx.rec.path(f"{name}_history.json")

    def save(out: Trained) -> None:
        atomic_torch_save(out.model.state_dict(), model_file)
        atomic_write_json(history_file, out.history)
        write_curves(ctx.rec.root, name, out.history, f"{ctx.cfg.attack}: {title}")

    return Stored(
        lambda: model_file.is_file() and history_file.is_file(),
        lambda: Trained(load_model(ctx.cfg, model_file, ctx.device), ctx.rec.read_state(f"{name}_history.json")),
        save,
    )


def classifier_phase(
    ctx: FlowContext,
    phase: str,
    name: str,
    data: Callable[[], ImageSet],
    lr: float,
    seed_offset: int,
    tests: dict[str, ImageSet],
    *,
    title: str,
    init: torch.nn.Module | None = None,
) -> Trained:
    """A training as a phase writing ``<name>_model.pt`` etc. (``title``: its curves'); the
    training set ``data()`` is gathered only when the model is not stored yet."""
    return cached_phase(
        ctx,
        phase,
        lambda: train_phase(ctx, name, data(), lr, seed_offset, tests, init),
        trained_record(ctx, name, title),
    )


# --------------------------------------------------------------------------- 1. candidates


def candidates_phase(ctx: FlowContext, images: torch.Tensor) -> Candidates:
    """Build the candidates (with the other torchrun ranks, on ``shard_threads`` threads)."""
    ctx.tell_ranks("build")
    torch.set_num_threads(ctx.shard_threads)
    cand, preds = build_candidates(ctx.cfg, ctx.work, ctx.rec.root, images, ctx.device, ctx.rank, ctx.world, ctx.log)
    torch.set_num_threads(ctx.threads)
    return Candidates(cand, preds)


def candidates_record(ctx: FlowContext) -> Stored[Candidates]:
    """The candidate store, written chunk by chunk while it is built."""

    def load() -> Candidates:
        ctx.tell_ranks("skip")
        cand, preds, _ = cs.open_candidates(ctx.rec.path("candidates"))
        return Candidates(cand, preds)

    return Stored(lambda: cs.candidates_complete(ctx.rec.path("candidates")), load)


# --------------------------------------------------------------------------- 2.-5. identification


def decision_counts(decision: torch.Tensor) -> dict[str, int]:
    return {de.DECISION_NAMES[c]: int((decision == c).sum()) for c in de.DECISION_NAMES}


def detection_report(det: de.TargetDetection, cfg: FlowConfig) -> dict[str, Any]:
    """``target_detection.json``."""
    return finite(
        {
            "target_labels": det.targets,
            "scores": det.scores,
            "kl_metrics": det.metrics,
            "median": det.median,
            "mad": det.mad,
            "transitioning_per_class": det.transitioning_per_class,
            "kept_label_histograms": det.histograms,
            "true_attack_target": cfg.attack_target if cfg.attack_label_trans == "all2one" else "all2all",
            "warning": det.warning,
        }
    )


def identification_phase(
    ctx: FlowContext, labels: torch.Tensor, cands: Candidates, backdoored: torch.nn.Module
) -> Identification:
    """Label transition, target-label detection, sorting, and the image of each relabelled
    sample (chosen by its distances to the original under the backdoored model)."""
    cfg, classes = ctx.cfg, ctx.cfg.data_spec().num_classes  # the detection runs over the dataset's classes
    p = torch.from_numpy(np.asarray(cands.preds).astype(np.int64))
    trans = de.label_transition(p, cfg.threshold_tau, classes)
    det = de.detect_target_labels(p, trans.kept, trans.transition, labels, classes, tail=cfg.detection_tail)
    scored = f"target labels {det.targets} (scores {np.round(det.scores, 3).tolist()})"
    ctx.log(f"warning: target detection: {det.warning}" if det.warning else scored)
    srt = de.sort_samples(trans, labels, det.targets)
    rows = torch.nonzero(srt.decision != de.KEPT).flatten().numpy()
    dist = de.candidate_distances(
        cands.images,
        rows,
        backdoored,
        ctx.device,
        bf16=ctx.labels_bf16,
        desc="selection distances",
        ssim_mode=cfg.ssim_mode,
    )
    chosen = torch.zeros(len(labels), dtype=torch.long)
    rel = srt.decision[rows] == de.RELABELLED
    if rel.any():
        chosen[torch.from_numpy(rows)[rel]] = de.select_index(dist[rel.numpy()], trans.kept[rows][rel])
    chosen[srt.decision == de.SUSPICIOUS] = -1
    ctx.log(f"sorting: {decision_counts(srt.decision)}; {int(trans.transition.sum())} samples transition")
    return Identification(
        kept=trans.kept,
        transition=trans.transition,
        majority=trans.majority,
        decision=srt.decision,
        label=srt.label,
        chosen=chosen,
        dist_rows=torch.from_numpy(rows),
        distances=torch.from_numpy(dist),
        detection=detection_report(det, cfg),
    )


def identification_record(ctx: FlowContext) -> Stored[Identification]:
    """``identification.pt`` (the tensors) and ``target_detection.json``."""
    tensors_file = ctx.rec.path("identification.pt")

    def save(out: Identification) -> None:
        atomic_write_json(ctx.rec.path("target_detection.json"), out.detection)
        atomic_torch_save(out.tensors(), tensors_file)

    def load() -> Identification:
        st = safe_torch_load(tensors_file, "identification results")
        return Identification(**st, detection=ctx.rec.read_state("target_detection.json"))

    return Stored(tensors_file.is_file, load, save)


# --------------------------------------------------------------------------- 6.-8. two stages


def stage1_set(ident: Identification, cands: Candidates) -> ImageSet:
    """The non-suspicious samples, each as its chosen candidate with its (new) label."""
    non_susp = torch.nonzero(ident.decision != de.SUSPICIOUS).flatten()
    return ImageSet(
        de.gather_images(cands.images, non_susp.numpy(), ident.chosen[non_susp].numpy()), ident.label[non_susp]
    )


def stage1_data(ctx: FlowContext, purified: ImageSet) -> ImageSet:
    ctx.log(f"stage 1: training a fresh model on {len(purified)} non-suspicious samples")
    return purified


def selection_phase(
    ctx: FlowContext, ident: Identification, cands: Candidates, stage1: torch.nn.Module
) -> de.Stage2Selection:
    """The suspicious samples on which the stage-1 model agrees with the tentative label, and
    their images (in :meth:`Identification.suspicious` order)."""
    susp = ident.suspicious()
    if not len(susp):
        return de.Stage2Selection(torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    p1 = predict_candidates(stage1, cands.images, susp.numpy(), ctx.device, ctx.labels_bf16, "stage-1 labels")
    return de.stage2_selection(p1, ident.label[susp], ident.suspicious_distances())


def selection_record(ctx: FlowContext) -> Stored[de.Stage2Selection]:
    """``stage2_selection.pt``."""
    path = ctx.rec.path("stage2_selection.pt")

    def load() -> de.Stage2Selection:
        s2 = safe_torch_load(path, "stage-2 selection")
        return de.Stage2Selection(s2["consensus"], s2["chosen"])

    def save(out: de.Stage2Selection) -> None:
        atomic_torch_save({"consensus": out.consensus, "chosen": out.chosen}, path)

    return Stored(path.is_file, load, save)


def stage2_set(ident: Identification, cands: Candidates, sel: de.Stage2Selection, purified: ImageSet) -> ImageSet:
    """The stage-1 set and the suspicious samples that reached consensus."""
    cons = ident.suspicious()[sel.consensus]
    extra = ImageSet(de.gather_images(cands.images, cons.numpy(), sel.chosen[sel.consensus].numpy()), ident.label[cons])
    return ImageSet(torch.cat([purified.images, extra.images]), torch.cat([purified.labels, extra.labels]))


def stage2_data(
    ctx: FlowContext, ident: Identification, cands: Candidates, sel: de.Stage2Selection, purified: ImageSet
) -> ImageSet:
    ft_set = stage2_set(ident, cands, sel, purified)
    susp, cons = len(ident.suspicious()), int(sel.consensus.sum())
    ctx.log(f"stage 2: {cons} of {susp} suspicious samples reach consensus; fine-tuning on {len(ft_set)}")
    return ft_set


def final_phase(
    ctx: FlowContext,
    bd: BackdoorData,
    cands: Candidates,
    ident: Identification,
    sel: de.Stage2Selection,
    stage2: torch.nn.Module,
) -> Relabelled:
    """Suspicious samples relabelled by the stage-2 model; writes the purified dataset,
    ``decisions.csv`` and the example images."""
    stage2.eval()
    susp = ident.suspicious()
    final_label, chosen = ident.label.clone(), ident.chosen.clone()
    if len(susp):
        p2 = predict_candidates(stage2, cands.images, susp.numpy(), ctx.device, ctx.labels_bf16, "stage-2 labels")
        fin = de.final_relabel(p2, ident.suspicious_distances())
        final_label[susp] = fin.label
        chosen[susp] = fin.chosen
    rates = de.tpr_fpr(final_label, bd.train.labels, bd.poison_indicator)
    images = de.gather_images(cands.images, np.arange(len(bd.train)), chosen.numpy())
    atomic_torch_save(
        {"images": images, "labels": final_label, "chosen_candidate": chosen, "decision": ident.decision},
        ctx.rec.path("purified_dataset.pt"),
    )
    consensus = torch.zeros(len(bd.train), dtype=torch.int8) - 1
    if len(susp):
        consensus[susp] = sel.consensus.to(torch.int8)
    write_decisions(
        ctx.rec.path("decisions.csv"), bd, ident.transition, ident.decision, ident.label, consensus, final_label, chosen
    )
    example_png(ctx.rec.path("purified_examples.png"), bd, images)
    return Relabelled(final_label, chosen, rates)


def report(
    ctx: FlowContext,
    bd: BackdoorData,
    cands: Candidates,
    ident: Identification,
    sel: de.Stage2Selection,
    final: Relabelled,
    *,
    backdoored: Trained,
    stage1: Trained,
    stage2: Trained,
) -> dict[str, Any]:
    """``metrics.json``: the attack's and the defence's metrics, the detection and the timings."""
    rates = final.rates
    attack_metrics, defended = last_metrics(backdoored.history), last_metrics(stage2.history)
    timings = {ph: ctx.rec.phases.get(ph, {}).get("seconds") for ph in PHASES}
    label_rates = candidate_label_rates(cands.preds, bd.train.labels, bd.original_labels, bd.poison_indicator)
    metrics = finite(
        {
            "attack": ctx.cfg.attack,
            "save_folder_name": ctx.save_folder_name,
            "n_train": len(bd.train),
            "n_poisoned": int(bd.poison_indicator.sum()),
            "n_test_clean": len(bd.test_clean),
            "n_test_bd": len(bd.test_bd),
            "attack_metrics": attack_metrics,
            "defended_metrics": defended,
            "stage1_metrics": last_metrics(stage1.history),
            "TPR": rates.tpr,
            "FPR": rates.fpr,
            "detection": rates.as_dict(),
            "target_labels": ident.detection["target_labels"],
            "target_scores": ident.detection["scores"],
            "target_warning": ident.detection.get("warning"),
            "decisions": decision_counts(ident.decision),
            "stage2_consensus": int(sel.consensus.sum()),
            "candidates_per_sample": cands.images.shape[1],
            "candidate_label_rates": dataclasses.asdict(label_rates),
            "timings_s": timings,
            "total_s": round(sum(t for t in timings.values() if t is not None), 3),
        }
    )
    atomic_write_json(ctx.rec.path("metrics.json"), metrics)
    ctx.log(
        f"done: attack BA {attack_metrics['BA']} ASR {attack_metrics['ASR']} | defended BA {defended['BA']} "
        f"ASR {defended['ASR']} RA {defended['RA']} | TPR {rates.tpr} FPR {rates.fpr}"
    )
    return metrics
