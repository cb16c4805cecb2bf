"""TidalDecode: the selection against a float64 top-k of the selection
layer's attention, the sparse layers against attention over exactly the
selected tokens, the layer roles, and generate()."""

from __future__ import annotations

import pytest
import torch

import kvcompress as kvc
from kvcompress.cache import KVCache
from kvcompress.compat import cache_kwargs
from kvcompress.methods import TidalDecode, method_from_spec
from kvcompress.stores import AttentionSpec, TidalStore
from reference import window_scores_ref
from test_quest import _batch as _quest_batch
from test_quest import _generate, paged_attention_ref


def test_roles_and_options():
    m = TidalDecode()
    assert m.selection(32) == (2, 13) and m.selection(30) == (2, 12) and m.selection(2) == (1,)
    assert [m.role(i, 32) for i in (0, 1, 2, 3, 12, 13, 31)] == [None, None, "select", "sparse", "sparse",
                                                                  "select", "sparse"]
    spec = method_from_spec("tidaldecode:token_budget=128:selection_layers=3/9")
    assert spec.selection_layers == (3, 9) and spec.token_budget == 128
    assert repr(spec) == "TidalDecode(token_budget=128, selection_layers='3/9')"
    assert TidalDecode(selection_layers=4).selection(10) == (4,)
    # Gemma 3's layout: full attention at 5, 11, 17; a sliding selection layer hands its role on
    sliding = {0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16}
    roles = {i: m.role(i, 18, sliding={j for j in sliding if j < i}) for i in (5, 11, 17)}
    assert roles == {5: "select", 11: "select", 17: "sparse"}
    assert TidalDecode(selection_layers=(3,)).role(5, 18, sliding={3, 4}) == "select"
    assert TidalDecode(selection_layers=(3,)).role(5, 18, sliding={4}) == "sparse"
    for bad in ("2,13", (13, 2), (2, 2), (-1,), "x"):
        with pytest.raises(ValueError, match="selection_layers"):
            TidalDecode(selection_layers=bad)
    with pytest.raises(ValueError, match="evicts nothing"):
        TidalDecode(ratio=0.5)
    composed = kvc.SnapKV(ratio=0.5) + TidalDecode(token_budget=64)
    assert composed.tidal.token_budget == 64 and composed.paging is None and composed.lsh is None
    assert method_from_spec("snapkv+tidaldecode:token_budget=64", ratio=0.5).tidal.token_budget == 64
    for evictor in (kvc.EMS(ratio=0.5), kvc.AdaKV(ratio=0.5)):  # per-head layers (test_sparse_ragged)
        assert (evictor + TidalDecode()).tidal == TidalDecode()
    with pytest.raises(ValueError, match="packed"):
        kvc.SnapKV(ratio=0.5, quant=kvc.KIVI(), sparse=TidalDecode())
    with pytest.raises(TypeError, match="evicting_method \\+ reader"):
        TidalDecode() + kvc.SnapKV(ratio=0.5)


def _pair(n=150, B=2, Hq=4, H=2, D=16, budget=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shared = {}
    sel, sparse = TidalStore("select", budget, shared), TidalStore("sparse", budget, shared)
    for store in (sel, sparse):
        store.append(torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g), 0)
    return sel, sparse, shared, torch.randn(B, Hq, 1, D, generator=g), torch.randn(B, Hq, 1, D, generator=g)


def test_selection_is_the_top_of_the_selection_layers_attention_and_the_next_layer_reads_only_it():
    sel, sparse, shared, q1, q2 = _pair()
    spec = AttentionSpec(scaling=0.25)
    kv_start = torch.tensor([0, 23])
    dense = sel.attend(q1, spec, kv_start=kv_start)
    assert torch.equal(dense, kvc.ops.attention(q1, sel.keys, sel.values, scaling=0.25, kv_start=kv_start))
    newest, batch, chosen, positions, rows = shared["tidal"]
    # the padded row selects over its own real slots (as alone), its count too
    assert (newest, batch, tuple(chosen.shape), rows) == (149, 2, (2, 2, 32), (True, True))
    assert torch.equal(positions.long(), chosen)  # nothing evicted: slot j holds position j
    scores = window_scores_ref(q1, sel.keys, scaling=0.25, gqa="max", kv_start=kv_start)
    for b in range(2):
        for h in range(2):
            picked = set(chosen[b, h].tolist())
            assert 149 in picked and min(picked) >= int(kv_start[b])
            others = [j for j in range(int(kv_start[b]), 149)]
            ranked = sorted(others, key=lambda j: (-float(scores[b, h, j]), j))
            assert picked == set(ranked[:31]) | {149}
    out = sparse.attend(q2, spec, kv_start=kv_start)
    assert torch.equal(sparse.last_read, chosen) and sparse.sparse_steps == 1
    ref = paged_attention_ref(q2, sparse.keys, sparse.values, chosen, 1, kv_start)
    assert (out.double() - ref).abs().max() < 1e-5


def test_a_stale_or_missing_selection_reads_everything():
    sel, sparse, shared, q1, q2 = _pair()
    spec = AttentionSpec(scaling=0.25)
    assert torch.equal(sparse.attend(q2, spec), kvc.ops.attention(q2, sparse.keys, sparse.values, scaling=0.25))
    sel.attend(q1, spec)
    # the sparse layer has one more slot than the selection saw: not the same step
    sparse.append(torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16), 150)
    q3 = torch.randn(2, 4, 1, 16)
    assert torch.equal(sparse.attend(q3, spec), kvc.ops.attention(q3, sparse.keys, sparse.values, scaling=0.25))
    assert sparse.last_read is None


def _evicted_reference(sel_positions, held, k, kv_start):
    """Per (b, h): the held slots whose position was selected, then the
    newest other real slots, ``k`` in all, ascending (plain Python sets)."""
    B, H, _ = held.shape
    out = torch.empty(B, H, k, dtype=torch.int64)
    for b in range(B):
        for h in range(H):
            want = set(sel_positions[b, h].tolist())
            real = [j for j in range(held.shape[2]) if j >= int(kv_start[b])]
            hits = [j for j in real if int(held[b, h, j]) in want]
            rest = [j for j in reversed(real) if j not in hits]
            out[b, h] = torch.tensor(sorted(hits + rest[: k - len(hits)]))
    return out


def test_after_an_eviction_a_sparse_layer_reads_the_selected_positions_it_holds():
    """The sparse layer kept 100 of 150 tokens per head (a different set
    per head): it reads those of the selection's positions it still holds,
    topped up with its newest other slots, and attends over exactly them."""
    sel, sparse, shared, q1, q2 = _pair()
    g = torch.Generator().manual_seed(3)
    kv_start = torch.tensor([0, 23])

    def head(first):  # `first` leading slots (the padded row keeps its padding in front), 100 in all
        picked = first + torch.randperm(149 - first, generator=g)[: 99 - first].sort().values
        return torch.cat([torch.arange(first), picked, torch.tensor([149])])

    keep = torch.stack([torch.stack([head(0), head(0)]), torch.stack([head(23), head(23)])])
    assert all(len(set(keep[b, h].tolist())) == 100 for b in range(2) for h in range(2))
    sparse.keep(keep.contiguous())
    spec = AttentionSpec(scaling=0.25)
    sel.attend(q1, spec, kv_start=kv_start)
    _, _, chosen, positions, _ = shared["tidal"]
    out = sparse.attend(q2, spec, kv_start=kv_start)
    held = sparse.column("positions")
    ref_slots = _evicted_reference(positions, held, 32, kv_start)
    assert torch.equal(sparse.last_read, ref_slots) and sparse.sparse_steps == 1
    # some selected positions were evicted from this layer, so the top-up was needed
    assert any(len(set(positions[b, h].tolist()) - set(held[b, h].tolist())) > 0
               for b in range(2) for h in range(2))
    ref = paged_attention_ref(q2, sparse.keys, sparse.values, ref_slots, 1, kv_start)
    assert (out.double() - ref).abs().max() < 1e-5


def test_composed_with_an_evictor(tiny_model):
    ids, mask = _quest_batch(9)
    # a budget covering every kept slot reads them all: the evictor's own generation
    snap = _generate(tiny_model, ids, mask, kvc.SnapKV(ratio=0.5, window=8))
    assert torch.equal(_generate(tiny_model, ids, mask, kvc.SnapKV(ratio=0.5, window=8)
                                 + TidalDecode(token_budget=300, selection_layers=(1,))), snap)
    method = kvc.SnapKV(ratio=0.5, window=8) + TidalDecode(token_budget=48, selection_layers=(1,))
    cache = KVCache(method, num_layers=4)
    out = _generate(tiny_model, ids, mask, method, cache)
    assert out.shape == (2, 270)
    assert [layer.store.kind for layer in cache.layers] == ["uniform", "tidal", "tidal", "tidal"]
    sel = cache.shared["tidal"]
    for layer in cache.layers[2:]:
        store = layer.store
        assert store.sparse_steps == 9 and store.last_read.shape == (2, 2, 48)
        held = store.column("positions")
        assert torch.equal(store.last_read, _evicted_reference(sel.positions, held, 48, layer.kv_start))


def test_composed_with_an_evictor_a_long_generation_holds_the_budget(tiny_model):
    """SnapKV re-selects every interval inside the tidal stores (keep)."""
    g = torch.Generator().manual_seed(13)
    ids = torch.randint(5, 500, (1, 20), generator=g)
    method = kvc.SnapKV(budget=48, window=8) + TidalDecode(token_budget=32, selection_layers=(1,))
    cache = KVCache(method, num_layers=4)
    out = _generate(tiny_model, ids, torch.ones_like(ids), method, cache, new=80)
    assert out.shape == (1, 100)
    for layer in cache.layers[1:]:
        assert layer.store.kind == "tidal" and layer.store.n <= 48 + 16
    assert all(layer.store.sparse_steps > 0 for layer in cache.layers[2:])


def test_budget_covering_the_layer_reproduces_generate_with_left_padding(tiny_model):
    ids, mask = _quest_batch(9)
    assert torch.equal(_generate(tiny_model, ids, mask, TidalDecode(token_budget=300, selection_layers=(1,))),
                       _generate(tiny_model, ids, mask))


def test_small_budget_reads_the_selected_tokens_in_every_later_layer(tiny_model):
    ids, mask = _quest_batch(9)
    method = TidalDecode(token_budget=48, selection_layers=(1,))
    cache = KVCache(method, num_layers=4)
    out = _generate(tiny_model, ids, mask, method, cache)
    assert out.shape == (2, 270)
    assert [layer.store.kind for layer in cache.layers] == ["uniform", "tidal", "tidal", "tidal"]
    assert [layer.store.role for layer in cache.layers[1:]] == ["select", "sparse", "sparse"]
    for layer in cache.layers[2:]:
        assert layer.store.sparse_steps == 9  # every decode step after the prefill's token
        assert torch.equal(layer.store.last_read, cache.shared["tidal"].slots)
    assert int(cache.shared["tidal"].slots[1].min()) >= 45  # nothing from the padded row's padding


def test_reset_then_reuse_is_a_fresh_cache(tiny_model):
    """After ``KVCache.reset()`` the layers share the cache's (emptied) state
    again: a reused cache selects and reads as a fresh one does (the layers
    used to publish into dicts of their own, and TidalDecode quietly read
    every slot)."""
    from transformers import DynamicCache

    ids = torch.randint(3, 512, (1, 90), generator=torch.Generator().manual_seed(1))
    other = torch.randint(3, 512, (1, 80), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True, output_logits=True)
    method = TidalDecode(token_budget=16)
    with kvc.compress(tiny_model, method), torch.no_grad():
        fresh = tiny_model.generate(ids, **kw, **cache_kwargs(tiny_model, KVCache(method)))
        reused = KVCache(method)
        tiny_model.generate(other, attention_mask=torch.ones_like(other), max_new_tokens=4, do_sample=False,
                            pad_token_id=0, **cache_kwargs(tiny_model, reused))
        reused.reset()
        assert reused.shared == {} and all(layer.shared is reused.shared for layer in reused.layers)
        again = tiny_model.generate(ids, **kw, **cache_kwargs(tiny_model, reused))
        dense = tiny_model.generate(ids, **kw, **cache_kwargs(tiny_model, DynamicCache(config=tiny_model.config)))
    assert torch.equal(torch.stack(fresh.logits), torch.stack(again.logits))
    # and the sparse reads are real: a token budget of 16 of 90 changes the logits
    assert (torch.stack(fresh.logits) - torch.stack(dense.logits)).abs().max() > 1e-3


@pytest.mark.parametrize("padded", [False, True], ids=["same-length", "padded"])
def test_the_published_selection_counts_in_the_cache_bytes(tiny_model, padded):
    """The selection a selection layer publishes for the sparse layers is
    held memory: ``memory_bytes`` counts it once (it used to count none)."""
    ids, mask = _quest_batch(9)
    if not padded:
        ids, mask = ids[:1, -200:], mask[:1, -200:]
    method = TidalDecode(token_budget=48, selection_layers=(1,))
    cache = KVCache(method, num_layers=4)
    _generate(tiny_model, ids, mask, method, cache)
    sel = cache.shared["tidal"]
    held = cache.memory_bytes()
    expected = sel.slots.untyped_storage().nbytes() + sel.positions.untyped_storage().nbytes()
    assert expected > 0 and (sel.rows is not None) == padded
    cache.shared.pop("tidal")
    assert held - cache.memory_bytes() == expected
