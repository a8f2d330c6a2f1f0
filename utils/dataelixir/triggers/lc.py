"""Label-consistent attack (Turner et al., 2019) following BackdoorBench v1.

Clean-label: only target-class training images are poisoned and keep their label.
A poisoned training image is made hard to classify by an untargeted L-inf PGD attack
on an adversarially trained model (eps 8/255, 100 steps of 1.5/255, no random start,
truncated to uint8 — BackdoorBench's ``resource/label-consistent`` setting), and then
carries the trigger: a 3x3 black/white checkerboard in the bottom-right corner
(``lc_trigger: bottom-right``, v1's default, which DataElixir builds on; v2 changed the
default to ``all-corners``, one in each corner), added as +-255 * ``reduced_amplitude``
and clipped (BackdoorBench's ``labelConsistentAttack``, amplitude 1).

Test images (ASR / RA): with ``lc_test_pgd: true`` (default, v1) the triggered test
images are PGD-perturbed copies of the test images (against their true labels, same
settings) plus the trigger, as v1's ``attack_test_replace_imgs_path``; with ``false``
they carry the trigger only, like every other attack's.

The adversarially trained model (BackdoorBench downloads a ResNet18 PGD-trained one) is
trained here: PGD adversarial training (Madry et al.; ``at_steps`` steps of
``at_alpha``/255 within ``at_eps``/255, random start) with SGD, weight decay 5e-4 and a
cosine schedule, checkpointed every epoch under ``resource_dir/lc/at-<key>/`` and
reused afterwards. The adversarial copies of the poisoned (and test) images are cached
beside it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn

from models import build_classifier
from utils.adversarial import pgd_linf
from utils.augment import standard_augment, to_float
from utils.data import ImageSet
from utils.dataelixir.triggers.aux import Resumable, aux_keys
from utils.dataelixir.triggers.base import Log, Trigger, aux_subset, cache_dir, settings_key
from utils.fileio import tensor_fingerprint
from utils.options import Key, Range
from utils.progress import progress
from utils.runtime import autocast
from utils.trainer import Normalized, TrainConfig, train_classifier

_SCALE_255 = Range(0, 255)

# +1 -> white, -1 -> black; the top-left 3x3 pattern, mirrored for the right-hand corners
_CORNER = torch.tensor([[1, -1, -1], [-1, 1, -1], [1, -1, 1]], dtype=torch.float32)


def lc_trigger_mask(kind: str = "bottom-right", size: int = 32) -> torch.Tensor:
    """float [1,1,size,size] of -1/0/+1: where the corner checkerboards sit."""
    m = torch.zeros(size, size)
    right = _CORNER.flip(1)
    if kind == "all-corners":
        m[:3, :3] = _CORNER
        m[-3:, :3] = _CORNER
        m[:3, -3:] = right
        m[-3:, -3:] = right
    elif kind == "bottom-right":
        m[-3:, -3:] = right
    else:
        raise ValueError(kind)
    return m[None, None]


class TriggerLC(Trigger):
    name = "lc"
    clean_label = True
    supports_all2all = False
    chunk = 256
    keys = {
        **aux_keys(
            {"aux_arch": "adversarially trained model the poisons are crafted on (BackdoorBench: resnet18)"},
            aux_arch="resnet18",
            aux_width=64,
            aux_epochs=100,
            aux_subset=0,
            aux_batch_size=128,
            aux_lr=0.1,
        ),
        "at_eps": Key(8.0, "adversarial training: L-inf radius on the 0-255 scale (Madry: 8)", range=_SCALE_255),
        "at_alpha": Key(2.0, "adversarial training: PGD step on the 0-255 scale (Madry: 2)", range=_SCALE_255),
        "at_steps": Key(7, "adversarial training: PGD steps per batch (Madry: 7)", range=Range(0)),
        "adv_eps": Key(8.0, "poison crafting: L-inf radius on the 0-255 scale (BackdoorBench: 8)", range=_SCALE_255),
        "adv_alpha": Key(1.5, "poison crafting: PGD step on the 0-255 scale (BackdoorBench: 1.5)", range=_SCALE_255),
        "adv_steps": Key(100, "poison crafting: PGD steps (BackdoorBench: 100)", range=Range(0)),
        "reduced_amplitude": Key(
            1.0, "trigger amplitude in [0, 1] (+-255 * amplitude, clipped; BackdoorBench: 1)", range=Range(0, 1)
        ),
        "lc_trigger": Key(
            "bottom-right",
            "bottom-right (3x3 checkerboard, BackdoorBench v1) or all-corners (one in every corner, v2)",
            choices=("bottom-right", "all-corners"),
        ),
        "lc_test_pgd": Key(
            True,
            "ASR/RA on PGD-perturbed test images plus the trigger (true, BackdoorBench v1) or on the trigger alone",
        ),
    }

    def validate(self) -> None:
        p = self.params
        self.mask = lc_trigger_mask(p["lc_trigger"], self.image_size)  # 3x3 corner patterns at any size
        self.model: nn.Module | None = None
        self.folder: Path | None = None

    # ------------------------------------------------------------------ adversarial training
    def prepare(self, train: ImageSet, device: torch.device, resource_dir: Path, log: Log = print) -> None:
        self.device = device
        p = self.params
        settings = {
            "kind": "PGD adversarial training",
            **{k: p[k] for k in ("aux_arch", "aux_width", "aux_epochs", "aux_subset", "aux_batch_size", "aux_lr")},
            **{k: p[k] for k in ("at_eps", "at_alpha", "at_steps")},
            "seed": self.seed,
            "data": tensor_fingerprint(train.images, train.labels),
            "precision": self.precision,
            **self.normalisation_settings(),  # nothing for CIFAR-10's statistics
        }
        self.folder = cache_dir(resource_dir, "lc", settings, "at-")
        model = Normalized(build_classifier(p["aux_arch"], self.num_classes, p["aux_width"]), self.mean, self.std)
        # BackdoorBench's default layout (not channels_last), which the PGD reads from here
        model.input_layout = torch.contiguous_format
        final = Resumable(self.folder / "model.pt", settings, log, "lc adversarially trained model")
        state = final.load()
        if state is not None:
            model.load_state_dict(state["model"])
            log(f"lc: loaded the adversarially trained model from {final.path}")
            info = state["info"]
        else:
            info = self._adv_train(model, aux_subset(train, p["aux_subset"], self.seed), device, settings, log)
            model.cpu()
            final.save({"model": model.state_dict(), "info": info})
            (self.folder / "train_ckpt.pt").unlink(missing_ok=True)
        self.model = model.to(device).eval()
        for q in self.model.parameters():
            q.requires_grad_(False)
        self.aux_info = {"model": info}

    def _adv_train(self, model: nn.Module, data: ImageSet, device: torch.device, settings: dict, log: Log) -> dict:
        p = self.params
        bs = min(p["aux_batch_size"], len(data))
        cfg = TrainConfig(
            epochs=p["aux_epochs"],
            batch_size=bs,
            lr=p["aux_lr"],
            weight_decay=5e-4,
            schedule="cosine",
            channels_last=False,  # BackdoorBench's layout (see prepare)
            precision=self.precision,
        )
        run = _AdvTrainingRun(
            Resumable(self.folder / "train_ckpt.pt", settings, log, "lc adversarial-training checkpoint"), log
        )

        def perturb(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
            if p["at_steps"] > 0 and p["at_eps"] == 0:
                # BackdoorBench's PGD draws its random start even in a zero ball (and returns x)
                torch.rand(x.shape, generator=g)
                return x
            return pgd_linf(model, x, y, p["at_eps"], p["at_alpha"], p["at_steps"], g, self.bf16, clip_offset=True)

        train_classifier(
            model,
            data,
            standard_augment,
            cfg,
            device,
            checkpoint=run,
            log=lambda _msg: None,  # the run logs its own lines
            desc="lc adv-train",
            # on the CPU, as the batches are augmented (whatever the device)
            generators=(torch.Generator().manual_seed(self.seed), torch.Generator().manual_seed(self.seed + 1)),
            perturb=perturb,
            on_epoch_end=run.epoch_end,
        )
        return {
            "path": str(self.folder / "model.pt"),
            "train_images": len(data),
            "train_seconds": round(run.seconds, 1),
            "final_adv_train_acc": run.history[-1]["adv_train_acc"] if run.history else None,
        }

    # ------------------------------------------------------------------ poisons
    def adversarial(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """uint8 PGD copies of ``images`` against their ``labels`` (truncated, as BackdoorBench)."""
        if self.model is None:
            raise RuntimeError("lc: call prepare() before crafting poisons")
        p = self.params
        if p["adv_steps"] == 0 or p["adv_eps"] == 0:
            return images.clone()
        out = torch.empty_like(images, device="cpu")
        for i in progress(range(0, len(images), self.chunk), desc="lc PGD", leave=False, dynamic_ncols=True):
            x = to_float(images[i : i + self.chunk].to(self.device))
            y = labels[i : i + self.chunk].to(self.device)
            adv = pgd_linf(
                self.model,
                x,
                y,
                p["adv_eps"],
                p["adv_alpha"],
                p["adv_steps"],
                None,
                self.bf16,
                random_start=False,
                clip_offset=True,
            )
            out[i : i + self.chunk] = (adv * 255).to(torch.uint8).cpu()
        return out

    def add_trigger(self, images: torch.Tensor) -> torch.Tensor:
        amp = self.params["reduced_amplitude"]
        out = images.float() + 255.0 * amp * self.mask.to(images.device)
        return out.clamp_(0, 255).to(torch.uint8)

    def apply(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        """Test time: the corner trigger. ``train=True``: PGD against the model's own
        prediction first (``poison_train`` uses the true labels instead)."""
        if train:
            with torch.no_grad(), autocast(self.device, self.bf16):
                pred = self.model(to_float(images.to(self.device))).argmax(1)
            images = self.adversarial(images, pred)
        return self.add_trigger(images)

    def cached_adversarial(self, images: torch.Tensor, labels: torch.Tensor, what: str, log: Log) -> torch.Tensor:
        """``adversarial(images, labels)``, cached beside the model (keyed by the images)."""
        p = self.params
        key = {
            "model": self.folder.name,
            "poisons": tensor_fingerprint(images, labels),
            **{k: p[k] for k in ("adv_eps", "adv_alpha", "adv_steps")},
        }
        cache = Resumable(self.folder / f"adv-{settings_key(key)}.pt", key, log, f"lc adversarial {what} images")
        state = cache.load()
        t0 = time.time()
        if state is None:
            adv = self.adversarial(images, labels)
            cache.save({"images": adv})
        else:
            adv = state["images"]
            log(f"lc: loaded the adversarial {what} images from {cache.path}")
        self.aux_info[f"adversarial_{what}_images"] = str(cache.path)
        self.aux_info[f"pgd_{what}_seconds"] = round(time.time() - t0, 1)
        return adv

    def poison_train(
        self, train: ImageSet, poison_idx: torch.Tensor, new_labels: torch.Tensor, log: Log = print
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        adv = self.cached_adversarial(train.images[poison_idx], train.labels[poison_idx], "train", log)
        images = train.images.clone()
        images[poison_idx] = self.add_trigger(adv)
        return images, train.labels.clone(), {}

    def poison_test(self, images: torch.Tensor, labels: torch.Tensor, log: Log = print) -> torch.Tensor:
        if not self.params["lc_test_pgd"]:
            return super().poison_test(images, labels, log)
        return self.add_trigger(self.cached_adversarial(images, labels, "test", log))


class _AdvTrainingRun:
    """The adversarial training's records and its checkpoint (``Resumable`` with the
    keys LC always wrote), as the checkpoint store and epoch hook of ``train_classifier``."""

    def __init__(self, ckpt: Resumable, log: Log):
        self.ckpt, self.log = ckpt, log
        self.history: list[dict] = []
        self.seconds = 0.0

    def load(self) -> dict | None:
        state = self.ckpt.load()
        if state is None:
            return None
        self.history, self.seconds = state["history"], state["seconds"]
        self.log(f"lc: resuming adversarial training after epoch {state['epoch']}")
        return {**state, "history": []}

    def save(self, state: dict) -> None:
        self.ckpt.save(
            {
                "model": state["model"],
                "optimizer": state["optimizer"],
                "rng": state["rng"],
                "aug_rng": state["aug_rng"],
                "epoch": state["epoch"],
                "history": self.history,
                "seconds": self.seconds,
            }
        )

    def epoch_end(self, rec: dict) -> None:
        self.seconds += rec["seconds"]
        self.history.append({"epoch": rec["epoch"], "loss": rec["train_loss"], "adv_train_acc": rec["train_acc"]})
        self.log(
            f"lc adv-train: epoch {rec['epoch']} loss {rec['train_loss']:.3f} "
            f"adversarial train acc {rec['train_acc']:.1f}%"
        )


TRIGGER = TriggerLC
