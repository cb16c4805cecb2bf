"""DynamicKV and SqueezeAttention (per-layer budgets decided after the whole
prefill): their C ops against float64 loops, the layers' budgets against an
independent float64 recomputation from the tiny model's own queries, keys and
hidden states, kept sets against SnapKV's at each layer's budget, totals,
generate() equivalence, batches, options and the command line."""

from __future__ import annotations

import math

import pytest
import torch

import kvcompress as kvc
from kvcompress import KVCompressError, ops
from kvcompress.compat import cache_kwargs
from kvcompress.methods import DynamicKV, SnapKV, SqueezeAttention, method_from_spec, parse_method_spec
from kvcompress.methods.layerbudget import apportion, kmeans_1d
from model_refs import group_mean, layer_qkv, window_attention64
from reference import pool1d_ref
from test_ops import DTYPE_IDS, DTYPES, assert_within_bound, make


# ------------------------------------------------------------------ references
def pooled_counts_ref(scores, k):
    """Per row: sort every (score, layer) by score descending then layer, take
    the first k[b], count them per layer (float64, plain Python)."""
    B, L, M = scores.shape
    out = torch.zeros(B, L, dtype=torch.int64)
    for b in range(B):
        entries = sorted(((float(scores[b, l, j]), l) for l in range(L) for j in range(M)),
                         key=lambda e: (-e[0], e[1]))
        for _, l in entries[: int(k[b])]:
            out[b, l] += 1
    return out


def row_cosine_ref(x, y, dtype=torch.float64):
    a, c = x.to(dtype), y.to(dtype)
    xy, xx, yy = (a * c).sum(1), (a * a).sum(1), (c * c).sum(1)
    ok = (xx > 0) & (yy > 0)
    return torch.where(ok, xy / (xx.sqrt() * yy.sqrt()), torch.zeros_like(xy))


def largest_remainder(want, total):
    """Floors plus one for the largest fractional parts (ties: lower index)."""
    base = [math.floor(w) for w in want]
    order = sorted(range(len(want)), key=lambda i: (-(want[i] - base[i]), i))
    for i in order[: total - sum(base)]:
        base[i] += 1
    return base


# ------------------------------------------------------------------ ops
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 7), (3, 5, 40), (1, 12, 64)], ids=lambda s: "B{}L{}M{}".format(*s))
@pytest.mark.parametrize("ties", [False, True])
def test_pooled_counts_against_loop(shape, ties):
    B, L, M = shape
    g = torch.Generator().manual_seed(1)
    s = torch.randn(B, L, M, generator=g)
    if ties:
        s = (s * 2).round()
        s[torch.rand(B, L, M, generator=g) < 0.25] = float("-inf")
    for k in (torch.zeros(B, dtype=torch.int64), torch.randint(0, L * M + 1, (B,), generator=g),
              torch.full((B,), L * M, dtype=torch.int64)):
        got = ops.pooled_counts(s, k)
        assert torch.equal(got, pooled_counts_ref(s, k))
        assert torch.equal(got.sum(1), k)
    # a strided view gives the same counts
    big = torch.full((B, L, 2 * M), float("nan"))
    big[..., ::2] = s
    k = torch.randint(0, L * M + 1, (B,), generator=g)
    assert torch.equal(ops.pooled_counts(big[..., ::2], k), pooled_counts_ref(s, k))


def test_pooled_counts_ties_go_to_the_lower_layer():
    s = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [2.0, 1.0]]])
    assert ops.pooled_counts(s, 2).tolist() == [[1, 0, 1]]
    assert ops.pooled_counts(s, 3).tolist() == [[1, 1, 1]]
    assert ops.pooled_counts(s, 4).tolist() == [[1, 2, 1]]


def test_pooled_counts_checks_its_arguments():
    s = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="k: value 13"):
        ops.pooled_counts(s, torch.tensor([1, 13]))
    with pytest.raises(ValueError, match="k: -1 is outside"):
        ops.pooled_counts(s, -1)
    with pytest.raises(ValueError, match="k: 9223372036854775808 is outside"):
        ops.pooled_counts(s, 2**63)
    bad = s.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"scores: NaN at \[1, 2, 3\]"):
        ops.pooled_counts(bad, 2)
    with pytest.raises(TypeError, match="scores"):
        ops.pooled_counts(s.half(), 2)
    with pytest.raises(ValueError, match="k"):
        ops.pooled_counts(s, torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (33, 64), (5, 576)], ids=lambda s: "N{}D{}".format(*s))
@pytest.mark.parametrize("layout", ["contig", "strided", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_row_cosine_against_float64(shape, layout, dtype):
    N, D = shape
    if layout == "transposed":
        x = make((D, N), dtype, seed=2).t()
        y = make((D, N), dtype, seed=3).t()
    else:
        x = make(shape, dtype, layout, seed=2)
        y = make(shape, dtype, layout, seed=3)
    y[0] = x[0]  # cos 1
    if N > 1:
        x[1] = 0  # a zero row: cos 0
    got = ops.row_cosine(x, y)
    ref = row_cosine_ref(x, y)
    # torch's own float32 error (low-precision dtypes are first read as float32, as the op does)
    assert_within_bound(got, ref, row_cosine_ref(x.float(), y.float(), dtype=torch.float32), "cos")
    if N > 1:
        assert float(got[1]) == 0.0


def test_row_cosine_checks_its_arguments():
    with pytest.raises(ValueError, match="y"):
        ops.row_cosine(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(TypeError, match="y"):
        ops.row_cosine(torch.randn(3, 4), torch.randn(3, 4).half())


# ------------------------------------------------------------------ helpers on the tiny model
W, KERNEL, BUDGET = 8, 5, 40


def prefill(model, method, ids, mask=None):
    """The cache after one prefill forward inside a compress() session."""
    with kvc.compress(model, method) as session:
        cache = session.new_cache()
        with torch.no_grad():
            model(ids, attention_mask=mask, use_cache=True, **cache_kwargs(model, cache))
    return cache


def kept(cache, b=0):
    """Per layer, row b's real slots per head."""
    return [layer.n - layer._start[b] for layer in cache.layers]


def prompt(T, seed=0):
    return torch.randint(3, 512, (1, T), generator=torch.Generator().manual_seed(seed))


def snap_scores64(q, k, w=W, kernel=KERNEL):
    """SnapKV's scores in float64 for one unpadded row: [Hkv, T]."""
    s = group_mean(window_attention64(q[:, :, -w:], k), k.shape[1])[0]
    T = s.shape[1]
    s[:, : T - w] = pool1d_ref(s[None, :, : T - w], kernel)[0]
    return s


# ------------------------------------------------------------------ DynamicKV
def dynamickv_ref(model, ids, budget=BUDGET, r_max=2.0, refresh=2, w=W, kernel=KERNEL, layers=None):
    """Budgets per layer of one unpadded row, from the model's own q/k in
    float64; ``layers``: only those share the budget (the others slide)."""
    qkv = layer_qkv(model, ids)
    if layers is not None:
        qkv = [qkv[i] for i in layers]
    L, T = len(qkv), ids.shape[1]
    H = qkv[0][1].shape[1]
    sel = budget - w
    c = min(T - w, math.ceil(r_max * sel))
    cand = []
    for q, k, _ in qkv:
        s = snap_scores64(q, k, w, kernel)[:, : T - w]
        cand.append(sorted(s.topk(c, dim=1).values.flatten().tolist(), reverse=True))
    offered = [H * c] * L
    ends = list(range(refresh, L, refresh)) + [L]
    for end in ends:
        pool = sorted(((v, j) for j in range(end) for v in cand[j][: offered[j]]), key=lambda e: (-e[0], e[1]))
        counts = [0] * end
        for _, j in pool[: end * H * sel]:
            counts[j] += 1
        offered[:end] = counts
    return largest_remainder([w + n / H for n in offered], L * budget)


def test_dynamickv_budgets_match_float64_recomputation(tiny_model):
    ids = prompt(160)
    m = DynamicKV(budget=BUDGET, window=W, kernel=KERNEL, refresh=2)
    cache = prefill(tiny_model, m, ids)
    got = kept(cache)
    ref = dynamickv_ref(tiny_model, ids)
    assert got == ref
    assert len(set(got)) > 1  # the layers do get different budgets
    # the comparison discriminates: scores without pooling, or a per-layer
    # cap of exactly the budget (r_max = 1: uniform), give other budgets
    assert dynamickv_ref(tiny_model, ids, kernel=1) != got
    assert dynamickv_ref(tiny_model, ids, r_max=1.0) == [BUDGET] * len(got) != got
    assert sum(got) == len(got) * BUDGET


def test_dynamickv_kept_sets_are_snapkvs_at_each_layers_budget(tiny_model):
    ids = prompt(150, seed=1)
    cache = prefill(tiny_model, DynamicKV(budget=BUDGET, window=W, kernel=KERNEL, refresh=2), ids)
    for li, layer in enumerate(cache.layers):
        snap = prefill(tiny_model, SnapKV(budget=kept(cache)[li], window=W, kernel=KERNEL), ids)
        assert torch.equal(layer.positions, snap.layers[li].positions), f"layer {li}"


# ------------------------------------------------------------------ SqueezeAttention
def hidden64(model, ids):
    """Per layer, the mean over tokens of cos(x, x + attn(x)) in float64,
    captured with hooks on a plain forward."""
    cap = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.register_forward_pre_hook(
            lambda mod, args, kw, i=i: cap.__setitem__(("x", i), kw.get("hidden_states", args[0] if args else None)),
            with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(
            lambda mod, args, out, i=i: cap.__setitem__(("a", i), out[0])))
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    sims = []
    for i in range(len(model.model.layers)):
        x = cap[("x", i)][0].double()
        y = x + cap[("a", i)][0].double()
        sims.append(float((torch.nn.functional.cosine_similarity(x, y, dim=1)).mean()))
    return sims


def kmeans_ref(values, k=3):
    """Lloyd's algorithm from the quantile start the method documents."""
    n = len(values)
    order = sorted(values)
    cent = [order[min(n - 1, (2 * i + 1) * n // (2 * k))] for i in range(k)]
    assign = None
    while True:
        new = [min(range(k), key=lambda c: (abs(v - cent[c]), c)) for v in values]
        if new == assign:
            return assign, cent
        assign = new
        for c in range(k):
            members = [v for v, a in zip(values, assign) if a == c]
            if members:
                cent[c] = sum(members) / len(members)


def squeeze_ref(model, ids, budget=BUDGET, p=0.85, pick=max, layers=None):
    sims = hidden64(model, ids)
    if layers is not None:
        sims = [sims[i] for i in layers]
    L = len(sims)
    assign, cent = kmeans_ref(sims)
    top = pick(set(assign), key=lambda c: cent[c])
    cut = [i for i in range(L) if assign[i] == top]
    extra = len(cut) * (1 - p) * budget / (L - len(cut))
    return largest_remainder([p * budget if i in cut else budget + extra for i in range(L)], L * budget)


def test_squeezeattention_budgets_match_float64_recomputation(tiny_model):
    ids = prompt(160, seed=2)
    cache = prefill(tiny_model, SqueezeAttention(budget=BUDGET, window=W, kernel=KERNEL), ids)
    got = kept(cache)
    assert got == squeeze_ref(tiny_model, ids)
    assert len(set(got)) > 1 and sum(got) == len(got) * BUDGET
    # discriminates: cutting the lowest-similarity group, or another p, differs
    assert squeeze_ref(tiny_model, ids, pick=min) != got
    assert squeeze_ref(tiny_model, ids, p=0.5) != got


def test_squeezeattention_kept_sets_are_snapkvs_at_each_layers_budget(tiny_model):
    ids = prompt(150, seed=3)
    cache = prefill(tiny_model, SqueezeAttention(budget=BUDGET, window=W, kernel=KERNEL, p=0.4), ids)
    for li, layer in enumerate(cache.layers):
        snap = prefill(tiny_model, SnapKV(budget=kept(cache)[li], window=W, kernel=KERNEL), ids)
        assert torch.equal(layer.positions, snap.layers[li].positions), f"layer {li}"


# ------------------------------------------------------------------ hybrid models
HYBRID_WINDOW = 32


@pytest.fixture(scope="module")
def hybrid_model():
    """An 8-layer Qwen2 whose even layers slide over 32 tokens (as Gemma 3's
    local layers do), random weights, float32."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    types = ["sliding_attention", "full_attention"] * 4
    config = Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, use_sliding_window=True, sliding_window=HYBRID_WINDOW, max_window_layers=0,
        layer_types=types, initializer_range=0.1)
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("kind", ["dynamickv", "squeezeattention"])
def test_hybrid_models_share_the_budget_among_full_layers_only(hybrid_model, kind):
    """Sliding layers keep their recent slots whatever they are given, so
    only the full-attention layers share ``n_full * budget``; their budgets
    are the float64 recomputation over those layers alone."""
    ids = prompt(160, seed=11)
    full = [1, 3, 5, 7]
    if kind == "dynamickv":
        method = DynamicKV(budget=BUDGET, window=W, kernel=KERNEL, refresh=2)
        ref = dynamickv_ref(hybrid_model, ids, layers=full)
        everyone = dynamickv_ref(hybrid_model, ids)  # the old reading: all 8 layers share
    else:
        method = SqueezeAttention(budget=BUDGET, window=W, kernel=KERNEL)
        ref = squeeze_ref(hybrid_model, ids, layers=full)
        everyone = squeeze_ref(hybrid_model, ids)
    cache = prefill(hybrid_model, method, ids)
    got = kept(cache)
    assert [got[i] for i in full] == ref
    assert len(set(ref)) > 1 and sum(ref) == len(full) * BUDGET
    # sliding layers keep their window's most recent slots, as under SnapKV
    snap = kept(prefill(hybrid_model, SnapKV(budget=BUDGET, window=W, kernel=KERNEL), ids))
    for i in range(8):
        if i not in full:
            assert got[i] == snap[i] == HYBRID_WINDOW - 1
            assert torch.equal(cache.layers[i].positions, torch.arange(160 - got[i], 160).expand_as(cache.layers[i].positions))
    # discriminates: sharing among all layers would give the full layers other budgets
    assert [everyone[i] for i in full] != ref
    # kept sets are SnapKV's at each full layer's budget
    for i in full:
        alone = prefill(hybrid_model, SnapKV(budget=got[i], window=W, kernel=KERNEL), ids)
        assert torch.equal(cache.layers[i].positions, alone.layers[i].positions), f"layer {i}"


def test_kmeans_and_apportion():
    assert kmeans_1d([0.1, 0.11, 0.5, 0.52, 0.9, 0.95]) == [0, 0, 1, 1, 2, 2]
    assert kmeans_1d([0.2] * 5) == [0] * 5 or len(set(kmeans_1d([0.2] * 5))) == 1
    got = apportion([3.0, 50.0, 50.0, 17.0], 120, 8, 45)
    assert sum(got) == 120 and min(got) >= 8 and max(got) <= 45
    assert apportion([10.5, 10.5, 11.0], 32, 1, 100) == [11, 10, 11]


# ------------------------------------------------------------------ whole model
METHODS = [
    lambda **kw: DynamicKV(window=W, kernel=KERNEL, refresh=2, interval=4, **kw),
    lambda **kw: SqueezeAttention(window=W, kernel=KERNEL, interval=4, **kw),
]
IDS = ["dynamickv", "squeezeattention"]


@pytest.mark.parametrize("make_method", METHODS, ids=IDS)
def test_budget_covering_the_prompt_is_plain_generate(tiny_model, make_method):
    ids = torch.cat([prompt(60, seed=4), prompt(60, seed=5)])
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    plain = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    with kvc.compress(tiny_model, make_method(budget=200)):
        got = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, plain)


@pytest.mark.parametrize("make_method", METHODS, ids=IDS)
def test_left_padded_rows_give_what_they_give_alone(tiny_model, make_method):
    a, b = prompt(110, seed=6), prompt(80, seed=7)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 30, dtype=torch.int64), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :30] = 0
    method = make_method(budget=BUDGET)
    with kvc.compress(tiny_model, method):
        both_ = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    cache = prefill(tiny_model, method, ids, mask)
    for row, alone in enumerate((a, b)):
        with kvc.compress(tiny_model, method):
            out = tiny_model.generate(alone, max_new_tokens=10, do_sample=False)
        n = out.shape[1] - alone.shape[1]  # the row alone may stop at <eos>
        assert torch.equal(out[0, alone.shape[1]:], both_[row, ids.shape[1]: ids.shape[1] + n]), f"row {row}"
        # per-row budgets: the row's layers keep what they keep alone
        assert kept(cache, row) == kept(prefill(tiny_model, method, alone)), f"row {row}"
        assert sum(kept(cache, row)) == len(cache.layers) * BUDGET


@pytest.mark.parametrize("make_method", METHODS, ids=IDS)
def test_a_row_shorter_than_the_window_beside_a_long_one(tiny_model, make_method):
    """A left-padded row with fewer real tokens than the window (its padding
    reaches past the long row's candidates, which end before the window) is
    kept whole and generates what it generates alone; the long row too.
    DynamicKV used to refuse the batch (``kv_start`` past the candidates)."""
    a, b = prompt(110, seed=8), prompt(W - 3, seed=9)
    pad = a.shape[1] - b.shape[1]
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.int64), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    with kvc.compress(tiny_model, make_method(budget=BUDGET)):
        both_ = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    for row, alone in enumerate((a, b)):
        with kvc.compress(tiny_model, make_method(budget=BUDGET)):
            out = tiny_model.generate(alone, max_new_tokens=10, do_sample=False)
        n = out.shape[1] - alone.shape[1]
        assert torch.equal(out[0, alone.shape[1]:], both_[row, ids.shape[1]: ids.shape[1] + n]), f"row {row}"


@pytest.mark.parametrize("make_method", METHODS, ids=IDS)
def test_model_keeps_num_layers_x_budget(tiny_model, make_method):
    for budget, ratio in ((BUDGET, None), (None, 0.6)):
        cache = prefill(tiny_model, make_method(budget=budget, ratio=ratio), prompt(170, seed=8))
        mean = BUDGET if budget else int(170 * 0.4)
        got = kept(cache)
        assert sum(got) == len(got) * mean
        assert min(got) >= W


@pytest.mark.parametrize("make_method", METHODS, ids=IDS)
def test_a_second_turn_behind_kivi_keeps_the_first_turns_budgets(tiny_model, make_method):
    """Behind KIVI every layer is packed once the first prefill is
    compressed, and a layer's statistic needs its slots in full precision:
    a second turn's chunk is compressed by each layer right after its
    attention, to the layer budgets of the first prefill (it used to fail
    reading the packed layer as a full-precision one)."""
    method = make_method(budget=BUDGET) + kvc.KIVI(bits=4, group=8, residual=8)
    with kvc.compress(tiny_model, method) as session:
        first = tiny_model.generate(prompt(120, seed=9), max_new_tokens=6, do_sample=False)
        cache = session.cache
        targets = [layer._targets()[0] for layer in cache.layers]
        assert sum(targets) == len(targets) * BUDGET
        ids = torch.cat([first, prompt(50, seed=10)], 1)
        out = tiny_model.generate(ids, max_new_tokens=9, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True, **cache_kwargs(tiny_model, cache))
    assert cache.get_seq_length() == ids.shape[1] + 8
    assert all(bool(torch.isfinite(x).all()) for x in out.logits)
    for layer, target in zip(cache.layers, targets):
        assert type(layer.store).__name__ == "PackedStore" and layer._targets()[0] == target
        # compressed at the second chunk, then at most interval - 1 slots over after 8 decode steps
        assert layer.n <= target + method.interval - 1


def test_squeezeattention_needs_the_session_hooks(tiny_model):
    cache = kvc.KVCache(SqueezeAttention(budget=BUDGET, window=W), num_layers=4)
    prev = kvc.enable(tiny_model)
    try:
        with torch.no_grad():
            out = tiny_model(prompt(90), use_cache=True, **cache_kwargs(tiny_model, cache))
            nxt = out.logits[:, -1:].argmax(-1)
            with pytest.raises(KVCompressError, match="hidden states"):
                tiny_model(nxt, use_cache=True, **cache_kwargs(tiny_model, cache))
    finally:
        tiny_model.set_attn_implementation(prev)


def test_bad_options_raise_naming_the_option():
    with pytest.raises(ValueError, match="r_max"):
        DynamicKV(budget=64, r_max=0.5)
    with pytest.raises(TypeError, match="r_max"):
        DynamicKV(budget=64, r_max="2")
    with pytest.raises(ValueError, match="refresh"):
        DynamicKV(budget=64, refresh=0)
    with pytest.raises(TypeError, match="refresh"):
        DynamicKV(budget=64, refresh=2.0)
    with pytest.raises(ValueError, match="p"):
        SqueezeAttention(budget=64, p=0.0)
    with pytest.raises(ValueError, match="p"):
        SqueezeAttention(budget=64, p=1.5)
    with pytest.raises(TypeError, match="p"):
        SqueezeAttention(budget=64, p=None)
    with pytest.raises(ValueError, match="budget"):
        SqueezeAttention(budget=8, window=16)
    with pytest.raises(ValueError, match="depth"):
        DynamicKV(budget=64) + kvc.MiniCache()


def test_command_line_specs_parse():
    assert parse_method_spec("dynamickv:refresh=4") == ("dynamickv", {"refresh": 4})
    assert parse_method_spec("squeezeattention:p=0.3") == ("squeezeattention", {"p": 0.3})
    m = method_from_spec("dynamickv:refresh=4:r_max=3", budget=64)
    assert isinstance(m, DynamicKV) and m.refresh == 4 and m.r_max == 3
    m = method_from_spec("squeezeattention:p=0.3", ratio=0.5)
    assert isinstance(m, SqueezeAttention) and m.p == 0.3
    with pytest.raises(ValueError, match="refresh"):
        method_from_spec("dynamickv:refresh=0", budget=64)
