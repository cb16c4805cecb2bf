/*
 * keyformer.c - Keyformer's noisy, tempered attention scores (CPU).
 *
 * One parallel unit per (batch, query head) writes its own row of a scratch
 * buffer, queries taken in order; the rows of a kv head are then reduced in
 * head order, so results are bit-identical for any thread count.
 */
#include <math.h>
#include <string.h>

#include "keyformer.h"
#include "keyformer_math.h"
#include "causal_logits.h"
#include "kvc_math.h"

#define KF_QC 16 /* queries converted (and their logits held) at a time */
#define KF_KB 64 /* keys converted to fp32 at a time */

struct kf_geom {
    int64_t B, Hq, Hkv, Tq, Tk, D, g;
    size_t heads_bytes, qbuf_bytes, ktmp_bytes, logits_bytes, thread_bytes;
};

static void kf_geometry(const struct kvc_keyformer_scores_params *p, struct kf_geom *g)
{
    g->B = p->q.shape[0];
    g->Hq = p->q.shape[1];
    g->Tq = p->q.shape[2];
    g->D = p->q.shape[3];
    g->Hkv = p->k.shape[1];
    g->Tk = p->k.shape[2];
    g->g = g->Hkv > 0 ? g->Hq / g->Hkv : 1;
    g->heads_bytes = kvc_align_up((size_t)(g->B * g->Hq * g->Tk) * sizeof(float));
    g->qbuf_bytes = kvc_align_up((size_t)(KF_QC * g->D) * sizeof(float));
    g->ktmp_bytes = kvc_align_up((size_t)(KF_KB * g->D) * sizeof(float));
    g->logits_bytes = kvc_align_up((size_t)(KF_QC * (g->Tk > 0 ? g->Tk : 1)) * sizeof(float));
    g->thread_bytes = g->qbuf_bytes + g->ktmp_bytes + g->logits_bytes;
}

size_t kvc_keyformer_scores_scratch_bytes(const struct kvc_keyformer_scores_params *p)
{
    struct kf_geom g;
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    kf_geometry(p, &g);
    return KVC_ALIGN + g.heads_bytes + (size_t)nt * g.thread_bytes;
}

/* acc[0 .. Tk) <- sum over the chunk's queries of head (b, h)'s score rows. */
static void KVC_HOT kf_unit(const struct kvc_keyformer_scores_params *p, const struct kf_geom *g,
                            int64_t b, int64_t h, float *acc, float *qbuf, float *ktmp, float *logits)
{
    const int64_t D = g->D, Tq = g->Tq, Tk = g->Tk;
    const int64_t hk = h / g->g;
    const int64_t s = p->kv_start ? p->kv_start[b * p->kv_start_stride] : 0;
    const int64_t p0 = Tk - Tq; /* key position of query 0 */
    const size_t es = kvc_dtype_size((enum kvc_dtype)p->q.dtype);
    const char *qb_ptr = (const char *)p->q.data + (b * p->q.strides[0] + h * p->q.strides[1]) * (int64_t)es;
    const char *kb_ptr = (const char *)p->k.data + (b * p->k.strides[0] + hk * p->k.strides[1]) * (int64_t)es;
    const float inv_tau = 1.0f / p->tau;
    int64_t c0, j;

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

/* out row of kv head (b, hk): its g head rows added in head order, over g. */
static void kf_reduce(const struct kvc_keyformer_scores_params *p, const struct kf_geom *g, int64_t b,
                      int64_t hk, const float *heads)
{
    float *out = (float *)p->out.data + b * p->out.strides[0] + hk * p->out.strides[1];
    const int64_t os = p->out.strides[2], Tk = g->Tk;
    const float *first = heads + (b * g->Hq + hk * g->g) * Tk;
    const float den = (float)g->g;
    int64_t j;
    for (j = 0; j < Tk; j++) out[j * os] = kvc_group_sum_at(first, g->g, Tk, j) / den;
}

enum kvc_status kvc_keyformer_scores(const struct kvc_keyformer_scores_params *p)
{
    struct kf_geom g;
    char *base;
    float *heads;
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    int64_t u;
    if (!(p->tau > 0.0f) || !isfinite(p->tau) || !(p->noise >= 0.0f) || !isfinite(p->noise) || p->layer < 0 ||
        p->step < 0)
        return KVC_ERR_INVALID;
    kf_geometry(p, &g);
    if (g.B == 0 || g.Hkv == 0 || g.Tk == 0) return KVC_OK;
    if (g.Tq == 0) {
        int64_t b, hk, j;
        for (b = 0; b < g.B; b++)
            for (hk = 0; hk < g.Hkv; hk++)
                for (j = 0; j < g.Tk; j++)
                    ((float *)p->out.data)[b * p->out.strides[0] + hk * p->out.strides[1] + j * p->out.strides[2]] =
                        0.0f;
        return KVC_OK;
    }
    if (p->scratch == NULL || p->scratch_bytes < kvc_keyformer_scores_scratch_bytes(p)) return KVC_ERR_NOMEM;
    base = (char *)(((uintptr_t)p->scratch + (KVC_ALIGN - 1)) & ~(uintptr_t)(KVC_ALIGN - 1));
    heads = (float *)base;
    base += g.heads_bytes;

#pragma omp parallel num_threads(nt)
    {
        char *mine = base + (size_t)KVC_THREAD_ID() * g.thread_bytes;
        float *qbuf = (float *)mine;
        float *ktmp = (float *)(mine + g.qbuf_bytes);
        float *logits = (float *)(mine + g.qbuf_bytes + g.ktmp_bytes);
#pragma omp for schedule(dynamic, 1)
        for (u = 0; u < g.B * g.Hq; u++)
            kf_unit(p, &g, u / g.Hq, u % g.Hq, heads + u * g.Tk, qbuf, ktmp, logits);
#pragma omp for schedule(static)
        for (u = 0; u < g.B * g.Hkv; u++) kf_reduce(p, &g, u / g.Hkv, u % g.Hkv, heads);
    }
    return KVC_OK;
}
