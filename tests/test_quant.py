"""Quantized checkpoints in and out: ComfyUI scaled fp8 (both forms) and bitsandbytes NF4/FP4 read exactly as their
reference implementations dequantize them, merged with each other and with plain models, and written back as
--dtype fp8_scaled / nf4 files that load through ComfyUI's rule and bitsandbytes' own dequantization."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, load_tensors
from quant_files import (PREFIX, bnb_4bit, bnb_dequantize, comfy_dequantize, comfy_scaled_fp8, linear_weights,
                         save_float)
from safetensors.torch import load_file, save_file

import hubmix
from hubmix import Recipe
from hubmix.formats.io.readers import open_weight_file
from hubmix.formats.quant import wrap

pytest.importorskip("bitsandbytes")


def merge(paths, out, method="weighted_sum", params=None, **kw):
    params = {"alpha": 0.3} if params is None else params
    return hubmix.merge(Recipe(models=[str(p) for p in paths], method=method, params=params, **kw), out=out,
                        quiet=True)


def same_bytes(a: dict, b: dict) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    bad = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
           or a[k].view(torch.uint8).ne(b[k].view(torch.uint8)).any()]
    assert not bad, bad[:5]


@pytest.fixture(scope="module")
def flux(zoo):
    return [zoo.single("flux", s) for s in (1, 2, 3)]


@pytest.fixture(scope="module")
def qroot(tmp_path_factory):
    return tmp_path_factory.mktemp("quant")


# ---- reading ---------------------------------------------------------------------------------------------------

FP8_FORMS = [("legacy", torch.float8_e4m3fn, False, 1.0), ("legacy", torch.float8_e5m2, False, 0.5),
             ("metadata", torch.float8_e4m3fn, False, None), ("tensors", torch.float8_e4m3fn, True, 2.0),
             ("tensors", torch.float8_e5m2, False, None)]


@pytest.mark.parametrize("form, fp8, per_row, input_scale", FP8_FORMS)
def test_scaled_fp8_reads_as_comfyui_dequantizes(flux, qroot, form, fp8, per_row, input_scale):
    path = comfy_scaled_fp8(flux[0], qroot / f"fp8-{form}-{fp8}-{per_row}.safetensors", form, fp8, per_row,
                            input_scale)
    want = comfy_dequantize(path)
    f = wrap(open_weight_file(path))
    assert sorted(f.keys()) == sorted(want)  # scales, markers, input scales and layer configs consumed
    for k, v in want.items():
        got = f.tensor(k)
        assert got.dtype == v.dtype and torch.equal(got, v), k
    k = linear_weights(load_file(str(flux[0])))[0]
    assert f.quant_type(k).startswith("fp8_scaled " + str(fp8).removeprefix("torch.float8_"))
    n = want[k].numel()
    assert torch.equal(f.tensor_range(k, 5, n - 3), want[k].reshape(-1)[5:n - 3])


@pytest.mark.parametrize("quant_type, nested", [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)])
def test_bnb_4bit_reads_as_bitsandbytes_dequantizes(flux, qroot, quant_type, nested):
    path = bnb_4bit(flux[0], qroot / f"bnb-{quant_type}-{nested}.safetensors", quant_type, nested)
    want = bnb_dequantize(path)
    f = wrap(open_weight_file(path))
    assert sorted(f.keys()) == sorted(want)
    for k, v in want.items():
        assert torch.equal(f.tensor(k), v), k
    k = linear_weights(load_file(str(flux[0])))[-1]
    n = want[k].numel()
    assert torch.equal(f.tensor_range(k, 64, n - 1), want[k].reshape(-1)[64:n - 1])


def test_mixed_quantized_inputs_merge_like_their_dequantized_floats(zoo, flux, qroot, tmp_path):
    """An fp8 file, an NF4 file and a bf16 diffusers folder merge exactly like the float32 files of their reference
    dequantizations (the float merge)."""
    from hubmix.flow.convert import convert

    fp8 = comfy_scaled_fp8(flux[0], qroot / "mix-fp8.safetensors", "legacy")
    nf4 = bnb_4bit(flux[1], qroot / "mix-nf4.safetensors", "nf4", nested=True)
    bf16 = tmp_path / "bf16"
    convert(zoo.diffusers("flux", 3), bf16, to="diffusers", dtype="bf16", quiet=True)
    ref_fp8 = save_float(comfy_dequantize(fp8), tmp_path / "ref-fp8.safetensors", flux[0])
    ref_nf4 = save_float(bnb_dequantize(nf4), tmp_path / "ref-nf4.safetensors", flux[1])
    params = {"alpha": 0.4, "beta": 0.25}
    merge([fp8, nf4, bf16], tmp_path / "q.safetensors", "triple_sum", params, dtype="fp32")
    merge([ref_fp8, ref_nf4, bf16], tmp_path / "f.safetensors", "triple_sum", params, dtype="fp32")
    same_bytes(load_tensors(tmp_path / "q.safetensors"), load_tensors(tmp_path / "f.safetensors"))
    # without --dtype, a quantized first input gives the bf16 its loaders compute in
    merge([fp8, nf4], tmp_path / "d.safetensors")
    got = load_tensors(tmp_path / "d.safetensors")
    assert got[linear_weights(got)[0]].dtype == torch.bfloat16


def test_inspect_and_dry_run_on_quantized_inputs(flux, qroot, cli):
    fp8 = comfy_scaled_fp8(flux[0], qroot / "insp-fp8.safetensors", "metadata")
    nf4 = bnb_4bit(flux[1], qroot / "insp-nf4.safetensors", "nf4")
    code, out, err = cli("inspect", fp8)
    assert code == 0, err
    assert "fp8_scaled e4m3fn x" in out
    code, out, err = cli("inspect", nf4, "--json")
    assert code == 0, err
    assert "nf4" in json.loads(out)["components"]["transformer"]["dtypes"]
    code, out, err = cli("merge", fp8, nf4, "--method", "weighted_sum", "--alpha", "0.5", "--dry", "-q")
    assert code == 0, err
    assert "transformer" in out


# ---- writing ---------------------------------------------------------------------------------------------------

def _quantized_keys(ref: dict) -> set[str]:
    """The stated rule: the denoiser's 2-D .weight matrices of at least 1024 elements."""
    return {k for k in linear_weights(ref) if ref[k].numel() >= 1024}


def test_fp8_scaled_output_is_comfyui_scaled_fp8(flux, tmp_path):
    merge(flux[:2], tmp_path / "ref.safetensors", dtype="fp32")
    result = merge(flux[:2], tmp_path / "fp8.safetensors", dtype="fp8_scaled")
    ref, got = load_tensors(tmp_path / "ref.safetensors"), load_tensors(tmp_path / "fp8.safetensors")
    quantized = _quantized_keys(ref)
    assert quantized and any("qkv" in k for k in quantized)  # fused parts quantized as one tensor
    assert got[PREFIX + "scaled_fp8"].dtype == torch.float8_e4m3fn and got[PREFIX + "scaled_fp8"].numel() == 0
    for k, v in ref.items():
        if k in quantized:  # independent oracle: scale = amax / 448, q = fp8(x / scale)
            scale = v.abs().amax() / 448
            assert got[k[:-len(".weight")] + ".scale_weight"].shape == ()
            assert torch.equal(got[k[:-len(".weight")] + ".scale_weight"], scale), k
            assert torch.equal(got[k].view(torch.uint8), (v / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
                               .view(torch.uint8)), k
        elif v.is_floating_point():
            assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], v.to(torch.bfloat16)), k
    back = comfy_dequantize(tmp_path / "fp8.safetensors")  # ComfyUI's rule
    for k in quantized:
        err = (back[k] - ref[k]).norm() / ref[k].norm()
        assert err < 0.05, (k, err)  # e4m3: 3 mantissa bits
    assert result.canonical["dtype"] == "fp8_scaled"
    assert json.loads(load_file_meta(tmp_path / "fp8.safetensors")["hubmix.recipe"])["dtype"] == "fp8_scaled"


def load_file_meta(path: Path) -> dict:
    from conftest import file_metadata

    return file_metadata(path)


def test_nf4_output_is_what_bitsandbytes_writes_and_reads(flux, tmp_path):
    import bitsandbytes.functional as F

    merge(flux[:2], tmp_path / "ref.safetensors", dtype="fp32")
    merge(flux[:2], tmp_path / "nf4.safetensors", dtype="nf4")
    ref, got = load_tensors(tmp_path / "ref.safetensors"), load_tensors(tmp_path / "nf4.safetensors")
    quantized = _quantized_keys(ref)
    for k in quantized:  # the same codes and block maxima as bitsandbytes' own quantize_4bit of the float result
        q, state = F.quantize_4bit(ref[k], blocksize=64, quant_type="nf4")
        assert torch.equal(got[k], q), k
        assert torch.equal(got[k + ".absmax"], state.absmax), k
    back = bnb_dequantize(tmp_path / "nf4.safetensors")  # bitsandbytes' QuantState.from_dict + dequantize_4bit
    for k, v in ref.items():
        if k in quantized:
            assert back[k].shape == v.shape
            err = (back[k] - v).norm() / v.norm()
            assert err < 0.15, (k, err)
        elif v.is_floating_point():
            assert back[k].dtype == torch.bfloat16 and torch.equal(back[k], v.to(torch.bfloat16)), k


def test_quantized_outputs_reproduce_byte_for_byte(flux, qroot, tmp_path):
    from hubmix.hub.reproduce import reproduce

    nf4 = bnb_4bit(flux[1], qroot / "rep-nf4.safetensors", "nf4")
    for dtype in ("fp8_scaled", "nf4"):
        out = tmp_path / f"{dtype}.safetensors"
        merge([flux[0], nf4], out, dtype=dtype)
        report = reproduce(out, models={"a": flux[0], "b": nf4}, quiet=True)
        assert report.identical, report.to_dict()
        from hubmix.hub.card import build_card, load_result

        card = build_card(load_result(out)).text  # records the format and names its loaders
        assert f"dtype: {dtype}" in card and ("ComfyUI" in card if dtype == "fp8_scaled" else "bitsandbytes" in card)
        assert "from_single_file" not in card


def test_quantized_output_into_diffusers_layout_is_refused(flux, tmp_path, cli):
    code, _, err = cli("merge", flux[0], flux[1], "--method", "weighted_sum", "--dtype", "nf4", "--out",
                       tmp_path / "folder", "-q")
    assert_one_line_error(code, err, "--dtype nf4", "single-file")
    assert not (tmp_path / "folder").exists()


# ---- bad input -------------------------------------------------------------------------------------------------

def _edit(src: Path, out: Path, edit, meta_edit=None) -> Path:
    from quant_files import _meta

    sd = load_file(str(src))
    edit(sd)
    meta = dict(_meta(src))
    if meta_edit:
        meta_edit(meta)
    save_file(sd, str(out), metadata=meta)
    return out


def _bad_inputs(flux, qroot) -> list[tuple[Path, str, str]]:
    """(file, tensor or word the error names, what is wrong)"""
    k = linear_weights(load_file(str(flux[0])))[0]
    layer = k[:-len(".weight")]
    fp8 = comfy_scaled_fp8(flux[0], qroot / "bad-src-fp8.safetensors", "legacy")
    nf4 = bnb_4bit(flux[0], qroot / "bad-src-nf4.safetensors", "nf4", nested=True)
    nf4_plain = bnb_4bit(flux[0], qroot / "bad-src-nf4p.safetensors", "nf4")
    meta = comfy_scaled_fp8(flux[0], qroot / "bad-src-meta.safetensors", "metadata")

    def nvfp4(m):
        q = json.loads(m["_quantization_metadata"])
        q["layers"][layer] = {"format": "nvfp4"}
        m["_quantization_metadata"] = json.dumps(q)

    def int4(sd):
        key = k + ".quant_state.bitsandbytes__nf4"
        state = json.loads(bytes(sd.pop(key).tolist()))
        state["quant_type"] = "int4"
        sd[k + ".quant_state.bitsandbytes__int4"] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)

    truncated = qroot / "bad-truncated.safetensors"
    data = nf4.read_bytes()
    truncated.write_bytes(data[:len(data) - 1000])
    return [
        (_edit(fp8, qroot / "bad-scale.safetensors",
               lambda sd: sd.__setitem__(layer + ".scale_weight", torch.ones(3))), layer + ".scale_weight", "shape"),
        (_edit(nf4_plain, qroot / "bad-absmax.safetensors",
               lambda sd: sd.__setitem__(k + ".absmax", sd[k + ".absmax"][:-1].clone())), k + ".absmax", "block"),
        (_edit(nf4, qroot / "bad-packed.safetensors", lambda sd: sd.__setitem__(k, sd[k][:-2].clone())), k,
         "packed bytes"),
        (_edit(meta, qroot / "bad-nvfp4.safetensors", lambda sd: None, nvfp4), k, "nvfp4"),
        (_edit(nf4, qroot / "bad-int4.safetensors", int4), k, "int4"),
        (truncated, "truncated", "truncated"),
    ]


def test_bad_quantized_inputs_fail_in_one_line_naming_file_and_tensor(flux, qroot, tmp_path, cli):
    for path, names, what in _bad_inputs(flux, qroot):
        out = tmp_path / f"{path.stem}-out.safetensors"
        code, _, err = cli("merge", path, flux[1], "--method", "weighted_sum", "--dtype", "fp8_scaled", "--out",
                           out, "-q")
        assert_one_line_error(code, err, path.name, names, what)
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}*"))


# ---- native encoders ---------------------------------------------------------------------------------------------

def test_native_encoders_give_the_torch_codes_bytes():
    """The C encoders (engine/csrc/quant.c) against the torch code they replace, on values with zeros, tiny,
    huge, NaN and inf, blocks of every length."""
    from hubmix.engine import native_quant
    from hubmix.formats.quant import accel
    from hubmix.formats.quant.bnb4 import quantize_nf4
    from hubmix.formats.quant.scaled_fp8 import FP8_MAX, ScaledFp8Codec

    if not native_quant.install():
        pytest.skip("no native library (no C compiler)")
    try:
        g = torch.Generator().manual_seed(3)
        x = torch.randn(64 * 40 + 37, generator=g) * torch.logspace(-40, 3, 64 * 40 + 37)
        x[:64] = 0.0  # an all-zero block
        x[100], x[300], x[301], x[700] = float("nan"), float("inf"), -float("inf"), 1e-39
        fast = {n: accel.HOOKS[n] for n in ("amax", "fp8_e4m3", "nf4")}
        for n in (len(x), len(x) - 1, 65, 1):
            y = x[-n:]
            clean = y.nan_to_num(0.0, 1e30, -1e30)
            assert fast["amax"](clean) == float(clean.abs().amax())
            assert fast["amax"](y) != fast["amax"](y) or not y.isnan().any()
            for s in (0.5, 3e-5, 1.0):
                want = (y / torch.tensor(s)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
                assert torch.equal(fast["fp8_e4m3"](y, s).view(torch.uint8), want.view(torch.uint8)), (n, s)
            accel.install()
            want_q, want_a = quantize_nf4(y, 64)
            native_quant.install()
            got_q, got_a = quantize_nf4(y, 64)
            assert torch.equal(got_q, want_q) and torch.equal(got_a.view(torch.int32), want_a.view(torch.int32)), n
        assert ScaledFp8Codec().encode("w", (4,), torch.ones(4), 0, 2.0)[0][2].dtype == torch.float8_e4m3fn
    finally:
        native_quant.uninstall()


@pytest.mark.parametrize("dtype", ["fp8_scaled", "nf4"])
def test_quantized_output_bytes_same_on_native_and_eager_paths(flux, tmp_path, dtype):
    from hubmix.engine.pipeline import Settings

    ran = {}
    for mode in ("native", "eager"):
        (tmp_path / mode).mkdir()
        ran[mode] = hubmix.merge(Recipe(models=[str(p) for p in flux], method="lossless", params={"alpha": 0.9, "beta": 1.1},
                            dtype=dtype), out=tmp_path / mode / "m.safetensors", quiet=True,
                     settings=Settings(kernels=mode, workers=2))
    assert (tmp_path / "native" / "m.safetensors").read_bytes() == (tmp_path / "eager" / "m.safetensors").read_bytes()
    assert ran["native"].engine["torch"] is False  # plain inputs into a quantized output: spans, native encoders
