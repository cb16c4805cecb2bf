/*
 * module_quant.c - bindings of pack and unpack (the packed KV layout of
 * docs/packed.md, uniform [B, H, n, D] tensors): validate once, run with the
 * GIL released, map a NaN/Inf (or a value past FLT_MAX / 2) in the input
 * to an error naming the element.
 */
#include "module.h"
#include "module_run.h"
#include "module_spec.h"

#include <math.h>
#include <string.h>

#include "compact.h"
#include "quant.h"
#include "quant_math.h"

KVC_PY_OP(op_pack, pack, 1, 1)
KVC_PY_OP(op_unpack, unpack, 0, 0)

/* The arguments every call checks before its tensors: the kind flag picks
 * the spec (and the input's name), bits and group size the outputs. */
static int quant_numbers(struct kvc_state *st, const char *fn, PyObject *const *args, Py_ssize_t nargs,
                         Py_ssize_t n, int i_values, int *values, int32_t *bits)
{
    int64_t v;
    if (kvc_py_check_nargs(fn, nargs, n) < 0) return -1;
    if (kvc_py_get_bool(st, args[i_values], "values", values) < 0) return -1;
    if (kvc_py_get_int64(st, args[i_values + 1], "bits", &v) < 0) return -1;
    if (v != 2 && v != 4 && v != 8)
        return kvc_py_raise(st->ValueError, "bits: expected 2, 4 or 8, got %lld", (long long)v);
    *bits = (int32_t)v;
    return 0;
}

/* The shapes of codes and of mins/scales for x [B, H, n, D]. */
static void quant_shapes(int values, int32_t bits, int64_t G, const int64_t *x, int64_t *codes,
                         int64_t *mins)
{
    memcpy(codes, x, 4 * sizeof(int64_t));
    memcpy(mins, x, 4 * sizeof(int64_t));
    codes[3] = kvc_quant_row_bytes(x[3], bits);
    if (values) mins[3] = kvc_quant_groups(x[3], G);
    else mins[2] = kvc_quant_groups(x[2], G);
}

#define QT_CODES "[B, H, n, Db]"
#define QT_KEY_GROUPS "[B, H, ceil(n/G), D]"
#define QT_VALUE_GROUPS "[B, H, n, ceil(D/G)]"

/* ------------------------------------------------------------------------ */
/* pack                                                                     */
/* ------------------------------------------------------------------------ */

PyDoc_STRVAR(pack_doc,
             "pack(x, codes, mins, scales, values, bits, group, feedback, feedback_index, clip)\n--\n\n"
             "Low-level: see kvcompress.ops.pack_keys / pack_values.");

/* mins and scales (arguments k and k + 1, as in both ops) against the
 * group shape `want` of the kind. */
static int check_groups(struct kvc_state *st, struct kvc_py_call *c, int k, int values, const int64_t *want)
{
    const char *dims = values ? QT_VALUE_GROUPS : QT_KEY_GROUPS;
    if (kvc_py_check_shape(st, &c->a[k], want, dims) < 0) return -1;
    return kvc_py_check_shape(st, &c->a[k + 1], want, dims);
}

enum { PK_X, PK_CODES, PK_MINS, PK_SCALES, PK_VALUES, PK_BITS, PK_GROUP, PK_FB, PK_FB_INDEX, PK_CLIP, PK_N };
_Static_assert(PK_SCALES == PK_MINS + 1, "check_groups reads scales after mins");

/* Output shapes derive from x's and are checked by the binding (all dims
 * unbound), with the derived sizes in the message. */
#define PK_SPEC(xname, groups)                                                   \
    {                                                                            \
        KVC_PY_IN(xname, 4, "[B, H, n, D]", DT_FLOAT),                           \
        KVC_PY_OUT_FREE("codes", 4, QT_CODES, DT_U8, 0xf),                       \
        KVC_PY_OUT_FREE("mins", 4, groups, DT_F32, 0xf),                         \
        KVC_PY_OUT_FREE("scales", 4, groups, DT_F32, 0xf),                       \
        KVC_PY_FLAG("values"),                                                   \
        KVC_PY_CUSTOM_ARG("bits", 0, NULL, 0),                                   \
        KVC_PY_INT_IN("group", 1, INT64_MAX),                                    \
        KVC_PY_OPT("feedback", 3, "[F, D, D]", DT_F32),                          \
        KVC_PY_OPT("feedback_index", 3, "[B, H, ceil(n/G)]", DT_I64),            \
        KVC_PY_FLAG("clip"),                                                     \
    }

static const struct kvc_py_spec pack_keys_spec[PK_N] = PK_SPEC("keys", QT_KEY_GROUPS);
static const struct kvc_py_spec pack_values_spec[PK_N] = PK_SPEC("values", QT_VALUE_GROUPS);

/* The key feedback's arguments (quant.h): keys only, [F, D, D] finite
 * weights, an index [B, H, ceil(n/G)] into [0, F) or else F == H, and on
 * CUDA a group that fits the kernel's shared memory. */
static int check_feedback(struct kvc_state *st, struct kvc_py_call *c, int values)
{
    struct kvc_arg *fa = &c->a[PK_FB], *ia = &c->a[PK_FB_INDEX];
    const int64_t *x = c->a[PK_X].view.shape;
    const int64_t G = c->i[PK_GROUP], g = G < x[2] ? G : x[2];
    const struct kvc_view *hv;
    int64_t F, i, j, k;
    if (!fa->t) {
        if (ia->t) return kvc_py_raise(st->ValueError, "feedback_index: given without feedback");
        return 0;
    }
    if (values) return kvc_py_raise(st->ValueError, "feedback: values take no feedback (keys only)");
    F = fa->view.shape[0];
    if (fa->view.shape[1] != x[3] || fa->view.shape[2] != x[3] || F < 1)
        return kvc_py_raise(st->ValueError, "feedback: expected [F, D, D] with F >= 1 and D = %lld (of keys), got "
                            "[%lld, %lld, %lld]", (long long)x[3], (long long)F, (long long)fa->view.shape[1],
                            (long long)fa->view.shape[2]);
    if (ia->t) {
        const int64_t want[3] = {x[0], x[1], kvc_quant_groups(x[2], G)};
        int64_t bad, at[KVC_MAX_DIMS];
        if (kvc_py_check_shape(st, ia, want, "[B, H, ceil(n/G)]") < 0) return -1;
        if ((hv = kvc_py_arg_host(st, ia)) == NULL) return -1;
        if (kvc_indices_check(hv, 0, F, &bad, at) != KVC_OK)
            return kvc_py_raise(st->ValueError, "feedback_index: value %lld at [%lld, %lld, %lld] is outside [0, F) "
                                "= [0, %lld)", (long long)bad, (long long)at[0], (long long)at[1], (long long)at[2],
                                (long long)F);
    } else if (F != x[1]) {
        return kvc_py_raise(st->ValueError, "feedback: expected one factor per head, [H, D, D] with H = %lld (of "
                            "keys), got F = %lld (or pass feedback_index)", (long long)x[1], (long long)F);
    }
    if ((hv = kvc_py_arg_host(st, fa)) == NULL) return -1;
    for (i = 0; i < F; i++)
        for (j = 0; j < x[3]; j++)
            for (k = 0; k < x[3]; k++) {
                const float v = ((const float *)hv->data)[i * hv->strides[0] + j * hv->strides[1] +
                                                          k * hv->strides[2]];
                if (!isfinite(v)) {
                    char val[32];
                    PyOS_snprintf(val, sizeof val, "%g", (double)v);
                    return kvc_py_raise(st->ValueError, "feedback: element [%lld, %lld, %lld] is %s; the weights "
                                        "must be finite", (long long)i, (long long)j, (long long)k, val);
                }
            }
    if (c->a[PK_X].dev_type != kDLCPU && kvc_pack_feedback_smem(g, x[3]) > KVC_PACK_FEEDBACK_SMEM_MAX)
        return kvc_py_raise(st->ValueError, "feedback: on CUDA a key group of %lld tokens and %lld channels needs "
                            "%lld bytes of shared memory, more than %d; use a smaller group",
                            (long long)g, (long long)x[3], (long long)kvc_pack_feedback_smem(g, x[3]),
                            KVC_PACK_FEEDBACK_SMEM_MAX);
    return 0;
}

static PyObject *py_pack(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_pack_params p;
    struct kvc_pack_fault fault;
    int64_t want_codes[4], want_mins[4];
    int values;
    int32_t bits;
    PyObject *ret = NULL;
    memset(&p, 0, sizeof p);
    memset(&fault, 0, sizeof fault);
    if (quant_numbers(st, "pack", args, nargs, PK_N, PK_VALUES, &values, &bits) < 0) return NULL;
    if (kvc_py_call_parse(st, "pack", values ? pack_values_spec : pack_keys_spec, PK_N, args, nargs,
                          &c) < 0)
        return NULL;
    quant_shapes(values, bits, c.i[PK_GROUP], c.a[PK_X].view.shape, want_codes, want_mins);
    if (kvc_py_check_shape(st, &c.a[PK_CODES], want_codes, QT_CODES) < 0) goto done;
    if (check_groups(st, &c, PK_MINS, values, want_mins) < 0) goto done;
    if (check_feedback(st, &c, values) < 0) goto done;
    if (c.i[PK_CLIP] && !values) {
        kvc_py_raise(st->ValueError, "clip: keys take no clipped ranges (values only)");
        goto done;
    }
    if (c.i[PK_CLIP] && c.a[PK_X].dev_type != kDLCPU &&
        (uint64_t)c.a[PK_X].view.shape[3] * sizeof(float) > KVC_PACK_CLIP_SMEM_MAX) {
        kvc_py_raise(st->ValueError, "clip: on CUDA a value row of %lld channels needs %lld bytes of shared "
                     "memory, more than %d", (long long)c.a[PK_X].view.shape[3],
                     (long long)(c.a[PK_X].view.shape[3] * (int64_t)sizeof(float)), KVC_PACK_CLIP_SMEM_MAX);
        goto done;
    }
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    p.x = c.a[PK_X].view;
    if (c.a[PK_FB].t) p.feedback = c.a[PK_FB].view;
    if (c.a[PK_FB_INDEX].t) p.feedback_index = c.a[PK_FB_INDEX].view;
    p.codes = c.a[PK_CODES].view;
    p.mins = c.a[PK_MINS].view;
    p.scales = c.a[PK_SCALES].view;
    p.kind = values ? KVC_QUANT_VALUES : KVC_QUANT_KEYS;
    p.bits = bits;
    p.group = c.i[PK_GROUP];
    p.clip = (int32_t)c.i[PK_CLIP];
    p.num_threads = st->num_threads;
    p.fault = &fault;
    {
        /* an empty problem takes no scratch */
        void **scratch = p.x.shape[0] * p.x.shape[1] * p.x.shape[2] > 0 ? &p.scratch : NULL;
        if (kvc_py_run(st, &op_pack, &p, scratch, &p.scratch_bytes, c.a, c.n) < 0) {
            if (fault.found) {
                /* the generic NaN error of the run, made precise */
                char val[32];
                PyErr_Clear();
                PyOS_snprintf(val, sizeof val, "%g", (double)fault.value);
                kvc_py_raise(st->ValueError,
                             "%s: element [%lld, %lld, %lld, %lld] is %s; pack needs finite values "
                             "of magnitude <= FLT_MAX / 2 (nothing was written)",
                             values ? "values" : "keys", (long long)fault.pos[0], (long long)fault.pos[1],
                             (long long)fault.pos[2], (long long)fault.pos[3], val);
            }
            goto done;
        }
    }
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

/* ------------------------------------------------------------------------ */
/* unpack                                                                   */
/* ------------------------------------------------------------------------ */

PyDoc_STRVAR(unpack_doc,
             "unpack(codes, mins, scales, out, values, bits, group)\n--\n\n"
             "Low-level: see kvcompress.ops.unpack_keys / unpack_values.");

enum { UP_CODES, UP_MINS, UP_SCALES, UP_OUT, UP_VALUES, UP_BITS, UP_GROUP, UP_N };
_Static_assert(UP_SCALES == UP_MINS + 1, "check_groups reads scales after mins");

/* B, H, n come from codes, D from out; the rest is checked by the binding. */
#define UP_SPEC(groups)                                                          \
    {                                                                            \
        KVC_PY_IN_FREE("codes", 4, QT_CODES, DT_U8, 0xf),                        \
        KVC_PY_IN_FREE("mins", 4, groups, DT_F32, 0xf),                          \
        KVC_PY_IN_FREE("scales", 4, groups, DT_F32, 0xf),                        \
        KVC_PY_OUT_FREE("out", 4, "[B, H, n, D]", DT_FLOAT, 0xf),                \
        KVC_PY_FLAG("values"),                                                   \
        KVC_PY_CUSTOM_ARG("bits", 0, NULL, 0),                                   \
        KVC_PY_INT_IN("group", 1, INT64_MAX),                                    \
    }

static const struct kvc_py_spec unpack_keys_spec[UP_N] = UP_SPEC(QT_KEY_GROUPS);
static const struct kvc_py_spec unpack_values_spec[UP_N] = UP_SPEC(QT_VALUE_GROUPS);

static PyObject *py_unpack(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_unpack_params p;
    int64_t want_out[4], want_codes[4], want_mins[4];
    int values;
    int32_t bits;
    PyObject *ret = NULL;
    memset(&p, 0, sizeof p);
    if (quant_numbers(st, "unpack", args, nargs, UP_N, UP_VALUES, &values, &bits) < 0) return NULL;
    if (kvc_py_call_parse(st, "unpack", values ? unpack_values_spec : unpack_keys_spec, UP_N, args, nargs,
                          &c) < 0)
        return NULL;
    memcpy(want_out, c.a[UP_CODES].view.shape, sizeof want_out);
    want_out[3] = c.a[UP_OUT].view.shape[3];
    if (kvc_py_check_shape(st, &c.a[UP_OUT], want_out, "[B, H, n, D]") < 0) goto done;
    quant_shapes(values, bits, c.i[UP_GROUP], want_out, want_codes, want_mins);
    if (c.a[UP_CODES].view.shape[3] != want_codes[3]) {
        kvc_py_raise(st->ValueError,
                     "codes: last dim %lld is not Db = ceil(D * bits / 8) = %lld for D = %lld (of out) and "
                     "bits = %d",
                     (long long)c.a[UP_CODES].view.shape[3], (long long)want_codes[3],
                     (long long)want_out[3], (int)bits);
        goto done;
    }
    if (check_groups(st, &c, UP_MINS, values, want_mins) < 0) goto done;
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    p.codes = c.a[UP_CODES].view;
    p.mins = c.a[UP_MINS].view;
    p.scales = c.a[UP_SCALES].view;
    p.out = c.a[UP_OUT].view;
    p.kind = values ? KVC_QUANT_VALUES : KVC_QUANT_KEYS;
    p.bits = bits;
    p.group = c.i[UP_GROUP];
    p.num_threads = st->num_threads;
    if (kvc_py_run(st, &op_unpack, &p, NULL, NULL, c.a, c.n) < 0) goto done;
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

PyMethodDef kvc_py_quant_methods[] = {
    {"pack", (PyCFunction)(void (*)(void))py_pack, METH_FASTCALL, pack_doc},
    {"unpack", (PyCFunction)(void (*)(void))py_unpack, METH_FASTCALL, unpack_doc},
    {NULL, NULL, 0, NULL}};
