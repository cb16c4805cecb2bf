/*
 * layerbudget.cu - pooled_counts and row_cosine (layerbudget.c) on the GPU.
 *
 * pooled_counts: a block per batch row runs the CPU's 32 counting passes on
 * the order-preserving keys (each a block-wide sum of integer counts, exact
 * in any order), then one pass per layer for its entries above and equal to
 * the k-th largest key; thread 0 hands the ties out in layer order. The
 * result is the CPU's bit for bit. No workspace.
 *
 * row_cosine: a warp per vector, float32 sums reduced by shuffles (a
 * different addition order from the CPU's: agreement within rounding).
 */
#include "common.cuh"
#include "../layerbudget_math.h"

#define KVC_LB_THREADS 256
#define KVC_LB_MAX_BLOCKS 65536 /* grid-stride beyond */

static __device__ __forceinline__ uint32_t kvc_lb_key_at(const struct kvc_view &s, int64_t b, int64_t i)
{
    const int64_t M = s.shape[2];
    const int64_t l = i / M, j = i % M;
    return kvc_lb_key(((const float *)s.data)[b * s.strides[0] + l * s.strides[1] + j * s.strides[2]]);
}

/* Block-wide sum of one value per thread (every thread gets the total). */
static __device__ long long kvc_lb_block_sum(long long v, long long *shared)
{
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    long long total = 0;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) total += shared[w];
    return total;
}

static __global__ void __launch_bounds__(KVC_LB_THREADS)
kvc_pooled_counts_kernel(const struct kvc_pooled_counts_params p)
{
    __shared__ long long shared[KVC_LB_THREADS / 32];
    const int64_t B = p.scores.shape[0], L = p.scores.shape[1], M = p.scores.shape[2], N = L * M;
    for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
        int64_t k = ((const int64_t *)p.k.data)[b * p.k.strides[0]];
        k = k < 0 ? 0 : (k > N ? N : k); /* outside the contract: clamped */
        int64_t *out = (int64_t *)p.counts.data + b * p.counts.strides[0];
        if (k == 0) {
            for (int64_t l = threadIdx.x; l < L; l += blockDim.x) out[l * p.counts.strides[1]] = 0;
            continue;
        }
        uint32_t t = 0;
        for (int bit = 31; bit >= 0; bit--) {
            const uint32_t cand = t | (1u << bit);
            long long n = 0;
            for (int64_t i = threadIdx.x; i < N; i += blockDim.x) n += kvc_lb_key_at(p.scores, b, i) >= cand;
            if (kvc_lb_block_sum(n, shared) >= k) t = cand;
        }
        for (int64_t l = 0; l < L; l++) {
            long long above = 0, equal = 0;
            for (int64_t j = threadIdx.x; j < M; j += blockDim.x) {
                const uint32_t key = kvc_lb_key_at(p.scores, b, l * M + j);
                above += key > t;
                equal += key == t;
            }
            above = kvc_lb_block_sum(above, shared);
            equal = kvc_lb_block_sum(equal, shared);
            /* both counts packed in the output until the ties are handed out
             * (each is at most L * M < 2^31, checked at launch) */
            if (threadIdx.x == 0) out[l * p.counts.strides[1]] = above | (equal << 32);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            /* every entry above t is among the k; the lower layers take the ties first */
            int64_t ties = k;
            for (int64_t l = 0; l < L; l++) ties -= out[l * p.counts.strides[1]] & 0xffffffffLL;
            for (int64_t l = 0; l < L; l++) {
                const int64_t packed = out[l * p.counts.strides[1]];
                const int64_t above = packed & 0xffffffffLL, equal = packed >> 32;
                const int64_t take = equal < ties ? equal : ties;
                ties -= take;
                out[l * p.counts.strides[1]] = above + take;
            }
        }
        __syncthreads();
    }
}

static __global__ void __launch_bounds__(KVC_LB_THREADS)
kvc_row_cosine_kernel(const struct kvc_row_cosine_params p)
{
    const int64_t N = p.x.shape[0], D = p.x.shape[1];
    const int64_t warps = (int64_t)gridDim.x * (blockDim.x >> 5);
    for (int64_t n = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); n < N; n += warps) {
        float xy = 0.0f, xx = 0.0f, yy = 0.0f;
        for (int64_t d = threadIdx.x & 31; d < D; d += 32) {
            const float a = kvc_load_f32(p.x.data, p.x.dtype, n * p.x.strides[0] + d * p.x.strides[1]);
            const float c = kvc_load_f32(p.y.data, p.y.dtype, n * p.y.strides[0] + d * p.y.strides[1]);
            xy += a * c;
            xx += a * a;
            yy += c * c;
        }
        for (int o = 16; o > 0; o >>= 1) {
            xy += __shfl_down_sync(0xffffffffu, xy, o);
            xx += __shfl_down_sync(0xffffffffu, xx, o);
            yy += __shfl_down_sync(0xffffffffu, yy, o);
        }
        if ((threadIdx.x & 31) == 0) ((float *)p.out.data)[n * p.out.strides[0]] = kvc_lb_cosine(xy, xx, yy);
    }
}

extern "C" enum kvc_status kvc_cuda_pooled_counts(const struct kvc_pooled_counts_params *p, void *stream)
{
    const int64_t B = p->scores.shape[0];
    if (B == 0 || p->scores.shape[1] == 0) return KVC_OK;
    if (p->scores.shape[1] * p->scores.shape[2] >= ((int64_t)1 << 31)) return KVC_ERR_UNSUPPORTED;
    const unsigned blocks = (unsigned)(B < KVC_LB_MAX_BLOCKS ? B : KVC_LB_MAX_BLOCKS);
    kvc_pooled_counts_kernel<<<blocks, KVC_LB_THREADS, 0, KVC_STREAM(stream)>>>(*p);
    KVC_CUDA_LAUNCHED();
    return KVC_OK;
}

extern "C" enum kvc_status kvc_cuda_row_cosine(const struct kvc_row_cosine_params *p, void *stream)
{
    const int64_t N = p->x.shape[0];
    if (N == 0) return KVC_OK;
    const int64_t per_block = KVC_LB_THREADS / 32;
    const int64_t need = (N + per_block - 1) / per_block;
    const unsigned blocks = (unsigned)(need < KVC_LB_MAX_BLOCKS ? need : KVC_LB_MAX_BLOCKS);
    kvc_row_cosine_kernel<<<blocks, KVC_LB_THREADS, 0, KVC_STREAM(stream)>>>(*p);
    KVC_CUDA_LAUNCHED();
    return KVC_OK;
}
