"""Every method keeps the budget the user gave while decoding, whatever the
prompt's length (a short prompt is kept whole and grows up to the budget),
and the slots it keeps are the ones its rule picks."""

import resource

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import kvcompress as kvc
from kvcompress.cache import CompressedLayer
from kvcompress.methods import EVICTING, REGISTRY
from kvcompress.stores import PackedStore

BUDGET, INTERVAL = 128, 16


def _ids(length, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (batch, length), generator=g)


class Record(LogitsProcessor):
    """Slots held per (layer, row, head) and tokens seen after every forward."""

    def __init__(self):
        self.session = None
        self.steps = []

    def __call__(self, input_ids, scores):
        cache = self.session.cache
        self.steps.append((cache.get_seq_length(), [layer.head_lengths() for layer in cache.layers],
                           cache.memory_bytes()))
        return scores


def _run(model, method, ids, new_tokens):
    rec = Record()
    with kvc.compress(model, method) as session:
        rec.session = session
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                       logits_processor=LogitsProcessorList([rec]))
    return session.cache, rec.steps


@pytest.mark.parametrize("length", [10, 100, 1000])
@pytest.mark.parametrize("name", sorted(EVICTING))
def test_slots_stay_within_the_budget_whatever_the_prompt(tiny_model, name, length):
    method = REGISTRY[name](budget=BUDGET, interval=INTERVAL)
    _check_budget(tiny_model, method, length)


# every evictor but SCOPE composes with a quantizer (SCOPE refuses it by name)
PACKABLE = sorted(set(EVICTING) - {"scope"})


@pytest.mark.parametrize("length", [100, 1000])
@pytest.mark.parametrize("name", PACKABLE)
def test_packed_compositions_keep_the_budget_too(tiny_model, name, length):
    # evictor + KIVI: the kept slots are packed, and decoding re-selects
    # them as without the quantizer (a residual of 32 so that packing runs)
    method = REGISTRY[name](budget=BUDGET, interval=INTERVAL) + kvc.KIVI(bits=4, group=32, residual=32)
    cache = _check_budget(tiny_model, method, length)
    packed = [layer.store for layer in cache.layers]
    # every layer packs all but its newest residual .. residual + group - 1
    # slots (PyramidKV's deepest layers keep fewer than that)
    assert all(isinstance(s, PackedStore) and s.r < s.residual + s.group for s in packed), packed
    assert min(packed[0].head_lengths()) > packed[0].r, packed[0]


@pytest.mark.parametrize("name", PACKABLE)
def test_packed_compositions_with_sinks_keep_the_budget_too(tiny_model, name):
    # the block counts among the slots held: each round reads it back in place and takes it again
    method = REGISTRY[name](budget=BUDGET, interval=INTERVAL) + kvc.KIVI(bits=4, group=32, residual=32, sinks=4)
    cache = _check_budget(tiny_model, method, 1000)
    stores = [layer.store for layer in cache.layers]
    # a layer that packs holds the whole block, merged sinks included (with their counts); PyramidKV's
    # deepest layers keep too few slots to pack
    for s in stores:
        assert isinstance(s, PackedStore), s
        assert s.n_sinks == (4 if s.packed_any() else 0), s
    assert sum(s.n_sinks > 0 for s in stores) >= len(stores) // 2, stores


def _check_budget(tiny_model, method, length):
    """Generate after a prompt of ``length`` tokens and check, after every
    step, that each layer holds its method's targets (plus at most
    ``INTERVAL - 1`` slots per head since the last round); returns the cache."""
    name = method.describe()
    new = 300 if length < 1000 else 150
    cache, steps = _run(tiny_model, method, _ids(length, seed=length), new)
    session_method = cache.method  # with what prepare() added (HeadKV's profile)
    H = tiny_model.config.num_key_value_heads
    for seen, layers, _ in steps:
        if method.across_layers and seen > BUDGET:
            # heads share the model's budget (HeadKV): at the first compression
            # (the prompt, or BUDGET + INTERVAL tokens) layer l holds its heads'
            # counts, or every token where they do not fit, and keeps that
            # (plus at most interval - 1 per head since the last round)
            first = length if length > BUDGET else BUDGET + INTERVAL
            if seen < first:
                continue
            for li, heads in enumerate(layers):
                want = min(H * first, int(session_method.head_counts(li, BUDGET, method.window).sum()))
                assert want <= sum(heads) < want + H * INTERVAL, (name, seen, li, heads, want)
                assert all(n <= seen for n in heads)
            continue
        if method.whole_heads and seen > BUDGET:
            # some heads keep every token (RazorAttention's retrieval heads):
            # the others hold target plus at most interval - 1 since the last
            # round; a whole head keeps its share of the target, which
            # budget= fixes at its prefill length (a prompt over the budget;
            # a prompt that fits gives every head the budget), and grows past
            # it by at most interval - 1 before it is re-merged
            whole = session_method.retrieval_heads()
            for li, heads in enumerate(layers):
                target = min(seen, method.phase_target(li, len(layers), min(seen, length), max(0, seen - length)))
                assert len(heads) == H and all(n <= seen for n in heads), (name, seen, li, heads)
                for h, n in enumerate(heads):
                    share = length if (whole[li, h] and length > BUDGET) else target
                    assert min(seen, share) <= n < max(share, target) + INTERVAL, (name, seen, li, h, heads, share)
            continue
        if method.defers_prefill and length > BUDGET:
            # per-layer budgets decided after the prefill (DynamicKV,
            # SqueezeAttention): the layers share L * budget, and each keeps
            # its own plus at most interval - 1 since the last round
            first = steps[0][1]
            assert sum(heads[0] for heads in first) == len(first) * BUDGET, (name, first)
            for li, heads in enumerate(layers):
                t = first[li][0]
                assert all(t <= n < t + INTERVAL for n in heads), (name, seen, li, heads, t)
            continue
        for li, heads in enumerate(layers):
            target = min(seen, method.phase_target(li, len(layers), min(seen, length), max(0, seen - length)))
            if seen <= BUDGET:
                # nothing is evicted before the budget is reached
                assert heads == [seen] * H, (name, length, seen, li, heads)
            elif method.headwise:
                # heads share the layer's budget: the layer holds H * target
                # slots plus at most interval - 1 per head since the last round
                assert H * target <= sum(heads) < H * (target + INTERVAL), (name, seen, li, heads)
            else:
                assert all(target <= n < target + INTERVAL for n in heads), (name, seen, li, heads, target)
    assert steps[-1][0] == length + new - 1
    return cache


@pytest.mark.parametrize("name", ["snapkv", "streamingllm", "h2o", "ems"])
def test_ratio_during_decoding_keeps_its_share_of_every_token(tiny_model, name):
    _check_ratio_share(tiny_model, REGISTRY[name](ratio=0.5, interval=INTERVAL))


@pytest.mark.parametrize("name", ["ems", "snapkv"])
def test_packed_ratio_during_decoding_keeps_its_share_of_every_token(tiny_model, name):
    # evictor(ratio=) + KIVI: a packed layer keeps its evictor's growing
    # target while decoding as an unpacked one does (a per-head packed
    # layer used to fail at its first check: it moved the budgets to the
    # device of a tensor the packed store does not have)
    method = REGISTRY[name](ratio=0.5, interval=INTERVAL) + kvc.KIVI(bits=4, group=32, residual=32)
    cache = _check_ratio_share(tiny_model, method)
    assert all(isinstance(layer.store, PackedStore) for layer in cache.layers), cache.layers


def _check_ratio_share(tiny_model, method):
    """Generate 200 tokens after 100 under ``method`` (``ratio=0.5``) and
    check after every step that each layer holds half the tokens seen plus
    at most one interval; returns the cache."""
    cache, steps = _run(tiny_model, method, _ids(100, seed=3), 200)
    H = tiny_model.config.num_key_value_heads
    for seen, layers, _ in steps:
        target = int(seen * 0.5)
        for heads in layers:
            if method.headwise:
                assert H * target <= sum(heads) < H * (target + INTERVAL) + H, (seen, heads)
            else:
                assert all(target <= n < target + INTERVAL + 1 for n in heads), (seen, heads, target)
    return cache


@pytest.mark.parametrize("name", ["snapkv", "tova", "streamingllm"])
def test_ratio_buffers_hold_the_target_plus_one_interval(tiny_model, name):
    # a ratio's target grows with the tokens seen; the buffers must still
    # hold no more than the next round's target plus the slots appended
    # before it (they used to grow by 32 slots at the first decode step)
    ratio, length = 0.9, 400
    method = REGISTRY[name](ratio=ratio, interval=INTERVAL)
    caps = []

    class Caps(Record):
        def __call__(self, input_ids, scores):
            caps.append([layer.capacity for layer in self.session.cache.layers])
            return super().__call__(input_ids, scores)

    rec = Caps()
    with kvc.compress(tiny_model, method) as session:
        rec.session = session
        ids = _ids(length, seed=8)
        tiny_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=60,
                            min_new_tokens=60, do_sample=False, pad_token_id=0,
                            logits_processor=LogitsProcessorList([rec]))
    for (seen, layers, _), cap in zip(rec.steps, caps):
        bound = int((seen + INTERVAL) * (1 - ratio)) + INTERVAL
        for heads, c in zip(layers, cap):
            assert max(heads) <= c <= bound, (seen, heads, c, bound)


@pytest.fixture
def layer0_trace(monkeypatch):
    """Layer 0's attention calls: float64 queries, keys, token positions
    before the call, and positions kept after it."""
    trace = []
    original = CompressedLayer.attend

    def spy(self, query, spec):
        if self.layer_idx == 0:
            trace.append(dict(q=query.double().clone(), k=self.store.keys.double().clone(),
                              pos=self.positions[0].clone(), scaling=spec.scaling, layer=self))
        return original(self, query, spec)

    monkeypatch.setattr(CompressedLayer, "attend", spy)
    return trace


def test_streamingllm_keeps_sinks_and_the_most_recent(tiny_model, layer0_trace):
    method = kvc.StreamingLLM(budget=BUDGET, interval=INTERVAL)
    cache, _ = _run(tiny_model, method, _ids(40, seed=4), 300)
    rounds = 0
    for step, nxt in zip(layer0_trace, layer0_trace[1:]):
        kept = nxt["pos"][:, :-1]  # the next call's slots minus its new token
        held = step["pos"]
        if kept.shape[1] < held.shape[1]:
            rounds += 1
            n = kept.shape[1]
            want = torch.cat([held[:, :4], held[:, -(n - 4):]], 1)
            assert torch.equal(kept, want)
    assert rounds >= 8
    final = cache.layers[0].positions[0, 0].tolist()
    seen = cache.get_seq_length()
    assert final[:4] == [0, 1, 2, 3] and final[4:] == list(range(seen - len(final) + 4, seen))


def test_h2o_keeps_the_heavy_hitters_of_a_float64_recomputation(tiny_model, layer0_trace):
    """H2O's accumulated attention recomputed in float64 from the queries and
    held keys of every step; at every re-compression the kept slots are the
    recent half plus the top of that accumulation."""
    from model_refs import accumulate_h2o, assert_h2o_kept

    method = kvc.H2O(budget=64, interval=8)
    _run(tiny_model, method, _ids(30, seed=5), 120)
    H = tiny_model.config.num_key_value_heads
    acc = [dict() for _ in range(H)]
    rounds = 0
    for step, nxt in zip(layer0_trace, layer0_trace[1:]):
        pos = step["pos"]
        accumulate_h2o(acc, step["q"][0], step["k"][0], pos, step["scaling"])
        kept = nxt["pos"][:, :-1]
        if kept.shape[1] < pos.shape[1]:
            rounds += 1
            for h in range(H):
                assert_h2o_kept(acc[h], pos[h].tolist(), kept[h].tolist())
    assert rounds >= 5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["streamingllm", "snapkv", "ems"])
def test_long_generation_from_a_short_prompt_stays_flat(tiny_model, name):
    method = REGISTRY[name](budget=BUDGET, interval=INTERVAL)
    rss = []

    class Rss(Record):
        def __call__(self, input_ids, scores):
            rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            return super().__call__(input_ids, scores)

    rec = Rss()
    with kvc.compress(tiny_model, method) as session:
        rec.session = session
        tiny_model.generate(input_ids=_ids(19, seed=6), attention_mask=torch.ones(1, 19, dtype=torch.long),
                            max_new_tokens=2000, min_new_tokens=2000, do_sample=False, pad_token_id=0,
                            logits_processor=LogitsProcessorList([rec]))
    bytes_ = [b for _, _, b in rec.steps]
    assert max(bytes_[250:]) == max(bytes_[250:400])  # no growth after the first rounds
    assert rss[-1] - rss[250] < 8 * 1024  # peak RSS (KiB) grows by less than 8 MiB over 1,750 tokens
    cfg = tiny_model.config
    slot = 2 * cfg.head_dim * 4  # fp32 key + value
    for layer in session.cache.layers:
        heads = layer.head_lengths()
        assert all(n < BUDGET + INTERVAL for n in heads) and sum(heads) >= BUDGET * len(heads)
        kv = sum(t.untyped_storage().nbytes() for t in layer.store.tensors()[:2])
        assert kv <= (BUDGET + INTERVAL) * len(heads) * slot
