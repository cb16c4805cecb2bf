/*
 * module_budget.c - binding of head_budgets (AdaKV-style per-head budget
 * allocation): validate once, run with the GIL released, map status codes
 * to exceptions.
 */
#include "module.h"
#include "module_run.h"
#include "module_spec.h"

#include <math.h>
#include <string.h>

#include "budget.h"

KVC_PY_OP_NAN(op_head_budgets, head_budgets, 1, 1,
              "scores: NaN found (use -inf for slots that may not be kept)")

PyDoc_STRVAR(head_budgets_doc,
             "head_budgets(scores, out, budget, alpha, floor, kv_start)\n--\n\n"
             "Low-level: see kvcompress.ops.head_budgets.");

enum { HB_SCORES, HB_OUT, HB_BUDGET, HB_ALPHA, HB_FLOOR, HB_START, HB_N };
static const struct kvc_py_spec head_budgets_spec[HB_N] = {
    KVC_PY_IN("scores", 3, "[B, H, T]", DT_F32),
    KVC_PY_OUT("out", 2, "[B, H]", DT_I64),
    KVC_PY_INT_IN("budget", 0, INT64_MAX),
    KVC_PY_FLOAT_IN("alpha", 0.0, 1.0),
    KVC_PY_INT_IN("floor", 0, INT64_MAX),
    KVC_PY_START("T"),
};

static PyObject *py_head_budgets(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_head_budgets_params p;
    PyObject *ret = NULL;
    memset(&p, 0, sizeof p);
    if (kvc_py_call_parse(st, "head_budgets", head_budgets_spec, HB_N, args, nargs, &c) < 0) return NULL;
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    p.scores = c.a[HB_SCORES].view;
    p.out = c.a[HB_OUT].view;
    p.kv_start = kvc_py_call_i64(&c, HB_START, &p.kv_start_stride);
    p.budget = c.i[HB_BUDGET];
    p.floor = c.i[HB_FLOOR];
    p.alpha = c.f[HB_ALPHA];
    p.num_threads = st->num_threads;
    {
        /* an empty problem takes no scratch */
        void **scratch = kvc_py_view_numel(&p.out) > 0 ? &p.scratch : NULL;
        if (kvc_py_run(st, &op_head_budgets, &p, scratch, &p.scratch_bytes, c.a, c.n) < 0) goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

PyMethodDef kvc_py_budget_methods[] = {
    {"head_budgets", (PyCFunction)(void (*)(void))py_head_budgets, METH_FASTCALL, head_budgets_doc},
    {NULL, NULL, 0, NULL}};
