"""Mixed precision (LowBits, MiKV, ZipCache): what an evictor would drop is
packed at low bits, the rest stays in full precision."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvcompress as kvc
from kvcompress import ops
from kvcompress.compat import cache_kwargs
from kvcompress.methods import H2O, AdaKV, EMS, LayerView, LowBits, MiKV, SnapKV, ZipCache, method_from_spec
from kvcompress.stores import PackedStore
from test_compose import _generate as generate
from test_compose import left_padded_pair


def test_options_and_refusals():
    assert MiKV(ratio=0.75).quant == LowBits(bits=2, group=32)
    assert MiKV(ratio=0.75, bits=4).packing == (4, 32, 0) and repr(LowBits()) == "LowBits(bits=2, group=32)"
    assert repr(MiKV(budget=64, bits=4)) == "MiKV(budget=64, bits=4, group=32, recent=0.5)"
    assert ZipCache(ratio=0.5).describe() == "ZipCache(ratio=0.5, bits=2, group=32, probe=0.1, window=8)"
    assert method_from_spec("snapkv+lowbits:bits=4", ratio=0.75) == SnapKV(ratio=0.75, quant=LowBits(bits=4))
    assert method_from_spec("mikv:bits=4", ratio=0.5) == MiKV(ratio=0.5, bits=4)
    with pytest.raises(ValueError, match="LowBits quantizes and evicts nothing"):
        LowBits(ratio=0.5)
    with pytest.raises(ValueError, match="no residual"):
        LowBits(residual=8)
    with pytest.raises(ValueError, match="bits: must be 2, 4 or 8"):
        MiKV(ratio=0.5, bits=3)
    with pytest.raises(ValueError, match="probe"):
        ZipCache(ratio=0.5, probe=0.0)
    with pytest.raises(ValueError, match="ZipCache always keeps 9"):
        ZipCache(budget=4)
    with pytest.raises(ValueError, match="compose it"):
        kvc.KVCache(LowBits(bits=2))
    for evictor in (AdaKV(ratio=0.5), EMS(ratio=0.5)):
        with pytest.raises(ValueError, match="equal length per head"):
            evictor + LowBits(bits=2)


def _prefill(model, ids, method):
    """Run the prompt once under `method`; return the cache."""
    with kvc.compress(model, method) as session:
        cache = session.new_cache()
        with torch.no_grad():
            model(ids, attention_mask=torch.ones_like(ids), use_cache=True, **cache_kwargs(model, cache))
    return cache


def _group_bound(x, bits, G):
    """Per-element quantization bound of keys [n, D] packed per channel in
    groups of G tokens (the last group short), float64."""
    x = x.double()
    out = torch.empty_like(x)
    for t in range(0, x.shape[0], G):
        seg = x[t : t + G]
        out[t : t + G] = (seg.amax(0) - seg.amin(0)) / (2**bits - 1) / 2
    return out


@pytest.mark.parametrize("bits", [2, 4])
def test_selected_slots_stay_exact_and_the_rest_within_the_bound(tiny_model, bits):
    """MiKV's full-precision slots are H2O's kept slots, bit for bit; its
    packed slots are the others, in order, within the quantization bound."""
    ids = torch.randint(3, tiny_model.config.vocab_size, (1, 200), generator=torch.Generator().manual_seed(2))
    full = DynamicCache(config=tiny_model.config)
    with torch.no_grad():
        tiny_model(ids, use_cache=True, **cache_kwargs(tiny_model, full))
    h2o = _prefill(tiny_model, ids, H2O(ratio=0.75, interval=0))
    mikv = _prefill(tiny_model, ids, MiKV(ratio=0.75, bits=bits, group=16, interval=0))
    for i, (lh, lm) in enumerate(zip(h2o.layers, mikv.layers)):
        store = lm.store
        assert isinstance(store, PackedStore) and not store.pack_decoded
        keys = full.layers[i].keys[0]  # [H, 200, D]
        kept = lh.positions[0].long()  # [H, k]
        assert torch.equal(store._rk[0, :, : store.r], keys.gather(1, kept[..., None].expand(-1, -1, keys.shape[2])))
        k_all, _ = store.dequantized()
        for h in range(keys.shape[0]):
            other = torch.ones(200, dtype=torch.bool)
            other[kept[h]] = False
            ref = keys[h][other]
            got = k_all[0, h, : store.n_packed]
            assert got.shape == ref.shape
            assert ((got.double() - ref.double()).abs() <= _group_bound(ref, bits, 16) * (1 + 1e-5) + 1e-6).all()


def test_zipcache_keeps_the_normalised_attention_top(tiny_model):
    """ZipCache's full-precision slots: the window plus the top of the mean
    attention each key receives from the queries after it (float64, all
    queries as probes, GQA groups averaged)."""
    g = torch.Generator().manual_seed(5)
    B, Hq, H, n, D = 1, 4, 2, 60, 16
    q = torch.randn(B, Hq, n, D, generator=g)
    k = torch.randn(B, H, n, D, generator=g)
    method = ZipCache(budget=20, window=4, probe=1.0)
    view = LayerView(layer_idx=0, num_layers=1, queries=q, keys=k, values=k.clone(),
                     kv_start=torch.zeros(B, dtype=torch.int64), scaling=0.25, state={}, phase="prefill")
    got = method.select(view, 20)
    logits = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double().repeat_interleave(Hq // H, 1)) * 0.25
    causal = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
    A = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
    score = A.sum(2) / (n - torch.arange(n)).double()  # queries that see key j: n - j
    score = score.view(B, H, Hq // H, n).mean(2)
    for h in range(H):
        top = torch.topk(score[0, h, : n - 4], 16).indices
        want = torch.sort(torch.cat([top, torch.arange(n - 4, n)])).values
        assert torch.equal(got[0, h], want)


def test_padded_batch_equals_rows_alone(tiny_model):
    """Rows of different lengths with ratio= select different numbers of
    slots; the shorter row moves demoted slots up to full precision and its
    generation equals the row alone."""
    a, b, batch, mask = left_padded_pair(tiny_model.config.vocab_size, 260, 180)

    def gen(ids, m, attn=None):
        return generate(tiny_model, ids, m, new=12, mask=attn)

    for make in (lambda: MiKV(ratio=0.6, bits=4, group=16), lambda: ZipCache(ratio=0.6, bits=4, group=16)):
        got, cache = gen(batch, make(), mask)
        store = cache.layers[0].store
        # row a selects 104 of 260, row b 72 of 180: b moves 32 slots up; its
        # packed part is 76 real slots after 80 padded ones
        assert store.r == 104 + 12 - 1 and store.n_packed == 156
        assert cache.layers[0].kv_start.tolist() == [0, 80]
        assert torch.equal(got[0], gen(a, make())[0][0]) and torch.equal(got[1], gen(b, make())[0][0])


def test_eight_bits_give_the_full_cache_tokens(tiny_model):
    ids = torch.randint(3, tiny_model.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(0))

    def gen(m):
        return generate(tiny_model, ids, m)[0]

    full = gen(kvc.StreamingLLM(ratio=0.0, sinks=0))
    assert torch.equal(gen(MiKV(ratio=0.75, bits=8)), full)
    assert torch.equal(gen(SnapKV(ratio=0.75) + LowBits(bits=8)), full)


def test_bytes_fall_with_bits(tiny_model):
    ids = torch.randint(3, tiny_model.config.vocab_size, (1, 400), generator=torch.Generator().manual_seed(3))
    held = {b: kvc.testing.cache_bytes(_prefill(tiny_model, ids, MiKV(ratio=0.75, bits=b))) for b in (2, 4, 8)}
    full = kvc.testing.cache_bytes(_prefill(tiny_model, ids, kvc.StreamingLLM(ratio=0.0, sinks=0)))
    assert full > held[8] > held[4] > held[2]
    # 1 row x 2 kv heads: codes of the 300 demoted slots, the 100 kept ones in fp32
    store = _prefill(tiny_model, ids, MiKV(ratio=0.75, bits=2)).layers[0].store
    assert store.n_packed == 300 and store.r == 100
    assert store._kc.numel() == 2 * 300 * ops.packed_row_bytes(16, 2)
    assert store._rk.shape[2] == 100 and store._rk.dtype == torch.float32
