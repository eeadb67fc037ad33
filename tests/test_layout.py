"""The package's shape: no import cycles, imports only downward, files and functions of readable size.

Every ``import`` in ``jaxvit/`` counts, also those inside functions. A module's
level is that of its subpackage (or top-level module) in ``LEVELS``; it may
import from its own level or below.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jaxvit"
# Bottom to top, as jaxvit/__init__.py describes them.
LEVELS = {
    "jaxvit.sizes": 0,
    "jaxvit.variants": 0,
    "jaxvit.ops": 0,
    "jaxvit.compat": 0,
    "jaxvit.safety": 0,
    "jaxvit.schema": 1,
    "jaxvit.layers": 2,
    "jaxvit.model": 3,
    "jaxvit.features": 3,
    "jaxvit.checkpoints": 4,
    "jaxvit.families": 4,  # the formats in a family's home; its __init__ is level 0 (_level)
    "jaxvit.data": 4,
    "jaxvit.training": 5,
    "jaxvit.predict": 6,
    "jaxvit.visualize": 6,
    "jaxvit.summary": 6,
    "jaxvit.pack": 6,
    "jaxvit": 7,
}
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The jaxvit modules ``name`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("jaxvit"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxvit"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return {m for m in found if m in known and m != name}


def _level(module: str) -> int:
    if re.fullmatch(r"jaxvit\.families(\.\w+)?", module):
        return 0  # a family's __init__ is data: its sizes, which decode_variant reads
    while module not in LEVELS:
        module = module.rsplit(".", 1)[0]
    return LEVELS[module]


GRAPH = {name: _imports(name, path, set(_modules())) for name, path in _modules().items()}


def test_every_module_has_a_level() -> None:
    assert all(_level(m) >= 0 for m in GRAPH)


def test_imports_go_downward() -> None:
    upward = sorted(
        f"{a} -> {b}"
        for a, targets in GRAPH.items()
        for b in targets
        if _level(b) > _level(a) and not (a == "jaxvit" or a.endswith("__init__"))
    )
    assert upward == []


def test_no_import_cycles() -> None:
    # Package __init__ files re-export their own submodules; an edge into a package stands for its
    # __init__, which is not part of a cycle unless the submodule imports the package back.
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt == "jaxvit" or node.startswith(nxt + "."):
                continue  # a submodule importing its own package's names
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize("name", sorted(_modules()))
def test_file_and_functions_are_small(name: str) -> None:
    path = _modules()[name]
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_FILE_LINES, f"{path.name}: {len(text.splitlines())} lines"
    long = [
        f"{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


def test_the_readme_names_every_file_of_the_package():
    readme = (PACKAGE.parent / "README.md").read_text()
    missing = [
        str(path.relative_to(PACKAGE))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "__init__.py" and f"{path.name}`" not in readme
    ]
    assert missing == []


def test_the_public_names_are_listed_once_and_resolve():
    import jaxvit

    assert len(jaxvit.__all__) == len(set(jaxvit.__all__))
    for name in jaxvit.__all__:
        assert getattr(jaxvit, name) is not None, name
    assert {"RegisterTokens", "LayerScale", "SwiGLUMlp", "ViTConfig"} <= set(jaxvit.__all__)
