"""Diffusion purification: add Gaussian noise in one shot, then denoise ancestrally.

``noise_and_denoise`` is the step both defences share: ECLIPSE runs it once per image
(t* = 100 of 4000 cosine steps), DataElixir repeats it for several rounds (T = 150 of
1000 linear steps) and keeps the last intermediate samples of each round.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from utils.augment import to_uint8
from utils.diffusion.gaussian_diffusion import GaussianDiffusion, _extract, truncated_steps
from utils.fileio import UserError, atomic_torch_save, atomic_write_json, atomic_write_text, read_state_json
from utils.precision import keep_stored, legacy_precision
from utils.progress import progress
from utils.run_state import checksum, on_rank0, same_settings_or_refuse, tensor_fingerprint
from utils.runtime import autocast, barrier


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
    on_step: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Purify ``x0`` (float, [-1, 1], on the model's device).

    ``x_t* = sqrt(a[t*-1]) x0 + sqrt(1 - a[t*-1]) eps`` with ``a`` the cumulative alphas of
    ``base`` (an un-respaced process), then ancestral ``p_sample`` for steps
    ``t*-1 .. 0`` — or, with ``respace=K``, for K evenly spaced steps over the same range
    with the respaced variances (improved-diffusion's ``SpacedDiffusion`` arithmetic);
    ``dense_tail`` as in :func:`utils.diffusion.gaussian_diffusion.truncated_steps`.

    ``noise_offset=1`` noises to ``a[t*]`` instead while still denoising from ``t*-1``:
    DataElixir's reference code does this (an off-by-one), offered for exact replication.

    Returns the final sample and the last ``keep_last`` reverse-step samples (oldest
    first; the final sample is the last of them). ``on_step`` is called after each
    reverse step (progress reporting).
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
        if on_step is not None:
            on_step()
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
    precision: str = "fp32",
    quantize: str = "truncate",
    device: torch.device = torch.device("cpu"),
    rank: int = 0,
    world: int = 1,
    log=print,
    settings: dict | None = None,
    overwrite: bool = False,
    stats: dict | None = None,
) -> torch.Tensor | None:
    """Purify uint8 ``images`` [N, 3, 32, 32] batch by batch, in input order.

    Each batch is written to ``parts_dir/part_<i>.pt`` as soon as it is done, with a
    marker ``part_<i>.ok`` holding the key of the settings (these arguments, a fingerprint
    of ``images`` and the caller's ``settings``) and a checksum of the part's bytes. An
    interrupted run resumes at the parts whose marker matches; parts written with other
    settings are refused (``overwrite``: discarded), damaged parts are redone. With
    ``world`` processes, rank r does batches i with i % world == r. Rank 0 returns the
    assembled uint8 result (other ranks return None). ``stats`` receives ``images_done``
    (purified by this job, summed over ranks) and ``images_resumed`` (read from disk).
    """
    store = {
        "t": t_star,
        "respace": respace,
        "seed": seed,
        "batch_size": batch_size,
        "precision": precision,
        "quantize": quantize,
        "n": len(images),
        "images": tensor_fingerprint(images),
        **(settings or {}),
    }
    # a resumed run keeps the precision its batches were made with (every rank reads it)
    if not overwrite:
        keep_stored(store, _stored_settings(parts_dir), parts_dir, log, ("precision",))
    bf16 = store["precision"] == "bf16"
    key = checksum(json.dumps(store, sort_keys=True, default=str).encode())
    on_rank0(lambda: _open_parts_dir(parts_dir, store, overwrite), rank, world)
    n_parts = (len(images) + batch_size - 1) // batch_size

    def part(i: int) -> Path:
        return parts_dir / f"part_{i:05d}.pt"

    def valid(i: int) -> bool:
        marker = part(i).with_suffix(".ok")
        try:
            return marker.read_text().split() == [key, checksum(part(i).read_bytes())]
        except OSError:
            return False

    def run(todo: list[int], who: str) -> int:
        done = 0
        # counted in image-steps, so that a log shows a rate within the first batch
        sizes = [len(images[i * batch_size : (i + 1) * batch_size]) for i in todo]
        bar = progress(total=sum(sizes) * steps, desc=who, unit="img-step", dynamic_ncols=True)
        for k, (i, size) in enumerate(zip(todo, sizes)):
            x = images[i * batch_size : (i + 1) * batch_size]
            g = torch.Generator(device=device).manual_seed(chunk_seed(seed, i))
            out, _ = noise_and_denoise(
                model,
                base,
                to_model_range(x.to(device)),
                t_star,
                respace=respace,
                generator=g,
                bf16=bf16,
                on_step=lambda size=size: bar.update(size),
            )
            atomic_torch_save(to_uint8(from_model_range(out), quantize).cpu(), part(i))
            # the marker is written after the part, so a crash between them redoes the batch
            atomic_write_text(part(i).with_suffix(".ok"), f"{key} {checksum(part(i).read_bytes())}\n")
            done += len(x)
            bar.set_postfix(batches=f"{k + 1}/{len(todo)}")
        bar.close()
        return done

    mine = [i for i in range(n_parts) if i % world == rank]
    todo = [i for i in mine if not valid(i)]
    if len(todo) < len(mine):
        log(f"resuming: {len(mine) - len(todo)} of {len(mine)} batches already purified in {parts_dir}")
    steps = len(truncated_steps(t_star, respace))
    done = run(todo, f"purify[{rank}]" if world > 1 else "purify")
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        total = torch.tensor([done], dtype=torch.long)
        torch.distributed.all_reduce(total)
        done = int(total)
    barrier()
    if rank != 0:
        return None
    # a part lost or damaged after its rank finished is redone here
    missing = [i for i in range(n_parts) if not valid(i)]
    if missing:
        log(f"redoing {len(missing)} missing or damaged batches")
        done += run(missing, "purify (repair)")
    if stats is not None:
        stats.update(images_done=done, images_resumed=len(images) - done, precision=store["precision"])
    return _read_parts([part(i) for i in range(n_parts)], batch_size, images.shape, parts_dir)


def _stored_settings(parts_dir: Path) -> dict | None:
    """The settings an interrupted run recorded in ``parts_dir`` (older spellings read as now)."""
    meta = parts_dir / "settings.json"
    old = read_state_json(meta, f"delete {parts_dir} to start afresh") if meta.is_file() else None
    return legacy_precision(old) if isinstance(old, dict) else old


def _open_parts_dir(parts_dir: Path, store: dict, overwrite: bool) -> None:
    """Refuse a folder of parts written with other settings (``overwrite``: discard it);
    record ours in its ``settings.json``."""
    meta = parts_dir / "settings.json"
    hint = "re-run with those settings to finish it, or pass --overwrite to discard it"
    old = _stored_settings(parts_dir)
    if not same_settings_or_refuse(parts_dir, old, store, overwrite=overwrite, hint=hint):
        if old is not None:  # --overwrite: discard the other run's batches
            shutil.rmtree(parts_dir, ignore_errors=True)
        atomic_write_json(meta, store)


def _read_parts(paths: list[Path], batch_size: int, shape: torch.Size, parts_dir: Path) -> torch.Tensor:
    """The purified batches, checked (uint8, batch ``i``'s size) and concatenated in order."""
    parts = []
    for i, path in enumerate(paths):
        p = torch.load(path, map_location="cpu", weights_only=True)
        expected = min(batch_size, shape[0] - i * batch_size)
        if not isinstance(p, torch.Tensor) or p.dtype != torch.uint8 or p.shape != (expected, *shape[1:]):
            raise UserError(f"{path} does not hold batch {i}; delete {parts_dir} and re-run")
        parts.append(p)
    return torch.cat(parts)
