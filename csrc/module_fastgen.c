/*
 * module_fastgen.c - binding of fastgen_recovery (FastGen): validate once,
 * run with the GIL released.
 */
#include "module.h"
#include "module_run.h"
#include "module_spec.h"

#include <string.h>

#include "fastgen.h"

KVC_PY_OP(op_fastgen_recovery, fastgen_recovery, 1, 1)

PyDoc_STRVAR(fastgen_recovery_doc,
             "fastgen_recovery(queries, keys, rung, out, scaling, kv_start)\n--\n\n"
             "Low-level: see kvcompress.ops.fastgen_recovery.");

enum { FG_Q, FG_K, FG_RUNG, FG_OUT, FG_SCALING, FG_START, FG_N };
static const struct kvc_py_spec fastgen_recovery_spec[FG_N] = {
    KVC_PY_IN("queries", 4, "[B, Hq, Tq, D]", DT_FLOAT),
    /* batch and head dim: kvc_py_check_qk, with its own messages */
    KVC_PY_IN_FREE("keys", 4, "[B, Hkv, Tk, D]", DT_FLOAT, 0x9),
    KVC_PY_IN("rung", 3, "[B, Hkv, Tk]", DT_U8),
    /* P: checked below (1 .. KVC_FASTGEN_MAX_RUNGS) */
    KVC_PY_OUT_FREE("out", 3, "[B, Hkv, P]", DT_F32, 0x4),
    KVC_PY_FINITE("scaling"),
    KVC_PY_START("Tk"),
};

static PyObject *py_fastgen_recovery(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_fastgen_recovery_params p;
    const struct kvc_view *q, *k;
    PyObject *ret = NULL;
    memset(&p, 0, sizeof p);
    if (kvc_py_call_parse(st, "fastgen_recovery", fastgen_recovery_spec, FG_N, args, nargs, &c) < 0) return NULL;
    q = &c.a[FG_Q].view;
    k = &c.a[FG_K].view;
    if (kvc_py_check_qk(st, q, k) < 0) goto done;
    if (q->shape[2] > k->shape[2]) {
        kvc_py_raise(st->ValueError, "queries: %lld queries but only %lld keys (queries are the last Tq positions)",
                     (long long)q->shape[2], (long long)k->shape[2]);
        goto done;
    }
    if (c.a[FG_OUT].view.shape[2] < 1 || c.a[FG_OUT].view.shape[2] > KVC_FASTGEN_MAX_RUNGS) {
        kvc_py_raise(st->ValueError, "out: expected 1 to %d rungs (P), got %lld", KVC_FASTGEN_MAX_RUNGS,
                     (long long)c.a[FG_OUT].view.shape[2]);
        goto done;
    }
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    p.q = *q;
    p.k = *k;
    p.rung = c.a[FG_RUNG].view;
    p.out = c.a[FG_OUT].view;
    p.kv_start = kvc_py_call_i64(&c, FG_START, &p.kv_start_stride);
    p.scaling = (float)c.f[FG_SCALING];
    p.num_threads = st->num_threads;
    {
        /* an empty problem takes no scratch */
        void **scratch = kvc_py_view_numel(&p.out) > 0 ? &p.scratch : NULL;
        if (kvc_py_run(st, &op_fastgen_recovery, &p, scratch, &p.scratch_bytes, c.a, c.n) < 0) goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

PyMethodDef kvc_py_fastgen_methods[] = {
    {"fastgen_recovery", (PyCFunction)(void (*)(void))py_fastgen_recovery, METH_FASTCALL, fastgen_recovery_doc},
    {NULL, NULL, 0, NULL}};
