/*
 * quant.cu - pack and unpack of the packed KV layout (quant.h) on the GPU.
 *
 * The same two passes as quant.c: a scan for refused values (NaN, +-Inf,
 * |x| > FLT_MAX / 2) whose first position
 * (row-major, by atomicMin) is read back before anything is written, then
 * one block per work unit, (b, h, token group) for keys and (b, h, token)
 * for values. A unit's threads first reduce its groups (a thread per
 * channel or per channel group) and store min and scale, then build the
 * code bytes (a thread per byte) from those stored values. Per element the
 * math is quant_math.h's, so the bits equal the CPU's.
 */
#include "common.cuh"

#include "../quant_math.h"

#define KVC_QUANT_THREADS 128
#define KVC_QUANT_MAX_BLOCKS 65536 /* grid-stride beyond */

static unsigned kvc_quant_blocks(int64_t units)
{
    return (unsigned)(units < KVC_QUANT_MAX_BLOCKS ? units : KVC_QUANT_MAX_BLOCKS);
}

/* The rows of x [B, H, n, D], a block per row: the row-major position of
 * the first refused element goes to *first (which starts at all ones). */
static __global__ void __launch_bounds__(KVC_QUANT_THREADS)
kvc_quant_scan_kernel(const struct kvc_view x, int64_t rows, unsigned long long *first)
{
    const int64_t H = x.shape[1], n = x.shape[2], D = x.shape[3];
    unsigned long long mine = ~0ull;
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const int64_t b = r / (H * n), h = (r / n) % H, j = r % n;
        const int64_t base = kvc_at(x, b, h, j, 0);
        for (int64_t c = threadIdx.x; c < D; c += blockDim.x)
            if (kvc_quant_refused(x.data, x.dtype, base + c * x.strides[3])) {
                const unsigned long long e = (unsigned long long)(r * D + c);
                mine = e < mine ? e : mine;
                break; /* later channels of this row come after it */
            }
        if (mine != ~0ull) break; /* and later rows too */
    }
    if (mine != ~0ull) atomicMin(first, mine);
}

/* Keys: token group t of head (b, h). A thread per channel reduces it over
 * the group's tokens, then a thread per (token, byte) packs. */
static __global__ void __launch_bounds__(KVC_QUANT_THREADS)
kvc_pack_keys_kernel(const struct kvc_pack_params p, int64_t units)
{
    const int64_t H = p.x.shape[1], n = p.x.shape[2], D = p.x.shape[3], G = p.group;
    const int64_t T = kvc_quant_groups(n, G), Db = p.codes.shape[3];
    const int32_t bits = p.bits, per = kvc_quant_per_byte(bits);
    float *mins = (float *)p.mins.data, *scales = (float *)p.scales.data;
    uint8_t *codes = (uint8_t *)p.codes.data;
    for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
        const int64_t b = u / (H * T), h = (u / T) % H, t = u % T;
        const int64_t j0 = t * G, j1 = n - j0 < G ? n : j0 + G;
        for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
            float mn = kvc_load_f32(p.x.data, p.x.dtype, kvc_at(p.x, b, h, j0, c)), mx = mn;
            for (int64_t j = j0 + 1; j < j1; j++) {
                const float v = kvc_load_f32(p.x.data, p.x.dtype, kvc_at(p.x, b, h, j, c));
                mn = v < mn ? v : mn;
                mx = v > mx ? v : mx;
            }
            mn = kvc_quant_min(mn);
            mins[kvc_at(p.mins, b, h, t, c)] = mn;
            scales[kvc_at(p.scales, b, h, t, c)] = kvc_quant_scale(mn, mx, bits);
        }
        __syncthreads(); /* the group's min and scale, visible to the block */
        for (int64_t e = threadIdx.x; e < (j1 - j0) * Db; e += blockDim.x) {
            const int64_t j = j0 + e / Db, k = e % Db;
            uint32_t byte = 0;
            for (int32_t i = 0; i < per && k * per + i < D; i++) {
                const int64_t c = k * per + i;
                const float v = kvc_load_f32(p.x.data, p.x.dtype, kvc_at(p.x, b, h, j, c));
                byte |= kvc_quant_code(v, mins[kvc_at(p.mins, b, h, t, c)],
                                       scales[kvc_at(p.scales, b, h, t, c)], bits)
                        << (i * bits);
            }
            codes[kvc_at(p.codes, b, h, j, k)] = (uint8_t)byte;
        }
        __syncthreads();
    }
}

/* Keys with feedback (quant.h): token group t of head (b, h). The group's
 * rows sit in shared memory; per channel, one thread reduces it, a thread
 * per row codes it and carries its error, then threads over (row, later
 * channel) apply the updates: the CPU's per-element math, so the same bits. */
static __global__ void __launch_bounds__(KVC_QUANT_THREADS)
kvc_pack_keys_feedback_kernel(const struct kvc_pack_params p, int64_t units)
{
    extern __shared__ float kvc_fb_smem[];
    const int64_t H = p.x.shape[1], n = p.x.shape[2], D = p.x.shape[3], G = p.group;
    const int64_t T = kvc_quant_groups(n, G), Db = p.codes.shape[3];
    const int32_t bits = p.bits, per = kvc_quant_per_byte(bits);
    const int64_t gmax = G < n ? G : n;
    float *rows = kvc_fb_smem;                 /* [gmax, D] */
    float *err = rows + gmax * D;              /* [gmax] */
    float *ms = err + gmax;                    /* min, scale of the channel */
    uint8_t *code = (uint8_t *)(ms + 2);       /* [gmax, D] */
    float *mins = (float *)p.mins.data, *scales = (float *)p.scales.data;
    uint8_t *codes = (uint8_t *)p.codes.data;
    const float *fw = (const float *)p.feedback.data;
    for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
        const int64_t b = u / (H * T), h = (u / T) % H, t = u % T;
        const int64_t j0 = t * G, g = n - j0 < G ? n - j0 : G;
        const int64_t f = p.feedback_index.data
                              ? ((const int64_t *)p.feedback_index.data)[kvc_at(p.feedback_index, b, h, t, 0)]
                              : h;
        for (int64_t e = threadIdx.x; e < g * D; e += blockDim.x)
            rows[e] = kvc_load_f32(p.x.data, p.x.dtype, kvc_at(p.x, b, h, j0 + e / D, e % D));
        __syncthreads();
        for (int64_t c = 0; c < D; c++) {
            if (threadIdx.x == 0) {
                kvc_quant_range(rows + c, g, D, bits, &ms[0], &ms[1]);
                mins[kvc_at(p.mins, b, h, t, c)] = ms[0];
                scales[kvc_at(p.scales, b, h, t, c)] = ms[1];
            }
            __syncthreads();
            for (int64_t j = threadIdx.x; j < g; j += blockDim.x) {
                const uint32_t q = kvc_quant_code(rows[j * D + c], ms[0], ms[1], bits);
                code[j * D + c] = (uint8_t)q;
                err[j] = rows[j * D + c] - kvc_dequant(ms[0], ms[1], q);
            }
            __syncthreads();
            const int64_t left = D - 1 - c;
            for (int64_t e = threadIdx.x; e < g * left; e += blockDim.x) {
                const int64_t j = e / left, c2 = c + 1 + e % left;
                if (err[j] != 0.0f)
                    rows[j * D + c2] = kvc_quant_feedback(
                        rows[j * D + c2], err[j],
                        fw[f * p.feedback.strides[0] + c * p.feedback.strides[1] + c2 * p.feedback.strides[2]]);
            }
            __syncthreads();
        }
        for (int64_t e = threadIdx.x; e < g * Db; e += blockDim.x) {
            const int64_t j = e / Db, k = e % Db;
            uint32_t byte = 0;
            for (int32_t i = 0; i < per && k * per + i < D; i++)
                byte |= (uint32_t)code[j * D + k * per + i] << (i * bits);
            codes[kvc_at(p.codes, b, h, j0 + j, k)] = (uint8_t)byte;
        }
        __syncthreads();
    }
}

/* Values: token (b, h, j). A thread per channel group reduces it (with
 * clip, over the row copied to shared memory first), then a thread per
 * byte packs. */
static __global__ void __launch_bounds__(KVC_QUANT_THREADS)
kvc_pack_values_kernel(const struct kvc_pack_params p, int64_t units)
{
    const int64_t H = p.x.shape[1], n = p.x.shape[2], D = p.x.shape[3], G = p.group;
    const int64_t U = kvc_quant_groups(D, G), Db = p.codes.shape[3];
    const int32_t bits = p.bits, per = kvc_quant_per_byte(bits);
    float *mins = (float *)p.mins.data, *scales = (float *)p.scales.data;
    uint8_t *codes = (uint8_t *)p.codes.data;
    for (int64_t r = blockIdx.x; r < units; r += gridDim.x) {
        const int64_t b = r / (H * n), h = (r / n) % H, j = r % n;
        const int64_t base = kvc_at(p.x, b, h, j, 0), xs = p.x.strides[3];
        if (p.clip) {
            /* clipped ranges (quant.h): the row in fp32, then the CPU's search per group */
            extern __shared__ float kvc_clip_row[];
            float *row = kvc_clip_row;
            for (int64_t c = threadIdx.x; c < D; c += blockDim.x) row[c] = kvc_load_f32(p.x.data, p.x.dtype, base + c * xs);
            __syncthreads();
            for (int64_t g = threadIdx.x; g < U; g += blockDim.x) {
                const int64_t c0 = g * G, c1 = D - c0 < G ? D : c0 + G;
                float mn, sc;
                kvc_quant_clip_range(row + c0, c1 - c0, 1, bits, &mn, &sc);
                mins[kvc_at(p.mins, b, h, j, g)] = mn;
                scales[kvc_at(p.scales, b, h, j, g)] = sc;
            }
        } else {
            for (int64_t g = threadIdx.x; g < U; g += blockDim.x) {
                const int64_t c0 = g * G, c1 = D - c0 < G ? D : c0 + G;
                float mn = kvc_load_f32(p.x.data, p.x.dtype, base + c0 * xs), mx = mn;
                for (int64_t c = c0 + 1; c < c1; c++) {
                    const float v = kvc_load_f32(p.x.data, p.x.dtype, base + c * xs);
                    mn = v < mn ? v : mn;
                    mx = v > mx ? v : mx;
                }
                mn = kvc_quant_min(mn);
                mins[kvc_at(p.mins, b, h, j, g)] = mn;
                scales[kvc_at(p.scales, b, h, j, g)] = kvc_quant_scale(mn, mx, bits);
            }
        }
        __syncthreads();
        for (int64_t k = threadIdx.x; k < Db; k += blockDim.x) {
            uint32_t byte = 0;
            for (int32_t i = 0; i < per && k * per + i < D; i++) {
                const int64_t c = k * per + i, g = c / G;
                const float v = kvc_load_f32(p.x.data, p.x.dtype, base + c * xs);
                byte |= kvc_quant_code(v, mins[kvc_at(p.mins, b, h, j, g)],
                                       scales[kvc_at(p.scales, b, h, j, g)], bits)
                        << (i * bits);
            }
            codes[kvc_at(p.codes, b, h, j, k)] = (uint8_t)byte;
        }
        __syncthreads();
    }
}

/* Slack to align the base, then the scan's first position. */
extern "C" size_t kvc_cuda_pack_workspace(const struct kvc_pack_params *p)
{
    (void)p;
    return 2 * (size_t)KVC_ALIGN;
}

/* The first refused element at row-major position e -> p->fault. */
static enum kvc_status kvc_quant_fault(const struct kvc_pack_params *p, int64_t e, cudaStream_t st)
{
    const struct kvc_view *x = &p->x;
    const int64_t H = x->shape[1], n = x->shape[2], D = x->shape[3];
    const int64_t r = e / D, es = (int64_t)kvc_dtype_size((enum kvc_dtype)x->dtype);
    struct kvc_pack_fault *f = p->fault;
    uint32_t raw = 0;
    if (f == NULL) return KVC_ERR_NAN;
    f->pos[0] = r / (H * n);
    f->pos[1] = (r / n) % H;
    f->pos[2] = r % n;
    f->pos[3] = e % D;
    KVC_CUDA_TRY(cudaMemcpyAsync(&raw,
                                 (const char *)x->data + (f->pos[0] * x->strides[0] + f->pos[1] * x->strides[1] +
                                                          f->pos[2] * x->strides[2] + f->pos[3] * x->strides[3]) * es,
                                 (size_t)es, cudaMemcpyDeviceToHost, st));
    KVC_CUDA_TRY(cudaStreamSynchronize(st));
    f->value = kvc_load_f32(&raw, x->dtype, 0); /* little-endian: the element is raw's low bytes */
    f->found = 1;
    return KVC_ERR_NAN;
}

extern "C" enum kvc_status kvc_cuda_pack(const struct kvc_pack_params *p, void *stream)
{
    const int64_t B = p->x.shape[0], H = p->x.shape[1], n = p->x.shape[2], D = p->x.shape[3];
    const int64_t rows = B * H * n;
    cudaStream_t st = KVC_STREAM(stream);
    unsigned long long *first, found = 0;
    int64_t units;
    if (p->fault) memset(p->fault, 0, sizeof *p->fault);
    if ((p->bits != 2 && p->bits != 4 && p->bits != 8) || p->group < 1 ||
        (p->kind != KVC_QUANT_KEYS && p->kind != KVC_QUANT_VALUES) ||
        (p->clip != 0 && (p->clip != 1 || p->kind != KVC_QUANT_VALUES)))
        return KVC_ERR_INVALID;
    if (rows == 0) return KVC_OK;
    if (p->scratch == NULL || p->scratch_bytes < kvc_cuda_pack_workspace(p)) return KVC_ERR_NOMEM;
    if (D > 0) {
        first = (unsigned long long *)(((uintptr_t)p->scratch + (KVC_ALIGN - 1)) &
                                       ~(uintptr_t)(KVC_ALIGN - 1));
        KVC_CUDA_TRY(cudaMemsetAsync(first, 0xff, sizeof *first, st));
        kvc_quant_scan_kernel<<<kvc_quant_blocks(rows), KVC_QUANT_THREADS, 0, st>>>(p->x, rows, first);
        KVC_CUDA_LAUNCHED();
        KVC_CUDA_TRY(cudaMemcpyAsync(&found, first, sizeof found, cudaMemcpyDeviceToHost, st));
        KVC_CUDA_TRY(cudaStreamSynchronize(st));
        if (found != ~0ull) return kvc_quant_fault(p, (int64_t)found, st);
    }
    if (p->kind == KVC_QUANT_KEYS && p->feedback.data != NULL) {
        const int64_t g = p->group < n ? p->group : n;
        const size_t smem = kvc_pack_feedback_smem(g, D);
        if (smem > KVC_PACK_FEEDBACK_SMEM_MAX) return KVC_ERR_UNSUPPORTED; /* module_quant.c refuses first */
        units = B * H * kvc_quant_groups(n, p->group);
        kvc_pack_keys_feedback_kernel<<<kvc_quant_blocks(units), KVC_QUANT_THREADS, smem, st>>>(*p, units);
    } else if (p->kind == KVC_QUANT_KEYS) {
        units = B * H * kvc_quant_groups(n, p->group);
        kvc_pack_keys_kernel<<<kvc_quant_blocks(units), KVC_QUANT_THREADS, 0, st>>>(*p, units);
    } else {
        const size_t smem = p->clip ? (size_t)D * sizeof(float) : 0;
        if (smem > KVC_PACK_CLIP_SMEM_MAX) return KVC_ERR_UNSUPPORTED; /* module_quant.c refuses first */
        units = rows;
        kvc_pack_values_kernel<<<kvc_quant_blocks(units), KVC_QUANT_THREADS, smem, st>>>(*p, units);
    }
    KVC_CUDA_LAUNCHED();
    return KVC_OK;
}

/* A block per output row, a thread per element. */
static __global__ void __launch_bounds__(KVC_QUANT_THREADS)
kvc_unpack_kernel(const struct kvc_unpack_params p, int64_t rows)
{
    const int64_t H = p.out.shape[1], n = p.out.shape[2], D = p.out.shape[3], G = p.group;
    const int32_t bits = p.bits;
    const int keys = p.kind == KVC_QUANT_KEYS;
    const uint8_t *codes = (const uint8_t *)p.codes.data;
    const float *mins = (const float *)p.mins.data, *scales = (const float *)p.scales.data;
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const int64_t b = r / (H * n), h = (r / n) % H, j = r % n;
        for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
            const int64_t gr = keys ? j / G : j, gc = keys ? c : c / G;
            const uint32_t code =
                kvc_quant_extract(codes[kvc_at(p.codes, b, h, j, kvc_quant_byte(c, bits))], c, bits);
            kvc_store_f32(p.out.data, p.out.dtype, kvc_at(p.out, b, h, j, c),
                          kvc_dequant(mins[kvc_at(p.mins, b, h, gr, gc)],
                                      scales[kvc_at(p.scales, b, h, gr, gc)], code));
        }
    }
}

extern "C" enum kvc_status kvc_cuda_unpack(const struct kvc_unpack_params *p, void *stream)
{
    const int64_t rows = p->out.shape[0] * p->out.shape[1] * p->out.shape[2];
    if ((p->bits != 2 && p->bits != 4 && p->bits != 8) || p->group < 1 ||
        (p->kind != KVC_QUANT_KEYS && p->kind != KVC_QUANT_VALUES))
        return KVC_ERR_INVALID;
    if (rows == 0 || p->out.shape[3] == 0) return KVC_OK;
    kvc_unpack_kernel<<<kvc_quant_blocks(rows), KVC_QUANT_THREADS, 0, KVC_STREAM(stream)>>>(*p, rows);
    KVC_CUDA_LAUNCHED();
    return KVC_OK;
}
