"""Diffusion purification: add Gaussian noise in one shot, then denoise ancestrally.

``noise_and_denoise`` is the step both defences share: ECLIPSE runs it once per image
(t* = 100 of 4000 cosine steps), DataElixir repeats it for several rounds (T = 150 of
1000 linear steps) and keeps the last intermediate samples of each round.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from utils.augment import to_uint8
from utils.chunk_store import ChunkStorage, ChunkStore, Log, Tick
from utils.compat import adopt_part_markers, legacy_precision
from utils.diffusion.gaussian_diffusion import GaussianDiffusion, _extract, truncated_steps
from utils.fileio import UserError, atomic_torch_save, tensor_fingerprint
from utils.precision import keep_stored
from utils.run_state import on_rank0
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
    log: Log = print,
    settings: dict | None = None,
    overwrite: bool = False,
    stats: dict | None = None,
) -> torch.Tensor | None:
    """Purify uint8 ``images`` [N, 3, 32, 32] batch by batch, in input order.

    Batch ``i`` is written to ``parts_dir/part_<i>.pt`` as soon as it is done, as a chunk of
    a :class:`utils.chunk_store.ChunkStore` whose header ``settings.json`` holds these
    arguments, a fingerprint of ``images`` and the caller's ``settings``: an interrupted run
    resumes at the batches marked done with their bytes intact; parts written with other
    settings are refused (``overwrite``: discarded), damaged parts are redone. With
    ``world`` processes, rank r does batches i with i % world == r. Rank 0 returns the
    assembled uint8 result (other ranks return None). ``stats`` receives ``images_done``
    (purified by this job, summed over ranks) and ``images_resumed`` (read from disk).
    """
    header = {
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
    parts = PartFiles(parts_dir)
    store = _parts_store(parts, len(images), batch_size)
    # a resumed run keeps the precision its batches were made with (every rank reads it)
    if not overwrite:
        keep_stored(header, store.read_header(), parts_dir, log, ("precision",))
    bf16 = header["precision"] == "bf16"
    on_rank0(lambda: _open_parts(store, parts, header, overwrite, log), rank, world)

    def work(i: int, tick: Tick) -> None:
        x = images[store.rows(i)]
        g = torch.Generator(device=device).manual_seed(chunk_seed(seed, i))
        out, _ = noise_and_denoise(
            model,
            base,
            to_model_range(x.to(device)),
            t_star,
            respace=respace,
            generator=g,
            bf16=bf16,
            on_step=lambda: tick(len(x)),
        )
        atomic_torch_save(to_uint8(from_model_range(out), quantize).cpu(), parts.path(i))

    steps = len(truncated_steps(t_star, respace))
    done = store.build(work, what="purify", units_per_item=steps, rank=rank, world=world, log=log)
    if rank != 0:
        return None
    if stats is not None:
        stats.update(images_done=done, images_resumed=len(images) - done, precision=header["precision"])
    return _read_parts(store, parts, images.shape)


class PartFiles(ChunkStorage):
    """One torch file per batch: ``part_<i>.pt``."""

    def __init__(self, parts_dir: Path) -> None:
        self.parts_dir = parts_dir

    def path(self, i: int) -> Path:
        return self.parts_dir / f"part_{i:05d}.pt"

    def chunk_bytes(self, c: int, rows: slice) -> list[bytes | memoryview]:
        return [self.path(c).read_bytes()]


def _parts_store(parts: PartFiles, n: int, batch_size: int) -> ChunkStore:
    parts_dir = parts.parts_dir
    return ChunkStore(
        parts_dir,
        n,
        batch_size,
        parts,
        header_name="settings.json",
        upgrade=legacy_precision,
        damaged_hint=f"delete {parts_dir} to start afresh",
        refuse_hint="re-run with those settings to finish it, or pass --overwrite to discard it",
    )


def _open_parts(store: ChunkStore, parts: PartFiles, header: dict, overwrite: bool, log: Log) -> None:
    """Create or check the parts folder (rank 0), adopting batches marked in the earlier way."""
    store.prepare(header, overwrite=overwrite, log=log)
    adopt_part_markers(store.root, store.n_chunks, parts.path, store.mark, header)


def _read_parts(store: ChunkStore, parts: PartFiles, shape: torch.Size) -> torch.Tensor:
    """The purified batches, checked (uint8, batch ``i``'s size) and concatenated in order."""
    batches = []
    for i in range(store.n_chunks):
        path = parts.path(i)
        p = torch.load(path, map_location="cpu", weights_only=True)
        rows = store.rows(i)
        if not isinstance(p, torch.Tensor) or p.dtype != torch.uint8 or p.shape != (rows.stop - rows.start, *shape[1:]):
            raise UserError(f"{path} does not hold batch {i}; delete {store.root} and re-run")
        batches.append(p)
    return torch.cat(batches)
