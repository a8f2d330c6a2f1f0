"""EFP / EntF: entangled features (Wen et al., ICLR'23).

A reference ResNet18 is adversarially trained on the clean data (ε 4/255, 10 PGD steps of
2/255 with random start; SGD lr 0.1, momentum 0.9, weight decay 5e-4, ×0.1 at epochs 75
and 90; 100 epochs). Class centroids are the mean penultimate (pooled) features of the
clean training images in eval mode. Each image then takes 300 sign steps of 0.05·ε from a
Gaussian start through the reference's differentiable augmentation (``shift_flip``, the
same bilinear ±4 px shift + flip as TAP's, but padded with black: EntF's loader turns
normalisation off, so its zero padding is 0 in [0, 1] where TAP's is the mean colour;
``--augment crop_flip`` for the integer crop):

* ``push`` (the default: the EntF README's command and its code's default) maximises the
  MSE between the image's feature and its own class centroid;
* ``pull`` minimises the MSE to the nearest class centroid (recomputed each step) after the
  own class's distance is set to 1, as ``forgemaster_pull.py`` does: the own centroid is
  the target wherever every other one is farther than 1 (``--pull_own exclude`` never
  picks it).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from utils.adversarial import forward
from utils.augment import to_float
from utils.poisons.common import (
    AUGMENTS,
    BLACK_RGB,
    CraftContext,
    CraftResult,
    FloatAugment,
    apply_linf,
    parse_milestones,
    shift_flip,
    surrogate_report,
)
from utils.poisons.crafting import craft_pgd
from utils.poisons.surrogate import SurrogateConfig, fit_surrogate


@torch.no_grad()
def class_centroids(model: nn.Module, ctx: CraftContext, batch: int = 500) -> torch.Tensor:
    """Mean pooled penultimate feature per class of the clean images, eval mode."""
    model.eval()
    feats = []
    for b0 in range(0, ctx.n, batch):
        x = to_float(ctx.clean.images[b0 : b0 + batch].to(ctx.device))
        feats.append(forward(model, x, ctx.bf16, features=True))
    feats = torch.cat(feats)
    labels = ctx.clean.labels.to(feats.device)
    sums = torch.zeros(ctx.num_classes, feats.shape[1], device=feats.device).index_add_(0, labels, feats)
    counts = torch.bincount(labels, minlength=ctx.num_classes).clamp_min(1).float()
    return sums / counts[:, None]


# the own class's distance before the pull picks the nearest centroid
PULL_OWN_DISTANCE = {"one": 1.0, "exclude": float("inf")}


def entf_loss(centroids: torch.Tensor, variant: str, bf16: bool, pull_own: str = "one"):
    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        f = forward(model, x, bf16, features=True)
        dist = ((f[:, None, :] - centroids[None]) ** 2).mean(-1)  # per-sample MSE to each centroid
        if variant == "push":
            return -dist.gather(1, y[:, None]).squeeze(1)
        masked = dist.detach().scatter(1, y[:, None], PULL_OWN_DISTANCE[pull_own])
        return dist.gather(1, masked.argmin(1, keepdim=True)).squeeze(1)

    return loss


def efp_augment(name: str) -> FloatAugment | None:
    """The crafting augmentation; ``shift_flip`` pads with black, as EntF's unnormalised loader does."""
    if name == "shift_flip":
        return partial(shift_flip, fill=BLACK_RGB)
    return AUGMENTS[name]()


def craft(ctx: CraftContext) -> CraftResult:
    p = ctx.params
    model = ctx.build_surrogate()
    scfg = SurrogateConfig(
        epochs=p["epochs"],
        lr=p["lr"],
        weight_decay=p["weight_decay"],
        batch_size=p["train_batch"],
        milestones=parse_milestones(p["milestones"]),
        adv_eps=p["adv_eps"],
        adv_step=p["adv_step"],
        adv_steps=p["adv_steps"],
    )
    _, train_info = fit_surrogate(ctx, "EFP-reference", model, ctx.clean, scfg)
    centroids = class_centroids(model, ctx)
    delta = craft_pgd(
        ctx,
        f"EFP-{p['variant']}",
        [model],
        entf_loss(centroids, p["variant"], ctx.bf16, p["pull_own"]),
        eps=p["eps"],
        step=p["step_size"],
        steps=p["pgd_steps"],
        batch_size=p["batch_size"],
        init="randn",
        augment=efp_augment(p["augment"]),
        restarts=p["restarts"],
    )
    images = apply_linf(ctx.clean.images, delta, p["eps"])
    info = {"surrogate": surrogate_report(ctx, model, images, train_info), "variant": p["variant"]}
    if p["variant"] == "pull":
        info["pull_own_distance"] = p["pull_own"]
    for which, imgs in (("clean", ctx.clean.images), ("poisoned", images)):
        with torch.no_grad():
            f = torch.cat(
                [
                    forward(model, to_float(imgs[b : b + 500].to(ctx.device)), ctx.bf16, features=True)
                    for b in range(0, len(imgs), 500)
                ]
            )
        d = ((f[:, None, :] - centroids[None]) ** 2).mean(-1)
        own = d.gather(1, ctx.clean.labels.to(d.device)[:, None]).squeeze(1)
        info[f"mean_mse_to_own_centroid_{which}"] = float(own.mean())
        info[f"nearest_centroid_is_own_pct_{which}"] = 100.0 * float(
            (d.argmin(1).cpu() == ctx.clean.labels).float().mean()
        )
    return CraftResult(images=images, info=info, surrogate=model)
