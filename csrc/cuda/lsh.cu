/*
 * lsh.cu - SimHash codes and MagicPIG's LSH-sampled attention (lsh.c) on
 * the GPU: a thread per (b, head), the CPU's per-element math and summation
 * order (kvc_dot_f32's lanes, the same online softmax), so both backends
 * sample the same slots.
 */
#include "common.cuh"
#include "../lsh_math.h"

#define KVC_LSH_THREADS 64
#define KVC_LSH_MAX_D 256

static __global__ void __launch_bounds__(KVC_LSH_THREADS) kvc_simhash_kernel(const struct kvc_simhash_params p)
{
    const int64_t H = p.x.shape[1], n = p.x.shape[2], D = p.x.shape[3];
    const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= p.x.shape[0] * H) return;
    const int64_t b = r / H, h = r % H, hk = h / p.group;
    const int64_t es = p.x.dtype == KVC_F32 ? 4 : 2;
    const float *planes = (const float *)p.planes.data + hk * p.planes.strides[0];
    const float *c = p.center.data ? (const float *)p.center.data + b * p.center.strides[0] + hk * p.center.strides[1]
                                   : NULL;
    float row[KVC_LSH_MAX_D], plane[KVC_LSH_MAX_D];
    for (int64_t j = 0; j < n; j++) {
        const char *src = (const char *)p.x.data + (b * p.x.strides[0] + h * p.x.strides[1] + j * p.x.strides[2]) * es;
        for (int64_t d = 0; d < D; d++) {
            row[d] = kvc_load_f32(src, p.x.dtype, d * p.x.strides[3]);
            if (c) row[d] = __fsub_rn(row[d], c[d * p.center.strides[2]]);
        }
        for (int64_t t = 0; t < p.L; t++) {
            int32_t code = 0;
            for (int64_t k = 0; k < p.K; k++) {
                const float *w = planes + (t * p.K + k) * p.planes.strides[1];
                for (int64_t d = 0; d < D; d++) plane[d] = w[d * p.planes.strides[2]];
                if (kvc_dot_f32(plane, row, D) > 0.0f) code |= (int32_t)1 << k;
            }
            ((int32_t *)p.codes.data)[kvc_at(p.codes, b, h, j, t)] = code;
        }
    }
}

extern "C" enum kvc_status kvc_cuda_simhash(const struct kvc_simhash_params *p, void *stream)
{
    const int64_t items = p->x.shape[0] * p->x.shape[1];
    if (p->K < 1 || p->K > 30 || p->L < 1 || p->group < 1 || p->x.shape[1] % p->group != 0) return KVC_ERR_INVALID;
    if (items * p->x.shape[2] == 0) return KVC_OK;
    if (p->x.shape[3] > KVC_LSH_MAX_D) return KVC_ERR_UNSUPPORTED;
    const int64_t blocks = (items + KVC_LSH_THREADS - 1) / KVC_LSH_THREADS;
    kvc_simhash_kernel<<<(unsigned)blocks, KVC_LSH_THREADS, 0, KVC_STREAM(stream)>>>(*p);
    KVC_CUDA_LAUNCHED();
    return KVC_OK;
}

static __global__ void __launch_bounds__(KVC_LSH_THREADS)
kvc_lsh_attention_kernel(const struct kvc_lsh_attention_params p)
{
    const int64_t Hq = p.q.shape[1], H = kvc_lsh_kv_heads(&p), D = p.q.shape[3];
    const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= p.q.shape[0] * Hq) return;
    const int64_t b = r / Hq, hq = r % Hq, h = hq / (Hq / H);
    const int64_t es = p.q.dtype == KVC_F32 ? 4 : 2;
    struct kvc_lsh_head hd;
    kvc_lsh_head_get(&p, b, h, &hd);
    const int64_t n = hd.n, s0 = hd.s0;
    const int32_t *qc = (const int32_t *)p.qcodes.data + b * p.qcodes.strides[0] + hq * p.qcodes.strides[1];
    const float *c = p.center.data ? (const float *)p.center.data + b * p.center.strides[0] + h * p.center.strides[1]
                                   : NULL;
    float qr[KVC_LSH_MAX_D], kr[KVC_LSH_MAX_D], acc[KVC_LSH_MAX_D];
    double qn = 0.0;
    const char *qs = (const char *)p.q.data + (b * p.q.strides[0] + hq * p.q.strides[1]) * es;
    for (int64_t d = 0; d < D; d++) {
        qr[d] = kvc_load_f32(qs, p.q.dtype, d * p.q.strides[3]);
        qn += (double)qr[d] * qr[d];
        acc[d] = 0.0f;
    }
    qn = sqrt(qn);
    float m = -INFINITY, sum = 0.0f;
    int64_t nread = 0;
    for (int64_t j = s0; j < n; j++) {
        const bool stat = j < s0 + p.sinks || j >= n - p.window;
        const char *ks = (const char *)p.k.data + (hd.k + j * hd.ks) * es;
        double logp = 0.0;
        if (!stat) {
            const int32_t *kc = (const int32_t *)p.codes.data + hd.codes + j * hd.cs;
            int32_t hits = 0;
            for (int64_t t = 0; t < p.L; t++) hits += kc[t * hd.ct] == qc[t * p.qcodes.strides[3]];
            if (hits < p.hits) continue;
        }
        for (int64_t d = 0; d < D; d++) kr[d] = kvc_load_f32(ks, p.k.dtype, d * hd.kd);
        if (!stat) {
            double dot = 0.0, kn = 0.0;
            for (int64_t d = 0; d < D; d++) {
                const double y = (double)kr[d] - (c ? c[d * p.center.strides[2]] : 0.0f);
                dot = __fma_rn((double)qr[d], y, dot);
                kn = __fma_rn(y, y, kn);
            }
            logp = kvc_lsh_log_inclusion(qn > 0 && kn > 0 ? dot / (qn * sqrt(kn)) : 0.0, p.K, p.L, p.hits);
        }
        /* log p_j - log c_j as on the CPU (lsh.c): without counts exactly
         * (float)log p_j */
        float bias = (float)logp;
        if (p.counts.data) bias = __fsub_rn(bias, kvc_lsh_log_count(&p, &hd, j));
        const float x = __fsub_rn(__fmul_rn(kvc_dot_f32(qr, kr, D), p.scaling), bias);
        nread++;
        const char *vs = (const char *)p.v.data + (hd.v + j * hd.vs) * es;
        if (x > m) {
            const float rs = m == -INFINITY ? 0.0f : kvc_expf(m - x);
            for (int64_t d = 0; d < D; d++) acc[d] *= rs;
            sum *= rs;
            m = x;
        }
        const float f = kvc_expf(x - m);
        sum += f;
        for (int64_t d = 0; d < D; d++) acc[d] = __fmaf_rn(f, kvc_load_f32(vs, p.v.dtype, d * hd.vd), acc[d]);
    }
    char *out = (char *)p.out.data + (b * p.out.strides[0] + hq * p.out.strides[2]) * es;
    for (int64_t d = 0; d < D; d++) kvc_store_f32(out, p.out.dtype, d * p.out.strides[3], sum > 0.0f ? acc[d] / sum : 0.0f);
    if (p.lse.data)
        ((float *)p.lse.data)[b * p.lse.strides[0] + hq * p.lse.strides[1]] = sum > 0.0f ? m + kvc_logf(sum) : -INFINITY;
    if (p.reads.data) ((int32_t *)p.reads.data)[b * p.reads.strides[0] + hq * p.reads.strides[1]] = (int32_t)nread;
}

extern "C" enum kvc_status kvc_cuda_lsh_attention(const struct kvc_lsh_attention_params *p, void *stream)
{
    const int64_t items = p->q.shape[0] * p->q.shape[1], H = kvc_lsh_kv_heads(p);
    const bool layout_ok = p->layout == KVC_KV_RAGGED
                               ? p->offsets != NULL && p->lengths != NULL && p->kv_start == NULL
                               : p->layout == KVC_KV_UNIFORM;
    if (!layout_ok || H <= 0 || p->q.shape[1] % H != 0 || p->K < 1 || p->K > 30 || p->L < 1 || p->hits < 1 ||
        p->sinks < 0 || p->window < 0)
        return KVC_ERR_INVALID;
    if (items == 0) return KVC_OK;
    if (p->q.shape[3] > KVC_LSH_MAX_D) return KVC_ERR_UNSUPPORTED;
    const int64_t blocks = (items + KVC_LSH_THREADS - 1) / KVC_LSH_THREADS;
    kvc_lsh_attention_kernel<<<(unsigned)blocks, KVC_LSH_THREADS, 0, KVC_STREAM(stream)>>>(*p);
    KVC_CUDA_LAUNCHED();
    return KVC_OK;
}
