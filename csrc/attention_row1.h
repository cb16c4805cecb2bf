/*
 * attention_row1.h - the packed attention's one-row path (attention_row1.c):
 * the whole-tile stretch of one kv head's packed slots when the unit of
 * work has a single query row (decode without GQA: Hq = Hkv, one query),
 * in AVX-512 loops of its own.
 *
 * At one row per slot the tile loops of attention_packed.c pay per slot for
 * what several rows would share: the pointer arrays and group checks of a
 * 16-slot tile, a softmax step per tile, and an unpack of four operations
 * per 16 codes. This path reads a 16-byte piece of a code row with one
 * zero-extending load and takes its codes apart by shifts and one table
 * lookup each, in the order they lie in the byte (docs/packed.md): the
 * query and the output row are permuted to that order once per span
 * instead. The softmax rescales once per chunk of slots. The order of the
 * additions differs from the tile loops', so the bits do as well: the path
 * is one more level of the dispatch, after AMX, switched off by the test
 * hook kvc_set_row1(0) for the bit-for-bit comparisons of the vector units.
 */
#ifndef KVC_ATTENTION_ROW1_H
#define KVC_ATTENTION_ROW1_H

#include <stdint.h>

#include "attention_packed_head.h"
#include "kvc.h"

#ifdef __cplusplus
extern "C" {
#endif

#ifdef KVC_WIDE
#define KVC_ROW1 1
#endif

/* Slots per softmax step: logits of a chunk, one rescale, then its values. */
#define KVC_ROW1_CHUNK 64

/* 1 when the packed attention of this shape may take the one-row path: the
 * wide units run (an x86-64-v4 CPU), not switched off by the test hook;
 * D of 64, 128 or 256; a code row a whole number of 16-byte pieces at both
 * widths (D * bits and D * value bits multiples of 128); G a multiple of
 * 16. Any strides: where the bytes of a code row, or the scales of a key
 * group or a slot, are not contiguous, they are copied so first. */
int kvc_row1_usable(int bits, int vbits, int64_t D, int64_t G);

/* Test hook (wide.c): allow (1) or forbid (0) the one-row path; returns the
 * previous setting. kvc_row1_allowed: the setting. */
int kvc_set_row1(int allow);
int kvc_row1_allowed(void);

/* Runs the span of one row (s->R == 1; j0 and n multiples of 16): the
 * state in s->pm, ps, acc and mn goes on from the slots before it, as
 * attention_packed.c's tiles would leave it. */
void kvc_row1_packed_span(const struct kvc_packed_span *s);

#ifdef __cplusplus
}
#endif

#endif /* KVC_ATTENTION_ROW1_H */
