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

#ifdef AT_VEC
/* Output lanes [c, c + AT_TK) of at_accumulate for NR rows of fp32 V rows
 * (also the last vector of attention_packed.c's grouped sum, whose weights
 * x change per vector). */
KVC_INLINE void at_accumulate1(float *const *acc, const void *const *vp, const float *x,
                               const float *alpha, int64_t c, int NR)
{
    at_vf o[4];
    int j, r;
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
#endif

/* acc[r] <- alpha[r] * acc[r] + sum_j x[r][j] v_j over a tile of fp32 rows,
 * for NR (1..4, a constant after inlining) query rows at once, so each V
 * row is loaded once for the NR rows. Every output lane is one FMA chain
 * over the slots in order; 4 x NR chains are in flight. */
KVC_INLINE void at_accumulate(float *const *acc, const void *const *vp, const float *x,
                              const float *alpha, int64_t Dp, int NR)
{
    int64_t c = 0;
#ifdef AT_VEC
    for (; c + 4 * AT_TK <= Dp; c += 4 * AT_TK) at_accumulate4(acc, vp, x, alpha, c, NR, 0);
    for (; c < Dp; c += AT_TK) at_accumulate1(acc, vp, x, alpha, c, NR);
#else
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

/* Online-softmax pass of a tile of nk slots from jt over R rows: row r's
 * logits x[r] (AT_TK floats), running max pm[r] and sum ps[r], last
 * visible slot lim[r]; alpha[r] <- the factor for its running output. A
 * row that sees none of the tile's slots gets zero weights and factor 1,
 * which leaves its output as it is in the grouped accumulation. */
KVC_INLINE void at_softmax_rows(float *x, float *alpha, const int64_t *lim, float *pm, float *ps, int64_t R,
                                int64_t jt, int64_t nk)
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
        alpha[r] = at_softmax(x + r * AT_TK, nvis < nk ? nvis : nk, &st);
        pm[r] = st.m;
        ps[r] = st.s;
    }
}

#endif /* KVC_ATTENTION_TILE_H */
