"""The house: the package's import graph has no circle between modules, rooms import rooms on lower floors, the top
level holds at most 12 modules, no module grows far past 400 lines, `hubmix --help` and
`hubmix inspect` import none of the heavy libraries, and a plain merge imports no model library."""

from __future__ import annotations

import ast
import os
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
    return ".".join(parts[:2])  # hubmix.formats, hubmix.engine, hubmix.flow.merging, ...


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


# The rooms by floor: a room imports rooms on lower floors, or (on the flow floor only) rooms on its own floor. The
# flow floor's rooms call one another module by module: flow/ pushes through hub/ and renders through render/, while
# hub/card.py and hub/push.py read a written result (flow/result.py), hub/reproduce.py reruns the merge and
# render/sweep.py merges in memory; their modules still form no circle (test above).
FLOORS = {"hubmix.errors": 0, "hubmix.cache": 0, "hubmix.formats": 1, "hubmix.methods": 1, "hubmix.recipe": 2,
          "hubmix.engine": 3, "hubmix.lora": 4, "hubmix.hub": 4, "hubmix.flow": 4, "hubmix.render": 4,
          "hubmix.demo": 5, "hubmix.ui": 6, "hubmix.cli": 7, "hubmix.__main__": 8}


def test_rooms_import_downwards():
    wrong = []
    for n, deps in _graph().items():
        if n == "hubmix":
            continue  # the package root re-exports lazily
        a = _room(n)
        assert a in FLOORS, f"{a}: a new room (or a new top-level module) needs its floor in FLOORS"
        for m in deps:
            b = _room(m)
            if b != a and b != "hubmix" and (FLOORS[b] > FLOORS[a] or (FLOORS[b] == FLOORS[a] and FLOORS[a] != 4)):
                wrong.append(f"{n} -> {m}")
    assert not wrong, wrong


def test_no_import_circle_between_the_lower_rooms():
    rooms: dict[str, set[str]] = {}
    for n, deps in _graph().items():
        if n != "hubmix" and FLOORS.get(_room(n), 99) < 4:
            rooms.setdefault(_room(n), set()).update(_room(m) for m in deps if _room(m) not in (_room(n), "hubmix"))
    assert _cycle(rooms) is None, " -> ".join(_cycle(rooms) or [])


def test_the_top_level_is_the_package_face():
    """At most 12 modules directly in hubmix/: the public API and a few helpers; the rest lives in rooms."""
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= 12, top
    assert {"__init__.py", "__main__.py", "errors.py"} <= set(top), top


def test_the_card_and_push_do_not_import_the_merge_flow():
    graph = _graph()
    for name in ("hubmix.hub.card", "hubmix.hub.push", "hubmix.hub.resolve", "hubmix.hub.jobs", "hubmix.hub.remote"):
        seen, todo = set(), [name]
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(graph.get(n, ()))
        assert "hubmix.flow.merging" not in seen, name


def test_no_module_far_over_400_lines():
    """About 400 lines at most (10% slack, so a fix does not force a split in the middle of other work)."""
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 440}
    assert not long, long


def _run_cli_listing_heavy(argv: list[str], env: dict[str, str] | None = None) -> tuple[list[str], str]:
    """Run `hubmix ARGV` in a fresh interpreter; (the heavy libraries it imported, its stdout)."""
    code = ("import sys\nfrom hubmix.cli import main\ntry:\n    main(%r)\nexcept SystemExit as e:\n"
            "    print('EXIT', e.code)\nprint('HEAVY', sorted(m for m in %r if m in sys.modules))" % (argv, HEAVY))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **(env or {})})
    line = [x for x in out.stdout.splitlines() if x.startswith("HEAVY")][-1]
    return ast.literal_eval(line.removeprefix("HEAVY ")), out.stdout + out.stderr


@pytest.mark.parametrize("argv", [["--help"], ["merge", "--help"], ["methods"], ["merge", "--method", "nope"]])
def test_start_up_imports_no_heavy_library(argv):
    heavy, _ = _run_cli_listing_heavy(argv)
    assert heavy == [], (argv, heavy)


@pytest.mark.parametrize("layout", ["single-file", "diffusers"])
def test_inspect_reads_headers_without_heavy_libraries(zoo, layout):
    path = zoo.single("sd1", 1, dtype="fp16") if layout == "single-file" else zoo.diffusers("sd1", 1, dtype="fp16")
    heavy, out = _run_cli_listing_heavy(["inspect", str(path)])
    assert heavy == [], heavy
    assert "EXIT" not in out.replace("EXIT 0", ""), out  # it answered
    assert f"layout:  {layout}" in out and "(sd1)" in out and "float16 x" in out, out


def test_a_plain_merge_imports_no_model_library(zoo, tmp_path):
    """A merge of diffusers folders into a diffusers folder needs torch for its tensors, nothing of diffusers,
    transformers or the Hub client."""
    a, b = zoo.diffusers("sd1", 1), zoo.diffusers("sd1", 2)
    argv = ["merge", str(a), str(b), "--method", "weighted_sum", "--alpha", "0.5", "--out", str(tmp_path / "m"), "-q"]
    heavy, out = _run_cli_listing_heavy(argv, {"HUBMIX_CACHE": os.environ.get("HUBMIX_CACHE", str(tmp_path))})
    assert (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").is_file(), out
    assert not {"diffusers", "transformers", "huggingface_hub", "PIL"} & set(heavy), heavy


@pytest.mark.parametrize("family,layout", [("sd1", "single-file"), ("sd1", "diffusers"), ("sd2", "single-file"),
                                           ("sdxl", "single-file")])
def test_a_merge_with_native_kernels_imports_no_torch(zoo, tmp_path, family, layout):
    """Every task a copy or a native kernel on the CPU: the merge runs on spans (formats.io.span), torch is never
    imported, and the bytes are the eager torch path's. SD2's and SDXL's single files store OpenCLIP's
    text_projection transposed and its q/k/v fused: read and written through native transposes and row blocks."""
    from hubmix.engine import native

    if native.Native.library() is None:
        pytest.skip(f"no native kernels here: {native.Native.error()}")
    if layout == "single-file":
        models = [str(zoo.single(family, s, dtype="fp16")) for s in (1, 2, 3)]
        outs = {k: tmp_path / f"{k}.safetensors" for k in ("native", "eager")}
    else:
        models = [str(zoo.diffusers(family, s, dtype="fp16")) for s in (1, 2, 3)]
        outs = {k: tmp_path / k for k in ("native", "eager")}
    env = {"HUBMIX_CACHE": os.environ.get("HUBMIX_CACHE", str(tmp_path))}
    for kind, out in outs.items():  # --dtype bf16: the copies convert too
        argv = ["merge", *models, "--method", "lossless", "--alpha", "0.9", "--dtype", "bf16", "--out", str(out),
                "-q", "--kernels", kind]
        heavy, text = _run_cli_listing_heavy(argv, env)
        assert "EXIT" not in text.replace("EXIT 0", ""), text
        if kind == "native":
            assert "torch" not in heavy and "numpy" not in heavy, heavy
        else:
            assert "torch" in heavy
    files = sorted(p.relative_to(outs["eager"]) for p in outs["eager"].rglob("*.safetensors")) or [None]
    for rel in files:
        a = outs["eager"] / rel if rel else outs["eager"]
        b = outs["native"] / rel if rel else outs["native"]
        assert _tensor_bytes(a) == _tensor_bytes(b), rel


def _tensor_bytes(path: Path) -> bytes:
    """A safetensors file's tensors (its header without metadata, and its data): the output name and the recipe,
    which records the kernels option, differ between two runs."""
    import json
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return json.dumps(header, sort_keys=True).encode() + raw[8 + n:]


def test_help_names_every_family_from_the_families_folder(cli, monkeypatch, tmp_path):
    """`hubmix --help` names the families the YAML files define (loaded in full here, as the merge loads them), and
    a new family file appears there without touching the CLI."""
    import shutil

    import hubmix.formats.families as fams
    from hubmix.cli.app import cli_help

    names = [f.name.replace("Stable Diffusion ", "SD") for f in fams.families().values()]
    assert {"SD1.x", "SD2.x", "SDXL"} <= set(names), names
    code, out, _ = cli("--help")
    assert code == 0 and f"({', '.join(names)})" in " ".join(out.split()), out
    shutil.copytree(fams.HERE, tmp_path / "families", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    (tmp_path / "families" / "sd9.yaml").write_text("# a family from the future\nid: sd9\nname: Stable Diffusion 9\n")
    monkeypatch.setattr(fams, "HERE", tmp_path / "families")
    text = cli_help()
    assert "SD9" in text and all(n in text for n in names), text
