/*
 * kvmerger.cu - KVMerger's merging sets and Gaussian-kernel merge
 * (kvmerger.c) on the GPU, over the same per-slot math (kvmerger_math.h).
 *
 * Sets: one thread per slot for the neighbour cosines, then one thread per
 * (row, head) for the scan that names each slot's set (a prefix over the
 * slots, cheap next to the cosines). Merge: one block per (row, head,
 * center); its threads split the channels and each computes the absorbed
 * slots' weights itself in slot order, as the CPU does, so no reduction
 * changes the summation order. A last kernel writes assign.
 */
#include "common.cuh"
#include "../kvmerger_math.h"

#define KVC_KVM_THREADS 64

__device__ __forceinline__ int64_t kvc_kvm_start(const int64_t *ks, int64_t stride, int64_t b)
{
    return ks ? ks[b * stride] : 0;
}

static __global__ void kvc_kvm_sims_kernel(const struct kvc_kvmerger_sets_params p, int64_t n)
{
    const int64_t H = p.keys.shape[1], T = p.keys.shape[2], D = p.keys.shape[3];
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t b = e / (H * T), h = (e / T) % H, j = e % T;
        int64_t lo, hi;
        float c = NAN;
        kvc_kvm_range(kvc_kvm_start(p.kv_start, p.kv_start_stride, b), p.sinks, p.window, T, &lo, &hi);
        if (j > lo && j < hi)
            c = kvc_kvm_cos(p.keys.data, p.keys.dtype, kvc_at(p.keys, b, h, j - 1, 0), kvc_at(p.keys, b, h, j, 0),
                            p.keys.strides[3], D);
        ((float *)p.sims.data)[kvc_at(p.sims, b, h, j, 0)] = c;
    }
}

static __global__ void kvc_kvm_runs_kernel(const struct kvc_kvmerger_sets_params p, int64_t n)
{
    const int64_t H = p.keys.shape[1], T = p.keys.shape[2];
    for (int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; u < n; u += (int64_t)gridDim.x * blockDim.x) {
        const int64_t b = u / H, h = u % H;
        const float *sims = (const float *)p.sims.data + kvc_at(p.sims, b, h, 0, 0);
        int64_t *runs = (int64_t *)p.runs.data + kvc_at(p.runs, b, h, 0, 0);
        const int64_t ss = p.sims.strides[2], rs = p.runs.strides[2];
        int64_t lo, hi, r = -1;
        kvc_kvm_range(kvc_kvm_start(p.kv_start, p.kv_start_stride, b), p.sinks, p.window, T, &lo, &hi);
        for (int64_t j = 0; j < T; j++) {
            if (j < lo || j >= hi) r = -1;
            else if (j == lo || !(sims[j * ss] > p.threshold)) r = j;
            runs[j * rs] = r;
        }
    }
}

extern "C" enum kvc_status kvc_cuda_kvmerger_sets(const struct kvc_kvmerger_sets_params *p, void *stream)
{
    const int64_t B = p->keys.shape[0], H = p->keys.shape[1], T = p->keys.shape[2];
    const int64_t n = B * H * T;
    int64_t blocks;
    if (p->sinks < 0 || p->window < 0) return KVC_ERR_INVALID;
    if (n == 0) return KVC_OK;
    blocks = kvc_ceil_div(n, 256);
    if (blocks > 65536) blocks = 65536; /* grid-stride beyond */
    kvc_kvm_sims_kernel<<<(unsigned)blocks, 256, 0, KVC_STREAM(stream)>>>(*p, n);
    KVC_CUDA_LAUNCHED();
    blocks = kvc_ceil_div(B * H, 128);
    if (blocks > 65536) blocks = 65536;
    kvc_kvm_runs_kernel<<<(unsigned)blocks, 128, 0, KVC_STREAM(stream)>>>(*p, B * H);
    KVC_CUDA_LAUNCHED();
    return KVC_OK;
}

static __global__ void __launch_bounds__(KVC_KVM_THREADS)
kvc_kvm_merge_kernel(const struct kvc_gauss_merge_params p)
{
    const int64_t H = p.keys.shape[1], T = p.keys.shape[2], C = p.centers.shape[2];
    const int64_t D = p.keys.shape[3], Dv = p.values.shape[3];
    const int64_t u = blockIdx.x / C, i = blockIdx.x % C, b = u / H, h = u % H;
    const int64_t *c = (const int64_t *)p.centers.data + kvc_at(p.centers, b, h, 0, 0);
    const int64_t cst = p.centers.strides[2];
    const int64_t *runs = (const int64_t *)p.runs.data + kvc_at(p.runs, b, h, 0, 0);
    const int64_t rst = p.runs.strides[2];
    const float *sc = (const float *)p.scores.data + kvc_at(p.scores, b, h, 0, 0);
    const float *cnt = p.counts.data ? (const float *)p.counts.data + kvc_at(p.counts, b, h, 0, 0) : NULL;
    const int64_t cnst = p.counts.strides[2];
    const struct kvc_view &k = p.keys;
    const float inv = 1.0f / (2.0f * p.sigma * p.sigma);
    const int64_t n = kvc_kvm_ncenters(c, cst, C);
    const int64_t j = i < n ? c[i * cst] : -1;
    const int64_t r = j >= 0 ? runs[j * rst] : -1;
    const int pivot = r >= 0 && kvc_kvm_pivot(c, cst, n, i, runs, rst, sc, p.scores.strides[2]) == i;
    const float cj = j >= 0 ? (cnt ? cnt[j * cnst] : 1.0f) : 0.0f;
    float W = cj, total = cj;
    int merged = 0;
    if (pivot) {
        /* pass 1: the weight sum and the count, every thread alike */
        for (int64_t t = r; t < T && runs[t * rst] == r; t++) {
            if (t == j || kvc_kvm_find(c, cst, n, t) >= 0) continue;
            W += kvc_kvm_weight(cnt ? cnt[t * cnst] : 1.0f,
                                kvc_kvm_sqdist(k.data, k.dtype, kvc_at(k, b, h, j, 0), kvc_at(k, b, h, t, 0),
                                               k.strides[3], D),
                                inv);
            total += cnt ? cnt[t * cnst] : 1.0f;
            merged = 1;
        }
    }
    /* pass 2: each thread its channels of the keys, then of the values */
    for (int64_t e = threadIdx.x; e < D + Dv; e += blockDim.x) {
        const struct kvc_view &x = e < D ? p.keys : p.values;
        const struct kvc_view &o = e < D ? p.out_keys : p.out_values;
        const int64_t d = e < D ? e : e - D;
        const int64_t dst = kvc_at(o, b, h, i, d);
        if (j < 0) {
            kvc_store_f32(o.data, o.dtype, dst, 0.0f);
        } else if (!merged) {
            kvc_store_f32(o.data, o.dtype, dst, kvc_load_f32(x.data, x.dtype, kvc_at(x, b, h, j, d)));
        } else {
            float acc = 0.0f;
            for (int64_t t = r; t < T && runs[t * rst] == r; t++) {
                float w;
                if (t == j) {
                    w = cj;
                } else {
                    if (kvc_kvm_find(c, cst, n, t) >= 0) continue;
                    w = kvc_kvm_weight(cnt ? cnt[t * cnst] : 1.0f,
                                       kvc_kvm_sqdist(k.data, k.dtype, kvc_at(k, b, h, j, 0), kvc_at(k, b, h, t, 0),
                                                      k.strides[3], D),
                                       inv);
                }
                acc += w * kvc_load_f32(x.data, x.dtype, kvc_at(x, b, h, t, d));
            }
            kvc_store_f32(o.data, o.dtype, dst, acc / W);
        }
    }
    if (threadIdx.x == 0) ((float *)p.out_counts.data)[kvc_at(p.out_counts, b, h, i, 0)] = total;
}

static __global__ void kvc_kvm_assign_kernel(const struct kvc_gauss_merge_params p, int64_t N)
{
    const int64_t H = p.keys.shape[1], T = p.keys.shape[2], C = p.centers.shape[2];
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < N; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t b = e / (H * T), h = (e / T) % H, t = e % T;
        const int64_t *c = (const int64_t *)p.centers.data + kvc_at(p.centers, b, h, 0, 0);
        const int64_t cst = p.centers.strides[2];
        const int64_t *runs = (const int64_t *)p.runs.data + kvc_at(p.runs, b, h, 0, 0);
        const int64_t rst = p.runs.strides[2];
        const float *sc = (const float *)p.scores.data + kvc_at(p.scores, b, h, 0, 0);
        const int64_t n = kvc_kvm_ncenters(c, cst, C);
        int64_t a = 0, ci;
        if (t < kvc_kvm_start(p.kv_start, p.kv_start_stride, b)) {
            a = -1;
        } else if ((ci = kvc_kvm_find(c, cst, n, t)) >= 0) {
            a = ci + 1;
        } else if (runs[t * rst] >= 0) {
            const int64_t r = runs[t * rst];
            int64_t l = 0, hi = n;
            while (l < hi) {
                const int64_t m = l + (hi - l) / 2;
                if (c[m * cst] < r) l = m + 1;
                else hi = m;
            }
            if (l < n && runs[c[l * cst] * rst] == r)
                a = kvc_kvm_pivot(c, cst, n, l, runs, rst, sc, p.scores.strides[2]) + 1;
        }
        ((int64_t *)p.assign.data)[kvc_at(p.assign, b, h, t, 0)] = a;
    }
}

extern "C" enum kvc_status kvc_cuda_gauss_merge(const struct kvc_gauss_merge_params *p, void *stream)
{
    const int64_t B = p->keys.shape[0], H = p->keys.shape[1], T = p->keys.shape[2], C = p->centers.shape[2];
    int64_t blocks;
    if (!(p->sigma > 0.0f)) return KVC_ERR_INVALID;
    if (B * H == 0) return KVC_OK;
    if (C > 0) {
        if (B * H > INT32_MAX / C) return KVC_ERR_UNSUPPORTED;
        kvc_kvm_merge_kernel<<<(unsigned)(B * H * C), KVC_KVM_THREADS, 0, KVC_STREAM(stream)>>>(*p);
        KVC_CUDA_LAUNCHED();
    }
    if (p->assign.data && T > 0) {
        blocks = kvc_ceil_div(B * H * T, 256);
        if (blocks > 65536) blocks = 65536; /* grid-stride beyond */
        kvc_kvm_assign_kernel<<<(unsigned)blocks, 256, 0, KVC_STREAM(stream)>>>(*p, B * H * T);
        KVC_CUDA_LAUNCHED();
    }
    return KVC_OK;
}
