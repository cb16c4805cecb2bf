/*
 * module_attention.c - binding of kvc_attention (decode/chunk attention over
 * a uniform or ragged layer): validate once, run with the GIL released.
 */
#include "module.h"
#include "module_run.h"
#include "module_spec.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"
#include "kvc_math.h"

/* Argument slots, also the release order. */
enum { A_Q, A_K, A_V, A_OUT, A_SCALE, A_START, A_OFF, A_LEN, A_CNT, A_N };

KVC_PY_OP(op_attention, attention, 1, 1)

/* Element i of a host view of int64 (offsets, lengths). */
static int64_t i64_at(const struct kvc_view *v, int64_t i)
{
    return ((const int64_t *)v->data)[i * v->strides[0]];
}

struct seg {
    int64_t off, len, head;
};

static int seg_cmp(const void *x, const void *y)
{
    const struct seg *a = (const struct seg *)x, *b = (const struct seg *)y;
    if (a->off != b->off) return a->off < b->off ? -1 : 1;
    return a->head < b->head ? -1 : (a->head > b->head);
}

/* Offsets and lengths of the ragged layout: every segment inside [0, N),
 * lengths 0 or >= q, non-empty segments pairwise disjoint (in any order;
 * gaps of unused capacity are fine). */
static int check_segments(struct kvc_state *st, const struct kvc_view *off, const struct kvc_view *len,
                          int64_t Hkv, int64_t N, int64_t q)
{
    const int64_t H = off->shape[0];
    struct seg *s;
    int64_t i, ns = 0;
    for (i = 0; i < H; i++) {
        const int64_t o = i64_at(off, i), n = i64_at(len, i);
        if (n < 0)
            return kvc_py_raise(st->ValueError, "lengths: value %lld of head %lld (b=%lld, h=%lld) is negative",
                                (long long)n, (long long)i, (long long)(i / Hkv), (long long)(i % Hkv));
        if (o < 0 || o > N || n > N - o)
            return kvc_py_raise(st->ValueError,
                                "offsets: segment [%lld, %lld + %lld) of head %lld (b=%lld, h=%lld) is "
                                "outside the %lld rows of keys",
                                (long long)o, (long long)o, (long long)n, (long long)i,
                                (long long)(i / Hkv), (long long)(i % Hkv), (long long)N);
        if (n > 0 && n < q)
            return kvc_py_raise(st->ValueError,
                                "lengths: head %lld (b=%lld, h=%lld) has %lld slots, fewer than the %lld "
                                "queries (the queries are the last q slots of every non-empty head)",
                                (long long)i, (long long)(i / Hkv), (long long)(i % Hkv), (long long)n,
                                (long long)q);
        ns += n > 0;
    }
    if (ns < 2) return 0;
    s = (struct seg *)PyMem_Malloc((size_t)ns * sizeof *s);
    if (s == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0, ns = 0; i < H; i++)
        if (i64_at(len, i) > 0) {
            s[ns].off = i64_at(off, i);
            s[ns].len = i64_at(len, i);
            s[ns].head = i;
            ns++;
        }
    qsort(s, (size_t)ns, sizeof *s, seg_cmp);
    for (i = 1; i < ns; i++)
        if (s[i].off < s[i - 1].off + s[i - 1].len) {
            kvc_py_raise(st->ValueError,
                         "offsets: segments of heads %lld [%lld, %lld) and %lld [%lld, %lld) overlap",
                         (long long)s[i - 1].head, (long long)s[i - 1].off,
                         (long long)(s[i - 1].off + s[i - 1].len), (long long)s[i].head,
                         (long long)s[i].off, (long long)(s[i].off + s[i].len));
            PyMem_Free(s);
            return -1;
        }
    PyMem_Free(s);
    return 0;
}

/* Merge counts must be finite and >= 1 on every slot the kernel reads. */
static int bad_count(float c) { return !(c >= 1.0f) || isinf(c); }

/* Count of element i of a f32 or i32 buffer, as the kernel reads it. */
static float count_at(const struct kvc_view *v, int64_t i)
{
    return v->dtype == KVC_I32 ? (float)((const int32_t *)v->data)[i] : ((const float *)v->data)[i];
}

static int raise_count(struct kvc_state *st, float c, const char *where)
{
    char val[32];
    PyOS_snprintf(val, sizeof val, "%g", (double)c);
    return kvc_py_raise(st->ValueError, "counts: %s is %s, expected a finite count >= 1", where, val);
}

static int check_counts(struct kvc_state *st, const struct kvc_attention_params *p)
{
    char where[96];
    int64_t i, j;
    if (p->layout == KVC_KV_RAGGED) {
        const int64_t H = p->q.shape[0] * p->num_kv_heads, cs = p->counts.strides[0];
        for (i = 0; i < H; i++) {
            const int64_t o = p->offsets[i * p->offsets_stride], n = p->lengths[i * p->lengths_stride];
            for (j = o; j < o + n; j++) {
                float v = count_at(&p->counts, j * cs);
                if (bad_count(v)) {
                    PyOS_snprintf(where, sizeof where, "value at row %lld (head %lld)", (long long)j,
                                  (long long)i);
                    return raise_count(st, v, where);
                }
            }
        }
    } else {
        const int64_t B = p->counts.shape[0], H = p->counts.shape[1], n = p->counts.shape[2];
        int64_t b;
        for (b = 0; b < B; b++) {
            const int64_t s0 = p->kv_start ? p->kv_start[b * p->kv_start_stride] : 0;
            for (i = 0; i < H; i++)
                for (j = s0; j < n; j++) {
                    float v = count_at(&p->counts, b * p->counts.strides[0] + i * p->counts.strides[1] +
                                                       j * p->counts.strides[2]);
                    if (bad_count(v)) {
                        PyOS_snprintf(where, sizeof where, "value at [%lld, %lld, %lld]", (long long)b,
                                      (long long)i, (long long)j);
                        return raise_count(st, v, where);
                    }
                }
        }
    }
    return 0;
}

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
    ragged = args[A_OFF] != Py_None;
    if (ragged != (args[A_LEN] != Py_None)) {
        kvc_py_raise(st->ValueError, "%s: the ragged layout needs both offsets and lengths",
                     ragged ? "lengths" : "offsets");
        return NULL;
    }
    if (ragged && args[A_START] != Py_None) {
        kvc_py_raise(st->ValueError,
                     "kv_start: only for the uniform layout (a ragged head starts at its offset)");
        return NULL;
    }
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
    if (Hkv == 0 ? Hq != 0 : Hq % Hkv != 0) {
        kvc_py_raise(st->ValueError, "queries: %lld heads is not a multiple of the %lld kv heads",
                     (long long)Hq, (long long)Hkv);
        goto done;
    }
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    if (ragged) {
        const struct kvc_view *hoff = kvc_py_arg_host(st, &c.a[A_OFF]);
        const struct kvc_view *hlen = hoff ? kvc_py_arg_host(st, &c.a[A_LEN]) : NULL;
        if (hlen == NULL) goto done;
        if (check_segments(st, hoff, hlen, Hkv, k->shape[0], q) < 0) goto done;
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
    /* On CUDA the counts are not scanned: that would copy [N] to the host on
     * every decode step, and a bad count can only spoil its own output rows
     * (they come from evict_merge, which writes counts >= 1). */
    if (p.counts.data && c.a[A_CNT].dev_type == kDLCPU && check_counts(st, &p) < 0) goto done;
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
