/*
 * attention_amx.c - the packed attention's AMX path (attention_amx.h).
 *
 * Per chunk of KVC_AMX_CHUNK slots, for up to 5 query rows at a time:
 *   logits  16 slots at a time: C^T[slot][col] += A . B over the head dim in
 *           steps of 32 channels, A = the slots' centred key codes in bf16
 *           (one row per slot, channel order), B = the three bf16 pieces of
 *           each row's q * key scale (columns piece * rows + row; pairs of
 *           channels per row, AMX's VNNI layout), built once per token
 *           group. C^T is transposed with shuffles and the pieces' columns
 *           added: logit = scaling * (lo + mid + hi) + bias + log(count).
 *   softmax one rescale of the running state per chunk (its max), then the
 *           chunk's weights exp(x - max).
 *   values  32 slots and 32 channels (one value group) at a time:
 *           C[piece * rows + row][channel] += A . B, A = the three bf16
 *           pieces of weight x value scale over the 32 slots, B = the codes
 *           of the 32 slots, slot pairs by channel, half the channels in one
 *           tile and half in another. The pieces are added and the
 *           channels interleaved once per chunk, into the running sums.
 * Every tile is 16 rows of 64 bytes. No dequantized value is formed: codes
 * (2 or 4 bits, keys and values each) go to bf16 by one table permute.
 */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE /* syscall(), for the tile-state permission */
#endif
#include <math.h>
#include <string.h>

#include "attention_amx.h"
#include "attention_packed_math.h"
#include "kvc_math.h"

#define AMX_ROWS 5 /* query rows per pass: three pieces each fill 15 of a tile's 16 columns */
#define AMX_STEP 32 /* slots of one value product, channels of one key step */

#ifdef KVC_AMX
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_TARGET __attribute__((target("arch=x86-64-v4,avx512vbmi,amx-tile,amx-bf16")))
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* AMX-TILE and AMX-BF16 (cpuid 7.0 edx bits 24 and 22), AVX512-VBMI (ecx
 * bit 1: the 2-bit unpack's multishift; every AMX CPU has it), the tile state
 * enabled by the OS (XCR0 bits 17 and 18), and Linux's permission for this
 * process to use it (asked once; threads share it). */
static int amx_cpu(void)
{
    unsigned a, b, c, d, lo, hi;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return 0; /* OSXSAVE */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (!(d & (1u << 24)) || !(d & (1u << 22)) || !(c & (1u << 1))) return 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    (void)hi;
    if ((lo & (3u << 17)) != (3u << 17)) return 0;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

int kvc_amx_usable(int bits, int vbits, int64_t D, int64_t G)
{
    static int cpu = -1; /* -1: not asked yet; two threads asking store the same answer */
    int c;
    if ((bits != 2 && bits != 4) || (vbits != 2 && vbits != 4) || D < AMX_STEP || D % AMX_STEP || G % AMX_STEP)
        return 0;
    if (!kvc_amx_allowed() || !kvc_wide_active()) return 0;
    c = __atomic_load_n(&cpu, __ATOMIC_RELAXED);
    if (c < 0) {
        c = amx_cpu();
        __atomic_store_n(&cpu, c, __ATOMIC_RELAXED);
    }
    return c;
}

/* The thread's buffers (attention_amx.h's scratch), 64-byte aligned. */
struct amx_buf {
    __m512i ktab, vtab; /* amx_code_table of the key and value widths */
    float *x;      /* [AMX_ROWS][CHUNK] logits, then weights */
    uint32_t *tq;  /* [16][D / 2] the pieces of q * key scale, a row per column of B */
    uint32_t *bk;  /* [D / 32][16][16] B of each key step */
    uint16_t *ak;  /* [32][D] A: two tiles' centred key codes */
    float *ct;     /* [2][16][16] their C^T */
    uint16_t *av;  /* [2][16][32] A: bf16 pieces of a block pair's weights */
    uint16_t *bv;  /* [2][2][16][32] B: value codes of a block pair, even / odd channels */
    float *cv;     /* [4][16][16] the value tiles of a block pair */
    float *mnv;    /* [AMX_ROWS][ng][16] centre sums of a chunk, per lane */
    float *krow, *mrow; /* [D] key scales and centres of a token group */
    float *sc, *ce;     /* [32] value scales and centres of one group's 32 slots */
    float *qb, *lc, *alpha; /* [16] biases, log counts, rescale factors */
    uint8_t *tmp;  /* [D / 2] a contiguous copy of a strided code row */
};

/* Lays the buffers out from `scratch` (NULL: only measures); returns
 * the bytes they take. */
static size_t amx_carve(struct amx_buf *w, void *scratch, int64_t D)
{
    char *base = (char *)scratch;
    const size_t d = (size_t)D;
    size_t off = 0;
#define AMX_TAKE(field, type, n) (w->field = base ? (type *)(base + off) : NULL, off += kvc_align_up((n) * sizeof(type)))
    AMX_TAKE(x, float, AMX_ROWS * KVC_AMX_CHUNK);
    AMX_TAKE(tq, uint32_t, 16 * d / 2);
    AMX_TAKE(bk, uint32_t, d / 32 * 256);
    AMX_TAKE(ak, uint16_t, 32 * d);
    AMX_TAKE(ct, float, 2 * 16 * 16);
    AMX_TAKE(av, uint16_t, 2 * 16 * 32);
    AMX_TAKE(bv, uint16_t, 4 * 16 * 32);
    AMX_TAKE(cv, float, 4 * 16 * 16);
    AMX_TAKE(mnv, float, AMX_ROWS * d / 32 * 16);
    AMX_TAKE(krow, float, d);
    AMX_TAKE(mrow, float, d);
    AMX_TAKE(sc, float, 32);
    AMX_TAKE(ce, float, 32);
    AMX_TAKE(qb, float, 16);
    AMX_TAKE(lc, float, 16);
    AMX_TAKE(alpha, float, 16);
    AMX_TAKE(tmp, uint8_t, d / 2);
#undef AMX_TAKE
    return off;
}

size_t kvc_amx_scratch_bytes(int64_t D)
{
    struct amx_buf w;
    return amx_carve(&w, NULL, D);
}

/* Palette 1, eight tiles of 16 rows x 64 bytes. */
struct amx_cfg {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* Word i: the bf16 bits of the centred code i mod 2^bits (2 or 4 bits): a
 * permute reads an index's low 5 bits, and the table repeats past 2^bits,
 * so the bits above a code need no mask. */
AMX_TARGET static inline __m512i amx_code_table(int bits)
{
    uint16_t t[32];
    int i;
    for (i = 0; i < 32; i++) {
        const float f = kvc_pk_centred((uint32_t)i & kvc_pk_mask(bits), bits);
        uint32_t u;
        memcpy(&u, &f, 4);
        t[i] = (uint16_t)(u >> 16); /* exact: a half-integer below 8 */
    }
    return _mm512_loadu_si512(t);
}

/* v = hi + mid + lo exactly, each with at most 8 significant bits (bf16 in
 * the top half of an fp32, the bottom half zero): truncation to bf16
 * twice, and what is left has at most 24 - 16 = 8 bits. */
AMX_TARGET static inline void amx_pieces(__m512 v, __m512 *hi, __m512 *mid, __m512 *lo)
{
    const __m512i top = _mm512_set1_epi32((int)0xffff0000u);
    __m512 r;
    *hi = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), top));
    r = _mm512_sub_ps(v, *hi);
    *mid = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(r), top));
    *lo = _mm512_sub_ps(r, *mid);
}

/* The top halves of a's and b's 16 floats: 32 bf16 in order. */
AMX_TARGET static inline __m512i amx_bf16_pair(__m512 a, __m512 b)
{
    const __m512i odd = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29,
                                         27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    return _mm512_permutex2var_epi16(_mm512_castps_si512(a), odd, _mm512_castps_si512(b));
}

/* The 32 floats v0, v1 as three rows of 32 bf16 (64 bytes each): their hi,
 * mid and lo pieces (amx_pieces), `stride` bytes apart. */
AMX_TARGET static inline void amx_store_pieces(void *dst, int64_t stride, __m512 v0, __m512 v1)
{
    __m512 h0, m0, l0, h1, m1, l1;
    char *d = (char *)dst;
    amx_pieces(v0, &h0, &m0, &l0);
    amx_pieces(v1, &h1, &m1, &l1);
    _mm512_storeu_si512(d, amx_bf16_pair(h0, h1));
    _mm512_storeu_si512(d + stride, amx_bf16_pair(m0, m1));
    _mm512_storeu_si512(d + 2 * stride, amx_bf16_pair(l0, l1));
}

/* A sum from its three pieces' sums, the small ones first. */
AMX_TARGET static inline __m512 amx_sum_pieces(__m512 hi, __m512 mid, __m512 lo)
{
    return _mm512_add_ps(_mm512_add_ps(lo, mid), hi);
}

/* r[i] <- column i of the 16 x 16 dwords in r. */
AMX_TARGET static inline void amx_transpose16(__m512i r[16])
{
    __m512i t[16];
    int i;
    for (i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (i = 0; i < 4; i++) {
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    /* each 128-bit lane of r[4i + k] now holds rows 4i..4i+3 of one column
     * of its 4 x 4 block; gather the four lanes of each column */
    for (i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0x88);
        t[4 + i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0xdd);
        t[8 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0x88);
        t[12 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0xdd);
    }
    for (i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
        r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xdd);
    }
}

/* Multishift control: word w (low byte) takes the 8 bits from bit 2w of
 * its qword: with the 8 code bytes of 32 2-bit channels broadcast, word w
 * holds channel w's code in its low 2 bits. */
AMX_TARGET static inline __m512i amx_shift2(void)
{
    uint8_t c[64];
    int i;
    for (i = 0; i < 64; i++) c[i] = (uint8_t)(2 * (i / 2));
    return _mm512_loadu_si512(c);
}

/* 32 2-bit codes (8 bytes) -> 32 table indices, one word per channel. */
AMX_TARGET static inline __m512i amx_index2(const uint8_t *src)
{
    uint64_t q;
    memcpy(&q, src, 8);
    return _mm512_multishift_epi64_epi8(amx_shift2(), _mm512_set1_epi64((long long)q));
}

/* A code row (D * bits / 8 bytes, `stride` apart) -> D centred bf16 codes
 * in channel order. 4 bits: byte i holds channels 2i (low nibble) and
 * 2i + 1, its dword's index words are the byte and the byte >> 4; 2 bits:
 * amx_index2. */
AMX_TARGET static inline void amx_unpack_row(uint16_t *dst, const uint8_t *src, int64_t stride, int64_t D, int bits,
                                             __m512i table, uint8_t *tmp)
{
    const int64_t nb = D * bits / 8;
    int64_t i;
    if (stride != 1) {
        for (i = 0; i < nb; i++) tmp[i] = src[i * stride];
        src = tmp;
    }
    if (bits == 4) {
        for (i = 0; i < nb; i += 16) {
            const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(src + i)));
            const __m512i idx = _mm512_or_si512(d, _mm512_slli_epi32(d, 12));
            _mm512_storeu_si512(dst + 2 * i, _mm512_permutexvar_epi16(idx, table));
        }
    } else {
        for (i = 0; i < nb; i += 8) _mm512_storeu_si512(dst + 4 * i, _mm512_permutexvar_epi16(amx_index2(src + i), table));
    }
}

/* Token group t's B tiles (the pieces of q * key scale of rows r0.., in
 * the columns piece * nr + row) and biases scaling * q . centre. */
AMX_TARGET static void amx_key_group(const struct kvc_amx_span *s, const struct amx_buf *w, int64_t r0, int64_t nr,
                                     int64_t t)
{
    const int64_t D = s->D, Dh = D / 2;
    const float *ks = s->h.ks + t * s->h.kss, *km = s->h.km + t * s->h.kms;
    const float mid = kvc_pk_mid(s->bits);
    int64_t c, r, k;
    if (s->h.ksd == 1 && s->h.kmd == 1) {
        const __m512 vmid = _mm512_set1_ps(mid);
        for (c = 0; c < D; c += 16) {
            const __m512 sc = _mm512_loadu_ps(ks + c);
            _mm512_storeu_ps(w->krow + c, sc);
            /* kvc_pk_centre_at's min + scale * mid, fused here and below
             * alike: the strided path must give the same bits at any -O
             * (GCC contracts the plain expression only when optimizing) */
            _mm512_storeu_ps(w->mrow + c, _mm512_fmadd_ps(sc, vmid, _mm512_loadu_ps(km + c)));
        }
    } else {
        for (c = 0; c < D; c++) {
            w->krow[c] = ks[c * s->h.ksd];
            w->mrow[c] = fmaf(ks[c * s->h.ksd], mid, km[c * s->h.kmd]);
        }
    }
    for (r = 0; r < nr; r++) {
        const float *q = s->q + (r0 + r) * s->Dp;
        __m512 bias = _mm512_setzero_ps();
        for (c = 0; c < D; c += 32) {
            const __m512 q0 = _mm512_loadu_ps(q + c), q1 = _mm512_loadu_ps(q + c + 16);
            bias = _mm512_fmadd_ps(q0, _mm512_loadu_ps(w->mrow + c), bias);
            bias = _mm512_fmadd_ps(q1, _mm512_loadu_ps(w->mrow + c + 16), bias);
            amx_store_pieces(w->tq + r * Dh + c / 2, nr * Dh * (int64_t)sizeof(uint32_t),
                             _mm512_mul_ps(q0, _mm512_loadu_ps(w->krow + c)),
                             _mm512_mul_ps(q1, _mm512_loadu_ps(w->krow + c + 16)));
        }
        w->qb[r] = s->scaling * _mm512_reduce_add_ps(bias);
    }
    /* B of step k: row kk = channel pair 16k + kk, column = tq's row */
    for (k = 0; k < D / 32; k++) {
        __m512i m[16];
        int i;
        for (i = 0; i < 16; i++) m[i] = _mm512_loadu_si512(w->tq + i * Dh + 16 * k);
        amx_transpose16(m);
        for (i = 0; i < 16; i++) _mm512_storeu_si512(w->bk + k * 256 + i * 16, m[i]);
    }
}

/* A tile's logits from its C^T (16 slots x 16 columns, in w->ct + 256 h):
 * the columns transposed to rows, the pieces added (small first), scaled,
 * the bias and log counts added; into w->x from slot jt - j. */
AMX_TARGET static inline void amx_tile_logits(const struct kvc_amx_span *s, const struct amx_buf *w, int64_t nr,
                                              int64_t j, int64_t jt, int h)
{
    __m512i m[16];
    __m512 lc;
    int64_t i, r;
    for (i = 0; i < 16; i++) m[i] = _mm512_loadu_si512(w->ct + 256 * h + i * 16);
    amx_transpose16(m);
    if (s->h.c) {
        for (i = 0; i < 16; i++) w->lc[i] = kvc_logf(s->h.c[(jt + i) * s->h.cs]);
        lc = _mm512_loadu_ps(w->lc);
    } else {
        lc = _mm512_setzero_ps();
    }
    for (r = 0; r < nr; r++) {
        const __m512 sum = amx_sum_pieces(_mm512_castsi512_ps(m[r]), _mm512_castsi512_ps(m[nr + r]),
                                          _mm512_castsi512_ps(m[2 * nr + r]));
        const __m512 x = _mm512_add_ps(_mm512_mul_ps(sum, _mm512_set1_ps(s->scaling)),
                                       _mm512_add_ps(lc, _mm512_set1_ps(w->qb[r])));
        _mm512_storeu_ps(w->x + r * KVC_AMX_CHUNK + (jt - j), x);
    }
}

/* Logits of rows r0.. over the chunk's slots [j, j + nc) into w->x, two
 * tiles at a time: their products form two independent chains (tiles 0
 * and 1). (A two-stage pipeline, the next pair unpacked while a pair's
 * products ran, measured no faster: tile latency is not what bounds it.) */
AMX_TARGET static void amx_chunk_logits(const struct kvc_amx_span *s, const struct amx_buf *w, int64_t r0,
                                        int64_t nr, int64_t j, int64_t nc, int64_t *tcur)
{
    const int64_t D = s->D, end = s->j0 + s->n;
    int64_t jt, i, k;
    for (jt = j; jt < j + nc; jt += 32) {
        const int64_t t = jt / s->G; /* both tiles: G is a multiple of 32 */
        if (t != *tcur) {
            amx_key_group(s, w, r0, nr, t);
            *tcur = t;
        }
        for (i = 0; i < 32; i++) {
            /* the codes stream from memory: ask for the keys four tiles
             * ahead, and for these values, read after the chunk's softmax */
            if (jt + 64 + i < end) _mm_prefetch((const char *)(s->h.kc + (jt + 64 + i) * s->h.kcs), _MM_HINT_T0);
            _mm_prefetch((const char *)(s->h.vc + (jt + i) * s->h.vcs), _MM_HINT_T1);
            amx_unpack_row(w->ak + i * D, s->h.kc + (jt + i) * s->h.kcs, s->h.kcd, D, s->bits, w->ktab, w->tmp);
        }
        _tile_zero(0);
        _tile_zero(1);
        for (k = 0; k < D / 32; k++) {
            _tile_loadd(4, w->bk + k * 256, 64);
            _tile_loadd(2, w->ak + 32 * k, (int)(2 * D));
            _tile_dpbf16ps(0, 2, 4);
            _tile_loadd(3, w->ak + 16 * D + 32 * k, (int)(2 * D));
            _tile_dpbf16ps(1, 3, 4);
        }
        _tile_stored(0, w->ct, 64);
        _tile_stored(1, w->ct + 256, 64);
        amx_tile_logits(s, w, nr, j, jt, 0);
        amx_tile_logits(s, w, nr, j, jt + 16, 1);
    }
}

/* Value scales and centres of group u over the 32 slots from js. */
AMX_TARGET static void amx_value_group(const struct kvc_amx_span *s, const struct amx_buf *w, int64_t u,
                                       int64_t js)
{
    const float mid = kvc_pk_mid(s->vbits);
    int i;
    if (s->h.vss * 31 <= INT32_MAX && s->h.vms * 31 <= INT32_MAX && s->h.vss >= 0 && s->h.vms >= 0) {
        const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        const __m512i is = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)s->h.vss));
        const __m512i im = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)s->h.vms));
        const float *vs = s->h.vs + js * s->h.vss + u * s->h.vsd, *vm = s->h.vm + js * s->h.vms + u * s->h.vmd;
        for (i = 0; i < 32; i += 16) {
            const __m512 sc = _mm512_i32gather_ps(is, vs + i * s->h.vss, 4);
            _mm512_storeu_ps(w->sc + i, sc);
            _mm512_storeu_ps(w->ce + i, _mm512_fmadd_ps(sc, _mm512_set1_ps(mid), _mm512_i32gather_ps(im, vm + i * s->h.vms, 4)));
        }
        return;
    }
    for (i = 0; i < 32; i++) {
        const float sc = s->h.vs[(js + i) * s->h.vss + u * s->h.vsd];
        w->sc[i] = sc;
        w->ce[i] = fmaf(sc, mid, s->h.vm[(js + i) * s->h.vms + u * s->h.vmd]); /* as the gathers' */
    }
}

/* B of block b (channels 32b..32b + 31) over the 32 slots from js: row p
 * holds slots 2p and 2p + 1 (a dword per channel), in two tiles of 16
 * channels: 4 bits, the even channels in bv and the odd in bv + 512; 2 bits,
 * channels 8l + (0..3) in bv and 8l + (4..7) in bv + 512 (l = 0..3). */
AMX_TARGET static void amx_value_codes(const struct kvc_amx_span *s, uint16_t *bv, int64_t b, int64_t js,
                                       __m512i table)
{
    const int64_t nb = 4 * s->vbits; /* bytes of 32 channels */
    int64_t p, i;
    for (p = 0; p < 16; p++) {
        const uint8_t *ra = s->h.vc + (js + 2 * p) * s->h.vcs, *rb = s->h.vc + (js + 2 * p + 1) * s->h.vcs;
        uint8_t ca[16], cb[16];
        __m512i lo, hi;
        if (s->h.vcd == 1) {
            ra += nb * b;
            rb += nb * b;
        } else {
            for (i = 0; i < nb; i++) {
                ca[i] = ra[(nb * b + i) * s->h.vcd];
                cb[i] = rb[(nb * b + i) * s->h.vcd];
            }
            ra = ca;
            rb = cb;
        }
        if (s->vbits == 4) {
            const __m128i a = _mm_loadu_si128((const __m128i *)ra), bb = _mm_loadu_si128((const __m128i *)rb);
            /* word i = byte i of a | byte i of b << 8, as a dword; with it
             * shifted up a byte, the low word's low 5 bits are a's low
             * nibble (and a stray bit the table ignores), the high word's
             * b's low nibble */
            const __m512i d = _mm512_cvtepu16_epi32(
                _mm256_set_m128i(_mm_unpackhi_epi8(a, bb), _mm_unpacklo_epi8(a, bb)));
            lo = _mm512_or_si512(d, _mm512_slli_epi32(d, 8));
            hi = _mm512_srli_epi16(lo, 4);
        } else {
            const __m512i ia = amx_index2(ra), ib = amx_index2(rb);
            lo = _mm512_unpacklo_epi16(ia, ib);
            hi = _mm512_unpackhi_epi16(ia, ib);
        }
        _mm512_storeu_si512(bv + p * 32, _mm512_permutexvar_epi16(lo, table));
        _mm512_storeu_si512(bv + 512 + p * 32, _mm512_permutexvar_epi16(hi, table));
    }
}

/* The weighted value codes of rows r0.. over the chunk's slots [j, j + nc)
 * (weights in w->x) into s->acc, rescaled by w->alpha; centre sums into
 * w->mnv. */
AMX_TARGET static void amx_chunk_values(const struct kvc_amx_span *s, const struct amx_buf *w, int64_t r0,
                                        int64_t nr, int64_t j, int64_t nc)
{
    const int64_t D = s->D, nb = D / 32;
    /* channels 0-15 and 16-31 of a block from its two tiles' columns
     * (amx_value_codes' order) */
    const __m512i lo_idx = s->vbits == 4
                               ? _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0)
                               : _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
    const __m512i hi_idx = s->vbits == 4
                               ? _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8)
                               : _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
    uint16_t *av = w->av;
    int64_t b0, js, r, q;
    for (b0 = 0; b0 < nb; b0 += 2) {
        const int64_t nbb = nb - b0 < 2 ? nb - b0 : 2;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (js = j; js < j + nc; js += 32) {
            for (q = 0; q < nbb; q++) {
                const int64_t b = b0 + q, u = 32 * b / s->G;
                /* two blocks of one value group share its A (G >= 64) */
                const int own = q == 0 || u != 32 * b0 / s->G;
                if (own) amx_value_group(s, w, u, js);
                for (r = 0; r < nr && own; r++) {
                    const float *e = w->x + r * KVC_AMX_CHUNK + (js - j);
                    const __m512 e0 = _mm512_loadu_ps(e), e1 = _mm512_loadu_ps(e + 16);
                    amx_store_pieces(av + q * 512 + r * 32, nr * 64, _mm512_mul_ps(e0, _mm512_loadu_ps(w->sc)),
                                     _mm512_mul_ps(e1, _mm512_loadu_ps(w->sc + 16)));
                    if (32 * b % s->G == 0) {
                        /* the group's first block adds its centre sums */
                        float *mv = w->mnv + (r * (D / 32) + u) * 16;
                        __m512 acc = _mm512_loadu_ps(mv);
                        acc = _mm512_fmadd_ps(e0, _mm512_loadu_ps(w->ce), acc);
                        acc = _mm512_fmadd_ps(e1, _mm512_loadu_ps(w->ce + 16), acc);
                        _mm512_storeu_ps(mv, acc);
                    }
                }
                amx_value_codes(s, w->bv + q * 1024, b, js, w->vtab);
            }
            _tile_loadd(4, av, 64);
            _tile_loadd(5, w->bv, 64);
            _tile_dpbf16ps(0, 4, 5);
            _tile_loadd(6, w->bv + 512, 64);
            _tile_dpbf16ps(1, 4, 6);
            if (nbb == 2) {
                _tile_loadd(7, av + (32 * (b0 + 1) / s->G == 32 * b0 / s->G ? 0 : 512), 64);
                _tile_loadd(5, w->bv + 1024, 64);
                _tile_dpbf16ps(2, 7, 5);
                _tile_loadd(6, w->bv + 1536, 64);
                _tile_dpbf16ps(3, 7, 6);
            }
        }
        _tile_stored(0, w->cv, 64);
        _tile_stored(1, w->cv + 256, 64);
        if (nbb == 2) {
            _tile_stored(2, w->cv + 512, 64);
            _tile_stored(3, w->cv + 768, 64);
        }
        for (r = 0; r < nr; r++) {
            const __m512 al = _mm512_set1_ps(w->alpha[r]);
            float *o = s->acc + (r0 + r) * s->Dp;
            for (q = 0; q < nbb; q++) {
                const float *ce = w->cv + q * 512, *co = ce + 256;
                const __m512 ev = amx_sum_pieces(_mm512_loadu_ps(ce + r * 16), _mm512_loadu_ps(ce + (nr + r) * 16),
                                                 _mm512_loadu_ps(ce + (2 * nr + r) * 16));
                const __m512 od = amx_sum_pieces(_mm512_loadu_ps(co + r * 16), _mm512_loadu_ps(co + (nr + r) * 16),
                                                 _mm512_loadu_ps(co + (2 * nr + r) * 16));
                float *ob = o + 32 * (b0 + q);
                _mm512_storeu_ps(ob, _mm512_fmadd_ps(_mm512_loadu_ps(ob), al,
                                                     _mm512_permutex2var_ps(ev, lo_idx, od)));
                _mm512_storeu_ps(ob + 16, _mm512_fmadd_ps(_mm512_loadu_ps(ob + 16), al,
                                                          _mm512_permutex2var_ps(ev, hi_idx, od)));
            }
        }
    }
}

/* Rows r0 .. r0 + nr - 1 over the whole span. */
AMX_TARGET static void amx_rows(const struct kvc_amx_span *s, const struct amx_buf *w, int64_t r0, int64_t nr)
{
    const int64_t D = s->D, ng = s->ng, end = s->j0 + s->n;
    int64_t j, r, u, tcur = -1;
    /* B's and A's rows past the pieces' 3 nr stay zero */
    memset(w->tq, 0, (size_t)(16 * D / 2) * sizeof(uint32_t));
    memset(w->av, 0, 2 * 16 * 32 * sizeof(uint16_t));
    for (j = s->j0; j < end; j += KVC_AMX_CHUNK) {
        const int64_t nc = end - j < KVC_AMX_CHUNK ? end - j : KVC_AMX_CHUNK;
        amx_chunk_logits(s, w, r0, nr, j, nc, &tcur);
        for (r = 0; r < nr; r++) {
            float *x = w->x + r * KVC_AMX_CHUNK;
            struct kvc_softmax_state st;
            __m512 mv = _mm512_set1_ps(-INFINITY);
            float m;
            int64_t i;
            for (i = 0; i < nc; i += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(x + i));
            m = _mm512_reduce_max_ps(mv);
            st.m = s->pm[r0 + r];
            st.s = s->ps[r0 + r];
            w->alpha[r] = kvc_softmax_rescale(&st, m);
            st.s += kvc_exp_shift_sum(x, nc, st.m);
            s->pm[r0 + r] = st.m;
            s->ps[r0 + r] = st.s;
        }
        memset(w->mnv, 0, (size_t)(nr * (D / 32) * 16) * sizeof(float));
        amx_chunk_values(s, w, r0, nr, j, nc);
        for (r = 0; r < nr; r++)
            for (u = 0; u < ng; u++) {
                float *mn = s->mn + (r0 + r) * ng + u;
                *mn = *mn * w->alpha[r] + _mm512_reduce_add_ps(_mm512_loadu_ps(w->mnv + (r * (D / 32) + u) * 16));
            }
    }
}

AMX_TARGET void kvc_amx_packed_span(const struct kvc_amx_span *s)
{
    struct amx_cfg cfg;
    struct amx_buf w;
    int64_t r0;
    int i;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (i = 0; i < 8; i++) {
        cfg.rows[i] = 16;
        cfg.colsb[i] = 64;
    }
    (void)amx_carve(&w, s->scratch, s->D);
    w.ktab = amx_code_table(s->bits);
    w.vtab = amx_code_table(s->vbits);
    _tile_loadconfig(&cfg);
    for (r0 = 0; r0 < s->R; r0 += AMX_ROWS)
        amx_rows(s, &w, r0, s->R - r0 < AMX_ROWS ? s->R - r0 : AMX_ROWS);
    _tile_release();
}

#else /* no AMX path in this build */

int kvc_amx_usable(int bits, int vbits, int64_t D, int64_t G)
{
    (void)bits, (void)vbits, (void)D, (void)G;
    return 0;
}

size_t kvc_amx_scratch_bytes(int64_t D)
{
    (void)D;
    return 0;
}

void kvc_amx_packed_span(const struct kvc_amx_span *s)
{
    (void)s;
}

#endif
