"""KVCache.update refuses what a model could not have meant, naming the
argument, and leaves the cache as it was (kvcompress/states.py)."""

from __future__ import annotations

import pytest
import torch

import kvcompress as kvc
from kvcompress.methods import method_from_spec
from kvcompress.stores.base import AttentionSpec

B, H, HQ, D = 2, 2, 4, 16
SPECS = ["kivi:bits=4", "snapkv", "ems+kivi:bits=2", "adakv"]


def _cache(spec: str, layers: int = 2):
    method = method_from_spec(spec) if spec.startswith("kivi") else method_from_spec(spec, budget=48)
    return kvc.KVCache(method, num_layers=layers)


def _step(cache, g, q: int, layer: int = 0):
    """One update of ``layer`` with q tokens and the attention that follows it."""
    k, v = torch.randn(B, H, q, D, generator=g), torch.randn(B, H, q, D, generator=g)
    cache.update(k, v, layer)
    return cache.attend(layer, torch.randn(B, HQ, q, D, generator=g), AttentionSpec(scaling=D**-0.5))


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _bad_calls():
    k, v = torch.randn(B, H, 1, D), torch.randn(B, H, 1, D)
    return {
        "not a tensor": (([1.0], v, 0), TypeError, "key_states: expected a torch.Tensor"),
        "3-D keys": ((k[0], v, 0), ValueError, "key_states: expected [B, H, q, D]"),
        "3-D values": ((k, v[0], 0), ValueError, "value_states: expected [B, H, q, D]"),
        "integer keys": ((k.long(), v.long(), 0), TypeError, "key_states: expected a floating-point tensor"),
        "no tokens": ((k[:, :, :0], v[:, :, :0], 0), ValueError, "key_states: expected at least one"),
        "values of other tokens": ((k, torch.randn(B, H, 2, D), 0), ValueError,
                                   "value_states: expected the batch, kv heads and tokens"),
        "values in another dtype": ((k, v.double(), 0), TypeError, "value_states: expected key_states' dtype"),
        "another dtype than before": ((k.double(), v.double(), 0), TypeError,
                                      "key_states: expected torch.float32 as earlier updates of layer 0"),
        "another head dim": ((k[..., :8], v[..., :8], 0), ValueError, "key_states: expected 2 kv heads of 16"),
        "another value width": ((k, v[..., :8], 0), ValueError, "value_states: expected 16 channels"),
        "more kv heads": ((torch.randn(B, H + 1, 1, D), torch.randn(B, H + 1, 1, D), 0), ValueError,
                          "key_states: expected 2 kv heads"),
        "another batch": ((k[:1], v[:1], 0), ValueError, "key_states: expected batch 2"),
        "a layer past the model": ((k, v, 2), ValueError, "layer_idx: expected 0..1"),
        "a negative layer": ((k, v, -1), ValueError, "layer_idx: expected 0..1"),
        "a float layer": ((k, v, 0.0), TypeError, "layer_idx: expected an int"),
    }


@pytest.mark.parametrize("spec", SPECS)
def test_a_bad_update_is_refused_by_name_and_changes_nothing(spec):
    g = torch.Generator().manual_seed(0)
    cache = _cache(spec)
    for layer in (0, 1):
        _step(cache, g, 80, layer)  # a prefill long enough to compress and pack
    for layer in (0, 1):
        _step(cache, g, 1, layer)
    layer0 = cache.layers[0]
    before = [t.clone() for t in layer0.tensors()]
    seen, n, text = layer0.seen, layer0.n, repr(cache)
    for name, (args, error, message) in _bad_calls().items():
        with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
            cache.update(*args)
        after = layer0.tensors()
        assert layer0.seen == seen and layer0.n == n and repr(cache) == text, name
        # bit for bit (buffers' spare rows hold whatever new_empty gave, NaN included)
        assert len(after) == len(before) and all(_bits(a) == _bits(b) for a, b in zip(after, before)), name
    # and the cache goes on as if nothing had happened
    out = _step(cache, g, 1, 0)
    assert out.shape == (B, 1, HQ, D) and bool(torch.isfinite(out).all())
    assert cache.layers[0].seen == seen + 1


def test_a_cache_that_does_not_know_its_depth_takes_any_layer_index():
    g = torch.Generator().manual_seed(1)
    cache = kvc.KVCache(method_from_spec("snapkv", budget=48))
    _step(cache, g, 20, 3)
    assert len(cache.layers) == 4 and cache.layers[3].seen == 20
    with pytest.raises(ValueError, match="layer_idx: expected >= 0"):
        cache.update(torch.randn(B, H, 1, D), torch.randn(B, H, 1, D), -1)


def test_beam_search_rows_are_the_batch_later_updates_must_have():
    g = torch.Generator().manual_seed(2)
    cache = _cache("kivi:bits=4", layers=1)
    _step(cache, g, 40)
    cache.batch_repeat_interleave(3)  # what generate() does for num_beams=3
    k, v = torch.randn(3 * B, H, 1, D, generator=g), torch.randn(3 * B, H, 1, D, generator=g)
    cache.update(k, v, 0)  # the beams' batch is accepted
    cache.attend(0, torch.randn(3 * B, HQ, 1, D, generator=g), AttentionSpec(scaling=D**-0.5))
    with pytest.raises(ValueError, match=f"key_states: expected batch {3 * B}"):
        cache.update(k[:B], v[:B], 0)


@pytest.mark.parametrize("spec", SPECS)
def test_bad_row_indices_are_refused_before_any_layer_moves(spec):
    g = torch.Generator().manual_seed(3)
    cache = _cache(spec)
    for layer in (0, 1):
        _step(cache, g, 80, layer)
    snapshot = [[_bits(t) for t in layer.tensors()] for layer in cache.layers]
    bad = [
        (lambda: cache.reorder_cache(torch.tensor([0, B])), ValueError, r"beam_idx: expected row indices in \[0, 2\)"),
        (lambda: cache.reorder_cache(torch.tensor([0, -1])), ValueError, "beam_idx: expected row indices"),
        (lambda: cache.reorder_cache(torch.tensor([0.0, 1.0])), TypeError, "beam_idx: expected a 1-D integer"),
        (lambda: cache.reorder_cache(torch.tensor([[0, 1]])), TypeError, "beam_idx: expected a 1-D integer"),
        (lambda: cache.reorder_cache([1, 0]), TypeError, "beam_idx: expected a 1-D integer torch.Tensor"),
        (lambda: cache.reorder_cache(torch.tensor([], dtype=torch.long)), ValueError, "at least one row"),
        (lambda: cache.batch_select_indices(torch.tensor([B + 1])), ValueError, "indices: expected row indices"),
        (lambda: cache.batch_repeat_interleave(0), ValueError, "repeats: expected an int >= 1"),
        (lambda: cache.batch_repeat_interleave(1.5), TypeError, "repeats: expected an int >= 1"),
    ]
    for call, error, message in bad:
        with pytest.raises(error, match=message):
            call()
        assert [[_bits(t) for t in layer.tensors()] for layer in cache.layers] == snapshot, message
    # a good reorder still works, and the rows really moved
    cache.reorder_cache(torch.tensor([1, 0]))
    assert [[_bits(t) for t in layer.tensors()] for layer in cache.layers] != snapshot
    out = _step(cache, g, 1, 0)
    assert out.shape == (B, 1, HQ, D)
