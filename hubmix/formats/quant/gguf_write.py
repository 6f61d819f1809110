"""Writing GGUF files ComfyUI-GGUF loads: which type each tensor gets (`stored_type`, the rules of its
tools/convert.py and its llama.cpp patch), and a streaming writer whose header is planned from the output shapes
before any data exists, like the safetensors writer: each tensor's byte range is fixed up front, float32 chunks are
quantized as they arrive (a block split between two chunks waits in memory for its other part) and written in
place, and nothing else is buffered.

The rules (family data: `gguf:` in the family's YAML):
- 1-D tensors, tensors of at most 1024 elements and tensors of more than 4 dimensions (Wan's 5-D patch embedding)
  stay F32 when their source is float32 or bfloat16 (convert.py); else they take the base type.
- The base type is BF16 for a bfloat16 source, else F16 (convert.py); `gguf-bf16` / `gguf-f16` set it.
- Families with `reshape` (SD1, SDXL) store a tensor of more than one dimension, at least 512 elements, a multiple of
  256 elements and a last dimension that is not, as (n/256, 256), its shape in `comfy.gguf.orig_shape.<name>`.
- A quantized --dtype quantizes the 2-D (stored) tensors whose names the family's `keep` list does not hold; a row
  that is not whole blocks (256 elements for K-quants, 32 for the others) falls back to F16, as the patched
  llama-quantize does for K-quants.
"""

from __future__ import annotations

import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubmix.errors import OutputError
from hubmix.formats.io.span import Span
from hubmix.formats.io.writer import PlannedOutput
from hubmix.formats.quant.gguf_types import GGML_TYPES, GGUF_DTYPES, block_size, type_id, type_nbytes

ALIGN = 32
SMALL = 1024  # convert.py's QUANTIZATION_THRESHOLD
REARRANGE = 512  # convert.py's REARRANGE_THRESHOLD
QUANT_THREADS = max(1, min(4, os.cpu_count() or 1))  # threads quantizing one large chunk
PART_MIN = 1 << 18  # elements per part at least
FILE_TYPES = {"F16": 1, "Q4_0": 2, "Q8_0": 7, "Q5_0": 8, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18, "BF16": 32}


@dataclass(frozen=True)
class GGUFTensor:
    key: str
    qtype: str
    shape: tuple[int, ...]  # as stored (reshaped for SD1/SDXL)
    orig_shape: tuple[int, ...] | None = None  # the logical shape when stored reshaped

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return type_nbytes(self.qtype, self.numel)


def _ggml_ndims(shape: tuple[int, ...]) -> int:
    ne = list(reversed(shape))
    return max((i + 1 for i, n in enumerate(ne) if n != 1), default=1)


def stored_type(rules: dict[str, Any], key: str, shape: tuple[int, ...], source: str, dtype: str) -> GGUFTensor:
    """The stored type and shape of one output tensor (`source`: model a's dtype name of it; `dtype`: --dtype)."""
    target = GGUF_DTYPES[dtype]
    n = math.prod(shape)
    base = target if target in ("BF16", "F16") else ("BF16" if source == "bfloat16" else "F16")
    qtype = base
    if source in ("float32", "bfloat16") and (len(shape) <= 1 or n <= SMALL or len(shape) > 4):
        qtype = "F32"
    elif len(shape) > 4:
        qtype = "F32"
    orig = None
    stored = shape
    if (rules.get("reshape") and len(shape) > 1 and n >= REARRANGE and n % 256 == 0 and shape[-1] % 256
            and len(shape) <= 4):
        orig, stored = shape, (n // 256, 256)
    if target not in ("BF16", "F16") and qtype != "F32":
        keep = any(s in key for s in rules.get("keep", ())) or key in rules.get("keep_names", ())
        if not keep and _ggml_ndims(stored) == 2:
            qtype = target if stored[-1] % block_size(target) == 0 else "F16"
    return GGUFTensor(key, qtype, stored, orig)


# ---- the file --------------------------------------------------------------------------------------------------

def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, value: Any) -> bytes:
    """One key-value: a str (STRING), an int (UINT32) or a tuple of ints (ARRAY of INT32)."""
    if isinstance(value, str):
        return _string(key) + struct.pack("<I", 8) + _string(value)
    if isinstance(value, tuple):
        return (_string(key) + struct.pack("<IIQ", 9, 5, len(value)) + b"".join(struct.pack("<i", v) for v in value))
    return _string(key) + struct.pack("<II", 4, value)


def plan_header(arch: str, target: str, tensors: list[GGUFTensor],
                metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """The header (padded to the alignment) and each tensor's offset from the start of the file."""
    kvs: list[tuple[str, Any]] = [("general.architecture", arch), ("general.quantization_version", 2)]
    if target in FILE_TYPES:
        kvs.append(("general.file_type", FILE_TYPES[target]))
    kvs += [(f"comfy.gguf.orig_shape.{t.key}", tuple(t.orig_shape)) for t in tensors if t.orig_shape is not None]
    kvs += [(k, metadata[k]) for k in sorted(metadata)]
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(_kv(k, v) for k, v in kvs)
    infos, offsets, pos = [], {}, 0
    for t in tensors:
        dims = list(reversed(t.shape))
        infos.append(_string(t.key) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
                     + struct.pack("<IQ", type_id(t.qtype), pos))
        offsets[t.key] = pos
        pos += -(-t.nbytes // ALIGN) * ALIGN
    raw = head + b"".join(infos)
    raw += bytes(-len(raw) % ALIGN)
    return raw, {k: len(raw) + off for k, off in offsets.items()}


class GGUFWriter(PlannedOutput):
    """Writes float32 chunks of planned tensors into a GGUF file, quantizing them on the way (the Router's writer
    interface: write, set_metadata, missing, finish, abort)."""

    def __init__(self, path: str | os.PathLike, arch: str, dtype: str, tensors: list[GGUFTensor],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.arch, self.target = arch, GGUF_DTYPES[dtype]
        self.tensors = {t.key: t for t in tensors}
        self._order = list(tensors)
        header, self._offsets = plan_header(arch, self.target, self._order, metadata or {})
        last = self._order[-1] if self._order else None
        self.size = (self._offsets[last.key] + last.nbytes) if last else len(header)
        self._written = dict.fromkeys(self.tensors, 0)
        self._partial: dict[tuple[str, int], list] = {}  # (key, block) -> [float32 block, elements arrived]
        self._lock = threading.Lock()
        self._pool: Any = None
        self._local = threading.local()
        self._open(header)
        try:  # the alignment padding after each tensor: a direct write's blocks complete only once all is written
            for t in self._order:
                pad = -t.nbytes % ALIGN
                if pad and t is not last:
                    self._pwrite(bytes(pad), self._offsets[t.key] + t.nbytes)
        except OSError as e:
            self.abort()
            raise OutputError(f"{self.path}: cannot write ({e.strerror})") from None

    def encodes(self, key: str, start: int) -> str | None:
        """The stored type of tensor `key` if a merge's workers may hand its chunks from element `start` (a chunk
        start: a multiple of 4096 from there) as stored blocks they encoded themselves: a type the native unit
        stores (a merge on spans, the only one that encodes, has the library loaded)."""
        from hubmix.formats.quant.gguf_blocks import NATIVE_STORE

        t = self.tensors[key]
        if t.qtype not in NATIVE_STORE or start % block_size(t.qtype):
            return None
        return t.qtype

    def write(self, key: str, data: Any, byte_offset: int = 0) -> None:
        """Float32 `data` (a tensor or span) into tensor `key` from float32 element `byte_offset / 4` on; or a
        uint8 span: the stored blocks of those elements, encoded by a worker (`encodes`)."""
        t = self.tensors[key]
        start = byte_offset // 4
        if isinstance(data, Span):
            if data.dtype == "uint8":
                _, bs, ts = GGML_TYPES[t.qtype]
                assert start % bs == 0 and data.nbytes % ts == 0, (key, start, data.nbytes)
                self._store(t, data.memoryview(), start, data.nbytes // ts * bs)
                return
            assert data.dtype == "float32", (key, data.dtype)
            if self._native_blocks(t, data, start):
                return
        import numpy as np

        if isinstance(data, Span):
            x = np.frombuffer(data.memoryview(), np.float32)
        else:
            x = data.detach().reshape(-1).float().numpy()
        stop = start + x.size
        if stop > t.numel:
            raise AssertionError(f"{key}: write past the planned end ({stop} > {t.numel})")
        bs = block_size(t.qtype)
        first, last = -(-start // bs) * bs, stop // bs * bs
        if first >= last:  # within one block or across one boundary: all partial
            cut = min(stop, (start // bs + 1) * bs)
            self._edge(t, x[:cut - start], start)
            self._edge(t, x[cut - start:], cut)
            return
        self._edge(t, x[:first - start], start)
        self._blocks(t, x[first - start:last - start], first)
        self._edge(t, x[last - start:], last)

    def _native_blocks(self, t: GGUFTensor, x: Span, start: int) -> bool:
        """Whole blocks of a float32 span stored by the native unit (a span merge: no numpy, no torch), a large
        chunk in parts on several threads; False where the chunk splits a block or the type has no native form."""
        from hubmix.formats.quant.gguf_blocks import native_quantizer

        _, bs, ts = GGML_TYPES[t.qtype]
        n = x.numel
        if start % bs or n % bs or start + n > t.numel:
            return False
        if not n:
            return True
        if t.qtype == "F32":
            raw = x.memoryview()
        else:
            fn = native_quantizer(t.qtype)
            if fn is None:
                return False
            blocks = n // bs
            out = self._out_buffer(blocks * ts)
            parts = min(QUANT_THREADS, n // PART_MIN)
            step = -(-blocks // max(parts, 1))
            pieces = [(b, min(step, blocks - b)) for b in range(0, blocks, step)]

            def run(piece: tuple[int, int]) -> None:
                fn(x.address + piece[0] * bs * 4, out.address + piece[0] * ts, piece[1])

            if parts > 1:
                list(self._threads().map(run, pieces))
            else:
                run(pieces[0])
            raw = out.memoryview()[:blocks * ts]
        self._store(t, raw, start, n)
        return True

    def _out_buffer(self, nbytes: int) -> Span:
        """This thread's buffer for quantized bytes (reused: fresh pages cost a fault each)."""
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.nbytes < nbytes:
            buf = self._local.buf = Span.allocate(max(nbytes, 1 << 16))
        return buf

    def _edge(self, t: GGUFTensor, x, start: int) -> None:
        import numpy as np

        if not x.size:
            return
        bs = block_size(t.qtype)
        b = start // bs
        with self._lock:
            entry = self._partial.setdefault((t.key, b), [np.zeros(bs, np.float32), 0])
            entry[0][start - b * bs:start - b * bs + x.size] = x
            entry[1] += x.size
            done = entry[1] >= min(bs, t.numel - b * bs)
            if done:
                del self._partial[(t.key, b)]
        if done:
            self._blocks(t, entry[0], b * bs)

    def _blocks(self, t: GGUFTensor, x, start: int) -> None:
        """Whole blocks of `x` (elements start.. of the tensor) quantized and written."""
        if t.qtype == "BF16":
            import gguf

            raw = gguf.quants.BF16.quantize_blocks(x.reshape(1, -1)).reshape(-1)  # one vectorized call
        else:
            raw = self._quantize(x, t.qtype)
        self._store(t, raw, start, x.size)

    def _store(self, t: GGUFTensor, raw, start: int, n: int) -> None:
        """The stored bytes of `n` elements from element `start` (a block boundary) written in place."""
        _, bs, ts = GGML_TYPES[t.qtype]
        try:
            self._pwrite(raw, self._offsets[t.key] + start // bs * ts)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write ({e.strerror})") from None
        with self._lock:
            self._written[t.key] += n

    def _quantize(self, x, qtype: str):
        """Blocks are independent: a large chunk is quantized in parts on several threads (the native quantizer
        releases the GIL; K-quants' search is what a GGUF output spends its CPU on), the same bytes as in one."""
        import numpy as np

        from hubmix.formats.quant.gguf_blocks import quantize

        bs = block_size(qtype)
        parts = min(QUANT_THREADS, x.size // PART_MIN)
        if parts < 2:
            return quantize(x, qtype)
        step = -(-(x.size // bs) // parts) * bs
        pieces = list(self._threads().map(lambda s: quantize(x[s:s + step], qtype), range(0, x.size, step)))
        return np.concatenate(pieces)

    def _threads(self) -> Any:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(QUANT_THREADS, thread_name_prefix="hubmix-gguf")
        return self._pool

    def _header(self, metadata: dict[str, str]) -> bytes:
        """The header with these string key-values (set_metadata keeps its length: placeholders)."""
        return plan_header(self.arch, self.target, self._order, metadata)[0]

    def missing(self) -> list[str]:
        return [k for k, n in self._written.items() if n != self.tensors[k].numel]

    def _stop(self, cancel: bool) -> None:
        if self._pool is not None:  # idle here: write quantizes synchronously
            self._pool.shutdown()
            self._pool = None
        super()._stop(cancel)
