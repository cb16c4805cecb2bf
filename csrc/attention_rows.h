/*
 * attention_rows.h - the packed attention's few-rows path (attention_rows.c,
 * attention_rows_span.h): the whole-tile stretch of one kv head's packed
 * slots when the unit of work has few query rows (at most KVC_ROWS_MAX:
 * decode without GQA, Hq = Hkv and one query, at any of D = 64, 128, 256;
 * SmolLM2's three rows per kv head at D = 64, Llama-3-8B's four at D = 128,
 * Gemma 3's four at D = 256), in AVX-512 loops of its own.
 *
 * With few rows per slot the tile loops of attention_packed.c pay per slot
 * for what more rows would share: the pointer arrays and group checks of a
 * 16-slot tile, a softmax step per tile, and an unpack of four operations
 * per 16 codes. This path reads a piece of a code row with one load and
 * takes its codes apart by shifts and one table lookup each, in the order
 * they lie in the bytes (docs/packed.md): the queries and the output rows
 * are permuted to that order once per span instead. The softmax rescales
 * once per chunk of slots. The order of the additions differs from the
 * tile loops', so the bits do as well: the path is one more level of the
 * dispatch, after AMX, switched off by the test hook kvc_set_rows(0) for
 * the bit-for-bit comparisons of the vector units.
 */
#ifndef KVC_ATTENTION_ROWS_H
#define KVC_ATTENTION_ROWS_H

#include <stdint.h>

#include "attention_packed_head.h"
#include "kvc.h"

#ifdef __cplusplus
extern "C" {
#endif

#ifdef KVC_WIDE
#define KVC_ROWS 1
#endif

/* Slots per softmax step: logits of a chunk, one rescale, then its values. */
#define KVC_ROWS_CHUNK 64

/* Query rows one span takes at most. The values are summed in registers a
 * pass at a time, at most 16 vectors of the rows' D / 16 each (one pass
 * for up to 4 rows at D = 64, two for 3-4 at D = 128, four at D = 256 from
 * 3 rows); the code rows of a chunk are read again from L1 by each pass. */
#define KVC_ROWS_MAX 4

/* 1 when the packed attention of this shape may take the few-rows path: the
 * wide units run (an x86-64-v4 CPU), not switched off by the test hook;
 * D of 64, 128 or 256; a code row a whole number of 16-byte pieces at both
 * widths (D * bits and D * value bits multiples of 128); G a multiple of
 * 16. Any strides: where the bytes of a code row, or the scales of a key
 * group or a slot, are not contiguous, they are copied so first. */
int kvc_rows_usable(int bits, int vbits, int64_t D, int64_t G);

/* Test hook (wide.c): allow (1) or forbid (0) the few-rows path; returns the
 * previous setting. kvc_rows_allowed: the setting. */
int kvc_set_rows(int allow);
int kvc_rows_allowed(void);

/* How many query rows a span at head size D may have: KVC_ROWS_MAX at D =
 * 64, 128 and 256, 0 for any other D or where the path is not built. */
int kvc_rows_max(int64_t D);

/* Runs the span of s->R rows (1 <= R <= kvc_rows_max(D); j0 and n
 * multiples of 16), every row seeing every slot of it: the state in
 * s->pm, ps, acc and mn goes on from the slots before it, as
 * attention_packed.c's tiles would leave it. */
void kvc_rows_packed_span(const struct kvc_packed_span *s);

#ifdef KVC_ROWS
/* kvc_rows_packed_span at D = 64, 128, 256: one file each
 * (attention_rows_d64.c, ...), compiled in parallel. */
void kvc_rows_span_d64(const struct kvc_packed_span *s);
void kvc_rows_span_d128(const struct kvc_packed_span *s);
void kvc_rows_span_d256(const struct kvc_packed_span *s);
#endif

#ifdef __cplusplus
}
#endif

#endif /* KVC_ATTENTION_ROWS_H */
