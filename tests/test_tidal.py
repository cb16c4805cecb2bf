"""TidalDecode: the selection against a float64 top-k of the selection
layer's attention, the sparse layers against attention over exactly the
selected tokens, the layer roles, and generate()."""

from __future__ import annotations

import pytest
import torch

import kvcompress as kvc
from kvcompress.cache import KVCache
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
    for bad in ("2,13", (13, 2), (2, 2), (-1,), "x"):
        with pytest.raises(ValueError, match="selection_layers"):
            TidalDecode(selection_layers=bad)
    with pytest.raises(ValueError, match="evicts nothing"):
        TidalDecode(ratio=0.5)
    with pytest.raises(TypeError):
        kvc.SnapKV(ratio=0.5) + TidalDecode()


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
    n, batch, chosen = shared["tidal"]
    assert (n, batch, tuple(chosen.shape)) == (150, 2, (2, 2, 32))
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
        assert torch.equal(layer.store.last_read, cache.shared["tidal"][2])
    assert int(cache.shared["tidal"][2][1].min()) >= 45  # nothing from the padded row's padding
