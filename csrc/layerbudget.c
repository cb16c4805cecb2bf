/*
 * layerbudget.c - pooled_counts and row_cosine (CPU). One parallel unit per
 * batch row (pooled_counts) or per vector (row_cosine); each unit's result
 * depends on its own inputs only, so results do not depend on the thread count.
 */
#include <math.h>

#include "layerbudget.h"
#include "layerbudget_math.h"

static inline float pc_score(const struct kvc_view *s, int64_t b, int64_t l, int64_t j)
{
    return ((const float *)s->data)[b * s->strides[0] + l * s->strides[1] + j * s->strides[2]];
}

/* Entries of row b whose key is >= t. */
static int64_t pc_at_least(const struct kvc_view *s, int64_t b, uint32_t t)
{
    const int64_t L = s->shape[1], M = s->shape[2];
    int64_t l, j, n = 0;
    for (l = 0; l < L; l++)
        for (j = 0; j < M; j++) n += kvc_lb_key(pc_score(s, b, l, j)) >= t;
    return n;
}

static void pc_row(const struct kvc_pooled_counts_params *p, int64_t b)
{
    const struct kvc_view *s = &p->scores;
    const int64_t L = s->shape[1], M = s->shape[2];
    const int64_t k = ((const int64_t *)p->k.data)[b * p->k.strides[0]];
    int64_t *out = (int64_t *)p->counts.data;
    uint32_t t = 0;
    int64_t ties, l, j;
    int bit;
    if (k == 0) {
        for (l = 0; l < L; l++) out[b * p->counts.strides[0] + l * p->counts.strides[1]] = 0;
        return;
    }
    /* the largest key t with at least k entries >= t: the k-th largest key */
    for (bit = 31; bit >= 0; bit--) {
        const uint32_t cand = t | ((uint32_t)1 << bit);
        if (pc_at_least(s, b, cand) >= k) t = cand;
    }
    ties = k - (t == 0xffffffffu ? 0 : pc_at_least(s, b, t + 1));
    for (l = 0; l < L; l++) {
        int64_t above = 0, equal = 0, take;
        for (j = 0; j < M; j++) {
            const uint32_t key = kvc_lb_key(pc_score(s, b, l, j));
            above += key > t;
            equal += key == t;
        }
        take = equal < ties ? equal : ties;
        ties -= take;
        out[b * p->counts.strides[0] + l * p->counts.strides[1]] = above + take;
    }
}

enum kvc_status kvc_pooled_counts(const struct kvc_pooled_counts_params *p)
{
    const int64_t B = p->scores.shape[0], L = p->scores.shape[1], M = p->scores.shape[2];
    const int nt = p->num_threads > 0 ? p->num_threads : 1;
    int64_t b, l, j;
    for (b = 0; b < B; b++) {
        const int64_t k = ((const int64_t *)p->k.data)[b * p->k.strides[0]];
        if (k < 0 || k > L * M) return KVC_ERR_INVALID;
        for (l = 0; l < L; l++)
            for (j = 0; j < M; j++)
                if (isnan(pc_score(&p->scores, b, l, j))) return KVC_ERR_NAN;
    }
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (b = 0; b < B; b++) pc_row(p, b);
    return KVC_OK;
}

enum kvc_status kvc_row_cosine(const struct kvc_row_cosine_params *p)
{
    const int64_t N = p->x.shape[0], D = p->x.shape[1];
    const int nt = p->num_threads > 0 ? p->num_threads : 1;
    int64_t n;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (n = 0; n < N; n++) {
        float xy = 0.0f, xx = 0.0f, yy = 0.0f;
        int64_t d;
        for (d = 0; d < D; d++) {
            const float a = kvc_load_f32(p->x.data, p->x.dtype, n * p->x.strides[0] + d * p->x.strides[1]);
            const float c = kvc_load_f32(p->y.data, p->y.dtype, n * p->y.strides[0] + d * p->y.strides[1]);
            xy += a * c;
            xx += a * a;
            yy += c * c;
        }
        ((float *)p->out.data)[n * p->out.strides[0]] = kvc_lb_cosine(xy, xx, yy);
    }
    return KVC_OK;
}
