"""Run-state guards shared by every script that writes a resumable output.

* ``check_name``: a user-given name (poison, run, sparse set, record folder) is a name,
  never a path; one validator for every place a name becomes a path.
* ``same_settings_or_refuse``: a resumable store (purification parts, candidate
  chunks, crafting state, checkpoints, caches) is resumed only when it was written
  with the same settings; otherwise the refusal names every differing key with both
  values, or (``overwrite``) the caller discards the store.
* ``OutputLock`` / ``output_lock``: one process (one torchrun job) at a time per output.
  The lock file ``.<name>.lock`` beside the output holds the holder's PID and host; a
  live holder gets a one-line error, a dead holder's lock (same host) is taken over.
* ``checksum`` / ``tensor_fingerprint``: the hashes the stores record for their chunks
  and inputs.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from utils.fileio import UserError

# --------------------------------------------------------------------------- names

_NAME = re.compile(r"^[A-Za-z0-9_.+\-]+$")


def check_name(value: str, flag: str) -> str:
    """``value`` if it is a plain name (letters, digits, ``-_.+``; not ``.`` or ``..``),
    else a UserError naming ``flag``: names become file and folder names, never paths."""
    if not isinstance(value, str) or not _NAME.match(value) or value in (".", ".."):
        raise UserError(f"{flag} must be a plain name (letters, digits, '-', '_', '.', '+'; no path), got {value!r}")
    return value


# --------------------------------------------------------------------------- settings

_MISSING = "<missing>"


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """``key: old -> new`` for every key whose value differs (compared as JSON); nested
    mappings are compared key by key (``training.lr: 0.0001 -> 0.5``)."""

    def norm(v: Any) -> str:
        return json.dumps(v, sort_keys=True, default=str)

    out = []
    for k in sorted(set(old) | set(new), key=str):
        if k in ignore:
            continue
        a, b = old.get(k, _MISSING), new.get(k, _MISSING)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += [f"{k}.{d}" for d in settings_diff(a, b)]
        elif norm(a) != norm(b):
            out.append(f"{k}: {a!r} -> {b!r}")
    return out


def same_settings_or_refuse(
    where: str | Path,
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any],
    *,
    overwrite: bool = False,
    hint: str = "pass --overwrite to discard it",
    ignore: tuple[str, ...] = (),
) -> bool:
    """Whether the store at ``where`` (written with ``old``, None when absent) may be resumed.

    Same settings: True. Other settings: with ``overwrite`` False (the caller discards the
    store), else a UserError listing each differing key with both values and ``hint``."""
    if old is None:
        return False
    if not isinstance(old, Mapping):
        old = {"settings": "<unreadable>"}
    diff = settings_diff(old, new, ignore)
    if not diff:
        return True
    if overwrite:
        return False
    shown = "; ".join(diff[:6]) + (f" (+{len(diff) - 6} more)" if len(diff) > 6 else "")
    raise UserError(f"{where} holds work done with other settings ({shown}); {hint}")


# --------------------------------------------------------------------------- hashes


def checksum(data: bytes | memoryview) -> str:
    """A fast hash of a stored chunk's bytes (recorded in its completion marker)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def tensor_fingerprint(*tensors: torch.Tensor) -> str:
    """A hash of the tensors' bytes: stores record the inputs they were computed from."""
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def file_fingerprint(path: str | Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- lock


def lock_path(output: str | Path) -> Path:
    """``.<name>.lock`` beside ``output`` (beside, so deleting a folder keeps the lock)."""
    output = Path(output)
    return output.parent / f".{output.name}.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


class OutputLock:
    """An exclusive lock on ``output`` for this process.

    The lock file is ``flock``-ed (released by the kernel when the process dies, so a
    killed run never blocks the next one on this host) and holds ``{"pid", "host"}`` so
    that a refusal names the holder and a holder on another host (shared disk without
    working ``flock``) is still seen while its PID cannot be checked from here."""

    def __init__(self, output: str | Path):
        self.output = Path(output)
        self.path = lock_path(self.output)
        self.fd: int | None = None

    def _holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _refuse(self, holder: dict[str, Any]) -> None:
        who = f"PID {holder.get('pid', '?')} on {holder.get('host', '?')}"
        since = f" since {holder['since']}" if holder.get("since") else ""
        raise UserError(
            f"{self.output} is in use by another run ({who}{since}); wait for it to finish "
            f"(if that process no longer exists, delete {self.path})"
        )

    def acquire(self) -> OutputLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError as e:  # a file stands where a folder of the path should be
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), e.filename) from None
        host = socket.gethostname()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flocked = True
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    flocked = False  # a file system without flock: the PID record decides alone
                else:
                    os.close(fd)
                    self._refuse(self._holder())
            # the file may have been unlinked by its previous holder between open and flock
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = self._holder()
        pid = holder.get("pid")
        if isinstance(pid, int) and pid != os.getpid():
            # flock does not reach another host: trust the record there; on this host a
            # record survives only a dead holder (taken over), unless flock is missing
            live = holder.get("host") != host or (not flocked and _pid_alive(pid))
            if live:
                os.close(fd)
                self._refuse(holder)
        record = {"pid": os.getpid(), "host": host, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
            os.fsync(fd)
        except OSError as e:  # a full disk: name the lock file in the one-line error
            os.close(fd)
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # closing releases the flock
            self.fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextmanager
def output_lock(output: str | Path, rank: int = 0, world: int = 1) -> Iterator[OutputLock | None]:
    """Hold the lock on ``output`` for a whole (torchrun) job: rank 0 takes it and tells the
    other ranks whether it got it, so every rank stops with the same one-line error
    instead of waiting at a barrier for a rank that has left."""
    lock = OutputLock(output)
    on_rank0(lock.acquire, rank, world)
    try:
        yield lock if rank == 0 else None
    finally:
        lock.release()


def on_rank0(fn, rank: int = 0, world: int = 1) -> None:
    """Run ``fn`` (a check that may raise UserError, or a one-process store update) on rank
    0 only; every rank then raises the same error, or goes on once rank 0 is done."""
    err = ""
    if rank == 0:
        try:
            fn()
        except UserError as e:
            err = str(e)
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [err]
        torch.distributed.broadcast_object_list(box, src=0)
        err = box[0]
    if err:
        raise UserError(err)
