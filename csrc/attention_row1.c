/*
 * attention_row1.c - the packed attention's one-row path (attention_row1.h).
 *
 * The piece order. A code row is read in pieces (R1_PB below: 64 bytes,
 * lane i = dword i, or 16 bytes zero-extended, lane i = byte i). A lane
 * holds per codes of consecutive channels, channel per * i + k of the piece
 * in bits [k * bits, (k + 1) * bits) (docs/packed.md), so shifting the
 * piece right by k * bits and looking the low bits up in a 16-entry table
 * of centred values (kvc_pk_centred; the 2-bit table repeats its four, so
 * the next code's bits above a lane's own do not matter) gives the codes of
 * channels k, k + per, k + 2 per, ... of the piece: per vectors per piece.
 * 8-bit codes are masked and converted, not looked up. The query times the
 * key scales is dealt into that order once per token group (r1_deal), and
 * the output row is kept in it across the span and put back in channel
 * order at its end, so no code is moved between lanes.
 *
 * Per chunk of KVC_ROW1_CHUNK slots:
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
 *           centres into one vector of group sums.
 * No software prefetches (docs/design.md, "The one-row path": streamed,
 * the tile loops' prefetches made this path 1.38-1.46x slower).
 */
#include <math.h>
#include <string.h>

#include "attention_packed_math.h"
#include "attention_row1.h"
#include "attention_tile.h"
#include "kvc_math.h"

int kvc_row1_usable(int bits, int vbits, int64_t D, int64_t G)
{
#ifdef KVC_ROW1
    if ((bits != 2 && bits != 4 && bits != 8) || (vbits != 2 && vbits != 4 && vbits != 8)) return 0;
    if ((D != 64 && D != 128 && D != 256) || (D * bits) % 128 || (D * vbits) % 128 || G < 16 || G % 16) return 0;
    return kvc_row1_allowed() && kvc_wide_active();
#else
    (void)bits, (void)vbits, (void)D, (void)G;
    return 0;
#endif
}

#ifdef KVC_ROW1
#include <immintrin.h>

#define R1_INLINE static inline __attribute__((always_inline)) KVC_WIDE_TARGET
/* A code row is read in pieces of 64 bytes where it is a whole number of
 * them, each one load, lane i = dword i; else of 16 bytes, each one
 * zero-extending load (vpmovzxbd), lane i = byte i. 64-byte pieces take no
 * shuffle to load: 512-bit shuffles issue one per cycle on the AMD EPYC
 * (Zen 5) this was tuned on, and they bound the loops. */
#define R1_PB(D, bits) ((D) * (bits) % 512 == 0 ? 64 : 16)
#define R1_PER(D, bits) (R1_PB(D, bits) / 16 * 8 / (bits)) /* codes per lane */
#define R1_CW(D, bits) (16 * R1_PER(D, bits))              /* channels per piece */
#define R1_NP(D, bits) ((D) * (bits) / 8 / R1_PB(D, bits))  /* pieces per row */
/* Loops over a row's vectors unrolled whole, so that the row's arrays
 * are registers: indexed in a loop, GCC keeps them in memory and the value
 * loop stored the running row at every slot. */
#define R1_UNROLL _Pragma("GCC unroll 16")

/* Position of channel c in the piece order of (D, bits): lane i of vector
 * k of piece m holds channel m * cw + per * i + k. */
static int64_t r1_pos(int64_t c, int64_t D, int bits)
{
    const int per = R1_PER(D, bits), cw = R1_CW(D, bits);
    return c / cw * cw + c % per * 16 + c % cw / per;
}

/* The centred codes of a piece: v[k] lane i = channel per * i + k of it. */
R1_INLINE void r1_codes(at_vf *v, const uint8_t *src, int D, int bits)
{
    const at_vu lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    /* vpmovzxbd by its intrinsic: GCC 12 builds __builtin_convertvector of
     * 16 bytes to dwords a byte at a time (twice slower than the tiles) */
    const at_vu z = R1_PB(D, bits) == 64 ? (at_vu)_mm512_loadu_si512(src)
                                          : (at_vu)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)src));
    const int per = R1_PER(D, bits); /* a plain bound: GCC drops the unroll pragma of a ?: one */
    int k;
    if (bits == 8) {
        R1_UNROLL
        for (k = 0; k < per; k++) {
            const at_vu c = per == 1 ? z : (z >> (uint32_t)(8 * k)) & 0xffu;
            v[k] = __builtin_convertvector((at_vi)c, at_vf) - kvc_pk_mid(8);
        }
        return;
    }
    {
        const at_vf t = __builtin_convertvector((at_vi)(lane & kvc_pk_mask(bits)), at_vf) - kvc_pk_mid(bits);
        R1_UNROLL
        for (k = 0; k < per; k++) v[k] = AT_LOOKUP16(t, z >> (uint32_t)(k * bits));
    }
}

#define R1_EVEN(a, b) __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
#define R1_ODD(a, b) __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31)

/* The per vectors of one piece's channels in channel order (x, in place)
 * into the piece order: vector k, lane i = channel per * i + k. Each stage
 * takes the even lanes of consecutive pairs into the first half and the
 * odd ones into the second; log2(per) stages transpose the 16 x per
 * matrix (per * log2(per) two-source permutes, where gathering the key
 * scales cost 4-5 cycles a slot). */
R1_INLINE void r1_deal(at_vf *x, int per)
{
    at_vf y[16];
    int st, j;
    for (st = 1; st < per; st *= 2) {
        R1_UNROLL
        for (j = 0; j < per / 2; j++) {
            y[j] = R1_EVEN(x[2 * j], x[2 * j + 1]);
            y[per / 2 + j] = R1_ODD(x[2 * j], x[2 * j + 1]);
        }
        R1_UNROLL
        for (j = 0; j < per; j++) x[j] = y[j];
    }
}

/* A token group: qs = q x its key scales (ks, D contiguous) in the piece
 * order of kb, and the bias scaling x q . its key centres (min + scale x
 * mid, mins km), in channel order. */
R1_INLINE void r1_key_group(float *qs, float *bias, float scaling, const float *ks, const float *km,
                            const at_vf *qv, int D, int kb)
{
    const float mid = kvc_pk_mid(kb);
    const int per = R1_PER(D, kb);
    at_vf x[16], b = {0};
    int i;
    R1_UNROLL
    for (i = 0; i < D / 16; i++) {
        at_vf sc, mn;
        memcpy(&sc, ks + 16 * i, sizeof sc);
        memcpy(&mn, km + 16 * i, sizeof mn);
        b += qv[i] * (mn + sc * mid);
        x[i] = qv[i] * sc;
    }
    *bias = scaling * _mm512_reduce_add_ps((__m512)b);
    R1_UNROLL
    for (i = 0; i < D / 16; i += per) r1_deal(x + i, per);
    R1_UNROLL
    for (i = 0; i < D / 16; i++) *(at_vf *)(qs + 16 * i) = x[i];
}

/* rows code rows of rb bytes from src (rows cs, bytes cd apart) into dst,
 * contiguous: strided inputs are read by the same loops as contiguous ones,
 * so they give the same bits. */
static void r1_stage_rows(uint8_t *dst, const uint8_t *src, int64_t cs, int64_t cd, int64_t rows, int64_t rb)
{
    int64_t r, b;
    for (r = 0; r < rows; r++)
        for (b = 0; b < rb; b++) dst[r * rb + b] = src[r * cs + b * cd];
}

/* n floats `stride` apart -> dst, contiguous. */
static void r1_stage_floats(float *dst, const float *src, int64_t stride, int64_t n)
{
    int64_t i;
    for (i = 0; i < n; i++) dst[i] = src[i * stride];
}

/* out lane j = q . centred key codes of slot j of the 16 from row kc
 * (rows kcs bytes apart), qs in the piece order; each slot's products
 * summed in 16 lanes, then across the slots by kvc_lanes_sum16's tree.
 * (Piece by piece across the 16 slots, 16 sums in flight, measured 0.93-
 * 0.98x of this, benchmarks/ab_packed.py.) */
R1_INLINE void r1_logits16(at_vf *out, const uint8_t *kc, int64_t kcs, const float *qs, int D, int kb)
{
    const int np = R1_NP(D, kb), per = R1_PER(D, kb), pb = R1_PB(D, kb);
    at_vf a[16];
    int j, m, k;
    for (j = 0; j < 16; j++) {
        const uint8_t *row = kc + j * kcs;
        at_vf sum = {0};
        R1_UNROLL
        for (m = 0; m < np; m++) {
            at_vf v[16];
            r1_codes(v, row + pb * m, D, kb);
            R1_UNROLL
            for (k = 0; k < per; k++) sum += *(const at_vf *)(qs + 16 * (m * per + k)) * v[k];
        }
        a[j] = sum;
    }
    kvc_lanes_sum16(a, out);
}

/* The values of nc slots with weights w into the running row acc (piece
 * order) and the group sums *mnv: code rows from vc, vcs bytes apart; ng
 * value scales and mins contiguous per slot from vs and vm, vss and vms
 * apart. First per slot its weight times its value scales, into wb; then
 * the codes, times, where every piece lies in one value group gs[m] (one:
 * G a multiple of a piece's channels), that product broadcast from wb (a
 * load folded into the multiply-add), otherwise dealt to each lane by its
 * group (gi, one permute per piece). The running row is copied into a
 * local array for the loop: through the caller's pointer it stayed in
 * memory, and each slot stored and reloaded it. */
R1_INLINE void r1_values(at_vf *acc, at_vf *mnv, const float *w, int nc, const uint8_t *vc, int64_t vcs,
                         const float *vs, int64_t vss, const float *vm, int64_t vms, int64_t ng, const at_vu *gi,
                         const int *gs, int D, int vb, int one)
{
    const __mmask16 gm = (__mmask16)((1u << ng) - 1u);
    const float vmid = kvc_pk_mid(vb);
    const int np = R1_NP(D, vb), per = R1_PER(D, vb), pb = R1_PB(D, vb);
    float wb[KVC_ROW1_CHUNK * 16] __attribute__((aligned(64)));
    at_vf a[16], mv = *mnv;
    int i, j, m, k;
    R1_UNROLL
    for (i = 0; i < D / 16; i++) a[i] = acc[i];
    for (j = 0; j < nc; j++) {
        const at_vf sc = (at_vf)_mm512_maskz_loadu_ps(gm, vs + j * vss);
        const at_vf mn = (at_vf)_mm512_maskz_loadu_ps(gm, vm + j * vms);
        mv += w[j] * (mn + sc * vmid);
        *(at_vf *)(wb + 16 * j) = w[j] * sc;
    }
    for (j = 0; j < nc; j++) {
        const uint8_t *row = vc + j * vcs;
        const float *ws = wb + 16 * j;
        R1_UNROLL
        for (m = 0; m < np; m++) {
            const at_vf wm = one ? (at_vf){0} + ws[gs[m]] : AT_LOOKUP16(*(const at_vf *)ws, gi[m]);
            at_vf v[16];
            r1_codes(v, row + pb * m, D, vb);
            R1_UNROLL
            for (k = 0; k < per; k++) a[m * per + k] += wm * v[k];
        }
    }
    R1_UNROLL
    for (i = 0; i < D / 16; i++) acc[i] = a[i];
    *mnv = mv;
}

/* The span at constant D, key bits kb and value bits vb. */
R1_INLINE void r1_span(const struct kvc_packed_span *s, const int D, const int kb, const int vb)
{
    const struct kvc_packed_head *h = &s->h;
    const int vcw = R1_CW(D, vb), vper = R1_PER(D, vb);
    const __mmask16 gm = (__mmask16)((1u << s->ng) - 1u);
    const int one = s->G % vcw == 0;
    struct kvc_softmax_state st;
    at_vf qv[16], acc[16], mnv;
    at_vu gi[16];
    int gs[16];
    float qs[256] __attribute__((aligned(64)));
    float tmp[256] __attribute__((aligned(64))), bias = 0.0f;
    /* strided inputs, staged contiguous: key scales and mins of a group,
     * code rows of a block or chunk, value scales and mins of a chunk */
    float ksb[256] __attribute__((aligned(64))), kmb[256] __attribute__((aligned(64)));
    float sb[KVC_ROW1_CHUNK * 16], mb[KVC_ROW1_CHUNK * 16];
    uint8_t stage[KVC_ROW1_CHUNK * 256];
    int64_t c0, have = -1, c;
    int i, m;

    st.m = s->pm[0];
    st.s = s->ps[0];
    memset(qs, 0, sizeof qs); /* set by the first block's token group; GCC cannot tell */
    /* element by element into registers, not by memcpy: an array whose
     * address is taken stays in memory */
    for (c = 0; c < D; c++) tmp[r1_pos(c, D, vb)] = s->acc[c];
    R1_UNROLL
    for (i = 0; i < D / 16; i++) {
        memcpy(&qv[i], s->q + 16 * i, sizeof qv[i]);
        acc[i] = *(const at_vf *)(tmp + 16 * i);
    }
    mnv = (at_vf)_mm512_maskz_loadu_ps(gm, s->mn);
    /* lane i of piece m is channel m * vcw + vper * i (+ k): its value group */
    for (m = 0; m < R1_NP(D, vb); m++) {
        gs[m] = (int)(m * vcw / s->G);
        for (i = 0; i < 16; i++) gi[m][i] = (uint32_t)((m * vcw + vper * i) / s->G);
    }

    for (c0 = 0; c0 < s->n; c0 += KVC_ROW1_CHUNK) {
        const int nc = (int)(s->n - c0 < KVC_ROW1_CHUNK ? s->n - c0 : KVC_ROW1_CHUNK);
        at_vf x[KVC_ROW1_CHUNK / 16], top, sum = {0};
        float w[KVC_ROW1_CHUNK] __attribute__((aligned(64))), alpha;
        int b, j;
        for (b = 0; b < nc / 16; b++) {
            const int64_t js = s->j0 + c0 + 16 * b, t = js / s->G;
            const uint8_t *kr = h->kc + js * h->kcs;
            int64_t krs = h->kcs;
            if (t != have) {
                const float *ks = h->ks + t * h->kss, *km = h->km + t * h->kms;
                if (h->ksd != 1 || h->kmd != 1) {
                    r1_stage_floats(ksb, ks, h->ksd, D);
                    r1_stage_floats(kmb, km, h->kmd, D);
                    ks = ksb, km = kmb;
                }
                r1_key_group(qs, &bias, s->scaling, ks, km, qv, D, kb);
                have = t;
            }
            if (h->kcd != 1) {
                r1_stage_rows(stage, kr, h->kcs, h->kcd, 16, D * kb / 8);
                kr = stage, krs = D * kb / 8;
            }
            r1_logits16(&x[b], kr, krs, qs, D, kb);
            x[b] = x[b] * s->scaling + bias;
            if (h->c) {
                at_vf lc;
                for (j = 0; j < 16; j++) lc[j] = kvc_logf(h->c[(js + j) * h->cs]);
                x[b] += lc;
            }
        }
        top = (at_vf){0} - INFINITY;
        for (b = 0; b < nc / 16; b++) top = (at_vf)_mm512_max_ps((__m512)top, (__m512)x[b]);
        alpha = kvc_softmax_rescale(&st, _mm512_reduce_max_ps((__m512)top));
        for (b = 0; b < nc / 16; b++) {
            x[b] -= st.m;
            at_exp16w(&x[b]);
            sum += x[b];
            *(at_vf *)(w + 16 * b) = x[b];
        }
        st.s += _mm512_reduce_add_ps((__m512)sum);
        if (alpha != 1.0f) {
            R1_UNROLL
            for (i = 0; i < D / 16; i++) acc[i] *= alpha;
            mnv *= alpha;
        }
        {
            const int64_t j0 = s->j0 + c0;
            const uint8_t *vr = h->vc + j0 * h->vcs;
            const float *vs = h->vs + j0 * h->vss, *vm = h->vm + j0 * h->vms;
            int64_t vrs = h->vcs, vss = h->vss, vms = h->vms;
            if (h->vcd != 1) {
                r1_stage_rows(stage, vr, h->vcs, h->vcd, nc, D * vb / 8);
                vr = stage, vrs = D * vb / 8;
            }
            if (h->vsd != 1 || h->vmd != 1) {
                for (j = 0; j < nc; j++) {
                    r1_stage_floats(sb + 16 * j, vs + j * h->vss, h->vsd, s->ng);
                    r1_stage_floats(mb + 16 * j, vm + j * h->vms, h->vmd, s->ng);
                }
                vs = sb, vm = mb, vss = vms = 16;
            }
            if (one) r1_values(acc, &mnv, w, nc, vr, vrs, vs, vss, vm, vms, s->ng, gi, gs, D, vb, 1);
            else r1_values(acc, &mnv, w, nc, vr, vrs, vs, vss, vm, vms, s->ng, gi, gs, D, vb, 0);
        }
    }

    R1_UNROLL
    for (i = 0; i < D / 16; i++) *(at_vf *)(tmp + 16 * i) = acc[i];
    for (c = 0; c < D; c++) s->acc[c] = tmp[r1_pos(c, D, vb)];
    _mm512_mask_storeu_ps(s->mn, gm, (__m512)mnv);
    s->pm[0] = st.m;
    s->ps[0] = st.s;
}

#define R1_BITS(D_, kb_)                                                                               \
    do {                                                                                               \
        switch (s->vbits) {                                                                            \
        case 2: r1_span(s, D_, kb_, 2); break;                                                         \
        case 4: r1_span(s, D_, kb_, 4); break;                                                         \
        default: r1_span(s, D_, kb_, 8); break;                                                        \
        }                                                                                              \
    } while (0)
#define R1_DIM(D_)                                                                                     \
    do {                                                                                               \
        switch (s->bits) {                                                                             \
        case 2: R1_BITS(D_, 2); break;                                                                 \
        case 4: R1_BITS(D_, 4); break;                                                                 \
        default: R1_BITS(D_, 8); break;                                                                \
        }                                                                                              \
    } while (0)

KVC_WIDE_TARGET void kvc_row1_packed_span(const struct kvc_packed_span *s)
{
    /* the caller checked kvc_row1_usable: D, widths and G are among these */
    if (s->D == 64) R1_DIM(64);
    else if (s->D == 128) R1_DIM(128);
    else R1_DIM(256);
}
#else
void kvc_row1_packed_span(const struct kvc_packed_span *s)
{
    (void)s;
}
#endif
