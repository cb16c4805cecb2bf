/*
 * module_budget.c - binding of head_budgets (AdaKV-style per-head budget
 * allocation): validate once, run with the GIL released, map status codes
 * to exceptions.
 */
#include "module.h"
#include "module_run.h"

#include <math.h>
#include <string.h>

#include "budget.h"

KVC_PY_OP_NAN(op_head_budgets, head_budgets, 1, 1,
              "scores: NaN found (use -inf for slots that may not be kept)")

PyDoc_STRVAR(head_budgets_doc,
             "head_budgets(scores, out, budget, alpha, floor, kv_start)\n--\n\n"
             "Low-level: see kvcompress.ops.head_budgets.");

static PyObject *py_head_budgets(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_arg a[3]; /* scores, out, kv_start */
    struct kvc_head_budgets_params p;
    int64_t budget, floor_, want[2];
    double alpha;
    int n = 0;
    PyObject *ret = NULL;
    memset(a, 0, sizeof a);
    memset(&p, 0, sizeof p);
    if (kvc_py_check_nargs("head_budgets", nargs, 6) < 0) return NULL;
    if (kvc_py_get_int64(st, args[2], "budget", &budget) < 0) return NULL;
    if (budget < 0) {
        kvc_py_raise(st->ValueError, "budget: must be >= 0, got %lld", (long long)budget);
        return NULL;
    }
    if (!PyFloat_Check(args[3]) && !PyLong_Check(args[3])) {
        kvc_py_raise(st->TypeError, "alpha: expected a float, got %.100s", Py_TYPE(args[3])->tp_name);
        return NULL;
    }
    alpha = PyFloat_AsDouble(args[3]);
    if (alpha == -1.0 && PyErr_Occurred()) {
        kvc_py_raise_from(st->ValueError, "alpha: out of range");
        return NULL;
    }
    if (!(alpha >= 0.0 && alpha <= 1.0)) {
        kvc_py_raise(st->ValueError, "alpha: expected a value in [0, 1], got %R", args[3]);
        return NULL;
    }
    if (kvc_py_get_int64(st, args[4], "floor", &floor_) < 0) return NULL;
    if (floor_ < 0) {
        kvc_py_raise(st->ValueError, "floor: must be >= 0, got %lld", (long long)floor_);
        return NULL;
    }
    if (kvc_py_arg_import(st, args[0], "scores", 3, "[B, H, T]", DT_F32, 0, &a[0]) < 0) goto done;
    n = 1;
    if (kvc_py_arg_import(st, args[1], "out", 2, "[B, H]", DT_I64, 1, &a[1]) < 0) goto done;
    n = 2;
    want[0] = a[0].view.shape[0];
    want[1] = a[0].view.shape[1];
    if (kvc_py_check_shape(st, &a[1], want, "[B, H]") < 0) goto done;
    if (kvc_py_import_kv_start(st, args[5], want[0], a[0].view.shape[2], &a[2]) < 0) goto done;
    n = 3;
    if (kvc_py_check_output(st, &a[1], a, 3) < 0) goto done;
    p.scores = a[0].view;
    p.out = a[1].view;
    p.kv_start = a[2].t ? (const int64_t *)a[2].view.data : NULL;
    p.kv_start_stride = a[2].t ? a[2].view.strides[0] : 0;
    p.budget = budget;
    p.floor = floor_;
    p.alpha = alpha;
    p.num_threads = st->num_threads;
    {
        /* an empty problem takes no scratch */
        void **scratch = kvc_py_view_numel(&p.out) > 0 ? &p.scratch : NULL;
        if (kvc_py_run(st, &op_head_budgets, &p, scratch, &p.scratch_bytes, a, n) < 0) goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    kvc_py_args_release(a, n);
    return ret;
}

PyMethodDef kvc_py_budget_methods[] = {
    {"head_budgets", (PyCFunction)(void (*)(void))py_head_budgets, METH_FASTCALL, head_budgets_doc},
    {NULL, NULL, 0, NULL}};
