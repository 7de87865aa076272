"""genrun's modules import one way: cli -> launch -> engine -> {step, gen, tasks, sinks, checkpoint,
parallel}, with nothing below reaching back up, and reports never reaching training code.

The graph comes from parsing the source, so an import inside a function (a lazy one) counts as
much as one at the top. Imports under `if TYPE_CHECKING:` never run and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "genrun"


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of the package at `root` (a package is its __init__)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _type_checking_only(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those that only a type checker runs."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        if isinstance(node, ast.If) and _type_checking_only(node):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return found


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The module `name` runs: itself, or for `pkg.mod.attr` the longest prefix that is a module."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `module` imports (a name taken from a package counts as an import
    of the package, unless the name is a submodule)."""
    is_package = modules[module].name == "__init__.py"
    here = module if is_package else module.rpartition(".")[0]
    targets = set()
    for node in _import_nodes(ast.parse(modules[module].read_text(), str(modules[module]))):
        if isinstance(node, ast.Import):
            targets.update(_owner(alias.name, modules) for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            package = here.split(".")
            package = package[:len(package) - (node.level - 1)]
            base = ".".join([*package, *([base] if base else [])])
        for alias in node.names:
            full = f"{base}.{alias.name}"
            targets.add(full if full in modules else _owner(base, modules))
    return {t for t in targets if t is not None and t != module}


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = module_names(root)
    return {module: imports_of(module, modules) for module in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of imports as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _within(name: str, *tops: str) -> bool:
    return any(name == top or name.startswith(top + ".") for top in tops)


GRAPH = import_graph(PACKAGE)


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_sees_lazy_relative_and_package_imports():
    assert "genrun.engine" in GRAPH["genrun.launch"]
    assert "genrun.launch" in GRAPH["genrun.cli"]  # imported inside a function
    assert "genrun.gen.gen" in GRAPH["genrun.gen"]  # `from .gen import GeN`
    assert "genrun.gen" in GRAPH["genrun.engine"] or "genrun.gen" in GRAPH["genrun.step"]  # a class from a package
    assert "genrun.parallel" in GRAPH["genrun.engine"]  # `from genrun import parallel`: the submodule


@pytest.mark.parametrize("module,forbidden", [
    ("genrun.parallel", ("genrun.engine", "genrun.launch", "genrun.cli", "genrun.tasks", "genrun.step")),
    ("genrun.engine", ("genrun.launch", "genrun.cli")),
    ("genrun.step", ("genrun.engine", "genrun.launch", "genrun.cli")),
])
def test_lower_layers_do_not_reach_up(module, forbidden):
    bad = sorted(t for t in reachable(GRAPH, module) if _within(t, *forbidden))
    assert not bad, f"{module} imports (directly or through others) {bad}"


def test_gen_imports_nothing_of_genrun_outside_itself():
    bad = {m: sorted(t for t in targets if not _within(t, "genrun.gen"))
           for m, targets in GRAPH.items() if _within(m, "genrun.gen")}
    assert not any(bad.values()), bad


def test_reports_read_run_files_not_training_code():
    training = ("genrun.engine", "genrun.launch", "genrun.cli", "genrun.parallel", "genrun.step")
    for module in (m for m in GRAPH if _within(m, "genrun.report")):
        bad = sorted(t for t in reachable(GRAPH, module) if _within(t, *training))
        assert not bad, f"{module} reaches training code: {bad}"


def test_a_cycle_through_a_lazy_relative_import_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
                                      "def late():\n    from .. import c\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    graph = import_graph(pkg)
    assert graph["pkg.sub.b"] == {"pkg.c"}  # the TYPE_CHECKING import is not one
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("import pkg\n")
    assert find_cycle(import_graph(pkg)) is None
