"""Hybrid models: attention layers compressed, recurrent layers kept as transformers keeps them.

Tiny random models (hidden 64, 4 layers, no download) of the families that mix
attention with layers holding a fixed-size state: a causal convolution
(LFM2), a gated delta rule (Qwen3-Next, Qwen3.5), Mamba (Jamba, Nemotron-H),
and RecurrentGemma, whose recurrent layers keep their state themselves and
whose layer 0 holds no keys. The references are plain ``generate()`` with
transformers' own cache, on a left-padded batch of two.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import DynamicCache

import kvcompress as kvc
from kvcompress.compat import cache_kwargs
from generation import left_pad, random_ids, tiny_auto

# transformers' Cache holds recurrent layers from the release that added
# LinearAttentionLayer (5.25 has it, 5.0 does not: there each hybrid family
# brings a cache class of its own, and compress() refuses such models by name)
pytest.importorskip("transformers.cache_utils", reason="transformers without cache_utils")
if not hasattr(__import__("transformers.cache_utils", fromlist=["x"]), "LinearAttentionLayer"):
    pytest.skip(f"transformers {transformers.__version__}: no LinearAttentionLayer, hybrid models have caches "
                f"of their own", allow_module_level=True)

_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_LINEAR = dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
               head_dim=16)

#: family -> (model type, config kwargs); recurrent layers at 0 and 2 (Qwen: 0, 1, 2)
FAMILIES = {
    "lfm2": ("lfm2", dict(_BASE, layer_types=["conv", "full_attention", "conv", "full_attention"])),
    "qwen3_next": ("qwen3_next", dict(_BASE, **_LINEAR, num_experts=2, num_experts_per_tok=1,
                                      moe_intermediate_size=64, shared_expert_intermediate_size=64,
                                      decoder_sparse_step=1)),
    "qwen3_5": ("qwen3_5_text", dict(_BASE, **_LINEAR)),
    "jamba": ("jamba", dict(_BASE, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=100, num_experts=1,
                            mamba_d_state=8, mamba_expand=2, mamba_dt_rank=8, use_mamba_kernels=False)),
    "nemotron_h": ("nemotron_h", dict(_BASE, hybrid_override_pattern="M*M*", mamba_num_heads=4, mamba_head_dim=16,
                                      ssm_state_size=8, n_groups=1)),
    "recurrent_gemma": ("recurrent_gemma", dict(_BASE, num_hidden_layers=3, num_key_value_heads=1,
                                                lru_width=64, attention_window_size=16,
                                                block_types=["recurrent", "attention", "recurrent"])),
}
NEW = 10
BUDGET_ABOVE = 256  # above the prompt: nothing is evicted


@pytest.fixture(scope="module")
def models():
    return {}


def _model(models, family):
    if family not in models:
        models[family] = tiny_auto(FAMILIES[family][0], **FAMILIES[family][1])
    return models[family]


def _batch():
    return left_pad([random_ids(70, 31, high=250), random_ids(100, 32, high=250)])


def _generate(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                              do_sample=False, pad_token_id=0, **kw)


METHODS = {
    "snapkv": lambda b: kvc.SnapKV(budget=b),
    "adakv": lambda b: kvc.AdaKV(budget=b),
    "ems": lambda b: kvc.EMS(budget=b),
    "pyramidkv": lambda b: kvc.PyramidKV(budget=b),
    # a residual above the prompt: nothing is packed, so nothing is rounded
    "kivi": lambda b: kvc.KIVI(bits=2, residual=512),
}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_budget_above_prompt_reproduces_generate(models, family, method):
    """Nothing evicted: the same greedy tokens as transformers' own cache,
    so the recurrent layers got their states back and every layer its
    positions (RecurrentGemma's layer 0 holds no keys, and the model reads
    the cache's length at layer 0)."""
    model = _model(models, family)
    ids, mask = _batch()
    ref = _generate(model, ids, mask)
    with kvc.compress(model, METHODS[method](BUDGET_ABOVE)) as session:
        out = _generate(model, ids, mask)
    assert torch.equal(out, ref)
    assert session.cache.get_seq_length() == ids.shape[1] + NEW - 1


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compressed_attention_layers_beside_recurrent_states(models, family):
    """At a budget below the prompt the attention layers keep the budget
    (plus the tokens decoded since), the recurrent layers hold the same
    states transformers' cache holds (shapes and bytes), and the stats show
    both kinds of layer."""
    model = _model(models, family)
    ids, mask = _batch()
    with torch.no_grad():
        dyn = DynamicCache(config=model.config)
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(model, dyn))
    with kvc.compress(model, kvc.SnapKV(budget=32, window=8)) as session:
        _generate(model, ids, mask)
    cache = session.cache
    stats = cache.stats()
    attention = [s for s in stats.layers if s.store != "recurrent"]
    assert attention, stats
    for s in attention:  # a sliding layer (RecurrentGemma's) keeps no more than its window
        want = 32 + NEW - 1 if s.window is None else min(32 + NEW - 1, s.window)
        assert s.lengths == [want] * len(s.lengths) if s.window is None else max(s.lengths) <= want, stats
    recurrent = [s for s in stats.layers if s.store == "recurrent"]
    theirs = [i for i, layer in enumerate(dyn.layers) if hasattr(layer, "conv_states")
              and any(t is not None for t in layer.conv_states.values())]
    assert [s.layer for s in recurrent] == theirs
    for s in recurrent:
        ours, full = cache._states[s.layer], dyn.layers[s.layer]
        for a, b in ((ours.conv_states, full.conv_states), (ours.recurrent_states, full.recurrent_states)):
            assert {k: None if t is None else tuple(t.shape) for k, t in a.items()} == \
                   {k: None if t is None else tuple(t.shape) for k, t in b.items()}
        assert s.bytes == s.full_bytes > 0
    assert cache.memory_bytes() == stats.total_bytes
    # RecurrentGemma keeps its recurrent states in its modules: no such rows
    assert ("| recurrent |" in str(stats)) == bool(theirs)


@pytest.mark.parametrize("family", ["lfm2", "qwen3_next", "jamba"])
def test_beam_search_reorders_the_recurrent_states(models, family):
    model = _model(models, family)
    ids, mask = _batch()
    ref = _generate(model, ids, mask, num_beams=3, num_return_sequences=3)
    with kvc.compress(model, kvc.SnapKV(budget=BUDGET_ABOVE)):
        out = _generate(model, ids, mask, num_beams=3, num_return_sequences=3)
    assert torch.equal(out, ref)


def _states_of(layer):
    return [t for store in (layer.conv_states, layer.recurrent_states) for t in store.values() if t is not None]


@pytest.mark.parametrize("family", ["lfm2", "qwen3_next", "jamba"])
def test_batch_operations_move_the_recurrent_states(models, family):
    """Beam search's reorders, batch selection and repetition move every
    recurrent state with its row: after each, the states are the rows of
    transformers' own states after the same prefill that the operations so
    far took (transformers' layers have no selection or repetition of
    their own); bad rows are refused before anything moves."""
    model = _model(models, family)
    ids, mask = left_pad([random_ids(40, 41, high=250), random_ids(50, 42, high=250), random_ids(30, 43, high=250)])
    dyn = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(model, dyn))
        with kvc.compress(model, kvc.SnapKV(budget=BUDGET_ABOVE)) as session:
            model(input_ids=ids, attention_mask=mask)
    ours = session.cache
    rows = torch.arange(3)  # which prefill row each row of the cache now is
    steps = (("reorder_cache", torch.tensor([2, 0, 1])), ("batch_select_indices", torch.tensor([1, 2])),
             ("batch_repeat_interleave", 2), ("reorder_cache", torch.tensor([3, 3, 0, 1])))
    for op, arg in ((None, None),) + steps:
        if op is not None:
            getattr(ours, op)(arg)
            rows = rows.repeat_interleave(arg) if op == "batch_repeat_interleave" else rows[arg]
        assert sorted(ours._states) == [i for i, layer in enumerate(dyn.layers) if hasattr(layer, "conv_states")]
        for i, state in ours._states.items():
            a, b = _states_of(state), _states_of(dyn.layers[i])
            assert len(a) == len(b) > 0, (op, i)
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y[rows], rtol=1e-5, atol=1e-6, msg=f"{op}, layer {i}")
    with pytest.raises(ValueError, match="beam_idx"):
        ours.reorder_cache(torch.tensor([0, 9, 1, 2]))


@pytest.mark.parametrize("method", [
    lambda: kvc.MiniCache(), lambda: kvc.DynamicKV(budget=32), lambda: kvc.TidalDecode(token_budget=32),
    lambda: kvc.SnapKV(budget=32) + kvc.TidalDecode(token_budget=16)],
    ids=["MiniCache", "DynamicKV", "TidalDecode", "SnapKV+TidalDecode"])
def test_methods_that_need_keys_on_every_layer_are_refused_by_name(models, method):
    model = _model(models, "lfm2")
    with pytest.raises(kvc.KVCompressUnsupportedError, match="hybrid model"):
        with kvc.compress(model, method()):
            pass
    # a cache built without the layer types refuses at the first recurrent
    # layer's call, before that layer's state is made
    cache = kvc.KVCache(method())
    ids, mask = _batch()
    with kvc.compress(model, kvc.SnapKV(budget=32)):
        with pytest.raises(kvc.KVCompressUnsupportedError, match="hybrid model"):
            model(input_ids=ids, attention_mask=mask, **cache_kwargs(model, cache))
    assert not cache._states


@pytest.mark.parametrize("model_type, kwargs, match", [
    ("falcon_h1", dict(_BASE, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8,
                       head_dim=16), "hybrid"),
    ("mamba", dict(hidden_size=64, num_hidden_layers=2, vocab_size=256, state_size=8), "no keys and values"),
], ids=["falcon_h1", "mamba"])
def test_models_without_separate_attention_layers_are_refused_by_name(model_type, kwargs, match):
    """Falcon-H1 runs attention and Mamba in the same layer; Mamba has no
    attention at all: both are refused when the session starts."""
    model = tiny_auto(model_type, **kwargs)
    with pytest.raises(kvc.KVCompressUnsupportedError, match=f"layer_types.*{match}"):
        kvc.compress(model, kvc.SnapKV(budget=32))


@pytest.mark.parametrize("kinds, match", [
    (["full_attention", "indexed_attention"], r"layers \[1\] are 'indexed_attention' \(sparse attention"),
    (["compressed_sparse_attention", "full_attention"], r"layers \[0\] are 'compressed_sparse_attention'"),
    (["full_attention", "hybrid_sliding"], r"'hybrid_sliding'"),
    (["full_attention", "brand_new_attention"], r"'brand_new_attention' \(a layer type kvcompress does not know"),
])
def test_layer_types_we_do_not_serve_are_refused_by_name(kinds, match):
    with pytest.raises(kvc.KVCompressUnsupportedError, match=match):
        kvc.KVCache(kvc.SnapKV(budget=32), layer_types=kinds)
    # MLP-only or shared layers ("dummy") and the kinds we serve are accepted
    kvc.KVCache(kvc.SnapKV(budget=32), layer_types=["dummy", "full_attention", "sliding_attention", "conv"])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(layer_types="full_attention"), TypeError, "layer_types"),
    (dict(layer_types=["full_attention", 3]), TypeError, "layer_types"),
    (dict(attention_chunk=0), ValueError, "attention_chunk"),
    (dict(attention_chunk=True), ValueError, "attention_chunk"),
    (dict(attention_chunk=8.5), ValueError, "attention_chunk"),
])
def test_bad_layer_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        kvc.KVCache(kvc.SnapKV(budget=32), **kwargs)


def test_chunked_attention_is_served_up_to_one_chunk():
    """Llama 4's chunked layers attend as full ones while the sequence fits
    one chunk (here 48 tokens): nothing evicted, generate()'s tokens; past
    it their queries see only their own chunk, a mask kvcompress does not
    build, so the update that would cross it is refused by name."""
    model = tiny_auto("llama4_text", **dict(_BASE, head_dim=16, attention_chunk_size=48, no_rope_layers=[1, 1, 1, 0],
                                         num_local_experts=2, num_experts_per_tok=1, intermediate_size_mlp=128))
    from kvcompress.recurrent import layer_kinds

    assert "chunked_attention" in layer_kinds(model.config)
    ids = random_ids(30, 51, high=250)[None]
    mask = torch.ones_like(ids)
    ref = _generate(model, ids, mask)
    with kvc.compress(model, kvc.SnapKV(budget=BUDGET_ABOVE)):
        out = _generate(model, ids, mask)
    assert torch.equal(out, ref)
    ids = random_ids(60, 52, high=250)[None]
    with kvc.compress(model, kvc.SnapKV(budget=BUDGET_ABOVE)):
        with pytest.raises(kvc.KVCompressUnsupportedError, match=r"layer \d attends within chunks of 48 tokens"):
            _generate(model, ids, torch.ones_like(ids))


def test_a_fanout_prefill_refuses_recurrent_layers(models):
    """FanoutCache hands one prefill to several caches, which then decode
    apart; one recurrent state cannot be split among them, so the first
    recurrent layer's call is refused by name."""
    from kvcompress.fanout import FanoutCache

    model = _model(models, "lfm2")
    ids, mask = _batch()
    fan = FanoutCache([kvc.KVCache(kvc.SnapKV(budget=32)), kvc.KVCache(kvc.StreamingLLM(budget=32))])
    with kvc.compress(model, kvc.SnapKV(budget=32)):
        with pytest.raises(kvc.KVCompressUnsupportedError, match="FanoutCache: layer 0 holds a recurrent state"):
            model(input_ids=ids, attention_mask=mask, **cache_kwargs(model, fan))
