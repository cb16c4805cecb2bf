"""AdaKV and per-head (ragged) storage on a tiny random Llama."""

import numpy as np
import pytest
import torch

import kvcompress as kvc
from kvcompress.compat import cache_kwargs
from kvcompress.methods import AdaKV, SnapKV

from model_refs import assert_topk_consistent, group_mean, layer_qkv, window_attention64

B_, WINDOW = 16, 4


def _batch(length=60, pad=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask


def _generate(model, method, ids, mask, n):
    with kvc.compress(model, method) as session:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out, session.cache


def _snapkv_scores64(q, k, kv_start):
    """SnapKV scores of one layer in float64: window attention, GQA mean, max-pool before the window."""
    hkv, T = k.shape[1], k.shape[2]
    s = group_mean(window_attention64(q[:, :, -WINDOW:], k, kv_start=kv_start), hkv)
    head = T - WINDOW
    pooled = torch.nn.functional.max_pool1d(s[..., :head].reshape(-1, 1, head), 7, 1, 3)
    s[..., :head] = pooled.view(s.shape[0], hkv, head)
    return s


def _adakv_budgets(scores, budget, alpha, floor, valid):
    """AdaKV allocation from the definition (NumPy, float64): layer-wide top
    H*B with forced slots first, shares mixed with the uniform one, largest
    remainder rounding (ties to the lower head)."""
    H, T = scores.shape
    ranked = np.where(valid, scores, -np.inf)
    ranked[:, T - floor:] = np.inf
    order = np.lexsort((np.tile(np.arange(T), H), np.repeat(np.arange(H), T), -ranked.reshape(-1)))
    top = order[: H * budget]
    n = np.bincount(top // T, minlength=H)
    target = (1 - alpha) * n + alpha * budget
    base = np.floor(target).astype(int)
    rest = H * budget - base.sum()
    frac = target - base
    for h in sorted(range(H), key=lambda h: (-frac[h], h))[:rest]:
        base[h] += 1
    return base


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5])
def test_adakv_keeps_per_head_top_slots_of_an_independent_reference(tiny_model, alpha):
    ids, mask = _batch(pad=0)  # (padding: test_left_padding_is_never_kept)
    method = AdaKV(budget=B_, window=WINDOW, alpha=alpha)
    with kvc.compress(tiny_model, method) as session:
        cache = session.new_cache()
        with torch.no_grad():
            tiny_model(ids, attention_mask=mask, **cache_kwargs(tiny_model, cache))
    pads = (mask == 0).sum(1)
    saw_unequal = False
    for li, (q, k, v) in enumerate(layer_qkv(tiny_model, ids, mask)):
        store = cache.layers[li].ragged
        assert store is not None
        s = _snapkv_scores64(q, k, pads)
        T = k.shape[2]
        for b in range(2):
            valid = np.arange(T) >= int(pads[b])
            ref_k = _adakv_budgets(s[b].numpy(), B_, alpha, WINDOW, valid)
            got = store.lengths.view(2, -1)[b].numpy()
            assert got.sum() == 2 * B_
            np.testing.assert_array_equal(got, ref_k)
            saw_unequal |= len(set(got.tolist())) > 1
            for h in range(k.shape[1]):
                hk, hv, pos = store.head(b, h)
                kept = pos.tolist()
                assert kept == sorted(kept) and min(kept) >= int(pads[b])
                assert_topk_consistent(kept, s[b, h], range(T - WINDOW, T), int(got[h]),
                                       eps=1e-5 * float(s[b, h].abs().max()))
                torch.testing.assert_close(hk.double(), k[b, h, kept], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(hv.double(), v[b, h, kept], rtol=1e-5, atol=1e-5)
    if alpha < 0.5:
        assert saw_unequal, "heads should get different budgets"


def test_bytes_held_are_the_per_head_slots(tiny_model):
    ids, mask = _batch()
    with kvc.compress(tiny_model, AdaKV(budget=B_, window=WINDOW)) as session:
        cache = session.new_cache()
        with torch.no_grad():
            tiny_model(ids, attention_mask=mask, **cache_kwargs(tiny_model, cache))
    cfg = tiny_model.config
    D = cfg.head_dim
    expected = 0
    for layer in cache.layers:
        n = sum(layer.head_lengths())
        assert n == 2 * cfg.num_key_value_heads * B_
        # keys + values (fp32), int32 positions, int64 offsets/lengths/capacities, int64 kv_start,
        # int64 per-head decode budgets, and the fp32 queries of the last
        # min(window, interval) tokens held for the decode-time re-selection
        expected += n * 2 * D * 4 + n * 4 + 3 * 8 * 2 * cfg.num_key_value_heads + 8 * 2
        expected += 8 * 2 * cfg.num_key_value_heads + 4 * 2 * cfg.num_attention_heads * WINDOW * D
        expected += 8 * 2 * cfg.num_key_value_heads  # each head's float64 share of the decode budget (host)
        # host mirrors: the per-head budgets (int64) and the store's lengths and capacities (int64 each)
        expected += 8 * 2 * cfg.num_key_value_heads + 2 * 8 * 2 * cfg.num_key_value_heads
    assert cache.memory_bytes() == expected
    assert sum(t.nbytes for layer in cache.layers for t in layer.tensors()) == expected


def test_alpha_one_equals_snapkv_through_ragged_storage(tiny_model):
    """Equal budgets: same slots as SnapKV, now in per-head buffers read by the
    C kernel, across 40 decode steps (several capacity growths)."""
    ids, mask = _batch()
    ada, cache = _generate(tiny_model, AdaKV(budget=B_, window=WINDOW, alpha=1.0), ids, mask, 40)
    snap, _ = _generate(tiny_model, SnapKV(budget=B_, window=WINDOW, kernel=AdaKV.kernel), ids, mask, 40)
    assert torch.equal(ada.sequences, snap.sequences)
    for a, s in zip(ada.logits, snap.logits):
        torch.testing.assert_close(a, s, rtol=1e-4, atol=1e-4)
    layer = cache.layers[0]
    # 39 decode steps with interval 16: re-selected to B_ twice, then 7 appended
    assert layer.ragged is not None and layer.head_lengths() == [B_ + 39 % 16] * 4
    assert layer.seen == 60 + 39
    _, _, pos = layer.ragged.head(1, 0)
    assert pos[-(39 % 16 + WINDOW):].tolist() == list(range(99 - 39 % 16 - WINDOW, 99))


def test_ragged_decode_matches_float64_attention_over_the_kept_slots(tiny_model):
    """One decode step on a ragged layer: the layer's output equals float64
    attention over exactly the slots each head holds."""
    ids, mask = _batch()
    method = AdaKV(budget=B_, window=WINDOW)
    with kvc.compress(tiny_model, method) as session:
        cache = session.new_cache()
        with torch.no_grad():
            out = tiny_model(ids, attention_mask=mask, **cache_kwargs(tiny_model, cache))
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            attn = tiny_model.model.layers[0].self_attn
            seen = {}
            hook = attn.register_forward_hook(lambda m, a, kw, o: seen.update(out=o[0]), with_kwargs=True)
            captured = {}
            real = kvc.ops.attention

            def spy(query, keys, values, **kw):
                captured.setdefault("q", query.clone())
                return real(query, keys, values, **kw)

            from kvcompress.stores import ragged
            ragged.ops.attention, saved = spy, ragged.ops.attention
            try:
                tiny_model(nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1), **cache_kwargs(tiny_model, cache))
            finally:
                ragged.ops.attention = saved
                hook.remove()
    q = captured["q"].double()  # [B, Hq, 1, D], post-RoPE
    store = cache.layers[0].ragged
    Hq, Hkv = q.shape[1], store.heads
    ref = torch.zeros(2, 1, Hq, q.shape[3], dtype=torch.float64)
    for b in range(2):
        for h in range(Hq):
            hk, hv, _ = store.head(b, h // (Hq // Hkv))
            w = torch.softmax((hk.double() @ q[b, h, 0]) * attn.scaling, 0)
            ref[b, 0, h] = w @ hv.double()
    o = seen["out"].double()  # the attention module's output, after o_proj
    expected = ref.reshape(2, 1, -1) @ attn.o_proj.weight.double().T
    torch.testing.assert_close(o, expected, rtol=1e-5, atol=1e-5)


def test_left_padding_is_never_kept(tiny_model):
    ids, mask = _batch(pad=9)
    _, cache = _generate(tiny_model, AdaKV(budget=B_, window=WINDOW, alpha=0.0), ids, mask, 3)
    for layer in cache.layers:
        assert sum(layer.head_lengths()[2:]) == 2 * (B_ + 2)  # row 1 still keeps 2 * B_ real slots
        for h in range(layer.ragged.heads):
            assert int(layer.ragged.head(1, h)[2].min()) >= 9


def test_ragged_layer_reorders_its_batch_rows(tiny_model):
    """Beam search reorders per-head storage: row i of the result holds
    exactly the heads (slots, positions) of row idx[i] before."""
    ids, mask = _batch()
    _, cache = _generate(tiny_model, AdaKV(budget=B_, window=WINDOW, alpha=0.0), ids, mask, 2)
    layer = cache.layers[0]
    H = layer.ragged.heads
    before = {(b, h): [t.clone() for t in layer.ragged.head(b, h)] for b in range(2) for h in range(H)}
    lengths = layer.head_lengths()
    layer.reorder_cache(torch.tensor([1, 0, 1]))
    assert layer.ragged.batch == 3
    assert layer.head_lengths() == lengths[H:] + lengths[:H] + lengths[H:]
    for new, old in enumerate([1, 0, 1]):
        for h in range(H):
            for got, want in zip(layer.ragged.head(new, h), before[(old, h)]):
                assert torch.equal(got, want)
    assert layer.head_budgets.shape == (3, H)
    # decoding continues on the reordered store
    layer.update(torch.randn(3, H, 1, 16), torch.randn(3, H, 1, 16))
    assert layer.head_lengths() == [n + 1 for n in lengths[H:] + lengths[:H] + lengths[H:]]


def test_adakv_arguments():
    with pytest.raises(ValueError, match="alpha"):
        AdaKV(budget=8, alpha=1.5)
    with pytest.raises(TypeError, match="alpha"):
        AdaKV(budget=8, alpha="x")
    assert "alpha=0.2" in AdaKV(ratio=0.5).describe()
