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
_SECTIONS = ("demo", "poison_flags", "defense_flags", "tiny")
TINY_ONLY = ("test_subset",)  # keys the smoke run sets that the demo leaves to train.py


@cache
def load_recipe(path: Path = RECIPE_FILE) -> dict[str, dict[str, Any]]:
    """The recipe's sections, checked for shape (a damaged file is a one-line error)."""
    data = load_yaml_file(path)
    data.setdefault("tiny", {"demo": {}, "poison_flags": {}})
    data.setdefault("defense_flags", {})
    unknown = set(data) - set(_SECTIONS)
    if unknown:
        raise UserError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}; expected {', '.join(_SECTIONS)}")
    _check_sections(path, data, "")
    _check_flags(path, data.get("defense_flags"), "defense_flags", "train.py")
    tiny = data["tiny"]
    if not isinstance(tiny, dict) or set(tiny) != {"demo", "poison_flags"}:
        raise UserError(f"{path}: 'tiny' must hold exactly 'demo' and 'poison_flags', got {tiny!r}")
    _check_sections(path, tiny, "tiny.")
    extra = set(tiny["demo"]) - set(data["demo"]) - set(TINY_ONLY)
    if extra:
        raise UserError(f"{path}: tiny.demo: unknown key(s) {', '.join(sorted(extra))}; expected keys of 'demo'")
    return data


def _check_sections(path: Path, data: dict[str, Any], where: str) -> None:
    for name in ("demo", "poison_flags"):
        if not isinstance(data.get(name), dict):
            raise UserError(f"{path}: expected a mapping under '{where}{name}', got {data.get(name)!r}")
    _check_flags(path, data["poison_flags"], f"{where}poison_flags", "poison.py")


def _check_flags(path: Path, section: Any, where: str, script: str) -> None:
    if not isinstance(section, dict):
        raise UserError(f"{path}: expected a mapping under '{where}', got {section!r}")
    for key, flags in section.items():
        if not isinstance(flags, str):
            raise UserError(f"{path}: {where}.{key}: expected a string of {script} flags, got {flags!r}")


def demo_recipe() -> dict[str, Any]:
    return dict(load_recipe()["demo"])


def tiny_recipe() -> dict[str, Any]:
    """The smoke run's keys (``demo.py --tiny``): they replace the demo's."""
    return dict(load_recipe()["tiny"]["demo"])


def recipe_help() -> dict[str, str]:
    """Each demo key's comment in the recipe file (its help in ``demo.py --help``)."""
    helps, section = {}, None
    for line in RECIPE_FILE.read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            section = line.split(":", 1)[0]
        elif section == "demo" and ":" in line and not line.lstrip().startswith("#"):
            key, _, rest = line.strip().partition(":")
            helps[key] = rest.partition("#")[2].strip()
    return helps


def defense_flags(defense: str) -> list[str]:
    """``train.py`` flags the recipe adds to the ``defense`` column's victims (``[]``: none)."""
    return load_recipe()["defense_flags"].get(defense, "").split()


def poison_flags(poison: str, tiny: bool = False) -> str:
    """Recommended ``poison.py`` flags for ``poison`` at ``--subset 5000`` ('' when it needs none);
    ``tiny``: the smoke run's, where it has its own."""
    recipe = load_recipe()
    if tiny and poison in recipe["tiny"]["poison_flags"]:
        return recipe["tiny"]["poison_flags"][poison]
    return recipe["poison_flags"].get(poison, "")
