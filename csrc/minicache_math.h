/*
 * minicache_math.h - per-token math of MiniCache's cross-layer merge
 * (minicache.c), shared with the CUDA kernels (cuda/minicache.cu) so both
 * backends take the same branches. Same rules as kvc_math.h: KVC_HD static
 * inline, common subset of C11 and C++.
 */
#ifndef KVC_MINICACHE_MATH_H
#define KVC_MINICACHE_MATH_H

#include <math.h>

#include "kvc_math.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Below this sin(Omega) the SLERP weights are 0/0-like (parallel or
 * antipodal directions): the linear fallback takes over. */
#define KVC_SLERP_SIN_EPS 1e-6f
/* A linear blend shorter than this has no direction (antipodal pair at
 * t = 1/2): the nearer endpoint's direction is used instead. */
#define KVC_SLERP_DIR_EPS 1e-6f
/* pi in float (M_PI is not ISO C11) */
#define KVC_SLERP_PI 3.14159265358979323846f

/* Merge one token's vectors of two layers (fp32 rows of n elements).
 *
 * In place u1 <- x1 / |x1|, u2 <- x2 / |x2| (a zero row stays zero); then
 *   Omega = 2 atan2(|u1 - u2|, |u1 + u2|)   (the angle, accurate near 0 and pi
 *                                             where acos(u1.u2) is not)
 *   e     = u1 if t == 0, u2 if t == 1 (bit exact: those ends must reproduce
 *           their layer), else
 *           sin((1-t) Omega)/sin Omega u1 + sin(t Omega)/sin Omega u2,
 *           or when sin Omega < KVC_SLERP_SIN_EPS the renormalised linear
 *           blend (1-t) u1 + t u2 (the SLERP limit for Omega -> 0; for an
 *           antipodal pair with no blend direction, u1 if t <= 1/2 else u2).
 * A zero row takes the other row's direction (its own reconstruction is 0
 * whatever e is), and then Omega = 0. Returns Omega / pi in [0, 1]; the
 * norms go to *n1, *n2. */
KVC_HD static inline float kvc_slerp_row(float *e, float *u1, float *u2, int64_t n, float t,
                                         float *n1, float *n2)
{
    float a = sqrtf(kvc_dot_f32(u1, u1, n)), b = sqrtf(kvc_dot_f32(u2, u2, n));
    float dm = 0.0f, dp = 0.0f, omega, s, w1, w2;
    int64_t i;
    *n1 = a;
    *n2 = b;
    if (a > 0.0f)
        for (i = 0; i < n; i++) u1[i] = u1[i] / a;
    if (b > 0.0f)
        for (i = 0; i < n; i++) u2[i] = u2[i] / b;
    if (!(a > 0.0f) || !(b > 0.0f)) {
        const float *src = a > 0.0f ? u1 : u2;
        for (i = 0; i < n; i++) e[i] = src[i];
        return 0.0f;
    }
    for (i = 0; i < n; i++) {
        const float d = u1[i] - u2[i], p = u1[i] + u2[i];
        dm += d * d;
        dp += p * p;
    }
    omega = 2.0f * atan2f(sqrtf(dm), sqrtf(dp));
    if (t == 0.0f || t == 1.0f) {
        const float *src = t == 0.0f ? u1 : u2;
        for (i = 0; i < n; i++) e[i] = src[i];
        return omega / KVC_SLERP_PI;
    }
    s = sinf(omega);
    if (s >= KVC_SLERP_SIN_EPS) {
        w1 = sinf((1.0f - t) * omega) / s;
        w2 = sinf(t * omega) / s;
        for (i = 0; i < n; i++) e[i] = w1 * u1[i] + w2 * u2[i];
    } else {
        float len;
        for (i = 0; i < n; i++) e[i] = (1.0f - t) * u1[i] + t * u2[i];
        len = sqrtf(kvc_dot_f32(e, e, n));
        if (len > KVC_SLERP_DIR_EPS) {
            for (i = 0; i < n; i++) e[i] = e[i] / len;
        } else {
            const float *src = t <= 0.5f ? u1 : u2;
            for (i = 0; i < n; i++) e[i] = src[i];
        }
    }
    return omega / KVC_SLERP_PI;
}

/* One row of the online softmax of kvc_minicache_attention: logit x, value
 * row v (Dv fp32) scaled by vs; acc (Dv) and the state updated in place. */
KVC_HD static inline void kvc_mc_push(struct kvc_softmax_state *st, float *acc, float x, const float *v, float vs,
                                      int64_t Dv)
{
    int64_t d;
    float w;
    if (x > st->m) {
        const float alpha = st->m == -INFINITY ? 0.0f : kvc_expf(st->m - x);
        for (d = 0; d < Dv; d++) acc[d] *= alpha;
        st->s *= alpha;
        st->m = x;
    }
    w = kvc_expf(x - st->m);
    st->s += w;
    for (d = 0; d < Dv; d++) acc[d] += w * vs * v[d];
}

#ifdef __cplusplus
}
#endif

#endif /* KVC_MINICACHE_MATH_H */
