"""Zero-copy readers for weight files: safetensors (memory-mapped) and torch pickles (weights_only, mmap).

A reader parses only the header when opened; `tensor(key)` returns a view into the mapped file, so the page cache
holds the data and nothing is copied until a merge converts a chunk to float32.
"""

from __future__ import annotations

import math
import json
import mmap
import os
import pickle
import stat
import re
import struct
import threading
import weakref
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

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


def _count(x: object) -> bool:
    """A JSON value usable as a dimension or offset: a non-negative integer (not a bool, not a float)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class SafetensorsFile(WeightFile):
    format = "safetensors"

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

    def close(self) -> None:
        self._closer()


class TorchPickleFile(WeightFile):
    """`.ckpt` / `.bin` / `.pt`: loaded with weights_only=True, so a pickle never runs code; mmap where possible."""

    format = "pickle"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        os.close(open_regular(self.path))
        import torch

        obj = self._load()
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise InputError(f"{self.path}: the pickle holds a {type(obj).__name__}, not a dict of tensors")
        self._tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        self._info = {k: TensorInfo(dtype_name(v.dtype), tuple(v.shape)) for k, v in self._tensors.items()}

    def _load(self):
        how = ("Convert it with the tool that made it (for example with safetensors in an environment you trust) "
               "and pass the .safetensors file instead.")
        import torch

        for use_mmap in (True, False):
            try:
                with warnings.catch_warnings():  # a damaged file's random "protocol 122": the error says enough
                    warnings.filterwarnings("ignore", message="Detected pickle protocol")
                    return torch.load(self.path, map_location="cpu", weights_only=True, mmap=use_mmap)
            except pickle.UnpicklingError as e:
                reason = _refusal_reason(str(e))
                if not _is_pickle(self.path):  # not a pickle at all, or a damaged one
                    raise InputError(f"{self.path}: not a readable torch checkpoint, corrupt or truncated "
                                     f"({reason})") from None
                raise InputError(
                    f"{self.path}: refused to unpickle: it needs more than plain tensors to load ({reason}); "
                    f"hubmix never executes pickled code. {how}"
                ) from None
            except RuntimeError as e:
                if use_mmap and "mmap" in str(e):
                    continue  # legacy (non-zip) format cannot be memory-mapped: load it normally
                raise InputError(f"{self.path}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from None
            except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
                raise InputError(f"{self.path}: not a readable torch checkpoint, corrupt or truncated ({e})") from None
            except Exception as e:  # noqa: BLE001 - damaged bytes reach the unpickler's internals (KeyError, ...)
                why = (str(e).splitlines() or [""])[0][:120]
                raise InputError(f"{self.path}: not a readable torch checkpoint, corrupt or truncated "
                                 f"({type(e).__name__}{': ' + why if why else ''})") from None
        raise AssertionError("unreachable")

    def tensor(self, key: str) -> torch.Tensor:
        return self._tensors[key]


def _refusal_reason(message: str) -> str:
    """What a pickle refused by weights_only tried to do, from torch's message: the global it names (the function
    it would call, e.g. posix.system) rather than torch's advice to turn weights_only off."""
    m = re.search(r"GLOBAL ([\w.]+)", message)
    if m:
        return f"it would call {m.group(1)}"
    lines = [ln.strip() for ln in message.splitlines() if ln.strip() and "weights_only" not in ln]
    return next((ln for ln in lines if ln.startswith(("Unsupported", "Trying"))), lines[0] if lines else "")


PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


def _magic(p: Path) -> bytes:
    """The first bytes of a regular file (anything else is refused here, before any reader could block on it)."""
    with os.fdopen(open_regular(p), "rb") as f:
        return f.read(4)


def _is_pickle(path: Path) -> bool:
    """Whether the file holds a well-formed pickle stream (a torch zip's data.pkl, or the file itself), checked
    by reading its opcodes with pickletools, which never executes anything."""
    import pickletools

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return False
                data = z.read(name)
        else:
            with open(path, "rb") as f:
                data = f.read(64 << 20)  # the pickle comes first; tensor bytes follow it in the legacy format
        for _ in pickletools.genops(data):
            pass
        return True
    except Exception:  # noqa: BLE001 - any parse failure means: not a pickle
        return False


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
