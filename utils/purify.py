"""Diffusion purification: add Gaussian noise in one shot, then denoise ancestrally.

``noise_and_denoise`` is the step both defences share: ECLIPSE runs it once per image
(t* = 100 of 4000 cosine steps), DataElixir repeats it for several rounds (T = 150 of
1000 linear steps) and keeps the last intermediate samples of each round.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from utils.diffusion import GaussianDiffusion, _extract, truncated_steps
from utils.runtime import autocast


@lru_cache(maxsize=16)
def _truncated_process(
    base: GaussianDiffusion, t_star: int, respace: int | None, dense_tail: int = 0
) -> GaussianDiffusion:
    return base.respaced(truncated_steps(t_star, respace, dense_tail))


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
    dense_tail: int = 0,
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
    with the respaced variances (improved-diffusion's ``SpacedDiffusion`` arithmetic);
    ``dense_tail`` as in :func:`utils.diffusion.truncated_steps`.

    ``noise_offset=1`` noises to ``a[t*]`` instead while still denoising from ``t*-1``:
    DataElixir's reference code does this (an off-by-one), offered for exact replication.

    Returns the final sample and the last ``keep_last`` reverse-step samples (oldest
    first; the final sample is the last of them).
    """
    if base.num_timesteps != base.original_num_steps:
        raise ValueError("pass the un-respaced diffusion process as `base`")
    if not 1 <= t_star + noise_offset <= base.num_timesteps:
        raise ValueError(f"t*={t_star} is outside the process's {base.num_timesteps} steps")
    process = _truncated_process(base, t_star, respace, dense_tail)
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


# --------------------------------------------------------------------------- ECLIPSE stage 1


def chunk_seed(seed: int, chunk: int) -> int:
    """Noise seed of one chunk: results do not depend on the number of processes or on
    where a run was interrupted."""
    return (seed * 1_000_003 + chunk * 7919 + 12345) % (2**63 - 1)


def purify_dataset(
    model: nn.Module,
    base: GaussianDiffusion,
    images: torch.Tensor,
    t_star: int,
    parts_dir: Path,
    *,
    batch_size: int = 256,
    respace: int | None = None,
    seed: int = 1234,
    bf16: bool = True,
    quantize: str = "truncate",
    device: torch.device = torch.device("cpu"),
    rank: int = 0,
    world: int = 1,
    log=print,
) -> torch.Tensor | None:
    """Purify uint8 ``images`` [N, 3, 32, 32] batch by batch, in input order.

    Each batch is written to ``parts_dir/part_<i>.pt`` as soon as it is done, so an
    interrupted run resumes at the first missing batch; with ``world`` processes, rank r
    does batches i with i % world == r. Rank 0 returns the assembled uint8 result once
    every part exists (other ranks return None).
    """
    from utils.augment import to_uint8
    from utils.fileio import atomic_torch_save, safe_torch_load
    from utils.progress import progress

    parts_dir.mkdir(parents=True, exist_ok=True)
    n_parts = (len(images) + batch_size - 1) // batch_size
    mine = [i for i in range(n_parts) if i % world == rank]
    todo = [i for i in mine if not (parts_dir / f"part_{i:05d}.pt").is_file()]
    if len(todo) < len(mine):
        log(f"resuming: {len(mine) - len(todo)} of {len(mine)} batches already purified in {parts_dir}")
    steps = len(truncated_steps(t_star, respace))
    bar = progress(todo, desc=f"purify[{rank}]" if world > 1 else "purify", unit="batch", dynamic_ncols=True)
    for i in bar:
        x = images[i * batch_size : (i + 1) * batch_size]
        g = torch.Generator(device=device).manual_seed(chunk_seed(seed, i))
        out, _ = noise_and_denoise(
            model, base, to_model_range(x.to(device)), t_star, respace=respace, generator=g, bf16=bf16
        )
        atomic_torch_save(to_uint8(from_model_range(out), quantize).cpu(), parts_dir / f"part_{i:05d}.pt")
        bar.set_postfix(
            img_steps_per_s=f"{bar.format_dict['rate'] * len(x) * steps:.0f}" if bar.format_dict.get("rate") else ""
        )
    bar.close()
    from utils.runtime import barrier

    barrier()
    if rank != 0:
        return None
    parts = []
    for i in range(n_parts):
        part = safe_torch_load(parts_dir / f"part_{i:05d}.pt", "purified batch")
        expected = min(batch_size, len(images) - i * batch_size)
        if (
            not isinstance(part, torch.Tensor)
            or part.dtype != torch.uint8
            or part.shape != (expected, *images.shape[1:])
        ):
            raise ValueError(f"{parts_dir}/part_{i:05d}.pt is damaged; delete it and re-run to redo that batch")
        parts.append(part)
    return torch.cat(parts)
