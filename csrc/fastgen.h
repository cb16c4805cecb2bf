/*
 * fastgen.h - FastGen's attention recovery: the share of a window of
 * queries' attention that each policy of a nested ladder keeps.
 */
#ifndef KVC_FASTGEN_H
#define KVC_FASTGEN_H

#include "kvc.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Most ladder rungs the op bins (FastGen uses 5). */
#define KVC_FASTGEN_MAX_RUNGS 16

/*
 * Each key slot j of kv head (b, hk) carries a rung r_j: the cheapest
 * policy of a nested ladder that keeps it (policy p keeps every slot with
 * r_j <= p; a rung >= P belongs to no policy). Query i of the window sits
 * at key position p_i = Tk - Tq + i and sees the keys s <= j <= p_i
 * (s = kv_start[b]). With A_ij = softmax_j(scaling * q_i . k_j) for query
 * head h,
 *   out[b, hk, p] = (1 / (g * Q)) sum_{h of hk} sum_i sum_{j: r_j <= p} A_ij
 * where g = Hq / Hkv and Q is the number of window queries that see at
 * least one key (Q = 0: every entry is 1, an empty map is recovered whole).
 * This is the mean over the window's rows (and the kv head's query heads)
 * of the attention mass the policy's slots hold, which is 1 - |A - A_C|/2
 * per row for the policy's re-normalised attention A_C (FastGen's
 * criterion). fp32 softmax and sums; per head the mass goes into P bins,
 * queries in order, heads added in head order, bins accumulated last.
 */
struct kvc_fastgen_recovery_params {
    struct kvc_view q;       /* [B, Hq, Tq, D], f32/f16/bf16 */
    struct kvc_view k;       /* [B, Hkv, Tk, D], same dtype as q, Tq <= Tk */
    struct kvc_view rung;    /* u8 [B, Hkv, Tk] */
    struct kvc_view out;     /* f32 [B, Hkv, P] */
    const int64_t *kv_start; /* optional [B]: leading padded keys; NULL = none */
    int64_t kv_start_stride;
    float scaling;
    int32_t num_threads;
    void *scratch;           /* kvc_fastgen_recovery_scratch_bytes() bytes */
    size_t scratch_bytes;
};

size_t kvc_fastgen_recovery_scratch_bytes(const struct kvc_fastgen_recovery_params *p);
enum kvc_status kvc_fastgen_recovery(const struct kvc_fastgen_recovery_params *p);

#ifdef __cplusplus
}
#endif

#endif /* KVC_FASTGEN_H */
