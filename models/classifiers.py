"""The victim classifiers by name: ``CLASSIFIERS`` and ``build_classifier``."""

from __future__ import annotations

import torch.nn as nn

from models.densenet import densenet121
from models.preact_resnet import preactresnet18
from models.resnet import resnet18, resnet50
from models.resnet9 import resnet9
from models.vgg import vgg16, vgg19

CLASSIFIERS = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "densenet121": densenet121,
    "preactresnet18": preactresnet18,
    "resnet9": resnet9,
}


def build_classifier(arch: str, num_classes: int, width: int = 64) -> nn.Module:
    """A classifier of ``num_classes`` classes taking [0, 1] images; ``width`` 64 is the papers' size."""
    if arch not in CLASSIFIERS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(CLASSIFIERS)}")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    return CLASSIFIERS[arch](num_classes=num_classes, width=width)
