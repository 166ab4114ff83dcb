"""The package's layers, enforced by reading every module's imports (docs/design.md, "Layers").

Data flows down only: a layer imports the layers below it, never one above, and never
sideways across memory/ and store/ (the store knows files and tensors, not models; the
memory knows tensors, not files). Only cli/ imports Typer or Rich. The benchmarks and the
CLI use the service's public API only. random_checkpoints is scaffolding for tests and
benchmarks: no core module imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "memllm_cli"
LEAVES = {"__init__", "__version__", "errors", "config", "progress", "clock", "cpus"}
SCAFFOLDING = {"random_checkpoints", "__main__"}

# layer -> the layers it may import (itself included)
ALLOWED = {
    "leaf": {"leaf"},
    "text": {"leaf", "text"},
    "model": {"leaf", "text", "model"},
    "memory": {"leaf", "text", "model", "memory"},
    "store": {"leaf", "store"},
    "service": {"leaf", "text", "model", "memory", "store", "service"},
    "bench": {"leaf", "text", "service", "bench"},
    "server": {"leaf", "text", "service", "server"},
    "cli": {"leaf", "service", "bench", "server", "cli"},
}
UI_LIBRARIES = {"typer", "rich", "click"}


def layer_of(module: str) -> str:
    """'memllm_cli.memory.free' -> 'memory'; 'memllm_cli.errors' -> 'leaf'."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in LEAVES:  # the package itself, or a leaf module
        return "leaf"
    if parts[0] in SCAFFOLDING:
        return "scaffolding"
    return parts[0]


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def imports(module: str, path: Path) -> list[tuple[str, int]]:
    """Absolute names of everything the module imports, anywhere in it (function-level
    imports included), with line numbers."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # from . import x, y: each is a module
                    found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
                    continue
            else:
                target = node.module
            found.append((target, node.lineno))
    return found


def test_the_layout_is_what_the_design_says():
    layers = {layer_of(m) for m, _ in modules()}
    assert layers == set(ALLOWED) | {"scaffolding"}


@pytest.mark.parametrize("module, path", modules(), ids=[m for m, _ in modules()])
def test_a_module_imports_only_the_layers_below_it(module, path):
    own = layer_of(module)
    if own == "scaffolding":
        return
    bad = []
    for target, line in imports(module, path):
        top = target.split(".")[0]
        if top == "memllm_cli":
            theirs = layer_of(target)
            if theirs == "scaffolding" or theirs not in ALLOWED[own]:
                bad.append(f"{path.name}:{line} imports {target} ({theirs})")
        elif top in UI_LIBRARIES and own != "cli":
            bad.append(f"{path.name}:{line} imports {target}: only cli/ may")
    assert not bad, f"{module} ({own}) " + "; ".join(bad)


@pytest.mark.parametrize("layer", ["bench", "cli"])
def test_front_ends_use_only_public_names(layer):
    """No `something._private` outside the object's own methods (`self._x` is fine, and
    `os._exit`, which only cli/app.py's run() calls)."""
    bad = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls", "os"))):
                bad.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert not bad


def test_only_the_store_knows_where_a_memory_keeps_its_files():
    """A memory's folder is the store handle's: no other module reads `.folder` or builds
    a path inside it."""
    bad = []
    for module, path in modules():
        if layer_of(module) == "store":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "folder":
                bad.append(f"{path.name}:{node.lineno}")
    assert not bad


def test_the_checker_sees_a_violation(tmp_path):
    """The import walk resolves relative imports (a test of the test)."""
    fake = tmp_path / "free.py"
    fake.write_text("from ..store.repo import Repo\nfrom . import recall\ndef f():\n    import rich\n")
    found = sorted(t for t, _ in imports("memllm_cli.memory.free", fake))
    assert found == ["memllm_cli.memory.recall", "memllm_cli.store.repo", "rich"]
    assert layer_of("memllm_cli.store.repo") not in ALLOWED["memory"]


def _module_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (type-only and function-level imports too)."""
    found = dict(modules())
    graph: dict[str, set[str]] = {}
    for module, path in found.items():
        deps = set()
        for target, _ in imports(module, path):
            parts = target.split(".")
            while parts and ".".join(parts) not in found:  # `from .x import name`: the module x
                parts.pop()
            if parts and ".".join(parts) != module:
                deps.add(".".join(parts))
        graph[module] = deps
    return graph


def test_no_module_imports_itself_round_about():
    """No import cycles, not even type-only ones (official.py and placement.py had one)."""
    graph = _module_graph()
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done
    cycles = []

    def walk(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                walk(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert not cycles, cycles
