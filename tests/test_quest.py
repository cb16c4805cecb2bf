"""Quest: page bounds, page scores, page selection and attention over the
selected pages against float64 references, the paged store under appends
and evictions, and generate()."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import kvcompress as kvc
from kvcompress import KVCompressValueError, ops
from kvcompress.compat import cache_kwargs
from kvcompress.methods import Quest, method_from_spec
from kvcompress.stores import AttentionSpec, PagedStore
from test_attention import attention_ref, ragged_layout, randn
from test_ops import DTYPE_IDS, DTYPES, assert_within_bound

# ------------------------------------------------------------------ references


def bounds_ref(keys, P):
    """float64 per-page min and max, [B, H, pages, D] each."""
    k = keys.double()
    n = k.shape[2]
    pages = [k[:, :, p:p + P] for p in range(0, n, P)]
    return torch.stack([s.amin(2) for s in pages], 2), torch.stack([s.amax(2) for s in pages], 2)


def scores_ref(q, kmin, kmax, P, gqa="max", kv_start=None):
    """float64 Quest bound per (b, kv head, page); padding-only pages -inf."""
    B, Hq, D = q.shape
    H = kmin.shape[1]
    g = Hq // H
    qd = q.double().reshape(B, H, g, 1, D)
    u = torch.maximum(qd * kmax.double()[:, :, None], qd * kmin.double()[:, :, None]).sum(-1)  # [B, H, g, pages]
    s = u.amax(2) if gqa == "max" else u.mean(2)
    if kv_start is not None:
        for b in range(B):
            s[b, :, : int(kv_start[b]) // P] = -math.inf
    return s


def topk_ref(scores, k, first):
    """Pages per (b, h): the first real page and the newest always, then the
    highest scores, ties to the lower page; ascending."""
    B, H, n = scores.shape
    out = torch.empty(B, H, k, dtype=torch.int64)
    for b in range(B):
        for h in range(H):
            forced = {int(first[b]), n - 1}
            rest = sorted((p for p in range(int(first[b]), n) if p not in forced),
                          key=lambda p: (-float(scores[b, h, p]), p))
            out[b, h] = torch.tensor(sorted(forced | set(rest[: k - len(forced)])))
    return out


def paged_attention_ref(q, k, v, pages, P, kv_start=None, counts=None, dtype=torch.float64):
    """The selected pages' real slots gathered into a ragged layout, then the
    plain attention reference."""
    B, H, n, D = k.shape
    rows_k, rows_v, rows_c, offsets, lengths = [], [], [], [], []
    off = 0
    for b in range(B):
        s0 = 0 if kv_start is None else int(kv_start[b])
        for h in range(H):
            slots = [j for p in pages[b, h].tolist() for j in range(p * P, min((p + 1) * P, n)) if j >= s0]
            rows_k.append(k[b, h, slots])
            rows_v.append(v[b, h, slots])
            if counts is not None:
                rows_c.append(counts[b, h, slots])
            offsets.append(off)
            lengths.append(len(slots))
            off += len(slots)
    flat_c = torch.cat(rows_c) if counts is not None else None
    return attention_ref(q, torch.cat(rows_k), torch.cat(rows_v), offsets=torch.tensor(offsets),
                         lengths=torch.tensor(lengths), counts=flat_c, dtype=dtype)


# ------------------------------------------------------------------------- ops


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,P", [(1, 16), (37, 8), (64, 16), (100, 7)])
def test_page_bounds_equal_float64_min_max(dtype, n, P):
    keys = randn((2, 3, n, 24), dtype, seed=n).transpose(2, 3).contiguous().transpose(2, 3)  # strided rows
    pages = -(-n // P)
    kmin = torch.full((2, 3, pages + 2, 24), 7.0)
    kmax = torch.full_like(kmin, 7.0)
    ops.page_bounds(keys, kmin, kmax, P, 0, pages)
    lo, hi = bounds_ref(keys, P)
    assert torch.equal(kmin[:, :, :pages].double(), lo) and torch.equal(kmax[:, :, :pages].double(), hi)
    assert (kmin[:, :, pages:] == 7).all()  # rows past `last` untouched


def test_page_bounds_nan_key_poisons_the_page_and_selection_refuses_it():
    keys = randn((1, 1, 32, 8))
    keys[0, 0, 20, 3] = float("nan")
    kmin, kmax = torch.zeros(1, 1, 2, 8), torch.zeros(1, 1, 2, 8)
    ops.page_bounds(keys, kmin, kmax, 16, 0, 2)
    assert kmin[0, 0, 1, 3].isnan() and kmax[0, 0, 1, 3].isnan() and torch.isfinite(kmin[0, 0, 0]).all()
    s = ops.page_scores(randn((1, 2, 8)), kmin, kmax, 2, 16)
    assert s[0, 0, 1].isnan()
    with pytest.raises(KVCompressValueError, match="NaN"):
        ops.select_topk(torch.cat([s, s], -1), 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("gqa", ["max", "mean"])
def test_page_scores_match_float64(dtype, gqa):
    P, n = 8, 61
    keys = randn((2, 2, n, 32), torch.float32, seed=3)
    q = randn((2, 6, 32), dtype, seed=4)
    pages = -(-n // P)
    kmin, kmax = torch.empty(2, 2, pages, 32), torch.empty(2, 2, pages, 32)
    ops.page_bounds(keys, kmin, kmax, P, 0, pages)
    kv_start = torch.tensor([0, 19])
    got = ops.page_scores(q, kmin, kmax, pages, P, gqa=gqa, kv_start=kv_start)
    ref = scores_ref(q, kmin, kmax, P, gqa, kv_start)
    assert torch.equal(torch.isinf(got), torch.isinf(ref)) and (got[1, :, :2] == -math.inf).all()
    fin = torch.isfinite(ref)
    # fp32 sums of D terms: relative to the sum of magnitudes
    mag = (q.double().abs().reshape(2, 2, 3, 1, 32) * torch.maximum(kmin.abs(), kmax.abs()).double()[:, :, None])
    tol = 32 * 2**-24 * mag.sum(-1).amax(2)
    assert ((got.double() - ref).abs()[fin] <= tol[fin] + 1e-12).all()


ATTN_CASES = [  # B, Hq, Hkv, n, D, P, k
    (1, 1, 1, 17, 8, 4, 2),
    (2, 4, 2, 100, 16, 16, 3),
    (2, 9, 3, 301, 64, 16, 8),
    (3, 4, 1, 250, 40, 7, 5),
]


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "B{}Hq{}Hkv{}n{}D{}P{}k{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_attention_over_pages_matches_float64(case, dtype):
    B, Hq, Hkv, n, D, P, k = case
    g = torch.Generator().manual_seed(n)
    q = randn((B, Hq, 1, D), dtype, 1)
    keys = randn((B, Hkv, n, D), dtype, 2)
    vals = randn((B, Hkv, n, D), dtype, 3)
    total = -(-n // P)
    pages = torch.stack([torch.stack([
        torch.cat([torch.randperm(total - 1, generator=g)[: k - 1].sort().values, torch.tensor([total - 1])])
        for _ in range(Hkv)]) for _ in range(B)])
    kv_start = torch.tensor([min(b * 11, n - 1) for b in range(B)])
    counts = torch.randint(1, 4, (B, Hkv, n), generator=g).float()
    for ks, c in ((None, None), (kv_start, None), (kv_start, counts)):
        got = ops.attention_pages(q, keys, vals, pages, P, kv_start=ks, counts=c)
        ref = paged_attention_ref(q, keys, vals, pages, P, ks, c)
        same = paged_attention_ref(q, keys, vals, pages, P, ks, c, dtype=dtype)
        assert_within_bound(got, ref, same, what=f"kv_start={ks is not None} counts={c is not None}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_every_page_listed_is_the_dense_kernel_bit_for_bit(dtype):
    q, keys, vals = randn((2, 4, 1, 32), dtype, 1), randn((2, 2, 77, 32), dtype, 2), randn((2, 2, 77, 32), dtype, 3)
    everything = torch.arange(5).expand(2, 2, 5).contiguous()
    kv_start = torch.tensor([3, 40])
    assert torch.equal(ops.attention_pages(q, keys, vals, everything, 16, kv_start=kv_start),
                       ops.attention(q, keys, vals, kv_start=kv_start))


def test_attention_pages_refuses_bad_page_lists():
    q, keys = randn((1, 2, 1, 8)), randn((1, 1, 40, 8))
    cases = [
        (torch.tensor([[[0, 1]]]), "does not read the newest page"),
        (torch.tensor([[[2, 0]]]), "does not read the newest page|not strictly ascending"),
        (torch.tensor([[[1, 1, 2]]]), "not strictly ascending"),
        (torch.tensor([[[0, 3]]]), "outside the layer's 3 pages"),
        (torch.tensor([[[-1, 2]]]), "outside"),
        (torch.tensor([[[0, 2], [1, 2]]])[:, :1], None),  # fine: a view that is contiguous
    ]
    for pages, msg in cases:
        if msg is None:
            ops.attention_pages(q, keys, keys, pages, 16)
            continue
        with pytest.raises(KVCompressValueError, match=msg):
            ops.attention_pages(q, keys, keys, pages, 16)
    with pytest.raises(KVCompressValueError, match="one query per row"):
        ops.attention_pages(randn((1, 2, 2, 8)), keys, keys, torch.tensor([[[0, 2]]]), 16)
    with pytest.raises(KVCompressValueError, match="contiguous"):
        ops.attention_pages(q, keys, keys, torch.tensor([[[0, 9, 1, 9, 2]]])[..., ::2], 16)


# ---------------------------------------------------------------- ragged ops
# A ragged layer (AdaKV, EMS): head i = b * H + h owns rows offsets[i] ..
# offsets[i] + lengths[i] - 1 of one [R, D] buffer (ragged_layout: shuffled
# segments, NaN rows between them that no op may read), its page p's bounds
# row page_offsets[i] + p of an [Rp, D] buffer.

RAGGED_LENGTHS = [0, 1, 37, 64, 100, 16]  # B = 2, H = 3: an empty head, a one-slot head, short last pages


def bound_rows(lengths, P, gap=2, seed=0):
    """page_offsets [N] for heads of `lengths`: each head's ceil(n / P) rows,
    shuffled, `gap` rows apart; and Rp."""
    pages = [-(-n // P) for n in lengths]
    order = np.random.default_rng(seed + 9).permutation(len(lengths))
    offs = np.zeros(len(lengths), dtype=np.int64)
    pos = gap
    for i in order:
        offs[i] = pos
        pos += pages[i] + gap
    return torch.from_numpy(offs), pos


def ragged_bounds_ref(keys, offsets, lengths, P):
    """float64 per-page min and max of each head: a list of ([np_i, D], [np_i, D])."""
    out = []
    for o, n in zip(offsets.tolist(), lengths.tolist()):
        k = keys[o:o + n].double()
        pages = [k[p:p + P] for p in range(0, n, P)]
        D = keys.shape[1]
        out.append((torch.stack([s.amin(0) for s in pages]) if pages else torch.empty(0, D, dtype=torch.float64),
                    torch.stack([s.amax(0) for s in pages]) if pages else torch.empty(0, D, dtype=torch.float64)))
    return out


def ragged_scores_ref(q, kmin, kmax, lengths, page_offsets, P, num_pages, gqa="max"):
    """float64 Quest bound per (b, head, column), right-aligned, -inf before
    each head's pages."""
    B, Hq, D = q.shape
    H = len(lengths) // B
    g = Hq // H
    s = torch.full((B, H, num_pages), -math.inf, dtype=torch.float64)
    for i, (n, po) in enumerate(zip(lengths.tolist(), page_offsets.tolist())):
        b, h = divmod(i, H)
        np_i = -(-n // P)
        if np_i == 0:
            continue
        qd = q[b, h * g:(h + 1) * g].double()[:, None]  # [g, 1, D]
        lo, hi = kmin[po:po + np_i].double()[None], kmax[po:po + np_i].double()[None]
        u = torch.maximum(qd * hi, qd * lo).sum(-1)  # [g, np_i]
        s[b, h, num_pages - np_i:] = u.amax(0) if gqa == "max" else u.mean(0)
    return s


def ragged_paged_attention_ref(q, k, v, pages, P, offsets, lengths, counts=None, dtype=torch.float64):
    """The listed pages' slots of each ragged head (negative entries skipped)
    gathered into a new ragged layout, then the plain attention reference."""
    rows, offs, lens = [], [], []
    pos = 0
    for i, (o, n) in enumerate(zip(offsets.tolist(), lengths.tolist())):
        b, h = divmod(i, pages.shape[1])
        slots = [o + j for p in pages[b, h].tolist() if p >= 0 for j in range(p * P, min((p + 1) * P, n))]
        rows += slots
        offs.append(pos)
        lens.append(len(slots))
        pos += len(slots)
    idx = torch.tensor(rows, dtype=torch.int64)
    return attention_ref(q, k[idx], v[idx], offsets=torch.tensor(offs), lengths=torch.tensor(lens),
                         counts=None if counts is None else counts[idx], dtype=dtype)


def random_ragged_pages(lengths, Hkv, P, k, seed, pad=(-1,)):
    """[B, Hkv, k] lists: per head min(k, pages) of its pages (the newest
    always) ascending, padded in front with entries drawn from `pad`."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths) // Hkv
    out = torch.empty(B, Hkv, k, dtype=torch.int64)
    for i, n in enumerate(lengths):
        total = -(-n // P)
        m = min(k, total)
        real = torch.randperm(max(total - 1, 0), generator=g)[: max(m - 1, 0)].sort().values
        real = torch.cat([real, torch.tensor([total - 1])]) if m else real
        fill = torch.tensor([pad[j % len(pad)] for j in range(k - m)], dtype=torch.int64)
        out[i // Hkv, i % Hkv] = torch.cat([fill, real])
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("P", [8, 7])
def test_ragged_page_bounds_equal_float64_min_max_after_any_firsts(dtype, P):
    keys, _, offsets, lengths = ragged_layout(RAGGED_LENGTHS, 24, dtype, seed=P)
    keys = keys.t().contiguous().t()  # strided rows: channel stride R
    page_offsets, Rp = bound_rows(RAGGED_LENGTHS, P, seed=P)
    kmin, kmax = torch.full((Rp, 24), 7.0), torch.full((Rp, 24), 7.0)
    ref = ragged_bounds_ref(keys, offsets, lengths, P)
    pages = [-(-n // P) for n in RAGGED_LENGTHS]
    written = list(pages)  # the first page written so far, per head
    g = torch.Generator().manual_seed(P)
    for rnd in range(5):
        first = torch.tensor([int(torch.randint(0, t + 1, (1,), generator=g)) for t in pages])
        ops.page_bounds(keys, kmin, kmax, P, first, offsets=offsets, lengths=lengths, page_offsets=page_offsets)
        written = [min(w, int(f)) for w, f in zip(written, first)]
        touched = torch.zeros(Rp, dtype=torch.bool)
        for i, (po, w, t) in enumerate(zip(page_offsets.tolist(), written, pages)):
            lo, hi = ref[i]
            assert torch.equal(kmin[po + w:po + t].double(), lo[w:]), f"round {rnd} head {i}"
            assert torch.equal(kmax[po + w:po + t].double(), hi[w:]), f"round {rnd} head {i}"
            touched[po + w:po + t] = True
        assert (kmin[~touched] == 7).all() and (kmax[~touched] == 7).all()  # nothing else written
    # a Python int is every head's first page
    kmin2, kmax2 = torch.full((Rp, 24), 7.0), torch.full((Rp, 24), 7.0)
    ops.page_bounds(keys, kmin2, kmax2, P, 0, offsets=offsets, lengths=lengths, page_offsets=page_offsets)
    assert torch.equal(kmin2[touched], kmin[touched]) and torch.equal(kmax2[touched], kmax[touched])


def test_ragged_page_bounds_nan_key_poisons_its_channel_only():
    keys, _, offsets, lengths = ragged_layout([20, 9], 8, torch.float32, seed=2)
    keys[offsets[0] + 17, 3] = float("nan")
    page_offsets = torch.tensor([0, 3])
    kmin, kmax = torch.zeros(5, 8), torch.zeros(5, 8)
    ops.page_bounds(keys, kmin, kmax, 8, 0, offsets=offsets, lengths=lengths, page_offsets=page_offsets)
    assert kmin[2, 3].isnan() and kmax[2, 3].isnan()
    assert torch.isfinite(kmin[[0, 1, 3, 4]]).all() and torch.isfinite(kmin[2, [0, 1, 2, 4, 5, 6, 7]]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("gqa", ["max", "mean"])
def test_ragged_page_scores_match_float64_right_aligned(dtype, gqa):
    P, D = 8, 32
    lengths_l = [0, 13, 61, 40]  # B = 2, H = 2
    keys, _, offsets, lengths = ragged_layout(lengths_l, D, torch.float32, seed=3)
    page_offsets, Rp = bound_rows(lengths_l, P, seed=3)
    kmin, kmax = torch.full((Rp, D), float("nan")), torch.full((Rp, D), float("nan"))  # unused rows: NaN
    ops.page_bounds(keys, kmin, kmax, P, 0, offsets=offsets, lengths=lengths, page_offsets=page_offsets)
    q = randn((2, 6, D), dtype, seed=4)
    num_pages = 10
    got = ops.page_scores(q, kmin, kmax, num_pages, P, gqa=gqa, lengths=lengths, page_offsets=page_offsets)
    ref = ragged_scores_ref(q, kmin, kmax, lengths, page_offsets, P, num_pages, gqa)
    assert got.shape == (2, 2, num_pages) and got.dtype == torch.float32
    assert torch.equal(torch.isinf(got), torch.isinf(ref)) and not got.isnan().any()
    assert (got[0, 0] == -math.inf).all() and (got[1, 0, :2] == -math.inf).all() and torch.isfinite(got[1, 0, 2:]).all()
    fin = torch.isfinite(ref)
    # fp32 sums of D terms: relative to the sum of magnitudes (as the uniform test)
    mag = torch.zeros_like(ref)
    for i, (n, po) in enumerate(zip(lengths.tolist(), page_offsets.tolist())):
        b, h = divmod(i, 2)
        t = -(-n // P)
        if t:
            m = torch.maximum(kmin[po:po + t].abs(), kmax[po:po + t].abs()).double()
            mag[b, h, num_pages - t:] = (q[b, 3 * h:3 * h + 3].double().abs()[:, None] * m[None]).sum(-1).amax(0)
    tol = D * 2**-24 * mag
    assert ((got.double() - ref).abs()[fin] <= tol[fin] + 1e-12).all()


@pytest.mark.parametrize("gqa", ["max", "mean"])
def test_ragged_page_scores_equal_the_uniform_op_on_a_uniform_layer(gqa):
    """Same bounds, same heads: the same floats (same reduction and order)."""
    B, H, n, P, D = 2, 2, 61, 8, 32
    keys = randn((B, H, n, D), torch.bfloat16, seed=5)
    pages = -(-n // P)
    kmin, kmax = torch.empty(B, H, pages, D), torch.empty(B, H, pages, D)
    ops.page_bounds(keys, kmin, kmax, P, 0, pages)
    q = randn((B, 6, D), torch.bfloat16, seed=6)
    uni = ops.page_scores(q, kmin, kmax, pages, P, gqa=gqa)
    lengths = torch.full((B * H,), n)
    rag = ops.page_scores(q, kmin.reshape(-1, D), kmax.reshape(-1, D), pages, P, gqa=gqa, lengths=lengths,
                          page_offsets=torch.arange(B * H) * pages)
    assert torch.equal(uni, rag)


RAGGED_ATTN_CASES = [  # B, Hq, Hkv, lengths, D, P, k
    (1, 2, 1, [17], 8, 4, 6),  # one page of padding, then all five
    (2, 4, 2, [100, 0, 33, 64], 16, 16, 3),
    (2, 9, 3, [301, 5, 0, 120, 77, 16], 64, 16, 8),
    (3, 4, 1, [250, 1, 90], 40, 7, 5),
]


@pytest.mark.parametrize("case", RAGGED_ATTN_CASES, ids=lambda c: "B{}Hq{}Hkv{}-{}D{}P{}k{}".format(
    c[0], c[1], c[2], "_".join(map(str, c[3])), *c[4:]))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ragged_attention_over_pages_matches_float64(case, dtype):
    B, Hq, Hkv, lengths_l, D, P, k = case
    keys, vals, offsets, lengths = ragged_layout(lengths_l, D, dtype, seed=D)
    keys = keys.t().contiguous().t()  # strided rows
    q = randn((B, Hq, 1, D), dtype, 1)
    pages = random_ragged_pages(lengths_l, Hkv, P, k, seed=sum(lengths_l), pad=(-1, -7))
    assert (pages[..., 0] < 0).any()  # some heads padded in front
    g = torch.Generator().manual_seed(1)
    counts = torch.randint(1, 4, (keys.shape[0],), generator=g).float()
    for c in (None, counts, counts.int()):
        got = ops.attention_pages(q, keys, vals, pages, P, counts=c, offsets=offsets, lengths=lengths)
        ref = ragged_paged_attention_ref(q, keys, vals, pages, P, offsets, lengths, c)
        same = ragged_paged_attention_ref(q, keys, vals, pages, P, offsets, lengths, c, dtype=dtype)
        assert_within_bound(got, ref, same, what=f"counts={None if c is None else c.dtype}")
        for i, n in enumerate(lengths_l):
            if n == 0:
                assert (got[i // Hkv, 0, (i % Hkv) * (Hq // Hkv):(i % Hkv + 1) * (Hq // Hkv)] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ragged_every_page_listed_is_the_dense_kernel_bit_for_bit_at_any_thread_count(dtype):
    lengths_l = [700, 0, 33, 1, 258, 64]  # long heads: several split-K blocks
    B, Hkv, Hq, D, P = 2, 3, 6, 32, 16
    keys, vals, offsets, lengths = ragged_layout(lengths_l, D, dtype, seed=11)
    q = randn((B, Hq, 1, D), dtype, 1)
    counts = torch.randint(1, 5, (keys.shape[0],), generator=torch.Generator().manual_seed(2)).float()
    most = max(-(-n // P) for n in lengths_l)
    everything = random_ragged_pages(lengths_l, Hkv, P, most, seed=0, pad=(-1,))  # all of each head's pages
    assert all(int((everything[i // Hkv, i % Hkv] >= 0).sum()) == -(-n // P) for i, n in enumerate(lengths_l))
    threads = ops.get_num_threads()
    try:
        for c in (None, counts):
            dense = ops.attention(q, keys, vals, offsets=offsets, lengths=lengths, counts=c)
            results = []
            for nt in (1, 3, 8):
                ops.set_num_threads(nt)
                results.append(ops.attention_pages(q, keys, vals, everything, P, counts=c, offsets=offsets,
                                                   lengths=lengths))
            for r in results:
                assert torch.equal(r, dense)
        # a real selection is thread-count independent too
        some = random_ragged_pages(lengths_l, Hkv, P, 4, seed=3)
        outs = []
        for nt in (1, 3, 8):
            ops.set_num_threads(nt)
            outs.append(ops.attention_pages(q, keys, vals, some, P, counts=counts, offsets=offsets,
                                            lengths=lengths))
        assert all(torch.equal(o, outs[0]) for o in outs)
    finally:
        ops.set_num_threads(threads)


def test_ragged_attention_pages_refuses_bad_page_lists():
    # heads (0, 0): 40 slots = pages 0..2 at P = 16; (0, 1): empty
    keys, _, offsets, lengths = ragged_layout([40, 0], 8, torch.float32, seed=1)
    q = randn((1, 2, 1, 8))

    def call(pages, **kw):
        return ops.attention_pages(q, keys, keys, torch.tensor([pages]), 16, offsets=offsets, lengths=lengths, **kw)

    call([[-1, 0, 2], [-1, -1, -1]])  # fine
    call([[0, 1, 2], [-3, -1, -2]])  # fine: any negatives pad
    cases = [
        ([[-1, 1, 1, 2], [-1, -1, -1, -1]], "not strictly ascending"),
        ([[-1, 2, 1], [-1, -1, -1]], "not strictly ascending|newest"),
        ([[-1, 0, 1], [-1, -1, -1]], "does not read its newest page \\(2\\)"),
        ([[-1, 0, 3], [-1, -1, -1]], "outside the head's 3 pages"),
        ([[0, -1, 2], [-1, -1, -1]], "negative entries \\(padding\\) only before"),
        ([[-1, -1, -1], [-1, -1, -1]], "has 40 slots but reads no page"),
        ([[-1, 0, 2], [-1, -1, 0]], "outside the head's 0 pages"),
    ]
    for pages, msg in cases:
        with pytest.raises(KVCompressValueError, match="pages: .*" + msg):
            call(pages)
    with pytest.raises(KVCompressValueError, match="kv_start: only for the uniform layout"):
        call([[-1, 0, 2], [-1, -1, -1]], kv_start=torch.tensor([0]))
    with pytest.raises(KVCompressValueError, match="offsets: 2 entries is not B \\* Hkv"):
        ops.attention_pages(q, keys, keys, torch.tensor([[[2]]]), 16, offsets=offsets, lengths=lengths)
    with pytest.raises(KVCompressValueError, match="lengths: the ragged layout needs both"):
        ops.attention_pages(q, keys, keys, torch.tensor([[[2], [-1]]]), 16, offsets=offsets)
    # uniform lists stay as strict as before: no padding
    with pytest.raises(KVCompressValueError, match="outside"):
        ops.attention_pages(q, randn((1, 1, 40, 8)), randn((1, 1, 40, 8)), torch.tensor([[[-1, 2]]]), 16)


def test_ragged_page_bounds_and_scores_refuse_bad_arguments():
    keys, _, offsets, lengths = ragged_layout([40, 9], 8, torch.float32, seed=1)
    po = torch.tensor([0, 3])
    kmin, kmax = torch.zeros(5, 8), torch.zeros(5, 8)
    kw = dict(offsets=offsets, lengths=lengths, page_offsets=po)
    with pytest.raises(KVCompressValueError, match="first: page 4 of head 0 is outside \\[0, 3\\]"):
        ops.page_bounds(keys, kmin, kmax, 16, torch.tensor([4, 0]), **kw)
    with pytest.raises(KVCompressValueError, match="first: page -1 of head 1"):
        ops.page_bounds(keys, kmin, kmax, 16, torch.tensor([0, -1]), **kw)
    with pytest.raises(KVCompressValueError, match="last: must be None"):
        ops.page_bounds(keys, kmin, kmax, 16, 0, 3, **kw)
    with pytest.raises(KVCompressValueError, match="page_offsets: bound rows \\[3, 3 \\+ 1\\) of head 1"):
        ops.page_bounds(keys, kmin[:3], kmax[:3], 16, 0, **kw)
    ops.page_bounds(keys, kmin[:3], kmax[:3], 16, torch.tensor([0, 1]), **kw)  # head 1 writes nothing: fine
    with pytest.raises(KVCompressValueError, match="offsets: rows .* of head 1 are outside"):
        ops.page_bounds(keys, kmin, kmax, 16, 0, offsets=offsets + torch.tensor([0, 100]), lengths=lengths,
                        page_offsets=po)
    with pytest.raises(KVCompressValueError, match="lengths: value -1 of head 1 is negative"):
        ops.page_bounds(keys, kmin, kmax, 16, 0, offsets=offsets, lengths=torch.tensor([40, -1]), page_offsets=po)
    q = randn((1, 2, 8))
    with pytest.raises(KVCompressValueError, match="num_pages: head 0 has 3 pages"):
        ops.page_scores(q, kmin, kmax, 2, 16, lengths=lengths, page_offsets=po)
    with pytest.raises(KVCompressValueError, match="kv_start: only for the uniform layout"):
        ops.page_scores(q, kmin, kmax, 3, 16, lengths=lengths, page_offsets=po, kv_start=torch.tensor([0]))
    with pytest.raises(KVCompressValueError, match="page_offsets: bound rows \\[3, 3 \\+ 1\\) of head 1"):
        ops.page_scores(q, kmin[:3], kmax[:3], 3, 16, lengths=lengths, page_offsets=po)
    with pytest.raises(KVCompressValueError, match="page_offsets: the ragged layout needs both"):
        ops.page_scores(q, kmin, kmax, 3, 16, lengths=lengths)


# ----------------------------------------------------------------------- store


def _store(P=8, budget=32, gqa="max"):
    return PagedStore(P, budget, gqa)


def test_bounds_follow_any_sequence_of_appends_and_evictions():
    g = torch.Generator().manual_seed(0)
    s = _store(P=8)
    pos = 0
    for step, q in enumerate([13, 1, 1, 7, 8, 1, 30, 2, 1, 1, 16]):
        k = torch.randn(2, 2, q, 16, generator=g)
        s.append(k, torch.randn(2, 2, q, 16, generator=g), pos)
        pos += q
        if step == 6:
            # an eviction keeps an arbitrary ascending subset: bounds are redone
            idx = torch.stack([torch.stack([torch.randperm(s.n, generator=g)[:25].sort().values
                                            for _ in range(2)]) for _ in range(2)])
            s.keep(idx)
        lo, hi = bounds_ref(s.keys, 8)
        assert torch.equal(s.kmin.double(), lo) and torch.equal(s.kmax.double(), hi), f"after step {step}"


def test_selection_matches_reference_with_ties():
    s = _store(P=4, budget=16)
    keys = torch.zeros(2, 1, 40, 4)
    keys[:, :, :, 0] = torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 3.0, 3.0]).repeat_interleave(4)
    s.append(keys, keys.clone(), 0)
    q = torch.zeros(2, 1, 1, 4)
    q[..., 0] = 1.0
    kv_start = torch.tensor([0, 9])
    got = s.pages_to_read(q, kv_start)
    scores = scores_ref(q[:, :, 0], s.kmin, s.kmax, 4, kv_start=kv_start)
    assert torch.equal(got, topk_ref(scores, 4, kv_start // 4))
    # row 0: page 0 and 9 forced, then 8 (3.0), then the lowest of the tied 2.0 pages: 1
    assert got[0, 0].tolist() == [0, 1, 8, 9]


def test_sparse_step_equals_attention_over_the_pages_it_chose():
    g = torch.Generator().manual_seed(1)
    s = _store(P=16, budget=64)
    s.append(torch.randn(2, 2, 200, 32, generator=g), torch.randn(2, 2, 200, 32, generator=g), 0)
    s.append(torch.randn(2, 2, 1, 32, generator=g), torch.randn(2, 2, 1, 32, generator=g), 200)
    q = torch.randn(2, 4, 1, 32, generator=g)
    kv_start = torch.tensor([0, 21])
    out = s.attend(q, AttentionSpec(scaling=32 ** -0.5), kv_start=kv_start)
    assert s.last_pages is not None and s.last_pages.shape == (2, 2, 4)
    # the padded row's pages are cut from its first real slot (its own grid), as alone
    for b, start in enumerate((0, 21)):
        ref = paged_attention_ref(q[b : b + 1], s.keys[b : b + 1, :, start:], s.values[b : b + 1, :, start:],
                                  s.last_pages[b : b + 1], 16)
        assert (out[b : b + 1].double() - ref).abs().max() < 1e-5
        alone = _store(P=16, budget=64)
        alone.append(s.keys[b : b + 1, :, start:].clone(), s.values[b : b + 1, :, start:].clone(), 0)
        assert torch.equal(alone.attend(q[b : b + 1], AttentionSpec(scaling=32 ** -0.5)), out[b : b + 1])
        assert torch.equal(alone.last_pages, s.last_pages[b : b + 1])
    # a budget covering the layer reads everything, through the dense path
    s.token_budget = 208
    dense = s.attend(q, AttentionSpec(scaling=32 ** -0.5), kv_start=kv_start)
    assert s.last_pages is None
    assert torch.equal(dense, ops.attention(q, s.keys, s.values, kv_start=kv_start))


def test_store_bytes_count_the_bounds():
    s = _store(P=16)
    s.append(torch.randn(1, 2, 64, 32), torch.randn(1, 2, 64, 32), 0)
    held = {t.untyped_storage().data_ptr() for t in s.tensors()}
    assert len(held) == 5 and s._kmin.shape[:2] == (1, 2) and s._kmin.shape[2] >= 4


# --------------------------------------------------------------------- methods


def test_quest_options_and_composition():
    assert Quest().paging == (1024, 16, 2, "max")
    assert method_from_spec("quest:token_budget=64:page=8").paging == (64, 8, 2, "max")
    m = method_from_spec("snapkv:window=8+quest:token_budget=64", ratio=0.5)
    assert isinstance(m, kvc.SnapKV) and m.paging == (64, 16, 2, "max")
    assert m.describe().endswith("+ Quest(token_budget=64, page=16, dense_layers=2)")
    with pytest.raises(ValueError, match="evicts nothing"):
        Quest(ratio=0.5)
    with pytest.raises(ValueError, match="at least two pages"):
        Quest(token_budget=16, page=16)
    with pytest.raises(ValueError, match="gqa"):
        Quest(gqa="sum")
    for evictor in (kvc.EMS(ratio=0.5), kvc.AdaKV(ratio=0.5)):  # per-head layers, merges (test_sparse_ragged)
        assert (evictor + Quest(token_budget=64)).paging == (64, 16, 2, "max")
    with pytest.raises(ValueError, match="packed"):
        kvc.SnapKV(ratio=0.5, quant=kvc.KIVI(), sparse=Quest())
    with pytest.raises(TypeError, match="evicting_method \\+ reader"):
        Quest() + kvc.SnapKV(ratio=0.5)


def _generate(model, ids, mask, method=None, cache=None, new=10):
    kw = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if method is None:
        return model.generate(ids, **kw)
    with kvc.compress(model, method):
        if cache is not None:
            kw.update(cache_kwargs(model, cache))
        return model.generate(ids, **kw)


def _batch(seed=5):
    """Two rows of 260 tokens, the second left-padded by 45."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 500, (2, 260), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :45] = 0
    return ids, mask


def test_budget_covering_the_layer_reproduces_generate_with_left_padding(tiny_model):
    ids, mask = _batch()
    ref = _generate(tiny_model, ids, mask)
    assert torch.equal(_generate(tiny_model, ids, mask, Quest(token_budget=512, dense_layers=0)), ref)
    # composed: Quest over what SnapKV keeps reads everything it keeps
    snap = _generate(tiny_model, ids, mask, kvc.SnapKV(ratio=0.5, window=8))
    assert torch.equal(_generate(tiny_model, ids, mask, kvc.SnapKV(ratio=0.5, window=8) + Quest(token_budget=512)),
                       snap)


def test_small_budget_reads_pages_in_the_sparse_layers_only(tiny_model):
    from kvcompress.cache import KVCache

    ids, mask = _batch()
    method = Quest(token_budget=64, page=16, dense_layers=1)
    cache = KVCache(method)
    out = _generate(tiny_model, ids, mask, method, cache)
    assert out.shape == (2, 270)
    kinds = [layer.store.kind for layer in cache.layers]
    assert kinds == ["uniform", "paged", "paged", "paged"]
    # every decode step but the first (which may still fit) read 4 pages per head
    store = cache.layers[2].store
    assert store.sparse_steps >= 9 and store.last_pages.shape == (2, 2, 4)
    # the padded row's pages are cut from its first real token: its page 0 (the sinks) is always read
    assert store.last_pages[1, :, 0].tolist() == [0, 0] and store._row_mode
    # nothing was evicted: every token is held
    assert all(layer.store.n == 269 for layer in cache.layers)


def test_readers_are_plotted_against_the_slots_they_read():
    from kvcompress.plots import _read_budget

    assert _read_budget("quest:token_budget=128") == ("quest (slots read)", 128)
    assert _read_budget("quest:page=8:token_budget=64") == ("quest:page=8 (slots read)", 64)
    assert _read_budget("tidaldecode:token_budget=256") == ("tidaldecode (slots read)", 256)
    assert _read_budget("kivi:bits=4") is None and _read_budget("snapkv+quest:token_budget=64") is None


def test_composed_with_an_evictor_a_long_generation_holds_the_budget_and_current_bounds(tiny_model):
    """A short prompt, then 80 tokens: SnapKV re-selects every interval inside
    the paged store (keep), which never holds more than budget + interval
    slots, and its page bounds still equal a recomputation."""
    from kvcompress.cache import KVCache

    g = torch.Generator().manual_seed(13)
    ids = torch.randint(5, 500, (1, 20), generator=g)
    method = kvc.SnapKV(budget=48, window=8) + Quest(token_budget=32, page=8, dense_layers=0)
    cache = KVCache(method)
    out = _generate(tiny_model, ids, torch.ones_like(ids), method, cache, new=80)
    assert out.shape == (1, 100)
    for layer in cache.layers:
        store = layer.store
        assert store.kind == "paged" and store.n <= 48 + 16 and store.sparse_steps > 0
        lo, hi = bounds_ref(store.keys, 8)
        assert torch.equal(store.kmin.double(), lo) and torch.equal(store.kmax.double(), hi)
