"""SSBA — sample-specific invisible backdoor (Li et al., 2021) — with a StegaStamp-style
encoder/decoder trained here.

BackdoorBench ships SSBA as pre-computed poisoned images made with a StegaStamp encoder
trained on CIFAR-10 outside the benchmark. We train the pair ourselves on the attacker's
training set (cached under ``resource_dir/ssba/enc-<key>/``, checkpointed every epoch):

* encoder: the secret (``ssba_bits`` bits) goes through a dense layer to a 3x16x16 map,
  is upsampled to 32x32, concatenated with the image and fed to a small U-Net whose
  output is a residual; the encoded image is ``clamp(x + residual, 0, 1)``;
* decoder: a strided CNN that recovers the bits from an encoded image;
* loss: bit cross-entropy + ``ssba_l2_weight`` x MSE(residual); the image term is off for
  the first 30 % of the steps and ramps in linearly until 70 % (StegaStamp's schedule,
  in fractions of training); a 1x1 path from the secret map to the residual makes the
  bits learnable within a CPU-scale budget; the decoder sees the
  encoded image with +-0.5/255 noise so that uint8 rounding does not erase the code;
  random secrets per sample during training; Adam.

The trigger embeds one FIXED bit string (drawn from ``random_seed``) in every poisoned
image, rounded to uint8; each image gets a different, image-dependent residual. Dirty-label.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.augment import random_flip, to_float
from utils.data import ImageSet
from utils.dataelixir.triggers.aux import Resumable, aux_keys, shuffled_batches
from utils.dataelixir.triggers.base import Log, Trigger, aux_subset, cache_dir
from utils.fileio import tensor_fingerprint
from utils.options import Key, Range
from utils.progress import progress
from utils.runtime import autocast, to_channels_last


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
        # a straight path from the secret map to the residual: the bits become decodable
        # within a few hundred steps, which a CPU-scale budget needs
        self.direct = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor, secret: torch.Tensor) -> torch.Tensor:
        """Residual to add to ``x`` ([0,1] images) so that it carries ``secret`` (0/1 floats)."""
        s = self.secret(secret * 2 - 1).view(-1, 3, 16, 16)
        s = F.interpolate(s, scale_factor=2, mode="nearest")
        inp = torch.cat([x * 2 - 1, s], dim=1)
        h1 = self.c1(inp)
        h2 = self.c2(h1)
        h3 = self.c3(h2)
        h4 = self.c4(h3)
        u = self.u3(torch.cat([F.interpolate(h4, scale_factor=2), h3], 1))
        u = self.u2(torch.cat([F.interpolate(u, scale_factor=2), h2], 1))
        u = self.u1(torch.cat([F.interpolate(u, scale_factor=2), h1, inp], 1))
        return self.out(u) + self.direct(s)


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
        return self.head(self.body(x * 2 - 1))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


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
            "weight of the image-residual MSE against the bit loss (off for 30% of training, then ramped in)",
            range=Range(0),
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
            **{k: p[k] for k in ("ssba_bits", "ssba_l2_weight")},
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
        start, history, seconds = 0, [], 0.0
        if state is not None:
            enc.load_state_dict(state["encoder"])
            dec.load_state_dict(state["decoder"])
            opt.load_state_dict(state["optimizer"])
            g.set_state(state["rng"])
            start, history, seconds = state["epoch"], state["history"], state["seconds"]
            log(f"ssba: resuming encoder/decoder training after epoch {start}")
        bs = min(p["aux_batch_size"], len(data))
        steps = max(1, len(data) // bs)
        total = p["aux_epochs"] * steps
        for epoch in range(start, p["aux_epochs"]):
            t0 = time.time()
            bit_acc = l2 = 0.0
            batches = shuffled_batches(len(data), bs, g)
            bar = progress(batches, desc=f"ssba enc/dec {epoch + 1}/{p['aux_epochs']}", leave=False, dynamic_ncols=True)
            for step, idx in enumerate(bar):
                x = to_float(random_flip(data.images[idx], g)).to(device, memory_format=torch.channels_last)
                bits = torch.randint(0, 2, (len(idx), p["ssba_bits"]), generator=g).float().to(device)
                noise = ((torch.rand(x.shape, generator=g) - 0.5) / 255).to(device)
                # StegaStamp's schedule: no image loss until the bits are learnable, then a ramp
                frac = ((epoch * steps + step) - 0.3 * total) / (0.4 * total)
                weight = p["ssba_l2_weight"] * min(1.0, max(0.0, frac))
                with autocast(device, self.bf16):
                    res = enc(x, bits).float()
                    coded = (x + res).clamp(0, 1)
                    logits = dec(coded + noise).float()
                bce = F.binary_cross_entropy_with_logits(logits, bits)
                mse = res.pow(2).mean()
                loss = bce + weight * mse
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                acc = ((logits > 0).float() == bits).float().mean().item()
                bit_acc += acc
                l2 += mse.item()
                bar.set_postfix(bits=f"{acc:.3f}", rmse255=f"{255 * math.sqrt(mse.item()):.2f}")
            bar.close()
            seconds += time.time() - t0
            n = len(batches)
            history.append({"epoch": epoch + 1, "bit_acc": bit_acc / n, "residual_rmse_255": 255 * math.sqrt(l2 / n)})
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
                }
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
            "fixed_secret_bit_acc_uint8": round(bit_acc_fixed, 4),
            "psnr_db": round(psnr(coded, probe), 2),
        }

    @torch.no_grad()
    def _encode(self, enc: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        x = to_float(images.to(device)).contiguous(memory_format=torch.channels_last)
        secret = self.secret.to(device).expand(len(x), -1)
        # float32 so that the uint8 output does not depend on bf16 rounding
        res = enc(x, secret).float()
        return (x + res).clamp(0, 1).mul(255).round().to(torch.uint8)

    def apply(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        if self.encoder is None:
            raise RuntimeError("ssba: call prepare() before apply()")
        return self._encode(self.encoder, images, images.device)


TRIGGER = TriggerSSBA
