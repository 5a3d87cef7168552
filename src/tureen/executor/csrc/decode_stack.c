/* The whole decoder stack of one decode step in one call: every layer's norms, projections,
 * rotary embedding, KV-cache write and paged attention, for n single-token rows.
 *
 * The module path (models/layers.py) makes about ten Python-level calls per layer, each a ctypes
 * round trip with its argument checks; at batch 1 on a small model that is a large share of the
 * step. Here Python makes one call per step. The work is the very same kernels in the very same
 * order (cpu_ops.c, quant_linear.c), so the hidden states are bit-identical to the module path.
 *
 * Per layer, with h the layer input (the embeddings' norm input for layer 0) and r the residual:
 *   layer 0: r = h (the caller passes the embeddings in r), x = norm_in(r)
 *   else:    r += h, x = norm_in(r)
 *   qkv = x Wqkv^T; rope on q and k in place; write k, v to the cache; a = attention(q)
 *   h = a Wo^T; r += h, h = norm_post(r); m = silu(h Wg^T) * (h Wu^T); h = m Wd^T
 * and after the last layer: r += h, h = norm_final(r), and with an LM head, logits = h W_lm^T.
 * Layouts as in the kernels' own comments.
 *
 * Two runtimes run the same kernels: OpenMP (a parallel region per kernel) or pool.h, which runs
 * the whole step as one program and does not wait for a thread that another process has taken the
 * core of. Both give the same bits.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tasks.h"

void tureen_rms_norm_f32(const float *x, int64_t x_stride, float *residual, const float *w, float *out, int64_t T,
                         int64_t N, float eps, int num_threads);
void tureen_rope_f32(float *x, int64_t row_stride, int64_t T, int64_t heads, int64_t D, const float *cos,
                     const float *sin, int num_threads);
void tureen_write_kv_f32(const float *k, int64_t k_stride, const float *v, int64_t v_stride, float *k_cache,
                         float *v_cache, const int64_t *slots, int64_t T, int64_t row, int num_threads);
int tureen_paged_decode_f32(const float *q, int64_t q_stride, const float *k_cache, const float *v_cache,
                            const int64_t *block_tables, int64_t max_blocks, const int64_t *context_lens, float *out,
                            int64_t out_stride, int64_t n, int64_t H, int64_t Hkv, int64_t D, int64_t block_size,
                            int64_t window, float scale, int num_threads);
void tureen_linear_f32(const float *x, int64_t ldx, float *y, int64_t M, const float *packed,
                       const float *packed_bias, int64_t N, int64_t K, int gate_up, int num_threads);
int tureen_linear_quant(const float *x, int64_t ldx, float *y, int64_t M, const uint8_t *qweight, const float *params,
                        const float *bias, int64_t N, int64_t K, int64_t group, int bits, int has_zero, int gate_up,
                        int num_threads);

/* One packed linear weight: bits 32 (cpu_ops.c panels, params NULL) or 8 / 4 (quant_linear.c). */
typedef struct {
    const void *weight;
    const float *params;
    const float *bias;
    int64_t rows, in_features, group;
    int32_t bits, has_zero, gate_up, pad;
} TureenLinear;

typedef struct {
    const float *input_norm, *post_norm; /* (hidden,) */
    TureenLinear qkv, o, gate_up, down;
    float *k_cache, *v_cache; /* (num_blocks, block_size, Hkv, D) float32 each */
    int64_t window;           /* sliding window, 0 for full attention */
} TureenLayer;

typedef struct {
    int64_t num_layers, n, hidden, H, Hkv, D, I, block_size, max_blocks;
    float eps, scale;
    const float *final_norm;                           /* (hidden,) */
    const float *cos, *sin;                            /* (n, D) */
    const int64_t *slots, *block_tables, *context_lens; /* (n,), (n, max_blocks), (n,) */
    float *residual; /* (n, hidden): the embeddings in, the residual stream out */
    float *h;        /* (n, hidden): the final normalised hidden states out */
    float *x, *qkv, *attn, *act; /* scratch: (n, hidden), (n, (H + 2 Hkv) D), (n, H D), (n, I) */
    int64_t *layer_wall_ns, *layer_cpu_ns; /* (num_layers + 1,) each, or NULL: per-layer times, then the LM head's */
    int64_t runtime; /* RUNTIME_OPENMP, or RUNTIME_POOL (pool.h; float32 weights only) */
    TureenLinear lm_head; /* weight NULL: no LM head in this call */
    float *logits;        /* (n, lm_head.rows) */
} TureenDecodeStep;

enum { RUNTIME_OPENMP = 0, RUNTIME_POOL = 1 };

/* y (M, out) = x (M, K, rows ldx apart) times one packed weight. Returns 0, or -1 (no scratch). */
static int run_linear(const TureenLinear *w, const float *x, int64_t ldx, float *y, int64_t M, int nt) {
    if (w->bits == 32) {
        tureen_linear_f32(x, ldx, y, M, (const float *)w->weight, w->bias, w->rows, w->in_features, w->gate_up, nt);
        return 0;
    }
    return tureen_linear_quant(x, ldx, y, M, (const uint8_t *)w->weight, w->params, w->bias, w->rows, w->in_features,
                               w->group, w->bits, w->has_zero, w->gate_up, nt);
}

static int64_t now_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int run_layer(const TureenDecodeStep *s, const TureenLayer *L, int first, int nt) {
    const int64_t n = s->n, hd = s->H * s->D, kvd = s->Hkv * s->D, qkv_w = hd + 2 * kvd;
    if (first)
        tureen_rms_norm_f32(s->residual, s->hidden, 0, L->input_norm, s->x, n, s->hidden, s->eps, nt);
    else
        tureen_rms_norm_f32(s->h, s->hidden, s->residual, L->input_norm, s->x, n, s->hidden, s->eps, nt);
    if (run_linear(&L->qkv, s->x, s->hidden, s->qkv, n, nt)) return -1;
    tureen_rope_f32(s->qkv, qkv_w, n, s->H + s->Hkv, s->D, s->cos, s->sin, nt);
    tureen_write_kv_f32(s->qkv + hd, qkv_w, s->qkv + hd + kvd, qkv_w, L->k_cache, L->v_cache, s->slots, n, kvd, nt);
    if (tureen_paged_decode_f32(s->qkv, qkv_w, L->k_cache, L->v_cache, s->block_tables, s->max_blocks,
                                s->context_lens, s->attn, hd, n, s->H, s->Hkv, s->D, s->block_size, L->window,
                                s->scale, nt))
        return -1;
    if (run_linear(&L->o, s->attn, hd, s->h, n, nt)) return -1;
    tureen_rms_norm_f32(s->h, s->hidden, s->residual, L->post_norm, s->h, n, s->hidden, s->eps, nt);
    if (run_linear(&L->gate_up, s->h, s->hidden, s->act, n, nt)) return -1;
    return run_linear(&L->down, s->act, s->I, s->h, n, nt);
}

/* ---- the same step as a program of pool.h ops ---------------------------------------------- */

static int64_t add_linear(TpOp *ops, const TureenLinear *w, const float *x, int64_t ldx, float *y, int64_t n) {
    return tp_linear(ops, x, ldx, y, n, (const float *)w->weight, w->bias, w->rows, w->in_features, w->gate_up);
}

static int64_t layer_ops(const TureenDecodeStep *s, const TureenLayer *L, int first, TpOp *ops) {
    const int64_t n = s->n, hd = s->H * s->D, kvd = s->Hkv * s->D, qkv_w = hd + 2 * kvd;
    int64_t k = 0;
    ops[k++] = first ? tp_norm((NormArgs){s->residual, s->hidden, 0, L->input_norm, s->x, s->hidden, s->eps, 0, 0}, n)
                     : tp_norm((NormArgs){s->h, s->hidden, s->residual, L->input_norm, s->x, s->hidden, s->eps, 0, 0}, n);
    k += add_linear(ops + k, &L->qkv, s->x, s->hidden, s->qkv, n);
    ops[k++] = tp_rope_kv((RopeKvArgs){s->qkv, qkv_w, s->H, s->Hkv, s->D, s->cos, s->sin, L->k_cache, L->v_cache,
                                       s->slots, 0, 0}, n);
    const Dims dims = {s->H, s->Hkv, s->D, s->block_size, s->scale};
    ops[k++] = tp_attention((AttentionArgs){s->qkv, qkv_w, L->k_cache, L->v_cache, s->block_tables, s->max_blocks,
                                            s->context_lens, s->attn, hd, dims, L->window, 0}, n);
    k += add_linear(ops + k, &L->o, s->attn, hd, s->h, n);
    ops[k++] = tp_norm((NormArgs){s->h, s->hidden, s->residual, L->post_norm, s->h, s->hidden, s->eps, 0, 0}, n);
    k += add_linear(ops + k, &L->gate_up, s->h, s->hidden, s->act, n);
    k += add_linear(ops + k, &L->down, s->act, s->I, s->h, n);
    return k;
}

static int64_t max_layer_ops(const TureenDecodeStep *s, const TureenLayer *L) {
    return 4 + tp_linear_ops(s->n, L->qkv.in_features, 0) + tp_linear_ops(s->n, L->o.in_features, 0) +
           tp_linear_ops(s->n, L->gate_up.in_features, 1) + tp_linear_ops(s->n, L->down.in_features, 0);
}

static int pool_usable(const TureenDecodeStep *s, const TureenLayer *layers) {
    if (s->runtime != RUNTIME_POOL || (s->lm_head.weight && s->lm_head.bits != 32)) return 0;
    for (int64_t l = 0; l < s->num_layers; l++) {
        const TureenLayer *L = layers + l;
        if (L->qkv.bits != 32 || L->o.bits != 32 || L->gate_up.bits != 32 || L->down.bits != 32) return 0;
    }
    return 1;
}

/* Per-layer times (when asked for): slot l is layer l, slot num_layers the final norm and LM head. */
typedef struct {
    int64_t wall, cpu;
} Mark;

static Mark mark(const TureenDecodeStep *s) {
    return s->layer_wall_ns ? (Mark){now_ns(CLOCK_MONOTONIC), now_ns(CLOCK_THREAD_CPUTIME_ID)} : (Mark){0, 0};
}

static void charge(const TureenDecodeStep *s, int64_t slot, Mark m) {
    if (!s->layer_wall_ns) return;
    s->layer_wall_ns[slot] += now_ns(CLOCK_MONOTONIC) - m.wall;
    s->layer_cpu_ns[slot] += now_ns(CLOCK_THREAD_CPUTIME_ID) - m.cpu;
}

static int64_t head_ops(const TureenDecodeStep *s, TpOp *ops) {
    ops[0] = tp_norm((NormArgs){s->h, s->hidden, s->residual, s->final_norm, s->h, s->hidden, s->eps, 0, 0}, s->n);
    return 1 + (s->lm_head.weight ? add_linear(ops + 1, &s->lm_head, s->h, s->hidden, s->logits, s->n) : 0);
}

/* The step on the pool: one program for the whole step, or one per layer when each layer is timed.
 * Returns 0, or -1 (no memory). */
static int pool_step(const TureenDecodeStep *s, const TureenLayer *layers, int num_threads) {
    int64_t cap = 1 + (s->lm_head.weight ? tp_linear_ops(s->n, s->lm_head.in_features, 0) : 0);
    for (int64_t l = 0; l < s->num_layers; l++) cap += max_layer_ops(s, layers + l);
    TpOp *ops = malloc(sizeof(TpOp) * (size_t)cap);
    if (!ops) return -1;
    const int timed = s->layer_wall_ns != 0;
    int64_t k = 0;
    int rc = 0;
    for (int64_t l = 0; l <= s->num_layers && !rc; l++) {
        const Mark m = mark(s);
        k += l < s->num_layers ? layer_ops(s, layers + l, l == 0, ops + k) : head_ops(s, ops + k);
        if (timed) {
            rc = tp_run(ops, k, num_threads);
            k = 0;
            charge(s, l, m);
        }
    }
    if (!timed) rc = tp_run(ops, k, num_threads);
    free(ops);
    return rc;
}

/* Returns 0, or -1 when a kernel could not allocate its scratch (the step's outputs are then garbage). */
int tureen_decode_stack_f32(const TureenDecodeStep *s, const TureenLayer *layers, int num_threads) {
    if (pool_usable(s, layers)) return pool_step(s, layers, num_threads);
    for (int64_t l = 0; l < s->num_layers; l++) {
        const Mark m = mark(s);
        if (run_layer(s, layers + l, l == 0, num_threads)) return -1;
        charge(s, l, m);
    }
    const Mark m = mark(s);
    tureen_rms_norm_f32(s->h, s->hidden, s->residual, s->final_norm, s->h, s->n, s->hidden, s->eps, num_threads);
    if (s->lm_head.weight && run_linear(&s->lm_head, s->h, s->hidden, s->logits, s->n, num_threads)) return -1;
    charge(s, s->num_layers, m);
    return 0;
}

/* sizeof of the structs, so the Python side can check its ctypes mirror against this compiler's layout. */
int64_t tureen_decode_stack_layout(int64_t which) {
    return which == 0 ? (int64_t)sizeof(TureenLinear) : which == 1 ? (int64_t)sizeof(TureenLayer)
                                                                  : (int64_t)sizeof(TureenDecodeStep);
}
