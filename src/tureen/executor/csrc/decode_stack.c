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
 * and after the last layer: r += h, h = norm_final(r). Layouts as in the kernels' own comments.
 */
#include <stdint.h>
#include <string.h>
#include <time.h>

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
    int64_t *layer_wall_ns, *layer_cpu_ns; /* (num_layers,) each, or NULL: per-layer times */
} TureenDecodeStep;

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

/* Returns 0, or -1 when a kernel could not allocate its scratch (the step's outputs are then garbage). */
int tureen_decode_stack_f32(const TureenDecodeStep *s, const TureenLayer *layers, int num_threads) {
    for (int64_t l = 0; l < s->num_layers; l++) {
        const int timed = s->layer_wall_ns != 0;
        const int64_t wall = timed ? now_ns(CLOCK_MONOTONIC) : 0, cpu = timed ? now_ns(CLOCK_THREAD_CPUTIME_ID) : 0;
        if (run_layer(s, layers + l, l == 0, num_threads)) return -1;
        if (timed) {
            s->layer_wall_ns[l] += now_ns(CLOCK_MONOTONIC) - wall;
            s->layer_cpu_ns[l] += now_ns(CLOCK_THREAD_CPUTIME_ID) - cpu;
        }
    }
    tureen_rms_norm_f32(s->h, s->hidden, s->residual, s->final_norm, s->h, s->n, s->hidden, s->eps, num_threads);
    return 0;
}

/* sizeof of the structs, so the Python side can check its ctypes mirror against this compiler's layout. */
int64_t tureen_decode_stack_layout(int64_t which) {
    return which == 0 ? (int64_t)sizeof(TureenLinear) : which == 1 ? (int64_t)sizeof(TureenLayer)
                                                                  : (int64_t)sizeof(TureenDecodeStep);
}
