/*
 * attention.cu - decode/chunk attention over a compressed layer
 * (attention.c) on the GPU: split-K (flash-decoding).
 *
 * Rows of one kv head are its g * q query rows, query-major (row
 * r = i * g + gi), cut into tiles of RT rows so each K/V row is read once
 * for the whole GQA group. Pass 1: block (head, tile, split) runs an online
 * softmax over one contiguous range of the tile's slots and leaves an
 * unnormalised partial (max, sum, fp32 row); inside the block, groups of LPK
 * lanes each own one key at a time and merge their states through shared
 * memory in a fixed tree. Pass 2: one warp per row combines the splits by
 * log-sum-exp in split order and rounds once. The split of a head is derived
 * on the device from its own length and the host's split count, so both
 * passes agree without the host reading lengths. The split count fills whole
 * waves of resident blocks: results depend on the shapes, the GPU and the
 * build, never on timing.
 */
#include <cuda_fp16.h>

#include <atomic>

#include "common.cuh"
#include "split_combine.cuh"

#define KVC_AT_THREADS 128
#define KVC_AT_KB 2            /* keys per lane group per step (doubled for small tiles) */
#define KVC_AT_MIN_CHUNK 256   /* fewer slots per split cost more in partials than they gain */
#define KVC_AT_CHUNK_ALIGN 16  /* split boundaries on 16-slot steps past s0 */
/* Waves of resident blocks a launch is cut into: one wave of long chunks
 * streams best (each extra wave repeats the blocks' start-up latency and
 * epilogue; measured on an H100 at 1 and 4 waves, RESULTS.md) */
#define KVC_AT_WAVES 1
#define KVC_AT_MAX_D 256
#define KVC_AT_COMBINE_WARPS 4
#define KVC_AT_FULL 0xffffffffu

/* Shapes and the partials' place in scratch, fixed on the host. */
struct kvc_at_geom {
    int64_t B, Hkv, g, nq, D;
    int64_t R;      /* rows per kv head: g * nq */
    int64_t ntiles; /* ceil(R / rt) */
    int64_t nsplit; /* splits per (head, tile): workspace bound, then the launch's */
    int rt;
    float *pm, *ps, *pacc; /* [B * Hkv * R][nsplit] (x D for pacc) */
};

/* The pages kv head bh reads (*np of them), past a ragged head's leading
 * padding (negative entries: attention.h); a uniform list has none. */
__device__ __forceinline__ const int64_t *kvc_at_pages(const kvc_attention_params &p, int64_t bh,
                                                       int64_t *np)
{
    const int64_t *pg = p.pages + bh * p.num_pages;
    int64_t k0 = 0;
    if (p.layout == KVC_KV_RAGGED)
        while (k0 < p.num_pages && pg[k0] < 0) k0++;
    *np = p.num_pages - k0;
    return pg + k0;
}

/* Slots of kv head (b, hk): n of them, the first s0 padding (logical
 * slots when the head reads pages: attention.h). */
__device__ __forceinline__ void kvc_at_head_len(const kvc_attention_params &p, int64_t b,
                                                int64_t hk, int64_t *n, int64_t *s0)
{
    if (p.layout == KVC_KV_RAGGED) {
        *n = p.lengths[(b * p.num_kv_heads + hk) * p.lengths_stride];
        *s0 = 0;
        if (p.pages != NULL && *n > 0) {
            /* full pages, then the newest (possibly short) one */
            int64_t np;
            const int64_t *pg = kvc_at_pages(p, b * p.num_kv_heads + hk, &np);
            *n = np > 0 ? (np - 1) * p.page_size + (*n - pg[np - 1] * p.page_size) : 0;
        }
    } else {
        *n = p.k.shape[2];
        *s0 = p.kv_start ? p.kv_start[b * p.kv_start_stride] : 0;
        if (p.pages != NULL) {
            const int64_t np = p.num_pages, P = p.page_size, nn = *n, st = *s0;
            const int64_t *pg = p.pages + (b * p.num_kv_heads + hk) * np;
            int64_t masked = 0;
            for (int64_t i = 0; i < np; i++) {
                const int64_t lo = pg[i] * P, len = i + 1 < np ? P : nn - lo;
                masked += st <= lo ? 0 : (st - lo < len ? st - lo : len);
            }
            *n = (np - 1) * P + (nn - pg[np - 1] * P);
            *s0 = masked;
        }
    }
}

/* Physical slot of logical slot j of a head reading pages `pg` (NULL: j). */
__device__ __forceinline__ int64_t kvc_at_slot(const int64_t *pg, int64_t P, int64_t j)
{
    return pg == NULL ? j : pg[j / P] * P + j % P;
}

/* Slot range [s0, end) the tile sees; span <= 0 when none. */
__device__ __forceinline__ int64_t kvc_at_tile_end(const kvc_at_geom &g, int64_t n, int64_t t,
                                                   int rt)
{
    const int64_t last = (t + 1) * rt < g.R ? (t + 1) * rt - 1 : g.R - 1;
    return n - g.nq + last / g.g + 1;
}

/* Slots per split and the splits that hold any: the same in both passes. */
__device__ __forceinline__ void kvc_at_split(int64_t span, int64_t nsplit, int64_t *chunk,
                                             int64_t *count)
{
    kvc_split_chunks(span, nsplit, KVC_AT_CHUNK_ALIGN, KVC_AT_MIN_CHUNK, chunk, count);
}

template <int DT>
__device__ __forceinline__ uint32_t kvc_at_bits(const char *base, int64_t idx)
{
    if constexpr (DT == KVC_F32) return __ldg((const uint32_t *)base + idx);
    else return __ldg((const unsigned short *)base + idx);
}

/* 16 bytes of a row -> VE floats (exact conversions, as on the CPU). */
template <int DT>
__device__ __forceinline__ void kvc_at_unpack(const uint4 &u, float *f)
{
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if constexpr (DT == KVC_F32) {
            f[i] = __uint_as_float(w[i]);
        } else if constexpr (DT == KVC_F16) {
            f[2 * i] = __half2float(__ushort_as_half((unsigned short)(w[i] & 0xffffu)));
            f[2 * i + 1] = __half2float(__ushort_as_half((unsigned short)(w[i] >> 16)));
        } else {
            f[2 * i] = __uint_as_float(w[i] << 16);
            f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        }
    }
}

/* A lane's CPL chunks of one row: chunk c is the row's 16-byte chunk
 * lane + c * LPK. VEC: one uint4 load each; otherwise element by element
 * at stride ed, packed into the same layout (zeros past D or for !ok). */
template <int DT, int LPK, int CPL, bool VEC>
__device__ __forceinline__ void kvc_at_load_row(const char *row, int64_t ed, int D, bool ok,
                                                int lane, uint4 (&out)[CPL])
{
    constexpr int VE = DT == KVC_F32 ? 4 : 8;
#pragma unroll
    for (int c = 0; c < CPL; c++) {
        const int ch = lane + c * LPK;
        out[c] = make_uint4(0u, 0u, 0u, 0u);
        if (!ok) continue;
        if constexpr (VEC) {
            if (ch * VE < D) out[c] = __ldg((const uint4 *)row + ch);
        } else {
            uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
            for (int v = 0; v < VE; v++) {
                const int d = ch * VE + v;
                const uint32_t x = d < D ? kvc_at_bits<DT>(row, d * ed) : 0u;
                if constexpr (DT == KVC_F32) w[v] = x;
                else w[v / 2] |= x << (16 * (v & 1));
            }
            out[c] = make_uint4(w[0], w[1], w[2], w[3]);
        }
    }
}

/* Pass 1: block (head and row tile, split). */
template <int DT, int LPK, int CPL, int RT, bool VEC>
static __global__ void __launch_bounds__(KVC_AT_THREADS)
    kvc_at_partial_kernel(const kvc_attention_params p, const kvc_at_geom g)
{
    constexpr int VE = DT == KVC_F32 ? 4 : 8, EPL = CPL * VE;
    /* keys per lane group per step, i.e. loads in flight: four for small
     * query tiles (decode with GQA groups of <= 4: measured faster on an H100
     * although 243 registers leave 2 blocks per SM), two, or one where two
     * would not fit in registers (wide fp32 rows) */
    constexpr int NG = KVC_AT_THREADS / LPK, KB = RT * CPL >= 16 ? 1 : (RT * CPL >= 8 ? KVC_AT_KB : 2 * KVC_AT_KB), STEP = NG * KB;
    constexpr int NV = RT * KB, NT = (NV + LPK - 1) / LPK;
    constexpr int64_t es = DT == KVC_F32 ? 4 : 2;
    __shared__ float sm_m[NG / 2][RT], sm_s[NG / 2][RT];
    __shared__ float sm_acc[NG / 2][RT][EPL][LPK];

    const int64_t bh = blockIdx.x / g.ntiles, t = blockIdx.x % g.ntiles;
    const int64_t b = bh / g.Hkv, hk = bh % g.Hkv, split = blockIdx.y;
    const int D = (int)g.D;
    int64_t n, s0, chunk, count;
    kvc_at_head_len(p, b, hk, &n, &s0);
    const int64_t end = kvc_at_tile_end(g, n, t, RT);
    kvc_at_split(n > 0 ? end - s0 : 0, g.nsplit, &chunk, &count);
    /* pass 2 reads only the splits below count: nothing to write here */
    if (split >= count) return;
    const int64_t j0 = s0 + split * chunk, j1 = j0 + chunk < end ? j0 + chunk : end;

    const bool ragged = p.layout == KVC_KV_RAGGED;
    const int64_t off = ragged ? p.offsets[bh * p.offsets_stride] : 0;
    const int kdim = ragged ? 0 : 2;
    const int64_t ks = p.k.strides[kdim], kd = p.k.strides[kdim + 1];
    const int64_t vs = p.v.strides[kdim], vd = p.v.strides[kdim + 1];
    const char *kh = (const char *)p.k.data +
                     (ragged ? off * ks : b * p.k.strides[0] + hk * p.k.strides[1]) * es;
    const char *vh = (const char *)p.v.data +
                     (ragged ? off * vs : b * p.v.strides[0] + hk * p.v.strides[1]) * es;
    const int64_t cs = p.counts.strides[kdim];
    const int64_t co = ragged ? off * cs : b * p.counts.strides[0] + hk * p.counts.strides[1];
    const char *ch = p.counts.data == NULL ? NULL : (const char *)p.counts.data + co * 4;
    const bool ci32 = p.counts.dtype == KVC_I32;
    int64_t npg;
    const int64_t *pg = p.pages != NULL ? kvc_at_pages(p, bh, &npg) : NULL;
    const int64_t P = p.page_size;

    const int gi = threadIdx.x / LPK, lane = threadIdx.x % LPK;

    /* the lane's query elements, and the last slot each row sees here */
    float qv[RT][EPL];
    int64_t lim[RT];
#pragma unroll
    for (int r = 0; r < RT; r++) {
        const int64_t row = t * RT + r, i = row / g.g, last = n - g.nq + i;
        const bool live = row < g.R;
        const char *qr = (const char *)p.q.data + kvc_at(p.q, b, hk * g.g + row % g.g, i, 0) * es;
        uint4 qc[CPL];
        kvc_at_load_row<DT, LPK, CPL, false>(qr, p.q.strides[3], D, live, lane, qc);
#pragma unroll
        for (int c = 0; c < CPL; c++) kvc_at_unpack<DT>(qc[c], qv[r] + c * VE);
        lim[r] = live ? (last < j1 - 1 ? last : j1 - 1) : j0 - 1;
    }

    kvc_softmax_state st[RT];
    float acc[RT][EPL];
#pragma unroll
    for (int r = 0; r < RT; r++) {
        kvc_softmax_init(&st[r]);
#pragma unroll
        for (int e = 0; e < EPL; e++) acc[r][e] = 0.0f;
    }

    /* next step's rows are in flight while the current ones are used */
    uint4 kn[KB][CPL], vn[KB][CPL];
    float cn[KB];
    auto load = [&](int64_t base) {
#pragma unroll
        for (int kb = 0; kb < KB; kb++) {
            const int64_t j = base + gi * KB + kb;
            const bool ok = j < j1;
            const int64_t sj = ok ? kvc_at_slot(pg, P, j) : 0;
            kvc_at_load_row<DT, LPK, CPL, VEC>(kh + sj * ks * es, kd, D, ok, lane, kn[kb]);
            kvc_at_load_row<DT, LPK, CPL, VEC>(vh + sj * vs * es, vd, D, ok, lane, vn[kb]);
            cn[kb] = 1.0f;
            if (ch != NULL && ok)
                cn[kb] = ci32 ? (float)__ldg((const int *)ch + sj * cs)
                              : __ldg((const float *)ch + sj * cs);
        }
    };

    load(j0);
    for (int64_t base = j0; base < j1; base += STEP) {
        uint4 kc[KB][CPL], vc[KB][CPL];
        float lc[KB];
#pragma unroll
        for (int kb = 0; kb < KB; kb++) {
            /* without counts skip the log and its division: log(1) is 0 anyway */
            lc[kb] = ch != NULL ? kvc_logf(cn[kb]) : 0.0f;
#pragma unroll
            for (int c = 0; c < CPL; c++) {
                kc[kb][c] = kn[kb][c];
                vc[kb][c] = vn[kb][c];
            }
        }
        if (base + STEP < j1) load(base + STEP);

        float dot[RT][KB];
#pragma unroll
        for (int kb = 0; kb < KB; kb++) {
            float kf[EPL];
#pragma unroll
            for (int c = 0; c < CPL; c++) kvc_at_unpack<DT>(kc[kb][c], kf + c * VE);
#pragma unroll
            for (int r = 0; r < RT; r++) {
                float a = 0.0f;
#pragma unroll
                for (int e = 0; e < EPL; e++) a = fmaf(qv[r][e], kf[e], a);
                dot[r][kb] = a;
            }
        }
#pragma unroll
        for (int o = LPK / 2; o > 0; o /= 2)
#pragma unroll
            for (int r = 0; r < RT; r++)
#pragma unroll
                for (int kb = 0; kb < KB; kb++)
                    dot[r][kb] += __shfl_xor_sync(KVC_AT_FULL, dot[r][kb], o);

        float x[RT][KB], alpha[RT];
#pragma unroll
        for (int r = 0; r < RT; r++) {
            float bm = -INFINITY;
#pragma unroll
            for (int kb = 0; kb < KB; kb++) {
                const int64_t j = base + gi * KB + kb;
                x[r][kb] = j <= lim[r] ? dot[r][kb] * p.scaling + lc[kb] : -INFINITY;
                bm = fmaxf(bm, x[r][kb]);
            }
            alpha[r] = kvc_softmax_rescale(&st[r], bm);
        }

        /* each lane exponentiates its share of the NV logits (the group
         * holds them all after the butterfly), then the group swaps them:
         * value i lives in lane i % LPK, slot i / LPK */
        float eo[NT];
#pragma unroll
        for (int s = 0; s < NT; s++) {
            const int idx = (lane + s * LPK) % NV;
            float xv = -INFINITY, mv = 0.0f;
#pragma unroll
            for (int i = 0; i < NV; i++)
                if (i == idx) {
                    xv = x[i / KB][i % KB];
                    mv = st[i / KB].m;
                }
            eo[s] = xv == -INFINITY ? 0.0f : kvc_expf(xv - mv);
        }
        float pw[RT][KB];
#pragma unroll
        for (int i = 0; i < NV; i++)
            pw[i / KB][i % KB] = __shfl_sync(KVC_AT_FULL, eo[i / LPK], i % LPK, LPK);

#pragma unroll
        for (int r = 0; r < RT; r++) {
#pragma unroll
            for (int kb = 0; kb < KB; kb++) st[r].s += pw[r][kb];
            if (alpha[r] != 1.0f)
#pragma unroll
                for (int e = 0; e < EPL; e++) acc[r][e] *= alpha[r];
        }
#pragma unroll
        for (int kb = 0; kb < KB; kb++) {
            float vf[EPL];
#pragma unroll
            for (int c = 0; c < CPL; c++) kvc_at_unpack<DT>(vc[kb][c], vf + c * VE);
#pragma unroll
            for (int r = 0; r < RT; r++)
#pragma unroll
                for (int e = 0; e < EPL; e++) acc[r][e] = fmaf(pw[r][kb], vf[e], acc[r][e]);
        }
    }

    /* groups' states merge pairwise (upper half into lower), fixed order */
#pragma unroll
    for (int h = NG / 2; h > 0; h /= 2) {
        if (gi >= h && gi < 2 * h) {
#pragma unroll
            for (int r = 0; r < RT; r++) {
                if (lane == 0) {
                    sm_m[gi - h][r] = st[r].m;
                    sm_s[gi - h][r] = st[r].s;
                }
#pragma unroll
                for (int e = 0; e < EPL; e++) sm_acc[gi - h][r][e][lane] = acc[r][e];
            }
        }
        __syncthreads();
        if (gi < h) {
#pragma unroll
            for (int r = 0; r < RT; r++) {
                const float mo = sm_m[gi][r], so = sm_s[gi][r];
                const float M = fmaxf(st[r].m, mo);
                const float wa = kvc_softmax_weight(st[r].m, M), wb = kvc_softmax_weight(mo, M);
                st[r].m = M;
                st[r].s = st[r].s * wa + so * wb;
#pragma unroll
                for (int e = 0; e < EPL; e++)
                    acc[r][e] = acc[r][e] * wa + sm_acc[gi][r][e][lane] * wb;
            }
        }
        __syncthreads();
    }

    if (gi != 0) return;
#pragma unroll
    for (int r = 0; r < RT; r++) {
        const int64_t row = t * RT + r;
        if (row >= g.R) break;
        const int64_t pi = (bh * g.R + row) * g.nsplit + split;
        if (lane == 0) {
            g.pm[pi] = st[r].m;
            g.ps[pi] = st[r].s;
        }
        float *dst = g.pacc + pi * g.D;
#pragma unroll
        for (int e = 0; e < EPL; e++) {
            const int d = (lane + e / VE * LPK) * VE + e % VE;
            if (d < D) dst[d] = acc[r][e];
        }
    }
}

/* Pass 2: one block per row of out (split_combine.cuh). */
static __global__ void __launch_bounds__(KVC_AT_COMBINE_WARPS * 32)
    kvc_at_combine_kernel(const kvc_attention_params p, const kvc_at_geom g)
{
    const int64_t grow = blockIdx.x;
    const int64_t bh = grow / g.R, row = grow % g.R;
    const int64_t b = bh / g.Hkv, hk = bh % g.Hkv, i = row / g.g, hq = hk * g.g + row % g.g;
    int64_t n, s0, chunk, count;
    kvc_at_head_len(p, b, hk, &n, &s0);
    const int64_t end = kvc_at_tile_end(g, n, row / g.rt, g.rt);
    kvc_at_split(n > 0 ? end - s0 : 0, g.nsplit, &chunk, &count);
    const int64_t p0 = grow * g.nsplit;
    const int64_t es = p.out.dtype == KVC_F32 ? 4 : 2;
    float M, L;
    kvc_split_combine<KVC_AT_COMBINE_WARPS, KVC_AT_MAX_D>(g.pm, g.ps, g.pacc, p0, count, g.D,
                                                         (char *)p.out.data + kvc_at(p.out, b, i, hq, 0) * es,
                                                         p.out.dtype, p.out.strides[3], &M, &L);
}

/* Shapes -> geometry (no device reads); nsplit is the most any launch uses,
 * which sizes the workspace. False for an empty problem. */
static bool kvc_at_geometry(const kvc_attention_params *p, kvc_at_geom *g)
{
    g->B = p->q.shape[0];
    g->Hkv = p->num_kv_heads;
    g->nq = p->q.shape[2];
    g->D = p->q.shape[3];
    if (g->B <= 0 || p->q.shape[1] <= 0 || g->nq <= 0 || g->D <= 0 || g->Hkv <= 0) return false;
    g->g = p->q.shape[1] / g->Hkv;
    g->R = g->g * g->nq;
    g->rt = g->R <= 2 ? 2 : (g->R <= 4 ? 4 : 8);
    g->ntiles = kvc_ceil_div(g->R, g->rt);
    const int64_t bh = g->B * g->Hkv;
    /* slots a head reads on average: what the layer holds per head, and with
     * pages no more than its pages'. The layer's bound also holds with pages,
     * so a list of every page splits like the dense op and sums in its order
     * (bit-equal results: tests/test_cuda.py). */
    const int64_t held = p->layout == KVC_KV_RAGGED ? kvc_ceil_div(p->k.shape[0], bh) : p->k.shape[2];
    const int64_t listed = p->pages != NULL ? p->num_pages * p->page_size : held;
    const int64_t navg = listed < held ? listed : held;
    /* a launch fills at most KVC_AT_WAVES waves of the fullest SMs */
    const int64_t cap = kvc_cuda_sm_count() * (2048 / KVC_AT_THREADS) * KVC_AT_WAVES;
    g->nsplit = kvc_cuda_nsplit(navg, KVC_AT_MIN_CHUNK, cap, bh * g->ntiles);
    g->pm = g->ps = g->pacc = NULL;
    return true;
}

extern "C" size_t kvc_cuda_attention_workspace(const struct kvc_attention_params *p)
{
    kvc_at_geom g;
    if (!kvc_at_geometry(p, &g)) return 0;
    return kvc_cuda_split_workspace(g.B * g.Hkv * g.R * g.nsplit, g.D);
}

/* 16-byte loads need every row of the view 16-byte aligned. */
static bool kvc_at_vec_ok(const kvc_view &v, bool ragged, int64_t D, int64_t es)
{
    const int nd = ragged ? 1 : 3;
    if (v.strides[nd] != 1 || (uintptr_t)v.data % 16 != 0 || D * es % 16 != 0) return false;
    for (int d = 0; d < nd; d++)
        if (v.shape[d] > 1 && v.strides[d] * es % 16 != 0) return false;
    return true;
}

/* Splits per (head, tile): blocks of equal work fill whole waves of the
 * kernel's resident blocks (a part-filled last wave idles SMs), as many
 * waves as fit under the workspace's bound and the minimum chunk. */
static int64_t kvc_at_pick_split(const kvc_at_geom &g, int64_t resident)
{
    const int64_t units = g.B * g.Hkv * g.ntiles, per_wave = resident / units;
    if (per_wave < 1) return 1;
    int64_t waves = g.nsplit / per_wave;
    waves = waves < 1 ? 1 : (waves > KVC_AT_WAVES ? KVC_AT_WAVES : waves);
    return waves * per_wave < g.nsplit ? waves * per_wave : g.nsplit;
}

template <int DT, int LPK, int CPL, int RT, bool VEC>
static enum kvc_status kvc_at_run(const kvc_attention_params &p, kvc_at_geom g, cudaStream_t s)
{
    static std::atomic<int> occ_cache[KVC_CUDA_MAX_DEVICES];
    const auto kernel = kvc_at_partial_kernel<DT, LPK, CPL, RT, VEC>;
    const int occ = kvc_cuda_cached(occ_cache, [&](int, int *v) {
        return cudaOccupancyMaxActiveBlocksPerMultiprocessor(v, kernel, KVC_AT_THREADS, 0);
    }, 2);
    g.nsplit = kvc_at_pick_split(g, kvc_cuda_sm_count() * occ);
    const dim3 grid((unsigned)(g.B * g.Hkv * g.ntiles), (unsigned)g.nsplit);
    kernel<<<grid, KVC_AT_THREADS, 0, s>>>(p, g);
    KVC_CUDA_LAUNCHED();
    kvc_at_combine_kernel<<<(unsigned)(g.B * g.Hkv * g.R), KVC_AT_COMBINE_WARPS * 32, 0, s>>>(p, g);
    KVC_CUDA_LAUNCHED();
    return KVC_OK;
}

template <int DT, int LPK, int CPL, bool VEC>
static enum kvc_status kvc_at_run_rt(const kvc_attention_params &p, const kvc_at_geom &g,
                                     cudaStream_t s)
{
    switch (g.rt) {
    case 2: return kvc_at_run<DT, LPK, CPL, 2, VEC>(p, g, s);
    case 4: return kvc_at_run<DT, LPK, CPL, 4, VEC>(p, g, s);
    default: return kvc_at_run<DT, LPK, CPL, 8, VEC>(p, g, s);
    }
}

/* Lanes per key from the row's 16-byte chunks: every lane holds one
 * (two for fp32 rows of more than 128 elements). */
template <int DT>
static enum kvc_status kvc_at_dispatch(const kvc_attention_params &p, const kvc_at_geom &g,
                                       bool vec, cudaStream_t s)
{
    constexpr int64_t es = DT == KVC_F32 ? 4 : 2;
    const int64_t nc = kvc_ceil_div(g.D * es, 16);
    if (!vec) return kvc_at_run_rt<DT, 32, DT == KVC_F32 ? 2 : 1, false>(p, g, s);
    if (nc <= 8) return kvc_at_run_rt<DT, 8, 1, true>(p, g, s);
    if (nc <= 16) return kvc_at_run_rt<DT, 16, 1, true>(p, g, s);
    if (nc <= 32) return kvc_at_run_rt<DT, 32, 1, true>(p, g, s);
    if constexpr (DT == KVC_F32) return kvc_at_run_rt<DT, 32, 2, true>(p, g, s);
    return KVC_ERR_UNSUPPORTED;
}

extern "C" enum kvc_status kvc_cuda_attention(const struct kvc_attention_params *p, void *stream)
{
    kvc_at_geom g;
    if (p->layout != KVC_KV_UNIFORM && p->layout != KVC_KV_RAGGED) return KVC_ERR_INVALID;
    if (!kvc_at_geometry(p, &g)) return KVC_OK;
    if (p->q.shape[1] % p->num_kv_heads != 0) return KVC_ERR_INVALID;
    if (g.D > KVC_AT_MAX_D) return KVC_ERR_UNSUPPORTED;
    const int32_t dt = p->q.dtype;
    if ((dt != KVC_F32 && dt != KVC_F16 && dt != KVC_BF16) || p->k.dtype != dt ||
        p->v.dtype != dt || p->out.dtype != dt)
        return KVC_ERR_UNSUPPORTED;
    if (p->counts.data != NULL && p->counts.dtype != KVC_F32 && p->counts.dtype != KVC_I32)
        return KVC_ERR_UNSUPPORTED;
    if (g.B * g.Hkv * g.ntiles > INT32_MAX ||
        g.B * g.Hkv * g.R > INT32_MAX)
        return KVC_ERR_UNSUPPORTED;
    if (p->scratch == NULL || p->scratch_bytes < kvc_cuda_attention_workspace(p))
        return KVC_ERR_NOMEM;

    /* sized for the workspace's nsplit; a launch uses at most that many */
    const size_t np = (size_t)(g.B * g.Hkv * g.R * g.nsplit);
    char *cur = (char *)(((uintptr_t)p->scratch + (KVC_ALIGN - 1)) & ~(uintptr_t)(KVC_ALIGN - 1));
    g.pm = (float *)cur;
    g.ps = (float *)(cur + kvc_align_up(np * sizeof(float)));
    g.pacc = (float *)(cur + 2 * kvc_align_up(np * sizeof(float)));

    const bool ragged = p->layout == KVC_KV_RAGGED;
    const int64_t es = dt == KVC_F32 ? 4 : 2;
    const bool vec = kvc_at_vec_ok(p->k, ragged, g.D, es) && kvc_at_vec_ok(p->v, ragged, g.D, es);
    const cudaStream_t s = KVC_STREAM(stream);
    switch (dt) {
    case KVC_F16: return kvc_at_dispatch<KVC_F16>(*p, g, vec, s);
    case KVC_BF16: return kvc_at_dispatch<KVC_BF16>(*p, g, vec, s);
    default: return kvc_at_dispatch<KVC_F32>(*p, g, vec, s);
    }
}
