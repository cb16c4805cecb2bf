/*
 * merge_math.h - per-row math of evict-then-merge (merge.c), shared with
 * the future CUDA kernel so both round the same way. Same rules as
 * kvc_math.h: KVC_HD static inline, common subset of C11 and C++.
 */
#ifndef KVC_MERGE_MATH_H
#define KVC_MERGE_MATH_H

#include "kvc_math.h"

#ifdef __cplusplus
extern "C" {
#endif

/* In place: x <- x / |x| (fp32, fixed lane order); returns |x|. A zero row
 * stays zero, so its cosine with anything is 0. */
KVC_HD static inline float kvc_merge_unit(float *x, int64_t n)
{
    float nrm = sqrtf(kvc_dot_f32(x, x, n));
    int64_t i;
    if (nrm > 0.0f)
        for (i = 0; i < n; i++) x[i] = x[i] / nrm;
    return nrm;
}

/* acc += w * x */
KVC_HD static inline void kvc_merge_axpy(float *acc, float w, const float *x, int64_t n)
{
    int64_t i;
    for (i = 0; i < n; i++) acc[i] += w * x[i];
}

/* Merged key direction -> key with the center's norm: acc <- acc * (cnorm /
 * |acc|). Returns 0 (acc untouched) when the direction is lost: |acc| at or
 * below KVC_MERGE_DIR_EPS of the total weight w (cancelling unit vectors;
 * the rounding noise of the sum is then of the order of the result). */
KVC_HD static inline int kvc_merge_key_rescale(float *acc, int64_t n, float cnorm, float w,
                                               float eps)
{
    float a = sqrtf(kvc_dot_f32(acc, acc, n)), scale;
    int64_t i;
    if (!(a > eps * w) || !(cnorm > 0.0f)) return 0;
    scale = cnorm / a;
    for (i = 0; i < n; i++) acc[i] *= scale;
    return 1;
}

/* Round a dense fp32 row once into a float-typed buffer (any stride). */
KVC_HD static inline void kvc_merge_store_row(void *dst, int32_t dtype, const float *src,
                                              int64_t n, int64_t stride)
{
    int64_t i;
    if (dtype == KVC_F16) {
        uint16_t *d = (uint16_t *)dst;
        for (i = 0; i < n; i++) d[i * stride] = kvc_f32_to_f16(src[i]);
    } else if (dtype == KVC_BF16) {
        uint16_t *d = (uint16_t *)dst;
        for (i = 0; i < n; i++) d[i * stride] = kvc_f32_to_bf16(src[i]);
    } else {
        float *d = (float *)dst;
        for (i = 0; i < n; i++) d[i * stride] = src[i];
    }
}

#ifdef __cplusplus
}
#endif

#endif /* KVC_MERGE_MATH_H */
