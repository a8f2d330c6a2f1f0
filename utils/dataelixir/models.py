"""The models of the attack scripts' flow: the classifier (its architecture, augmentation and
training settings), its predictions on candidate sets, and DataElixir's DDPM with which the
candidates are built."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import build_classifier
from utils.augment import crop_rotate_flip, no_augment, standard_augment
from utils.dataelixir import defence as de
from utils.dataelixir.keys import FlowConfig
from utils.datasets import check_image_size, get_dataset
from utils.diffusion.checkpoints import resolve_checkpoint
from utils.diffusion.factory import Purifier, diffusion_train_command, load_purifier
from utils.download import DDPM_CHECKPOINTS, ddpm_checkpoint
from utils.fileio import UserError, check_finite, file_fingerprint, safe_torch_load
from utils.options import resolve_path
from utils.progress import progress
from utils.trainer import Normalized, TrainConfig, predict

# the benchmarks pass a record's config.yaml as read (a dict); the flow its FlowConfig


def build_model(cfg: FlowConfig) -> torch.nn.Module:
    """A fresh classifier of the configured architecture and width for the dataset's classes,
    normalising its input with the dataset's statistics."""
    data = cfg.data_spec()
    net = build_classifier(cfg.model, data.num_classes, cfg.model_width)
    if not hasattr(net, "features"):
        raise UserError(f"model {cfg.model} has no pooled-feature output, which DataElixir's image selection needs")
    return Normalized(net, data.mean, data.std)


def train_augment(cfg: FlowConfig) -> Callable:
    """The training augmentation the keys ``train_augment`` etc. select."""
    if cfg.train_augment == "crop_flip":
        return standard_augment
    if cfg.train_augment == "crop_rotate_flip":
        return crop_rotate_flip(
            cfg.random_crop,
            cfg.random_rotation,
            cfg.crop_prob,
            cfg.rotation_prob,
            cfg.rotation_interp,
            cfg.rotation_image_prob,
        )
    return no_augment


def train_config(cfg: FlowConfig, lr: float, n_train: int, seed_offset: int) -> TrainConfig:
    """The settings of one of the flow's three classifier trainings."""
    multistep = cfg.lr_scheduler == "MultiStepLR"
    return TrainConfig(
        epochs=cfg.epochs,
        batch_size=min(cfg.batch_size, max(1, n_train)),
        lr=lr,
        momentum=cfg.sgd_momentum,
        weight_decay=cfg.wd,
        schedule="multistep" if multistep else "cosine",
        milestones=cfg.steplr_milestones if multistep else (),
        gamma=cfg.steplr_gamma if multistep else 0.1,
        test_every=1,
        precision=cfg.precision_of("backdoor_training"),
        channels_last=True,
        seed=cfg.random_seed + seed_offset,
    )


def load_model(cfg: FlowConfig, path: Path, device: torch.device) -> torch.nn.Module:
    """A saved classifier (weights-only, finite), in eval mode on ``device``."""
    model = build_model(cfg)
    state = safe_torch_load(path, "classifier")
    check_finite(state, path)
    model.load_state_dict(state)
    return model.to(device).eval()


@torch.no_grad()
def predict_candidates(
    model: torch.nn.Module,
    cand: np.ndarray,
    rows: np.ndarray,
    device: torch.device,
    bf16: bool,
    desc: str,
    samples_per_batch: int = 256,
) -> torch.Tensor:
    """Labels ``[len(rows), K]`` of every candidate of the listed samples."""
    k = cand.shape[1]
    out = torch.empty(len(rows), k, dtype=torch.long)
    for s in progress(range(0, len(rows), samples_per_batch), desc=desc, unit="batch", dynamic_ncols=True):
        idx = rows[s : s + samples_per_batch]
        imgs = torch.from_numpy(np.ascontiguousarray(cand[idx]))
        flat = imgs.reshape(-1, *imgs.shape[2:])
        out[s : s + len(idx)] = predict(model, flat, device, batch_size=512, bf16=bf16).argmax(1).view(len(idx), k)
    return out


def diffusion_ckpt(cfg: FlowConfig, work: Path) -> tuple[Path, str]:
    """The DDPM checkpoint path and the hint that says how to make it; raises if it is missing."""
    if cfg.diffusion_ckpt in DDPM_CHECKPOINTS:
        hint = f"Ho et al.'s DDPM {cfg.diffusion_ckpt!r} goes with diffusion_config config/ddpm/cifar10.yml"
        return ddpm_checkpoint(cfg.diffusion_ckpt), hint
    ckpt = Path(cfg.diffusion_ckpt).expanduser()
    if not ckpt.is_absolute():
        ckpt = work / ckpt
    ckpt = resolve_checkpoint(ckpt)  # either spelling of a train_diffusion.py name
    command = diffusion_train_command(cfg.diffusion_config, ckpt.parent.name, ckpt.name, dataset=cfg.dataset)
    hint = f"make one with `{command}` (a DDPM trained on the clean {get_dataset(cfg.dataset).title} training set)" + (
        ", or point diffusion_ckpt at Ho's converted model-790000.ckpt with diffusion_config config/ddpm/cifar10.yml"
        if cfg.dataset == "cifar10"  # Ho et al. published CIFAR-10's DDPM only
        else ""
    )
    if not ckpt.is_file():
        raise UserError(f"diffusion checkpoint not found: {ckpt}; {hint}")
    return ckpt, hint


def load_diffusion(cfg: FlowConfig, work: Path, device: torch.device) -> Purifier:
    """The DDPM (weights-only, strict, finite), its unspaced diffusion and its spec."""
    config = resolve_path(cfg.diffusion_config, "diffusion config")
    ckpt, hint = diffusion_ckpt(cfg, work)
    t_error = "steps_T + noise_offset = {t} exceeds the {steps} diffusion steps"
    purifier = load_purifier(config, ckpt, device, missing=hint, t=cfg.steps_T + cfg.noise_offset, t_error=t_error)
    check_image_size(purifier.spec.image_size, cfg.data_spec(), config, "ddpm")
    return purifier


def purification_rounds(cfg: FlowConfig) -> dict[str, Any]:
    """The purification rounds' settings of a resolved configuration, as the keyword
    arguments of ``dataelixir.build_chunk`` (and ``construct_candidates``): the flow and
    ``bench/ddpm_keep_label.py`` purify alike."""
    return {
        "steps_T": cfg.steps_T,
        "rounds_n": cfg.rounds_n,
        "last_steps_m": cfg.last_steps_m,
        "respace": cfg.purify_respace,
        "dense_tail": cfg.purify_dense_tail,
        "noise_offset": cfg.noise_offset,
        "original_round_trip": cfg.original_round_trip,
        "bf16": cfg.precision_of("ddpm_rounds") == "bf16",
    }


def build_candidates(
    cfg: FlowConfig,
    work: Path,
    rec_dir: Path,
    images: torch.Tensor,
    device: torch.device,
    rank: int,
    world: int,
    log: Callable[[str], None],
) -> tuple[np.memmap, np.memmap]:
    """DataElixir's candidates of ``images`` in ``rec_dir/candidates`` (this rank's share)."""
    diff_model, base, _spec = load_diffusion(cfg, work, device)
    ckpt, _ = diffusion_ckpt(cfg, work)
    # every rank labels with the saved backdoored model, so the labels do not depend on
    # whether rank 0 trained it in this process (its weights then in another memory layout)
    classifier = load_model(cfg, rec_dir / "backdoored_model.pt", device)
    return de.construct_candidates(
        diff_model,
        base,
        classifier,
        images,
        rec_dir / "candidates",
        **purification_rounds(cfg),
        batch_size=cfg.purify_batch_size,
        seed=cfg.random_seed,
        labels_bf16=cfg.precision_of("candidate_labels") == "bf16",
        device=device,
        rank=rank,
        world=world,
        log=log,
        ddpm_fingerprint=file_fingerprint(ckpt),
    )
