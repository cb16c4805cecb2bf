/*
 * kvmerger_math.h - per-slot math of KVMerger shared by kvmerger.c and
 * cuda/kvmerger.cu, so both backends sum in the same order.
 */
#ifndef KVC_KVMERGER_MATH_H
#define KVC_KVMERGER_MATH_H

#include "kvc_math.h"

/* Candidate slots [lo, hi) of a row: after the padding and the sinks,
 * before the recent window. */
KVC_HD static inline void kvc_kvm_range(int64_t s, int64_t sinks, int64_t window, int64_t T, int64_t *lo,
                                        int64_t *hi)
{
    const int64_t l = sinks < T - s ? s + sinks : T;
    const int64_t e = window < T ? T - window : 0;
    *lo = l;
    *hi = e > l ? e : l;
}

/* Cosine of two rows of one [.., D] view (element offsets a, b, channel step
 * st), fp32 sums in channel order; 0 when either row is zero. */
KVC_HD static inline float kvc_kvm_cos(const void *x, int32_t dtype, int64_t a, int64_t b, int64_t st, int64_t D)
{
    float dot = 0.0f, na = 0.0f, nb = 0.0f;
    int64_t d;
    for (d = 0; d < D; d++) {
        const float u = kvc_load_f32(x, dtype, a + d * st), v = kvc_load_f32(x, dtype, b + d * st);
        dot += u * v;
        na += u * u;
        nb += v * v;
    }
    if (na == 0.0f || nb == 0.0f) return 0.0f;
    /* two square roots, not sqrt(na * nb): the product can overflow fp32 */
    return dot / (sqrtf(na) * sqrtf(nb));
}

/* Squared distance of two rows, fp32 in channel order. */
KVC_HD static inline float kvc_kvm_sqdist(const void *x, int32_t dtype, int64_t a, int64_t b, int64_t st,
                                          int64_t D)
{
    float s = 0.0f;
    int64_t d;
    for (d = 0; d < D; d++) {
        const float u = kvc_load_f32(x, dtype, a + d * st) - kvc_load_f32(x, dtype, b + d * st);
        s += u * u;
    }
    return s;
}

/* Number of centers of a row (they end at the first -1). */
KVC_HD static inline int64_t kvc_kvm_ncenters(const int64_t *c, int64_t st, int64_t C)
{
    int64_t i = 0;
    while (i < C && c[i * st] >= 0) i++;
    return i;
}

/* Index of slot t among the n ascending centers, -1 when it is not one. */
KVC_HD static inline int64_t kvc_kvm_find(const int64_t *c, int64_t st, int64_t n, int64_t t)
{
    int64_t l = 0, e = n;
    while (l < e) {
        const int64_t m = l + (e - l) / 2;
        if (c[m * st] < t) l = m + 1;
        else e = m;
    }
    return l < n && c[l * st] == t ? l : -1;
}

/* The pivot (center index) of the set of center i: centers of one set are
 * consecutive in the list, since a set is an interval; the one of highest
 * score wins, ties and NaN to the lower slot. A center in no set is its own. */
KVC_HD static inline int64_t kvc_kvm_pivot(const int64_t *c, int64_t cst, int64_t n, int64_t i, const int64_t *runs,
                                           int64_t rst, const float *sc, int64_t sst)
{
    const int64_t r = runs[c[i * cst] * rst];
    int64_t i0 = i, i1 = i, best, k;
    if (r < 0) return i;
    while (i0 > 0 && runs[c[(i0 - 1) * cst] * rst] == r) i0--;
    while (i1 + 1 < n && runs[c[(i1 + 1) * cst] * rst] == r) i1++;
    best = i0;
    for (k = i0 + 1; k <= i1; k++)
        if (sc[c[k * cst] * sst] > sc[c[best * cst] * sst]) best = k;
    return best;
}

/* Gaussian weight of an absorbed slot: count * exp(-d2 / (2 sigma^2)),
 * with inv = 1 / (2 sigma^2). */
KVC_HD static inline float kvc_kvm_weight(float count, float d2, float inv)
{
    return count * kvc_expf(-d2 * inv);
}

#endif /* KVC_KVMERGER_MATH_H */
