/*
 * kvcrush_math.h - the per-element rules of KVCrush's pick (kvcrush.c,
 * cuda/kvcrush.cu), shared so both backends decide identically.
 */
#ifndef KVC_KVCRUSH_MATH_H
#define KVC_KVCRUSH_MATH_H

#include <stdint.h>

#include "keyformer_math.h"
#include "kvc_math.h"
#include "kvcrush.h"

/* Bit h of the RANDOM anchor: the top bit of mix(mix(seed + G) + h), a
 * counter-based draw, so every backend, thread count and the tests' NumPy
 * reference get the same anchor for the same seed. */
KVC_HD static inline int kvc_kvcrush_random_bit(uint64_t seed, uint64_t h)
{
    const uint64_t G = 0x9e3779b97f4a7c15ULL;
    return (int)(kvc_mix64(kvc_mix64(seed + G) + h) >> 63);
}

/* Anchor bit h for the modes that need no pass over the tokens (MEAN is
 * the majority of the candidates' bits, counted by the caller). */
KVC_HD static inline int kvc_kvcrush_fixed_bit(int32_t anchor, uint64_t seed, int64_t h)
{
    return anchor == KVC_KVCRUSH_RANDOM ? kvc_kvcrush_random_bit(seed, (uint64_t)h) : (int)(h & 1);
}

/* Bucket whose first rank is r among m > G candidates, or -1: bucket g
 * starts at floor(g m / G), so the only candidate is g = ceil(r G / m). */
KVC_HD static inline int64_t kvc_kvcrush_bucket(int64_t r, int64_t m, int64_t G)
{
    int64_t g;
    if (m <= G) return r < G ? r : -1;
    g = (r * G + m - 1) / m;
    return g < G && g * m / G == r ? g : -1;
}

#endif /* KVC_KVCRUSH_MATH_H */
