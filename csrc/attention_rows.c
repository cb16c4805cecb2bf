/*
 * attention_rows.c - the packed attention's few-rows path (attention_rows.h):
 * which shapes it takes, and the dispatch by head size to its span
 * (attention_rows_span.h, instantiated in attention_rows_d64.c, _d128.c
 * and _d256.c).
 */
#include "attention_rows.h"

int kvc_rows_usable(int bits, int vbits, int64_t D, int64_t G)
{
#ifdef KVC_ROWS
    if ((bits != 2 && bits != 4 && bits != 8) || (vbits != 2 && vbits != 4 && vbits != 8)) return 0;
    if ((D != 64 && D != 128 && D != 256) || (D * bits) % 128 || (D * vbits) % 128 || G < 16 || G % 16) return 0;
    return kvc_rows_allowed() && kvc_wide_active();
#else
    (void)bits, (void)vbits, (void)D, (void)G;
    return 0;
#endif
}

#ifdef KVC_ROWS
int kvc_rows_max(int64_t D)
{
    return D == 64 || D == 128 || D == 256 ? KVC_ROWS_MAX : 0;
}

KVC_WIDE_TARGET void kvc_rows_packed_span(const struct kvc_packed_span *s)
{
    /* the caller checked kvc_rows_usable and s->R <= kvc_rows_max(D): D,
     * widths, G and the row count are among these */
    if (s->D == 64) kvc_rows_span_d64(s);
    else if (s->D == 128) kvc_rows_span_d128(s);
    else kvc_rows_span_d256(s);
}
#else
int kvc_rows_max(int64_t D)
{
    (void)D;
    return 0;
}

void kvc_rows_packed_span(const struct kvc_packed_span *s)
{
    (void)s;
}
#endif
