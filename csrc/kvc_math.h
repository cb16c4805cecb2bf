/*
 * kvc_math.h - per-element and per-row math shared by the CPU ops and the
 * (future) CUDA kernels.
 *
 * Everything is KVC_HD static inline and written in the common subset of C11
 * and C++ (no compound literals, no designated initialisers, no hex floats),
 * so that nvcc can compile the very code the CPU tests exercise.
 */
#ifndef KVC_MATH_H
#define KVC_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kvc.h"

#ifdef __CUDACC__
#define KVC_HD __host__ __device__
#else
#define KVC_HD
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---- bit casts (memcpy is the portable, optimiser-transparent way) ---- */

KVC_HD static inline uint32_t kvc_f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

KVC_HD static inline float kvc_bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ---- fp16 <-> fp32 ----
 * Written as selects rather than early returns so compilers can if-convert
 * and vectorise loops that call them. */

KVC_HD static inline float kvc_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t em = (uint32_t)(h & 0x7fffu);
    uint32_t exp = em & 0x7c00u;
    /* normal: shift mantissa into place and rebias the exponent 15 -> 127 */
    uint32_t normal = (em << 13) + 0x38000000u;
    uint32_t infnan = (em << 13) | 0x7f800000u;
    /* zero/subnormal: value is mantissa * 2^-24, exact in fp32 */
    uint32_t sub = kvc_f32_bits((float)(int32_t)em * 5.9604644775390625e-8f);
    uint32_t r = exp == 0x7c00u ? infnan : (exp == 0 ? sub : normal);
    return kvc_bits_f32(r | sign);
}

/* Round to nearest, ties to even; overflow gives inf, NaN stays a quiet NaN. */
KVC_HD static inline uint16_t kvc_f32_to_f16(float f)
{
    uint32_t u = kvc_f32_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    uint32_t r;
    if (a > 0x7f800000u) {
        r = 0x7e00u | ((a >> 13) & 0x3ffu);
    } else if (a >= 0x477ff000u) {
        /* >= 65520 rounds to inf (65504 is the largest finite half) */
        r = 0x7c00u;
    } else if (a < 0x38800000u) {
        /* Below 2^-14 the result is a half subnormal with ulp 2^-24, which is
         * exactly the fp32 ulp of numbers in [0.5, 1): adding 0.5 makes the
         * FPU do the round-to-nearest-even for us. */
        r = kvc_f32_bits(kvc_bits_f32(a) + 0.5f) - 0x3f000000u;
    } else {
        uint32_t odd = (a >> 13) & 1u;
        /* rebias 127 -> 15 (adds -112 << 23 modulo 2^32), then round the 13
         * dropped bits to nearest even; a carry correctly bumps the exponent */
        r = (a + 0xc8000fffu + odd) >> 13;
    }
    return (uint16_t)(r | sign);
}

/* ---- bf16 <-> fp32 ---- */

KVC_HD static inline float kvc_bf16_to_f32(uint16_t h)
{
    return kvc_bits_f32((uint32_t)h << 16);
}

KVC_HD static inline uint16_t kvc_f32_to_bf16(float f)
{
    uint32_t u = kvc_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40u); /* keep it a (quiet) NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* ---- loads ---- */

/* Element idx (in elements, may be negative) of a float-typed buffer. */
KVC_HD static inline float kvc_load_f32(const void *base, int32_t dtype, int64_t idx)
{
    switch (dtype) {
    case KVC_F16: return kvc_f16_to_f32(((const uint16_t *)base)[idx]);
    case KVC_BF16: return kvc_bf16_to_f32(((const uint16_t *)base)[idx]);
    default: return ((const float *)base)[idx];
    }
}

KVC_HD static inline int64_t kvc_load_index(const void *base, int32_t dtype, int64_t idx)
{
    return dtype == KVC_I32 ? (int64_t)((const int32_t *)base)[idx]
                            : ((const int64_t *)base)[idx];
}

/* Convert n elements spaced `stride` apart into a dense fp32 row. The switch
 * is hoisted out of the loops so each one vectorises for unit stride; always
 * inlined so that it runs at the ISA of the KVC_HOT clone that calls it. */
KVC_HD KVC_INLINE void kvc_row_to_f32(float *dst, const void *src, int32_t dtype, int64_t n,
                                      int64_t stride)
{
    int64_t i;
    if (dtype == KVC_F16) {
        const uint16_t *s = (const uint16_t *)src;
        if (stride == 1)
            for (i = 0; i < n; i++) dst[i] = kvc_f16_to_f32(s[i]);
        else
            for (i = 0; i < n; i++) dst[i] = kvc_f16_to_f32(s[i * stride]);
    } else if (dtype == KVC_BF16) {
        const uint16_t *s = (const uint16_t *)src;
        if (stride == 1)
            for (i = 0; i < n; i++) dst[i] = kvc_bf16_to_f32(s[i]);
        else
            for (i = 0; i < n; i++) dst[i] = kvc_bf16_to_f32(s[i * stride]);
    } else {
        const float *s = (const float *)src;
        if (stride == 1)
            for (i = 0; i < n; i++) dst[i] = s[i];
        else
            for (i = 0; i < n; i++) dst[i] = s[i * stride];
    }
}

/* ---- reductions ----
 * Fixed lane counts give every caller the same summation order whatever the
 * vector width the compiler picks, and let it vectorise without -ffast-math. */

#define KVC_LANES 16

/* Sum of the KVC_LANES partial sums as a fixed pairwise tree: depth 4
 * instead of a 16-long dependency chain, same order on every target. */
KVC_HD static inline float kvc_lanes_sum(float *acc)
{
    int l;
    /* spelled out (KVC_LANES == 16) so compilers unroll it into shuffles */
    for (l = 0; l < 8; l++) acc[l] += acc[l + 8];
    for (l = 0; l < 4; l++) acc[l] += acc[l + 4];
    for (l = 0; l < 2; l++) acc[l] += acc[l + 2];
    return acc[0] + acc[1];
}

#if defined(__GNUC__) && !defined(__CUDACC__) && (defined(__clang__) || __GNUC__ >= 12)
#define KVC_LANES_SUM16 1
typedef float kvc_v16 __attribute__((vector_size(KVC_LANES * sizeof(float))));
#define KVC_S2(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
/* kvc_lanes_sum of 16 vectors at once: lane j of *out = the sum of a[j]'s
 * lanes, by the same tree (l + 8, then + 4, + 2, + 1), run as shuffles
 * across the vectors, two of them per vector from the first level on, so
 * per-vector horizontal sums are avoided and every lane adds the same two
 * numbers at every level as kvc_lanes_sum (the same bits). */
static inline __attribute__((always_inline)) void kvc_lanes_sum16(const kvc_v16 *a, kvc_v16 *out)
{
    kvc_v16 b[8], c[4], e[2];
    int j;
    for (j = 0; j < 8; j++)
        b[j] = KVC_S2(a[2 * j], a[2 * j + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               KVC_S2(a[2 * j], a[2 * j + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (j = 0; j < 4; j++)
        c[j] = KVC_S2(b[2 * j], b[2 * j + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               KVC_S2(b[2 * j], b[2 * j + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (j = 0; j < 2; j++)
        e[j] = KVC_S2(c[2 * j], c[2 * j + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
               KVC_S2(c[2 * j], c[2 * j + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    *out = KVC_S2(e[0], e[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           KVC_S2(e[0], e[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
#undef KVC_S2
#endif

KVC_HD static inline float kvc_dot_f32(const float *a, const float *b, int64_t n)
{
    float acc[KVC_LANES];
    int64_t i = 0;
    int l;
    for (l = 0; l < KVC_LANES; l++) acc[l] = 0.0f;
    for (; i + KVC_LANES <= n; i += KVC_LANES)
        for (l = 0; l < KVC_LANES; l++) acc[l] += a[i + l] * b[i + l];
    for (l = 0; i < n; i++, l++) acc[l] += a[i] * b[i];
    return kvc_lanes_sum(acc);
}

/* Quest's page bound sum_i max(q_i hi_i, q_i lo_i) in the lane order of
 * kvc_dot_f32 (pages.c, cuda/pages.cu). */
KVC_HD static inline float kvc_bound_dot_f32(const float *q, const float *lo, const float *hi, int64_t n)
{
    float acc[KVC_LANES];
    int64_t i = 0;
    int l;
    for (l = 0; l < KVC_LANES; l++) acc[l] = 0.0f;
    for (; i + KVC_LANES <= n; i += KVC_LANES)
        for (l = 0; l < KVC_LANES; l++) {
            const float a = q[i + l] * hi[i + l], m = q[i + l] * lo[i + l];
            acc[l] += a > m ? a : m;
        }
    for (l = 0; i < n; i++, l++) {
        const float a = q[i] * hi[i], m = q[i] * lo[i];
        acc[l] += a > m ? a : m;
    }
    return kvc_lanes_sum(acc);
}

KVC_HD static inline float kvc_max_f32(const float *x, int64_t n)
{
    float m[KVC_LANES];
    float r = -INFINITY;
    int64_t i = 0;
    int l;
    for (l = 0; l < KVC_LANES; l++) m[l] = -INFINITY;
    for (; i + KVC_LANES <= n; i += KVC_LANES)
        for (l = 0; l < KVC_LANES; l++) m[l] = x[i + l] > m[l] ? x[i + l] : m[l];
    for (l = 0; i < n; i++, l++) m[l] = x[i] > m[l] ? x[i] : m[l];
    for (l = 0; l < KVC_LANES; l++) r = m[l] > r ? m[l] : r;
    return r;
}

/* ---- exp ----
 * exp(x) = 2^n * exp(r), n = round(x / ln2), |r| <= ln2/2 with a two-constant
 * Cody-Waite reduction and a degree-7 Taylor polynomial (truncation error
 * < 6e-9 relative, below fp32 rounding). Unlike libm's expf it is branch
 * free, so softmax loops vectorise. Results below ~1.6e-38 flush to 0 (they
 * cannot move a softmax whose largest term is 1); x > 88 saturates. */
#define KVC_EXP_LO (-87.0f)
#define KVC_EXP_HI 88.0f
#define KVC_EXP_LOG2E 1.44269504088896341f
#define KVC_EXP_SHIFT 12582912.0f /* 1.5 * 2^23: adding it rounds to an integer (nearest) */
#define KVC_EXP_LN2_HI 0.693145751953125f
#define KVC_EXP_LN2_LO 1.428606765330187045e-06f
#define KVC_EXP_C7 1.9841269841269841e-4f
/* p <- the Taylor polynomial at r from p = KVC_EXP_C7, by Horner's rule;
 * r and p a float or (attention_tile.h's at_exp8) a vector of floats: the
 * same operations either way. */
#define KVC_EXP_HORNER(p, r)                                                                       \
    do {                                                                                           \
        (p) = (p) * (r) + 1.3888888888888889e-3f;                                                  \
        (p) = (p) * (r) + 8.3333333333333333e-3f;                                                  \
        (p) = (p) * (r) + 4.1666666666666667e-2f;                                                  \
        (p) = (p) * (r) + 1.6666666666666667e-1f;                                                  \
        (p) = (p) * (r) + 0.5f;                                                                    \
        (p) = (p) * (r) + 1.0f;                                                                    \
        (p) = (p) * (r) + 1.0f;                                                                    \
    } while (0)

KVC_HD static inline float kvc_expf(float x)
{
    const float lo = KVC_EXP_LO, hi = KVC_EXP_HI;
    float xc = x < lo ? lo : (x > hi ? hi : x);
    float t = xc * KVC_EXP_LOG2E + KVC_EXP_SHIFT;
    float n = t - KVC_EXP_SHIFT;
    int32_t ni = (int32_t)(kvc_f32_bits(t) - 0x4b400000u);
    float r = xc - n * KVC_EXP_LN2_HI;
    float p = KVC_EXP_C7;
    r = r - n * KVC_EXP_LN2_LO;
    KVC_EXP_HORNER(p, r);
    p = p * kvc_bits_f32((uint32_t)(ni + 127) << 23);
    return x < lo ? 0.0f : p;
}

/* ---- softmax pieces ----
 * A running (max, sum of exp(x - max)) pair: the state of an online softmax.
 * Two states over disjoint parts of a row merge exactly into the state of the
 * whole row, which is what split-K attention and chunked scoring rely on. */
struct kvc_softmax_state {
    float m; /* running max; -inf while empty */
    float s; /* sum of exp(x - m) */
};

KVC_HD static inline void kvc_softmax_init(struct kvc_softmax_state *st)
{
    st->m = -INFINITY;
    st->s = 0.0f;
}

KVC_HD static inline void kvc_softmax_push(struct kvc_softmax_state *st, float x)
{
    if (x > st->m) {
        st->s = st->s * kvc_expf(st->m - x) + 1.0f;
        st->m = x;
    } else {
        st->s += kvc_expf(x - st->m);
    }
}

KVC_HD static inline struct kvc_softmax_state
kvc_softmax_merge(struct kvc_softmax_state a, struct kvc_softmax_state b)
{
    struct kvc_softmax_state r;
    if (a.m == -INFINITY) return b; /* avoids (-inf) - (-inf) = NaN */
    if (b.m == -INFINITY) return a;
    r.m = a.m > b.m ? a.m : b.m;
    r.s = a.s * kvc_expf(a.m - r.m) + b.s * kvc_expf(b.m - r.m);
    return r;
}


/* Element j of the g per-query-head rows of one kv head (row stride Tk)
 * summed in head order: the GQA "mean" reductions (window scores,
 * Keyformer) divide it by their own count; the fixed order keeps the float
 * result the same for any thread count. */
KVC_HD static inline float kvc_group_sum_at(const float *first, int64_t g, int64_t Tk, int64_t j)
{
    float v = first[j];
    int64_t h;
    for (h = 1; h < g; h++) v += first[h * Tk + j];
    return v;
}

/* In place: x[i] <- exp(x[i] - m); returns the sum (fixed lane order). */
KVC_HD static inline float kvc_exp_shift_sum(float *x, int64_t n, float m)
{
    float acc[KVC_LANES];
    int64_t i = 0;
    int l;
    for (l = 0; l < KVC_LANES; l++) acc[l] = 0.0f;
    for (; i + KVC_LANES <= n; i += KVC_LANES)
        for (l = 0; l < KVC_LANES; l++) {
            float e = kvc_expf(x[i + l] - m);
            x[i + l] = e;
            acc[l] += e;
        }
    for (l = 0; i < n; i++, l++) {
        float e = kvc_expf(x[i] - m);
        x[i] = e;
        acc[l] += e;
    }
    return kvc_lanes_sum(acc);
}

/* Order-preserving map of a float to an unsigned key: a < b (as floats,
 * -0 == +0 folded to +0) iff key(a) < key(b). Used by radix selection. */
KVC_HD static inline uint32_t kvc_f32_order_key(float f)
{
    uint32_t u = f == 0.0f ? 0u : kvc_f32_bits(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* ---- attention pieces (attention.c) ---- */

/* Element idx of a float-typed buffer <- v, rounded to nearest even. */
KVC_HD static inline void kvc_store_f32(void *base, int32_t dtype, int64_t idx, float v)
{
    switch (dtype) {
    case KVC_F16: ((uint16_t *)base)[idx] = kvc_f32_to_f16(v); break;
    case KVC_BF16: ((uint16_t *)base)[idx] = kvc_f32_to_bf16(v); break;
    default: ((float *)base)[idx] = v;
    }
}

/* Natural log of a positive normal float (merge counts >= 1). x = 2^e * m
 * with m in [sqrt(1/2), sqrt(2)); log m = 2 atanh(s), s = (m - 1)/(m + 1),
 * |s| < 0.172, odd series to s^9 (truncation < 1e-9 relative), then
 * e * ln2 in two parts. Branch free so loops over it vectorise (libm's logf
 * does not), about 1 ulp, and log(1) is exactly 0, so counts of 1 give the
 * same bits as no counts. */
KVC_HD static inline float kvc_logf(float x)
{
    uint32_t u = kvc_f32_bits(x);
    /* arithmetic shift of the (possibly negative) offset from sqrt(1/2) */
    int32_t e = (int32_t)(u - 0x3f3504f3u) >> 23;
    float f = kvc_bits_f32(u - ((uint32_t)e << 23)) - 1.0f; /* exact */
    float s = f / (2.0f + f);
    float z = s * s;
    float fe = (float)e;
    /* 2 atanh(s) - 2s = z (2/3 + z (2/5 + z (2/7 + z 2/9))) * s, and
     * f - 2s = s f: log(1 + f) = f - s (f - r), exact leading term */
    float r = z * (0.66666666666666667f +
                   z * (0.4f + z * (0.28571428571428571f + z * 0.22222222222222222f)));
    return fe * 0.693145751953125f + ((f - s * (f - r)) + fe * 1.428606765330187045e-06f);
}

/* Online-softmax step before a block of logits whose largest is bm joins
 * the state: raises the running max, rescales the running sum and returns
 * exp(old max - new max), the factor for everything accumulated under the
 * old max (the running output rows); 0 while the state was empty, exactly 1
 * when the max does not move. The caller then adds sum exp(x - st->m) over
 * the block to st->s. */
KVC_HD static inline float kvc_softmax_rescale(struct kvc_softmax_state *st, float bm)
{
    float alpha;
    /* after the first blocks the max rarely moves: skip the exp then */
    if (!(bm > st->m)) return 1.0f;
    alpha = st->m == -INFINITY ? 0.0f : kvc_expf(st->m - bm);
    st->m = bm;
    st->s *= alpha;
    return alpha;
}

/* Log-sum-exp combine of partial states (split-K attention): the weight of a
 * part whose running max is m when the overall max is M >= m; an empty part
 * (m = -inf) weighs 0 and never produces (-inf) - (-inf). */
KVC_HD static inline float kvc_softmax_weight(float m, float M)
{
    return m == -INFINITY ? 0.0f : kvc_expf(m - M);
}

/* ---- LagKV pieces (lagkv.c, cuda/lagkv.cu) ---- */

/* x min-max normalised into the reference range [lo, hi]; a channel whose
 * reference is constant (hi == lo) carries no lag-relative information and
 * normalises to 0 instead of dividing by zero. */
KVC_HD static inline float kvc_lag_norm(float x, float lo, float hi)
{
    const float r = hi - lo;
    return r != 0.0f ? (x - lo) / r : 0.0f;
}

/* Sample standard deviation (n - 1 in the denominator, n >= 2; torch's
 * default) over the n channels of the row at element `off` of x (channel
 * stride `step`), each normalised by kvc_lag_norm. Two passes over the
 * channels in order: mean, then squared deviations. */
KVC_HD static inline float kvc_lag_std(const void *x, int32_t dtype, int64_t off, int64_t step,
                                       const float *lo, const float *hi, int64_t n)
{
    float sum = 0.0f, ss = 0.0f, mean;
    int64_t d;
    for (d = 0; d < n; d++) sum += kvc_lag_norm(kvc_load_f32(x, dtype, off + d * step), lo[d], hi[d]);
    mean = sum / (float)n;
    for (d = 0; d < n; d++) {
        const float e = kvc_lag_norm(kvc_load_f32(x, dtype, off + d * step), lo[d], hi[d]) - mean;
        ss += e * e;
    }
    return sqrtf(ss / (float)(n - 1));
}

/* RANK-mode priority (lagkv.h) of the token whose RAW score is raw and whose
 * rank in chunk c of M is r; NaN stays NaN. */
KVC_HD static inline float kvc_lag_priority(float raw, int64_t r, int64_t c, int64_t M)
{
    return raw != raw ? raw : -(float)(r * M + (M - 1 - c));
}

#ifdef __cplusplus
}
#endif

#endif /* KVC_MATH_H */
