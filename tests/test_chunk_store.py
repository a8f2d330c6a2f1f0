"""utils.chunk_store: a store of 10 items in chunks of 3 (4 chunks, the last of 1 item), one
file per chunk whose bytes come from the chunk's index alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from utils.chunk_store import ChunkStorage, ChunkStore, Tick
from utils.fileio import UserError

HEADER = {"n": 10, "batch_size": 3, "seed": 1}


class ChunkFiles(ChunkStorage):
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, c: int) -> Path:
        return self.root / f"c{c}.bin"

    def chunk_bytes(self, c: int, rows: slice) -> list[bytes | memoryview]:
        return [self.path(c).read_bytes()]


def _store(root: Path) -> ChunkStore:
    return ChunkStore(root, 10, 3, ChunkFiles(root), damaged_hint="delete it", refuse_hint="pass --overwrite")


def _content(store: ChunkStore, c: int) -> bytes:
    rows = store.rows(c)
    return bytes(range(rows.start, rows.stop)) * 100


class Builder:
    """The ``work`` of a build: records the chunks it was asked for."""

    def __init__(self, store: ChunkStore, fail_at: int | None = None) -> None:
        self.store, self.fail_at, self.calls = store, fail_at, []

    def __call__(self, c: int, tick: Tick) -> None:
        if c == self.fail_at:
            raise KeyboardInterrupt  # killed mid-chunk, before its bytes are complete
        self.calls.append(c)
        self.store.storage.path(c).write_bytes(_content(self.store, c))
        tick(1)


def _built(root: Path, **kw) -> tuple[ChunkStore, Builder, list[str]]:
    store, logs = _store(root), []
    store.prepare(HEADER, log=logs.append)
    work = Builder(store)
    store.build(work, what="test", log=logs.append, **kw)
    return store, work, logs


def test_rows_and_markers(tmp_path):
    store, work, _ = _built(tmp_path)
    assert store.n_chunks == 4 and store.rows(3) == slice(9, 10)
    assert work.calls == [0, 1, 2, 3] and store.complete()
    assert sorted(p.name for p in store.done.iterdir()) == [f"chunk_0000{c}" for c in range(4)]
    assert store.marker(3).read_text().split()[0] == "1"  # the chunk's row count, then its checksum
    assert json.loads((tmp_path / "settings.json").read_text()) == HEADER


def test_interrupted_and_damaged_chunks_are_redone(tmp_path):
    store, logs = _store(tmp_path), []
    store.prepare(HEADER)
    with pytest.raises(KeyboardInterrupt):
        store.build(Builder(store, fail_at=2), what="test")
    assert [store.ok(c) for c in range(4)] == [True, True, False, False]
    # a finished chunk damaged afterwards (same size, other bytes)
    raw = bytearray(store.storage.path(0).read_bytes())
    raw[5] ^= 0xFF
    store.storage.path(0).write_bytes(bytes(raw))
    work = Builder(store)
    assert store.build(work, what="test", log=logs.append) == 3 + 3 + 1
    assert work.calls == [0, 2, 3] and store.complete()
    assert logs == [f"test: 1 of 4 chunks already built in {tmp_path}"]
    assert store.storage.path(0).read_bytes() == _content(store, 0)


def test_marker_with_another_checksum_is_redone(tmp_path):
    store, _, _ = _built(tmp_path)
    rows, digest = store.marker(1).read_text().split()
    store.marker(1).write_text(f"{rows} {'0' * len(digest)}\n")
    store.marker(2).unlink()
    work = Builder(store)
    store.build(work, what="test")
    assert work.calls == [1, 2] and store.complete()


def test_max_chunks_stops_and_a_rerun_resumes(tmp_path):
    store, work, _ = _built(tmp_path, max_chunks=2)
    assert work.calls == [0, 1] and not store.complete()
    again = Builder(store)
    assert store.build(again, what="test") == 3 + 1
    assert again.calls == [2, 3] and store.complete()


def test_two_ranks_cover_every_chunk_once(tmp_path):
    store = _store(tmp_path)
    store.prepare(HEADER)
    by_rank, logs = {}, []
    for rank in (1, 0):  # rank 0 last: after the barrier it finds rank 1's chunks done
        by_rank[rank] = Builder(store)
        store.build(by_rank[rank], what="test", rank=rank, world=2, log=logs.append)
    assert by_rank[0].calls == [0, 2] and by_rank[1].calls == [1, 3]
    assert not logs and store.complete()


def test_rank0_redoes_the_chunks_another_rank_left_undone(tmp_path):
    store, logs = _store(tmp_path), []
    store.prepare(HEADER)
    work = Builder(store)
    assert store.build(work, what="test", rank=0, world=2, log=logs.append) == 10
    assert work.calls == [0, 2, 1, 3] and store.complete()
    assert logs == ["test: redoing 2 chunks the other ranks left undone or damaged"]


def test_other_settings_are_refused_or_discarded(tmp_path):
    store, _, _ = _built(tmp_path)
    with pytest.raises(UserError) as e:
        store.prepare({**HEADER, "seed": 2})
    msg = str(e.value)
    assert str(tmp_path) in msg and "seed: 1 -> 2" in msg and msg.endswith("pass --overwrite") and "\n" not in msg
    assert store.complete()  # nothing touched
    store.prepare(HEADER, overwrite=True)  # the same settings: kept
    assert store.complete()
    store.prepare({**HEADER, "seed": 2}, overwrite=True)
    assert not any(store.ok(c) for c in range(4)) and not store.storage.path(0).exists()
    assert json.loads((tmp_path / "settings.json").read_text())["seed"] == 2


def test_upgrade_reads_an_older_header_as_now(tmp_path):
    store, _, _ = _built(tmp_path)
    old = {k: v for k, v in HEADER.items() if k != "seed"}
    (tmp_path / "settings.json").write_text(json.dumps(old))
    with pytest.raises(UserError, match="seed: '<missing>' -> 1"):
        store.prepare(HEADER)
    store.upgrade = lambda h: {"seed": 1, **h}
    store.prepare(HEADER)
    assert store.complete()


def test_damaged_header_and_markers_without_header(tmp_path):
    store, _, _ = _built(tmp_path)
    (tmp_path / "settings.json").write_text('{"n": 10, "bat')
    with pytest.raises(UserError, match=r"settings.json is damaged .*; delete it$"):
        store.prepare(HEADER)
    # without its header a store is new: markers it holds vouch for nothing
    (tmp_path / "settings.json").unlink()
    store.prepare(HEADER)
    assert not store.done.exists() or not any(store.done.iterdir())
    assert not store.complete()
