"""How often one DataElixir round keeps a clean image's class, per DDPM checkpoint.

DataElixir works when purified clean images keep their label under the backdoored model
(so only poisoned ones transition); with the CPU-scale DDPM they kept it only 50-60 % of
the time. This measures that rate on a fixed backdoored model for several diffusion
checkpoints (e.g. one training run's 3k/6k/12k-iteration EMA files, or other widths):

    python attack/badnet.py --yaml_path config/badnet/cifar10.yaml --overlay config/dataelixir_cpu.yaml \\
        --save_folder_name badnet-keep --stop_after backdoor_training
    python bench/ddpm_keep_label.py --record record/badnet-keep \\
        --ckpt config/ddpm/cpu.yml:diff_ckpt/cifar10/train50000ps50000/ema_0.999_003000.pt [--ckpt ...]

For ``--images`` clean (not poisoned) training images of the record, class-balanced, one
round of the record's purification (noise to ``steps_T``, ``purify_respace`` reverse steps,
the last ``last_steps_m`` kept; its bf16 and dense-tail settings; ``--respace`` measures another
step count and ``--dense_tail`` the other tail on the same model) per checkpoint; the
backdoored model labels every kept step. Writes ``keep_label.csv``/``.json`` and a PNG of the
rate against the checkpoints' training iterations (one line per config), beside the model's own accuracy on the
untouched images and on the clean test set.

The output folder grows as a training run saves checkpoints: a checkpoint already measured
there (same config, same file content) is kept, not re-measured; a folder measured with
another record, image choice or round settings is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import machine

from utils.compat import legacy_flow_config
from utils.data import class_balanced_subset
from utils.dataelixir.defence import build_chunk, check_step_settings
from utils.dataelixir.keys import FlowConfig
from utils.dataelixir.models import load_model, purification_rounds
from utils.dataelixir.outputs import load_attack_data
from utils.diffusion.checkpoints import parse_checkpoint_name
from utils.diffusion.factory import load_purifier
from utils.fileio import UserError, atomic_write_json, atomic_write_text, file_fingerprint, read_text_file
from utils.options import DEVICE, NONNEG, POSITIVE, SUBSET, Key, add_keys_to_argparser
from utils.plots import pyplot, save_figure
from utils.run_state import same_settings_or_refuse
from utils.runtime import resolve_device
from utils.trainer import predict

KEYS = {
    "images": Key(1000, "clean training images, class-balanced", range=SUBSET),
    "batch_size": Key(250, range=POSITIVE),
    "seed": Key(0, "seed of the image choice and of the diffusion noise"),
    "respace": Key(
        None,
        "reverse steps per round (1..steps_T; 0: all steps_T of them, the paper's); default: the record's "
        "purify_respace",
        int,
        nullable=True,
        range=NONNEG,
    ),
    "dense_tail": Key(
        None,
        "with respacing, the last last_steps_m reverse steps unspaced (the kept samples at the full chain's noise "
        "levels); default: the record's purify_dense_tail",
        bool,
        nullable=True,
    ),
    "device": DEVICE,
    "out": Key("bench/results/keep_label", "output folder"),
    "overwrite": Key(False, "discard rows measured with other settings in --out", flag=True),
}

# what makes two rows comparable: measured on the same images, model and round
SETTINGS = ("record", "classifier", "images", "seed", "steps_T", "respace", "last_steps_m", "dense_tail")


def keep_rates(preds: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Per candidate position, the share of images the model gives their dataset label."""
    return (preds == labels[:, None]).float().mean(0).tolist()


def _record_config(record: Path) -> FlowConfig:
    import yaml

    cfg = yaml.safe_load(read_text_file(record / "config.yaml", "record configuration"))
    if not isinstance(cfg, dict):
        raise UserError(f"{record / 'config.yaml'}: damaged record configuration")
    return FlowConfig.from_dict(legacy_flow_config(cfg))  # the precisions the flow ran with


def _labels_bf16(cfg: FlowConfig) -> bool:
    return cfg.precision_of("candidate_labels") == "bf16"


def _parse_ckpt(text: str) -> tuple[Path, Path]:
    config, sep, ckpt = text.partition(":")
    if not sep:
        raise UserError(
            f"--ckpt {text!r}: expected CONFIG:CHECKPOINT (e.g. config/ddpm/cpu.yml:diff_ckpt/.../ema_0.999_003000.pt)"
        )
    for p in (config, ckpt):
        if not Path(p).is_file():
            raise UserError(f"--ckpt {text!r}: {p} not found")
    return Path(config), Path(ckpt)


def _previous(out: Path) -> tuple[dict | None, list[dict]]:
    """The settings and rows of an earlier measurement in ``out`` (None, [] when absent)."""
    path = out / "keep_label.json"
    if not path.is_file():
        return None, []
    try:
        old = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        old = None
    if not isinstance(old, dict) or not isinstance(old.get("rows"), list):
        return {"keep_label.json": "<unreadable>"}, []
    return {k: old.get(k) for k in SETTINGS}, old["rows"]


def measure(args: argparse.Namespace) -> dict:
    record = Path(args.record)
    for name in ("config.yaml", "attack_data.pt", "backdoored_model.pt", "backdoored_history.json"):
        if not (record / name).is_file():
            raise UserError(f"{record / name} not found: run the attack with --stop_after backdoor_training first")
    ckpts = [_parse_ckpt(c) for c in args.ckpt]
    cfg = _record_config(record)
    if args.respace is not None:
        cfg = dataclasses.replace(cfg, purify_respace=args.respace or None)  # 0: all steps_T reverse steps
    if args.dense_tail is not None:
        cfg = dataclasses.replace(cfg, purify_dense_tail=args.dense_tail)
    check_step_settings(cfg.steps_T, 1, cfg.last_steps_m, cfg.purify_respace, cfg.purify_dense_tail)
    device = resolve_device(args.device)
    bd, _ = load_attack_data(record / "attack_data.pt")
    classifier = load_model(cfg, record / "backdoored_model.pt", device)
    history = json.loads((record / "backdoored_history.json").read_text())
    clean_rows = torch.nonzero(~bd.poison_indicator.bool()).flatten()
    pick = class_balanced_subset(bd.train.labels[clean_rows], args.images, seed=args.seed)
    rows = clean_rows[pick]
    images, labels = bd.train.images[rows], bd.train.labels[rows]
    out = {
        "record": str(record.resolve()),
        "classifier": file_fingerprint(record / "backdoored_model.pt"),
        "images": len(rows),
        "clean_test_acc": history[-1].get("BA"),
        "acc_on_untouched": keep_rates(
            predict(classifier, images, device, bf16=_labels_bf16(cfg)).argmax(1)[:, None], labels
        )[0],
        "steps_T": cfg.steps_T,
        "respace": cfg.purify_respace,
        "last_steps_m": cfg.last_steps_m,
        # only where set, so folders measured before this option compare equal without it
        **({"dense_tail": True} if cfg.purify_dense_tail and cfg.purify_respace else {}),
        "seed": args.seed,
        "machine": machine(),
        "rows": [],
    }
    old_settings, old_rows = _previous(Path(args.out))
    new_settings = {k: out.get(k) for k in SETTINGS}
    if same_settings_or_refuse(
        Path(args.out) / "keep_label.json", old_settings, new_settings, overwrite=args.overwrite
    ):
        out["rows"] = old_rows
    for config, ckpt in ckpts:
        fingerprint = file_fingerprint(ckpt)
        if any(r.get("config") == str(config) and r.get("fingerprint") == fingerprint for r in out["rows"]):
            print(f"{ckpt}: measured before, kept", flush=True)
            continue
        model, base, spec = load_purifier(config, ckpt, device)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        t0 = time.time()
        preds = []
        for s in range(0, len(images), args.batch_size):
            cand = build_chunk(
                model,
                base,
                images[s : s + args.batch_size].to(device),
                **{**purification_rounds(cfg), "rounds_n": 1},
                generator=gen,
            )[:, 1:]  # position 0 is the original image
            flat = cand.reshape(-1, *cand.shape[2:])
            preds.append(predict(classifier, flat, device, bf16=_labels_bf16(cfg)).argmax(1).view(len(cand), -1))
        rates = keep_rates(torch.cat(preds), labels)
        parsed = parse_checkpoint_name(ckpt.name)
        row = {
            "config": str(config),
            "channels": spec.model.get("ch", spec.model.get("num_channels")),
            "checkpoint": str(ckpt),
            "fingerprint": fingerprint,
            "iterations": parsed.step if parsed else None,
            "keep_last_step": rates[-1],
            "keep_mean_kept_steps": float(np.mean(rates)),
            "keep_per_step": rates,
            "seconds": round(time.time() - t0, 1),
        }
        out["rows"].append(row)
        print(
            f"{ckpt}: keep {100 * rates[-1]:.1f} % (last step), {100 * np.mean(rates):.1f} % (mean of kept steps)",
            flush=True,
        )
    out["rows"].sort(key=lambda r: (r["config"], r["iterations"] or 0))
    return out


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "keep_label.json", result)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["config", "channels", "iterations", "checkpoint", "keep_last_step", "keep_mean_kept_steps", "seconds"])
    for r in result["rows"]:
        w.writerow(
            [
                r["config"],
                r["channels"],
                r["iterations"],
                r["checkpoint"],
                f"{r['keep_last_step']:.4f}",
                f"{r['keep_mean_kept_steps']:.4f}",
                r["seconds"],
            ]
        )
    atomic_write_text(out / "keep_label.csv", buf.getvalue())

    fig, ax = pyplot().subplots(figsize=(5.5, 3.6))
    for config in dict.fromkeys(r["config"] for r in result["rows"]):
        pts = sorted((r["iterations"] or 0, 100 * r["keep_last_step"]) for r in result["rows"] if r["config"] == config)
        ax.plot(*zip(*pts, strict=True), "o-", label=f"{Path(config).stem} (last step)")
    if result["clean_test_acc"] is not None:
        ax.axhline(result["clean_test_acc"], color="k", ls="--", lw=1, label="classifier: clean test accuracy")
    ax.axhline(100 * result["acc_on_untouched"], color="gray", ls=":", lw=1, label="classifier: untouched images")
    ax.set_xlabel("DDPM training iterations")
    ax.set_ylabel("clean images keeping their label (%)")
    ax.set_ylim(0, 102)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "keep_label.png", dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record", required=True, help="record folder of an attack run with its backdoored model")
    ap.add_argument("--ckpt", action="append", required=True, help="CONFIG:CHECKPOINT of a DDPM (repeatable)")
    add_keys_to_argparser(ap, KEYS)
    args = ap.parse_args(argv)
    try:
        result = measure(args)
    except UserError as e:
        sys.exit(f"ddpm_keep_label: {e}")
    write_outputs(result, Path(args.out))
    print(f"wrote {Path(args.out) / 'keep_label.csv'} and keep_label.png")


if __name__ == "__main__":
    main()
