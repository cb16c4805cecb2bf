/*
 * budget.cu - per-head budget allocation (budget.h) on the GPU.
 *
 * One block per batch row b over its H * T scores. Block reductions count
 * the selectable slots U_h; the layer-wide top N is found, as in budget.c,
 * by three radix passes (11, 11, 10 bits of the order key) with a shared
 * histogram, and only counted per head (ties at the threshold to the lower
 * heads). Steps 2-4, a small sequential problem over H heads, run on one
 * thread exactly as budget.c runs them, on per-row arrays in scratch.
 */
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "../budget_math.h"
#include "common.cuh"
#include "radix.cuh"

#define KVC_BUD_THREADS 512
#define KVC_BUD_BUCKETS 2048

typedef cub::BlockScan<uint32_t, KVC_BUD_THREADS> kvc_bud_scan;
typedef cub::BlockReduce<unsigned long long, KVC_BUD_THREADS> kvc_bud_reduce;

struct kvc_bud_smem {
    union {
        kvc_bud_scan::TempStorage scan;
        kvc_bud_reduce::TempStorage reduce;
    } tmp;
    uint32_t hist[KVC_BUD_BUCKETS];
    uint32_t digit; /* result of the bucket search of the current pass */
    int64_t rem;
    int64_t total_u;
};


static __global__ void __launch_bounds__(KVC_BUD_THREADS)
kvc_head_budgets_kernel(const struct kvc_head_budgets_params p, char *rows, size_t row_bytes,
                        int *nan_flag)
{
    __shared__ struct kvc_bud_smem sm;
    const int tid = threadIdx.x;
    const int64_t H = p.scores.shape[1], T = p.scores.shape[2];
    const int64_t b = blockIdx.x;
    const float *sc = (const float *)p.scores.data + b * p.scores.strides[0];
    const int64_t sh_ = p.scores.strides[1], st = p.scores.strides[2];
    const int64_t s = p.kv_start ? p.kv_start[b * p.kv_start_stride] : 0;
    const int64_t bud = p.budget < T ? p.budget : T;
    const int64_t lo_all = p.floor < T ? p.floor : T;
    int64_t *out = (int64_t *)p.out.data + b * p.out.strides[0];
    int64_t *mine = (int64_t *)(rows + (size_t)b * row_bytes);
    struct kvc_budget_row w;
    int64_t h, j, base, N;
    int nan = 0;
    kvc_budget_row_carve(&w, mine, H);

    /* 1. selectable counts (and the NaN check) */
    if (tid == 0) sm.total_u = 0;
    for (h = 0; h < H; h++) {
        unsigned long long u = 0, tot;
        for (j = tid; j < T; j += KVC_BUD_THREADS) {
            const float x = sc[h * sh_ + j * st];
            nan |= x != x;
            u += j >= s && x != -INFINITY;
        }
        tot = kvc_bud_reduce(sm.tmp.reduce).Sum(u);
        if (tid == 0) {
            w.U[h] = (int64_t)tot;
            sm.total_u += (int64_t)tot;
        }
        __syncthreads(); /* the reduction's storage is reused next head */
    }
    if (__syncthreads_or(nan)) {
        if (tid == 0) *nan_flag = 1;
        return;
    }
    N = H * bud < sm.total_u ? H * bud : sm.total_u;

    /* then the global top N, counted per head */
    if (N == sm.total_u) {
        if (tid == 0)
            for (h = 0; h < H; h++) w.n[h] = w.U[h];
    } else if (N == 0) {
        if (tid == 0)
            for (h = 0; h < H; h++) w.n[h] = 0;
    } else {
        uint32_t prefix = 0, mask = 0;
        int64_t rem = N;
        int pass;
        for (pass = 0; pass < 3; pass++) {
            const int sh = pass == 0 ? 21 : (pass == 1 ? 10 : 0);
            const uint32_t nb = pass == 2 ? 1024u : 2048u;
            uint32_t d;
            for (d = tid; d < nb; d += KVC_BUD_THREADS) sm.hist[d] = 0;
            __syncthreads();
            for (h = 0; h < H; h++)
                for (base = s; base < T; base += KVC_BUD_THREADS) {
                    int bucket = -1;
                    j = base + tid;
                    if (j < T) {
                        const float x = sc[h * sh_ + j * st];
                        const uint32_t key = kvc_f32_order_key(x);
                        if (x != -INFINITY && (key & mask) == prefix)
                            bucket = (int)((key >> sh) & (nb - 1));
                    }
                    kvc_radix_count(sm.hist, bucket);
                }
            __syncthreads();
            kvc_radix_bucket<KVC_BUD_THREADS>(sm.hist, nb, rem, sm.tmp.scan, &sm.digit, &sm.rem);
            __syncthreads();
            prefix |= sm.digit << sh;
            mask |= (nb - 1) << sh;
            rem = sm.rem;
            __syncthreads();
        }
        /* per head: keys above the threshold (high word) and at it (low) */
        for (h = 0; h < H; h++) {
            unsigned long long c = 0, tot;
            for (j = s + tid; j < T; j += KVC_BUD_THREADS) {
                const float x = sc[h * sh_ + j * st];
                const uint32_t key = kvc_f32_order_key(x);
                if (x == -INFINITY) continue;
                c += key > prefix ? 1ull << 32 : (key == prefix ? 1ull : 0ull);
            }
            tot = kvc_bud_reduce(sm.tmp.reduce).Sum(c);
            if (tid == 0) {
                w.gt[h] = (int64_t)(tot >> 32);
                w.eq[h] = (int64_t)(tot & 0xffffffffull);
            }
            __syncthreads();
        }
        if (tid == 0) {
            int64_t need = N;
            for (h = 0; h < H; h++) need -= w.gt[h];
            /* ties at the threshold: lower heads first */
            for (h = 0; h < H; h++) {
                const int64_t take = need < w.eq[h] ? need : w.eq[h];
                w.n[h] = w.gt[h] + take;
                need -= take;
            }
        }
    }
    if (tid == 0) kvc_budget_allocate(&w, H, bud, p.alpha, lo_all, out, p.out.strides[1]);
}

/* Slack to align the base, the NaN flag, then the per-row arrays. */
extern "C" size_t kvc_cuda_head_budgets_workspace(const struct kvc_head_budgets_params *p)
{
    const size_t row = kvc_align_up((size_t)KVC_BUDGET_ARRAYS * (size_t)p->scores.shape[1] * 8);
    return 2 * (size_t)KVC_ALIGN + (size_t)p->scores.shape[0] * row;
}

extern "C" enum kvc_status kvc_cuda_head_budgets(const struct kvc_head_budgets_params *p,
                                                 void *stream)
{
    const int64_t B = p->scores.shape[0], H = p->scores.shape[1], T = p->scores.shape[2];
    const size_t row = kvc_align_up((size_t)KVC_BUDGET_ARRAYS * (size_t)H * 8);
    char *cur;
    int *flag;
    int nan = 0;
    if (B == 0 || H == 0) return KVC_OK;
    if (p->budget < 0 || p->floor < 0 || !(p->alpha >= 0.0 && p->alpha <= 1.0))
        return KVC_ERR_INVALID;
    /* histogram and per-head counts are 32-bit; one block per row */
    if (H * T > (int64_t)UINT32_MAX || B > (int64_t)INT32_MAX) return KVC_ERR_UNSUPPORTED;
    if (p->scratch == NULL || p->scratch_bytes < kvc_cuda_head_budgets_workspace(p))
        return KVC_ERR_NOMEM;
    cur = (char *)(((uintptr_t)p->scratch + (KVC_ALIGN - 1)) & ~(uintptr_t)(KVC_ALIGN - 1));
    flag = (int *)cur;
    cur += KVC_ALIGN;
    KVC_CUDA_TRY(cudaMemsetAsync(flag, 0, sizeof *flag, KVC_STREAM(stream)));
    kvc_head_budgets_kernel<<<(unsigned)B, KVC_BUD_THREADS, 0, KVC_STREAM(stream)>>>(*p, cur, row,
                                                                                     flag);
    KVC_CUDA_LAUNCHED();
    KVC_CUDA_TRY(cudaMemcpyAsync(&nan, flag, sizeof nan, cudaMemcpyDeviceToHost,
                                 KVC_STREAM(stream)));
    KVC_CUDA_TRY(cudaStreamSynchronize(KVC_STREAM(stream)));
    return nan ? KVC_ERR_NAN : KVC_OK;
}
