/*
 * lsh.h - MagicPIG (LSH-sampled attention): SimHash codes of keys and
 * queries, and attention estimated from the keys that collide with the query.
 */
#ifndef KVC_LSH_H
#define KVC_LSH_H

#include "attention.h" /* enum kvc_kv_layout */
#include "kvc.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * codes[b, h, j, t] = sum_{k < K} [planes[h / group, t * K + k] . (x[b, h, j] - center[b, h / group])
 *                     > 0] << k
 * for t < L: L tables of K sign bits (K <= 30). The dot product runs in
 * fp32 in the lane order of kvc_dot_f32. Without center, x is hashed as is.
 */
struct kvc_simhash_params {
    struct kvc_view x;      /* [B, H, n, D] f32/f16/bf16 */
    struct kvc_view planes; /* f32 [H / group, L * K, D] */
    struct kvc_view center; /* optional f32 [B, H / group, D]; data NULL: none */
    struct kvc_view codes;  /* i32 [B, H, n, L] */
    int32_t K, L, group;
    int32_t num_threads;
};

enum kvc_status kvc_simhash(const struct kvc_simhash_params *p);

/*
 * One decode query per row. For query head hq (kv head h = hq / g) the
 * slots of head (b, h) are, uniform layout: slots kv_start[b] .. n - 1 of
 * k, v, codes (and counts) [b, h]; ragged layout: slots 0 .. n_h - 1, n_h =
 * lengths[b * H + h], slot j being row offsets[b * H + h] + j of k, v, codes
 * (and counts), H = num_kv_heads. They split into
 *   static: the first `sinks` slots and the last `window` slots, read
 *           exactly (log-weight s q.k_j + log c_j);
 *   sampled: any other slot whose codes agree with the query's in at least
 *           `hits` of the L tables, with log-weight s q.k_j + log c_j - log
 *           p_j, p_j = P[Binomial(L, u_j^K) >= hits] its inclusion
 *           probability (lsh_math.h; the angle is taken between q and k_j -
 *           center);
 *   others are skipped.
 * c_j is slot j's merge count (a slot standing for c_j tokens weighs c_j),
 * 1 without counts (no log term at all, so results are those of the op
 * without counts bit for bit).
 * out = sum e^{w_j} v_j / sum e^{w_j} (online softmax in fp32), and lse =
 * log sum e^{w_j}: an unbiased estimate, in e^lse, of the full normaliser
 * sum_j c_j e^{s q.k_j}, the sampled part weighted by 1 / p_j (importance
 * sampling). A query that includes nothing (an empty ragged head, a row all
 * padding) gets zeros and lse -inf. reads, when given, is the number of
 * slots the query head read (static and sampled): what the sampling saved.
 * The binding checks the segments (inside k, pairwise disjoint) and the
 * counts (finite, > 0) once.
 */
struct kvc_lsh_attention_params {
    struct kvc_view q;       /* [B, Hq, 1, D] */
    struct kvc_view k;       /* uniform [B, H, n, D] / ragged [R, D], dtype of q */
    struct kvc_view v;       /* same shape and dtype as k (strides may differ) */
    struct kvc_view codes;   /* i32 uniform [B, H, n, L] / ragged [R, L] */
    struct kvc_view qcodes;  /* i32 [B, Hq, 1, L] */
    struct kvc_view center;  /* optional f32 [B, H, D] */
    struct kvc_view counts;  /* optional f32/i32 uniform [B, H, n] / ragged [R], finite, > 0;
                              * data NULL: none */
    struct kvc_view out;     /* [B, 1, Hq, D], dtype of q */
    struct kvc_view lse;     /* optional f32 [B, Hq] */
    struct kvc_view reads;   /* optional i32 [B, Hq] */
    const int64_t *kv_start; /* uniform, optional [B] */
    int64_t kv_start_stride;
    const int64_t *offsets;  /* ragged [B * H]: first row of each head's segment */
    int64_t offsets_stride;
    const int64_t *lengths;  /* ragged [B * H]: slots of each head, >= 0 */
    int64_t lengths_stride;
    int64_t num_kv_heads;    /* ragged: H (uniform: k.shape[1]) */
    int32_t layout;          /* enum kvc_kv_layout */
    int64_t sinks, window;
    int32_t K, L, hits;
    float scaling;
    int32_t num_threads;
};

enum kvc_status kvc_lsh_attention(const struct kvc_lsh_attention_params *p);

#ifdef __cplusplus
}
#endif

#endif /* KVC_LSH_H */
