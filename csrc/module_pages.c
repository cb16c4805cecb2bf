/*
 * module_pages.c - bindings of the paged (Quest) ops: page_bounds,
 * page_scores and attention_pages (kvc_attention reading a page list).
 * Validate once, run with the GIL released.
 */
#include "module.h"
#include "module_run.h"
#include "module_spec.h"

#include <string.h>

#include "attention.h"
#include "pages.h"

KVC_PY_OP(op_page_bounds, page_bounds, 0, 0)
KVC_PY_OP(op_page_scores, page_scores, 0, 0)
KVC_PY_OP(op_attention_pages, attention, 1, 1)

/* ------------------------------------------------------------------------ */

PyDoc_STRVAR(page_bounds_doc,
             "page_bounds(keys, kmin, kmax, page_size, first, last)\n--\n\n"
             "Low-level: see kvcompress.ops.page_bounds.");

enum { PB_K, PB_MIN, PB_MAX, PB_P, PB_FIRST, PB_LAST, PB_N };
static const struct kvc_py_spec page_bounds_spec[PB_N] = {
    KVC_PY_IN("keys", 4, "[B, H, n, D]", DT_FLOAT),
    KVC_PY_OUT("kmin", 4, "[B, H, Np, D]", DT_F32),
    KVC_PY_OUT("kmax", 4, "[B, H, Np, D]", DT_F32),
    KVC_PY_INT_IN("page_size", 1, INT32_MAX),
    KVC_PY_INT_IN("first", 0, INT64_MAX),
    KVC_PY_INT_IN("last", 0, INT64_MAX),
};

static PyObject *py_page_bounds(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_page_bounds_params p;
    PyObject *ret = NULL;
    int64_t n, Np, P, first, last;
    memset(&p, 0, sizeof p);
    if (kvc_py_call_parse(st, "page_bounds", page_bounds_spec, PB_N, args, nargs, &c) < 0) return NULL;
    n = c.a[PB_K].view.shape[2];
    Np = c.a[PB_MIN].view.shape[2];
    P = c.i[PB_P];
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
    p.keys = c.a[PB_K].view;
    p.kmin = c.a[PB_MIN].view;
    p.kmax = c.a[PB_MAX].view;
    p.page_size = P;
    p.first = first;
    p.last = last;
    p.num_threads = st->num_threads;
    if (kvc_py_run(st, &op_page_bounds, &p, NULL, NULL, c.a, c.n) < 0) goto done;
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

/* ------------------------------------------------------------------------ */

PyDoc_STRVAR(page_scores_doc,
             "page_scores(query, kmin, kmax, out, gqa, first_page)\n--\n\n"
             "Low-level: see kvcompress.ops.page_scores.");

enum { PS_Q, PS_MIN, PS_MAX, PS_OUT, PS_GQA, PS_START, PS_N };
static const struct kvc_py_spec page_scores_spec[PS_N] = {
    KVC_PY_IN("query", 3, "[B, Hq, D]", DT_FLOAT),
    KVC_PY_IN("kmin", 4, "[B, H, Np, D]", DT_F32),
    KVC_PY_IN("kmax", 4, "[B, H, Np, D]", DT_F32),
    KVC_PY_OUT("out", 3, "[B, H, pages]", DT_F32),
    KVC_PY_INT_IN("gqa", 0, 1),
    /* the first page holding a real slot: a kv_start in pages (KVC_PY_START
     * checks 0 <= it <= Np) */
    KVC_PY_START("Np"),
};

static PyObject *py_page_scores(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_page_scores_params p;
    PyObject *ret = NULL;
    int64_t H, Hq;
    memset(&p, 0, sizeof p);
    if (kvc_py_call_parse(st, "page_scores", page_scores_spec, PS_N, args, nargs, &c) < 0) return NULL;
    H = c.a[PS_MIN].view.shape[1];
    Hq = c.a[PS_Q].view.shape[1];
    if (kvc_py_check_group(st, "query", Hq, H) < 0) goto done;
    if (c.a[PS_OUT].view.shape[2] > c.a[PS_MIN].view.shape[2]) {
        kvc_py_raise(st->ValueError, "out: scores for %lld pages but kmin bounds only %lld",
                     (long long)c.a[PS_OUT].view.shape[2], (long long)c.a[PS_MIN].view.shape[2]);
        goto done;
    }
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    p.q = c.a[PS_Q].view;
    p.kmin = c.a[PS_MIN].view;
    p.kmax = c.a[PS_MAX].view;
    p.out = c.a[PS_OUT].view;
    p.gqa = (int32_t)c.i[PS_GQA];
    p.first_page = kvc_py_call_i64(&c, PS_START, &p.first_page_stride);
    p.num_threads = st->num_threads;
    if (kvc_py_run(st, &op_page_scores, &p, NULL, NULL, c.a, c.n) < 0) goto done;
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

/* ------------------------------------------------------------------------ */

PyDoc_STRVAR(attention_pages_doc,
             "attention_pages(queries, keys, values, out, scaling, kv_start, pages, page_size, counts)\n--\n\n"
             "Low-level: see kvcompress.ops.attention_pages.");

enum { AP_Q, AP_K, AP_V, AP_OUT, AP_SCALE, AP_START, AP_PAGES, AP_P, AP_CNT, AP_N };
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

static PyObject *py_attention_pages(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_attention_params p;
    PyObject *ret = NULL;
    int64_t Hq, Hkv, n, P, np;
    const struct kvc_view *pv, *hp;
    memset(&p, 0, sizeof p);
    if (kvc_py_call_parse(st, "attention_pages", attention_pages_spec, AP_N, args, nargs, &c) < 0) return NULL;
    Hq = c.a[AP_Q].view.shape[1];
    Hkv = c.a[AP_K].view.shape[1];
    n = c.a[AP_K].view.shape[2];
    P = c.i[AP_P];
    pv = &c.a[AP_PAGES].view;
    np = pv->shape[2];
    if (kvc_py_check_one_query(st, "paged attention", c.a[AP_Q].view.shape[2]) < 0 ||
        kvc_py_check_group(st, "queries", Hq, Hkv) < 0)
        goto done;
    if (n < 1 || np < 1) {
        kvc_py_raise(st->ValueError, "pages: every head must read at least one page of a non-empty layer "
                     "(%lld pages, %lld slots)", (long long)np, (long long)n);
        goto done;
    }
    if (pv->strides[2] != 1 || pv->strides[1] != np || (pv->shape[0] > 1 && pv->strides[0] != Hkv * np)) {
        kvc_py_raise(st->ValueError, "pages: must be contiguous (call .contiguous())");
        goto done;
    }
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    hp = kvc_py_arg_host(st, &c.a[AP_PAGES]);
    if (hp == NULL || check_pages(st, hp, n, P) < 0) goto done;
    p.q = c.a[AP_Q].view;
    p.k = c.a[AP_K].view;
    p.v = c.a[AP_V].view;
    p.out = c.a[AP_OUT].view;
    if (c.a[AP_CNT].t) p.counts = c.a[AP_CNT].view;
    p.layout = KVC_KV_UNIFORM;
    p.num_kv_heads = Hkv;
    p.kv_start = kvc_py_call_i64(&c, AP_START, &p.kv_start_stride);
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
