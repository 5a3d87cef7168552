/* Vector helpers shared by tureen's native CPU kernels (GCC/Clang vector extensions).
 *
 * v8 is 8 floats: one AVX register on x86-64, two NEON registers on aarch64; the compiler picks
 * the instructions, so the same source builds (more slowly) without AVX2. Everything is static
 * inline: each translation unit gets its own copy and nothing here is exported.
 */
#ifndef TUREEN_SIMD_H
#define TUREEN_SIMD_H

#include <stdint.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32))); /* 8 floats: one AVX register, two NEON ones */
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8 load8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }
static inline v8 splat8(float x) { return (v8){x, x, x, x, x, x, x, x}; }

static inline float hsum8(v8 v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

/* Pairwise halving: sums of a and b in the even and odd 4-lane halves. */
static inline v8 pair_sum(v8 a, v8 b) {
    return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
           __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}

/* {hsum(a0), ..., hsum(a7)} in 21 vector operations instead of eight scalar reductions. */
static inline v8 hsum8x8(v8 a0, v8 a1, v8 a2, v8 a3, v8 a4, v8 a5, v8 a6, v8 a7) {
    const v8 s0123 = pair_sum(pair_sum(a0, a1), pair_sum(a2, a3)); /* a0 a1 a2 a3 | a0 a1 a2 a3 */
    const v8 s4567 = pair_sum(pair_sum(a4, a5), pair_sum(a6, a7));
    return __builtin_shufflevector(s0123, s4567, 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(s0123, s4567, 4, 5, 6, 7, 12, 13, 14, 15);
}

static inline v8 select8(v8i mask, v8 a, v8 b) { return (v8)(((v8i)a & mask) | ((v8i)b & ~mask)); }

/* exp(x), 8 lanes, x clamped to [-87, 88]: Cephes-style range reduction and a degree-6 polynomial
 * (about 1 ulp). Plain loops over libm's expf do not vectorize without -ffast-math. */
static inline v8 exp8(v8 x) {
    x = select8(x < splat8(-87.0f), splat8(-87.0f), x);
    x = select8(x > splat8(88.0f), splat8(88.0f), x);
    const v8 y = x * 1.44269504088896341f;
    const v8i ni = __builtin_convertvector(y + select8(y < splat8(0.0f), splat8(-0.5f), splat8(0.5f)), v8i);
    const v8 n = __builtin_convertvector(ni, v8); /* round(x / ln2) */
    const v8 r = (x - n * 0.693359375f) + n * 2.12194440e-4f; /* x - n ln2, in two parts */
    v8 p = splat8(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * (v8)((ni + 127) << 23); /* times 2^n */
}

/* Eight consecutive bytes widened to eight int32 lanes, sign- or zero-extended: one vpmovsxbd /
 * vpmovzxbd on AVX2 (GCC's generic byte-to-int vector conversion is scalarised). */
#if defined(__AVX2__)
#include <immintrin.h>
static inline v8i widen_s8(const uint8_t *p) { return (v8i)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static inline v8i widen_u8(const uint8_t *p) { return (v8i)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
#else
static inline v8i widen_s8(const uint8_t *p) {
    v8i v;
    for (int i = 0; i < 8; i++) v[i] = (int8_t)p[i];
    return v;
}
static inline v8i widen_u8(const uint8_t *p) {
    v8i v;
    for (int i = 0; i < 8; i++) v[i] = p[i];
    return v;
}
#endif

#endif
