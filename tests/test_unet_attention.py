"""The fused attention (scaled_dot_product_attention) equals the reference formulas, which the
models use."""

from __future__ import annotations

import pytest
import torch

from models import ddpm, unet


@pytest.mark.parametrize(
    ("fused", "reference", "shape"),
    [
        (unet.qkv_attention_sdpa, unet.qkv_attention, (8, 32, 64)),  # (batch*heads, ch, T)
        (unet.qkv_attention_sdpa, unet.qkv_attention, (3, 7, 256)),
        (ddpm.attention_sdpa, ddpm.attention, (4, 64, 256)),  # (batch, c, T)
        (ddpm.attention_sdpa, ddpm.attention, (2, 5, 16)),
    ],
)
def test_fused_attention_equals_reference(fused, reference, shape):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    out = fused(q, k, v)
    assert out.shape == shape
    torch.testing.assert_close(out, reference(q, k, v), atol=1e-5, rtol=1e-4)


@pytest.mark.device
@pytest.mark.parametrize("config", ["config/eclipse/cpu.yml", "config/ddpm/cpu.yml", "config/ddpm/cpu_wide.yml"])
def test_model_with_fused_attention_equals_reference(config, monkeypatch, device):
    from utils.diffusion.factory import load_diffusion_spec

    torch.manual_seed(0)
    model = load_diffusion_spec(config).build_model().eval()
    for p in model.parameters():  # the zero-initialised output layers would hide differences
        p.data.normal_(0, 0.05)
    model.to(device)
    x, t = torch.randn(2, 3, 32, 32).to(device), torch.tensor([3, 500]).to(device)
    with torch.no_grad():
        reference = model(x, t)
        monkeypatch.setattr(unet, "qkv_attention", unet.qkv_attention_sdpa)
        monkeypatch.setattr(ddpm, "attention", ddpm.attention_sdpa)
        fused = model(x, t)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-4)
