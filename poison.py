"""Craft a clean-label availability poison of the CIFAR-10 training set, in ECLIPSE's format.

    python poison.py --poison EM                        # -> poisoned_data/cifar10/EM.pkl (+ .json .png .log)
    python poison.py --poison EM --classwise            # -> EM-classwise.pkl
    python poison.py --poison TAP --eps 4 --name TAP-4  # another budget under another name
    python poison.py --poison URP --subset 5000         # CPU scale: a class-balanced subset
    python poison.py --list                             # every poison with its defaults

Defaults are the papers' settings (README, "Poisons"). Model-based poisons checkpoint
their state under poisoned_data/cifar10/<NAME>.work/ and a re-run of the same command
resumes from it; the folder is removed once the poisoned set is written.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import platform
import shutil
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from models import CLASSIFIERS
from utils.data import CIFAR10_CLASSES, ImageSet, class_balanced_subset, load_cifar10, write_eclipse_pkl
from utils.fileio import UserError, atomic_write_json, cli_main, refuse_overwrite, safe_torch_load, setup_logging
from utils.paths import poisoned_file, resource_dir, work_dir
from utils.plots import save_image_grid, signed_difference
from utils.poisons import OPTIONS, POISONS, get_craft, get_poison, resolve_params
from utils.poisons.common import (
    CraftContext,
    CraftingPaused,
    check_budget,
    fingerprint_of,
    measure_norms,
    state_settings_pair,
)
from utils.run_state import OutputLock, check_name, same_settings_or_refuse
from utils.runtime import (
    ArgParser,
    Range,
    number_type,
    positive_float,
    positive_int,
    resolve_device,
    str2bool,
    subset_size,
)

PAUSED_EXIT = 3


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(
        description=__doc__.splitlines()[0],
        epilog="Poison-specific options default to the poison's paper settings (see --list).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--poison", help=f"one of {', '.join(POISONS)}")
    p.add_argument("--list", action="store_true", help="list the poisons, their norms and defaults, and exit")
    p.add_argument(
        "--name", default=None, help="output name (default: the poison's name; EM-classwise for --classwise)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--subset", type=subset_size, default=None, help="CPU scale: poison a class-balanced subset of N images"
    )
    p.add_argument("--subset_seed", type=int, default=0, help="seed of the subset draw (train.py --subset uses 0)")
    p.add_argument("--arch", default=None, choices=list(CLASSIFIERS), help="surrogate architecture (default resnet18)")
    p.add_argument("--width", type=positive_int, default=None, help="surrogate width (64 = the papers; 16 = CPU scale)")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--bf16",
        type=str2bool,
        default=False,
        help="bf16 autocast for surrogates (fp32 weights); the references run fp32, the default (docs/RESULTS.md: bf16 vs fp32)",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads (default: torch's); 1 is several times faster on a machine whose cores are busy",
    )
    p.add_argument("--data_root", default=None, help="CIFAR-10 root (else $CIFAR10_ROOT, else data/cifar10)")
    p.add_argument("--download", type=str2bool, default=None, help="fetch CIFAR-10 when missing (default: on)")
    p.add_argument(
        "--work_dir", default=None, help="folder holding poisoned_data/ and resource/ (default: the repository)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs / discard an interrupted run")
    p.add_argument("--save_every", type=positive_float, default=300.0, help="seconds between state checkpoints")
    p.add_argument(
        "--stop_after",
        type=positive_int,
        default=None,
        help="pause (state saved, exit code 3) after N units of work (batches/epochs); re-run to resume",
    )
    p.add_argument("--no_progress", action="store_true", help="no progress bars (logs only)")
    g = p.add_argument_group("poison options (each poison takes a subset; defaults: --list)")
    for name, (typ, low, help_) in OPTIONS.items():
        if typ is bool:
            g.add_argument(f"--{name}", action="store_true", default=None, help=help_.replace("%", "%%"))
        else:
            # numbers: finite and at least the declared minimum (NaN would pass a plain `v < low` test)
            kind = number_type(typ, Range(low)) if typ in (int, float) else typ
            g.add_argument(f"--{name}", type=kind, default=None, help=help_.replace("%", "%%"))
    return p


def listing() -> str:
    lines = []
    for spec in POISONS.values():
        dflt = ", ".join(f"{k}={'(derived)' if callable(v) else v}" for k, v in spec.defaults.items())
        lines.append(f"{spec.name:5s} {spec.norm:4s} {spec.kind:34s} {spec.summary}")
        lines.append(f"      defaults: {dflt}")
        if spec.cpu_flags:
            lines.append(f"      CPU scale (--subset 5000): {spec.cpu_flags}")
    return "\n".join(lines)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"


def preview(path: Path, clean: ImageSet, poisoned: torch.Tensor, per_class: int = 2) -> None:
    """clean / poisoned / amplified perturbation for ``per_class`` images of each class."""
    idx = []
    for c in range(10):
        idx += torch.nonzero(clean.labels == c).flatten()[:per_class].tolist()
    idx = torch.tensor(idx, dtype=torch.long)
    a, b = poisoned[idx], clean.images[idx]
    peak = max(float((a.int() - b.int()).abs().max()), 1.0)
    gain = min(127.0 / peak, 32.0)
    save_image_grid(
        path,
        [b, a, signed_difference(a, b, gain)],
        ["clean", "poisoned", f"delta x{gain:.0f}"],
    )


def main_impl(argv: list[str] | None, locks: ExitStack) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        print(listing())
        return 0
    if not args.poison:
        raise UserError(f"--poison is required; valid poisons: {', '.join(POISONS)}")
    spec = get_poison(args.poison)
    given = {k: getattr(args, k) for k in OPTIONS}
    params = resolve_params(spec, given)
    if spec.model_based and spec.name != "ADP":
        arch, width = args.arch or "resnet18", args.width or 64
    else:
        if args.arch is not None or args.width is not None:
            why = "its surrogate is the diffusion UNet" if spec.name == "ADP" else "it uses no surrogate model"
            raise UserError(f"--arch/--width do not apply to {spec.name}: {why}")
        arch, width = None, None
    name = check_name(args.name or (f"{spec.name}-classwise" if params.get("classwise") else spec.name), "--name")

    work = work_dir(args.work_dir)
    out = poisoned_file(work, name)
    module = importlib.import_module(spec.module)
    if hasattr(module, "preflight"):
        module.preflight(work, params)
    refuse_overwrite(out, args.overwrite)  # before any work: an existing result stays untouched
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # the data is read (and so checked) before anything is written or discarded
    train = load_cifar10("train", args.data_root, download=args.download)
    locks.enter_context(OutputLock(out))
    refuse_overwrite(out, args.overwrite)  # again under the lock: another process may have finished it

    state_dir = out.with_suffix(".work")
    settings = {
        "poison": spec.name,
        "params": params,
        "seed": args.seed,
        "subset": args.subset,
        "subset_seed": args.subset_seed,
        "arch": arch,
        "width": width,
        "bf16": args.bf16,
        "data_root": str(args.data_root),
    }
    fingerprint = fingerprint_of(settings)
    stale = False
    if state_dir.exists():
        state_file = state_dir / "state.pt"
        old = safe_torch_load(state_file, "crafting state") if state_file.is_file() else None
        pair = state_settings_pair(old, settings, fingerprint) if isinstance(old, dict) else (old, settings)
        hint = "re-run its command to finish it, or pass --overwrite to discard it"
        stale = not same_settings_or_refuse(state_dir, *pair, overwrite=args.overwrite, hint=hint)
    if stale:
        shutil.rmtree(state_dir)

    log = setup_logging(out.with_suffix(".log"), "poison")
    subset_idx = None
    if args.subset is not None and args.subset < len(train):
        subset_idx = class_balanced_subset(train.labels, args.subset, args.subset_seed)
        train = train.subset(subset_idx)
    test = load_cifar10("test", args.data_root) if spec.needs_test else None  # SEP keeps checkpoints by test accuracy
    log.info(
        f"[Poison:{spec.name}] [Name:{name}] {len(train)} images, params {params}, seed {args.seed}, "
        + (f"surrogate {arch} w{width}, " if arch else "")
        + f"device {describe_device(device)}"
    )
    ctx = CraftContext(
        clean=train,
        params=params,
        seed=args.seed,
        device=device,
        bf16=args.bf16,
        arch=arch or "resnet18",
        width=width or 64,
        state_dir=state_dir,
        resource_dir=resource_dir(work),
        log=log,
        save_every=args.save_every,
        stop_after=args.stop_after,
        fingerprint=fingerprint,
        settings=settings,
        progress=not args.no_progress,
        work=work,
        test=test,
    )
    t_wall = time.time()
    try:
        result = get_craft(spec)(ctx)
    except CraftingPaused as e:
        log.info(f"{e}; state saved in {state_dir}, re-run the same command (without --stop_after) to resume")
        return PAUSED_EXIT
    poisoned = result.images
    if poisoned.dtype != torch.uint8 or poisoned.shape != train.images.shape:
        raise RuntimeError(f"{spec.name} returned {poisoned.dtype} {tuple(poisoned.shape)} images")
    norms = measure_norms(train.images, poisoned)
    budget = check_budget(spec, params, norms)
    if not budget["holds"]:
        raise RuntimeError(f"{spec.name} broke its budget: {budget} with measured norms {norms}")

    write_eclipse_pkl(out, ImageSet(poisoned, train.labels))
    preview(out.with_suffix(".png"), train, poisoned)
    seconds = ctx.elapsed()
    summary = {
        "poison": spec.name,
        "name": name,
        "summary": spec.summary,
        "norm": spec.norm,
        "kind": spec.kind,
        "parameters": params,
        "seed": args.seed,
        "surrogate_arch": arch,
        "surrogate_width": width,
        "bf16": args.bf16,
        "n_images": len(train),
        "classes": list(CIFAR10_CLASSES),
        "subset": None
        if subset_idx is None
        else {"n": len(subset_idx), "seed": args.subset_seed, "indices": subset_idx.tolist()},
        "norms": norms,
        "budget": budget,
        "crafting_seconds": seconds,
        "this_session_seconds": time.time() - t_wall,
        "device": describe_device(device),
        "torch": torch.__version__,
        "reference": spec.paper,
        "result": result.info,
        "outputs": {"pkl": str(out), "png": str(out.with_suffix(".png")), "log": str(out.with_suffix(".log"))},
        "command": "python poison.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    atomic_write_json(out.with_suffix(".json"), summary)
    ctx.cleanup()
    log.info(
        f"wrote {out} ({len(train)} images): max L∞ {norms['linf_max_255']:.0f}/255, mean L2 {norms['l2_mean']:.3f}, "
        f"mean L0 {norms['l0_mean_pixels']:.1f} px, {seconds:.1f}s"
        + (
            f"; surrogate train acc {result.info['surrogate']['train_acc_clean']:.1f}% clean / "
            f"{result.info['surrogate']['train_acc_poisoned']:.1f}% poisoned"
            if "surrogate" in result.info
            else ""
        )
    )
    return 0


@cli_main
def main(argv: list[str] | None = None) -> int:
    with ExitStack() as locks:  # the output's lock, released however the run ends
        code = main_impl(argv, locks)
    if code:
        raise SystemExit(code)
    return code


if __name__ == "__main__":
    main()
