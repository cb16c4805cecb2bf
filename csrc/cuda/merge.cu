/*
 * merge.cu - evict-then-merge with the zero class (CUDA mirror of merge.c).
 *
 * Four launches, no float atomics, so results are deterministic:
 *   1. norms:      |k_j| of every token, warp per token, and the number of
 *                  centers per head;
 *   2. similarity: best cosine and its center per candidate, a tiled
 *                  unit-key x unit-center product with a running argmax
 *                  (no T x C matrix);
 *   3. classes:    block per head: tau (given or the mean best cosine, a
 *                  fixed-order tree in double), final classes, per-center
 *                  member counts and first member, the assign output;
 *   4. merge:      warp per (head, center): scans its members in ascending
 *                  token order (ballots over the class row), lanes own
 *                  dimensions, then stores exactly as merge.c does.
 * The per-row arithmetic follows the CPU op operation for operation: the
 * similarity phase fuses multiply-adds like the CPU's FMA clones (x86-64-v3
 * and v4; the baseline clone rounds every product, so its classes may differ
 * where fp32 cannot decide, see tests/test_cuda.py), the other
 * phases round every product like the CPU baseline build, and the 16-lane
 * reduction order of kvc_dot_f32 is kept. Only the double sum of the
 * adaptive tau is ordered differently.
 */
#include <stdint.h>

#include "../merge_math.h"
#include "common.cuh"

#define KVC_MG_FULL 0xffffffffu
/* Largest D and Dv of the merge kernel: lanes keep rows in registers. */
#define KVC_MG_REG 16
#define KVC_MG_MAXD (32 * KVC_MG_REG)
/* Similarity tile: tokens x centers x dimensions per shared-memory stage,
 * 256 threads each owning 4 x 4 dot products. */
#define KVC_MG_TM 64
#define KVC_MG_TN 64
#define KVC_MG_TK 16
#define KVC_MG_PAD 4
KVC_STATIC_ASSERT(KVC_MG_TM == KVC_MG_TN, "one load loop fills both tiles");
#define KVC_MG_CLASS_THREADS 512
/* Marks in the class row before the classes are final. */
#define KVC_MG_CENTER (-2)

struct kvc_mg_ws {
    float *nrm;     /* [BH][Tp] |k_j|, products rounded (CPU baseline) */
    float *nrm_fma; /* [BH][Tp] |k_j| with fused multiply-adds (CPU clone) */
    float *best;    /* [BH][Tp] best cosine of each candidate */
    int32_t *cls;   /* [BH][Tp] best center, then the final class */
    int32_t *first; /* [BH][C] lowest member token of each center */
    int32_t *cnt;   /* [BH][C] members of each center */
    int32_t *nc;    /* [BH] valid centers */
    int64_t Tp;
};

struct kvc_mg_geom {
    int64_t B, H, T, C, D, Dv, BH, Tp;
};

static void kvc_mg_geometry(const struct kvc_evict_merge_params *p, struct kvc_mg_geom *g)
{
    g->B = p->keys.shape[0];
    g->H = p->keys.shape[1];
    g->T = p->keys.shape[2];
    g->D = p->keys.shape[3];
    g->Dv = p->values.shape[3];
    g->C = p->centers.shape[2];
    g->BH = g->B * g->H;
    g->Tp = kvc_ceil_div(g->T, 32) * 32; /* rows start on 128-byte lines */
}

static size_t kvc_mg_ws_bytes(const struct kvc_mg_geom *g)
{
    const size_t row = (size_t)(g->BH * g->Tp) * 4, cen = (size_t)(g->BH * g->C) * 4;
    return 4 * kvc_align_up(row) + 2 * kvc_align_up(cen) + kvc_align_up((size_t)g->BH * 4);
}

static struct kvc_mg_ws kvc_mg_carve_ws(const struct kvc_mg_geom *g, void *scratch)
{
    char *cur = (char *)kvc_align_up((size_t)(uintptr_t)scratch);
    const size_t row = (size_t)(g->BH * g->Tp) * 4, cen = (size_t)(g->BH * g->C) * 4;
    struct kvc_mg_ws ws;
    ws.nrm = (float *)kvc_carve(&cur, row);
    ws.nrm_fma = (float *)kvc_carve(&cur, row);
    ws.best = (float *)kvc_carve(&cur, row);
    ws.cls = (int32_t *)kvc_carve(&cur, row);
    ws.first = (int32_t *)kvc_carve(&cur, cen);
    ws.cnt = (int32_t *)kvc_carve(&cur, cen);
    ws.nc = (int32_t *)kvc_carve(&cur, (size_t)g->BH * 4);
    ws.Tp = g->Tp;
    return ws;
}

static __device__ __forceinline__ int64_t kvc_mg_start(const struct kvc_evict_merge_params &p,
                                                       int64_t b)
{
    return p.kv_start ? p.kv_start[b * p.kv_start_stride] : 0;
}

static __device__ __forceinline__ int64_t kvc_mg_center(const struct kvc_evict_merge_params &p,
                                                        int64_t b, int64_t h, int64_t i)
{
    return ((const int64_t *)p.centers.data)[kvc_at(p.centers, b, h, i, 0)];
}

static __device__ __forceinline__ float kvc_mg_key(const struct kvc_evict_merge_params &p,
                                                   int64_t b, int64_t h, int64_t t, int64_t d)
{
    return kvc_load_f32(p.keys.data, p.keys.dtype, kvc_at(p.keys, b, h, t, d));
}

/* x / |k| as kvc_merge_unit: a row whose norm is not positive stays as is. */
static __device__ __forceinline__ float kvc_mg_unit(float x, float nrm)
{
    return nrm > 0.0f ? __fdiv_rn(x, nrm) : x;
}

/* kvc_lanes_sum over lanes 0..15 (lane l holds the CPU's acc[l]): the same
 * pairwise tree, the result on every lane. */
static __device__ __forceinline__ float kvc_mg_lanes_sum(float acc)
{
    acc = __fadd_rn(acc, __shfl_down_sync(KVC_MG_FULL, acc, 8));
    acc = __fadd_rn(acc, __shfl_down_sync(KVC_MG_FULL, acc, 4));
    acc = __fadd_rn(acc, __shfl_down_sync(KVC_MG_FULL, acc, 2));
    acc = __fadd_rn(acc, __shfl_down_sync(KVC_MG_FULL, acc, 1));
    return __shfl_sync(KVC_MG_FULL, acc, 0);
}

/* Stores the row's 16-bit or 32-bit patterns unchanged (src NULL: zeros). */
static __device__ void kvc_mg_copy_row(const struct kvc_view &dst, const struct kvc_view *src,
                                       int64_t b, int64_t h, int64_t i, int64_t t, int64_t n,
                                       int lane)
{
    int64_t d;
    for (d = lane; d < n; d += 32) {
        const int64_t o = kvc_at(dst, b, h, i, d);
        const int64_t q = src ? kvc_at(*src, b, h, t, d) : 0;
        if (dst.dtype == KVC_F32)
            ((uint32_t *)dst.data)[o] = src ? ((const uint32_t *)src->data)[q] : 0u;
        else
            ((uint16_t *)dst.data)[o] = src ? ((const uint16_t *)src->data)[q] : (uint16_t)0;
    }
}

/* 1. Warp per token: both norms of k_j. Lane l < 16 is the CPU's lane l,
 * which sums dims l and l + 16 of every 32-dim slab in turn. */
static __global__ void __launch_bounds__(256)
    kvc_mg_norms_kernel(const struct kvc_evict_merge_params p, const struct kvc_mg_ws ws,
                        int64_t chunks)
{
    const int64_t H = p.keys.shape[1], T = p.keys.shape[2], D = p.keys.shape[3];
    const int64_t C = p.centers.shape[2];
    const int64_t u = blockIdx.x / chunks, b = u / H, h = u % H;
    const int64_t j = (blockIdx.x % chunks) * 8 + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    float pn = 0.0f, pf = 0.0f;
    int64_t d0;
    if (blockIdx.x % chunks == 0 && threadIdx.x == 0) {
        /* centers are a non-negative prefix followed by -1 padding */
        int64_t lo = 0, hi = C;
        while (lo < hi) {
            const int64_t mid = (lo + hi) / 2;
            if (kvc_mg_center(p, b, h, mid) >= 0) lo = mid + 1;
            else hi = mid;
        }
        ws.nc[u] = (int32_t)lo;
    }
    if (j >= T) return;
    for (d0 = 0; d0 < D; d0 += 32) {
        const float x = d0 + lane < D ? kvc_mg_key(p, b, h, j, d0 + lane) : 0.0f;
        const float xo = __shfl_down_sync(KVC_MG_FULL, x, 16);
        pn = __fadd_rn(__fadd_rn(pn, __fmul_rn(x, x)), __fmul_rn(xo, xo));
        pf = fmaf(xo, xo, fmaf(x, x, pf));
    }
    pn = kvc_mg_lanes_sum(pn);
    pf = kvc_mg_lanes_sum(pf);
    if (lane == 0) {
        ws.nrm[u * ws.Tp + j] = __fsqrt_rn(pn);
        ws.nrm_fma[u * ws.Tp + j] = __fsqrt_rn(pf);
    }
}

/* 2. Block per tile of KVC_MG_TM tokens: every dot product is one chain of
 * fused multiply-adds in ascending dimension, like the CPU's mg_tile; each
 * thread keeps the first maximum over its centers, then the 16 threads of
 * a token row merge theirs, ties to the lowest center. */
static __global__ void __launch_bounds__(256)
    kvc_mg_similarity_kernel(const struct kvc_evict_merge_params p, const struct kvc_mg_ws ws,
                             int64_t tiles)
{
    __shared__ __align__(16) float tk[KVC_MG_TK][KVC_MG_TM + KVC_MG_PAD];
    __shared__ __align__(16) float ck[KVC_MG_TK][KVC_MG_TN + KVC_MG_PAD];
    __shared__ float tnrm[KVC_MG_TM], cnrm[KVC_MG_TN];
    __shared__ int64_t ctok[KVC_MG_TN];
    const int64_t H = p.keys.shape[1], T = p.keys.shape[2], D = p.keys.shape[3];
    const int64_t u = blockIdx.x / tiles, t0 = (blockIdx.x % tiles) * KVC_MG_TM;
    const int64_t b = u / H, h = u % H, s = kvc_mg_start(p, b);
    const int nc = ws.nc[u], tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const float *nrm = ws.nrm + u * ws.Tp, *nrmf = ws.nrm_fma + u * ws.Tp;
    float bv[4];
    int32_t bi[4];
    int c0, i, c, k, o;
    int64_t d0;
    if (t0 + KVC_MG_TM <= s) return;
    /* candidates are normalised inside the CPU's FMA clone, centers outside */
    if (tid < KVC_MG_TM) tnrm[tid] = t0 + tid < T ? nrmf[t0 + tid] : 0.0f;
    for (i = 0; i < 4; i++) {
        bv[i] = -INFINITY;
        bi[i] = 0;
    }
    for (c0 = 0; c0 < nc; c0 += KVC_MG_TN) {
        float acc[4][4];
        for (i = 0; i < 4; i++)
            for (c = 0; c < 4; c++) acc[i][c] = 0.0f;
        __syncthreads();
        if (tid < KVC_MG_TN) {
            const int64_t t = c0 + tid < nc ? kvc_mg_center(p, b, h, c0 + tid) : -1;
            ctok[tid] = t;
            cnrm[tid] = t >= 0 ? nrm[t] : 0.0f;
        }
        for (d0 = 0; d0 < D; d0 += KVC_MG_TK) {
            int e;
            __syncthreads();
            for (e = tid; e < KVC_MG_TK * KVC_MG_TM; e += blockDim.x) {
                const int r = e / KVC_MG_TK, kk = e % KVC_MG_TK;
                const int64_t d = d0 + kk, j = t0 + r, t = ctok[r];
                float x = 0.0f, y = 0.0f;
                if (j < T && d < D) x = kvc_mg_unit(kvc_mg_key(p, b, h, j, d), tnrm[r]);
                if (t >= 0 && d < D) y = kvc_mg_unit(kvc_mg_key(p, b, h, t, d), cnrm[r]);
                tk[kk][r] = x;
                ck[kk][r] = y;
            }
            __syncthreads();
#pragma unroll
            for (k = 0; k < KVC_MG_TK; k++) {
                const float4 a = *(const float4 *)&tk[k][ty * 4];
                const float4 q = *(const float4 *)&ck[k][tx * 4];
                const float av[4] = {a.x, a.y, a.z, a.w}, qv[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
                for (i = 0; i < 4; i++)
#pragma unroll
                    for (c = 0; c < 4; c++) acc[i][c] = fmaf(av[i], qv[c], acc[i][c]);
            }
        }
        for (c = 0; c < 4; c++) {
            const int ci = c0 + tx * 4 + c;
            if (ci >= nc) break;
            for (i = 0; i < 4; i++) {
                /* + 0: the CPU's bias, which turns -0 into +0 */
                const float sv = acc[i][c] + 0.0f;
                if (sv > bv[i]) {
                    bv[i] = sv;
                    bi[i] = ci;
                }
            }
        }
    }
    for (o = 8; o > 0; o >>= 1)
        for (i = 0; i < 4; i++) {
            const float v = __shfl_xor_sync(KVC_MG_FULL, bv[i], o);
            const int32_t ci = __shfl_xor_sync(KVC_MG_FULL, bi[i], o);
            if (v > bv[i] || (v == bv[i] && ci < bi[i])) {
                bv[i] = v;
                bi[i] = ci;
            }
        }
    if (tx == 0)
        for (i = 0; i < 4; i++) {
            const int64_t j = t0 + ty * 4 + i;
            if (j >= s && j < T) {
                ws.best[u * ws.Tp + j] = bv[i];
                ws.cls[u * ws.Tp + j] = bi[i];
            }
        }
}

/* 3. Block per head: tau, final classes (-1 before kv_start, 0 evicted,
 * i + 1 merged into center i; centers keep their mark), member counts and
 * first members (integer atomics: order independent), assign. */
static __global__ void __launch_bounds__(KVC_MG_CLASS_THREADS)
    kvc_mg_classes_kernel(const struct kvc_evict_merge_params p, const struct kvc_mg_ws ws)
{
    __shared__ double rsum[KVC_MG_CLASS_THREADS];
    __shared__ int64_t rcnt[KVC_MG_CLASS_THREADS];
    const int64_t H = p.keys.shape[1], T = p.keys.shape[2], C = p.centers.shape[2];
    const int64_t u = blockIdx.x, b = u / H, h = u % H, s = kvc_mg_start(p, b);
    const int nc = ws.nc[u], tid = threadIdx.x;
    int32_t *cls = ws.cls + u * ws.Tp, *first = ws.first + u * C, *cnt = ws.cnt + u * C;
    const float *best = ws.best + u * ws.Tp;
    float tau = ((const float *)p.tau.data)[kvc_at(p.tau, b, h, 0, 0)];
    int64_t j;
    int i, w;
    for (i = tid; i < nc; i += blockDim.x) {
        cls[kvc_mg_center(p, b, h, i)] = KVC_MG_CENTER;
        first[i] = INT32_MAX;
        cnt[i] = 0;
    }
    __syncthreads();
    if (tau != tau) {
        double sum = 0.0;
        int64_t n = 0;
        if (nc > 0)
            for (j = s + tid; j < T; j += blockDim.x)
                if (cls[j] >= 0) {
                    sum += (double)best[j];
                    n++;
                }
        rsum[tid] = sum;
        rcnt[tid] = n;
        for (w = blockDim.x / 2; w > 0; w >>= 1) {
            __syncthreads();
            if (tid < w) {
                rsum[tid] += rsum[tid + w];
                rcnt[tid] += rcnt[tid + w];
            }
        }
        __syncthreads();
        tau = rcnt[0] > 0 ? (float)(rsum[0] / (double)rcnt[0]) : NAN;
    }
    if (tid == 0) ((float *)p.tau_used.data)[kvc_at(p.tau_used, b, h, 0, 0)] = tau;
    for (j = tid; j < T; j += blockDim.x) {
        int32_t k = -1;
        if (j >= s) {
            if (cls[j] == KVC_MG_CENTER) continue; /* assign written by the merge */
            /* NaN cosines never win the argmax: all-NaN tokens have -inf */
            k = nc > 0 && best[j] >= tau ? cls[j] + 1 : 0;
            if (k > 0) {
                atomicAdd(&cnt[k - 1], 1);
                atomicMin(&first[k - 1], (int32_t)j);
            }
        }
        cls[j] = k;
        if (p.assign.data) ((int64_t *)p.assign.data)[kvc_at(p.assign, b, h, j, 0)] = k;
    }
}

/* 4. Warp per (head, center): fp32 sums in ascending token order with every
 * product rounded, as merge.c's baseline build; lane l owns dims l + 32 r. */
static __global__ void __launch_bounds__(256)
    kvc_mg_merge_kernel(const struct kvc_evict_merge_params p, const struct kvc_mg_ws ws,
                        int64_t chunks)
{
    const int64_t H = p.keys.shape[1], T = p.keys.shape[2], D = p.keys.shape[3];
    const int64_t Dv = p.values.shape[3], C = p.centers.shape[2];
    const int64_t u = blockIdx.x / chunks, b = u / H, h = u % H;
    const int64_t i = (blockIdx.x % chunks) * 8 + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    const float *sc = (const float *)p.scores.data;
    const float *nrm = ws.nrm + u * ws.Tp;
    float *os;
    int64_t ci, t = 0;
    float ak[KVC_MG_REG], av[KVC_MG_REG], w, cn = 0.0f, acc;
    int32_t m, seen = 0;
    int r;
    if (i >= C) return;
    os = (float *)p.out_scores.data + kvc_at(p.out_scores, b, h, i, 0);
    ci = kvc_at(p.counts, b, h, i, 0);
    if (i >= ws.nc[u]) {
        kvc_mg_copy_row(p.out_keys, NULL, b, h, i, 0, D, lane);
        kvc_mg_copy_row(p.out_values, NULL, b, h, i, 0, Dv, lane);
        m = -1; /* counts 0 */
        w = 0.0f;
    } else {
        t = kvc_mg_center(p, b, h, i);
        cn = nrm[t];
        w = sc[kvc_at(p.scores, b, h, t, 0)];
        m = ws.cnt[u * C + i];
#pragma unroll
        for (r = 0; r < KVC_MG_REG; r++) {
            const int64_t d = lane + 32 * r;
            ak[r] = d < D ? __fmul_rn(kvc_mg_unit(kvc_mg_key(p, b, h, t, d), cn), w) : 0.0f;
            av[r] = d < Dv ? __fmul_rn(kvc_load_f32(p.values.data, p.values.dtype,
                                                    kvc_at(p.values, b, h, t, d)), w)
                           : 0.0f;
        }
        if (m > 0) {
            const int32_t *cls = ws.cls + u * ws.Tp, want = (int32_t)i + 1;
            int64_t base;
            for (base = ws.first[u * C + i] & ~31; seen < m; base += 128) {
                int32_t v[4];
                int q;
#pragma unroll
                for (q = 0; q < 4; q++) {
                    const int64_t j = base + 32 * q + lane;
                    v[q] = j < T ? cls[j] : -1;
                }
#pragma unroll
                for (q = 0; q < 4; q++) {
                    unsigned mask = __ballot_sync(KVC_MG_FULL, v[q] == want);
                    while (mask) {
                        const int64_t j = base + 32 * q + __ffs(mask) - 1;
                        const float sj = sc[kvc_at(p.scores, b, h, j, 0)], nj = nrm[j];
                        mask &= mask - 1;
#pragma unroll
                        for (r = 0; r < KVC_MG_REG; r++) {
                            const int64_t d = lane + 32 * r;
                            if (d < D) {
                                const float x = kvc_mg_unit(kvc_mg_key(p, b, h, j, d), nj);
                                ak[r] = __fadd_rn(ak[r], __fmul_rn(sj, x));
                            }
                            if (d < Dv) {
                                const float x = kvc_load_f32(p.values.data, p.values.dtype,
                                                             kvc_at(p.values, b, h, j, d));
                                av[r] = __fadd_rn(av[r], __fmul_rn(sj, x));
                            }
                        }
                        w = __fadd_rn(w, sj);
                        seen++;
                    }
                }
            }
        }
        if (lane == 0 && p.assign.data)
            ((int64_t *)p.assign.data)[kvc_at(p.assign, b, h, t, 0)] = i + 1;
    }
    if (lane == 0) {
        *os = w;
        if (p.counts.dtype == KVC_I32) ((int32_t *)p.counts.data)[ci] = 1 + m;
        else ((float *)p.counts.data)[ci] = (float)(1 + m);
    }
    if (m < 0) return;
    if (m == 0 || !(w > 0.0f)) {
        kvc_mg_copy_row(p.out_keys, &p.keys, b, h, i, t, D, lane);
        kvc_mg_copy_row(p.out_values, &p.values, b, h, i, t, Dv, lane);
        return;
    }
#pragma unroll
    for (r = 0; r < KVC_MG_REG; r++) {
        const int64_t d = lane + 32 * r;
        if (d < Dv)
            kvc_store_f32(p.out_values.data, p.out_values.dtype, kvc_at(p.out_values, b, h, i, d),
                          __fdiv_rn(av[r], w));
    }
    /* kvc_merge_key_rescale: |acc| in kvc_dot_f32's lane order */
    acc = 0.0f;
#pragma unroll
    for (r = 0; r < KVC_MG_REG; r++) {
        const float xo = __shfl_down_sync(KVC_MG_FULL, ak[r], 16);
        acc = __fadd_rn(__fadd_rn(acc, __fmul_rn(ak[r], ak[r])), __fmul_rn(xo, xo));
    }
    acc = __fsqrt_rn(kvc_mg_lanes_sum(acc));
    if (!(acc > __fmul_rn(KVC_MERGE_DIR_EPS, w)) || !(cn > 0.0f)) {
        kvc_mg_copy_row(p.out_keys, &p.keys, b, h, i, t, D, lane);
        return;
    }
    acc = __fdiv_rn(cn, acc);
#pragma unroll
    for (r = 0; r < KVC_MG_REG; r++) {
        const int64_t d = lane + 32 * r;
        if (d < D)
            kvc_store_f32(p.out_keys.data, p.out_keys.dtype, kvc_at(p.out_keys, b, h, i, d),
                          __fmul_rn(ak[r], acc));
    }
}

extern "C" size_t kvc_cuda_evict_merge_workspace(const struct kvc_evict_merge_params *p)
{
    struct kvc_mg_geom g;
    kvc_mg_geometry(p, &g);
    return KVC_ALIGN + kvc_mg_ws_bytes(&g);
}

extern "C" enum kvc_status kvc_cuda_evict_merge(const struct kvc_evict_merge_params *p,
                                                void *stream)
{
    struct kvc_mg_geom g;
    struct kvc_mg_ws ws;
    int64_t chunks;
    kvc_mg_geometry(p, &g);
    if (g.BH == 0) return KVC_OK;
    if (g.D > KVC_MG_MAXD || g.Dv > KVC_MG_MAXD) return KVC_ERR_UNSUPPORTED;
    if (p->scratch == NULL || p->scratch_bytes < kvc_cuda_evict_merge_workspace(p))
        return KVC_ERR_NOMEM;
    /* one-dimensional grids: gridDim.x holds 2^31 - 1 blocks */
    if (g.BH * kvc_ceil_div(g.T > g.C ? g.T : g.C, 8) > INT32_MAX) return KVC_ERR_UNSUPPORTED;
    ws = kvc_mg_carve_ws(&g, p->scratch);

    /* at least one block per head: it also counts the head's centers */
    chunks = g.T > 0 ? kvc_ceil_div(g.T, 8) : 1;
    kvc_mg_norms_kernel<<<(unsigned)(g.BH * chunks), 256, 0, KVC_STREAM(stream)>>>(*p, ws,
                                                                                  chunks);
    KVC_CUDA_LAUNCHED();
    if (g.T > 0) {
        chunks = kvc_ceil_div(g.T, KVC_MG_TM);
        kvc_mg_similarity_kernel<<<(unsigned)(g.BH * chunks), 256, 0, KVC_STREAM(stream)>>>(
            *p, ws, chunks);
        KVC_CUDA_LAUNCHED();
    }
    kvc_mg_classes_kernel<<<(unsigned)g.BH, KVC_MG_CLASS_THREADS, 0, KVC_STREAM(stream)>>>(*p,
                                                                                         ws);
    KVC_CUDA_LAUNCHED();
    if (g.C > 0) {
        chunks = kvc_ceil_div(g.C, 8);
        kvc_mg_merge_kernel<<<(unsigned)(g.BH * chunks), 256, 0, KVC_STREAM(stream)>>>(*p, ws,
                                                                                      chunks);
        KVC_CUDA_LAUNCHED();
    }
    return KVC_OK;
}
