/*
 * attention_packed.cuh - what the two packed decode kernels share
 * (attention_packed.cu: any shape; attention_packed_tiled.cu: a slot per
 * thread for decode-sized row counts): the geometry fixed on the host, a
 * head's extent, and the split of a head's slots that pass 1 and the
 * combine pass must both derive without the host reading lengths.
 */
#ifndef KVC_CUDA_ATTENTION_PACKED_CUH
#define KVC_CUDA_ATTENTION_PACKED_CUH

#include "../attention_packed_math.h"
#include "common.cuh"
#include "split_combine.cuh"

#define KVC_PA_RT 4            /* rows per block of the generic kernel */
#define KVC_PA_MAX_D 256
#define KVC_PA_MIN_CHUNK 256   /* fewer slots per split cost more in partials than they gain */
#define KVC_PA_CHUNK_ALIGN 32
#define KVC_PA_BLOCKS_PER_SM 4
#define KVC_PA_FULL 0xffffffffu

/* The tiled kernel: a tile of KVC_PF_TILE logical slots per step, one per
 * thread for the logits; at most KVC_PF_MAX_RT rows per kv head. */
#define KVC_PF_TILE 128
#define KVC_PF_MAX_RT 8

/* Shapes and the partials' place in scratch, fixed on the host. */
struct kvc_pa_geom {
    int64_t B, Hkv, g, nq, D, r, G;
    int64_t R;      /* rows per kv head: g * nq */
    int64_t ntiles; /* row tiles of the generic kernel: ceil(R / KVC_PA_RT) */
    int64_t nsplit; /* splits per (head, row tile) at most: sizes the workspace */
    int64_t tsplit; /* splits per head of the tiled kernel (<= nsplit) */
    int bits, vbits; /* key and value code widths */
    bool tiled;     /* pass 1 is the tiled kernel (all R rows of a head in one block) */
    bool res_vec;   /* residual rows contiguous and 16-byte aligned: the tiled kernel's vector loads */
    float *pm, *ps, *pacc; /* [B * Hkv * R][nsplit] (x D for pacc) */
};

/* Packed slots n, first valid logical slot s0 and (ragged) first row off
 * of kv head (b, hk). kv_start counts logical slots (packed, then
 * residual) in either layout: a ragged head's masked prefix is its row's
 * value, the module having checked it against the head's own n + r. */
__device__ __forceinline__ void kvc_pa_head(const kvc_packed_attention_params &p, int64_t b,
                                            int64_t hk, int64_t *n, int64_t *s0, int64_t *off)
{
    if (p.layout == KVC_KV_RAGGED) {
        const int64_t i = b * p.num_kv_heads + hk;
        *off = p.offsets[i * p.offsets_stride];
        *n = p.lengths[i * p.lengths_stride];
        *s0 = p.kv_start ? p.kv_start[b * p.kv_start_stride] : 0;
    } else {
        *off = 0;
        *n = p.key_codes.shape[2];
        *s0 = p.kv_start ? p.kv_start[b * p.kv_start_stride] : 0;
    }
}

/* Where kv head (b, hk), first ragged row off, keeps its packed views and
 * residual rows, and their slot (s) and channel/group (d) strides in
 * elements; es: bytes per residual element (the queries' dtype). */
struct kvc_pa_ptrs {
    const uint8_t *kc, *vc;
    const float *km, *ks, *vm, *vs, *cn; /* cn NULL: no counts */
    const char *rk, *rv;
    const float *rc; /* residual counts, NULL: every residual slot counts 1 */
    int64_t kcs, kcd, vcs, vcd, kms, kmd, kss, ksd, vms, vmd, vss, vsd, cs;
    int64_t rks, rkd, rvs, rvd, rcs, es;
};

__device__ __forceinline__ kvc_pa_ptrs kvc_pa_pointers(const kvc_packed_attention_params &p, const kvc_pa_geom &g,
                                                       int64_t b, int64_t hk, int64_t off)
{
    kvc_pa_ptrs h;
    const bool ragged = p.layout == KVC_KV_RAGGED;
    const int sd = ragged ? 0 : 2; /* slot (or token group) dim of the packed views */
    /* a ragged head's rows start at off (a multiple of G), its key groups at off / G */
    const int64_t t0 = ragged ? off / g.G : 0;
    /* element offset of the head in view v, whose ragged rows start at row */
    const auto at = [&](const kvc_view &v, int64_t row) {
        return ragged ? row * v.strides[0] : b * v.strides[0] + hk * v.strides[1];
    };
    h.kc = (const uint8_t *)p.key_codes.data + at(p.key_codes, off);
    h.vc = (const uint8_t *)p.value_codes.data + at(p.value_codes, off);
    h.km = (const float *)p.key_mins.data + at(p.key_mins, t0);
    h.ks = (const float *)p.key_scales.data + at(p.key_scales, t0);
    h.vm = (const float *)p.value_mins.data + at(p.value_mins, off);
    h.vs = (const float *)p.value_scales.data + at(p.value_scales, off);
    h.cn = p.counts.data == NULL ? NULL : (const float *)p.counts.data + at(p.counts, off);
    h.kcs = p.key_codes.strides[sd], h.kcd = p.key_codes.strides[sd + 1];
    h.vcs = p.value_codes.strides[sd], h.vcd = p.value_codes.strides[sd + 1];
    h.kms = p.key_mins.strides[sd], h.kmd = p.key_mins.strides[sd + 1];
    h.kss = p.key_scales.strides[sd], h.ksd = p.key_scales.strides[sd + 1];
    h.vms = p.value_mins.strides[sd], h.vmd = p.value_mins.strides[sd + 1];
    h.vss = p.value_scales.strides[sd], h.vsd = p.value_scales.strides[sd + 1];
    h.cs = p.counts.strides[sd];
    h.es = p.q.dtype == KVC_F32 ? 4 : 2;
    h.rk = (const char *)p.res_k.data + kvc_at(p.res_k, b, hk, 0, 0) * h.es;
    h.rv = (const char *)p.res_v.data + kvc_at(p.res_v, b, hk, 0, 0) * h.es;
    h.rks = p.res_k.strides[2], h.rkd = p.res_k.strides[3];
    h.rvs = p.res_v.strides[2], h.rvd = p.res_v.strides[3];
    h.rc = p.res_counts.data == NULL ? NULL
                                     : (const float *)p.res_counts.data + b * p.res_counts.strides[0] +
                                           hk * p.res_counts.strides[1];
    h.rcs = p.res_counts.strides[2];
    return h;
}

/* log count of residual slot s (0: count 1), as the CPU kernel adds it. */
__device__ __forceinline__ float kvc_pa_residual_logc(const kvc_pa_ptrs &h, int64_t s)
{
    return h.rc != NULL ? kvc_logf(h.rc[s * h.rcs]) : 0.0f;
}

/* Last logical slot query i sees: the queries are the last nq residual
 * slots, or with no residual (r = 0) come after every packed slot. */
__device__ __forceinline__ int64_t kvc_pa_last(const kvc_pa_geom &g, int64_t n, int64_t i)
{
    return g.r ? n + g.r - g.nq + i : n - 1;
}

/* End (exclusive) of the logical slots row tile t of the generic kernel sees. */
__device__ __forceinline__ int64_t kvc_pa_tile_end(const kvc_pa_geom &g, int64_t n, int64_t t)
{
    const int64_t last = (t + 1) * KVC_PA_RT < g.R ? (t + 1) * KVC_PA_RT - 1 : g.R - 1;
    return kvc_pa_last(g, n, last / g.g) + 1;
}

/* Generic kernel: slots per split and the splits that hold any. */
__device__ __forceinline__ void kvc_pa_split(int64_t span, int64_t nsplit, int64_t *chunk,
                                             int64_t *count)
{
    kvc_split_chunks(span, nsplit, KVC_PA_CHUNK_ALIGN, KVC_PA_MIN_CHUNK, chunk, count);
}

/* Tiled kernel: a head's logical slots [s0, n + r) in whole tiles of
 * KVC_PF_TILE aligned to slot 0 (so a warp's 32 slots share one key token
 * group when G is a multiple of 32): the first tile *t0, tiles per split
 * *per, splits that hold any *count. */
__device__ __forceinline__ void kvc_pf_split(int64_t s0, int64_t end, int64_t tsplit, int64_t *t0,
                                             int64_t *per, int64_t *count)
{
    *t0 = s0 / KVC_PF_TILE;
    const int64_t nt = end > s0 ? kvc_ceil_div(end, KVC_PF_TILE) - *t0 : 0;
    *per = nt > 0 ? kvc_ceil_div(nt, tsplit) : 1;
    *count = nt > 0 ? kvc_ceil_div(nt, *per) : 0;
}

/* Splits row `row` of kv head (b, hk) was given by pass 1. */
__device__ __forceinline__ int64_t kvc_pa_count(const kvc_packed_attention_params &p, const kvc_pa_geom &g,
                                                int64_t b, int64_t hk, int64_t row)
{
    int64_t n, s0, off, a, c, count;
    kvc_pa_head(p, b, hk, &n, &s0, &off);
    if (g.tiled)
        kvc_pf_split(s0, n + g.r, g.tsplit, &a, &c, &count);
    else
        kvc_pa_split(kvc_pa_tile_end(g, n, row / KVC_PA_RT) - s0, g.nsplit, &a, &count);
    return count;
}

/* Host: whether the tiled kernel takes this problem (shapes, strides and
 * pointer alignment only: no device reads). */
bool kvc_pf_fits(const kvc_packed_attention_params &p, const kvc_pa_geom &g);
/* Host: whether the residual rows allow the tiled kernel's 16-byte loads. */
bool kvc_pf_residual_vectors(const kvc_packed_attention_params &p);
/* Host: split count of the tiled kernel for its (b, head) blocks. */
int64_t kvc_pf_splits(const kvc_packed_attention_params &p, const kvc_pa_geom &g);
/* Host: launch the tiled pass 1 (g.tiled, scratch laid out). */
enum kvc_status kvc_pf_launch(const kvc_packed_attention_params &p, const kvc_pa_geom &g, cudaStream_t s);

#endif /* KVC_CUDA_ATTENTION_PACKED_CUH */
