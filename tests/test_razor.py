"""RazorAttention: retrieval-head selection by hand, prefill and decode
slots and compensation tokens against float64 recomputations from the tiny
Llama's own keys and values, one decode step's attention with the log-count
bias, full-budget equivalence, batches and option checks."""

import math

import pytest
import torch

import kvcompress as kvc
from kvcompress.cache import CompressedLayer
from kvcompress.heads import HeadProfile
from kvcompress.methods import RazorAttention
from generation import GREEDY, greedy, head_rows, left_pad, random_ids
from model_refs import layer_qkv

def _profile(L=4, Hq=4, kv=2, induction=None, echo=None, sliding=()):
    zeros = [[0.0] * Hq for _ in range(L)]
    return HeadProfile(copy=[list(r) for r in zeros], induction=induction or [list(r) for r in zeros],
                       echo=echo or [list(r) for r in zeros], sliding=list(sliding), kv_heads=kv, meta={})


def _tiny_profile():
    """The tiny Llama (4 layers, 4 query heads on 2 kv heads): the top
    induction head is layer 0's query head 2 (kv head 1), the top echo head
    layer 3's query head 0 (kv head 0); 1/16 of 16 heads picks one of each."""
    ind = [[0.1] * 4 for _ in range(4)]
    ind[0][2] = 0.9
    echo = [[0.0] * 4 for _ in range(4)]
    echo[3][0] = 0.7
    return _profile(induction=ind, echo=echo)


TINY_WHOLE = {(0, 1), (3, 0)}


def _method(**kw):
    kw.setdefault("induction", 1 / 16)
    kw.setdefault("echo", 1 / 16)
    return RazorAttention(profile=_tiny_profile(), **kw)


def _gen(model, method, ids, mask, n):
    out, session = greedy(model, ids, mask, method=method, n=n)
    return out, None if session is None else session.cache


# ------------------------------------------------------------ head selection

def test_retrieval_heads_by_hand():
    ind = [[0.9, 0.1, 0.2, 0.3], [0.5, 0.5, 0.05, 0.0], None, [5.0, 5.0, 5.0, 5.0]]
    echo = [[0.0, 0.0, 0.0, 0.4], [0.0] * 4, [0.0, 0.0, 1.0, 1.0], [9.0] * 4]
    prof = _profile(induction=ind, echo=echo, sliding=[3])
    # induction: 8 full-attention heads with scores (layers 0, 1; layer 2 has
    # none, layer 3 slides), ceil(0.25 * 8) = 2: (0, 0) at 0.9, then the tie
    # 0.5 / 0.5 in layer 1 goes to its lower head 0: both on kv head 0.
    # echo: 12 heads (layers 0-2), ceil(0.1 * 12) = 2: layer 2's heads 2, 3 (kv head 1).
    got = RazorAttention(budget=8, profile=prof, induction=0.25, echo=0.1).retrieval_heads()
    want = torch.tensor([[True, False], [True, False], [False, True], [False, False]])
    assert torch.equal(got, want)
    # ceil: 0.2 * 8 = 1.6 -> 2 heads as well; 0.01 * 12 = 0.12 -> 1 head (layer 2's head 2)
    got = RazorAttention(budget=8, profile=prof, induction=0.2, echo=0.01).retrieval_heads()
    assert torch.equal(got, want)
    assert not RazorAttention(budget=8, profile=prof, induction=0.0, echo=0.0).retrieval_heads().any()
    every = RazorAttention(budget=8, profile=prof, induction=1.0, echo=0.0).retrieval_heads()
    assert torch.equal(every, torch.tensor([[True, True], [True, True], [False, False], [False, False]]))
    # the paper's defaults on the tiny profile: ceil(0.14 * 16) = 3 induction heads, ceil(0.01 * 16) = 1 echo head
    ind = [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.8], [0.0, 0.7, 0.0, 0.0], [0.6, 0.0, 0.0, 0.0]]
    echo = [[0.0, 0.0, 0.3, 0.0]] + [[0.0] * 4 for _ in range(3)]
    got = RazorAttention(budget=8, profile=_profile(induction=ind, echo=echo)).retrieval_heads()
    want = torch.tensor([[False, True], [False, True], [True, False], [True, False]])
    assert torch.equal(got, want)


def test_tiny_profile_picks_the_heads_the_tests_expect():
    r = _method(budget=8).retrieval_heads()
    assert {(li, h) for li in range(4) for h in range(2) if r[li, h]} == TINY_WHOLE


# ------------------------------------------------------------ prefill

def test_prefill_keeps_sinks_the_compensation_token_and_the_recent_window(tiny_model):
    budget, sinks = 12, 4
    recent = budget - sinks - 1
    rows = [random_ids(40, 1), random_ids(61, 2)]
    ids, mask = left_pad(rows)
    _, cache = _gen(tiny_model, _method(budget=budget, sinks=sinks), ids, mask, 1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    assert position_ids is not None  # layer_qkv derives the same positions from the mask
    ref = layer_qkv(tiny_model, ids, mask)
    T = ids.shape[1]
    for li, layer in enumerate(cache.layers):
        _, k64, v64 = ref[li]
        for (b, h), (k, v, pos, cnt) in head_rows(layer).items():
            pad = T - len(rows[b])
            if (li, h) in TINY_WHOLE:
                assert pos.tolist() == list(range(pad, T)) and (cnt == 1).all()
                torch.testing.assert_close(k, k64[b, h, pad:], atol=1e-5, rtol=1e-5)
                continue
            lo, hi = pad + sinks, T - recent
            assert pos.tolist() == list(range(pad, lo)) + [hi - 1] + list(range(hi, T)), (li, b, h)
            assert cnt.tolist() == [1.0] * sinks + [hi - lo] + [1.0] * recent
            single = torch.ones(len(pos), dtype=torch.bool)
            single[sinks] = False
            torch.testing.assert_close(k[single], k64[b, h, pos[single]], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v[single], v64[b, h, pos[single]], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(k[sinks], k64[b, h, lo:hi].mean(0), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v[sinks], v64[b, h, lo:hi].mean(0), atol=1e-5, rtol=1e-5)


def test_compact_with_heads_of_different_lengths_and_tiny_targets():
    """compact itself: retrieval heads keep every real slot, a target below
    sinks + 2 shrinks the sinks (keep = 1: the compensation slot alone)."""
    from kvcompress.methods.base import LayerView

    g = torch.Generator().manual_seed(0)
    B, H, n, D = 2, 2, 10, 4
    keys, values = torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g)
    view = LayerView(layer_idx=0, num_layers=4, queries=None, keys=keys, values=values,
                     kv_start=torch.tensor([0, 3]), scaling=0.5, state={}, phase="prefill")
    m = _method(budget=6, sinks=4)
    centers, merged, carried = m.compact(view, 6)
    assert centers.shape == (B, H, 10) and torch.isnan(carried).all()
    assert centers[0, 1].tolist() == list(range(10)) and centers[1, 1].tolist() == list(range(3, 10)) + [-1] * 3
    assert centers[0, 0].tolist() == [0, 1, 2, 3, 8, 9] + [-1] * 4  # slots 4..8 fold into slot 8
    assert merged.counts[0, 0].tolist() == [1, 1, 1, 1, 5, 1] + [0] * 4
    assert centers[1, 0].tolist() == [3, 4, 5, 6, 8, 9] + [-1] * 4  # 7 real slots: 3 + 4 sinks, 2 folded, 1 recent
    torch.testing.assert_close(merged.keys[1, 0, 4].double(), keys[1, 0, 7:9].double().mean(0))
    assert (merged.keys[0, 0, 6:] == 0).all() and (merged.counts[1, 1, 7:] == 0).all()
    for keep, want in [(3, [0, 8, 9]), (2, [8, 9]), (1, [9])]:
        centers, merged, _ = m.compact(view, keep)
        assert centers[0, 0, :len(want)].tolist() == want, keep
        assert float(merged.counts[0, 0].sum()) == 10
    centers, merged, _ = m.compact(view, 1)
    torch.testing.assert_close(merged.values[0, 0, 0].double(), values[0, 0].double().mean(0))


# ------------------------------------------------------------ decoding

def test_decode_compensation_stays_the_exact_mean_of_what_it_absorbed(tiny_model):
    """Layer 0's keys depend only on the token and its position, so the full
    output sequence recomputes every key any slot ever held: each held slot
    is its token's key, or (count c > 1) the mean of the c tokens since the
    previous held slot."""
    rows = [random_ids(30, 3), random_ids(45, 4)]
    ids, mask = left_pad(rows)
    new = 40
    out, cache = _gen(tiny_model, _method(budget=12, sinks=4, interval=4), ids, mask, new)
    full_mask = torch.cat([mask, torch.ones(2, new, dtype=torch.long)], 1)
    _, k64, v64 = layer_qkv(tiny_model, out, full_mask)[0]
    folded = 0
    for (b, h), (k, v, pos, cnt) in head_rows(cache.layers[0]).items():
        pad = ids.shape[1] - len(rows[b])
        prev = pad - 1
        for i, p in enumerate(pos.tolist()):
            c = p - prev
            assert cnt[i] == c, (b, h, i, p, prev)
            torch.testing.assert_close(k[i], k64[b, h, prev + 1:p + 1].mean(0), atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(v[i], v64[b, h, prev + 1:p + 1].mean(0), atol=2e-5, rtol=1e-5)
            folded += c > 1
            prev = p
        assert prev == out.shape[1] - 2  # the newest token's slot is written by the next step
        # a retrieval head keeps its prefill length (budget=), the others the budget
        assert len(pos) < (len(rows[b]) if h == 1 else 12) + 4
    assert folded >= 4  # every head has folded (the retrieval head too, past its prefill length)


def test_one_decode_step_is_attention_with_the_log_count_bias(tiny_model, monkeypatch):
    calls = []
    original = CompressedLayer.attend

    def spy(self, query, spec):
        out = original(self, query, spec)
        if self.layer_idx == 1 and query.shape[2] == 1 and self.ragged is not None:
            keys, values, _, counts, _, start = self.store.to_padded()
            calls.append((query.double(), keys.double(), values.double(), counts.double(), start, spec.scaling,
                          out.double()))
        return out

    monkeypatch.setattr(CompressedLayer, "attend", spy)
    ids, mask = left_pad([random_ids(33, 5), random_ids(50, 6)])
    _gen(tiny_model, _method(budget=12, interval=4), ids, mask, 12)
    assert len(calls) == 11
    for q, keys, values, counts, start, scaling, out in calls:
        B, Hq = q.shape[:2]
        H = keys.shape[0] // B
        assert (counts > 1).any()
        for b in range(B):
            for hq in range(Hq):
                r = b * H + hq // (Hq // H)
                s = int(start[r])
                logits = keys[r, 0, s:] @ q[b, hq, 0] * scaling + counts[r, s:].log()
                want = torch.softmax(logits, 0) @ values[r, 0, s:]
                torch.testing.assert_close(out[b, 0, hq], want, atol=1e-5, rtol=1e-5)


def test_ratio_keeps_the_retrieval_heads_whole_while_decoding(tiny_model):
    steps = []
    from transformers import LogitsProcessor, LogitsProcessorList

    class Record(LogitsProcessor):
        def __call__(self, input_ids, scores):
            cache = session.cache
            steps.append((cache.get_seq_length(), [layer.head_lengths() for layer in cache.layers]))
            return scores

    ids = random_ids(60, 7)[None]
    with kvc.compress(tiny_model, _method(ratio=0.5, interval=4)) as session:
        tiny_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=40,
                            min_new_tokens=40, logits_processor=LogitsProcessorList([Record()]), **GREEDY)
    for seen, layers in steps:
        target = int(seen * 0.5)
        for li, heads in enumerate(layers):
            for h, n in enumerate(heads):
                if (li, h) in TINY_WHOLE:
                    assert seen - 1 <= n <= seen, (seen, li, h, n)  # its share, 2 * int(seen / 2)
                else:
                    assert target <= n < target + 4 + 1, (seen, li, h, n)


# ------------------------------------------------------------ generation

def test_budget_above_the_prompt_reproduces_generate(tiny_model):
    ids, mask = left_pad([random_ids(50, 8), random_ids(70, 9)])
    plain, _ = _gen(tiny_model, None, ids, mask, 20)
    out, cache = _gen(tiny_model, _method(budget=100), ids, mask, 20)
    assert torch.equal(out, plain)
    out, _ = _gen(tiny_model, RazorAttention(budget=100), ids, mask, 20)  # profile computed by prepare()
    assert torch.equal(out, plain)


def test_a_padded_row_generates_what_it_generates_alone(tiny_model):
    short, long_ = random_ids(30, 10), random_ids(64, 11)
    ids, mask = left_pad([short, long_])
    method = _method(budget=16, interval=4)
    out, _ = _gen(tiny_model, method, ids, mask, 16)
    alone_s, _ = _gen(tiny_model, method, short[None], torch.ones(1, 30, dtype=torch.long), 16)
    alone_l, _ = _gen(tiny_model, method, long_[None], torch.ones(1, 64, dtype=torch.long), 16)
    assert torch.equal(out[0, -46:], alone_s[0])
    assert torch.equal(out[1], alone_l[0])


def test_prepare_computes_the_profile_and_checks_a_given_one(tiny_model):
    m = RazorAttention(budget=16).prepare(tiny_model)
    assert isinstance(m.profile, HeadProfile) and m.profile.num_layers == 4
    r = m.retrieval_heads()
    assert r.shape == (4, 2) and 1 <= int(r.sum()) <= 4  # ceil(0.14 * 16) + ceil(0.01 * 16) query heads
    with pytest.raises(ValueError, match="profile: made for 3 layers"):
        RazorAttention(budget=16, profile=_profile(L=3)).prepare(tiny_model)
    assert RazorAttention(budget=16, profile=m.profile.to_dict()).profile.kv_heads == 2


# ------------------------------------------------------------ options

@pytest.mark.parametrize("kw, exc, name", [
    (dict(sinks=-1), ValueError, "sinks"),
    (dict(sinks=1.5), TypeError, "sinks"),
    (dict(induction=1.5), ValueError, "induction"),
    (dict(induction=math.nan), ValueError, "induction"),
    (dict(induction="0.1"), TypeError, "induction"),
    (dict(echo=-0.1), ValueError, "echo"),
    (dict(echo=True), TypeError, "echo"),
    (dict(profile=3), TypeError, "profile"),
    (dict(budget=5), ValueError, "budget"),  # sinks 4 + compensation + one recent slot = 6
    (dict(interval=-1), ValueError, "interval"),
])
def test_bad_options_are_refused_by_name(kw, exc, name):
    kw.setdefault("budget", 16)
    with pytest.raises(exc, match=name):
        RazorAttention(**kw)


def test_flags_and_registry():
    m = kvc.RazorAttention(budget=6)
    assert m.min_budget() == 6 and m.headwise and m.merges and m.count_bias and m.whole_heads
    from kvcompress.methods import EVICTING, REGISTRY, method_from_spec

    assert REGISTRY["razorattention"] is RazorAttention and "razorattention" in EVICTING
    spec = method_from_spec("razorattention:sinks=2:induction=0.2", budget=10)
    assert spec.sinks == 2 and spec.induction == 0.2
    with pytest.raises(ValueError, match="profile"):
        RazorAttention(budget=8).retrieval_heads()
