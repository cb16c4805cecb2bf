/*
 * select.cu - per-head top-k with forced keeps (select.h) on the GPU.
 *
 * One block per (b, h) row, the row staying in global memory (T may be
 * large). The same three radix passes as select.c (11, 11, 10 bits of the
 * order key) find the threshold key and how many ties at it to take, each
 * pass building a shared histogram; one more sweep emits the kept indices in
 * ascending order. It counts kept tokens and threshold ties with a single
 * prefix scan, so the ties taken are the lowest-indexed ones and every index
 * equals the CPU op's. The only scratch is the NaN flag the launcher reads
 * back.
 */
#include <cub/block/block_scan.cuh>

#include "common.cuh"
#include "radix.cuh"

#define KVC_SEL_THREADS 512
#define KVC_SEL_ITEMS 4 /* consecutive tokens per thread in the emit sweep */
#define KVC_SEL_BUCKETS 2048
#define KVC_SEL_DEF (1ull << 32) /* emit-scan unit of a token kept outright */
#define KVC_SEL_TIE 1ull         /* emit-scan unit of a tie at the threshold */

typedef cub::BlockScan<uint32_t, KVC_SEL_THREADS> kvc_sel_scan32;
typedef cub::BlockScan<unsigned long long, KVC_SEL_THREADS> kvc_sel_scan64;

struct kvc_sel_smem {
    union {
        kvc_sel_scan32::TempStorage s32;
        kvc_sel_scan64::TempStorage s64;
    } scan;
    uint32_t hist[KVC_SEL_BUCKETS];
    uint32_t digit; /* result of the bucket search of the current pass */
    int64_t rem;
};

static __global__ void __launch_bounds__(KVC_SEL_THREADS)
kvc_select_topk_kernel(const struct kvc_select_topk_params p, int *nan_flag)
{
    __shared__ struct kvc_sel_smem sm;
    const int tid = threadIdx.x;
    const int64_t H = p.scores.shape[1], T = p.scores.shape[2], kmax = p.out.shape[2];
    const int64_t b = blockIdx.x / H, h = blockIdx.x % H;
    const float *sc = (const float *)p.scores.data + kvc_at(p.scores, b, h, 0, 0);
    const int64_t st = p.scores.strides[2];
    int64_t *out = (int64_t *)p.out.data + kvc_at(p.out, b, h, 0, 0);
    const int64_t os = p.out.strides[2];
    const int64_t k = p.k.data ? kvc_load_index(p.k.data, p.k.dtype, kvc_at(p.k, b, h, 0, 0))
                               : p.k_all;
    const int64_t s = p.kv_start ? p.kv_start[b * p.kv_start_stride] : 0;
    /* as select.c: forced [s, se) and [ws, T); valid candidates [se, ve);
     * padded [0, pe) */
    const int64_t se = s + p.sinks < T ? s + p.sinks : T;
    const int64_t ws = T - p.window > 0 ? T - p.window : 0;
    const int64_t ve = se > ws ? se : ws;
    const int64_t pe = s < ws ? s : ws;
    /* kvc_select_forced_count, which is host-only: sinks + window - overlap */
    const int64_t olap = se > (s > ws ? s : ws) ? se - (s > ws ? s : ws) : 0;
    const int64_t r = k - ((se - s) + (T - ws) - olap);
    /* once r covers every valid candidate the threshold is searched among
     * the padded ones: the "active" class, the only one with ties */
    const bool take_all_v = r >= ve - se;
    const int64_t lo = take_all_v ? 0 : se, hi = take_all_v ? pe : ve;
    const int64_t want = take_all_v ? r - (ve - se) : r;
    const int64_t chunk = (int64_t)KVC_SEL_THREADS * KVC_SEL_ITEMS;
    uint32_t prefix = 0, mask = 0, thr = UINT32_MAX;
    int64_t need = 0, n, base;
    unsigned long long carry = 0;
    int pass, nan = 0;

    for (pass = 0; pass < 3; pass++) {
        const int sh = pass == 0 ? 21 : (pass == 1 ? 10 : 0);
        const uint32_t nb = pass == 2 ? 1024u : 2048u;
        /* pass 0 also sweeps the whole row for NaN */
        const int64_t a = pass == 0 ? 0 : lo, e = pass == 0 ? T : hi;
        uint32_t d;
        for (d = tid; d < nb; d += KVC_SEL_THREADS) sm.hist[d] = 0;
        __syncthreads();
        for (base = a; base < e; base += KVC_SEL_THREADS) {
            const int64_t j = base + tid;
            int bucket = -1;
            if (j < e) {
                const float x = sc[j * st];
                const uint32_t key = kvc_f32_order_key(x);
                nan |= x != x;
                if (want > 0 && j >= lo && j < hi && (key & mask) == prefix)
                    bucket = (int)((key >> sh) & (nb - 1));
            }
            kvc_radix_count(sm.hist, bucket);
        }
        if (pass > 0) {
            __syncthreads();
        } else if (__syncthreads_or(nan)) {
            if (tid == 0) *nan_flag = 1;
            return;
        }
        if (want <= 0) break; /* nothing to take: select.c's UINT32_MAX, 0 */
        kvc_radix_bucket<KVC_SEL_THREADS>(sm.hist, nb, pass == 0 ? want : need, sm.scan.s32, &sm.digit, &sm.rem);
        __syncthreads();
        prefix |= sm.digit << sh;
        mask |= (nb - 1) << sh;
        need = sm.rem;
        thr = prefix;
        __syncthreads();
    }

    /* Emit: a token's slot is (kept outright before it) + min(ties before
     * it, need); both counts ride in one 64-bit scan (high and low words,
     * each below 2^32 since T is). */
    for (base = 0; base < T; base += chunk) {
        unsigned long long f[KVC_SEL_ITEMS], before[KVC_SEL_ITEMS], agg;
        int i;
        for (i = 0; i < KVC_SEL_ITEMS; i++) {
            const int64_t j = base + (int64_t)tid * KVC_SEL_ITEMS + i;
            f[i] = 0;
            if (j >= T) continue;
            if ((j >= s && j < se) || j >= ws) {
                f[i] = KVC_SEL_DEF;
            } else {
                const bool valid = j >= se && j < ve;
                const uint32_t key = kvc_f32_order_key(sc[j * st]);
                if (valid && take_all_v) f[i] = KVC_SEL_DEF;
                else if (valid != take_all_v && key > thr) f[i] = KVC_SEL_DEF;
                else if (valid != take_all_v && key == thr) f[i] = KVC_SEL_TIE;
            }
        }
        kvc_sel_scan64(sm.scan.s64).ExclusiveSum(f, before, agg);
        for (i = 0; i < KVC_SEL_ITEMS; i++) {
            const unsigned long long c = carry + before[i];
            const int64_t ties = (int64_t)(c & 0xffffffffull);
            if (f[i] == KVC_SEL_TIE && ties >= need) continue;
            if (f[i] == 0) continue;
            n = (int64_t)(c >> 32) + (ties < need ? ties : need);
            if (n < k) out[n * os] = base + (int64_t)tid * KVC_SEL_ITEMS + i;
        }
        carry += agg;
        __syncthreads(); /* the scan's storage is reused next chunk */
    }
    {
        const int64_t ties = (int64_t)(carry & 0xffffffffull);
        n = (int64_t)(carry >> 32) + (ties < need ? ties : need);
    }
    for (n = (n < k ? n : k) + tid; n < kmax; n += KVC_SEL_THREADS) out[n * os] = -1;
}

/* Slack to align the base, then the NaN flag. */
extern "C" size_t kvc_cuda_select_topk_workspace(const struct kvc_select_topk_params *p)
{
    (void)p;
    return 2 * (size_t)KVC_ALIGN;
}

extern "C" enum kvc_status kvc_cuda_select_topk(const struct kvc_select_topk_params *p,
                                                void *stream)
{
    const int64_t B = p->scores.shape[0], H = p->scores.shape[1], T = p->scores.shape[2];
    int *flag;
    int nan = 0;
    if (B == 0 || H == 0 || p->out.shape[2] == 0) return KVC_OK;
    /* counts are 32-bit; one block per row */
    if (T > (int64_t)UINT32_MAX || B * H > (int64_t)INT32_MAX) return KVC_ERR_UNSUPPORTED;
    if (p->scratch == NULL || p->scratch_bytes < kvc_cuda_select_topk_workspace(p))
        return KVC_ERR_NOMEM;
    flag = (int *)(((uintptr_t)p->scratch + (KVC_ALIGN - 1)) & ~(uintptr_t)(KVC_ALIGN - 1));
    KVC_CUDA_TRY(cudaMemsetAsync(flag, 0, sizeof *flag, KVC_STREAM(stream)));
    kvc_select_topk_kernel<<<(unsigned)(B * H), KVC_SEL_THREADS, 0, KVC_STREAM(stream)>>>(*p,
                                                                                      flag);
    KVC_CUDA_LAUNCHED();
    KVC_CUDA_TRY(cudaMemcpyAsync(&nan, flag, sizeof nan, cudaMemcpyDeviceToHost,
                                 KVC_STREAM(stream)));
    KVC_CUDA_TRY(cudaStreamSynchronize(KVC_STREAM(stream)));
    return nan ? KVC_ERR_NAN : KVC_OK;
}
