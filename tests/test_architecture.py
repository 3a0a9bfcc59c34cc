"""The package's shape: one-way layers, no import cycles, and function-level imports only with a reason.

Every import statement in ``qing/`` counts here: top-level, inside functions, and under
``TYPE_CHECKING``. The layer order itself is import-linter's contract in ``pyproject.toml``
(run here too, and by CI as ``lint-imports``).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "qing"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom, known: set[str]) -> list[str]:
    """The qing modules an ``ImportFrom`` names: ``from a import b`` is ``a.b`` when that is a module, else ``a``."""
    if node.level:
        package = module.split(".")
        if _modules()[module].name != "__init__.py":
            package = package[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    targets = []
    for alias in node.names:
        candidate = f"{base}.{alias.name}"
        targets.append(candidate if candidate in known else base)
    return targets


def import_statements(module: str, path: Path, known: set[str]) -> list[tuple[str, ast.stmt, bool]]:
    """``(imported qing module, statement, inside a function)`` for every import statement of a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(inner) for inner in ast.walk(node) if inner is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            targets = _resolve(module, node, known)
        else:
            continue
        for target in targets:
            if target == "qing" or target.startswith("qing."):
                found.append((target, node, id(node) in in_function))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {
        module: {target for target, _, _ in import_statements(module, path, known) if target != module}
        for module, path in modules.items()
    }


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one module (each one holds a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_qing_modules_counting_every_import_statement():
    graph = import_graph()
    assert "qing._factory" in graph and "qing.hub" in graph["qing._factory"]  # the graph is real
    assert strongly_connected(graph) == []


def test_no_qing_module_imports_the_root_package():
    """``import qing`` inside the package would import every layer, so it hides upward dependencies."""
    graph = import_graph()
    offenders = sorted(module for module, targets in graph.items() if "qing" in targets and module != "qing")
    assert offenders == []


def test_function_level_imports_of_qing_say_why():
    """A function-level import of a qing module is allowed only with a comment giving the reason."""
    modules = _modules()
    known = set(modules)
    silent = []
    for module, path in modules.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for target, node, in_function in import_statements(module, path, known):
            if not in_function:
                continue
            here, above = lines[node.lineno - 1], lines[node.lineno - 2] if node.lineno > 1 else ""
            if "#" not in here and not above.strip().startswith("#"):
                silent.append(f"{module}:{node.lineno} imports {target}")
    assert silent == []


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is not installed (test extra)")
def test_import_linter_contracts_are_kept():
    done = subprocess.run(["lint-imports"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in done.stdout


def test_docs_home_page_shows_the_layers_in_the_contracts_order():
    """The diagram on the docs home page is the import-linter contract, top to bottom."""
    import tomllib

    contract = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    page = (REPO / "docs" / "index.md").read_text(encoding="utf-8")
    block = page.split("## How qing is built", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    shown = [line.split("  ")[0].strip() for line in block.splitlines() if line.strip()]
    assert shown == contract["layers"]
