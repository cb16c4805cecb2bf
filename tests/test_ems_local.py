"""EMS's local picks (the default since issue 19): the tokens the last query
attends to most, max-pooled and averaged over the layer's heads, are kept in
every head whatever their global score; the rest of the budget follows S."""

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
