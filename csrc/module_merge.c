/*
 * module_merge.c - binding of evict_merge (merge.c): validate once (shapes,
 * dtypes, aliasing, the centers lists and the scores), run with the GIL
 * released, map status codes to exceptions.
 */
#include "module.h"
#include "module_run.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "merge.h"

KVC_PY_OP(op_evict_merge, evict_merge, 1, 1)

/* Start of batch row b's valid slots (host view of kv_start, or none). */
static int64_t start_at(const struct kvc_view *ks, int64_t b)
{
    return ks ? ((const int64_t *)ks->data)[b * ks->strides[0]] : 0;
}

/* Centers of every (b, h): ascending, unique, valid slots [kv_start[b], T),
 * then only -1. Cheap (O(B*H*C)) next to the op (O(T*C*D) per head). */
static int check_centers(struct kvc_state *st, const struct kvc_view *cv, const struct kvc_view *ks,
                         int64_t T)
{
    const int64_t B = cv->shape[0], H = cv->shape[1], C = cv->shape[2];
    const int64_t *c = (const int64_t *)cv->data;
    int64_t b, h, i;
    for (b = 0; b < B; b++) {
        const int64_t s = start_at(ks, b);
        for (h = 0; h < H; h++) {
            int64_t prev = -1, ended = 0;
            for (i = 0; i < C; i++) {
                const int64_t v = c[b * cv->strides[0] + h * cv->strides[1] + i * cv->strides[2]];
                if (v == -1) {
                    ended = 1;
                    continue;
                }
                if (ended)
                    return kvc_py_raise(st->ValueError,
                                        "centers: value %lld at [%lld, %lld, %lld] follows -1 "
                                        "padding (padding goes at the end of a row)",
                                        (long long)v, (long long)b, (long long)h, (long long)i);
                if (v < 0 || v >= T)
                    return kvc_py_raise(st->ValueError,
                                        "centers: value %lld at [%lld, %lld, %lld] is outside "
                                        "[0, T) = [0, %lld) (and is not the -1 padding)",
                                        (long long)v, (long long)b, (long long)h, (long long)i,
                                        (long long)T);
                if (v < s)
                    return kvc_py_raise(st->ValueError,
                                        "centers: value %lld at [%lld, %lld, %lld] is a padded "
                                        "slot (kv_start[%lld] = %lld)",
                                        (long long)v, (long long)b, (long long)h, (long long)i,
                                        (long long)b, (long long)s);
                if (v <= prev)
                    return kvc_py_raise(st->ValueError,
                                        "centers: value %lld at [%lld, %lld, %lld] is not above "
                                        "the previous center %lld (need strictly ascending, "
                                        "no duplicates)",
                                        (long long)v, (long long)b, (long long)h, (long long)i,
                                        (long long)prev);
                prev = v;
            }
        }
    }
    return 0;
}

/* Scores of the valid slots: finite and >= 0 (they are merge weights). */
static int check_scores(struct kvc_state *st, const struct kvc_view *sv, const struct kvc_view *ks)
{
    const int64_t B = sv->shape[0], H = sv->shape[1], T = sv->shape[2];
    const float *x = (const float *)sv->data;
    int64_t b, h, j;
    for (b = 0; b < B; b++) {
        const int64_t s = start_at(ks, b);
        for (h = 0; h < H; h++) {
            const float *row = x + b * sv->strides[0] + h * sv->strides[1];
            int bad = 0;
            for (j = s; j < T; j++) bad |= !(row[j * sv->strides[2]] >= 0.0f) ||
                                           row[j * sv->strides[2]] == INFINITY;
            if (!bad) continue;
            for (j = s; j < T; j++) {
                const float v = row[j * sv->strides[2]];
                if (!(v >= 0.0f) || v == INFINITY) {
                    char buf[32];
                    snprintf(buf, sizeof buf, "%g", (double)v);
                    return kvc_py_raise(st->ValueError,
                                        "scores: value %s at [%lld, %lld, %lld] is not a finite "
                                        "weight >= 0 (merge weights)",
                                        buf, (long long)b, (long long)h, (long long)j);
                }
            }
        }
    }
    return 0;
}

PyDoc_STRVAR(evict_merge_doc,
             "evict_merge(keys, values, scores, centers, tau, kv_start, out_keys, out_values, "
             "counts, out_scores, tau_used, assign)\n--\n\n"
             "Low-level: see kvcompress.ops.evict_merge.");

enum { A_KEYS, A_VALUES, A_SCORES, A_CENTERS, A_TAU, A_KVS, A_OK, A_OV, A_CNT, A_OS, A_TAUU,
       A_ASSIGN, A_N };

static PyObject *py_evict_merge(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_arg a[A_N];
    struct kvc_evict_merge_params p;
    int64_t B, H, T, D, Dv, C, want[4];
    int n = 0, i;
    PyObject *ret = NULL;
    memset(a, 0, sizeof a);
    memset(&p, 0, sizeof p);
    if (kvc_py_check_nargs("evict_merge", nargs, 12) < 0) return NULL;

    if (kvc_py_arg_import(st, args[0], "keys", 4, "[B, H, T, D]", DT_FLOAT, 0, &a[A_KEYS]) < 0) goto done;
    n = 1;
    if (kvc_py_arg_import(st, args[1], "values", 4, "[B, H, T, Dv]", DT_FLOAT, 0, &a[A_VALUES]) < 0) goto done;
    n = 2;
    if (kvc_py_arg_import(st, args[2], "scores", 3, "[B, H, T]", DT_F32, 0, &a[A_SCORES]) < 0) goto done;
    n = 3;
    if (kvc_py_arg_import(st, args[3], "centers", 3, "[B, H, C]", DT_I64, 0, &a[A_CENTERS]) < 0) goto done;
    n = 4;
    if (kvc_py_arg_import(st, args[4], "tau", 2, "[B, H]", DT_F32, 0, &a[A_TAU]) < 0) goto done;
    n = 5;
    B = a[A_KEYS].view.shape[0];
    H = a[A_KEYS].view.shape[1];
    T = a[A_KEYS].view.shape[2];
    D = a[A_KEYS].view.shape[3];
    Dv = a[A_VALUES].view.shape[3];
    C = a[A_CENTERS].view.shape[2];
    if (kvc_py_import_kv_start(st, args[5], B, T, &a[A_KVS]) < 0) goto done;
    n = 6;
    if (kvc_py_arg_import(st, args[6], "out_keys", 4, "[B, H, C, D]", DT_FLOAT, 1, &a[A_OK]) < 0) goto done;
    n = 7;
    if (kvc_py_arg_import(st, args[7], "out_values", 4, "[B, H, C, Dv]", DT_FLOAT, 1, &a[A_OV]) < 0) goto done;
    n = 8;
    if (kvc_py_arg_import(st, args[8], "counts", 3, "[B, H, C]", DT_F32 | (1u << KVC_I32), 1, &a[A_CNT]) < 0)
        goto done;
    n = 9;
    if (kvc_py_arg_import(st, args[9], "out_scores", 3, "[B, H, C]", DT_F32, 1, &a[A_OS]) < 0) goto done;
    n = 10;
    if (kvc_py_arg_import(st, args[10], "tau_used", 2, "[B, H]", DT_F32, 1, &a[A_TAUU]) < 0) goto done;
    n = 11;
    if (args[11] != Py_None) {
        if (kvc_py_arg_import(st, args[11], "assign", 3, "[B, H, T]", DT_I64, 1, &a[A_ASSIGN]) < 0)
            goto done;
    }
    n = 12;

    if (a[A_VALUES].view.dtype != a[A_KEYS].view.dtype) {
        kvc_py_raise(st->TypeError, "values: dtype %s does not match keys dtype %s",
                     kvc_dtype_name((enum kvc_dtype)a[A_VALUES].view.dtype),
                     kvc_dtype_name((enum kvc_dtype)a[A_KEYS].view.dtype));
        goto done;
    }
    for (i = A_OK; i <= A_OV; i++)
        if (a[i].view.dtype != a[A_KEYS].view.dtype) {
            kvc_py_raise(st->TypeError, "%s: dtype %s does not match keys dtype %s", a[i].name,
                         kvc_dtype_name((enum kvc_dtype)a[i].view.dtype),
                         kvc_dtype_name((enum kvc_dtype)a[A_KEYS].view.dtype));
            goto done;
        }
    want[0] = B;
    want[1] = H;
    want[2] = T;
    want[3] = Dv;
    if (kvc_py_check_shape(st, &a[A_VALUES], want, "[B, H, T, Dv]") < 0) goto done;
    if (kvc_py_check_shape(st, &a[A_SCORES], want, "[B, H, T]") < 0) goto done;
    if (kvc_py_check_shape(st, &a[A_TAU], want, "[B, H]") < 0) goto done;
    if (kvc_py_check_shape(st, &a[A_TAUU], want, "[B, H]") < 0) goto done;
    if (a[A_ASSIGN].t && kvc_py_check_shape(st, &a[A_ASSIGN], want, "[B, H, T]") < 0) goto done;
    want[2] = C;
    if (kvc_py_check_shape(st, &a[A_CENTERS], want, "[B, H, C]") < 0) goto done;
    if (kvc_py_check_shape(st, &a[A_CNT], want, "[B, H, C]") < 0) goto done;
    if (kvc_py_check_shape(st, &a[A_OS], want, "[B, H, C]") < 0) goto done;
    if (kvc_py_check_shape(st, &a[A_OV], want, "[B, H, C, Dv]") < 0) goto done;
    want[3] = D;
    if (kvc_py_check_shape(st, &a[A_OK], want, "[B, H, C, D]") < 0) goto done;
    for (i = A_OK; i < A_N; i++)
        if (a[i].t && kvc_py_check_output(st, &a[i], a, A_N) < 0) goto done;
    {
        const struct kvc_view *hc = kvc_py_arg_host(st, &a[A_CENTERS]);
        const struct kvc_view *hs = kvc_py_arg_host(st, &a[A_SCORES]);
        const struct kvc_view *hk = a[A_KVS].t ? kvc_py_arg_host(st, &a[A_KVS]) : NULL;
        if (hc == NULL || hs == NULL || (a[A_KVS].t && hk == NULL)) goto done;
        if (check_centers(st, hc, hk, T) < 0) goto done;
        if (check_scores(st, hs, hk) < 0) goto done;
    }

    p.keys = a[A_KEYS].view;
    p.values = a[A_VALUES].view;
    p.scores = a[A_SCORES].view;
    p.centers = a[A_CENTERS].view;
    p.tau = a[A_TAU].view;
    p.out_keys = a[A_OK].view;
    p.out_values = a[A_OV].view;
    p.counts = a[A_CNT].view;
    p.out_scores = a[A_OS].view;
    p.tau_used = a[A_TAUU].view;
    if (a[A_ASSIGN].t) p.assign = a[A_ASSIGN].view;
    p.kv_start = a[A_KVS].t ? (const int64_t *)a[A_KVS].view.data : NULL;
    p.kv_start_stride = a[A_KVS].t ? a[A_KVS].view.strides[0] : 0;
    p.num_threads = st->num_threads;
    {
        /* an empty problem takes no scratch */
        void **scratch = B * H > 0 ? &p.scratch : NULL;
        if (kvc_py_run(st, &op_evict_merge, &p, scratch, &p.scratch_bytes, a, n) < 0) goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    kvc_py_args_release(a, n);
    return ret;
}

PyMethodDef kvc_py_merge_methods[] = {
    {"evict_merge", (PyCFunction)(void (*)(void))py_evict_merge, METH_FASTCALL, evict_merge_doc},
    {NULL, NULL, 0, NULL}};
