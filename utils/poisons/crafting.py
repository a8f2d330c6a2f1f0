"""Batched PGD crafting of poisons: minimise a per-sample loss over an L∞ perturbation of
every image, resumable per batch (TAP, SEP, EFP)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.adversarial import forward, freeze
from utils.data import NUM_CLASSES
from utils.poisons import common  # project_linf is looked up there on each call (tests interrupt it)
from utils.poisons.common import CraftContext, FloatAugment

PerSampleLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def craft_pgd(
    ctx: CraftContext,
    tag: str,
    models: Sequence[nn.Module],
    loss_fn: PerSampleLoss,
    eps: float,
    step: float,
    steps: int,
    batch_size: int,
    init: str = "zero",
    augment: FloatAugment | None = None,
    restarts: int = 1,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Minimise ``loss_fn`` over an L∞ perturbation of every image, batch by batch.

    Each step moves by ``step`` (/255) against the sign of the gradient averaged over
    ``models`` (one backward per model, so an ensemble costs no extra memory), then
    projects onto the ball and [0, 255]. ``loss_fn(model, x, y_or_target, idx)`` returns
    per-sample losses. With ``restarts`` > 1 the whole set is crafted once per restart and
    the restart whose total loss over the set (at its last step, as the TAP reference
    scores a trial) is lowest is kept for every image. Progress is saved per batch;
    returns the perturbation in /255 units."""
    n, device = ctx.n, ctx.device
    labels = ctx.clean.labels if targets is None else targets
    current = torch.zeros(ctx.clean.images.shape, dtype=torch.float16)
    best: torch.Tensor | None = None
    best_total, total = float("inf"), 0.0
    g = ctx.generator(201, device)
    restart, done = 0, 0
    st = ctx.load_state()
    if st and st.get("phase") == tag:
        current, done, restart = st["delta"], st["done"], st.get("restart", 0)
        best, best_total, total = st.get("best"), st.get("best_total", float("inf")), st.get("total", 0.0)
        g.set_state(st["g"].to(g.device) if device.type == "cuda" else st["g"])
        ctx.log.info(f"{tag}: resuming at image {done}/{n} (restart {restart + 1}/{restarts})")
    for m in models:
        m.eval()
        freeze(m)
    batches = list(range(0, n, batch_size))

    def state() -> dict:
        return {
            "phase": tag,
            "delta": current,
            "done": done,
            "restart": restart,
            "best": best,
            "best_total": best_total,
            "total": total,
            "g": g.get_state().cpu(),
        }

    while restart < restarts:
        desc = tag if restarts == 1 else f"{tag} restart {restart + 1}/{restarts}"
        bar = ctx.bar(len(batches), desc, initial=done // batch_size)
        for b0 in batches:
            if b0 < done:
                continue
            idx = torch.arange(b0, min(b0 + batch_size, n))
            clean255 = ctx.clean.images[idx].to(device).float()
            y = labels[idx].to(device)
            if init == "randn":
                d = torch.randn(clean255.shape, generator=g, device=g.device).to(device) * eps
            elif init == "uniform":
                d = (torch.rand(clean255.shape, generator=g, device=g.device).to(device) * 2 - 1) * eps
            else:
                d = torch.zeros_like(clean255)
            d = common.project_linf(d, clean255, eps)
            last = torch.zeros(len(idx), device=device)
            for _ in range(steps):
                d.requires_grad_(True)
                grad = torch.zeros_like(clean255)
                last = torch.zeros(len(idx), device=device)
                for m in models:
                    x = (clean255 + d) / 255.0
                    if augment is not None:
                        x = augment(x, g)
                    per_sample = loss_fn(m, x, y, idx)
                    grad += torch.autograd.grad(per_sample.sum(), d)[0]
                    last += per_sample.detach() / len(models)
                with torch.no_grad():
                    d = common.project_linf(d - step * grad.sign(), clean255, eps)
            current[idx] = d.detach().cpu().half()
            total += float(last.sum())
            done = int(idx[-1]) + 1
            bar.update(1)
            bar.set_postfix(loss=f"{total / done:.3f}")
            ctx.tick(state)
        bar.close()
        if restarts > 1:
            ctx.log.info(f"{tag}: restart {restart + 1}/{restarts} mean loss {total / n:.4f}")
        if total < best_total or best is None:
            best, best_total = current.clone() if restarts > 1 else current, total
        restart, done, total = restart + 1, 0, 0.0
    ctx.save_state(state() | {"phase": f"{tag}:done"})
    return (current if best is None else best).float()


def targeted_ce(shift: int, bf16: bool, num_classes: int = NUM_CLASSES) -> PerSampleLoss:
    """Cross-entropy toward the label map ``(y + shift) mod num_classes`` (TAP: 1, SEP: 5)."""

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(forward(model, x, bf16), (y + shift) % num_classes, reduction="none")

    return loss
