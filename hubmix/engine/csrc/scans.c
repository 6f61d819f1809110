/* The library's exported helpers that are not per-method kernels: the float16 table, TIES's histograms, DARE's
   mask, the statistics' block sums, the NaN/inf scans, transposes and the scanned kernel runner. One unit of the
   library; the generated kernel units share prelude.h with it. */
#include "prelude.h"

float F16[65536];
void init_f16(void) { for (uint32_t h = 0; h < 65536; h++) F16[h] = f16_to_f32((uint16_t)h); }

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

/* DARE's drop mask for elements [start, start + n) */
void dare_keep(int64_t start, int64_t n, uint32_t s, uint32_t t, uint8_t *restrict out) {
    for (int64_t i = 0; i < n; i++) out[i] = dare_kept(start, i, s, t);
}

/* The sums of x*y per block of DOT_BLOCK elements (hubmix/methods/statistics.py, which computes the same with torch):
   each product exact in double, a block's products added as buf[i] + buf[i + h] for h = DOT_BLOCK/2, ..., 1 (a
   short last block padded with zeros). Element-wise additions in a fixed tree: the compiler may vectorize them
   (lanes are independent) but cannot regroup them (no fast-math), so every machine gets the same bits. */
#define DOT_BLOCK 4096
int64_t dot_block(void) { return DOT_BLOCK; }
void block_dots(const float *restrict x, const float *restrict y, int64_t n, double *restrict out) {
    double buf[DOT_BLOCK];
    for (int64_t i0 = 0, b = 0; i0 < n; i0 += DOT_BLOCK, b++) {
        int64_t m = n - i0 < DOT_BLOCK ? n - i0 : DOT_BLOCK;
        for (int64_t j = 0; j < m; j++) buf[j] = (double)x[i0 + j] * (double)y[i0 + j];
        for (int64_t j = m; j < DOT_BLOCK; j++) buf[j] = 0.0;
        for (int64_t h = DOT_BLOCK / 2; h >= 1; h /= 2)
            for (int64_t j = 0; j < h; j++) buf[j] += buf[j + h];
        out[b] = buf[0];
    }
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
NONFINITE(f16, u16, u16, 0x7C00u, 65535)
NONFINITE(bf16, u16, u16, 0x7F80u, 65535)
NONFINITE(f32, uint32_t, uint32_t, 0x7F800000u, 1 << 24)
NONFINITE(e4m3, uint8_t, u16, 0x7Fu, 65535)
NONFINITE(e5m2, uint8_t, u16, 0x7Cu, 65535)

/* dst (cols x rows) = the transpose of src (rows x cols), elements of 1, 2 or 4 bytes, in cache-sized tiles */
#define TRANSPOSE(w, T) void transpose_b##w(const void *restrict src, void *restrict dst, int64_t rows, \
                                            int64_t cols) { \
    const T *s = (const T *)src; T *d = (T *)dst; \
    for (int64_t i0 = 0; i0 < rows; i0 += 32) for (int64_t j0 = 0; j0 < cols; j0 += 32) { \
        int64_t i1 = i0 + 32 < rows ? i0 + 32 : rows, j1 = j0 + 32 < cols ? j0 + 32 : cols; \
        for (int64_t i = i0; i < i1; i++) for (int64_t j = j0; j < j1; j++) d[j * rows + i] = s[i * cols + j]; } }
TRANSPOSE(1, uint8_t)
TRANSPOSE(2, u16)
TRANSPOSE(4, uint32_t)

/* A kernel run step by step, each step's inputs scanned for NaN/inf just before the kernel reads them: the step's
   bytes are still in cache, so the merge reads its inputs from memory once instead of twice. Kernels are
   element-wise, so steps (multiples of F16_BLOCK) give the bytes of one call. counts[i] += input i's count. */
typedef void (*kernel_fn)(const void *, const void *, const void *, void *, int64_t, float, float, float, float);
typedef int64_t (*scan_fn)(const void *, int64_t);
#define SCAN_STEP 16384
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

/* A LoRA's delta in a fixed order (hubmix/engine/lora.py computes the same with torch): total[i][j] +=
   scale * sum_k up[i][k] * down[k][j], every product exact in double, the rank's products added in order k = 0, 1,
   ..., then the sum times scale rounded, then added to total: the same roundings in the same order on every
   machine (vectorized across j only, which changes no element's order). */
#include <stdlib.h>
#define LORA_TILE 32
int lora_delta(const float *restrict up, const float *restrict down, int64_t rows, int64_t rank, int64_t cols,
               double scale, double *restrict total) {
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j0 = 0; j0 < cols; j0 += LORA_TILE) {
            int64_t m = cols - j0 < LORA_TILE ? cols - j0 : LORA_TILE;
            double acc[LORA_TILE];
            for (int64_t j = 0; j < LORA_TILE; j++) acc[j] = 0.0;
            for (int64_t k = 0; k < rank; k++) {
                double u = (double)up[i * rank + k];
                const float *d = down + k * cols + j0;
                if (m == LORA_TILE)
                    for (int64_t j = 0; j < LORA_TILE; j++) acc[j] += u * (double)d[j];
                else
                    for (int64_t j = 0; j < m; j++) acc[j] += u * (double)d[j];
            }
            for (int64_t j = 0; j < m; j++) {
                double t = scale * acc[j];
                total[i * cols + j0 + j] += t;
            }
        }
    return 0;
}
