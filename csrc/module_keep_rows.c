/*
 * module_keep_rows.c - binding of keep_rows_plan (keep_rows.c): validate
 * once (the segments inside their buffers, the key groups whole, the
 * outputs' sizes), run with the GIL released. Host bookkeeping: there is no
 * CUDA kernel (kvc_py_run refuses CUDA tensors by the op's name), and
 * kvcompress.stores.keep_rows takes its torch path off the CPU.
 */
#include "module.h"
#include "module_run.h"
#include "module_spec.h"

#include <stdint.h>
#include <string.h>

#include "keep_rows.h"

static enum kvc_status keep_rows_cpu(const void *p)
{
    return kvc_keep_rows_plan((const struct kvc_keep_rows_params *)p);
}

static size_t keep_rows_scratch(const void *p)
{
    return kvc_keep_rows_plan_scratch_bytes((const struct kvc_keep_rows_params *)p);
}

static const struct kvc_py_op op_keep_rows = {"keep_rows_plan", keep_rows_cpu, keep_rows_scratch, NULL, NULL, NULL};

PyDoc_STRVAR(keep_rows_plan_doc,
             "keep_rows_plan(o_offsets, o_lengths, o_pos, o_cbias, o_cplain, o_keys, o_values, o_min, o_step, "
             "n_offsets, n_lengths, n_pos, n_counts, n_keys, n_values, n_grid, group, bits, min_live, sinks, "
             "sinks_asked, residual, slack, take, dst, lengths, ph_base, ph_last, ph_keys, info)\n--\n\n"
             "Low-level: see kvcompress.ops.keep_rows_plan.");

enum {
    K_OOFF, K_OLEN, K_OPOS, K_OCB, K_OCP, K_OK, K_OV, K_OMIN, K_OSTEP,
    K_NOFF, K_NLEN, K_NPOS, K_NCNT, K_NK, K_NV, K_NGRID,
    K_G, K_BITS, K_MINLIVE, K_SINKS, K_ASKED, K_RESID, K_SLACK,
    K_TAKE, K_DST, K_LENS, K_PHB, K_PHL, K_PHK, K_INFO, K_N
};
_Static_assert(K_N <= KVC_PY_MAX_ARGS, "keep_rows_plan: more arguments than a kvc_py_call holds");

static const struct kvc_py_spec keep_rows_spec[K_N] = {
    KVC_PY_IN("o_offsets", 1, "[N]", DT_I64),
    KVC_PY_IN("o_lengths", 1, "[N]", DT_I64),
    KVC_PY_IN("o_pos", 1, "[Ro]", 1u << KVC_I32),
    KVC_PY_IN("o_cbias", 1, "[Ro]", DT_F32),
    KVC_PY_IN("o_cplain", 1, "[Ro]", DT_F32),
    KVC_PY_IN("o_keys", 2, "[Ro, D]", DT_FLOAT),
    KVC_PY_IN_LIKE("o_values", 2, "[Ro, D]", K_OK),
    KVC_PY_IN("o_min", 2, "[Ng, D]", DT_F32),
    KVC_PY_IN("o_step", 2, "[Ng, D]", DT_F32),
    KVC_PY_IN("n_offsets", 1, "[N]", DT_I64),
    KVC_PY_IN("n_lengths", 1, "[N]", DT_I64),
    KVC_PY_IN("n_pos", 1, "[Rn]", 1u << KVC_I32),
    KVC_PY_IN("n_counts", 1, "[Rn]", DT_F32),
    KVC_PY_IN_LIKE("n_keys", 2, "[Rn, D]", K_OK),
    KVC_PY_IN_LIKE("n_values", 2, "[Rn, D]", K_OK),
    KVC_PY_IN("n_grid", 2, "[Rn, D]", DT_F32),
    KVC_PY_INT_IN("group", 1, INT32_MAX),
    KVC_PY_INT_IN("bits", 1, 8),
    KVC_PY_INT_IN("min_live", 0, INT64_MAX),
    KVC_PY_INT_IN("sinks", 0, INT64_MAX),
    KVC_PY_INT_IN("sinks_asked", 0, INT64_MAX),
    KVC_PY_INT_IN("residual", 0, INT64_MAX),
    KVC_PY_INT_IN("slack", 0, INT32_MAX),
    KVC_PY_OUT_FREE("take", 1, "[M]", DT_I64, 0x1),
    KVC_PY_OUT_FREE("dst", 1, "[M]", DT_I64, 0x1),
    KVC_PY_OUT("lengths", 1, "[N]", DT_I64),
    KVC_PY_OUT("ph_base", 1, "[Ro]", DT_I64),
    KVC_PY_OUT("ph_last", 1, "[Ro]", DT_I64),
    KVC_PY_OUT("ph_keys", 2, "[Ro, D]", DT_F32),
    KVC_PY_OUT_FREE("info", 1, "[3]", DT_I64, 0x1),
};

/* Each head's segment [offsets[h], offsets[h] + lengths[h]) inside the
 * buffer's R rows, and the lengths' sum at most R. */
static int check_segments(struct kvc_state *st, const char *off_name, const struct kvc_view *off,
                          const char *len_name, const struct kvc_view *len, int64_t R)
{
    int64_t h, sum = 0;
    for (h = 0; h < off->shape[0]; h++) {
        const int64_t o = ((const int64_t *)off->data)[h * off->strides[0]];
        const int64_t l = ((const int64_t *)len->data)[h * len->strides[0]];
        if (o < 0 || o > R)
            return kvc_py_raise(st->ValueError, "%s: value %lld at %lld is outside [0, %lld] (the buffer's rows)",
                                off_name, (long long)o, (long long)h, (long long)R);
        if (l < 0 || l > R - o)
            return kvc_py_raise(st->ValueError,
                                "%s: value %lld at %lld runs past the buffer (%lld rows from row %lld)",
                                len_name, (long long)l, (long long)h, (long long)R, (long long)o);
        sum += l;
        if (sum > R)
            return kvc_py_raise(st->ValueError, "%s: the segments hold %lld rows or more, more than the buffer's %lld",
                                len_name, (long long)sum, (long long)R);
    }
    return 0;
}

static PyObject *py_keep_rows_plan(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_keep_rows_params p;
    int64_t Ro, Rn, Ng, G;
    PyObject *ret = NULL;
    memset(&p, 0, sizeof p);
    if (kvc_py_call_parse(st, "keep_rows_plan", keep_rows_spec, K_N, args, nargs, &c) < 0) return NULL;
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    Ro = c.a[K_OPOS].view.shape[0];
    Rn = c.a[K_NPOS].view.shape[0];
    Ng = c.a[K_OMIN].view.shape[0];
    G = c.i[K_G];
    if (Ro != Ng * G) {
        kvc_py_raise(st->ValueError, "o_min: %lld key groups of %lld rows, but o_pos has %lld rows", (long long)Ng,
                     (long long)G, (long long)Ro);
        goto done;
    }
    if (c.a[K_TAKE].view.shape[0] != Rn + Ro || c.a[K_DST].view.shape[0] != Rn + Ro) {
        kvc_py_raise(st->ValueError, "take, dst: need Rn + Ro = %lld rows, got %lld and %lld", (long long)(Rn + Ro),
                     (long long)c.a[K_TAKE].view.shape[0], (long long)c.a[K_DST].view.shape[0]);
        goto done;
    }
    if (c.a[K_INFO].view.shape[0] != 3) {
        kvc_py_raise(st->ValueError, "info: expected shape [3], got [%lld]", (long long)c.a[K_INFO].view.shape[0]);
        goto done;
    }
    {
        /* read on the host (a CUDA tensor's mirror: kvc_py_run then refuses
         * it, the op has no CUDA kernel) */
        const struct kvc_view *oo = kvc_py_arg_host(st, &c.a[K_OOFF]);
        const struct kvc_view *ol = oo ? kvc_py_arg_host(st, &c.a[K_OLEN]) : NULL;
        const struct kvc_view *no = ol ? kvc_py_arg_host(st, &c.a[K_NOFF]) : NULL;
        const struct kvc_view *nl = no ? kvc_py_arg_host(st, &c.a[K_NLEN]) : NULL;
        if (nl == NULL || check_segments(st, "o_offsets", oo, "o_lengths", ol, Ro) < 0 ||
            check_segments(st, "n_offsets", no, "n_lengths", nl, Rn) < 0)
            goto done;
    }
    p.o_offsets = c.a[K_OOFF].view;
    p.o_lengths = c.a[K_OLEN].view;
    p.o_pos = c.a[K_OPOS].view;
    p.o_cbias = c.a[K_OCB].view;
    p.o_cplain = c.a[K_OCP].view;
    p.o_keys = c.a[K_OK].view;
    p.o_values = c.a[K_OV].view;
    p.o_min = c.a[K_OMIN].view;
    p.o_step = c.a[K_OSTEP].view;
    p.n_offsets = c.a[K_NOFF].view;
    p.n_lengths = c.a[K_NLEN].view;
    p.n_pos = c.a[K_NPOS].view;
    p.n_counts = c.a[K_NCNT].view;
    p.n_keys = c.a[K_NK].view;
    p.n_values = c.a[K_NV].view;
    p.n_grid = c.a[K_NGRID].view;
    p.group = G;
    p.bits = c.i[K_BITS];
    p.min_live = c.i[K_MINLIVE];
    p.sinks = c.i[K_SINKS];
    p.sinks_asked = c.i[K_ASKED];
    p.residual = c.i[K_RESID];
    p.slack = c.i[K_SLACK];
    p.take = c.a[K_TAKE].view;
    p.dst = c.a[K_DST].view;
    p.lengths = c.a[K_LENS].view;
    p.ph_base = c.a[K_PHB].view;
    p.ph_last = c.a[K_PHL].view;
    p.ph_keys = c.a[K_PHK].view;
    p.info = c.a[K_INFO].view;
    if (kvc_py_run(st, &op_keep_rows, &p, &p.scratch, &p.scratch_bytes, c.a, c.n) < 0) goto done;
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

PyMethodDef kvc_py_keep_rows_methods[] = {
    {"keep_rows_plan", (PyCFunction)(void (*)(void))py_keep_rows_plan, METH_FASTCALL, keep_rows_plan_doc},
    {NULL, NULL, 0, NULL}};
