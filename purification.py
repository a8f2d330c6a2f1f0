"""ECLIPSE stage 1: sparse diffusion purification of a poisoned training set.

Adds Gaussian noise to every image in one shot (to step t* of the diffusion), then
denoises with t* ancestral steps of the sparse diffusion model, and writes the result in
the ECLIPSE format, in the input's order:

    python purification.py --poison EM
      reads  poisoned_data/cifar10/EM.pkl
             diff_ckpt/cifar10/test2000ps8000/ema_0.9999_250000.pt
      writes purified_data/cifar10/test2000ps8000/100/250000/EM-pure.pkl (+ .json, .png, .log)

``--poison clean`` purifies the clean training set (``--subset N``: the class-balanced subset
that ``train.py --poison clean --subset N`` and ``poison.py --subset N`` use), so that
``train.py --poison clean --pure`` measures what ECLIPSE costs on clean data.

``--dataset`` another dataset: its folders (poisoned_data/<dataset>/, diff_ckpt/<dataset>/,
purified_data/<dataset>/) and its config (config/eclipse/<dataset>.yml).

``--diff_work_dir`` reads the checkpoint from another work folder's ``diff_ckpt/`` (a dataset
exported elsewhere, purified with the demo's model: ``bench/cross_threat_table.py``).
An interrupted run resumes batch by batch; ``torchrun --nproc_per_node=N purification.py``
shards the batches across processes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from utils.data import ImageSet, psnr_db, write_eclipse_pkl
from utils.datasets import DATASET_KEY, check_image_size, dataset_spec, diffusion_config_name, load_poisoned
from utils.diffusion.checkpoints import parse_checkpoint_name
from utils.diffusion.factory import (
    diffusion_train_command,
    load_diffusion_spec,
    load_purifier,
    purifier_checkpoint,
    resolve_config,
)
from utils.diffusion.purify import noise_std_at, purify_dataset
from utils.download import eclipse_manual, work_dir_flag
from utils.fileio import (
    UserError,
    atomic_write_json,
    cli_main,
    file_fingerprint,
    refuse_overwrite,
    safe_torch_load,
    setup_logging,
)
from utils.options import (
    BF16,
    CLEAN_SUBSET,
    DEVICE,
    DOWNLOAD,
    POSITIVE,
    PRECISION,
    SUBSET_SEED,
    ArgParser,
    Key,
    add_keys_to_argparser,
)
from utils.paths import diff_ckpt_dir, poisoned_file, purified_file, work_dir
from utils.plots import amplified_difference, save_image_grid
from utils.precision import precision_from_args
from utils.run_state import RunFolder, check_name
from utils.runtime import cleanup_distributed, init_distributed, resolve_device

KEYS: dict[str, Key] = {
    # the reference's flags and defaults
    "config": Key(
        None, "diffusion YAML: a path, or a file name in config/eclipse/ (default: <dataset>.yml)", nullable=True
    ),
    "seed": Key(1234, "seed of the noise (each batch seeded by seed and batch index)"),
    "t": Key(100, "t*: noise level (diffusion step) and number of reverse steps", range=POSITIVE),
    "sparse_diff_model": Key("ema_0.9999_250000.pt", "checkpoint file in diff_ckpt/<dataset>/<sparse_set>/"),
    "sparse_set": Key("test2000ps8000", "diffusion run name: the checkpoint folder diff_ckpt/<dataset>/<sparse_set>/"),
    "batch_size": Key(256, "images purified per batch (a resumed run keeps its batch size)", range=POSITIVE),
    "poison": Key("EM", "poisoned_data/<dataset>/<POISON>.pkl, or 'clean'"),
    "dataset": DATASET_KEY,
    "subset": CLEAN_SUBSET,
    "subset_seed": SUBSET_SEED,
    "download": DOWNLOAD,
    "data_root": Key(None, "--dataset imagefolder: its root, for its classes and image size", nullable=True),
    # additions
    "respace": Key(
        None,
        "K < t*: K evenly spaced reverse steps over the same noise level (faster, a deviation from the paper)",
        int,
        True,
        range=POSITIVE,
    ),
    "precision": PRECISION,
    "bf16": BF16,
    "compile": Key(False, "torch.compile the UNet (see BENCHMARKS.md)"),
    "quantize": Key("truncate", "float->uint8 as ToPILImage (truncate) or rounding", choices=("truncate", "round")),
    "device": DEVICE,
    "work_dir": Key(
        None, "folder holding poisoned_data/, diff_ckpt/, purified_data/ (default: the repository)", nullable=True
    ),
    "diff_work_dir": Key(
        None,
        "folder whose diff_ckpt/ holds --sparse_diff_model (default: --work_dir): purify a dataset of one work "
        "folder with another's model",
        nullable=True,
    ),
    "overwrite": Key(False, "replace an existing purified file", flag=True),
}


OUTPUT_SUFFIXES = (".pkl", ".json", ".png", ".log")


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_keys_to_argparser(p, KEYS)
    args = p.parse_args(argv)
    for flag in ("poison", "sparse_set"):
        check_name(getattr(args, flag), f"--{flag}")
    check_name(args.sparse_diff_model, "--sparse_diff_model", made=())  # read, never written
    return args


def checkpoint_iteration(name: str) -> str:
    """``ema_0.9999_250000.pt`` -> ``250000`` (the folder name the reference uses); either
    checkpoint spelling (``ema_0.999_003000.pt`` -> ``3000``), else the file's stem."""
    parsed = parse_checkpoint_name(name)
    return str(parsed.step) if parsed else Path(name).stem


@cli_main
def main(argv=None) -> None:
    args = parse_args(argv)
    work = work_dir(args.work_dir)
    data_spec = dataset_spec(args.dataset, args.data_root)
    config = resolve_config(args.config or diffusion_config_name(data_spec, "eclipse"))
    spec = load_diffusion_spec(config)
    check_image_size(spec.image_size, data_spec, config, "eclipse")
    iteration = checkpoint_iteration(args.sparse_diff_model)
    src = poisoned_file(work, args.poison, args.dataset)
    dst = purified_file(work, args.sparse_set, args.t, iteration, args.poison, args.dataset)
    other = args.dataset != "cifar10"  # ECLIPSE published CIFAR-10's files only
    # the outputs' names (with their temporary and lock files) fit the file system
    check_name(
        args.poison, "--poison", tuple(f"{{}}-pure{s}" for s in OUTPUT_SUFFIXES) + (".{}-pure.parts/",), dst.parent
    )
    if args.subset is not None and args.poison != "clean":
        raise UserError(f"--subset applies to --poison clean only (craft {args.poison} with poison.py --subset)")
    if not src.is_file() and args.poison != "clean":  # clean without clean.pkl: the dataset itself
        raise UserError(
            f"poisoned dataset not found: {src}; craft it with `python poison.py --poison {args.poison}"
            + (f" --dataset {args.dataset}" if other else "")
            + f"{work_dir_flag(work)}`"
            + ("" if other else ", " + eclipse_manual("poisoned"))
        )
    # either spelling of the name loads (ECLIPSE's published ema_0.9999_250000.pt is both)
    model_work = work_dir(args.diff_work_dir) if args.diff_work_dir else work
    cmd = diffusion_train_command(config, args.sparse_set, args.sparse_diff_model, model_work, args.dataset)
    ckpt = purifier_checkpoint(
        diff_ckpt_dir(model_work, args.sparse_set, args.dataset) / args.sparse_diff_model,
        f"train it with `{cmd}`" + ("" if other else ", " + eclipse_manual("checkpoint")),
    )

    device = resolve_device(args.device)
    precision = precision_from_args(args, device, "purification")
    rank, world = init_distributed(device)
    lock = ExitStack()
    try:
        # every input is checked (and read) before the log or any output is written
        # which clean images: a resumed run with another draw is refused, not mixed
        clean_draw = {"subset": args.subset, "subset_seed": args.subset_seed} if args.poison == "clean" else {}
        data, _ = load_poisoned(
            work, args.poison, args.data_root, args.subset, args.subset_seed, args.download, args.dataset
        )
        model, base, _ = load_purifier(spec, ckpt, device, t=args.t, compile=args.compile)
        # the batches of an interrupted run; purify_dataset compares their settings
        parts = dst.parent / f".{dst.stem}.parts"
        folder = RunFolder(parts, {}, settings_file=None, overwrite=args.overwrite, lock=dst, rank=rank, world=world)
        lock.enter_context(folder)
        refuse_overwrite(dst, args.overwrite)
        try:
            _check_parts_batch_size(parts, len(data), args.batch_size)
        except UserError:
            if not args.overwrite:
                raise
            folder.discard()
        log = setup_logging(dst.with_suffix(".log") if rank == 0 else None, "purification")
        steps = args.t if args.respace is None else min(args.respace, args.t)
        if rank == 0:
            log.info(
                f"[Poison:{args.poison}] [t*:{args.t}] [Sparse set:{args.sparse_set}] [Iteration:{iteration}] "
                f"{len(data)} images, {steps} reverse steps, noise std {noise_std_at(base, args.t):.4f} on [-1,1], "
                f"device={device}, processes={world}"
            )
            log.info(precision.line())
        stats: dict = {}
        t0 = time.time()
        out = purify_dataset(
            model,
            base,
            data.images,
            args.t,
            parts,
            batch_size=args.batch_size,
            respace=args.respace,
            seed=args.seed,
            precision=precision.name,
            quantize=args.quantize,
            device=device,
            rank=rank,
            world=world,
            log=log.info,
            settings={"checkpoint": file_fingerprint(ckpt), "diffusion": spec.summary(), **clean_draw},
            overwrite=args.overwrite,
            stats=stats,
        )
        if rank == 0:
            seconds = time.time() - t0
            purified = ImageSet(out, data.labels)
            summary = _summary(args, data, purified, seconds, steps, device, world, str(config), str(ckpt), base, stats)
            # the .pkl last: it marks the run finished (utils.run_state); --overwrite's earlier one goes first
            dst.unlink(missing_ok=True)
            atomic_write_json(dst.with_suffix(".json"), summary)
            _grid(dst.with_suffix(".png"), data, purified, "clean" if args.poison == "clean" else "poisoned")
            write_eclipse_pkl(dst, purified)
            shutil.rmtree(parts, ignore_errors=True)
            rate = summary["image_steps_per_s"]
            log.info(f"wrote {dst} ({seconds:.0f} s, {rate or 0:.1f} image-steps/s)")
    finally:
        lock.close()
        cleanup_distributed()


def _check_parts_batch_size(parts: Path, n_images: int, batch_size: int) -> None:
    """Batches of an interrupted run resume only with the same ``--batch_size``: each batch's
    noise comes from its index, so other batches would mix two runs' noise."""
    found = sorted(p for p in parts.glob("part_*.pt") if p.stem[5:].isdigit()) if parts.is_dir() else []
    for path in found:
        try:
            part = safe_torch_load(path, "purified batch")
        except UserError:
            continue  # a damaged batch tells nothing; purify_dataset redoes it
        if isinstance(part, torch.Tensor) and part.dtype == torch.uint8 and part.dim() == 4:
            break
    else:
        return
    # the lowest-numbered readable batch: full-sized unless it is the last one
    i = int(path.stem.split("_")[1])
    had = len(part)
    expected = max(0, min(batch_size, n_images - i * batch_size))
    if had != expected:
        raise UserError(
            f"{parts} holds batches of an interrupted run with --batch_size {had}, this run has --batch_size "
            f"{batch_size}; re-run with --batch_size {had} to resume it, or pass --overwrite to start afresh"
        )


def _summary(
    args, data: ImageSet, purified: ImageSet, seconds, steps, device, world, config, ckpt, base, stats
) -> dict:
    diff = purified.images.float() - data.images.float()
    return {
        "poison": args.poison,
        "subset": args.subset,
        "subset_seed": args.subset_seed,
        "t": args.t,
        "reverse_steps": steps,
        "respace": args.respace,
        "noise_std": noise_std_at(base, args.t),
        "sparse_set": args.sparse_set,
        "checkpoint": ckpt,
        "config": config,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "precision": stats["precision"],
        "quantize": args.quantize,
        "device": str(device),
        "processes": world,
        "images": len(data),
        "seconds": seconds,
        # this process's work over this process's time: batches resumed from disk count in neither
        "images_resumed": stats["images_resumed"],
        "image_steps_per_s": stats["images_done"] * steps / max(seconds, 1e-9) if stats["images_done"] else None,
        "mean_abs_change": diff.abs().mean().item(),
        "mean_psnr_db": psnr_db(purified.images, data.images),
        "command": " ".join(sys.argv),
    }


def _grid(path: Path, data: ImageSet, purified: ImageSet, input_name: str, per_class: int = 1) -> None:
    picks = []
    for c in range(10):
        idx = torch.nonzero(data.labels == c).flatten()[:per_class]
        picks += idx.tolist()
    if not picks:
        return
    a, b = data.images[picks], purified.images[picks]
    save_image_grid(path, [a, b, amplified_difference(a, b)], [input_name, "purified", "|difference|"])


if __name__ == "__main__":
    main()
