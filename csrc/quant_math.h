/*
 * quant_math.h - per-element math of the packed KV layout (docs/packed.md),
 * shared by quant.c and cuda/quant.cu so that both produce the same bits.
 *
 * A group of values is stored as fp32 (min, scale) and one `bits`-wide code
 * per element, x ~ min + scale * code. Everything here is exactly rounded
 * (subtraction, division, rint, min/max, a product exact in double), so no
 * compiler contraction, ISA clone or device can change a result.
 */
#ifndef KVC_QUANT_MATH_H
#define KVC_QUANT_MATH_H

#include <math.h>
#include <stdint.h>

#include "kvc.h"
#include "kvc_math.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Largest code, 2^bits - 1 (bits in {2, 4, 8}). */
KVC_HD static inline int32_t kvc_quant_levels(int32_t bits)
{
    return (1 << bits) - 1;
}

/* Codes per byte. */
KVC_HD static inline int32_t kvc_quant_per_byte(int32_t bits)
{
    return 8 / bits;
}

/* Bytes of a packed row of D >= 0 codes: ceil(D * bits / 8), without
 * overflow for any D (D * bits would wrap for D near 2^62, and a short
 * codes tensor then pass the shape check). */
KVC_HD static inline int64_t kvc_quant_row_bytes(int64_t D, int32_t bits)
{
    return D / 8 * bits + (D % 8 * bits + 7) / 8;
}

/* Groups of G covering n items, ceil(n / G), without overflow for any G. */
KVC_HD static inline int64_t kvc_quant_groups(int64_t n, int64_t G)
{
    return n > 0 ? (n - 1) / G + 1 : 0;
}

/* Element c of a row lives in byte c / per, at bit (c % per) * bits (the
 * first element in the low bits). */
KVC_HD static inline int64_t kvc_quant_byte(int64_t c, int32_t bits)
{
    return c / kvc_quant_per_byte(bits);
}

KVC_HD static inline int32_t kvc_quant_shift(int64_t c, int32_t bits)
{
    return (int32_t)(c % kvc_quant_per_byte(bits)) * bits;
}

/* The code of element c out of its byte. */
KVC_HD static inline uint32_t kvc_quant_extract(uint8_t byte, int64_t c, int32_t bits)
{
    return ((uint32_t)byte >> kvc_quant_shift(c, bits)) & (uint32_t)kvc_quant_levels(bits);
}

/* The group minimum as stored: -0 folded to +0 (x + 0 is +0 for x = -0 in
 * round to nearest), so that which zero a reduction met first, which varies
 * with its order, never shows in the bits. */
KVC_HD static inline float kvc_quant_min(float mn)
{
    return mn + 0.0f;
}

/* scale = (max - min) / (2^bits - 1) in fp32; exactly 0 for a constant
 * group (no division by zero later). */
KVC_HD static inline float kvc_quant_scale(float mn, float mx, int32_t bits)
{
    return mx == mn ? 0.0f : (mx - mn) / (float)kvc_quant_levels(bits);
}

/* The minimum and maximum of the n >= 1 fp32 values x[0], x[stride], ...
 * of one group, reduced in that order. */
KVC_HD static inline void kvc_quant_minmax(const float *x, int64_t n, int64_t stride, float *mn_out, float *mx_out)
{
    float mn = x[0], mx = x[0];
    for (int64_t i = 1; i < n; i++) {
        const float v = x[i * stride];
        mn = v < mn ? v : mn;
        mx = v > mx ? v : mx;
    }
    *mn_out = mn;
    *mx_out = mx;
}

/* The stored min and the scale of one group of fp32 values (the CPU's
 * key-feedback and value packs, and the CUDA key-feedback kernel over its
 * rows in shared memory). */
KVC_HD static inline void kvc_quant_range(const float *x, int64_t n, int64_t stride, int32_t bits, float *mn_out,
                                          float *sc_out)
{
    float mn, mx;
    kvc_quant_minmax(x, n, stride, &mn, &mx);
    mn = kvc_quant_min(mn);
    *mn_out = mn;
    *sc_out = kvc_quant_scale(mn, mx, bits);
}

/* Clipped ranges (kvc_pack_params.clip): a candidate range shrinks min/max
 * by a / KVC_QUANT_CLIP_STEPS and b / KVC_QUANT_CLIP_STEPS of
 * KVC_QUANT_CLIP_MOST of the range at its two ends, a + b <=
 * KVC_QUANT_CLIP_STEPS: 45 ranges, a outer, b inner, (0, 0) first. */
#define KVC_QUANT_CLIP_STEPS 8
#define KVC_QUANT_CLIP_MOST 0.4f

/* code = rint((x - min) / scale) in fp32 (ties to even), clamped to
 * [0, 2^bits - 1]; 0 where scale is 0 (constant group, or a range so small
 * that its scale underflows). Written as selects so that loops vectorise;
 * the clamp also maps the NaN of a 0 / 0 to 0 before the conversion. Always
 * inlined, so each KVC_HOT clone rounds with its own instructions. */
KVC_HD KVC_INLINE uint32_t kvc_quant_code(float x, float mn, float scale, int32_t bits)
{
    const float top = (float)kvc_quant_levels(bits);
    float c = rintf((x - mn) / scale);
    c = c > top ? top : c;
    c = c >= 0.0f ? c : 0.0f;
    return scale > 0.0f ? (uint32_t)c : 0u;
}

/* x = min + scale * code. The product of a 24-bit significand and a code of
 * at most 8 bits is exact in double and the sum is rounded once to double,
 * then to fp32: the same bits with or without a fused multiply-add, on
 * every CPU clone and on the GPU. */
KVC_HD static inline float kvc_dequant(float mn, float scale, uint32_t code)
{
    return (float)((double)mn + (double)scale * (double)code);
}

/* The search criterion of clipped ranges: the squared error of packing the
 * n values x[0], x[stride], ... over [lo, lo + scale * (2^bits - 1)],
 * measured in steps: t = (x - lo) * (1 / scale) in fp32 (a difference then
 * a product: nothing to contract), its code rint(t) clamped to [0, 2^bits -
 * 1], and r = t - code, whose square, exact in double, goes to lane i %
 * KVC_QUANT_ERR_LANES in index order; the lanes are summed in lane order
 * and the sum scaled by scale^2 (exact in double). Every build, vector
 * width and device gives the same value. It differs from the error of
 * kvc_quant_code's codes only where t lies within an ulp of a rounding tie,
 * and it costs a product where that costs a division, in loops the CPU
 * clones vectorise. A scale of 0, or one so small that 1 / scale is
 * infinite, gives NaN or infinity: such a range is never taken. */
#define KVC_QUANT_ERR_LANES 8

/* One element's term of kvc_quant_clip_error: r^2 for t = (x - lo) * inv. */
KVC_HD KVC_INLINE double kvc_quant_step_sq(float x, float lo, float inv, float top)
{
    const float t = (x - lo) * inv;
    float c = rintf(t);
    c = c > top ? top : c;
    c = c >= 0.0f ? c : 0.0f;
    const float r = t - c;
    return (double)r * (double)r;
}

KVC_HD KVC_INLINE double kvc_quant_clip_error(const float *x, int64_t n, int64_t stride, float lo, float scale,
                                              int32_t bits)
{
    const float top = (float)kvc_quant_levels(bits), inv = 1.0f / scale;
    double lane[KVC_QUANT_ERR_LANES], s = 0.0;
    int64_t i = 0;
    int j;
    for (j = 0; j < KVC_QUANT_ERR_LANES; j++) lane[j] = 0.0;
    for (; i + KVC_QUANT_ERR_LANES <= n; i += KVC_QUANT_ERR_LANES)
        for (j = 0; j < KVC_QUANT_ERR_LANES; j++) lane[j] += kvc_quant_step_sq(x[(i + j) * stride], lo, inv, top);
    for (j = 0; i < n; i++, j++) lane[j] += kvc_quant_step_sq(x[i * stride], lo, inv, top);
    for (j = 0; j < KVC_QUANT_ERR_LANES; j++) s += lane[j];
    return s * ((double)scale * (double)scale);
}

/* Candidate (a, b) of a group's clipped ranges: [min + a f r, max - b f r]
 * (r = max - min, f = KVC_QUANT_CLIP_MOST / KVC_QUANT_CLIP_STEPS), its
 * stored min and scale. Ends are min + r * (a f) as a product exact in
 * double rounded once to double then to fp32, like kvc_dequant, so every
 * build gets the same range; (0, 0) is min/max itself. Shared by
 * kvc_quant_clip_range and the CPU's side-by-side search (quant.c). */
KVC_HD KVC_INLINE void kvc_quant_clip_candidate(float mn, float mx, int32_t a, int32_t b, int32_t bits,
                                                   float *lo_out, float *sc_out)
{
    const float r = mx - mn;
    const float fa = (float)a * (KVC_QUANT_CLIP_MOST / (float)KVC_QUANT_CLIP_STEPS);
    const float fb = (float)b * (KVC_QUANT_CLIP_MOST / (float)KVC_QUANT_CLIP_STEPS);
    const float lo = kvc_quant_min((float)((double)mn + (double)r * (double)fa));
    const float hi = (float)((double)mx - (double)r * (double)fb);
    *lo_out = lo;
    *sc_out = kvc_quant_scale(lo, hi, bits);
}

/* The stored min and scale of a group whose range is clipped for the least
 * squared error (kvc_pack_params.clip): among the candidates
 * (kvc_quant_clip_candidate), a outer and b inner, (0, 0) first, the first
 * of least kvc_quant_clip_error; elements outside it take the end codes. A
 * constant group keeps (0, 0). */
KVC_HD KVC_INLINE void kvc_quant_clip_range(const float *x, int64_t n, int64_t stride, int32_t bits,
                                               float *mn_out, float *sc_out)
{
    float mn, mx, lo, sc;
    double best;
    kvc_quant_minmax(x, n, stride, &mn, &mx);
    kvc_quant_clip_candidate(mn, mx, 0, 0, bits, mn_out, sc_out);
    if (*sc_out == 0.0f) return;
    best = kvc_quant_clip_error(x, n, stride, *mn_out, *sc_out, bits);
    for (int32_t a = 0; a <= KVC_QUANT_CLIP_STEPS; a++)
        for (int32_t b = a == 0 ? 1 : 0; a + b <= KVC_QUANT_CLIP_STEPS; b++) { /* (0, 0) is min/max, done */
            kvc_quant_clip_candidate(mn, mx, a, b, bits, &lo, &sc);
            const double e = kvc_quant_clip_error(x, n, stride, lo, sc, bits);
            if (e < best) {
                best = e;
                *mn_out = lo;
                *sc_out = sc;
            }
        }
}

/* Key feedback (kvc_pack_params.feedback): x - err * w as one fused
 * multiply-add, the exact value rounded once to fp32 (fmaf is correctly
 * rounded wherever it runs: FMA instructions on the CPU clones that have
 * them, the libm routine on the baseline one, the GPU's own FMA, so every
 * build gives the same bits), clamped to +-FLT_MAX / 2 (the range pack
 * accepts, so a group's scale stays finite whatever the weights; an
 * overflow to +-Inf clamps too, and finite inputs never give NaN). */
KVC_HD static inline float kvc_quant_feedback(float x, float err, float w)
{
    const float lim = 1.70141173e38f; /* FLT_MAX / 2 */
    float r = fmaf(-err, w, x);
    r = r > lim ? lim : r;
    r = r < -lim ? -lim : r;
    return r;
}

/* Whether pack refuses element idx of a float-typed buffer: NaN, +-Inf, or
 * a magnitude above FLT_MAX / 2, past which the range max - min of a group
 * could overflow to Inf (and its scale with it). One comparison of the
 * bits: fp16 never exceeds the bound, bf16 does from 0x7f00. */
KVC_HD static inline int kvc_quant_refused(const void *base, int32_t dtype, int64_t idx)
{
    switch (dtype) {
    case KVC_F16: return (((const uint16_t *)base)[idx] & 0x7fffu) >= 0x7c00u;
    case KVC_BF16: return (((const uint16_t *)base)[idx] & 0x7fffu) > 0x7effu;
    default: return (kvc_f32_bits(((const float *)base)[idx]) & 0x7fffffffu) > 0x7effffffu;
    }
}

#ifdef __cplusplus
}
#endif

#endif /* KVC_QUANT_MATH_H */
