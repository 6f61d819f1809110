"""Per-tensor statistics for whole-tensor methods, computed from chunks so memory stays at a chunk's size.

Sums are the same to the last bit on every machine, whatever the chunking, thread count, CPU vector width or torch
version: a sum of products is taken per fixed block of BLOCK elements (chunks start at multiples of BLOCK; a short
last block counts as padded with zeros), each product exact in float64 (two float32 significands need 48 bits),
and the block's products added in one fixed order, a pairwise tree (element i plus element i + h, for h = BLOCK/2,
BLOCK/4, ..., 1) written as element-wise float64 additions, which every CPU and torch version compute alike; no
torch reduction (whose grouping depends on all of the above) decides a bit. The native library computes the same
tree in C (the tests compare the bytes). The block sums are added with math.fsum, which rounds once, so the order
of chunks and workers does not matter either. Quantiles use integer histograms of the float bit patterns (an
exact radix select: the k-th smallest |t| equals torch.kthvalue's), so a top-k threshold needs no copy of the
whole tensor; the engine installs a native histogram (counts are counts: the same result).
"""

from __future__ import annotations

import math
import struct
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

BLOCK = 1 << 12  # elements per block sum; chunk starts are multiples of it
PIECE = 64 * BLOCK  # the torch tree runs on this many elements at a time (2 MiB of float64: stays in cache)
HI_BINS, LO_BINS = 1 << 15, 1 << 16  # |x| has a zero sign bit: its high half is 15 bits, its low half 16

# (x, y) -> block_dots(x, y) from the native library (the same tree in C), or None. Set by hubmix.engine.native.
native_dots: Callable[[Any, Any], Any] | None = None
# (x, base, high or -1) -> the histogram of |x - base|'s high half (high = -1) or of the low half of the elements
# whose high half is `high`, as int64; or None. Set by hubmix.native when it loads.
native_histogram: Callable[[Any, Any, int], Any] | None = None


def block_dots(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The sums of x*y over x's consecutive BLOCK-element blocks, as float64: each product exact in float64, each
    block's products added in the fixed pairwise tree (the module's docstring). Flat float32 inputs."""
    if native_dots is not None:
        r = native_dots(x, y)
        if r is not None:
            return r
    import torch

    n = x.numel()
    blocks = -(-n // BLOCK)
    out = torch.empty(blocks, dtype=torch.float64)
    for s in range(0, n, PIECE):
        e = min(s + PIECE, n)
        nb = -(-(e - s) // BLOCK)
        p = torch.empty(nb * BLOCK, dtype=torch.float64)
        p[:e - s].copy_(x[s:e]).mul_(y[s:e])  # exact: no rounding yet
        p[e - s:].zero_()
        out[s // BLOCK:s // BLOCK + nb] = tree_sums(p.view(nb, BLOCK))
    return out


def tree_sums(p: torch.Tensor) -> torch.Tensor:
    """Each row of p (rows of BLOCK float64) summed as p[i] + p[i + h] for h = BLOCK/2, ..., 1: element-wise
    additions only, so the grouping is this one on every machine."""
    h = p.shape[1] // 2
    while h >= 64:  # long contiguous halves
        p = p[:, :h] + p[:, h:2 * h]
        h //= 2
    q = p.t().contiguous()  # the last 64 per row, transposed so each step adds two contiguous runs of rows
    while h >= 1:
        q = q[:h] + q[h:2 * h]
        h //= 2
    return q[0]


def dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-block sums of x*y (exact products, the fixed tree), float64: the partial result of a statistics pass."""
    return block_dots(x, y)


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
