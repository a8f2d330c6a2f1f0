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

The purified set is the demo's (its t*, diffusion iterations and sparse set). Writes
``survival.json``, ``survival.csv`` and ``survival.png`` (the surviving share per poison)
in ``--out``; results there are replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import numpy as np
import torch
from common import machine

from utils.cpu_recipe import demo_recipe
from utils.data import load_cifar10, read_eclipse_pkl
from utils.demo_pipeline import SPARSE_SET
from utils.fileio import UserError, atomic_write_json, atomic_write_text, cli_main, read_state_json, refuse_overwrite
from utils.keys import POSITIVE, Key, add_keys_to_argparser
from utils.paths import poisoned_file, purified_file
from utils.plots import pyplot, save_figure
from utils.poisons import POISONS

KEYS = {
    "work_dir": Key("runs/demo", "the demo's work dir (poisoned_data/ and purified_data/)"),
    "poisons": Key("all", "comma-separated poisons, or 'all' (those with both sets present)"),
    "t": Key(demo_recipe()["t"], "t* of the purified sets", range=POSITIVE),
    "diffusion_iterations": Key(demo_recipe()["diffusion_iterations"], "iterations of the diffusion model used"),
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


def _subset_indices(poison_json: Path, n: int) -> np.ndarray | None:
    """The training-set indices the poison was crafted on; None for the whole set."""
    if not poison_json.is_file():
        raise UserError(f"{poison_json} is missing: it names the clean images the poison was crafted from")
    info = read_state_json(poison_json, "re-craft the poison with poison.py")
    subset = info.get("subset") if isinstance(info, dict) else None
    if subset is None:
        return None
    idx = subset.get("indices") if isinstance(subset, dict) else None
    if not isinstance(idx, list) or len(idx) != n:
        raise UserError(f"{poison_json}: subset.indices must list the {n} training indices of the poisoned set")
    return np.asarray(idx, dtype=np.int64)


def measure(args: argparse.Namespace) -> dict:
    work = Path(args.work_dir)
    names = list(POISONS) if args.poisons == "all" else [p.strip() for p in args.poisons.split(",") if p.strip()]
    bad = [p for p in names if p not in POISONS]
    if bad:
        raise UserError(f"unknown poison(s) {', '.join(bad)}; choose from {', '.join(POISONS)} or 'all'")

    def pure(p: str) -> Path:
        return purified_file(work, SPARSE_SET, args.t, args.diffusion_iterations, p)

    ready = [p for p in names if poisoned_file(work, p).is_file() and pure(p).is_file()]
    if args.poisons != "all":
        missing = [
            f"{poisoned_file(work, p)}" if not poisoned_file(work, p).is_file() else f"{pure(p)}"
            for p in names
            if p not in ready
        ]
        if missing:
            raise UserError(f"not found: {', '.join(missing)} (run demo.py for these poisons first)")
    if not ready:
        raise UserError(
            f"{work}: no poison has both its poisoned and its purified set (t*={args.t}, {args.diffusion_iterations} iterations)"
        )
    train = load_cifar10("train")
    rows = []
    for p in ready:
        poisoned = read_eclipse_pkl(poisoned_file(work, p))
        purified = read_eclipse_pkl(pure(p))
        idx = _subset_indices(poisoned_file(work, p).with_suffix(".json"), len(poisoned))
        clean = train if idx is None else train.subset(torch.from_numpy(idx))
        if len(purified) != len(poisoned) or len(clean) != len(poisoned):
            raise UserError(f"{pure(p)}: {len(purified)} images, the poisoned set {len(poisoned)}, clean {len(clean)}")
        if not (torch.equal(poisoned.labels, clean.labels) and torch.equal(purified.labels, clean.labels)):
            raise UserError(f"{p}: the poisoned or purified labels differ from the clean subset's (another subset?)")
        rows.append({"poison": p, **survival(clean.images, poisoned.images, purified.images)})
        print(f"{p}: surviving share {rows[-1]['surviving_share']:.3f}, cosine {rows[-1]['cosine']:.3f}", flush=True)
    return {
        "work_dir": str(work.resolve()),
        "t": args.t,
        "diffusion_iterations": args.diffusion_iterations,
        "machine": machine(),
        "command": "python bench/perturbation_survival.py " + " ".join(sys.argv[1:]),
        "rows": rows,
    }


COLUMNS = (
    "poison",
    "surviving_share",
    "cosine",
    "delta_l2",
    "change_l2",
    "other_change_l2",
    "perturbed_images",
    "images",
)


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "survival.json", result)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    for r in result["rows"]:
        w.writerow([f"{r[k]:.4f}" if isinstance(r[k], float) else r[k] for k in COLUMNS])
    atomic_write_text(out / "survival.csv", buf.getvalue())
    fig, ax = pyplot().subplots(figsize=(5.5, 3.2))
    names = [r["poison"] for r in result["rows"]]
    ax.bar(names, [r["surviving_share"] for r in result["rows"]], color="tab:red")
    ax.set_ylabel("perturbation surviving purification")
    ax.set_ylim(0, 1)
    ax.set_title(f"ECLIPSE stage 1, t*={result['t']}, {result['diffusion_iterations']} iterations", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / "survival.png", dpi=120)


@cli_main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_keys_to_argparser(ap, KEYS)
    args = ap.parse_args(argv)
    out = Path(args.out)
    refuse_overwrite(out / "survival.json", args.overwrite)
    write_outputs(measure(args), out)
    print(f"wrote {out / 'survival.csv'} and survival.png")


if __name__ == "__main__":
    main()
