"""SCOPE: the prefill pool is the prefill method's, untouched while decoding;
the decoding pool (slide / adaptive / discontinuous) against an independent
float64 forward of the tiny random Llama, teacher-forced over random tokens
(its queries, keys and logits recomputed from the model's own weights, with
attention over the slots the cache held at each step); identity, batches,
memory and options."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import kvcompress as kvc
from kvcompress.compat import cache_kwargs
from kvcompress.methods import EVICTING, REGISTRY, SCOPE, method_from_spec, parse_method_spec

from model_refs import assert_topk_consistent, layer_qkv


def _tokens(n, seed, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (batch, n), generator=g)


def _generate(model, ids, mask=None, n=12, method=None):
    mask = torch.ones_like(ids) if mask is None else mask
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
              pad_token_id=0)
    if method is None:
        return model.generate(**kw), None
    with kvc.compress(model, method) as session:
        out = model.generate(**kw)
    return out, session.cache


# ------------------------------------------------------------ options and budgets


def test_options_are_validated_by_name():
    for kw, name in [(dict(decode=0), "decode"), (dict(recent=-1), "recent"), (dict(decode=8, recent=9), "recent"),
                     (dict(every=0), "every"), (dict(strategy="sliding"), "strategy"),
                     (dict(prefill="nope"), "prefill"), (dict(prefill="adakv"), "prefill"),
                     (dict(prefill="ems"), "prefill"), (dict(prefill="kivi"), "prefill"),
                     (dict(prefill="scope"), "prefill"), (dict(prefill=kvc.SnapKV(budget=32)), "prefill"),
                     (dict(prefill="dynamickv"), "prefill"), (dict(prefill="squeezeattention"), "prefill"),
                     (dict(prefill="fastgen"), "prefill"), (dict(prefill="kvmerger"), "prefill"),
                     (dict(strategy="discontinuous", every=4, interval=2), "interval"),
                     (dict(interval=-1), "interval"), (dict(budget=8), "budget")]:
        kw = {"budget": 64, **kw}
        with pytest.raises(ValueError, match=name):
            SCOPE(**kw)
    with pytest.raises(ValueError, match="prefill"):
        SCOPE(prefill=kvc.SnapKV(budget=64) + kvc.KIVI(bits=4))
    with pytest.raises(ValueError, match="quant"):
        SCOPE(budget=64) + kvc.KIVI(bits=4)
    for kw, name in [(dict(decode=2.5), "decode"), (dict(recent="4"), "recent"), (dict(every=True), "every"),
                     (dict(prefill=3), "prefill"), (dict(strategy="discontinuous", every=2.0), "every")]:
        with pytest.raises(TypeError, match=name):
            SCOPE(budget=64, **kw)
    with pytest.raises(ValueError, match="budget"):
        SCOPE()


def test_defaults_and_the_paper_s_pool_sizes():
    m = SCOPE(budget=64)
    assert (m.prefill, m.decode, m.recent, m.strategy, m.every, m.interval) == ("snapkv", 128, 64, "slide", 15, 1)
    assert SCOPE(budget=64, strategy="discontinuous", every=6).interval == 6
    assert SCOPE(budget=64, strategy="adaptive").interval == 1
    # slide: a fixed pool; adaptive: recent + (t - 1) // every heavy hitters, capped at decode
    s = SCOPE(budget=64, decode=10, recent=4, every=3)
    assert [s.decode_slots(t) for t in (0, 1, 9, 10, 11, 500)] == [0, 1, 9, 10, 10, 10]
    a = SCOPE(budget=64, decode=10, recent=4, every=3, strategy="adaptive")
    want = [min(t, 4 + min(6, (t - 1) // 3)) for t in range(1, 40)]
    assert [a.decode_slots(t) for t in range(1, 40)] == want
    assert a.decode_slots(4) == 4 and a.decode_slots(7) == 6 and a.decode_slots(19) == 10
    # the target: the prefill method's share of the prompt plus the decoding pool
    assert s.phase_target(0, 4, 200, 100) == 64 + 10
    assert s.phase_target(0, 4, 200, 5) == 64 + 5
    assert s.phase_target(0, 4, 20, 10) == 20 + 10  # a short prompt is kept whole
    assert s.row_target(0, 4, 200) == s.phase_target(0, 4, 200, 0) == 64  # nothing decoded yet
    r = SCOPE(ratio=0.75, decode=10)
    assert r.phase_target(0, 4, 400, 600) == 100 + 10  # the ratio applies to the prompt only
    p = SCOPE(budget=48, prefill="pyramidkv")
    assert [p.phase_target(li, 30, 900, 90) for li in (0, 29)] == [
        kvc.PyramidKV(budget=48).row_target(li, 30, 900) + 90 for li in (0, 29)]
    # every other method: one budget for every token
    assert kvc.SnapKV(budget=64).phase_target(0, 4, 50, 30) == kvc.SnapKV(budget=64).row_target(0, 4, 80) == 64


def test_usable_from_the_command_line():
    assert REGISTRY["scope"] is SCOPE and kvc.SCOPE is SCOPE and "scope" in EVICTING
    assert method_from_spec("scope:decode=64", budget=128) == SCOPE(budget=128, decode=64)
    assert parse_method_spec("scope:prefill=pyramidkv:strategy=adaptive:every=8") == (
        "scope", dict(prefill="pyramidkv", strategy="adaptive", every=8))
    m = method_from_spec("scope:prefill=h2o:decode=32:recent=8:strategy=discontinuous:every=4", ratio=0.5)
    assert m == SCOPE(ratio=0.5, prefill="h2o", decode=32, recent=8, strategy="discontinuous", every=4)
    assert m._inner == kvc.H2O(ratio=0.5) and m.interval == 4
    from kvcompress import eval as ev

    cfg = ev.EvalConfig.quick(budgets=[64, 128], ratios=None, methods=["scope:decode=64"])
    assert cfg.methods == ["scope:decode=64"]
    with pytest.raises(ValueError, match="strategy"):
        ev.EvalConfig.quick(budgets=[64], ratios=None, methods=["scope:strategy=nope"])
    assert "prefill=PyramidKV(budget=32" in SCOPE(prefill=kvc.PyramidKV(budget=32)).describe()


# ------------------------------------------------------------ the prefill pool


@pytest.mark.parametrize("prefill", [kvc.SnapKV(budget=18, window=4), kvc.PyramidKV(budget=18, window=4),
                                     kvc.H2O(budget=18)], ids=["snapkv", "pyramidkv", "h2o"])
def test_prefill_pool_is_the_prefill_method_s(tiny_model, prefill):
    ids = _tokens(50, seed=1, batch=2)
    outs = []
    for method in (prefill, SCOPE(prefill=prefill, decode=6, recent=2)):
        with kvc.compress(tiny_model, method) as session:
            cache = session.new_cache()
            with torch.no_grad():
                tiny_model(ids, **cache_kwargs(tiny_model, cache))
        outs.append([(layer.positions.clone(), layer.keys.clone(), dict(layer.state)) for layer in cache.layers])
    for (pa, ka, sa), (pb, kb, sb) in zip(*outs):
        assert torch.equal(pa, pb) and torch.equal(ka, kb)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # H2O's "acc"


def test_decoding_never_evicts_a_prompt_slot(tiny_model):
    ids = _tokens(50, seed=1, batch=2)
    prefill = kvc.H2O(budget=18)
    with kvc.compress(tiny_model, prefill) as session:
        cache = session.new_cache()
        with torch.no_grad():
            tiny_model(ids, **cache_kwargs(tiny_model, cache))
    pools = [layer.positions.clone() for layer in cache.layers]
    _, cache = _generate(tiny_model, ids, n=16, method=SCOPE(prefill=prefill, decode=6, recent=2))
    for layer, pos in zip(cache.layers, pools):
        assert torch.equal(layer.positions[..., : pos.shape[2]], pos)
        assert (layer.positions[..., pos.shape[2]:] >= 50).all() and layer.n == pos.shape[2] + 6


# ------------------------------------------------------------ the decoding pool


@torch.no_grad()
def _reference_step(m64, token, pos, kv, held):
    """One decode step of the Llama in float64: per layer the new token's
    query, key and value from the model's own weights, attention over the
    positions ``held[layer]`` ``[Hkv, n]`` (keys/values from ``kv``, which the
    step extends). Returns the queries per layer ``[Hq, D]`` and the logits."""
    h = m64.model.embed_tokens(torch.tensor([[token]]))
    cos, sin = m64.model.rotary_emb(h, torch.tensor([[pos]]))
    queries = []
    for li, block in enumerate(m64.model.layers):
        attn = block.self_attn
        D = attn.head_dim
        x = block.input_layernorm(h)
        q = attn.q_proj(x).view(1, 1, -1, D).transpose(1, 2)
        k = attn.k_proj(x).view(1, 1, -1, D).transpose(1, 2)
        v = attn.v_proj(x).view(1, 1, -1, D).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        kv[li][0][:, pos], kv[li][1][:, pos] = k[0, :, 0], v[0, :, 0]
        Hq, Hkv = q.shape[1], k.shape[1]
        out = torch.zeros(Hq, D, dtype=torch.float64)
        for hq in range(Hq):
            hk = hq // (Hq // Hkv)
            P = held[li][hk]
            w = torch.softmax(kv[li][0][hk, P] @ q[0, hq, 0] * D ** -0.5, 0)
            out[hq] = w @ kv[li][1][hk, P]
        h = h + attn.o_proj(out.reshape(1, 1, Hq * D))
        h = h + block.mlp(block.post_attention_layernorm(h))
        queries.append(q[0, :, 0])
    return queries, m64.lm_head(m64.model.norm(h))[0, 0]


def _check_decoding(model, method, prompt_len=40, steps=28, seed=7, mutate=None):
    """Run ``method`` teacher-forced over random tokens and check every decode
    step of every layer against the float64 reference: whether the layer
    re-selected, and what it kept (the prefill pool, the last ``recent``
    generated slots, and a top set of the newest query's float64 attention,
    GQA-averaged, among the other generated slots). ``mutate`` perturbs the
    reference rule, to show the comparison discriminates."""
    ids = _tokens(prompt_len + steps, seed=seed)
    prompt, fed = ids[:, :prompt_len], ids[0, prompt_len:].tolist()
    m64 = copy.deepcopy(model).double()
    T = prompt_len + steps
    kv = []
    for q, k, v in layer_qkv(m64, prompt):
        K = torch.zeros(k.shape[1], T, k.shape[3], dtype=torch.float64)
        V = torch.zeros_like(K)
        K[:, :prompt_len], V[:, :prompt_len] = k[0], v[0]
        kv.append((K, V))
    recent = method.recent + (mutate == "recent")
    interval = method.interval
    rounds = 0
    with kvc.compress(model, method) as session:
        cache = session.new_cache()
        with torch.no_grad():
            model(prompt, **cache_kwargs(model, cache))
        pool = [layer.positions[0].clone() for layer in cache.layers]
        for t, token in enumerate(fed, start=1):
            with torch.no_grad():
                out = model(torch.tensor([[token]]), **cache_kwargs(model, cache))
            kept = [layer.positions[0].clone() for layer in cache.layers]
            held = [torch.cat([pool[li], torch.full((pool[li].shape[0], 1), prompt_len + t - 1)], 1)
                    for li in range(len(pool))]
            queries, logits = _reference_step(m64, token, prompt_len + t - 1, kv, held)
            # the library attended over exactly those slots: same logits as float64
            torch.testing.assert_close(out.logits[0, -1].double(), logits, rtol=1e-4, atol=1e-4)
            for li, layer in enumerate(cache.layers):
                before, after = held[li], kept[li]
                n_prefill = int((before[0] < prompt_len).sum())
                keep = n_prefill + method.decode_slots(t)
                should = interval > 0 and before.shape[1] - keep >= interval
                assert (after.shape[1] < before.shape[1]) == should, (t, li, before.shape, after.shape)
                if not should:
                    assert torch.equal(after, before)
                    continue
                rounds += 1
                q = queries[li]
                Hkv, g = before.shape[0], q.shape[0] // before.shape[0]
                for h in range(Hkv):
                    K = kv[li][0][h, before[h]]
                    probs = torch.softmax(q[h * g:(h + 1) * g] @ K.T * q.shape[1] ** -0.5, -1)
                    scores = probs.mean(0)
                    if mutate == "accumulated":
                        scores = scores + torch.linspace(0, 1, scores.shape[0], dtype=torch.float64) * 0.5
                    n = before.shape[1]
                    forced = list(range(n_prefill)) + list(range(n - recent, n))
                    slots = [before[h].tolist().index(p) for p in after[h].tolist()]
                    assert_topk_consistent(slots, scores, sorted(set(forced)), keep, eps=1e-6)
            pool = kept
    return rounds


@pytest.mark.parametrize("kw", [
    dict(strategy="slide"),
    dict(strategy="slide", interval=3),
    dict(strategy="adaptive", every=3),
    dict(strategy="discontinuous", every=4),
], ids=["slide", "slide-interval3", "adaptive", "discontinuous"])
def test_decoding_pool_matches_a_float64_teacher_forced_recomputation(tiny_model, kw):
    method = SCOPE(prefill=kvc.SnapKV(budget=16, window=4), decode=10, recent=3, **kw)
    rounds = _check_decoding(tiny_model, method)
    assert rounds >= 4 * 4


def test_the_comparison_discriminates(tiny_model):
    method = SCOPE(prefill=kvc.SnapKV(budget=16, window=4), decode=10, recent=3)
    for mutate in ("recent", "accumulated"):
        with pytest.raises(AssertionError):
            _check_decoding(tiny_model, method, steps=18, mutate=mutate)


# ------------------------------------------------------------ identity, batches, memory


def test_budgets_above_prompt_and_output_reproduce_generate(tiny_model):
    ids = _tokens(30, seed=2)
    ref, _ = _generate(tiny_model, ids, n=12)
    for strategy in ("slide", "adaptive", "discontinuous"):
        out, cache = _generate(tiny_model, ids, n=12, method=SCOPE(budget=64, decode=12, strategy=strategy,
                                                                    every=1))
        assert torch.equal(out, ref), strategy
        assert all(layer.n == layer.seen == 30 + 11 for layer in cache.layers)


@pytest.mark.parametrize("strategy", ["slide", "discontinuous"])
def test_left_padded_rows_generate_what_they_generate_alone(tiny_model, strategy):
    rows = [_tokens(35, seed=3)[0], _tokens(70, seed=4)[0], _tokens(12, seed=5)[0]]
    L = 70
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, L - len(r):], mask[i, L - len(r):] = r, 1
    method = SCOPE(prefill=kvc.SnapKV(budget=20, window=4), decode=8, recent=3, strategy=strategy, every=3)
    out, cache = _generate(tiny_model, ids, mask, n=18, method=method)
    for i, r in enumerate(rows):
        alone, _ = _generate(tiny_model, r[None], n=18, method=method)
        assert torch.equal(out[i, -18:], alone[0, -18:]), i
    for layer in cache.layers:
        assert max(layer.head_lengths()) - int(layer.kv_start.min()) <= 20 + 8 + method.interval - 1


@pytest.mark.parametrize("strategy", ["slide", "adaptive", "discontinuous"])
def test_a_layer_holds_the_prefill_budget_plus_the_decoding_pool(tiny_model, strategy):
    method = SCOPE(budget=24, decode=12, recent=4, strategy=strategy, every=5,
                   **({} if strategy == "discontinuous" else dict(interval=3)))
    ids = _tokens(100, seed=8)
    peak = []
    with kvc.compress(tiny_model, method) as session:
        cache = session.new_cache()
        with torch.no_grad():
            tiny_model(ids, **cache_kwargs(tiny_model, cache))
            for t, token in enumerate(_tokens(80, seed=9)[0].tolist(), start=1):
                tiny_model(torch.tensor([[token]]), **cache_kwargs(tiny_model, cache))
                for layer in cache.layers:
                    assert 24 + method.decode_slots(t) <= layer.n < 24 + method.decode_slots(t) + method.interval
                peak.append(cache.memory_bytes())
    for layer in cache.layers:
        assert layer.n <= 24 + 12 + method.interval - 1
        assert layer.capacity <= 24 + 12 + method.interval
    assert max(peak[45:]) == max(peak[45:60])  # flat once the pool is full


def test_a_later_turn_is_a_prefill_and_interval_zero_keeps_growing(tiny_model):
    """A prefill chunk after decoding folds both pools into the prefill
    method's selection (the prefill budget), and the decoding pool starts
    again; ``interval=0`` never re-selects while decoding."""
    method = SCOPE(prefill=kvc.SnapKV(budget=16, window=4), decode=6, recent=2)
    with kvc.compress(tiny_model, method) as session:
        cache = session.new_cache()
        with torch.no_grad():
            tiny_model(_tokens(40, seed=10), **cache_kwargs(tiny_model, cache))
            for token in _tokens(10, seed=11)[0].tolist():
                tiny_model(torch.tensor([[token]]), **cache_kwargs(tiny_model, cache))
            assert all(layer.n == 16 + 6 for layer in cache.layers)
            tiny_model(_tokens(20, seed=12), **cache_kwargs(tiny_model, cache))
            assert all(layer.n == 16 and layer.positions.max() == 69 for layer in cache.layers)
            for token in _tokens(9, seed=13)[0].tolist():
                tiny_model(torch.tensor([[token]]), **cache_kwargs(tiny_model, cache))
            assert all(layer.n == 16 + 6 and (layer.positions[..., :16] < 70).all() for layer in cache.layers)
    _, cache = _generate(tiny_model, _tokens(40, seed=10), n=12, method=SCOPE(budget=16, decode=4, interval=0))
    assert all(layer.n == 16 + 11 for layer in cache.layers)
