/* GGUF block quantization and dequantization (hubmix.formats.quant.gguf_blocks calls these through ctypes).

Q8_0, Q5_0 and Q4_0 quantize exactly as the `gguf` package's numpy code does (byte for byte); Q4_K, Q5_K and Q6_K
port llama.cpp's reference quantizers (ggml-quants.c: quantize_row_q4_K_ref, make_qkx2_quants, make_qx_quants) in
the same float32 operation order; dequantization computes what `gguf.quants.dequantize` computes. Compiled without
contraction or fast-math (native.py's flags), so every float operation rounds as the numpy fallback's does. The
searches run in 8-lane vectors (gcc/clang vector extensions, lowered to whatever SIMD the target has): Q8_0 across
a block's values, the K-quants' scale searches across sub-blocks, one sub-block per lane, so each lane does the
scalar reference's operations in its order and the bytes do not change. */
#include <stdint.h>
#include <string.h>
#include <math.h>

#define QK 32
#define QK_K 256
#define GROUP_MAX_EPS 1e-15f

static inline float g_u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t g_f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* float16 <-> float32, exact, round to nearest even (numpy's astype(float16) and ggml's GGML_FP32_TO_FP16) */
static inline float g_h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0x1F) return g_u2f(sign | 0x7F800000u | (m << 13));
    if (e == 0) { float f = (float)m * 0x1.0p-24f; return sign ? -f : f; }
    return g_u2f(sign | ((e + 112u) << 23) | (m << 13));
}
static inline uint16_t g_f2h(float f) {
    uint32_t x = g_f2u(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7FFFFFFFu;
    if (ax > 0x7F800000u) { /* NaN: numpy keeps the payload's top bits (unquieted), and a NaN stays one */
        uint16_t r = (uint16_t)(0x7C00u | ((ax & 0x7FFFFFu) >> 13));
        return (uint16_t)(sign | (r == 0x7C00u ? 0x7C01u : r));
    }
    if (ax >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u); /* rounds to >= 65520: infinity */
    if (ax < 0x38800000u) { /* a float16 subnormal (or zero): add 0.5 so the FPU rounds at 2^-24 */
        float r = g_u2f(ax) + 0.5f;
        return (uint16_t)(sign | (g_f2u(r) - 0x3F000000u));
    }
    uint32_t odd = (ax >> 13) & 1u;
    ax += 0xC8000FFFu + odd; /* rebias the exponent (-112 << 23) and round to nearest even */
    return (uint16_t)(sign | (ax >> 13));
}

static inline int nearest_int(float fval) {
    float val = fval + 12582912.f;
    int i; memcpy(&i, &val, sizeof(int));
    return (i & 0x007fffff) - 0x00400000;
}
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define MIN(a, b) ((a) < (b) ? (a) : (b))

/* ---- the simple types: the gguf package's numpy quantizers, operation for operation ---- */

/* Q8_0 in 8-lane vectors (gcc/clang vector extensions: SSE/AVX, NEON or scalar code, whatever the target has; a
   scalar loop runs at a third of the speed: gcc vectorizes neither its float max nor floorf without fast-math).
   np_roundf8 is gguf's np_roundf (half away from zero) lane by lane, checked against the scalar fabsf/floorf form
   for all 2^32 inputs: below 2^23 a float's floor is its truncation, larger values, inf and NaN are their own
   floor, and floor(2 * (a - f)) is 1 exactly when a - f >= 0.5 (a - f is exact). A block's amax skips NaN. */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
/* lane by lane m ? a : b, where m is a comparison's lanes (all ones or all zeros) */
static inline v8i seli8(v8i m, v8i a, v8i b) { return (a & m) | (b & ~m); }
static inline v8f sel8(v8i m, v8f a, v8f b) { return (v8f)seli8(m, (v8i)a, (v8i)b); }
static inline v8i clamp8(v8i l, int lo, int hi) {  /* MAX(lo, MIN(hi, l)) */
    l = seli8(l > hi, (v8i){0} + hi, l);
    return seli8(l < lo, (v8i){0} + lo, l);
}
static inline v8i np_roundf8(v8f n) {
    v8f a = (v8f)((v8u)n & 0x7FFFFFFFu);
    v8f t = __builtin_convertvector(__builtin_convertvector(a, v8i), v8f);
    v8f f = sel8(a < 8388608.0f, t, a);
    v8f b = f + (v8f)(((a - f) >= 0.5f) & 0x3F800000);  /* + 1.0f where the fraction is at least a half */
    return __builtin_convertvector((v8f)((v8i)b ^ ((n < 0.0f) & INT32_MIN)), v8i);  /* -b where n < 0 */
}

static inline v8f load8(const float *x) { v8f v; memcpy(&v, x, sizeof v); return v; }  /* any alignment */

static void q8_0(const float *x, uint8_t *y) {  /* x is read twice from L1: 1.5x faster than a copy on the stack */
    v8u m = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int k = 0; k < QK / 8; k++) {
        v8u a = (v8u)load8(x + 8 * k) & 0x7FFFFFFFu;
        a &= (v8u)(a <= 0x7F800000u);  /* NaN -> 0 */
        v8u gt = (v8u)(a > m);
        m = (a & gt) | (m & ~gt);
    }
    uint32_t mb = 0;
    for (int j = 0; j < 8; j++) mb = m[j] > mb ? m[j] : mb;
    float d = g_u2f(mb) / 127.0f, id = d == 0.0f ? 0.0f : 1.0f / d;
    uint16_t h = g_f2h(d); memcpy(y, &h, 2);
    for (int k = 0; k < QK / 8; k++) {
        v8i q = np_roundf8(load8(x + 8 * k) * id);
        for (int j = 0; j < 8; j++) y[2 + 8 * k + j] = (uint8_t)q[j];
    }
}

/* Q4_0 (nmax 8, 4 bits) and Q5_0 (16, 5 bits): d = the value of largest magnitude / -nmax */
static float q_0_scale(const float *x, float div, float *id) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < QK; j++) { float a = fabsf(x[j]); if (a > amax) { amax = a; max = x[j]; } }
    float d = max / div;
    *id = d == 0.0f ? 0.0f : 1.0f / d;
    return d;
}

static void q4_0(const float *x, uint8_t *y) {
    float id, d = q_0_scale(x, -8.0f, &id);
    uint16_t h = g_f2h(d); memcpy(y, &h, 2);
    uint8_t q[QK];
    for (int j = 0; j < QK; j++) { int v = (int)truncf(x[j] * id + 8.5f); q[j] = (uint8_t)(v > 15 ? 15 : v); }
    for (int j = 0; j < QK / 2; j++) y[2 + j] = (uint8_t)(q[j] | (q[j + 16] << 4));
}

static void q5_0(const float *x, uint8_t *y) {
    float id, d = q_0_scale(x, -16.0f, &id);
    uint16_t h = g_f2h(d); memcpy(y, &h, 2);
    uint8_t q[QK]; uint32_t qh = 0;
    for (int j = 0; j < QK; j++) {
        int v = (int)truncf(x[j] * id + 16.5f); q[j] = (uint8_t)(v > 31 ? 31 : v);
        qh |= (uint32_t)(q[j] >> 4) << j;
    }
    uint8_t b[4] = {(uint8_t)qh, (uint8_t)(qh >> 8), (uint8_t)(qh >> 16), (uint8_t)(qh >> 24)};
    memcpy(y + 2, b, 4);
    for (int j = 0; j < QK / 2; j++) y[6 + j] = (uint8_t)((q[j] & 0x0F) | (q[j + 16] << 4));
}

/* ---- K-quants: llama.cpp's reference quantizers ---- */

/* llama.cpp's make_qkx2_quants for the 8 sub-blocks of 32 values of a super-block at once, one sub-block per vector
   lane: every lane does the reference's float operations in its order (each sum runs over its own sub-block's
   values in turn, as the scalar code does), so the results are the scalar code's bits, 6x faster where 8 lanes
   are native. x holds the 256 values; L gets their codes, scales and mins the sub-blocks' (mins as the_min: -min). */
static inline v8i nearest_int8(v8f f) { v8i i = (v8i)(f + 12582912.f); return (i & 0x007fffff) - 0x00400000; }
static void make_qkx2_quants8(int nmax, const float *x, uint8_t *L, float *scales, float *mins, float rmin,
                              float rdelta, int nstep) {
    v8f xt[32], w[32], lf[32];
    v8i Lb[32], La[32];
    for (int i = 0; i < 32; ++i)
        for (int j = 0; j < 8; ++j) xt[i][j] = x[32 * j + i];
    v8f sum_x2 = {0, 0, 0, 0, 0, 0, 0, 0};  /* the weights: qk_scales' av_x + |x| */
    for (int i = 0; i < 32; ++i) sum_x2 += xt[i] * xt[i];
    v8f av_x;
    for (int j = 0; j < 8; ++j) av_x[j] = sqrtf(sum_x2[j] / 32);
    for (int i = 0; i < 32; ++i) w[i] = av_x + (v8f)((v8u)xt[i] & 0x7FFFFFFFu);
    v8f min = xt[0], max = xt[0], sum_w = w[0], sum_x = sum_w * xt[0];
    for (int i = 1; i < 32; ++i) {
        min = sel8(xt[i] < min, xt[i], min);
        max = sel8(xt[i] > max, xt[i], max);
        sum_w += w[i];
        sum_x += w[i] * xt[i];
    }
    min = sel8(min > 0, (v8f){0, 0, 0, 0, 0, 0, 0, 0}, min);
    v8i flat = max == min;  /* the scalar code returns at once there: codes 0, scale 0, its min */
    v8f flat_min = min, iscale = (float)nmax / (max - min), scale = 1.0f / iscale;
    v8f best_error = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < 32; ++i) {
        Lb[i] = clamp8(nearest_int8(iscale * (xt[i] - min)), 0, nmax);
        v8f diff = scale * __builtin_convertvector(Lb[i], v8f) + min - xt[i];
        diff = diff * diff;
        best_error += w[i] * diff;
    }
    for (int is = 0; is <= nstep; ++is) {
        float top = rmin + rdelta * is + nmax;
        iscale = top / (max - min);
        v8f sum_l = {0, 0, 0, 0, 0, 0, 0, 0}, sum_l2 = sum_l, sum_xl = sum_l;
        for (int i = 0; i < 32; ++i) {
            La[i] = clamp8(nearest_int8(iscale * (xt[i] - min)), 0, nmax);
            lf[i] = __builtin_convertvector(La[i], v8f);
            v8f wl = w[i] * lf[i];
            sum_l += wl;
            sum_l2 += wl * lf[i];
            sum_xl += wl * xt[i];
        }
        v8f D = sum_w * sum_l2 - sum_l * sum_l;
        v8f this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
        v8f this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
        v8i pos = this_min > 0;
        this_min = sel8(pos, (v8f){0, 0, 0, 0, 0, 0, 0, 0}, this_min);
        this_scale = sel8(pos, sum_xl / sum_l2, this_scale);
        v8f cur_error = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int i = 0; i < 32; ++i) {
            v8f diff = this_scale * lf[i] + this_min - xt[i];
            cur_error += w[i] * (diff * diff);
        }
        v8i better = (D > 0) & (cur_error < best_error);
        for (int i = 0; i < 32; ++i) Lb[i] = seli8(better, La[i], Lb[i]);
        best_error = sel8(better, cur_error, best_error);
        scale = sel8(better, this_scale, scale);
        min = sel8(better, this_min, min);
    }
    for (int j = 0; j < 8; ++j) {
        scales[j] = flat[j] ? 0.f : scale[j];
        mins[j] = flat[j] ? -flat_min[j] : -min[j];
        for (int i = 0; i < 32; ++i) L[32 * j + i] = flat[j] ? 0 : (uint8_t)Lb[i][j];
    }
}

static inline void get_scale_min_k4(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
    if (j < 4) {
        *d = q[j] & 63; *m = q[j + 4] & 63;
    } else {
        *d = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4));
    }
}

/* Q4_K (nmax 15) and Q5_K (nmax 31) share everything but the search range and the packing of L. Block layout:
   d, dmin (float16), scales[12], then Q5_K's qh[32], then qs[128]. */
static void qk_scales(const float *x, uint8_t *y, uint8_t *L, int nmax, float rmin, float rdelta, int nstep) {
    float mins[QK_K / 32], scales[QK_K / 32];
    float max_scale = 0, max_min = 0;
    make_qkx2_quants8(nmax, x, L, scales, mins, rmin, rdelta, nstep);
    for (int j = 0; j < QK_K / 32; ++j) {
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    uint8_t *sc = y + 4;
    for (int j = 0; j < QK_K / 32; ++j) {
        uint8_t ls = (uint8_t)nearest_int(inv_scale * scales[j]);
        uint8_t lm = (uint8_t)nearest_int(inv_min * mins[j]);
        ls = MIN(63, ls);
        lm = MIN(63, lm);
        if (j < 4) {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
            sc[j - 4] |= (uint8_t)((ls >> 4) << 6);
            sc[j - 0] |= (uint8_t)((lm >> 4) << 6);
        }
    }
    uint16_t hd = g_f2h(max_scale / 63.f), hm = g_f2h(max_min / 63.f);
    memcpy(y, &hd, 2); memcpy(y + 2, &hm, 2);
    for (int j = 0; j < QK_K / 32; ++j) {
        uint8_t s, m;
        get_scale_min_k4(j, sc, &s, &m);
        const float d = g_h2f(hd) * s;
        if (!d) continue;
        const float dm = g_h2f(hm) * m;
        for (int ii = 0; ii < 32; ++ii) {
            int l = nearest_int((x[32 * j + ii] + dm) / d);
            L[32 * j + ii] = (uint8_t)MAX(0, MIN(nmax, l));
        }
    }
}

static void q4_k(const float *x, uint8_t *y) {
    uint8_t L[QK_K];
    qk_scales(x, y, L, 15, -1.f, 0.1f, 20);
    uint8_t *q = y + 16;
    for (int j = 0; j < QK_K; j += 64) {
        for (int l = 0; l < 32; ++l) q[l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
        q += 32;
    }
}

static void q5_k(const float *x, uint8_t *y) {
    uint8_t L[QK_K];
    qk_scales(x, y, L, 31, -0.5f, 0.1f, 15);
    uint8_t *qh = y + 16, *ql = y + 48;
    memset(qh, 0, QK_K / 8);
    uint8_t m1 = 1, m2 = 2;
    for (int n = 0; n < QK_K; n += 64) {
        for (int j = 0; j < 32; ++j) {
            int l1 = L[n + j];
            if (l1 > 15) { l1 -= 16; qh[j] |= m1; }
            int l2 = L[n + j + 32];
            if (l2 > 15) { l2 -= 16; qh[j] |= m2; }
            ql[j] = (uint8_t)(l1 | (l2 << 4));
        }
        m1 <<= 2; m2 <<= 2;
        ql += 32;
    }
}

/* make_qx_quants with rmse_type 1 and no importance weights (w = x*x), as quantize_row_q6_K_ref calls it (n 16,
   nmax 32), for 8 sub-blocks at once, one per vector lane in the reference's operation order (as
   make_qkx2_quants8): x holds 128 values, L gets their codes, scales the sub-blocks' scales. */
static void make_qx_quants8(const float *x, int8_t *L, float *scales) {
    const int n = 16, nmax = 32;
    v8f xt[16], w[16], zero = {0, 0, 0, 0, 0, 0, 0, 0};
    v8i Lb[16];
    for (int i = 0; i < n; ++i)
        for (int j = 0; j < 8; ++j) xt[i][j] = x[n * j + i];
    v8f max = zero, amax = zero;
    for (int i = 0; i < n; ++i) {
        v8f ax = (v8f)((v8u)xt[i] & 0x7FFFFFFFu);
        v8i gt = ax > amax;
        amax = sel8(gt, ax, amax);
        max = sel8(gt, xt[i], max);
        w[i] = xt[i] * xt[i];
    }
    v8i flat = amax < GROUP_MAX_EPS;  /* the scalar code returns at once there: codes 0 (+nmax), scale 0 */
    v8f iscale = (float)-nmax / max, sumlx = zero, suml2 = zero;
    for (int i = 0; i < n; ++i) {
        v8i l = clamp8(nearest_int8(iscale * xt[i]), -nmax, nmax - 1);
        Lb[i] = l + nmax;
        v8f lf = __builtin_convertvector(l, v8f);
        sumlx += w[i] * xt[i] * lf;
        suml2 += w[i] * lf * lf;
    }
    v8f scale = sel8(suml2 != 0, sumlx / suml2, zero), best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        float top = -(nmax + 0.1f * is);
        iscale = top / max;
        sumlx = suml2 = zero;
        v8i la[16];
        for (int i = 0; i < n; ++i) {
            la[i] = clamp8(nearest_int8(iscale * xt[i]), -nmax, nmax - 1);
            v8f lf = __builtin_convertvector(la[i], v8f);
            sumlx += w[i] * xt[i] * lf;
            suml2 += w[i] * lf * lf;
        }
        v8i better = (suml2 > 0) & (sumlx * sumlx > best * suml2);
        for (int i = 0; i < n; ++i) Lb[i] = seli8(better, la[i] + nmax, Lb[i]);
        scale = sel8(better, sumlx / suml2, scale);
        best = sel8(better, scale * sumlx, best);
    }
    for (int j = 0; j < 8; ++j) {
        scales[j] = flat[j] ? 0.f : scale[j];
        for (int i = 0; i < n; ++i) L[n * j + i] = (int8_t)(flat[j] ? 0 : Lb[i][j]);
    }
}

/* Q6_K: ql[128], qh[64], scales[16] (int8), d (float16) */
static void q6_k(const float *x, uint8_t *y) {
    int8_t L[QK_K];
    float scales[QK_K / 16];
    float max_scale = 0, max_abs_scale = 0;
    make_qx_quants8(x, L, scales);
    make_qx_quants8(x + 128, L + 128, scales + 8);
    for (int ib = 0; ib < QK_K / 16; ++ib) {
        const float scale = scales[ib];
        const float abs_scale = fabsf(scale);
        if (abs_scale > max_abs_scale) { max_abs_scale = abs_scale; max_scale = scale; }
    }
    if (max_abs_scale < GROUP_MAX_EPS) {
        memset(y, 0, 210);
        return;
    }
    int8_t *ysc = (int8_t *)(y + 192);
    float iscale = -128.f / max_scale;
    uint16_t hd = g_f2h(1 / iscale);
    memcpy(y + 208, &hd, 2);
    for (int ib = 0; ib < QK_K / 16; ++ib) ysc[ib] = (int8_t)MIN(127, nearest_int(iscale * scales[ib]));
    for (int j = 0; j < QK_K / 16; ++j) {
        float d = g_h2f(hd) * ysc[j];
        if (!d) continue;
        for (int ii = 0; ii < 16; ++ii) {
            int l = nearest_int(x[16 * j + ii] / d);
            l = MAX(-32, MIN(31, l));
            L[16 * j + ii] = (int8_t)(l + 32);
        }
    }
    uint8_t *ql = y, *qh = y + 128;
    for (int j = 0; j < QK_K; j += 128) {
        for (int l = 0; l < 32; ++l) {
            const uint8_t q1 = L[j + l + 0] & 0xF, q2 = L[j + l + 32] & 0xF;
            const uint8_t q3 = L[j + l + 64] & 0xF, q4 = L[j + l + 96] & 0xF;
            ql[l + 0] = (uint8_t)(q1 | (q3 << 4));
            ql[l + 32] = (uint8_t)(q2 | (q4 << 4));
            qh[l] = (uint8_t)((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4)
                              | ((L[j + l + 96] >> 4) << 6));
        }
        ql += 64;
        qh += 32;
    }
}

/* ggml type ids (GGMLQuantizationType) */
enum { T_F16 = 1, T_Q4_0 = 2, T_Q5_0 = 6, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_BF16 = 30 };

/* Elements per block of a type this unit covers, and its bytes per block in *type_size; 0 for another type */
int64_t gguf_geometry(int type, int64_t *type_size) {
    switch (type) {
        case T_F16: case T_BF16: *type_size = 2; return 1;
        case T_Q8_0: *type_size = 34; return QK;
        case T_Q4_0: *type_size = 18; return QK;
        case T_Q5_0: *type_size = 22; return QK;
        case T_Q4_K: *type_size = 144; return QK_K;
        case T_Q5_K: *type_size = 176; return QK_K;
        case T_Q6_K: *type_size = 210; return QK_K;
        default: return 0;
    }
}

/* F16 (numpy's astype(float16)) and BF16 (the gguf package's BF16: NaN quieted in its own high half, then rounded
   to nearest even) of `n` floats: the writer's unquantized types, without numpy */
static int plain_store(int type, const float *x, uint8_t *y, int64_t n) {
    if (type == T_F16) {
        uint16_t *o = (uint16_t *)y;
        for (int64_t i = 0; i < n; i++) o[i] = g_f2h(x[i]);
        return 0;
    }
    uint16_t *o = (uint16_t *)y;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = g_f2u(x[i]);
        if ((u & 0x7FFFFFFFu) > 0x7F800000u) u = (u & 0xFFFF0000u) | (64u << 16);
        o[i] = (uint16_t)((u + (0x7FFFu + ((u >> 16) & 1u))) >> 16);
    }
    return 0;
}

/* `blocks` blocks of floats -> their quantized bytes; 0 on success, -1 for a type not covered here */
int gguf_quantize(int type, const float *x, uint8_t *y, int64_t blocks) {
    if (type == T_F16 || type == T_BF16) return plain_store(type, x, y, blocks);
    for (int64_t b = 0; b < blocks; b++) {
        switch (type) {
            case T_Q8_0: q8_0(x + b * QK, y + b * 34); break;
            case T_Q4_0: q4_0(x + b * QK, y + b * 18); break;
            case T_Q5_0: q5_0(x + b * QK, y + b * 22); break;
            case T_Q4_K: q4_k(x + b * QK_K, y + b * 144); break;
            case T_Q5_K: q5_k(x + b * QK_K, y + b * 176); break;
            case T_Q6_K: q6_k(x + b * QK_K, y + b * 210); break;
            default: return -1;
        }
    }
    return 0;
}

/* ---- dequantization: the gguf package's arithmetic (products in float32, in its order) ---- */

static inline float ld_h(const uint8_t *p) { uint16_t h; memcpy(&h, p, 2); return g_h2f(h); }

int gguf_dequantize(int type, const uint8_t *x, float *y, int64_t blocks) {
    for (int64_t b = 0; b < blocks; b++) {
        switch (type) {
            case T_Q8_0: {
                const uint8_t *p = x + b * 34; float d = ld_h(p), *o = y + b * QK;
                for (int j = 0; j < QK; j++) o[j] = (float)(int8_t)p[2 + j] * d;
                break;
            }
            case T_Q4_0: {
                const uint8_t *p = x + b * 18; float d = ld_h(p), *o = y + b * QK;
                for (int j = 0; j < 16; j++) {
                    o[j] = d * (float)((p[2 + j] & 0xF) - 8);
                    o[j + 16] = d * (float)((p[2 + j] >> 4) - 8);
                }
                break;
            }
            case T_Q5_0: {
                const uint8_t *p = x + b * 22; float d = ld_h(p), *o = y + b * QK;
                uint32_t qh = (uint32_t)p[2] | (uint32_t)p[3] << 8 | (uint32_t)p[4] << 16 | (uint32_t)p[5] << 24;
                for (int j = 0; j < 16; j++) {
                    int lo = (p[6 + j] & 0xF) | (int)((qh >> j) & 1) << 4;
                    int hi = (p[6 + j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
                    o[j] = d * (float)(lo - 16);
                    o[j + 16] = d * (float)(hi - 16);
                }
                break;
            }
            case T_Q4_K: case T_Q5_K: {
                int five = type == T_Q5_K;
                const uint8_t *p = x + b * (five ? 176 : 144), *qh = p + 16, *qs = p + (five ? 48 : 16);
                float d = ld_h(p), dmin = ld_h(p + 2), *o = y + b * QK_K;
                for (int j = 0; j < 8; j++) {
                    uint8_t s, m;
                    get_scale_min_k4(j, p + 4, &s, &m);
                    float ds = d * (float)s, dm = dmin * (float)m;
                    const uint8_t *q = qs + (j / 2) * 32;
                    for (int l = 0; l < 32; l++) {
                        int v = (j & 1) ? q[l] >> 4 : q[l] & 0xF;
                        if (five) v |= ((qh[l] >> j) & 1) << 4;
                        o[j * 32 + l] = ds * (float)v - dm;
                    }
                }
                break;
            }
            case T_Q6_K: {
                const uint8_t *p = x + b * 210, *ql = p, *qh = p + 128;
                const int8_t *sc = (const int8_t *)(p + 192);
                float d = ld_h(p + 208), *o = y + b * QK_K;
                for (int n = 0; n < 2; n++) {  /* two halves of 128 */
                    for (int l = 0; l < 32; l++) {
                        int q[4];
                        q[0] = (ql[n * 64 + l] & 0xF) | ((qh[n * 32 + l] >> 0) & 3) << 4;
                        q[1] = (ql[n * 64 + l + 32] & 0xF) | ((qh[n * 32 + l] >> 2) & 3) << 4;
                        q[2] = (ql[n * 64 + l] >> 4) | ((qh[n * 32 + l] >> 4) & 3) << 4;
                        q[3] = (ql[n * 64 + l + 32] >> 4) | ((qh[n * 32 + l] >> 6) & 3) << 4;
                        for (int k = 0; k < 4; k++) {
                            int idx = n * 128 + k * 32 + l;
                            o[idx] = (d * (float)sc[idx / 16]) * (float)(q[k] - 32);
                        }
                    }
                }
                break;
            }
            default: return -1;
        }
    }
    return 0;
}
