/*
 * pages.c - per-page key bounds and Quest page scores (CPU); contracts in
 * pages.h. One (b, h) pair per work item, so results never depend on the
 * thread count.
 */
#include <math.h>
#include <stdlib.h>

#include "kvc_math.h"
#include "pages.h"

/* Bounds of one page: key rows j0 .. j1 - 1 from `kh` (slot stride ks,
 * channel stride kc, elements) into lo / hi (channel strides ls, hs). */
static void pb_page(const char *kh, int32_t dtype, int64_t es, int64_t ks, int64_t kc, int64_t j0,
                    int64_t j1, int64_t D, float *lo, int64_t ls, float *hi, int64_t hs)
{
    int64_t j, c;
    for (c = 0; c < D; c++) {
        lo[c * ls] = INFINITY;
        hi[c * hs] = -INFINITY;
    }
    for (j = j0; j < j1; j++) {
        const char *row = kh + j * ks * es;
        for (c = 0; c < D; c++) {
            const float x = kvc_load_f32(row, dtype, c * kc);
            float *l = lo + c * ls, *u = hi + c * hs;
            /* a NaN key makes both bounds NaN for good (x < NaN is
             * false), so the page's score is NaN and top-k refuses it */
            if (x != x) *l = *u = x;
            else if (x < *l) *l = x;
            if (x > *u) *u = x;
        }
    }
}

/* Ragged: head i's pages first_page[i] .. ceil(lengths[i] / P) - 1. */
static void pb_head_ragged(const struct kvc_page_bounds_params *p, int64_t i, int64_t es)
{
    const int64_t P = p->page_size, D = p->keys.shape[1];
    const int64_t n = p->lengths[i * p->lengths_stride], np = (n + P - 1) / P;
    const int64_t off = p->offsets[i * p->offsets_stride], prow = p->page_offsets[i * p->page_offsets_stride];
    const char *kh = (const char *)p->keys.data + off * p->keys.strides[0] * es;
    int64_t pg;
    for (pg = p->first_page[i * p->first_page_stride]; pg < np; pg++)
        pb_page(kh, p->keys.dtype, es, p->keys.strides[0], p->keys.strides[1], pg * P,
                (pg + 1) * P < n ? (pg + 1) * P : n, D,
                (float *)p->kmin.data + (prow + pg) * p->kmin.strides[0], p->kmin.strides[1],
                (float *)p->kmax.data + (prow + pg) * p->kmax.strides[0], p->kmax.strides[1]);
}

static enum kvc_status pb_ragged(const struct kvc_page_bounds_params *p)
{
    const int64_t N = p->num_heads, es = (int64_t)kvc_dtype_size((enum kvc_dtype)p->keys.dtype);
    int64_t i;
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    if (p->page_size < 1 || N < 0 || p->lengths == NULL || p->page_offsets == NULL || p->first_page == NULL)
        return KVC_ERR_INVALID;
    for (i = 0; i < N; i++) {
        const int64_t n = p->lengths[i * p->lengths_stride], f = p->first_page[i * p->first_page_stride];
        if (n < 0 || f < 0 || f > (n + p->page_size - 1) / p->page_size) return KVC_ERR_INVALID;
    }
    if (N == 0) return KVC_OK;
    if (N < nt) nt = (int)N;
    /* one head per work item: its pages are the same whatever the threads */
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (i = 0; i < N; i++) pb_head_ragged(p, i, es);
    return KVC_OK;
}

enum kvc_status kvc_page_bounds(const struct kvc_page_bounds_params *p)
{
    int64_t B, H, n, D, P, es, bh;
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    if (p->offsets != NULL) return pb_ragged(p);
    B = p->keys.shape[0];
    H = p->keys.shape[1];
    n = p->keys.shape[2];
    D = p->keys.shape[3];
    P = p->page_size;
    es = (int64_t)kvc_dtype_size((enum kvc_dtype)p->keys.dtype);
    if (P < 1 || p->first < 0 || p->last < p->first) return KVC_ERR_INVALID;
    if (p->last > p->first && (p->last - 1) * P >= n) return KVC_ERR_INVALID;
    if (B * H * (p->last - p->first) == 0) return KVC_OK;
    if (B * H < nt) nt = (int)(B * H);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (bh = 0; bh < B * H; bh++) {
        const int64_t b = bh / H, h = bh % H;
        const char *kh = (const char *)p->keys.data + (b * p->keys.strides[0] + h * p->keys.strides[1]) * es;
        int64_t pg;
        for (pg = p->first; pg < p->last; pg++)
            pb_page(kh, p->keys.dtype, es, p->keys.strides[2], p->keys.strides[3], pg * P,
                    (pg + 1) * P < n ? (pg + 1) * P : n, D,
                    (float *)p->kmin.data + b * p->kmin.strides[0] + h * p->kmin.strides[1] +
                        pg * p->kmin.strides[2],
                    p->kmin.strides[3],
                    (float *)p->kmax.data + b * p->kmax.strides[0] + h * p->kmax.strides[1] +
                        pg * p->kmax.strides[2],
                    p->kmax.strides[3]);
    }
    return KVC_OK;
}

/* One (b, h): the group's query rows and, for strided bounds, each page's
 * rows converted to dense fp32 in `w` (g * D + 2 * D floats). Columns
 * before p0 get -inf: a uniform layer's padding pages, or the columns a
 * ragged head's pages are right-aligned past (pages.h). */
static void KVC_HOT ps_head(const struct kvc_page_scores_params *p, int64_t b, int64_t h, float *w)
{
    const int64_t Hq = p->q.shape[1], D = p->q.shape[2], H = p->out.shape[1], np = p->out.shape[2];
    const int64_t g = Hq / H, es = (int64_t)kvc_dtype_size((enum kvc_dtype)p->q.dtype);
    const int ragged = p->page_offsets != NULL;
    /* channel and page strides of the bounds */
    const int64_t lc = p->kmin.strides[ragged ? 1 : 3], hc = p->kmax.strides[ragged ? 1 : 3];
    const int64_t lp = p->kmin.strides[ragged ? 0 : 2], hp = p->kmax.strides[ragged ? 0 : 2];
    const int dense = lc == 1 && hc == 1;
    int64_t lo0, hi0, p0; /* element offsets of column 0's bounds (integers: a ragged
                           * head's may lie before the buffer, never used) */
    float *qb = w, *lb = w + g * D, *hb = lb + D;
    float *out = (float *)p->out.data + b * p->out.strides[0] + h * p->out.strides[1];
    int64_t pg, gi;
    if (ragged) {
        const int64_t i = b * H + h, n = p->lengths[i * p->lengths_stride];
        const int64_t prow = p->page_offsets[i * p->page_offsets_stride];
        /* right-aligned: column pg holds page pg - p0, in row prow + pg - p0 */
        p0 = np - (n + p->page_size - 1) / p->page_size;
        lo0 = (prow - p0) * lp;
        hi0 = (prow - p0) * hp;
    } else {
        p0 = p->first_page ? p->first_page[b * p->first_page_stride] : 0;
        lo0 = b * p->kmin.strides[0] + h * p->kmin.strides[1];
        hi0 = b * p->kmax.strides[0] + h * p->kmax.strides[1];
    }
    for (gi = 0; gi < g; gi++)
        kvc_row_to_f32(qb + gi * D, (const char *)p->q.data + (b * p->q.strides[0] + (h * g + gi) * p->q.strides[1]) * es,
                       p->q.dtype, D, p->q.strides[2]);
    for (pg = 0; pg < np; pg++) {
        const float *lo, *hi;
        float red = p->gqa == 0 ? -INFINITY : 0.0f;
        if (pg < p0) {
            out[pg * p->out.strides[2]] = -INFINITY;
            continue;
        }
        lo = (const float *)p->kmin.data + lo0 + pg * lp;
        hi = (const float *)p->kmax.data + hi0 + pg * hp;
        if (!dense) {
            kvc_row_to_f32(lb, lo, KVC_F32, D, lc);
            kvc_row_to_f32(hb, hi, KVC_F32, D, hc);
            lo = lb;
            hi = hb;
        }
        for (gi = 0; gi < g; gi++) {
            const float u = kvc_bound_dot_f32(qb + gi * D, lo, hi, D);
            if (p->gqa == 0) red = (u > red || u != u) ? u : red; /* NaN sticks */
            else red += u;
        }
        out[pg * p->out.strides[2]] = p->gqa == 0 ? red : red / (float)g;
    }
}

enum kvc_status kvc_page_scores(const struct kvc_page_scores_params *p)
{
    const int64_t B = p->q.shape[0], Hq = p->q.shape[1], D = p->q.shape[2];
    const int64_t H = p->out.shape[1], np = p->out.shape[2];
    int64_t bh;
    int nt = p->num_threads > 0 ? p->num_threads : 1, failed = 0;
    if (H <= 0 || Hq % H != 0 || (p->gqa != 0 && p->gqa != 1)) return KVC_ERR_INVALID;
    if (p->page_offsets != NULL) {
        /* ragged: every head's pages fit the columns (pages.h) */
        if (p->page_size < 1 || p->lengths == NULL || p->first_page != NULL) return KVC_ERR_INVALID;
        for (bh = 0; bh < B * H; bh++) {
            const int64_t n = p->lengths[bh * p->lengths_stride];
            if (n < 0 || (n + p->page_size - 1) / p->page_size > np) return KVC_ERR_INVALID;
        }
    }
    if (B * H * np == 0) return KVC_OK;
    if (B * H < nt) nt = (int)(B * H);
#pragma omp parallel num_threads(nt) reduction(| : failed) if (nt > 1)
    {
        float *w = (float *)malloc((size_t)((Hq / H + 2) * D) * sizeof(float));
        if (w == NULL) failed = 1;
#pragma omp for schedule(static)
        for (bh = 0; bh < B * H; bh++)
            if (w != NULL) ps_head(p, bh / H, bh % H, w);
        free(w);
    }
    return failed ? KVC_ERR_NOMEM : KVC_OK;
}
