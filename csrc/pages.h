/*
 * pages.h - per-page key bounds and Quest page scores over a uniform layer
 * cut into pages of P slots (page p = slots p * P .. min((p + 1) * P, n) - 1).
 */
#ifndef KVC_PAGES_H
#define KVC_PAGES_H

#include "kvc.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * For every (b, h) and page p in [first, last):
 *   kmin[b, h, p, c] = min over the page's slots j of keys[b, h, j, c]
 *   kmax[b, h, p, c] = max over the same slots
 * in fp32 (keys converted exactly). Only the pages named are written, so an
 * append recomputes the one or two pages it touched, never the whole layer.
 * Returns KVC_ERR_NAN when a key of those pages is NaN (the bounds are then
 * unspecified): a NaN would silently drop out of min/max.
 */
struct kvc_page_bounds_params {
    struct kvc_view keys; /* [B, H, n, D] f32/f16/bf16 */
    struct kvc_view kmin; /* f32 [B, H, Np, D], Np >= last */
    struct kvc_view kmax; /* f32 [B, H, Np, D] */
    int64_t page_size;    /* P >= 1 */
    int64_t first, last;  /* 0 <= first <= last, (last - 1) * P < n */
    int32_t num_threads;
};

enum kvc_status kvc_page_bounds(const struct kvc_page_bounds_params *p);

/*
 * Quest's upper bound of the logit a query can reach on a page: for query
 * head hq of kv head h (GQA group of g = Hq / H heads)
 *
 *   u[hq, p] = sum_c max(q[b, hq, c] * kmax[b, h, p, c], q[b, hq, c] * kmin[b, h, p, c])
 *
 * summed over c in ascending order in fp32, and
 *
 *   out[b, h, p] = max over the group of u (gqa = 0) or its mean (gqa = 1),
 *
 * for p < num_pages; a page before first_page[b] (the first page holding a
 * real slot, kv_start // P: the ones before it hold only left padding) gets
 * -inf.
 */
struct kvc_page_scores_params {
    struct kvc_view q;       /* [B, Hq, D] f32/f16/bf16 */
    struct kvc_view kmin;    /* f32 [B, H, Np, D], Np >= num_pages */
    struct kvc_view kmax;    /* f32 [B, H, Np, D] */
    struct kvc_view out;     /* f32 [B, H, num_pages] */
    const int64_t *first_page; /* optional [B] */
    int64_t first_page_stride;
    int32_t gqa;             /* 0: max over the group, 1: mean */
    int32_t num_threads;
};

enum kvc_status kvc_page_scores(const struct kvc_page_scores_params *p);

#ifdef __cplusplus
}
#endif

#endif /* KVC_PAGES_H */
