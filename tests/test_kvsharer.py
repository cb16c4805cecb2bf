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
    with pytest.raises(TypeError, match="KVSharer does not compose"):
        kvc.SnapKV(ratio=0.5) + KVSharer(plan="3>1")
    with pytest.raises(TypeError, match="KVSharer does not compose"):
        KVSharer(plan="3>1") + kvc.KIVI(bits=4)
    with pytest.raises(ValueError):
        KVSharer(plan="3>1", quant=kvc.KIVI(bits=4))


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
