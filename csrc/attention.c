/*
 * attention.c - decode/chunk attention over a compressed layer (CPU).
 *
 * Work units of attention_units.h: one kv head (b, hk), one tile of up to
 * KVC_AT_QT queries with all g query heads of the GQA group (so each K/V
 * row is read once for the group), and one block of slots. Short chunks
 * (decode) cut the slots into fixed blocks of u.sb slots (split-K,
 * flash-decoding; the size follows from the shape, kvc_at_block_slots) so
 * that a few long heads still spread over every thread;
 * each unit leaves an unnormalised partial (running max, running sum,
 * output row) and a second pass combines the blocks by log-sum-exp in block
 * order. Units and block boundaries depend only on the shape of each head,
 * never on the thread count: results are bit-identical for any thread
 * count.
 */
#include <math.h>
#include <string.h>

#include "attention.h"
#include "attention_tile.h"
#include "attention_units.h"
#include "kvc_math.h"

struct at_geom {
    struct kvc_at_units u; /* first, for the callbacks of attention_units.h */
    int kdirect, vdirect; /* rows read in place (fp32, or bf16 when bf16 is set) */
    int perm;             /* rows kept in the AT_BF16 order (attention_tile.h) */
    int bf16;             /* bf16 rows read in place (AT_ROWS_BF16) */
    size_t thread_bytes;
};

/* Where the slots of one kv head live. */
struct at_head {
    const char *k, *v;
    const void *c;            /* counts of slot 0 (f32 or i32), NULL: none */
    int64_t ks, kd, vs, vd, cs; /* slot and element strides (elements) */
    int64_t n, s0;            /* slots; first valid slot (logical, with pages) */
    const int64_t *pg;        /* pages read (paged uniform layer) or NULL */
    int64_t P;                /* page size with pg */
};

/* Physical slot of logical slot j: through the head's page list when it
 * reads pages (pages ascending, so logical order is token order). */
KVC_INLINE int64_t at_slot(const struct at_head *h, int64_t j)
{
    return h->pg ? h->pg[j / h->P] * h->P + j % h->P : j;
}

static void at_head_get(const struct kvc_attention_params *p, int64_t b, int64_t hk,
                        struct at_head *h)
{
    const int64_t es = (int64_t)kvc_dtype_size((enum kvc_dtype)p->k.dtype);
    h->pg = NULL;
    h->P = 1;
    if (p->layout == KVC_KV_RAGGED) {
        const int64_t i = b * p->num_kv_heads + hk;
        const int64_t off = p->offsets[i * p->offsets_stride];
        h->n = p->lengths[i * p->lengths_stride];
        h->s0 = 0;
        h->ks = p->k.strides[0];
        h->kd = p->k.strides[1];
        h->vs = p->v.strides[0];
        h->vd = p->v.strides[1];
        h->k = (const char *)p->k.data + off * h->ks * es;
        h->v = (const char *)p->v.data + off * h->vs * es;
        h->cs = p->counts.strides[0];
        h->c = p->counts.data ? (const char *)p->counts.data + off * h->cs * 4 : NULL;
        if (p->pages) {
            /* the head's list starts with padding (negative entries: heads
             * with fewer pages than np), then its ascending pages, the last
             * the newest; its logical length as in the uniform case below.
             * No slot is masked: a ragged head holds no left padding. */
            const int64_t np = p->num_pages, P = p->page_size, *pg = p->pages + i * np;
            int64_t k0 = 0;
            while (k0 < np && pg[k0] < 0) k0++;
            h->P = P;
            if (h->n > 0 && k0 < np) {
                h->pg = pg + k0;
                h->n = (np - k0 - 1) * P + (h->n - pg[np - 1] * P);
            } else {
                h->n = 0; /* an empty head lists no page (the binding checks both ways) */
            }
        }
    } else {
        h->n = p->k.shape[2];
        h->s0 = p->kv_start ? p->kv_start[b * p->kv_start_stride] : 0;
        h->ks = p->k.strides[2];
        h->kd = p->k.strides[3];
        h->vs = p->v.strides[2];
        h->vd = p->v.strides[3];
        h->k = (const char *)p->k.data + (b * p->k.strides[0] + hk * p->k.strides[1]) * es;
        h->v = (const char *)p->v.data + (b * p->v.strides[0] + hk * p->v.strides[1]) * es;
        h->cs = p->counts.strides[2];
        h->c = p->counts.data ? (const char *)p->counts.data +
                                    (b * p->counts.strides[0] + hk * p->counts.strides[1]) * 4
                              : NULL;
        if (p->pages) {
            /* logical length: full pages, then the newest (possibly short)
             * one; the masked prefix: the padded slots of the pages read */
            const int64_t np = p->num_pages, P = p->page_size, n = h->n, s0 = h->s0;
            int64_t i, masked = 0;
            h->pg = p->pages + (b * p->num_kv_heads + hk) * np;
            h->P = P;
            h->n = (np - 1) * P + (n - h->pg[np - 1] * P);
            for (i = 0; i < np; i++) {
                const int64_t lo = h->pg[i] * P, len = i + 1 < np ? P : n - lo;
                masked += s0 <= lo ? 0 : (s0 - lo < len ? s0 - lo : len);
            }
            h->s0 = masked;
        }
    }
}

/* Queries [i0, i0 + *nq) of tile t; returns the end (exclusive) of the slots
 * the tile sees: query i sees s0 .. n - q + i. */
static int64_t at_tile(const struct at_geom *g, const struct at_head *h, int64_t t, int64_t *i0,
                       int64_t *nq)
{
    kvc_at_tile_rows(&g->u, t, i0, nq);
    return h->n - g->u.q + *i0 + *nq;
}

static int64_t at_blocks(const struct at_geom *g, const struct at_head *h, int64_t t)
{
    int64_t i0, nq, end = at_tile(g, h, t, &i0, &nq);
    if (h->n <= 0 || end <= h->s0) return 0;
    return g->u.split ? (end - h->s0 + g->u.sb - 1) / g->u.sb : 1;
}

static int64_t at_head_blocks(const void *op, const struct kvc_at_units *u, int64_t b, int64_t hk, int64_t t)
{
    struct at_head h;
    at_head_get((const struct kvc_attention_params *)op, b, hk, &h);
    return at_blocks((const struct at_geom *)u, &h, t);
}

static int64_t at_head_span(const void *op, const struct kvc_at_units *u, int64_t b, int64_t hk)
{
    struct at_head h;
    int64_t i0, nq, end;
    at_head_get((const struct kvc_attention_params *)op, b, hk, &h);
    end = at_tile((const struct at_geom *)u, &h, u->ntiles - 1, &i0, &nq);
    return h.n > 0 && end > h.s0 ? end - h.s0 : 0;
}

/* Fills g; with prefix != NULL also prefix[pair] = first unit of the pair
 * (prefix[P] = U). */
static void at_geometry(const struct kvc_attention_params *p, struct at_geom *g, int64_t *prefix)
{
    kvc_at_units_init(&g->u, &p->q, p->num_kv_heads);
    {
        const int ragged = p->layout == KVC_KV_RAGGED;
        const int64_t kd = p->k.strides[ragged ? 1 : 3], vd = p->v.strides[ragged ? 1 : 3];
        g->kdirect = p->k.dtype == KVC_F32 && kd == 1 && g->u.D % AT_TK == 0;
        g->vdirect = p->v.dtype == KVC_F32 && vd == 1 && g->u.D % AT_TK == 0;
        /* bf16 rows whose length splits into 32-element chunks keep the
         * in-place kernel's element order even when they must be converted
         * (strided rows), so results do not depend on the strides */
        g->perm = p->k.dtype == KVC_BF16 && g->u.D % (2 * AT_TK) == 0;
#ifdef AT_VEC
        g->bf16 = g->perm && kd == 1 && vd == 1;
#else
        g->bf16 = 0;
#endif
        g->kdirect |= g->bf16;
        g->vdirect |= g->bf16;
    }
    kvc_at_units_block_size(&g->u, at_head_span, p);
    kvc_at_units_count(&g->u, at_head_blocks, p, prefix);
    /* query rows, converted K and V tiles, one zero row; weights, factors */
    g->thread_bytes = kvc_align_up((size_t)((g->u.R + 2 * AT_TK + 1) * g->u.Dp + g->u.R * (AT_TK + 1)) *
                                   sizeof(float)) +
                      kvc_align_up((size_t)g->u.R * sizeof(int64_t));
}

size_t kvc_attention_scratch_bytes(const struct kvc_attention_params *p)
{
    struct at_geom g;
    at_geometry(p, &g, NULL);
    return kvc_at_scratch_bytes(&g.u, g.thread_bytes, p->num_threads);
}

struct at_thread {
    float *qbuf; /* [R][Dp] query rows of the unit */
    float *xbuf; /* [R][AT_TK] logits, then weights, of a tile */
    float *kbuf; /* [AT_TK][Dp] converted keys of a tile */
    float *vbuf; /* [AT_TK][Dp] converted values */
    float *zero; /* [Dp] zeros: stands in for the slots past a short tile */
    float *abuf; /* [R] rescale factors of a tile */
    int64_t *lim; /* [R] last slot each row sees */
};

/* Position of element d in a row kept in the AT_BF16 order. */
KVC_INLINE int64_t at_pos(const struct at_geom *g, int64_t d)
{
    if (!g->perm) return d;
    return d / (2 * AT_TK) * (2 * AT_TK) + (d & 1) * AT_TK + d % (2 * AT_TK) / 2;
}

/* A query, key or value row -> fp32 in the unit's element order. */
KVC_INLINE void at_row_load(const struct at_geom *g, float *dst, const char *src, int32_t dtype,
                            int64_t stride)
{
    int64_t d;
    if (g->perm) {
        for (d = 0; d < g->u.D; d++)
            dst[at_pos(g, d)] = kvc_bf16_to_f32(((const uint16_t *)src)[d * stride]);
    } else {
        at_row_f32(dst, src, dtype, g->u.D, stride);
    }
}

KVC_INLINE void at_unit_body(const struct kvc_attention_params *p, const struct at_geom *g,
                             int64_t pair, int64_t blk, float *part, const struct at_thread *w, int wide)
{
    const int64_t Dp = g->u.Dp, t = pair % g->u.ntiles, bh = pair / g->u.ntiles;
    const int64_t b = bh / g->u.Hkv, hk = bh % g->u.Hkv;
    const int64_t es = (int64_t)kvc_dtype_size((enum kvc_dtype)p->k.dtype);
    struct at_head h;
    int64_t i0, nq, end, j0, j1, jt, R, r;
    float *pm, *ps, *acc;

    at_head_get(p, b, hk, &h);
    end = at_tile(g, &h, t, &i0, &nq);
    R = g->u.g * nq;
    j0 = h.s0 + (g->u.split ? blk * g->u.sb : 0);
    j1 = g->u.split && j0 + g->u.sb < end ? j0 + g->u.sb : end;
    pm = KVC_AT_PART_M(part);
    ps = KVC_AT_PART_S(&g->u, part);
    acc = KVC_AT_PART_ACC(&g->u, part);

    /* row r = gi * nq + i: query head hk * g + gi, query i0 + i */
    for (r = 0; r < R; r++) {
        const int64_t hq = hk * g->u.g + r / nq, qi = i0 + r % nq;
        const char *src = (const char *)p->q.data +
                          (b * p->q.strides[0] + hq * p->q.strides[1] + qi * p->q.strides[2]) * es;
        float *qr = w->qbuf + r * Dp;
        at_row_load(g, qr, src, p->q.dtype, p->q.strides[3]);
        w->lim[r] = h.n - g->u.q + qi;
        pm[r] = -INFINITY;
        ps[r] = 0.0f;
        memset(acc + r * Dp, 0, (size_t)Dp * sizeof(float));
    }

    for (jt = j0; jt < j1; jt += AT_TK) {
        const int64_t nk = j1 - jt < AT_TK ? j1 - jt : AT_TK;
        const void *kp[AT_TK], *vp[AT_TK];
        float lc[AT_TK];
        int64_t j;
        for (j = 0; j < nk; j++) {
            const int64_t sj = at_slot(&h, jt + j);
            const char *ks = h.k + sj * h.ks * es, *vs = h.v + sj * h.vs * es;
            if (g->kdirect) {
                kp[j] = ks;
            } else {
                at_row_load(g, w->kbuf + j * Dp, ks, p->k.dtype, h.kd);
                kp[j] = w->kbuf + j * Dp;
            }
            if (g->vdirect) {
                vp[j] = vs;
            } else {
                at_row_load(g, w->vbuf + j * Dp, vs, p->v.dtype, h.vd);
                vp[j] = w->vbuf + j * Dp;
            }
        }
        for (; j < AT_TK; j++) kp[j] = vp[j] = w->zero;
        if (h.c) {
            /* log(count): the merged-slot bias; slots past the tile get 0 */
            for (j = 0; j < nk; j++)
                lc[j] = p->counts.dtype == KVC_I32
                            ? (float)((const int32_t *)h.c)[at_slot(&h, jt + j) * h.cs]
                            : ((const float *)h.c)[at_slot(&h, jt + j) * h.cs];
            for (; j < AT_TK; j++) lc[j] = 1.0f;
            for (j = 0; j < AT_TK; j++) lc[j] = kvc_logf(lc[j]);
        } else {
            for (j = 0; j < AT_TK; j++) lc[j] = 0.0f;
        }
        /* Three passes over the rows, each made of independent per-row
         * work: a row's logits -> max -> exp -> output chain is long, and
         * interleaving rows hides its latency. */
        /* rows that see none of the tile get logits too; the softmax pass
         * zeroes their weights */
        if (g->bf16) at_logits_all(w->qbuf, Dp, kp, AT_ROWS_BF16, lc, NULL, Dp, p->scaling, w->xbuf, R, wide);
        else at_logits_all(w->qbuf, Dp, kp, AT_ROWS_F32, lc, NULL, Dp, p->scaling, w->xbuf, R, wide);
        at_softmax_rows(w->xbuf, w->abuf, w->lim, pm, ps, R, jt, nk, wide);
        for (r = 0; r < R; r += 4) {
            /* rows in groups of up to 4 share each V row load */
            float *accs[4];
            const int nr = R - r < 4 ? (int)(R - r) : 4;
            int i;
            for (i = 0; i < nr; i++) accs[i] = acc + (r + i) * Dp;
            switch (nr) {
#define AT_ACC_CASE(NR)                                                                        \
    case NR:                                                                                   \
        if (g->bf16)                                                                           \
            at_accumulate(accs, vp, w->xbuf + r * AT_TK, w->abuf + r, Dp, NR, AT_ROWS_BF16, wide); \
        else                                                                                   \
            at_accumulate(accs, vp, w->xbuf + r * AT_TK, w->abuf + r, Dp, NR, AT_ROWS_F32, wide);  \
        break;
                AT_ACC_CASE(1)
                AT_ACC_CASE(2)
                AT_ACC_CASE(3)
                default: AT_ACC_CASE(4)
#undef AT_ACC_CASE
            }
        }
    }
}

/* The unit of work, cloned per ISA level, and for x86-64-v4 in 16-lane loops. */
KVC_AT_UNITS(at_unit, at_unit_body, struct kvc_attention_params, struct at_geom, struct at_thread)

static int64_t at_out_pos(const struct kvc_at_units *u, int64_t d)
{
    return at_pos((const struct at_geom *)u, d);
}

enum kvc_status kvc_attention(const struct kvc_attention_params *p)
{
    struct at_geom g;
    char *base;
    int64_t *prefix;
    float *parts;
    int nt, empty, wide;
    enum kvc_status s = kvc_at_units_check(p->layout, &p->q, p->num_kv_heads, &empty);
    if (s != KVC_OK || empty) return s;
    if (p->scratch == NULL || p->scratch_bytes < kvc_attention_scratch_bytes(p))
        return KVC_ERR_NOMEM;
    prefix = kvc_at_scratch_prefix(p->scratch);
    at_geometry(p, &g, prefix);
    parts = kvc_at_scratch_parts(&g.u, prefix, &base);
    nt = kvc_at_threads(&g.u, p->num_threads);
    wide = kvc_wide_active();

#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        struct at_thread w;
        int64_t u;
        w.qbuf = (float *)(base + (size_t)KVC_THREAD_ID() * g.thread_bytes);
        w.kbuf = w.qbuf + g.u.R * g.u.Dp;
        w.vbuf = w.kbuf + AT_TK * g.u.Dp;
        w.zero = w.vbuf + AT_TK * g.u.Dp;
        w.xbuf = w.zero + g.u.Dp;
        w.abuf = w.xbuf + g.u.R * AT_TK;
        w.lim = (int64_t *)((char *)w.qbuf + kvc_align_up((size_t)((g.u.R + 2 * AT_TK + 1) * g.u.Dp +
                                                                   g.u.R * (AT_TK + 1)) *
                                                          sizeof(float)));
        /* pads past D stay zero: conversions write only the first D */
        memset(w.qbuf, 0, (size_t)((g.u.R + 2 * AT_TK + 1) * g.u.Dp) * sizeof(float));
#pragma omp for schedule(dynamic, 1)
        for (u = 0; u < g.u.U; u++) {
            const int64_t pair = kvc_at_unit_pair(&g.u, prefix, u);
            KVC_AT_RUN(at_unit, wide, p, &g, pair, u - prefix[pair], parts + u * g.u.ustride, &w);
        }
#pragma omp for schedule(static)
        for (u = 0; u < g.u.P; u++) kvc_at_combine(&g.u, &p->out, at_out_pos, u, prefix, parts, w.kbuf, NULL);
    }
    return KVC_OK;
}
