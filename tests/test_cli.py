"""The command line: bad inputs give one-line errors naming the file, a non-zero exit and nothing at the target."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_one_line_error

CONFIGS = Path(__file__).parent.parent / "configs"


def test_missing_path(tmp_path, zoo, cli):
    out = tmp_path / "out"
    code, _, err = cli("merge", "./does/not/exist", zoo.diffusers("sd1", 1), "-m", "weighted_sum", "--out", out)
    assert_one_line_error(code, err, "does/not/exist", "no such file")
    assert not out.exists()


def test_folder_that_is_no_model(tmp_path, zoo, cli):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hi")
    out = tmp_path / "out"
    code, _, err = cli("merge", junk, zoo.diffusers("sd1", 1), "-m", "weighted_sum", "--out", out)
    assert_one_line_error(code, err, str(junk), "not a model")
    assert not out.exists()


def test_truncated_safetensors(tmp_path, zoo, cli):
    src = zoo.single("sd1", 1)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    out = tmp_path / "out.safetensors"
    code, _, err = cli("merge", cut, src, "-m", "weighted_sum", "--out", out)
    assert_one_line_error(code, err, "cut.safetensors", "truncated")
    assert not out.exists()
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 100)
    code, _, err = cli("inspect", garbage)
    assert_one_line_error(code, err, "garbage.safetensors")


def test_corrupt_files_inside_models(tmp_path, zoo, cli):
    """A garbage .ckpt, a broken shard index, a header whose metadata is not a mapping: one line each."""
    import json
    import struct

    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(bytes(range(256)) * 16)
    code, _, err = cli("inspect", junk)
    assert_one_line_error(code, err, "junk.ckpt", "not a readable torch checkpoint")
    sharded = tmp_path / "sharded"
    shutil.copytree(zoo.diffusers("sd1", 1, shard="2MB"), sharded)
    next((sharded / "unet").glob("*.index.json")).write_text("{not json")
    code, _, err = cli("inspect", sharded)
    assert_one_line_error(code, err, "index.json", "not a weights index")
    header = json.dumps({"__metadata__": ["x"], "t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    bad_meta = tmp_path / "meta.safetensors"
    bad_meta.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 4)
    code, _, err = cli("inspect", bad_meta)
    assert_one_line_error(code, err, "meta.safetensors", "__metadata__")


def test_family_mismatch(tmp_path, zoo, cli):
    out = tmp_path / "out"
    code, _, err = cli("merge", zoo.diffusers("sd1", 1), zoo.single("sdxl", 1), "-m", "weighted_sum", "--out", out)
    assert_one_line_error(code, err, "different families", "Stable Diffusion 1.x", "Stable Diffusion XL")
    assert not out.exists()


def test_existing_target(tmp_path, zoo, cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    code, _, err = cli("merge", zoo.diffusers("sd1", 1), zoo.diffusers("sd1", 2), "-m", "weighted_sum", "--out", out)
    assert_one_line_error(code, err, str(out), "already exists", "--overwrite")
    assert (out / "mine.txt").read_text() == "keep" and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("args, needle", [
    (["-m", "add_difference"], "merges 3 models, got 2"),
    (["-m", "weighted_sum", "--alpha", "2"], "outside"),
    (["-m", "weighted_sum", "--beta", "1"], "no parameter beta"),
    (["-m", "weighted_sum", "--components", "unet,tail"], "unknown tail"),
])
def test_bad_arguments(tmp_path, zoo, cli, args, needle):
    out = tmp_path / "out"
    code, _, err = cli("merge", zoo.diffusers("sd1", 1), zoo.diffusers("sd1", 2), *args, "--out", out)
    assert_one_line_error(code, err, needle)
    assert not out.exists()


@pytest.mark.parametrize("text, needle", [
    ("models: [a]\n", "'models' and 'method' are required"),
    ("models: [a, b]\nmethod: lossless\nbogus: 1\n", "unknown field(s) bogus"),
    ("models: [a, b, c]\nmethod: lossless\ncomponents: {vae: {from: d}}\n", "from: 'd' is not one of the models"),
    ("models: [a, b]\nmethod: [\n", "not valid YAML"),
    ("models: [a, b, c]\nmethod: lossless\ncomponents: {tail: {}}\n", "unknown component"),
    ("models: [a, b, c]\nmethod: lossless\ncomponents: [unet]\n", "'components' must be a mapping"),
    ("models: [a, b]\nmethod: weighted_sum\nparams: 0.3\n", "'params' must be a mapping"),
    ("models: [a, b]\nmethod: weighted_sum\nema: 'no'\n", "'ema' must be true or false"),
])
def test_bad_recipes(tmp_path, cli, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    code, _, err = cli("merge", "--recipe", f, "--out", tmp_path / "out")
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "out").exists()


def test_recipe_and_arguments_do_not_mix(tmp_path, cli):
    f = tmp_path / "r.yaml"
    f.write_text("models: [a, b]\nmethod: weighted_sum\n")
    code, _, err = cli("merge", "--recipe", f, "--alpha", "0.2", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "--alpha")


def test_example_recipes_validate():
    from hubmix import Recipe

    files = sorted(CONFIGS.glob("*.yaml"))
    assert files
    for f in files:
        Recipe.load(f)


def test_example_recipe_runs_as_documented(zoo, tmp_path, cli, monkeypatch):
    """configs/lossless-3way.yaml names ./models/a, b, c relative to where hubmix runs."""
    models = tmp_path / "models"
    models.mkdir()
    for letter, seed in zip("abc", (1, 2, 3)):
        shutil.copytree(zoo.diffusers("sd1", seed), models / letter)
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("merge", "--recipe", CONFIGS / "lossless-3way.yaml", "-q")
    assert code == 0, err
    assert (tmp_path / "merged-from-recipe" / "model_index.json").is_file()


def test_help_lists_methods_and_the_reference_rule(cli):
    code, out, _ = cli("merge", "--help")
    assert code == 0
    for needle in ("lossless", "maxdiff", "weighted_sum", "add_difference", "--ref-alpha", "existing local path"):
        assert needle in out
    code, out, _ = cli("methods")
    assert code == 0 and "where(|a - alpha*b| <= |a - beta*c|, b, c)" in out


def test_real_process_exit_code_and_stderr(tmp_path):
    """The installed entry point, as a user runs it."""
    exe = shutil.which("hubmix") or f"{sys.executable} -m hubmix"
    r = subprocess.run([*exe.split(), "inspect", str(tmp_path / "nope")], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: ") and r.stderr.count("\n") == 1


def test_the_program_exits_with_main_code_and_all_its_output(tmp_path, cli):
    """`hubmix` (cli.run) skips the interpreter's teardown: its output must still be complete and its exit code
    main's, for a success, a one-line error and a usage error."""
    import subprocess
    import sys

    for args in (["methods"], ["merge", str(tmp_path / "none.safetensors"), "x", "-m", "lossless", "--out",
                               str(tmp_path / "o.safetensors")], ["merge"]):
        code, out, err = cli(*args)
        p = subprocess.run([sys.executable, "-m", "hubmix", *args], capture_output=True, text=True)
        assert (p.returncode, p.stdout) == (code, out), args
        assert p.stderr.strip().splitlines()[-1:] == err.strip().splitlines()[-1:], args
    assert code == 2 and not (tmp_path / "o.safetensors").exists()
