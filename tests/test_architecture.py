"""The layers ARCHITECTURE.md states, checked against the imports in codehub/ (parsed with
ast, never matched as text), and the size rule for modules and functions.

- No module imports from a higher layer than its own (the `layers` block of ARCHITECTURE.md
  places every module and package under codehub/; a new one must be placed there).
- `model.py` imports nothing of CodeHub's.
- No import cycle runs between CodeHub's modules, but the ones listed in KNOWN_CYCLES (each
  with the reason it is still there; the test says when one is gone).
- No module is over MAX_MODULE_LINES lines and no function over MAX_FUNCTION_LINES (the
  failure lists every one that is).
Every import counts, at module level or inside a function or `if TYPE_CHECKING:`: each is
a dependency of the code.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "codehub"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 50
# Cycles still in the house, each with why (issue #15 takes them out).
KNOWN_CYCLES: dict[frozenset[str], str] = {}


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"

    @property
    def unit(self) -> str:
        """The top-level module or package under codehub/ it belongs to."""
        return self.name.split(".")[1]


def modules() -> dict[str, Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if len(parts) > 1:  # the root package itself holds nothing
            name = ".".join(parts)
            found[name] = Module(name, path, ast.parse(path.read_text(), str(path)))
    return found


def imports(module: Module, known: dict[str, Module]) -> set[str]:
    """The CodeHub modules `module` imports: `from X import name` counts as X.name when
    that is a module, else as X."""
    deps: set[str] = set()
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            deps.update(a.name for a in node.names if a.name.split(".")[0] == "codehub")
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            if base.split(".")[0] != "codehub":
                continue
            for alias in node.names:
                target = f"{base}.{alias.name}"
                deps.add(target if target in known else base)
    deps.discard(module.name)
    return deps


def _absolute(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def layers() -> dict[str, tuple[int, str]]:
    """unit -> (layer number, layer name), from the `layers` block of ARCHITECTURE.md."""
    text = (REPO / "ARCHITECTURE.md").read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "ARCHITECTURE.md has no ```layers block"
    placed: dict[str, tuple[int, str]] = {}
    for line in block.group(1).splitlines():
        match = re.fullmatch(r"(\d+) (\w+):\s+(.+)", line.strip())
        assert match, f"not a layer line in ARCHITECTURE.md: {line!r}"
        number, name, units = match.groups()
        for unit in units.split():
            assert unit not in placed, f"{unit} is placed in two layers"
            placed[unit] = (int(number), name)
    return placed


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(module, known) for name, module in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in edges.get(node, ()):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _short(name: str) -> str:
    return name.removeprefix("codehub.")


# --- tests ------------------------------------------------------------------------------


def test_every_module_is_placed_in_a_layer() -> None:
    placed = layers()
    missing = sorted({m.unit for m in modules().values()} - placed.keys())
    assert not missing, f"place these in the layers block of ARCHITECTURE.md: {missing}"
    stale = sorted(placed.keys() - {m.unit for m in modules().values()})
    assert not stale, f"the layers block names what codehub/ does not have: {stale}"


def test_no_module_imports_from_a_higher_layer() -> None:
    placed = layers()
    known = modules()
    upward, across = [], []
    for name, deps in graph().items():
        unit = known[name].unit
        for dep in sorted(deps):
            dep_unit = known[dep].unit if dep in known else dep.split(".")[1]
            if placed[dep_unit][0] > placed[unit][0]:
                upward.append(f"{_short(name)} ({placed[unit][1]}) imports {_short(dep)} "
                              f"({placed[dep_unit][1]})")
            elif dep_unit != unit and placed[dep_unit][0] == placed[unit][0] in (2, 3):
                across.append(f"{_short(name)} -> {_short(dep)}")
    if across:
        print("imports across packages of one layer (noted, allowed):\n  " +
              "\n  ".join(across))
    assert not upward, "imports from a higher layer:\n  " + "\n  ".join(upward)


def test_model_imports_nothing_of_codehub() -> None:
    assert graph()["codehub.model"] == set()


# The modules that may talk to PostgreSQL's driver: the store and its pool (which turn
# every driver failure into StoreUnavailable), the embedded server and connection set-up,
# the leader's advisory lock (a connection of its own), the app key naming the pool type.
DRIVER_MODULES = {"codehub.store", "codehub.pool", "codehub.postgres",
                  "codehub.reconciler.leader", "codehub.keys"}


def test_only_the_persistence_modules_import_the_database_driver() -> None:
    def named(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom) and not node.level:
            return [node.module or ""]
        return []

    users = {name for name, module in modules().items() for node in ast.walk(module.tree)
             if any(n.split(".")[0] == "asyncpg" for n in named(node))}
    assert users == DRIVER_MODULES, (
        "asyncpg outside the persistence modules (catch store.StoreUnavailable instead): "
        f"{sorted(users - DRIVER_MODULES)}; no longer using it: "
        f"{sorted(DRIVER_MODULES - users)}")


def test_no_import_cycle_between_codehub_modules() -> None:
    found = cycles(graph())
    for cycle in found:
        if cycle in KNOWN_CYCLES:
            print(f"known cycle {sorted(map(_short, cycle))}: {KNOWN_CYCLES[cycle]}")
    gone = [sorted(map(_short, c)) for c in KNOWN_CYCLES if c not in found]
    if gone:
        print(f"gone, take out of KNOWN_CYCLES: {gone}")
    new = [sorted(map(_short, c)) for c in found if c not in KNOWN_CYCLES]
    assert not new, f"import cycles: {new}"


def test_the_cycle_finder_finds_a_cycle_and_only_one() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(edges) == [frozenset({"a", "b", "c"})]


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _length(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    return (node.end_lineno or node.lineno) - first + 1


def test_modules_and_functions_within_the_size_limits() -> None:
    over: list[str] = []
    for module in modules().values():
        lines = len(module.path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            over.append(f"{module.path.relative_to(REPO)}: {lines} lines")
        over += [f"{module.path.relative_to(REPO)}:{f.lineno} {f.name}(): {_length(f)} "
                 f"lines" for f in _functions(module.tree) if _length(f) > MAX_FUNCTION_LINES]
    assert not over, "over the size limits:\n  " + "\n  ".join(over)
