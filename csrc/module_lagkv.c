/*
 * module_lagkv.c - binding of lagkv_scores (LagKV token scores): validate
 * once, run with the GIL released, map status codes to exceptions.
 */
#include "module.h"
#include "module_run.h"
#include "module_spec.h"

#include <string.h>

#include "lagkv.h"

KVC_PY_OP(op_lagkv_scores, lagkv_scores, 1, 1)

PyDoc_STRVAR(lagkv_scores_doc,
             "lagkv_scores(keys, values, out, sinks, lag, per_chunk, kv_start)\n--\n\n"
             "Low-level: see kvcompress.ops.lagkv_scores.");

enum { LG_K, LG_V, LG_OUT, LG_SINKS, LG_LAG, LG_RANK, LG_START, LG_N };
static const struct kvc_py_spec lagkv_scores_spec[LG_N] = {
    KVC_PY_IN("keys", 4, "[B, H, T, D]", DT_FLOAT),
    KVC_PY_IN_LIKE("values", 4, "[B, H, T, Dv]", LG_K),
    KVC_PY_OUT("out", 3, "[B, H, T]", DT_F32),
    KVC_PY_INT_IN("sinks", 0, INT64_MAX),
    KVC_PY_INT_IN("lag", 1, INT64_MAX),
    KVC_PY_FLAG("per_chunk"),
    KVC_PY_START("T"),
};

static PyObject *py_lagkv_scores(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_lagkv_scores_params p;
    PyObject *ret = NULL;
    int k;
    memset(&p, 0, sizeof p);
    if (kvc_py_call_parse(st, "lagkv_scores", lagkv_scores_spec, LG_N, args, nargs, &c) < 0) return NULL;
    for (k = LG_K; k <= LG_V; k++) {
        /* the score is a sample standard deviation over the channels */
        const int64_t D = c.a[k].view.shape[3];
        if (D < 2) {
            kvc_py_raise(st->ValueError, "%s: head dim must be >= 2 (LagKV takes a standard deviation over "
                         "channels), got %lld", k == LG_K ? "keys" : "values", (long long)D);
            goto done;
        }
    }
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    p.k = c.a[LG_K].view;
    p.v = c.a[LG_V].view;
    p.out = c.a[LG_OUT].view;
    p.kv_start = kvc_py_call_i64(&c, LG_START, &p.kv_start_stride);
    p.sinks = c.i[LG_SINKS];
    p.lag = c.i[LG_LAG];
    p.mode = c.i[LG_RANK] ? KVC_LAGKV_RANK : KVC_LAGKV_RAW;
    p.num_threads = st->num_threads;
    {
        /* an empty problem takes no scratch */
        void **scratch = kvc_py_view_numel(&p.out) > 0 ? &p.scratch : NULL;
        if (kvc_py_run(st, &op_lagkv_scores, &p, scratch, &p.scratch_bytes, c.a, c.n) < 0) goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

PyMethodDef kvc_py_lagkv_methods[] = {
    {"lagkv_scores", (PyCFunction)(void (*)(void))py_lagkv_scores, METH_FASTCALL, lagkv_scores_doc},
    {NULL, NULL, 0, NULL}};
