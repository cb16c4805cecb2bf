/*
 * quant.h - KIVI-style asymmetric quantization of a uniform KV layer into
 * the packed layout of docs/packed.md (pack), and back (unpack).
 */
#ifndef KVC_QUANT_H
#define KVC_QUANT_H

#include "kvc.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Keys are grouped per channel over G tokens (key outliers are
 * channel-wise), values per token over G channels. */
enum kvc_quant_kind { KVC_QUANT_KEYS = 0, KVC_QUANT_VALUES = 1 };

/* Where pack found a value it cannot quantize. */
struct kvc_pack_fault {
    int64_t pos[KVC_MAX_DIMS]; /* [b, h, j, c] of the first one in row-major order */
    float value;               /* NaN, +-Inf or |value| > FLT_MAX / 2 */
    int32_t found;             /* 1 when the op returned KVC_ERR_NAN */
};

/*
 * With Db = ceil(D * bits / 8) and per = 8 / bits, for every (b, h):
 *
 *   keys:   group (t, c) = tokens [t G, min(n, (t + 1) G)) of channel c;
 *           mins/scales [B, H, ceil(n / G), D]
 *   values: group (j, u) = channels [u G, min(D, (u + 1) G)) of token j;
 *           mins/scales [B, H, n, ceil(D / G)]
 *
 * min = the group's minimum (-0 stored as +0), scale = (max - min) /
 * (2^bits - 1) (0 when max == min), code = rint((x - min) / scale) clamped
 * to [0, 2^bits - 1] (0 when scale is 0), all in fp32 (quant_math.h). Code of
 * element c of row j: byte c / per of codes[b, h, j], bits (c % per) * bits
 * up; unused high bits of a row's last byte are 0. Every output byte and
 * float is written once, by one work unit, from its group alone: results do
 * not depend on the thread count, and strided outputs (slices of larger
 * buffers) are written only where they are.
 *
 * The input is scanned first: if any element is NaN, +-Inf or of magnitude
 * above FLT_MAX / 2 (where a group's max - min, and so its scale, could
 * overflow to Inf), the op writes nothing, fills *fault (when not NULL) and
 * returns KVC_ERR_NAN.
 */
struct kvc_pack_params {
    struct kvc_view x;      /* [B, H, n, D] f32/f16/bf16 */
    struct kvc_view codes;  /* u8 [B, H, n, Db] */
    struct kvc_view mins;   /* f32, shape above */
    struct kvc_view scales; /* f32, shape of mins */
    int32_t kind;           /* enum kvc_quant_kind */
    int32_t bits;           /* 2, 4 or 8 */
    int64_t group;          /* G >= 1 */
    int32_t num_threads;
    struct kvc_pack_fault *fault; /* host memory, or NULL */
    void *scratch;          /* kvc_pack_scratch_bytes() (CPU) / kvc_cuda_pack_workspace() */
    size_t scratch_bytes;
};

size_t kvc_pack_scratch_bytes(const struct kvc_pack_params *p);
enum kvc_status kvc_pack(const struct kvc_pack_params *p);

/* out[b, h, j, c] = min + scale * code of element (j, c), with the group
 * layout of pack; the sum is rounded once to fp32, then to out's dtype.
 * Unused high bits of the codes are ignored. */
struct kvc_unpack_params {
    struct kvc_view codes;  /* u8 [B, H, n, Db] */
    struct kvc_view mins;   /* f32 keys [B, H, ceil(n / G), D] / values [B, H, n, ceil(D / G)] */
    struct kvc_view scales; /* f32, shape of mins */
    struct kvc_view out;    /* [B, H, n, D] f32/f16/bf16 */
    int32_t kind;
    int32_t bits;
    int64_t group;
    int32_t num_threads;
};

enum kvc_status kvc_unpack(const struct kvc_unpack_params *p);

#ifdef __cplusplus
}
#endif

#endif /* KVC_QUANT_H */
