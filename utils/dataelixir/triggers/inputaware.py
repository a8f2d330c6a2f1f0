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
   distances per pair, images normalised with the dataset's mean/std as BackdoorBench's
   loaders give them; BackdoorBench applies lambda_div twice here, the same at its default 1);
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
training, the poisoned set is the one BackdoorBench v1 saves (see ``wanet``'s
``CROSS_SAMPLE_KEYS``: per batch of 128, the first ``int(pratio * 128)`` samples get
their own generated trigger and the attack label, the next ``int(that * cross_ratio)``
the trigger generated from a random other training image and keep their label; cross
samples count as poisoned; stored as it stores them, computed on normalised images and
truncated by ``ToPILImage``). The auxiliary classifier C is discarded — the victim is
trained from scratch on the static set. Test images get their own trigger. C's inputs, the
diversity distances and the stored images use the dataset's mean/std (CIFAR-10's on CIFAR-10).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import build_classifier
from utils.augment import crop_rotate_flip, to_float
from utils.data import CIFAR10_MEAN, CIFAR10_STD, ImageSet
from utils.dataelixir.triggers.aux import Resumable, aux_keys
from utils.dataelixir.triggers.base import Log, attack_targets, aux_subset, cache_dir
from utils.dataelixir.triggers.wanet import (
    CROSS_RATIO,
    CROSS_SAMPLE_KEYS,
    CrossSampleTrigger,
    bb_normalise,
    bb_to_uint8,
)
from utils.fileio import tensor_fingerprint
from utils.options import GT0, Key, Range
from utils.runtime import autocast, to_channels_last
from utils.trainer import Normalized, TrainConfig, optimizer_step, train_classifier


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


def normalise(
    x: torch.Tensor, mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD
) -> torch.Tensor:
    """The dataset's mean/std normalisation (default CIFAR-10's; ``bb_normalise``):
    BackdoorBench measures the diversity distances on normalised images (and patterns)."""
    return bb_normalise(x, mean, std)


# BackdoorBench's Input-aware training transform (crop padding 5, rotation 10, flip)
_AUGMENT = crop_rotate_flip(5, 10.0)


class TriggerInputAware(CrossSampleTrigger):
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
        "lr_G": Key(0.01, "Adam learning rate of the pattern generator (BackdoorBench: 0.01)", range=GT0),
        "lr_M": Key(0.01, "Adam learning rate of the mask generator (BackdoorBench: 0.01)", range=GT0),
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
        **CROSS_SAMPLE_KEYS,
    }

    def validate(self) -> None:
        self.gen: nn.Module | None = None
        self.mgen: nn.Module | None = None

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` with the dataset's statistics."""
        return normalise(x, self.mean, self.std)

    # ------------------------------------------------------------------ training
    def prepare(self, train: ImageSet, device: torch.device, resource_dir: Path, log: Log = print) -> None:
        self.device = device
        p = self.params
        settings = {
            "kind": "input-aware generators",
            # the training recipe: tanh(10 tanh) mask, per-pair normalised diversity, crop 5 + rotation 10 + flip
            "recipe": 2,
            # the static-set keys do not change the generators
            **{k: p[k] for k in self.defaults if k != "cross_ratio" and k not in CROSS_SAMPLE_KEYS},
            "cross_ratio": p["cross_ratio"],
            "pratio": self.pratio,
            "target": self.target,
            "label_trans": self.label_trans,
            "seed": self.seed,
            "data": tensor_fingerprint(train.images, train.labels),
            "precision": self.precision,
            **self.normalisation_settings(),  # nothing for CIFAR-10's statistics
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
        p = self.params
        clf = Normalized(build_classifier(p["aux_arch"], self.num_classes, p["aux_width"]), self.mean, self.std)
        clf = clf.to(device)
        # channels_last: several times faster for these narrow convolutions on CPU
        for net in (clf, gen, mgen):
            to_channels_last(net, device)
        opt_c = torch.optim.SGD(clf.parameters(), lr=p["aux_lr"], momentum=0.9, weight_decay=5e-4)
        opt_g = torch.optim.Adam(gen.parameters(), lr=p["lr_G"], betas=(0.5, 0.9))
        opt_m = torch.optim.Adam(mgen.parameters(), lr=p["lr_M"], betas=(0.5, 0.9))
        # one generator for the shuffles, the augmentations and the pairings, as before
        g = torch.Generator().manual_seed(self.seed)
        ckpt = Resumable(folder / "train_ckpt.pt", settings, log, "inputaware training checkpoint")
        run = _GeneratorTraining(ckpt, dict(clf=clf, gen=gen, mgen=mgen, opt_c=opt_c, opt_g=opt_g, opt_m=opt_m), g, log)
        bs = min(p["aux_batch_size"], len(data))
        phase = dict(generators=(g, g), log=lambda _msg: None)  # the run logs its own lines

        def mask_lr(epoch: int, _step: int, _steps: int) -> float:  # M milestones at epochs 10 and 20 of 25
            return p["lr_M"] * (0.1 ** sum(epoch >= f * p["mask_epochs"] for f in (0.4, 0.8)))

        mask_cfg = TrainConfig(epochs=p["mask_epochs"], batch_size=bs, lr=p["lr_M"], precision=self.precision)
        train_classifier(mgen, data, _AUGMENT, mask_cfg, device, checkpoint=run.store("mask"), desc="inputaware mask",
                         optimizer=opt_m, lr_schedule=mask_lr, step=self._mask_step(mgen, opt_m, g, run),
                         on_epoch_end=run.mask_epoch_end, **phase)  # fmt: skip
        mgen.eval()
        for q in mgen.parameters():
            q.requires_grad_(False)
        gen.train()
        # C: BackdoorBench's milestones 100.. of 100 epochs, i.e. a constant lr
        joint_cfg = TrainConfig(epochs=p["aux_epochs"], batch_size=bs, lr=p["aux_lr"], precision=self.precision)
        train_classifier(clf, data, _AUGMENT, joint_cfg, device, checkpoint=run.store("joint"), desc="inputaware joint",
                         optimizer=opt_c, step=self._joint_step(clf, gen, mgen, opt_c, opt_g, bs, g, run),
                         on_epoch_end=run.joint_epoch_end, **phase)  # fmt: skip
        last = run.history[-1] if run.history else {}
        return {
            "train_images": len(data),
            "train_seconds": round(run.seconds, 1),
            "final_train_asr": last.get("train_asr"),
            "final_train_clean_acc": last.get("train_clean_acc"),
        }

    def _mask_step(self, mgen: nn.Module, opt_m: torch.optim.Optimizer, g: torch.Generator, run: _GeneratorTraining):
        """Phase 1: the mask generator alone, on its density penalty and diversity loss."""
        p = self.params
        nrm = self._normalise

        def step(x1: torch.Tensor, _y: torch.Tensor) -> tuple[float, int]:
            x2 = x1[torch.randperm(len(x1), generator=g).to(x1.device)]
            with autocast(x1.device, self.bf16):
                m1, m2 = mask_of(mgen, x1).float(), mask_of(mgen, x2).float()
            norm = F.relu(m1 - p["mask_density"]).mean()
            div = diversity_loss(nrm(x1), nrm(x2), m1, m2)
            loss = p["lambda_norm"] * norm + p["lambda_div"] * div
            optimizer_step(loss, mgen, opt_m, None)
            run.stats[:3] += (loss.item(), m1.mean().item(), 1)
            return loss.item(), 0

        return step

    def _joint_step(self, clf, gen, mgen, opt_c, opt_g, bs: int, g: torch.Generator, run: _GeneratorTraining):
        """Phase 2: classifier and pattern generator together on backdoored, cross and clean samples."""
        p = self.params
        n_bd = max(1, int(round(bs * self.pratio)))
        n_cross = int(round(n_bd * p["cross_ratio"]))
        n_bd = min(n_bd, bs)
        n_cross = min(n_cross, bs - n_bd)
        n_pair = min(n_bd, bs - n_bd)  # diversity pairs (BackdoorBench: num_bd)
        nrm = self._normalise

        def step(x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
            x2 = x[torch.randperm(len(x), generator=g).to(x.device)]
            # x2[n_bd + i] lends its trigger to cross sample i and is the diversity partner of x[i]
            src = x2[n_bd : n_bd + max(n_pair, n_cross)]
            with autocast(x.device, self.bf16):
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
            div = diversity_loss(nrm(x[:n_pair]), nrm(src[:n_pair]), nrm(pat[:n_pair]), nrm(pat2[:n_pair]))
            loss = ce + p["lambda_div"] * div
            opt_c.zero_grad(set_to_none=True)
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_c.step()
            opt_g.step()
            pred = logits.argmax(1)
            run.stats += (
                loss.item(),
                (pred[:n_bd] == labels[:n_bd]).float().sum().item(),
                (pred[n_bd + n_cross :] == labels[n_bd + n_cross :]).float().sum().item(),
                n_bd,
                len(x) - n_bd - n_cross,
                1,
            )
            return loss.item(), int((pred == labels).sum())

        return step

    # ------------------------------------------------------------------ triggers
    @torch.no_grad()
    def triggered(self, images: torch.Tensor, sources: torch.Tensor | None = None) -> torch.Tensor:
        """``x + (G(s) - x) * M(s)`` with ``s = sources`` (default: the images themselves),
        computed in float32; ``quantize: truncate`` computes it on normalised images and
        pattern and converts as BackdoorBench v1 saves them, ``round`` in pixel space."""
        if self.gen is None:
            raise RuntimeError("inputaware: call prepare() before apply()")
        x = to_float(images.to(self.device)).contiguous(memory_format=torch.channels_last)
        s = x if sources is None else to_float(sources.to(self.device)).contiguous(memory_format=torch.channels_last)
        pattern, mask = pattern_of(self.gen, s), mask_of(self.mgen, s)
        if self.params["quantize"] == "truncate":
            xn = self._normalise(x)
            return bb_to_uint8(xn + (self._normalise(pattern) - xn) * mask, self.mean, self.std)
        out = x + (pattern - x) * mask
        return out.clamp(0, 1).mul(255).round().to(torch.uint8)

    def apply(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        return self.triggered(images)

    def write_cross(self, images: torch.Tensor, train: ImageSet, cross_idx: torch.Tensor) -> None:
        # each cross sample borrows the trigger of a random other training image
        g = torch.Generator().manual_seed(self.seed + 2)
        shift = torch.randint(1, len(train), (len(cross_idx),), generator=g)
        src_idx = (cross_idx + shift) % len(train)
        for i in range(0, len(cross_idx), self.chunk):
            sl = slice(i, i + self.chunk)
            images[cross_idx[sl]] = self.triggered(train.images[cross_idx[sl]], train.images[src_idx[sl]]).cpu()


class _GeneratorTraining:
    """Both phases' records and their one checkpoint (``Resumable``, the keys Input-aware
    always wrote): loaded whole on creation, as before; each phase's
    :meth:`store` hands ``train_classifier`` its part and saves everything."""

    NETS = {"mask": ("mgen", "opt_m", "mask_epoch"), "joint": ("clf", "opt_c", "joint_epoch")}

    def __init__(self, ckpt: Resumable, parts: dict[str, Any], g: torch.Generator, log: Log):
        self.ckpt, self.parts, self.g, self.log = ckpt, parts, g, log
        self.done = {"mask_epoch": 0, "joint_epoch": 0}
        self.history: list[dict] = []
        self.seconds = 0.0
        self.stats = np.zeros(6)  # the running epoch's sums (mask: loss, density, batches)
        self.state = ckpt.load()
        if self.state is not None:
            for key, part in parts.items():
                part.load_state_dict(self.state[key])
            g.set_state(self.state["rng"])
            self.done = {k: self.state[k] for k in self.done}
            self.history, self.seconds = self.state["history"], self.state["seconds"]
            log(
                f"inputaware: resuming after mask epoch {self.done['mask_epoch']}, joint epoch {self.done['joint_epoch']}"
            )

    def store(self, phase: str) -> _GeneratorTraining._PhaseStore:
        return self._PhaseStore(self, *self.NETS[phase])

    class _PhaseStore:
        def __init__(self, run: _GeneratorTraining, net: str, opt: str, epoch: str):
            self.run, self.net, self.opt, self.epoch = run, net, opt, epoch

        def load(self) -> dict | None:
            st = self.run.state
            if st is None or st[self.epoch] == 0:
                return None
            # what was loaded on creation, once more (this phase has not run since)
            return {
                "epoch": st[self.epoch],
                "model": st[self.net],
                "optimizer": st[self.opt],
                "rng": st["rng"],
                "aug_rng": st["rng"],
                "history": [],
            }

        def save(self, state: dict) -> None:
            run = self.run
            run.ckpt.save(
                {key: part.state_dict() for key, part in run.parts.items()}
                | {"rng": run.g.get_state(), **run.done, "history": run.history, "seconds": run.seconds}
            )

    def mask_epoch_end(self, rec: dict) -> None:
        loss, density, batches = self.stats[:3]
        self.stats[:] = 0
        epoch = self.done["mask_epoch"] = rec["epoch"]
        self.seconds += rec["seconds"]
        self.history.append({"phase": "mask", "epoch": epoch, "loss": loss / batches, "density": density / batches})
        self.log(f"inputaware mask: epoch {epoch} loss {loss / batches:.3f} mask density {density / batches:.3f}")

    def joint_epoch_end(self, rec: dict) -> None:
        stats, self.stats = self.stats, np.zeros(6)
        epoch = self.done["joint_epoch"] = rec["epoch"]
        self.seconds += rec["seconds"]
        out = {
            "phase": "joint",
            "epoch": epoch,
            "loss": float(stats[0] / max(stats[5], 1)),
            "train_asr": float(100 * stats[1] / max(stats[3], 1)),
            "train_clean_acc": float(100 * stats[2] / max(stats[4], 1)),
        }
        self.history.append(out)
        self.log(
            f"inputaware joint: epoch {epoch} loss {out['loss']:.3f} "
            f"backdoor acc {out['train_asr']:.1f}% clean acc {out['train_clean_acc']:.1f}%"
        )


TRIGGER = TriggerInputAware
