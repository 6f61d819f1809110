"""GGUF block (de)quantization of flat float32 runs: the native unit (hubmix/engine/gguf_quants.c) where it covers the
type and the library is loaded (every merge loads it before its first chunk), else the eager code: the `gguf`
package's own numpy (the reference) for everything it has, hubmix's numpy port of llama.cpp's K-quant quantizers for
Q4_K/Q5_K/Q6_K. Both give the same bytes and the same floats (checked by the tests)."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

from hubmix.formats.quant.gguf_types import GGML_TYPES, block_size, type_id

if TYPE_CHECKING:
    import numpy as np

NATIVE_QUANT = frozenset({"Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K"})  # gguf_quants.c covers these


LIB: Any = None  # the native library, handed over by hubmix.engine.native when it loads (engine is a floor above)


def _lib():
    return LIB


NATIVE_STORE = NATIVE_QUANT | frozenset({"F16", "BF16"})  # gguf_quantize stores these too (numpy's, gguf's bytes)


def native_quantizer(qtype: str) -> Any:
    """`quantize(float32 address, output address, blocks)` for a type the native unit stores, or None."""
    return _native("gguf_quantize", qtype, NATIVE_STORE)


def native_unpacker(qtype: str) -> Any:
    """The native dequantizer of a type as `unpack(raw address, float32 address, blocks)`, or None."""
    return _native("gguf_dequantize", qtype, NATIVE_QUANT)


def _native(name: str, qtype: str, covered: frozenset[str]) -> Any:
    lib = _lib()
    if lib is None or qtype not in covered:
        return None
    fn, tid = getattr(lib, name), type_id(qtype)
    return lambda src, dst, blocks: fn(tid, src, dst, blocks)


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data_as(ctypes.c_void_p).value or 0


def quantize(x: np.ndarray, qtype: str, native: bool = True) -> np.ndarray:
    """Flat float32 `x` (a whole number of blocks) -> the blocks' bytes (uint8)."""
    import numpy as np  # here: the engine loads this module with the library, and span merges use no numpy
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    bs, ts = block_size(qtype), GGML_TYPES[qtype][2]
    if x.size % bs:
        raise ValueError(f"{x.size} elements are not whole {qtype} blocks of {bs}")
    n = x.size // bs
    if qtype == "F32":
        return x.view(np.uint8)
    if qtype == "F16":
        return x.astype(np.float16).view(np.uint8)
    lib = _lib() if native and qtype in NATIVE_QUANT else None
    if lib is not None:
        out = np.empty(n * ts, np.uint8)
        if lib.gguf_quantize(type_id(qtype), _ptr(x), _ptr(out), n) == 0:
            return out
    from hubmix.formats.quant.gguf_kquants import QUANTIZERS

    if qtype in QUANTIZERS:
        return QUANTIZERS[qtype](x.reshape(n, bs)).reshape(-1)
    import gguf

    # one row: gguf applies its quantizer per group of 16 rows, a Python loop over (n, bs) blocks
    return gguf.quants.quantize(x.reshape(1, -1), gguf.GGMLQuantizationType[qtype]).reshape(-1)


def dequantize(raw: np.ndarray, qtype: str, native: bool = True) -> np.ndarray:
    """The bytes of whole blocks (uint8) -> float32, as `gguf.quants.dequantize` gives them."""
    import numpy as np
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    bs, ts = block_size(qtype), GGML_TYPES[qtype][2]
    if raw.size % ts:
        raise ValueError(f"{raw.size} bytes are not whole {qtype} blocks of {ts}")
    n = raw.size // ts
    if qtype == "F32":
        return raw.view(np.float32)
    if qtype == "F16":
        return raw.view(np.float16).astype(np.float32)
    if qtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    lib = _lib() if native and qtype in NATIVE_QUANT else None
    if lib is not None:
        out = np.empty(n * bs, np.float32)
        if lib.gguf_dequantize(type_id(qtype), _ptr(raw), _ptr(out), n) == 0:
            return out
    import gguf

    return gguf.quants.dequantize(raw.reshape(1, -1), gguf.GGMLQuantizationType[qtype]).reshape(-1)
