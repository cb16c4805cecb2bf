/*
 * module_segments.c - layout, segment and count checks of the attention
 * bindings (module_segments.h).
 */
#include "module_segments.h"

#include <math.h>
#include <stdlib.h>

int kvc_py_ragged_layout(struct kvc_state *st, PyObject *offsets, PyObject *lengths, PyObject *kv_start)
{
    const int ragged = offsets != Py_None;
    if (ragged != (lengths != Py_None))
        return kvc_py_raise(st->ValueError, "%s: the ragged layout needs both offsets and lengths",
                            ragged ? "lengths" : "offsets");
    if (ragged && kv_start != Py_None)
        return kvc_py_raise(st->ValueError,
                            "kv_start: only for the uniform layout (a ragged head starts at its offset)");
    return ragged;
}

struct seg {
    int64_t off, len, head;
};

static int seg_cmp(const void *x, const void *y)
{
    const struct seg *a = (const struct seg *)x, *b = (const struct seg *)y;
    if (a->off != b->off) return a->off < b->off ? -1 : 1;
    return a->head < b->head ? -1 : (a->head > b->head);
}

int kvc_py_check_segments(struct kvc_state *st, const struct kvc_view *off, const struct kvc_view *len,
                          int64_t Hkv, int64_t N, const char *rows, int64_t min_len, int64_t align)
{
    const int64_t H = off->shape[0];
    struct seg *s;
    int64_t i, ns = 0;
    for (i = 0; i < H; i++) {
        const int64_t o = kvc_py_i64_at(off, i), n = kvc_py_i64_at(len, i);
        if (n < 0)
            return kvc_py_raise(st->ValueError, "lengths: value %lld of head %lld (b=%lld, h=%lld) is negative",
                                (long long)n, (long long)i, (long long)(i / Hkv), (long long)(i % Hkv));
        if (o < 0 || o > N || n > N - o)
            return kvc_py_raise(st->ValueError,
                                "offsets: segment [%lld, %lld + %lld) of head %lld (b=%lld, h=%lld) is "
                                "outside the %lld rows of %s",
                                (long long)o, (long long)o, (long long)n, (long long)i,
                                (long long)(i / Hkv), (long long)(i % Hkv), (long long)N, rows);
        if (n > 0 && n < min_len)
            return kvc_py_raise(st->ValueError,
                                "lengths: head %lld (b=%lld, h=%lld) has %lld slots, fewer than the %lld "
                                "queries (the queries are the last q slots of every non-empty head)",
                                (long long)i, (long long)(i / Hkv), (long long)(i % Hkv), (long long)n,
                                (long long)min_len);
        if (o % align != 0)
            return kvc_py_raise(st->ValueError,
                                "offsets: %lld of head %lld (b=%lld, h=%lld) is not a multiple of the "
                                "group %lld (key groups must not straddle heads)",
                                (long long)o, (long long)i, (long long)(i / Hkv), (long long)(i % Hkv),
                                (long long)align);
        ns += n > 0;
    }
    if (ns < 2) return 0;
    s = (struct seg *)PyMem_Malloc((size_t)ns * sizeof *s);
    if (s == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0, ns = 0; i < H; i++)
        if (kvc_py_i64_at(len, i) > 0) {
            s[ns].off = kvc_py_i64_at(off, i);
            s[ns].len = kvc_py_i64_at(len, i);
            s[ns].head = i;
            ns++;
        }
    qsort(s, (size_t)ns, sizeof *s, seg_cmp);
    for (i = 1; i < ns; i++)
        if (s[i].off < s[i - 1].off + s[i - 1].len) {
            kvc_py_raise(st->ValueError,
                         "offsets: segments of heads %lld [%lld, %lld) and %lld [%lld, %lld) overlap",
                         (long long)s[i - 1].head, (long long)s[i - 1].off,
                         (long long)(s[i - 1].off + s[i - 1].len), (long long)s[i].head,
                         (long long)s[i].off, (long long)(s[i].off + s[i].len));
            PyMem_Free(s);
            return -1;
        }
    PyMem_Free(s);
    return 0;
}

/* Counts must be finite and > 0 on every slot the kernel reads: merge counts
 * are >= 1, and a packed per-head layer splits one slot's count over the
 * copies that fill its last key group (stores/packed_ragged.py). */

/* Count of element i of a f32 or i32 buffer, as the kernel reads it. */
static float count_at(const struct kvc_view *v, int64_t i)
{
    return v->dtype == KVC_I32 ? (float)((const int32_t *)v->data)[i] : ((const float *)v->data)[i];
}

static int raise_count(struct kvc_state *st, const char *name, float c, const char *where)
{
    char val[32];
    PyOS_snprintf(val, sizeof val, "%g", (double)c);
    return kvc_py_raise(st->ValueError, "%s: %s is %s, expected a finite count > 0", name, where, val);
}

int kvc_py_check_count_rows(struct kvc_state *st, const char *name, const struct kvc_view *counts,
                            const int64_t *kv_start, int64_t kv_start_stride)
{
    const int64_t B = counts->shape[0], H = counts->shape[1], n = counts->shape[2];
    char where[96];
    int64_t b, i, j;
    for (b = 0; b < B; b++) {
        const int64_t s0 = kv_start ? kv_start[b * kv_start_stride] : 0;
        for (i = 0; i < H; i++)
            for (j = s0; j < n; j++) {
                const float v = count_at(counts, b * counts->strides[0] + i * counts->strides[1] +
                                                     j * counts->strides[2]);
                if (kvc_bad_count(v)) {
                    PyOS_snprintf(where, sizeof where, "value at [%lld, %lld, %lld]", (long long)b, (long long)i,
                                  (long long)j);
                    return raise_count(st, name, v, where);
                }
            }
    }
    return 0;
}

int kvc_py_check_counts(struct kvc_state *st, const struct kvc_py_call *c, int k, int ragged, int64_t heads)
{
    const struct kvc_view *counts = &c->a[k + 3].view;
    const int64_t *kv_start, *offsets, *lengths;
    int64_t kv_start_stride, offsets_stride, lengths_stride;
    int64_t i, j;
    if (c->a[k + 3].t == NULL || counts->data == NULL || c->a[k + 3].dev_type != kDLCPU) return 0;
    /* the scan reads kv_start / offsets / lengths on the host: with one of
     * them on a GPU and the counts on the CPU, kvc_py_run refuses the mixed
     * devices instead */
    for (i = k; i < k + 3; i++)
        if (c->a[i].t != NULL && c->a[i].dev_type != kDLCPU) return 0;
    kv_start = kvc_py_call_i64(c, k, &kv_start_stride);
    offsets = kvc_py_call_i64(c, k + 1, &offsets_stride);
    lengths = kvc_py_call_i64(c, k + 2, &lengths_stride);
    if (ragged) {
        const int64_t cs = counts->strides[0];
        char where[96];
        for (i = 0; i < heads; i++) {
            const int64_t o = offsets[i * offsets_stride], n = lengths[i * lengths_stride];
            for (j = o; j < o + n; j++) {
                const float v = count_at(counts, j * cs);
                if (kvc_bad_count(v)) {
                    PyOS_snprintf(where, sizeof where, "value at row %lld (head %lld)", (long long)j,
                                  (long long)i);
                    return raise_count(st, "counts", v, where);
                }
            }
        }
        return 0;
    }
    return kvc_py_check_count_rows(st, "counts", counts, kv_start, kv_start_stride);
}
