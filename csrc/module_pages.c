/*
 * module_pages.c - bindings of the paged (Quest) ops: page_bounds,
 * page_scores and attention_pages (kvc_attention reading a page list),
 * over a uniform or ragged layer (the ragged one when its offsets /
 * page_offsets are given). Validate once, run with the GIL released.
 */
#include "module.h"
#include "module_run.h"
#include "module_segments.h"
#include "module_spec.h"

#include <string.h>

#include "attention.h"
#include "pages.h"

KVC_PY_OP(op_page_bounds, page_bounds, 0, 0)
KVC_PY_OP(op_page_scores, page_scores, 0, 0)
KVC_PY_OP(op_attention_pages, attention, 1, 1)

/* ------------------------------------------------------------------------ */

PyDoc_STRVAR(page_bounds_doc,
             "page_bounds(keys, kmin, kmax, page_size, first, last, offsets, lengths, page_offsets)\n--\n\n"
             "Low-level: see kvcompress.ops.page_bounds.");

enum { PB_K, PB_MIN, PB_MAX, PB_P, PB_FIRST, PB_LAST, PB_OFF, PB_LEN, PB_POFF, PB_N };
static const struct kvc_py_spec page_bounds_spec[PB_N] = {
    KVC_PY_IN("keys", 4, "[B, H, n, D]", DT_FLOAT),
    KVC_PY_OUT("kmin", 4, "[B, H, Np, D]", DT_F32),
    KVC_PY_OUT("kmax", 4, "[B, H, Np, D]", DT_F32),
    KVC_PY_INT_IN("page_size", 1, INT32_MAX),
    KVC_PY_INT_IN("first", 0, INT64_MAX),
    KVC_PY_INT_IN("last", 0, INT64_MAX),
    KVC_PY_CUSTOM_ARG("offsets", 0, NULL, 0),
    KVC_PY_CUSTOM_ARG("lengths", 0, NULL, 0),
    KVC_PY_CUSTOM_ARG("page_offsets", 0, NULL, 0),
};

/* Ragged layout (offsets given): a first page per head, no last. */
static const struct kvc_py_spec page_bounds_ragged_spec[PB_N] = {
    KVC_PY_IN("keys", 2, "[R, D]", DT_FLOAT),
    KVC_PY_OUT("kmin", 2, "[Rp, D]", DT_F32),
    KVC_PY_OUT("kmax", 2, "[Rp, D]", DT_F32),
    KVC_PY_INT_IN("page_size", 1, INT32_MAX),
    KVC_PY_IN("first", 1, "[N]", DT_I64),
    KVC_PY_CUSTOM_ARG("last", 0, NULL, 0),
    KVC_PY_IN("offsets", 1, "[N]", DT_I64),
    KVC_PY_IN("lengths", 1, "[N]", DT_I64),
    KVC_PY_IN("page_offsets", 1, "[N]", DT_I64),
};

/* Host views of a ragged call's per-head values: what every head writes
 * lies inside keys and the bound buffers (pages.h). */
static int check_ragged_bounds(struct kvc_state *st, const struct kvc_view *off, const struct kvc_view *len,
                               const struct kvc_view *poff, const struct kvc_view *first, int64_t P,
                               int64_t R, int64_t Rp)
{
    int64_t i;
    for (i = 0; i < len->shape[0]; i++) {
        const int64_t o = kvc_py_i64_at(off, i), n = kvc_py_i64_at(len, i), po = kvc_py_i64_at(poff, i);
        const int64_t f = kvc_py_i64_at(first, i);
        int64_t np;
        if (n < 0)
            return kvc_py_raise(st->ValueError, "lengths: value %lld of head %lld is negative", (long long)n,
                                (long long)i);
        if (o < 0 || o > R || n > R - o)
            return kvc_py_raise(st->ValueError, "offsets: rows [%lld, %lld + %lld) of head %lld are outside the "
                                "%lld rows of keys", (long long)o, (long long)o, (long long)n, (long long)i,
                                (long long)R);
        np = n / P + (n % P != 0);
        if (f < 0 || f > np)
            return kvc_py_raise(st->ValueError, "first: page %lld of head %lld is outside [0, %lld] (its "
                                "%lld slots make %lld pages)", (long long)f, (long long)i, (long long)np,
                                (long long)n, (long long)np);
        /* only the rows written must exist: a head with nothing to redo may
         * have no bound rows yet */
        if (f < np && (po < 0 || po > Rp || np > Rp - po))
            return kvc_py_raise(st->ValueError, "page_offsets: bound rows [%lld, %lld + %lld) of head %lld are "
                                "outside the %lld rows of kmin", (long long)po, (long long)po, (long long)np,
                                (long long)i, (long long)Rp);
    }
    return 0;
}

static PyObject *py_page_bounds(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_page_bounds_params p;
    PyObject *ret = NULL;
    int64_t n, Np, P, first, last;
    int ragged;
    memset(&p, 0, sizeof p);
    if (kvc_py_check_nargs("page_bounds", nargs, PB_N) < 0) return NULL;
    ragged = args[PB_OFF] != Py_None;
    if (ragged && args[PB_LAST] != Py_None) {
        kvc_py_raise(st->ValueError, "last: must be None with the ragged layout (each head's pages run "
                     "from first to its newest)");
        return NULL;
    }
    if (kvc_py_call_parse(st, "page_bounds", ragged ? page_bounds_ragged_spec : page_bounds_spec, PB_N, args,
                          nargs, &c) < 0)
        return NULL;
    P = c.i[PB_P];
    if (ragged) {
        const struct kvc_view *ho, *hl, *hpo, *hf;
        if (kvc_py_call_finish(st, &c) < 0) goto done;
        ho = kvc_py_arg_host(st, &c.a[PB_OFF]);
        hl = ho ? kvc_py_arg_host(st, &c.a[PB_LEN]) : NULL;
        hpo = hl ? kvc_py_arg_host(st, &c.a[PB_POFF]) : NULL;
        hf = hpo ? kvc_py_arg_host(st, &c.a[PB_FIRST]) : NULL;
        if (hf == NULL || check_ragged_bounds(st, ho, hl, hpo, hf, P, c.a[PB_K].view.shape[0],
                                              c.a[PB_MIN].view.shape[0]) < 0)
            goto done;
        p.offsets = kvc_py_call_i64(&c, PB_OFF, &p.offsets_stride);
        p.lengths = kvc_py_call_i64(&c, PB_LEN, &p.lengths_stride);
        p.page_offsets = kvc_py_call_i64(&c, PB_POFF, &p.page_offsets_stride);
        p.first_page = kvc_py_call_i64(&c, PB_FIRST, &p.first_page_stride);
        p.num_heads = c.a[PB_LEN].view.shape[0];
    } else {
        n = c.a[PB_K].view.shape[2];
        Np = c.a[PB_MIN].view.shape[2];
        first = c.i[PB_FIRST];
        last = c.i[PB_LAST];
        if (last < first) {
            kvc_py_raise(st->ValueError, "last: %lld is before first (%lld)", (long long)last, (long long)first);
            goto done;
        }
        if (last > first && (last > Np || (last - 1) * P >= n)) {
            kvc_py_raise(st->ValueError,
                         "last: pages %lld..%lld need %lld bound rows and slots past %lld, but kmin has %lld "
                         "rows and keys %lld slots",
                         (long long)first, (long long)last, (long long)last, (long long)((last - 1) * P),
                         (long long)Np, (long long)n);
            goto done;
        }
        if (kvc_py_call_finish(st, &c) < 0) goto done;
        p.first = first;
        p.last = last;
    }
    p.keys = c.a[PB_K].view;
    p.kmin = c.a[PB_MIN].view;
    p.kmax = c.a[PB_MAX].view;
    p.page_size = P;
    p.num_threads = st->num_threads;
    if (kvc_py_run(st, &op_page_bounds, &p, NULL, NULL, c.a, c.n) < 0) goto done;
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

/* ------------------------------------------------------------------------ */

PyDoc_STRVAR(page_scores_doc,
             "page_scores(query, kmin, kmax, out, gqa, first_page, lengths, page_offsets, page_size)\n--\n\n"
             "Low-level: see kvcompress.ops.page_scores.");

enum { PS_Q, PS_MIN, PS_MAX, PS_OUT, PS_GQA, PS_START, PS_LEN, PS_POFF, PS_P, PS_N };
static const struct kvc_py_spec page_scores_spec[PS_N] = {
    KVC_PY_IN("query", 3, "[B, Hq, D]", DT_FLOAT),
    KVC_PY_IN("kmin", 4, "[B, H, Np, D]", DT_F32),
    KVC_PY_IN("kmax", 4, "[B, H, Np, D]", DT_F32),
    KVC_PY_OUT("out", 3, "[B, H, pages]", DT_F32),
    KVC_PY_INT_IN("gqa", 0, 1),
    /* the first page holding a real slot: a kv_start in pages (KVC_PY_START
     * checks 0 <= it <= Np) */
    KVC_PY_START("Np"),
    KVC_PY_CUSTOM_ARG("lengths", 0, NULL, 0),
    KVC_PY_CUSTOM_ARG("page_offsets", 0, NULL, 0),
    KVC_PY_INT_IN("page_size", 1, INT32_MAX),
};

/* Ragged layout (page_offsets given): bounds [Rp, D], heads [B * H]. */
static const struct kvc_py_spec page_scores_ragged_spec[PS_N] = {
    KVC_PY_IN("query", 3, "[B, Hq, D]", DT_FLOAT),
    KVC_PY_IN("kmin", 2, "[Rp, D]", DT_F32),
    KVC_PY_IN("kmax", 2, "[Rp, D]", DT_F32),
    KVC_PY_OUT("out", 3, "[B, H, pages]", DT_F32),
    KVC_PY_INT_IN("gqa", 0, 1),
    KVC_PY_CUSTOM_ARG("kv_start", 0, NULL, 0),
    KVC_PY_IN("lengths", 1, "[B * H]", DT_I64),
    KVC_PY_IN("page_offsets", 1, "[B * H]", DT_I64),
    KVC_PY_INT_IN("page_size", 1, INT32_MAX),
};

static PyObject *py_page_scores(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_page_scores_params p;
    PyObject *ret = NULL;
    int64_t B, H, Hq, np, P;
    int ragged;
    memset(&p, 0, sizeof p);
    if (kvc_py_check_nargs("page_scores", nargs, PS_N) < 0) return NULL;
    ragged = args[PS_POFF] != Py_None;
    if (ragged && args[PS_START] != Py_None) {
        kvc_py_raise(st->ValueError, "kv_start: only for the uniform layout (a ragged head holds no padding)");
        return NULL;
    }
    if (!ragged && args[PS_LEN] != Py_None) {
        kvc_py_raise(st->ValueError, "page_offsets: the ragged layout needs both lengths and page_offsets");
        return NULL;
    }
    if (kvc_py_call_parse(st, "page_scores", ragged ? page_scores_ragged_spec : page_scores_spec, PS_N, args,
                          nargs, &c) < 0)
        return NULL;
    B = c.a[PS_Q].view.shape[0];
    Hq = c.a[PS_Q].view.shape[1];
    H = c.a[PS_OUT].view.shape[1];
    np = c.a[PS_OUT].view.shape[2];
    P = c.i[PS_P];
    if (ragged) {
        const int64_t N = c.a[PS_LEN].view.shape[0];
        if (N != B * H) {
            kvc_py_raise(st->ValueError, "lengths: %lld entries is not B * H = %lld * %lld (query's batch, "
                         "out's heads)", (long long)N, (long long)B, (long long)H);
            goto done;
        }
    } else {
        H = c.a[PS_MIN].view.shape[1];
        if (np > c.a[PS_MIN].view.shape[2]) {
            kvc_py_raise(st->ValueError, "out: scores for %lld pages but kmin bounds only %lld",
                         (long long)np, (long long)c.a[PS_MIN].view.shape[2]);
            goto done;
        }
    }
    if (kvc_py_check_group(st, "query", Hq, H) < 0) goto done;
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    if (ragged) {
        const struct kvc_view *hl = kvc_py_arg_host(st, &c.a[PS_LEN]);
        const struct kvc_view *hpo = hl ? kvc_py_arg_host(st, &c.a[PS_POFF]) : NULL;
        const int64_t Rp = c.a[PS_MIN].view.shape[0];
        int64_t i;
        if (hpo == NULL) goto done;
        for (i = 0; i < hl->shape[0]; i++) {
            const int64_t n = kvc_py_i64_at(hl, i), po = kvc_py_i64_at(hpo, i);
            const int64_t pages = n / P + (n % P != 0);
            if (n < 0) {
                kvc_py_raise(st->ValueError, "lengths: value %lld of head %lld is negative", (long long)n,
                             (long long)i);
                goto done;
            }
            if (pages > np) {
                kvc_py_raise(st->ValueError, "num_pages: head %lld has %lld pages (%lld slots), more than the "
                             "%lld columns of out", (long long)i, (long long)pages, (long long)n,
                             (long long)np);
                goto done;
            }
            if (pages > 0 && (po < 0 || po > Rp || pages > Rp - po)) {
                kvc_py_raise(st->ValueError, "page_offsets: bound rows [%lld, %lld + %lld) of head %lld are "
                             "outside the %lld rows of kmin", (long long)po, (long long)po, (long long)pages,
                             (long long)i, (long long)Rp);
                goto done;
            }
        }
        p.lengths = kvc_py_call_i64(&c, PS_LEN, &p.lengths_stride);
        p.page_offsets = kvc_py_call_i64(&c, PS_POFF, &p.page_offsets_stride);
    } else {
        p.first_page = kvc_py_call_i64(&c, PS_START, &p.first_page_stride);
    }
    p.q = c.a[PS_Q].view;
    p.kmin = c.a[PS_MIN].view;
    p.kmax = c.a[PS_MAX].view;
    p.out = c.a[PS_OUT].view;
    p.gqa = (int32_t)c.i[PS_GQA];
    p.page_size = P;
    p.num_threads = st->num_threads;
    if (kvc_py_run(st, &op_page_scores, &p, NULL, NULL, c.a, c.n) < 0) goto done;
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

/* ------------------------------------------------------------------------ */

PyDoc_STRVAR(attention_pages_doc,
             "attention_pages(queries, keys, values, out, scaling, kv_start, pages, page_size, counts, offsets, "
             "lengths)\n--\n\n"
             "Low-level: see kvcompress.ops.attention_pages.");

enum { AP_Q, AP_K, AP_V, AP_OUT, AP_SCALE, AP_START, AP_PAGES, AP_P, AP_CNT, AP_OFF, AP_LEN, AP_N };
static const struct kvc_py_spec attention_pages_spec[AP_N] = {
    KVC_PY_IN("queries", 4, "[B, Hq, q, D]", DT_FLOAT),
    {.name = "keys", .kind = KVC_PY_TENSOR, .ndim = 4, .dims = "[B, Hkv, n, D]", .dtypes = DT_FLOAT,
     .like = AP_Q + 1},
    KVC_PY_IN_LIKE("values", 4, "[B, Hkv, n, D]", AP_Q),
    KVC_PY_OUT_LIKE("out", 4, "[B, q, Hq, D]", AP_Q),
    KVC_PY_FINITE("scaling"),
    KVC_PY_START("n"),
    KVC_PY_IN("pages", 3, "[B, Hkv, np]", DT_I64),
    KVC_PY_INT_IN("page_size", 1, INT32_MAX),
    KVC_PY_OPT("counts", 3, "[B, Hkv, n]", DT_F32 | (1u << KVC_I32)),
    KVC_PY_CUSTOM_ARG("offsets", 0, NULL, 0),
    KVC_PY_CUSTOM_ARG("lengths", 0, NULL, 0),
};

/* Ragged layout (offsets and lengths given): [N, D] rows, a segment per
 * head; Hkv is the pages' head dim. */
static const struct kvc_py_spec attention_pages_ragged_spec[AP_N] = {
    KVC_PY_IN("queries", 4, "[B, Hq, q, D]", DT_FLOAT),
    {.name = "keys", .kind = KVC_PY_TENSOR, .ndim = 2, .dims = "[N, D]", .dtypes = DT_FLOAT, .like = AP_Q + 1},
    KVC_PY_IN_LIKE("values", 2, "[N, D]", AP_Q),
    KVC_PY_OUT_LIKE("out", 4, "[B, q, Hq, D]", AP_Q),
    KVC_PY_FINITE("scaling"),
    KVC_PY_CUSTOM_ARG("kv_start", 0, NULL, 0),
    KVC_PY_IN("pages", 3, "[B, Hkv, np]", DT_I64),
    KVC_PY_INT_IN("page_size", 1, INT32_MAX),
    KVC_PY_OPT("counts", 1, "[N]", DT_F32 | (1u << KVC_I32)),
    KVC_PY_IN("offsets", 1, "[B * Hkv]", DT_I64),
    KVC_PY_IN("lengths", 1, "[B * Hkv]", DT_I64),
};

/* Each head's page list: strictly ascending, inside the layer, ending with
 * the newest page (attention.h). */
static int check_pages(struct kvc_state *st, const struct kvc_view *pv, int64_t n, int64_t P)
{
    const int64_t B = pv->shape[0], H = pv->shape[1], np = pv->shape[2], newest = (n - 1) / P;
    int64_t b, h, i;
    for (b = 0; b < B; b++)
        for (h = 0; h < H; h++) {
            const int64_t *pg = (const int64_t *)pv->data + b * pv->strides[0] + h * pv->strides[1];
            for (i = 0; i < np; i++) {
                const int64_t x = pg[i * pv->strides[2]];
                if (x < 0 || x > newest)
                    return kvc_py_raise(st->ValueError, "pages: page %lld of head (%lld, %lld) is outside the "
                                        "layer's %lld pages", (long long)x, (long long)b, (long long)h,
                                        (long long)(newest + 1));
                if (i > 0 && x <= pg[(i - 1) * pv->strides[2]])
                    return kvc_py_raise(st->ValueError, "pages: the pages of head (%lld, %lld) are not strictly "
                                        "ascending", (long long)b, (long long)h);
            }
            if (pg[(np - 1) * pv->strides[2]] != newest)
                return kvc_py_raise(st->ValueError, "pages: head (%lld, %lld) does not read the newest page "
                                    "(%lld), which holds the query", (long long)b, (long long)h,
                                    (long long)newest);
        }
    return 0;
}

/* The ragged lists (contiguous [B * Hkv, np]): leading negatives, then
 * strictly ascending pages of the head ending with its newest; an empty
 * head lists only negatives (attention.h). */
static int check_pages_ragged(struct kvc_state *st, const struct kvc_view *pv, const struct kvc_view *len,
                              int64_t P)
{
    const int64_t Hkv = pv->shape[1], np = pv->shape[2];
    int64_t i, k;
    for (i = 0; i < len->shape[0]; i++) {
        const int64_t n = kvc_py_i64_at(len, i), pages = n / P + (n % P != 0), b = i / Hkv, h = i % Hkv;
        const int64_t *pg = (const int64_t *)pv->data + i * np;
        int64_t k0 = 0;
        while (k0 < np && pg[k0] < 0) k0++;
        for (k = k0; k < np; k++) {
            if (pg[k] < 0)
                return kvc_py_raise(st->ValueError, "pages: head (%lld, %lld) lists %lld after page %lld: "
                                    "negative entries (padding) only before its first page",
                                    (long long)b, (long long)h, (long long)pg[k], (long long)pg[k - 1]);
            if (pg[k] >= pages)
                return kvc_py_raise(st->ValueError, "pages: page %lld of head (%lld, %lld) is outside the "
                                    "head's %lld pages (%lld slots)", (long long)pg[k], (long long)b,
                                    (long long)h, (long long)pages, (long long)n);
            if (k > k0 && pg[k] <= pg[k - 1])
                return kvc_py_raise(st->ValueError, "pages: the pages of head (%lld, %lld) are not strictly "
                                    "ascending", (long long)b, (long long)h);
        }
        if (n > 0 && k0 == np)
            return kvc_py_raise(st->ValueError, "pages: head (%lld, %lld) has %lld slots but reads no page",
                                (long long)b, (long long)h, (long long)n);
        if (n > 0 && pg[np - 1] != pages - 1)
            return kvc_py_raise(st->ValueError, "pages: head (%lld, %lld) does not read its newest page "
                                "(%lld), which holds the query", (long long)b, (long long)h,
                                (long long)(pages - 1));
    }
    return 0;
}

static PyObject *py_attention_pages(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_attention_params p;
    PyObject *ret = NULL;
    int64_t B, Hq, Hkv, n, P, np;
    int ragged;
    const struct kvc_view *pv, *hp;
    memset(&p, 0, sizeof p);
    if (kvc_py_check_nargs("attention_pages", nargs, AP_N) < 0) return NULL;
    ragged = kvc_py_ragged_layout(st, args[AP_OFF], args[AP_LEN], args[AP_START]);
    if (ragged < 0) return NULL;
    if (kvc_py_call_parse(st, "attention_pages", ragged ? attention_pages_ragged_spec : attention_pages_spec,
                          AP_N, args, nargs, &c) < 0)
        return NULL;
    B = c.a[AP_Q].view.shape[0];
    Hq = c.a[AP_Q].view.shape[1];
    P = c.i[AP_P];
    pv = &c.a[AP_PAGES].view;
    Hkv = ragged ? pv->shape[1] : c.a[AP_K].view.shape[1];
    np = pv->shape[2];
    n = ragged ? 0 : c.a[AP_K].view.shape[2];
    if (kvc_py_check_one_query(st, "paged attention", c.a[AP_Q].view.shape[2]) < 0 ||
        kvc_py_check_group(st, "queries", Hq, Hkv) < 0)
        goto done;
    if (ragged) {
        /* before the shared sizes, which would name the [B * Hkv] size alone */
        if (c.a[AP_OFF].view.shape[0] != B * Hkv) {
            kvc_py_raise(st->ValueError, "offsets: %lld entries is not B * Hkv = %lld * %lld (queries' batch, "
                         "pages' heads)", (long long)c.a[AP_OFF].view.shape[0], (long long)B, (long long)Hkv);
            goto done;
        }
    } else if (n < 1 || np < 1) {
        kvc_py_raise(st->ValueError, "pages: every head must read at least one page of a non-empty layer "
                     "(%lld pages, %lld slots)", (long long)np, (long long)n);
        goto done;
    }
    /* an empty list has no strides to speak of (ragged: every head empty) */
    if (kvc_py_view_numel(pv) > 0 &&
        (pv->strides[2] != 1 || pv->strides[1] != np || (pv->shape[0] > 1 && pv->strides[0] != Hkv * np))) {
        kvc_py_raise(st->ValueError, "pages: must be contiguous (call .contiguous())");
        goto done;
    }
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    hp = kvc_py_arg_host(st, &c.a[AP_PAGES]);
    if (hp == NULL) goto done;
    if (ragged) {
        const struct kvc_view *hoff = kvc_py_arg_host(st, &c.a[AP_OFF]);
        const struct kvc_view *hlen = hoff ? kvc_py_arg_host(st, &c.a[AP_LEN]) : NULL;
        /* counts are not scanned (as in the uniform op): that would read
         * every slot of the layer, which paged reading exists to skip */
        if (hlen == NULL || kvc_py_check_segments(st, hoff, hlen, Hkv, c.a[AP_K].view.shape[0], "keys", 1, 1) < 0 ||
            check_pages_ragged(st, hp, hlen, P) < 0)
            goto done;
        p.offsets = kvc_py_call_i64(&c, AP_OFF, &p.offsets_stride);
        p.lengths = kvc_py_call_i64(&c, AP_LEN, &p.lengths_stride);
        p.layout = KVC_KV_RAGGED;
    } else {
        if (check_pages(st, hp, n, P) < 0) goto done;
        p.layout = KVC_KV_UNIFORM;
        p.kv_start = kvc_py_call_i64(&c, AP_START, &p.kv_start_stride);
    }
    p.q = c.a[AP_Q].view;
    p.k = c.a[AP_K].view;
    p.v = c.a[AP_V].view;
    p.out = c.a[AP_OUT].view;
    if (c.a[AP_CNT].t) p.counts = c.a[AP_CNT].view;
    p.num_kv_heads = Hkv;
    p.pages = (const int64_t *)pv->data;
    p.num_pages = np;
    p.page_size = P;
    p.scaling = (float)c.f[AP_SCALE];
    p.num_threads = st->num_threads;
    {
        void **scratch = kvc_py_view_numel(&p.out) > 0 ? &p.scratch : NULL;
        if (kvc_py_run(st, &op_attention_pages, &p, scratch, &p.scratch_bytes, c.a, c.n) < 0) goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

PyMethodDef kvc_py_pages_methods[] = {
    {"page_bounds", (PyCFunction)(void (*)(void))py_page_bounds, METH_FASTCALL, page_bounds_doc},
    {"page_scores", (PyCFunction)(void (*)(void))py_page_scores, METH_FASTCALL, page_scores_doc},
    {"attention_pages", (PyCFunction)(void (*)(void))py_attention_pages, METH_FASTCALL, attention_pages_doc},
    {NULL, NULL, 0, NULL}};
