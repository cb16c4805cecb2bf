/*
 * keyformer.c - Keyformer's noisy, tempered attention scores (CPU).
 *
 * One unit per (batch, query head) writes its own row, queries taken in
 * order; the rows of a kv head are then averaged in head order (head_rows.h:
 * bit-identical for any thread count).
 */
#include <math.h>
#include <string.h>

#include "keyformer.h"
#include "keyformer_math.h"
#include "causal_logits.h"
#include "head_rows.h"
#include "kvc_math.h"

#define KF_QC 16 /* queries converted (and their logits held) at a time */
#define KF_KB 64 /* keys converted to fp32 at a time */

static void kf_geometry(const struct kvc_keyformer_scores_params *p, struct kvc_head_rows *g)
{
    kvc_head_rows_init(g, &p->q, &p->k, p->k.shape[2],
                       kvc_causal_thread_bytes(p->q.shape[3], p->k.shape[2], KF_QC, KF_KB));
}

size_t kvc_keyformer_scores_scratch_bytes(const struct kvc_keyformer_scores_params *p)
{
    struct kvc_head_rows g;
    kf_geometry(p, &g);
    return kvc_head_rows_scratch_bytes(&g, p->num_threads);
}

/* acc[0 .. Tk) <- sum over the chunk's queries of head (b, h)'s score rows. */
static void KVC_HOT kf_unit(const void *op, const struct kvc_head_rows *g, int64_t b, int64_t h, float *acc,
                            char *mine)
{
    const struct kvc_keyformer_scores_params *p = (const struct kvc_keyformer_scores_params *)op;
    const int64_t D = g->D, Tq = g->Tq, Tk = g->Tk;
    const int64_t hk = h / g->g;
    const int64_t s = p->kv_start ? p->kv_start[b * p->kv_start_stride] : 0;
    const int64_t p0 = Tk - Tq; /* key position of query 0 */
    const size_t es = kvc_dtype_size((enum kvc_dtype)p->q.dtype);
    const char *qb_ptr = (const char *)p->q.data + (b * p->q.strides[0] + h * p->q.strides[1]) * (int64_t)es;
    const char *kb_ptr = (const char *)p->k.data + (b * p->k.strides[0] + hk * p->k.strides[1]) * (int64_t)es;
    const float inv_tau = 1.0f / p->tau;
    float *qbuf, *ktmp, *logits;
    int64_t c0, j;

    kvc_causal_buffers(mine, D, KF_QC, KF_KB, &qbuf, &ktmp, &logits);

    for (j = 0; j < Tk; j++) acc[j] = 0.0f;
    for (c0 = 0; c0 < Tq; c0 += KF_QC) {
        const int64_t nq = Tq - c0 < KF_QC ? Tq - c0 : KF_QC;
        int64_t i;
        if (p0 + c0 + nq <= s) continue; /* the chunk sees no key */
        kvc_causal_logits(&p->q, qb_ptr, &p->k, kb_ptr, D, c0, nq, p0, s, KF_KB, p->scaling, qbuf, ktmp, logits, Tk);
        for (i = 0; i < nq; i++) {
            const int64_t n = p0 + c0 + i - s + 1;
            float *row = logits + i * Tk;
            float m, inv;
            if (n <= 0) continue;
            if (p->noise != 0.0f) {
                for (j = 0; j < n; j++) {
                    const uint64_t hv = kvc_keyformer_hash(p->seed, (uint64_t)p->layer, (uint64_t)h, (uint64_t)j,
                                                           (uint64_t)(n - 1), (uint64_t)p->step);
                    row[j] = (row[j] + p->noise * kvc_gumbel(hv)) * inv_tau;
                }
            } else {
                for (j = 0; j < n; j++) row[j] *= inv_tau;
            }
            m = kvc_max_f32(row, n);
            inv = 1.0f / kvc_exp_shift_sum(row, n, m);
            for (j = 0; j < n; j++) acc[s + j] += row[j] * inv;
        }
    }
}

static void kf_reduce(const void *op, const struct kvc_head_rows *g, int64_t b, int64_t hk, const float *heads)
{
    kvc_head_rows_mean(&((const struct kvc_keyformer_scores_params *)op)->out, g, b, hk, heads);
}

enum kvc_status kvc_keyformer_scores(const struct kvc_keyformer_scores_params *p)
{
    struct kvc_head_rows g;
    if (!(p->tau > 0.0f) || !isfinite(p->tau) || !(p->noise >= 0.0f) || !isfinite(p->noise) || p->layer < 0 ||
        p->step < 0)
        return KVC_ERR_INVALID;
    kf_geometry(p, &g);
    if (g.B == 0 || g.Hkv == 0 || g.Tk == 0) return KVC_OK;
    if (g.Tq == 0) {
        kvc_head_rows_zero(&p->out, g.B, g.Hkv, g.Tk);
        return KVC_OK;
    }
    return kvc_head_rows_run(&g, p->scratch, p->scratch_bytes, p->num_threads, p, kf_unit, kf_reduce);
}
