/*
 * keyformer_math.h - the Gumbel noise of Keyformer's score (keyformer.c,
 * cuda/keyformer.cu): a counter-based hash, so both backends (and the tests'
 * NumPy reference) draw the same noise for the same (seed, layer, head, key,
 * query, step) without any random state.
 */
#ifndef KVC_KEYFORMER_MATH_H
#define KVC_KEYFORMER_MATH_H

#include <math.h>
#include <stdint.h>

#include "kvc_math.h"

/* SplitMix64's finaliser: a bijection of 64-bit words with full avalanche. */
KVC_HD static inline uint64_t kvc_mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* h = mix(seed + G); then h = mix((h ^ w) + G) for w = layer, head, key,
 * query, step in that order (G the golden-ratio constant, arithmetic mod
 * 2^64). */
KVC_HD static inline uint64_t kvc_keyformer_hash(uint64_t seed, uint64_t layer, uint64_t head,
                                                 uint64_t key, uint64_t query, uint64_t step)
{
    const uint64_t G = 0x9e3779b97f4a7c15ULL;
    uint64_t h = kvc_mix64(seed + G);
    h = kvc_mix64((h ^ layer) + G);
    h = kvc_mix64((h ^ head) + G);
    h = kvc_mix64((h ^ key) + G);
    h = kvc_mix64((h ^ query) + G);
    return kvc_mix64((h ^ step) + G);
}

/* Standard Gumbel sample from a hash: u = (top 53 bits + 1/2) / 2^53 in
 * (0, 1), g = -log(-log(u)) in double, rounded to float (about [-3.6, 37.4]). */
KVC_HD static inline float kvc_gumbel(uint64_t h)
{
    const double u = ((double)(h >> 11) + 0.5) * 1.1102230246251565e-16; /* 2^-53 */
    return (float)(-log(-log(u)));
}

#endif /* KVC_KEYFORMER_MATH_H */
