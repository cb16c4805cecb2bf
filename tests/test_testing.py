"""kvcompress.testing on a tiny random model: each measure is checked against
an independent computation (plain generate, one uncached forward, float64)."""

import contextlib
import math

import pytest
import torch

import kvcompress as kvc
from kvcompress import testing as T


def _ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (1, n), generator=g)


def _generate(model, ids, n, method=None):
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
              do_sample=False, return_dict_in_generate=True, output_logits=True)
    if method is None:
        return model.generate(**kw)
    with kvc.compress(model, method):
        return model.generate(**kw)


def _kl64(p_logits, q_logits):
    p = torch.log_softmax(p_logits.double(), -1)
    q = torch.log_softmax(q_logits.double(), -1)
    return float((p.exp() * (p - q)).sum())


@pytest.mark.parametrize("method", [None, kvc.SnapKV(budget=24, window=16), kvc.H2O(budget=24, interval=4),
                                    kvc.StreamingLLM(budget=20, interval=4)], ids=T.method_name)
def test_greedy_matches_generate(tiny_lm, method):
    """The explicit-position loop produces generate()'s tokens, also after
    eviction (where the cache holds fewer slots than tokens seen)."""
    model, _, _ = tiny_lm
    ids = _ids(80)
    ref = _generate(model, ids, 12, method).sequences[0, 80:].tolist()
    with T.method_context(model, method) as new_cache:
        tokens, logits = T.greedy(model, new_cache(), ids, 12, keep_logits=True)
    assert tokens == ref
    assert logits.shape == (12, model.config.vocab_size)


def test_fidelity_full_and_lossless(tiny_lm):
    model, tok, _ = tiny_lm
    text = "".join(chr(97 + (i * 7) % 26) for i in range(400))
    ref = T.fidelity_reference(model, tok, text, context_tokens=100, k=6)
    for method in (None, kvc.SnapKV(budget=500)):
        kl, agree = T.fidelity_case(model, method, ref)
        assert kl.shape == (6,) and agree.shape == (6,)
        assert float(kl.max()) < 1e-10 and float(agree.min()) == 1.0


def test_fidelity_matches_generate_logits(tiny_lm):
    """Step 1 of the teacher-forced run reads the same token as generate's
    second step (the prefill's argmax), so its KL equals the KL between the
    full and compressed generate() logits there, recomputed in float64."""
    model, tok, _ = tiny_lm
    text = "".join(chr(97 + (i * 5) % 26) for i in range(400))
    method = kvc.SnapKV(budget=16, window=4)
    ref = T.fidelity_reference(model, tok, text, context_tokens=120, k=4)
    kl, agree = T.fidelity_case(model, method, ref)
    full = _generate(model, ref.ids, 2)
    comp = _generate(model, ref.ids, 2, method)
    assert comp.sequences[0, -2] == full.sequences[0, -2] == ref.tokens[0]
    expected = _kl64(full.logits[1][0], comp.logits[1][0])
    assert expected > 1e-6  # the compression changed something
    assert math.isclose(float(kl[0]), expected, rel_tol=1e-6, abs_tol=1e-9)
    assert float(agree[0]) == float(comp.logits[1][0].argmax() == full.logits[1][0].argmax())
    result = T.fidelity(model, tok, method, references=[ref])
    assert math.isclose(result.kl, float(kl.mean()), rel_tol=1e-12)
    assert "KL" in repr(result) and "SnapKV" in repr(result)


def test_perplexity_window_full_equals_one_forward(tiny_lm):
    model, _, _ = tiny_lm
    ids = _ids(150, seed=3)
    nll, count = T.perplexity_window(model, None, ids, 100)
    with torch.inference_mode():
        logits = model(ids).logits[0].double()
    expected = torch.nn.functional.cross_entropy(logits[100:-1], ids[0, 101:], reduction="sum")
    assert count == 49
    assert math.isclose(nll, float(expected), rel_tol=1e-5)
    lossless, _ = T.perplexity_window(model, kvc.SnapKV(budget=1000), ids, 100)
    assert math.isclose(lossless, nll, rel_tol=1e-6)
    lossy, _ = T.perplexity_window(model, kvc.StreamingLLM(budget=16), ids, 100)
    assert not math.isclose(lossy, nll, rel_tol=1e-6)


def test_perplexity_result(tiny_lm):
    model, tok, _ = tiny_lm
    text = "".join(chr(97 + (i * 3) % 26) for i in range(2000))
    r = T.perplexity(model, tok, None, text, context_tokens=64, continuation_tokens=16, windows=3)
    assert r.tokens == 3 * 15 and r.windows == 3
    assert math.isclose(r.ppl, math.exp(r.nll))
    windows = T.perplexity_windows(tok, text, context_tokens=64, continuation_tokens=16, windows=3)
    total = sum(T.perplexity_window(model, None, w, 64)[0] for w in windows)
    assert math.isclose(r.nll, total / r.tokens, rel_tol=1e-12)


def test_cache_bytes(tiny_lm):
    model, _, _ = tiny_lm
    ids = _ids(60)
    with T.method_context(model, None) as new_cache:
        cache = new_cache()
        T.greedy(model, cache, ids, 3)
    expected = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert T.cache_bytes(cache) == expected
    with T.method_context(model, kvc.SnapKV(budget=16, window=8)) as new_cache:
        cache = new_cache()
        T.greedy(model, cache, ids, 3)
    assert T.cache_bytes(cache) == cache.memory_bytes() < expected


def test_callable_method_context(tiny_lm):
    """A kvpress-style press: ``press(model)`` is a context manager; a plain
    DynamicCache is used under it."""
    model, _, _ = tiny_lm
    events = []

    class Press:
        compression_ratio = 0.25

        @contextlib.contextmanager
        def __call__(self, m):
            events.append(("enter", m is model))
            try:
                yield
            finally:
                events.append("exit")

    ids = _ids(40)
    with T.method_context(model, Press()) as new_cache:
        cache = new_cache()
        tokens, _ = T.greedy(model, cache, ids, 4)
        assert type(cache).__name__ == "DynamicCache"
    assert events == [("enter", True), "exit"]
    assert tokens == _generate(model, ids, 4).sequences[0, 40:].tolist()
    assert T.method_name(Press()) == "Press(compression_ratio=0.25)"


def test_passkey_accuracy_grid(tiny_lm):
    model, tok, _ = tiny_lm
    r = T.passkey_accuracy(model, tok, kvc.SnapKV(budget=32), lengths=(40, 60), depths=(0.0, 1.0), max_new_tokens=3)
    assert [(c.n_filler, c.depth) for c in r.cases] == [(40, 0.0), (40, 1.0), (60, 0.0), (60, 1.0)]
    assert all(c.prompt_tokens > c.n_filler for c in r.cases)
    assert len({c.key for c in r.cases}) == 4  # seed + case index: a different key per case
    assert 0.0 <= r.accuracy <= 1.0
    assert r.cache_bytes == max(c.cache_bytes for c in r.cases) > 0
    assert "PasskeyResult(SnapKV" in repr(r)


@pytest.mark.parametrize("call, match", [
    (lambda m, t: T.passkey_accuracy(m, t, 42), "method"),
    (lambda m, t: T.fidelity(m, t, None, "one string"), "texts"),
    (lambda m, t: T.fidelity(m, t, None, []), "texts"),
    (lambda m, t: T.fidelity(m, t, None, ["abc"], context_tokens=10), "texts"),
    (lambda m, t: T.fidelity_reference(m, t, "x" * 100, context_tokens=10, k=0), "k"),
    (lambda m, t: T.perplexity(m, t, None, "x" * 100, windows=0), "windows"),
    (lambda m, t: T.perplexity(m, t, None, "x" * 100, context_tokens=90, continuation_tokens=20), "text"),
    (lambda m, t: T.greedy(m, None, torch.zeros(2, 5, dtype=torch.long), 2), "input_ids"),
    (lambda m, t: T.greedy(m, None, torch.zeros(1, 5, dtype=torch.long), 0), "new_tokens"),
])
def test_bad_arguments(tiny_lm, call, match):
    model, tok, _ = tiny_lm
    with pytest.raises((ValueError, TypeError), match=match):
        call(model, tok)


def _case(ok, depth=0.5):
    return T.PasskeyCase(1000, depth, "12345", "12345" if ok else "1234", ok, 1030, 100)


def test_assert_passkey_messages():
    T.assert_passkey(T.PasskeyResult("m", [_case(True), _case(True)]))
    bad = T.PasskeyResult("m", [_case(True), _case(False, depth=0.9)])
    T.assert_passkey(bad, min_accuracy=0.5)
    with pytest.raises(AssertionError, match=r"accuracy 0.500 < 1.0 \(1 of 2 missed\)[\s\S]*depth 0.9: key 12345, answered '1234'"):
        T.assert_passkey(bad)
    with pytest.raises(AssertionError, match="no passkey cases"):
        T.assert_passkey(T.PasskeyResult("m", []))


def test_assert_fidelity_and_perplexity_messages():
    r = T.FidelityResult("m", 8, kl=0.2, kl_max=0.5, top1=0.75, per_text=[(0.2, 0.75)])
    T.assert_fidelity(r, max_kl=0.2, min_top1=0.75)
    with pytest.raises(AssertionError, match=r"mean KL 0.2000 nats > 0.1; top-1 agreement 0.750 < 0.9"):
        T.assert_fidelity(r, max_kl=0.1, min_top1=0.9)
    nan = T.FidelityResult("m", 8, kl=float("nan"), kl_max=float("nan"), top1=float("nan"))
    with pytest.raises(AssertionError):
        T.assert_fidelity(nan, max_kl=1.0)
    base = T.PerplexityResult("full", 10.0, math.log(10.0), 100, 1)
    T.assert_perplexity(T.PerplexityResult("m", 10.9, math.log(10.9), 100, 1), base, max_increase=0.1)
    with pytest.raises(AssertionError, match=r"perplexity 11.500 > 11.000"):
        T.assert_perplexity(T.PerplexityResult("m", 11.5, math.log(11.5), 100, 1), base, max_increase=0.1)
    with pytest.raises(ValueError, match="baseline"):
        T.assert_perplexity(T.PerplexityResult("m", 10.0, math.log(10.0), 50, 1), base)


def test_assert_compressed(tiny_lm):
    model, _, _ = tiny_lm
    with T.method_context(model, kvc.SnapKV(budget=16, window=8)) as new_cache:
        cache = new_cache()
        T.greedy(model, cache, _ids(128), 2)
    ratio = cache.stats().compression
    T.assert_compressed(cache, min_ratio=ratio)
    with pytest.raises(AssertionError, match="x <"):
        T.assert_compressed(cache, min_ratio=ratio * 1.01)
