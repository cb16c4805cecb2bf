/*
 * merge.c - evict-then-merge with the zero class (CPU).
 *
 * Three phases in one parallel region, each unit sequential, so results are
 * bit-identical for any thread count:
 *   A. per (batch, kv head): mark padding / centers / candidates; center
 *      keys -> unit vectors, transposed into blocks of MG_CB lanes;
 *   B. per (head, chunk of MG_CHUNK tokens): best cosine and its center for
 *      every candidate, MG_TB tokens at a time against all center blocks,
 *      keeping a running max per lane (no T x C similarity matrix). A
 *      token's result does not depend on its chunk or tile, and chunks keep
 *      the cores busy when there are fewer heads than threads (Hkv = 3);
 *   C. per head: tau (given, or the mean best cosine), the class of each
 *      token (0 = dropped, or center + 1), one score-weighted scatter of the
 *      merged tokens into fp32 accumulators in ascending token order (class
 *      0 is the drop: nothing is added for it) and one rounding per output.
 */
#include <math.h>
#include <string.h>

#include "merge.h"
#include "merge_math.h"

/* Tokens per tile x centers per block of the similarity micro-kernel. */
#define MG_TB 4
#define MG_CB 16
/* Tokens per phase-B unit: enough to amortise the unit, small enough to
 * balance a few heads over the threads. */
#define MG_CHUNK 256

/* Slot marks in cls[] before phase C; candidates get their best center. */
#define MG_CLS_PAD (-1)
#define MG_CLS_CENTER (-2)
#define MG_CLS_CAND (-3)

struct mg_geom {
    int64_t B, H, T, C, D, Dv, nblk, chunks;
    /* per head, shared by the phases */
    size_t cb_bytes, bias_bytes, cnorm_bytes, best_bytes, cls_bytes, head_bytes;
    /* per thread */
    size_t tile_bytes, acck_bytes, accv_bytes, w_bytes, cnt_bytes, rowk_bytes, rowv_bytes;
    size_t thread_bytes;
};

static void mg_geometry(const struct kvc_evict_merge_params *p, struct mg_geom *g)
{
    g->B = p->keys.shape[0];
    g->H = p->keys.shape[1];
    g->T = p->keys.shape[2];
    g->D = p->keys.shape[3];
    g->Dv = p->values.shape[3];
    g->C = p->centers.shape[2];
    g->nblk = (g->C + MG_CB - 1) / MG_CB;
    g->chunks = g->T > 0 ? (g->T + MG_CHUNK - 1) / MG_CHUNK : 1;
    g->cb_bytes = kvc_align_up((size_t)(g->nblk * MG_CB * g->D) * sizeof(float));
    g->bias_bytes = kvc_align_up((size_t)(g->nblk * MG_CB) * sizeof(float));
    g->cnorm_bytes = kvc_align_up((size_t)g->C * sizeof(float));
    g->best_bytes = kvc_align_up((size_t)g->T * sizeof(float));
    g->cls_bytes = kvc_align_up((size_t)g->T * sizeof(int32_t));
    g->head_bytes = g->cb_bytes + g->bias_bytes + g->cnorm_bytes + g->best_bytes + g->cls_bytes;
    g->tile_bytes = kvc_align_up((size_t)(MG_TB * g->D) * sizeof(float));
    g->acck_bytes = kvc_align_up((size_t)(g->C * g->D) * sizeof(float));
    g->accv_bytes = kvc_align_up((size_t)(g->C * g->Dv) * sizeof(float));
    g->w_bytes = kvc_align_up((size_t)g->C * sizeof(float));
    g->cnt_bytes = kvc_align_up((size_t)g->C * sizeof(int32_t));
    g->rowk_bytes = kvc_align_up((size_t)g->D * sizeof(float));
    g->rowv_bytes = kvc_align_up((size_t)g->Dv * sizeof(float));
    g->thread_bytes = g->tile_bytes + g->acck_bytes + g->accv_bytes + g->w_bytes +
                      g->cnt_bytes + g->rowk_bytes + g->rowv_bytes;
}

size_t kvc_evict_merge_scratch_bytes(const struct kvc_evict_merge_params *p)
{
    struct mg_geom g;
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    mg_geometry(p, &g);
    return KVC_ALIGN + (size_t)(g.B * g.H) * g.head_bytes + (size_t)nt * g.thread_bytes;
}

struct mg_head {
    float *cb;    /* [nblk][D][MG_CB] center unit vectors, zero-padded */
    float *bias;  /* [nblk * MG_CB]: 0 for a center, -inf for a padding lane */
    float *cnorm; /* [C] |k_c| */
    float *best;  /* [T] best cosine of each candidate */
    int32_t *cls; /* [T] MG_CLS_*, or a candidate's best center */
};

struct mg_thread {
    float *tile; /* [MG_TB][D] candidate unit vectors */
    float *acck, *accv, *w;
    int32_t *cnt;
    float *rowk, *rowv;
};

static void mg_head_carve(const struct mg_geom *g, char *base, int64_t u, struct mg_head *hd)
{
    base += (size_t)u * g->head_bytes;
    hd->cb = (float *)base;
    base += g->cb_bytes;
    hd->bias = (float *)base;
    base += g->bias_bytes;
    hd->cnorm = (float *)base;
    base += g->cnorm_bytes;
    hd->best = (float *)base;
    base += g->best_bytes;
    hd->cls = (int32_t *)base;
}

static void mg_thread_carve(const struct mg_geom *g, char *base, struct mg_thread *w)
{
    w->tile = (float *)base;
    base += g->tile_bytes;
    w->acck = (float *)base;
    base += g->acck_bytes;
    w->accv = (float *)base;
    base += g->accv_bytes;
    w->w = (float *)base;
    base += g->w_bytes;
    w->cnt = (int32_t *)base;
    base += g->cnt_bytes;
    w->rowk = (float *)base;
    base += g->rowk_bytes;
    w->rowv = (float *)base;
}

/* The lanes' (best value, its center) -> the row's: the largest value, the
 * lowest center among equal ones. */
KVC_INLINE void mg_lanes_best(const float *v, const int32_t *c, float *best, int32_t *arg)
{
    float bv = v[0];
    int32_t bc = c[0];
    int l;
    for (l = 1; l < MG_CB; l++)
        if (v[l] > bv || (v[l] == bv && c[l] < bc)) {
            bv = v[l];
            bc = c[l];
        }
    *best = bv;
    *arg = bc;
}

/* Best cosine of MG_TB unit rows (tile, [MG_TB][D]) over every center block:
 * best[i] and arg[i] (ties to the lowest center: a lane only takes a
 * strictly larger value, and lanes are merged lowest index first on ties). */
#if defined(__GNUC__) && !defined(__CUDACC__)
/* A MG_CB-float vector pins the center axis to the lanes (one zmm, two ymm
 * or four xmm depending on the clone). */
typedef float mg_vf __attribute__((vector_size(MG_CB * sizeof(float))));
typedef int32_t mg_vi __attribute__((vector_size(MG_CB * sizeof(int32_t))));

KVC_INLINE void mg_tile(const float *tile, const float *cb, const float *bias, int64_t nblk,
                        int64_t D, float *best, int32_t *arg)
{
    mg_vf bv[MG_TB];
    mg_vi bi[MG_TB], idx;
    int64_t blk, d;
    int i, l;
    for (l = 0; l < MG_CB; l++) idx[l] = l;
    for (i = 0; i < MG_TB; i++) {
        bv[i] = (mg_vf){0} - INFINITY;
        bi[i] = (mg_vi){0};
    }
    for (blk = 0; blk < nblk; blk++) {
        const float *k = cb + blk * D * MG_CB;
        mg_vf a[MG_TB], bb;
        for (i = 0; i < MG_TB; i++) a[i] = (mg_vf){0};
        for (d = 0; d < D; d++) {
            mg_vf kv;
            memcpy(&kv, k + d * MG_CB, sizeof kv);
            for (i = 0; i < MG_TB; i++) a[i] += tile[i * D + d] * kv;
        }
        memcpy(&bb, bias + blk * MG_CB, sizeof bb);
        for (i = 0; i < MG_TB; i++) {
            mg_vf s = a[i] + bb;
            mg_vi m = s > bv[i];
            bv[i] = (mg_vf)(((mg_vi)s & m) | ((mg_vi)bv[i] & ~m));
            bi[i] = (idx & m) | (bi[i] & ~m);
        }
        idx += MG_CB;
    }
    for (i = 0; i < MG_TB; i++) {
        float v[MG_CB];
        int32_t c[MG_CB];
        memcpy(v, &bv[i], sizeof v);
        memcpy(c, &bi[i], sizeof c);
        mg_lanes_best(v, c, &best[i], &arg[i]);
    }
}
#else
KVC_INLINE void mg_tile(const float *tile, const float *cb, const float *bias, int64_t nblk,
                        int64_t D, float *best, int32_t *arg)
{
    float bv[MG_TB][MG_CB];
    int32_t bi[MG_TB][MG_CB];
    int64_t blk, d;
    int i, l;
    for (i = 0; i < MG_TB; i++)
        for (l = 0; l < MG_CB; l++) {
            bv[i][l] = -INFINITY;
            bi[i][l] = 0;
        }
    for (blk = 0; blk < nblk; blk++) {
        const float *k = cb + blk * D * MG_CB;
        float a[MG_TB][MG_CB];
        for (i = 0; i < MG_TB; i++)
            for (l = 0; l < MG_CB; l++) a[i][l] = 0.0f;
        for (d = 0; d < D; d++)
            for (i = 0; i < MG_TB; i++) {
                float t = tile[i * D + d];
                for (l = 0; l < MG_CB; l++) a[i][l] += t * k[d * MG_CB + l];
            }
        for (i = 0; i < MG_TB; i++)
            for (l = 0; l < MG_CB; l++) {
                float s = a[i][l] + bias[blk * MG_CB + l];
                if (s > bv[i][l]) {
                    bv[i][l] = s;
                    bi[i][l] = (int32_t)(blk * MG_CB + l);
                }
            }
    }
    for (i = 0; i < MG_TB; i++) mg_lanes_best(bv[i], bi[i], &best[i], &arg[i]);
}
#endif

/* Copy row `src` (n elements, stride ss) to `dst` (stride ds) bit for bit. */
static void mg_copy_row(void *dst, int64_t ds, const void *src, int64_t ss, size_t es, int64_t n)
{
    int64_t i;
    if (es == 2)
        for (i = 0; i < n; i++) ((uint16_t *)dst)[i * ds] = ((const uint16_t *)src)[i * ss];
    else
        for (i = 0; i < n; i++) ((uint32_t *)dst)[i * ds] = ((const uint32_t *)src)[i * ss];
}

static void mg_zero_row(void *dst, int64_t ds, size_t es, int64_t n)
{
    int64_t i;
    if (es == 2)
        for (i = 0; i < n; i++) ((uint16_t *)dst)[i * ds] = 0;
    else
        for (i = 0; i < n; i++) ((uint32_t *)dst)[i * ds] = 0;
}

/* Element pointer of a view at (b, h, t). */
static char *mg_at(const struct kvc_view *v, int64_t b, int64_t h, int64_t t)
{
    return (char *)v->data + (b * v->strides[0] + h * v->strides[1] + t * v->strides[2]) *
                                 (int64_t)kvc_dtype_size((enum kvc_dtype)v->dtype);
}

/* k_j as an fp32 unit row in dst; returns |k_j|. Every phase normalises
 * through here (the similarity phase in its ISA clone, so its FMAs may round
 * differently from the merge phase; each phase is deterministic). */
KVC_INLINE float mg_unit_key(const struct kvc_evict_merge_params *p, int64_t b, int64_t h,
                             int64_t j, float *dst)
{
    kvc_row_to_f32(dst, mg_at(&p->keys, b, h, j), p->keys.dtype, p->keys.shape[3],
                   p->keys.strides[3]);
    return kvc_merge_unit(dst, p->keys.shape[3]);
}

/* Valid centers of a row: entries before the first -1. */
static int64_t mg_num_centers(const struct kvc_evict_merge_params *p, int64_t b, int64_t h)
{
    const int64_t C = p->centers.shape[2], st = p->centers.strides[2];
    const int64_t *cen = (const int64_t *)p->centers.data + b * p->centers.strides[0] +
                         h * p->centers.strides[1];
    int64_t n = 0;
    while (n < C && cen[n * st] >= 0) n++;
    return n;
}

static int64_t mg_center(const struct kvc_evict_merge_params *p, int64_t b, int64_t h, int64_t c)
{
    return ((const int64_t *)p->centers.data)[b * p->centers.strides[0] +
                                               h * p->centers.strides[1] +
                                               c * p->centers.strides[2]];
}

static int64_t mg_kv_start(const struct kvc_evict_merge_params *p, int64_t b)
{
    return p->kv_start ? p->kv_start[b * p->kv_start_stride] : 0;
}

/* Phase A: slot marks and the center blocks of (b, h). */
static void mg_prepare(const struct kvc_evict_merge_params *p, const struct mg_geom *g,
                       int64_t b, int64_t h, const struct mg_head *hd, float *row)
{
    const int64_t T = g->T, D = g->D, s = mg_kv_start(p, b);
    const int64_t nc = mg_num_centers(p, b, h), nblk = (nc + MG_CB - 1) / MG_CB;
    int64_t j, blk, l, d;
    for (j = 0; j < s; j++) hd->cls[j] = MG_CLS_PAD;
    for (; j < T; j++) hd->cls[j] = MG_CLS_CAND;
    for (blk = 0; blk < nblk; blk++)
        for (l = 0; l < MG_CB; l++) {
            const int64_t c = blk * MG_CB + l;
            float *col = hd->cb + blk * D * MG_CB + l;
            if (c < nc) {
                const int64_t t = mg_center(p, b, h, c);
                hd->cnorm[c] = mg_unit_key(p, b, h, t, row);
                for (d = 0; d < D; d++) col[d * MG_CB] = row[d];
                hd->bias[c] = 0.0f;
                hd->cls[t] = MG_CLS_CENTER;
            } else {
                for (d = 0; d < D; d++) col[d * MG_CB] = 0.0f;
                hd->bias[c] = -INFINITY;
            }
        }
}

/* Phase B: best cosine and center of the candidates in [t0, t1) of (b, h). */
static void KVC_HOT mg_similarities(const struct kvc_evict_merge_params *p,
                                    const struct mg_geom *g, int64_t b, int64_t h, int64_t t0,
                                    int64_t t1, const struct mg_head *hd, float *tile)
{
    const int64_t D = g->D, nblk = (mg_num_centers(p, b, h) + MG_CB - 1) / MG_CB;
    int64_t j = t0, i;
    int64_t tok[MG_TB];
    float best[MG_TB];
    int32_t arg[MG_TB];
    if (nblk == 0) return;
    for (;;) {
        int n = 0;
        for (; j < t1 && n < MG_TB; j++) {
            if (hd->cls[j] != MG_CLS_CAND) continue;
            tok[n] = j;
            mg_unit_key(p, b, h, j, tile + n * D);
            n++;
        }
        if (n == 0) break;
        for (i = n; i < MG_TB; i++) memset(tile + i * D, 0, (size_t)D * sizeof(float));
        mg_tile(tile, hd->cb, hd->bias, nblk, D, best, arg);
        for (i = 0; i < n; i++) {
            hd->best[tok[i]] = best[i];
            hd->cls[tok[i]] = arg[i];
        }
    }
}

/* Phase C: threshold, classes, scatter and outputs of (b, h). */
static void mg_merge(const struct kvc_evict_merge_params *p, const struct mg_geom *g, int64_t b,
                     int64_t h, const struct mg_head *hd, const struct mg_thread *w)
{
    const int64_t T = g->T, C = g->C, D = g->D, Dv = g->Dv, s = mg_kv_start(p, b);
    const int64_t nc = mg_num_centers(p, b, h);
    const size_t es = kvc_dtype_size((enum kvc_dtype)p->keys.dtype);
    const float *sc = (const float *)p->scores.data + b * p->scores.strides[0] +
                      h * p->scores.strides[1];
    const int64_t ss = p->scores.strides[2];
    float *tau_out = (float *)p->tau_used.data + b * p->tau_used.strides[0] +
                     h * p->tau_used.strides[1];
    float tau = ((const float *)p->tau.data)[b * p->tau.strides[0] + h * p->tau.strides[1]];
    int32_t *cls = hd->cls;
    int64_t j, c;

    if (tau != tau) {
        /* adaptive: mean best cosine over the candidates (a double: one
         * scalar sum of up to T terms) */
        double sum = 0.0;
        int64_t n = 0;
        if (nc > 0)
            for (j = s; j < T; j++)
                if (cls[j] >= 0) {
                    sum += (double)hd->best[j];
                    n++;
                }
        tau = n > 0 ? (float)(sum / (double)n) : NAN;
    }
    *tau_out = tau;

    /* accumulators start as the centers' own weighted rows */
    for (c = 0; c < nc; c++) {
        const int64_t t = mg_center(p, b, h, c);
        const float sw = sc[t * ss];
        float *ak = w->acck + c * D, *av = w->accv + c * Dv;
        int64_t d;
        mg_unit_key(p, b, h, t, ak);
        for (d = 0; d < D; d++) ak[d] *= sw;
        kvc_row_to_f32(av, mg_at(&p->values, b, h, t), p->values.dtype, Dv, p->values.strides[3]);
        for (d = 0; d < Dv; d++) av[d] *= sw;
        w->w[c] = sw;
        w->cnt[c] = 0;
    }

    /* The scatter, in ascending token order: class 0 is the drop (nothing
     * is added for it), class c + 1 adds the token to center c. A NaN
     * cosine (NaN keys) compares false and is dropped. */
    for (j = s; j < T; j++) {
        int32_t k;
        float sj;
        if (cls[j] == MG_CLS_CENTER) continue;
        k = nc > 0 && hd->best[j] >= tau ? cls[j] + 1 : 0;
        cls[j] = k;
        if (k == 0) continue;
        sj = sc[j * ss];
        mg_unit_key(p, b, h, j, w->rowk);
        kvc_merge_axpy(w->acck + (k - 1) * D, sj, w->rowk, D);
        kvc_row_to_f32(w->rowv, mg_at(&p->values, b, h, j), p->values.dtype, Dv,
                       p->values.strides[3]);
        kvc_merge_axpy(w->accv + (k - 1) * Dv, sj, w->rowv, Dv);
        w->w[k - 1] += sj;
        w->cnt[k - 1]++;
    }

    /* one rounding per output element; unmerged centers are copied */
    for (c = 0; c < C; c++) {
        char *ok = mg_at(&p->out_keys, b, h, c), *ov = mg_at(&p->out_values, b, h, c);
        const int64_t oks = p->out_keys.strides[3], ovs = p->out_values.strides[3];
        const int64_t ci = b * p->counts.strides[0] + h * p->counts.strides[1] +
                           c * p->counts.strides[2];
        float *os = (float *)p->out_scores.data + b * p->out_scores.strides[0] +
                    h * p->out_scores.strides[1] + c * p->out_scores.strides[2];
        int32_t cnt = 0;
        if (c >= nc) {
            mg_zero_row(ok, oks, es, D);
            mg_zero_row(ov, ovs, es, Dv);
            *os = 0.0f;
        } else {
            const int64_t t = mg_center(p, b, h, c);
            const char *ik = mg_at(&p->keys, b, h, t), *iv = mg_at(&p->values, b, h, t);
            const float wc = w->w[c];
            cnt = 1 + w->cnt[c];
            *os = wc;
            if (cnt == 1 || !(wc > 0.0f)) {
                mg_copy_row(ok, oks, ik, p->keys.strides[3], es, D);
                mg_copy_row(ov, ovs, iv, p->values.strides[3], es, Dv);
            } else {
                float *ak = w->acck + c * D, *av = w->accv + c * Dv;
                int64_t d;
                for (d = 0; d < Dv; d++) av[d] = av[d] / wc;
                kvc_merge_store_row(ov, p->out_values.dtype, av, Dv, ovs);
                if (kvc_merge_key_rescale(ak, D, hd->cnorm[c], wc, KVC_MERGE_DIR_EPS))
                    kvc_merge_store_row(ok, p->out_keys.dtype, ak, D, oks);
                else
                    mg_copy_row(ok, oks, ik, p->keys.strides[3], es, D);
            }
        }
        if (p->counts.dtype == KVC_I32) ((int32_t *)p->counts.data)[ci] = cnt;
        else ((float *)p->counts.data)[ci] = (float)cnt;
    }

    if (p->assign.data) {
        int64_t *as = (int64_t *)p->assign.data + b * p->assign.strides[0] +
                      h * p->assign.strides[1];
        const int64_t ast = p->assign.strides[2];
        for (c = 0; c < nc; c++) cls[mg_center(p, b, h, c)] = (int32_t)(c + 1);
        for (j = 0; j < T; j++) as[j * ast] = cls[j];
    }
}

enum kvc_status kvc_evict_merge(const struct kvc_evict_merge_params *p)
{
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    struct mg_geom g;
    char *heads, *threads;
    int64_t u, BH;
    mg_geometry(p, &g);
    BH = g.B * g.H;
    if (BH == 0) return KVC_OK;
    if (p->scratch == NULL || p->scratch_bytes < kvc_evict_merge_scratch_bytes(p))
        return KVC_ERR_NOMEM;
    heads = (char *)kvc_align_up((size_t)(uintptr_t)p->scratch);
    threads = heads + (size_t)BH * g.head_bytes;
    if (nt > BH * g.chunks) nt = (int)(BH * g.chunks);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        struct mg_thread w;
        struct mg_head hd;
        mg_thread_carve(&g, threads + (size_t)KVC_THREAD_ID() * g.thread_bytes, &w);
#pragma omp for schedule(static)
        for (u = 0; u < BH; u++) {
            mg_head_carve(&g, heads, u, &hd);
            mg_prepare(p, &g, u / g.H, u % g.H, &hd, w.rowk);
        }
#pragma omp for schedule(static)
        for (u = 0; u < BH * g.chunks; u++) {
            const int64_t hu = u / g.chunks, t0 = (u % g.chunks) * MG_CHUNK;
            const int64_t t1 = t0 + MG_CHUNK < g.T ? t0 + MG_CHUNK : g.T;
            const int64_t s = mg_kv_start(p, hu / g.H);
            mg_head_carve(&g, heads, hu, &hd);
            mg_similarities(p, &g, hu / g.H, hu % g.H, t0 > s ? t0 : s, t1, &hd, w.tile);
        }
#pragma omp for schedule(static)
        for (u = 0; u < BH; u++) {
            mg_head_carve(&g, heads, u, &hd);
            mg_merge(p, &g, u / g.H, u % g.H, &hd, &w);
        }
    }
    return KVC_OK;
}
