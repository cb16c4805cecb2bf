/*
 * radix.cuh - the pieces of block-wide radix selection shared by top-k
 * selection (select.cu) and budget allocation (budget.cu): warp-aggregated
 * histogram counts and the parallel walk down a histogram that select.c
 * and budget.c do serially.
 */
#ifndef KVC_CUDA_RADIX_CUH
#define KVC_CUDA_RADIX_CUH

#include <cub/block/block_scan.cuh>

#include "common.cuh"

/* Add one to hist[bucket] (bucket < 0: nothing), one atomic per distinct
 * bucket of the warp: late passes and flat rows pile on a few buckets.
 * Every lane of the warp must call it. */
static __device__ __forceinline__ void kvc_radix_count(uint32_t *hist, int bucket)
{
    const unsigned same = __match_any_sync(0xffffffffu, bucket);
    if (bucket >= 0 && (int)(threadIdx.x & 31) == __ffs(same) - 1)
        atomicAdd(&hist[bucket], (uint32_t)__popc(same));
}

/* The walk down the histogram from the top bucket, in parallel: the bucket
 * where the rem-th largest key falls (0 if the counts fall short) goes to
 * *digit, rem less the counts above it to *rem_out. Thread t owns
 * nb / THREADS buckets counted from the top; a scan gives the count above
 * each run. Every thread of the block must call it. */
template <int THREADS>
static __device__ void kvc_radix_bucket(const uint32_t *hist, uint32_t nb, int64_t rem,
                                        typename cub::BlockScan<uint32_t, THREADS>::TempStorage &tmp,
                                        uint32_t *digit, int64_t *rem_out)
{
    const uint32_t per = nb / THREADS;
    const uint32_t top = nb - threadIdx.x * per;
    uint32_t run = 0, above, i;
    int64_t acc;
    for (i = 1; i <= per; i++) run += hist[top - i];
    cub::BlockScan<uint32_t, THREADS>(tmp).ExclusiveSum(run, above);
    acc = above;
    for (i = 1; i <= per; i++) {
        const uint32_t d = top - i;
        if (acc < rem && (acc + hist[d] >= rem || d == 0)) {
            *digit = d;
            *rem_out = rem - acc;
        }
        acc += hist[d];
    }
}

#endif /* KVC_CUDA_RADIX_CUH */
