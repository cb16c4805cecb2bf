/*
 * keyformer.cu - Keyformer's noisy, tempered attention scores (keyformer.c)
 * on the GPU: a block per (b, query head) walks the chunk's queries in
 * order, its threads striding over the keys; the noise is the same
 * counter-based Gumbel sample as on the CPU (keyformer_math.h), so both
 * backends score with the same noise. A second kernel averages the query
 * heads of each kv head in head order.
 */
#include "common.cuh"
#include "head_rows.cuh"
#include "../keyformer_math.h"

static __global__ void __launch_bounds__(KVC_HEAD_THREADS)
kvc_keyformer_heads_kernel(const struct kvc_keyformer_scores_params p, float *heads, float *rows)
{
    extern __shared__ float qrow[];
    __shared__ float red[KVC_HEAD_THREADS];
    const int64_t Hq = p.q.shape[1], Tq = p.q.shape[2], D = p.q.shape[3];
    const int64_t Hkv = p.k.shape[1], Tk = p.k.shape[2];
    const int64_t u = blockIdx.x, b = u / Hq, h = u % Hq, hk = h / (Hq / Hkv);
    const int64_t s = p.kv_start ? p.kv_start[b * p.kv_start_stride] : 0;
    const int64_t p0 = Tk - Tq;
    const float inv_tau = 1.0f / p.tau;
    float *acc = heads + u * Tk, *row = rows + u * Tk;
    const int64_t qbase = kvc_at(p.q, b, h, 0, 0), kbase = kvc_at(p.k, b, hk, 0, 0);
    for (int64_t j = threadIdx.x; j < Tk; j += blockDim.x) acc[j] = 0.0f;
    for (int64_t i = 0; i < Tq; i++) {
        const int64_t n = p0 + i - s + 1; /* keys query i sees, from s */
        if (n <= 0) continue;
        __syncthreads();
        for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
            qrow[d] = kvc_load_f32(p.q.data, p.q.dtype, qbase + i * p.q.strides[2] + d * p.q.strides[3]);
        __syncthreads();
        float m = -INFINITY;
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
            const int64_t kj = kbase + (s + j) * p.k.strides[2];
            float dot = 0.0f;
            for (int64_t d = 0; d < D; d++) dot += qrow[d] * kvc_load_f32(p.k.data, p.k.dtype, kj + d * p.k.strides[3]);
            float z = p.scaling * dot;
            if (p.noise != 0.0f) {
                const uint64_t hv = kvc_keyformer_hash(p.seed, (uint64_t)p.layer, (uint64_t)h, (uint64_t)j,
                                                       (uint64_t)(n - 1), (uint64_t)p.step);
                z = z + p.noise * kvc_gumbel(hv);
            }
            z *= inv_tau;
            row[j] = z;
            m = fmaxf(m, z);
        }
        m = kvc_head_block_reduce(m, red, 1);
        float sum = 0.0f;
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
            const float e = kvc_expf(row[j] - m);
            row[j] = e;
            sum += e;
        }
        sum = kvc_head_block_reduce(sum, red, 0);
        const float inv = 1.0f / sum;
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) acc[s + j] += row[j] * inv;
    }
}

extern "C" size_t kvc_cuda_keyformer_scores_workspace(const struct kvc_keyformer_scores_params *p)
{
    const size_t n = (size_t)(p->q.shape[0] * p->q.shape[1] * p->k.shape[2]);
    return KVC_ALIGN + 2 * kvc_align_up(n * sizeof(float));
}

extern "C" enum kvc_status kvc_cuda_keyformer_scores(const struct kvc_keyformer_scores_params *p, void *stream)
{
    const int64_t B = p->q.shape[0], Hq = p->q.shape[1], Tq = p->q.shape[2], D = p->q.shape[3];
    const int64_t Hkv = p->k.shape[1], Tk = p->k.shape[2];
    if (!(p->tau > 0.0f) || !isfinite(p->tau) || !(p->noise >= 0.0f) || !isfinite(p->noise) || p->layer < 0 ||
        p->step < 0)
        return KVC_ERR_INVALID;
    if (B == 0 || Hkv == 0 || Tk == 0) return KVC_OK;
    /* no query attends anything: every score is 0, no workspace */
    if (Tq == 0) return kvc_head_rows_mean(NULL, p->out, B, Hq, Hkv, Tk, stream);
    if (p->scratch == NULL || p->scratch_bytes < kvc_cuda_keyformer_scores_workspace(p)) return KVC_ERR_NOMEM;
    if (B * Hq > INT32_MAX || (size_t)D * sizeof(float) > 48 * 1024) return KVC_ERR_UNSUPPORTED;
    char *cur = (char *)(((uintptr_t)p->scratch + (KVC_ALIGN - 1)) & ~(uintptr_t)(KVC_ALIGN - 1));
    const size_t n = (size_t)(B * Hq * Tk) * sizeof(float);
    float *heads = (float *)kvc_carve(&cur, n);
    float *rows = (float *)kvc_carve(&cur, n);
    kvc_keyformer_heads_kernel<<<(unsigned)(B * Hq), KVC_HEAD_THREADS, (size_t)D * sizeof(float),
                                 KVC_STREAM(stream)>>>(*p, heads, rows);
    KVC_CUDA_LAUNCHED();
    return kvc_head_rows_mean(heads, p->out, B, Hq, Hkv, Tk, stream);
}
