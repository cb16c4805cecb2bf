/*
 * attention_units.h - the work units of the CPU attention ops (attention.c,
 * attention_packed.c), in one place so that both cut and combine their
 * work alike.
 *
 * A unit is one kv head (b, hk), one tile of up to KVC_AT_QT queries with
 * all g query heads of its GQA group, and one block of the head's slots;
 * how a head splits into blocks is the op's (its `blocks` callback), and
 * depends only on the shape of the head, never on the thread count. A unit
 * leaves an unnormalised partial (running max, running sum, output rows);
 * kvc_at_combine joins the blocks of a (head, tile) pair by log-sum-exp in
 * block order, so results are bit-identical for any thread count.
 *
 * Scratch: KVC_ALIGN slack, prefix[P + 1] (first unit of each pair), the
 * partials [U][ustride], then one op-defined area per thread.
 * CPU only (nvcc never includes it).
 */
#ifndef KVC_ATTENTION_UNITS_H
#define KVC_ATTENTION_UNITS_H

#include <math.h>
#include <stdint.h>

#include "attention.h"
#include "attention_tile.h"
#include "kvc.h"
#include "kvc_math.h"

#define KVC_AT_QT 16 /* queries per unit */
/* Split into blocks only while the chunk has at most this many query tiles:
 * decode and short chunks need the split for parallelism, longer chunks have
 * tiles enough, and their partials would grow as q * n. */
#define KVC_AT_SPLIT_MAX_TILES 2
/* Split-K block sizes: from 256 slots, doubled up to 2048 while the step
 * keeps at least KVC_AT_MIN_BLOCKS blocks over all its heads. Every block
 * starts a unit again (query rows, accumulators, a partial to combine); with
 * 256-slot blocks always, that cost 5-10% of a long decode step at SmolLM2's
 * shape and 15-25% at a Llama-like one, and 16 blocks still feed 16 threads. */
#define KVC_AT_SB_MIN 256
#define KVC_AT_SB_MAX 2048
#define KVC_AT_MIN_BLOCKS 16

/* First member of each op's geometry, so that the op's callbacks can cast
 * back to it. */
struct kvc_at_units {
    int64_t B, Hq, Hkv, g, q, D;
    int64_t Dp;      /* D rounded up to AT_TK: rows are padded with zeros */
    int64_t ntiles;  /* query tiles per kv head */
    int64_t P;       /* (b, hk, tile) pairs */
    int64_t U;       /* units (pairs x blocks) */
    int64_t R;       /* rows per unit at most: g * min(q, KVC_AT_QT) */
    int64_t ustride; /* floats of one unit's partial */
    int64_t sb;      /* slots per split-K block (kvc_at_block_slots) */
    int split;
    size_t prefix_bytes, part_bytes;
};

static inline int64_t kvc_at_round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

/* Partial of a unit: running max [R], running sum [R] (padded), rows [R][Dp]. */
#define KVC_AT_PART_M(part) (part)
#define KVC_AT_PART_S(u, part) ((part) + (u)->R)
#define KVC_AT_PART_ACC(u, part) ((part) + kvc_at_round_up(2 * (u)->R, AT_TK))

/* Split-K blocks of tile t of kv head (b, hk); u is the first member of the
 * op's geometry, op its params. */
typedef int64_t (*kvc_at_blocks_fn)(const void *op, const struct kvc_at_units *u, int64_t b, int64_t hk,
                                    int64_t t);
/* Slots that kv head (b, hk) of a split step sees, from its first to the
 * end of its last query tile (0 for a head that sees none). */
typedef int64_t (*kvc_at_span_fn)(const void *op, const struct kvc_at_units *u, int64_t b, int64_t hk);
/* Position of channel d in the op's partial rows. */
typedef int64_t (*kvc_at_pos_fn)(const struct kvc_at_units *u, int64_t d);

/* The sizes that follow from the queries [B, Hq, q, D] and Hkv. */
static inline void kvc_at_units_init(struct kvc_at_units *u, const struct kvc_view *q, int64_t Hkv)
{
    u->B = q->shape[0];
    u->Hq = q->shape[1];
    u->q = q->shape[2];
    u->D = q->shape[3];
    u->Hkv = Hkv;
    u->g = u->Hkv > 0 ? u->Hq / u->Hkv : 1;
    u->Dp = kvc_at_round_up(u->D > 0 ? u->D : 1, AT_TK);
    u->ntiles = (u->q + KVC_AT_QT - 1) / KVC_AT_QT;
    u->split = u->ntiles <= KVC_AT_SPLIT_MAX_TILES;
    u->P = u->B * u->Hkv * u->ntiles;
    u->R = u->g * (u->q < KVC_AT_QT ? u->q : KVC_AT_QT);
    u->ustride = kvc_at_round_up(2 * u->R, AT_TK) + u->R * u->Dp;
    u->sb = KVC_AT_SB_MIN;
}

/* Slots per split-K block (a multiple of AT_TK) for a step whose heads
 * span `total` slots in all: a function of the shape alone, never of the
 * thread count, so that results stay bit-identical for any thread count. */
static inline int64_t kvc_at_block_slots(int64_t total)
{
    int64_t sb = KVC_AT_SB_MIN;
    while (sb < KVC_AT_SB_MAX && total / (2 * sb) >= KVC_AT_MIN_BLOCKS) sb *= 2;
    return sb;
}

/* u->sb of a split step, from the slots all its heads see (span). */
static inline void kvc_at_units_block_size(struct kvc_at_units *u, kvc_at_span_fn span, const void *op)
{
    int64_t b, hk, total = 0;
    if (!u->split) return;
    for (b = 0; b < u->B; b++)
        for (hk = 0; hk < u->Hkv; hk++) total += span(op, u, b, hk);
    u->sb = kvc_at_block_slots(total);
}

/* U and the sizes of prefix and partials, once the op's geometry is filled
 * in; with prefix != NULL also prefix[pair] = first unit of the pair
 * (prefix[P] = U). */
static inline void kvc_at_units_count(struct kvc_at_units *u, kvc_at_blocks_fn blocks, const void *op,
                                      int64_t *prefix)
{
    int64_t pair, n = 0;
    for (pair = 0; pair < u->P; pair++) {
        const int64_t bh = pair / u->ntiles;
        if (prefix) prefix[pair] = n;
        n += blocks(op, u, bh / u->Hkv, bh % u->Hkv, pair % u->ntiles);
    }
    if (prefix) prefix[u->P] = n;
    u->U = n;
    u->prefix_bytes = kvc_align_up((size_t)(u->P + 1) * sizeof(int64_t));
    u->part_bytes = kvc_align_up((size_t)(u->U * u->ustride) * sizeof(float));
}

static inline size_t kvc_at_scratch_bytes(const struct kvc_at_units *u, size_t thread_bytes, int num_threads)
{
    const int nt = num_threads > 0 ? num_threads : 1;
    return KVC_ALIGN + u->prefix_bytes + u->part_bytes + (size_t)nt * thread_bytes;
}

/* The checks both ops start with: KVC_ERR_INVALID for an unknown layout,
 * KVC_OK with *empty set for an empty output [B, q, Hq, D] (nothing to
 * run), KVC_ERR_INVALID when Hq is not a multiple of Hkv > 0. */
static inline enum kvc_status kvc_at_units_check(int32_t layout, const struct kvc_view *q, int64_t Hkv,
                                                 int *empty)
{
    int64_t d, n_out = 1;
    *empty = 0;
    if (layout != KVC_KV_UNIFORM && layout != KVC_KV_RAGGED) return KVC_ERR_INVALID;
    for (d = 0; d < 4; d++) n_out *= q->shape[d];
    if (n_out == 0) {
        *empty = 1;
        return KVC_OK;
    }
    if (Hkv <= 0 || q->shape[1] % Hkv != 0) return KVC_ERR_INVALID;
    return KVC_OK;
}

/* Where prefix starts in the caller's scratch. */
static inline int64_t *kvc_at_scratch_prefix(void *scratch)
{
    return (int64_t *)(((uintptr_t)scratch + (KVC_ALIGN - 1)) & ~(uintptr_t)(KVC_ALIGN - 1));
}

/* The partials after prefix; *threads <- where the per-thread areas start. */
static inline float *kvc_at_scratch_parts(const struct kvc_at_units *u, int64_t *prefix, char **threads)
{
    char *base = (char *)prefix;
    *threads = base + u->prefix_bytes + u->part_bytes;
    return (float *)(base + u->prefix_bytes);
}

/* Threads to run on: a parallel region costs more than a small decode step. */
static inline int kvc_at_threads(const struct kvc_at_units *u, int num_threads)
{
    return u->U < 2 || num_threads < 1 ? 1 : num_threads;
}

/* Queries [*i0, *i0 + *nq) of tile t. */
static inline void kvc_at_tile_rows(const struct kvc_at_units *u, int64_t t, int64_t *i0, int64_t *nq)
{
    *i0 = t * KVC_AT_QT;
    *nq = u->q - *i0 < KVC_AT_QT ? u->q - *i0 : KVC_AT_QT;
}

/* The pair holding unit n: the last prefix entry <= n. */
static inline int64_t kvc_at_unit_pair(const struct kvc_at_units *u, const int64_t *prefix, int64_t n)
{
    int64_t lo = 0, hi = u->P - 1;
    while (lo < hi) {
        int64_t mid = (lo + hi + 1) / 2;
        if (prefix[mid] <= n) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/* out rows of a pair <- log-sum-exp combine of its blocks, in block order;
 * o holds Dp floats. Row r = gi * nq + i is query head hk * g + gi,
 * query i0 + i. Also writes each row's log-sum-exp to lse ([B, Hq, q] f32)
 * when lse is not NULL and has data (the partials' logits are natural-log
 * weights; -inf for a row that sees no slot). */
static inline void kvc_at_combine(const struct kvc_at_units *u, const struct kvc_view *out, kvc_at_pos_fn pos,
                                  int64_t pair, const int64_t *prefix, const float *parts, float *o,
                                  const struct kvc_view *lse)
{
    const int64_t D = u->D, Dp = u->Dp, t = pair % u->ntiles, bh = pair / u->ntiles;
    const int64_t b = bh / u->Hkv, hk = bh % u->Hkv;
    const int64_t u0 = prefix[pair], nb = prefix[pair + 1] - u0;
    const int64_t es = (int64_t)kvc_dtype_size((enum kvc_dtype)out->dtype);
    const int64_t os = out->strides[3];
    int64_t i0, nq, R, r, k, d;
    kvc_at_tile_rows(u, t, &i0, &nq);
    R = u->g * nq;
    for (r = 0; r < R; r++) {
        const int64_t hq = hk * u->g + r / nq, qi = i0 + r % nq;
        char *dst =
            (char *)out->data + (b * out->strides[0] + qi * out->strides[1] + hq * out->strides[2]) * es;
        float M = -INFINITY, L = 0.0f;
        for (k = 0; k < nb; k++) {
            float m = KVC_AT_PART_M(parts + (u0 + k) * u->ustride)[r];
            M = m > M ? m : M;
        }
        float *lp = lse && lse->data ? (float *)lse->data + b * lse->strides[0] + hq * lse->strides[1] +
                                             qi * lse->strides[2]
                                       : NULL;
        if (M == -INFINITY) {
            /* the row sees no slot */
            for (d = 0; d < D; d++) kvc_store_f32(dst, out->dtype, d * os, 0.0f);
            if (lp) *lp = -INFINITY;
            continue;
        }
        for (d = 0; d < Dp; d++) o[d] = 0.0f;
        for (k = 0; k < nb; k++) {
            const float *part = parts + (u0 + k) * u->ustride;
            const float wk = kvc_softmax_weight(KVC_AT_PART_M(part)[r], M);
            const float *a = KVC_AT_PART_ACC(u, part) + r * Dp;
            L += wk * KVC_AT_PART_S(u, part)[r];
            for (d = 0; d < Dp; d++) o[d] += wk * a[d];
        }
        for (d = 0; d < D; d++) kvc_store_f32(dst, out->dtype, d * os, o[pos(u, d)] / L);
        if (lp) *lp = M + kvc_logf(L);
    }
}

/* An op's unit of work, built from one always-inline body
 * `body(p, g, pair, blk, part, w, wide)`: `name`, cloned per ISA level
 * (KVC_HOT; 8-lane halves, wide = 0) and, where KVC_WIDE, `name##_wide`
 * for x86-64-v4 only (16-lane loops, wide = 1; kvc.h). P, G and W are the
 * op's params, geometry and per-thread types. KVC_AT_RUN calls the wide
 * unit when `wide` (kvc_wide_active()) and the cloned one otherwise. */
#define KVC_AT_UNIT_(name, attr, body, P, G, W, flag)                                                    \
    static void attr name(const P *p, const G *g, int64_t pair, int64_t blk, float *part, const W *w) \
    {                                                                                                  \
        body(p, g, pair, blk, part, w, flag);                                                          \
    }
#ifdef KVC_WIDE
#define KVC_AT_UNITS(name, body, P, G, W)                \
    KVC_AT_UNIT_(name, KVC_HOT, body, P, G, W, 0)        \
    KVC_AT_UNIT_(name##_wide, KVC_WIDE_TARGET, body, P, G, W, 1)
#define KVC_AT_RUN(name, wide, ...) ((wide) ? name##_wide(__VA_ARGS__) : name(__VA_ARGS__))
#else
#define KVC_AT_UNITS(name, body, P, G, W) KVC_AT_UNIT_(name, KVC_HOT, body, P, G, W, 0)
#define KVC_AT_RUN(name, wide, ...) ((void)(wide), name(__VA_ARGS__))
#endif

#endif /* KVC_ATTENTION_UNITS_H */
