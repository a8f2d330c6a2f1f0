"""Names of diffusion-training checkpoints: built and parsed in one place.

improved-diffusion (and so ECLIPSE) writes ``model%06d.pt``, ``ema_<rate>_%06d.pt`` and
``opt%06d.pt`` (``model003000.pt``, ``ema_0.9999_250000.pt``). Earlier versions of this
project wrote ``model_<step>.pt``, ``ema_<rate>_<step>.pt`` and ``opt_<step>.pt`` without
zero padding. We write improved-diffusion's spelling and read both; for steps of six or
more digits the EMA names coincide (ECLIPSE's published ``ema_0.9999_250000.pt``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

KINDS = ("model", "ema", "opt")
DEFAULT_EMA_RATE = 0.9999  # improved-diffusion's and train_diffusion.py's default

# model000100.pt / model_100.pt, opt000100.pt / opt_100.pt, ema_0.9999_000100.pt / ema_0.9999_100.pt
_NAME = re.compile(r"^(?:(?P<kind>model|opt)(?P<sep>_?)|ema_(?P<rate>[0-9][0-9.eE+-]*)_)(?P<step>\d+)\.pt$")


class CheckpointName(NamedTuple):
    kind: str  # model | ema | opt
    step: int
    rate: str | None  # the EMA rate as written in the name; None for model / opt
    legacy: bool  # this project's earlier spelling (model_<step>.pt, opt_<step>.pt, unpadded step)


def _rate_text(rate: float | str) -> str:
    # improved-diffusion formats the float rate with str(): 0.9999 -> "0.9999"
    return str(rate)


def checkpoint_name(kind: str, step: int, rate: float | str | None = None, legacy: bool = False) -> str:
    """The file name of a ``kind`` checkpoint at ``step``; ``legacy`` gives our earlier spelling."""
    if kind not in KINDS:
        raise ValueError(f"checkpoint kind must be one of {KINDS}, got {kind!r}")
    if (kind == "ema") != (rate is not None):
        raise ValueError("an EMA checkpoint name needs a rate; model and opt names take none")
    num = str(step) if legacy else f"{step:06d}"
    if kind == "ema":
        return f"ema_{_rate_text(rate)}_{num}.pt"
    return f"{kind}_{num}.pt" if legacy else f"{kind}{num}.pt"


def parse_checkpoint_name(name: str) -> CheckpointName | None:
    """``CheckpointName`` for a name in either spelling, None for anything else."""
    m = _NAME.match(Path(name).name)
    if not m:
        return None
    step = int(m.group("step"))
    if m.group("kind"):
        return CheckpointName(m.group("kind"), step, None, m.group("sep") == "_")
    # an EMA name is legacy only when its step has fewer than six digits (no zero padding)
    return CheckpointName("ema", step, m.group("rate"), len(m.group("step")) < 6)


def spellings(kind: str, step: int, rate: float | str | None = None) -> list[str]:
    """Both names of one checkpoint, improved-diffusion's first (one name when they coincide)."""
    names = [checkpoint_name(kind, step, rate), checkpoint_name(kind, step, rate, legacy=True)]
    return list(dict.fromkeys(names))


def find_checkpoint(folder: Path, kind: str, step: int, rate: float | str | None = None) -> Path | None:
    """The existing file of that checkpoint in ``folder`` under either spelling, else None."""
    for n in spellings(kind, step, rate):
        if (folder / n).is_file():
            return folder / n
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` if it exists; else the same checkpoint under its other spelling when that
    exists (``ema_0.999_3000.pt`` <-> ``ema_0.999_003000.pt``); else ``path`` unchanged, so
    the caller's "not found" message names what was asked for."""
    path = Path(path)
    if path.is_file():
        return path
    parsed = parse_checkpoint_name(path.name)
    if parsed is None:
        return path
    return find_checkpoint(path.parent, parsed.kind, parsed.step, parsed.rate) or path


def checkpoint_steps(folder: Path, kind: str) -> list[int]:
    """Steps of the ``kind`` checkpoints in ``folder`` (either spelling), ascending, unique."""
    found = {p.step for f in folder.glob("*.pt") if (p := parse_checkpoint_name(f.name)) and p.kind == kind}
    return sorted(found)


def ema_checkpoints(folder: Path, step: int) -> list[Path]:
    """EMA checkpoints of any rate at ``step`` in ``folder`` (either spelling), sorted by name."""
    return sorted(
        f
        for f in folder.glob("ema_*.pt")
        if (p := parse_checkpoint_name(f.name)) and p.kind == "ema" and p.step == step
    )
