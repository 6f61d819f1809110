"""Spans (formats.io.span) and the torch-free merge path: spans view the same bytes torch views, the native
conversions and the scan fused into kernels give torch's answers, and the writer takes spans."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from hubmix.formats.io.readers import SafetensorsFile
from hubmix.formats.io.span import Span, int64_range
from hubmix.formats.io.writer import PlannedTensor, SafetensorsWriter

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2)


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _library():
    from hubmix.engine import native

    if native.Native.library() is None:
        pytest.skip(f"no native kernels here: {native.Native.error()}")
    return native


def test_a_span_views_the_bytes_torch_views(tmp_path):
    x = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    y = torch.arange(5, dtype=torch.int64)
    path = tmp_path / "t.safetensors"
    save_file({"x": x, "y": y}, str(path))
    f = SafetensorsFile(path)
    s = f.span("x")
    assert (s.dtype, s.shape, s.numel, s.nbytes) == ("float32", (6, 4), 24, 96)
    assert bytes(s.memoryview()) == _bytes(x)
    assert bytes(s.flat(5, 9).memoryview()) == _bytes(x.view(-1)[5:9])
    assert bytes(s.rows(2, 3).memoryview()) == _bytes(x[2:5]) and s.rows(2, 3).shape == (3, 4)
    assert bytes(f.span("y").memoryview()) == _bytes(y)
    with pytest.raises(IndexError):
        s.flat(3, 25)
    with pytest.raises(ValueError):
        s.reshape((5, 5))
    assert bytes(Span.of_bytes(int64_range(7), "int64", (1, 7)).memoryview()) == _bytes(torch.arange(7)[None])


def test_the_writer_takes_spans_and_tensors_alike(tmp_path):
    x = torch.randn(1000)
    src = tmp_path / "src.safetensors"
    save_file({"x": x}, str(src))
    span = SafetensorsFile(src).span("x")
    out = tmp_path / "out.safetensors"
    w = SafetensorsWriter(out, [PlannedTensor("x", "float32", (1000,)), PlannedTensor("p", "int64", (1, 3)),
                                PlannedTensor("m", torch.float32, (0,))], {})
    w.write("x", span.flat(0, 400))
    w.write("x", x[400:], 400 * 4)
    w.write("p", Span.of_bytes(int64_range(3), "int64", (1, 3)))
    w.write("m", Span.of_bytes(b"", "float32", (0,)))
    with pytest.raises(AssertionError):
        w.write("p", span.flat(0, 3))  # float32 into int64
    w.finish()
    got = load_file(str(out))
    assert torch.equal(got["x"], x) and torch.equal(got["p"], torch.arange(3)[None]) and got["m"].numel() == 0


def test_fp8_tables_are_torch_conversions_bit_for_bit():
    from hubmix.engine import native

    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        want = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float().view(torch.int32)
        name = str(dtype).removeprefix("torch.")
        assert native.fp8_float32_bits(name) == [b & 0xFFFFFFFF for b in want.tolist()], name


def test_native_conversion_is_torchs_on_every_dtype_pair():
    """A copy into another dtype on spans (the `convert` kernel) gives x.float().to(dtype)'s bytes, specials too."""
    native = _library()
    gen = torch.Generator().manual_seed(5)
    base = torch.cat([torch.randn(20_000, generator=gen) * 300, torch.tensor(
        [float("inf"), -float("inf"), float("nan"), -0.0, 0.0, 1e-42, 3e-8, 6e4, 7e5, -1e9])])
    for din in DTYPES:
        x = base.to(din)
        for dout in DTYPES:
            run = native.kernel("convert", [din], dout)
            got = run([x], {})
            want = x.float().to(dout)
            bits = torch.uint8 if dout.itemsize == 1 else torch.int16 if dout.itemsize == 2 else torch.int32
            nan = torch.isnan(want.float())
            assert torch.equal(torch.isnan(got.float()), nan), (din, dout)
            assert torch.equal(want.view(bits)[~nan], got.view(bits)[~nan]), (din, dout)


def test_the_scan_fused_into_a_kernel_counts_what_the_separate_scan_counts():
    """counts= runs the kernel step by step with each step's inputs scanned: the same output bytes as one call,
    the same counts as nonfinite_count, on lengths around the step and on spans as on tensors."""
    native = _library()
    gen = torch.Generator().manual_seed(7)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for n in (0, 5, 16384, 16385, 50_001):
            xs = [torch.randn(n, generator=gen).to(dtype) for _ in range(3)]
            if n > 100:
                xs[1][::97] = float("nan")
                xs[2][17] = float("inf")
            run = native.kernel("lossless", [dtype] * 3, dtype)
            plain = run(xs, {"alpha": 1.0, "beta": 1.0})
            counts: list[int] = []
            fused = run(xs, {"alpha": 1.0, "beta": 1.0}, None, None, counts)
            assert _bytes(fused) == _bytes(plain), (dtype, n)
            assert counts == [native.nonfinite_count(x) for x in xs], (dtype, n)
            spans = [Span(x, x.data_ptr(), str(dtype).removeprefix("torch."), (n,)) for x in xs]
            out = Span.allocate(n * dtype.itemsize, str(dtype).removeprefix("torch."))
            counts2: list[int] = []
            got = run(spans, {"alpha": 1.0, "beta": 1.0}, out.flat(0, n), None, counts2)
            assert bytes(got.memoryview()) == _bytes(plain) and counts2 == counts, (dtype, n)


def test_non_finite_inputs_are_counted_on_spans(tmp_path, zoo, cli):
    """The NaN/inf warning of a merge that runs on spans (native kernels: the scan fused into the kernel, and the
    copies scanned apart) counts what the torch path counts."""
    _library()
    src = zoo.single("sd1", 2)
    tensors = load_file(str(src))
    unet = sorted(k for k in tensors if k.startswith("model.diffusion_model.") and tensors[k].numel() > 64)
    tensors[unet[0]].view(-1)[:3] = float("nan")
    tensors[unet[1]].view(-1)[5] = float("inf")
    bad = tmp_path / "bad.safetensors"
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        save_file(tensors, str(bad), metadata=f.metadata())
    lines = {}
    for kind in ("native", "eager"):
        out = tmp_path / f"{kind}.safetensors"
        code, _, err = cli("merge", zoo.single("sd1", 1), bad, zoo.single("sd1", 3), "-m", "lossless", "--out", out,
                           "-q", "--kernels", kind)
        assert code == 0, err
        lines[kind] = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert lines["native"] == lines["eager"] and len(lines["native"]) == 1, lines
    assert "unet: 4 non-finite (NaN/inf) elements in b (bad.safetensors) (2 tensors" in lines["native"][0]


def test_span_transforms_equal_the_torch_layout_transforms():
    """transpose (OpenCLIP's text_projection) and swap_halves (Flux's adaLN) on spans: the bytes of
    formats.layouts' torch transforms, both directions, for every element width."""
    native = _library()
    from hubmix.formats.layouts import apply_to_canonical, apply_to_original, to_canonical_shape

    for dtype in (torch.float8_e4m3fn, torch.float16, torch.float32):
        for shape in ((7, 5), (64, 33), (1, 9), (40, 40)):
            x = torch.randn(shape).to(dtype)
            name = str(dtype).removeprefix("torch.")
            span = Span(x, x.data_ptr(), name, shape)
            for transform in ("transpose", "swap_halves"):
                if transform == "swap_halves" and shape[0] % 2:
                    continue
                canon = to_canonical_shape(transform, shape)
                got = native.transformed(transform, span, canon)
                assert got.shape == canon
                assert bytes(got.memoryview()) == _bytes(apply_to_canonical(transform, x)), (dtype, shape)
                back = native.transformed(transform, got, shape)
                assert bytes(back.memoryview()) == _bytes(apply_to_original(transform, apply_to_canonical(
                    transform, x))) == _bytes(x)


def test_an_in_memory_merge_with_native_kernels_gets_tensors(zoo, tmp_path):
    """merge_in_memory (sweeps, samples) copies every chunk into tensors: it never runs on spans, even where a merge
    to files would, and its tensors are the written file's."""
    _library()
    import hubmix
    from hubmix import Recipe
    from hubmix.engine.pipeline import Settings
    from hubmix.flow.merging import merge_in_memory

    models = [str(zoo.single("sd1", s, dtype="fp16")) for s in (1, 2, 3)]
    recipe = Recipe(models=models, method="lossless", params={"alpha": 0.9})
    out = tmp_path / "m.safetensors"
    result = hubmix.merge(recipe, out=out, quiet=True, settings=Settings(kernels="native", quiet=True))
    assert result.engine["torch"] is False  # the file merge ran on spans
    got = merge_in_memory(recipe, settings=Settings(kernels="native", quiet=True))
    written = load_file(str(out))
    unet = got["unet"]
    assert unet and all(isinstance(t, torch.Tensor) for t in unet.values())
    key = "conv_in.weight"
    assert torch.equal(unet[key], written[f"model.diffusion_model.input_blocks.0.0.weight"])


def test_span_ready_leaves_float64_to_torch(tmp_path):
    """A float64 copy stays on torch, whose NaN/inf count reads it; the native scan has no float64 form."""
    _library()
    from hubmix.engine.chunk import span_ready
    from hubmix.engine.kernels import Kernels
    from hubmix.engine.plan import Task
    from hubmix.formats.model import TensorRef

    path = tmp_path / "t.safetensors"
    save_file({"d": torch.zeros(4, dtype=torch.float64), "f": torch.zeros(4), "i": torch.zeros(4, dtype=torch.int64)},
              str(path))
    f = SafetensorsFile(path)
    kernels = Kernels("native", total_elements=1)
    ready = {}
    for key in ("d", "f", "i"):
        ref = TensorRef(f.info(key).dtype_name, (4,), f, key)
        ready[key] = span_ready(Task("unet", key, (4,), ref.dtype_name, [ref], [0]), kernels)
    assert ready == {"d": False, "f": True, "i": True}
