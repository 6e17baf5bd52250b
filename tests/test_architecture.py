"""The package's parts and the one way their imports run (docs/development.md draws it).

Every import of every module counts, at any depth (a function's lazy import, a type hint's
``TYPE_CHECKING`` import), read from the source with ``ast``.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "nwave_param"
FACADE = {"nwave_param", "nwave_param.__main__", "nwave_param.loss"}  # the public paths: may import any part
BASE = {"spec", "layout", "functional", "errors", "_memo", "blocks", "description", "sharing"}
# each part -> the parts it may import (itself included); the base is the root's own modules
MAY_IMPORT = {
    "base": {"base"},
    "_engine": {"base", "_engine"},
    "core": {"base", "_engine", "core"},
    "checkpoints": {"base", "_engine", "core", "checkpoints"},
    "placement": {"base", "core", "placement"},
    "demo": {"base", "core", "placement", "checkpoints", "demo"},
}
# the one import out of its part: the command line's `demo` command runs the demo, when it runs
ALLOWED = {("nwave_param.checkpoints.commands", "nwave_param.demo")}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str | None:
    if module in FACADE:
        return None
    first = module.split(".")[1]
    return "base" if first in BASE else first


def imports_of(path: pathlib.Path, module: str) -> set[str]:
    """The nwave_param modules ``path`` imports, wherever in it (``from a import b`` counts ``a.b``
    when that is a module, else ``a``)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                if (base, alias.name) != ("nwave_param", "__version__"):  # the version: no lazy name behind it
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {name for name in found if name in MODULES}


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}
GRAPH = {module: imports_of(path, module) - {module} for module, path in MODULES.items()}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m not in FACADE))
def test_a_module_imports_only_its_own_part_and_those_below(module):
    part = part_of(module)
    upward = sorted(
        target for target in GRAPH[module]
        if target not in FACADE and part_of(target) not in MAY_IMPORT[part] and (module, target) not in ALLOWED
    )
    assert not upward, f"{module} ({part}) imports {upward}, above it: imports run {MAY_IMPORT[part]} only"
    assert not GRAPH[module] & FACADE, f"{module} imports the facade ({GRAPH[module] & FACADE}): import what it needs from its home"


def test_no_import_cycle():
    seen, on_path, cycles = set(), [], []

    def visit(module):
        if module in on_path:
            cycles.append(on_path[on_path.index(module):] + [module])
            return
        if module in seen:
            return
        seen.add(module)
        on_path.append(module)
        for target in sorted(GRAPH[module] - FACADE):
            if not (module.startswith(target + ".") and MODULES[target].name == "__init__.py"):  # a package's own __init__ runs first
                visit(target)
        on_path.pop()

    for module in sorted(MODULES):
        visit(module)
    assert not cycles, cycles


def test_every_part_says_what_it_holds_and_what_it_may_import():
    for part in MAY_IMPORT.keys() - {"base"}:
        doc = ast.get_docstring(ast.parse((PACKAGE / part / "__init__.py").read_text())) or ""
        assert "import" in doc.lower() and len(doc) > 200, part
