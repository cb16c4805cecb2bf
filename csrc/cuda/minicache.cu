/*
 * minicache.cu - MiniCache's SLERP merge and reconstruction (minicache.c) on
 * the GPU: a thread per token (b, h, j) with the CPU's per-token math
 * (kvc_slerp_row, the lane order of kvc_dot_f32), so both backends take the
 * same branches; sinf/atan2f may differ from libm by an ulp.
 */
#include "common.cuh"
#include "../minicache_math.h"

#define KVC_MC_THREADS 128
#define KVC_MC_MAX_D 256

static __global__ void __launch_bounds__(KVC_MC_THREADS) kvc_slerp_merge_kernel(const struct kvc_slerp_merge_params p)
{
    const int64_t H = p.x1.shape[1], n = p.x1.shape[2], D = p.x1.shape[3];
    const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= p.x1.shape[0] * H * n) return;
    const int64_t b = r / (H * n), h = (r / n) % H, j = r % n;
    const int64_t es = p.x1.dtype == KVC_F32 ? 4 : 2;
    float u1[KVC_MC_MAX_D], u2[KVC_MC_MAX_D], e[KVC_MC_MAX_D];
    const char *s1 = (const char *)p.x1.data + kvc_at(p.x1, b, h, j, 0) * es;
    const char *s2 = (const char *)p.x2.data + kvc_at(p.x2, b, h, j, 0) * es;
    for (int64_t d = 0; d < D; d++) {
        u1[d] = kvc_load_f32(s1, p.x1.dtype, d * p.x1.strides[3]);
        u2[d] = kvc_load_f32(s2, p.x2.dtype, d * p.x2.strides[3]);
    }
    float n1, n2;
    const float dist = kvc_slerp_row(e, u1, u2, D, p.t, &n1, &n2);
    void *dst = (char *)p.dir.data + kvc_at(p.dir, b, h, j, 0) * es;
    for (int64_t d = 0; d < D; d++) kvc_store_f32(dst, p.dir.dtype, d * p.dir.strides[3], e[d]);
    float *norms = (float *)p.norms.data + kvc_at(p.norms, b, h, j, 0);
    norms[0] = n1;
    norms[p.norms.strides[3]] = n2;
    ((float *)p.dist.data)[b * p.dist.strides[0] + h * p.dist.strides[1] + j * p.dist.strides[2]] = dist;
}

extern "C" enum kvc_status kvc_cuda_slerp_merge(const struct kvc_slerp_merge_params *p, void *stream)
{
    const int64_t items = p->x1.shape[0] * p->x1.shape[1] * p->x1.shape[2];
    if (!(p->t >= 0.0f && p->t <= 1.0f)) return KVC_ERR_INVALID;
    if (items == 0) return KVC_OK;
    if (p->x1.shape[3] > KVC_MC_MAX_D) return KVC_ERR_UNSUPPORTED;
    const int64_t blocks = kvc_ceil_div(items, KVC_MC_THREADS);
    kvc_slerp_merge_kernel<<<(unsigned)blocks, KVC_MC_THREADS, 0, KVC_STREAM(stream)>>>(*p);
    KVC_CUDA_LAUNCHED();
    return KVC_OK;
}

/* A thread per (b, h, row), merged rows first (i < m), then retained ones. */
static __global__ void __launch_bounds__(KVC_MC_THREADS) kvc_slerp_restore_kernel(const struct kvc_slerp_restore_params p)
{
    const int64_t H = p.dir.shape[1], m = p.dir.shape[2], rk = p.kept.shape[2], D = p.dir.shape[3];
    const int64_t rows = m + rk;
    const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= p.dir.shape[0] * H * rows) return;
    const int64_t b = r / (H * rows), h = (r / rows) % H, i = r % rows;
    const int64_t es = p.dir.dtype == KVC_F32 ? 4 : 2;
    if (i < m) {
        const int64_t slot = kvc_load_index(p.slots.data, p.slots.dtype, kvc_at(p.slots, b, h, i, 0));
        if (slot < 0) return; /* padding */
        const float nrm = ((const float *)p.norms.data)[kvc_at(p.norms, b, h, i, p.which)];
        const char *src = (const char *)p.dir.data + kvc_at(p.dir, b, h, i, 0) * es;
        void *dst = (char *)p.out.data + kvc_at(p.out, b, h, slot, 0) * es;
        for (int64_t d = 0; d < D; d++)
            kvc_store_f32(dst, p.out.dtype, d * p.out.strides[3],
                          __fmul_rn(nrm, kvc_load_f32(src, p.dir.dtype, d * p.dir.strides[3])));
    } else {
        const int64_t k = i - m;
        const int64_t slot = kvc_load_index(p.kept_slots.data, p.kept_slots.dtype, kvc_at(p.kept_slots, b, h, k, 0));
        if (slot < 0) return; /* padding */
        const char *src = (const char *)p.kept.data + kvc_at(p.kept, b, h, k, 0) * es;
        char *dst = (char *)p.out.data + kvc_at(p.out, b, h, slot, 0) * es;
        for (int64_t d = 0; d < D; d++) {
            if (es == 4)
                ((float *)dst)[d * p.out.strides[3]] = ((const float *)src)[d * p.kept.strides[3]];
            else
                ((uint16_t *)dst)[d * p.out.strides[3]] = ((const uint16_t *)src)[d * p.kept.strides[3]];
        }
    }
}

extern "C" enum kvc_status kvc_cuda_slerp_restore(const struct kvc_slerp_restore_params *p, void *stream)
{
    const int64_t items = p->dir.shape[0] * p->dir.shape[1] * (p->dir.shape[2] + p->kept.shape[2]);
    if (p->which < 0 || p->which > 1) return KVC_ERR_INVALID;
    if (items == 0) return KVC_OK;
    const int64_t blocks = kvc_ceil_div(items, KVC_MC_THREADS);
    kvc_slerp_restore_kernel<<<(unsigned)blocks, KVC_MC_THREADS, 0, KVC_STREAM(stream)>>>(*p);
    KVC_CUDA_LAUNCHED();
    return KVC_OK;
}
