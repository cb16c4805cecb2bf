/*
 * attention_tile.h - the CPU tile kernels of the attention ops (attention.c,
 * attention_packed.c): one query row against a tile of AT_TK slot rows in
 * fp32, the online-softmax step of a tile, and the weighted sum of a tile's
 * value rows into up to four output rows at once.
 *
 * GCC/clang vector extensions where available (AT_VEC), plain loops
 * otherwise; every sum runs in a fixed order (kvc_lanes_sum's tree), so a
 * result never depends on the vector width or the thread count. Everything
 * is KVC_INLINE, so it runs at the ISA of the KVC_HOT clone that calls it.
 * CPU only (nvcc never includes it).
 */
#ifndef KVC_ATTENTION_TILE_H
#define KVC_ATTENTION_TILE_H

#include <math.h>
#include <string.h>

#include "attention_packed_math.h"
#include "kvc_math.h"

#define AT_TK KVC_LANES /* slots per tile: one vector of logits per row */

#if defined(__GNUC__) && !defined(__CUDACC__)
#define AT_VEC 1
typedef float at_vf __attribute__((vector_size(AT_TK * sizeof(float))));
#if defined(__clang__) || __GNUC__ >= 12
#define AT_TREE 1
#endif
#endif

#ifdef AT_VEC
typedef uint32_t at_vu __attribute__((vector_size(AT_TK * sizeof(uint32_t))));
typedef uint64_t at_vq __attribute__((vector_size(AT_TK * sizeof(uint32_t)))); /* at_vu as 64-bit lanes */
typedef int32_t at_vi __attribute__((vector_size(AT_TK * sizeof(int32_t))));
typedef uint16_t at_vh __attribute__((vector_size(AT_TK * sizeof(uint16_t))));
/* Half a tile vector, one AVX2 register. GCC lowers 16-lane vectors that
 * are wider than the clone's registers piece by piece, and a loop-carried
 * one goes through the stack with scalar moves at every iteration: loops
 * that carry sums use two of these, lanes 0-7 and 8-15 (the same sums). */
typedef float at_v8 __attribute__((vector_size(AT_TK / 2 * sizeof(float))));
typedef int32_t at_v8i __attribute__((vector_size(AT_TK / 2 * sizeof(int32_t))));
typedef uint32_t at_v8u __attribute__((vector_size(AT_TK / 2 * sizeof(uint32_t))));

/* 16 fp16 -> fp32, kvc_f16_to_f32 lane-wise: GCC does not if-convert the
 * scalar function's selects, and F16C cannot be assumed (AVX2 clone). */
KVC_INLINE void at_f16_block(float *dst, const uint16_t *src)
{
    at_vh hv;
    at_vu h, em, e, normal, infnan, sub, is_inf, is_zero, r;
    at_vf subf;
    memcpy(&hv, src, sizeof hv);
    h = __builtin_convertvector(hv, at_vu);
    em = h & 0x7fffu;
    e = em & 0x7c00u;
    normal = (em << 13) + 0x38000000u;
    infnan = (em << 13) | 0x7f800000u;
    subf = __builtin_convertvector((at_vi)em, at_vf) * 5.9604644775390625e-8f;
    sub = (at_vu)subf;
    is_inf = (at_vu)(e == 0x7c00u);
    is_zero = (at_vu)(e == 0u);
    r = (is_inf & infnan) | (~is_inf & ((is_zero & sub) | (~is_zero & normal)));
    r |= (h & 0x8000u) << 16;
    memcpy(dst, &r, sizeof r);
}
#endif

/* n elements spaced `stride` apart -> dense fp32 (force-inlined so each
 * clone converts at its own ISA). */
KVC_INLINE void at_row_f32(float *dst, const char *src, int32_t dtype, int64_t n, int64_t stride)
{
    int64_t i = 0;
#ifdef AT_VEC
    /* contiguous fp16 a vector at a time (the scalar conversion's selects do
     * not vectorise), the tail and every other case as kvc_math.h does */
    if (dtype == KVC_F16 && stride == 1) {
        for (; i + AT_TK <= n; i += AT_TK) at_f16_block(dst + i, (const uint16_t *)src + i);
        src += i * (int64_t)sizeof(uint16_t);
    }
#endif
    kvc_row_to_f32(dst + i, src, dtype, n - i, stride);
}

#ifdef AT_VEC

/* Centred fp32 codes of 8 consecutive channels: lanes 0-3 take word a,
 * lanes 4-7 word b (the same word but for 8-bit), lane l shifted by
 * base + (l * bits mod 32), then masked. Scalars in, so that no vector
 * crosses a call boundary before inlining (GCC's -Wpsabi note). */
KVC_INLINE void at_unpack8(float *dst, uint32_t a, uint32_t b, uint32_t base, int bits)
{
    const at_v8u lane = {0, 1, 2, 3, 4, 5, 6, 7};
    /* a broadcast when the lanes share a word (GCC builds the general
     * vector with inserts) */
    const at_v8u w = bits == 8 ? (at_v8u){a, a, a, a, b, b, b, b} : (at_v8u){0} + a;
    const at_v8u sh = ((lane * (uint32_t)bits) & 31u) + base;
    const at_v8 f = __builtin_convertvector((at_v8i)((w >> sh) & kvc_pk_mask(bits)), at_v8) -
                     kvc_pk_mid(bits);
    memcpy(dst, &f, sizeof f);
}
#endif

/* Packed codes (docs/packed.md) of a block of 16 channels -> centred fp32
 * codes (kvc_pk_centred), in channel order.
 * Each half takes the 32-bit words that hold its codes by broadcasts (a
 * vector assembled in memory from narrower stores would stall store
 * forwarding), then a variable shift, a mask, a conversion and minus mid:
 * 2-bit, one word for all 16; 4-bit, one word per half; 8-bit, one word per
 * quarter. bits is a constant after inlining. */
KVC_INLINE void at_unpack16(float *dst, const uint8_t *src, int bits)
{
#ifdef AT_VEC
    /* word by word, so that each broadcast can read its word from memory */
    uint32_t x0, x1, x2, x3;
    memcpy(&x0, src, 4);
    if (bits == 8) {
        memcpy(&x1, src + 4, 4);
        memcpy(&x2, src + 8, 4);
        memcpy(&x3, src + 12, 4);
        at_unpack8(dst, x0, x1, 0, 8);
        at_unpack8(dst + 8, x2, x3, 0, 8);
    } else if (bits == 4) {
        memcpy(&x1, src + 4, 4);
        at_unpack8(dst, x0, x0, 0, 4);
        at_unpack8(dst + 8, x1, x1, 0, 4);
    } else {
        at_unpack8(dst, x0, x0, 0, 2);
        at_unpack8(dst + 8, x0, x0, 16, 2);
    }
#else
    int c;
    for (c = 0; c < AT_TK; c++) dst[c] = kvc_pk_centred(kvc_pk_lane_code(src, c, bits), bits);
#endif
}

#ifdef AT_TREE
#define AT_SHUF8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
/* Lane j of the result = the sum of 8 slots' half-summed lanes s[j]
 * (kvc_lanes_sum's tree after its first level, l + 8: then + 4, + 2, + 1),
 * in 8-lane vectors, one register each on AVX2. */
KVC_INLINE void at_sum8(const at_v8 *s, at_v8 *out)
{
    at_v8 b[4], c[2];
    int j;
    for (j = 0; j < 4; j++)
        b[j] = AT_SHUF8(s[2 * j], s[2 * j + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
               AT_SHUF8(s[2 * j], s[2 * j + 1], 4, 5, 6, 7, 12, 13, 14, 15);
    for (j = 0; j < 2; j++)
        c[j] = AT_SHUF8(b[2 * j], b[2 * j + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
               AT_SHUF8(b[2 * j], b[2 * j + 1], 2, 3, 6, 7, 10, 11, 14, 15);
    *out = AT_SHUF8(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14) + AT_SHUF8(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15);
}
#undef AT_SHUF8

/* at_finish8 of one row from the 16 slots' whole partial sums a[j]: the
 * same sum tree (kvc_lanes_sum16, two slots per vector from its first
 * level, where at_sum8 adds each slot's halves first), so the same bits,
 * with 30 shuffles and 15 additions per 16 slots instead of 16 half
 * extractions, 28 shuffles and 30 additions, and the row's 16 logits leave
 * in one 64-byte store that the wide softmax loads whole. */
KVC_INLINE void at_finish16w(const at_vf *a, const float *lc, float scaling, float *x)
{
    at_vf o, l;
    kvc_lanes_sum16(a, &o);
    memcpy(&l, lc, sizeof l);
    o = o * scaling + l;
    memcpy(x, &o, sizeof o);
}
#endif

#ifdef AT_VEC
/* Finishes the logits of one row from s[j] = lanes 0-7 + lanes 8-15 of
 * slot j's partial sums (the tree's first level): the rest of the
 * kvc_lanes_sum tree, scaled, plus the log-count bias lc. */
KVC_INLINE void at_finish8(const at_v8 *s, const float *lc, float scaling, float *x)
{
    int h;
    for (h = 0; h < 2; h++) {
        at_v8 o, l;
#ifdef AT_TREE
        at_sum8(s + 8 * h, &o);
#else
        int j;
        for (j = 0; j < 8; j++) {
            float t[8];
            memcpy(t, &s[8 * h + j], sizeof t);
            o[j] = ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]));
        }
#endif
        memcpy(&l, lc + 8 * h, sizeof l);
        o = o * scaling + l;
        memcpy(x + 8 * h, &o, sizeof o);
    }
}
#endif

/* Kinds of slot rows the tile kernels read, a constant after inlining:
 * fp32 rows; bf16 rows read in place, in the AT_BF16 order (attention.c,
 * vector builds only); or, for keys, rows of packed codes of 2, 4 or 8 bits
 * (the kind is the bit width). */
#define AT_ROWS_F32 0
#define AT_ROWS_BF16 1

#ifdef AT_VEC
/* bf16 as 32-bit words: `<< 16` gives the even elements as fp32 and
 * masking the low half the odd ones, one instruction each instead of a
 * widening conversion. Rows read this way keep each chunk of 32 elements
 * as its 16 even elements, then its 16 odd ones (the AT_BF16 order;
 * queries and outputs too). */
#define AT_BF16_EVEN8(w) ((at_v8)((w) << 16))
#define AT_BF16_ODD8(w) ((at_v8)((w) & 0xffff0000u))

/* Positions [c, c + AT_TK) (c a multiple of AT_TK) of a slot row of the
 * given kind as fp32, lanes 0-7 in *v0 and 8-15 in *v1. bf16: the even
 * (c % 32 == 0) or odd elements of the chunk at c / 32, words 0-7 holding
 * its elements 0..15 and words 8-15 the rest; codes: unpacked, centred. */
KVC_INLINE void at_row_block(at_v8 *v0, at_v8 *v1, const void *row, int64_t c, int kind)
{
    if (kind == AT_ROWS_BF16) {
        const uint16_t *e = (const uint16_t *)row + (c & ~(int64_t)(2 * AT_TK - 1));
        at_v8u w0, w1;
        memcpy(&w0, e, sizeof w0);
        memcpy(&w1, e + AT_TK, sizeof w1);
        *v0 = c & AT_TK ? AT_BF16_ODD8(w0) : AT_BF16_EVEN8(w0);
        *v1 = c & AT_TK ? AT_BF16_ODD8(w1) : AT_BF16_EVEN8(w1);
    } else if (kind != AT_ROWS_F32) {
        float k[AT_TK];
        at_unpack16(k, (const uint8_t *)row + c / AT_TK * 2 * kind, kind);
        memcpy(v0, k, sizeof *v0);
        memcpy(v1, k + AT_TK / 2, sizeof *v1);
    } else {
        memcpy(v0, (const float *)row + c, sizeof *v0);
        memcpy(v1, (const float *)row + c + AT_TK / 2, sizeof *v1);
    }
}
#endif

#ifdef AT_TREE
/* The wide path (kvc.h, KVC_WIDE): the same tile loops in 16-lane vectors,
 * lane l of a vector being lane l % 8 of half l / 8 above, so every lane
 * runs the same operations in the same order as with halves. Only units
 * built for x86-64-v4 take it (wide = 1, a constant after inlining); a
 * narrower clone never runs these. Where __builtin_shufflevector is
 * missing (GCC < 12, which builds no wide unit either) wide is ignored. */

/* at_unpack16's 16 centred codes as one vector. The code bytes come in as
 * 64-bit broadcasts and one dword permute puts each lane's 32-bit word in
 * it (4 bits: lanes 0-7 the first word, 8-15 the second; 8 bits: a word
 * per 4 lanes), then one variable shift by (l * bits) mod 32. 8 bits: mask,
 * conversion and minus mid. 2 and 4 bits: a lookup in a 16-entry table of
 * centred values (one vpermps, which reads only the index's low 4 bits: no
 * mask; the 2-bit table repeats its 4 values, so the next code's bits
 * above a lane's own do not matter either). Each table entry is (float)code
 * - mid, exact in fp32: the values are at_unpack16's to the bit. (Vectors
 * are built from broadcasts only: GCC builds a 16-lane vector from a
 * narrower one through the stack, a stalled load. The 4-bit words were
 * two dword broadcasts merged by masks: two more operations than the
 * permute.) */
#ifdef __clang__
/* clang has no variable __builtin_shuffle (and builds no wide unit) */
#define AT_LOOKUP16(t, i) ({ at_vf o_; int l_; for (l_ = 0; l_ < AT_TK; l_++) o_[l_] = (t)[(i)[l_] & 15u]; o_; })
#else
#define AT_LOOKUP16(t, i) __builtin_shuffle(t, i) /* lane l = t[i[l] mod 16] */
#endif
KVC_INLINE void at_unpack16w(at_vf *dst, const uint8_t *src, int bits)
{
    const at_vu lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    if (bits == 8) {
        uint64_t q0, q1;
        memcpy(&q0, src, 8);
        memcpy(&q1, src + 8, 8);
        const at_vu a = (at_vu)((at_vq){0} + q0), b = (at_vu)((at_vq){0} + q1);
        /* lanes 4w .. 4w + 3 take word w of the 16 bytes */
        const at_vu w = __builtin_shufflevector(a, b, 0, 0, 0, 0, 1, 1, 1, 1, 16, 16, 16, 16, 17, 17, 17, 17);
        *dst = __builtin_convertvector((at_vi)((w >> ((lane * 8u) & 31u)) & 0xffu), at_vf) - kvc_pk_mid(8);
    } else if (bits == 4) {
        /* lane l of the table: l - mid */
        const at_vf t4 = __builtin_convertvector((at_vi)lane, at_vf) - kvc_pk_mid(4);
        uint64_t q;
        memcpy(&q, src, 8);
        const at_vu a = (at_vu)((at_vq){0} + q);
        const at_vu w = __builtin_shufflevector(a, a, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        *dst = AT_LOOKUP16(t4, w >> ((lane * 4u) & 31u));
    } else {
        /* lane l of the table: (l mod 4) - mid */
        const at_vf t2 = __builtin_convertvector((at_vi)(lane & 3u), at_vf) - kvc_pk_mid(2);
        uint32_t x0;
        memcpy(&x0, src, 4);
        *dst = AT_LOOKUP16(t2, ((at_vu){0} + x0) >> ((lane * 2u) & 31u));
    }
}

/* The n vectors x (n = 1, 2, 4, 8 or 16, a constant after inlining; in
 * place) read as n x 16 floats in order -> vector k, lane i = float n * i +
 * k: log2(n) stages, each taking the even lanes of consecutive pairs into
 * the first half and the odd ones into the second (a transpose of 16 x n
 * by two-source permutes). Used for [slot][group] value scales
 * (attention_packed.c) and for a query dealt into the order packed codes
 * lie in their bytes (attention_rows_span.h). */
#define AT_EVEN(a, b) __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
#define AT_ODD(a, b) __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31)
KVC_INLINE void at_deal(at_vf *x, int n)
{
    at_vf y[16];
    int st, j;
    /* unrolled whole, so that x and y stay in registers */
    _Pragma("GCC unroll 4")
    for (st = 1; st < n; st *= 2) {
        _Pragma("GCC unroll 8")
        for (j = 0; j < n / 2; j++) {
            y[j] = AT_EVEN(x[2 * j], x[2 * j + 1]);
            y[n / 2 + j] = AT_ODD(x[2 * j], x[2 * j + 1]);
        }
        _Pragma("GCC unroll 16")
        for (j = 0; j < n; j++) x[j] = y[j];
    }
}
#undef AT_EVEN
#undef AT_ODD

/* at_row_block's positions [c, c + AT_TK) as one 16-lane vector. */
KVC_INLINE void at_row_block16(at_vf *v, const void *row, int64_t c, int kind)
{
    if (kind == AT_ROWS_BF16) {
        const uint16_t *e = (const uint16_t *)row + (c & ~(int64_t)(2 * AT_TK - 1));
        at_vu w;
        memcpy(&w, e, sizeof w);
        *v = c & AT_TK ? (at_vf)(w & 0xffff0000u) : (at_vf)(w << 16);
    } else if (kind != AT_ROWS_F32) {
        at_unpack16w(v, (const uint8_t *)row + c / AT_TK * 2 * kind, kind);
    } else {
        memcpy(v, (const float *)row + c, sizeof *v);
    }
}

#endif

/* Logits x[r][j] = scaling * q_r . k_j + (lc[j] + bias[r]) of NR (1..4,
 * a constant after inlining) query rows, qs floats apart, against a tile
 * of AT_TK slot rows of the given kind (AT_ROWS_*; Dp a multiple of AT_TK
 * positions). Packed keys are unpacked a block at a time and never stored.
 * bias NULL: none; x rows AT_TK apart. Per slot the products are summed in
 * AT_TK lanes along d, then the lanes by the kvc_lanes_sum tree: the same
 * order with or without vector extensions, and the same values whether
 * codes come unpacked or packed. One slot at a time, its key block loaded
 * once for the NR rows, in two 8-lane halves: 2 x NR sums live (16 slots'
 * sums at once would need 32 AVX2 registers, whose spills cost more than
 * the arithmetic). */
KVC_INLINE void at_logits_rows(const float *qr, int64_t qs, const void *const *kp, int kind, const float *lc,
                               const float *bias, int64_t Dp, float scaling, float *x, int NR, int wide)
{
#ifdef AT_VEC
    at_v8 s[4][AT_TK];
#ifdef AT_TREE
    at_vf sw[4][AT_TK];
#endif
    int64_t c;
    int j, r;
#ifndef AT_TREE
    (void)wide;
#endif
    for (j = 0; j < AT_TK; j++) {
        at_v8 lo[4], hi[4];
#ifdef AT_TREE
        if (wide) {
            /* the wide path: a slot's NR sums each in one 16-lane vector,
             * kept whole for at_finish16w (its halves are added there as
             * lo + hi are below) */
            at_vf a[4];
            for (r = 0; r < NR; r++) a[r] = (at_vf){0};
            for (c = 0; c < Dp; c += AT_TK) {
                at_vf k;
                at_row_block16(&k, kp[j], c, kind);
                for (r = 0; r < NR; r++) {
                    at_vf q;
                    memcpy(&q, qr + r * qs + c, sizeof q);
                    a[r] += q * k;
                }
            }
            for (r = 0; r < NR; r++) sw[r][j] = a[r];
            continue;
        }
#endif
        for (r = 0; r < NR; r++) lo[r] = hi[r] = (at_v8){0};
        for (c = 0; c < Dp; c += AT_TK) {
            at_v8 k0, k1;
            at_row_block(&k0, &k1, kp[j], c, kind);
            for (r = 0; r < NR; r++) {
                at_v8 q0, q1;
                memcpy(&q0, qr + r * qs + c, sizeof q0);
                memcpy(&q1, qr + r * qs + c + AT_TK / 2, sizeof q1);
                lo[r] += q0 * k0;
                hi[r] += q1 * k1;
            }
        }
        for (r = 0; r < NR; r++) s[r][j] = lo[r] + hi[r];
    }
    for (r = 0; r < NR; r++) {
        float l[AT_TK];
        for (j = 0; j < AT_TK; j++) l[j] = bias ? lc[j] + bias[r] : lc[j];
#ifdef AT_TREE
        if (wide) {
            at_finish16w(sw[r], l, scaling, x + r * AT_TK);
            continue;
        }
#endif
        at_finish8(s[r], l, scaling, x + r * AT_TK);
    }
#else
    /* fp32 or packed keys (bf16 rows are read in place only with vectors) */
    int j, r, l;
    (void)wide;
    for (r = 0; r < NR; r++)
        for (j = 0; j < AT_TK; j++) {
            float acc[AT_TK], k[AT_TK];
            int64_t c;
            for (l = 0; l < AT_TK; l++) acc[l] = 0.0f;
            for (c = 0; c < Dp; c += AT_TK) {
                const float *kr = (const float *)kp[j] + c;
                if (kind > AT_ROWS_BF16) {
                    at_unpack16(k, (const uint8_t *)kp[j] + c / AT_TK * 2 * kind, kind);
                    kr = k;
                }
                for (l = 0; l < AT_TK; l++) acc[l] += qr[r * qs + c + l] * kr[l];
            }
            x[r * AT_TK + j] = kvc_lanes_sum(acc) * scaling + (bias ? lc[j] + bias[r] : lc[j]);
        }
#endif
}

/* at_logits_rows over R rows, four at a time. */
KVC_INLINE void at_logits_all(const float *qr, int64_t qs, const void *const *kp, int kind, const float *lc,
                              const float *bias, int64_t Dp, float scaling, float *x, int64_t R, int wide)
{
    int64_t r;
    for (r = 0; r < R; r += 4) {
        const float *b = bias ? bias + r : NULL;
        switch (R - r < 4 ? R - r : 4) {
        case 1: at_logits_rows(qr + r * qs, qs, kp, kind, lc, b, Dp, scaling, x + r * AT_TK, 1, wide); break;
        case 2: at_logits_rows(qr + r * qs, qs, kp, kind, lc, b, Dp, scaling, x + r * AT_TK, 2, wide); break;
        case 3: at_logits_rows(qr + r * qs, qs, kp, kind, lc, b, Dp, scaling, x + r * AT_TK, 3, wide); break;
        default: at_logits_rows(qr + r * qs, qs, kp, kind, lc, b, Dp, scaling, x + r * AT_TK, 4, wide); break;
        }
    }
}

#ifdef AT_VEC
/* lo[r], hi[r] <- 0 for NR rows: a pass of an accumulation in halves sums
 * its tile's weighted rows from zero, and at_rows_store joins them to the
 * rescaled output. (Starting the sums from alpha * output instead puts two
 * products in one addition, acc * alpha + w * v, and -ffp-contract=fast
 * fuses either one: which one can differ between two inlined copies of
 * the same source, so the wide and the cloned units, or two clones, would
 * round differently.) */
KVC_INLINE void at_rows_load(at_v8 *lo, at_v8 *hi, int NR)
{
    int r;
    for (r = 0; r < NR; r++) lo[r] = hi[r] = (at_v8){0};
}

/* Lanes [c, c + AT_TK) of output row r <- alpha[r] * those lanes + (lo[r],
 * hi[r]), for NR rows (one product per sum: one way to fuse it). */
KVC_INLINE void at_rows_store(float *const *acc, const at_v8 *lo, const at_v8 *hi, const float *alpha,
                              int64_t c, int NR)
{
    int r;
    for (r = 0; r < NR; r++) {
        at_v8 a, b;
        memcpy(&a, acc[r] + c, sizeof a);
        memcpy(&b, acc[r] + c + AT_TK / 2, sizeof b);
        a = a * alpha[r] + lo[r];
        b = b * alpha[r] + hi[r];
        memcpy(acc[r] + c, &a, sizeof a);
        memcpy(acc[r] + c + AT_TK / 2, &b, sizeof b);
    }
}

/* The wide path's at_accumulate1 over nb (1 or 2, a constant after
 * inlining) blocks at once, [c, c + AT_TK) weighted by x0 and the next by
 * x1: one 16-lane sum per row and block, lane for lane the chains of the
 * halves. Two blocks keep 2 x NR chains in flight, as the halves do: the
 * sums over a tile's slots are chains of dependent FMAs, so one block
 * alone would leave the FMA units waiting on their latency. */
#ifdef AT_TREE
KVC_INLINE void at_accumulate2_w(float *const *acc, const void *const *vp, const float *x0, const float *x1,
                                 const float *alpha, int64_t c, int NR, int kind, int nb)
{
    at_vf a[4], b[4];
    int j, r;
    for (r = 0; r < NR; r++) a[r] = b[r] = (at_vf){0}; /* as at_rows_load */
    for (j = 0; j < AT_TK; j++) {
        at_vf v, u;
        at_row_block16(&v, vp[j], c, kind);
        if (nb == 2) at_row_block16(&u, vp[j], c + AT_TK, kind);
        for (r = 0; r < NR; r++) {
            a[r] += x0[r * AT_TK + j] * v;
            if (nb == 2) b[r] += x1[r * AT_TK + j] * u;
        }
    }
    for (r = 0; r < NR; r++) {
        /* as at_rows_store */
        at_vf o;
        memcpy(&o, acc[r] + c, sizeof o);
        o = o * alpha[r] + a[r];
        memcpy(acc[r] + c, &o, sizeof o);
        if (nb == 2) {
            memcpy(&o, acc[r] + c + AT_TK, sizeof o);
            o = o * alpha[r] + b[r];
            memcpy(acc[r] + c + AT_TK, &o, sizeof o);
        }
    }
}
#endif

/* Output lanes [c, c + AT_TK) of at_accumulate for NR rows of V rows of
 * the given kind (AT_ROWS_F32 or AT_ROWS_BF16; also attention_packed.c's
 * grouped sums, whose weights x change per vector), in two halves of 8
 * lanes (at_v8: 2 x NR sums live, no spills). */
KVC_INLINE void at_accumulate1(float *const *acc, const void *const *vp, const float *x,
                               const float *alpha, int64_t c, int NR, int kind)
{
    at_v8 lo[4], hi[4];
    int j, r;
    at_rows_load(lo, hi, NR);
    for (j = 0; j < AT_TK; j++) {
        at_v8 v0, v1;
        at_row_block(&v0, &v1, vp[j], c, kind);
        for (r = 0; r < NR; r++) {
            const float w = x[r * AT_TK + j];
            lo[r] += w * v0;
            hi[r] += w * v1;
        }
    }
    at_rows_store(acc, lo, hi, alpha, c, NR);
}

/* The value sums of a tile over all Dp lanes, block by block: block
 * [c, c + AT_TK) takes its weights at W + (c / AT_TK / gv) * gs (gs = 0: the
 * same weights for every block, at_accumulate; otherwise attention_packed.c's
 * grouped sums, gv blocks per value group). The wide path takes two blocks
 * at a time (at_accumulate2_w), the halves one (at_accumulate1); the same
 * sums either way. */
KVC_INLINE void at_accumulate_blocks(float *const *acc, const void *const *vp, const float *W, int64_t gs,
                                     int64_t gv, const float *alpha, int64_t Dp, int NR, int kind, int wide)
{
    int64_t c = 0;
#ifdef AT_TREE
    if (wide) {
        for (; c + 2 * AT_TK <= Dp; c += 2 * AT_TK)
            at_accumulate2_w(acc, vp, W + c / AT_TK / gv * gs, W + (c / AT_TK + 1) / gv * gs, alpha, c, NR,
                             kind, 2);
        if (c < Dp) at_accumulate2_w(acc, vp, W + c / AT_TK / gv * gs, NULL, alpha, c, NR, kind, 1);
        return;
    }
#else
    (void)wide;
#endif
    for (; c < Dp; c += AT_TK) at_accumulate1(acc, vp, W + c / AT_TK / gv * gs, alpha, c, NR, kind);
}
#endif

/* acc[r] <- alpha[r] * acc[r] + sum_j x[r][j] v_j over a tile of V rows of
 * the given kind (AT_ROWS_F32, or AT_ROWS_BF16 in vector builds), for NR
 * (1..4, a constant after inlining) query rows at once, so each V row is
 * loaded once for the NR rows. Every output lane is one FMA chain over the
 * slots in order, from zero, then alpha * acc + chain (at_rows_load /
 * at_rows_store); 2 x NR chains are in flight. */
KVC_INLINE void at_accumulate(float *const *acc, const void *const *vp, const float *x,
                              const float *alpha, int64_t Dp, int NR, int kind, int wide)
{
#ifdef AT_VEC
    at_accumulate_blocks(acc, vp, x, 0, 1, alpha, Dp, NR, kind, wide);
#else
    (void)kind;
    (void)wide;
    int64_t c;
    int j, r;
    for (r = 0; r < NR; r++)
        for (c = 0; c < Dp; c++) {
            float o = acc[r][c] * alpha[r];
            for (j = 0; j < AT_TK; j++) o += x[r * AT_TK + j] * ((const float *)vp[j])[c];
            acc[r][c] = o;
        }
#endif
}

#ifdef AT_TREE
#define AT_SHUF1(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
/* Bitwise select of 8-lane vectors: m ? a : b, m all ones or all zeros. A
 * macro: vector arguments or returns would change the psABI of the
 * baseline-ISA copy. */
#define AT_SEL8(m, a, b) ((at_v8)(((at_v8i)(a) & (m)) | ((at_v8i)(b) & ~(m))))

/* Sum of 16 lanes held in two halves in the kvc_lanes_sum order (l + 8,
 * + 4, + 2, + 1), as 8-lane adds and shuffles (GCC leaves the array form
 * as 15 scalar adds). */
KVC_INLINE float at_sum16(const at_v8 *lo, const at_v8 *hi)
{
    at_v8 v = *lo + *hi;
    v += AT_SHUF1(v, 4, 5, 6, 7, 4, 5, 6, 7);
    v += AT_SHUF1(v, 2, 3, 2, 3, 2, 3, 2, 3);
    return v[0] + v[1];
}

/* at_sum16 of the 16 lanes stored at x. */
KVC_INLINE float at_hsum16(const float *x)
{
    at_v8 lo, hi;
    memcpy(&lo, x, sizeof lo);
    memcpy(&hi, x + 8, sizeof hi);
    return at_sum16(&lo, &hi);
}

/* kvc_expf (kvc_math.h) of a vector in place, the same operations
 * lane-wise: VF its float type, VI / VU the int32 / uint32 vectors of its
 * width, SEL the bitwise select of that width (at_exp8, at_exp16w). */
#define AT_EXP_LANES(VF, VI, VU, SEL, px)                                                            \
    do {                                                                                           \
        const VF zero_ = {0}, x_ = *(px), lo_ = zero_ + KVC_EXP_LO, hi_ = zero_ + KVC_EXP_HI;      \
        const VI below_ = x_ < lo_;                                                                \
        const VF xc_ = SEL(below_, lo_, SEL(x_ > hi_, hi_, x_));                                   \
        const VF t_ = xc_ * KVC_EXP_LOG2E + KVC_EXP_SHIFT;                                         \
        const VF n_ = t_ - KVC_EXP_SHIFT;                                                          \
        const VU ni_ = (VU)t_ - 0x4b400000u;                                                       \
        VF r_ = xc_ - n_ * KVC_EXP_LN2_HI, p_ = zero_ + KVC_EXP_C7;                                \
        r_ = r_ - n_ * KVC_EXP_LN2_LO;                                                             \
        KVC_EXP_HORNER(p_, r_);                                                                    \
        p_ = p_ * (VF)((ni_ + 127u) << 23);                                                        \
        *(px) = SEL(below_, zero_, p_);                                                            \
    } while (0)

/* kvc_expf of 8 lanes at once (in place: a vector argument would change
 * the baseline copy's psABI). */
KVC_INLINE void at_exp8(at_v8 *px)
{
    AT_EXP_LANES(at_v8, at_v8i, at_v8u, AT_SEL8, px);
}

/* The largest of the 16 lanes held in two halves. */
KVC_INLINE float at_max16(const at_v8 *lo, const at_v8 *hi)
{
    at_v8 v = AT_SEL8(*lo > *hi, *lo, *hi), w;
    w = AT_SHUF1(v, 4, 5, 6, 7, 4, 5, 6, 7);
    v = AT_SEL8(v > w, v, w);
    w = AT_SHUF1(v, 2, 3, 2, 3, 2, 3, 2, 3);
    v = AT_SEL8(v > w, v, w);
    return v[0] > v[1] ? v[0] : v[1];
}

/* Masks lanes >= nvis of the 16 logits at x to -inf (in place) and returns
 * the largest lane. */
KVC_INLINE float at_mask_max(float *x, int64_t nvis)
{
    const at_v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
    const at_v8 ninf = (at_v8){0} - INFINITY;
    at_v8 lo, hi;
    memcpy(&lo, x, sizeof lo);
    memcpy(&hi, x + 8, sizeof hi);
    lo = AT_SEL8(lane < (int32_t)nvis, lo, ninf);
    hi = AT_SEL8(lane + 8 < (int32_t)nvis, hi, ninf);
    memcpy(x, &lo, sizeof lo);
    memcpy(x + 8, &hi, sizeof hi);
    return at_max16(&lo, &hi);
}

/* The wide path's softmax pieces, on one 16-lane vector of a row's logits
 * (stored whole by at_finish16w, so one 64-byte load forwards from one
 * store): the same lane-wise operations and the same sum tree as at_exp8,
 * at_mask_max and at_hsum16 on its halves. */
#define AT_SEL16(m, a, b) ((at_vf)(((at_vi)(a) & (m)) | ((at_vi)(b) & ~(m))))
KVC_INLINE void at_exp16w(at_vf *px)
{
    AT_EXP_LANES(at_vf, at_vi, at_vu, AT_SEL16, px);
}

/* at_mask_max of the 16 logits in *px (masked in place in the vector). */
KVC_INLINE float at_mask_max16w(at_vf *px, int64_t nvis)
{
    const at_vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const at_vf ninf = (at_vf){0} - INFINITY;
    at_v8 lo, hi;
    *px = AT_SEL16(lane < (int32_t)nvis, *px, ninf);
    lo = __builtin_shufflevector(*px, *px, 0, 1, 2, 3, 4, 5, 6, 7);
    hi = __builtin_shufflevector(*px, *px, 8, 9, 10, 11, 12, 13, 14, 15);
    return at_max16(&lo, &hi);
}

/* at_hsum16 of a vector's lanes. */
KVC_INLINE float at_hsum16w(const at_vf *x)
{
    const at_v8 lo = __builtin_shufflevector(*x, *x, 0, 1, 2, 3, 4, 5, 6, 7);
    const at_v8 hi = __builtin_shufflevector(*x, *x, 8, 9, 10, 11, 12, 13, 14, 15);
    return at_sum16(&lo, &hi);
}
#undef AT_SEL16
#undef AT_EXP_LANES
#undef AT_SHUF1
#endif

/* Online-softmax step of one row over a tile whose logits are x (first
 * nvis visible): x <- the weights exp(x - new max); returns the factor for
 * the row's running output. wide (x86-64-v4 units only): the 16 logits in
 * one vector, as at_finish16w stored them, the same bits as the halves.
 * (Logits written in halves, as pa_logits_multi's are, still come out
 * right, at the cost of a load that waits for both stores.) */
KVC_INLINE float at_softmax(float *x, int64_t nvis, struct kvc_softmax_state *st, int wide)
{
    float alpha;
    int j;
#ifdef AT_TREE
    at_v8 h[2];
    if (wide) {
        at_vf v;
        memcpy(&v, x, sizeof v);
        alpha = kvc_softmax_rescale(st, at_mask_max16w(&v, nvis));
        v -= st->m;
        at_exp16w(&v);
        memcpy(x, &v, sizeof v);
        st->s += at_hsum16w(&v);
        return alpha;
    }
    alpha = kvc_softmax_rescale(st, at_mask_max(x, nvis));
    /* masked slots: exp(-inf) = 0, and their V rows are finite. Half by
     * half: at_mask_max stored the halves separately, and a 16-lane copy
     * (what the v4 clone makes of a 64-byte memcpy) reading two 8-lane
     * stores stalls until both retire (no store forwarding). */
    for (j = 0; j < 2; j++) {
        memcpy(&h[j], x + 8 * j, sizeof h[j]);
        h[j] -= st->m;
        at_exp8(&h[j]);
        memcpy(x + 8 * j, &h[j], sizeof h[j]);
    }
    st->s += at_hsum16(x);
#else
    float t[AT_TK], bm = -INFINITY;
    (void)wide;
    for (j = 0; j < AT_TK; j++) {
        x[j] = j < nvis ? x[j] : -INFINITY;
        bm = x[j] > bm ? x[j] : bm;
    }
    alpha = kvc_softmax_rescale(st, bm);
    for (j = 0; j < AT_TK; j++) {
        x[j] = kvc_expf(x[j] - st->m);
        t[j] = x[j];
    }
    st->s += kvc_lanes_sum(t);
#endif
    return alpha;
}

/* Online-softmax pass of a tile of nk slots from jt over R rows: row r's
 * logits x[r] (AT_TK floats), running max pm[r] and sum ps[r], last
 * visible slot lim[r]; alpha[r] <- the factor for its running output. A
 * row that sees none of the tile's slots gets zero weights and factor 1,
 * which leaves its output as it is in the grouped accumulation. */
KVC_INLINE void at_softmax_rows(float *x, float *alpha, const int64_t *lim, float *pm, float *ps, int64_t R,
                                int64_t jt, int64_t nk, int wide)
{
    int64_t r;
    for (r = 0; r < R; r++) {
        const int64_t nvis = lim[r] - jt + 1;
        struct kvc_softmax_state st;
        if (nvis <= 0) {
            memset(x + r * AT_TK, 0, AT_TK * sizeof(float));
            alpha[r] = 1.0f;
            continue;
        }
        st.m = pm[r];
        st.s = ps[r];
        alpha[r] = at_softmax(x + r * AT_TK, nvis < nk ? nvis : nk, &st, wide);
        pm[r] = st.m;
        ps[r] = st.s;
    }
}

#endif /* KVC_ATTENTION_TILE_H */
