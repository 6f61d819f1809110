"""Zero-copy readers for weight files: safetensors (memory-mapped) and torch pickles (weights_only, mmap), opened
by suffix (`open_weight_file`).

A reader parses only the header when opened; `tensor(key)` returns a view into the mapped file, so the page cache
holds the data and nothing is copied until a merge converts a chunk to float32. The shared bases live in
weightfile.py, the pickle reader in pickles.py; their names are importable from here too.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from hubmix.errors import InputError
from hubmix.formats.io.pickles import PICKLE_SUFFIXES, TorchPickleFile
from hubmix.formats.io.span import Span
from hubmix.formats.io.weightfile import (MAX_HEADER, ST_DTYPES, ST_NAMES, MappedFile, TensorInfo, WeightFile,
                                          open_regular, read_regular, st_dtype)

if TYPE_CHECKING:
    import torch

__all__ = ["CONTAINERS", "MAX_HEADER", "PICKLE_SUFFIXES", "ST_DTYPES", "ST_NAMES", "MappedFile", "SafetensorsFile",
           "TensorInfo", "TorchPickleFile", "WeightFile", "file_version", "forget_preopened", "open_regular",
           "open_weight_file", "preopen", "read_regular", "st_dtype"]


def _count(x: object) -> bool:
    """A JSON value usable as a dimension or offset: a non-negative integer (not a bool, not a float)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class SafetensorsFile(MappedFile):
    format = "safetensors"

    def _parse_header(self) -> None:
        """Read and validate the header at least as strictly as the safetensors library: a sane size, a JSON
        object (not nested beyond reason), string metadata, known dtypes, non-negative integer dimensions, and
        data_offsets that tile the data section exactly (sorted, contiguous from 0, no overlap, no gap, no
        trailing bytes), each range holding numel * itemsize bytes."""
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise InputError(f"{self.path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > MAX_HEADER or 8 + n > size:
            raise InputError(
                f"{self.path}: not a safetensors file or truncated (header of {n} bytes, file of {size} bytes)"
            )
        raw = os.pread(self._fd, n, 8)

        def bad(why: str) -> InputError:
            return InputError(f"{self.path}: corrupt safetensors header: {why}")

        if not raw.startswith(b"{"):
            raise bad("not a JSON object")
        try:
            header = json.loads(raw)
        except RecursionError:
            raise bad("JSON nested too deeply") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(str(e)) from None
        if not isinstance(header, dict):
            raise bad("not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise bad("__metadata__ is not a mapping of strings")
        self._metadata = dict(meta)
        self._data_start = 8 + n
        self._info: dict[str, TensorInfo] = {}
        self._offsets: dict[str, int] = {}
        ranges = []
        for key, entry in header.items():
            if not isinstance(entry, dict) or entry.get("dtype") not in ST_DTYPES:
                raise bad(f"{key!r} has no known dtype: {str(entry)[:80]}")
            shape, offsets = entry.get("shape"), entry.get("data_offsets")
            if not isinstance(shape, list) or not all(_count(d) for d in shape):
                raise bad(f"{key!r} has shape {str(shape)[:80]}, not a list of non-negative integers")
            if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(x) for x in offsets)
                    or offsets[0] > offsets[1]):
                raise bad(f"{key!r} has data_offsets {str(offsets)[:80]}, not [start, end] with start <= end")
            info = TensorInfo(ST_DTYPES[entry["dtype"]], tuple(shape))
            start, stop = offsets
            if stop - start != info.nbytes:
                raise bad(f"{key!r} has {stop - start} bytes for shape {shape} {entry['dtype']} "
                          f"({info.nbytes} expected)")
            ranges.append((start, stop, key))
            self._info[key] = info
            self._offsets[key] = self._data_start + start
        end = 0
        for start, stop, key in sorted(ranges):
            if start < end:
                raise bad(f"{key!r} overlaps the tensor before it (data_offsets {start}..{stop}, previous end {end})")
            if start > end:
                raise bad(f"{key!r} starts at offset {start}, leaving a gap after {end}")
            end = stop
        if self._data_start + end > size:
            raise InputError(
                f"{self.path}: truncated safetensors file: the header describes {self._data_start + end} bytes, "
                f"the file has {size}"
            )
        if self._data_start + end < size:
            raise bad(f"the tensors end at byte {self._data_start + end}, the file has {size} bytes")

    @property
    def metadata(self) -> dict[str, str]:
        return self._metadata

    def tensor(self, key: str) -> torch.Tensor:
        import torch

        info = self._info[key]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        offset = self._offsets[key]
        if offset % info.itemsize:
            # Misaligned data (a writer that did not pad its header): copy rather than hand out a bad view.
            raw = torch.frombuffer(self._map(), dtype=torch.uint8, count=info.nbytes, offset=offset)
            return raw.clone().view(info.dtype).reshape(info.shape)
        t = torch.frombuffer(self._map(), dtype=info.dtype, count=info.numel, offset=offset)
        return t.reshape(info.shape)

    def span(self, key: str) -> Span | None:
        info = self._info[key]
        offset = self._offsets[key]
        if offset % info.itemsize:
            return None
        mm = self._map()
        return Span(mm, self._address + offset, info.dtype_name, info.shape)


_PREOPENED: dict[str, tuple[str, SafetensorsFile]] = {}  # resolved path -> (file version, the file opened ahead)


def file_version(path: Path) -> str:
    """What tells one version of a file from another (size, mtime, inode): the key of files opened ahead here and
    of cached digests (hashing)."""
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def preopen(path: Path) -> SafetensorsFile | None:
    """Open a safetensors file ahead of the merge that will read it (hashing.hash_ahead hashes its mapping while
    the merge's imports run); `open_weight_file` then hands out this same object, so the file keeps one mapping.
    None where it cannot be opened: the merge's own open reports why."""
    try:
        f = SafetensorsFile(path)
        _PREOPENED[str(path.resolve())] = (file_version(path), f)
    except (InputError, OSError):
        return None
    return f


def forget_preopened() -> None:
    """Drop files opened ahead that no merge took (a merge that failed before opening them)."""
    _PREOPENED.clear()


def _magic(p: Path) -> bytes:
    """The first bytes of a regular file (anything else is refused here, before any reader could block on it)."""
    with os.fdopen(open_regular(p), "rb") as f:
        return f.read(4)


# Other containers by name: formats.quant.gguf_file registers GGUF's reader (it builds on this module)
CONTAINERS: dict[str, Callable[[Path], WeightFile]] = {}


def open_weight_file(path: str | os.PathLike) -> WeightFile:
    """Open a weight file by its suffix: `.safetensors`, or a torch pickle loaded without executing code."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.suffix.lower() == ".gguf" or _magic(p) == b"GGUF":
        if "gguf" not in CONTAINERS:
            raise InputError(f"{p}: a GGUF file, which this build of hubmix does not read; use the safetensors file")
        return CONTAINERS["gguf"](p)
    if p.suffix == ".safetensors":
        ahead = _PREOPENED.pop(str(p.resolve()), None)
        return ahead[1] if ahead is not None and ahead[0] == file_version(p) else SafetensorsFile(p)
    if p.suffix in PICKLE_SUFFIXES:
        return TorchPickleFile(p)
    raise InputError(f"{p}: unknown weight file type (expected .safetensors, .ckpt, .bin, .pt or .pth)")
