/* Pieces of paged decode attention shared by the float32 kernel (cpu_ops.c) and the quantized-
 * cache kernel (kv_quant.c): softmax numerators, q.k over rows, softmax-weighted sums of rows. */
#ifndef TUREEN_ATTENTION_H
#define TUREEN_ATTENTION_H

#include "simd.h"

/* s[0:len] = exp(s - max(s)); returns the sum. */
static inline float softmax_numerators(float *s, int64_t len) {
    float m = s[0], total = 0.0f;
    for (int64_t j = 1; j < len; j++) m = s[j] > m ? s[j] : m;
    int64_t j = 0;
    v8 acc = {0};
    for (; j + 8 <= len; j += 8) {
        const v8 e = exp8(load8(s + j) - m);
        store8(s + j, e);
        acc += e;
    }
    if (j < len) {
        float tail[8] = {0};
        memcpy(tail, s + j, sizeof(float) * (len - j));
        const v8 e = exp8(load8(tail) - m);
        for (int64_t t = 0; t < len - j; t++) s[j + t] = e[t], total += e[t];
    }
    return hsum8(acc) + total;
}

/* out[j] = scale * (q . k_j) for rows k_0 .. k_{rows-1}, `stride` floats apart. Eight rows at a
 * time: eight independent accumulator chains, then one transposing reduction. */
static inline void dot_rows(const float *q, const float *k, int64_t stride, int64_t rows, int64_t D, float scale,
                     float *out) {
    int64_t j = 0;
    for (; j + 8 <= rows; j += 8) {
        const float *r = k + j * stride;
        v8 a[8] = {{0}};
        for (int64_t d = 0; d < D; d += 8) {
            const v8 qv = load8(q + d);
            for (int i = 0; i < 8; i++) a[i] += qv * load8(r + i * stride + d);
        }
        store8(out + j, hsum8x8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]) * scale);
    }
    for (; j < rows; j++) {
        v8 a = {0};
        for (int64_t d = 0; d < D; d += 8) a += load8(q + d) * load8(k + j * stride + d);
        out[j] = hsum8(a) * scale;
    }
}

/* acc[0:D] += sum_j w[j] * v_j. 64 columns at a time stay in eight registers across the rows. */
static inline void weighted_sum_rows(const float *w, const float *v, int64_t stride, int64_t rows, int64_t D,
                              float *acc) {
    int64_t d = 0;
    for (; d + 64 <= D; d += 64) {
        v8 a[8];
        for (int c = 0; c < 8; c++) a[c] = load8(acc + d + 8 * c);
        for (int64_t j = 0; j < rows; j++) {
            const float *row = v + j * stride + d;
            for (int c = 0; c < 8; c++) a[c] += w[j] * load8(row + 8 * c);
        }
        for (int c = 0; c < 8; c++) store8(acc + d + 8 * c, a[c]);
    }
    for (; d < D; d += 8) {
        v8 a = load8(acc + d);
        for (int64_t j = 0; j < rows; j++) a += w[j] * load8(v + j * stride + d);
        store8(acc + d, a);
    }
}

static inline void prefetch_bytes(const void *p, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch((const char *)p + i, 0, 3); /* one line each */
}

static inline void prefetch_block(const float *p, int64_t floats) { prefetch_bytes(p, floats * (int64_t)sizeof(float)); }

typedef struct {
    int64_t H, Hkv, D, bs;
    float scale;
} Dims;

/* Rows [lo, hi) of block b hold the visible positions b * bs + lo .. b * bs + hi - 1. */
static inline void block_range(int64_t b, int64_t first, int64_t ctx, int64_t bs, int64_t *lo, int64_t *hi) {
    *lo = first > b * bs ? first - b * bs : 0;
    *hi = ctx < (b + 1) * bs ? ctx - b * bs : bs;
}

#endif
