/*
 * pages.c - per-page key bounds and Quest page scores (CPU); contracts in
 * pages.h. One (b, h) pair per work item, so results never depend on the
 * thread count.
 */
#include <math.h>

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

enum kvc_status kvc_page_scores(const struct kvc_page_scores_params *p)
{
    const int64_t B = p->q.shape[0], Hq = p->q.shape[1], D = p->q.shape[2];
    const int64_t H = p->out.shape[1], np = p->out.shape[2];
    const int64_t es = (int64_t)kvc_dtype_size((enum kvc_dtype)p->q.dtype);
    int64_t bh;
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    if (H <= 0 || Hq % H != 0 || (p->gqa != 0 && p->gqa != 1)) return KVC_ERR_INVALID;
    if (B * H * np == 0) return KVC_OK;
    if (B * H < nt) nt = (int)(B * H);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (bh = 0; bh < B * H; bh++) {
        const int64_t b = bh / H, h = bh % H, g = Hq / H;
        const int64_t p0 = p->first_page ? p->first_page[b * p->first_page_stride] : 0;
        float *out = (float *)p->out.data + b * p->out.strides[0] + h * p->out.strides[1];
        int64_t pg, gi, c;
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
            for (gi = 0; gi < g; gi++) {
                const char *qr = (const char *)p->q.data + (b * p->q.strides[0] + (h * g + gi) * p->q.strides[1]) * es;
                float u = 0.0f;
                for (c = 0; c < D; c++) {
                    const float qc = kvc_load_f32(qr, p->q.dtype, c * p->q.strides[2]);
                    const float a = qc * hi[c * p->kmax.strides[3]], m = qc * lo[c * p->kmin.strides[3]];
                    u += a > m ? a : m;
                }
                if (p->gqa == 0) red = (u > red || u != u) ? u : red; /* NaN sticks */
                else red += u;
            }
            out[pg * p->out.strides[2]] = p->gqa == 0 ? red : red / (float)g;
        }
    }
    return KVC_OK;
}
