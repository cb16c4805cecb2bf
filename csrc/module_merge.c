/*
 * module_merge.c - binding of evict_merge (merge.c): validate once (shapes,
 * dtypes, aliasing, the centers lists and the scores), run with the GIL
 * released, map status codes to exceptions.
 */
#include "module.h"
#include "module_run.h"
#include "module_segments.h"
#include "module_spec.h"

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
 * then only -1. Cheap (O(B*H*C)) next to the op (O(T*C*D) per head).
 * Shared with gauss_merge (module_kvmerger.c), declared in module_segments.h. */
int kvc_py_check_centers(struct kvc_state *st, const struct kvc_view *cv, const struct kvc_view *ks,
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
static const struct kvc_py_spec evict_merge_spec[A_N] = {
    KVC_PY_IN("keys", 4, "[B, H, T, D]", DT_FLOAT),
    KVC_PY_IN_LIKE("values", 4, "[B, H, T, Dv]", A_KEYS),
    KVC_PY_IN("scores", 3, "[B, H, T]", DT_F32),
    KVC_PY_IN("centers", 3, "[B, H, C]", DT_I64),
    KVC_PY_IN("tau", 2, "[B, H]", DT_F32),
    KVC_PY_START("T"),
    KVC_PY_OUT_LIKE("out_keys", 4, "[B, H, C, D]", A_KEYS),
    KVC_PY_OUT_LIKE("out_values", 4, "[B, H, C, Dv]", A_KEYS),
    KVC_PY_OUT("counts", 3, "[B, H, C]", DT_F32 | (1u << KVC_I32)),
    KVC_PY_OUT("out_scores", 3, "[B, H, C]", DT_F32),
    KVC_PY_OUT("tau_used", 2, "[B, H]", DT_F32),
    KVC_PY_OPT_OUT("assign", 3, "[B, H, T]", DT_I64),
};

static PyObject *py_evict_merge(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_evict_merge_params p;
    PyObject *ret = NULL;
    memset(&p, 0, sizeof p);
    if (kvc_py_call_parse(st, "evict_merge", evict_merge_spec, A_N, args, nargs, &c) < 0) return NULL;
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    {
        const struct kvc_view *hc = kvc_py_arg_host(st, &c.a[A_CENTERS]);
        const struct kvc_view *hs = kvc_py_arg_host(st, &c.a[A_SCORES]);
        const struct kvc_view *hk = c.a[A_KVS].t ? kvc_py_arg_host(st, &c.a[A_KVS]) : NULL;
        if (hc == NULL || hs == NULL || (c.a[A_KVS].t && hk == NULL)) goto done;
        if (kvc_py_check_centers(st, hc, hk, c.a[A_KEYS].view.shape[2]) < 0) goto done;
        if (check_scores(st, hs, hk) < 0) goto done;
    }
    p.keys = c.a[A_KEYS].view;
    p.values = c.a[A_VALUES].view;
    p.scores = c.a[A_SCORES].view;
    p.centers = c.a[A_CENTERS].view;
    p.tau = c.a[A_TAU].view;
    p.out_keys = c.a[A_OK].view;
    p.out_values = c.a[A_OV].view;
    p.counts = c.a[A_CNT].view;
    p.out_scores = c.a[A_OS].view;
    p.tau_used = c.a[A_TAUU].view;
    if (c.a[A_ASSIGN].t) p.assign = c.a[A_ASSIGN].view;
    p.kv_start = kvc_py_call_i64(&c, A_KVS, &p.kv_start_stride);
    p.num_threads = st->num_threads;
    {
        /* an empty problem takes no scratch */
        void **scratch = p.keys.shape[0] * p.keys.shape[1] > 0 ? &p.scratch : NULL;
        if (kvc_py_run(st, &op_evict_merge, &p, scratch, &p.scratch_bytes, c.a, c.n) < 0) goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

PyMethodDef kvc_py_merge_methods[] = {
    {"evict_merge", (PyCFunction)(void (*)(void))py_evict_merge, METH_FASTCALL, evict_merge_doc},
    {NULL, NULL, 0, NULL}};
