"""ops.head_budgets (AdaKV per-head budget allocation) against an independent
NumPy reference: an argsort over all heads for the layer's top-N, then the
bounded rounding done literally, one unit at a time."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvcompress import KVCompressTypeError, KVCompressValueError, ops


def head_budgets_ref(scores, budget, alpha, floor=0, kv_start=None):
    s = np.asarray(scores.numpy() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    B, H, T = s.shape
    start = np.zeros(B, np.int64) if kv_start is None else np.asarray(kv_start, np.int64)
    bud = min(budget, T)
    out = np.zeros((B, H), np.int64)
    for b in range(B):
        sel = (np.arange(T)[None, :] >= start[b]) & (s[b] != -np.inf)
        U = sel.sum(axis=1)
        hs, js = np.nonzero(sel)
        # rank: score descending, then head, then position (lexsort: last key first)
        order = np.lexsort((js, hs, -s[b][hs, js]))
        N = min(H * bud, int(U.sum()))
        n = np.bincount(hs[order[:N]], minlength=H)
        t = alpha * (bud - n).astype(np.float64)  # the one rounding of the target
        whole = n + np.floor(t).astype(np.int64)
        frac = t - np.floor(t)
        lo = np.full(H, min(floor, T))
        hi = np.maximum(U, lo)
        total = min(max(H * bud, int(lo.sum())), int(hi.sum()))
        k = lo.copy()
        for _ in range(total - int(lo.sum())):
            # the unit that takes head h from k to k + 1 ranks by (whole - k, frac, -h)
            best = max((h for h in range(H) if k[h] < hi[h]), key=lambda h: (whole[h] - k[h], frac[h], -h))
            k[best] += 1
        out[b] = k
    return out


def check(scores, budget, alpha, floor=0, kv_start=None):
    got = ops.head_budgets(scores, budget, alpha=alpha, floor=floor, kv_start=kv_start)
    ref = head_budgets_ref(scores, budget, alpha, floor, kv_start)
    got_np = got.numpy() if isinstance(got, torch.Tensor) else got
    assert got_np.dtype == np.int64 and got_np.shape == ref.shape
    assert np.array_equal(got_np, ref), (budget, alpha, floor, got_np, ref)
    return got_np


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("budget", [0, 1, 7, 32, 100, 200, 1000])
@pytest.mark.parametrize("H", [1, 3, 8])
def test_matches_reference(alpha, budget, H):
    T = 200
    g = torch.Generator().manual_seed(H * 1000 + budget)
    # heads with different spreads so the global top-k is uneven
    scale = torch.linspace(0.2, 3.0, H)[None, :, None]
    s = torch.randn(2, H, T, generator=g) * scale
    got = check(s, budget, alpha)
    assert (got.sum(axis=1) == H * min(budget, T)).all()  # sums exactly


def test_round_is_largest_remainder():
    # without binding bounds: floor(x) plus one for the largest fractional parts
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 6, 300, generator=g) * torch.tensor([0.1, 0.5, 1, 2, 4, 8])[None, :, None]
    for alpha in (0.1, 0.2, 0.3, 0.7):
        got = ops.head_budgets(s, 50, alpha=alpha).numpy()
        ref = head_budgets_ref(s, 50, alpha)
        assert np.array_equal(got, ref)
        x = ((1 - alpha) * np.array([np.bincount(np.argsort(-s[b].reshape(-1).numpy(), kind="stable")[:300] // 300, minlength=6)
                                     for b in range(3)]) + alpha * 50)
        assert (np.abs(got - x) < 1).all() and (got.sum(axis=1) == 300).all()


def test_ties():
    # integer-valued scores: many ties across heads and positions
    g = torch.Generator().manual_seed(2)
    s = torch.randint(0, 4, (3, 5, 40), generator=g).float()
    for budget in (1, 3, 10, 17, 39):
        for alpha in (0.0, 0.25, 0.5, 1.0):
            check(s, budget, alpha)
    # all equal: the lower heads take the top-N first
    flat = torch.zeros(1, 4, 10)
    assert ops.head_budgets(flat, 5, alpha=0.0).tolist() == [[10, 10, 0, 0]]
    # alpha 0.5, n = [5, 5, 2, 0]: x = [4, 4, 2.5, 1.5], and the one unit left
    # over goes to head 2, not 3 (equal fractional parts: the lower head)
    s = torch.full((1, 4, 10), -1.0)
    s[0, 0, :5] = 5
    s[0, 1, :5] = 5
    s[0, 2, :2] = 5
    assert ops.head_budgets(s, 3, alpha=0.5).tolist() == [[4, 4, 3, 1]]
    # -0.0 and +0.0 tie
    z = torch.tensor([[[-0.0, 1.0], [0.0, 1.0]]])
    assert ops.head_budgets(z, 1, alpha=0.0).tolist() == [[1, 1]]
    assert ops.head_budgets(z[:, :, [1, 0]].contiguous() * torch.tensor([[[1.0], [-1.0]]]), 1, alpha=0.0).tolist() == [[2, 0]]


def test_padding_masks_and_floor():
    g = torch.Generator().manual_seed(3)
    B, H, T = 4, 4, 64
    s = torch.randn(B, H, T, generator=g)
    s[0, 1, 10:] = float("-inf")  # head 1 has only 10 selectable slots
    s[1, :, ::2] = float("-inf")
    s[2, 3] = float("-inf")  # nothing selectable in one head
    s[:, :, -3:] = float("inf")  # forced window, selected first
    kv_start = torch.tensor([0, 5, 60, 64])  # last row: all padding
    for budget in (0, 4, 16, 40, 64, 80):
        for alpha in (0.0, 0.2, 1.0):
            for floor in (0, 3, 12, 70):
                got = check(s, budget, alpha, floor=floor, kv_start=kv_start)
                lo = min(floor, T)
                assert (got >= lo).all() and (got <= T).all()
                U = np.array([[((np.arange(T) >= int(kv_start[b])) & (s[b, h].numpy() != -np.inf)).sum() for h in range(H)] for b in range(B)])
                assert (got <= np.maximum(U, lo)).all()
                # the sum is H * budget unless the bounds forbid it
                want = np.clip(H * min(budget, T), H * lo, np.maximum(U, lo).sum(axis=1))
                assert (got.sum(axis=1) == want).all()
    # budget >= T: everything selectable is kept
    got = ops.head_budgets(s, 10**12, alpha=0.3, kv_start=kv_start).numpy()
    assert np.array_equal(got, head_budgets_ref(s, 64, 0.3, kv_start=kv_start))


def test_alpha_extremes():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 5, 50, generator=g) * torch.arange(1, 6)[None, :, None]
    u = check(s, 12, 1.0)
    assert (u == 12).all()  # alpha 1: uniform
    a = check(s, 12, 0.0)
    top = np.argsort(-s.numpy().reshape(2, -1), axis=1, kind="stable")[:, :60] // 50
    assert np.array_equal(a, np.stack([np.bincount(t, minlength=5) for t in top]))  # alpha 0: raw counts


def test_uniform_mode_numpy_and_layouts():
    s = torch.randn(2, 3, 9)
    assert ops.head_budgets(s, 4, mode="uniform").tolist() == [[4] * 3] * 2
    assert ops.head_budgets(s, 40, mode="uniform").tolist() == [[9] * 3] * 2
    assert ops.head_budgets(s, 2, floor=5, mode="uniform").tolist() == [[5] * 3] * 2
    n = ops.head_budgets(s.numpy(), 4, alpha=0.5, kv_start=np.array([0, 2]))
    assert isinstance(n, np.ndarray) and n.dtype == np.int64
    assert np.array_equal(n, head_budgets_ref(s, 4, 0.5, kv_start=[0, 2]))
    big = torch.randn(2, 9, 3).transpose(1, 2)  # strided scores
    assert np.array_equal(ops.head_budgets(big, 4).numpy(), head_budgets_ref(big.contiguous(), 4, 0.2))
    # int32 kv_start is accepted; zero sizes
    assert tuple(ops.head_budgets(torch.zeros(0, 3, 5), 2).shape) == (0, 3)
    assert tuple(ops.head_budgets(torch.zeros(2, 0, 5), 2).shape) == (2, 0)
    assert ops.head_budgets(torch.zeros(2, 3, 0), 2).tolist() == [[0] * 3] * 2
    # the result feeds select_topk directly
    k = ops.head_budgets(s, 4, alpha=0.2, floor=2)
    assert tuple(ops.select_topk(s, k, sinks=1, window=1).shape) == (2, 3, int(k.max()))


def test_bad_inputs():
    s = torch.randn(1, 2, 5)
    cases = [
        ((s, -1), {}, KVCompressValueError, "budget: must be >= 0"),
        ((s, 2.0), {}, KVCompressTypeError, "budget: expected an int"),
        ((s, True), {}, KVCompressTypeError, "budget"),
        ((s, 2), dict(alpha=1.5), KVCompressValueError, r"alpha: expected a value in \[0, 1\]"),
        ((s, 2), dict(alpha=float("nan")), KVCompressValueError, "alpha"),
        ((s, 2), dict(alpha="0.2"), KVCompressTypeError, "alpha"),
        ((s, 2), dict(floor=-1), KVCompressValueError, "floor"),
        ((s, 2), dict(mode="greedy"), KVCompressValueError, "mode"),
        ((s, 2), dict(kv_start=torch.tensor([6])), KVCompressValueError, "kv_start"),
        ((s[0], 2), {}, KVCompressValueError, "scores: expected a 3-D"),
        ((s.double(), 2), {}, KVCompressTypeError, "scores"),
    ]
    for args, kwargs, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            ops.head_budgets(*args, **kwargs)
    bad = s.clone()
    bad[0, 1, 3] = float("nan")
    with pytest.raises(KVCompressValueError, match="scores: NaN"):
        ops.head_budgets(bad, 2)


def test_bit_identical_for_any_thread_count():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(7, 8, 500, generator=g)
    kv_start = torch.arange(7) * 20
    n0 = ops.get_num_threads()
    try:
        res = []
        for n in (1, 2, 3):
            ops.set_num_threads(n)
            res.append(ops.head_budgets(s, 37, alpha=0.2, floor=8, kv_start=kv_start))
    finally:
        ops.set_num_threads(n0)
    assert all(torch.equal(res[0], r) for r in res[1:])
    assert np.array_equal(res[0].numpy(), head_budgets_ref(s, 37, 0.2, 8, kv_start))
    assert math.isclose(float(res[0].sum()), 7 * 8 * 37)
