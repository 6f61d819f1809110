"""The whole flow as one library call (hubmix.flow.run): progress over bytes, cancel leaving nothing behind, and the
CLI's `merge` giving the same bytes as the call it makes."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import assert_one_line_error


def _data_bytes(path: Path) -> int:
    """The floating-point tensor data a safetensors file holds, from its header (independent of the engine's own
    count): what the merge streams; the int64 position_ids of the text encoders are written beside it."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
               if k != "__metadata__" and v["dtype"] in ("F16", "BF16", "F32"))


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_run_as_a_library_reports_progress_in_bytes(zoo, tmp_path):
    from hubmix import Recipe, RunOptions, run

    a, b = zoo.single("sd1", 1, dtype="fp16"), zoo.single("sd1", 2, dtype="fp16")
    events: list[tuple[int, int, str]] = []
    out = tmp_path / "m.safetensors"
    flow = run(Recipe(models=[str(a), str(b)], method="weighted_sum", params={"alpha": 0.3}),
               RunOptions(out=out, quiet=True, max_memory=1 << 20), progress=lambda *e: events.append(e))
    assert flow.merge.output == out and out.is_file() and flow.push is None
    done = [d for d, _, s in events if s == "merge"]
    totals = {t for _, t, s in events if s == "merge"}
    assert len(done) > 10, len(done)  # a chunk at a time, not one call at the end
    assert all(x < y for x, y in zip(done, done[1:])), done
    assert totals == {_data_bytes(out)} and done[-1] == _data_bytes(out)
    assert {s for *_, s in events} == {"merge"}  # no samples, no push


@pytest.mark.parametrize("layout", ["single-file", "diffusers"])
def test_cancel_during_a_merge_leaves_nothing(zoo, tmp_path, layout):
    from hubmix import Cancelled, Recipe, RunOptions, run

    models = [str(zoo.single("sd1", s, dtype="fp16") if layout == "single-file" else zoo.diffusers("sd1", s))
              for s in (1, 2)]
    parent = tmp_path / "outs"
    parent.mkdir()
    out = parent / ("m.safetensors" if layout == "single-file" else "m")
    cancel = threading.Event()
    seen: list[int] = []

    def progress(done: int, total: int, stage: str) -> None:
        seen.append(done)
        if len(seen) == 1:
            cancel.set()  # after the first chunk

    with pytest.raises(Cancelled) as e:
        run(Recipe(models=models, method="weighted_sum", params={"alpha": 0.5}, layout=layout),
            RunOptions(out=out, quiet=True, max_memory=1 << 20), progress=progress, cancel=cancel)
    assert str(out) in str(e.value) and "\n" not in str(e.value)
    assert list(parent.iterdir()) == []  # no output, no temporary sibling, no recipe sidecar
    assert len(seen) < 20, seen  # stopped promptly: at most the chunks already in flight were written


def test_cancel_set_before_the_last_chunk_is_written_is_honoured(zoo, tmp_path):
    """A cancel that arrives with the last chunk (nothing left to skip) still leaves nothing."""
    from hubmix import Cancelled, Recipe, RunOptions, run

    models = [str(zoo.diffusers("sd1", s)) for s in (1, 2)]
    cancel = threading.Event()

    def progress(done: int, total: int, stage: str) -> None:
        if done == total:
            cancel.set()

    with pytest.raises(Cancelled):
        run(Recipe(models=models, method="weighted_sum", params={"alpha": 0.5}),
            RunOptions(out=tmp_path / "m", quiet=True), progress=progress, cancel=cancel)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra", [[], ["--dtype", "bf16", "--layout", "single-file"]])
def test_the_cli_merge_writes_what_run_writes(zoo, tmp_path, cli, extra):
    from hubmix import Recipe, RunOptions, run

    models = [str(zoo.single("sd1", s, dtype="fp16") if extra else zoo.diffusers("sd1", s)) for s in (1, 2, 3)]
    name = "m.safetensors" if "single-file" in extra else "m"
    (tmp_path / "cli").mkdir()
    (tmp_path / "lib").mkdir()
    code, _, err = cli("merge", *models, "--method", "lossless", "--alpha", "0.9", *extra, "--out",
                       tmp_path / "cli" / name, "-q")
    assert code == 0, err
    recipe = Recipe(models=models, method="lossless", params={"alpha": 0.9},
                    dtype="bf16" if extra else None, layout="single-file" if extra else None)
    run(recipe, RunOptions(out=tmp_path / "lib" / name, quiet=True))
    cli_files, lib_files = _tree(tmp_path / "cli"), _tree(tmp_path / "lib")
    assert sorted(cli_files) == sorted(lib_files) and len(cli_files) > 1
    assert cli_files == lib_files


def test_options_that_do_not_go_together_are_refused_before_any_work(tmp_path, cli, zoo):
    from hubmix import Recipe, RunOptions, run
    from hubmix.flow.run import OptionsError

    recipe = Recipe(models=["nowhere/a.safetensors", "nowhere/b.safetensors"], method="weighted_sum")
    for opts, needle in [(RunOptions(dry=True, push="me/x"), "--dry writes none"),
                         (RunOptions(branch="b"), "--branch only go with --push"),
                         (RunOptions(push="me/x", branch="b", create_pr=True), "exclude each other")]:
        with pytest.raises(OptionsError, match=needle):
            run(recipe, opts)
    # the CLI shows the same check as a usage error
    code, _, err = cli("merge", zoo.single("sd1", 1), zoo.single("sd1", 2), "-m", "weighted_sum", "--dry",
                       "--branch", "b")
    assert code == 2 and "--branch only go with --push" in err, err


def test_the_flow_is_public_and_loads_lazily():
    code = ("import sys, hubmix\nassert 'hubmix.flow.run' not in sys.modules\n"
            "from hubmix import run, RunOptions, FlowResult, Cancelled\nimport hubmix.flow.run as m\n"
            "assert run is m.run and RunOptions is m.RunOptions and FlowResult is m.FlowResult\n"
            "print(sorted(x for x in ('torch', 'numpy', 'huggingface_hub') if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_missing_input_is_one_line_and_nothing_is_written(tmp_path, cli):
    code, _, err = cli("merge", tmp_path / "nope.safetensors", tmp_path / "nope2.safetensors", "-m", "weighted_sum",
                       "--out", tmp_path / "o")
    assert_one_line_error(code, err, "nope.safetensors")
    assert not (tmp_path / "o").exists()
