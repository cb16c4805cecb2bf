"""KVMerger: the merging-set and Gaussian-merge ops against float64 loops,
the prefill's kept slots and merges against a float64 recomputation from the
tiny Llama's own q/k/v, full-budget equivalence, batches, decoding, option
checks and the command line."""

import math

import numpy as np
import pytest
import torch

import kvcompress as kvc
from kvcompress import ops
from kvcompress.compat import cache_kwargs
from kvcompress.methods import KVMerger
from generation import greedy, head_rows, left_pad, random_ids
from model_refs import assert_topk_consistent, group_mean, layer_qkv, window_attention64
from test_ops import DTYPE_IDS, DTYPES, assert_within_bound, make


# ------------------------------------------------------------ float64 references

def sets_ref(keys, threshold, sinks=0, window=0, kv_start=None):
    """(sims, runs) of kvmerger_sets, a plain float64 loop."""
    B, H, T, _ = keys.shape
    k = keys.double()
    sims = torch.full((B, H, T), math.nan, dtype=torch.float64)
    runs = torch.full((B, H, T), -1, dtype=torch.int64)
    for b in range(B):
        s = 0 if kv_start is None else int(kv_start[b])
        lo = min(s + sinks, T)
        hi = max(lo, T - window)
        for h in range(H):
            for j in range(lo, hi):
                runs[b, h, j] = j
                if j > lo:
                    x, y = k[b, h, j - 1], k[b, h, j]
                    nx, ny = x.norm(), y.norm()
                    c = 0.0 if nx == 0 or ny == 0 else float(x @ y / (nx * ny))
                    sims[b, h, j] = c
                    if c > threshold:
                        runs[b, h, j] = runs[b, h, j - 1]
    return sims, runs


def merge_ref(keys, values, scores, centers, runs, sigma, counts=None, dtype=torch.float64):
    """(keys, values, counts) of gauss_merge: per head, each set's kept slot of
    highest score absorbs the set's other slots with Gaussian weights; sums in
    `dtype` (float64 for the reference, the storage dtype for torch's own
    error)."""
    B, H, T, D = keys.shape
    C = centers.shape[2]
    k, v = keys.to(dtype), values.to(dtype)
    cnt = torch.ones(B, H, T, dtype=torch.float64) if counts is None else counts.double()
    ok = torch.zeros(B, H, C, D, dtype=dtype)
    ov = torch.zeros(B, H, C, values.shape[3], dtype=dtype)
    oc = torch.zeros(B, H, C, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            cen = [int(x) for x in centers[b, h] if x >= 0]
            kept = set(cen)
            for i, j in enumerate(cen):
                r = int(runs[b, h, j])
                members = [t for t in range(T) if r >= 0 and int(runs[b, h, t]) == r]
                mates = [t for t in members if t in kept]
                pivot = max(mates, key=lambda t: (float(scores[b, h, t]), -t)) if mates else j
                absorbed = [t for t in members if t not in kept] if pivot == j else []
                if not absorbed:
                    ok[b, h, i], ov[b, h, i], oc[b, h, i] = k[b, h, j], v[b, h, j], cnt[b, h, j]
                    continue
                ws = []
                for t in sorted(absorbed + [j]):
                    d2 = float(((k[b, h, j].double() - k[b, h, t].double()) ** 2).sum())
                    ws.append((t, float(cnt[b, h, t]) * (1.0 if t == j else math.exp(-d2 / (2 * sigma * sigma)))))
                W = sum(w for _, w in ws)
                ok[b, h, i] = sum(w * k[b, h, t] for t, w in ws) / W
                ov[b, h, i] = sum(w * v[b, h, t] for t, w in ws) / W
                oc[b, h, i] = sum(float(cnt[b, h, t]) for t, _ in ws)
    return ok, ov, oc


def _walk(B, H, T, D, seed, dtype=torch.float32, layout="contig"):
    """Keys of slowly drifting direction (adjacent cosines mostly high, with
    some jumps), so sets of every length occur."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, T, D, generator=g).double()
    jump = torch.rand(B, H, T, 1, generator=g) < 0.2
    keys = torch.zeros_like(x)
    keys[:, :, 0] = x[:, :, 0]
    for t in range(1, T):
        keys[:, :, t] = torch.where(jump[:, :, t], x[:, :, t], keys[:, :, t - 1] + 0.3 * x[:, :, t])
    keys = keys.to(dtype)
    if layout == "transposed":
        keys = keys.transpose(1, 2).contiguous().transpose(1, 2)
    return keys


OP_CASES = [(1, 1, 1, 4, 4, 0, 0), (2, 3, 40, 16, 12, 2, 3), (3, 2, 70, 33, 17, 0, 5), (2, 2, 9, 8, 8, 4, 6)]


def _centers(scores, keep, sinks, window, kv_start):
    return ops.select_topk(scores, keep, sinks=sinks, window=window, kv_start=kv_start)


@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: "B{}H{}T{}D{}Dv{}s{}w{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sets_match_float64_loop(case, dtype):
    B, H, T, D, _, sinks, window = case
    keys = _walk(B, H, T, D, seed=1, dtype=dtype, layout="transposed")
    starts = torch.tensor([min(3 * b, T) for b in range(B)])
    for ks in (None, starts):
        got = ops.kvmerger_sets(keys, threshold=0.6, sinks=sinks, window=window, kv_start=ks)
        sims64, runs64 = sets_ref(keys, 0.6, sinks, window, ks)
        same, _ = sets_ref(keys.to(dtype).float(), 0.6, sinks, window, ks)
        assert torch.isnan(got.sims).equal(torch.isnan(sims64))
        fin = ~torch.isnan(sims64)
        assert_within_bound(got.sims[fin], sims64[fin], same[fin].float(), "sims")
        # the sets follow the float64 cosines except within rounding of the threshold
        clear = ~((sims64 - 0.6).abs() < 1e-3).any(-1, keepdim=True).expand_as(runs64)
        assert torch.equal(got.runs[clear], runs64[clear])
        assert ((got.runs >= 0) == (runs64 >= 0)).all()


@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: "B{}H{}T{}D{}Dv{}s{}w{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("with_counts", [False, True])
def test_merge_matches_float64_loop(case, dtype, with_counts):
    B, H, T, D, Dv, sinks, window = case
    keys = _walk(B, H, T, D, seed=2, dtype=dtype)
    values = make((B, H, T, Dv), dtype, layout="strided", seed=3)
    g = torch.Generator().manual_seed(4)
    scores = torch.rand(B, H, T, generator=g)
    counts = (torch.randint(1, 5, (B, H, T), generator=g).float() if with_counts else None)
    starts = torch.tensor([min(2 * b, T - 1) for b in range(B)])
    keep = max(1, (T - int(starts.max())) // 3)
    centers = _centers(scores, keep, min(sinks, keep), 0, starts)
    runs = ops.kvmerger_sets(keys, threshold=0.5, sinks=sinks, window=window, kv_start=starts).runs
    got = ops.gauss_merge(keys, values, scores, centers, runs, sigma=1.5, counts=counts, kv_start=starts,
                          return_assign=True)
    k64, v64, c64 = merge_ref(keys, values, scores, centers, runs, 1.5, counts)
    ks, vs, _ = merge_ref(keys, values, scores, centers, runs, 1.5, counts, dtype=dtype)
    assert_within_bound(got.keys, k64, ks, "keys")
    assert_within_bound(got.values, v64, vs, "values")
    assert torch.equal(got.counts.double(), c64)
    # assign: every slot's fate, recomputed from the definition
    for b in range(B):
        for h in range(H):
            cen = [int(x) for x in centers[b, h] if x >= 0]
            for t in range(T):
                a = int(got.assign[b, h, t])
                if t < starts[b]:
                    assert a == -1
                elif t in cen:
                    assert a == cen.index(t) + 1
                elif a > 0:
                    p = cen[a - 1]
                    assert runs[b, h, p] == runs[b, h, t] >= 0
                else:
                    assert runs[b, h, t] < 0 or not any(runs[b, h, c] == runs[b, h, t] for c in cen)
    if with_counts:  # tokens are conserved: each real token is a center, absorbed, or dropped
        dropped = sum(float(counts[b, h, t]) for b in range(B) for h in range(H) for t in range(T)
                      if got.assign[b, h, t] == 0)
        real = sum(float(counts[b, h, int(starts[b]):].sum()) for b in range(B) for h in range(H))
        assert abs(float(got.counts.sum()) + dropped - real) < 1e-3


def test_a_center_that_absorbs_nothing_is_copied_bit_for_bit():
    keys = _walk(2, 2, 30, 8, seed=5, dtype=torch.bfloat16)
    values = make((2, 2, 30, 8), torch.bfloat16, seed=6)
    scores = torch.rand(2, 2, 30, generator=torch.Generator().manual_seed(7))
    centers = _centers(scores, 30, 0, 0, None)  # everything kept: nothing to absorb
    runs = ops.kvmerger_sets(keys, threshold=-0.5).runs
    got = ops.gauss_merge(keys, values, scores, centers, runs, sigma=1.0)
    assert torch.equal(got.keys, keys) and torch.equal(got.values, values) and (got.counts == 1).all()


def test_threshold_one_merges_nothing_so_it_is_plain_eviction():
    keys = _walk(1, 2, 40, 8, seed=8)
    values = make((1, 2, 40, 8), seed=9)
    scores = torch.rand(1, 2, 40, generator=torch.Generator().manual_seed(10))
    centers = _centers(scores, 10, 0, 0, None)
    runs = ops.kvmerger_sets(keys, threshold=1.0).runs
    assert torch.equal(runs, torch.arange(40).expand(1, 2, 40))
    got = ops.gauss_merge(keys, values, scores, centers, runs, sigma=1.0)
    assert torch.equal(got.keys, keys.gather(2, centers[..., None].expand(-1, -1, -1, 8)))


def test_thread_count_does_not_change_bits():
    keys = _walk(3, 4, 90, 24, seed=11)
    values = make((3, 4, 90, 20), seed=12)
    scores = torch.rand(3, 4, 90, generator=torch.Generator().manual_seed(13))
    centers = _centers(scores, 20, 2, 3, None)
    old = ops.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            ops.set_num_threads(n)
            s = ops.kvmerger_sets(keys, threshold=0.5, sinks=2, window=3)
            outs.append((s.sims, s.runs, *ops.gauss_merge(keys, values, scores, centers, s.runs, sigma=2.0)[:3]))
    finally:
        ops.set_num_threads(old)
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.equal(a.nan_to_num(7.0) if a.is_floating_point() else a,
                               b.nan_to_num(7.0) if b.is_floating_point() else b)


def test_numpy_inputs():
    keys = _walk(1, 2, 20, 8, seed=14).numpy()
    s = ops.kvmerger_sets(keys, threshold=0.5)
    assert isinstance(s.runs, np.ndarray) and s.runs.dtype == np.int64
    scores = np.random.default_rng(0).random((1, 2, 20), dtype=np.float32)
    centers = ops.select_topk(scores, 5)
    m = ops.gauss_merge(keys, keys, scores, centers, s.runs, sigma=1.0)
    assert m.keys.shape == (1, 2, 5, 8)


def test_op_arguments_are_checked():
    keys = _walk(1, 1, 10, 4, seed=15)
    scores = torch.rand(1, 1, 10)
    centers = torch.tensor([[[1, 4, 7]]])
    runs = ops.kvmerger_sets(keys, threshold=0.0).runs
    with pytest.raises(ValueError, match="sigma"):
        ops.gauss_merge(keys, keys, scores, centers, runs, sigma=0.0)
    with pytest.raises(ValueError, match="sigma"):
        ops.gauss_merge(keys, keys, scores, centers, runs, sigma=-1.0)
    bad = runs.clone()
    bad[0, 0, 5] = 2 if int(runs[0, 0, 4]) != 2 else 3  # neither itself nor its neighbour's set
    with pytest.raises(ValueError, match="runs"):
        ops.gauss_merge(keys, keys, scores, centers, bad, sigma=1.0)
    with pytest.raises(ValueError, match="centers"):
        ops.gauss_merge(keys, keys, scores, torch.tensor([[[4, 1, 7]]]), runs, sigma=1.0)
    with pytest.raises(ValueError, match="centers"):
        ops.gauss_merge(keys, keys, scores, centers, runs, sigma=1.0, kv_start=torch.tensor([2]))
    with pytest.raises(ValueError, match="counts"):
        ops.gauss_merge(keys, keys, scores, centers, runs, sigma=1.0, counts=torch.zeros(1, 1, 10))
    with pytest.raises(ValueError, match="sinks"):
        ops.kvmerger_sets(keys, threshold=0.5, sinks=-1)
    with pytest.raises(ValueError, match="threshold"):
        ops.kvmerger_sets(keys, threshold=math.nan)
    with pytest.raises(TypeError, match="threshold"):
        ops.kvmerger_sets(keys, threshold="0.5")


# ------------------------------------------------------------ the method on the tiny Llama

def _gen(model, method, ids, mask, n):
    out, session = greedy(model, ids, mask, method=method, n=n)
    return out, None if session is None else session.cache


TINY = dict(window=4, sinks=2, threshold=0.2, sigma=0.5)  # the tiny Llama's keys: |k| ~ 0.6, median cos ~ 0.1-0.5


def _expected_head(k64, v64, S, kept, lo, hi, threshold, sigma):
    """Float64 KVMerger of one head given its kept positions: sets over the
    candidates [lo, hi) by neighbour cosine, each set's kept slot of highest
    S absorbing the set's other slots. Returns {position: (key, value, count)}."""
    run = {}
    for j in range(lo, hi):
        c = float(k64[j - 1] @ k64[j] / (k64[j - 1].norm() * k64[j].norm())) if j > lo else -2.0
        run[j] = run[j - 1] if c > threshold else j
    out = {}
    for p in kept:
        out[p] = (k64[p], v64[p], 1.0)
    for r in set(run.values()):
        members = [j for j in run if run[j] == r]
        mates = [j for j in members if j in kept]
        absorbed = [j for j in members if j not in kept]
        if not mates or not absorbed:
            continue
        p = max(mates, key=lambda j: (float(S[j]), -j))
        group = sorted(absorbed + [p])
        w = torch.tensor([1.0 if j == p else math.exp(-float(((k64[p] - k64[j]) ** 2).sum()) / (2 * sigma ** 2))
                          for j in group], dtype=torch.float64)
        out[p] = ((w[:, None] * k64[group]).sum(0) / w.sum(), (w[:, None] * v64[group]).sum(0) / w.sum(),
                  float(len(group)))
    return out


def test_prefill_keeps_and_merges_what_a_float64_recomputation_gives(tiny_model):
    budget = 20
    method = KVMerger(budget=budget, **TINY)
    rows = [random_ids(40, 1), random_ids(61, 2)]
    ids, mask = left_pad(rows)
    _, cache = _gen(tiny_model, method, ids, mask, 1)
    ref = layer_qkv(tiny_model, ids, mask)
    T = ids.shape[1]
    kv_start = torch.tensor([T - len(r) for r in rows])
    merged_heads = 0
    uniform_differs = False
    for li, layer in enumerate(cache.layers):
        q64, k64, v64 = ref[li]
        S = group_mean(window_attention64(q64[:, :, -TINY["window"]:], k64, kv_start), k64.shape[1])
        for (b, h), (k, v, pos, cnt) in head_rows(layer).items():
            pad = int(kv_start[b])
            lo, hi = pad + TINY["sinks"], T - TINY["window"]
            forced = list(range(pad, lo)) + list(range(hi, T))
            assert pos.tolist() == sorted(pos.tolist()) and len(pos) == budget
            assert_topk_consistent([p - pad for p in pos.tolist()], S[b, h, pad:], [f - pad for f in forced], budget)
            want = _expected_head(k64[b, h], v64[b, h], S[b, h], set(pos.tolist()), lo, hi, TINY["threshold"],
                                  TINY["sigma"])
            for i, p in enumerate(pos.tolist()):
                wk, wv, wc = want[p]
                assert float(cnt[i]) == wc, (li, b, h, p)
                torch.testing.assert_close(k[i], wk, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(v[i], wv, atol=1e-5, rtol=1e-5)
                if wc > 2:
                    merged_heads += 1
                    # a deliberately wrong reference (uniform weights, sigma -> inf) is told apart
                    members = _expected_head(k64[b, h], v64[b, h], S[b, h], set(pos.tolist()), lo, hi,
                                             TINY["threshold"], 1e9)[p]
                    uniform_differs |= bool((members[1] - v[i]).abs().max() > 1e-3)
    assert merged_heads >= 8
    assert uniform_differs


def test_budget_above_the_prompt_reproduces_generate(tiny_model):
    ids, mask = left_pad([random_ids(30, 8), random_ids(45, 9)])
    plain, _ = _gen(tiny_model, None, ids, mask, 8)
    out, _ = _gen(tiny_model, KVMerger(budget=60, interval=4, **TINY), ids, mask, 8)
    assert torch.equal(out, plain)


def test_threshold_one_is_snapkv_style_eviction(tiny_model):
    """With nothing merged, the kept slots are the forced ones plus the top
    window scores, each a copy of its token (counts 1)."""
    ids, mask = left_pad([random_ids(45, 12)])
    _, cache = _gen(tiny_model, KVMerger(budget=16, window=4, sinks=2, threshold=1.0), ids, mask, 1)
    ref = layer_qkv(tiny_model, ids, mask)
    for li, layer in enumerate(cache.layers):
        for (b, h), (k, v, pos, cnt) in head_rows(layer).items():
            assert (cnt == 1).all()
            torch.testing.assert_close(k, ref[li][1][b, h, pos], atol=1e-5, rtol=1e-5)


def test_a_padded_row_generates_what_it_generates_alone(tiny_model):
    short, long_ = random_ids(24, 10), random_ids(48, 11)
    ids, mask = left_pad([short, long_])
    method = KVMerger(budget=14, interval=4, **TINY)
    out, cache = _gen(tiny_model, method, ids, mask, 10)
    alone_s, _ = _gen(tiny_model, method, short[None], torch.ones(1, 24, dtype=torch.long), 10)
    alone_l, _ = _gen(tiny_model, method, long_[None], torch.ones(1, 48, dtype=torch.long), 10)
    assert torch.equal(out[0, -34:], alone_s[0])
    assert torch.equal(out[1], alone_l[0])
    assert any((c > 1).any() for layer in cache.layers for (_, _, _, c) in head_rows(layer).values())


def test_decoding_keeps_the_budget_and_counts_every_token_once_at_most(tiny_model):
    ids, mask = left_pad([random_ids(30, 13)])
    new = 14
    out, cache = _gen(tiny_model, KVMerger(budget=12, interval=4, **TINY), ids, mask, new)
    for layer in cache.layers:
        for (_, h), (_, _, pos, cnt) in head_rows(layer).items():
            assert len(pos) <= 12 + 4
            assert pos.tolist() == sorted(set(pos.tolist()))
            assert float(cnt.sum()) <= out.shape[1] - 1
            assert (cnt >= 1).all()


def test_recompact_matches_float64_reference():
    """The decode-time re-merge on held slots with counts: scores from the
    held queries, top slots kept, sets merged with count-weighted Gaussian
    weights and counts summed."""
    N, G, M, D = 3, 2, 30, 8
    g = torch.Generator().manual_seed(16)
    keys = _walk(N, 1, M, D, seed=17)
    values = torch.randn(N, 1, M, D, generator=g)
    queries = torch.randn(N, G, 2, D, generator=g)  # fewer held queries than the window
    counts = torch.randint(1, 4, (N, M), generator=g).float()
    start = torch.tensor([0, 3, 5])
    budgets = torch.tensor([[10], [10], [10]])
    m = KVMerger(budget=10, window=3, sinks=1, threshold=0.4, sigma=1.0)
    centers, merged, carried = m.recompact(queries, keys, values, counts, None, start, budgets, D ** -0.5)
    S = group_mean(window_attention64(queries.double(), keys.double(), start), 1)
    runs = sets_ref(keys, 0.4, 1, 3, start)[1]
    k64, v64, c64 = merge_ref(keys, values, S.float(), centers, runs, 1.0, counts[:, None])
    for r in range(N):
        s = int(start[r])
        kept = [int(x) - s for x in centers[r, 0] if x >= 0]
        assert_topk_consistent(kept, S[r, 0, s:], [0] + list(range(M - s - 3, M - s)), 10)
    torch.testing.assert_close(merged.keys.double(), k64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged.values.double(), v64, atol=1e-5, rtol=1e-5)
    assert torch.equal(merged.counts.double(), c64)
    assert torch.isnan(carried).all()


# ------------------------------------------------------------ options and the command line

@pytest.mark.parametrize("kw, exc, name", [
    (dict(threshold=1.5), ValueError, "threshold"),
    (dict(threshold=-1.0), ValueError, "threshold"),
    (dict(threshold=math.nan), ValueError, "threshold"),
    (dict(threshold="0.8"), TypeError, "threshold"),
    (dict(sigma=0.0), ValueError, "sigma"),
    (dict(sigma=-2.0), ValueError, "sigma"),
    (dict(sigma=math.inf), ValueError, "sigma"),
    (dict(sigma=True), TypeError, "sigma"),
    (dict(window=0), ValueError, "window"),
    (dict(sinks=-1), ValueError, "sinks"),
    (dict(sinks=1.5), TypeError, "sinks"),
    (dict(merge_bias=1), TypeError, "merge_bias"),
    (dict(gqa="sum"), ValueError, "gqa"),
    (dict(budget=10), ValueError, "budget"),  # sinks 4 + window 16
    (dict(interval=-1), ValueError, "interval"),
])
def test_bad_options_are_refused_by_name(kw, exc, name):
    kw.setdefault("budget", 64)
    with pytest.raises(exc, match=name):
        KVMerger(**kw)


def test_flags_registry_and_command_line():
    m = kvc.KVMerger(budget=20)
    assert m.min_budget() == 20 and m.headwise and m.merges and m.count_bias
    assert not KVMerger(budget=20, merge_bias=False).count_bias
    from kvcompress.methods import EVICTING, REGISTRY, method_from_spec

    assert REGISTRY["kvmerger"] is KVMerger and "kvmerger" in EVICTING
    spec = method_from_spec("kvmerger:threshold=0.8", budget=64)
    assert isinstance(spec, KVMerger) and spec.threshold == 0.8 and spec.budget == 64
    spec = method_from_spec("kvmerger:sigma=2:merge_bias=false", ratio=0.5)
    assert spec.sigma == 2 and spec.merge_bias is False and spec.ratio == 0.5


def test_a_ratio_below_the_window_takes_a_second_chunk(tiny_model):
    """A ratio can keep fewer slots than the window (a budget cannot): a
    second chunk's re-merge scored with as many window queries as slots it
    holds (it asked for ``window`` queries over 7 slots and was refused)."""
    ids = torch.randint(3, 512, (1, 44), generator=torch.Generator().manual_seed(0))
    method = KVMerger(ratio=0.9)
    with kvc.compress(tiny_model, method) as session, torch.no_grad():
        cache = session.new_cache()
        tiny_model(input_ids=ids[:, :40], use_cache=True, **cache_kwargs(tiny_model, cache))
        held = [layer.n for layer in cache.layers]
        assert max(held) < method.window  # the case: fewer slots than the window
        tiny_model(input_ids=ids[:, 40:], use_cache=True, **cache_kwargs(tiny_model, cache))
    assert cache.get_seq_length() == 44
