/*
 * budget.c - per-head budget allocation (CPU).
 *
 * The layer-wide top-N is found by radix selection on order-preserving keys
 * (three histogram passes, as in select.c) and only counted per head, never
 * sorted. The bounded rounding is exact: a unit's priority is (integer part,
 * fractional part, -head), so a binary search over the integer level plus
 * one pass over the heads at the threshold level replaces N one-at-a-time
 * steps. Rows are independent and sequential: the result does not depend on
 * the thread count.
 */
#include "budget.h"
#include "budget_math.h"
#include "kvc_math.h"

#define BUD_BUCKETS 2048


size_t kvc_head_budgets_scratch_bytes(const struct kvc_head_budgets_params *p)
{
    const int nt = p->num_threads > 0 ? p->num_threads : 1;
    const size_t per = kvc_align_up((size_t)KVC_BUDGET_ARRAYS * (size_t)p->scores.shape[1] * 8);
    return KVC_ALIGN + (size_t)nt * per;
}

KVC_INLINE float bud_score(const struct kvc_head_budgets_params *p, int64_t b, int64_t h,
                           int64_t j)
{
    return ((const float *)p->scores.data)[b * p->scores.strides[0] + h * p->scores.strides[1] +
                                           j * p->scores.strides[2]];
}

/* Key of the r-th largest selectable score of row b (1 <= r <= sum U_h). */
static uint32_t bud_threshold(const struct kvc_head_budgets_params *p, int64_t b, int64_t s,
                              int64_t r)
{
    static const int shifts[3] = {21, 10, 0};
    static const int widths[3] = {11, 11, 10};
    const int64_t H = p->scores.shape[1], T = p->scores.shape[2];
    int64_t hist[BUD_BUCKETS];
    uint32_t prefix = 0, mask = 0;
    int64_t rem = r, h, j;
    int pass;
    for (pass = 0; pass < 3; pass++) {
        const int sh = shifts[pass];
        const uint32_t nb = 1u << widths[pass];
        uint32_t d;
        for (d = 0; d < nb; d++) hist[d] = 0;
        for (h = 0; h < H; h++)
            for (j = s; j < T; j++) {
                const float x = bud_score(p, b, h, j);
                const uint32_t key = kvc_f32_order_key(x);
                if (x != -INFINITY && (key & mask) == prefix) hist[(key >> sh) & (nb - 1)]++;
            }
        for (d = nb - 1; d > 0 && hist[d] < rem; d--) rem -= hist[d];
        prefix |= d << sh;
        mask |= (nb - 1) << sh;
    }
    return prefix;
}

/* Returns 1 if a score of the row is NaN. */
static int bud_row(const struct kvc_head_budgets_params *p, int64_t b, const struct kvc_budget_row *w)
{
    const int64_t H = p->scores.shape[1], T = p->scores.shape[2];
    const int64_t s = p->kv_start ? p->kv_start[b * p->kv_start_stride] : 0;
    const int64_t bud = p->budget < T ? p->budget : T;
    const int64_t lo_all = p->floor < T ? p->floor : T;
    int64_t *out = (int64_t *)p->out.data + b * p->out.strides[0];
    const int64_t os = p->out.strides[1];
    int64_t h, j, total_u = 0, N;

    /* 1. selectable counts, then the global top-N counted per head */
    for (h = 0; h < H; h++) {
        int64_t u = 0;
        for (j = 0; j < T; j++) {
            const float x = bud_score(p, b, h, j);
            if (x != x) return 1;
            u += j >= s && x != -INFINITY;
        }
        w->U[h] = u;
        total_u += u;
    }
    N = H * bud < total_u ? H * bud : total_u;
    if (N == total_u) {
        for (h = 0; h < H; h++) w->n[h] = w->U[h];
    } else if (N == 0) {
        for (h = 0; h < H; h++) w->n[h] = 0;
    } else {
        const uint32_t thr = bud_threshold(p, b, s, N);
        int64_t need = N;
        for (h = 0; h < H; h++) {
            int64_t gt = 0, eq = 0;
            for (j = s; j < T; j++) {
                const float x = bud_score(p, b, h, j);
                const uint32_t key = kvc_f32_order_key(x);
                if (x == -INFINITY) continue;
                gt += key > thr;
                eq += key == thr;
            }
            w->gt[h] = gt;
            w->eq[h] = eq;
            need -= gt;
        }
        /* ties at the threshold: lower heads first */
        for (h = 0; h < H; h++) {
            const int64_t take = need < w->eq[h] ? need : w->eq[h];
            w->n[h] = w->gt[h] + take;
            need -= take;
        }
    }

    kvc_budget_allocate(w, H, bud, p->alpha, lo_all, out, os);
    return 0;
}

enum kvc_status kvc_head_budgets(const struct kvc_head_budgets_params *p)
{
    const int64_t B = p->scores.shape[0], H = p->scores.shape[1];
    const size_t per = kvc_align_up((size_t)KVC_BUDGET_ARRAYS * (size_t)H * 8);
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    int nan_found = 0;
    char *base;
    int64_t b;
    if (B == 0 || H == 0) return KVC_OK;
    if (p->budget < 0 || p->floor < 0 || !(p->alpha >= 0.0 && p->alpha <= 1.0))
        return KVC_ERR_INVALID;
    if (p->scratch == NULL || p->scratch_bytes < kvc_head_budgets_scratch_bytes(p))
        return KVC_ERR_NOMEM;
    base = (char *)(((uintptr_t)p->scratch + (KVC_ALIGN - 1)) & ~(uintptr_t)(KVC_ALIGN - 1));
    if (B < nt) nt = (int)B;
#pragma omp parallel num_threads(nt) reduction(| : nan_found) if (nt > 1)
    {
        int64_t *mine = (int64_t *)(base + (size_t)KVC_THREAD_ID() * per);
        struct kvc_budget_row w;
        kvc_budget_row_carve(&w, mine, H);
#pragma omp for schedule(dynamic, 1)
        for (b = 0; b < B; b++) nan_found |= bud_row(p, b, &w);
    }
    return nan_found ? KVC_ERR_NAN : KVC_OK;
}
