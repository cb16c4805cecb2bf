/*
 * module.c - the CPython extension kvcompress._C.
 *
 * The only file that touches Python. It consumes DLPack capsules, validates
 * every argument once (dtype, device, rank, shape, ranges, aliasing), turns
 * them into struct kvc_view, runs the C op with the GIL released and maps
 * status codes to the module's exception hierarchy. Outputs are allocated
 * by the Python caller and passed in, so the core never owns memory.
 *
 * Convention: every helper that can fail returns -1 (or NULL) with a Python
 * exception set, 0 (or a new reference) on success.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "compact.h"
#include "dlpack.h"
#include "kvc.h"
#include "kvc_math.h"
#include "score.h"
#include "select.h"

/* ------------------------------------------------------------------------ */
/* module state and errors                                                  */
/* ------------------------------------------------------------------------ */

/* Per-type cache of DLPack C exchange tables (see dl_take). A handful of
 * entries covers the frameworks one process mixes (torch, NumPy, ...). */
#define XAPI_CACHE 4

struct kvc_state {
    PyObject *Error;      /* KVCompressError(Exception) */
    PyObject *ValueError; /* KVCompressValueError(KVCompressError, ValueError) */
    PyObject *TypeError;  /* KVCompressTypeError(KVCompressError, TypeError) */
    int num_threads;
    int use_xapi;                        /* 0 forces __dlpack__ (tests) */
    PyObject *xapi_type[XAPI_CACHE];     /* strong refs to the cached types */
    const DLPackExchangeAPI *xapi[XAPI_CACHE]; /* NULL: type has no usable table */
    int xapi_next;
};

static struct kvc_state *get_state(PyObject *module)
{
    return (struct kvc_state *)PyModule_GetState(module);
}

/* Always returns -1 so call sites can `return raise(...)`. */
static int raise(PyObject *type, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    PyErr_FormatV(type, fmt, ap);
    va_end(ap);
    return -1;
}

/* Raise `type` with the pending exception as its __cause__ (`raise X from e`),
 * so a producer's own __dlpack__ failure stays visible. */
static int raise_from(PyObject *type, const char *fmt, ...)
{
    PyObject *cause, *exc;
    va_list ap;
#if PY_VERSION_HEX >= 0x030C0000
    cause = PyErr_GetRaisedException();
#else
    PyObject *ct, *tb;
    PyErr_Fetch(&ct, &cause, &tb);
    PyErr_NormalizeException(&ct, &cause, &tb);
    if (tb && cause) PyException_SetTraceback(cause, tb);
    Py_XDECREF(ct);
    Py_XDECREF(tb);
#endif
    va_start(ap, fmt);
    PyErr_FormatV(type, fmt, ap);
    va_end(ap);
    if (cause == NULL) return -1;
#if PY_VERSION_HEX >= 0x030C0000
    exc = PyErr_GetRaisedException();
    PyException_SetContext(exc, Py_NewRef(cause));
    PyException_SetCause(exc, cause);
    PyErr_SetRaisedException(exc);
#else
    {
        PyObject *et, *tb2;
        PyErr_Fetch(&et, &exc, &tb2);
        PyErr_NormalizeException(&et, &exc, &tb2);
        PyException_SetContext(exc, Py_NewRef(cause));
        PyException_SetCause(exc, cause);
        PyErr_Restore(et, exc, tb2);
    }
#endif
    return -1;
}

static int raise_status(struct kvc_state *st, enum kvc_status s, const char *op)
{
    if (s == KVC_ERR_NAN) return raise(st->ValueError, "scores: contains NaN");
    if (s == KVC_ERR_INVALID) return raise(st->ValueError, "%s: invalid arguments", op);
    if (s == KVC_ERR_UNSUPPORTED) return raise(st->TypeError, "%s: unsupported input", op);
    return raise(st->Error, "%s: internal error (%s)", op, kvc_status_str(s));
}

/* ------------------------------------------------------------------------ */
/* DLPack import                                                            */
/* ------------------------------------------------------------------------ */

#define DT_FLOAT ((1u << KVC_F32) | (1u << KVC_F16) | (1u << KVC_BF16))
#define DT_F32 (1u << KVC_F32)
#define DT_INDEX ((1u << KVC_I32) | (1u << KVC_I64))
#define DT_I64 (1u << KVC_I64)

/* An argument taken over from its producer. Exactly one of mv / ml is set
 * while we own the managed tensor; arg_release hands it back. */
struct kvc_arg {
    const char *name;
    DLManagedTensorVersioned *mv;
    DLManagedTensor *ml;
    DLTensor *t;
    int read_only;
    struct kvc_view view;
};

/* Call the producer's deleter; needs the GIL (NumPy's deleter DECREFs).
 * A deleter may run Python code, which must not see (or clobber) the error
 * we are about to raise, so a pending exception is parked around it. */
static void arg_release(struct kvc_arg *a)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *exc;
#else
    PyObject *et, *ev, *tb;
#endif
    if (a->mv == NULL && a->ml == NULL) return;
#if PY_VERSION_HEX >= 0x030C0000
    exc = PyErr_GetRaisedException();
#else
    PyErr_Fetch(&et, &ev, &tb);
#endif
    if (a->mv) {
        if (a->mv->deleter) a->mv->deleter(a->mv);
        a->mv = NULL;
    }
    if (a->ml) {
        if (a->ml->deleter) a->ml->deleter(a->ml);
        a->ml = NULL;
    }
    a->t = NULL;
#if PY_VERSION_HEX >= 0x030C0000
    if (exc) PyErr_SetRaisedException(exc);
#else
    if (et) PyErr_Restore(et, ev, tb);
#endif
}

static void args_release(struct kvc_arg *a, int n)
{
    int i;
    for (i = 0; i < n; i++) arg_release(&a[i]);
}

/* The exchange table published by obj's type, or NULL. Never fails: a
 * missing or unusable table just means "use __dlpack__". */
static const DLPackExchangeAPI *xapi_for(struct kvc_state *st, PyTypeObject *type)
{
    PyObject *cap;
    const DLPackExchangeAPI *api = NULL;
    int i;
    for (i = 0; i < XAPI_CACHE; i++)
        if (st->xapi_type[i] == (PyObject *)type) return st->xapi[i];
    cap = PyObject_GetAttrString((PyObject *)type, "__dlpack_c_exchange_api__");
    if (cap && PyCapsule_IsValid(cap, "dlpack_exchange_api")) {
        api = (const DLPackExchangeAPI *)PyCapsule_GetPointer(cap, "dlpack_exchange_api");
        if (api && (api->header.version.major != DLPACK_MAJOR_VERSION ||
                    api->managed_tensor_from_py_object_no_sync == NULL))
            api = NULL;
    }
    Py_XDECREF(cap);
    PyErr_Clear();
    i = st->xapi_next;
    st->xapi_next = (i + 1) % XAPI_CACHE;
    Py_XSETREF(st->xapi_type[i], Py_NewRef((PyObject *)type));
    st->xapi[i] = api; /* tables live as long as their (now referenced) type */
    return api;
}

/* obj.__dlpack__(max_version=(1, 1)), falling back to obj.__dlpack__() for
 * producers that predate versioned capsules. Takes ownership of the managed
 * tensor by renaming the capsule to used_*, as the protocol requires. */
static int dl_take(struct kvc_state *st, PyObject *obj, const char *name, struct kvc_arg *a)
{
    PyObject *meth, *cap = NULL, *kwargs, *empty;
    memset(a, 0, sizeof *a);
    a->name = name;
    if (st->use_xapi) {
        /* Fast path (torch >= 2.9): the producer's C table skips the Python
         * __dlpack__ method; what comes back is the same owning versioned
         * tensor, so everything after this point is shared. */
        const DLPackExchangeAPI *api = xapi_for(st, Py_TYPE(obj));
        if (api) {
            DLManagedTensorVersioned *mv = NULL;
            if (api->managed_tensor_from_py_object_no_sync((void *)obj, &mv) != 0 || mv == NULL) {
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_BufferError, "DLPack C exchange export failed");
                return raise_from(st->ValueError, "%s: DLPack export of %.100s failed", name,
                                  Py_TYPE(obj)->tp_name);
            }
            a->mv = mv;
            if (mv->version.major != DLPACK_MAJOR_VERSION) {
                unsigned major = mv->version.major;
                arg_release(a);
                return raise(st->ValueError,
                             "%s: DLPack major version %u is not supported (expected %d)", name,
                             major, DLPACK_MAJOR_VERSION);
            }
            a->t = &mv->dl_tensor;
            a->read_only = (mv->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0;
            return 0;
        }
    }
    meth = PyObject_GetAttrString(obj, "__dlpack__");
    if (meth == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
        PyErr_Clear();
        return raise(st->TypeError,
                     "%s: expected a tensor or array supporting DLPack (__dlpack__), got %.100s",
                     name, Py_TYPE(obj)->tp_name);
    }
    kwargs = Py_BuildValue("{s:(ii)}", "max_version", DLPACK_MAJOR_VERSION,
                           DLPACK_MINOR_VERSION);
    empty = PyTuple_New(0);
    if (kwargs && empty) cap = PyObject_Call(meth, empty, kwargs);
    Py_XDECREF(kwargs);
    Py_XDECREF(empty);
    if (cap == NULL && PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear();
        cap = PyObject_CallNoArgs(meth);
    }
    Py_DECREF(meth);
    if (cap == NULL)
        return raise_from(st->ValueError, "%s: __dlpack__() of %.100s failed", name,
                          Py_TYPE(obj)->tp_name);

    if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
        DLManagedTensorVersioned *mv =
            (DLManagedTensorVersioned *)PyCapsule_GetPointer(cap, "dltensor_versioned");
        if (mv == NULL || PyCapsule_SetName(cap, "used_dltensor_versioned") < 0) {
            Py_DECREF(cap);
            return -1;
        }
        Py_DECREF(cap);
        a->mv = mv;
        if (mv->version.major != DLPACK_MAJOR_VERSION) {
            unsigned major = mv->version.major;
            arg_release(a); /* the deleter is the one field safe to touch */
            return raise(st->ValueError, "%s: DLPack major version %u is not supported (expected %d)",
                         name, major, DLPACK_MAJOR_VERSION);
        }
        a->t = &mv->dl_tensor;
        a->read_only = (mv->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0;
        return 0;
    }
    if (PyCapsule_IsValid(cap, "dltensor")) {
        DLManagedTensor *ml = (DLManagedTensor *)PyCapsule_GetPointer(cap, "dltensor");
        if (ml == NULL || PyCapsule_SetName(cap, "used_dltensor") < 0) {
            Py_DECREF(cap);
            return -1;
        }
        Py_DECREF(cap);
        a->ml = ml;
        a->t = &ml->dl_tensor;
        return 0;
    }
    raise(st->TypeError, "%s: __dlpack__() returned %.100s, not an unused DLPack capsule", name,
          Py_TYPE(cap)->tp_name);
    Py_DECREF(cap);
    return -1;
}

static int dl_dtype(DLDataType dt, enum kvc_dtype *out)
{
    if (dt.lanes != 1) return -1;
    if (dt.code == kDLFloat && dt.bits == 32) *out = KVC_F32;
    else if (dt.code == kDLFloat && dt.bits == 16) *out = KVC_F16;
    else if (dt.code == kDLBfloat && dt.bits == 16) *out = KVC_BF16;
    else if (dt.code == kDLInt && dt.bits == 32) *out = KVC_I32;
    else if (dt.code == kDLInt && dt.bits == 64) *out = KVC_I64;
    else return -1;
    return 0;
}

static void dl_dtype_name(DLDataType dt, char *buf, size_t n)
{
    const char *base = NULL;
    switch (dt.code) {
    case kDLInt: base = "int"; break;
    case kDLUInt: base = "uint"; break;
    case kDLFloat: base = "float"; break;
    case kDLBfloat: base = "bfloat"; break;
    case kDLComplex: base = "complex"; break;
    case kDLBool: base = "bool"; break;
    default: break;
    }
    if (base && dt.code == kDLBool && dt.lanes == 1) snprintf(buf, n, "bool");
    else if (base && dt.lanes == 1) snprintf(buf, n, "%s%u", base, (unsigned)dt.bits);
    else
        snprintf(buf, n, "DLPack dtype (code %u, %u bits, %u lanes)", (unsigned)dt.code,
                 (unsigned)dt.bits, (unsigned)dt.lanes);
}

static void dtype_set_name(unsigned mask, char *buf, size_t n)
{
    int d, count = 0, total = 0;
    buf[0] = '\0';
    for (d = KVC_F32; d <= KVC_I64; d++) total += (mask >> d) & 1u;
    for (d = KVC_F32; d <= KVC_I64; d++) {
        if (!((mask >> d) & 1u)) continue;
        count++;
        if (count > 1) strncat(buf, count == total ? " or " : ", ", n - strlen(buf) - 1);
        strncat(buf, kvc_dtype_name((enum kvc_dtype)d), n - strlen(buf) - 1);
    }
}

static void shape_str(const struct kvc_view *v, char *buf, size_t n)
{
    size_t used;
    int d;
    snprintf(buf, n, "[");
    for (d = 0; d < v->ndim; d++) {
        used = strlen(buf);
        snprintf(buf + used, n - used, d ? ", %lld" : "%lld", (long long)v->shape[d]);
    }
    used = strlen(buf);
    snprintf(buf + used, n - used, "]");
}

/* Check device, dtype, rank and output writability; fill a->view. */
static int arg_check(struct kvc_state *st, struct kvc_arg *a, int ndim, const char *dims,
                     unsigned dtypes, int is_out)
{
    const DLTensor *t = a->t;
    enum kvc_dtype dt;
    char buf[96];
    int d;
    if (t->device.device_type == kDLCUDA || t->device.device_type == kDLCUDAManaged)
        return raise(st->ValueError,
                     "%s: CUDA tensors need a CUDA build of kvcompress (KVCOMPRESS_CUDA=1)",
                     a->name);
    if (t->device.device_type != kDLCPU)
        return raise(st->ValueError,
                     "%s: tensors on DLPack device type %d are not supported (CPU only)",
                     a->name, (int)t->device.device_type);
    if (dl_dtype(t->dtype, &dt) < 0 || !((dtypes >> dt) & 1u)) {
        char want[64];
        dl_dtype_name(t->dtype, buf, sizeof buf);
        dtype_set_name(dtypes, want, sizeof want);
        return raise(st->TypeError, "%s: expected dtype %s, got %s", a->name, want, buf);
    }
    if (t->ndim != ndim)
        return raise(st->ValueError, "%s: expected a %d-D tensor %s, got %d-D", a->name, ndim,
                     dims, (int)t->ndim);
    if (is_out && a->read_only)
        return raise(st->ValueError, "%s: output is read-only", a->name);
    if (t->data == NULL) {
        for (d = 0; d < ndim; d++)
            if (t->shape[d] == 0) break;
        if (d == ndim) return raise(st->ValueError, "%s: tensor has a NULL data pointer", a->name);
    }
    a->view.data = (char *)t->data + t->byte_offset;
    a->view.dtype = (int32_t)dt;
    a->view.ndim = ndim;
    for (d = KVC_MAX_DIMS - 1; d >= 0; d--) {
        if (d >= ndim) {
            a->view.shape[d] = 1;
            a->view.strides[d] = 0;
        } else {
            a->view.shape[d] = t->shape[d];
            if (t->shape[d] < 0)
                return raise(st->ValueError, "%s: negative dimension", a->name);
            /* legacy producers may send NULL strides: compact row-major */
            a->view.strides[d] = t->strides ? t->strides[d]
                                 : d == ndim - 1 ? 1
                                                 : a->view.strides[d + 1] * a->view.shape[d + 1];
        }
    }
    return 0;
}

static int arg_import(struct kvc_state *st, PyObject *obj, const char *name, int ndim,
                      const char *dims, unsigned dtypes, int is_out, struct kvc_arg *a)
{
    if (dl_take(st, obj, name, a) < 0) return -1;
    if (arg_check(st, a, ndim, dims, dtypes, is_out) < 0) {
        arg_release(a);
        return -1;
    }
    return 0;
}

static int64_t view_numel(const struct kvc_view *v)
{
    int64_t n = 1;
    int d;
    for (d = 0; d < v->ndim; d++) n *= v->shape[d];
    return n;
}

/* Byte range [lo, hi) touched by a view; 0 if it touches nothing. */
static int view_span(const struct kvc_view *v, uintptr_t *lo, uintptr_t *hi)
{
    const int64_t es = (int64_t)kvc_dtype_size((enum kvc_dtype)v->dtype);
    int64_t neg = 0, pos = 0;
    int d;
    if (view_numel(v) == 0) return 0;
    for (d = 0; d < v->ndim; d++) {
        int64_t ext = v->strides[d] * (v->shape[d] - 1);
        if (ext < 0) neg += ext;
        else pos += ext;
    }
    *lo = (uintptr_t)((char *)v->data + neg * es);
    *hi = (uintptr_t)((char *)v->data + (pos + 1) * es);
    return 1;
}

/* Conservative: byte ranges intersect (interleaved views count as overlap). */
static int views_overlap(const struct kvc_view *a, const struct kvc_view *b)
{
    uintptr_t alo, ahi, blo, bhi;
    if (!view_span(a, &alo, &ahi) || !view_span(b, &blo, &bhi)) return 0;
    return alo < bhi && blo < ahi;
}

/* Sufficient test that no two elements of an output share memory: sorted by
 * |stride|, each dimension must step past everything the smaller ones reach. */
static int view_self_overlaps(const struct kvc_view *v)
{
    int idx[KVC_MAX_DIMS], n = 0, i, j;
    int64_t reach = 0;
    if (view_numel(v) == 0) return 0;
    for (i = 0; i < v->ndim; i++)
        if (v->shape[i] > 1) idx[n++] = i;
    for (i = 1; i < n; i++)
        for (j = i; j > 0 && llabs((long long)v->strides[idx[j]]) <
                                 llabs((long long)v->strides[idx[j - 1]]); j--) {
            int tmp = idx[j];
            idx[j] = idx[j - 1];
            idx[j - 1] = tmp;
        }
    for (i = 0; i < n; i++) {
        int64_t s = (int64_t)llabs((long long)v->strides[idx[i]]);
        if (s <= reach) return 1;
        reach += s * (v->shape[idx[i]] - 1);
    }
    return 0;
}

/* Outputs: no self-overlap and no overlap with any other listed view. */
static int check_output(struct kvc_state *st, const struct kvc_arg *out,
                        const struct kvc_arg *others, int n_others)
{
    int i;
    if (view_self_overlaps(&out->view))
        return raise(st->ValueError, "%s: output has overlapping elements (e.g. a broadcast view)",
                     out->name);
    for (i = 0; i < n_others; i++) {
        if (others[i].t == NULL || &others[i] == out) continue;
        if (views_overlap(&out->view, &others[i].view))
            return raise(st->ValueError, "%s: output must not overlap %s", out->name,
                         others[i].name);
    }
    return 0;
}

static int check_shape(struct kvc_state *st, const struct kvc_arg *a, const int64_t *want,
                       const char *dims)
{
    int d;
    for (d = 0; d < a->view.ndim; d++)
        if (a->view.shape[d] != want[d]) {
            char got[96], exp[96];
            struct kvc_view w = a->view;
            memcpy(w.shape, want, sizeof(int64_t) * (size_t)a->view.ndim);
            shape_str(&a->view, got, sizeof got);
            shape_str(&w, exp, sizeof exp);
            return raise(st->ValueError, "%s: expected shape %s = %s, got %s", a->name, dims,
                         exp, got);
        }
    return 0;
}

/* Optional kv_start: int64 [B], each in [0, limit]. */
static int import_kv_start(struct kvc_state *st, PyObject *obj, int64_t B, int64_t limit,
                           struct kvc_arg *a)
{
    int64_t b;
    memset(a, 0, sizeof *a);
    if (obj == Py_None) return 0;
    if (arg_import(st, obj, "kv_start", 1, "[B]", DT_I64, 0, a) < 0) return -1;
    if (a->view.shape[0] != B) {
        raise(st->ValueError, "kv_start: expected shape [B] = [%lld], got [%lld]", (long long)B,
              (long long)a->view.shape[0]);
        goto fail;
    }
    for (b = 0; b < B; b++) {
        int64_t v = ((const int64_t *)a->view.data)[b * a->view.strides[0]];
        if (v < 0 || v > limit) {
            raise(st->ValueError, "kv_start: value %lld at batch %lld is outside [0, %lld]",
                  (long long)v, (long long)b, (long long)limit);
            goto fail;
        }
    }
    return 0;
fail:
    arg_release(a);
    return -1;
}

static int check_nargs(const char *fn, Py_ssize_t nargs, Py_ssize_t want)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd positional arguments (%zd given)", fn, want,
                     nargs);
        return -1;
    }
    return 0;
}

static int get_int64(struct kvc_state *st, PyObject *o, const char *name, int64_t *out)
{
    long long v;
    *out = 0;
    if (!PyLong_Check(o) || PyBool_Check(o))
        return raise(st->TypeError, "%s: expected an int, got %.100s", name, Py_TYPE(o)->tp_name);
    v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) return raise_from(st->ValueError, "%s: out of range", name);
    *out = (int64_t)v;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* ops                                                                      */
/* ------------------------------------------------------------------------ */

PyDoc_STRVAR(window_scores_doc,
             "window_scores(queries, keys, out, scaling, gqa_max, kv_start)\n--\n\n"
             "Low-level: see kvcompress.ops.window_scores.");

static PyObject *py_window_scores(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = get_state(m);
    struct kvc_arg a[4]; /* queries, keys, out, kv_start */
    struct kvc_window_scores_params p;
    enum kvc_status s;
    double scaling;
    int gqa_max, n = 0;
    void *scratch = NULL;
    PyObject *ret = NULL;
    memset(a, 0, sizeof a);
    memset(&p, 0, sizeof p);
    if (check_nargs("window_scores", nargs, 6) < 0) return NULL;
    scaling = PyFloat_AsDouble(args[3]);
    if (scaling == -1.0 && PyErr_Occurred()) {
        raise_from(st->TypeError, "scaling: expected a float");
        return NULL;
    }
    if (!isfinite(scaling)) {
        raise(st->ValueError, "scaling: must be finite, got %R", args[3]);
        return NULL;
    }
    gqa_max = PyObject_IsTrue(args[4]);
    if (gqa_max < 0) return NULL;

    if (arg_import(st, args[0], "queries", 4, "[B, Hq, Tq, D]", DT_FLOAT, 0, &a[0]) < 0) goto done;
    n = 1;
    if (arg_import(st, args[1], "keys", 4, "[B, Hkv, Tk, D]", DT_FLOAT, 0, &a[1]) < 0) goto done;
    n = 2;
    if (arg_import(st, args[2], "out", 3, "[B, Hkv, Tk]", DT_F32, 1, &a[2]) < 0) goto done;
    n = 3;
    {
        const struct kvc_view *q = &a[0].view, *k = &a[1].view;
        int64_t want[3];
        if (q->dtype != k->dtype) {
            raise(st->TypeError, "keys: dtype %s does not match queries dtype %s",
                  kvc_dtype_name((enum kvc_dtype)k->dtype), kvc_dtype_name((enum kvc_dtype)q->dtype));
            goto done;
        }
        if (k->shape[0] != q->shape[0]) {
            raise(st->ValueError, "keys: batch size %lld does not match queries (%lld)",
                  (long long)k->shape[0], (long long)q->shape[0]);
            goto done;
        }
        if (k->shape[3] != q->shape[3]) {
            raise(st->ValueError, "keys: head dim %lld does not match queries (%lld)",
                  (long long)k->shape[3], (long long)q->shape[3]);
            goto done;
        }
        if (k->shape[1] == 0 ? q->shape[1] != 0 : q->shape[1] % k->shape[1] != 0) {
            raise(st->ValueError,
                  "queries: %lld heads is not a multiple of the %lld kv heads of keys",
                  (long long)q->shape[1], (long long)k->shape[1]);
            goto done;
        }
        if (q->shape[2] > k->shape[2]) {
            raise(st->ValueError,
                  "queries: %lld queries but only %lld keys (queries are the last Tq positions)",
                  (long long)q->shape[2], (long long)k->shape[2]);
            goto done;
        }
        want[0] = k->shape[0];
        want[1] = k->shape[1];
        want[2] = k->shape[2];
        if (check_shape(st, &a[2], want, "[B, Hkv, Tk]") < 0) goto done;
        if (import_kv_start(st, args[5], q->shape[0], k->shape[2], &a[3]) < 0) goto done;
        n = 4;
        if (check_output(st, &a[2], a, 4) < 0) goto done;
    }
    p.q = a[0].view;
    p.k = a[1].view;
    p.out = a[2].view;
    p.kv_start = a[3].t ? (const int64_t *)a[3].view.data : NULL;
    p.kv_start_stride = a[3].t ? a[3].view.strides[0] : 0;
    p.scaling = (float)scaling;
    p.gqa = gqa_max ? KVC_GQA_MAX : KVC_GQA_MEAN;
    p.num_threads = st->num_threads;
    if (view_numel(&p.out) > 0 && p.q.shape[2] > 0) {
        p.scratch_bytes = kvc_window_scores_scratch_bytes(&p);
        scratch = PyMem_RawMalloc(p.scratch_bytes);
        if (scratch == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        p.scratch = scratch;
    }
    Py_BEGIN_ALLOW_THREADS
    s = kvc_window_scores(&p);
    Py_END_ALLOW_THREADS
    if (s != KVC_OK) {
        raise_status(st, s, "window_scores");
        goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    PyMem_RawFree(scratch);
    args_release(a, n);
    return ret;
}

PyDoc_STRVAR(vector_norm_doc, "vector_norm(x, out, ord)\n--\n\n"
                              "Low-level: see kvcompress.ops.vector_norm.");

static PyObject *py_vector_norm(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = get_state(m);
    struct kvc_arg a[2];
    struct kvc_vector_norm_params p;
    enum kvc_status s;
    int64_t ord, want[3];
    int n = 0;
    PyObject *ret = NULL;
    memset(a, 0, sizeof a);
    if (check_nargs("vector_norm", nargs, 3) < 0) return NULL;
    if (get_int64(st, args[2], "ord", &ord) < 0) return NULL;
    if (ord != 1 && ord != 2) {
        raise(st->ValueError, "ord: expected 1 or 2, got %lld", (long long)ord);
        return NULL;
    }
    if (arg_import(st, args[0], "x", 4, "[B, H, T, D]", DT_FLOAT, 0, &a[0]) < 0) goto done;
    n = 1;
    if (arg_import(st, args[1], "out", 3, "[B, H, T]", DT_F32, 1, &a[1]) < 0) goto done;
    n = 2;
    memcpy(want, a[0].view.shape, sizeof want);
    if (check_shape(st, &a[1], want, "[B, H, T]") < 0) goto done;
    if (check_output(st, &a[1], a, 2) < 0) goto done;
    p.x = a[0].view;
    p.out = a[1].view;
    p.ord = (int32_t)ord;
    p.num_threads = st->num_threads;
    Py_BEGIN_ALLOW_THREADS
    s = kvc_vector_norm(&p);
    Py_END_ALLOW_THREADS
    if (s != KVC_OK) {
        raise_status(st, s, "vector_norm");
        goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    args_release(a, n);
    return ret;
}

PyDoc_STRVAR(pool1d_doc, "pool1d(scores, out, kernel, avg)\n--\n\n"
                         "Low-level: see kvcompress.ops.pool1d.");

static PyObject *py_pool1d(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = get_state(m);
    struct kvc_arg a[2];
    struct kvc_pool1d_params p;
    enum kvc_status s;
    int64_t kernel;
    int avg, n = 0;
    PyObject *ret = NULL;
    memset(a, 0, sizeof a);
    if (check_nargs("pool1d", nargs, 4) < 0) return NULL;
    if (get_int64(st, args[2], "kernel", &kernel) < 0) return NULL;
    if (kernel < 1 || kernel % 2 == 0) {
        raise(st->ValueError, "kernel: expected an odd size >= 1, got %lld", (long long)kernel);
        return NULL;
    }
    avg = PyObject_IsTrue(args[3]);
    if (avg < 0) return NULL;
    if (arg_import(st, args[0], "scores", 3, "[B, H, T]", DT_F32, 0, &a[0]) < 0) goto done;
    n = 1;
    if (arg_import(st, args[1], "out", 3, "[B, H, T]", DT_F32, 1, &a[1]) < 0) goto done;
    n = 2;
    if (check_shape(st, &a[1], a[0].view.shape, "[B, H, T]") < 0) goto done;
    if (check_output(st, &a[1], a, 2) < 0) goto done;
    p.in = a[0].view;
    p.out = a[1].view;
    p.kernel = kernel;
    p.mode = avg ? KVC_POOL_AVG : KVC_POOL_MAX;
    p.num_threads = st->num_threads;
    Py_BEGIN_ALLOW_THREADS
    s = kvc_pool1d(&p);
    Py_END_ALLOW_THREADS
    if (s != KVC_OK) {
        raise_status(st, s, "pool1d");
        goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    args_release(a, n);
    return ret;
}

PyDoc_STRVAR(select_topk_doc, "select_topk(scores, out, k, sinks, window, kv_start)\n--\n\n"
                              "Low-level: see kvcompress.ops.select_topk.");

static PyObject *py_select_topk(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = get_state(m);
    struct kvc_arg a[4]; /* scores, out, k, kv_start */
    struct kvc_select_topk_params p;
    enum kvc_status s;
    int64_t sinks, window, B, H, T, kmax = 0, b, h, want[3];
    int n = 0;
    PyObject *ret = NULL;
    memset(a, 0, sizeof a);
    memset(&p, 0, sizeof p);
    if (check_nargs("select_topk", nargs, 6) < 0) return NULL;
    if (get_int64(st, args[3], "sinks", &sinks) < 0) return NULL;
    if (get_int64(st, args[4], "window", &window) < 0) return NULL;
    if (sinks < 0 || window < 0) {
        raise(st->ValueError, "%s: must be >= 0, got %lld", sinks < 0 ? "sinks" : "window",
              (long long)(sinks < 0 ? sinks : window));
        return NULL;
    }
    if (arg_import(st, args[0], "scores", 3, "[B, H, T]", DT_F32, 0, &a[0]) < 0) goto done;
    n = 1;
    B = a[0].view.shape[0];
    H = a[0].view.shape[1];
    T = a[0].view.shape[2];
    if (PyLong_Check(args[2]) && !PyBool_Check(args[2])) {
        if (get_int64(st, args[2], "k", &p.k_all) < 0) goto done;
        kmax = p.k_all;
        if (kmax < 1 || kmax > T) {
            /* checked even when there are no rows */
            raise(st->ValueError, "k: %lld is outside [1, T] = [1, %lld]", (long long)kmax,
                  (long long)T);
            goto done;
        }
    } else {
        if (PyBool_Check(args[2])) {
            raise(st->TypeError, "k: expected an int or an integer tensor [B, H], got bool");
            goto done;
        }
        if (arg_import(st, args[2], "k", 2, "[B, H]", DT_INDEX, 0, &a[2]) < 0) goto done;
        if (a[2].view.shape[0] != B || a[2].view.shape[1] != H) {
            raise(st->ValueError, "k: expected shape [B, H] = [%lld, %lld], got [%lld, %lld]",
                  (long long)B, (long long)H, (long long)a[2].view.shape[0],
                  (long long)a[2].view.shape[1]);
            goto release_k;
        }
        p.k = a[2].view;
    }
    if (import_kv_start(st, args[5], B, T, &a[3]) < 0) goto release_k;
    n = 4;
    /* every row's k against T and its forced keeps */
    for (b = 0; b < B; b++) {
        int64_t sb = a[3].t ? ((const int64_t *)a[3].view.data)[b * a[3].view.strides[0]] : 0;
        int64_t forced = kvc_select_forced_count(T, sinks, window, sb);
        for (h = 0; h < H; h++) {
            int64_t k = p.k.data ? kvc_load_index(p.k.data, p.k.dtype,
                                                  b * p.k.strides[0] + h * p.k.strides[1])
                                 : p.k_all;
            if (k < 1 || k > T) {
                raise(st->ValueError, "k: %lld at (b=%lld, h=%lld) is outside [1, T] = [1, %lld]",
                      (long long)k, (long long)b, (long long)h, (long long)T);
                goto done;
            }
            if (forced > k) {
                raise(st->ValueError,
                      "k: %lld at (b=%lld, h=%lld) is smaller than the %lld forced keeps "
                      "(sinks=%lld, window=%lld)",
                      (long long)k, (long long)b, (long long)h, (long long)forced,
                      (long long)sinks, (long long)window);
                goto done;
            }
            if (p.k.data && k > kmax) kmax = k;
        }
    }
    if (arg_import(st, args[1], "out", 3, "[B, H, kmax]", DT_I64, 1, &a[1]) < 0) goto done;
    want[0] = B;
    want[1] = H;
    want[2] = kmax;
    if (check_shape(st, &a[1], want, "[B, H, kmax]") < 0) goto done;
    if (check_output(st, &a[1], a, 4) < 0) goto done;
    p.scores = a[0].view;
    p.out = a[1].view;
    p.sinks = sinks;
    p.window = window;
    p.kv_start = a[3].t ? (const int64_t *)a[3].view.data : NULL;
    p.kv_start_stride = a[3].t ? a[3].view.strides[0] : 0;
    p.num_threads = st->num_threads;
    Py_BEGIN_ALLOW_THREADS
    s = kvc_select_topk(&p);
    Py_END_ALLOW_THREADS
    if (s != KVC_OK) {
        raise_status(st, s, "select_topk");
        goto done;
    }
    ret = Py_NewRef(Py_None);
    goto done;
release_k:
    n = 3;
done:
    args_release(a, n);
    return ret;
}

PyDoc_STRVAR(gather_doc, "gather(keys, values, indices, out_keys, out_values)\n--\n\n"
                         "Low-level: see kvcompress.ops.gather.");

static PyObject *py_gather(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = get_state(m);
    struct kvc_arg a[5]; /* keys, values, indices, out_keys, out_values */
    struct kvc_gather_params p;
    enum kvc_status s;
    int64_t want[4], bad_value, bad_pos[KVC_MAX_DIMS];
    int n = 0;
    PyObject *ret = NULL;
    memset(a, 0, sizeof a);
    if (check_nargs("gather", nargs, 5) < 0) return NULL;
    if (arg_import(st, args[0], "keys", 4, "[B, H, T, D]", DT_FLOAT, 0, &a[0]) < 0) goto done;
    n = 1;
    if (arg_import(st, args[1], "values", 4, "[B, H, T, Dv]", DT_FLOAT, 0, &a[1]) < 0) goto done;
    n = 2;
    if (arg_import(st, args[2], "indices", 3, "[B, H, n]", DT_INDEX, 0, &a[2]) < 0) goto done;
    n = 3;
    if (arg_import(st, args[3], "out_keys", 4, "[B, H, n, D]", DT_FLOAT, 1, &a[3]) < 0) goto done;
    n = 4;
    if (arg_import(st, args[4], "out_values", 4, "[B, H, n, Dv]", DT_FLOAT, 1, &a[4]) < 0)
        goto done;
    n = 5;
    {
        const struct kvc_view *k = &a[0].view, *v = &a[1].view, *ix = &a[2].view;
        int i;
        if (v->dtype != k->dtype) {
            raise(st->TypeError, "values: dtype %s does not match keys dtype %s",
                  kvc_dtype_name((enum kvc_dtype)v->dtype), kvc_dtype_name((enum kvc_dtype)k->dtype));
            goto done;
        }
        for (i = 3; i < 5; i++)
            if (a[i].view.dtype != k->dtype) {
                raise(st->TypeError, "%s: dtype %s does not match keys dtype %s", a[i].name,
                      kvc_dtype_name((enum kvc_dtype)a[i].view.dtype),
                      kvc_dtype_name((enum kvc_dtype)k->dtype));
                goto done;
            }
        want[0] = k->shape[0];
        want[1] = k->shape[1];
        want[2] = k->shape[2];
        want[3] = v->shape[3];
        if (check_shape(st, &a[1], want, "[B, H, T, Dv]") < 0) goto done;
        want[2] = ix->shape[2];
        if (check_shape(st, &a[2], want, "[B, H, n]") < 0) goto done;
        want[3] = k->shape[3];
        if (check_shape(st, &a[3], want, "[B, H, n, D]") < 0) goto done;
        want[3] = v->shape[3];
        if (check_shape(st, &a[4], want, "[B, H, n, Dv]") < 0) goto done;
        if (check_output(st, &a[3], a, 5) < 0 || check_output(st, &a[4], a, 5) < 0) goto done;
        if (kvc_indices_check(ix, 0, k->shape[2], &bad_value, bad_pos) != KVC_OK) {
            raise(st->ValueError,
                  "indices: value %lld at [%lld, %lld, %lld] is outside [0, T) = [0, %lld)",
                  (long long)bad_value, (long long)bad_pos[0], (long long)bad_pos[1],
                  (long long)bad_pos[2], (long long)k->shape[2]);
            goto done;
        }
    }
    p.keys = a[0].view;
    p.values = a[1].view;
    p.indices = a[2].view;
    p.out_keys = a[3].view;
    p.out_values = a[4].view;
    p.num_threads = st->num_threads;
    Py_BEGIN_ALLOW_THREADS
    s = kvc_gather(&p);
    Py_END_ALLOW_THREADS
    if (s != KVC_OK) {
        raise_status(st, s, "gather");
        goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    args_release(a, n);
    return ret;
}

/* ------------------------------------------------------------------------ */
/* threads, introspection, test hooks                                       */
/* ------------------------------------------------------------------------ */

static PyObject *py_set_num_threads(PyObject *m, PyObject *arg)
{
    struct kvc_state *st = get_state(m);
    int64_t n;
    if (get_int64(st, arg, "n", &n) < 0) return NULL;
    if (n < 1 || n > 4096) {
        raise(st->ValueError, "n: expected a thread count in [1, 4096], got %lld", (long long)n);
        return NULL;
    }
#ifdef _OPENMP
    st->num_threads = (int)n;
#endif
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *m, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLong(get_state(m)->num_threads);
}

/* (shape, dtype name, DLPack device type, read-only) of any DLPack object,
 * so Python can allocate outputs for producers it does not know. */
static PyObject *py_describe(PyObject *m, PyObject *obj)
{
    struct kvc_state *st = get_state(m);
    struct kvc_arg a;
    PyObject *shape = NULL, *ret = NULL;
    enum kvc_dtype dt;
    char name[96];
    int d;
    if (dl_take(st, obj, "x", &a) < 0) return NULL;
    if (dl_dtype(a.t->dtype, &dt) == 0) snprintf(name, sizeof name, "%s", kvc_dtype_name(dt));
    else dl_dtype_name(a.t->dtype, name, sizeof name);
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
    arg_release(&a);
    return ret;
}

/* Test hook: 1-D dtype conversion through kvc_math.h, so the tests can check
 * the fp16/bf16 rounding every op relies on against NumPy/torch. */
static PyObject *py_cast(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    struct kvc_state *st = get_state(m);
    struct kvc_arg a[2];
    int64_t i, n;
    int na = 0;
    PyObject *ret = NULL;
    memset(a, 0, sizeof a);
    if (check_nargs("_cast", nargs, 2) < 0) return NULL;
    if (arg_import(st, args[0], "src", 1, "[n]", DT_FLOAT, 0, &a[0]) < 0) goto done;
    na = 1;
    if (arg_import(st, args[1], "dst", 1, "[n]", DT_FLOAT, 1, &a[1]) < 0) goto done;
    na = 2;
    if (check_shape(st, &a[1], a[0].view.shape, "[n]") < 0) goto done;
    if (check_output(st, &a[1], a, 2) < 0) goto done;
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
    args_release(a, na);
    return ret;
}

/* Test/benchmark hook: use (1) or bypass (0) the DLPack C exchange fast
 * path; returns the previous setting. */
static PyObject *py_use_exchange_api(PyObject *m, PyObject *arg)
{
    struct kvc_state *st = get_state(m);
    int prev = st->use_xapi, v = PyObject_IsTrue(arg);
    if (v < 0) return NULL;
    st->use_xapi = v;
    return PyBool_FromLong(prev);
}

static PyMethodDef kvc_methods[] = {
    {"window_scores", (PyCFunction)(void (*)(void))py_window_scores, METH_FASTCALL,
     window_scores_doc},
    {"vector_norm", (PyCFunction)(void (*)(void))py_vector_norm, METH_FASTCALL, vector_norm_doc},
    {"pool1d", (PyCFunction)(void (*)(void))py_pool1d, METH_FASTCALL, pool1d_doc},
    {"select_topk", (PyCFunction)(void (*)(void))py_select_topk, METH_FASTCALL, select_topk_doc},
    {"gather", (PyCFunction)(void (*)(void))py_gather, METH_FASTCALL, gather_doc},
    {"set_num_threads", py_set_num_threads, METH_O,
     "set_num_threads(n)\n--\n\nThreads used by every op (no effect without OpenMP)."},
    {"get_num_threads", py_get_num_threads, METH_NOARGS,
     "get_num_threads()\n--\n\nThreads used by every op (1 without OpenMP)."},
    {"_describe", py_describe, METH_O,
     "_describe(x)\n--\n\n(shape, dtype, dlpack_device_type, read_only) of a DLPack object."},
    {"_use_exchange_api", py_use_exchange_api, METH_O,
     "_use_exchange_api(flag)\n--\n\nTest hook: toggle the DLPack C exchange fast path."},
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
    struct kvc_state *st = get_state(m);
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
    if (PyModule_AddObjectRef(m, "has_cuda", Py_False) < 0) return -1;
    if (PyModule_AddIntConstant(m, "DLPACK_MAJOR_VERSION", DLPACK_MAJOR_VERSION) < 0) return -1;
    if (PyModule_AddIntConstant(m, "DLPACK_MINOR_VERSION", DLPACK_MINOR_VERSION) < 0) return -1;
    return 0;
}

static int kvc_traverse(PyObject *m, visitproc visit, void *arg)
{
    struct kvc_state *st = get_state(m);
    int i;
    Py_VISIT(st->Error);
    Py_VISIT(st->ValueError);
    Py_VISIT(st->TypeError);
    for (i = 0; i < XAPI_CACHE; i++) Py_VISIT(st->xapi_type[i]);
    return 0;
}

static int kvc_clear(PyObject *m)
{
    struct kvc_state *st = get_state(m);
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
