/*
 * attention_packed_head.h - where the slots of one kv head of a packed
 * attention call live (attention_packed.c fills it per unit of work; the
 * AMX path, attention_amx.h, reads the packed part from it).
 */
#ifndef KVC_ATTENTION_PACKED_HEAD_H
#define KVC_ATTENTION_PACKED_HEAD_H

#include <stdint.h>

#include "kvc.h"

/* Strides in elements (bytes for codes). */
struct kvc_packed_head {
    const uint8_t *kc, *vc;    /* codes of packed slot 0 */
    const float *km, *ks;      /* key min / scale of token group 0 */
    const float *vm, *vs;      /* value min / scale of packed slot 0 */
    const float *c;            /* counts of packed slot 0, NULL: none */
    const char *rk, *rv;       /* residual row 0 */
    const float *rc;           /* counts of residual row 0, NULL: every residual slot counts 1 */
    int64_t kcs, kcd, vcs, vcd; /* codes: slot, byte */
    int64_t kms, kmd, kss, ksd; /* key min / scale: group, channel */
    int64_t vms, vmd, vss, vsd; /* value min / scale: slot, group */
    int64_t cs;
    int64_t rks, rkd, rvs, rvd; /* residual: slot, channel */
    int64_t rcs;                /* residual counts: slot */
    int64_t n, s0;             /* packed slots; first valid logical slot */
    int64_t rh0, rh1;          /* residual rows not seen (res_hidden): logical slots [n + rh0, n + rh1) */
};

/* A stretch of one kv head's packed slots, [j0, j0 + n), handed whole to
 * a path of its own (the AMX path, attention_amx.h; the few-rows path,
 * attention_rows.h), with the running softmax state of its R query rows
 * as the tiles before it left it; code rows are D * bits / 8 bytes. */
struct kvc_packed_span {
    struct kvc_packed_head h; /* the head: codes, mins, scales, counts and their strides */
    const float *q;  /* [R][Dp] query rows, fp32 */
    int64_t R, D, Dp, G, ng, j0, n;
    int bits, vbits;  /* key and value code widths, 2, 4 or 8 */
    float scaling;
    float *pm, *ps;  /* [R] running max and sum */
    float *acc;      /* [R][Dp] running sum of weight x scale x centred code */
    float *mn;       /* [R][ng] running sum of weight x value centre per group */
    void *scratch;   /* the AMX path's buffers (kvc_amx_scratch_bytes(D) bytes, 64-byte aligned); unused by the few-rows path */
};

/* Prefetches of what a head's packed slots are read from, shared by the
 * vector units (attention_packed.c) and the AMX path (attention_amx.c).
 * The scales are read in bursts the hardware prefetcher does not
 * anticipate: a key group's once per G slots, a tile's value scales all at
 * once after its softmax (asked for only where they lie as contiguous
 * rows). The code rows stream in order, yet asking for them ahead still
 * pays when each line is asked for once (kvc_packed_prefetch_rows). All
 * hints: nothing here can fault. */

/* Key group t's D scales and D mins. */
KVC_INLINE void kvc_packed_prefetch_key_group(const struct kvc_packed_head *h, int64_t t, int64_t D)
{
    int64_t o;
    if (h->ksd != 1 || h->kmd != 1) return;
    for (o = 0; o < D; o += 16) {
        KVC_PREFETCH(h->ks + t * h->kss + o);
        KVC_PREFETCH(h->km + t * h->kms + o);
    }
}

/* The value scales and mins of packed slots [j, min(j + nk, end)), ng
 * groups per slot, when they lie as [slot][group] rows; into L2 only when
 * far (read a chunk later). */
KVC_INLINE void kvc_packed_prefetch_values(const struct kvc_packed_head *h, int64_t j, int64_t nk, int64_t end,
                                           int64_t ng, int far)
{
    int64_t o;
    if (j >= end || h->vsd != 1 || h->vmd != 1 || h->vss != ng || h->vms != ng) return;
    if (nk > end - j) nk = end - j;
    for (o = 0; o < nk * ng; o += 16) {
        if (far) {
            KVC_PREFETCH_L2(h->vs + j * h->vss + o);
            KVC_PREFETCH_L2(h->vm + j * h->vms + o);
        } else {
            KVC_PREFETCH(h->vs + j * h->vss + o);
            KVC_PREFETCH(h->vm + j * h->vms + o);
        }
    }
}

/* The lines of code rows [a, b) (clipped to end), rb bytes each, cs apart,
 * byte stride cd: where the bytes are contiguous every line of the range
 * once (rows of 16 or 32 bytes share lines: one request per line, not per
 * row), else every line of each row; into L2 only when far. */
KVC_INLINE void kvc_packed_prefetch_rows(const uint8_t *base, int64_t cs, int64_t cd, int64_t rb, int64_t a,
                                         int64_t b, int64_t end, int far)
{
    int64_t r, o;
    if (b > end) b = end;
    if (a >= b) return;
    if (cd == 1) {
        const uintptr_t p = (uintptr_t)(base + a * cs), e = p + (uintptr_t)((b - a - 1) * cs + rb);
        uintptr_t x;
        /* a negative cs leaves e below p: nothing asked, nothing wrong */
        for (x = p & ~(uintptr_t)63; x < e; x += 64) {
            if (far) KVC_PREFETCH_L2((const void *)x);
            else KVC_PREFETCH((const void *)x);
        }
        return;
    }
    for (r = a; r < b; r++)
        for (o = 0; o < rb; o += 64) {
            if (far) KVC_PREFETCH_L2(base + r * cs + o * cd);
            else KVC_PREFETCH(base + r * cs + o * cd);
        }
}

#endif /* KVC_ATTENTION_PACKED_HEAD_H */
