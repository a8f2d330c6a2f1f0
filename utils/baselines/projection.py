"""Orthogonal Projection (OP; Sandoval-Segura et al., "What Can We Learn from Unlearnable
Datasets?", NeurIPS 2023), ECLIPSE's Table 1 "OP" row.

A class-wise shortcut is what a linear model learns first: fit a bias-free logistic
regression on the flattened poisoned training images (their code: [0, 1] pixels, SGD lr 0.1
without momentum, batch 1024, 20 epochs, the lr ×0.1 at 50 % and 75 % of them), take its
ten weight rows, normalised, as directions, orthonormalise them (QR) and remove each
image's component along them. The victim then trains on the projected images.

Deviation: the projected images are float and leave [0, 1]; this project keeps images as
uint8, so they are clipped to [0, 1] and rounded (the share clipped is reported). The
linear model is trained by the one training loop, which shuffles (their loader does not).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from utils.augment import no_augment
from utils.data import ImageSet
from utils.trainer import TrainConfig, train_classifier


@dataclass(frozen=True)
class LinearShortcut:
    """The fitted linear model's weights ``[classes, pixels]`` and its running training accuracy
    (%) over its last epoch (accumulated batch by batch while the weights still moved, not a
    second pass over the set with the final weights)."""

    weights: torch.Tensor
    last_epoch_running_acc: float


def fit_linear_model(
    train: ImageSet,
    num_classes: int,
    *,
    epochs: int = 20,
    lr: float = 0.1,
    batch_size: int = 1024,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> LinearShortcut:
    """OP's logistic regression (bias-free linear layer on flattened [0, 1] pixels), trained on
    ``train`` on the CPU (a few GFLOP an epoch), so the fit does not depend on the victim's
    device. It can still change with the CPU's thread count (reductions split differently),
    so the projected set is not bit-identical everywhere: a resumed victim run whose projected
    set differs is refused by the checkpoint's data fingerprint, never mixed.

    The lr drops ×0.1 at epochs ``int(0.5·epochs)`` and ``int(0.75·epochs)`` (their code's 50 %
    and 75 %). Below 3 epochs the two milestones coincide: with 2 epochs the second epoch runs
    at lr/100, with 1 the whole fit does (both milestones at epoch 0); use at least 3, the
    paper's 20 by default."""
    dim = train.images[0].numel()
    # its own seed: the victim's initialisation after it stays what it would be without OP
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Flatten(), nn.Linear(dim, num_classes, bias=False))
    cfg = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        momentum=0.0,
        schedule="multistep",
        milestones=(int(epochs * 0.5), int(epochs * 0.75)),
        gamma=0.1,
        test_every=epochs,
        precision="fp32",
        channels_last=False,
        seed=seed,
        drop_last=False,
        bn_updates=1,
    )
    history = train_classifier(model, train, no_augment, cfg, torch.device("cpu"), log=log, desc="OP linear model")
    # the loop's train_acc: accumulated over the last epoch's batches while the model trained
    return LinearShortcut(model[1].weight.detach().float().cpu(), float(history[-1]["train_acc"]))


def orthonormal_basis(weights: torch.Tensor) -> torch.Tensor:
    """Rows spanning the weight rows' space, orthonormal: QR of the unit-normalised rows (float64)."""
    rows = weights.double()
    rows = rows / rows.norm(dim=1, keepdim=True)
    q, _ = torch.linalg.qr(rows.T)
    return q.T.contiguous()


def project_images(images: torch.Tensor, basis: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, float]:
    """uint8 ``images`` without their components along ``basis`` (orthonormal rows), clipped to
    [0, 1] and rounded back to uint8; also the share of values the clipping changed."""
    out = torch.empty_like(images)
    clipped = 0
    for s in range(0, len(images), chunk):
        x = images[s : s + chunk].flatten(1).double() / 255
        x = x - (x @ basis.T) @ basis
        clipped += int(((x < 0) | (x > 1)).sum())
        out[s : s + chunk] = x.clamp(0, 1).mul(255).round().to(torch.uint8).view_as(images[s : s + chunk])
    return out, clipped / max(images.numel(), 1)


def orthogonal_projection(
    train: ImageSet, num_classes: int, *, log: Callable[[str], None] = print, **fit: int | float
) -> tuple[ImageSet, dict[str, float]]:
    """OP applied to ``train``: the projected set and what to report (``linear_train_acc``: the
    linear model's running training accuracy over its last epoch, see :class:`LinearShortcut`;
    ``clipped_share``: the share of values clipped); ``fit``: :func:`fit_linear_model`'s settings."""
    shortcut = fit_linear_model(train, num_classes, log=log, **fit)
    images, clipped = project_images(train.images, orthonormal_basis(shortcut.weights))
    # key name kept: train.py reads it (a rename must change both together)
    report = {"linear_train_acc": shortcut.last_epoch_running_acc, "clipped_share": clipped}
    return ImageSet(images, train.labels), report
