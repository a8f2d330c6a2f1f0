"""DataElixir's candidate store: per training image its ``K`` candidates (uint8) and the
backdoored model's labels for them, in two memory-mapped files with a JSON header
(``meta.json``).

Its chunks of ``batch_size`` samples are slices of those files; their bookkeeping (header
check, markers under ``done/``, resume, sharding over torchrun ranks) is
:class:`utils.chunk_store.ChunkStore`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from utils.chunk_store import ChunkStorage, ChunkStore, Log
from utils.compat import legacy_candidate_header
from utils.fileio import UserError, read_state_json, tensor_fingerprint


def _candidate_files(out_dir: Path) -> tuple[Path, Path, Path]:
    return out_dir / "candidates.u8", out_dir / "preds.i16", out_dir / "meta.json"


_DAMAGED_HINT = "delete {out_dir} to rebuild the candidates (the run resumes from there)"


def _read_meta(meta_p: Path) -> dict:
    return read_state_json(meta_p, _DAMAGED_HINT.format(out_dir=meta_p.parent))


def _store_sizes(out_dir: Path, meta: dict) -> list[tuple[Path, int, int]]:
    """(file, bytes on disk, bytes the header says) for the two memory-mapped files."""
    cand_p, pred_p, _ = _candidate_files(out_dir)
    n, k = meta["n"], meta["k"]
    want = (n * k * int(np.prod(meta["image_shape"])), n * k * 2)
    return [(p, p.stat().st_size if p.is_file() else -1, w) for p, w in zip((cand_p, pred_p), want)]


def open_candidates(out_dir: str | Path, mode: str = "r") -> tuple[np.memmap, np.memmap, dict]:
    """The candidate images ``uint8 [N, K, 3, 32, 32]`` and labels ``int16 [N, K]`` (memory-mapped).

    A file whose size differs from the header's (truncated after a kill) is an error:
    mapping it would read (mode ``r+``: silently append) zeros."""
    out_dir = Path(out_dir)
    cand_p, pred_p, meta_p = _candidate_files(out_dir)
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


def candidates_complete(out_dir: str | Path) -> bool:
    """Every chunk is marked done and its bytes match the marker's checksum."""
    out_dir = Path(out_dir)
    meta_p = _candidate_files(out_dir)[2]
    if not meta_p.is_file():
        return False
    meta = _read_meta(meta_p)
    if any(size != want for _, size, want in _store_sizes(out_dir, meta)):
        return False
    return candidate_chunks(out_dir, meta, mode="r").complete()


def store_header(
    images: torch.Tensor, classifier: nn.Module, k: int, batch_size: int, *, ddpm: str, **settings: Any
) -> dict:
    """``meta.json``: the store's shape, the construction settings and fingerprints of its inputs
    (``ddpm``: the diffusion model's, its checkpoint file's fingerprint in the attack scripts)."""
    n = len(images)
    return {
        "n": n,
        "k": k,
        "image_shape": list(images.shape[1:]),
        "chunks": (n + batch_size - 1) // batch_size,
        "batch_size": batch_size,
        **settings,
        # the inputs: the images, the diffusion model making the candidates and the model labelling them
        "images": tensor_fingerprint(images),
        "ddpm": ddpm,
        "classifier": tensor_fingerprint(*classifier.state_dict().values()),
    }


class CandidateFiles(ChunkStorage):
    """The two memory-mapped files, the storage of the store's chunks (rows of samples)."""

    def __init__(self, out_dir: Path, meta: dict, mode: str = "r+") -> None:
        self.out_dir, self.meta, self.mode = out_dir, meta, mode
        self._mapped: tuple[np.memmap, np.memmap] | None = None

    def create(self) -> None:
        for p, _, want in _store_sizes(self.out_dir, self.meta):
            with open(p, "wb") as f:
                f.truncate(want)  # zeros, as a fresh memmap

    def restore(self, log: Log) -> None:
        for p, size, want in _store_sizes(self.out_dir, self.meta):
            if size != want:
                # the chunks whose bytes no longer match their checksum are rebuilt afterwards
                log(f"{p} holds {size} bytes instead of {want}: rebuilding the chunks it lost")
                with open(p, "ab") as f:
                    f.truncate(want)

    def mapped(self) -> tuple[np.memmap, np.memmap]:
        """The candidates and labels, mapped on first use (after the store is prepared)."""
        if self._mapped is None:
            cand_p, pred_p, _ = _candidate_files(self.out_dir)
            # every rank maps the same files (MAP_SHARED): chunks are disjoint slices, and a page two
            # chunks share is one page of the page cache, so no rank's bytes overwrite another's
            n, k = self.meta["n"], self.meta["k"]
            cand = np.memmap(cand_p, dtype=np.uint8, mode=self.mode, shape=(n, k, *self.meta["image_shape"]))
            self._mapped = cand, np.memmap(pred_p, dtype=np.int16, mode=self.mode, shape=(n, k))
        return self._mapped

    def chunk_bytes(self, c: int, rows: slice) -> list[bytes | memoryview]:
        cand, preds = self.mapped()
        return [np.ascontiguousarray(cand[rows]).data, np.ascontiguousarray(preds[rows]).data]

    def write(self, rows: slice, images: torch.Tensor, labels: torch.Tensor) -> None:
        cand, preds = self.mapped()
        cand[rows] = images.numpy()
        preds[rows] = labels.numpy().astype(np.int16)
        # on disk before the chunk's marker is written
        cand.flush()
        preds.flush()


def candidate_chunks(out_dir: Path, meta: dict, mode: str = "r+") -> ChunkStore:
    """The store of candidates ``meta`` describes (``meta.json``), in chunks of its ``batch_size`` samples."""
    return ChunkStore(
        out_dir,
        meta["n"],
        meta["batch_size"],
        CandidateFiles(out_dir, meta, mode),
        header_name=_candidate_files(out_dir)[2].name,
        upgrade=legacy_candidate_header,
        damaged_hint=_DAMAGED_HINT.format(out_dir=out_dir),
        refuse_hint="delete that folder to rebuild the candidates, or pass --overwrite to start the record afresh",
    )
