"""HeadKV and head profiles on a tiny random Llama: the profile against a
float64 recomputation of the attention weights, the per-head counts against
the allocation written out by hand, the kept slots against float64 SnapKV
scores, and the usual contracts (whole budgets are plain generate(), left
padding, bad options, saving and loading a profile)."""

import math

import numpy as np
import pytest
import torch

import kvcompress as kvc
from kvcompress.compat import cache_kwargs
from kvcompress.heads import HeadProfile, as_profile, profile_heads
from kvcompress.methods import HeadKV, method_from_spec

from generation import greedy
from model_refs import assert_topk_consistent, group_mean, layer_qkv, window_attention64

WINDOW = 4


def _profile(copy, kv_heads=2, sliding=()):
    zeros = [[0.0] * len(r) for r in copy]
    return HeadProfile(copy, zeros, zeros, list(sliding), kv_heads, {})


def test_profile_matches_float64_attention_weights(tiny_model):
    length, rows = 24, 2
    before = tiny_model.config._attn_implementation
    prof = profile_heads(tiny_model, length=length, rows=rows, seed=3)
    assert tiny_model.config._attn_implementation == before  # eager only for the run
    # the same sequences, scored from float64 attention recomputed from the hidden states
    from kvcompress.heads import _random_ids

    seqs = _random_ids(tiny_model.config, length, rows, 3)
    ids = torch.cat([torch.full((rows, 1), tiny_model.config.bos_token_id), seqs, seqs], 1)
    j = torch.arange(1, length - 1)
    qi = 1 + length + j
    for li, (q, k, _) in enumerate(layer_qkv(tiny_model, ids)):
        T = k.shape[2]
        g = q.shape[1] // k.shape[1]
        logits = q @ k.repeat_interleave(g, 1).transpose(-1, -2) / q.shape[-1] ** 0.5
        logits = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        a = logits.softmax(-1)[:, :, qi]  # [B, Hq, m-2, T]
        succ = torch.stack([a[:, :, i, 1 + int(x) + 1] for i, x in enumerate(j)], 2)
        same = torch.stack([a[:, :, i, 1 + int(x)] for i, x in enumerate(j)], 2)
        np.testing.assert_allclose(prof.induction[li], succ.mean((0, 2)).numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(prof.echo[li], same.mean((0, 2)).numpy(), rtol=1e-4, atol=1e-6)
        hits = torch.stack([a[:, :, i].argmax(-1) == 1 + int(x) + 1 for i, x in enumerate(j)], 2).double()
        # an argmax may flip on a float32 near-tie: at most one query per head
        assert np.abs(np.array(prof.copy[li]) - hits.mean((0, 2)).numpy()).max() <= 1.0 / (rows * (length - 2)) + 1e-12
    assert prof.kv_heads == 2 and prof.num_layers == 4 and prof.sliding == []
    # the random sequences repeat
    again = profile_heads(tiny_model, length=length, rows=rows, seed=3)
    assert again.copy == prof.copy and again.induction == prof.induction


def test_profile_save_load_and_validation(tmp_path, tiny_model):
    prof = profile_heads(tiny_model, length=16, rows=1)
    path = prof.save(tmp_path / "p.json")
    back = HeadProfile.load(path)
    assert back == prof and as_profile(str(path)) == prof and as_profile(prof.to_dict()) == prof
    assert "HeadProfile(layers=4, query heads=4, kv heads=2" in repr(prof)
    with pytest.raises(ValueError, match="kv_heads"):
        HeadProfile([[0.1, 0.2]], [[0, 0]], [[0, 0]], [], 0)
    with pytest.raises(ValueError, match="finite scores"):
        HeadProfile([[float("nan"), 0.2]], [[0, 0]], [[0, 0]], [], 2)
    with pytest.raises(ValueError, match="not a kvcompress-head-profile"):
        as_profile({"copy": []})
    with pytest.raises(TypeError, match="profile"):
        as_profile(3)
    with pytest.raises(ValueError, match="length"):
        profile_heads(tiny_model, length=2)
    with pytest.raises(ValueError, match="ids"):
        profile_heads(tiny_model, ids=torch.zeros(2, 2, 2, dtype=torch.long))
    # user ids instead of random tokens
    own = profile_heads(tiny_model, ids=torch.arange(10, 30))
    assert own.meta["source"] == "ids" and own.meta["length"] == 20


def _counts_by_hand(copy, kv_heads, keep, window, beta, temp, sliding=()):
    """HeadKV's allocation written out from the paper's formula (float64)."""
    L = len(copy)
    s = np.array([np.array(r, dtype=np.float64).reshape(kv_heads, -1).mean(1) for r in copy])
    s[list(sliding)] = 0
    p = s ** temp
    p /= p.sum()
    base = keep - window
    pooled = math.floor(base / beta)
    total = pooled * (L - len(sliding)) * kv_heads
    return np.round(p * total + (base - pooled)).astype(int) + window


@pytest.mark.parametrize("beta,temp", [(1.25, 1.0), (2.0, 1.0), (1.005, 2.0), (10.0, 0.5)])
def test_head_counts_follow_the_papers_allocation(beta, temp):
    rng = np.random.default_rng(0)
    copy = [rng.random(4).tolist() for _ in range(6)]
    m = HeadKV(budget=40, window=WINDOW, profile=_profile(copy, sliding=[2]), beta=beta, temp=temp)
    want = _counts_by_hand(copy, 2, 40, WINDOW, beta, temp, sliding=[2])
    got = np.stack([m.head_counts(li, 40, WINDOW).numpy() for li in range(6)])
    np.testing.assert_array_equal(got[[0, 1, 3, 4, 5]], want[[0, 1, 3, 4, 5]])
    # the pool is spent on the full-attention layers: their mean is the budget (up to rounding)
    full = got[[0, 1, 3, 4, 5]]
    assert abs(full.mean() - 40) <= 0.5
    # no copying anywhere: every head keeps the budget
    flat = HeadKV(budget=40, window=WINDOW, profile=_profile([[0.0] * 4] * 3))
    assert all(flat.head_counts(li, 40, WINDOW).tolist() == [40, 40] for li in range(3))


def test_a_layer_whose_heads_all_score_zero_still_gives_to_the_pool():
    """Every full-attention layer gives ``floor(base / beta)`` per head to the
    pool, a layer whose heads all score 0 (layer 0 often does) too: it gets
    nothing back and the model keeps ``L * H * budget`` up to rounding (the
    pool used to count only layers with a positive score, and that layer's
    share went to no one: 143 of 160 slots). A layer the profile could not
    score (row None) takes no part: each head keeps the budget."""
    copy = [[0.0] * 4, [0.2, 0.4, 0.1, 0.3], [0.5, 0.1, 0.0, 0.2], [0.3, 0.3, 0.6, 0.1]]
    m = HeadKV(budget=20, window=4, profile=_profile(copy), beta=2.0)
    got = np.stack([m.head_counts(li, 20, 4).numpy() for li in range(4)])
    np.testing.assert_array_equal(got, _counts_by_hand(copy, 2, 20, 4, 2.0, 1.0))
    assert got[0].tolist() == [12, 12] and abs(int(got.sum()) - 4 * 2 * 20) <= 4
    unread = [None] + copy[1:]
    zeros = [None] + [[0.0] * 4] * 3
    m = HeadKV(budget=20, window=4, profile=HeadProfile(unread, zeros, zeros, [], 2, {}), beta=2.0)
    got = np.stack([m.head_counts(li, 20, 4).numpy() for li in range(4)])
    assert got[0].tolist() == [20, 20]
    np.testing.assert_array_equal(got[1:], _counts_by_hand(copy[1:], 2, 20, 4, 2.0, 1.0))


def _snapkv_scores64(q, k, kv_start, kernel):
    hkv, T = k.shape[1], k.shape[2]
    s = group_mean(window_attention64(q[:, :, -WINDOW:], k, kv_start=kv_start), hkv)
    head = T - WINDOW
    pooled = torch.nn.functional.max_pool1d(s[..., :head].reshape(-1, 1, head), kernel, 1, kernel // 2)
    s[..., :head] = pooled.view(s.shape[0], hkv, head)
    return s


def test_kept_slots_are_each_heads_top_of_float64_snapkv_scores(tiny_model):
    g = torch.Generator().manual_seed(41)
    ids = torch.randint(3, 512, (2, 80), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    copy = [[0.9, 0.8, 0.0, 0.1], [0.0, 0.0, 0.3, 0.2], [0.5, 0.5, 0.5, 0.5], [0.0, 0.1, 0.0, 0.0]]
    method = HeadKV(budget=24, window=WINDOW, profile=_profile(copy))
    with kvc.compress(tiny_model, method) as session:
        cache = session.new_cache()
        with torch.no_grad():
            # positions as generate() (and the reference) count them: from the first real token
            tiny_model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       **cache_kwargs(tiny_model, cache))
    pads = (mask == 0).sum(1)
    want = _counts_by_hand(copy, 2, 24, WINDOW, method.beta, method.temp)
    assert len({tuple(r) for r in want.tolist()}) > 1
    for li, (q, k, v) in enumerate(layer_qkv(tiny_model, ids, mask)):
        store = cache.layers[li].ragged
        s = _snapkv_scores64(q, k, pads, method.kernel)
        T = k.shape[2]
        for b in range(2):
            got = store.lengths.view(2, -1)[b].numpy()
            np.testing.assert_array_equal(got, np.minimum(want[li], T - int(pads[b])))
            for h in range(2):
                hk, hv, pos = store.head(b, h)
                kept = pos.tolist()
                assert kept == sorted(kept) and min(kept) >= int(pads[b])
                assert_topk_consistent(kept, s[b, h].masked_fill(torch.arange(T) < pads[b], -1.0),
                                       range(T - WINDOW, T), int(got[h]), eps=1e-5 * float(s[b, h].abs().max()))
                torch.testing.assert_close(hk.double(), k[b, h, kept], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(hv.double(), v[b, h, kept], rtol=1e-5, atol=1e-5)


def _generate(model, method, ids, mask, n=12):
    out, session = greedy(model, ids, mask, method=method, n=n)
    return out if session is None else (out, session)


def test_whole_budget_is_plain_generate_and_decoding_keeps_the_shares(tiny_model):
    g = torch.Generator().manual_seed(42)
    ids = torch.randint(3, 512, (2, 60), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    ref = _generate(tiny_model, None, ids, mask)
    out, _ = _generate(tiny_model, HeadKV(budget=400, window=WINDOW), ids, mask)
    assert torch.equal(out, ref)
    # compressed, 40 decode steps: the layer's heads stay near their prefill shares
    out, session = _generate(tiny_model, HeadKV(ratio=0.5, window=WINDOW), ids, mask, n=40)
    assert isinstance(session.method.profile, HeadProfile)  # profiled when the session started
    for layer in session.cache.layers:
        assert layer.ragged is not None and max(layer.head_lengths()) <= 60 + 40


def test_options_and_registry(tiny_model):
    assert kvc.methods.REGISTRY["headkv"] is HeadKV and kvc.HeadKV is HeadKV
    m = method_from_spec("headkv:beta=2:temp=0.5", ratio=0.75)
    assert m.beta == 2 and m.temp == 0.5 and m.headwise
    for bad, match in (({"beta": 0.5}, "beta"), ({"beta": float("inf")}, "beta"), ({"temp": 0}, "temp"),
                       ({"temp": float("nan")}, "temp"), ({"profile": 3}, "profile")):
        with pytest.raises((ValueError, TypeError), match=match):
            HeadKV(budget=32, **bad)
    with pytest.raises(TypeError, match="beta"):
        HeadKV(budget=32, beta="1")
    wrong = HeadKV(budget=32, profile=_profile([[0.1] * 4] * 3))
    with pytest.raises(ValueError, match="profile: made for 3 layers, the model has 4"):
        kvc.compress(tiny_model, wrong)
    with pytest.raises(ValueError, match="needs a head profile"):
        HeadKV(budget=32).head_counts(0, 32, 16)
    assert "profile" in repr(HeadKV(budget=32, profile=_profile([[0.1] * 4])))


def test_fill_hands_what_capped_heads_cannot_hold_to_the_others():
    from kvcompress.methods.headkv import _fill

    c = torch.tensor([50, 10, 30, 10])
    got = _fill(c, 40)
    assert got.tolist() == [40, 12, 36, 12]  # 10 over, shared 1:3:1 by the others' counts
    assert _fill(c, 100).tolist() == c.tolist()
    assert _fill(c, 20).tolist() == [20, 20, 20, 20]  # nothing fits: every head keeps every token
    # repeated capping: the share a head receives may push it over in turn
    got = _fill(torch.tensor([90, 38, 2]), 40)
    assert got.max() <= 40 and got.tolist() == [40, 40, 40]
    assert int(_fill(torch.tensor([90, 38, 2]), 40).sum()) == 120


def test_eval_and_suite_profile_the_model_once(tiny_lm, tmp_path, monkeypatch):
    import json

    from kvcompress import cli, heads, suite

    calls = []
    real = heads.profile_heads
    monkeypatch.setattr(heads, "profile_heads", lambda model, *a, **k: calls.append(1) or real(model, *a, **k))
    model, tok, folder = tiny_lm
    out = tmp_path / "hk"
    args = ["eval", "--model", str(folder), "--methods", "headkv:window=8,snapkv:window=8", "--budgets", "24,32",
            "--tasks", "passkey", "--lengths", "60", "--depths", "0.5", "--no-progress", "--out", str(out)]
    assert cli.main(args) == 0 and len(calls) == 1
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows].count("headkv:window=8") == 2
    cfg = suite.SuiteConfig(methods=["headkv:window=8"], ratios=[0.5, 0.75], tasks=["niah_single"], lengths=[200],
                            cases=1, split="dev", chat=False)
    result = suite.run_suite(model, tok, cfg, progress=False)
    assert len(calls) == 2 and len(result["rows"]) == 3


def test_enable_alone_is_no_session(tiny_model):
    """``kvc.enable(model)`` leaves the model on our attention but opens no
    session: profiling heads (HeadKV's, RazorAttention's) still runs, as
    it does after a session has closed; inside a session it is refused."""
    previous = kvc.enable(tiny_model)
    try:
        ids = torch.randint(3, 512, (1, 40), generator=torch.Generator().manual_seed(3))
        profile = profile_heads(tiny_model, ids)
        assert isinstance(profile, HeadProfile)
        with kvc.compress(tiny_model, HeadKV(budget=32)):
            with pytest.raises(RuntimeError, match="outside a kvcompress.compress"):
                profile_heads(tiny_model, ids)
        assert tiny_model.config._attn_implementation == "kvcompress"
    finally:
        tiny_model.set_attn_implementation(previous)
