/*
 * score.h - token scores: attention over a query window, vector norms, and
 * the 1-D pooling SnapKV applies to scores.
 */
#ifndef KVC_SCORE_H
#define KVC_SCORE_H

#include "kvc.h"

#ifdef __cplusplus
extern "C" {
#endif

enum kvc_gqa_reduce { KVC_GQA_MEAN = 0, KVC_GQA_MAX = 1 };
enum kvc_pool_mode { KVC_POOL_MAX = 0, KVC_POOL_AVG = 1 };

/*
 * out[b, hk, j] = reduce over the g = Hq/Hkv query heads h of kv head hk
 * (h // g == hk) of mean over the Tq queries i of softmax_j(scaling * q_i.k_j),
 * the softmax running over kv_start[b] <= j <= Tk - Tq + i (query i sits at
 * key position Tk - Tq + i). Keys before kv_start[b] score 0; a query that
 * sees no key contributes 0. Accumulation is fp32.
 */
struct kvc_window_scores_params {
    struct kvc_view q;       /* [B, Hq, Tq, D], f32/f16/bf16 */
    struct kvc_view k;       /* [B, Hkv, Tk, D], same dtype as q */
    struct kvc_view out;     /* f32 [B, Hkv, Tk] */
    const int64_t *kv_start; /* optional [B]: leading padded keys; NULL = none */
    int64_t kv_start_stride;
    float scaling;
    int32_t gqa;             /* enum kvc_gqa_reduce */
    int32_t num_threads;
    void *scratch;           /* kvc_window_scores_scratch_bytes() bytes */
    size_t scratch_bytes;
};

size_t kvc_window_scores_scratch_bytes(const struct kvc_window_scores_params *p);
enum kvc_status kvc_window_scores(const struct kvc_window_scores_params *p);

/* out[b, h, t] = sum_d |x| (ord 1) or sqrt(sum_d x^2) (ord 2), fp32. */
struct kvc_vector_norm_params {
    struct kvc_view x;   /* [B, H, T, D], f32/f16/bf16 */
    struct kvc_view out; /* f32 [B, H, T] */
    int32_t ord;         /* 1 or 2 */
    int32_t num_threads;
};

enum kvc_status kvc_vector_norm(const struct kvc_vector_norm_params *p);

/* Same-size pooling along the last axis with padding kernel/2: max ignores
 * the padding, avg counts it (divides by kernel), as torch's
 * max_pool1d/avg_pool1d(stride=1, padding=kernel//2, count_include_pad). */
struct kvc_pool1d_params {
    struct kvc_view in;  /* f32 [B, H, T] */
    struct kvc_view out; /* f32 [B, H, T] */
    int64_t kernel;      /* odd, >= 1 */
    int32_t mode;        /* enum kvc_pool_mode */
    int32_t num_threads;
};

enum kvc_status kvc_pool1d(const struct kvc_pool1d_params *p);

#ifdef __cplusplus
}
#endif

#endif /* KVC_SCORE_H */
