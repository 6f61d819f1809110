"""The house: the package's import graph has no circle (between modules, and between the rooms: formats, engine,
methods, hub, render, cli and the top-level flows), no module grows far past 400 lines, and `hubmix --help`
imports none of the heavy libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "hubmix"
HEAVY = ("torch", "diffusers", "transformers", "numpy", "huggingface_hub", "safetensors", "accelerate", "PIL")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    """Every hubmix module `path` imports, at module level or inside functions (a lazy import still closes a
    circle)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("hubmix")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("hubmix"):
                out.add(mod)
                out |= {f"{mod}.{a.name}" for a in node.names}  # `from hubmix.engine import pipeline`
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        graph[name] = {m for m in _imports(path, name) if m in files and m != name}
    return graph


def _room(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])  # hubmix.formats, hubmix.engine, hubmix.merging, ...


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if not state.get(m):
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if not state.get(n):
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_circle_between_modules():
    graph = _graph()
    # a package's __init__ may import its own modules; the modules importing their package is the circle to avoid
    graph = {n: {m for m in deps if not (n.startswith(m + ".") and m in graph)} for n, deps in graph.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_no_import_circle_between_rooms():
    rooms: dict[str, set[str]] = {}
    for n, deps in _graph().items():
        if n == "hubmix":
            continue  # the package root re-exports lazily
        rooms.setdefault(_room(n), set()).update(_room(m) for m in deps if _room(m) not in (_room(n), "hubmix"))
    assert _cycle(rooms) is None, " -> ".join(_cycle(rooms) or [])


def test_the_card_and_push_do_not_import_the_merge_flow():
    graph = _graph()
    for name in ("hubmix.hub.card", "hubmix.hub.push", "hubmix.hub.resolve", "hubmix.hub.jobs", "hubmix.hub.remote"):
        seen, todo = set(), [name]
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(graph.get(n, ()))
        assert "hubmix.merging" not in seen, name


def test_no_module_far_over_400_lines():
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 440}
    assert not long, long


@pytest.mark.parametrize("argv", [["--help"], ["merge", "--help"], ["methods"], ["merge", "--method", "nope"]])
def test_start_up_imports_no_heavy_library(argv):
    code = ("import sys\nfrom hubmix.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in %r if m in sys.modules))" % (argv, HEAVY))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    line = [x for x in out.stdout.splitlines() if x.startswith("HEAVY")][-1]
    assert line == "HEAVY []", (argv, line)
