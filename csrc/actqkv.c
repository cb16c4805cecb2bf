/*
 * actqkv.c - ActQKV scores (CPU); the contract is in actqkv.h.
 *
 * One unit per (batch, query head) builds its probe and writes its softmax
 * row; the rows of a kv head are then averaged in head order (head_rows.h:
 * bit-identical for any thread count).
 */
#include <math.h>

#include "actqkv.h"
#include "actqkv_math.h"
#include "head_rows.h"
#include "kvc_math.h"

#define AQ_KB 64 /* keys converted to fp32 at a time */

/* Per-thread buffers: window queries [W, D], mu / var / probe [D] each,
 * weights [W], a key tile [AQ_KB, D]. */
static size_t aq_qbuf_bytes(int64_t W, int64_t D) { return kvc_align_up((size_t)(W * D) * sizeof(float)); }
static size_t aq_vec_bytes(int64_t D) { return kvc_align_up((size_t)D * sizeof(float)); }
static size_t aq_wbuf_bytes(int64_t W) { return kvc_align_up((size_t)W * sizeof(float)); }

static void aq_geometry(const struct kvc_actqkv_scores_params *p, struct kvc_head_rows *g)
{
    const int64_t W = p->q.shape[2], D = p->q.shape[3];
    const size_t ktmp = kvc_align_up((size_t)(AQ_KB * D) * sizeof(float));
    kvc_head_rows_init(g, &p->q, &p->k, p->k.shape[2],
                       aq_qbuf_bytes(W, D) + 3 * aq_vec_bytes(D) + aq_wbuf_bytes(W) + ktmp);
}

size_t kvc_actqkv_scores_scratch_bytes(const struct kvc_actqkv_scores_params *p)
{
    struct kvc_head_rows g;
    aq_geometry(p, &g);
    return kvc_head_rows_scratch_bytes(&g, p->num_threads);
}

/* row[0 .. Tk) <- head (b, h)'s softmax over the keys; weights row written. */
static void KVC_HOT aq_unit(const void *op, const struct kvc_head_rows *g, int64_t b, int64_t h, float *row,
                            char *mine)
{
    const struct kvc_actqkv_scores_params *p = (const struct kvc_actqkv_scores_params *)op;
    const int64_t D = g->D, W = g->Tq, Tk = g->Tk, hk = h / g->g;
    const int64_t s = p->kv_start ? p->kv_start[b * p->kv_start_stride] : 0;
    const int64_t p0 = Tk - W; /* key position of window query 0 */
    const int64_t i0 = s - p0 > 0 ? (s - p0 < W ? s - p0 : W) : 0;
    const int64_t m = W - i0, n = Tk - s;
    const size_t es = kvc_dtype_size((enum kvc_dtype)p->q.dtype);
    const char *qb_ptr = (const char *)p->q.data + (b * p->q.strides[0] + h * p->q.strides[1]) * (int64_t)es;
    const char *kb_ptr = (const char *)p->k.data + (b * p->k.strides[0] + hk * p->k.strides[1]) * (int64_t)es;
    float *wrow = (float *)p->weights.data + b * p->weights.strides[0] + h * p->weights.strides[1];
    const int64_t ws = p->weights.strides[2];
    const size_t qb = aq_qbuf_bytes(W, D), vb = aq_vec_bytes(D);
    float *qbuf = (float *)mine;
    float *mu = (float *)(mine + qb);
    float *var = (float *)(mine + qb + vb);
    float *probe = (float *)(mine + qb + 2 * vb);
    float *w = (float *)(mine + qb + 3 * vb);
    float *ktmp = (float *)(mine + qb + 3 * vb + aq_wbuf_bytes(W));
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

static void aq_reduce(const void *op, const struct kvc_head_rows *g, int64_t b, int64_t hk, const float *heads)
{
    kvc_head_rows_mean(&((const struct kvc_actqkv_scores_params *)op)->out, g, b, hk, heads);
}

enum kvc_status kvc_actqkv_scores(const struct kvc_actqkv_scores_params *p)
{
    struct kvc_head_rows g;
    aq_geometry(p, &g);
    if (g.D < 1 || g.Tq > g.Tk) return KVC_ERR_INVALID;
    if (g.B == 0 || g.Hq == 0) return KVC_OK;
    if (g.Tq == 0 || g.Tk == 0) {
        /* no window query: nothing to probe with, every score is 0 */
        kvc_head_rows_zero(&p->out, g.B, g.Hkv, g.Tk);
        return KVC_OK;
    }
    return kvc_head_rows_run(&g, p->scratch, p->scratch_bytes, p->num_threads, p, aq_unit, aq_reduce);
}
