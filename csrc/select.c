/*
 * select.c - per-head top-k by radix selection.
 *
 * Scores map to order-preserving 32-bit keys; three histogram passes (11, 11
 * and 10 bits) find the k-th largest key exactly, and one final scan emits the
 * kept indices already in ascending order. That is O(T) per head with no
 * scratch beyond an 8 KiB histogram, and the result is unique (a total order
 * on (score, -index)), so it is deterministic by construction.
 */
#include "kvc_math.h"
#include "select.h"

#define SEL_BUCKETS 2048

KVC_INLINE uint32_t sel_key(const float *sc, int64_t st, int64_t j)
{
    return kvc_f32_order_key(sc[j * st]);
}

/*
 * Among keys of positions [lo, hi), find the threshold key `thr` and the
 * number `need_eq` of positions with key == thr to take (lowest indices
 * first) so that {key > thr} plus those make exactly the r largest.
 * Requires 0 <= r <= hi - lo.
 */
KVC_INLINE void sel_threshold(const float *sc, int64_t st, int64_t lo, int64_t hi, int64_t r,
                          uint32_t *thr, int64_t *need_eq)
{
    static const int shifts[3] = {21, 10, 0};
    static const int widths[3] = {11, 11, 10};
    uint32_t hist[SEL_BUCKETS];
    uint32_t prefix = 0, mask = 0;
    int64_t rem = r, j;
    int pass;
    if (r <= 0) { /* nothing to take: no key exceeds the largest */
        *thr = UINT32_MAX;
        *need_eq = 0;
        return;
    }
    for (pass = 0; pass < 3; pass++) {
        const int sh = shifts[pass];
        const uint32_t nb = 1u << widths[pass];
        uint32_t d;
        for (d = 0; d < nb; d++) hist[d] = 0;
        for (j = lo; j < hi; j++) {
            uint32_t key = sel_key(sc, st, j);
            if ((key & mask) == prefix) hist[(key >> sh) & (nb - 1)]++;
        }
        /* walk buckets from the top until the r-th largest falls inside */
        for (d = nb - 1; d > 0 && (int64_t)hist[d] < rem; d--) rem -= hist[d];
        prefix |= d << sh;
        mask |= (nb - 1) << sh;
    }
    *thr = prefix;
    *need_eq = rem;
}

static int KVC_HOT sel_row(const struct kvc_select_topk_params *p, int64_t b, int64_t h)
{
    const int64_t T = p->scores.shape[2];
    const int64_t kmax = p->out.shape[2];
    const float *sc = (const float *)p->scores.data + b * p->scores.strides[0] +
                      h * p->scores.strides[1];
    const int64_t st = p->scores.strides[2];
    int64_t *out = (int64_t *)p->out.data + b * p->out.strides[0] + h * p->out.strides[1];
    const int64_t os = p->out.strides[2];
    const int64_t k = p->k.data ? kvc_load_index(p->k.data, p->k.dtype,
                                                 b * p->k.strides[0] + h * p->k.strides[1])
                                : p->k_all;
    const int64_t s = p->kv_start ? p->kv_start[b * p->kv_start_stride] : 0;
    /* forced: [s, se) and [ws, T); valid candidates [se, ve); padded [0, pe) */
    const int64_t se = s + p->sinks < T ? s + p->sinks : T;
    const int64_t ws = T - p->window > 0 ? T - p->window : 0;
    const int64_t ve = se > ws ? se : ws;
    const int64_t pe = s < ws ? s : ws;
    const int64_t nv = ve - se;
    int64_t r = k - kvc_select_forced_count(T, p->sinks, p->window, s);
    uint32_t thr_v = UINT32_MAX, thr_p = UINT32_MAX;
    int64_t eq_v = 0, eq_p = 0, n = 0, j;
    int take_all_v = 0;

    for (j = 0; j < T; j++)
        if (sc[j * st] != sc[j * st]) return 1;

    if (r >= nv) {
        take_all_v = 1;
        sel_threshold(sc, st, 0, pe, r - nv, &thr_p, &eq_p);
    } else {
        sel_threshold(sc, st, se, ve, r, &thr_v, &eq_v);
    }

    for (j = 0; j < T && n < k; j++) {
        int keep = 0;
        if ((j >= s && j < se) || j >= ws) {
            keep = 1;
        } else {
            const int valid = j >= se && j < ve;
            const uint32_t key = sel_key(sc, st, j);
            const uint32_t thr = valid ? thr_v : thr_p;
            int64_t *eq = valid ? &eq_v : &eq_p;
            if ((valid && take_all_v) || key > thr) {
                keep = 1;
            } else if (key == thr && *eq > 0) {
                (*eq)--; /* ties at the threshold: lowest indices first */
                keep = 1;
            }
        }
        if (keep) out[(n++) * os] = j;
    }
    for (; n < kmax; n++) out[n * os] = -1;
    return 0;
}

enum kvc_status kvc_select_topk(const struct kvc_select_topk_params *p)
{
    const int64_t B = p->scores.shape[0], H = p->scores.shape[1];
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    int nan_found = 0;
    int64_t u;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) reduction(| : nan_found)
    for (u = 0; u < B * H; u++) nan_found |= sel_row(p, u / H, u % H);
    return nan_found ? KVC_ERR_NAN : KVC_OK;
}
