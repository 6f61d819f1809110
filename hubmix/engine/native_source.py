"""The C of the native library: the plain C files shipped beside this module (csrc/: prelude.h, the helpers every
unit inlines; scans.c, the exported helpers; fp8_tables.h, generated once and checked by a test), read as text so
each unit handed to the compiler is self-contained (local includes inlined) and its text is the cache key.
hubmix.engine.native generates the per-method kernels after the prelude.
"""

from __future__ import annotations

import re
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


def __getattr__(name: str) -> str:  # PRELUDE, as this module used to define it (read lazily)
    if name == "PRELUDE":
        return prelude()
    raise AttributeError(name)
