"""A resumable store built chunk by chunk, by one process or shared by torchrun ranks.

A store is a folder holding a settings header (a JSON file), the chunks' storage (a
:class:`ChunkStorage`: one file per chunk, slices of memory-mapped files, ...) and a
``done/`` folder with one marker per finished chunk. Item rows ``[c * chunk_size, ...)``
make chunk ``c``; its marker ``done/chunk_<c>`` holds the chunk's row count and a checksum
of its stored bytes, written atomically after the bytes, so:

- a run killed mid-chunk leaves no marker and redoes that chunk;
- a chunk whose bytes changed afterwards (damaged, truncated, lost) fails its checksum and
  is redone;
- the header is compared once, on rank 0, before any chunk is read: a store written with
  other settings is refused (or, with ``overwrite``, discarded), so a marker only ever
  vouches for bytes computed with the header's settings.

With ``world`` processes, rank ``r`` builds the chunks ``c`` with ``c % world == r``; after
a barrier rank 0 redoes any chunk another rank left undone or damaged.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from utils.fileio import atomic_write_json, atomic_write_text, checksum, read_state_json
from utils.progress import progress
from utils.run_state import same_settings_or_refuse
from utils.runtime import barrier

Log = Callable[[str], None]
# advances the progress bar by a number of work units (a denoising step of n images: n)
Tick = Callable[[int], Any]


class ChunkStorage:
    """Where a store's chunks live. Subclasses read a chunk's bytes back; creating and
    restoring the storage is optional (per-chunk files need neither)."""

    def create(self) -> None:
        """A new store: make the empty storage its chunks are written into."""

    def restore(self, log: Log) -> None:
        """An existing store about to be resumed: make its storage writable again (a file
        truncated by a kill, say); chunks it lost fail their checksum and are redone."""

    def chunk_bytes(self, c: int, rows: slice) -> list[bytes | memoryview]:
        """The stored bytes of chunk ``c`` (``rows`` of the items); OSError when absent."""
        raise NotImplementedError


@dataclass
class ChunkStore:
    """The bookkeeping of a store of ``n`` items in chunks of ``chunk_size`` under ``root``.

    ``upgrade`` reads an older header as now (keys added later, older spellings);
    ``damaged_hint`` says how to go on when the header is unreadable, ``refuse_hint`` when
    it holds other settings."""

    root: Path
    n: int
    chunk_size: int
    storage: ChunkStorage
    header_name: str = "settings.json"
    upgrade: Callable[[dict], dict] = dict
    damaged_hint: str = "delete that folder to start afresh"
    refuse_hint: str = "pass --overwrite to discard it"

    @property
    def n_chunks(self) -> int:
        return (self.n + self.chunk_size - 1) // self.chunk_size

    @property
    def done(self) -> Path:
        return self.root / "done"

    def rows(self, c: int) -> slice:
        return slice(c * self.chunk_size, min(self.n, (c + 1) * self.chunk_size))

    def marker(self, c: int) -> Path:
        return self.done / f"chunk_{c:05d}"

    # ----------------------------------------------------------------------- header

    def read_header(self) -> Any:
        """The stored settings (``upgrade``d when a dict), None for a new store."""
        path = self.root / self.header_name
        if not path.is_file():
            return None
        old = read_state_json(path, self.damaged_hint)
        return self.upgrade(old) if isinstance(old, dict) else old

    def prepare(self, header: dict, *, overwrite: bool = False, log: Log = print) -> None:
        """Create the store with ``header``, or check an existing one against it (other
        settings: a UserError, or with ``overwrite`` the store is discarded) and restore
        its storage. One process only (rank 0), before any chunk is read."""
        old = self.read_header()
        if same_settings_or_refuse(self.root, old, header, overwrite=overwrite, hint=self.refuse_hint):
            self.storage.restore(log)
        else:
            if old is not None:  # overwrite: discard the other run's chunks
                shutil.rmtree(self.root, ignore_errors=True)
            self.root.mkdir(parents=True, exist_ok=True)
            # markers without their header vouch for no known settings
            shutil.rmtree(self.done, ignore_errors=True)
            self.storage.create()
            # the header last: a kill before it leaves a store that is created afresh again
            atomic_write_json(self.root / self.header_name, header)
        self.done.mkdir(exist_ok=True)

    # ----------------------------------------------------------------------- markers

    def _marker_text(self, c: int) -> str:
        rows = self.rows(c)
        return f"{rows.stop - rows.start} " + "".join(checksum(b) for b in self.storage.chunk_bytes(c, rows))

    def ok(self, c: int) -> bool:
        """Chunk ``c``'s marker exists and its checksum matches the bytes stored now."""
        try:
            marker = self.marker(c).read_text()
            return marker.split() == self._marker_text(c).split()
        except OSError:
            return False

    def mark(self, c: int) -> None:
        """Mark chunk ``c`` done; call only once its bytes are in the storage."""
        atomic_write_text(self.marker(c), self._marker_text(c) + "\n")

    def complete(self) -> bool:
        """Every chunk is marked done and its bytes match its marker."""
        return all(self.ok(c) for c in range(self.n_chunks))

    # ----------------------------------------------------------------------- building

    def fill(self, chunks: list[int], work: Callable[[int, Tick], None], desc: str, units_per_item: int) -> int:
        """Build ``chunks`` with ``work(c, tick)`` (compute chunk ``c`` and write it into the
        storage; ``tick(k)`` reports ``k`` of its units done), marking each one done.
        Progress is in image-steps (``units_per_item`` per item), so that a log shows a
        rate within the first chunk. Returns the number of items built."""
        sizes = [(self.rows(c).stop - self.rows(c).start) * units_per_item for c in chunks]
        bar = progress(total=sum(sizes), desc=desc, unit="img-step", dynamic_ncols=True)
        for k, (c, size) in enumerate(zip(chunks, sizes)):
            start = bar.n
            work(c, bar.update)
            self.mark(c)
            bar.update(max(0, start + size - bar.n))  # the units ``work`` did not report
            bar.set_postfix(chunks=f"{k + 1}/{len(chunks)}")
        bar.close()
        return sum(self.rows(c).stop - self.rows(c).start for c in chunks)

    def build(
        self,
        work: Callable[[int, Tick], None],
        *,
        what: str,
        units_per_item: int = 1,
        rank: int = 0,
        world: int = 1,
        log: Log = print,
        max_chunks: int | None = None,
    ) -> int:
        """Build this rank's chunks that are not done (every rank calls this after rank 0's
        :meth:`prepare`); then rank 0 redoes the chunks other ranks left undone or damaged.
        ``max_chunks`` stops after that many chunks (an interruption, in tests). Returns the
        items built by this job (summed over the ranks; on rank 0 with the repair)."""
        mine = [c for c in range(self.n_chunks) if c % world == rank]
        todo = [c for c in mine if not self.ok(c)]
        if len(todo) < len(mine):
            log(f"{what}: {len(mine) - len(todo)} of {len(mine)} chunks already built in {self.root}")
        if max_chunks is not None:
            todo = todo[:max_chunks]
        built = _sum_over_ranks(self.fill(todo, work, f"{what}[{rank}]" if world > 1 else what, units_per_item), world)
        barrier()
        if rank == 0 and world > 1 and max_chunks is None:
            lost = [c for c in range(self.n_chunks) if c % world != 0 and not self.ok(c)]
            if lost:
                log(f"{what}: redoing {len(lost)} chunks the other ranks left undone or damaged")
                built += self.fill(lost, work, f"{what} (repair)", units_per_item)
        return built


def _sum_over_ranks(count: int, world: int) -> int:
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        # NCCL reduces CUDA tensors only
        nccl = torch.distributed.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        total = torch.tensor([count], dtype=torch.long, device=device)
        torch.distributed.all_reduce(total)
        return int(total)
    return count
