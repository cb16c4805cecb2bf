/*
 * score.cu - vector norms and 1-D pooling (score.c) on the GPU. Window
 * scores live in global.cu: they are the global score's two passes with a
 * fixed denominator.
 */
#include "common.cuh"

/* ------------------------------------------------------------------------ */
/* vector norm                                                              */
/* ------------------------------------------------------------------------ */

/* Half a warp per row: lane l sums elements l, l + 16, ... in order and the
 * shuffles add lanes +8, +4, +2, +1, which is kvc_lanes_sum's order over the
 * CPU's 16 lane accumulators. */
#define KVC_NORM_THREADS 256

static __global__ void __launch_bounds__(KVC_NORM_THREADS)
kvc_norm_kernel(const struct kvc_view x, const struct kvc_view out, int32_t ord, int64_t rows)
{
    const int64_t H = x.shape[1], T = x.shape[2], D = x.shape[3];
    const int64_t r = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 16;
    const int lane = threadIdx.x % 16;
    /* a half warp leaves (or stays) as a whole, so shuffles name only it */
    const unsigned mask = 0xffffu << (threadIdx.x & 16u);
    float acc = 0.0f;
    int64_t b, h, t, base;
    if (r >= rows) return;
    b = r / (H * T);
    h = (r / T) % H;
    t = r % T;
    base = kvc_at(x, b, h, t, 0);
    for (int64_t d = lane; d < D; d += 16) {
        const float v = kvc_load_f32(x.data, x.dtype, base + d * x.strides[3]);
        acc += ord == 1 ? fabsf(v) : v * v;
    }
    for (int off = 8; off > 0; off /= 2) acc += __shfl_down_sync(mask, acc, off, 16);
    if (lane == 0) ((float *)out.data)[kvc_at(out, b, h, t, 0)] = ord == 1 ? acc : sqrtf(acc);
}

extern "C" enum kvc_status kvc_cuda_vector_norm(const struct kvc_vector_norm_params *p,
                                                void *stream)
{
    const int64_t rows = p->x.shape[0] * p->x.shape[1] * p->x.shape[2];
    const int64_t blocks = kvc_ceil_div(rows * 16, KVC_NORM_THREADS);
    if (p->ord != 1 && p->ord != 2) return KVC_ERR_INVALID;
    if (rows == 0) return KVC_OK;
    if (blocks > INT32_MAX) return KVC_ERR_UNSUPPORTED;
    kvc_norm_kernel<<<(unsigned)blocks, KVC_NORM_THREADS, 0, KVC_STREAM(stream)>>>(
        p->x, p->out, p->ord, rows);
    KVC_CUDA_LAUNCHED();
    return KVC_OK;
}

/* ------------------------------------------------------------------------ */
/* 1-D pooling                                                              */
/* ------------------------------------------------------------------------ */

/* One thread per output: the window clipped to the row, taken left to right
 * as the CPU does, so results are bit-identical. Max propagates NaN and
 * ignores the padding; avg counts the padding (divides by kernel). */
static __global__ void kvc_pool_kernel(const struct kvc_view in, const struct kvc_view out,
                                       int64_t kernel, int32_t mode, int64_t n)
{
    const int64_t H = in.shape[1], T = in.shape[2], r = kernel / 2;
    const float *src = (const float *)in.data;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n;
         e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t b = e / (H * T), h = (e / T) % H, t = e % T;
        const int64_t j0 = t - r > 0 ? t - r : 0, j1 = t + r < T - 1 ? t + r : T - 1;
        const int64_t base = kvc_at(in, b, h, 0, 0), is = in.strides[2];
        float v = src[base + j0 * is];
        /* the CPU starts clipped (and strided) windows of avg from 0.0f:
         * same bits, -0 included */
        if (mode != KVC_POOL_MAX && (t < r || t >= T - r || is != 1 || out.strides[2] != 1))
            v = 0.0f + v;
        for (int64_t j = j0 + 1; j <= j1; j++) {
            const float x = src[base + j * is];
            if (mode == KVC_POOL_MAX) v = (x > v || x != x) ? x : v;
            else v += x;
        }
        ((float *)out.data)[kvc_at(out, b, h, t, 0)] =
            mode == KVC_POOL_MAX ? v : v / (float)kernel;
    }
}

extern "C" enum kvc_status kvc_cuda_pool1d(const struct kvc_pool1d_params *p, void *stream)
{
    const int64_t n = p->in.shape[0] * p->in.shape[1] * p->in.shape[2];
    int64_t blocks = kvc_ceil_div(n, 256);
    if (p->kernel < 1 || p->kernel % 2 == 0) return KVC_ERR_INVALID;
    if (n == 0) return KVC_OK;
    if (blocks > 65536) blocks = 65536; /* grid-stride beyond */
    kvc_pool_kernel<<<(unsigned)blocks, 256, 0, KVC_STREAM(stream)>>>(p->in, p->out, p->kernel,
                                                                      p->mode, n);
    KVC_CUDA_LAUNCHED();
    return KVC_OK;
}
