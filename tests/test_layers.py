"""The package's layers stay one-way: no import cycles between its modules."""

from __future__ import annotations

import ast
from pathlib import Path

import nasar_zarr

PACKAGE = Path(nasar_zarr.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports when it is imported (not inside functions)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            if base.startswith("nasar_zarr"):
                submodules = {f"{base}.{a.name}" for a in node.names}
                # ``from . import x`` imports the package only to reach its submodule x.
                found |= submodules if base == "nasar_zarr" else {base} | submodules
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("nasar_zarr"))
    return found


def test_no_import_cycles():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {
        name: {m for m in _top_level_imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }
    assert not any("nasar_zarr" in deps for deps in graph.values())  # __init__ only re-exports
    done: set[str] = set()
    stack: list[str] = []

    def visit(name: str) -> None:
        if name in stack:
            cycle = stack[stack.index(name) :] + [name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        stack.append(name)
        for dep in sorted(graph[name]):
            visit(dep)
        stack.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    # The layers this test holds in place.
    assert "nasar_zarr.execute" not in graph["nasar_zarr.plan"]
    assert not graph["nasar_zarr.plan"] - {"nasar_zarr.source", "nasar_zarr.errors"}
    assert "nasar_zarr.execute" not in graph["nasar_zarr.append"]
    assert "nasar_zarr.append" not in graph["nasar_zarr.execute"]
