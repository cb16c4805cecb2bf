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
/*
 * Key feedback (keys only; feedback.data NULL: none). Each key group is
 * quantized channel after channel, and channel c's rounding error e_j =
 * x[j, c] - dequant(code) is carried into the channels not yet quantized:
 * x[j, c'] = kvc_quant_feedback(x[j, c'], e_j, w[c, c']) for c' > c, with
 * min, scale and codes of channel c taken from its values after the updates
 * of channels 0 .. c-1. With w[c, c'] = U[c, c'] / U[c, c] for U the upper
 * Cholesky factor of (Q^T Q + damping)^-1 this is GPTQ's update with the
 * queries Q as its inputs: it lowers the queries' logit error q . (k - k^)
 * rather than each key's own. w's diagonal and lower triangle are not read.
 * The group's factor is feedback[f] with f = feedback_index[b, h, t] when
 * the index is given, else f = h (F == H).
 */
/*
 * Clipped value ranges (clip = 1, values only): each group's min and scale
 * are those of kvc_quant_clip_range (quant_math.h), the range among 45
 * shrunk from min/max by up to 40% with the least squared error; elements
 * outside it take the end codes. Same layout, codes and unpack.
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
    struct kvc_view feedback;       /* optional: f32 [F, D, D], finite (module_quant.c checks) */
    struct kvc_view feedback_index; /* optional: i64 [B, H, ceil(n / G)], each in [0, F) */
    int32_t clip;           /* values only: 1 = each group's range clipped (above) */
    struct kvc_pack_fault *fault; /* host memory, or NULL */
    void *scratch;          /* kvc_pack_scratch_bytes() (CPU) / kvc_cuda_pack_workspace() */
    size_t scratch_bytes;
};

size_t kvc_pack_scratch_bytes(const struct kvc_pack_params *p);

/* Shared memory of the CUDA key-feedback kernel for a group of g tokens of
 * D channels (the group's fp32 rows, its codes and errors), and the most it
 * may take: a larger g * D is refused (module_quant.c names the limit). */
#define KVC_PACK_FEEDBACK_SMEM_MAX 49152
static inline size_t kvc_pack_feedback_smem(int64_t g, int64_t D)
{
    return (size_t)g * (size_t)D * (sizeof(float) + 1) + (size_t)g * sizeof(float) + 2 * sizeof(float);
}

/* Shared memory of the CUDA value pack with clip = 1 (a row of D fp32
 * values) and the most it may take: a larger D is refused by name. */
#define KVC_PACK_CLIP_SMEM_MAX 49152

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
