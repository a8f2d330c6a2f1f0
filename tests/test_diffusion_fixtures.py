"""Numeric equality with the reference implementations (../shared/fixtures)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.ddpm import DDPMModel
from utils.diffusion.factory import DiffusionSpec, load_diffusion_spec, spec_from_dict
from utils.diffusion.gaussian_diffusion import GaussianDiffusion, get_named_beta_schedule, space_timesteps
from utils.fileio import UserError, load_state_dict_strict


def _unet(cfg: dict):
    """The reference's UNet config (its create_model arguments) through our factory."""
    return DiffusionSpec(architecture="improved_unet", model=cfg, diffusion={}).build_model()


def _ddpm(cfg: dict):
    return DDPMModel(
        ch=cfg["ch"],
        out_ch=cfg["out_ch"],
        ch_mult=tuple(cfg["ch_mult"]),
        num_res_blocks=cfg["num_res_blocks"],
        attn_resolutions=tuple(cfg["attn_resolutions"]),
        dropout=cfg["dropout"],
        in_channels=cfg["in_channels"],
        resolution=cfg["resolution"],
    )


def _zeros_like_table(table: dict) -> dict:
    return {k: torch.zeros(v) for k, v in table.items()}


def test_eclipse_unet_state_dict_layout(fixtures_dir):
    ref = json.loads((fixtures_dir / "improved_diffusion/eclipse_cifar10_unet_shapes.json").read_text())
    model = _unet(ref["config"])
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert own == ref["state_dict_shapes"]
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(52.5e6, rel=0.01)
    # the paper config file builds the same network, and a published checkpoint loads strictly
    spec = load_diffusion_spec("config/eclipse/cifar10.yml")
    load_state_dict_strict(spec.build_model(), _zeros_like_table(ref["state_dict_shapes"]), "ema_0.9999_250000.pt")


def test_ddpm_state_dict_layout(fixtures_dir):
    ref = json.loads((fixtures_dir / "ddpm/ddpm_cifar10_model_shapes.json").read_text())
    table = ref["state_dict_shapes"]
    model = _ddpm(ref["config"])
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == table
    spec = load_diffusion_spec("config/ddpm/cifar10.yml")
    load_state_dict_strict(spec.build_model(), _zeros_like_table(table), "model-790000.ckpt")


def test_strict_load_names_the_mismatch(fixtures_dir):
    ref = json.loads((fixtures_dir / "ddpm/ddpm_cifar10_model_shapes.json").read_text())
    state = _zeros_like_table(ref["state_dict_shapes"])
    state.pop("conv_out.bias")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match="missing keys.*conv_out.bias.*unexpected keys.*extra.weight"):
        load_state_dict_strict(_ddpm(ref["config"]), state, "bad.ckpt")


@pytest.mark.device
def test_tiny_unet_forward(fixtures_dir, device):
    f = torch.load(fixtures_dir / "improved_diffusion/tiny_unet_forward.pt", weights_only=True)
    model = _unet(f["config"])
    model.load_state_dict(f["state_dict"], strict=True)
    with torch.no_grad():
        out = model.to(device).eval()(f["x"].to(device), f["timesteps"].to(device)).cpu()
    torch.testing.assert_close(out, f["out"], atol=1e-5, rtol=1e-4)


@pytest.mark.device
def test_tiny_ddpm_forward(fixtures_dir, device):
    f = torch.load(fixtures_dir / "ddpm/tiny_ddpm_forward.pt", weights_only=True)
    model = _ddpm({**f["config"], "out_ch": 3, "in_channels": 3, "resolution": 32})
    model.load_state_dict(f["state_dict"], strict=True)
    with torch.no_grad():
        out = model.to(device).eval()(f["x"].to(device), f["timesteps"].to(device)).cpu()
    torch.testing.assert_close(out, f["out"], atol=1e-5, rtol=1e-4)


def test_eclipse_diffusion_arithmetic(fixtures_dir):
    f = torch.load(fixtures_dir / "improved_diffusion/eclipse_diffusion_cases.pt", weights_only=True)
    diffusion = load_diffusion_spec("config/eclipse/cifar10.yml").build_diffusion()
    np.testing.assert_allclose(diffusion.betas, f["betas"].numpy(), rtol=0, atol=1e-12)
    assert diffusion.num_timesteps == f["num_timesteps"]
    for c in f["cases"]:
        t = torch.full((c["x_start"].shape[0],), c["t"], dtype=torch.long)
        seen = []

        def stand_in(x, ts, out=c["model_output"], seen=seen):
            seen.append(ts)
            return out

        close = dict(atol=1e-6, rtol=0)
        torch.testing.assert_close(diffusion.q_sample(c["x_start"], t, c["noise"]), c["x_t"], **close)
        out = diffusion.p_mean_variance(stand_in, c["x_t"], t, clip_denoised=True)
        torch.testing.assert_close(seen[0].float(), c["timesteps_seen_by_model"], **close)
        for key in ("mean", "log_variance", "pred_xstart"):
            torch.testing.assert_close(out[key], c[key], **close)
        sample = diffusion.p_sample(stand_in, c["x_t"], t, noise=c["sample_noise"])["sample"]
        torch.testing.assert_close(sample, c["sample"], **close)
        losses = diffusion.training_losses(stand_in, c["x_start"], t, noise=c["noise"])
        for key in ("mse", "vb", "loss"):
            torch.testing.assert_close(losses[key], c[key], atol=1e-6, rtol=1e-6)


def test_respacing(fixtures_dir):
    f = torch.load(fixtures_dir / "improved_diffusion/eclipse_respacing.pt", weights_only=True)
    betas = get_named_beta_schedule("cosine", 4000)
    for section, ref in f.items():
        use = space_timesteps(4000, section)
        assert sorted(use) == list(ref["use_timesteps"])
        spaced = GaussianDiffusion(betas, model_var_type="learned_range", use_timesteps=use)
        np.testing.assert_allclose(spaced.betas, ref["betas"].numpy(), rtol=0, atol=1e-12)
        # model sees original step indices rescaled to 0..1000
        spaced.rescale_timesteps = True
        ts = spaced.model_timesteps(torch.arange(len(use)))
        torch.testing.assert_close(ts, torch.tensor(sorted(use), dtype=torch.float32) * 0.25)


def test_ddpm_denoising_step(fixtures_dir):
    f = torch.load(fixtures_dir / "ddpm/ddpm_denoising_cases.pt", weights_only=True)
    diffusion = load_diffusion_spec("config/ddpm/cifar10.yml").build_diffusion()
    np.testing.assert_allclose(diffusion.fixed_large_log_variance, f["logvar"].numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(diffusion.sqrt_alphas_cumprod, f["sqrt_alphas_cumprod"].numpy(), rtol=0, atol=1e-12)
    for c in f["cases"]:
        t = torch.full((c["x_t"].shape[0],), c["t"], dtype=torch.long)
        seen = []
        out = diffusion.p_sample(
            lambda x, ts, o=c["model_output"], seen=seen: seen.append(ts) or o, c["x_t"], t, noise=c["noise"]
        )
        torch.testing.assert_close(out["sample"], c["sample"], atol=1e-6, rtol=0)
        torch.testing.assert_close(out["pred_xstart"], c["pred_xstart"], atol=1e-6, rtol=0)
        assert torch.equal(seen[0], t)  # the DDPM sees raw integer steps


def test_config_errors(tmp_path):
    with pytest.raises(UserError, match="unknown key.*num_chanels"):
        spec_from_dict({"model": {"num_chanels": 3}}, "x.yml")
    with pytest.raises(UserError, match="architecture"):
        spec_from_dict({"model": {"architecture": "vit"}}, "x.yml")
    with pytest.raises(UserError, match="not found"):
        load_diffusion_spec(tmp_path / "missing.yml")
    (tmp_path / "bad.yml").write_text("model: [unclosed")
    with pytest.raises(UserError, match="invalid YAML"):
        load_diffusion_spec(tmp_path / "bad.yml")
