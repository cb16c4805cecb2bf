/*
 * head_rows.cuh - shared pieces of the kernels that write one float row per
 * (batch, query head), a block each (Keyformer, FastGen, ActQKV): the
 * block reduction, and the GQA reduction where each kv head's output is the
 * mean of its g head rows, added in head order as the CPU's
 * kvc_head_rows_mean does.
 */
#ifndef KVC_HEAD_ROWS_CUH
#define KVC_HEAD_ROWS_CUH

#include "common.cuh"

/* Threads of the per-head kernels (one block per (batch, query head)). */
#define KVC_HEAD_THREADS 256

/* Block-wide max (is_max) or sum of v over KVC_HEAD_THREADS threads,
 * returned to every thread; red holds KVC_HEAD_THREADS floats. */
static __device__ float kvc_head_block_reduce(float v, float *red, int is_max)
{
    const int t = threadIdx.x;
    red[t] = v;
    __syncthreads();
    for (int off = KVC_HEAD_THREADS / 2; off > 0; off /= 2) {
        if (t < off) red[t] = is_max ? fmaxf(red[t], red[t + off]) : red[t] + red[t + off];
        __syncthreads();
    }
    const float r = red[0];
    __syncthreads();
    return r;
}

/* out[b, hk, j] <- mean over i < g of heads[(b * Hq + hk * g + i) * n + j];
 * heads NULL: 0 (an op with no query). Grid-stride over B * Hkv * n. */
static __global__ void kvc_head_rows_mean_kernel(const float *heads, const struct kvc_view out, int64_t B, int64_t Hq,
                                                 int64_t Hkv, int64_t n)
{
    const int64_t g = Hq / Hkv, total = B * Hkv * n;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t b = e / (Hkv * n), hk = (e / n) % Hkv, j = e % n;
        float v = 0.0f;
        if (heads != NULL) {
            const float *first = heads + (b * Hq + hk * g) * n;
            v = first[j];
            for (int64_t h = 1; h < g; h++) v += first[h * n + j];
            v /= (float)g;
        }
        ((float *)out.data)[kvc_at(out, b, hk, j, 0)] = v;
    }
}

/* Launches the kernel on `stream` (B, Hkv, n > 0). */
static inline enum kvc_status kvc_head_rows_mean(const float *heads, const struct kvc_view &out, int64_t B,
                                                 int64_t Hq, int64_t Hkv, int64_t n, void *stream)
{
    int64_t blocks = kvc_ceil_div(B * Hkv * n, 256);
    if (blocks > 65536) blocks = 65536; /* grid-stride beyond */
    kvc_head_rows_mean_kernel<<<(unsigned)blocks, 256, 0, KVC_STREAM(stream)>>>(heads, out, B, Hq, Hkv, n);
    KVC_CUDA_LAUNCHED();
    return KVC_OK;
}

#endif /* KVC_HEAD_ROWS_CUH */
