"""The package's folders are its layers: imports only go down, and no import circle.

Read statically (every ``import`` and ``from ... import`` of every module, including those
under ``if TYPE_CHECKING:`` and inside functions), so the test sees what a reader sees.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fedmia"

#: The layers, bottom first: a module may import from its own layer and the layers below.
LAYERS = ("core", "federation", "attacker", "privacy", "report", "top")
#: Modules of the package's top level: the entry points above every folder.
TOP = ("workflow", "pipeline", "kinds", "stages", "flower")


def layer_of(module: str) -> str:
    """The layer of ``fedmia.<...>``: its first folder, or ``top``."""
    part = module.split(".")[1] if "." in module else ""
    if part in LAYERS:
        return part
    if part in TOP or part == "":
        return "top"
    raise AssertionError(f"module {module} is in no layer; add its folder to LAYERS")


def modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(module: str, path: Path) -> set[str]:
    """The fedmia modules ``module`` imports (absolute names)."""
    out = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("fedmia")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            if base.startswith("fedmia"):
                known = modules()
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    out.add(sub if sub in known else base)
    return out - {module}


GRAPH = {m: imports(m, p) for m, p in modules().items()}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_only_go_down(module):
    here = LAYERS.index(layer_of(module))
    up = sorted(m for m in GRAPH[module] if m in GRAPH and LAYERS.index(layer_of(m)) > here)
    assert not up, f"{module} ({layer_of(module)}) imports from layers above it: {up}"


def test_no_import_circle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH.get(m, ())):
            if n not in GRAPH or n == "fedmia":
                continue
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " → ".join(stack[stack.index(n) :] + [n]))
            if not state.get(n):
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if not state.get(m):
            visit(m)


def test_the_core_imports_nothing_above_it_and_no_torch():
    for module, path in modules().items():
        if layer_of(module) != "core":
            continue
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(n == "torch" or n.startswith("torch.") for n in names), module


def test_the_file_contracts_import_nothing_of_fedmia():
    assert GRAPH["fedmia.core.contracts"] == set()
