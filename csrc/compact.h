/*
 * compact.h - gather kept tokens of keys and values into dense storage.
 */
#ifndef KVC_COMPACT_H
#define KVC_COMPACT_H

#include "kvc.h"

#ifdef __cplusplus
extern "C" {
#endif

/* out_keys[b, h, i, :] = keys[b, h, indices[b, h, i], :], same for values.
 * Rows are copied bit for bit, so any 2- or 4-byte dtype works. */
struct kvc_gather_params {
    struct kvc_view keys;       /* [B, H, T, Dk] */
    struct kvc_view values;     /* [B, H, T, Dv], same dtype as keys */
    struct kvc_view indices;    /* i32/i64 [B, H, n], each in [0, T) */
    struct kvc_view out_keys;   /* [B, H, n, Dk] */
    struct kvc_view out_values; /* [B, H, n, Dv] */
    int32_t num_threads;
};

enum kvc_status kvc_gather(const struct kvc_gather_params *p);

/* Boundary helper: KVC_ERR_INVALID if some index of idx (i32/i64, any rank up
 * to KVC_MAX_DIMS) lies outside [lo, hi); *bad_value gets the first one found
 * in row-major order and bad_pos[] its coordinates. */
enum kvc_status kvc_indices_check(const struct kvc_view *idx, int64_t lo, int64_t hi,
                                  int64_t *bad_value, int64_t bad_pos[KVC_MAX_DIMS]);

#ifdef __cplusplus
}
#endif

#endif /* KVC_COMPACT_H */
