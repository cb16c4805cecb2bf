/*
 * runtime.cu - the CUDA runtime calls the module layer needs, behind plain
 * C functions so that gcc-compiled files never include cuda_runtime.h.
 */
#include <cuda_runtime.h>

#include "kvc_cuda.h"

/* Per thread, like cudaGetLastError itself. */
static thread_local cudaError_t kvc_cuda_err = cudaSuccess;

static enum kvc_status kvc_cuda_status(cudaError_t e)
{
    if (e == cudaSuccess) return KVC_OK;
    kvc_cuda_err = e;
    cudaGetLastError(); /* a sticky error is never cleared; a launch error is */
    return KVC_ERR_CUDA;
}

extern "C" int kvc_cuda_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return n;
}

extern "C" enum kvc_status kvc_cuda_set_device(int device, int *previous)
{
    int cur = 0;
    cudaError_t e = cudaGetDevice(&cur);
    if (e != cudaSuccess) return kvc_cuda_status(e);
    if (previous) *previous = cur;
    return cur == device ? KVC_OK : kvc_cuda_status(cudaSetDevice(device));
}

extern "C" enum kvc_status kvc_cuda_scratch_alloc(void **ptr, size_t bytes, void *stream)
{
    *ptr = NULL;
    if (bytes == 0) return KVC_OK;
    return kvc_cuda_status(cudaMallocAsync(ptr, bytes, (cudaStream_t)stream));
}

extern "C" void kvc_cuda_scratch_free(void *ptr, void *stream)
{
    if (ptr) kvc_cuda_status(cudaFreeAsync(ptr, (cudaStream_t)stream));
}

extern "C" enum kvc_status kvc_cuda_copy_to_host(void *dst, const void *src, size_t bytes,
                                                 void *stream)
{
    cudaError_t e;
    if (bytes == 0) return KVC_OK;
    e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, (cudaStream_t)stream);
    if (e != cudaSuccess) return kvc_cuda_status(e);
    return kvc_cuda_status(cudaStreamSynchronize((cudaStream_t)stream));
}

extern "C" enum kvc_status kvc_cuda_stream_sync(void *stream)
{
    return kvc_cuda_status(cudaStreamSynchronize((cudaStream_t)stream));
}

extern "C" const char *kvc_cuda_last_error(void)
{
    cudaError_t e = kvc_cuda_err;
    if (e == cudaSuccess) e = cudaGetLastError();
    kvc_cuda_err = cudaSuccess;
    return e == cudaSuccess ? "no CUDA error recorded" : cudaGetErrorString(e);
}
