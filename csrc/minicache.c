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

/* Row j of a [B, H, n, D] view as fp32. */
static void ma_row(float *dst, const struct kvc_view *v, int64_t b, int64_t h, int64_t j)
{
    const int64_t es = (int64_t)kvc_dtype_size((enum kvc_dtype)v->dtype);
    kvc_row_to_f32(dst, (const char *)v->data + (b * v->strides[0] + h * v->strides[1] + j * v->strides[2]) * es,
                   v->dtype, v->shape[3], v->strides[3]);
}

static int64_t ma_slot(const struct kvc_view *v, int64_t b, int64_t h, int64_t i)
{
    return kvc_load_index(v->data, v->dtype, b * v->strides[0] + h * v->strides[1] + i * v->strides[2]);
}

static void KVC_HOT ma_query(const struct kvc_minicache_attention_params *p, int64_t b, int64_t hq, float *buf)
{
    const int64_t Hq = p->q.shape[1], H = p->dir_k.shape[1], D = p->q.shape[3], Dv = p->dir_v.shape[3];
    const int64_t h = hq / (Hq / H), m = p->dir_k.shape[2], w = p->keys.shape[2], t = p->tail_k.shape[2];
    const int64_t es = (int64_t)kvc_dtype_size((enum kvc_dtype)p->q.dtype);
    float *q = buf, *row = buf + D, *vrow = row + D, *acc = vrow + Dv;
    struct kvc_softmax_state st;
    int64_t i, d;
    kvc_row_to_f32(q, (const char *)p->q.data + (b * p->q.strides[0] + hq * p->q.strides[1]) * es, p->q.dtype, D,
                   p->q.strides[3]);
    for (d = 0; d < Dv; d++) acc[d] = 0.0f;
    kvc_softmax_init(&st);
    for (i = 0; i < m; i++) {
        const float *nk = (const float *)p->norms_k.data + b * p->norms_k.strides[0] + h * p->norms_k.strides[1] +
                          i * p->norms_k.strides[2] + p->which * p->norms_k.strides[3];
        const float *nv = (const float *)p->norms_v.data + b * p->norms_v.strides[0] + h * p->norms_v.strides[1] +
                          i * p->norms_v.strides[2] + p->which * p->norms_v.strides[3];
        float x;
        if (ma_slot(&p->slots, b, h, i) < 0) continue; /* padding */
        ma_row(row, &p->dir_k, b, h, i);
        x = p->scaling * (*nk * kvc_dot_f32(q, row, D));
        if (p->counts.data)
            x += kvc_logf(((const float *)p->counts.data)[b * p->counts.strides[0] + h * p->counts.strides[1] +
                                                          i * p->counts.strides[2] + p->which * p->counts.strides[3]]);
        ma_row(vrow, &p->dir_v, b, h, i);
        kvc_mc_push(&st, acc, x, vrow, *nv, Dv);
    }
    for (i = 0; i < w; i++) {
        float x;
        if (ma_slot(&p->kept_slots, b, h, i) < 0) continue; /* padding */
        ma_row(row, &p->keys, b, h, i);
        x = p->scaling * kvc_dot_f32(q, row, D);
        if (p->kept_counts.data)
            x += kvc_logf(((const float *)p->kept_counts.data)[b * p->kept_counts.strides[0] +
                                                               h * p->kept_counts.strides[1] +
                                                               i * p->kept_counts.strides[2]]);
        ma_row(vrow, &p->values, b, h, i);
        kvc_mc_push(&st, acc, x, vrow, 1.0f, Dv);
    }
    for (i = 0; i < t; i++) {
        ma_row(row, &p->tail_k, b, h, i);
        ma_row(vrow, &p->tail_v, b, h, i);
        kvc_mc_push(&st, acc, p->scaling * kvc_dot_f32(q, row, D), vrow, 1.0f, Dv);
    }
    {
        const float inv = st.s > 0.0f ? 1.0f / st.s : 0.0f;
        char *dst = (char *)p->out.data + (b * p->out.strides[0] + hq * p->out.strides[2]) * es;
        for (d = 0; d < Dv; d++) kvc_store_f32(dst, p->out.dtype, d * p->out.strides[3], acc[d] * inv);
    }
}

enum kvc_status kvc_minicache_attention(const struct kvc_minicache_attention_params *p)
{
    const int64_t B = p->q.shape[0], Hq = p->q.shape[1], H = p->dir_k.shape[1];
    const int64_t D = p->q.shape[3], Dv = p->dir_v.shape[3];
    int64_t r;
    int nt = p->num_threads > 0 ? p->num_threads : 1, failed = 0;
    if (p->which < 0 || p->which > 1 || H <= 0 || Hq % H != 0 || p->q.shape[2] != 1) return KVC_ERR_INVALID;
    if (B * Hq == 0) return KVC_OK;
    if (B * Hq < nt) nt = (int)(B * Hq);
#pragma omp parallel num_threads(nt) reduction(| : failed) if (nt > 1)
    {
        float *buf = (float *)malloc((size_t)(2 * D + 2 * Dv + 1) * sizeof(float));
        if (buf == NULL) failed = 1;
#pragma omp for schedule(static)
        for (r = 0; r < B * Hq; r++)
            if (buf) ma_query(p, r / Hq, r % Hq, buf);
        free(buf);
    }
    return failed ? KVC_ERR_NOMEM : KVC_OK;
}
