"""The phases of the attack scripts' flow, each a function from small frozen dataclasses to one,
and the one loop that runs them with the resume rule.

Every phase of ``PHASES`` stores its output under ``record/<save_folder_name>/`` and is marked
done in ``phases.json`` as soon as it finishes. :func:`run_steps` loads a phase whose stored
output exists instead of running it again; otherwise it runs the phase, stores its output
and marks it. Three steps between the phases are not in ``phases.json``: the stage-1
training set (gathered every run), the stage-2 selection (stored on its own, so a stage-2
training interrupted after it keeps it) and the report (``metrics.json``, written every run).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.data import NUM_CLASSES, ImageSet
from utils.dataelixir import defence as de
from utils.dataelixir.attack_data import BackdoorData, build_backdoor_data
from utils.dataelixir.models import (
    build_candidates,
    build_model,
    load_model,
    predict_candidates,
    train_augment,
    train_config,
)
from utils.dataelixir.outputs import (
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
from utils.precision import precision_of
from utils.trainer import train_classifier

Log = Callable[[str], None]


@dataclass(frozen=True)
class FlowContext:
    """What every phase reads: the settings, the record folder and where to run."""

    attack: str
    cfg: dict[str, Any]
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
        return precision_of(self.cfg, "candidate_labels") == "bf16"


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
class Selection:
    """Stage 2's choice for the suspicious samples (in :meth:`Identification.suspicious` order)."""

    consensus: torch.Tensor  # bool [S]: the stage-1 model agrees with the tentative label
    chosen: torch.Tensor  # [S]: chosen candidate where consensus, else -1


@dataclass(frozen=True)
class Relabelled:
    """The final training set: every sample's label and chosen candidate, and the detection rates."""

    label: torch.Tensor
    chosen: torch.Tensor
    rates: dict


@dataclass(frozen=True)
class FlowState:
    """The outputs of the steps run so far (None: not yet run)."""

    attack: AttackResult | None = None
    backdoored: Trained | None = None
    candidates: Candidates | None = None
    identification: Identification | None = None
    purified: ImageSet | None = None  # the stage-1 training set
    stage1: Trained | None = None
    selection: Selection | None = None
    stage2: Trained | None = None
    final: Relabelled | None = None
    report: dict | None = None  # metrics.json


# --------------------------------------------------------------------------- 1. attack


def attack_phase(ctx: FlowContext) -> AttackResult:
    """Poison the clean training set and make the triggered test sets."""
    train, test, train_idx = ctx.load_data()
    bd = build_backdoor_data(ctx.attack, ctx.cfg, train, test, ctx.device, resource_dir(ctx.work), ctx.log)
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


def load_attack(ctx: FlowContext) -> AttackResult:
    return AttackResult(*load_attack_data(ctx.rec.path("attack_data.pt")))


# --------------------------------------------------------------------------- 2., 5., 6. trainings


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


def store_trained(ctx: FlowContext, name: str, out: Trained, title: str) -> None:
    """``<name>_model.pt``, ``<name>_history.json`` and the curves."""
    atomic_torch_save(out.model.state_dict(), ctx.rec.path(f"{name}_model.pt"))
    atomic_write_json(ctx.rec.path(f"{name}_history.json"), out.history)
    write_curves(ctx.rec.root, name, out.history, title)


def trained_stored(ctx: FlowContext, name: str) -> bool:
    return ctx.rec.path(f"{name}_model.pt").is_file() and ctx.rec.path(f"{name}_history.json").is_file()


def load_trained(ctx: FlowContext, name: str) -> Trained:
    model = load_model(ctx.cfg, ctx.rec.path(f"{name}_model.pt"), ctx.device)
    return Trained(model, ctx.rec.read_state(f"{name}_history.json"))


def _attack_reported(ctx: FlowContext, backdoored: Trained) -> Trained:
    backdoored.model.eval()
    m = last_metrics(backdoored.history)
    ctx.log(f"attack: BA {m['BA']} ASR {m['ASR']} RA {m['RA']}")
    return backdoored


# --------------------------------------------------------------------------- 3. candidates


def candidates_phase(ctx: FlowContext, images: torch.Tensor) -> Candidates:
    """Build the candidates (with the other torchrun ranks, on ``shard_threads`` threads)."""
    ctx.tell_ranks("build")
    torch.set_num_threads(ctx.shard_threads)
    cand, preds = build_candidates(ctx.cfg, ctx.work, ctx.rec.root, images, ctx.device, ctx.rank, ctx.world, ctx.log)
    torch.set_num_threads(ctx.threads)
    return Candidates(cand, preds)


def load_candidates(ctx: FlowContext) -> Candidates:
    ctx.tell_ranks("skip")
    cand, preds, _ = de.open_candidates(ctx.rec.path("candidates"))
    return Candidates(cand, preds)


# --------------------------------------------------------------------------- 4. identification


def decision_counts(decision: torch.Tensor) -> dict[str, int]:
    return {de.DECISION_NAMES[c]: int((decision == c).sum()) for c in de.DECISION_NAMES}


def identification_phase(
    ctx: FlowContext, labels: torch.Tensor, cands: Candidates, backdoored: torch.nn.Module
) -> Identification:
    """Label transition, target-label detection, sorting, and the image of each relabelled
    sample (chosen by its distances to the original under the backdoored model)."""
    cfg = ctx.cfg
    p = torch.from_numpy(np.asarray(cands.preds).astype(np.int64))
    ident = de.label_transition(p, cfg["threshold_tau"], NUM_CLASSES)
    det = de.detect_target_labels(
        p, ident["kept"], ident["transition"], labels, NUM_CLASSES, tail=cfg["detection_tail"]
    )
    detection = finite(
        {
            "target_labels": det["targets"],
            "scores": det["scores"],
            "kl_metrics": det["metrics"],
            "median": det["median"],
            "mad": det["mad"],
            "transitioning_per_class": det["transitioning_per_class"],
            "kept_label_histograms": det["histograms"],
            "true_attack_target": cfg["attack_target"] if cfg["attack_label_trans"] == "all2one" else "all2all",
        }
    )
    ctx.log(f"target labels {det['targets']} (scores {np.round(det['scores'], 3).tolist()})")
    srt = de.sort_samples(p, ident, labels, det["targets"])
    decision, new_label = srt["decision"], srt["label"]
    rows = torch.nonzero(decision != de.KEPT).flatten().numpy()
    dist = de.candidate_distances(
        cands.images,
        rows,
        backdoored,
        ctx.device,
        bf16=ctx.labels_bf16,
        desc="selection distances",
        ssim_mode=cfg["ssim_mode"],
    )
    chosen = torch.zeros(len(labels), dtype=torch.long)
    rel = decision[rows] == de.RELABELLED
    if rel.any():
        chosen[torch.from_numpy(rows)[rel]] = de.select_index(dist[rel.numpy()], ident["kept"][rows][rel])
    chosen[decision == de.SUSPICIOUS] = -1
    ctx.log(f"sorting: {decision_counts(decision)}; {int(ident['transition'].sum())} samples transition")
    return Identification(
        kept=ident["kept"],
        transition=ident["transition"],
        majority=ident["majority"],
        decision=decision,
        label=new_label,
        chosen=chosen,
        dist_rows=torch.from_numpy(rows),
        distances=torch.from_numpy(dist),
        detection=detection,
    )


def store_identification(ctx: FlowContext, out: Identification) -> None:
    atomic_write_json(ctx.rec.path("target_detection.json"), out.detection)
    atomic_torch_save(out.tensors(), ctx.rec.path("identification.pt"))


def load_identification(ctx: FlowContext) -> Identification:
    st = safe_torch_load(ctx.rec.path("identification.pt"), "identification results")
    return Identification(**st, detection=ctx.rec.read_state("target_detection.json"))


# --------------------------------------------------------------------------- 5.-7. two stages


def stage1_set(ident: Identification, cands: Candidates) -> ImageSet:
    """The non-suspicious samples, each as its chosen candidate with its (new) label."""
    non_susp = torch.nonzero(ident.decision != de.SUSPICIOUS).flatten()
    return ImageSet(
        de.gather_images(cands.images, non_susp.numpy(), ident.chosen[non_susp].numpy()), ident.label[non_susp]
    )


def selection_phase(ctx: FlowContext, ident: Identification, cands: Candidates, stage1: torch.nn.Module) -> Selection:
    """The suspicious samples on which the stage-1 model agrees with the tentative label, and their images."""
    susp = ident.suspicious()
    if not len(susp):
        return Selection(torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    p1 = predict_candidates(stage1, cands.images, susp.numpy(), ctx.device, ctx.labels_bf16, "stage-1 labels")
    s2 = de.stage2_selection(p1, ident.label[susp], ident.suspicious_distances())
    return Selection(s2["consensus"], s2["chosen"])


def stage2_set(ident: Identification, cands: Candidates, sel: Selection, purified: ImageSet) -> ImageSet:
    """The stage-1 set and the suspicious samples that reached consensus."""
    cons = ident.suspicious()[sel.consensus]
    extra = ImageSet(de.gather_images(cands.images, cons.numpy(), sel.chosen[sel.consensus].numpy()), ident.label[cons])
    return ImageSet(torch.cat([purified.images, extra.images]), torch.cat([purified.labels, extra.labels]))


def final_phase(ctx: FlowContext, s: FlowState) -> Relabelled:
    """Suspicious samples relabelled by the stage-2 model; writes the purified dataset,
    ``decisions.csv`` and the example images."""
    bd, ident, cands, sel = s.attack.data, s.identification, s.candidates, s.selection
    stage2 = s.stage2.model
    stage2.eval()
    susp = ident.suspicious()
    final_label, chosen = ident.label.clone(), ident.chosen.clone()
    if len(susp):
        p2 = predict_candidates(stage2, cands.images, susp.numpy(), ctx.device, ctx.labels_bf16, "stage-2 labels")
        fin = de.final_relabel(p2, ident.suspicious_distances())
        final_label[susp] = fin["label"]
        chosen[susp] = fin["chosen"]
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


def report(ctx: FlowContext, s: FlowState) -> dict[str, Any]:
    """``metrics.json``: the attack's and the defence's metrics, the detection and the timings."""
    bd, ident, cands, rates = s.attack.data, s.identification, s.candidates, s.final.rates
    attack_metrics, defended = last_metrics(s.backdoored.history), last_metrics(s.stage2.history)
    timings = {ph: ctx.rec.phases.get(ph, {}).get("seconds") for ph in PHASES}
    metrics = finite(
        {
            "attack": ctx.attack,
            "save_folder_name": ctx.save_folder_name,
            "n_train": len(bd.train),
            "n_poisoned": int(bd.poison_indicator.sum()),
            "n_test_clean": len(bd.test_clean),
            "n_test_bd": len(bd.test_bd),
            "attack_metrics": attack_metrics,
            "defended_metrics": defended,
            "stage1_metrics": last_metrics(s.stage1.history),
            "TPR": rates["TPR"],
            "FPR": rates["FPR"],
            "detection": rates,
            "target_labels": ident.detection["target_labels"],
            "target_scores": ident.detection["scores"],
            "decisions": decision_counts(ident.decision),
            "stage2_consensus": int(s.selection.consensus.sum()),
            "candidates_per_sample": cands.images.shape[1],
            "candidate_label_rates": de.candidate_label_rates(
                cands.preds, bd.train.labels, bd.original_labels, bd.poison_indicator
            ),
            "timings_s": timings,
            "total_s": round(sum(t for t in timings.values() if t is not None), 3),
        }
    )
    atomic_write_json(ctx.rec.path("metrics.json"), metrics)
    ctx.log(
        f"done: attack BA {attack_metrics['BA']} ASR {attack_metrics['ASR']} | defended BA {defended['BA']} "
        f"ASR {defended['ASR']} RA {defended['RA']} | TPR {rates['TPR']} FPR {rates['FPR']}"
    )
    return metrics


# --------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class Step:
    """One step of the flow: ``run`` computes ``FlowState.<field>``, ``store`` writes it, and
    ``stored`` says whether an earlier run's output can be loaded with ``load`` instead.
    ``phase``: its ``phases.json`` entry (None: a step between phases); a step without
    ``stored`` runs every time, and a phase among those keeps the time of its first run."""

    field: str
    phase: str | None
    run: Callable[[FlowContext, FlowState], Any]
    stored: Callable[[FlowContext], bool] | None = None
    load: Callable[[FlowContext], Any] | None = None
    store: Callable[[FlowContext, Any], None] | None = None


def run_steps(ctx: FlowContext, steps: tuple[Step, ...] | None = None, state: FlowState | None = None) -> FlowState:
    """Run ``steps`` (default :data:`STEPS`) in order. A step whose phase is marked done (or
    that has no phase) and whose stored output exists is loaded; any other step runs, stores
    its output (each file atomically) and then has its phase marked done."""
    state = state or FlowState()
    for step in STEPS if steps is None else steps:
        resumable = step.stored is not None and step.load is not None
        if resumable and (step.phase is None or ctx.rec.done(step.phase)) and step.stored(ctx):
            if step.phase:
                ctx.log(f"phase {step.phase}: done earlier")
            out = step.load(ctx)
        else:
            t0 = time.time()
            out = step.run(ctx, state)
            if step.store is not None:
                step.store(ctx, out)
            if step.phase and (resumable or not ctx.rec.done(step.phase)):
                # after an interruption this is the time of the resuming run only
                ctx.rec.mark(step.phase, time.time() - t0)
        state = dataclasses.replace(state, **{step.field: out})
    return state


def _training_step(
    name: str,
    phase: str,
    lr_key: str,
    seed_offset: int,
    title: str,
    data: Callable[[FlowContext, FlowState], ImageSet],
    init: Callable[[FlowState], torch.nn.Module | None] = lambda s: None,
    then: Callable[[FlowContext, Trained], Trained] = lambda ctx, out: out,
) -> Step:
    """A classifier training writing ``<name>_model.pt`` etc. into ``FlowState.<name>``;
    ``then`` follows it whether it ran or was loaded."""

    def run(ctx: FlowContext, s: FlowState) -> Trained:
        out = train_phase(ctx, name, data(ctx, s), ctx.cfg[lr_key], seed_offset, s.attack.tests, init(s))
        return then(ctx, out)

    def store(ctx: FlowContext, out: Trained) -> None:
        store_trained(ctx, name, out, f"{ctx.attack}: {title}")

    return Step(
        name, phase, run, lambda ctx: trained_stored(ctx, name), lambda ctx: then(ctx, load_trained(ctx, name)), store
    )


def _stage1_data(ctx: FlowContext, s: FlowState) -> ImageSet:
    ctx.log(f"stage 1: training a fresh model on {len(s.purified)} non-suspicious samples")
    return s.purified


def _stage2_data(ctx: FlowContext, s: FlowState) -> ImageSet:
    ft_set = stage2_set(s.identification, s.candidates, s.selection, s.purified)
    susp, cons = len(s.identification.suspicious()), int(s.selection.consensus.sum())
    ctx.log(f"stage 2: {cons} of {susp} suspicious samples reach consensus; fine-tuning on {len(ft_set)}")
    return ft_set


def _selection_file(ctx: FlowContext) -> Path:
    return ctx.rec.path("stage2_selection.pt")


def _load_selection(ctx: FlowContext) -> Selection:
    s2 = safe_torch_load(_selection_file(ctx), "stage-2 selection")
    return Selection(s2["consensus"], s2["chosen"])


def _store_selection(ctx: FlowContext, out: Selection) -> None:
    atomic_torch_save({"consensus": out.consensus, "chosen": out.chosen}, _selection_file(ctx))


STEPS: tuple[Step, ...] = (
    Step(
        "attack",
        "attack",
        lambda ctx, s: attack_phase(ctx),
        lambda ctx: ctx.rec.path("attack_data.pt").is_file(),
        load_attack,
        store_attack,
    ),
    _training_step(
        "backdoored",
        "backdoor_training",
        "lr",
        0,
        "backdoored model",
        lambda ctx, s: s.attack.data.train,
        then=_attack_reported,
    ),
    Step(
        "candidates",
        "candidates",
        lambda ctx, s: candidates_phase(ctx, s.attack.data.train.images),
        lambda ctx: de.candidates_complete(ctx.rec.path("candidates")),
        load_candidates,
    ),
    Step(
        "identification",
        "identification",
        lambda ctx, s: identification_phase(ctx, s.attack.data.train.labels, s.candidates, s.backdoored.model),
        lambda ctx: ctx.rec.path("identification.pt").is_file(),
        load_identification,
        store_identification,
    ),
    Step("purified", None, lambda ctx, s: stage1_set(s.identification, s.candidates)),
    _training_step("stage1", "stage1", "lr", 1, "DataElixir stage 1", _stage1_data),
    Step(
        "selection",
        None,
        lambda ctx, s: selection_phase(ctx, s.identification, s.candidates, s.stage1.model),
        lambda ctx: _selection_file(ctx).is_file(),
        _load_selection,
        _store_selection,
    ),
    _training_step(
        "stage2",
        "stage2",
        "ft_lr",
        2,
        "DataElixir stage 2 (defended model)",
        _stage2_data,
        init=lambda s: s.stage1.model,
    ),
    Step("final", "final", final_phase),
    Step("report", None, report),
)
