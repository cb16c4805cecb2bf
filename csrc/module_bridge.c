/*
 * module_bridge.c - DLPack import and argument validation for kvcompress._C.
 *
 * Takes tensors over from their producer (versioned or legacy capsules, or
 * torch's C exchange table), checks dtype, device, rank, shape and aliasing
 * once, and turns them into struct kvc_view for the C ops.
 */
#include "module.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#ifdef KVC_WITH_CUDA
#include "cuda/kvc_cuda.h"
#endif

struct kvc_state *kvc_py_get_state(PyObject *module)
{
    return (struct kvc_state *)PyModule_GetState(module);
}

/* Always returns -1 so call sites can `return kvc_py_raise(...)`. */
int kvc_py_raise(PyObject *type, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    PyErr_FormatV(type, fmt, ap);
    va_end(ap);
    return -1;
}

/* Raise `type` with the pending exception as its __cause__ (`raise X from e`),
 * so a producer's own __dlpack__ failure stays visible. */
int kvc_py_raise_from(PyObject *type, const char *fmt, ...)
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

int kvc_py_raise_status(struct kvc_state *st, enum kvc_status s, const char *op)
{
    if (s == KVC_ERR_NAN) return kvc_py_raise(st->ValueError, "scores: contains NaN");
    if (s == KVC_ERR_INVALID) return kvc_py_raise(st->ValueError, "%s: invalid arguments", op);
    if (s == KVC_ERR_UNSUPPORTED) return kvc_py_raise(st->TypeError, "%s: unsupported input", op);
    return kvc_py_raise(st->Error, "%s: internal error (%s)", op, kvc_status_str(s));
}

/* ------------------------------------------------------------------------ */
/* DLPack import                                                            */
/* ------------------------------------------------------------------------ */



/* Call the producer's deleter; needs the GIL (NumPy's deleter DECREFs).
 * A deleter may run Python code, which must not see (or clobber) the error
 * we are about to raise, so a pending exception is parked around it. */
void kvc_py_arg_release(struct kvc_arg *a)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *exc;
#else
    PyObject *et, *ev, *tb;
#endif
    PyMem_RawFree(a->host);
    a->host = NULL;
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

void kvc_py_args_release(struct kvc_arg *a, int n)
{
    int i;
    for (i = 0; i < n; i++) kvc_py_arg_release(&a[i]);
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
int kvc_py_dl_take(struct kvc_state *st, PyObject *obj, const char *name, struct kvc_arg *a)
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
                return kvc_py_raise_from(st->ValueError, "%s: DLPack export of %.100s failed", name,
                                  Py_TYPE(obj)->tp_name);
            }
            a->mv = mv;
            if (mv->version.major != DLPACK_MAJOR_VERSION) {
                unsigned major = mv->version.major;
                kvc_py_arg_release(a);
                return kvc_py_raise(st->ValueError,
                             "%s: DLPack major version %u is not supported (expected %d)", name,
                             major, DLPACK_MAJOR_VERSION);
            }
            a->t = &mv->dl_tensor;
            a->read_only = (mv->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0;
            /* exported without a sync: the op must run on the producer's
             * current stream, where the data is (or will be) ready */
            if (a->t->device.device_type == kDLCUDA && api->current_work_stream &&
                api->current_work_stream(kDLCUDA, a->t->device.device_id, &a->stream) != 0) {
                kvc_py_arg_release(a);
                return kvc_py_raise_from(st->ValueError, "%s: the producer did not say which CUDA "
                                         "stream it works on", name);
            }
            return 0;
        }
    }
    meth = PyObject_GetAttrString(obj, "__dlpack__");
    if (meth == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
        PyErr_Clear();
        return kvc_py_raise(st->TypeError,
                     "%s: expected a tensor or array supporting DLPack (__dlpack__), got %.100s",
                     name, Py_TYPE(obj)->tp_name);
    }
#ifdef KVC_WITH_CUDA
    /* A CUDA producer makes the data ready on the consumer's stream; without
     * a C exchange table we cannot learn its current stream, so we ask for
     * the legacy default stream (1) and run there. */
    if (PyObject_HasAttrString(obj, "__dlpack_device__")) {
        PyObject *dev = PyObject_CallMethod(obj, "__dlpack_device__", NULL);
        long type = -1;
        if (dev && PyTuple_Check(dev) && PyTuple_GET_SIZE(dev) == 2)
            type = PyLong_AsLong(PyTuple_GET_ITEM(dev, 0));
        Py_XDECREF(dev);
        if (type == -1 && PyErr_Occurred()) {
            Py_DECREF(meth);
            return kvc_py_raise_from(st->ValueError, "%s: __dlpack_device__() of %.100s failed",
                                     name, Py_TYPE(obj)->tp_name);
        }
        a->legacy = type == kDLCUDA;
    }
    if (a->legacy)
        kwargs = Py_BuildValue("{s:(ii),s:i}", "max_version", DLPACK_MAJOR_VERSION,
                               DLPACK_MINOR_VERSION, "stream", 1);
    else
#endif
    kwargs = Py_BuildValue("{s:(ii)}", "max_version", DLPACK_MAJOR_VERSION,
                           DLPACK_MINOR_VERSION);
    empty = PyTuple_New(0);
    if (kwargs && empty) cap = PyObject_Call(meth, empty, kwargs);
    Py_XDECREF(kwargs);
    Py_XDECREF(empty);
    if (cap == NULL && PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear();
        if (a->legacy) {
            kwargs = Py_BuildValue("{s:i}", "stream", 1);
            empty = PyTuple_New(0);
            if (kwargs && empty) cap = PyObject_Call(meth, empty, kwargs);
            Py_XDECREF(kwargs);
            Py_XDECREF(empty);
        } else {
            cap = PyObject_CallNoArgs(meth);
        }
    }
    if (a->legacy) a->stream = (void *)1; /* cudaStreamLegacy */
    Py_DECREF(meth);
    if (cap == NULL)
        return kvc_py_raise_from(st->ValueError, "%s: __dlpack__() of %.100s failed", name,
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
            kvc_py_arg_release(a); /* the deleter is the one field safe to touch */
            return kvc_py_raise(st->ValueError, "%s: DLPack major version %u is not supported (expected %d)",
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
    kvc_py_raise(st->TypeError, "%s: __dlpack__() returned %.100s, not an unused DLPack capsule", name,
          Py_TYPE(cap)->tp_name);
    Py_DECREF(cap);
    return -1;
}

int kvc_py_dl_dtype(DLDataType dt, enum kvc_dtype *out)
{
    if (dt.lanes != 1) return -1;
    if (dt.code == kDLFloat && dt.bits == 32) *out = KVC_F32;
    else if (dt.code == kDLFloat && dt.bits == 16) *out = KVC_F16;
    else if (dt.code == kDLBfloat && dt.bits == 16) *out = KVC_BF16;
    else if (dt.code == kDLInt && dt.bits == 32) *out = KVC_I32;
    else if (dt.code == kDLInt && dt.bits == 64) *out = KVC_I64;
    else if (dt.code == kDLUInt && dt.bits == 8) *out = KVC_U8;
    else return -1;
    return 0;
}

void kvc_py_dl_dtype_name(DLDataType dt, char *buf, size_t n)
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
    for (d = KVC_F32; d <= KVC_U8; d++) total += (mask >> d) & 1u;
    for (d = KVC_F32; d <= KVC_U8; d++) {
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
#ifdef KVC_WITH_CUDA
    if (t->device.device_type == kDLCUDAManaged)
        return kvc_py_raise(st->ValueError, "%s: CUDA managed memory is not supported; use a "
                            "device tensor", a->name);
    if (t->device.device_type != kDLCPU && t->device.device_type != kDLCUDA)
#else
    if (t->device.device_type == kDLCUDA || t->device.device_type == kDLCUDAManaged)
        return kvc_py_raise(st->ValueError,
                     "%s: CUDA tensors need a CUDA build of kvcompress (KVCOMPRESS_CUDA=1)",
                     a->name);
    if (t->device.device_type != kDLCPU)
#endif
        return kvc_py_raise(st->ValueError,
                     "%s: tensors on DLPack device type %d are not supported (CPU only)",
                     a->name, (int)t->device.device_type);
    if (kvc_py_dl_dtype(t->dtype, &dt) < 0 || !((dtypes >> dt) & 1u)) {
        char want[64];
        kvc_py_dl_dtype_name(t->dtype, buf, sizeof buf);
        dtype_set_name(dtypes, want, sizeof want);
        return kvc_py_raise(st->TypeError, "%s: expected dtype %s, got %s", a->name, want, buf);
    }
    if (t->ndim != ndim)
        return kvc_py_raise(st->ValueError, "%s: expected a %d-D tensor %s, got %d-D", a->name, ndim,
                     dims, (int)t->ndim);
    if (is_out && a->read_only)
        return kvc_py_raise(st->ValueError, "%s: output is read-only", a->name);
    if (t->data == NULL) {
        for (d = 0; d < ndim; d++)
            if (t->shape[d] == 0) break;
        if (d == ndim) return kvc_py_raise(st->ValueError, "%s: tensor has a NULL data pointer", a->name);
    }
    a->dev_type = (int32_t)t->device.device_type;
    a->dev_id = t->device.device_id;
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
                return kvc_py_raise(st->ValueError, "%s: negative dimension", a->name);
            /* legacy producers may send NULL strides: compact row-major */
            a->view.strides[d] = t->strides ? t->strides[d]
                                 : d == ndim - 1 ? 1
                                                 : a->view.strides[d + 1] * a->view.shape[d + 1];
        }
    }
    return 0;
}

int kvc_py_arg_import(struct kvc_state *st, PyObject *obj, const char *name, int ndim,
                      const char *dims, unsigned dtypes, int is_out, struct kvc_arg *a)
{
    if (kvc_py_dl_take(st, obj, name, a) < 0) return -1;
    if (arg_check(st, a, ndim, dims, dtypes, is_out) < 0) {
        kvc_py_arg_release(a);
        return -1;
    }
    return 0;
}

int64_t kvc_py_view_numel(const struct kvc_view *v)
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
    if (kvc_py_view_numel(v) == 0) return 0;
    for (d = 0; d < v->ndim; d++) {
        int64_t ext = v->strides[d] * (v->shape[d] - 1);
        if (ext < 0) neg += ext;
        else pos += ext;
    }
    *lo = (uintptr_t)((char *)v->data + neg * es);
    *hi = (uintptr_t)((char *)v->data + (pos + 1) * es);
    return 1;
}

const struct kvc_view *kvc_py_arg_host(struct kvc_state *st, struct kvc_arg *a)
{
#ifdef KVC_WITH_CUDA
    uintptr_t lo, hi;
    enum kvc_status s;
    int prev = 0;
    if (a->dev_type != kDLCUDA) return &a->view;
    if (a->host) return &a->host_view;
    a->host_view = a->view;
    if (!view_span(&a->view, &lo, &hi)) return &a->host_view;
    a->host = PyMem_RawMalloc((size_t)(hi - lo));
    if (a->host == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    s = kvc_cuda_set_device(a->dev_id, &prev);
    if (s == KVC_OK) {
        Py_BEGIN_ALLOW_THREADS
        s = kvc_cuda_copy_to_host(a->host, (const void *)lo, (size_t)(hi - lo), a->stream);
        Py_END_ALLOW_THREADS
        kvc_cuda_set_device(prev, NULL);
    }
    if (s != KVC_OK) {
        kvc_py_raise(st->Error, "%s: reading it from the device failed: %s", a->name,
                     kvc_cuda_last_error());
        return NULL;
    }
    a->host_view.data = (char *)a->host + ((uintptr_t)a->view.data - lo);
    return &a->host_view;
#else
    (void)st;
    return &a->view;
#endif
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
    if (kvc_py_view_numel(v) == 0) return 0;
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
int kvc_py_check_output(struct kvc_state *st, const struct kvc_arg *out,
                        const struct kvc_arg *others, int n_others)
{
    int i;
    if (view_self_overlaps(&out->view))
        return kvc_py_raise(st->ValueError, "%s: output has overlapping elements (e.g. a broadcast view)",
                     out->name);
    for (i = 0; i < n_others; i++) {
        if (others[i].t == NULL || &others[i] == out) continue;
        if (views_overlap(&out->view, &others[i].view))
            return kvc_py_raise(st->ValueError, "%s: output must not overlap %s", out->name,
                         others[i].name);
    }
    return 0;
}

int kvc_py_check_shape(struct kvc_state *st, const struct kvc_arg *a, const int64_t *want,
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
            return kvc_py_raise(st->ValueError, "%s: expected shape %s = %s, got %s", a->name, dims,
                         exp, got);
        }
    return 0;
}

int kvc_py_check_nargs(const char *fn, Py_ssize_t nargs, Py_ssize_t want)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd positional arguments (%zd given)", fn, want,
                     nargs);
        return -1;
    }
    return 0;
}

int kvc_py_get_int64(struct kvc_state *st, PyObject *o, const char *name, int64_t *out)
{
    long long v;
    *out = 0;
    if (!PyLong_Check(o) || PyBool_Check(o))
        return kvc_py_raise(st->TypeError, "%s: expected an int, got %.100s", name, Py_TYPE(o)->tp_name);
    v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) return kvc_py_raise_from(st->ValueError, "%s: out of range", name);
    *out = (int64_t)v;
    return 0;
}

int kvc_py_get_bool(struct kvc_state *st, PyObject *o, const char *name, int *out)
{
    *out = 0;
    if (!PyBool_Check(o))
        return kvc_py_raise(st->TypeError, "%s: expected a bool, got %.100s", name, Py_TYPE(o)->tp_name);
    *out = o == Py_True;
    return 0;
}

int kvc_py_check_qk(struct kvc_state *st, const struct kvc_view *q, const struct kvc_view *k)
{
    if (q->dtype != k->dtype)
        return kvc_py_raise(st->TypeError, "keys: dtype %s does not match queries dtype %s",
                            kvc_dtype_name((enum kvc_dtype)k->dtype), kvc_dtype_name((enum kvc_dtype)q->dtype));
    if (k->shape[0] != q->shape[0])
        return kvc_py_raise(st->ValueError, "keys: batch size %lld does not match queries (%lld)",
                            (long long)k->shape[0], (long long)q->shape[0]);
    if (k->shape[3] != q->shape[3])
        return kvc_py_raise(st->ValueError, "keys: head dim %lld does not match queries (%lld)",
                            (long long)k->shape[3], (long long)q->shape[3]);
    if (k->shape[1] == 0 ? q->shape[1] != 0 : (q->shape[1] == 0 || q->shape[1] % k->shape[1] != 0))
        return kvc_py_raise(st->ValueError,
                            "queries: %lld heads is not a positive multiple of the %lld kv heads of keys",
                            (long long)q->shape[1], (long long)k->shape[1]);
    return 0;
}

void *kvc_py_scratch(size_t bytes)
{
    void *p = PyMem_RawMalloc(bytes); /* a 0-byte request still returns a pointer */
    if (p == NULL) PyErr_NoMemory();
    return p;
}
