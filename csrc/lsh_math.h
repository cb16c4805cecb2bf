/*
 * lsh_math.h - the per-key math of MagicPIG's sampled attention (lsh.c,
 * cuda/lsh.cu): SimHash collision probabilities.
 *
 * For random Gaussian hyperplanes a sign bit of q and of x agree with
 * probability u = 1 - theta / pi (theta the angle between them); a table of
 * K bits collides with probability u^K; over L independent tables the hit
 * count is Binomial(L, u^K), and a key is sampled when it reaches `hits`.
 *
 * Also where a head's slots live in either layout (kvc_lsh_head_get), so
 * both backends read the same rows.
 */
#ifndef KVC_LSH_MATH_H
#define KVC_LSH_MATH_H

#include <math.h>

#include "kvc.h"
#include "kvc_math.h"
#include "lsh.h"

/* log P[Binomial(L, u^K) >= hits] for cos(theta) = c, in double: the
 * probability can be far below FLT_MIN for nearly opposite vectors. */
KVC_HD static inline double kvc_lsh_log_inclusion(double c, int32_t K, int32_t L, int32_t hits)
{
    const double PI = 3.14159265358979323846;
    double u, p, below = 0.0, term;
    int32_t i;
    c = c > 1.0 ? 1.0 : (c < -1.0 ? -1.0 : c);
    u = 1.0 - acos(c) / PI;
    p = pow(u, (double)K);
    if (p >= 1.0) return 0.0;
    /* P[X < hits] = sum_{i < hits} C(L, i) p^i (1 - p)^(L - i) */
    term = pow(1.0 - p, (double)L);
    for (i = 0; i < hits && i <= L; i++) {
        below += term;
        term *= (double)(L - i) / (double)(i + 1) * p / (1.0 - p);
    }
    return below >= 1.0 ? -INFINITY : log1p(-below);
}

/* The slots of kv head (b, h) of lsh_attention, as element offsets into the
 * tensors of p: slot j's key is row k + j * ks of p->k (elements kd apart),
 * its value row v + j * vs (vd apart), its L codes codes + j * cs (ct
 * apart), its count counts + j * ns; slots s0 .. n - 1 are real. Offsets,
 * not pointers: one descriptor serves every dtype. */
struct kvc_lsh_head {
    int64_t k, ks, kd, v, vs, vd, codes, cs, ct, counts, ns;
    int64_t n, s0;
};

/* H, the kv heads: the ragged layout has no head dim to read it from. */
KVC_HD static inline int64_t kvc_lsh_kv_heads(const struct kvc_lsh_attention_params *p)
{
    return p->layout == KVC_KV_RAGGED ? p->num_kv_heads : p->k.shape[1];
}

KVC_HD static inline void kvc_lsh_head_get(const struct kvc_lsh_attention_params *p, int64_t b, int64_t h,
                                           struct kvc_lsh_head *o)
{
    if (p->layout == KVC_KV_RAGGED) {
        /* a segment of rows: slot j is row off + j, counted from 0 */
        const int64_t i = b * p->num_kv_heads + h, off = p->offsets[i * p->offsets_stride];
        o->n = p->lengths[i * p->lengths_stride];
        o->s0 = 0;
        o->ks = p->k.strides[0];
        o->kd = p->k.strides[1];
        o->vs = p->v.strides[0];
        o->vd = p->v.strides[1];
        o->cs = p->codes.strides[0];
        o->ct = p->codes.strides[1];
        o->ns = p->counts.strides[0];
        o->k = off * o->ks;
        o->v = off * o->vs;
        o->codes = off * o->cs;
        o->counts = off * o->ns;
    } else {
        o->n = p->k.shape[2];
        o->s0 = p->kv_start ? p->kv_start[b * p->kv_start_stride] : 0;
        o->ks = p->k.strides[2];
        o->kd = p->k.strides[3];
        o->vs = p->v.strides[2];
        o->vd = p->v.strides[3];
        o->cs = p->codes.strides[2];
        o->ct = p->codes.strides[3];
        o->ns = p->counts.strides[2];
        o->k = b * p->k.strides[0] + h * p->k.strides[1];
        o->v = b * p->v.strides[0] + h * p->v.strides[1];
        o->codes = b * p->codes.strides[0] + h * p->codes.strides[1];
        o->counts = b * p->counts.strides[0] + h * p->counts.strides[1];
    }
}

/* log c_j, slot j's merge count (f32 or i32): the count joins the slot's
 * log-weight, so a slot standing for c tokens weighs c. */
KVC_HD static inline float kvc_lsh_log_count(const struct kvc_lsh_attention_params *p, const struct kvc_lsh_head *h,
                                             int64_t j)
{
    const int64_t i = h->counts + j * h->ns;
    return kvc_logf(p->counts.dtype == KVC_I32 ? (float)((const int32_t *)p->counts.data)[i]
                                               : ((const float *)p->counts.data)[i]);
}

#endif /* KVC_LSH_MATH_H */
