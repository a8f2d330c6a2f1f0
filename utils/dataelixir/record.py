"""``record/<save_folder_name>/``: the folder an attack script writes, with its phase book-keeping.

A record folder written with a different resolved configuration is refused unless
``--overwrite`` is given (which deletes it first); runs are never mixed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from utils.compat import legacy_flow_config
from utils.fileio import UserError, atomic_write_json, read_state_json, read_text_file
from utils.options import dump_yaml
from utils.run_state import RunFolder

# how to go on from a damaged state file of a record folder
_DAMAGED_HOW = "re-run with --overwrite to start {rec} afresh, or use another --save_folder_name"
PHASES = ("attack", "backdoor_training", "candidates", "identification", "stage1", "stage2", "final")
# settings that do not change results: a resumed run may use another value
_RUN_ONLY = {"device", "frequency_save"}


class Record:
    """``record/<name>/`` with its phase book-keeping."""

    def __init__(self, root: Path):
        self.root = root
        self.phases_file = root / "phases.json"
        self.phases: dict[str, dict] = self.read_state("phases.json") if self.phases_file.is_file() else {}

    def done(self, phase: str) -> bool:
        return bool(self.phases.get(phase, {}).get("done"))

    def mark(self, phase: str, seconds: float, **extra: Any) -> None:
        self.phases[phase] = {"done": True, "seconds": round(seconds, 3), **extra}
        atomic_write_json(self.phases_file, self.phases)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def read_state(self, name: str) -> Any:
        """A JSON file of the record; a damaged one is a one-line error saying how to go on."""
        return read_state_json(self.path(name), _DAMAGED_HOW.format(rec=self.root))


def stored_config(rec: Path) -> dict[str, Any] | None:
    """The configuration a record folder was written with (older spellings read as now);
    None when there is none or it cannot be read (``open_record`` then says why)."""
    import yaml

    try:
        stored = yaml.safe_load(read_text_file(rec / "config.yaml", "record configuration"))
    except (UserError, yaml.YAMLError):
        return None
    return legacy_flow_config(stored) if isinstance(stored, dict) else None


def open_record(
    rec: Path, resolved: dict[str, Any], overwrite: bool, defaults: dict[str, Any] | None = None
) -> tuple[Record, bool]:
    """Create or reopen ``rec``; returns the record and whether it resumes an earlier run.

    A key missing from the stored configuration matches its value in ``defaults``: records
    written before a key was added still resume when the new key keeps its default."""
    cfg_file = rec / "config.yaml"
    how = _DAMAGED_HOW.format(rec=rec)
    folder = RunFolder(
        rec,
        resolved,
        settings_file=cfg_file.name,
        hint="use another --save_folder_name or pass --overwrite to replace it",
        damaged=how,
        what="record configuration",
        ignore=tuple(_RUN_ONLY),
        upgrade=lambda stored: legacy_flow_config({**(defaults or {}), **stored}),
        lock=False,  # the flow (utils/dataelixir/flow.py) holds the lock on the record
    )
    held = rec.exists() and any(rec.iterdir())
    if held and overwrite:
        if not cfg_file.is_file() and not (rec / "phases.json").is_file():
            raise UserError(f"{rec} exists and was not written by an attack script; refusing to delete it")
    elif held:
        if not cfg_file.is_file():
            raise UserError(f"{rec} exists but holds no config.yaml; choose another --save_folder_name")
        stored = folder.read()
        if not isinstance(stored, dict) or "attack" not in stored:
            raise UserError(f"{cfg_file} is damaged; {how}")
        folder.check(stored)
        return Record(rec), True
    folder.open(fresh=held, content=dump_yaml(resolved))
    return Record(rec), False
