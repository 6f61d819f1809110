/* Quantized outputs (hubmix/formats/quant): the encoders' inner loops, byte for byte what their torch code gives.
   Compiled after the merge kernels' prelude (hubmix/engine/native_source.py), whose fabs32 and st_e4m3 (float32
   -> float8_e4m3fn exactly as c10 rounds) they use; the build is the same (no contraction, no fast-math). */

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
   (torch.bucketize(v, bounds), right=False; NaN -> 15, as torch's search places it last). */
static inline uint8_t nf4_code(float v, const float *restrict bounds) {
    uint8_t k = 0;
    if (v != v)
        return 15;
    for (int t = 0; t < 15; t++)
        k += bounds[t] < v;
    return k;
}

/* bitsandbytes' reference quantize_4bit (NF4) of n float32 values in blocks of bs: per full block absmax (its max
   |x|) and x * (1 / max(absmax, 1e-38)); a short last block stores max(absmax, 1e-38) and divides by it; values
   clamped to [-1, 1], coded, packed two per byte with the first in the high nibble (an odd count padded with the
   code of 0). o and absmax must hold (n + 1) / 2 bytes and ceil(n / bs) floats. */
void quant_nf4(const float *restrict x, uint8_t *restrict o, float *restrict absmax, int64_t n, int64_t bs,
               const float *restrict bounds) {
    int64_t nb = n / bs, full = nb * bs;
    for (int64_t b = 0; b * bs < n; b++) {
        int64_t i0 = b * bs, m = b < nb ? bs : n - full;
        float am = 0.0f;
        int nan = 0;
        for (int64_t j = 0; j < m; j++) {
            float a = fabs32(x[i0 + j]);
            nan |= a != a;
            am = a > am ? a : am;
        }
        if (nan)
            am = __builtin_nanf("");
        float c = am < 1e-38f ? 1e-38f : am;
        float r = 1.0f / c;
        absmax[b] = b < nb ? am : c;
        for (int64_t j = 0; j < m; j++) {
            float v = b < nb ? x[i0 + j] * r : x[i0 + j] / c;
            v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
            uint8_t k = nf4_code(v, bounds);
            int64_t i = i0 + j;
            if (i & 1)
                o[i >> 1] |= k;
            else
                o[i >> 1] = (uint8_t)(k << 4);
        }
    }
    if (n & 1)
        o[n >> 1] |= nf4_code(0.0f, bounds);
}
