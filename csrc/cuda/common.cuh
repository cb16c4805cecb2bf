/*
 * common.cuh - helpers shared by the kernel files (nvcc only): launch
 * checks, view indexing and typed loads over kvc_math.h.
 */
#ifndef KVC_CUDA_COMMON_CUH
#define KVC_CUDA_COMMON_CUH

#include <cuda_runtime.h>
#include <stdint.h>

#include <atomic>

#include "../kvc_math.h"
#include "kvc_cuda.h"

#define KVC_STREAM(s) ((cudaStream_t)(s))

/* After a launch: a failed launch becomes KVC_ERR_CUDA (the error stays
 * readable through kvc_cuda_last_error). */
#define KVC_CUDA_LAUNCHED()                                   \
    do {                                                      \
        if (cudaPeekAtLastError() != cudaSuccess) return KVC_ERR_CUDA; \
    } while (0)

#define KVC_CUDA_TRY(call)                                    \
    do {                                                      \
        if ((call) != cudaSuccess) return KVC_ERR_CUDA;       \
    } while (0)

/* Element offset of [i0, i1, i2, i3] in a view (unused dims pass 0). */
__device__ __forceinline__ int64_t kvc_at(const struct kvc_view &v, int64_t i0, int64_t i1,
                                          int64_t i2, int64_t i3)
{
    return i0 * v.strides[0] + i1 * v.strides[1] + i2 * v.strides[2] + i3 * v.strides[3];
}

__host__ __device__ __forceinline__ int64_t kvc_ceil_div(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

/* Carve `bytes` (rounded to KVC_ALIGN) off a scratch cursor (host side:
 * launchers lay out the workspace before launching). */
static inline char *kvc_carve(char **cursor, size_t bytes)
{
    char *p = *cursor;
    *cursor += kvc_align_up(bytes);
    return p;
}

#define KVC_CUDA_MAX_DEVICES 64

/* A per-device value, computed once by get(dev, &v) (threads that race
 * store the same value); fallback when the device or the query fails. */
template <typename F>
static inline int kvc_cuda_cached(std::atomic<int> *cache, F get, int fallback)
{
    int dev = -1, v = 0;
    if (cudaGetDevice(&dev) == cudaSuccess && dev >= 0 && dev < KVC_CUDA_MAX_DEVICES) {
        v = cache[dev].load(std::memory_order_relaxed);
        if (v > 0) return v;
        if (get(dev, &v) == cudaSuccess && v > 0) {
            cache[dev].store(v, std::memory_order_relaxed);
            return v;
        }
    }
    cudaGetLastError(); /* not a launch error: keep KVC_CUDA_LAUNCHED clean */
    return fallback;
}

/* SMs of the current device, asked once per device; 132 when the query
 * fails. */
static inline int64_t kvc_cuda_sm_count(void)
{
    static std::atomic<int> cache[KVC_CUDA_MAX_DEVICES];
    return kvc_cuda_cached(cache, [](int dev, int *v) {
        return cudaDeviceGetAttribute(v, cudaDevAttrMultiProcessorCount, dev);
    }, 132);
}

/* Split-K blocks per (head, tile) of the attention ops: no block shorter
 * than min_chunk of a head's navg slots (ragged heads' lengths live on the
 * device: navg is the average), at most `cap` blocks over the `units`
 * (head, tile) pairs, at least 1, within grid y. */
static inline int64_t kvc_cuda_nsplit(int64_t navg, int64_t min_chunk, int64_t cap, int64_t units)
{
    const int64_t most = navg > min_chunk ? kvc_ceil_div(navg, min_chunk) : 1;
    const int64_t ns = cap / units;
    const int64_t n = ns < 1 ? 1 : (ns < most ? ns : most);
    return n < 65535 ? n : 65535;
}

/* Workspace of the split-K attention ops: running max and sum of np
 * partial rows, then the rows [np][D], all fp32. */
static inline size_t kvc_cuda_split_workspace(int64_t np, int64_t D)
{
    return KVC_ALIGN + 2 * kvc_align_up((size_t)np * sizeof(float)) +
           kvc_align_up((size_t)np * (size_t)D * sizeof(float));
}

#endif /* KVC_CUDA_COMMON_CUH */
