/*
 * attention_packed.h - decode/chunk attention over a KIVI-packed layer plus
 * a full-precision residual window (docs/packed.md).
 *
 * The packed part keeps keys quantized per channel in groups of G tokens and
 * values per token in groups of G channels, as bits-wide codes (2, 4 or 8)
 * with fp32 min and scale per group; the newest r slots of every head stay
 * in the dtype of the queries. The op never forms dequantized rows: key
 * logits come from the codes and the query scaled per (token group,
 * channel), values from the codes weighted per (token, channel group).
 */
#ifndef KVC_ATTENTION_PACKED_H
#define KVC_ATTENTION_PACKED_H

#include "attention.h"
#include "kvc.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * For batch b, query head h (kv head hk = h / (Hq / Hkv)) and query i < q,
 * over the logical sequence of head (b, hk): its n_h packed slots, then the
 * r residual slots (slot n_h + j is residual row j):
 *
 *   out[b, i, h, :] = sum_j w_j v_j / sum_j w_j,
 *   w_j = exp(scaling * q[b, h, i] . k_j + log(counts_j))  (packed slots
 *                                with counts, residual slots with res_counts;
 *                                                            else count 1)
 *
 *   packed slot j, token group t = j / G, channel group u = c / G:
 *     q . k_j = sum_c (q_c key_scales[t, c]) code_jc + sum_c q_c key_mins[t, c]
 *     v_jc    = value_scales[j, u] code_jc + value_mins[j, u]
 *
 * The queries are the last q residual slots (r >= q): query i sees slots
 * s0 .. n_h + r - q + i. With no residual (r = 0) the queries come after
 * the whole layer and each sees s0 .. n_h - 1 (a packed part read on its
 * own, combined with others through lse). Uniform: n_h = n, s0 = kv_start[b] (0 without; it
 * may reach into the residual); ragged: n_h = lengths[b * Hkv + hk], s0 = kv_start[b] too
 * (0 without; a row-mode store's sliding window, cuda/attention_packed.cuh reads it alike),
 * packed slot j is row offsets[b * Hkv + hk] + j of the codes, value
 * min/scale and counts, and its key group row offsets[.] / G + t (offsets
 * are multiples of G). A query that sees no slot gets zeros.
 *
 * Online softmax in fp32; each (b, hk, tile of queries) is cut into fixed
 * blocks of slots for short chunks (split-K), combined by log-sum-exp in
 * block order: bit-identical for any thread count.
 *
 * With res_q the residual slots' logits use res_q[b, h, i] instead of
 * q[b, h, i] (the packed slots' stay with q). With res_hidden no query of
 * head (b, hk) sees its residual rows res_hidden[i, 0] <= j <
 * res_hidden[i, 1], i = b * Hkv + hk (a hole in its residual).
 */
struct kvc_packed_attention_params {
    struct kvc_view q;            /* [B, Hq, q, D], f32/f16/bf16 */
    struct kvc_view key_codes;    /* uniform [B, Hkv, n, Db] / ragged [N, Db], u8, Db = ceil(D bits / 8) */
    struct kvc_view key_mins;     /* uniform [B, Hkv, ceil(n/G), D] / ragged [ceil(N/G), D], f32 */
    struct kvc_view key_scales;   /* as key_mins */
    struct kvc_view value_codes;  /* as key_codes, Db of the value width */
    struct kvc_view value_mins;   /* uniform [B, Hkv, n, ceil(D/G)] / ragged [N, ceil(D/G)], f32 */
    struct kvc_view value_scales; /* as value_mins */
    struct kvc_view res_k;        /* [B, Hkv, r, D], dtype of q, r >= q or r = 0 */
    struct kvc_view res_v;        /* as res_k (strides may differ) */
    struct kvc_view res_q;        /* optional, as q: the queries the residual slots are read with; data NULL:
                                   * q. Rotated keys (KIVI(rotate=True)) read the packed part with q R and
                                   * the residual, kept as it came, with q: one call, no join. CPU only. */
    struct kvc_view out;          /* [B, q, Hq, D], dtype of q */
    struct kvc_view counts;       /* optional f32 [B, Hkv, n] / [N], each >= 1; data NULL: none */
    struct kvc_view res_counts;   /* optional f32 [B, Hkv, r], each finite > 0: residual slot counts (a
                                   * per-head layer's sink block keeps its merge counts); data NULL: 1 */
    struct kvc_view lse;          /* optional f32 [B, Hq, q] out: log sum_j w_j, -inf for a row that
                                   * sees no slot; data NULL: none */
    const int64_t *kv_start;      /* optional [B]: leading masked slots, <= n_h + r; NULL: none */
    int64_t kv_start_stride;
    const int64_t *offsets;       /* ragged [B * Hkv]: first row of each head, a multiple of G */
    int64_t offsets_stride;
    const int64_t *lengths;       /* ragged [B * Hkv]: packed slots of each head, >= 0 */
    int64_t lengths_stride;
    const int64_t *res_hidden;    /* optional [B * Hkv, 2], either layout: head (b, hk) sees no residual
                                   * row in [lo, hi) = res_hidden[b * Hkv + hk, 0..1], 0 <= lo <= hi <= r;
                                   * its packed slots and other rows stay seen. The uniform store's row
                                   * mode: a left-padded row keeps, between its sink block and its own
                                   * residual, rows of the shared buffers that other rows still need.
                                   * NULL: none. CPU only. */
    int64_t res_hidden_stride, res_hidden_col;
    int64_t num_kv_heads;         /* Hkv; Hq must be a multiple */
    int64_t group;                /* G >= 1 */
    int32_t bits;                 /* 2, 4 or 8: width of the key codes (and of the values without value_bits) */
    int32_t value_bits;           /* 2, 4 or 8: width of the value codes; 0: bits */
    int32_t layout;               /* enum kvc_kv_layout */
    float scaling;
    int32_t num_threads;
    void *scratch;                /* kvc_packed_attention_scratch_bytes() bytes */
    size_t scratch_bytes;
};

/* Whether the optional residual counts are absent or f32 [B, Hkv, r] as
 * res_k (the CPU and CUDA kernels both require it). */
static inline int kvc_packed_res_counts_fit(const struct kvc_packed_attention_params *p)
{
    int d;
    if (p->res_counts.data == NULL) return 1;
    if (p->res_counts.ndim != 3 || p->res_counts.dtype != KVC_F32) return 0;
    for (d = 0; d < 3; d++)
        if (p->res_counts.shape[d] != p->res_k.shape[d]) return 0;
    return 1;
}

/* Reads lengths / kv_start (the split depends on them). */
size_t kvc_packed_attention_scratch_bytes(const struct kvc_packed_attention_params *p);
enum kvc_status kvc_packed_attention(const struct kvc_packed_attention_params *p);

#ifdef __cplusplus
}
#endif

#endif /* KVC_ATTENTION_PACKED_H */
