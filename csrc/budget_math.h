/*
 * budget_math.h - steps 2-4 of the head budget allocation (budget.h) for
 * one batch row, shared by budget.c and the CUDA kernel (one thread per
 * row) so both allocate the very same integers. Same rules as kvc_math.h:
 * KVC_HD static inline, common subset of C11 and C++.
 */
#ifndef KVC_BUDGET_MATH_H
#define KVC_BUDGET_MATH_H

#include <math.h>

#include "kvc_math.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Per-head work arrays of one row: selectable count U, the global top-N
 * split into n (gt/eq are scratch), bounds lo/hi, target whole + frac. */
struct kvc_budget_row {
    int64_t *U, *gt, *eq, *n, *lo, *hi, *whole;
    double *frac;
};

#define KVC_BUDGET_ARRAYS 8 /* int64/double arrays of H in a kvc_budget_row */

/* Point w's arrays into `mine` (KVC_BUDGET_ARRAYS * H 8-byte slots). */
KVC_HD static inline void kvc_budget_row_carve(struct kvc_budget_row *w, int64_t *mine, int64_t H)
{
    w->U = mine;
    w->gt = mine + H;
    w->eq = mine + 2 * H;
    w->n = mine + 3 * H;
    w->lo = mine + 4 * H;
    w->hi = mine + 5 * H;
    w->whole = mine + 6 * H;
    w->frac = (double *)(mine + 7 * H);
}

/* kvc_budget_target (budget.h) on both sides: t = alpha * (budget - n) is
 * one product rounded once, never contracted into an FMA with the floor. */
KVC_HD static inline void kvc_budget_target_hd(int64_t n, int64_t budget, double alpha,
                                               int64_t *whole, double *frac)
{
#ifdef __CUDA_ARCH__
    const double t = __dmul_rn(alpha, (double)(budget - n));
    const double fl = floor(t);
    *whole = n + (int64_t)fl;
    *frac = __dsub_rn(t, fl);
#else
    volatile double tv = alpha * (double)(budget - n);
    const double t = tv, fl = floor(t);
    *whole = n + (int64_t)fl;
    *frac = t - fl;
#endif
}

/* Units of head h whose priority level (whole_h - v) is >= k. */
KVC_HD static inline int64_t kvc_budget_units_at(const struct kvc_budget_row *w, int64_t h, int64_t k)
{
    const int64_t c = w->whole[h] - k + 1 - w->lo[h];
    const int64_t cap = w->hi[h] - w->lo[h];
    return c < 0 ? 0 : (c > cap ? cap : c);
}

/* Steps 2-4 given U and n: out[h * os] for the H heads of the row. */
KVC_HD static inline void kvc_budget_allocate(const struct kvc_budget_row *w, int64_t H, int64_t bud,
                                              double alpha, int64_t lo_all, int64_t *out, int64_t os)
{
    int64_t h, sum_lo = 0, sum_hi = 0, n_tot, M;
    /* 2-3. targets and bounds */
    for (h = 0; h < H; h++) {
        kvc_budget_target_hd(w->n[h], bud, alpha, &w->whole[h], &w->frac[h]);
        w->lo[h] = lo_all;
        w->hi[h] = w->U[h] > lo_all ? w->U[h] : lo_all;
        sum_lo += w->lo[h];
        sum_hi += w->hi[h];
    }
    n_tot = H * bud;
    if (n_tot < sum_lo) n_tot = sum_lo;
    if (n_tot > sum_hi) n_tot = sum_hi;
    M = n_tot - sum_lo;

    /* 4. the M best units; unit v of head h (lo_h <= v < hi_h) ranks by
     * level whole_h - v, then frac_h, then lower head */
    if (M == 0) {
        for (h = 0; h < H; h++) out[h * os] = w->lo[h];
    } else {
        int64_t klo = INT64_MAX, khi = INT64_MIN, rest;
        for (h = 0; h < H; h++) {
            if (w->hi[h] == w->lo[h]) continue;
            if (w->whole[h] - w->hi[h] + 1 < klo) klo = w->whole[h] - w->hi[h] + 1;
            if (w->whole[h] - w->lo[h] > khi) khi = w->whole[h] - w->lo[h];
        }
        /* largest level k with at least M units at levels >= k; units(klo)
         * is every unit (>= M), units(khi + 1) is none */
        while (klo < khi) {
            const int64_t mid = klo + (khi - klo + 1) / 2;
            int64_t c = 0;
            for (h = 0; h < H; h++) c += kvc_budget_units_at(w, h, mid);
            if (c >= M) klo = mid;
            else khi = mid - 1;
        }
        rest = M;
        for (h = 0; h < H; h++) {
            w->gt[h] = kvc_budget_units_at(w, h, klo + 1);
            rest -= w->gt[h];
        }
        /* rest (>= 1) units at level klo, one per eligible head, by frac
         * then lower head */
        for (h = 0; h < H; h++) w->eq[h] = kvc_budget_units_at(w, h, klo) > w->gt[h];
        for (; rest > 0; rest--) {
            int64_t best = -1;
            for (h = 0; h < H; h++)
                if (w->eq[h] && (best < 0 || w->frac[h] > w->frac[best])) best = h;
            w->eq[best] = 0;
            w->gt[best]++;
        }
        for (h = 0; h < H; h++) out[h * os] = w->lo[h] + w->gt[h];
    }
}

#ifdef __cplusplus
}
#endif

#endif /* KVC_BUDGET_MATH_H */
