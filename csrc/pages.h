/*
 * pages.h - per-page key bounds and Quest page scores over a layer cut into
 * pages of P slots (page p = slots p * P .. min((p + 1) * P, n) - 1), stored
 * uniform ([B, H, n, D], every head n slots) or ragged (one [R, D] buffer,
 * head i = b * H + h owning rows offsets[i] .. offsets[i] + lengths[i] - 1,
 * as the head-wise evictors keep it; attention.h). A ragged head's page
 * bounds are rows page_offsets[i] + p of an [Rp, D] buffer: the caller lays
 * them out as it lays out the keys, so a head that grows keeps its rows.
 */
#ifndef KVC_PAGES_H
#define KVC_PAGES_H

#include "kvc.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Uniform: for every (b, h) and page p in [first, last):
 *   kmin[b, h, p, c] = min over the page's slots j of keys[b, h, j, c]
 *   kmax[b, h, p, c] = max over the same slots
 * in fp32 (keys converted exactly). Only the pages named are written, so an
 * append recomputes the one or two pages it touched, never the whole layer.
 * A NaN key makes both bounds of its channel NaN (it would otherwise
 * silently drop out of min/max), so the page scores NaN and top-k refuses
 * it. Ragged: the same per page, over the pages named by first_page (below).
 */
struct kvc_page_bounds_params {
    struct kvc_view keys; /* uniform [B, H, n, D] / ragged [R, D], f32/f16/bf16 */
    struct kvc_view kmin; /* f32 uniform [B, H, Np, D], Np >= last / ragged [Rp, D] */
    struct kvc_view kmax; /* f32, shape of kmin */
    int64_t page_size;    /* P >= 1 */
    int64_t first, last;  /* uniform: 0 <= first <= last, (last - 1) * P < n */
    /*
     * Ragged layout when offsets != NULL, over num_heads heads: head i has
     * np_i = ceil(lengths[i] / P) pages and its pages first_page[i] ..
     * np_i - 1 are written, page p being rows offsets[i] + p * P ..
     * offsets[i] + min((p + 1) * P, lengths[i]) - 1 of keys, its bounds row
     * page_offsets[i] + p of kmin and kmax. lengths >= 0, 0 <= first_page[i]
     * <= np_i, rows inside R and Rp; heads write disjoint bound rows (they
     * run in parallel). first, last are unused. Strides in elements; a
     * first_page stride of 0 gives every head the same first page.
     */
    const int64_t *offsets, *lengths, *page_offsets, *first_page;
    int64_t offsets_stride, lengths_stride, page_offsets_stride, first_page_stride;
    int64_t num_heads;
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
 *
 * Ragged (page_offsets != NULL; kmin/kmax [Rp, D], head i = b * H + h of
 * the H = out.shape[1] heads): head i has np_i = ceil(lengths[i] / P) <=
 * num_pages pages, page p's bounds in row page_offsets[i] + p. Its scores
 * are right-aligned: out[b, h, num_pages - np_i + p] is page p's (the same
 * bound, reduction and summation order as above) and the columns before
 * num_pages - np_i get -inf, so the newest page of every head is the last
 * column (a top-k window of 1 forces it) whatever the head's length.
 * first_page must be NULL.
 */
struct kvc_page_scores_params {
    struct kvc_view q;       /* [B, Hq, D] f32/f16/bf16 */
    struct kvc_view kmin;    /* f32 uniform [B, H, Np, D], Np >= num_pages / ragged [Rp, D] */
    struct kvc_view kmax;    /* f32, shape of kmin */
    struct kvc_view out;     /* f32 [B, H, num_pages] */
    const int64_t *first_page; /* uniform, optional [B] */
    int64_t first_page_stride;
    const int64_t *lengths, *page_offsets; /* ragged [B * H] (page_offsets NULL: uniform) */
    int64_t lengths_stride, page_offsets_stride;
    int64_t page_size;       /* P >= 1, ragged */
    int32_t gqa;             /* 0: max over the group, 1: mean */
    int32_t num_threads;
};

enum kvc_status kvc_page_scores(const struct kvc_page_scores_params *p);

#ifdef __cplusplus
}
#endif

#endif /* KVC_PAGES_H */
