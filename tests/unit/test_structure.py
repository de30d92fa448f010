"""The package's shape: no import cycles, no private names imported across modules, small files, the CLI's
choices taken from the registries, and platform/ a source root, not a package."""

from __future__ import annotations

import ast

import pytest

from tests.support import ROOT
from vitlab.cli import build_parser
from vitlab.data.sources import READERS
from vitlab.deploy.onnx import QUANTIZERS
from vitlab.deploy.runtimes import RUNTIMES

PACKAGE = ROOT / "platform" / "vitlab"
MAX_LINES = 400


def module_name(path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path) -> list[tuple[str, str | None]]:
    """(module, imported name or None) of every vitlab import in a file, at the top or inside a function."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vitlab":
            out += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names if alias.name.split(".")[0] == "vitlab"]
    return out


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for module, imported in imports(path):
            target = f"{module}.{imported}" if f"{module}.{imported}" in MODULES else module
            if target != "vitlab" and target != name:
                edges[name].add(target)
    return edges


def test_no_import_cycles():
    edges, state, cycles = graph(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)


def test_no_private_names_imported_across_modules():
    private = [f"{name} imports {module}.{imported}" for name, path in MODULES.items()
               for module, imported in imports(path)
               if imported and imported.startswith("_") and not imported.startswith("__")]
    assert not private, private


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    lines = MODULES[name].read_text().count("\n")
    assert lines <= MAX_LINES, f"{MODULES[name]}: {lines} lines (at most {MAX_LINES}): split it by concern"


def test_platform_is_a_source_root_and_the_package_is_typed():
    assert not (ROOT / "platform" / "__init__.py").exists()  # it would shadow Python's own `platform` module
    assert (PACKAGE / "py.typed").is_file()


def choices(parser, *path: str) -> list[str]:
    for name in path[:-1]:
        parser = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices[name]
    return next(a for a in parser._actions if a.dest == path[-1]).choices


def test_cli_choices_come_from_the_registries():
    parser = build_parser()
    assert choices(parser, "data", "prepare", "format") == list(READERS)
    assert choices(parser, "export", "quantize") == list(QUANTIZERS)
    assert choices(parser, "bench", "infer", "runtime") == list(RUNTIMES)


def load_time_imports(path) -> set[str]:
    """Every module a file imports when it is loaded: its top-level statements (and their if/try blocks), not
    the bodies of its functions and classes."""
    found, todo = set(), list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, (ast.If, ast.Try)):
            todo += [*node.body, *node.orelse, *getattr(node, "finalbody", []),
                     *(s for h in getattr(node, "handlers", []) for s in h.body)]
    return found


def test_the_train_controller_loads_no_model_code():
    """Ray Train's controller unpickles trainer.train_loop_per_worker, the LoopInputs and the callbacks, and
    so loads their modules; it never trains. Reaching timm or the loop from there cost every run about 2 s
    of CPU before its workers could start."""
    reached, todo = set(), ["vitlab.train.trainer", "vitlab.train.inputs", "vitlab.train.callbacks"]
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        if name in MODULES:
            todo += load_time_imports(MODULES[name])
    heavy = sorted(m for m in reached if m.split(".")[0] == "timm" or m in ("vitlab.train.loop", "vitlab.model"))
    assert not heavy, f"the Train controller would import {heavy}"
