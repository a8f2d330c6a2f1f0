"""DataElixir's dataset-sanitisation baselines on a finished attack record: Spectral Signatures
(``--method ss``) or Activation Clustering (``--method ac``), then a fresh model on the rest.

    python attack/badnet.py --yaml_path config/badnet/cifar10.yaml --overlay config/dataelixir_cpu.yaml \\
        --save_folder_name badnet --stop_after backdoor_training
    python bench/sanitise_baselines.py --record record/badnet --method ss
    python bench/sanitise_baselines.py --record record/badnet --method ac

Reads the record's configuration, poisoned training set (``attack_data.pt``) and backdoored
model; flags samples on the model's penultimate features class by class
(``utils/baselines/sanitise.py``: the methods and their published settings); removes them and
trains a fresh model on the rest with the record's own training settings (architecture,
epochs, lr, schedule, augmentation; ``--epochs`` replaces the number), as the attack flow
trains its models. Writes ``sanitise.json`` (settings, BA / ASR / RA before and after, the
removal's TPR / FPR, removed per class, the flagged indices, the history), ``sanitise.csv``
(one row) and ``model.pt`` to ``--out`` (default ``bench/results/sanitise/<record>-<method>``).
A killed retraining resumes from its last epoch; a finished one is reported, not redone,
unless ``--overwrite``; a folder written with other settings is refused.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
from pathlib import Path

from common import RESULTS, machine

from utils.baselines.sanitise import AC_ANALYSES, METHODS, sanitise_record
from utils.compat import legacy_flow_config
from utils.dataelixir.keys import FlowConfig
from utils.dataelixir.outputs import finite
from utils.fileio import UserError, atomic_torch_save, atomic_write_json, atomic_write_text, cli_main, file_fingerprint
from utils.options import DEVICE, FRACTION, GT0, POSITIVE, ArgParser, Key, add_keys_to_argparser, load_yaml_file
from utils.run_state import RunFolder
from utils.runtime import resolve_device

KEYS = {
    "record": Key(None, "record folder of an attack run with its backdoored model (record/<save_folder_name>)", str),
    "method": Key(
        "ss", "ss: Spectral Signatures (Tran et al.); ac: Activation Clustering (Chen et al.)", choices=METHODS
    ),
    "ss_eps": Key(0.1, "ss: upper bound ε on the poisoned share of a class (BackdoorBench's pratio)", range=FRACTION),
    "ss_multiplier": Key(1.5, "ss: the top multiplier·ε·n scores of a class are removed (Tran et al.: 1.5)", range=GT0),
    "ac_dims": Key(10, "ac: PCA dimensions before 2-means (Chen et al., BackdoorBench: 10)", range=POSITIVE),
    "ac_analysis": Key(
        "relative_size",
        "ac: relative_size = a cluster with less than --ac_size_threshold of its class (Chen et al., ART); "
        "smaller = the smaller cluster of every class (BackdoorBench's config)",
        choices=AC_ANALYSES,
    ),
    "ac_size_threshold": Key(0.35, "ac: relative size below which a cluster is poisoned", range=FRACTION),
    "seed": Key(0, "ac: seed of the k-means++ starts"),
    "epochs": Key(None, "retraining epochs (default: the record's)", int, nullable=True, range=POSITIVE),
    "device": DEVICE,
    "out": Key(None, "output folder (default: bench/results/sanitise/<record>-<method>)", nullable=True),
    "overwrite": Key(False, "redo a finished run, or one with other settings, in --out", flag=True),
}
METHOD_KEYS = {"ss": ("ss_eps", "ss_multiplier"), "ac": ("ac_dims", "ac_analysis", "ac_size_threshold", "seed")}
CSV_COLUMNS = [
    "record", "method", "n_train", "removed", "poisoned", "removed_poisoned", "tpr", "fpr",
    "BA_before", "ASR_before", "RA_before", "BA_after", "ASR_after", "RA_after",
]  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgParser(description=__doc__.splitlines()[0])
    add_keys_to_argparser(p, KEYS)
    a = p.parse_args(argv)
    if a.record is None:
        raise UserError("--record is required: the record folder of an attack run (record/<save_folder_name>)")
    return a


def record_config(record: Path, epochs: int | None) -> FlowConfig:
    """The record's resolved configuration (as the flow ran it), epochs replaced when given."""
    for name in ("config.yaml", "attack_data.pt", "backdoored_model.pt", "backdoored_history.json"):
        if not (record / name).is_file():
            raise UserError(f"{record / name} not found: run the attack with --stop_after backdoor_training first")
    stored = load_yaml_file(record / "config.yaml", "record configuration")
    cfg = FlowConfig.from_dict(legacy_flow_config(stored))
    return dataclasses.replace(cfg, epochs=epochs) if epochs else cfg


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    record = Path(args.record)
    cfg = record_config(record, args.epochs)
    out = Path(args.out) if args.out else RESULTS / "sanitise" / f"{record.resolve().name}-{args.method}"
    options = {k.removeprefix(f"{args.method}_"): getattr(args, k) for k in METHOD_KEYS[args.method]}
    settings = {
        "record": str(record.resolve()),
        "attack_data": file_fingerprint(record / "attack_data.pt"),
        "backdoored_model": file_fingerprint(record / "backdoored_model.pt"),
        "method": args.method,
        "options": options,
        "epochs": cfg.epochs,
    }
    with RunFolder(out, settings, overwrite=args.overwrite, hint="pass --overwrite or another --out") as folder:
        old = folder.read("sanitise.json")
        same = folder.check()
        if old and same and not args.overwrite:
            print(f"{out} is finished: BA {old['after']['BA']} ASR {old['after']['ASR']} (pass --overwrite to redo it)")
            return
        folder.open(fresh=bool(old))
        result = sanitise_record(
            record, cfg, args.method, options, resolve_device(args.device), checkpoint=out / "retrain.ckpt"
        )
        atomic_torch_save(result.pop("model").state_dict(), out / "model.pt")
        atomic_write_text(out / "sanitise.csv", _csv(settings, result))
        atomic_write_json(out / "sanitise.json", finite({"settings": settings, "machine": machine(), **result}))
        (out / "retrain.ckpt").unlink(missing_ok=True)
    r, b, a = result["removal"], result["before"], result["after"]
    print(f"{args.method}: TPR {r['tpr']} FPR {r['fpr']}; BA {b['BA']} -> {a['BA']}, ASR {b['ASR']} -> {a['ASR']}")
    print(f"wrote {out / 'sanitise.json'} and sanitise.csv")


def _csv(settings: dict, result: dict) -> str:
    r, b, a = result["removal"], result["before"], result["after"]
    row = [settings["record"], settings["method"], result["n_train"], r["removed"], r["poisoned"]]
    row += [r["removed_poisoned"], r["tpr"], r["fpr"], b["BA"], b["ASR"], b["RA"], a["BA"], a["ASR"], a["RA"]]
    buf = io.StringIO()
    csv.writer(buf).writerows([CSV_COLUMNS, row])
    return buf.getvalue()


if __name__ == "__main__":
    main()
