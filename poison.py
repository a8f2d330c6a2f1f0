"""Craft a clean-label availability poison of a training set (CIFAR-10 by default), in ECLIPSE's format.

    python poison.py --poison EM                        # -> poisoned_data/cifar10/EM.pkl (+ .json .png .log)
    python poison.py --poison EM --classwise            # -> EM-classwise.pkl
    python poison.py --poison TAP --eps 4 --name TAP-4  # another budget under another name
    python poison.py --poison URP --subset 5000         # CPU scale: a class-balanced subset
    python poison.py --list                             # every poison with its defaults
    python poison.py --poison URP --dataset cifar100    # -> poisoned_data/cifar100/URP.pkl

Defaults are the papers' settings (README, "Poisons"). Model-based poisons checkpoint
their state under poisoned_data/cifar10/<NAME>.work/ and a re-run of the same command
resumes from it; the folder is removed once the poisoned set is written.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack

from models import CLASSIFIERS
from utils.datasets import DATASET_KEY, dataset_spec
from utils.fileio import UserError, cli_main
from utils.options import (
    BF16,
    DEVICE,
    DOWNLOAD,
    GT0,
    POSITIVE,
    PRECISION,
    SUBSET,
    ArgParser,
    Key,
    add_keys_to_argparser,
)
from utils.poisons import OPTIONS, POISONS, PoisonSpec, get_poison, resolve_params
from utils.poisons.run import PAUSED_EXIT, PoisonJob, run_poison
from utils.run_state import check_name

__all__ = ["PAUSED_EXIT", "main"]

KEYS: dict[str, Key] = {
    "poison": Key(None, f"one of {', '.join(POISONS)}", nullable=True),
    "list": Key(False, "list the poisons, their norms and defaults, and exit", flag=True),
    "name": Key(None, "output name (default: the poison's name; EM-classwise for --classwise)", nullable=True),
    "seed": Key(0, "seed of the crafting (surrogate, noise, data order)"),
    "subset": Key(None, "CPU scale: poison a class-balanced subset of N images", int, True, range=SUBSET),
    "subset_seed": Key(0, "seed of the subset draw (train.py --subset uses 0)"),
    "arch": Key(None, "surrogate architecture (default resnet18)", str, True, choices=tuple(CLASSIFIERS)),
    "width": Key(None, "surrogate width (64 = the papers; 16 = CPU scale)", int, True, range=POSITIVE),
    "device": DEVICE,
    "precision": PRECISION.with_default(
        "auto",
        "auto: fp32 for surrogates everywhere (bf16 weakens EM: docs/RESULTS.md, surrogate precision), as the "
        "references; bf16: bf16 autocast (faster on CPUs with native bf16)",
    ),
    "bf16": BF16,
    "threads": Key(
        None,
        "CPU threads (default: torch's); 1 is several times faster on a machine whose cores are busy",
        int,
        True,
        range=POSITIVE,
    ),
    "dataset": DATASET_KEY,
    "data_root": Key(
        None, "the dataset's root (else $<DATASET>_ROOT, e.g. $CIFAR10_ROOT, else data/<dataset>)", nullable=True
    ),
    "download": DOWNLOAD,
    "work_dir": Key(None, "folder holding poisoned_data/ and resource/ (default: the repository)", nullable=True),
    "overwrite": Key(False, "replace existing outputs / discard an interrupted run", flag=True),
    "save_every": Key(300.0, "seconds between state checkpoints", range=GT0),
    "stop_after": Key(
        None,
        "pause (state saved, exit code 3) after N units of work (batches/epochs); re-run to resume",
        int,
        True,
        range=POSITIVE,
    ),
    "no_progress": Key(False, "no progress bars (logs only)", flag=True),
}


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(
        description=__doc__.splitlines()[0],
        epilog="Poison-specific options default to the poison's paper settings (see --list).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_keys_to_argparser(p, KEYS)
    group = p.add_argument_group("poison options (each poison takes a subset; defaults: --list)")
    # their usage lines name the value, as before the choices were declared with the options
    add_keys_to_argparser(group, OPTIONS, show_choices=False, show_defaults=False)
    return p


def listing() -> str:
    lines = []
    for spec in POISONS.values():
        dflt = ", ".join(
            f"{k}={'(derived)' if callable(key.default) else key.default}" for k, key in spec.defaults.items()
        )
        lines.append(f"{spec.name:5s} {spec.norm:4s} {spec.kind:34s} {spec.summary}")
        lines.append(f"      defaults: {dflt}")
        if spec.cpu_flags:
            lines.append(f"      CPU scale (--subset 5000): {spec.cpu_flags}")
    return "\n".join(lines)


def surrogate_of(spec: PoisonSpec, arch: str | None, width: int | None) -> tuple[str | None, int | None]:
    """The surrogate classifier of a model-based poison (ResNet-18 of width 64 unless
    given); ``(None, None)`` for the others, which refuse --arch/--width."""
    if spec.model_based and spec.name != "ADP":
        return arch or "resnet18", width or 64
    if arch is not None or width is not None:
        why = "its surrogate is the diffusion UNet" if spec.name == "ADP" else "it uses no surrogate model"
        raise UserError(f"--arch/--width do not apply to {spec.name}: {why}")
    return None, None


def main_impl(argv: list[str] | None, locks: ExitStack) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        print(listing())
        return 0
    if not args.poison:
        raise UserError(f"--poison is required; valid poisons: {', '.join(POISONS)}")
    spec = get_poison(args.poison)
    data = dataset_spec(args.dataset, args.data_root, args.download)
    params = resolve_params(spec, {k: getattr(args, k) for k in OPTIONS}, data=data)
    arch, width = surrogate_of(spec, args.arch, args.width)
    name = check_name(args.name or (f"{spec.name}-classwise" if params.get("classwise") else spec.name), "--name")
    command = "python poison.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return run_poison(PoisonJob(spec, params, name, arch, width, args, command), locks)


@cli_main
def main(argv: list[str] | None = None) -> int:
    with ExitStack() as locks:  # the output's lock, released however the run ends
        code = main_impl(argv, locks)
    if code:
        raise SystemExit(code)
    return code


if __name__ == "__main__":
    main()
