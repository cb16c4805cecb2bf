"""EMS on a tiny random Llama: centers against a float64 recomputation of the
global-local score, eviction/merging through the cache, counts and bias."""

import functools

import pytest
import torch

import kvcompress as kvc
from kvcompress.compat import cache_kwargs
from kvcompress.methods import EMS

# uniform head budgets (the per-head checks below expect every head to keep the same count)
# and the S-only selection (no local picks: tests/test_ems_local.py checks those)
UEMS = functools.partial(EMS, head_budget="uniform", local_share=0.0, obs=None)

from model_refs import assert_topk_consistent, group_mean, layer_qkv, window_attention64

BUDGET, WINDOW, SINKS = 16, 4, 2


def _ids(length=60, seed=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (2, length), generator=g)


def _prefill(model, method, ids):
    with kvc.compress(model, method) as session:
        cache = session.new_cache()
        with torch.no_grad():
            out = model(ids, **cache_kwargs(model, cache))
    return cache, out


def _ems_scores64(q, k, lam):
    """S of the EMS steps 1-3 in docs/design.md in float64 for an unpadded batch."""
    hkv, T = k.shape[1], k.shape[2]
    seen_by = torch.arange(T, 0, -1, dtype=torch.float64)  # queries i >= j
    G = group_mean(window_attention64(q, k) * T / seen_by, hkv)
    L = group_mean(window_attention64(q[:, :, -WINDOW:], k), hkv)
    cand = torch.zeros(T, dtype=torch.bool)
    cand[SINKS : T - WINDOW] = True
    G = G / G[..., cand].sum(-1, keepdim=True)
    L = L / L[..., cand].sum(-1, keepdim=True)
    return lam * G + (1 - lam) * L


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_centers_are_the_top_tokens_of_the_global_local_score(tiny_model, lam):
    ids = _ids()
    method = UEMS(budget=BUDGET, window=WINDOW, sinks=SINKS, lam=lam, tau=float("inf"))
    cache, _ = _prefill(tiny_model, method, ids)
    T = ids.shape[1]
    forced = list(range(SINKS)) + list(range(T - WINDOW, T))
    for li, (q, k, v) in enumerate(layer_qkv(tiny_model, ids)):
        S = _ems_scores64(q, k, lam)
        store = cache.layers[li].ragged
        for b in range(2):
            for h in range(k.shape[1]):
                hk, hv, pos = store.head(b, h)
                kept = pos.tolist()
                assert len(kept) == BUDGET and kept == sorted(kept)
                assert_topk_consistent(kept, S[b, h], forced, BUDGET, eps=1e-5 * float(S[b, h].max()))
                # tau = inf: plain eviction, the kept rows are the original ones
                torch.testing.assert_close(hk.double(), k[b, h, kept], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(hv.double(), v[b, h, kept], rtol=1e-5, atol=1e-5)
        assert torch.equal(store.counts, torch.ones_like(store.counts))


def test_kernel_picks_centers_on_the_max_pooled_score(tiny_model):
    ids = _ids()
    kernel, T = 5, ids.shape[1]
    # lam=0: on a random model the global score just ranks tokens by
    # position (near-uniform causal attention), where pooling changes nothing
    cache, _ = _prefill(tiny_model, UEMS(budget=BUDGET, window=WINDOW, sinks=SINKS, kernel=kernel, lam=0.0,
                                        tau=float("inf")), ids)
    forced = list(range(SINKS)) + list(range(T - WINDOW, T))
    for li, (q, k, _) in enumerate(layer_qkv(tiny_model, ids)):
        S = _ems_scores64(q, k, 0.0)
        head = T - WINDOW
        pooled = S.clone()
        for j in range(head):  # max over the neighbours before the window
            pooled[..., j] = S[..., max(0, j - kernel // 2) : min(head, j + kernel // 2 + 1)].amax(-1)
        store = cache.layers[li].ragged
        for b in range(2):
            for h in range(k.shape[1]):
                kept = store.head(b, h)[2].tolist()
                # a peak's score spreads over its neighbours: exact ties, which
                # go to the lower index, so the kept set is exactly predictable
                p = pooled[b, h]
                key = lambda j: (-round(float(p[j] / p.max()), 6), j)  # noqa: E731
                free = sorted(range(SINKS, head), key=key)[: BUDGET - len(forced)]
                assert kept == sorted(forced + free)


def test_merge_everything_accounts_for_every_token(tiny_model):
    ids = _ids()
    cache, _ = _prefill(tiny_model, UEMS(budget=BUDGET, window=WINDOW, sinks=SINKS, tau=float("-inf")), ids)
    for layer in cache.layers:
        store = layer.ragged
        for b in range(2):
            for h in range(store.heads):
                i = b * store.heads + h
                start, n = int(store.offsets[i]), int(store.lengths[i])
                assert n == BUDGET
                assert float(store.counts[start : start + n].sum()) == ids.shape[1]


def test_adaptive_threshold_merges_some_and_evicts_some(tiny_model):
    cache, _ = _prefill(tiny_model, UEMS(budget=BUDGET, window=WINDOW, sinks=SINKS), _ids())
    live = [layer.ragged.counts[layer.ragged.live_rows()] for layer in cache.layers]
    total = sum(float(c.sum()) for c in live)
    slots = sum(c.numel() for c in live)
    full = len(cache.layers) * 2 * tiny_model.config.num_key_value_heads * 60
    assert slots < total < full


def test_merge_bias_changes_decoding_only_when_slots_were_merged(tiny_model):
    ids = _ids()
    mask = torch.ones_like(ids)

    def logits(**kw):
        with kvc.compress(tiny_model, UEMS(budget=BUDGET, window=WINDOW, sinks=SINKS, **kw)):
            out = tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4,
                                      do_sample=False, pad_token_id=0, output_logits=True,
                                      return_dict_in_generate=True)
        return torch.stack(out.logits[1:])

    inf = float("inf")
    torch.testing.assert_close(logits(tau=inf, merge_bias=True), logits(tau=inf, merge_bias=False))
    assert not torch.allclose(logits(tau=-inf, merge_bias=True), logits(tau=-inf, merge_bias=False), atol=1e-4)


@pytest.mark.parametrize("interval", [0, 32])
def test_bytes_held_include_counts(tiny_model, interval):
    cache, _ = _prefill(tiny_model, UEMS(budget=BUDGET, window=WINDOW, sinks=SINKS, interval=interval), _ids())
    cfg = tiny_model.config
    D = cfg.head_dim
    BH = 2 * cfg.num_key_value_heads
    rows = BH * (BUDGET + interval)  # each head has `interval` rows of slack for decode appends
    per_slot = 2 * D * 4 + 4 + 4 + (4 if interval else 0)  # K, V, positions, counts, carried scores
    per_layer = rows * per_slot + 3 * 8 * BH + 8 * 2  # ... offsets/lengths/caps, kv_start
    per_layer += 2 * 8 * BH  # the store's host mirrors of lengths and caps (int64)
    if interval:
        per_layer += 8 * BH + 2 * cfg.num_attention_heads * WINDOW * D * 4  # head budgets, recent queries
        per_layer += 8 * BH  # each head's float64 share of the decode budget (host)
        per_layer += 8 * BH  # the head budgets' host copy (int64)
    assert cache.memory_bytes() == per_layer * len(cache.layers)


def test_probe_with_every_query_equals_exact(tiny_model):
    ids = _ids()
    exact, _ = _prefill(tiny_model, UEMS(budget=BUDGET, window=WINDOW, sinks=SINKS), ids)
    probe, _ = _prefill(tiny_model, UEMS(budget=BUDGET, window=WINDOW, sinks=SINKS, global_mode="probe", probe=1.0),
                        ids)
    for a, b in zip(exact.layers, probe.layers):
        assert torch.equal(a.ragged.positions, b.ragged.positions)
        assert torch.equal(a.ragged.k, b.ragged.k)


def test_adaptive_heads_keep_the_layer_budget(tiny_model):
    # lam=0 (local score): a random model's global scores are nearly the same
    # in every head (attention ~ uniform), which rightly gives equal budgets.
    cache, _ = _prefill(tiny_model, EMS(budget=BUDGET, window=WINDOW, sinks=SINKS, head_budget="adaptive",
                                        alpha=0.0, lam=0.0), _ids())
    unequal = False
    for layer in cache.layers:
        lengths = layer.ragged.lengths.view(2, -1)
        assert lengths.sum(1).tolist() == [BUDGET * lengths.shape[1]] * 2
        assert int(lengths.min()) >= SINKS + WINDOW
        unequal |= bool((lengths != BUDGET).any())
    assert unequal


def test_budget_above_prompt_is_identity(tiny_model):
    ids = _ids(length=30)
    mask = torch.ones_like(ids)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    ref = tiny_model.generate(**kw)
    with kvc.compress(tiny_model, UEMS(budget=100)):
        assert torch.equal(tiny_model.generate(**kw), ref)


@pytest.mark.parametrize("kw, match", [
    (dict(lam=1.5), "lam"), (dict(alpha=-0.1), "alpha"), (dict(probe=0.0), "probe"), (dict(tau=float("nan")), "tau"),
    (dict(head_budget="x"), "head_budget"), (dict(global_mode="x"), "global_mode"), (dict(window=0), "window"),
    (dict(merge_bias=1), "merge_bias"), (dict(kernel=4), "kernel"), (dict(kernel=0), "kernel"),
])
def test_bad_arguments(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        UEMS(budget=8, **kw)
