"""The docs name what exists, and every script's --help explains every option.

* Every repository path a doc (README.md, docs/*.md, BENCHMARKS.md) or a config comment
  names exists; paths under the outputs' folders, with placeholders, and under
  ``../shared`` when it is absent are not checked.
* Every section a doc names exists: markdown links' ``#anchor`` (GitHub's heading slugs) and
  mentions such as ``README, Precision`` or ``BENCHMARKS.md, "Speed options"``.
* Every option of train.py, purification.py, train_diffusion.py, poison.py and demo.py has a
  help text, and no option's help prints its default twice.
"""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest

import demo
import purification
import train
from utils.demo.pipeline import build_commands

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]
CONFIGS = sorted(p for p in (REPO / "config").rglob("*") if p.suffix in (".yaml", ".yml"))
# folders the scripts write (git-ignored): their paths name outputs, not repository files
OUTPUTS = ("runs", "data", "diff_ckpt", "poisoned_data", "purified_data", "record", "resource", "bench/results")
EXTS = "py|md|yaml|yml|json|png|csv|txt|toml|cfg"
PATH = re.compile(r"(?<![\w./<>*-])((?:\.\./shared/|[A-Za-z_][\w-]*/)(?:[\w.<>*{}|+-]+/)*[\w.<>*{}|+-]*)")
TOP_FILE = re.compile(rf"(?<![\w./-])([A-Za-z_][\w-]*\.(?:{EXTS}))\b")
LINK = re.compile(r"\]\(([^)\s]+)\)")
CITED = re.compile(r"([\w./-]+)`?\s*§\s*\d")  # a document cited by section: RESEARCH_NOTES §4
SECTION = re.compile(
    r"\b(README(?:\.md)?|BENCHMARKS\.md|docs/\w+\.md), (?:\"([^\"]+)\"|([A-Z][\w-]*(?: [a-z][\w-]*)*))"
)


def _comments(path: Path) -> str:
    return "\n".join(line.split("#", 1)[1] for line in path.read_text().splitlines() if "#" in line)


def _texts() -> list[tuple[Path, str]]:
    return [(p, p.read_text()) for p in DOCS] + [(p, _comments(p)) for p in CONFIGS]


def _headings(doc: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    return [m.group(1).strip() for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)]


def _plain(heading: str) -> str:
    return re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading)


def _slugs(doc: Path) -> set[str]:
    """GitHub's anchors of ``doc``'s headings (lower case, punctuation dropped, spaces to
    hyphens, repeats numbered)."""
    seen: dict[str, int] = {}
    out = set()
    for h in _headings(doc):
        slug = re.sub(r"[^\w\- ]", "", _plain(h).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _rel(doc: Path) -> str:
    return str(doc.relative_to(REPO)) if doc.is_relative_to(REPO) else doc.name


def _checked(rel: str) -> bool:
    """Whether ``rel`` (relative to the repository) names a repository file to check."""
    if any(c in rel for c in "<>*{}|") or rel.startswith(tuple(o + "/" for o in OUTPUTS)):
        return False
    last = rel.rsplit("/", 1)[-1]
    if "." in last.strip(".") and not re.fullmatch(rf".*\.(?:{EXTS})", last):
        return False  # a dotted Python name (utils/runtime.compiled)
    if rel.startswith("../shared/"):
        return (REPO.parent / "shared").is_dir()
    return (REPO / rel.split("/")[0]).exists() or rel.split("/")[0] in {"utils", "config", "docs", "tests", "bench"}


def _names(text: str) -> set[str]:
    """The paths ``text`` names as this repository's: not in a URL, and not another
    repository's (a path right after ``<name>'s`` or ``its``: BackdoorBench's config/...)."""
    found = set()
    for m in [*PATH.finditer(text), *TOP_FILE.finditer(text)]:
        before = text[max(0, m.start() - 40) : m.start()]
        if re.search(r"://\S*$", before) or re.search(r"(?:'s|\bits) [`(]?$", before):
            continue
        found.add(m.group(1).rstrip(".,;:"))
    return found


def test_named_repository_paths_exist():
    missing = []
    for doc, text in _texts():
        for name in sorted(_names(text)):
            if _checked(name.rstrip("/")) and not (REPO / name.rstrip("/")).exists():
                missing.append(f"{_rel(doc)}: {name}")
        for m in CITED.finditer(text):  # a document cited by section is cited by its path
            name = m.group(1)
            if not (re.fullmatch(r"[A-Z][A-Z0-9]*_[A-Z0-9_]+", name) or name.endswith(".md")):
                continue  # a paper's section (ECLIPSE §6)
            if "/" not in name or (_checked(name) and not (REPO / name).exists()):
                missing.append(f"{_rel(doc)}: {m.group(0)} (cite the file by its path)")
    assert not missing, "docs name paths that do not exist:\n" + "\n".join(missing)


def test_links_and_their_anchors_exist():
    broken = []
    for doc in DOCS:
        for m in LINK.finditer(doc.read_text()):
            target = m.group(1)
            if "://" in target or target.startswith("mailto:"):
                continue
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists():
                broken.append(f"{_rel(doc)}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in _slugs(path):
                broken.append(f"{_rel(doc)}: {target} (no such section)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_named_sections_exist():
    missing = []
    for doc, text in _texts():
        for m in SECTION.finditer(text):
            name = m.group(1)
            target = REPO / ("README.md" if name.startswith("README") else name)
            section = (m.group(2) or m.group(3)).strip()
            titles = [_plain(h).lower() for h in _headings(target)]
            if not any(t.startswith(section.lower()) for t in titles):
                missing.append(f"{_rel(doc)}: {m.group(0)}")
    assert not missing, "docs name sections that do not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize(
    "line, check",
    [
        ("See `utils/nowhere.py`.", "test_named_repository_paths_exist"),
        ("Measured (RESEARCH_NOTES §4).", "test_named_repository_paths_exist"),
        ("See [it](README.md#no-such-section).", "test_links_and_their_anchors_exist"),
        ("See [it](nowhere.md).", "test_links_and_their_anchors_exist"),
        ('(README, "DataElixir at CPU scale")', "test_named_sections_exist"),
        ("(README, Nowhere at all)", "test_named_sections_exist"),
    ],
)
def test_the_checks_see_a_broken_reference(tmp_path, monkeypatch, line, check):
    """Each check catches what it is for, on a made-up doc (and passes without the line)."""
    doc = tmp_path / "X.md"
    (tmp_path / "README.md").write_text("# Title\n")
    monkeypatch.setattr(f"{__name__}.DOCS", [doc])
    monkeypatch.setattr(f"{__name__}.CONFIGS", [])
    doc.write_text("See `utils/data.py`, [it](README.md#title) and (README, Precision).\n")
    globals()[check]()
    doc.write_text(line + "\n")
    with pytest.raises(AssertionError):
        globals()[check]()


def test_the_docs_demo_commands_are_what_make_runs(tmp_path):
    """``make demo`` / ``make smoke`` as the docs spell them are the Makefile's commands, and
    a ``python demo.py ... --plan`` the docs show (with its number of steps) plans one of them."""
    make = (REPO / "Makefile").read_text()
    targets = {}
    for target in ("demo", "smoke"):
        m = re.search(rf"^{target}:.*\n\t\$\(PYTHON\) demo\.py(.*)$", make, re.M)
        assert m, f"Makefile: no `{target}` target running demo.py"
        targets[target] = m.group(1).split()
    seen = 0
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(r"`make (demo|smoke)`\**\s*\(?=?\s*`python demo\.py([^`]*)`", text):
            assert m.group(2).split() == targets[m.group(1)], f"{_rel(doc)}: {m.group(0)}"
            seen += 1
        for m in re.finditer(r"`python demo\.py([^`]*) --plan`(?:[^(`]*\((\d+) steps\))?", text):
            args = m.group(1).split()
            assert args in targets.values(), f"{_rel(doc)}: {m.group(0)} plans what no make target runs"
            if m.group(2):
                parsed = demo.parse_args([*args, "--work_dir", str(tmp_path)])
                variants = demo.parse_defenses(parsed.defenses, parsed.baselines)
                steps = build_commands(parsed, demo.parse_poisons(parsed.poisons), variants)
                assert len(steps) == int(m.group(2)), f"{_rel(doc)}: {m.group(0)}: the plan has {len(steps)} steps"
            seen += 1
    assert seen >= 3


@pytest.mark.parametrize("script", ["train_pure", "train_poisoned", "purification"])
def test_missing_input_hints_name_the_work_dir(script, tmp_path, capsys):
    """The command a missing-input error suggests makes the file where this run looks for it."""
    work = tmp_path / "my work"
    main, flags = {
        "train_pure": (train.main, ["--pure"]),
        "train_poisoned": (train.main, []),
        "purification": (purification.main, []),
    }[script]
    with pytest.raises(SystemExit):
        main(["--poison", "EM", *flags, "--work_dir", str(work), "--device", "cpu"])
    err = capsys.readouterr().err
    assert "not found" in err and f"--work_dir '{work}'`" in err, err


# --------------------------------------------------------------------------- --help

SCRIPTS = {"train": "parse_args", "purification": "parse_args", "train_diffusion": "parse_args"}
SCRIPTS |= {"poison": "build_parser", "demo": "parse_args"}


class _Parsed(Exception):
    pass


def _parser(script: str, monkeypatch) -> argparse.ArgumentParser:
    """The argparse parser ``script`` builds (caught as it parses)."""
    module = importlib.import_module(script)

    def catch(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    try:
        made = getattr(module, SCRIPTS[script])() if SCRIPTS[script] == "build_parser" else module.parse_args([])
    except _Parsed as e:
        return e.args[0]
    return made


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_option_has_help_and_its_default_once(script, monkeypatch):
    parser = _parser(script, monkeypatch)
    options = [a for a in parser._actions if a.option_strings and a.option_strings[0] != "-h"]
    assert options
    bare = []
    for action in options:
        text = re.sub(r"\(default: [^)]*\)|%\(default\)[.\d]*s", "", action.help or "").strip()
        if not text:
            bare.append(action.option_strings[0])
    assert not bare, f"{script}.py: options without a help text: {bare}"
    # each option's entry in --help (its wrapped lines joined) says its default at most once
    entries = re.split(r"\n(?=  -)", parser.format_help())
    doubled = [" ".join(e.split()) for e in entries if e.count("(default:") > 1]
    assert not doubled, f"{script}.py: defaults printed twice: {doubled}"
