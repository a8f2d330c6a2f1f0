"""Low Frequency attack (Zeng et al., 2021) following BackdoorBench v1's recipe.

1. A clean classifier is trained here on the attacker's training set (BackdoorBench:
   PreActResNet18, 100 epochs, SGD 0.01, cosine) and cached under
   ``resource_dir/lf/clf-<key>/``.
2. A universal adversarial perturbation towards ``attack_target`` is crafted on
   ``lf_num_images`` training images: for every image the current ``v`` does not fool,
   a targeted DeepFool step ``dr`` (overshoot 0.02, at most ``lf_max_iter_df``
   iterations) is computed and, if it converged, ``v <- norm(smooth(v + smooth(dr)))``
   where ``smooth`` is BackdoorBench's low-pass filter ``gauss_smooth`` (separable
   Gaussian, sigma ``lf_sigma`` = 6 px, 5 sigma = 30 taps at offsets +-0.5 ... +-14.5,
   zero padding of 14 before and 15 after: every application moves the pattern half a
   pixel up and left) and ``norm`` min-max scales ``v`` to [0, ``lf_range``] = [0, 0.2].
   A pass ends with the fooling rate on ``lf_num_images`` other training images; the
   search stops at ``lf_fool_stop`` (BackdoorBench: 1 - delta = 0.2), when the last five
   rates lie within 0.01, or after ``lf_max_passes`` passes. The pattern is cached
   (``uap-<key>.pt`` beside the classifier) and every pass is checkpointed.
3. The trigger adds ``255 * v`` to an image, clipped and truncated to uint8
   (BackdoorBench's ``SimpleAdditiveTrigger`` + ``npClipAndToUint8``). Dirty-label.

Deviation: BackdoorBench measures the fooling rate on 10 test images per class; the
attacker here only holds the training set, so it uses held-out training images.
``lf_batch`` > 1 runs DeepFool on several images at the current ``v`` at once (faster on
CPU; 1 reproduces the sequential algorithm).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.augment import to_float
from utils.data import ImageSet, class_balanced_subset
from utils.dataelixir.triggers.aux import Resumable, aux_keys, train_aux_classifier
from utils.dataelixir.triggers.base import Log, Trigger, settings_key
from utils.options import Key, Range
from utils.progress import progress


def gaussian_lowpass(v: torch.Tensor, sigma: float) -> torch.Tensor:
    """BackdoorBench's ``gauss_smooth`` on ``v`` [B,C,H,W] (same size): along rows, then
    columns, a Gaussian of ``n = round(5 sigma)`` taps at offsets ``i - (n - 1) / 2``,
    zero padding ``n // 2`` after and, for even ``n``, one less before. For even ``n`` (30
    at sigma 6) the taps fall between pixels and the output is centred half a pixel
    before the input: an impulse at row 16 lands at 15.5."""
    n = max(1, round(5 * sigma))
    t = torch.arange(n, dtype=v.dtype, device=v.device) - (n - 1) / 2
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    after = n // 2
    before = after - (1 - n % 2)
    c = v.shape[1]
    v = F.pad(v, (before, after, before, after))
    v = F.conv2d(v, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(v, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)


def minmax_range(v: torch.Tensor, rng: float) -> torch.Tensor:
    lo, hi = v.min(), v.max()
    return (v - lo) / (hi - lo).clamp_min(1e-12) * rng


def targeted_deepfool(
    model: nn.Module, x: torch.Tensor, target: int, overshoot: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image of ``x`` [B,3,H,W] (float, [0,1]): the DeepFool perturbation that moves
    the prediction to ``target`` along the linearised (target - initial label) margin,
    and the number of iterations it took."""
    with torch.no_grad():
        label = model(x).argmax(1)
    r_tot = torch.zeros_like(x)
    iters = torch.zeros(len(x), dtype=torch.long)
    active = label != target
    for _ in range(max_iter):
        if not active.any():
            break
        xa = (x + (1 + overshoot) * r_tot).requires_grad_(True)
        logits = model(xa)
        pred = logits.argmax(1).detach()
        active = active & (pred != target)
        if not active.any():
            break
        margin = logits[:, target] - logits.gather(1, label[:, None]).squeeze(1)
        (w,) = torch.autograd.grad(margin.sum(), xa)
        w = w.detach()
        wn = w.flatten(1).norm(dim=1).clamp_min(1e-12)
        step = (margin.detach().abs() / wn**2)[:, None, None, None] * w
        step = torch.where(torch.isfinite(step), step, torch.zeros_like(step))
        r_tot = r_tot + step * active[:, None, None, None]
        iters += active.long()
    return (1 + overshoot) * r_tot, iters


class TriggerLF(Trigger):
    name = "lf"
    keys = {
        **aux_keys(
            {"aux_arch": "clean classifier the perturbation is crafted on (BackdoorBench: preactresnet18)"},
            aux_arch="preactresnet18",
            aux_width=64,
            aux_epochs=100,
            aux_subset=0,
            aux_batch_size=128,
            aux_lr=0.01,
        ),
        "lf_num_images": Key(
            100,
            "training images the universal perturbation is fitted on (and as many for its fooling rate)",
            range=Range(1),
        ),
        "lf_max_passes": Key(50, "at most this many passes over those images (BackdoorBench: 50)", range=Range(1)),
        "lf_max_iter_df": Key(
            200, "at most this many targeted DeepFool iterations per image (BackdoorBench: 200)", range=Range(2)
        ),
        "lf_overshoot": Key(0.02, "DeepFool overshoot (BackdoorBench: 0.02)", range=Range(0, 1)),
        "lf_sigma": Key(
            6.0,
            "standard deviation in pixels of the Gaussian low-pass filter of round(5 sigma) taps (BackdoorBench: 6)",
            range=Range(0, 32, low_open=True),
        ),
        "lf_range": Key(
            0.2,
            "the perturbation is min-max scaled to [0, lf_range] on the 0-1 scale (BackdoorBench: 0.2)",
            range=Range(0, 1, low_open=True),
        ),
        "lf_fool_stop": Key(
            0.2,
            "stop once this fraction of held-out images changes prediction (BackdoorBench: 1 - 0.8)",
            range=Range(0, 1, low_open=True),
        ),
        "lf_batch": Key(1, "images per batched DeepFool call (1 = the sequential reference algorithm)", range=Range(1)),
    }

    def validate(self) -> None:
        self.pattern: torch.Tensor | None = None

    def prepare(self, train: ImageSet, device: torch.device, resource_dir: Path, log: Log = print) -> None:
        self.device = device
        p = self.params
        model, clf_info, folder = train_aux_classifier(
            "lf",
            p,
            train,
            device,
            resource_dir,
            self.seed,
            log,
            precision=self.precision,
            num_classes=self.num_classes,
            mean=self.mean,
            std=self.std,
        )
        model.float().eval()
        for q in model.parameters():
            q.requires_grad_(False)
        keys = ("lf_num_images", "lf_max_passes", "lf_max_iter_df", "lf_overshoot", "lf_sigma", "lf_range")
        settings = {
            "classifier": folder.name,
            "target": self.target,
            "seed": self.seed,
            "lowpass": "gauss_smooth",  # BackdoorBench's filter: a pattern made with another is not reused
            **{k: p[k] for k in (*keys, "lf_fool_stop", "lf_batch")},
        }
        ckpt = Resumable(folder / f"uap-{settings_key(settings)}.pt", settings, log, "lf perturbation")
        state = ckpt.load()
        t0 = time.time()
        if state is None or not state.get("done"):
            state = self._craft(model, train, device, ckpt, state, log)
        else:
            log(f"lf: loaded the universal perturbation from {ckpt.path}")
        self.pattern = state["v"].float()
        self.aux_info = {
            "classifier": clf_info,
            "perturbation_path": str(ckpt.path),
            "passes": state["passes"],
            "fooling_rates": state["fooling"],
            "craft_seconds": state.get("seconds", round(time.time() - t0, 1)),
        }

    def _craft(self, model, train, device, ckpt: Resumable, state, log: Log) -> dict:
        p = self.params
        n = p["lf_num_images"]
        pick = class_balanced_subset(train.labels, min(2 * n, len(train)), self.seed + 7)
        pick = pick[torch.randperm(len(pick), generator=torch.Generator().manual_seed(self.seed + 8))]
        fit = to_float(train.images[pick[:n]]).to(device)
        held = to_float(train.images[pick[n:] if len(pick) > n else pick]).to(device)
        g = torch.Generator().manual_seed(self.seed + 9)
        if state is None:
            side = self.image_size
            state = {"v": torch.zeros(1, 3, side, side), "passes": 0, "fooling": [], "done": False, "seconds": 0.0}
        else:
            g.set_state(state["rng"])
            log(f"lf: resuming the perturbation search after pass {state['passes']}")
        v = state["v"].to(device)
        with torch.no_grad():
            held_pred = model(held).argmax(1)
        while not state["done"]:
            t0 = time.time()
            order = torch.randperm(len(fit), generator=g)
            bs = p["lf_batch"]
            bar = progress(range(0, len(order), bs), desc=f"lf UAP pass {state['passes'] + 1}", leave=False)
            for i in bar:
                x = fit[order[i : i + bs]]
                with torch.no_grad():
                    same = model(x).argmax(1) == model((x + v).clamp(0, 1)).argmax(1)
                if not same.any():
                    continue
                dr, iters = targeted_deepfool(
                    model, (x[same] + v).clamp(0, 1), self.target, p["lf_overshoot"], p["lf_max_iter_df"]
                )
                for j in range(len(dr)):
                    if iters[j] < p["lf_max_iter_df"] - 1:  # converged (BackdoorBench's test)
                        v = gaussian_lowpass(v + gaussian_lowpass(dr[j : j + 1], p["lf_sigma"]), p["lf_sigma"])
                        v = minmax_range(v, p["lf_range"])
            with torch.no_grad():
                fooled = (model((held + v).clamp(0, 1)).argmax(1) != held_pred).float().mean().item()
            state["passes"] += 1
            state["fooling"].append(round(fooled, 4))
            last = state["fooling"][-5:]
            state["done"] = (
                fooled >= p["lf_fool_stop"]
                or state["passes"] >= p["lf_max_passes"]
                or (len(last) == 5 and max(last) - min(last) < 0.01)
            )
            state["seconds"] = round(state["seconds"] + time.time() - t0, 1)
            state.update(v=v.cpu(), rng=g.get_state())
            ckpt.save(state)
            log(f"lf: pass {state['passes']}: fooling rate {fooled:.3f}, |v| max {255 * v.abs().max().item():.1f}/255")
        if not math.isfinite(float(v.sum())):
            raise RuntimeError("lf: the perturbation search produced non-finite values")
        return state

    def apply(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        if self.pattern is None:
            raise RuntimeError("lf: call prepare() before apply()")
        out = images.float() + 255.0 * self.pattern.to(images.device)
        return out.clamp_(0, 255).to(torch.uint8)

    def info(self) -> dict:
        extra = (
            {"pattern_linf_255": round(255 * float(self.pattern.abs().max()), 2)} if self.pattern is not None else {}
        )
        return {**super().info(), **extra}


TRIGGER = TriggerLF
