"""The cross-threat table: every finished victim of ``<work>`` as mean ± std over seeds, and
the run that makes it (:func:`run_table`: the steps not yet done, the table rewritten after each).

Outputs in the work dir: ``cross_threat.md`` (both halves), ``cross_threat.csv`` (one line per
half, row, column and metric), ``cross_threat.json`` (the same statistics, every step's wall
time, the settings) and ``cross_threat.png`` (grouped bars of both halves).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from utils.crossthreat.plan import (
    BACKDOOR_VARIANTS,
    CLEAN,
    ELIXIR_VARIANTS,
    CrossThreat,
    build_steps,
    current_eval,
    victim_name,
)
from utils.demo.pipeline import VARIANTS, _stats, plan_lines, run_command, run_commands, victim_result
from utils.demo.pipeline import victim_name as demo_victim_name
from utils.demo.stored import Stored, check_stored_settings, stored_differences
from utils.fileio import atomic_write_json, atomic_write_text, read_state_json
from utils.plots import pyplot, save_figure

TABLE = "cross_threat"
METRICS = ("BA", "ASR", "RA")
# (B)'s columns: the demo's own victims on the poison (read from --eclipse_work), then ours
DEMO_COLUMNS = {
    "clean": "clean subset (demo)",
    "none": "no defence (demo)",
    "issj": "ISS-J (demo)",
    "eclipse": "ECLIPSE (demo)",
}
ELIXIR_COLUMNS = {**DEMO_COLUMNS, **{v: title for v, (title, _) in ELIXIR_VARIANTS.items()}}
HOW = "re-run that step with --overwrite"


def _fmt(st: dict[str, Any]) -> str:
    if not st["n"]:
        return "—"
    return f"{st['mean']:.1f}" if st["n"] == 1 else f"{st['mean']:.1f} ± {st['std']:.1f}"


def _seconds(work: Path) -> dict[str, float]:
    path = work / "step_seconds.json"
    return read_state_json(path, "delete it (it only holds the steps' timings)") if path.is_file() else {}


def _row_seconds(seconds: dict[str, float], name: str) -> dict[str, float]:
    """The wall time of each step of row ``name`` (its steps' keys start with the name)."""
    return {k: v for k, v in seconds.items() if k.split(" ")[0] == name}


def _cell_minutes(steps: dict[str, float], name: str, variant: str) -> float:
    """A column's own steps (its victims, their evaluations), without the row's shared ones."""
    return sum(v for k, v in steps.items() if k.startswith(f"{name} {variant} s")) / 60


def backdoor_rows(work: Path, attacks: Sequence[str], seeds: int) -> list[dict[str, Any]]:
    """(A): per attack with a finished, evaluated victim, BA / ASR / RA of each defence."""
    seconds = _seconds(work)
    rows = []
    for a in attacks:
        cells: dict[str, dict[str, Any]] = {}
        for v in BACKDOOR_VARIANTS:
            # only evaluations of the victims' current models (as the plan's check): a victim
            # redone since its evaluation never shows the old model's ASR
            found = [current_eval(work, victim_name(a, v, s)) for s in range(seeds)]
            evals = [e for e in found if e is not None]
            cells[v] = {m: _stats([float(e[m]) for e in evals]) for m in METRICS}
        if any(c["BA"]["n"] for c in cells.values()):
            steps = _row_seconds(seconds, a)
            for v in BACKDOOR_VARIANTS:
                cells[v]["minutes"] = _cell_minutes(steps, a, v)
            rows.append({"attack": a, "cells": cells, "step_seconds": steps, "minutes": sum(steps.values()) / 60})
    return rows


# the demo's victim settings that must be this table's recipe for its columns to sit beside ours
DEMO_RECIPE_KEYS = ("arch", "width", "epochs", "schedule", "weight_decay", "test_subset")


def demo_cell(
    eclipse_work: Path, recipe: Mapping[str, Any], poison: str, variant: str | None, seeds: int
) -> tuple[dict[str, Any], list[str]]:
    """The demo's victims of one (B) column (``poison`` '' is the clean subset) as statistics,
    over those made with this table's ``recipe`` only; and a note per victim left out (its
    run name and each differing setting), so a demo run with another recipe is never shown
    beside this table's victims as if comparable."""
    r = recipe
    values: dict[str, Any] = {k: r.get(k) for k in DEMO_RECIPE_KEYS}
    if variant == "eclipse":  # the demo's ECLIPSE victim also names its purified set
        values |= {"t": r.get("t"), "iter": r.get("diffusion_iterations")}
    accs, left_out = [], []
    for seed in range(seeds):
        name = demo_victim_name("" if poison == CLEAN else poison, variant, seed)  # clean: demo-clean(-eclipse)
        result = victim_result(eclipse_work, name)
        if not result.is_file():
            continue
        _, diffs = stored_differences(Stored((result,), values, ("settings",))) or (result, [])
        if diffs:
            left_out.append(f"{name} ({'; '.join(diffs)})")
        else:
            accs.append(float(read_state_json(result, HOW)["final_test_acc"]))
    return _stats(accs), left_out


def poison_rows(
    work: Path, eclipse_work: Path, poisons: Sequence[str], seeds: int, recipe: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """(B): per poison with a finished victim, the victims' test accuracy beside the demo's
    (the demo's victims made with another recipe than ``recipe`` left out, each row's
    ``demo_left_out`` naming them)."""
    seconds = _seconds(work)
    clean, clean_left_out = demo_cell(eclipse_work, recipe, "", None, seeds)
    rows = []
    for p in poisons:
        cells, left_out = {"clean": clean}, list(clean_left_out)
        for v in [c for c in DEMO_COLUMNS if c != "clean"]:  # the clean column: read once, above
            cells[v], more = demo_cell(eclipse_work, recipe, p, v, seeds)
            left_out += more
        for v in ELIXIR_VARIANTS:
            found = [victim_result(work, victim_name(p, v, s)) for s in range(seeds)]
            cells[v] = _stats([float(read_state_json(f, HOW)["final_test_acc"]) for f in found if f.is_file()])
        if any(cells[v]["n"] for v in ELIXIR_VARIANTS):
            steps = _row_seconds(seconds, p)
            for v in ELIXIR_VARIANTS:
                cells[v] = {**cells[v], "minutes": _cell_minutes(steps, p, v)}
            row = {"poison": p, "cells": cells, "step_seconds": steps, "minutes": sum(steps.values()) / 60}
            rows.append(row | {"demo_left_out": left_out})
    return rows


def table_markdown(backdoor: list[dict[str, Any]], poison: list[dict[str, Any]]) -> str:
    lines = ["(A) backdoor attacks (attack scripts' data, CPU overlay) against ECLIPSE and the ISS baselines:"]
    lines.append("BA on the clean test set, ASR and RA on the attack's triggered test images (%)")
    header = ["attack", *(f"{VARIANTS[v][0]}: BA / ASR / RA" for v in BACKDOOR_VARIANTS), "wall time (steps summed)"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in backdoor:
        cells = [" / ".join(_fmt(r["cells"][v][m]) for m in METRICS) for v in BACKDOOR_VARIANTS]
        lines.append("| " + " | ".join([r["attack"], *cells, f"{r['minutes']:.0f} min"]) + " |")
    lines += ["", "(B) clean-label poisons (the ECLIPSE demo's) against DataElixir's purification rounds:"]
    lines.append("victim test accuracy (%); the demo's columns from its own victims")
    header = ["poison", *ELIXIR_COLUMNS.values(), "wall time (steps summed)"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in poison:
        cells = [_fmt(r["cells"][c]) for c in ELIXIR_COLUMNS]
        lines.append("| " + " | ".join([r["poison"], *cells, f"{r['minutes']:.0f} min"]) + " |")
    left_out = list(dict.fromkeys(x for r in poison for x in r.get("demo_left_out", [])))
    if left_out:
        lines += ["", f"demo victims left out, made with another recipe than this table's: {', '.join(left_out)}"]
    return "\n".join(lines)


def table_csv(backdoor: list[dict[str, Any]], poison: list[dict[str, Any]]) -> str:
    """One line per half, row, column and metric; ``minutes``: the column's own steps (its
    victims and their evaluations; empty for the demo's columns)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["half", "threat", "defence", "metric", "n", "mean", "std", "values", "minutes"])

    def line(half: str, threat: str, column: str, metric: str, st: dict[str, Any], minutes: Any) -> None:
        vals = " ".join(f"{x:g}" for x in st["values"])
        minutes = "" if minutes is None else round(minutes, 1)
        w.writerow([half, threat, column, metric, st["n"], st["mean"], st["std"], vals, minutes])

    for r in backdoor:
        for v in BACKDOOR_VARIANTS:
            for m in METRICS:
                line("A", r["attack"], v, m, r["cells"][v][m], r["cells"][v]["minutes"])
    for r in poison:
        for c in ELIXIR_COLUMNS:
            line("B", r["poison"], c, "acc", r["cells"][c], r["cells"][c].get("minutes"))
    return buf.getvalue()


def write_table(ct: CrossThreat, status: str = "complete", machine: dict[str, Any] | None = None) -> str:
    """Rewrite the four outputs from what is finished in ``ct.work``; returns the markdown."""
    backdoor = backdoor_rows(ct.work, ct.attacks, ct.seeds)
    poison = poison_rows(ct.work, ct.eclipse_work, ct.poisons, ct.seeds, ct.recipe)
    table = table_markdown(backdoor, poison)
    ct.work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ct.work / f"{TABLE}.md", table + "\n")
    settings = {
        "eclipse_work": str(ct.eclipse_work),
        "dataelixir_work": str(ct.dataelixir_work),
        "overlay": ct.overlay,
        "seeds": ct.seeds,
        "recipe": dict(ct.recipe),
    }
    atomic_write_json(
        ct.work / f"{TABLE}.json",
        {"status": status, "machine": machine, "settings": settings, "backdoor": backdoor, "poisons": poison},
    )
    atomic_write_text(ct.work / f"{TABLE}.csv", table_csv(backdoor, poison))
    if backdoor or poison:
        plot(backdoor, poison, ct.work / f"{TABLE}.png")
    return table


def _bars(ax: Any, groups: list[str], series: dict[str, list[dict[str, Any]]], ylabel: str) -> None:
    width = 0.8 / len(series)
    for i, (label, cells) in enumerate(series.items()):
        xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(groups))]
        means = [c["mean"] or 0.0 for c in cells]
        ax.bar(xs, means, width, yerr=[c["std"] or 0.0 for c in cells], label=label)
    ax.set_xticks(range(len(groups)), groups, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 102)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them


def plot(backdoor: list[dict[str, Any]], poison: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars: (A) ASR and BA per attack and defence, (B) accuracy per poison and column."""
    panels = [p for p in ("ASR", "BA") if backdoor] + (["B"] if poison else [])
    n = max(len(backdoor), len(poison), 1)
    fig, axes = pyplot().subplots(len(panels), 1, figsize=(max(8.0, 1.1 * n + 4), 2.8 * len(panels)), squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        if panel == "B":
            series = {t: [r["cells"][c] for r in poison] for c, t in ELIXIR_COLUMNS.items()}
            _bars(ax, [r["poison"] for r in poison], series, "(B) victim accuracy (%)")
        else:
            series = {VARIANTS[v][0]: [r["cells"][v][panel] for r in backdoor] for v in BACKDOOR_VARIANTS}
            _bars(ax, [r["attack"] for r in backdoor], series, f"(A) {panel} (%)")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def run_table(
    ct: CrossThreat,
    jobs: int = 1,
    overwrite: bool = False,
    runner: Callable[[list[str]], float] = run_command,
    say: Callable[[str], None] = print,
    machine: dict[str, Any] | None = None,
    log: TextIO | None = None,
    plan_only: bool = False,
) -> None:
    """Plan both halves (inputs checked, stored settings compared), run the steps not done,
    ``jobs`` at a time, rewriting the table after each (``plan_only``: print the plan alone)."""
    steps = build_steps(ct)
    for line in check_stored_settings(steps, overwrite):
        say(line)
    lines = [line.removesuffix(": time not estimated") for line in plan_lines(steps, jobs)[1:-1]]
    todo = sum(not s.done for s in steps)
    for line in ["cross-threat plan (steps not timed):", *lines, f"  {todo} step(s) to run, {jobs} at a time"]:
        say(line)
    if plan_only:
        return
    run_commands(
        steps,
        ct.work,
        jobs,
        log,
        runner=runner,
        say=say,
        on_step_done=lambda done, total: write_table(ct, f"partial: {done} of {total} steps done", machine),
    )
