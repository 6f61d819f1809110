"""The C of the native library: the plain C files shipped beside this module (csrc/: prelude.h, the helpers every
unit inlines; scans.c, the exported helpers; gguf_quants.c and quant.c, the quantized formats' units; fp8_tables.h,
generated once by fp8_float32_bits and checked by a test), read as text so each unit handed to the compiler is
self-contained (local includes inlined) and its text is the cache key; and the per-method kernels, generated here
from the methods' float32 bodies (`source`). hubmix.engine.native builds, loads and calls them.
"""

from __future__ import annotations

import re
import struct
from functools import cache
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
_INCLUDE = re.compile(r'^#include "([^"]+)"[^\n]*$', re.M)


@cache
def csrc_text(name: str) -> str:
    """A file of csrc/ with its local `#include "x.h"` lines replaced by those files (each once: they have include
    guards or are included once)."""
    seen: set[str] = set()

    def expand(n: str) -> str:
        if n in seen:
            return ""
        seen.add(n)
        return _INCLUDE.sub(lambda m: expand(m.group(1)), (CSRC / n).read_text())

    return expand(name)


def prelude() -> str:
    """What every generated kernel unit starts with."""
    return csrc_text("prelude.h")


def helpers_unit() -> str:
    """The unit of exported helpers (the float16 table, histograms, masks, block sums, scans, transposes)."""
    return csrc_text("scans.c")


# torch's dtype names -> the kernels' names for them (the library itself needs no torch: spans call it too)
DTYPES = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "float8_e4m3fn": "e4m3", "float8_e5m2": "e5m2"}
_BITS = {"f16": "u16", "bf16": "u16", "f32": "float", "e4m3": "uint8_t", "e5m2": "uint8_t"}  # selection copies

# name -> (number of inputs, float32 body computing `r`, or for selections `take` and the two candidates)
# Each body is the eager torch code of hubmix/methods/basic.py, operation for operation.
ARITH = {
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
DARE = {
    "dare2": (2, "float d1 = dare_kept(start, i, s1, t) ? (fb - fa) / k1 : 0.0f; float r = fa + k2 * d1;"),
    "dare3sum": (3, "float d1 = dare_kept(start, i, s1, t) ? (fb - fa) / k1 : 0.0f; "
                    "float d2 = dare_kept(start, i, s2, t) ? (fc - fa) / k1 : 0.0f; float r = fa + k2 * (d1 + d2);"),
    "dare3ties": (3, "float d1 = dare_kept(start, i, s1, t) ? (fb - fa) / k1 : 0.0f; "
                     "float d2 = dare_kept(start, i, s2, t) ? (fc - fa) / k1 : 0.0f; float r = fa + k2 * elect2(d1, d2);"),
}
SELECT = {
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
            for name, (n, body) in ARITH.items():
                parts.append(f"void {name}_{t_in}_{t_out}(K) {{ {_loop(n, t_in, f'{body} {store}')} }}")
            for name, (n, body) in DARE.items():
                parts.append(f"void {name}_{t_in}_{t_out}(KD) {{ {_loop(n, t_in, f'{body} {store}')} }}")
            for name, (n, body, x, y) in SELECT.items():
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


def fp8_float32_bits(name: str) -> list[int]:
    """The float32 bit pattern of each of the 256 codes of a float8 dtype, as torch's conversion gives them (a NaN
    keeps its sign and payload, quieted)."""
    ebits, mbits, bias = (4, 3, 7) if name == "float8_e4m3fn" else (5, 2, 15)
    out = []
    for code in range(256):
        sign = code >> 7
        e, m = (code >> mbits) & ((1 << ebits) - 1), code & ((1 << mbits) - 1)
        if (e == 15 and m == 7) if name == "float8_e4m3fn" else (e == 31 and m):  # NaN
            out.append(sign << 31 | 0x7FC00000 | m << (23 - mbits))
            continue
        if name == "float8_e5m2" and e == 31:
            value = float("inf")
        elif e == 0:  # subnormal (or zero)
            value = m / (1 << mbits) * 2.0 ** (1 - bias)
        else:
            value = (1 + m / (1 << mbits)) * 2.0 ** (e - bias)
        out.append(sign << 31 | struct.unpack("<I", struct.pack("<f", value))[0])
    return out


def __getattr__(name: str) -> str:  # PRELUDE, as this module used to define it (read lazily)
    if name == "PRELUDE":
        return prelude()
    raise AttributeError(name)
