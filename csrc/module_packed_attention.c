/*
 * module_packed_attention.c - binding of kvc_packed_attention (attention
 * over a KIVI-packed layer plus a full-precision residual window,
 * docs/packed.md): validate once, run with the GIL released.
 */
#include "module.h"
#include "module_run.h"
#include "module_segments.h"
#include "module_spec.h"

#include <string.h>

#include "attention_packed.h"
#include "attention_packed_math.h"
#include "kvc_math.h"

/* Argument slots, also the release order. */
enum {
    A_Q,
    A_KC,
    A_KM,
    A_KS,
    A_VC,
    A_VM,
    A_VS,
    A_RK,
    A_RV,
    A_OUT,
    A_LSE,
    A_BITS,
    A_VBITS,
    A_GROUP,
    A_SCALE,
    A_START,
    A_OFF,
    A_LEN,
    A_CNT,
    A_RQ,
    A_RC,
    A_RH,
    A_N
};

/* kvc_py_check_counts reads the layout arguments in this order. */
_Static_assert(A_OFF == A_START + 1 && A_LEN == A_START + 2 && A_CNT == A_START + 3,
               "layout argument order");
_Static_assert(A_N <= KVC_PY_MAX_ARGS, "packed_attention: more arguments than a kvc_py_call holds");

KVC_PY_OP(op_packed_attention, packed_attention, 1, 1)

PyDoc_STRVAR(packed_attention_doc,
             "packed_attention(queries, key_codes, key_mins, key_scales, value_codes, value_mins, "
             "value_scales, residual_keys, residual_values, out, lse, bits, value_bits, group, scaling, kv_start, "
             "offsets, lengths, counts, residual_query, residual_counts, residual_hidden)\n--\n\n"
             "Low-level: see kvcompress.ops.packed_attention.");

/* Uniform layout: every head has n packed slots; offsets/lengths are None
 * and kv_start is imported below (its limit, n + r, is no single size). */
static const struct kvc_py_spec packed_uniform_spec[A_N] = {
    KVC_PY_IN("queries", 4, "[B, Hq, q, D]", DT_FLOAT),
    KVC_PY_IN("key_codes", 4, "[B, Hkv, n, Db]", DT_U8),
    KVC_PY_IN("key_mins", 4, "[B, Hkv, T, D]", DT_F32),
    KVC_PY_IN("key_scales", 4, "[B, Hkv, T, D]", DT_F32),
    KVC_PY_IN("value_codes", 4, "[B, Hkv, n, Dbv]", DT_U8),
    KVC_PY_IN("value_mins", 4, "[B, Hkv, n, U]", DT_F32),
    KVC_PY_IN("value_scales", 4, "[B, Hkv, n, U]", DT_F32),
    KVC_PY_IN_LIKE("residual_keys", 4, "[B, Hkv, r, D]", A_Q),
    KVC_PY_IN_LIKE("residual_values", 4, "[B, Hkv, r, D]", A_Q),
    KVC_PY_OUT_LIKE("out", 4, "[B, q, Hq, D]", A_Q),
    KVC_PY_OPT_OUT("lse", 3, "[B, Hq, q]", DT_F32),
    KVC_PY_CUSTOM_ARG("bits", 0, NULL, 0),
    KVC_PY_CUSTOM_ARG("value_bits", 0, NULL, 0),
    KVC_PY_INT_IN("group", 1, INT64_MAX),
    KVC_PY_FINITE("scaling"),
    KVC_PY_CUSTOM_ARG("kv_start", 1, "[B]", DT_I64),
    KVC_PY_CUSTOM_ARG("offsets", 0, NULL, 0),
    KVC_PY_CUSTOM_ARG("lengths", 0, NULL, 0),
    KVC_PY_OPT("counts", 3, "[B, Hkv, n]", DT_F32),
    KVC_PY_OPT("residual_query", 4, "[B, Hq, q, D]", DT_FLOAT),
    KVC_PY_OPT("residual_counts", 3, "[B, Hkv, r]", DT_F32),
    KVC_PY_OPT("residual_hidden", 2, "[B * Hkv, 2]", DT_I64),
};

/* Ragged layout: one buffer of N packed rows, a segment per head. */
static const struct kvc_py_spec packed_ragged_spec[A_N] = {
    KVC_PY_IN("queries", 4, "[B, Hq, q, D]", DT_FLOAT),
    KVC_PY_IN("key_codes", 2, "[N, Db]", DT_U8),
    KVC_PY_IN("key_mins", 2, "[T, D]", DT_F32),
    KVC_PY_IN("key_scales", 2, "[T, D]", DT_F32),
    KVC_PY_IN("value_codes", 2, "[N, Dbv]", DT_U8),
    KVC_PY_IN("value_mins", 2, "[N, U]", DT_F32),
    KVC_PY_IN("value_scales", 2, "[N, U]", DT_F32),
    KVC_PY_IN_LIKE("residual_keys", 4, "[B, Hkv, r, D]", A_Q),
    KVC_PY_IN_LIKE("residual_values", 4, "[B, Hkv, r, D]", A_Q),
    KVC_PY_OUT_LIKE("out", 4, "[B, q, Hq, D]", A_Q),
    KVC_PY_OPT_OUT("lse", 3, "[B, Hq, q]", DT_F32),
    KVC_PY_CUSTOM_ARG("bits", 0, NULL, 0),
    KVC_PY_CUSTOM_ARG("value_bits", 0, NULL, 0),
    KVC_PY_INT_IN("group", 1, INT64_MAX),
    KVC_PY_FINITE("scaling"),
    KVC_PY_CUSTOM_ARG("kv_start", 0, NULL, 0),
    KVC_PY_IN("offsets", 1, "[B * Hkv]", DT_I64),
    KVC_PY_IN("lengths", 1, "[B * Hkv]", DT_I64),
    KVC_PY_OPT("counts", 1, "[N]", DT_F32),
    KVC_PY_OPT("residual_query", 4, "[B, Hq, q, D]", DT_FLOAT),
    KVC_PY_OPT("residual_counts", 3, "[B, Hkv, r]", DT_F32),
    KVC_PY_OPT("residual_hidden", 2, "[B * Hkv, 2]", DT_I64),
};

/* A code row of Db bytes holds D codes of `bits` bits (name, what: the
 * argument and the option that sets its width). */
static int check_row_bytes(struct kvc_state *st, const char *name, const char *what, int64_t Db, int64_t D,
                           int64_t bits)
{
    const int64_t want = kvc_pk_row_bytes(D, (int)bits);
    if (Db == want) return 0;
    return kvc_py_raise(st->ValueError,
                        "%s: rows of %lld bytes, expected ceil(D * %s / 8) = %lld for D = %lld, %s = %lld", name,
                        (long long)Db, what, (long long)want, (long long)D, what, (long long)bits);
}

/* The sizes the layout implies (docs/packed.md), each named by the
 * argument whose shape carries it. */
static int check_layout(struct kvc_state *st, const struct kvc_py_call *c, int ragged, int64_t bits,
                        int64_t vbits, int64_t G)
{
    const int64_t D = c->a[A_Q].view.shape[3], q = c->a[A_Q].view.shape[2];
    const struct kvc_view *kc = &c->a[A_KC].view, *km = &c->a[A_KM].view, *vm = &c->a[A_VM].view;
    const int64_t n = kc->shape[ragged ? 0 : 2], Db = kc->shape[ragged ? 1 : 3];
    const int64_t Dbv = c->a[A_VC].view.shape[ragged ? 1 : 3];
    const int64_t T = km->shape[ragged ? 0 : 2], U = vm->shape[ragged ? 1 : 3];
    const int64_t r = c->a[A_RK].view.shape[2];
    if (check_row_bytes(st, "key_codes", "bits", Db, D, bits) < 0 ||
        check_row_bytes(st, "value_codes", "value_bits", Dbv, D, vbits) < 0)
        return -1;
    if (T != kvc_pk_groups(n, G))
        return kvc_py_raise(st->ValueError,
                            "key_mins: %lld token groups, expected ceil(%s / group) = %lld for %s = %lld, "
                            "group = %lld",
                            (long long)T, ragged ? "N" : "n", (long long)kvc_pk_groups(n, G),
                            ragged ? "N" : "n", (long long)n, (long long)G);
    if (U != kvc_pk_groups(D, G))
        return kvc_py_raise(st->ValueError,
                            "value_mins: %lld channel groups, expected ceil(D / group) = %lld for "
                            "D = %lld, group = %lld",
                            (long long)U, (long long)kvc_pk_groups(D, G), (long long)D, (long long)G);
    if (r != 0 && r < q)
        return kvc_py_raise(st->ValueError,
                            "residual_keys: %lld residual slots, fewer than the %lld queries (the "
                            "queries are the last q residual slots; with none they follow the packed ones)",
                            (long long)r, (long long)q);
    return 0;
}

static PyObject *py_packed_attention(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_packed_attention_params p;
    int ragged;
    int64_t B, Hq, Hkv, bits, vbits, G, r;
    PyObject *ret = NULL;
    memset(&p, 0, sizeof p);
    if (kvc_py_check_nargs("packed_attention", nargs, A_N) < 0) return NULL;
    /* kv_start is taken in both layouts here (a ragged head's leading packed
     * slots: row mode's sliding windows), so it is not passed to the check */
    ragged = kvc_py_ragged_layout(st, args[A_OFF], args[A_LEN], Py_None);
    if (ragged < 0) return NULL;
    if (kvc_py_call_parse(st, "packed_attention", ragged ? packed_ragged_spec : packed_uniform_spec, A_N,
                          args, nargs, &c) < 0)
        return NULL;
    if (kvc_py_get_int64(st, args[A_BITS], "bits", &bits) < 0) goto done;
    if (bits != 2 && bits != 4 && bits != 8) {
        kvc_py_raise(st->ValueError, "bits: expected 2, 4 or 8, got %lld", (long long)bits);
        goto done;
    }
    vbits = bits;
    if (args[A_VBITS] != Py_None) {
        if (kvc_py_get_int64(st, args[A_VBITS], "value_bits", &vbits) < 0) goto done;
        if (vbits != 2 && vbits != 4 && vbits != 8) {
            kvc_py_raise(st->ValueError, "value_bits: expected 2, 4 or 8 (or None: bits), got %lld",
                         (long long)vbits);
            goto done;
        }
    }
    G = c.i[A_GROUP];
    if (args[A_START] != Py_None &&
        kvc_py_arg_import(st, args[A_START], "kv_start", 1, "[B]", DT_I64, 0, &c.a[A_START]) < 0)
        goto done;
    B = c.a[A_Q].view.shape[0];
    Hq = c.a[A_Q].view.shape[1];
    if (ragged) {
        const int64_t H = c.a[A_OFF].view.shape[0];
        Hkv = c.a[A_RK].view.shape[1];
        if (kvc_py_check_shape(st, &c.a[A_LEN], c.a[A_OFF].view.shape, "[B * Hkv]") < 0) goto done;
        if (H != B * Hkv) {
            kvc_py_raise(st->ValueError,
                         "offsets: %lld entries is not B * Hkv = %lld * %lld (queries, residual_keys)",
                         (long long)H, (long long)B, (long long)Hkv);
            goto done;
        }
    } else {
        Hkv = c.a[A_KC].view.shape[1];
    }
    if (kvc_py_check_group(st, "queries", Hq, Hkv) < 0) goto done;
    if (c.a[A_RQ].t && c.a[A_RQ].view.dtype != c.a[A_Q].view.dtype) {
        kvc_py_raise(st->TypeError, "residual_query: dtype differs from queries'");
        goto done;
    }
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    if (check_layout(st, &c, ragged, bits, vbits, G) < 0) goto done;
    /* residual counts: the residual's shape, and every one finite > 0 (scanned where they lie on the host) */
    if (c.a[A_RC].t &&
        (kvc_py_check_shape(st, &c.a[A_RC], c.a[A_RK].view.shape, "[B, Hkv, r] (residual_keys)") < 0 ||
         (c.a[A_RC].dev_type == kDLCPU &&
          kvc_py_check_count_rows(st, "residual_counts", &c.a[A_RC].view, NULL, 0) < 0)))
        goto done;
    r = c.a[A_RK].view.shape[2];
    if (c.a[A_START].t && !ragged) {
        const struct kvc_view *hs = kvc_py_arg_host(st, &c.a[A_START]);
        const int64_t limit = c.a[A_KC].view.shape[2] + r;
        int64_t b;
        if (hs == NULL) goto done;
        for (b = 0; b < hs->shape[0]; b++) {
            const int64_t v = kvc_py_i64_at(hs, b);
            if (v < 0 || v > limit) {
                kvc_py_raise(st->ValueError,
                             "kv_start: value %lld at batch %lld is outside [0, n + r] = [0, %lld]",
                             (long long)v, (long long)b, (long long)limit);
                goto done;
            }
        }
    }
    if (c.a[A_RH].t) {
        /* a hidden stretch [lo, hi) of residual rows per head, inside the residual */
        const struct kvc_view *hs = kvc_py_arg_host(st, &c.a[A_RH]);
        int64_t i;
        if (hs == NULL) goto done;
        if (hs->shape[0] != B * Hkv || hs->shape[1] != 2) {
            kvc_py_raise(st->ValueError, "residual_hidden: shape [%lld, %lld], expected [B * Hkv, 2] = [%lld, 2]",
                         (long long)hs->shape[0], (long long)hs->shape[1], (long long)(B * Hkv));
            goto done;
        }
        for (i = 0; i < hs->shape[0]; i++) {
            const int64_t lo = ((const int64_t *)hs->data)[i * hs->strides[0]];
            const int64_t hi = ((const int64_t *)hs->data)[i * hs->strides[0] + hs->strides[1]];
            if (lo < 0 || lo > hi || hi > r) {
                kvc_py_raise(st->ValueError,
                             "residual_hidden: rows [%lld, %lld) at head %lld are not a stretch of [0, r] = "
                             "[0, %lld]",
                             (long long)lo, (long long)hi, (long long)i, (long long)r);
                goto done;
            }
        }
    }
    if (ragged) {
        const struct kvc_view *hoff = kvc_py_arg_host(st, &c.a[A_OFF]);
        const struct kvc_view *hlen = hoff ? kvc_py_arg_host(st, &c.a[A_LEN]) : NULL;
        if (hlen == NULL) goto done;
        /* offsets on group boundaries, so key groups never straddle heads */
        if (kvc_py_check_segments(st, hoff, hlen, Hkv, c.a[A_KC].view.shape[0], "key_codes", 0, G) < 0)
            goto done;
        if (c.a[A_START].t) {
            /* a ragged head's masked prefix: at most its own n_h + r slots */
            const struct kvc_view *hs = kvc_py_arg_host(st, &c.a[A_START]);
            int64_t i;
            if (hs == NULL) goto done;
            if (hs->shape[0] != B) {
                kvc_py_raise(st->ValueError, "kv_start: %lld entries, expected B = %lld", (long long)hs->shape[0],
                             (long long)B);
                goto done;
            }
            for (i = 0; i < B * Hkv; i++) {
                const int64_t v = kvc_py_i64_at(hs, i / Hkv), limit = kvc_py_i64_at(hlen, i) + r;
                if (v < 0 || v > limit) {
                    kvc_py_raise(st->ValueError,
                                 "kv_start: value %lld at batch %lld is outside [0, n_h + r] = [0, %lld] of head "
                                 "%lld",
                                 (long long)v, (long long)(i / Hkv), (long long)limit, (long long)(i % Hkv));
                    goto done;
                }
            }
        }
    }

    if (c.a[A_LSE].t && c.a[A_Q].view.shape[3] == 0 && kvc_py_view_numel(&c.a[A_LSE].view) > 0) {
        /* the kernels take an empty head as an empty problem and write nothing */
        kvc_py_raise(st->ValueError, "queries: head dim 0 with lse requested is not supported (an empty head is an empty problem to the kernels, which would leave lse unwritten)");
        goto done;
    }
    p.q = c.a[A_Q].view;
    p.key_codes = c.a[A_KC].view;
    p.key_mins = c.a[A_KM].view;
    p.key_scales = c.a[A_KS].view;
    p.value_codes = c.a[A_VC].view;
    p.value_mins = c.a[A_VM].view;
    p.value_scales = c.a[A_VS].view;
    p.res_k = c.a[A_RK].view;
    p.res_v = c.a[A_RV].view;
    p.out = c.a[A_OUT].view;
    if (c.a[A_CNT].t) p.counts = c.a[A_CNT].view;
    if (c.a[A_LSE].t) p.lse = c.a[A_LSE].view;
    if (c.a[A_RQ].t) p.res_q = c.a[A_RQ].view;
    if (c.a[A_RC].t) p.res_counts = c.a[A_RC].view;
    p.layout = ragged ? KVC_KV_RAGGED : KVC_KV_UNIFORM;
    p.num_kv_heads = Hkv;
    p.group = G;
    p.bits = (int32_t)bits;
    p.value_bits = (int32_t)vbits;
    p.kv_start = kvc_py_call_i64(&c, A_START, &p.kv_start_stride);
    p.offsets = kvc_py_call_i64(&c, A_OFF, &p.offsets_stride);
    p.lengths = kvc_py_call_i64(&c, A_LEN, &p.lengths_stride);
    if (c.a[A_RH].t) {
        p.res_hidden = (const int64_t *)c.a[A_RH].view.data;
        p.res_hidden_stride = c.a[A_RH].view.strides[0];
        p.res_hidden_col = c.a[A_RH].view.strides[1];
    }
    p.scaling = (float)c.f[A_SCALE];
    p.num_threads = st->num_threads;
    if (kvc_py_check_counts(st, &c, A_START, ragged, B * Hkv) < 0) goto done;
    {
        /* an empty problem takes no scratch */
        void **scratch = kvc_py_view_numel(&p.out) > 0 ? &p.scratch : NULL;
        if (kvc_py_run(st, &op_packed_attention, &p, scratch, &p.scratch_bytes, c.a, c.n) < 0) goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

PyMethodDef kvc_py_packed_attention_methods[] = {
    {"packed_attention", (PyCFunction)(void (*)(void))py_packed_attention, METH_FASTCALL,
     packed_attention_doc},
    {NULL, NULL, 0, NULL}};
