/*
 * module_segments.h - the checks the bindings of the attention ops over a
 * uniform or ragged layer share (module_attention.c,
 * module_packed_attention.c, module_lsh.c, module_pages.c): which layout a
 * call asks for, the ragged segments, the merge counts. One place, so the
 * ops word their errors alike.
 */
#ifndef KVC_MODULE_SEGMENTS_H
#define KVC_MODULE_SEGMENTS_H

#include "module.h"
#include "module_spec.h"

#include <math.h>

/* Element i of a host view of int64 (offsets, lengths, kv_start). */
static inline int64_t kvc_py_i64_at(const struct kvc_view *v, int64_t i)
{
    return ((const int64_t *)v->data)[i * v->strides[0]];
}

/* Nonzero when c is not a usable merge count (NaN, <= 0 or infinite):
 * the one rule every op that reads merge counts applies. */
static inline int kvc_bad_count(float c) { return !(c > 0.0f) || isinf(c); }

/* Every count of a host f32 (or i32) [B, H, n] view from slot kv_start[b]
 * on (kv_start NULL: 0) is finite and > 0; else -1 with ValueError naming
 * `name` and the element. */
int kvc_py_check_count_rows(struct kvc_state *st, const char *name, const struct kvc_view *counts,
                            const int64_t *kv_start, int64_t kv_start_stride);

/* 1 for the ragged layout (offsets and lengths given), 0 for the uniform
 * one; -1 with ValueError set when only one of the two is given, or
 * kv_start is given with them. */
int kvc_py_ragged_layout(struct kvc_state *st, PyObject *offsets, PyObject *lengths, PyObject *kv_start);

/* Host offsets and lengths [B * Hkv] of the ragged layout: lengths >= 0,
 * every segment inside the N rows of the tensor `rows`, non-empty segments
 * at least min_len long (0: any), offsets multiples of align (1: any),
 * non-empty segments pairwise disjoint in any order (gaps of unused
 * capacity are fine). 0, or -1 with an exception set. */
int kvc_py_check_segments(struct kvc_state *st, const struct kvc_view *off, const struct kvc_view *len,
                          int64_t Hkv, int64_t N, const char *rows, int64_t min_len, int64_t align);

/* The f32/i32 merge counts of a parsed call, finite and >= 1 on every slot
 * the op reads: ragged [N], the segments of the `heads` offsets/lengths;
 * uniform [B, Hkv, n], slots kv_start[b] .. n - 1. Arguments k .. k + 3
 * are kv_start, offsets, lengths, counts (both ops order them so). Counts
 * on a GPU are not scanned: that would copy [N] to the host on every decode
 * step, and a bad count can only spoil its own output rows (they come from
 * evict_merge, which writes counts >= 1); nor are they when a layout
 * argument is on a GPU (kvc_py_run refuses the mixed devices). 0, or -1
 * with ValueError set. */
int kvc_py_check_counts(struct kvc_state *st, const struct kvc_py_call *c, int k, int ragged, int64_t heads);

/* Host centers [B, H, C] (kv_start a host view or NULL): per (b, h)
 * strictly ascending slots in [kv_start[b], T), then only -1 (as
 * select_topk returns them). 0, or -1 with ValueError set. Used by
 * evict_merge (module_merge.c) and gauss_merge (module_kvmerger.c). */
int kvc_py_check_centers(struct kvc_state *st, const struct kvc_view *cv, const struct kvc_view *ks, int64_t T);

#endif /* KVC_MODULE_SEGMENTS_H */
