/*
 * lsh.c - SimHash codes and MagicPIG's LSH-sampled decode attention (CPU);
 * contracts in lsh.h. One (b, head) per work item: results do not depend on
 * the thread count.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvc_math.h"
#include "lsh.h"
#include "lsh_math.h"

static void KVC_HOT sh_head(const struct kvc_simhash_params *p, int64_t b, int64_t h, float *row)
{
    const int64_t n = p->x.shape[2], D = p->x.shape[3], hk = h / p->group;
    const int64_t es = (int64_t)kvc_dtype_size((enum kvc_dtype)p->x.dtype);
    const float *planes = (const float *)p->planes.data + hk * p->planes.strides[0];
    const float *c = p->center.data ? (const float *)p->center.data + b * p->center.strides[0] +
                                          hk * p->center.strides[1]
                                    : NULL;
    float *plane = row + D;
    int64_t j, t, k, d;
    for (j = 0; j < n; j++) {
        kvc_row_to_f32(row, (const char *)p->x.data + (b * p->x.strides[0] + h * p->x.strides[1] +
                                                       j * p->x.strides[2]) * es,
                       p->x.dtype, D, p->x.strides[3]);
        if (c)
            for (d = 0; d < D; d++) row[d] -= c[d * p->center.strides[2]];
        for (t = 0; t < p->L; t++) {
            int32_t code = 0;
            for (k = 0; k < p->K; k++) {
                const float *w = planes + (t * p->K + k) * p->planes.strides[1];
                for (d = 0; d < D; d++) plane[d] = w[d * p->planes.strides[2]];
                if (kvc_dot_f32(plane, row, D) > 0.0f) code |= (int32_t)1 << k;
            }
            ((int32_t *)p->codes.data)[b * p->codes.strides[0] + h * p->codes.strides[1] +
                                       j * p->codes.strides[2] + t * p->codes.strides[3]] = code;
        }
    }
}

enum kvc_status kvc_simhash(const struct kvc_simhash_params *p)
{
    const int64_t B = p->x.shape[0], H = p->x.shape[1], D = p->x.shape[3];
    int64_t bh;
    int nt = p->num_threads > 0 ? p->num_threads : 1, failed = 0;
    if (p->K < 1 || p->K > 30 || p->L < 1 || p->group < 1 || H % p->group != 0) return KVC_ERR_INVALID;
    if (B * H * p->x.shape[2] == 0) return KVC_OK;
    if (B * H < nt) nt = (int)(B * H);
#pragma omp parallel num_threads(nt) reduction(| : failed) if (nt > 1)
    {
        float *row = (float *)malloc((size_t)(2 * D + 1) * sizeof(float));
        if (row == NULL) failed = 1;
#pragma omp for schedule(static)
        for (bh = 0; bh < B * H; bh++)
            if (row) sh_head(p, bh / H, bh % H, row);
        free(row);
    }
    return failed ? KVC_ERR_NOMEM : KVC_OK;
}

/* One (b, hq): the included slots' log-weights, then the online softmax. */
static void KVC_HOT la_head(const struct kvc_lsh_attention_params *p, int64_t b, int64_t hq, float *w)
{
    const int64_t Hq = p->q.shape[1], H = kvc_lsh_kv_heads(p), D = p->q.shape[3];
    const int64_t h = hq / (Hq / H), es = (int64_t)kvc_dtype_size((enum kvc_dtype)p->q.dtype);
    float *qr = w, *kr = w + D, *acc = w + 2 * D, *vr = w + 3 * D;
    const int32_t *qc = (const int32_t *)p->qcodes.data + b * p->qcodes.strides[0] + hq * p->qcodes.strides[1];
    const int32_t *codes = (const int32_t *)p->codes.data;
    const char *keys = (const char *)p->k.data, *values = (const char *)p->v.data;
    const float *c = p->center.data ? (const float *)p->center.data + b * p->center.strides[0] +
                                          h * p->center.strides[1]
                                    : NULL;
    struct kvc_lsh_head hd;
    double qn = 0.0;
    float m = -INFINITY, sum = 0.0f;
    int64_t j, d, t, n, s0, nread = 0;
    char *out = (char *)p->out.data + (b * p->out.strides[0] + hq * p->out.strides[2]) * es;
    kvc_lsh_head_get(p, b, h, &hd);
    n = hd.n;
    s0 = hd.s0;
    kvc_row_to_f32(qr, (const char *)p->q.data + (b * p->q.strides[0] + hq * p->q.strides[1]) * es, p->q.dtype,
                   D, p->q.strides[3]);
    for (d = 0; d < D; d++) {
        qn += (double)qr[d] * qr[d];
        acc[d] = 0.0f;
    }
    qn = sqrt(qn);
    for (j = s0; j < n; j++) {
        const int stat = j < s0 + p->sinks || j >= n - p->window;
        double logp = 0.0;
        float x, f, bias;
        if (!stat) {
            const int32_t *kc = codes + hd.codes + j * hd.cs;
            int32_t hits = 0;
            double dot = 0.0, kn = 0.0;
            for (t = 0; t < p->L; t++) hits += kc[t * hd.ct] == qc[t * p->qcodes.strides[3]];
            if (hits < p->hits) continue;
            kvc_row_to_f32(kr, keys + (hd.k + j * hd.ks) * es, p->k.dtype, D, hd.kd);
            for (d = 0; d < D; d++) {
                const double y = (double)kr[d] - (c ? c[d * p->center.strides[2]] : 0.0f);
                dot += (double)qr[d] * y;
                kn += y * y;
            }
            logp = kvc_lsh_log_inclusion(qn > 0 && kn > 0 ? dot / (qn * sqrt(kn)) : 0.0, p->K, p->L, p->hits);
        } else {
            kvc_row_to_f32(kr, keys + (hd.k + j * hd.ks) * es, p->k.dtype, D, hd.kd);
        }
        /* log p_j - log c_j, one term; without counts exactly (float)log p_j,
         * so the log-weight rounds as it did before counts existed */
        bias = (float)logp;
        if (p->counts.data) bias -= kvc_lsh_log_count(p, &hd, j);
        x = kvc_dot_f32(qr, kr, D) * p->scaling - bias;
        nread++;
        kvc_row_to_f32(vr, values + (hd.v + j * hd.vs) * es, p->v.dtype, D, hd.vd);
        if (x > m) {
            const float r = m == -INFINITY ? 0.0f : kvc_expf(m - x);
            for (d = 0; d < D; d++) acc[d] *= r;
            sum *= r;
            m = x;
        }
        f = kvc_expf(x - m);
        sum += f;
        for (d = 0; d < D; d++) acc[d] += f * vr[d];
    }
    for (d = 0; d < D; d++) {
        const float o = sum > 0.0f ? acc[d] / sum : 0.0f;
        kvc_store_f32(out, p->out.dtype, d * p->out.strides[3], o);
    }
    if (p->lse.data)
        ((float *)p->lse.data)[b * p->lse.strides[0] + hq * p->lse.strides[1]] =
            sum > 0.0f ? m + kvc_logf(sum) : -INFINITY;
    if (p->reads.data)
        ((int32_t *)p->reads.data)[b * p->reads.strides[0] + hq * p->reads.strides[1]] = (int32_t)nread;
}

/* The rules the kernels rely on (the binding states them with messages). */
static int la_valid(const struct kvc_lsh_attention_params *p)
{
    const int64_t H = kvc_lsh_kv_heads(p);
    if (p->layout == KVC_KV_RAGGED ? p->offsets == NULL || p->lengths == NULL || p->kv_start != NULL
                                   : p->layout != KVC_KV_UNIFORM)
        return 0;
    return H > 0 && p->q.shape[1] % H == 0 && p->K >= 1 && p->K <= 30 && p->L >= 1 && p->hits >= 1 &&
           p->sinks >= 0 && p->window >= 0;
}

enum kvc_status kvc_lsh_attention(const struct kvc_lsh_attention_params *p)
{
    const int64_t B = p->q.shape[0], Hq = p->q.shape[1], D = p->q.shape[3];
    int64_t bh;
    int nt = p->num_threads > 0 ? p->num_threads : 1, failed = 0;
    if (!la_valid(p)) return KVC_ERR_INVALID;
    if (B * Hq == 0) return KVC_OK;
    if (B * Hq < nt) nt = (int)(B * Hq);
#pragma omp parallel num_threads(nt) reduction(| : failed) if (nt > 1)
    {
        float *w = (float *)malloc((size_t)(4 * D + 1) * sizeof(float));
        if (w == NULL) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (bh = 0; bh < B * Hq; bh++)
            if (w) la_head(p, bh / Hq, bh % Hq, w);
        free(w);
    }
    return failed ? KVC_ERR_NOMEM : KVC_OK;
}
