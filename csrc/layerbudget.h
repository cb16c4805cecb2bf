/*
 * layerbudget.h - the per-token work of the per-layer budget allocators
 * (docs/design.md, "DynamicKV" and "SqueezeAttention"):
 *
 *   pooled_counts: how many of a row's k highest candidate scores, pooled
 *                  over layers, each layer holds (DynamicKV);
 *   row_cosine:    the cosine similarity of two vectors per row (the hidden
 *                  state before and after a layer's attention, SqueezeAttention).
 */
#ifndef KVC_LAYERBUDGET_H
#define KVC_LAYERBUDGET_H

#include "kvc.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Per batch row b, with the scores s[b, l, j] of L layers' M candidates each
 * and k = k[b]:
 *
 *   counts[b, l] = number of the k largest s[b, :, :] that lie in layer l,
 *
 * ties at the k-th largest value going to the lower layer first (within a
 * layer, which tied entry is taken does not change the count). The k-th
 * largest value is found bit by bit on an order-preserving integer key
 * (kvc_lb_key), 32 counting passes, so CPU and CUDA agree exactly. -inf
 * entries (padding) rank below every finite score.
 *
 * Contract (the binding checks it once): 0 <= k[b] <= L * M, no NaN score.
 * The CPU op returns KVC_ERR_INVALID for a k outside that range and
 * KVC_ERR_NAN for a NaN; the CUDA kernel clamps k.
 */
struct kvc_pooled_counts_params {
    struct kvc_view scores; /* f32 [B, L, M] */
    struct kvc_view k;      /* i64 [B] */
    struct kvc_view counts; /* i64 [B, L], written */
    int32_t num_threads;
};

enum kvc_status kvc_pooled_counts(const struct kvc_pooled_counts_params *p);

/*
 * out[n] = x[n, :] . y[n, :] / (|x[n, :]| |y[n, :]|)   (0 when a norm is 0)
 *
 * The three sums are float32, in ascending channel order on the CPU (the
 * CUDA kernel adds in a different order: agreement within float32 rounding).
 */
struct kvc_row_cosine_params {
    struct kvc_view x;   /* [N, D], f32/f16/bf16 */
    struct kvc_view y;   /* [N, D], dtype of x */
    struct kvc_view out; /* f32 [N], written */
    int32_t num_threads;
};

enum kvc_status kvc_row_cosine(const struct kvc_row_cosine_params *p);

#ifdef __cplusplus
}
#endif

#endif /* KVC_LAYERBUDGET_H */
