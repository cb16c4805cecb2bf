/*
 * kvcrush.c - KVCrush's representative tokens (CPU); the contract is in
 * kvcrush.h.
 *
 * One batch row is one sequential unit (threads split rows), so results
 * are bit-identical for any thread count. The distances go straight into
 * the `dist` output, which the ranking pass then reads back: the op needs
 * scratch only for the per-head thresholds and anchor and the H + 1
 * distance counters.
 */
#include <string.h>

#include "kvcrush.h"
#include "kvcrush_math.h"

static size_t kc_thread_bytes(const struct kvc_kvcrush_pick_params *p)
{
    const size_t H = (size_t)p->mass.shape[1];
    return kvc_align_up(H * sizeof(float)) + kvc_align_up(H * sizeof(int32_t)) +
           kvc_align_up((H + 1) * sizeof(int64_t));
}

size_t kvc_kvcrush_pick_scratch_bytes(const struct kvc_kvcrush_pick_params *p)
{
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    return KVC_ALIGN + (size_t)nt * kc_thread_bytes(p);
}

static void kc_row(const struct kvc_kvcrush_pick_params *p, int64_t b, float *thr, int32_t *abit,
                   int64_t *next)
{
    const int64_t H = p->mass.shape[1], T = p->mass.shape[2], G = p->picks.shape[1];
    const int64_t s = p->kv_start ? p->kv_start[b * p->kv_start_stride] : 0;
    const float *mass = (const float *)p->mass.data + b * p->mass.strides[0];
    const uint8_t *kept = (const uint8_t *)p->kept.data + b * p->kept.strides[0];
    int64_t *dist = (int64_t *)p->dist.data + b * p->dist.strides[0];
    int64_t *picks = (int64_t *)p->picks.data + b * p->picks.strides[0];
    const int64_t ms = p->mass.strides[2], ks = p->kept.strides[1], ds = p->dist.strides[1];
    int64_t h, j, d, m = 0;

    for (j = 0; j < G; j++) picks[j * p->picks.strides[1]] = -1;
    for (j = 0; j < s; j++) dist[j * ds] = -1;
    if (T - s <= 0) return;

    for (h = 0; h < H; h++) {
        const float *row = mass + h * p->mass.strides[1];
        float sum = 0.0f;
        for (j = s; j < T; j++) sum += row[j * ms];
        thr[h] = sum / (float)(T - s);
    }
    for (j = s; j < T; j++) m += kept[j * ks] == 0;
    for (h = 0; h < H; h++) {
        if (p->anchor == KVC_KVCRUSH_MEAN) {
            /* the majority bit of the candidates: the anchor sits at their centre */
            const float *row = mass + h * p->mass.strides[1];
            int64_t ones = 0;
            for (j = s; j < T; j++) ones += kept[j * ks] == 0 && row[j * ms] > thr[h];
            abit[h] = 2 * ones > m;
        } else {
            abit[h] = kvc_kvcrush_fixed_bit(p->anchor, (uint64_t)p->seed, h);
        }
    }
    for (d = 0; d <= H; d++) next[d] = 0;
    for (j = s; j < T; j++) {
        int64_t n = 0;
        if (kept[j * ks]) {
            dist[j * ds] = -1;
            continue;
        }
        for (h = 0; h < H; h++) n += (mass[h * p->mass.strides[1] + j * ms] > thr[h]) != abit[h];
        dist[j * ds] = n;
        next[n]++;
    }
    /* counts -> first rank of each distance, then the scan hands out ranks
     * in slot order within a distance */
    {
        int64_t r = 0;
        for (d = 0; d <= H; d++) {
            const int64_t c = next[d];
            next[d] = r;
            r += c;
        }
    }
    for (j = s; j < T; j++) {
        const int64_t dj = dist[j * ds];
        int64_t g;
        if (dj < 0) continue;
        g = kvc_kvcrush_bucket(next[dj]++, m, G);
        if (g >= 0) picks[g * p->picks.strides[1]] = j;
    }
}

enum kvc_status kvc_kvcrush_pick(const struct kvc_kvcrush_pick_params *p)
{
    const int64_t B = p->mass.shape[0];
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    char *base;
    int64_t b;
    if (p->anchor < KVC_KVCRUSH_ALTERNATE || p->anchor > KVC_KVCRUSH_MEAN) return KVC_ERR_INVALID;
    if (B == 0) return KVC_OK;
    if (p->scratch == NULL || p->scratch_bytes < kvc_kvcrush_pick_scratch_bytes(p)) return KVC_ERR_NOMEM;
    base = (char *)(((uintptr_t)p->scratch + (KVC_ALIGN - 1)) & ~(uintptr_t)(KVC_ALIGN - 1));
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (b = 0; b < B; b++) {
        const size_t H = (size_t)p->mass.shape[1];
        char *mine = base + (size_t)KVC_THREAD_ID() * kc_thread_bytes(p);
        float *thr = (float *)mine;
        int32_t *abit = (int32_t *)(mine + kvc_align_up(H * sizeof(float)));
        int64_t *next = (int64_t *)(mine + kvc_align_up(H * sizeof(float)) + kvc_align_up(H * sizeof(int32_t)));
        kc_row(p, b, thr, abit, next);
    }
    return KVC_OK;
}
