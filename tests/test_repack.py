"""Decode-time re-compression of packed layers (``evictor + KIVI``): the
packed stores give back every slot they hold, with its position, state and
merge count, and the re-selection keeps what the method's rule picks."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList

import kvcompress as kvc
from kvcompress.cache import CompressedLayer
from kvcompress.stores import PackedStore, RaggedPackedStore, RaggedStore, UniformStore

G, BITS = 8, 4


def _exact(shape, seed):
    """Data that 4-bit packing keeps exactly: every element is 0 or 15, so a
    group's range is 0 (exact by rule) or 15 (scale 1, codes the values)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, shape, generator=g).float() * 15


def test_uniform_packed_store_gives_back_every_slot_and_column():
    B, H, D, n0, extra = 2, 3, 16, 37, 29
    keys, values = _exact((B, H, n0 + extra, D), 0), _exact((B, H, n0 + extra, D), 1)
    g = torch.Generator().manual_seed(2)
    # kept slots of an eviction: increasing, different per head
    positions = torch.sort(torch.randperm(200, generator=g)[: n0].to(torch.int32)).values.expand(B, H, n0).clone()
    positions[:, 1] += 300
    acc = torch.rand(B, H, n0, generator=g)
    store = UniformStore.from_parts(keys[:, :, :n0].clone(), values[:, :, :n0].clone(),
                                    {"positions": positions, "acc": acc})
    packed = PackedStore.from_uniform(store, BITS, G, 12, columns=True)
    packed.settle()
    assert packed.n_packed == (n0 - 12) // G * G
    for i in range(extra):
        packed.append(keys[:, :, n0 + i : n0 + i + 1], values[:, :, n0 + i : n0 + i + 1], 1000 + i)
        packed.settle()
    assert packed.n_packed > 0 and packed.r < 12 + G
    back = packed.unpacked()
    assert isinstance(back, UniformStore) and back.n == n0 + extra
    assert torch.equal(back.keys, keys) and torch.equal(back.values, values)
    want_pos = torch.cat([positions, torch.arange(1000, 1000 + extra, dtype=torch.int32).expand(B, H, extra)], 2)
    assert torch.equal(back.column("positions"), want_pos)
    assert torch.equal(back.column("acc"), torch.cat([acc, torch.zeros(B, H, extra)], 2))
    # the columns are bytes the store holds
    held = {t.data_ptr() for t in packed.tensors()}
    assert all(t.data_ptr() in held for t in packed._cols.values())
    # beam search reorders them with the slots
    packed.index_batch(torch.tensor([1, 0, 1]))
    again = packed.unpacked()
    assert torch.equal(again.keys, keys[[1, 0, 1]]) and torch.equal(again.column("acc"), back.column("acc")[[1, 0, 1]])


def test_uniform_packed_store_without_columns_refuses_to_unpack():
    store = UniformStore.from_parts(torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8),
                                    {"positions": torch.zeros(1, 1, 4, dtype=torch.int32)})
    with pytest.raises(RuntimeError, match="no per-slot columns"):
        PackedStore.from_uniform(store, BITS, G, 2).unpacked()


@pytest.mark.parametrize("merged", [False, True])
def test_ragged_packed_store_gives_back_its_slots_counts_and_scores(merged):
    B, H, D = 2, 2, 16
    lengths = [13, 1, 8, 21]  # a head of one slot (seven copies), one of a whole group (none)
    C, extra, R = max(lengths), 2 * G + 3, 4
    g = torch.Generator().manual_seed(3)
    keys, values = _exact((B, H, C, D), 4), _exact((B, H, C, D), 5)
    valid = torch.zeros(B, H, C, dtype=torch.bool)
    for i, n in enumerate(lengths):
        valid[i // H, i % H, :n] = True
    positions = torch.sort(torch.randint(0, 500, (B, H, C), generator=g).to(torch.int32), -1).values
    counts = torch.randint(1, 6, (B, H, C), generator=g).float() if merged else None
    scores = torch.rand(B, H, C, generator=g)
    ragged = RaggedStore.from_dense(keys, values, positions, valid, counts=counts, scores=scores)
    store = RaggedPackedStore.from_ragged(ragged, BITS, G, R, columns=True)
    new_k, new_v = _exact((B, H, extra, D), 6), _exact((B, H, extra, D), 7)
    for i in range(extra):
        store.append(new_k[:, :, i : i + 1], new_v[:, :, i : i + 1], 600 + i)
        store.settle()
    assert store.n_packed > 0  # decoded slots were packed onto the segments (moving them once)
    back = store.unpacked()
    assert isinstance(back, RaggedStore) and back.head_lengths() == [n + extra for n in lengths]
    assert (back.counts is not None) == merged and back.scores is not None
    for i, n in enumerate(lengths):
        b, h = divmod(i, H)
        k, v, pos = back.head(b, h)
        assert torch.equal(k, torch.cat([keys[b, h, :n], new_k[b, h]]))
        assert torch.equal(v, torch.cat([values[b, h, :n], new_v[b, h]]))
        assert torch.equal(pos, torch.cat([positions[b, h, :n], torch.arange(600, 600 + extra, dtype=torch.int32)]))
        rows = slice(int(back.offsets[i]), int(back.offsets[i]) + n + extra)
        if merged:
            # the last kept slot's count whole again (its copies' shares summed)
            want = torch.cat([counts[b, h, :n], torch.ones(extra)])
            assert torch.allclose(back.counts[rows], want, rtol=1e-6), (i, back.counts[rows], want)
        s = back.scores[rows]
        assert torch.equal(s[:n], scores[b, h, :n]) and bool(torch.isnan(s[n:]).all())


@pytest.mark.parametrize("merged_at", [None, 3])
def test_ragged_residual_takes_each_heads_newest_slots_of_count_one(merged_at):
    # KIVI keeps its newest tokens in full precision; a per-head layer keeps
    # the newest r kept slots of every head there, r at most the residual,
    # what every head holds, and the slots after any merged one (the residual
    # window has no counts)
    B, H, D, R = 1, 4, 16, 16
    lengths = [40, 35, 50, 37]
    C = max(lengths)
    keys, values = torch.randn(B, H, C, D), torch.randn(B, H, C, D)
    valid = torch.arange(C)[None, None, :] < torch.tensor(lengths).view(B, H, 1)
    positions = torch.arange(C, dtype=torch.int32).expand(B, H, C).clone() * 3
    counts = torch.ones(B, H, C)
    if merged_at is not None:
        counts[0, 2, lengths[2] - merged_at] = 4.0  # head 2's third newest slot absorbed three tokens
    ragged = RaggedStore.from_dense(keys, values, positions, valid, counts=counts)
    store = RaggedPackedStore.from_ragged(ragged, BITS, G, R, columns=True)
    r = R if merged_at is None else merged_at - 1
    assert store.r == r and store.head_lengths() == lengths
    for i, n in enumerate(lengths):
        assert torch.equal(store._rk[0, i, :r], keys[0, i, n - r : n])
        assert torch.equal(store._rcols["positions"][0, i, :r], positions[0, i, n - r : n])
    assert store._real.tolist() == [n - r for n in lengths]
    # without columns (interval=0: nothing re-selected) every kept slot is packed
    assert RaggedPackedStore.from_ragged(ragged, BITS, G, R).r == 0


def test_ragged_packed_store_without_columns_refuses_to_unpack():
    ragged = RaggedStore.from_dense(torch.zeros(1, 1, 3, 8), torch.zeros(1, 1, 3, 8),
                                    torch.zeros(1, 1, 3, dtype=torch.int32), torch.ones(1, 1, 3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="no positions"):
        RaggedPackedStore.from_ragged(ragged, BITS, G, 4).unpacked()


# ------------------------------------------------------------- in generation
def test_h2o_with_kivi_keeps_the_heavy_hitters_of_a_float64_recomputation(tiny_model, monkeypatch):
    """H2O + KIVI: the prompt's attention, then at every round the attention
    of the queries since the last one over the slots as the round reads them
    (dequantized), accumulated in float64; the kept slots are the recent half
    plus the top of that accumulation, and the accumulation is carried
    through packing."""
    from model_refs import accumulate_h2o, assert_h2o_kept

    events = []
    attend, repack = CompressedLayer.attend, CompressedLayer._repack_round

    def spy_attend(self, query, spec):
        if self.layer_idx == 0 and isinstance(self.store, UniformStore):  # the prompt
            events.append(("prompt", query.double().clone(), self.store.keys.double().clone(),
                           self.positions[0].clone(), spec.scaling))
        return attend(self, query, spec)

    def spy_repack(self, scaling, *args):
        if self.layer_idx == 0:
            held = self.store.unpacked()
            q = torch.cat(self._pending, 2).double()
            events.append(("round", q, held.keys.double().clone(), held.column("positions")[0].clone(), scaling))
        repack(self, scaling, *args)
        if self.layer_idx == 0:
            cols = self.store._cols
            n = self.store.n
            events.append(("kept", held.column("positions")[0].clone(), cols["positions"][0, :, :n].clone(),
                           cols["acc"][0, :, :n].double().clone()))

    monkeypatch.setattr(CompressedLayer, "attend", spy_attend)
    monkeypatch.setattr(CompressedLayer, "_repack_round", spy_repack)
    method = kvc.H2O(budget=64, interval=8) + kvc.KIVI(bits=4, group=16, residual=16)
    ids = torch.randint(3, 512, (1, 90), generator=torch.Generator().manual_seed(5))
    with kvc.compress(tiny_model, method):
        tiny_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=120,
                            min_new_tokens=120, do_sample=False, pad_token_id=0)
    H = tiny_model.config.num_key_value_heads
    acc = [dict() for _ in range(H)]
    rounds = 0
    for event in events:
        if event[0] == "kept":
            held_pos, kept, carried = event[1], event[2], event[3]
            for h in range(H):
                assert_h2o_kept(acc[h], held_pos[h].tolist(), kept[h].tolist(), eps=1e-5)
                # the kept slots carry their accumulation into the packed store
                want = torch.tensor([acc[h][p] for p in kept[h].tolist()], dtype=torch.float64)
                assert torch.allclose(carried[h], want, rtol=1e-4, atol=1e-6), (rounds, h)
                acc[h] = {p: acc[h][p] for p in kept[h].tolist()}
            rounds += 1
            continue
        _, q, k, pos, scaling = event
        accumulate_h2o(acc, q[0], k[0], pos, scaling)
    assert rounds >= 12


def test_packed_evictor_holds_flat_memory_through_a_long_generation(tiny_model):
    # the bytes of a packed evictor stop growing once decoding reaches its
    # rounds; without an interval the layer keeps every generated token
    ids = torch.randint(3, 512, (1, 200), generator=torch.Generator().manual_seed(6))
    held = {}
    for interval in (16, 0):
        method = kvc.SnapKV(budget=128, interval=interval) + kvc.KIVI(bits=4, group=32, residual=32)
        sizes = []

        class Bytes:
            def __call__(self, input_ids, scores):
                sizes.append(session.cache.memory_bytes())
                return scores

        with kvc.compress(tiny_model, method) as session:
            tiny_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=400,
                                min_new_tokens=400, do_sample=False, pad_token_id=0,
                                logits_processor=LogitsProcessorList([Bytes()]))
        held[interval] = sizes
    flat = held[16]
    assert max(flat[100:]) == max(flat[100:200])  # no growth after the first rounds
    # compress-once grows with every token: at least the codes of the 300
    # generated after step 100 (4 bits of key and value per channel)
    cfg = tiny_model.config
    codes = 300 * cfg.num_hidden_layers * cfg.num_key_value_heads * 2 * cfg.head_dim * 4 // 8
    assert held[0][-1] - held[0][100] >= codes, (held[0][100], held[0][-1], codes)


@pytest.mark.parametrize("name", ["snapkv", "h2o", "ems"])
def test_beam_search_reorders_what_the_rounds_read(tiny_model, name):
    # beams reorder the packed slots, their columns and the queries held for
    # the next round; each beam is then re-compressed within its budget
    from kvcompress.methods import REGISTRY

    ids = torch.randint(3, 512, (1, 120), generator=torch.Generator().manual_seed(9))
    method = REGISTRY[name](budget=48, interval=4) + kvc.KIVI(bits=4, group=16, residual=16)
    with kvc.compress(tiny_model, method) as session:
        out = tiny_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                  min_new_tokens=24, num_beams=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 144)
    for layer in session.cache.layers:
        assert isinstance(layer.store, PackedStore) and layer.store.batch == 3
        assert all(len(q) == 3 for q in layer._pending)
        assert sum(layer.head_lengths()) < 3 * layer.store.heads * (48 + 4)
