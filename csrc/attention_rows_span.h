/*
 * attention_rows_span.h - the few-rows path's span (attention_rows.h), as
 * inline functions at constant D, widths and row count: each of
 * attention_rows_d64.c, _d128.c and _d256.c instantiates them for its head
 * size (KVC_ROWS_SPAN_DEFINE), so that the build compiles the three in
 * parallel (one file took two minutes).
 *
 * The piece order. A code row is read in pieces (RP_PB below: 64 bytes,
 * lane i = dword i, or 16 bytes zero-extended, lane i = byte i). A lane
 * holds per codes of consecutive channels, channel per * i + k of the piece
 * in bits [k * bits, (k + 1) * bits) (docs/packed.md), so shifting the
 * piece right by k * bits and looking the low bits up in a 16-entry table
 * of centred values (kvc_pk_centred; the 2-bit table repeats its four, so
 * the next code's bits above a lane's own do not matter) gives the codes of
 * channels k, k + per, k + 2 per, ... of the piece: per vectors per piece.
 * 8-bit codes are masked and converted, not looked up. The query times the
 * key scales is dealt into that order once per token group (at_deal), and
 * the output row is kept in it across the span and put back in channel
 * order at its end, so no code is moved between lanes.
 *
 * Per chunk of KVC_ROWS_CHUNK slots:
 *   logits  16 slots at a time, each slot's products summed in 16 lanes
 *           along the channels, then across the 16 slots by
 *           kvc_lanes_sum16's tree; scaled, plus the token group's bias
 *           (scaling x q . key centres) and log(count) where the head has
 *           counts;
 *   softmax one rescale of the running state (the chunk's max), then the
 *           weights exp(x - max) (kvc_expf's operations, lane-wise);
 *   values  per slot, its weight times its value scales (one vector of the
 *           ng groups), broadcast per piece where the piece lies in one
 *           value group, else dealt to its lanes by a permute, times the
 *           centred codes into the output row; its weight times its value
 *           centres into one vector of group sums. Where the rows' running
 *           vectors are more than 16, in passes over the chunk's slots,
 *           each over a share of every row's vectors (RP_PASSES).
 * No software prefetches (docs/design.md, "The few-rows path": streamed,
 * the tile loops' prefetches made this path 1.38-1.46x slower at one row,
 * and the next chunk's 0.91-0.99x at four).
 */
#ifndef KVC_ATTENTION_ROWS_SPAN_H
#define KVC_ATTENTION_ROWS_SPAN_H

#include <math.h>
#include <string.h>

#include "attention_packed_math.h"
#include "attention_rows.h"
#include "attention_tile.h"
#include "kvc_math.h"

#ifdef KVC_ROWS
#include <immintrin.h>

#define RP_INLINE static inline __attribute__((always_inline)) KVC_WIDE_TARGET
/* A code row is read in pieces of 64 bytes where it is a whole number of
 * them, each one load, lane i = dword i; else of 16 bytes, each one
 * zero-extending load (vpmovzxbd), lane i = byte i. 64-byte pieces take no
 * shuffle to load: 512-bit shuffles issue one per cycle on the AMD EPYC
 * (Zen 5) this was tuned on, and they bound the loops. */
#define RP_PB(D, bits) ((D) * (bits) % 512 == 0 ? 64 : 16)
#define RP_PER(D, bits) (RP_PB(D, bits) / 16 * 8 / (bits)) /* codes per lane */
#define RP_CW(D, bits) (16 * RP_PER(D, bits))              /* channels per piece */
#define RP_NP(D, bits) ((D) * (bits) / 8 / RP_PB(D, bits))  /* pieces per row */
/* Loops over a row's vectors unrolled whole, so that the row's arrays
 * are registers: indexed in a loop, GCC keeps them in memory and the value
 * loop stored the running row at every slot. */
#define RP_UNROLL _Pragma("GCC unroll 16")

/* Position of channel c in the piece order of (D, bits): lane i of vector
 * k of piece m holds channel m * cw + per * i + k. */
static int64_t rp_pos(int64_t c, int64_t D, int bits)
{
    const int per = RP_PER(D, bits), cw = RP_CW(D, bits);
    return c / cw * cw + c % per * 16 + c % cw / per;
}

/* The centred codes of a piece: v[k] lane i = channel per * i + k of it. */
RP_INLINE void rp_codes(at_vf *v, const uint8_t *src, int D, int bits)
{
    const at_vu lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    /* vpmovzxbd by its intrinsic: GCC 12 builds __builtin_convertvector of
     * 16 bytes to dwords a byte at a time (twice slower than the tiles) */
    const at_vu z = RP_PB(D, bits) == 64 ? (at_vu)_mm512_loadu_si512(src)
                                          : (at_vu)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)src));
    const int per = RP_PER(D, bits); /* a plain bound: GCC drops the unroll pragma of a ?: one */
    int k;
    if (bits == 8) {
        RP_UNROLL
        for (k = 0; k < per; k++) {
            const at_vu c = per == 1 ? z : (z >> (uint32_t)(8 * k)) & 0xffu;
            v[k] = __builtin_convertvector((at_vi)c, at_vf) - kvc_pk_mid(8);
        }
        return;
    }
    {
        const at_vf t = __builtin_convertvector((at_vi)(lane & kvc_pk_mask(bits)), at_vf) - kvc_pk_mid(bits);
        RP_UNROLL
        for (k = 0; k < per; k++) v[k] = AT_LOOKUP16(t, z >> (uint32_t)(k * bits));
    }
}

/* A token group: qs = q x its key scales (ks, D contiguous) in the piece
 * order of kb, and the bias scaling x q . its key centres (min + scale x
 * mid, mins km), in channel order. */
RP_INLINE void rp_key_group(float *qs, float *bias, float scaling, const float *ks, const float *km,
                            const at_vf *qv, int D, int kb)
{
    const float mid = kvc_pk_mid(kb);
    const int per = RP_PER(D, kb);
    at_vf x[16], b = {0};
    int i;
    RP_UNROLL
    for (i = 0; i < D / 16; i++) {
        at_vf sc, mn;
        memcpy(&sc, ks + 16 * i, sizeof sc);
        memcpy(&mn, km + 16 * i, sizeof mn);
        b += qv[i] * (mn + sc * mid);
        x[i] = qv[i] * sc;
    }
    *bias = scaling * _mm512_reduce_add_ps((__m512)b);
    RP_UNROLL
    for (i = 0; i < D / 16; i += per) at_deal(x + i, per); /* into the piece order */
    RP_UNROLL
    for (i = 0; i < D / 16; i++) *(at_vf *)(qs + 16 * i) = x[i];
}

/* rows code rows of rb bytes from src (rows cs, bytes cd apart) into dst,
 * contiguous: strided inputs are read by the same loops as contiguous ones,
 * so they give the same bits. */
static void rp_stage_rows(uint8_t *dst, const uint8_t *src, int64_t cs, int64_t cd, int64_t rows, int64_t rb)
{
    int64_t r, b;
    for (r = 0; r < rows; r++)
        for (b = 0; b < rb; b++) dst[r * rb + b] = src[r * cs + b * cd];
}

/* n floats `stride` apart -> dst, contiguous. */
static void rp_stage_floats(float *dst, const float *src, int64_t stride, int64_t n)
{
    int64_t i;
    for (i = 0; i < n; i++) dst[i] = src[i * stride];
}

/* out[r] lane j = query row r . centred key codes of slot j of the 16 from
 * row kc (rows kcs bytes apart), for the NR rows, qs[r] (256 floats apart)
 * in the piece order: a slot's codes unpacked once for all rows, each
 * row's products summed in 16 lanes, then across the slots by
 * kvc_lanes_sum16's tree. (Piece by piece across the 16 slots, 16 sums in
 * flight, measured 0.93-0.98x of this at one row, benchmarks/ab_packed.py.) */
RP_INLINE void rp_logits16(at_vf *out, const uint8_t *kc, int64_t kcs, const float *qs, int D, int kb, int NR)
{
    const int np = RP_NP(D, kb), per = RP_PER(D, kb), pb = RP_PB(D, kb);
    at_vf a[KVC_ROWS_MAX][16];
    int j, m, k, r;
    for (j = 0; j < 16; j++) {
        const uint8_t *row = kc + j * kcs;
        at_vf sum[KVC_ROWS_MAX];
        RP_UNROLL
        for (r = 0; r < NR; r++) sum[r] = (at_vf){0};
        RP_UNROLL
        for (m = 0; m < np; m++) {
            at_vf v[16];
            rp_codes(v, row + pb * m, D, kb);
            RP_UNROLL
            for (r = 0; r < NR; r++) {
                RP_UNROLL
                for (k = 0; k < per; k++) sum[r] += *(const at_vf *)(qs + 256 * r + 16 * (m * per + k)) * v[k];
            }
        }
        RP_UNROLL
        for (r = 0; r < NR; r++) a[r][j] = sum[r];
    }
    RP_UNROLL
    for (r = 0; r < NR; r++) kvc_lanes_sum16(a[r], &out[r]);
}

/* How many passes over a chunk's value rows the NR running rows of D / 16
 * vectors take: each pass keeps its share of every row, at most 16 vectors
 * in all, in registers (with the codes, the weights and the table, the 32
 * are full), and a pass reads the chunk's code rows again, from the L1
 * cache where the first read them. 1, 2 or 4, a divisor of D / 16. */
#define RP_PASSES(nv, NR) ((NR) * (nv) <= 16 ? 1 : (NR) * (nv) <= 32 ? 2 : 4)

/* One pass of rp_values: the row vectors f0 .. f0 + fn - 1 (piece order)
 * of each of the NR rows, for the chunk's nc slots. Where a piece holds
 * vectors of other passes too, all its codes are taken apart and those the
 * pass does not use are dropped by the compiler (f0, fn are constants). */
RP_INLINE void rp_values_pass(at_vf *acc, const float *wb, int nc, const uint8_t *vc, int64_t vcs,
                              const at_vu *gi, const int *gs, int D, int vb, int one, int NR, int f0, int fn)
{
    const int per = RP_PER(D, vb), pb = RP_PB(D, vb), nv = D / 16;
    const int m0 = f0 / per, m1 = (f0 + fn - 1) / per;
    at_vf a[16];
    int i, j, m, k, r;
    /* the chunk's sums from zero, joined to the running ones at the end:
     * added slot by slot into the running sums over a whole span, the
     * error grew with the span (2x the tile loops', which sum a tile first) */
    RP_UNROLL
    for (i = 0; i < NR * fn; i++) a[i] = (at_vf){0};
    for (j = 0; j < nc; j++) {
        const uint8_t *row = vc + j * vcs;
        RP_UNROLL
        for (m = m0; m <= m1; m++) {
            at_vf v[16];
            rp_codes(v, row + pb * m, D, vb);
            RP_UNROLL
            for (r = 0; r < NR; r++) {
                const float *ws = wb + (r * KVC_ROWS_CHUNK + j) * 16;
                const at_vf wm = one ? (at_vf){0} + ws[gs[m]] : AT_LOOKUP16(*(const at_vf *)ws, gi[m]);
                RP_UNROLL
                for (k = 0; k < per; k++) {
                    const int f = m * per + k;
                    if (f >= f0 && f < f0 + fn) a[r * fn + f - f0] += wm * v[k];
                }
            }
        }
    }
    RP_UNROLL
    for (r = 0; r < NR; r++) {
        RP_UNROLL
        for (i = 0; i < fn; i++) acc[r * nv + f0 + i] += a[r * fn + i];
    }
}

/* The values of nc slots with the NR rows' weights w (KVC_ROWS_CHUNK
 * floats apart) into the running rows acc (row r's D / 16 vectors from
 * acc + r * D / 16, piece order) and the group sums mnv[r]: code rows from
 * vc, vcs bytes apart; ng value scales and mins contiguous per slot from vs
 * and vm, vss and vms apart. First per row and slot its weight times the
 * slot's value scales, into wb; then, in RP_PASSES passes over the slots,
 * a slot's codes, unpacked once a pass, times, for each row, where every
 * piece lies in one value group gs[m] (one: G a multiple of a piece's
 * channels), that product broadcast from wb (a load folded into the
 * multiply-add), otherwise dealt to each lane by its group (gi, one
 * permute per piece). Each pass's sums are kept in a local array: through
 * the caller's pointer they stayed in memory, and each slot stored and
 * reloaded them. */
RP_INLINE void rp_values(at_vf *acc, at_vf *mnv, const float *w, int nc, const uint8_t *vc, int64_t vcs,
                         const float *vs, int64_t vss, const float *vm, int64_t vms, int64_t ng, const at_vu *gi,
                         const int *gs, int D, int vb, int one, int NR)
{
    const __mmask16 gm = (__mmask16)((1u << ng) - 1u);
    const float vmid = kvc_pk_mid(vb);
    const int nv = D / 16, P = RP_PASSES(nv, NR), fn = nv / P;
    float wb[KVC_ROWS_MAX * KVC_ROWS_CHUNK * 16] __attribute__((aligned(64)));
    at_vf mv[KVC_ROWS_MAX];
    int j, r;
    RP_UNROLL
    for (r = 0; r < NR; r++) mv[r] = (at_vf){0};
    for (j = 0; j < nc; j++) {
        const at_vf sc = (at_vf)_mm512_maskz_loadu_ps(gm, vs + j * vss);
        const at_vf ce = (at_vf)_mm512_maskz_loadu_ps(gm, vm + j * vms) + sc * vmid;
        RP_UNROLL
        for (r = 0; r < NR; r++) {
            const float wr = w[r * KVC_ROWS_CHUNK + j];
            mv[r] += wr * ce;
            *(at_vf *)(wb + (r * KVC_ROWS_CHUNK + j) * 16) = wr * sc;
        }
    }
    /* the passes written out (P a constant), so that each call's f0 and fn
     * are constants: its loops unroll and its row vectors stay registers
     * without relying on GCC to unroll a loop over the passes first */
    rp_values_pass(acc, wb, nc, vc, vcs, gi, gs, D, vb, one, NR, 0, fn);
    if (P > 1) rp_values_pass(acc, wb, nc, vc, vcs, gi, gs, D, vb, one, NR, fn, fn);
    if (P > 2) {
        rp_values_pass(acc, wb, nc, vc, vcs, gi, gs, D, vb, one, NR, 2 * fn, fn);
        rp_values_pass(acc, wb, nc, vc, vcs, gi, gs, D, vb, one, NR, 3 * fn, fn);
    }
    RP_UNROLL
    for (r = 0; r < NR; r++) mnv[r] += mv[r];
}

/* The span at constant D, key bits kb, value bits vb and NR query rows. */
RP_INLINE void rp_span(const struct kvc_packed_span *s, const int D, const int kb, const int vb, const int NR)
{
    const struct kvc_packed_head *h = &s->h;
    const int vcw = RP_CW(D, vb), vper = RP_PER(D, vb), nv = D / 16;
    const __mmask16 gm = (__mmask16)((1u << s->ng) - 1u);
    const int one = s->G % vcw == 0;
    struct kvc_softmax_state st[KVC_ROWS_MAX];
    at_vf qv[KVC_ROWS_MAX][16], acc[KVC_ROWS_MAX * 16], mnv[KVC_ROWS_MAX];
    at_vu gi[16];
    int gs[16];
    float qs[KVC_ROWS_MAX][256] __attribute__((aligned(64)));
    float tmp[256] __attribute__((aligned(64))), bias[KVC_ROWS_MAX];
    /* strided inputs, staged contiguous: key scales and mins of a group,
     * code rows of a block or chunk, value scales and mins of a chunk */
    float ksb[256] __attribute__((aligned(64))), kmb[256] __attribute__((aligned(64)));
    float sb[KVC_ROWS_CHUNK * 16], mb[KVC_ROWS_CHUNK * 16];
    uint8_t stage[KVC_ROWS_CHUNK * 256];
    int64_t c0, have = -1, c;
    int i, m, r;

    memset(qs, 0, sizeof qs); /* set by the first block's token group; GCC cannot tell */
    memset(bias, 0, sizeof bias);
    RP_UNROLL
    for (r = 0; r < NR; r++) {
        st[r].m = s->pm[r];
        st[r].s = s->ps[r];
        /* the running row into the piece order of the value codes */
        for (c = 0; c < D; c++) tmp[rp_pos(c, D, vb)] = s->acc[r * s->Dp + c];
        RP_UNROLL
        for (i = 0; i < nv; i++) {
            memcpy(&qv[r][i], s->q + r * s->Dp + 16 * i, sizeof qv[r][i]);
            acc[r * nv + i] = *(const at_vf *)(tmp + 16 * i);
        }
        mnv[r] = (at_vf)_mm512_maskz_loadu_ps(gm, s->mn + r * s->ng);
    }
    /* lane i of piece m is channel m * vcw + vper * i (+ k): its value group */
    for (m = 0; m < RP_NP(D, vb); m++) {
        gs[m] = (int)(m * vcw / s->G);
        for (i = 0; i < 16; i++) gi[m][i] = (uint32_t)((m * vcw + vper * i) / s->G);
    }

    for (c0 = 0; c0 < s->n; c0 += KVC_ROWS_CHUNK) {
        const int nc = (int)(s->n - c0 < KVC_ROWS_CHUNK ? s->n - c0 : KVC_ROWS_CHUNK);
        at_vf x[KVC_ROWS_MAX][KVC_ROWS_CHUNK / 16];
        float w[KVC_ROWS_MAX * KVC_ROWS_CHUNK] __attribute__((aligned(64)));
        int b, j;
        for (b = 0; b < nc / 16; b++) {
            const int64_t js = s->j0 + c0 + 16 * b, t = js / s->G;
            const uint8_t *kr = h->kc + js * h->kcs;
            int64_t krs = h->kcs;
            at_vf lg[KVC_ROWS_MAX], lc = {0};
            if (t != have) {
                const float *ks = h->ks + t * h->kss, *km = h->km + t * h->kms;
                if (h->ksd != 1 || h->kmd != 1) {
                    rp_stage_floats(ksb, ks, h->ksd, D);
                    rp_stage_floats(kmb, km, h->kmd, D);
                    ks = ksb, km = kmb;
                }
                RP_UNROLL
                for (r = 0; r < NR; r++) rp_key_group(qs[r], &bias[r], s->scaling, ks, km, qv[r], D, kb);
                have = t;
            }
            if (h->kcd != 1) {
                rp_stage_rows(stage, kr, h->kcs, h->kcd, 16, D * kb / 8);
                kr = stage, krs = D * kb / 8;
            }
            rp_logits16(lg, kr, krs, &qs[0][0], D, kb, NR);
            if (h->c)
                for (j = 0; j < 16; j++) lc[j] = kvc_logf(h->c[(js + j) * h->cs]);
            RP_UNROLL
            for (r = 0; r < NR; r++) x[r][b] = lg[r] * s->scaling + bias[r] + lc;
        }
        RP_UNROLL
        for (r = 0; r < NR; r++) {
            at_vf top = (at_vf){0} - INFINITY, sum = {0};
            float alpha;
            for (b = 0; b < nc / 16; b++) top = (at_vf)_mm512_max_ps((__m512)top, (__m512)x[r][b]);
            alpha = kvc_softmax_rescale(&st[r], _mm512_reduce_max_ps((__m512)top));
            for (b = 0; b < nc / 16; b++) {
                at_vf e = x[r][b] - st[r].m;
                at_exp16w(&e);
                sum += e;
                *(at_vf *)(w + r * KVC_ROWS_CHUNK + 16 * b) = e;
            }
            st[r].s += _mm512_reduce_add_ps((__m512)sum);
            if (alpha != 1.0f) {
                RP_UNROLL
                for (i = 0; i < nv; i++) acc[r * nv + i] *= alpha;
                mnv[r] *= alpha;
            }
        }
        {
            const int64_t j0 = s->j0 + c0;
            const uint8_t *vr = h->vc + j0 * h->vcs;
            const float *vs = h->vs + j0 * h->vss, *vm = h->vm + j0 * h->vms;
            int64_t vrs = h->vcs, vss = h->vss, vms = h->vms;
            if (h->vcd != 1) {
                rp_stage_rows(stage, vr, h->vcs, h->vcd, nc, D * vb / 8);
                vr = stage, vrs = D * vb / 8;
            }
            if (h->vsd != 1 || h->vmd != 1) {
                for (j = 0; j < nc; j++) {
                    rp_stage_floats(sb + 16 * j, vs + j * h->vss, h->vsd, s->ng);
                    rp_stage_floats(mb + 16 * j, vm + j * h->vms, h->vmd, s->ng);
                }
                vs = sb, vm = mb, vss = vms = 16;
            }
            if (one) rp_values(acc, mnv, w, nc, vr, vrs, vs, vss, vm, vms, s->ng, gi, gs, D, vb, 1, NR);
            else rp_values(acc, mnv, w, nc, vr, vrs, vs, vss, vm, vms, s->ng, gi, gs, D, vb, 0, NR);
        }
    }

    RP_UNROLL
    for (r = 0; r < NR; r++) {
        RP_UNROLL
        for (i = 0; i < nv; i++) *(at_vf *)(tmp + 16 * i) = acc[r * nv + i];
        for (c = 0; c < D; c++) s->acc[r * s->Dp + c] = tmp[rp_pos(c, D, vb)];
        _mm512_mask_storeu_ps(s->mn + r * s->ng, gm, (__m512)mnv[r]);
        s->pm[r] = st[r].m;
        s->ps[r] = st[r].s;
    }
}

#define RP_BITS(D_, kb_, NR_)                                                                          \
    do {                                                                                               \
        switch (s->vbits) {                                                                            \
        case 2: rp_span(s, D_, kb_, 2, NR_); break;                                                    \
        case 4: rp_span(s, D_, kb_, 4, NR_); break;                                                    \
        default: rp_span(s, D_, kb_, 8, NR_); break;                                                   \
        }                                                                                              \
    } while (0)
#define RP_DIM(D_, NR_)                                                                                \
    do {                                                                                               \
        switch (s->bits) {                                                                             \
        case 2: RP_BITS(D_, 2, NR_); break;                                                            \
        case 4: RP_BITS(D_, 4, NR_); break;                                                            \
        default: RP_BITS(D_, 8, NR_); break;                                                           \
        }                                                                                              \
    } while (0)

/* kvc_rows_span_d<D_>: the span at head size D_, by row count and widths. */
#define KVC_ROWS_SPAN_DEFINE(D_)                                                                       \
    KVC_WIDE_TARGET void kvc_rows_span_d##D_(const struct kvc_packed_span *s)                          \
    {                                                                                                  \
        switch (s->R) {                                                                                \
        case 1: RP_DIM(D_, 1); break;                                                                  \
        case 2: RP_DIM(D_, 2); break;                                                                  \
        case 3: RP_DIM(D_, 3); break;                                                                  \
        default: RP_DIM(D_, 4); break;                                                                 \
        }                                                                                              \
    }
#endif /* KVC_ROWS */

#endif /* KVC_ATTENTION_ROWS_SPAN_H */
