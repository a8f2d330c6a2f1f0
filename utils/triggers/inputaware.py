"""Input-aware dynamic backdoor (Nguyen & Tran, 2020) following BackdoorBench v1's
CIFAR-10 setting, turned into a static poisoned dataset.

Auxiliary training (cached under ``resource_dir/inputaware/gen-<key>/``, checkpointed
every epoch, resumable in either phase):

1. mask phase (``mask_epochs``, BackdoorBench's ``clean_train_epochs`` 25): the mask
   generator M (an encoder-decoder ending in ``tanh(10 tanh(z))/2 + 1/2``: BackdoorBench's
   output ``tanh(z)/2 + 1/2`` passed through its ``threshold`` ``tanh(20 m - 10)/2 + 1/2``)
   is trained alone on ``lambda_norm * mean(relu(m - mask_density)) + lambda_div * div``
   (density 0.032, lambda_norm 100, lambda_div 1; Adam lr 0.01, betas 0.5/0.9), where
   ``div`` is the mean over pairs (x1_i, x2_i) of ``|x1_i - x2_i| / |m1_i - m2_i|`` (RMS
   distances per pair, images CIFAR-normalised as BackdoorBench's loaders give them;
   BackdoorBench applies lambda_div twice here, the same at its default 1);
2. joint phase (``aux_epochs``): M is frozen; a classifier C (PreActResNet18; SGD 0.01,
   momentum 0.9, wd 5e-4) and the pattern generator G (same encoder-decoder, output
   ``(tanh + 1)/2``; Adam lr 0.01, betas 0.5/0.9) are trained together. In every batch a
   fraction ``pratio`` of the images becomes backdoored, ``x + (G(x) - x) * M(x)`` with the
   target label, the next ``cross_ratio * pratio`` become cross samples
   ``x + (G(x') - x) * M(x')`` with the trigger of another image x' and their own label,
   and the rest stay clean; loss = CE + ``lambda_div`` x G's diversity loss, the mean over
   the pairs (backdoored image x_i, the image x'_i whose trigger the i-th cross sample
   borrows) of ``|x_i - x'_i| / |G(x_i) - G(x'_i)|`` (normalised as above). Both phases
   augment with BackdoorBench's RandomCrop(32, 5) + RandomRotation(10) + flip.

Static dataset (deviation, because DataElixir purifies a fixed training set): after
training, the ``pratio`` poisoned samples chosen by ``build_backdoor_data`` get their own
generated trigger and the attack label; ``round(cross_ratio * n_poisoned)`` other samples
get the trigger generated from a random other training image and keep their label; all
rounded to uint8. The auxiliary classifier C is discarded — the victim is trained from
scratch on the static set. Test images get their own trigger.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import build_classifier
from utils.augment import crop_rotate_flip, to_float
from utils.data import NUM_CLASSES, ImageSet
from utils.progress import progress
from utils.run_state import tensor_fingerprint
from utils.runtime import autocast, to_channels_last
from utils.trainer import CIFAR10_MEAN, CIFAR10_STD, Normalized
from utils.triggers import Key, Log, Range, Trigger, aux_subset, cache_dir
from utils.triggers.aux import Resumable, aux_keys, shuffled_batches
from utils.triggers.wanet import CROSS_RATIO, choose_cross

_GT0 = Range(0, low_open=True)


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class EncoderDecoder(nn.Module):
    """Three pooling stages down (32 -> 4), three upsampling stages back, no skips."""

    def __init__(self, out_channels: int, width: int = 32):
        super().__init__()
        w = width
        layers: list[nn.Module] = []
        cin = 3
        for c in (w, 2 * w, 4 * w):
            layers += _block(cin, c) + _block(c, c) + [nn.MaxPool2d(2)]
            cin = c
        layers += _block(cin, cin)
        for c in (4 * w, 2 * w, w):
            layers += (
                [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)] + _block(cin, c) + _block(c, c)
            )
            cin = c
        layers += [nn.Conv2d(cin, out_channels, 3, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)


def pattern_of(gen: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(gen(x)) + 1) / 2


def mask_nonlinearity(z: torch.Tensor) -> torch.Tensor:
    """BackdoorBench's mask: ``tanh(20 * (tanh(z)/2 + 1/2) - 10)/2 + 1/2 = tanh(10 tanh(z))/2 + 1/2``."""
    return torch.tanh(10 * torch.tanh(z)) / 2 + 0.5


def mask_of(mgen: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return mask_nonlinearity(mgen(x))


def _dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # the epsilon keeps the gradient finite when a batch pairs an image with itself
    return ((a - b).pow(2).flatten(1).mean(1) + 1e-12).sqrt()


def diversity_loss(x1: torch.Tensor, x2: torch.Tensor, out1: torch.Tensor, out2: torch.Tensor) -> torch.Tensor:
    """Mean over pairs i of ``|x1_i - x2_i| / (|out1_i - out2_i| + 1e-7)`` (RMS distances)."""
    return (_dist(x1, x2) / (_dist(out1, out2) + 1e-7)).mean()


_MEAN = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """CIFAR-10 mean/std normalisation: BackdoorBench measures the diversity distances on
    normalised images (and normalised patterns)."""
    return (x - _MEAN.to(x.device)) / _STD.to(x.device)


# BackdoorBench's Input-aware training transform (crop padding 5, rotation 10, flip)
_AUGMENT = crop_rotate_flip(5, 10.0)


class TriggerInputAware(Trigger):
    name = "inputaware"
    chunk = 512
    keys = {
        **aux_keys(
            {
                "aux_arch": "classifier trained jointly with the generator (BackdoorBench: preactresnet18); discarded afterwards",
            },
            aux_arch="preactresnet18",
            aux_width=64,
        ),
        "gen_width": Key(
            32,
            "first-stage channels of the pattern and mask generators (original: 32; CPU scale: 16)",
            range=Range(1, 256),
        ),
        **aux_keys({"aux_epochs": "joint classifier + generator epochs (BackdoorBench: 100)"}, aux_epochs=100),
        "mask_epochs": Key(
            25, "epochs of the mask-generator phase (BackdoorBench clean_train_epochs: 25)", range=Range(0)
        ),
        **aux_keys(
            {"aux_lr": "SGD learning rate of that classifier (BackdoorBench lr_C: 0.01)"},
            aux_subset=0,
            aux_batch_size=128,
            aux_lr=0.01,
        ),
        "lr_G": Key(0.01, "Adam learning rate of the pattern generator (BackdoorBench: 0.01)", range=_GT0),
        "lr_M": Key(0.01, "Adam learning rate of the mask generator (BackdoorBench: 0.01)", range=_GT0),
        "lambda_div": Key(1.0, "weight of the diversity losses (BackdoorBench: 1)", range=Range(0)),
        "lambda_norm": Key(100.0, "weight of the mask-density penalty (BackdoorBench: 100)", range=Range(0)),
        "mask_density": Key(
            0.032,
            "target fraction of masked pixels (BackdoorBench: 0.032)",
            range=Range(0, 1, low_open=True, high_open=True),
        ),
        "cross_ratio": Key(
            1.0,
            "cross-trigger samples per backdoored sample, in training batches and in the static set (1 = p_cross 0.1)",
            range=CROSS_RATIO,
        ),
    }

    def validate(self) -> None:
        self.gen: nn.Module | None = None
        self.mgen: nn.Module | None = None

    # ------------------------------------------------------------------ training
    def prepare(self, train: ImageSet, device: torch.device, resource_dir: Path, log: Log = print) -> None:
        self.device = device
        p = self.params
        settings = {
            "kind": "input-aware generators",
            # the training recipe: tanh(10 tanh) mask, per-pair normalised diversity, crop 5 + rotation 10 + flip
            "recipe": 2,
            **{k: p[k] for k in self.defaults if k != "cross_ratio"},
            "cross_ratio": p["cross_ratio"],
            "pratio": self.pratio,
            "target": self.target,
            "label_trans": self.label_trans,
            "seed": self.seed,
            "data": tensor_fingerprint(train.images, train.labels),
        }
        folder = cache_dir(resource_dir, "inputaware", settings, "gen-")
        gen, mgen = EncoderDecoder(3, p["gen_width"]), EncoderDecoder(1, p["gen_width"])
        final = Resumable(folder / "model.pt", settings, log, "inputaware generators")
        state = final.load()
        if state is not None:
            gen.load_state_dict(state["gen"])
            mgen.load_state_dict(state["mgen"])
            info = state["info"]
            log(f"inputaware: loaded the generators from {final.path}")
        else:
            data = aux_subset(train, p["aux_subset"], self.seed)
            info = self._train(gen, mgen, data, device, folder, settings, log)
            info["path"] = str(final.path)
            final.save({"gen": gen.cpu().state_dict(), "mgen": mgen.cpu().state_dict(), "info": info})
            (folder / "train_ckpt.pt").unlink(missing_ok=True)
        self.gen = to_channels_last(gen, device).eval()
        self.mgen = to_channels_last(mgen, device).eval()
        self.aux_info = {"generators": info}

    def _train(self, gen, mgen, data: ImageSet, device, folder: Path, settings: dict, log: Log) -> dict:
        from utils.backdoor import attack_targets  # here: utils.backdoor imports the trigger registry

        p = self.params
        clf = Normalized(build_classifier(p["aux_arch"], NUM_CLASSES, p["aux_width"])).to(device)
        # channels_last: several times faster for these narrow convolutions on CPU
        for net in (clf, gen, mgen):
            to_channels_last(net, device)
        opt_c = torch.optim.SGD(clf.parameters(), lr=p["aux_lr"], momentum=0.9, weight_decay=5e-4)
        opt_g = torch.optim.Adam(gen.parameters(), lr=p["lr_G"], betas=(0.5, 0.9))
        opt_m = torch.optim.Adam(mgen.parameters(), lr=p["lr_M"], betas=(0.5, 0.9))
        # BackdoorBench's MultiStep milestones (C: 100.., G: 200.., M: 10, 20) as epoch fractions
        g = torch.Generator().manual_seed(self.seed)
        ckpt = Resumable(folder / "train_ckpt.pt", settings, log, "inputaware training checkpoint")
        state = ckpt.load()
        m_done, j_done, history, seconds = 0, 0, [], 0.0
        if state is not None:
            for mod, key in (
                (clf, "clf"),
                (gen, "gen"),
                (mgen, "mgen"),
                (opt_c, "opt_c"),
                (opt_g, "opt_g"),
                (opt_m, "opt_m"),
            ):
                mod.load_state_dict(state[key])
            g.set_state(state["rng"])
            m_done, j_done, history, seconds = (
                state["mask_epoch"],
                state["joint_epoch"],
                state["history"],
                state["seconds"],
            )
            log(f"inputaware: resuming after mask epoch {m_done}, joint epoch {j_done}")
        bs = min(p["aux_batch_size"], len(data))

        def save() -> None:
            ckpt.save(
                {
                    "clf": clf.state_dict(),
                    "gen": gen.state_dict(),
                    "mgen": mgen.state_dict(),
                    "opt_c": opt_c.state_dict(),
                    "opt_g": opt_g.state_dict(),
                    "opt_m": opt_m.state_dict(),
                    "rng": g.get_state(),
                    "mask_epoch": m_done,
                    "joint_epoch": j_done,
                    "history": history,
                    "seconds": seconds,
                }
            )

        while m_done < p["mask_epochs"]:
            t0 = time.time()
            for group in opt_m.param_groups:  # M milestones at epochs 10 and 20 of 25
                group["lr"] = p["lr_M"] * (0.1 ** sum(m_done >= f * p["mask_epochs"] for f in (0.4, 0.8)))
            mgen.train()
            stats = np.zeros(3)
            bar = progress(
                shuffled_batches(len(data), bs, g), desc=f"inputaware mask {m_done + 1}/{p['mask_epochs']}", leave=False
            )
            for idx in bar:
                x1 = to_float(_AUGMENT(data.images[idx], g)).to(device, memory_format=torch.channels_last)
                x2 = x1[torch.randperm(len(x1), generator=g).to(device)]
                with autocast(device):
                    m1, m2 = mask_of(mgen, x1).float(), mask_of(mgen, x2).float()
                norm = F.relu(m1 - p["mask_density"]).mean()
                div = diversity_loss(normalise(x1), normalise(x2), m1, m2)
                loss = p["lambda_norm"] * norm + p["lambda_div"] * div
                opt_m.zero_grad(set_to_none=True)
                loss.backward()
                opt_m.step()
                stats += (loss.item(), m1.mean().item(), 1)
                bar.set_postfix(loss=f"{stats[0] / stats[2]:.3f}", density=f"{stats[1] / stats[2]:.3f}")
            bar.close()
            m_done += 1
            seconds += time.time() - t0
            history.append(
                {"phase": "mask", "epoch": m_done, "loss": stats[0] / stats[2], "density": stats[1] / stats[2]}
            )
            log(
                f"inputaware mask: epoch {m_done} loss {stats[0] / stats[2]:.3f} mask density {stats[1] / stats[2]:.3f}"
            )
            save()

        mgen.eval()
        for q in mgen.parameters():
            q.requires_grad_(False)
        n_bd = max(1, int(round(bs * self.pratio)))
        n_cross = int(round(n_bd * p["cross_ratio"]))
        n_bd = min(n_bd, bs)
        n_cross = min(n_cross, bs - n_bd)
        n_pair = min(n_bd, bs - n_bd)  # diversity pairs (BackdoorBench: num_bd)
        while j_done < p["aux_epochs"]:
            t0 = time.time()
            for group in opt_c.param_groups:  # C: milestones 100.. of 100 epochs: constant
                group["lr"] = p["aux_lr"]
            clf.train()
            gen.train()
            stats = np.zeros(6)
            bar = progress(
                shuffled_batches(len(data), bs, g), desc=f"inputaware joint {j_done + 1}/{p['aux_epochs']}", leave=False
            )
            for idx in bar:
                x = to_float(_AUGMENT(data.images[idx], g)).to(device, memory_format=torch.channels_last)
                y = data.labels[idx].to(device)
                x2 = x[torch.randperm(len(x), generator=g).to(device)]
                # x2[n_bd + i] lends its trigger to cross sample i and is the diversity partner of x[i]
                src = x2[n_bd : n_bd + max(n_pair, n_cross)]
                with autocast(device):
                    pat = pattern_of(gen, x[:n_bd]).float()
                    pat2 = pattern_of(gen, src).float()
                    m = mask_of(mgen, x[:n_bd]).float()
                    m2 = mask_of(mgen, src[:n_cross]).float()
                    bd = x[:n_bd] + (pat - x[:n_bd]) * m
                    sl = slice(n_bd, n_bd + n_cross)
                    cross = x[sl] + (pat2[:n_cross] - x[sl]) * m2
                    inputs = torch.cat([bd, cross, x[n_bd + n_cross :]])
                    labels = torch.cat([attack_targets(y[:n_bd], self.target, self.label_trans), y[n_bd:]])
                    logits = clf(inputs).float()
                ce = F.cross_entropy(logits, labels)
                div = diversity_loss(
                    normalise(x[:n_pair]), normalise(src[:n_pair]), normalise(pat[:n_pair]), normalise(pat2[:n_pair])
                )
                loss = ce + p["lambda_div"] * div
                opt_c.zero_grad(set_to_none=True)
                opt_g.zero_grad(set_to_none=True)
                loss.backward()
                opt_c.step()
                opt_g.step()
                pred = logits.argmax(1)
                stats += (
                    loss.item(),
                    (pred[:n_bd] == labels[:n_bd]).float().sum().item(),
                    (pred[n_bd + n_cross :] == labels[n_bd + n_cross :]).float().sum().item(),
                    n_bd,
                    len(idx) - n_bd - n_cross,
                    1,
                )
                bar.set_postfix(loss=f"{stats[0] / stats[5]:.3f}", asr=f"{100 * stats[1] / stats[3]:.1f}")
            bar.close()
            j_done += 1
            seconds += time.time() - t0
            rec = {
                "phase": "joint",
                "epoch": j_done,
                "loss": float(stats[0] / max(stats[5], 1)),
                "train_asr": float(100 * stats[1] / max(stats[3], 1)),
                "train_clean_acc": float(100 * stats[2] / max(stats[4], 1)),
            }
            history.append(rec)
            log(
                f"inputaware joint: epoch {j_done} loss {rec['loss']:.3f} "
                f"backdoor acc {rec['train_asr']:.1f}% clean acc {rec['train_clean_acc']:.1f}%"
            )
            save()
        last = history[-1] if history else {}
        return {
            "train_images": len(data),
            "train_seconds": round(seconds, 1),
            "final_train_asr": last.get("train_asr"),
            "final_train_clean_acc": last.get("train_clean_acc"),
        }

    # ------------------------------------------------------------------ triggers
    @torch.no_grad()
    def triggered(self, images: torch.Tensor, sources: torch.Tensor | None = None) -> torch.Tensor:
        """``x + (G(s) - x) * M(s)`` with ``s = sources`` (default: the images themselves),
        computed in float32 and rounded to uint8."""
        if self.gen is None:
            raise RuntimeError("inputaware: call prepare() before apply()")
        x = to_float(images.to(self.device)).contiguous(memory_format=torch.channels_last)
        s = x if sources is None else to_float(sources.to(self.device)).contiguous(memory_format=torch.channels_last)
        out = x + (pattern_of(self.gen, s) - x) * mask_of(self.mgen, s)
        return out.clamp(0, 1).mul(255).round().to(torch.uint8)

    def apply(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        return self.triggered(images)

    def poison_train(
        self, train: ImageSet, poison_idx: torch.Tensor, new_labels: torch.Tensor, log: Log = print
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        images, labels, extra = super().poison_train(train, poison_idx, new_labels, log)
        cross_idx = choose_cross(len(train), poison_idx, self.params["cross_ratio"], self.seed, log)
        if len(cross_idx):
            # each cross sample borrows the trigger of a random other training image
            g = torch.Generator().manual_seed(self.seed + 2)
            shift = torch.randint(1, len(train), (len(cross_idx),), generator=g)
            src_idx = (cross_idx + shift) % len(train)
            for i in range(0, len(cross_idx), self.chunk):
                sl = slice(i, i + self.chunk)
                images[cross_idx[sl]] = self.triggered(train.images[cross_idx[sl]], train.images[src_idx[sl]]).cpu()
        return images, labels, {**extra, "n_cross": len(cross_idx), "cross_indices": cross_idx.tolist()}


TRIGGER = TriggerInputAware
