/*
 * module_run.c - run a validated op on the device its tensors live on: one
 * device for all arguments, the CPU op or the CUDA launcher with the GIL
 * released, scratch for either, CUDA stream ordering and errors.
 */
#include "module.h"

#include <string.h>

#ifdef KVC_WITH_CUDA
#include "cuda/kvc_cuda.h"
#endif

static void device_str(const struct kvc_arg *a, char *buf, size_t n)
{
    if (a->dev_type == kDLCPU) snprintf(buf, n, "cpu");
    else snprintf(buf, n, "cuda:%d", (int)a->dev_id);
}

/* Index of the first argument with a tensor, after checking that all of
 * them share its device; -1 when there is none, -2 with an exception set. */
static int common_device(struct kvc_state *st, const struct kvc_arg *a, int n)
{
    int i, first = -1;
    for (i = 0; i < n; i++) {
        if (a[i].t == NULL) continue;
        if (first < 0) {
            first = i;
            continue;
        }
        if (a[i].dev_type != a[first].dev_type || a[i].dev_id != a[first].dev_id) {
            char d0[32], d1[32];
            device_str(&a[first], d0, sizeof d0);
            device_str(&a[i], d1, sizeof d1);
            kvc_py_raise(st->ValueError, "%s: is on %s but %s is on %s (all tensors of one call "
                         "must be on one device)", a[i].name, d1, a[first].name, d0);
            return -2;
        }
    }
    return first;
}

static int raise_status(struct kvc_state *st, const struct kvc_py_op *op, enum kvc_status s)
{
    if (s == KVC_ERR_NAN && op->nan_msg) return kvc_py_raise(st->ValueError, "%s", op->nan_msg);
    return kvc_py_raise_status(st, s, op->name);
}

static int run_cpu(struct kvc_state *st, const struct kvc_py_op *op, void *p, void **scratch,
                   size_t *scratch_bytes)
{
    void *buf = NULL;
    enum kvc_status s;
    if (scratch && op->cpu_scratch) {
        *scratch_bytes = op->cpu_scratch(p);
        *scratch = buf = kvc_py_scratch(*scratch_bytes);
        if (buf == NULL) return -1;
    }
    Py_BEGIN_ALLOW_THREADS
    s = op->cpu(p);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(buf);
    return s == KVC_OK ? 0 : raise_status(st, op, s);
}

#ifdef KVC_WITH_CUDA
/* The op runs on the stream the first tensor is ready on; tensors that are
 * ready on another stream (a mix of producers) are waited for first, and
 * tensors exported for the legacy default stream (__dlpack__(stream=1),
 * producers without a C exchange table) are waited for after the op, since
 * their producer may go on on a stream that does not follow the legacy one. */
static int run_cuda(struct kvc_state *st, const struct kvc_py_op *op, void *p, void **scratch,
                    size_t *scratch_bytes, struct kvc_arg *a, int n, int first)
{
    void *stream = a[first].stream, *buf = NULL;
    enum kvc_status s;
    int i, prev = 0, legacy = 0;
    if (op->cuda == NULL)
        return kvc_py_raise(st->TypeError, "%s: has no CUDA kernel", op->name);
    s = kvc_cuda_set_device(a[first].dev_id, &prev);
    Py_BEGIN_ALLOW_THREADS
    for (i = 0; i < n && s == KVC_OK; i++) {
        if (a[i].t == NULL) continue;
        legacy |= a[i].legacy;
        if (a[i].stream != stream) s = kvc_cuda_stream_sync(a[i].stream);
    }
    if (s == KVC_OK && scratch && op->cuda_scratch) {
        *scratch_bytes = op->cuda_scratch(p);
        s = kvc_cuda_scratch_alloc(&buf, *scratch_bytes, stream);
        *scratch = buf;
    }
    if (s == KVC_OK) s = op->cuda(p, stream);
    kvc_cuda_scratch_free(buf, stream);
    if (s == KVC_OK && legacy) s = kvc_cuda_stream_sync(stream);
    Py_END_ALLOW_THREADS
    kvc_cuda_set_device(prev, NULL);
    if (s == KVC_ERR_CUDA)
        return kvc_py_raise(st->Error, "%s: CUDA error: %s", op->name, kvc_cuda_last_error());
    return s == KVC_OK ? 0 : raise_status(st, op, s);
}
#endif

int kvc_py_run(struct kvc_state *st, const struct kvc_py_op *op, void *p, void **scratch,
               size_t *scratch_bytes, struct kvc_arg *a, int n)
{
    int first = common_device(st, a, n);
    if (first == -2) return -1;
#ifdef KVC_WITH_CUDA
    if (first >= 0 && a[first].dev_type == kDLCUDA)
        return run_cuda(st, op, p, scratch, scratch_bytes, a, n, first);
#endif
    return run_cpu(st, op, p, scratch, scratch_bytes);
}
