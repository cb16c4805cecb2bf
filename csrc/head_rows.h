/*
 * head_rows.h - the parallel frame of ops that compute one float row per
 * (batch, query head) and then reduce the rows of each kv head (CPU):
 * Keyformer's scores, FastGen's recovery, ActQKV's scores.
 *
 * The rows go to a shared scratch buffer, one per query head, and the
 * reduction reads a kv head's g rows in head order. Whichever thread
 * computes a row, the sums come out in the same order, so the results are
 * bit-identical for any thread count. Each thread also gets a private slice
 * of the scratch for its own buffers (converted queries, key tiles, logits).
 *
 * Scratch layout: alignment slack, then [B * Hq * row] floats of head rows,
 * then num_threads slices of thread_bytes each.
 */
#ifndef KVC_HEAD_ROWS_H
#define KVC_HEAD_ROWS_H

#include "kvc.h"
#include "kvc_math.h"

struct kvc_head_rows {
    int64_t B, Hq, Hkv, Tq, Tk, D, g; /* q [B, Hq, Tq, D], k [B, Hkv, Tk, D], g = Hq / Hkv */
    int64_t row;                      /* floats per head row */
    size_t heads_bytes, thread_bytes;
};

/* One head's row: (b, h) writes row[0 .. row), `mine` is the thread's slice. */
typedef void (*kvc_head_unit_fn)(const void *op, const struct kvc_head_rows *g, int64_t b, int64_t h, float *row,
                                 char *mine);
/* One kv head's reduction over heads[(b * Hq + hk * g + i) * row], i < g. */
typedef void (*kvc_head_reduce_fn)(const void *op, const struct kvc_head_rows *g, int64_t b, int64_t hk,
                                   const float *heads);

/* Shapes from q and k; `row` floats per head row, `thread_bytes` per thread
 * (each part already aligned by the caller). */
static inline void kvc_head_rows_init(struct kvc_head_rows *g, const struct kvc_view *q, const struct kvc_view *k,
                                      int64_t row, size_t thread_bytes)
{
    g->B = q->shape[0];
    g->Hq = q->shape[1];
    g->Tq = q->shape[2];
    g->D = q->shape[3];
    g->Hkv = k->shape[1];
    g->Tk = k->shape[2];
    g->g = g->Hkv > 0 ? g->Hq / g->Hkv : 1;
    g->row = row;
    g->heads_bytes = kvc_align_up((size_t)(g->B * g->Hq * row) * sizeof(float));
    g->thread_bytes = thread_bytes;
}

static inline size_t kvc_head_rows_scratch_bytes(const struct kvc_head_rows *g, int num_threads)
{
    const int nt = num_threads > 0 ? num_threads : 1;
    return KVC_ALIGN + g->heads_bytes + (size_t)nt * g->thread_bytes;
}

/* Every head's unit (dynamic schedule: rows cost what their causal span
 * costs), then every kv head's reduction. KVC_ERR_NOMEM when the scratch is
 * missing or short. */
static inline enum kvc_status kvc_head_rows_run(const struct kvc_head_rows *g, void *scratch, size_t scratch_bytes,
                                                int num_threads, const void *op, kvc_head_unit_fn unit,
                                                kvc_head_reduce_fn reduce)
{
    const int nt = num_threads > 0 ? num_threads : 1;
    char *base;
    float *heads;
    int64_t u;
    if (scratch == NULL || scratch_bytes < kvc_head_rows_scratch_bytes(g, nt)) return KVC_ERR_NOMEM;
    base = (char *)(((uintptr_t)scratch + (KVC_ALIGN - 1)) & ~(uintptr_t)(KVC_ALIGN - 1));
    heads = (float *)base;
    base += g->heads_bytes;

#pragma omp parallel num_threads(nt)
    {
        char *mine = base + (size_t)KVC_THREAD_ID() * g->thread_bytes;
#pragma omp for schedule(dynamic, 1)
        for (u = 0; u < g->B * g->Hq; u++) unit(op, g, u / g->Hq, u % g->Hq, heads + u * g->row, mine);
#pragma omp for schedule(static)
        for (u = 0; u < g->B * g->Hkv; u++) reduce(op, g, u / g->Hkv, u % g->Hkv, heads);
    }
    return KVC_OK;
}

/* out[b, hk, j] <- the mean over its g head rows of column j, added in head
 * order (Keyformer's and ActQKV's GQA reduction). */
static inline void kvc_head_rows_mean(const struct kvc_view *out, const struct kvc_head_rows *g, int64_t b,
                                      int64_t hk, const float *heads)
{
    float *o = (float *)out->data + b * out->strides[0] + hk * out->strides[1];
    const int64_t os = out->strides[2], n = g->row;
    const float *first = heads + (b * g->Hq + hk * g->g) * n;
    const float den = (float)g->g;
    int64_t j;
    for (j = 0; j < n; j++) o[j * os] = kvc_group_sum_at(first, g->g, n, j) / den;
}

/* out[b, hk, :] <- 0 for every row and kv head (an op with no query). */
static inline void kvc_head_rows_zero(const struct kvc_view *out, int64_t B, int64_t Hkv, int64_t n)
{
    int64_t b, hk, j;
    for (b = 0; b < B; b++)
        for (hk = 0; hk < Hkv; hk++)
            for (j = 0; j < n; j++)
                ((float *)out->data)[b * out->strides[0] + hk * out->strides[1] + j * out->strides[2]] = 0.0f;
}

#endif /* KVC_HEAD_ROWS_H */
