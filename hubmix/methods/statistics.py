"""Per-tensor statistics for whole-tensor methods, computed from chunks so memory stays at a chunk's size.

Sums are the same to the last bit whatever the chunking: products are summed in float32 per fixed block of BLOCK
elements (a chunk starts at a multiple of BLOCK, and a block is short enough that torch never splits its sum
across threads; a float64 sum costs 15 times more), and the block sums are added with math.fsum, which rounds
once, so the order of chunks and workers does not matter. Quantiles use integer histograms of the float bit
patterns (an exact radix select: the k-th smallest |t| equals torch.kthvalue's), so a top-k threshold needs no
copy of the whole tensor; the engine installs a native histogram (counts are counts: the same result).
"""

from __future__ import annotations

import math
import struct
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

BLOCK = 1 << 12  # elements per block sum; chunk starts are multiples of it (below torch's reduction grain, 32768)
HI_BINS, LO_BINS = 1 << 15, 1 << 16  # |x| has a zero sign bit: its high half is 15 bits, its low half 16

# (x, base, high or -1) -> the histogram of |x - base|'s high half (high = -1) or of the low half of the elements
# whose high half is `high`, as int64; or None. Set by hubmix.native when it loads.
native_histogram: Callable[[Any, Any, int], Any] | None = None


def block_sums(x: torch.Tensor) -> torch.Tensor:
    """float32 sums of x's consecutive BLOCK-element blocks (the last one may be short), as float64."""
    import torch

    n = x.numel()
    full = n - n % BLOCK
    parts = [x[:full].view(-1, BLOCK).sum(1)] if full else []
    if full < n:
        parts.append(x[full:].sum().reshape(1))
    return torch.cat(parts).double() if parts else torch.zeros(0, dtype=torch.float64)


def dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-block sums of x*y (the products rounded to float32, as an element-wise float32 method would)."""
    return block_sums(x * y)


class Totals:
    """Adds up the partial results of a pass: float64 block sums exactly (fsum), int64 counts."""

    def __init__(self) -> None:
        self.floats: dict[str, list[float]] = {}
        self.counts: dict[str, Any] = {}

    def add(self, part: dict[str, Any]) -> None:
        import torch

        for name, v in part.items():
            if v.dtype == torch.float64:
                self.floats.setdefault(name, []).extend(v.tolist())
            else:
                self.counts[name] = v.clone() if name not in self.counts else self.counts[name] + v

    def result(self) -> dict[str, Any]:
        return {**{k: math.fsum(v) for k, v in self.floats.items()}, **self.counts}


def run_passes(method: Any, chunks, params: dict[str, Any], numel: int) -> dict[str, Any]:
    """Every statistics pass of `method`; `chunks(partial)` applies a partial function to every chunk and returns
    the parts (the engine runs them on its workers)."""
    stats: dict[str, Any] = {}
    for p in method.stats:
        totals = Totals()
        for part in chunks(lambda xs, p=p, stats=dict(stats): p.partial(xs, params, stats)):
            totals.add(part)
        stats.update(p.finish(totals.result(), params, dict(stats), numel))
    return stats


def whole_tensor(method: Any, xs: list[torch.Tensor], params: dict[str, Any], ctx: Any) -> torch.Tensor:
    """A whole-tensor method on whole tensors: its passes over the tensor as one chunk, then its element pass."""
    shape = xs[0].shape
    flat = [x.reshape(-1) for x in xs]
    stats = run_passes(method, lambda partial: [partial(flat)], params, flat[0].numel())
    return method.element(flat, {**params, **stats}, ctx).reshape(shape)  # type: ignore[misc]


# ---- exact k-th smallest magnitude: a two-pass radix select over float bits -----------------------------------

def magnitude_bits(t: torch.Tensor):
    import torch

    return t.abs().view(torch.int32)  # non-negative floats order as their bit patterns


def high_histogram(x: torch.Tensor, base: torch.Tensor | None = None):
    """Histogram of the high 16 bits of |x - base| (|x| without a base)."""
    import torch

    if native_histogram is not None and base is not None:
        h = native_histogram(x, base, -1)
        if h is not None:
            return h
    t = x if base is None else x - base
    return torch.bincount(magnitude_bits(t) >> 16, minlength=HI_BINS).long()


def low_histogram(x: torch.Tensor, high: int, base: torch.Tensor | None = None):
    """Histogram of the low 16 bits of |x - base| over the elements whose high 16 bits are `high`."""
    import torch

    if native_histogram is not None and base is not None:
        h = native_histogram(x, base, high)
        if h is not None:
            return h
    t = x if base is None else x - base
    bits = magnitude_bits(t)
    return torch.bincount(bits[(bits >> 16) == high] & 0xFFFF, minlength=LO_BINS).long()


def select_bin(hist, k: int) -> tuple[int, int]:
    """The bin holding the k-th smallest (1-based) element, and k's rank within that bin."""
    import torch

    cum = torch.cumsum(hist, 0)
    b = int(torch.searchsorted(cum, torch.tensor(k, dtype=cum.dtype)))
    return b, k - (int(cum[b - 1]) if b > 0 else 0)


def bits_to_float(high: int, low: int) -> float:
    return struct.unpack("<f", struct.pack("<I", (high << 16) | low))[0]
