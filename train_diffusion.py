"""Train a diffusion model on a sparse clean set (ECLIPSE §3.2) or on clean training data.

ECLIPSE: B = 2000 random clean *test* images, duplicated M = 4 times (plain duplication,
ECLIPSE Eq. 3), improved-diffusion UNet, 250K iterations:

    python train_diffusion.py --config config/eclipse/cifar10.yml           # -> diff_ckpt/cifar10/test2000ps8000/
    python train_diffusion.py --dataset tinyimagenet     # config/eclipse/tinyimagenet.yml -> diff_ckpt/tinyimagenet/...

DataElixir's DDPM (no checkpoint can be downloaded here, so it is trained on the clean
training set):

    python train_diffusion.py --config config/ddpm/cifar10.yml --source train --num_clean 50000 --replicas 1

The training recipe (optimizer, lr, weight decay, warm-up, gradient clipping, flips, EMA rate)
is the config's ``training:`` section: improved-diffusion's AdamW 1e-4 for ECLIPSE's configs,
Ho et al.'s Adam 2e-4 with 5000 warm-up steps, clipping at 1.0 and flips for
``config/ddpm/*.yml``. Each option of the same name given on the command line replaces the
config's value (and is stored with the run, like the others).

Multi-process data parallel: ``torchrun --nproc_per_node=N train_diffusion.py ...``.
Re-running the same command resumes from the newest checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import torch

from utils.compat import legacy_diffusion_training, legacy_precision
from utils.datasets import (
    DATASET_KEY,
    check_image_size,
    data_source,
    dataset_spec,
    diffusion_config_name,
    load_dataset,
)
from utils.diffusion.checkpoints import checkpoint_name
from utils.diffusion.factory import TRAINING_KEYS, create_diffusion, load_diffusion_spec
from utils.diffusion.training import DiffusionTrainConfig, load_resume_state, train_diffusion
from utils.fileio import UserError, atomic_write_json, cli_main, setup_logging
from utils.options import (
    BF16,
    DEVICE,
    DOWNLOAD,
    GT0,
    NONNEG,
    POSITIVE,
    PRECISION,
    ArgParser,
    Key,
    Range,
    add_keys_to_argparser,
)
from utils.paths import diff_ckpt_dir, work_dir
from utils.precision import precision_from_args
from utils.run_state import RunFolder, check_name
from utils.runtime import barrier, cleanup_distributed, init_distributed, resolve_device, seed_everything

KEYS: dict[str, Key] = {
    "config": Key(None, "model + diffusion YAML (default: config/eclipse/<dataset>.yml)", nullable=True),
    "dataset": DATASET_KEY,
    "source": Key("test", "split the clean images come from", choices=("test", "train")),
    "num_clean": Key(2000, "B: clean images drawn at random (with --seed)", range=POSITIVE),
    "replicas": Key(4, "M: copies of each image in the training set", range=POSITIVE),
    "sparse_set": Key(None, "run name; default <source><B>ps<B*M>, e.g. test2000ps8000", nullable=True),
    "iterations": Key(250_000, "training iterations (a re-run with more continues the run)", range=POSITIVE),
    "batch_size": Key(128, "global batch (split across torchrun processes)", range=POSITIVE),
    # the recipe: each defaults to the config's training: section (improved-diffusion's without one)
    "optimizer": Key(
        None, "adamw | adam (default: the config's training.optimizer)", nullable=True, choices=("adamw", "adam")
    ),
    "lr": Key(None, "peak learning rate (default: the config's training.lr)", float, True, range=GT0),
    "weight_decay": Key(None, "weight decay (default: the config's training.weight_decay)", float, True, range=NONNEG),
    "warmup_steps": Key(
        None, "linear lr warm-up steps, 0 = none (default: the config's training.warmup_steps)", int, True, range=NONNEG
    ),
    "grad_clip": Key(
        None,
        "gradient global-norm clip, 0 = none (default: the config's training.grad_clip)",
        float,
        True,
        range=NONNEG,
    ),
    "ema_rate": Key(
        None,
        "EMA decay of the saved ema_<rate>_<iter>.pt weights (default: the config's training.ema_rate)",
        float,
        True,
        range=Range(0, 1, low_open=True, high_open=True),
    ),
    "save_interval": Key(10_000, "iterations between checkpoints (model, EMA, optimiser)", range=POSITIVE),
    "log_interval": Key(100, "iterations between progress.csv rows", range=POSITIVE),
    "flip": Key(None, "random horizontal flip (default: the config's training.flip)", bool, True),
    "max_timestep": Key(
        None,
        "CPU-scale deviation: sample training timesteps only below this (purification uses t < t*)",
        int,
        True,
        range=POSITIVE,
    ),
    "precision": PRECISION,
    "bf16": BF16,
    "compile": Key(False, "torch.compile the UNet (see BENCHMARKS.md)"),
    "seed": Key(0, "seed of the sparse-set draw and of training"),
    "device": DEVICE,
    "data_root": Key(
        None, "the dataset's root (else $<DATASET>_ROOT, e.g. $CIFAR10_ROOT, else data/<dataset>)", nullable=True
    ),
    "download": DOWNLOAD,
    "work_dir": Key(None, "folder holding diff_ckpt/ (default: the repository)", nullable=True),
    "overwrite": Key(False, "discard an existing run with other settings", flag=True),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_keys_to_argparser(p, KEYS)
    args = p.parse_args(argv)
    if args.sparse_set is None:
        args.sparse_set = f"{args.source}{args.num_clean}ps{args.num_clean * args.replicas}"
    check_name(args.sparse_set, "--sparse_set")
    return args


def training_recipe(args: argparse.Namespace, config_training: dict) -> dict:
    """The recipe a run trains with: each ``TRAINING_KEYS`` option given on the command line,
    else the config's value."""
    return {k: config_training[k] if getattr(args, k) is None else getattr(args, k) for k in TRAINING_KEYS}


def sparse_set_indices(n_available: int, num_clean: int, seed: int) -> torch.Tensor:
    """B indices drawn uniformly at random without replacement, in ascending order."""
    if num_clean > n_available:
        raise UserError(f"--num_clean {num_clean} exceeds the {n_available} images of the split")
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(n_available, generator=g)[:num_clean]).values


@cli_main
def main(argv=None) -> None:
    args = parse_args(argv)
    data_spec = dataset_spec(args.dataset, args.data_root, args.download)
    args.config = args.config or f"config/eclipse/{diffusion_config_name(data_spec, 'eclipse')}"
    spec = load_diffusion_spec(args.config)
    check_image_size(spec.image_size, data_spec, args.config, "eclipse")
    steps = create_diffusion(spec).num_timesteps
    if args.max_timestep is not None and args.max_timestep > steps:
        raise UserError(f"--max_timestep {args.max_timestep} exceeds the diffusion's {steps} steps ({args.config})")
    device = resolve_device(args.device)
    precision = precision_from_args(args, device, "diffusion_training")
    rank, world = init_distributed(device)
    lock = ExitStack()
    try:
        if args.batch_size % world:
            raise UserError(f"--batch_size {args.batch_size} must be divisible by the {world} torchrun processes")
        out = diff_ckpt_dir(work_dir(args.work_dir), args.sparse_set, args.dataset)
        cfg = DiffusionTrainConfig(
            iterations=args.iterations,
            batch_size=args.batch_size,
            save_interval=args.save_interval,
            log_interval=args.log_interval,
            max_timestep=args.max_timestep,
            **training_recipe(args, spec.training),
            precision=precision.name,
            seed=args.seed,
        )
        settings = {
            "diffusion": spec.summary(),
            "sparse_set": {
                "source": args.source,
                "num_clean": args.num_clean,
                "replicas": args.replicas,
                "seed": args.seed,
                **({"dataset": args.dataset} if args.dataset != "cifar10" else {}),  # CIFAR-10's as before
                **data_source(args.dataset, args.data_root, args.download),  # an image folder's root and listing
            },
            "training": {
                k: v for k, v in asdict(cfg).items() if k not in ("iterations", "save_interval", "log_interval")
            },
        }
        # every input is checked before the run folder is made or an old run is discarded
        clean = load_dataset(args.dataset, args.source, args.data_root, download=args.download)
        folder = lock.enter_context(_run_folder(out, settings, args.overwrite, rank, world))
        folder.check()
        cfg.precision = settings["training"]["precision"]  # a resumed run keeps its stored precision
        # the checkpoint resumed from (checked: finite, floating-point, this many processes)
        resume = None if folder.stale else load_resume_state(out, cfg.ema_rate, world)
        idx = sparse_set_indices(len(clean), args.num_clean, args.seed)
        images = clean.images[idx].repeat(args.replicas, 1, 1, 1)  # ECLIPSE Eq. 3: D_s plus its duplicates
        folder.open(content={**settings, "command": " ".join(sys.argv)})
        log = setup_logging(out / "train.log" if rank == 0 else None, "train_diffusion")
        if rank == 0:
            atomic_write_json(
                out / "sparse_set.json", {**settings["sparse_set"], "split": args.source, "indices": idx.tolist()}
            )
            log.info(f"sparse set {args.sparse_set}: {len(idx)} {args.source} images x {args.replicas} = {len(images)}")
            log.info(f"model {spec.architecture} from {args.config}; world size {world}; device {device}")
            log.info(precision.line(used=cfg.precision))
        barrier()
        seed_everything(args.seed + rank)
        model = spec.build_model(compile=args.compile)
        diffusion = create_diffusion(spec)
        train_diffusion(model, diffusion, images, cfg, out, device, rank, world, log=log.info, resume=resume)
        if rank == 0:
            log.info(f"done: {out / checkpoint_name('ema', cfg.iterations, cfg.ema_rate)}")
    finally:
        lock.close()
        cleanup_distributed()


def _run_folder(out: Path, settings: dict, overwrite: bool, rank: int, world: int) -> RunFolder:
    """The run's folder: resumed only with the same settings, never two runs mixed in it;
    ``--overwrite`` discards the other run's checkpoints and curves (its log goes on)."""

    def upgrade(old: dict) -> dict:
        old = {k: v for k, v in old.items() if k in settings}  # run.json also holds the command
        if isinstance(old.get("training"), dict):
            old["training"] = legacy_diffusion_training(legacy_precision(old["training"]))
        return old

    return RunFolder(
        out,
        settings,
        settings_file="run.json",
        overwrite=overwrite,
        hint="choose another --sparse_set or pass --overwrite to discard it",
        damaged="pass --overwrite to discard the run in that folder, or choose another --sparse_set",
        upgrade=upgrade,
        keep=("training.precision",),
        discard_only=("*.pt", "progress.csv", "loss.png"),
        rank=rank,
        world=world,
    )


if __name__ == "__main__":
    main()
