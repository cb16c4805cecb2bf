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

#ifdef __cplusplus
}
#endif

#endif /* KVC_MINICACHE_H */
