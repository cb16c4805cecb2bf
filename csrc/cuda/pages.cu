/*
 * pages.cu - per-page key bounds and Quest page scores (pages.c) on the GPU,
 * uniform and ragged layers: the same per-element math and summation order
 * as the CPU ops.
 */
#include "common.cuh"

#define KVC_PAGES_THREADS 128

/* A block per (b, h, page), threads over the channels. */
template <int DT>
static __global__ void __launch_bounds__(KVC_PAGES_THREADS)
kvc_page_bounds_kernel(const struct kvc_page_bounds_params p)
{
    const int64_t H = p.keys.shape[1], n = p.keys.shape[2], D = p.keys.shape[3], P = p.page_size;
    const int64_t span = p.last - p.first;
    const int64_t r = blockIdx.x, pg = p.first + r % span, h = (r / span) % H, b = r / (span * H);
    const int64_t es = DT == KVC_F32 ? 4 : 2;
    const char *kh = (const char *)p.keys.data + (b * p.keys.strides[0] + h * p.keys.strides[1]) * es;
    const int64_t j1 = (pg + 1) * P < n ? (pg + 1) * P : n;
    for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
        float lo = INFINITY, hi = -INFINITY;
        for (int64_t j = pg * P; j < j1; j++) {
            const float x = kvc_load_f32(kh + j * p.keys.strides[2] * es, DT, c * p.keys.strides[3]);
            if (x != x) lo = hi = x;
            else if (x < lo) lo = x;
            if (x > hi) hi = x;
        }
        ((float *)p.kmin.data)[kvc_at(p.kmin, b, h, pg, c)] = lo;
        ((float *)p.kmax.data)[kvc_at(p.kmax, b, h, pg, c)] = hi;
    }
}

/* Ragged: block (head i, y) takes the head's pages first_page[i] + y,
 * + gridDim.y, ...: the host cannot see how many pages a head has (its
 * lengths live on the device), so blocks past a head's pages just exit. */
template <int DT>
static __global__ void __launch_bounds__(KVC_PAGES_THREADS)
kvc_page_bounds_ragged_kernel(const struct kvc_page_bounds_params p)
{
    const int64_t i = blockIdx.x, P = p.page_size, D = p.keys.shape[1];
    const int64_t n = p.lengths[i * p.lengths_stride], np = (n + P - 1) / P;
    const int64_t es = DT == KVC_F32 ? 4 : 2, ks = p.keys.strides[0], kc = p.keys.strides[1];
    const int64_t prow = p.page_offsets[i * p.page_offsets_stride];
    const char *kh = (const char *)p.keys.data + p.offsets[i * p.offsets_stride] * ks * es;
    for (int64_t pg = p.first_page[i * p.first_page_stride] + blockIdx.y; pg < np; pg += gridDim.y) {
        const int64_t j1 = (pg + 1) * P < n ? (pg + 1) * P : n;
        for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
            float lo = INFINITY, hi = -INFINITY;
            for (int64_t j = pg * P; j < j1; j++) {
                const float x = kvc_load_f32(kh + j * ks * es, DT, c * kc);
                if (x != x) lo = hi = x;
                else if (x < lo) lo = x;
                if (x > hi) hi = x;
            }
            ((float *)p.kmin.data)[(prow + pg) * p.kmin.strides[0] + c * p.kmin.strides[1]] = lo;
            ((float *)p.kmax.data)[(prow + pg) * p.kmax.strides[0] + c * p.kmax.strides[1]] = hi;
        }
    }
}

/* Pages per head the ragged launch spreads over its blocks: the bound
 * rows per head on average (a full recompute), capped, since an append
 * touches one or two pages and extra blocks only exit. */
#define KVC_PAGES_RAGGED_SPLIT 64

static enum kvc_status kvc_cuda_page_bounds_ragged(const struct kvc_page_bounds_params *p, cudaStream_t st)
{
    const int64_t N = p->num_heads, Rp = p->kmin.shape[0];
    if (p->page_size < 1 || N < 0) return KVC_ERR_INVALID;
    if (N == 0 || Rp == 0 || p->keys.shape[1] == 0) return KVC_OK;
    if (N > INT32_MAX) return KVC_ERR_UNSUPPORTED;
    int64_t ny = kvc_ceil_div(Rp, N);
    ny = ny < 1 ? 1 : (ny > KVC_PAGES_RAGGED_SPLIT ? KVC_PAGES_RAGGED_SPLIT : ny);
    const dim3 grid((unsigned)N, (unsigned)ny);
    switch (p->keys.dtype) {
    case KVC_F16: kvc_page_bounds_ragged_kernel<KVC_F16><<<grid, KVC_PAGES_THREADS, 0, st>>>(*p); break;
    case KVC_BF16: kvc_page_bounds_ragged_kernel<KVC_BF16><<<grid, KVC_PAGES_THREADS, 0, st>>>(*p); break;
    case KVC_F32: kvc_page_bounds_ragged_kernel<KVC_F32><<<grid, KVC_PAGES_THREADS, 0, st>>>(*p); break;
    default: return KVC_ERR_UNSUPPORTED;
    }
    KVC_CUDA_LAUNCHED();
    return KVC_OK;
}

extern "C" enum kvc_status kvc_cuda_page_bounds(const struct kvc_page_bounds_params *p, void *stream)
{
    cudaStream_t st = KVC_STREAM(stream);
    if (p->offsets != NULL) return kvc_cuda_page_bounds_ragged(p, st);
    const int64_t B = p->keys.shape[0], H = p->keys.shape[1], n = p->keys.shape[2];
    const int64_t blocks = B * H * (p->last - p->first);
    if (p->page_size < 1 || p->first < 0 || p->last < p->first) return KVC_ERR_INVALID;
    if (p->last > p->first && (p->last - 1) * p->page_size >= n) return KVC_ERR_INVALID;
    if (blocks == 0) return KVC_OK;
    if (blocks > INT32_MAX) return KVC_ERR_UNSUPPORTED;
    switch (p->keys.dtype) {
    case KVC_F16: kvc_page_bounds_kernel<KVC_F16><<<(unsigned)blocks, KVC_PAGES_THREADS, 0, st>>>(*p); break;
    case KVC_BF16: kvc_page_bounds_kernel<KVC_BF16><<<(unsigned)blocks, KVC_PAGES_THREADS, 0, st>>>(*p); break;
    case KVC_F32: kvc_page_bounds_kernel<KVC_F32><<<(unsigned)blocks, KVC_PAGES_THREADS, 0, st>>>(*p); break;
    default: return KVC_ERR_UNSUPPORTED;
    }
    KVC_CUDA_LAUNCHED();
    return KVC_OK;
}

/* A thread per (b, h, page): channels summed in ascending order as on the
 * CPU, so the scores are the same floats. */
template <int DT>
static __global__ void __launch_bounds__(KVC_PAGES_THREADS)
kvc_page_scores_kernel(const struct kvc_page_scores_params p, int64_t total)
{
    const int64_t Hq = p.q.shape[1], D = p.q.shape[2], H = p.out.shape[1], np = p.out.shape[2];
    const int64_t g = Hq / H, es = DT == KVC_F32 ? 4 : 2;
    const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= total) return;
    const int64_t pg = r % np, h = (r / np) % H, b = r / (np * H);
    const bool ragged = p.page_offsets != NULL;
    /* ragged: right-aligned, column pg holds page pg - p0 (pages.h) */
    const int64_t p0 = ragged ? np - (p.lengths[(b * H + h) * p.lengths_stride] + p.page_size - 1) / p.page_size
                       : p.first_page ? p.first_page[b * p.first_page_stride] : 0;
    float *out = (float *)p.out.data + kvc_at(p.out, b, h, pg, 0);
    if (pg < p0) {
        *out = -INFINITY;
        return;
    }
    const int64_t row = ragged ? p.page_offsets[(b * H + h) * p.page_offsets_stride] + pg - p0 : 0;
    const float *lo = (const float *)p.kmin.data +
                      (ragged ? row * p.kmin.strides[0] : kvc_at(p.kmin, b, h, pg, 0));
    const float *hi = (const float *)p.kmax.data +
                      (ragged ? row * p.kmax.strides[0] : kvc_at(p.kmax, b, h, pg, 0));
    const int64_t lc = p.kmin.strides[ragged ? 1 : 3], hc = p.kmax.strides[ragged ? 1 : 3];
    float red = p.gqa == 0 ? -INFINITY : 0.0f;
    for (int64_t gi = 0; gi < g; gi++) {
        const char *qr = (const char *)p.q.data + (b * p.q.strides[0] + (h * g + gi) * p.q.strides[1]) * es;
        /* the CPU's lane order (kvc_bound_dot_f32), elements loaded in place */
        float acc[KVC_LANES];
        for (int l = 0; l < KVC_LANES; l++) acc[l] = 0.0f;
        for (int64_t c = 0; c < D; c++) {
            const float qc = kvc_load_f32(qr, DT, c * p.q.strides[2]);
            const float a = __fmul_rn(qc, hi[c * hc]), m = __fmul_rn(qc, lo[c * lc]);
            acc[c % KVC_LANES] = __fadd_rn(acc[c % KVC_LANES], a > m ? a : m);
        }
        const float u = kvc_lanes_sum(acc);
        if (p.gqa == 0) red = (u > red || u != u) ? u : red; /* NaN sticks */
        else red = __fadd_rn(red, u);
    }
    *out = p.gqa == 0 ? red : __fdiv_rn(red, (float)g);
}

extern "C" enum kvc_status kvc_cuda_page_scores(const struct kvc_page_scores_params *p, void *stream)
{
    const int64_t B = p->q.shape[0], Hq = p->q.shape[1], H = p->out.shape[1], np = p->out.shape[2];
    const int64_t total = B * H * np;
    cudaStream_t st = KVC_STREAM(stream);
    if (H <= 0 || Hq % H != 0 || (p->gqa != 0 && p->gqa != 1)) return KVC_ERR_INVALID;
    if (total == 0) return KVC_OK;
    const int64_t blocks = (total + KVC_PAGES_THREADS - 1) / KVC_PAGES_THREADS;
    if (blocks > INT32_MAX) return KVC_ERR_UNSUPPORTED;
    switch (p->q.dtype) {
    case KVC_F16: kvc_page_scores_kernel<KVC_F16><<<(unsigned)blocks, KVC_PAGES_THREADS, 0, st>>>(*p, total); break;
    case KVC_BF16: kvc_page_scores_kernel<KVC_BF16><<<(unsigned)blocks, KVC_PAGES_THREADS, 0, st>>>(*p, total); break;
    case KVC_F32: kvc_page_scores_kernel<KVC_F32><<<(unsigned)blocks, KVC_PAGES_THREADS, 0, st>>>(*p, total); break;
    default: return KVC_ERR_UNSUPPORTED;
    }
    KVC_CUDA_LAUNCHED();
    return KVC_OK;
}
