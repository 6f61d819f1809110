"""Lazy tensor readers and the streaming safetensors writer.

Readers hand out zero-copy views of tensors (memory-mapped safetensors, mmap-loaded torch pickles), so opening a
model costs only its header; the writer lays out a file from planned shapes and fills it in any order. The names
below load on first use: reading a header (`hubmix inspect`) imports no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"WeightFile": "readers", "open_weight_file": "readers", "PlannedTensor": "writer",
         "SafetensorsWriter": "writer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["WeightFile", "open_weight_file", "PlannedTensor", "SafetensorsWriter"]
