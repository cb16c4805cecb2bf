/*
 * span.h - span_merge: the count-weighted mean of one contiguous span of
 * slots per (batch, kv head), RazorAttention's compensation token
 * (docs/design.md, "RazorAttention").
 */
#ifndef KVC_SPAN_H
#define KVC_SPAN_H

#include "kvc.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Per (b, h), with the span [l, e) = [lo[b, h], hi[b, h]) and the weights
 * c_j = counts[b, h, j] (1 for every slot without counts):
 *
 *   W                    = sum_{l <= j < e} c_j
 *   out_keys[b, h, :]    = sum c_j k_j / W
 *   out_values[b, h, :]  = sum c_j v_j / W
 *   out_counts[b, h]     = W
 *
 * An empty span (l == e) gives zero rows and W = 0. Sums are double, in
 * ascending j; each product c_j k_j of two floats is exact in double, so a
 * fused multiply-add gives the same sum and both backends agree bit for bit.
 * The mean is one double division, rounded to float32 and then, for
 * float16/bfloat16, to the storage dtype; W is rounded to float32 once.
 *
 * Contract (the binding checks it once): 0 <= lo <= hi <= T, every count on
 * a span finite and > 0. The CPU op returns KVC_ERR_INVALID for a span
 * outside [0, T]; the CUDA kernel treats such a span as empty.
 */
struct kvc_span_merge_params {
    struct kvc_view keys;       /* [B, H, T, D], f32/f16/bf16 */
    struct kvc_view values;     /* [B, H, T, Dv], same dtype */
    struct kvc_view counts;     /* optional f32 [B, H, T] (data NULL = 1 each) */
    struct kvc_view lo;         /* i64 [B, H] */
    struct kvc_view hi;         /* i64 [B, H] */
    struct kvc_view out_keys;   /* [B, H, D], dtype of keys */
    struct kvc_view out_values; /* [B, H, Dv], dtype of keys */
    struct kvc_view out_counts; /* f32 [B, H] */
    int32_t num_threads;
    void *scratch;              /* kvc_span_merge_scratch_bytes() bytes */
    size_t scratch_bytes;
};

size_t kvc_span_merge_scratch_bytes(const struct kvc_span_merge_params *p);
enum kvc_status kvc_span_merge(const struct kvc_span_merge_params *p);

#ifdef __cplusplus
}
#endif

#endif /* KVC_SPAN_H */
