/* Quantized outputs (hubmix/formats/quant): the encoders' inner loops, byte for byte what their torch code gives.
   Compiled as a unit of its own after the merge kernels' prelude (csrc/prelude.h), whose fabs32 and st_e4m3 (float32
   -> float8_e4m3fn exactly as c10 rounds) they use; the build is the same (no contraction, no fast-math). */
#include "prelude.h"

/* The largest |x|, NaN when any x is NaN: torch's x.abs().amax(). */
float quant_amax_f32(const float *restrict x, int64_t n) {
    float m = 0.0f;
    int nan = 0;
    for (int64_t i = 0; i < n; i++) {
        float a = fabs32(x[i]);
        nan |= a != a;
        m = a > m ? a : m;
    }
    return nan ? __builtin_nanf("") : m;
}

/* Scaled fp8: (x / s).clamp_(-448, 448).to(torch.float8_e4m3fn). */
void quant_fp8_e4m3(const float *restrict x, uint8_t *restrict o, int64_t n, float s) {
    for (int64_t i = 0; i < n; i++) {
        float v = x[i] / s;
        v = v < -448.0f ? -448.0f : (v > 448.0f ? 448.0f : v);
        st_e4m3(o, i, v);
    }
}

/* The NF4 code of a value in [-1, 1]: how many of the 15 midpoints between code values lie below it
   (torch.bucketize(v, bounds), right=False; NaN -> 15, as torch's search places it last). Branch-free, so the
   loop over a block vectorizes. */
static inline uint8_t nf4_code(float v, const float *restrict bounds) {
    int k = 15 * (v != v);
    for (int t = 0; t < 15; t++)
        k += bounds[t] < v;
    return (uint8_t)k;
}

#define NF4_MAX_BLOCK 4096
/* bitsandbytes' reference quantize_4bit (NF4) of n float32 values in blocks of bs (at most 4096, even): per full
   block absmax (its max |x|) and x * (1 / max(absmax, 1e-38)); a short last block stores max(absmax, 1e-38) and
   divides by it; values clamped to [-1, 1], coded, packed two per byte with the first in the high nibble (an odd
   count padded with the code of 0). o and absmax must hold (n + 1) / 2 bytes and ceil(n / bs) floats. */
void quant_nf4(const float *restrict x, uint8_t *restrict o, float *restrict absmax, int64_t n, int64_t bs,
               const float *restrict bounds) {
    int64_t nb = n / bs, full = nb * bs;
    float v[NF4_MAX_BLOCK];
    uint8_t k[NF4_MAX_BLOCK + 1];
    for (int64_t b = 0; b * bs < n; b++) {
        const float *xb = x + b * bs;
        int64_t m = b < nb ? bs : n - full;
        float am = 0.0f;
        int nan = 0;
        for (int64_t j = 0; j < m; j++) {
            float a = fabs32(xb[j]);
            nan |= a != a;
            am = a > am ? a : am;
        }
        if (nan)
            am = __builtin_nanf("");
        float c = am < 1e-38f ? 1e-38f : am;
        if (b < nb) {
            float r = 1.0f / c;
            absmax[b] = am;
            for (int64_t j = 0; j < m; j++)
                v[j] = xb[j] * r;
        } else {
            absmax[b] = c;
            for (int64_t j = 0; j < m; j++)
                v[j] = xb[j] / c;
        }
        for (int64_t j = 0; j < m; j++) {
            float w = v[j] < -1.0f ? -1.0f : (v[j] > 1.0f ? 1.0f : v[j]);
            k[j] = nf4_code(w, bounds);
        }
        k[m] = nf4_code(0.0f, bounds);  /* the pad of an odd count */
        uint8_t *ob = o + b * bs / 2;
        for (int64_t j = 0; j < (m + 1) / 2; j++)
            ob[j] = (uint8_t)(k[2 * j] << 4 | k[2 * j + 1]);
    }
}
