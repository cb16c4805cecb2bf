/*
 * lsh_math.h - the per-key math of MagicPIG's sampled attention (lsh.c,
 * cuda/lsh.cu): SimHash collision probabilities.
 *
 * For random Gaussian hyperplanes a sign bit of q and of x agree with
 * probability u = 1 - theta / pi (theta the angle between them); a table of
 * K bits collides with probability u^K; over L independent tables the hit
 * count is Binomial(L, u^K), and a key is sampled when it reaches `hits`.
 */
#ifndef KVC_LSH_MATH_H
#define KVC_LSH_MATH_H

#include <math.h>

#include "kvc.h"

/* log P[Binomial(L, u^K) >= hits] for cos(theta) = c, in double: the
 * probability can be far below FLT_MIN for nearly opposite vectors. */
KVC_HD static inline double kvc_lsh_log_inclusion(double c, int32_t K, int32_t L, int32_t hits)
{
    const double PI = 3.14159265358979323846;
    double u, p, below = 0.0, term;
    int32_t i;
    c = c > 1.0 ? 1.0 : (c < -1.0 ? -1.0 : c);
    u = 1.0 - acos(c) / PI;
    p = pow(u, (double)K);
    if (p >= 1.0) return 0.0;
    /* P[X < hits] = sum_{i < hits} C(L, i) p^i (1 - p)^(L - i) */
    term = pow(1.0 - p, (double)L);
    for (i = 0; i < hits && i <= L; i++) {
        below += term;
        term *= (double)(L - i) / (double)(i + 1) * p / (1.0 - p);
    }
    return below >= 1.0 ? -INFINITY : log1p(-below);
}

#endif /* KVC_LSH_MATH_H */
