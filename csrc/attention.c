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
#include "kvc_math.h"

#define AT_TK KVC_LANES /* slots per tile: one vector of logits per row */
#define AT_SB 256       /* slots per split-K block, a multiple of AT_TK */
#define AT_QT 16        /* queries per unit */
/* Split into blocks only while the chunk has at most this many query tiles:
 * decode and short chunks need the split for parallelism, longer chunks have
 * tiles enough, and their partials would grow as q * n. */
#define AT_SPLIT_MAX_TILES 2

#if defined(__GNUC__) && !defined(__CUDACC__)
#define AT_VEC 1
typedef float at_vf __attribute__((vector_size(AT_TK * sizeof(float))));
#if defined(__clang__) || __GNUC__ >= 12
#define AT_TREE 1
#endif
#endif

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
typedef uint32_t at_vu __attribute__((vector_size(AT_TK * sizeof(uint32_t))));
typedef int32_t at_vi __attribute__((vector_size(AT_TK * sizeof(int32_t))));
typedef uint16_t at_vh __attribute__((vector_size(AT_TK * sizeof(uint16_t))));

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

#ifdef AT_TREE
#define AT_SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
/* Lane j of the result = sum of the lanes of a[j], each summed as
 * kvc_lanes_sum does (l + 8, + 4, + 2, + 1), but for 16 rows at once with
 * shuffles across rows instead of 16 horizontal sums. Pairs are reduced as
 * soon as they exist so that few vectors are live at a time. */
KVC_INLINE void at_sum16(const at_vf *a, at_vf *out)
{
    at_vf b[8], c[4], e[2];
    int j;
    for (j = 0; j < 8; j++)
        b[j] = AT_SHUF(a[2 * j], a[2 * j + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               AT_SHUF(a[2 * j], a[2 * j + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (j = 0; j < 4; j++)
        c[j] = AT_SHUF(b[2 * j], b[2 * j + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               AT_SHUF(b[2 * j], b[2 * j + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (j = 0; j < 2; j++)
        e[j] = AT_SHUF(c[2 * j], c[2 * j + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
               AT_SHUF(c[2 * j], c[2 * j + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    *out = AT_SHUF(e[0], e[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           AT_SHUF(e[0], e[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
#undef AT_SHUF
#endif

/* Finishes the logits of one row: lane j of the per-slot partial sums a[j]
 * summed by the kvc_lanes_sum tree, scaled, plus the log-count bias. */
#ifdef AT_VEC
KVC_INLINE void at_finish(const at_vf *a, const float *lc, float scaling, float *x)
{
    at_vf s, l;
#ifdef AT_TREE
    at_sum16(a, &s);
#else
    int j;
    for (j = 0; j < AT_TK; j++) {
        float t[AT_TK];
        memcpy(t, &a[j], sizeof t);
        s[j] = kvc_lanes_sum(t);
    }
#endif
    memcpy(&l, lc, sizeof l);
    s = s * scaling + l;
    memcpy(x, &s, sizeof s);
}
#endif

/* Logits x[j] = scaling * q . k_j + lc[j] of one query row against a tile
 * of AT_TK fp32 slot rows (Dp floats, Dp a multiple of AT_TK). Per slot the
 * products are summed in AT_TK lanes along d, then the lanes by the
 * kvc_lanes_sum tree: the same order with or without vector extensions. */
KVC_INLINE void at_logits(const float *qr, const void *const *kp, const float *lc, int64_t Dp,
                          float scaling, float *x)
{
#ifdef AT_VEC
    at_vf a[AT_TK];
    int64_t c;
    int j;
    for (j = 0; j < AT_TK; j++) a[j] = (at_vf){0};
    for (c = 0; c < Dp; c += AT_TK) {
        at_vf qv;
        memcpy(&qv, qr + c, sizeof qv);
        for (j = 0; j < AT_TK; j++) {
            at_vf kv;
            memcpy(&kv, (const float *)kp[j] + c, sizeof kv);
            a[j] += qv * kv;
        }
    }
    at_finish(a, lc, scaling, x);
#else
    int j;
    for (j = 0; j < AT_TK; j++) x[j] = kvc_dot_f32(qr, (const float *)kp[j], Dp) * scaling + lc[j];
#endif
}

#ifdef AT_VEC
/* bf16 rows read in place (g->bf16): a 64-byte load holds 32 elements; as
 * 16 32-bit lanes, `<< 16` gives the even elements as fp32 and masking the
 * low half the odd ones, one instruction each instead of a widening
 * conversion. Query and output rows are kept in the same order: each chunk
 * of 32 stores its 16 even elements, then its 16 odd ones. */
#define AT_BF16_EVEN(w) ((at_vf)((w) << 16))
#define AT_BF16_ODD(w) ((at_vf)((w) & 0xffff0000u))

/* Output lanes [c, c + 4 * AT_TK) of at_accumulate for NR rows: V rows as
 * fp32, or (bf16, a constant after inlining) two in-place bf16 chunks. */
KVC_INLINE void at_accumulate4(float *const *acc, const void *const *vp, const float *x,
                               const float *alpha, int64_t c, int NR, int bf16)
{
    at_vf o[4][4];
    int j, r, u;
    for (r = 0; r < NR; r++)
        for (u = 0; u < 4; u++) {
            memcpy(&o[r][u], acc[r] + c + u * AT_TK, sizeof o[r][u]);
            o[r][u] *= alpha[r];
        }
    for (j = 0; j < AT_TK; j++) {
        at_vf v[4];
        if (bf16) {
            at_vu w[2];
            memcpy(&w[0], (const uint16_t *)vp[j] + c, sizeof w[0]);
            memcpy(&w[1], (const uint16_t *)vp[j] + c + 2 * AT_TK, sizeof w[1]);
            v[0] = AT_BF16_EVEN(w[0]);
            v[1] = AT_BF16_ODD(w[0]);
            v[2] = AT_BF16_EVEN(w[1]);
            v[3] = AT_BF16_ODD(w[1]);
        } else {
            for (u = 0; u < 4; u++) memcpy(&v[u], (const float *)vp[j] + c + u * AT_TK, sizeof v[u]);
        }
        for (r = 0; r < NR; r++)
            for (u = 0; u < 4; u++) o[r][u] += x[r * AT_TK + j] * v[u];
    }
    for (r = 0; r < NR; r++)
        for (u = 0; u < 4; u++) memcpy(acc[r] + c + u * AT_TK, &o[r][u], sizeof o[r][u]);
}
#endif

/* acc[r] <- alpha[r] * acc[r] + sum_j x[r][j] v_j over a tile of fp32 rows,
 * for NR (1..4, a constant after inlining) query rows at once, so each V
 * row is loaded once for the NR rows. Every output lane is one FMA chain
 * over the slots in order; 4 x NR chains are in flight. */
KVC_INLINE void at_accumulate(float *const *acc, const void *const *vp, const float *x,
                              const float *alpha, int64_t Dp, int NR)
{
    int64_t c = 0;
    int j, r;
#ifdef AT_VEC
    for (; c + 4 * AT_TK <= Dp; c += 4 * AT_TK) at_accumulate4(acc, vp, x, alpha, c, NR, 0);
    for (; c < Dp; c += AT_TK) {
        at_vf o[4];
        for (r = 0; r < NR; r++) {
            memcpy(&o[r], acc[r] + c, sizeof o[r]);
            o[r] *= alpha[r];
        }
        for (j = 0; j < AT_TK; j++) {
            at_vf v;
            memcpy(&v, (const float *)vp[j] + c, sizeof v);
            for (r = 0; r < NR; r++) o[r] += x[r * AT_TK + j] * v;
        }
        for (r = 0; r < NR; r++) memcpy(acc[r] + c, &o[r], sizeof o[r]);
    }
#else
    for (r = 0; r < NR; r++)
        for (c = 0; c < Dp; c++) {
            float o = acc[r][c] * alpha[r];
            for (j = 0; j < AT_TK; j++) o += x[r * AT_TK + j] * ((const float *)vp[j])[c];
            acc[r][c] = o;
        }
#endif
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

#ifdef AT_TREE
#define AT_SHUF1(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)

/* Sum of the lanes in the kvc_lanes_sum order, as shuffles (GCC leaves
 * the array form as 15 scalar adds). */
KVC_INLINE float at_hsum(const at_vf *x)
{
    at_vf v = *x;
    v += AT_SHUF1(v, 8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15);
    v += AT_SHUF1(v, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7);
    v += AT_SHUF1(v, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3);
    return v[0] + v[1];
}

/* A macro: vector arguments or returns would change the psABI of the
 * baseline-ISA copy. */
#define AT_VMAX(a, b) ((at_vf)(((at_vi)(a) & ((a) > (b))) | ((at_vi)(b) & ~((a) > (b)))))

/* Masks lanes >= nvis to -inf (in place) and returns the largest lane. */
KVC_INLINE float at_mask_max(at_vf *x, int64_t nvis)
{
    const at_vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const at_vi keep = lane < (int32_t)nvis;
    const at_vf ninf = (at_vf){0} - INFINITY;
    at_vf v = (at_vf)(((at_vi)*x & keep) | ((at_vi)ninf & ~keep));
    *x = v;
    {
        at_vf w = AT_SHUF1(v, 8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15);
        v = AT_VMAX(v, w);
        w = AT_SHUF1(v, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7);
        v = AT_VMAX(v, w);
        w = AT_SHUF1(v, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3);
        v = AT_VMAX(v, w);
    }
    return v[0] > v[1] ? v[0] : v[1];
}
#undef AT_SHUF1
#endif

/* Online-softmax step of one row over a tile whose logits are x (first
 * nvis visible): x <- the weights exp(x - new max); returns the factor for
 * the row's running output. */
KVC_INLINE float at_softmax(float *x, int64_t nvis, struct kvc_softmax_state *st)
{
    float alpha;
    int j;
#ifdef AT_TREE
    at_vf v;
    memcpy(&v, x, sizeof v);
    alpha = kvc_softmax_rescale(st, at_mask_max(&v, nvis));
    memcpy(x, &v, sizeof v);
    /* masked slots: exp(-inf) = 0, and their V rows are finite */
    for (j = 0; j < AT_TK; j++) x[j] = kvc_expf(x[j] - st->m);
    memcpy(&v, x, sizeof v);
    st->s += at_hsum(&v);
#else
    float t[AT_TK], bm = -INFINITY;
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
