"""The native library's encoders for quantized outputs (engine/quant_kernels.c), installed into formats.quant while
a merge that uses native kernels runs (as `native.install_dropmask` gives methods their native masks). Each gives
the bytes of the torch code it replaces, which the tests check; without the library the torch code runs."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

from hubmix.engine.native import Native
from hubmix.formats.quant import accel

if TYPE_CHECKING:
    import torch


def _flat32(x: torch.Tensor) -> torch.Tensor | None:
    import torch

    if x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    return x.reshape(-1) if x.is_contiguous() else x.contiguous().reshape(-1)


def install() -> bool:
    lib = Native.library()
    if lib is None:
        return False
    lib.quant_amax_f32.argtypes, lib.quant_amax_f32.restype = [ctypes.c_void_p, ctypes.c_int64], ctypes.c_float
    lib.quant_fp8_e4m3.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float]
    lib.quant_nf4.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_void_p]
    lib.quant_fp8_e4m3.restype = lib.quant_nf4.restype = None

    def amax(x: torch.Tensor) -> float | None:
        flat = _flat32(x)
        return None if flat is None or not flat.numel() else float(lib.quant_amax_f32(flat.data_ptr(), flat.numel()))

    def fp8_e4m3(x: torch.Tensor, scale: float) -> torch.Tensor | None:
        import torch

        flat = _flat32(x)
        if flat is None:
            return None
        out = torch.empty(flat.numel(), dtype=torch.float8_e4m3fn)
        lib.quant_fp8_e4m3(flat.data_ptr(), out.data_ptr(), flat.numel(), scale)
        return out

    def nf4(x: torch.Tensor, block: int, bounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        import torch

        flat = _flat32(x)
        if flat is None:
            return None
        n = flat.numel()
        packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8)
        absmax = torch.empty(-(-n // block), dtype=torch.float32)
        lib.quant_nf4(flat.data_ptr(), packed.data_ptr(), absmax.data_ptr(), n, block, bounds.data_ptr())
        return packed, absmax

    accel.install(amax=amax, fp8_e4m3=fp8_e4m3, nf4=nf4)
    return True


def uninstall() -> None:
    accel.install()
