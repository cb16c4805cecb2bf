/*
 * module_run.h - adapters that put a C op and its CUDA launcher behind one
 * struct kvc_py_op (module.h), so every binding ends in kvc_py_run.
 *
 * KVC_PY_OP(var, op, cpu_scratch, cuda_scratch) defines `var` for the op
 * kvc_<op> / kvc_cuda_<op> on struct kvc_<op>_params; the flags say whether
 * kvc_<op>_scratch_bytes and kvc_cuda_<op>_workspace exist. KVC_PY_OP_NAN
 * also names the message for KVC_ERR_NAN.
 */
#ifndef KVC_MODULE_RUN_H
#define KVC_MODULE_RUN_H

#include "module.h"

#ifdef KVC_WITH_CUDA
#include "cuda/kvc_cuda.h"
#endif

#define KVC_PY_SCRATCH_0(op, kind)
#define KVC_PY_SCRATCH_1(op, kind) KVC_PY_SCRATCH_##kind(op)
#define KVC_PY_SCRATCH_cpu(op)                                                             \
    static size_t op##_cpu_scratch(const void *p)                                          \
    {                                                                                      \
        return kvc_##op##_scratch_bytes((const struct kvc_##op##_params *)p);              \
    }
#define KVC_PY_SCRATCH_cuda(op)                                                            \
    static size_t op##_cuda_scratch(const void *p)                                         \
    {                                                                                      \
        return kvc_cuda_##op##_workspace((const struct kvc_##op##_params *)p);             \
    }
#define KVC_PY_FN_0(op, kind) NULL
#define KVC_PY_FN_1(op, kind) op##_##kind##_scratch

#ifdef KVC_WITH_CUDA
#define KVC_PY_CUDA_PART(op, cuda_scratch)                                                 \
    static enum kvc_status op##_cuda(const void *p, void *stream)                          \
    {                                                                                      \
        return kvc_cuda_##op((const struct kvc_##op##_params *)p, stream);                 \
    }                                                                                      \
    KVC_PY_SCRATCH_##cuda_scratch(op, cuda)
#define KVC_PY_CUDA_FNS(op, cuda_scratch) op##_cuda, KVC_PY_FN_##cuda_scratch(op, cuda)
#else
#define KVC_PY_CUDA_PART(op, cuda_scratch)
#define KVC_PY_CUDA_FNS(op, cuda_scratch) NULL, NULL
#endif

#define KVC_PY_OP(var, op, cpu_scratch, cuda_scratch)                                      \
    KVC_PY_OP_NAN(var, op, cpu_scratch, cuda_scratch, NULL)
#define KVC_PY_OP_NAN(var, op, cpu_scratch, cuda_scratch, nan_msg)                         \
    static enum kvc_status op##_cpu(const void *p)                                         \
    {                                                                                      \
        return kvc_##op((const struct kvc_##op##_params *)p);                              \
    }                                                                                      \
    KVC_PY_SCRATCH_##cpu_scratch(op, cpu)                                                  \
    KVC_PY_CUDA_PART(op, cuda_scratch)                                                     \
    static const struct kvc_py_op var = {#op, op##_cpu, KVC_PY_FN_##cpu_scratch(op, cpu),  \
                                         KVC_PY_CUDA_FNS(op, cuda_scratch), nan_msg};

#endif /* KVC_MODULE_RUN_H */
