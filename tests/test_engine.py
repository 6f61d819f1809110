"""The engine's execution paths give the same bytes: fused kernels vs eager, small vs large chunks, workers,
devices; and the memory budget bounds chunk sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import hubmix
from hubmix import Recipe
from hubmix.engine import pipeline as engine
from hubmix.engine.pipeline import Settings

UNET = Path("unet") / "diffusion_pytorch_model.safetensors"
CASES = [("lossless", 3, None), ("lossless", 2, None), ("maxdiff", 3, "fp32"), ("weighted_sum", 2, None),
         ("add_difference", 3, "bf16"), ("triple_sum", 3, None), ("sum_twice", 3, "bf16"),
         ("train_difference", 3, "fp32"), ("slerp", 2, None), ("model_stock", 3, None), ("ties", 3, None),
         ("dare", 3, "fp32"), ("dare", 2, None)]


def _merge(zoo, out, method, n, dtype, settings):
    inputs = [str(zoo.diffusers("sd1", s, dtype="fp16")) for s in (1, 2, 3)[:n]]
    from hubmix.methods import get_method

    params = {"alpha": 0.9, "beta": 1.1} if method in ("lossless", "maxdiff") else {"alpha": 0.3}
    params = {k: v for k, v in params.items() if k in get_method(method).applicable(n)}
    return hubmix.merge(Recipe(models=inputs, method=method, params=params, dtype=dtype), out=out, quiet=True,
                        settings=settings)


def _same_files(a: Path, b: Path) -> None:
    files = sorted(a.rglob("*.safetensors"))
    assert files
    for f in files:
        assert f.read_bytes() == (b / f.relative_to(a)).read_bytes(), f


@pytest.fixture(scope="module")
def eager_merges(zoo, tmp_path_factory):
    """(method, n, dtype) -> (result, folder) of the eager merge, made once for both fused kinds."""
    root, made = tmp_path_factory.mktemp("eager"), {}

    def get(method, n, dtype):
        if (method, n, dtype) not in made:
            out = root / f"{method}{n}-eager"
            made[(method, n, dtype)] = (_merge(zoo, out, method, n, dtype, Settings(kernels="eager")), out)
        return made[(method, n, dtype)]

    return get


@pytest.mark.parametrize("kind", ["native", "compile"])
def test_fused_kernels_give_the_eager_bytes(zoo, tmp_path, kind, eager_merges):
    from hubmix.engine import kernels, native

    if kind == "compile" and not kernels.compiler_available():
        pytest.skip("no C++ compiler for torch.compile")
    if kind == "native" and native.Native.library() is None:
        pytest.skip(f"no native kernels here: {native.Native.error()}")
    label = "compiled" if kind == "compile" else kind
    from hubmix.methods import get_method

    for method, n, dtype in CASES:
        if kind == "compile" and get_method(method).element is not None:
            continue  # whole-tensor methods are not traced: their statistics and contexts are runtime values
        eager, eager_out = eager_merges(method, n, dtype)
        fused = _merge(zoo, tmp_path / f"{method}{n}-{kind}", method, n, dtype, Settings(kernels=kind))
        assert eager.engine["kernels"]["native"] == eager.engine["kernels"]["compiled"] == 0
        assert fused.engine["kernels"][label] > 0 and fused.engine["kernels"]["eager"] == 0, fused.summary.events
        _same_files(eager_out, tmp_path / f"{method}{n}-{kind}")


def test_native_kernels_match_torch_on_every_dtype_and_special_value():
    """Every native kernel against the eager torch code, on ties, infinities, subnormals and signed zeros."""
    from hubmix.engine import native
    from hubmix.engine.kernels import chunk_function, eager_kernel
    from hubmix.methods import get_method

    if native.Native.library() is None:
        pytest.skip(f"no native kernels here: {native.Native.error()}")
    gen = torch.Generator().manual_seed(0)
    n = 50_000
    base = torch.randn(n, generator=gen)
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2)
    for din in dtypes:
        xs = [(base + 0.01 * torch.randn(n, generator=gen)).to(din) for _ in range(3)]
        xs[2][:500] = (2 * xs[0][:500].float() - xs[1][:500].float()).to(din)  # exact ties
        xs[0][500:510] = float("inf")
        xs[1][510:520] = 1e-42 if din != torch.float16 else 3e-8
        xs[2][520:530] = -0.0
        xs[1][530:540] = 6e4  # past fp8's range once merged: e4m3fn saturates, e5m2 overflows to infinity
        for dout in dtypes:
            for name, k, params in [("lossless", 3, {"alpha": 1.0, "beta": 1.0}),
                                    ("lossless", 3, {"alpha": 0.9, "beta": 1.1}),
                                    ("lossless", 2, {"alpha": 1.0, "beta": 1.0, "ref_alpha": 0.3}),
                                    ("maxdiff", 3, {"alpha": 1.0, "beta": 1.0}),
                                    ("maxdiff", 2, {"alpha": 1.2, "beta": 1.0, "ref_alpha": 0.5}),
                                    ("weighted_sum", 2, {"alpha": 0.3}), ("add_difference", 3, {"alpha": 0.7}),
                                    ("triple_sum", 3, {"alpha": 0.2, "beta": 0.45}),
                                    ("sum_twice", 3, {"alpha": 0.3, "beta": 0.6}),
                                    ("train_difference", 3, {"alpha": 0.7})]:
                m = get_method(name)
                want = eager_kernel(chunk_function(m, [din] * k, dout), dout, torch.device("cpu"))(xs[:k], params)
                got = native.kernel(name, [din] * k, dout)(xs[:k], params)
                bits = {4: torch.int32, 2: torch.int16, 1: torch.int8}[dout.itemsize]
                assert torch.equal(want.view(bits), got.view(bits)), (name, k, din, dout, params)


def test_native_fp8_conversions_match_torch_on_every_code_and_float32_bit_pattern():
    """fp8 loads (all 256 codes) and stores (random float32 bit patterns: every exponent, NaN, infinities,
    ties) through a native kernel against torch's own conversions."""
    from hubmix.engine import native

    if native.Native.library() is None:
        pytest.skip(f"no native kernels here: {native.Native.error()}")
    gen = torch.Generator().manual_seed(1)
    patterns = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8)
        zero = torch.zeros(256, dtype=fp8)
        got = native.kernel("weighted_sum", [fp8, fp8], torch.float32)([codes, zero], {"alpha": 0.0})
        want = 1.0 * codes.float() + 0.0 * zero.float()  # the kernel's own arithmetic (-0 + 0 is +0)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), fp8
        f = torch.cat([patterns.view(torch.float32), torch.tensor([448.0, 464.0, 480.0, 57344.0, 61440.0, 1e-9])])
        got = native.kernel("weighted_sum", [torch.float32] * 2, fp8)([f, torch.zeros_like(f)], {"alpha": 0.0})
        assert torch.equal(got.view(torch.uint8), (1.0 * f + 0.0 * torch.zeros_like(f)).to(fp8).view(torch.uint8))


def test_native_f16_loads_match_torch_on_every_code():
    """Every float16 code (NaN payloads, infinities, subnormals, signed zeros) through the kernels' f16 load (F16C
    blocks where the compiler targets it, the table elsewhere), at a length with a ragged last block and lane tail;
    and every f16-input kernel on all codes against its eager code. torch's own half -> float keeps a NaN's payload
    in its vector loop but returns 0x7FFFFFFF in its scalar tail, so NaN results are compared as NaN only."""
    from hubmix.engine import native
    from hubmix.engine.kernels import chunk_function, eager_kernel
    from hubmix.methods import get_method

    if native.Native.library() is None:
        pytest.skip(f"no native kernels here: {native.Native.error()}")
    codes = torch.cat([torch.arange(65536, dtype=torch.int32), torch.arange(0x7BF8, 0x7C0D)])  # 21 past 65536
    a = codes.to(torch.int16).view(torch.float16)  # int32 -> int16 wraps: the high codes are the negative halves
    zero = torch.zeros_like(a)
    got = native.kernel("weighted_sum", [torch.float16] * 2, torch.float32)([a, zero], {"alpha": 0.0})
    nan = (codes & 0x7C00 == 0x7C00) & (codes & 0x3FF != 0)
    # a NaN's payload is kept and made quiet (the hardware's and the table's value)
    quiet = (((codes & 0x8000) << 16) | 0x7FC00000 | ((codes & 0x3FF) << 13)).to(torch.int32)
    want = torch.where(nan, quiet, (1.0 * a.float() + 0.0 * zero.float()).view(torch.int32))
    assert torch.equal(got.view(torch.int32), want)
    gen = torch.Generator().manual_seed(2)
    xs = [a, a[torch.randperm(a.numel(), generator=gen)], a[torch.randperm(a.numel(), generator=gen)]]
    for dout in (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2):
        bits = {4: torch.int32, 2: torch.int16, 1: torch.int8}[dout.itemsize]
        for name, k, params in [("lossless", 3, {"alpha": 0.9, "beta": 1.1}), ("maxdiff", 3, {"alpha": 1.0, "beta": 1.0}),
                                ("lossless", 2, {"alpha": 1.0, "beta": 1.0, "ref_alpha": 0.3}),
                                ("weighted_sum", 2, {"alpha": 0.3}), ("add_difference", 3, {"alpha": 0.7}),
                                ("train_difference", 3, {"alpha": 0.7})]:
            want = eager_kernel(chunk_function(get_method(name), [torch.float16] * k, dout), dout,
                                torch.device("cpu"))(xs[:k], params)
            got = native.kernel(name, [torch.float16] * k, dout)(xs[:k], params)
            nan = want.float().isnan()
            assert torch.equal(nan, got.float().isnan()), (name, k, dout)
            assert torch.equal(want.view(bits)[~nan], got.view(bits)[~nan]), (name, k, dout)


def test_native_nonfinite_count_equals_isfinite_on_every_dtype_and_edge_value():
    """The native NaN/inf scan against torch.isfinite: all fp16, bf16 and fp8 codes, float32 bit patterns and edge
    values, lengths past a counter block (nothing overflows), empty views; count_nonfinite gives the same counts
    with and without the library, and non-contiguous views are left to torch."""
    from hubmix.engine import native, pipeline

    lib = native.Native.library()
    if lib is None:
        pytest.skip(f"no native kernels here: {native.Native.error()}")
    gen = torch.Generator().manual_seed(3)
    f32_edges = torch.tensor([0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x7FBFFFFF, 0x7F7FFFFF,
                              0xFF7FFFFF, 0x00000001, 0x807FFFFF, 0x00800000, 0, 0x80000000], dtype=torch.int64)
    patterns = torch.randint(-2**31, 2**31 - 1, (300_000,), generator=gen, dtype=torch.int64)
    cases = {
        torch.float16: torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16),
        torch.bfloat16: torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16),
        torch.float32: torch.cat([f32_edges, patterns]).to(torch.int32).view(torch.float32),
        torch.float8_e4m3fn: torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn),
        torch.float8_e5m2: torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e5m2),
    }
    for dtype, codes in cases.items():
        for x in (codes, codes.repeat(5)[:-3], codes[:0], codes[7:20],
                  codes[~torch.isfinite(codes.float())][:1].repeat(200_003)):  # every element NaN or inf
            want = int((~torch.isfinite(x.float())).sum())
            assert native.nonfinite_count(x) == want, (dtype, x.numel())
            assert pipeline.count_nonfinite([x]) == [want], dtype
            try:
                native.Native._lib = None  # the torch fallback gives the same count
                assert native.nonfinite_count(x) is None
                assert pipeline.count_nonfinite([x]) == [want], dtype
            finally:
                native.Native._lib = lib
        assert native.nonfinite_count(codes[::2]) is None  # strided: torch counts it
    assert native.nonfinite_count(torch.zeros(4, dtype=torch.float64)) is None


def test_native_whole_tensor_kernels_match_eager():
    """The element passes of slerp, model_stock, ties and dare (statistics given) against their eager torch code,
    on cancelling and zero task vectors, in every dtype; dare's mask at an offset inside its tensor."""
    from hubmix.engine import native
    from hubmix.engine.kernels import chunk_function, eager_kernel
    from hubmix.methods import get_method
    from hubmix.methods.registry import Context

    if native.Native.library() is None:
        pytest.skip(f"no native kernels here: {native.Native.error()}")
    gen = torch.Generator().manual_seed(1)
    n = 50_000
    base = torch.randn(n, generator=gen)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    cases = [("slerp", 2, {"alpha": 0.3, "ka": 0.61, "kb": 0.4}), ("model_stock", 3, {"t": 0.7}),
             ("ties", 3, {"density": 0.5, "lambda": 0.8, "threshold0": 0.005, "threshold1": 0.007}),
             ("dare", 3, {"drop": 0.6, "lambda": 0.9, "seed": 5, "combine": "sum"}),
             ("dare", 3, {"drop": 0.3, "lambda": 1.0, "seed": 6, "combine": "ties"}),
             ("dare", 2, {"drop": 0.9, "lambda": 0.5, "seed": 7, "combine": "ties"})]
    for din in dtypes:
        xs = [(base + 0.01 * torch.randn(n, generator=gen)).to(din) for _ in range(3)]
        xs[2][:500] = (2 * xs[0][:500].float() - xs[1][:500].float()).to(din)  # cancelling task vectors
        xs[1][500:600] = xs[0][500:600]  # zero task vector
        for dout in dtypes:
            for name, k, params in cases:
                m = get_method(name)
                ctx = Context("unet/some.weight", 123_456)
                want = eager_kernel(chunk_function(m, [din] * k, dout), dout, torch.device("cpu"))(xs[:k], params, ctx)
                got = native.kernel(name, [din] * k, dout)(xs[:k], params, None, ctx)
                bits = torch.int32 if dout == torch.float32 else torch.int16
                assert torch.equal(want.view(bits), got.view(bits)), (name, k, din, dout, params)


def test_chunking_workers_and_budget_do_not_change_bytes(zoo, tmp_path, monkeypatch):
    base = _merge(zoo, tmp_path / "base", "lossless", 3, None, Settings(kernels="eager", workers=1))
    assert base.engine["workers"] == 1
    monkeypatch.setattr("hubmix.engine.kernels.SUBCHUNK", 777)  # eager pieces that do not divide the chunks
    small = _merge(zoo, tmp_path / "small", "lossless", 3, None,
                   Settings(kernels="eager", workers=4, max_memory=1 << 20))
    assert small.engine["chunk_elements"] == 1 << 16  # the floor: many chunks per tensor
    assert (tmp_path / "base" / UNET).read_bytes() == (tmp_path / "small" / UNET).read_bytes()


def test_budget_bounds_chunks():
    s = Settings(max_memory=256 << 20)
    assert engine.chunk_elements(s, 2) * 32 * (2 * 2 + 2) <= 256 << 20
    assert engine.chunk_elements(Settings(max_memory=64 << 30), 2) == 1 << 24  # capped
    assert engine.chunk_elements(Settings(max_memory=1), 2) == 1 << 16  # floored


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_gives_the_cpu_bytes_for_selection_and_close_values_for_arithmetic(zoo, tmp_path):
    for method, n, dtype in CASES:
        cpu = _merge(zoo, tmp_path / f"{method}{n}-cpu", method, n, dtype, Settings(device="cpu", kernels="eager"))
        gpu = _merge(zoo, tmp_path / f"{method}{n}-gpu", method, n, dtype, Settings(device="cuda"))
        assert gpu.engine["device"].startswith("cuda") and cpu.engine["device"] == "cpu"
        from safetensors.torch import load_file

        x, y = (load_file(str(tmp_path / f"{method}{n}-{d}" / UNET)) for d in ("cpu", "gpu"))
        for k in x:
            if method in ("lossless", "maxdiff"):
                assert torch.equal(x[k], y[k]), (method, k)
            else:
                torch.testing.assert_close(x[k].float(), y[k].float(), rtol=1e-6, atol=1e-6)


def test_device_errors():
    from hubmix.engine.devices import resolve_device
    from hubmix.errors import HubmixError

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(HubmixError, match="not a device"):
        resolve_device("potato")
    if not torch.cuda.is_available():
        with pytest.raises(HubmixError, match="CUDA is not available"):
            resolve_device("cuda:0")
