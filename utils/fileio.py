"""Safe, atomic file I/O shared by every script.

Every write goes to a temporary file in the destination folder and is renamed into
place, so a crash never leaves a half-written result; the file is created with mode 0666
less the umask, as any other program's. Every checkpoint read uses
``torch.load(..., weights_only=True)`` so that loading a file cannot run code from it.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import json
import logging
import os
import pickletools
import platform
import re
import secrets
import sys
from pathlib import Path
from typing import Any

import torch

try:
    from torch._weights_only_unpickler import _get_allowed_globals
except ImportError:  # pragma: no cover - a torch without that private helper
    _get_allowed_globals = dict


class UserError(Exception):
    """Bad input from the user: printed as one line by the CLI, never as a traceback."""


_TEMP_TAG = 8  # hex characters of an atomic write's random temporary-name tag


def atomic_temp_name(name: str, tag: str = "X" * _TEMP_TAG) -> str:
    """The temporary name an atomic write of the file ``name`` uses (``tag``: its random
    part; the default spells its longest form, for length checks)."""
    return f".{name}.{tag}.tmp"


def name_limits(folder: str | Path) -> tuple[int, int]:
    """``(NAME_MAX, PATH_MAX)`` of the file system holding ``folder`` (or, when it does not
    exist yet, its nearest existing parent), from ``os.pathconf``; 255 and 4096 where the
    system does not say."""
    where = Path(folder).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    limits = []
    for key, fallback in (("PC_NAME_MAX", 255), ("PC_PATH_MAX", 4096)):
        try:
            value = os.pathconf(where, key)
        except (AttributeError, OSError, ValueError):
            value = -1
        limits.append(value if value > 0 else fallback)
    return limits[0], limits[1]


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new temporary file beside ``path``, created with mode 0666 so that the process's
    umask (and a default ACL) applies to it as to any other program's file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(1000):
        tmp = path.parent / atomic_temp_name(path.name, secrets.token_hex(_TEMP_TAG // 2))
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name", str(path))


def _atomic_write(path: Path, write_fn) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.filename is None:
            # a failed write on the open file (disk full) carries no path: name the destination
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


def read_text_file(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file's content; a folder, an unreadable or a binary file is a ``UserError``."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, expected a file")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {e.start}); expected a YAML/JSON text file") from None
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic_write(Path(path), lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def safe_torch_load(path: str | Path, what: str = "checkpoint", hint: str = "") -> Any:
    """Load a torch file without executing code from it; bad files get a one-line error."""
    path = Path(path)
    if not path.is_file():
        msg = f"{what} not found: {path}"
        raise UserError(msg + (f" ({hint})" if hint else ""))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to parse is the user's file
        raise UserError(f"cannot load {what} {path}: {_load_failure(e, path)}") from None


_HEAD_BYTES = 1 << 20  # how much of an unloadable file is read to say what it is


def _load_failure(e: Exception, path: Path) -> str:
    """One line on why ``torch.load(weights_only=True)`` refused a file: "not a torch
    checkpoint (what it is)", or for a pickle that needs globals the weights-only load does
    not allow, that loading it would run code. PyTorch's own text suggests
    ``weights_only=False`` (running the file's code): never pass that on."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    text = str(e).strip()
    inner = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
    first = inner.group(1) if inner else text.splitlines()[0] if text else type(e).__name__
    if "weights_only" in first:  # torch's advice to load with weights_only=False (running code)
        first = "the weights-only loader refused it"
    first = re.split(r"(?<=\w)\. ", first)[0][:160]
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
    except OSError:
        head = b""
    blocked = re.search(r"GLOBAL ([\w.]+)", text)
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip archive
        if blocked:
            return _refused_code(blocked.group(1))
        return f"not a torch checkpoint (a damaged zip archive, or not torch.save's: {first})"
    found = _pickle_globals(head)
    if found is None:
        return f"not a torch checkpoint ({_describe_bytes(head)})"
    allowed = _get_allowed_globals()
    refused = [g for g in found if g not in allowed]
    if blocked or refused:
        return _refused_code(blocked.group(1) if blocked else refused[0])
    return f"not a torch checkpoint (a pickle torch cannot read: {first})"


def _refused_code(name: str) -> str:
    return (
        f"refused: it needs the global {name}, which a weights-only load does not allow "
        "(loading it could run code); use a file that holds only tensors (a state_dict)"
    )


def _pickle_globals(head: bytes) -> list[str] | None:
    """The globals (``module.name``) the pickles at the start of ``head`` import, read
    without loading them; ``None`` when ``head`` does not start with a pickle."""
    found: list[str] = []
    stream, strings = io.BytesIO(head), []
    for n in range(8):  # torch's legacy format: a few pickles one after another
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception:  # noqa: BLE001 - pickletools raises ValueError and friends on other bytes
            cut_short = len(head) == _HEAD_BYTES and head[:1] == b"\x80"  # a pickle longer than what was read
            if n == 0 and not cut_short:
                return None
            break
        if stream.tell() >= len(head):
            break
    return found


def _describe_bytes(head: bytes) -> str:
    """What a file that is neither a zip archive nor a pickle looks like, from its first bytes."""
    if not head:
        return "the file is empty"
    if head.startswith(b"\x93NUMPY"):
        return "a numpy .npy file"
    sample = head[:4096].decode("utf-8", "replace")
    if "\ufffd" not in sample[:-4] and all(c.isprintable() or c.isspace() for c in sample[:-4]):
        return f"a text file: {sample.strip()[:40]!r}"
    return f"unrecognised bytes {head[:8].hex(' ')}: damaged, or some other kind of file"


def check_finite(state: dict, path: str | Path) -> None:
    """Refuse weights holding NaN or Inf: a diverged checkpoint would purify into garbage."""
    for k, v in state.items() if isinstance(state, dict) else ():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = "NaN" if bool(torch.isnan(v).any()) else "Inf"
            raise UserError(
                f"{path}: tensor {k} holds {bad} values; the checkpoint is damaged or its training diverged"
            )


def read_state_json(path: str | Path, how: str) -> Any:
    """A JSON file a script wrote to keep its state; a damaged one is a one-line error saying ``how`` to go on."""
    path = Path(path)
    try:
        return json.loads(read_text_file(path, "state file"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is damaged ({e.msg} at line {e.lineno}); {how}") from None


# the diffusion networks' names in messages, and a key only a checkpoint of each holds
MODEL_FAMILIES = {"UNetModel": "an improved-diffusion UNet", "DDPMModel": "a DDPM"}
_FAMILY_KEYS = {"input_blocks.0.0.weight": "an improved-diffusion UNet", "temb.dense.0.weight": "a DDPM"}


def load_state_dict_strict(model: torch.nn.Module, state: dict, path: str | Path) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the network the model is
    (``MODEL_FAMILIES``), how many keys are missing or unexpected, an example of each, and
    the network the file holds when it is one of the others; a value that is not a tensor is
    named too."""
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise UserError(
                f"{path}: expected a state_dict (a dict of tensors), but {str(k)[:80]!r} holds a {type(v).__name__}"
            )
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        family = MODEL_FAMILIES.get(type(model).__name__, f"a {type(model).__name__}")
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {str(unexpected[0])[:80]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)})"
            )
        other = [name for key, name in _FAMILY_KEYS.items() if key in state and name != family]
        holds = f"; it looks like {other[0]} checkpoint" if other else ""
        raise UserError(
            f"{path} does not match the configured model: expected {family} checkpoint, it has "
            + ", ".join(parts)
            + holds
        )
    check_finite(state, path)
    model.load_state_dict(state, strict=True)


def refuse_overwrite(path: str | Path, overwrite: bool, flag: str = "--overwrite") -> None:
    if Path(path).exists() and not overwrite:
        raise UserError(f"{path} already exists; pass {flag} to replace it")


def setup_logging(log_file: str | Path | None, name: str = "run") -> logging.Logger:
    """Log to stderr and (appending) to ``log_file``; safe to call more than once."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(fmt)
    logger.addHandler(sh)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse; whether it applied.

    By default glibc gives an allocation above its mmap threshold (128 KiB, rising with use
    to at most 32 MiB) its own mapping, unmaps it when freed, and trims the heap's free top,
    so the large CPU tensors of a diffusion step (a batch-500 DDPM's activations, attention
    maps, float32 GroupNorm) are page-faulted and zeroed by the kernel on every call: a
    quarter to a third of DataElixir's candidate time (bench/bench_allocator.py).
    Serving them from the heap and never trimming it keeps those pages: the process keeps
    its peak memory until it exits instead of returning it between steps. Numerics are
    unchanged. Off glibc (macOS, musl) and with ``MALLOC_TUNING=off`` it does nothing."""
    if os.environ.get("MALLOC_TUNING", "").lower() == "off" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)  # the running process's C library
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def cli_main(fn):
    """Run a script's ``main``: ``UserError`` becomes ``error: ...`` on stderr and exit 2.
    Every script runs with glibc's malloc keeping freed memory (:func:`keep_freed_memory`)."""

    def wrapper(argv=None):
        keep_freed_memory()
        try:
            return fn(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except OSError as e:
            # read-only or full output folder, a path blocked by a file, ...: the path and the errno text
            name = errno.errorcode.get(e.errno or 0, "")
            where = f"{e.filename}: " if e.filename else ""
            print(f"error: {where}{e.strerror or e}" + (f" ({name})" if name else ""), file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted; finished work is saved and a re-run resumes from it", file=sys.stderr)
            raise SystemExit(130) from None

    wrapper.__wrapped__ = fn
    return wrapper


# --------------------------------------------------------------------------- fingerprints


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
