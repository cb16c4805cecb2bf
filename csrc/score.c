/*
 * score.c - window attention scores, vector norms and 1-D pooling (CPU).
 *
 * Parallel units are chosen so that every output element is produced by one
 * thread in a fixed order: results are bit-identical for any thread count.
 */
#include <math.h>
#include <string.h>

#include "kvc_math.h"
#include "score.h"

/* GCC/Clang vector extensions pin the lane axis where the auto-vectoriser
 * would otherwise pick a poor one (or none); a 16-float vector is one zmm,
 * two ymm or four xmm depending on the clone. Other compilers take the
 * scalar loops. */
#if defined(__GNUC__) && !defined(__CUDACC__)
#define KVC_VEC 1
typedef float kvc_vf __attribute__((vector_size(KVC_LANES * sizeof(float))));
typedef int32_t kvc_vi __attribute__((vector_size(KVC_LANES * sizeof(int32_t))));

/* Macros, not functions: a helper compiled for the baseline ISA gets its
 * vector code lowered for that ISA before it is inlined into a clone. */
#define KVC_VLOAD(v, p) memcpy(&(v), (p), sizeof(kvc_vf))
#endif

/* ------------------------------------------------------------------------ */
/* window scores                                                            */
/* ------------------------------------------------------------------------ */

/* Register tile of the logits micro-kernel: WS_QB queries x WS_KB keys. Keys
 * are transposed into a [D][WS_KB] fp32 block so the inner loop is a
 * broadcast-multiply-add over WS_KB contiguous lanes (no horizontal sums). */
#ifndef WS_QB
#define WS_QB 4
#endif
#define WS_KB 16
/* Queries per chunk: keys are converted once per chunk, so larger chunks
 * amortise conversion; the logits block (chunk x Tk floats) bounds it. */
#define WS_QC_MAX 64
#define WS_LOGIT_BUDGET ((size_t)2 << 20) /* floats per thread */

struct ws_geom {
    int64_t B, Hq, Hkv, Tq, Tk, D, g;
    int64_t qc;  /* queries per chunk, multiple of WS_QB */
    int64_t rs;  /* logits row stride: Tk rounded up to WS_KB */
    size_t heads_bytes, qbuf_bytes, kt_bytes, ktmp_bytes, logits_bytes, part_bytes;
    size_t thread_bytes;
};

static int64_t ws_round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

static void ws_geometry(const struct kvc_window_scores_params *p, struct ws_geom *g)
{
    int64_t cap;
    g->B = p->q.shape[0];
    g->Hq = p->q.shape[1];
    g->Tq = p->q.shape[2];
    g->D = p->q.shape[3];
    g->Hkv = p->k.shape[1];
    g->Tk = p->k.shape[2];
    g->g = g->Hkv > 0 ? g->Hq / g->Hkv : 1;
    g->rs = ws_round_up(g->Tk > 0 ? g->Tk : 1, WS_KB);
    cap = (int64_t)(WS_LOGIT_BUDGET / (size_t)g->rs);
    if (cap > WS_QC_MAX) cap = WS_QC_MAX;
    cap = cap / WS_QB * WS_QB;
    if (cap < WS_QB) cap = WS_QB;
    g->qc = ws_round_up(g->Tq < cap ? (g->Tq > 0 ? g->Tq : 1) : cap, WS_QB);
    g->heads_bytes = kvc_align_up((size_t)(g->B * g->Hq * g->Tk) * sizeof(float));
    g->qbuf_bytes = kvc_align_up((size_t)(g->qc * g->D) * sizeof(float));
    g->kt_bytes = kvc_align_up((size_t)(WS_KB * g->D) * sizeof(float));
    g->ktmp_bytes = g->kt_bytes;
    g->logits_bytes = kvc_align_up((size_t)(g->qc * g->rs) * sizeof(float));
    g->part_bytes = kvc_align_up((size_t)g->rs * sizeof(float));
    g->thread_bytes = g->qbuf_bytes + g->kt_bytes + g->ktmp_bytes + g->logits_bytes +
                      g->part_bytes;
}

size_t kvc_window_scores_scratch_bytes(const struct kvc_window_scores_params *p)
{
    struct ws_geom g;
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    ws_geometry(p, &g);
    return KVC_ALIGN + g.heads_bytes + (size_t)nt * g.thread_bytes;
}

struct ws_thread {
    float *qbuf, *kt, *ktmp, *logits, *part;
};

/* Logits of queries qbuf[qb .. qb + WS_QB) (rows of D floats) against the
 * transposed key block kt ([D][WS_KB], 64-byte aligned): writes
 * logits[i * rs + col + l] for l < WS_KB. */
#if defined(__GNUC__) && !defined(__CUDACC__)
/* GCC/Clang vector extension: left to itself the vectoriser picks the short
 * query axis; a WS_KB-float vector type pins the wide axis to the lanes (one
 * zmm, two ymm or four xmm depending on the clone). */
typedef float ws_vec __attribute__((vector_size(WS_KB * sizeof(float))));

KVC_INLINE void ws_tile(const float *qbuf, const float *kt, float *logits, int64_t D,
                           int64_t rs, int64_t col, int64_t qb, float scaling)
{
    ws_vec a[WS_QB];
    const float *q0 = qbuf + qb * D;
    int64_t d;
    int i;
    for (i = 0; i < WS_QB; i++) a[i] = (ws_vec){0};
    for (d = 0; d < D; d++) {
        ws_vec kv;
        memcpy(&kv, kt + d * WS_KB, sizeof kv);
        for (i = 0; i < WS_QB; i++) a[i] += q0[i * D + d] * kv;
    }
    for (i = 0; i < WS_QB; i++) {
        ws_vec r = a[i] * scaling;
        memcpy(logits + (qb + i) * rs + col, &r, sizeof r);
    }
}
#else
KVC_INLINE void ws_tile(const float *qbuf, const float *kt, float *logits, int64_t D,
                           int64_t rs, int64_t col, int64_t qb, float scaling)
{
    float a[WS_QB][WS_KB];
    const float *q0 = qbuf + qb * D;
    int64_t d;
    int i, l;
    for (i = 0; i < WS_QB; i++)
        for (l = 0; l < WS_KB; l++) a[i][l] = 0.0f;
    for (d = 0; d < D; d++) {
        const float *kd = kt + d * WS_KB;
        for (i = 0; i < WS_QB; i++) {
            float qv = q0[i * D + d];
            for (l = 0; l < WS_KB; l++) a[i][l] += qv * kd[l];
        }
    }
    for (i = 0; i < WS_QB; i++) {
        float *dst = logits + (qb + i) * rs + col;
        for (l = 0; l < WS_KB; l++) dst[l] = a[i][l] * scaling;
    }
}
#endif

/* One (batch, query head): acc[0 .. Tk) <- sum over queries of their
 * attention rows. Sequential, so its result does not depend on threads. */
static void KVC_HOT ws_unit(const struct kvc_window_scores_params *p,
                            const struct ws_geom *g, int64_t b, int64_t h, float *acc,
                            const struct ws_thread *w)
{
    const int64_t D = g->D, Tq = g->Tq, Tk = g->Tk, rs = g->rs;
    const int64_t hk = h / g->g;
    const int64_t s = p->kv_start ? p->kv_start[b * p->kv_start_stride] : 0;
    const int64_t p0 = Tk - Tq; /* key position of query 0 */
    const size_t es = kvc_dtype_size((enum kvc_dtype)p->q.dtype);
    const char *qb_ptr = (const char *)p->q.data +
                         (b * p->q.strides[0] + h * p->q.strides[1]) * (int64_t)es;
    const char *kb_ptr = (const char *)p->k.data +
                         (b * p->k.strides[0] + hk * p->k.strides[1]) * (int64_t)es;
    int64_t c0, j;

    for (j = 0; j < Tk; j++) acc[j] = 0.0f;

    for (c0 = 0; c0 < Tq; c0 += g->qc) {
        const int64_t nq = Tq - c0 < g->qc ? Tq - c0 : g->qc;
        const int64_t nqp = ws_round_up(nq, WS_QB);
        const int64_t jend = p0 + c0 + nq; /* keys this chunk can see: [s, jend) */
        int64_t i, kb, L;
        if (jend <= s) continue;
        L = jend - s;

        for (i = 0; i < nq; i++)
            kvc_row_to_f32(w->qbuf + i * D, qb_ptr + (c0 + i) * p->q.strides[2] * (int64_t)es,
                           p->q.dtype, D, p->q.strides[3]);
        for (; i < nqp; i++) memset(w->qbuf + i * D, 0, (size_t)D * sizeof(float));

        for (kb = 0; kb < L; kb += WS_KB) {
            const int64_t nk = L - kb < WS_KB ? L - kb : WS_KB;
            int64_t l, d, qb;
            for (l = 0; l < nk; l++)
                kvc_row_to_f32(w->ktmp + l * D,
                               kb_ptr + (s + kb + l) * p->k.strides[2] * (int64_t)es,
                               p->k.dtype, D, p->k.strides[3]);
            for (; l < WS_KB; l++) memset(w->ktmp + l * D, 0, (size_t)D * sizeof(float));
            for (d = 0; d < D; d++)
                for (l = 0; l < WS_KB; l++) w->kt[d * WS_KB + l] = w->ktmp[l * D + d];
            for (qb = 0; qb < nqp; qb += WS_QB) {
                /* causal: skip query blocks whose last query precedes this key block */
                int64_t last = qb + WS_QB < nq ? qb + WS_QB - 1 : nq - 1;
                if (p0 + c0 + last < s + kb) continue;
                ws_tile(w->qbuf, w->kt, w->logits, D, rs, kb, qb, p->scaling);
            }
        }

        /* Chunk sums go through `part` first: two-level summation keeps the
         * error of long query windows (H2O uses every query) near pairwise. */
        for (j = 0; j < L; j++) w->part[j] = 0.0f;
        for (i = 0; i < nq; i++) {
            const int64_t n = p0 + c0 + i - s + 1;
            float *row = w->logits + i * rs;
            float m, inv;
            if (n <= 0) continue;
            m = kvc_max_f32(row, n);
            inv = 1.0f / kvc_exp_shift_sum(row, n, m);
            for (j = 0; j < n; j++) w->part[j] += row[j] * inv;
        }
        for (j = 0; j < L; j++) acc[s + j] += w->part[j];
    }
}

/* Reduce the g per-head rows of kv head (b, hk) into the output row. */
static void ws_reduce(const struct kvc_window_scores_params *p, const struct ws_geom *g,
                      int64_t b, int64_t hk, const float *heads)
{
    float *out = (float *)p->out.data + b * p->out.strides[0] + hk * p->out.strides[1];
    const int64_t os = p->out.strides[2], Tk = g->Tk;
    const float *first = heads + (b * g->Hq + hk * g->g) * Tk;
    int64_t j, h;
    if (p->gqa == KVC_GQA_MAX) {
        const float den = (float)g->Tq;
        for (j = 0; j < Tk; j++) {
            float v = first[j];
            for (h = 1; h < g->g; h++) {
                float x = first[h * Tk + j];
                v = x > v ? x : v;
            }
            out[j * os] = v / den;
        }
    } else {
        const float den = (float)g->Tq * (float)g->g;
        for (j = 0; j < Tk; j++) out[j * os] = kvc_group_sum_at(first, g->g, Tk, j) / den;
    }
}

enum kvc_status kvc_window_scores(const struct kvc_window_scores_params *p)
{
    struct ws_geom g;
    char *base;
    float *heads;
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    int64_t u;
    ws_geometry(p, &g);
    if (g.B == 0 || g.Hkv == 0 || g.Tk == 0) return KVC_OK;
    if (g.Tq == 0) {
        /* no query attends anything: every score is 0 */
        int64_t b, hk, j;
        for (b = 0; b < g.B; b++)
            for (hk = 0; hk < g.Hkv; hk++)
                for (j = 0; j < g.Tk; j++)
                    ((float *)p->out.data)[b * p->out.strides[0] + hk * p->out.strides[1] +
                                           j * p->out.strides[2]] = 0.0f;
        return KVC_OK;
    }
    if (p->scratch == NULL || p->scratch_bytes < kvc_window_scores_scratch_bytes(p))
        return KVC_ERR_NOMEM;
    base = (char *)(((uintptr_t)p->scratch + (KVC_ALIGN - 1)) & ~(uintptr_t)(KVC_ALIGN - 1));
    heads = (float *)base;
    base += g.heads_bytes;

#pragma omp parallel num_threads(nt)
    {
        char *mine = base + (size_t)KVC_THREAD_ID() * g.thread_bytes;
        struct ws_thread w;
        w.qbuf = (float *)mine;
        w.kt = (float *)(mine + g.qbuf_bytes);
        w.ktmp = (float *)(mine + g.qbuf_bytes + g.kt_bytes);
        w.logits = (float *)(mine + g.qbuf_bytes + g.kt_bytes + g.ktmp_bytes);
        w.part = (float *)(mine + g.qbuf_bytes + g.kt_bytes + g.ktmp_bytes + g.logits_bytes);
#pragma omp for schedule(dynamic, 1)
        for (u = 0; u < g.B * g.Hq; u++)
            ws_unit(p, &g, u / g.Hq, u % g.Hq, heads + u * g.Tk, &w);
#pragma omp for schedule(static)
        for (u = 0; u < g.B * g.Hkv; u++)
            ws_reduce(p, &g, u / g.Hkv, u % g.Hkv, heads);
    }
    return KVC_OK;
}

/* ------------------------------------------------------------------------ */
/* vector norm                                                              */
/* ------------------------------------------------------------------------ */

/* Rows per parallel unit: rows are independent, so splitting below
 * (batch, head) keeps results thread-count independent while balancing the
 * few heads of small models over the cores. */
#define NORM_ROWS 256

/* Rows are reduced 16 elements at a time into a local block that the
 * compiler keeps in one vector register (two or four on narrower clones). */
#ifdef KVC_VEC
#define KVC_NORM_BLOCKS(LOAD)                                                     \
    do {                                                                          \
        kvc_vf va = {0};                                                          \
        for (; i + KVC_LANES <= n; i += KVC_LANES) {                              \
            float b[KVC_LANES];                                                   \
            kvc_vf v;                                                             \
            if (dtype == KVC_F32 && st == 1) {                                    \
                KVC_VLOAD(v, xf + i);                                             \
            } else {                                                              \
                for (l = 0; l < KVC_LANES; l++) b[l] = LOAD(i + l);               \
                KVC_VLOAD(v, b);                                                  \
            }                                                                     \
            if (ord == 1) va += (kvc_vf)((kvc_vi)v & 0x7fffffff);                 \
            else va += v * v;                                                     \
        }                                                                         \
        memcpy(acc, &va, sizeof va);                                              \
    } while (0)
#else
#define KVC_NORM_BLOCKS(LOAD)                                                     \
    do {                                                                          \
        for (; i + KVC_LANES <= n; i += KVC_LANES)                                \
            for (l = 0; l < KVC_LANES; l++) {                                     \
                float v = LOAD(i + l);                                            \
                acc[l] += ord == 1 ? fabsf(v) : v * v;                            \
            }                                                                     \
    } while (0)
#endif

#define KVC_NORM_ROW(LOAD)                                                        \
    do {                                                                          \
        KVC_NORM_BLOCKS(LOAD);                                                    \
        for (l = 0; i < n; i++, l++) {                                            \
            float v = LOAD(i);                                                    \
            acc[l] += ord == 1 ? fabsf(v) : v * v;                                \
        }                                                                         \
    } while (0)

#define LOAD_F32_C(i) (xf[(i)])
#define LOAD_F32_S(i) (xf[(i) * st])
#define LOAD_F16_C(i) (kvc_f16_to_f32(xh[(i)]))
#define LOAD_F16_S(i) (kvc_f16_to_f32(xh[(i) * st]))
#define LOAD_BF16_C(i) (kvc_bf16_to_f32(xh[(i)]))
#define LOAD_BF16_S(i) (kvc_bf16_to_f32(xh[(i) * st]))

/* The KVC_LANES partial sums of one row (before the lane tree). */
KVC_INLINE void norm_row_acc(const void *x, int32_t dtype, int64_t n, int64_t st, int32_t ord,
                             float *acc)
{
    const float *xf = (const float *)x;
    const uint16_t *xh = (const uint16_t *)x;
    int64_t i = 0;
    int l;
    for (l = 0; l < KVC_LANES; l++) acc[l] = 0.0f;
    if (dtype == KVC_F16) {
        if (st == 1) KVC_NORM_ROW(LOAD_F16_C);
        else KVC_NORM_ROW(LOAD_F16_S);
    } else if (dtype == KVC_BF16) {
        if (st == 1) KVC_NORM_ROW(LOAD_BF16_C);
        else KVC_NORM_ROW(LOAD_BF16_S);
    } else {
        if (st == 1) KVC_NORM_ROW(LOAD_F32_C);
        else KVC_NORM_ROW(LOAD_F32_S);
    }
}

KVC_INLINE float norm_row(const void *x, int32_t dtype, int64_t n, int64_t st, int32_t ord)
{
    float acc[KVC_LANES], s;
    norm_row_acc(x, dtype, n, st, ord, acc);
    s = kvc_lanes_sum(acc);
    return ord == 1 ? s : sqrtf(s);
}

#if defined(KVC_VEC) && defined(KVC_LANES_SUM16)
#define KVC_NORM_BATCH 1
/* Norms of KVC_LANES rows at once: the lane trees of the 16 rows run as
 * shuffles across rows (kvc_lanes_sum16: each row still adds acc[l] +
 * acc[l + 8], then + 4, + 2, + 1, exactly as kvc_lanes_sum), and the
 * square roots as one vector; per-row horizontal sums and scalar sqrt
 * dominated D=64 rows. */
KVC_INLINE void norm_lanes16(const kvc_vf *a, int32_t ord, float *res)
{
    kvc_vf f;
    int j;
    kvc_lanes_sum16(a, &f);
    if (ord != 1) {
        /* sqrt is correctly rounded in vector form too: one vsqrtps instead
         * of 16 scalar ones, same bits */
        float tmp[KVC_LANES];
        memcpy(tmp, &f, sizeof f);
#pragma omp simd
        for (j = 0; j < KVC_LANES; j++) tmp[j] = __builtin_sqrtf(tmp[j]);
        memcpy(&f, tmp, sizeof f);
    }
    memcpy(res, &f, sizeof f);
}
#endif

static void KVC_HOT norm_rows(const struct kvc_vector_norm_params *p, int64_t r0, int64_t r1)
{
    const int64_t H = p->x.shape[1], T = p->x.shape[2], D = p->x.shape[3];
    const size_t es = kvc_dtype_size((enum kvc_dtype)p->x.dtype);
    /* walk (b, h, t) incrementally: a division per 64-element row costs as
     * much as the row itself */
    int64_t b = r0 / (H * T), h = (r0 / T) % H, t = r0 % T, r = r0;
#ifdef KVC_NORM_BATCH
    for (; r + KVC_LANES <= r1; r += KVC_LANES) {
        kvc_vf a[KVC_LANES];
        float *o[KVC_LANES], res[KVC_LANES];
        int j;
        for (j = 0; j < KVC_LANES; j++) {
            const char *x = (const char *)p->x.data +
                            (b * p->x.strides[0] + h * p->x.strides[1] + t * p->x.strides[2]) *
                                (int64_t)es;
            float acc[KVC_LANES];
            o[j] = (float *)p->out.data + b * p->out.strides[0] + h * p->out.strides[1] +
                   t * p->out.strides[2];
            norm_row_acc(x, p->x.dtype, D, p->x.strides[3], p->ord, acc);
            memcpy(&a[j], acc, sizeof acc);
            if (++t == T) {
                t = 0;
                if (++h == H) {
                    h = 0;
                    b++;
                }
            }
        }
        norm_lanes16(a, p->ord, res);
        for (j = 0; j < KVC_LANES; j++) *o[j] = res[j];
    }
#endif
    for (; r < r1; r++) {
        const char *x = (const char *)p->x.data +
                        (b * p->x.strides[0] + h * p->x.strides[1] + t * p->x.strides[2]) *
                            (int64_t)es;
        float *o = (float *)p->out.data + b * p->out.strides[0] + h * p->out.strides[1] +
                   t * p->out.strides[2];
        *o = norm_row(x, p->x.dtype, D, p->x.strides[3], p->ord);
        if (++t == T) {
            t = 0;
            if (++h == H) {
                h = 0;
                b++;
            }
        }
    }
}

enum kvc_status kvc_vector_norm(const struct kvc_vector_norm_params *p)
{
    const int64_t rows = p->x.shape[0] * p->x.shape[1] * p->x.shape[2];
    const int64_t units = (rows + NORM_ROWS - 1) / NORM_ROWS;
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    int64_t u;
    if (p->ord != 1 && p->ord != 2) return KVC_ERR_INVALID;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (u = 0; u < units; u++) {
        int64_t r1 = (u + 1) * NORM_ROWS;
        norm_rows(p, u * NORM_ROWS, r1 < rows ? r1 : rows);
    }
    return KVC_OK;
}

/* ------------------------------------------------------------------------ */
/* 1-D pooling                                                              */
/* ------------------------------------------------------------------------ */

#define POOL_COLS 4096
#define POOL_MIN_PARALLEL 16384

/* NaN-propagating max, like torch's max_pool1d. */
/* Quiet comparisons (no FE_INVALID on quiet NaNs): GCC will not vectorise the
 * signalling `>` under -ftrapping-math, and the result is the same. */
/* pool_max for operands known not to be NaN (then it is the same function). */
KVC_INLINE float pool_max_num(float a, float b) { return b > a ? b : a; }

KVC_INLINE float pool_max(float a, float b)
{
    return (__builtin_isgreater(b, a) || __builtin_isunordered(b, b)) ? b : a;
}

static void KVC_HOT pool_cols(const struct kvc_pool1d_params *p, int64_t b, int64_t h,
                              int64_t t0, int64_t t1)
{
    const int64_t T = p->in.shape[2], r = p->kernel / 2, k = p->kernel;
    const int64_t is = p->in.strides[2], os = p->out.strides[2];
    const float *in = (const float *)p->in.data + b * p->in.strides[0] + h * p->in.strides[1];
    float *out = (float *)p->out.data + b * p->out.strides[0] + h * p->out.strides[1];
    const int is_max = p->mode == KVC_POOL_MAX;
    const float den = (float)k;
    int64_t lo = t0 > r ? t0 : r, hi = t1 < T - r ? t1 : T - r, t, o;
    if (lo > hi) lo = hi = t1; /* kernel wider than the row: all edge */
    if (is == 1 && os == 1) {
        /* interior: the window is inside the row. Common kernels get a
         * compile-time tap count, so the loop over t vectorises with the k
         * taps unrolled and the running value kept in a register; others
         * take offset-outer passes over out[]. Both take each window left
         * to right, in the same order as the edge path below. */
        int nan_in = 0;
        if (is_max && lo < hi) {
            /* Without NaNs pool_max is a plain max (vmaxps); one cheap scan
             * of the inputs decides. */
            const float *w = in + lo - r;
            const int64_t nw = hi - lo + 2 * r;
            int64_t j;
            for (j = 0; j < nw; j++) nan_in |= w[j] != w[j];
        }
        switch (k) {
#define KVC_POOL_K(K)                                                             \
    case K:                                                                       \
        if (is_max && !nan_in)                                                    \
            for (t = lo; t < hi; t++) {                                           \
                float v = in[t - (K) / 2];                                        \
                for (o = 1; o < (K); o++) v = pool_max_num(v, in[t - (K) / 2 + o]); \
                out[t] = v;                                                       \
            }                                                                     \
        else if (is_max)                                                          \
            for (t = lo; t < hi; t++) {                                           \
                float v = in[t - (K) / 2];                                        \
                for (o = 1; o < (K); o++) v = pool_max(v, in[t - (K) / 2 + o]);   \
                out[t] = v;                                                       \
            }                                                                     \
        else                                                                      \
            for (t = lo; t < hi; t++) {                                           \
                float v = in[t - (K) / 2];                                        \
                for (o = 1; o < (K); o++) v += in[t - (K) / 2 + o];               \
                out[t] = v / den;                                                 \
            }                                                                     \
        break;
            KVC_POOL_K(3)
            KVC_POOL_K(5)
            KVC_POOL_K(7)
            KVC_POOL_K(9)
            KVC_POOL_K(11)
            KVC_POOL_K(13)
            KVC_POOL_K(15)
#undef KVC_POOL_K
        default:
            for (t = lo; t < hi; t++) out[t] = in[t - r];
            for (o = 1; o < k; o++) {
                if (is_max)
                    for (t = lo; t < hi; t++) out[t] = pool_max(out[t], in[t - r + o]);
                else
                    for (t = lo; t < hi; t++) out[t] += in[t - r + o];
            }
            if (!is_max)
                for (t = lo; t < hi; t++) out[t] /= den;
        }
    } else {
        lo = hi = t1;
    }
    /* edges (and every column of strided rows): [t0, lo) and [hi, t1) only,
     * with the window clipped to the row; t0 <= lo <= hi <= t1 here */
    for (t = t0; t < t1; t++) {
        float v;
        int64_t j, j0, j1;
        if (t == lo) {
            t = hi;
            if (t >= t1) break;
        }
        j0 = t - r > 0 ? t - r : 0;
        j1 = t + r < T - 1 ? t + r : T - 1;
        v = is_max ? -INFINITY : 0.0f;
        for (j = j0; j <= j1; j++) v = is_max ? pool_max(v, in[j * is]) : v + in[j * is];
        out[t * os] = is_max ? v : v / den;
    }
}

enum kvc_status kvc_pool1d(const struct kvc_pool1d_params *p)
{
    const int64_t B = p->in.shape[0], H = p->in.shape[1], T = p->in.shape[2];
    const int64_t per_row = (T + POOL_COLS - 1) / POOL_COLS;
    const int64_t units = B * H * per_row;
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    int64_t u;
    if (p->kernel < 1 || p->kernel % 2 == 0) return KVC_ERR_INVALID;
    /* a parallel region costs more than pooling a few thousand columns;
     * each output is computed the same way either way */
    if (B * H * T < POOL_MIN_PARALLEL) nt = 1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (u = 0; u < units; u++) {
        const int64_t row = u / per_row, c = u % per_row;
        const int64_t t1 = (c + 1) * POOL_COLS;
        pool_cols(p, row / H, row % H, c * POOL_COLS, t1 < T ? t1 : T);
    }
    return KVC_OK;
}
