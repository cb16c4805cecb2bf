/*
 * module_spec.h - declarative argument specs of the bindings and the one
 * interpreter that validates them (module_spec.c).
 *
 * An op describes each positional argument once: its kind, and for a tensor
 * its rank, shape, dtypes and writability; for a number its range. The
 * interpreter imports and checks them all in one place, so the bindings
 * keep only what a table cannot say (cross-argument rules with their own
 * messages, value scans) and the C op call.
 *
 * Shapes: `dims` is the shape as messages show it ("[B, Hkv, Tk]"). Its
 * names bind sizes: the first tensor (in spec order) that names a size sets
 * it, every later one must match ("out: expected shape [B, Hkv, Tk] = [2, 2,
 * 9], got [2, 2, 8]"). Dims in `unbound` bind nothing: the binding checks
 * those sizes itself, with its own message.
 *
 * A binding calls kvc_py_call_parse (count, numbers, tensor imports), then
 * its own cross-argument rules on the imported views, then
 * kvc_py_call_finish (shared sizes, kv_start, output aliasing): the order
 * the hand-written checks had, so the first error reported is the same.
 */
#ifndef KVC_MODULE_SPEC_H
#define KVC_MODULE_SPEC_H

#include "module.h"

#define KVC_PY_MAX_ARGS 32
#define KVC_PY_MAX_SYMS 12

enum kvc_py_kind {
    KVC_PY_TENSOR,   /* a DLPack tensor */
    KVC_PY_OPTIONAL, /* a DLPack tensor or None */
    KVC_PY_KV_START, /* None or int64 [B], values in [0, size `limit`] */
    KVC_PY_INT,      /* a Python int (or __index__) in [lo, hi] */
    KVC_PY_FLOAT,    /* a real number in [flo, fhi]; both 0: any value finite as a float32 */
    KVC_PY_BOOL,     /* True or False */
    KVC_PY_CUSTOM    /* parsed by the binding (e.g. an int or a tensor); a tensor
                        it imports into a[] gets its dims checked like the others */
};

struct kvc_py_spec {
    const char *name;
    enum kvc_py_kind kind;
    int ndim;          /* tensors */
    const char *dims;  /* tensors; for KVC_PY_KV_START, the size name of its limit */
    unsigned dtypes;   /* tensors: DT_* mask */
    int out;           /* tensors: written by the op (writable, no aliasing) */
    unsigned unbound;  /* tensors: bit d set = dim d binds no size */
    int like;          /* tensors: 1 + index of the argument whose dtype it must have; 0 none */
    int64_t lo, hi;    /* KVC_PY_INT */
    double flo, fhi;   /* KVC_PY_FLOAT (both 0: any value) */
};

/* Spec entries (designated, so every other field is 0). */
#define KVC_PY_IN(nm, nd, dm, dt) {.name = nm, .kind = KVC_PY_TENSOR, .ndim = nd, .dims = dm, .dtypes = dt}
#define KVC_PY_IN_FREE(nm, nd, dm, dt, free)                                                 \
    {.name = nm, .kind = KVC_PY_TENSOR, .ndim = nd, .dims = dm, .dtypes = dt, .unbound = free}
#define KVC_PY_OPT(nm, nd, dm, dt) {.name = nm, .kind = KVC_PY_OPTIONAL, .ndim = nd, .dims = dm, .dtypes = dt}
#define KVC_PY_OUT(nm, nd, dm, dt)                                                           \
    {.name = nm, .kind = KVC_PY_TENSOR, .ndim = nd, .dims = dm, .dtypes = dt, .out = 1}
/* same dtype as argument `of` */
#define KVC_PY_IN_LIKE(nm, nd, dm, of)                                                       \
    {.name = nm, .kind = KVC_PY_TENSOR, .ndim = nd, .dims = dm, .dtypes = DT_FLOAT, .like = (of) + 1}
#define KVC_PY_OUT_LIKE(nm, nd, dm, of)                                                      \
    {.name = nm, .kind = KVC_PY_TENSOR, .ndim = nd, .dims = dm, .dtypes = DT_FLOAT, .out = 1, .like = (of) + 1}
#define KVC_PY_OUT_FREE(nm, nd, dm, dt, free)                                                \
    {.name = nm, .kind = KVC_PY_TENSOR, .ndim = nd, .dims = dm, .dtypes = dt, .out = 1, .unbound = free}
#define KVC_PY_CUSTOM_ARG(nm, nd, dm, dt) {.name = nm, .kind = KVC_PY_CUSTOM, .ndim = nd, .dims = dm, .dtypes = dt}
#define KVC_PY_OPT_OUT(nm, nd, dm, dt)                                                       \
    {.name = nm, .kind = KVC_PY_OPTIONAL, .ndim = nd, .dims = dm, .dtypes = dt, .out = 1}
#define KVC_PY_START(limit) {.name = "kv_start", .kind = KVC_PY_KV_START, .dims = limit}
#define KVC_PY_INT_IN(nm, l, h) {.name = nm, .kind = KVC_PY_INT, .lo = l, .hi = h}
#define KVC_PY_FLOAT_IN(nm, l, h) {.name = nm, .kind = KVC_PY_FLOAT, .flo = l, .fhi = h}
#define KVC_PY_FINITE(nm) {.name = nm, .kind = KVC_PY_FLOAT}
#define KVC_PY_FLAG(nm) {.name = nm, .kind = KVC_PY_BOOL}

/* One parsed call: tensors in a[] (t == NULL for None), numbers in i[]/f[],
 * both indexed like the arguments. */
struct kvc_py_call {
    const struct kvc_py_spec *spec;
    int n;
    struct kvc_arg a[KVC_PY_MAX_ARGS];
    int64_t i[KVC_PY_MAX_ARGS];
    double f[KVC_PY_MAX_ARGS];
    int nsym;
    const char *sym[KVC_PY_MAX_SYMS];
    int sym_len[KVC_PY_MAX_SYMS];
    int64_t size[KVC_PY_MAX_SYMS];
};

/* Check the argument count, then every argument of `spec` (n of them):
 * numbers first, then tensors (device, dtype, rank, writability), in order.
 * 0, or -1 with an exception set (the call is released). */
int kvc_py_call_parse(struct kvc_state *st, const char *fn, const struct kvc_py_spec *spec, int n,
                      PyObject *const *args, Py_ssize_t nargs, struct kvc_py_call *c);
/* Dtypes shared (`like`), sizes shared by name, kv_start, outputs; 0, or -1
 * with an exception set (the caller still releases the call). */
int kvc_py_call_finish(struct kvc_state *st, struct kvc_py_call *c);
void kvc_py_call_release(struct kvc_py_call *c);
/* Size bound to `name` ("T"), -1 if no tensor named it. */
int64_t kvc_py_call_size(const struct kvc_py_call *c, const char *name);
/* kv_start argument k as the op's (pointer, stride) pair, NULL/0 for None. */
const int64_t *kvc_py_call_i64(const struct kvc_py_call *c, int k, int64_t *stride);

/* The GQA rule every attention binding states: the `name` tensor's Hq query
 * heads a multiple of Hkv (0 heads only with 0 kv heads); 0, or -1 with
 * ValueError set. */
int kvc_py_check_group(struct kvc_state *st, const char *name, int64_t Hq, int64_t Hkv);
/* A decode-only op (`what` says which) given q queries per row: 0 when q is
 * 1, else -1 with ValueError set. */
int kvc_py_check_one_query(struct kvc_state *st, const char *what, int64_t q);

#endif /* KVC_MODULE_SPEC_H */
