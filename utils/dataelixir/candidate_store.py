"""DataElixir's candidate store: per training image its ``K`` candidates (uint8) and the
backdoored model's labels for them, in two memory-mapped files with a JSON header.

It is built in chunks of ``batch_size`` samples, each marked done atomically with a checksum
of its bytes, so an interrupted run resumes at the chunks whose bytes are missing or damaged,
and torchrun ranks fill disjoint chunks of the one store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from utils.fileio import UserError, atomic_write_json, atomic_write_text, read_state_json
from utils.progress import progress
from utils.run_state import checksum, same_settings_or_refuse, tensor_fingerprint

Log = Callable[[str], None]


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


def store_header(images: torch.Tensor, classifier: nn.Module, k: int, batch_size: int, **settings: Any) -> dict:
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


def prepare_store(out_dir: Path, meta: dict, log: Log) -> None:
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
class ChunkStore:
    """The store mapped for writing, chunk by chunk."""

    cand: np.memmap
    preds: np.memmap
    done: Path
    batch_size: int

    @classmethod
    def map(cls, out_dir: Path, meta: dict) -> ChunkStore:
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


def fill_chunks(
    store: ChunkStore,
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
