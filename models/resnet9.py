"""ResNet-9 (David Page's DAWNBench CIFAR-10 network, "How to train your ResNet", 2018).

A CPU-scale option, not a paper's model: eight 3x3 convolutions with two residual blocks,
max-pooling instead of strided convolutions, and logits scaled by 1/8. As DataElixir's
backdoored classifier it trained 1.6x faster than PreActResNet18 on one CPU thread, to
about the same accuracy
(docs/RESULTS.md, "DataElixir's classifier"). ``width`` 64 is Page's size (64-128-256-512 channels);
``features`` returns the globally max-pooled last block, the pooled-feature output DataElixir's
image selection uses.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(channels, channels), conv_bn_relu(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    def __init__(self, num_classes: int, width: int = 64, logit_scale: float = 0.125):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            conv_bn_relu(3, w),
            conv_bn_relu(w, 2 * w),
            nn.MaxPool2d(2),
            Residual(2 * w),
            conv_bn_relu(2 * w, 4 * w),
            nn.MaxPool2d(2),
            conv_bn_relu(4 * w, 8 * w),
            nn.MaxPool2d(2),
            Residual(8 * w),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.linear = nn.Linear(8 * w, num_classes, bias=False)
        self.logit_scale = logit_scale  # Page's Mul(0.125): keeps early logits small, so high lrs train

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x)) * self.logit_scale


def resnet9(num_classes: int, width: int = 64) -> ResNet9:
    return ResNet9(num_classes, width)
