"""How much of each poison's perturbation survives ECLIPSE's purification (stage 1).

A defence can fail in two ways: it leaves the poison in the image, or it removes so much of
the image that the victim learns little. For every poison of a demo work dir that has both
its poisoned and its purified set, this compares them with the clean images the poison
was crafted from (the subset indices in the poison's JSON):

    delta = poisoned - clean          (the perturbation)
    r     = purified - clean          (what the image is after purification, against clean)

and reports, averaged over images (pixels in [0, 1]):

- ``surviving_share``: <r, delta> / <delta, delta>, the share of the perturbation left
  along its own direction (1: it passes untouched; 0: nothing of it is left);
- ``cosine``: the cosine of r and delta;
- ``delta_l2``, ``change_l2``: the L2 norms of delta and of r;
- ``other_change_l2``: the L2 norm of r minus its part along delta: how much purification
  changed the image apart from the perturbation (what the denoiser adds or loses).

    python bench/perturbation_survival.py --work_dir runs/demo [--poisons EM,TAP]

By default the purified sets are the demo's (its t*, diffusion iterations and sparse
set); ``--purified_dir`` reads ``<P>-pure.pkl`` from another folder instead, e.g. the
cross-threat table's DataElixir rounds over the same poisoned sets:

    python bench/perturbation_survival.py --work_dir runs/demo \\
        --purified_dir runs/cross_threat/purified_data/cifar10/dataelixir/150/6000 --out runs/survival-dataelixir

With ``--ckpts``, the script purifies ``--images`` class-balanced images of each
poisoned set itself, once per checkpoint of the work dir's diffusion model and per number
of reverse steps in ``--respace`` ("all" = t*), to see whether the CPU-scale shortcuts
(few training iterations, respaced sampling) decide what survives:

    python bench/perturbation_survival.py --work_dir runs/demo --poisons EM,TAP,REM \\
        --ckpts ema_0.999_001000.pt,ema_0.999_003000.pt --respace 20,all --images 500

Writes ``survival.json``, ``survival.csv`` and ``survival.png`` (the surviving share per
poison and setting) in ``--out``, and with two or more checkpoints ``survival_curve.png``
(the share against training iterations). With ``--ckpts`` each (poison, checkpoint, steps)
cell is saved in ``--out``/cells/ as it finishes, so an interrupted run resumes and a run
with more checkpoints or poisons computes only the new cells; cells written with other
settings (t*, images, seed, precision, config, or another checkpoint or poisoned file under
the same name) are refused. Other results there are replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
import torch
from common import csv_text, machine

from utils.data import ImageSet, class_balanced_subset, load_cifar10, read_eclipse_pkl
from utils.demo.pipeline import SPARSE_SET
from utils.demo.recipe import demo_recipe
from utils.diffusion.checkpoints import parse_checkpoint_name
from utils.diffusion.factory import load_purifier, purifier_checkpoint, resolve_config
from utils.diffusion.purify import purify_dataset
from utils.fileio import (
    UserError,
    atomic_write_json,
    atomic_write_text,
    cli_main,
    file_fingerprint,
    read_state_json,
    refuse_overwrite,
)
from utils.options import BF16, POSITIVE, PRECISION, SUBSET, Key, add_keys_to_argparser
from utils.paths import diff_ckpt_dir, poisoned_file, purified_file
from utils.plots import pyplot, save_figure
from utils.poisons import POISONS
from utils.poisons.common import measure_norms
from utils.precision import precision_from_args

KEYS = {
    "work_dir": Key("runs/demo", "the demo's work dir (poisoned_data/ and purified_data/)"),
    "poisons": Key("all", "comma-separated poisons, or 'all' (those with both sets present)"),
    "t": Key(demo_recipe()["t"], "t* of the purified sets", range=POSITIVE),
    "diffusion_iterations": Key(demo_recipe()["diffusion_iterations"], "iterations of the diffusion model used"),
    "ckpts": Key(
        "", "purify here with these checkpoints of <work_dir>/diff_ckpt/cifar10/<sparse set>/ (comma-separated)"
    ),
    "respace": Key("20", "with --ckpts: reverse-step counts, comma-separated ('all' = t*; more than t* is t*)"),
    "images": Key(500, "with --ckpts: class-balanced images purified per poisoned set", range=SUBSET),
    "config": Key("cpu.yml", "with --ckpts: the diffusion model's config (the demo's; as purification.py's --config)"),
    "seed": Key(1234, "with --ckpts: seed of the purification noise (purification.py's default)"),
    "precision": PRECISION,
    "bf16": BF16,
    "purified_dir": Key(
        None,
        "read each poison's purified set <P>-pure.pkl from this folder instead of the demo's (e.g. the cross-threat "
        "table's DataElixir rounds: <its work_dir>/purified_data/cifar10/dataelixir/150/6000); not with --ckpts",
        nullable=True,
    ),
    "out": Key("bench/results/perturbation_survival", "output folder"),
    "overwrite": Key(False, "replace the results in --out", flag=True),
}


def survival(clean: torch.Tensor, poisoned: torch.Tensor, purified: torch.Tensor) -> dict[str, float]:
    """The measures above for uint8 image batches of one shape; images the poison left
    untouched (delta = 0) count in the norms but not in the share and the cosine."""
    c = clean.flatten(1).double() / 255
    d = poisoned.flatten(1).double() / 255 - c
    r = purified.flatten(1).double() / 255 - c
    dd = (d * d).sum(1)
    touched = dd > 0
    beta = (r * d).sum(1)[touched] / dd[touched]
    cos = torch.nn.functional.cosine_similarity(r[touched], d[touched], dim=1)
    along = torch.zeros_like(dd)
    along[touched] = beta
    return {
        "images": len(c),
        "perturbed_images": int(touched.sum()),
        "surviving_share": float(beta.mean()) if touched.any() else float("nan"),
        "cosine": float(cos.mean()) if touched.any() else float("nan"),
        "delta_l2": float(d.norm(dim=1).mean()),
        "change_l2": float(r.norm(dim=1).mean()),
        "other_change_l2": float((r - along[:, None] * d).norm(dim=1).mean()),
    }


def _poison_info(poison_json: Path) -> dict:
    if not poison_json.is_file():
        raise UserError(f"{poison_json} is missing: it names the clean images the poison was crafted from")
    info = read_state_json(poison_json, "re-craft the poison with poison.py")
    if not isinstance(info, dict):
        raise UserError(f"{poison_json}: expected poison.py's JSON object")
    return info


def _subset_indices(info: dict, poison_json: Path, n: int) -> np.ndarray | None:
    """The training-set indices the poison was crafted on; None for the whole set."""
    subset = info.get("subset")
    if subset is None:
        return None
    idx = subset.get("indices") if isinstance(subset, dict) else None
    if not isinstance(idx, list) or len(idx) != n:
        raise UserError(f"{poison_json}: subset.indices must list the {n} training indices of the poisoned set")
    return np.asarray(idx, dtype=np.int64)


def _parse_list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise UserError(f"{what}: expected a comma-separated list, got {text!r}")
    return items


def _settings(args: argparse.Namespace, work: Path) -> list[tuple[str, int | None, Path | None, int | None]]:
    """(label, reverse steps, checkpoint, its training iterations) per purification setting;
    checkpoint None = the demo's purified set."""
    if args.purified_dir:
        return [(f"purified sets in {args.purified_dir}", None, None, None)]
    if not args.ckpts:
        return [(f"purified set ({args.diffusion_iterations} iterations)", None, None, args.diffusion_iterations)]
    settings = []
    for name in _parse_list(args.ckpts, "--ckpts"):
        ckpt = purifier_checkpoint(diff_ckpt_dir(work, SPARSE_SET) / name)
        parsed = parse_checkpoint_name(name)
        its = f"{parsed.step} iterations" if parsed else Path(name).stem
        for r in _parse_list(args.respace, "--respace"):
            if r != "all" and not (r.isdigit() and int(r) >= 1):
                raise UserError(f"--respace: {r!r} is not a positive step count or 'all'")
            steps = args.t if r == "all" else min(int(r), args.t)  # as purification.py: at most t*
            settings.append((f"{its}, {steps} steps", steps, ckpt, parsed.step if parsed else None))
    return settings


def _cell_settings(args: argparse.Namespace, ckpt: Path, poisoned: Path) -> dict:
    """What a cell's numbers depend on besides its poison and step count."""
    return {
        "t": args.t,
        "images": args.images,
        "seed": args.seed,
        "precision": precision_from_args(args, torch.device("cpu"), "purification").name,
        "config": args.config,
        "checkpoint": ckpt.name,
        "checkpoint_sha1": file_fingerprint(ckpt),
        "poisoned_sha1": file_fingerprint(poisoned),
    }


def _cached_cell(path: Path, settings: dict, overwrite: bool) -> dict | None:
    """The row a finished cell holds, None when there is none (or --overwrite); refuses a cell
    written with other settings, whose numbers must not be mixed into this run's table."""
    if overwrite or not path.is_file():
        return None
    cell = read_state_json(path, "delete it or pass --overwrite")
    old = cell.get("settings") if isinstance(cell, dict) else None
    if not isinstance(old, dict) or not isinstance(cell.get("row"), dict):
        raise UserError(f"{path}: not a cell of this script (delete it or pass --overwrite)")
    diff = sorted(k for k in settings.keys() | old.keys() if old.get(k) != settings.get(k))
    if diff:
        k = diff[0]
        raise UserError(
            f"{path} was measured with {k}={old.get(k)!r}, this run has {settings.get(k)!r}: "
            "use another --out, or --overwrite to measure it again"
        )
    return cell["row"]


@cache
def _diffusion(config: str, ckpt: Path) -> tuple:
    """The model and its un-respaced process, loaded once per checkpoint for every poison."""
    model, diffusion, _ = load_purifier(resolve_config(config), ckpt, torch.device("cpu"))
    return model, diffusion


def _purify(args: argparse.Namespace, ckpt: Path, steps: int, images: torch.Tensor) -> torch.Tensor:
    """``images`` through ECLIPSE's stage 1 exactly as purification.py runs it (same batches,
    noise seeds and quantisation: all of a poisoned set gives purification.py's bytes)."""
    model, base = _diffusion(args.config, ckpt)
    with tempfile.TemporaryDirectory() as tmp:
        return purify_dataset(
            model,
            base,
            images,
            args.t,
            Path(tmp) / "parts",
            respace=steps,
            seed=args.seed,
            precision=precision_from_args(args, torch.device("cpu"), "purification").name,
            log=lambda _: None,
        )


def measure(args: argparse.Namespace) -> dict:
    work = Path(args.work_dir)
    names = list(POISONS) if args.poisons == "all" else _parse_list(args.poisons, "--poisons")
    bad = [p for p in names if p not in POISONS]
    if bad:
        raise UserError(f"unknown poison(s) {', '.join(bad)}; choose from {', '.join(POISONS)} or 'all'")
    if args.purified_dir and args.ckpts:
        raise UserError("--purified_dir reads purified sets, --ckpts makes them: choose one")
    settings = _settings(args, work)

    def pure(p: str) -> Path:
        if args.purified_dir:
            return Path(args.purified_dir) / f"{p}-pure.pkl"
        return purified_file(work, SPARSE_SET, args.t, args.diffusion_iterations, p)

    def needed(p: str) -> list[Path]:
        return [poisoned_file(work, p)] + ([] if args.ckpts else [pure(p)])

    ready = [p for p in names if all(f.is_file() for f in needed(p))]
    if args.poisons != "all":
        missing = [str(f) for p in names for f in needed(p) if not f.is_file()]
        if missing:
            raise UserError(f"not found: {', '.join(missing)} (run demo.py for these poisons first)")
    if not ready:
        raise UserError(
            f"{work}: no poison has both its poisoned and its purified set "
            f"(t*={args.t}, {args.diffusion_iterations} iterations)"
        )
    train = load_cifar10("train")
    rows = []
    for p in ready:
        poisoned = read_eclipse_pkl(poisoned_file(work, p))
        meta = poisoned_file(work, p).with_suffix(".json")
        info = _poison_info(meta)
        idx = _subset_indices(info, meta, len(poisoned))
        clean = train if idx is None else train.subset(torch.from_numpy(idx))
        if len(clean) != len(poisoned) or not torch.equal(poisoned.labels, clean.labels):
            raise UserError(f"{p}: the poisoned set's labels differ from the clean subset's (another subset?)")
        # labels alone cannot tell neighbouring images of one class apart: the perturbation
        # measured against these clean images must be the one poison.py recorded
        recorded = info.get("norms", {}).get("l2_mean") if isinstance(info.get("norms"), dict) else None
        measured = measure_norms(clean.images, poisoned.images)["l2_mean"]
        if isinstance(recorded, int | float) and abs(measured - recorded) > 1e-4 * max(1.0, recorded):
            raise UserError(
                f"{meta}: against the clean images it names, the perturbation's mean L2 is {measured:.4f}, "
                f"not the {recorded:.4f} recorded when crafting (other clean images or another CIFAR-10 copy?)"
            )
        if args.ckpts and args.images < len(poisoned):
            keep = class_balanced_subset(poisoned.labels, args.images, seed=0)
            poisoned, clean = poisoned.subset(keep), clean.subset(keep)
        for label, steps, ckpt, iterations in settings:
            head = {"poison": p, "setting": label, "iterations": iterations, "steps": steps}
            cached, note = None, ""
            if ckpt is None:
                purified = read_eclipse_pkl(pure(p))
                if not torch.equal(purified.labels, clean.labels):
                    raise UserError(f"{pure(p)}: its labels differ from the poisoned set's (another subset?)")
            else:
                cell_path = Path(args.out) / "cells" / f"{p}__{ckpt.stem}__{steps}.json"
                cell_settings = _cell_settings(args, ckpt, poisoned_file(work, p))
                cached = _cached_cell(cell_path, cell_settings, args.overwrite)
                if cached is None:
                    purified = ImageSet(_purify(args, ckpt, steps, poisoned.images), poisoned.labels)
                else:
                    note = " (measured before, from cells/)"
            row = cached or {**head, **survival(clean.images, poisoned.images, purified.images)}
            if ckpt is not None and cached is None:
                atomic_write_json(cell_path, {"settings": cell_settings, "row": row, "machine": machine()})
            rows.append(row)
            print(
                f"{p} [{label}]: surviving share {row['surviving_share']:.3f}, cosine {row['cosine']:.3f}{note}",
                flush=True,
            )
    return {
        "work_dir": str(work.resolve()),
        "t": args.t,
        "diffusion_iterations": args.diffusion_iterations,
        "images_per_poison": args.images if args.ckpts else "all",
        "precision": precision_from_args(args, torch.device("cpu"), "purification").name if args.ckpts else None,
        "seed": args.seed if args.ckpts else None,
        "machine": machine(),
        "command": "python bench/perturbation_survival.py " + " ".join(sys.argv[1:]),
        "rows": rows,
    }


COLUMNS = (
    "poison",
    "setting",
    "surviving_share",
    "cosine",
    "delta_l2",
    "change_l2",
    "other_change_l2",
    "perturbed_images",
    "images",
    "iterations",
    "steps",
)


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "survival.json", result)
    atomic_write_text(out / "survival.csv", csv_text(COLUMNS, result["rows"], 4))
    rows = result["rows"]
    poisons = list(dict.fromkeys(r["poison"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    width = 0.8 / len(settings)
    fig, ax = pyplot().subplots(figsize=(max(5.5, 0.9 * len(poisons) * len(settings)), 3.4))
    for j, setting in enumerate(settings):
        share = {r["poison"]: r["surviving_share"] for r in rows if r["setting"] == setting}
        xs = [i + (j - (len(settings) - 1) / 2) * width for i, p in enumerate(poisons) if p in share]
        ax.bar(xs, [share[p] for p in poisons if p in share], width, label=setting)
    ax.set_xticks(range(len(poisons)), poisons)
    ax.set_ylabel("perturbation surviving purification")
    ax.set_ylim(0, 1)
    ax.set_title(f"ECLIPSE stage 1 at t*={result['t']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "survival.png", dpi=120)
    if len({r.get("iterations") for r in rows if r.get("iterations") is not None}) >= 2:
        _plot_curve(rows, result["t"], out / "survival_curve.png")


def _plot_curve(rows: list[dict], t: int, path: Path) -> None:
    """The surviving share against the diffusion model's training iterations, a line per poison (and step count)."""
    fig, ax = pyplot().subplots(figsize=(5.5, 3.6))
    lines = dict.fromkeys((r["poison"], r["steps"]) for r in rows if r.get("iterations") is not None)
    several_steps = len({s for _, s in lines}) > 1
    for poison, steps in lines:
        pts = sorted(
            (r["iterations"], r["surviving_share"]) for r in rows if (r["poison"], r["steps"]) == (poison, steps)
        )
        label = f"{poison}, {steps} steps" if several_steps else poison
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    iterations = sorted({r["iterations"] for r in rows if r.get("iterations") is not None})
    ax.set_xticks(iterations, [f"{i:,}" for i in iterations])
    ax.minorticks_off()
    ax.set_xlabel("diffusion training iterations")
    ax.set_ylabel("perturbation surviving purification")
    ax.set_ylim(0, 1)
    ax.set_title(f"ECLIPSE stage 1 at t*={t}: the denoiser curve", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


@cli_main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_keys_to_argparser(ap, KEYS)
    args = ap.parse_args(argv)
    out = Path(args.out)
    if not args.ckpts:  # with --ckpts the cells guard the settings and the table is rebuilt from them
        refuse_overwrite(out / "survival.json", args.overwrite)
    write_outputs(measure(args), out)
    print(f"wrote {out / 'survival.csv'} and survival.png")


if __name__ == "__main__":
    main()
