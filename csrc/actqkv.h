/*
 * actqkv.h - ActQKV scores (arXiv 2502.13542): the window's queries are
 * folded into one activation-aware probe query per head, which then scores
 * every key with one softmax.
 */
#ifndef KVC_ACTQKV_H
#define KVC_ACTQKV_H

#include "kvc.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Per row b and query head h, with s = kv_start[b] (0 without it): window
 * query i sits at key position Tk - W + i; those before s are padding, and
 * the m others (i >= i0 = max(0, s - (Tk - W))) build the probe with
 * kvc_actqkv_probe (actqkv_math.h): activation weights w_i (weights[b, h, i],
 * 0 for padding queries) and probe = sum_i w_i q_i. Then
 *
 *   head[j] = softmax over s <= j < Tk of scaling * probe . k_j   (0 for j < s)
 *   out[b, hk, j] = mean of head[j] over the g = Hq / Hkv query heads of hk,
 *                   added in head order
 *
 * The probe sees every key (it stands for the whole window, not one
 * position). A row with no real window query (m = 0) scores 0 everywhere.
 * Accumulation is fp32; each (b, h) is one sequential unit and the group
 * mean runs in head order, so results do not depend on the thread count.
 */
struct kvc_actqkv_scores_params {
    struct kvc_view q;       /* [B, Hq, W, D], f32/f16/bf16 */
    struct kvc_view k;       /* [B, Hkv, Tk, D], same dtype as q; W <= Tk */
    struct kvc_view out;     /* f32 [B, Hkv, Tk] */
    struct kvc_view weights; /* f32 [B, Hq, W] */
    const int64_t *kv_start; /* optional [B]: leading padded keys; NULL = none */
    int64_t kv_start_stride;
    float scaling;
    int32_t num_threads;
    void *scratch;           /* kvc_actqkv_scores_scratch_bytes() bytes */
    size_t scratch_bytes;
};

size_t kvc_actqkv_scores_scratch_bytes(const struct kvc_actqkv_scores_params *p);
enum kvc_status kvc_actqkv_scores(const struct kvc_actqkv_scores_params *p);

#ifdef __cplusplus
}
#endif

#endif /* KVC_ACTQKV_H */
