/*
 * wide.c - whether the attention ops run their 16-lane x86-64-v4 units
 * (kvc.h, KVC_WIDE). The CPU is asked once; the test hook lets the tests
 * run both paths on one machine and compare them bit for bit. The packed
 * attention's AMX path (attention_amx.h) and its few-rows path
 * (attention_rows.h) have their own hooks here. The flags
 * are read and written with relaxed atomics: ops may run on several
 * Python threads at once (the GIL is released around them).
 */
#include "attention_amx.h"
#include "attention_rows.h"
#include "kvc.h"

#if defined(__GNUC__)
#define WIDE_LOAD(p) __atomic_load_n(p, __ATOMIC_RELAXED)
#define WIDE_SWAP(p, v) __atomic_exchange_n(p, v, __ATOMIC_RELAXED)
#else
#define WIDE_LOAD(p) (*(p))
static int wide_swap(int *p, int v)
{
    const int prev = *p;
    *p = v;
    return prev;
}
#define WIDE_SWAP(p, v) wide_swap(p, v)
#endif

static int kvc_wide_allowed = 1, kvc_amx_allow = 1, kvc_rows_allow = 1;

int kvc_set_wide(int allow)
{
    return WIDE_SWAP(&kvc_wide_allowed, allow != 0);
}

int kvc_set_amx(int allow)
{
    return WIDE_SWAP(&kvc_amx_allow, allow != 0);
}

int kvc_amx_allowed(void)
{
    return WIDE_LOAD(&kvc_amx_allow);
}

int kvc_set_rows(int allow)
{
    return WIDE_SWAP(&kvc_rows_allow, allow != 0);
}

int kvc_rows_allowed(void)
{
    return WIDE_LOAD(&kvc_rows_allow);
}

int kvc_wide_active(void)
{
#ifdef KVC_WIDE
    /* -1: not asked yet; two threads asking at once store the same answer */
    static int cpu = -1;
    int c = __atomic_load_n(&cpu, __ATOMIC_RELAXED);
    if (c < 0) {
        __builtin_cpu_init();
        c = __builtin_cpu_supports("x86-64-v4") ? 1 : 0;
        __atomic_store_n(&cpu, c, __ATOMIC_RELAXED);
    }
    return c && WIDE_LOAD(&kvc_wide_allowed);
#else
    return 0;
#endif
}
