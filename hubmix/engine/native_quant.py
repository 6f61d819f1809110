"""The native library's encoders for quantized outputs (engine/csrc/quant.c), installed into formats.quant while
a merge that uses native kernels runs (as `native.install_dropmask` gives methods their native masks). Each gives
the bytes of the torch code it replaces, which the tests check, and takes torch tensors or Spans (a merge of plain
inputs into a quantized output then runs without torch); without the library the torch code runs."""

from __future__ import annotations

import ctypes
import threading
from typing import Any

from hubmix.engine.native import Native
from hubmix.formats.io.span import Span
from hubmix.formats.quant import accel


def _address(x: Any) -> tuple[int, int] | None:
    """(address, elements) of contiguous float32 CPU data: a Span, or a torch tensor (None otherwise)."""
    if isinstance(x, Span):
        return (x.address, x.numel) if x.dtype == "float32" else None
    if str(x.dtype) != "torch.float32" or x.device.type != "cpu" or not x.is_contiguous():
        return None
    return x.data_ptr(), x.numel()


_scratch = threading.local()


def scratch(role: str, nbytes: int) -> Span:
    """A buffer of this thread reused for `role` (fresh pages cost a fault each on every chunk otherwise). Spans
    from it live until this thread asks for the same role again: encoders' outputs are written by the engine's
    single writer thread before it encodes the next chunk."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    buf = bufs.get(role)
    if buf is None or buf.nbytes < nbytes:
        buf = bufs[role] = Span.allocate(max(nbytes, 1 << 16))
    return buf


def _buffer(like: Any, n: int, dtype: str, shape: tuple[int, ...]) -> tuple[Any, int]:
    """An output of the kind `like` is (a Span in this thread's scratch memory, or a fresh tensor), and its
    address."""
    if isinstance(like, Span):
        from hubmix.formats.io.span import ITEMSIZE

        buf = scratch(dtype, n * ITEMSIZE[dtype])
        out = Span(buf.owner, buf.address, dtype, shape)
        return out, out.address
    import torch

    t = torch.empty(shape, dtype=getattr(torch, dtype))
    return t, t.data_ptr()


def install() -> bool:
    lib = Native.library()
    if lib is None:
        return False
    lib.quant_amax_f32.argtypes, lib.quant_amax_f32.restype = [ctypes.c_void_p, ctypes.c_int64], ctypes.c_float
    lib.quant_fp8_e4m3.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float]
    lib.quant_nf4.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_void_p]
    lib.quant_fp8_e4m3.restype = lib.quant_nf4.restype = None

    def amax(x: Any) -> float | None:
        at = _address(x)
        return None if at is None or not at[1] else float(lib.quant_amax_f32(*at))

    def fp8_e4m3(x: Any, scale: float) -> Any:
        at = _address(x)
        if at is None:
            return None
        out, dest = _buffer(x, at[1], "float8_e4m3fn", (at[1],))
        lib.quant_fp8_e4m3(at[0], dest, at[1], scale)
        return out

    def nf4(x: Any, block: int, bounds: tuple[float, ...]) -> tuple[Any, Any] | None:
        at = _address(x)
        if at is None:
            return None
        n = at[1]
        packed, p = _buffer(x, (n + 1) // 2, "uint8", ((n + 1) // 2, 1))
        absmax, a = _buffer(x, -(-n // block), "float32", (-(-n // block),))
        lib.quant_nf4(at[0], p, a, n, block, (ctypes.c_float * 15)(*bounds))
        return packed, absmax

    accel.install(amax=amax, fp8_e4m3=fp8_e4m3, nf4=nf4)
    return True


def uninstall() -> None:
    accel.install()
