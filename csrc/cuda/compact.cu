/*
 * compact.cu - gather of kept tokens (compact.c) on the GPU.
 *
 * Rows are copied as unsigned integers of the element's width, so any 2-,
 * 4- or 8-byte dtype comes out bit for bit (NaN payloads included).
 */
#include "common.cuh"

#define KVC_GATHER_THREADS 128
#define KVC_GATHER_MAX_BLOCKS 65536 /* grid-stride beyond */

/* dst[b, h, i, :] <- src[b, h, t, :], the block's threads striding over
 * the row. */
template <typename E>
__device__ __forceinline__ void kvc_gather_row(const struct kvc_view &src,
                                               const struct kvc_view &dst, int64_t b, int64_t h,
                                               int64_t i, int64_t t)
{
    const E *s = (const E *)src.data + kvc_at(src, b, h, t, 0);
    E *d = (E *)dst.data + kvc_at(dst, b, h, i, 0);
    for (int64_t c = threadIdx.x; c < src.shape[3]; c += blockDim.x)
        d[c * dst.strides[3]] = s[c * src.strides[3]];
}

/* A block per output row (grid-stride over rows): keys then values. */
template <typename E>
static __global__ void __launch_bounds__(KVC_GATHER_THREADS)
kvc_gather_kernel(const struct kvc_gather_params p, int64_t rows)
{
    const int64_t H = p.indices.shape[1], n = p.indices.shape[2];
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const int64_t b = r / (H * n), h = (r / n) % H, i = r % n;
        const int64_t t = kvc_load_index(p.indices.data, p.indices.dtype,
                                         kvc_at(p.indices, b, h, i, 0));
        kvc_gather_row<E>(p.keys, p.out_keys, b, h, i, t);
        kvc_gather_row<E>(p.values, p.out_values, b, h, i, t);
    }
}

extern "C" enum kvc_status kvc_cuda_gather(const struct kvc_gather_params *p, void *stream)
{
    const int64_t rows = p->indices.shape[0] * p->indices.shape[1] * p->indices.shape[2];
    const unsigned blocks =
        (unsigned)(rows < KVC_GATHER_MAX_BLOCKS ? rows : KVC_GATHER_MAX_BLOCKS);
    cudaStream_t st = KVC_STREAM(stream);
    if (rows == 0 || (p->keys.shape[3] == 0 && p->values.shape[3] == 0)) return KVC_OK;
    switch (kvc_dtype_size((enum kvc_dtype)p->keys.dtype)) {
    case 2: kvc_gather_kernel<uint16_t><<<blocks, KVC_GATHER_THREADS, 0, st>>>(*p, rows); break;
    case 4: kvc_gather_kernel<uint32_t><<<blocks, KVC_GATHER_THREADS, 0, st>>>(*p, rows); break;
    case 8: kvc_gather_kernel<uint64_t><<<blocks, KVC_GATHER_THREADS, 0, st>>>(*p, rows); break;
    default: return KVC_ERR_UNSUPPORTED;
    }
    KVC_CUDA_LAUNCHED();
    return KVC_OK;
}
