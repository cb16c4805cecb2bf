/*
 * module_kvmerger.c - bindings of kvmerger_sets and gauss_merge
 * (kvmerger.c): validate once (the centers, the sets, the counts, sigma),
 * run with the GIL released, map status codes to exceptions.
 */
#include "module.h"
#include "module_run.h"
#include "module_segments.h"
#include "module_spec.h"

#include <stdio.h>
#include <string.h>

#include "kvmerger.h"

KVC_PY_OP(op_kvmerger_sets, kvmerger_sets, 0, 0)
KVC_PY_OP(op_gauss_merge, gauss_merge, 1, 0)

PyDoc_STRVAR(kvmerger_sets_doc,
             "kvmerger_sets(keys, sims, runs, sinks, window, threshold, kv_start)\n--\n\n"
             "Low-level: see kvcompress.ops.kvmerger_sets.");

enum { KS_KEYS, KS_SIMS, KS_RUNS, KS_SINKS, KS_WINDOW, KS_THR, KS_START, KS_N };
static const struct kvc_py_spec kvmerger_sets_spec[KS_N] = {
    KVC_PY_IN("keys", 4, "[B, H, T, D]", DT_FLOAT),
    KVC_PY_OUT("sims", 3, "[B, H, T]", DT_F32),
    KVC_PY_OUT("runs", 3, "[B, H, T]", DT_I64),
    KVC_PY_INT_IN("sinks", 0, INT64_MAX),
    KVC_PY_INT_IN("window", 0, INT64_MAX),
    KVC_PY_FINITE("threshold"),
    KVC_PY_START("T"),
};

static PyObject *py_kvmerger_sets(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_kvmerger_sets_params p;
    PyObject *ret = NULL;
    memset(&p, 0, sizeof p);
    if (kvc_py_call_parse(st, "kvmerger_sets", kvmerger_sets_spec, KS_N, args, nargs, &c) < 0) return NULL;
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    p.keys = c.a[KS_KEYS].view;
    p.sims = c.a[KS_SIMS].view;
    p.runs = c.a[KS_RUNS].view;
    p.sinks = c.i[KS_SINKS];
    p.window = c.i[KS_WINDOW];
    p.threshold = (float)c.f[KS_THR];
    p.kv_start = kvc_py_call_i64(&c, KS_START, &p.kv_start_stride);
    p.num_threads = st->num_threads;
    if (kvc_py_run(st, &op_kvmerger_sets, &p, NULL, NULL, c.a, c.n) < 0) goto done;
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

PyDoc_STRVAR(gauss_merge_doc,
             "gauss_merge(keys, values, scores, centers, runs, counts, sigma, kv_start, out_keys, out_values, "
             "out_counts, assign)\n--\n\n"
             "Low-level: see kvcompress.ops.gauss_merge.");

enum { G_KEYS, G_VALUES, G_SCORES, G_CENTERS, G_RUNS, G_COUNTS, G_SIGMA, G_START, G_OK, G_OV, G_OC, G_ASSIGN,
       G_N };
static const struct kvc_py_spec gauss_merge_spec[G_N] = {
    KVC_PY_IN("keys", 4, "[B, H, T, D]", DT_FLOAT),
    KVC_PY_IN_LIKE("values", 4, "[B, H, T, Dv]", G_KEYS),
    KVC_PY_IN("scores", 3, "[B, H, T]", DT_F32),
    KVC_PY_IN("centers", 3, "[B, H, C]", DT_I64),
    KVC_PY_IN("runs", 3, "[B, H, T]", DT_I64),
    KVC_PY_OPT("counts", 3, "[B, H, T]", DT_F32),
    KVC_PY_FINITE("sigma"), /* > 0: below */
    KVC_PY_START("T"),
    KVC_PY_OUT_LIKE("out_keys", 4, "[B, H, C, D]", G_KEYS),
    KVC_PY_OUT_LIKE("out_values", 4, "[B, H, C, Dv]", G_KEYS),
    KVC_PY_OUT("out_counts", 3, "[B, H, C]", DT_F32),
    KVC_PY_OPT_OUT("assign", 3, "[B, H, T]", DT_I64),
};

static int64_t start_of(const struct kvc_view *ks, int64_t b)
{
    return ks ? kvc_py_i64_at(ks, b) : 0;
}

/* Every set one interval named by its first slot: runs[j] is -1, j, or
 * (j > 0) runs[j - 1] >= 0. O(B*H*T), next to the op's O(T*D). */
static int check_runs(struct kvc_state *st, const struct kvc_view *rv)
{
    const int64_t B = rv->shape[0], H = rv->shape[1], T = rv->shape[2];
    int64_t b, h, j;
    for (b = 0; b < B; b++)
        for (h = 0; h < H; h++) {
            const int64_t *r = (const int64_t *)rv->data + b * rv->strides[0] + h * rv->strides[1];
            for (j = 0; j < T; j++) {
                const int64_t x = r[j * rv->strides[2]];
                const int64_t prev = j > 0 ? r[(j - 1) * rv->strides[2]] : -1;
                if (x == -1 || x == j || (prev >= 0 && x == prev)) continue;
                return kvc_py_raise(st->ValueError,
                                    "runs: value %lld at [%lld, %lld, %lld] is not -1, the slot itself or the "
                                    "previous slot's set (%lld): every set must be one interval named by its "
                                    "first slot (as kvmerger_sets returns them)",
                                    (long long)x, (long long)b, (long long)h, (long long)j, (long long)prev);
            }
        }
    return 0;
}

/* Counts finite and > 0 on every valid slot (they are merge weights). */
static int check_counts(struct kvc_state *st, const struct kvc_view *cv, const struct kvc_view *ks)
{
    const int64_t B = cv->shape[0], H = cv->shape[1], T = cv->shape[2];
    int64_t b, h, j;
    for (b = 0; b < B; b++)
        for (h = 0; h < H; h++) {
            const float *x = (const float *)cv->data + b * cv->strides[0] + h * cv->strides[1];
            for (j = start_of(ks, b); j < T; j++) {
                const float v = x[j * cv->strides[2]];
                if (kvc_bad_count(v)) {
                    char buf[32];
                    snprintf(buf, sizeof buf, "%g", (double)v);
                    return kvc_py_raise(st->ValueError,
                                        "counts: value %s at [%lld, %lld, %lld] is not a finite count > 0", buf,
                                        (long long)b, (long long)h, (long long)j);
                }
            }
        }
    return 0;
}

static PyObject *py_gauss_merge(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_gauss_merge_params p;
    PyObject *ret = NULL;
    memset(&p, 0, sizeof p);
    if (kvc_py_call_parse(st, "gauss_merge", gauss_merge_spec, G_N, args, nargs, &c) < 0) return NULL;
    if (!(c.f[G_SIGMA] > 0.0) || !((float)c.f[G_SIGMA] > 0.0f)) {
        kvc_py_raise(st->ValueError, "sigma: must be > 0 (the Gaussian kernel's width), got %g", c.f[G_SIGMA]);
        goto done;
    }
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    {
        const struct kvc_view *hc = kvc_py_arg_host(st, &c.a[G_CENTERS]);
        const struct kvc_view *hr = hc ? kvc_py_arg_host(st, &c.a[G_RUNS]) : NULL;
        const struct kvc_view *hk = NULL, *hn = NULL;
        if (hr == NULL) goto done;
        if (c.a[G_START].t && (hk = kvc_py_arg_host(st, &c.a[G_START])) == NULL) goto done;
        if (c.a[G_COUNTS].t && (hn = kvc_py_arg_host(st, &c.a[G_COUNTS])) == NULL) goto done;
        if (kvc_py_check_centers(st, hc, hk, c.a[G_KEYS].view.shape[2]) < 0) goto done;
        if (check_runs(st, hr) < 0) goto done;
        if (hn && check_counts(st, hn, hk) < 0) goto done;
    }
    p.keys = c.a[G_KEYS].view;
    p.values = c.a[G_VALUES].view;
    p.scores = c.a[G_SCORES].view;
    p.centers = c.a[G_CENTERS].view;
    p.runs = c.a[G_RUNS].view;
    if (c.a[G_COUNTS].t) p.counts = c.a[G_COUNTS].view;
    p.out_keys = c.a[G_OK].view;
    p.out_values = c.a[G_OV].view;
    p.out_counts = c.a[G_OC].view;
    if (c.a[G_ASSIGN].t) p.assign = c.a[G_ASSIGN].view;
    p.kv_start = kvc_py_call_i64(&c, G_START, &p.kv_start_stride);
    p.sigma = (float)c.f[G_SIGMA];
    p.num_threads = st->num_threads;
    {
        /* an empty problem takes no scratch */
        void **scratch = p.keys.shape[0] * p.keys.shape[1] > 0 ? &p.scratch : NULL;
        if (kvc_py_run(st, &op_gauss_merge, &p, scratch, &p.scratch_bytes, c.a, c.n) < 0) goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

PyMethodDef kvc_py_kvmerger_methods[] = {
    {"kvmerger_sets", (PyCFunction)(void (*)(void))py_kvmerger_sets, METH_FASTCALL, kvmerger_sets_doc},
    {"gauss_merge", (PyCFunction)(void (*)(void))py_gauss_merge, METH_FASTCALL, gauss_merge_doc},
    {NULL, NULL, 0, NULL}};
