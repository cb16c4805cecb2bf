"""``memory_bytes()`` counts every tensor a cache keeps alive, checked by an
independent walk of the cache's objects; ``stats()`` adds up to it; a reset
cache holds nothing.

The walk follows attributes, dicts, lists and tuples from the cache (never
into an ``nn.Module``) and collects the storage of every tensor it meets;
what it finds and what the cache counts must be the same storages.
"""

import types

import pytest
import torch

import kvcompress as kvc
from kvcompress.cache import _storage_bytes
from generation import greedy, left_pad, random_ids

_LEAVES = (torch.nn.Module, type, types.ModuleType, types.FunctionType, types.MethodType, str, bytes, int, float,
           bool, complex)


def held_storages(root) -> dict:
    """data_ptr -> (path, bytes) of every non-empty tensor storage reachable from ``root``."""
    seen, found, todo = set(), {}, [(root, "cache")]
    while todo:
        obj, path = todo.pop()
        if obj is None or id(obj) in seen or isinstance(obj, _LEAVES):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.nbytes():
                found.setdefault(storage.data_ptr(), (path, storage.nbytes()))
        elif isinstance(obj, dict):
            todo += [(v, f"{path}[{k!r}]") for k, v in obj.items()]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo += [(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        elif hasattr(obj, "__dict__"):
            todo += [(v, f"{path}.{k}") for k, v in vars(obj).items()]
    return found


def counted_storages(cache) -> set:
    return {_storage_bytes(t)[0] for layer in cache.layers for t in layer.tensors() if t is not None} - {0}


METHODS = {
    "adakv": lambda: kvc.AdaKV(budget=48),
    "ems+kivi": lambda: kvc.EMS(budget=48) + kvc.KIVI(bits=2, group=8, residual=16),
    "quest": lambda: kvc.Quest(token_budget=48, page=8, dense_layers=1),
    "tidal": lambda: kvc.TidalDecode(token_budget=48, selection_layers=(1,)),
    "magicpig": lambda: kvc.MagicPIG(dense_layers=1, window=16, L=10),
    "minicache": lambda: kvc.MiniCache(start_layer=2),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_tensor_held_is_counted_and_a_reset_cache_holds_none(tiny_model, name):
    """A left-padded batch after 12 decode steps: the walk and the cache's
    count agree storage for storage (host mirrors of lengths and budgets,
    the readers' last reads and MiniCache's retained counts used to be held
    uncounted), ``stats()`` totals ``memory_bytes()``, and after
    ``reset()`` nothing is held (the per-head budgets' host copy outlived
    it)."""
    ids, mask = left_pad([random_ids(160, 31), random_ids(110, 32)])
    _, session = greedy(tiny_model, ids, mask, method=METHODS[name](), n=12)
    cache = session.cache
    found = held_storages(cache)
    counted = counted_storages(cache)
    missing = {found[p][0] for p in set(found) - counted}
    assert not missing, missing
    assert counted <= set(found)
    assert cache.memory_bytes() == sum(nbytes for _, nbytes in found.values())
    assert cache.stats().total_bytes == cache.memory_bytes()
    cache.reset()
    assert held_storages(cache) == {} and cache.memory_bytes() == 0


def test_stats_count_the_token_log_when_layer_zero_is_recurrent():
    """FastGen logs the token ids with the cache's first layer; on a hybrid
    model whose layer 0 is recurrent ``stats()`` skipped that layer and
    left the log out of its total."""
    from transformers import Lfm2Config, Lfm2ForCausalLM

    torch.manual_seed(0)
    config = Lfm2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        layer_types=["conv", "full_attention", "conv", "full_attention"], pad_token_id=0)
    model = Lfm2ForCausalLM(config).eval()
    ids = torch.randint(3, 256, (1, 120), generator=torch.Generator().manual_seed(3))
    _, session = greedy(model, ids, method=kvc.FastGen(budget=48), n=6)
    cache = session.cache
    assert cache.holds_state(0) and cache.token_log.ids is not None
    assert cache.stats().total_bytes == cache.memory_bytes()


@pytest.mark.parametrize("make", [lambda: kvc.KIVI(bits=2, group=8, residual=16),
                                  lambda: kvc.EMS(budget=48) + kvc.KIVI(bits=2, group=8, residual=16)],
                         ids=["kivi", "ems+kivi"])
def test_packed_layers_report_allocated_slots_as_capacity(tiny_model, make):
    """``stats().layers[i].capacity`` is the slots a head has room for (as
    for uniform layers), not its live count: the rows of the packed codes
    plus the full-precision rows (it reported the live count)."""
    ids = random_ids(150, 33)[None]
    _, session = greedy(tiny_model, ids, method=make(), n=5)
    stats = session.cache.stats()
    for layer, row in zip(session.cache.layers, stats.layers):
        store = layer.store
        # uniform codes [B, H, rows, Db]; per-head [R, Db], the longest head's allocation
        codes = int(store._kc.shape[2]) if store._kc.ndim == 4 else int(store._host_caps.max())
        assert row.capacity == codes + int(store._rk.shape[2]) >= max(row.lengths)


@pytest.mark.parametrize("spec", ["ems+kivi:bits=2:group=8:residual=16", "pyramidkv+kivi:bits=2:group=8:residual=16",
                                  "snapkv+kivi:bits=4:group=8:residual=16"])
def test_packed_layers_hold_their_queries_once(tiny_model, spec, monkeypatch):
    """An evictor + KIVI layer keeps the calls' queries until its next round;
    its ring of held queries is given back whenever every row is at its
    target (they were held twice): the same logits, bit for bit, as a run
    that keeps the ring, over rounds, in a left-padded batch whose short row
    becomes due late (PyramidKV's deep layers drop its target at once);
    after the prefill of rows that are all compressed the layer holds fewer
    bytes."""
    from kvcompress.cache import CompressedLayer
    from kvcompress.methods import method_from_spec

    ids, mask = left_pad([random_ids(300, 34), random_ids(60, 35)])

    def run():
        out, session = greedy(tiny_model, ids, mask, method=method_from_spec(spec, budget=64), n=50,
                              output_logits=True, return_dict_in_generate=True)
        _, first = greedy(tiny_model, ids[:1], mask[:1], method=method_from_spec(spec, budget=64), n=1)
        return torch.stack(out.logits), first.cache.memory_bytes()

    logits, held = run()
    monkeypatch.setattr(CompressedLayer, "_drop_covered_ring", lambda self: None)
    kept_logits, kept_held = run()
    assert torch.equal(logits, kept_logits)
    assert held < kept_held
