"""The one classifier training loop: its hooks are called as documented, and the trainings
built on it (poison surrogates, LC's adversarial training) compute what a plain reference
loop computes, bit for bit; the one L∞ PGD keeps both projection arithmetics."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.adversarial import forward, pgd_linf
from utils.augment import standard_augment, to_float
from utils.data import ImageSet
from utils.poisons.common import CraftContext
from utils.poisons.surrogate import SurrogateConfig, fit_surrogate
from utils.runtime import to_channels_last
from utils.trainer import TrainConfig, train_classifier

CPU = torch.device("cpu")


def tiny_set(n: int = 40, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(n) % 10)


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 10),
    )


def test_hooks_are_called_per_batch_step_and_epoch():
    data = tiny_set(40)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.1, drop_last=False)  # 3 steps per epoch, the last of 8
    seen_batches, steps, epochs, lrs = [], [], [], []
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def perturb(x, y, g):
        seen_batches.append((x.shape[0], x.dtype, y.clone()))
        return x

    def step(x, y):
        steps.append(len(x))
        lrs.append(opt.param_groups[0]["lr"])
        return 0.5, 1

    history = train_classifier(
        model,
        data,
        standard_augment,
        cfg,
        CPU,
        log=lambda _m: None,
        optimizer=opt,
        lr_schedule=lambda epoch, i, n: 100 * epoch + 10 * i + n,
        perturb=perturb,
        step=step,
        on_epoch_end=lambda rec: epochs.append(rec["epoch"]),
    )
    assert [b[0] for b in seen_batches] == [16, 16, 8] * 3 and all(b[1] == torch.float32 for b in seen_batches)
    # every image once per epoch, the labels handed over with their batch
    labels = torch.cat([b[2] for b in seen_batches[:3]])
    assert sorted(labels.tolist()) == sorted(data.labels.tolist())
    assert steps == [16, 16, 8] * 3 and epochs == [1, 2, 3]
    assert lrs == [100 * e + 10 * i + 3 for e in range(3) for i in range(3)]  # the custom schedule, every step
    assert [h["train_loss"] for h in history] == [0.5] * 3 and history[0]["train_acc"] == 100 * 3 / 40


def test_identity_perturb_changes_nothing():
    data = tiny_set(32)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, channels_last=False)
    a, b = tiny_model(), tiny_model()
    train_classifier(a, data, standard_augment, cfg, CPU, log=lambda _m: None)
    train_classifier(b, data, standard_augment, cfg, CPU, log=lambda _m: None, perturb=lambda x, y, g: x)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def _reference_surrogate(model: nn.Module, data: ImageSet, cfg: SurrogateConfig, ctx: CraftContext) -> None:
    """The poisons' surrogate training written out as a plain loop (what fit_surrogate was)."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    g_data, g_aug = ctx.generator(101), ctx.generator(102)
    n, bs = len(data), min(cfg.batch_size, len(data))
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=g_data)
        for s in range(max(1, n // bs)):
            for group in opt.param_groups:
                group["lr"] = cfg.lr_at(epoch, s, n // bs)
            idx = perm[s * bs : (s + 1) * bs]
            x = to_float(standard_augment(data.images[idx], g_aug))
            y = data.labels[idx]
            x = pgd_linf(model, x, y, cfg.adv_eps, cfg.adv_step, cfg.adv_steps, g_aug, ctx.bf16)
            model.train()
            logits = forward(model, x, ctx.bf16)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def test_fit_surrogate_is_the_reference_adversarial_training(tmp_path):
    data = tiny_set(48)
    ctx = CraftContext(data, {}, 5, CPU, True, "tiny", 4, tmp_path / "state", tmp_path / "res", progress=False)
    cfg = SurrogateConfig(
        epochs=2, batch_size=16, milestones=(1,), warmup_first_epoch=True, adv_eps=8, adv_step=4, adv_steps=2
    )
    ours, ref = to_channels_last(tiny_model(), CPU), to_channels_last(tiny_model(), CPU)
    _, info = fit_surrogate(ctx, "T", ours, data, cfg)
    _reference_surrogate(ref, data, cfg, ctx)
    assert all(torch.equal(p, q) for p, q in zip(ours.state_dict().values(), ref.state_dict().values()))
    assert [h["epoch"] for h in info["history"]] == [1, 2] and info["history"][0]["lr"] == cfg.lr_at(0, 2, 3)


def _backdoorbench_pgd(model, x, y, eps, alpha, steps, g):
    """BackdoorBench's PGD as LC's code had it (budget and step on the [0, 1] scale)."""
    adv = x.clone()
    if g is not None:
        adv = (adv + (torch.rand(x.shape, generator=g) * 2 - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(adv), y)  # float32, as BackdoorBench
        (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + alpha * grad.sign()
        adv = (x + (adv - x).clamp(-eps, eps)).clamp(0, 1)
    return adv.detach()


def test_one_pgd_reproduces_lcs_arithmetic_and_restores_the_model():
    model = tiny_model()
    model.input_layout = torch.contiguous_format  # LC's model runs in the default layout
    data = tiny_set(16)
    x, y = to_float(data.images), data.labels
    for random_start in (False, True):
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        model.eval()
        ref = _backdoorbench_pgd(model, x, y, 8 / 255, 2 / 255, 5, g1 if random_start else None)
        model.train()
        ours = pgd_linf(model, x, y, 8.0, 2.0, 5, g2, random_start=random_start, clip_offset=True)
        assert torch.equal(ours, ref)
        assert (ours - x).abs().max() <= 8 / 255 + 1e-6
    assert model.training and all(p.requires_grad for p in model.parameters())
    # the default projection (clip the image to [x - eps, x + eps]) keeps the same budget
    other = pgd_linf(model, x, y, 8.0, 2.0, 5, None, random_start=False)
    assert (other - x).abs().max() <= 8 / 255 + 1e-6
