/*
 * attention_amx.c - the packed attention's AMX path (attention_amx.h).
 *
 * Int8 tile products (AMX-INT8, tdpbssd: int8 x int8 summed in int32).
 * Every fp32 multiplier (a query times its key scale, a weight times its
 * value scale) becomes a fixed point of 31 bits: round(m x 2^(30 - E)),
 * E the exponent of the largest multiplier it is summed with, split into
 * four signed int8 digits (base 256). Codes enter centred, as signed bytes
 * (code - 2^(bits - 1)). A digit times a code is exact and so is every
 * int32 sum; the four digits' sums are combined in fp32, small first.
 * Per chunk of KVC_AMX_CHUNK slots, for up to 4 query rows at a time
 * (4 digits x 4 rows fill a tile's 16 rows):
 *   logits  a pair of 16-slot tiles: C[4 row + digit][slot] += A . B over
 *           the head dim in steps of 64 channels, A = the digits of each
 *           row's q x key scale (built once per token group), B = the
 *           slots' codes, four channels of a slot per dword. B comes from
 *           the packed rows by a 4 x 4 dword transpose in each 128-bit
 *           lane and a shift and mask per row of B: no shuffle per code.
 *           logit = scaling x 2^(E - 6) x digits' sum + bias + log(count).
 *   softmax one rescale of the running state per chunk (its max), then the
 *           chunk's weights exp(x - max).
 *   values  64 slots and two 32-channel blocks at a time:
 *           C[4 row + digit][channel] += A . B, A = the digits of weight x
 *           value scale over the slots (E from the bound: the chunk's
 *           largest weight x largest scale of the group), B = the codes of
 *           four slots per dword, a byte each, by one byte permute per
 *           four rows; accumulated over the chunk in four tiles.
 * 2-, 4- and 8-bit codes, keys and values each (8-bit codes are already
 * bytes: centring flips their top bit).
 * Every tile is 16 rows of 64 bytes. No dequantized value is formed.
 *
 * Tried on the way (a 2-core Xeon with AMX, benchmarks/ab_packed.py), and
 * not kept: building a batch of tiles before their products (about 0.9x)
 * or one step ahead of them (0.95-1.01x), to spare a tile load the wait
 * for the stores that wrote its bytes (24 ns a fresh tile load, measured
 * alone; here other work hides it); buffers skewed against 4 KiB aliasing
 * (1.00x); prefetching a line, not a row, at a time (0.86-1.01x). With
 * the layers read from memory (ab_packed.py --stream): key codes 128 slots
 * ahead instead of 64 (0.93-1.02x), key codes also into L2 256 slots ahead
 * (0.94-1.00x), value codes a chunk ahead (0.96-0.99x).
 */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE /* syscall(), for the tile-state permission */
#endif
#include <float.h>
#include <math.h>
#include <string.h>

#include "attention_amx.h"
#include "attention_packed_math.h"
#include "kvc_math.h"

#define AMX_ROWS 4 /* query rows per pass: their four int8 digits fill a tile's 16 rows */
#define AMX_K 64   /* bytes of K in one tile product: 64 key channels, or 64 slots of values */
#define AMX_KPF 64 /* slots ahead that key codes and key scales are prefetched */

#ifdef KVC_AMX
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_TARGET __attribute__((target("arch=x86-64-v4,avx512vbmi,amx-tile,amx-int8")))
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* AMX-TILE and AMX-INT8 (cpuid 7.0 edx bits 24 and 25), AVX512-VBMI (ecx
 * bit 1: the byte permutes; every AMX CPU has it), the tile state enabled
 * by the OS (XCR0 bits 17 and 18), and Linux's permission for this process
 * to use it (asked once; threads share it). */
static int amx_cpu(void)
{
    unsigned a, b, c, d, lo, hi;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return 0; /* OSXSAVE */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (!(d & (1u << 24)) || !(d & (1u << 25)) || !(c & (1u << 1))) return 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    (void)hi;
    if ((lo & (3u << 17)) != (3u << 17)) return 0;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

int kvc_amx_usable(int bits, int vbits, int64_t D, int64_t G)
{
    static int cpu = -1; /* -1: not asked yet; two threads asking store the same answer */
    int c;
    if ((bits != 2 && bits != 4 && bits != 8) || (vbits != 2 && vbits != 4 && vbits != 8) || D < 32 || D % 32 ||
        G % 32)
        return 0;
    if (!kvc_amx_allowed() || !kvc_wide_active()) return 0;
    c = __atomic_load_n(&cpu, __ATOMIC_RELAXED);
    if (c < 0) {
        c = amx_cpu();
        __atomic_store_n(&cpu, c, __ATOMIC_RELAXED);
    }
    return c;
}

/* The thread's buffers (attention_amx.h's scratch), 64-byte aligned. A
 * tile is 16 rows of 64 bytes (1024); a C tile 16 x 16 int32. */
struct amx_buf {
    __m512i kperm, vperm; /* amx_digit_perm of the key channel order and of slot order */
    __m512i quad;         /* vpermb: dword i = byte i of four 16-byte rows (amx_value_codes, 4 and 8 bits) */
    __m512i pair[2];      /* vpermb: the first and second four of eight 8-byte rows, dword i = their byte i,
                           * twice (amx_value_codes, 2 bits) */
    float *x;       /* [AMX_ROWS][CHUNK] logits, then weights */
    int8_t *ka;     /* [ks][1024] A of each key step of 64 channels: row 4r + p = digit p of row r's q x key scale */
    uint8_t *kb;    /* [2][ks][1024] B of two key tiles: row = 4 channels, dword = a slot's codes of them */
    int32_t *ct;    /* [2][256] their C: row 4r + p, column = slot */
    int8_t *av;     /* [2][1024] A of a block pair's value groups: row 4r + p, byte = a slot */
    uint8_t *bv;    /* [2][2][1024] B of a block pair: two tiles of 16 channels per block, row = 4 slots */
    int32_t *cv;    /* [4][256] the value tiles' C: row 4r + p, column = channel */
    float *sc, *ce; /* [D / 32][CHUNK] value scales and centres of the chunk's slots, by group */
    float *vmax;    /* [D / 32] the chunk's largest value scale of each group */
    float *mnv;     /* [AMX_ROWS][D / 32][16] centre sums of a chunk, per lane */
    float *krow, *mrow; /* [D] key scales and centres of a token group */
    float *kf;      /* [AMX_ROWS] scaling x 2^(E - 6), E the exponent of a group's key multipliers */
    float *vq, *vf; /* [AMX_ROWS][D / 32] 2^(30 - E) and 2^(E - 6) of a chunk's value multipliers */
    float *wmax;    /* [AMX_ROWS] the chunk's largest weight */
    float *qb, *lc, *alpha; /* [16] biases, log counts, rescale factors */
    uint8_t *tmp;   /* contiguous copies of strided code rows */
};

/* Lays the buffers out from `scratch` (NULL: only measures); returns
 * the bytes they take. */
static size_t amx_carve(struct amx_buf *w, void *scratch, int64_t D)
{
    char *base = (char *)scratch;
    const size_t d = (size_t)D, ks = (d + AMX_K - 1) / AMX_K, ng = d / 32;
    size_t off = 0;
#define AMX_TAKE(field, type, n) (w->field = base ? (type *)(base + off) : NULL, off += kvc_align_up((n) * sizeof(type)))
    AMX_TAKE(x, float, AMX_ROWS * KVC_AMX_CHUNK);
    AMX_TAKE(ka, int8_t, ks * 1024);
    AMX_TAKE(kb, uint8_t, 2 * ks * 1024);
    AMX_TAKE(ct, int32_t, 2 * 256);
    AMX_TAKE(av, int8_t, 2 * 1024);
    AMX_TAKE(bv, uint8_t, 4 * 1024);
    AMX_TAKE(cv, int32_t, 4 * 256);
    AMX_TAKE(sc, float, ng * KVC_AMX_CHUNK);
    AMX_TAKE(ce, float, ng * KVC_AMX_CHUNK);
    AMX_TAKE(vmax, float, ng);
    AMX_TAKE(mnv, float, AMX_ROWS * ng * 16);
    AMX_TAKE(krow, float, d);
    AMX_TAKE(mrow, float, d);
    AMX_TAKE(kf, float, AMX_ROWS);
    AMX_TAKE(vq, float, AMX_ROWS * ng);
    AMX_TAKE(vf, float, AMX_ROWS * ng);
    AMX_TAKE(wmax, float, AMX_ROWS);
    AMX_TAKE(qb, float, 16);
    AMX_TAKE(lc, float, 16);
    AMX_TAKE(alpha, float, 16);
    AMX_TAKE(tmp, uint8_t, 16 * d + 64 * 32); /* 16 key rows of 8-bit codes, or 64 slots of a value block */
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

/* E with 0 <= M < 2^E, at least -96 (so that 2^(30 - E) stays finite):
 * the fixed-point exponent of multipliers whose largest magnitude is M
 * (frexpf's, from the bits: the library calls took 7% of the path). */
static inline int amx_exponent(float M)
{
    uint32_t u;
    int e;
    if (!(M > 0.0f && M <= FLT_MAX)) return -96;
    memcpy(&u, &M, 4);
    e = (int)(u >> 23) - 126; /* a subnormal M (field 0) gives -126 */
    return e < -96 ? -96 : e;
}

/* 2^e for e in [-126, 127], exactly. */
static inline float amx_pow2(int e)
{
    const uint32_t u = (uint32_t)(e + 127) << 23;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* The four int8 digits of round(v x f) (|v x f| <= 2^30), a dword per
 * lane: byte p holds digit p, with round(v f) = sum_p digit_p 256^p and
 * each digit in [-128, 127]. Adding 128 to every base-256 digit turns them
 * into 0..255, the plain bytes of the integer plus 0x80808080; their top
 * bits flipped back are the signed digits. */
AMX_TARGET static inline __m512i amx_digits(__m512 v, __m512 f)
{
    const __m512i bias = _mm512_set1_epi32((int)0x80808080u);
    const __m512i i = _mm512_cvtps_epi32(_mm512_mul_ps(v, f)); /* an exact product: f is a power of 2 */
    return _mm512_xor_si512(_mm512_add_epi32(i, bias), bias);
}

/* vpermb table from 16 lanes of digits (amx_digits) to 4 x 16 bytes: digit
 * p of lane chan[j] at byte 16p + j. */
AMX_TARGET static inline __m512i amx_digit_perm(const int chan[16])
{
    uint8_t t[64];
    int p, j;
    for (p = 0; p < 4; p++)
        for (j = 0; j < 16; j++) t[16 * p + j] = (uint8_t)(4 * chan[j] + p);
    return _mm512_loadu_si512(t);
}

/* Four rows of a tile (64 bytes each, at dst .. dst + 192) from the
 * permuted digits of four blocks of 16 (z[c] = digit p of block c's 16
 * lanes in its lane p): row p = lane p of z[0..3], by a 4 x 4 transpose of
 * the lanes. Whole-row stores: 16-byte ones cost twice the time here. */
AMX_TARGET static inline void amx_store_rows(void *dst, const __m512i z[4])
{
    char *d = (char *)dst;
    const __m512i t0 = _mm512_shuffle_i32x4(z[0], z[1], 0x44), t1 = _mm512_shuffle_i32x4(z[0], z[1], 0xee);
    const __m512i t2 = _mm512_shuffle_i32x4(z[2], z[3], 0x44), t3 = _mm512_shuffle_i32x4(z[2], z[3], 0xee);
    _mm512_storeu_si512(d, _mm512_shuffle_i32x4(t0, t2, 0x88));
    _mm512_storeu_si512(d + 64, _mm512_shuffle_i32x4(t0, t2, 0xdd));
    _mm512_storeu_si512(d + 128, _mm512_shuffle_i32x4(t1, t3, 0x88));
    _mm512_storeu_si512(d + 192, _mm512_shuffle_i32x4(t1, t3, 0xdd));
}

/* A product's sum from the int32 sums of its four digits (rows 16 ints
 * apart), the small ones first: (sum_p C_p 256^p) / 2^24 in fp32. Each C_p
 * is below 2^23 in magnitude, so its conversion is exact. */
AMX_TARGET static inline __m512 amx_undigit(const int32_t *c)
{
    const __m512 d0 = _mm512_cvtepi32_ps(_mm512_loadu_si512(c)), d1 = _mm512_cvtepi32_ps(_mm512_loadu_si512(c + 16));
    const __m512 d2 = _mm512_cvtepi32_ps(_mm512_loadu_si512(c + 32)),
                 d3 = _mm512_cvtepi32_ps(_mm512_loadu_si512(c + 48));
    __m512 s = _mm512_fmadd_ps(d1, _mm512_set1_ps(0x1p-16f), _mm512_mul_ps(d0, _mm512_set1_ps(0x1p-24f)));
    s = _mm512_fmadd_ps(d2, _mm512_set1_ps(0x1p-8f), s);
    return _mm512_add_ps(s, d3);
}

/* In each 128-bit lane, the 4 x 4 dwords of t[0..3] transposed: lane L of
 * t[i] holding dwords m..m + 3 of row 4L + i becomes lane L of t[i]
 * holding dword m + i of rows 4L..4L + 3. */
AMX_TARGET static inline void amx_transpose4(__m512i t[4])
{
    const __m512i a0 = _mm512_unpacklo_epi32(t[0], t[1]), a1 = _mm512_unpackhi_epi32(t[0], t[1]);
    const __m512i a2 = _mm512_unpacklo_epi32(t[2], t[3]), a3 = _mm512_unpackhi_epi32(t[2], t[3]);
    t[0] = _mm512_unpacklo_epi64(a0, a2);
    t[1] = _mm512_unpackhi_epi64(a0, a2);
    t[2] = _mm512_unpacklo_epi64(a1, a3);
    t[3] = _mm512_unpackhi_epi64(a1, a3);
}

/* Four 16-byte rows (`stride` apart) in the four lanes of one register. */
AMX_TARGET static inline __m512i amx_four_rows(const uint8_t *src, int64_t stride)
{
    __m512i z = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)src));
    z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(src + stride)), 1);
    z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(src + 2 * stride)), 2);
    return _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(src + 3 * stride)), 3);
}

/* The channel at K position j (0..15) of a 16-channel block of keys at
 * `bits`: amx_key_codes' row m * 8 / bits + s holds, in byte i of every
 * slot's dword, channel i * 8 / bits + s of code dword m. */
static inline int amx_key_channel(int j, int bits)
{
    const int spr = 8 / bits, cpd = 32 / bits; /* rows of B and channels per code dword */
    const int jj = j % (4 * spr);
    return j / (4 * spr) * cpd + jj % 4 * spr + jj / 4;
}

/* B of the 16 slots from jt (one key tile) into dst's key steps: code
 * dword m of the rows (32 / bits channels) gives 8 / bits rows of B, row
 * m * 8 / bits + s the bits from s * bits of every byte, centred (minus
 * 2^(bits - 1)): in each slot's dword, channels i * 8 / bits + s of the
 * code dword (i = 0..3, a byte each). The slots' dwords come from a 4 x 4
 * transpose in each 128-bit lane, four rows per register: no shuffle per
 * code. */
AMX_TARGET static void amx_key_codes(const struct kvc_packed_span *s, const struct amx_buf *w, uint8_t *dst,
                                     int64_t jt)
{
    const int bits = s->bits, spr = 8 / bits;
    const int64_t W = s->D * bits / 32, rb = 4 * W; /* dwords and bytes of a code row */
    const __m512i mask = _mm512_set1_epi8((char)kvc_pk_mask(bits)), off = _mm512_set1_epi8((char)(1 << (bits - 1)));
    const uint8_t *src = s->h.kc + jt * s->h.kcs;
    int64_t stride = s->h.kcs, m, i;
    int k;
    if (s->h.kcd != 1 || W % 4) {
        /* strided codes, or rows of 4k + 2 dwords (2 bits, D = 32 or 96):
         * a contiguous copy (which the gather below indexes in int32) */
        for (i = 0; i < 16; i++)
            for (m = 0; m < rb; m++) w->tmp[i * rb + m] = src[i * s->h.kcs + m * s->h.kcd];
        src = w->tmp;
        stride = rb;
    }
    for (m = 0; m < W; m += 4) {
        __m512i t[4];
        if (m + 4 <= W) {
            for (k = 0; k < 4; k++) t[k] = amx_four_rows(src + k * stride + 4 * m, 4 * stride);
            amx_transpose4(t);
        } else {
            const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
            const __m512i at = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)stride));
            for (k = 0; m + k < W; k++) t[k] = _mm512_i32gather_epi32(at, src + 4 * (m + k), 1);
        }
        for (k = 0; k < 4 && m + k < W; k++) {
            int sh;
            for (sh = 0; sh < spr; sh++) {
                const int64_t row = (m + k) * spr + sh;
                const __m512i c = _mm512_and_si512(_mm512_srli_epi32(t[k], (unsigned)(sh * bits)), mask);
                _mm512_storeu_si512(dst + row / 16 * 1024 + row % 16 * 64, _mm512_sub_epi8(c, off));
            }
        }
    }
}

/* Token group t's A (the digits of q x key scale of rows r0.., row 4r + p
 * of each key step, in amx_key_codes' channel order), their factors
 * w->kf and the biases scaling x q . centre. The digits are a fixed point
 * of 2^(E - 30), E the row's exponent (amx_exponent of its largest
 * multiplier): 31 bits against fp32's 24, so each multiplier is rounded by
 * at most 2^-31 of the largest. */
AMX_TARGET static void amx_key_group(const struct kvc_packed_span *s, const struct amx_buf *w, int64_t r0, int64_t nr,
                                     int64_t t)
{
    const int64_t D = s->D;
    const float *ks = s->h.ks + t * s->h.kss, *km = s->h.km + t * s->h.kms;
    const float off = (float)(1 << (s->bits - 1));
    __m512 bias[AMX_ROWS], mx[AMX_ROWS], f[AMX_ROWS];
    int64_t c, r;
    if (s->h.ksd == 1 && s->h.kmd == 1) {
        const __m512 voff = _mm512_set1_ps(off);
        for (c = 0; c < D; c += 16) {
            const __m512 sc = _mm512_loadu_ps(ks + c);
            _mm512_storeu_ps(w->krow + c, sc);
            /* the centre min + scale x 2^(bits - 1), fused here and below
             * alike: the strided path gives the same bits at any -O */
            _mm512_storeu_ps(w->mrow + c, _mm512_fmadd_ps(sc, voff, _mm512_loadu_ps(km + c)));
        }
    } else {
        for (c = 0; c < D; c++) {
            w->krow[c] = ks[c * s->h.ksd];
            w->mrow[c] = fmaf(ks[c * s->h.ksd], off, km[c * s->h.kmd]);
        }
    }
    /* in phases over the rows, so that their reductions overlap rather
     * than chain */
    for (r = 0; r < nr; r++) {
        const float *q = s->q + (r0 + r) * s->Dp;
        bias[r] = _mm512_setzero_ps();
        mx[r] = _mm512_setzero_ps();
        for (c = 0; c < D; c += 16) {
            const __m512 q0 = _mm512_loadu_ps(q + c);
            bias[r] = _mm512_fmadd_ps(q0, _mm512_loadu_ps(w->mrow + c), bias[r]);
            mx[r] = _mm512_max_ps(mx[r], _mm512_abs_ps(_mm512_mul_ps(q0, _mm512_loadu_ps(w->krow + c))));
        }
    }
    for (r = 0; r < nr; r++) {
        const float M = _mm512_reduce_max_ps(mx[r]);
        const int E = amx_exponent(M);
        w->qb[r] = s->scaling * _mm512_reduce_add_ps(bias[r]);
        f[r] = _mm512_set1_ps(amx_pow2(30 - E));
        w->kf[r] = M <= FLT_MAX ? s->scaling * amx_pow2(E - 6) : NAN; /* an infinite product: NaN logits */
    }
    for (r = 0; r < nr; r++) {
        const float *q = s->q + (r0 + r) * s->Dp;
        for (c = 0; c < D; c += AMX_K) {
            __m512i z[4];
            int b;
            for (b = 0; b < 4; b++) {
                const int64_t cb = c + 16 * b; /* channels past D (D % 64 == 32): zero digits */
                z[b] = cb < D ? _mm512_permutexvar_epi8(w->kperm, amx_digits(_mm512_mul_ps(_mm512_loadu_ps(q + cb),
                                                                                         _mm512_loadu_ps(w->krow + cb)),
                                                                           f[r]))
                              : _mm512_setzero_si512();
            }
            amx_store_rows(w->ka + c / AMX_K * 1024 + 4 * r * 64, z);
        }
    }
}

/* A tile's logits from its C (w->ct + 256 h: row 4r + p, 16 slots):
 * scaling x q . (scale x centred code) + bias + log count, into w->x from
 * slot jt - j. */
AMX_TARGET static inline void amx_tile_logits(const struct kvc_packed_span *s, const struct amx_buf *w, int64_t nr,
                                              int64_t j, int64_t jt, int h)
{
    __m512 lc;
    int64_t i, r;
    if (s->h.c) {
        for (i = 0; i < 16; i++) w->lc[i] = kvc_logf(s->h.c[(jt + i) * s->h.cs]);
        lc = _mm512_loadu_ps(w->lc);
    } else {
        lc = _mm512_setzero_ps();
    }
    for (r = 0; r < nr; r++) {
        const __m512 x = _mm512_fmadd_ps(amx_undigit(w->ct + 256 * h + 64 * r), _mm512_set1_ps(w->kf[r]),
                                         _mm512_add_ps(lc, _mm512_set1_ps(w->qb[r])));
        _mm512_storeu_ps(w->x + r * KVC_AMX_CHUNK + (jt - j), x);
    }
}

/* Quarter q (0..3) of the code prefetches of the tile pair at jt: the key
 * rows AMX_KPF slots ahead (into L1) and this pair's value rows, read after
 * the chunk's softmax (into L2), one request per line. The codes stream
 * from memory; asked for all at once, row by row, the 32 + 32 rows of a
 * pair stalled the core at the prefetches themselves (perf: the hottest
 * instructions of the span), so amx_chunk_logits spreads them over the
 * pair's work, 8 rows of each per quarter. Against the burst, paired
 * (ab_packed.py --stream): 1.01-1.29x on one thread, 0.99-1.24x on two,
 * 0.99-1.25x in cache; the largest gains at D = 128 and 8 bits. Keys 96
 * or 128 slots ahead were 0.95-1.01x of 64; the scale prefetches moved
 * later in the pair 0.93-1.12x (RESULTS.md, "Code prefetches spread over
 * the work"). */
AMX_TARGET static inline void amx_prefetch_codes(const struct kvc_packed_span *s, int64_t jt, int q)
{
    const int64_t end = s->j0 + s->n, rb = s->D * s->bits / 8, rv = s->D * s->vbits / 8;
    const int64_t k0 = jt + AMX_KPF + 8 * q, v0 = jt + 8 * q;
    kvc_packed_prefetch_rows(s->h.kc, s->h.kcs, s->h.kcd, rb, k0, k0 + 8, end, 0);
    kvc_packed_prefetch_rows(s->h.vc, s->h.vcs, s->h.vcd, rv, v0, v0 + 8, end, 1);
}

/* Logits of rows r0.. over the chunk's slots [j, j + nc) into w->x, two
 * tiles at a time (two independent chains of products). */
AMX_TARGET static void amx_chunk_logits(const struct kvc_packed_span *s, const struct amx_buf *w, int64_t r0,
                                        int64_t nr, int64_t j, int64_t nc, int64_t *tcur)
{
    const int64_t ks = (s->D + AMX_K - 1) / AMX_K, end = s->j0 + s->n;
    int64_t jt, k;
    for (jt = j; jt < j + nc; jt += 32) {
        const int64_t t = jt / s->G; /* both tiles: G is a multiple of 32 */
        if (t != *tcur) {
            amx_key_group(s, w, r0, nr, t);
            *tcur = t;
        }
        /* the scales too: the key group's at the keys' distance, and the
         * next chunk's value scales, whose first read (right after this
         * chunk's softmax) otherwise waits on memory once per chunk. With
         * every layer read from memory (ab_packed.py --stream) 1.05-1.14x
         * at SmolLM2's shape, one thread, almost all from the value
         * scales; 1.00-1.04x at D = 128; in cache 0.97-1.05x */
        {
            const int64_t tk = jt + AMX_KPF;
            if (tk % s->G == 0 && tk < end) kvc_packed_prefetch_key_group(&s->h, tk / s->G, s->D);
            kvc_packed_prefetch_values(&s->h, jt + KVC_AMX_CHUNK, 32, end, s->ng, 1);
        }
        amx_prefetch_codes(s, jt, 0);
        amx_key_codes(s, w, w->kb, jt);
        amx_prefetch_codes(s, jt, 1);
        amx_key_codes(s, w, w->kb + ks * 1024, jt + 16);
        amx_prefetch_codes(s, jt, 2);
        _tile_zero(0);
        _tile_zero(1);
        for (k = 0; k < ks; k++) {
            _tile_loadd(2, w->ka + k * 1024, 64);
            _tile_loadd(4, w->kb + k * 1024, 64);
            _tile_dpbssd(0, 2, 4);
            _tile_loadd(5, w->kb + (ks + k) * 1024, 64);
            _tile_dpbssd(1, 2, 5);
        }
        _tile_stored(0, w->ct, 64);
        _tile_stored(1, w->ct + 256, 64);
        amx_tile_logits(s, w, nr, j, jt, 0);
        amx_prefetch_codes(s, jt, 3);
        amx_tile_logits(s, w, nr, j, jt + 16, 1);
    }
}

/* Group u's floats of 16 rows of ng (1, 2 or 4) floats at p. */
AMX_TARGET static inline __m512 amx_group_lanes(const float *p, int64_t ng, int64_t u)
{
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    if (ng == 1) return _mm512_loadu_ps(p);
    if (ng == 2) {
        const __m512i idx = _mm512_add_epi32(_mm512_slli_epi32(lane, 1), _mm512_set1_epi32((int)u));
        return _mm512_permutex2var_ps(_mm512_loadu_ps(p), idx, _mm512_loadu_ps(p + 16));
    } else {
        /* rows 0-7 from the first two vectors and 8-15 from the last two,
         * each into lanes 0-7 (index 4l + u, lanes 8-15 alike) */
        const __m512i idx = _mm512_add_epi32(_mm512_slli_epi32(_mm512_and_si512(lane, _mm512_set1_epi32(7)), 2),
                                             _mm512_set1_epi32((int)u));
        const __m512 a = _mm512_permutex2var_ps(_mm512_loadu_ps(p), idx, _mm512_loadu_ps(p + 16));
        const __m512 b = _mm512_permutex2var_ps(_mm512_loadu_ps(p + 32), idx, _mm512_loadu_ps(p + 48));
        return _mm512_shuffle_f32x4(a, b, 0x44);
    }
}

/* The chunk's value scales and centres by group (w->sc, w->ce), the centre
 * sums of rows r0.. (w->mnv, weights in w->x), and each row's and group's
 * fixed point from the bound wmax x vmax of its multipliers. */
AMX_TARGET static void amx_value_scales(const struct kvc_packed_span *s, const struct amx_buf *w, int64_t nr,
                                        int64_t j, int64_t nc)
{
    const float off = (float)(1 << (s->vbits - 1));
    /* [slot][group] rows of 1, 2 or 4 groups (the packer's layout): whole
     * vectors loaded and each group's lanes picked by permutes, the same
     * floats as a gather reads at a fraction of its loads */
    const int rows = s->h.vsd == 1 && s->h.vmd == 1 && s->h.vss == s->ng && s->h.vms == s->ng &&
                     (s->ng == 1 || s->ng == 2 || s->ng == 4);
    const int gather = s->h.vss * 15 <= INT32_MAX && s->h.vms * 15 <= INT32_MAX && s->h.vss >= 0 && s->h.vms >= 0;
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i is = _mm512_mullo_epi32(lane, _mm512_set1_epi32(gather ? (int)s->h.vss : 0));
    const __m512i im = _mm512_mullo_epi32(lane, _mm512_set1_epi32(gather ? (int)s->h.vms : 0));
    int64_t u, i, r;
    for (u = 0; u < s->ng; u++) {
        const float *vs = s->h.vs + j * s->h.vss + u * s->h.vsd, *vm = s->h.vm + j * s->h.vms + u * s->h.vmd;
        float *sc = w->sc + u * KVC_AMX_CHUNK, *ce = w->ce + u * KVC_AMX_CHUNK;
        __m512 mx = _mm512_setzero_ps();
        for (i = 0; i < nc; i += 16) {
            __m512 a, m;
            if (rows) {
                a = amx_group_lanes(s->h.vs + (j + i) * s->ng, s->ng, u);
                m = _mm512_fmadd_ps(a, _mm512_set1_ps(off), amx_group_lanes(s->h.vm + (j + i) * s->ng, s->ng, u));
                _mm512_storeu_ps(sc + i, a);
                _mm512_storeu_ps(ce + i, m);
            } else if (gather) {
                a = _mm512_i32gather_ps(is, vs + i * s->h.vss, 4);
                m = _mm512_fmadd_ps(a, _mm512_set1_ps(off), _mm512_i32gather_ps(im, vm + i * s->h.vms, 4));
                _mm512_storeu_ps(sc + i, a);
                _mm512_storeu_ps(ce + i, m);
            } else {
                int l;
                for (l = 0; l < 16; l++) {
                    sc[i + l] = vs[(i + l) * s->h.vss];
                    ce[i + l] = fmaf(sc[i + l], off, vm[(i + l) * s->h.vms]); /* as the gathers' */
                }
                a = _mm512_loadu_ps(sc + i);
                m = _mm512_loadu_ps(ce + i);
            }
            mx = _mm512_max_ps(mx, _mm512_abs_ps(a));
            for (r = 0; r < nr; r++) {
                float *mv = w->mnv + (r * s->ng + u) * 16;
                _mm512_storeu_ps(mv, _mm512_fmadd_ps(_mm512_loadu_ps(w->x + r * KVC_AMX_CHUNK + i), m,
                                                     _mm512_loadu_ps(mv)));
            }
        }
        w->vmax[u] = _mm512_reduce_max_ps(mx);
    }
    for (r = 0; r < nr; r++)
        for (u = 0; u < s->ng; u++) {
            /* |weight x scale| <= wmax x vmax: rounding is monotone */
            const float B = w->wmax[r] * w->vmax[u];
            const int E = amx_exponent(B);
            w->vq[r * s->ng + u] = amx_pow2(30 - E);
            w->vf[r * s->ng + u] = B <= FLT_MAX ? amx_pow2(E - 6) : NAN;
        }
}

/* A of value group u over the nk slots (32 or 64) from chunk offset o:
 * row 4r + p, byte i = digit p of slot o + i's weight x scale in the row's
 * fixed point; the bytes past nk zero. */
AMX_TARGET static void amx_value_pieces(const struct kvc_packed_span *s, const struct amx_buf *w, int8_t *dst,
                                        int64_t nr, int64_t u, int64_t o, int64_t nk)
{
    const float *sc = w->sc + u * KVC_AMX_CHUNK + o;
    int64_t r, i;
    for (r = 0; r < nr; r++) {
        const float *x = w->x + r * KVC_AMX_CHUNK + o;
        const __m512 f = _mm512_set1_ps(w->vq[r * s->ng + u]);
        __m512i z[4];
        for (i = 0; i < 4; i++)
            z[i] = 16 * i < nk ? _mm512_permutexvar_epi8(w->vperm, amx_digits(_mm512_mul_ps(_mm512_loadu_ps(x + 16 * i),
                                                                                          _mm512_loadu_ps(sc + 16 * i)),
                                                                            f))
                               : _mm512_setzero_si512();
        amx_store_rows(dst + 4 * r * 64, z);
    }
}

/* amx_value_codes' byte permutes (w->quad, w->pair). */
AMX_TARGET static void amx_value_perms(struct amx_buf *w)
{
    uint8_t t[3][64];
    int k;
    for (k = 0; k < 64; k++) {
        t[0][k] = (uint8_t)(16 * (k % 4) + k / 4);
        t[1][k] = (uint8_t)(8 * (k % 4) + k % 32 / 4);
        t[2][k] = (uint8_t)(8 * (4 + k % 4) + k % 32 / 4);
    }
    w->quad = _mm512_loadu_si512(t[0]);
    w->pair[0] = _mm512_loadu_si512(t[1]);
    w->pair[1] = _mm512_loadu_si512(t[2]);
}

/* B of block b (channels 32b..32b + 31) over the nk slots from js: row k
 * holds slots js + 4k .. js + 4k + 3, a byte each in a dword per channel,
 * centred (minus 2^(bits - 1)). Two tiles of 16 channels: 4 bits, the even
 * channels at dst and the odd at dst + 1024; 2 bits, channels 4n and
 * 4n + 1 (n = 0..7) at dst, 4n + 2 and 4n + 3 at dst + 1024; 8 bits,
 * channels 0-15 at dst and 16-31 at dst + 1024. */
AMX_TARGET static void amx_value_codes(const struct kvc_packed_span *s, const struct amx_buf *w, uint8_t *dst,
                                       int64_t b, int64_t js, int64_t nk)
{
    const int vb = s->vbits;
    const int64_t nbytes = 4 * vb; /* bytes of 32 channels */
    const __m512i mask = _mm512_set1_epi8((char)kvc_pk_mask(vb)), off = _mm512_set1_epi8((char)(1 << (vb - 1)));
    const uint8_t *src = s->h.vc + js * s->h.vcs + nbytes * b * s->h.vcd;
    int64_t stride = s->h.vcs, k, i;
    if (s->h.vcd != 1) {
        for (k = 0; k < nk; k++)
            for (i = 0; i < nbytes; i++) w->tmp[k * nbytes + i] = src[k * s->h.vcs + i * s->h.vcd];
        src = w->tmp;
        stride = nbytes;
    }
    if (vb == 8) {
        /* a byte per code: each 16-channel half of the four rows by one
         * byte permute */
        for (k = 0; k < nk / 4; k++) {
            const uint8_t *r4 = src + 4 * k * stride;
            _mm512_storeu_si512(dst + 64 * k,
                                _mm512_sub_epi8(_mm512_permutexvar_epi8(w->quad, amx_four_rows(r4, stride)), off));
            _mm512_storeu_si512(dst + 1024 + 64 * k,
                                _mm512_sub_epi8(_mm512_permutexvar_epi8(w->quad, amx_four_rows(r4 + 16, stride)), off));
        }
    } else if (vb == 4) {
        for (k = 0; k < nk / 4; k++) {
            const __m512i z = _mm512_permutexvar_epi8(w->quad, amx_four_rows(src + 4 * k * stride, stride));
            _mm512_storeu_si512(dst + 64 * k, _mm512_sub_epi8(_mm512_and_si512(z, mask), off));
            _mm512_storeu_si512(dst + 1024 + 64 * k,
                                _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi32(z, 4), mask), off));
        }
    } else {
        /* 8 bytes a row: eight rows (two quads) by one gather; each quad's
         * dwords twice, shifted by 0 and 2 (then 4 and 6) in the two halves */
        const __m512i lo = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
        const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(4));
        const __m512i at = _mm512_set_epi64(7 * stride, 6 * stride, 5 * stride, 4 * stride, 3 * stride, 2 * stride,
                                            stride, 0);
        int q;
        for (k = 0; k < nk / 4; k += 2) {
            const __m512i rows = _mm512_i64gather_epi64(at, src + 4 * k * stride, 1);
            for (q = 0; q < 2; q++) {
                const __m512i z = _mm512_permutexvar_epi8(w->pair[q], rows);
                _mm512_storeu_si512(dst + 64 * (k + q),
                                    _mm512_sub_epi8(_mm512_and_si512(_mm512_srlv_epi32(z, lo), mask), off));
                _mm512_storeu_si512(dst + 1024 + 64 * (k + q),
                                    _mm512_sub_epi8(_mm512_and_si512(_mm512_srlv_epi32(z, hi), mask), off));
            }
        }
    }
}

/* The weighted value codes of rows r0.. over the chunk's slots [j, j + nc)
 * (weights in w->x, scales in w->sc) into s->acc, rescaled by w->alpha. */
AMX_TARGET static void amx_chunk_values(const struct kvc_packed_span *s, const struct amx_buf *w, int64_t r0,
                                        int64_t nr, int64_t j, int64_t nc)
{
    const int64_t nb = s->D / 32;
    /* channels 0-15 and 16-31 of a block from its two tiles' columns
     * (amx_value_codes' order) */
    const __m512i lo_idx = s->vbits == 8   ? _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)
                           : s->vbits == 4 ? _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0)
                                           : _mm512_set_epi32(27, 19, 11, 3, 26, 18, 10, 2, 25, 17, 9, 1, 24, 16, 8, 0);
    const __m512i hi_idx = s->vbits == 8
                               ? _mm512_set_epi32(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16)
                           : s->vbits == 4 ? _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8)
                                           : _mm512_set_epi32(31, 23, 15, 7, 30, 22, 14, 6, 29, 21, 13, 5, 28, 20, 12, 4);
    int64_t b0, js, r, q;
    for (b0 = 0; b0 < nb; b0 += 2) {
        const int64_t nbb = nb - b0 < 2 ? nb - b0 : 2;
        const int shared = nbb == 2 && 32 * (b0 + 1) / s->G == 32 * b0 / s->G; /* one value group: one A */
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (js = j; js < j + nc; js += AMX_K) {
            const int64_t nk = j + nc - js < AMX_K ? j + nc - js : AMX_K;
            for (q = 0; q < nbb; q++) {
                if (q == 0 || !shared)
                    amx_value_pieces(s, w, w->av + q * 1024, nr, 32 * (b0 + q) / s->G, js - j, nk);
                amx_value_codes(s, w, w->bv + q * 2048, b0 + q, js, nk);
            }
            _tile_loadd(4, w->av, 64);
            _tile_loadd(5, w->bv, 64);
            _tile_dpbssd(0, 4, 5);
            _tile_loadd(6, w->bv + 1024, 64);
            _tile_dpbssd(1, 4, 6);
            if (nbb == 2) {
                _tile_loadd(7, w->av + (shared ? 0 : 1024), 64);
                _tile_loadd(5, w->bv + 2048, 64);
                _tile_dpbssd(2, 7, 5);
                _tile_loadd(6, w->bv + 3072, 64);
                _tile_dpbssd(3, 7, 6);
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
                const __m512 f = _mm512_set1_ps(w->vf[r * s->ng + 32 * (b0 + q) / s->G]);
                const int32_t *c = w->cv + q * 512 + 64 * r;
                const __m512 ev = _mm512_mul_ps(amx_undigit(c), f), od = _mm512_mul_ps(amx_undigit(c + 256), f);
                float *ob = o + 32 * (b0 + q);
                _mm512_storeu_ps(ob, _mm512_fmadd_ps(_mm512_loadu_ps(ob), al, _mm512_permutex2var_ps(ev, lo_idx, od)));
                _mm512_storeu_ps(ob + 16, _mm512_fmadd_ps(_mm512_loadu_ps(ob + 16), al,
                                                          _mm512_permutex2var_ps(ev, hi_idx, od)));
            }
        }
    }
}

/* Rows r0 .. r0 + nr - 1 over the whole span. */
AMX_TARGET static void amx_rows(const struct kvc_packed_span *s, const struct amx_buf *w, int64_t r0, int64_t nr)
{
    const int64_t ng = s->ng, end = s->j0 + s->n, ks = (s->D + AMX_K - 1) / AMX_K;
    int64_t j, r, u, tcur = -1;
    /* A's rows past 4 nr stay zero (its bytes past D are written zero by
     * amx_key_group, past a last value step of 32 slots by
     * amx_value_pieces) */
    memset(w->ka, 0, (size_t)ks * 1024);
    memset(w->av, 0, 2 * 1024);
    for (j = s->j0; j < end; j += KVC_AMX_CHUNK) {
        const int64_t nc = end - j < KVC_AMX_CHUNK ? end - j : KVC_AMX_CHUNK;
        amx_chunk_logits(s, w, r0, nr, j, nc, &tcur);
        for (r = 0; r < nr; r++) {
            float *x = w->x + r * KVC_AMX_CHUNK;
            struct kvc_softmax_state st;
            __m512 mv = _mm512_set1_ps(-INFINITY), wv = _mm512_setzero_ps();
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
            for (i = 0; i < nc; i += 16) wv = _mm512_max_ps(wv, _mm512_loadu_ps(x + i));
            w->wmax[r] = _mm512_reduce_max_ps(wv);
        }
        memset(w->mnv, 0, (size_t)(nr * ng * 16) * sizeof(float));
        amx_value_scales(s, w, nr, j, nc);
        amx_chunk_values(s, w, r0, nr, j, nc);
        for (r = 0; r < nr; r++)
            for (u = 0; u < ng; u++) {
                float *mn = s->mn + (r0 + r) * ng + u;
                *mn = *mn * w->alpha[r] + _mm512_reduce_add_ps(_mm512_loadu_ps(w->mnv + (r * ng + u) * 16));
            }
    }
}

AMX_TARGET void kvc_amx_packed_span(const struct kvc_packed_span *s)
{
    struct amx_cfg cfg;
    struct amx_buf w;
    int kc[16], vc[16];
    int64_t r0;
    int i;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (i = 0; i < 8; i++) {
        cfg.rows[i] = 16;
        cfg.colsb[i] = 64;
    }
    (void)amx_carve(&w, s->scratch, s->D);
    for (i = 0; i < 16; i++) {
        kc[i] = amx_key_channel(i, s->bits);
        vc[i] = i;
    }
    w.kperm = amx_digit_perm(kc);
    w.vperm = amx_digit_perm(vc);
    amx_value_perms(&w);
    /* B's rows past D's channels, or past a last value step of 32 slots,
     * meet zero bytes of A: they only need to hold defined bytes */
    memset(w.kb, 0, (size_t)(2 * ((s->D + AMX_K - 1) / AMX_K) * 1024));
    memset(w.bv, 0, 4 * 1024);
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

void kvc_amx_packed_span(const struct kvc_packed_span *s)
{
    (void)s;
}

#endif
