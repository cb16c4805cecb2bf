"""``lookahead=True``: a layer is first compressed after the first decode
step's attention, with that step's query as the newest of the prompt's.

The independent reference is a run without lookahead on the prompt extended
by the first generated token: its prefill ends at the same token whose query
the lookahead run observes, so both compress the same slots with the same
queries and must generate the same tokens from there on."""

import pytest
import torch

import kvcompress as kvc
from kvcompress.methods import REGISTRY

PROMPT, NEW = 96, 24


def _ids(length, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (batch, length), generator=g)


def _generate(model, method, ids, new=NEW, mask=None):
    mask = torch.ones_like(ids) if mask is None else mask
    with kvc.compress(model, method) as session, torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:], session.cache


@pytest.mark.parametrize("name", ["snapkv", "tova", "h2o", "ems", "adakv", "pyramidkv", "taskkv", "kvcrush"])
def test_lookahead_equals_compressing_a_prompt_one_token_longer(tiny_model, name):
    ids = _ids(PROMPT, seed=11)
    ahead, _ = _generate(tiny_model, REGISTRY[name](budget=32, lookahead=True), ids)
    # the first generated token comes from the whole prompt either way
    plain_first, _ = _generate(tiny_model, REGISTRY[name](budget=32), ids, new=1)
    assert ahead[0, 0] == plain_first[0, 0]
    longer = torch.cat([ids, ahead[:, :1]], 1)
    ref, _ = _generate(tiny_model, REGISTRY[name](budget=32), longer, new=NEW - 1)
    assert torch.equal(ahead[:, 1:], ref), (name, ahead.tolist(), ref.tolist())


def test_lookahead_changes_what_is_kept(tiny_model):
    # TOVA scores with the newest query alone: a different newest query must
    # keep different slots (else the option would do nothing)
    ids = _ids(PROMPT, seed=12)
    kept = []
    for look in (False, True):
        _, cache = _generate(tiny_model, kvc.TOVA(budget=32, lookahead=look, interval=0), ids, new=2)
        # which prompt tokens each (layer, head) kept
        member = torch.zeros(len(cache.layers), 2, PROMPT, dtype=torch.bool)
        for li, layer in enumerate(cache.layers):
            for h, pos in enumerate(layer.positions[0].long()):
                member[li, h, pos[pos < PROMPT]] = True
        kept.append(member)
    assert not torch.equal(kept[0], kept[1])


def test_the_prompt_is_whole_until_the_first_decode_step(tiny_model):
    ids = _ids(PROMPT, seed=13)
    method = kvc.SnapKV(budget=32, lookahead=True)
    _, cache = _generate(tiny_model, method, ids, new=1)  # prefill only: nothing decoded yet
    assert all(layer.head_lengths() == [PROMPT] * 2 for layer in cache.layers)
    held = cache.memory_bytes()
    # the held queries are counted: SnapKV's last window of them, [1, 4 query
    # heads, 16, 16] float32 per layer, with the whole prompt's K/V
    for layer in cache.layers:
        assert tuple(layer._waiting.shape) == (1, 4, method.window, 16)
    assert held >= len(cache.layers) * (2 * 2 * PROMPT * 16 * 4 + 4 * method.window * 16 * 4)
    _, cache = _generate(tiny_model, method, ids, new=2)
    for layer in cache.layers:
        assert layer.head_lengths() == [32] * 2
        assert layer._waiting is None
    assert cache.memory_bytes() < held / 2


def test_left_padded_batch_matches_single_rows(tiny_model):
    a, b = _ids(PROMPT, seed=14), _ids(PROMPT - 20, seed=15)
    ids = torch.zeros(2, PROMPT, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = a[0], 1
    ids[1, 20:], mask[1, 20:] = b[0], 1
    method = kvc.SnapKV(budget=32, lookahead=True)
    both, _ = _generate(tiny_model, method, ids, mask=mask)
    for row, single in ((0, a), (1, b)):
        alone, _ = _generate(tiny_model, method, single)
        assert torch.equal(both[row], alone[0]), row


@pytest.mark.parametrize("bad, match", [
    (dict(lookahead=1), "lookahead: expected a bool"),
    (dict(lookahead="yes"), "lookahead: expected a bool"),
])
def test_bad_lookahead_is_refused_by_name(bad, match):
    with pytest.raises(TypeError, match=match):
        kvc.SnapKV(budget=32, **bad)


def test_methods_lookahead_cannot_change_are_refused():
    with pytest.raises(ValueError, match="lookahead: StreamingLLM does not read queries"):
        kvc.StreamingLLM(budget=32, lookahead=True)
    with pytest.raises(ValueError, match="lookahead: KIVI evicts nothing"):
        kvc.KIVI(bits=4, lookahead=True)


def test_describe_names_lookahead_only_when_set():
    assert "lookahead" not in kvc.SnapKV(budget=32).describe()
    assert "lookahead=True" in kvc.SnapKV(budget=32, lookahead=True).describe()
