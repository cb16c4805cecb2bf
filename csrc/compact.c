/*
 * compact.c - gather of kept tokens (CPU).
 */
#include <string.h>

#include "compact.h"
#include "kvc_math.h"

/* Output rows per parallel unit; every row is one copy, so any split keeps
 * results identical and this one balances few heads over many cores. */
#define GATHER_ROWS 64

static inline void copy_row(char *dst, int64_t dst_st, const char *src, int64_t src_st,
                            int64_t n, size_t es)
{
    int64_t i;
    /* D = 0 rows: an empty output may have a NULL data pointer, and memcpy
     * needs valid pointers even for zero bytes (C11 7.24.1p2). */
    if (n <= 0) return;
    if (dst_st == 1 && src_st == 1) {
        memcpy(dst, src, (size_t)n * es);
    } else if (es == 2) {
        for (i = 0; i < n; i++)
            ((uint16_t *)dst)[i * dst_st] = ((const uint16_t *)src)[i * src_st];
    } else if (es == 4) {
        for (i = 0; i < n; i++)
            ((uint32_t *)dst)[i * dst_st] = ((const uint32_t *)src)[i * src_st];
    } else {
        for (i = 0; i < n; i++)
            memcpy(dst + i * dst_st * (int64_t)es, src + i * src_st * (int64_t)es, es);
    }
}

static void gather_rows(const struct kvc_view *src, const struct kvc_view *dst,
                        const struct kvc_view *idx, int64_t b, int64_t h, int64_t i0,
                        int64_t i1)
{
    const size_t es = kvc_dtype_size((enum kvc_dtype)src->dtype);
    const char *s = (const char *)src->data +
                    (b * src->strides[0] + h * src->strides[1]) * (int64_t)es;
    char *d = (char *)dst->data + (b * dst->strides[0] + h * dst->strides[1]) * (int64_t)es;
    const int64_t ib = b * idx->strides[0] + h * idx->strides[1];
    int64_t i;
    for (i = i0; i < i1; i++) {
        const int64_t t = kvc_load_index(idx->data, idx->dtype, ib + i * idx->strides[2]);
        copy_row(d + i * dst->strides[2] * (int64_t)es, dst->strides[3],
                 s + t * src->strides[2] * (int64_t)es, src->strides[3], src->shape[3], es);
    }
}

enum kvc_status kvc_gather(const struct kvc_gather_params *p)
{
    const int64_t B = p->indices.shape[0], H = p->indices.shape[1], n = p->indices.shape[2];
    const int64_t per_head = (n + GATHER_ROWS - 1) / GATHER_ROWS;
    const int64_t units = B * H * per_head;
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    int64_t u;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (u = 0; u < units; u++) {
        const int64_t bh = u / per_head, c = u % per_head;
        const int64_t i1 = (c + 1) * GATHER_ROWS < n ? (c + 1) * GATHER_ROWS : n;
        gather_rows(&p->keys, &p->out_keys, &p->indices, bh / H, bh % H, c * GATHER_ROWS, i1);
        gather_rows(&p->values, &p->out_values, &p->indices, bh / H, bh % H, c * GATHER_ROWS,
                    i1);
    }
    return KVC_OK;
}

enum kvc_status kvc_indices_check(const struct kvc_view *idx, int64_t lo, int64_t hi,
                                  int64_t *bad_value, int64_t bad_pos[KVC_MAX_DIMS])
{
    int64_t pos[KVC_MAX_DIMS] = {0, 0, 0, 0};
    int64_t total = 1, e;
    int d;
    for (d = 0; d < idx->ndim; d++) total *= idx->shape[d];
    for (e = 0; e < total; e++) {
        int64_t off = 0, rem = e, v;
        for (d = idx->ndim - 1; d >= 0; d--) {
            pos[d] = rem % idx->shape[d];
            rem /= idx->shape[d];
            off += pos[d] * idx->strides[d];
        }
        v = kvc_load_index(idx->data, idx->dtype, off);
        if (v < lo || v >= hi) {
            *bad_value = v;
            for (d = 0; d < KVC_MAX_DIMS; d++) bad_pos[d] = d < idx->ndim ? pos[d] : 0;
            return KVC_ERR_INVALID;
        }
    }
    return KVC_OK;
}
