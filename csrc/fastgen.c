/*
 * fastgen.c - FastGen's attention recovery per ladder policy (CPU).
 *
 * One unit per (batch, query head) bins its window's attention mass by the
 * slots' rungs into its own row, queries taken in order; the rows of a kv
 * head are then added in head order and the bins accumulated (head_rows.h:
 * bit-identical for any thread count).
 */
#include <math.h>
#include <string.h>

#include "fastgen.h"
#include "causal_logits.h"
#include "head_rows.h"
#include "kvc_math.h"

#define FG_QC 16 /* queries converted (and their logits held) at a time */
#define FG_KB 64 /* keys converted to fp32 at a time */

/* Head rows are P bins, the out tensor's last dimension. */
static void fg_geometry(const struct kvc_fastgen_recovery_params *p, struct kvc_head_rows *g)
{
    kvc_head_rows_init(g, &p->q, &p->k, p->out.shape[2],
                       kvc_causal_thread_bytes(p->q.shape[3], p->k.shape[2], FG_QC, FG_KB));
}

size_t kvc_fastgen_recovery_scratch_bytes(const struct kvc_fastgen_recovery_params *p)
{
    struct kvc_head_rows g;
    fg_geometry(p, &g);
    return kvc_head_rows_scratch_bytes(&g, p->num_threads);
}

/* bins[0 .. P) <- attention mass of head (b, h)'s window per rung. */
static void KVC_HOT fg_unit(const void *op, const struct kvc_head_rows *g, int64_t b, int64_t h, float *bins,
                            char *mine)
{
    const struct kvc_fastgen_recovery_params *p = (const struct kvc_fastgen_recovery_params *)op;
    const int64_t D = g->D, Tq = g->Tq, Tk = g->Tk, P = g->row;
    const int64_t hk = h / g->g;
    const int64_t s = p->kv_start ? p->kv_start[b * p->kv_start_stride] : 0;
    const int64_t p0 = Tk - Tq; /* key position of query 0 */
    const size_t es = kvc_dtype_size((enum kvc_dtype)p->q.dtype);
    const char *qb_ptr = (const char *)p->q.data + (b * p->q.strides[0] + h * p->q.strides[1]) * (int64_t)es;
    const char *kb_ptr = (const char *)p->k.data + (b * p->k.strides[0] + hk * p->k.strides[1]) * (int64_t)es;
    const uint8_t *rung = (const uint8_t *)p->rung.data + b * p->rung.strides[0] + hk * p->rung.strides[1];
    const int64_t rs = p->rung.strides[2];
    float *qbuf, *ktmp, *logits;
    int64_t c0, r;

    kvc_causal_buffers(mine, D, FG_QC, FG_KB, &qbuf, &ktmp, &logits);
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
static void fg_reduce(const void *op, const struct kvc_head_rows *g, int64_t b, int64_t hk, const float *heads)
{
    const struct kvc_fastgen_recovery_params *p = (const struct kvc_fastgen_recovery_params *)op;
    float *out = (float *)p->out.data + b * p->out.strides[0] + hk * p->out.strides[1];
    const int64_t os = p->out.strides[2], P = g->row;
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
    struct kvc_head_rows g;
    fg_geometry(p, &g);
    if (g.row < 1 || g.row > KVC_FASTGEN_MAX_RUNGS) return KVC_ERR_INVALID;
    if (g.B == 0 || g.Hkv == 0) return KVC_OK;
    return kvc_head_rows_run(&g, p->scratch, p->scratch_bytes, p->num_threads, p, fg_unit, fg_reduce);
}
