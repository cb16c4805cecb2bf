/*
 * global.cu - the EMS global score (score_global.c) and the window scores
 * of SnapKV & co. (score.c, the same sum over the last Tq queries with a
 * fixed denominator) on the GPU.
 *
 * Two passes over the dot products instead of the CPU's logit rows, which
 * would cost O(Tq x T) memory here: pass 1 reduces every query row to its
 * softmax (max, 1/sum), pass 2 gives each thread one key and sums, over the
 * queries that see it, the probabilities rebuilt from the very same logits.
 * Every sum runs in an order fixed by the shapes: results are deterministic.
 */
#include <string.h>

#include "common.cuh"

#define KVC_GS_ROW_THREADS 256 /* pass 1: keys of a query tile in flight */
#define KVC_GS_COL_THREADS 128 /* pass 2: keys per block, one per thread */
/* Dynamic shared memory a launch may use without an opt-in attribute. */
#define KVC_GS_SMEM_MAX (49152 - 1024) /* less the static arrays */

/* Per query row: softmax max and 1/sum (0 for a row that sees no key). */
struct kvc_gs_row {
    float m, inv;
};

__device__ __forceinline__ int64_t kvc_gs_pos(const struct kvc_global_scores_params &p,
                                              int64_t i)
{
    return p.q_pos ? p.q_pos[i * p.q_pos_stride] : p.k.shape[2] - p.q.shape[2] + i;
}

/* First query in [0, Tq) whose position is >= x (Tq if none). */
__device__ int64_t kvc_gs_first_at(const struct kvc_global_scores_params &p, int64_t x)
{
    int64_t lo = 0, hi = p.q.shape[2];
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (kvc_gs_pos(p, mid) < x) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* Queries [i0, i0 + nq) of head (b, h) as fp32 rows of the shared tile, and
 * their positions; slots past nq get position -1 so they see no key. */
template <int QT>
__device__ void kvc_gs_load_tile(const struct kvc_global_scores_params &p, float *qs,
                                 int64_t *pos, int64_t b, int64_t h, int64_t i0, int64_t nq)
{
    const int64_t D = p.q.shape[3];
    for (int64_t e = threadIdx.x; e < QT * D; e += blockDim.x) {
        const int64_t ii = e / D, d = e % D;
        qs[e] = ii < nq ? kvc_load_f32(p.q.data, p.q.dtype, kvc_at(p.q, b, h, i0 + ii, d)) : 0.0f;
    }
    for (int ii = threadIdx.x; ii < QT; ii += blockDim.x)
        pos[ii] = ii < nq ? kvc_gs_pos(p, i0 + ii) : -1;
}

/* scaling * q_i.k_j for the tile's queries, summed over d in order as the
 * CPU does: both passes must produce the same bits for the max to hold. */
template <int QT>
__device__ __forceinline__ void kvc_gs_logits(const struct kvc_global_scores_params &p,
                                              const float *qs, int64_t b, int64_t hk, int64_t j,
                                              float (&acc)[QT])
{
    const int64_t D = p.q.shape[3], kd = p.k.strides[3];
    const int64_t base = kvc_at(p.k, b, hk, j, 0);
#pragma unroll
    for (int i = 0; i < QT; i++) acc[i] = 0.0f;
    for (int64_t d = 0; d < D; d++) {
        const float kv = kvc_load_f32(p.k.data, p.k.dtype, base + d * kd);
#pragma unroll
        for (int i = 0; i < QT; i++) acc[i] += qs[i * D + d] * kv;
    }
    /* rounded product, never fused into the caller's subtraction of the max */
#pragma unroll
    for (int i = 0; i < QT; i++) acc[i] = __fmul_rn(acc[i], p.scaling);
}

/* Pass 1: block (b, h, query tile); each thread keeps an online softmax
 * per query over its strided keys, then warps and warps' results merge in
 * a fixed tree. */
template <int QT>
static __global__ void __launch_bounds__(KVC_GS_ROW_THREADS)
kvc_gs_rows_kernel(const struct kvc_global_scores_params p, int64_t ntiles,
                   struct kvc_gs_row *rows)
{
    extern __shared__ float kvc_gs_smem[];
    __shared__ int64_t pos[QT];
    const int64_t Hq = p.q.shape[1], Tq = p.q.shape[2];
    const int64_t g = Hq / p.k.shape[1];
    const int64_t bh = blockIdx.x / ntiles, i0 = (blockIdx.x % ntiles) * QT;
    const int64_t b = bh / Hq, h = bh % Hq;
    const int64_t nq = Tq - i0 < QT ? Tq - i0 : QT;
    const int64_t s = p.kv_start ? p.kv_start[b * p.kv_start_stride] : 0;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    struct kvc_softmax_state st[QT];
    struct kvc_softmax_state *red = (struct kvc_softmax_state *)kvc_gs_smem;

    kvc_gs_load_tile<QT>(p, kvc_gs_smem, pos, b, h, i0, nq);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < QT; i++) kvc_softmax_init(&st[i]);
    /* positions increase, so the tile's last query sees the most keys */
    for (int64_t j = s + threadIdx.x; j <= pos[nq - 1]; j += blockDim.x) {
        float acc[QT];
        kvc_gs_logits<QT>(p, kvc_gs_smem, b, h / g, j, acc);
#pragma unroll
        for (int i = 0; i < QT; i++)
            if (pos[i] >= j) kvc_softmax_push(&st[i], acc[i]);
    }
#pragma unroll
    for (int i = 0; i < QT; i++)
        for (int off = 16; off > 0; off /= 2) {
            struct kvc_softmax_state o;
            o.m = __shfl_down_sync(0xffffffffu, st[i].m, off);
            o.s = __shfl_down_sync(0xffffffffu, st[i].s, off);
            st[i] = kvc_softmax_merge(st[i], o);
        }
    __syncthreads(); /* the tile is dead: its memory takes the warp results */
    if (lane == 0)
#pragma unroll
        for (int i = 0; i < QT; i++) red[warp * QT + i] = st[i];
    __syncthreads();
    if (threadIdx.x < nq) {
        struct kvc_softmax_state r = red[threadIdx.x];
        struct kvc_gs_row row;
        for (int w = 1; w < (int)(blockDim.x / 32); w++)
            r = kvc_softmax_merge(r, red[w * QT + threadIdx.x]);
        row.m = r.m;
        row.inv = r.s > 0.0f ? 1.0f / r.s : 0.0f;
        rows[bh * Tq + i0 + threadIdx.x] = row;
    }
}

/* Pass 2: block (b, kv head, key tile), one key per thread. For each query
 * head of the group, tiles of queries from the first that can see the
 * block's keys: per-tile sums, then tile sums in order (two levels keep the
 * error of thousands of queries small). */
template <int QT>
static __global__ void __launch_bounds__(KVC_GS_COL_THREADS)
kvc_gs_cols_kernel(const struct kvc_global_scores_params p, int64_t ntiles,
                   const struct kvc_gs_row *rows, int window)
{
    extern __shared__ float kvc_gs_smem[];
    __shared__ int64_t pos[QT];
    __shared__ struct kvc_gs_row rs[QT];
    const int64_t Hq = p.q.shape[1], Tq = p.q.shape[2], Hkv = p.k.shape[1], T = p.k.shape[2];
    const int64_t g = Hq / Hkv;
    const int64_t bk = blockIdx.x / ntiles, j0 = (blockIdx.x % ntiles) * KVC_GS_COL_THREADS;
    const int64_t b = bk / Hkv, hk = bk % Hkv;
    const int64_t j = j0 + threadIdx.x;
    const int64_t s = p.kv_start ? p.kv_start[b * p.kv_start_stride] : 0;
    const int64_t j1 = j0 + KVC_GS_COL_THREADS < T ? j0 + KVC_GS_COL_THREADS : T;
    const int64_t jlo = j0 > s ? j0 : s;
    /* block-uniform: no query before `first` sees a key of this block */
    const int64_t first = jlo < j1 ? kvc_gs_first_at(p, jlo) : Tq;
    const bool live = j >= s && j < T;
    float tot = 0.0f;

    for (int64_t hh = 0; hh < g; hh++) {
        const int64_t h = hk * g + hh;
        float hsum = 0.0f;
        for (int64_t i0 = first; i0 < Tq; i0 += QT) {
            const int64_t nq = Tq - i0 < QT ? Tq - i0 : QT;
            __syncthreads(); /* the previous tile is no longer read */
            kvc_gs_load_tile<QT>(p, kvc_gs_smem, pos, b, h, i0, nq);
            for (int ii = threadIdx.x; ii < nq; ii += blockDim.x)
                rs[ii] = rows[(b * Hq + h) * Tq + i0 + ii];
            __syncthreads();
            if (live && pos[nq - 1] >= j) {
                float acc[QT], part = 0.0f;
                kvc_gs_logits<QT>(p, kvc_gs_smem, b, hk, j, acc);
#pragma unroll
                for (int i = 0; i < QT; i++)
                    if (pos[i] >= j) part += kvc_expf(acc[i] - rs[i].m) * rs[i].inv;
                hsum += part;
            }
        }
        if (hh == 0) tot = hsum;
        else if (p.gqa == KVC_GQA_MAX) tot = hsum > tot ? hsum : tot;
        else tot += hsum;
    }
    if (j < T) {
        /* global: the queries that see key j, all at positions >= j (valid
         * when j >= s); window: every query counts, also those that see no
         * key (they add 0) */
        const int64_t cnt = !live ? 0 : window ? Tq : Tq - kvc_gs_first_at(p, j);
        float v = 0.0f;
        if (cnt > 0)
            v = tot / (p.gqa == KVC_GQA_MAX ? (float)cnt : (float)cnt * (float)g);
        ((float *)p.out.data)[kvc_at(p.out, b, hk, j, 0)] = v;
    }
}

/* Tq == 0: no query, every key scores 0 (as the CPU op). */
static __global__ void kvc_gs_zero_kernel(struct kvc_view out, int64_t n)
{
    const int64_t H = out.shape[1], T = out.shape[2];
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n;
         e += (int64_t)gridDim.x * blockDim.x)
        ((float *)out.data)[kvc_at(out, e / (H * T), (e / T) % H, e % T, 0)] = 0.0f;
}

static size_t kvc_gs_rows_bytes(const struct kvc_global_scores_params *p)
{
    return kvc_align_up((size_t)(p->q.shape[0] * p->q.shape[1] * p->q.shape[2]) *
                        sizeof(struct kvc_gs_row));
}

extern "C" size_t kvc_cuda_global_scores_workspace(const struct kvc_global_scores_params *p)
{
    /* slack to align a scratch pointer that is not already aligned */
    return KVC_ALIGN + kvc_gs_rows_bytes(p);
}

/* Shared bytes of a QT-query tile: q rows, then (pass 1) warp results. */
static size_t kvc_gs_smem_bytes(int qt, int64_t D)
{
    const size_t tile = (size_t)qt * (size_t)D * sizeof(float);
    const size_t red = (size_t)(KVC_GS_ROW_THREADS / 32) * (size_t)qt *
                       sizeof(struct kvc_softmax_state);
    return tile > red ? tile : red;
}

template <int QT>
static enum kvc_status kvc_gs_launch(const struct kvc_global_scores_params *p,
                                     struct kvc_gs_row *rows, int window, cudaStream_t st)
{
    const int64_t B = p->q.shape[0], Hq = p->q.shape[1], Tq = p->q.shape[2];
    const int64_t Hkv = p->k.shape[1], T = p->k.shape[2];
    const int64_t qtiles = kvc_ceil_div(Tq, QT), ktiles = kvc_ceil_div(T, KVC_GS_COL_THREADS);
    const size_t smem = kvc_gs_smem_bytes(QT, p->q.shape[3]);
    if (B * Hq * qtiles > INT32_MAX || B * Hkv * ktiles > INT32_MAX) return KVC_ERR_UNSUPPORTED;
    kvc_gs_rows_kernel<QT><<<(unsigned)(B * Hq * qtiles), KVC_GS_ROW_THREADS, smem, st>>>(
        *p, qtiles, rows);
    KVC_CUDA_LAUNCHED();
    kvc_gs_cols_kernel<QT><<<(unsigned)(B * Hkv * ktiles), KVC_GS_COL_THREADS, smem, st>>>(
        *p, ktiles, rows, window);
    KVC_CUDA_LAUNCHED();
    return KVC_OK;
}

static enum kvc_status kvc_gs_run(const struct kvc_global_scores_params *p, int window,
                                  void *stream)
{
    const int64_t B = p->q.shape[0], Hq = p->q.shape[1], Tq = p->q.shape[2], D = p->q.shape[3];
    const int64_t Hkv = p->k.shape[1], T = p->k.shape[2];
    cudaStream_t st = KVC_STREAM(stream);
    struct kvc_gs_row *rows;
    if (B == 0 || Hkv == 0 || T == 0 || Hq == 0) return KVC_OK;
    if (Tq == 0) {
        const int64_t n = B * Hkv * T;
        const int64_t blocks = kvc_ceil_div(n, 256) < 4096 ? kvc_ceil_div(n, 256) : 4096;
        kvc_gs_zero_kernel<<<(unsigned)blocks, 256, 0, st>>>(p->out, n);
        KVC_CUDA_LAUNCHED();
        return KVC_OK;
    }
    if (p->scratch == NULL || p->scratch_bytes < kvc_cuda_global_scores_workspace(p))
        return KVC_ERR_NOMEM;
    rows = (struct kvc_gs_row *)(((uintptr_t)p->scratch + (KVC_ALIGN - 1)) &
                                 ~(uintptr_t)(KVC_ALIGN - 1));
    /* wide heads take narrower query tiles to stay in default shared memory */
    if (kvc_gs_smem_bytes(32, D) <= KVC_GS_SMEM_MAX) return kvc_gs_launch<32>(p, rows, window, st);
    if (kvc_gs_smem_bytes(8, D) <= KVC_GS_SMEM_MAX) return kvc_gs_launch<8>(p, rows, window, st);
    return KVC_ERR_UNSUPPORTED;
}

extern "C" enum kvc_status kvc_cuda_global_scores(const struct kvc_global_scores_params *p,
                                                  void *stream)
{
    return kvc_gs_run(p, 0, stream);
}

/* Window scores are the global score of the last Tq positions with every
 * query in the denominator: the same two passes. */
static struct kvc_global_scores_params kvc_gs_from_window(const struct kvc_window_scores_params *p)
{
    struct kvc_global_scores_params g;
    memset(&g, 0, sizeof g);
    g.q = p->q;
    g.k = p->k;
    g.out = p->out;
    g.kv_start = p->kv_start;
    g.kv_start_stride = p->kv_start_stride;
    g.scaling = p->scaling;
    g.gqa = p->gqa;
    g.scratch = p->scratch;
    g.scratch_bytes = p->scratch_bytes;
    return g;
}

extern "C" size_t kvc_cuda_window_scores_workspace(const struct kvc_window_scores_params *p)
{
    const struct kvc_global_scores_params g = kvc_gs_from_window(p);
    return kvc_cuda_global_scores_workspace(&g);
}

extern "C" enum kvc_status kvc_cuda_window_scores(const struct kvc_window_scores_params *p,
                                                  void *stream)
{
    const struct kvc_global_scores_params g = kvc_gs_from_window(p);
    return kvc_gs_run(&g, 1, stream);
}
