"""The layering of docs/architecture.md, held against the code's own imports.

Every module of controller/, drivers/ and simulators/ belongs to a layer; a module may
import its own layer's modules and lower layers', never a higher layer's, and no
modules import each other in a circle. Imports inside functions count too (they are
how heavy libraries load late, not a way around the layering).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("controller", "drivers", "simulators")

# Lowest first. A module's layer is that of the longest prefix listed here.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("controller.units", "controller.logs", "controller.cancellation", "controller.extras"),
    ("controller.catalogue", "controller.protocol.payloads", "controller.protocol.topics",
     "controller.protocol.reasons", "controller.protocol.broker", "controller.grid.journal"),
    ("controller.config_types",),
    ("drivers.modbus.config", "drivers.openadr.config", "drivers.firmware.config",
     "drivers.meters.mineops", "drivers.meters.tasmota", "drivers.meters.shelly_gen1",
     "drivers.meters.shelly_gen2", "drivers.meters.base", "drivers.meters.registry",
     "drivers.meters.router", "drivers.meters", "drivers.prices"),
    ("controller.campus_config",),
    ("controller.config",),
    ("controller.site_file", "controller.protocol"),  # the transport: it takes the broker's table
    ("controller.core", "controller.grid", "drivers.modbus"),
    ("controller.daemon", "controller.backtest", "controller.view", "drivers.firmware",
     "drivers.openadr", "simulators"),
    ("controller.demo",),
    ("controller.cli",),
)


def layer_of(module: str) -> int:
    """The index in LAYERS of the longest prefix of `module` listed there."""
    if module in PACKAGES:  # the top-level packages' own __init__ files hold nothing
        return 0
    best, best_len = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    if best < 0:
        pytest.fail(f"{module} is in no layer of docs/architecture.md (tests/test_architecture.py)")
    return best


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports (the longest known name of each import)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            module = name
            while module and module not in known:
                module = module.rpartition(".")[0]
            if module:
                found.add(module)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports(p, known) - {m} for m, p in mods.items()}


def test_no_module_imports_a_higher_layer() -> None:
    up = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
          for m, deps in graph().items() for d in sorted(deps) if layer_of(d) > layer_of(m)]
    assert not up, "imports running back up a layer:\n" + "\n".join(up)


def test_no_import_cycles() -> None:
    g = graph()
    # A package's __init__ that hands its modules' names on is not a cycle with them.
    edges = {m: {d for d in deps if not (m.startswith(d + ".") and (ROOT / d.replace(".", "/")
                                                                       / "__init__.py").exists())}
             for m, deps in g.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                cycles.append([*stack[stack.index(d):], d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_layering_check_sees_a_violation() -> None:
    # The check itself: the CLI is the top layer, the units the bottom one.
    assert layer_of("controller.cli.main") > layer_of("controller.daemon.loop")
    assert layer_of("controller.units") == 0
    assert "controller.units" in graph()["controller.catalogue"]


# docs/architecture.md: a function longer than this is split by what it does.
MAX_FUNCTION_LINES = 80


def long_functions(tree: ast.AST, where: str) -> list[str]:
    """Functions (and methods) of `tree` over MAX_FUNCTION_LINES lines, as 'where:line name'."""
    return [f"{where}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            and n.end_lineno is not None and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]


def test_no_function_over_80_lines() -> None:
    found = [f for pkg in PACKAGES for path in sorted((ROOT / pkg).rglob("*.py"))
             for f in long_functions(ast.parse(path.read_text()),
                                     str(path.relative_to(ROOT)))]
    assert not found, "split by what they do (docs/architecture.md):\n" + "\n".join(found)


def test_the_length_check_sees_a_long_function() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert long_functions(ast.parse(f"def f():\n{body}\n"), "m.py") == ["m.py:1 f (81 lines)"]
    assert long_functions(ast.parse("def g():\n    return 1\n"), "m.py") == []
