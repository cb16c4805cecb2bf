/*
 * module.h - shared by the files of the CPython extension kvcompress._C
 * (module*.c, the only files that touch Python): module state, the
 * DLPack argument type and the import/validation helpers of module_bridge.c.
 *
 * Convention: every helper that can fail returns -1 (or NULL) with a Python
 * exception set, 0 (or a new reference) on success.
 */
#ifndef KVC_MODULE_H
#define KVC_MODULE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "dlpack.h"
#include "kvc.h"

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

#define DT_FLOAT ((1u << KVC_F32) | (1u << KVC_F16) | (1u << KVC_BF16))
#define DT_F32 (1u << KVC_F32)
#define DT_INDEX ((1u << KVC_I32) | (1u << KVC_I64))
#define DT_I64 (1u << KVC_I64)
#define DT_U8 (1u << KVC_U8)

/* An argument taken over from its producer. Exactly one of mv / ml is set
 * while we own the managed tensor; arg_release hands it back. */
struct kvc_arg {
    const char *name;
    DLManagedTensorVersioned *mv;
    DLManagedTensor *ml;
    DLTensor *t;
    int read_only;
    struct kvc_view view;
    int32_t dev_type;  /* DLDeviceType: kDLCPU or (CUDA builds) kDLCUDA */
    int32_t dev_id;
    void *stream;      /* CUDA: the stream the data is ready on (cudaStream_t) */
    int legacy;        /* came through __dlpack__(stream=1): wait after the op */
    void *host;        /* host mirror of a CUDA tensor for boundary checks */
    struct kvc_view host_view;
};

/* What the boundary checks read: the view itself on the CPU, a host copy
 * (made once, freed with the argument) of a CUDA tensor. NULL with an
 * exception set on failure. */
const struct kvc_view *kvc_py_arg_host(struct kvc_state *st, struct kvc_arg *a);
int kvc_py_arg_import(struct kvc_state *st, PyObject *obj, const char *name, int ndim, const char *dims, unsigned dtypes, int is_out, struct kvc_arg *a);
void kvc_py_arg_release(struct kvc_arg *a);
void kvc_py_args_release(struct kvc_arg *a, int n);
int kvc_py_check_nargs(const char *fn, Py_ssize_t nargs, Py_ssize_t want);
int kvc_py_check_output(struct kvc_state *st, const struct kvc_arg *out, const struct kvc_arg *others, int n_others);
int kvc_py_check_shape(struct kvc_state *st, const struct kvc_arg *a, const int64_t *want, const char *dims);
void kvc_py_dl_dtype_name(DLDataType dt, char *buf, size_t n);
int kvc_py_dl_dtype(DLDataType dt, enum kvc_dtype *out);
int kvc_py_dl_take(struct kvc_state *st, PyObject *obj, const char *name, struct kvc_arg *a);
int kvc_py_get_int64(struct kvc_state *st, PyObject *o, const char *name, int64_t *out);
/* A flag: True or False only, so no user __bool__ (which may raise anything,
 * e.g. torch's for a many-element tensor) runs at the boundary. */
int kvc_py_get_bool(struct kvc_state *st, PyObject *o, const char *name, int *out);
struct kvc_state *kvc_py_get_state(PyObject *module);
int kvc_py_raise_from(PyObject *type, const char *fmt, ...);
int kvc_py_raise_status(struct kvc_state *st, enum kvc_status s, const char *op);
/* Both raise helpers always return -1, for `return kvc_py_raise(...)`. */
int kvc_py_raise(PyObject *type, const char *fmt, ...);
int64_t kvc_py_view_numel(const struct kvc_view *v);

/* queries [B, Hq, Tq, D] vs keys [B, Hkv, Tk, D]: dtype, batch, head dim, GQA. */
int kvc_py_check_qk(struct kvc_state *st, const struct kvc_view *q, const struct kvc_view *k);

/* Scratch for a C op (freed with PyMem_RawFree); NULL with MemoryError set. */
void *kvc_py_scratch(size_t bytes);

/* One op on both backends, for kvc_py_run. The adapters cast the params
 * struct back to the op's own type (KVC_PY_OP_* in module_run.h). */
struct kvc_py_op {
    const char *name;
    enum kvc_status (*cpu)(const void *p);
    size_t (*cpu_scratch)(const void *p);  /* NULL: the op takes no scratch */
    enum kvc_status (*cuda)(const void *p, void *stream); /* NULL: CPU-only build */
    size_t (*cuda_scratch)(const void *p); /* NULL: no workspace */
    const char *nan_msg;                   /* KVC_ERR_NAN message; NULL: the default */
};

/* Run op on the device its arguments live on (all of a[0..n) with a tensor
 * must share it), with the GIL released: CPU scratch from the heap, CUDA
 * workspace stream-ordered on the tensors' stream. scratch/scratch_bytes
 * point into p; NULL when this call needs none. 0, or -1 with an exception. */
int kvc_py_run(struct kvc_state *st, const struct kvc_py_op *op, void *p, void **scratch,
               size_t *scratch_bytes, struct kvc_arg *a, int n);

/* Method tables of the op files, added to the module at init. */
extern PyMethodDef kvc_py_core_methods[];
extern PyMethodDef kvc_py_attention_methods[];
extern PyMethodDef kvc_py_merge_methods[];
extern PyMethodDef kvc_py_global_methods[];
extern PyMethodDef kvc_py_budget_methods[];
extern PyMethodDef kvc_py_quant_methods[];
extern PyMethodDef kvc_py_packed_attention_methods[];
extern PyMethodDef kvc_py_pages_methods[];
extern PyMethodDef kvc_py_lsh_methods[];
extern PyMethodDef kvc_py_minicache_methods[];
extern PyMethodDef kvc_py_keyformer_methods[];
extern PyMethodDef kvc_py_lagkv_methods[];
extern PyMethodDef kvc_py_span_methods[];
extern PyMethodDef kvc_py_keep_rows_methods[];
extern PyMethodDef kvc_py_kvcrush_methods[];
extern PyMethodDef kvc_py_kvmerger_methods[];
extern PyMethodDef kvc_py_actqkv_methods[];
extern PyMethodDef kvc_py_layerbudget_methods[];
extern PyMethodDef kvc_py_fastgen_methods[];

#endif /* KVC_MODULE_H */
