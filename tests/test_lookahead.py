"""``lookahead=True``: a layer is first compressed after the first decode
step's attention, with that step's query as the newest of the prompt's.

The independent reference is a run without lookahead on the prompt extended
by the first generated token: its prefill ends at the same token whose query
the lookahead run observes, so both compress the same slots with the same
queries and must generate the same tokens from there on."""

import dataclasses

import pytest
import torch

import kvcompress as kvc
from kvcompress.methods import method_from_spec

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


@pytest.mark.parametrize("spec", ["snapkv", "tova", "h2o", "ems", "ems:gqa=max", "ems:global_mode=probe", "adakv",
                                  "pyramidkv", "taskkv", "kvcrush"])
def test_lookahead_equals_compressing_a_prompt_one_token_longer(tiny_model, spec):
    ids = _ids(PROMPT, seed=11)
    plain = method_from_spec(spec, budget=32)
    ahead, _ = _generate(tiny_model, dataclasses.replace(plain, lookahead=True), ids)
    # the first generated token comes from the whole prompt either way
    plain_first, _ = _generate(tiny_model, plain, ids, new=1)
    assert ahead[0, 0] == plain_first[0, 0]
    longer = torch.cat([ids, ahead[:, :1]], 1)
    ref, _ = _generate(tiny_model, plain, longer, new=NEW - 1)
    assert torch.equal(ahead[:, 1:], ref), (spec, ahead.tolist(), ref.tolist())


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


@pytest.mark.parametrize("method, seeds", [
    (kvc.SnapKV(budget=32, lookahead=True), (14, 15)),
    # lookahead_room: both rows (96 and 76 tokens) are compressed at prefill to 64
    (kvc.EMS(budget=32, lookahead=True, lookahead_room=2), (23, 24)),
])
def test_left_padded_batch_matches_single_rows(tiny_model, method, seeds):
    a, b = _ids(PROMPT, seed=seeds[0]), _ids(PROMPT - 20, seed=seeds[1])
    ids = torch.zeros(2, PROMPT, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = a[0], 1
    ids[1, 20:], mask[1, 20:] = b[0], 1
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


@pytest.mark.parametrize("gqa", ["mean", "max"])
def test_ems_statistic_over_chunks_is_the_global_score_over_all_queries(gqa):
    # EMS holds only its window while waiting: the sums it gathers chunk by
    # chunk (two prefill chunks, then one decode query) must give the global
    # score of every query, here checked against a float64 recomputation
    from kvcompress.methods.base import LayerView

    g = torch.Generator().manual_seed(16)
    B, Hq, Hkv, T, D = 2, 4, 2, 65, 8
    q = torch.randn(B, Hq, T, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g)
    start = torch.tensor([0, 9])
    ems = kvc.EMS(budget=32, lookahead=True, gqa=gqa)
    stat = None
    for a, b in ((0, 40), (40, 64), (64, 65)):
        view = LayerView(layer_idx=0, num_layers=1, queries=q[:, :, a:b], keys=k[:, :, :b], values=k[:, :, :b],
                         kv_start=start, scaling=D ** -0.5, state={}, phase="prefill")
        stat = ems.lookahead_statistic(view, stat)
    got = stat[:, :-1] / stat[:, -1:]
    if gqa == "max":
        got = got.view(B, Hkv, Hq // Hkv, T).amax(2)
    # float64 reference: causal softmax per query head, reduced over the GQA group, mean over the queries seeing j
    logits = torch.einsum("bhid,bhjd->bhij", q.double(), k.double().repeat_interleave(Hq // Hkv, 1)) * D ** -0.5
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    ok = (j <= i)[None, None] & (j >= start[:, None, None, None])
    A = torch.softmax(logits.masked_fill(~ok, float("-inf")), -1).nan_to_num(0.0)
    # per query head the mean over the queries seeing j, then the group's mean or largest
    want = (A.sum(2) / (T - torch.arange(T)).double()).view(B, Hkv, Hq // Hkv, T)
    want = want.mean(2) if gqa == "mean" else want.amax(2)
    want[..., :] = torch.where(torch.arange(T)[None, None] >= start[:, None, None], want, 0.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    assert ems.deferred_queries() == ems.window
    assert kvc.EMS(budget=32, lookahead=True, global_mode="probe").deferred_queries() is None


def _two_turns(model, method, first, more, new=(5, 5)):
    """Generate ``new[0]`` tokens after ``first``, then ``new[1]`` after
    that plus ``more``, in one cache; returns the cache."""
    with kvc.compress(model, method) as session, torch.inference_mode():
        out = model.generate(input_ids=first, attention_mask=torch.ones_like(first), max_new_tokens=new[0],
                             min_new_tokens=new[0], do_sample=False, pad_token_id=0)
        second = torch.cat([out, more], 1)
        model.generate(input_ids=second, attention_mask=torch.ones_like(second), past_key_values=session.cache,
                       max_new_tokens=new[1], min_new_tokens=new[1], do_sample=False, pad_token_id=0)
    return session.cache


@pytest.mark.parametrize("look", [False, True])
def test_ems_second_turn_after_an_uncompressed_first_turn(tiny_model, look):
    # the first turn fits the budget, so nothing was compressed and the
    # second turn's chunk brings no queries for the earlier slots: EMS
    # scores with the chunk's (it used to refuse with a ValueError)
    cache = _two_turns(tiny_model, kvc.EMS(budget=64, lookahead=look), _ids(40, seed=17), _ids(100, seed=18))
    for layer in cache.layers:
        heads = layer.head_lengths()
        assert sum(heads) <= 2 * (64 + 16) and sum(heads) >= 2 * 64 - 2, heads


@pytest.mark.parametrize("spec", ["snapkv+kivi", "ems+kivi:bits=8", "snapkv+quest:token_budget=32:page=8"])
def test_lookahead_composes_with_packing_and_readers(tiny_model, spec):
    # the composed store takes over at the first decode step: generation
    # equals the same composition on the prompt one token longer
    ids = _ids(PROMPT, seed=19)
    plain = method_from_spec(spec, budget=32)
    ahead, cache = _generate(tiny_model, dataclasses.replace(plain, lookahead=True), ids)
    ref, ref_cache = _generate(tiny_model, plain, torch.cat([ids, ahead[:, :1]], 1), new=NEW - 1)
    assert torch.equal(ahead[:, 1:], ref), spec
    assert [type(layer.store) for layer in cache.layers] == [type(layer.store) for layer in ref_cache.layers]


# ------------------------------------------------------------ lookahead_room
def _kept(layer):
    """Per head, the sorted prompt positions a per-head layer holds."""
    keys, values, pos, counts, carried, start = layer.store.to_padded()
    lengths = layer.head_lengths()
    return [sorted(int(p) for p in pos[i, pos.shape[1] - n:]) for i, n in enumerate(lengths)]


def test_room_compresses_the_prefill_as_the_method_would_at_room_times_the_budget(tiny_model):
    # until the first decode step a layer holds what EMS without lookahead
    # keeps at twice the budget (the same prefill rules and statistic), so
    # the wait holds 2x the budget, not the prompt
    ids = _ids(PROMPT, seed=20)
    _, room = _generate(tiny_model, kvc.EMS(budget=32, lookahead=True, lookahead_room=2), ids, new=1)
    _, ref = _generate(tiny_model, kvc.EMS(budget=64), ids, new=1)
    for a, b in zip(room.layers, ref.layers):
        assert sum(a.head_lengths()) == 2 * 64
        assert _kept(a) == _kept(b)
        assert a._room_pending and a._waiting is None and a._statistic is None
    # the bytes of EMS at 64 (its per-head buffers and held queries), nothing kept for the wait
    assert room.memory_bytes() == ref.memory_bytes()


def test_room_brings_every_head_to_the_target_at_the_first_decode_step(tiny_model):
    ids = _ids(PROMPT, seed=21)
    for method in (kvc.EMS(budget=32, lookahead=True, lookahead_room=2),
                   kvc.EMS(ratio=0.75, lookahead=True, lookahead_room=1.5),
                   kvc.EMS(budget=32, lookahead=True, lookahead_room=2, gqa="max"),
                   kvc.EMS(budget=32, lookahead=True, lookahead_room=2, global_mode="probe"),
                   kvc.EMS(budget=32, lookahead=True, lookahead_room=2, head_budget="uniform", local_heads="own")):
        _, cache = _generate(tiny_model, method, ids, new=2)
        for layer in cache.layers:
            target = layer._targets()[0]
            assert sum(layer.head_lengths()) == 2 * target, (method, layer.head_lengths(), target)
            assert not layer._room_pending
        # and decoding goes on within the usual slack
        _, cache = _generate(tiny_model, method, ids, new=NEW)
        for layer in cache.layers:
            assert sum(layer.head_lengths()) <= 2 * (layer._targets()[0] + method.interval)


def test_a_prompt_that_fits_the_room_waits_whole_as_with_lookahead_alone(tiny_model):
    ids = _ids(PROMPT, seed=22)
    room, _ = _generate(tiny_model, kvc.EMS(budget=32, lookahead=True, lookahead_room=3), ids)  # 96 <= 3 * 32
    whole, _ = _generate(tiny_model, kvc.EMS(budget=32, lookahead=True), ids)
    assert torch.equal(room, whole)


@pytest.mark.parametrize("seeds", [(13, 53), (23, 24)])
def test_a_row_that_fits_its_room_beside_one_that_does_not_matches_single_rows(tiny_model, seeds):
    """Ratio 0.5 and a room of 2: the 96-token row fits its room (96) and
    waits whole, the 75-token one (room 74) is compressed into its room at
    the prompt and makes the layers per-head. The waiting row is then
    compressed at the first decode step as alone, with every held query and
    the lookahead statistic (it was re-merged head by head with the step's
    query alone, and its merged keys differed), so both rows generate what
    they generate alone."""
    method = kvc.EMS(ratio=0.5, lookahead=True, lookahead_room=2)
    a, b = _ids(PROMPT, seed=seeds[0]), _ids(75, seed=seeds[1])
    ids = torch.zeros(2, PROMPT, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = a[0], 1
    ids[1, PROMPT - 75 :], mask[1, PROMPT - 75 :] = b[0], 1
    both, cache = _generate(tiny_model, method, ids, mask=mask)
    assert all(layer.ragged is not None and getattr(layer, "_room_whole", None) is None for layer in cache.layers)
    for row, single in ((0, a), (1, b)):
        alone, _ = _generate(tiny_model, method, single)
        assert torch.equal(both[row], alone[0]), row


def test_room_second_turn(tiny_model):
    # a later turn's chunk waits on the per-head layer and the next decode
    # step re-compresses it with that step's query
    cache = _two_turns(tiny_model, kvc.EMS(budget=32, lookahead=True, lookahead_room=2), _ids(PROMPT, seed=25),
                       _ids(60, seed=26), new=(5, 2))
    for layer in cache.layers:
        assert sum(layer.head_lengths()) == 2 * 32
        assert layer._waiting is None and not layer._room_pending


@pytest.mark.parametrize("heads", ["layer", "own"])
def test_recompact_forces_the_tokens_the_newest_query_reads(heads):
    # two heads holding different tokens; head 0's newest query reads token
    # 20 (slot 20 there, slot 15 in head 1, which skips tokens 10-14), whose
    # carried score is the lowest. With local picks head 0 keeps it, and so
    # does head 1 when the layer's reading is shared; without, neither does.
    g = torch.Generator().manual_seed(27)
    M, D, p = 40, 8, 20
    ems = kvc.EMS(budget=12, window=4, sinks=2, tau=float("inf"), local_kernel=1, local_heads=heads,
                  lookahead=True, lookahead_room=2)
    tokens = torch.stack([torch.arange(M), torch.arange(M) + 5 * (torch.arange(M) >= 10)])
    keys = 0.1 * torch.randn(2, 1, M, D, generator=g)
    slot = {0: p, 1: p - 5}
    for h, s in slot.items():
        keys[h, 0, s] = 0.0
        keys[h, 0, s, 0] = 3.0
    queries = 0.1 * torch.randn(2, 1, 1, D, generator=g)
    queries[0, 0, 0] = 0.0
    queries[0, 0, 0, 0] = 20.0
    carried = 0.01 + 0.05 * torch.rand(2, M, generator=g)
    carried[:, 2:14] = 0.5
    for h, s in slot.items():
        carried[h, s] = 1e-4
    counts = torch.ones(2, M)
    start = torch.zeros(2, dtype=torch.int64)
    budgets = torch.full((2, 1), 12, dtype=torch.int64)
    args = (queries, keys, keys.clone(), counts, carried, start, budgets, D ** -0.5)
    with_local, _, _ = ems.recompact(*args, local=(tokens, 2))
    without, _, _ = ems.recompact(*args)
    assert p in with_local[0, 0].tolist()
    assert (slot[1] in with_local[1, 0].tolist()) == (heads == "layer")
    assert p not in without[0, 0].tolist() and slot[1] not in without[1, 0].tolist()
    # sinks, window and budget as usual
    for c in with_local[:, 0]:
        assert len(c.tolist()) == 12 and {0, 1, M - 4, M - 3, M - 2, M - 1} <= set(c.tolist())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(lookahead_room=2), ValueError, "lookahead_room: .*give lookahead=True"),
    (dict(lookahead=True, lookahead_room=1), ValueError, "lookahead_room: must be > 1"),
    (dict(lookahead=True, lookahead_room=True), TypeError, "lookahead_room: expected a finite number"),
    (dict(lookahead=True, lookahead_room=float("inf")), TypeError, "lookahead_room: expected a finite number"),
    (dict(lookahead=True, lookahead_room=2, interval=0), ValueError, "lookahead_room: needs interval > 0"),
])
def test_bad_room_is_refused_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        kvc.EMS(budget=32, **kwargs)


def test_room_is_refused_where_it_cannot_work():
    with pytest.raises(ValueError, match="lookahead_room: SnapKV cannot re-score"):
        kvc.SnapKV(budget=32, lookahead=True, lookahead_room=2)
    with pytest.raises(ValueError, match="lookahead_room: not supported with KIVI"):
        kvc.EMS(budget=32, lookahead=True, lookahead_room=2, quant=kvc.KIVI(bits=4))
    assert "lookahead_room=2" in kvc.EMS(budget=32, lookahead=True, lookahead_room=2).describe()
