/* The KV cache stored quantized: one byte per value plus one float32 scale per token and kv head.
 *
 * Layout (the torch path in attention.py writes and reads the same bytes):
 *   data   (2, num_slots, Hkv, D) int8 (format INT8) or float8 e4m3fn bits (format FP8); 0: keys, 1: values
 *   scales (2, num_slots, Hkv) float32
 *   value = q * scale, with per (token, kv head) row x: amax = max |x|, scale = amax / QMAX
 *   (127 for int8, 448 for e4m3), scale 1 when amax is 0, q = round-to-nearest-even(x / scale).
 * Decode attention reads 1 byte per cached value instead of 4; the scales are applied to the
 * q.k scores and to the softmax weights, never to the values themselves.
 */
#include <math.h>
#include <stdlib.h>

#include "attention.h"
#include "simd.h"

enum { FORMAT_INT8 = 0, FORMAT_FP8 = 1 };

/* float32 -> e4m3fn bits, rounding to nearest even like torch's conversion (|f| >= 480 -> NaN,
 * which the writer never produces: |x / scale| <= 448 up to one rounding). */
static inline uint8_t to_e4m3(float f) {
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    const uint8_t sign = (uint8_t)((b >> 24) & 0x80);
    b &= 0x7FFFFFFFu;
    if (b >= 0x43F00000u) return sign | 0x7F; /* 480.0f */
    if (b < 0x3C800000u) {                     /* below 2^-6: subnormal steps of 2^-9 */
        float a;
        memcpy(&a, &b, sizeof a);
        return sign | (uint8_t)nearbyintf(a * 512.0f);
    }
    b += 0x7FFFFu + ((b >> 20) & 1); /* round the 20 dropped mantissa bits, ties to even */
    return sign | (uint8_t)((b - (120u << 23)) >> 20); /* exponent bias 127 -> 7 */
}

/* One row of D values -> q (D bytes), returns its scale. */
static float quantize_row(const float *x, int64_t D, int format, uint8_t *q) {
    float amax = 0.0f;
    for (int64_t i = 0; i < D; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    float s = amax / (format == FORMAT_FP8 ? 448.0f : 127.0f);
    if (s == 0.0f) s = 1.0f;
    if (format == FORMAT_FP8) {
        for (int64_t i = 0; i < D; i++) q[i] = to_e4m3(x[i] / s);
    } else {
        for (int64_t i = 0; i < D; i++) {
            float r = nearbyintf(x[i] / s);
            r = r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r;
            q[i] = (uint8_t)(int8_t)r;
        }
    }
    return s;
}

/* k, v (T, Hkv * D): row t at k + t * k_stride (v likewise), each row dense, into slots[t]. */
void tureen_write_kv_quant(const float *k, int64_t k_stride, const float *v, int64_t v_stride, uint8_t *data,
                           float *scales, const int64_t *slots, int64_t T, int64_t num_slots, int64_t Hkv,
                           int64_t D, int format, int num_threads) {
    const int64_t row = Hkv * D, half_data = num_slots * row, half_scales = num_slots * Hkv;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (T > 16)
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < Hkv; h++) {
            const int64_t slot = slots[t];
            scales[slot * Hkv + h] = quantize_row(k + t * k_stride + h * D, D, format, data + slot * row + h * D);
            scales[half_scales + slot * Hkv + h] =
                quantize_row(v + t * v_stride + h * D, D, format, data + half_data + slot * row + h * D);
        }
}

/* ---- decode attention on the quantized cache ----------------------------------------------- */

#ifdef __F16C__
typedef int16_t v8s16 __attribute__((vector_size(16)));
typedef _Float16 v8h __attribute__((vector_size(16)));
#endif

/* Eight e4m3 values as floats times 2^-8 (the caller folds 256 into the scale): sign and the
 * seven exponent/mantissa bits moved into a half float's places, which F16C widens in hardware,
 * subnormals included. */
static inline v8 e4m3x8_over_256(const uint8_t *p) {
#ifdef __F16C__
    v8s16 w = (v8s16)_mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)p)); /* sign-extended */
    w = (w << 7) & (int16_t)0xBF80;
    return __builtin_convertvector((v8h)w, v8);
#else
    v8 out;
    for (int i = 0; i < 8; i++) {
        const int e = (p[i] >> 3) & 15, m = p[i] & 7;
        const float mag = e ? ldexpf(1.0f + m / 8.0f, e - 7) : ldexpf(m / 8.0f, -6);
        out[i] = (p[i] & 0x80 ? -mag : mag) / 256.0f;
    }
    return out;
#endif
}

/* rows x D quantized values (rows `stride` bytes apart) -> floats, unscaled (fp8: over 256). */
static void widen_rows(const uint8_t *src, int64_t stride, int64_t rows, int64_t D, int format, float *dst) {
    for (int64_t j = 0; j < rows; j++)
        for (int64_t d = 0; d < D; d += 8)
            store8(dst + j * D + d, format == FORMAT_FP8 ? e4m3x8_over_256(src + j * stride + d)
                                                        : __builtin_convertvector(widen_s8(src + j * stride + d), v8));
}

typedef struct {
    const uint8_t *k, *v;     /* the cache's key and value halves */
    const float *ks, *vs;     /* their scales */
    int64_t H, Hkv, D, bs;
    float scale;              /* softmax scale */
    int format;
} QDims;

typedef struct {
    float *scores, *acc, *sums, *rows, *w; /* (H, ctx), (H, D), (H), (bs, D), (bs) */
} Scratch;

/* Keys of block b (rows lo..hi) against every query head: scores = (q . k_j) * scale * s_j. */
static void block_scores(const float *q, const QDims *c, int64_t blk, int64_t lo, int64_t hi, float *scores,
                         int64_t len, int64_t pos, float *rows) {
    const int64_t G = c->H / c->Hkv, row = c->Hkv * c->D, unit = c->format == FORMAT_FP8 ? 256 : 1;
    for (int64_t hk = 0; hk < c->Hkv; hk++) {
        widen_rows(c->k + (blk * c->bs + lo) * row + hk * c->D, row, hi - lo, c->D, c->format, rows);
        for (int64_t h = hk * G; h < (hk + 1) * G; h++) {
            float *s = scores + h * len + pos;
            dot_rows(q + h * c->D, rows, c->D, hi - lo, c->D, c->scale * unit, s);
            for (int64_t j = 0; j < hi - lo; j++) s[j] *= c->ks[(blk * c->bs + lo + j) * c->Hkv + hk];
        }
    }
}

/* acc[h] += sum_j p[h, j] * v_j over block b's rows lo..hi, v_j = q_j * s_j. */
static void block_values(const QDims *c, int64_t blk, int64_t lo, int64_t hi, const float *scores, int64_t len,
                         int64_t pos, float *acc, float *rows, float *w) {
    const int64_t G = c->H / c->Hkv, row = c->Hkv * c->D, unit = c->format == FORMAT_FP8 ? 256 : 1;
    for (int64_t hk = 0; hk < c->Hkv; hk++) {
        widen_rows(c->v + (blk * c->bs + lo) * row + hk * c->D, row, hi - lo, c->D, c->format, rows);
        for (int64_t h = hk * G; h < (hk + 1) * G; h++) {
            const float *p = scores + h * len + pos;
            for (int64_t j = 0; j < hi - lo; j++) w[j] = p[j] * c->vs[(blk * c->bs + lo + j) * c->Hkv + hk] * unit;
            weighted_sum_rows(w, rows, c->D, hi - lo, c->D, acc + h * c->D);
        }
    }
}

static void attend_sequence_quant(const float *q, const QDims *c, const int64_t *table, int64_t first, int64_t ctx,
                                  float *out, Scratch s) {
    const int64_t H = c->H, D = c->D, bs = c->bs, len = ctx - first, b0 = first / bs, b1 = (ctx + bs - 1) / bs;
    const int64_t block_bytes = bs * c->Hkv * D;
    int64_t lo, hi;
    for (int64_t b = b0; b < b1; b++) {
        if (b + 1 < b1) prefetch_bytes(c->k + table[b + 1] * block_bytes, block_bytes);
        prefetch_bytes(c->v + table[b] * block_bytes, block_bytes);
        block_range(b, first, ctx, bs, &lo, &hi);
        block_scores(q, c, table[b], lo, hi, s.scores, len, b * bs + lo - first, s.rows);
    }
    for (int64_t h = 0; h < H; h++) s.sums[h] = softmax_numerators(s.scores + h * len, len);
    memset(s.acc, 0, sizeof(float) * H * D);
    for (int64_t b = b0; b < b1; b++) {
        block_range(b, first, ctx, bs, &lo, &hi);
        block_values(c, table[b], lo, hi, s.scores, len, b * bs + lo - first, s.acc, s.rows, s.w);
    }
    for (int64_t h = 0; h < H; h++) {
        const float inv = 1.0f / s.sums[h];
        for (int64_t i = 0; i < D; i++) out[h * D + i] = s.acc[h * D + i] * inv;
    }
}

/* As tureen_paged_decode_f32 (cpu_ops.c), on a quantized cache: data/scales as described at the
 * top, num_slots = num_blocks * block_size. Returns 0, or -1 when scratch could not be allocated. */
int tureen_paged_decode_quant(const float *q, int64_t q_stride, const uint8_t *data, const float *scales,
                              int64_t num_slots, const int64_t *block_tables, int64_t max_blocks,
                              const int64_t *context_lens, float *out, int64_t out_stride, int64_t n, int64_t H,
                              int64_t Hkv, int64_t D, int64_t block_size, int64_t window, float scale, int format,
                              int num_threads) {
    const QDims c = {data, data + num_slots * Hkv * D, scales, scales + num_slots * Hkv, H, Hkv, D, block_size,
                     scale, format};
    int64_t longest = 1;
    for (int64_t i = 0; i < n; i++) longest = context_lens[i] > longest ? context_lens[i] : longest;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *buf = malloc(sizeof(float) * (H * (longest + D + 1) + block_size * (D + 1)));
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            const Scratch s = {buf, buf + H * longest, buf + H * (longest + D), buf + H * (longest + D + 1),
                               buf + H * (longest + D + 1) + block_size * D};
#pragma omp for schedule(dynamic, 1)
            for (int64_t i = 0; i < n; i++) {
                const int64_t ctx = context_lens[i], first = (window > 0 && ctx > window) ? ctx - window : 0;
                if (ctx > 0)
                    attend_sequence_quant(q + i * q_stride, &c, block_tables + i * max_blocks, first, ctx,
                                          out + i * out_stride, s);
            }
        }
        free(buf);
    }
    return failed ? -1 : 0;
}
