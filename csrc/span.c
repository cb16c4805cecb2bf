/*
 * span.c - span_merge (CPU): one parallel unit per (batch, kv head), each
 * adding its span in ascending order into its own double accumulators, so
 * results are bit-identical for any thread count.
 */
#include <string.h>

#include "kvc_math.h"
#include "span.h"

static size_t sm_thread_bytes(const struct kvc_span_merge_params *p)
{
    return kvc_align_up((size_t)(p->keys.shape[3] + p->values.shape[3]) * sizeof(double));
}

size_t kvc_span_merge_scratch_bytes(const struct kvc_span_merge_params *p)
{
    const int nt = p->num_threads > 0 ? p->num_threads : 1;
    return KVC_ALIGN + (size_t)nt * sm_thread_bytes(p);
}

static inline int64_t sm_i64(const struct kvc_view *v, int64_t b, int64_t h)
{
    return ((const int64_t *)v->data)[b * v->strides[0] + h * v->strides[1]];
}

/* acc[0 .. n) += c * x[b, h, j, :] for every j of the span, then out = acc / W. */
static void sm_rows(const struct kvc_view *x, const struct kvc_view *counts, const struct kvc_view *out,
                    int64_t b, int64_t h, int64_t l, int64_t e, double W, double *acc)
{
    const int64_t n = x->shape[3];
    const int64_t base = b * x->strides[0] + h * x->strides[1];
    const int64_t obase = b * out->strides[0] + h * out->strides[1];
    int64_t j, d;
    for (d = 0; d < n; d++) acc[d] = 0.0;
    for (j = l; j < e; j++) {
        const double c = counts->data
                             ? (double)((const float *)counts->data)[b * counts->strides[0] + h * counts->strides[1] +
                                                                      j * counts->strides[2]]
                             : 1.0;
        const int64_t row = base + j * x->strides[2];
        for (d = 0; d < n; d++) acc[d] += c * (double)kvc_load_f32(x->data, x->dtype, row + d * x->strides[3]);
    }
    for (d = 0; d < n; d++)
        kvc_store_f32(out->data, out->dtype, obase + d * out->strides[2], W > 0.0 ? (float)(acc[d] / W) : 0.0f);
}

enum kvc_status kvc_span_merge(const struct kvc_span_merge_params *p)
{
    const int64_t B = p->keys.shape[0], H = p->keys.shape[1], T = p->keys.shape[2];
    const int nt = p->num_threads > 0 ? p->num_threads : 1;
    const size_t tb = sm_thread_bytes(p);
    char *base;
    int64_t u;
    if (B * H == 0) return KVC_OK;
    for (u = 0; u < B * H; u++) {
        const int64_t l = sm_i64(&p->lo, u / H, u % H), e = sm_i64(&p->hi, u / H, u % H);
        if (l < 0 || l > e || e > T) return KVC_ERR_INVALID;
    }
    if (p->scratch == NULL || p->scratch_bytes < kvc_span_merge_scratch_bytes(p)) return KVC_ERR_NOMEM;
    base = (char *)(((uintptr_t)p->scratch + (KVC_ALIGN - 1)) & ~(uintptr_t)(KVC_ALIGN - 1));
#pragma omp parallel num_threads(nt)
    {
        double *acc = (double *)(base + (size_t)KVC_THREAD_ID() * tb);
#pragma omp for schedule(dynamic, 1)
        for (u = 0; u < B * H; u++) {
            const int64_t b = u / H, h = u % H;
            const int64_t l = sm_i64(&p->lo, b, h), e = sm_i64(&p->hi, b, h);
            double W = 0.0;
            int64_t j;
            for (j = l; j < e; j++)
                W += p->counts.data ? (double)((const float *)p->counts.data)[b * p->counts.strides[0] +
                                                                               h * p->counts.strides[1] +
                                                                               j * p->counts.strides[2]]
                                    : 1.0;
            sm_rows(&p->keys, &p->counts, &p->out_keys, b, h, l, e, W, acc);
            sm_rows(&p->values, &p->counts, &p->out_values, b, h, l, e, W, acc + p->keys.shape[3]);
            ((float *)p->out_counts.data)[b * p->out_counts.strides[0] + h * p->out_counts.strides[1]] = (float)W;
        }
    }
    return KVC_OK;
}
