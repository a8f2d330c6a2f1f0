"""ADP: ECLIPSE's adaptive attack — error-minimizing noise crafted through the defence.

ECLIPSE (§6) crafts min-min noise against a classifier built from its own sparse diffusion
model (the UNet with its last layer replaced by a convolution and global average pooling,
``models/unet_classifier.py``) with the corruption compensation C (crop + flip, grayscale
with p = 0.4, N(0, 0.05²) noise) applied to x + δ inside the loop, under L∞ 8/255.

The paper gives no further settings; this implementation uses EM's loop and defaults
(20 sign steps of 0.8/255 per round, 10 surrogate steps per round, stop at 99 % accuracy)
with these choices, all options: the UNet keeps the checkpoint's weights and is
fine-tuned whole with EM's optimiser (SGD lr 0.1, momentum 0.9, weight decay 5e-4, clipping
5) at batch 128 (the UNet's memory per image is many times a ResNet18's); timestep 0; one
draw of C per δ step (``--samples`` for EOT); the stop accuracy is measured on C(x + δ),
the data the defended victim trains on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.unet_classifier import unet_classifier_from
from utils.datasets import DatasetSpec, check_image_size
from utils.diffusion.checkpoints import resolve_checkpoint
from utils.diffusion.factory import (
    diffusion_train_command,
    load_diffusion_spec,
    load_purifier,
    purifier_checkpoint,
    resolve_config,
)
from utils.fileio import UserError
from utils.paths import DATASET, diff_ckpt_dir
from utils.poisons.common import CraftContext, CraftResult, apply_linf, compensation_float, surrogate_report
from utils.poisons.minmin import MinMinConfig, run_min_min


def checkpoint_path(work: Path, params: dict[str, Any], dataset: str = DATASET) -> Path:
    """The sparse diffusion model's checkpoint of ``dataset`` (either spelling of its name)."""
    return resolve_checkpoint(diff_ckpt_dir(work, params["sparse_set"], dataset) / params["sparse_diff_model"])


def preflight(work: Path, params: dict[str, Any], data: DatasetSpec) -> None:
    """Fail before any work when the config is missing or made for another image size, or
    the diffusion checkpoint is missing."""
    config = resolve_config(params["diff_config"])
    check_image_size(load_diffusion_spec(config).image_size, data, config, "eclipse")
    cmd = diffusion_train_command(config, params["sparse_set"], params["sparse_diff_model"], work, data.name)
    purifier_checkpoint(
        checkpoint_path(work, params, data.name),
        f"ADP crafts through ECLIPSE's sparse diffusion model, train it first with `{cmd}`",
    )


def craft(ctx: CraftContext) -> CraftResult:
    p = ctx.params
    config = resolve_config(p["diff_config"])
    spec = load_diffusion_spec(config)
    if spec.architecture != "improved_unet":
        raise UserError(f"{config}: ADP needs ECLIPSE's improved-diffusion UNet, not {spec.architecture!r}")
    ckpt = checkpoint_path(ctx.work, p, (ctx.settings or {}).get("dataset", DATASET))
    unet, diffusion, _ = load_purifier(spec, ckpt, ctx.device, missing="train it with train_diffusion.py")
    t_model = p["unet_t"] * (1000.0 / diffusion.num_timesteps if spec.diffusion["rescale_timesteps"] else 1.0)
    torch.manual_seed(ctx.seed * 7919)  # the new classifier head, seeded as every surrogate (build_surrogate)
    model = unet_classifier_from(unet, ctx.num_classes, t_model).to(ctx.device)
    cfg = MinMinConfig(
        eps=p["eps"],
        step_size=p["step_size"],
        pgd_steps=p["pgd_steps"],
        schedule="rounds",
        train_steps=p["train_steps"],
        batch_size=p["train_batch"],
        noise_batch=p["batch_size"],
        lr=p["lr"],
        weight_decay=p["weight_decay"],
        grad_clip=5.0,
        stop_acc=p["stop_acc"],
        max_rounds=p["max_rounds"],
        samples=p["samples"],
        eval_with_transform=True,
    )
    delta, loop = run_min_min(ctx, cfg, model, transform=compensation_float(p["gray_p"], p["noise_std"]))
    images = apply_linf(ctx.clean.images, delta, cfg.eps)
    info = {
        "surrogate": surrogate_report(ctx, model, images) | {"arch": "unet_classifier", "width": None},
        "diffusion_config": str(config),
        "diffusion_checkpoint": str(ckpt),
        "unet_timestep_model_units": t_model,
        "rounds": loop.round,
        "stopped_at_target_accuracy": loop.converged,
        "final_acc_under_compensation": loop.last_acc,
        "history": loop.history,
    }
    return CraftResult(images=images, info=info, surrogate=model)
