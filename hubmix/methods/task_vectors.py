"""Task-vector methods: TIES, DARE and Model Stock. Model a is the base; t_i = m_i - a for every other model.

Each needs something of the whole tensor (a top-k threshold, cosines) or, for DARE, a drop mask that must not
depend on how the tensor was cut into chunks: the mask is a counter-based hash of (seed, tensor name, model index,
element index) (hubmix.methods.dropmask), so a recipe gives the same bytes with any workers, memory budget or
device.
"""

from __future__ import annotations

import math
from typing import Any

from hubmix.methods.registry import Param, StatPass, register
from hubmix.methods.statistics import (bits_to_float, dot, high_histogram, low_histogram, select_bin)

LAMBDA = Param("lambda", 1.0, "scale of the merged task vector")


def _task_vectors(xs):
    a = xs[0]
    return a, [x - a for x in xs[1:]]


def _elect(ts):
    """TIES's sign election and disjoint mean: s = sign(sum t_i); the mean of the t_i whose sign is s (0 where
    none is)."""
    import torch

    total = ts[0]
    for t in ts[1:]:
        total = total + t
    s = torch.sign(total)
    agree_sum = None
    count = None
    for t in ts:
        agree = torch.sign(t) == s
        part = torch.where(agree, t, 0.0)
        agree_sum = part if agree_sum is None else agree_sum + part
        n = agree.float()
        count = n if count is None else count + n
    return torch.where(count > 0, agree_sum / count.clamp(min=1.0), 0.0)


# ---- TIES ---------------------------------------------------------------------------------------------------------

def ties_rank(density: float, numel: int) -> int:
    """sd-mecha's filter_top_k: the threshold is the max(int((1-k)*n), 1)-th smallest magnitude."""
    return max(int((1 - density) * numel), 1)


def _ties_high(xs, p, stats):
    return {f"hi{i}": high_histogram(m, xs[0]) for i, m in enumerate(xs[1:])}


def _ties_high_finish(sums, p, stats, numel):
    k = ties_rank(p["density"], numel)
    out = {}
    for name, hist in sums.items():
        out[name], out["rank" + name[2:]] = select_bin(hist, k)
    return out


def _ties_low(xs, p, stats):
    return {f"lo{i}": low_histogram(m, stats[f"hi{i}"], xs[0]) for i, m in enumerate(xs[1:])}


def _ties_low_finish(sums, p, stats, numel):
    return {f"threshold{i}": bits_to_float(stats[f"hi{i}"], select_bin(hist, stats[f"rank{i}"])[0])
            for i, hist in ((int(name[2:]), h) for name, h in sums.items())}


@register(
    "ties",
    models=tuple(range(3, 27)),
    params=(Param("density", 0.2, "share k of each task vector kept (largest magnitudes)", 0.0, 1.0, min_open=True),
            LAMBDA),
    formula="t_i = m_i - a; trim: keep the elements of t_i with |t_i| >= the max(int((1-density)*n), 1)-th "
            "smallest |t_i|; s = sign(sum_i t_i); mean = average of the kept t_i whose sign is s (0 where none); "
            "out = a + lambda*mean",
    reference="https://arxiv.org/abs/2306.01708",
    summary="TIES merging: trim each task vector to its top-k magnitudes, elect a sign, average the agreeing ones",
    stats=(StatPass(_ties_high, _ties_high_finish), StatPass(_ties_low, _ties_low_finish)),
    element=True,
)
def ties(xs, p, ctx):
    import torch

    a, ts = _task_vectors(xs)
    trimmed = [torch.where(t.abs() >= p[f"threshold{i}"], t, 0.0) for i, t in enumerate(ts)]
    return a + p["lambda"] * _elect(trimmed)


# ---- DARE ---------------------------------------------------------------------------------------------------------

def dare_drop(t, p: float, seed: int, ctx, model: int):
    """t with each element dropped with probability p (the mask from dropmask.keep) and the kept ones divided by
    1 - p."""
    import torch

    from hubmix.methods.dropmask import keep

    if p == 0:
        return t
    return torch.where(keep(seed, ctx.key, model, ctx.start, t.numel(), p, t.device), t / (1 - p), 0.0)


@register(
    "dare",
    models=tuple(range(2, 27)),
    params=(Param("drop", 0.9, "probability p that an element of a task vector is dropped", 0.0, 1.0, max_open=True),
            LAMBDA,
            Param("seed", 0, "seed of the drop masks", 0, 2**32 - 1, integer=True, cli="dare-seed"),
            Param("combine", "sum", "how the rescaled task vectors are combined: sum, or ties (sign election and "
                                    "disjoint mean)", choices=("sum", "ties"), cli="dare-combine")),
    formula="t_i = m_i - a; d_i = where(keep_i, t_i / (1-drop), 0) with keep_i false with probability drop, a pure "
            "function of (seed, tensor name, i, element index); combine=sum: out = a + lambda*sum_i d_i; "
            "combine=ties: out = a + lambda*(TIES sign election and disjoint mean of the d_i)",
    reference="https://arxiv.org/abs/2311.03099",
    summary="DARE: drop task-vector elements at random, rescale the rest, then sum (or TIES-combine) them",
    element=True,
)
def dare(xs, p, ctx):
    a, ts = _task_vectors(xs)
    ds = [dare_drop(t, p["drop"], p["seed"], ctx, i) for i, t in enumerate(ts, start=1)]
    if p["combine"] == "ties":
        return a + p["lambda"] * _elect(ds)
    total = ds[0]
    for d in ds[1:]:
        total = total + d
    return a + p["lambda"] * total


# ---- Model Stock --------------------------------------------------------------------------------------------------

def _stock_sums(xs, p, stats):
    a, ts = _task_vectors(xs)
    return {f"{i},{j}": dot(ts[i], ts[j]) for i in range(len(ts)) for j in range(i, len(ts))}


def stock_ratio(sums: dict[str, float], n: int) -> float:
    """t = N*cos / (1 + (N-1)*cos), cos the mean pairwise cosine of the N task vectors. A pair with a zero task
    vector has cosine 0 (mergekit clamps the norm product likewise); t = 0 (out = a) where 1 + (N-1)*cos is 0."""
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            norms = sums[f"{i},{i}"] * sums[f"{j},{j}"]
            c = sums[f"{i},{j}"] / math.sqrt(norms) if norms > 0 else 0.0
            cosines.append(min(1.0, max(-1.0, c)))
    cos = math.fsum(cosines) / len(cosines)
    den = 1 + (n - 1) * cos
    return n * cos / den if den != 0 else 0.0


def _stock_finish(sums: dict[str, Any], p, stats, numel):
    n = int(round((math.sqrt(8 * len(sums) + 1) - 1) / 2))  # len(sums) = n(n+1)/2
    return {"t": stock_ratio(sums, n)}


@register(
    "model_stock",
    models=tuple(range(3, 27)),
    formula="t_i = m_i - a; cos = mean of the cosines of all pairs (t_i, t_j) (0 for a pair with a zero t_i); "
            "t = N*cos / (1 + (N-1)*cos) (0 where the denominator is 0); out = t*mean_i(m_i) + (1-t)*a; per tensor",
    reference="https://arxiv.org/abs/2403.19522",
    summary="Model Stock: interpolate the fine-tunes' average toward the base by their angle",
    stats=(StatPass(_stock_sums, _stock_finish),),
    element=True,
)
def model_stock(xs, p, ctx):
    a = xs[0]
    total = xs[1]
    for x in xs[2:]:
        total = total + x
    mean = total / (len(xs) - 1)
    return p["t"] * mean + (1 - p["t"]) * a
