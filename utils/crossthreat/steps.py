"""The cross-threat steps that are no script of their own (``bench/cross_threat_table.py
--step export|elixir|evaluate``): the export of an attack's poisoned training set, DataElixir's
purification rounds over a clean-label poison, and a victim's BA / ASR / RA.

**Which DataElixir image.** DataElixir keeps every candidate of a sample (the original, then
the last ``last_steps_m`` samples of each of its ``rounds_n`` rounds) and, for a sample whose
label it changes, picks the candidate closest to the original (SSIM and the backdoored
model's features) among those with the majority label; a sample whose label does not change
trains on its original image. Against a clean-label availability poison no label is wrong, so
that rule would keep every original, poison included, and its distance needs a model trained
on the poisoned data. As a purifier it is taken here as what its rounds make: the last
round's last kept sample, the most purified candidate (candidate ``k - 1``; the bytes the
attack scripts' candidate store holds there for the same images, seed and chunk size).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from models import build_classifier
from utils.chunk_store import ChunkStore, Tick
from utils.crossthreat.plan import (
    CLEAN,
    attack_data_file,
    check_cifar10,
    elixir_config,
    elixir_file,
    elixir_images,
    elixir_settings,
    eval_file,
    record_name,
)
from utils.data import NUM_CLASSES, ImageSet, read_eclipse_pkl, write_eclipse_pkl
from utils.dataelixir.attack_data import BackdoorData
from utils.dataelixir.defence import build_chunk
from utils.dataelixir.keys import flow_precisions
from utils.dataelixir.models import diffusion_ckpt, load_diffusion, purification_rounds
from utils.dataelixir.outputs import load_attack_data
from utils.dataelixir.phases import AttackResult
from utils.datasets import load_poisoned
from utils.diffusion.gaussian_diffusion import truncated_steps
from utils.diffusion.purify import PartFiles, chunk_seed
from utils.fileio import (
    UserError,
    atomic_torch_save,
    atomic_write_json,
    check_finite,
    file_fingerprint,
    read_state_json,
    safe_torch_load,
)
from utils.options import load_yaml_file
from utils.paths import DATASET, poisoned_file, record_dir
from utils.plots import amplified_difference, save_image_grid
from utils.precision import keep_stored
from utils.run_state import OutputLock
from utils.runtime import resolve_device
from utils.trainer import accuracy

Log = Callable[[str], None]


def export_attack_set(work: Path, attack: str) -> Path:
    """The attack record's poisoned training set (the attacker's labels) as
    ``<work>/poisoned_data/cifar10/<attack>.pkl``; the record's configuration and the poisoned
    indices go beside it in ``<attack>.json`` (written first: the .pkl marks the step done)."""
    data_file = attack_data_file(work, attack)
    config_file = record_dir(work, record_name(attack)) / "config.yaml"
    if not data_file.is_file() or not config_file.is_file():
        raise UserError(f"{data_file} not found: run attack/{attack}.py with --stop_after attack first")
    attack_config = load_yaml_file(config_file, "record configuration")
    check_cifar10(attack_config.get("dataset", DATASET), str(config_file))  # ECLIPSE's .pkl holds CIFAR-10
    bd, train_idx = load_attack_data(data_file)
    out = poisoned_file(work, attack)
    poisoned = torch.nonzero(bd.poison_indicator).flatten()
    info = {
        "attack": attack,
        "record": str(data_file.parent),
        "images": len(bd.train),
        "poisoned": len(poisoned),
        "poisoned_indices": poisoned.tolist(),
        "cifar10_train_indices": train_idx.tolist(),
        "attack_config": attack_config,
    }
    out.unlink(missing_ok=True)
    atomic_write_json(out.with_suffix(".json"), info)
    write_eclipse_pkl(out, bd.train)
    return out


# --------------------------------------------------------------------------- (B) DataElixir's rounds


def elixir_purify(
    work: Path,
    poison: str,
    eclipse_work: Path,
    dataelixir_work: Path,
    overlay: str,
    *,
    subset: int,
    overwrite: bool = False,
    device: str = "auto",
    log: Log = print,
) -> Path:
    """DataElixir's rounds over every image of the demo's ``poison`` (``clean``: the demo's clean
    subset of ``subset`` images, as its clean victims draw it) (the overlay's settings,
    chunks of ``purify_batch_size`` as the attack scripts build their candidates), keeping the
    last round's last kept sample; resumable chunk by chunk (other settings are refused, or
    discarded with ``overwrite``). Writes the purified set with a ``.json`` and a ``.png``."""
    cfg = elixir_config(overlay)
    source = poisoned_file(eclipse_work, poison)
    if poison != CLEAN and not source.is_file():
        raise UserError(f"poisoned set not found: {source}; craft it with `python demo.py --poisons {poison}`")
    dev = resolve_device(device)
    cfg = cfg.with_precisions({k: p.name for k, p in flow_precisions(cfg, dev).items()})
    ddpm, _ = diffusion_ckpt(cfg, dataelixir_work)
    out = elixir_file(work, cfg, poison)
    out.parent.mkdir(parents=True, exist_ok=True)
    with OutputLock(out):
        if out.is_file() and not overwrite:
            log(f"{out} exists; skipped (pass --overwrite to redo it)")
            return out
        settings = elixir_settings(cfg, ddpm, elixir_images(eclipse_work, poison, subset))
        if poison == CLEAN:
            data, described = load_poisoned(eclipse_work, CLEAN, subset=subset)
        else:
            data, described = read_eclipse_pkl(source), str(source)
        model, base, _ = load_diffusion(cfg, dataelixir_work, dev)
        parts = out.parent / f".{out.stem}.parts"
        header = {**settings, "n": len(data), "precision": cfg.precision_of("ddpm_rounds")}
        files = PartFiles(parts)
        store = ChunkStore(parts, len(data), cfg.purify_batch_size, files)
        if not overwrite:  # a resumed store keeps the precision its chunks were made with
            keep_stored(header, store.read_header(), parts, log, ("precision",))
        store.prepare(header, overwrite=overwrite, log=log)
        rounds = {**purification_rounds(cfg), "bf16": header["precision"] == "bf16"}
        t0 = time.time()

        def work_on(c: int, tick: Tick) -> None:
            rows = store.rows(c)
            x = data.images[rows].to(dev)
            g = torch.Generator(device=dev).manual_seed(chunk_seed(cfg.random_seed, c))
            cands = build_chunk(model, base, x, **rounds, generator=g, on_step=lambda: tick(len(x)))
            atomic_torch_save(cands[:, -1].contiguous(), files.path(c))

        steps = len(truncated_steps(cfg.steps_T, cfg.purify_respace, cfg.last_steps_m if cfg.purify_dense_tail else 0))
        done = store.build(work_on, what="DataElixir rounds", units_per_item=cfg.rounds_n * steps, log=log)
        purified = ImageSet(_read_parts(store, files, data.images.shape), data.labels)
        seconds = time.time() - t0
        summary = {"poison": poison, "source": described, "ddpm_file": str(ddpm), "settings": settings}
        summary |= {"precision": header["precision"], "images": len(data), "images_done": done, "seconds": seconds}
        summary |= {"mean_abs_change": (purified.images.float() - data.images.float()).abs().mean().item()}
        atomic_write_json(out.with_suffix(".json"), summary)
        a, b = data.images[:10], purified.images[:10]
        save_image_grid(
            out.with_suffix(".png"),
            [a, b, amplified_difference(a, b)],
            ["clean" if poison == CLEAN else "poisoned", "purified", "|difference|"],
        )
        write_eclipse_pkl(out, purified)  # last: it marks the step done
        shutil.rmtree(parts, ignore_errors=True)
    log(f"wrote {out} ({seconds:.0f} s)")
    return out


def _read_parts(store: ChunkStore, files: PartFiles, shape: torch.Size) -> torch.Tensor:
    batches = []
    for c in range(store.n_chunks):
        path, rows = files.path(c), store.rows(c)
        part = safe_torch_load(path, "purified chunk")
        if (
            not isinstance(part, torch.Tensor)
            or part.dtype != torch.uint8
            or part.shape != (rows.stop - rows.start, *shape[1:])
        ):
            raise UserError(f"{path} does not hold chunk {c}; delete {store.root} and re-run")
        batches.append(part)
    return torch.cat(batches)


# --------------------------------------------------------------------------- (A) ASR / RA


def backdoor_metrics(model: torch.nn.Module, bd: BackdoorData, device: torch.device, bf16: bool) -> dict[str, float]:
    """BA / ASR / RA of ``model`` on the attack's test sets, as the attack scripts measure them
    (``AttackResult.tests``: the clean set; the triggered non-target images with the target
    label; the same images with their true labels)."""
    return {k: accuracy(model, d, device, bf16) for k, d in AttackResult(bd, torch.empty(0)).tests.items()}


def evaluate_victim(work: Path, victim: str, attack: str, device: str = "auto") -> dict[str, Any]:
    """A finished train.py victim's ASR and RA on ``attack``'s record, with its BA (train.py's
    test accuracy) and BA on the record's clean test images; written to ``<work>/eval/<victim>.json``."""
    run = work / "runs" / "train" / victim
    if not (run / "result.json").is_file() or not (run / "model.pt").is_file():
        raise UserError(f"{run}: no finished victim (result.json and model.pt); run its train.py step first")
    result = read_state_json(run / "result.json", "re-run that victim with --overwrite")
    settings = result["settings"]
    # train.py stores the dataset only where it is not CIFAR-10, the one the table supports
    check_cifar10(settings.get("dataset") or DATASET, str(run / "result.json"))
    t0 = time.time()
    dev = resolve_device(device)
    model = build_classifier(settings["arch"], NUM_CLASSES, settings["width"])  # CIFAR-10's, checked above
    state = safe_torch_load(run / "model.pt", "victim model")
    check_finite(state, run / "model.pt")
    model.load_state_dict(state)
    bd, _ = load_attack_data(attack_data_file(work, attack))
    m = backdoor_metrics(model.to(dev), bd, dev, settings.get("precision") == "bf16")
    out = {
        "victim": victim,
        "attack": attack,
        "model": file_fingerprint(run / "model.pt"),
        "BA": result["final_test_acc"],
        "BA_attack_test": m["BA"],
        "ASR": m["ASR"],
        "RA": m["RA"],
        "n_test": result["n_test"],
        "n_attack_test": len(bd.test_clean),
        "n_triggered": len(bd.test_bd),
        "seconds": time.time() - t0,
    }
    atomic_write_json(eval_file(work, victim), out)
    return out
