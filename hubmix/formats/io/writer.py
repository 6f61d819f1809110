"""A streaming safetensors writer whose header is planned from the output shapes before any data exists.

Because every tensor's byte range is fixed up front, parts of a tensor can be written in any order and from any
thread with `pwrite` (a chunk of a large tensor, one third of a fused q/k/v projection), and nothing is buffered.
A background thread starts writeback of what is already written, so the final fsync has little left to wait for.
"""

from __future__ import annotations

import math
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from hubmix.errors import OutputError
from hubmix.formats.io.readers import st_dtype

FLUSH_STEP = 256 << 20  # start writeback after this many new bytes


@dataclass(frozen=True)
class PlannedTensor:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_header(tensors: list[PlannedTensor], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """The header bytes and each tensor's offset into the data section.

    Tensors are ordered by alignment, then name (as safetensors does), so every tensor starts aligned to its
    itemsize; metadata keys are sorted, so the same plan always gives the same bytes.
    """
    order = sorted(tensors, key=lambda t: (-t.dtype.itemsize, t.key))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offsets: dict[str, int] = {}
    pos = 0
    for t in order:
        header[t.key] = {"dtype": st_dtype(t.dtype), "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        offsets[t.key] = pos
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets


class SafetensorsWriter:
    def __init__(self, path: str | os.PathLike, tensors: list[PlannedTensor], metadata: dict[str, str] | None = None,
                 background_flush: bool = True):
        self.path = Path(path)
        keys = [t.key for t in tensors]
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            raise OutputError(f"{self.path}: planned the same tensor twice: {dup[:5]}")
        self.planned = {t.key: t for t in tensors}
        header, offsets = plan_header(tensors, metadata or {})
        self._header_len = len(header)
        self._offsets = {k: len(header) + off for k, off in offsets.items()}
        self.size = len(header) + sum(t.nbytes for t in tensors)
        self._written = dict.fromkeys(self.planned, 0)
        self._lock = threading.Lock()
        self._fd = -1
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # minus the umask
            os.pwrite(self._fd, header, 0)
            os.ftruncate(self._fd, self.size)
        except OSError as e:
            if self._fd >= 0:
                os.close(self._fd)
            raise OutputError(f"{self.path}: cannot write ({e.strerror})") from None
        self._dirty = 0
        self._flush_wanted = threading.Event()
        self._closing = False
        self._flusher = None
        if background_flush:
            self._flusher = threading.Thread(target=self._flush_loop, name="hubmix-flush", daemon=True)
            self._flusher.start()

    def _flush_loop(self) -> None:
        while True:
            self._flush_wanted.wait()
            self._flush_wanted.clear()
            if self._closing:
                return
            try:
                os.fdatasync(self._fd)
            except OSError:
                return

    def write(self, key: str, data: torch.Tensor, byte_offset: int = 0) -> None:
        """Write `data` (already in the planned dtype) into tensor `key`, starting `byte_offset` bytes in."""
        planned = self.planned[key]
        if data.dtype != planned.dtype:
            raise AssertionError(f"{key}: writing {data.dtype} into planned {planned.dtype}")
        buf = memoryview(data.contiguous().reshape(-1).view(torch.uint8).numpy())
        n = len(buf)
        if byte_offset + n > planned.nbytes:
            raise AssertionError(f"{key}: write past the planned end ({byte_offset}+{n} > {planned.nbytes})")
        pos = self._offsets[key] + byte_offset
        done = 0
        try:
            while done < n:
                done += os.pwrite(self._fd, buf[done:], pos + done)
        except OSError as e:  # a full disk, a quota: one clear line, and the caller removes the partial output
            raise OutputError(f"{self.path}: cannot write ({e.strerror})") from None
        with self._lock:
            self._written[key] += n
            self._dirty += n
            if self._dirty >= FLUSH_STEP:
                self._dirty = 0
                self._flush_wanted.set()

    def set_metadata(self, metadata: dict[str, str]) -> None:
        """Rewrite the header's metadata, which must encode to the same length (values known only at the end,
        such as input hashes computed during the merge, are planned as same-length placeholders)."""
        header, _ = plan_header(list(self.planned.values()), metadata)
        if len(header) != self._header_len:
            raise AssertionError(f"{self.path}: final metadata changes the header size")
        try:
            os.pwrite(self._fd, header, 0)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write ({e.strerror})") from None

    def missing(self) -> list[str]:
        return [k for k, n in self._written.items() if n != self.planned[k].nbytes]

    def _stop_flusher(self) -> None:
        if self._flusher is not None:
            self._closing = True
            self._flush_wanted.set()
            self._flusher.join()
            self._flusher = None

    def finish(self) -> None:
        """Check every planned byte was written, fsync, close."""
        self._stop_flusher()
        missing = self.missing()
        if missing:
            self.abort()
            raise AssertionError(f"{self.path}: {len(missing)} planned tensors not fully written, e.g. {missing[:3]}")
        try:
            os.fsync(self._fd)
        except OSError as e:
            self.abort()
            raise OutputError(f"{self.path}: cannot write ({e.strerror})") from None
        os.close(self._fd)
        self._fd = -1

    def abort(self) -> None:
        self._stop_flusher()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
