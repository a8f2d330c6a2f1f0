"""Downloads of the published files the pipelines need: the datasets' official archives
(CIFAR-10 here; the others' entries in ``utils/datasets/registry.py``) and Ho et al.'s DDPMs.

Every download streams to a partial file unique to this call and named with this process's
PID (with progress: size, rate, ETA), checks the byte count and the MD5, and only then is
renamed into place, so an interrupted or corrupt transfer never leaves a file that looks
complete and two processes fetching the same file cannot corrupt each other. An interrupted
transfer's partial file stays; the next download of that file resumes from it (HTTP Range)
and removes the partial files of processes that are no longer running. Only the standard library (urllib) is
used. URLs and checksums can be overridden per file by environment variables (a mirror,
a ``file://`` copy, a test server); ``$DATASETS_MIRROR`` serves every dataset file at once
from ``<mirror>/<file name>`` (the MD5s stay the official ones unless ``<ENV>_MD5`` is set).
Archives are tar or zip files, extracted through :func:`safe_extract`.

ECLIPSE's own checkpoint and its poisoned / purified sets are on Google Drive, which does
not allow plain downloads: :func:`eclipse_manual` says where to get them and where to put
them.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shlex
import shutil
import socket
import stat
import tarfile
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from utils.fileio import UserError
from utils.paths import REPO_ROOT
from utils.progress import progress
from utils.run_state import _pid_alive

CHUNK = 1 << 20
MIRROR_ENV = "DATASETS_MIRROR"  # a folder URL holding the datasets' files under their official names
TIMEOUT_S = 60
_PARTIALS_LOCK = threading.Lock()
_PARTIALS_IN_USE: set[Path] = set()  # this process's partial files being written


class DownloadError(UserError):
    """A download that failed or did not verify (one line, with the manual steps)."""


@dataclass(frozen=True)
class Remote:
    """A published file: where it is, its MD5, and the variables that override both."""

    what: str
    url: str
    md5: str
    env: str  # ``<env>_URL`` / ``<env>_MD5`` override url / md5
    manual: str  # how to get the file by hand
    mirrored: bool = False  # a dataset file: ``$DATASETS_MIRROR/<file name>`` when that is set

    @property
    def resolved_url(self) -> str:
        mirror = os.environ.get(MIRROR_ENV, "").strip() if self.mirrored else ""
        if mirror and not os.environ.get(f"{self.env}_URL"):
            return f"{mirror.rstrip('/')}/{self.file_name}"
        return os.environ.get(f"{self.env}_URL") or self.url

    @property
    def file_name(self) -> str:
        """The published file's name: the last part of its official URL's path."""
        return PurePosixPath(urllib.parse.urlsplit(self.url).path).name

    @property
    def resolved_md5(self) -> str:
        return (os.environ.get(f"{self.env}_MD5") or self.md5).strip().lower()


# the official archive, as torchvision's CIFAR10 fetches it
CIFAR10 = Remote(
    "CIFAR-10",
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "c58f30108f718f92721af3b95e74349a",
    "CIFAR10",
    "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz by hand and extract it into {dest} "
    "(it holds cifar-10-batches-py/), or point --data_root / $CIFAR10_ROOT at a copy",
    mirrored=True,
)

CIFAR10_FOLDER = "cifar-10-batches-py"

# Ho et al.'s CIFAR-10 DDPMs converted by pesser/pytorch_diffusion (its ckpt_util.py names,
# URLs, MD5s and cache layout), so a checkpoint that pytorch_diffusion fetched is reused
_DDPM_MANUAL = (
    "download {url} by hand (pytorch_diffusion's converted DDPM) to {dest}, or set diffusion_ckpt to the path of a copy"
)
DDPM_CHECKPOINTS: dict[str, tuple[str, Remote]] = {
    "cifar10": (
        "diffusion_cifar10_model/model-790000.ckpt",
        Remote(
            "DDPM cifar10",
            "https://heibox.uni-heidelberg.de/f/869980b53bf5416c8a28/?dl=1",
            "82ed3067fd1002f5cf4c339fb80c4669",
            "DDPM_CIFAR10",
            _DDPM_MANUAL,
        ),
    ),
    "ema_cifar10": (
        "ema_diffusion_cifar10_model/model-790000.ckpt",
        Remote(
            "DDPM ema_cifar10",
            "https://heibox.uni-heidelberg.de/f/2e4f01e2d9ee49bab1d5/?dl=1",
            "1fa350b952534ae442b1d5235cce5cd3",
            "DDPM_EMA_CIFAR10",
            _DDPM_MANUAL,
        ),
    ),
}

# ECLIPSE's published files (its README): Google Drive folders, no plain download
ECLIPSE_FILES: dict[str, tuple[str, str]] = {
    "checkpoint": (
        "https://drive.google.com/drive/folders/1_L8p-mH2W383LspXuYsZPbksA9Hn2eTq",
        "diff_ckpt/cifar10/test2000ps8000/ema_0.9999_250000.pt",
    ),
    "poisoned": (
        "https://drive.google.com/drive/folders/1KzHl0H-CfkXeBqyLhIw8l1NimQTzQx1_",
        "poisoned_data/cifar10/<POISON>.pkl",
    ),
    "purified": (
        "https://drive.google.com/drive/u/0/folders/1FrEdxOIrxl6MvfDPaPAgsb_QkBkLxwu7",
        "purified_data/cifar10/test2000ps8000/100/250000/<POISON>-pure.pkl",
    ),
}


def eclipse_manual(kind: str) -> str:
    """How to get ECLIPSE's published ``kind`` (checkpoint | poisoned | purified) by hand."""
    url, dest = ECLIPSE_FILES[kind]
    return f"or download ECLIPSE's published {kind} file(s) from {url} (Google Drive, in a browser) to {dest}"


def work_dir_flag(work: str | Path | None) -> str:
    """`` --work_dir <work>`` for the command a missing-file hint names, '' when ``work`` is
    the repository (the scripts' default)."""
    if work is None or Path(work).resolve() == REPO_ROOT.resolve():
        return ""
    return f" --work_dir {shlex.quote(str(work))}"


def enabled(flag: bool | None, env: str) -> bool:
    """``flag`` when given, else ``$env`` (default on)."""
    if flag is not None:
        return flag
    return os.environ.get(env, "1").strip().lower() not in ("0", "false", "no", "off")


def md5_of(path: str | Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def partial_files(dest: Path) -> list[tuple[Path, str, int]]:
    """The partial downloads of ``dest`` beside it: ``(path, host, pid)`` of each
    ``.<name>.<host>.<pid>.<random>.part``."""
    prefix = f".{dest.name}."
    found = []
    if dest.parent.is_dir():
        for p in dest.parent.iterdir():
            if not (p.name.startswith(prefix) and p.name.endswith(".part")):
                continue
            host, pid, _ = (p.name[len(prefix) : -len(".part")].rsplit(".", 2) + ["", ""])[:3]
            if pid.isdigit():
                found.append((p, host, int(pid)))
    return found


def _claim_partial(dest: Path) -> Path:
    """A partial file of ``dest`` for this call, named with this host and PID. The partial
    files a dead process left (or an earlier call of this process) are stale: the largest is
    taken over, so the download resumes from it, and the others are removed. Partial files
    of live processes, or of other hosts, are left alone."""
    host, me = socket.gethostname(), os.getpid()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _PARTIALS_LOCK:
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.{host}.{me}.", suffix=".part", dir=dest.parent)
        os.close(fd)
        mine = Path(name)
        _PARTIALS_IN_USE.add(mine)
        stale = [
            p
            for p, h, pid in partial_files(dest)
            if p != mine and h == host and (not _pid_alive(pid) if pid != me else p not in _PARTIALS_IN_USE)
        ]
        for p in sorted(stale, key=_size, reverse=True):
            try:
                if mine.stat().st_size == 0 and _size(p) > 0:
                    os.replace(p, mine)  # resumed from the largest
                else:
                    p.unlink()
            except FileNotFoundError:  # another process took or removed it first
                pass
    return mine


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0


def _content_range(r: Any, offset: int) -> int | None:
    """The full size when ``r`` answers a request for bytes ``offset``- with exactly those
    bytes (HTTP 206), else None (the server sent something else: start over)."""
    if getattr(r, "status", None) != 206:
        return None
    m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (r.headers.get("Content-Range") or "").strip())
    if not m or int(m.group(1)) != offset:
        return None
    return int(m.group(2)) if m.group(2) != "*" else -1


def _md5_prefix(f: BinaryIO) -> Any:
    h = hashlib.md5()
    f.seek(0)
    while chunk := f.read(CHUNK):
        h.update(chunk)
    return h


def _stream(remote: Remote, url: str, f: BinaryIO, manual: str, part: Path) -> tuple[int, int | None, Any]:
    """Append ``url``'s bytes to ``f`` from its current size (an HTTP Range request; a server
    that does not honour it sends the whole file, and ``f`` starts over). Returns the bytes
    in ``f``, the full size when known, and their MD5."""
    offset = f.seek(0, os.SEEK_END)
    headers = {"User-Agent": "eclipse-dataelixir/1"}
    reading = False
    try:
        try:
            ranged = headers | ({"Range": f"bytes={offset}-"} if offset else {})
            r = urllib.request.urlopen(urllib.request.Request(url, headers=ranged), timeout=TIMEOUT_S)
        except urllib.error.HTTPError as e:
            if not (offset and e.code == 416):  # 416: the partial file is longer than the file
                raise
            f.seek(0)
            f.truncate()
            offset = 0
            r = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
        reading = True
        with r:
            full = _content_range(r, offset) if offset else None
            if full is None:  # the whole file: start over
                f.seek(0)
                f.truncate()
                offset = 0
                length = r.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
            else:
                total = None if full < 0 else full
                print(f"resuming at {offset} bytes from {part}", flush=True)
            h = _md5_prefix(f) if offset else hashlib.md5()
            got = offset
            bar = progress(total=total, initial=offset, desc=remote.what, unit="B", unit_scale=True, unit_divisor=1024)
            try:
                while chunk := r.read(CHUNK):
                    f.write(chunk)
                    h.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
            finally:
                bar.close()
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        if reading:
            raise DownloadError(
                f"download of {url} was cut off ({_reason(e)}); the {f.tell()} bytes received are kept in {part} "
                "and a re-run resumes from them"
            ) from None
        raise DownloadError(f"cannot download {url} ({_reason(e)}); {manual}") from None
    return got, total, h


def fetch(remote: Remote, dest: str | Path) -> Path:
    """Download ``remote`` to ``dest``: streamed to a partial file beside it named with this
    process's PID, verified (length and MD5), then atomically renamed into place.

    An interrupted download (Ctrl-C, a cut connection, a killed process) keeps its partial
    file; the next fetch of ``dest`` resumes from it with an HTTP Range request, and removes
    the other partial files that dead processes left. A partial file that does not verify
    is removed."""
    dest = Path(dest)
    url, md5 = remote.resolved_url, remote.resolved_md5
    manual = remote.manual.format(url=url, dest=dest.parent if remote.mirrored else dest)
    part = _claim_partial(dest)
    try:
        print(f"downloading {remote.what} from {url} to {dest}", flush=True)
        with open(part, "r+b") as f:
            for attempt in range(2):
                resumed = f.seek(0, os.SEEK_END) > 0
                got, total, h = _stream(remote, url, f, manual, part)
                if total is not None and got != total:
                    raise DownloadError(
                        f"download of {url} was cut off: {got} of {total} bytes; they are kept in {part} "
                        "and a re-run resumes from them"
                    )
                if not md5 or h.hexdigest() == md5:
                    break
                f.seek(0)
                f.truncate()
                if not (resumed and attempt == 0):  # a resumed file that does not verify: once afresh
                    raise DownloadError(
                        f"checksum mismatch for {url}: expected MD5 {md5}, got {h.hexdigest()}; nothing was kept"
                    )
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, dest)
    finally:
        with _PARTIALS_LOCK:
            _PARTIALS_IN_USE.discard(part)
        if _size(part) == 0:
            part.unlink(missing_ok=True)
    return dest


# --------------------------------------------------------------------------- archives


def _check_name(name: str, target: Path, source: str) -> None:
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or ".." in parts or not (target / name).resolve().is_relative_to(target):
        raise UserError(f"{source}: member {name!r} would land outside {target}; refusing to extract")


def _check_member(m: tarfile.TarInfo, target: Path, source: str) -> None:
    if not (m.isfile() or m.isdir()):
        raise UserError(f"{source}: member {m.name!r} is a link or special file; refusing to extract")
    _check_name(m.name, target, source)


def _check_zip_member(m: zipfile.ZipInfo, target: Path, source: str) -> None:
    kind = stat.S_IFMT(m.external_attr >> 16)  # the Unix file type, where the archive records one
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        raise UserError(f"{source}: member {m.filename!r} is a link or special file; refusing to extract")
    _check_name(m.filename, target, source)


def _extract_members(archive: BinaryIO, tmp: Path, source: str) -> None:
    if zipfile.is_zipfile(archive):
        archive.seek(0)
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for m in members:
                _check_zip_member(m, tmp, source)
            zf.extractall(tmp, members=members)
        return
    archive.seek(0)
    with tarfile.open(fileobj=archive, mode="r:*") as tf:
        members = tf.getmembers()
        for m in members:
            _check_member(m, tmp, source)
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tf.extractall(tmp, members=members, **kw)  # noqa: S202 - members checked above


def safe_extract(archive: BinaryIO, target: str | Path, source: str) -> Path:
    """Extract a tar or zip archive into a fresh temporary folder inside ``target`` and return it.

    Only regular files and folders whose paths stay inside the folder are allowed; anything
    else is refused before a single byte is written."""
    target = Path(target).resolve()
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=target))
    try:
        _extract_members(archive, tmp, source)
    except tarfile.TarError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{source}: not a readable tar archive ({e})") from None
    except zipfile.BadZipFile as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{source}: not a readable zip archive ({e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def download_cifar10(root: str | Path) -> Path:
    """Fetch, verify and extract the official CIFAR-10 archive into ``root``; returns
    ``root/cifar-10-batches-py``. A verified archive left by an earlier run is reused."""
    return download_dataset_file(CIFAR10, root, CIFAR10_FOLDER)


def download_dataset_file(remote: Remote, root: str | Path, produces: str, extract: bool = True) -> Path:
    """Fetch and verify ``remote`` into ``root`` and, for an archive (``extract``), extract it
    there; returns ``root/produces``: what the archive holds (a folder or file, possibly
    nested), or the downloaded file itself. Nothing is fetched when it is already there; a
    verified archive left by an earlier run is reused, and removed once extracted."""
    root = Path(root)
    out = root / produces
    if not extract:
        return out if out.is_file() else fetch(remote, out)
    archive = root / remote.file_name
    md5 = remote.resolved_md5
    for attempt in range(2):
        if out.exists():
            return out  # another process finished first
        if not archive.is_file():
            fetch(remote, archive)
        try:
            f = open(archive, "rb")
        except FileNotFoundError:  # another process extracted and removed it meanwhile
            continue
        with f:
            # verify and extract from one open handle, so a concurrent removal cannot interfere
            h = hashlib.md5()
            while chunk := f.read(CHUNK):
                h.update(chunk)
            if md5 and h.hexdigest() != md5:
                if attempt == 0:  # a stale or foreign archive: fetch a fresh one
                    archive.unlink(missing_ok=True)
                    continue
                raise DownloadError(f"{archive}: expected MD5 {md5}, got {h.hexdigest()}")
            f.seek(0)
            print(f"extracting {archive} into {root}", flush=True)
            tmp = safe_extract(f, root, str(archive))
        try:
            if not (tmp / produces).exists():
                raise UserError(f"{archive}: the archive holds no {produces}")
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp / produces, out)
            except OSError:
                if not out.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        archive.unlink(missing_ok=True)  # the extracted files are what is read
        return out
    if out.exists():
        return out
    raise DownloadError(f"{archive} disappeared twice while extracting; re-run to try again")


# --------------------------------------------------------------------------- DDPM checkpoints


def pytorch_diffusion_cache() -> Path:
    """pytorch_diffusion's own download folder (``get_ckpt_path``'s default root)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "diffusion_models_converted"


def model_cache() -> Path:
    """Where this project keeps downloaded checkpoints: ``$MODEL_CACHE`` or ``data/pretrained``."""
    return Path(os.environ.get("MODEL_CACHE") or REPO_ROOT / "data" / "pretrained").expanduser()


def ddpm_checkpoint(name: str, download: bool | None = None) -> Path:
    """The local path of pytorch_diffusion's converted DDPM ``name`` (``cifar10`` or
    ``ema_cifar10``): pytorch_diffusion's cache if it holds a verified copy, else ours,
    else downloaded into ours (``DDPM_DOWNLOAD=0`` forbids that)."""
    if name not in DDPM_CHECKPOINTS:
        raise UserError(f"unknown DDPM checkpoint name {name!r}; choose from {', '.join(DDPM_CHECKPOINTS)}")
    rel, remote = DDPM_CHECKPOINTS[name]
    md5 = remote.resolved_md5
    ours = model_cache() / rel
    for path in (pytorch_diffusion_cache() / rel, ours):
        # pytorch_diffusion writes its downloads in place, so a copy there may be partial
        if path.is_file() and (not md5 or md5_of(path) == md5):
            return path
    if not enabled(download, "DDPM_DOWNLOAD"):
        raise UserError(
            f"DDPM checkpoint {name!r} not found in {pytorch_diffusion_cache() / rel} or {ours} and downloads are "
            f"off (DDPM_DOWNLOAD=0); " + remote.manual.format(url=remote.resolved_url, dest=ours)
        )
    return fetch(remote, ours)
