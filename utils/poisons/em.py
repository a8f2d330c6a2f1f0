"""EM: error-minimizing noise (Huang et al., ICLR'21), sample-wise or class-wise.

Min-min with a classifier surrogate (ResNet18 by default) and no augmentation in the loop,
as in the reference ``perturbation.py``: rounds of 10 SGD steps (batch 512, lr 0.1,
momentum 0.9, weight decay 5e-4, gradient clipping 5) on x + δ, then 20 sign steps of
0.8/255 on every δ (starting from zero), until the surrogate classifies 99 % of x + δ
correctly. Class-wise: one δ per class, one step per batch, crafted as the reference
README's command does (``--use_subset``): the surrogate trains on every image (the
reference's full ``train_dataset`` loader, each image carrying its class's δ), while the
class patterns step on a random class-stratified 20 % of the images
(``--universal_train_portion 0.2``; ``--portion``) and the loop stops at 90 % accuracy on
that subset: the README's ``--universal_stop_error 0.1`` (some of its scripts use 0.01,
i.e. ``--stop_acc 99``).
"""

from __future__ import annotations

from utils.data import class_balanced_subset
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
    data = None
    if cfg.classwise and p["portion"] < 1:
        # CIFAR-10's classes are equal in size, so class-balanced = the reference's stratified split
        data = ctx.clean.subset(class_balanced_subset(ctx.clean.labels, round(p["portion"] * ctx.n), ctx.seed))
    # the surrogate trains on every image (run_min_min's default), δ steps on ``data``
    delta, loop = run_min_min(ctx, cfg, model, transform=None, data=data)
    images = apply_linf(ctx.clean.images, delta, cfg.eps)
    info = {
        "surrogate": surrogate_report(ctx, model, images),
        "rounds": loop.round,
        "stopped_at_target_accuracy": loop.converged,
        "history": loop.history,
    }
    if cfg.classwise:
        info["class_patterns"] = "one δ per class"
        info["crafted_on_images"] = ctx.n if data is None else len(data)
        info["surrogate_trained_on_images"] = ctx.n
    return CraftResult(images=images, info=info, surrogate=model)
