"""GGUF in and out: inputs written by the `gguf` package read exactly as it dequantizes them; outputs load back through
its reader with ComfyUI-GGUF's rules; K-quants byte-identical between the native unit and the numpy fallback, and
as accurate as llama.cpp's own; bad files refused in one line."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from conftest import assert_one_line_error
from gguf_files import bare_main, read_reference, types_of, write_gguf

gguf = pytest.importorskip("gguf")


def test_type_table_is_ggmls():
    from hubmix.formats.quant.gguf_types import DEQUANTIZED, GGML_TYPES

    ref = {t.name: (int(t), *gguf.GGML_QUANT_SIZES[t]) for t in gguf.GGML_QUANT_SIZES}
    assert {k: v for k, v in GGML_TYPES.items() if k in ref} == ref
    assert DEQUANTIZED == {t.name for t in gguf.quants._type_traits} | {"F32", "F16"}


def _real_like(rng, rows: int, cols: int) -> np.ndarray:
    """Heavy-tailed rows of different scales, like trained weights (a Student-t with a few outliers)."""
    x = rng.standard_t(4, size=(rows, cols)).astype(np.float32) * 0.02
    return x * rng.uniform(0.3, 3.0, size=(rows, 1)).astype(np.float32)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"])
def test_blocks_native_and_eager_agree_with_the_reference(qtype):
    from hubmix.engine.native import Native
    from hubmix.formats.quant import gguf_blocks
    from hubmix.formats.quant.gguf_blocks import dequantize, quantize

    assert Native.library() is not None and gguf_blocks.LIB is not None, Native.error()

    rng = np.random.default_rng(3)
    x = _real_like(rng, 24, 512).reshape(-1)
    x[:256] = 0.0  # an all-zero block
    x[256:512] = 0.75  # a constant block
    x[512:768] *= 1e-30  # a block below GROUP_MAX_EPS
    native, eager = quantize(x, qtype), quantize(x, qtype, native=False)
    assert native.tobytes() == eager.tobytes()
    if qtype in ("Q8_0", "Q5_0", "Q4_0"):  # the gguf package quantizes these itself
        ref = gguf.quants.quantize(x.reshape(-1, 32), gguf.GGMLQuantizationType[qtype]).reshape(-1)
        assert native.tobytes() == ref.tobytes()
    _, ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    want = gguf.quants.dequantize(native.reshape(-1, ts), gguf.GGMLQuantizationType[qtype]).reshape(-1)
    for got in (dequantize(native, qtype), dequantize(native, qtype, native=False)):
        assert got.tobytes() == want.tobytes()


def test_kquants_beat_the_simple_types_of_their_width():
    """Relative RMSE on real-shaped tensors (3072 x 3072 gaussian, and heavy-tailed rows), dequantized by gguf:
    Q4_K < Q4_0, Q5_K < Q5_0, Q6_K <= Q5_0 / 2."""
    from hubmix.formats.quant.gguf_blocks import quantize

    rng = np.random.default_rng(0)
    for x in (rng.standard_normal((3072, 3072)).astype(np.float32) * 0.02, _real_like(rng, 3072, 3072)):
        err = {}
        for t in ("Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K"):
            gt = gguf.GGMLQuantizationType[t]
            y = gguf.quants.dequantize(quantize(x.reshape(-1), t).reshape(3072, -1), gt)
            err[t] = float(np.sqrt(np.mean((y - x) ** 2) / np.mean(x ** 2)))
        assert err["Q4_K"] < err["Q4_0"] and err["Q5_K"] < err["Q5_0"] and err["Q6_K"] <= err["Q5_0"] / 2, err


def test_reader_matches_gguf_dequantization_for_every_written_type(tmp_path):
    from hubmix.formats.io.readers import open_weight_file
    from hubmix.formats.quant import gguf_file  # noqa: F401 - registers the reader (hubmix.formats.model does)

    rng = np.random.default_rng(1)
    types = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
    tensors = {f"t.{t}.weight": _real_like(rng, 8, 512) for t in types}
    path = write_gguf(tmp_path / "m.gguf", "flux", tensors, types={f"t.{t}.weight": t for t in types})
    f = open_weight_file(path)
    ref = read_reference(path)
    for key, want in ref.items():
        t = f.tensor(key).float().numpy()
        assert t.tobytes() == want.astype(np.float32).tobytes(), key
        part = f.tensor_range(key, 300, 3000).float().numpy()  # a range across block edges
        assert part.tobytes() == want.reshape(-1)[300:3000].astype(np.float32).tobytes(), key
    assert f.quant_type("t.Q4_K.weight") == "gguf q4_k" and f.quant_type("t.F16.weight") is None


@pytest.fixture(scope="module")
def flux_inputs(zoo, tmp_path_factory):
    """A Flux transformer as a Q8_0 GGUF (gguf's writer) and another as a bare safetensors file."""
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("gguf-flux")
    a, b = bare_main(zoo.single("flux", seed=1)), bare_main(zoo.single("flux", seed=2))
    write_gguf(root / "a.gguf", "flux", a, "Q8_0")
    save_file({k: v for k, v in b.items()}, str(root / "b.safetensors"))
    return root, b


def _merge(models, dtype, out, **kw):
    import hubmix
    from hubmix.recipe import Recipe

    r = Recipe(models=[str(m) for m in models], method="weighted_sum", params={"alpha": 0.3}, dtype=dtype, **kw)
    r.validate()
    return hubmix.merge(r, out=out, quiet=True)


def test_mixed_merge_equals_the_float_merge_of_the_dequantized_inputs(flux_inputs, tmp_path):
    """A GGUF + a safetensors transformer -> gguf-q8_0: every quantized tensor is exactly gguf's Q8_0 of the float
    merge of gguf's dequantization, every other one that float merge in its kept type."""
    root, b = flux_inputs
    out = _merge([root / "a.gguf", root / "b.safetensors"], "gguf-q8_0", tmp_path / "m.gguf")
    a = read_reference(root / "a.gguf")
    types = types_of(out.output)
    got = read_reference(out.output)
    assert set(got) == set(a)
    r = gguf.GGUFReader(str(out.output))
    assert r.get_field("general.architecture").contents() == "flux"
    assert json.loads(r.get_field("hubmix.recipe").contents())["dtype"] == "gguf-q8_0"
    for key, t in types.items():
        ref = np.float32(0.7) * a[key] + np.float32(0.3) * b[key]
        if t == "Q8_0":
            want = gguf.quants.dequantize(gguf.quants.quantize(ref, gguf.GGMLQuantizationType.Q8_0),
                                          gguf.GGMLQuantizationType.Q8_0)
        else:
            want = ref if t == "F32" else ref.astype(np.float16).astype(np.float32)
        assert got[key].tobytes() == want.reshape(got[key].shape).tobytes(), (key, t)
    # ComfyUI-GGUF's rules: 1-D and small tensors F32, the embedders and final layer not quantized
    for key, t in types.items():
        if a[key].ndim == 1 or a[key].size <= 1024:
            assert t == "F32", key
        if key.startswith(("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")):
            assert t in ("F32", "F16"), key
    assert "Q8_0" in types.values()


def test_same_inputs_give_the_same_bytes(flux_inputs, tmp_path):
    root, _ = flux_inputs
    outs = []
    for i in range(2):
        (tmp_path / str(i)).mkdir()
        outs.append(_merge([root / "a.gguf", root / "b.safetensors"], "gguf-q4_0", tmp_path / str(i) / "m.gguf").output)
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_sd1_unet_reshaped_and_k_quantized(zoo, tmp_path):
    """SD1's UNet written as Q4_K: convs and odd-width matrices stored as (n/256, 256) with comfy.gguf.orig_shape,
    K-quantized; read back (hubmix and gguf) in their original shapes, within Q4_K's error of the source."""
    from hubmix.formats.model import open_model

    src = zoo.single("sd1", seed=1)
    out = _merge([src, zoo.single("sd1", seed=2)], "gguf-q4_k", tmp_path / "u.gguf").output
    r = gguf.GGUFReader(str(out))
    assert r.get_field("general.architecture").contents() == "sd1"
    reshaped = [f.name for f in r.fields.values() if f.name.startswith("comfy.gguf.orig_shape.")]
    types = types_of(out)
    assert reshaped and "Q4_K" in types.values()
    assert types["input_blocks.0.0.weight"] in ("F32", "F16")  # conv_in is never quantized
    a, b = bare_main(src), bare_main(zoo.single("sd1", seed=2))
    got = read_reference(out)
    for key, y in got.items():
        ref = np.float32(0.7) * a[key] + np.float32(0.3) * b[key]
        assert y.shape == ref.shape, key
        rel = np.sqrt(np.mean((y - ref) ** 2) / max(np.mean(ref ** 2), 1e-20))
        assert rel < (0.12 if types[key] == "Q4_K" else 1e-3), (key, types[key], rel)
    m = open_model(out)  # hubmix reads its own output back as the SD1 UNet
    assert m.family.id == "sd1" and m.main_only
    assert {k: r.shape for k, r in m.components["unet"].tensors.items()} == \
        {k: r.shape for k, r in open_model(src).components["unet"].tensors.items()}


def test_inspect_and_dry_run_on_gguf(flux_inputs, cli):
    root, _ = flux_inputs
    code, out, err = cli("inspect", str(root / "a.gguf"))
    assert code == 0, err
    assert "gguf q8_0" in out and "FLUX" in out
    code, out, err = cli("merge", str(root / "a.gguf"), str(root / "b.safetensors"), "--method", "weighted_sum",
                         "--alpha", "0.5", "--dry")
    assert code == 0, err


def _tensor_info_end(data: bytes) -> int:
    """Byte offset where the GGUF tensor infos end (to corrupt them), read with the gguf package."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(data)
        f.flush()
        r = gguf.GGUFReader(f.name)
        return r.data_offset


@pytest.mark.parametrize("fault", ["truncated", "blocks", "type"])
def test_bad_gguf_inputs_fail_in_one_line_and_write_nothing(flux_inputs, tmp_path, cli, fault):
    root, _ = flux_inputs
    rng = np.random.default_rng(0)
    good = write_gguf(tmp_path / "g.gguf", "flux", {"double_blocks.0.img_attn.qkv.weight": rng.standard_normal(
        (96, 64)).astype(np.float32)}, "Q8_0").read_bytes()
    name = b"double_blocks.0.img_attn.qkv.weight"
    at = good.index(name) + len(name)  # n_dims u32, dims u64 x2, type u32, offset u64
    bad = bytearray(good)
    if fault == "truncated":
        bad = bad[:-100]
    elif fault == "blocks":
        struct.pack_into("<Q", bad, at + 4, 48)  # rows of 48 elements: not whole Q8_0 blocks
    else:
        struct.pack_into("<I", bad, at + 4 + 16, 77)  # no such type
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(bad))
    out = tmp_path / "out.gguf"
    code, _, err = cli("merge", str(path), str(root / "b.safetensors"), "--method", "weighted_sum", "--alpha", "0.5",
                       "--dtype", "gguf-q8_0", "--out", str(out))
    line = assert_one_line_error(code, err, str(path))
    assert {"truncated": "truncated", "blocks": "whole Q8_0 blocks", "type": "unknown GGUF tensor type id 77"}[
        fault] in line
    if fault != "truncated":
        assert "double_blocks.0.img_attn.qkv.weight" in line
    assert not out.exists() and not list(tmp_path.glob("*.tmp*"))


def test_gguf_dtype_needs_a_gguf_path(flux_inputs, tmp_path, cli):
    root, _ = flux_inputs
    code, _, err = cli("merge", str(root / "a.gguf"), str(root / "b.safetensors"), "--method", "weighted_sum",
                       "--alpha", "0.5", "--dtype", "gguf-q8_0", "--out", str(tmp_path / "x.safetensors"))
    assert_one_line_error(code, err, ".gguf")


def test_reproduce_rebuilds_the_same_gguf_bytes(flux_inputs, tmp_path, cli):
    from hubmix.flow.result import load_result

    root, _ = flux_inputs
    out = _merge([root / "a.gguf", root / "b.safetensors"], "gguf-q5_0", tmp_path / "r.gguf").output
    assert load_result(out).canonical["dtype"] == "gguf-q5_0"  # the recipe in the GGUF header
    code, text, err = cli("reproduce", str(out), "--model", f"a={root / 'a.gguf'}", "--model",
                          f"b={root / 'b.safetensors'}", "-q")
    assert code == 0, text + err
    assert "identical" in text


@pytest.mark.parametrize("direct", ["0", "1"])
def test_writer_streams_chunks_in_any_order_to_the_same_bytes(tmp_path, monkeypatch, direct):
    """Chunks that split blocks, arrive out of order, and are large enough to be quantized on several threads give
    the blocks of one quantization of the whole tensor, under a header gguf's reader reads; through the page cache
    and with O_DIRECT (whose blocks complete only if the alignment padding between tensors is written too)."""
    from test_writer import _direct_supported

    from hubmix.engine.native import Native
    from hubmix.formats.quant.gguf_blocks import quantize
    from hubmix.formats.quant.gguf_write import GGUFTensor, GGUFWriter

    monkeypatch.setenv("HUBMIX_DIRECT_IO", direct)
    Native.library()
    rng = np.random.default_rng(5)
    x = _real_like(rng, 1024, 1024)
    tensors = [GGUFTensor("a.weight", "Q4_K", (1024, 1024)), GGUFTensor("b.weight", "F32", (7,)),
               GGUFTensor("c.weight", "F32", (3,))]  # b's 28 bytes are padded to 32
    w = GGUFWriter(tmp_path / "w.gguf", "flux", "gguf-q4_k", tensors, {"hubmix.note": "x"})
    assert (w._direct is not None) == (direct == "1" and _direct_supported(tmp_path))
    flat = x.reshape(-1)
    cuts = [0, 100, 300_000, 300_100, 1024 * 1024]
    for s, e in reversed(list(zip(cuts, cuts[1:]))):
        w.write("a.weight", torch_of(flat[s:e]), s * 4)
    w.write("b.weight", torch_of(np.arange(7, dtype=np.float32)), 0)
    w.write("c.weight", torch_of(np.arange(3, dtype=np.float32)), 0)
    w.finish()
    r = gguf.GGUFReader(str(tmp_path / "w.gguf"))
    by = {t.name: t for t in r.tensors}
    assert np.asarray(by["a.weight"].data).tobytes() == quantize(flat, "Q4_K").tobytes()
    assert list(np.asarray(by["b.weight"].data)) == list(range(7))
    assert list(np.asarray(by["c.weight"].data)) == list(range(3))
    assert r.get_field("hubmix.note").contents() == "x"
    assert (tmp_path / "w.gguf").stat().st_size == w.size


def torch_of(a: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a))
