/*
 * attention_packed_math.h - per-element pieces of packed attention
 * (attention_packed.c, cuda/attention_packed.cu) over the KIVI layout of
 * docs/packed.md: code extraction from the byte layout and the sizes that
 * layout implies.
 *
 * KVC_HD static inline, in the common subset of C11 and C++, so the CPU op
 * and the CUDA kernels extract codes with the same code.
 */
#ifndef KVC_ATTENTION_PACKED_MATH_H
#define KVC_ATTENTION_PACKED_MATH_H

#include <stdint.h>

#include "kvc_math.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Codes per byte: 8 / bits (bits in {2, 4, 8}). */
KVC_HD static inline int kvc_pk_per_byte(int bits) { return 8 / bits; }

/* Largest code, 2^bits - 1; also the mask of one code. */
KVC_HD static inline uint32_t kvc_pk_mask(int bits) { return (1u << bits) - 1u; }

/* Bytes of a packed row of D >= 0 elements: ceil(D * bits / 8), without
 * overflow for any D (D * bits would wrap for D near 2^62, and a short
 * codes tensor then pass the shape check). */
KVC_HD static inline int64_t kvc_pk_row_bytes(int64_t D, int bits)
{
    return D / 8 * bits + (D % 8 * bits + 7) / 8;
}

/* Groups of G covering n >= 0: ceil(n / G) (key token groups, value
 * channel groups), without overflow for any G >= 1. */
KVC_HD static inline int64_t kvc_pk_groups(int64_t n, int64_t G) { return n / G + (n % G != 0); }

/* Code of element c of a packed row whose bytes are `stride` apart: byte
 * c / per, bits (c % per) * bits upwards (little end first). */
KVC_HD static inline uint32_t kvc_pk_code(const uint8_t *row, int64_t stride, int64_t c, int bits)
{
    const int per = kvc_pk_per_byte(bits);
    return ((uint32_t)row[(c / per) * stride] >> ((int)(c % per) * bits)) & kvc_pk_mask(bits);
}

/* Code of lane l (0..15) of the 16 elements starting at a multiple of 16:
 * they take 2 * bits bytes, lane l is in byte l / per. */
KVC_HD static inline uint32_t kvc_pk_lane_code(const uint8_t *bytes, int l, int bits)
{
    const int per = kvc_pk_per_byte(bits);
    return ((uint32_t)bytes[l / per] >> ((l % per) * bits)) & kvc_pk_mask(bits);
}

/* The attention kernels use codes centred on the middle of their range,
 *   min + scale * code = (min + scale * mid) + scale * (code - mid),
 * mid = (2^bits - 1) / 2: the same value, but neither term is much larger
 * than the values themselves, whereas with raw codes every scale * code is
 * >= 0 and the sums over slots of w * min and w * scale * code cancel (fp32
 * errors 5-10x those of plain attention on zero-centred values). code - mid
 * is exact in fp32 (half-integers below 2^8). */
KVC_HD static inline float kvc_pk_mid(int bits) { return 0.5f * (float)kvc_pk_mask(bits); }

/* code - mid. */
KVC_HD static inline float kvc_pk_centred(uint32_t code, int bits)
{
    return (float)code - kvc_pk_mid(bits);
}

/* min + scale * mid: the offset that goes with centred codes, for a mid
 * (kvc_pk_mid) a loop computed once. */
KVC_HD static inline float kvc_pk_centre_at(float min, float scale, float mid)
{
    return min + scale * mid;
}

/* kvc_pk_centre_at with the mid-point of `bits`. */
KVC_HD static inline float kvc_pk_centre(float min, float scale, int bits)
{
    return kvc_pk_centre_at(min, scale, kvc_pk_mid(bits));
}

#ifdef __cplusplus
}
#endif

#endif /* KVC_ATTENTION_PACKED_MATH_H */
