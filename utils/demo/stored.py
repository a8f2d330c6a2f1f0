"""What the demo's steps already stored, compared with what this demo would run.

Each script records the settings of its output (``train.py``: ``result.json``'s
``settings``, or an unfinished run's ``settings.json``; ``train_diffusion.py``: its run
folder's ``run.json``; ``poison.py`` and ``purification.py``: the JSON beside their
output). A :class:`Stored` names those files and the values this demo's command would
store; :func:`check_stored_settings` finds the steps whose outputs were made with other
settings (a re-run with ``--subset 40`` in a work dir made with ``--subset 20``) and
refuses them, naming the step, the file and each differing setting, or with
``overwrite`` redoes them and every step that depends on them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from utils.fileio import UserError

_ABSENT = object()


@dataclass(frozen=True)
class Stored:
    """Where a step's script stores its settings, and what this command would store.

    ``files``: the first that exists is read (a finished run's, then an unfinished one's);
    ``section``: the key of the settings inside it per file (None: the whole file);
    ``values``: dotted keys (``training.batch_size``) and the values this command gives them."""

    files: tuple[Path, ...]
    values: dict[str, Any]
    sections: tuple[str | None, ...] = field(default_factory=tuple)


class Step(Protocol):
    key: str
    cmd: list[str]
    done: bool
    after: tuple[str, ...]
    stored: Stored | None


def _lookup(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if data is None:
            return None  # a section stored as null (poison.py's "subset": null) holds no value
        if not isinstance(data, dict) or part not in data:
            return _ABSENT
        data = data[part]
    return data


def _same(a: Any, b: Any) -> bool:
    def norm(v: Any) -> Any:
        if isinstance(v, bool) or v is None:
            return v
        if isinstance(v, (list, tuple)):
            return ",".join(str(norm(x)) for x in v)
        try:
            return float(v)
        except (TypeError, ValueError):
            return str(v).replace(" ", "")

    return norm(a) == norm(b)


def stored_differences(stored: Stored) -> tuple[Path, list[str]] | None:
    """The file a step's settings were read from and each setting that differs from this
    command's (``key: stored -> now``); None when no file exists yet. Keys the file does
    not hold (an older script's) are not compared."""
    for i, path in enumerate(stored.files):
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return path, ["the file is unreadable"]
        section = stored.sections[i] if i < len(stored.sections) else None
        settings = data.get(section) if section is not None and isinstance(data, dict) else data
        if not isinstance(settings, dict):
            return path, ["the file holds no settings"]
        diffs = []
        for key, now in stored.values.items():
            old = _lookup(settings, key)
            if old is not _ABSENT and not _same(old, now):
                diffs.append(f"{key}: {old} -> {now}")
        return path, diffs
    return None


def check_stored_settings(steps: Sequence[Step], overwrite: bool) -> list[str]:
    """Refuse (``UserError``, one line) when a step's output was made with other settings;
    with ``overwrite`` those steps and every step after them are redone instead, and each
    step that runs gets ``--overwrite``. Returns a line per redone step."""
    differing: dict[str, tuple[Path, list[str]]] = {}
    for s in steps:
        found = stored_differences(s.stored) if s.stored is not None else None
        if found is not None and found[1]:
            differing[s.key] = found
    if differing and not overwrite:
        key, (path, diffs) = next(iter(differing.items()))
        more = f"; {len(differing) - 1} more step(s) differ too" if len(differing) > 1 else ""
        raise UserError(
            f"step '{key}': {path} was made with other settings ({'; '.join(diffs)}){more}; "
            "use another --work_dir, or pass --overwrite to redo the differing steps and those after them"
        )
    redo = set(differing)
    grew = True
    while grew:  # every step after a redone one is redone: its inputs change
        grew = False
        for s in steps:
            if s.key not in redo and any(a in redo for a in s.after):
                redo.add(s.key)
                grew = True
    lines = []
    for s in steps:
        if s.key in redo:
            s.done = False
            why = "; ".join(differing[s.key][1]) if s.key in differing else "a step before it is redone"
            lines.append(f"  redone with --overwrite: {s.key} ({why})")
        if overwrite and not s.done and "--overwrite" not in s.cmd:
            s.cmd.append("--overwrite")
    return lines
