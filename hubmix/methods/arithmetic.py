"""Arithmetic methods of A1111, supermerger and sd-mecha: triple sum, sum twice, train difference, slerp.

The element-wise bodies are written operation for operation as the native kernels compute them (hubmix.native),
so both give the same bytes. slerp needs three sums over the whole tensor (|a|, |b|, <a, b>): it reduces to a
weighted sum `ka*a + kb*b` whose two coefficients come from those sums.
"""

from __future__ import annotations

import math
from typing import Any

from hubmix.methods.registry import Param, StatPass, register
from hubmix.methods.statistics import dot

PARALLEL = 1e-6  # radians
WEIGHT_B = Param("alpha", 0.5, "weight of b", 0.0, 1.0)


@register(
    "triple_sum",
    models=(3,),
    params=(Param("alpha", 0.33, "weight of b"), Param("beta", 0.33, "weight of c")),
    formula="out = (1-alpha-beta)*a + alpha*b + beta*c",
    reference="https://github.com/hako-mikan/sd-webui-supermerger",
    summary="weighted sum of three models (supermerger's triple sum)",
)
def triple_sum(xs, alpha=0.33, beta=0.33):
    a, b, c = xs
    return (1 - alpha - beta) * a + alpha * b + beta * c


@register(
    "sum_twice",
    models=(3,),
    params=(Param("alpha", 0.5, "weight of b in the first sum"), Param("beta", 0.5, "weight of c in the second sum")),
    formula="out = (1-beta)*((1-alpha)*a + alpha*b) + beta*c",
    reference="https://github.com/hako-mikan/sd-webui-supermerger",
    summary="weighted sum of a and b, then of that and c (supermerger's sum twice)",
)
def sum_twice(xs, alpha=0.5, beta=0.5):
    a, b, c = xs
    return (1 - beta) * ((1 - alpha) * a + alpha * b) + beta * c


@register(
    "train_difference",
    models=(3,),
    params=(Param("alpha", 1.0, "scale of the difference b - c"),),
    formula="out = a + alpha*(b - c)*1.8*nan_to_num(|b - a| / (|b - a| + |b - c|))  (0/0 -> 0)",
    reference="https://github.com/ljleb/sd-mecha",
    summary="add difference damped where b is near a (supermerger's train difference, as sd-mecha writes it)",
)
def train_difference(xs, alpha=1.0):
    import torch

    a, b, c = xs
    x = (b - a).abs()
    d = b - c
    w = torch.nan_to_num(x / (x + d.abs()))
    return a + alpha * d * 1.8 * w


# ---- slerp ------------------------------------------------------------------------------------------------------

def _slerp_sums(xs, p, stats):
    a, b = xs
    return {"aa": dot(a, a), "bb": dot(b, b), "ab": dot(a, b)}


def slerp_coefficients(aa: float, bb: float, ab: float, alpha: float) -> tuple[float, float]:
    """(ka, kb) with slerp(a, b) = ka*a + kb*b, in float64; the weighted sum's (1-alpha, alpha) where the slerp is
    not finite (a zero tensor, parallel tensors). Parallel means an angle under PARALLEL: float64 cannot resolve
    smaller angles from the sums, and there the slerp equals the weighted sum to far below float32 rounding."""
    na, nb = math.sqrt(aa), math.sqrt(bb)
    try:
        w = math.acos(min(1.0, max(-1.0, ab / (na * nb))))
        if w < PARALLEL:
            raise ZeroDivisionError
        s = math.sin(w)
        scale = (1 - alpha) * na + alpha * nb
        ka = math.sin((1 - alpha) * w) / s * scale / na
        kb = math.sin(alpha * w) / s * scale / nb
    except (ZeroDivisionError, ValueError):
        return 1 - alpha, alpha
    if not (math.isfinite(ka) and math.isfinite(kb)):
        return 1 - alpha, alpha
    return ka, kb


def _slerp_finish(sums: dict[str, Any], p, stats, numel) -> dict[str, float]:
    ka, kb = slerp_coefficients(sums["aa"], sums["bb"], sums["ab"], p["alpha"])
    return {"ka": ka, "kb": kb}


@register(
    "slerp",
    models=(2,),
    params=(WEIGHT_B,),
    formula="na = a/|a|, nb = b/|b|, w = arccos(clamp(<na, nb>, -1, 1)); out = (sin((1-alpha)*w)*na + "
            "sin(alpha*w)*nb) / sin(w) * ((1-alpha)*|a| + alpha*|b|); the weighted sum where that is not finite "
            "(a zero tensor, parallel tensors: w < 1e-6); per tensor",
    reference="https://github.com/ljleb/sd-mecha",
    summary="spherical interpolation of each tensor, norms interpolated linearly (sd-mecha's slerp)",
    stats=(StatPass(_slerp_sums, _slerp_finish),),
    element=True,
)
def slerp(xs, p, ctx):
    a, b = xs
    return p["ka"] * a + p["kb"] * b
