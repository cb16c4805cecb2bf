"""Keyformer: the keyformer_scores op against an independent float64
recomputation (its Gumbel noise re-derived here from the hash, in NumPy), and
the method on a tiny random Llama (kept sets, identity, batches, determinism,
options)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import kvcompress as kvc
from kvcompress import KVCompressValueError, ops
from kvcompress.compat import cache_kwargs
from kvcompress.methods import H2O, REGISTRY, Keyformer, LayerView, method_from_spec

from generation import greedy, left_pad
from model_refs import assert_topk_consistent, layer_qkv
from reference import window_scores_ref
from test_ops import DTYPE_IDS, DTYPES, assert_within_bound, make

# ------------------------------------------------------------ the noise, again

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_G = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def keyformer_hash(seed, layer, head, key, query, step):
    """SplitMix64-chained hash of the six words (arrays broadcast), as
    csrc/keyformer_math.h defines it; uint64 arithmetic wraps mod 2^64."""
    words = [np.asarray(w, dtype=np.uint64) for w in (seed, layer, head, key, query, step)]
    with np.errstate(over="ignore"):
        h = _mix64(words[0] + _G)
        for w in words[1:]:
            h = _mix64((h ^ w) + _G)
    return h & _M64


def gumbel(h):
    u = ((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    return -np.log(-np.log(u))


def keyformer_ref(q, k, *, tau=1.0, noise=1.0, seed=0, layer=0, step=0, scaling=None, kv_start=None,
                  dtype=torch.float64):
    """Literal reading of the op's definition, computed in ``dtype``."""
    q, k = q.to(dtype), k.to(dtype)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    scaling = 1.0 / math.sqrt(D) if scaling is None else scaling
    logits = (q @ k.repeat_interleave(g, 1).transpose(-1, -2)) * scaling  # [B, Hq, Tq, Tk]
    start = torch.zeros(B, dtype=torch.int64) if kv_start is None else torch.as_tensor(kv_start)
    j = np.arange(Tk)
    pos = np.arange(Tq) + Tk - Tq
    if noise:
        G = np.zeros((B, Hq, Tq, Tk))
        for b in range(B):
            s = int(start[b])
            # offsets before the row's first slot are masked below; wrap them like C
            key = (j - s).astype(np.int64).view(np.uint64)[None, None, :]
            query = (pos - s).astype(np.int64).view(np.uint64)[None, :, None]
            G[b] = gumbel(keyformer_hash(seed, layer, np.arange(Hq)[:, None, None], key, query, step))
        logits = logits + noise * torch.from_numpy(G).to(dtype)
    z = logits / tau
    jt, pt = torch.arange(Tk), torch.from_numpy(pos)
    allowed = ((jt[None, None, :] <= pt[None, :, None]) & (jt[None, None, :] >= start[:, None, None]))[:, None]
    p = torch.softmax(z.masked_fill(~allowed, float("-inf")), -1)
    p = torch.where(allowed, p, torch.zeros((), dtype=dtype))
    return p.sum(2).reshape(B, Hkv, g, Tk).mean(2)


# ---------------------------------------------------------------- the op

SHAPES = [  # B, Hq, Hkv, Tq, Tk, D
    (1, 1, 1, 1, 1, 8),
    (2, 4, 2, 5, 37, 24),
    (2, 6, 2, 33, 33, 16),  # a whole prompt: every query, causal
    (1, 4, 4, 1, 80, 64),   # a decode step
    (2, 8, 2, 20, 150, 33),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}Hq{}Hkv{}Tq{}Tk{}D{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_scores_match_a_float64_recomputation_with_the_same_noise(shape, dtype):
    B, Hq, Hkv, Tq, Tk, D = shape
    q = make((B, Hq, Tq, D), dtype, seed=1)
    k = make((B, Hkv, Tk, D), dtype, seed=2)
    starts = [None, torch.tensor([min(3 * b + 1, Tk - 1) for b in range(B)])]
    for ks in starts:
        for kw in (dict(tau=1.0, noise=1.0, seed=7, layer=3, step=0),
                   dict(tau=1.7, noise=0.5, seed=2**62 + 5, layer=0, step=11),
                   dict(tau=0.6, noise=0.0)):
            got = ops.keyformer_scores(q, k, kv_start=ks, **kw)
            ref = keyformer_ref(q, k, kv_start=ks, **kw)
            same = keyformer_ref(q, k, kv_start=ks, dtype=dtype, **kw)
            assert_within_bound(got, ref, same, what=f"{kw} kv_start={ks}")


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_any_memory_layout_gives_the_contiguous_result(layout):
    q, k = make((2, 4, 6, 16), layout=layout, seed=3), make((2, 2, 19, 16), layout=layout, seed=4)
    got = ops.keyformer_scores(q, k, seed=1)
    assert torch.equal(got, ops.keyformer_scores(q.contiguous(), k.contiguous(), seed=1))


def test_noise_free_unit_temperature_is_accumulated_attention():
    """noise=0, tau=1: sum_i A[i, j], what H2O accumulates (window_scores' mean
    over the chunk's queries times their number), causal and padded alike."""
    q, k = make((2, 6, 17, 32), seed=5), make((2, 2, 40, 32), seed=6)
    for ks in (None, torch.tensor([0, 9])):
        got = ops.keyformer_scores(q, k, tau=1.0, noise=0.0, kv_start=ks)
        torch.testing.assert_close(got, ops.window_scores(q, k, kv_start=ks) * 17, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.double(), window_scores_ref(q, k, kv_start=ks) * 17, rtol=1e-5, atol=1e-6)


def test_causal_mask_and_padding():
    B, Hq, Hkv, Tq, Tk, D = 2, 4, 2, 9, 30, 16
    q, k = make((B, Hq, Tq, D), seed=8), make((B, Hkv, Tk, D), seed=9)
    s = torch.tensor([0, 12])
    got = ops.keyformer_scores(q, k, seed=4, step=2, kv_start=s)
    assert (got[1, :, :12] == 0).all()  # padded keys score 0
    # each query's softmax sums to 1: every head's column sum is Tq (queries see >= 1 key)
    torch.testing.assert_close(got.sum(-1), torch.full((B, Hkv), float(Tq)), rtol=1e-5, atol=1e-5)
    # a key is seen only by the queries at or after it: the last key only by the last query
    last = ops.keyformer_scores(q[:, :, -1:], k, seed=4, step=2, kv_start=s)
    assert (got[..., -1] > 0).all() and (got[..., -1] <= 1).all()
    # the noise counts from the row's first real slot: a padded row scores as it does alone
    alone = ops.keyformer_scores(q[1:], k[1:, :, 12:], seed=4, step=2)
    torch.testing.assert_close(got[1:, :, 12:], alone, rtol=1e-6, atol=1e-7)
    alone_last = ops.keyformer_scores(q[1:, :, -1:], k[1:, :, 12:], seed=4, step=2)
    torch.testing.assert_close(last[1:, :, 12:], alone_last, rtol=1e-6, atol=1e-7)


def test_noise_depends_on_every_hash_word_and_repeats():
    q, k = make((1, 2, 4, 16), seed=10), make((1, 2, 12, 16), seed=11)
    base = ops.keyformer_scores(q, k, seed=1, layer=2, step=3)
    assert torch.equal(base, ops.keyformer_scores(q, k, seed=1, layer=2, step=3))
    for kw in (dict(seed=2, layer=2, step=3), dict(seed=1, layer=3, step=3), dict(seed=1, layer=2, step=4)):
        assert not torch.equal(base, ops.keyformer_scores(q, k, **kw)), kw
    # the noise is a standard Gumbel sample: mean ~ Euler's gamma, variance ~ pi^2 / 6
    g = gumbel(keyformer_hash(0, 0, 0, np.arange(200_000), 0, 0))
    assert abs(g.mean() - 0.5772) < 0.01 and abs(g.var() - math.pi**2 / 6) < 0.03


def test_results_do_not_depend_on_the_thread_count():
    q, k = make((2, 8, 40, 32), seed=12), make((2, 2, 90, 32), seed=13)
    before = ops.get_num_threads()
    try:
        ops.set_num_threads(1)
        one = ops.keyformer_scores(q, k, seed=3, kv_start=torch.tensor([0, 5]))
        ops.set_num_threads(2)
        two = ops.keyformer_scores(q, k, seed=3, kv_start=torch.tensor([0, 5]))
    finally:
        ops.set_num_threads(before)
    assert torch.equal(one, two)


def test_numpy_inputs_and_empty_shapes():
    q, k = make((1, 2, 3, 8), seed=14), make((1, 1, 5, 8), seed=15)
    got = ops.keyformer_scores(q.numpy(), k.numpy(), seed=1)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_array_equal(got, ops.keyformer_scores(q, k, seed=1).numpy())
    assert (ops.keyformer_scores(torch.zeros(1, 2, 0, 8), torch.zeros(1, 1, 5, 8)) == 0).all()
    assert ops.keyformer_scores(torch.zeros(0, 2, 1, 8), torch.zeros(0, 1, 5, 8)).shape == (0, 1, 5)


def test_bad_arguments_are_refused_by_name():
    q, k = make((1, 4, 3, 8)), make((1, 2, 5, 8))
    cases = [
        (dict(tau=0.0), "tau"), (dict(tau=-1.0), "tau"), (dict(tau=float("inf")), "tau"), (dict(tau=1e-50), "tau"),
        (dict(noise=-0.5), "noise"), (dict(noise=float("nan")), "noise"), (dict(seed=-1), "seed"),
        (dict(layer=-1), "layer"), (dict(step=-2), "step"), (dict(kv_start=[6]), "kv_start"),
    ]
    for kw, name in cases:
        with pytest.raises(KVCompressValueError, match=name):
            ops.keyformer_scores(q, k, **kw)
    with pytest.raises(TypeError, match="tau"):
        ops.keyformer_scores(q, k, tau="1")
    with pytest.raises(TypeError, match="seed"):
        ops.keyformer_scores(q, k, seed=1.5)
    with pytest.raises(KVCompressValueError, match="queries"):
        ops.keyformer_scores(make((1, 4, 6, 8)), k)
    with pytest.raises(KVCompressValueError):
        ops.keyformer_scores(make((1, 3, 3, 8)), k)  # 3 query heads over 2 kv heads


# ---------------------------------------------------------------- the method


def _prompt(batch=1, length=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (batch, length), generator=g)


def _generate(model, ids, mask=None, n=12, method=None):
    out, session = greedy(model, ids, mask, method=method, n=n)
    return out, None if session is None else session.cache


def test_options_are_validated_by_name():
    for kw, name in [(dict(window=-1), "window"), (dict(tau_init=0.0), "tau_init"), (dict(tau_end=-2.0), "tau_end"),
                     (dict(tau_init=float("inf")), "tau_init"), (dict(tau_steps=0), "tau_steps"),
                     (dict(noise=-1.0), "noise"), (dict(noise=float("nan")), "noise"), (dict(seed=-3), "seed"),
                     (dict(seed=2**63), "seed"), (dict(budget=8, window=16), "budget")]:
        kw = {"budget": 64, **kw}
        with pytest.raises(ValueError, match=name):
            Keyformer(**kw)
    for kw, name in [(dict(window=2.5), "window"), (dict(tau_init="1"), "tau_init"), (dict(noise=True), "noise"),
                     (dict(seed=1.0), "seed"), (dict(tau_steps=None), "tau_steps")]:
        with pytest.raises(TypeError, match=name):
            Keyformer(budget=64, **kw)
    m = Keyformer(ratio=0.5)
    assert (m.window, m.tau_init, m.tau_end, m.noise, m.seed) == (32, 1.0, 2.0, 1.0, 0)
    assert REGISTRY["keyformer"] is Keyformer and kvc.Keyformer is Keyformer
    assert method_from_spec("keyformer:noise=0:seed=4", budget=40) == Keyformer(budget=40, noise=0, seed=4)


def test_temperature_rises_linearly_over_the_generated_tokens():
    m = Keyformer(budget=64, tau_init=1.0, tau_end=2.0, tau_steps=10)
    assert [m.temperature(t) for t in (0, 1, 5, 10, 11, 500)] == [1.0, 1.1, 1.5, 2.0, 2.0, 2.0]


def test_observe_scores_a_decode_step_at_its_temperature_and_step():
    q, k = make((2, 4, 1, 16), seed=20), make((2, 2, 30, 16), seed=21)
    start = torch.tensor([0, 4])
    m = Keyformer(budget=16, window=4, tau_steps=8, seed=9)
    for phase, steps, tau, step in (("decode", 3, 1.375, 3), ("prefill", 0, 1.0, 0)):
        acc = torch.ones(2, 2, 30)
        view = LayerView(layer_idx=2, num_layers=4, queries=q, keys=k, values=k, kv_start=start, scaling=0.25,
                         state={"acc": acc}, phase=phase, steps=steps)
        m.observe(view)
        ref = keyformer_ref(q, k, tau=tau, noise=1.0, seed=9, layer=2, step=step, scaling=0.25, kv_start=start)
        torch.testing.assert_close(acc.double(), 1 + ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("noise", [1.0, 0.0])
def test_prefill_keeps_what_a_float64_recomputation_chooses(tiny_model, noise):
    """The kept sets after a compressed prefill: the last ``window`` slots and
    the top of the accumulated score recomputed from the model's own queries
    and keys (float64, noise from the NumPy hash)."""
    ids = _prompt(batch=2, length=48)
    method = Keyformer(budget=20, window=6, noise=noise, seed=5, tau_init=1.3)
    with kvc.compress(tiny_model, method) as session:
        cache = session.new_cache()
        with torch.no_grad():
            tiny_model(ids, **cache_kwargs(tiny_model, cache))
    for li, (q, k, v) in enumerate(layer_qkv(tiny_model, ids)):
        layer = cache.layers[li]
        T = k.shape[2]
        assert layer.seen == T and layer.n == 20
        s = keyformer_ref(q, k, tau=1.3, noise=noise, seed=5, layer=li, step=0)
        for b in range(2):
            for h in range(k.shape[1]):
                kept = layer.positions[b, h].tolist()
                assert kept == sorted(kept)
                assert_topk_consistent(kept, s[b, h], range(T - 6, T), 20, eps=1e-5 * float(s[b, h].abs().max()))
                torch.testing.assert_close(layer.keys[b, h].double(), k[b, h, kept], rtol=1e-5, atol=1e-5)


def test_noise_free_unit_temperature_keeps_h2o_scores(tiny_model):
    """noise=0, tau=1: the accumulated state is H2O's (same window of recent
    slots as H2O's recent share: budget 20 x 0.5 = 10)."""
    ids = _prompt(length=60, seed=2)
    out_k, cache_k = _generate(tiny_model, ids, n=20, method=Keyformer(budget=20, window=10, noise=0.0, tau_end=1.0,
                                                                       interval=4))
    out_h, cache_h = _generate(tiny_model, ids, n=20, method=H2O(budget=20, recent=0.5, interval=4))
    assert torch.equal(out_k, out_h)
    for lk, lh in zip(cache_k.layers, cache_h.layers):
        assert torch.equal(lk.positions, lh.positions)
        torch.testing.assert_close(lk.state["acc"], lh.state["acc"], rtol=1e-4, atol=1e-5)


def test_budget_above_the_prompt_reproduces_generate(tiny_model):
    ids = _prompt(length=30)
    ref, _ = _generate(tiny_model, ids)
    out, cache = _generate(tiny_model, ids, method=Keyformer(budget=200, window=8))
    assert torch.equal(out, ref)
    assert all(layer.n == layer.seen == 30 + 11 for layer in cache.layers)


def test_left_padded_rows_generate_what_they_generate_alone(tiny_model):
    rows = [_prompt(length=45, seed=3)[0], _prompt(length=80, seed=4)[0]]
    ids, mask = left_pad(rows)
    method = Keyformer(budget=24, window=8, interval=4, tau_steps=6)
    out, cache = _generate(tiny_model, ids, mask, n=16, method=method)
    for i, r in enumerate(rows):
        alone, _ = _generate(tiny_model, r[None], n=16, method=method)
        assert torch.equal(out[i, -16:], alone[0, -16:]), i
    for layer in cache.layers:
        assert max(layer.head_lengths()) - int(layer.kv_start.min()) <= 24 + 4


def test_runs_repeat_exactly_and_the_seed_matters(tiny_model):
    ids = _prompt(length=70, seed=6)
    method = Keyformer(budget=24, window=8, interval=4)
    a, ca = _generate(tiny_model, ids, n=24, method=method)
    b, cb = _generate(tiny_model, ids, n=24, method=method)
    assert torch.equal(a, b)
    for la, lb in zip(ca.layers, cb.layers):
        assert torch.equal(la.positions, lb.positions) and torch.equal(la.state["acc"], lb.state["acc"])
    _, cc = _generate(tiny_model, ids, n=24, method=Keyformer(budget=24, window=8, interval=4, seed=1))
    assert any(not torch.equal(la.state["acc"], lc.state["acc"]) for la, lc in zip(ca.layers, cc.layers))
