/* tureen's weight-only quantized linear layers: y = x W^T (+ b) with float32 activations and an
 * int8 or int4 weight that stays packed in memory and is dequantized in registers.
 *
 * Decode (a few rows per step) reads every weight once per step, so it is bound by how many bytes
 * cross the memory bus: an int8 weight is a quarter of float32, an int4 weight an eighth. The
 * kernel is the float32 GEMM's 16-column panel and R x 16 register tile (csrc/cpu_ops.c), with
 * each panel row (16 weights) widened to two float vectors right after its load.
 *
 * Weight, value = (q - z) * s, with one (s, z) per column and group of `group` consecutive k:
 *   int8: (panels, K, 16) int8, row k of panel p = columns 16p .. 16p + 15;
 *   int4: (panels, K, 8) uint8, byte j of row k = column 16p + j (low nibble) and 16p + 8 + j (high);
 *   params: (panels, G, 2, 16) float32, G = K / group: 16 scales then 16 zeros per group;
 *   bias: (panels * 16) float32 or NULL.
 * The zero is applied once per group and row, not per weight:
 *   sum_k x_k (q_k - z) s = s (sum_k x_k q_k - z sum_k x_k)
 * with the per-row group sums of x computed once per call (only when the weight has zeros).
 * The gate_up layout is the float32 one: panel p holds gate columns [8p, 8p + 8) and up columns
 * [8p, 8p + 8), and the tile writes silu(gate) * up.
 * The packing itself (a permutation of q, scales and zeros) is done once at load time in Python.
 */
#include <stdlib.h>

#include "panels.h"
#include "simd.h"

#define TUREEN_ACT_INT8 0x100 /* in `bits`: int8 activations, the layout of quant_w8a8.c */
int tureen_linear_w8a8(const float *x, int64_t ldx, float *y, int64_t M, const uint8_t *qweight,
                       const float *params, const float *bias, int64_t N, int64_t K, int64_t group, int bits,
                       int has_zero, int gate_up, int num_threads);

#define QPANEL 16
#define QTILE_ROWS 6
#define QCHUNK 64 /* panel rows per prefetch burst */

/* The 16 weights of row k of a panel as two float vectors (columns 0-7, 8-15). */
static inline __attribute__((always_inline)) void panel_row(const int bits, const uint8_t *panel, int64_t k,
                                                              v8 *w0, v8 *w1) {
    if (bits == 8) {
        *w0 = __builtin_convertvector(widen_s8(panel + k * 16), v8);
        *w1 = __builtin_convertvector(widen_s8(panel + k * 16 + 8), v8);
    } else {
        const v8i both = widen_u8(panel + k * 8);
        *w0 = __builtin_convertvector(both & 15, v8);
        *w1 = __builtin_convertvector(both >> 4, v8);
    }
}

typedef struct {
    const uint8_t *panel; /* this panel's K rows */
    const float *params;  /* this panel's (G, 2, 16) scales and zeros */
    const float *bias;    /* this panel's 16 bias values, or NULL */
    int64_t K, group, G;
    int cols, gate_up, has_zero;
    const uint8_t *prefetch; /* the next panel (or NULL): this tile prefetches its bytes [0, prefetch_bytes) */
    int64_t prefetch_bytes;
} QPanel;

/* Accumulates rows [k, end) of a panel times R rows of x into lo/hi: U independent accumulator
 * pairs per row take consecutive k in turn, so that with few rows the FMA latency (4 cycles)
 * does not bound the loop; the caller adds the U pairs up. */
static inline __attribute__((always_inline)) int64_t qtile_span(const int R, const int U, const int bits,
                                                                  const float *x, int64_t ldx, const uint8_t *panel,
                                                                  int64_t k, int64_t end, v8 *lo, v8 *hi) {
    for (; k + U <= end; k += U) {
#pragma GCC unroll 4
        for (int u = 0; u < U; u++) {
            v8 w0, w1;
            panel_row(bits, panel, k + u, &w0, &w1);
#pragma GCC unroll 6
            for (int i = 0; i < R; i++) {
                const v8 a = splat8(x[i * ldx + k + u]);
                lo[u * R + i] += a * w0;
                hi[u * R + i] += a * w1;
            }
        }
    }
    for (; k < end; k++) {
        v8 w0, w1;
        panel_row(bits, panel, k, &w0, &w1);
        for (int i = 0; i < R; i++) {
            const v8 a = splat8(x[i * ldx + k]);
            lo[i] += a * w0;
            hi[i] += a * w1;
        }
    }
    return k;
}

/* R rows of x (ldx apart) times one panel into y (ldy apart). xsum: the rows' group sums of x,
 * (R, G), when the weight has zeros. */
static inline __attribute__((always_inline)) void qtile(const int R, const int bits, const float *x, int64_t ldx,
                                                          const float *xsum, const QPanel *P, float *y, int64_t ldy) {
    enum { MAX_ACC = 6 };
    const int64_t row_bytes = bits == 8 ? 16 : 8;
    const int U = R == 1 ? 4 : R == 2 ? 2 : 1; /* accumulator pairs per row: U * R <= MAX_ACC */
    v8 olo[QTILE_ROWS], ohi[QTILE_ROWS];
    for (int i = 0; i < R; i++) {
        olo[i] = P->bias ? load8(P->bias) : splat8(0.0f);
        ohi[i] = P->bias ? load8(P->bias + 8) : splat8(0.0f);
    }
    for (int64_t g = 0; g < P->G; g++) {
        v8 lo[MAX_ACC], hi[MAX_ACC];
        for (int i = 0; i < U * R; i++) lo[i] = hi[i] = splat8(0.0f);
        for (int64_t k = g * P->group, end = k + P->group; k < end; k += QCHUNK) {
            /* prefetch the next panel's bytes at this chunk's offset: a few lines at a time, so
             * requests go out steadily while this panel computes */
            const int64_t stop = k + QCHUNK < end ? k + QCHUNK : end;
            const int64_t pf_end = stop * row_bytes < P->prefetch_bytes ? stop * row_bytes : P->prefetch_bytes;
            for (int64_t off = (k * row_bytes + 63) / 64 * 64; off < pf_end; off += 64)
                __builtin_prefetch(P->prefetch + off, 0, 3);
            qtile_span(R, U, bits, x, ldx, P->panel, k, stop, lo, hi);
        }
        for (int u = 1; u < U; u++)
            for (int i = 0; i < R; i++) lo[i] += lo[u * R + i], hi[i] += hi[u * R + i];
        const float *s = P->params + g * 2 * QPANEL;
        const v8 s0 = load8(s), s1 = load8(s + 8);
        if (P->has_zero) {
            const v8 z0 = load8(s + 16), z1 = load8(s + 24);
            for (int i = 0; i < R; i++) {
                const float xs = xsum[i * P->G + g];
                lo[i] -= z0 * xs;
                hi[i] -= z1 * xs;
            }
        }
        for (int i = 0; i < R; i++) {
            olo[i] += lo[i] * s0;
            ohi[i] += hi[i] * s1;
        }
    }
    float buf[QPANEL];
    for (int i = 0; i < R; i++) {
        float *out = y + i * ldy;
        if (P->gate_up) {
            store8(out, olo[i] / (1.0f + exp8(-olo[i])) * ohi[i]);
        } else if (P->cols == QPANEL) {
            store8(out, olo[i]);
            store8(out + 8, ohi[i]);
        } else {
            store8(buf, olo[i]);
            store8(buf + 8, ohi[i]);
            memcpy(out, buf, sizeof(float) * P->cols);
        }
    }
}

static void qtile_rows(int rows, int bits, const float *x, int64_t ldx, const float *xsum, const QPanel *P, float *y,
                       int64_t ldy) {
#define QT(R, B) qtile(R, B, x, ldx, xsum, P, y, ldy)
#define QROWS(B)            \
    switch (rows) {         \
    case 6: QT(6, B); break; \
    case 5: QT(5, B); break; \
    case 4: QT(4, B); break; \
    case 3: QT(3, B); break; \
    case 2: QT(2, B); break; \
    default: QT(1, B); break; \
    }
    if (bits == 8) {
        QROWS(8)
    } else {
        QROWS(4)
    }
#undef QROWS
#undef QT
}

/* xsum (M, G): sums of each row's x over each group of k. */
static void group_sums(const float *x, int64_t ldx, int64_t M, int64_t K, int64_t group, float *xsum,
                       int num_threads) {
    const int64_t G = K / group;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (M > 16)
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            const float *r = x + m * ldx + g * group;
            v8 acc = splat8(0.0f);
            int64_t k = 0;
            for (; k + 8 <= group; k += 8) acc += load8(r + k);
            float s = hsum8(acc);
            for (; k < group; k++) s += r[k];
            xsum[m * G + g] = s;
        }
}

/* x (M, K), rows ldx apart, each dense; y contiguous, (M, N) or (M, N / 2) for gate_up.
 * bits: 8 or 4, or either with TUREEN_ACT_INT8 set: the weight is then in quant_w8a8.c's layout
 * and the activations are quantized to int8 there (a different numeric strategy, chosen at pack
 * time; the decode stack passes `bits` through unchanged); group divides K (group == K: one scale per column). Returns 0, or -1 when the
 * group-sum scratch could not be allocated (y is then untouched). */
int tureen_linear_quant(const float *x, int64_t ldx, float *y, int64_t M, const uint8_t *qweight, const float *params,
                        const float *bias, int64_t N, int64_t K, int64_t group, int bits, int has_zero, int gate_up,
                        int num_threads) {
    if (bits & TUREEN_ACT_INT8)
        return tureen_linear_w8a8(x, ldx, y, M, qweight, params, bias, N, K, group, bits & 0xff, has_zero, gate_up,
                                  num_threads);
    const int64_t panels = gate_up ? N / QPANEL : (N + QPANEL - 1) / QPANEL, G = K / group;
    const int64_t ldy = gate_up ? N / 2 : N, panel_bytes = K * (bits == 8 ? 16 : 8);
    const int panel_cols = gate_up ? QPANEL / 2 : QPANEL;
    float *xsum = 0;
    if (has_zero) {
        xsum = malloc(sizeof(float) * (M * G > 0 ? M * G : 1));
        if (!xsum) return -1;
        group_sums(x, ldx, M, K, group, xsum, num_threads);
    }
    /* Rows in blocks whose x stays in L2 while every panel streams past it. */
    int64_t row_block = 192 * 1024 / (int64_t)sizeof(float) / K / QTILE_ROWS * QTILE_ROWS;
    if (row_block < QTILE_ROWS) row_block = QTILE_ROWS;
    const int nt = num_threads > 0 ? num_threads : 1;
    PanelRange ranges[nt];
    for (int64_t m0 = 0; m0 < M; m0 += row_block) {
        const int64_t m1 = m0 + row_block < M ? m0 + row_block : M;
        const int64_t tiles = (m1 - m0 + QTILE_ROWS - 1) / QTILE_ROWS;
        panel_ranges_init(ranges, nt, panels);
#pragma omp parallel num_threads(nt)
        for (int64_t p, self = panel_thread(); (p = panel_next(ranges, nt, (int)self)) >= 0;) {
            const int prefetch_next = m0 == 0 && p + 1 < panels;
            /* next-panel bytes each tile prefetches, in whole cache lines */
            const int64_t share = ((panel_bytes + tiles - 1) / tiles + 63) / 64 * 64;
            QPanel P = {qweight + p * panel_bytes, params + p * G * 2 * QPANEL, bias ? bias + p * QPANEL : 0,
                        K, group, G,
                        ldy - p * panel_cols < panel_cols ? (int)(ldy - p * panel_cols) : panel_cols,
                        gate_up, has_zero, 0, 0};
            for (int64_t t = 0; t < tiles; t++) {
                const int64_t i = m0 + t * QTILE_ROWS, first = t * share;
                if (prefetch_next && first < panel_bytes) {
                    P.prefetch = qweight + (p + 1) * panel_bytes + first;
                    P.prefetch_bytes = panel_bytes - first < share ? panel_bytes - first : share;
                } else {
                    P.prefetch_bytes = 0;
                }
                qtile_rows(m1 - i < QTILE_ROWS ? (int)(m1 - i) : QTILE_ROWS, bits, x + i * ldx,
                           ldx, xsum ? xsum + i * G : 0, &P, y + i * ldy + p * panel_cols, ldy);
            }
        }
    }
    free(xsum);
    return 0;
}
