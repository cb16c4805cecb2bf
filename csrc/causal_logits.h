/*
 * causal_logits.h - scaled q.k logits of a chunk of window queries against
 * the keys each sees causally (CPU), shared by the ops that softmax a
 * window's attention rows themselves (Keyformer's noisy scores, FastGen's
 * recovery).
 *
 * Both tile the same way: the chunk's queries are converted to fp32 once,
 * the keys KB at a time, so a key row is read once per chunk whatever the
 * dtype and strides, and every logit is one kvc_dot_f32 (the lane order the
 * CUDA twins reproduce).
 */
#ifndef KVC_CAUSAL_LOGITS_H
#define KVC_CAUSAL_LOGITS_H

#include "kvc.h"
#include "kvc_math.h"

/* Query i of the chunk (0 <= i < nq) is query c0 + i of the head whose rows
 * start at `qh` (strides of `q`); it sits at key position p0 + c0 + i and
 * sees keys [s, p0 + c0 + i] of the kv head at `kh` (strides of `k`). Row i
 * of `logits` (row stride `ld`) gets scaling * q.k for those keys, key s at
 * index 0; entries past a row's last key are left alone. `qbuf` holds
 * [nq, D] floats, `ktmp` [kb_tile, D]. */
static inline void kvc_causal_logits(const struct kvc_view *q, const char *qh, const struct kvc_view *k,
                                     const char *kh, int64_t D, int64_t c0, int64_t nq, int64_t p0, int64_t s,
                                     int64_t kb_tile, float scaling, float *qbuf, float *ktmp, float *logits,
                                     int64_t ld)
{
    const int64_t es = (int64_t)kvc_dtype_size((enum kvc_dtype)q->dtype);
    const int64_t L = p0 + c0 + nq - s; /* keys the chunk's last query sees */
    int64_t i, kb;
    for (i = 0; i < nq; i++)
        kvc_row_to_f32(qbuf + i * D, qh + (c0 + i) * q->strides[2] * es, q->dtype, D, q->strides[3]);
    for (kb = 0; kb < L; kb += kb_tile) {
        const int64_t nk = L - kb < kb_tile ? L - kb : kb_tile;
        int64_t l;
        for (l = 0; l < nk; l++)
            kvc_row_to_f32(ktmp + l * D, kh + (s + kb + l) * k->strides[2] * es, k->dtype, D, k->strides[3]);
        for (i = 0; i < nq; i++) {
            const int64_t n = p0 + c0 + i - s + 1; /* keys query i sees */
            const int64_t lim = n - kb < nk ? n - kb : nk;
            float *row = logits + i * ld + kb;
            for (l = 0; l < lim; l++) row[l] = scaling * kvc_dot_f32(qbuf + i * D, ktmp + l * D, D);
        }
    }
}

/* A thread's buffers for kvc_causal_logits with chunks of `qc` queries and
 * tiles of `kb` keys: qbuf [qc, D], ktmp [kb, D], logits [qc, Tk], carved
 * from `mine` in that order. */
static inline size_t kvc_causal_thread_bytes(int64_t D, int64_t Tk, int64_t qc, int64_t kb)
{
    return kvc_align_up((size_t)(qc * D) * sizeof(float)) + kvc_align_up((size_t)(kb * D) * sizeof(float)) +
           kvc_align_up((size_t)(qc * (Tk > 0 ? Tk : 1)) * sizeof(float));
}

static inline void kvc_causal_buffers(char *mine, int64_t D, int64_t qc, int64_t kb, float **qbuf, float **ktmp,
                                      float **logits)
{
    const size_t qb = kvc_align_up((size_t)(qc * D) * sizeof(float));
    *qbuf = (float *)mine;
    *ktmp = (float *)(mine + qb);
    *logits = (float *)(mine + qb + kvc_align_up((size_t)(kb * D) * sizeof(float)));
}

#endif /* KVC_CAUSAL_LOGITS_H */
