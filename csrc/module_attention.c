/*
 * module_attention.c - binding of kvc_attention (decode/chunk attention over
 * a uniform or ragged layer): validate once, run with the GIL released.
 */
#include "module.h"
#include "module_run.h"
#include "module_segments.h"
#include "module_spec.h"

#include <string.h>

#include "attention.h"
#include "kvc_math.h"

/* Argument slots, also the release order. */
enum { A_Q, A_K, A_V, A_OUT, A_SCALE, A_START, A_OFF, A_LEN, A_CNT, A_N };

/* kvc_py_check_counts reads the layout arguments in this order. */
_Static_assert(A_OFF == A_START + 1 && A_LEN == A_START + 2 && A_CNT == A_START + 3,
               "layout argument order");

KVC_PY_OP(op_attention, attention, 1, 1)

PyDoc_STRVAR(attention_doc,
             "attention(queries, keys, values, out, scaling, kv_start, offsets, lengths, counts)\n--\n\n"
             "Low-level: see kvcompress.ops.attention.");

#define AT_COUNTS (DT_F32 | (1u << KVC_I32))

/* Uniform layout: [B, Hkv, n, D] keys; batch and head dim of keys are
 * checked below with their own messages, offsets/lengths are None. */
static const struct kvc_py_spec attention_uniform_spec[A_N] = {
    KVC_PY_IN("queries", 4, "[B, Hq, q, D]", DT_FLOAT),
    {.name = "keys", .kind = KVC_PY_TENSOR, .ndim = 4, .dims = "[B, Hkv, n, D]", .dtypes = DT_FLOAT,
     .unbound = 0x9, .like = A_Q + 1},
    KVC_PY_IN_LIKE("values", 4, "[B, Hkv, n, D]", A_Q),
    KVC_PY_OUT_LIKE("out", 4, "[B, q, Hq, D]", A_Q),
    KVC_PY_FINITE("scaling"),
    KVC_PY_START("n"),
    KVC_PY_CUSTOM_ARG("offsets", 0, NULL, 0),
    KVC_PY_CUSTOM_ARG("lengths", 0, NULL, 0),
    KVC_PY_OPT("counts", 3, "[B, Hkv, n]", AT_COUNTS),
};

/* Ragged layout: [N, D] keys with per-head segments; kv_start is None. */
static const struct kvc_py_spec attention_ragged_spec[A_N] = {
    KVC_PY_IN("queries", 4, "[B, Hq, q, D]", DT_FLOAT),
    {.name = "keys", .kind = KVC_PY_TENSOR, .ndim = 2, .dims = "[N, D]", .dtypes = DT_FLOAT,
     .unbound = 0x2, .like = A_Q + 1},
    KVC_PY_IN_LIKE("values", 2, "[N, D]", A_Q),
    KVC_PY_OUT_LIKE("out", 4, "[B, q, Hq, D]", A_Q),
    KVC_PY_FINITE("scaling"),
    KVC_PY_CUSTOM_ARG("kv_start", 0, NULL, 0),
    KVC_PY_IN("offsets", 1, "[B * Hkv]", DT_I64),
    KVC_PY_IN("lengths", 1, "[B * Hkv]", DT_I64),
    KVC_PY_OPT("counts", 1, "[N]", AT_COUNTS),
};

static PyObject *py_attention(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_attention_params p;
    int ragged;
    int64_t B, Hq, q, D, Hkv;
    const struct kvc_view *k;
    PyObject *ret = NULL;
    memset(&p, 0, sizeof p);
    if (kvc_py_check_nargs("attention", nargs, A_N) < 0) return NULL;
    ragged = kvc_py_ragged_layout(st, args[A_OFF], args[A_LEN], args[A_START]);
    if (ragged < 0) return NULL;
    if (kvc_py_call_parse(st, "attention", ragged ? attention_ragged_spec : attention_uniform_spec, A_N,
                          args, nargs, &c) < 0)
        return NULL;
    B = c.a[A_Q].view.shape[0];
    Hq = c.a[A_Q].view.shape[1];
    q = c.a[A_Q].view.shape[2];
    D = c.a[A_Q].view.shape[3];
    k = &c.a[A_K].view;
    if (!ragged && k->shape[0] != B) {
        kvc_py_raise(st->ValueError, "keys: batch size %lld does not match queries (%lld)",
                     (long long)k->shape[0], (long long)B);
        goto done;
    }
    if (k->shape[ragged ? 1 : 3] != D) {
        kvc_py_raise(st->ValueError, "keys: head dim %lld does not match queries (%lld)",
                     (long long)k->shape[ragged ? 1 : 3], (long long)D);
        goto done;
    }
    if (ragged) {
        const int64_t H = c.a[A_OFF].view.shape[0];
        /* before the B * Hkv rule, which reads the offsets' length alone */
        if (kvc_py_check_shape(st, &c.a[A_LEN], c.a[A_OFF].view.shape, "[B * Hkv]") < 0) goto done;
        if (B == 0 ? H != 0 : H == 0 || H % B != 0) {
            kvc_py_raise(st->ValueError,
                         "offsets: %lld entries is not B * Hkv for the batch size B = %lld of queries",
                         (long long)H, (long long)B);
            goto done;
        }
        Hkv = B > 0 ? H / B : 1;
    } else {
        if (q > k->shape[2]) {
            kvc_py_raise(st->ValueError,
                         "queries: %lld queries but keys hold only %lld slots (the queries are "
                         "the last q slots)",
                         (long long)q, (long long)k->shape[2]);
            goto done;
        }
        Hkv = k->shape[1];
    }
    if (kvc_py_check_group(st, "queries", Hq, Hkv) < 0) goto done;
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    if (ragged) {
        const struct kvc_view *hoff = kvc_py_arg_host(st, &c.a[A_OFF]);
        const struct kvc_view *hlen = hoff ? kvc_py_arg_host(st, &c.a[A_LEN]) : NULL;
        if (hlen == NULL) goto done;
        if (kvc_py_check_segments(st, hoff, hlen, Hkv, k->shape[0], "keys", q, 1) < 0) goto done;
    }

    p.q = c.a[A_Q].view;
    p.k = *k;
    p.v = c.a[A_V].view;
    p.out = c.a[A_OUT].view;
    if (c.a[A_CNT].t) p.counts = c.a[A_CNT].view;
    p.layout = ragged ? KVC_KV_RAGGED : KVC_KV_UNIFORM;
    p.num_kv_heads = Hkv;
    p.kv_start = kvc_py_call_i64(&c, A_START, &p.kv_start_stride);
    p.offsets = kvc_py_call_i64(&c, A_OFF, &p.offsets_stride);
    p.lengths = kvc_py_call_i64(&c, A_LEN, &p.lengths_stride);
    p.scaling = (float)c.f[A_SCALE];
    p.num_threads = st->num_threads;
    if (kvc_py_check_counts(st, &c, A_START, ragged, B * Hkv) < 0) goto done;
    {
        /* an empty problem takes no scratch */
        void **scratch = kvc_py_view_numel(&p.out) > 0 ? &p.scratch : NULL;
        if (kvc_py_run(st, &op_attention, &p, scratch, &p.scratch_bytes, c.a, c.n) < 0) goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

PyMethodDef kvc_py_attention_methods[] = {
    {"attention", (PyCFunction)(void (*)(void))py_attention, METH_FASTCALL, attention_doc},
    {NULL, NULL, 0, NULL}};
