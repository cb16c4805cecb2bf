/*
 * attention_rows_d128.c - the few-rows path's span at D = 128
 * (attention_rows_span.h), in a file of its own so that it compiles in
 * parallel with the other head sizes.
 */
#include "attention_rows_span.h"

#ifdef KVC_ROWS
KVC_ROWS_SPAN_DEFINE(128)
#else
typedef int kvc_rows_d128_unused; /* ISO C: a translation unit is never empty */
#endif
