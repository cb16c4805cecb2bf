/*
 * keep_rows.h - keep_rows_plan: the layout of a decode-time round that keeps
 * a per-head packed layer's unchanged key groups in place
 * (kvcompress/stores/keep_rows.py, docs/design.md "Composition").
 *
 * A round reads a packed layer back dequantized (the "old" rows), its
 * merging method keeps some slots (the "kept" store, with merge counts),
 * and the kept slots are packed again. This op decides, on the host, where
 * each kept slot goes so that every old key group with at least `min_live`
 * unchanged members is packed again in its old place, on its old grid:
 *
 *   match      kept slot (head, position) -> the old packed row holding it
 *              (a row repeating the position of the row before it in its
 *              head, a copy or a placeholder, is no slot of its own);
 *   unchanged  matched, the same merge count (count_bias / count_plain of
 *              the old row) and bit for bit the same key and value row;
 *   kept group at least max(1, min_live) unchanged members, and not one
 *              hole that would have to hold a channel's minimum and its
 *              maximum both;
 *   holes      G - members placeholder rows after the members: the first
 *              holds the old minimum of each channel no member reaches
 *              (within a quarter step, on the packing grid: the rotated
 *              keys when the layer rotates them), the second the old
 *              maximum, the others (and every channel already reached)
 *              repeat the group's first member;
 *   order      per head: the sink block (slots older than every old packed
 *              row, not matched), the kept groups in old row order (members
 *              by old row, then holes), then the other slots by position.
 *
 * The layout is refused (ok = 0) when no group is kept, when the sink block
 * would not be the old one's size in every head, or when the residual that
 * RaggedPackedStore.from_ragged would take from it (each head's newest
 * slots of count 1, at most `residual`, as many as every head has) would
 * not leave the sink block as it was or would reach into the kept groups.
 * The Python function it mirrors (keep_rows._plan_torch) is the
 * reference and the path on other devices; they agree bit for bit.
 */
#ifndef KVC_KEEP_ROWS_H
#define KVC_KEEP_ROWS_H

#include "kvc.h"

#ifdef __cplusplus
extern "C" {
#endif

struct kvc_keep_rows_params {
    /* the old packed layer: N heads, Ro rows, Ng = Ro / G key groups */
    struct kvc_view o_offsets;  /* i64 [N] first row of each head */
    struct kvc_view o_lengths;  /* i64 [N] packed rows in use */
    struct kvc_view o_pos;      /* i32 [Ro] token position of each row */
    struct kvc_view o_cbias;    /* f32 [Ro] count with merge counts */
    struct kvc_view o_cplain;   /* f32 [Ro] count without */
    struct kvc_view o_keys;     /* [Ro, D] dequantized rows (f32/f16/bf16) */
    struct kvc_view o_values;   /* [Ro, D], keys' dtype */
    struct kvc_view o_min;      /* f32 [Ng, D] key group minimum (packing grid) */
    struct kvc_view o_step;     /* f32 [Ng, D] key group step */
    /* the kept slots: a ragged store of Rn rows */
    struct kvc_view n_offsets;  /* i64 [N] */
    struct kvc_view n_lengths;  /* i64 [N] */
    struct kvc_view n_pos;      /* i32 [Rn] */
    struct kvc_view n_counts;   /* f32 [Rn] merge counts */
    struct kvc_view n_keys;     /* [Rn, D], o_keys' dtype */
    struct kvc_view n_values;   /* [Rn, D] */
    struct kvc_view n_grid;     /* f32 [Rn, D] keys on the packing grid */
    int64_t group, bits, min_live, sinks, sinks_asked, residual, slack;
    /* outputs, M = Rn + Ro rows (enough: placeholders <= Ro) */
    struct kvc_view take;       /* i64 [M] kept slot i's row in the kept store (i < slots) */
    struct kvc_view dst;        /* i64 [M] kept slot i's row in the new buffers, then placeholder
                                   j's at slots + j */
    struct kvc_view lengths;    /* i64 [N] items per head */
    struct kvc_view ph_base;    /* i64 [Ro] kept row a placeholder copies (value, grid key) */
    struct kvc_view ph_last;    /* i64 [Ro] kept row whose position it takes */
    struct kvc_view ph_keys;    /* f32 [Ro, D] its key on the packing grid */
    struct kvc_view info;       /* i64 [3]: items, placeholders, ok */
    void *scratch;              /* kvc_keep_rows_plan_scratch_bytes() bytes */
    size_t scratch_bytes;
};

size_t kvc_keep_rows_plan_scratch_bytes(const struct kvc_keep_rows_params *p);
/* KVC_ERR_INVALID for a segment outside its buffer, Ro not a multiple of
 * the group, or more kept slots than Rn rows (the binding says which). */
enum kvc_status kvc_keep_rows_plan(const struct kvc_keep_rows_params *p);

#ifdef __cplusplus
}
#endif

#endif /* KVC_KEEP_ROWS_H */
