"""The package's layers stay one-way: no import cycles between its modules.

Every import counts, at the top of a module or inside a function (a deferred
import only hides a cycle until the function runs); imports under
``if TYPE_CHECKING:`` never run and do not count.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import nasar_zarr

PACKAGE = Path(nasar_zarr.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``)."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node`` that can run (at any depth)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        elif _type_checking(child):
            for other in child.orelse:  # the else branch of TYPE_CHECKING runs
                yield from _import_nodes(ast.Module(body=[other], type_ignores=[]))
        else:
            yield from _import_nodes(child)


def _imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports, at import time or when a function runs."""
    return _imports_of(path.read_text(), _module_name(path), package=path.name == "__init__.py")


def _imports_of(text: str, module: str, *, package: bool = False) -> set[str]:
    """Modules (and names) of ``nasar_zarr`` the code ``text`` of ``module`` imports."""
    anchor_of = module if package else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in _import_nodes(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = anchor_of.rsplit(".", node.level - 1)[0] if node.level > 1 else anchor_of
                base = f"{anchor}.{base}" if base else anchor
            if base.startswith("nasar_zarr"):
                submodules = {f"{base}.{a.name}" for a in node.names}
                # ``from . import x`` imports the package only to reach its submodule x.
                found |= submodules if base == "nasar_zarr" else {base} | submodules
        else:
            found.update(a.name for a in node.names if a.name.startswith("nasar_zarr"))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {m for m in _imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a path that ends where it starts), or None."""
    done: set[str] = set()
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        if name in stack:
            return stack[stack.index(name) :] + [name]
        if name in done:
            return None
        stack.append(name)
        for dep in sorted(graph[name]):
            found = visit(dep)
            if found:
                return found
        stack.pop()
        done.add(name)
        return None

    for name in sorted(graph):
        found = visit(name)
        if found:
            return found
    return None


def test_imports_inside_functions_are_seen():
    # A deferred import is an edge; one under TYPE_CHECKING is not (its else branch is).
    code = (
        "from typing import TYPE_CHECKING\n"
        "import numpy\n"
        "if TYPE_CHECKING:\n    from .cube import open_cube\n"
        "else:\n    from .store import open_group\n"
        "def f():\n    if True:\n        from .api import execute\n"
        "class C:\n    def m(self):\n        import nasar_zarr.verify\n"
        "        from .. import errors\n        from ..source import tar\n"
    )
    assert _imports_of(code, "nasar_zarr.source.npz") == {
        "nasar_zarr.source.store",
        "nasar_zarr.source.store.open_group",
        "nasar_zarr.source.api",
        "nasar_zarr.source.api.execute",
        "nasar_zarr.verify",
        "nasar_zarr.errors",
        "nasar_zarr.source",
        "nasar_zarr.source.tar",
    }
    assert _imports_of(code, "nasar_zarr.plan") >= {"nasar_zarr.api", "nasar_zarr.store"}
    assert "nasar_zarr.cube" not in _imports_of(code, "nasar_zarr.plan")


def test_cycle_is_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    graph = _graph()
    assert not any("nasar_zarr" in deps for deps in graph.values())  # __init__ only re-exports
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
    # The layers this test holds in place.
    assert "nasar_zarr.execute" not in graph["nasar_zarr.plan"]
    assert not graph["nasar_zarr.plan"] - {"nasar_zarr.source", "nasar_zarr.errors"}
    assert "nasar_zarr.execute" not in graph["nasar_zarr.append"]
    assert "nasar_zarr.append" not in graph["nasar_zarr.execute"]
    # source is the bottom layer: it imports nothing of the package but schema, errors
    # and the byte seam (its tar reads go through it), which sits below it.
    outside = {
        dep
        for name, deps in graph.items()
        if name.startswith("nasar_zarr.source")
        for dep in deps
        if not dep.startswith("nasar_zarr.source")
    }
    assert outside == {"nasar_zarr.schema", "nasar_zarr.errors", "nasar_zarr.ranges"}
    assert graph["nasar_zarr.ranges"] == {
        "nasar_zarr.errors",
        "nasar_zarr.options",
        "nasar_zarr.httpranges",
    }
    assert graph["nasar_zarr.options"] == {"nasar_zarr.errors"}
    assert graph["nasar_zarr.httpranges"] == set()  # the HTTP transport knows nothing of ours


def test_plan_execute_runs_the_writer_handed_down(monkeypatch):
    # plan.py cannot import the writing side (it sits above); the package hands it down.
    import nasar_zarr as nz
    from nasar_zarr import plan

    assert plan._EXECUTOR == [nz.execute]
    plan.register_executor(nz.execute)  # the same writer again: nothing changes
    assert plan._EXECUTOR == [nz.execute]
    with pytest.raises(RuntimeError) as err:
        plan.register_executor(lambda p, **kwargs: None)
    assert str(err.value) == (
        f"ConversionPlan.execute already runs {nz.execute.__module__}.{nz.execute.__qualname__};"
        " call your writer as writer(plan) instead"
    )
    assert plan._EXECUTOR == [nz.execute]

    empty = plan.assemble_plan("src", "dest", plan.ConvertOptions(), [], [], [])
    monkeypatch.setattr(plan, "_EXECUTOR", [])
    with pytest.raises(RuntimeError) as err:
        empty.execute(workers=0)
    assert str(err.value) == (
        "ConversionPlan.execute has no writer: import nasar_zarr (its __init__ registers"
        " nasar_zarr.execute.execute), or call nasar_zarr.execute(plan)"
    )
