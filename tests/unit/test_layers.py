"""The package's layers only call down, and no two modules import each other (docs/architecture.md).

Every ``import`` in ``harness/`` is read from the source (module level and inside
functions alike; ``if TYPE_CHECKING:`` blocks excepted, they never run), then:

- a module may import its own layer or a lower one, never a higher one;
- the runtime import graph has no cycle outside ``harness.model``, whose
  protocol modules refer back to the socket they belong to.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[2] / "harness"

# Lowest first. A module belongs to the first entry that is its name or a package above it.
LAYERS: list[tuple[str, ...]] = [
    ("harness", "harness.errors", "harness.deadline", "harness.progress", "harness.log", "harness.paths", "harness.load",
     "harness.template", "harness.results"),
    ("harness.host", "harness.model"),
    ("harness.image",),
    ("harness.vm",),
    ("harness.guest.ssh", "harness.guest.inside"),
    ("harness.stats",),
    ("harness.guest",),
    ("harness.lab",),
    ("harness.scenario",),
    ("harness.fuzz", "harness.course"),
    ("harness.perf", "harness.config", "harness.pytest_plugin", "harness.cli"),
]
# Where a package's own modules sit above others of the same package.
WITHIN = {
    "harness.lab": ["harness.lab.topology", "harness.lab.state", "harness.lab.lock", "harness.lab.diagnose",
                    "harness.lab.lifecycle", "harness.lab.status"],
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(HARNESS.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in HARNESS.rglob("*.py")}


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The harness modules ``name`` imports when it runs."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("harness"):
                    found.add(resolve(alias.name) or alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("harness"):
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    found.add(full if full in known else (resolve(base) or base))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(name)
    return found


def layer_of(name: str) -> int:
    for index, layer in enumerate(LAYERS):
        if any(name == entry or name.startswith(entry + ".") for entry in layer if entry != "harness"):
            return index
    if name == "harness":
        return 0
    raise AssertionError(f"{name} is in no layer of tests/unit/test_layers.py: give it one")


def within(name: str) -> tuple[str, int] | None:
    for package, order in WITHIN.items():
        if name in order:
            return package, order.index(name)
    return None


MODULES = modules()


@functools.cache
def graph() -> dict[str, set[str]]:
    """Each harness module's harness imports; parsed on first use, not while every worker collects."""
    known = set(MODULES)
    return {name: imports(name, path, known) for name, path in MODULES.items()}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_module_imports_only_its_own_layer_or_lower(name):
    upward = []
    for target in sorted(graph()[name]):
        if layer_of(target) > layer_of(name):
            upward.append(target)
        here, there = within(name), within(target)
        if here and there and here[0] == there[0] and there[1] > here[1]:
            upward.append(f"{target} (above it in {here[0]})")
    assert not upward, f"{name} imports upward: {', '.join(upward)}"


def test_no_import_cycle_outside_the_model():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def connect(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph().get(node, ()):
            if target not in MODULES:
                continue
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(MODULES):
        if node not in index:
            connect(node)
    outside = [cycle for cycle in cycles if not all(m.startswith("harness.model") for m in cycle)]
    assert not outside, f"import cycles: {outside}"


def test_the_checker_sees_function_level_imports(tmp_path):
    """The test above must be able to fail: an import inside a function counts, one under TYPE_CHECKING does not."""
    source = tmp_path / "probe.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from harness.lab import state\n"
                      "def f():\n    from harness.lab.lifecycle import Lab\n")
    assert imports("harness.vm.probe", source, set(MODULES)) == {"harness.lab.lifecycle"}
