"""KIVI(sinks=S): the first S slots of every head kept in full precision
beside the packed part, against float64 references and the eager path."""

from __future__ import annotations

import pytest
import torch

import kvcompress as kvc
from kvcompress import testing as T
from kvcompress.compat import cache_kwargs
from kvcompress.methods import KIVI, LowBits, method_from_spec
from kvcompress.stores import AttentionSpec, PackedStore, UniformStore
from kvcompress.stores.rotation import key_rotation

from test_kivi import _attention64, _group_bound, check_float64
from test_rotation import ONE_CALL, _kernel_calls


def test_sinks_option():
    m = KIVI(bits=2, sinks=4)
    assert repr(m) == "KIVI(bits=2, group=32, residual=128, sinks=4)" and m.fp_sinks == 4
    assert method_from_spec("kivi:bits=2:rotate=auto:sinks=4") == KIVI(bits=2, rotate="auto", sinks=4)
    assert KIVI().fp_sinks == 0 and kvc.SnapKV(budget=64).fp_sinks == 0
    assert (kvc.SnapKV(budget=64) + m).fp_sinks == 4
    with pytest.raises(ValueError, match="sinks: must be >= 0"):
        KIVI(sinks=-1)
    with pytest.raises(TypeError, match="sinks"):
        KIVI(sinks=1.5)
    with pytest.raises(ValueError, match="sinks: LowBits"):
        LowBits(sinks=2)
    # per-head and merging evictors keep a block per head (test_sinks_heads.py)
    for make in (lambda: kvc.EMS(budget=64), lambda: kvc.AdaKV(budget=64)):
        assert (make() + KIVI(bits=2, sinks=4)).fp_sinks == 4
    with pytest.raises(ValueError, match="without sinks"):
        kvc.MiniCache() + KIVI(bits=4, sinks=4)


def _uniform(keys, values):
    """A uniform store of copies of ``keys``/``values`` ``[B, H, n, D]``: a
    packed store takes its buffers over (no copy) and moves slots in them."""
    B, H, n, _ = keys.shape
    positions = torch.arange(n).expand(B, H, n)
    return UniformStore.from_parts(keys.clone(), values.clone(), {"positions": positions})


def _store(dtype, pads, rotation=None, S=4, bits=2, n=150, D=32, G=16, R=32, seed=2):
    """A packed store over n slots of 2 rows x 2 kv heads whose first real
    key (at the row's padding) is 8x the others, packed with S sinks; returns
    the store and the original keys and values."""
    torch.manual_seed(seed)
    keys = torch.randn(2, 2, n, D)
    for b, p in enumerate(pads):
        keys[b, :, p] *= 8  # an attention sink: it would set its group's channel ranges
    keys, values = keys.to(dtype), torch.randn(2, 2, n, D).to(dtype)
    store = PackedStore.from_uniform(_uniform(keys, values), bits, G, R, rotation=rotation, sinks=S)
    store.settle(pad=list(pads))
    return store, keys, values


@pytest.mark.parametrize("pads", [(0, 0), (0, 7), (3, 147)], ids=["unpadded", "padded", "short-row"])
def test_the_sink_block_holds_each_rows_first_real_slots_exactly(pads):
    """The first ``sinks`` real slots of each row come back bit for bit, in
    their logical place; the packed slots after them are within KIVI's
    per-group bound of groups that no longer hold the outsized first key; a
    row with fewer real slots than ``sinks`` keeps its padding's slots in the
    block. Beam reorders (``index_batch``) move a row's block with it."""
    S, G = 4, 16
    store, keys, values = _store(torch.float32, pads, S=S, G=G)
    assert store.n_sinks == S and store.n == 150 and "sinks=4" in repr(store)
    k, v = store.dequantized()
    assert k.shape == keys.shape
    for b, p in enumerate(pads):
        a = min(p, 150 - S)
        assert store._sink_at[b] == a
        assert torch.equal(k[b, :, a : a + S], keys[b, :, a : a + S]) and torch.equal(v[b, :, a : a + S],
                                                                                   values[b, :, a : a + S])
    # row 0: its packed groups are the slots after the sinks, packed from slot 0 of the rest
    rest = torch.cat([keys[:1, :, : store._sink_at[0]], keys[:1, :, store._sink_at[0] + S :]], 2)
    got = torch.cat([k[:1, :, : store._sink_at[0]], k[:1, :, store._sink_at[0] + S :]], 2)
    p0 = int(store.split_start(torch.tensor(pads))[1][0])
    rest[:, :, :p0] = rest[:, :, p0 : p0 + 1]  # padding packs as the first real slot (PackedStore.settle)
    m = store.n_packed
    bound = _group_bound(rest[:, :, :m], 2, G, True)
    assert ((got[:, :, :m].double() - rest[:, :, :m].double()).abs() <= bound * (1 + 1e-5) + 1e-6).all()
    if pads[0] == 0:
        # without the block the outsized first key widens group 0's ranges: coarser codes
        plain = PackedStore.from_uniform(_uniform(keys, values), 2, G, 32)
        plain.settle(pad=list(pads))
        pk, _ = plain.dequantized()
        err_sinks = (got[:, :, 1:G] - rest[:, :, 1:G]).abs().mean()
        err_plain = (pk[:1, :, S + 1 : S + G] - keys[:1, :, S + 1 : S + G]).abs().mean()
        assert err_sinks < err_plain / 2, (err_sinks, err_plain)
    idx = torch.tensor([1, 0, 1])
    store.index_batch(idx)
    k2, v2 = store.dequantized()
    assert store._sink_at == [min(pads[1], 146), min(pads[0], 146), min(pads[1], 146)]
    assert torch.equal(k2, k[idx]) and torch.equal(v2, v[idx])


@ONE_CALL
@pytest.mark.parametrize("pads,in_call", [((0, 7), True), ((3, 147), False), ((0, 120), False)],
                         ids=["padding-packed", "short-row", "padding-in-residual"])
@pytest.mark.parametrize("rotated", [False, True], ids=["plain", "rotated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_with_sinks_equals_float64_over_the_dequantized_slots(dtype, rotated, pads, in_call, one_call,
                                                                       monkeypatch):
    """Within twice torch's own error of float64 attention over the
    dequantized slots in the logical order, with GQA, for single queries,
    chunks and softcaps (the eager path). When every row's padding lies in
    the packed part, one call reads packed part, sink block and residual
    (the block at the residual's front: the padding is still a prefix), also
    for a chunk; otherwise (a row with fewer real slots than ``sinks``, or
    padding reaching into the residual) the block is a call of its own,
    joined by log-sum-exp, and a chunk takes the eager path (a call of the
    block alone would mask it causally)."""
    calls = _kernel_calls(monkeypatch, one_call)
    rotation = key_rotation(32, torch.device("cpu")) if rotated else None
    store, _, _ = _store(dtype, pads, rotation=rotation)
    assert store._sinks_in_call == in_call and store.n_packed == 112
    B, Hkv, Hq, D = 2, 2, 6, 32
    store.append(torch.randn(B, Hkv, 3, D).to(dtype), torch.randn(B, Hkv, 3, D).to(dtype), 150)
    kv_start = torch.tensor(pads)
    for q_len in (1, 3):
        q = torch.randn(B, Hq, q_len, D).to(dtype)
        k, v = check_float64(store, q, kv_start, dtype)
        # rotated keys off the CPU read the residual (with the block, in one call) apart from the packed part
        calls_in_call = 1 if one_call or not rotated else 2
        expected = calls_in_call if in_call else 0 if q_len > 1 else calls_in_call + 1
        assert len(calls) == expected, (q_len, calls)
        calls.clear()
    capped = store.attend(q, AttentionSpec(scaling=D**-0.5, softcap=5.0), kv_start=kv_start)
    ref_capped = _attention64(q, k, v, D**-0.5, kv_start, softcap=5.0)
    assert (capped.double() - ref_capped).abs().max().item() < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("kv_start", [(0, 9), (2, 140)])
def test_a_block_read_apart_takes_any_masked_prefix(kv_start):
    """Read apart, the block and the rest split any logical ``kv_start``:
    one reaching into a row's block masks the block's first slots, one past
    it the rest's slots up to the packed part's middle."""
    store, _, _ = _store(torch.float32, (3, 147))
    assert not store._sinks_in_call
    B, Hq, D = 2, 6, 32
    ks = torch.tensor(kv_start)
    q = torch.randn(B, Hq, 1, D)
    out = store.attend(q, AttentionSpec(scaling=D**-0.5), kv_start=ks)
    k, v = store.dequantized()
    ref = _attention64(q, k, v, D**-0.5, ks)
    assert (out.double() - ref).abs().max().item() < 1e-5


def test_a_short_prompt_takes_its_sinks_at_the_first_pack():
    """Nothing is taken while the residual could still hold every slot; the
    block is taken with the first group, from the prompt's first slots."""
    S, G, R = 4, 8, 16
    torch.manual_seed(4)
    keys, values = torch.randn(1, 2, 10, 16), torch.randn(1, 2, 10, 16)
    store = PackedStore.from_uniform(_uniform(keys, values), 2, G, R, sinks=S)
    store.settle()
    assert store.n_sinks == 0 and store.n_packed == 0 and store.r == 10 and "not taken yet" in repr(store)
    steps = [torch.randn(1, 2, 1, 16) for _ in range(30)]
    for t, x in enumerate(steps):
        store.append(x, x * 2, 10 + t)
        store.settle()
        assert store.n == 11 + t
        assert store.n_sinks == (S if 11 + t >= S + R + G else 0), t
    assert torch.equal(store.sink_block()[0], keys[:, :, :S]) and store.n_packed % G == 0 and store.n_packed > 0
    k, v = store.dequantized()
    assert torch.equal(k[:, :, :S], keys[:, :, :S]) and torch.equal(v[:, :, :S], values[:, :, :S])
    assert torch.equal(k[:, :, -1:], steps[-1])


MAKERS = {
    "kivi2": lambda: KIVI(bits=2, group=8, residual=8, sinks=4),
    "kivi2-rotated": lambda: KIVI(bits=2, group=8, residual=8, rotate=True, sinks=4),
    "kivi2-auto": lambda: KIVI(bits=2, group=8, residual=8, rotate="auto", sinks=4),
    # rounds: the layer is read back through unpacked() in the logical order and packed again
    "snapkv+kivi4": lambda: kvc.SnapKV(budget=48) + KIVI(bits=4, group=8, residual=8, sinks=4),
    # layers 2 and 3 read layers 0 and 1's packed stores, sink blocks included
    "kvsharer+kivi2": lambda: kvc.KVSharer(plan="2>0/3>1") + KIVI(bits=2, group=8, residual=8, sinks=4),
}


@pytest.mark.parametrize("make", MAKERS.values(), ids=list(MAKERS))
def test_kernel_generation_equals_the_eager_path_and_keeps_the_first_real_tokens(tiny_lm, make, monkeypatch):
    """Generation through the kernels (two calls joined) gives the logits of
    the eager path over the same dequantized slots in the logical order, for
    a left-padded batch; every layer's sink block holds its row's first real
    tokens' keys, as the full cache has them."""
    import kvcompress.stores.packed as packed_store

    model, tok, _ = tiny_lm
    out, cache = generate_padded(model, tok, make())
    ids, mask = _padded_batch()
    from transformers import DynamicCache

    full = DynamicCache()
    with torch.no_grad():  # generate's positions: a left-padded row's real tokens count from 0
        model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
              **cache_kwargs(model, full))
    for i, layer in enumerate(cache.layers):
        s = layer.store
        if hasattr(s, "source"):
            continue  # a KVSharer layer reading another layer's store
        assert isinstance(s, PackedStore) and s.n_sinks == 4, (i, s)
        if make().evicts:
            continue  # an evictor's round may drop a first token: its block holds the first kept ones
        assert s._sink_at == [0, 25]
        ref = full.layers[i].keys
        for b, a in enumerate((0, 25)):
            assert torch.allclose(s.sink_block()[0][b], ref[b, :, a : a + 4], atol=1e-4), (i, b)
    monkeypatch.setattr(packed_store, "kernel_reads", lambda query, residual: False)
    assert_same_generation(out, generate_padded(model, tok, make())[0])


def _padded_batch():
    """``(ids, attention_mask)`` ``[2, 120]``: row 1 left-padded by 25."""
    torch.manual_seed(6)
    ids = torch.randint(5, 250, (2, 120))
    mask = torch.ones_like(ids)
    mask[1, :25] = 0
    return ids, mask


def generate_padded(model, tok, method):
    """40 greedy tokens of the left-padded batch under ``method``:
    ``(generate's output with logits, the session's cache)``."""
    ids, mask = _padded_batch()
    with kvc.compress(model, method) as session:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False,
                             pad_token_id=tok.eos_token_id, output_logits=True, return_dict_in_generate=True)
    return out, session.cache


def assert_same_generation(out, ref):
    """The same tokens, and every step's logits within 1e-4 of the largest."""
    assert torch.equal(out.sequences, ref.sequences)
    for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
        err = float((a - b).abs().max())
        assert err <= 1e-4 * max(1.0, float(b.abs().max())), f"step {step}: logits differ by {err:.3g}"


def test_8_bits_with_sinks_track_the_full_cache(tiny_lm):
    """8-bit KIVI with sinks is close to lossless (teacher-forced KL < 1e-3),
    and its greedy tokens are the full cache's."""
    model, _, _ = tiny_lm
    torch.manual_seed(3)
    ids = torch.randint(5, 250, (1, 200))
    with T.method_context(model, None) as new:
        tokens, full = T.greedy(model, new(), ids, 13, keep_logits=True)
    with T.method_context(model, KIVI(bits=8, group=8, residual=16, sinks=4)) as new:
        cache = new()
        _, logits = T.greedy(model, cache, ids, 13, force=tokens, keep_logits=True)
    assert all(layer.store.n_sinks == 4 for layer in cache.layers)
    p = torch.log_softmax(full.double(), -1)
    kl = float((p.exp() * (p - torch.log_softmax(logits.double(), -1))).sum(-1).mean())
    assert kl < 1e-3, kl
