/*
 * attention.h - decode/chunk attention over one compressed layer.
 *
 * The q newest tokens (a decode step, q = 1, or an appended chunk) attend to
 * the slots a layer keeps, stored either uniform ([B, Hkv, n, D], every head
 * the same length) or ragged (one [N, D] buffer, a segment per head).
 */
#ifndef KVC_ATTENTION_H
#define KVC_ATTENTION_H

#include "kvc.h"

#ifdef __cplusplus
extern "C" {
#endif

enum kvc_kv_layout { KVC_KV_UNIFORM = 0, KVC_KV_RAGGED = 1 };

/*
 * For batch b, query head h (kv head hk = h / (Hq / Hkv)) and query i < q:
 *
 *   out[b, i, h, :] = sum_j w_j v_j / sum_j w_j,
 *   w_j = exp(scaling * q[b, h, i] . k_j + log(counts_j))   (no log term
 *                                                           without counts)
 *
 * over the slots j of head (b, hk) that query i sees: the queries are the
 * head's LAST q slots, so with n_h slots query i sees s0 .. n_h - q + i
 * (causal inside the chunk). Uniform: n_h = n, s0 = kv_start[b] (0 without);
 * ragged: n_h = lengths[b * Hkv + hk], s0 = 0, and slot j is row
 * offsets[b * Hkv + hk] + j of k, v (and counts). A query that sees no slot
 * (left padding, empty head) gets zeros.
 *
 * Paged reading (q = 1): with `pages`, head (b, hk) reads only the slots
 * of its np pages, page p being slots p * P .. min((p + 1) * P, n_h) - 1,
 * gathered by index (never copied). The pages are strictly ascending and
 * the last one is the newest page (n_h - 1) / P, so the only short page is
 * the last and the query (the last slot) reads itself; uniform: slots
 * before kv_start stay masked. Ragged: a head's list may start with any
 * number of negative entries, skipped (they pad heads that read fewer pages
 * than np); an empty head lists only those and gets zeros, every other
 * head reads at least one page, and its counts are read through the same
 * slots. The online softmax, its split and so its bits depend only on the
 * slots read: listing every page is the unpaged kernel bit for bit. The
 * binding checks all of this.
 *
 * Online softmax in fp32; each (b, hk, tile of queries) is cut into fixed
 * blocks of slots for short chunks (split-K), combined by log-sum-exp in
 * block order, so results are bit-identical for any thread count and do not
 * depend on the other heads or batch rows.
 */
struct kvc_attention_params {
    struct kvc_view q;      /* [B, Hq, q, D], f32/f16/bf16 */
    struct kvc_view k;      /* uniform [B, Hkv, n, D] / ragged [N, D], dtype of q */
    struct kvc_view v;      /* same shape and dtype as k (strides may differ) */
    struct kvc_view out;    /* [B, q, Hq, D], dtype of q */
    struct kvc_view counts; /* optional f32/i32 [B, Hkv, n] / [N], each >= 1; data NULL: none */
    const int64_t *kv_start; /* uniform, optional [B]: leading padded slots; NULL: none */
    int64_t kv_start_stride;
    const int64_t *offsets; /* ragged [B * Hkv]: first row of each head's segment */
    int64_t offsets_stride;
    const int64_t *lengths; /* ragged [B * Hkv]: slots of each head, 0 or >= q */
    int64_t lengths_stride;
    const int64_t *pages;   /* optional [B * Hkv * num_pages] (row-major [B, Hkv, np]): the
                             * pages each head reads (Quest), see below; NULL: every slot */
    int64_t num_pages;      /* np with pages: >= 1 uniform, >= 0 ragged */
    int64_t page_size;      /* P >= 1 with pages */
    int64_t num_kv_heads;   /* Hkv; Hq must be a multiple */
    int32_t layout;         /* enum kvc_kv_layout */
    float scaling;
    int32_t num_threads;
    void *scratch;          /* kvc_attention_scratch_bytes() bytes */
    size_t scratch_bytes;
};

/* Reads lengths / kv_start (the split depends on them). */
size_t kvc_attention_scratch_bytes(const struct kvc_attention_params *p);
enum kvc_status kvc_attention(const struct kvc_attention_params *p);

#ifdef __cplusplus
}
#endif

#endif /* KVC_ATTENTION_H */
