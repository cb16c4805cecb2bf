/*
 * quant.c - pack and unpack of the packed KV layout (CPU).
 *
 * pack runs in two passes: a scan of the whole input for values it cannot
 * quantize (NaN, +-Inf, |x| > FLT_MAX / 2), because the outputs are the
 * caller's buffers, often slices of a live store, which a bad input must
 * leave as they were; then the quantization proper. Work
 * units are (b, h, token group) for keys and (b, h, token) for values: a
 * unit owns whole code rows and whole groups, so every output is written
 * once from its own group and results are the same for any thread count.
 */
#include <string.h>

#include "quant.h"
#include "quant_math.h"

/* Channels unpack converts at a time (stack buffers, no scratch); a
 * multiple of 8 / bits. */
#define QT_CHUNK 256

static int qt_bits_ok(int32_t bits) { return bits == 2 || bits == 4 || bits == 8; }

/* Codes buffer length: D rounded up to whole bytes, the tail kept 0. */
static int64_t qt_dpad(int64_t D, int32_t bits)
{
    return kvc_quant_row_bytes(D, bits) * kvc_quant_per_byte(bits);
}

/* Rows of a key group held at once by the feedback path: min(G, n). */
static int64_t qt_fb_rows(const struct kvc_pack_params *p)
{
    return p->group < p->x.shape[2] ? p->group : p->x.shape[2];
}

static int qt_has_feedback(const struct kvc_pack_params *p)
{
    return p->kind == KVC_QUANT_KEYS && p->feedback.data != NULL;
}

static size_t qt_thread_bytes(const struct kvc_pack_params *p)
{
    const int64_t D = p->x.shape[3];
    size_t b = 3 * kvc_align_up((size_t)D * sizeof(float)) + kvc_align_up((size_t)qt_dpad(D, p->bits));
    if (qt_has_feedback(p)) {
        /* the group's rows in fp32 and their codes */
        const size_t g = (size_t)qt_fb_rows(p);
        b += kvc_align_up(g * (size_t)D * sizeof(float)) + kvc_align_up(g * (size_t)qt_dpad(D, p->bits));
    }
    return b;
}

size_t kvc_pack_scratch_bytes(const struct kvc_pack_params *p)
{
    const int nt = p->num_threads > 0 ? p->num_threads : 1;
    if (!qt_bits_ok(p->bits)) return 0;
    return KVC_ALIGN + (size_t)nt * qt_thread_bytes(p);
}

/* ------------------------------------------------------------------------ */
/* the scan                                                                 */
/* ------------------------------------------------------------------------ */

/* First c in [0, D) whose element pack refuses (kvc_quant_refused), -1 if
 * none: an OR of the comparisons (vectorised for unit stride), then the
 * search only in the rare bad row. */
KVC_INLINE int64_t qt_row_refused(const char *row, int32_t dtype, int64_t D, int64_t stride)
{
    uint32_t any = 0;
    int64_t c;
    if (dtype == KVC_F32) {
        const uint32_t *s = (const uint32_t *)row;
        if (stride == 1)
            for (c = 0; c < D; c++) any |= (s[c] & 0x7fffffffu) > 0x7effffffu;
        else
            for (c = 0; c < D; c++) any |= (s[c * stride] & 0x7fffffffu) > 0x7effffffu;
    } else {
        const uint16_t *s = (const uint16_t *)row;
        /* fp16: >= 0x7c00, bf16: > 0x7eff, i.e. >= 0x7f00 */
        const uint16_t m = dtype == KVC_F16 ? 0x7c00u : 0x7f00u;
        if (stride == 1)
            for (c = 0; c < D; c++) any |= (uint32_t)((s[c] & 0x7fffu) >= m);
        else
            for (c = 0; c < D; c++) any |= (uint32_t)((s[c * stride] & 0x7fffu) >= m);
    }
    if (!any) return -1;
    for (c = 0; c < D; c++)
        if (kvc_quant_refused(row, dtype, c * stride)) return c;
    return -1;
}

static enum kvc_status qt_scan(const struct kvc_pack_params *p, int nt)
{
    const struct kvc_view *x = &p->x;
    const int64_t H = x->shape[1], n = x->shape[2], D = x->shape[3];
    const int64_t rows = x->shape[0] * H * n;
    const int64_t es = (int64_t)kvc_dtype_size((enum kvc_dtype)x->dtype);
    int64_t first = INT64_MAX, r;
    if (D == 0) return KVC_OK;
#pragma omp parallel for schedule(static) num_threads(nt) reduction(min : first) if (nt > 1)
    for (r = 0; r < rows; r++) {
        const int64_t b = r / (H * n), h = (r / n) % H, j = r % n;
        const char *row = (const char *)x->data +
                          (b * x->strides[0] + h * x->strides[1] + j * x->strides[2]) * es;
        int64_t c;
        if (r * D >= first) continue; /* cannot come before what this thread found */
        c = qt_row_refused(row, x->dtype, D, x->strides[3]);
        if (c >= 0) first = r * D + c;
    }
    if (first == INT64_MAX) return KVC_OK;
    if (p->fault) {
        const int64_t rr = first / D, c = first % D;
        struct kvc_pack_fault *f = p->fault;
        f->pos[0] = rr / (H * n);
        f->pos[1] = (rr / n) % H;
        f->pos[2] = rr % n;
        f->pos[3] = c;
        f->value = kvc_load_f32(x->data, x->dtype,
                                f->pos[0] * x->strides[0] + f->pos[1] * x->strides[1] +
                                    f->pos[2] * x->strides[2] + c * x->strides[3]);
        f->found = 1;
    }
    return KVC_ERR_NAN;
}

/* ------------------------------------------------------------------------ */
/* pack                                                                     */
/* ------------------------------------------------------------------------ */

/* Db bytes of a row from the codes code[0 .. Db * per) (always inlined with
 * a constant `bits`, so the inner loop unrolls). */
KVC_INLINE void qt_pack_row_bits(uint8_t *dst, int64_t stride, const uint8_t *code, int64_t Db,
                                 int32_t bits)
{
    const int32_t per = 8 / bits;
    int64_t k;
    int32_t i;
    for (k = 0; k < Db; k++) {
        uint32_t byte = 0;
        for (i = 0; i < per; i++) byte |= (uint32_t)code[k * per + i] << (i * bits);
        dst[k * stride] = (uint8_t)byte;
    }
}

KVC_INLINE void qt_pack_row(uint8_t *dst, int64_t stride, const uint8_t *code, int64_t Db,
                            int32_t bits)
{
    switch (bits) {
    case 2: qt_pack_row_bits(dst, stride, code, Db, 2); break;
    case 4: qt_pack_row_bits(dst, stride, code, Db, 4); break;
    default: qt_pack_row_bits(dst, stride, code, Db, 8); break;
    }
}

struct qt_thread {
    float *row;    /* [D] a row in fp32 */
    float *mn;     /* [D] keys: per-channel minimum of the group */
    float *sc;     /* [D] keys: per-channel maximum, then scale */
    uint8_t *code; /* [Dpad] codes of a row, the tail past D 0 */
};

/* Keys: token group t of head (b, h), all D channels. */
static void KVC_HOT qt_pack_keys(const struct kvc_pack_params *p, int64_t u, const struct qt_thread *w)
{
    const struct kvc_view *x = &p->x, *cv = &p->codes, *mv = &p->mins, *sv = &p->scales;
    const int64_t H = x->shape[1], n = x->shape[2], D = x->shape[3], G = p->group;
    const int64_t T = kvc_quant_groups(n, G), Db = cv->shape[3];
    const int64_t b = u / (H * T), h = (u / T) % H, t = u % T;
    const int64_t j0 = t * G, j1 = n - j0 < G ? n : j0 + G;
    const int64_t es = (int64_t)kvc_dtype_size((enum kvc_dtype)x->dtype);
    const char *xs = (const char *)x->data + (b * x->strides[0] + h * x->strides[1]) * es;
    uint8_t *cs = (uint8_t *)cv->data + b * cv->strides[0] + h * cv->strides[1];
    float *mrow = (float *)mv->data + b * mv->strides[0] + h * mv->strides[1] + t * mv->strides[2];
    float *srow = (float *)sv->data + b * sv->strides[0] + h * sv->strides[1] + t * sv->strides[2];
    int64_t j, c;
    for (j = j0; j < j1; j++) {
        kvc_row_to_f32(w->row, xs + j * x->strides[2] * es, x->dtype, D, x->strides[3]);
        if (j == j0) {
            memcpy(w->mn, w->row, (size_t)D * sizeof(float));
            memcpy(w->sc, w->row, (size_t)D * sizeof(float));
            continue;
        }
        for (c = 0; c < D; c++) {
            const float v = w->row[c];
            w->mn[c] = v < w->mn[c] ? v : w->mn[c];
            w->sc[c] = v > w->sc[c] ? v : w->sc[c];
        }
    }
    for (c = 0; c < D; c++) {
        w->mn[c] = kvc_quant_min(w->mn[c]);
        w->sc[c] = kvc_quant_scale(w->mn[c], w->sc[c], p->bits);
        mrow[c * mv->strides[3]] = w->mn[c];
        srow[c * sv->strides[3]] = w->sc[c];
    }
    for (j = j0; j < j1; j++) {
        kvc_row_to_f32(w->row, xs + j * x->strides[2] * es, x->dtype, D, x->strides[3]);
        for (c = 0; c < D; c++) w->code[c] = (uint8_t)kvc_quant_code(w->row[c], w->mn[c], w->sc[c], p->bits);
        qt_pack_row(cs + j * cv->strides[2], cv->strides[3], w->code, Db, p->bits);
    }
}

/* Keys with feedback (quant.h): token group t of head (b, h), channel after
 * channel, each channel's errors carried into the later channels of the
 * same rows. The group's rows [g, D] in fp32 and their codes [g, Dpad]
 * live in the thread's scratch (fb, fc). */
static void KVC_HOT qt_pack_keys_feedback(const struct kvc_pack_params *p, int64_t u, float *fb, uint8_t *fc)
{
    const struct kvc_view *x = &p->x, *cv = &p->codes, *mv = &p->mins, *sv = &p->scales;
    const struct kvc_view *fv = &p->feedback, *iv = &p->feedback_index;
    const int64_t H = x->shape[1], n = x->shape[2], D = x->shape[3], G = p->group;
    const int64_t T = kvc_quant_groups(n, G), Db = cv->shape[3], Dpad = qt_dpad(D, p->bits);
    const int64_t b = u / (H * T), h = (u / T) % H, t = u % T;
    const int64_t j0 = t * G, g = n - j0 < G ? n - j0 : G;
    const int64_t es = (int64_t)kvc_dtype_size((enum kvc_dtype)x->dtype);
    const int64_t f = iv->data ? ((const int64_t *)iv->data)[b * iv->strides[0] + h * iv->strides[1] +
                                                              t * iv->strides[2]]
                               : h;
    const float *W = (const float *)fv->data + f * fv->strides[0];
    const char *xs = (const char *)x->data + (b * x->strides[0] + h * x->strides[1]) * es;
    uint8_t *cs = (uint8_t *)cv->data + b * cv->strides[0] + h * cv->strides[1];
    float *mrow = (float *)mv->data + b * mv->strides[0] + h * mv->strides[1] + t * mv->strides[2];
    float *srow = (float *)sv->data + b * sv->strides[0] + h * sv->strides[1] + t * sv->strides[2];
    int64_t j, c, c2;
    for (j = 0; j < g; j++) {
        kvc_row_to_f32(fb + j * D, xs + (j0 + j) * x->strides[2] * es, x->dtype, D, x->strides[3]);
        memset(fc + j * Dpad, 0, (size_t)Dpad); /* the padding codes stay 0 */
    }
    for (c = 0; c < D; c++) {
        const float *wr = W + c * fv->strides[1];
        float mn, sc;
        kvc_quant_range(fb + c, g, D, p->bits, &mn, &sc);
        mrow[c * mv->strides[3]] = mn;
        srow[c * sv->strides[3]] = sc;
        for (j = 0; j < g; j++) {
            float *row = fb + j * D;
            const uint32_t code = kvc_quant_code(row[c], mn, sc, p->bits);
            const float e = row[c] - kvc_dequant(mn, sc, code);
            fc[j * Dpad + c] = (uint8_t)code;
            if (e == 0.0f) continue;
            if (fv->strides[2] == 1)
                for (c2 = c + 1; c2 < D; c2++) row[c2] = kvc_quant_feedback(row[c2], e, wr[c2]);
            else
                for (c2 = c + 1; c2 < D; c2++) row[c2] = kvc_quant_feedback(row[c2], e, wr[c2 * fv->strides[2]]);
        }
    }
    for (j = 0; j < g; j++) qt_pack_row(cs + (j0 + j) * cv->strides[2], cv->strides[3], fc + j * Dpad, Db, p->bits);
}

/* kvc_quant_clip_range for a contiguous group, the same bits, with the 45
 * candidates side by side: each element's term is formed for every
 * candidate at once (loops over candidates that the clones vectorise),
 * where kvc_quant_clip_range runs one candidate's chain of sums after the
 * other. Each candidate's sums keep kvc_quant_clip_error's order (lane j
 * takes elements j, j + 8, ... in turn; the lanes are added in lane
 * order), its range is computed by the same expressions, and the first of
 * least error wins as there. About 2x faster for 32-channel groups at 2
 * bits on an AVX-512 Xeon, one thread (RESULTS, "Faster per-layer tests:
 * clipped ranges searched side by side"). The CUDA kernel keeps
 * kvc_quant_clip_range: a thread per group has no lanes to spread
 * candidates over. */
#define QT_CLIP_CANDS 48 /* (KVC_QUANT_CLIP_STEPS + 1)(KVC_QUANT_CLIP_STEPS + 2) / 2 = 45, padded to whole vectors */
_Static_assert((KVC_QUANT_CLIP_STEPS + 1) * (KVC_QUANT_CLIP_STEPS + 2) / 2 <= QT_CLIP_CANDS,
               "qt_clip_range: the candidate arrays must hold every candidate range");

KVC_INLINE void qt_clip_range(const float *x, int64_t n, int32_t bits, float *mn_out, float *sc_out)
{
    float lo[QT_CLIP_CANDS], sc[QT_CLIP_CANDS], inv[QT_CLIP_CANDS];
    double sum[QT_CLIP_CANDS], lane[QT_CLIP_CANDS], best;
    const float top = (float)kvc_quant_levels(bits);
    float mn, mx;
    int k = 0, c, j;
    kvc_quant_minmax(x, n, 1, &mn, &mx);
    kvc_quant_clip_candidate(mn, mx, 0, 0, bits, mn_out, sc_out);
    if (*sc_out == 0.0f) return;
    for (int32_t a = 0; a <= KVC_QUANT_CLIP_STEPS; a++) /* kvc_quant_clip_range's order, (0, 0) first */
        for (int32_t b = 0; a + b <= KVC_QUANT_CLIP_STEPS; b++, k++)
            kvc_quant_clip_candidate(mn, mx, a, b, bits, &lo[k], &sc[k]);
    for (c = 0; c < k; c++) inv[c] = 1.0f / sc[c];
    for (c = k; c < QT_CLIP_CANDS; c++) lo[c] = inv[c] = sc[c] = 0.0f; /* padding: computed, never read */
    for (c = 0; c < QT_CLIP_CANDS; c++) sum[c] = 0.0;
    for (j = 0; j < KVC_QUANT_ERR_LANES && j < n; j++) {
        for (c = 0; c < QT_CLIP_CANDS; c++) lane[c] = 0.0;
        for (int64_t i = j; i < n; i += KVC_QUANT_ERR_LANES) {
            const float xi = x[i];
            for (c = 0; c < QT_CLIP_CANDS; c++) lane[c] += kvc_quant_step_sq(xi, lo[c], inv[c], top);
        }
        for (c = 0; c < QT_CLIP_CANDS; c++) sum[c] += lane[c];
    }
    best = sum[0] * ((double)sc[0] * (double)sc[0]);
    for (c = 1; c < k; c++) {
        const double e = sum[c] * ((double)sc[c] * (double)sc[c]);
        if (e < best) {
            best = e;
            *mn_out = lo[c];
            *sc_out = sc[c];
        }
    }
}

/* Values: token r = (b, h, j), its channel groups one after another. */
static void KVC_HOT qt_pack_values(const struct kvc_pack_params *p, int64_t r, const struct qt_thread *w)
{
    const struct kvc_view *x = &p->x, *cv = &p->codes, *mv = &p->mins, *sv = &p->scales;
    const int64_t H = x->shape[1], n = x->shape[2], D = x->shape[3], G = p->group;
    const int64_t Db = cv->shape[3];
    const int64_t b = r / (H * n), h = (r / n) % H, j = r % n;
    const int64_t es = (int64_t)kvc_dtype_size((enum kvc_dtype)x->dtype);
    const char *xr = (const char *)x->data +
                     (b * x->strides[0] + h * x->strides[1] + j * x->strides[2]) * es;
    float *mrow = (float *)mv->data + b * mv->strides[0] + h * mv->strides[1] + j * mv->strides[2];
    float *srow = (float *)sv->data + b * sv->strides[0] + h * sv->strides[1] + j * sv->strides[2];
    int64_t c0, c, g;
    kvc_row_to_f32(w->row, xr, x->dtype, D, x->strides[3]);
    for (c0 = 0, g = 0; c0 < D; c0 += G, g++) {
        const int64_t c1 = D - c0 < G ? D : c0 + G;
        float mn, sc;
        if (p->clip)
            qt_clip_range(w->row + c0, c1 - c0, p->bits, &mn, &sc);
        else
            kvc_quant_range(w->row + c0, c1 - c0, 1, p->bits, &mn, &sc);
        mrow[g * mv->strides[3]] = mn;
        srow[g * sv->strides[3]] = sc;
        for (c = c0; c < c1; c++) w->code[c] = (uint8_t)kvc_quant_code(w->row[c], mn, sc, p->bits);
        if (c1 == D) break; /* c0 + G may not be representable */
    }
    qt_pack_row((uint8_t *)cv->data + b * cv->strides[0] + h * cv->strides[1] + j * cv->strides[2],
                cv->strides[3], w->code, Db, p->bits);
}

enum kvc_status kvc_pack(const struct kvc_pack_params *p)
{
    const struct kvc_view *x = &p->x;
    const int64_t B = x->shape[0], H = x->shape[1], n = x->shape[2], D = x->shape[3];
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    int64_t units;
    size_t tb;
    char *base;
    enum kvc_status s;
    if (p->fault) memset(p->fault, 0, sizeof *p->fault);
    if (!qt_bits_ok(p->bits) || p->group < 1 ||
        (p->kind != KVC_QUANT_KEYS && p->kind != KVC_QUANT_VALUES) ||
        (p->clip != 0 && (p->clip != 1 || p->kind != KVC_QUANT_VALUES)))
        return KVC_ERR_INVALID;
    if (B * H * n == 0) return KVC_OK;
    s = qt_scan(p, nt);
    if (s != KVC_OK) return s;
    if (p->scratch == NULL || p->scratch_bytes < kvc_pack_scratch_bytes(p)) return KVC_ERR_NOMEM;
    units = p->kind == KVC_QUANT_KEYS ? B * H * kvc_quant_groups(n, p->group) : B * H * n;
    if (units < nt) nt = (int)units;
    tb = qt_thread_bytes(p);
    base = (char *)(((uintptr_t)p->scratch + (KVC_ALIGN - 1)) & ~(uintptr_t)(KVC_ALIGN - 1));

#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        struct qt_thread w;
        const int64_t Dpad = qt_dpad(D, p->bits);
        int64_t u;
        w.row = (float *)(base + (size_t)KVC_THREAD_ID() * tb);
        w.mn = (float *)((char *)w.row + kvc_align_up((size_t)D * sizeof(float)));
        w.sc = (float *)((char *)w.mn + kvc_align_up((size_t)D * sizeof(float)));
        w.code = (uint8_t *)((char *)w.sc + kvc_align_up((size_t)D * sizeof(float)));
        /* only codes [0, D) are ever written: the padding stays 0 */
        memset(w.code, 0, (size_t)Dpad);
        if (qt_has_feedback(p)) {
            float *fb = (float *)((char *)w.code + kvc_align_up((size_t)Dpad));
            uint8_t *fc = (uint8_t *)fb + kvc_align_up((size_t)qt_fb_rows(p) * (size_t)D * sizeof(float));
#pragma omp for schedule(static)
            for (u = 0; u < units; u++) qt_pack_keys_feedback(p, u, fb, fc);
        } else if (p->kind == KVC_QUANT_KEYS) {
#pragma omp for schedule(static)
            for (u = 0; u < units; u++) qt_pack_keys(p, u, &w);
        } else {
#pragma omp for schedule(static)
            for (u = 0; u < units; u++) qt_pack_values(p, u, &w);
        }
    }
    return KVC_OK;
}

/* ------------------------------------------------------------------------ */
/* unpack                                                                   */
/* ------------------------------------------------------------------------ */

/* The m codes of a row from byte src[0] on (bytes `stride` apart) -> code[]
 * (up to a whole last byte); inlined with a constant `bits`. */
KVC_INLINE void qt_codes_bits(const uint8_t *src, int64_t stride, int64_t m, uint8_t *code,
                              int32_t bits)
{
    const int32_t per = 8 / bits;
    const uint32_t mask = (1u << bits) - 1u;
    const int64_t nb = (m + per - 1) / per;
    int64_t k;
    int32_t i;
    for (k = 0; k < nb; k++) {
        const uint32_t byte = src[k * stride];
        for (i = 0; i < per; i++) code[k * per + i] = (uint8_t)((byte >> (i * bits)) & mask);
    }
}

static void KVC_HOT qt_unpack_row(const struct kvc_unpack_params *p, int64_t r)
{
    const struct kvc_view *o = &p->out, *cv = &p->codes, *mv = &p->mins, *sv = &p->scales;
    const int64_t H = o->shape[1], n = o->shape[2], D = o->shape[3], G = p->group;
    const int64_t b = r / (H * n), h = (r / n) % H, j = r % n;
    const int64_t gr = p->kind == KVC_QUANT_KEYS ? j / G : j;
    const int64_t es = (int64_t)kvc_dtype_size((enum kvc_dtype)o->dtype);
    const int64_t cs = cv->strides[3], ms = mv->strides[3], ss = sv->strides[3], os = o->strides[3];
    const int32_t per = kvc_quant_per_byte(p->bits);
    const uint8_t *crow = (const uint8_t *)cv->data + b * cv->strides[0] + h * cv->strides[1] +
                          j * cv->strides[2];
    const float *mrow = (const float *)mv->data + b * mv->strides[0] + h * mv->strides[1] +
                        gr * mv->strides[2];
    const float *srow = (const float *)sv->data + b * sv->strides[0] + h * sv->strides[1] +
                        gr * sv->strides[2];
    char *orow = (char *)o->data + (b * o->strides[0] + h * o->strides[1] + j * o->strides[2]) * es;
    uint8_t code[QT_CHUNK];
    float buf[QT_CHUNK];
    int64_t c0, i;
    /* QT_CHUNK is a multiple of every per: chunks start on a byte */
    for (c0 = 0; c0 < D; c0 += QT_CHUNK) {
        const int64_t m = D - c0 < QT_CHUNK ? D - c0 : QT_CHUNK;
        const uint8_t *src = crow + (c0 / per) * cs;
        char *dst = orow + c0 * os * es;
        switch (p->bits) {
        case 2: qt_codes_bits(src, cs, m, code, 2); break;
        case 4: qt_codes_bits(src, cs, m, code, 4); break;
        default: qt_codes_bits(src, cs, m, code, 8); break;
        }
        if (p->kind == KVC_QUANT_KEYS) {
            const float *mn = mrow + c0 * ms, *sc = srow + c0 * ss;
            if (ms == 1 && ss == 1)
                for (i = 0; i < m; i++) buf[i] = kvc_dequant(mn[i], sc[i], code[i]);
            else
                for (i = 0; i < m; i++) buf[i] = kvc_dequant(mn[i * ms], sc[i * ss], code[i]);
        } else {
            /* the chunk's channel groups, each with one (min, scale) */
            int64_t c = c0;
            while (c < c0 + m) {
                const int64_t g = c / G, left = G - c % G;
                const int64_t e = c0 + m - c < left ? c0 + m : c + left;
                const float mn = mrow[g * ms], sc = srow[g * ss];
                for (; c < e; c++) buf[c - c0] = kvc_dequant(mn, sc, code[c - c0]);
            }
        }
        /* the dtype switch hoisted out of the loops so that each vectorises */
        if (o->dtype == KVC_F16)
            for (i = 0; i < m; i++) ((uint16_t *)dst)[i * os] = kvc_f32_to_f16(buf[i]);
        else if (o->dtype == KVC_BF16)
            for (i = 0; i < m; i++) ((uint16_t *)dst)[i * os] = kvc_f32_to_bf16(buf[i]);
        else
            for (i = 0; i < m; i++) ((float *)dst)[i * os] = buf[i];
    }
}

enum kvc_status kvc_unpack(const struct kvc_unpack_params *p)
{
    const int64_t rows = p->out.shape[0] * p->out.shape[1] * p->out.shape[2];
    int nt = p->num_threads > 0 ? p->num_threads : 1;
    int64_t r;
    if (!qt_bits_ok(p->bits) || p->group < 1 ||
        (p->kind != KVC_QUANT_KEYS && p->kind != KVC_QUANT_VALUES))
        return KVC_ERR_INVALID;
    if (rows == 0 || p->out.shape[3] == 0) return KVC_OK;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (r = 0; r < rows; r++) qt_unpack_row(p, r);
    return KVC_OK;
}
