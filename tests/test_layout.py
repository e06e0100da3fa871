"""The layout shows the pipeline and keeps its promise: no import cycle among the modules of nexus_export, passes and
runtimes (imports inside functions included), no module importing a floor above its own, and the core reaching
concrete passes and runtimes only through the registry."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nexus_export", "passes", "runtimes")
# nexus_export's floors, lowest first: a module may import its own floor and those below it, never one above
FLOORS = [
    {"errors", "memory", "progress", "distributed", "metrics", "outdir", "registry", "naming", "__init__"},
    {"data"},
    {"weights"},
    {"graph"},
    {"models", "engine"},
    {"evaluation", "generate"},
    {"reporting"},
    {"run"},
    {"api"},
    {"cli", "cli_flags", "cli_reference", "__main__"},
]


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """The modules of ours that ``path`` imports anywhere in it (a function's body too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) - {name} for name, path in mods.items()}


def floor(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "nexus_export":
        return None
    top = parts[1] if len(parts) > 1 else "__init__"
    return next(i for i, members in enumerate(FLOORS) if top in members)


def test_every_core_module_has_a_floor():
    unplaced = [m for m in modules() if m.startswith("nexus_export") and floor(m) is None]
    assert unplaced == []


def test_no_import_cycles():
    edges = graph()
    cycles = []
    for a, targets in edges.items():
        for b in targets:
            if a < b and a in edges.get(b, set()):
                cycles.append((a, b))
    # longer cycles: a depth-first search for a back edge
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(tuple(stack[stack.index(nxt):]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert cycles == []


def test_no_module_imports_a_floor_above_its_own():
    upward = [(a, b) for a, targets in graph().items() for b in targets
              if floor(a) is not None and floor(b) is not None and floor(b) > floor(a)]
    assert upward == []


def test_the_core_reaches_passes_and_runtimes_through_the_registry_only():
    direct = sorted((a, b) for a, targets in graph().items() if a.startswith("nexus_export")
                    for b in targets if b.split(".")[0] in ("passes", "runtimes"))
    assert direct == []


def test_nothing_imports_a_flat_layout_path():
    """The old module paths (``nexus_export.pruning``) import for users; the project's own code names the new ones."""
    import nexus_export

    old = {f"nexus_export.{name}" for name in nexus_export._MOVED}
    found = []
    for path in [*modules().values(), *(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            found += [f"{path.relative_to(ROOT)}: {name}" for name in names
                      if any(name == o or name.startswith(o + ".") for o in old)]
    assert [f for f in found if "test_package.py" not in f] == []


def test_passes_never_import_runtimes():
    assert [(a, b) for a, targets in graph().items() if a.startswith("passes")
            for b in targets if b.startswith("runtimes")] == []
