"""TaskKV on a tiny random Llama: the profile's semantic statistic against a
float64 recomputation of every head's output from the model's own q/k/v,
the heterogeneous heads against a hand computation, the kept slots against
float64 SnapKV scores, and the usual contracts (whole budgets are plain
generate(), left padding, bad options, old profiles, the CLI)."""

import math

import numpy as np
import pytest
import torch

import kvcompress as kvc
from kvcompress.compat import cache_kwargs
from kvcompress.heads import FORMAT, HeadProfile, as_profile, profile_heads
from kvcompress.methods import REGISTRY, TaskKV, method_from_spec

from model_refs import assert_topk_consistent, group_mean, layer_qkv, window_attention64

WINDOW = 4


def _profile(semantic, kv_heads=2, sliding=()):
    zeros = [[0.0] * len(r) for r in semantic]
    return HeadProfile(zeros, zeros, zeros, list(sliding), kv_heads, {}, semantic)


@torch.no_grad()
def semantic_ref(model, ids):
    """[L][Hq] float64: each query head's distance from its layer's semantic
    centre, recomputed from the layer's float64 q/k/v (causal softmax,
    grouped heads) and its o_proj weight, tokens after the first."""
    out = []
    for li, (q, k, v) in enumerate(layer_qkv(model, ids)):
        B, Hq, T, D = q.shape
        g = Hq // k.shape[1]
        kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        logits = q @ kk.transpose(-1, -2) / D ** 0.5
        logits = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        o = logits.softmax(-1) @ vv  # [B, Hq, T, D]
        W = model.model.layers[li].self_attn.o_proj.weight.double()  # [hidden, Hq * D]
        vecs = []
        for h in range(Hq):
            contrib = o[:, h, 1:] @ W[:, h * D:(h + 1) * D].T  # [B, T - 1, hidden]
            vecs.append(contrib.mean((0, 1)))
        vecs = torch.stack(vecs)
        centre = vecs.mean(0)
        out.append([float((x - centre).norm()) for x in vecs])
    return out


def hetero_by_hand(semantic, kv_heads, fraction, sliding=()):
    """The heterogeneous kv heads written out: kv distance = mean of its
    query heads, over the layer's mean; top ceil(fraction * n) of the
    full-attention heads, ties to the lower layer then head."""
    rows = []
    for li, r in enumerate(semantic):
        d = np.array(r, dtype=np.float64).reshape(kv_heads, -1).mean(1)
        d = d / d.mean() if li not in sliding else np.zeros(kv_heads)
        rows += [(-d[h], li, h) for h in range(kv_heads) if li not in sliding]
    rows.sort()
    k = math.ceil(fraction * len(rows))
    out = np.zeros((len(semantic), kv_heads), dtype=bool)
    for _, li, h in rows[:k]:
        out[li, h] = True
    return out


# ------------------------------------------------------------------ profile


def test_semantic_statistic_matches_a_float64_recomputation(tiny_model):
    g = torch.Generator().manual_seed(5)
    text = torch.randint(3, 512, (2, 40), generator=g)
    prof = profile_heads(tiny_model, length=12, rows=1, semantic_ids=text)
    ref = semantic_ref(tiny_model, text)
    for li in range(4):
        np.testing.assert_allclose(prof.semantic[li], ref[li], rtol=1e-4, atol=1e-9)
    # the heads differ: a statistic that ignored the head would be caught
    assert max(np.ptp(r) / np.mean(r) for r in ref) > 0.05
    assert prof.meta["semantic"] == "semantic_ids"
    # without semantic_ids: measured on the run's own [bos] r r sequences
    from kvcompress.heads import _random_ids

    seqs = _random_ids(tiny_model.config, 12, 1, 0)
    full = torch.cat([torch.full((1, 1), tiny_model.config.bos_token_id), seqs, seqs], 1)
    own = profile_heads(tiny_model, length=12, rows=1)
    for li, row in enumerate(semantic_ref(tiny_model, full)):
        np.testing.assert_allclose(own.semantic[li], row, rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="semantic_ids"):
        profile_heads(tiny_model, length=12, semantic_ids=torch.zeros(2, 2, 2, dtype=torch.long))


def test_profile_format_2_saves_the_statistic_and_format_1_still_loads(tmp_path, tiny_model):
    prof = profile_heads(tiny_model, length=12, rows=1)
    assert prof.to_dict()["format"] == FORMAT == "kvcompress-head-profile/2"
    back = HeadProfile.load(prof.save(tmp_path / "p.json"))
    assert back == prof and back.semantic == prof.semantic
    old = prof.to_dict()
    old["format"] = "kvcompress-head-profile/1"
    del old["semantic"]
    legacy = as_profile(old)
    assert legacy.semantic is None and legacy.copy == prof.copy
    # HeadKV and RazorAttention still take it; TaskKV refuses it, naming what is missing
    kvc.HeadKV(budget=32, profile=old)
    with pytest.raises(ValueError, match="no 'semantic' head statistic"):
        TaskKV(budget=32, profile=old)
    with pytest.raises(ValueError, match="semantic"):
        legacy.kv_scores("semantic")
    with pytest.raises(ValueError, match="semantic must cover"):
        HeadProfile([[0.0] * 4], [[0.0] * 4], [[0.0] * 4], [], 2, {}, [])
    with pytest.raises(ValueError, match="finite scores"):
        HeadProfile([[0.0] * 4], [[0.0] * 4], [[0.0] * 4], [], 2, {}, [[float("nan")] * 4])


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_heterogeneous_heads_follow_the_hand_computation(fraction):
    rng = np.random.default_rng(1)
    semantic = [(rng.random(4) * (li + 1)).tolist() for li in range(6)]
    m = TaskKV(budget=32, window=WINDOW, hetero=fraction, profile=_profile(semantic, sliding=[2]))
    want = hetero_by_hand(semantic, 2, fraction, sliding=[2])
    got = m.heterogeneous_heads().numpy()
    np.testing.assert_array_equal(got, want)
    assert not got[2].any() and got.sum() == math.ceil(fraction * 10)
    assert m.retrieval_heads is not None and np.array_equal(m.retrieval_heads().numpy(), want)
    # layers compare by the ratio to their own mean, not the raw distance
    scaled = [[x * 1000 if li == 5 else x for x in r] for li, r in enumerate(semantic)]
    again = TaskKV(budget=32, window=WINDOW, hetero=fraction, profile=_profile(scaled, sliding=[2]))
    np.testing.assert_array_equal(again.heterogeneous_heads().numpy(), want)


# -------------------------------------------------------------------- method


def _snapkv_scores64(q, k, kv_start, kernel):
    hkv, T = k.shape[1], k.shape[2]
    s = group_mean(window_attention64(q[:, :, -WINDOW:], k, kv_start=kv_start), hkv)
    head = T - WINDOW
    pooled = torch.nn.functional.max_pool1d(s[..., :head].reshape(-1, 1, head), kernel, 1, kernel // 2)
    s[..., :head] = pooled.view(s.shape[0], hkv, head)
    return s


def _prefill(model, method, ids, mask):
    with kvc.compress(model, method) as session:
        cache = session.new_cache()
        with torch.no_grad():
            # positions as generate() (and the reference) count them: from the first real token
            model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                  **cache_kwargs(model, cache))
    return cache


def _check_kept(model, ids, mask, cache, budget, sinks, kernel, whole):
    pads = (mask == 0).sum(1)
    for li, (q, k, v) in enumerate(layer_qkv(model, ids, mask)):
        store = cache.layers[li].ragged
        s = _snapkv_scores64(q, k, pads, kernel)
        T = k.shape[2]
        for b in range(ids.shape[0]):
            p = int(pads[b])
            for h in range(k.shape[1]):
                hk, hv, pos = store.head(b, h)
                kept = pos.tolist()
                assert kept == sorted(kept) and min(kept) >= p
                if whole[li, h]:
                    assert kept == list(range(p, T))
                else:
                    forced = list(range(p, p + sinks)) + list(range(T - WINDOW, T))
                    assert_topk_consistent(kept, s[b, h].masked_fill(torch.arange(T) < p, -1.0), forced, budget,
                                           eps=1e-5 * float(s[b, h].abs().max()))
                torch.testing.assert_close(hk.double(), k[b, h, kept], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(hv.double(), v[b, h, kept], rtol=1e-5, atol=1e-5)


def test_kept_slots_against_float64_snapkv_scores_and_whole_heads(tiny_model):
    g = torch.Generator().manual_seed(41)
    ids = torch.randint(3, 512, (2, 80), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    prof = profile_heads(tiny_model, length=12, rows=1, semantic_ids=ids[:, 10:])
    method = TaskKV(budget=24, window=WINDOW, sinks=2, kernel=5, hetero=0.25, profile=prof)
    whole = hetero_by_hand(semantic_ref(tiny_model, ids[:, 10:]), 2, 0.25)
    assert np.array_equal(method.heterogeneous_heads().numpy(), whole) and whole.sum() == 2
    cache = _prefill(tiny_model, method, ids, mask)
    _check_kept(tiny_model, ids, mask, cache, 24, 2, 5, whole)
    # a reference that kept the nearest heads whole instead would be caught
    wrong = hetero_by_hand([[1.0 / x for x in r] for r in semantic_ref(tiny_model, ids[:, 10:])], 2, 0.25)
    assert not np.array_equal(wrong, whole)
    with pytest.raises(AssertionError):
        _check_kept(tiny_model, ids, mask, cache, 24, 2, 5, wrong)


def _generate(model, method, ids, mask, n=12):
    kw = dict(attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    if method is None:
        return model.generate(ids, **kw)
    with kvc.compress(model, method) as session:
        out = model.generate(ids, **kw)
    return out, session


def test_whole_budget_is_plain_generate(tiny_model):
    g = torch.Generator().manual_seed(42)
    ids = torch.randint(3, 512, (2, 60), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    ref = _generate(tiny_model, None, ids, mask)
    out, session = _generate(tiny_model, TaskKV(budget=400, window=WINDOW), ids, mask)
    assert torch.equal(out, ref)
    assert isinstance(session.method.profile, HeadProfile) and session.method.profile.semantic is not None


def test_left_padded_rows_generate_what_they_generate_alone(tiny_model):
    g = torch.Generator().manual_seed(43)
    short, long_ = torch.randint(3, 512, (50,), generator=g), torch.randint(3, 512, (64,), generator=g)
    ids = torch.zeros(2, 64, dtype=torch.long)
    mask = torch.zeros(2, 64, dtype=torch.long)
    ids[0, 14:], mask[0, 14:] = short, 1
    ids[1], mask[1] = long_, 1
    prof = _profile([[1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 1.0, 1.0], [1.0] * 4, [1.0, 1.0, 1.5, 1.5]])
    method = TaskKV(budget=24, window=WINDOW, sinks=2, hetero=0.25, interval=4, profile=prof)
    assert method.heterogeneous_heads().sum() == 2
    out, session = _generate(tiny_model, method, ids, mask, n=12)
    alone, _ = _generate(tiny_model, method, short[None], torch.ones(1, 50, dtype=torch.long), n=12)
    assert torch.equal(out[0, 14:], alone[0])
    whole = method.heterogeneous_heads()
    for li, layer in enumerate(session.cache.layers):
        lengths = layer.head_lengths()
        for h, n in enumerate(lengths[2:]):  # row 1 (the long one): heads in order
            assert (n >= 64) if whole[li, h] else (24 <= n < 24 + 4), (li, h, lengths)


@pytest.mark.parametrize("kw, exc, name", [
    (dict(budget=32, hetero=1.5), ValueError, "hetero"),
    (dict(budget=32, hetero=-0.1), ValueError, "hetero"),
    (dict(budget=32, hetero="0.1"), TypeError, "hetero"),
    (dict(budget=32, sinks=-1), ValueError, "sinks"),
    (dict(budget=32, sinks=1.0), TypeError, "sinks"),
    (dict(budget=32, window=0), ValueError, "window"),
    (dict(budget=32, kernel=4), ValueError, "kernel"),
    (dict(budget=10, window=8, sinks=4), ValueError, "budget"),
    (dict(budget=32, profile=3), TypeError, "profile"),
    (dict(), ValueError, "budget"),
])
def test_bad_options_name_the_option(kw, exc, name):
    with pytest.raises(exc, match=name):
        TaskKV(**kw)


def test_profile_problems_are_named(tiny_model):
    with pytest.raises(ValueError, match="needs a head profile"):
        TaskKV(budget=32).heterogeneous_heads()
    wrong = TaskKV(budget=32, profile=_profile([[0.1] * 4] * 3))
    with pytest.raises(ValueError, match="profile: made for 3 layers, the model has 4"):
        kvc.compress(tiny_model, wrong)


def test_registered_and_built_from_a_spec():
    assert REGISTRY["taskkv"] is TaskKV and kvc.TaskKV is TaskKV
    m = method_from_spec("taskkv:hetero=0.2:sinks=2:window=8", ratio=0.5)
    assert (m.hetero, m.sinks, m.window, m.ratio) == (0.2, 2, 8, 0.5)
    assert m.headwise and m.whole_heads and m.min_budget() == 10
    assert "profile" in repr(TaskKV(budget=32, profile=_profile([[0.1] * 4])))


def test_eval_profiles_the_model_once_with_the_packaged_text(tiny_lm, tmp_path, monkeypatch):
    import json

    from kvcompress import cli, heads

    calls = []
    real = heads.profile_heads
    monkeypatch.setattr(heads, "profile_heads", lambda model, *a, **k: calls.append(k) or real(model, *a, **k))
    model, tok, folder = tiny_lm
    out = tmp_path / "tk"
    args = ["eval", "--model", str(folder), "--methods", "taskkv:window=8,headkv:window=8", "--budgets", "24,32",
            "--tasks", "passkey", "--lengths", "60", "--depths", "0.5", "--no-progress", "--out", str(out)]
    assert cli.main(args) == 0 and len(calls) == 1
    assert calls[0]["semantic_ids"] is not None and calls[0]["semantic_ids"].shape == (2, 512)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows].count("taskkv:window=8") == 2
