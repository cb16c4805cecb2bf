/*
 * score_global.h - the EMS global score: mean attention a key receives from
 * every query that can see it, computed exactly without the T x Tq matrix.
 */
#ifndef KVC_SCORE_GLOBAL_H
#define KVC_SCORE_GLOBAL_H

#include "kvc.h"
#include "score.h" /* enum kvc_gqa_reduce */

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Query i sits at key position pos_i = q_pos[i] (strictly increasing, in
 * [0, T)); q_pos NULL means pos_i = T - Tq + i. With s = kv_start[b] (0 when
 * NULL), A_ij = softmax over s <= j <= pos_i of scaling * q_i.k_j, and for
 * each query head h
 *
 *     G_h[j] = sum_{i: pos_i >= j} A_ij / #{i: pos_i >= j}     (s <= j)
 *
 * (a query with pos_i < s is padding: it sees no key and counts nowhere).
 * G is 0 for j < s and for keys after the last query. out[b, hk, j] reduces
 * G over the g = Hq/Hkv query heads of kv head hk by mean or max.
 *
 * Exact in fp32 with a max-shifted softmax; rows of logits are built a
 * chunk of queries at a time, so memory is O(chunk x T), never O(Tq x T).
 * Sums run in an order fixed by the shapes alone: bit-identical for any
 * thread count.
 */
struct kvc_global_scores_params {
    struct kvc_view q;       /* [B, Hq, Tq, D], f32/f16/bf16 */
    struct kvc_view k;       /* [B, Hkv, T, D], same dtype as q; Hq = g * Hkv, g >= 1 */
    struct kvc_view out;     /* f32 [B, Hkv, T] */
    const int64_t *q_pos;    /* optional [Tq]; NULL = the last Tq positions */
    int64_t q_pos_stride;
    const int64_t *kv_start; /* optional [B]: leading padded keys, in [0, T] */
    int64_t kv_start_stride;
    float scaling;
    int32_t gqa;             /* enum kvc_gqa_reduce */
    int32_t num_threads;
    void *scratch;           /* kvc_global_scores_scratch_bytes() bytes */
    size_t scratch_bytes;
};

size_t kvc_global_scores_scratch_bytes(const struct kvc_global_scores_params *p);
enum kvc_status kvc_global_scores(const struct kvc_global_scores_params *p);

#ifdef __cplusplus
}
#endif

#endif /* KVC_SCORE_GLOBAL_H */
