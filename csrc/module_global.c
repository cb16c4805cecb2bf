/*
 * module_global.c - binding of global_scores (the EMS global score): validate
 * once, run with the GIL released, map status codes to exceptions.
 */
#include "module.h"
#include "module_run.h"

#include <math.h>
#include <string.h>

#include "score_global.h"

KVC_PY_OP(op_global_scores, global_scores, 1, 1)

/* Optional q_pos: int64 [Tq], strictly increasing, each in [0, T). */
static int import_q_pos(struct kvc_state *st, PyObject *obj, int64_t Tq, int64_t T,
                        struct kvc_arg *a)
{
    const struct kvc_view *hv;
    int64_t i, prev = -1;
    memset(a, 0, sizeof *a);
    if (obj == Py_None) return 0;
    if (kvc_py_arg_import(st, obj, "q_pos", 1, "[Tq]", DT_I64, 0, a) < 0) return -1;
    if (a->view.shape[0] != Tq) {
        kvc_py_raise(st->ValueError, "q_pos: expected shape [Tq] = [%lld], got [%lld]", (long long)Tq,
                     (long long)a->view.shape[0]);
        goto fail;
    }
    hv = kvc_py_arg_host(st, a);
    if (hv == NULL) goto fail;
    for (i = 0; i < Tq; i++) {
        int64_t v = ((const int64_t *)hv->data)[i * hv->strides[0]];
        if (v < 0 || v >= T) {
            kvc_py_raise(st->ValueError, "q_pos: value %lld at %lld is outside [0, T) = [0, %lld)",
                         (long long)v, (long long)i, (long long)T);
            goto fail;
        }
        if (v <= prev) {
            kvc_py_raise(st->ValueError,
                         "q_pos: must be strictly increasing, got %lld after %lld at %lld",
                         (long long)v, (long long)prev, (long long)i);
            goto fail;
        }
        prev = v;
    }
    return 0;
fail:
    kvc_py_arg_release(a);
    return -1;
}

PyDoc_STRVAR(global_scores_doc,
             "global_scores(queries, keys, out, scaling, gqa_max, kv_start, q_pos)\n--\n\n"
             "Low-level: see kvcompress.ops.global_scores.");

static PyObject *py_global_scores(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_arg a[5]; /* queries, keys, out, kv_start, q_pos */
    struct kvc_global_scores_params p;
    double scaling;
    int gqa_max, n = 0;
    PyObject *ret = NULL;
    memset(a, 0, sizeof a);
    memset(&p, 0, sizeof p);
    if (kvc_py_check_nargs("global_scores", nargs, 7) < 0) return NULL;
    if (kvc_py_get_scaling(st, args[3], &scaling) < 0) return NULL;
    if (kvc_py_get_bool(st, args[4], "gqa_max", &gqa_max) < 0) return NULL;

    if (kvc_py_arg_import(st, args[0], "queries", 4, "[B, Hq, Tq, D]", DT_FLOAT, 0, &a[0]) < 0) goto done;
    n = 1;
    if (kvc_py_arg_import(st, args[1], "keys", 4, "[B, Hkv, T, D]", DT_FLOAT, 0, &a[1]) < 0) goto done;
    n = 2;
    if (kvc_py_arg_import(st, args[2], "out", 3, "[B, Hkv, T]", DT_F32, 1, &a[2]) < 0) goto done;
    n = 3;
    {
        const struct kvc_view *q = &a[0].view, *k = &a[1].view;
        int64_t want[3];
        if (kvc_py_check_qk(st, q, k) < 0) goto done;
        if (q->shape[2] > k->shape[2]) {
            kvc_py_raise(st->ValueError, "queries: %lld queries but only %lld keys (at most one query per position)",
                         (long long)q->shape[2], (long long)k->shape[2]);
            goto done;
        }
        want[0] = k->shape[0];
        want[1] = k->shape[1];
        want[2] = k->shape[2];
        if (kvc_py_check_shape(st, &a[2], want, "[B, Hkv, T]") < 0) goto done;
        if (kvc_py_import_kv_start(st, args[5], q->shape[0], k->shape[2], &a[3]) < 0) goto done;
        n = 4;
        if (import_q_pos(st, args[6], q->shape[2], k->shape[2], &a[4]) < 0) goto done;
        n = 5;
        if (kvc_py_check_output(st, &a[2], a, 5) < 0) goto done;
    }
    p.q = a[0].view;
    p.k = a[1].view;
    p.out = a[2].view;
    p.kv_start = a[3].t ? (const int64_t *)a[3].view.data : NULL;
    p.kv_start_stride = a[3].t ? a[3].view.strides[0] : 0;
    p.q_pos = a[4].t ? (const int64_t *)a[4].view.data : NULL;
    p.q_pos_stride = a[4].t ? a[4].view.strides[0] : 0;
    p.scaling = (float)scaling;
    p.gqa = gqa_max ? KVC_GQA_MAX : KVC_GQA_MEAN;
    p.num_threads = st->num_threads;
    {
        /* an empty problem takes no scratch */
        void **scratch = kvc_py_view_numel(&p.out) > 0 && p.q.shape[2] > 0 ? &p.scratch : NULL;
        if (kvc_py_run(st, &op_global_scores, &p, scratch, &p.scratch_bytes, a, n) < 0) goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    kvc_py_args_release(a, n);
    return ret;
}

PyMethodDef kvc_py_global_methods[] = {
    {"global_scores", (PyCFunction)(void (*)(void))py_global_scores, METH_FASTCALL,
     global_scores_doc},
    {NULL, NULL, 0, NULL}};
