"""The import graph of src/tunelab has no cycle — counting imports inside functions, which hide a cycle from Python
at import time but still tie the modules together (issue 19: errors in a leaf module, atomic I/O in a leaf module,
loading runs and quantized bases in one layer above models and quant)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def module_map(root: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is_package) for every .py file under ``root``."""
    mods = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        mods[".".join(parts)] = (path, is_pkg)
    return mods


def _targets(module: str, is_pkg: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".") if is_pkg else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [prefix] + [f"{prefix}.{a.name}" for a in node.names]  # `from pkg import submodule` imports it too


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports anywhere in its body (functions included). Importing
    ``a.b.c`` also runs ``a`` and ``a.b``: those packages are edges too (except the importer's own parents)."""
    mods = {m: v for m, v in module_map(root).items() if m == package or m.startswith(package + ".")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, (path, is_pkg) in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for target in _targets(module, is_pkg, node):
                parts = target.split(".")
                for k in range(1, len(parts) + 1):
                    dep = ".".join(parts[:k])
                    if dep in mods and dep != module and not module.startswith(dep + "."):
                        graph[module].add(dep)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _describe(graph: dict[str, set[str]], component: list[str]) -> str:
    members = set(component)
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & members))}" for m in component)


def test_tunelab_has_no_import_cycle():
    graph = import_graph(SRC, "tunelab")
    assert len(graph) > 50  # the walk saw the package
    found = cycles(graph)
    assert not found, "import cycles (imports inside functions count):\n" + "\n".join(
        _describe(graph, c) for c in found)


def test_leaf_modules_import_nothing_of_tunelab():
    """errors, files and schema sit under everything else."""
    graph = import_graph(SRC, "tunelab")
    assert graph["tunelab.errors"] == set()
    assert graph["tunelab.files"] <= {"tunelab.errors"}
    assert graph["tunelab.schema"] <= {"tunelab.errors"}


def test_models_and_quant_do_not_load_runs():
    graph = import_graph(SRC, "tunelab")
    for module in ("tunelab.models", "tunelab.quant.base", "tunelab.quant.model", "tunelab.rundir"):
        assert "tunelab.loading" not in graph[module], module
    assert "tunelab.quant.base" not in graph["tunelab.models"]


@pytest.mark.parametrize("hidden", [False, True])
def test_the_walk_finds_a_cycle(tmp_path: Path, hidden: bool):
    """The oracle can fail: a two-module cycle, closed at module level or only inside a function, and one closed
    through a package's __init__."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import g\n\ndef f():\n    return g()\n")
    body = "def g():\n    from pkg.a import f\n    return f\n" if hidden else "from pkg import a\n\ndef g():\n    return a\n"
    (pkg / "b.py").write_text(body)
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.c import h\n")
    (pkg / "sub" / "c.py").write_text("def h():\n    from pkg.d import k\n    return k\n")
    (pkg / "d.py").write_text("from .sub import c\nk = 1\n")
    graph = import_graph(tmp_path, "pkg")
    found = cycles(graph)
    assert ["pkg.a", "pkg.b"] in found
    assert ["pkg.d", "pkg.sub", "pkg.sub.c"] in found
