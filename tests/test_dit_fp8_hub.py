"""The newer families (Qwen-Image, Wan, Z-Image, Lumina 2, FLUX.2, Chroma; a few stand for all) through the
machinery the older ones have: fp8 inputs (plain float8 and ComfyUI's scaled fp8, bare or ComfyUI-prefixed
transformer-only files) merge exactly like their dequantized float32 files; a merge of Hub inputs pushed to the
loopback Hub reproduces byte for byte; `--remote` runs it as a loopback Hugging Face Job with the same bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import load_tensors
from quant_files import comfy_dequantize, comfy_scaled_fp8, save_float
from safetensors import safe_open
from safetensors.torch import save_file
from test_fp8 import merge, recast, same
from test_jobs import hub  # noqa: F401 - the loopback Hub fixture, over this module's `seeded`

TOKEN = "hf_test_token_user"


def _prefixed(src: Path, out: Path, prefix: str = "model.diffusion_model.") -> Path:
    """`src`'s tensors under ComfyUI's prefix, metadata kept (safetensors alone, independent of hubmix)."""
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    save_file({prefix + k: v for k, v in load_tensors(src).items()}, str(out), metadata=meta)
    return out


@pytest.mark.parametrize("name", ["wan", "z_image"])
def test_fp8_inputs_merge_like_their_dequantized_floats(zoo, tmp_path, name):
    """Plain float8 (bare keys) and ComfyUI scaled fp8 (legacy marker, bare; per-row `weight_scale` with
    `_quantization_metadata`, ComfyUI-prefixed) transformer-only files: merged in float32 they give the bytes of the
    merge of their dequantized float32 files (made with torch and the reference dequantization alone)."""
    a, b, c = (zoo.single(name, s) for s in (1, 2, 3))
    plain = recast(a, tmp_path / "a-e4m3.safetensors", torch.float8_e4m3fn)
    plain_ref = recast(a, tmp_path / "a-up.safetensors", torch.float8_e4m3fn, torch.float32)
    legacy = comfy_scaled_fp8(b, tmp_path / "b-scaled.safetensors", "legacy", prefix="")
    prefixed = _prefixed(c, tmp_path / "c-comfy.safetensors")
    per_row = comfy_scaled_fp8(prefixed, tmp_path / "c-scaled.safetensors", "metadata", per_row=True)
    refs = [plain_ref, save_float(comfy_dequantize(legacy), tmp_path / "b-ref.safetensors", b),
            save_float(comfy_dequantize(per_row), tmp_path / "c-ref.safetensors", c)]
    params = {"alpha": 0.4, "beta": 0.25}
    merge([plain, legacy, per_row], tmp_path / "q.safetensors", "triple_sum", params, dtype="fp32")
    merge(refs, tmp_path / "f.safetensors", "triple_sum", params, dtype="fp32")
    got, want = load_tensors(tmp_path / "q.safetensors"), load_tensors(tmp_path / "f.safetensors")
    same(got, want)
    assert set(got) == set(load_tensors(a)) and any(not torch.equal(got[k], load_tensors(a)[k]) for k in got)


# ---- the loopback Hub: push, reproduce, --remote ----------------------------------------------------------------

def _files(path: Path) -> dict[str, bytes | Path]:
    if path.is_file():
        return {path.name: path}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def seeded(zoo, tmp_path_factory):
    """A loopback Hub with jobs: per family, org/<family>-a (a diffusers folder) and org/<family>-b (a bare
    transformer-only file, the layout its authors publish)."""
    import jobimage
    from hubjobs import enable_jobs
    from hubserver import start_hub_server

    server = start_hub_server(tokens={TOKEN: "user"})
    runner = enable_jobs(server, images={IMAGE: jobimage.image(tmp_path_factory.mktemp("image"))})
    for name in FAMILIES:
        server.create_repo(f"org/{name}-a")
        server.commit(f"org/{name}-a", _files(zoo.diffusers(name, 1)))
        server.create_repo(f"org/{name}-b")
        server.commit(f"org/{name}-b", {"model.safetensors": zoo.single(name, 2)})
    server.runner = runner
    yield server
    runner.stop()
    server.stop()
    assert server.errors == []


IMAGE = "pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime"
FAMILIES = ["qwen_image", "chroma", "wan"]


@pytest.mark.parametrize("name", ["qwen_image", "chroma"])
def test_push_then_reproduce_byte_identical(hub, cli, tmp_path, name):
    """A mixed-layout merge of two Hub repos (a diffusers folder, a transformer-only file), pushed: `reproduce`
    rebuilds it from the pinned inputs and finds every file identical."""
    out = tmp_path / "out"
    code, _, err = cli("merge", f"org/{name}-a", f"org/{name}-b/model.safetensors", "-m", "weighted_sum",
                       "--alpha", "0.3", "--out", out, "--push", f"user/{name}-mix", "-q")
    assert code == 0, err
    pushed = hub.files(f"user/{name}-mix")
    assert "transformer/diffusion_pytorch_model.safetensors" in pushed and "recipe.yaml" in pushed
    code, stdout, err = cli("reproduce", f"user/{name}-mix", "-q")
    assert code == 0, err + stdout
    assert "files identical" in stdout and "DIFFERENT" not in stdout, stdout


def test_remote_merge_equals_the_local_one(hub, cli, tmp_path):
    """`--remote` on Wan inputs: the job (hubmix from this tree's wheel, inputs mounted at pinned commits) pushes
    the same bytes a local merge writes, and `reproduce` of the pushed result finds them identical."""
    inputs = ["org/wan-a", "org/wan-b/model.safetensors"]
    code, out, err = cli("merge", *inputs, "-m", "weighted_sum", "--alpha", "0.6", "--push", "user/wan-remote",
                         "--remote", "--flavor", "cpu-upgrade")
    assert code == 0, err
    assert out.strip().splitlines()[-1].endswith(hub.resolve("user/wan-remote"))
    local = tmp_path / "local"
    code, _, err = cli("merge", *inputs, "-m", "weighted_sum", "--alpha", "0.6", "--out", local, "-q")
    assert code == 0, err
    pushed = hub.files("user/wan-remote")
    weights = sorted(p for p in pushed if p.endswith(".safetensors"))
    assert "transformer/diffusion_pytorch_model.safetensors" in weights
    for path in weights + ["recipe.yaml", "model_index.json", "transformer/config.json"]:
        assert hashlib.sha256(pushed[path]).digest() == hashlib.sha256((local / path).read_bytes()).digest(), path
    code, stdout, err = cli("reproduce", "user/wan-remote", "-q")
    assert code == 0 and "files identical" in stdout, stdout + err
