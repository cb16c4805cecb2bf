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

/* A thread per (b, query head): the CPU's row order and online softmax
 * (kvc_mc_push), so both backends take the same steps. */
static __device__ int64_t kvc_mc_slot(const struct kvc_view &v, int64_t b, int64_t h, int64_t i)
{
    return kvc_load_index(v.data, v.dtype, b * v.strides[0] + h * v.strides[1] + i * v.strides[2]);
}

static __device__ void kvc_mc_row(float *dst, const struct kvc_view &v, int64_t b, int64_t h, int64_t j)
{
    const int64_t es = v.dtype == KVC_F32 ? 4 : 2;
    const char *src = (const char *)v.data + kvc_at(v, b, h, j, 0) * es;
    for (int64_t d = 0; d < v.shape[3]; d++) dst[d] = kvc_load_f32(src, v.dtype, d * v.strides[3]);
}

static __global__ void __launch_bounds__(KVC_MC_THREADS)
kvc_minicache_attention_kernel(const struct kvc_minicache_attention_params p)
{
    const int64_t Hq = p.q.shape[1], H = p.dir_k.shape[1], D = p.q.shape[3], Dv = p.dir_v.shape[3];
    const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= p.q.shape[0] * Hq) return;
    const int64_t b = r / Hq, hq = r % Hq, h = hq / (Hq / H);
    const int64_t es = p.q.dtype == KVC_F32 ? 4 : 2;
    float q[KVC_MC_MAX_D], row[KVC_MC_MAX_D], vrow[KVC_MC_MAX_D], acc[KVC_MC_MAX_D];
    const char *qs = (const char *)p.q.data + (b * p.q.strides[0] + hq * p.q.strides[1]) * es;
    for (int64_t d = 0; d < D; d++) q[d] = kvc_load_f32(qs, p.q.dtype, d * p.q.strides[3]);
    for (int64_t d = 0; d < Dv; d++) acc[d] = 0.0f;
    struct kvc_softmax_state st;
    kvc_softmax_init(&st);
    for (int64_t i = 0; i < p.dir_k.shape[2]; i++) {
        if (kvc_mc_slot(p.slots, b, h, i) < 0) continue;
        const float nk = ((const float *)p.norms_k.data)[kvc_at(p.norms_k, b, h, i, p.which)];
        const float nv = ((const float *)p.norms_v.data)[kvc_at(p.norms_v, b, h, i, p.which)];
        kvc_mc_row(row, p.dir_k, b, h, i);
        float x = p.scaling * (nk * kvc_dot_f32(q, row, D));
        if (p.counts.data) x += kvc_logf(((const float *)p.counts.data)[kvc_at(p.counts, b, h, i, p.which)]);
        kvc_mc_row(vrow, p.dir_v, b, h, i);
        kvc_mc_push(&st, acc, x, vrow, nv, Dv);
    }
    for (int64_t i = 0; i < p.keys.shape[2]; i++) {
        if (kvc_mc_slot(p.kept_slots, b, h, i) < 0) continue;
        kvc_mc_row(row, p.keys, b, h, i);
        float x = p.scaling * kvc_dot_f32(q, row, D);
        if (p.kept_counts.data)
            x += kvc_logf(((const float *)p.kept_counts.data)[b * p.kept_counts.strides[0] + h * p.kept_counts.strides[1] +
                                                              i * p.kept_counts.strides[2]]);
        kvc_mc_row(vrow, p.values, b, h, i);
        kvc_mc_push(&st, acc, x, vrow, 1.0f, Dv);
    }
    for (int64_t i = 0; i < p.tail_k.shape[2]; i++) {
        kvc_mc_row(row, p.tail_k, b, h, i);
        kvc_mc_row(vrow, p.tail_v, b, h, i);
        kvc_mc_push(&st, acc, p.scaling * kvc_dot_f32(q, row, D), vrow, 1.0f, Dv);
    }
    const float inv = st.s > 0.0f ? 1.0f / st.s : 0.0f;
    void *dst = (char *)p.out.data + (b * p.out.strides[0] + hq * p.out.strides[2]) * es;
    for (int64_t d = 0; d < Dv; d++) kvc_store_f32(dst, p.out.dtype, d * p.out.strides[3], acc[d] * inv);
}

extern "C" enum kvc_status kvc_cuda_minicache_attention(const struct kvc_minicache_attention_params *p, void *stream)
{
    const int64_t H = p->dir_k.shape[1], items = p->q.shape[0] * p->q.shape[1];
    if (p->which < 0 || p->which > 1 || H <= 0 || p->q.shape[1] % H != 0 || p->q.shape[2] != 1) return KVC_ERR_INVALID;
    if (items == 0) return KVC_OK;
    if (p->q.shape[3] > KVC_MC_MAX_D || p->dir_v.shape[3] > KVC_MC_MAX_D) return KVC_ERR_UNSUPPORTED;
    const int64_t blocks = kvc_ceil_div(items, KVC_MC_THREADS);
    kvc_minicache_attention_kernel<<<(unsigned)blocks, KVC_MC_THREADS, 0, KVC_STREAM(stream)>>>(*p);
    KVC_CUDA_LAUNCHED();
    return KVC_OK;
}
