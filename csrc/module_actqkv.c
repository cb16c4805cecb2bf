/*
 * module_actqkv.c - binding of actqkv_scores (ActQKV probe-query scores):
 * validate once, run with the GIL released, map status codes to exceptions.
 */
#include "module.h"
#include "module_run.h"
#include "module_spec.h"

#include <string.h>

#include "actqkv.h"

KVC_PY_OP(op_actqkv_scores, actqkv_scores, 1, 1)

PyDoc_STRVAR(actqkv_scores_doc,
             "actqkv_scores(queries, keys, out, weights, scaling, kv_start)\n--\n\n"
             "Low-level: see kvcompress.ops.actqkv_scores.");

enum { AQ_Q, AQ_K, AQ_OUT, AQ_W, AQ_SCALING, AQ_START, AQ_N };
static const struct kvc_py_spec actqkv_scores_spec[AQ_N] = {
    KVC_PY_IN("queries", 4, "[B, Hq, W, D]", DT_FLOAT),
    /* batch and head dim: kvc_py_check_qk, with its own messages */
    KVC_PY_IN_FREE("keys", 4, "[B, Hkv, Tk, D]", DT_FLOAT, 0x9),
    KVC_PY_OUT("out", 3, "[B, Hkv, Tk]", DT_F32),
    KVC_PY_OUT("weights", 3, "[B, Hq, W]", DT_F32),
    KVC_PY_FINITE("scaling"),
    KVC_PY_START("Tk"),
};

static PyObject *py_actqkv_scores(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_actqkv_scores_params p;
    const struct kvc_view *q, *k;
    PyObject *ret = NULL;
    memset(&p, 0, sizeof p);
    if (kvc_py_call_parse(st, "actqkv_scores", actqkv_scores_spec, AQ_N, args, nargs, &c) < 0) return NULL;
    q = &c.a[AQ_Q].view;
    k = &c.a[AQ_K].view;
    if (kvc_py_check_qk(st, q, k) < 0) goto done;
    if (q->shape[3] < 1) {
        /* the activation bias divides by the mean channel variance */
        kvc_py_raise(st->ValueError, "queries: head dim must be >= 1, got 0");
        goto done;
    }
    if (q->shape[2] > k->shape[2]) {
        kvc_py_raise(st->ValueError,
                     "queries: %lld window queries but only %lld keys (the window is the last W positions)",
                     (long long)q->shape[2], (long long)k->shape[2]);
        goto done;
    }
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    p.q = *q;
    p.k = *k;
    p.out = c.a[AQ_OUT].view;
    p.weights = c.a[AQ_W].view;
    p.kv_start = kvc_py_call_i64(&c, AQ_START, &p.kv_start_stride);
    p.scaling = (float)c.f[AQ_SCALING];
    p.num_threads = st->num_threads;
    {
        /* an empty problem takes no scratch */
        void **scratch = kvc_py_view_numel(&p.out) > 0 && p.q.shape[2] > 0 ? &p.scratch : NULL;
        if (kvc_py_run(st, &op_actqkv_scores, &p, scratch, &p.scratch_bytes, c.a, c.n) < 0) goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

PyMethodDef kvc_py_actqkv_methods[] = {
    {"actqkv_scores", (PyCFunction)(void (*)(void))py_actqkv_scores, METH_FASTCALL, actqkv_scores_doc},
    {NULL, NULL, 0, NULL}};
