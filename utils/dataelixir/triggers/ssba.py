"""SSBA — sample-specific invisible backdoor (Li et al., 2021) — with a StegaStamp-style
encoder/decoder trained here.

BackdoorBench ships SSBA as pre-computed poisoned images made with a StegaStamp encoder
trained on CIFAR-10 outside the benchmark (``resource/ssba/train.py``, run with
``--use_residual 0``). We train the pair ourselves on the attacker's training set (cached
under ``resource_dir/ssba/enc-<key>/``, checkpointed every epoch):

* encoder: the secret (``ssba_bits`` bits) goes through a dense layer to a 3x16x16 map,
  is upsampled to 32x32, concatenated with the image and fed to a small U-Net. With
  ``ssba_output: image`` (BackdoorBench's ``--use_residual 0``) the sigmoid of its output
  IS the encoded image; with ``residual`` the output is a residual and the encoded image
  is ``clamp(x + residual, 0, 1)``;
* decoder: a strided CNN that recovers the bits from an encoded image;
* loss: bit cross-entropy + w x MSE(encoded, image). ``ssba_l2_schedule: bit_acc``
  (BackdoorBench's): w = 0 until a training batch's bit accuracy exceeds 0.9; counting
  the steps s since then, w = ``ssba_l2_weight`` x clip((s - 1000) / 3000, 0, 1). The
  1000 and 3000 steps belong to the reference's run of 20 epochs of 50,000 images in
  batches of 64 (``REFERENCE_STEPS``, counted in whole batches as we count them); a
  shorter run scales both by its steps / ``REFERENCE_STEPS`` (CPU scale, 5000 images,
  10 epochs: 780 steps, so 50 and 150). ``fraction``: w is off for the first 30 % of
  the steps and ramps in linearly until 70 %, whatever the bit accuracy.
  A 1x1 path from the secret map to the output makes the bits learnable within a
  CPU-scale budget; the decoder sees the encoded image with +-0.5/255 noise so that
  uint8 rounding does not erase the code; random secrets per sample during training; Adam.

The trigger embeds one FIXED bit string (drawn from ``random_seed``) in every poisoned
image, rounded to uint8; each image gets a different, image-dependent change. Dirty-label.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.augment import random_flip, to_float
from utils.data import ImageSet, psnr_db
from utils.dataelixir.triggers.aux import Resumable, aux_keys, shuffled_batches
from utils.dataelixir.triggers.base import Log, Trigger, aux_subset, cache_dir
from utils.fileio import tensor_fingerprint
from utils.options import Key, Range
from utils.progress import progress
from utils.runtime import autocast, to_channels_last

# BackdoorBench's StegaStamp run (resource/ssba/train.py): the image loss starts once a
# batch's bit accuracy exceeds START_ACC, waits AWAIT_STEPS, then ramps in over RAMP_STEPS,
# in a run of REFERENCE_STEPS (20 epochs of 50,000 CIFAR-10 images in batches of 64, counted
# in whole batches; the reference's DataLoader also runs each epoch's last partial batch,
# 15,640 steps in all)
START_ACC = 0.9
AWAIT_STEPS = 1000
RAMP_STEPS = 3000
REFERENCE_STEPS = 20 * (50_000 // 64)
OUTPUTS = ("image", "residual")
SCHEDULES = ("bit_acc", "fraction")


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU(inplace=True))


class StegaEncoder(nn.Module):
    def __init__(self, bits: int, width: int = 32):
        super().__init__()
        w = width
        self.secret = nn.Linear(bits, 3 * 16 * 16)
        self.c1 = _conv(6, w)
        self.c2 = _conv(w, 2 * w, 2)  # 16x16
        self.c3 = _conv(2 * w, 4 * w, 2)  # 8x8
        self.c4 = _conv(4 * w, 8 * w, 2)  # 4x4
        self.u3 = _conv(8 * w + 4 * w, 4 * w)
        self.u2 = _conv(4 * w + 2 * w, 2 * w)
        self.u1 = _conv(2 * w + w + 6, w)
        self.out = nn.Conv2d(w, 3, 1)
        # a straight path from the secret map to the output: the bits become decodable
        # within a few hundred steps, which a CPU-scale budget needs
        self.direct = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor, secret: torch.Tensor) -> torch.Tensor:
        """The raw output for ``x`` ([0,1] images) carrying ``secret`` (0/1 floats):
        ``encoded_image`` turns it into the encoded image."""
        s = self.secret(secret * 2 - 1).view(-1, 3, 16, 16)
        s = F.interpolate(s, size=x.shape[-2:], mode="nearest")  # 32x32: x2, as before; 64x64: x4
        inp = torch.cat([x * 2 - 1, s], dim=1)
        h1 = self.c1(inp)
        h2 = self.c2(h1)
        h3 = self.c3(h2)
        h4 = self.c4(h3)
        u = self.u3(torch.cat([F.interpolate(h4, scale_factor=2), h3], 1))
        u = self.u2(torch.cat([F.interpolate(u, scale_factor=2), h2], 1))
        u = self.u1(torch.cat([F.interpolate(u, scale_factor=2), h1, inp], 1))
        return self.out(u) + self.direct(s)


def encoded_image(x: torch.Tensor, out: torch.Tensor, output: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoded image and its change from ``x``, from the encoder's raw output ``out``:
    ``image`` (BackdoorBench's ``--use_residual 0``): ``sigmoid(out)`` is the image itself;
    ``residual``: ``out`` is added to ``x`` and the sum clamped to [0, 1] (the image loss
    then penalises the unclamped residual, as StegaStamp's residual mode does)."""
    if output == "image":
        coded = torch.sigmoid(out)
        return coded, coded - x
    return (x + out).clamp(0, 1), out


@dataclass
class ImageLossSchedule:
    """Weight of the image loss at each training step.

    ``bit_acc`` (BackdoorBench's): 0 until a batch's bit accuracy exceeds ``START_ACC``;
    ``since`` steps after that, ``weight * clip((since - await) / ramp, 0, 1)``, where
    await and ramp are ``AWAIT_STEPS`` and ``RAMP_STEPS`` times min(1, total_steps /
    ``REFERENCE_STEPS``) rounded to whole steps: a shorter run keeps the reference's
    proportions of its length. ``fraction``: 0 for the first 30 % of the steps, then a
    linear ramp to ``weight`` at 70 %, whatever the bit accuracy."""

    weight: float
    mode: str
    total_steps: int
    since: int = -1  # steps since the bit accuracy first exceeded START_ACC; -1: not yet

    @property
    def await_ramp(self) -> tuple[int, int]:
        scale = min(1.0, self.total_steps / REFERENCE_STEPS)
        return round(AWAIT_STEPS * scale), max(1, round(RAMP_STEPS * scale))

    def at(self, step: int) -> float:
        """The weight of global step ``step`` (0-based), before it runs."""
        if self.mode == "fraction":
            frac = (step - 0.3 * self.total_steps) / (0.4 * self.total_steps)
        else:
            wait, ramp = self.await_ramp
            frac = (self.since - wait) / ramp
        return self.weight * min(1.0, max(0.0, frac))

    def observe(self, bit_acc: float) -> None:
        """After a step: its batch's bit accuracy (the step that first exceeds
        ``START_ACC`` counts as 0 steps since)."""
        if self.since >= 0:
            self.since += 1
        elif bit_acc > START_ACC:
            self.since = 0


class StegaDecoder(nn.Module):
    def __init__(self, bits: int, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            _conv(3, w),
            _conv(w, w, 2),
            _conv(w, 2 * w),
            _conv(2 * w, 2 * w, 2),
            _conv(2 * w, 4 * w),
            _conv(4 * w, 4 * w, 2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w * 16, 8 * w), nn.ReLU(inplace=True), nn.Linear(8 * w, bits)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x * 2 - 1)
        # 4x4 at 32x32 input; a larger image's feature map is pooled to the head's 4x4
        return self.head(h if h.shape[-1] == 4 else F.adaptive_avg_pool2d(h, 4))


class TriggerSSBA(Trigger):
    name = "ssba"
    chunk = 512
    keys = {
        **aux_keys(
            {
                "aux_width": "base width of the StegaStamp encoder/decoder (32 = default, 16 = CPU scale)",
                "aux_lr": "Adam learning rate of the encoder/decoder (StegaStamp: 1e-4; 1e-3 trains faster at CPU scale)",
            },
            aux_width=32,
            aux_epochs=20,
            aux_subset=0,
            aux_batch_size=64,
            aux_lr=0.0001,
        ),
        "ssba_bits": Key(100, "length of the embedded bit string (100 as in StegaStamp)", range=Range(8, 1024)),
        "ssba_l2_weight": Key(
            10.0,
            "weight of the image MSE against the bit loss once ramped in (BackdoorBench: 10)",
            range=Range(0),
        ),
        "ssba_output": Key(
            "image",
            "what the encoder outputs: image (BackdoorBench's --use_residual 0: its sigmoid is the encoded image)"
            " or residual (added to the image and clamped)",
            choices=OUTPUTS,
        ),
        "ssba_l2_schedule": Key(
            "bit_acc",
            "when the image loss comes in: bit_acc (BackdoorBench's: once bit accuracy > 0.9, wait 1000 steps,"
            " ramp over 3000, both scaled by training steps / 15620 when shorter) or fraction (off for 30%"
            " of training, ramped in until 70%)",
            choices=SCHEDULES,
        ),
    }

    def validate(self) -> None:
        p = self.params
        rng = np.random.default_rng(self.seed)
        self.secret = torch.from_numpy(rng.integers(0, 2, size=p["ssba_bits"]).astype(np.float32))
        self.encoder: StegaEncoder | None = None
        self.decoder: StegaDecoder | None = None

    def prepare(self, train: ImageSet, device: torch.device, resource_dir: Path, log: Log = print) -> None:
        self.device = device
        p = self.params
        settings = {
            "kind": "StegaStamp encoder/decoder",
            **{k: p[k] for k in ("aux_width", "aux_epochs", "aux_subset", "aux_batch_size", "aux_lr")},
            **{k: p[k] for k in ("ssba_bits", "ssba_l2_weight", "ssba_output", "ssba_l2_schedule")},
            "seed": self.seed,
            "data": tensor_fingerprint(train.images, train.labels),
            "precision": self.precision,
        }
        folder = cache_dir(resource_dir, "ssba", settings, "enc-")
        enc, dec = StegaEncoder(p["ssba_bits"], p["aux_width"]), StegaDecoder(p["ssba_bits"], p["aux_width"])
        final = Resumable(folder / "model.pt", settings, log, "ssba encoder/decoder")
        state = final.load()
        if state is not None:
            enc.load_state_dict(state["encoder"])
            dec.load_state_dict(state["decoder"])
            info = state["info"]
            log(f"ssba: loaded the encoder/decoder from {final.path}")
        else:
            info = self._train(enc, dec, aux_subset(train, p["aux_subset"], self.seed), device, folder, settings, log)
            info["path"] = str(final.path)
            final.save({"encoder": enc.cpu().state_dict(), "decoder": dec.cpu().state_dict(), "info": info})
            (folder / "train_ckpt.pt").unlink(missing_ok=True)
        self.encoder = to_channels_last(enc, device).eval()
        self.decoder = to_channels_last(dec, device).eval()
        self.aux_info = {"encoder": info}

    def _train(self, enc, dec, data: ImageSet, device, folder: Path, settings: dict, log: Log) -> dict:
        p = self.params
        # channels_last: several times faster for these narrow convolutions on CPU
        to_channels_last(enc, device).train()
        to_channels_last(dec, device).train()
        opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=p["aux_lr"])
        g = torch.Generator().manual_seed(self.seed)
        ckpt = Resumable(folder / "train_ckpt.pt", settings, log, "ssba training checkpoint")
        state = ckpt.load()
        start, history, seconds, since = 0, [], 0.0, -1
        if state is not None:
            enc.load_state_dict(state["encoder"])
            dec.load_state_dict(state["decoder"])
            opt.load_state_dict(state["optimizer"])
            g.set_state(state["rng"])
            start, history, seconds, since = state["epoch"], state["history"], state["seconds"], state["l2_since"]
            log(f"ssba: resuming encoder/decoder training after epoch {start}")
        bs = min(p["aux_batch_size"], len(data))
        steps = max(1, len(data) // bs)
        total = p["aux_epochs"] * steps
        schedule = ImageLossSchedule(p["ssba_l2_weight"], p["ssba_l2_schedule"], total, since)
        for epoch in range(start, p["aux_epochs"]):
            t0 = time.time()
            bit_acc = l2 = 0.0
            batches = shuffled_batches(len(data), bs, g)
            bar = progress(batches, desc=f"ssba enc/dec {epoch + 1}/{p['aux_epochs']}", leave=False, dynamic_ncols=True)
            for step, idx in enumerate(bar):
                x = to_float(random_flip(data.images[idx], g)).to(device, memory_format=torch.channels_last)
                bits = torch.randint(0, 2, (len(idx), p["ssba_bits"]), generator=g).float().to(device)
                noise = ((torch.rand(x.shape, generator=g) - 0.5) / 255).to(device)
                weight = schedule.at(epoch * steps + step)
                with autocast(device, self.bf16):
                    coded, res = encoded_image(x, enc(x, bits).float(), p["ssba_output"])
                    logits = dec(coded + noise).float()
                bce = F.binary_cross_entropy_with_logits(logits, bits)
                mse = res.pow(2).mean()
                loss = bce + weight * mse
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                acc = ((logits > 0).float() == bits).float().mean().item()
                schedule.observe(acc)
                bit_acc += acc
                l2 += mse.item()
                bar.set_postfix(bits=f"{acc:.3f}", rmse255=f"{255 * math.sqrt(mse.item()):.2f}")
            bar.close()
            seconds += time.time() - t0
            n = len(batches)
            history.append(
                {
                    "epoch": epoch + 1,
                    "bit_acc": bit_acc / n,
                    "residual_rmse_255": 255 * math.sqrt(l2 / n),
                    "l2_weight": schedule.at((epoch + 1) * steps),
                }
            )
            log(
                f"ssba enc/dec: epoch {epoch + 1} bit accuracy {bit_acc / n:.3f} residual rmse {255 * math.sqrt(l2 / n):.2f}/255"
            )
            ckpt.save(
                {
                    "encoder": enc.state_dict(),
                    "decoder": dec.state_dict(),
                    "optimizer": opt.state_dict(),
                    "rng": g.get_state(),
                    "epoch": epoch + 1,
                    "history": history,
                    "seconds": seconds,
                    "l2_since": schedule.since,
                }
            )
        if schedule.mode == "bit_acc" and schedule.since < 0:
            log(
                "ssba: warning: no training batch's bit accuracy exceeded 0.9, so the image loss never came in"
                " (BackdoorBench's schedule); ssba_l2_schedule: fraction brings it in by step count"
            )
        enc.eval()
        dec.eval()
        # how well the fixed secret survives uint8 rounding on images the pair trained on
        probe = data.images[: min(256, len(data))]
        coded = self._encode(enc, probe, device)
        with torch.no_grad(), autocast(device, self.bf16):
            logits = dec(to_float(coded).to(device)).float()
        bit_acc_fixed = ((logits > 0).float().cpu() == self.secret).float().mean().item()
        return {
            "train_images": len(data),
            "train_seconds": round(seconds, 1),
            "final_bit_acc": history[-1]["bit_acc"] if history else None,
            "steps_since_bit_acc_above_0_9": schedule.since,  # -1: never
            "fixed_secret_bit_acc_uint8": round(bit_acc_fixed, 4),
            "psnr_db": round(psnr_db(coded, probe, per_image=False), 2),
        }

    @torch.no_grad()
    def _encode(self, enc: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        x = to_float(images.to(device)).contiguous(memory_format=torch.channels_last)
        secret = self.secret.to(device).expand(len(x), -1)
        # float32 so that the uint8 output does not depend on bf16 rounding
        coded, _ = encoded_image(x, enc(x, secret).float(), self.params["ssba_output"])
        return coded.mul(255).round().to(torch.uint8)

    def apply(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        if self.encoder is None:
            raise RuntimeError("ssba: call prepare() before apply()")
        return self._encode(self.encoder, images, images.device)


TRIGGER = TriggerSSBA
