/*
 * keyformer.h - Keyformer's per-slot score: attention with Gumbel noise on
 * the logits and a softmax temperature, summed over a chunk's queries.
 */
#ifndef KVC_KEYFORMER_H
#define KVC_KEYFORMER_H

#include "kvc.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Query i of the chunk sits at key position p_i = Tk - Tq + i and sees the
 * keys s <= j <= p_i (s = kv_start[b]). For query head h (kv head h / g,
 * g = Hq / Hkv) its noisy, tempered logits are
 *   z_ij = (scaling * q_i . k_j + noise * G(seed, layer, h, j - s, p_i - s, step)) / tau
 * with G the standard Gumbel sample of keyformer_math.h (not drawn when
 * noise is 0), and
 *   out[b, hk, j] = (1 / g) sum_{h of hk} sum_i softmax_j(z_i)[j]:
 * the sum over the chunk's queries of the score softmax, averaged over the
 * query heads of the kv head. Keys before s score 0; a query that sees no
 * key adds nothing. Dot products, softmax and sums are fp32 (the queries
 * of a head added in order), the noise is computed in double.
 */
struct kvc_keyformer_scores_params {
    struct kvc_view q;       /* [B, Hq, Tq, D], f32/f16/bf16 */
    struct kvc_view k;       /* [B, Hkv, Tk, D], same dtype as q, Tq <= Tk */
    struct kvc_view out;     /* f32 [B, Hkv, Tk] */
    const int64_t *kv_start; /* optional [B]: leading padded keys; NULL = none */
    int64_t kv_start_stride;
    float scaling;
    float tau;               /* > 0 */
    float noise;             /* >= 0: scale of the Gumbel noise */
    uint64_t seed;
    int64_t layer, step;     /* >= 0: hash words */
    int32_t num_threads;
    void *scratch;           /* kvc_keyformer_scores_scratch_bytes() bytes */
    size_t scratch_bytes;
};

size_t kvc_keyformer_scores_scratch_bytes(const struct kvc_keyformer_scores_params *p);
enum kvc_status kvc_keyformer_scores(const struct kvc_keyformer_scores_params *p);

#ifdef __cplusplus
}
#endif

#endif /* KVC_KEYFORMER_H */
