"""Layers that point one way, read from the sources with `ast` (nothing is imported): the import graph of src/ has
no circle, counting every import (at the top, inside functions, under `if TYPE_CHECKING:`), so it has none without
the TYPE_CHECKING ones either; and the cost model and the planner (cost.py, budget.py) reach no module that imports
fastai or torch, so that they stay pure arithmetic that plans without a GPU stack."""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"


def imports_of(source: str, module: str, package: str) -> tuple[set[str], set[str]]:
    """(the package's modules that `module`'s source imports, the other top-level modules it imports), from every
    import statement in the file: relative ones resolved against `package`."""
    inner, outer = set(), set()

    def add(name: str) -> None:
        (inner if name.split(".")[0] == package else outer).add(name if name.split(".")[0] == package
                                                                 else name.split(".")[0])

    for node in ast.walk(ast.parse(source, module)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = package if node.level else (node.module or "")
            if node.level and node.module:
                base = f"{package}.{node.module}"
            if base == package:   # from . import x / from fattag import x: x is a module of the package
                inner.update(f"{package}.{alias.name}" for alias in node.names)
            else:
                add(base)
    return inner, outer


def import_graph(package_dir: Path, extra: dict[str, Path] | None = None) -> tuple[dict, dict]:
    """{module: the package's modules it imports} and {module: the other top-level modules it imports} for every
    module of the package in `package_dir` (the package itself for __init__.py), plus the `extra` scripts."""
    package = package_dir.name
    files = {(package if p.stem == "__init__" else f"{package}.{p.stem}"): p for p in package_dir.glob("*.py")}
    files.update(extra or {})
    inner, outer = {}, {}
    for name, path in files.items():
        inner[name], outer[name] = imports_of(path.read_text(), name, package)
        inner[name] = {m for m in inner[name] if m in files}   # `from fattag import name` of a non-module: no edge
    return inner, outer


def find_circle(graph: dict) -> list[str] | None:
    """One circle of the graph as [a, b, ..., a], or None when there is none (depth-first, three colours)."""
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def reachable(graph: dict, start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def project_graph():
    return import_graph(SRC / "fattag", {"run": SRC / "run.py"})


def test_the_import_graph_of_src_has_no_circle():
    """No circle among src/fattag/*.py and src/run.py, every import counted (TYPE_CHECKING and function-level too)."""
    inner, _ = project_graph()
    assert len(inner) > 25 and "fattag.cost" in inner["run"] and "fattag.budget" in inner["fattag.context"]
    assert find_circle(inner) is None, " -> ".join(find_circle(inner))


def test_cost_and_budget_reach_no_module_that_imports_fastai_or_torch():
    """cost.py and budget.py, and every fattag module they import (transitively), import neither fastai nor torch."""
    inner, outer = project_graph()
    for start in ("fattag.cost", "fattag.budget"):
        heavy = {m: outer[m] & {"fastai", "fastcore", "torch", "torchaudio"} for m in reachable(inner, start)}
        assert not any(heavy.values()), {m: h for m, h in heavy.items() if h}
    assert reachable(inner, "fattag.budget") == {"fattag.budget", "fattag.cost", "fattag.config", "fattag.stages"}
    # the check can fail: the steps do reach fastai (stage.py imports it), through context.py's Run as well
    assert "fastai" in outer["fattag.stage"] and "fattag.stage" in reachable(inner, "fattag.train")


def test_the_checker_finds_circles_through_type_checking_and_function_imports(tmp_path):
    """The parser behind the two tests above sees a circle closed by a TYPE_CHECKING import, by an import inside a
    function and by `from . import`, and passes a package without one."""
    def package(name: str, files: dict[str, str]) -> Path:
        root = tmp_path / name
        root.mkdir()
        for file, text in {"__init__.py": "", **files}.items():
            (root / file).write_text(textwrap.dedent(text))
        return root

    typing_only = package("pkga", {"a.py": "from .b import x\n", "b.py": """\
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from pkga.a import y
        x = 1
        """})
    late = package("pkgb", {"a.py": "import pkgb.b\n", "b.py": "def f():\n    from . import c\n",
                            "c.py": "from .a import z\nimport numpy\n"})
    acyclic = package("pkgc", {"a.py": "from .b import x\nfrom . import c\n", "b.py": "from .c import y\n",
                               "c.py": "import torch.nn\n"})
    assert find_circle(import_graph(typing_only)[0]) == ["pkga.a", "pkga.b", "pkga.a"]
    late_inner, late_outer = import_graph(late)
    assert find_circle(late_inner) == ["pkgb.a", "pkgb.b", "pkgb.c", "pkgb.a"] and late_outer["pkgb.c"] == {"numpy"}
    inner, outer = import_graph(acyclic)
    assert find_circle(inner) is None and reachable(inner, "pkgc.a") == {"pkgc.a", "pkgc.b", "pkgc.c"}
    assert outer["pkgc.c"] == {"torch"}
