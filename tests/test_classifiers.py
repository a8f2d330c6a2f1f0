"""models/: every classifier by name gives logits and the pooled features DataElixir selects on."""

from __future__ import annotations

import pytest
import torch

from models import CLASSIFIERS, build_classifier
from models.resnet9 import ResNet9


@pytest.mark.parametrize("arch", sorted(CLASSIFIERS))
@pytest.mark.parametrize(("classes", "size"), [(10, 32), (200, 64)])
def test_every_classifier_gives_logits_for_its_classes(arch, classes, size):
    torch.manual_seed(0)
    model = build_classifier(arch, classes, 8).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 3, size, size))
    assert logits.shape == (2, classes) and torch.isfinite(logits).all()


def test_resnet9_is_pages_network():
    """Page's DAWNBench ResNet-9 at width 64: 64-128-256-512 channels, 6.57 M parameters, logits
    the bias-free linear layer of the max-pooled features times 1/8."""
    model = build_classifier("resnet9", 10, 64)
    assert isinstance(model, ResNet9)
    assert sum(p.numel() for p in model.parameters()) == 6_573_120
    convs = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [64, 128, 128, 128, 256, 512, 512, 512]
    model.eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        feats = model.features(x)
        assert feats.shape == (3, 512)
        assert torch.allclose(model(x), feats @ model.linear.weight.T / 8, atol=1e-6)


def test_unknown_architecture_and_bad_width_are_refused():
    with pytest.raises(ValueError, match="unknown architecture 'resnet7'"):
        build_classifier("resnet7", 10)
    with pytest.raises(ValueError, match="width must be >= 1"):
        build_classifier("resnet9", 10, 0)
