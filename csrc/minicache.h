/*
 * minicache.h - MiniCache's cross-layer merge (arXiv 2405.14366 as read in
 * docs/design.md): SLERP of two adjacent layers' key (or value) vectors
 * into one shared direction plus each layer's norm, and the reconstruction
 * attention reads.
 */
#ifndef KVC_MINICACHE_H
#define KVC_MINICACHE_H

#include "kvc.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Per token (b, h, j), with x1 = x1[b, h, j] (layer l-1) and x2 = x2[b, h, j]
 * (layer l), the math of kvc_slerp_row (minicache_math.h):
 *   dir[b, h, j]   = e, rounded once to the dtype of x1
 *   norms[b, h, j] = (|x1|, |x2|) in fp32
 *   dist[b, h, j]  = Omega / pi in [0, 1], the normalised angular distance
 *                    MiniCache's retention ranks tokens by.
 * Dot products in the fixed lane order of kvc_dot_f32; one (b, h) per work
 * item, so results do not depend on the thread count.
 */
struct kvc_slerp_merge_params {
    struct kvc_view x1;    /* [B, H, n, D] f32/f16/bf16 */
    struct kvc_view x2;    /* [B, H, n, D], dtype of x1 */
    struct kvc_view dir;   /* [B, H, n, D], dtype of x1 */
    struct kvc_view norms; /* f32 [B, H, n, 2] */
    struct kvc_view dist;  /* f32 [B, H, n] */
    float t;               /* in [0, 1] */
    int32_t num_threads;
};

enum kvc_status kvc_slerp_merge(const struct kvc_slerp_merge_params *p);

/*
 * One layer's view of a merged pair, written into out [B, H, T, D]:
 *   out[b, h, slots[b, h, i]]      = norms[b, h, i, which] * dir[b, h, i]
 *                                    (fp32 product, rounded once)
 *   out[b, h, kept_slots[b, h, i]] = kept[b, h, i]   (retained tokens, copied)
 * The slots of one (b, h) are distinct (with duplicates the CPU writes in
 * list order, merged rows first, CUDA in no fixed order).
 * A slot of -1 writes nothing (padding of a (b, h) with fewer rows than the
 * longest: after eviction each head shares a different number of tokens).
 * Rows of out named by neither are left as they are (the caller's tail).
 * Kernels trust their inputs: slot values in [-1, T) (the binding checks).
 */
struct kvc_slerp_restore_params {
    struct kvc_view dir;        /* [B, H, m, D] f32/f16/bf16 */
    struct kvc_view norms;      /* f32 [B, H, m, 2] */
    struct kvc_view slots;      /* i32/i64 [B, H, m] */
    struct kvc_view kept;       /* [B, H, r, D], dtype of dir (r may be 0) */
    struct kvc_view kept_slots; /* i32/i64 [B, H, r] */
    struct kvc_view out;        /* [B, H, T, D], dtype of dir */
    int32_t which;              /* 0: layer l-1's norm, 1: layer l's */
    int32_t num_threads;
};

enum kvc_status kvc_slerp_restore(const struct kvc_slerp_restore_params *p);

/*
 * Decode attention of one query per row over layer `which`'s view of a
 * merged pair read in place (no reconstructed copy), for query head hq of
 * kv head h = hq / (Hq / H), with s = scaling:
 *   merged rows i (slots[b, h, i] >= 0):
 *       logit = s * nk * (q . dir_k[i]) + log c,  value = nv * dir_v[i]
 *       (nk = norms_k[b, h, i, which], nv = norms_v[.., which], c =
 *       counts[b, h, i, which] or 1)
 *   whole rows i (kept_slots[b, h, i] >= 0): logit = s * (q . keys[i]) + log c
 *       (c = kept_counts[b, h, i] or 1), value = values[i]
 *   tail rows: logit = s * (q . tail_k[j]), value = tail_v[j]
 * out[b, 0, hq] = softmax-weighted sum (online softmax in fp32, rows in the
 * order above); zeros when the view is empty. Rows whose slot is negative
 * are padding and skipped. Counts must be > 0 (the binding checks).
 */
struct kvc_minicache_attention_params {
    struct kvc_view q;           /* [B, Hq, 1, D] f32/f16/bf16 */
    struct kvc_view dir_k;       /* [B, H, m, D], dtype of q */
    struct kvc_view dir_v;       /* [B, H, m, Dv], dtype of q */
    struct kvc_view norms_k;     /* f32 [B, H, m, 2] */
    struct kvc_view norms_v;     /* f32 [B, H, m, 2] */
    struct kvc_view slots;       /* i32/i64 [B, H, m] */
    struct kvc_view keys;        /* [B, H, w, D] whole rows */
    struct kvc_view values;      /* [B, H, w, Dv] */
    struct kvc_view kept_slots;  /* i32/i64 [B, H, w] */
    struct kvc_view tail_k;      /* [B, H, t, D] */
    struct kvc_view tail_v;      /* [B, H, t, Dv] */
    struct kvc_view counts;      /* optional f32 [B, H, m, 2] (data NULL: none) */
    struct kvc_view kept_counts; /* optional f32 [B, H, w] */
    struct kvc_view out;         /* [B, 1, Hq, Dv], dtype of q */
    int32_t which;
    float scaling;
    int32_t num_threads;
};

enum kvc_status kvc_minicache_attention(const struct kvc_minicache_attention_params *p);

#ifdef __cplusplus
}
#endif

#endif /* KVC_MINICACHE_H */
