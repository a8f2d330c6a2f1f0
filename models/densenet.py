"""DenseNet121 (growth 32) adapted to CIFAR: 3x3 stride-1 stem, as in ECLIPSE's code."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int, bn_size: int = 4):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return torch.cat([x, out], 1)


class Transition(nn.Sequential):
    def __init__(self, c_in: int, c_out: int):
        super().__init__(
            nn.BatchNorm2d(c_in), nn.ReLU(inplace=True), nn.Conv2d(c_in, c_out, 1, bias=False), nn.AvgPool2d(2)
        )


class DenseNet(nn.Module):
    def __init__(self, num_classes: int, growth: int = 32, blocks=(6, 12, 24, 16), init_features: int = 64):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, init_features, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(init_features),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        ]
        c = init_features
        for i, n in enumerate(blocks):
            for _ in range(n):
                layers.append(DenseLayer(c, growth))
                c += growth
            if i != len(blocks) - 1:
                layers.append(Transition(c, c // 2))
                c //= 2
        layers.append(nn.BatchNorm2d(c))
        self.features_net = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(F.relu(self.features_net(x)), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def densenet121(num_classes: int, width: int = 64) -> DenseNet:
    # width scales growth rate and stem together (32 and 64 at the paper's width 64)
    return DenseNet(growth=max(width // 2, 4), init_features=width, num_classes=num_classes)
