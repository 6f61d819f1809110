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
