"""Diffusion purification: add Gaussian noise in one shot, then denoise ancestrally.

``noise_and_denoise`` is the step both defences share: ECLIPSE runs it once per image
(t* = 100 of 4000 cosine steps), DataElixir repeats it for several rounds (T = 150 of
1000 linear steps) and keeps the last intermediate samples of each round.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn as nn

from utils.diffusion import GaussianDiffusion, _extract, truncated_steps
from utils.runtime import autocast


@lru_cache(maxsize=16)
def _truncated_process(base: GaussianDiffusion, t_star: int, respace: int | None) -> GaussianDiffusion:
    return base.respaced(truncated_steps(t_star, respace))


def to_model_range(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] via [0, 1], as ``(ToTensor(x) - 0.5) * 2``."""
    return (x_uint8.float() / 255.0 - 0.5) * 2


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> float [0, 1] (not clamped; quantise with ``augment.to_uint8``)."""
    return (x + 1) * 0.5


@torch.no_grad()
def noise_and_denoise(
    model: nn.Module,
    base: GaussianDiffusion,
    x0: torch.Tensor,
    t_star: int,
    *,
    respace: int | None = None,
    noise_offset: int = 0,
    generator: torch.Generator | None = None,
    bf16: bool = False,
    keep_last: int = 0,
    clip_denoised: bool = True,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Purify ``x0`` (float, [-1, 1], on the model's device).

    ``x_t* = sqrt(a[t*-1]) x0 + sqrt(1 - a[t*-1]) eps`` with ``a`` the cumulative alphas of
    ``base`` (an un-respaced process), then ancestral ``p_sample`` for steps
    ``t*-1 .. 0`` — or, with ``respace=K``, for K evenly spaced steps over the same range
    with the respaced variances (improved-diffusion's ``SpacedDiffusion`` arithmetic).

    ``noise_offset=1`` noises to ``a[t*]`` instead while still denoising from ``t*-1``:
    DataElixir's reference code does this (an off-by-one), offered for exact replication.

    Returns the final sample and the last ``keep_last`` reverse-step samples (oldest
    first; the final sample is the last of them).
    """
    if base.num_timesteps != base.original_num_steps:
        raise ValueError("pass the un-respaced diffusion process as `base`")
    if not 1 <= t_star + noise_offset <= base.num_timesteps:
        raise ValueError(f"t*={t_star} is outside the process's {base.num_timesteps} steps")
    process = _truncated_process(base, t_star, respace)
    noise_t = torch.full((x0.shape[0],), t_star - 1 + noise_offset, device=x0.device, dtype=torch.long)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
    x = (
        _extract(base.sqrt_alphas_cumprod, noise_t, x0.shape) * x0
        + _extract(base.sqrt_one_minus_alphas_cumprod, noise_t, x0.shape) * eps
    )
    kept: list[torch.Tensor] = []
    device = x0.device
    for j in reversed(range(process.num_timesteps)):
        t = torch.full((x0.shape[0],), j, device=device, dtype=torch.long)
        with autocast(device, bf16):
            out = model(x, process.model_timesteps(t))
        x = process.p_sample(None, x, t, clip_denoised=clip_denoised, generator=generator, model_output=out.float())[
            "sample"
        ]
        if keep_last and j < keep_last:
            kept.append(x)
    return x, kept


def noise_std_at(base: GaussianDiffusion, t_star: int) -> float:
    """Standard deviation of the noise added at t* on the [-1, 1] scale."""
    return float(np.sqrt(1.0 - base.alphas_cumprod[t_star - 1]))
