/*
 * attention_amx.h - the packed attention's AMX path (attention_amx.c): the
 * whole-tile stretch of one kv head's packed slots, its key logits and
 * weighted value codes done by Intel AMX int8 tile products.
 *
 * Each fp32 multiplier (a query times its key scale, a weight times its
 * value scale) is rounded to a fixed point of 31 bits relative to the
 * largest it is summed with (at most 2^-31 of that one: fp32 keeps 24),
 * cut into four int8 digits; the centred codes are int8 too. Every product
 * and every int32 sum is exact; the digits' sums are combined in fp32. The
 * order of the additions differs from the vector path's, so the bits do as
 * well: the path is one more level of the dispatch (x86-64-v4 with AMX),
 * switched off by the test hook kvc_set_amx(0) for the bit-for-bit
 * comparisons of the vector units.
 */
#ifndef KVC_ATTENTION_AMX_H
#define KVC_ATTENTION_AMX_H

#include <stddef.h>
#include <stdint.h>

#include "attention_packed_head.h"
#include "kvc.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(KVC_WIDE) && defined(__linux__)
#define KVC_AMX 1
#endif

/* Slots of a span run in chunks of this many: logits of a chunk, then one
 * softmax rescale, then its values. A multiple of 32 (a value product
 * covers 32 slots). */
#define KVC_AMX_CHUNK 256

/* 1 when the packed attention of this shape may take the AMX path: a CPU
 * with AMX-INT8 and VBMI whose kernel grants the tile state, not switched
 * off by the test hook, 2-, 4- or 8-bit keys and values, D a multiple of 32, G
 * of 32. */
int kvc_amx_usable(int bits, int vbits, int64_t D, int64_t G);

/* Test hook (wide.c): allow (1) or forbid (0) the AMX path; returns the
 * previous setting. kvc_amx_allowed: the setting. */
int kvc_set_amx(int allow);
int kvc_amx_allowed(void);

/* Scratch one thread needs for kvc_amx_packed_span at head size D. */
size_t kvc_amx_scratch_bytes(int64_t D);

/* Runs the span (j0 and n multiples of 32): the state in s->pm, ps, acc
 * and mn goes on from the slots before it, as attention_packed.c's tiles
 * would leave it. */
void kvc_amx_packed_span(const struct kvc_packed_span *s);

#ifdef __cplusplus
}
#endif

#endif /* KVC_ATTENTION_AMX_H */
