"""Victim training throughput (images/s): the full pipeline (uint8 data, batched
augmentation, bf16, channels_last) against the same model fed pre-made float tensors.

    python bench/bench_training.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import record, timed

from models import build_classifier
from utils.augment import compensation_augment, standard_augment
from utils.data import NUM_CLASSES, load_cifar10
from utils.runtime import autocast, resolve_device
from utils.trainer import prepare_batch


def main() -> None:
    device = resolve_device("auto")
    data = load_cifar10("train").images[:2048]
    labels = torch.randint(0, 10, (len(data),))
    rows = []
    for width in (16, 64):
        for mode, augment in (
            ("model only (pre-made tensors)", None),
            ("crop+flip", standard_augment),
            ("compensation (crop+flip+gray+noise)", compensation_augment(0.4, 0.05)),
        ):
            torch.manual_seed(0)
            model = build_classifier("resnet18", NUM_CLASSES, width).to(device).to(memory_format=torch.channels_last)
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            g = torch.Generator(device=device).manual_seed(0)
            fixed = prepare_batch(data[:128], device, True)
            batches = [data[i : i + 128] for i in range(0, 1024, 128)]

            def run(augment=augment, model=model, opt=opt, g=g, fixed=fixed, batches=batches):
                for i, xb in enumerate(batches):
                    x = fixed if augment is None else prepare_batch(augment(xb.to(device), g), device, True)
                    with autocast(device, True):
                        loss = F.cross_entropy(model(x).float(), labels[i * 128 : (i + 1) * 128].to(device))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

            s = timed(run, repeats=3)
            rows.append({"arch": f"resnet18 w{width}", "pipeline": mode, "images_per_s": 1024 / s})
            print(f"resnet18 w{width:<3d} {mode:38s} {1024 / s:8.1f} images/s")
    record("training", rows)


if __name__ == "__main__":
    main()
