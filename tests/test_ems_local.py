"""EMS's local picks (the default since issue 19): the tokens the last query
attends to most, max-pooled and averaged over the layer's heads, are kept in
every head whatever their global score; the rest of the budget follows S."""

import numpy as np
import pytest
import torch

import kvcompress as kvc
from kvcompress.compat import cache_kwargs
from kvcompress.methods import EMS

from model_refs import assert_topk_consistent, group_mean, layer_qkv, window_attention64

BUDGET, WINDOW, SINKS = 24, 4, 2


def _pool64(x, kernel):
    r = kernel // 2
    T = x.shape[-1]
    return torch.stack([x[..., max(0, j - r): min(T, j + r + 1)].amax(-1) for j in range(T)], -1)


def _prefill(model, method, ids):
    with kvc.compress(model, method) as session:
        cache = session.new_cache()
        with torch.no_grad():
            model(ids, **cache_kwargs(model, cache))
    return cache


@pytest.mark.parametrize("share, heads, kernel", [(0.75, "layer", 3), (0.5, "own", 3), (1.0, "layer", 1),
                                                   (0.75, "layer", 7)])
def test_local_picks_then_global_top(tiny_model, share, heads, kernel):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 512, (2, 70), generator=g)
    method = EMS(budget=BUDGET, window=WINDOW, sinks=SINKS, head_budget="uniform", tau=float("inf"),
                 local_share=share, local_heads=heads, local_kernel=kernel, obs=1)
    cache = _prefill(tiny_model, method, ids)
    T = ids.shape[1]
    head = T - WINDOW
    m = int(share * (BUDGET - SINKS - WINDOW))
    forced = list(range(SINKS)) + list(range(head, T))
    checked = 0
    for li, (q, k, v) in enumerate(layer_qkv(tiny_model, ids)):
        hkv = k.shape[1]
        L = group_mean(window_attention64(q[:, :, -1:], k), hkv)  # [B, Hkv, T], the last query
        L[..., :SINKS] = 0.0  # sinks do not lend their attention to their neighbours
        local = _pool64(L[..., :head], kernel)
        if heads == "layer":
            local = local.mean(1, keepdim=True).expand_as(local)
        local = local.clone()
        local[..., :SINKS] = -torch.inf
        seen_by = torch.arange(T, 0, -1, dtype=torch.float64)
        G = group_mean(window_attention64(q, k) * T / seen_by, hkv)  # lam = 1: S is the global score
        store = cache.layers[li].ragged
        for b in range(2):
            for h in range(hkv):
                kept = set(store.head(b, h)[2].tolist())
                assert len(kept) == BUDGET
                order = local[b, h].argsort(descending=True).tolist()
                picks = order[:m]
                # the m local picks are kept (a near-tie at the boundary may swap)
                margin = float(local[b, h, order[m - 1]] - local[b, h, order[m]]) if m < head - SINKS else 1.0
                if margin > 1e-9:
                    assert set(picks) <= kept, (li, b, h)
                else:
                    continue
                # the rest is the top of S among the slots left
                rest = G[b, h].clone()
                rest[picks] = torch.inf
                assert_topk_consistent(sorted(kept), rest, forced, BUDGET)
                checked += 1
    assert checked >= 8


def test_local_options_validated():
    with pytest.raises(ValueError, match="local_share"):
        EMS(budget=64, local_share=1.5)
    with pytest.raises(ValueError, match="local_kernel"):
        EMS(budget=64, local_kernel=4)
    with pytest.raises(ValueError, match="local_heads"):
        EMS(budget=64, local_heads="all")
    with pytest.raises(ValueError, match="obs"):
        EMS(budget=64, obs=0)
    with pytest.raises(ValueError, match="combine"):
        EMS(budget=64, combine="min")
    with pytest.raises(ValueError, match="head_alloc"):
        EMS(budget=64, head_alloc="global")


def test_combine_max_against_float64():
    """``combine="max"``: the larger of the two normalised terms (sums over
    the candidates only), against a float64 recomputation."""
    g = torch.Generator().manual_seed(3)
    G = torch.rand(2, 3, 20, generator=g)
    L = torch.rand(2, 3, 20, generator=g)
    cand = torch.zeros(2, 1, 20, dtype=torch.bool)
    cand[..., 2:16] = True
    for lam in (0.0, 0.3, 0.5, 1.0):
        got = EMS(budget=64, combine="max", lam=lam)._combine(G, L, cand)
        g64, l64 = G.double(), L.double()
        want = torch.maximum(lam * g64 / (g64 * cand).sum(-1, keepdim=True),
                             (1 - lam) * l64 / (l64 * cand).sum(-1, keepdim=True))
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-9)
        summed = EMS(budget=64, lam=lam)._combine(G, L, cand).double()
        torch.testing.assert_close(summed, lam * g64 / (g64 * cand).sum(-1, keepdim=True)
                                   + (1 - lam) * l64 / (l64 * cand).sum(-1, keepdim=True), rtol=1e-6, atol=1e-9)


def test_head_alloc_window_is_adakv_allocation_then_local_picks_per_head(tiny_model):
    """``head_alloc="window"``: each head's budget is AdaKV's allocation
    from the last ``window`` queries' attention (max-pooled, sinks and window
    counted first), recomputed here in float64; each head then takes
    ``local_share`` of its own room in local picks and fills with S."""
    from test_adakv import _adakv_budgets

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 512, (2, 70), generator=g)
    share, kernel = 0.75, 3
    method = EMS(budget=BUDGET, window=WINDOW, sinks=SINKS, head_budget="adaptive", head_alloc="window",
                 alpha=0.2, tau=float("inf"), local_share=share, local_kernel=kernel, obs=1)
    cache = _prefill(tiny_model, method, ids)
    T = ids.shape[1]
    head = T - WINDOW
    saw_unequal, checked = False, 0
    for li, (q, k, v) in enumerate(layer_qkv(tiny_model, ids)):
        hkv = k.shape[1]
        A = group_mean(window_attention64(q[:, :, -WINDOW:], k), hkv)
        A[..., :SINKS] = 0.0
        A[..., :head] = _pool64(A[..., :head], kernel)
        A[..., :SINKS] = torch.inf
        store = cache.layers[li].ragged
        L = group_mean(window_attention64(q[:, :, -1:], k), hkv)
        L[..., :SINKS] = 0.0
        local = _pool64(L[..., :head], kernel).mean(1)  # the layer's ranking
        local[..., :SINKS] = -torch.inf
        for b in range(2):
            ref_k = _adakv_budgets(A[b].numpy(), BUDGET, 0.2, WINDOW, np.ones(T, dtype=bool))
            got = store.lengths.view(2, -1)[b].numpy()
            np.testing.assert_array_equal(got, ref_k)
            saw_unequal |= len(set(got.tolist())) > 1
            order = local[b].argsort(descending=True).tolist()
            for h in range(hkv):
                kept = set(store.head(b, h)[2].tolist())
                m = int(share * (int(got[h]) - SINKS - WINDOW))
                if m <= 0 or float(local[b, order[m - 1]] - local[b, order[m]]) <= 1e-9:
                    continue
                assert set(order[:m]) <= kept, (li, b, h)
                checked += 1
    assert saw_unequal and checked >= 8


def test_local_picks_take_the_lowest_index_among_ties():
    """Max-pooling repeats values over neighbours, so the local ranking has
    exact ties; the picks at a tie are the lowest-indexed slots (a rule any
    device follows: torch.topk's choice among ties is not the same on CPU
    and CUDA), and rows with a smaller room take a prefix of the same order."""
    ranked = torch.arange(24, dtype=torch.float32).reshape(1, 2, 12) / 100
    local = torch.tensor([[[0.1, 0.5, 0.5, 0.5, 0.2, 0.5, 0.3, 0.3, -torch.inf, 0.5, 0.0, 0.1],
                           [0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]]])
    room = torch.tensor([[6, 4]])
    got = EMS(budget=64, local_share=0.5)._force(ranked, local, room, torch.tensor(12))
    forced = [set(torch.isinf(got[0, h]).nonzero().flatten().tolist()) for h in range(2)]
    # 0.5 * 6 = 3 picks among the five 0.5s at 1, 2, 3, 5, 9; 0.5 * 4 = 2 of twelve equal
    assert forced == [{1, 2, 3}, {0, 1}]
    others = ~torch.isinf(got)
    assert torch.equal(got[others], ranked[others])  # the rest keep their ranking
