/*
 * keep_rows.c - keep_rows_plan (CPU, one thread): the layout of a round that
 * keeps a packed layer's unchanged key groups (keep_rows.h). A round holds a
 * few hundred rows per layer, so the work is bookkeeping: the Python
 * function it replaces spent ~2 ms a round in about a hundred small tensor
 * operations; this is one call.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "keep_rows.h"
#include "kvc_math.h"

#define KR_TINY 1e-37f /* a placeholder's merge count (keep_rows.TINY): never 1 */

struct kr_orow { /* an old packed row that is a slot of its own */
    int64_t head, pos, row;
};

struct kr_member { /* a kept slot that stays in its old key group */
    int64_t orow, idx;
};

struct kr_item { /* one row of the new layout, sorted by (head, section, sub) */
    int64_t head, section, sub, idx;
};

enum { KR_MATCHED = 1, KR_SAME = 2, KR_MEMBER = 4, KR_LEAD = 8 };

static int kr_cmp_orow(const void *a, const void *b)
{
    const struct kr_orow *x = (const struct kr_orow *)a, *y = (const struct kr_orow *)b;
    if (x->head != y->head) return x->head < y->head ? -1 : 1;
    if (x->pos != y->pos) return x->pos < y->pos ? -1 : 1;
    return (x->row > y->row) - (x->row < y->row);
}

static int kr_cmp_member(const void *a, const void *b)
{
    const struct kr_member *x = (const struct kr_member *)a, *y = (const struct kr_member *)b;
    if (x->orow != y->orow) return x->orow < y->orow ? -1 : 1;
    return (x->idx > y->idx) - (x->idx < y->idx);
}

static int kr_cmp_item(const void *a, const void *b)
{
    const struct kr_item *x = (const struct kr_item *)a, *y = (const struct kr_item *)b;
    if (x->head != y->head) return x->head < y->head ? -1 : 1;
    if (x->section != y->section) return x->section < y->section ? -1 : 1;
    if (x->sub != y->sub) return x->sub < y->sub ? -1 : 1;
    return (x->idx > y->idx) - (x->idx < y->idx);
}

static inline int64_t kr_i64(const struct kvc_view *v, int64_t i)
{
    return ((const int64_t *)v->data)[i * v->strides[0]];
}

static inline int64_t kr_i32(const struct kvc_view *v, int64_t i)
{
    return ((const int32_t *)v->data)[i * v->strides[0]];
}

static inline float kr_f32(const struct kvc_view *v, int64_t i)
{
    return ((const float *)v->data)[i * v->strides[0]];
}

static inline float kr_f32_2(const struct kvc_view *v, int64_t i, int64_t c)
{
    return ((const float *)v->data)[i * v->strides[0] + c * v->strides[1]];
}

static inline void kr_set_i64(const struct kvc_view *v, int64_t i, int64_t x)
{
    ((int64_t *)v->data)[i * v->strides[0]] = x;
}

/* Row i of a and row j of b, bit for bit (keys and values share a dtype). */
static int kr_rows_equal(const struct kvc_view *a, int64_t i, const struct kvc_view *b, int64_t j, int64_t D)
{
    const size_t es = kvc_dtype_size((enum kvc_dtype)a->dtype);
    const char *pa = (const char *)a->data, *pb = (const char *)b->data;
    int64_t c;
    if (a->strides[1] == 1 && b->strides[1] == 1)
        return memcmp(pa + (size_t)(i * a->strides[0]) * es, pb + (size_t)(j * b->strides[0]) * es,
                      (size_t)D * es) == 0;
    for (c = 0; c < D; c++)
        if (memcmp(pa + (size_t)(i * a->strides[0] + c * a->strides[1]) * es,
                   pb + (size_t)(j * b->strides[0] + c * b->strides[1]) * es, es) != 0)
            return 0;
    return 1;
}

/* A key group's top, min + (2^bits - 1) x step, as float32 arithmetic gives
 * it: each operation rounded once (double holds a float product or sum
 * exactly enough that rounding it to float is the float result, and the
 * conversions keep the compiler from fusing the two into one FMA). */
static inline float kr_top(float lo, float step, float top)
{
    const float t = (float)((double)top * (double)step);
    return (float)((double)lo + (double)t);
}

/* Whether x lies within a quarter step of the end e (torch's clamp_min keeps
 * a NaN step NaN, as the comparison here does). */
static inline int kr_near(float x, float e, float step)
{
    const float near = 0.25f * (step < 1e-30f ? 1e-30f : step);
    return fabsf(x - e) <= near;
}

struct kr_buf {
    struct kr_orow *orows;     /* [Ro] */
    struct kr_member *members; /* [Rn] */
    struct kr_item *items;     /* [Rn + Ro] */
    int64_t *kh, *kt, *krow, *korow, *mslot; /* [Rn] per kept slot */
    int64_t *live, *grank, *gfirst, *glast;  /* [Ng] */
    int64_t *first_pos, *lead_n, *rest_n;    /* [N] */
    uint8_t *flags;                          /* [Rn] */
    uint8_t *keepg, *reach;                  /* [Ng], [2 Ng D] */
};

static size_t kr_carve(struct kr_buf *w, char *base, int64_t N, int64_t Ro, int64_t Rn, int64_t Ng, int64_t D)
{
    size_t at = 0;
#define KR_TAKE(field, type, n)                                                                                   \
    do {                                                                                                          \
        if (base) w->field = (type *)(void *)(base + at);                                                        \
        at += kvc_align_up((size_t)(n) * sizeof(type));                                                           \
    } while (0)
    KR_TAKE(orows, struct kr_orow, Ro);
    KR_TAKE(members, struct kr_member, Rn);
    KR_TAKE(items, struct kr_item, Rn + Ro);
    KR_TAKE(kh, int64_t, Rn);
    KR_TAKE(kt, int64_t, Rn);
    KR_TAKE(krow, int64_t, Rn);
    KR_TAKE(korow, int64_t, Rn);
    KR_TAKE(mslot, int64_t, Rn);
    KR_TAKE(live, int64_t, Ng);
    KR_TAKE(grank, int64_t, Ng);
    KR_TAKE(gfirst, int64_t, Ng);
    KR_TAKE(glast, int64_t, Ng);
    KR_TAKE(first_pos, int64_t, N);
    KR_TAKE(lead_n, int64_t, N);
    KR_TAKE(rest_n, int64_t, N);
    KR_TAKE(flags, uint8_t, Rn);
    KR_TAKE(keepg, uint8_t, Ng);
    KR_TAKE(reach, uint8_t, 2 * Ng * D);
#undef KR_TAKE
    return at;
}

size_t kvc_keep_rows_plan_scratch_bytes(const struct kvc_keep_rows_params *p)
{
    struct kr_buf w;
    return KVC_ALIGN + kr_carve(&w, NULL, p->o_offsets.shape[0], p->o_pos.shape[0], p->n_pos.shape[0],
                                p->o_min.shape[0], p->o_keys.shape[1]);
}

/* Segments [offsets[h], offsets[h] + lengths[h]) inside [0, R), their sum at
 * most R (what the scratch and the outputs are sized for). */
static int kr_segments_ok(const struct kvc_view *off, const struct kvc_view *len, int64_t R)
{
    const int64_t N = off->shape[0];
    int64_t h, sum = 0;
    for (h = 0; h < N; h++) {
        const int64_t o = kr_i64(off, h), l = kr_i64(len, h);
        if (o < 0 || l < 0 || o > R || l > R - o) return 0;
        sum += l;
        if (sum > R) return 0;
    }
    return 1;
}

static void kr_info(const struct kvc_keep_rows_params *p, int64_t items, int64_t holes, int64_t ok)
{
    kr_set_i64(&p->info, 0, items);
    kr_set_i64(&p->info, 1, holes);
    kr_set_i64(&p->info, 2, ok);
}

/* The old first rows matching kept slot (h, pos): a row index, or -1. */
static int64_t kr_match(const struct kr_orow *o, int64_t n, int64_t h, int64_t pos)
{
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (o[mid].head < h || (o[mid].head == h && o[mid].pos < pos))
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && o[lo].head == h && o[lo].pos == pos ? o[lo].row : -1;
}

enum kvc_status kvc_keep_rows_plan(const struct kvc_keep_rows_params *p)
{
    const int64_t N = p->o_offsets.shape[0], Ro = p->o_pos.shape[0], Rn = p->n_pos.shape[0];
    const int64_t D = p->o_keys.shape[1], G = p->group, Ng = p->o_min.shape[0];
    const float top = (float)((1 << p->bits) - 1);
    struct kr_buf w;
    int64_t No = 0, Nk = 0, Nm = 0, Nph = 0, M, i, h, g, c, k;
    if (G <= 0 || Ro != Ng * G || p->bits < 1 || p->bits > 8) return KVC_ERR_INVALID;
    if (!kr_segments_ok(&p->o_offsets, &p->o_lengths, Ro) || !kr_segments_ok(&p->n_offsets, &p->n_lengths, Rn))
        return KVC_ERR_INVALID;
    if (p->scratch == NULL || p->scratch_bytes < kvc_keep_rows_plan_scratch_bytes(p)) return KVC_ERR_NOMEM;
    memset(&w, 0, sizeof w);
    (void)kr_carve(&w, (char *)(((uintptr_t)p->scratch + (KVC_ALIGN - 1)) & ~(uintptr_t)(KVC_ALIGN - 1)), N, Ro, Rn,
                   Ng, D);

    /* the old rows that are slots of their own, sorted by (head, position);
     * the first of a head is its oldest */
    No = 0;
    for (h = 0; h < N; h++) {
        const int64_t o = kr_i64(&p->o_offsets, h), l = kr_i64(&p->o_lengths, h);
        w.first_pos[h] = -1;
        w.lead_n[h] = w.rest_n[h] = 0;
        for (k = 0; k < l; k++) {
            const int64_t pos = kr_i32(&p->o_pos, o + k);
            if (k == 0 || pos != kr_i32(&p->o_pos, o + k - 1)) {
                w.orows[No].head = h;
                w.orows[No].pos = pos;
                w.orows[No].row = o + k;
                No++;
            }
        }
    }
    qsort(w.orows, (size_t)No, sizeof *w.orows, kr_cmp_orow);
    for (i = No - 1; i >= 0; i--) w.first_pos[w.orows[i].head] = w.orows[i].pos;

    /* each kept slot matched to its old row; the unchanged ones counted per group */
    memset(w.live, 0, (size_t)Ng * sizeof(int64_t));
    Nk = 0;
    for (h = 0; h < N; h++) {
        const int64_t o = kr_i64(&p->n_offsets, h), l = kr_i64(&p->n_lengths, h);
        for (k = 0; k < l; k++, Nk++) {
            const int64_t row = o + k, orow = kr_match(w.orows, No, h, kr_i32(&p->n_pos, row));
            uint8_t f = 0;
            w.kh[Nk] = h;
            w.kt[Nk] = k;
            w.krow[Nk] = row;
            w.korow[Nk] = orow;
            if (orow >= 0) {
                const float was = kr_f32(&p->o_cbias, orow) / kr_f32(&p->o_cplain, orow);
                f |= KR_MATCHED;
                if (kr_f32(&p->n_counts, row) == was && kr_rows_equal(&p->n_keys, row, &p->o_keys, orow, D) &&
                    kr_rows_equal(&p->n_values, row, &p->o_values, orow, D)) {
                    f |= KR_SAME;
                    w.live[orow / G]++;
                }
            }
            w.flags[Nk] = f;
        }
    }

    /* groups with enough unchanged members; which channel ends they reach */
    for (g = 0; g < Ng; g++) w.keepg[g] = w.live[g] >= (p->min_live > 1 ? p->min_live : 1);
    memset(w.reach, 0, (size_t)(2 * Ng * D));
    for (i = 0; i < Nk; i++) {
        if (!(w.flags[i] & KR_SAME) || !w.keepg[g = w.korow[i] / G]) continue;
        for (c = 0; c < D; c++) {
            const float x = kr_f32_2(&p->n_grid, w.krow[i], c);
            const float lo = kr_f32_2(&p->o_min, g, c), st = kr_f32_2(&p->o_step, g, c);
            w.reach[g * D + c] |= (uint8_t)kr_near(x, lo, st);
            w.reach[(Ng + g) * D + c] |= (uint8_t)kr_near(x, kr_top(lo, st, top), st);
        }
    }
    for (g = 0; g < Ng; g++) {
        if (!w.keepg[g] || G - w.live[g] != 1) continue;
        /* one hole cannot hold a channel's minimum and its maximum both */
        for (c = 0; c < D; c++)
            if (!w.reach[g * D + c] && !w.reach[(Ng + g) * D + c]) {
                w.keepg[g] = 0;
                break;
            }
    }
    for (i = 0; i < Nk; i++)
        if ((w.flags[i] & KR_SAME) && w.keepg[w.korow[i] / G]) {
            w.flags[i] |= KR_MEMBER;
            w.members[Nm].orow = w.korow[i];
            w.members[Nm].idx = i;
            Nm++;
        }
    if (Nm == 0) {
        kr_info(p, 0, 0, 0);
        return KVC_OK;
    }

    /* the sink block: slots older than every old packed row of their head,
     * not packed before; it must be the old block's size in every head */
    for (i = 0; i < Nk; i++) {
        const uint8_t f = w.flags[i];
        if (!(f & (KR_MEMBER | KR_MATCHED)) && kr_i32(&p->n_pos, w.krow[i]) < w.first_pos[w.kh[i]]) {
            w.flags[i] |= KR_LEAD;
            w.lead_n[w.kh[i]]++;
        } else if (!(f & KR_MEMBER)) {
            w.rest_n[w.kh[i]]++;
        }
    }
    for (h = 0; h < N; h++)
        if (w.lead_n[h] != p->sinks) {
            kr_info(p, 0, 0, 0);
            return KVC_OK;
        }

    /* members by old row: each kept group's run gives their slots, its
     * first member (whose value and grid key the holes repeat) and its last
     * (whose position they take) */
    qsort(w.members, (size_t)Nm, sizeof *w.members, kr_cmp_member);
    k = 0;
    for (g = 0; g < Ng; g++) {
        w.grank[g] = w.keepg[g] ? k++ : -1;
        w.gfirst[g] = w.glast[g] = -1;
    }
    for (i = 0; i < Nm; i++) {
        const int64_t gg = w.members[i].orow / G, idx = w.members[i].idx;
        if (w.gfirst[gg] < 0) w.gfirst[gg] = i;
        w.glast[gg] = i;
        w.mslot[idx] = i - w.gfirst[gg];
    }

    /* the items: kept slots, then the holes of each kept group */
    for (i = 0; i < Nk; i++) {
        const uint8_t f = w.flags[i];
        struct kr_item *it = &w.items[i];
        kr_set_i64(&p->take, i, w.krow[i]);
        it->head = w.kh[i];
        it->idx = i;
        if (f & KR_LEAD) {
            it->section = 0;
            it->sub = w.kt[i];
        } else if (f & KR_MEMBER) {
            it->section = 1;
            it->sub = w.grank[w.korow[i] / G] * G + w.mslot[i];
        } else {
            it->section = 2;
            it->sub = kr_i32(&p->n_pos, w.krow[i]);
        }
    }
    for (g = 0; g < Ng; g++) {
        int64_t holes, base, last, j;
        if (!w.keepg[g]) continue;
        holes = G - w.live[g];
        if (holes < 0) { /* more members than rows: slots that share a position */
            kr_info(p, 0, 0, 0);
            return KVC_OK;
        }
        base = w.members[w.gfirst[g]].idx;
        last = w.members[w.glast[g]].idx;
        for (j = 0; j < holes; j++, Nph++) {
            struct kr_item *it = &w.items[Nk + Nph];
            it->head = w.kh[base];
            it->section = 1;
            it->sub = w.grank[g] * G + w.live[g] + j;
            it->idx = Nk + Nph;
            kr_set_i64(&p->ph_base, Nph, w.krow[base]);
            kr_set_i64(&p->ph_last, Nph, w.krow[last]);
            for (c = 0; c < D; c++) {
                const float lo = kr_f32_2(&p->o_min, g, c), st = kr_f32_2(&p->o_step, g, c);
                const float b = kr_f32_2(&p->n_grid, w.krow[base], c);
                const int nl = !w.reach[g * D + c], nh = !w.reach[(Ng + g) * D + c];
                float x = b;
                if (j == 0)
                    x = nl ? lo : (holes == 1 && nh ? kr_top(lo, st, top) : b);
                else if (j == 1 && nh)
                    x = kr_top(lo, st, top);
                ((float *)p->ph_keys.data)[Nph * p->ph_keys.strides[0] + c * p->ph_keys.strides[1]] = x;
            }
        }
    }
    M = Nk + Nph;
    qsort(w.items, (size_t)M, sizeof *w.items, kr_cmp_item);
    for (h = 0; h < N; h++) kr_set_i64(&p->lengths, h, 0);
    for (i = 0; i < M; i++) {
        const struct kr_item *it = &w.items[i];
        kr_set_i64(&p->dst, it->idx, i + p->slack * it->head);
        kr_set_i64(&p->lengths, it->head, kr_i64(&p->lengths, it->head) + 1);
    }

    /* the residual from_ragged would take (each head's newest slots of count
     * 1, as many as every head has, at most `residual`) must leave the sink
     * block as it was and come from the slots packed afresh */
    {
        int64_t n_min = INT64_MAX, r, s, start = 0;
        for (h = 0; h < N; h++)
            if (kr_i64(&p->lengths, h) < n_min) n_min = kr_i64(&p->lengths, h);
        if (N == 0) n_min = 0;
        r = p->residual < n_min ? p->residual : n_min;
        for (h = 0; h < N && r > 0; h++) {
            const int64_t len = kr_i64(&p->lengths, h);
            int64_t trail = 0;
            while (trail < r) {
                const struct kr_item *it = &w.items[start + len - 1 - trail];
                const float cnt = it->idx < Nk ? kr_f32(&p->n_counts, w.krow[it->idx]) : KR_TINY;
                if (cnt != 1.0f) break;
                trail++;
            }
            if (trail < r) r = trail;
            start += len;
        }
        s = p->sinks_asked < n_min - r ? p->sinks_asked : n_min - r;
        if (s < 0) s = 0;
        if (s != p->sinks) {
            kr_info(p, M, Nph, 0);
            return KVC_OK;
        }
        for (h = 0; h < N; h++)
            if (w.rest_n[h] < r) {
                kr_info(p, M, Nph, 0);
                return KVC_OK;
            }
    }
    kr_info(p, M, Nph, 1);
    return KVC_OK;
}
