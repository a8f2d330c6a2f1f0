"""TAP: targeted adversarial poisoning (Fowl et al., NeurIPS'21).

A ResNet18 surrogate is trained on the clean data (40 epochs, SGD lr 0.1 with Nesterov
momentum 0.9, weight decay 5e-4, lr ×0.1 at epochs 14, 25, 35 — Witches' Brew's
"conservative" recipe the reference inherits); then every image gets a targeted PGD
perturbation toward the label (y + 1) mod 10: 250 sign steps of 0.05·ε from a Gaussian
start, projected to the 8/255 ball. As in the reference, the whole pass is restarted 8
times and the restart with the lowest total loss over the set is kept, and both the
surrogate's training and the crafting augment with the reference's differentiable
``RandomTransform``: a bilinear sub-pixel shift of up to ±4 px padded with the mean colour,
plus a flip (``shift_flip``). ``--restarts 1`` is the CPU-scale setting; ``--augment
crop_flip`` the integer crop with black padding, in both places.
"""

from __future__ import annotations

from utils.poisons.common import (
    AUGMENTS,
    CraftContext,
    CraftResult,
    apply_linf,
    parse_milestones,
    surrogate_report,
    target_hit_rates,
)
from utils.poisons.crafting import craft_pgd, targeted_ce
from utils.poisons.surrogate import SurrogateConfig, fit_surrogate


def craft(ctx: CraftContext) -> CraftResult:
    p = ctx.params
    model = ctx.build_surrogate()
    scfg = SurrogateConfig(
        epochs=p["epochs"],
        lr=p["lr"],
        weight_decay=p["weight_decay"],
        nesterov=True,
        batch_size=p["train_batch"],
        augment="shift_flip" if p["augment"] == "shift_flip" else True,
        milestones=parse_milestones(p["milestones"]),
    )
    _, train_info = fit_surrogate(ctx, "TAP-surrogate", model, ctx.clean, scfg)
    delta = craft_pgd(
        ctx,
        "TAP-pgd",
        [model],
        targeted_ce(p["target_shift"], ctx.bf16, ctx.num_classes),
        eps=p["eps"],
        step=p["step_size"],
        steps=p["pgd_steps"],
        batch_size=p["batch_size"],
        init="randn",
        augment=AUGMENTS[p["augment"]](),
        restarts=p["restarts"],
    )
    images = apply_linf(ctx.clean.images, delta, p["eps"])
    info = {
        "surrogate": surrogate_report(ctx, model, images, train_info),
        "target": f"(y + {p['target_shift']}) mod 10",
        **target_hit_rates(ctx, [model], images, p["target_shift"]),
    }
    return CraftResult(images=images, info=info, surrogate=model)
