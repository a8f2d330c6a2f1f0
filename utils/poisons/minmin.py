"""The min-min (error-minimising) loop shared by EM, REM and ECLIPSE's adaptive attack.

    min_θ  E_(x,y) [ min_{‖δ‖∞ ≤ ε}  L( f_θ( T(x + δ) [+ r_adv] ), y ) ]

Two schedules of the same alternation, as in the reference codes:

* ``rounds`` (EM, Huang et al.; ADP): repeat { ``train_steps`` SGD steps of the surrogate on
  T(x + δ); then ``pgd_steps`` sign steps on δ for *every* image, continuing from the
  stored δ } until the surrogate's accuracy on x + δ reaches ``stop_acc``.
* ``steps`` (REM, Fu et al.): each of ``max_rounds`` steps draws a batch, re-crafts its δ
  from a random start under the current surrogate, then trains the surrogate on the
  (adversarial, with ``adv_steps``) version of T(x + δ); a final pass re-crafts every δ.

What differs between the poisons is only the surrogate, the transform T (none, crop+flip,
ECLIPSE's compensation), the EOT ``samples`` and the inner attack of REM. Class-wise noise
(one δ per class) follows EM's universal variant: after each step on a batch, a class's δ
becomes the mean of its images' stepped copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.adversarial import forward, freeze, pgd_linf
from utils.data import ImageSet
from utils.poisons.common import CraftContext, FloatAugment, accuracy_and_loss
from utils.trainer import optimizer_step


@dataclass
class MinMinConfig:
    eps: float  # /255
    step_size: float  # /255
    pgd_steps: int
    schedule: str = "rounds"  # rounds (EM, ADP) | steps (REM)
    classwise: bool = False
    train_steps: int = 10  # surrogate steps per round (rounds schedule)
    batch_size: int = 512  # surrogate training batch
    noise_batch: int = 512  # batch of the δ updates
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    grad_clip: float | None = 5.0
    lr_decay: float = 1.0  # steps schedule: lr *= lr_decay every lr_decay_every steps
    lr_decay_every: int = 0
    stop_acc: float | None = 99.0  # rounds schedule: stop when accuracy on x + δ >= this (%)
    max_rounds: int = 50  # rounds (rounds schedule) or steps (steps schedule)
    random_start: bool = False  # steps schedule: δ re-crafted from U(-ε, ε)
    samples: int = 1  # EOT draws of T per δ step
    adv_eps: float = 0.0  # REM's inner attack ρa (/255)
    adv_step: float = 0.0
    adv_steps: int = 0
    eval_with_transform: bool = False  # measure the stop accuracy on T(x + δ)
    # steps schedule: the final pass over shuffled batches of ``batch_size`` without the
    # last partial one (REM's reference reuses its drop_last training loader), instead of every image
    final_drop_last: bool = False


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    bf16: bool,
    grad_clip: float | None = None,
) -> tuple[float, int]:
    """One SGD step of the surrogate on float images; returns (loss, number correct)."""
    model.train()
    logits = forward(model, x, bf16)
    loss = F.cross_entropy(logits, y)
    optimizer_step(loss, model, opt, grad_clip)
    return loss.item(), int((logits.argmax(1) == y).sum())


def _project(delta: torch.Tensor, clean255: torch.Tensor | None, eps: float) -> torch.Tensor:
    delta = delta.clamp(-eps, eps)
    if clean255 is not None:
        delta = torch.max(torch.min(delta, 255.0 - clean255), -clean255)
    return delta


class MinMin:
    """Runs the loop with resumable state; see the module docstring."""

    def __init__(
        self,
        ctx: CraftContext,
        cfg: MinMinConfig,
        model: nn.Module,
        transform: FloatAugment | None,
        data: ImageSet | None = None,
        train_data: ImageSet | None = None,
    ):
        self.ctx, self.cfg, self.model, self.transform = ctx, cfg, model, transform
        self.device, self.bf16 = ctx.device, ctx.bf16
        # the images δ steps on and the stop accuracy is measured on (class-wise EM: a
        # subset, see em.py), and those the surrogate trains on: every image unless told,
        # as the reference trains on its full loader even when the noise uses a subset
        data = ctx.clean if data is None else data
        train = ctx.clean if train_data is None else train_data
        self.images, self.labels = data.images, data.labels
        self.train_images, self.train_labels = train.images, train.labels
        if cfg.schedule == "steps" and train is not data:
            raise ValueError("the steps schedule steps δ on the batch it trains on: one set of images only")
        shape = (ctx.num_classes, *self.images.shape[1:]) if cfg.classwise else tuple(self.images.shape)
        # /255 units in float16: half the memory and checkpoint size of float32 at
        # full scale, with a resolution (≈0.004/255 at 8/255) far below one pixel level
        self.noise = torch.zeros(shape, dtype=torch.float16)
        self.opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.g_data = ctx.generator(301)
        self.g_aug = ctx.generator(302, self.device)
        self.round = 0  # rounds done (rounds schedule) / steps done (steps schedule)
        self.phase = "train"  # rounds: train | noise | final; steps: step | final
        self.pos = 0  # position within the phase (batches)
        self.perm = torch.randperm(len(self.train_images), generator=self.g_data)
        self.perm_pos = 0
        self.history: list[dict] = []
        self.last_loss = float("nan")
        self.last_acc = float("nan")
        self.converged = False

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        return {
            "phase_name": "minmin",
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "noise": self.noise,
            "g_data": self.g_data.get_state(),
            "g_aug": self.g_aug.get_state().cpu(),
            "round": self.round,
            "phase": self.phase,
            "pos": self.pos,
            "perm": self.perm,
            "perm_pos": self.perm_pos,
            "history": self.history,
            "converged": self.converged,
        }

    def load(self, st: dict) -> None:
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.noise = st["noise"]
        self.g_data.set_state(st["g_data"])
        self.g_aug.set_state(st["g_aug"].to(self.g_aug.device) if self.device.type == "cuda" else st["g_aug"])
        for k in ("round", "phase", "pos", "perm", "perm_pos", "history", "converged"):
            setattr(self, k, st[k])
        done = "rounds" if self.cfg.schedule == "rounds" else "steps"
        self.ctx.log.info(f"min-min: resuming after {self.round} {done}, in phase {self.phase} at batch {self.pos}")

    def tick(self) -> None:
        self.ctx.tick(self.state)

    # ------------------------------------------------------------------ pieces
    def delta_of(self, idx: torch.Tensor, train: bool = False) -> torch.Tensor:
        """δ (float, /255 units, on device) of the images ``idx`` of the noise set (or of the training set)."""
        labels = self.train_labels if train else self.labels
        src = self.noise[labels[idx]] if self.cfg.classwise else self.noise[idx]
        return src.to(self.device).float()

    def next_batch(self) -> torch.Tensor:
        """Indices into the training set: shuffled epochs, the last partial batch dropped."""
        n = len(self.train_images)
        bs = min(self.cfg.batch_size, n)
        if self.perm_pos + bs > n:
            self.perm = torch.randperm(n, generator=self.g_data)
            self.perm_pos = 0
        idx = self.perm[self.perm_pos : self.perm_pos + bs]
        self.perm_pos += bs
        return idx

    def poisoned_float(self, idx: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        clean255 = self.images[idx].to(self.device).float()
        return ((clean255 + delta).clamp(0, 255)) / 255.0

    def train_on(self, idx: torch.Tensor) -> tuple[float, int]:
        cfg = self.cfg
        clean255 = self.train_images[idx].to(self.device).float()
        x = (clean255 + self.delta_of(idx, train=True)).clamp(0, 255) / 255.0
        if self.transform is not None:
            x = self.transform(x, self.g_aug)
        y = self.train_labels[idx].to(self.device)
        if cfg.adv_steps:
            x = pgd_linf(self.model, x, y, cfg.adv_eps, cfg.adv_step, cfg.adv_steps, self.g_aug, self.bf16)
        freeze(self.model, False)
        return train_step(self.model, self.opt, x, y, self.bf16, cfg.grad_clip)

    def noise_grad(self, clean255: torch.Tensor, delta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """∂/∂δ of the surrogate's loss on T(x + δ) (+ REM's adversarial offset), summed over EOT draws."""
        cfg = self.cfg
        delta = delta.detach().requires_grad_(True)
        total = None
        for _ in range(cfg.samples):
            x = (clean255 + delta).clamp(0, 255) / 255.0
            if self.transform is not None:
                x = self.transform(x, self.g_aug)
            if cfg.adv_steps:
                # REM: the loss at the worst-case point x' = T(x+δ) + r; r is held fixed
                # while differentiating w.r.t. δ (the reference's Danskin-style gradient)
                adv = pgd_linf(
                    self.model, x.detach(), y, cfg.adv_eps, cfg.adv_step, cfg.adv_steps, self.g_aug, self.bf16
                )
                x = x + (adv - x).detach()
            loss = F.cross_entropy(forward(self.model, x, self.bf16), y)
            total = loss if total is None else total + loss
        (grad,) = torch.autograd.grad(total, delta)
        return grad

    def craft_batch(self, idx: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """``pgd_steps`` descent steps on δ for one batch (sample-wise), from ``start``."""
        cfg = self.cfg
        clean255 = self.images[idx].to(self.device).float()
        y = self.labels[idx].to(self.device)
        d = _project(start, clean255, cfg.eps)
        for _ in range(cfg.pgd_steps):
            grad = self.noise_grad(clean255, d, y)
            d = _project(d - cfg.step_size * grad.sign(), clean255, cfg.eps)
        return d

    def update_noise(self, idx: torch.Tensor) -> None:
        cfg = self.cfg
        self.model.eval()
        freeze(self.model)
        if cfg.classwise:
            y_cpu = self.labels[idx]
            stepped = self.craft_batch(idx, self.delta_of(idx)).cpu()
            # clipping at [0, 255] is per image; the class pattern averages the stepped copies
            sums = torch.zeros(self.noise.shape).index_add_(0, y_cpu, stepped)
            counts = torch.bincount(y_cpu, minlength=len(self.noise)).float()
            has = counts > 0
            self.noise[has] = (sums[has] / counts[has].view(-1, 1, 1, 1)).clamp(-cfg.eps, cfg.eps).half()
        else:
            if cfg.random_start:
                shape = (len(idx), *self.images.shape[1:])
                start = torch.rand(shape, generator=self.g_aug, device=self.g_aug.device) * 2 - 1
                start = start.to(self.device) * cfg.eps
            else:
                start = self.delta_of(idx)
            self.noise[idx] = self.craft_batch(idx, start).cpu().half()
        freeze(self.model, False)

    def evaluate(self) -> tuple[float, float]:
        """Surrogate accuracy and loss on the poisoned images (eval mode)."""
        if self.cfg.eval_with_transform and self.transform is not None:
            self.model.eval()
            correct, loss_sum = 0, 0.0
            with torch.no_grad():
                for b0 in range(0, len(self.images), 500):
                    idx = torch.arange(b0, min(b0 + 500, len(self.images)))
                    x = self.transform(self.poisoned_float(idx, self.delta_of(idx)), self.g_aug)
                    logits = forward(self.model, x, self.bf16)
                    y = self.labels[idx].to(self.device)
                    correct += int((logits.argmax(1) == y).sum())
                    loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            return 100.0 * correct / len(self.images), loss_sum / len(self.images)
        return accuracy_and_loss(self.model, self.poisoned_images(), self.labels, self.device, self.bf16)

    def poisoned_images(self) -> torch.Tensor:
        """x + δ rounded to uint8 (for evaluation; the final bytes go through apply_linf)."""
        out = []
        for b0 in range(0, len(self.images), 1000):
            idx = torch.arange(b0, min(b0 + 1000, len(self.images)))
            d = self.noise[self.labels[idx]] if self.cfg.classwise else self.noise[idx]
            out.append((self.images[idx].float() + d.float().round()).clamp(0, 255).to(torch.uint8))
        return torch.cat(out)

    def set_lr(self) -> None:
        cfg = self.cfg
        lr = cfg.lr
        if cfg.schedule == "steps" and cfg.lr_decay_every:
            lr = cfg.lr * cfg.lr_decay ** (self.round // cfg.lr_decay_every)
        for group in self.opt.param_groups:
            group["lr"] = lr

    # ------------------------------------------------------------------ loops
    def run(self) -> torch.Tensor:
        st = self.ctx.load_state()
        if st and st.get("phase_name") == "minmin":
            self.load(st)
        if self.phase == "done":
            return self.noise
        if self.cfg.schedule == "rounds":
            self._run_rounds()
        else:
            self._run_steps()
        self.ctx.save_state(self.state() | {"phase": "done"})
        return self.noise

    def _noise_batches(self) -> list[torch.Tensor]:
        n = len(self.images)
        bs = self.cfg.noise_batch
        return [torch.arange(b0, min(b0 + bs, n)) for b0 in range(0, n, bs)]

    def _final_batches(self) -> list[torch.Tensor]:
        if not self.cfg.final_drop_last:
            return self._noise_batches()
        n, bs = len(self.images), min(self.cfg.batch_size, len(self.images))
        # a generator of its own, so a resumed final pass draws the same batches
        perm = torch.randperm(n, generator=self.ctx.generator(303))
        return [perm[b0 : b0 + bs] for b0 in range(0, n - bs + 1, bs)]

    def _run_rounds(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        batches = self._noise_batches()
        while self.round < cfg.max_rounds and not self.converged:
            r = self.round + 1
            if self.phase == "train":
                self.set_lr()
                bar = ctx.bar(cfg.train_steps, f"round {r}: surrogate", initial=self.pos)
                while self.pos < cfg.train_steps:
                    loss, correct = self.train_on(self.next_batch())
                    self.pos += 1
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{loss:.3f}", acc=f"{100 * correct / min(cfg.batch_size, len(self.train_images)):.1f}"
                    )
                    self.tick()
                bar.close()
                self.phase, self.pos = "noise", 0
            if self.phase == "noise":
                bar = ctx.bar(len(batches), f"round {r}: noise", initial=self.pos)
                while self.pos < len(batches):
                    self.update_noise(batches[self.pos])
                    self.pos += 1
                    bar.update(1)
                    if self.history:
                        last = self.history[-1]
                        bar.set_postfix(
                            prev_acc=f"{last['acc_poisoned']:.1f}", prev_loss=f"{last['loss_poisoned']:.3f}"
                        )
                    self.tick()
                bar.close()
                acc, loss = self.evaluate()
                self.last_acc, self.last_loss = acc, loss
                self.history.append({"round": r, "acc_poisoned": acc, "loss_poisoned": loss, "seconds": ctx.elapsed()})
                ctx.log.info(f"round {r}: surrogate accuracy on the poisoned data {acc:.2f}%, loss {loss:.4f}")
                self.round += 1
                self.phase, self.pos = "train", 0
                if cfg.stop_acc is not None and acc >= cfg.stop_acc:
                    self.converged = True
                ctx.save_state(self.state())
        if not self.converged:
            ctx.log.warning(
                f"min-min stopped after {cfg.max_rounds} rounds without reaching {cfg.stop_acc}% surrogate accuracy"
            )

    def _run_steps(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        if self.phase not in ("step", "final"):
            self.phase = "step"
        if self.phase == "step":
            bar = ctx.bar(cfg.max_rounds, "steps", initial=self.round)
            run_loss = run_acc = None
            while self.round < cfg.max_rounds:
                self.set_lr()
                idx = self.next_batch()
                self.update_noise(idx)
                loss, correct = self.train_on(idx)
                acc = 100.0 * correct / len(idx)
                run_loss = loss if run_loss is None else 0.95 * run_loss + 0.05 * loss
                run_acc = acc if run_acc is None else 0.95 * run_acc + 0.05 * acc
                self.round += 1
                bar.update(1)
                bar.set_postfix(loss=f"{run_loss:.3f}", acc=f"{run_acc:.1f}")
                if self.round % max(1, cfg.max_rounds // 10) == 0 or self.round == cfg.max_rounds:
                    self.history.append({"step": self.round, "train_loss": run_loss, "train_acc": run_acc})
                    ctx.log.info(
                        f"step {self.round}/{cfg.max_rounds}: surrogate loss {run_loss:.4f}, acc {run_acc:.1f}%"
                    )
                self.tick()
            bar.close()
            self.phase, self.pos = "final", 0
            ctx.save_state(self.state())
        batches = self._final_batches()
        bar = ctx.bar(len(batches), "final noise pass", initial=self.pos)
        while self.pos < len(batches):
            self.update_noise(batches[self.pos])
            self.pos += 1
            bar.update(1)
            self.tick()
        bar.close()
        self.last_acc, self.last_loss = self.evaluate()
        self.converged = True


def run_min_min(
    ctx: CraftContext,
    cfg: MinMinConfig,
    model: nn.Module,
    transform: FloatAugment | None = None,
    data: ImageSet | None = None,
    train_data: ImageSet | None = None,
) -> tuple[torch.Tensor, MinMin]:
    """Run the loop: δ steps on ``data`` (default: every image; class-wise only may use a
    subset), the surrogate trains on ``train_data`` (default: every image); returns the δ
    of every image of ``ctx.clean`` in /255 units (float) and the loop object."""
    for part in (data, train_data):
        if part is not None and not cfg.classwise and len(part) != ctx.n:
            raise ValueError(
                "a sample-wise min-min needs every image: only class-wise noise can be crafted on a subset"
            )
    loop = MinMin(ctx, cfg, model, transform, data, train_data)
    noise = loop.run()
    delta = noise[ctx.clean.labels] if cfg.classwise else noise
    return delta.float(), loop
