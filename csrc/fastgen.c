/*
 * fastgen.c - FastGen's attention recovery per ladder policy (CPU).
 *
 * One parallel unit per (batch, query head) bins its window's attention
 * mass by the slots' rungs into its own row of a scratch buffer, queries
 * taken in order; the rows of a kv head are then added in head order and
 * the bins accumulated, so results are bit-identical for any thread count.
 */
#include <math.h>
#include <string.h>

#include "fastgen.h"
#include "causal_logits.h"
#include "kvc_math.h"

#define FG_QC 16 /* queries converted (and their logits held) at a time */
#define FG_KB 64 /* keys converted to fp32 at a time */

struct fg_geom {
    int64_t B, Hq, Hkv, Tq, Tk, D, g, P;
    size_t heads_bytes, qbuf_bytes, ktmp_bytes, logits_bytes, thread_bytes;
};

static void fg_geometry(const struct kvc_fastgen_recovery_params *p, struct fg_geom *g)
{
    g->B = p->q.shape[0];
    g->Hq = p->q.shape[1];
    g->Tq = p->q.shape[2];
    g->D = p->q.shape[3];
    g->Hkv = p->k.shape[1];
    g->Tk = p->k.shape[2];
    g->P = p->out.shape[2];
    g->g = g->Hkv > 0 ? g->Hq / g->Hkv : 1;
    g->heads_bytes = kvc_align_up((size_t)(g->B * g->Hq * g->P) * sizeof(float));
    g->qbuf_bytes = kvc_align_up((size_t)(FG_QC * g->D) * sizeof(float));
    g->ktmp_bytes = kvc_align_up((size_t)(FG_KB * g->D) * sizeof(float));
    g->logits_bytes = kvc_align_up((size_t)(FG_QC * (g->Tk > 0 ? g->Tk : 1)) * sizeof(float));
    g->thread_bytes = g->qbuf_bytes + g->ktmp_bytes + g->logits_bytes;
}

size_t kvc_fastgen_recovery_scratch_bytes(const struct kvc_fastgen_recovery_params *p)
{
    struct fg_geom g;
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    fg_geometry(p, &g);
    return KVC_ALIGN + g.heads_bytes + (size_t)nt * g.thread_bytes;
}

/* bins[0 .. P) <- attention mass of head (b, h)'s window per rung. */
static void KVC_HOT fg_unit(const struct kvc_fastgen_recovery_params *p, const struct fg_geom *g, int64_t b,
                            int64_t h, float *bins, float *qbuf, float *ktmp, float *logits)
{
    const int64_t D = g->D, Tq = g->Tq, Tk = g->Tk, P = g->P;
    const int64_t hk = h / g->g;
    const int64_t s = p->kv_start ? p->kv_start[b * p->kv_start_stride] : 0;
    const int64_t p0 = Tk - Tq; /* key position of query 0 */
    const size_t es = kvc_dtype_size((enum kvc_dtype)p->q.dtype);
    const char *qb_ptr = (const char *)p->q.data + (b * p->q.strides[0] + h * p->q.strides[1]) * (int64_t)es;
    const char *kb_ptr = (const char *)p->k.data + (b * p->k.strides[0] + hk * p->k.strides[1]) * (int64_t)es;
    const uint8_t *rung = (const uint8_t *)p->rung.data + b * p->rung.strides[0] + hk * p->rung.strides[1];
    const int64_t rs = p->rung.strides[2];
    int64_t c0, r;

    for (r = 0; r < P; r++) bins[r] = 0.0f;
    for (c0 = 0; c0 < Tq; c0 += FG_QC) {
        const int64_t nq = Tq - c0 < FG_QC ? Tq - c0 : FG_QC;
        int64_t i;
        if (p0 + c0 + nq <= s) continue; /* the chunk sees no key */
        kvc_causal_logits(&p->q, qb_ptr, &p->k, kb_ptr, D, c0, nq, p0, s, FG_KB, p->scaling, qbuf, ktmp, logits, Tk);
        for (i = 0; i < nq; i++) {
            const int64_t n = p0 + c0 + i - s + 1;
            float *row = logits + i * Tk;
            float m, inv;
            int64_t j;
            if (n <= 0) continue;
            m = kvc_max_f32(row, n);
            inv = 1.0f / kvc_exp_shift_sum(row, n, m);
            for (j = 0; j < n; j++) {
                const int64_t rj = rung[(s + j) * rs];
                /* a slot of no policy (rung >= P) recovers nothing */
                if (rj < P) bins[rj] += row[j] * inv;
            }
        }
    }
}

/* out row of kv head (b, hk): its g head rows added in head order, the
 * bins accumulated, over g * Q. */
static void fg_reduce(const struct kvc_fastgen_recovery_params *p, const struct fg_geom *g, int64_t b, int64_t hk,
                      const float *heads)
{
    float *out = (float *)p->out.data + b * p->out.strides[0] + hk * p->out.strides[1];
    const int64_t os = p->out.strides[2], P = g->P;
    const int64_t s = p->kv_start ? p->kv_start[b * p->kv_start_stride] : 0;
    /* window queries that see a key: those at positions >= s */
    const int64_t first_q = s - (g->Tk - g->Tq) > 0 ? s - (g->Tk - g->Tq) : 0;
    const int64_t Q = g->Tq - first_q > 0 ? g->Tq - first_q : 0;
    const float *first = heads + (b * g->Hq + hk * g->g) * P;
    float cum = 0.0f;
    int64_t r;
    if (Q == 0) {
        for (r = 0; r < P; r++) out[r * os] = 1.0f;
        return;
    }
    for (r = 0; r < P; r++) {
        cum += kvc_group_sum_at(first, g->g, P, r);
        out[r * os] = cum / ((float)g->g * (float)Q);
    }
}

enum kvc_status kvc_fastgen_recovery(const struct kvc_fastgen_recovery_params *p)
{
    struct fg_geom g;
    char *base;
    float *heads;
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    int64_t u;
    fg_geometry(p, &g);
    if (g.P < 1 || g.P > KVC_FASTGEN_MAX_RUNGS) return KVC_ERR_INVALID;
    if (g.B == 0 || g.Hkv == 0) return KVC_OK;
    if (p->scratch == NULL || p->scratch_bytes < kvc_fastgen_recovery_scratch_bytes(p)) return KVC_ERR_NOMEM;
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
            fg_unit(p, &g, u / g.Hq, u % g.Hq, heads + u * g.P, qbuf, ktmp, logits);
#pragma omp for schedule(static)
        for (u = 0; u < g.B * g.Hkv; u++) fg_reduce(p, &g, u / g.Hkv, u % g.Hkv, heads);
    }
    return KVC_OK;
}
