"""Safe, atomic file I/O shared by every script.

Every write goes to a temporary file in the destination folder and is renamed into
place, so a crash never leaves a half-written result. Every checkpoint read uses
``torch.load(..., weights_only=True)`` so that loading a file cannot run code from it.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch


class UserError(Exception):
    """Bad input from the user: printed as one line by the CLI, never as a traceback."""


def _atomic_write(path: Path, write_fn) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
        raise UserError(f"cannot load {what} {path}: {_load_failure(e)}") from None


def _load_failure(e: Exception) -> str:
    """One line on why ``torch.load(weights_only=True)`` refused a file. PyTorch's own text
    suggests ``weights_only=False`` (running the file's code): never pass that on."""
    text = str(e).strip()
    if "Weights only load failed" in text:
        m = re.search(r"GLOBAL ([\w.]+)", text)
        what = f"the global {m.group(1)}" if m else "objects other than tensors"
        return (
            f"it refers to {what}, which a weights-only load refuses (loading it could run code); "
            "use a file that holds only tensors (a state_dict)"
        )
    return text.splitlines()[0][:300] if text else type(e).__name__


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


def load_state_dict_strict(model: torch.nn.Module, state: dict, path: str | Path) -> None:
    """``load_state_dict(strict=True)`` with a short error naming the mismatching keys."""
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)})"
            )
        raise UserError(f"{path} does not match the configured model: " + "; ".join(parts))
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


def cli_main(fn):
    """Run a script's ``main``: ``UserError`` becomes ``error: ...`` on stderr and exit 2."""

    def wrapper(argv=None):
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
