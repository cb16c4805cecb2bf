/*
 * layerbudget_math.h - per-element math shared by the CPU and CUDA versions of
 * the layer-budget ops (layerbudget.h): the order-preserving key of a float
 * score, and one row's cosine similarity.
 */
#ifndef KVC_LAYERBUDGET_MATH_H
#define KVC_LAYERBUDGET_MATH_H

#include "kvc_math.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A uint32 whose unsigned order is the float order (-inf lowest, +inf
 * highest; -0 just below +0): the bit-by-bit search for the k-th largest
 * score then needs no float comparison and both backends agree exactly. */
KVC_HD static inline uint32_t kvc_lb_key(float s)
{
    const uint32_t u = kvc_f32_bits(s);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* cos(x, y) from the float32 sums x.y, |x|^2, |y|^2; 0 when either vector is
 * zero (a zero hidden state has no direction). */
KVC_HD static inline float kvc_lb_cosine(float xy, float xx, float yy)
{
    return (xx > 0.0f && yy > 0.0f) ? xy / (sqrtf(xx) * sqrtf(yy)) : 0.0f;
}

#ifdef __cplusplus
}
#endif

#endif /* KVC_LAYERBUDGET_MATH_H */
