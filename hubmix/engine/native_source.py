"""The C prelude of the native kernels (hubmix.engine.native generates the kernels themselves after it): exact
conversions between float32 and every storage dtype, the helpers of the methods' bodies, and scans the engine calls
directly. Kept apart from native.py only for size; its text is part of the library's cache key.
"""

PRELUDE = r"""
#include <stdint.h>
#include <string.h>
typedef uint16_t u16;
/* float16 <-> float32 with integer and float operations only (the FP16 library's method, which c10::Half
   uses too): exact, round to nearest even, and unlike the compiler's _Float16 it vectorizes */
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float fabs32(float x) { return __builtin_fabsf(x); }
static inline float f16_to_f32(uint16_t h) {
    uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    float normalized = u2f((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    float denormalized = u2f((two_w >> 17) | (126u << 23)) - 0.5f;
    return u2f(sign | (two_w < (1u << 27) ? f2u(denormalized) : f2u(normalized)));
}
/* Loads go through a 256 KiB table of those exact values (filled once by init_f16 when the library loads): on
   CPUs whose vector float ops are slow a gather from L2 is about 4x faster than the arithmetic per element. */
#ifdef HUBMIX_PART /* the library is compiled in parts (in parallel); the first defines what is exported once */
extern float F16[65536];
#else
float F16[65536];
void init_f16(void) { for (uint32_t h = 0; h < 65536; h++) F16[h] = f16_to_f32((uint16_t)h); }
#endif
static inline float ld_f16(const void *p, int64_t i) { return F16[((const u16 *)p)[i]]; }
#ifdef __F16C__
#include <immintrin.h>
/* Where the compiler targets F16C, its conversion gives the table's values (exact; a signalling NaN comes back
   quiet with its payload, as the table's multiply makes it) 2-3x faster. gcc vectorizes no scalar half conversion
   (_cvtsh_ss, _Float16), so f16 kernels convert 64 elements of each input, 8 per instruction, into buffers that
   their element loop reads as float32 (64 measured fastest here: 32 to 1024 are within 2x). */
#define F16_BLOCK 64
static inline void ld_f16_block(float *restrict d, const void *restrict p, int64_t i0, int64_t m) {
    const u16 *s = (const u16 *)p + i0; int64_t j = 0;
    for (; j + 8 <= m; j += 8) _mm256_storeu_ps(d + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + j))));
    for (; j < m; j++) d[j] = _cvtsh_ss(s[j]);
}
#endif
/* Written so that it vectorizes: gcc moves a float arm of ?: into a branch (trapping math forbids speculating it),
   so NaN is a mask and the FP16 library's f < 0 ? -f : f is fabs. The same bits for all 2^32 inputs (checked
   exhaustively): a zero's or NaN's sign there is lost in the add below or masked out. */
static inline void st_f16(void *p, int64_t i, float f) {
    float base = fabs32(f) * 0x1.0p+112f * 0x1.0p-110f;
    uint32_t w = f2u(f), shl1_w = w + w, sign = w & 0x80000000u, bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = u2f((bias >> 1) + 0x07800000u) + base;
    uint32_t bits = f2u(base), exp_bits = (bits >> 13) & 0x00007C00u, mant = bits & 0x00000FFFu;
    uint32_t nan = 0u - (uint32_t)(shl1_w > 0xFF000000u);
    ((u16 *)p)[i] = (u16)((sign >> 16) | (nan & 0x7E00u) | (~nan & (exp_bits + mant)));
}
/* bfloat16 <-> float32 exactly as c10::BFloat16 (round to nearest even, NaN -> 0x7FC0) */
static inline float ld_bf16(const void *p, int64_t i) { uint32_t u = (uint32_t)((const u16 *)p)[i] << 16; float f; memcpy(&f, &u, 4); return f; }
static inline void st_bf16(void *p, int64_t i, float f) {
    uint32_t u; memcpy(&u, &f, 4);
    ((u16 *)p)[i] = (f != f) ? (u16)0x7FC0 : (u16)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
static inline float ld_f32(const void *p, int64_t i) { return ((const float *)p)[i]; }
static inline void st_f32(void *p, int64_t i, float f) { ((float *)p)[i] = f; }
/* fp8 -> float32: 256-entry tables of torch's own float32 bits (exact by construction, NaN payloads included) */
static const uint32_t E4M3[256] = {%E4M3%};
static const uint32_t E5M2[256] = {%E5M2%};
static inline float ld_e4m3(const void *p, int64_t i) { return u2f(E4M3[((const uint8_t *)p)[i]]); }
static inline float ld_e5m2(const void *p, int64_t i) { return u2f(E5M2[((const uint8_t *)p)[i]]); }
/* float32 -> fp8 exactly as c10 (round to nearest even; e4m3fn saturates to 448, NaN -> 0x7F; e5m2 overflows to
   infinity) */
static inline void st_e4m3(void *p, int64_t i, float f) {
    uint32_t b = f2u(f), sign = b & 0x80000000u; uint8_t r;
    b ^= sign;
    if (b >= (1087u << 20)) r = b > 0x7F800000u ? 0x7F : 0x7E;
    else if (b < (121u << 23)) r = (uint8_t)(f2u(u2f(b) + u2f(141u << 23)) - (141u << 23));
    else { uint32_t odd = (b >> 20) & 1u; b += ((uint32_t)(7 - 127) << 23) + 0x7FFFFu; b += odd;
           r = (uint8_t)(b >> 20); if (r == 0x7F) r = 0x7E; }
    ((uint8_t *)p)[i] = r | (uint8_t)(sign >> 24);
}
static inline void st_e5m2(void *p, int64_t i, float f) {
    uint32_t b = f2u(f), sign = b & 0x80000000u; uint8_t r;
    b ^= sign;
    if (b >= (143u << 23)) r = b > (255u << 23) ? 0x7F : 0x7C;
    else if (b < (113u << 23)) r = (uint8_t)(f2u(u2f(b) + u2f(134u << 23)) - (134u << 23));
    else { uint32_t odd = (b >> 21) & 1u; b += ((uint32_t)(15 - 127) << 23) + 0xFFFFFu; b += odd;
           r = (uint8_t)(b >> 21); }
    ((uint8_t *)p)[i] = r | (uint8_t)(sign >> 24);
}
/* torch.nan_to_num: NaN -> 0, +-inf -> +-FLT_MAX */
static inline float nan_to_num32(float x) {
    return x != x ? 0.0f : (x > 3.40282347e+38f ? 3.40282347e+38f : (x < -3.40282347e+38f ? -3.40282347e+38f : x));
}
/* DARE's drop mask (hubmix/methods/dropmask.py): lowbias32, counter-based */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; return x ^ (x >> 16);
}
#ifndef HUBMIX_PART
/* TIES's top-k threshold (hubmix/methods/statistics.py): histograms of the bits of |x - base| in float32 */
void hist_high(const float *restrict x, const float *restrict base, int64_t n, int64_t *restrict hist) {
    for (int64_t i = 0; i < n; i++) hist[f2u(fabs32(x[i] - base[i])) >> 16]++;
}
void hist_low(const float *restrict x, const float *restrict base, int64_t n, uint32_t high, int64_t *restrict hist) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = f2u(fabs32(x[i] - base[i]));
        if ((u >> 16) == high) hist[u & 0xFFFFu]++;
    }
}
#endif
static inline int dare_kept(int64_t start, int64_t i, uint32_t s, uint32_t t) {
    uint64_t j = (uint64_t)(start + i);
    return mix32(mix32((uint32_t)j ^ mix32(s ^ (uint32_t)(j >> 32))) ^ s) >= t;
}
#ifndef HUBMIX_PART
void dare_keep(int64_t start, int64_t n, uint32_t s, uint32_t t, uint8_t *restrict out) {
    for (int64_t i = 0; i < n; i++) out[i] = dare_kept(start, i, s, t);
}
#endif
static inline float sgn32(float x) { return (float)((x > 0.0f) - (x < 0.0f)); }
/* TIES's sign election and disjoint mean of two task vectors (task_vectors._elect) */
static inline float elect2(float u1, float u2) {
    float s = sgn32(u1 + u2);
    int g1 = sgn32(u1) == s, g2 = sgn32(u2) == s;
    float sum = (g1 ? u1 : 0.0f) + (g2 ? u2 : 0.0f);
    float cnt = (float)g1 + (float)g2;
    return cnt > 0.0f ? sum / (cnt < 1.0f ? 1.0f : cnt) : 0.0f;
}
/* NaN/inf elements (exponent bits all ones) of a stored view, for the merge's warnings: integer compares summed in
   16-bit (32-bit for f32) lanes over blocks too short to overflow them, which gcc vectorizes (5x a plain int64 sum) */
#define NONFINITE(t, T, C, MASK, BLOCK) int64_t nonfinite_##t(const void *p, int64_t n) { \
    const T *x = (const T *)p; int64_t total = 0; \
    for (int64_t i0 = 0; i0 < n; i0 += BLOCK) { \
        int64_t m = n - i0 < BLOCK ? n - i0 : BLOCK; C c = 0; \
        for (int64_t j = 0; j < m; j++) c += (C)((x[i0 + j] & MASK) == MASK); \
        total += c; } \
    return total; }
#ifndef HUBMIX_PART
NONFINITE(f16, u16, u16, 0x7C00u, 65535)
NONFINITE(bf16, u16, u16, 0x7F80u, 65535)
NONFINITE(f32, uint32_t, uint32_t, 0x7F800000u, 1 << 24)
NONFINITE(e4m3, uint8_t, u16, 0x7Fu, 65535)
NONFINITE(e5m2, uint8_t, u16, 0x7Cu, 65535)
#endif
#define KD const void *restrict a, const void *restrict b, const void *restrict c, void *restrict o, int64_t n, \
           int64_t start, uint32_t s1, uint32_t s2, uint32_t t, float k1, float k2
#define K const void *restrict a, const void *restrict b, const void *restrict c, void *restrict o, int64_t n, \
          float k1, float k2, float k3, float k4
/* dst (cols x rows) = the transpose of src (rows x cols), elements of 1, 2 or 4 bytes, in cache-sized tiles */
#define TRANSPOSE(w, T) void transpose_b##w(const void *restrict src, void *restrict dst, int64_t rows, \
                                            int64_t cols) { \
    const T *s = (const T *)src; T *d = (T *)dst; \
    for (int64_t i0 = 0; i0 < rows; i0 += 32) for (int64_t j0 = 0; j0 < cols; j0 += 32) { \
        int64_t i1 = i0 + 32 < rows ? i0 + 32 : rows, j1 = j0 + 32 < cols ? j0 + 32 : cols; \
        for (int64_t i = i0; i < i1; i++) for (int64_t j = j0; j < j1; j++) d[j * rows + i] = s[i * cols + j]; } }
#ifndef HUBMIX_PART
TRANSPOSE(1, uint8_t)
TRANSPOSE(2, u16)
TRANSPOSE(4, uint32_t)
#endif
/* A kernel run step by step, each step's inputs scanned for NaN/inf just before the kernel reads them: the step's
   bytes are still in cache, so the merge reads its inputs from memory once instead of twice. Kernels are
   element-wise, so steps (multiples of F16_BLOCK) give the bytes of one call. counts[i] += input i's count. */
typedef void (*kernel_fn)(const void *, const void *, const void *, void *, int64_t, float, float, float, float);
typedef int64_t (*scan_fn)(const void *, int64_t);
#define SCAN_STEP 16384
#ifndef HUBMIX_PART
void scanned(void *kernel, void *scan, int32_t inputs, int32_t in_size, int32_t out_size, const void *a,
             const void *b, const void *c, void *o, int64_t n, float k1, float k2, float k3, float k4,
             int64_t *counts) {
    const char *x[3] = {(const char *)a, (const char *)b, (const char *)c};
    for (int64_t s = 0; s < n; s += SCAN_STEP) {
        int64_t m = n - s < SCAN_STEP ? n - s : SCAN_STEP;
        for (int i = 0; i < inputs; i++) counts[i] += ((scan_fn)scan)(x[i] + s * in_size, m);
        ((kernel_fn)kernel)(inputs > 0 ? x[0] + s * in_size : 0, inputs > 1 ? x[1] + s * in_size : 0,
                            inputs > 2 ? x[2] + s * in_size : 0, (char *)o + s * out_size, m, k1, k2, k3, k4);
    }
}
#endif
"""
