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
from kvcompress.stores.base import AttentionSpec
from test_compose import _generate as generate
from test_compose import left_padded_pair


def test_options_and_refusals():
    assert MiKV(ratio=0.75).quant == LowBits(bits=2, group=32, high_bits=8)
    assert MiKV(ratio=0.75, bits=4).packing == (4, 32, 0, 4) and repr(LowBits()) == "LowBits(bits=2, group=32)"
    assert repr(MiKV(budget=64, bits=4)) == "MiKV(budget=64, bits=4, high_bits=8, group=32, recent=0.5)"
    assert ZipCache(ratio=0.5).describe() == \
        "ZipCache(ratio=0.5, bits=2, high_bits=8, group=32, probe=0.1, window=8)"
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
    mikv = _prefill(tiny_model, ids, MiKV(ratio=0.75, bits=bits, group=16, interval=0, high_bits=None))
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
    slots; each row keeps its own selection in full precision and packs its
    own other slots from its first one (row mode), so both rows generate
    what they generate alone. (Before, the shorter row moved its newest
    demoted slots up to the longer row's count and packed its low part in
    groups aligned to the padded batch.)"""
    a, b, batch, mask = left_padded_pair(tiny_model.config.vocab_size, 260, 180)

    def gen(ids, m, attn=None):
        return generate(tiny_model, ids, m, new=12, mask=attn)

    for make in (lambda: MiKV(ratio=0.6, bits=4, group=16, high_bits=None),
                 lambda: ZipCache(ratio=0.6, bits=4, group=16, high_bits=None)):
        got, cache = gen(batch, make(), mask)
        store = cache.layers[0].store
        # row a selects 104 of 260 and packs 156, row b 72 of 180 and packs 108 (its 80 pads are not stored);
        # the residual's first 32 rows are row a's only
        assert store._np == [156, 108] and store._nh is None
        assert [store.r - s for s in store._rs] == [104 + 11, 72 + 11]
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
    held = {b: kvc.testing.cache_bytes(_prefill(tiny_model, ids, MiKV(ratio=0.75, bits=b, high_bits=None)))
            for b in (2, 4, 8)}
    full = kvc.testing.cache_bytes(_prefill(tiny_model, ids, kvc.StreamingLLM(ratio=0.0, sinks=0)))
    assert full > held[8] > held[4] > held[2]
    # 1 row x 2 kv heads: codes of the 300 demoted slots, the 100 kept ones in fp32
    store = _prefill(tiny_model, ids, MiKV(ratio=0.75, bits=2, high_bits=None)).layers[0].store
    assert store.n_packed == 300 and store.r == 100
    assert store._kc.numel() == 2 * 300 * ops.packed_row_bytes(16, 2)
    assert store._rk.shape[2] == 100 and store._rk.dtype == torch.float32


# ---------------------------------------------------------------- the selected tokens at high_bits


def test_high_bits_options():
    assert MiKV(ratio=0.75, high_bits=None).quant == LowBits(bits=2, group=32)
    assert repr(LowBits(high_bits=4)) == "LowBits(bits=2, group=32, high_bits=4)"
    assert repr(MiKV(budget=64, high_bits=None)) == "MiKV(budget=64, bits=2, high_bits=None, group=32, recent=0.5)"
    assert MiKV(budget=64, bits=8).high_bits == 8  # everything at 8 bits is allowed
    assert ZipCache(ratio=0.5, high_bits=4).describe() == \
        "ZipCache(ratio=0.5, bits=2, high_bits=4, group=32, probe=0.1, window=8)"
    assert method_from_spec("zipcache:bits=2:high_bits=4", ratio=0.5) == ZipCache(ratio=0.5, high_bits=4)
    assert method_from_spec("snapkv+lowbits:high_bits=8", ratio=0.75) == SnapKV(ratio=0.75,
                                                                                 quant=LowBits(high_bits=8))
    for bad, match in ((3, "high_bits: must be None"), (2, "at least bits=4"), (True, "high_bits"),
                       (8.0, "high_bits")):
        with pytest.raises(ValueError, match=match):
            MiKV(ratio=0.5, bits=4, high_bits=bad)
    with pytest.raises(ValueError, match="at least bits=8"):
        ZipCache(ratio=0.5, bits=8, high_bits=4)


def _split_store(B, H, n, D, k, high_bits, seed=0, dtype=torch.float32):
    """A PackedStore.from_split over random keys/values: per row and head,
    `k` random selected slots at `high_bits`, the rest at 2 bits."""
    g = torch.Generator().manual_seed(seed)
    keys = (torch.randn(B, H, n, D, generator=g) * 2 + torch.randn(1, 1, 1, D, generator=g)).to(dtype)
    values = torch.randn(B, H, n, D, generator=g).to(dtype)
    perm = torch.stack([torch.stack([torch.randperm(n, generator=g) for _ in range(H)]) for _ in range(B)])
    full = perm[..., :k].sort(-1).values
    low = perm[..., k:].sort(-1).values
    return PackedStore.from_split(keys, values, full, low, 2, 16, high_bits=high_bits), keys, values, full, low


def test_high_part_holds_the_selected_slots_within_the_bound():
    store, keys, values, full, low = _split_store(2, 3, 150, 24, 37, 8)
    fp, *_ = _split_store(2, 3, 150, 24, 37, None)
    assert store.n_packed == 113 and store.n_high == 37 and store.r == 0 and store.n == 150
    # the low part is packed exactly as without high_bits
    for a, b in zip(store._packed_views(), fp._packed_views()):
        assert torch.equal(a, b)
    k_all, v_all = store.dequantized()
    for b in range(2):
        for h in range(3):
            ref = keys[b, h, full[b, h]]
            got = k_all[b, h, 113:]
            assert ((got.double() - ref.double()).abs() <= _group_bound(ref, 8, 16) * (1 + 1e-5) + 1e-6).all()
            vref = values[b, h, full[b, h]].double()
            err = (v_all[b, h, 113:].double() - vref).abs()
            for c in range(0, 24, 16):  # value groups of 16 channels per token, the last one short
                seg = vref[:, c:c + 16]
                bound = (seg.amax(1) - seg.amin(1)) / 255 / 2
                assert (err[:, c:c + 16] <= bound[:, None] * (1 + 1e-5) + 1e-6).all()
    assert "high_bits=8, high=37" in repr(store)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("nq", [1, 4])
def test_two_width_attention_matches_float64(dtype, nq):
    """Attention over low part, high part and residual (two kernel calls
    joined by lse) against float64 attention over the dequantized slots, in
    the logical order kv_start counts, with a masked prefix reaching into the
    high part."""
    from test_attention import _head_attention, assert_within_bound

    B, Hq, H, n, D, k = 4, 6, 3, 150, 24, 37
    store, *_ = _split_store(B, H, n, D, k, 8, seed=nq, dtype=dtype)
    g = torch.Generator().manual_seed(9)
    store.append(torch.randn(B, H, 5, D, generator=g).to(dtype), torch.randn(B, H, 5, D, generator=g).to(dtype), n)
    q = torch.randn(B, Hq, nq, D, generator=g).to(dtype)
    kv_start = torch.tensor([0, 50, 120, 152])  # none; inside the low part; into the high part; into the residual
    spec = AttentionSpec(scaling=0.3)
    got = store.attend(q, spec, kv_start=kv_start)
    keys, values = store.dequantized()
    ref = torch.zeros(B, nq, Hq, D, dtype=torch.float64)
    same = torch.zeros(B, nq, Hq, D, dtype=dtype)
    G = Hq // H
    for b in range(B):
        for h in range(H):
            for out, dt in ((ref, torch.float64), (same, dtype)):
                out[b, :, h * G:(h + 1) * G] = _head_attention(q[b, h * G:(h + 1) * G].to(dt), keys[b, h].to(dt),
                                                                values[b, h].to(dt), 0.3, int(kv_start[b]), None, dt)
    assert_within_bound(got, ref, same, f"{dtype} q={nq}")


def test_high_bits_generation_and_bytes(tiny_model):
    """Generation reads both widths; a left-padded row equals the row alone
    (with ratio= too, where the rows select different counts); the selected slots held at 8 bits cost
    exactly their packed bytes, less than in fp32."""
    a, b, batch, mask = left_padded_pair(tiny_model.config.vocab_size, 260, 180)

    def gen(ids, m, attn=None):
        return generate(tiny_model, ids, m, new=12, mask=attn)

    for cls in (MiKV, ZipCache):
        # ratio=: row b packs its own 72 selected slots at 8 bits and its other 108 at 4
        make = lambda: cls(ratio=0.6, bits=4, high_bits=8, group=16)  # noqa: E731
        got, cache = gen(batch, make(), mask)
        store = cache.layers[0].store
        assert store.high_bits == 8 and store._nh == [104, 72] and store._np == [156, 108] and store.r == 11
        assert cache.layers[0].kv_start.tolist() == [0, 80]
        assert torch.equal(got[0], gen(a, make())[0][0]) and torch.equal(got[1], gen(b, make())[0][0])
        # budget=: both rows select 64, so row b's groups (80 pads = 5 groups) are its groups alone
        make = lambda: cls(budget=64, bits=4, high_bits=8, group=16)  # noqa: E731
        got, cache = gen(batch, make(), mask)
        assert cache.layers[0].kv_start.tolist() == [0, 80] and cache.layers[0].store.n_high == 64
        assert torch.equal(got[0], gen(a, make())[0][0]) and torch.equal(got[1], gen(b, make())[0][0])
    ids = torch.randint(3, tiny_model.config.vocab_size, (1, 400), generator=torch.Generator().manual_seed(3))
    fp = _prefill(tiny_model, ids, MiKV(ratio=0.75, bits=2, high_bits=None))
    hb = _prefill(tiny_model, ids, MiKV(ratio=0.75, bits=2))  # high_bits=8 by default
    store = hb.layers[0].store
    assert store.n_high == 100 and store.n_packed == 300
    # 2 kv heads x 100 selected slots at 8 bits (D = 16): codes plus per-group fp32 mins/scales
    D = 16
    hi_bytes = 2 * (2 * 100 * ops.packed_row_bytes(D, 8) + 2 * 4 * -(-100 // 32) * D + 2 * 4 * 100 * -(-D // 32))
    assert sum(t.numel() * t.element_size() for t in store._hi) == hi_bytes
    assert kvc.testing.cache_bytes(hb) < kvc.testing.cache_bytes(fp)


@pytest.mark.parametrize("high_bits", [None, 8])
@pytest.mark.parametrize("rotated", [None, (True, False, True)])
def test_rows_split_apart_hold_and_read_what_each_row_does_alone(high_bits, rotated):
    """``PackedStore.from_split_rows``: rows with their own selected and
    low counts (a row left whole among them) hold, bit for bit, the codes,
    scales and residual slots of ``from_split`` of that row alone (a row
    left whole: every slot in full precision), and read the same attention
    over decode steps, a chunk and a beam reorder, within float rounding.
    The float64 attention over each row's dequantized slots bounds it."""
    from kvcompress.stores.rotation import key_rotation

    from test_attention import _head_attention

    H, Hq, D, G, n = 2, 4, 24, 8, 90
    g = torch.Generator().manual_seed(5)
    keys, values = torch.randn(3, H, n, D, generator=g), torch.randn(3, H, n, D, generator=g)
    starts, picks = [0, 29, 50], [30, 17, None]  # row 2 (40 real slots) is left whole
    rot = key_rotation(D, keys.device) if rotated else None
    full, low = [], []
    for b, (s, k) in enumerate(zip(starts, picks)):
        if k is None:
            full.append(torch.arange(s, n).expand(H, -1))
            low.append(None)
            continue
        perm = torch.stack([s + torch.randperm(n - s, generator=g) for _ in range(H)])
        full.append(perm[:, :k].sort(1).values)
        low.append(perm[:, k:].sort(1).values)
    store = PackedStore.from_split_rows(keys, values, full, low, [k is not None for k in picks], 2, G,
                                        high_bits=high_bits, rotation=rot, rotated=rotated)
    alone = []
    for b in range(3):
        if low[b] is None:
            one = PackedStore(2, G, 0)
            one.append(keys[b : b + 1, :, starts[b] :], values[b : b + 1, :, starts[b] :], 0)
            one.pack_decoded = False
        else:
            turn = rot if rotated is None or rotated[b] else None
            one = PackedStore.from_split(keys[b : b + 1], values[b : b + 1], full[b][None], low[b][None], 2, G,
                                         high_bits=high_bits, rotation=turn)
        alone.append(one)
    assert store._np == [60, 44, 0] and store._pads == [0, 29, 50]
    assert store._nh == ([30, 17, 0] if high_bits else None)
    for b, one in enumerate(alone):
        m = store._np[b]
        if m:
            for got, want, rows in zip(store._packed_views(), one._packed_views(), (m, -(-m // G), -(-m // G),
                                                                                   m, m, m)):
                assert torch.equal(got[b, :, :rows], want[0]), b
        if high_bits and store._nh[b]:
            h = store._nh[b]
            for got, want, rows in zip(store._hi, one._hi, (h, -(-h // G), -(-h // G), h, h, h)):
                assert torch.equal(got[b, :, :rows], want[0, :, :rows]), b
    step = torch.Generator().manual_seed(6)
    spec = AttentionSpec(scaling=0.3)
    for q in (1, 1, 3, 1):
        k_new, v_new = torch.randn(3, H, q, D, generator=step), torch.randn(3, H, q, D, generator=step)
        query = torch.randn(3, Hq, q, D, generator=step)
        store.append(k_new, v_new, n)
        kv_start = torch.tensor(store._pads)
        got = store.attend(query, spec, kv_start=kv_start)
        k_all, v_all = store.dequantized()
        for b, one in enumerate(alone):
            one.append(k_new[b : b + 1], v_new[b : b + 1], n)
            ka, va = one.dequantized()
            s = store._pads[b]
            assert torch.equal(k_all[b, :, s:], ka[0]) and torch.equal(v_all[b, :, s:], va[0]), b
            want = one.attend(query[b : b + 1], spec)
            assert (got[b] - want[0]).abs().max() < 1e-6, b
            ref = torch.cat([_head_attention(query[b, 2 * hk : 2 * hk + 2].double(), ka[0, hk].double(),
                                             va[0, hk].double(), 0.3, 0, None, torch.float64)
                             for hk in range(H)], 1)  # [q, Hq, D]
            assert (got[b].double() - ref).abs().max() < 1e-5, b
    # a beam reorder takes every row's counts with its buffers
    store.index_batch(torch.tensor([2, 0, 0]))
    assert store._np == [0, 60, 60] and store._pads == [50, 0, 0]
    assert "packed=[0, 60, 60]" in repr(store)
    k_all, _ = store.dequantized()
    assert torch.equal(k_all[1], k_all[2]) and torch.equal(k_all[0, :, 50:], alone[2].dequantized()[0][0])
    # a per-row list of another length is refused by name, before anything is built
    for name, args in (("full", (full[:2], low, [True] * 3)), ("low", (full, low + [None], [True] * 3)),
                       ("packs_full", (full, low, [True]))):
        with pytest.raises(ValueError, match=f"from_split_rows: {name}:"):
            PackedStore.from_split_rows(keys, values, *args, 2, G)
    with pytest.raises(ValueError, match="from_split_rows: rotated:"):
        PackedStore.from_split_rows(keys, values, full, low, [True] * 3, 2, G, rotation=rot, rotated=[True])


@pytest.fixture(scope="module")
def sliding_model():
    """A 2-layer Mistral whose every layer slides over 16 tokens."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1, sliding_window=16)
    return MistralForCausalLM(config).eval()


@pytest.mark.parametrize("make", [lambda **kw: MiKV(bits=2, group=4, **kw), lambda **kw: ZipCache(bits=2, group=4, **kw),
                                  lambda **kw: SnapKV(window=4, **kw) + LowBits(bits=2, group=4)],
                         ids=["MiKV", "ZipCache", "SnapKV+LowBits"])
@pytest.mark.parametrize("size, length", [(dict(ratio=0.5), 13), (dict(budget=10), 45)], ids=["ratio", "budget"])
def test_sliding_layers_keep_their_whole_window(sliding_model, make, size, length):
    """Mixed precision keeps what its evictor would drop and demotes nothing
    on a sliding layer, so such a layer keeps its whole window (window - 1
    slots, or the prompt when shorter) in full precision, whatever the target:
    on a model whose layers all slide, generation reads exactly what plain
    generate() reads. (Before, the evictor's target cut the window: logits
    2-4 apart.)"""
    ids = torch.randint(3, 300, (1, length), generator=torch.Generator().manual_seed(7))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
              output_logits=True)
    with torch.no_grad():
        ref = sliding_model.generate(input_ids=ids, **kw)
        with kvc.compress(sliding_model, make(**size)) as session:
            out = sliding_model.generate(input_ids=ids, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=0, atol=1e-4)
    for layer in session.cache.layers:
        assert not isinstance(layer.store, PackedStore)
        assert layer.n - layer._start[0] == min(layer.seen, 15)


def test_the_quantizer_is_the_methods_own():
    """MiKV and ZipCache pack with a LowBits built from their own bits, group,
    high_bits and rotate: another quant= is refused by name, the same one is
    accepted, dataclasses.replace rebuilds it, and describe() shows the
    evictor's settings that change what is kept."""
    import dataclasses

    with pytest.raises(ValueError, match="quant: MiKV packs what it demotes with LowBits"):
        MiKV(ratio=0.5, quant=kvc.KIVI(bits=4, group=8, residual=0))
    with pytest.raises(ValueError, match="quant: ZipCache"):
        ZipCache(ratio=0.5, bits=4, group=8, quant=LowBits(bits=2, group=8))
    assert MiKV(ratio=0.5, quant=LowBits(bits=2, group=32, high_bits=8)) == MiKV(ratio=0.5)
    four = dataclasses.replace(MiKV(ratio=0.5), bits=4, high_bits=None, group=8)
    assert four.quant == LowBits(bits=4, group=8) and four.packing == (4, 8, 0, 4)
    zip4 = dataclasses.replace(ZipCache(ratio=0.5, rotate=True), bits=4)
    assert zip4.quant == LowBits(bits=4, group=32, high_bits=8, rotate=True)
    assert MiKV(ratio=0.5, lookahead=True).describe().endswith("recent=0.5, lookahead=True)")
    assert ZipCache(ratio=0.5, lookahead=True).describe().endswith("window=8, lookahead=True)")
