/*
 * actqkv.c - ActQKV scores (CPU); the contract is in actqkv.h.
 *
 * One parallel unit per (batch, query head) builds its probe and writes its
 * softmax row into a scratch buffer; the rows of a kv head are then averaged
 * in head order, so results are bit-identical for any thread count.
 */
#include <math.h>

#include "actqkv.h"
#include "actqkv_math.h"
#include "kvc_math.h"

#define AQ_KB 64 /* keys converted to fp32 at a time */

struct aq_geom {
    int64_t B, Hq, Hkv, W, Tk, D, g;
    size_t heads_bytes, qbuf_bytes, vec_bytes, wbuf_bytes, ktmp_bytes, thread_bytes;
};

static void aq_geometry(const struct kvc_actqkv_scores_params *p, struct aq_geom *g)
{
    g->B = p->q.shape[0];
    g->Hq = p->q.shape[1];
    g->W = p->q.shape[2];
    g->D = p->q.shape[3];
    g->Hkv = p->k.shape[1];
    g->Tk = p->k.shape[2];
    g->g = g->Hkv > 0 ? g->Hq / g->Hkv : 1;
    g->heads_bytes = kvc_align_up((size_t)(g->B * g->Hq * g->Tk) * sizeof(float));
    g->qbuf_bytes = kvc_align_up((size_t)(g->W * g->D) * sizeof(float));
    g->vec_bytes = kvc_align_up((size_t)g->D * sizeof(float)); /* mu, var, probe */
    g->wbuf_bytes = kvc_align_up((size_t)g->W * sizeof(float));
    g->ktmp_bytes = kvc_align_up((size_t)(AQ_KB * g->D) * sizeof(float));
    g->thread_bytes = g->qbuf_bytes + 3 * g->vec_bytes + g->wbuf_bytes + g->ktmp_bytes;
}

size_t kvc_actqkv_scores_scratch_bytes(const struct kvc_actqkv_scores_params *p)
{
    struct aq_geom g;
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    aq_geometry(p, &g);
    return KVC_ALIGN + g.heads_bytes + (size_t)nt * g.thread_bytes;
}

/* row[0 .. Tk) <- head (b, h)'s softmax over the keys; weights row written. */
static void KVC_HOT aq_unit(const struct kvc_actqkv_scores_params *p, const struct aq_geom *g, int64_t b,
                            int64_t h, float *row, char *mine)
{
    const int64_t D = g->D, W = g->W, Tk = g->Tk, hk = h / g->g;
    const int64_t s = p->kv_start ? p->kv_start[b * p->kv_start_stride] : 0;
    const int64_t p0 = Tk - W; /* key position of window query 0 */
    const int64_t i0 = s - p0 > 0 ? (s - p0 < W ? s - p0 : W) : 0;
    const int64_t m = W - i0, n = Tk - s;
    const size_t es = kvc_dtype_size((enum kvc_dtype)p->q.dtype);
    const char *qb_ptr = (const char *)p->q.data + (b * p->q.strides[0] + h * p->q.strides[1]) * (int64_t)es;
    const char *kb_ptr = (const char *)p->k.data + (b * p->k.strides[0] + hk * p->k.strides[1]) * (int64_t)es;
    float *wrow = (float *)p->weights.data + b * p->weights.strides[0] + h * p->weights.strides[1];
    const int64_t ws = p->weights.strides[2];
    float *qbuf = (float *)mine;
    float *mu = (float *)(mine + g->qbuf_bytes);
    float *var = (float *)(mine + g->qbuf_bytes + g->vec_bytes);
    float *probe = (float *)(mine + g->qbuf_bytes + 2 * g->vec_bytes);
    float *w = (float *)(mine + g->qbuf_bytes + 3 * g->vec_bytes);
    float *ktmp = (float *)(mine + g->qbuf_bytes + 3 * g->vec_bytes + g->wbuf_bytes);
    int64_t i, j, kb;
    float mx, inv;

    for (i = 0; i < i0; i++) wrow[i * ws] = 0.0f;
    for (j = 0; j < Tk; j++) row[j] = 0.0f;
    if (m <= 0 || n <= 0) return;
    for (i = 0; i < m; i++)
        kvc_row_to_f32(qbuf + i * D, qb_ptr + (i0 + i) * p->q.strides[2] * (int64_t)es, p->q.dtype, D,
                       p->q.strides[3]);
    kvc_actqkv_probe(qbuf, m, D, mu, var, w, probe);
    for (i = 0; i < m; i++) wrow[(i0 + i) * ws] = w[i];
    for (kb = 0; kb < n; kb += AQ_KB) {
        const int64_t nk = n - kb < AQ_KB ? n - kb : AQ_KB;
        int64_t l;
        for (l = 0; l < nk; l++)
            kvc_row_to_f32(ktmp + l * D, kb_ptr + (s + kb + l) * p->k.strides[2] * (int64_t)es, p->k.dtype, D,
                           p->k.strides[3]);
        for (l = 0; l < nk; l++) row[s + kb + l] = p->scaling * kvc_dot_f32(probe, ktmp + l * D, D);
    }
    mx = kvc_max_f32(row + s, n);
    inv = 1.0f / kvc_exp_shift_sum(row + s, n, mx);
    for (j = s; j < Tk; j++) row[j] *= inv;
}

/* out row of kv head (b, hk): its g head rows added in head order, over g. */
static void aq_reduce(const struct kvc_actqkv_scores_params *p, const struct aq_geom *g, int64_t b, int64_t hk,
                      const float *heads)
{
    float *out = (float *)p->out.data + b * p->out.strides[0] + hk * p->out.strides[1];
    const int64_t os = p->out.strides[2], Tk = g->Tk;
    const float *first = heads + (b * g->Hq + hk * g->g) * Tk;
    const float den = (float)g->g;
    int64_t j;
    for (j = 0; j < Tk; j++) out[j * os] = kvc_group_sum_at(first, g->g, Tk, j) / den;
}

enum kvc_status kvc_actqkv_scores(const struct kvc_actqkv_scores_params *p)
{
    struct aq_geom g;
    char *base;
    float *heads;
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    int64_t u;
    aq_geometry(p, &g);
    if (g.D < 1 || g.W > g.Tk) return KVC_ERR_INVALID;
    if (g.B == 0 || g.Hq == 0) return KVC_OK;
    if (g.W == 0 || g.Tk == 0) {
        /* no window query: nothing to probe with, every score is 0 */
        int64_t b, hk, j;
        for (b = 0; b < g.B; b++)
            for (hk = 0; hk < g.Hkv; hk++)
                for (j = 0; j < g.Tk; j++)
                    ((float *)p->out.data)[b * p->out.strides[0] + hk * p->out.strides[1] + j * p->out.strides[2]] =
                        0.0f;
        return KVC_OK;
    }
    if (p->scratch == NULL || p->scratch_bytes < kvc_actqkv_scores_scratch_bytes(p)) return KVC_ERR_NOMEM;
    base = (char *)(((uintptr_t)p->scratch + (KVC_ALIGN - 1)) & ~(uintptr_t)(KVC_ALIGN - 1));
    heads = (float *)base;
    base += g.heads_bytes;

#pragma omp parallel num_threads(nt)
    {
        char *mine = base + (size_t)KVC_THREAD_ID() * g.thread_bytes;
#pragma omp for schedule(dynamic, 1)
        for (u = 0; u < g.B * g.Hq; u++) aq_unit(p, &g, u / g.Hq, u % g.Hq, heads + u * g.Tk, mine);
#pragma omp for schedule(static)
        for (u = 0; u < g.B * g.Hkv; u++) aq_reduce(p, &g, u / g.Hkv, u % g.Hkv, heads);
    }
    return KVC_OK;
}
