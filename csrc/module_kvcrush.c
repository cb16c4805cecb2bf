/*
 * module_kvcrush.c - binding of kvcrush_pick (KVCrush's bucket
 * representatives): validate once, run with the GIL released, map status
 * codes to exceptions.
 */
#include "module.h"
#include "module_run.h"
#include "module_spec.h"

#include <string.h>

#include "kvcrush.h"

KVC_PY_OP(op_kvcrush_pick, kvcrush_pick, 1, 0)

PyDoc_STRVAR(kvcrush_pick_doc,
             "kvcrush_pick(mass, kept, picks, dist, anchor, seed, kv_start)\n--\n\n"
             "Low-level: see kvcompress.ops.kvcrush_pick.");

enum { KC_MASS, KC_KEPT, KC_PICKS, KC_DIST, KC_ANCHOR, KC_SEED, KC_START, KC_N };
static const struct kvc_py_spec kvcrush_pick_spec[KC_N] = {
    KVC_PY_IN("mass", 3, "[B, H, T]", DT_F32),
    KVC_PY_IN("kept", 2, "[B, T]", DT_U8),
    KVC_PY_OUT("picks", 2, "[B, G]", DT_I64),
    KVC_PY_OUT("dist", 2, "[B, T]", DT_I64),
    KVC_PY_INT_IN("anchor", KVC_KVCRUSH_ALTERNATE, KVC_KVCRUSH_MEAN),
    KVC_PY_INT_IN("seed", 0, INT64_MAX),
    KVC_PY_START("T"),
};

static PyObject *py_kvcrush_pick(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_py_call c;
    struct kvc_kvcrush_pick_params p;
    PyObject *ret = NULL;
    memset(&p, 0, sizeof p);
    if (kvc_py_call_parse(st, "kvcrush_pick", kvcrush_pick_spec, KC_N, args, nargs, &c) < 0) return NULL;
    if (kvc_py_call_finish(st, &c) < 0) goto done;
    p.mass = c.a[KC_MASS].view;
    p.kept = c.a[KC_KEPT].view;
    p.picks = c.a[KC_PICKS].view;
    p.dist = c.a[KC_DIST].view;
    p.kv_start = kvc_py_call_i64(&c, KC_START, &p.kv_start_stride);
    p.anchor = (int32_t)c.i[KC_ANCHOR];
    p.seed = c.i[KC_SEED];
    p.num_threads = st->num_threads;
    {
        /* an empty batch takes no scratch */
        void **scratch = p.mass.shape[0] > 0 ? &p.scratch : NULL;
        if (kvc_py_run(st, &op_kvcrush_pick, &p, scratch, &p.scratch_bytes, c.a, c.n) < 0) goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    kvc_py_call_release(&c);
    return ret;
}

PyMethodDef kvc_py_kvcrush_methods[] = {
    {"kvcrush_pick", (PyCFunction)(void (*)(void))py_kvcrush_pick, METH_FASTCALL, kvcrush_pick_doc},
    {NULL, NULL, 0, NULL}};
