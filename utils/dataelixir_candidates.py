"""DataElixir's step 1: the candidate sets of every training image and the backdoored model's
labels for them, in a resumable memory-mapped store.

Per training image, ``rounds_n`` rounds of "noise to step ``steps_T`` in one shot,
``steps_T`` ancestral reverse steps"; the last ``last_steps_m`` reverse samples of each round
are kept and the round's (clamped) output seeds the next round. ``1 + n*m`` candidates per
sample, index 0 being the original. Candidates are stored as uint8 in a memory-mapped file
together with the labels; work is done in chunks, each marked done atomically (with a
checksum of its bytes), so a re-run resumes and torchrun ranks share the work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from utils.augment import to_uint8
from utils.fileio import UserError, atomic_write_json, atomic_write_text, read_state_json
from utils.progress import progress
from utils.purify import chunk_seed, from_model_range, noise_and_denoise, to_model_range
from utils.run_state import checksum, on_rank0, same_settings_or_refuse, tensor_fingerprint
from utils.runtime import barrier
from utils.trainer import predict

Log = Callable[[str], None]


def num_candidates(rounds_n: int, last_steps_m: int) -> int:
    return 1 + rounds_n * last_steps_m


def _candidate_files(out_dir: Path) -> tuple[Path, Path, Path, Path]:
    return out_dir / "candidates.u8", out_dir / "preds.i16", out_dir / "meta.json", out_dir / "done"


def _read_meta(meta_p: Path) -> dict:
    return read_state_json(meta_p, f"delete {meta_p.parent} to rebuild the candidates (the run resumes from there)")


def _store_sizes(out_dir: Path, meta: dict) -> list[tuple[Path, int, int]]:
    """(file, bytes on disk, bytes the header says) for the two memory-mapped files."""
    cand_p, pred_p, _, _ = _candidate_files(out_dir)
    n, k = meta["n"], meta["k"]
    want = (n * k * int(np.prod(meta["image_shape"])), n * k * 2)
    return [(p, p.stat().st_size if p.is_file() else -1, w) for p, w in zip((cand_p, pred_p), want)]


def open_candidates(out_dir: str | Path, mode: str = "r") -> tuple[np.memmap, np.memmap, dict]:
    """The candidate images ``uint8 [N, K, 3, 32, 32]`` and labels ``int16 [N, K]`` (memory-mapped).

    A file whose size differs from the header's (truncated after a kill) is an error:
    mapping it would read (mode ``r+``: silently append) zeros."""
    out_dir = Path(out_dir)
    cand_p, pred_p, meta_p, _ = _candidate_files(out_dir)
    meta = _read_meta(meta_p)
    for p, size, want in _store_sizes(out_dir, meta):
        if size != want:
            raise UserError(
                f"{p} holds {size} bytes, its header {meta_p} says {want}; re-run to rebuild the lost chunks"
            )
    n, k = meta["n"], meta["k"]
    shape = tuple(meta["image_shape"])
    cand = np.memmap(cand_p, dtype=np.uint8, mode=mode, shape=(n, k, *shape))
    preds = np.memmap(pred_p, dtype=np.int16, mode=mode, shape=(n, k))
    return cand, preds, meta


def _chunk_sum(cand: np.ndarray, preds: np.ndarray, lo: int, hi: int) -> str:
    return checksum(np.ascontiguousarray(cand[lo:hi]).data) + checksum(np.ascontiguousarray(preds[lo:hi]).data)


def _chunk_ok(cand: np.ndarray, preds: np.ndarray, done: Path, c: int, batch_size: int) -> bool:
    """Chunk ``c``'s marker exists and its checksum matches the bytes on disk."""
    lo, hi = c * batch_size, min(len(cand), (c + 1) * batch_size)
    try:
        marker = (done / f"chunk_{c:05d}").read_text().split()
    except OSError:
        return False
    return marker == [str(hi - lo), _chunk_sum(cand, preds, lo, hi)]


def candidates_complete(out_dir: str | Path) -> bool:
    """Every chunk is marked done and its bytes match the marker's checksum."""
    out_dir = Path(out_dir)
    _, _, meta_p, done = _candidate_files(out_dir)
    if not meta_p.is_file():
        return False
    meta = _read_meta(meta_p)
    if any(size != want for _, size, want in _store_sizes(out_dir, meta)):
        return False
    cand, preds, _ = open_candidates(out_dir)
    return all(_chunk_ok(cand, preds, done, c, meta["batch_size"]) for c in range(meta["chunks"]))


# settings added after candidate folders were first written, with the value older folders used
_META_ADDED_LATER = {"dense_tail": False, "original_round_trip": False}


def check_step_settings(
    steps_T: int, rounds_n: int, last_steps_m: int, respace: int | None = None, dense_tail: bool = False
) -> None:
    """The step counts of candidate construction, checked once for the attack scripts (before
    any work) and for direct callers; a UserError names the YAML keys."""
    if rounds_n < 1 or last_steps_m < 1 or steps_T < 1:
        raise UserError(f"rounds_n, last_steps_m and steps_T must be >= 1 (got {rounds_n}, {last_steps_m}, {steps_T})")
    if respace is not None and not 1 <= respace <= steps_T:
        raise UserError(f"purify_respace must be null or in 1..steps_T ({steps_T}), got {respace}")
    reverse_steps = respace or steps_T
    if last_steps_m > reverse_steps:
        what = f"purify_respace={respace}" if respace else f"steps_T={steps_T}"
        raise UserError(
            f"last_steps_m={last_steps_m} exceeds the {reverse_steps} reverse steps of {what}: "
            "each round keeps its last m steps"
        )
    if dense_tail and reverse_steps < steps_T and last_steps_m >= reverse_steps:
        raise UserError(
            f"purify_dense_tail needs purify_respace ({reverse_steps}) > last_steps_m ({last_steps_m}): "
            "the unspaced tail would leave no step for the rest of the chain; raise purify_respace"
        )


def _header(images: torch.Tensor, classifier: nn.Module, k: int, batch_size: int, **settings: Any) -> dict:
    """``meta.json``: the store's shape, the construction settings and fingerprints of its inputs."""
    n = len(images)
    return {
        "n": n,
        "k": k,
        "image_shape": list(images.shape[1:]),
        "chunks": (n + batch_size - 1) // batch_size,
        "batch_size": batch_size,
        **settings,
        # the inputs: the images and the model labelling the candidates
        "images": tensor_fingerprint(images),
        "classifier": tensor_fingerprint(*classifier.state_dict().values()),
    }


def _prepare_store(out_dir: Path, meta: dict, log: Log) -> None:
    """Create the store (zero-filled files and the header), or check an existing one against
    ``meta`` and restore the size of a file truncated or extended after a kill."""
    _, _, meta_p, done = _candidate_files(out_dir)
    if meta_p.is_file():
        old = {**_META_ADDED_LATER, **_read_meta(meta_p)}
        same_settings_or_refuse(out_dir, old, meta, hint="delete that folder to rebuild")
        for p, size, want in _store_sizes(out_dir, meta):
            if size != want:
                # the chunks whose bytes no longer match their checksum are rebuilt afterwards
                log(f"{p} holds {size} bytes instead of {want}: rebuilding the chunks it lost")
                with open(p, "ab") as f:
                    f.truncate(want)
    else:
        for p, _, want in _store_sizes(out_dir, meta):
            with open(p, "wb") as f:
                f.truncate(want)  # zeros, as a fresh memmap
        atomic_write_json(meta_p, meta)
    done.mkdir(exist_ok=True)


@dataclass(frozen=True)
class _Store:
    """The store mapped for writing, chunk by chunk."""

    cand: np.memmap
    preds: np.memmap
    done: Path
    batch_size: int

    @classmethod
    def map(cls, out_dir: Path, meta: dict) -> _Store:
        cand_p, pred_p, _, done = _candidate_files(out_dir)
        # every rank maps the same files (MAP_SHARED): chunks are disjoint slices, and a page two
        # chunks share is one page of the page cache, so no rank's bytes overwrite another's
        n, k = meta["n"], meta["k"]
        cand = np.memmap(cand_p, dtype=np.uint8, mode="r+", shape=(n, k, *meta["image_shape"]))
        preds = np.memmap(pred_p, dtype=np.int16, mode="r+", shape=(n, k))
        return cls(cand, preds, done, meta["batch_size"])

    def rows(self, c: int) -> tuple[int, int]:
        return c * self.batch_size, min(len(self.cand), (c + 1) * self.batch_size)

    def ok(self, c: int) -> bool:
        return _chunk_ok(self.cand, self.preds, self.done, c, self.batch_size)

    def write(self, c: int, images: torch.Tensor, labels: torch.Tensor) -> None:
        lo, hi = self.rows(c)
        self.cand[lo:hi] = images.numpy()
        self.preds[lo:hi] = labels.numpy().astype(np.int16)
        self.cand.flush()
        self.preds.flush()
        # the marker is written only after the data is on disk, so a crash redoes the chunk
        atomic_write_text(self.done / f"chunk_{c:05d}", f"{hi - lo} {_chunk_sum(self.cand, self.preds, lo, hi)}\n")


def _fill_chunks(
    store: _Store,
    make: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    chunks: list[int],
    desc: str,
    image_steps: int,
) -> None:
    """Build ``chunks`` with ``make`` (chunk -> candidates, labels) into ``store``, showing the
    image-steps per second."""
    bar = progress(chunks, desc=desc, unit="chunk", dynamic_ncols=True)
    for c in bar:
        store.write(c, *make(c))
        rate = bar.format_dict.get("rate")
        if rate:
            lo, hi = store.rows(c)
            bar.set_postfix(img_steps_per_s=f"{rate * (hi - lo) * image_steps:.0f}")
    bar.close()


@torch.no_grad()
def construct_candidates(
    diffusion_model: nn.Module,
    base_diffusion: Any,
    classifier: nn.Module,
    images: torch.Tensor,
    out_dir: str | Path,
    *,
    steps_T: int,
    rounds_n: int,
    last_steps_m: int,
    batch_size: int = 1024,
    respace: int | None = None,
    dense_tail: bool = False,
    noise_offset: int = 0,
    original_round_trip: bool = False,
    seed: int = 0,
    bf16: bool = True,
    device: torch.device = torch.device("cpu"),
    max_chunks: int | None = None,
    rank: int = 0,
    world: int = 1,
    log: Log = print,
) -> tuple[np.memmap, np.memmap]:
    """Build the candidate sets of uint8 ``images`` [N, 3, H, W] and label them.

    Chunk ``c`` (``batch_size`` samples) uses a generator seeded from ``(seed, c)``, so
    results do not depend on where a run was interrupted. ``max_chunks`` stops after that
    many newly finished chunks (tests use it to simulate an interruption).
    With ``world`` processes (torchrun, every rank calling with the same arguments), rank
    ``r`` builds the chunks ``c`` with ``c % world == r`` into the one store that rank 0
    creates or checks first; the bytes do not depend on ``world``.
    ``dense_tail`` (with ``respace``) takes the last ``last_steps_m`` reverse steps unspaced,
    so the kept candidates are at the paper's noise levels (a CPU-scale option).
    ``original_round_trip`` stores candidate 0 as the reference does (see :func:`reference_original`).
    Returns the memory-mapped candidates and labels (read-only).
    """
    check_step_settings(steps_T, rounds_n, last_steps_m, respace, dense_tail)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    k = num_candidates(rounds_n, last_steps_m)
    steps = dict(steps_T=steps_T, rounds_n=rounds_n, last_steps_m=last_steps_m, respace=respace, dense_tail=dense_tail)
    steps.update(noise_offset=noise_offset, original_round_trip=original_round_trip)
    meta = _header(images, classifier, k, batch_size, **steps, seed=seed, bf16=bf16)
    # rank 0 alone creates or checks the store (header, file sizes) before any rank maps it
    on_rank0(lambda: _prepare_store(out_dir, meta, log), rank, world)
    store = _Store.map(out_dir, meta)
    mine = [c for c in range(meta["chunks"]) if c % world == rank]
    todo = [c for c in mine if not store.ok(c)]
    if len(todo) < len(mine):
        log(f"candidates: {len(mine) - len(todo)} of {len(mine)} chunks already built in {out_dir}")
    if max_chunks is not None:
        todo = todo[:max_chunks]
    classifier.eval()

    def make(c: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = store.rows(c)
        generator = torch.Generator(device=device).manual_seed(chunk_seed(seed, c))
        out = build_chunk(
            diffusion_model, base_diffusion, images[lo:hi].to(device), **steps, generator=generator, bf16=bf16
        )
        flat = out.reshape(-1, *out.shape[2:])
        return out, predict(classifier, flat, device, batch_size=512, bf16=bf16).argmax(1).view(len(out), k)

    image_steps = rounds_n * (respace or steps_T)
    _fill_chunks(store, make, todo, f"candidates[{rank}]" if world > 1 else "candidates", image_steps)
    barrier()
    if rank == 0 and world > 1 and max_chunks is None:
        # a chunk whose marker is missing after every rank finished (its rank lost it) is built here
        lost = [c for c in range(meta["chunks"]) if not (store.done / f"chunk_{c:05d}").is_file()]
        if lost:
            log(f"candidates: building {len(lost)} chunks the other ranks left undone")
            _fill_chunks(store, make, lost, "candidates (repair)", image_steps)
    return open_candidates(out_dir)[:2]


def reference_original(x_u8: torch.Tensor) -> torch.Tensor:
    """The original image as DataElixir's code keeps it: uint8 -> ``ToTensor`` (float32 / 255)
    -> ``x * 2 - 1`` -> clamp -> ``(x + 1) * 0.5`` -> clamp -> ``ToPILImage`` (``mul(255)``,
    truncated). The float32 round trip lowers 63 of the 256 byte values by one level; the
    exact original (our default) is the intent."""
    x = x_u8.float() / 255.0 * 2 - 1
    return to_uint8(from_model_range(x.clamp(-1, 1)))


@torch.no_grad()
def build_chunk(
    diffusion_model: nn.Module,
    base_diffusion: Any,
    x_u8: torch.Tensor,
    *,
    steps_T: int,
    rounds_n: int,
    last_steps_m: int,
    respace: int | None,
    noise_offset: int,
    generator: torch.Generator | None,
    bf16: bool,
    dense_tail: bool = False,
    original_round_trip: bool = False,
) -> torch.Tensor:
    """Candidates of one batch: uint8 ``[B, 1 + n*m, 3, H, W]`` on the CPU.

    Index 0 is the original bytes (default), or with ``original_round_trip`` the
    reference's float round trip of them (:func:`reference_original`).
    """
    x = to_model_range(x_u8)
    original = reference_original(x_u8) if original_round_trip else x_u8
    out = [original.cpu().unsqueeze(1)]
    for _ in progress(range(rounds_n), desc="rounds", leave=False, dynamic_ncols=True):
        x, kept = noise_and_denoise(
            diffusion_model,
            base_diffusion,
            x,
            steps_T,
            respace=respace,
            dense_tail=last_steps_m if dense_tail else 0,
            noise_offset=noise_offset,
            generator=generator,
            bf16=bf16,
            keep_last=last_steps_m,
        )
        # the reference clamps to [-1, 1] before quantising (ToPILImage truncates)
        steps = torch.stack([to_uint8(from_model_range(s.clamp(-1, 1))) for s in kept], dim=1)
        out.append(steps.cpu())
        x = x.clamp(-1, 1)
    return torch.cat(out, dim=1)
