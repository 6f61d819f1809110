"""LoRA deltas inside the engine's pass: W_out = merge(W_inputs) + sum_i scale_i * up_i @ down_i, in float32.

A tensor's delta has the tensor's full size, so it is computed once per tensor (memory bounded by the largest
tensor a LoRA touches, not by the model) when its first chunk is processed, shared by that tensor's chunks under
a lock, and dropped after its last chunk. The delta is one fixed matmul per module on the whole tensor, whatever
the chunk size or worker count, so the output bytes do not depend on --max-memory or --workers.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from hubmix.formats.lora import LoraModule

if TYPE_CHECKING:
    import torch


class LoraDelta:
    def __init__(self, modules: list[LoraModule], shape: tuple[int, ...]):
        self.modules = modules
        self.shape = shape
        self.numel = 1
        for s in shape:
            self.numel *= s
        self._lock = threading.Lock()
        self._delta: torch.Tensor | None = None
        self._left = self.numel

    def full(self) -> torch.Tensor:
        """The whole delta, flat, float32: the modules' updates added in recipe and file order."""
        total = None
        for m in self.modules:
            up, down = m.up.load().float(), m.down.load().float()
            rank = down.shape[0]
            d = (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(-1)
            total = d.mul_(m.scale) if total is None else total.add_(d, alpha=m.scale)
        assert total is not None
        return total

    def take(self, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flat delta; computed on first use, freed once every element was taken."""
        with self._lock:
            delta = self._delta if self._delta is not None else self.full()
            self._left -= stop - start
            self._delta = delta if self._left > 0 else None
        return delta[start:stop]
