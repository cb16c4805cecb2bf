/*
 * kvc.h - umbrella header of the kvcompress C core.
 *
 * Status codes, storage dtypes and the strided tensor view that every op's
 * params struct is built from. Included by C11 sources and, later, by nvcc as
 * C++, so everything here stays in the common subset of both languages.
 */
#ifndef KVC_H
#define KVC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
#define KVC_STATIC_ASSERT(cond, msg) static_assert(cond, msg)
extern "C" {
#else
#define KVC_STATIC_ASSERT(cond, msg) _Static_assert(cond, msg)
#endif

/* Every C entry point returns one of these; 0 is success, errors are negative
 * so callers can test `st < 0`. */
enum kvc_status {
    KVC_OK = 0,
    KVC_ERR_INVALID = -1,     /* arguments violate the op's contract */
    KVC_ERR_NAN = -2,         /* a NaN was found where an order is needed */
    KVC_ERR_UNSUPPORTED = -3, /* dtype/layout/device this build cannot handle */
    KVC_ERR_NOMEM = -4,       /* scratch given to the op is too small */
    KVC_ERR_CUDA = -5         /* a CUDA call or launch failed */
};

/* Storage dtypes understood by the core. Values are stable (they cross the
 * Python boundary only through module.c, but CUDA launchers switch on them). */
enum kvc_dtype {
    KVC_F32 = 0,
    KVC_F16 = 1,
    KVC_BF16 = 2,
    KVC_I32 = 3,
    KVC_I64 = 4,
    KVC_U8 = 5 /* packed codes (quant.h) */
};

#define KVC_MAX_DIMS 4

/* A borrowed strided tensor: the core never owns memory. Strides are in
 * elements (not bytes) and may be zero or negative; data already includes
 * DLPack's byte_offset. Unused trailing dims have shape 1, stride 0. */
struct kvc_view {
    void *data;
    int32_t dtype; /* enum kvc_dtype; int32_t keeps the layout fixed for CUDA */
    int32_t ndim;
    int64_t shape[KVC_MAX_DIMS];
    int64_t strides[KVC_MAX_DIMS];
};

KVC_STATIC_ASSERT(sizeof(struct kvc_view) == 8 + 4 + 4 + 2 * 8 * KVC_MAX_DIMS,
                  "struct kvc_view must have the same layout on host and device");

static inline const char *kvc_status_str(enum kvc_status st)
{
    switch (st) {
    case KVC_OK: return "ok";
    case KVC_ERR_INVALID: return "invalid argument";
    case KVC_ERR_NAN: return "NaN in input";
    case KVC_ERR_UNSUPPORTED: return "unsupported";
    case KVC_ERR_NOMEM: return "scratch too small";
    case KVC_ERR_CUDA: return "CUDA error";
    }
    return "unknown status";
}

static inline size_t kvc_dtype_size(enum kvc_dtype dt)
{
    switch (dt) {
    case KVC_F32: return 4;
    case KVC_F16: return 2;
    case KVC_BF16: return 2;
    case KVC_I32: return 4;
    case KVC_I64: return 8;
    case KVC_U8: return 1;
    }
    return 0;
}

static inline const char *kvc_dtype_name(enum kvc_dtype dt)
{
    switch (dt) {
    case KVC_F32: return "float32";
    case KVC_F16: return "float16";
    case KVC_BF16: return "bfloat16";
    case KVC_I32: return "int32";
    case KVC_I64: return "int64";
    case KVC_U8: return "uint8";
    }
    return "unknown";
}

/* Scratch regions are carved at this alignment so vector loads never split
 * cache lines. */
#define KVC_ALIGN 64

static inline size_t kvc_align_up(size_t n)
{
    return (n + (KVC_ALIGN - 1)) & ~(size_t)(KVC_ALIGN - 1);
}

/* Thread index inside an OpenMP region (0 without OpenMP). CPU only. */
#if defined(_OPENMP) && !defined(__CUDACC__)
#include <omp.h>
#define KVC_THREAD_ID() omp_get_thread_num()
#else
#define KVC_THREAD_ID() 0
#endif

/* Hot CPU loops are compiled three times by GCC on x86-64 ELF and picked at
 * load time through ifunc, because wheels may not assume anything past SSE2
 * but most machines have AVX2: x86-64-v4 (AVX-512 F/BW/CD/DQ/VL, FMA),
 * x86-64-v3 (AVX2, FMA, F16C, BMI) and the baseline (SSE2, no FMA). With
 * -ffp-contract=fast both upper clones fuse multiply-adds, so the baseline
 * may differ from them in the last bits. The clones are named by ISA level
 * because a plain "avx2" clone has no FMA, and "avx2,fma" in target_clones
 * is two clones, not one; GCC dispatches on levels from version 12. Older
 * GCC gets AVX-512F, AVX2 (without FMA) and the baseline. Other compilers
 * and platforms, and -DKVC_NO_CLONES, get the plain function.
 *
 * KVC_ISA (setup.py's KVCOMPRESS_ISA; 4, 3 or 0) builds only the clone of
 * that level, with the same attribute, so one machine can test every
 * clone's results (make isa-test). */
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__) && \
    defined(__x86_64__) && defined(__ELF__) && defined(__linux__) && \
    !defined(KVC_NO_CLONES)
#define KVC_MULTIVERSION 1
#endif
#if defined(KVC_MULTIVERSION) && defined(KVC_ISA)
#if KVC_ISA == 4
#define KVC_HOT __attribute__((target("arch=x86-64-v4")))
#elif KVC_ISA == 3
#define KVC_HOT __attribute__((target("arch=x86-64-v3")))
#else
#define KVC_HOT
#endif
#elif defined(KVC_MULTIVERSION) && __GNUC__ >= 12
#define KVC_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(KVC_MULTIVERSION)
#define KVC_HOT __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KVC_HOT
#endif

/* The wide path: where the clones are built and the v4 clone is among them,
 * the attention ops (attention.c, attention_packed.c) also build their unit
 * of work once more for x86-64-v4 with 16-lane tile loops (KVC_WIDE_TARGET),
 * and run it instead of the cloned unit when kvc_wide_active() says so (an
 * x86-64-v4 CPU, not switched off by the test hook). The cloned units keep
 * 8-lane halves, which the AVX2 clone needs (its 16 registers); the v4
 * clone runs the same halves at half its vector width. Each output lane
 * is the same chain of the same operations on both paths, so results are
 * bit-identical (tests/test_wide.py). */
#if defined(KVC_MULTIVERSION) && __GNUC__ >= 12 && (!defined(KVC_ISA) || KVC_ISA == 4)
#define KVC_WIDE 1
#define KVC_WIDE_TARGET __attribute__((target("arch=x86-64-v4")))
#endif
/* 1 when the wide units run (wide.c); always 0 in a build without them. */
int kvc_wide_active(void);
/* Test hook: allow (1) or forbid (0) the wide units; returns the previous setting. */
int kvc_set_wide(int allow);

/* Helpers called from a KVC_HOT function must be inlined into each clone,
 * or they run at the baseline ISA whatever clone calls them. */
#if defined(__GNUC__) && !defined(__CUDACC__)
#define KVC_INLINE static inline __attribute__((always_inline))
#else
#define KVC_INLINE static inline
#endif

/* Ask for the line holding p ahead of its read (a hint: never faults, any
 * address will do), into every level (KVC_PREFETCH) or into L2 and below
 * (KVC_PREFETCH_L2, for lines read a while later); nothing where the
 * compiler has no such builtin. */
#if defined(__GNUC__) && !defined(__CUDACC__)
#define KVC_PREFETCH(p) __builtin_prefetch((const void *)(p), 0, 3)
#define KVC_PREFETCH_L2(p) __builtin_prefetch((const void *)(p), 0, 2)
#else
#define KVC_PREFETCH(p) ((void)(p))
#define KVC_PREFETCH_L2(p) ((void)(p))
#endif

#ifdef __cplusplus
}
#endif

#endif /* KVC_H */
