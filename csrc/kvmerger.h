/*
 * kvmerger.h - KVMerger (arXiv 2407.08454): merging sets as runs of
 * consecutive slots whose keys are similar to their neighbour's, and the
 * Gaussian-kernel merge of a run into its pivot (docs/design.md, "KVMerger").
 */
#ifndef KVC_KVMERGER_H
#define KVC_KVMERGER_H

#include "kvc.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Merging sets. Per row b and head h, with s = kv_start[b] (0 without it),
 * the candidates are the slots [lo, hi), lo = min(s + sinks, T),
 * hi = max(lo, T - window): sinks and the recent window never join a set
 * (they are kept whole).
 *
 *   sims[b, h, j] = cos(k_{j-1}, k_j)   for lo < j < hi, NaN elsewhere
 *                   (0 when either key is zero)
 *   runs[b, h, j] = lo                  for j == lo
 *                 = runs[b, h, j-1]     for lo < j < hi with sims[j] > threshold
 *                 = j                   for other candidates (a new set)
 *                 = -1                  outside [lo, hi)
 *
 * so runs[j] names the first slot of j's set (the paper's greedy scan joins
 * a key to its neighbour's set when their cosine exceeds the threshold; a
 * NaN cosine starts a new set). Sums are fp32 in channel order. Each (b, h)
 * is one sequential unit: results do not depend on the thread count.
 */
struct kvc_kvmerger_sets_params {
    struct kvc_view keys;    /* [B, H, T, D], f32/f16/bf16 */
    struct kvc_view sims;    /* f32 [B, H, T] out */
    struct kvc_view runs;    /* i64 [B, H, T] out */
    const int64_t *kv_start; /* optional [B]; NULL = no padding */
    int64_t kv_start_stride;
    int64_t sinks;           /* >= 0 */
    int64_t window;          /* >= 0 */
    float threshold;
    int32_t num_threads;
};

enum kvc_status kvc_kvmerger_sets(const struct kvc_kvmerger_sets_params *p);

/*
 * Gaussian-kernel merge. Per (b, h), the centers c_0 < c_1 < ... (the kept
 * slots, -1 padded at the end) each give one output row. A center j with
 * runs[j] = r >= 0 belongs to set r; the set's pivot is its center of
 * highest score (ties and NaN to the lower slot). The pivot p absorbs every
 * NON-center slot t of its set (runs[t] == r) with the weight
 *
 *   w_t = count_t * exp(-|k_p - k_t|^2 / (2 sigma^2)),   w_p = count_p
 *
 *   out_keys[c]   = sum_t w_t k_t / sum_t w_t     (t over p and the absorbed)
 *   out_values[c] = sum_t w_t v_t / sum_t w_t
 *   out_counts[c] = sum_t count_t
 *
 * (count = 1 for every slot without counts). Any other center, and a pivot
 * that absorbs nothing, is copied bit for bit with its own count. A
 * non-center slot whose set has no center, or that is in no set, is dropped.
 * Sums are fp32 in ascending slot order; each output is rounded once.
 * Rows past a head's centers are zero. assign (optional): -1 for padding
 * (t < kv_start[b]), i + 1 for center c_i and for the slots c_i absorbed,
 * 0 for dropped slots.
 *
 * Contract (the binding checks it): centers ascending in [kv_start[b], T),
 * -1 only at the end; runs[j] is -1, j, or (j > 0) runs[j-1] >= 0, so every
 * set is one interval starting at its own id; counts finite and > 0 on
 * valid slots; sigma > 0.
 */
struct kvc_gauss_merge_params {
    struct kvc_view keys;       /* [B, H, T, D], f32/f16/bf16 */
    struct kvc_view values;     /* [B, H, T, Dv], same dtype */
    struct kvc_view scores;     /* f32 [B, H, T] */
    struct kvc_view centers;    /* i64 [B, H, C] */
    struct kvc_view runs;       /* i64 [B, H, T] */
    struct kvc_view counts;     /* optional f32 [B, H, T] (data NULL = 1 each) */
    struct kvc_view out_keys;   /* [B, H, C, D], dtype of keys */
    struct kvc_view out_values; /* [B, H, C, Dv], dtype of keys */
    struct kvc_view out_counts; /* f32 [B, H, C] */
    struct kvc_view assign;     /* optional i64 [B, H, T] (data NULL = not written) */
    const int64_t *kv_start;    /* optional [B] */
    int64_t kv_start_stride;
    float sigma;                /* > 0 */
    int32_t num_threads;
    void *scratch;              /* kvc_gauss_merge_scratch_bytes() bytes */
    size_t scratch_bytes;
};

size_t kvc_gauss_merge_scratch_bytes(const struct kvc_gauss_merge_params *p);
enum kvc_status kvc_gauss_merge(const struct kvc_gauss_merge_params *p);

#ifdef __cplusplus
}
#endif

#endif /* KVC_KVMERGER_H */
