"""GGUF inputs on the engine's torch-free path: quantized blocks unpacked by the native library on the workers
(formats.io.span.Packed), byte-identical to the gguf package's dequantization and to the torch path's merge."""

from __future__ import annotations

import numpy as np
import pytest

from gguf_files import bare_main, read_reference, write_gguf

gguf = pytest.importorskip("gguf")

KEEP = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
NATIVE_TYPES = ["Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K"]


def _library():
    from hubmix.engine.native import Native

    assert Native.library() is not None, Native.error()


def test_packed_ranges_unpack_to_the_reference(tmp_path):
    """Every natively dequantized type, over ranges that start and stop inside blocks: gguf's values exactly;
    a type only the gguf package dequantizes, and a plain one, have no packed form."""
    _library()
    from hubmix.formats.io.readers import open_weight_file
    from hubmix.formats.io.span import Span
    from hubmix.formats.quant import gguf_file  # noqa: F401 - registers the reader

    rng = np.random.default_rng(5)
    types = [*NATIVE_TYPES, "Q4_1", "F16"]
    tensors = {f"t.{t}.weight": (rng.standard_normal((6, 512)) * 0.05).astype(np.float32) for t in types}
    path = write_gguf(tmp_path / "m.gguf", "flux", tensors, types={f"t.{t}.weight": t for t in types})
    f = open_weight_file(path)
    ref = read_reference(path)
    for t in NATIVE_TYPES:
        key = f"t.{t}.weight"
        for start, stop in ((0, 3072), (300, 3000), (257, 258), (512, 512)):
            p = f.packed(key, start, stop)
            buf = Span.allocate(max(p.blocks * p.block * 4, 4), "float32")
            got = bytes(p.into(buf).memoryview())
            assert got == ref[key].reshape(-1)[start:stop].astype(np.float32).tobytes(), (t, start, stop)
    assert f.packed("t.Q4_1.weight", 0, 32) is None and f.packed("t.F16.weight", 0, 32) is None


@pytest.fixture(scope="module")
def gguf_trio(zoo, tmp_path_factory):
    """Three Flux transformers as GGUF files of different quant types (gguf's writer; K-quants where rows allow)."""
    root = tmp_path_factory.mktemp("gguf-native")
    paths = []
    for seed, qtype in ((1, "Q8_0"), (2, "Q5_0"), (3, "Q4_K")):
        tensors = bare_main(zoo.single("flux", seed=seed))
        types = {k: "Q4_0" for k, a in tensors.items() if qtype == "Q4_K" and a.ndim == 2 and a.size > 1024
                 and a.shape[-1] % 256}  # rows K-quants cannot hold: a simple type
        types.update({k: "F32" for k in tensors if k.startswith(KEEP)})  # as ComfyUI-GGUF's converter keeps them
        paths.append(write_gguf(root / f"{qtype}.gguf", "flux", tensors, qtype, types=types))
    return paths


@pytest.mark.parametrize("method,n,dtype", [("lossless", 3, "gguf-q8_0"), ("weighted_sum", 2, "bf16"),
                                            ("add_difference", 3, "gguf-q4_k"), ("lossless", 2, "fp8_scaled")])
def test_gguf_inputs_merge_on_spans_to_the_torch_paths_bytes(gguf_trio, tmp_path, method, n, dtype):
    """GGUF inputs merge without torch (dequantized by the merge kernel as it reads them, small chunks that split
    tensors; GGUF outputs encoded in the same pass, scaled fp8's amax and codes too), into the bytes the torch path
    writes with the gguf package's reader semantics."""
    import hubmix
    from hubmix.engine.pipeline import Settings
    from hubmix.recipe import Recipe

    _library()
    params = {"alpha": 0.9, "beta": 1.1} if method == "lossless" else {"alpha": 0.3}
    suffix = ".gguf" if dtype.startswith("gguf") else ".safetensors"
    recipe = Recipe(models=[str(p) for p in gguf_trio[:n]], method=method, params=params, dtype=dtype)
    outs, engines = [], []
    for kernels in ("native", "eager"):
        (tmp_path / kernels).mkdir()
        res = hubmix.merge(recipe, out=tmp_path / kernels / f"m{suffix}", quiet=True,
                           settings=Settings(kernels=kernels, quiet=True, max_memory=1 << 20))
        outs.append(res.output.read_bytes())
        engines.append(res.engine)
    assert engines[0]["torch"] is False and engines[1]["torch"] is True
    assert outs[0] == outs[1]


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_K"])
def test_native_store_gives_the_reference_bytes(qtype):
    """The span writer's native stores: F16 as numpy's astype, BF16 as the gguf package's (NaN, inf, subnormals,
    ties), quantized types as gguf/llama.cpp's quantizers (hubmix's eager blocks; Q8_0's vector code on zeros,
    halfway cases, infinities, subnormals and huge values too)."""
    _library()
    from hubmix.formats.io.span import Span
    from hubmix.formats.quant.gguf_blocks import native_quantizer, quantize

    rng = np.random.default_rng(2)
    x = (rng.standard_normal(4096) * 0.05).astype(np.float32)
    if qtype in ("F16", "BF16"):
        specials = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-8, 6e-5, 65520.0, 3.0e38],
                            np.float32)
        x[:specials.size] = specials
        x[specials.size:specials.size + 4] = np.array([0x3F808000, 0x3F818000, 0x7F800001, 0xFFC00001],
                                                      np.uint32).view(np.float32)  # bf16 ties, NaN payloads
        want = (x.astype(np.float16).view(np.uint8) if qtype == "F16"
                else gguf.quants.BF16.quantize_blocks(x.reshape(1, -1)).reshape(-1))
    else:
        if qtype == "Q8_0":  # blocks of 32: zeros, halfway cases (amax 127: d 1), +-inf, subnormals, huge values
            x[:32] = 0.0
            x[32:64] = np.array([127.0, -126.5, *np.arange(-14.5, 15.5, 1.0)], np.float32)
            x[64:96] = np.linspace(-1, 1, 32, dtype=np.float32)
            x[70], x[80] = np.inf, -np.inf
            x[96:128] = np.float32(1e-40) * np.arange(32, dtype=np.float32)
            x[128:160] = np.float32(3e38) * np.linspace(-1, 1, 32, dtype=np.float32)
        want = quantize(x, qtype, native=False)
    src = Span.of_bytes(x.tobytes(), "float32", (x.size,))
    bs, ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    out = Span.allocate(x.size // bs * ts)
    native_quantizer(qtype)(src.address, out.address, x.size // bs)
    assert bytes(out.memoryview()) == np.asarray(want).tobytes()


# ---- one quant mechanism: every quantized --dtype is a registered codec ------------------------------------------

def test_every_quantized_dtype_is_one_registered_codec():
    """fp8_scaled, nf4 and the gguf-* formats are codecs of one registry, and the CLI's --dtype choices, the recipe's
    validation and the UI's dropdown read the one list of them."""
    from hubmix.cli.merge import merge as merge_command
    from hubmix.formats.quant import CODECS, QUANT_DTYPES, codec
    from hubmix.recipe import DTYPES
    from hubmix.ui.form import CHOICES

    assert codec("nf4") is not None and tuple(CODECS) == QUANT_DTYPES
    assert {"fp8_scaled", "nf4", "gguf-q8_0", "gguf-q4_k", "gguf-bf16"} <= set(QUANT_DTYPES)
    for name, fmt in CODECS.items():
        assert fmt.name == name and fmt.describe and fmt.loader and fmt.extension in (".safetensors", ".gguf")
        assert fmt.layout == ("gguf" if fmt.extension == ".gguf" else "single-file")
    choices = next(p for p in merge_command.params if p.name == "dtype").type.choices
    assert tuple(choices) == DTYPES and DTYPES[-len(QUANT_DTYPES):] == QUANT_DTYPES
    assert CHOICES["dtype"] == ("",) + DTYPES


@pytest.mark.parametrize("dtype", ["fp8_scaled", "nf4", "gguf-q8_0", "gguf-q4_k", "gguf-f16"])
@pytest.mark.parametrize("how", ["folder", "--layout diffusers", "--layout both"])
def test_quantized_output_into_the_diffusers_layout_is_refused_naming_its_layout(gguf_trio, tmp_path, cli, dtype,
                                                                                 how):
    """diffusers has no folder convention for these files: one line naming the layout to use, nothing written."""
    from conftest import assert_one_line_error

    gguf_out = dtype.startswith("gguf")
    out = tmp_path / ("folder" if how == "folder" else "m.gguf" if gguf_out else "m.safetensors")
    args = ["merge", str(gguf_trio[0]), str(gguf_trio[1]), "--method", "weighted_sum", "--dtype", dtype,
            "--out", str(out), "-q"] + ([] if how == "folder" else how.split())
    code, _, err = cli(*args)
    assert_one_line_error(code, err, *((".gguf", "no diffusers layout") if gguf_out else
                                       (f"--dtype {dtype}", "--layout single-file", ".safetensors")))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_gguf_card_names_its_loaders(gguf_trio, tmp_path):
    """The card's usage comes from the codec: the .gguf file and ComfyUI-GGUF / diffusers' GGUF loading."""
    import hubmix
    from hubmix.hub.card import build_card
    from hubmix.flow.result import load_result
    from hubmix.recipe import Recipe

    recipe = Recipe(models=[str(p) for p in gguf_trio[:2]], method="weighted_sum", params={"alpha": 0.5},
                    dtype="gguf-q5_0")
    out = hubmix.merge(recipe, out=tmp_path / "m.gguf", quiet=True).output
    card = build_card(load_result(out)).text
    assert "dtype: gguf-q5_0" in card and "`m.gguf`" in card and "ComfyUI-GGUF" in card
    assert "GGUFQuantizationConfig" in card and "from_pretrained" not in card


def test_non_finite_gguf_blocks_are_counted_as_the_torch_path_counts(gguf_trio, tmp_path, cli):
    """A Q8_0 block whose float16 scale is inf or NaN dequantizes to 32 non-finite values: the merge kernel that
    reads the blocks itself counts them as the torch path does, in the same warning."""
    _library()
    r = gguf.GGUFReader(str(gguf_trio[0]))
    picks = [t for t in r.tensors if t.tensor_type.name == "Q8_0"][:2]
    data = bytearray(gguf_trio[0].read_bytes())
    for t, scale in zip(picks, (0x7C00, 0x7E00)):  # +inf, NaN as float16
        data[t.data_offset + 34:t.data_offset + 36] = scale.to_bytes(2, "little")  # the second block's scale
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    lines = {}
    for kind in ("native", "eager"):
        code, _, err = cli("merge", gguf_trio[1], bad, "-m", "weighted_sum", "--out", tmp_path / f"{kind}.gguf",
                           "--dtype", "gguf-q8_0", "-q", "--kernels", kind)
        assert code == 0, err
        lines[kind] = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert lines["native"] == lines["eager"] and len(lines["native"]) == 1, lines
    assert "64 non-finite (NaN/inf) elements in b (bad.gguf) (2 tensors" in lines["native"][0], lines


def test_span_merge_hands_the_writer_blocks_encoded_in_the_merge_pass(gguf_trio, tmp_path, monkeypatch):
    """On spans, the merge kernel itself encodes every tensor that lands whole in a natively stored GGUF type (the
    writer thread only writes the blocks); the writer offers that before the native library is loaded (a first
    merge through the library's API plans its outputs before loading it)."""
    import hubmix
    from hubmix.engine.pipeline import Settings
    from hubmix.formats.quant import gguf_blocks
    from hubmix.formats.quant.gguf_blocks import NATIVE_STORE
    from hubmix.formats.quant.gguf_write import GGUFTensor, GGUFWriter
    from hubmix.recipe import Recipe

    seen: dict[str, set[str]] = {}
    write = GGUFWriter.write

    def recording(self, key, data, byte_offset=0):
        seen.setdefault(key, set()).add(data.dtype)
        return write(self, key, data, byte_offset)

    monkeypatch.setattr(GGUFWriter, "write", recording)
    recipe = Recipe(models=[str(p) for p in gguf_trio[:2]], method="lossless", params={"alpha": 0.9, "beta": 1.1},
                    dtype="gguf-q8_0")
    res = hubmix.merge(recipe, out=tmp_path / "m.gguf", quiet=True, settings=Settings(kernels="native", quiet=True))
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(res.output)).tensors}
    stored = {k for k, t in types.items() if t in NATIVE_STORE}
    assert "Q8_0" in types.values() and stored
    moved = {k for k in stored if "final_layer.adaLN" in k}  # swapped halves: moved whole, then encoded
    assert all(seen[k] == {"uint8"} for k in stored - moved), {k: seen[k] for k in stored - moved}
    w = GGUFWriter(tmp_path / "w.gguf", "flux", "gguf-q8_0", [GGUFTensor("a.weight", "Q8_0", (4, 64)),
                                                              GGUFTensor("b.weight", "F32", (4,))])
    monkeypatch.setattr(gguf_blocks, "LIB", None)  # as before the library's first load
    assert (w.encodes("a.weight", 0), w.encodes("a.weight", 16), w.encodes("b.weight", 0)) == ("Q8_0", None, None)
    w.abort()
