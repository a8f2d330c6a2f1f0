"""SEP: self-ensemble protection (Chen et al., ICLR'23).

One ResNet18 is trained on the clean data for 120 epochs as the reference ``vanilla.py``
does (SGD lr 0.1, momentum 0.9, weight decay 5e-4, ×0.1 at epochs 75 and 90; during epoch
0 the lr ramps linearly from 0.001 to 0.1 over the batches), and after every epoch the
weights are kept only when the CIFAR-10 test accuracy beats every earlier epoch's. The
reference ``ens.py`` then picks 30 of those checkpoints by its index rule
(``select_checkpoints``). Each image takes 30 sign steps of 1/255 toward (y + 5) mod 10 with
the gradient averaged over the checkpoints, projected to the ε ball: 8/255 by default, the
common budget of ECLIPSE's table; ``--eps 2`` is the SEP code's own default and the paper's
headline.

Bytes: the reference keeps its float32 [0, 1] images and its loader writes them as
``(x * 255).astype(uint8)``, which truncates: where float error leaves x·255 just under a
level, the pixel drops one level, and at −ε that is one level past the budget. We round the
perturbation to the nearest level (``apply_linf``) by default; ``--quantize truncate``
truncates x·255 of x = clean/255 + δ·(1/255) in float32 (1.4 % of the values of a uniform
spread of pixels and δ drop a level), kept within the budget, which the output check
enforces. It is the reference's arithmetic in one step: the reference reaches x through 30
float32 PGD steps, so which values drop depends on the path (a simulation of random 30-step
paths at ε 8 drops 0.6 % of the values, and agrees with the one-step form on 98.5 %).
"""

from __future__ import annotations

import copy

import torch

from utils.poisons.common import (
    CraftContext,
    CraftResult,
    apply_linf,
    linf_levels,
    parse_milestones,
    surrogate_report,
    target_hit_rates,
)
from utils.poisons.crafting import craft_pgd, targeted_ce
from utils.poisons.surrogate import SurrogateConfig, fit_surrogate


def select_checkpoints(saved: int, count: int) -> list[int]:
    """Indices of the ``count`` checkpoints (of ``saved``, oldest first) the reference uses.

    ``ens.py`` takes every ``saved // count``-th checkpoint from index ``saved // count``,
    and while that does not give exactly ``count`` moves the start back one index at a
    time (Python slicing, so the start turns negative and counts from the end): e.g. 30 of
    60 saved (interval 2) -> 1, 3, ..., 59; 30 of 45 at interval 1 -> the last 30. With
    fewer saved than asked for (the reference fails) every saved checkpoint is used."""
    if saved <= count:
        return list(range(saved))
    interval = saved // count
    order = list(range(saved))
    dev = 0
    while len(chosen := order[interval - dev :: interval]) != count:
        dev += 1
    return chosen


def truncate_like_reference(clean: torch.Tensor, delta: torch.Tensor, eps: float) -> torch.Tensor:
    """uint8 ``(x * 255).astype(uint8)`` of the float32 image x = clean/255 + δ·(1/255)
    (``delta`` in /255 units), clamped to the L∞ budget and to [0, 255]."""
    k = linf_levels(eps)
    x = clean.float() / 255 + delta.float().cpu() * torch.tensor(1 / 255, dtype=torch.float32)
    levels = (x.clamp(0, 1) * 255).floor()
    c = clean.float()
    return torch.min(torch.max(levels, c - k), c + k).clamp(0, 255).to(torch.uint8)


def craft(ctx: CraftContext) -> CraftResult:
    p = ctx.params
    model = ctx.build_surrogate()
    scfg = SurrogateConfig(
        epochs=p["epochs"],
        lr=p["lr"],
        weight_decay=p["weight_decay"],
        batch_size=p["train_batch"],
        milestones=parse_milestones(p["milestones"]),
        snapshot_on_best_test=True,
        warmup_first_epoch=True,
    )
    snapshots, train_info = fit_surrogate(ctx, "SEP-run", model, ctx.clean, scfg)
    saved_epochs = [h["epoch"] for h in train_info["history"] if h["snapshot"]]
    chosen = select_checkpoints(len(snapshots), p["checkpoints"])
    if len(chosen) < p["checkpoints"]:
        ctx.log.warning(
            f"SEP: test accuracy improved in only {len(snapshots)} epochs; the ensemble uses all of those "
            f"instead of {p['checkpoints']} checkpoints"
        )
    ensemble = []
    for state in (snapshots[i] for i in chosen):
        m = copy.deepcopy(model)
        m.load_state_dict(state)
        ensemble.append(m.eval())
    delta = craft_pgd(
        ctx,
        "SEP-pgd",
        ensemble,
        targeted_ce(p["target_shift"], ctx.bf16, ctx.num_classes),
        eps=p["eps"],
        step=p["step_size"],
        steps=p["pgd_steps"],
        batch_size=p["batch_size"],
        init="zero",
        augment=None,
    )
    if p["quantize"] == "truncate":
        images = truncate_like_reference(ctx.clean.images, delta, p["eps"])
    else:
        images = apply_linf(ctx.clean.images, delta, p["eps"])
    info = {
        "surrogate": surrogate_report(ctx, model, images, train_info),
        "saved_checkpoint_epochs": saved_epochs,
        "checkpoint_epochs": [saved_epochs[i] for i in chosen],
        "target": f"(y + {p['target_shift']}) mod 10",
        **target_hit_rates(ctx, ensemble, images, p["target_shift"]),
    }
    return CraftResult(images=images, info=info, surrogate=model, extra_models=ensemble)
