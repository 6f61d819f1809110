"""Fused native kernels for the built-in methods: one pass over memory per chunk, loaded in milliseconds.

Each kernel reads the stored inputs (fp16, bf16 or fp32), does the method's arithmetic in float32 in exactly the
order the eager torch code does (C compiled without contraction or fast-math, scalars rounded to float32 the way
torch rounds Python floats), and writes the output dtype; a selection kernel copies the stored bits of the value it
takes. So its bytes equal the eager path's, which the tests check for every kernel.

Why not only torch.compile: on a small machine inductor needs 4 to 6 seconds per process before its first kernel
runs (imports, a CPU-ISA probe that compiles and runs test programs, cache loading), as long as a whole SD1.5 merge
should take. This C source (csrc/, plus the kernels native_source generates) is compiled once per machine (about
8.5 s on 2 cores, in parallel parts, with the system's C compiler; hubmix.engine.native_build) into hubmix's cache
and then loaded with ctypes; ctypes releases the GIL, so worker threads run kernels in parallel. A function is handed to
other threads only once its argument types are set.
Methods without a native kernel (a user's own) are fused by torch.compile instead (hubmix.kernels).
"""

from __future__ import annotations

import ctypes
import os
import threading
import types
from typing import TYPE_CHECKING, Any, Callable

from hubmix.engine import native_build
from hubmix.engine.native_source import (DARE, DTYPES, csrc_text, fp8_float32_bits, helpers_unit,  # noqa: F401
                                         prelude, source)
from hubmix.formats.io.span import Packed, Span, dtype_name, torch_dtype
from hubmix.formats.quant.gguf_types import type_id, type_nbytes

if TYPE_CHECKING:
    import torch

# Which native kernel computes a method, and its float32 scalars derived from the parameters as torch would.
def _coefficients(method: str, n: int, p: dict[str, float]) -> tuple[str, tuple[float, float, float, float]] | None:
    if method == "weighted_sum":
        return "weighted_sum", (1 - p["alpha"], p["alpha"], 0.0, 0.0)
    if method == "add_difference":
        return "add_difference", (p["alpha"], 0.0, 0.0, 0.0)
    if method in ("lossless", "maxdiff"):
        ref = p.get("ref_alpha", 0.5)
        return f"{method}{n}", (p["alpha"], p["beta"], 1 - ref, ref)
    if method == "slerp":
        return "weighted_sum", (p["ka"], p["kb"], 0.0, 0.0)
    if method == "triple_sum":
        return "triple_sum", (1 - p["alpha"] - p["beta"], p["alpha"], p["beta"], 0.0)
    if method == "sum_twice":
        return "sum_twice", (1 - p["beta"], 1 - p["alpha"], p["alpha"], p["beta"])
    if method == "train_difference":
        return "train_difference", (p["alpha"], 1.8, 0.0, 0.0)
    if method == "model_stock" and n == 3:
        return "model_stock3", (p["t"], 1 - p["t"], 2.0, 0.0)
    if method == "ties" and n == 3:
        return "ties3", (p["threshold0"], p["threshold1"], p["lambda"], 0.0)
    if method == "dare" and p.get("drop", 0.0) > 0:  # drop 0 divides by nothing (the eager code)
        return ("dare2" if n == 2 else f"dare3{p['combine']}"), (1 - p["drop"], p["lambda"], 0.0, 0.0)
    return None


def covers(method: str, params: dict[str, float], n: int) -> bool:
    """Whether a native kernel computes `method` over `n` inputs with these parameters."""
    return n in SUPPORTED.get(method, ()) and _coefficients(method, n, params) is not None


# method -> the numbers of inputs it has a native kernel for
SUPPORTED = {"weighted_sum": (2,), "add_difference": (3,), "lossless": (2, 3), "maxdiff": (2, 3), "slerp": (2,),
             "triple_sum": (3,), "sum_twice": (3,), "train_difference": (3,), "model_stock": (3,), "ties": (3,),
             "dare": (2, 3)}


class Native:
    """The compiled library, built on first use (once per machine and source) and shared by every merge."""

    _lock = threading.Lock()
    _lib: ctypes.CDLL | None = None
    _error: str | None = None
    build_seconds: float | None = None
    # typed functions of the helpers unit, set before the library is published in _lib
    scans: dict[str, Any] = {}
    scan_addresses: dict[str, int] = {}
    helpers: dict[str, Any] = {}

    @classmethod
    def library(cls) -> ctypes.CDLL | None:
        with cls._lock:
            if cls._lib is None and cls._error is None:
                try:
                    cls._lib = cls._build_and_load()
                except Exception as e:  # noqa: BLE001 - no compiler, odd platform: eager is equally correct
                    cls._error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            return cls._lib

    @classmethod
    def error(cls) -> str | None:
        return cls._error

    @classmethod
    def _build_and_load(cls) -> ctypes.CDLL:
        import time

        if os.environ.get("HUBMIX_NATIVE", "1") == "0":
            raise RuntimeError("disabled by HUBMIX_NATIVE=0")
        t0 = time.perf_counter()
        loaded, built = native_build.load(source(), cls._prepare)
        if built:
            cls.build_seconds = time.perf_counter() - t0
        return loaded

    @classmethod
    def _prepare(cls, lib: ctypes.CDLL) -> None:
        """Type every helper the engine calls (an AttributeError here means a library without them: rebuilt),
        fill the float16 table; all before any thread can see the library."""
        from hubmix.methods.statistics import BLOCK

        p, i64, u32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32
        scans = {t: _typed(lib, f"nonfinite_{t}", [p, i64], i64) for t in DTYPES.values()}
        helpers = {
            "scanned": _typed(lib, "scanned", [p] * 2 + [ctypes.c_int32] * 3 + [p] * 4 + [i64]
                              + [ctypes.c_float] * 4 + [p], None),
            "dare_keep": _typed(lib, "dare_keep", [i64, i64, u32, u32, p], None),
            "hist_high": _typed(lib, "hist_high", [p, p, i64, p], None),
            "hist_low": _typed(lib, "hist_low", [p, p, i64, u32, p], None),
            "block_dots": _typed(lib, "block_dots", [p, p, i64, p], None),
            "lora_delta": _typed(lib, "lora_delta", [p, p, i64, i64, i64, ctypes.c_double, p], ctypes.c_int),
            "fused_run": _typed(lib, "fused_run", [p, ctypes.c_int32, p] + [ctypes.c_int32] * 3 + [p] * 5
                                + [ctypes.c_int32, i64] + [ctypes.c_float] * 4 + [i64] + [u32] * 3
                                + [ctypes.c_float, p], ctypes.c_float),
            **{f"transpose_b{w}": _typed(lib, f"transpose_b{w}", [p, p, i64, i64], None) for w in (1, 2, 4)},
        }
        if _typed(lib, "dot_block", [], i64)() != BLOCK:
            raise AttributeError("the library's block sums use another block size")
        _typed(lib, "init_f16", [], None)()  # the float16 load table, before any kernel runs
        cls.scans, cls.helpers = scans, helpers
        from hubmix.formats.quant import gguf_blocks  # formats is a floor below: the library is handed over

        gguf_blocks.LIB = types.SimpleNamespace(**{n: _typed(lib, n, [ctypes.c_int, p, p, i64], ctypes.c_int)
                                                   for n in ("gguf_quantize", "gguf_dequantize")})
        cls.scan_addresses = {t: ctypes.cast(f, ctypes.c_void_p).value for t, f in scans.items()}


def _typed(lib: ctypes.CDLL, name: str, argtypes: list[Any], restype: Any) -> Any:
    """A fresh function object for `name` (lib[name], not the attribute CDLL shares between callers) with its
    types set: only then may it be published to other threads."""
    fn = lib[name]
    fn.argtypes, fn.restype = argtypes, restype
    return fn


_SIZES = {"f16": 2, "bf16": 2, "f32": 4, "e4m3": 1, "e5m2": 1}
_ARGTYPES = [ctypes.c_void_p] * 4 + [ctypes.c_int64] + [ctypes.c_float] * 4
DARE_ARGTYPES = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_uint32] * 3 + [ctypes.c_float] * 2


def kernel(method: str, dtypes: list[Any], out_dtype: Any) -> Callable[..., Any] | None:
    """A function (views, params, out=None, ctx=None, counts=None) -> output chunk for CPU views that are torch
    tensors or spans (dtypes as torch dtypes or their names). The result is written into `out` (a reused flat
    buffer of the output dtype: a tensor, or a span that must be given) when it fits; None when no native kernel
    fits. With `counts` (a list), the inputs' NaN/inf elements are counted in the same pass and put there.
    `quant` (for a float32 output dtype) fuses a quantized output's work into the same pass, without storing the
    float32 results: "amax" returns their largest |x| (NaN if any is NaN) and stores nothing; a float scale stores
    them as float8_e4m3fn codes of x / scale (saturated at 448, formats.quant.scaled_fp8's encoding) into `out`; a
    ggml type name ("Q8_0") stores them as that type's GGUF blocks into `out` (a uint8 span; the chunk is whole
    blocks). Views may be Packed GGUF blocks (span.Packed, whole blocks from the first): the float32 kernel then
    reads them dequantized step by step (csrc/quant.c's fused_run), their values never stored in memory."""
    names = [dtype_name(d) for d in dtypes]
    out_name = dtype_name(out_dtype)
    if len(set(names)) != 1 or names[0] not in DTYPES or out_name not in DTYPES:
        return None
    if method != "convert" and len(names) not in SUPPORTED.get(method, ()):
        return None
    lib = Native.library()
    if lib is None:
        return None
    t_in, t_out = DTYPES[names[0]], DTYPES[out_name]
    sizes = (_SIZES[t_in], _SIZES[t_out])
    fns = {}

    def run(views: list[Any], params: dict[str, float], out: Any = None, ctx=None,
            counts: list[int] | None = None, quant: str | float | None = None) -> Any:
        coef = ("convert", (0.0,) * 4) if method == "convert" else _coefficients(method, len(views), params)
        if coef is None:  # parameters without a native form (dare with drop 0): the eager code
            return None
        name, ks = coef
        fn = fns.get(name)
        if fn is None:  # typed first, then published (a thread that finds it may call it at once)
            fn = fns.setdefault(name, _typed(lib, f"{name}_{t_in}_{t_out}",
                                             DARE_ARGTYPES if name in DARE else _ARGTYPES, None))
        store = _store_code(quant)
        packed = [v.type_id if isinstance(v, Packed) else 0 for v in views]
        if isinstance(views[0], (Span, Packed)):
            n = views[0].numel
            want = {STORE_PLAIN: out_name, STORE_FP8: "float8_e4m3fn"}.get(store, "uint8")
            assert store == STORE_AMAX or (out is not None and out.dtype == want and (
                out.numel == n if store < 0 else out.nbytes >= type_nbytes(quant, n))), "a span merge passes its buffer"
            ptrs = [v.raw.address if isinstance(v, Packed) else v.address for v in views]
        else:
            import torch

            assert store <= 0, "GGUF blocks are stored from spans"
            want = out_name if store == STORE_PLAIN else "float8_e4m3fn"
            flat = [v.reshape(-1) if v.is_contiguous() else v.contiguous().reshape(-1) for v in views]
            n = flat[0].numel()
            if store != STORE_AMAX and (out is None or not out.is_contiguous() or dtype_name(out.dtype) != want
                                        or out.numel() != n):
                out = torch.empty(n, dtype=torch_dtype(want))
            ptrs = [v.data_ptr() for v in flat]
        dest = 0 if store == STORE_AMAX else out.address if isinstance(out, Span) else out.data_ptr()
        ptrs += [0] * (3 - len(ptrs))
        dare = (0, 0, 0, 0)
        if name in DARE:
            from hubmix.methods.dropmask import stream, threshold

            dare = (ctx.start, *(stream(params["seed"], ctx.key, i) for i in (1, 2)), threshold(params["drop"]))
        found = (ctypes.c_int64 * 3)()
        scan = Native.scan_addresses[t_in] if counts is not None else None
        if store != STORE_PLAIN or any(packed):  # step by step: dequantized, merged, then reduced or encoded
            amax = Native.helpers["fused_run"](ctypes.cast(fn, ctypes.c_void_p), name in DARE, scan, len(views),
                                               *sizes, *ptrs, (ctypes.c_int32 * 3)(*packed, *[0] * (3 - len(packed))),
                                               dest, store, n, *ks, *dare, quant if store == STORE_FP8 else 0.0,
                                               found)
            if amax < 0:
                raise RuntimeError(f"{method}: a GGUF type the native unit does not cover in {packed} -> {quant}")
        elif name in DARE:
            fn(*ptrs, dest, n, *dare, ks[0], ks[1])
        elif counts is not None:
            Native.helpers["scanned"](ctypes.cast(fn, ctypes.c_void_p), scan, len(views), *sizes, *ptrs, dest, n,
                                      *ks, found)
        else:
            fn(*ptrs, dest, n, *ks)
        if counts is not None:
            counts[:] = ([nonfinite_count(v) for v in views] if name in DARE and store == STORE_PLAIN
                         and not any(packed) else found[:len(views)])
        if store == STORE_AMAX:
            return amax
        if store > 0:  # the blocks' bytes
            return Span(out.owner, out.address, "uint8", (type_nbytes(quant, n),))  # type: ignore[arg-type]
        return out.reshape(views[0].shape)

    return run


STORE_PLAIN, STORE_AMAX, STORE_FP8 = -3, -2, -1  # csrc/quant.c's fused_run stores; a ggml type id stores its blocks


def _store_code(quant: str | float | None) -> int:
    """fused_run's `store` for kernel()'s `quant`."""
    if quant is None:
        return STORE_PLAIN
    if quant == "amax":
        return STORE_AMAX
    if isinstance(quant, str):
        return type_id(quant)
    return STORE_FP8


def nonfinite_count(view: Any) -> int | None:
    """NaN/inf elements of a contiguous CPU view (a tensor or a span) in a storage dtype the library covers; None
    otherwise, and while the library is not loaded: a merge too small for native kernels does not build it just for
    this scan."""
    lib = Native._lib
    if isinstance(view, Span):
        t = DTYPES.get(view.dtype)
        return None if lib is None or t is None else Native.scans[t](view.address, view.numel)
    t = DTYPES.get(dtype_name(view.dtype))
    if lib is None or t is None or view.device.type != "cpu" or not view.is_contiguous():
        return None
    return Native.scans[t](view.data_ptr(), view.numel())


def transformed(transform: str | None, span: Span, shape: tuple[int, ...]) -> Span | None:
    """A layout transform (formats.layouts) applied to a span, giving `shape`: conv1x1 is a reshape; transpose (a
    2-D tensor) and swap_halves (its two halves along dim 0 exchanged) copy into a fresh buffer. Both directions
    are the same operation. None where the library is needed and not loaded."""
    if transform in (None, "conv1x1"):
        return span.reshape(shape)
    out = Span.allocate(span.nbytes, span.dtype).reshape(shape)
    if transform == "swap_halves":
        src, dst = span.memoryview(), out.memoryview()
        half = span.nbytes // 2
        dst[:half], dst[half:] = src[half:], src[:half]
        return out
    assert transform == "transpose" and len(span.shape) == 2, (transform, span.shape)
    lib = Native._lib
    if lib is None:
        return None
    Native.helpers[f"transpose_b{span.itemsize}"](span.address, out.address, span.shape[0], span.shape[1])
    return out


def lora_delta(up: torch.Tensor, down: torch.Tensor, scale: float, total: torch.Tensor) -> bool:
    """total (float64, rows x cols) += scale * up @ down in engine.lora's fixed order, when the library is loaded
    (a merge too small to build it computes the same with torch). False where it did nothing."""
    if Native._lib is None or "lora_delta" not in Native.helpers:
        return False
    up, down = up.contiguous(), down.contiguous()
    rows, rank = up.shape
    return Native.helpers["lora_delta"](up.data_ptr(), down.data_ptr(), rows, rank, down.shape[1], scale,
                                        total.data_ptr()) == 0


def install_dropmask() -> bool:
    """Give hubmix.methods.dropmask the native mask and hubmix.methods.statistics the native histograms and block
    sums (the same functions as their torch code, bit for bit, which the tests check)."""
    from hubmix.methods import dropmask, statistics

    lib = Native.library()
    if lib is None:
        return False
    fn = Native.helpers["dare_keep"]

    def keep(start: int, n: int, s: int, t: int) -> torch.Tensor:
        import torch

        out = torch.empty(n, dtype=torch.bool)
        fn(start, n, s, t, out.data_ptr())
        return out

    dropmask.native_keep = keep
    hi, lo, dots = Native.helpers["hist_high"], Native.helpers["hist_low"], Native.helpers["block_dots"]

    def histogram(x: torch.Tensor, base: torch.Tensor, high: int) -> torch.Tensor | None:
        import torch

        if x.dtype != torch.float32 or base.dtype != torch.float32 or x.device.type != "cpu":
            return None
        x, base = x.contiguous(), base.contiguous()
        out = torch.zeros(statistics.HI_BINS if high < 0 else statistics.LO_BINS, dtype=torch.int64)
        if high < 0:
            hi(x.data_ptr(), base.data_ptr(), x.numel(), out.data_ptr())
        else:
            lo(x.data_ptr(), base.data_ptr(), x.numel(), high, out.data_ptr())
        return out

    def block_dots(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        import torch

        if x.dtype != torch.float32 or y.dtype != torch.float32 or x.device.type != "cpu":
            return None
        x, y = x.contiguous(), y.contiguous()
        out = torch.empty(-(-x.numel() // statistics.BLOCK), dtype=torch.float64)
        dots(x.data_ptr(), y.data_ptr(), x.numel(), out.data_ptr())
        return out

    statistics.native_histogram = histogram
    statistics.native_dots = block_dots
    return True
