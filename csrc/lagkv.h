/*
 * lagkv.h - LagKV token scores (arXiv 2504.04704): every chunk of `lag`
 * tokens after the sinks is min-max normalised per channel by the chunk that
 * follows it, and a token scores by how spread its normalised key and value
 * are across channels.
 */
#ifndef KVC_LAGKV_H
#define KVC_LAGKV_H

#include "kvc.h"

#ifdef __cplusplus
extern "C" {
#endif

enum kvc_lagkv_mode {
    KVC_LAGKV_RAW = 0,  /* out = softmax_K + softmax_V (below) */
    KVC_LAGKV_RANK = 1  /* out = a priority whose global top-k takes an equal share of every chunk */
};

/*
 * Per row b, head h, with s = kv_start[b] (0 without it) and c0 = min(s +
 * sinks, T): the tokens [c0, T) form m = (T - c0) / lag whole chunks of `lag`
 * tokens plus a partial one. Chunks 0 .. m-2 are scored (M = m - 1 of them,
 * none when m < 2); chunk c uses chunk c + 1 as its reference. The last whole
 * chunk and the partial one are the tail.
 *
 *   padding  j < s             out = -inf
 *   sinks    s <= j < c0       out = +inf
 *   tail                       out = +inf
 *   token i of scored chunk c  x = K[j] (then V[j]); for every channel d,
 *       xn_d = (x_d - lo_d) / (hi_d - lo_d), lo_d/hi_d the min/max of
 *       channel d over the reference chunk (xn_d = 0 where hi_d == lo_d);
 *       std = sqrt(sum_d (xn_d - mean)^2 / (D - 1)) (D >= 2);
 *       RAW:  out = softmax over the chunk of std(K) + the same for V;
 *       RANK: with r the token's rank in its chunk by the RAW score (0 =
 *       highest, ties to the lower index), out = -(r * M + (M - 1 - c)):
 *       a top-k over the row takes ranks 0, 1, ... of every chunk in turn,
 *       newer chunks first within a rank.
 *
 * A NaN RAW score stays NaN in both modes. Accumulation is fp32; each (b, h)
 * is one sequential unit, so results do not depend on the thread count.
 * While chunk c is scored, the output slots of chunk c + 1 (not yet written)
 * hold its temporaries, so the op needs scratch only for the reference
 * chunk's per-channel bounds.
 */
struct kvc_lagkv_scores_params {
    struct kvc_view k;       /* [B, H, T, D], f32/f16/bf16 */
    struct kvc_view v;       /* [B, H, T, Dv], same dtype as k */
    struct kvc_view out;     /* f32 [B, H, T] */
    const int64_t *kv_start; /* optional [B]: leading padded tokens; NULL = none */
    int64_t kv_start_stride;
    int64_t sinks;           /* >= 0 */
    int64_t lag;             /* >= 1 */
    int32_t mode;            /* enum kvc_lagkv_mode */
    int32_t num_threads;
    void *scratch;           /* kvc_lagkv_scores_scratch_bytes() bytes */
    size_t scratch_bytes;
};

size_t kvc_lagkv_scores_scratch_bytes(const struct kvc_lagkv_scores_params *p);
enum kvc_status kvc_lagkv_scores(const struct kvc_lagkv_scores_params *p);

#ifdef __cplusplus
}
#endif

#endif /* KVC_LAGKV_H */
