"""The scaled-fp8 output's native path (engine/csrc/quant.c, prelude.h's e4m3 encoder, native.kernel's `quant`)
against torch: the float32 -> float8_e4m3fn encoder on every rounding case, merge kernels that return their amax or
store scaled-fp8 codes in the same pass against the eager merge followed by torch's encoding, and merges that take
that path giving the eager path's bytes."""

from __future__ import annotations

import pytest
import torch

import hubmix
from hubmix import Recipe


@pytest.fixture(scope="module")
def lib():
    from hubmix.engine import native

    if native.Native.library() is None:
        pytest.skip(f"no native library here: {native.Native.error()}")
    return native


def e4m3_cases() -> torch.Tensor:
    """float32 bit patterns covering every e4m3 rounding decision: all 2^16 values of the top 16 bits (sign,
    exponent, the mantissa bits that decide normal and subnormal rounding, the half-way bit included) with the low 16
    bits zero, one, just below and at the half of their range, and all ones (ties, sticky bits); NaNs with payloads,
    infinities, float32 subnormals; and 2^20 random patterns."""
    top = torch.arange(1 << 16, dtype=torch.int64) << 16
    low = torch.tensor([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=torch.int64)
    rand = torch.randint(0, 1 << 32, (1 << 20,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    bits = torch.cat([(top[:, None] | low[None, :]).reshape(-1), rand,
                      torch.tensor([0x7F800001, 0xFFC00123, 0x7F800000, 0xFF800000, 0x00000001, 0x807FFFFF])])
    return (bits - ((bits >= 1 << 31).long() << 32)).to(torch.int32).view(torch.float32)


def test_e4m3_encoder_gives_torchs_bytes(lib):
    """prelude.h's vectorized encoder: torch's .to(float8_e4m3fn) in a generated kernel (every float, saturating,
    NaN, -0), and torch's scaled-fp8 codes (x / s).clamp(-448, 448).to(float8_e4m3fn) in quant.c's encoder."""
    from hubmix.engine import native_quant
    from hubmix.formats.quant import accel

    x = e4m3_cases()
    convert = lib.kernel("convert", ["float32"], "float8_e4m3fn")
    got = convert([x], {}, torch.empty(x.numel(), dtype=torch.float8_e4m3fn))
    assert torch.equal(got.view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8))
    assert native_quant.install()
    try:
        for s in (1.0, 0.0123, 3e-5, 7.0, 2.0 ** -20):
            want = (x / torch.tensor(s)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)
            assert torch.equal(accel.HOOKS["fp8_e4m3"](x, s).view(torch.uint8), want), s
        finite = x[x.isfinite()]
        assert accel.HOOKS["amax"](finite) == float(finite.abs().amax())
        assert accel.HOOKS["amax"](x) != accel.HOOKS["amax"](x)  # NaN among them
    finally:
        native_quant.uninstall()


FUSED_CASES = [("lossless", 3, {"alpha": 0.9, "beta": 1.1}), ("weighted_sum", 2, {"alpha": 0.3}),
               ("add_difference", 3, {"alpha": 0.7}), ("maxdiff", 2, {"alpha": 1.0, "beta": 1.0}),
               ("ties", 3, {"density": 0.5, "lambda": 0.8, "threshold0": 0.005, "threshold1": 0.007}),
               ("dare", 3, {"drop": 0.6, "lambda": 0.9, "seed": 5, "combine": "sum"}), ("convert", 1, {})]


@pytest.mark.parametrize("din", [torch.float8_e4m3fn, torch.bfloat16, torch.float16, torch.float32])
def test_fused_amax_and_codes_are_the_eager_merge_encoded_by_torch(lib, din):
    """native.kernel(..., quant="amax") is torch's amax of the eager merge in float32, quant=scale its scaled-fp8
    codes, on chunk lengths that are not whole steps, with NaN/inf among the inputs (counted in the same pass) and
    dare's mask at an offset inside its tensor."""
    from hubmix.engine.kernels import chunk_function, eager_kernel
    from hubmix.methods import get_method
    from hubmix.methods.registry import Context

    from hubmix.formats.quant.scaled_fp8 import fp8_scale

    gen = torch.Generator().manual_seed(2)
    n = 3 * 4096 + 77
    clean = [(torch.randn(n, generator=gen) * (0.5 + i)).to(din) for i in range(3)]
    bad = [x.clone() for x in clean]
    bad[0][5], bad[1][4100], bad[2][n - 1], bad[1][9000] = float("nan"), float("inf"), -float("inf"), float("nan")
    ctx = Context("transformer/blocks.0.weight", 40_960)
    for xs in (clean, bad):
        for name, k, params in FUSED_CASES:
            views = xs[:k]
            if name == "convert":
                want = views[0].float()
            else:
                m = get_method(name)
                want = eager_kernel(chunk_function(m, [din] * k, torch.float32), torch.float32,
                                    torch.device("cpu"))(views, params, *([ctx] if m.element is not None else []))
            kernel = lib.kernel(name, [din] * k, torch.float32)
            amax = kernel(views, params, None, ctx, None, "amax")
            if want.isnan().any():
                assert amax != amax, (name, din)  # NaN: the scale is then 1
            else:
                assert amax == float(want.abs().amax()), (name, din)
            s = fp8_scale(amax)
            counts = [0] * k
            codes = kernel(views, params, torch.empty(n, dtype=torch.float8_e4m3fn), ctx, counts, s)
            expect = (want / torch.tensor(s)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
            assert torch.equal(codes.view(torch.uint8), expect.view(torch.uint8)), (name, din)
            assert counts == [int((~v.float().isfinite()).sum()) for v in views], (name, din)
    assert any(int((~v.float().isfinite()).sum()) for v in bad)


def test_fp8_scaled_merges_take_the_fused_path_and_give_the_eager_bytes(lib, zoo, tmp_path, monkeypatch):
    """Plain inputs (spans, no torch) and a scaled-fp8 input (dequantized torch views) into --dtype fp8_scaled: the
    native merge stores the codes itself (every quantized tensor's chunks, a fused qkv's parts too) and the file
    is the eager path's, byte for byte."""
    from hubmix.engine import chunk, pipeline
    from hubmix.engine.pipeline import Settings
    from quant_files import comfy_scaled_fp8

    flux = [zoo.single("flux", s) for s in (1, 2, 3)]
    fp8 = comfy_scaled_fp8(flux[0], tmp_path / "in-fp8.safetensors", "legacy")
    fused: list[str] = []
    real = chunk.compute_quantized

    def counted(job, *args):
        fused.append(job.task.key)
        return real(job, *args)

    monkeypatch.setattr(pipeline, "compute_quantized", counted)
    for inputs, spans in (([*flux], True), ([fp8, *flux[1:]], False)):
        out = {}
        for mode in ("native", "eager"):
            fused.clear()
            path = tmp_path / f"{mode}-{spans}" / "m.safetensors"  # the name is in the metadata
            path.parent.mkdir()
            res = hubmix.merge(Recipe(models=[str(p) for p in inputs], method="lossless",
                                      params={"alpha": 0.9, "beta": 1.1}, dtype="fp8_scaled"),
                               out=path, quiet=True, settings=Settings(kernels=mode, workers=2))
            out[mode] = path.read_bytes()
            if mode == "native":
                assert res.engine["torch"] is not spans
                assert any("qkv" in k or "to_q" in k for k in fused) and len(fused) >= 10, fused
            else:
                assert not fused
        assert out["native"] == out["eager"], spans
