/*
 * fastgen.cu - FastGen's attention recovery per ladder policy (fastgen.c)
 * on the GPU: a block per (b, query head) walks the window's queries in
 * order, its threads striding over the keys and binning each query's
 * softmax by the slots' rungs (block reductions, then thread 0 adds the
 * bins in query order); a second kernel adds the query heads of each kv
 * head in head order and accumulates the bins, as on the CPU.
 */
#include "common.cuh"
#include "head_rows.cuh"

static __global__ void __launch_bounds__(KVC_HEAD_THREADS)
kvc_fastgen_heads_kernel(const struct kvc_fastgen_recovery_params p, float *heads, float *rows)
{
    extern __shared__ float qrow[];
    __shared__ float red[KVC_HEAD_THREADS];
    const int64_t Hq = p.q.shape[1], Tq = p.q.shape[2], D = p.q.shape[3];
    const int64_t Hkv = p.k.shape[1], Tk = p.k.shape[2], P = p.out.shape[2];
    const int64_t u = blockIdx.x, b = u / Hq, h = u % Hq, hk = h / (Hq / Hkv);
    const int64_t s = p.kv_start ? p.kv_start[b * p.kv_start_stride] : 0;
    const int64_t p0 = Tk - Tq;
    float *bins = heads + u * P, *row = rows + u * Tk;
    const int64_t qbase = kvc_at(p.q, b, h, 0, 0), kbase = kvc_at(p.k, b, hk, 0, 0);
    const uint8_t *rung = (const uint8_t *)p.rung.data + b * p.rung.strides[0] + hk * p.rung.strides[1];
    const int64_t rs = p.rung.strides[2];
    if (threadIdx.x == 0)
        for (int64_t r = 0; r < P; r++) bins[r] = 0.0f;
    for (int64_t i = 0; i < Tq; i++) {
        const int64_t n = p0 + i - s + 1; /* keys query i sees, from s */
        if (n <= 0) continue;
        __syncthreads();
        for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
            qrow[d] = kvc_load_f32(p.q.data, p.q.dtype, qbase + i * p.q.strides[2] + d * p.q.strides[3]);
        __syncthreads();
        float m = -INFINITY;
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
            const int64_t kj = kbase + (s + j) * p.k.strides[2];
            float dot = 0.0f;
            for (int64_t d = 0; d < D; d++) dot += qrow[d] * kvc_load_f32(p.k.data, p.k.dtype, kj + d * p.k.strides[3]);
            const float z = p.scaling * dot;
            row[j] = z;
            m = fmaxf(m, z);
        }
        m = kvc_head_block_reduce(m, red, 1);
        float sum = 0.0f;
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
            const float e = kvc_expf(row[j] - m);
            row[j] = e;
            sum += e;
        }
        sum = kvc_head_block_reduce(sum, red, 0);
        const float inv = 1.0f / sum;
        /* one block reduction per rung: P is small (FastGen: 5) */
        for (int64_t r = 0; r < P; r++) {
            float part = 0.0f;
            for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
                if ((int64_t)rung[(s + j) * rs] == r) part += row[j] * inv;
            part = kvc_head_block_reduce(part, red, 0);
            if (threadIdx.x == 0) bins[r] += part;
        }
    }
}

static __global__ void kvc_fastgen_reduce_kernel(const struct kvc_fastgen_recovery_params p, const float *heads)
{
    const int64_t Hq = p.q.shape[1], Tq = p.q.shape[2], Hkv = p.k.shape[1], Tk = p.k.shape[2], g = Hq / Hkv;
    const int64_t P = p.out.shape[2];
    const int64_t total = p.k.shape[0] * Hkv;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t b = e / Hkv, hk = e % Hkv;
        const int64_t s = p.kv_start ? p.kv_start[b * p.kv_start_stride] : 0;
        const int64_t first_q = s - (Tk - Tq) > 0 ? s - (Tk - Tq) : 0;
        const int64_t Q = Tq - first_q > 0 ? Tq - first_q : 0;
        float *out = (float *)p.out.data;
        if (Q == 0) {
            for (int64_t r = 0; r < P; r++) out[kvc_at(p.out, b, hk, r, 0)] = 1.0f;
            continue;
        }
        const float *first = heads + (b * Hq + hk * g) * P;
        float cum = 0.0f;
        for (int64_t r = 0; r < P; r++) {
            float v = first[r];
            for (int64_t h = 1; h < g; h++) v += first[h * P + r];
            cum += v;
            out[kvc_at(p.out, b, hk, r, 0)] = cum / ((float)g * (float)Q);
        }
    }
}

extern "C" size_t kvc_cuda_fastgen_recovery_workspace(const struct kvc_fastgen_recovery_params *p)
{
    const size_t bq = (size_t)(p->q.shape[0] * p->q.shape[1]);
    return KVC_ALIGN + kvc_align_up(bq * (size_t)p->out.shape[2] * sizeof(float)) +
           kvc_align_up(bq * (size_t)(p->k.shape[2] > 0 ? p->k.shape[2] : 1) * sizeof(float));
}

extern "C" enum kvc_status kvc_cuda_fastgen_recovery(const struct kvc_fastgen_recovery_params *p, void *stream)
{
    const int64_t B = p->q.shape[0], Hq = p->q.shape[1], D = p->q.shape[3];
    const int64_t Hkv = p->k.shape[1], Tk = p->k.shape[2], P = p->out.shape[2];
    if (P < 1 || P > KVC_FASTGEN_MAX_RUNGS) return KVC_ERR_INVALID;
    if (B == 0 || Hkv == 0) return KVC_OK;
    if (p->scratch == NULL || p->scratch_bytes < kvc_cuda_fastgen_recovery_workspace(p)) return KVC_ERR_NOMEM;
    if (B * Hq > INT32_MAX || (size_t)D * sizeof(float) > 48 * 1024) return KVC_ERR_UNSUPPORTED;
    char *cur = (char *)(((uintptr_t)p->scratch + (KVC_ALIGN - 1)) & ~(uintptr_t)(KVC_ALIGN - 1));
    float *heads = (float *)kvc_carve(&cur, (size_t)(B * Hq * P) * sizeof(float));
    float *rows = (float *)kvc_carve(&cur, (size_t)(B * Hq * (Tk > 0 ? Tk : 1)) * sizeof(float));
    kvc_fastgen_heads_kernel<<<(unsigned)(B * Hq), KVC_HEAD_THREADS, (size_t)(D > 0 ? D : 1) * sizeof(float),
                               KVC_STREAM(stream)>>>(*p, heads, rows);
    KVC_CUDA_LAUNCHED();
    int64_t blocks = kvc_ceil_div(B * Hkv, 256);
    if (blocks > 65536) blocks = 65536; /* grid-stride beyond */
    kvc_fastgen_reduce_kernel<<<(unsigned)blocks, 256, 0, KVC_STREAM(stream)>>>(*p, heads);
    KVC_CUDA_LAUNCHED();
    return KVC_OK;
}
