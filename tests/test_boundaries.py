"""The boundaries between the layers hold (docs/ARCHITECTURE.md, "The house").

- `server/engine/` and `kernels/` import neither grpc, prometheus_client, aiohttp nor the
  generated stubs (`loraplex.v1`): offline generate, eval, merge and bench use the engine
  without any server.
- `server/api/` uses the engine through its face (`Engine`'s methods, `stats()`, `events()`):
  it touches no attribute starting with `_` of anything but itself, none of the engine's own
  objects (`.scheduler`, `.slots`, `.blocks`, `.runner`, `.merger`), and imports none of the
  modules that define them.
- No hand-written Python source outside tests/ is over 500 lines.

Each file is parsed with `ast`, so a violation is reported as file:line, whatever the spacing
or the name a value was given; a comment or a string that mentions `.slots` is no violation.
"""
from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVER_ONLY = ("grpc", "prometheus_client", "aiohttp", "loraplex.v1")
ENGINE_INTERNALS = frozenset({"scheduler", "slots", "blocks", "runner", "merger"})
INTERNAL_MODULES = frozenset(f"loraplex.server.engine.{m}" for m in (
    "scheduler", "adapter_slots", "block_manager", "model_runner", "merger", "merging", "lora_batch",
    "lora_layer", "attention", "model"))
OWN = frozenset({"self", "cls"})  # a class's own private attributes are its business
ATTRIBUTE_CALLS = frozenset({"getattr", "setattr", "hasattr", "delattr"})
MAX_LINES = 500
NOT_HAND_WRITTEN = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")  # protoc's output (scripts/gen_proto.py)

Violation = str  # "path:line: what"


def _sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO)}:{node.lineno}"


def _imported(node: ast.AST) -> list[str]:
    """The absolute module names an import statement names (relative imports stay in the package)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return []


def _within(module: str, roots: tuple[str, ...] | frozenset[str]) -> bool:
    return any(module == root or module.startswith(root + ".") for root in roots)


def server_imports(path: Path, tree: ast.AST) -> Iterator[Violation]:
    """Imports of what only the server may use."""
    for node in ast.walk(tree):
        for module in _imported(node):
            if _within(module, SERVER_ONLY):
                yield f"{_where(path, node)}: imports {module}, which only server/api/ may use"
                break


def _reaches_in(base: ast.expr, attr: str) -> str | None:
    """Why reading `attr` of `base` reaches into the engine, or None."""
    if attr in ENGINE_INTERNALS:
        return f"reads .{attr}, one of the engine's own objects: use an Engine method"
    private = attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))
    if private and not (isinstance(base, ast.Name) and base.id in OWN):
        return f"reads .{attr}, a private attribute of another object"
    return None


def engine_internals(path: Path, tree: ast.AST) -> Iterator[Violation]:
    """Reads of the engine's internals, directly, through getattr and friends, or by import."""
    for node in ast.walk(tree):
        why = None
        if isinstance(node, ast.Attribute):
            why = _reaches_in(node.value, node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ATTRIBUTE_CALLS
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str)):
            why = _reaches_in(node.args[0], node.args[1].value)
        else:
            internal = [m for m in _imported(node) if _within(m, INTERNAL_MODULES)]
            why = f"imports {internal[0]}, the engine's own" if internal else None
        if why is not None:
            yield f"{_where(path, node)}: {why}"


def check(paths: list[Path], rule: Callable[[Path, ast.AST], Iterator[Violation]]) -> list[Violation]:
    return [v for path in paths for v in _in_order(rule(path, ast.parse(path.read_text(encoding="utf-8"), str(path))))]


def _in_order(violations: Iterator[Violation]) -> list[Violation]:
    return sorted(violations, key=lambda v: int(v.split(":")[1]))


def test_engine_and_kernels_never_import_the_server_stack():
    paths = _sources("server/engine", "kernels")
    assert len(paths) > 20
    violations = check(paths, server_imports)
    assert not violations, "\n".join(violations)


def test_the_api_uses_only_the_engines_face():
    paths = _sources("server/api")
    assert len(paths) > 10
    violations = check(paths, engine_internals)
    assert not violations, "\n".join(violations)


def test_no_hand_written_source_is_over_500_lines():
    folders = [p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
               and p.name not in ("tests", "build", "dist") and not (p / "pyvenv.cfg").exists()]
    paths = [p for p in _sources(*folders) if not p.name.endswith(NOT_HAND_WRITTEN)]
    long = [f"{p.relative_to(REPO)}: {n} lines" for p in paths
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert not long, "split these (a module says one thing; see STYLE.md):\n" + "\n".join(long)


# the rules catch what they are meant to ------------------------------------------------------
BAD_API = '''\
import loraplex.server.engine.scheduler
from loraplex.server.engine.adapter_slots import AdapterSlots

def gauges(loop, engine):
    n = len(loop.engine.scheduler.waiting)
    pinned = engine.slots.pinned
    held = getattr(engine, "_seqs")
    ok = engine.stats().running + self._private + engine.ops.__name__.count("x")
    return lambda e: e.merger.switches
'''
BAD_ENGINE = '''\
import grpc.aio
from prometheus_client import Counter
from loraplex.v1 import admin_pb2
from loraplex import v1
from aiohttp import web
from . import scheduler
import torch
'''


@pytest.mark.parametrize("source, rule, lines", [
    (BAD_API, engine_internals, [1, 2, 5, 6, 7, 9]),
    (BAD_ENGINE, server_imports, [1, 2, 3, 4, 5]),
])
def test_each_rule_reports_every_violation_by_line(source, rule, lines):
    path = REPO / "tests" / "boundary_sample.py"  # reported relative to the repository
    found = _in_order(rule(path, ast.parse(source)))
    assert [int(v.split(":")[1]) for v in found] == lines, found
    assert all(v.startswith("tests/boundary_sample.py:") for v in found)
