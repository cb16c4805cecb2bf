/*
 * lagkv.cu - LagKV token scores (lagkv.c) on the GPU.
 *
 * One block per (row, head, scored chunk): threads split the channels for
 * the reference chunk's bounds and the tokens for their deviations; thread 0
 * takes the chunk's softmax statistics in index order, as the CPU does.
 * Chunks run in parallel, so the temporaries that lagkv.c keeps in the next
 * chunk's output slots live in a [B, H, T] float workspace here. A second
 * kernel writes the padding (-inf), sink and tail (+inf) slots.
 */
#include "common.cuh"

#define KVC_LAG_THREADS 128

/* The row's first chunk token c0 and its number of scored chunks M. */
__device__ __forceinline__ void kvc_lag_layout(const struct kvc_lagkv_scores_params &p, int64_t b, int64_t *s,
                                               int64_t *c0, int64_t *M)
{
    const int64_t T = p.out.shape[2];
    int64_t m;
    *s = p.kv_start ? p.kv_start[b * p.kv_start_stride] : 0;
    *c0 = p.sinks < T - *s ? *s + p.sinks : T;
    m = (T - *c0) / p.lag;
    *M = m >= 2 ? m - 1 : 0;
}

static __global__ void kvc_lag_fill_kernel(const struct kvc_lagkv_scores_params p, int64_t n)
{
    const int64_t H = p.out.shape[1], T = p.out.shape[2];
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t b = e / (H * T), h = (e / T) % H, j = e % T;
        int64_t s, c0, M;
        float *o = (float *)p.out.data + kvc_at(p.out, b, h, j, 0);
        kvc_lag_layout(p, b, &s, &c0, &M);
        if (j < s) *o = -INFINITY;
        else if (j < c0 || j >= c0 + M * p.lag) *o = INFINITY;
    }
}

static __device__ void kvc_lag_bounds(const struct kvc_view &x, int64_t b, int64_t h, int64_t r0, int64_t lag,
                                      float *lo, float *hi)
{
    const int64_t D = x.shape[3];
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        const int64_t base = kvc_at(x, b, h, r0, d);
        float l = kvc_load_f32(x.data, x.dtype, base), u = l;
        for (int64_t t = 1; t < lag; t++) {
            const float v = kvc_load_f32(x.data, x.dtype, base + t * x.strides[2]);
            l = v < l ? v : l;
            u = v > u ? v : u;
        }
        lo[d] = l;
        hi[d] = u;
    }
}

static __device__ void kvc_lag_stats(const float *x, int64_t st, int64_t n, float *m, float *z)
{
    float mx = -INFINITY, s = 0.0f;
    for (int64_t i = 0; i < n; i++) mx = x[i * st] > mx ? x[i * st] : mx;
    for (int64_t i = 0; i < n; i++) s += kvc_expf(x[i * st] - mx);
    *m = mx;
    *z = s;
}

static __global__ void __launch_bounds__(KVC_LAG_THREADS)
kvc_lag_chunk_kernel(const struct kvc_lagkv_scores_params p, float *work, int64_t mmax)
{
    extern __shared__ float sh[];
    __shared__ float stats[4];
    const int64_t H = p.out.shape[1], T = p.out.shape[2], lag = p.lag;
    const int64_t D = p.k.shape[3], Dv = p.v.shape[3];
    const int64_t u = blockIdx.x / mmax, c = blockIdx.x % mmax, b = u / H, h = u % H;
    const int64_t os = p.out.strides[2];
    float *loK = sh, *hiK = loK + D, *loV = hiK + D, *hiV = loV + Dv;
    float *o = (float *)p.out.data + kvc_at(p.out, b, h, 0, 0);
    float *w = work + u * T; /* contiguous [T] */
    int64_t s, c0, M, j0;
    kvc_lag_layout(p, b, &s, &c0, &M);
    if (c >= M) return; /* the whole block: before any barrier */
    j0 = c0 + c * lag;
    kvc_lag_bounds(p.k, b, h, j0 + lag, lag, loK, hiK);
    kvc_lag_bounds(p.v, b, h, j0 + lag, lag, loV, hiV);
    __syncthreads();
    for (int64_t i = threadIdx.x; i < lag; i += blockDim.x) {
        const int64_t j = j0 + i;
        o[j * os] = kvc_lag_std(p.k.data, p.k.dtype, kvc_at(p.k, b, h, j, 0), p.k.strides[3], loK, hiK, D);
        w[j] = kvc_lag_std(p.v.data, p.v.dtype, kvc_at(p.v, b, h, j, 0), p.v.strides[3], loV, hiV, Dv);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        kvc_lag_stats(o + j0 * os, os, lag, &stats[0], &stats[1]);
        kvc_lag_stats(w + j0, 1, lag, &stats[2], &stats[3]);
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < lag; i += blockDim.x) {
        float *x = o + (j0 + i) * os;
        *x = kvc_expf(*x - stats[0]) / stats[1] + kvc_expf(w[j0 + i] - stats[2]) / stats[3];
    }
    if (p.mode != KVC_LAGKV_RANK) return;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < lag; i += blockDim.x) {
        const float sc = o[(j0 + i) * os];
        int64_t r = 0;
        for (int64_t i2 = 0; i2 < lag; i2++) {
            const float s2 = o[(j0 + i2) * os];
            r += s2 > sc || (s2 == sc && i2 < i);
        }
        w[j0 + i] = (float)r;
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < lag; i += blockDim.x) {
        float *x = o + (j0 + i) * os;
        *x = kvc_lag_priority(*x, (int64_t)w[j0 + i], c, M);
    }
}

extern "C" size_t kvc_cuda_lagkv_scores_workspace(const struct kvc_lagkv_scores_params *p)
{
    return (size_t)KVC_ALIGN +
           kvc_align_up((size_t)(p->out.shape[0] * p->out.shape[1] * p->out.shape[2]) * sizeof(float));
}

extern "C" enum kvc_status kvc_cuda_lagkv_scores(const struct kvc_lagkv_scores_params *p, void *stream)
{
    const int64_t B = p->out.shape[0], H = p->out.shape[1], T = p->out.shape[2];
    const int64_t n = B * H * T;
    const size_t shared = (size_t)(2 * (p->k.shape[3] + p->v.shape[3])) * sizeof(float);
    int64_t blocks, mmax, m;
    float *work;
    if (p->lag < 1 || p->sinks < 0 || p->k.shape[3] < 2 || p->v.shape[3] < 2) return KVC_ERR_INVALID;
    if (n == 0) return KVC_OK;
    if (p->scratch == NULL || p->scratch_bytes < kvc_cuda_lagkv_scores_workspace(p)) return KVC_ERR_NOMEM;
    if (shared > 48 * 1024) return KVC_ERR_UNSUPPORTED;
    work = (float *)(((uintptr_t)p->scratch + (KVC_ALIGN - 1)) & ~(uintptr_t)(KVC_ALIGN - 1));
    blocks = kvc_ceil_div(n, 256);
    if (blocks > 65536) blocks = 65536; /* grid-stride beyond */
    kvc_lag_fill_kernel<<<(unsigned)blocks, 256, 0, KVC_STREAM(stream)>>>(*p, n);
    KVC_CUDA_LAUNCHED();
    /* most scored chunks any row can have: kv_start only lowers it */
    m = (T - (p->sinks < T ? p->sinks : T)) / p->lag;
    mmax = m >= 2 ? m - 1 : 0;
    if (mmax == 0) return KVC_OK;
    if (B * H > INT32_MAX / mmax) return KVC_ERR_UNSUPPORTED;
    kvc_lag_chunk_kernel<<<(unsigned)(B * H * mmax), KVC_LAG_THREADS, shared, KVC_STREAM(stream)>>>(*p, work,
                                                                                                    mmax);
    KVC_CUDA_LAUNCHED();
    return KVC_OK;
}
