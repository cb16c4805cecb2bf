/*
 * span.cu - span_merge (span.c) on the GPU: a block per (b, h), its threads
 * striding over the channels of keys and then values; each thread walks the
 * span in ascending order with a double accumulator, as the CPU does, and
 * every product c_j x_j is exact in double, so both backends agree bit for
 * bit. No workspace.
 */
#include "common.cuh"

#define KVC_SPAN_THREADS 128
#define KVC_SPAN_MAX_BLOCKS 65536 /* grid-stride beyond */

static __device__ __forceinline__ double kvc_span_count(const struct kvc_view &c, int64_t b, int64_t h, int64_t j)
{
    return c.data ? (double)((const float *)c.data)[kvc_at(c, b, h, j, 0)] : 1.0;
}

/* out[b, h, d] = sum_j c_j x[b, h, j, d] / W for the block's (b, h). */
static __device__ void kvc_span_rows(const struct kvc_view &x, const struct kvc_view &c,
                                     const struct kvc_view &out, int64_t b, int64_t h, int64_t l, int64_t e,
                                     double W)
{
    for (int64_t d = threadIdx.x; d < x.shape[3]; d += blockDim.x) {
        double acc = 0.0;
        for (int64_t j = l; j < e; j++)
            acc += kvc_span_count(c, b, h, j) * (double)kvc_load_f32(x.data, x.dtype, kvc_at(x, b, h, j, d));
        kvc_store_f32(out.data, out.dtype, b * out.strides[0] + h * out.strides[1] + d * out.strides[2],
                      W > 0.0 ? (float)(acc / W) : 0.0f);
    }
}

static __global__ void __launch_bounds__(KVC_SPAN_THREADS)
kvc_span_merge_kernel(const struct kvc_span_merge_params p)
{
    const int64_t B = p.keys.shape[0], H = p.keys.shape[1], T = p.keys.shape[2];
    for (int64_t u = blockIdx.x; u < B * H; u += gridDim.x) {
        const int64_t b = u / H, h = u % H;
        int64_t l = ((const int64_t *)p.lo.data)[b * p.lo.strides[0] + h * p.lo.strides[1]];
        int64_t e = ((const int64_t *)p.hi.data)[b * p.hi.strides[0] + h * p.hi.strides[1]];
        if (l < 0 || l > e || e > T) l = e = 0; /* outside the contract: empty */
        double W = 0.0;
        for (int64_t j = l; j < e; j++) W += kvc_span_count(p.counts, b, h, j);
        kvc_span_rows(p.keys, p.counts, p.out_keys, b, h, l, e, W);
        kvc_span_rows(p.values, p.counts, p.out_values, b, h, l, e, W);
        if (threadIdx.x == 0)
            ((float *)p.out_counts.data)[b * p.out_counts.strides[0] + h * p.out_counts.strides[1]] = (float)W;
    }
}

extern "C" enum kvc_status kvc_cuda_span_merge(const struct kvc_span_merge_params *p, void *stream)
{
    const int64_t units = p->keys.shape[0] * p->keys.shape[1];
    if (units == 0) return KVC_OK;
    const unsigned blocks = (unsigned)(units < KVC_SPAN_MAX_BLOCKS ? units : KVC_SPAN_MAX_BLOCKS);
    kvc_span_merge_kernel<<<blocks, KVC_SPAN_THREADS, 0, KVC_STREAM(stream)>>>(*p);
    KVC_CUDA_LAUNCHED();
    return KVC_OK;
}
