"""Shared fixtures: a zoo of tiny random models (built once per session), an in-process CLI runner, and an
independent reader of output tensors (safetensors' own loader, not hubmix's)."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch's ops on one thread: the tiny models' tensors are too small to gain from intra-op threads, whose spinning
# cost several times the CPU time (a busy or 2-core machine); tests of thread counts set them themselves.
os.environ.setdefault("OMP_NUM_THREADS", "1")


class Zoo:
    """Tiny models by (family, seed, options), built on first use and shared by every test of the session."""

    def __init__(self, root: Path):
        self.root = root
        self._tok = None

    def tokenizer(self) -> Path:
        if self._tok is None:
            from hubmix.formats.tiny import write_tokenizer

            self._tok = write_tokenizer(self.root / "_tokenizer")
        return self._tok

    def diffusers(self, family: str = "sd1", seed: int = 1, *, dtype: str = "fp32", inpainting: bool = False,
                  variant: str | None = None, shard: str | None = None) -> Path:
        import torch

        from hubmix.formats.tiny import save_tiny

        name = f"{family}-s{seed}-{dtype}{'-inpaint' if inpainting else ''}{'-' + variant if variant else ''}" \
               f"{'-shard' + shard if shard else ''}"
        path = self.root / name
        if not path.exists():
            save_tiny(path, family, seed, dtype={"fp32": torch.float32, "fp16": torch.float16}[dtype],
                      inpainting=inpainting, variant=variant, max_shard_size=shard, tokenizer_dir=self.tokenizer())
        return path

    def single(self, family: str = "sd1", seed: int = 1, **kw) -> Path:
        from hubmix.flow.convert import convert

        src = self.diffusers(family, seed, **kw)
        path = self.root / f"{src.name}.safetensors"
        if not path.exists():
            convert(src, path, to="single-file", quiet=True)
        return path

    def configs_only(self, folder: Path) -> Path:
        """A copy of a diffusers folder without weights: what diffusers' single-file loader takes as config."""
        dst = self.root / f"{folder.name}-configs"
        if not dst.exists():
            shutil.copytree(folder, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.json.index*"))
        return dst


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    os.environ.setdefault("HUBMIX_CACHE", str(tmp_path_factory.mktemp("hubmix-cache")))
    return Zoo(tmp_path_factory.mktemp("zoo"))


def run_cli(*args) -> tuple[int, str, str]:
    """Run `hubmix ARGS` in-process; returns (exit code, stdout, stderr)."""
    from hubmix.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args]) or 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def cli():
    return run_cli


def assert_one_line_error(code: int, err: str, *needles) -> str:
    """A failed command printed exactly one line, `error: ...`, containing every needle; returns that line."""
    assert code != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def load_tensors(path: Path) -> dict:
    """Every tensor of a safetensors file, read by safetensors itself."""
    from safetensors.torch import load_file

    return load_file(str(path))


def file_metadata(path: Path) -> dict:
    """A safetensors file's metadata, read by safetensors itself."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def component_tensors(folder: Path, component: str) -> dict:
    """A diffusers component's tensors (all shards), keys as stored."""
    out = {}
    for f in sorted((folder / component).glob("*.safetensors")):
        out.update(load_tensors(f))
    return out
