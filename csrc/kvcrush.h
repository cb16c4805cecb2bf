/*
 * kvcrush.h - KVCrush's representative tokens (arXiv 2503.00022): every
 * token gets a binary signature with one bit per attention head, the tokens
 * the importance policy evicts are ordered by the Hamming distance of their
 * signature to an anchor, cut into equal buckets, and one token per bucket
 * stays as the bucket's representative.
 */
#ifndef KVC_KVCRUSH_H
#define KVC_KVCRUSH_H

#include "kvc.h"

#ifdef __cplusplus
extern "C" {
#endif

enum kvc_kvcrush_anchor {
    KVC_KVCRUSH_ALTERNATE = 0, /* a_h = h mod 2 */
    KVC_KVCRUSH_RANDOM = 1,    /* a_h = top bit of kvc_kvcrush_random_bit(seed, h) */
    KVC_KVCRUSH_MEAN = 2       /* a_h = majority bit of head h over the candidates */
};

/*
 * Per row b, with s = kv_start[b] (0 without it) and n = T - s valid slots:
 *
 *   threshold  thr_h = (sum_{s <= j < T} mass[b, h, j]) / n, summed in slot
 *              order in fp32 (the head's mean mass: 1/n when every query's
 *              attention row sums to 1)
 *   signature  bit_h(j) = mass[b, h, j] > thr_h  (NaN gives 0)
 *   candidates j >= s with kept[b, j] == 0; m of them
 *   anchor     per `anchor`; MEAN: a_h = 1 when 2 * #{candidates with
 *              bit_h = 1} > m
 *   distance   dist[b, j] = #{h : bit_h(j) != a_h} for a candidate, -1 for
 *              padding and kept slots
 *   buckets    candidates ranked by (distance, slot) ascending; with
 *              G = picks.shape[1]: when m > G, picks[b, g] = the candidate
 *              of rank floor(g * m / G) (the first of bucket g, the buckets
 *              being the rank ranges [floor(g m / G), floor((g + 1) m / G)));
 *              when m <= G, picks[b, g] = the candidate of rank g for
 *              g < m and -1 after.
 *
 * Ranks are found by a counting pass over the H + 1 distances, then one scan
 * in slot order, so no sort is needed and the result does not depend on
 * threads. Each row is one sequential unit on the CPU.
 */
struct kvc_kvcrush_pick_params {
    struct kvc_view mass;    /* f32 [B, H, T]: attention mass per head (query heads) */
    struct kvc_view kept;    /* u8 [B, T]: 1 = kept by the importance policy */
    struct kvc_view picks;   /* i64 [B, G] (out) */
    struct kvc_view dist;    /* i64 [B, T] (out) */
    const int64_t *kv_start; /* optional [B]: leading padded slots; NULL = none */
    int64_t kv_start_stride;
    int64_t seed;            /* RANDOM anchor only */
    int32_t anchor;          /* enum kvc_kvcrush_anchor */
    int32_t num_threads;
    void *scratch;           /* kvc_kvcrush_pick_scratch_bytes() bytes */
    size_t scratch_bytes;
};

size_t kvc_kvcrush_pick_scratch_bytes(const struct kvc_kvcrush_pick_params *p);
enum kvc_status kvc_kvcrush_pick(const struct kvc_kvcrush_pick_params *p);

#ifdef __cplusplus
}
#endif

#endif /* KVC_KVCRUSH_H */
