/*
 * module_spec.c - the interpreter of the bindings' argument specs
 * (module_spec.h): numbers, tensors, shared sizes and output aliasing,
 * checked once, with messages that name the argument.
 */
#include "module_spec.h"

#include <math.h>
#include <string.h>

/* ------------------------------------------------------------------------ */
/* sizes named by the dims strings                                          */
/* ------------------------------------------------------------------------ */

/* The name of dimension d in "[B, Hkv, Tk]" (start and length), 0 if the
 * string has fewer. */
static int dim_name(const char *dims, int d, const char **name, int *len)
{
    const char *s = dims;
    int i = 0;
    if (dims == NULL || *s != '[') return 0;
    s++;
    for (;;) {
        const char *e;
        while (*s == ' ') s++;
        e = s;
        while (*e && *e != ',' && *e != ']') e++;
        if (i == d) {
            *name = s;
            *len = (int)(e - s);
            while (*len > 0 && s[*len - 1] == ' ') (*len)--;
            return *len > 0;
        }
        if (*e != ',') return 0;
        s = e + 1;
        i++;
    }
}

static int sym_find(const struct kvc_py_call *c, const char *name, int len)
{
    int k;
    for (k = 0; k < c->nsym; k++)
        if (c->sym_len[k] == len && strncmp(c->sym[k], name, (size_t)len) == 0) return k;
    return -1;
}

int64_t kvc_py_call_size(const struct kvc_py_call *c, const char *name)
{
    int k = sym_find(c, name, (int)strlen(name));
    return k < 0 ? -1 : c->size[k];
}

/* Bind or check the named sizes of tensor argument k. */
static int bind_shape(struct kvc_state *st, struct kvc_py_call *c, int k)
{
    const struct kvc_arg *a = &c->a[k];
    int64_t want[KVC_MAX_DIMS];
    int d, mismatch = 0;
    for (d = 0; d < a->view.ndim; d++) {
        const char *name;
        int len, s;
        want[d] = a->view.shape[d];
        if ((c->spec[k].unbound >> d) & 1u || !dim_name(c->spec[k].dims, d, &name, &len)) continue;
        s = sym_find(c, name, len);
        if (s >= 0) {
            want[d] = c->size[s];
            mismatch |= want[d] != a->view.shape[d];
        } else if (c->nsym < KVC_PY_MAX_SYMS) {
            c->sym[c->nsym] = name;
            c->sym_len[c->nsym] = len;
            c->size[c->nsym++] = a->view.shape[d];
        }
    }
    return mismatch ? kvc_py_check_shape(st, a, want, c->spec[k].dims) : 0;
}

/* ------------------------------------------------------------------------ */
/* numbers                                                                  */
/* ------------------------------------------------------------------------ */

static int parse_int(struct kvc_state *st, const struct kvc_py_spec *s, PyObject *o, int64_t *v)
{
    if (kvc_py_get_int64(st, o, s->name, v) < 0) return -1;
    if (*v >= s->lo && *v <= s->hi) return 0;
    if (s->hi == s->lo + 1)
        return kvc_py_raise(st->ValueError, "%s: expected %lld or %lld, got %lld", s->name, (long long)s->lo,
                            (long long)s->hi, (long long)*v);
    if (s->hi == INT64_MAX)
        return kvc_py_raise(st->ValueError, "%s: must be >= %lld, got %lld", s->name, (long long)s->lo,
                            (long long)*v);
    return kvc_py_raise(st->ValueError, "%s: expected a value in [%lld, %lld], got %lld", s->name,
                        (long long)s->lo, (long long)s->hi, (long long)*v);
}

static int parse_float(struct kvc_state *st, const struct kvc_py_spec *s, PyObject *o, double *v)
{
    if (PyBool_Check(o) || !(PyFloat_Check(o) || PyLong_Check(o)))
        return kvc_py_raise(st->TypeError, "%s: expected a float, got %.100s", s->name, Py_TYPE(o)->tp_name);
    *v = PyFloat_AsDouble(o);
    if (*v == -1.0 && PyErr_Occurred()) return kvc_py_raise_from(st->ValueError, "%s: out of range", s->name);
    if (s->flo == 0.0 && s->fhi == 0.0) {
        /* the ops take these as fp32: a double past FLT_MAX would turn into inf there */
        if (!isfinite(*v) || !isfinite((float)*v))
            return kvc_py_raise(st->ValueError, "%s: must be finite (in float32), got %R", s->name, o);
    } else if (!(*v >= s->flo && *v <= s->fhi)) {
        char lo[32], hi[32];
        PyOS_snprintf(lo, sizeof lo, "%g", s->flo);
        PyOS_snprintf(hi, sizeof hi, "%g", s->fhi);
        return kvc_py_raise(st->ValueError, "%s: expected a value in [%s, %s], got %R", s->name, lo, hi, o);
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* the interpreter                                                          */
/* ------------------------------------------------------------------------ */

static int is_tensor(enum kvc_py_kind k)
{
    return k == KVC_PY_TENSOR || k == KVC_PY_OPTIONAL || k == KVC_PY_KV_START;
}

/* kv_start values against the size it indexes into, once B is known. */
static int check_kv_start(struct kvc_state *st, struct kvc_py_call *c, int k)
{
    const struct kvc_view *hv;
    const int64_t limit = kvc_py_call_size(c, c->spec[k].dims);
    int64_t b;
    hv = kvc_py_arg_host(st, &c->a[k]);
    if (hv == NULL) return -1;
    for (b = 0; b < hv->shape[0]; b++) {
        int64_t v = ((const int64_t *)hv->data)[b * hv->strides[0]];
        if (v < 0 || v > limit)
            return kvc_py_raise(st->ValueError, "kv_start: value %lld at batch %lld is outside [0, %lld]",
                                (long long)v, (long long)b, (long long)limit);
    }
    return 0;
}

int kvc_py_call_parse(struct kvc_state *st, const char *fn, const struct kvc_py_spec *spec, int n,
                      PyObject *const *args, Py_ssize_t nargs, struct kvc_py_call *c)
{
    int k;
    memset(c, 0, sizeof *c);
    c->spec = spec;
    c->n = n;
    if (kvc_py_check_nargs(fn, nargs, n) < 0) return -1;
    for (k = 0; k < n; k++) {
        const struct kvc_py_spec *s = &spec[k];
        int b;
        if (s->kind == KVC_PY_INT && parse_int(st, s, args[k], &c->i[k]) < 0) return -1;
        if (s->kind == KVC_PY_FLOAT && parse_float(st, s, args[k], &c->f[k]) < 0) return -1;
        if (s->kind == KVC_PY_BOOL) {
            if (kvc_py_get_bool(st, args[k], s->name, &b) < 0) return -1;
            c->i[k] = b;
        }
    }
    for (k = 0; k < n; k++) {
        const struct kvc_py_spec *s = &spec[k];
        if (!is_tensor(s->kind) || (s->kind != KVC_PY_TENSOR && args[k] == Py_None)) continue;
        if (s->kind == KVC_PY_KV_START) {
            if (kvc_py_arg_import(st, args[k], s->name, 1, "[B]", DT_I64, 0, &c->a[k]) < 0) goto fail;
        } else if (kvc_py_arg_import(st, args[k], s->name, s->ndim, s->dims, s->dtypes, s->out, &c->a[k]) < 0) {
            goto fail;
        }
    }
    return 0;
fail:
    kvc_py_call_release(c);
    return -1;
}

/* Second half of the checks, after the binding's own cross-argument rules:
 * shared dtypes, shared sizes in spec order, kv_start against them,
 * outputs against aliasing. */
int kvc_py_call_finish(struct kvc_state *st, struct kvc_py_call *c)
{
    int k;
    for (k = 0; k < c->n; k++) {
        const struct kvc_arg *a = &c->a[k], *ref = c->spec[k].like ? &c->a[c->spec[k].like - 1] : NULL;
        if (a->t && ref && ref->t && a->view.dtype != ref->view.dtype)
            return kvc_py_raise(st->TypeError, "%s: dtype %s does not match %s dtype %s", a->name,
                                kvc_dtype_name((enum kvc_dtype)a->view.dtype), ref->name,
                                kvc_dtype_name((enum kvc_dtype)ref->view.dtype));
    }
    for (k = 0; k < c->n; k++)
        if (c->a[k].t && c->spec[k].kind != KVC_PY_KV_START && bind_shape(st, c, k) < 0) return -1;
    for (k = 0; k < c->n; k++) {
        if (c->a[k].t == NULL) continue;
        if (c->spec[k].kind == KVC_PY_KV_START) {
            int64_t want = kvc_py_call_size(c, "B");
            if (c->a[k].view.shape[0] != want)
                return kvc_py_raise(st->ValueError, "kv_start: expected shape [B] = [%lld], got [%lld]",
                                    (long long)want, (long long)c->a[k].view.shape[0]);
            if (check_kv_start(st, c, k) < 0) return -1;
        }
    }
    for (k = 0; k < c->n; k++)
        if (c->a[k].t && c->spec[k].out && kvc_py_check_output(st, &c->a[k], c->a, c->n) < 0) return -1;
    return 0;
}

void kvc_py_call_release(struct kvc_py_call *c)
{
    kvc_py_args_release(c->a, c->n);
}

const int64_t *kvc_py_call_i64(const struct kvc_py_call *c, int k, int64_t *stride)
{
    *stride = c->a[k].t ? c->a[k].view.strides[0] : 0;
    return c->a[k].t ? (const int64_t *)c->a[k].view.data : NULL;
}

int kvc_py_check_group(struct kvc_state *st, const char *name, int64_t Hq, int64_t Hkv)
{
    if (Hkv == 0 ? Hq != 0 : Hq % Hkv != 0)
        return kvc_py_raise(st->ValueError, "%s: %lld heads is not a multiple of the %lld kv heads", name,
                            (long long)Hq, (long long)Hkv);
    return 0;
}

int kvc_py_check_one_query(struct kvc_state *st, const char *what, int64_t q)
{
    if (q != 1)
        return kvc_py_raise(st->ValueError, "queries: %s takes one query per row (a decode step), got %lld", what,
                            (long long)q);
    return 0;
}
