"""The files an attack script writes besides the models: the attack data, training curves,
per-sample decisions, example images, and JSON-safe numbers and diagnostics for the reports."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.data import ImageSet
from utils.dataelixir.attack_data import BackdoorData
from utils.dataelixir.defence import DECISION_NAMES
from utils.fileio import atomic_torch_save, atomic_write_text, safe_torch_load
from utils.plots import history_series, save_curves, save_image_grid


def finite(x: Any) -> Any:
    """JSON-safe numbers: inf / nan become strings."""
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [finite(v) for v in x]
    if isinstance(x, np.ndarray):
        return finite(x.tolist())
    if isinstance(x, float | np.floating) and not math.isfinite(float(x)):
        return str(float(x))
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return x


def last_metrics(history: list[dict]) -> dict[str, float]:
    """BA / ASR / RA of the last evaluated epoch of a training history."""
    for h in reversed(history):
        if "BA" in h:
            return {k: h.get(k) for k in ("BA", "ASR", "RA")}
    return {"BA": None, "ASR": None, "RA": None}


@dataclass(frozen=True)
class CandidateLabelRates:
    """Per candidate position, the rate of each kind of label (None: no such sample)."""

    clean_dataset_label: list[float | None]
    poisoned_true_label: list[float | None]
    poisoned_dataset_label: list[float | None]


def candidate_label_rates(
    preds: torch.Tensor | np.ndarray,
    dataset_labels: torch.Tensor | np.ndarray,
    true_labels: torch.Tensor | np.ndarray,
    poison_indicator: torch.Tensor | np.ndarray,
) -> CandidateLabelRates:
    """Per candidate position (0 = original, then each round's kept steps), how often the
    backdoored model gives clean samples their label, and poisoned samples their true or
    their poisoned (dataset) label.

    An experiment's diagnostic, not part of the defence (it needs the ground truth): the
    defence works when purified clean samples keep their label and purified poisoned ones
    go back to their true class; where the first rate is low, clean samples transition too
    and the target class stops standing out.
    """
    p = np.asarray(preds)
    y = np.asarray(dataset_labels)[:, None]
    t = np.asarray(true_labels)[:, None]
    pi = np.asarray(poison_indicator).astype(bool)

    def rate(hit: np.ndarray, rows: np.ndarray) -> list[float | None]:
        return hit[rows].mean(0).tolist() if rows.any() else [None] * p.shape[1]

    return CandidateLabelRates(
        clean_dataset_label=rate(p == y, ~pi),
        poisoned_true_label=rate(p == t, pi),
        poisoned_dataset_label=rate(p == y, pi),
    )


def history_csv(path: Path, history: list[dict]) -> None:
    cols: list[str] = []
    for h in history:
        cols += [k for k in h if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for h in history:
        w.writerow(h)
    atomic_write_text(path, buf.getvalue())


def write_curves(folder: Path, name: str, history: list[dict], title: str) -> None:
    """``<name>_curves.csv`` and ``<name>_curves.png`` (BA / ASR / RA per epoch) in ``folder``."""
    history_csv(folder / f"{name}_curves.csv", history)
    save_curves(folder / f"{name}_curves.png", history_series(history, ["BA", "ASR", "RA"]), title=title)


def save_attack_data(path: Path, bd: BackdoorData, train_idx: torch.Tensor) -> None:
    atomic_torch_save(
        {
            "train_images": bd.train.images,
            "train_labels": bd.train.labels,
            "original_labels": bd.original_labels,
            "poison_indicator": bd.poison_indicator,
            "train_cifar_indices": train_idx,
            "test_clean_images": bd.test_clean.images,
            "test_clean_labels": bd.test_clean.labels,
            "test_bd_images": bd.test_bd.images,
            "test_bd_labels": bd.test_bd.labels,
            "test_ra_labels": bd.test_ra.labels,
            "info_json": json.dumps(finite(bd.info)),
        },
        path,
    )


def load_attack_data(path: Path) -> tuple[BackdoorData, torch.Tensor]:
    """The attack's data and the CIFAR-10 indices of its training set, as ``save_attack_data`` wrote them."""
    d = safe_torch_load(path, "attack data")
    bd = BackdoorData(
        train=ImageSet(d["train_images"], d["train_labels"]),
        original_labels=d["original_labels"],
        poison_indicator=d["poison_indicator"],
        test_clean=ImageSet(d["test_clean_images"], d["test_clean_labels"]),
        test_bd=ImageSet(d["test_bd_images"], d["test_bd_labels"]),
        test_ra=ImageSet(d["test_bd_images"], d["test_ra_labels"]),
        info=json.loads(d["info_json"]),
    )
    return bd, d["train_cifar_indices"]


def write_decisions(
    path: Path,
    bd: BackdoorData,
    transition: torch.Tensor,
    decision: torch.Tensor,
    stage1_label: torch.Tensor,
    consensus: torch.Tensor,
    final_label: torch.Tensor,
    chosen: torch.Tensor,
) -> None:
    """``decisions.csv``: one row per training sample; ``consensus`` is -1 where the sample
    was not suspicious (an empty cell), else 0 / 1."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [
            "index",
            "poisoned",
            "true_label",
            "dataset_label",
            "transition",
            "decision",
            "stage1_label",
            "stage2_consensus",
            "final_label",
            "chosen_candidate",
        ]
    )
    cols = zip(
        bd.poison_indicator.tolist(),
        bd.original_labels.tolist(),
        bd.train.labels.tolist(),
        transition.tolist(),
        decision.tolist(),
        stage1_label.tolist(),
        consensus.tolist(),
        final_label.tolist(),
        chosen.tolist(),
    )
    for i, (pi, y0, y, tr, dec, l1, con, fl, ch) in enumerate(cols):
        w.writerow([i, int(pi), y0, y, int(tr), DECISION_NAMES[dec], l1, "" if con < 0 else con, fl, ch])
    atomic_write_text(path, buf.getvalue())


def example_png(path: Path, bd: BackdoorData, purified: torch.Tensor) -> None:
    """Up to 12 poisoned and 4 clean training images above their purified versions."""
    poisoned = torch.nonzero(bd.poison_indicator).flatten()[:12]
    clean = torch.nonzero(~bd.poison_indicator).flatten()[:4]
    idx = torch.cat([poisoned, clean])
    if len(idx) == 0:
        return
    save_image_grid(
        path,
        [bd.train.images[idx], purified[idx]],
        row_labels=["training set (poisoned first)", "purified"],
    )
