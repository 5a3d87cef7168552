/* tureen's int8-activation ("W8A8-dynamic") quantized linear layers: y = x W^T (+ b) with x
 * quantized to int8 per row and block of inputs on every call, an int8 or int4 weight, and exact
 * integer dot products (VNNI's vpdpbusd) inside each block.
 *
 * This is a different numeric strategy from quant_linear.c (float activations times the weight
 * dequantized in registers): it is what llama.cpp does for Q8_0 / Q4_0 and what vLLM's W8A8 int8
 * schemes do, and it is selected explicitly (quantization_activation="int8"); quant_linear.c stays
 * the default and the exact one. tureen_linear_quant (quant_linear.c) calls this file when its
 * `bits` argument carries TUREEN_ACT_INT8, so the decode stack needs no binding of its own.
 *
 * Numerics, for row m, output column n, weight group g (scale s, zero z per column and group)
 * and activation block b (ablock consecutive inputs; blocks tile each group):
 *   sx[m,b] = max_k |x[m,k]| / 127 over the block (1 when the block is all zero);
 *   qx[m,k] = clamp(rint(x[m,k] / sx[m,b]), -127, 127)              (round half to even)
 *   acc[m,n,b] = sum_{k in b} u[n,k] * qx[m,k]                        (exact, int32)
 *   A[m,n,g] = sum_{b in g} sx[m,b] * acc[m,n,b]   Z[m,g] = sum_{b in g} sx[m,b] * sum_{k in b} qx[m,k]
 *   y[m,n] = bias[n] + sum_g s[n,g] * (A[m,n,g] - z[n,g] * Z[m,g])
 * where u is the weight as an unsigned byte (int4: 0..15; int8: q + 128 with z + 128), so that
 * u * qx is vpdpbusd's unsigned-times-signed product. |acc| < 255 * 127 * ablock <= 2^23 for
 * ablock <= 128, so float(acc) is exact; every float operation is in the order written.
 *
 * Weight layout (panels of 16 output columns as in quant_linear.c, params and bias alike):
 *   int8: (panels, K / 4, 16, 4) uint8: byte j of column c in chunk i is input 4i + j;
 *   int4: (panels, K / 8, 16, 4) uint8: low nibble of byte j, column c, chunk i is input 8i + j,
 *         the high nibble input 8i + 4 + j.
 * One 64-byte chunk is then one 512-bit vpdpbusd (int4: two) against four activation bytes
 * broadcast to every lane.
 *
 * Three implementations of the same integer arithmetic, chosen at run time (cpuid):
 *   avx512vnni (zmm, 16 columns a register), avxvnni (ymm, 8 columns), and generic C (any CPU).
 * Tiles of up to 8 rows x 16 columns (at one or two rows, 4 or 2 accumulators a row against
 * vpdpbusd's latency); the weight is prefetched PREFETCH_AHEAD bytes ahead, since at decode sizes
 * it streams from memory once per step.
 * tureen_w8a8_set_isa forces one (tests, and TUREEN_W8A8_ISA=generic|avxvnni|avx512vnni).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "panels.h"
#include "simd.h"

/* The VNNI implementations need a compiler that knows the avxvnni target (GCC 11, clang 12);
 * older ones build the generic C only (and the rest of the library as before). */
#if defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 12) || \
                            (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define TUREEN_VNNI 1
#else
#define TUREEN_VNNI 0
#endif

#define TUREEN_ACT_INT8 0x100
#define WPANEL 16
#define PREFETCH_AHEAD 1024 /* bytes: sixteen chunks ahead of the one being multiplied */
#define WTILE_ROWS 8 /* rows of one tile: eight independent vpdpbusd chains hide its latency */

enum { ISA_AUTO = 0, ISA_GENERIC = 1, ISA_AVXVNNI = 2, ISA_AVX512VNNI = 3 };

static int isa_supported(int isa) {
#if TUREEN_VNNI
    __builtin_cpu_init();
    if (isa == ISA_AVX512VNNI)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vnni");
    if (isa == ISA_AVXVNNI) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avxvnni");
#endif
    return isa == ISA_GENERIC;
}

static int chosen_isa = ISA_AUTO;

static int best_isa(void) {
    if (chosen_isa != ISA_AUTO) return chosen_isa;
    const char *env = getenv("TUREEN_W8A8_ISA");
    if (env && !strcmp(env, "generic")) return chosen_isa = ISA_GENERIC;
    if (env && !strcmp(env, "avxvnni") && isa_supported(ISA_AVXVNNI)) return chosen_isa = ISA_AVXVNNI;
    chosen_isa = isa_supported(ISA_AVX512VNNI) ? ISA_AVX512VNNI
                 : isa_supported(ISA_AVXVNNI)  ? ISA_AVXVNNI
                                               : ISA_GENERIC;
    return chosen_isa;
}

/* isa: 0 auto (the best the CPU has), 1 generic, 2 avxvnni, 3 avx512vnni; -1 only reports.
 * Returns the implementation now in use, or -2 when the CPU lacks the one asked for. */
int tureen_w8a8_set_isa(int isa) {
    if (isa == -1) return best_isa();
    if (isa == ISA_AUTO) {
        chosen_isa = ISA_AUTO;
        return best_isa();
    }
    if (isa < ISA_GENERIC || isa > ISA_AVX512VNNI || !isa_supported(isa)) return -2;
    return chosen_isa = isa;
}

/* The activation block inside a weight group of `group` inputs (group % 32 == 0). */
int64_t tureen_w8a8_block(int64_t group) { return group % 128 == 0 ? 128 : group % 64 == 0 ? 64 : 32; }

/* ---- activations ------------------------------------------------------------------------- */

typedef struct {
    int8_t *q;  /* (M, K) */
    float *sx;  /* (M, B): block scales */
    float *zx;  /* (M, G): Z above (only with zeros) */
    int64_t K, B, G, ablock;
} QuantX;

static void quantize_row(const float *x, int64_t K, int64_t ablock, int64_t per_group, int8_t *q, float *sx,
                         float *zx) {
    const v8 magic = splat8(12582912.0f); /* 1.5 * 2^23: (v + magic) - magic = rint(v), |v| < 2^22 */
    for (int64_t b = 0, k0 = 0; k0 < K; b++, k0 += ablock) {
        v8 m = splat8(0.0f);
        for (int64_t k = k0; k < k0 + ablock; k += 8) {
            const v8 v = load8(x + k), neg = -v;
            m = select8(v > m, v, m);
            m = select8(neg > m, neg, m);
        }
        float amax = 0.0f;
        for (int i = 0; i < 8; i++) amax = m[i] > amax ? m[i] : amax;
        const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
        int32_t sum = 0;
        for (int64_t k = k0; k < k0 + ablock; k += 8) {
            v8 r = (load8(x + k) / splat8(s) + magic) - magic;
            r = select8(r > splat8(127.0f), splat8(127.0f), r);
            r = select8(r < splat8(-127.0f), splat8(-127.0f), r);
            const v8i qi = __builtin_convertvector(r, v8i);
            for (int i = 0; i < 8; i++) {
                q[k + i] = (int8_t)qi[i];
                sum += qi[i];
            }
        }
        sx[b] = s;
        if (zx) {
            const float part = s * (float)sum;
            if (b % per_group == 0) zx[b / per_group] = part;
            else zx[b / per_group] += part;
        }
    }
}

static void quantize_x(const float *x, int64_t ldx, int64_t M, QuantX *Q, int num_threads) {
    if (M <= 16) { /* decode: no parallel region for a few hundred bytes */
        for (int64_t m = 0; m < M; m++)
            quantize_row(x + m * ldx, Q->K, Q->ablock, Q->B / Q->G, Q->q + m * Q->K, Q->sx + m * Q->B,
                         Q->zx ? Q->zx + m * Q->G : 0);
        return;
    }
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t m = 0; m < M; m++)
        quantize_row(x + m * ldx, Q->K, Q->ablock, Q->B / Q->G, Q->q + m * Q->K, Q->sx + m * Q->B,
                     Q->zx ? Q->zx + m * Q->G : 0);
}

/* The calling thread's scratch for quantized activations, grown as needed and kept (decode calls
 * this for every layer of every step: no malloc / free per call). */
static void *thread_scratch(size_t bytes) {
    static __thread void *buf;
    static __thread size_t cap;
    if (bytes > cap) {
        void *grown = realloc(buf, bytes);
        if (!grown) return 0;
        buf = grown;
        cap = bytes;
    }
    return buf;
}

/* ---- one panel ----------------------------------------------------------------------------- */

typedef struct {
    const uint8_t *panel; /* this panel's bytes */
    const float *params;  /* (G, 2, 16) scales, zeros */
    const float *bias;    /* 16 floats or NULL */
    int64_t K, group, ablock;
    int bits, cols, gate_up, has_zero;
} WPanel;

/* Writes R rows (ldy apart) of 16 float results, applying the epilogue. */
static inline __attribute__((always_inline)) void store_tile(const int R, const WPanel *P, float (*out)[WPANEL],
                                                               float *y, int64_t ldy) {
    for (int i = 0; i < R; i++) {
        float *dst = y + i * ldy;
        if (P->gate_up) {
            const v8 g = load8(out[i]), u = load8(out[i] + 8);
            store8(dst, g / (1.0f + exp8(-g)) * u);
        } else {
            memcpy(dst, out[i], sizeof(float) * P->cols);
        }
    }
}

/* The float part shared by every implementation: out += s * (A - z * Z) for one group. */
static inline __attribute__((always_inline)) void group_epilogue(const int R, const WPanel *P, int64_t g,
                                                                   float (*A)[WPANEL], const float *zx, int64_t G,
                                                                   float (*out)[WPANEL]) {
    const float *s = P->params + g * 2 * WPANEL, *z = s + WPANEL;
    for (int i = 0; i < R; i++)
        for (int j = 0; j < WPANEL; j++) {
            const float a = P->has_zero ? A[i][j] - z[j] * zx[i * G + g] : A[i][j];
            out[i][j] += s[j] * a;
        }
}

static inline __attribute__((always_inline)) void init_out(const int R, const WPanel *P, float (*out)[WPANEL]) {
    for (int i = 0; i < R; i++)
        for (int j = 0; j < WPANEL; j++) out[i][j] = P->bias ? P->bias[j] : 0.0f;
}

/* Generic C: the same integers, one column at a time. */
static void tile_generic(int R, const WPanel *P, const int8_t *qx, const float *sx, const float *zx, int64_t K,
                         int64_t B, int64_t G, float *y, int64_t ldy) {
    float out[WTILE_ROWS][WPANEL], A[WTILE_ROWS][WPANEL];
    init_out(WTILE_ROWS, P, out);
    const int64_t per_group = P->group / P->ablock;
    for (int64_t g = 0; g < G; g++) {
        memset(A, 0, sizeof A);
        for (int64_t b = g * per_group; b < (g + 1) * per_group; b++)
            for (int i = 0; i < R; i++) {
                const int8_t *xr = qx + i * K;
                for (int j = 0; j < WPANEL; j++) {
                    int32_t acc = 0;
                    for (int64_t k = b * P->ablock; k < (b + 1) * P->ablock; k++) {
                        int u;
                        if (P->bits == 8) {
                            u = P->panel[(k / 4) * 64 + j * 4 + k % 4];
                        } else {
                            const uint8_t byte = P->panel[(k / 8) * 64 + j * 4 + k % 4];
                            u = k % 8 < 4 ? byte & 15 : byte >> 4;
                        }
                        acc += u * xr[k];
                    }
                    A[i][j] += sx[i * B + b] * (float)acc;
                }
            }
        group_epilogue(R, P, g, A, zx, G, out);
    }
    store_tile(R, P, out, y, ldy);
}

#if TUREEN_VNNI
#include <immintrin.h>

/* AVX-512 VNNI: one zmm accumulator (16 columns) per row and block; U independent accumulators
 * per row take consecutive chunks in turn so that one row does not wait on vpdpbusd's latency. */
#define Z_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni,fma")))
static inline __attribute__((always_inline)) Z_TARGET void zblock(const int R, const int U, const int bits,
                                                                    const uint8_t *w, const int8_t *qx, int64_t K,
                                                                    int64_t k0, int64_t k1, __m512i *acc) {
    const int step = bits == 8 ? 4 : 8; /* inputs per 64-byte chunk */
    for (int i = 0; i < U * R; i++) acc[i] = _mm512_setzero_si512();
    const __m512i low = _mm512_set1_epi8(15);
    const uint8_t *c = w + (uint64_t)k0 / step * 64; /* k0 is a multiple of 32 */
    const int8_t *xs = qx + k0;
    for (int64_t n = (k1 - k0) / (step * U); n > 0; n--, c += 64 * U, xs += step * U) {
#pragma GCC unroll 4
        for (int u = 0; u < U; u++) {
            /* The weights stream through once per step at decode sizes: ask for the line
             * PREFETCH_AHEAD bytes on (the next panel's first lines past the end of this one). */
            __builtin_prefetch(c + 64 * u + PREFETCH_AHEAD, 0, 3);
            const __m512i v = _mm512_loadu_si512(c + 64 * u);
            if (bits == 8) {
#pragma GCC unroll 8
                for (int i = 0; i < R; i++) {
                    int32_t four;
                    memcpy(&four, xs + i * K + u * step, 4);
                    acc[u * R + i] = _mm512_dpbusd_epi32(acc[u * R + i], v, _mm512_set1_epi32(four));
                }
            } else {
                const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
#pragma GCC unroll 8
                for (int i = 0; i < R; i++) {
                    int32_t a, b;
                    memcpy(&a, xs + i * K + u * step, 4);
                    memcpy(&b, xs + i * K + u * step + 4, 4);
                    acc[u * R + i] = _mm512_dpbusd_epi32(acc[u * R + i], lo, _mm512_set1_epi32(a));
                    acc[u * R + i] = _mm512_dpbusd_epi32(acc[u * R + i], hi, _mm512_set1_epi32(b));
                }
            }
        }
    }
    for (int u = 1; u < U; u++)
        for (int i = 0; i < R; i++) acc[i] = _mm512_add_epi32(acc[i], acc[u * R + i]);
}

static inline __attribute__((always_inline)) Z_TARGET void tile_zmm(const int R, const int bits, const WPanel *P,
                                                                      const int8_t *qx, const float *sx,
                                                                      const float *zx, int64_t K, int64_t B,
                                                                      int64_t G, float *y, int64_t ldy) {
    const int U = R == 1 ? 4 : R == 2 ? 2 : 1;
    float out[WTILE_ROWS][WPANEL], A[WTILE_ROWS][WPANEL];
    init_out(R, P, out);
    const int64_t per_group = P->group / P->ablock;
    for (int64_t g = 0; g < G; g++) {
        __m512i acc[WTILE_ROWS];
        __m512 Av[WTILE_ROWS];
        for (int i = 0; i < R; i++) Av[i] = _mm512_setzero_ps();
        for (int64_t b = g * per_group; b < (g + 1) * per_group; b++) {
            const int64_t k0 = b * P->ablock;
            zblock(R, U, bits, P->panel, qx, K, k0, k0 + P->ablock, acc);
            for (int i = 0; i < R; i++) /* A += sx * acc: a multiply, then an add, as written above */
                Av[i] = _mm512_add_ps(Av[i], _mm512_mul_ps(_mm512_set1_ps(sx[i * B + b]), _mm512_cvtepi32_ps(acc[i])));
        }
        for (int i = 0; i < R; i++) _mm512_storeu_ps(A[i], Av[i]);
        group_epilogue(R, P, g, A, zx, G, out);
    }
    store_tile(R, P, out, y, ldy);
}

static Z_TARGET void tile_avx512(int R, const WPanel *P, const int8_t *qx, const float *sx, const float *zx,
                                 int64_t K, int64_t B, int64_t G, float *y, int64_t ldy) {
#define ZT(r, bits) tile_zmm(r, bits, P, qx, sx, zx, K, B, G, y, ldy)
#define ZROWS(bits)                \
    switch (R) {                   \
    case 8: ZT(8, bits); break;    \
    case 7: ZT(7, bits); break;    \
    case 6: ZT(6, bits); break;    \
    case 5: ZT(5, bits); break;    \
    case 4: ZT(4, bits); break;    \
    case 3: ZT(3, bits); break;    \
    case 2: ZT(2, bits); break;    \
    default: ZT(1, bits); break;   \
    }
    if (P->bits == 8) {
        ZROWS(8)
    } else {
        ZROWS(4)
    }
#undef ZROWS
#undef ZT
}

/* AVX-VNNI (256-bit, no AVX-512): the two 32-byte halves of a chunk are columns 0-7 and 8-15. */
#define Y_TARGET __attribute__((target("avx2,avxvnni,fma")))
static inline __attribute__((always_inline)) Y_TARGET void tile_ymm(const int R, const int bits, const WPanel *P,
                                                                      const int8_t *qx, const float *sx,
                                                                      const float *zx, int64_t K, int64_t B,
                                                                      int64_t G, float *y, int64_t ldy) {
    const int64_t step = bits == 8 ? 4 : 8;
    float out[WTILE_ROWS][WPANEL], A[WTILE_ROWS][WPANEL];
    init_out(R, P, out);
    const int64_t per_group = P->group / P->ablock;
    const __m256i low = _mm256_set1_epi8(15);
    for (int64_t g = 0; g < G; g++) {
        __m256 A0[WTILE_ROWS], A1[WTILE_ROWS];
        for (int i = 0; i < R; i++) A0[i] = A1[i] = _mm256_setzero_ps();
        for (int64_t b = g * per_group; b < (g + 1) * per_group; b++) {
            __m256i a0[WTILE_ROWS], a1[WTILE_ROWS];
            for (int i = 0; i < R; i++) a0[i] = a1[i] = _mm256_setzero_si256();
            for (int64_t k = b * P->ablock; k < (b + 1) * P->ablock; k += step) {
                const uint8_t *c = P->panel + k / step * 64;
                __builtin_prefetch(c + PREFETCH_AHEAD, 0, 3);
                const __m256i v0 = _mm256_loadu_si256((const __m256i *)c), v1 = _mm256_loadu_si256((const __m256i *)(c + 32));
                for (int i = 0; i < R; i++) {
                    int32_t fa, fb;
                    memcpy(&fa, qx + i * K + k, 4);
                    if (bits == 8) {
                        const __m256i xa = _mm256_set1_epi32(fa);
                        a0[i] = _mm256_dpbusd_avx_epi32(a0[i], v0, xa);
                        a1[i] = _mm256_dpbusd_avx_epi32(a1[i], v1, xa);
                    } else {
                        memcpy(&fb, qx + i * K + k + 4, 4);
                        const __m256i xa = _mm256_set1_epi32(fa), xb = _mm256_set1_epi32(fb);
                        a0[i] = _mm256_dpbusd_avx_epi32(a0[i], _mm256_and_si256(v0, low), xa);
                        a1[i] = _mm256_dpbusd_avx_epi32(a1[i], _mm256_and_si256(v1, low), xa);
                        a0[i] = _mm256_dpbusd_avx_epi32(a0[i], _mm256_and_si256(_mm256_srli_epi16(v0, 4), low), xb);
                        a1[i] = _mm256_dpbusd_avx_epi32(a1[i], _mm256_and_si256(_mm256_srli_epi16(v1, 4), low), xb);
                    }
                }
            }
            for (int i = 0; i < R; i++) {
                const __m256 s = _mm256_set1_ps(sx[i * B + b]);
                A0[i] = _mm256_add_ps(A0[i], _mm256_mul_ps(s, _mm256_cvtepi32_ps(a0[i])));
                A1[i] = _mm256_add_ps(A1[i], _mm256_mul_ps(s, _mm256_cvtepi32_ps(a1[i])));
            }
        }
        for (int i = 0; i < R; i++) {
            _mm256_storeu_ps(A[i], A0[i]);
            _mm256_storeu_ps(A[i] + 8, A1[i]);
        }
        group_epilogue(R, P, g, A, zx, G, out);
    }
    store_tile(R, P, out, y, ldy);
}

static Y_TARGET void tile_avxvnni4(int R, const WPanel *P, const int8_t *qx, const float *sx, const float *zx,
                                   int64_t K, int64_t B, int64_t G, float *y, int64_t ldy) {
#define YT(r, bits) tile_ymm(r, bits, P, qx, sx, zx, K, B, G, y, ldy)
#define YROWS(bits)                \
    switch (R) {                   \
    case 4: YT(4, bits); break;    \
    case 3: YT(3, bits); break;    \
    case 2: YT(2, bits); break;    \
    default: YT(1, bits); break;   \
    }
    if (P->bits == 8) {
        YROWS(8)
    } else {
        YROWS(4)
    }
#undef YROWS
#undef YT
}

/* At most four rows at a time: sixteen ymm registers on CPUs without AVX-512. */
static void tile_avxvnni(int R, const WPanel *P, const int8_t *qx, const float *sx, const float *zx, int64_t K,
                         int64_t B, int64_t G, float *y, int64_t ldy) {
    for (int i = 0; i < R; i += 4)
        tile_avxvnni4(R - i < 4 ? R - i : 4, P, qx + i * K, sx + i * B, zx ? zx + i * G : 0, K, B, G, y + i * ldy,
                      ldy);
}
#endif

typedef void (*TileFn)(int, const WPanel *, const int8_t *, const float *, const float *, int64_t, int64_t, int64_t,
                       float *, int64_t);

static TileFn tile_for(int isa) {
#if TUREEN_VNNI
    if (isa == ISA_AVX512VNNI) return tile_avx512;
    if (isa == ISA_AVXVNNI) return tile_avxvnni;
#endif
    (void)isa;
    return tile_generic;
}

/* x (M, K) rows ldx apart; y contiguous (M, N) or (M, N / 2) for gate_up; bits 8 or 4; group
 * divides K and is a multiple of 32. Returns 0, or -1 when the scratch could not be allocated. */
int tureen_linear_w8a8(const float *x, int64_t ldx, float *y, int64_t M, const uint8_t *qweight,
                       const float *params, const float *bias, int64_t N, int64_t K, int64_t group, int bits,
                       int has_zero, int gate_up, int num_threads) {
    const int64_t panels = gate_up ? N / WPANEL : (N + WPANEL - 1) / WPANEL, G = K / group;
    const int64_t ablock = tureen_w8a8_block(group), B = K / ablock;
    const int64_t ldy = gate_up ? N / 2 : N, panel_bytes = K * (bits == 8 ? 16 : 8);
    const int panel_cols = gate_up ? WPANEL / 2 : WPANEL;
    if (M <= 0) return 0;
    void *scratch = thread_scratch((size_t)(M * K) + sizeof(float) * (size_t)(M * B + M * G) + 64);
    if (!scratch) return -1;
    QuantX Q = {(int8_t *)scratch, 0, 0, K, B, G, ablock};
    Q.sx = (float *)((char *)scratch + (M * K + 15) / 16 * 16);
    Q.zx = has_zero ? Q.sx + M * B : 0;
    quantize_x(x, ldx, M, &Q, num_threads);
    const TileFn tile = tile_for(best_isa());
    /* Rows in blocks whose quantized x (a byte an input) stays in L2 while every panel streams past. */
    int64_t row_block = 256 * 1024 / K / WTILE_ROWS * WTILE_ROWS;
    if (row_block < WTILE_ROWS) row_block = WTILE_ROWS;
    const int nt = num_threads > 0 ? num_threads : 1;
    PanelRange ranges[nt];
    for (int64_t m0 = 0; m0 < M; m0 += row_block) {
        const int64_t m1 = m0 + row_block < M ? m0 + row_block : M;
        panel_ranges_init(ranges, nt, panels);
#pragma omp parallel num_threads(nt)
        for (int64_t p, self = panel_thread(); (p = panel_next(ranges, nt, (int)self)) >= 0;) {
            const WPanel P = {qweight + p * panel_bytes, params + p * G * 2 * WPANEL, bias ? bias + p * WPANEL : 0,
                              K, group, ablock, bits,
                              ldy - p * panel_cols < panel_cols ? (int)(ldy - p * panel_cols) : panel_cols,
                              gate_up, has_zero};
            for (int64_t i = m0; i < m1; i += WTILE_ROWS) {
                const int rows = m1 - i < WTILE_ROWS ? (int)(m1 - i) : WTILE_ROWS;
                tile(rows, &P, Q.q + i * K, Q.sx + i * B, Q.zx ? Q.zx + i * G : 0, K, B, G,
                     y + i * ldy + p * panel_cols, ldy);
            }
        }
    }
    return 0;
}
