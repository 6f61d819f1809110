/* Quantized outputs (hubmix/formats/quant): the encoders' inner loops, byte for byte what their torch code gives.
   Compiled as a unit of its own after the merge kernels' prelude (csrc/prelude.h), whose st_e4m3 (float32
   -> float8_e4m3fn exactly as c10 rounds) they use; the build is the same (no contraction, no fast-math). */
#include "prelude.h"

typedef uint32_t __attribute__((may_alias)) bits32;  /* float32 data read as its bits */

/* The largest |x| of n floats given as their bits: the bits of |x| order as their values, NaNs above +inf, so an
   integer max (which vectorizes; a float max reduction does not without fast-math) finds it. */
static inline uint32_t abs_bits_max(const bits32 *restrict x, int64_t n, uint32_t m) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t a = x[i] & 0x7FFFFFFFu;
        m = a > m ? a : m;
    }
    return m;
}
static inline float bits_amax(uint32_t m) { return m > 0x7F800000u ? __builtin_nanf("") : u2f(m); }

/* The largest |x|, NaN when any x is NaN: torch's x.abs().amax(). */
float quant_amax_f32(const float *restrict x, int64_t n) { return bits_amax(abs_bits_max((const bits32 *)x, n, 0)); }

/* Scaled fp8, (x / s).clamp_(-448, 448).to(torch.float8_e4m3fn) (e4m3_bits saturates: the clamp is its own), of
   n <= STEP floats given as their bits in t, which gets the codes: 32-bit codes first, then bytes, in two loops
   (one loop that narrows as it goes runs 2x slower: gcc then spills its registers). */
#define STEP 4096
static inline void fp8_scaled(bits32 *restrict t, uint8_t *restrict o, int64_t n, float s) {
    for (int64_t i = 0; i < n; i++)
        t[i] = e4m3_bits(u2f(t[i]) / s);
    for (int64_t i = 0; i < n; i++)
        o[i] = (uint8_t)t[i];
}
void quant_fp8_e4m3(const float *restrict x, uint8_t *restrict o, int64_t n, float s) {
    float t[STEP];
    for (int64_t i0 = 0; i0 < n; i0 += STEP) {
        int64_t m = n - i0 < STEP ? n - i0 : STEP;
        memcpy(t, x + i0, (size_t)m * 4);
        fp8_scaled((bits32 *)t, o + i0, m, s);
    }
}

/* A merge kernel (hubmix.engine.native's generated K or, with dare, KD functions) run step by step over n elements,
   in one pass over its inputs, never storing a float32 chunk in memory:
   - an input whose packed[i] is a ggml type id is GGUF blocks (the mapped file's bytes), dequantized step by step
     into a float32 buffer on the stack (the kernel is then the float32 one); the others are read in place;
   - with scan, each step's inputs are counted for NaN/inf first (counts[i] += input i's, as `scanned` does);
   - the kernel's results go by `store`: STORE_PLAIN, into o in the kernel's output dtype (out_size bytes each);
     else as float32 to a step buffer, then reduced to their amax (STORE_AMAX, returned; o unused), encoded as
     scaled fp8 of x / s (STORE_FP8), or as the blocks of the ggml type `store` (gguf_quantize).
   n and every step are whole blocks of each packed and stored type (the engine's chunks start at multiples of 4096,
   a multiple of every block size). Returns -1 for a type the GGUF unit does not cover. */
typedef void (*kernel_k)(const void *, const void *, const void *, void *, int64_t, float, float, float, float);
typedef void (*kernel_kd)(const void *, const void *, const void *, void *, int64_t, int64_t, uint32_t, uint32_t,
                          uint32_t, float, float);
typedef int64_t (*scan_fn)(const void *, int64_t);
int gguf_quantize(int type, const float *x, uint8_t *y, int64_t blocks);
int gguf_dequantize(int type, const uint8_t *x, float *y, int64_t blocks);
int64_t gguf_geometry(int type, int64_t *type_size);
enum { STORE_PLAIN = -3, STORE_AMAX = -2, STORE_FP8 = -1 };
float fused_run(void *kernel, int32_t dare, void *scan, int32_t inputs, int32_t in_size, int32_t out_size,
                const void *a, const void *b, const void *c, const int32_t *packed, uint8_t *o, int32_t store,
                int64_t n, float k1, float k2, float k3, float k4, int64_t start, uint32_t s1, uint32_t s2,
                uint32_t t, float s, int64_t *counts) {
    const char *x[3] = {(const char *)a, (const char *)b, (const char *)c};
    float buf[STEP];  /* the kernel's float32 results */
    float in[3][STEP];  /* packed inputs' values */
    int64_t bs[3] = {1, 1, 1}, ts[3] = {0, 0, 0}, obs = 1, ots = 0;
    for (int i = 0; i < inputs; i++)
        if (packed[i] && (bs[i] = gguf_geometry(packed[i], &ts[i])) <= 0) return -1.0f;
    if (store > 0 && (obs = gguf_geometry(store, &ots)) <= 0) return -1.0f;
    uint32_t m = 0;
    for (int64_t i0 = 0; i0 < n; i0 += STEP) {
        int64_t len = n - i0 < STEP ? n - i0 : STEP;
        const void *p[3] = {0, 0, 0};
        for (int i = 0; i < inputs; i++) {
            if (packed[i]) {
                gguf_dequantize(packed[i], (const uint8_t *)x[i] + i0 / bs[i] * ts[i], in[i], len / bs[i]);
                p[i] = in[i];
            } else {
                p[i] = x[i] + i0 * in_size;
            }
            if (scan) counts[i] += ((scan_fn)scan)(p[i], len);
        }
        void *dest = store == STORE_PLAIN ? (void *)(o + i0 * out_size) : (void *)buf;
        if (dare)
            ((kernel_kd)kernel)(p[0], p[1], p[2], dest, len, start + i0, s1, s2, t, k1, k2);
        else
            ((kernel_k)kernel)(p[0], p[1], p[2], dest, len, k1, k2, k3, k4);
        if (store == STORE_AMAX)
            m = abs_bits_max((const bits32 *)buf, len, m);
        else if (store == STORE_FP8)
            fp8_scaled((bits32 *)buf, o + i0, len, s);
        else if (store > 0)
            gguf_quantize(store, buf, o + i0 / obs * ots, len / obs);
    }
    return store == STORE_AMAX ? bits_amax(m) : 0.0f;
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
        float am = bits_amax(abs_bits_max((const bits32 *)xb, m, 0));
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
