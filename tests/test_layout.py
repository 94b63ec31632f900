"""The package's layout rules, read from the source: the core is method-agnostic, methods do not import each other,
no module imports another's private names, and no class grows past 300 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fx_adapters"
MODULES = sorted(PACKAGE.rglob("*.py"))


def dotted(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module imported, names imported from it) for every import in ``path``, relative ones resolved."""
    package = dotted(path).split(".") if path.name == "__init__.py" else dotted(path).split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((module, [alias.name for alias in node.names]))
    return found


def imported_modules(path: Path) -> set[str]:
    """Every fx_adapters module ``path`` imports (``from . import x`` counts as importing ``x``)."""
    modules = set()
    for module, names in imports(path):
        modules.add(module)
        modules.update(f"{module}.{name}" for name in names)
    return {m for m in modules if m.startswith("fx_adapters")}


def test_the_rule_reader_resolves_relative_imports():
    modules = imported_modules(PACKAGE / "road" / "model.py")
    assert "fx_adapters.graph.capture" in modules and "fx_adapters.road.checkpoint" in modules


@pytest.mark.parametrize("path", [p for p in MODULES if dotted(p).startswith("fx_adapters.graph")],
                         ids=lambda p: dotted(p))
def test_the_graph_core_imports_no_method_and_not_the_cli(path):
    assert not {m for m in imported_modules(path)
                if m.startswith(("fx_adapters.road", "fx_adapters.xlora", "fx_adapters.cli"))}


@pytest.mark.parametrize("method, other", [("road", "xlora"), ("xlora", "road")])
def test_a_method_folder_never_imports_the_other_method(method, other):
    offenders = {dotted(p): sorted(m for m in imported_modules(p) if m.startswith(f"fx_adapters.{other}"))
                 for p in MODULES if dotted(p).startswith(f"fx_adapters.{method}")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_module_imports_a_private_name_of_another():
    private = {dotted(p): [f"{module}.{name}" for module, names in imports(p) for name in names
                           if module.startswith("fx_adapters") and name.startswith("_") and not name.startswith("__")]
               for p in MODULES}
    assert {k: v for k, v in private.items() if v} == {}


def test_no_class_is_longer_than_300_lines():
    long = {f"{dotted(p)}.{node.name}": node.end_lineno - node.lineno + 1 for p in MODULES
            for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 300}
    assert long == {}
