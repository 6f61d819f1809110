"""Spans: tensors as the native kernels and the writer see them, an address, a dtype name and a shape, no torch.

A merge whose every tensor is a plain copy or has a native kernel never needs a torch tensor: its inputs are
byte ranges of memory-mapped files, its outputs byte ranges of reused buffers, and the arithmetic is C called
through ctypes. Such a merge runs on spans and does not import torch at all (1.6 s of a 4 s merge on a small
machine); every other merge runs on torch views of the same mappings.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import sys
from typing import Any

# torch's dtype names -> bytes per element (the names safetensors headers map to: readers.ST_DTYPES)
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
            "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}
FLOATS = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})
FP8 = frozenset({"float8_e4m3fn", "float8_e5m2"})


def dtype_name(dtype: Any) -> str:
    """torch.float16 or 'float16' -> 'float16'."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(dtype: Any) -> Any:
    """'float16' (or torch.float16) -> torch.float16; imports torch."""
    import torch

    return getattr(torch, dtype_name(dtype))


def itemsize(dtype: Any) -> int:
    name = dtype_name(dtype)
    size = ITEMSIZE.get(name)
    return size if size is not None else dtype.itemsize  # a torch dtype the table does not list


def is_float(dtype: Any) -> bool:
    return dtype_name(dtype) in FLOATS


def private_memory(nbytes: int) -> mmap.mmap:
    """Page-aligned private anonymous memory (MAP_PRIVATE where the platform has it)."""
    if hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS"):
        return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return mmap.mmap(-1, nbytes)


def address_of(buffer: Any) -> int:
    """The address of a writable buffer (an mmap, a bytearray); it stays valid while the buffer lives."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


class Span:
    """A contiguous row-major tensor in memory that `owner` keeps alive."""

    __slots__ = ("owner", "address", "dtype", "shape", "numel")

    def __init__(self, owner: Any, address: int, dtype: str, shape: tuple[int, ...]):
        self.owner = owner
        self.address = address
        self.dtype = dtype
        self.shape = tuple(shape)
        self.numel = math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def reshape(self, shape: tuple[int, ...]) -> Span:
        if math.prod(shape) != self.numel:
            raise ValueError(f"cannot view {self.numel} elements as {shape}")
        return Span(self.owner, self.address, self.dtype, shape)

    def flat(self, start: int, stop: int) -> Span:
        """Elements start..stop of the flattened tensor."""
        if not 0 <= start <= stop <= self.numel:
            raise IndexError(f"elements {start}..{stop} of {self.numel}")
        return Span(self.owner, self.address + start * self.itemsize, self.dtype, (stop - start,))

    def rows(self, start: int, count: int) -> Span:
        """Rows start..start+count along dim 0 (a contiguous range)."""
        row = self.numel // self.shape[0] if self.shape and self.shape[0] else 0
        return Span(self.owner, self.address + start * row * self.itemsize, self.dtype, (count, *self.shape[1:]))

    def memoryview(self) -> memoryview:
        """The bytes, without a copy (valid while this span lives)."""
        if not self.nbytes:
            return memoryview(b"")
        return memoryview((ctypes.c_char * self.nbytes).from_address(self.address)).cast("B")

    @classmethod
    def allocate(cls, nbytes: int, dtype: str = "uint8") -> Span:
        """A fresh page-aligned buffer (private anonymous memory: untouched pages cost nothing; Python's default,
        a shared mapping, is shmem, whose page faults cost more)."""
        buf = private_memory(max(nbytes, 1))
        return cls(buf, address_of(buf), dtype, (nbytes // ITEMSIZE[dtype],))

    @classmethod
    def of_bytes(cls, data: bytes, dtype: str, shape: tuple[int, ...]) -> Span:
        """A span holding a copy of `data` (small generated tensors: position ids, markers)."""
        buf = bytearray(data) or bytearray(1)
        span = cls(buf, address_of(buf), dtype, shape)
        if span.nbytes != len(data):
            raise ValueError(f"{len(data)} bytes for {shape} {dtype}")
        return span

    def __repr__(self) -> str:
        return f"Span({self.dtype}, {list(self.shape)})"


class Packed:
    """A flat element range of a quantized tensor as its stored blocks (`raw`, a uint8 span of the mapped file, of
    the ggml type `type_id`) and the native function that unpacks them to float32: what a span merge reads of a GGUF
    input. A native kernel reads whole blocks of it directly (dequantized step by step in its own pass: `direct`);
    else the engine's workers unpack it into their own scratch memory (`unpack(raw address, float32 address,
    blocks)`); `skip` elements of the first block precede the range."""

    __slots__ = ("raw", "blocks", "block", "skip", "shape", "numel", "unpack", "type_id")
    dtype = "float32"  # what it unpacks to: the dtype a kernel reading it takes

    def __init__(self, raw: Span, blocks: int, block: int, skip: int, shape: tuple[int, ...], unpack: Any,
                 type_id: int):
        self.raw, self.blocks, self.block, self.skip, self.unpack = raw, blocks, block, skip, unpack
        self.shape = tuple(shape)
        self.numel = math.prod(self.shape)
        self.type_id = type_id

    @property
    def direct(self) -> bool:
        """Whole blocks from the first: a native kernel can read it as it is stored."""
        return self.skip == 0 and self.numel == self.blocks * self.block

    def into(self, buf: Span) -> Span:
        """The float32 values, unpacked into `buf` (at least blocks * block float32 elements)."""
        if self.blocks:
            self.unpack(self.raw.address, buf.address, self.blocks)
        return Span(buf.owner, buf.address + 4 * self.skip, "float32", self.shape)

    def __repr__(self) -> str:
        return f"Packed({self.blocks} blocks, {list(self.shape)})"


def int64_range(n: int) -> bytes:
    """0..n-1 as little-endian int64 bytes."""
    import array

    a = array.array("q", range(n))
    if sys.byteorder != "little":
        a.byteswap()
    return a.tobytes()
