"""Faults and bad input (docs/faults.md): each one ends in one line naming the file or repo, a non-zero exit and
nothing left at the target, or (numerics) in a warning the user sees."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from conftest import assert_one_line_error


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


# ---- non-finite parameters, YAML positions, malicious pickles, file modes ---------------------------------------

@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_parameters_are_refused(tmp_path, zoo, cli, value):
    out = tmp_path / "out"
    code, _, err = cli("merge", zoo.diffusers("sd1", 1), zoo.diffusers("sd1", 2), zoo.diffusers("sd1", 3),
                       "-m", "add_difference", "--alpha", value, "--out", out)
    assert_one_line_error(code, err, "alpha", "finite")
    assert not out.exists()


def test_non_finite_parameters_in_recipes_are_refused(tmp_path, cli):
    f = tmp_path / "r.yaml"
    f.write_text("models: [a, b, c]\nmethod: lossless\ncomponents:\n  unet:\n    blocks: {IN00: {beta: .inf}}\n")
    code, _, err = cli("merge", "--recipe", f, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "components.unet.blocks.IN00", "beta", "finite")


def test_yaml_errors_give_line_and_column(tmp_path, cli):
    f = tmp_path / "bad.yaml"
    f.write_text("models: [a, b]\nmethod: weighted_sum\nparams:\n  alpha: [0.3\n")
    code, _, err = cli("merge", "--recipe", f, "--out", tmp_path / "out")
    line = assert_one_line_error(code, err, "bad.yaml", "not valid YAML", "line 5, column 1")
    assert "while parsing" not in line or "line 5" in line


def test_malicious_ckpt_names_the_global(tmp_path, cli):
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"w": torch.zeros(2), "x": Evil()}, path)
    code, _, err = cli("inspect", path)
    line = assert_one_line_error(code, err, "evil.ckpt", "posix.system")
    assert "weights_only" not in line and "add_safe_globals" not in line
    assert not (tmp_path / "pwned").exists()


def test_sidecar_mode_matches_the_weights(tmp_path, zoo):
    import hubmix
    from hubmix import Recipe

    out = tmp_path / "m.safetensors"
    hubmix.merge(Recipe(models=[str(zoo.single("sd1", 1)), str(zoo.single("sd1", 2))], method="weighted_sum"),
                 out=out, quiet=True)
    want = 0o666 & ~_umask()
    assert stat.S_IMODE(out.stat().st_mode) == want
    assert stat.S_IMODE((tmp_path / "m.recipe.yaml").stat().st_mode) == want


# ---- a FIFO (or any non-regular file) as input ------------------------------------------------------------------

def _hubmix(*args, timeout: float = 60):
    """hubmix in a child process (a hang must not hang the test run)."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    return subprocess.run([sys.executable, "-m", "hubmix", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_fifo_inputs_are_refused(tmp_path, zoo):
    import shutil

    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    out = tmp_path / "out.safetensors"
    r = _hubmix("merge", fifo, zoo.single("sd1", 1), "-m", "weighted_sum", "--out", out, "-q")
    assert_one_line_error(r.returncode, r.stderr, "pipe.safetensors", "not a regular file")
    # a FIFO inside a diffusers folder: as a weight file and as a config
    for rel in ("unet/diffusion_pytorch_model.safetensors", "vae/config.json"):
        model = tmp_path / f"model-{rel.split('/')[0]}"
        shutil.copytree(zoo.diffusers("sd1", 1), model)
        (model / rel).unlink()
        os.mkfifo(model / rel)
        r = _hubmix("merge", model, zoo.diffusers("sd1", 2), "-m", "weighted_sum", "--out", out, "-q")
        assert_one_line_error(r.returncode, r.stderr, rel.split("/")[-1], "not a regular file")
    assert not out.exists() and _leftovers(tmp_path) == []


# ---- corrupt safetensors headers ------------------------------------------------------------------------------------

def _safetensors(path: Path, header: dict | str, data: bytes) -> Path:
    import json
    import struct

    raw = header if isinstance(header, str) else json.dumps(header)
    path.write_bytes(struct.pack("<Q", len(raw.encode())) + raw.encode() + data)
    return path


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BAD_HEADERS = {
    "overlap": ({"a": F32x2, "b": F32x2}, 8, "overlap"),
    "negative-dims": ({"a": {"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}}, 8, "shape"),
    "float-dims": ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, 8, "shape"),
    "bool-dims": ({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, 8, "shape"),
    "gap": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, "offset"),
    "trailing": ({"a": F32x2}, 12, "bytes"),
    "reversed": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, 8, "offset"),
    "unknown-dtype": ({"a": {"dtype": "F128", "shape": [2], "data_offsets": [0, 8]}}, 8, "dtype"),
    "metadata-not-strings": ({"__metadata__": {"x": 1}, "a": F32x2}, 8, "__metadata__"),
    "deep": ('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}", 0, "nested"),
    "not-an-object": ("[]", 0, "object"),
}


@pytest.mark.parametrize("name", sorted(BAD_HEADERS))
def test_corrupt_headers_are_refused(tmp_path, cli, name):
    header, size, needle = BAD_HEADERS[name]
    path = _safetensors(tmp_path / f"{name}.safetensors", header, b"\0" * size)
    code, _, err = cli("inspect", path)
    assert_one_line_error(code, err, f"{name}.safetensors", "corrupt safetensors header", needle)
    # the safetensors library agrees that each of these is broken
    from safetensors import safe_open

    with pytest.raises(Exception):
        with safe_open(str(path), "pt") as f:
            [f.get_tensor(k) for k in f.keys()]


def test_overlapping_tensors_are_not_merged(tmp_path, zoo, cli):
    """A real checkpoint whose header makes two tensors share bytes: refused before any merge."""
    import json
    import struct

    src = zoo.single("sd1", 1).read_bytes()
    (n,) = struct.unpack("<Q", src[:8])
    header = json.loads(src[8:8 + n])
    keys = [k for k, v in header.items() if k != "__metadata__" and v["shape"] == [32]][:2]
    header[keys[1]]["data_offsets"] = header[keys[0]]["data_offsets"]
    raw = json.dumps(header).encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw + src[8 + n:])
    out = tmp_path / "out.safetensors"
    code, _, err = cli("merge", bad, zoo.single("sd1", 2), "-m", "weighted_sum", "--out", out)
    assert_one_line_error(code, err, "bad.safetensors", "corrupt safetensors header")
    assert not out.exists()


# ---- path traversal through model_index.json ------------------------------------------------------------------------

@pytest.mark.parametrize("entry", ["../secret", "/tmp", "unet/../../secret", ".."])
def test_model_index_entries_are_plain_folder_names(tmp_path, zoo, cli, entry):
    import json
    import shutil

    model = tmp_path / "m" / "model"
    shutil.copytree(zoo.diffusers("sd1", 1), model)
    (tmp_path / "m" / "secret").mkdir()
    (tmp_path / "m" / "secret" / "key.txt").write_text("not yours")
    index = json.loads((model / "model_index.json").read_text())
    index[entry] = ["diffusers", "UNet2DConditionModel"]
    (model / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "o").mkdir()
    out = tmp_path / "o" / "out"
    code, _, err = cli("merge", model, zoo.diffusers("sd1", 2), "-m", "weighted_sum", "--out", out)
    assert_one_line_error(code, err, "model_index.json", repr(entry), "not a plain folder name")
    assert list((tmp_path / "o").iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["m", "o"]


# ---- tracebacks instead of one line: full disks, an output parent that is a file -----------------------------------

def _enospc(*_a, **_k):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_copying_tokenizers(tmp_path, zoo, cli, monkeypatch):
    import shutil

    real = shutil.copyfile

    def copyfile(src, dst, *a, **k):
        if "tokenizer" in str(dst):
            _enospc()
        return real(src, dst, *a, **k)

    monkeypatch.setattr(shutil, "copyfile", copyfile)
    (tmp_path / "o").mkdir()
    out = tmp_path / "o" / "out"
    code, _, err = cli("merge", zoo.diffusers("sd1", 1), zoo.diffusers("sd1", 2), "-m", "weighted_sum",
                       "--out", out, "-q")
    line = assert_one_line_error(code, err, str(out), "No space left on device")
    assert ".hubmix-" not in line and list((tmp_path / "o").iterdir()) == []


@pytest.mark.parametrize("layout", ["single-file", "diffusers"])
def test_disk_full_names_the_target_not_the_temporary(tmp_path, zoo, cli, monkeypatch, layout):
    real = os.pwrite

    def pwrite(fd, data, offset):
        if len(data) > 4096:  # tensor data, not the header
            _enospc()
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    (tmp_path / "o").mkdir()
    out = tmp_path / "o" / ("out.safetensors" if layout == "single-file" else "out")
    code, _, err = cli("merge", zoo.diffusers("sd1", 1), zoo.diffusers("sd1", 2), "-m", "weighted_sum",
                       "--out", out, "-q")
    line = assert_one_line_error(code, err, str(out), "No space left on device")
    assert ".hubmix-" not in line and list((tmp_path / "o").iterdir()) == []


def test_output_parent_that_is_a_file(tmp_path, zoo, cli):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file" / "out", tmp_path / "file" / "out.safetensors"):
        code, _, err = cli("merge", zoo.diffusers("sd1", 1), zoo.diffusers("sd1", 2), "-m", "weighted_sum",
                           "--out", out)
        assert_one_line_error(code, err, str(out), "not a folder")
    assert (tmp_path / "file").read_text() == "x"


# ---- a single file and its recipe: together or not at all ---------------------------------------------------------

def _sidecar_hash(path: Path) -> str:
    import re

    return re.search(r"sha256 ([0-9a-f]{64})", path.read_text()).group(1)


def _weights_hash(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()["hubmix.recipe_sha256"]


def test_disk_full_while_writing_the_sidecar(tmp_path, zoo, cli, monkeypatch):
    import hubmix.flow.merging

    a, b = zoo.single("sd1", 1), zoo.single("sd1", 2)
    monkeypatch.setattr(hubmix.flow.merging, "recipe_yaml", _enospc)
    (tmp_path / "o").mkdir()
    out = tmp_path / "o" / "m.safetensors"
    code, _, err = cli("merge", a, b, "-m", "weighted_sum", "--out", out, "-q")
    assert_one_line_error(code, err, "m.", "No space left on device")
    assert list((tmp_path / "o").iterdir()) == []


def test_racing_merges_never_mix_weights_and_recipes(tmp_path, zoo, monkeypatch):
    """Merge B runs while merge A is installing its result: the target ends with one merge's weights and that same
    merge's recipe."""
    import threading

    import hubmix
    from hubmix import Recipe

    inputs = [str(zoo.single("sd1", 1)), str(zoo.single("sd1", 2))]
    out = tmp_path / "m.safetensors"
    real = os.replace
    state = {"hooked": False, "error": None}

    def merge_b():
        try:
            hubmix.merge(Recipe(models=inputs, method="weighted_sum", params={"alpha": 0.9}), out=out,
                         overwrite=True, quiet=True)
        except BaseException as e:  # noqa: BLE001
            state["error"] = e

    b = threading.Thread(target=merge_b)

    def replace(src, dst, *a, **k):
        real(src, dst, *a, **k)
        if Path(dst) == out and not state["hooked"]:  # A's weights just went in
            state["hooked"] = True
            b.start()
            b.join(timeout=3)  # B may run to its end, or wait for A's final step to finish

    monkeypatch.setattr(os, "replace", replace)
    hubmix.merge(Recipe(models=inputs, method="weighted_sum", params={"alpha": 0.1}), out=out, quiet=True)
    b.join()
    assert state["hooked"] and state["error"] is None
    assert _sidecar_hash(tmp_path / "m.recipe.yaml") == _weights_hash(out)
    assert _leftovers(tmp_path) == []


# ---- replacing a folder while another process takes its name -------------------------------------------------------

def test_folder_replace_race(tmp_path, zoo, monkeypatch):
    import hubmix
    from hubmix import Recipe

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous result")
    real = os.rename
    state = {"n": 0}

    def rename(src, dst, *a, **k):
        real(src, dst, *a, **k)
        if Path(src) == out and state["n"] == 0:  # the old result was parked: another merge takes the name
            state["n"] += 1
            out.mkdir()
            (out / "intruder.txt").write_text("theirs")

    monkeypatch.setattr(os, "rename", rename)
    hubmix.merge(Recipe(models=[str(zoo.diffusers("sd1", s)) for s in (1, 2)], method="weighted_sum"), out=out,
                 overwrite=True, quiet=True)
    assert state["n"] == 1 and (out / "model_index.json").is_file()
    assert not (out / "intruder.txt").exists() and not (out / "old.txt").exists()
    assert _leftovers(tmp_path) == []


# ---- leftovers of killed runs ---------------------------------------------------------------------------------------

KILLED = """
import sys, time
from hubmix.engine import pipeline
real = pipeline.compute
def slow(*a, **k):
    time.sleep(0.05)
    return real(*a, **k)
pipeline.compute = slow
from hubmix.cli import main
main(sys.argv[1:])
"""


def test_a_later_run_removes_temporaries_of_killed_runs(tmp_path, zoo):
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "o").mkdir()
    out = tmp_path / "o" / "out.safetensors"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    args = [zoo.single("sd1", 1), zoo.single("sd1", 2), "-m", "weighted_sum", "--out", out, "-q", "--workers", "1"]
    child = subprocess.Popen([sys.executable, "-c", KILLED, "merge", *map(str, args)], env=env)
    deadline = time.monotonic() + 120
    while not _leftovers(tmp_path / "o") and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    stale = _leftovers(tmp_path / "o")
    assert stale and not out.exists()  # what kill -9 leaves: a hidden temporary
    # a temporary of a live process (this one) is not touched
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]
    live = tmp_path / "o" / f".out.safetensors.hubmix-tmp-{os.getpid()}-{boot}-0123abcd"
    live.write_bytes(b"in progress")
    import hubmix
    from hubmix import Recipe

    hubmix.merge(Recipe(models=[str(a) for a in args[:2]], method="weighted_sum"), out=out, quiet=True)
    assert _leftovers(tmp_path / "o") == [live.name] and out.is_file()


# ---- silent numerics: NaN/inf inputs ---------------------------------------------------------------------------------

def test_non_finite_inputs_are_counted_per_component(tmp_path, zoo, cli, monkeypatch):
    import torch
    from safetensors.torch import load_file, save_file

    from hubmix.engine import pipeline

    src = zoo.single("sd1", 2)
    tensors = load_file(str(src))
    unet = sorted(k for k in tensors if k.startswith("model.diffusion_model.") and tensors[k].numel() > 64)
    te = sorted(k for k in tensors if k.startswith("cond_stage_model.") and tensors[k].dtype.is_floating_point)
    tensors[unet[0]].view(-1)[:3] = float("nan")
    tensors[unet[1]].view(-1)[5] = float("inf")
    tensors[te[0]].view(-1)[0] = float("-inf")
    bad = tmp_path / "bad.safetensors"
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        save_file(tensors, str(bad), metadata=f.metadata())
    monkeypatch.setattr(pipeline, "DEFAULT_CHUNK", 1000)  # chunked tensors too
    for method, models in (("lossless", [zoo.single("sd1", 1), bad, zoo.single("sd1", 3)]),
                           ("weighted_sum", [zoo.single("sd1", 1), bad])):
        out = tmp_path / f"{method}.safetensors"
        code, _, err = cli("merge", *models, "-m", method, "--out", out, "-q", "--workers", "2")
        assert code == 0, err
        warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
        assert len(warnings) == 2, err
        unet_line = next(ln for ln in warnings if "unet:" in ln)
        assert "unet: 4 non-finite (NaN/inf) elements in b (bad.safetensors) (2 tensors" in unet_line
        te_line = next(ln for ln in warnings if "text_encoder:" in ln)
        assert "text_encoder: 1 non-finite (NaN/inf) elements in b (bad.safetensors) (1 tensors" in te_line
    clean = tmp_path / "clean.safetensors"
    code, _, err = cli("merge", zoo.single("sd1", 1), zoo.single("sd1", 3), "-m", "weighted_sum", "--out", clean,
                       "-q")
    assert code == 0 and "warning" not in err
    assert torch.isfinite(load_file(str(clean))[unet[0]]).all()


def test_a_sidecar_of_other_weights_is_not_theirs(tmp_path, zoo):
    """What a crash between the final step's two renames leaves (a newer recipe beside older weights) is not taken
    as the weights' recipe: not uploaded with them, and the weights' own metadata is read."""
    import shutil

    import hubmix
    from hubmix import Recipe
    from hubmix.flow.result import load_result, result_files

    inputs = [str(zoo.single("sd1", 1)), str(zoo.single("sd1", 2))]
    for name, alpha in (("m", 0.2), ("n", 0.7)):
        hubmix.merge(Recipe(models=inputs, method="weighted_sum", params={"alpha": alpha}),
                     out=tmp_path / f"{name}.safetensors", quiet=True)
    assert sorted(result_files(tmp_path / "m.safetensors")) == ["m.recipe.yaml", "m.safetensors"]
    shutil.copy(tmp_path / "n.recipe.yaml", tmp_path / "m.recipe.yaml")
    assert sorted(result_files(tmp_path / "m.safetensors")) == ["m.safetensors"]
    assert load_result(tmp_path / "m.safetensors").canonical["params"]["alpha"] == 0.2
