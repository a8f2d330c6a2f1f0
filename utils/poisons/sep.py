"""SEP: self-ensemble protection (Chen et al., ICLR'23).

One ResNet18 is trained on the clean data for 120 epochs (SGD lr 0.1, momentum 0.9, weight
decay 5e-4, ×0.1 at epochs 75 and 90); 30 evenly spaced checkpoints of that run form the
ensemble. Each image then takes 30 sign steps of 1/255 toward (y + 5) mod 10 with the
gradient averaged over the checkpoints, projected to the ε ball (8/255, the value ECLIPSE
evaluates; the SEP paper's headline is 2/255). The reference keeps a checkpoint only when
its test accuracy improves and picks 30 of those; here the checkpoints are taken every
epochs/30 epochs, with no test set involved.
"""

from __future__ import annotations

import copy

from utils.poisons.common import (
    CraftContext,
    CraftResult,
    SurrogateConfig,
    apply_linf,
    craft_pgd,
    fit_surrogate,
    parse_milestones,
    surrogate_report,
    target_hit_rates,
    targeted_ce,
)


def snapshot_epochs(epochs: int, count: int) -> tuple[int, ...]:
    """``count`` evenly spaced epochs ending with the last: 120/30 -> 4, 8, ..., 120."""
    return tuple(sorted({round(epochs * (k + 1) / count) for k in range(count)}))


def craft(ctx: CraftContext) -> CraftResult:
    p = ctx.params
    model = ctx.build_surrogate()
    scfg = SurrogateConfig(
        epochs=p["epochs"],
        lr=p["lr"],
        weight_decay=p["weight_decay"],
        batch_size=p["train_batch"],
        milestones=parse_milestones(p["milestones"]),
        snapshots=snapshot_epochs(p["epochs"], p["checkpoints"]),
    )
    snapshots, train_info = fit_surrogate(ctx, "SEP-run", model, ctx.clean, scfg)
    ensemble = []
    for state in snapshots:
        m = copy.deepcopy(model)
        m.load_state_dict(state)
        ensemble.append(m.eval())
    delta = craft_pgd(
        ctx,
        "SEP-pgd",
        ensemble,
        targeted_ce(p["target_shift"], ctx.bf16),
        eps=p["eps"],
        step=p["step_size"],
        steps=p["pgd_steps"],
        batch_size=p["batch_size"],
        init="zero",
        augment=None,
    )
    images = apply_linf(ctx.clean.images, delta, p["eps"])
    info = {
        "surrogate": surrogate_report(ctx, model, images, train_info),
        "checkpoint_epochs": list(scfg.snapshots),
        "target": f"(y + {p['target_shift']}) mod 10",
        **target_hit_rates(ctx, ensemble, images, p["target_shift"]),
    }
    return CraftResult(images=images, info=info, surrogate=model, extra_models=ensemble)
