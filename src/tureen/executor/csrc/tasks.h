/* cpu_ops.c's float32 kernels as ops of the runtime in pool.h: the same row, panel and sequence
 * functions as their OpenMP loops, so the results are bit-identical. Layouts as in cpu_ops.c. */
#ifndef TUREEN_TASKS_H
#define TUREEN_TASKS_H

#include <stdint.h>

#include "attention.h"
#include "pool.h"

/* out[t] = norm(x[t]) or, with residual, residual[t] += x[t] and out[t] = norm(residual[t]).
 * out may alias x. A task is a few rows (T and rows are set by tp_norm). */
typedef struct {
    const float *x;
    int64_t x_stride;
    float *residual;
    const float *w;
    float *out;
    int64_t N;
    float eps;
    int64_t T, rows;
} NormArgs;
TpOp tp_norm(NormArgs a, int64_t T);

/* y = x W^T (+ b), or silu(gate) * up: one op per row block (tp_linear_ops of them), one task per
 * group of panels. Returns the number of ops written to ops. */
typedef struct {
    const float *x;
    int64_t ldx;
    float *y;
    int64_t m0, m1;
    const float *packed, *bias;
    int64_t N, K;
    int32_t gate_up;
    int64_t group; /* panels a task */
} LinearArgs;
int64_t tp_linear(TpOp *ops, const float *x, int64_t ldx, float *y, int64_t M, const float *packed,
                  const float *packed_bias, int64_t N, int64_t K, int gate_up);
int64_t tp_linear_ops(int64_t M, int64_t K, int gate_up);

/* Rotary embedding on row t's q and k heads, in place, then its k and v into cache slot slots[t].
 * qkv rows are stride apart: q (H * D), k (Hkv * D), v (Hkv * D). A task is a few rows (T and rows
 * are set by tp_rope_kv). */
typedef struct {
    float *qkv;
    int64_t stride, H, Hkv, D;
    const float *cos, *sin;
    float *k_cache, *v_cache;
    const int64_t *slots;
    int64_t T, rows;
} RopeKvArgs;
TpOp tp_rope_kv(RopeKvArgs a, int64_t T);

/* Paged decode attention (tureen_paged_decode_f32), one task per sequence. longest is set by
 * tp_attention. */
typedef struct {
    const float *q;
    int64_t q_stride;
    const float *k_cache, *v_cache;
    const int64_t *block_tables;
    int64_t max_blocks;
    const int64_t *context_lens;
    float *out;
    int64_t out_stride;
    Dims dims;
    int64_t window, longest;
} AttentionArgs;
TpOp tp_attention(AttentionArgs a, int64_t n);

#endif
