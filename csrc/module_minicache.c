/*
 * module_minicache.c - bindings of slerp_merge and slerp_restore (MiniCache,
 * minicache.c): validate once (shapes, dtypes, t, the slot lists), run with
 * the GIL released.
 */
#include "module.h"
#include "module_run.h"
#include "module_segments.h"
#include "module_spec.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "kvc_math.h"
#include "minicache.h"

KVC_PY_OP(op_slerp_merge, slerp_merge, 0, 0)
KVC_PY_OP(op_slerp_restore, slerp_restore, 0, 0)
KVC_PY_OP(op_minicache_attention, minicache_attention, 0, 0)

/* norms carry (layer l-1, layer l): a last dimension of 2. */
static int check_pair(struct kvc_state *st, const struct kvc_arg *norms)
{
    if (norms->view.shape[3] == 2) return 0;
    return kvc_py_raise(st->ValueError, "%s: expected a last dimension of 2 (one per layer of the pair), got %lld",
                        norms->name ? norms->name : "norms", (long long)norms->view.shape[3]);
}

/* Every slot of an index list in [-1, T): the kernel writes out[.., slot]
 * (-1: padding, nothing written). */
static int check_slots(struct kvc_state *st, const char *name, const struct kvc_view *v, int64_t T)
{
    const int64_t B = v->shape[0], H = v->shape[1], m = v->shape[2];
    int64_t b, h, i;
    for (b = 0; b < B; b++)
        for (h = 0; h < H; h++)
            for (i = 0; i < m; i++) {
                const int64_t s = kvc_load_index(v->data, v->dtype, b * v->strides[0] + h * v->strides[1] +
                                                                          i * v->strides[2]);
                if (s < -1 || s >= T)
                    return kvc_py_raise(st->ValueError,
                                        "%s: value %lld at [%lld, %lld, %lld] is outside [-1, T) = [-1, %lld) "
                                        "(-1 is padding)",
                                        name, (long long)s, (long long)b, (long long)h, (long long)i,
                                        (long long)T);
            }
    return 0;
}

PyDoc_STRVAR(slerp_merge_doc,
             "slerp_merge(x1, x2, dir, norms, dist, t)\n--\n\nLow-level: see kvcompress.ops.slerp_merge.");

enum { SM_X1, SM_X2, SM_DIR, SM_NORMS, SM_DIST, SM_T, SM_N };
static const struct kvc_py_spec slerp_merge_spec[SM_N] = {
    KVC_PY_IN("x1", 4, "[B, H, n, D]", DT_FLOAT),
    KVC_PY_IN_LIKE("x2", 4, "[B, H, n, D]", SM_X1),
    KVC_PY_OUT_LIKE("dir", 4, "[B, H, n, D]", SM_X1),
    KVC_PY_OUT_FREE("norms", 4, "[B, H, n, 2]", DT_F32, 1u << 3),
    KVC_PY_OUT("dist", 3, "[B, H, n]", DT_F32),
    KVC_PY_FLOAT_IN("t", 0.0, 1.0),
};

static PyObject *py_slerp_merge(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_slerp_merge_params p;
    PyObject *ret = NULL;
    memset(&p, 0, sizeof p);
    if (kvc_py_call_parse(st, "slerp_merge", slerp_merge_spec, SM_N, args, nargs, &c) < 0) return NULL;
    if (check_pair(st, &c.a[SM_NORMS]) < 0) goto done;
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    p.x1 = c.a[SM_X1].view;
    p.x2 = c.a[SM_X2].view;
    p.dir = c.a[SM_DIR].view;
    p.norms = c.a[SM_NORMS].view;
    p.dist = c.a[SM_DIST].view;
    p.t = (float)c.f[SM_T];
    p.num_threads = st->num_threads;
    if (kvc_py_run(st, &op_slerp_merge, &p, NULL, NULL, c.a, c.n) < 0) goto done;
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

PyDoc_STRVAR(slerp_restore_doc,
             "slerp_restore(dir, norms, slots, kept, kept_slots, out, which)\n--\n\n"
             "Low-level: see kvcompress.ops.slerp_restore.");

enum { SR_DIR, SR_NORMS, SR_SLOTS, SR_KEPT, SR_KSLOTS, SR_OUT, SR_WHICH, SR_N };
static const struct kvc_py_spec slerp_restore_spec[SR_N] = {
    KVC_PY_IN("dir", 4, "[B, H, m, D]", DT_FLOAT),
    KVC_PY_IN_FREE("norms", 4, "[B, H, m, 2]", DT_F32, 1u << 3),
    KVC_PY_IN("slots", 3, "[B, H, m]", DT_INDEX),
    KVC_PY_IN_LIKE("kept", 4, "[B, H, r, D]", SR_DIR),
    KVC_PY_IN("kept_slots", 3, "[B, H, r]", DT_INDEX),
    KVC_PY_OUT_LIKE("out", 4, "[B, H, T, D]", SR_DIR),
    KVC_PY_INT_IN("which", 0, 1),
};

static PyObject *py_slerp_restore(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_slerp_restore_params p;
    PyObject *ret = NULL;
    memset(&p, 0, sizeof p);
    if (kvc_py_call_parse(st, "slerp_restore", slerp_restore_spec, SR_N, args, nargs, &c) < 0) return NULL;
    if (check_pair(st, &c.a[SR_NORMS]) < 0) goto done;
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    {
        const int64_t T = c.a[SR_OUT].view.shape[2];
        const struct kvc_view *hs = kvc_py_arg_host(st, &c.a[SR_SLOTS]);
        const struct kvc_view *hk = kvc_py_arg_host(st, &c.a[SR_KSLOTS]);
        if (hs == NULL || hk == NULL) goto done;
        if (check_slots(st, "slots", hs, T) < 0 || check_slots(st, "kept_slots", hk, T) < 0) goto done;
    }
    p.dir = c.a[SR_DIR].view;
    p.norms = c.a[SR_NORMS].view;
    p.slots = c.a[SR_SLOTS].view;
    p.kept = c.a[SR_KEPT].view;
    p.kept_slots = c.a[SR_KSLOTS].view;
    p.out = c.a[SR_OUT].view;
    p.which = (int32_t)c.i[SR_WHICH];
    p.num_threads = st->num_threads;
    if (kvc_py_run(st, &op_slerp_restore, &p, NULL, NULL, c.a, c.n) < 0) goto done;
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

/* Merge counts are log-biases: every element finite and > 0. */
static int check_counts(struct kvc_state *st, const char *name, const struct kvc_view *v)
{
    int64_t i0, i1, i2, i3;
    const int64_t n3 = v->ndim == 4 ? v->shape[3] : 1;
    for (i0 = 0; i0 < v->shape[0]; i0++)
        for (i1 = 0; i1 < v->shape[1]; i1++)
            for (i2 = 0; i2 < v->shape[2]; i2++)
                for (i3 = 0; i3 < n3; i3++) {
                    const float c = ((const float *)v->data)[i0 * v->strides[0] + i1 * v->strides[1] +
                                                             i2 * v->strides[2] + (v->ndim == 4 ? i3 * v->strides[3] : 0)];
                    if (kvc_bad_count(c)) {
                        char buf[32];
                        snprintf(buf, sizeof buf, "%g", (double)c);
                        return kvc_py_raise(st->ValueError, "%s: value %s at [%lld, %lld, %lld] is not a finite "
                                                            "count > 0 (merge counts)",
                                            name, buf, (long long)i0, (long long)i1, (long long)i2);
                    }
                }
    return 0;
}

PyDoc_STRVAR(minicache_attention_doc,
             "minicache_attention(queries, dir_k, dir_v, norms_k, norms_v, slots, keys, values, kept_slots, tail_k, "
             "tail_v, counts, kept_counts, out, which, scaling)\n--\n\nLow-level: see "
             "kvcompress.ops.minicache_attention.");

enum { MA_Q, MA_DK, MA_DV, MA_NK, MA_NV, MA_SL, MA_K, MA_V, MA_KS, MA_TK, MA_TV, MA_C, MA_KC, MA_OUT, MA_WHICH,
       MA_SCALE, MA_N };
static const struct kvc_py_spec minicache_attention_spec[MA_N] = {
    KVC_PY_IN("queries", 4, "[B, Hq, one, D]", DT_FLOAT),
    KVC_PY_IN_LIKE("dir_k", 4, "[B, H, m, D]", MA_Q),
    KVC_PY_IN_LIKE("dir_v", 4, "[B, H, m, Dv]", MA_Q),
    KVC_PY_IN_FREE("norms_k", 4, "[B, H, m, 2]", DT_F32, 1u << 3),
    KVC_PY_IN_FREE("norms_v", 4, "[B, H, m, 2]", DT_F32, 1u << 3),
    KVC_PY_IN("slots", 3, "[B, H, m]", DT_INDEX),
    KVC_PY_IN_LIKE("keys", 4, "[B, H, w, D]", MA_Q),
    KVC_PY_IN_LIKE("values", 4, "[B, H, w, Dv]", MA_Q),
    KVC_PY_IN("kept_slots", 3, "[B, H, w]", DT_INDEX),
    KVC_PY_IN_LIKE("tail_k", 4, "[B, H, t, D]", MA_Q),
    KVC_PY_IN_LIKE("tail_v", 4, "[B, H, t, Dv]", MA_Q),
    {.name = "counts", .kind = KVC_PY_OPTIONAL, .ndim = 4, .dims = "[B, H, m, 2]", .dtypes = DT_F32,
     .unbound = 1u << 3},
    KVC_PY_OPT("kept_counts", 3, "[B, H, w]", DT_F32),
    KVC_PY_OUT_LIKE("out", 4, "[B, one, Hq, Dv]", MA_Q),
    KVC_PY_INT_IN("which", 0, 1),
    KVC_PY_FINITE("scaling"),
};

static PyObject *py_minicache_attention(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_minicache_attention_params p;
    PyObject *ret = NULL;
    memset(&p, 0, sizeof p);
    if (kvc_py_call_parse(st, "minicache_attention", minicache_attention_spec, MA_N, args, nargs, &c) < 0)
        return NULL;
    if (kvc_py_check_one_query(st, "MiniCache attention", c.a[MA_Q].view.shape[2]) < 0 ||
        kvc_py_check_group(st, "queries", c.a[MA_Q].view.shape[1], c.a[MA_DK].view.shape[1]) < 0 ||
        check_pair(st, &c.a[MA_NK]) < 0 || check_pair(st, &c.a[MA_NV]) < 0 ||
        (c.a[MA_C].t && check_pair(st, &c.a[MA_C]) < 0))
        goto done;
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    if (c.a[MA_C].t || c.a[MA_KC].t) {
        const struct kvc_view *hc = c.a[MA_C].t ? kvc_py_arg_host(st, &c.a[MA_C]) : NULL;
        const struct kvc_view *hk = c.a[MA_KC].t ? kvc_py_arg_host(st, &c.a[MA_KC]) : NULL;
        if ((c.a[MA_C].t && hc == NULL) || (c.a[MA_KC].t && hk == NULL)) goto done;
        if ((hc && check_counts(st, "counts", hc) < 0) || (hk && check_counts(st, "kept_counts", hk) < 0)) goto done;
    }
    p.q = c.a[MA_Q].view;
    p.dir_k = c.a[MA_DK].view;
    p.dir_v = c.a[MA_DV].view;
    p.norms_k = c.a[MA_NK].view;
    p.norms_v = c.a[MA_NV].view;
    p.slots = c.a[MA_SL].view;
    p.keys = c.a[MA_K].view;
    p.values = c.a[MA_V].view;
    p.kept_slots = c.a[MA_KS].view;
    p.tail_k = c.a[MA_TK].view;
    p.tail_v = c.a[MA_TV].view;
    if (c.a[MA_C].t) p.counts = c.a[MA_C].view;
    if (c.a[MA_KC].t) p.kept_counts = c.a[MA_KC].view;
    p.out = c.a[MA_OUT].view;
    p.which = (int32_t)c.i[MA_WHICH];
    p.scaling = (float)c.f[MA_SCALE];
    p.num_threads = st->num_threads;
    if (kvc_py_run(st, &op_minicache_attention, &p, NULL, NULL, c.a, c.n) < 0) goto done;
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

PyMethodDef kvc_py_minicache_methods[] = {
    {"minicache_attention", (PyCFunction)(void (*)(void))py_minicache_attention, METH_FASTCALL,
     minicache_attention_doc},
    {"slerp_merge", (PyCFunction)(void (*)(void))py_slerp_merge, METH_FASTCALL, slerp_merge_doc},
    {"slerp_restore", (PyCFunction)(void (*)(void))py_slerp_restore, METH_FASTCALL, slerp_restore_doc},
    {NULL, NULL, 0, NULL}};
