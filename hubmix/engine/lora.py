"""LoRA deltas inside the engine's pass: W_out = merge(W_inputs) + sum_i scale_i * up_i @ down_i, in float32.

A tensor's delta has the tensor's full size, so it is computed once per tensor (memory bounded by the largest
tensor a LoRA touches, not by the model) when its first chunk is processed, shared by that tensor's chunks under
a lock, and dropped after its last chunk. The delta does not depend on --max-memory or --workers, nor on the
machine: no matmul (whose summation order BLAS picks per CPU and thread count) decides a bit. Each product
up[i][k] * down[k][j] is exact in float64, a rank's products are added in order k = 0, 1, ... (element-wise float64
additions), the modules' scaled deltas are added in recipe and file order in float64, and the total is rounded to
float32 once. The native library computes the same bits in C
(lora_delta) where it is loaded. LyCORIS kinds (LoHa, LoKr, CP LoCon, full diffs: hubmix.engine.lora_weights) are
computed in float32 torch and added in the same float64 order. A DoRA module rescales the whole weight, so a tensor
with one is processed whole (`needs_whole`) and its modules are applied in order on the merged weight.
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
        import torch

        from hubmix.engine import native
        from hubmix.engine.lora_weights import module_update

        total = None
        for m in self.modules:
            if m.kind != "lora" or "mid" in m.parts:
                u = module_update(m, self.shape).reshape(self.shape[0], -1).double()
                if total is None:
                    total = torch.zeros_like(u)
                total += u * m.strength
                continue
            up, down = m.up.load().float(), m.down.load().float()
            rank = down.shape[0]
            up, down = up.reshape(up.shape[0], rank), down.reshape(rank, -1)
            if total is None:
                total = torch.zeros(up.shape[0], down.shape[1], dtype=torch.float64)
            if not native.lora_delta(up, down, float(m.scale), total):
                add_delta(up, down, float(m.scale), total)
        assert total is not None
        return total.reshape(-1).float()

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
        from hubmix.engine.lora_weights import dora, module_update

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


PIECE = 1 << 15  # float64 elements of the running sum per step of the torch path (256 KiB: stays in cache)


def add_delta(up: torch.Tensor, down: torch.Tensor, scale: float, total: torch.Tensor) -> None:
    """total += scale * up @ down in the fixed order (the module's docstring), with element-wise torch ops: rows in
    cache-sized pieces, each piece's sum over the rank built one exact outer product at a time."""
    import torch

    rows, rank = up.shape
    cols = down.shape[1]
    step = max(1, PIECE // max(1, cols))
    u64, d64 = up.double(), down.double()
    for s in range(0, rows, step):
        e = min(s + step, rows)
        acc = torch.zeros(e - s, cols, dtype=torch.float64)
        for k in range(rank):
            acc += torch.outer(u64[s:e, k], d64[k])  # exact products, added in order
        total[s:e] += acc * scale  # the product rounded, then the sum: as the C does
