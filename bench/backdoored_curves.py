"""The backdoored classifier of attack records side by side: BA against training time.

For choosing DataElixir's CPU-scale classifier (docs/RESULTS.md, "DataElixir's classifier"):
each record is an attack script's folder after its ``backdoor_training`` phase (run with
``--stop_after backdoor_training`` to stop there). Per record it reads the configuration
(``config.yaml``) and the per-epoch history (``backdoored_history.json``: BA, ASR, RA and
seconds of each epoch), and reports the final and best BA, ASR and RA, the training time,
and the first epoch (and minute) at which BA reached ``--target``:

    python bench/backdoored_curves.py --records runs/de_clf/record/r9w16-20k-cf30,runs/de_clf/record/pa16-20k-cf30 \\
        --out runs/de_clf/curves

Writes ``backdoored_curves.json``, ``.csv`` and ``.png`` (BA against training minutes, one
line per record) in ``--out``; results there are replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import csv_text, machine

from utils.fileio import UserError, atomic_write_json, atomic_write_text, cli_main, read_state_json, refuse_overwrite
from utils.options import Key, Range, add_keys_to_argparser, load_yaml_file
from utils.plots import pyplot, save_figure

KEYS = {
    "records": Key("", "comma-separated record folders (attack scripts' record/<name>/)"),
    "target": Key(80.0, "the BA (%) whose first epoch is reported", range=Range(0, 100)),
    "out": Key("bench/results/backdoored_curves", "output folder"),
    "overwrite": Key(False, "replace the results in --out", flag=True),
}
SETTINGS = ("model", "model_width", "subset", "train_augment", "epochs", "lr", "batch_size", "amp")
COLUMNS = ("record", *SETTINGS, "BA", "ASR", "RA", "best_BA", "minutes", "target_epoch", "target_minutes")


def summarise(folder: Path, target: float) -> dict:
    """One record's row (settings, last epoch's metrics, time) and its BA curve."""
    cfg_path, hist_path = folder / "config.yaml", folder / "backdoored_history.json"
    for path in (hist_path, cfg_path):
        if not path.is_file():
            raise UserError(f"{path} is missing: run the attack script until its backdoor_training phase is done")
    cfg = load_yaml_file(cfg_path, "record configuration")
    history = read_state_json(hist_path, "re-run the attack script's backdoor_training phase")
    if not isinstance(history, list) or not history or not all(isinstance(h, dict) for h in history):
        raise UserError(f"{hist_path}: expected a non-empty list of per-epoch objects")
    try:
        minutes = [sum(float(h["seconds"]) for h in history[: i + 1]) / 60 for i in range(len(history))]
        ba = [float(h["BA"]) for h in history]
        last = {k: float(history[-1][k]) for k in ("BA", "ASR", "RA")}
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{hist_path}: every epoch needs numeric seconds, BA, ASR and RA ({e})") from None
    hit = next((i for i, b in enumerate(ba) if b >= target), None)
    row = {"record": folder.name, **{k: cfg.get(k) for k in SETTINGS}, **last}
    row |= {"best_BA": max(ba), "minutes": minutes[-1]}
    row |= {"target_epoch": None if hit is None else hit + 1, "target_minutes": None if hit is None else minutes[hit]}
    return {"row": row, "curve": {"minutes": minutes, "BA": ba}}


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "backdoored_curves.json", result)
    atomic_write_text(out / "backdoored_curves.csv", csv_text(COLUMNS, [r["row"] for r in result["records"]], 2))
    fig, ax = pyplot().subplots(figsize=(5.8, 3.6))
    for r in result["records"]:
        row = r["row"]
        label = f"{row['model']} w{row['model_width']}, {row['subset']} img, {row['train_augment']}"
        ax.plot(r["curve"]["minutes"], r["curve"]["BA"], marker=".", label=label)
    ax.axhline(result["target"], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("training minutes (one thread)")
    ax.set_ylabel("BA (%)")
    ax.set_title("backdoored classifier: clean accuracy against training time", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "backdoored_curves.png", dpi=120)


@cli_main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_keys_to_argparser(ap, KEYS)
    args = ap.parse_args(argv)
    folders = [Path(x.strip()) for x in args.records.split(",") if x.strip()]
    if not folders:
        raise UserError("--records: expected one or more record folders, comma-separated")
    out = Path(args.out)
    refuse_overwrite(out / "backdoored_curves.json", args.overwrite)
    records = [summarise(f, args.target) for f in folders]
    write_outputs({"target": args.target, "machine_now": machine(), "records": records}, out)
    for r in records:
        row = r["row"]
        reached = f"epoch {row['target_epoch']}" if row["target_epoch"] else "never"
        print(
            f"{row['record']}: BA {row['BA']:.1f} (best {row['best_BA']:.1f}), ASR {row['ASR']:.1f}, "
            f"{row['minutes']:.1f} min; BA >= {args.target:g} at {reached}"
        )
    print(f"wrote {out / 'backdoored_curves.csv'} and backdoored_curves.png")


if __name__ == "__main__":
    main()
