"""The CPU-scale ECLIPSE recipe, read from its one declaration, ``config/eclipse_cpu.yaml``.

``demo.py`` takes its defaults and builds its commands from it, and each poison's
recommended crafting flags (``PoisonSpec.cpu_flags``, ``poison.py --list``) come from it.
The DataElixir side has its own single declaration, the overlay
``config/dataelixir_cpu.yaml`` that every attack script reads with ``--overlay``.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from utils.fileio import UserError
from utils.options import load_yaml_file
from utils.paths import REPO_ROOT

RECIPE_FILE = REPO_ROOT / "config" / "eclipse_cpu.yaml"
_SECTIONS = {"demo": dict, "poison_flags": dict}


@cache
def load_recipe(path: Path = RECIPE_FILE) -> dict[str, dict[str, Any]]:
    """The recipe's sections, checked for shape (a damaged file is a one-line error)."""
    data = load_yaml_file(path)
    for name in _SECTIONS:
        if not isinstance(data.get(name), dict):
            raise UserError(f"{path}: expected a mapping under '{name}', got {data.get(name)!r}")
    unknown = set(data) - set(_SECTIONS)
    if unknown:
        raise UserError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}; expected {', '.join(_SECTIONS)}")
    for key, flags in data["poison_flags"].items():
        if not isinstance(flags, str):
            raise UserError(f"{path}: poison_flags.{key}: expected a string of poison.py flags, got {flags!r}")
    return data


def demo_recipe() -> dict[str, Any]:
    return dict(load_recipe()["demo"])


def poison_flags(poison: str) -> str:
    """Recommended ``poison.py`` flags for ``poison`` at ``--subset 5000`` ('' when it needs none)."""
    return load_recipe()["poison_flags"].get(poison, "")
