/*
 * module_layerbudget.c - bindings of pooled_counts and row_cosine
 * (layerbudget.c): validate once (k inside [0, L * M], no NaN score), run
 * with the GIL released.
 */
#include "module.h"
#include "module_run.h"
#include "module_spec.h"

#include <math.h>
#include <string.h>

#include "layerbudget.h"

KVC_PY_OP(op_pooled_counts, pooled_counts, 0, 0)
KVC_PY_OP(op_row_cosine, row_cosine, 0, 0)

PyDoc_STRVAR(pooled_counts_doc,
             "pooled_counts(scores, k, counts)\n--\n\n"
             "Low-level: see kvcompress.ops.pooled_counts.");

PyDoc_STRVAR(row_cosine_doc,
             "row_cosine(x, y, out)\n--\n\n"
             "Low-level: see kvcompress.ops.row_cosine.");

enum { PC_S, PC_K, PC_OUT, PC_N };
static const struct kvc_py_spec pooled_counts_spec[PC_N] = {
    KVC_PY_IN("scores", 3, "[B, L, M]", DT_F32),
    KVC_PY_IN("k", 1, "[B]", DT_I64),
    KVC_PY_OUT("counts", 2, "[B, L]", DT_I64),
};

/* 0 <= k[b] <= L * M and no NaN among the scores: O(B * L * M) on the host,
 * against the op's 32 passes over the same entries. */
static int check_pooled(struct kvc_state *st, const struct kvc_view *s, const struct kvc_view *k)
{
    const int64_t B = s->shape[0], L = s->shape[1], M = s->shape[2];
    int64_t b, l, j;
    for (b = 0; b < B; b++) {
        const int64_t kb = ((const int64_t *)k->data)[b * k->strides[0]];
        if (kb < 0 || kb > L * M)
            return kvc_py_raise(st->ValueError, "k: value %lld at [%lld] is outside [0, L * M] = [0, %lld]",
                                (long long)kb, (long long)b, (long long)(L * M));
        for (l = 0; l < L; l++)
            for (j = 0; j < M; j++)
                if (isnan(((const float *)s->data)[b * s->strides[0] + l * s->strides[1] + j * s->strides[2]]))
                    return kvc_py_raise(st->ValueError, "scores: NaN at [%lld, %lld, %lld]", (long long)b,
                                        (long long)l, (long long)j);
    }
    return 0;
}

static PyObject *py_pooled_counts(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_pooled_counts_params p;
    PyObject *ret = NULL;
    memset(&p, 0, sizeof p);
    if (kvc_py_call_parse(st, "pooled_counts", pooled_counts_spec, PC_N, args, nargs, &c) < 0) return NULL;
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    {
        const struct kvc_view *hs = kvc_py_arg_host(st, &c.a[PC_S]);
        const struct kvc_view *hk = hs ? kvc_py_arg_host(st, &c.a[PC_K]) : NULL;
        if (hk == NULL) goto done;
        if (check_pooled(st, hs, hk) < 0) goto done;
    }
    p.scores = c.a[PC_S].view;
    p.k = c.a[PC_K].view;
    p.counts = c.a[PC_OUT].view;
    p.num_threads = st->num_threads;
    if (kvc_py_run(st, &op_pooled_counts, &p, NULL, NULL, c.a, c.n) < 0) goto done;
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

enum { RC_X, RC_Y, RC_OUT, RC_N };
static const struct kvc_py_spec row_cosine_spec[RC_N] = {
    KVC_PY_IN("x", 2, "[N, D]", DT_FLOAT),
    KVC_PY_IN_LIKE("y", 2, "[N, D]", RC_X),
    KVC_PY_OUT("out", 1, "[N]", DT_F32),
};

static PyObject *py_row_cosine(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_row_cosine_params p;
    PyObject *ret = NULL;
    memset(&p, 0, sizeof p);
    if (kvc_py_call_parse(st, "row_cosine", row_cosine_spec, RC_N, args, nargs, &c) < 0) return NULL;
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    p.x = c.a[RC_X].view;
    p.y = c.a[RC_Y].view;
    p.out = c.a[RC_OUT].view;
    p.num_threads = st->num_threads;
    if (kvc_py_run(st, &op_row_cosine, &p, NULL, NULL, c.a, c.n) < 0) goto done;
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

PyMethodDef kvc_py_layerbudget_methods[] = {
    {"pooled_counts", (PyCFunction)(void (*)(void))py_pooled_counts, METH_FASTCALL, pooled_counts_doc},
    {"row_cosine", (PyCFunction)(void (*)(void))py_row_cosine, METH_FASTCALL, row_cosine_doc},
    {NULL, NULL, 0, NULL}};
