/*
 * lagkv.c - LagKV token scores (CPU); the contract is in lagkv.h.
 *
 * One (batch, head) row is one sequential unit: chunks are scored in order,
 * and the output slots of chunk c + 1 hold chunk c's temporaries (its value
 * deviations, then its ranks) until chunk c + 1 itself is scored. Results
 * are therefore bit-identical for any thread count.
 */
#include <math.h>

#include "kvc_math.h"
#include "lagkv.h"

static size_t lag_thread_bytes(const struct kvc_lagkv_scores_params *p)
{
    return kvc_align_up((size_t)(2 * (p->k.shape[3] + p->v.shape[3])) * sizeof(float));
}

size_t kvc_lagkv_scores_scratch_bytes(const struct kvc_lagkv_scores_params *p)
{
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    return KVC_ALIGN + (size_t)nt * lag_thread_bytes(p);
}

/* lo/hi[0 .. D) <- per-channel min/max of x's tokens [r0, r0 + lag) (NaN
 * elements do not move a bound). */
KVC_INLINE void lag_bounds(const struct kvc_view *x, int64_t b, int64_t h, int64_t r0, int64_t lag,
                           float *lo, float *hi)
{
    const int64_t D = x->shape[3];
    const int64_t base = b * x->strides[0] + h * x->strides[1];
    int64_t t, d;
    for (d = 0; d < D; d++) lo[d] = hi[d] = kvc_load_f32(x->data, x->dtype, base + r0 * x->strides[2] + d * x->strides[3]);
    for (t = r0 + 1; t < r0 + lag; t++)
        for (d = 0; d < D; d++) {
            const float v = kvc_load_f32(x->data, x->dtype, base + t * x->strides[2] + d * x->strides[3]);
            lo[d] = v < lo[d] ? v : lo[d];
            hi[d] = v > hi[d] ? v : hi[d];
        }
}

/* max and sum of exp(x - max) over x[0 .. n) (stride st), in index order. */
KVC_INLINE void lag_softmax_stats(const float *x, int64_t st, int64_t n, float *m, float *z)
{
    float mx = -INFINITY, s = 0.0f;
    int64_t i;
    for (i = 0; i < n; i++) mx = x[i * st] > mx ? x[i * st] : mx;
    for (i = 0; i < n; i++) s += kvc_expf(x[i * st] - mx);
    *m = mx;
    *z = s;
}

/* Scored chunk c of M, tokens [j0, j0 + lag); o is the (b, h) output row. */
KVC_INLINE void lag_chunk(const struct kvc_lagkv_scores_params *p, int64_t b, int64_t h, int64_t j0,
                      int64_t c, int64_t M, float *o, int64_t os, float *scratch)
{
    const int64_t lag = p->lag, D = p->k.shape[3], Dv = p->v.shape[3];
    const int64_t kb = b * p->k.strides[0] + h * p->k.strides[1];
    const int64_t vb = b * p->v.strides[0] + h * p->v.strides[1];
    float *loK = scratch, *hiK = loK + D, *loV = hiK + D, *hiV = loV + Dv;
    float *tmp = o + (j0 + lag) * os; /* the next chunk's slots */
    float mK, zK, mV, zV;
    int64_t i, i2;
    lag_bounds(&p->k, b, h, j0 + lag, lag, loK, hiK);
    lag_bounds(&p->v, b, h, j0 + lag, lag, loV, hiV);
    for (i = 0; i < lag; i++) {
        const int64_t j = j0 + i;
        o[j * os] = kvc_lag_std(p->k.data, p->k.dtype, kb + j * p->k.strides[2], p->k.strides[3], loK, hiK, D);
        tmp[i * os] = kvc_lag_std(p->v.data, p->v.dtype, vb + j * p->v.strides[2], p->v.strides[3], loV, hiV, Dv);
    }
    lag_softmax_stats(o + j0 * os, os, lag, &mK, &zK);
    lag_softmax_stats(tmp, os, lag, &mV, &zV);
    for (i = 0; i < lag; i++) {
        float *x = o + (j0 + i) * os;
        *x = kvc_expf(*x - mK) / zK + kvc_expf(tmp[i * os] - mV) / zV;
    }
    if (p->mode != KVC_LAGKV_RANK) return;
    for (i = 0; i < lag; i++) {
        const float s = o[(j0 + i) * os];
        int64_t r = 0;
        for (i2 = 0; i2 < lag; i2++) {
            const float s2 = o[(j0 + i2) * os];
            r += s2 > s || (s2 == s && i2 < i);
        }
        tmp[i * os] = (float)r;
    }
    for (i = 0; i < lag; i++) {
        float *x = o + (j0 + i) * os;
        *x = kvc_lag_priority(*x, (int64_t)tmp[i * os], c, M);
    }
}

static void KVC_HOT lag_unit(const struct kvc_lagkv_scores_params *p, int64_t b, int64_t h, float *scratch)
{
    const int64_t T = p->out.shape[2], lag = p->lag;
    const int64_t s = p->kv_start ? p->kv_start[b * p->kv_start_stride] : 0;
    const int64_t c0 = p->sinks < T - s ? s + p->sinks : T;
    const int64_t m = (T - c0) / lag;
    const int64_t M = m >= 2 ? m - 1 : 0;
    const int64_t te = c0 + M * lag; /* the tail: [te, T) */
    const int64_t os = p->out.strides[2];
    float *o = (float *)p->out.data + b * p->out.strides[0] + h * p->out.strides[1];
    int64_t j, c;
    for (j = 0; j < s; j++) o[j * os] = -INFINITY;
    for (; j < c0; j++) o[j * os] = INFINITY;
    for (c = 0; c < M; c++) lag_chunk(p, b, h, c0 + c * lag, c, M, o, os, scratch);
    for (j = te; j < T; j++) o[j * os] = INFINITY;
}

enum kvc_status kvc_lagkv_scores(const struct kvc_lagkv_scores_params *p)
{
    const int64_t B = p->out.shape[0], H = p->out.shape[1];
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    char *base;
    size_t tb;
    int64_t u;
    if (p->lag < 1 || p->sinks < 0 || p->k.shape[3] < 2 || p->v.shape[3] < 2) return KVC_ERR_INVALID;
    if (B * H == 0 || p->out.shape[2] == 0) return KVC_OK;
    if (p->scratch == NULL || p->scratch_bytes < kvc_lagkv_scores_scratch_bytes(p)) return KVC_ERR_NOMEM;
    base = (char *)(((uintptr_t)p->scratch + (KVC_ALIGN - 1)) & ~(uintptr_t)(KVC_ALIGN - 1));
    tb = lag_thread_bytes(p);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (u = 0; u < B * H; u++) lag_unit(p, u / H, u % H, (float *)(base + (size_t)KVC_THREAD_ID() * tb));
    return KVC_OK;
}
