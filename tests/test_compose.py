"""Eviction or merging composed with KIVI packing (``EMS(...) + KIVI(...)``):
the per-head packed store against float64 references, the API, and generation."""

from __future__ import annotations

import math

import pytest
import torch

import kvcompress as kvc
from kvcompress import ops
from kvcompress.methods import EMS, H2O, KIVI, AdaKV, SnapKV, method_from_spec
from kvcompress.stores import AttentionSpec, PackedStore, RaggedPackedStore, RaggedStore


# ----------------------------------------------------------------- the API
def test_compose_api_and_spec():
    m = EMS(ratio=0.5) + KIVI(bits=2)
    assert m == EMS(ratio=0.5, quant=KIVI(bits=2))
    assert m.packing == (2, 32, 128, 2) and m.evicts
    assert m.describe().endswith(" + KIVI(bits=2, group=32, residual=128)")
    assert EMS(ratio=0.5).packing is None
    spec = method_from_spec("snapkv:window=16+kivi:bits=8:group=16", ratio=0.75)
    assert spec == SnapKV(ratio=0.75, window=16, quant=KIVI(bits=8, group=16))
    with pytest.raises(ValueError, match="evictor\\+quantizer"):
        method_from_spec("kivi+snapkv", ratio=0.5)
    with pytest.raises(ValueError, match="evictor\\+quantizer"):
        method_from_spec("snapkv+adakv", ratio=0.5)
    with pytest.raises(ValueError, match="at most two"):
        method_from_spec("snapkv+kivi+kivi", ratio=0.5)
    with pytest.raises(ValueError, match="bits"):
        method_from_spec("snapkv+kivi:bits=3", ratio=0.5)
    with pytest.raises(TypeError, match="evicting_method \\+ quantizer"):
        KIVI() + SnapKV(ratio=0.5)
    with pytest.raises(ValueError, match="already packs"):
        (SnapKV(ratio=0.5) + KIVI()) + KIVI(bits=2)
    with pytest.raises(TypeError, match="quant: expected a quantizer"):
        SnapKV(ratio=0.5, quant=SnapKV(ratio=0.5))
    with pytest.raises(ValueError, match="keeps every token"):
        KIVI(quant=KIVI())


# --------------------------------------------------- the per-head packed store
def _ragged(lengths, D, heads, batch, *, merged, seed=0, dtype=torch.float32):
    """A RaggedStore with the given per-head lengths (row-major over batch and
    heads) and, with `merged`, random merge counts >= 1."""
    g = torch.Generator().manual_seed(seed)
    C = max(lengths)
    keys = torch.randn(batch, heads, C, D, generator=g) * 2 + 0.5
    values = torch.randn(batch, heads, C, D, generator=g)
    valid = torch.zeros(batch, heads, C, dtype=torch.bool)
    for i, n in enumerate(lengths):
        valid[i // heads, i % heads, :n] = True
    positions = torch.arange(C, dtype=torch.int32).expand(batch, heads, C).contiguous()
    counts = torch.randint(1, 6, (batch, heads, C), generator=g).float() if merged else None
    return RaggedStore.from_dense(keys.to(dtype), values.to(dtype), positions, valid, counts=counts)


def _roundtrip(k, v, bits, G, value_bits=None):
    """float64 dequantized keys/values [n, D] of one head packed on its own
    (its last group filled with copies of its last slot, then dropped)."""
    n, D = (int(x) for x in k.shape)
    vb = bits if value_bits is None else value_bits
    pad = (-n) % G
    kp = torch.cat([k, k[-1:].expand(pad, D)])[None, None]
    vp = torch.cat([v, v[-1:].expand(pad, D)])[None, None]
    kd = ops.unpack_keys(*ops.pack_keys(kp, bits, G), bits, G)[0, 0, :n].double()
    vd = ops.unpack_values(*ops.pack_values(vp, vb, G), vb, G, head_dim=D)[0, 0, :n].double()
    return kd, vd


def _reference(store: RaggedPackedStore, ragged: RaggedStore, query, spec, extra=None):
    """float64 attention of `query` over, per head, the dequantized kept
    slots with their own counts (no copies), plus the residual window; the
    kept slots are re-derived from `ragged` by packing each head alone."""
    B, Hq, q, D = query.shape
    H = ragged.heads
    g = Hq // H
    bits, G, r = store.bits, store.group, store.r
    out = torch.zeros(B, q, Hq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            i = b * H + h
            k, v, _ = ragged.head(b, h)
            n = int(k.shape[0])
            cnt = ragged.counts[int(ragged.offsets[i]) : int(ragged.offsets[i]) + n] if ragged.counts is not None \
                else torch.ones(n)
            if int(k.shape[0]):
                # the head packed alone, padded with its last slot: the same groups as the store's
                kd, vd = _roundtrip(k, v, bits, G, store.value_bits)
            else:
                kd = vd = torch.zeros(0, D, dtype=torch.float64)
            if extra is not None:  # decoded groups packed since, from a group boundary: [m, D]
                ed, fd = _roundtrip(extra[0][b, h], extra[1][b, h], bits, G, store.value_bits)
                kd, vd = torch.cat([kd, ed]), torch.cat([vd, fd])
                cnt = torch.cat([cnt, torch.ones(int(ed.shape[0]))])
            keys = torch.cat([kd, store._rk[b, h, :r].double()])
            vals = torch.cat([vd, store._rv[b, h, :r].double()])
            bias = torch.cat([torch.log(cnt.double()) if spec.count_bias else torch.zeros(kd.shape[0],
                                                                                         dtype=torch.float64),
                              torch.zeros(r, dtype=torch.float64)])
            M = int(keys.shape[0])
            for hq in range(h * g, (h + 1) * g):
                logits = (query[b, hq].double() @ keys.T) * spec.scaling
                if spec.softcap is not None:
                    logits = torch.tanh(logits / spec.softcap) * spec.softcap
                logits = logits + bias
                causal = torch.arange(M)[None, :] <= (torch.arange(q) + M - q)[:, None]
                p = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
                out[b, :, hq] = p @ vals
    return out


@pytest.mark.parametrize("bits,value_bits", [(2, None), (4, None), (8, None), (4, 2), (2, 8)])
@pytest.mark.parametrize("merged", [False, True])
def test_from_ragged_attention_equals_float64(bits, value_bits, merged):
    """Heads of every shape (empty, one slot, whole groups, a short last
    group): the kernel's attention equals float64 over the kept slots with
    their counts, so the repeated slots weigh exactly what they replace."""
    D, H, B, G = 24, 3, 2, 8
    lengths = [0, 1, 8, 13, 40, 5]
    ragged = _ragged(lengths, D, H, B, merged=merged, seed=bits)
    store = RaggedPackedStore.from_ragged(ragged, bits, G, 4, value_bits)
    assert store._vc.shape[-1] == math.ceil(D * (value_bits or bits) / 8)
    assert store.head_lengths() == lengths
    assert store._host_lengths.tolist() == [math.ceil(n / G) * G for n in lengths]
    assert all(int(o) % G == 0 for o in store.offsets)
    g = torch.Generator().manual_seed(9)
    nq = 3
    store.append(torch.randn(B, H, nq, D, generator=g), torch.randn(B, H, nq, D, generator=g), 100)
    query = torch.randn(B, 2 * H, nq, D, generator=g)
    for count_bias in (True, False):
        spec = AttentionSpec(scaling=0.4, count_bias=count_bias)
        got = store.attend(query, spec)
        ref = _reference(store, ragged, query, spec)
        assert (got.double() - ref).abs().max() < 2e-5
        # the torch path (a model option the kernel lacks) agrees as well
        soft = AttentionSpec(scaling=0.4, count_bias=count_bias, softcap=3.0)
        assert (store.attend(query, soft).double() - _reference(store, ragged, query, soft)).abs().max() < 2e-5


def test_decoded_groups_pack_onto_every_head_and_segments_grow():
    """Appends stay in the residual until it holds residual + group slots;
    then whole groups go onto every head's segment (growing the buffers more
    than once), and attention still equals float64."""
    D, H, B, G, R, bits = 16, 2, 2, 4, 3, 4
    lengths = [0, 6, 9, 4]
    ragged = _ragged(lengths, D, H, B, merged=True, seed=3)
    store = RaggedPackedStore.from_ragged(ragged, bits, G, R)
    g = torch.Generator().manual_seed(4)
    ks, vs = [], []
    for step in range(30):
        k, v = torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
        ks.append(k)
        vs.append(v)
        store.append(k, v, 100 + step)
        store.settle()
        assert store.r < R + G and (store.r >= R or store.n_packed == 0)
    packed = store.n_packed
    assert packed == 30 - store.r and packed % G == 0
    assert store.head_lengths() == [n + 30 for n in lengths]
    allk, allv = torch.cat(ks, 2), torch.cat(vs, 2)
    assert torch.equal(store._rk[:, :, : store.r], allk[:, :, packed:])
    query = torch.randn(B, 2 * H, 1, D, generator=g)
    spec = AttentionSpec(scaling=0.25, count_bias=True)
    ref = _reference(store, ragged, query, spec, extra=(allk[:, :, :packed], allv[:, :, :packed]))
    assert (store.attend(query, spec).double() - ref).abs().max() < 2e-5
    # beam search: rows reordered and repeated
    idx = torch.tensor([1, 1, 0])
    full = store.attend(query, spec)
    store.index_batch(idx)
    assert store.head_lengths() == [lengths[i] + 30 for b in idx.tolist() for i in (2 * b, 2 * b + 1)]
    assert torch.allclose(store.attend(query[idx], spec), full[idx], atol=1e-6)


def test_bytes_held_are_the_packed_rows():
    """The store holds codes, mins/scales and counts of its (group-rounded,
    slack included) rows, plus the residual buffer: nothing full-precision
    for the kept slots. Per head it also holds int64 offsets, lengths and
    capacities, and host copies of its lengths, capacities and real slots.
    The residual buffer (every head merged, so none of its slots there)
    has room for one group: it grows as tokens come."""
    D, H, B, G, bits = 64, 3, 1, 32, 4
    lengths = [100, 37, 64]
    ragged = _ragged(lengths, D, H, B, merged=True)
    store = RaggedPackedStore.from_ragged(ragged, bits, G, 128)
    rows = sum(math.ceil(n / G) * G + G for n in lengths)
    per_row = 2 * D * bits // 8 + 2 * 4 * (D // G) + 2 * 4 + 2 * 4 * D / G
    residual = 2 * B * H * G * D * 4
    held = sum(t.numel() * t.element_size() for t in store.tensors())
    assert held == rows * per_row + residual + 3 * 8 * B * H + 3 * 8 * B * H


# ------------------------------------------------------------------ generation
def _generate(model, ids, method, new=24, mask=None):
    mask = torch.ones_like(ids) if mask is None else mask
    with kvc.compress(model, method) as session:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    return out[:, ids.shape[1]:], session.cache


@pytest.mark.parametrize("make", [lambda **kw: SnapKV(budget=64, interval=0, **kw),
                                  lambda **kw: AdaKV(budget=64, interval=0, **kw),
                                  lambda **kw: EMS(budget=64, interval=0, **kw)],
                         ids=["snapkv", "adakv", "ems"])
def test_generation_packs_what_the_evictor_keeps(tiny_model, make):
    """The composed cache holds the evictor's kept slots, packed (every
    non-window layer), plus what decoding added; the bytes fall with bits."""
    ids = torch.randint(3, tiny_model.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(0))
    _, plain = _generate(tiny_model, ids, make())
    held = {}
    for bits in (8, 4, 2):
        _, cache = _generate(tiny_model, ids, make(quant=KIVI(bits=bits, group=16, residual=16)))
        for layer, ref in zip(cache.layers, plain.layers):
            assert isinstance(layer.store, PackedStore)
            assert layer.store.head_lengths() == ref.store.head_lengths()
        held[bits] = kvc.testing.cache_bytes(cache)
    assert held[8] > held[4] > held[2]


def left_padded_pair(vocab: int, long: int, short: int, seed: int = 1):
    """Prompts ``a`` ``[1, long]`` and ``b`` ``[1, short]`` and the
    left-padded batch of both with its attention mask."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(3, vocab, (1, long), generator=g)
    b = torch.randint(3, vocab, (1, short), generator=g)
    pad = torch.zeros(1, long - short, dtype=torch.long)
    batch = torch.cat([a, torch.cat([pad, b], 1)])
    mask = torch.cat([torch.ones(1, long, dtype=torch.long), torch.cat([pad, torch.ones_like(b)], 1)])
    return a, b, batch, mask


def test_left_padded_batch_equals_rows_alone(tiny_model):
    """A left-padded row of a composed cache generates what it does alone."""
    a, b, batch, mask = left_padded_pair(tiny_model.config.vocab_size, 260, 200)
    for make in (lambda: SnapKV(budget=64, interval=0) + KIVI(bits=4, group=16, residual=16),
                 lambda: EMS(budget=64, interval=0) + KIVI(bits=4, group=16, residual=16)):
        got, _ = _generate(tiny_model, batch, make(), new=12, mask=mask)
        alone_a, _ = _generate(tiny_model, a, make(), new=12)
        alone_b, _ = _generate(tiny_model, b, make(), new=12)
        assert torch.equal(got[0], alone_a[0]) and torch.equal(got[1], alone_b[0])


@pytest.mark.parametrize("make", [lambda: SnapKV(budget=64, interval=8) + KIVI(bits=4, group=16, residual=16),
                                  lambda: H2O(budget=64, interval=8) + KIVI(bits=4, group=16, residual=16),
                                  # a per-head layer keeps as many newest slots in full precision as
                                  # every head of every row can (RaggedPackedStore.from_ragged), so
                                  # rows alone match the batch with no residual
                                  lambda: EMS(budget=64, interval=8) + KIVI(bits=4, group=16, residual=0)],
                         ids=["snapkv", "h2o", "ems"])
def test_decode_rounds_of_a_left_padded_batch_equal_rows_alone(tiny_model, make):
    """Packed layers re-compressed while decoding (every 8 tokens over the
    budget): a left-padded row still generates what it does alone."""
    a, b, batch, mask = left_padded_pair(tiny_model.config.vocab_size, 260, 200, seed=2)
    got, cache = _generate(tiny_model, batch, make(), new=40, mask=mask)
    alone_a, _ = _generate(tiny_model, a, make(), new=40)
    alone_b, _ = _generate(tiny_model, b, make(), new=40)
    assert torch.equal(got[0], alone_a[0]) and torch.equal(got[1], alone_b[0])
    assert all(max(layer.head_lengths()) < 64 * 2 + 8 for layer in cache.layers)
