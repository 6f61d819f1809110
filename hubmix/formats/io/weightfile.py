"""What every weight-file reader shares: safetensors' dtype names, a tensor's dtype and shape, opening regular
files only, and the two bases (WeightFile: named tensors read lazily; MappedFile: viewed through one memory map).
"""

from __future__ import annotations

import math
import mmap
import os
import stat
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hubmix.errors import InputError
from hubmix.formats.io.span import ITEMSIZE, Span, address_of, dtype_name, torch_dtype

if TYPE_CHECKING:
    import torch

# safetensors dtype names -> torch's names for them. Headers keep the name (a string): torch is imported only when a
# tensor is viewed, so reading headers (`hubmix inspect`) costs no torch import.
ST_DTYPES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


def st_dtype(dtype: torch.dtype | str) -> str:
    """The safetensors name of a torch dtype (KeyError for one the format cannot hold)."""
    return ST_NAMES[dtype_name(dtype)]


@dataclass(frozen=True)
class TensorInfo:
    dtype_name: str  # torch's name ("float16"); `dtype` maps it to torch's dtype on use
    shape: tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype_name)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        size = ITEMSIZE.get(self.dtype_name)
        return size if size is not None else self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


def open_regular(path: Path) -> int:
    """A read-only descriptor of `path`, refused unless it is a regular file: opening a FIFO for reading blocks
    until a writer comes (forever), and a device or socket is no model. O_NONBLOCK makes the open itself return."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise InputError(f"{path}: cannot open ({e.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else
                "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "special")
        raise InputError(f"{path}: not a regular file ({kind}); hubmix reads models from regular files only")
    os.set_blocking(fd, True)
    return fd


def read_regular(path: Path) -> str:
    """The text of a regular file (configs, indexes), refused like `open_regular` for anything else."""
    with os.fdopen(open_regular(path), "rb") as f:
        return f.read().decode("utf-8")


class WeightFile:
    """A lazily read file of named tensors."""

    path: Path
    format: str

    def keys(self) -> list[str]:
        return list(self._info)

    def __contains__(self, key: str) -> bool:
        return key in self._info

    def info(self, key: str) -> TensorInfo:
        return self._info[key]

    @property
    def metadata(self) -> dict[str, str]:
        return {}

    def tensor(self, key: str) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def span(self, key: str) -> Span | None:
        """The tensor as a torch-free span of the mapped file, or None where the reader has no mapping to offer
        (a pickle, misaligned data): such tensors are read through torch."""
        return None

    def mapped(self) -> mmap.mmap | None:
        """The whole file as the memory map tensors are viewed through (None: the reader has none), so the input
        hash reads the very pages the merge reads."""
        return None

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self._info)} tensors)"


class MappedFile(WeightFile):
    """A file whose header is parsed from its descriptor and whose tensors are viewed through one private memory
    map (safetensors, GGUF)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd = open_regular(self.path)
        try:
            self._parse_header()
        except BaseException:
            os.close(self._fd)
            raise
        self._mm: mmap.mmap | None = None
        self._address = 0
        self._mm_lock = threading.Lock()  # one mapping, shared by the engine and the input hash
        # closed when the file object goes (the mapping keeps its own descriptor, views stay valid)
        self._closer = weakref.finalize(self, os.close, self._fd)

    def _parse_header(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            with self._mm_lock:
                if self._mm is None:
                    # ACCESS_COPY = MAP_PRIVATE: pages we only read stay shared with the page cache (no anonymous
                    # memory), and the buffer is writable, which torch.frombuffer wants.
                    mm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)
                    self._address = address_of(mm)
                    self._mm = mm
        return self._mm

    def mapped(self) -> mmap.mmap:
        return self._map()

    def close(self) -> None:
        self._closer()


