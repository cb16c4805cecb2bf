/*
 * module_ops.c - bindings of the core ops (window_scores, vector_norm,
 * pool1d, select_topk, gather): validate once, run with the GIL released,
 * map status codes to exceptions.
 */
#include "module.h"
#include "module_run.h"
#include "module_spec.h"

#include <math.h>
#include <string.h>

#include "compact.h"
#include "kvc_math.h"
#include "score.h"
#include "select.h"

/* ------------------------------------------------------------------------ */
/* ops                                                                      */
/* ------------------------------------------------------------------------ */

KVC_PY_OP(op_window_scores, window_scores, 1, 1)
KVC_PY_OP(op_vector_norm, vector_norm, 0, 0)
KVC_PY_OP(op_pool1d, pool1d, 0, 0)
KVC_PY_OP(op_select_topk, select_topk, 0, 1)
KVC_PY_OP(op_gather, gather, 0, 0)

PyDoc_STRVAR(window_scores_doc,
             "window_scores(queries, keys, out, scaling, gqa_max, kv_start)\n--\n\n"
             "Low-level: see kvcompress.ops.window_scores.");

enum { WS_Q, WS_K, WS_OUT, WS_SCALING, WS_GQA, WS_START, WS_N };
static const struct kvc_py_spec window_scores_spec[WS_N] = {
    KVC_PY_IN("queries", 4, "[B, Hq, Tq, D]", DT_FLOAT),
    /* batch and head dim: kvc_py_check_qk, with its own messages */
    KVC_PY_IN_FREE("keys", 4, "[B, Hkv, Tk, D]", DT_FLOAT, 0x9),
    KVC_PY_OUT("out", 3, "[B, Hkv, Tk]", DT_F32),
    KVC_PY_FINITE("scaling"),
    KVC_PY_FLAG("gqa_max"),
    KVC_PY_START("Tk"),
};

static PyObject *py_window_scores(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_window_scores_params p;
    const struct kvc_view *q, *k;
    PyObject *ret = NULL;
    memset(&p, 0, sizeof p);
    if (kvc_py_call_parse(st, "window_scores", window_scores_spec, WS_N, args, nargs, &c) < 0) return NULL;
    q = &c.a[WS_Q].view;
    k = &c.a[WS_K].view;
    if (kvc_py_check_qk(st, q, k) < 0) goto done;
    if (q->shape[2] > k->shape[2]) {
        kvc_py_raise(st->ValueError,
                     "queries: %lld queries but only %lld keys (queries are the last Tq positions)",
                     (long long)q->shape[2], (long long)k->shape[2]);
        goto done;
    }
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    p.q = *q;
    p.k = *k;
    p.out = c.a[WS_OUT].view;
    p.kv_start = kvc_py_call_i64(&c, WS_START, &p.kv_start_stride);
    p.scaling = (float)c.f[WS_SCALING];
    p.gqa = c.i[WS_GQA] ? KVC_GQA_MAX : KVC_GQA_MEAN;
    p.num_threads = st->num_threads;
    {
        /* an empty problem takes no scratch */
        void **scratch = kvc_py_view_numel(&p.out) > 0 && p.q.shape[2] > 0 ? &p.scratch : NULL;
        if (kvc_py_run(st, &op_window_scores, &p, scratch, &p.scratch_bytes, c.a, c.n) < 0) goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

PyDoc_STRVAR(vector_norm_doc, "vector_norm(x, out, ord)\n--\n\n"
                              "Low-level: see kvcompress.ops.vector_norm.");

enum { VN_X, VN_OUT, VN_ORD, VN_N };
static const struct kvc_py_spec vector_norm_spec[VN_N] = {
    KVC_PY_IN("x", 4, "[B, H, T, D]", DT_FLOAT),
    KVC_PY_OUT("out", 3, "[B, H, T]", DT_F32),
    KVC_PY_INT_IN("ord", 1, 2),
};

static PyObject *py_vector_norm(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_vector_norm_params p;
    PyObject *ret = NULL;
    memset(&p, 0, sizeof p);
    if (kvc_py_call_parse(st, "vector_norm", vector_norm_spec, VN_N, args, nargs, &c) < 0) return NULL;
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    p.x = c.a[VN_X].view;
    p.out = c.a[VN_OUT].view;
    p.ord = (int32_t)c.i[VN_ORD];
    p.num_threads = st->num_threads;
    if (kvc_py_run(st, &op_vector_norm, &p, NULL, NULL, c.a, c.n) < 0) goto done;
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

PyDoc_STRVAR(pool1d_doc, "pool1d(scores, out, kernel, avg)\n--\n\n"
                         "Low-level: see kvcompress.ops.pool1d.");

enum { PL_IN, PL_OUT, PL_KERNEL, PL_AVG, PL_N };
static const struct kvc_py_spec pool1d_spec[PL_N] = {
    KVC_PY_IN("scores", 3, "[B, H, T]", DT_F32),
    KVC_PY_OUT("out", 3, "[B, H, T]", DT_F32),
    KVC_PY_INT_IN("kernel", INT64_MIN, INT64_MAX), /* odd, >= 1: below */
    KVC_PY_FLAG("avg"),
};

static PyObject *py_pool1d(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_pool1d_params p;
    PyObject *ret = NULL;
    memset(&p, 0, sizeof p);
    if (kvc_py_call_parse(st, "pool1d", pool1d_spec, PL_N, args, nargs, &c) < 0) return NULL;
    if (c.i[PL_KERNEL] < 1 || c.i[PL_KERNEL] % 2 == 0) {
        kvc_py_raise(st->ValueError, "kernel: expected an odd size >= 1, got %lld", (long long)c.i[PL_KERNEL]);
        goto done;
    }
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    p.in = c.a[PL_IN].view;
    p.out = c.a[PL_OUT].view;
    p.kernel = c.i[PL_KERNEL];
    p.mode = c.i[PL_AVG] ? KVC_POOL_AVG : KVC_POOL_MAX;
    p.num_threads = st->num_threads;
    if (kvc_py_run(st, &op_pool1d, &p, NULL, NULL, c.a, c.n) < 0) goto done;
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

PyDoc_STRVAR(select_topk_doc, "select_topk(scores, out, k, sinks, window, kv_start)\n--\n\n"
                              "Low-level: see kvcompress.ops.select_topk.");

enum { SK_SCORES, SK_OUT, SK_K, SK_SINKS, SK_WINDOW, SK_START, SK_N };
static const struct kvc_py_spec select_topk_spec[SK_N] = {
    KVC_PY_IN("scores", 3, "[B, H, T]", DT_F32),
    /* kmax comes from k's values: checked below */
    KVC_PY_OUT_FREE("out", 3, "[B, H, kmax]", DT_I64, 0x4),
    KVC_PY_CUSTOM_ARG("k", 2, "[B, H]", DT_INDEX), /* an int, or a tensor of these */
    KVC_PY_INT_IN("sinks", 0, INT64_MAX),
    KVC_PY_INT_IN("window", 0, INT64_MAX),
    KVC_PY_START("T"),
};

static PyObject *py_select_topk(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_select_topk_params p;
    int64_t B, H, T, kmax = 0, b, h, want[3], hstart_stride = 0;
    const int64_t *hstart = NULL;
    const struct kvc_view *hk = NULL;
    PyObject *ret = NULL, *karg;
    memset(&p, 0, sizeof p);
    if (kvc_py_call_parse(st, "select_topk", select_topk_spec, SK_N, args, nargs, &c) < 0) return NULL;
    B = c.a[SK_SCORES].view.shape[0];
    H = c.a[SK_SCORES].view.shape[1];
    T = c.a[SK_SCORES].view.shape[2];
    karg = args[SK_K];
    if (PyLong_Check(karg) && !PyBool_Check(karg)) {
        if (kvc_py_get_int64(st, karg, "k", &p.k_all) < 0) goto done;
        kmax = p.k_all;
        if (kmax < 1 || kmax > T) {
            /* checked even when there are no rows */
            kvc_py_raise(st->ValueError, "k: %lld is outside [1, T] = [1, %lld]", (long long)kmax, (long long)T);
            goto done;
        }
    } else if (PyBool_Check(karg)) {
        kvc_py_raise(st->TypeError, "k: expected an int or an integer tensor [B, H], got bool");
        goto done;
    } else if (kvc_py_arg_import(st, karg, "k", 2, "[B, H]", DT_INDEX, 0, &c.a[SK_K]) < 0) {
        goto done;
    }
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    if (c.a[SK_K].t) {
        p.k = c.a[SK_K].view;
        hk = kvc_py_arg_host(st, &c.a[SK_K]);
        if (hk == NULL) goto done;
    }
    if (c.a[SK_START].t) {
        const struct kvc_view *hs = kvc_py_arg_host(st, &c.a[SK_START]);
        if (hs == NULL) goto done;
        hstart = (const int64_t *)hs->data;
        hstart_stride = hs->strides[0];
    }
    /* every row's k against T and its forced keeps */
    for (b = 0; b < B; b++) {
        int64_t sb = hstart ? hstart[b * hstart_stride] : 0;
        int64_t forced = kvc_select_forced_count(T, c.i[SK_SINKS], c.i[SK_WINDOW], sb);
        for (h = 0; h < H; h++) {
            int64_t k = hk ? kvc_load_index(hk->data, hk->dtype, b * hk->strides[0] + h * hk->strides[1])
                           : p.k_all;
            if (k < 1 || k > T) {
                kvc_py_raise(st->ValueError, "k: %lld at (b=%lld, h=%lld) is outside [1, T] = [1, %lld]",
                             (long long)k, (long long)b, (long long)h, (long long)T);
                goto done;
            }
            if (forced > k) {
                kvc_py_raise(st->ValueError,
                             "k: %lld at (b=%lld, h=%lld) is smaller than the %lld forced keeps "
                             "(sinks=%lld, window=%lld)",
                             (long long)k, (long long)b, (long long)h, (long long)forced,
                             (long long)c.i[SK_SINKS], (long long)c.i[SK_WINDOW]);
                goto done;
            }
            if (hk && k > kmax) kmax = k;
        }
    }
    want[0] = B;
    want[1] = H;
    want[2] = kmax;
    if (kvc_py_check_shape(st, &c.a[SK_OUT], want, "[B, H, kmax]") < 0) goto done;
    p.scores = c.a[SK_SCORES].view;
    p.out = c.a[SK_OUT].view;
    p.sinks = c.i[SK_SINKS];
    p.window = c.i[SK_WINDOW];
    p.kv_start = kvc_py_call_i64(&c, SK_START, &p.kv_start_stride);
    p.num_threads = st->num_threads;
    if (kvc_py_run(st, &op_select_topk, &p, &p.scratch, &p.scratch_bytes, c.a, c.n) < 0) goto done;
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

PyDoc_STRVAR(gather_doc, "gather(keys, values, indices, out_keys, out_values)\n--\n\n"
                         "Low-level: see kvcompress.ops.gather.");

enum { GA_K, GA_V, GA_IDX, GA_OK, GA_OV, GA_N };
static const struct kvc_py_spec gather_spec[GA_N] = {
    KVC_PY_IN("keys", 4, "[B, H, T, D]", DT_FLOAT),
    KVC_PY_IN_LIKE("values", 4, "[B, H, T, Dv]", GA_K),
    KVC_PY_IN("indices", 3, "[B, H, n]", DT_INDEX),
    KVC_PY_OUT_LIKE("out_keys", 4, "[B, H, n, D]", GA_K),
    KVC_PY_OUT_LIKE("out_values", 4, "[B, H, n, Dv]", GA_K),
};

static PyObject *py_gather(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_gather_params p;
    const struct kvc_view *hix;
    int64_t bad_value, bad_pos[KVC_MAX_DIMS], T;
    PyObject *ret = NULL;
    memset(&p, 0, sizeof p);
    if (kvc_py_call_parse(st, "gather", gather_spec, GA_N, args, nargs, &c) < 0) return NULL;
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    T = c.a[GA_K].view.shape[2];
    hix = kvc_py_arg_host(st, &c.a[GA_IDX]);
    if (hix == NULL) goto done;
    if (kvc_indices_check(hix, 0, T, &bad_value, bad_pos) != KVC_OK) {
        kvc_py_raise(st->ValueError, "indices: value %lld at [%lld, %lld, %lld] is outside [0, T) = [0, %lld)",
                     (long long)bad_value, (long long)bad_pos[0], (long long)bad_pos[1],
                     (long long)bad_pos[2], (long long)T);
        goto done;
    }
    p.keys = c.a[GA_K].view;
    p.values = c.a[GA_V].view;
    p.indices = c.a[GA_IDX].view;
    p.out_keys = c.a[GA_OK].view;
    p.out_values = c.a[GA_OV].view;
    p.num_threads = st->num_threads;
    if (kvc_py_run(st, &op_gather, &p, NULL, NULL, c.a, c.n) < 0) goto done;
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

PyMethodDef kvc_py_core_methods[] = {
    {"window_scores", (PyCFunction)(void (*)(void))py_window_scores, METH_FASTCALL,
     window_scores_doc},
    {"vector_norm", (PyCFunction)(void (*)(void))py_vector_norm, METH_FASTCALL, vector_norm_doc},
    {"pool1d", (PyCFunction)(void (*)(void))py_pool1d, METH_FASTCALL, pool1d_doc},
    {"select_topk", (PyCFunction)(void (*)(void))py_select_topk, METH_FASTCALL, select_topk_doc},
    {"gather", (PyCFunction)(void (*)(void))py_gather, METH_FASTCALL, gather_doc},
    {NULL, NULL, 0, NULL}};
