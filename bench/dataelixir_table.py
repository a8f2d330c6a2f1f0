"""Every backdoor attack followed by DataElixir, at CPU scale, as one table (docs/RESULTS.md).

One command runs the attack scripts not yet finished, ``--jobs`` at a time with one thread
each, then tables every finished record in ``<work_dir>/record``:

    python bench/dataelixir_table.py --attacks all --jobs 2 --work_dir runs/dataelixir
    python bench/dataelixir_table.py --attacks badnet,lc --seeds 2 --jobs 2 --work_dir runs/dataelixir

Each run is ``attack/<attack>.py --yaml_path config/<attack>/cifar10.yaml --overlay
config/dataelixir_cpu.yaml`` (plus ``config/<attack>/cpu.yaml`` where an attack has its own
CPU-scale deviation) ``--random_seed S --save_folder_name <attack>_s<S>``; an attack
script resumes its own phases, and a run whose ``metrics.json`` exists is skipped. The
table (``dataelixir_table.md``/``.csv``/``.json``, ``dataelixir_table.png``) is rewritten
after every finished run: BA / ASR / RA before and after the defence, TPR / FPR of the
final relabelling, the detected target labels with their scores, the decisions, the
candidate-label diagnostic (how often the backdoored model gives clean samples their label,
and poisoned samples their true label and their poisoned label, i.e. whether the trigger
survives; at the original and at the last kept step of each round) and the wall time.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import Any

from common import machine

from utils.dataelixir.attack_data import ATTACKS
from utils.dataelixir.flow import attack_argv
from utils.demo.pipeline import CommandFailed, DemoCommand, interrupt_on_sigterm, run_commands
from utils.fileio import UserError, atomic_write_json, atomic_write_text, cli_main, read_state_json
from utils.options import POSITIVE, PRECISION, Key, add_keys_to_argparser, load_yaml_file
from utils.plots import pyplot, save_figure

KEYS = {
    "attacks": Key("all", "comma-separated attacks, or 'all'"),
    "seeds": Key(1, "runs per attack, random_seed 0..N-1", range=POSITIVE),
    "jobs": Key(2, "attack runs at a time (one thread each)", range=POSITIVE),
    "overlay": Key(
        "config/dataelixir_cpu.yaml",
        "the CPU-scale overlay every run gets (comma-separated: several, applied in order, e.g. "
        "config/dataelixir_cpu.yaml,config/dataelixir_cpu_20k.yaml)",
    ),
    "work_dir": Key("runs/dataelixir", "where the records and the table go"),
    "precision": Key(
        None,
        "every run's --precision (auto / fp32 / bf16); null: the overlay's (auto: the policy's choice per "
        "computation). A started record keeps the precisions it was started with",
        nullable=True,
        choices=PRECISION.choices,
    ),
    "table_only": Key(False, "run nothing; table the finished records", flag=True),
}
COLUMNS = [
    "attack", "seed", "BA", "ASR", "RA", "BA_after", "ASR_after", "RA_after", "TPR", "FPR",
    "targets", "decisions", "clean_own_label", "poisoned_true_label", "poisoned_poisoned_label", "minutes",
    "precision",
]  # fmt: skip


def parse_attacks(text: str) -> list[str]:
    names = list(ATTACKS) if text == "all" else [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in names if a not in ATTACKS]
    if unknown or not names:
        raise UserError(f"--attacks: unknown attack(s) {unknown or [text]}; choose from {', '.join(ATTACKS)} or 'all'")
    return names


def record_name(attack: str, seed: int) -> str:
    return f"{attack}_s{seed}"


def build_commands(
    attacks: list[str], seeds: int, overlay: str, work: Path, py: str = sys.executable, precision: str | None = None
) -> list[DemoCommand]:
    steps = []
    for attack in attacks:
        for seed in range(seeds):
            name = record_name(attack, seed)
            cmd = [py, f"attack/{attack}.py", *attack_argv(attack, overlay, seed, work, name)]
            cmd += ["--precision", precision] if precision else []
            done = (work / "record" / name / "metrics.json").is_file()
            steps.append(DemoCommand(name, f"{attack} + DataElixir, seed {seed}", cmd, None, done))
    return steps


def _round_ends(n_candidates: int, rounds: int) -> list[int]:
    """Candidate positions of the original and of the last kept step of each round."""
    per_round = (n_candidates - 1) // rounds
    return [0, *(per_round * r for r in range(1, rounds + 1))]


def _pct(rates: list[float | None], at: list[int]) -> str:
    return " / ".join("—" if rates[i] is None else f"{100 * rates[i]:.0f}" for i in at)


def table_rows(work: Path) -> list[dict[str, Any]]:
    """One row per finished record in ``work/record`` (attack order, then seed)."""
    rows = []
    for metrics_file in sorted((work / "record").glob("*/metrics.json")):
        m = read_state_json(metrics_file, "re-run that attack with --overwrite")
        cfg = load_yaml_file(metrics_file.parent / "config.yaml")
        try:
            rows.append(_row(m, cfg, metrics_file.parent.name))
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise UserError(
                f"{metrics_file}: not a finished attack record of this version ({type(e).__name__}: {e}); "
                "re-run that attack with --overwrite"
            ) from None
    order = {a: i for i, a in enumerate(ATTACKS)}
    return sorted(rows, key=lambda r: (order.get(r["attack"], len(order)), r["seed"], r["record"]))


def _row(m: dict[str, Any], cfg: dict[str, Any], record: str) -> dict[str, Any]:
    at = _round_ends(m["candidates_per_sample"], cfg["rounds_n"])
    rates = m["candidate_label_rates"]
    before, after = m["attack_metrics"], m["defended_metrics"]
    return {
        "attack": m["attack"],
        "seed": cfg["random_seed"],
        "record": record,
        "BA": before["BA"],
        "ASR": before["ASR"],
        "RA": before["RA"],
        "BA_after": after["BA"],
        "ASR_after": after["ASR"],
        "RA_after": after["RA"],
        "TPR": m["TPR"],
        "FPR": m["FPR"],
        "targets": _targets(m["target_labels"], m["target_scores"]),
        "decisions": " / ".join(str(m["decisions"].get(k, 0)) for k in ("kept", "relabelled", "suspicious")),
        "clean_own_label": _pct(rates["clean_dataset_label"], at),
        "poisoned_true_label": _pct(rates["poisoned_true_label"], at),
        "poisoned_poisoned_label": _pct(rates["poisoned_dataset_label"], at),
        "minutes": round(m["total_s"] / 60, 1),
        "precision": _precision(cfg.get("precisions")),
    }


def _precision(precisions: dict[str, str] | None) -> str:
    """The record's resolved precisions: one name where every computation used it, else each."""
    if not precisions:
        return "not recorded"  # records made before the precisions were stored
    names = set(precisions.values())
    return names.pop() if len(names) == 1 else ", ".join(f"{k} {v}" for k, v in sorted(precisions.items()))


def _targets(targets: list[int], scores: list[float]) -> str:
    """``0 (2.10), 6 (2.02)``, or ``none (max 1.50 for 6)``."""

    def shown(t: int) -> str:  # a class with no transitions has no score (stored as "nan")
        return f"{scores[t]:.2f}" if isinstance(scores[t], int | float) else "n/a"

    if targets:
        return ", ".join(f"{t} ({shown(t)})" for t in targets)
    scored = [c for c, v in enumerate(scores) if isinstance(v, int | float)]
    if not scored:
        return "none"
    top = max(scored, key=scores.__getitem__)
    return f"none (max {shown(top)} for {top})"


def table_markdown(rows: list[dict[str, Any]]) -> str:
    header = [
        "attack", "seed", "before: BA / ASR / RA", "after DataElixir: BA / ASR / RA", "TPR / FPR",
        "detected target (score)", "kept / relabelled / suspicious",
        "clean: own label (orig / rounds)", "poisoned: true label (orig / rounds)",
        "poisoned: poisoned label (orig / rounds)", "wall time", "precision",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            r["attack"],
            str(r["seed"]),
            f"{r['BA']:.1f} / {r['ASR']:.1f} / {r['RA']:.1f}",
            f"{r['BA_after']:.1f} / {r['ASR_after']:.1f} / {r['RA_after']:.1f}",
            f"{r['TPR']:.3f} / {r['FPR']:.3f}",
            r["targets"],
            r["decisions"],
            r["clean_own_label"],
            r["poisoned_true_label"],
            r["poisoned_poisoned_label"],
            f"{r['minutes']:.0f} min",
            r["precision"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table(work: Path, status: str = "complete") -> str:
    rows = table_rows(work)
    table = table_markdown(rows)
    atomic_write_text(work / "dataelixir_table.md", table + "\n")
    atomic_write_json(work / "dataelixir_table.json", {"status": status, "machine": machine(), "rows": rows})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(work / "dataelixir_table.csv", buf.getvalue())
    if rows:
        _plot(rows, work / "dataelixir_table.png")
    return table


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    labels = [f"{r['attack']}\ns{r['seed']}" for r in rows]
    x = range(len(rows))
    fig, ax = pyplot().subplots(figsize=(max(6.0, 0.7 * len(rows) + 2), 3.6))
    ax.bar([i - 0.2 for i in x], [r["ASR"] for r in rows], 0.4, label="ASR before")
    ax.bar([i + 0.2 for i in x], [r["ASR_after"] for r in rows], 0.4, label="ASR after DataElixir")
    ax.plot(list(x), [r["BA_after"] for r in rows], "k_", ms=14, mew=2, ls="", label="BA after")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("%")
    ax.set_ylim(0, 102)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


@cli_main  # Ctrl-C or SIGTERM: the running attacks are stopped, then one line, exit 130
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_keys_to_argparser(ap, KEYS)
    args = ap.parse_args(argv)
    try:
        work = Path(args.work_dir).resolve()
        if not args.table_only:
            steps = build_commands(
                parse_attacks(args.attacks), args.seeds, args.overlay, work, precision=args.precision
            )
            work.mkdir(parents=True, exist_ok=True)
            with open(work / "dataelixir_table.log", "a") as log, interrupt_on_sigterm():
                run_commands(
                    steps,
                    work,
                    args.jobs,
                    log,
                    on_step_done=lambda done, total: write_table(work, f"partial: {done} of {total} runs done"),
                )
        print(write_table(work))
    except CommandFailed as e:
        write_table(work, "a run failed")
        sys.exit(f"dataelixir_table: run failed ({e})\nfix the cause and re-run; finished runs are kept")
    except UserError as e:
        sys.exit(f"dataelixir_table: {e}")
    print(f"wrote {work / 'dataelixir_table.md'} (.csv, .json, .png)")


if __name__ == "__main__":
    main()
