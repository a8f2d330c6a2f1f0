"""CIFAR VGG16/19 with batch norm (one linear layer on the 512-d pooled features).

At 32x32 the five max-pools leave a 1x1 map; larger images (Tiny-ImageNet's 64x64) are
averaged over what is left, so the head keeps its 512 inputs at any size."""

from __future__ import annotations

import torch
import torch.nn as nn

_CFG = {
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, depth: int, num_classes: int, width: int = 64):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in _CFG[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                c_out = v * width // 64
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
        self.features_net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1))  # the identity at 32x32
        self.classifier = nn.Linear(c_in, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.features_net(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def vgg16(num_classes: int, width: int = 64) -> VGG:
    return VGG(16, num_classes, width)


def vgg19(num_classes: int, width: int = 64) -> VGG:
    return VGG(19, num_classes, width)
