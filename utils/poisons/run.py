"""One run of poison.py: check and lock the output, craft the poison (resuming an
interrupted run), then write the poisoned set with its preview, log and JSON summary.

``poison.py`` parses and checks its options and calls ``run_poison``; everything that
reads data or writes files happens here, in the order the checks require: every input
is read before anything is written or an interrupted run is discarded.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import platform
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from utils.data import ImageSet, class_balanced_subset, write_eclipse_pkl
from utils.datasets import data_source, dataset_spec, load_dataset
from utils.fileio import atomic_write_json, refuse_overwrite, safe_torch_load, setup_logging
from utils.paths import poisoned_file, resource_dir, work_dir
from utils.plots import save_image_grid, signed_difference
from utils.poisons import PoisonSpec, get_craft
from utils.poisons.common import (
    CraftContext,
    CraftingPaused,
    CraftResult,
    check_budget,
    fingerprint_of,
    measure_norms,
    state_settings_pair,
)
from utils.precision import precision_from_args
from utils.run_state import RunFolder, check_name
from utils.runtime import resolve_device

PAUSED_EXIT = 3  # exit code of a run paused by --stop_after (its state is saved)


@dataclass
class PoisonJob:
    """What to craft, as poison.py resolved it, and the command line's other options."""

    spec: PoisonSpec
    params: dict[str, Any]
    name: str
    arch: str | None  # surrogate; None for poisons without one
    width: int | None
    args: argparse.Namespace
    command: str


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
    for c in range(min(int(clean.labels.max()) + 1, 10)):  # the first ten classes of a larger dataset
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


def run_poison(job: PoisonJob, locks: ExitStack) -> int:
    """Craft ``job`` and write its outputs; returns the exit code (``PAUSED_EXIT`` when
    ``--stop_after`` paused it)."""
    args, spec = job.args, job.spec
    work = work_dir(args.work_dir)
    out = poisoned_file(work, job.name, args.dataset)
    # the outputs' names (with their temporary and lock files) fit the file system, before any work
    check_name(job.name, "--name", tuple("{}" + s for s in (".pkl", ".json", ".png", ".log", ".work/")), out.parent)
    module = importlib.import_module(spec.module)
    if hasattr(module, "preflight"):
        module.preflight(work, job.params, dataset_spec(args.dataset, args.data_root, args.download))
    refuse_overwrite(out, args.overwrite)  # before any work: an existing result stays untouched
    device = resolve_device(args.device)
    precision = precision_from_args(args, device, "surrogate")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # the data is read (and so checked) before anything is written or discarded
    train = load_dataset(args.dataset, "train", args.data_root, download=args.download)
    classes = dataset_spec(args.dataset, args.data_root).class_names()
    settings = {
        "poison": spec.name,
        "params": job.params,
        "seed": args.seed,
        "subset": args.subset,
        "subset_seed": args.subset_seed,
        "arch": job.arch,
        "width": job.width,
        "bf16": precision.bf16,  # the surrogates' precision, spelled as states have always stored it
        "data_root": str(args.data_root),
        # the dataset only where it is not CIFAR-10, so CIFAR-10 states resume as before
        **({"dataset": args.dataset} if args.dataset != "cifar10" else {}),
        # an image folder's resolved root and listing (its data_root resolved): another folder's
        # state is refused, and its summary tells train.py which folder the poison came from
        **data_source(args.dataset, args.data_root, args.download),
    }
    # an interrupted run's state resumes only with the same settings, in the precision it was
    # started with; with other settings it is refused, or discarded under --overwrite
    folder = RunFolder(
        out.with_suffix(".work"),
        settings,
        settings_file=None,
        overwrite=args.overwrite,
        hint="re-run its command to finish it, or pass --overwrite to discard it",
        keep=("bf16",),
        lock=out,
    )
    locks.enter_context(folder)
    refuse_overwrite(out, args.overwrite)  # again under the lock: another process may have finished it
    _discard_stale_state(folder, _stored_state(folder.folder))
    fingerprint = fingerprint_of(settings)

    log = setup_logging(out.with_suffix(".log"), "poison")
    subset_idx = None
    if args.subset is not None and args.subset < len(train):
        subset_idx = class_balanced_subset(train.labels, args.subset, args.subset_seed)
        train = train.subset(subset_idx)
    test = (
        load_dataset(args.dataset, "test", args.data_root, download=args.download) if spec.needs_test else None
    )  # SEP keeps checkpoints by test accuracy
    log.info(
        f"[Poison:{spec.name}] [Name:{job.name}] {len(train)} images, params {job.params}, seed {args.seed}, "
        + (f"surrogate {job.arch} w{job.width}, " if job.arch else "")
        + f"device {describe_device(device)}"
    )
    log.info(precision.line(used="bf16" if settings["bf16"] else "fp32"))
    ctx = CraftContext(
        clean=train,
        params=job.params,
        seed=args.seed,
        device=device,
        bf16=settings["bf16"],
        arch=job.arch or "resnet18",
        width=job.width or 64,
        state_dir=out.with_suffix(".work"),
        resource_dir=resource_dir(work),
        log=log,
        save_every=args.save_every,
        stop_after=args.stop_after,
        fingerprint=fingerprint,
        settings=settings,
        progress=not args.no_progress,
        work=work,
        test=test,
        num_classes=len(classes),
    )
    t_wall = time.time()
    try:
        result = get_craft(spec)(ctx)
    except CraftingPaused as e:
        log.info(f"{e}; state saved in {ctx.state_dir}, re-run the same command (without --stop_after) to resume")
        return PAUSED_EXIT
    _write_outputs(job, out, ctx, result, subset_idx, device, t_wall, classes)
    return 0


def _stored_state(state_dir: Path) -> Any:
    """An interrupted run's crafting state (None when there is none)."""
    state_file = state_dir / "state.pt"
    return safe_torch_load(state_file, "crafting state") if state_file.is_file() else None


def _discard_stale_state(folder: RunFolder, state: Any) -> None:
    """Refuse or discard (``--overwrite``) an interrupted run's state (``state``) of other
    settings; a state folder without its state is discarded."""
    settings = folder.settings
    pair = state_settings_pair(state, settings, fingerprint_of(settings)) if isinstance(state, dict) else (state, None)
    if not folder.check(*pair) and folder.folder.exists():
        folder.discard()


def _write_outputs(
    job: PoisonJob,
    out: Path,
    ctx: CraftContext,
    result: CraftResult,
    subset_idx: torch.Tensor | None,
    device: torch.device,
    t_wall: float,
    classes: list[str],
) -> None:
    """The preview and JSON summary, then the poisoned set (after checking its dtype, shape
    and budget) last: the ``.pkl`` marks the run finished (``utils.run_state``), so a kill
    before it leaves a run that the same command resumes. Then the crafting state is removed."""
    spec, params, args, train = job.spec, job.params, job.args, ctx.clean
    poisoned = result.images
    if poisoned.dtype != torch.uint8 or poisoned.shape != train.images.shape:
        raise RuntimeError(f"{spec.name} returned {poisoned.dtype} {tuple(poisoned.shape)} images")
    norms = measure_norms(train.images, poisoned)
    budget = check_budget(spec, params, norms, train.image_size)
    if not budget["holds"]:
        raise RuntimeError(f"{spec.name} broke its budget: {budget} with measured norms {norms}")

    out.unlink(missing_ok=True)  # --overwrite: the earlier result never stands beside this run's summary
    preview(out.with_suffix(".png"), train, poisoned)
    seconds = ctx.elapsed()
    summary = {
        "poison": spec.name,
        "name": job.name,
        "summary": spec.summary,
        "norm": spec.norm,
        "kind": spec.kind,
        "parameters": params,
        "seed": args.seed,
        "surrogate_arch": job.arch,
        "surrogate_width": job.width,
        "precision": "bf16" if ctx.bf16 else "fp32",
        "n_images": len(train),
        **({"dataset": args.dataset} if args.dataset != "cifar10" else {}),
        # an image folder's root and listing: train.py refuses this poison with another folder
        **({k: ctx.settings[k] for k in ("data_root", "data_listing")} if "data_listing" in ctx.settings else {}),
        "classes": classes,
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
        "command": job.command,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    atomic_write_json(out.with_suffix(".json"), summary)
    write_eclipse_pkl(out, ImageSet(poisoned, train.labels))
    ctx.cleanup()
    ctx.log.info(
        f"wrote {out} ({len(train)} images): max L∞ {norms['linf_max_255']:.0f}/255, mean L2 {norms['l2_mean']:.3f}, "
        f"mean L0 {norms['l0_mean_pixels']:.1f} px, {seconds:.1f}s"
        + (
            f"; surrogate train acc {result.info['surrogate']['train_acc_clean']:.1f}% clean / "
            f"{result.info['surrogate']['train_acc_poisoned']:.1f}% poisoned"
            if "surrogate" in result.info
            else ""
        )
    )
