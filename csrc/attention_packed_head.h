/*
 * attention_packed_head.h - where the slots of one kv head of a packed
 * attention call live (attention_packed.c fills it per unit of work; the
 * AMX path, attention_amx.h, reads the packed part from it).
 */
#ifndef KVC_ATTENTION_PACKED_HEAD_H
#define KVC_ATTENTION_PACKED_HEAD_H

#include <stdint.h>

/* Strides in elements (bytes for codes). */
struct kvc_packed_head {
    const uint8_t *kc, *vc;    /* codes of packed slot 0 */
    const float *km, *ks;      /* key min / scale of token group 0 */
    const float *vm, *vs;      /* value min / scale of packed slot 0 */
    const float *c;            /* counts of packed slot 0, NULL: none */
    const char *rk, *rv;       /* residual row 0 */
    int64_t kcs, kcd, vcs, vcd; /* codes: slot, byte */
    int64_t kms, kmd, kss, ksd; /* key min / scale: group, channel */
    int64_t vms, vmd, vss, vsd; /* value min / scale: slot, group */
    int64_t cs;
    int64_t rks, rkd, rvs, rvd; /* residual: slot, channel */
    int64_t n, s0;             /* packed slots; first valid logical slot */
};

#endif /* KVC_ATTENTION_PACKED_HEAD_H */
