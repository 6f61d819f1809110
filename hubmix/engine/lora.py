"""LoRA updates inside the engine's pass: W_out = merge(W_inputs) + sum_i strength_i * factor_i * U_i, in float32.

A tensor's delta has the tensor's full size, so it is computed once per tensor (memory bounded by the largest
tensor a LoRA touches, not by the model) when its first chunk is processed, shared by that tensor's chunks under
a lock, and dropped after its last chunk. The delta is a fixed computation per module on the whole tensor, whatever
the chunk size or worker count, so the output bytes do not depend on --max-memory or --workers.
A DoRA module rescales the whole weight, so a tensor with one is processed whole (`needs_whole`) and its modules
are applied in order on the merged weight.
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

    @property
    def needs_whole(self) -> bool:
        return any(m.dora is not None for m in self.modules)

    def full(self) -> torch.Tensor:
        """The whole delta, flat, float32: the modules' updates added in recipe and file order."""
        from hubmix.lora.weights import module_update

        total = None
        for m in self.modules:
            d = module_update(m, self.shape).reshape(-1)
            total = d.mul_(m.strength) if total is None else total.add_(d, alpha=m.strength)
        assert total is not None
        return total

    def take(self, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flat delta; computed on first use, freed once every element was taken."""
        with self._lock:
            delta = self._delta if self._delta is not None else self.full()
            self._left -= stop - start
            self._delta = delta if self._left > 0 else None
        return delta[start:stop]

    def apply(self, weight: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """`weight` (float32, elements [start, stop) of the merged tensor) with the LoRAs applied."""
        if not self.needs_whole:
            return weight + self.take(start, stop).view(weight.shape)
        from hubmix.lora.weights import dora, module_update

        w = weight.reshape(self.shape)
        pending = None
        for m in self.modules:
            u = module_update(m, self.shape)
            if m.dora is None:
                pending = u.mul_(m.strength) if pending is None else pending.add_(u, alpha=m.strength)
                continue
            if pending is not None:
                w, pending = w + pending, None
            w = dora(w, u, m.dora.load(), m.strength)
        if pending is not None:
            w = w + pending
        return w.reshape(weight.shape)

