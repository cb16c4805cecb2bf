"""KVSharer: the sharing plan (parsing, rules), generate() against a
transformers reference in which the target layers read their sources'
caches, bytes counted once, the calibration search, and layers that are not
shared by rule (sliding windows)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvcompress as kvc
from kvcompress.cache import KVCache
from kvcompress.calibrate import calibrate_kvsharer, layer_representatives
from kvcompress.compat import cache_kwargs
from kvcompress.methods import KVSharer, method_from_spec
from test_quest import _batch, _generate


class ShareRef(DynamicCache):
    """transformers' own cache and attention, with each target layer handed
    its source layer's keys and values (what KVSharer means)."""

    def __init__(self, plan, **kw):
        super().__init__(**kw)
        self.plan = plan

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx in self.plan:
            src = self.layers[self.plan[layer_idx]]
            return src.keys, src.values
        return out


def _reference(model, ids, mask, plan, new=10, **kw):
    cache = ShareRef(plan, config=model.config)
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          pad_token_id=0, **kw, **cache_kwargs(model, cache))


def test_plan_parsing_and_rules():
    assert KVSharer(plan="3>1/2>0").pairs == {3: 1, 2: 0}
    assert KVSharer(plan={3: 1}).pairs == KVSharer(plan=((3, 1),)).pairs == {3: 1}
    assert KVSharer().pairs == {} and repr(KVSharer()) == "KVSharer(plan=none)"
    assert method_from_spec("kvsharer:plan=9>2/11>4").pairs == {9: 2, 11: 4}
    assert repr(KVSharer(plan="11>4/9>2")) == "KVSharer(plan=9>2/11>4)"
    assert "kvsharer" in kvc.methods.REGISTRY and kvc.KVSharer is KVSharer
    for bad, err in (("3>3", ValueError), ("1>2", ValueError), ("3>1/3>0", ValueError), ("3>1/1>0", ValueError),
                     ("3-1", ValueError), ({3: "1"}, TypeError), (5, TypeError)):
        with pytest.raises(err):
            KVSharer(plan=bad)
    with pytest.raises(ValueError, match="not both"):
        KVSharer(plan="3>1", calibration=[1, 2, 3])
    with pytest.raises(ValueError, match="shares whole layers"):
        KVSharer(budget=64)
    with pytest.raises(ValueError, match="sparse readers or MiniCache"):
        KVSharer(plan="3>1", sparse=kvc.Quest(token_budget=64))


def test_composition_rules():
    share = KVSharer(plan="3>1")
    snap = kvc.SnapKV(ratio=0.5) + share
    assert snap.depth is share and snap.sharing is share and snap.cross_layer is None
    assert snap.describe().startswith("SnapKV(ratio=0.5") and snap.describe().endswith(" + KVSharer(plan=3>1)")
    packed = share + kvc.KIVI(bits=4)
    assert packed.quant == kvc.KIVI(bits=4) and packed.packing == kvc.KIVI(bits=4).packing
    assert repr(packed) == f"KVSharer(plan=3>1) + {kvc.KIVI(bits=4).describe()}"
    three = snap + kvc.KIVI(bits=2)
    assert three.depth.quant == kvc.KIVI(bits=2) and three.packing == kvc.KIVI(bits=2).packing
    assert three.sharing.pairs == {3: 1}
    # the command line spells the same compositions
    assert method_from_spec("snapkv+kvsharer:plan=3>1", ratio=0.5) == snap
    assert method_from_spec("kvsharer:plan=3>1+kivi:bits=4") == packed
    assert method_from_spec("snapkv+kvsharer:plan=3>1+kivi:bits=2", ratio=0.5) == three
    for bad in (lambda: share + kvc.SnapKV(ratio=0.5), lambda: share + kvc.Quest(token_budget=64),
                lambda: kvc.KIVI(bits=4) + share, lambda: kvc.MiniCache() + share,
                lambda: snap + kvc.MiniCache(), lambda: snap + kvc.Quest(token_budget=64),
                lambda: (kvc.SnapKV(ratio=0.5) + kvc.MiniCache()) + share):
        with pytest.raises((TypeError, ValueError)):
            bad()
    with pytest.raises(ValueError, match="first"):
        (kvc.SnapKV(ratio=0.5) + kvc.KIVI(bits=4)) + share
    with pytest.raises(TypeError, match="quant"):
        KVSharer(plan="3>1", quant=kvc.LowBits(bits=2))
    with pytest.raises(TypeError, match="depth"):
        kvc.SnapKV(ratio=0.5, depth=kvc.KIVI(bits=4))


def test_empty_plan_is_plain_generate(tiny_model):
    ids, mask = _batch(31)
    assert torch.equal(_generate(tiny_model, ids, mask, KVSharer()), _generate(tiny_model, ids, mask))


@pytest.mark.parametrize("plan", [{1: 0, 3: 2}, {3: 0}], ids=["1>0/3>2", "3>0"])
def test_targets_read_their_sources_like_the_reference(tiny_model, plan):
    ids, mask = _batch(32)
    method = KVSharer(plan=plan)
    cache = KVCache(method, num_layers=4)
    out = _generate(tiny_model, ids, mask, method, cache)
    assert torch.equal(out, _reference(tiny_model, ids, mask, plan))
    assert [layer.store.kind for layer in cache.layers] == ["shared" if i in plan else "uniform" for i in range(4)]
    # the targets hold nothing: the bytes are the sources' (counted once), and the
    # full-cache comparison still counts every layer
    stats = cache.stats()
    assert stats.total_bytes == cache.memory_bytes()
    own = lambda layer: sum(t.untyped_storage().nbytes() for t in layer.store.tensors())  # noqa: E731
    # a target's own bytes are its padding record (kv_start) only
    assert all(stats.layers[t].bytes == cache.layers[t].kv_start.nbytes
               and stats.layers[t].full_bytes == stats.layers[s].full_bytes for t, s in plan.items())
    alone = KVCache(KVSharer(), num_layers=4)
    _generate(tiny_model, ids, mask, KVSharer(), alone)
    assert cache.memory_bytes() == alone.memory_bytes() - len(plan) * own(alone.layers[0])


def test_beam_search_with_shared_layers(tiny_model):
    ids, mask = _batch(33)
    plan = {2: 0}
    with kvc.compress(tiny_model, KVSharer(plan=plan)):
        out = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                  pad_token_id=0, num_beams=2)
    assert torch.equal(out, _reference(tiny_model, ids, mask, plan, new=6, num_beams=2))


def test_calibration_ranks_dissimilar_pairs_first(tiny_model):
    ids = torch.randint(5, 500, (2, 48), generator=torch.Generator().manual_seed(34))
    reps = layer_representatives(tiny_model, ids)
    dist = {(s, t): float((reps[s] - reps[t]).norm()) for s in range(4) for t in range(s + 1, 4)}
    first = max(dist, key=dist.get)
    # accepting everything: the most distant pair is taken first
    plan = calibrate_kvsharer(tiny_model, ids, 1, threshold=-1.0)
    assert plan.pairs == {first[1]: first[0]}
    two = calibrate_kvsharer(tiny_model, ids, 2, threshold=-1.0).pairs
    assert len(two) == 2 and two[first[1]] == first[0]
    assert not set(two) & set(two.values())  # no chains
    # an unreachable threshold shares nothing
    assert calibrate_kvsharer(tiny_model, ids, 2, threshold=1.1).pairs == {}
    # calibration= resolves the plan when the session starts
    with kvc.compress(tiny_model, KVSharer(calibration=ids, share=1, threshold=-1.0)) as session:
        assert session.method.pairs == plan.pairs and session.method.calibration is None
        tiny_model.generate(ids[:1], max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert [layer.store.kind for layer in session.cache.layers].count("shared") == 1
    with pytest.raises(ValueError, match="calibration"):
        calibrate_kvsharer(tiny_model, torch.zeros(2, 2, 2), 1)


def test_sliding_layers_keep_their_own_cache():
    """A Mistral whose every layer slides: by rule nothing is shared, so the
    plan changes nothing (and the calibration proposes nothing)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=32,
                           max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = MistralForCausalLM(config).eval()
    ids = torch.randint(3, 300, (1, 80), generator=torch.Generator().manual_seed(35))
    mask = torch.ones_like(ids)
    method = KVSharer(plan={1: 0})
    cache = KVCache(method, num_layers=4)
    assert torch.equal(_generate(model, ids, mask, method, cache), _generate(model, ids, mask))
    assert [layer.store.kind for layer in cache.layers] == ["uniform"] * 4
    assert calibrate_kvsharer(model, ids, 2, threshold=-1.0).pairs == {}


def test_eval_runs_a_sharing_plan(tiny_lm, tmp_path):
    import json

    from kvcompress import cli

    _, _, folder = tiny_lm
    out = tmp_path / "ks"
    args = ["eval", "--model", str(folder), "--methods", "kvsharer:plan=3>1/2>0,knorm", "--budgets", "24",
            "--tasks", "passkey", "--lengths", "60", "--depths", "0.5", "--no-progress", "--out", str(out)]
    assert cli.main(args) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    ks = [r for r in rows if r["method"].startswith("kvsharer")]
    assert len(ks) == 1 and ks[0]["cache_bytes"] < 0.6 * rows[0]["cache_bytes"]


def test_eval_calibrates_share_on_the_packaged_text_once(tiny_lm, tmp_path):
    import json

    from kvcompress import cli
    from kvcompress.calibrate import calibration_ids

    model, tok, folder = tiny_lm
    ids = calibration_ids(tok)
    prefix = kvc.tasks.special_prefix(tok)
    assert ids.shape == (2, 512) and all(row[: len(prefix)].tolist() == prefix for row in ids)
    assert not torch.equal(ids[0], ids[1])  # two windows from different places in the text
    plan = calibrate_kvsharer(model, ids, 1, threshold=-1.0).pairs
    out = tmp_path / "cal"
    args = ["eval", "--model", str(folder), "--methods", "kvsharer:share=1:threshold=-1,snapkv+kvsharer:share=1:threshold=-1",
            "--budgets", "24,32", "--tasks", "passkey", "--lengths", "60", "--depths", "0.5", "--no-progress",
            "--out", str(out)]
    assert cli.main(args) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    want = "KVSharer(plan=" + "/".join(f"{t}>{s}" for t, s in plan.items()) + ")"
    labels = [r["label"] for r in rows[1:]]
    assert len(labels) == 3 and all(label.endswith(want) for label in labels), labels
    # without calibration ids or a plan, share= is refused by name when a session starts
    with pytest.raises(ValueError, match="share: KVSharer\\(share=1\\) needs calibration="):
        kvc.compress(model, kvc.SnapKV(ratio=0.5) + KVSharer(share=1))
    with pytest.raises(ValueError, match="not both"):
        KVSharer(plan="3>1", share=2)
    with pytest.raises(ValueError, match="tokens"):
        calibration_ids(tok, tokens=0)


# ---------------------------------------------------------------- composition
@torch.no_grad()
def _manual_logits(model, ids, new_ids, plan, budget, sinks, interval):
    """Float64 greedy-decode logits of a Llama, written out layer by layer:
    every layer that keeps a cache keeps StreamingLLM's slots (``sinks`` first
    and the most recent ones, re-cut to ``budget`` once it holds ``budget +
    interval`` after a decode step, at once after the prefill), and a target
    of ``plan`` attends over its source's slots as the source attended over
    them (before the source is cut). Returns ``[steps, vocab]``: the logits
    that predicted each of ``new_ids`` (teacher-forced)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m = model.model
    L = len(m.layers)
    cache = [None] * L  # (keys, values) [Hkv, n, D] float64

    def cut(kv, after_prefill):
        k, v = kv
        n = k.shape[1]
        if n <= budget or (not after_prefill and n < budget + interval):
            return kv
        idx = torch.cat([torch.arange(sinks), torch.arange(n - (budget - sinks), n)])
        return k[:, idx], v[:, idx]

    def step(tokens, start):
        T = tokens.shape[0]
        h = m.embed_tokens(tokens[None]).double()
        pos = torch.arange(start, start + T)[None]
        cos, sin = m.rotary_emb(h, pos)
        pending = {}
        for li, layer in enumerate(m.layers):
            a = layer.self_attn
            D = a.head_dim
            x = layer.input_layernorm.double()(h)
            q = a.q_proj.double()(x).view(1, T, -1, D).transpose(1, 2)
            k = a.k_proj.double()(x).view(1, T, -1, D).transpose(1, 2)
            v = a.v_proj.double()(x).view(1, T, -1, D).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos.double(), sin.double())
            if li in plan:
                keys, values = pending[plan[li]]
            else:
                old = cache[li]
                keys = k[0] if old is None else torch.cat([old[0], k[0]], 1)
                values = v[0] if old is None else torch.cat([old[1], v[0]], 1)
                cache[li] = (keys, values)
                pending[li] = (keys, values)
            n = keys.shape[1]
            g = q.shape[1] // keys.shape[0]
            kk, vv = keys.repeat_interleave(g, 0), values.repeat_interleave(g, 0)
            logits = q[0] @ kk.transpose(1, 2) * a.scaling
            # causal within the chunk: the chunk's tokens are the last T slots
            mask = torch.ones(T, n, dtype=torch.bool).tril(n - T)
            att = logits.masked_fill(~mask, float("-inf")).softmax(-1) @ vv
            h = h + a.o_proj.double()(att.transpose(0, 1).reshape(1, T, -1))
            h = h + layer.mlp.double()(layer.post_attention_layernorm.double()(h))
            # a layer is cut after its own attention, a source after its last reader's
            for src in [s for s in range(li + 1) if s not in plan and cache[s] is not None]:
                readers = [t for t, s2 in plan.items() if s2 == src]
                if (max(readers) if readers else src) == li:
                    cache[src] = cut(cache[src], T > 1)
        return model.lm_head.double()(m.norm.double()(h))[0, -1]

    out = [step(ids, 0)]
    for i, tok in enumerate(new_ids[:-1]):
        out.append(step(tok[None], ids.shape[0] + i))
    model.float()
    return torch.stack(out)


@pytest.mark.parametrize("plan", [{3: 1}, {2: 0, 3: 1}], ids=["3>1", "2>0/3>1"])
def test_evictor_with_sharing_matches_a_float64_layer_by_layer_reference(tiny_model, plan):
    ids = torch.randint(5, 500, (1, 70), generator=torch.Generator().manual_seed(36))
    budget, sinks, interval, new = 24, 4, 4, 12
    method = kvc.StreamingLLM(budget=budget, sinks=sinks, interval=interval) + KVSharer(plan=plan)
    cache = KVCache(method, num_layers=4)
    with kvc.compress(tiny_model, method):
        out = tiny_model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                                  output_logits=True, return_dict_in_generate=True,
                                  **cache_kwargs(tiny_model, cache))
    got = torch.cat(out.logits).double()
    ref = _manual_logits(tiny_model, ids[0], out.sequences[0, ids.shape[1]:], plan, budget, sinks, interval)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert [layer.store.kind for layer in cache.layers] == ["shared" if i in plan else "uniform" for i in range(4)]
    # every layer that keeps a cache keeps the evictor's budget; targets hold nothing of their own
    assert all(cache.layers[i].n <= budget + interval for i in range(4) if i not in plan)
    alone = KVCache(kvc.StreamingLLM(budget=budget, sinks=sinks, interval=interval), num_layers=4)
    _generate(tiny_model, ids, torch.ones_like(ids), alone.method, alone, new=new)
    own = lambda layer: sum(t.untyped_storage().nbytes() for t in layer.store.tensors())  # noqa: E731
    assert cache.memory_bytes() == alone.memory_bytes() - sum(own(alone.layers[t]) for t in plan)


def test_evictor_with_sharing_keeps_the_evictors_slots_before_the_first_target(tiny_model):
    """Layers before the first target see the same hidden states as with the
    evictor alone, so they (the sources included) keep the same slots; the
    prefill reads whole chunks, so the first token's logits are plain
    KVSharer's; an empty plan is the evictor alone, padded batches included."""
    ids, mask = _batch(37)
    plan = {3: 1}
    snap = kvc.SnapKV(budget=40, window=8)
    both = KVCache(snap + KVSharer(plan=plan), num_layers=4)
    alone = KVCache(snap, num_layers=4)
    kw = dict(attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    outs = []
    for method, cache in ((snap + KVSharer(plan=plan), both), (snap, alone), (KVSharer(plan=plan), None)):
        with kvc.compress(tiny_model, method):
            extra = {} if cache is None else cache_kwargs(tiny_model, cache)
            outs.append(tiny_model.generate(ids, **kw, **extra).logits[0])
    assert torch.equal(outs[0], outs[2]) and not torch.equal(outs[0], outs[1])
    for i in (0, 1, 2):
        assert torch.equal(both.layers[i].store.keys, alone.layers[i].store.keys)
        assert torch.equal(both.layers[i].store.values, alone.layers[i].store.values)
    assert both.layers[3].store.kind == "shared" and both.layers[3].store.source is both.layers[1]
    assert torch.equal(_generate(tiny_model, ids, mask, snap + KVSharer()), _generate(tiny_model, ids, mask, snap))
    # per-head evictors (ragged sources) compose the same way
    ada = kvc.AdaKV(budget=40, window=8) + KVSharer(plan=plan)
    cache = KVCache(ada, num_layers=4)
    _generate(tiny_model, ids, mask, ada, cache)
    assert cache.layers[3].store.kind == "shared" and cache.layers[1].store.kind == "ragged"


def test_quantized_sharing_packs_sources_after_their_readers(tiny_model):
    ids, mask = _batch(38)
    plan = {2: 0, 3: 1}
    kivi = kvc.KIVI(bits=4, group=16, residual=16)
    method = KVSharer(plan=plan) + kivi
    cache, alone = KVCache(method, num_layers=4), KVCache(kivi, num_layers=4)
    out = _generate(tiny_model, ids, mask, method, cache)
    _generate(tiny_model, ids, mask, kivi, alone)
    assert [layer.store.kind for layer in cache.layers] == ["packed", "packed", "shared", "shared"]
    own = lambda layer: sum(t.untyped_storage().nbytes() for t in layer.store.tensors())  # noqa: E731
    assert cache.memory_bytes() == alone.memory_bytes() - own(alone.layers[2]) - own(alone.layers[3])
    # the prefill reads the sources before they are packed: the first token is plain KVSharer's
    plain = _generate(tiny_model, ids, mask, KVSharer(plan=plan), new=1)
    assert torch.equal(out[:, : plain.shape[1]], plain)
    # evictor + KVSharer + quantizer
    three = kvc.SnapKV(budget=48, window=8) + KVSharer(plan=plan) + kivi
    cache = KVCache(three, num_layers=4)
    _generate(tiny_model, ids, mask, three, cache)
    assert [layer.store.kind for layer in cache.layers] == ["packed", "packed", "shared", "shared"]
    assert all(layer.n <= 48 + 16 for layer in cache.layers)


def test_composed_sharing_refuses_plans_and_attention_it_cannot_serve(tiny_model):
    ids = torch.randint(5, 500, (1, 40), generator=torch.Generator().manual_seed(39))
    method = kvc.StreamingLLM(budget=16) + KVSharer(plan="7>1")
    with pytest.raises(ValueError, match="plan: layers \\[7\\] do not exist"):
        _generate(tiny_model, ids, torch.ones_like(ids), method, KVCache(method, num_layers=4), new=2)
    # without the "kvcompress" attention a source cannot wait for its readers
    method = kvc.StreamingLLM(budget=16) + KVSharer(plan="3>1")
    cache = KVCache(method, num_layers=4)
    with pytest.raises(kvc.KVCompressError, match="compresses the layers other layers read"):
        tiny_model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0,
                            **cache_kwargs(tiny_model, cache))


def test_composed_calibration_resolves_inside_the_session(tiny_model):
    ids = torch.randint(5, 500, (2, 48), generator=torch.Generator().manual_seed(34))
    plan = calibrate_kvsharer(tiny_model, ids, 1, threshold=-1.0).pairs
    method = kvc.SnapKV(ratio=0.5, window=8) + KVSharer(calibration=ids, share=1, threshold=-1.0)
    with kvc.compress(tiny_model, method) as session:
        assert session.method.sharing.pairs == plan and session.method.depth.calibration is None
        assert isinstance(session.method, kvc.SnapKV) and session.method.ratio == 0.5
