"""YAML configuration with command-line overrides, in BackdoorBench v1's style.

``python attack/<name>.py --yaml_path config/<name>/cifar10.yaml --pratio 0.05``:
values come from the built-in defaults, then the YAML file, then ``--overlay`` files,
then ``--key value`` options. Every key is typed by its declaration; an unknown key or a
value of the wrong type is a ``UserError`` naming it and listing the valid keys.

Overlay files (e.g. ``config/dataelixir_cpu.yaml``) are shared by all attacks, so a key
that belongs to some other attack (``aux_epochs`` for BadNets) is ignored for this one;
a key no attack knows is still an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from utils.fileio import UserError, read_text_file
from utils.keys import BadValue, Key, check, from_text
from utils.paths import REPO_ROOT
from utils.run_state import check_name


def coerce(name: str, key: Key, value: Any, valid: dict[str, Key], source: str = "") -> Any:
    """Check and cast ``value`` (already YAML-typed) for key ``name`` (``utils.keys.check``),
    naming ``source`` (the file or --option it came from) in the error."""
    where = f" in {source}" if source else ""
    try:
        return check(key, value)
    except BadValue as e:
        if e.type_error:
            raise UserError(
                f"{name}{where}: expected {e.must}, got {value!r}; valid keys: {', '.join(sorted(valid))}"
            ) from None
        raise UserError(f"{name}{where}: must be {e.must}, got {e.value!r}") from None


def resolve_path(path: str | Path, what: str = "file", must_exist: bool = True) -> Path:
    """``path`` as given (relative to the current directory), else relative to the
    repository root with leading ``../`` removed, so BackdoorBench's ``../config/...``
    works from ``attack/`` and from the repository root alike."""
    p = Path(path).expanduser()
    tried = [p]
    if p.exists():
        return p
    if not p.is_absolute():
        parts = list(p.parts)
        while parts and parts[0] in ("..", "."):
            parts.pop(0)
        alt = REPO_ROOT.joinpath(*parts) if parts else REPO_ROOT
        tried.append(alt)
        if alt.exists():
            return alt
    if must_exist:
        raise UserError(f"{what} not found: {path} (tried {', '.join(str(t) for t in tried)})")
    return p


def load_yaml_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(read_text_file(path, "YAML configuration"))
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    return data


@dataclass
class RunArgs:
    yaml_path: Path
    save_folder_name: str
    work_dir: str | None
    overwrite: bool
    overlays: list[Path]
    ignored: dict[str, list[str]]  # overlay file -> keys this attack does not have
    empty_yaml: bool = False  # --yaml_path set nothing: every key not on the command line is its default
    stop_after: str | None = None  # the last phase to run (a run option, not a setting)


FIXED_OPTIONS = {
    "yaml_path": Key(None, "the YAML configuration (resolved against the current directory, then the repository root)"),
    "save_folder_name": Key(None, "results go to record/<save_folder_name>/ (default: the attack's name)"),
    "work_dir": Key(None, "folder holding record/, resource/ and diff_ckpt/ (default: the repository root)"),
    "overwrite": Key(False, "replace an existing record folder written with a different configuration", flag=True),
    "overlay": Key(None, "extra YAML applied after --yaml_path (repeatable); keys of other attacks are ignored"),
    "stop_after": Key(
        None,
        "stop once this phase is done (e.g. backdoor_training: the backdoored model only); re-run without it to go on",
        nullable=True,
        choices=("attack", "backdoor_training", "candidates", "identification", "stage1", "stage2"),
    ),
}


def help_text(prog: str, keys: dict[str, Key]) -> str:
    lines = [
        f"usage: {prog} --yaml_path FILE [--save_folder_name NAME] [--work_dir DIR] [--overwrite]",
        "       [--overlay FILE] [--KEY VALUE ...]",
        "",
        "options:",
    ]
    for k, key in FIXED_OPTIONS.items():
        lines.append(f"  --{k:<24} {key.help}")
    lines += ["", "configuration keys (YAML or --KEY VALUE; defaults in brackets):"]
    for k in keys:
        key = keys[k]
        rng = f" ({key.range.describe()})" if key.range is not None else ""
        lines.append(f"  --{k:<24} {key.help}{rng} [{json.dumps(key.default)}]")
    return "\n".join(lines)


def parse_config(
    prog: str,
    argv: list[str],
    keys: dict[str, Key],
    known_elsewhere: set[str] = frozenset(),
    default_yaml: str | None = None,
    default_name: str = "run",
) -> tuple[dict[str, Any], RunArgs]:
    """Resolve the configuration: declared defaults <- YAML <- overlays <- ``--key value``.

    ``known_elsewhere``: keys that other attacks declare; overlays may hold them."""
    fixed: dict[str, Any] = {"overlay": []}
    overrides: list[tuple[str, str]] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(help_text(prog, keys))
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}; options look like --key value (see --help)")
        name, eq, val = arg[2:].partition("=")
        if name == "overwrite":
            fixed["overwrite"] = (
                True
                if not eq
                else coerce(
                    name,
                    FIXED_OPTIONS[name],
                    from_text(FIXED_OPTIONS[name], val),
                    {**FIXED_OPTIONS, **keys},
                    "--overwrite",
                )
            )
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv):
                raise UserError(f"--{name} needs a value")
            val = argv[i + 1]
            i += 2
        else:
            i += 1
        if name == "overlay":
            fixed["overlay"].append(val)
        elif name in FIXED_OPTIONS:
            fixed[name] = val
        elif name in keys:
            overrides.append((name, val))
        else:
            raise UserError(f"unknown option --{name}; valid keys: {', '.join(sorted([*FIXED_OPTIONS, *keys]))}")

    yaml_arg = fixed.get("yaml_path", default_yaml)
    if yaml_arg is None:
        raise UserError("--yaml_path is required (e.g. --yaml_path config/badnet/cifar10.yaml)")
    yaml_path = resolve_path(yaml_arg, "YAML configuration")
    cfg = {k: key.default for k, key in keys.items()}
    from_yaml = load_yaml_file(yaml_path)
    for k, v in from_yaml.items():
        if k not in keys:
            raise UserError(f"unknown key {k!r} in {yaml_path}; valid keys: {', '.join(sorted(keys))}")
        cfg[k] = coerce(k, keys[k], v, keys, str(yaml_path))
    overlays: list[Path] = []
    ignored: dict[str, list[str]] = {}
    for o in fixed["overlay"]:
        op = resolve_path(o, "overlay file")
        overlays.append(op)
        for k, v in load_yaml_file(op).items():
            if k in keys:
                cfg[k] = coerce(k, keys[k], v, keys, str(op))
            elif k in known_elsewhere:
                ignored.setdefault(str(op), []).append(k)
            else:
                valid = sorted(set(keys) | set(known_elsewhere))
                raise UserError(f"unknown key {k!r} in {op}; valid keys: {', '.join(valid)}")
    for k, raw in overrides:
        cfg[k] = coerce(k, keys[k], from_text(keys[k], raw), keys, f"--{k}")
    name = check_name(fixed.get("save_folder_name") or default_name, "--save_folder_name")
    stop_after = fixed.get("stop_after")
    if stop_after is not None:
        stop_after = coerce("--stop_after", FIXED_OPTIONS["stop_after"], stop_after, FIXED_OPTIONS)
    return cfg, RunArgs(
        yaml_path=yaml_path,
        save_folder_name=name,
        work_dir=fixed.get("work_dir"),
        overwrite=bool(fixed.get("overwrite", False)),
        overlays=overlays,
        ignored=ignored,
        empty_yaml=not from_yaml,
        stop_after=stop_after,
    )


def dump_yaml(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
