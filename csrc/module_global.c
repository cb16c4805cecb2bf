/*
 * module_global.c - binding of global_scores (the EMS global score): validate
 * once, run with the GIL released, map status codes to exceptions.
 */
#include "module.h"
#include "module_run.h"
#include "module_spec.h"

#include <math.h>
#include <string.h>

#include "score_global.h"

KVC_PY_OP(op_global_scores, global_scores, 1, 1)

/* q_pos (shape checked by the spec): strictly increasing, each in [0, T). */
static int check_q_pos(struct kvc_state *st, struct kvc_arg *a, int64_t T)
{
    const struct kvc_view *hv = kvc_py_arg_host(st, a);
    int64_t i, prev = -1;
    if (hv == NULL) return -1;
    for (i = 0; i < hv->shape[0]; i++) {
        int64_t v = ((const int64_t *)hv->data)[i * hv->strides[0]];
        if (v < 0 || v >= T)
            return kvc_py_raise(st->ValueError, "q_pos: value %lld at %lld is outside [0, T) = [0, %lld)",
                                (long long)v, (long long)i, (long long)T);
        if (v <= prev)
            return kvc_py_raise(st->ValueError,
                                "q_pos: must be strictly increasing, got %lld after %lld at %lld",
                                (long long)v, (long long)prev, (long long)i);
        prev = v;
    }
    return 0;
}

PyDoc_STRVAR(global_scores_doc,
             "global_scores(queries, keys, out, scaling, gqa_max, kv_start, q_pos)\n--\n\n"
             "Low-level: see kvcompress.ops.global_scores.");

enum { GS_Q, GS_K, GS_OUT, GS_SCALING, GS_GQA, GS_START, GS_POS, GS_N };
static const struct kvc_py_spec global_scores_spec[GS_N] = {
    KVC_PY_IN("queries", 4, "[B, Hq, Tq, D]", DT_FLOAT),
    /* batch and head dim: kvc_py_check_qk, with its own messages */
    KVC_PY_IN_FREE("keys", 4, "[B, Hkv, T, D]", DT_FLOAT, 0x9),
    KVC_PY_OUT("out", 3, "[B, Hkv, T]", DT_F32),
    KVC_PY_FINITE("scaling"),
    KVC_PY_FLAG("gqa_max"),
    KVC_PY_START("T"),
    KVC_PY_OPT("q_pos", 1, "[Tq]", DT_I64),
};

static PyObject *py_global_scores(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_global_scores_params p;
    const struct kvc_view *q, *k;
    PyObject *ret = NULL;
    memset(&p, 0, sizeof p);
    if (kvc_py_call_parse(st, "global_scores", global_scores_spec, GS_N, args, nargs, &c) < 0) return NULL;
    q = &c.a[GS_Q].view;
    k = &c.a[GS_K].view;
    if (kvc_py_check_qk(st, q, k) < 0) goto done;
    if (q->shape[2] > k->shape[2]) {
        kvc_py_raise(st->ValueError, "queries: %lld queries but only %lld keys (at most one query per position)",
                     (long long)q->shape[2], (long long)k->shape[2]);
        goto done;
    }
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    if (c.a[GS_POS].t && check_q_pos(st, &c.a[GS_POS], k->shape[2]) < 0) goto done;
    p.q = *q;
    p.k = *k;
    p.out = c.a[GS_OUT].view;
    p.kv_start = kvc_py_call_i64(&c, GS_START, &p.kv_start_stride);
    p.q_pos = kvc_py_call_i64(&c, GS_POS, &p.q_pos_stride);
    p.scaling = (float)c.f[GS_SCALING];
    p.gqa = c.i[GS_GQA] ? KVC_GQA_MAX : KVC_GQA_MEAN;
    p.num_threads = st->num_threads;
    {
        /* an empty problem takes no scratch */
        void **scratch = kvc_py_view_numel(&p.out) > 0 && p.q.shape[2] > 0 ? &p.scratch : NULL;
        if (kvc_py_run(st, &op_global_scores, &p, scratch, &p.scratch_bytes, c.a, c.n) < 0) goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

PyMethodDef kvc_py_global_methods[] = {
    {"global_scores", (PyCFunction)(void (*)(void))py_global_scores, METH_FASTCALL,
     global_scores_doc},
    {NULL, NULL, 0, NULL}};
