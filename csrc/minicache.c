/*
 * minicache.c - MiniCache's SLERP merge and reconstruction (CPU); contracts
 * in minicache.h, per-token math in minicache_math.h. One (b, h) per work
 * item: results do not depend on the thread count.
 */
#include <stdlib.h>
#include <string.h>

#include "kvc_math.h"
#include "minicache.h"
#include "minicache_math.h"

static void KVC_HOT sm_head(const struct kvc_slerp_merge_params *p, int64_t b, int64_t h, float *row)
{
    const int64_t n = p->x1.shape[2], D = p->x1.shape[3];
    const int64_t es = (int64_t)kvc_dtype_size((enum kvc_dtype)p->x1.dtype);
    float *u1 = row, *u2 = row + D, *e = row + 2 * D;
    float *norms = (float *)p->norms.data + b * p->norms.strides[0] + h * p->norms.strides[1];
    float *dist = (float *)p->dist.data + b * p->dist.strides[0] + h * p->dist.strides[1];
    int64_t j;
    for (j = 0; j < n; j++) {
        float n1, n2, d;
        kvc_row_to_f32(u1, (const char *)p->x1.data + (b * p->x1.strides[0] + h * p->x1.strides[1] +
                                                        j * p->x1.strides[2]) * es,
                       p->x1.dtype, D, p->x1.strides[3]);
        kvc_row_to_f32(u2, (const char *)p->x2.data + (b * p->x2.strides[0] + h * p->x2.strides[1] +
                                                        j * p->x2.strides[2]) * es,
                       p->x2.dtype, D, p->x2.strides[3]);
        d = kvc_slerp_row(e, u1, u2, D, p->t, &n1, &n2);
        {
            void *dst = (char *)p->dir.data + (b * p->dir.strides[0] + h * p->dir.strides[1] +
                                               j * p->dir.strides[2]) * es;
            int64_t i;
            for (i = 0; i < D; i++) kvc_store_f32(dst, p->dir.dtype, i * p->dir.strides[3], e[i]);
        }
        norms[j * p->norms.strides[2]] = n1;
        norms[j * p->norms.strides[2] + p->norms.strides[3]] = n2;
        dist[j * p->dist.strides[2]] = d;
    }
}

enum kvc_status kvc_slerp_merge(const struct kvc_slerp_merge_params *p)
{
    const int64_t B = p->x1.shape[0], H = p->x1.shape[1], D = p->x1.shape[3];
    int64_t bh;
    int nt = p->num_threads > 0 ? p->num_threads : 1, failed = 0;
    if (!(p->t >= 0.0f && p->t <= 1.0f)) return KVC_ERR_INVALID;
    if (B * H * p->x1.shape[2] == 0) return KVC_OK;
    if (B * H < nt) nt = (int)(B * H);
#pragma omp parallel num_threads(nt) reduction(| : failed) if (nt > 1)
    {
        float *row = (float *)malloc((size_t)(3 * D + 1) * sizeof(float));
        if (row == NULL) failed = 1;
#pragma omp for schedule(static)
        for (bh = 0; bh < B * H; bh++)
            if (row) sm_head(p, bh / H, bh % H, row);
        free(row);
    }
    return failed ? KVC_ERR_NOMEM : KVC_OK;
}

static void sr_head(const struct kvc_slerp_restore_params *p, int64_t b, int64_t h)
{
    const int64_t m = p->dir.shape[2], r = p->kept.shape[2], D = p->dir.shape[3];
    const int64_t es = (int64_t)kvc_dtype_size((enum kvc_dtype)p->dir.dtype);
    const float *norms = (const float *)p->norms.data + b * p->norms.strides[0] + h * p->norms.strides[1] +
                         p->which * p->norms.strides[3];
    char *out = (char *)p->out.data + (b * p->out.strides[0] + h * p->out.strides[1]) * es;
    int64_t i, d;
    for (i = 0; i < m; i++) {
        const int64_t slot = kvc_load_index(p->slots.data, p->slots.dtype, b * p->slots.strides[0] +
                                            h * p->slots.strides[1] + i * p->slots.strides[2]);
        const char *src = (const char *)p->dir.data + (b * p->dir.strides[0] + h * p->dir.strides[1] +
                                                       i * p->dir.strides[2]) * es;
        const float nrm = norms[i * p->norms.strides[2]];
        char *dst;
        if (slot < 0) continue; /* padding */
        dst = out + slot * p->out.strides[2] * es;
        for (d = 0; d < D; d++)
            kvc_store_f32(dst, p->out.dtype, d * p->out.strides[3],
                          nrm * kvc_load_f32(src, p->dir.dtype, d * p->dir.strides[3]));
    }
    for (i = 0; i < r; i++) {
        const int64_t slot = kvc_load_index(p->kept_slots.data, p->kept_slots.dtype,
                                            b * p->kept_slots.strides[0] + h * p->kept_slots.strides[1] +
                                                i * p->kept_slots.strides[2]);
        const char *src = (const char *)p->kept.data + (b * p->kept.strides[0] + h * p->kept.strides[1] +
                                                        i * p->kept.strides[2]) * es;
        char *dst;
        if (slot < 0) continue; /* padding */
        dst = out + slot * p->out.strides[2] * es;
        /* a copy, bit for bit: retained tokens are exact */
        for (d = 0; d < D; d++)
            memcpy(dst + d * p->out.strides[3] * es, src + d * p->kept.strides[3] * es, (size_t)es);
    }
}

enum kvc_status kvc_slerp_restore(const struct kvc_slerp_restore_params *p)
{
    const int64_t B = p->dir.shape[0], H = p->dir.shape[1];
    int64_t bh;
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    if (p->which < 0 || p->which > 1) return KVC_ERR_INVALID;
    if (B * H == 0) return KVC_OK;
    if (B * H < nt) nt = (int)(B * H);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (bh = 0; bh < B * H; bh++) sr_head(p, bh / H, bh % H);
    return KVC_OK;
}
