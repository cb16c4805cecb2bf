/*
 * attention.c - decode/chunk attention over a compressed layer (CPU).
 *
 * Work unit: one kv head (b, hk), one tile of up to AT_QT queries with all
 * g query heads of the GQA group (so each K/V row is read once for the
 * group), and one block of slots. Short chunks (decode) cut the slots into
 * fixed AT_SB-slot blocks (split-K, flash-decoding) so that a few long heads
 * still spread over every thread; each unit leaves an unnormalised partial
 * (running max, running sum, output row) and a second pass combines the
 * blocks by log-sum-exp in block order. Units and block boundaries depend
 * only on the shape of each head, never on the thread count: results are
 * bit-identical for any thread count.
 */
#include <math.h>
#include <string.h>

#include "attention.h"
#include "attention_tile.h"
#include "kvc_math.h"

#define AT_SB 256       /* slots per split-K block, a multiple of AT_TK */
#define AT_QT 16        /* queries per unit */
/* Split into blocks only while the chunk has at most this many query tiles:
 * decode and short chunks need the split for parallelism, longer chunks have
 * tiles enough, and their partials would grow as q * n. */
#define AT_SPLIT_MAX_TILES 2

struct at_geom {
    int64_t B, Hq, Hkv, g, q, D;
    int64_t Dp;      /* D rounded up to AT_TK: rows are padded with zeros */
    int64_t ntiles;  /* query tiles per kv head */
    int64_t P;       /* (b, hk, tile) pairs */
    int64_t U;       /* units (pairs x blocks) */
    int64_t R;       /* rows per unit at most: g * min(q, AT_QT) */
    int64_t ustride; /* floats of one unit's partial */
    int split;
    int kdirect, vdirect; /* rows read in place (fp32, or bf16 when bf16 is set) */
    int perm;             /* rows kept in the even/odd order of at_logits_bf16 */
    int bf16;             /* bf16 rows read in place (at_logits_bf16) */
    size_t prefix_bytes, part_bytes, thread_bytes;
};

/* Where the slots of one kv head live. */
struct at_head {
    const char *k, *v;
    const void *c;            /* counts of slot 0 (f32 or i32), NULL: none */
    int64_t ks, kd, vs, vd, cs; /* slot and element strides (elements) */
    int64_t n, s0;            /* slots; first valid slot */
};

static int64_t at_round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

static void at_head_get(const struct kvc_attention_params *p, int64_t b, int64_t hk,
                        struct at_head *h)
{
    const int64_t es = (int64_t)kvc_dtype_size((enum kvc_dtype)p->k.dtype);
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
    }
}

/* Queries [i0, i0 + *nq) of tile t; returns the end (exclusive) of the slots
 * the tile sees: query i sees s0 .. n - q + i. */
static int64_t at_tile(const struct at_geom *g, const struct at_head *h, int64_t t, int64_t *i0,
                       int64_t *nq)
{
    *i0 = t * AT_QT;
    *nq = g->q - *i0 < AT_QT ? g->q - *i0 : AT_QT;
    return h->n - g->q + *i0 + *nq;
}

static int64_t at_blocks(const struct at_geom *g, const struct at_head *h, int64_t t)
{
    int64_t i0, nq, end = at_tile(g, h, t, &i0, &nq);
    if (h->n <= 0 || end <= h->s0) return 0;
    return g->split ? (end - h->s0 + AT_SB - 1) / AT_SB : 1;
}

/* Fills g; with prefix != NULL also prefix[pair] = first unit of the pair
 * (prefix[P] = U). */
static void at_geometry(const struct kvc_attention_params *p, struct at_geom *g, int64_t *prefix)
{
    int64_t pair, u = 0;
    g->B = p->q.shape[0];
    g->Hq = p->q.shape[1];
    g->q = p->q.shape[2];
    g->D = p->q.shape[3];
    g->Hkv = p->num_kv_heads;
    g->g = g->Hkv > 0 ? g->Hq / g->Hkv : 1;
    g->Dp = at_round_up(g->D > 0 ? g->D : 1, AT_TK);
    g->ntiles = (g->q + AT_QT - 1) / AT_QT;
    g->split = g->ntiles <= AT_SPLIT_MAX_TILES;
    g->P = g->B * g->Hkv * g->ntiles;
    g->R = g->g * (g->q < AT_QT ? g->q : AT_QT);
    g->ustride = at_round_up(2 * g->R, AT_TK) + g->R * g->Dp;
    {
        const int ragged = p->layout == KVC_KV_RAGGED;
        const int64_t kd = p->k.strides[ragged ? 1 : 3], vd = p->v.strides[ragged ? 1 : 3];
        g->kdirect = p->k.dtype == KVC_F32 && kd == 1 && g->D % AT_TK == 0;
        g->vdirect = p->v.dtype == KVC_F32 && vd == 1 && g->D % AT_TK == 0;
        /* bf16 rows whose length splits into 32-element chunks keep the
         * in-place kernel's element order even when they must be converted
         * (strided rows), so results do not depend on the strides */
        g->perm = p->k.dtype == KVC_BF16 && g->D % (2 * AT_TK) == 0;
#ifdef AT_VEC
        g->bf16 = g->perm && kd == 1 && vd == 1;
#else
        g->bf16 = 0;
#endif
        g->kdirect |= g->bf16;
        g->vdirect |= g->bf16;
    }
    for (pair = 0; pair < g->P; pair++) {
        struct at_head h;
        const int64_t bh = pair / g->ntiles;
        at_head_get(p, bh / g->Hkv, bh % g->Hkv, &h);
        if (prefix) prefix[pair] = u;
        u += at_blocks(g, &h, pair % g->ntiles);
    }
    if (prefix) prefix[g->P] = u;
    g->U = u;
    g->prefix_bytes = kvc_align_up((size_t)(g->P + 1) * sizeof(int64_t));
    g->part_bytes = kvc_align_up((size_t)(g->U * g->ustride) * sizeof(float));
    /* query rows, converted K and V tiles, one zero row; weights, factors */
    g->thread_bytes = kvc_align_up((size_t)((g->R + 2 * AT_TK + 1) * g->Dp + g->R * (AT_TK + 1)) *
                                   sizeof(float)) +
                      kvc_align_up((size_t)g->R * sizeof(int64_t));
}

size_t kvc_attention_scratch_bytes(const struct kvc_attention_params *p)
{
    struct at_geom g;
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    at_geometry(p, &g, NULL);
    return KVC_ALIGN + g.prefix_bytes + g.part_bytes + (size_t)nt * g.thread_bytes;
}

#ifdef AT_VEC
KVC_INLINE void at_logits_bf16(const float *qr, const void *const *kp, const float *lc,
                               int64_t Dp, float scaling, float *x)
{
    at_vf a[AT_TK];
    int64_t c;
    int j;
    for (j = 0; j < AT_TK; j++) a[j] = (at_vf){0};
    for (c = 0; c < Dp; c += 2 * AT_TK) {
        at_vf qe, qo;
        memcpy(&qe, qr + c, sizeof qe);
        memcpy(&qo, qr + c + AT_TK, sizeof qo);
        for (j = 0; j < AT_TK; j++) {
            at_vu w;
            memcpy(&w, (const uint16_t *)kp[j] + c, sizeof w);
            a[j] += qe * AT_BF16_EVEN(w);
            a[j] += qo * AT_BF16_ODD(w);
        }
    }
    at_finish(a, lc, scaling, x);
}

KVC_INLINE void at_accumulate_bf16(float *const *acc, const void *const *vp, const float *x,
                                   const float *alpha, int64_t Dp, int NR)
{
    int64_t c = 0;
    int j, r, u;
    /* two 32-element chunks (four vectors) per pass */
    for (; c + 4 * AT_TK <= Dp; c += 4 * AT_TK) at_accumulate4(acc, vp, x, alpha, c, NR, 1);
    for (; c < Dp; c += 2 * AT_TK) {
        at_vf o[4][2];
        for (r = 0; r < NR; r++)
            for (u = 0; u < 2; u++) {
                memcpy(&o[r][u], acc[r] + c + u * AT_TK, sizeof o[r][u]);
                o[r][u] *= alpha[r];
            }
        for (j = 0; j < AT_TK; j++) {
            at_vu w;
            at_vf v[2];
            memcpy(&w, (const uint16_t *)vp[j] + c, sizeof w);
            v[0] = AT_BF16_EVEN(w);
            v[1] = AT_BF16_ODD(w);
            for (r = 0; r < NR; r++)
                for (u = 0; u < 2; u++) o[r][u] += x[r * AT_TK + j] * v[u];
        }
        for (r = 0; r < NR; r++)
            for (u = 0; u < 2; u++) memcpy(acc[r] + c + u * AT_TK, &o[r][u], sizeof o[r][u]);
    }
}
#endif

struct at_thread {
    float *qbuf; /* [R][Dp] query rows of the unit */
    float *xbuf; /* [R][AT_TK] logits, then weights, of a tile */
    float *kbuf; /* [AT_TK][Dp] converted keys of a tile */
    float *vbuf; /* [AT_TK][Dp] converted values */
    float *zero; /* [Dp] zeros: stands in for the slots past a short tile */
    float *abuf; /* [R] rescale factors of a tile */
    int64_t *lim; /* [R] last slot each row sees */
};

/* Partial of a unit: running max [R], running sum [R] (padded), rows [R][Dp]. */
#define AT_PART_M(part) (part)
#define AT_PART_S(g, part) ((part) + (g)->R)
#define AT_PART_ACC(g, part) ((part) + at_round_up(2 * (g)->R, AT_TK))

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
        for (d = 0; d < g->D; d++)
            dst[at_pos(g, d)] = kvc_bf16_to_f32(((const uint16_t *)src)[d * stride]);
    } else {
        at_row_f32(dst, src, dtype, g->D, stride);
    }
}

static void KVC_HOT at_unit(const struct kvc_attention_params *p, const struct at_geom *g,
                            int64_t pair, int64_t blk, float *part, const struct at_thread *w)
{
    const int64_t Dp = g->Dp, t = pair % g->ntiles, bh = pair / g->ntiles;
    const int64_t b = bh / g->Hkv, hk = bh % g->Hkv;
    const int64_t es = (int64_t)kvc_dtype_size((enum kvc_dtype)p->k.dtype);
    struct at_head h;
    int64_t i0, nq, end, j0, j1, jt, R, r;
    float *pm, *ps, *acc;

    at_head_get(p, b, hk, &h);
    end = at_tile(g, &h, t, &i0, &nq);
    R = g->g * nq;
    j0 = h.s0 + (g->split ? blk * AT_SB : 0);
    j1 = g->split && j0 + AT_SB < end ? j0 + AT_SB : end;
    pm = AT_PART_M(part);
    ps = AT_PART_S(g, part);
    acc = AT_PART_ACC(g, part);

    /* row r = gi * nq + i: query head hk * g + gi, query i0 + i */
    for (r = 0; r < R; r++) {
        const int64_t hq = hk * g->g + r / nq, qi = i0 + r % nq;
        const char *src = (const char *)p->q.data +
                          (b * p->q.strides[0] + hq * p->q.strides[1] + qi * p->q.strides[2]) * es;
        float *qr = w->qbuf + r * Dp;
        at_row_load(g, qr, src, p->q.dtype, p->q.strides[3]);
        w->lim[r] = h.n - g->q + qi;
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
            const char *ks = h.k + (jt + j) * h.ks * es, *vs = h.v + (jt + j) * h.vs * es;
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
                            ? (float)((const int32_t *)h.c)[(jt + j) * h.cs]
                            : ((const float *)h.c)[(jt + j) * h.cs];
            for (; j < AT_TK; j++) lc[j] = 1.0f;
            for (j = 0; j < AT_TK; j++) lc[j] = kvc_logf(lc[j]);
        } else {
            for (j = 0; j < AT_TK; j++) lc[j] = 0.0f;
        }
        /* Three passes over the rows, each made of independent per-row
         * work: a row's logits -> max -> exp -> output chain is long, and
         * interleaving rows hides its latency. */
        for (r = 0; r < R; r++) {
            const int64_t nvis = w->lim[r] - jt + 1;
            if (nvis <= 0) continue;
#ifdef AT_VEC
            if (g->bf16) at_logits_bf16(w->qbuf + r * Dp, kp, lc, Dp, p->scaling, w->xbuf + r * AT_TK);
            else
#endif
                at_logits(w->qbuf + r * Dp, kp, lc, Dp, p->scaling, w->xbuf + r * AT_TK);
        }
        for (r = 0; r < R; r++) {
            const int64_t nvis = w->lim[r] - jt + 1;
            struct kvc_softmax_state st;
            if (nvis <= 0) {
                /* leaves the row's output as it is in the grouped pass */
                memset(w->xbuf + r * AT_TK, 0, AT_TK * sizeof(float));
                w->abuf[r] = 1.0f;
                continue;
            }
            st.m = pm[r];
            st.s = ps[r];
            w->abuf[r] = at_softmax(w->xbuf + r * AT_TK, nvis < nk ? nvis : nk, &st);
            pm[r] = st.m;
            ps[r] = st.s;
        }
        for (r = 0; r < R; r += 4) {
            /* rows in groups of up to 4 share each V row load */
            float *accs[4];
            const int nr = R - r < 4 ? (int)(R - r) : 4;
            int i;
            for (i = 0; i < nr; i++) accs[i] = acc + (r + i) * Dp;
            switch (nr) {
#ifdef AT_VEC
#define AT_ACC_CASE(NR)                                                                        \
    case NR:                                                                                   \
        if (g->bf16)                                                                           \
            at_accumulate_bf16(accs, vp, w->xbuf + r * AT_TK, w->abuf + r, Dp, NR);            \
        else                                                                                   \
            at_accumulate(accs, vp, w->xbuf + r * AT_TK, w->abuf + r, Dp, NR);                 \
        break;
#else
#define AT_ACC_CASE(NR)                                                                        \
    case NR: at_accumulate(accs, vp, w->xbuf + r * AT_TK, w->abuf + r, Dp, NR); break;
#endif
                AT_ACC_CASE(1)
                AT_ACC_CASE(2)
                AT_ACC_CASE(3)
                default: AT_ACC_CASE(4)
#undef AT_ACC_CASE
            }
        }
    }
}

/* out rows of a pair <- log-sum-exp combine of its blocks, in block order. */
static void at_combine(const struct kvc_attention_params *p, const struct at_geom *g,
                       int64_t pair, const int64_t *prefix, const float *parts, float *o)
{
    const int64_t D = g->D, Dp = g->Dp, t = pair % g->ntiles, bh = pair / g->ntiles;
    const int64_t b = bh / g->Hkv, hk = bh % g->Hkv;
    const int64_t u0 = prefix[pair], nb = prefix[pair + 1] - u0;
    const int64_t es = (int64_t)kvc_dtype_size((enum kvc_dtype)p->out.dtype);
    const int64_t i0 = t * AT_QT, nq = g->q - i0 < AT_QT ? g->q - i0 : AT_QT;
    const int64_t R = g->g * nq;
    int64_t r, k, d;
    for (r = 0; r < R; r++) {
        const int64_t hq = hk * g->g + r / nq, qi = i0 + r % nq;
        char *dst = (char *)p->out.data +
                    (b * p->out.strides[0] + qi * p->out.strides[1] + hq * p->out.strides[2]) * es;
        const int64_t os = p->out.strides[3];
        float M = -INFINITY, L = 0.0f;
        for (k = 0; k < nb; k++) {
            float m = AT_PART_M(parts + (u0 + k) * g->ustride)[r];
            M = m > M ? m : M;
        }
        if (M == -INFINITY) {
            /* the row sees no slot */
            for (d = 0; d < D; d++) kvc_store_f32(dst, p->out.dtype, d * os, 0.0f);
            continue;
        }
        for (d = 0; d < Dp; d++) o[d] = 0.0f;
        for (k = 0; k < nb; k++) {
            const float *part = parts + (u0 + k) * g->ustride;
            const float wk = kvc_softmax_weight(AT_PART_M(part)[r], M);
            const float *a = AT_PART_ACC(g, part) + r * Dp;
            L += wk * AT_PART_S(g, part)[r];
            for (d = 0; d < Dp; d++) o[d] += wk * a[d];
        }
        for (d = 0; d < D; d++) kvc_store_f32(dst, p->out.dtype, d * os, o[at_pos(g, d)] / L);
    }
}

enum kvc_status kvc_attention(const struct kvc_attention_params *p)
{
    struct at_geom g;
    char *base;
    int64_t *prefix;
    float *parts;
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    int64_t d, n_out = 1;
    if (p->layout != KVC_KV_UNIFORM && p->layout != KVC_KV_RAGGED) return KVC_ERR_INVALID;
    for (d = 0; d < 4; d++) n_out *= p->q.shape[d];
    if (n_out == 0) return KVC_OK;
    if (p->num_kv_heads <= 0 || p->q.shape[1] % p->num_kv_heads != 0) return KVC_ERR_INVALID;
    if (p->scratch == NULL || p->scratch_bytes < kvc_attention_scratch_bytes(p))
        return KVC_ERR_NOMEM;
    base = (char *)(((uintptr_t)p->scratch + (KVC_ALIGN - 1)) & ~(uintptr_t)(KVC_ALIGN - 1));
    prefix = (int64_t *)base;
    at_geometry(p, &g, prefix);
    parts = (float *)(base + g.prefix_bytes);
    base += g.prefix_bytes + g.part_bytes;
    /* a parallel region costs more than a small decode step */
    if (g.U < 2) nt = 1;

#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        struct at_thread w;
        int64_t u;
        w.qbuf = (float *)(base + (size_t)KVC_THREAD_ID() * g.thread_bytes);
        w.kbuf = w.qbuf + g.R * g.Dp;
        w.vbuf = w.kbuf + AT_TK * g.Dp;
        w.zero = w.vbuf + AT_TK * g.Dp;
        w.xbuf = w.zero + g.Dp;
        w.abuf = w.xbuf + g.R * AT_TK;
        w.lim = (int64_t *)((char *)w.qbuf + kvc_align_up((size_t)((g.R + 2 * AT_TK + 1) * g.Dp +
                                                                   g.R * (AT_TK + 1)) *
                                                          sizeof(float)));
        /* pads past D stay zero: conversions write only the first D */
        memset(w.qbuf, 0, (size_t)((g.R + 2 * AT_TK + 1) * g.Dp) * sizeof(float));
#pragma omp for schedule(dynamic, 1)
        for (u = 0; u < g.U; u++) {
            /* the pair holding unit u: last prefix entry <= u */
            int64_t lo = 0, hi = g.P - 1;
            while (lo < hi) {
                int64_t mid = (lo + hi + 1) / 2;
                if (prefix[mid] <= u) lo = mid;
                else hi = mid - 1;
            }
            at_unit(p, &g, lo, u - prefix[lo], parts + u * g.ustride, &w);
        }
#pragma omp for schedule(static)
        for (u = 0; u < g.P; u++) at_combine(p, &g, u, prefix, parts, w.kbuf);
    }
    return KVC_OK;
}
