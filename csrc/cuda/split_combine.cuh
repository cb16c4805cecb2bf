/*
 * split_combine.cuh - the split-K attention ops' (attention.cu,
 * attention_packed.cu) split of a span into chunks, and their pass 2: one
 * block of NW warps merges the `count` partials
 * of one output row by log-sum-exp and writes the row. Splits are
 * independent, so they are spread over the block (a warp walking them in
 * order waits on one load after another: tens of microseconds at 50
 * splits); sums in a fixed order, so results never depend on timing.
 */
#ifndef KVC_CUDA_SPLIT_COMBINE_CUH
#define KVC_CUDA_SPLIT_COMBINE_CUH

#include "common.cuh"

__device__ __forceinline__ float kvc_warp_sum(float x)
{
#pragma unroll
    for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

__device__ __forceinline__ float kvc_warp_max(float x)
{
#pragma unroll
    for (int o = 16; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

/* Pass 1's split of a span of slots over at most nsplit splits: *chunk
 * slots each (a multiple of align, at least min_chunk, so the boundaries
 * sit on align-slot steps from the span's start), *count splits holding
 * any. Both passes derive it from the same span, so they agree without
 * the host reading lengths. */
__device__ __forceinline__ void kvc_split_chunks(int64_t span, int64_t nsplit, int64_t align, int64_t min_chunk,
                                                 int64_t *chunk, int64_t *count)
{
    int64_t c = kvc_ceil_div(span > 0 ? span : 1, nsplit);
    c = kvc_ceil_div(c, align) * align;
    *chunk = c > min_chunk ? c : min_chunk;
    *count = span > 0 ? kvc_ceil_div(span, *chunk) : 0;
}

/* Row partials pm[p0 + k], ps[p0 + k] (running max and sum) and
 * pacc[(p0 + k) * D ..] (the unnormalised fp32 row) for k < count -> dst[d * stride] in dtype (zeros
 * for a row that sees no slot). Every thread of the block calls it; *M and
 * *L (the row's max and sum, for a log-sum-exp) come back to all of them.
 * D <= MAXD. */
template <int NW, int MAXD>
__device__ __forceinline__ void kvc_split_combine(const float *pm, const float *ps, const float *pacc,
                                                  int64_t p0, int64_t count, int64_t D, char *dst, int32_t dtype,
                                                  int64_t stride, float *M_out, float *L_out)
{
    constexpr int NT = NW * 32, EPL = MAXD / 32;
    __shared__ float sm_red[NW];
    __shared__ float sm_acc[NW][MAXD];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, Di = (int)D;

    /* block max, then block sum of w_k * s_k (thread order, then warps) */
    float M = -INFINITY;
    for (int64_t k = tid; k < count; k += NT) M = fmaxf(M, pm[p0 + k]);
    M = kvc_warp_max(M);
    if (lane == 0) sm_red[warp] = M;
    __syncthreads();
    M = sm_red[0];
#pragma unroll
    for (int w = 1; w < NW; w++) M = fmaxf(M, sm_red[w]);
    __syncthreads();
    float L = 0.0f;
    for (int64_t k = tid; k < count; k += NT) L += kvc_softmax_weight(pm[p0 + k], M) * ps[p0 + k];
    L = kvc_warp_sum(L);
    if (lane == 0) sm_red[warp] = L;

    /* warp w sums splits w, w + NW, ...; lanes own dimensions */
    float o[EPL];
#pragma unroll
    for (int e = 0; e < EPL; e++) o[e] = 0.0f;
    if (M != -INFINITY) {
#pragma unroll 4
        for (int64_t k = warp; k < count; k += NW) {
            const float w = kvc_softmax_weight(pm[p0 + k], M); /* 0 for an unseen split */
            const float *a = pacc + (p0 + k) * D;
#pragma unroll
            for (int e = 0; e < EPL; e++)
                if (lane + 32 * e < Di) o[e] += w * a[lane + 32 * e];
        }
    }
#pragma unroll
    for (int e = 0; e < EPL; e++)
        if (lane + 32 * e < Di) sm_acc[warp][lane + 32 * e] = o[e];
    __syncthreads();
    L = sm_red[0];
#pragma unroll
    for (int w = 1; w < NW; w++) L += sm_red[w];
    for (int d = tid; d < Di; d += NT) {
        float v = sm_acc[0][d];
#pragma unroll
        for (int w = 1; w < NW; w++) v += sm_acc[w][d];
        /* a row that sees no slot gets zeros */
        kvc_store_f32(dst, dtype, d * stride, M == -INFINITY ? 0.0f : v / L);
    }
    *M_out = M;
    *L_out = L;
}

#endif /* KVC_CUDA_SPLIT_COMBINE_CUH */
