"""fp8 checkpoints (float8_e4m3fn, float8_e5m2): merged in float32 from the stored values with nothing rounded
first, kept fp8 when every input is fp8, identical bytes on every kernel path, exact round trips; quantized
formats hubmix does not read refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, load_tensors
from safetensors import safe_open
from safetensors.torch import save_file

import hubmix
from hubmix import Recipe
from hubmix.flow.convert import convert
from hubmix.engine.pipeline import Settings

LOSSLESS = {"alpha": 0.9, "beta": 1.1}


def recast(src: Path, out: Path, dtype: torch.dtype, then: torch.dtype | None = None) -> Path:
    """Every float tensor of `src` cast to `dtype` (and back up to `then`), metadata kept: made with safetensors
    and torch alone, independently of hubmix."""
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    sd = {}
    for k, v in load_tensors(src).items():
        if v.is_floating_point():
            v = v.to(dtype)
            if then is not None:
                v = v.to(then)
        sd[k] = v
    save_file(sd, str(out), metadata=meta)
    return out


@pytest.fixture(scope="module")
def fp8_inputs(zoo, tmp_path_factory):
    """(fp8 e4m3 files, their float32 upcasts) of three tiny Flux all-in-one checkpoints."""
    root = tmp_path_factory.mktemp("fp8")
    fp8 = [recast(zoo.single("flux", s), root / f"e4m3-{s}.safetensors", torch.float8_e4m3fn) for s in (1, 2, 3)]
    up = [recast(zoo.single("flux", s), root / f"up-{s}.safetensors", torch.float8_e4m3fn, torch.float32)
          for s in (1, 2, 3)]
    return fp8, up


def merge(paths, out, method="lossless", params=LOSSLESS, **kw):
    settings = kw.pop("settings", None)
    return hubmix.merge(Recipe(models=[str(p) for p in paths], method=method, params=params, **kw), out=out,
                        quiet=True, settings=settings)


def same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k].view(torch.uint8) if a[k].dtype.itemsize
                                                                         == 1 else a[k], b[k].view(torch.uint8)
                                                                         if b[k].dtype.itemsize == 1 else b[k])]
    assert not bad, bad[:5]


@pytest.mark.parametrize("method, params", [("lossless", LOSSLESS), ("weighted_sum", {"alpha": 0.3}),
                                            ("add_difference", {"alpha": 0.7})])
def test_fp8_inputs_merge_like_their_float32_upcasts(fp8_inputs, tmp_path, method, params):
    fp8, up = fp8_inputs
    n = 2 if method == "weighted_sum" else 3
    ref = load_tensors(merge(up[:n], tmp_path / "up.safetensors", method, params) and tmp_path / "up.safetensors")
    as_fp32 = merge(fp8[:n], tmp_path / "f32.safetensors", method, params, dtype="fp32")
    same(load_tensors(tmp_path / "f32.safetensors"), ref)
    assert as_fp32.canonical["dtype"] == "fp32"
    # default: every input is fp8, so the output is too: the float32 result rounded once, at the end
    merge(fp8[:n], tmp_path / "fp8.safetensors", method, params)
    got = load_tensors(tmp_path / "fp8.safetensors")
    want = {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v for k, v in ref.items()}
    same(got, want)


def test_fp8_bytes_identical_on_every_kernel_path(fp8_inputs, tmp_path):
    from hubmix.engine import native

    fp8, _ = fp8_inputs
    kinds = ["eager", "native"] if native.Native.library() is not None else ["eager"]
    for method, params, n in (("lossless", LOSSLESS, 3), ("weighted_sum", {"alpha": 0.3}, 2)):
        outs = []
        for kind in kinds:
            out = tmp_path / f"{method}-{kind}" / "out.safetensors"  # same name: same modelspec.title
            out.parent.mkdir()
            r = merge(fp8[:n], out, method, params, settings=Settings(kernels=kind))
            assert r.engine["kernels"][kind] > 0
            outs.append(out.read_bytes())
        assert len(set(outs)) == 1, method
    # small chunks split tensors (fp8 chunk offsets are byte offsets)
    r = merge(fp8, tmp_path / "small.safetensors", settings=Settings(kernels="eager", max_memory=1 << 20))
    assert r.engine["chunk_elements"] == 1 << 16
    same(load_tensors(tmp_path / "small.safetensors"), load_tensors(tmp_path / "lossless-eager" / "out.safetensors"))


def test_fp8_with_a_wider_input_keeps_the_wider_dtype_and_dtype_chooses(zoo, fp8_inputs, tmp_path, cli):
    fp8, _ = fp8_inputs
    bf16 = recast(zoo.single("flux", 2), tmp_path / "bf16.safetensors", torch.bfloat16)
    merge([fp8[0], bf16], tmp_path / "mixed.safetensors", "weighted_sum", {"alpha": 0.5})
    got = load_tensors(tmp_path / "mixed.safetensors")
    assert got["model.diffusion_model.img_in.weight"].dtype == torch.bfloat16
    out = tmp_path / "e5m2.safetensors"
    code, _, err = cli("merge", fp8[0], fp8[1], "--method", "weighted_sum", "--dtype", "fp8_e5m2", "--out", out)
    assert code == 0, err
    got = load_tensors(out)
    a, b = (load_tensors(p)["model.diffusion_model.img_in.weight"].float() for p in fp8[:2])
    assert torch.equal(got["model.diffusion_model.img_in.weight"].view(torch.uint8),
                       (0.5 * a + 0.5 * b).to(torch.float8_e5m2).view(torch.uint8))


def test_fp8_round_trips_through_both_layouts(fp8_inputs, zoo, tmp_path):
    fp8, _ = fp8_inputs
    folder = tmp_path / "folder"
    convert(fp8[0], folder, to="diffusers", config_from=str(zoo.diffusers("flux", 1)), quiet=True)
    t = load_tensors(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    assert t["x_embedder.weight"].dtype == torch.float8_e4m3fn
    back = tmp_path / "back.safetensors"
    convert(folder, back, to="single-file", quiet=True)
    same(load_tensors(back), load_tensors(fp8[0]))


def _nf4(path: Path) -> Path:
    w = torch.zeros(8, dtype=torch.uint8)
    save_file({"double_blocks.0.img_attn.qkv.weight": w, "double_blocks.0.img_attn.qkv.weight.absmax": w.float(),
               "double_blocks.0.img_attn.qkv.weight.quant_map": w.float(),
               "double_blocks.0.img_attn.qkv.weight.quant_state.bitsandbytes__nf4": w.clone()}, str(path))
    return path


def _nvfp4(path: Path) -> Path:
    """ComfyUI's quantized layout in a format hubmix does not dequantize (tests/test_quant.py reads the others)."""
    w = torch.zeros(4, 2, dtype=torch.uint8)
    conf = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    save_file({"double_blocks.0.img_attn.qkv.weight": w, "double_blocks.0.img_attn.qkv.comfy_quant": conf,
               "double_blocks.0.img_attn.qkv.weight_scale": torch.ones(1)}, str(path))
    return path


def _int8(path: Path) -> Path:
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4, dtype=torch.int8),
               "double_blocks.0.img_attn.qkv.SCB": torch.ones(4)}, str(path))
    return path


@pytest.mark.parametrize("make, words", [
    (lambda p: (p.write_bytes(b"GGUF" + bytes(60)), p)[1], "GGUF"),
    (_nf4, "bitsandbytes quant state"),  # a quant state that is no JSON
    (_nvfp4, "nvfp4"),
    (_int8, "LLM.int8"),
])
def test_quantized_formats_refused_by_name(zoo, tmp_path, cli, make, words):
    suffix = ".gguf" if words == "GGUF" else ".safetensors"
    bad = make(tmp_path / f"q{suffix}")
    code, _, err = cli("merge", zoo.single("flux", 1), bad, "--method", "weighted_sum", "--out",
                       tmp_path / "out.safetensors")
    assert_one_line_error(code, err, bad.name, words)
    assert not (tmp_path / "out.safetensors").exists()
    if words == "GGUF":  # by its magic, whatever the name
        renamed = tmp_path / "disguised.safetensors"
        renamed.write_bytes(bad.read_bytes())
        code, _, err = cli("inspect", renamed)
        assert_one_line_error(code, err, "GGUF")


def test_fp8_never_goes_to_torch_compile(fp8_inputs, tmp_path):
    """inductor cannot compile fp8 selections: with --kernels compile, fp8 chunks run eagerly, same bytes."""
    from hubmix.engine import kernels

    if not kernels.compiler_available():
        pytest.skip("no C++ compiler for torch.compile")
    fp8, _ = fp8_inputs
    outs = []
    for kind in ("eager", "compile"):
        out = tmp_path / kind / "out.safetensors"
        out.parent.mkdir()
        r = merge(fp8, out, settings=Settings(kernels=kind))
        assert r.engine["kernels"]["compiled"] == 0 and not any("unavailable" in n for n in
                                                                 r.summary.events.get("note", []))
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
