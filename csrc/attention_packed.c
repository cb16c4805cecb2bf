/*
 * attention_packed.c - decode/chunk attention over a KIVI-packed layer plus
 * a full-precision residual window (CPU; docs/packed.md).
 *
 * Work units of attention_units.h, as in attention.c: one kv head (b, hk),
 * one tile of up to KVC_AT_QT queries with all g query heads of the GQA
 * group (each packed row is read and unpacked once for the group), one
 * block of slots of the head's
 * logical sequence (packed slots, then residual slots). Short chunks
 * (decode) cut the sequence into blocks of u.sb slots at fixed positions
 * (split-K; the size follows from the shape, kvc_at_block_slots), combined
 * by log-sum-exp in block order: bit-identical for any thread count.
 *
 * No dequantized row is ever formed. A tile of AT_TK slots has its codes
 * unpacked to fp32 (shifts and masks, no tables), centred on the middle of
 * their range (kvc_pk_centred: min + scale * code = centre + scale * (code
 * - mid)): in registers, a block at a time, where a tile's keys lie in one
 * token group and every AT_TK value channels in one value group (contiguous
 * rows, D a multiple of AT_TK); otherwise into a tile buffer. Then
 *   keys:   per (query row, token group t) the row q * key_scales[t] and the
 *           bias scaling * q . centre_t are computed once, and the logit of
 *           slot j is scaling * (q * scale_t) . (code_j - mid) + bias_t;
 *   values: per (row, slot j, channel group u) the weight w_j scale_ju
 *           multiplies the centred codes of group u, and w_j centre_ju
 *           accumulates per channel group; those sums join the output rows
 *           once per unit.
 * With raw codes the two sums over value slots would cancel (every scale *
 * code is >= 0: fp32 errors 5x those of plain attention); centred keys
 * keep a logit's two terms small as well (measured errors below torch's
 * own, where raw key codes came close to twice it).
 */
#include <math.h>
#include <string.h>

#include "attention_amx.h"
#include "attention_packed.h"
#include "attention_packed_head.h"
#include "attention_packed_math.h"
#include "attention_rows.h"
#include "attention_tile.h"
#include "attention_units.h"
#include "kvc_math.h"

#ifdef AT_VEC
#define PA_VEC 1 /* the tile kernels can read packed value rows in place */
#else
#define PA_VEC 0
#endif

struct pa_geom {
    struct kvc_at_units u; /* first, for the callbacks of attention_units.h */
    int64_t r;         /* residual slots */
    int64_t G, Db, ng; /* group size, bytes of the wider packed row, value channel groups */
    int bits, vbits;   /* key and value code widths */
    int grouped;     /* G % AT_TK == 0: every vector of AT_TK channels lies in one value group */
    int64_t NS;      /* key token groups one tile can span: size of the ring of scaled queries */
    int amx;         /* the whole-tile stretches take the AMX path (attention_amx.h) */
    int rows;        /* ... or, with few query rows, the few-rows path (attention_rows.h) */
    size_t float_floats; /* floats of a thread's buffers */
    size_t thread_bytes;
};

/* Elements from the start of v to kv head (b, hk)'s first row: ragged, row
 * `row` of the shared buffer; uniform, [b, hk]. */
static int64_t pa_head_at(const struct kvc_view *v, int ragged, int64_t row, int64_t b, int64_t hk)
{
    return ragged ? row * v->strides[0] : b * v->strides[0] + hk * v->strides[1];
}

static void pa_head_get(const struct kvc_packed_attention_params *p, int64_t b, int64_t hk,
                        struct kvc_packed_head *h)
{
    const int64_t es = (int64_t)kvc_dtype_size((enum kvc_dtype)p->q.dtype);
    const struct kvc_view *kc = &p->key_codes, *vc = &p->value_codes;
    const struct kvc_view *km = &p->key_mins, *ks = &p->key_scales;
    const struct kvc_view *vm = &p->value_mins, *vs = &p->value_scales, *cn = &p->counts;
    const int ragged = p->layout == KVC_KV_RAGGED;
    const int sd = ragged ? 0 : 2; /* the slot (token group) dim; the channel dim follows */
    int64_t off = 0, t0 = 0;       /* ragged: first packed row, first key group row */
    if (ragged) {
        const int64_t i = b * p->num_kv_heads + hk;
        off = p->offsets[i * p->offsets_stride];
        t0 = off / p->group;
        h->n = p->lengths[i * p->lengths_stride];
        h->s0 = p->kv_start ? p->kv_start[b * p->kv_start_stride] : 0;
    } else {
        /* (the same read as the ragged branch's: hoisted out of the two,
         * GCC placed the unit so that it ran 7-8% slower, ab_packed.py) */
        h->n = kc->shape[2];
        h->s0 = p->kv_start ? p->kv_start[b * p->kv_start_stride] : 0;
    }
    h->rh0 = h->rh1 = 0;
    if (p->res_hidden) {
        const int64_t *rh = p->res_hidden + (b * p->num_kv_heads + hk) * p->res_hidden_stride;
        /* an empty hole is none: the rows' tiles stay where they are without one */
        if (rh[0] < rh[p->res_hidden_col]) h->rh0 = rh[0], h->rh1 = rh[p->res_hidden_col];
    }
    h->kcs = kc->strides[sd], h->kcd = kc->strides[sd + 1];
    h->vcs = vc->strides[sd], h->vcd = vc->strides[sd + 1];
    h->kms = km->strides[sd], h->kmd = km->strides[sd + 1];
    h->kss = ks->strides[sd], h->ksd = ks->strides[sd + 1];
    h->vms = vm->strides[sd], h->vmd = vm->strides[sd + 1];
    h->vss = vs->strides[sd], h->vsd = vs->strides[sd + 1];
    h->cs = cn->strides[sd];
    h->kc = (const uint8_t *)kc->data + pa_head_at(kc, ragged, off, b, hk);
    h->vc = (const uint8_t *)vc->data + pa_head_at(vc, ragged, off, b, hk);
    h->km = (const float *)km->data + pa_head_at(km, ragged, t0, b, hk);
    h->ks = (const float *)ks->data + pa_head_at(ks, ragged, t0, b, hk);
    h->vm = (const float *)vm->data + pa_head_at(vm, ragged, off, b, hk);
    h->vs = (const float *)vs->data + pa_head_at(vs, ragged, off, b, hk);
    h->c = cn->data ? (const float *)cn->data + pa_head_at(cn, ragged, off, b, hk) : NULL;
    h->rks = p->res_k.strides[2], h->rkd = p->res_k.strides[3];
    h->rvs = p->res_v.strides[2], h->rvd = p->res_v.strides[3];
    h->rk = (const char *)p->res_k.data + (b * p->res_k.strides[0] + hk * p->res_k.strides[1]) * es;
    h->rv = (const char *)p->res_v.data + (b * p->res_v.strides[0] + hk * p->res_v.strides[1]) * es;
    h->rc = NULL, h->rcs = 0;
    if (p->res_counts.data != NULL) {
        const struct kvc_view *rc = &p->res_counts;
        h->rc = (const float *)rc->data + b * rc->strides[0] + hk * rc->strides[1];
        h->rcs = rc->strides[2];
    }
}

/* Last logical slot query qi sees: the queries are the last q residual
 * slots, or with no residual (r = 0) come after every packed slot. */
static inline int64_t pa_last(const struct pa_geom *g, const struct kvc_packed_head *h, int64_t qi)
{
    return g->r ? h->n + g->r - g->u.q + qi : h->n - 1;
}

/* Queries [i0, i0 + *nq) of tile t; returns the end (exclusive) of the
 * logical slots the tile sees (pa_last of its last query, plus one). */
static int64_t pa_tile(const struct pa_geom *g, const struct kvc_packed_head *h, int64_t t, int64_t *i0,
                       int64_t *nq)
{
    kvc_at_tile_rows(&g->u, t, i0, nq);
    return pa_last(g, h, *i0 + *nq - 1) + 1;
}

/* Split blocks are the u.sb-aligned stretches of the logical sequence that
 * meet [s0, end), so tiles start at multiples of AT_TK after the first. */
static int64_t pa_blocks(const struct pa_geom *g, const struct kvc_packed_head *h, int64_t t)
{
    int64_t i0, nq, end = pa_tile(g, h, t, &i0, &nq);
    if (end <= h->s0) return 0;
    return g->u.split ? (end - 1) / g->u.sb - h->s0 / g->u.sb + 1 : 1;
}

static int64_t pa_head_blocks(const void *op, const struct kvc_at_units *u, int64_t b, int64_t hk, int64_t t)
{
    struct kvc_packed_head h;
    pa_head_get((const struct kvc_packed_attention_params *)op, b, hk, &h);
    return pa_blocks((const struct pa_geom *)u, &h, t);
}

static int64_t pa_head_span(const void *op, const struct kvc_at_units *u, int64_t b, int64_t hk)
{
    struct kvc_packed_head h;
    int64_t i0, nq, end;
    pa_head_get((const struct kvc_packed_attention_params *)op, b, hk, &h);
    end = pa_tile((const struct pa_geom *)u, &h, u->ntiles - 1, &i0, &nq);
    return end > h.s0 ? end - h.s0 : 0;
}

/* Fills g; with prefix != NULL also prefix[pair] = first unit of the pair
 * (prefix[P] = U). */
static void pa_geometry(const struct kvc_packed_attention_params *p, struct pa_geom *g,
                        int64_t *prefix)
{
    kvc_at_units_init(&g->u, &p->q, p->num_kv_heads);
    g->r = p->res_k.shape[2];
    g->G = p->group > 0 ? p->group : 1;
    g->bits = p->bits;
    g->vbits = p->value_bits ? p->value_bits : p->bits;
    g->Db = kvc_pk_row_bytes(g->u.D, g->bits > g->vbits ? g->bits : g->vbits);
    g->ng = kvc_pk_groups(g->u.D > 0 ? g->u.D : 1, g->G);
    g->grouped = g->G % AT_TK == 0;
    /* AT_TK consecutive slots meet at most ceil((AT_TK - 1) / G) + 1 groups */
    g->NS = kvc_pk_groups(AT_TK - 1, g->G) + 1;
    kvc_at_units_block_size(&g->u, pa_head_span, p);
    kvc_at_units_count(&g->u, pa_head_blocks, p, prefix);
    /* query rows and their scaled copies per ring slot; unpacked K and V
     * tiles, a zero row, one key scale and one key centre row (all padded to
     * Dp, pads zero); per ring slot the key biases; logits and factors;
     * value scales and centres of a tile transposed; per-(row, group) weights
     * (grouped) or expanded value scales (otherwise); the centre sums */
    g->float_floats = (size_t)((g->u.R + g->NS * g->u.R + 2 * AT_TK + 3) * g->u.Dp + g->NS * g->u.R +
                               g->u.R * (AT_TK + 1) + 2 * g->ng * AT_TK +
                               (g->grouped ? g->u.R * g->ng * AT_TK : AT_TK * g->u.Dp) + g->u.R * g->ng);
    g->amx = kvc_amx_usable(g->bits, g->vbits, g->u.D, g->G);
    g->rows = !g->amx && kvc_rows_usable(g->bits, g->vbits, g->u.D, g->G);
    g->thread_bytes = kvc_align_up(g->float_floats * sizeof(float)) +
                      kvc_align_up((size_t)g->u.R * sizeof(int64_t)) +
                      kvc_align_up((size_t)g->u.Dp * sizeof(int32_t)) +
                      kvc_align_up((size_t)kvc_at_round_up(g->Db + AT_TK, AT_TK)) +
                      (g->amx ? kvc_align_up(kvc_amx_scratch_bytes(g->u.D)) : 0);
}

size_t kvc_packed_attention_scratch_bytes(const struct kvc_packed_attention_params *p)
{
    struct pa_geom g;
    pa_geometry(p, &g, NULL);
    return kvc_at_scratch_bytes(&g.u, g.thread_bytes, p->num_threads);
}

/* A packed row of D codes (bytes `stride` apart) -> Dp centred fp32 codes
 * in channel order, zeros past D. tmp holds a contiguous copy when
 * stride != 1. */
KVC_INLINE void pa_unpack_row(float *dst, const uint8_t *src, int64_t stride, int64_t D,
                              int64_t Db, int bits, uint8_t *tmp)
{
    int64_t c = 0, i;
    if (stride != 1) {
        for (i = 0; i < Db; i++) tmp[i] = src[i * stride];
        src = tmp;
    }
    /* a block of AT_TK codes takes 2 * bits bytes */
    for (; c + AT_TK <= D; c += AT_TK, src += 2 * bits) at_unpack16(dst + c, src, bits);
    if (c < D) {
        /* the last bytes of the row, zero-padded, so nothing past it is read */
        uint8_t last[AT_TK];
        memset(last, 0, sizeof last);
        memcpy(last, src, (size_t)(Db - c / AT_TK * 2 * bits));
        at_unpack16(dst + c, last, bits);
        for (i = D - c; i < AT_TK; i++) dst[c + i] = 0.0f;
    }
}

/* Dispatch on bits so that each unpack runs with a constant. */
KVC_INLINE void pa_unpack_bits(float *dst, const uint8_t *src, int64_t stride, int64_t D, int bits,
                               uint8_t *tmp)
{
    switch (bits) {
    case 2: pa_unpack_row(dst, src, stride, D, kvc_pk_row_bytes(D, 2), 2, tmp); break;
    case 4: pa_unpack_row(dst, src, stride, D, kvc_pk_row_bytes(D, 4), 4, tmp); break;
    default: pa_unpack_row(dst, src, stride, D, kvc_pk_row_bytes(D, 8), 8, tmp); break;
    }
}

/* pa_unpack_bits with the common head dims as constants too: the block
 * loop unrolls. */
KVC_INLINE void pa_unpack(const struct pa_geom *g, int bits, float *dst, const uint8_t *src, int64_t stride,
                          uint8_t *tmp)
{
    if (g->u.D == 64) pa_unpack_bits(dst, src, stride, 64, bits, tmp);
    else if (g->u.D == 128) pa_unpack_bits(dst, src, stride, 128, bits, tmp);
    else pa_unpack_bits(dst, src, stride, g->u.D, bits, tmp);
}

/* Zeros past D in a row of Dp floats. */
KVC_INLINE void pa_zero_pads(const struct pa_geom *g, float *x)
{
    int64_t c;
    for (c = g->u.D; c < g->u.Dp; c++) x[c] = 0.0f;
}

/* A query or residual row (q's dtype, elements `stride` apart) -> fp32,
 * zeros past D. */
KVC_INLINE void pa_row_load(const struct pa_geom *g, float *dst, const char *src, int32_t dtype,
                            int64_t stride)
{
    at_row_f32(dst, src, dtype, g->u.D, stride);
    pa_zero_pads(g, dst);
}

/* sum_l a[l] b[l] over n (a multiple of AT_TK), kvc_lanes_sum's order. */
KVC_INLINE float pa_dot(const float *a, const float *b, int64_t n)
{
    float acc[AT_TK];
    int64_t i;
    int l;
    for (l = 0; l < AT_TK; l++) acc[l] = 0.0f;
    for (i = 0; i < n; i += AT_TK)
        for (l = 0; l < AT_TK; l++) acc[l] += a[i + l] * b[i + l];
    return kvc_lanes_sum(acc);
}

/* Logits of one query row against a tile whose slots use different token
 * groups: slot j's scaled query row is qp[j]. As at_logits otherwise. */
KVC_INLINE void pa_logits_multi(const float *const *qp, const void *const *kp, const float *lc,
                                int64_t Dp, float scaling, float *x)
{
#ifdef AT_VEC
    at_v8 s[AT_TK];
    int64_t c;
    int j;
    /* one slot at a time, in halves (as at_logits_rows) */
    for (j = 0; j < AT_TK; j++) {
        at_v8 lo = (at_v8){0}, hi = (at_v8){0};
        for (c = 0; c < Dp; c += AT_TK) {
            at_v8 q0, q1, k0, k1;
            memcpy(&q0, qp[j] + c, sizeof q0);
            memcpy(&q1, qp[j] + c + AT_TK / 2, sizeof q1);
            at_row_block(&k0, &k1, kp[j], c, AT_ROWS_F32);
            lo += q0 * k0;
            hi += q1 * k1;
        }
        s[j] = lo + hi;
    }
    at_finish8(s, lc, scaling, x);
#else
    int j;
    for (j = 0; j < AT_TK; j++) x[j] = pa_dot(qp[j], (const float *)kp[j], Dp) * scaling + lc[j];
#endif
}

/* acc[r] <- alpha[r] acc[r] + sum_j sum_c W[u(c)][r][j] code_jc for NR
 * rows (a constant after inlining): the centred value codes of a tile
 * weighted per (channel group, row, slot), where every AT_TK channels lie
 * in one group of gv vectors. Group u's weights start at W + u * gs, row r's
 * at + r * AT_TK (group-major, so a 4-vector chunk needs at most 4 base
 * pointers). vp: unpacked fp32 rows (kind AT_ROWS_F32) or, in vector
 * builds, the packed code rows themselves (kind = the value bits), unpacked
 * a block at a time in registers: the same centred codes, never stored. */
KVC_INLINE void pa_accumulate_grouped(float *const *acc, const void *const *vp, const float *W,
                                      int64_t gs, const float *alpha, int64_t Dp, int64_t gv,
                                      int NR, int kind, int wide)
{
#ifdef AT_VEC
    at_accumulate_blocks(acc, vp, W, gs, gv, alpha, Dp, NR, kind, wide);
#else
    (void)kind;
    (void)wide;
    int64_t c;
    int j, r;
    for (r = 0; r < NR; r++)
        for (c = 0; c < Dp; c++) {
            const float *wu = W + c / AT_TK / gv * gs;
            float o = acc[r][c] * alpha[r];
            for (j = 0; j < AT_TK; j++) o += wu[r * AT_TK + j] * ((const float *)vp[j])[c];
            acc[r][c] = o;
        }
#endif
}

/* pa_accumulate_grouped with NR (1..4) and kind as constants. */
KVC_INLINE void pa_accumulate_nr(float *const *acc, const void *const *vp, const float *W, int64_t gs,
                                 const float *alpha, int64_t Dp, int64_t gv, int NR, int kind, int wide)
{
    switch (NR) {
    case 1: pa_accumulate_grouped(acc, vp, W, gs, alpha, Dp, gv, 1, kind, wide); break;
    case 2: pa_accumulate_grouped(acc, vp, W, gs, alpha, Dp, gv, 2, kind, wide); break;
    case 3: pa_accumulate_grouped(acc, vp, W, gs, alpha, Dp, gv, 3, kind, wide); break;
    default: pa_accumulate_grouped(acc, vp, W, gs, alpha, Dp, gv, 4, kind, wide); break;
    }
}

KVC_INLINE void pa_accumulate_kind(float *const *acc, const void *const *vp, const float *W, int64_t gs,
                                   const float *alpha, int64_t Dp, int64_t gv, int NR, int kind, int wide)
{
    switch (kind) {
    case 2: pa_accumulate_nr(acc, vp, W, gs, alpha, Dp, gv, NR, 2, wide); break;
    case 4: pa_accumulate_nr(acc, vp, W, gs, alpha, Dp, gv, NR, 4, wide); break;
    case 8: pa_accumulate_nr(acc, vp, W, gs, alpha, Dp, gv, NR, 8, wide); break;
    default: pa_accumulate_nr(acc, vp, W, gs, alpha, Dp, gv, NR, AT_ROWS_F32, wide); break;
    }
}

/* The same for groups that do not align with AT_TK channels: slot j's
 * value scales expanded per channel (sp[j]), the weight w_rj scale_jc
 * formed per lane, then the same product with the code. */
KVC_INLINE void pa_accumulate_expanded(float *const *acc, const void *const *vp,
                                       const float *const *sp, const float *x,
                                       const float *alpha, int64_t Dp, int NR)
{
    int64_t c;
    int j, r;
#ifdef AT_VEC
    for (c = 0; c < Dp; c += AT_TK) {
        at_v8 lo[4], hi[4];
        at_rows_load(lo, hi, NR);
        for (j = 0; j < AT_TK; j++) {
            at_v8 v0, v1, s0, s1;
            memcpy(&v0, (const float *)vp[j] + c, sizeof v0);
            memcpy(&v1, (const float *)vp[j] + c + AT_TK / 2, sizeof v1);
            memcpy(&s0, sp[j] + c, sizeof s0);
            memcpy(&s1, sp[j] + c + AT_TK / 2, sizeof s1);
            for (r = 0; r < NR; r++) {
                lo[r] += (x[r * AT_TK + j] * s0) * v0;
                hi[r] += (x[r * AT_TK + j] * s1) * v1;
            }
        }
        at_rows_store(acc, lo, hi, alpha, c, NR);
    }
#else
    for (r = 0; r < NR; r++)
        for (c = 0; c < Dp; c++) {
            float o = acc[r][c] * alpha[r];
            for (j = 0; j < AT_TK; j++) o += (x[r * AT_TK + j] * sp[j][c]) * ((const float *)vp[j])[c];
            acc[r][c] = o;
        }
#endif
}

struct pa_thread {
    float *qbuf;  /* [R][Dp] query rows of the unit */
    float *qs;    /* [NS][R][Dp] query rows times the key scales of a token group (ring) */
    float *kbuf;  /* [AT_TK][Dp] key codes (or residual keys) of a tile */
    float *vbuf;  /* [AT_TK][Dp] value codes (or residual values) */
    float *zero;  /* [Dp] zeros: stands in for the slots past a short tile */
    float *krow;  /* [Dp] key scales of a token group */
    float *mrow;  /* [Dp] key centres (min + scale * mid) of a token group */
    float *qb;    /* [NS][R] scaling * q . key centres of a token group (ring) */
    float *xbuf;  /* [R][AT_TK] logits, then weights, of a tile */
    float *abuf;  /* [R] rescale factors of a tile */
    float *S, *M; /* [ng][AT_TK] value scales / centres of a tile, per group */
    float *W;     /* grouped: [ng][R][AT_TK] weights times value scales */
    float *se;    /* otherwise: [AT_TK][Dp] value scales of a tile per channel */
    float *mn;    /* [R][ng] running sum of weight x value centre per group */
    int64_t *lim; /* [R] last logical slot each row sees */
    int32_t *uidx; /* [Dp] value group of the channel at each position (0 past D) */
    uint8_t *tmp;  /* a contiguous copy of a strided code row */
    void *amx;     /* the AMX path's buffers (g->amx), else NULL */
};

/* Ring slot of token group t: scaled query rows and biases (against the
 * group's centres), computed once per (unit, group). */
KVC_INLINE void pa_key_group(const struct pa_geom *g, const struct kvc_packed_head *h,
                             const struct pa_thread *w, int64_t t, int64_t R, float scaling)
{
    const int64_t Dp = g->u.Dp, slot = t % g->NS;
    float *qs = w->qs + slot * g->u.R * Dp, *qb = w->qb + slot * g->u.R;
    const float *ks = h->ks + t * h->kss, *km = h->km + t * h->kms;
    const float mid = kvc_pk_mid(g->bits); /* once per group, not per channel */
    /* the thread's rows through restrict locals: written through the
     * struct's pointers, each store could alias the scales being read, and
     * the copy ran a channel at a time (5% of the unit at D = 128) */
    float *restrict krow = w->krow, *restrict mrow = w->mrow;
    int64_t c, r;
    if (h->ksd == 1 && h->kmd == 1) {
        for (c = 0; c < g->u.D; c++) {
            krow[c] = ks[c];
            mrow[c] = kvc_pk_centre_at(km[c], ks[c], mid);
        }
    } else {
        for (c = 0; c < g->u.D; c++) {
            krow[c] = ks[c * h->ksd];
            mrow[c] = kvc_pk_centre_at(km[c * h->kmd], ks[c * h->ksd], mid);
        }
    }
    pa_zero_pads(g, krow);
    pa_zero_pads(g, mrow);
    for (r = 0; r < R; r++) {
        const float *restrict qr = w->qbuf + r * Dp;
        float *restrict o = qs + r * Dp;
        for (c = 0; c < Dp; c++) o[c] = qr[c] * krow[c];
        qb[r] = scaling * pa_dot(qr, mrow, Dp);
    }
}

/* Row r of a tile after its softmax step: the centre sums
 * mn[r][u] <- alpha mn[r][u] + sum_j x[r][j] M[u][j] (kvc_lanes_sum's
 * order) and, grouped, the code weights W[u][r][:] = x[r][:] S[u][:]. */
KVC_INLINE void pa_row_weights(const struct pa_geom *g, const struct pa_thread *w, int64_t r,
                               int64_t R)
{
    const float *x = w->xbuf + r * AT_TK;
    const float a = w->abuf[r];
    float *mn = w->mn + r * g->ng;
    int64_t u;
#ifdef AT_VEC
    at_vf xv;
    memcpy(&xv, x, sizeof xv);
    for (u = 0; u < g->ng; u++) {
        at_vf t;
        memcpy(&t, w->M + u * AT_TK, sizeof t);
        t *= xv;
#ifdef AT_TREE
        mn[u] = mn[u] * a + at_hsum16((const float *)&t);
#else
        {
            float l[AT_TK];
            memcpy(l, &t, sizeof l);
            mn[u] = mn[u] * a + kvc_lanes_sum(l);
        }
#endif
        if (g->grouped) {
            memcpy(&t, w->S + u * AT_TK, sizeof t);
            t *= xv;
            memcpy(w->W + (u * R + r) * AT_TK, &t, sizeof t);
        }
    }
#else
    int j;
    for (u = 0; u < g->ng; u++) {
        float l[AT_TK];
        for (j = 0; j < AT_TK; j++) l[j] = x[j] * w->M[u * AT_TK + j];
        mn[u] = mn[u] * a + kvc_lanes_sum(l);
        if (g->grouped)
            for (j = 0; j < AT_TK; j++) w->W[(u * R + r) * AT_TK + j] = x[j] * w->S[u * AT_TK + j];
    }
#endif
}

#ifdef AT_TREE
/* e[u] = lanes u, u + ng, u + 2 ng, ... of the AT_TK x ng floats at src
 * (ng = 1, 2 or 4): a [slot][group] block read as vectors and transposed by
 * shuffles (at_deal, with ng a constant). */
KVC_INLINE void pa_groups_by_lane(at_vf *e, const float *src, int64_t ng)
{
    int64_t i;
    for (i = 0; i < ng; i++) memcpy(&e[i], src + i * AT_TK, sizeof e[i]);
    if (ng == 2) at_deal(e, 2);
    else if (ng == 4) at_deal(e, 4);
}

/* S[u][j] = scale and M[u][j] = centre of slot jt + j's value group u, for
 * a full tile whose scales and mins are contiguous [slot][group] rows of
 * ng = 1, 2 or 4 groups (pa_groups_by_lane), where the general loop reads
 * them one by one with strides (about 7% of the unit's time at D = 64). The
 * centres are kvc_pk_centre_at's expression, so the same values. Returns 0
 * (and does nothing) for any other tile. */
KVC_INLINE int pa_value_groups(const struct kvc_packed_head *h, const struct pa_thread *w, int64_t jt, int64_t nk,
                               int64_t ng, float vmid)
{
    at_vf sc[4], mn[4];
    int64_t u;
    if (nk != AT_TK || h->vsd != 1 || h->vmd != 1 || h->vss != ng || h->vms != ng || (ng != 1 && ng != 2 && ng != 4))
        return 0;
    pa_groups_by_lane(sc, h->vs + jt * ng, ng);
    pa_groups_by_lane(mn, h->vm + jt * ng, ng);
    for (u = 0; u < ng; u++) {
        const at_vf centre = mn[u] + sc[u] * vmid; /* kvc_pk_centre_at, lane-wise */
        memcpy(w->S + u * AT_TK, &sc[u], sizeof sc[u]);
        memcpy(w->M + u * AT_TK, &centre, sizeof centre);
    }
    return 1;
}
#else
KVC_INLINE int pa_value_groups(const struct kvc_packed_head *h, const struct pa_thread *w, int64_t jt, int64_t nk,
                               int64_t ng, float vmid)
{
    (void)h, (void)w, (void)jt, (void)nk, (void)ng, (void)vmid;
    return 0;
}
#endif

#define PA_PF 64 /* slots ahead that the codes and scales are prefetched */
/* Prefetch what the tile of packed slots [j, j + nk) reads: the scales
 * and mins (attention_packed_head.h; 1.00-1.11x with every layer read from
 * memory, ab_packed.py --no-amx --stream) and the code rows, one request
 * per line (0.99-1.29x more, one and two threads; in cache 0.96-1.17x).
 * Asked for per row, the code rows were 0.96-1.15x: rows of 16 or 32
 * bytes share lines, and the repeated requests cost more than they won. */
KVC_INLINE void pa_prefetch(const struct pa_geom *g, const struct kvc_packed_head *h, int64_t j, int64_t nk)
{
    if (j >= h->n) return;
    kvc_packed_prefetch_values(h, j, nk, h->n, g->ng, 0);
    if (j % g->G == 0) kvc_packed_prefetch_key_group(h, j / g->G, g->u.D);
    kvc_packed_prefetch_rows(h->kc, h->kcs, h->kcd, (g->u.D * g->bits + 7) / 8, j, j + nk, h->n, 0);
    kvc_packed_prefetch_rows(h->vc, h->vcs, h->vcd, (g->u.D * g->vbits + 7) / 8, j, j + nk, h->n, 0);
}

/* One tile of packed slots [jt, jt + nk). */
KVC_INLINE void pa_packed_tile(const struct kvc_packed_attention_params *p,
                               const struct pa_geom *g, const struct kvc_packed_head *h,
                               const struct pa_thread *w, int64_t jt, int64_t nk, int64_t R,
                               float *pm, float *ps, float *acc, int64_t *have, int wide, int64_t Dp)
{
    const int64_t ng = g->ng, G = g->G;
    const int64_t t0 = jt / G, t1 = (jt + nk - 1) / G;
    /* one token group, whole blocks of channels, contiguous code rows: the
     * logits read the key codes in place (at_logits_rows of kind bits), the
     * same values as from unpacked rows without storing them */
    const int fused = t0 == t1 && g->u.D == Dp && h->kcd == 1;
    /* values likewise whenever every block of channels lies in one group */
    const int vfused = PA_VEC && g->grouped && g->u.D == Dp && h->vcd == 1;
    const float vmid = kvc_pk_mid(g->vbits);
    const void *kp[AT_TK], *vp[AT_TK];
    const float *sp[AT_TK];
    float lc[AT_TK];
    int64_t j, r, u, t;

    for (t = t0 > *have ? t0 : *have + 1; t <= t1; t++) pa_key_group(g, h, w, t, R, p->scaling);
    *have = t1;
    pa_prefetch(g, h, jt + PA_PF, nk);
    for (j = 0; j < nk; j++) {
        const int64_t s = jt + j;
        float *kr = w->kbuf + j * Dp, *vr = w->vbuf + j * Dp;
        if (fused) {
            kp[j] = h->kc + s * h->kcs;
        } else {
            pa_unpack(g, g->bits, kr, h->kc + s * h->kcs, h->kcd, w->tmp);
            kp[j] = kr;
        }
        if (vfused) {
            vp[j] = h->vc + s * h->vcs;
        } else {
            pa_unpack(g, g->vbits, vr, h->vc + s * h->vcs, h->vcd, w->tmp);
            vp[j] = vr;
        }
    }
    /* value scales and centres of the tile, transposed: a whole tile of
     * contiguous [slot][group] scales and mins with 1, 2 or 4 groups by
     * shuffles (pa_value_groups); otherwise group by group, so each is a
     * short loop over the slots (a loop over a slot's few groups cost more
     * in its setup than in its work) */
    if (!pa_value_groups(h, w, jt, nk, ng, vmid))
        for (u = 0; u < ng; u++) {
            const float *vs = h->vs + jt * h->vss + u * h->vsd, *vm = h->vm + jt * h->vms + u * h->vmd;
            for (j = 0; j < nk; j++) {
                const float sc = vs[j * h->vss];
                w->S[u * AT_TK + j] = sc;
                w->M[u * AT_TK + j] = kvc_pk_centre_at(vm[j * h->vms], sc, vmid);
            }
        }
    if (!g->grouped)
        for (j = 0; j < nk; j++) {
            float *se = w->se + j * Dp;
            for (u = 0; u < Dp; u++) se[u] = w->S[w->uidx[u] * AT_TK + j];
            sp[j] = se;
        }
    for (j = nk; j < AT_TK; j++) {
        /* slots past the tile: masked by the softmax; any finite row does */
        kp[j] = fused ? kp[0] : w->zero;
        vp[j] = vfused ? vp[0] : w->zero;
        sp[j] = w->zero;
        for (u = 0; u < ng; u++) w->S[u * AT_TK + j] = w->M[u * AT_TK + j] = 0.0f;
    }
    if (h->c) {
        /* log(count): the merged-slot bias; slots past the tile get 0 */
        for (j = 0; j < nk; j++) lc[j] = h->c[(jt + j) * h->cs];
        for (; j < AT_TK; j++) lc[j] = 1.0f;
        for (j = 0; j < AT_TK; j++) lc[j] = kvc_logf(lc[j]);
    } else {
        for (j = 0; j < AT_TK; j++) lc[j] = 0.0f;
    }

    if (t0 == t1) {
        /* one token group: its scaled query rows and biases for every row
         * (rows that see none of the tile are zeroed by the softmax pass) */
        const int64_t slot = t0 % g->NS;
        const float *qs = w->qs + slot * g->u.R * Dp, *qb = w->qb + slot * g->u.R;
        switch (fused ? g->bits : AT_ROWS_F32) {
        case 2: at_logits_all(qs, Dp, kp, 2, lc, qb, Dp, p->scaling, w->xbuf, R, wide); break;
        case 4: at_logits_all(qs, Dp, kp, 4, lc, qb, Dp, p->scaling, w->xbuf, R, wide); break;
        case 8: at_logits_all(qs, Dp, kp, 8, lc, qb, Dp, p->scaling, w->xbuf, R, wide); break;
        default: at_logits_all(qs, Dp, kp, AT_ROWS_F32, lc, qb, Dp, p->scaling, w->xbuf, R, wide); break;
        }
    } else {
        for (r = 0; r < R; r++) {
            float l[AT_TK];
            const float *qp[AT_TK];
            if (w->lim[r] < jt) continue;
            for (j = 0; j < AT_TK; j++) {
                const int64_t slot = (j < nk ? (jt + j) / G : t0) % g->NS;
                qp[j] = w->qs + (slot * g->u.R + r) * Dp;
                l[j] = lc[j] + w->qb[slot * g->u.R + r];
            }
            pa_logits_multi(qp, kp, l, Dp, p->scaling, w->xbuf + r * AT_TK);
        }
    }
    at_softmax_rows(w->xbuf, w->abuf, w->lim, pm, ps, R, jt, nk, wide);

    for (r = 0; r < R; r++) pa_row_weights(g, w, r, R);
    for (r = 0; r < R; r += 4) {
        /* rows in groups of up to 4 share each code row load */
        float *accs[4];
        const int nr = R - r < 4 ? (int)(R - r) : 4;
        int i;
        for (i = 0; i < nr; i++) accs[i] = acc + (r + i) * Dp;
        if (g->grouped)
            pa_accumulate_kind(accs, vp, w->W + r * AT_TK, R * AT_TK, w->abuf + r, Dp, G / AT_TK, nr,
                               vfused ? g->vbits : AT_ROWS_F32, wide);
        else
            switch (nr) {
            case 1: pa_accumulate_expanded(accs, vp, sp, w->xbuf + r * AT_TK, w->abuf + r, Dp, 1); break;
            case 2: pa_accumulate_expanded(accs, vp, sp, w->xbuf + r * AT_TK, w->abuf + r, Dp, 2); break;
            case 3: pa_accumulate_expanded(accs, vp, sp, w->xbuf + r * AT_TK, w->abuf + r, Dp, 3); break;
            default: pa_accumulate_expanded(accs, vp, sp, w->xbuf + r * AT_TK, w->abuf + r, Dp, 4); break;
            }
    }
}

/* One tile of residual slots [jt, jt + nk) (logical; row jt - n onwards). */
KVC_INLINE void pa_residual_tile(const struct kvc_packed_attention_params *p,
                                 const struct pa_geom *g, const struct kvc_packed_head *h,
                                 const struct pa_thread *w, int64_t jt, int64_t nk, int64_t R,
                                 float *pm, float *ps, float *acc, int wide)
{
    const int64_t Dp = g->u.Dp, es = (int64_t)kvc_dtype_size((enum kvc_dtype)p->q.dtype);
    const void *kp[AT_TK], *vp[AT_TK];
    float lc[AT_TK];
    int64_t j, r;
    for (j = 0; j < nk; j++) {
        const int64_t s = jt + j - h->n;
        pa_row_load(g, w->kbuf + j * Dp, h->rk + s * h->rks * es, p->q.dtype, h->rkd);
        pa_row_load(g, w->vbuf + j * Dp, h->rv + s * h->rvs * es, p->q.dtype, h->rvd);
        kp[j] = w->kbuf + j * Dp;
        vp[j] = w->vbuf + j * Dp;
    }
    for (; j < AT_TK; j++) kp[j] = vp[j] = w->zero;
    for (j = 0; j < AT_TK; j++) lc[j] = 0.0f; /* residual slots count 1 ... */
    if (h->rc != NULL) /* ... unless the call gives their counts */
        for (j = 0; j < nk; j++) lc[j] = kvc_logf(h->rc[(jt + j - h->n) * h->rcs]);
    at_logits_all(w->qbuf, Dp, kp, AT_ROWS_F32, lc, NULL, Dp, p->scaling, w->xbuf, R, wide);
    at_softmax_rows(w->xbuf, w->abuf, w->lim, pm, ps, R, jt, nk, wide);
    for (r = 0; r < R; r += 4) {
        float *accs[4];
        const int nr = R - r < 4 ? (int)(R - r) : 4;
        int i;
        for (i = 0; i < nr; i++) accs[i] = acc + (r + i) * Dp;
        switch (nr) {
        case 1: at_accumulate(accs, vp, w->xbuf + r * AT_TK, w->abuf + r, Dp, 1, AT_ROWS_F32, wide); break;
        case 2: at_accumulate(accs, vp, w->xbuf + r * AT_TK, w->abuf + r, Dp, 2, AT_ROWS_F32, wide); break;
        case 3: at_accumulate(accs, vp, w->xbuf + r * AT_TK, w->abuf + r, Dp, 3, AT_ROWS_F32, wide); break;
        default: at_accumulate(accs, vp, w->xbuf + r * AT_TK, w->abuf + r, Dp, 4, AT_ROWS_F32, wide); break;
        }
    }
}

/* Packed slots [a0, a1) (multiples of 32) by the AMX path or the one-row
 * path, from the state the tiles before them left. */
static void pa_span(const struct kvc_packed_attention_params *p, const struct pa_geom *g,
                    const struct kvc_packed_head *h, const struct pa_thread *w, int64_t a0, int64_t a1, int64_t R,
                    float *pm, float *ps, float *acc)
{
    struct kvc_packed_span s;
    s.h = *h; /* a copy: one indirection less in the hot loops */
    s.q = w->qbuf;
    s.R = R, s.D = g->u.D, s.Dp = g->u.Dp, s.G = g->G, s.ng = g->ng, s.j0 = a0, s.n = a1 - a0;
    s.bits = g->bits, s.vbits = g->vbits;
    s.scaling = p->scaling;
    s.pm = pm, s.ps = ps, s.acc = acc, s.mn = w->mn;
    s.scratch = w->amx;
    if (g->amx) kvc_amx_packed_span(&s);
    else kvc_rows_packed_span(&s);
}

KVC_INLINE void pa_unit_body(const struct kvc_packed_attention_params *p, const struct pa_geom *g,
                             int64_t pair, int64_t blk, float *part, const struct pa_thread *w, int wide)
{
    const int64_t Dp = g->u.Dp, t = pair % g->u.ntiles, bh = pair / g->u.ntiles;
    const int64_t b = bh / g->u.Hkv, hk = bh % g->u.Hkv;
    const int64_t es = (int64_t)kvc_dtype_size((enum kvc_dtype)p->q.dtype);
    struct kvc_packed_head h;
    int64_t i0, nq, end, j0, j1, jp, jt, R, r, c, a0, a1, have = -1;
    float *pm, *ps, *acc;

    pa_head_get(p, b, hk, &h);
    end = pa_tile(g, &h, t, &i0, &nq);
    R = g->u.g * nq;
    if (g->u.split) {
        const int64_t sb = g->u.sb, bs = (h.s0 / sb + blk) * sb;
        j0 = bs > h.s0 ? bs : h.s0;
        j1 = bs + sb < end ? bs + sb : end;
    } else {
        j0 = h.s0;
        j1 = end;
    }
    pm = KVC_AT_PART_M(part);
    ps = KVC_AT_PART_S(&g->u, part);
    acc = KVC_AT_PART_ACC(&g->u, part);

    /* row r = gi * nq + i: query head hk * g + gi, query i0 + i */
    for (r = 0; r < R; r++) {
        const int64_t hq = hk * g->u.g + r / nq, qi = i0 + r % nq;
        const char *src = (const char *)p->q.data +
                          (b * p->q.strides[0] + hq * p->q.strides[1] + qi * p->q.strides[2]) * es;
        pa_row_load(g, w->qbuf + r * Dp, src, p->q.dtype, p->q.strides[3]);
        w->lim[r] = pa_last(g, &h, qi);
        pm[r] = -INFINITY;
        ps[r] = 0.0f;
        memset(acc + r * Dp, 0, (size_t)Dp * sizeof(float));
        memset(w->mn + r * g->ng, 0, (size_t)g->ng * sizeof(float));
    }

    /* packed slots, tiles at multiples of AT_TK so that with G % AT_TK == 0
     * a tile meets one token group */
    jp = j1 < h.n ? j1 : h.n;
    /* with AMX, the 32-aligned stretch of whole tiles goes to the tile
     * products, and a unit of few rows' to the few-rows path; the tiles before
     * and after it run here */
    a0 = a1 = jp;
    if (wide && (g->amx || (g->rows && R <= kvc_rows_max(g->u.D))) &&
        (j0 + 31) / 32 * 32 + 32 <= jp / 32 * 32) {
        a0 = (j0 + 31) / 32 * 32;
        a1 = jp / 32 * 32;
    }
    for (jt = j0; jt < jp;) {
        int64_t je = (jt / AT_TK + 1) * AT_TK;
        if (jt == a0) {
            pa_span(p, g, &h, w, a0, a1, R, pm, ps, acc);
            jt = a1;
            continue;
        }
        je = je < jp ? je : jp;
        /* Dp = g->u.Dp; as a constant for the wide unit's common head
         * sizes, so that the loops over channel blocks unroll (the loop
         * overhead was a tenth of the logits' instructions at D = 64) */
        if (wide && Dp == 64)
            pa_packed_tile(p, g, &h, w, jt, je - jt, R, pm, ps, acc, &have, wide, 64);
        else if (wide && Dp == 128)
            pa_packed_tile(p, g, &h, w, jt, je - jt, R, pm, ps, acc, &have, wide, 128);
        else
            pa_packed_tile(p, g, &h, w, jt, je - jt, R, pm, ps, acc, &have, wide, Dp);
        jt = je;
    }
    if (j0 < jp) {
        /* the value centres join the rows before the residual slots: from
         * here on both are rescaled alike */
        for (r = 0; r < R; r++) {
            const float *mn = w->mn + r * g->ng;
            float *a = acc + r * Dp;
            if (g->grouped) {
                /* a vector of channels lies in one group (pads are never read) */
                for (c = 0; c < Dp; c += AT_TK) {
                    const float m = mn[c / g->G];
                    int l;
                    for (l = 0; l < AT_TK; l++) a[c + l] += m;
                }
            } else {
                for (c = 0; c < Dp; c++) a[c] += mn[w->uidx[c]];
            }
        }
    }

    /* residual slots, read with their own queries when the call has them
     * (the packed tiles are done with qbuf: it takes them in place) */
    if (p->res_q.data != NULL && j1 > h.n) {
        const int64_t rs = (int64_t)kvc_dtype_size((enum kvc_dtype)p->res_q.dtype);
        for (r = 0; r < R; r++) {
            const int64_t hq = hk * g->u.g + r / nq, qi = i0 + r % nq;
            const char *src = (const char *)p->res_q.data +
                              (b * p->res_q.strides[0] + hq * p->res_q.strides[1] + qi * p->res_q.strides[2]) * rs;
            pa_row_load(g, w->qbuf + r * Dp, src, p->res_q.dtype, p->res_q.strides[3]);
        }
    }
    /* the residual rows the head sees: those before res_hidden's hole, then
     * those after it (a block inside the hole reads nothing and leaves an
     * empty partial, weight 0 in the combine). One call site and, without
     * a hole (rh0 = rh1 = 0), the plain loop's tiles: two nested loops here
     * cost the whole unit 2-5% (benchmarks/ab_packed.py) */
    for (jt = j0 > h.n ? j0 : h.n; jt < j1;) {
        const int64_t stop = jt < h.n + h.rh0 ? h.n + h.rh0 : j1; /* the stretch before the hole ends there */
        int64_t nk;
        if (jt >= h.n + h.rh0 && jt < h.n + h.rh1) {
            jt = h.n + h.rh1;
            continue;
        }
        nk = (stop < j1 ? stop : j1) - jt;
        nk = nk < AT_TK ? nk : AT_TK;
        pa_residual_tile(p, g, &h, w, jt, nk, R, pm, ps, acc, wide);
        jt += nk;
    }
}

/* The unit of work, cloned per ISA level, and for x86-64-v4 in 16-lane loops. */
KVC_AT_UNITS(pa_unit, pa_unit_body, struct kvc_packed_attention_params, struct pa_geom, struct pa_thread)

/* Partial rows are in channel order. */
static int64_t pa_out_pos(const struct kvc_at_units *u, int64_t d)
{
    (void)u;
    return d;
}

enum kvc_status kvc_packed_attention(const struct kvc_packed_attention_params *p)
{
    struct pa_geom g;
    char *base;
    int64_t *prefix;
    float *parts;
    int nt, empty, wide;
    enum kvc_status s = kvc_at_units_check(p->layout, &p->q, p->num_kv_heads, &empty);
    if (s != KVC_OK || empty) return s;
    if ((p->bits != 2 && p->bits != 4 && p->bits != 8) ||
        (p->value_bits != 0 && p->value_bits != 2 && p->value_bits != 4 && p->value_bits != 8) || p->group < 1 ||
        (p->res_k.shape[2] != 0 && p->res_k.shape[2] < p->q.shape[2]))
        return KVC_ERR_INVALID;
    if (p->res_q.data != NULL) {
        int d;
        if (p->res_q.ndim != 4 || p->res_q.dtype != p->q.dtype) return KVC_ERR_INVALID;
        for (d = 0; d < 4; d++)
            if (p->res_q.shape[d] != p->q.shape[d]) return KVC_ERR_INVALID;
    }
    if (!kvc_packed_res_counts_fit(p)) return KVC_ERR_INVALID;
    if (p->res_hidden != NULL) {
        /* a hole outside [0, r] would move the residual loops off its rows */
        const int64_t N = p->q.shape[0] * p->num_kv_heads, r = p->res_k.shape[2];
        int64_t i;
        for (i = 0; i < N; i++) {
            const int64_t lo = p->res_hidden[i * p->res_hidden_stride];
            const int64_t hi = p->res_hidden[i * p->res_hidden_stride + p->res_hidden_col];
            if (lo < 0 || lo > hi || hi > r) return KVC_ERR_INVALID;
        }
    }
    if (p->kv_start != NULL && p->layout == KVC_KV_RAGGED) {
        /* a masked prefix past a head's slots would start its tiles past them */
        const int64_t B = p->q.shape[0], r = p->res_k.shape[2];
        int64_t i;
        for (i = 0; i < B * p->num_kv_heads; i++) {
            const int64_t s0 = p->kv_start[(i / p->num_kv_heads) * p->kv_start_stride];
            if (s0 < 0 || s0 > p->lengths[i * p->lengths_stride] + r) return KVC_ERR_INVALID;
        }
    }
    if (p->scratch == NULL || p->scratch_bytes < kvc_packed_attention_scratch_bytes(p))
        return KVC_ERR_NOMEM;
    prefix = kvc_at_scratch_prefix(p->scratch);
    pa_geometry(p, &g, prefix);
    parts = kvc_at_scratch_parts(&g.u, prefix, &base);
    nt = kvc_at_threads(&g.u, p->num_threads);
    wide = kvc_wide_active();

#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        struct pa_thread w;
        char *tb = base + (size_t)KVC_THREAD_ID() * g.thread_bytes;
        float *f = (float *)tb;
        int64_t u, c;
        /* pads past D stay zero: conversions and key rows write only the first D */
        memset(f, 0, g.float_floats * sizeof(float));
        w.qbuf = f, f += g.u.R * g.u.Dp;
        w.qs = f, f += g.NS * g.u.R * g.u.Dp;
        w.kbuf = f, f += AT_TK * g.u.Dp;
        w.vbuf = f, f += AT_TK * g.u.Dp;
        w.zero = f, f += g.u.Dp;
        w.krow = f, f += g.u.Dp;
        w.mrow = f, f += g.u.Dp;
        w.qb = f, f += g.NS * g.u.R;
        w.xbuf = f, f += g.u.R * AT_TK;
        w.abuf = f, f += g.u.R;
        w.S = f, f += g.ng * AT_TK;
        w.M = f, f += g.ng * AT_TK;
        w.W = w.se = f, f += g.grouped ? g.u.R * g.ng * AT_TK : AT_TK * g.u.Dp;
        w.mn = f;
        tb += kvc_align_up(g.float_floats * sizeof(float));
        w.lim = (int64_t *)tb;
        tb += kvc_align_up((size_t)g.u.R * sizeof(int64_t));
        w.uidx = (int32_t *)tb;
        tb += kvc_align_up((size_t)g.u.Dp * sizeof(int32_t));
        w.tmp = (uint8_t *)tb;
        tb += kvc_align_up((size_t)kvc_at_round_up(g.Db + AT_TK, AT_TK));
        w.amx = g.amx ? tb : NULL;
        /* by position; 0 (a group that exists) for the pads, whose values
         * are never read */
        for (c = 0; c < g.u.Dp; c++) w.uidx[c] = 0;
        for (c = 0; c < g.u.D; c++) w.uidx[c] = (int32_t)(c / g.G);
#pragma omp for schedule(dynamic, 1)
        for (u = 0; u < g.u.U; u++) {
            const int64_t pair = kvc_at_unit_pair(&g.u, prefix, u);
            KVC_AT_RUN(pa_unit, wide, p, &g, pair, u - prefix[pair], parts + u * g.u.ustride, &w);
        }
#pragma omp for schedule(static)
        for (u = 0; u < g.u.P; u++) kvc_at_combine(&g.u, &p->out, pa_out_pos, u, prefix, parts, w.kbuf, &p->lse);
    }
    return KVC_OK;
}
