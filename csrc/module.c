/*
 * module.c - the CPython extension kvcompress._C.
 *
 * Module definition, state, exceptions, threads and test hooks. The module
 * layer (module*.c, the only files that touch Python) consumes DLPack
 * capsules, validates every argument once (module_bridge.c imports tensors,
 * module_spec.c checks each op's declared arguments), runs the C op
 * with the GIL released and maps status codes to the module's exception
 * hierarchy (module_<ops>.c). Outputs are allocated by the Python caller and
 * passed in, so the core never owns memory.
 *
 * Convention: every helper that can fail returns -1 (or NULL) with a Python
 * exception set, 0 (or a new reference) on success.
 */
#include "module.h"

#include <string.h>

#include "attention_amx.h"
#include "attention_rows.h"
#include "kvc_math.h"

#ifdef KVC_WITH_CUDA
#include "cuda/kvc_cuda.h"
#endif

/* ------------------------------------------------------------------------ */
/* threads, introspection, test hooks                                       */
/* ------------------------------------------------------------------------ */

static PyObject *py_set_num_threads(PyObject *m, PyObject *arg)
{
    struct kvc_state *st = kvc_py_get_state(m);
    int64_t n;
    if (kvc_py_get_int64(st, arg, "n", &n) < 0) return NULL;
    if (n < 1 || n > 4096) {
        kvc_py_raise(st->ValueError, "n: expected a thread count in [1, 4096], got %lld", (long long)n);
        return NULL;
    }
#ifdef _OPENMP
    st->num_threads = (int)n;
#endif
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *m, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLong(kvc_py_get_state(m)->num_threads);
}

/* (shape, dtype name, DLPack device type, read-only) of any DLPack object,
 * so Python can allocate outputs for producers it does not know; errors
 * name the argument `arg` (default "x") as the caller knows it. */
static PyObject *py_describe(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_arg a;
    PyObject *shape = NULL, *ret = NULL;
    enum kvc_dtype dt;
    const char *arg = "x";
    char name[96];
    int d;
    if (nargs < 1 || nargs > 2) {
        PyErr_Format(PyExc_TypeError, "_describe() takes 1 or 2 arguments (%zd given)", nargs);
        return NULL;
    }
    if (nargs == 2) {
        arg = PyUnicode_AsUTF8(args[1]);
        if (arg == NULL) return NULL;
    }
    if (kvc_py_dl_take(st, args[0], arg, &a) < 0) return NULL;
    if (kvc_py_dl_dtype(a.t->dtype, &dt) == 0) snprintf(name, sizeof name, "%s", kvc_dtype_name(dt));
    else kvc_py_dl_dtype_name(a.t->dtype, name, sizeof name);
    shape = PyTuple_New(a.t->ndim);
    if (shape == NULL) goto done;
    for (d = 0; d < a.t->ndim; d++) {
        PyObject *v = PyLong_FromLongLong((long long)a.t->shape[d]);
        if (v == NULL) goto done;
        PyTuple_SET_ITEM(shape, d, v);
    }
    ret = Py_BuildValue("(Osii)", shape, name, (int)a.t->device.device_type, a.read_only);
done:
    Py_XDECREF(shape);
    kvc_py_arg_release(&a);
    return ret;
}

/* Test hook: 1-D dtype conversion through kvc_math.h, so the tests can check
 * the fp16/bf16 rounding every op relies on against NumPy/torch. */
static PyObject *py_cast(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = kvc_py_get_state(m);
    struct kvc_arg a[2];
    int64_t i, n;
    int na = 0;
    PyObject *ret = NULL;
    memset(a, 0, sizeof a);
    if (kvc_py_check_nargs("_cast", nargs, 2) < 0) return NULL;
    if (kvc_py_arg_import(st, args[0], "src", 1, "[n]", DT_FLOAT, 0, &a[0]) < 0) goto done;
    na = 1;
    if (kvc_py_arg_import(st, args[1], "dst", 1, "[n]", DT_FLOAT, 1, &a[1]) < 0) goto done;
    na = 2;
    if (a[0].dev_type != kDLCPU || a[1].dev_type != kDLCPU) {
        kvc_py_raise(st->ValueError, "%s: _cast takes CPU arrays", a[0].dev_type != kDLCPU ? "src" : "dst");
        goto done;
    }
    if (kvc_py_check_shape(st, &a[1], a[0].view.shape, "[n]") < 0) goto done;
    if (kvc_py_check_output(st, &a[1], a, 2) < 0) goto done;
    n = a[0].view.shape[0];
    {
        const struct kvc_view *s = &a[0].view, *d = &a[1].view;
        for (i = 0; i < n; i++) {
            float f = kvc_load_f32(s->data, s->dtype, i * s->strides[0]);
            int64_t o = i * d->strides[0];
            if (d->dtype == KVC_F16) ((uint16_t *)d->data)[o] = kvc_f32_to_f16(f);
            else if (d->dtype == KVC_BF16) ((uint16_t *)d->data)[o] = kvc_f32_to_bf16(f);
            else ((float *)d->data)[o] = f;
        }
    }
    ret = Py_NewRef(Py_None);
done:
    kvc_py_args_release(a, na);
    return ret;
}

/* Test/benchmark hook: use (1) or bypass (0) the DLPack C exchange fast
 * path; returns the previous setting. */
static PyObject *py_use_exchange_api(PyObject *m, PyObject *arg)
{
    struct kvc_state *st = kvc_py_get_state(m);
    int prev = st->use_xapi, v;
    if (kvc_py_get_bool(st, arg, "flag", &v) < 0) return NULL;
    st->use_xapi = v;
    return PyBool_FromLong(prev);
}

/* The kernel-path hooks: arg a bool, set(arg) allows (1) or forbids (0) the
 * path; returns the previous setting. */
static PyObject *set_path(PyObject *m, PyObject *arg, int (*set)(int))
{
    struct kvc_state *st = kvc_py_get_state(m);
    int v;
    if (kvc_py_get_bool(st, arg, "flag", &v) < 0) return NULL;
    return PyBool_FromLong(set(v));
}

/* Test/benchmark hooks: the attention ops' 16-lane x86-64-v4 units (kvc.h,
 * KVC_WIDE), the packed attention's AMX path (attention_amx.h) and its
 * few-rows path (attention_rows.h). */
static PyObject *py_set_wide(PyObject *m, PyObject *arg) { return set_path(m, arg, kvc_set_wide); }
static PyObject *py_set_amx(PyObject *m, PyObject *arg) { return set_path(m, arg, kvc_set_amx); }
static PyObject *py_set_rows(PyObject *m, PyObject *arg) { return set_path(m, arg, kvc_set_rows); }

/* Whether the packed attention takes its AMX path, or its few-rows path,
 * for 4-bit keys and values at D = 64 (G = 32) on this CPU now. */
static PyObject *py_amx(PyObject *m, PyObject *noarg)
{
    (void)m, (void)noarg;
    return PyBool_FromLong(kvc_amx_usable(4, 4, 64, 32));
}

static PyObject *py_rows(PyObject *m, PyObject *noarg)
{
    (void)m, (void)noarg;
    return PyBool_FromLong(kvc_rows_usable(4, 4, 64, 32));
}

/* Whether the attention ops run their wide units on this CPU now. */
static PyObject *py_wide(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(kvc_wide_active());
}

static PyObject *py_cuda_device_count(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
#ifdef KVC_WITH_CUDA
    return PyLong_FromLong(kvc_cuda_device_count());
#else
    return PyLong_FromLong(0);
#endif
}

/* Test hook: the x86-64 ISA level (4, 3 or 0) whose clone of the hot loops
 * the load-time dispatch picks on this CPU, by the resolver's own test;
 * None where there are no clones (make isa-test skips levels above it). */
static PyObject *py_cpu_level(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
#if defined(KVC_MULTIVERSION) && __GNUC__ >= 12
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return PyLong_FromLong(4);
    if (__builtin_cpu_supports("x86-64-v3")) return PyLong_FromLong(3);
    return PyLong_FromLong(0);
#else
    Py_RETURN_NONE;
#endif
}

/* What the hot loops of this build are: "clones" (dispatched at load
 * time), one level only (KVCOMPRESS_ISA) or "plain" (no multiversioning). */
static const char *isa_build(void)
{
#if defined(KVC_MULTIVERSION) && defined(KVC_ISA)
    return KVC_ISA == 4 ? "x86-64-v4" : KVC_ISA == 3 ? "x86-64-v3" : "x86-64";
#elif defined(KVC_MULTIVERSION)
    return "clones";
#else
    return "plain";
#endif
}

static PyMethodDef kvc_methods[] = {
{"set_num_threads", py_set_num_threads, METH_O,
     "set_num_threads(n)\n--\n\nThreads used by every op (no effect without OpenMP)."},
    {"get_num_threads", py_get_num_threads, METH_NOARGS,
     "get_num_threads()\n--\n\nThreads used by every op (1 without OpenMP)."},
    {"cuda_device_count", py_cuda_device_count, METH_NOARGS,
     "cuda_device_count()\n--\n\nCUDA devices this build can use (0 in a CPU-only build)."},
    {"_describe", (PyCFunction)(void (*)(void))py_describe, METH_FASTCALL,
     "_describe(x, name='x')\n--\n\n(shape, dtype, dlpack_device_type, read_only) of a DLPack object; errors "
     "name the argument `name`."},
    {"_set_wide", py_set_wide, METH_O,
     "_set_wide(flag)\n--\n\nTest hook: allow or forbid the attention ops' 16-lane x86-64-v4 units; "
     "returns the previous setting."},
    {"_set_amx", py_set_amx, METH_O,
     "_set_amx(flag)\n--\n\nTest hook: allow or forbid the packed attention's AMX path; returns the previous "
     "setting."},
    {"_amx", py_amx, METH_NOARGS,
     "_amx()\n--\n\nWhether the packed attention takes its AMX path (4-bit keys and values) on this CPU now."},
    {"_set_rows", py_set_rows, METH_O,
     "_set_rows(flag)\n--\n\nTest hook: allow or forbid the packed attention's few-rows path; returns the "
     "previous setting."},
    {"_rows", py_rows, METH_NOARGS,
     "_rows()\n--\n\nWhether the packed attention may take its few-rows path on this CPU now (where a unit has at "
     "most 4 query rows, D = 64, 128 or 256, G a multiple of 16)."},
    {"_wide", py_wide, METH_NOARGS,
     "_wide()\n--\n\nWhether the attention ops run their 16-lane x86-64-v4 units on this CPU now."},
    {"_use_exchange_api", py_use_exchange_api, METH_O,
     "_use_exchange_api(flag)\n--\n\nTest hook: toggle the DLPack C exchange fast path."},
    {"_cpu_level", py_cpu_level, METH_NOARGS,
     "_cpu_level()\n--\n\nTest hook: x86-64 ISA level (4, 3, 0) of the clone this CPU runs, or None."},
    {"_cast", (PyCFunction)(void (*)(void))py_cast, METH_FASTCALL,
     "_cast(src, dst)\n--\n\nTest hook: convert a 1-D float array into dst's dtype."},
    {NULL, NULL, 0, NULL}};

/* ------------------------------------------------------------------------ */
/* module definition (multi-phase init)                                     */
/* ------------------------------------------------------------------------ */

static PyObject *new_error(const char *name, const char *doc, PyObject *base1, PyObject *base2)
{
    PyObject *bases = base2 ? PyTuple_Pack(2, base1, base2) : Py_NewRef(base1);
    PyObject *exc;
    if (bases == NULL) return NULL;
    exc = PyErr_NewExceptionWithDoc(name, doc, bases, NULL);
    Py_DECREF(bases);
    return exc;
}

static int kvc_exec(PyObject *m)
{
    struct kvc_state *st = kvc_py_get_state(m);
    st->Error = new_error("kvcompress.KVCompressError",
                          "Base class of every error raised by kvcompress.", PyExc_Exception,
                          NULL);
    if (st->Error == NULL) return -1;
    st->ValueError = new_error("kvcompress.KVCompressValueError",
                               "A kvcompress argument has a bad value, shape or device.",
                               st->Error, PyExc_ValueError);
    if (st->ValueError == NULL) return -1;
    st->TypeError = new_error("kvcompress.KVCompressTypeError",
                              "A kvcompress argument has the wrong type or dtype.", st->Error,
                              PyExc_TypeError);
    if (st->TypeError == NULL) return -1;
    if (PyModule_AddFunctions(m, kvc_py_core_methods) < 0) return -1;
    if (PyModule_AddFunctions(m, kvc_py_attention_methods) < 0) return -1;
    if (PyModule_AddFunctions(m, kvc_py_merge_methods) < 0) return -1;
    if (PyModule_AddFunctions(m, kvc_py_global_methods) < 0) return -1;
    if (PyModule_AddFunctions(m, kvc_py_budget_methods) < 0) return -1;
    if (PyModule_AddFunctions(m, kvc_py_quant_methods) < 0) return -1;
    if (PyModule_AddFunctions(m, kvc_py_packed_attention_methods) < 0) return -1;
    if (PyModule_AddFunctions(m, kvc_py_pages_methods) < 0) return -1;
    if (PyModule_AddFunctions(m, kvc_py_lsh_methods) < 0) return -1;
    if (PyModule_AddFunctions(m, kvc_py_minicache_methods) < 0) return -1;
    if (PyModule_AddFunctions(m, kvc_py_keyformer_methods) < 0) return -1;
    if (PyModule_AddFunctions(m, kvc_py_lagkv_methods) < 0) return -1;
    if (PyModule_AddFunctions(m, kvc_py_span_methods) < 0) return -1;
    if (PyModule_AddFunctions(m, kvc_py_kvcrush_methods) < 0) return -1;
    if (PyModule_AddFunctions(m, kvc_py_kvmerger_methods) < 0) return -1;
    if (PyModule_AddFunctions(m, kvc_py_actqkv_methods) < 0) return -1;
    if (PyModule_AddFunctions(m, kvc_py_layerbudget_methods) < 0) return -1;
    if (PyModule_AddFunctions(m, kvc_py_fastgen_methods) < 0) return -1;
    if (PyModule_AddFunctions(m, kvc_py_keep_rows_methods) < 0) return -1;
#ifdef _OPENMP
    st->num_threads = omp_get_max_threads();
#else
    st->num_threads = 1;
#endif
    if (st->num_threads < 1) st->num_threads = 1;
    st->use_xapi = 1;
    if (PyModule_AddObjectRef(m, "KVCompressError", st->Error) < 0) return -1;
    if (PyModule_AddObjectRef(m, "KVCompressValueError", st->ValueError) < 0) return -1;
    if (PyModule_AddObjectRef(m, "KVCompressTypeError", st->TypeError) < 0) return -1;
#ifdef _OPENMP
    if (PyModule_AddObjectRef(m, "has_openmp", Py_True) < 0) return -1;
#else
    if (PyModule_AddObjectRef(m, "has_openmp", Py_False) < 0) return -1;
#endif
#ifdef KVC_WITH_CUDA
    if (PyModule_AddObjectRef(m, "has_cuda", Py_True) < 0) return -1;
#else
    if (PyModule_AddObjectRef(m, "has_cuda", Py_False) < 0) return -1;
#endif
    if (PyModule_AddStringConstant(m, "_isa", isa_build()) < 0) return -1;
    if (PyModule_AddIntConstant(m, "DLPACK_MAJOR_VERSION", DLPACK_MAJOR_VERSION) < 0) return -1;
    if (PyModule_AddIntConstant(m, "DLPACK_MINOR_VERSION", DLPACK_MINOR_VERSION) < 0) return -1;
    return 0;
}

static int kvc_traverse(PyObject *m, visitproc visit, void *arg)
{
    struct kvc_state *st = kvc_py_get_state(m);
    int i;
    Py_VISIT(st->Error);
    Py_VISIT(st->ValueError);
    Py_VISIT(st->TypeError);
    for (i = 0; i < XAPI_CACHE; i++) Py_VISIT(st->xapi_type[i]);
    return 0;
}

static int kvc_clear(PyObject *m)
{
    struct kvc_state *st = kvc_py_get_state(m);
    int i;
    Py_CLEAR(st->Error);
    Py_CLEAR(st->ValueError);
    Py_CLEAR(st->TypeError);
    for (i = 0; i < XAPI_CACHE; i++) {
        Py_CLEAR(st->xapi_type[i]);
        st->xapi[i] = NULL;
    }
    return 0;
}

static void kvc_free(void *m) { kvc_clear((PyObject *)m); }

static PyModuleDef_Slot kvc_slots[] = {{Py_mod_exec, (void *)kvc_exec}, {0, NULL}};

static struct PyModuleDef kvc_module = {
    PyModuleDef_HEAD_INIT,
    "kvcompress._C",
    "C core of kvcompress: KV-cache scoring, selection and compaction on DLPack tensors.",
    sizeof(struct kvc_state),
    kvc_methods,
    kvc_slots,
    kvc_traverse,
    kvc_clear,
    kvc_free,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModuleDef_Init(&kvc_module); }
