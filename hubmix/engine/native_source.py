"""The C of the native library: the plain C files shipped beside this module (csrc/: prelude.h, the helpers every
unit inlines; scans.c, the exported helpers; fp8_tables.h, generated once by fp8_float32_bits and checked by a test), read as text so
each unit handed to the compiler is self-contained (local includes inlined) and its text is the cache key.
hubmix.engine.native generates the per-method kernels after the prelude.
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
