"""Fused native kernels for the built-in methods: one pass over memory per chunk, loaded in milliseconds.

Each kernel reads the stored inputs (fp16, bf16 or fp32), does the method's arithmetic in float32 in exactly the
order the eager torch code does (C compiled without contraction or fast-math, scalars rounded to float32 the way
torch rounds Python floats), and writes the output dtype; a selection kernel copies the stored bits of the value it
takes. So its bytes equal the eager path's, which the tests check for every kernel.

Why not only torch.compile: on a small machine inductor needs 4 to 6 seconds per process before its first kernel
runs (imports, a CPU-ISA probe that compiles and runs test programs, cache loading), as long as a whole SD1.5 merge
should take. This C source (csrc/, plus the kernels generated here) is compiled once per machine (about 8.5 s on
2 cores, in parallel parts, with the system's C compiler; hubmix.engine.native_build) into hubmix's cache and then
loaded with ctypes; ctypes releases the GIL, so worker threads run kernels in parallel. A function is handed to
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
from hubmix.engine.native_source import csrc_text, fp8_float32_bits, helpers_unit, prelude  # noqa: F401
from hubmix.formats.io.span import Span, dtype_name, torch_dtype

if TYPE_CHECKING:
    import torch

# torch's dtype names -> the kernels' names for them (the library itself needs no torch: spans call it too)
DTYPES = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "float8_e4m3fn": "e4m3", "float8_e5m2": "e5m2"}
_BITS = {"f16": "u16", "bf16": "u16", "f32": "float", "e4m3": "uint8_t", "e5m2": "uint8_t"}  # selection copies

# name -> (number of inputs, float32 body computing `r`, or for selections `take` and the two candidates)
# Each body is the eager torch code of hubmix/methods/basic.py, operation for operation.
_ARITH = {
    "weighted_sum": (2, "float r = k1 * fa + k2 * fb;"),  # k1 = 1-alpha, k2 = alpha (slerp: its ka, kb)
    "add_difference": (3, "float r = fa + k1 * (fb - fc);"),  # k1 = alpha
    "convert": (1, "float r = fa;"),  # not a method: a copy into another dtype (x.float().to(dtype))
    # hubmix/methods/arithmetic.py and task_vectors.py
    "triple_sum": (3, "float r = k1 * fa + k2 * fb + k3 * fc;"),  # k1 = 1-alpha-beta, k2 = alpha, k3 = beta
    "sum_twice": (3, "float r = k1 * (k2 * fa + k3 * fb) + k4 * fc;"),  # 1-beta, 1-alpha, alpha, beta
    "train_difference": (3, "float x = fabs32(fb - fa); float d = fb - fc; float w = nan_to_num32(x / (x + "
                            "fabs32(d))); float r = fa + k1 * d * k2 * w;"),  # k1 = alpha, k2 = 1.8
    "model_stock3": (3, "float r = k1 * ((fb + fc) / k3) + k2 * fa;"),  # k1 = t, k2 = 1-t, k3 = 2
    # k1, k2 = the top-k thresholds of b - a and c - a, k3 = lambda
    "ties3": (3, "float t1 = fb - fa, t2 = fc - fa; float r = fa + k3 * elect2(fabs32(t1) >= k1 ? t1 : 0.0f, "
                 "fabs32(t2) >= k2 ? t2 : 0.0f);"),
}
# DARE: s1, s2 = the mask streams of b and c, t = the drop threshold, k1 = 1-drop, k2 = lambda (KD arguments)
_DARE = {
    "dare2": (2, "float d1 = dare_kept(start, i, s1, t) ? (fb - fa) / k1 : 0.0f; float r = fa + k2 * d1;"),
    "dare3sum": (3, "float d1 = dare_kept(start, i, s1, t) ? (fb - fa) / k1 : 0.0f; "
                    "float d2 = dare_kept(start, i, s2, t) ? (fc - fa) / k1 : 0.0f; float r = fa + k2 * (d1 + d2);"),
    "dare3ties": (3, "float d1 = dare_kept(start, i, s1, t) ? (fb - fa) / k1 : 0.0f; "
                     "float d2 = dare_kept(start, i, s2, t) ? (fc - fa) / k1 : 0.0f; float r = fa + k2 * elect2(d1, d2);"),
}
_SELECT = {
    # k1 = alpha, k2 = beta; two-model forms: k3 = 1-ref_alpha, k4 = ref_alpha, candidates a and b
    "lossless3": (3, "int take = fabs32(fa - k1 * fb) <= fabs32(fa - k2 * fc);", "b", "c"),
    "maxdiff3": (3, "int take = fabs32(fa - k1 * fb) > fabs32(fa - k2 * fc);", "b", "c"),
    "lossless2": (2, "float ref = k3 * fa + k4 * fb; int take = fabs32(ref - k1 * fa) <= fabs32(ref - k2 * fb);",
                  "a", "b"),
    "maxdiff2": (2, "float ref = k3 * fa + k4 * fb; int take = fabs32(ref - k1 * fa) > fabs32(ref - k2 * fb);",
                 "a", "b"),
}
_NAMES = ("a", "b", "c")


def _loop(n: int, t: str, body: str) -> str:
    """A kernel's element loop over `n` inputs stored as `t`; `body` reads fa, fb, fc and the index i. float16
    inputs are converted a block at a time by F16C where the compiler targets it, else loaded through the table."""
    xs = _NAMES[:n]
    loads = " ".join(f"float f{x} = ld_{t}({x}, i);" for x in xs)
    plain = f"for (int64_t i = 0; i < n; i++) {{ {loads} {body} }}"
    if t != "f16":
        return plain
    bufs = ", ".join(f"h{x}[F16_BLOCK]" for x in xs)
    fill = " ".join(f"ld_f16_block(h{x}, {x}, i0, m);" for x in xs)
    reads = " ".join(f"float f{x} = h{x}[j];" for x in xs)
    blocked = (f"for (int64_t i0 = 0; i0 < n; i0 += F16_BLOCK) {{ int64_t m = n - i0 < F16_BLOCK ? n - i0 : "
               f"F16_BLOCK; float {bufs}; {fill} for (int64_t j = 0; j < m; j++) {{ int64_t i = i0 + j; {reads} "
               f"{body} }} }}")
    return f"\n#ifdef __F16C__\n{blocked}\n#else\n{plain}\n#endif\n"


PARTS = 4  # the library is compiled as this many translation units, in parallel on the cores there are


def source() -> list[str]:
    """The library's C source as self-contained translation units: the exported helpers (csrc/scans.c), then
    PARTS units of generated kernels, each after the prelude (csrc/prelude.h). Other units (quantization kernels)
    may be added to the list: every unit is compiled and linked."""
    parts = []
    for t_in in DTYPES.values():
        for t_out in DTYPES.values():
            store = f"st_{t_out}(o, i, r);"
            for name, (n, body) in _ARITH.items():
                parts.append(f"void {name}_{t_in}_{t_out}(K) {{ {_loop(n, t_in, f'{body} {store}')} }}")
            for name, (n, body) in _DARE.items():
                parts.append(f"void {name}_{t_in}_{t_out}(KD) {{ {_loop(n, t_in, f'{body} {store}')} }}")
            for name, (n, body, x, y) in _SELECT.items():
                if t_in == t_out:  # copy the stored bits of the value taken; both read unconditionally, so
                    ctype = _BITS[t_in]  # the select vectorizes when the loads come from f16 blocks
                    store = (f"{ctype} x = ((const {ctype} *){x})[i], y = ((const {ctype} *){y})[i]; "
                             f"(({ctype} *)o)[i] = take ? x : y;")
                else:
                    store = f"st_{t_out}(o, i, take ? f{x} : f{y});"
                parts.append(f"void {name}_{t_in}_{t_out}(K) {{ {_loop(n, t_in, f'{body} {store}')} }}")
    head = prelude()
    return [helpers_unit(), *(head + "\n".join(parts[i::PARTS]) + "\n" for i in range(PARTS)),
            csrc_text("gguf_quants.c"),  # GGUF block (de)quantization (formats.quant.gguf_blocks)
            csrc_text("quant.c")]  # the scaled-fp8 / NF4 outputs' encoders (formats.quant)


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
            "quant_fused": _typed(lib, "quant_fused", [p, ctypes.c_int32, p] + [ctypes.c_int32] * 2 + [p] * 4 + [i64]
                                  + [ctypes.c_float] * 4 + [i64] + [u32] * 3 + [ctypes.c_float, p], ctypes.c_float),
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
_DARE_ARGTYPES = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_uint32] * 3 + [ctypes.c_float] * 2


def kernel(method: str, dtypes: list[Any], out_dtype: Any) -> Callable[..., Any] | None:
    """A function (views, params, out=None, ctx=None, counts=None) -> output chunk for CPU views that are torch
    tensors or spans (dtypes as torch dtypes or their names). The result is written into `out` (a reused flat
    buffer of the output dtype: a tensor, or a span that must be given) when it fits; None when no native kernel
    fits. With `counts` (a list), the inputs' NaN/inf elements are counted in the same pass and put there.
    `quant` (for a float32 output dtype) fuses a scaled-fp8 output's work into the same pass, without storing the
    float32 results: "amax" returns their largest |x| (NaN if any is NaN) and stores nothing; a scale stores them as
    float8_e4m3fn codes of x / scale (saturated at 448, formats.quant.scaled_fp8's encoding) into `out`."""
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
                                             _DARE_ARGTYPES if name in _DARE else _ARGTYPES, None))
        want = out_name if quant is None else "float8_e4m3fn"  # a scale: the results stored as scaled fp8
        if isinstance(views[0], Span):
            n = views[0].numel
            assert quant == "amax" or (out is not None and out.numel == n and out.dtype == want), \
                "a span merge passes its buffer"
            ptrs = [v.address for v in views]
        else:
            import torch

            flat = [v.reshape(-1) if v.is_contiguous() else v.contiguous().reshape(-1) for v in views]
            n = flat[0].numel()
            if quant != "amax" and (out is None or not out.is_contiguous() or dtype_name(out.dtype) != want
                                    or out.numel() != n):
                out = torch.empty(n, dtype=torch_dtype(want))
            ptrs = [v.data_ptr() for v in flat]
        dest = 0 if quant == "amax" else out.address if isinstance(out, Span) else out.data_ptr()
        ptrs += [0] * (3 - len(ptrs))
        dare = (0, 0, 0, 0)
        if name in _DARE:
            from hubmix.methods.dropmask import stream, threshold

            dare = (ctx.start, *(stream(params["seed"], ctx.key, i) for i in (1, 2)), threshold(params["drop"]))
        found = (ctypes.c_int64 * 3)()
        scan = Native.scan_addresses[t_in] if counts is not None else None
        if quant is not None:  # float32 results reduced to their amax, or encoded, step by step (csrc/quant.c)
            amax = Native.helpers["quant_fused"](ctypes.cast(fn, ctypes.c_void_p), name in _DARE, scan, len(views),
                                                 sizes[0], *ptrs, dest, n, *ks, *dare,
                                                 0.0 if quant == "amax" else quant, found)
        elif name in _DARE:
            fn(*ptrs, dest, n, *dare, ks[0], ks[1])
        elif counts is not None:
            Native.helpers["scanned"](ctypes.cast(fn, ctypes.c_void_p), scan, len(views), *sizes, *ptrs, dest, n,
                                      *ks, found)
        else:
            fn(*ptrs, dest, n, *ks)
        if counts is not None:
            counts[:] = [nonfinite_count(v) for v in views] if name in _DARE and quant is None else found[:len(views)]
        return amax if quant == "amax" else out.reshape(views[0].shape)

    return run


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
