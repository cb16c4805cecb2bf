/*
 * score_global.c - exact global (column-mean) attention scores (CPU).
 *
 * One pass of dot products, not two: a chunk of queries gets its full logit
 * rows (chunk x T floats, sized to stay in L2), each row is softmaxed in place
 * and added into a column sum. A two-pass scheme (row log-sum-exp, then
 * column sums recomputing every dot product) needs no row buffer but does
 * twice the O(T^2 D) work. Column sums of a head are kept per fixed group of
 * queries so that long sequences spread over threads: every row is added into
 * its group in row order and the groups are added in group order, an order
 * fixed by the shapes alone (bit-identical for any thread count). Keys are
 * converted once per (batch, kv head) into fp32 blocks transposed for the
 * micro-kernel, shared by the g query heads and all query groups.
 */
#include <math.h>
#include <string.h>

#include "kvc_math.h"
#include "score_global.h"

#define GS_KBW 32 /* keys per transposed block: [D][GS_KBW] floats */
#define GS_QB 8   /* queries per chunk step (every micro-kernel divides it) */
#define GS_QC_MAX 64
/* Logit rows per thread are capped to this many floats (512 KiB) so that
 * the row passes after the dot products hit L2. */
#define GS_LOGIT_BUDGET ((size_t)1 << 17)
/* At most this many query groups per head: partial column sums cost
 * groups x T floats per head. */
#define GS_GROUPS 16
/* (batch, kv head) pairs are processed in waves whose converted keys and
 * partial sums fit this budget; a wave holds at least one pair. Waves only
 * schedule work, the results do not depend on them (-D to test). */
#ifndef GS_WAVE_BYTES
#define GS_WAVE_BYTES ((size_t)64 << 20)
#endif
#define GS_RB 512 /* keys per reduction unit */

struct gs_geom {
    int64_t B, Hq, Hkv, g, Tq, T, D;
    int64_t nkb, rs;         /* key blocks; logit row stride nkb * GS_KBW */
    int64_t qc, ngroups;     /* queries per chunk; groups per head, the most a row has */
    int64_t pairs, wave, nrb;
    int isa;                 /* enum gs_isa of the group kernel */
    size_t kt_bytes, part_bytes, pair_bytes;
    size_t qbuf_bytes, ktmp_bytes, logits_bytes, thread_bytes;
};

static int64_t gs_round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

static void gs_geometry(const struct kvc_global_scores_params *p, struct gs_geom *g)
{
    int64_t cap, nchunks, cpg;
    g->B = p->q.shape[0];
    g->Hq = p->q.shape[1];
    g->Tq = p->q.shape[2];
    g->D = p->q.shape[3];
    g->Hkv = p->k.shape[1];
    g->T = p->k.shape[2];
    g->g = g->Hkv > 0 ? g->Hq / g->Hkv : 1;
    if (g->g < 1) g->g = 1;
    g->nkb = (g->T + GS_KBW - 1) / GS_KBW;
    g->rs = g->nkb * GS_KBW;
    cap = (int64_t)(GS_LOGIT_BUDGET / (size_t)(g->rs > 0 ? g->rs : 1));
    cap = cap / GS_QB * GS_QB;
    if (cap > GS_QC_MAX) cap = GS_QC_MAX;
    if (cap < GS_QB) cap = GS_QB;
    g->qc = cap < gs_round_up(g->Tq > 0 ? g->Tq : 1, GS_QB) ? cap
                                                            : gs_round_up(g->Tq > 0 ? g->Tq : 1, GS_QB);
    /* groups are whole multiples of GS_QB queries, laid out per row from its
     * first real query (gs_groups); a row of n queries has at most
     * min(GS_GROUPS, ceil(n / GS_QB)) of them */
    nchunks = (g->Tq + GS_QB - 1) / GS_QB;
    cpg = nchunks < GS_GROUPS ? nchunks : GS_GROUPS;
    g->ngroups = cpg > 0 ? cpg : 1;
    g->pairs = g->B * g->Hkv;
    g->nrb = (g->T + GS_RB - 1) / GS_RB;
    g->kt_bytes = kvc_align_up((size_t)(g->rs * g->D) * sizeof(float));
    g->part_bytes = kvc_align_up((size_t)(g->g * g->ngroups * g->T) * sizeof(float));
    g->pair_bytes = g->kt_bytes + g->part_bytes;
    g->wave = g->pair_bytes > 0 ? (int64_t)(GS_WAVE_BYTES / g->pair_bytes) : g->pairs;
    if (g->wave > g->pairs) g->wave = g->pairs;
    if (g->wave < 1) g->wave = 1;
    g->qbuf_bytes = kvc_align_up((size_t)(g->qc * g->D) * sizeof(float));
    g->ktmp_bytes = kvc_align_up((size_t)(GS_KBW * g->D) * sizeof(float));
    g->logits_bytes = kvc_align_up((size_t)(g->qc * g->rs) * sizeof(float));
    g->thread_bytes = g->qbuf_bytes + g->ktmp_bytes + g->logits_bytes;
    g->isa = 0;
}

size_t kvc_global_scores_scratch_bytes(const struct kvc_global_scores_params *p)
{
    struct gs_geom g;
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    gs_geometry(p, &g);
    return KVC_ALIGN + (size_t)g.wave * g.pair_bytes + (size_t)nt * g.thread_bytes;
}

KVC_INLINE int64_t gs_pos(const struct kvc_global_scores_params *p, const struct gs_geom *g,
                          int64_t i)
{
    return p->q_pos ? p->q_pos[i * p->q_pos_stride] : g->T - g->Tq + i;
}

/* First query index in [lo, hi) whose position is >= x (hi if none). */
static int64_t gs_first_at(const struct kvc_global_scores_params *p, const struct gs_geom *g,
                           int64_t lo, int64_t hi, int64_t x);

/* Row b's query groups: its first real query f (position >= kv_start), the
 * group size qg (whole multiples of GS_QB) and count ng, all from its own
 * Tq - f real queries: only they (never the padding, the chunk size or the
 * thread count) shape the summation order, so a left-padded row sums as it
 * does alone. */
static void gs_groups(const struct kvc_global_scores_params *p, const struct gs_geom *g, int64_t b,
                      int64_t *f, int64_t *qg, int64_t *ng)
{
    const int64_t s = p->kv_start ? p->kv_start[b * p->kv_start_stride] : 0;
    int64_t n, chunks, cpg;
    *f = gs_first_at(p, g, 0, g->Tq, s);
    n = g->Tq - *f;
    chunks = (n + GS_QB - 1) / GS_QB;
    cpg = (chunks + GS_GROUPS - 1) / GS_GROUPS;
    if (cpg < 1) cpg = 1;
    *qg = cpg * GS_QB;
    *ng = (n + *qg - 1) / *qg;
}

/* First query index in [lo, hi) whose position is >= x (hi if none). */
static int64_t gs_first_at(const struct kvc_global_scores_params *p, const struct gs_geom *g,
                           int64_t lo, int64_t hi, int64_t x)
{
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (gs_pos(p, g, mid) < x) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* ------------------------------------------------------------------------ */
/* micro-kernels                                                            */
/* ------------------------------------------------------------------------ */

/*
 * The hot routine (gs_group) is built once per ISA with its own vector
 * width, not through KVC_HOT's target_clones: GCC lowers a generic vector
 * wider than the target's registers through general registers (10x slower),
 * so one source cannot serve all clones. Variants: AVX-512 (16-float
 * vectors), AVX2+FMA (8), baseline (4). With FMA on both, the two wide variants give the same bits: every logit
 * is one dot product summed over d in order whatever the tile, and the
 * softmax sums use 16 lanes in every variant.
 */
#ifdef KVC_MULTIVERSION /* kvc.h */
#define GS_MULTI 1
#endif

enum gs_isa { GS_ISA_BASE = 0, GS_ISA_AVX2 = 1, GS_ISA_AVX512 = 2 };

#if defined(__GNUC__) && !defined(__CUDACC__)
#define GS_VEC 1
typedef float gs_v16 __attribute__((vector_size(16 * sizeof(float))));
typedef float gs_v8 __attribute__((vector_size(8 * sizeof(float))));
typedef float gs_v4 __attribute__((vector_size(4 * sizeof(float))));
typedef uint32_t gs_u16 __attribute__((vector_size(16 * sizeof(uint32_t))));
typedef uint32_t gs_u8 __attribute__((vector_size(8 * sizeof(uint32_t))));
typedef uint32_t gs_u4 __attribute__((vector_size(4 * sizeof(uint32_t))));

/* Logits of QB query rows (q, D floats each) against NV * VW keys of a
 * transposed block (kt, row stride GS_KBW): lg[i * rs + l] = scaling *
 * q_i.k_l. */
#define GS_TILE(NAME, QB, NV, VT, VW)                                                    \
    KVC_INLINE void NAME(const float *q, const float *kt, float *lg, int64_t D, int64_t rs, \
                         float scaling)                                                  \
    {                                                                                    \
        VT a[QB][NV];                                                                    \
        int64_t d;                                                                       \
        int i, v;                                                                        \
        for (i = 0; i < (QB); i++)                                                       \
            for (v = 0; v < (NV); v++) a[i][v] = (VT){0};                                \
        for (d = 0; d < D; d++) {                                                        \
            VT kv[NV];                                                                   \
            for (v = 0; v < (NV); v++)                                                   \
                memcpy(&kv[v], kt + d * GS_KBW + v * (VW), sizeof(VT));                  \
            for (i = 0; i < (QB); i++) {                                                 \
                const float qv = q[i * D + d];                                           \
                for (v = 0; v < (NV); v++) a[i][v] += qv * kv[v];                        \
            }                                                                            \
        }                                                                                \
        for (i = 0; i < (QB); i++)                                                       \
            for (v = 0; v < (NV); v++) {                                                 \
                VT r = a[i][v] * scaling;                                                \
                memcpy(lg + i * rs + v * (VW), &r, sizeof r);                            \
            }                                                                            \
    }

/* Row max and in-place exp(x - m) with its sum, as kvc_max_f32 and
 * kvc_exp_shift_sum (16 lanes, same lane order, kvc_expf's polynomial) but
 * in explicit vectors: GCC does not vectorise kvc_expf's selects without
 * AVX-512 masks under -ftrapping-math. Selects here are bit masks. */
#define GS_BLEND(U, mask, a, b) ((((U)(a)) & (mask)) | (((U)(b)) & ~(mask)))
#define GS_ROW_OPS(SUF, VT, U, VW)                                                       \
    KVC_INLINE void gs_exp_##SUF(VT *xp) /* in place: vector arguments warn (psabi) */   \
    {                                                                                    \
        const VT x = *xp, zero = {0};                                                    \
        const VT lo = zero - 87.0f, hi = zero + 88.0f;                                   \
        const U below = (U)(x < lo), above = (U)(x > hi);                                \
        const VT xc = (VT)GS_BLEND(U, below, lo, GS_BLEND(U, above, hi, x));             \
        const VT t = xc * 1.44269504088896341f + 12582912.0f;                            \
        const VT n = t - 12582912.0f;                                                    \
        const U ni = (U)t - 0x4b400000u;                                                 \
        VT r = xc - n * 0.693145751953125f;                                              \
        VT p;                                                                            \
        r = r - n * 1.428606765330187045e-06f;                                           \
        p = zero + 1.9841269841269841e-4f;                                               \
        p = p * r + 1.3888888888888889e-3f;                                              \
        p = p * r + 8.3333333333333333e-3f;                                              \
        p = p * r + 4.1666666666666667e-2f;                                              \
        p = p * r + 1.6666666666666667e-1f;                                              \
        p = p * r + 0.5f;                                                                \
        p = p * r + 1.0f;                                                                \
        p = p * r + 1.0f;                                                                \
        p = p * (VT)((ni + 127u) << 23);                                                 \
        *xp = (VT)GS_BLEND(U, below, zero, p);                                           \
    }                                                                                    \
    KVC_INLINE float gs_max_##SUF(const float *x, int64_t n)                             \
    {                                                                                    \
        float t[KVC_LANES], r = -INFINITY;                                               \
        VT m[KVC_LANES / (VW)];                                                          \
        int64_t i = 0;                                                                   \
        int l, v;                                                                        \
        for (l = 0; l < KVC_LANES; l++) t[l] = -INFINITY;                                \
        memcpy(m, t, sizeof m);                                                          \
        for (; i + KVC_LANES <= n; i += KVC_LANES)                                       \
            for (v = 0; v < KVC_LANES / (VW); v++) {                                     \
                VT xv;                                                                   \
                U gt;                                                                    \
                memcpy(&xv, x + i + v * (VW), sizeof xv);                                \
                gt = (U)(xv > m[v]);                                                     \
                m[v] = (VT)GS_BLEND(U, gt, xv, m[v]);                                    \
            }                                                                            \
        memcpy(t, m, sizeof m);                                                          \
        for (l = 0; i < n; i++, l++) t[l] = x[i] > t[l] ? x[i] : t[l];                   \
        for (l = 0; l < KVC_LANES; l++) r = t[l] > r ? t[l] : r;                         \
        return r;                                                                        \
    }                                                                                    \
    KVC_INLINE float gs_expsum_##SUF(float *x, int64_t n, float mx)                      \
    {                                                                                    \
        float t[KVC_LANES];                                                              \
        VT acc[KVC_LANES / (VW)];                                                        \
        int64_t i = 0;                                                                   \
        int l, v;                                                                        \
        for (v = 0; v < KVC_LANES / (VW); v++) acc[v] = (VT){0};                         \
        for (; i + KVC_LANES <= n; i += KVC_LANES)                                       \
            for (v = 0; v < KVC_LANES / (VW); v++) {                                     \
                VT xv;                                                                   \
                memcpy(&xv, x + i + v * (VW), sizeof xv);                                \
                xv -= mx;                                                                \
                gs_exp_##SUF(&xv);                                                       \
                memcpy(x + i + v * (VW), &xv, sizeof xv);                                \
                acc[v] += xv;                                                            \
            }                                                                            \
        memcpy(t, acc, sizeof acc);                                                      \
        for (l = 0; i < n; i++, l++) {                                                   \
            const float e = kvc_expf(x[i] - mx);                                         \
            x[i] = e;                                                                    \
            t[l] += e;                                                                   \
        }                                                                                \
        return kvc_lanes_sum(t);                                                         \
    }

/* AVX-512: 8 queries x 32 keys, 16 zmm accumulators (of 32 registers).
 * AVX2: 4 x 16, 8 ymm accumulators (of 16). Baseline: 4 x 8, 8 xmm. */
GS_TILE(gs_tile_avx512, 8, 2, gs_v16, 16)
GS_TILE(gs_tile_avx2, 4, 2, gs_v8, 8)
GS_TILE(gs_tile_base, 4, 2, gs_v4, 4)
GS_ROW_OPS(avx512, gs_v16, gs_u16, 16)
GS_ROW_OPS(avx2, gs_v8, gs_u8, 8)
GS_ROW_OPS(base, gs_v4, gs_u4, 4)
#define GS_TILE_W(isa) ((isa) == GS_ISA_AVX512 ? 32 : (isa) == GS_ISA_AVX2 ? 16 : 8)
#define GS_TILE_Q(isa) ((isa) == GS_ISA_AVX512 ? 8 : 4)
#else
/* Plain C for other compilers: one 4 x 8 tile, kvc_math's row helpers. */
KVC_INLINE void gs_tile_base(const float *q, const float *kt, float *lg, int64_t D, int64_t rs,
                             float scaling)
{
    float a[4][8];
    int64_t d;
    int i, l;
    for (i = 0; i < 4; i++)
        for (l = 0; l < 8; l++) a[i][l] = 0.0f;
    for (d = 0; d < D; d++)
        for (i = 0; i < 4; i++) {
            const float qv = q[i * D + d];
            for (l = 0; l < 8; l++) a[i][l] += qv * kt[d * GS_KBW + l];
        }
    for (i = 0; i < 4; i++)
        for (l = 0; l < 8; l++) lg[i * rs + l] = a[i][l] * scaling;
}
#define gs_max_base kvc_max_f32
#define gs_expsum_base kvc_exp_shift_sum
#define GS_TILE_W(isa) 8
#define GS_TILE_Q(isa) 4
#endif

/* The variant this build and CPU run. -DGS_ISA=0/1/2 forces one, and so
 * does a single-clone build (KVC_ISA, kvc.h), to test them all on one
 * machine; it must be supported by the CPU. */
static enum gs_isa gs_isa(void)
{
#if defined(GS_ISA)
    return (enum gs_isa)GS_ISA;
#elif defined(GS_MULTI) && defined(KVC_ISA)
    return KVC_ISA == 4 ? GS_ISA_AVX512 : KVC_ISA == 3 ? GS_ISA_AVX2 : GS_ISA_BASE;
#elif defined(GS_MULTI)
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) return GS_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return GS_ISA_AVX2;
    return GS_ISA_BASE;
#elif defined(GS_VEC) && defined(__AVX512F__) && defined(__FMA__)
    return GS_ISA_AVX512;
#elif defined(GS_VEC) && defined(__AVX2__) && defined(__FMA__)
    return GS_ISA_AVX2;
#else
    return GS_ISA_BASE;
#endif
}

/* ------------------------------------------------------------------------ */
/* phases                                                                   */
/* ------------------------------------------------------------------------ */

struct gs_thread {
    float *qbuf, *ktmp, *logits;
};

/* Keys [kb * GS_KBW, +GS_KBW) of (b, hk) -> fp32 block [D][GS_KBW], zero
 * past T. */
static void KVC_HOT gs_convert_keys(const struct kvc_global_scores_params *p,
                                    const struct gs_geom *g, int64_t b, int64_t hk, int64_t kb,
                                    float *kt, float *ktmp)
{
    const int64_t D = g->D, j0 = kb * GS_KBW;
    const int64_t nk = g->T - j0 < GS_KBW ? g->T - j0 : GS_KBW;
    const size_t es = kvc_dtype_size((enum kvc_dtype)p->k.dtype);
    const char *kp = (const char *)p->k.data +
                     (b * p->k.strides[0] + hk * p->k.strides[1] + j0 * p->k.strides[2]) *
                         (int64_t)es;
    float *dst = kt + j0 * D;
    int64_t l, d;
    for (l = 0; l < nk; l++)
        kvc_row_to_f32(ktmp + l * D, kp + l * p->k.strides[2] * (int64_t)es, p->k.dtype, D,
                       p->k.strides[3]);
    for (; l < GS_KBW; l++) memset(ktmp + l * D, 0, (size_t)D * sizeof(float));
    for (d = 0; d < D; d++)
        for (l = 0; l < GS_KBW; l++) dst[d * GS_KBW + l] = ktmp[l * D + d];
}

/* Query group c of query head hh of pair (b, hk): part[s .. last position]
 * <- sum over the group's valid queries, in order, of their attention rows.
 * Inlined into one function per ISA; `isa` is a constant there. */
KVC_INLINE void gs_group_impl(const struct kvc_global_scores_params *p,
                              const struct gs_geom *g, int64_t b, int64_t hk, int64_t hh,
                              int64_t c, const float *kt, float *part,
                              const struct gs_thread *w, const enum gs_isa isa)
{
    const int64_t D = g->D, rs = g->rs, qc = g->qc;
    const int64_t h = hk * g->g + hh;
    const int64_t s = p->kv_start ? p->kv_start[b * p->kv_start_stride] : 0;
    const size_t es = kvc_dtype_size((enum kvc_dtype)p->q.dtype);
    const char *qh = (const char *)p->q.data +
                     (b * p->q.strides[0] + h * p->q.strides[1]) * (int64_t)es;
    const int tq = GS_TILE_Q(isa), tw = GS_TILE_W(isa);
    int64_t f, qg, ng, i0, i1, last, c0, j;
    gs_groups(p, g, b, &f, &qg, &ng);
    if (c >= ng) return; /* the row has fewer groups: the reduction reads nothing here */
    i0 = f + c * qg;
    i1 = i0 + qg < g->Tq ? i0 + qg : g->Tq;
    last = gs_pos(p, g, i1 - 1);
    if (last < s) return; /* all padding: the reduction reads nothing here */
    for (j = s; j <= last; j++) part[j] = 0.0f;

    for (c0 = gs_first_at(p, g, i0, i1, s); c0 < i1; c0 += qc) {
        const int64_t nq = i1 - c0 < qc ? i1 - c0 : qc;
        const int64_t nqp = gs_round_up(nq, GS_QB);
        int64_t pos[GS_QC_MAX];
        int64_t i, kb, qb;
        for (i = 0; i < nq; i++) {
            pos[i] = gs_pos(p, g, c0 + i);
            kvc_row_to_f32(w->qbuf + i * D, qh + (c0 + i) * p->q.strides[2] * (int64_t)es,
                           p->q.dtype, D, p->q.strides[3]);
        }
        for (; i < nqp; i++) {
            pos[i] = pos[nq - 1];
            memset(w->qbuf + i * D, 0, (size_t)D * sizeof(float));
        }

        for (kb = s / GS_KBW; kb * GS_KBW <= pos[nq - 1]; kb++) {
            const float *ktb = kt + kb * GS_KBW * D;
            float *lg = w->logits + kb * GS_KBW;
            for (qb = 0; qb < nqp; qb += GS_QB) {
                int r, off;
                /* causal: a block of queries that all precede the keys */
                if (pos[qb + GS_QB - 1] < kb * GS_KBW) continue;
                for (r = 0; r < GS_QB; r += tq)
                    for (off = 0; off < GS_KBW; off += tw) {
                        const float *qr = w->qbuf + (qb + r) * D;
                        float *dst = lg + (qb + r) * rs + off;
#ifdef GS_VEC
                        if (isa == GS_ISA_AVX512)
                            gs_tile_avx512(qr, ktb + off, dst, D, rs, p->scaling);
                        else if (isa == GS_ISA_AVX2)
                            gs_tile_avx2(qr, ktb + off, dst, D, rs, p->scaling);
                        else
#endif
                            gs_tile_base(qr, ktb + off, dst, D, rs, p->scaling);
                    }
            }
        }

        for (i = 0; i < nq; i++) {
            const int64_t n = pos[i] - s + 1;
            float *row = w->logits + i * rs + s;
            float *dst = part + s;
            float m, inv;
#ifdef GS_VEC
            if (isa == GS_ISA_AVX512) {
                m = gs_max_avx512(row, n);
                inv = 1.0f / gs_expsum_avx512(row, n, m);
            } else if (isa == GS_ISA_AVX2) {
                m = gs_max_avx2(row, n);
                inv = 1.0f / gs_expsum_avx2(row, n, m);
            } else
#endif
            {
                m = gs_max_base(row, n);
                inv = 1.0f / gs_expsum_base(row, n, m);
            }
            for (j = 0; j < n; j++) dst[j] += row[j] * inv;
        }
    }
}

#define GS_GROUP_ARGS                                                                    \
    const struct kvc_global_scores_params *p, const struct gs_geom *g, int64_t b,        \
        int64_t hk, int64_t hh, int64_t c, const float *kt, float *part,                 \
        const struct gs_thread *w
#ifdef GS_MULTI
__attribute__((target("avx512f,fma"))) static void gs_group_avx512(GS_GROUP_ARGS)
{
    gs_group_impl(p, g, b, hk, hh, c, kt, part, w, GS_ISA_AVX512);
}

__attribute__((target("avx2,fma"))) static void gs_group_avx2(GS_GROUP_ARGS)
{
    gs_group_impl(p, g, b, hk, hh, c, kt, part, w, GS_ISA_AVX2);
}
#endif

static void gs_group(GS_GROUP_ARGS)
{
#ifdef GS_MULTI
    if (g->isa == GS_ISA_AVX512) {
        gs_group_avx512(p, g, b, hk, hh, c, kt, part, w);
        return;
    }
    if (g->isa == GS_ISA_AVX2) {
        gs_group_avx2(p, g, b, hk, hh, c, kt, part, w);
        return;
    }
    gs_group_impl(p, g, b, hk, hh, c, kt, part, w, GS_ISA_BASE);
#else
    gs_group_impl(p, g, b, hk, hh, c, kt, part, w, (enum gs_isa)g->isa);
#endif
}

/* Keys [j0, j1) of pair (b, hk): add the group sums in group order, reduce
 * the query heads, divide by the number of queries that see each key. */
static void KVC_HOT gs_reduce(const struct kvc_global_scores_params *p, const struct gs_geom *g,
                              int64_t b, int64_t hk, int64_t j0, int64_t j1, const float *part)
{
    const int64_t T = g->T, nb = g->ngroups;
    const int64_t s = p->kv_start ? p->kv_start[b * p->kv_start_stride] : 0;
    const int64_t lo = j0 > s ? j0 : s;
    float *out = (float *)p->out.data + b * p->out.strides[0] + hk * p->out.strides[1];
    const int64_t os = p->out.strides[2];
    float acc[GS_RB], tot[GS_RB];
    int64_t j, c, hh, i, f, qg, ng;
    gs_groups(p, g, b, &f, &qg, &ng);
    for (j = j0; j < j1; j++) tot[j - j0] = 0.0f;
    for (hh = 0; hh < g->g; hh++) {
        for (j = j0; j < j1; j++) acc[j - j0] = 0.0f;
        for (c = 0; c < ng; c++) {
            const int64_t i1 = f + (c + 1) * qg < g->Tq ? f + (c + 1) * qg : g->Tq;
            const int64_t last = gs_pos(p, g, i1 - 1);
            const int64_t hi = last + 1 < j1 ? last + 1 : j1;
            const float *src = part + (hh * nb + c) * T;
            for (j = lo; j < hi; j++) acc[j - j0] += src[j];
        }
        if (p->gqa == KVC_GQA_MAX && hh > 0)
            for (j = j0; j < j1; j++) tot[j - j0] = acc[j - j0] > tot[j - j0] ? acc[j - j0] : tot[j - j0];
        else
            for (j = j0; j < j1; j++) tot[j - j0] += acc[j - j0];
    }
    /* queries that see key j: those at positions >= j (all valid for j >= s) */
    i = gs_first_at(p, g, 0, g->Tq, lo);
    for (j = j0; j < j1; j++) {
        int64_t cnt;
        float v = 0.0f;
        if (j >= s) {
            while (i < g->Tq && gs_pos(p, g, i) < j) i++;
            cnt = g->Tq - i;
            if (cnt > 0)
                v = tot[j - j0] / (p->gqa == KVC_GQA_MAX ? (float)cnt : (float)cnt * (float)g->g);
        }
        out[j * os] = v;
    }
}

enum kvc_status kvc_global_scores(const struct kvc_global_scores_params *p)
{
    struct gs_geom g;
    char *base;
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    gs_geometry(p, &g);
    if (g.B == 0 || g.Hkv == 0 || g.T == 0) return KVC_OK;
    if (g.Tq == 0) {
        /* no query: every key scores 0 */
        int64_t b, hk, j;
        for (b = 0; b < g.B; b++)
            for (hk = 0; hk < g.Hkv; hk++)
                for (j = 0; j < g.T; j++)
                    ((float *)p->out.data)[b * p->out.strides[0] + hk * p->out.strides[1] +
                                           j * p->out.strides[2]] = 0.0f;
        return KVC_OK;
    }
    if (p->scratch == NULL || p->scratch_bytes < kvc_global_scores_scratch_bytes(p))
        return KVC_ERR_NOMEM;
    g.isa = (int)gs_isa();
    base = (char *)(((uintptr_t)p->scratch + (KVC_ALIGN - 1)) & ~(uintptr_t)(KVC_ALIGN - 1));

#pragma omp parallel num_threads(nt)
    {
        char *mine = base + (size_t)g.wave * g.pair_bytes + (size_t)KVC_THREAD_ID() * g.thread_bytes;
        struct gs_thread w;
        int64_t w0;
        w.qbuf = (float *)mine;
        w.ktmp = (float *)(mine + g.qbuf_bytes);
        w.logits = (float *)(mine + g.qbuf_bytes + g.ktmp_bytes);
        for (w0 = 0; w0 < g.pairs; w0 += g.wave) {
            const int64_t np = g.pairs - w0 < g.wave ? g.pairs - w0 : g.wave;
            const int64_t nunits = np * g.g * g.ngroups;
            int64_t u;
#pragma omp for schedule(static)
            for (u = 0; u < np * g.nkb; u++) {
                const int64_t pr = u / g.nkb;
                float *kt = (float *)(base + (size_t)pr * g.pair_bytes);
                gs_convert_keys(p, &g, (w0 + pr) / g.Hkv, (w0 + pr) % g.Hkv, u % g.nkb, kt,
                                w.ktmp);
            }
            /* later groups see more keys: hand them out first */
#pragma omp for schedule(dynamic, 1)
            for (u = 0; u < nunits; u++) {
                const int64_t c = g.ngroups - 1 - u % g.ngroups;
                const int64_t hh = (u / g.ngroups) % g.g, pr = u / (g.ngroups * g.g);
                const char *pb = base + (size_t)pr * g.pair_bytes;
                float *part = (float *)(pb + g.kt_bytes) + (hh * g.ngroups + c) * g.T;
                gs_group(p, &g, (w0 + pr) / g.Hkv, (w0 + pr) % g.Hkv, hh, c,
                         (const float *)pb, part, &w);
            }
#pragma omp for schedule(static)
            for (u = 0; u < np * g.nrb; u++) {
                const int64_t pr = u / g.nrb, j0 = (u % g.nrb) * GS_RB;
                const float *part = (const float *)(base + (size_t)pr * g.pair_bytes + g.kt_bytes);
                gs_reduce(p, &g, (w0 + pr) / g.Hkv, (w0 + pr) % g.Hkv, j0,
                          j0 + GS_RB < g.T ? j0 + GS_RB : g.T, part);
            }
        }
    }
    return KVC_OK;
}
