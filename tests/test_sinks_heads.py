"""KIVI(sinks=S) behind per-head and merging evictors (EMS, AdaKV, ...):
each head's first kept slots stay in full precision in the per-head packed
store, against float64 references and the eager path."""

from __future__ import annotations

import math

import pytest
import torch

import kvcompress as kvc
from kvcompress import ops
from kvcompress.methods import KIVI
from kvcompress.stores import AttentionSpec, RaggedPackedStore, RaggedStore
from kvcompress.stores.rotation import key_rotation

from test_rotation import ONE_CALL, _kernel_calls
from test_sinks import assert_same_generation, generate_padded

G, R, S = 8, 4, 4


def _ragged(lengths, D=16, heads=2, merged=False, seed=0, dtype=torch.float32):
    """A RaggedStore of one row per ``heads`` lengths, token-ordered
    positions, each head's first key 8x the others (an attention sink) and,
    with ``merged``, merge counts >= 1 on every slot but each head's last R
    (the residual window takes only slots of count 1)."""
    g = torch.Generator().manual_seed(seed)
    B, C = len(lengths) // heads, max(lengths)
    keys = torch.randn(B, heads, C, D, generator=g)
    keys[:, :, 0] *= 8
    values = torch.randn(B, heads, C, D, generator=g)
    valid = torch.zeros(B, heads, C, dtype=torch.bool)
    for i, n in enumerate(lengths):
        valid[i // heads, i % heads, :n] = True
    positions = (torch.arange(C, dtype=torch.int32) * 3).expand(B, heads, C).contiguous()
    counts = None
    if merged:
        counts = torch.randint(1, 6, (B, heads, C), generator=g).float()
        for i, n in enumerate(lengths):
            counts[i // heads, i % heads, n - R : n] = 1
    store = RaggedStore.from_dense(keys.to(dtype), values.to(dtype), positions, valid, counts=counts)
    return store, keys.to(dtype), values.to(dtype), counts


@pytest.mark.parametrize("columns", [False, True], ids=["compress-once", "rounds"])
@pytest.mark.parametrize("merged", [False, True], ids=["counts-1", "merged"])
@pytest.mark.parametrize("lengths", [[40, 23, 31, 57], [40, 23, R + 2, 57]], ids=["whole-block", "short-head"])
def test_the_block_holds_each_heads_first_kept_slots_exactly(columns, merged, lengths):
    """The block holds every head's first ``taken`` kept slots bit for bit
    with their merge counts: S, or what the shortest head holds beside its
    residual window. The packed part starts after them; with columns,
    unpacked() gives every slot back in token order with its position and
    count."""
    ragged, keys, values, counts = _ragged(lengths, merged=merged)
    store = RaggedPackedStore.from_ragged(ragged, 2, G, R, columns=columns, sinks=S)
    r = store.r
    assert r == (R if columns else 0)  # without columns everything else is packed
    taken = min(S, min(lengths) - r)  # the short head holds R + 2: 2 beside a residual of R
    assert store.n_sinks == taken and store.head_lengths() == lengths
    assert (f"sinks={taken} of {S}" if taken != S else f"sinks={S},") in repr(store)
    if merged:
        block = torch.stack([counts[i // 2, i % 2, :taken] for i in range(len(lengths))]).view(2, 2, taken)
        assert torch.equal(store._sink_counts, block)
    else:
        assert store._sink_counts is None
    # each head's packed part: the slots between the block and the residual, whole groups
    assert store._real.tolist() == [n - taken - r for n in lengths]
    assert store._host_lengths.tolist() == [math.ceil((n - taken - r) / G) * G for n in lengths]
    for i in range(len(lengths)):
        b, h = divmod(i, 2)
        assert torch.equal(store._rk[b, h, :taken], keys[b, h, :taken])
        assert torch.equal(store._rv[b, h, :taken], values[b, h, :taken])
    if not columns:
        return
    back = store.unpacked()
    assert back.head_lengths() == lengths
    for i, n in enumerate(lengths):
        b, h = divmod(i, 2)
        k, v, pos = back.head(b, h)
        assert torch.equal(pos, torch.arange(n, dtype=torch.int32) * 3)
        assert torch.equal(k[:taken], keys[b, h, :taken]) and torch.equal(k[n - r :], keys[b, h, n - r : n])
        if merged:
            rows = slice(int(back.offsets[i]), int(back.offsets[i]) + n)
            assert torch.allclose(back.counts[rows], counts[b, h, :n], rtol=1e-6)
        if n - taken - r == 0:
            continue
        # the packed slots within KIVI's bound of their own group's range (the block's keys excluded)
        lo, hi = keys[b, h, taken : n - r].amin(0), keys[b, h, taken : n - r].amax(0)
        assert bool(((k[taken : n - r] - keys[b, h, taken : n - r]).abs() <= (hi - lo) / 3 / 2 + 1e-5).all())


def _dequantized(k, v, bits, rotation=None):
    """float64 ``(keys, values)`` ``[n, D]`` of one head's slots packed alone
    (its last group filled with copies of its last slot, then dropped), in
    the model's basis."""
    n, D = (int(x) for x in k.shape)
    pad = (-n) % G
    kp = torch.cat([k, k[-1:].expand(pad, D)])[None, None].float()
    vp = torch.cat([v, v[-1:].expand(pad, D)])[None, None]
    if rotation is not None:
        kp = kp @ rotation
    kd = ops.unpack_keys(*ops.pack_keys(kp, bits, G), bits, G)[0, 0, :n].double()
    if rotation is not None:
        kd = kd @ rotation.double().T
    vd = ops.unpack_values(*ops.pack_values(vp, bits, G), bits, G, head_dim=D)[0, 0, :n].double()
    return kd, vd


def _attention(query, heads, scaling, dtype, softcap=None):
    """Attention of ``query`` ``[B, Hq, q, D]`` over per-head ``(keys, values,
    log_counts)`` (row-major over batch and kv heads), the last q slots the
    queries' own (causal), computed in ``dtype``; ``[B, q, Hq, D]``."""
    B, Hq, q, D = query.shape
    H = len(heads) // B
    g = Hq // H
    out = torch.zeros(B, q, Hq, D, dtype=dtype)
    for i, (k, v, logc) in enumerate(heads):
        b, h = divmod(i, H)
        n = int(k.shape[0])
        causal = torch.arange(n)[None, :] <= (torch.arange(q) + n - q)[:, None]
        for hq in range(h * g, (h + 1) * g):
            logits = (query[b, hq].to(dtype) @ k.to(dtype).T) * scaling
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            logits = logits + logc.to(dtype)
            p = torch.softmax(logits.masked_fill(~causal, -math.inf), -1)
            out[b, :, hq] = p @ v.to(dtype)
    return out


@ONE_CALL
@pytest.mark.parametrize("rotated", [False, True], ids=["plain", "rotated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_with_a_block_per_head_equals_float64(dtype, rotated, one_call, monkeypatch):
    """Heads of different lengths with merge counts (the block's slots
    too), a block per head, then decoded slots packed onto every head's
    segment while the block stays: within twice torch's own error of float64
    attention over each head's block (exact, with its counts), its kept
    slots packed alone (with their counts) and the residual, for single
    queries and a chunk; the block is read in the same kernel call as the
    residual (two calls joined, rotated off the CPU). A softcap takes the
    eager path over the same slots and counts."""
    calls = _kernel_calls(monkeypatch, one_call)
    D, B, H, Hq, bits = 16, 2, 2, 6, 2
    lengths = [40, 23, 31, 57]
    ragged, keys, values, counts = _ragged(lengths, D=D, heads=H, merged=True, dtype=dtype)
    rotation = key_rotation(D, torch.device("cpu")) if rotated else None
    store = RaggedPackedStore.from_ragged(ragged, bits, G, R, columns=True, rotation=rotation, sinks=S)
    assert store.n_sinks == S and store.r == R
    g = torch.Generator().manual_seed(5)
    new_k = torch.randn(B, H, 2 * G + 3, D, generator=g).to(dtype)
    new_v = torch.randn(B, H, 2 * G + 3, D, generator=g).to(dtype)
    for t in range(2 * G):
        store.append(new_k[:, :, t : t + 1], new_v[:, :, t : t + 1], 500 + t)
        store.settle()
    assert store.n_packed == 2 * G and store.n_sinks == S
    store.append(new_k[:, :, 2 * G :], new_v[:, :, 2 * G :], 500 + 2 * G)  # a chunk of 3 in the residual
    heads = []
    for i, n in enumerate(lengths):
        b, h = divmod(i, H)
        kd, vd = _dequantized(keys[b, h, S : n - R], values[b, h, S : n - R], bits, rotation)
        ed, fd = _dequantized(torch.cat([keys[b, h, n - R : n], new_k[b, h, : 2 * G - R]]),
                              torch.cat([values[b, h, n - R : n], new_v[b, h, : 2 * G - R]]), bits, rotation)
        resid_k, resid_v = new_k[b, h, 2 * G - R :], new_v[b, h, 2 * G - R :]
        heads.append((torch.cat([keys[b, h, :S].double(), kd, ed, resid_k.double()]),
                      torch.cat([values[b, h, :S].double(), vd, fd, resid_v.double()]),
                      torch.cat([counts[b, h, :n - R].log(), torch.zeros(2 * G + R + 3)]).double()))
    for q_len in (1, 3):
        query = torch.randn(B, Hq, q_len, D, generator=g).to(dtype)
        spec = AttentionSpec(scaling=D**-0.5, count_bias=True)
        got = store.attend(query, spec)
        ref = _attention(query, heads, spec.scaling, torch.float64)
        torch_err = (_attention(query, heads, spec.scaling, dtype).double() - ref).abs().max().item()
        err = (got.double() - ref).abs().max().item()
        assert err <= 2 * torch_err + (1e-6 if dtype == torch.float32 else 1e-2), (q_len, err, torch_err)
        assert len(calls) == (1 if one_call or not rotated else 2), calls
        calls.clear()
    capped = store.attend(query, AttentionSpec(scaling=D**-0.5, count_bias=True, softcap=4.0))
    ref = _attention(query, heads, D**-0.5, torch.float64, softcap=4.0)
    assert (capped.double() - ref).abs().max().item() < (1e-5 if dtype == torch.float32 else 3e-2)


MAKERS = {
    "ems+kivi2": lambda: kvc.EMS(budget=48) + KIVI(bits=2, group=8, residual=8, sinks=S),
    "adakv+kivi4-rotated": lambda: kvc.AdaKV(budget=48) + KIVI(bits=4, group=8, residual=8, rotate=True, sinks=S),
    "ems-once+kivi2-auto": lambda: kvc.EMS(budget=48, interval=0) + KIVI(bits=2, group=8, residual=8,
                                                                          rotate="auto", sinks=S),
}


@pytest.mark.parametrize("make", MAKERS.values(), ids=list(MAKERS))
def test_kernel_generation_equals_the_eager_path_and_keeps_each_heads_first_tokens(tiny_lm, make, monkeypatch):
    """On a left-padded batch, generation through the kernels gives the
    logits of the eager path over the same slots; every layer holds a block
    per head whose slots are its first kept ones (EMS's: among its sinks,
    each row's first real tokens)."""
    import kvcompress.stores.packed_ragged as ragged_store

    model, tok, _ = tiny_lm
    out, cache = generate_padded(model, tok, make())
    for i, layer in enumerate(cache.layers):
        s = layer.store
        assert isinstance(s, RaggedPackedStore) and s.n_sinks == S, (i, s)
        if s._rcols is not None:
            # rounds re-take the block from each head's first kept slots
            block = s._rcols["positions"][:, :, : s.n_sinks]
            back = s.unpacked()
            for b in range(2):
                for h in range(s.heads):
                    _, _, pos = back.head(b, h)
                    assert torch.equal(pos[: s.n_sinks], block[b, h]) and bool((pos[1:] > pos[:-1]).all())
            if isinstance(make(), kvc.EMS):  # EMS keeps each row's first real tokens (slot 25 on in row 1)
                first = torch.tensor([0, 25], dtype=block.dtype)[:, None, None] + torch.arange(s.n_sinks)
                assert torch.equal(block, first.expand_as(block).to(block.dtype)), (i, block)
    monkeypatch.setattr(ragged_store, "kernel_reads", lambda query, residual: False)
    assert_same_generation(out, generate_padded(model, tok, make())[0])


@pytest.mark.parametrize("sinks", [0, S])
def test_the_rotation_test_leaves_each_heads_sink_block_out(tiny_lm, sinks, monkeypatch):
    """``rotate="auto"`` tests the keys a per-head layer packs: with a sink
    block, each head's first S kept slots are masked out of that test, as
    padding is (they are never packed); without one they take part."""
    from kvcompress.cache import CompressedLayer
    from kvcompress.stores import RaggedStore as Ragged

    model, tok, _ = tiny_lm
    seen = []
    real = CompressedLayer._slots_to_pack

    def spy(self, packing):
        keys, values, start, counts = real(self, packing)
        if isinstance(self.store, Ragged):
            firsts = [self.store.head(b, h)[0][:S] for b in range(self.store.batch) for h in range(self.store.heads)]
            seen.append((keys, start, firsts))
        return keys, values, start, counts

    monkeypatch.setattr(CompressedLayer, "_slots_to_pack", spy)
    ids = torch.randint(5, 250, (1, 120), generator=torch.Generator().manual_seed(2))
    method = kvc.EMS(budget=48, interval=0) + KIVI(bits=2, group=8, residual=8, rotate="auto", sinks=sinks)
    with kvc.compress(model, method):
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.eos_token_id)
    assert seen
    tested_sinks = 0
    for keys, start, firsts in seen:
        B, H, m, _ = keys.shape
        for i, first in enumerate(firsts):
            unmasked = keys[i // H, i % H, int(start[i]) if start is not None else 0 :]
            tested_sinks += int((unmasked[:, None] == first[None]).all(-1).any(1).sum())
    assert (tested_sinks == 0) == bool(sinks), tested_sinks
