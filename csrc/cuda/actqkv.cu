/*
 * actqkv.cu - ActQKV scores (actqkv.c) on the GPU: a block per (b, query
 * head). Thread 0 builds the probe with the same kvc_actqkv_probe as the CPU
 * (a window of a few dozen queries: sequential work, and the weights come
 * out in the CPU's summation order); the block's threads then stride over
 * the keys for the logits and the softmax. A second kernel averages the
 * query heads of each kv head in head order.
 */
#include "common.cuh"
#include "head_rows.cuh"
#include "../actqkv_math.h"

/* Per-block workspace floats: window queries [W, D], mu/var/probe [3D], w [W]. */
static __host__ __device__ int64_t kvc_aq_block_floats(int64_t W, int64_t D) { return W * D + 3 * D + W; }

static __global__ void __launch_bounds__(KVC_HEAD_THREADS)
kvc_actqkv_heads_kernel(const struct kvc_actqkv_scores_params p, float *heads, float *work)
{
    __shared__ float red[KVC_HEAD_THREADS];
    const int64_t Hq = p.q.shape[1], W = p.q.shape[2], D = p.q.shape[3];
    const int64_t Hkv = p.k.shape[1], Tk = p.k.shape[2];
    const int64_t u = blockIdx.x, b = u / Hq, h = u % Hq, hk = h / (Hq / Hkv);
    const int64_t s = p.kv_start ? p.kv_start[b * p.kv_start_stride] : 0;
    const int64_t p0 = Tk - W;
    const int64_t i0 = s - p0 > 0 ? (s - p0 < W ? s - p0 : W) : 0;
    const int64_t m = W - i0, n = Tk - s;
    float *row = heads + u * Tk;
    float *qbuf = work + u * kvc_aq_block_floats(W, D);
    float *mu = qbuf + W * D, *var = mu + D, *probe = var + D, *w = probe + D;
    const int64_t qbase = kvc_at(p.q, b, h, 0, 0), kbase = kvc_at(p.k, b, hk, 0, 0);
    for (int64_t j = threadIdx.x; j < Tk; j += blockDim.x) row[j] = 0.0f;
    for (int64_t i = threadIdx.x; i < i0; i += blockDim.x)
        ((float *)p.weights.data)[kvc_at(p.weights, b, h, i, 0)] = 0.0f;
    if (m <= 0 || n <= 0) return; /* the whole block: before any barrier */
    for (int64_t e = threadIdx.x; e < m * D; e += blockDim.x) {
        const int64_t i = e / D, d = e % D;
        qbuf[e] = kvc_load_f32(p.q.data, p.q.dtype, qbase + (i0 + i) * p.q.strides[2] + d * p.q.strides[3]);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        kvc_actqkv_probe(qbuf, m, D, mu, var, w, probe);
        for (int64_t i = 0; i < m; i++) ((float *)p.weights.data)[kvc_at(p.weights, b, h, i0 + i, 0)] = w[i];
    }
    __syncthreads();
    float mx = -INFINITY;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        const int64_t kj = kbase + (s + j) * p.k.strides[2];
        float dot = 0.0f;
        for (int64_t d = 0; d < D; d++) dot += probe[d] * kvc_load_f32(p.k.data, p.k.dtype, kj + d * p.k.strides[3]);
        const float z = p.scaling * dot;
        row[s + j] = z;
        mx = fmaxf(mx, z);
    }
    mx = kvc_head_block_reduce(mx, red, 1);
    float sum = 0.0f;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        const float e = kvc_expf(row[s + j] - mx);
        row[s + j] = e;
        sum += e;
    }
    sum = kvc_head_block_reduce(sum, red, 0);
    const float inv = 1.0f / sum;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) row[s + j] *= inv;
}

extern "C" size_t kvc_cuda_actqkv_scores_workspace(const struct kvc_actqkv_scores_params *p)
{
    const int64_t B = p->q.shape[0], Hq = p->q.shape[1], W = p->q.shape[2], D = p->q.shape[3];
    const size_t heads = (size_t)(B * Hq * p->k.shape[2]) * sizeof(float);
    const size_t work = (size_t)(B * Hq * kvc_aq_block_floats(W, D)) * sizeof(float);
    return KVC_ALIGN + kvc_align_up(heads) + kvc_align_up(work);
}

extern "C" enum kvc_status kvc_cuda_actqkv_scores(const struct kvc_actqkv_scores_params *p, void *stream)
{
    const int64_t B = p->q.shape[0], Hq = p->q.shape[1], W = p->q.shape[2], D = p->q.shape[3];
    const int64_t Hkv = p->k.shape[1], Tk = p->k.shape[2];
    if (D < 1 || W > Tk) return KVC_ERR_INVALID;
    if (B == 0 || Hq == 0 || Hkv == 0 || Tk == 0) return KVC_OK;
    /* no query attends anything: every score is 0, no workspace */
    if (W == 0) return kvc_head_rows_mean(NULL, p->out, B, Hq, Hkv, Tk, stream);
    if (p->scratch == NULL || p->scratch_bytes < kvc_cuda_actqkv_scores_workspace(p)) return KVC_ERR_NOMEM;
    if (B * Hq > INT32_MAX) return KVC_ERR_UNSUPPORTED;
    char *cur = (char *)(((uintptr_t)p->scratch + (KVC_ALIGN - 1)) & ~(uintptr_t)(KVC_ALIGN - 1));
    float *heads = (float *)kvc_carve(&cur, (size_t)(B * Hq * Tk) * sizeof(float));
    float *work = (float *)kvc_carve(&cur, (size_t)(B * Hq * kvc_aq_block_floats(W, D)) * sizeof(float));
    kvc_actqkv_heads_kernel<<<(unsigned)(B * Hq), KVC_HEAD_THREADS, 0, KVC_STREAM(stream)>>>(*p, heads, work);
    KVC_CUDA_LAUNCHED();
    return kvc_head_rows_mean(heads, p->out, B, Hq, Hkv, Tk, stream);
}
