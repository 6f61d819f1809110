"""`QuantizedFile`: a quantized file seen as a plain float32 one (its groups' logical keys), and the refusal of the
quantized formats no reader dequantizes."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from hubmix.errors import InputError
from hubmix.formats.io.readers import TensorInfo, WeightFile

if TYPE_CHECKING:
    import mmap

    import torch

    from hubmix.formats.io.span import Span
    from hubmix.formats.quant import QuantGroup, QuantReader

# Quantized formats no reader here dequantizes, by a key suffix only they have: refused by name, never misread.
REFUSED_KEYS = (
    (".SCB", "bitsandbytes LLM.int8 weights"),
    (".weight_format", "bitsandbytes LLM.int8 weights"),
)


def refuse(f: WeightFile) -> None:
    for key in f.keys():
        for suffix, what in REFUSED_KEYS:
            if key.endswith(suffix):
                raise InputError(f"{f.path}: {what} ({key}): a quantized format hubmix does not read; dequantize it "
                                 "to bf16/fp16/fp32 first")


def stored_bytes(f: WeightFile, key: str) -> bytes:
    """A small stored tensor's raw bytes (a JSON quant state), without torch where the file is mapped."""
    span = f.span(key)
    if span is not None:
        return bytes(span.memoryview())
    import torch

    return f.tensor(key).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


class QuantizedFile(WeightFile):
    """The wrapped file with every group of stored tensors replaced by its logical float32 tensor."""

    def __init__(self, inner: WeightFile, reader: QuantReader):
        self.inner = inner
        self.path = inner.path
        self.format = f"{inner.format} ({reader.name})"
        groups, consumed = reader.groups(inner)
        self.groups: dict[str, QuantGroup] = {}
        members = set(consumed)
        for g in groups:
            members.update(g.members)
        self._info: dict[str, TensorInfo] = {}
        for k in inner.keys():
            if k not in members:
                self._info[k] = inner.info(k)
        for g in groups:
            if g.key in self._info or g.key in self.groups:
                raise InputError(f"{self.path}: {g.key} is stored twice (as a quantized group and again)")
            self.groups[g.key] = g
            self._info[g.key] = TensorInfo("float32", g.shape)
        self._info = dict(sorted(self._info.items()))

    @property
    def metadata(self) -> dict[str, str]:
        return self.inner.metadata

    def quant_type(self, key: str) -> str | None:
        g = self.groups.get(key)
        return g.quant if g is not None else None

    def tensor(self, key: str) -> torch.Tensor:
        g = self.groups.get(key)
        if g is None:
            return self.inner.tensor(key)
        return g.dequantize(0, math.prod(g.shape)).reshape(g.shape)

    def tensor_range(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Flat elements [start, stop) of the tensor; a group dequantizes only those."""
        g = self.groups.get(key)
        if g is None:
            return self.inner.tensor(key).reshape(-1)[start:stop]
        return g.dequantize(start, stop)

    def span(self, key: str) -> Span | None:
        return None if key in self.groups else self.inner.span(key)

    def mapped(self) -> mmap.mmap | None:
        return self.inner.mapped()

    def close(self) -> None:
        self.inner.close()
