"""A restricted unpickler: data in, never code.

Pickle can call any importable function while loading. ``SafeUnpickler`` only lets
through the handful of globals that plain data needs (numpy arrays and scalars, and
``_codecs.encode`` which protocol-2 pickles use for ``bytes``) and the globals of torch
tensors that torch's own weights-only loader allows (``torch.load(weights_only=True)``'s
allow-list); a tensor's storage, which ``pickle.dumps`` nests as ``torch.save`` bytes, is
read back with ``torch.load(weights_only=True)``. Anything else is refused with an error
that names the global, before it is imported or called.

Nothing a pickle asks for may be much larger than the pickle itself: a numpy array's
declared shape is checked against the pickle's size before it is allocated, and
``_codecs.encode`` only turns text into bytes (``latin1``, what protocol 2 writes), so a
small file cannot ask for gigabytes.
"""

from __future__ import annotations

import codecs
import io
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from utils.fileio import UserError

_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy")


def _latin1_encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles call it (bytes stored as latin1 text); other
    codecs (hex, base64, ...) could grow the data at each call, so they are refused."""
    codec = str(encoding).replace("-", "").replace("_", "").lower()
    if not isinstance(text, str) or codec not in ("latin1", "iso88591"):
        raise ValueError(f"refused _codecs.encode with encoding {str(encoding)[:40]!r} (only latin1 text)")
    return codecs.encode(text, encoding, errors)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {("_codecs", "encode"): _latin1_encode}
    try:
        from numpy._core import multiarray as ma  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray as ma
    for mod in _NUMPY_MODULES:
        allowed[(mod, "_reconstruct")] = ma._reconstruct
        allowed[(mod, "scalar")] = ma.scalar
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


_ALLOWED = _allowed_globals()


class UnsafePickleError(UserError):
    pass


def _bounded_reconstruct(limit: int, source: str) -> Any:
    """numpy's ``_reconstruct`` (which allocates the array it is given the shape of), refusing
    an array of more than ``limit`` bytes (the pickle's size: the data must follow in it)."""
    reconstruct = _ALLOWED[("numpy", "_reconstruct")]

    def checked(subtype: Any, shape: Any, dtype: Any) -> Any:
        try:
            dims = [int(d) for d in (shape if isinstance(shape, tuple | list) else (shape,))]
            nbytes = math.prod(dims) * np.dtype(dtype).itemsize
        except (TypeError, ValueError, OverflowError):
            nbytes = 0  # numpy itself refuses what it cannot read as a shape and dtype
        if nbytes > limit:
            raise UnsafePickleError(
                f"{source}: declares a numpy array of shape {tuple(dims)} ({nbytes} bytes) "
                f"in a pickle of {limit} bytes; the file is damaged or crafted"
            )
        return reconstruct(subtype, shape, dtype)

    return checked


def _torch_global(module: str, name: str, source: str) -> Any:
    """A global of a pickled torch tensor when torch's weights-only loader allows it, else None."""
    if not (module.startswith("torch") or (module, name) == ("collections", "OrderedDict")):
        return None
    import torch

    if (module, name) == ("torch.storage", "_load_from_bytes"):
        # pickle.dumps(tensor) stores the storage as nested torch.save bytes; torch's own
        # _load_from_bytes reads them with weights_only=False, so read them ourselves
        def load_storage(data: bytes) -> Any:
            try:
                return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
            except Exception as e:  # noqa: BLE001 - any failure is a refused file
                raise UnsafePickleError(f"{source}: refused a torch storage ({str(e).splitlines()[0][:200]})") from None

        return load_storage
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = _get_allowed_globals()
    except ImportError:  # pragma: no cover - a torch without that private helper
        from torch._utils import _rebuild_tensor_v2

        allowed = {"torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2}
    return allowed.get(f"{module}.{name}")


class SafeUnpickler(pickle.Unpickler):
    def __init__(self, file, *, source: str = "<bytes>", encoding: str = "ASCII", limit: int | None = None):
        super().__init__(file, encoding=encoding)
        self.source = source
        self.limit = limit  # the most bytes one numpy array may declare; None: no limit

    def find_class(self, module: str, name: str) -> Any:
        if name == "_reconstruct" and module in _NUMPY_MODULES and self.limit is not None:
            return _bounded_reconstruct(self.limit, self.source)
        obj = _ALLOWED.get((module, name))
        if obj is None:
            obj = _torch_global(module, name, self.source)
        if obj is None:
            raise UnsafePickleError(
                f"{self.source}: refused to unpickle global '{module}.{name}' "
                "(only plain data — lists, tuples, bytes, ints, numpy arrays, torch tensors — is loaded)"
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source}: refused persistent reference in pickle")


def safe_loads(data: bytes, *, source: str = "<bytes>", encoding: str = "ASCII") -> Any:
    """Plain data from pickle bytes (see the module's docstring); a refused or damaged pickle
    is a one-line ``UserError``."""
    try:
        return SafeUnpickler(io.BytesIO(data), source=source, encoding=encoding, limit=len(data)).load()
    except UserError:
        raise
    except MemoryError:
        raise UserError(
            f"{source}: the pickle asks for more memory than there is; the file is damaged or crafted"
        ) from None
    except RecursionError:
        raise UserError(f"{source}: not a valid pickle file (nested too deeply)") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        AttributeError,
        OverflowError,
    ) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UserError(f"{source}: not a valid pickle file ({type(e).__name__}: {first})") from None


def safe_load(path: str | Path, *, encoding: str = "ASCII") -> Any:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    return safe_loads(data, source=str(path), encoding=encoding)
