"""DARE's drop mask as a pure function of (seed, tensor name, model index, element index).

A counter-based hash, not a random generator with state: element j of model i in tensor `key` is kept when
h >= floor(p * 2^32), where, with mix32 Chris Wellons' lowbias32 integer hash (all arithmetic mod 2^32),
    stream = mix32(mix32(mix32(seed) ^ crc32(key)) ^ i)
    h      = mix32(mix32(lo32(j) ^ mix32(stream ^ hi32(j))) ^ stream)
So any chunk of any tensor can be masked on its own, in any order, on any device, with the same result. The
engine installs a native implementation of the same function (hubmix.native) when it has one; this torch code is
the reference and the fallback.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable

M32 = 0xFFFFFFFF
C1, C2 = 0x7FEB352D, 0x846CA68B

# (start, n, stream, threshold) -> bool tensor of n elements, or None; set by hubmix.native when it loads
native_keep: Callable[[int, int, int, int], Any] | None = None


def mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * C1) & M32
    x ^= x >> 15
    x = (x * C2) & M32
    return x ^ (x >> 16)


def stream(seed: int, key: str, model: int) -> int:
    return mix32(mix32(mix32(seed & M32) ^ zlib.crc32(key.encode())) ^ (model & M32))


def threshold(p: float) -> int:
    """Elements whose hash is below this are dropped: exactly a share p of the 2^32 hash values (rounded down)."""
    return min(int(p * 4294967296.0), M32)


def _mul32(x, c: int):
    """x * c mod 2^32 on int64 tensors holding 32-bit values, without overflowing int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def _mix32_tensor(x):
    x = x ^ (x >> 16)
    x = _mul32(x, C1)
    x = x ^ (x >> 15)
    x = _mul32(x, C2)
    return x ^ (x >> 16)


def hashes(start: int, n: int, s: int, device: Any = None):
    """h for elements start .. start+n-1 as an int64 tensor (torch reference implementation)."""
    import torch

    parts = []
    j = start
    while j < start + n:  # pieces within one 2^32 block share hi32(j)
        hi = j >> 32
        stop = min(start + n, (hi + 1) << 32)
        lo = torch.arange(j & M32, (j & M32) + (stop - j), dtype=torch.int64, device=device)
        parts.append(_mix32_tensor(_mix32_tensor(lo ^ mix32(s ^ (hi & M32))) ^ s))
        j = stop
    return torch.cat(parts) if len(parts) != 1 else parts[0]


def keep(seed: int, key: str, model: int, start: int, n: int, p: float, device: Any = None):
    """Bool mask of the kept elements start .. start+n-1 of model `model` in tensor `key`."""
    s, t = stream(seed, key, model), threshold(p)
    if native_keep is not None and (device is None or str(device) == "cpu"):
        mask = native_keep(start, n, s, t)
        if mask is not None:
            return mask
    return hashes(start, n, s, device) >= t
