"""GGUF files as ComfyUI-GGUF writes and reads them: a denoiser's tensors under their original single-file names
(without `model.diffusion_model.`), `general.architecture` naming the family, and SD1/SDXL tensors stored reshaped
to (n/256, 256) with their shape in a `comfy.gguf.orig_shape.<name>` int32 array.

`GGUFFile` is a WeightFile of logical tensors: F32/F16/BF16 tensors are viewed in the mapped file like safetensors
ones (spans, no copy); quantized ones read as float32, dequantized as `gguf.quants.dequantize` does, a chunk's block
range at a time (`tensor_range`), so memory stays a chunk whatever the model's size. The header is validated on
open: an unknown type id, a row that is not whole blocks, a data section shorter than the tensors, is one line
naming the file and the tensor.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubmix.errors import InputError
from hubmix.formats.io.readers import CONTAINERS, MappedFile, TensorInfo
from hubmix.formats.io.span import Packed, Span
from hubmix.formats.quant.gguf_types import BY_ID, DEQUANTIZED, GGML_TYPES, PLAIN, type_id, type_nbytes

if TYPE_CHECKING:
    import torch

MAGIC = b"GGUF"
ORIG_SHAPE = "comfy.gguf.orig_shape."
# value type id -> struct format (scalars); 8 string, 9 array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
MAX_DIMS = 8
MAX_ITEMS = 1 << 28  # no header array or string is this long; a corrupt count must not allocate forever


class _Cursor:
    """Reads the header's little-endian values, failing with the file's name where the file ends."""

    def __init__(self, data: bytes | mmap.mmap, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise InputError(f"{self.path}: truncated GGUF header (needs {self.pos + n} bytes, the file has "
                             f"{len(self.data)})")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return bytes(b)

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > MAX_ITEMS:
            raise InputError(f"{self.path}: corrupt GGUF header (a string of {n} bytes at byte {self.pos})")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{self.path}: corrupt GGUF header (a string that is not UTF-8 at byte {self.pos})"
                             ) from None

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if count > MAX_ITEMS:
                raise InputError(f"{self.path}: corrupt GGUF header ({key!r} claims {count} items)")
            return (etype, [self.value(etype, key) for _ in range(count)])
        raise InputError(f"{self.path}: corrupt GGUF header ({key!r} has unknown value type {vtype})")


def parse_header(fd: int, path: Path, size: int) -> tuple[dict[str, Any], dict[str, int], list[tuple], int]:
    """(key-values, their value types, [(name, ggml type name, stored shape, offset)], data start)."""
    mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size else b""
    try:
        cur = _Cursor(mm, path)
        if cur.take(4) != MAGIC:
            raise InputError(f"{path}: not a GGUF file")
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise InputError(f"{path}: GGUF version {version}, hubmix reads versions 2 and 3")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        if n_tensors > MAX_ITEMS or n_kv > MAX_ITEMS:
            raise InputError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} key-values)")
        kv: dict[str, Any] = {}
        types: dict[str, int] = {}
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.unpack("<I")
            kv[key] = cur.value(vtype, key)
            types[key] = vtype
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            if n_dims > MAX_DIMS:
                raise InputError(f"{path}: {name}: {n_dims} dimensions in the GGUF header (corrupt)")
            dims = [cur.unpack("<Q") for _ in range(n_dims)]
            tid, offset = cur.unpack("<I"), cur.unpack("<Q")
            infos.append((name, tid, tuple(reversed(dims)), offset))
        align = kv.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise InputError(f"{path}: corrupt GGUF header (general.alignment {align!r})")
        start = -(-cur.pos // align) * align
    finally:
        if isinstance(mm, mmap.mmap):
            mm.close()
    return kv, types, infos, start


class GGUFFile(MappedFile):
    format = "gguf"

    def _parse_header(self) -> None:
        size = os.fstat(self._fd).st_size
        self.kv, self.kv_types, infos, self._data_start = parse_header(self._fd, self.path, size)
        self._check(infos, size)

    def _check(self, infos: list[tuple], size: int) -> None:
        self._info: dict[str, TensorInfo] = {}
        self._types: dict[str, str] = {}
        self._offsets: dict[str, int] = {}
        self.stored_shapes: dict[str, tuple[int, ...]] = {}
        align = self.kv.get("general.alignment", 32)
        for name, tid, shape, offset in infos:
            where = f"{self.path}: {name}"
            if name in self._info:
                raise InputError(f"{where}: stored twice in the GGUF header")
            qtype = BY_ID.get(tid)
            if qtype is None:
                raise InputError(f"{where}: unknown GGUF tensor type id {tid}")
            if qtype not in DEQUANTIZED:
                raise InputError(f"{where}: GGUF type {qtype}, which the gguf package does not dequantize (hubmix "
                                 "reads " + ", ".join(sorted(DEQUANTIZED)) + ")")
            _, bs, _ = GGML_TYPES[qtype]
            numel = math.prod(shape)
            if shape and shape[-1] % bs:
                raise InputError(f"{where}: rows of {shape[-1]} elements are not whole {qtype} blocks of {bs} "
                                 f"(shape {list(shape)})")
            if offset % align:
                raise InputError(f"{where}: data offset {offset} is not aligned to {align} bytes (corrupt)")
            end = self._data_start + offset + type_nbytes(qtype, numel)
            if end > size:
                raise InputError(f"{where}: truncated GGUF file: the tensor ends at byte {end}, the file has "
                                 f"{size} bytes")
            logical = self._orig_shape(name, numel) or shape
            self.stored_shapes[name] = shape
            self._types[name] = qtype
            self._offsets[name] = self._data_start + offset
            self._info[name] = TensorInfo(PLAIN.get(qtype, "float32"), logical)
        spans = sorted((self._offsets[k], self._offsets[k] + type_nbytes(self._types[k], math.prod(
            self.stored_shapes[k])), k) for k in self._info)
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise InputError(f"{self.path}: {b}: overlaps {a} in the GGUF data section (corrupt)")

    def _orig_shape(self, name: str, numel: int) -> tuple[int, ...] | None:
        key = ORIG_SHAPE + name
        if key not in self.kv:
            return None
        value = self.kv[key]
        if self.kv_types[key] != ARRAY or value[0] != 5 or not all(isinstance(d, int) and d >= 0 for d in value[1]):
            raise InputError(f"{self.path}: {key}: expected an array of int32 (ComfyUI-GGUF's original shape)")
        shape = tuple(value[1])
        if math.prod(shape) != numel:
            raise InputError(f"{self.path}: {name}: original shape {list(shape)} does not hold the stored "
                             f"{numel} elements")
        return shape

    # ---- what the merge reads ----

    @property
    def architecture(self) -> str | None:
        arch = self.kv.get("general.architecture")
        return arch if isinstance(arch, str) else None

    @property
    def metadata(self) -> dict[str, str]:
        """The string key-values (hubmix's recipe among them), as safetensors metadata is read."""
        return {k: v for k, v in self.kv.items() if isinstance(v, str)}

    def stored_type(self, key: str) -> str:
        return self._types[key]

    def quant_type(self, key: str) -> str | None:
        """The quant type of a quantized tensor ("gguf q8_0"); None for F32/F16/BF16, which are read as stored."""
        t = self._types[key]
        return None if t in PLAIN else f"gguf {t.lower()}"

    def span(self, key: str) -> Span | None:
        info = self._info[key]
        if self._types[key] not in PLAIN:
            return None
        mm = self._map()
        return Span(mm, self._address + self._offsets[key], info.dtype_name, info.shape)

    def packed(self, key: str, start: int, stop: int, shape: tuple[int, ...] | None = None) -> Packed | None:
        """Flat elements [start, stop) of a quantized tensor as its stored blocks, for the native dequantizer;
        None for a plain tensor, a type only the gguf package dequantizes, or while the library is not loaded."""
        from hubmix.formats.quant import gguf_blocks

        qtype = self._types[key]
        unpack = gguf_blocks.native_unpacker(qtype)
        if unpack is None:
            return None
        _, bs, ts = GGML_TYPES[qtype]
        b0, b1 = start // bs, -(-stop // bs)
        raw = Span(self._map(), self._address + self._offsets[key] + b0 * ts, "uint8", ((b1 - b0) * ts,))
        return Packed(raw, b1 - b0, bs, start - b0 * bs, shape or (stop - start,), unpack, type_id(qtype))

    def tensor(self, key: str) -> torch.Tensor:
        import torch

        info = self._info[key]
        if self._types[key] in PLAIN:
            if info.numel == 0:
                return torch.empty(info.shape, dtype=info.dtype)
            t = torch.frombuffer(self._map(), dtype=info.dtype, count=info.numel, offset=self._offsets[key])
            return t.reshape(info.shape)
        return self.tensor_range(key, 0, info.numel).reshape(info.shape)

    def tensor_range(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Flat elements [start, stop) as float32 (quantized) or as stored; only the blocks holding them are read."""
        import torch

        if self._types[key] in PLAIN:
            return self.tensor(key).reshape(-1)[start:stop]
        return torch.from_numpy(self.dequantize_range(key, start, stop))

    def dequantize_range(self, key: str, start: int, stop: int):
        import numpy as np

        from hubmix.formats.quant.gguf_blocks import dequantize

        qtype = self._types[key]
        _, bs, ts = GGML_TYPES[qtype]
        b0, b1 = start // bs, -(-stop // bs)
        raw = np.frombuffer(self._map(), np.uint8, count=(b1 - b0) * ts, offset=self._offsets[key] + b0 * ts)
        out = dequantize(raw, qtype)
        return out[start - b0 * bs:stop - b0 * bs]


CONTAINERS["gguf"] = GGUFFile  # open_weight_file hands .gguf files (and the GGUF magic) to this reader
