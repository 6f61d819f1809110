"""llama.cpp's reference K-quant quantizers (Q4_K, Q5_K, Q6_K) in numpy: the eager fallback of the native unit
hubmix/engine/gguf_quants.c, byte-identical to it (the tests check that).

Each function of ggml-quants.c (quantize_row_q4_K_ref, make_qkx2_quants, make_qx_quants) runs over all sub-blocks
at once, one element column at a time, so every float32 sum is accumulated in the C code's order (numpy's own
reductions sum pairwise, which rounds differently).
"""

from __future__ import annotations

import numpy as np

F = np.float32
QK_K = 256
EPS = F(1e-15)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even through the 1.5 * 2^23 trick."""
    return ((v.astype(F) + F(12582912.0)).view(np.int32) & 0x7FFFFF) - 0x400000


def _f16(v: np.ndarray) -> np.ndarray:
    """float32 -> float16 -> float32 (GGML_FP32_TO_FP16 then back)."""
    return v.astype(np.float16).astype(F)


def make_qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """make_qkx2_quants over rows of `x` (m, n): (L uint8 (m, n), scale (m,), the_min (m,))."""
    m, n = x.shape
    mn, mx = x[:, 0].copy(), x[:, 0].copy()
    sum_w = w[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, n):
        mn = np.where(x[:, i] < mn, x[:, i], mn)
        mx = np.where(x[:, i] > mx, x[:, i], mx)
        sum_w = sum_w + w[:, i]
        sum_x = sum_x + w[:, i] * x[:, i]
    mn = np.where(mn > 0, F(0), mn)
    flat = mx == mn
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F(nmax) / (mx - mn)
        scale = F(1) / iscale
        L = np.clip(nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(np.uint8)
        best = np.zeros(m, F)
        for i in range(n):
            diff = scale * L[:, i].astype(F) + mn - x[:, i]
            best = best + w[:, i] * (diff * diff)
        for step in range(nstep + 1):  # a better fit moves `min`, which the next steps start from (as in C)
            iscale = (F(rmin) + F(rdelta) * F(step) + F(nmax)) / (mx - mn)
            aux = np.clip(nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)
            lf = aux.astype(F)
            sum_l, sum_l2, sum_xl = np.zeros(m, F), np.zeros(m, F), np.zeros(m, F)
            for i in range(n):
                wl = w[:, i] * lf[:, i]
                sum_l = sum_l + wl
                sum_l2 = sum_l2 + wl * lf[:, i]
                sum_xl = sum_xl + wl * x[:, i]
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, F(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            err = np.zeros(m, F)
            for i in range(n):
                diff = this_scale * lf[:, i] + this_min - x[:, i]
                err = err + w[:, i] * (diff * diff)
            take = (D > 0) & (err < best) & ~flat
            L = np.where(take[:, None], aux.astype(np.uint8), L)
            best = np.where(take, err, best)
            scale = np.where(take, this_scale, scale)
            mn = np.where(take, this_min, mn)
    L = np.where(flat[:, None], np.uint8(0), L)
    scale = np.where(flat, F(0), scale)
    return L, scale.astype(F), (-mn).astype(F)


def _kquant_scales(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """The shared part of quantize_row_q4_K_ref / q5_K_ref for blocks `x` (b, 256): (d/dmin bytes (b, 4), packed
    scales (b, 12), L (b, 256))."""
    b = x.shape[0]
    sub = x.reshape(b * 8, 32)
    sum_x2 = np.zeros(b * 8, F)
    for i in range(32):
        sum_x2 = sum_x2 + sub[:, i] * sub[:, i]
    av_x = np.sqrt(sum_x2 / F(32))
    weights = av_x[:, None] + np.abs(sub)
    L, scales, mins = make_qkx2(sub, weights, nmax, rmin, rdelta, nstep)
    L = L.reshape(b, 256)
    scales, mins = scales.reshape(b, 8), mins.reshape(b, 8)
    max_scale, max_min = np.zeros(b, F), np.zeros(b, F)
    for j in range(8):
        max_scale = np.where(scales[:, j] > max_scale, scales[:, j], max_scale)
        max_min = np.where(mins[:, j] > max_min, mins[:, j], max_min)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F(63) / max_scale, F(0))
        inv_min = np.where(max_min > 0, F(63) / max_min, F(0))
    ls = np.minimum(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    sc = np.zeros((b, 12), np.uint8)
    sc[:, 0:4] = ls[:, 0:4]
    sc[:, 4:8] = lm[:, 0:4]
    sc[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    sc[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    sc[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    hd = (max_scale / F(63)).astype(np.float16)
    hm = (max_min / F(63)).astype(np.float16)
    s_q = np.concatenate([sc[:, 0:4] & 63, (sc[:, 8:12] & 0xF) | ((sc[:, 0:4] >> 6) << 4)], axis=1)
    m_q = np.concatenate([sc[:, 4:8] & 63, (sc[:, 8:12] >> 4) | ((sc[:, 4:8] >> 6) << 4)], axis=1)
    d = hd.astype(F)[:, None] * s_q.astype(F)
    dm = hm.astype(F)[:, None] * m_q.astype(F)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = nearest_int((x.reshape(b, 8, 32) + dm[:, :, None]) / d[:, :, None])
    q = np.clip(q, 0, nmax).astype(np.uint8).reshape(b, 256)
    keep = np.repeat(d == 0, 32, axis=1)  # `if (!d) continue`: L stays as make_qkx2_quants left it
    L = np.where(keep, L, q)
    head = np.concatenate([hd.view(np.uint8).reshape(b, 2), hm.view(np.uint8).reshape(b, 2)], axis=1)
    return head, sc, L


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    b = x.shape[0]
    head, sc, L = _kquant_scales(x, 15, -1.0, 0.1, 20)
    L = L.reshape(b, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(b, 128)
    return np.concatenate([head, sc, qs], axis=1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    b = x.shape[0]
    head, sc, L = _kquant_scales(x, 31, -0.5, 0.1, 15)
    L = L.reshape(b, 4, 2, 32)
    hi = (L >> 4) & 1  # the fifth bit of sub-block 2n+k goes to qh bit 2n+k
    qh = np.zeros((b, 32), np.uint8)
    for n in range(4):
        qh |= (hi[:, n, 0] << (2 * n)) | (hi[:, n, 1] << (2 * n + 1))
    lo = L & 0xF
    qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(b, 128)
    return np.concatenate([head, sc, qh, qs], axis=1).astype(np.uint8)


def make_qx(x: np.ndarray, nmax: int):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, NULL) over rows of `x` (m, n): (L int (m, n), scale (m,))."""
    m, n = x.shape
    idx = np.argmax(np.abs(x), axis=1)
    mx = x[np.arange(m), idx]
    zero = np.abs(mx) < EPS
    w = x * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F(-nmax) / mx
        lraw = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        L = lraw + nmax
        sumlx, suml2 = np.zeros(m, F), np.zeros(m, F)
        for i in range(n):
            lf = lraw[:, i].astype(F)
            sumlx = sumlx + w[:, i] * x[:, i] * lf
            suml2 = suml2 + w[:, i] * lf * lf
        scale = np.where(suml2 != 0, sumlx / suml2, F(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(F(nmax) + F(0.1) * F(step)) / mx
            l = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
            sumlx, suml2 = np.zeros(m, F), np.zeros(m, F)
            for i in range(n):
                lf = l[:, i].astype(F)
                sumlx = sumlx + w[:, i] * x[:, i] * lf
                suml2 = suml2 + w[:, i] * lf * lf
            take = (suml2 > 0) & (sumlx * sumlx > best * suml2) & ~zero
            L = np.where(take[:, None], l + nmax, L)
            scale = np.where(take, sumlx / suml2, scale)
            best = np.where(take, scale * sumlx, best)
    L = np.where(zero[:, None], 0, L)
    scale = np.where(zero, F(0), scale)
    return L, scale.astype(F)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    b = x.shape[0]
    L, scales = make_qx(x.reshape(b * 16, 16), 32)
    L, scales = L.reshape(b, 256), scales.reshape(b, 16)
    idx = np.argmax(np.abs(scales), axis=1)
    max_scale = scales[np.arange(b), idx]
    zero = np.abs(max_scale) < EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F(-128) / max_scale
        hd = (F(1) / iscale).astype(np.float16)
        ysc = np.minimum(127, nearest_int(iscale[:, None] * scales)).astype(np.int8)
        d = hd.astype(F)[:, None] * ysc.astype(F)
        q = np.clip(nearest_int(x.reshape(b, 16, 16) / d[:, :, None]), -32, 31) + 32
    keep = np.repeat(d == 0, 16, axis=1)
    L = np.where(keep, L, q.reshape(b, 256)).astype(np.uint8).reshape(b, 2, 4, 32)
    lo, hi = L & 0xF, L >> 4
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)  # (b, 2, 64)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # (b, 2, 32)
    out = np.concatenate([ql.reshape(b, 128), qh.reshape(b, 64), ysc.view(np.uint8),
                          hd.view(np.uint8).reshape(b, 2)], axis=1).astype(np.uint8)
    out[zero] = 0
    return out


QUANTIZERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}
