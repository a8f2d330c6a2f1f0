"""The attack scripts' phases on their own, on small synthetic inputs (no CIFAR-10, no DDPM):
identification, the stage-2 selection and the final relabelling, and the resume rule."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn

from utils.data import ImageSet
from utils.dataelixir import defence as de
from utils.dataelixir import phases as bp
from utils.dataelixir.attack_data import BackdoorData
from utils.dataelixir.keys import FlowConfig
from utils.dataelixir.record import Record

CFG = FlowConfig.from_dict(
    {
        "threshold_tau": 0,
        "detection_tail": "two_sided",
        "attack_target": 3,
        "attack_label_trans": "all2one",
        "precisions": {"candidate_labels": "fp32"},
        "ssim_mode": "per_channel",
    },
    "badnet",
)


class PixelLabel(nn.Module):
    """Labels an image by its first byte (mod 10); its features are its first 16 pixels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        label = (x[:, 0, 0, 0] * 255).round().long() % 10
        return nn.functional.one_hot(label, 10).float() * 10

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 0, :16]


def _ctx(tmp_path, cfg=CFG) -> bp.FlowContext:
    def no_data():
        raise AssertionError("no phase here loads CIFAR-10")

    return bp.FlowContext(cfg, Record(tmp_path), tmp_path, torch.device("cpu"), lambda m: None, no_data)


def _candidates(labels: list[list[int]], seed: int = 0) -> bp.Candidates:
    """Random images whose first byte makes ``PixelLabel`` give them ``labels`` [N, K]."""
    lab = np.array(labels, dtype=np.int64)
    g = np.random.default_rng(seed)
    images = g.integers(0, 256, size=(*lab.shape, 3, 32, 32), dtype=np.uint8)
    images[:, :, 0, 0, 0] = lab + 10 * g.integers(0, 25, size=lab.shape)
    return bp.Candidates(images, lab.astype(np.int16))


# classes 0, 1, 2 and 4: one sample keeps its label, one leaves it once; class 3 (the target)
# has a sample moving wholly to 7 (relabelled), one split between 7 and 8 (suspicious)
LABELS = [0, 0, 1, 1, 2, 2, 4, 4, 3, 3, 3]
PREDS = [[c] * 5 if i % 2 == 0 else [c, c, c, c, 5] for i, c in enumerate(LABELS[:8])]
PREDS += [[3, 3, 3, 3, 3], [3, 7, 7, 7, 7], [3, 7, 8, 7, 8]]


def test_identification_phase_sorts_and_chooses(tmp_path):
    cands = _candidates(PREDS)
    out = bp.identification_phase(_ctx(tmp_path), torch.tensor(LABELS), cands, PixelLabel())
    assert out.detection["target_labels"] == [3] and out.detection["true_attack_target"] == 3
    assert out.decision.tolist() == [de.KEPT] * 9 + [de.RELABELLED, de.SUSPICIOUS]
    assert out.label.tolist() == LABELS[:9] + [7, 7]
    assert out.transition.tolist() == [i % 2 == 1 for i in range(8)] + [False, True, True]
    assert out.dist_rows.tolist() == [9, 10] and out.distances.shape == (2, 5)
    assert out.distances[:, 0].tolist() == [0.0, 0.0]
    # the relabelled sample's image: the 0.8-quantile of its kept candidates by distance
    want = de.select_index(out.distances[:1], out.kept[9:10])
    assert out.chosen.tolist() == [0] * 9 + [int(want)] + [-1]
    assert out.suspicious().tolist() == [10]
    assert torch.equal(out.suspicious_distances(), out.distances[1:])
    # identification.pt holds the tensors, in the order earlier records have them
    assert list(out.tensors()) == [f.name for f in dataclasses.fields(out)][:-1]


def test_identification_phase_says_why_no_target_is_detected_when_the_scores_are_nan(tmp_path):
    # class 0's one (transitioning) sample has labels 5 and 6 only, class 1's 6 and 7: both KL
    # metrics are infinite, so is their median, and every MAD score NaN
    logs: list[str] = []
    ctx = dataclasses.replace(_ctx(tmp_path), log=logs.append)
    cands = _candidates([[5, 6, 6, 6, 6], [6, 7, 7, 7, 7], [2, 2, 2, 2, 2]])
    out = bp.identification_phase(ctx, torch.tensor([0, 1, 2]), cands, PixelLabel())
    assert out.detection["target_labels"] == [] and out.detection["median"] == "inf"
    warned = [m for m in logs if m.startswith("warning: target detection: ")]
    assert len(warned) == 1 and "infinite for classes [0, 1]" in warned[0]
    assert not any(m.startswith("target labels") for m in logs)
    assert out.detection["warning"] == warned[0].removeprefix("warning: target detection: ")


def test_a_phase_draws_the_same_numbers_whatever_ran_before_it(tmp_path):
    """A phase's global generators are seeded from (random_seed, phase): what ran earlier in
    the process (a model built, another phase) does not change its draws."""
    ctx = _ctx(tmp_path)
    first = bp.cached_phase(ctx, "stage1", lambda: (torch.rand(3), np.random.rand(), nn.Linear(2, 2).weight))
    torch.rand(100), np.random.rand(7), nn.Linear(5, 5)
    again = bp.cached_phase(_ctx(tmp_path), "stage1", lambda: (torch.rand(3), np.random.rand(), nn.Linear(2, 2).weight))
    assert torch.equal(first[0], again[0]) and first[1] == again[1] and torch.equal(first[2], again[2])
    other = bp.cached_phase(ctx, "stage2", lambda: torch.rand(3))
    assert not torch.equal(other, first[0])
    reseeded = dataclasses.replace(ctx, cfg=dataclasses.replace(CFG, random_seed=CFG.random_seed + 1))
    assert not torch.equal(bp.cached_phase(reseeded, "stage1", lambda: torch.rand(3)), first[0])
    assert CFG.phase_seed("stage1") == CFG.phase_seed("stage1") != CFG.phase_seed("stage2")


def _ident(decision: list[int], label: list[int], distances: list[list[float]]) -> bp.Identification:
    n, k = len(decision), len(distances[0])
    dec = torch.tensor(decision)
    rows = torch.nonzero(dec != de.KEPT).flatten()
    chosen = torch.zeros(n, dtype=torch.long)
    chosen[dec == de.SUSPICIOUS] = -1
    return bp.Identification(
        kept=torch.ones(n, k, dtype=torch.bool),
        transition=dec != de.KEPT,
        majority=torch.tensor(label),
        decision=dec,
        label=torch.tensor(label),
        chosen=chosen,
        dist_rows=rows,
        distances=torch.tensor(distances, dtype=torch.float64),
        detection={"target_labels": [7], "scores": [0.0] * 10},
    )


S, K = de.SUSPICIOUS, de.KEPT
# sample 1: the stage-1 model agrees with the tentative 7 on the original and on candidates
# 1, 3, 4; sample 2: it does not (5 on the original)
SEL_PREDS = [[1, 1, 1, 1, 1], [7, 7, 2, 7, 7], [5, 4, 4, 4, 4]]
SEL_IDENT = ([K, S, S], [1, 7, 4], [[0, 0.1, 0.2, 0.3, 0.4], [0, 0.4, 0.3, 0.2, 0.1]])


def test_selection_phase_keeps_the_consensus(tmp_path):
    out = bp.selection_phase(_ctx(tmp_path), _ident(*SEL_IDENT), _candidates(SEL_PREDS), PixelLabel())
    # valid: 0 (0.0), 1 (0.1), 3 (0.3), 4 (0.4); position int(4 * 0.8) = 3 -> candidate 4
    assert out.consensus.tolist() == [True, False] and out.chosen.tolist() == [4, -1]
    none = bp.selection_phase(_ctx(tmp_path), _ident([K], [1], [[0, 0.1]]), _candidates([[1, 1]]), PixelLabel())
    assert none.consensus.shape == (0,) and none.chosen.shape == (0,)


def _backdoor_data(images: torch.Tensor, labels: list[int], original: list[int], poisoned: list[bool]) -> BackdoorData:
    empty = ImageSet(torch.zeros(0, 3, 32, 32, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    return BackdoorData(
        ImageSet(images, torch.tensor(labels)), torch.tensor(original), torch.tensor(poisoned), empty, empty, empty, {}
    )


def test_final_phase_relabels_the_suspicious_samples(tmp_path):
    cands = _candidates(SEL_PREDS)
    ident = _ident(*SEL_IDENT)
    bd = _backdoor_data(torch.from_numpy(cands.images[:, 0].copy()), [1, 3, 3], [1, 7, 4], [False, True, True])
    sel = de.Stage2Selection(torch.tensor([True, False]), torch.tensor([4, -1]))
    out = bp.final_phase(_ctx(tmp_path), bd, cands, ident, sel, PixelLabel())
    # the stage-2 model's label of each suspicious original, and its image among the candidates
    # it gives that label: sample 1 -> 7 (candidates 0, 1, 3, 4 -> 4), sample 2 -> 5 (only 0)
    assert out.label.tolist() == [1, 7, 5] and out.chosen.tolist() == [0, 4, 0]
    assert out.rates.tpr == 1.0 and out.rates.fpr == 0.0
    rows = list(csv.reader((tmp_path / "decisions.csv").open()))
    assert [r[5] for r in rows[1:]] == ["kept", "suspicious", "suspicious"]
    assert [r[7] for r in rows[1:]] == ["", "1", "0"]
    saved = torch.load(tmp_path / "purified_dataset.pt", weights_only=True)
    assert torch.equal(saved["images"][1], torch.from_numpy(cands.images[1, 4]))


def _identify(ctx: bp.FlowContext, cands: bp.Candidates) -> bp.Identification:
    """The identification phase under the resume rule, as the flow runs it."""
    labels = torch.tensor(LABELS)
    return bp.cached_phase(
        ctx,
        "identification",
        lambda: bp.identification_phase(ctx, labels, cands, PixelLabel()),
        bp.identification_record(ctx),
    )


def test_a_stored_phase_is_loaded_instead_of_run(tmp_path, monkeypatch):
    cands = _candidates(PREDS)
    ctx = _ctx(tmp_path)
    first = _identify(ctx, cands)
    assert ctx.rec.done("identification") and (tmp_path / "identification.pt").is_file()

    def must_not_run(*a, **k):
        raise AssertionError("a stored phase ran again")

    monkeypatch.setattr(bp, "identification_phase", must_not_run)
    again = _identify(_ctx(tmp_path), cands)  # a new run reads phases.json
    for f in dataclasses.fields(first):
        a, b = getattr(first, f.name), getattr(again, f.name)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, f.name
    # a phase not marked done, or whose output is gone, runs again
    (tmp_path / "phases.json").unlink()
    with pytest.raises(AssertionError, match="ran again"):
        _identify(_ctx(tmp_path), cands)
    ctx = _ctx(tmp_path)
    ctx.rec.mark("identification", 1.0)
    (tmp_path / "identification.pt").unlink()
    with pytest.raises(AssertionError, match="ran again"):
        _identify(ctx, cands)


def test_a_step_between_phases_is_loaded_when_stored_without_a_mark(tmp_path):
    runs = []
    stored = bp.Stored(lambda: bool(runs), lambda: "loaded", lambda out: None)
    ctx = _ctx(tmp_path)
    assert bp.cached_phase(ctx, None, lambda: runs.append(1) or "run", stored) == "run"
    assert bp.cached_phase(ctx, None, lambda: runs.append(1) or "run", stored) == "loaded"
    assert runs == [1] and ctx.rec.phases == {}


def test_a_phase_without_stored_output_runs_every_time_and_keeps_its_first_time(tmp_path):
    runs = []
    ctx = _ctx(tmp_path)
    assert bp.cached_phase(ctx, "final", lambda: runs.append(1) or {"n": len(runs)}) == {"n": 1}
    first = dict(ctx.rec.phases["final"])
    assert bp.cached_phase(ctx, "final", lambda: runs.append(1) or {"n": len(runs)}) == {"n": 2}
    assert ctx.rec.phases["final"] == first


def test_stop_after_offers_every_phase_but_the_last():
    from utils.dataelixir.record import PHASES
    from utils.options import FIXED_OPTIONS

    assert FIXED_OPTIONS["stop_after"].choices == PHASES[:-1]


def test_flow_config_gives_back_the_record_settings_key_for_key():
    """config.yaml and the logged configuration come from FlowConfig.to_dict: every key, in
    the order of the parsed settings, for every attack; the typed fields are the flow's keys."""
    from utils.dataelixir.attack_data import ATTACKS, COMMON_KEYS
    from utils.dataelixir.keys import FLOW_KEYS, attack_keys

    typed = {f.name for f in dataclasses.fields(FlowConfig)} - {"attack", "trigger_settings", "precisions"}
    assert typed == set(FLOW_KEYS)
    for attack in ATTACKS:
        settings = {"attack": attack, **{k: key.default for k, key in attack_keys(attack).items()}}
        settings["precisions"] = {"trigger": "fp32", "backdoor_training": "bf16"}
        cfg = FlowConfig.from_dict(settings)
        assert list(cfg.to_dict().items()) == list(settings.items()), attack
        assert cfg.steplr_milestones == (100, 200, 300, 400) and cfg.precision_of("ddpm_rounds") == "fp32"
        own = set(attack_keys(attack)) - set(FLOW_KEYS)
        assert set(cfg.trigger_params()) == own | set(COMMON_KEYS)
