"""Options: one declaration per option, one parser, one set of shared ranges.

Every option of every script is a ``Key`` (default, help, type, range, choices, nullable),
checked in one place (``check``) whichever way its value arrives: the command line (argparse
parsers built from Keys: ``add_keys_to_argparser`` for the scripts, in the manner of
improved-diffusion's ``add_dict_to_argparser``, and ``config_parser`` for the attack
scripts), a YAML file or ``--overlay`` (``parse_config``), or a Python dict (trigger and
poison parameters). Command-line text becomes a value through ``from_text``; booleans have
one parser, ``parse_bool``, that accepts the same spellings everywhere; errors are one-line
``UserError``s (``ArgParser``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import reprlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from utils.fileio import UserError, read_text_file
from utils.paths import REPO_ROOT
from utils.run_state import check_name

BOOL_WORDS = {
    **dict.fromkeys(("1", "true", "yes", "y", "on"), True),
    **dict.fromkeys(("0", "false", "no", "n", "off"), False),
}
NULL_WORDS = ("null", "none", "~", "")
QUOTE_CHARS = 80  # a value quoted in an error message is cut to this many characters
MAX_YAML_BYTES = 1 << 20  # a configuration file is a few kB
MAX_YAML_VALUES = 100_000  # values in one YAML document, aliases expanded

_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxstring, _QUOTE.maxother, _QUOTE.maxlong = 3, QUOTE_CHARS, QUOTE_CHARS, QUOTE_CHARS
_QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxdict = _QUOTE.maxset = 12


def quote(value: Any) -> str:
    """``repr(value)`` for an error message, cut to ``QUOTE_CHARS`` characters and "..."; the
    cost is bounded however large (or alias-expanded) the value is."""
    return cut(repr(value[: QUOTE_CHARS + 1]) if isinstance(value, str) else _QUOTE.repr(value))


def cut(text: str) -> str:
    """``text`` for an error message: at most ``QUOTE_CHARS`` characters, then "..."."""
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "..."


@dataclass(frozen=True)
class Range:
    """An interval; ``None`` = unbounded. NaN and infinities are never inside."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: low itself is excluded
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}" if self.low is not None else "finite"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


@dataclass(frozen=True)
class Key:
    """One option: its default, help and what a value must be (``check`` enforces it)."""

    default: Any
    help: str = ""
    type: type | None = None  # None: the default's type
    nullable: bool = False
    choices: tuple | None = None
    range: Range | None = None  # numbers only
    flag: bool = False  # on the command line a bare switch (--overwrite), in YAML true/false

    @property
    def kind(self) -> type:
        if self.type is not None:
            return self.type
        if self.default is None:
            return str
        return type(self.default)

    def with_default(self, default: Any, help: str | None = None) -> Key:
        """This declaration with another default (and help): one option shared by several
        attacks or poisons, each with its own default."""
        return replace(self, default=default, help=self.help if help is None else help)

    def expected(self) -> str:
        """What a value of this key's type is called, with its article."""
        name = {
            bool: "a boolean (true or false)",
            int: "an integer",
            float: "a number",
            str: "a string",
            list: "a list",
        }.get(self.kind, f"a {self.kind.__name__}")
        return name + (" or null" if self.nullable else "")


class BadValue(ValueError):
    """A value a ``Key`` refuses. ``must`` completes "expected ..." (``type_error``) or
    "must be ..." (a choice or range); ``value`` is the value as checked."""

    def __init__(self, must: str, value: Any, type_error: bool):
        super().__init__(must)
        self.must, self.value, self.type_error = must, value, type_error

    def message(self, name: str) -> str:
        """``name must be ..., got ...``: the form trigger and poison messages share."""
        return f"{name} must be {self.must}, got {quote(self.value)}"


def parse_bool(value: Any) -> bool | None:
    """The boolean a word (or ``True``/``False``/``0``/``1``) spells, case-insensitive;
    ``None`` when it spells none."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str | int):
        return BOOL_WORDS.get(str(value).strip().lower())
    return None


def describe_choices(choices: tuple) -> str:
    words = [str(c) for c in choices]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _typed(key: Key, value: Any) -> Any:
    """``value`` as ``key``'s type; ``BadValue`` when it is not one."""
    kind = key.kind
    out: Any = None
    if kind is bool:
        out = parse_bool(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            out = value
        elif isinstance(value, float) and value.is_integer():
            out = int(value)
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            out = float(value)
    elif kind is list:
        if isinstance(value, list | tuple):
            out = [list(v) if isinstance(v, list | tuple) else v for v in value]
    elif kind is str and not isinstance(value, list | dict):
        out = str(value)
    if out is None:
        raise BadValue(key.expected(), value, type_error=True)
    return out


def check(key: Key, value: Any) -> Any:
    """The one check of a value against its declaration: type, then choices, then range.
    Returns the value cast to the key's type; raises ``BadValue``."""
    if value is None:
        if key.nullable:
            return None
        raise BadValue(key.expected(), value, type_error=True)
    out = _typed(key, value)
    if key.choices is not None and out not in key.choices:
        raise BadValue(describe_choices(key.choices), out, type_error=False)
    if key.range is not None and out not in key.range:
        raise BadValue(key.range.describe(), out, type_error=False)
    return out


def from_text(key: Key, raw: str) -> Any:
    """Command-line text as the value ``check`` takes: strings verbatim (a path such as
    "1e3" stays a string), null words for nullable keys, numbers as Python reads them
    ("1e-4" is a number, unlike in YAML 1.1), anything else as YAML ("[1, 2]")."""
    if key.nullable and raw.strip().lower() in NULL_WORDS:
        return None
    if key.kind is str:
        return raw
    if key.kind is bool:
        b = parse_bool(raw)
        return raw if b is None else b
    if key.kind in (int, float):
        for cast in (int, float):
            try:
                return cast(raw)
            except ValueError:
                pass
    try:
        return yaml.load(raw, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except (yaml.YAMLError, _YAMLRefused, RecursionError):
        return raw


def parse_text(key: Key, raw: Any) -> Any:
    """``check`` of a value that may still be command-line text (a string for a
    non-string key): what trigger and poison parameters given from Python go through."""
    return check(key, from_text(key, raw) if isinstance(raw, str) else raw)


# --------------------------------------------------------------------------- argparse


def argparse_type(key: Key) -> Callable[[str], Any]:
    """An argparse ``type=`` that runs ``check``; a bad value reads
    "argument --x: must be > 0, got -1" (``ArgParser`` shortens it to one line)."""

    def parse(raw: str) -> Any:
        try:
            return check(key, from_text(key, raw))
        except BadValue as e:
            if e.type_error:
                raise argparse.ArgumentTypeError(f"expected {e.must}, got {quote(raw)}") from None
            raise argparse.ArgumentTypeError(f"must be {e.must}, got {cut(raw)}") from None

    parse.__name__ = key.kind.__name__
    return parse


class ArgParser(argparse.ArgumentParser):
    """argparse whose errors (a bad flag or value) are one-line ``UserError``s, not usage dumps."""

    def error(self, message: str):  # type: ignore[override]
        # "argument --lr: must be > 0, got -1" -> "--lr must be > 0, got -1"
        m = re.match(r"argument (\S+): (must be .*)", message)
        raise UserError(f"{m.group(1)} {m.group(2)}" if m else f"{message} (see --help)")


def add_keys_to_argparser(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    keys: dict[str, Key],
    show_choices: bool = True,
    show_defaults: bool = True,
) -> None:
    """One ``--name`` option per key: its default, help and a ``type=`` that checks it.
    ``show_choices=False``: the usage names the value (``--variant VARIANT``) instead of
    listing the choices (they are still enforced). ``show_defaults=False``: the help does not
    print the default (options whose default is another's, e.g. each poison's own)."""
    for name, key in keys.items():
        help_ = _help_with_default(key) if show_defaults else key.help.replace("%", "%%") + "%(default).0s"
        if key.flag:
            parser.add_argument(f"--{name}", action="store_true", default=key.default, help=help_)
            continue
        choices = list(key.choices) if key.choices is not None and show_choices else None
        parser.add_argument(f"--{name}", type=argparse_type(key), default=key.default, choices=choices, help=help_)


def _help_with_default(key: Key) -> str:
    """The key's help with its default said once: ``(default: X)`` appended, unless the help
    says its default itself (``(default: the repository)``, ``(default resnet18)``) or there
    is nothing to say (a flag, which is off unless given; a ``None`` default, which the help
    explains). Either way the help holds ``%(default)``, so argparse's
    ArgumentDefaultsHelpFormatter adds no second one."""
    text = key.help.replace("%", "%%")
    if "(default" in text or key.flag or key.default is None:
        return text + "%(default).0s"  # prints nothing
    return f"{text} (default: %(default)s)".lstrip()


# --------------------------------------------------------------------------- shared declarations

# the ranges options share, declared once (an option with its own bounds declares a Range of its own)
FINITE, POSITIVE, NONNEG, GT0, FRACTION = Range(), Range(1), Range(0), Range(0, low_open=True), Range(0, 1)
# a class-balanced subset of CIFAR-10 needs one image per class at least; other datasets are not
# held to their class count (the tiny Tiny-ImageNet runs of the tests poison 10 of 200 classes)
SUBSET = Range(10)
# --poison clean's class-balanced subset (train.py, purification.py): the draw poison.py --subset makes
CLEAN_SUBSET = Key(None, "--poison clean only: class-balanced subset of N images", int, True, range=SUBSET)
SUBSET_SEED = Key(0, "seed of the --subset draw (poison.py --subset uses 0)")
DEVICE = Key("auto", "auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
DOWNLOAD = Key(None, "fetch CIFAR-10 when missing (default: on)", bool, nullable=True)
PRECISION = Key(
    "auto",
    "auto: bf16 where this device runs it natively and its effect on this computation is measured small, "
    "else fp32 (README, Precision); fp32 | bf16: as asked",
    choices=("auto", "fp32", "bf16"),
)
BF16 = Key(None, "older spelling of --precision: true = bf16, false = fp32", bool, nullable=True)


# ---------------------------------------------------------------- YAML configuration
# YAML configuration with command-line overrides, in BackdoorBench v1's style.
#
# ``python attack/<name>.py --yaml_path config/<name>/cifar10.yaml --pratio 0.05``:
# values come from the built-in defaults, then the YAML file, then ``--overlay`` files,
# then ``--key value`` options. Every key is typed by its declaration; an unknown key or a
# value of the wrong type is a ``UserError`` naming it and listing the valid keys.
#
# Overlay files (e.g. ``config/dataelixir_cpu.yaml``) are shared by all attacks, so a key
# that belongs to some other attack (``aux_epochs`` for BadNets) is ignored for this one;
# a key no attack knows is still an error.


def coerce(name: str, key: Key, value: Any, valid: dict[str, Key], source: str = "") -> Any:
    """Check and cast ``value`` (already YAML-typed) for key ``name`` (``utils.options.check``),
    naming ``source`` (the file or --option it came from) in the error."""
    where = f" in {source}" if source else ""
    try:
        return check(key, value)
    except BadValue as e:
        if e.type_error:
            raise UserError(
                f"{name}{where}: expected {e.must}, got {quote(value)}; valid keys: {', '.join(sorted(valid))}"
            ) from None
        raise UserError(f"{name}{where}: must be {e.must}, got {quote(e.value)}") from None


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


class _YAMLRefused(Exception):
    """A YAML document ``_StrictLoader`` refuses (its message names what and where)."""


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML keeps the last
    silently) and a document of more than ``MAX_YAML_VALUES`` values once its aliases are
    expanded (a "billion laughs" bomb) or whose alias refers to the collection holding it."""

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            _count_values(node, {}, set())
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _YAMLRefused(f"key {quote(key)} is given twice (lines {seen[key]} and {line}); keep one")
                seen[key] = line
            except TypeError:  # an unhashable key: the base class refuses it
                pass
        return super().construct_mapping(node, deep=deep)


def _count_values(node: yaml.Node, memo: dict[int, int], open_: set[int]) -> int:
    """The values under ``node`` with aliases expanded, each shared node counted once per use
    but walked once; ``_YAMLRefused`` over ``MAX_YAML_VALUES`` or on an alias cycle."""
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in open_:
        raise _YAMLRefused(f"line {node.start_mark.line + 1}: an alias refers to the collection holding it")
    open_.add(id(node))
    children = node.value if isinstance(node, yaml.SequenceNode) else ()
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    total = 1
    for child in children:
        total += _count_values(child, memo, open_)
        if total > MAX_YAML_VALUES:
            raise _YAMLRefused(
                f"holds more than {MAX_YAML_VALUES} values once its aliases are expanded (an alias bomb?); "
                "a configuration holds a few dozen"
            )
    open_.discard(id(node))
    memo[id(node)] = total
    return total


def load_yaml_file(path: str | Path, what: str = "YAML configuration") -> dict[str, Any]:
    """The mapping a YAML file holds, read safely (no code, no Python objects) and strictly: a
    repeated key, a file over ``MAX_YAML_BYTES``, a document of more than ``MAX_YAML_VALUES``
    values (aliases expanded) or one that is not a mapping is a one-line ``UserError``."""
    path = Path(path)
    if path.is_file() and path.stat().st_size > MAX_YAML_BYTES:
        raise UserError(
            f"{what} {path} is {path.stat().st_size} bytes, more than a configuration holds (at most {MAX_YAML_BYTES})"
        )
    try:
        data = yaml.load(read_text_file(path, what), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except _YAMLRefused as e:
        raise UserError(f"{path}: {e}") from None
    except RecursionError:
        raise UserError(f"{path}: invalid YAML (nested too deeply)") from None
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


class _ConfigParser(ArgParser):
    """The attack scripts' parser: a missing value reads "--x needs a value"."""

    def error(self, message: str):  # type: ignore[override]
        m = re.match(r"argument (--\w+): expected one argument", message)
        if m:
            raise UserError(f"{m.group(1)} needs a value")
        super().error(message)


def config_parser(prog: str, keys: dict[str, Key]) -> ArgParser:
    """argparse for ``FIXED_OPTIONS`` and one ``--key value`` per configuration key.

    Key values stay text here: they are checked by ``coerce`` once the YAML and overlays
    they override are read, so an error names the option it came from."""
    parser = _ConfigParser(prog=prog, add_help=False, allow_abbrev=False)
    parser.add_argument("-h", "--help", action="store_true")
    for name in ("yaml_path", "save_folder_name", "work_dir", "stop_after"):
        parser.add_argument(f"--{name}")
    parser.add_argument("--overwrite", nargs="?", const=True, default=False)
    parser.add_argument("--overlay", action="append", default=[])
    for name in keys:
        parser.add_argument(f"--{name}", default=argparse.SUPPRESS)
    return parser


def _refuse_leftover(extras: list[str], keys: dict[str, Key]) -> None:
    """One line for the first argument argparse did not take: an unknown option or a stray value."""
    arg = extras[0]
    if not arg.startswith("--"):
        raise UserError(f"unexpected argument {quote(arg)}; options look like --key value (see --help)")
    name = arg[2:].partition("=")[0]
    raise UserError(f"unknown option --{cut(name)}; valid keys: {', '.join(sorted([*FIXED_OPTIONS, *keys]))}")


def _merge_overlays(
    cfg: dict[str, Any], overlays: list[str], keys: dict[str, Key], known_elsewhere: set[str]
) -> tuple[list[Path], dict[str, list[str]]]:
    """Apply each ``--overlay`` file in order; keys of other attacks are skipped and reported."""
    paths: list[Path] = []
    ignored: dict[str, list[str]] = {}
    for o in overlays:
        op = resolve_path(o, "overlay file")
        paths.append(op)
        for k, v in load_yaml_file(op).items():
            if k in keys:
                cfg[k] = coerce(k, keys[k], v, keys, str(op))
            elif k in known_elsewhere:
                ignored.setdefault(str(op), []).append(k)
            else:
                valid = sorted(set(keys) | set(known_elsewhere))
                raise UserError(f"unknown key {quote(k)} in {op}; valid keys: {', '.join(valid)}")
    return paths, ignored


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
    ns, extras = config_parser(prog, keys).parse_known_args([str(a) for a in argv])
    if ns.help:
        print(help_text(prog, keys))
        raise SystemExit(0)
    if extras:
        _refuse_leftover(extras, keys)
    yaml_arg = ns.yaml_path or default_yaml
    if yaml_arg is None:
        raise UserError("--yaml_path is required (e.g. --yaml_path config/badnet/cifar10.yaml)")
    yaml_path = resolve_path(yaml_arg, "YAML configuration")
    cfg = {k: key.default for k, key in keys.items()}
    from_yaml = load_yaml_file(yaml_path)
    for k, v in from_yaml.items():
        if k not in keys:
            raise UserError(f"unknown key {quote(k)} in {yaml_path}; valid keys: {', '.join(sorted(keys))}")
        cfg[k] = coerce(k, keys[k], v, keys, str(yaml_path))
    overlays, ignored = _merge_overlays(cfg, ns.overlay, keys, known_elsewhere)
    for k in keys:
        if k in ns:
            cfg[k] = coerce(k, keys[k], from_text(keys[k], getattr(ns, k)), keys, f"--{k}")
    overwrite = ns.overwrite
    if overwrite is not True and overwrite is not False:
        overwrite = coerce(
            "overwrite",
            FIXED_OPTIONS["overwrite"],
            from_text(FIXED_OPTIONS["overwrite"], overwrite),
            {**FIXED_OPTIONS, **keys},
            "--overwrite",
        )
    stop_after = ns.stop_after
    if stop_after is not None:
        stop_after = coerce("--stop_after", FIXED_OPTIONS["stop_after"], stop_after, FIXED_OPTIONS)
    return cfg, RunArgs(
        yaml_path=yaml_path,
        save_folder_name=check_name(ns.save_folder_name or default_name, "--save_folder_name"),
        work_dir=ns.work_dir,
        overwrite=bool(overwrite),
        overlays=overlays,
        ignored=ignored,
        empty_yaml=not from_yaml,
        stop_after=stop_after,
    )


def dump_yaml(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
