"""MiniCache: the SLERP merge and the reconstruction against float64
references (fp32/fp16/bf16 storage), the t and retention edge cases, bad
arguments refused by name, the merged pair's bytes against the formula, the
pairing rule, and generate(): full retention is plain generate()."""

from __future__ import annotations

import math

import pytest
import torch

import kvcompress as kvc
from kvcompress import KVCompressError, KVCompressValueError, ops
from kvcompress.cache import KVCache
from kvcompress.compat import cache_kwargs
from kvcompress.methods import MiniCache, method_from_spec
from kvcompress.stores import MergedPair, MiniCacheStore
from test_ops import DTYPE_IDS, DTYPES, assert_within_bound, make
from test_quest import _batch, _generate


def slerp_ref(x1, x2, t):
    """float64: the shared direction, the norms and Omega / pi, by the
    definition (acos of the cosine; the C op's atan2 form is the same angle)."""
    a, b = x1.double(), x2.double()
    n1, n2 = a.norm(dim=-1), b.norm(dim=-1)
    u1 = torch.where(n1[..., None] > 0, a / n1.clamp_min(1e-300)[..., None], torch.zeros_like(a))
    u2 = torch.where(n2[..., None] > 0, b / n2.clamp_min(1e-300)[..., None], torch.zeros_like(b))
    omega = torch.acos((u1 * u2).sum(-1).clamp(-1, 1))
    s = torch.sin(omega)
    if t == 0:
        e = u1.clone()
    elif t == 1:
        e = u2.clone()
    else:
        e = (torch.sin((1 - t) * omega) / s)[..., None] * u1 + (torch.sin(t * omega) / s)[..., None] * u2
    return e, torch.stack([n1, n2], -1), omega / math.pi


@pytest.mark.parametrize("t", [0.0, 0.3, 0.6, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["contig", "strided"])
def test_slerp_merge_matches_float64(dtype, t, layout):
    x1 = make((2, 3, 37, 64), dtype, layout, seed=1)
    # layer l resembles layer l-1 (the case MiniCache is for), plus noise
    x2 = (x1.float() * 1.7 + 0.6 * make((2, 3, 37, 64), torch.float32, "contig", seed=2)).to(dtype)
    got = ops.slerp_merge(x1, x2, t)
    e, norms, dist = slerp_ref(x1, x2, t)
    assert got.dir.dtype == dtype and got.norms.dtype == got.dist.dtype == torch.float32
    # the direction: at most 2x the error of rounding the exact result to the dtype
    assert_within_bound(got.dir, e, e.to(dtype), "dir")
    torch.testing.assert_close(got.norms.double(), norms, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(got.dist.double(), dist, rtol=0, atol=2e-6)
    # the merged direction is a unit vector
    torch.testing.assert_close(got.dir.double().norm(dim=-1), torch.ones_like(dist),
                               rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_restore_matches_float64_and_copies_retained_rows(dtype):
    x1 = make((2, 2, 20, 32), dtype, seed=3)
    x2 = make((2, 2, 20, 32), dtype, seed=4)
    m = ops.slerp_merge(x1, x2, 0.6)
    slots = torch.stack([torch.randperm(26, generator=torch.Generator().manual_seed(i))[:20]
                         for i in range(4)]).view(2, 2, 20)
    rest = torch.tensor([[i for i in range(26) if i not in set(s.tolist())] for s in slots.view(4, 20)]).view(2, 2, 6)
    kept = make((2, 2, 6, 32), dtype, seed=5)
    for which in (0, 1):
        out = torch.full((2, 2, 28, 32), 7.0, dtype=dtype)
        ops.slerp_restore(m.dir, m.norms, slots.to(torch.int32), which, out, kept=kept, kept_slots=rest)
        ref = m.norms[..., which, None].double() * m.dir.double()
        got = out.gather(2, slots[..., None].expand(-1, -1, -1, 32))
        assert_within_bound(got, ref, ref.to(dtype), f"layer {which}")
        assert torch.equal(out.gather(2, rest[..., None].expand(-1, -1, -1, 32)), kept)
        assert bool((out[:, :, 26:] == 7).all())  # rows named by neither stay as they were


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_t0_and_t1_reproduce_their_layer(dtype):
    """t=0: the direction is layer l-1's own, bit for bit, so layer l-1 reads
    |x1| * x1/|x1| (its vectors to two roundings) and layer l its norm along
    l-1's direction; t=1 mirrors it."""
    x1, x2 = make((1, 2, 16, 64), dtype, seed=6), make((1, 2, 16, 64), dtype, seed=7)
    slots = torch.arange(16).expand(1, 2, 16)
    tol = 1e-6 if dtype == torch.float32 else (2e-3 if dtype == torch.float16 else 1.6e-2)
    for t, which, x, other in ((0.0, 0, x1, x2), (1.0, 1, x2, x1)):
        m = ops.slerp_merge(x1, x2, t)
        # the direction is x's alone: the other layer does not change a bit of it
        noise = make((1, 2, 16, 64), dtype, seed=8)
        assert torch.equal(m.dir, ops.slerp_merge(x1 if t == 0 else noise, noise if t == 0 else x2, t).dir)
        u = x.double() / x.double().norm(dim=-1, keepdim=True)
        assert_within_bound(m.dir, u, u.to(dtype), "unit")
        out = torch.empty_like(x)
        ops.slerp_restore(m.dir, m.norms, slots, which, out)
        rel = ((out.double() - x.double()).norm(dim=-1) / x.double().norm(dim=-1)).max()
        assert rel < tol
        # the other layer keeps its magnitude along the shared direction
        ops.slerp_restore(m.dir, m.norms, slots, 1 - which, out)
        torch.testing.assert_close(out.double().norm(dim=-1), other.double().norm(dim=-1), rtol=2 * tol, atol=0)


def test_degenerate_pairs():
    D = 8
    x = torch.randn(1, 1, 1, D)
    zero = torch.zeros(1, 1, 1, D)
    # identical vectors: distance 0 and the shared direction is theirs
    m = ops.slerp_merge(x, x, 0.6)
    assert float(m.dist) == 0.0
    torch.testing.assert_close(m.dir, x / x.norm(), rtol=0, atol=1e-6)
    # parallel with different norms: same direction, each layer its own norm
    m = ops.slerp_merge(x, 3 * x, 0.6)
    torch.testing.assert_close(m.norms[0, 0, 0], torch.tensor([1.0, 3.0]) * x.norm(), rtol=1e-6, atol=0)
    # antipodal: distance 1, a unit direction (an endpoint's), nothing NaN
    for t in (0.3, 0.5, 0.7):
        m = ops.slerp_merge(x, -x, t)
        assert abs(float(m.dist) - 1.0) < 1e-6
        assert torch.isfinite(m.dir).all() and abs(float(m.dir.norm()) - 1) < 1e-5
    # a zero vector takes the other's direction (its own reconstruction is 0)
    m = ops.slerp_merge(zero, x, 0.6)
    assert float(m.dist) == 0.0 and float(m.norms[0, 0, 0, 0]) == 0.0
    torch.testing.assert_close(m.dir, x / x.norm(), rtol=0, atol=1e-6)
    out = torch.ones(1, 1, 1, D)
    ops.slerp_restore(m.dir, m.norms, torch.zeros(1, 1, 1, dtype=torch.int64), 0, out)
    assert torch.equal(out, zero)
    m = ops.slerp_merge(zero, zero, 0.6)
    assert torch.equal(m.dir, zero) and float(m.dist) == 0.0
    # tiny angles: the SLERP weights stay finite and the result is the common direction
    y = x + 1e-7 * torch.randn(1, 1, 1, D)
    m = ops.slerp_merge(x, y, 0.6)
    assert torch.isfinite(m.dir).all() and float(m.dist) < 1e-5
    # empty problems
    e = torch.zeros(2, 0, 3, D)
    assert ops.slerp_merge(e, e, 0.5).dir.shape == e.shape


def test_threads_give_identical_bits():
    x1, x2 = make((3, 4, 33, 48), seed=8), make((3, 4, 33, 48), seed=9)
    prev = ops.get_num_threads()
    try:
        ops.set_num_threads(1)
        a = ops.slerp_merge(x1, x2, 0.6)
        ops.set_num_threads(2)
        b = ops.slerp_merge(x1, x2, 0.6)
    finally:
        ops.set_num_threads(prev)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_bad_arguments_are_refused_by_name():
    x = torch.randn(1, 2, 4, 8)
    with pytest.raises(KVCompressValueError, match="t"):
        ops.slerp_merge(x, x, 1.5)
    with pytest.raises(KVCompressValueError, match="t"):
        ops.slerp_merge(x, x, float("nan"))
    with pytest.raises(TypeError, match="x2"):
        ops.slerp_merge(x, x.half(), 0.5)
    with pytest.raises(KVCompressValueError, match="x2"):
        ops.slerp_merge(x, x[:, :, :3], 0.5)
    m = ops.slerp_merge(x, x, 0.5)
    slots = torch.arange(4).expand(1, 2, 4)
    out = torch.zeros(1, 2, 4, 8)
    with pytest.raises(KVCompressValueError, match="slots: value 4"):
        ops.slerp_restore(m.dir, m.norms, slots + 1, 0, out)
    with pytest.raises(KVCompressValueError, match="slots: value -2"):
        ops.slerp_restore(m.dir, m.norms, slots - 2, 0, out)
    with pytest.raises(KVCompressValueError, match="norms"):
        ops.slerp_restore(m.dir, torch.zeros(1, 2, 4, 3), slots, 0, out)
    with pytest.raises(KVCompressValueError, match="which"):
        ops.slerp_restore(m.dir, m.norms, slots, 2, out)
    with pytest.raises(KVCompressValueError, match="kept"):
        ops.slerp_restore(m.dir, m.norms, slots, 0, out, kept=x)
    with pytest.raises(KVCompressValueError, match="kept_slots: value 9"):
        ops.slerp_restore(m.dir, m.norms, slots, 0, out, kept=x[:, :, :1], kept_slots=torch.full((1, 2, 1), 9))
    with pytest.raises(TypeError, match="out"):
        ops.slerp_restore(m.dir, m.norms, slots, 0, out.half())
    with pytest.raises(KVCompressValueError, match="out"):
        ops.slerp_restore(m.dir, m.norms, slots, 0, m.dir)  # writes over an input


# ---------------------------------------------------------------- the merged pair

def _pair_inputs(dtype=torch.float32, B=2, H=2, n=40, D=16):
    k1, v1 = make((B, H, n, D), dtype, seed=10), make((B, H, n, D), dtype, seed=11)
    k2 = (k1.float() + 0.3 * make((B, H, n, D), seed=12)).to(dtype)
    v2 = (v1.float() + 0.3 * make((B, H, n, D), seed=13)).to(dtype)
    return k1, v1, k2, v2


def _merge(k1, v1, k2, v2, start=None, t=0.6, retain=0.1, pos1=None, pos2=None):
    """A MergedPair of two layers holding tokens at ``pos1`` / ``pos2`` (default: every token)."""
    B, H = k1.shape[:2]
    arange = lambda k: torch.arange(int(k.shape[2]), dtype=torch.int32).expand(B, H, -1)  # noqa: E731
    st = [0] * B if start is None else list(start)
    return MergedPair.merge([(k1, v1, arange(k1) if pos1 is None else pos1, st),
                             (k2, v2, arange(k2) if pos2 is None else pos2, st)], t, retain)


def _whole_slots(pair, which, b, h):
    return {int(x) for x in pair.whole[which][2][b, h] if x >= 0}


def test_pair_retains_the_most_distant_tokens_and_reconstructs():
    k1, v1, k2, v2 = _pair_inputs()
    k2[0, 1, 7] = -k1[0, 1, 7]  # antipodal key: the most distant token of that head
    start = [0, 10]
    pair = _merge(k1, v1, k2, v2, start)
    # 10% of each row's real tokens (40 and 30), rounded up
    assert pair.retained.tolist() == [[4, 4], [3, 3]]
    dist = torch.maximum(ops.slerp_merge(k1, k2, 0.6).dist, ops.slerp_merge(v1, v2, 0.6).dist)
    for b in range(2):
        for h in range(2):
            real = dist[b, h, start[b]:]
            top = set((real.topk(int(pair.retained[b, h])).indices + start[b]).tolist())
            assert _whole_slots(pair, 0, b, h) == _whole_slots(pair, 1, b, h) == top
            merged = {int(x) for x in pair.slots[0][b, h] if x >= 0}
            assert merged == set(range(start[b], 40)) - top and pair.slots[0][b, h].tolist() == \
                pair.slots[1][b, h].tolist()
    assert 7 in _whole_slots(pair, 0, 0, 1)
    tail = kvc.stores.UniformStore()
    for which, (k, v) in enumerate(((k1, v1), (k2, v2))):
        rk, rv = pair.restore(which, tail)
        for b in range(2):
            for h in range(2):
                idx = sorted(_whole_slots(pair, which, b, h))
                assert torch.equal(rk[b, h, idx], k[b, h, idx]) and torch.equal(rv[b, h, idx], v[b, h, idx])
        # merged tokens keep their norm (to float rounding); padding slots are zero
        torch.testing.assert_close(rk[0].norm(dim=-1), k[0].norm(dim=-1), rtol=1e-5, atol=0)
        torch.testing.assert_close(rk[1, :, 10:].norm(dim=-1), k[1, :, 10:].norm(dim=-1), rtol=1e-5, atol=0)
        assert not rk[1, :, :10].any() and not rv[1, :, :10].any()


def test_full_retention_and_t0_reproduce_each_layer():
    k1, v1, k2, v2 = _pair_inputs(n=12)
    tail = kvc.stores.UniformStore()
    pair = _merge(k1, v1, k2, v2, retain=1.0)
    assert bool((pair.retained == 12).all()) and pair.dir_k.shape[2] == 0
    assert all(torch.equal(a, b) for a, b in zip(pair.restore(0, tail), (k1, v1)))
    assert all(torch.equal(a, b) for a, b in zip(pair.restore(1, tail), (k2, v2)))
    pair = _merge(k1, v1, k2, v2, t=0.0, retain=0.0)
    assert not pair.retained.any() and pair.whole[0][0].shape[2] == 0
    for got, want in zip(pair.restore(0, tail), (k1, v1)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    pair = _merge(k1, v1, k2, v2, t=1.0, retain=0.0)
    for got, want in zip(pair.restore(1, tail), (k2, v2)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_layers_holding_different_tokens_merge_what_both_hold():
    """Composed with an evictor each layer holds its own tokens: the tokens
    both hold are merged (each layer's slot of them recorded), the others
    stay whole in the layer that holds them; a masked prefix of filler slots
    is left out (zero in the view)."""
    B, H, D = 1, 2, 16
    k1, v1 = make((B, H, 6, D), seed=20), make((B, H, 6, D), seed=21)
    k2, v2 = make((B, H, 5, D), seed=22), make((B, H, 5, D), seed=23)
    pos1 = torch.tensor([[0, 2, 3, 5, 8, 9], [0, 1, 2, 3, 4, 9]], dtype=torch.int32)[None]
    pos2 = torch.tensor([[0, 3, 4, 8, 9], [0, 1, 5, 6, 9]], dtype=torch.int32)[None]
    pair = MergedPair.merge([(k1, v1, pos1, [1]), (k2, v2, pos2, [0])], 0.5, 0.0)
    # head 0 shares tokens 3, 8, 9 (token 0 is filler in layer l-1); head 1 shares 1, 9
    assert [[int(x) for x in pair.slots[w][0, h] if x >= 0] for w in (0, 1) for h in (0, 1)] == \
        [[2, 4, 5], [1, 5], [1, 3, 4], [1, 4]]
    assert [sorted(_whole_slots(pair, w, 0, h)) for w in (0, 1) for h in (0, 1)] == \
        [[1, 3], [2, 3, 4], [0, 2], [0, 2, 3]]
    tail = kvc.stores.UniformStore()
    rk1, _ = pair.restore(0, tail)
    rk2, _ = pair.restore(1, tail)
    assert not rk1[0, :, 0].any()  # the filler slot
    m = ops.slerp_merge(k1[0, 0, [2, 4, 5]][None, None], k2[0, 0, [1, 3, 4]][None, None], 0.5)
    torch.testing.assert_close(rk1[0, 0, [2, 4, 5]], (m.norms[..., 0, None] * m.dir)[0, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(rk2[0, 0, [1, 3, 4]], (m.norms[..., 1, None] * m.dir)[0, 0], rtol=0, atol=1e-6)
    assert torch.equal(rk1[0, 1, [2, 3, 4]], k1[0, 1, [2, 3, 4]]) and torch.equal(rk2[0, 1, [0, 2, 3]],
                                                                                   k2[0, 1, [0, 2, 3]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_pair_bytes_match_the_formula(dtype):
    B, H, n, D = 2, 2, 40, 16
    k1, v1, k2, v2 = _pair_inputs(dtype, B, H, n, D)
    pair = _merge(k1, v1, k2, v2)
    r, m = 4, n - 4
    es = torch.finfo(dtype).bits // 8
    # per merged token and head: a key and a value direction, 4 float32 norms, an int32 slot per layer;
    # per retained token and head: key and value in each layer, an int32 slot per layer
    want = B * H * (m * (2 * D * es + 4 * 4 + 2 * 4) + r * (2 * 2 * D * es + 2 * 4))
    want += B * H * 8  # the retained count of each head (int64, the merge's bookkeeping)
    assert sum(t.numel() * t.element_size() for t in pair.tensors()) == want
    s0, s1 = MiniCacheStore(pair, 0), MiniCacheStore(pair, 1)
    ptrs = lambda s: {t.untyped_storage().data_ptr() for t in s.tensors()}  # noqa: E731
    assert ptrs(s0) == ptrs(s1)  # one pair, referenced by both layers


# ---------------------------------------------------------------- the method

def test_options_registry_and_refused_compositions():
    m = method_from_spec("minicache:t=0.6:retain=0.05")
    assert isinstance(m, MiniCache) and (m.t, m.retain, m.start_layer) == (0.6, 0.05, None)
    assert method_from_spec("minicache:start_layer=1:t=0").start_layer == 1
    assert repr(MiniCache(start_layer=2)) == "MiniCache(start_layer=2, t=0.6, retain=0.05)"
    assert "minicache" in kvc.methods.REGISTRY and kvc.MiniCache is MiniCache
    assert "minicache" not in kvc.methods.EVICTING
    for bad in (dict(t=1.5), dict(t=float("nan")), dict(retain=-0.1), dict(retain=2), dict(start_layer=-1)):
        with pytest.raises(ValueError):
            MiniCache(**bad)
    with pytest.raises(TypeError):
        MiniCache(t="x")
    with pytest.raises(ValueError, match="merges adjacent layers"):
        MiniCache(budget=64)
    with pytest.raises(TypeError, match="does not compose with sparse readers"):
        MiniCache() + kvc.Quest(token_budget=64)
    with pytest.raises(ValueError, match="sparse readers"):
        method_from_spec("minicache+quest")
    with pytest.raises(ValueError, match="sparse"):
        MiniCache(sparse=kvc.Quest(token_budget=64))


def test_pairs_from_the_middle():
    m = MiniCache()
    assert [m.partner(i, 8) for i in range(8)] == [None, None, None, None, None, 4, None, 6]
    assert [m.partner(i, 7) for i in range(7)] == [None, None, None, None, 3, None, 5]
    # an odd last layer stays alone
    assert [MiniCache(start_layer=3).partner(i, 8) for i in range(8)] == [None] * 4 + [3, None, 5, None]
    m = MiniCache(start_layer=0)
    assert [m.partner(i, 5) for i in range(5)] == [None, 0, None, 2, None]


def test_full_retention_reproduces_generate_with_left_padding(tiny_model):
    ids, mask = _batch(21)
    method = MiniCache(start_layer=0, retain=1.0)
    cache = KVCache(method, num_layers=4)
    assert torch.equal(_generate(tiny_model, ids, mask, method, cache), _generate(tiny_model, ids, mask))
    assert [layer.store.kind for layer in cache.layers] == ["minicache"] * 4
    assert cache.layers[0].store.pair is cache.layers[1].store.pair
    assert cache.layers[2].store.pair is cache.layers[3].store.pair


def test_default_merges_the_second_half_and_counts_bytes_once(tiny_model):
    ids, mask = _batch(22)
    method = MiniCache()
    cache = KVCache(method, num_layers=4)
    out = _generate(tiny_model, ids, mask, method, cache, new=6)
    assert out.shape == (2, 266)
    assert [layer.store.kind for layer in cache.layers] == ["uniform", "uniform", "minicache", "minicache"]
    a, b = cache.layers[2].store, cache.layers[3].store
    # prefill (260 slots, 215 real in row 1) merged; 5 decoded tokens in each layer's own tail
    assert a.pair.n == [260, 260] and a.tail.n == b.tail.n == 5 and a.n == b.n == 265
    assert a.pair.retained.tolist() == [[math.ceil(0.05 * 260)] * 2, [math.ceil(0.05 * 215)] * 2]
    stats = cache.stats()
    assert stats.total_bytes == cache.memory_bytes()
    pair_bytes = sum(t.numel() * t.element_size() for t in a.pair.tensors())
    assert stats.layers[2].bytes >= pair_bytes and stats.layers[3].bytes < pair_bytes
    assert stats.total_bytes < stats.full_bytes


def test_beam_search_reorders_a_shared_pair_once(tiny_model):
    ids, mask = _batch(23)
    kw = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, num_beams=2)
    ref = tiny_model.generate(ids, **kw)
    with kvc.compress(tiny_model, MiniCache(start_layer=0, retain=1.0)):
        out = tiny_model.generate(ids, **kw)
    assert torch.equal(out, ref)


def test_other_attention_functions_are_refused(tiny_model):
    ids, mask = _batch(24)
    cache = KVCache(MiniCache(), num_layers=4)
    with pytest.raises(KVCompressError, match="MiniCache"):
        tiny_model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
                            **cache_kwargs(tiny_model, cache))


def test_eval_runs_minicache_once_beside_an_evictor(tiny_lm, tmp_path):
    """`kvcompress eval --methods minicache,...`: MiniCache takes no budget, so
    it is one row, with its bytes below the full cache's."""
    import json

    from kvcompress import cli

    _, _, folder = tiny_lm
    out = tmp_path / "mc"
    args = ["eval", "--model", str(folder), "--methods", "minicache:start_layer=0:retain=0.1,knorm", "--budgets",
            "24", "--tasks", "passkey,fidelity", "--lengths", "60", "--depths", "0.5", "--fidelity-texts", "2",
            "--no-progress", "--out", str(out)]
    assert cli.main(args) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    mc = [r for r in rows if r["method"].startswith("minicache")]
    assert len(mc) == 1 and mc[0]["cache_bytes"] < rows[0]["cache_bytes"]


def test_a_second_turn_goes_to_the_tails_unmerged(tiny_model):
    """Multi-turn: the pair is merged once (the first prefill); the second
    turn's chunk attends causally over the reconstructed pair plus the tail."""
    g = torch.Generator().manual_seed(25)
    first = torch.randint(5, 500, (1, 40), generator=g)
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    for retain in (1.0, 0.05):
        with kvc.compress(tiny_model, MiniCache(start_layer=0, retain=retain)) as session:
            out1 = tiny_model.generate(first, attention_mask=torch.ones_like(first), **kw)
            cache = session.cache
            second = torch.cat([out1, torch.randint(5, 500, (1, 9), generator=g)], dim=1)
            out2 = tiny_model.generate(second, attention_mask=torch.ones_like(second), **kw,
                                       **cache_kwargs(tiny_model, cache))
        store = cache.layers[1].store
        assert store.pair.n == [40, 40] and store.tail.n == second.shape[1] - 40 + 3 and cache.get_seq_length() == second.shape[1] + 3
        if retain == 1.0:
            assert torch.equal(out2, tiny_model.generate(second, attention_mask=torch.ones_like(second), **kw))


# ---------------------------------------------------------------- composed with an evictor

def test_composition_spellings():
    m = kvc.SnapKV(ratio=0.5) + MiniCache(t=0.5)
    assert m.depth == MiniCache(t=0.5) and m.cross_layer is m.depth
    assert m.describe().startswith("SnapKV(ratio=0.5") and m.describe().endswith(" + MiniCache(t=0.5, retain=0.05)")
    assert method_from_spec("snapkv:window=8+minicache:retain=0.1", budget=64).depth.retain == 0.1
    assert kvc.SnapKV(budget=64, depth=MiniCache()).cross_layer is not None
    assert (kvc.EMS(ratio=0.5) + MiniCache()).cross_layer == MiniCache()
    for bad in (lambda: kvc.SnapKV(ratio=0.5) + kvc.KIVI(bits=4) + MiniCache(),
                lambda: kvc.SnapKV(ratio=0.5, depth=kvc.KIVI(bits=4))):
        with pytest.raises((TypeError, ValueError)):
            bad()
    with pytest.raises(TypeError, match="sparse reader"):
        kvc.SnapKV(ratio=0.5) + MiniCache() + kvc.Quest(token_budget=64)
    with pytest.raises(ValueError, match="already merges"):
        kvc.SnapKV(ratio=0.5) + MiniCache() + MiniCache()


def test_evictor_with_full_retention_is_the_evictor(tiny_model):
    """SnapKV + MiniCache(retain=1): every token either layer keeps stays
    whole, so each layer reads exactly what SnapKV kept (left padding, fewer
    new tokens than the decode interval)."""
    ids, mask = _batch(26)
    snap = lambda: kvc.SnapKV(budget=64, window=8)  # noqa: E731
    method = snap() + MiniCache(start_layer=0, retain=1.0)
    cache = KVCache(method, num_layers=4)
    assert torch.equal(_generate(tiny_model, ids, mask, method, cache), _generate(tiny_model, ids, mask, snap()))
    assert [layer.store.kind for layer in cache.layers] == ["minicache"] * 4
    assert all(layer.n == 64 + 9 for layer in cache.layers)


def test_evictor_then_merge_keeps_what_only_one_layer_kept_whole(tiny_model):
    ids, mask = _batch(27)
    method = kvc.SnapKV(budget=64, window=8) + MiniCache(start_layer=0, retain=0.05)
    cache = KVCache(method, num_layers=4)
    _generate(tiny_model, ids, mask, method, cache, new=4)
    assert cache.stats().total_bytes == cache.memory_bytes()
    for a in (0, 2):
        la, lb = cache.layers[a], cache.layers[a + 1]
        pair = la.store.pair
        # the tokens both layers kept were merged; what only one kept is whole in it
        assert pair.dir_k.shape[2] > 0 and pair.whole[0][0].shape[2] > 0
        assert la.n == lb.n == 64 + 3
        for b in range(2):
            for h in range(2):
                merged = int((pair.slots[0][b, h] >= 0).sum())
                for w in (0, 1):
                    # each of the 64 slots SnapKV kept (both rows are compressed) is in the view once
                    slots = pair.slots[w][b, h].tolist() + pair.whole[w][2][b, h].tolist()
                    assert sorted(x for x in slots if x >= 0) == list(range(64)) and merged <= 64


def test_a_recent_window_evictor_merges_everything_and_saves_bytes(tiny_model):
    """StreamingLLM keeps the same positions in every layer: everything both
    layers keep is shared, so the pair holds fewer bytes than the two layers."""
    ids, mask = _batch(28)
    sizes = {}
    for name, method in (("stream", kvc.StreamingLLM(budget=128)),
                         ("both", kvc.StreamingLLM(budget=128) + MiniCache(start_layer=0, retain=0.05))):
        cache = KVCache(method, num_layers=4)
        _generate(tiny_model, ids, mask, method, cache, new=4)
        sizes[name] = cache.memory_bytes()
    pair = cache.layers[0].store.pair
    assert pair.dir_k.shape[2] == 128 - math.ceil(0.05 * 128) and pair.whole[0][0].shape[2] == math.ceil(0.05 * 128)
    assert sizes["both"] < 0.85 * sizes["stream"]


def test_fanout_prefill_merges_the_pairs_of_its_children(tiny_lm):
    """The evaluation's one-prefill-many-caches path merges pairs as a plain
    cache does, and decoding from it equals a separate run."""
    from kvcompress import testing as T
    from kvcompress.fanout import FanoutCache
    from kvcompress.suite import _chunk

    model, _, _ = tiny_lm
    ids = torch.randint(3, 250, (1, 120), generator=torch.Generator().manual_seed(3))
    methods = [MiniCache(start_layer=0, retain=0.1), kvc.SnapKV(budget=48, window=8) + MiniCache(start_layer=2)]
    children = [KVCache(m, num_layers=4) for m in methods]
    kw = lambda c: cache_kwargs(model, c)  # noqa: E731
    with kvc.compress(model, methods[0]), torch.inference_mode():
        _chunk(model, FanoutCache(children), ids[0].tolist(), 0, kw)
    assert [layer.store.kind for layer in children[0].layers] == ["minicache"] * 4
    assert [layer.store.kind for layer in children[1].layers] == ["uniform", "uniform", "minicache", "minicache"]
    for m, c in zip(methods, children):
        with T.method_context(model, m) as new:
            alone = new()
            with torch.inference_mode():
                _chunk(model, alone, ids[0].tolist(), 0, kw)
        for x, y in zip(c.layers, alone.layers):
            if x.store.kind == "minicache":
                assert all(torch.equal(p, q) for p, q in zip(x.store.pair.tensors(), y.store.pair.tensors()))


# ---------------------------------------------------------------- composed with a quantizer

def test_quantizer_spellings():
    m = MiniCache(retain=0.1) + kvc.KIVI(bits=4)
    assert m.quant == kvc.KIVI(bits=4) and m.packing == kvc.KIVI(bits=4).packing
    assert m.describe() == "MiniCache(t=0.6, retain=0.1) + KIVI(bits=4, group=32, residual=128)"
    assert method_from_spec("minicache:retain=0.1+kivi:bits=4").describe() == m.describe()
    with pytest.raises(ValueError, match="already packs"):
        m + kvc.KIVI(bits=2)
    with pytest.raises(TypeError):
        MiniCache(quant=kvc.LowBits(bits=4))
    assert (kvc.SnapKV(ratio=0.5) + m).packing == m.packing
    with pytest.raises(ValueError, match="minicache"):
        method_from_spec("minicache+snapkv", ratio=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_pair_bytes_and_reconstruction(dtype):
    B, H, n, D, G, bits = 2, 2, 40, 16, 8, 4
    k1, v1, k2, v2 = _pair_inputs(dtype, B, H, n, D)
    plain = _merge(k1, v1, k2, v2)
    packed = _merge(k1, v1, k2, v2)
    packed.pack(bits, G)
    m, w = 36, 4
    codes = lambda rows: B * H * rows * (D * bits // 8)  # noqa: E731
    keys = lambda rows: codes(rows) + 2 * B * H * math.ceil(rows / G) * D * 4  # noqa: E731 - per channel over G tokens
    vals = lambda rows: codes(rows) + 2 * B * H * rows * math.ceil(D / G) * 4  # noqa: E731 - per token over G channels
    want = keys(m) + vals(m) + 2 * (keys(w) + vals(w)) + 2 * B * H * m * 2 * 4 + 2 * B * H * m * 4 + 2 * B * H * w * 4
    want += B * H * 8  # the retained count of each head (int64)
    assert sum(t.numel() * t.element_size() for t in packed.tensors()) == want
    tail = kvc.stores.UniformStore()
    for which in (0, 1):
        for got, ref in zip(packed.restore(which, tail), plain.restore(which, tail)):
            assert got.dtype == dtype
            # 4-bit codes of unit directions (|x| <= 1: step <= 2/15) times the norm
            err = (got.float() - ref.float()).norm(dim=-1) / ref.float().norm(dim=-1).clamp_min(1e-6)
            assert float(err.max()) < 0.35 and float(err.mean()) < 0.1


def test_quantized_pairs_in_generate(tiny_model):
    ids, mask = _batch(29)
    kivi = kvc.KIVI(bits=4, group=8, residual=16)
    sizes = {}
    for name, method in (("kivi", kivi), ("both", MiniCache() + kivi)):
        cache = KVCache(method, num_layers=4)
        out = _generate(tiny_model, ids, mask, method, cache)
        assert out.shape == (2, 270)
        sizes[name] = cache.memory_bytes()
        assert cache.stats().total_bytes == sizes[name]
    assert [layer.store.kind for layer in cache.layers] == ["packed", "packed", "minicache", "minicache"]
    assert cache.layers[2].store.pair.packing == (4, 8) and cache.layers[2].store.tail.n == 9
    assert sizes["both"] < sizes["kivi"]


@pytest.mark.parametrize("pack_windows", [True, False])
def test_a_global_layer_paired_with_a_sliding_one_is_packed(pack_windows):
    """On a hybrid model a pair of a sliding and a global layer is not merged,
    and its global layer is packed as KIVI alone packs it, whether or not the
    sliding partner packed itself already (with pack_windows=True it has,
    and the global layer used to stay in full precision for good)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0,
                              bos_token_id=1, eos_token_id=2, sliding_window=16, query_pre_attn_scalar=16,
                              layer_types=["sliding_attention", "full_attention"] * 2)
    model = Gemma3ForCausalLM(config).eval()
    ids = torch.randint(3, 300, (1, 60), generator=torch.Generator().manual_seed(7))
    kivi = kvc.KIVI(bits=2, group=4, residual=4, pack_windows=pack_windows)
    with kvc.compress(model, MiniCache() + kivi) as session, torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    cache = session.cache
    assert [layer.window is None for layer in cache.layers] == [False, True, False, True]
    assert [layer.store.kind for layer in cache.layers] == (
        ["packed"] * 4 if pack_windows else ["uniform", "packed", "uniform", "packed"])
    # both global layers hold what KIVI alone holds (the same tokens and width)
    with kvc.compress(model, kivi) as alone, torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    bytes_of = [s.bytes for s in cache.stats().layers]
    assert [bytes_of[i] for i in (1, 3)] == [alone.cache.stats().layers[i].bytes for i in (1, 3)]


@pytest.mark.parametrize("name", ["ems", "adakv"])
def test_per_head_evictor_with_full_retention_is_the_evictor(tiny_model, name):
    """EMS / AdaKV + MiniCache(retain=1): each layer reads exactly the slots
    (and EMS's merge counts) its heads kept, through the ragged kernel."""
    ids, mask = _batch(30)
    make_method = {"ems": lambda: kvc.EMS(budget=64), "adakv": lambda: kvc.AdaKV(budget=64, window=8)}[name]
    method = make_method() + MiniCache(start_layer=0, retain=1.0)
    cache = KVCache(method, num_layers=4)
    assert torch.equal(_generate(tiny_model, ids, mask, method, cache), _generate(tiny_model, ids, mask,
                                                                                   make_method()))
    assert [layer.store.kind for layer in cache.layers] == ["minicache"] * 4
    pair = cache.layers[0].store.pair
    assert pair.starts is not None and (pair.counts is not None) == (name == "ems")


def test_ems_then_merge(tiny_model):
    ids, mask = _batch(31)
    method = kvc.EMS(budget=64) + MiniCache(start_layer=2, retain=0.05)
    cache = KVCache(method, num_layers=4)
    out = _generate(tiny_model, ids, mask, method, cache)
    assert out.shape == (2, 270)
    assert [layer.store.kind for layer in cache.layers] == ["ragged", "ragged", "minicache", "minicache"]
    assert cache.stats().total_bytes == cache.memory_bytes()
    pair = cache.layers[2].store.pair
    merged = int((pair.slots[0] >= 0).sum())
    assert merged > 0 and bool((pair.counts[0][..., 0][pair.slots[0] >= 0] >= 1).all())


@pytest.mark.parametrize("evictor", ["snapkv", "ems"])
def test_evictor_minicache_and_quantizer(tiny_model, evictor):
    """Evictor + MiniCache + KIVI: unpaired layers are evicted then packed as
    with evictor + KIVI; paired layers are evicted, merged, then packed."""
    ids, mask = _batch(32)
    make_evictor = {"snapkv": lambda: kvc.SnapKV(budget=64, window=8), "ems": lambda: kvc.EMS(budget=64)}[evictor]
    kivi = kvc.KIVI(bits=4, group=8, residual=16)
    method = make_evictor() + MiniCache(start_layer=2) + kivi
    assert method.packing == kivi.packing and method.depth.quant == kivi
    assert method.describe().endswith("+ MiniCache(start_layer=2, t=0.6, retain=0.05) + KIVI(bits=4, group=8, residual=16)")
    spec = f"{evictor}+minicache:start_layer=2+kivi:bits=4:group=8:residual=16"
    assert method_from_spec(spec, budget=64).describe() == (kvc.methods.method_from_spec(evictor, budget=64) +
                                                            MiniCache(start_layer=2) + kivi).describe()
    sizes = {}
    for name, m in (("evict+kivi", make_evictor() + kivi), ("all", method)):
        cache = KVCache(m, num_layers=4)
        assert _generate(tiny_model, ids, mask, m, cache).shape == (2, 270)
        sizes[name] = cache.memory_bytes()
        assert cache.stats().total_bytes == sizes[name]
    kinds = [layer.store.kind for layer in cache.layers]
    assert kinds[2:] == ["minicache", "minicache"] and kinds[0] == kinds[1] != "minicache"
    assert cache.layers[2].store.pair.packing == (4, 8)
    with pytest.raises(ValueError, match="at most two"):
        method_from_spec("snapkv+kivi+kivi", budget=64)


def test_beams_second_turns_and_bf16_through_the_compositions(tiny_model):
    """Beam search reorders a pair once per step (uniform and per-head
    views, packed or not); a second turn's chunk reads a per-head pair; a
    bfloat16 model with full retention is its plain generate()."""
    ids, mask = _batch(33)
    kw = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, num_beams=2)
    snap = lambda: kvc.SnapKV(budget=64, window=8)  # noqa: E731
    with kvc.compress(tiny_model, snap()):
        want = tiny_model.generate(ids, **kw)
    with kvc.compress(tiny_model, snap() + MiniCache(start_layer=0, retain=1.0)):
        assert torch.equal(tiny_model.generate(ids, **kw), want)
    with kvc.compress(tiny_model, kvc.EMS(budget=64) + MiniCache(start_layer=0) + kvc.KIVI(bits=4, group=8,
                                                                                          residual=16)):
        assert tiny_model.generate(ids, **kw).shape == (2, 265)
    first = ids[:1, -50:]
    with kvc.compress(tiny_model, kvc.EMS(budget=32) + MiniCache(start_layer=0)) as session:
        out1 = tiny_model.generate(first, max_new_tokens=3, do_sample=False, pad_token_id=0)
        second = torch.cat([out1, ids[:1, :7]], dim=1)
        out2 = tiny_model.generate(second, max_new_tokens=3, do_sample=False, pad_token_id=0,
                                   **cache_kwargs(tiny_model, session.cache))
    assert out2.shape == (1, second.shape[1] + 3) and session.cache.layers[0].store.tail.n == second.shape[1] - 50 + 2
    import copy

    model16 = copy.deepcopy(tiny_model).to(torch.bfloat16)  # the session's model stays float32
    ref = _generate(model16, ids, mask)
    assert torch.equal(_generate(model16, ids, mask, MiniCache(start_layer=0, retain=1.0)), ref)
    assert _generate(model16, ids, mask, MiniCache(start_layer=0)).shape == ref.shape


# ---------------------------------------------------------------- attention over the merged form

def _in_place_ref(q, pair, which, tail, scaling, use_counts):
    """float64 softmax over the view's live rows: merged (norm x direction as
    stored), whole, tail; log-count biases."""
    B, Hq, _, D = q.shape
    H = pair.norms_k.shape[1]
    out = torch.zeros(B, 1, Hq, pair.dir_v.shape[3], dtype=torch.float64)
    wk, wv, ws = pair.whole[which]
    for b in range(B):
        for hq in range(Hq):
            h = hq // (Hq // H)
            ks, vs, bias = [], [], []
            for i in range(pair.dir_k.shape[2]):
                if pair.slots[which][b, h, i] >= 0:
                    ks.append(pair.norms_k[b, h, i, which].double() * pair.dir_k[b, h, i].double())
                    vs.append(pair.norms_v[b, h, i, which].double() * pair.dir_v[b, h, i].double())
                    bias.append(math.log(pair.counts[0][b, h, i, which]) if use_counts else 0.0)
            for i in range(wk.shape[2]):
                if ws[b, h, i] >= 0:
                    ks.append(wk[b, h, i].double())
                    vs.append(wv[b, h, i].double())
                    bias.append(math.log(pair.counts[1][which][b, h, i]) if use_counts else 0.0)
            for j in range(tail.n):
                ks.append(tail.keys[b, h, j].double())
                vs.append(tail.values[b, h, j].double())
                bias.append(0.0)
            logits = scaling * (torch.stack(ks) @ q[b, hq, 0].double()) + torch.tensor(bias, dtype=torch.float64)
            out[b, 0, hq] = torch.softmax(logits, 0) @ torch.stack(vs)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("per_head", [False, True], ids=["rows", "heads"])
def test_attention_in_place_matches_float64_and_the_view(dtype, per_head):
    B, H, D = 2, 2, 32
    g = torch.Generator().manual_seed(40)
    k1, v1 = make((B, H, 12, D), dtype, seed=41), make((B, H, 12, D), dtype, seed=42)
    k2, v2 = make((B, H, 10, D), dtype, seed=43), make((B, H, 10, D), dtype, seed=44)
    pos1 = torch.stack([torch.randperm(16, generator=g)[:12].sort().values for _ in range(B * H)]).view(B, H, 12)
    pos2 = torch.stack([torch.randperm(16, generator=g)[:10].sort().values for _ in range(B * H)]).view(B, H, 10)
    if per_head:
        s1, s2 = torch.tensor([[0, 2], [1, 0]]), torch.tensor([[1, 0], [0, 3]])
        c1, c2 = 1 + torch.rand(B, H, 12, generator=g) * 3, 1 + torch.rand(B, H, 10, generator=g) * 3
    else:
        s1, s2, c1, c2 = [0, 2], [0, 2], None, None
    pair = MergedPair.merge([(k1, v1, pos1.int(), s1, c1), (k2, v2, pos2.int(), s2, c2)], 0.6, 0.2)
    assert pair.dir_k.shape[2] > 0 and bool((pair.slots[0] < 0).any())  # padded merged lists
    tail = kvc.stores.UniformStore()
    tail.append(make((B, H, 3, D), dtype, seed=45), make((B, H, 3, D), dtype, seed=46), 16)
    q = make((B, 2 * H, 1, D), dtype, seed=47)
    for which in (0, 1):
        store = MiniCacheStore(pair, which)
        store.tail = tail
        spec = kvc.stores.AttentionSpec(scaling=D ** -0.5, count_bias=per_head)
        got = store.attend(q, spec)  # the in-place kernel (a decode step with merged rows)
        ref = _in_place_ref(q, pair, which, tail, D ** -0.5, per_head)
        tol = 2e-6 if dtype == torch.float32 else (2e-3 if dtype == torch.float16 else 1.6e-2)
        assert got.shape == ref.shape and float((got.double() - ref).abs().max()) <= tol
        # the reconstructed-view path (a prefill chunk would take it) agrees up to the view's rounding
        keys, values = pair.restore(which, tail)
        if per_head:
            view = store._attend_heads(q, spec, keys, values)
        else:
            view = ops.attention(q, keys, values, scaling=D ** -0.5, kv_start=torch.tensor([0, 2]))
        assert float((got.double() - view.double()).abs().max()) <= 4 * tol + (0 if dtype == torch.float32 else 1e-2)


def test_attention_in_place_refuses_bad_arguments():
    x = torch.randn(1, 2, 4, 8)
    n = torch.rand(1, 2, 4, 2) + 0.5
    s = torch.arange(4).expand(1, 2, 4)
    q = torch.randn(1, 4, 1, 8)
    assert ops.minicache_attention(q, x, x, n, n, s, 0).shape == (1, 1, 4, 8)
    with pytest.raises(KVCompressValueError, match="one"):
        ops.minicache_attention(torch.randn(1, 4, 2, 8), x, x, n, n, s, 0)
    with pytest.raises(KVCompressValueError, match="queries"):
        ops.minicache_attention(torch.randn(1, 3, 1, 8), x, x, n, n, s, 0)
    with pytest.raises(KVCompressValueError, match="counts"):
        ops.minicache_attention(q, x, x, n, n, s, 0, counts=torch.zeros(1, 2, 4, 2))
    with pytest.raises(KVCompressValueError, match="norms_k"):
        ops.minicache_attention(q, x, x, torch.rand(1, 2, 4, 3), n, s, 0)
    with pytest.raises(TypeError, match="dir_v"):
        ops.minicache_attention(q, x, x.half(), n, n, s, 0)
    with pytest.raises(KVCompressValueError, match="which"):
        ops.minicache_attention(q, x, x, n, n, s, 2)
    # every row padding: zeros, not NaN
    assert not ops.minicache_attention(q, x, x, n, n, s * 0 - 1, 0).any()


@pytest.mark.parametrize("make", [lambda: kvc.MiniCache(), lambda: kvc.KVSharer(plan="3>1")],
                         ids=["minicache", "kvsharer"])
def test_batch_repeat_interleave_repeats_layers_that_share_a_store(tiny_model, make):
    """``batch_repeat_interleave`` (the Cache API's expansion of a batch) on a
    cache whose layers share a store: every layer gets the same rows, and
    a decode step then equals the un-repeated cache's, row for row (a layer
    reading another's store built its index from the already repeated store:
    an IndexError that left the cache half repeated)."""
    ids = torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    nxt = torch.randint(3, 512, (2, 1), generator=torch.Generator().manual_seed(2))
    with kvc.compress(tiny_model, make()) as session:
        caches = [session.new_cache(), session.new_cache()]
        with torch.no_grad():
            for cache in caches:
                tiny_model(ids, **cache_kwargs(tiny_model, cache))
            caches[1].batch_repeat_interleave(2)
            assert caches[1].batch_size == 4
            assert all(layer.kv_start is None or layer.kv_start.shape[0] == 4 for layer in caches[1].layers)
            mask = torch.ones(2, 21, dtype=torch.long)
            ref = tiny_model(nxt, attention_mask=mask, **cache_kwargs(tiny_model, caches[0])).logits
            rep = tiny_model(nxt.repeat_interleave(2, 0), attention_mask=mask.repeat_interleave(2, 0),
                             **cache_kwargs(tiny_model, caches[1])).logits
    torch.testing.assert_close(rep, ref.repeat_interleave(2, 0), rtol=1e-5, atol=1e-5)
