/*
 * select.h - per-head top-k token selection with forced keeps (attention
 * sinks and a recent window) and a per-head k.
 */
#ifndef KVC_SELECT_H
#define KVC_SELECT_H

#include "kvc.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * For every (b, h): keep the first `sinks` valid tokens [s, s + sinks) (s =
 * kv_start[b], clipped to T) and the last `window` tokens [T - window, T),
 * then fill the remaining k slots with the highest-scoring other tokens,
 * ties going to the lower index. Padded tokens (j < s) rank below every valid
 * token and among themselves by the same order. out[b, h, :k] holds the kept
 * indices ascending; out[b, h, k:] is -1. Returns KVC_ERR_NAN if any score is
 * NaN (out is then unspecified).
 *
 * Kernels trust their inputs: 1 <= k <= T and the forced count (see
 * kvc_select_forced_count) <= k must hold for every row.
 */
struct kvc_select_topk_params {
    struct kvc_view scores;  /* f32 [B, H, T] */
    struct kvc_view out;     /* i64 [B, H, kmax] */
    struct kvc_view k;       /* i32/i64 [B, H]; data NULL = k_all for every row */
    int64_t k_all;
    int64_t sinks;
    int64_t window;
    const int64_t *kv_start; /* optional [B] */
    int64_t kv_start_stride;
    int32_t num_threads;
    void *scratch;           /* CUDA only: kvc_cuda_select_topk_workspace() bytes */
    size_t scratch_bytes;
};

enum kvc_status kvc_select_topk(const struct kvc_select_topk_params *p);

/* |[s, s + sinks) u [T - window, T)| within [0, T): the keeps forced on a row. */
static inline int64_t kvc_select_forced_count(int64_t T, int64_t sinks, int64_t window,
                                              int64_t s)
{
    int64_t se = s + sinks < T ? s + sinks : T;
    int64_t ws = T - window > 0 ? T - window : 0;
    int64_t lo = s > ws ? s : ws;
    int64_t overlap = se > lo ? se - lo : 0;
    return (se - s) + (T - ws) - overlap;
}

#ifdef __cplusplus
}
#endif

#endif /* KVC_SELECT_H */
