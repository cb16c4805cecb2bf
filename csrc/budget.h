/*
 * budget.h - per-head budget allocation (AdaKV): split a layer's H * budget
 * kept slots over its heads by where the layer's best scores fall.
 */
#ifndef KVC_BUDGET_H
#define KVC_BUDGET_H

#include "kvc.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * For every batch row b, with B' = min(budget, T):
 *
 * 1. Selectable slots of head h: j >= kv_start[b] with score > -inf; U_h of
 *    them. The layer takes its global top N = min(H * B', sum U_h) over all
 *    heads' selectable slots, ranked by score (descending), then head, then
 *    position (ascending); n_h of them fall in head h.
 * 2. Target x_h = n_h + alpha * (B' - n_h) (= (1 - alpha) n_h + alpha B'),
 *    with t_h = alpha * (B' - n_h) rounded once to double.
 * 3. Bounds lo_h = min(floor, T), hi_h = max(U_h, lo_h) (a floor above the
 *    selectable count wins: the caller force-keeps those slots anyway), and
 *    total N_tot = clamp(H * B', sum lo_h, sum hi_h), which is H * budget
 *    whenever the bounds allow it.
 * 4. out[b, h] = the integers lo_h <= b_h <= hi_h with sum N_tot closest to
 *    x in sum of squares: starting from lo_h, the N_tot - sum lo_h units go
 *    one at a time to the head furthest below its target (largest x_h - b_h),
 *    ties to the lower head. Without binding bounds that is the
 *    largest-remainder rounding of x (floor(x_h), plus one for the heads
 *    with the largest fractional parts, ties to the lower head); a bound
 *    that binds hands its surplus or deficit to the heads next in that order.
 *
 * Returns KVC_ERR_NAN if a score is NaN (out is then unspecified).
 */
struct kvc_head_budgets_params {
    struct kvc_view scores;  /* f32 [B, H, T]; -inf: never selected */
    struct kvc_view out;     /* i64 [B, H] */
    const int64_t *kv_start; /* optional [B]: leading padded slots, in [0, T] */
    int64_t kv_start_stride;
    int64_t budget;          /* >= 0: mean slots per head */
    int64_t floor;           /* >= 0: minimum slots per head (clipped to T) */
    double alpha;            /* in [0, 1]: weight of the uniform share */
    int32_t num_threads;
    void *scratch;           /* kvc_head_budgets_scratch_bytes() bytes */
    size_t scratch_bytes;
};

size_t kvc_head_budgets_scratch_bytes(const struct kvc_head_budgets_params *p);
enum kvc_status kvc_head_budgets(const struct kvc_head_budgets_params *p);

#ifdef __cplusplus
}
#endif

#endif /* KVC_BUDGET_H */
