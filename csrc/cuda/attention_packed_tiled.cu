/*
 * attention_packed_tiled.cu - pass 1 of the packed decode attention when a
 * kv head has few query rows (decode: g rows; at most KVC_PF_MAX_RT, 4
 * with head_dim 256: shared memory), head_dim 64, 128 or 256, a
 * power-of-two group G >= 32 and 16-byte aligned code rows (attention_packed.cu falls back to its generic kernel
 * otherwise).
 *
 * The generic kernel gives each lane channels of one slot at a time, so
 * every slot pays a 5-step shuffle reduction per row and a serial softmax
 * update: on an H200 it read 1-7% of the copy bandwidth. Here block
 * (b, kv head, split) walks its slots a tile of 128 at a time, in three
 * phases per tile:
 *  1. logits: thread t owns slot t of the tile and reads its whole key row
 *     (16-byte loads); the query, scaled per channel by the key scales of
 *     the warp's token group (a warp's 32 slots share one when 32 | G),
 *     sits in shared memory, so a logit is D FMAs per row and no shuffle;
 *     the bias scaling * q . centre of the group is one warp reduction per
 *     group, not per slot;
 *  2. softmax: the tile's max per row (warp, then block), one rescale of
 *     the running state per tile, the weights into shared memory;
 *  3. values: threads own 8 consecutive channels (one code word) of every
 *     (D / 8)-th slot, dequantize v = min + scale * code once and add
 *     w * v for every row.
 * The loads run ahead of the arithmetic that needs them: a slot's value
 * code row is copied into shared memory asynchronously (cp.async) when its
 * tile starts and waited for just before the value phase, so the logits
 * and the softmax hide its latency (where the tile's rows fit the static
 * shared memory: kvc_pf_stage_bytes; else phase 3 reads global memory);
 * and the next tile's first key words and value scales and mins are asked
 * for before this tile's value phase. On an H200 (benchmarks/RESULTS.md,
 * "Loads ahead") this made the kernel 1.34-1.48x faster at 64K slots or
 * batch 8, where its tile chain had waited on a load per value slot.
 * The residual slots (full precision) take the same phases with loads of
 * their own. At the end the slot lanes' accumulators are summed in lane
 * order into the split's unnormalised partial (max, sum, fp32 row), which
 * the combine pass of attention_packed.cu merges by log-sum-exp. All
 * threads hold the same running max and sum (they are computed from the
 * same shared values in the same order): results depend on the shapes, the
 * GPU and the build, never on timing.
 */

#include <cuda_pipeline.h>

#include "attention_packed.cuh"
#include "split_combine.cuh"

#define KVC_PF_THREADS KVC_PF_TILE
#define KVC_PF_WARPS (KVC_PF_THREADS / 32)
#define KVC_PF_CPT 8 /* value channels per thread: one 32-bit word of 4-bit codes */
/* Resident blocks per SM the registers are capped for (8 rows: 2, else 3;
 * 4 blocks spilled the value accumulators), and the split count fills
 * exactly one wave of them: sized for 4 while 3 fit, the launch ran in 1.3
 * waves and the tail cost 1.5x at 64K slots (H200). */
#define KVC_PF_BLOCKS_PER_SM(rt) ((rt) == KVC_PF_MAX_RT ? 2 : 3)

/* Floats of the kernel's shared scratch sbuf: per warp the scaled query
 * [KD][RT], at the end the slot lanes' sums [T / (KD / CPT)][RT][KD]. */
template <int KD, int RT>
__host__ __device__ constexpr int kvc_pf_red_floats()
{
    constexpr int a = KVC_PF_WARPS * KD, b = KVC_PF_TILE * KVC_PF_CPT;
    return (a > b ? a : b) * RT;
}

/* Bytes of a value code row the kernel stages in shared memory (0: none,
 * the value phase reads global memory): KD (8-bit rows of KD <= 128, 4-bit
 * of 256) where the tile's rows fit beside the kernel's other shared
 * arrays (sq, sp, sbuf, svs, svm; 1 KB for the small ones) under the 48 KB
 * of static shared memory. */
template <int KD, int RT>
__host__ __device__ constexpr int kvc_pf_stage_bytes()
{
    constexpr int T = KVC_PF_TILE, row = KD < 128 ? KD : 128;
    constexpr int other = 4 * (KD * RT + T * RT + kvc_pf_red_floats<KD, RT>() + 2 * T * (KD / 32)) + 1024;
    return other + T * row <= 48 * 1024 ? row : 0;
}

/* Rows per head the kernel is instantiated for: R padded to 1, 4 or 8. */
static inline int kvc_pf_rows(int64_t R) { return R == 1 ? 1 : (R <= 4 ? 4 : KVC_PF_MAX_RT); }

/* The KVC_PF_CPT value codes of channels c0.. of a packed value row (c0 a
 * multiple of 8: the word is aligned to its own size), in the low bits. */
__device__ __forceinline__ uint64_t kvc_pf_value_word(const uint8_t *row, int c0, int vbits)
{
    if (vbits == 8) {
        const uint2 w = *(const uint2 *)(row + c0);
        return (uint64_t)w.x | ((uint64_t)w.y << 32);
    }
    if (vbits == 4) return *(const uint32_t *)(row + c0 / 2);
    return *(const uint16_t *)(row + c0 / 4);
}

/* Elements c0..c0+7 of a full-precision row whose elements are contiguous
 * (c0 a multiple of 8, the row 16-byte aligned): 16-byte loads. */
__device__ __forceinline__ void kvc_pf_load8(const char *row, int32_t dt, int c0, float *out)
{
    if (dt == KVC_F32) {
        const float4 a = *(const float4 *)(row + c0 * 4), b = *(const float4 *)(row + c0 * 4 + 16);
        out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
        out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
        return;
    }
    const uint4 w = *(const uint4 *)(row + c0 * 2);
    const uint32_t h[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const uint16_t lo = (uint16_t)(h[i] & 0xffffu), hi = (uint16_t)(h[i] >> 16);
        out[2 * i] = dt == KVC_F16 ? kvc_f16_to_f32(lo) : kvc_bf16_to_f32(lo);
        out[2 * i + 1] = dt == KVC_F16 ? kvc_f16_to_f32(hi) : kvc_bf16_to_f32(hi);
    }
}

/* RT floats of a shared-memory row (the weights of one slot, the scaled
 * query of one channel): 16-byte loads when RT is a multiple of 4 (rows
 * are then 16-byte aligned). */
template <int RT>
__device__ __forceinline__ void kvc_pf_weights(const float *row, float *pw)
{
    if constexpr (RT % 4 == 0) {
#pragma unroll
        for (int r = 0; r < RT; r += 4) {
            const float4 a = *(const float4 *)(row + r);
            pw[r] = a.x;
            pw[r + 1] = a.y;
            pw[r + 2] = a.z;
            pw[r + 3] = a.w;
        }
    } else {
#pragma unroll
        for (int r = 0; r < RT; r++) pw[r] = row[r];
    }
}

/* Pass 1, block (b * Hkv + hk, split). KBITS: key code width; KD: head_dim;
 * RT: rows per head padded (1, 4 or 8). */
template <int KBITS, int KD, int RT>
static __global__ void __launch_bounds__(KVC_PF_THREADS, KVC_PF_BLOCKS_PER_SM(RT))
    kvc_pf_partial_kernel(const kvc_packed_attention_params p, const kvc_pa_geom g)
{
    constexpr int T = KVC_PF_TILE, NW = KVC_PF_WARPS, CPT = KVC_PF_CPT;
    constexpr int CH = KD / CPT; /* threads per slot in the value phase */
    constexpr int SL = T / CH;   /* slots in flight in the value phase */
    constexpr int PER = 32 / KBITS; /* key codes per 32-bit word */
    constexpr int KW = KD / PER;    /* key words per row */
    constexpr int NQ = KW / 4;      /* 16-byte loads per key row */
    constexpr int PF = NQ < 4 ? NQ : 4; /* of them issued before the group's scaled query is built */
    constexpr uint32_t KMASK = (1u << KBITS) - 1u;
    constexpr int RED = kvc_pf_red_floats<KD, RT>();
    __shared__ __align__(16) float sq[KD][RT];  /* the rows' queries */
    __shared__ __align__(16) float sp[T][RT];   /* the tile's weights */
    __shared__ __align__(16) float sbuf[RED];   /* per warp [KD][RT] q * key scale; at the end [SL][RT][KD] */
    __shared__ float smax[NW][RT], ssum[NW][RT];
    __shared__ int64_t slim[RT]; /* last logical slot each row sees (-1: a padding row) */
    /* the tile's value scales and mins, [slot][value group] (KD / G <= KD / 32
     * groups): loaded with the key rows so their latency hides behind the
     * logits, not in the value phase's chain of loads */
    __shared__ float svs[T][KD / 32], svm[T][KD / 32];
    /* the tile's value code rows when they fit (SVB bytes a row: rows of up
     * to SVB bytes): copied asynchronously at the tile's start, so the value
     * phase reads shared memory instead of waiting on a load per slot */
    constexpr int SVB = kvc_pf_stage_bytes<KD, RT>();
    __shared__ __align__(16) uint8_t svc[SVB ? T : 1][SVB ? SVB : 16];

    const int64_t bh = blockIdx.x, b = bh / g.Hkv, hk = bh % g.Hkv, split = blockIdx.y;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    int64_t n, s0, off, t0, per, count;
    kvc_pa_head(p, b, hk, &n, &s0, &off);
    const int64_t end = n + g.r;
    kvc_pf_split(s0, end, g.tsplit, &t0, &per, &count);
    /* the combine pass reads only the splits below count: nothing to write */
    if (split >= count) return;
    const int64_t tl0 = t0 + split * per;
    const int64_t tl1 = tl0 + per < kvc_ceil_div(end, T) ? tl0 + per : kvc_ceil_div(end, T);

    const kvc_pa_ptrs h = kvc_pa_pointers(p, g, b, hk, off);
    const int32_t dt = p.q.dtype;
    const int64_t es = h.es;
    const int vbits = g.vbits, nvg = (int)kvc_pk_groups(KD, g.G); /* value groups per slot */
    const bool rvec = g.res_vec;
    const uint32_t vmask = kvc_pk_mask(vbits);
    const float kmid = kvc_pk_mid(KBITS), vmid = kvc_pk_mid(vbits);
    const int vrow = KD * vbits / 8;          /* bytes of a value code row */
    const bool stage = SVB > 0 && vrow <= SVB; /* multiples of 16: kvc_pf_fits */

    /* the queries (rows past R: zeros, never written out) and the last
     * logical slot each row sees */
    for (int idx = tid; idx < KD * RT; idx += T) {
        const int c = idx / RT, r = idx % RT;
        float v = 0.0f;
        if (r < g.R) {
            const int64_t i = r / g.g, hq = hk * g.g + r % g.g;
            v = kvc_load_f32(p.q.data, dt, kvc_at(p.q, b, hq, i, c));
        }
        sq[c][r] = v;
    }
    if (tid < RT) slim[tid] = tid < g.R ? kvc_pa_last(g, n, tid / g.g) : -1;
    __syncthreads();

    float *sqs = sbuf + warp * KD * RT; /* this warp's q * key scale, [KD][RT] */
    int64_t wtg = -1;                   /* token group sqs and bias belong to */
    float bias[RT], m[RT], s[RT], acc[CPT][RT];
#pragma unroll
    for (int r = 0; r < RT; r++) {
        bias[r] = 0.0f;
        m[r] = -INFINITY;
        s[r] = 0.0f;
#pragma unroll
        for (int k = 0; k < CPT; k++) acc[k][r] = 0.0f;
    }
    const int cc = tid % CH, sl = tid / CH, c0 = cc * CPT;

    /* this thread's slot's first key words and value scales and mins,
     * loaded one tile ahead: the next tile's are asked for before this
     * tile's value phase, whose arithmetic hides their latency */
    uint4 kpre[PF];
    float vsc[KD / 32], vmn[KD / 32];
    auto prefetch = [&](int64_t jn) {
        if (jn < s0 || jn >= n) return;
        const uint4 *kr = (const uint4 *)(h.kc + jn * h.kcs);
#pragma unroll
        for (int i = 0; i < PF; i++) kpre[i] = kr[i];
#pragma unroll
        for (int u = 0; u < KD / 32; u++) {
            if (u < nvg) {
                vsc[u] = h.vs[jn * h.vss + u * h.vsd];
                vmn[u] = h.vm[jn * h.vms + u * h.vmd];
            }
        }
    };
    prefetch(tl0 * T + tid);

    for (int64_t tl = tl0; tl < tl1; tl++) {
        const int64_t base = tl * T, j = base + tid, wj0 = base + warp * 32;
        /* ---- 1. logits: slot j is this thread's ---- */
        const bool packed = j >= s0 && j < n;
        const uint4 *krow = (const uint4 *)(h.kc + j * h.kcs);
        if (stage && packed) {
            /* slot j's value codes, for the value phase (waited for before
             * phase 2's last barrier) */
            const uint8_t *src = h.vc + j * h.vcs;
            for (int i = 0; i < vrow; i += 16) __pipeline_memcpy_async(&svc[tid][i], src + i, 16);
        }
        __pipeline_commit();
        if (wj0 < n && wj0 + 32 > s0) {
            /* the warp's token group (32 | G: one for all its lanes) */
            const int64_t tg = wj0 / g.G;
            if (tg != wtg) {
                wtg = tg;
                float part[RT];
#pragma unroll
                for (int r = 0; r < RT; r++) part[r] = 0.0f;
#pragma unroll
                for (int e = 0; e < KD / 32; e++) {
                    const int c = lane + 32 * e;
                    const float sc = h.ks[tg * h.kss + c * h.ksd];
                    const float ce = kvc_pk_centre_at(h.km[tg * h.kms + c * h.kmd], sc, kmid);
#pragma unroll
                    for (int r = 0; r < RT; r++) {
                        sqs[c * RT + r] = sq[c][r] * sc;
                        part[r] = fmaf(sq[c][r], ce, part[r]);
                    }
                }
#pragma unroll
                for (int r = 0; r < RT; r++) bias[r] = p.scaling * kvc_warp_sum(part[r]);
                __syncwarp();
            }
        }
        float x[RT];
#pragma unroll
        for (int r = 0; r < RT; r++) x[r] = -INFINITY;
        if (packed) {
            float dot[RT];
#pragma unroll
            for (int r = 0; r < RT; r++) dot[r] = 0.0f;
#pragma unroll
            for (int w4 = 0; w4 < NQ; w4++) {
                const uint4 q4 = w4 < PF ? kpre[w4] : krow[w4];
                const uint32_t words[4] = {q4.x, q4.y, q4.z, q4.w};
#pragma unroll
                for (int h = 0; h < 4; h++) {
#pragma unroll
                    for (int k = 0; k < PER; k++) {
                        const int c = (w4 * 4 + h) * PER + k;
                        const float cv = (float)((words[h] >> (k * KBITS)) & KMASK) - kmid;
                        float qc[RT];
                        kvc_pf_weights<RT>(sqs + c * RT, qc);
#pragma unroll
                        for (int r = 0; r < RT; r++) dot[r] = fmaf(qc[r], cv, dot[r]);
                    }
                }
            }
            const float lc = h.cn != NULL ? kvc_logf(h.cn[j * h.cs]) : 0.0f;
#pragma unroll
            for (int r = 0; r < RT; r++) x[r] = j <= slim[r] ? fmaf(dot[r], p.scaling, bias[r] + lc) : -INFINITY;
#pragma unroll
            for (int u = 0; u < KD / 32; u++) {
                if (u < nvg) {
                    svs[tid][u] = vsc[u];
                    svm[tid][u] = vmn[u];
                }
            }
        } else if (j >= s0 && j >= n && j < end) {
            /* a residual slot: its full-precision key */
            float dot[RT];
#pragma unroll
            for (int r = 0; r < RT; r++) dot[r] = 0.0f;
            const char *row = h.rk + (j - n) * h.rks * es;
#pragma unroll 4
            for (int c8 = 0; c8 < KD; c8 += 8) {
                float kf[8];
                if (rvec) {
                    kvc_pf_load8(row, dt, c8, kf);
                } else {
#pragma unroll
                    for (int i = 0; i < 8; i++) kf[i] = kvc_load_f32(row, dt, (c8 + i) * h.rkd);
                }
#pragma unroll
                for (int i = 0; i < 8; i++)
#pragma unroll
                    for (int r = 0; r < RT; r++) dot[r] = fmaf(sq[c8 + i][r], kf[i], dot[r]);
            }
            const float lc = kvc_pa_residual_logc(h, j - n);
#pragma unroll
            for (int r = 0; r < RT; r++) x[r] = j <= slim[r] ? fmaf(dot[r], p.scaling, lc) : -INFINITY;
        }

        /* ---- 2. softmax: the tile's max, one rescale, the weights ---- */
#pragma unroll
        for (int r = 0; r < RT; r++) {
            const float mx = kvc_warp_max(x[r]);
            if (lane == 0) smax[warp][r] = mx;
        }
        __syncthreads();
        float alpha[RT];
        bool moved = false;
#pragma unroll
        for (int r = 0; r < RT; r++) {
            float M = m[r];
#pragma unroll
            for (int w = 0; w < NW; w++) M = fmaxf(M, smax[w][r]);
            alpha[r] = M == -INFINITY ? 1.0f : kvc_softmax_weight(m[r], M);
            moved |= alpha[r] != 1.0f;
            m[r] = M;
            const float pw = x[r] == -INFINITY ? 0.0f : kvc_expf(x[r] - M);
            sp[tid][r] = pw;
            const float ws = kvc_warp_sum(pw);
            if (lane == 0) ssum[warp][r] = ws;
        }
        __pipeline_wait_prior(0); /* this thread's value rows; the barrier shows every thread's */
        __syncthreads();
        if (tl + 1 < tl1) prefetch(base + T + tid);
#pragma unroll
        for (int r = 0; r < RT; r++) {
            float t = 0.0f;
#pragma unroll
            for (int w = 0; w < NW; w++) t += ssum[w][r];
            s[r] = fmaf(s[r], alpha[r], t);
        }
        if (moved) {
#pragma unroll
            for (int k = 0; k < CPT; k++)
#pragma unroll
                for (int r = 0; r < RT; r++) acc[k][r] *= alpha[r];
        }

        /* ---- 3. values: channels c0..c0+7 of slots sl, sl + SL, ... ---- */
        const int64_t jlo = s0 > base ? s0 - base : 0, jhi = end - base < T ? end - base : T;
        const int64_t jpk = n - base < jhi ? (n - base > jlo ? n - base : jlo) : jhi; /* packed: [jlo, jpk) */
        const int jfirst = (int)(jlo <= sl ? sl : sl + kvc_ceil_div(jlo - sl, SL) * SL);
        const int u = (int)(c0 / g.G); /* 8 | G: one value group for the 8 channels */
#pragma unroll 4
        for (int jj = jfirst; jj < jpk; jj += SL) {
            const int64_t jv = base + jj;
            const uint64_t word = kvc_pf_value_word(stage ? &svc[jj][0] : h.vc + jv * h.vcs, c0, vbits);
            const float sc = svs[jj][u];
            const float ce = kvc_pk_centre_at(svm[jj][u], sc, vmid);
            float pw[RT];
            kvc_pf_weights<RT>(&sp[jj][0], pw);
#pragma unroll
            for (int k = 0; k < CPT; k++) {
                const float v = fmaf(sc, (float)((uint32_t)(word >> (k * vbits)) & vmask) - vmid, ce);
#pragma unroll
                for (int r = 0; r < RT; r++) acc[k][r] = fmaf(pw[r], v, acc[k][r]);
            }
        }
        /* residual slots (full precision), past the packed ones */
        for (int jj = jfirst > jpk ? jfirst : jfirst + (int)kvc_ceil_div(jpk - jfirst, SL) * SL; jj < jhi;
             jj += SL) {
            const char *row = h.rv + (base + jj - n) * h.rvs * es;
            float pw[RT];
            kvc_pf_weights<RT>(&sp[jj][0], pw);
            float v[CPT];
            if (rvec) {
                kvc_pf_load8(row, dt, c0, v);
            } else {
#pragma unroll
                for (int k = 0; k < CPT; k++) v[k] = kvc_load_f32(row, dt, (c0 + k) * h.rvd);
            }
#pragma unroll
            for (int k = 0; k < CPT; k++)
#pragma unroll
                for (int r = 0; r < RT; r++) acc[k][r] = fmaf(pw[r], v[k], acc[k][r]);
        }
        /* the next tile's phase 1 rewrites sqs and phase 2 sp: wait for every
         * reader of this tile's */
        __syncthreads();
    }

    /* the slot lanes' accumulators, summed in lane order */
    float *red = sbuf; /* [SL][RT][KD] */
#pragma unroll
    for (int k = 0; k < CPT; k++)
#pragma unroll
        for (int r = 0; r < RT; r++) red[(sl * RT + r) * KD + c0 + k] = acc[k][r];
    __syncthreads();
    for (int idx = tid; idx < RT * KD; idx += T) {
        const int r = idx / KD, c = idx % KD;
        if (r >= g.R) continue;
        float a = 0.0f;
#pragma unroll
        for (int l = 0; l < SL; l++) a += red[(l * RT + r) * KD + c];
        const int64_t pi = (bh * g.R + r) * g.nsplit + split;
        g.pacc[pi * g.D + c] = a;
        if (c == 0) {
            g.pm[pi] = m[r];
            g.ps[pi] = s[r];
        }
    }
}

bool kvc_pf_fits(const kvc_packed_attention_params &p, const kvc_pa_geom &g)
{
    if (g.R > KVC_PF_MAX_RT || (g.D != 64 && g.D != 128 && g.D != 256)) return false;
    /* 8 rows of 256 channels would need more than 48 KB of shared memory */
    if (g.D == 256 && g.R > 4) return false;
    if (g.G < 32 || (g.G & (g.G - 1)) != 0) return false;
    /* 16-byte loads of code rows: byte-contiguous rows on 16-byte steps */
    const kvc_view *cv[2] = {&p.key_codes, &p.value_codes};
    for (int i = 0; i < 2; i++) {
        const kvc_view &v = *cv[i];
        if ((uintptr_t)v.data % 16 != 0) return false;
        if (p.layout == KVC_KV_RAGGED) {
            if (v.strides[1] != 1 || v.strides[0] % 16 != 0) return false;
        } else if (v.strides[3] != 1 || v.strides[2] % 16 != 0 || v.strides[1] % 16 != 0 ||
                   v.strides[0] % 16 != 0) {
            return false;
        }
    }
    return true;
}

bool kvc_pf_residual_vectors(const kvc_packed_attention_params &p)
{
    const int64_t es = p.q.dtype == KVC_F32 ? 4 : 2;
    const kvc_view *rv[2] = {&p.res_k, &p.res_v};
    for (int i = 0; i < 2; i++) {
        const kvc_view &v = *rv[i];
        if ((uintptr_t)v.data % 16 != 0 || v.strides[3] != 1) return false;
        for (int d = 0; d < 3; d++)
            if ((v.strides[d] * es) % 16 != 0) return false;
    }
    return true;
}

int64_t kvc_pf_splits(const kvc_packed_attention_params &p, const kvc_pa_geom &g)
{
    const int64_t bh = g.B * g.Hkv;
    const int64_t navg = (p.layout == KVC_KV_RAGGED ? kvc_ceil_div(p.key_codes.shape[0], bh)
                                                    : p.key_codes.shape[2]) + g.r;
    return kvc_cuda_nsplit(navg, KVC_PF_TILE, kvc_cuda_sm_count() * KVC_PF_BLOCKS_PER_SM(kvc_pf_rows(g.R)), bh);
}

template <int KD, int RT>
static enum kvc_status kvc_pf_launch_bits(const kvc_packed_attention_params &p, const kvc_pa_geom &g,
                                          cudaStream_t s)
{
    const dim3 grid((unsigned)(g.B * g.Hkv), (unsigned)g.tsplit);
    switch (g.bits) {
    case 2: kvc_pf_partial_kernel<2, KD, RT><<<grid, KVC_PF_THREADS, 0, s>>>(p, g); break;
    case 4: kvc_pf_partial_kernel<4, KD, RT><<<grid, KVC_PF_THREADS, 0, s>>>(p, g); break;
    default: kvc_pf_partial_kernel<8, KD, RT><<<grid, KVC_PF_THREADS, 0, s>>>(p, g); break;
    }
    KVC_CUDA_LAUNCHED();
    return KVC_OK;
}

template <int RT>
static enum kvc_status kvc_pf_launch_rows(const kvc_packed_attention_params &p, const kvc_pa_geom &g,
                                          cudaStream_t s)
{
    if (g.D == 64) return kvc_pf_launch_bits<64, RT>(p, g, s);
    if (g.D == 128) return kvc_pf_launch_bits<128, RT>(p, g, s);
    if constexpr (RT <= 4) return kvc_pf_launch_bits<256, RT>(p, g, s);
    return KVC_ERR_UNSUPPORTED; /* kvc_pf_fits refuses it */
}

enum kvc_status kvc_pf_launch(const kvc_packed_attention_params &p, const kvc_pa_geom &g, cudaStream_t s)
{
    switch (kvc_pf_rows(g.R)) {
    case 1: return kvc_pf_launch_rows<1>(p, g, s);
    case 4: return kvc_pf_launch_rows<4>(p, g, s);
    default: return kvc_pf_launch_rows<KVC_PF_MAX_RT>(p, g, s);
    }
}
