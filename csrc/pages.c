/*
 * pages.c - per-page key bounds and Quest page scores (CPU); contracts in
 * pages.h. One (b, h) pair per work item, so results never depend on the
 * thread count.
 */
#include <math.h>
#include <stdlib.h>

#include "kvc_math.h"
#include "pages.h"

enum kvc_status kvc_page_bounds(const struct kvc_page_bounds_params *p)
{
    const int64_t B = p->keys.shape[0], H = p->keys.shape[1], n = p->keys.shape[2], D = p->keys.shape[3];
    const int64_t P = p->page_size, es = (int64_t)kvc_dtype_size((enum kvc_dtype)p->keys.dtype);
    int64_t bh;
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    if (P < 1 || p->first < 0 || p->last < p->first) return KVC_ERR_INVALID;
    if (p->last > p->first && (p->last - 1) * P >= n) return KVC_ERR_INVALID;
    if (B * H * (p->last - p->first) == 0) return KVC_OK;
    if (B * H < nt) nt = (int)(B * H);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (bh = 0; bh < B * H; bh++) {
        const int64_t b = bh / H, h = bh % H;
        const char *kh = (const char *)p->keys.data + (b * p->keys.strides[0] + h * p->keys.strides[1]) * es;
        int64_t pg, j, c;
        for (pg = p->first; pg < p->last; pg++) {
            float *lo = (float *)p->kmin.data + b * p->kmin.strides[0] + h * p->kmin.strides[1] +
                        pg * p->kmin.strides[2];
            float *hi = (float *)p->kmax.data + b * p->kmax.strides[0] + h * p->kmax.strides[1] +
                        pg * p->kmax.strides[2];
            const int64_t j1 = (pg + 1) * P < n ? (pg + 1) * P : n;
            for (c = 0; c < D; c++) {
                lo[c * p->kmin.strides[3]] = INFINITY;
                hi[c * p->kmax.strides[3]] = -INFINITY;
            }
            for (j = pg * P; j < j1; j++) {
                const char *row = kh + j * p->keys.strides[2] * es;
                for (c = 0; c < D; c++) {
                    const float x = kvc_load_f32(row, p->keys.dtype, c * p->keys.strides[3]);
                    float *l = lo + c * p->kmin.strides[3], *u = hi + c * p->kmax.strides[3];
                    /* a NaN key makes both bounds NaN for good (x < NaN is
                     * false), so the page's score is NaN and top-k refuses it */
                    if (x != x) *l = *u = x;
                    else if (x < *l) *l = x;
                    if (x > *u) *u = x;
                }
            }
        }
    }
    return KVC_OK;
}

/* One (b, h): the group's query rows and, for strided bounds, each page's
 * rows converted to dense fp32 in `w` (g * D + 2 * D floats). */
static void KVC_HOT ps_head(const struct kvc_page_scores_params *p, int64_t b, int64_t h, float *w)
{
    const int64_t Hq = p->q.shape[1], D = p->q.shape[2], H = p->out.shape[1], np = p->out.shape[2];
    const int64_t g = Hq / H, es = (int64_t)kvc_dtype_size((enum kvc_dtype)p->q.dtype);
    const int64_t p0 = p->first_page ? p->first_page[b * p->first_page_stride] : 0;
    const int dense = p->kmin.strides[3] == 1 && p->kmax.strides[3] == 1;
    float *qb = w, *lb = w + g * D, *hb = lb + D;
    float *out = (float *)p->out.data + b * p->out.strides[0] + h * p->out.strides[1];
    int64_t pg, gi;
    for (gi = 0; gi < g; gi++)
        kvc_row_to_f32(qb + gi * D, (const char *)p->q.data + (b * p->q.strides[0] + (h * g + gi) * p->q.strides[1]) * es,
                       p->q.dtype, D, p->q.strides[2]);
    for (pg = 0; pg < np; pg++) {
        const float *lo = (const float *)p->kmin.data + b * p->kmin.strides[0] + h * p->kmin.strides[1] +
                          pg * p->kmin.strides[2];
        const float *hi = (const float *)p->kmax.data + b * p->kmax.strides[0] + h * p->kmax.strides[1] +
                          pg * p->kmax.strides[2];
        float red = p->gqa == 0 ? -INFINITY : 0.0f;
        if (pg < p0) {
            out[pg * p->out.strides[2]] = -INFINITY;
            continue;
        }
        if (!dense) {
            kvc_row_to_f32(lb, lo, KVC_F32, D, p->kmin.strides[3]);
            kvc_row_to_f32(hb, hi, KVC_F32, D, p->kmax.strides[3]);
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
