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
* ``RunFolder``: the one implementation of a resumable run's folder: lock it, compare
  the stored settings, then resume, refuse or (``--overwrite``) discard, and record the
  settings of the run that goes on.
* ``checksum`` / ``tensor_fingerprint``: the hashes the stores record for their chunks
  and inputs.

A finished run follows one rule: **the last file written marks completion, and everything
it depends on is written before it** (each file atomically). A re-run trusts the marker
alone: present, the run is finished (reported, or refused without ``--overwrite``);
absent, the run is unfinished whatever else stands beside it, and resumes or redoes the
rest, rewriting those files. What the run no longer needs (a checkpoint, batches, a
crafting state) is removed only after the marker is written, and an ``--overwrite`` run
removes the earlier marker before it writes anything the marker vouches for. The markers:

* ``train.py``: ``runs/train/<run>/result.json``, after ``model.pt``, ``curves.png`` and
  the run's rows of ``results.csv`` / ``results_extra.csv`` (keyed by run, so a re-run
  replaces its rows); ``checkpoint.pt`` is removed after it.
* ``poison.py``: ``<name>.pkl``, after ``<name>.json`` and ``<name>.png``; the crafting
  state ``<name>.work/`` is removed after it.
* ``purification.py``: ``<poison>-pure.pkl``, after ``<poison>-pure.json`` and ``.png``;
  the batches ``.<poison>-pure.parts/`` are removed after it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from utils.fileio import (
    UserError,
    atomic_temp_name,
    atomic_write_json,
    atomic_write_text,
    name_limits,
    read_state_json,
    read_text_file,
)
from utils.precision import keep_stored

# --------------------------------------------------------------------------- names

_NAME = re.compile(r"^[A-Za-z0-9_.+\-]+$")


def check_name(value: str, flag: str, made: tuple[str, ...] = ("{}/",), folder: str | Path | None = None) -> str:
    """``value`` if it is a plain name (letters, digits, ``-_.+``; not ``.`` or ``..``),
    else a UserError naming ``flag``: names become file and folder names, never paths.

    The name must also fit the file system before any work starts: every name made from it
    (each template of ``made``, ``{}`` standing for the name: a file, or with a trailing
    ``/`` a folder; ``()`` for a name that is only read), with its lock file ``.<name>.lock``
    and, for a file, the atomic write's temporary name, is at most NAME_MAX bytes, and
    under ``folder`` (where the names are made; default: the current folder, the whole
    path not checked) the path stays under PATH_MAX (``utils.fileio.name_limits``)."""
    if not isinstance(value, str) or not _NAME.match(value) or value in (".", ".."):
        raise UserError(f"{flag} must be a plain name (letters, digits, '-', '_', '.', '+'; no path), got {value!r}")
    names = [value]
    for template in made:
        name = template.format(value).rstrip("/")
        names += [name, lock_path(name).name] + ([] if template.endswith("/") else [atomic_temp_name(name)])
    longest = max(names, key=lambda n: len(os.fsencode(n)))
    size = len(os.fsencode(longest))
    name_max, path_max = name_limits(Path.cwd() if folder is None else folder)
    shown = value if len(value) <= 24 else f"{value[:12]}...{value[-8:]}"
    if size > name_max:
        room = len(value) - (size - name_max)
        raise UserError(
            f"{flag} {shown!r} is too long ({len(value)} characters): it makes the file name {len(longest)} "
            f"characters long ({longest.replace(value, '<name>')}), over the file system's limit of {name_max} "
            f"(NAME_MAX); use at most {max(room, 0)} characters"
        )
    if folder is not None:
        full = len(os.fsencode(str(Path(folder).absolute() / longest)))
        if full >= path_max:
            raise UserError(
                f"{flag} {shown!r} makes a path of {full} characters under {folder}, over the file system's limit "
                f"of {path_max - 1} (PATH_MAX); use a shorter name or --work_dir"
            )
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


# --------------------------------------------------------------------------- run folder

_READ = object()  # check(): read the stored settings from the settings file


def _barrier(world: int) -> None:
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class RunFolder:
    """A resumable run's folder: lock, compare the stored settings, resume / refuse / discard.

        with RunFolder(out, settings, overwrite=args.overwrite, rank=rank, world=world) as run:
            resumes = run.check()  # the stored settings read, compared, refused when other
            ...                    # every input read, so a refused command discards nothing
            run.open()             # a stale run discarded, the folder made, the settings written

    Entering takes the lock on ``lock`` (the folder itself; another output such as the
    poisoned file whose state folder this is; False where the caller holds it), on rank 0
    under torchrun as :func:`output_lock`. ``check`` may come before the lock where a
    script answers before reading its inputs (``train.py``'s finished run).

    * ``settings_file``: the folder's record of its settings (JSON, or YAML by its
      suffix); None where the caller reads and writes it (a crafting state).
    * ``hint``: how to go on after a refusal; ``damaged``: after a damaged settings file
      (``--overwrite`` discards such a folder); ``what``: a YAML file's kind in errors.
    * ``ignore``: keys that do not change results; ``upgrade``: the stored settings read
      as now (older spellings); ``keep``: keys (``section.key`` for a nested one) a
      resumed run takes from the stored settings (:func:`utils.precision.keep_stored`,
      saying ``keep_how``).
    * ``discard_only``: the glob patterns discarded instead of the whole folder."""

    def __init__(
        self,
        folder: str | Path,
        settings: MutableMapping[str, Any],
        *,
        settings_file: str | None = "settings.json",
        overwrite: bool = False,
        hint: str = "pass --overwrite to discard it",
        damaged: str | None = None,
        what: str = "state file",
        ignore: tuple[str, ...] = (),
        upgrade: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        keep: tuple[str, ...] = (),
        keep_how: str | None = None,
        discard_only: tuple[str, ...] = (),
        lock: str | Path | bool = True,
        rank: int = 0,
        world: int = 1,
    ):
        self.folder = Path(folder)
        self.settings = settings
        self.settings_file = settings_file
        self.overwrite = overwrite
        self.hint = hint
        self.damaged = hint if damaged is None else damaged
        self.what = what
        self.ignore = ignore
        self.upgrade = upgrade
        self.keep = keep
        self.keep_how = keep_how
        self.discard_only = discard_only
        self.lock = self.folder if lock is True else Path(lock) if lock else None
        self.rank, self.world = rank, world
        self.stored: Any = None  # the stored settings check() compared (upgraded)
        self.resume = False  # whether the stored run goes on (same settings)
        self.stale = False  # whether open() discards what the folder holds
        self._locks = ExitStack()

    def __enter__(self) -> RunFolder:
        if self.lock is not None:
            self._locks.enter_context(output_lock(self.lock, self.rank, self.world))
        return self

    def __exit__(self, *exc: object) -> None:
        self._locks.close()

    def read(self, name: str | None = None) -> Any:
        """The JSON or YAML file ``name`` (default: the settings file) of the folder, None
        when absent; a damaged one is refused saying ``damaged``, or with ``overwrite``
        marks the folder to be discarded."""
        name = name or self.settings_file
        path = self.folder / name if name else None
        if path is None or not path.is_file():
            return None
        try:
            if path.suffix not in (".yaml", ".yml"):
                return read_state_json(path, self.damaged)
            try:
                return yaml.safe_load(read_text_file(path, self.what))
            except yaml.YAMLError:
                raise UserError(f"{path} is damaged; {self.damaged}") from None
        except UserError:
            if not self.overwrite:
                raise
            self.stale = True
            return None

    def check(self, stored: Any = _READ, current: Mapping[str, Any] | None = None) -> bool:
        """Whether the folder's run resumes: its ``stored`` settings (default: read from the
        settings file; None: no earlier run) are this run's. Other settings are refused
        naming each differing key, or with ``overwrite`` marked to be discarded.

        ``current``: what ``stored`` is compared with instead of the settings (a
        fingerprint of them, for stores written before their settings were kept)."""
        if stored is _READ:
            stored = self.read()
        if isinstance(stored, Mapping) and self.upgrade is not None:
            stored = self.upgrade(dict(stored))
        if current is None or current is self.settings:
            current = self.settings
            if not self.overwrite:  # a resumed run keeps what it was started with
                self._keep(stored)
        same = same_settings_or_refuse(
            self.folder, stored, current, overwrite=self.overwrite, hint=self.hint, ignore=self.ignore
        )
        self.stored, self.resume = stored, same
        self.stale = self.stale or (stored is not None and not same)
        return same

    def _keep(self, stored: Any) -> None:
        how = {"how": self.keep_how} if self.keep_how is not None else {}
        for key in self.keep:
            *section, leaf = key.split(".")
            new, old = self.settings, stored
            for k in section:
                new = new.get(k) if isinstance(new, Mapping) else None
                old = old.get(k) if isinstance(old, Mapping) else None
            if isinstance(new, MutableMapping):
                keep_stored(new, old, self.folder, print, (leaf,), **how)

    def discard(self) -> None:
        """Remove what the folder holds (``discard_only``: those files), on rank 0."""
        if self.rank == 0 and self.folder.exists():
            if not self.discard_only:
                shutil.rmtree(self.folder)
            for pattern in self.discard_only:
                for f in self.folder.glob(pattern):
                    f.unlink(missing_ok=True)
        _barrier(self.world)

    def open(self, fresh: bool = False, content: Any = None) -> None:
        """Make the folder for the run that goes on: a stale run (or with ``fresh`` any
        earlier one) discarded first, then ``content`` (default: the settings; a string is
        written as it is) written atomically to the settings file, on rank 0."""
        _barrier(self.world)  # every rank has read the stored settings before rank 0 replaces them
        if fresh or self.stale:
            self.discard()
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            if self.settings_file is not None:
                path = self.folder / self.settings_file
                content = self.settings if content is None else content
                if isinstance(content, str):
                    atomic_write_text(path, content)
                else:
                    atomic_write_json(path, content)
        _barrier(self.world)
