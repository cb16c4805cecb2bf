/*
 * common.cuh - helpers shared by the kernel files (nvcc only): launch
 * checks, view indexing and typed loads over kvc_math.h.
 */
#ifndef KVC_CUDA_COMMON_CUH
#define KVC_CUDA_COMMON_CUH

#include <cuda_runtime.h>
#include <stdint.h>

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

#endif /* KVC_CUDA_COMMON_CUH */
