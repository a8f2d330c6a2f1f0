"""The one L∞ PGD (Madry et al.) every adversarial training and attack uses, and the
float forward it runs the model through.

Units: images are float in [0, 1]; the budget ``eps`` and the step are in **/255 units**
(``8.0`` means 8/255), the numbers the papers quote.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.runtime import autocast


def forward(model: nn.Module, x: torch.Tensor, bf16: bool, features: bool = False) -> torch.Tensor:
    """Logits (or pooled features) in float32, the network run in bf16, in the layout
    :func:`to_channels_last` chose (``features`` bypasses its input hook)."""
    x = x.contiguous(memory_format=getattr(model, "input_layout", torch.channels_last))
    with autocast(x.device, bf16):
        out = model.features(x) if features else model(x)
    return out.float()


def freeze(model: nn.Module, frozen: bool = True) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(not frozen)
    return model


def pgd_linf(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    step: float,
    steps: int,
    g: torch.Generator | None,
    bf16: bool = False,
    random_start: bool = True,
    clip_offset: bool = False,
) -> torch.Tensor:
    """Untargeted L∞ PGD (budget and step in /255 units) on float images; returns x_adv,
    which maximises the cross-entropy of ``y``.

    Runs with the model in eval mode and its weights frozen, and restores both. The
    random start is uniform in the ball, drawn from ``g``. Each step projects by clipping
    the image to ``[x - eps, x + eps]``; ``clip_offset`` clips the offset instead,
    ``x + clamp(x_adv - x)`` — BackdoorBench's arithmetic (LC), the same projection up to
    float rounding, kept so that LC's images stay the same bytes."""
    if steps <= 0 or eps <= 0:
        return x.detach()
    was = model.training
    model.eval()
    grads_on = [p.requires_grad for p in model.parameters()]
    freeze(model)
    e, a = eps / 255.0, step / 255.0
    x = x.detach()
    if random_start:
        start = (torch.rand(x.shape, generator=g, device=g.device).to(x.device) * 2 - 1) * e
        adv = (x + start).clamp(0, 1)
    else:
        adv = x.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(forward(model, adv, bf16), y)
        (grad,) = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            adv = adv + a * grad.sign()
            if clip_offset:
                adv = (x + (adv - x).clamp(-e, e)).clamp(0, 1)
            else:
                adv = torch.min(torch.max(adv, x - e), x + e).clamp(0, 1)
    for p, on in zip(model.parameters(), grads_on):
        p.requires_grad_(on)
    model.train(was)
    return adv.detach()
