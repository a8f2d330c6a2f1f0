"""The diffusion UNet turned into a classifier, the surrogate of ECLIPSE's adaptive attack.

How it is built (ECLIPSE §6 describes only "the last layer replaced by a convolution and
global average pooling"; the rest is this toolkit's choice, recorded in ADP's JSON):

* the improved-diffusion ``UNetModel`` is kept whole, with the weights of the sparse
  diffusion checkpoint — its encoder, middle block, decoder and time embedding;
* its last layer, the 3×3 convolution of ``out`` (``model_channels -> 3 or 6`` noise /
  variance maps), is replaced by a fresh 3×3 convolution to ``num_classes`` maps,
  followed by global average pooling, which gives the logits;
* images in [0, 1] are mapped to the diffusion's [-1, 1] and fed with a fixed timestep
  ``t`` (default 0: the clean end of the chain, the features of the final denoising
  step); ``timestep`` is what the UNet's embedding receives, i.e. the diffusion step
  index already rescaled to 0..1000 when the diffusion rescales timesteps.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from models.unet import UNetModel


class UNetClassifier(nn.Module):
    def __init__(self, unet: UNetModel, num_classes: int, timestep: float = 0.0):
        super().__init__()
        last = unet.out[-1]
        if not isinstance(last, nn.Conv2d):
            raise ValueError("expected the UNet's output block to end with a convolution")
        unet.out[-1] = nn.Conv2d(last.in_channels, num_classes, kernel_size=3, padding=1)
        self.unet = unet
        self.num_classes = num_classes
        self.timestep = float(timestep)

    def class_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel class scores ``[B, num_classes, H, W]`` of images in [0, 1]."""
        t = torch.full((x.shape[0],), self.timestep, device=x.device)
        return self.unet(x * 2 - 1, t)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled input of the classification convolution (the penultimate layer)."""
        t = torch.full((x.shape[0],), self.timestep, device=x.device)
        saved = self.unet.out[-1]
        self.unet.out[-1] = nn.Identity()
        try:
            h = self.unet(x * 2 - 1, t)
        finally:
            self.unet.out[-1] = saved
        return h.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.class_maps(x).mean(dim=(2, 3))


def unet_classifier_from(unet: UNetModel, num_classes: int, timestep: float = 0.0) -> UNetClassifier:
    """Wrap a UNet (already holding the diffusion weights) as a classifier; trainable."""
    model = UNetClassifier(unet, num_classes, timestep)
    return model.requires_grad_(True).train()
