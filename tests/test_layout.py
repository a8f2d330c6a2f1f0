"""The layout's rules (docs/ARCHITECTURE.md), checked on the source: a flat shared core of at
most 16 modules in utils/, no import cycle, imports at the top of library modules, package
__init__ files that only export, and no module over 600 lines or function over 100."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("utils", "models")
MAX_CORE_MODULES = 16
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100


def _source_files() -> list[Path]:
    """Every Python file of the project outside tests/ (library, scripts, attacks, benches)."""
    return sorted(p for p in REPO.rglob("*.py") if p.relative_to(REPO).parts[0] not in ("tests", "data", "runs"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _library_modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules ``path`` imports: ``from a.b import c`` counts a.b.c when that is a module, else a.b."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            out |= subs or ({node.module} & modules)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names} & modules
    return out


def test_at_most_16_modules_directly_in_utils():
    core = sorted(p.name for p in (REPO / "utils").glob("*.py") if p.name != "__init__.py")
    assert len(core) <= MAX_CORE_MODULES, core


def test_no_import_cycle():
    modules = _library_modules()
    graph = {m: _imports(p, set(modules)) for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join([*path[path.index(n) :], n])
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_library_imports_are_at_the_top():
    hidden = []
    for m, p in _library_modules().items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Import | ast.ImportFrom) and inner is not node:
                        names = (
                            [inner.module or ""] if isinstance(inner, ast.ImportFrom) else [a.name for a in inner.names]
                        )
                        if any(n.split(".")[0] in PACKAGES for n in names):
                            hidden.append(f"{m}:{inner.lineno}")
    assert not hidden, f"project imports inside functions: {hidden}"


def test_package_init_files_only_export():
    holding = []
    for pkg in PACKAGES:
        for init in (REPO / pkg).rglob("__init__.py"):
            defs = [n.name for n in ast.parse(init.read_text()).body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
            if defs:
                holding.append(f"{init.relative_to(REPO)}: {defs}")
    assert not holding, holding


def test_module_and_function_sizes():
    too_long = []
    for p in _source_files():
        text = p.read_text()
        rel = p.relative_to(REPO)
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{rel}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    assert not too_long, too_long
