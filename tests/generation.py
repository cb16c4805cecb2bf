"""Prompts, greedy generation and a tiny sliding-window model shared by the
end-to-end tests.

One definition of a random prompt, of left padding and of a greedy
``generate()`` with or without a compression session, so that the tests that
compare a padded row with the same row alone, or a compressed run with plain
``generate()``, all build their inputs the same way.
"""

import torch

import kvcompress as kvc
from kvcompress.compat import cache_kwargs
from kvcompress.testing import left_pad  # noqa: F401  (the tests import it from here)

#: greedy decoding; pad id 0 (the tiny models' vocabulary starts real tokens at 3)
GREEDY = dict(do_sample=False, pad_token_id=0)


def random_ids(length: int, seed: int, low: int = 3, high: int = 512) -> torch.Tensor:
    """``[length]`` int64 token ids drawn with a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (length,), generator=g)


def greedy(model, ids, mask=None, *, method=None, n: int = 10, **kw):
    """Exactly ``n`` greedy tokens after ``ids [B, T]``.

    Returns ``(output, session)``: ``session`` is the compression session
    (its ``.cache`` the cache it used) or ``None`` for plain ``generate()``.
    ``kw`` goes to ``generate()`` (``num_beams``, ``output_logits`` ...).
    """
    mask = torch.ones_like(ids) if mask is None else mask
    args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **GREEDY, **kw)
    if method is None:
        return model.generate(**args), None
    with kvc.compress(model, method) as session:
        out = model.generate(**args)
    return out, session


def short_row_beside_a_long_one(model, method, short, long_, n: int = 10):
    """Greedy tokens of ``short`` (1-D ids) left-padded beside ``long_`` in a
    compression session of ``method``, and of ``short`` alone with plain
    ``generate()``: ``(in_batch [n], alone [n])``, equal when padding
    changes nothing the row sees."""
    ids, mask = left_pad([short, long_])
    out, _ = greedy(model, ids, mask, method=method, n=n)
    alone, _ = greedy(model, short[None], n=n)
    return out[0, ids.shape[1]:], alone[0, len(short):]


def prefill(model, method, ids, mask=None):
    """One forward of ``ids [B, T]`` into a fresh compressed cache; returns
    the cache. Left-padded rows count positions from their first real token,
    as ``generate()`` and ``model_refs.layer_qkv`` do."""
    pos = None if mask is None else (mask.long().cumsum(-1) - 1).clamp(min=0)
    with kvc.compress(model, method) as session:
        cache = session.new_cache()
        with torch.no_grad():
            model(ids, attention_mask=mask, position_ids=pos, **cache_kwargs(model, cache))
    return cache


def head_rows(layer):
    """What a per-head layer holds, per ``(row, kv head)``: ``(keys [n, D],
    values [n, Dv], positions [n], counts [n])`` in float64 (int64
    positions), padding dropped."""
    store = layer.store
    keys, values, pos, counts, _, start = store.to_padded()
    out = {}
    for i in range(store.batch * store.heads):
        s = int(start[i])
        out[divmod(i, store.heads)] = (keys[i, 0, s:].double(), values[i, 0, s:].double(), pos[i, s:].long(),
                                       counts[i, s:].double())
    return out


def tiny_auto(model_type: str, **config):
    """A random float32 model of transformers' ``model_type`` from
    ``AutoConfig.for_model(model_type, **config)`` (seed 0, eval mode);
    the test skips, saying why, where this transformers cannot build it."""
    import pytest
    import transformers

    try:
        cfg = transformers.AutoConfig.for_model(model_type, **config)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # noqa: BLE001 - report why the family cannot run here
        pytest.skip(f"{model_type}: cannot build a tiny model on transformers {transformers.__version__}: "
                    f"{type(e).__name__}: {e}")
    return model.float().eval()


def tiny_sliding_mistral():
    """A randomly initialised 3-layer Mistral (2 kv heads, D = 16, seed 0)
    whose every layer slides over 64 tokens, eager attention."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=64,
                        max_position_embeddings=1024, pad_token_id=0)
    cfg._attn_implementation = "eager"
    return MistralForCausalLM(cfg).eval()
