/*
 * actqkv_math.h - ActQKV's activation-aware probe query (actqkv.c,
 * cuda/actqkv.cu): one function, run by one thread per (row, query head) on
 * both backends, so the weights and the probe are computed in the same
 * order everywhere.
 */
#ifndef KVC_ACTQKV_MATH_H
#define KVC_ACTQKV_MATH_H

#include <stdint.h>

#include "kvc_math.h"

/*
 * q: the m window queries of one head, dense fp32 [m, D] (m >= 1).
 * mu, var: [D] scratch; w: [m] out, the activation weights; probe: [D] out.
 *
 *   mu_d  = mean_i q[i, d],  var_d = mean_i (q[i, d] - mu_d)^2   (population)
 *   eps   = mean_d var_d / 100
 *   bias_i = mean_d (q[i, d] - mu_d)^2 / (var_d + eps)
 *   w_i   = bias_i / sum_i bias_i   (1/m when every bias is 0: m = 1, or
 *                                    identical queries)
 *   probe = sum_i w_i q[i]
 *
 * eps keeps a channel that hardly varies from turning a rounding-level
 * deviation into a large bias (the authors' code regularises the variance by
 * its mean / 100 in the same place). Every sum runs in index order, fp32.
 */
KVC_HD static inline void kvc_actqkv_probe(const float *q, int64_t m, int64_t D, float *mu, float *var, float *w,
                                           float *probe)
{
    const float inv_m = 1.0f / (float)m;
    float eps = 0.0f, total = 0.0f;
    int64_t i, d;
    for (d = 0; d < D; d++) {
        float s = 0.0f, v = 0.0f;
        for (i = 0; i < m; i++) s += q[i * D + d];
        s *= inv_m;
        for (i = 0; i < m; i++) {
            const float x = q[i * D + d] - s;
            v += x * x;
        }
        mu[d] = s;
        var[d] = v * inv_m;
        eps += var[d];
    }
    eps = eps / (float)D / 100.0f;
    for (i = 0; i < m; i++) {
        float b = 0.0f;
        if (eps > 0.0f)
            for (d = 0; d < D; d++) {
                const float x = q[i * D + d] - mu[d];
                b += x * x / (var[d] + eps);
            }
        w[i] = b / (float)D;
        total += w[i];
    }
    for (i = 0; i < m; i++) w[i] = total > 0.0f ? w[i] / total : inv_m;
    for (d = 0; d < D; d++) {
        float s = 0.0f;
        for (i = 0; i < m; i++) s += w[i] * q[i * D + d];
        probe[d] = s;
    }
}

#endif /* KVC_ACTQKV_MATH_H */
