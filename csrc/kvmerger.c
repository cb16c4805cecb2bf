/*
 * kvmerger.c - KVMerger's merging sets and Gaussian-kernel merge (CPU): one
 * parallel unit per (batch, kv head), each summing in ascending slot order,
 * so results are bit-identical for any thread count.
 */
#include <math.h>
#include <string.h>

#include "kvmerger.h"
#include "kvmerger_math.h"

static inline int64_t kvm_start(const int64_t *ks, int64_t stride, int64_t b)
{
    return ks ? ks[b * stride] : 0;
}

enum kvc_status kvc_kvmerger_sets(const struct kvc_kvmerger_sets_params *p)
{
    const int64_t B = p->keys.shape[0], H = p->keys.shape[1], T = p->keys.shape[2], D = p->keys.shape[3];
    const int nt = p->num_threads > 0 ? p->num_threads : 1;
    int64_t u;
    if (p->sinks < 0 || p->window < 0) return KVC_ERR_INVALID;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (u = 0; u < B * H; u++) {
        const int64_t b = u / H, h = u % H;
        const struct kvc_view *k = &p->keys;
        float *sims = (float *)p->sims.data + b * p->sims.strides[0] + h * p->sims.strides[1];
        int64_t *runs = (int64_t *)p->runs.data + b * p->runs.strides[0] + h * p->runs.strides[1];
        const int64_t ss = p->sims.strides[2], rs = p->runs.strides[2];
        const int64_t base = b * k->strides[0] + h * k->strides[1];
        int64_t lo, hi, j;
        kvc_kvm_range(kvm_start(p->kv_start, p->kv_start_stride, b), p->sinks, p->window, T, &lo, &hi);
        for (j = 0; j < T; j++) {
            float c = NAN;
            int64_t r = -1;
            if (j >= lo && j < hi) {
                r = j;
                if (j > lo) {
                    c = kvc_kvm_cos(k->data, k->dtype, base + (j - 1) * k->strides[2], base + j * k->strides[2],
                                    k->strides[3], D);
                    if (c > p->threshold) r = runs[(j - 1) * rs];
                }
            }
            sims[j * ss] = c;
            runs[j * rs] = r;
        }
    }
    return KVC_OK;
}

static size_t gm_thread_bytes(const struct kvc_gauss_merge_params *p)
{
    return kvc_align_up((size_t)(p->keys.shape[3] + p->values.shape[3]) * sizeof(float));
}

size_t kvc_gauss_merge_scratch_bytes(const struct kvc_gauss_merge_params *p)
{
    const int nt = p->num_threads > 0 ? p->num_threads : 1;
    return KVC_ALIGN + (size_t)nt * gm_thread_bytes(p);
}

/* Row t of x[b, h] into out[b, h, i], as stored (no rounding). */
static void gm_copy(const struct kvc_view *x, const struct kvc_view *out, int64_t b, int64_t h, int64_t t, int64_t i)
{
    const int64_t n = x->shape[3];
    const int64_t src = b * x->strides[0] + h * x->strides[1] + t * x->strides[2];
    const int64_t dst = b * out->strides[0] + h * out->strides[1] + i * out->strides[2];
    int64_t d;
    for (d = 0; d < n; d++)
        kvc_store_f32(out->data, out->dtype, dst + d * out->strides[3],
                      kvc_load_f32(x->data, x->dtype, src + d * x->strides[3]));
}

/* acc[0 .. n) += w * x[b, h, t, :] */
static void gm_add(const struct kvc_view *x, int64_t b, int64_t h, int64_t t, float w, float *acc)
{
    const int64_t n = x->shape[3];
    const int64_t src = b * x->strides[0] + h * x->strides[1] + t * x->strides[2];
    int64_t d;
    for (d = 0; d < n; d++) acc[d] += w * kvc_load_f32(x->data, x->dtype, src + d * x->strides[3]);
}

static void gm_store(const struct kvc_view *out, int64_t b, int64_t h, int64_t i, const float *acc, float W)
{
    const int64_t n = out->shape[3];
    const int64_t dst = b * out->strides[0] + h * out->strides[1] + i * out->strides[2];
    int64_t d;
    for (d = 0; d < n; d++) kvc_store_f32(out->data, out->dtype, dst + d * out->strides[3], acc[d] / W);
}

static void gm_zero(const struct kvc_view *out, int64_t b, int64_t h, int64_t i)
{
    const int64_t n = out->shape[3];
    const int64_t dst = b * out->strides[0] + h * out->strides[1] + i * out->strides[2];
    int64_t d;
    for (d = 0; d < n; d++) kvc_store_f32(out->data, out->dtype, dst + d * out->strides[3], 0.0f);
}

/* Output row i from center j = c[i] alone: a bit-for-bit copy. */
static void gm_keep(const struct kvc_gauss_merge_params *p, int64_t b, int64_t h, int64_t i, int64_t j, float cj)
{
    gm_copy(&p->keys, &p->out_keys, b, h, j, i);
    gm_copy(&p->values, &p->out_values, b, h, j, i);
    ((float *)p->out_counts.data)[b * p->out_counts.strides[0] + h * p->out_counts.strides[1] +
                                  i * p->out_counts.strides[2]] = cj;
}

static void gm_head(const struct kvc_gauss_merge_params *p, int64_t b, int64_t h, float *acc)
{
    const int64_t T = p->keys.shape[2], C = p->centers.shape[2], D = p->keys.shape[3];
    const struct kvc_view *k = &p->keys;
    const int64_t *c = (const int64_t *)p->centers.data + b * p->centers.strides[0] + h * p->centers.strides[1];
    const int64_t cst = p->centers.strides[2];
    const int64_t *runs = (const int64_t *)p->runs.data + b * p->runs.strides[0] + h * p->runs.strides[1];
    const int64_t rst = p->runs.strides[2];
    const float *sc = (const float *)p->scores.data + b * p->scores.strides[0] + h * p->scores.strides[1];
    const int64_t sst = p->scores.strides[2];
    const float *cnt = p->counts.data ? (const float *)p->counts.data + b * p->counts.strides[0] +
                                            h * p->counts.strides[1]
                                      : NULL;
    const int64_t cnst = p->counts.strides[2];
    float *oc = (float *)p->out_counts.data + b * p->out_counts.strides[0] + h * p->out_counts.strides[1];
    const int64_t ocs = p->out_counts.strides[2];
    const int64_t kb = b * k->strides[0] + h * k->strides[1];
    const float inv = 1.0f / (2.0f * p->sigma * p->sigma);
    const int64_t n = kvc_kvm_ncenters(c, cst, C);
    int64_t i, i1, t;
    /* the centers of one set are consecutive in the list: one group at a time */
    for (i = 0; i < n; i = i1 + 1) {
        const int64_t r = runs[c[i * cst] * rst];
        int64_t piv, q;
        i1 = i;
        if (r >= 0)
            while (i1 + 1 < n && runs[c[(i1 + 1) * cst] * rst] == r) i1++;
        piv = r >= 0 ? kvc_kvm_pivot(c, cst, n, i, runs, rst, sc, sst) : i;
        for (q = i; q <= i1; q++) {
            const int64_t j = c[q * cst];
            const float cj = cnt ? cnt[j * cnst] : 1.0f;
            float W = cj, total = cj;
            int merged = 0;
            if (q != piv || r < 0) {
                gm_keep(p, b, h, q, j, cj);
                continue;
            }
            memset(acc, 0, (size_t)(D + p->values.shape[3]) * sizeof(float));
            /* ascending slot order, the pivot's own term at its place */
            for (t = r; t < T && runs[t * rst] == r; t++) {
                float w = cj;
                if (t != j) {
                    if (kvc_kvm_find(c + i * cst, cst, i1 - i + 1, t) >= 0) continue; /* a kept slot stays */
                    w = kvc_kvm_weight(cnt ? cnt[t * cnst] : 1.0f,
                                       kvc_kvm_sqdist(k->data, k->dtype, kb + j * k->strides[2],
                                                      kb + t * k->strides[2], k->strides[3], D),
                                       inv);
                    total += cnt ? cnt[t * cnst] : 1.0f;
                    W += w;
                    merged = 1;
                }
                gm_add(&p->keys, b, h, t, w, acc);
                gm_add(&p->values, b, h, t, w, acc + D);
            }
            if (!merged) {
                gm_keep(p, b, h, q, j, cj);
                continue;
            }
            gm_store(&p->out_keys, b, h, q, acc, W);
            gm_store(&p->out_values, b, h, q, acc + D, W);
            oc[q * ocs] = total;
        }
    }
    for (i = n; i < C; i++) {
        gm_zero(&p->out_keys, b, h, i);
        gm_zero(&p->out_values, b, h, i);
        oc[i * ocs] = 0.0f;
    }
    if (p->assign.data) {
        int64_t *as = (int64_t *)p->assign.data + b * p->assign.strides[0] + h * p->assign.strides[1];
        const int64_t ast = p->assign.strides[2];
        const int64_t s = kvm_start(p->kv_start, p->kv_start_stride, b);
        int64_t last_r = -1, last_a = 0, next = 0; /* next: first center at or after t */
        for (t = 0; t < T; t++) {
            const int64_t r = runs[t * rst];
            int64_t a = 0;
            while (next < n && c[next * cst] < t) next++;
            if (t < s) {
                a = -1;
            } else if (next < n && c[next * cst] == t) {
                a = next + 1;
            } else if (r >= 0) {
                if (r != last_r) {
                    /* the set's first center, if any: the first at or after its start */
                    int64_t l = 0, e = n;
                    while (l < e) {
                        const int64_t m = l + (e - l) / 2;
                        if (c[m * cst] < r) l = m + 1;
                        else e = m;
                    }
                    last_a = l < n && runs[c[l * cst] * rst] == r ? kvc_kvm_pivot(c, cst, n, l, runs, rst, sc, sst) + 1
                                                                  : 0;
                    last_r = r;
                }
                a = last_a;
            }
            as[t * ast] = a;
        }
    }
}

enum kvc_status kvc_gauss_merge(const struct kvc_gauss_merge_params *p)
{
    const int64_t B = p->keys.shape[0], H = p->keys.shape[1];
    const int nt = p->num_threads > 0 ? p->num_threads : 1;
    const size_t tb = gm_thread_bytes(p);
    char *base;
    int64_t u;
    if (B * H == 0) return KVC_OK;
    if (!(p->sigma > 0.0f)) return KVC_ERR_INVALID;
    if (p->scratch == NULL || p->scratch_bytes < kvc_gauss_merge_scratch_bytes(p)) return KVC_ERR_NOMEM;
    base = (char *)(((uintptr_t)p->scratch + (KVC_ALIGN - 1)) & ~(uintptr_t)(KVC_ALIGN - 1));
#pragma omp parallel num_threads(nt)
    {
        float *acc = (float *)(base + (size_t)KVC_THREAD_ID() * tb);
#pragma omp for schedule(dynamic, 1)
        for (u = 0; u < B * H; u++) gm_head(p, u / H, u % H, acc);
    }
    return KVC_OK;
}
