/*
 * merge.h - evict-then-merge with the zero class (EMS steps 4-6 in
 * docs/design.md): every non-kept token either joins its most similar kept token
 * (a score-weighted merge) or is dropped, in one pass per (batch, kv head).
 */
#ifndef KVC_MERGE_H
#define KVC_MERGE_H

#include "kvc.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Per (b, h), with s = kv_start[b] (0 without kv_start) and the C_h centers
 * c_0 < c_1 < ... (centers[b, h, :C_h]; the rest of the row is -1):
 *
 *   sim_j   = max_i cos(k_j, k_{c_i}) over the centers, best_j its argmax
 *             (ties to the lowest i; a zero-norm key has cosine 0 with all),
 *             for every candidate j (s <= j < T, not a center);
 *   tau_h   = tau[b, h], or when that is NaN the mean of sim_j over the
 *             candidates (NaN when there is no candidate);
 *   class_j = 0 (evicted) if sim_j < tau_h or C_h == 0, else best_j + 1.
 *
 * Center i with weight W_i = S_{c_i} + sum of S_j over its class:
 *   out_values[i] = (S_{c_i} v_{c_i} + sum S_j v_j) / W_i
 *   out_keys[i]   = |k_{c_i}| * normalize(S_{c_i} u_{c_i} + sum S_j u_j),
 *                   u = k / |k| (0 for a zero key)
 *   counts[i]     = 1 + |class|, out_scores[i] = W_i.
 * A center that merged nothing is copied bit for bit (so tau = +inf is
 * plain eviction). When W_i == 0 the center's rows stay unchanged; when the
 * merged key direction vanishes (|sum| <= KVC_MERGE_DIR_EPS * W_i) or the
 * center key is zero, its key stays unchanged. Rows i >= C_h are zero.
 * Sums are fp32 in ascending token order, the outputs rounded once.
 *
 * Kernels trust their inputs: centers ascending, unique, in [s, T), -1
 * padding only at the end; scores finite and >= 0 on [s, T).
 */
#define KVC_MERGE_DIR_EPS 1e-6f

struct kvc_evict_merge_params {
    struct kvc_view keys;       /* [B, H, T, D], f32/f16/bf16 */
    struct kvc_view values;     /* [B, H, T, Dv], same dtype */
    struct kvc_view scores;     /* f32 [B, H, T] */
    struct kvc_view centers;    /* i64 [B, H, C] */
    struct kvc_view tau;        /* f32 [B, H]; NaN = adaptive */
    struct kvc_view out_keys;   /* [B, H, C, D], dtype of keys */
    struct kvc_view out_values; /* [B, H, C, Dv], dtype of keys */
    struct kvc_view counts;     /* f32 or i32 [B, H, C] */
    struct kvc_view out_scores; /* f32 [B, H, C] */
    struct kvc_view tau_used;   /* f32 [B, H] */
    struct kvc_view assign;     /* optional i64 [B, H, T] (data NULL = none):
                                   -1 padding, 0 evicted, i + 1 in center i */
    const int64_t *kv_start;    /* optional [B] */
    int64_t kv_start_stride;
    int32_t num_threads;
    void *scratch;              /* kvc_evict_merge_scratch_bytes() bytes */
    size_t scratch_bytes;
};

size_t kvc_evict_merge_scratch_bytes(const struct kvc_evict_merge_params *p);
enum kvc_status kvc_evict_merge(const struct kvc_evict_merge_params *p);

#ifdef __cplusplus
}
#endif

#endif /* KVC_MERGE_H */
