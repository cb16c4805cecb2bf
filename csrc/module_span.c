/*
 * module_span.c - binding of span_merge (span.c): validate once (the spans
 * inside [0, T], the counts on them), run with the GIL released.
 */
#include "module.h"
#include "module_run.h"
#include "module_segments.h"
#include "module_spec.h"

#include <string.h>

#include "span.h"

KVC_PY_OP(op_span_merge, span_merge, 1, 0)

PyDoc_STRVAR(span_merge_doc,
             "span_merge(keys, values, counts, lo, hi, out_keys, out_values, out_counts)\n--\n\n"
             "Low-level: see kvcompress.ops.span_merge.");

enum { S_KEYS, S_VALUES, S_COUNTS, S_LO, S_HI, S_OK, S_OV, S_OC, S_N };
static const struct kvc_py_spec span_merge_spec[S_N] = {
    KVC_PY_IN("keys", 4, "[B, H, T, D]", DT_FLOAT),
    KVC_PY_IN_LIKE("values", 4, "[B, H, T, Dv]", S_KEYS),
    KVC_PY_OPT("counts", 3, "[B, H, T]", DT_F32),
    KVC_PY_IN("lo", 2, "[B, H]", DT_I64),
    KVC_PY_IN("hi", 2, "[B, H]", DT_I64),
    KVC_PY_OUT_LIKE("out_keys", 3, "[B, H, D]", S_KEYS),
    KVC_PY_OUT_LIKE("out_values", 3, "[B, H, Dv]", S_KEYS),
    KVC_PY_OUT("out_counts", 2, "[B, H]", DT_F32),
};

static int64_t at2(const struct kvc_view *v, int64_t b, int64_t h)
{
    return ((const int64_t *)v->data)[b * v->strides[0] + h * v->strides[1]];
}

/* 0 <= lo <= hi <= T per (b, h); every count on [lo, hi) finite and > 0
 * (kvc_bad_count). O(B*H + sum of spans), next to the op's O(span * D). */
static int check_spans(struct kvc_state *st, const struct kvc_view *lo, const struct kvc_view *hi,
                       const struct kvc_view *counts, int64_t T)
{
    const int64_t B = lo->shape[0], H = lo->shape[1];
    int64_t b, h, j;
    for (b = 0; b < B; b++)
        for (h = 0; h < H; h++) {
            const int64_t l = at2(lo, b, h), e = at2(hi, b, h);
            if (l < 0 || l > T)
                return kvc_py_raise(st->ValueError, "lo: value %lld at [%lld, %lld] is outside [0, T] = [0, %lld]",
                                    (long long)l, (long long)b, (long long)h, (long long)T);
            if (e < l || e > T)
                return kvc_py_raise(st->ValueError,
                                    "hi: value %lld at [%lld, %lld] is outside [lo, T] = [%lld, %lld] "
                                    "(need 0 <= lo <= hi <= T)",
                                    (long long)e, (long long)b, (long long)h, (long long)l, (long long)T);
            if (counts == NULL) continue;
            for (j = l; j < e; j++) {
                const float c = ((const float *)counts->data)[b * counts->strides[0] + h * counts->strides[1] +
                                                              j * counts->strides[2]];
                if (kvc_bad_count(c)) {
                    char buf[32];
                    PyOS_snprintf(buf, sizeof buf, "%g", (double)c);
                    return kvc_py_raise(st->ValueError,
                                        "counts: value %s at [%lld, %lld, %lld] (in the span [lo, hi) = "
                                        "[%lld, %lld)) is not a finite count > 0",
                                        buf, (long long)b, (long long)h, (long long)j, (long long)l, (long long)e);
                }
            }
        }
    return 0;
}

static PyObject *py_span_merge(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_span_merge_params p;
    PyObject *ret = NULL;
    memset(&p, 0, sizeof p);
    if (kvc_py_call_parse(st, "span_merge", span_merge_spec, S_N, args, nargs, &c) < 0) return NULL;
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    {
        const struct kvc_view *hl = kvc_py_arg_host(st, &c.a[S_LO]);
        const struct kvc_view *hh = hl ? kvc_py_arg_host(st, &c.a[S_HI]) : NULL;
        const struct kvc_view *hc = NULL;
        if (hh == NULL) goto done;
        if (c.a[S_COUNTS].t && (hc = kvc_py_arg_host(st, &c.a[S_COUNTS])) == NULL) goto done;
        if (check_spans(st, hl, hh, hc, c.a[S_KEYS].view.shape[2]) < 0) goto done;
    }
    p.keys = c.a[S_KEYS].view;
    p.values = c.a[S_VALUES].view;
    if (c.a[S_COUNTS].t) p.counts = c.a[S_COUNTS].view;
    p.lo = c.a[S_LO].view;
    p.hi = c.a[S_HI].view;
    p.out_keys = c.a[S_OK].view;
    p.out_values = c.a[S_OV].view;
    p.out_counts = c.a[S_OC].view;
    p.num_threads = st->num_threads;
    {
        /* an empty problem takes no scratch */
        void **scratch = p.keys.shape[0] * p.keys.shape[1] > 0 ? &p.scratch : NULL;
        if (kvc_py_run(st, &op_span_merge, &p, scratch, &p.scratch_bytes, c.a, c.n) < 0) goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

PyMethodDef kvc_py_span_methods[] = {
    {"span_merge", (PyCFunction)(void (*)(void))py_span_merge, METH_FASTCALL, span_merge_doc},
    {NULL, NULL, 0, NULL}};
