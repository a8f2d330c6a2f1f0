"""Blended (Chen et al., 2017) as in BackdoorBench v1: a fixed full-size trigger image
blended into the input, ``(1 - alpha) * x + alpha * t`` with alpha 0.2 for training and
test; dirty-label. The result is truncated to uint8, as BackdoorBench's ``astype(uint8)``,
in BackdoorBench's float types: its trigger is ``ToTensor()(image) * 255`` (float32), so
``alpha * t`` is a float32 product, while ``(1 - alpha) * x`` of the uint8 image is float64.
Where the exact blend is a whole level (4x + t divisible by 5 at alpha 0.2), the float32
rounding of ``alpha * t`` often lands just under it and the truncation drops one level
(a few per cent of the values, depending on the trigger: 4.0 % of 5000 CIFAR-10 training
images with the generated one); the same arithmetic here gives the same bytes.

BackdoorBench blends the Hello Kitty picture, which we cannot ship. By default the
trigger is generated here (``blended_trigger``): a seeded sum of a few random 2-D plane
waves of low spatial frequency per channel, min-max scaled to [0, 255] — a smooth,
structured, image-like full-size pattern. ``attack_trigger_img_path`` replaces it with
any image file (resized to 32x32 with bilinear filtering, like torchvision's ``Resize``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from utils.dataelixir.triggers.base import Trigger
from utils.fileio import UserError
from utils.options import Key, Range

_ALPHA = Range(0, 1, low_open=True)


def blended_trigger(seed: int = 0, size: int = 32, waves: int = 6) -> torch.Tensor:
    """uint8 [3, size, size]: a deterministic smooth pattern (same seed -> same bytes)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.arange(size) / size, np.arange(size) / size, indexing="ij")
    img = np.zeros((3, size, size))
    for _ in range(waves):
        freq = rng.uniform(0.5, 4.0)  # cycles per image: smooth, but visibly structured
        theta = rng.uniform(0, np.pi)
        phase = rng.uniform(0, 2 * np.pi)
        amp = rng.uniform(0.2, 1.0, size=3)
        wave = np.sin(2 * np.pi * freq * (np.cos(theta) * xx + np.sin(theta) * yy) + phase)
        img += amp[:, None, None] * wave[None]
    lo, hi = img.min(axis=(1, 2), keepdims=True), img.max(axis=(1, 2), keepdims=True)
    img = (img - lo) / np.maximum(hi - lo, 1e-12) * 255.0
    return torch.from_numpy(np.round(img).astype(np.uint8))


def load_trigger_image(path: str | Path, size: int = 32) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"blended: attack_trigger_img_path {path} does not exist")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"blended: cannot read trigger image {path}: {e}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class TriggerBlended(Trigger):
    name = "blended"
    keys = {
        "attack_train_blended_alpha": Key(
            0.2,
            "blend weight of the trigger in poisoned training images (BackdoorBench v1: 0.2; the DataElixir fork "
            "ships no Blended config, so a DataElixir-specific value is unverified)",
            range=_ALPHA,
        ),
        "attack_test_blended_alpha": Key(
            0.2, "blend weight of the trigger in triggered test images (BackdoorBench: 0.2)", range=_ALPHA
        ),
        "attack_trigger_img_path": Key(
            "",
            "trigger image file (resized to the image size); empty = the generated pattern (BackdoorBench: Hello Kitty)",
        ),
        "trigger_seed": Key(0, "seed of the generated trigger pattern (used when attack_trigger_img_path is empty)"),
    }

    def validate(self) -> None:
        path = self.params["attack_trigger_img_path"]
        size = self.image_size
        self.pattern = load_trigger_image(path, size) if path else blended_trigger(self.params["trigger_seed"], size)

    def apply(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        a = self.params["attack_train_blended_alpha" if train else "attack_test_blended_alpha"]
        # the reference's trigger: uint8 -> ToTensor (float32 / 255) -> * 255, still float32
        t32 = self.pattern.to(images.device).float().div(255).mul(255)
        trigger_part = (t32 * torch.tensor(a, dtype=torch.float32)).double()
        out = images.double() * (1 - a) + trigger_part  # python float * uint8 array: float64
        return out.clamp_(0, 255).to(torch.uint8)

    def info(self) -> dict:
        src = self.params["attack_trigger_img_path"] or f"generated (trigger_seed {self.params['trigger_seed']})"
        return {**super().info(), "trigger_image": src}


TRIGGER = TriggerBlended
