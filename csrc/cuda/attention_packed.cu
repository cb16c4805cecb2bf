/*
 * attention_packed.cu - attention over a KIVI-packed layer plus a
 * full-precision residual window (attention_packed.c) on the GPU: split-K
 * (flash-decoding), the same algebraic form as the CPU op.
 *
 * Pass 1 for decode-sized problems (at most 8 query rows per kv head, 4
 * with head_dim 256; head_dim 64/128/256, G a power of two >= 32, 16-byte aligned code rows)
 * is the tiled kernel of attention_packed_tiled.cu (a slot per thread for
 * the logits). Everything else takes the generic kernel here: rows of one
 * kv head are its g * q query rows, query-major (row r = i * g + gi), in
 * tiles of KVC_PA_RT rows, so each packed row is read once for the whole
 * GQA group. Block (head and row tile, split) walks one contiguous range of
 * the head's logical slots (packed, then residual); its warps take
 * consecutive quarters of the range, lanes own channels (their byte
 * offsets, shifts and value groups computed once). A warp loads the codes,
 * value scales and mins of up to U packed slots of one key group before
 * using any, then per slot extracts its channels' codes centred
 * (kvc_pk_centred): keys against the query scaled per (token group,
 * channel), recomputed when the slot enters a new group, plus the bias
 * scaling * q . centre; values weighted by w_j scale_ju, with w_j centre_ju
 * summed apart and added once at the end. The warps' states merge through
 * shared memory in warp order into an unnormalised partial.
 *
 * Pass 2 (both kernels): one block per row combines the splits by
 * log-sum-exp in a fixed order (split_combine.cuh, shared with
 * attention.cu). The split of a head comes from its own length
 * and the host's split count, so both passes agree without the host reading
 * lengths; results depend on the shapes, the GPU and the build, never on
 * timing.
 */

#include <stdlib.h>
#include <string.h>

#include "attention_packed.cuh"
#include "split_combine.cuh"

#define KVC_PA_THREADS 128
#define KVC_PA_WARPS (KVC_PA_THREADS / 32)
#define KVC_PA_EPL (KVC_PA_MAX_D / 32) /* channels per lane at most */
#define KVC_PA_COMBINE_THREADS 128

/* One slot's logit x (-INFINITY: not seen) into a row's online softmax:
 * its weight and the factor that rescales what the row holds so far. */
__device__ __forceinline__ void kvc_pa_admit(kvc_softmax_state *st, float x, float *pw, float *alpha)
{
    if (x == -INFINITY) {
        *pw = 0.0f;
        *alpha = 1.0f;
        return;
    }
    *alpha = kvc_softmax_rescale(st, x);
    *pw = kvc_expf(x - st->m);
    st->s += *pw;
}

/* Pass 1: block (head and row tile, split). DT: dtype of q and the residual;
 * EPL: channels per lane, D <= 32 * EPL (fewer registers for small heads). */
template <int DT, int EPL>
static __global__ void __launch_bounds__(KVC_PA_THREADS)
    kvc_pa_partial_kernel(const kvc_packed_attention_params p, const kvc_pa_geom g)
{
    constexpr int RT = KVC_PA_RT, NW = KVC_PA_WARPS;
    /* packed slots whose loads are in flight together (fewer for wide heads:
     * registers) */
    constexpr int U = EPL >= 8 ? 1 : 4;
    constexpr int64_t es = DT == KVC_F32 ? 4 : 2;
    __shared__ float sm_m[NW][RT], sm_s[NW][RT];
    __shared__ float sm_acc[NW][RT][KVC_PA_MAX_D];

    const int64_t bh = blockIdx.x / g.ntiles, t = blockIdx.x % g.ntiles;
    const int64_t b = bh / g.Hkv, hk = bh % g.Hkv, split = blockIdx.y;
    const int D = (int)g.D, bits = g.bits, vbits = g.vbits, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int64_t n, s0, off, chunk, count;
    kvc_pa_head(p, b, hk, &n, &s0, &off);
    const int64_t end = kvc_pa_tile_end(g, n, t);
    kvc_pa_split(end - s0, g.nsplit, &chunk, &count);
    /* pass 2 reads only the splits below count: nothing to write here */
    if (split >= count) return;
    const int64_t j0 = s0 + split * chunk, j1 = j0 + chunk < end ? j0 + chunk : end;
    const int64_t share = kvc_ceil_div(j1 - j0, NW);
    const int64_t w0 = j0 + warp * share < j1 ? j0 + warp * share : j1;
    const int64_t w1 = w0 + share < j1 ? w0 + share : j1;

    const kvc_pa_ptrs h = kvc_pa_pointers(p, g, b, hk, off);

    /* Everything about the lane's channels that does not depend on the slot,
     * once: 64-bit divisions per element and slot (code byte, shift, value
     * group) made this loop ~20x slower than fp16 attention on an H200. */
    const int lg_per = bits == 2 ? 2 : (bits == 4 ? 1 : 0); /* log2(8 / bits) */
    const int vlg_per = vbits == 2 ? 2 : (vbits == 4 ? 1 : 0);
    const uint32_t mask = kvc_pk_mask(bits), vmask = kvc_pk_mask(vbits);
    int64_t kbo[EPL], vbo[EPL], vgm[EPL], vgs[EPL];
    int sh[EPL], vsh[EPL];
#pragma unroll
    for (int e = 0; e < EPL; e++) {
        const int c = lane + 32 * e < D ? lane + 32 * e : 0;
        const int u = c / (int)g.G; /* G >= 1; c < 256 */
        kbo[e] = (int64_t)(c >> lg_per) * h.kcd;
        vbo[e] = (int64_t)(c >> vlg_per) * h.vcd;
        sh[e] = (c & ((1 << lg_per) - 1)) * bits;
        vsh[e] = (c & ((1 << vlg_per) - 1)) * vbits;
        vgm[e] = (int64_t)u * h.vmd;
        vgs[e] = (int64_t)u * h.vsd;
    }

    /* the lane's query elements and the last logical slot each row sees */
    float qv[RT][EPL];
    int64_t lim[RT];
#pragma unroll
    for (int r = 0; r < RT; r++) {
        const int64_t row = t * RT + r, i = row / g.g;
        const bool live = row < g.R;
        const int64_t hq = hk * g.g + row % g.g;
        lim[r] = live ? kvc_pa_last(g, n, i) : -1;
#pragma unroll
        for (int e = 0; e < EPL; e++) {
            const int c = lane + 32 * e;
            qv[r][e] = live && c < D ? kvc_load_f32(p.q.data, DT, kvc_at(p.q, b, hq, live ? i : 0, c))
                                     : 0.0f;
        }
    }

    kvc_softmax_state st[RT];
    float acc[RT][EPL], cen[RT][EPL], qs[RT][EPL], bias[RT];
#pragma unroll
    for (int r = 0; r < RT; r++) {
        kvc_softmax_init(&st[r]);
        bias[r] = 0.0f;
#pragma unroll
        for (int e = 0; e < EPL; e++) acc[r][e] = cen[r][e] = qs[r][e] = 0.0f;
    }
    int64_t gend = -1; /* end of the token group qs and bias belong to */

    /* Packed slots go U at a time: every global load of the group of
     * slots is issued before any of them is used, so their latencies overlap
     * (one slot at a time, each waited for its loads: ~1-3% of bandwidth).
     * The arithmetic per slot is unchanged and in slot order. */
    int64_t j = w0;
    const int64_t pend = w1 < n ? w1 : n;
    while (j < pend) {
        if (j >= gend) {
            /* a new token group (slots only grow): the query scaled per
             * channel, the bias */
            const int64_t tg = j / g.G;
            gend = (tg + 1) * g.G;
#pragma unroll
            for (int r = 0; r < RT; r++) {
                float part = 0.0f;
#pragma unroll
                for (int e = 0; e < EPL; e++) {
                    const int c = lane + 32 * e;
                    qs[r][e] = 0.0f;
                    if (c < D) {
                        const float sc = h.ks[tg * h.kss + c * h.ksd];
                        qs[r][e] = qv[r][e] * sc;
                        part = fmaf(qv[r][e], kvc_pk_centre(h.km[tg * h.kms + c * h.kmd], sc, bits), part);
                    }
                }
                bias[r] = p.scaling * kvc_warp_sum(part);
            }
        }
        /* slots of this key group, at most U */
        const int64_t stop = pend < gend ? pend : gend;
        const int cnt = stop - j < U ? (int)(stop - j) : U;
        uint8_t kb[U][EPL], vb[U][EPL];
        float vsc[U][EPL], vmn[U][EPL], lcs[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (u >= cnt) continue;
            const int64_t ju = j + u;
            const uint8_t *krow = h.kc + ju * h.kcs, *vrow = h.vc + ju * h.vcs;
            const float *vmr = h.vm + ju * h.vms, *vsr = h.vs + ju * h.vss;
#pragma unroll
            for (int e = 0; e < EPL; e++) {
                kb[u][e] = krow[kbo[e]];
                vb[u][e] = vrow[vbo[e]];
                vsc[u][e] = vsr[vgs[e]];
                vmn[u][e] = vmr[vgm[e]];
            }
            lcs[u] = h.cn != NULL ? kvc_logf(h.cn[ju * h.cs]) : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (u >= cnt) continue;
            const int64_t ju = j + u;
            float dot[RT];
#pragma unroll
            for (int r = 0; r < RT; r++) {
                float a = 0.0f;
#pragma unroll
                for (int e = 0; e < EPL; e++) {
                    const float kf = lane + 32 * e < D ? kvc_pk_centred(((uint32_t)kb[u][e] >> sh[e]) & mask, bits)
                                                       : 0.0f;
                    a = fmaf(qs[r][e], kf, a);
                }
                dot[r] = a;
            }
#pragma unroll
            for (int o = 16; o > 0; o /= 2)
#pragma unroll
                for (int r = 0; r < RT; r++) dot[r] += __shfl_xor_sync(KVC_PA_FULL, dot[r], o);
            float pw[RT], alpha[RT];
#pragma unroll
            for (int r = 0; r < RT; r++)
                kvc_pa_admit(&st[r], ju <= lim[r] ? dot[r] * p.scaling + (bias[r] + lcs[u]) : -INFINITY, &pw[r],
                             &alpha[r]);
#pragma unroll
            for (int e = 0; e < EPL; e++) {
                if (lane + 32 * e >= D) continue;
                const float sc = vsc[u][e];
                const float ce = kvc_pk_centre(vmn[u][e], sc, vbits);
                const float cv = kvc_pk_centred(((uint32_t)vb[u][e] >> vsh[e]) & vmask, vbits);
#pragma unroll
                for (int r = 0; r < RT; r++) {
                    acc[r][e] = fmaf(pw[r] * sc, cv, acc[r][e] * alpha[r]);
                    cen[r][e] = fmaf(pw[r], ce, cen[r][e] * alpha[r]);
                }
            }
        }
        j += cnt;
    }

    /* the residual slots of the range, one at a time (at most a few hundred) */
    for (j = w0 > n ? w0 : n; j < w1; j++) {
        float kf[EPL], dot[RT], pw[RT], alpha[RT];
        const char *rrow = h.rk + (j - n) * h.rks * es;
#pragma unroll
        for (int e = 0; e < EPL; e++) {
            const int c = lane + 32 * e;
            kf[e] = c < D ? kvc_load_f32(rrow, DT, c * h.rkd) : 0.0f;
        }
#pragma unroll
        for (int r = 0; r < RT; r++) {
            float a = 0.0f;
#pragma unroll
            for (int e = 0; e < EPL; e++) a = fmaf(qv[r][e], kf[e], a);
            dot[r] = a;
        }
#pragma unroll
        for (int o = 16; o > 0; o /= 2)
#pragma unroll
            for (int r = 0; r < RT; r++) dot[r] += __shfl_xor_sync(KVC_PA_FULL, dot[r], o);
#pragma unroll
        const float lc = kvc_pa_residual_logc(h, j - n);
#pragma unroll
        for (int r = 0; r < RT; r++)
            kvc_pa_admit(&st[r], j <= lim[r] ? dot[r] * p.scaling + lc : -INFINITY, &pw[r], &alpha[r]);
        const char *vrow = h.rv + (j - n) * h.rvs * es;
#pragma unroll
        for (int e = 0; e < EPL; e++) {
            const int c = lane + 32 * e;
            const float v = c < D ? kvc_load_f32(vrow, DT, c * h.rvd) : 0.0f;
#pragma unroll
            for (int r = 0; r < RT; r++) {
                acc[r][e] = fmaf(pw[r], v, acc[r][e] * alpha[r]);
                cen[r][e] *= alpha[r];
            }
        }
    }

    /* the warps' states, merged in warp order */
#pragma unroll
    for (int r = 0; r < RT; r++) {
        if (lane == 0) {
            sm_m[warp][r] = st[r].m;
            sm_s[warp][r] = st[r].s;
        }
#pragma unroll
        for (int e = 0; e < EPL; e++) {
            const int c = lane + 32 * e;
            if (c < D) sm_acc[warp][r][c] = acc[r][e] + cen[r][e];
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < RT * D; idx += KVC_PA_THREADS) {
        const int r = idx / D, c = idx % D;
        const int64_t row = t * RT + r;
        if (row >= g.R) continue;
        float M = -INFINITY, a = 0.0f;
#pragma unroll
        for (int w = 0; w < NW; w++) M = fmaxf(M, sm_m[w][r]);
#pragma unroll
        for (int w = 0; w < NW; w++) a += kvc_softmax_weight(sm_m[w][r], M) * sm_acc[w][r][c];
        const int64_t pi = (bh * g.R + row) * g.nsplit + split;
        g.pacc[pi * g.D + c] = a;
        if (c == 0) {
            float L = 0.0f;
#pragma unroll
            for (int w = 0; w < NW; w++) L += kvc_softmax_weight(sm_m[w][r], M) * sm_s[w][r];
            g.pm[pi] = M;
            g.ps[pi] = L;
        }
    }
}

/* Pass 2: one block per row of out (split_combine.cuh), then the row's
 * log-sum-exp when asked. */
static __global__ void __launch_bounds__(KVC_PA_COMBINE_THREADS)
    kvc_pa_combine_kernel(const kvc_packed_attention_params p, const kvc_pa_geom g)
{
    const int64_t grow = blockIdx.x;
    const int64_t bh = grow / g.R, row = grow % g.R;
    const int64_t b = bh / g.Hkv, hk = bh % g.Hkv, i = row / g.g, hq = hk * g.g + row % g.g;
    const int64_t count = kvc_pa_count(p, g, b, hk, row);
    const int64_t p0 = grow * g.nsplit;
    const int64_t es = p.out.dtype == KVC_F32 ? 4 : 2;
    float M, L;
    kvc_split_combine<KVC_PA_COMBINE_THREADS / 32, KVC_PA_MAX_D>(
        g.pm, g.ps, g.pacc, p0, count, g.D,
        (char *)p.out.data + kvc_at(p.out, b, i, hq, 0) * es, p.out.dtype, p.out.strides[3], &M, &L);
    if (threadIdx.x == 0 && p.lse.data)
        ((float *)p.lse.data)[b * p.lse.strides[0] + hq * p.lse.strides[1] + i * p.lse.strides[2]] =
            M == -INFINITY ? -INFINITY : M + kvc_logf(L);
}

/* KVCOMPRESS_CUDA_PACKED_KERNEL=generic sends every problem to the generic
 * kernel: benchmarks time both kernels in one run and the consistency
 * suite checks both (read per call, so a process can switch). */
static bool kvc_pa_generic_forced(void)
{
    const char *v = getenv("KVCOMPRESS_CUDA_PACKED_KERNEL");
    return v != NULL && strcmp(v, "generic") == 0;
}

/* Shapes -> geometry (no device reads); nsplit bounds every head's splits
 * and sizes the workspace. False for an empty problem. */
static bool kvc_pa_geometry(const kvc_packed_attention_params *p, kvc_pa_geom *g)
{
    g->B = p->q.shape[0];
    g->Hkv = p->num_kv_heads;
    g->nq = p->q.shape[2];
    g->D = p->q.shape[3];
    g->r = p->res_k.shape[2];
    g->G = p->group;
    g->bits = p->bits;
    g->vbits = p->value_bits ? p->value_bits : p->bits;
    if (g->B <= 0 || p->q.shape[1] <= 0 || g->nq <= 0 || g->D <= 0 || g->Hkv <= 0) return false;
    g->g = p->q.shape[1] / g->Hkv;
    g->R = g->g * g->nq;
    g->ntiles = kvc_ceil_div(g->R, KVC_PA_RT);
    const int64_t bh = g->B * g->Hkv;
    const int64_t navg = (p->layout == KVC_KV_RAGGED ? kvc_ceil_div(p->key_codes.shape[0], bh)
                                                     : p->key_codes.shape[2]) + g->r;
    g->nsplit = kvc_cuda_nsplit(navg, KVC_PA_MIN_CHUNK, kvc_cuda_sm_count() * KVC_PA_BLOCKS_PER_SM,
                                bh * g->ntiles);
    g->tiled = kvc_pf_fits(*p, *g) && !kvc_pa_generic_forced();
    g->tsplit = g->tiled ? kvc_pf_splits(*p, *g) : 0;
    g->res_vec = g->tiled && kvc_pf_residual_vectors(*p);
    /* the workspace holds either kernel's partials */
    if (g->tsplit > g->nsplit) g->nsplit = g->tsplit;
    g->pm = g->ps = g->pacc = NULL;
    return true;
}

extern "C" size_t kvc_cuda_packed_attention_workspace(const struct kvc_packed_attention_params *p)
{
    kvc_pa_geom g;
    if (!kvc_pa_geometry(p, &g)) return 0;
    return kvc_cuda_split_workspace(g.B * g.Hkv * g.R * g.nsplit, g.D);
}

template <int DT>
static enum kvc_status kvc_pa_run(const kvc_packed_attention_params &p, const kvc_pa_geom &g,
                                  cudaStream_t s)
{
    if (g.tiled) {
        const enum kvc_status st = kvc_pf_launch(p, g, s);
        if (st != KVC_OK) return st;
        kvc_pa_combine_kernel<<<(unsigned)(g.B * g.Hkv * g.R), KVC_PA_COMBINE_THREADS, 0, s>>>(p, g);
        KVC_CUDA_LAUNCHED();
        return KVC_OK;
    }
    const dim3 grid((unsigned)(g.B * g.Hkv * g.ntiles), (unsigned)g.nsplit);
    if (g.D <= 64)
        kvc_pa_partial_kernel<DT, 2><<<grid, KVC_PA_THREADS, 0, s>>>(p, g);
    else if (g.D <= 128)
        kvc_pa_partial_kernel<DT, 4><<<grid, KVC_PA_THREADS, 0, s>>>(p, g);
    else
        kvc_pa_partial_kernel<DT, KVC_PA_EPL><<<grid, KVC_PA_THREADS, 0, s>>>(p, g);
    KVC_CUDA_LAUNCHED();
    kvc_pa_combine_kernel<<<(unsigned)(g.B * g.Hkv * g.R), KVC_PA_COMBINE_THREADS, 0, s>>>(p, g);
    KVC_CUDA_LAUNCHED();
    return KVC_OK;
}

extern "C" enum kvc_status kvc_cuda_packed_attention(const struct kvc_packed_attention_params *p,
                                                     void *stream)
{
    kvc_pa_geom g;
    if (p->layout != KVC_KV_UNIFORM && p->layout != KVC_KV_RAGGED) return KVC_ERR_INVALID;
    if (p->bits != 2 && p->bits != 4 && p->bits != 8) return KVC_ERR_INVALID;
    if (p->value_bits != 0 && p->value_bits != 2 && p->value_bits != 4 && p->value_bits != 8)
        return KVC_ERR_INVALID;
    if (p->group < 1) return KVC_ERR_INVALID;
    /* residual queries of their own: the CPU kernel's (the store joins two calls here) */
    if (p->res_q.data != NULL) return KVC_ERR_UNSUPPORTED;
    /* a hidden stretch of residual rows per head: the CPU kernel's too (the store joins calls here) */
    if (p->res_hidden != NULL) return KVC_ERR_UNSUPPORTED;
    if (!kvc_pa_geometry(p, &g)) return KVC_OK;
    if (p->q.shape[1] % p->num_kv_heads != 0 || (g.r != 0 && g.r < g.nq)) return KVC_ERR_INVALID;
    if (g.D > KVC_PA_MAX_D) return KVC_ERR_UNSUPPORTED;
    const int32_t dt = p->q.dtype;
    if ((dt != KVC_F32 && dt != KVC_F16 && dt != KVC_BF16) || p->res_k.dtype != dt ||
        p->res_v.dtype != dt || p->out.dtype != dt)
        return KVC_ERR_UNSUPPORTED;
    if (p->key_codes.dtype != KVC_U8 || p->value_codes.dtype != KVC_U8 ||
        p->key_mins.dtype != KVC_F32 || p->key_scales.dtype != KVC_F32 ||
        p->value_mins.dtype != KVC_F32 || p->value_scales.dtype != KVC_F32 ||
        (p->counts.data != NULL && p->counts.dtype != KVC_F32))
        return KVC_ERR_UNSUPPORTED;
    if (!kvc_packed_res_counts_fit(p)) return KVC_ERR_INVALID;
    if (g.B * g.Hkv * g.ntiles > INT32_MAX || g.B * g.Hkv * g.R > INT32_MAX)
        return KVC_ERR_UNSUPPORTED;
    if (p->scratch == NULL || p->scratch_bytes < kvc_cuda_packed_attention_workspace(p))
        return KVC_ERR_NOMEM;

    const size_t np = (size_t)(g.B * g.Hkv * g.R * g.nsplit);
    char *cur = (char *)(((uintptr_t)p->scratch + (KVC_ALIGN - 1)) & ~(uintptr_t)(KVC_ALIGN - 1));
    g.pm = (float *)cur;
    g.ps = (float *)(cur + kvc_align_up(np * sizeof(float)));
    g.pacc = (float *)(cur + 2 * kvc_align_up(np * sizeof(float)));

    const cudaStream_t s = KVC_STREAM(stream);
    switch (dt) {
    case KVC_F16: return kvc_pa_run<KVC_F16>(*p, g, s);
    case KVC_BF16: return kvc_pa_run<KVC_BF16>(*p, g, s);
    default: return kvc_pa_run<KVC_F32>(*p, g, s);
    }
}
