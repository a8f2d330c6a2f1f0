"""ECLIPSE stage 2: train a victim on poisoned, purified or ISS-compressed data.

    python train.py --poison EM --arch resnet18            # no defence: crop + flip on the poisoned set
    python train.py --poison EM --arch resnet18 --pure     # ECLIPSE: purified set + corruption compensation
    python train.py --poison EM --defense grayscale        # ISS-G baseline (ISS-J: --defense jpeg)
    python train.py --poison EM --defense jpeg --iss_recipe iss   # ISS-J with ISS's own recipe
    python train.py --poison EM --defense at               # adversarial training (PGD-AT, L∞ 8/255)
    python train.py --poison EM --defense cutmix           # also cutout, mixup; op: Orthogonal Projection
    python train.py --poison clean                         # clean CIFAR-10 training set
    python train.py --dataset cifar100 --poison clean      # another dataset: cifar100 svhn gtsrb tinyimagenet imagefolder

Appends the reference's row to results.csv (its 8 columns, no header), the same row with
our extra columns to results_extra.csv (with a header), and writes runs/train/<run>/result.json (configuration, per-epoch curves, final test accuracy),
curves.png and train.log. An interrupted run resumes from its last epoch.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import io
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict

import torch
import torch.nn as nn

from models import CLASSIFIERS, build_classifier
from utils.adversarial import pgd_linf
from utils.augment import (
    compensation_augment,
    cutmix,
    cutout_augment,
    grayscale,
    jpeg,
    mixup,
    no_augment,
    standard_augment,
)
from utils.baselines.keys import DEFENSE_KEYS, DEFENSE_OPTIONS
from utils.baselines.projection import orthogonal_projection
from utils.compat import legacy_precision
from utils.data import ImageSet, class_balanced_subset
from utils.datasets import DATASET_KEY, data_source, dataset_spec, load_dataset, load_poisoned, read_dataset_pkl
from utils.diffusion.checkpoints import DEFAULT_EMA_RATE, checkpoint_name, ema_checkpoints
from utils.download import eclipse_manual, work_dir_flag
from utils.fileio import (
    UserError,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    cli_main,
    read_state_json,
    setup_logging,
)
from utils.options import (
    BF16,
    CLEAN_SUBSET,
    DEVICE,
    DOWNLOAD,
    FRACTION,
    GT0,
    NONNEG,
    POSITIVE,
    PRECISION,
    SUBSET,
    SUBSET_SEED,
    ArgParser,
    Key,
    Range,
    add_keys_to_argparser,
)
from utils.paths import diff_ckpt_dir, purified_file, work_dir
from utils.plots import history_series, save_curves
from utils.precision import precision_from_args, prefer_channels_last
from utils.run_state import RunFolder, check_name, lock_path
from utils.runtime import resolve_device, seed_everything, set_deterministic
from utils.trainer import Perturb, TrainConfig, train_classifier

RESULTS_COLUMNS = ["pure", "arch", "poison", "sparse_set", "t", "p", "std", "acc"]
EXTRA_COLUMNS = ["defense", "width", "epochs", "n_train", "seed", "run"]
ROWS_RECORD = "results_rows.json"  # in the run folder: where its rows of the results files are

# ISS's own victim recipe (its main.py: SGD lr 0.1, momentum 0.9, batch 128, weight decay 5e-4,
# 60 epochs, CosineAnnealingLR stepped per epoch, one forward per step), --iss_recipe iss
ISS_RECIPE: dict[str, object] = {"epochs": 60, "schedule": "cosine", "weight_decay": 5e-4, "bn_updates": 1}


KEYS: dict[str, Key] = {
    # the reference's flags and defaults
    "lr": Key(0.1, "SGD learning rate (peak lr with --schedule onecycle)", range=GT0),
    "epochs": Key(80, "training epochs (--iss_recipe iss: 60)", range=POSITIVE),
    "arch": Key("resnet18", "victim architecture", choices=tuple(CLASSIFIERS)),
    "poison": Key("EM", "poisoned_data/<dataset>/<POISON>.pkl, or 'clean'"),
    "batch_size": Key(128, "training batch size", range=POSITIVE),
    "t": Key(100, "t* of the purified set (with --pure)", range=POSITIVE),
    "iter": Key(250000, "diffusion iteration of the purified set (with --pure)", range=NONNEG),
    "seed": Key(0, "seed of the initialisation, data order and augmentation"),
    "std": Key(0.05, "compensation: Gaussian noise std on [0, 1]", range=NONNEG),
    "p": Key(0.4, "compensation: random grayscale probability", range=FRACTION),
    "sparse_set": Key("test2000ps8000", "sparse set (diffusion run name) of the purified set (with --pure)"),
    "pure": Key(False, "ECLIPSE: train on the purified set with corruption compensation", flag=True),
    "train_augment": Key(
        "crop_flip",
        "the augmentation under every defence's own (compensation, Cutout, ...): crop_flip = RandomCrop(32, 4) "
        "+ flip, the reference's; none = no crop or flip, as the backdoor attacks' CPU overlay trains "
        "(at 5000 images crop + flip keeps BadNets' patch from being learned)",
        choices=("crop_flip", "none"),
    ),
    # additions
    "defense": Key(
        "none",
        "baseline defences: ISS (jpeg / grayscale), adversarial training (at: PGD-AT, Madry et al.), the "
        "augmentations cutout / mixup / cutmix, op: Orthogonal Projection (Sandoval-Segura et al.)",
        choices=("none", "jpeg", "grayscale", "at", "cutout", "mixup", "cutmix", "op"),
    ),
    "iss_recipe": Key(
        "eclipse",
        "victim recipe (not with --pure): eclipse = ECLIPSE's, which its ISS numbers used (80 epochs, constant lr, "
        "no weight decay); iss = ISS's own code (60 epochs, cosine, weight decay 5e-4, one forward per step); "
        "--epochs, --schedule, --weight_decay and --bn_updates replace its values",
        choices=("eclipse", "iss"),
    ),
    "jpeg_quality": Key(10, "JPEG quality of --defense jpeg (ISS-J)", range=Range(1, 100)),
    **DEFENSE_OPTIONS,
    "width": Key(64, "first-stage channels (64 = paper; 16 = CPU-scale variant)", range=POSITIVE),
    "weight_decay": Key(0.0, "SGD weight decay (the reference uses none; --iss_recipe iss: 5e-4)", range=NONNEG),
    "schedule": Key(
        "constant",
        "learning-rate schedule (the reference: constant; --iss_recipe iss: cosine)",
        choices=("constant", "cosine", "onecycle"),
    ),
    "test_every": Key(5, "epochs between test-accuracy evaluations (and always the last)", range=POSITIVE),
    "subset": CLEAN_SUBSET,
    "subset_seed": SUBSET_SEED,
    "test_subset": Key(None, "evaluate on a class-balanced subset of the test set", int, True, range=SUBSET),
    "quantize": Key("truncate", "compensation re-quantisation", choices=("truncate", "round")),
    "drop_last": Key(
        False, "drop the last partial batch of each epoch (the reference keeps it: 391 steps of 128 on 50,000)"
    ),
    "bn_updates": Key(
        2,
        "BatchNorm statistics updates per step: 2 = the reference train.py's two forwards per step "
        "(as BN momentum 0.19), 1 = one forward (momentum 0.1; --iss_recipe iss)",
        choices=(1, 2),
    ),
    "deterministic": Key(
        True, "cuDNN deterministic, no benchmark (the reference's same_seeds); false: fastest kernels"
    ),
    "precision": PRECISION,
    "bf16": BF16,
    "channels_last": Key(None, "null: where it is faster on the device (README, Precision)", bool, nullable=True),
    "device": DEVICE,
    "dataset": DATASET_KEY,
    "data_root": Key(
        None, "the dataset's root (else $<DATASET>_ROOT, e.g. $CIFAR10_ROOT, else data/<dataset>)", nullable=True
    ),
    "download": DOWNLOAD,
    "work_dir": Key(None, "folder holding poisoned_data/, purified_data/, runs/, results.csv", nullable=True),
    "run_name": Key(None, "folder name under runs/train/ (default: derived from the settings)", nullable=True),
    "overwrite": Key(False, "redo a finished run with the same name", flag=True),
}
# options stored only where they differ from these values (CIFAR-10, crop + flip), so the runs
# made before they existed keep their settings
STORED_IF_CHANGED = {"dataset": "cifar10", "train_augment": "crop_flip"}
# the victim recipes --iss_recipe chooses between; an option given on the command line replaces its
# value. eclipse: the defaults above, ECLIPSE's one training recipe (its paper, Sec. 4.1: SGD 0.9,
# lr 0.1, batch 128, 80 epochs; the reference train.py: no schedule, no weight decay, two forwards
# per step), which its Table 1's ISS-G / ISS-J numbers were trained with (they differ from ISS's own
# README, e.g. EM 88.42 / 78.35 against 93.01 / 81.50). iss: ISS's main.py.
RECIPES: dict[str, dict[str, object]] = {"eclipse": {k: KEYS[k].default for k in ISS_RECIPE}, "iss": ISS_RECIPE}


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_keys_to_argparser(p, KEYS)
    a = p.parse_args(argv)
    # the options given on the command line: parsed again with the recipe's options defaulting to None
    p.set_defaults(**dict.fromkeys(ISS_RECIPE, None))
    given = p.parse_args(argv)
    if a.pure and a.defense != "none":
        raise UserError("--pure (ECLIPSE) and --defense are alternative defences; pick one")
    if a.pure and a.iss_recipe != "eclipse":
        raise UserError("--iss_recipe iss is the ISS baselines' recipe; --pure (ECLIPSE) trains with ECLIPSE's")
    resolve_recipe(a, given)
    if a.run_name is None:
        mode = "pure" if a.pure else a.defense + ("-iss" if a.iss_recipe == "iss" else "")
        mode += "-noaug" if a.train_augment == "none" else ""
        a.run_name = f"{a.poison}-{mode}-{a.arch}" + (f"-w{a.width}" if a.width != 64 else "") + f"-s{a.seed}"
        if a.subset:
            a.run_name += f"-n{a.subset}"
        if a.dataset != "cifar10":
            a.run_name = f"{a.dataset}-{a.run_name}"
    for flag in ("poison", "sparse_set", "run_name"):
        check_name(getattr(a, flag), f"--{flag}")
    return a


def resolve_recipe(args: argparse.Namespace, given: argparse.Namespace) -> None:
    """Each recipe option not given on the command line (None in ``given``) takes the
    ``--iss_recipe`` recipe's value."""
    for key, value in RECIPES[args.iss_recipe].items():
        if getattr(given, key) is None:
            setattr(args, key, value)


def load_training_set(args, work) -> tuple[ImageSet, str]:
    if args.pure:
        path = purified_file(work, args.sparse_set, args.t, args.iter, args.poison, args.dataset)
        if not path.is_file():
            other = args.dataset != "cifar10"  # ECLIPSE published CIFAR-10's purified sets only
            raise UserError(
                f"purified dataset not found: {path}; make it with `python purification.py --poison {args.poison} "
                f"--t {args.t} --sparse_set {args.sparse_set} --sparse_diff_model {_ema_name(work, args)}"
                + (f" --dataset {args.dataset}" if other else "")
                + f"{work_dir_flag(work)}`"
                + ("" if other else ", " + eclipse_manual("purified"))
            )
        return read_dataset_pkl(path, dataset_spec(args.dataset, args.data_root, args.download)), str(path)
    return load_poisoned(work, args.poison, args.data_root, args.subset, args.subset_seed, args.download, args.dataset)


def _ema_name(work, args) -> str:
    """The EMA checkpoint of iteration ``--iter`` that exists in the sparse set's folder (any
    rate, either spelling), else the name train_diffusion.py writes at its default rate."""
    found = ema_checkpoints(diff_ckpt_dir(work, args.sparse_set, args.dataset), args.iter)
    return found[0].name if found else checkpoint_name("ema", args.iter, DEFAULT_EMA_RATE)


@cli_main
def main(argv=None) -> None:
    args = parse_args(argv)
    work = work_dir(args.work_dir)
    run = work / "runs" / "train" / args.run_name
    check_name(args.run_name, "--run_name", folder=run.parent)  # the run folder and its lock fit the file system
    device = resolve_device(args.device)
    precision = precision_from_args(args, device, "victim")
    channels_last = prefer_channels_last(device) if args.channels_last is None else args.channels_last
    runtime_only = ("device", "overwrite", "work_dir", "data_root", "download", "bf16")
    # iss_recipe is stored as what it resolved to (epochs, schedule, weight_decay, bn_updates)
    # a defence's options only where they act, so the other defences' settings stay as they were
    unused = [k for d, keys in DEFENSE_KEYS.items() if d != args.defense for k in keys]
    unused += [k for k, v in STORED_IF_CHANGED.items() if getattr(args, k) == v]
    settings = {k: v for k, v in vars(args).items() if k not in (*runtime_only, "iss_recipe", *unused)}
    settings.update(precision=precision.name, channels_last=channels_last)
    if args.defense == "cutout":  # earlier versions filled the square with black: not the same run
        settings["cutout_fill"] = "mean"
    # an image folder's resolved root and listing: another folder with the same flags is another run
    settings.update(data_source(args.dataset, args.data_root, args.download))
    # an interrupted run records its settings too, so a re-run never resumes another's checkpoint;
    # a resumed run keeps the precision and layout it was started with
    hint = "pass --run_name NAME or --overwrite"
    folder = RunFolder(
        run,
        settings,
        overwrite=args.overwrite,
        hint=hint,
        upgrade=legacy_precision,
        keep=("precision", "channels_last"),
        keep_how=hint,
    )
    # checked before the inputs are read: a finished run answers without them
    old = folder.read("result.json")
    same = folder.check(old.get("settings") if old else folder.read())
    if old and same and not args.overwrite:
        print(f"{run} is finished: test accuracy {old['final_test_acc']:.2f}% (pass --overwrite to redo it)")
        return
    # every input is checked (and read) before the run folder is made
    train, source = load_training_set(args, work)
    test = load_dataset(args.dataset, "test", args.data_root, download=args.download)
    with folder:
        record = run / ROWS_RECORD  # kept: the run redone replaces its rows of the results files
        rows = record.read_bytes() if record.is_file() else None
        folder.open(fresh=bool(old))  # a finished run redone (--overwrite) starts afresh
        if rows is not None and not record.exists():
            atomic_write_bytes(record, rows)
        _run(args, work, run, settings, device, train, source, test, precision)


def _run(args, work, run, settings: dict, device, train: ImageSet, source: str, test: ImageSet, precision) -> None:
    result_path = run / "result.json"
    data = dataset_spec(args.dataset, args.data_root)
    num_classes = data.num_classes
    op_info = None  # --defense op: the linear model's accuracy and the share clipped, for result.json
    log = setup_logging(run / "train.log", "train")
    seed_everything(args.seed)
    set_deterministic(args.deterministic)

    if args.defense == "grayscale":
        train = ImageSet(grayscale(train.images), train.labels)
    elif args.defense == "jpeg":
        train = ImageSet(jpeg(train.images, args.jpeg_quality), train.labels)
    elif args.defense == "op":
        fit = {"epochs": args.op_epochs, "lr": args.op_lr, "batch_size": args.op_batch_size, "seed": args.seed}
        train, op_info = orthogonal_projection(train, num_classes, log=log.info, **fit)
        log.info(f"OP: linear model {op_info['linear_train_acc']:.2f}% on the training set")
        log.info(f"OP: {op_info['clipped_share']:.4%} of the projected values clipped to [0, 1]")
    base = standard_augment if args.train_augment == "crop_flip" else no_augment
    augment = compensation_augment(args.p, args.std, args.quantize, base) if args.pure else base
    if args.defense == "cutout":
        augment = cutout_augment(args.cutout_length, args.cutout_holes, fill=data.mean, base=base)
    mix = mixup(args.mixup_alpha) if args.defense == "mixup" else None
    mix = cutmix(args.cutmix_beta, args.cutmix_prob) if args.defense == "cutmix" else mix
    if args.test_subset:
        test = test.subset(class_balanced_subset(test.labels, args.test_subset, 0))
    model = build_classifier(args.arch, num_classes, args.width)
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=0.9,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        test_every=args.test_every,
        precision=settings["precision"],
        channels_last=settings["channels_last"],
        seed=args.seed,
        drop_last=args.drop_last,
        bn_updates=args.bn_updates,
    )
    log.info(
        f"[Pure:{args.pure}] [Defense:{args.defense}] [Arch:{args.arch} w{args.width}] [Poison:{args.poison}] "
        f"[t*:{args.t}] [sparse_set:{args.sparse_set}] [Grayscale p:{args.p}] [Gaussian std:{args.std}] "
        f"train {source} ({len(train)} images), test {len(test)} images, device {device}"
    )
    log.info(precision.line(used=cfg.precision))
    if args.defense == "at":
        log.info(f"PGD-AT: L∞ {args.at_eps}/255, {args.at_steps} steps of {args.at_step_size}/255, random start")
    t0 = time.time()
    history = train_classifier(
        model,
        train,
        augment,
        cfg,
        device,
        {"test_acc": test},
        run / "checkpoint.pt",
        log=log.info,
        desc=args.run_name,
        perturb=adversarial_perturb(model, args, cfg.bf16) if args.defense == "at" else None,
        mix=mix,
    )
    acc = history[-1]["test_acc"]
    seconds = time.time() - t0
    # result.json last: it marks the run finished (utils.run_state), so a kill before it
    # leaves a run that resumes from checkpoint.pt, removed only once the run is finished
    atomic_torch_save(model.state_dict(), run / "model.pt")
    save_curves(run / "curves.png", history_series(history, ["train_acc", "test_acc"]), args.run_name)
    _append_results(work, run, args, acc, len(train))
    atomic_write_json(
        result_path,
        {
            "settings": settings,
            "train_source": source,
            "n_train": len(train),
            "n_test": len(test),
            "device": str(device),
            "train_config": asdict(cfg),
            "history": history,
            "final_test_acc": acc,
            **({"op": op_info} if op_info else {}),
            "seconds": seconds,
            "command": " ".join(sys.argv),
        },
    )
    (run / "checkpoint.pt").unlink(missing_ok=True)
    log.info(f"Test Acc: {acc:.2f}  ({seconds:.0f} s) -> {result_path}")
    print(f"Finished Training: test accuracy {acc:.2f}%")


def adversarial_perturb(model: nn.Module, args: argparse.Namespace, bf16: bool) -> Perturb:
    """PGD-AT's inner maximisation: each augmented batch replaced by its L∞ PGD adversary
    (random start drawn from the augmentation generator, so a resumed run replays it),
    found with the model in eval mode as Tao et al.'s AT code does."""

    def perturb(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return pgd_linf(model, x, y, args.at_eps, args.at_step_size, args.at_steps, g, bf16)

    return perturb


def _append_results(work, run, args, acc: float, n_train: int) -> None:
    """``results.csv``: the reference's row exactly (8 columns, no header, the accuracy
    unrounded, written by ``csv.writer``); ``results_extra.csv``: that row plus our
    columns, with a header. A ``results.csv`` of the earlier layout (header, 14 columns)
    becomes ``results_extra.csv`` first, its reference columns copied back.

    Keyed by run: where each row goes (line and text) is recorded in ``run``'s
    ``results_rows.json`` before it is appended, under a lock shared by every train.py
    writing to ``work``; a re-run of the run (after a kill before result.json, or with
    --overwrite) replaces its own rows instead of adding more."""
    path, extra = work / "results.csv", work / "results_extra.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    row = [args.pure, args.arch, args.poison, args.sparse_set, args.t, args.p, args.std, acc]
    record = run / ROWS_RECORD
    try:
        with _results_lock(path):
            _migrate_results(path, extra)
            how = f"delete it, and {path} may then get a second row of this run"
            rows = read_state_json(record, how) if record.is_file() else {}
            rows = rows if isinstance(rows, dict) else {}
            if not extra.exists():
                _append_line(extra, _csv_line(RESULTS_COLUMNS + EXTRA_COLUMNS))
            lines = {
                path: _csv_line(row),
                extra: _csv_line(row + [args.defense, args.width, args.epochs, n_train, args.seed, args.run_name]),
            }
            for file, line in lines.items():
                data = file.read_bytes() if file.is_file() else b""
                if _replace_row(file, data, rows.get(file.name), line):
                    continue
                sep = "\r\n" if data and not data.endswith(b"\n") else ""  # a last line without its end
                rows[file.name] = [data.count(b"\n") + bool(sep), line]
                atomic_write_json(record, rows)  # before the row: a kill after it leaves a row found again
                _append_line(file, sep + line)
    except OSError as e:  # a full disk fails the write itself, with no path in the error
        raise OSError(e.errno, e.strerror, e.filename or str(path)) from e


def _csv_line(row: list) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerow(row)
    return buf.getvalue()


def _append_line(file, line: str) -> None:
    with open(file, "a", newline="") as f:
        f.write(line)


def _replace_row(file, data: bytes, recorded, line: str) -> bool:
    """Put ``line`` at the line where ``recorded`` (``[line index, text]``) says this run's row
    is in ``file`` (holding ``data``); False when the row is no longer there."""
    if not (isinstance(recorded, list) and len(recorded) == 2):
        return False
    at, old = recorded
    lines = data.split(b"\n")
    if not (isinstance(at, int) and isinstance(old, str) and 0 <= at < len(lines) - 1):
        return False
    if lines[at].rstrip(b"\r") != old.encode().rstrip(b"\r\n"):  # an editor may have changed the line ends
        return False
    new = line.encode().rstrip(b"\r\n") + (b"\r" if lines[at].endswith(b"\r") else b"")
    if new != lines[at]:
        lines[at] = new
        atomic_write_bytes(file, b"\n".join(lines))
    return True


@contextmanager
def _results_lock(path):
    """Every train.py writing ``path`` (and its extra file) waits here for the others."""
    fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # a file system without flock: one run at a time is the user's to keep
        yield
    finally:
        os.close(fd)


def _migrate_results(path, extra) -> None:
    if not path.is_file():
        return
    text = path.read_text()
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or rows[0] != RESULTS_COLUMNS + EXTRA_COLUMNS:
        return
    # extra first: after a crash between the two writes the old file is still recognised
    if not extra.exists():
        atomic_write_text(extra, text)
    buf = io.StringIO()
    csv.writer(buf).writerows(r[: len(RESULTS_COLUMNS)] for r in rows[1:])
    atomic_write_text(path, buf.getvalue())


if __name__ == "__main__":
    main()
