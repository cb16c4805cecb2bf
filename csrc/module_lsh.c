/*
 * module_lsh.c - bindings of simhash and lsh_attention (MagicPIG): validate
 * once, run with the GIL released.
 */
#include "module.h"
#include "module_run.h"
#include "module_segments.h"
#include "module_spec.h"

#include <string.h>

#include "lsh.h"

KVC_PY_OP(op_simhash, simhash, 0, 0)
KVC_PY_OP(op_lsh_attention, lsh_attention, 0, 0)

PyDoc_STRVAR(simhash_doc,
             "simhash(x, planes, center, codes, K, L, group)\n--\n\nLow-level: see kvcompress.ops.simhash.");

enum { SH_X, SH_PLANES, SH_CENTER, SH_CODES, SH_K, SH_L, SH_G, SH_N };
static const struct kvc_py_spec simhash_spec[SH_N] = {
    KVC_PY_IN("x", 4, "[B, H, n, D]", DT_FLOAT),
    KVC_PY_IN("planes", 3, "[Hk, LK, D]", DT_F32),
    KVC_PY_OPT("center", 3, "[B, Hk, D]", DT_F32),
    KVC_PY_OUT("codes", 4, "[B, H, n, L]", 1u << KVC_I32),
    KVC_PY_INT_IN("K", 1, 30),
    KVC_PY_INT_IN("L", 1, 1 << 16),
    KVC_PY_INT_IN("group", 1, 1 << 16),
};

static PyObject *py_simhash(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_simhash_params p;
    PyObject *ret = NULL;
    memset(&p, 0, sizeof p);
    if (kvc_py_call_parse(st, "simhash", simhash_spec, SH_N, args, nargs, &c) < 0) return NULL;
    p.K = (int32_t)c.i[SH_K];
    p.L = (int32_t)c.i[SH_L];
    p.group = (int32_t)c.i[SH_G];
    if (c.a[SH_X].view.shape[1] != c.a[SH_PLANES].view.shape[0] * p.group) {
        kvc_py_raise(st->ValueError, "planes: %lld heads x group %d does not give the %lld heads of x",
                     (long long)c.a[SH_PLANES].view.shape[0], (int)p.group, (long long)c.a[SH_X].view.shape[1]);
        goto done;
    }
    if (c.a[SH_PLANES].view.shape[1] != (int64_t)p.K * p.L || c.a[SH_CODES].view.shape[3] != p.L) {
        kvc_py_raise(st->ValueError, "planes: expected L * K = %lld planes and codes with L = %d tables",
                     (long long)p.K * p.L, (int)p.L);
        goto done;
    }
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    p.x = c.a[SH_X].view;
    p.planes = c.a[SH_PLANES].view;
    if (c.a[SH_CENTER].t) p.center = c.a[SH_CENTER].view;
    p.codes = c.a[SH_CODES].view;
    p.num_threads = st->num_threads;
    if (kvc_py_run(st, &op_simhash, &p, NULL, NULL, c.a, c.n) < 0) goto done;
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

PyDoc_STRVAR(lsh_attention_doc,
             "lsh_attention(queries, keys, values, codes, qcodes, center, out, lse, reads, kv_start, offsets, "
             "lengths, counts, sinks, window, K, hits, scaling)\n--\n\nLow-level: see kvcompress.ops.lsh_attention.");

enum { LA_Q, LA_K, LA_V, LA_CODES, LA_QCODES, LA_CENTER, LA_OUT, LA_LSE, LA_READS, LA_START, LA_OFF, LA_LEN, LA_CNT,
       LA_SINKS, LA_WINDOW, LA_KB, LA_HITS, LA_SCALE, LA_N };

/* kvc_py_check_counts reads the layout arguments in this order. */
_Static_assert(LA_OFF == LA_START + 1 && LA_LEN == LA_START + 2 && LA_CNT == LA_START + 3,
               "layout argument order");

/* the merge counts ops.attention takes */
#define LA_COUNTS (DT_F32 | (1u << KVC_I32))

/* Uniform layout: [B, H, n, D] keys; offsets/lengths are None. */
static const struct kvc_py_spec lsh_attention_uniform_spec[LA_N] = {
    KVC_PY_IN("queries", 4, "[B, Hq, one, D]", DT_FLOAT),
    {.name = "keys", .kind = KVC_PY_TENSOR, .ndim = 4, .dims = "[B, H, n, D]", .dtypes = DT_FLOAT, .like = LA_Q + 1},
    KVC_PY_IN_LIKE("values", 4, "[B, H, n, D]", LA_Q),
    KVC_PY_IN("codes", 4, "[B, H, n, L]", 1u << KVC_I32),
    KVC_PY_IN("qcodes", 4, "[B, Hq, one, L]", 1u << KVC_I32),
    KVC_PY_OPT("center", 3, "[B, H, D]", DT_F32),
    KVC_PY_OUT_LIKE("out", 4, "[B, one, Hq, D]", LA_Q),
    KVC_PY_OPT_OUT("lse", 2, "[B, Hq]", DT_F32),
    KVC_PY_OPT_OUT("reads", 2, "[B, Hq]", 1u << KVC_I32),
    KVC_PY_START("n"),
    KVC_PY_CUSTOM_ARG("offsets", 0, NULL, 0),
    KVC_PY_CUSTOM_ARG("lengths", 0, NULL, 0),
    KVC_PY_OPT("counts", 3, "[B, H, n]", LA_COUNTS),
    KVC_PY_INT_IN("sinks", 0, INT64_MAX),
    KVC_PY_INT_IN("window", 0, INT64_MAX),
    KVC_PY_INT_IN("K", 1, 30),
    KVC_PY_INT_IN("hits", 1, 1 << 16),
    KVC_PY_FINITE("scaling"),
};

/* Ragged layout: [R, D] keys, a segment of rows per head; kv_start is None.
 * H binds to center alone: the binding checks it against B * H offsets. */
static const struct kvc_py_spec lsh_attention_ragged_spec[LA_N] = {
    KVC_PY_IN("queries", 4, "[B, Hq, one, D]", DT_FLOAT),
    {.name = "keys", .kind = KVC_PY_TENSOR, .ndim = 2, .dims = "[R, D]", .dtypes = DT_FLOAT, .like = LA_Q + 1},
    KVC_PY_IN_LIKE("values", 2, "[R, D]", LA_Q),
    KVC_PY_IN("codes", 2, "[R, L]", 1u << KVC_I32),
    KVC_PY_IN("qcodes", 4, "[B, Hq, one, L]", 1u << KVC_I32),
    KVC_PY_OPT("center", 3, "[B, H, D]", DT_F32),
    KVC_PY_OUT_LIKE("out", 4, "[B, one, Hq, D]", LA_Q),
    KVC_PY_OPT_OUT("lse", 2, "[B, Hq]", DT_F32),
    KVC_PY_OPT_OUT("reads", 2, "[B, Hq]", 1u << KVC_I32),
    KVC_PY_CUSTOM_ARG("kv_start", 0, NULL, 0),
    KVC_PY_IN("offsets", 1, "[B * H]", DT_I64),
    KVC_PY_IN("lengths", 1, "[B * H]", DT_I64),
    KVC_PY_OPT("counts", 1, "[R]", LA_COUNTS),
    KVC_PY_INT_IN("sinks", 0, INT64_MAX),
    KVC_PY_INT_IN("window", 0, INT64_MAX),
    KVC_PY_INT_IN("K", 1, 30),
    KVC_PY_INT_IN("hits", 1, 1 << 16),
    KVC_PY_FINITE("scaling"),
};

static PyObject *py_lsh_attention(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_lsh_attention_params p;
    PyObject *ret = NULL;
    int ragged;
    int64_t B, Hq, H;
    memset(&p, 0, sizeof p);
    if (kvc_py_check_nargs("lsh_attention", nargs, LA_N) < 0) return NULL;
    ragged = kvc_py_ragged_layout(st, args[LA_OFF], args[LA_LEN], args[LA_START]);
    if (ragged < 0) return NULL;
    if (kvc_py_call_parse(st, "lsh_attention", ragged ? lsh_attention_ragged_spec : lsh_attention_uniform_spec,
                          LA_N, args, nargs, &c) < 0)
        return NULL;
    B = c.a[LA_Q].view.shape[0];
    Hq = c.a[LA_Q].view.shape[1];
    if (ragged) {
        const int64_t N = c.a[LA_OFF].view.shape[0];
        /* before the B * H rule, which reads the offsets' length alone */
        if (kvc_py_check_shape(st, &c.a[LA_LEN], c.a[LA_OFF].view.shape, "[B * H]") < 0) goto done;
        if (B == 0 ? N != 0 : N == 0 || N % B != 0) {
            kvc_py_raise(st->ValueError, "offsets: %lld entries is not B * H for the batch size B = %lld of queries",
                         (long long)N, (long long)B);
            goto done;
        }
        H = B > 0 ? N / B : 1;
        if (c.a[LA_CENTER].t && c.a[LA_CENTER].view.shape[1] != H) {
            const int64_t want[3] = {B, H, c.a[LA_Q].view.shape[3]};
            if (kvc_py_check_shape(st, &c.a[LA_CENTER], want, "[B, H, D]") < 0) goto done;
        }
    } else {
        H = c.a[LA_K].view.shape[1];
    }
    if (kvc_py_check_one_query(st, "LSH-sampled attention", c.a[LA_Q].view.shape[2]) < 0 ||
        kvc_py_check_group(st, "queries", Hq, H) < 0)
        goto done;
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    if (ragged) {
        const struct kvc_view *hoff = kvc_py_arg_host(st, &c.a[LA_OFF]);
        const struct kvc_view *hlen = hoff ? kvc_py_arg_host(st, &c.a[LA_LEN]) : NULL;
        if (hlen == NULL) goto done;
        /* every row a head reads inside keys (and so values, codes, counts:
         * the spec bound their R), segments disjoint as ops.attention wants */
        if (kvc_py_check_segments(st, hoff, hlen, H, c.a[LA_K].view.shape[0], "keys", 0, 1) < 0) goto done;
    }
    if (kvc_py_check_counts(st, &c, LA_START, ragged, B * H) < 0) goto done;
    p.q = c.a[LA_Q].view;
    p.k = c.a[LA_K].view;
    p.v = c.a[LA_V].view;
    p.codes = c.a[LA_CODES].view;
    p.qcodes = c.a[LA_QCODES].view;
    if (c.a[LA_CENTER].t) p.center = c.a[LA_CENTER].view;
    if (c.a[LA_CNT].t) p.counts = c.a[LA_CNT].view;
    p.out = c.a[LA_OUT].view;
    if (c.a[LA_LSE].t) p.lse = c.a[LA_LSE].view;
    if (c.a[LA_READS].t) p.reads = c.a[LA_READS].view;
    p.layout = ragged ? KVC_KV_RAGGED : KVC_KV_UNIFORM;
    p.num_kv_heads = H;
    p.kv_start = kvc_py_call_i64(&c, LA_START, &p.kv_start_stride);
    p.offsets = kvc_py_call_i64(&c, LA_OFF, &p.offsets_stride);
    p.lengths = kvc_py_call_i64(&c, LA_LEN, &p.lengths_stride);
    p.sinks = c.i[LA_SINKS];
    p.window = c.i[LA_WINDOW];
    p.K = (int32_t)c.i[LA_KB];
    p.L = (int32_t)c.a[LA_CODES].view.shape[ragged ? 1 : 3];
    p.hits = (int32_t)c.i[LA_HITS];
    p.scaling = (float)c.f[LA_SCALE];
    p.num_threads = st->num_threads;
    if (kvc_py_run(st, &op_lsh_attention, &p, NULL, NULL, c.a, c.n) < 0) goto done;
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

PyMethodDef kvc_py_lsh_methods[] = {
    {"simhash", (PyCFunction)(void (*)(void))py_simhash, METH_FASTCALL, simhash_doc},
    {"lsh_attention", (PyCFunction)(void (*)(void))py_lsh_attention, METH_FASTCALL, lsh_attention_doc},
    {NULL, NULL, 0, NULL}};
