"""REM: robust error-minimizing noise (Fu et al., ICLR'22).

Min-min against an adversarially trained surrogate, as in ``generate_robust_em.py`` with
the ``rem8-4`` settings: 5000 steps at batch 128 (SGD lr 0.1, ×0.1 every 2000 steps,
momentum 0.9, weight decay 5e-4). Each step re-crafts the batch's δ from U(-ρu, ρu) by 10
sign steps of 1.6/255 minimising the loss at the worst-case point (inner PGD: ρa 4/255,
10 steps of 0.8/255, random start) averaged over 5 crop+flip draws, then trains the
surrogate on the adversarial version of crop+flip(x + δ). A last pass re-crafts every δ
with the final surrogate. The reference's last pass iterates its training loader
(shuffled, ``drop_last``), so the 50000 mod 128 = 80 images of its last partial batch keep
the δ of their last training step; ``--final_drop_last true`` does the same.
"""

from __future__ import annotations

from utils.poisons.common import CraftContext, CraftResult, apply_linf, crop_flip, surrogate_report
from utils.poisons.minmin import MinMinConfig, run_min_min


def craft(ctx: CraftContext) -> CraftResult:
    p = ctx.params
    cfg = MinMinConfig(
        eps=p["eps"],
        step_size=p["step_size"],
        pgd_steps=p["pgd_steps"],
        schedule="steps",
        batch_size=p["train_batch"],
        noise_batch=p["batch_size"],
        lr=p["lr"],
        weight_decay=p["weight_decay"],
        grad_clip=None,
        lr_decay=0.1,
        lr_decay_every=p["lr_decay_every"],
        stop_acc=None,
        max_rounds=p["steps"],
        random_start=True,
        samples=p["samples"],
        adv_eps=p["adv_eps"],
        adv_step=p["adv_step"],
        adv_steps=p["adv_steps"],
        final_drop_last=p["final_drop_last"],
    )
    model = ctx.build_surrogate()
    delta, loop = run_min_min(ctx, cfg, model, transform=crop_flip)
    images = apply_linf(ctx.clean.images, delta, cfg.eps)
    info = {"surrogate": surrogate_report(ctx, model, images), "steps": loop.round, "history": loop.history}
    return CraftResult(images=images, info=info, surrogate=model)
