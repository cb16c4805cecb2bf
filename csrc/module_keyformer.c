/*
 * module_keyformer.c - binding of keyformer_scores (Keyformer): validate
 * once, run with the GIL released.
 */
#include "module.h"
#include "module_run.h"
#include "module_spec.h"

#include <math.h>
#include <string.h>

#include "keyformer.h"

KVC_PY_OP(op_keyformer_scores, keyformer_scores, 1, 1)

PyDoc_STRVAR(keyformer_scores_doc,
             "keyformer_scores(queries, keys, out, scaling, tau, noise, seed, layer, step, kv_start)\n--\n\n"
             "Low-level: see kvcompress.ops.keyformer_scores.");

enum { KF_Q, KF_K, KF_OUT, KF_SCALING, KF_TAU, KF_NOISE, KF_SEED, KF_LAYER, KF_STEP, KF_START, KF_N };
static const struct kvc_py_spec keyformer_scores_spec[KF_N] = {
    KVC_PY_IN("queries", 4, "[B, Hq, Tq, D]", DT_FLOAT),
    /* batch and head dim: kvc_py_check_qk, with its own messages */
    KVC_PY_IN_FREE("keys", 4, "[B, Hkv, Tk, D]", DT_FLOAT, 0x9),
    KVC_PY_OUT("out", 3, "[B, Hkv, Tk]", DT_F32),
    KVC_PY_FINITE("scaling"),
    KVC_PY_FINITE("tau"),   /* > 0: below */
    KVC_PY_FINITE("noise"), /* >= 0: below */
    KVC_PY_INT_IN("seed", 0, INT64_MAX),
    KVC_PY_INT_IN("layer", 0, INT64_MAX),
    KVC_PY_INT_IN("step", 0, INT64_MAX),
    KVC_PY_START("Tk"),
};

static PyObject *py_keyformer_scores(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_keyformer_scores_params p;
    const struct kvc_view *q, *k;
    PyObject *ret = NULL;
    memset(&p, 0, sizeof p);
    if (kvc_py_call_parse(st, "keyformer_scores", keyformer_scores_spec, KF_N, args, nargs, &c) < 0) return NULL;
    /* as floats: a tau that rounds to 0 or overflows is refused here, not in the op */
    p.tau = (float)c.f[KF_TAU];
    p.noise = (float)c.f[KF_NOISE];
    if (!(p.tau > 0.0f) || !isfinite(p.tau)) {
        kvc_py_raise(st->ValueError, "tau: expected a temperature > 0 (finite in float32), got %g", c.f[KF_TAU]);
        goto done;
    }
    if (!(p.noise >= 0.0f) || !isfinite(p.noise)) {
        kvc_py_raise(st->ValueError, "noise: expected a scale >= 0 (finite in float32), got %g", c.f[KF_NOISE]);
        goto done;
    }
    q = &c.a[KF_Q].view;
    k = &c.a[KF_K].view;
    if (kvc_py_check_qk(st, q, k) < 0) goto done;
    if (q->shape[2] > k->shape[2]) {
        kvc_py_raise(st->ValueError, "queries: %lld queries but only %lld keys (queries are the last Tq positions)",
                     (long long)q->shape[2], (long long)k->shape[2]);
        goto done;
    }
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    p.q = *q;
    p.k = *k;
    p.out = c.a[KF_OUT].view;
    p.kv_start = kvc_py_call_i64(&c, KF_START, &p.kv_start_stride);
    p.scaling = (float)c.f[KF_SCALING];
    p.seed = (uint64_t)c.i[KF_SEED];
    p.layer = c.i[KF_LAYER];
    p.step = c.i[KF_STEP];
    p.num_threads = st->num_threads;
    {
        /* an empty problem takes no scratch */
        void **scratch = kvc_py_view_numel(&p.out) > 0 && p.q.shape[2] > 0 ? &p.scratch : NULL;
        if (kvc_py_run(st, &op_keyformer_scores, &p, scratch, &p.scratch_bytes, c.a, c.n) < 0) goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

PyMethodDef kvc_py_keyformer_methods[] = {
    {"keyformer_scores", (PyCFunction)(void (*)(void))py_keyformer_scores, METH_FASTCALL, keyformer_scores_doc},
    {NULL, NULL, 0, NULL}};
