"""FastGen: the fastgen_recovery op against a float64 recomputation, and the
method on a tiny random Llama (per-head policies and kept sets against an
independent float64 reading of the paper's profiling, identity, batches,
decoding by policy, options, command line)."""

from __future__ import annotations

import math

import pytest
import torch

import kvcompress as kvc
from kvcompress import KVCompressTypeError, KVCompressValueError, ops
from kvcompress.compat import cache_kwargs
from kvcompress.methods import REGISTRY, FastGen, method_from_spec, parse_method_spec
from kvcompress.methods.fastgen import _is_punct, token_classes

from model_refs import layer_qkv
from test_ops import DTYPE_IDS, DTYPES, assert_within_bound, make

# ------------------------------------------------------------------- the op


def recovery_ref(q, k, rung, P, *, scaling=None, kv_start=None, dtype=torch.float64):
    """Literal reading of the op's definition, computed in ``dtype``."""
    q, k = q.to(dtype), k.to(dtype)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    scaling = 1.0 / math.sqrt(D) if scaling is None else scaling
    start = torch.zeros(B, dtype=torch.int64) if kv_start is None else torch.as_tensor(kv_start)
    out = torch.zeros(B, Hkv, P, dtype=torch.float64)
    for b in range(B):
        s = int(start[b])
        rows = [i for i in range(Tq) if Tk - Tq + i >= s]
        if not rows:
            out[b] = 1.0
            continue
        for h in range(Hq):
            hk = h // g
            for i in rows:
                p = Tk - Tq + i
                a = torch.softmax((k[b, hk, s:p + 1] @ q[b, h, i]) * scaling, 0).double()
                r = rung[b, hk, s:p + 1].long()
                for x in range(P):
                    out[b, hk, x] += float(a[r <= x].sum())
        out[b] /= g * len(rows)
    return out


OP_SHAPES = [  # (B, Hq, Hkv, Tq, Tk, D, P)
    (1, 1, 1, 1, 1, 8, 1),
    (2, 4, 2, 5, 13, 16, 5),
    (2, 6, 2, 16, 40, 24, 4),
    (1, 2, 2, 33, 33, 8, 16),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", OP_SHAPES)
def test_recovery_matches_a_float64_loop(shape, dtype):
    B, Hq, Hkv, Tq, Tk, D, P = shape
    q = make((B, Hq, Tq, D), dtype, seed=1)
    k = make((B, Hkv, Tk, D), dtype, seed=2)
    g = torch.Generator().manual_seed(3)
    rung = torch.randint(0, P + 2, (B, Hkv, Tk), generator=g, dtype=torch.uint8)
    start = torch.tensor([min(3, Tk - 1), 0][:B])
    got = ops.fastgen_recovery(q, k, rung, P, kv_start=start)
    ref = recovery_ref(q, k, rung, P, kv_start=start)
    same = recovery_ref(q, k, rung, P, kv_start=start, dtype=dtype)
    assert_within_bound(got, ref, same, f"fastgen_recovery {shape}")
    # cumulative by construction: a policy keeps every cheaper policy's slots
    assert (got[..., 1:] >= got[..., :-1] - 1e-6).all()


def test_recovery_masks_padding_counts_queries_that_see_a_key_and_ignores_high_rungs():
    q, k = make((2, 2, 4, 8), seed=4), make((2, 1, 6, 8), seed=5)
    rung = torch.zeros(2, 1, 6, dtype=torch.uint8)
    # every slot in policy 0: each query recovers all its mass
    out = ops.fastgen_recovery(q, k, rung, 3, kv_start=torch.tensor([0, 3]))
    torch.testing.assert_close(out, torch.ones(2, 1, 3))
    # no query sees a key (all padding): an empty map, recovered whole
    out = ops.fastgen_recovery(q, k, rung, 2, kv_start=torch.tensor([6, 6]))
    torch.testing.assert_close(out, torch.ones(2, 1, 2))
    # a rung >= P is in no policy
    out = ops.fastgen_recovery(q, k, torch.full((2, 1, 6), 7, dtype=torch.uint8), 4)
    torch.testing.assert_close(out, torch.zeros(2, 1, 4))


def test_recovery_is_thread_count_independent():
    q, k = make((2, 8, 24, 32), seed=6), make((2, 2, 200, 32), seed=7)
    rung = torch.randint(0, 5, (2, 2, 200), generator=torch.Generator().manual_seed(8), dtype=torch.uint8)
    before = ops.get_num_threads()
    try:
        ops.set_num_threads(1)
        a = ops.fastgen_recovery(q, k, rung, 5)
        ops.set_num_threads(max(2, before))
        b = ops.fastgen_recovery(q, k, rung, 5)
    finally:
        ops.set_num_threads(before)
    assert torch.equal(a, b)


def test_recovery_bad_arguments_are_refused_by_name():
    q, k = make((1, 2, 3, 8)), make((1, 2, 5, 8))
    rung = torch.zeros(1, 2, 5, dtype=torch.uint8)
    with pytest.raises(KVCompressValueError, match="rungs"):
        ops.fastgen_recovery(q, k, rung, 0)
    with pytest.raises(KVCompressValueError, match="rungs"):
        ops.fastgen_recovery(q, k, rung, 17)
    with pytest.raises(KVCompressTypeError, match="rung"):
        ops.fastgen_recovery(q, k, rung.float(), 5)
    with pytest.raises(KVCompressValueError, match="rung"):
        ops.fastgen_recovery(q, k, torch.zeros(1, 2, 4, dtype=torch.uint8), 5)
    with pytest.raises(KVCompressValueError, match="queries"):
        ops.fastgen_recovery(make((1, 2, 6, 8)), k, rung, 5)


# --------------------------------------------------- independent reference

SPECIAL = tuple(range(3, 30))
PUNCT = tuple(range(30, 110))


def profile_ref(q, k, ids, start, keep, *, T, frequent, window, special=SPECIAL, punct=PUNCT):
    """FastGen's prefill for one layer, read from the paper and our docstring,
    in float64 and plain Python: per (row, kv head) the window's attention
    (group mean), the ladder at ``keep``, the recovered masses, the cheapest
    policy recovering ``T``, the full heads' share of the layer's budget and
    the kept slots. Returns ``({(b, h): policy}, {(b, h): sorted kept})``."""
    B, Hq, n, D = q.shape
    H = k.shape[1]
    g = Hq // H
    w = min(window, n)
    policies, kept = {}, {}
    for b in range(B):
        s = int(start[b])
        cls = {}
        for j in range(s, n):
            tok = int(ids[b, j])
            cls[j] = 0 if (tok in special or j == s) else 1 if tok in punct else 2
        info = {}
        for h in range(H):
            rows = []
            for hq in range(h * g, (h + 1) * g):
                for i in range(n - w, n):
                    if i < s:
                        continue
                    logits = (k[b, h, s:i + 1] @ q[b, hq, i]) / math.sqrt(D)
                    a = torch.softmax(logits, 0)
                    rows.append({s + j: float(a[j]) for j in range(i + 1 - s)})
            score = {j: sum(r.get(j, 0.0) for r in rows) for j in range(s, n)}

            def ladder(c, policy, score=score):
                # a full head's punctuation is an ordinary token
                kind = {j: 2 if (policy == 4 and cls[j] == 1) else cls[j] for j in range(s, n)}
                sp = [j for j in range(s, n) if kind[j] <= 1]
                r = max(0, c - len(sp))
                F = math.floor(frequent * r) if policy >= 3 else r
                other = [j for j in range(s, n) if kind[j] == 2]
                freq = sorted(other, key=lambda j: (-score[j], j))[:F]
                rem = [j for j in other if j not in freq]
                local = sorted(rem, reverse=True)[:r - F]
                rung = {j: (kind[j] if kind[j] <= 1 else 2 if j in freq else 3 if j in local else 4) for j in range(s, n)}
                order = sorted(range(s, n), key=lambda j: (rung[j], -j if rung[j] == 3 else -score[j], j))
                return order, rung

            order, rung = ladder(keep, 3)
            capped = {j: (rung[j] if order.index(j) < keep else 4) for j in range(s, n)}
            mass = [sum(sum(v for j, v in r.items() if capped[j] <= p) for r in rows) / len(rows) for p in range(4)]
            policy = next((p for p in range(4) if mass[p] >= T), 4)
            cost = sum(1 for j in capped if capped[j] <= policy) if policy < 4 else None
            info[h] = (policy, cost, mass, ladder)
        full = [h for h in range(H) if info[h][0] == 4]
        pool = H * keep - sum(info[h][1] for h in range(H) if info[h][0] < 4)
        for h in range(H):
            policy, cost, mass, ladder = info[h]
            if policy == 4:
                i = full.index(h)
                cost = min(n - s, pool // len(full) + (1 if i < pool % len(full) else 0))
            order, _ = ladder(cost, policy)
            policies[(b, h)] = (policy, mass)
            kept[(b, h)] = sorted(order[:cost])
    return policies, kept


def _heads(layer):
    """``{(row, kv head): positions held}`` of a per-head layer."""
    store = layer.store
    _, _, pos, _, _, start = store.to_padded()
    return {divmod(i, store.heads): pos[i, int(start[i]):].tolist() for i in range(store.batch * store.heads)}


def _prompt(batch=1, length=60, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (batch, length), generator=g)


def _prefill(model, method, ids, mask=None):
    with kvc.compress(model, method) as session:
        cache = session.new_cache()
        with torch.no_grad():
            model(ids, attention_mask=mask, **cache_kwargs(model, cache))
    return cache


def _compare(cache, model, ids, keep, mask=None, **ref_kw):
    """(policy mismatches, kept-set mismatches, policies seen) of the cache
    against ``profile_ref``; heads whose mass is within 1e-5 of T are skipped."""
    start = torch.zeros(ids.shape[0], dtype=torch.int64) if mask is None else (mask == 0).sum(1)
    bad_policy = bad_kept = 0
    seen = set()
    for li, (q, k, _) in enumerate(layer_qkv(model, ids, mask)):
        layer = cache.layers[li]
        pol, kept = profile_ref(q, k, ids, start, keep, **ref_kw)
        heads = _heads(layer)
        got = layer.head_state["policy"]
        for (b, h), (p, mass) in pol.items():
            if any(abs(m - ref_kw["T"]) < 1e-5 for m in mass):
                continue
            seen.add(p)
            bad_policy += int(got[b, h]) != p
            bad_kept += heads[(b, h)] != kept[(b, h)]
        assert sum(len(v) for (b, _), v in heads.items() if b == 0) <= k.shape[1] * keep
    return bad_policy, bad_kept, seen


@pytest.mark.parametrize("T, policies", [(0.24, {1, 2}), (0.325, {2, 3}), (0.45, {4})])
def test_prefill_policies_and_kept_sets_match_a_float64_recomputation(tiny_model, T, policies):
    """The random model's attention is nearly flat, so its rows' masses differ
    little: each threshold sits between the two rows' masses (the policies
    the test exercises are listed)."""
    ids = _prompt(batch=2, length=60, seed=2)
    method = FastGen(budget=24, recovery=T, frequent=0.5, window=8, special=SPECIAL, punct=PUNCT)
    cache = _prefill(tiny_model, method, ids)
    bad_policy, bad_kept, seen = _compare(cache, tiny_model, ids, 24, T=T, frequent=0.5, window=8)
    assert bad_policy == 0 and bad_kept == 0
    assert seen == policies


def test_full_heads_share_what_cheaper_heads_leave():
    m = FastGen(budget=6)
    # one row, four heads of 10 real slots; rungs as the ladder gives them
    rung = torch.tensor([[0, 1, 1, 2, 2, 3, 3, 4, 4, 4]] * 4)[None]
    valid = torch.ones(1, 4, 10, dtype=torch.bool)
    counts = m.head_counts(torch.tensor([[0, 4, 2, 4]]), rung, valid, 6)
    # cheaper heads: 1 and 5 slots; the two full heads share 24 - 6 = 18, at most 10 each
    assert counts.tolist() == [[1, 9, 5, 9]]
    counts = m.head_counts(torch.tensor([[0, 4, 0, 0]]), rung, valid, 6)
    assert counts.tolist() == [[1, 10, 1, 1]]
    counts = m.head_counts(torch.tensor([[1, 4, 4, 4]]), rung, valid, 6)
    assert counts.tolist() == [[3, 7, 7, 7]]


def test_the_comparison_discriminates(tiny_model):
    """A reference with another heavy-hitter share, another threshold or no
    punctuation does not match: the check above can fail."""
    ids = _prompt(batch=2, length=60, seed=2)
    cache = _prefill(tiny_model, FastGen(budget=24, recovery=0.325, window=8, special=SPECIAL, punct=PUNCT), ids)
    assert _compare(cache, tiny_model, ids, 24, T=0.325, frequent=0.5, window=8)[:2] == (0, 0)
    for kw in (dict(T=0.325, frequent=0.25, window=8), dict(T=0.3, frequent=0.5, window=8),
               dict(T=0.325, frequent=0.5, window=8, punct=()), dict(T=0.325, frequent=0.5, window=12)):
        bad_policy, bad_kept, _ = _compare(cache, tiny_model, ids, 24, **kw)
        assert bad_policy + bad_kept > 0, kw


def test_left_padded_prefill_matches_the_recomputation(tiny_model):
    ids = _prompt(batch=2, length=56, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    ids[1, :9] = 0
    cache = _prefill(tiny_model, FastGen(budget=20, recovery=0.4, window=6, special=SPECIAL, punct=PUNCT), ids, mask)
    bad_policy, bad_kept, _ = _compare(cache, tiny_model, ids, 20, mask, T=0.4, frequent=0.5, window=6)
    assert bad_policy == 0 and bad_kept == 0


def test_recovery_one_makes_every_head_full_within_the_budget(tiny_model):
    ids = _prompt(batch=1, length=50, seed=3)
    cache = _prefill(tiny_model, FastGen(budget=16, recovery=1.0, special=SPECIAL, punct=PUNCT), ids)
    for layer in cache.layers:
        assert bool((layer.head_state["policy"] == 4).all())
        assert layer.head_lengths() == [16] * layer.store.heads


def _generate(model, ids, mask=None, n=12, method=None):
    mask = torch.ones_like(ids) if mask is None else mask
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    if method is None:
        return model.generate(**kw), None
    with kvc.compress(model, method) as session:
        out = model.generate(**kw)
    return out, session.cache


def test_budget_above_the_prompt_reproduces_generate(tiny_model):
    ids = _prompt(length=30)
    ref, _ = _generate(tiny_model, ids)
    out, cache = _generate(tiny_model, ids, method=FastGen(budget=200, special=SPECIAL, punct=PUNCT))
    assert torch.equal(out, ref)
    assert all(layer.n == layer.seen == 30 + 11 for layer in cache.layers)


def test_left_padded_rows_generate_what_they_generate_alone(tiny_model):
    rows = [_prompt(length=45, seed=3)[0], _prompt(length=80, seed=4)[0]]
    ids = torch.zeros(2, 80, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, 80 - len(r):], mask[i, 80 - len(r):] = r, 1
    method = FastGen(budget=24, recovery=0.4, window=8, interval=4, special=SPECIAL, punct=PUNCT)
    out, cache = _generate(tiny_model, ids, mask, n=16, method=method)
    for i, r in enumerate(rows):
        alone, _ = _generate(tiny_model, r[None], n=16, method=method)
        assert torch.equal(out[i, -16:], alone[0, -16:]), i


def test_full_heads_do_not_fill_up_with_punctuation(tiny_model):
    """A prompt with more punctuation than the budget (ids 3..200, 80 of them
    punctuation): every head is full (recovery 1), and a full head keeps its
    heavy hitters and its newest tokens, not the punctuation first; kept sets
    as the float64 reference has them."""
    g = torch.Generator().manual_seed(21)
    ids = torch.randint(3, 200, (1, 70), generator=g)
    n_punct = int(((ids >= 30) & (ids < 110)).sum())
    assert n_punct > 20
    cache = _prefill(tiny_model, FastGen(budget=20, recovery=1.0, window=8, special=SPECIAL, punct=PUNCT), ids)
    bad_policy, bad_kept, seen = _compare(cache, tiny_model, ids, 20, T=1.0, frequent=0.5, window=8)
    assert bad_policy == 0 and bad_kept == 0 and seen == {4}
    for layer in cache.layers:
        for (b, h), pos in _heads(layer).items():
            assert 69 in pos and sum(1 for p in pos if 30 <= int(ids[b, p]) < 110) < len(pos)


def test_decoding_keeps_each_heads_policy(tiny_model):
    """Every head on C_special (a threshold any policy meets): while decoding
    a head holds its special tokens plus at most ``interval`` newer slots
    awaiting re-selection; the token log covers prompt and generated ids."""
    ids = _prompt(length=64, seed=7)
    method = FastGen(budget=24, recovery=1e-6, interval=4, special=SPECIAL, punct=PUNCT)
    out, cache = _generate(tiny_model, ids, n=20, method=method)
    seq = out[0]
    assert torch.equal(cache.token_log.ids[0], seq[:-1])
    for layer in cache.layers:
        assert bool((layer.head_state["policy"] == 0).all())
        for (b, h), pos in _heads(layer).items():
            old = [p for p in pos if p < layer.seen - 4]
            assert old and all(p == 0 or int(seq[p]) in SPECIAL for p in old), (layer.layer_idx, h)


def test_decode_reselection_reads_the_stored_policy(tiny_model):
    """Heavy-hitter heads (policy 2) keep heavy hitters at re-selection, hybrid
    heads the recent slots too: the same budget keeps different slots."""
    method = FastGen(budget=10, frequent=0.5, window=4, special=SPECIAL, punct=PUNCT)
    g = torch.Generator().manual_seed(9)
    keys = torch.randn(1, 1, 30, 8, generator=g)
    q = torch.randn(1, 2, 4, 8, generator=g)
    tokens = torch.randint(200, 300, (1, 1, 30), generator=g)
    from kvcompress.methods import LayerView

    def kept(policy):
        view = LayerView(layer_idx=0, num_layers=1, queries=q, keys=keys, values=keys, kv_start=torch.tensor([0]),
                         scaling=8 ** -0.5, state={}, phase="decode", tokens=tokens,
                         head_state={"policy": torch.tensor([[policy]])})
        return method.select(view, torch.tensor([[10]]))[0, 0].tolist()

    scores = ops.window_scores(q, keys, scaling=8 ** -0.5).double()[0, 0]
    heavy = sorted([0] + sorted(range(1, 30), key=lambda j: (-float(scores[j]), j))[:9])
    assert kept(2) == heavy
    hybrid = kept(3)
    top = sorted(range(1, 30), key=lambda j: (-float(scores[j]), j))[:4]
    recent = [j for j in range(29, 0, -1) if j not in top][:5]
    assert hybrid == sorted([0] + top + recent) and hybrid != heavy


# ------------------------------------------------------------ options, CLI


def test_options_are_validated_by_name():
    for kw, name, err in [(dict(recovery=0.0), "recovery", ValueError), (dict(recovery=1.5), "recovery", ValueError),
                          (dict(recovery=float("nan")), "recovery", ValueError),
                          (dict(recovery="high"), "recovery", TypeError),
                          (dict(frequent=-0.1), "frequent", ValueError), (dict(frequent=1.01), "frequent", ValueError),
                          (dict(window=0), "window", ValueError), (dict(sink="yes"), "sink", TypeError),
                          (dict(special="abc"), "special", TypeError), (dict(punct=[1, -2]), "punct", ValueError),
                          (dict(punct=[1.5]), "punct", TypeError)]:
        with pytest.raises(err, match=name):
            FastGen(budget=64, **kw)
    FastGen(budget=64, recovery=1.0, frequent=0.0)
    FastGen(ratio=0.5, frequent=1.0, special=[5, 3, 3])


def test_command_line_specs_and_tokenizer(tiny_lm):
    assert "fastgen" in REGISTRY
    assert parse_method_spec("fastgen:recovery=0.95") == ("fastgen", {"recovery": 0.95})
    m = method_from_spec("fastgen:recovery=0.9:frequent=0.25:window=16", budget=32)
    assert isinstance(m, FastGen) and (m.recovery, m.frequent, m.window, m.budget) == (0.9, 0.25, 16, 32)
    with pytest.raises(ValueError, match="recovery"):
        method_from_spec("fastgen:recovery=2", budget=32)
    _, tok, _ = tiny_lm
    special, punct = token_classes(tok)
    assert tok.eos_token_id in special and tok.eos_token_id not in punct
    for text in (".", ",", "?", ":"):
        assert tok.convert_tokens_to_ids(text) in punct
    assert tok.convert_tokens_to_ids("a") not in punct
    assert _is_punct(" .") and _is_punct(")?") and not _is_punct(" ") and not _is_punct("a.")
    filled = FastGen.for_tokenizer(tok, ratio=0.5)
    assert filled.special == special and filled.punct == punct
    assert "special=<" in filled.describe() and "punct=<" in filled.describe()
    assert FastGen(ratio=0.5, punct=[7]).with_tokenizer(tok).punct == (7,)


def test_eval_runs_fastgen_from_the_command_line(tiny_lm, tmp_path):
    import json

    from kvcompress import cli

    _, _, folder = tiny_lm
    out = tmp_path / "fg"
    args = ["eval", "--model", str(folder), "--methods", "fastgen,fastgen:recovery=0.5", "--budgets", "24",
            "--tasks", "ppl", "--ppl-context", "48", "--ppl-tokens", "8", "--ppl-windows", "1", "--no-progress",
            "--out", str(out)]
    assert cli.main(args) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows[1:]] == ["fastgen", "fastgen:recovery=0.5"]
    assert all(math.isfinite(r["ppl"]["ppl"]) for r in rows[1:])


def test_token_log_follows_the_batch_and_knows_what_it_does_not_know():
    from kvcompress.cache import TokenLog

    log = TokenLog()
    log.append(torch.tensor([[5, 6, 7], [8, 9, 10]]))
    log.append(torch.tensor([[11], [12]]))
    pos = torch.tensor([[[0, 3], [2, 1]], [[3, 0], [1, 1]]], dtype=torch.int32)
    assert log.lookup(pos).tolist() == [[[5, 11], [7, 6]], [[12, 8], [9, 9]]]
    log.index_batch(torch.tensor([1, 1]))
    assert log.ids.tolist() == [[8, 9, 10, 12]] * 2
    assert log.lookup(torch.full((2, 1, 1), 4)) is None  # beyond what was fed
    log.append(None)  # inputs_embeds: unknown for good
    assert log.unknown and log.lookup(pos) is None
    log.append(torch.tensor([[1], [2]]))
    assert log.lookup(pos) is None


def test_beam_search_reorders_the_token_log(tiny_model):
    ids = _prompt(length=40, seed=8)
    method = FastGen(budget=16, recovery=0.3, interval=4, special=SPECIAL, punct=PUNCT)
    with kvc.compress(tiny_model, method) as session:
        out = tiny_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                  min_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
    log = session.cache.token_log.ids
    assert log.shape == (3, 40 + 7)
    assert all(torch.equal(row[:40], ids[0]) for row in log)
    # the best beam's tokens are one of the cache's rows
    assert any(torch.equal(row, out[0, :-1]) for row in log)
