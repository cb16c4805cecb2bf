"""ActQKV: the C op against a float64 loop recomputation, and the method's kept
slots on a tiny random Llama against a float64 recomputation from the model's
own queries and keys."""

from __future__ import annotations

import pytest
import torch

import kvcompress as kvc
from kvcompress import KVCompressTypeError, KVCompressValueError, ops
from kvcompress.methods import REGISTRY, ActQKV, method_from_spec

from generation import greedy, left_pad, prefill, short_row_beside_a_long_one
from model_refs import assert_topk_consistent, layer_qkv
from test_ops import DTYPE_IDS, DTYPES, make


# ------------------------------------------------------------------ reference


def actqkv_ref(q, k, *, scaling=None, kv_start=None, dtype=torch.float64, uniform=False):
    """(scores [B, Hkv, Tk], weights [B, Hq, W]) computed with loops in
    `dtype`. ``uniform=True`` is a deliberately wrong reference (the plain
    window mean as probe) used to show the comparisons discriminate."""
    q, k = q.to(dtype), k.to(dtype)
    B, Hq, W, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    scaling = D ** -0.5 if scaling is None else scaling
    scores = torch.zeros(B, Hkv, Tk, dtype=dtype)
    weights = torch.zeros(B, Hq, W, dtype=dtype)
    for b in range(B):
        s = 0 if kv_start is None else int(kv_start[b])
        i0 = min(max(0, s - (Tk - W)), W)
        if i0 >= W:
            continue
        for h in range(Hq):
            x = q[b, h, i0:]
            m = x.shape[0]
            mu = x.mean(0)
            var = ((x - mu) ** 2).mean(0)
            eps = var.mean() / 100
            if eps > 0 and not uniform:
                bias = (((x - mu) ** 2) / (var + eps)).mean(1)
            else:
                bias = torch.zeros(m, dtype=dtype)
            w = bias / bias.sum() if bias.sum() > 0 else torch.full((m,), 1.0 / m, dtype=dtype)
            weights[b, h, i0:] = w
            probe = (w[:, None] * x).sum(0)
            logits = scaling * (k[b, h // g, s:] @ probe)
            scores[b, h // g, s:] += torch.softmax(logits, 0) / g
    return scores, weights


def assert_close_2x(got, ref64, same, floor=1e-6):
    """Within 2x the error of the same computation in the input dtype, plus a
    floor (the bound the other score ops use)."""
    err_c = (got.double() - ref64).abs().max().item() if got.numel() else 0.0
    err_t = (same.double() - ref64).abs().max().item() if got.numel() else 0.0
    assert err_c <= 2 * err_t + floor, (err_c, err_t)


# ------------------------------------------------------------------------ op

SHAPES = [  # B, Hq, Hkv, W, Tk, D
    (1, 1, 1, 1, 5, 4),
    (2, 4, 2, 8, 40, 16),
    (3, 6, 3, 16, 16, 33),
    (1, 8, 1, 32, 300, 64),
    (2, 2, 2, 5, 77, 7),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}Hq{}Hkv{}W{}Tk{}D{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_op_matches_float64_reference(shape, dtype):
    B, Hq, Hkv, W, Tk, D = shape
    q = make((B, Hq, W, D), dtype, seed=1) * 2
    k = make((B, Hkv, Tk, D), dtype, layout="transposed", seed=2)
    starts = [None, torch.tensor([min(5 * b + 1, Tk) for b in range(B)], dtype=torch.int64)]
    for ks in starts:
        got, w = ops.actqkv_scores(q, k, kv_start=ks, return_weights=True)
        ref, wref = actqkv_ref(q, k, kv_start=ks)
        same, wsame = actqkv_ref(q, k, kv_start=ks, dtype=torch.float32)
        assert got.dtype == torch.float32 and got.shape == (B, Hkv, Tk) and w.shape == (B, Hq, W)
        assert_close_2x(w, wref, wsame)
        # the keys' softmax in the input dtype would round the probe too: the
        # float32 recomputation from the same inputs bounds it
        assert_close_2x(got, ref, same, floor=2e-6)
        if ks is not None:
            for b in range(B):
                assert torch.all(got[b, :, :int(ks[b])] == 0)


def test_weights_follow_the_activation_bias():
    """A query far from the others takes most of the weight; identical
    queries (and a window of one) give the plain mean."""
    q = torch.zeros(1, 1, 4, 8)
    q[0, 0, :, 0] = torch.tensor([0.1, -0.1, 0.05, 5.0])
    q[0, 0, :, 1] = torch.tensor([0.2, 0.1, -0.3, 0.0])
    k = make((1, 1, 10, 8), seed=3)
    _, w = ops.actqkv_scores(q, k, return_weights=True)
    assert w[0, 0].argmax() == 3 and abs(float(w.sum()) - 1) < 1e-6
    same = torch.ones(1, 1, 4, 8)
    _, w = ops.actqkv_scores(same, k, return_weights=True)
    assert torch.equal(w, torch.full((1, 1, 4), 0.25))
    _, w = ops.actqkv_scores(q[:, :, :1], k, return_weights=True)
    assert torch.equal(w, torch.ones(1, 1, 1))


def test_padding_gives_the_row_alone():
    q, k = make((1, 4, 6, 16), seed=4), make((1, 2, 30, 16), seed=5)
    pad = 9
    kp = torch.cat([torch.randn(1, 2, pad, 16), k], 2)
    alone, wa = ops.actqkv_scores(q, k, return_weights=True)
    padded, wp = ops.actqkv_scores(q, kp, kv_start=torch.tensor([pad]), return_weights=True)
    assert torch.equal(padded[..., pad:], alone) and torch.equal(wp, wa)
    assert torch.equal(padded[..., :pad], torch.zeros(1, 2, pad))
    # a window reaching into the padding: padded queries take weight 0
    short = torch.cat([torch.randn(1, 4, 3, 16), q[:, :, 3:]], 2)
    kk = torch.cat([torch.randn(1, 2, 24, 16), k[:, :, -3:]], 2)  # Tk 27, window 6, start 24
    got, w = ops.actqkv_scores(short, kk, kv_start=torch.tensor([24]), return_weights=True)
    ref, wref = actqkv_ref(short, kk, kv_start=torch.tensor([24]))
    assert torch.equal(w[..., :3], torch.zeros(1, 4, 3))
    torch.testing.assert_close(w.double(), wref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    # no real window query: every score is 0
    got = ops.actqkv_scores(q, k, kv_start=torch.tensor([30]))
    assert torch.equal(got, torch.zeros(1, 2, 30))


def test_thread_count_does_not_change_bits():
    q, k = make((3, 8, 16, 32), seed=6), make((3, 2, 200, 32), seed=7)
    before = ops.get_num_threads()
    try:
        ops.set_num_threads(1)
        one = ops.actqkv_scores(q, k, return_weights=True)
        ops.set_num_threads(2)
        two = ops.actqkv_scores(q, k, return_weights=True)
    finally:
        ops.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_numpy_inputs_and_empty_shapes():
    q, k = make((1, 2, 4, 8), fw="numpy", seed=8), make((1, 2, 20, 8), fw="numpy", seed=9)
    got = ops.actqkv_scores(q, k)
    ref, _ = actqkv_ref(torch.from_numpy(q), torch.from_numpy(k))
    torch.testing.assert_close(torch.from_numpy(got).double(), ref, rtol=1e-5, atol=1e-6)
    assert ops.actqkv_scores(torch.zeros(0, 2, 4, 8), torch.zeros(0, 1, 9, 8)).shape == (0, 1, 9)
    assert torch.equal(ops.actqkv_scores(torch.zeros(1, 2, 0, 8), torch.ones(1, 1, 9, 8)), torch.zeros(1, 1, 9))


def test_op_arguments_are_checked():
    q, k = torch.randn(1, 4, 4, 8), torch.randn(1, 2, 16, 8)
    with pytest.raises(KVCompressValueError, match="queries"):
        ops.actqkv_scores(torch.randn(1, 4, 17, 8), k)
    with pytest.raises(KVCompressValueError, match="head dim"):
        ops.actqkv_scores(q[..., :0], k[..., :0])
    with pytest.raises(KVCompressValueError):
        ops.actqkv_scores(torch.randn(1, 3, 4, 8), k)  # heads not a multiple of kv heads
    with pytest.raises(KVCompressTypeError, match="keys"):
        ops.actqkv_scores(q, k.half())
    with pytest.raises(KVCompressValueError, match="kv_start"):
        ops.actqkv_scores(q, k, kv_start=torch.tensor([17]))
    with pytest.raises(KVCompressTypeError, match="scaling"):
        ops.actqkv_scores(q, k, scaling="x")
    with pytest.raises(KVCompressTypeError, match="return_weights"):
        ops.actqkv_scores(q, k, return_weights=1)


# -------------------------------------------------------------------- method


def _prompt(batch=1, length=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (batch, length), generator=g)


def _generate(model, ids, mask=None, n=10):
    return greedy(model, ids, mask, n=n)[0]


def _check_layers(model, ids, mask, cache, budget, window, sinks, starts, uniform=False, kernel=1):
    for li, (q, k, v) in enumerate(layer_qkv(model, ids, mask)):
        layer = cache.layers[li]
        T = k.shape[2]
        assert layer.n == budget
        ref, _ = actqkv_ref(q[:, :, -window:], k, kv_start=None if mask is None else torch.tensor(starts),
                            uniform=uniform)
        for b in range(ids.shape[0]):
            s = starts[b]
            for h in range(k.shape[1]):
                kept = layer.positions[b, h].tolist()
                assert all(i >= s for i in kept)
                scored = ref[b, h].clone()
                if kernel > 1:  # float64 max-pool of the slots before the window
                    scored[:T - window] = torch.nn.functional.max_pool1d(
                        scored[None, None, :T - window], kernel, 1, kernel // 2)[0, 0]
                scored[:s] = -float("inf")
                forced = list(range(s, s + sinks)) + list(range(T - window, T))
                assert_topk_consistent(kept, scored, forced, budget, eps=1e-7)
                torch.testing.assert_close(layer.keys[b, h].double(), k[b, h, kept], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(layer.values[b, h].double(), v[b, h, kept], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget", [40, 24])
def test_prefill_keeps_what_a_float64_recomputation_chooses(tiny_model, budget):
    ids = _prompt(batch=2, length=64)
    window, sinks = 8, 2
    cache = prefill(tiny_model, ActQKV(budget=budget, window=window, sinks=sinks, kernel=1), ids)
    _check_layers(tiny_model, ids, None, cache, budget, window, sinks, [0, 0])


def test_the_kept_set_comparison_discriminates(tiny_model):
    """The plain window mean as probe (no activation weights) chooses other
    slots somewhere: the float64 comparison would catch a lost weighting."""
    ids = _prompt(batch=2, length=64)
    window, sinks, budget = 8, 2, 24
    cache = prefill(tiny_model, ActQKV(budget=budget, window=window, sinks=sinks, kernel=1), ids)
    with pytest.raises(AssertionError):
        _check_layers(tiny_model, ids, None, cache, budget, window, sinks, [0, 0], uniform=True)


@pytest.mark.parametrize("kernel", [3, 7, 13])
def test_pooled_scores_keep_what_a_float64_recomputation_chooses(tiny_model, kernel):
    ids, mask = left_pad([_prompt(length=45, seed=3)[0], _prompt(length=70, seed=4)[0]])  # row 0: 25 pads
    window, sinks, budget = 8, 2, 24
    method = ActQKV(budget=budget, window=window, sinks=sinks, kernel=kernel)
    cache = prefill(tiny_model, method, ids, mask)
    _check_layers(tiny_model, ids, mask, cache, budget, window, sinks, [25, 0], kernel=kernel)
    with pytest.raises(AssertionError):  # the unpooled reference differs: pooling took effect
        _check_layers(tiny_model, ids, mask, cache, budget, window, sinks, [25, 0])


def test_budget_above_prompt_is_identity(tiny_model):
    ids = _prompt(length=40)
    ref = _generate(tiny_model, ids)
    with kvc.compress(tiny_model, ActQKV(budget=200)) as session:
        out = _generate(tiny_model, ids)
    assert torch.equal(out, ref)
    assert all(layer.n == layer.seen == 40 + 9 for layer in session.cache.layers)


def test_left_padded_batch_matches_a_float64_recomputation(tiny_model):
    ids, mask = left_pad([_prompt(length=45, seed=3)[0], _prompt(length=70, seed=4)[0]])  # row 0: 25 pads
    window, sinks, budget = 8, 3, 28
    cache = prefill(tiny_model, ActQKV(budget=budget, window=window, sinks=sinks), ids, mask)
    _check_layers(tiny_model, ids, mask, cache, budget, window, sinks, [25, 0], kernel=13)  # the default
    with kvc.compress(tiny_model, ActQKV(budget=budget, window=window, sinks=sinks, interval=4)) as session:
        _generate(tiny_model, ids, mask, n=12)
    for layer in session.cache.layers:
        assert budget <= layer.n < budget + 4


def test_short_row_in_a_batch_generates_as_alone(tiny_model):
    in_batch, alone = short_row_beside_a_long_one(tiny_model, ActQKV(budget=32, window=8, interval=0), _prompt(length=20, seed=5)[0],
                                                  _prompt(length=60, seed=6)[0])
    assert torch.equal(in_batch, alone)


def test_compressed_rows_generate_as_alone(tiny_model):
    """Both rows compressed (and re-compressed while decoding): the padded
    row generates what it generates alone."""
    short, long_ = _prompt(length=50, seed=7)[0], _prompt(length=64, seed=8)[0]
    ids = torch.zeros(2, 64, dtype=torch.long)
    mask = torch.zeros(2, 64, dtype=torch.long)
    ids[0, 14:], mask[0, 14:] = short, 1
    ids[1], mask[1] = long_, 1
    method = ActQKV(budget=24, window=8, interval=4)
    with kvc.compress(tiny_model, method):
        out = _generate(tiny_model, ids, mask, n=12)
    with kvc.compress(tiny_model, method):
        alone = _generate(tiny_model, short[None], n=12)
    assert torch.equal(out[0, 14:], alone[0])


@pytest.mark.parametrize("kw, exc, name", [
    (dict(budget=32, window=0), ValueError, "window"),
    (dict(budget=32, window=4.0), TypeError, "window"),
    (dict(budget=32, sinks=-1), ValueError, "sinks"),
    (dict(budget=32, sinks="2"), TypeError, "sinks"),
    (dict(budget=32, kernel=4), ValueError, "kernel"),
    (dict(budget=32, kernel=0), ValueError, "kernel"),
    (dict(budget=32, kernel=3.0), TypeError, "kernel"),
    (dict(budget=10, window=8, sinks=4), ValueError, "budget"),
    (dict(budget=32, interval=-1), ValueError, "interval"),
    (dict(), ValueError, "budget"),
])
def test_bad_options_name_the_option(kw, exc, name):
    with pytest.raises(exc, match=name):
        ActQKV(**kw)


def test_registered_and_built_from_a_spec():
    assert REGISTRY["actqkv"] is ActQKV and kvc.ActQKV is ActQKV
    m = method_from_spec("actqkv:window=8:sinks=2", ratio=0.5)
    assert (m.window, m.sinks, m.ratio) == (8, 2, 0.5)
    assert ActQKV.needs_queries and m.min_budget() == 10 and m.held_queries() == 8
    assert m.describe() == "ActQKV(ratio=0.5, window=8, sinks=2, kernel=13)"
    assert method_from_spec("actqkv:kernel=7", budget=64).describe() == "ActQKV(budget=64, window=16, sinks=4, kernel=7)"
    assert isinstance(method_from_spec("actqkv", budget=64), ActQKV)
    with pytest.raises(ValueError, match="no option"):
        method_from_spec("actqkv:lag=3", budget=64)
