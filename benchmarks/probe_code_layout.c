/*
 * probe_code_layout.c - a measurement for the packed format's design, not
 * library code: what a different byte order of 4-bit codes would save in
 * the decode attention's inner loops when each kv slot serves one query row
 * (a model without GQA), on AVX-512.
 *
 *   current: byte b of a row holds channels 2b (low nibble) and 2b + 1, as
 *            docs/packed.md specifies. The library's wide units unpack 16
 *            codes with a broadcast load of 8 bytes, a dword permute, a
 *            variable shift and a 16-entry table lookup (vpermps, which
 *            reads only an index's low 4 bits).
 *   blocked: byte b of each 32-channel block holds channels b (low nibble)
 *            and b + 16. One zero-extending load of 16 bytes gives lanes
 *            whose low nibble is channel l and whose next nibble is
 *            channel l + 16: two lookups, one after a shift, unpack 32
 *            codes in channel order.
 *
 * Both loops below are the library's at D = 128, one query row: the key
 * logits (16 lanes per slot, then a transpose-and-add tree over 16 slots)
 * and the weighted values (one fp32 accumulator per 16 channels, a weight
 * per slot and 32-channel group). Every product and every sum is the same
 * in both orders, so the outputs must agree bit for bit; the program checks
 * that before it times anything, and exits 1 if they do not.
 *
 * Usage: probe_code_layout N HEADS REPS (N a multiple of 16). Built and run
 * by probe_code_layout.py (gcc -O3 -march=native).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define D 128         /* channels per row */
#define ROW (D / 2)   /* bytes per row at 4 bits */
#define VGROUP 32     /* value channels per scale */

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint32_t rnd(void)
{
    rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 32);
}

/* (code - 7.5) for code 0..15, exact in fp32: the centred codes of 4 bits */
static __m512 centred_table(void)
{
    return _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)),
                         _mm512_set1_ps(7.5f));
}

/* Lane j of the result: the sum of a[j]'s 16 lanes. */
static __m512 lanes_sum16(const __m512 *a)
{
    __m512 b[8], c[4], d[2];
    for (int i = 0; i < 8; i++)
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xee));
    for (int i = 0; i < 2; i++)
        d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xee));
    return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88), _mm512_shuffle_f32x4(d[0], d[1], 0xdd));
}

/* Channels 16c .. 16c + 15 of a current-order row, centred. */
static inline __m512 unpack16_current(const uint8_t *row, int c, __m512 table)
{
    const __m512i shift = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
    const __m512i pick = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    uint64_t w;
    memcpy(&w, row + 8 * c, 8);
    const __m512i words = _mm512_permutexvar_epi32(pick, _mm512_set1_epi64((long long)w));
    return _mm512_permutexvar_ps(_mm512_srlv_epi32(words, shift), table);
}

/* Channels 32c .. 32c + 15 (lo) and 32c + 16 .. 32c + 31 (hi) of a row,
 * centred, in either byte order: the one thing the two orders do
 * differently. blocked is a constant wherever this is inlined. */
static inline __attribute__((always_inline)) void unpack32(const uint8_t *row, int c, __m512 table, int blocked,
                                                           __m512 *lo, __m512 *hi)
{
    if (blocked) {
        const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + 16 * c)));
        *lo = _mm512_permutexvar_ps(x, table);
        *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(x, 4), table);
    } else {
        *lo = unpack16_current(row, 2 * c, table);
        *hi = unpack16_current(row, 2 * c + 1, table);
    }
}

/* Key logits of n slots against one query row qs (already times the key
 * scales): out[j] = sum over d of qs[d] * (code - 7.5), the products added
 * in channel order in either byte order. */
static inline __attribute__((always_inline)) void keys(const float *qs, const uint8_t *codes, int64_t n, float *out,
                                                       int blocked)
{
    const __m512 table = centred_table();
    __m512 q[D / 16];
    for (int c = 0; c < D / 16; c++) q[c] = _mm512_loadu_ps(qs + 16 * c);
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
        __m512 slot[16];
        for (int j = 0; j < 16; j++) {
            const uint8_t *row = codes + (j0 + j) * ROW;
            __m512 a = _mm512_setzero_ps();
            for (int c = 0; c < D / 32; c++) {
                __m512 lo, hi;
                unpack32(row, c, table, blocked, &lo, &hi);
                a = _mm512_fmadd_ps(q[2 * c], lo, a);
                a = _mm512_fmadd_ps(q[2 * c + 1], hi, a);
            }
            slot[j] = a;
        }
        _mm512_storeu_ps(out + j0, lanes_sum16(slot));
    }
}

/* Weighted values of n slots: o[d] = sum over j of w[j][d / 32] * (code - 7.5),
 * w the softmax weight times the slot's value scale per channel group. */
static inline __attribute__((always_inline)) void values(const float *w, const uint8_t *codes, int64_t n, float *o,
                                                         int blocked)
{
    const __m512 table = centred_table();
    __m512 acc[D / 16];
    for (int c = 0; c < D / 16; c++) acc[c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        const uint8_t *row = codes + j * ROW;
        for (int c = 0; c < D / 32; c++) {
            __m512 lo, hi;
            unpack32(row, c, table, blocked, &lo, &hi);
            const __m512 wc = _mm512_set1_ps(w[j * (D / VGROUP) + c]);
            acc[2 * c] = _mm512_fmadd_ps(wc, lo, acc[2 * c]);
            acc[2 * c + 1] = _mm512_fmadd_ps(wc, hi, acc[2 * c + 1]);
        }
    }
    for (int c = 0; c < D / 16; c++) _mm512_storeu_ps(o + 16 * c, acc[c]);
}

/* the timed entry points, one per byte order (not inlined into the timing loop) */
__attribute__((noinline)) static void keys_current(const float *qs, const uint8_t *codes, int64_t n, float *out)
{
    keys(qs, codes, n, out, 0);
}
__attribute__((noinline)) static void keys_blocked(const float *qs, const uint8_t *codes, int64_t n, float *out)
{
    keys(qs, codes, n, out, 1);
}
__attribute__((noinline)) static void values_current(const float *w, const uint8_t *codes, int64_t n, float *o)
{
    values(w, codes, n, o, 0);
}
__attribute__((noinline)) static void values_blocked(const float *w, const uint8_t *codes, int64_t n, float *o)
{
    values(w, codes, n, o, 1);
}

int main(int argc, char **argv)
{
    const int64_t n = argc > 1 ? atoll(argv[1]) : 16384;
    const int heads = argc > 2 ? atoi(argv[2]) : 1;
    const int reps = argc > 3 ? atoi(argv[3]) : 20;
    if (n <= 0 || n % 16 || heads <= 0 || reps <= 0) {
        fprintf(stderr, "usage: probe_code_layout N HEADS REPS (N a positive multiple of 16)\n");
        return 2;
    }
    const size_t rows = (size_t)heads * (size_t)n;
    uint8_t *code = malloc(rows * D), *cur = malloc(rows * ROW), *blk = malloc(rows * ROW);
    float *qs = malloc(sizeof(float) * heads * D), *w = malloc(sizeof(float) * n * (D / VGROUP));
    float *k1 = malloc(sizeof(float) * n), *k2 = malloc(sizeof(float) * n), v1[D], v2[D];
    if (!code || !cur || !blk || !qs || !w || !k1 || !k2) {
        fprintf(stderr, "out of memory\n");
        return 2;
    }
    /* the same codes in both byte orders */
    for (size_t i = 0; i < rows * D; i++) code[i] = (uint8_t)(rnd() & 15);
    for (size_t r = 0; r < rows; r++) {
        const uint8_t *c = code + r * D;
        for (int b = 0; b < ROW; b++) cur[r * ROW + b] = (uint8_t)(c[2 * b] | c[2 * b + 1] << 4);
        for (int blk0 = 0; blk0 < D; blk0 += 32)
            for (int b = 0; b < 16; b++) blk[r * ROW + blk0 / 2 + b] = (uint8_t)(c[blk0 + b] | c[blk0 + b + 16] << 4);
    }
    for (int i = 0; i < heads * D; i++) qs[i] = (float)((int)(rnd() % 2001) - 1000) / 997.0f;
    for (int64_t i = 0; i < n * (D / VGROUP); i++) w[i] = (float)(rnd() % 1000) / 7919.0f;
    /* the two orders give the same bits */
    keys_current(qs, cur, n, k1);
    keys_blocked(qs, blk, n, k2);
    values_current(w, cur, n, v1);
    values_blocked(w, blk, n, v2);
    if (memcmp(k1, k2, sizeof(float) * n) || memcmp(v1, v2, sizeof v1)) {
        fprintf(stderr, "the two byte orders gave different results\n");
        return 1;
    }
    double t[4] = {1e30, 1e30, 1e30, 1e30};
    for (int r = 0; r < reps; r++) {
        double s[5];
        s[0] = now();
        for (int h = 0; h < heads; h++) keys_current(qs + h * D, cur + (size_t)h * n * ROW, n, k1);
        s[1] = now();
        for (int h = 0; h < heads; h++) keys_blocked(qs + h * D, blk + (size_t)h * n * ROW, n, k2);
        s[2] = now();
        for (int h = 0; h < heads; h++) values_current(w, cur + (size_t)h * n * ROW, n, v1);
        s[3] = now();
        for (int h = 0; h < heads; h++) values_blocked(w, blk + (size_t)h * n * ROW, n, v2);
        s[4] = now();
        for (int i = 0; i < 4; i++)
            if (s[i + 1] - s[i] < t[i]) t[i] = s[i + 1] - s[i];
    }
    printf("n=%lld heads=%d  keys: current %.1f us, blocked %.1f us, x%.2f  |  values: current %.1f us, "
           "blocked %.1f us, x%.2f  (same bits: yes)\n", (long long)n, heads, 1e6 * t[0], 1e6 * t[1], t[0] / t[1],
           1e6 * t[2], 1e6 * t[3], t[2] / t[3]);
    free(code), free(cur), free(blk), free(qs), free(w), free(k1), free(k2);
    return 0;
}
