/*
 * kvcrush.cu - KVCrush's representative tokens (kvcrush.c) on the GPU.
 *
 * One block per batch row. Thresholds are summed per head by one thread in
 * slot order (the CPU's order, so the same bits); distances are computed
 * one slot per thread and counted with integer atomics (order-free); the
 * ranking scan gives one thread per distance, each walking the slots in
 * order, so a candidate's rank within its distance is the CPU's.
 */
#include "common.cuh"

#include "../kvcrush_math.h"

#define KVC_KC_THREADS 256

static __global__ void __launch_bounds__(KVC_KC_THREADS)
kvc_kvcrush_kernel(const struct kvc_kvcrush_pick_params p)
{
    extern __shared__ unsigned long long kc_shared[];
    const int64_t b = blockIdx.x;
    const int64_t H = p.mass.shape[1], T = p.mass.shape[2], G = p.picks.shape[1];
    const int64_t s = p.kv_start ? p.kv_start[b * p.kv_start_stride] : 0;
    const float *mass = (const float *)p.mass.data + b * p.mass.strides[0];
    const uint8_t *kept = (const uint8_t *)p.kept.data + b * p.kept.strides[0];
    int64_t *dist = (int64_t *)p.dist.data + b * p.dist.strides[0];
    int64_t *picks = (int64_t *)p.picks.data + b * p.picks.strides[0];
    const int64_t ms = p.mass.strides[2], hs = p.mass.strides[1], ks = p.kept.strides[1],
                  ds = p.dist.strides[1];
    /* layout: count[H + 1] and m (u64), then thr[H] (f32), then abit[H] (i32) */
    unsigned long long *count = kc_shared;
    unsigned long long *m_cand = count + (H + 1);
    float *thr = (float *)(m_cand + 1);
    int32_t *abit = (int32_t *)(thr + H);

    for (int64_t g = threadIdx.x; g < G; g += blockDim.x) picks[g * p.picks.strides[1]] = -1;
    for (int64_t j = threadIdx.x; j < s && j < T; j += blockDim.x) dist[j * ds] = -1;
    if (T - s <= 0) return;
    for (int64_t d = threadIdx.x; d <= H; d += blockDim.x) count[d] = 0;
    if (threadIdx.x == 0) *m_cand = 0;
    __syncthreads();

    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
        float sum = 0.0f;
        for (int64_t j = s; j < T; j++) sum += mass[h * hs + j * ms];
        thr[h] = sum / (float)(T - s);
    }
    for (int64_t j = s + threadIdx.x; j < T; j += blockDim.x)
        if (kept[j * ks] == 0) atomicAdd(m_cand, 1ULL);
    __syncthreads();

    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
        if (p.anchor == KVC_KVCRUSH_MEAN) {
            int64_t ones = 0;
            for (int64_t j = s; j < T; j++) ones += kept[j * ks] == 0 && mass[h * hs + j * ms] > thr[h];
            abit[h] = 2 * ones > (int64_t)*m_cand;
        } else {
            abit[h] = kvc_kvcrush_fixed_bit(p.anchor, (uint64_t)p.seed, h);
        }
    }
    __syncthreads();

    for (int64_t j = s + threadIdx.x; j < T; j += blockDim.x) {
        int64_t n = 0;
        if (kept[j * ks]) {
            dist[j * ds] = -1;
            continue;
        }
        for (int64_t h = 0; h < H; h++) n += (mass[h * hs + j * ms] > thr[h]) != abit[h];
        dist[j * ds] = n;
        atomicAdd(&count[n], 1ULL);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned long long r = 0;
        for (int64_t d = 0; d <= H; d++) {
            const unsigned long long c = count[d];
            count[d] = r;
            r += c;
        }
    }
    __syncthreads();

    /* the block's own global writes above are visible after the barrier */
    for (int64_t d = threadIdx.x; d <= H; d += blockDim.x) {
        int64_t r = (int64_t)count[d];
        for (int64_t j = s; j < T; j++) {
            if (dist[j * ds] != d) continue;
            const int64_t g = kvc_kvcrush_bucket(r++, (int64_t)*m_cand, G);
            if (g >= 0) picks[g * p.picks.strides[1]] = j;
        }
    }
}

extern "C" enum kvc_status kvc_cuda_kvcrush_pick(const struct kvc_kvcrush_pick_params *p, void *stream)
{
    const int64_t B = p->mass.shape[0], H = p->mass.shape[1];
    const size_t shared = (size_t)(H + 2) * sizeof(unsigned long long) + (size_t)H * sizeof(float) +
                          (size_t)H * sizeof(int32_t);
    if (p->anchor < KVC_KVCRUSH_ALTERNATE || p->anchor > KVC_KVCRUSH_MEAN) return KVC_ERR_INVALID;
    if (B == 0) return KVC_OK;
    if (B > INT32_MAX || shared > 48 * 1024) return KVC_ERR_UNSUPPORTED;
    kvc_kvcrush_kernel<<<(unsigned)B, KVC_KC_THREADS, shared, KVC_STREAM(stream)>>>(*p);
    KVC_CUDA_LAUNCHED();
    return KVC_OK;
}
