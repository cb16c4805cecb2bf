"""LagKV: the C op against a float64 loop recomputation, and the method's kept
slots on a tiny random Llama against a float64 recomputation from the
model's own keys and values."""

from __future__ import annotations

import pytest
import torch

import kvcompress as kvc
from kvcompress import KVCompressTypeError, KVCompressValueError, ops
from kvcompress.methods import REGISTRY, LagKV, method_from_spec

from generation import greedy, prefill, short_row_beside_a_long_one
from model_refs import assert_topk_consistent, layer_qkv
from test_ops import DTYPE_IDS, DTYPES, make

INF = float("inf")


# ------------------------------------------------------------------ reference


def lagkv_ref(keys, values, lag, sinks=0, kv_start=None, dtype=torch.float64):
    """Raw LagKV scores [B, H, T] computed chunk by chunk in `dtype`: +inf on
    sinks and tail, -inf on padding."""
    k, v = keys.to(dtype), values.to(dtype)
    B, H, T, _ = k.shape
    out = torch.full((B, H, T), INF, dtype=dtype)
    for b in range(B):
        s = 0 if kv_start is None else int(kv_start[b])
        out[b, :, :s] = -INF
        c0 = min(s + sinks, T)
        whole = (T - c0) // lag
        for c in range(max(whole - 1, 0)):
            j0 = c0 + c * lag

            def part(x):
                cur, ref = x[b, :, j0:j0 + lag], x[b, :, j0 + lag:j0 + 2 * lag]
                lo, hi = ref.amin(1, keepdim=True), ref.amax(1, keepdim=True)
                span = hi - lo
                xn = torch.where(span != 0, (cur - lo) / torch.where(span != 0, span, 1), 0)
                return xn.std(-1).softmax(-1)

            out[b, :, j0:j0 + lag] = part(k) + part(v)
    return out


def layout(T, lag, sinks, start=0):
    """(first chunk slot, scored chunks M, tail start) of one row."""
    c0 = min(start + sinks, T)
    whole = (T - c0) // lag
    M = max(whole - 1, 0)
    return c0, M, c0 + M * lag


def rank_priority(raw, lag, sinks, kv_start=None):
    """The per-chunk priority computed from `raw` scores with torch: rank in
    the chunk (0 = highest, ties to the lower index) -> -(r * M + M - 1 - c)."""
    out = raw.clone().to(torch.float32)
    B, H, T = raw.shape
    for b in range(B):
        c0, M, _ = layout(T, lag, sinks, 0 if kv_start is None else int(kv_start[b]))
        for c in range(M):
            j0 = c0 + c * lag
            order = torch.sort(-raw[b, :, j0:j0 + lag].double(), dim=-1, stable=True).indices
            rank = torch.empty_like(order)
            rank.scatter_(-1, order, torch.arange(lag).expand_as(order).contiguous())
            out[b, :, j0:j0 + lag] = -(rank * M + (M - 1 - c)).to(torch.float32)
    return out


def assert_scores_close(got, ref64, same):
    """Infinite entries exactly; finite ones within 2x torch's own error in
    the input dtype (plus a floor), as the other score ops."""
    fin = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(got), fin)
    assert torch.equal(got[~fin].double(), ref64[~fin])
    if not fin.any():
        return
    err_c = (got.double() - ref64)[fin].abs().max().item()
    err_t = (same.double() - ref64)[fin].abs().max().item()
    assert err_c <= 2 * err_t + 1e-6 * 2, (err_c, err_t)


# ------------------------------------------------------------------------ op

OP_CASES = [  # B, H, T, D, Dv, lag, sinks
    (1, 1, 16, 8, 8, 4, 0),
    (2, 3, 70, 16, 12, 8, 3),
    (2, 2, 129, 64, 64, 32, 4),
    (3, 2, 40, 33, 17, 5, 1),
    (1, 2, 300, 24, 24, 64, 4),
]


@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: "B{}H{}T{}D{}Dv{}lag{}s{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_op_matches_float64_reference(case, dtype):
    B, H, T, D, Dv, lag, sinks = case
    k = make((B, H, T, D), dtype, seed=1)
    v = make((B, H, T, Dv), dtype, layout="transposed", seed=2)
    starts = [None, torch.tensor([min(3 * b + 1, T) for b in range(B)], dtype=torch.int64)]
    for ks in starts:
        got = ops.lagkv_scores(k, v, lag=lag, sinks=sinks, kv_start=ks)
        ref = lagkv_ref(k, v, lag, sinks, ks)
        assert_scores_close(got, ref, lagkv_ref(k, v, lag, sinks, ks, dtype=dtype))
        pri = ops.lagkv_scores(k, v, lag=lag, sinks=sinks, kv_start=ks, per_chunk=True)
        assert torch.equal(pri, rank_priority(got, lag, sinks, ks))


@pytest.mark.parametrize("T, scored", [(9, 0), (10, 1), (13, 1), (14, 2), (17, 2), (18, 3)])
def test_chunk_boundaries(T, scored):
    """sinks 2, lag 4: a scored chunk needs 2 + 8 tokens, each further one 4
    more; everything after the scored chunks is tail (+inf)."""
    k, v = make((1, 2, T, 6), seed=T), make((1, 2, T, 6), seed=T + 1)
    got = ops.lagkv_scores(k, v, lag=4, sinks=2)
    c0, M, te = layout(T, 4, 2)
    assert M == scored
    assert torch.isinf(got[..., :2]).all() and torch.isinf(got[..., te:]).all()
    assert torch.isfinite(got[..., 2:te]).all()
    # every chunk's softmaxes sum to 2
    for c in range(M):
        torch.testing.assert_close(got[..., 2 + 4 * c:6 + 4 * c].sum(-1), torch.full((1, 2), 2.0))
    assert_scores_close(got, lagkv_ref(k, v, 4, 2), lagkv_ref(k, v, 4, 2, dtype=torch.float32))


@pytest.mark.parametrize("lag", [9, 10, 64])
def test_lag_larger_than_the_sequence_scores_nothing(lag):
    k, v = make((2, 2, 17, 8), seed=3), make((2, 2, 17, 8), seed=4)
    ks = torch.tensor([0, 5])
    got = ops.lagkv_scores(k, v, lag=lag, sinks=1, kv_start=ks, per_chunk=lag == 10)
    assert torch.equal(got[0], torch.full((2, 17), INF))
    assert torch.equal(got[1, :, :5], torch.full((2, 5), -INF)) and torch.equal(got[1, :, 5:], torch.full((2, 12), INF))


def test_padding_shifts_the_chunks_like_a_row_alone():
    k, v = make((1, 2, 50, 8), seed=5), make((1, 2, 50, 8), seed=6)
    pad = 7
    kp = torch.cat([torch.randn(1, 2, pad, 8), k], 2)
    vp = torch.cat([torch.randn(1, 2, pad, 8), v], 2)
    alone = ops.lagkv_scores(k, v, lag=8, sinks=2)
    padded = ops.lagkv_scores(kp, vp, lag=8, sinks=2, kv_start=torch.tensor([pad]))
    assert torch.equal(padded[..., pad:], alone)
    assert torch.equal(padded[..., :pad], torch.full((1, 2, pad), -INF))


def test_constant_reference_channel_normalises_to_zero():
    k, v = make((1, 1, 24, 4), seed=7), make((1, 1, 24, 4), seed=8)
    k[..., 8:16, 1] = 0.5  # chunk 1, the reference of chunk 0, is constant in channel 1
    got = ops.lagkv_scores(k, v, lag=8, sinks=0)
    assert torch.isfinite(got[..., :8]).all()
    assert_scores_close(got, lagkv_ref(k, v, 8), lagkv_ref(k, v, 8, dtype=torch.float32))


def test_thread_count_does_not_change_bits():
    k, v = make((3, 4, 200, 32), seed=9), make((3, 4, 200, 32), seed=10)
    before = ops.get_num_threads()
    try:
        ops.set_num_threads(1)
        one = ops.lagkv_scores(k, v, lag=16, sinks=4, per_chunk=True)
        ops.set_num_threads(2)
        two = ops.lagkv_scores(k, v, lag=16, sinks=4, per_chunk=True)
    finally:
        ops.set_num_threads(before)
    assert torch.equal(one, two)


def test_numpy_inputs():
    k, v = make((1, 2, 40, 8), fw="numpy", seed=11), make((1, 2, 40, 8), fw="numpy", seed=12)
    got = ops.lagkv_scores(k, v, lag=8, sinks=4)
    ref = lagkv_ref(torch.from_numpy(k), torch.from_numpy(v), 8, 4)
    assert_scores_close(torch.from_numpy(got), ref, lagkv_ref(torch.from_numpy(k), torch.from_numpy(v), 8, 4,
                                                               dtype=torch.float32))


def test_op_arguments_are_checked():
    k, v = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    with pytest.raises(KVCompressValueError, match="lag"):
        ops.lagkv_scores(k, v, lag=0)
    with pytest.raises(KVCompressValueError, match="sinks"):
        ops.lagkv_scores(k, v, lag=4, sinks=-1)
    with pytest.raises(KVCompressTypeError, match="lag"):
        ops.lagkv_scores(k, v, lag=4.0)
    with pytest.raises(KVCompressTypeError, match="per_chunk"):
        ops.lagkv_scores(k, v, lag=4, per_chunk=1)
    with pytest.raises(KVCompressValueError, match="keys: head dim"):
        ops.lagkv_scores(k[..., :1], v, lag=4)
    with pytest.raises(KVCompressValueError, match="values: head dim"):
        ops.lagkv_scores(k, v[..., :1], lag=4)
    with pytest.raises(KVCompressTypeError, match="values"):
        ops.lagkv_scores(k, v.half(), lag=4)
    with pytest.raises(KVCompressValueError, match="values"):
        ops.lagkv_scores(k, v[:, :, :15], lag=4)
    with pytest.raises(KVCompressValueError, match="kv_start"):
        ops.lagkv_scores(k, v, lag=4, kv_start=torch.tensor([17]))
    assert ops.lagkv_scores(k[:0], v[:0], lag=4).shape == (0, 2, 16)


# -------------------------------------------------------------------- method


def _prompt(batch=1, length=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (batch, length), generator=g)


def _generate(model, ids, mask=None, n=10):
    return greedy(model, ids, mask, n=n)[0]


def check_row(kept, raw64, keep, lag, sinks, start, T, per_chunk, eps=1e-6):
    """`kept` (absolute slot indices of one head) against the float64 raw
    scores of that row: sinks, then the newest tail slots, then either an even
    share of every scored chunk (per_chunk) or the global top scores."""
    kept = sorted(int(i) for i in kept)
    assert len(kept) == keep and all(i >= start for i in kept)
    c0, M, te = layout(T, lag, sinks, start)
    sink_slots = list(range(start, c0))
    if keep <= len(sink_slots):
        assert kept == sink_slots[:keep]
        return
    tail_keep = min(T - te, keep - len(sink_slots))
    forced = sink_slots + list(range(T - tail_keep, T))
    assert set(forced) <= set(kept)
    left = keep - len(forced)
    if tail_keep < T - te:
        assert left == 0
        return
    if not per_chunk:
        scored = torch.full((T,), -INF, dtype=torch.float64)
        scored[c0:te] = raw64[c0:te]
        scored[forced] = INF
        assert_topk_consistent(kept, scored, forced, keep, eps=eps)
        return
    q, extra = divmod(left, M)
    for c in range(M):
        j0 = c0 + c * lag
        mine = [i - j0 for i in kept if j0 <= i < j0 + lag]
        want = q + (1 if c >= M - extra else 0)
        assert len(mine) == want, (c, len(mine), want)
        assert_topk_consistent(mine, raw64[j0:j0 + lag], [], want, eps=eps)


@pytest.mark.parametrize("per_chunk", [True, False])
@pytest.mark.parametrize("budget", [30, 12, 5])
def test_prefill_keeps_what_a_float64_recomputation_chooses(tiny_model, per_chunk, budget):
    ids = _prompt(batch=2, length=64)
    lag, sinks = 8, 2
    method = LagKV(budget=budget, lag=lag, sinks=sinks, per_chunk=per_chunk)
    cache = prefill(tiny_model, method, ids)
    for li, (_, k, v) in enumerate(layer_qkv(tiny_model, ids)):
        layer = cache.layers[li]
        T = k.shape[2]
        assert layer.seen == T and layer.n == budget
        raw = lagkv_ref(k, v, lag, sinks)
        for b in range(2):
            for h in range(k.shape[1]):
                kept = layer.positions[b, h].tolist()
                check_row(kept, raw[b, h], budget, lag, sinks, 0, T, per_chunk)
                torch.testing.assert_close(layer.keys[b, h].double(), k[b, h, kept], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(layer.values[b, h].double(), v[b, h, kept], rtol=1e-5, atol=1e-5)


def test_budget_above_prompt_is_identity(tiny_model):
    ids = _prompt(length=40)
    ref = _generate(tiny_model, ids)
    with kvc.compress(tiny_model, LagKV(budget=200, lag=8)) as session:
        out = _generate(tiny_model, ids)
    assert torch.equal(out, ref)
    assert all(layer.n == layer.seen == 40 + 9 for layer in session.cache.layers)


def test_left_padded_batch_matches_a_float64_recomputation(tiny_model):
    short, long_ = _prompt(length=45, seed=3)[0], _prompt(length=70, seed=4)[0]
    ids = torch.zeros(2, 70, dtype=torch.long)
    mask = torch.zeros(2, 70, dtype=torch.long)
    ids[0, 25:], mask[0, 25:] = short, 1
    ids[1], mask[1] = long_, 1
    lag, sinks, budget = 8, 3, 28
    cache = prefill(tiny_model, LagKV(budget=budget, lag=lag, sinks=sinks), ids, mask)
    starts = [25, 0]
    for li, (_, k, v) in enumerate(layer_qkv(tiny_model, ids, mask)):
        layer = cache.layers[li]
        raw = lagkv_ref(k, v, lag, sinks, torch.tensor(starts))
        assert layer.n == budget and layer.kv_start.tolist() == [0, 0]
        for b in range(2):
            for h in range(k.shape[1]):
                kept = layer.positions[b, h].tolist()
                # positions index the padded prompt: pads are never kept
                check_row(kept, raw[b, h], budget, lag, sinks, starts[b], 70, True,
                          eps=1e-5)
    # and generation runs with both rows compressed, then keeps the budget
    with kvc.compress(tiny_model, LagKV(budget=budget, lag=lag, sinks=sinks, interval=4)) as session:
        _generate(tiny_model, ids, mask, n=12)
    for layer in session.cache.layers:
        assert budget <= layer.n < budget + 4


def test_short_row_in_a_batch_generates_as_alone(tiny_model):
    in_batch, alone = short_row_beside_a_long_one(tiny_model, LagKV(budget=32, lag=8, interval=0), _prompt(length=20, seed=5)[0],
                                                  _prompt(length=60, seed=6)[0])
    assert torch.equal(in_batch, alone)


@pytest.mark.parametrize("kw, exc, name", [
    (dict(budget=16, lag=1), ValueError, "lag"),
    (dict(budget=16, lag="8"), TypeError, "lag"),
    (dict(budget=16, sinks=-1), ValueError, "sinks"),
    (dict(budget=16, sinks=2.0), TypeError, "sinks"),
    (dict(budget=16, per_chunk=1), TypeError, "per_chunk"),
    (dict(budget=4, sinks=4), ValueError, "budget"),
    (dict(budget=16, interval=-1), ValueError, "interval"),
    (dict(), ValueError, "budget"),
])
def test_bad_options_name_the_option(kw, exc, name):
    with pytest.raises(exc, match=name):
        LagKV(**kw)


def test_registered_and_built_from_a_spec():
    assert REGISTRY["lagkv"] is LagKV and kvc.LagKV is LagKV
    m = method_from_spec("lagkv:lag=16:sinks=2:per_chunk=false", ratio=0.5)
    assert (m.lag, m.sinks, m.per_chunk, m.ratio) == (16, 2, False, 0.5)
    assert not LagKV.needs_queries and m.min_budget() == 3
    assert m.describe() == "LagKV(ratio=0.5, sinks=2, lag=16, per_chunk=False)"
