"""The CPU-scale ECLIPSE pipeline end to end, on real CIFAR-10 images (``make demo``).

Runs, as the README's CPU-scale table lists them, the same commands a user would:
  1. train_diffusion.py  the sparse diffusion model (2000 clean test images x 4), CPU-scale UNet
  2. poison.py           each poison (EM by default) on a class-balanced training subset
  3. purification.py     ECLIPSE stage 1 on the poisoned subset
  4. train.py            victims on the clean subset, on the poisoned subset (no defence), with
                         the ISS baselines (--baselines) and on the purified subset with
                         corruption compensation (ECLIPSE), each with --seeds seeds
and prints a table of test accuracies (mean ± std over seeds) in the shape of ECLIPSE's
Table 1. The recipe is config/eclipse_cpu.yaml. Everything goes under --work_dir (default
runs/demo/); every step resumes or is skipped when its output exists, so an interrupted
demo continues where it stopped; an output made with other settings is refused (another
--work_dir, or --overwrite to redo it). --jobs 2 runs two steps at a time (one thread each).
Ctrl-C or SIGTERM interrupts the running steps and waits for them.

--dataset runs the same pipeline on another registered dataset (its archive fetched when
missing; under runs/demo-<dataset>/), with the CPU-scale UNet of its image size.

--tiny (make smoke) is the smoke run: the same steps on a few hundred images in a few
minutes (config/eclipse_cpu.yaml, `tiny`; under runs/demo-tiny/), to see that everything
runs on this machine. Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from utils.datasets import DATASETS, dataset_present, get_dataset, resolve_root
from utils.demo.pipeline import (
    SPARSE_SET,
    VARIANTS,
    CommandFailed,
    build_commands,
    interrupt_on_sigterm,
    plan_lines,
    plot_summary,
    run_command,
    run_commands,
    summarise,
    table_markdown,
)
from utils.demo.recipe import demo_recipe, recipe_help, tiny_recipe
from utils.demo.step_costs import measure_unit_costs, step_threads
from utils.demo.stored import check_stored_settings
from utils.fileio import UserError, atomic_write_json, atomic_write_text, read_state_json
from utils.options import POSITIVE, SUBSET, Key, add_keys_to_argparser
from utils.paths import REPO_ROOT, poisoned_file, purified_file
from utils.poisons import POISONS
from utils.runtime import resolve_device


def parse_poisons(text: str) -> list[str]:
    """``all``, ``none`` (the clean-subset victims alone) or comma-separated poisons."""
    if text == "none":
        return []
    names = list(POISONS) if text == "all" else [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in POISONS]
    if bad or not names:
        sys.exit(
            f"demo: unknown poison(s) {', '.join(bad) or repr(text)}; choose from {', '.join(POISONS)}, 'all' or 'none'"
        )
    return names


def parse_defenses(text: str, baselines: bool = False) -> list[str]:
    """The victim columns of ``--defenses`` (plus ISS-G and ISS-J with ``--baselines``), in the table's order."""
    names = list(VARIANTS) if text == "all" else [d.strip() for d in text.split(",") if d.strip()]
    bad = [d for d in names if d not in VARIANTS]
    if bad or not names:
        sys.exit(f"demo: unknown defence(s) {', '.join(bad) or repr(text)}; choose from {', '.join(VARIANTS)} or 'all'")
    names += ["issg", "issj"] if baselines else []
    return [v for v in VARIANTS if v in names]


def run(cmd: list[str], log: TextIO) -> float:
    """One step in the foreground, its output on this terminal (the seam the tests replace)."""
    return run_command(cmd)


SMOKE = "SMOKE RUN (--tiny): it only shows that every step runs here; its numbers mean nothing"

KEYS: dict[str, Key] = {
    "poisons": Key("EM", "comma-separated poisons to craft and defend against, 'all', or 'none' (clean victims only)"),
    # an image folder has no fixed size or classes for the recipe: the named datasets only
    "dataset": Key("cifar10", "dataset of every step", choices=tuple(d for d in DATASETS if d != "imagefolder")),
    "work_dir": Key(None, "folder of every output (default: runs/demo, with --tiny runs/demo-tiny)", nullable=True),
    "tiny": Key(False, "the smoke run: a few hundred images, a few minutes; its numbers mean nothing", flag=True),
    "overwrite": Key(
        False, "redo the steps whose outputs were made with other settings (and the steps after them)", flag=True
    ),
    "test_subset": Key(
        None, "test the victims on a class-balanced subset (default: all 10,000)", int, True, range=SUBSET
    ),
    "baselines": Key(False, "also train the ISS baselines (grayscale, JPEG): adds issg,issj to --defenses", flag=True),
    "defenses": Key(
        "none,eclipse",
        "comma-separated victim columns: none (no defence), issg, issj, at (PGD adversarial training), cutout, "
        "mixup, cutmix, op (Orthogonal Projection), eclipse, or 'all' (train.py --defense; flags: the recipe's "
        "defense_flags); ECLIPSE's purification runs only for eclipse",
    ),
    "seeds": Key(1, "victims per cell, seeds 0..N-1 (table: mean ± std)", range=POSITIVE),
    "jobs": Key(1, "steps run at a time (each with cores/jobs threads)", range=POSITIVE),
    "skip_clean": Key(False, "do not train the clean-subset victims", flag=True),
    "clean_costs": Key(
        False,
        "also train each chosen defence's victim on the clean subset (what it costs on clean data; ECLIPSE purifies "
        "the clean subset first); the optional columns (at, cutout, mixup, cutmix, op) always do",
        flag=True,
    ),
    "plan": Key(False, "print the plan and stop", flag=True),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_keys_to_argparser(ap, KEYS)
    # the recipe's keys, typed by their values in config/eclipse_cpu.yaml, with its comments as help
    helps = recipe_help()
    recipe = {k: Key(v, helps.get(k) or "see config/eclipse_cpu.yaml") for k, v in demo_recipe().items()}
    add_keys_to_argparser(ap.add_argument_group("recipe (defaults: config/eclipse_cpu.yaml)"), recipe)
    if ap.parse_known_args(argv)[0].tiny:  # the smoke run's values replace the defaults; flags still win
        ap.set_defaults(**tiny_recipe())
    args = ap.parse_args(argv)
    if args.work_dir is None:
        name = "demo" + ("" if args.dataset == "cifar10" else f"-{args.dataset}") + ("-tiny" if args.tiny else "")
        args.work_dir = str(REPO_ROOT / "runs" / name)
    return args


def main() -> None:
    args = parse_args()
    poisons = parse_poisons(args.poisons)
    work = Path(args.work_dir).resolve()
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the work folder {work} ({e.strerror or e}); use a writable one") from None
    args.work_dir = str(work)
    variants = parse_defenses(args.defenses, args.baselines)
    if args.tiny:
        print(SMOKE, flush=True)
    # outputs made with other settings are refused before anything else happens
    check_stored_settings(build_commands(args, poisons, variants), args.overwrite)
    print("timing each kind of step on this machine (a few seconds) ...", flush=True)
    costs = measure_unit_costs(args, resolve_device("auto"), step_threads(args.jobs))
    steps = build_commands(args, poisons, variants, costs=costs)
    redone = check_stored_settings(steps, args.overwrite)
    plan = plan_lines(steps, args.jobs, costs) + redone
    if not dataset_present(args.dataset):
        what = "the official archive (163 MB)" if args.dataset == "cifar10" else "its official files"
        title = get_dataset(args.dataset).title
        plan.append(f"  {title} is not at {resolve_root(args.dataset)}: the first step downloads {what}")
    print("\n".join(plan + ["  an interrupted demo resumes where it stopped when run again"]), flush=True)
    if args.plan:
        return
    with interrupt_on_sigterm(), open(work / "demo.log", "a") as log:
        try:
            run_commands(
                steps,
                work,
                args.jobs,
                log,
                runner=lambda cmd: run(cmd, log),
                on_step_done=lambda done, total: write_summary(args, work, f"partial: {done} of {total} steps done"),
            )
        except CommandFailed as e:
            sys.exit(f"demo: step failed ({e})\nfix the cause and re-run; finished steps are kept")

    print("\n" + write_summary(args, work))
    print("\nimage grids (clean / poisoned / purified samples):")
    for p in poisons:
        print(f"  {p} poisoned: {poisoned_file(work, p, args.dataset).with_suffix('.png')}")
        if "eclipse" in variants:
            it = args.diffusion_iterations
            purified = purified_file(work, SPARSE_SET, args.t, it, p, args.dataset).with_suffix(".png")
            print(f"  {p} purified: {purified}")


def write_summary(args: argparse.Namespace, work: Path, status: str = "") -> str:
    """The table of every finished victim in ``work`` as summary.md, .json and .png; returns it."""
    summary = summarise(work, list(POISONS), args.seeds)
    tested = f"on {args.test_subset} test images" if args.test_subset else "on the test set"
    heading = (
        (f"{SMOKE}\n\n" if args.tiny else "")
        + f"CPU-scale ECLIPSE: {args.subset} training images"
        + ("" if args.dataset == "cifar10" else f" of {get_dataset(args.dataset).title}")
        + f", {args.arch} width {args.width}, {args.epochs} epochs, "
        f"{args.seeds} seed(s) per victim (mean ± std); diffusion UNet {args.diffusion_iterations} iterations, "
        f"t*={args.t} with {args.respace} reverse steps; test accuracy (%) {tested}"
        + (f" ({status})" if status else "")
    )
    table = table_markdown(summary, heading)
    seconds_file = work / "step_seconds.json"
    step_seconds = read_state_json(seconds_file, "delete it") if seconds_file.is_file() else {}
    atomic_write_text(work / "summary.md", table + "\n")
    # the dataset only where it is not CIFAR-10, so CIFAR-10 summaries stay as they were
    recipe = {k: v for k, v in vars(args).items() if k != "dataset" or v != "cifar10"}
    plot_summary(summary, work / "summary.png")
    atomic_write_json(
        work / "summary.json",
        {"recipe": recipe, "status": status or "complete", "table": summary, "step_seconds": step_seconds},
    )
    return table


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"demo: {e}")
    except OSError as e:  # a read-only or full work folder, a path blocked by a file: one line, no traceback
        sys.exit(f"demo: {str(e.filename) + ': ' if e.filename else ''}{e.strerror or e}")
    except KeyboardInterrupt:
        print(
            "\ndemo: interrupted; its running steps were stopped, finished work is saved and a re-run resumes from it",
            file=sys.stderr,
        )
        sys.exit(130)
