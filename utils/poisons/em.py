"""EM: error-minimizing noise (Huang et al., ICLR'21), sample-wise or class-wise.

Min-min with a classifier surrogate (ResNet18 by default) and no augmentation in the loop,
as in the reference ``perturbation.py``: rounds of 10 SGD steps (batch 512, lr 0.1,
momentum 0.9, weight decay 5e-4, gradient clipping 5) on x + δ, then 20 sign steps of
0.8/255 on every δ (starting from zero), until the surrogate classifies 99 % of x + δ
correctly. Class-wise: one δ per class, one step per batch, stop at 90 % (the reference
README's ``--universal_stop_error 0.1``).
"""

from __future__ import annotations

from utils.poisons.common import CraftContext, CraftResult, apply_linf, surrogate_report
from utils.poisons.minmin import MinMinConfig, run_min_min


def craft(ctx: CraftContext) -> CraftResult:
    p = ctx.params
    cfg = MinMinConfig(
        eps=p["eps"],
        step_size=p["step_size"],
        pgd_steps=p["pgd_steps"],
        schedule="rounds",
        classwise=bool(p["classwise"]),
        train_steps=p["train_steps"],
        batch_size=p["train_batch"],
        noise_batch=p["batch_size"],
        lr=p["lr"],
        weight_decay=p["weight_decay"],
        grad_clip=5.0,
        stop_acc=p["stop_acc"],
        max_rounds=p["max_rounds"],
    )
    model = ctx.build_surrogate()
    delta, loop = run_min_min(ctx, cfg, model, transform=None)
    images = apply_linf(ctx.clean.images, delta, cfg.eps)
    info = {
        "surrogate": surrogate_report(ctx, model, images),
        "rounds": loop.round,
        "stopped_at_target_accuracy": loop.converged,
        "history": loop.history,
    }
    if cfg.classwise:
        info["class_patterns"] = "one δ per class"
    return CraftResult(images=images, info=info, surrogate=model)
