"""Query-aware readers over a per-head layer (what AdaKV, EMS and the other
head-wise or merging evictors keep): Quest's pages, TidalDecode's selection
and MagicPIG's tables on the ragged layout with merge counts, against float64
references, and generate() composed with those evictors."""

from __future__ import annotations

import math

import pytest
import torch

import kvcompress as kvc
from kvcompress.cache import KVCache
from kvcompress.methods import MagicPIG, Quest, TidalDecode
from kvcompress.stores import (AttentionSpec, RaggedLSHStore, RaggedPagedStore, RaggedStore, RaggedTidalStore,
                               TidalStore, UniformStore)
from test_magicpig import codes_ref
from test_quest import _batch, _generate

D = 16


def _ragged(lengths, counts=True, seed=0, slack=3, H=2, first_position=None):
    """A per-head layer with ``lengths`` ``[B][H]`` slots of random keys and
    values, positions ascending with gaps (what an evictor leaves), merge
    counts in [1, 4) when ``counts``."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    B = lengths.shape[0]
    C = int(lengths.max())
    keys = torch.randn(B, H, C, D, generator=g)
    values = torch.randn(B, H, C, D, generator=g)
    gaps = torch.randint(1, 4, (B, H, C), generator=g)
    positions = (torch.cumsum(gaps, -1) - 1).to(torch.int32)
    valid = torch.arange(C)[None, None, :] < lengths[..., None]
    cnt = 1 + 3 * torch.rand(B, H, C, generator=g) if counts else None
    return RaggedStore.from_dense(keys, values, positions, valid, counts=cnt, slack=slack), g


def _append_step(store, g, position):
    """One decode token appended to every head; returns nothing."""
    B, H = store.batch, store.heads
    store.append(torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g), position)


def _next_position(store):
    return int(store.positions[store.live_rows()].max()) + 1


def attention_rows_ref(q, store, slots, counts=True):
    """float64 attention of ``q`` ``[B, Hq, 1, D]`` over each head's listed
    slots (``slots[b][h]``: indices into the head), log(count) in the logit."""
    B, Hq = int(q.shape[0]), int(q.shape[1])
    g = Hq // store.heads
    out = torch.zeros(B, 1, Hq, D, dtype=torch.float64)
    for b in range(B):
        for hq in range(Hq):
            h = hq // g
            k, v, _ = store.head(b, h)
            idx = slots[b][h]
            if not idx:
                continue
            i = b * store.heads + h
            logit = (k[idx].double() @ q[b, hq, 0].double()) * D ** -0.5
            if counts and store.counts is not None:
                logit = logit + store.counts[int(store.offsets[i]) + torch.tensor(idx)].double().log()
            out[b, 0, hq] = torch.softmax(logit, 0) @ v[idx].double()
    return out


# --------------------------------------------------------------------- Quest


def _check_bounds(store):
    P = store.page
    for b in range(store.batch):
        for h in range(store.heads):
            i = b * store.heads + h
            k = store.head(b, h)[0].double()
            base = int(store.page_offsets[i])
            for p in range(-(-int(k.shape[0]) // P)):
                page = k[p * P:(p + 1) * P]
                assert torch.equal(store.kmin[base + p].double(), page.amin(0)), (b, h, p)
                assert torch.equal(store.kmax[base + p].double(), page.amax(0)), (b, h, p)


def test_page_bounds_follow_appends_and_reallocations():
    ragged, g = _ragged([[37, 0], [5, 64]], slack=2)
    store = RaggedPagedStore.from_ragged(ragged, page=8, token_budget=32)
    _check_bounds(store)
    pos = _next_position(store)
    moved = 0
    for step in range(20):  # the slack of 2 runs out: some appends reallocate every head
        caps = store.caps
        _append_step(store, g, pos + step)
        moved += store.caps is not caps
        _check_bounds(store)
    assert moved >= 1 and store.head_lengths() == [57, 20, 25, 84]
    assert "RaggedPagedStore" in repr(store) and "page=8" in repr(store)
    # the bounds are bytes the store holds
    held = {t.untyped_storage().data_ptr() for t in store.tensors()}
    assert store.kmin.untyped_storage().data_ptr() in held


def _page_scores_ref(q, store, b, h, gqa="max"):
    P, g = store.page, int(q.shape[1]) // store.heads
    k = store.head(b, h)[0].double()
    out = []
    for p in range(-(-int(k.shape[0]) // P)):
        lo, hi = k[p * P:(p + 1) * P].amin(0), k[p * P:(p + 1) * P].amax(0)
        u = [float(torch.maximum(q[b, hq, 0].double() * hi, q[b, hq, 0].double() * lo).sum())
             for hq in range(h * g, (h + 1) * g)]
        out.append(max(u) if gqa == "max" else sum(u) / g)
    return out


@pytest.mark.parametrize("gqa", ["max", "mean"])
def test_sparse_step_reads_the_top_pages_of_each_head_with_merge_counts(gqa):
    ragged, g = _ragged([[90, 20], [131, 64]])
    store = RaggedPagedStore.from_ragged(ragged, page=8, token_budget=32, gqa=gqa)
    _append_step(store, g, _next_position(store))
    q = torch.randn(2, 4, 1, D, generator=g)
    out = store.attend(q, AttentionSpec(scaling=D ** -0.5, count_bias=True))
    pages = store.last_pages
    assert pages is not None and pages.shape == (2, 2, 4) and store.sparse_steps == 1
    slots = []
    for b in range(2):
        row = []
        for h in range(2):
            n = store.head_lengths()[b * 2 + h]
            scores = _page_scores_ref(q, store, b, h, gqa)
            last = len(scores) - 1
            if len(scores) <= 4:  # a head with few pages reads all of them, -1 in front
                want = [-1] * (4 - len(scores)) + list(range(len(scores)))
            else:
                rest = sorted(range(1, last), key=lambda p: (-scores[p], p))[:2]
                want = sorted([0, last] + rest)
            assert pages[b, h].tolist() == want, (b, h)
            row.append([j for p in want if p >= 0 for j in range(p * 8, min((p + 1) * 8, n))])
        slots.append(row)
    ref = attention_rows_ref(q, store, slots)
    assert (out.double() - ref).abs().max() < 1e-5
    # the counts join the logits: without them the output differs
    plain = store.attend(q, AttentionSpec(scaling=D ** -0.5))
    assert (plain.double() - attention_rows_ref(q, store, slots, counts=False)).abs().max() < 1e-5
    assert (plain - out).abs().max() > 1e-3


def test_a_budget_covering_every_head_reads_densely():
    ragged, g = _ragged([[40, 20]], H=2)
    store = RaggedPagedStore.from_ragged(ragged, page=8, token_budget=48)
    _append_step(store, g, _next_position(store))
    q = torch.randn(1, 4, 1, D, generator=g)
    out = store.attend(q, AttentionSpec(scaling=D ** -0.5, count_bias=True))
    assert store.last_pages is None and store.sparse_steps == 0
    dense = kvc.ops.attention(q, store.k, store.v, scaling=D ** -0.5, offsets=store.offsets, lengths=store.lengths,
                              counts=store.counts)
    assert torch.equal(out, dense)


# --------------------------------------------------------------- TidalDecode


def test_tidal_selection_and_sparse_reads_on_per_head_layers():
    shared: dict = {}
    sel_src, g = _ragged([[70, 45], [12, 90]], seed=1)
    select = RaggedTidalStore.from_ragged(sel_src, "select", 16, shared, gqa="max")
    # the sparse layer keeps other tokens (another layer's eviction): every
    # second position of the selection layer's, per head
    sp = []
    for b in range(2):
        for h in range(2):
            k, v, pos = select.head(b, h)
            sp.append((k[::2], v[::2], pos[::2]))
    L = max(int(x[0].shape[0]) for x in sp)
    keys, values = torch.zeros(2, 2, L, D), torch.zeros(2, 2, L, D)
    positions, valid = torch.zeros(2, 2, L, dtype=torch.int32), torch.zeros(2, 2, L, dtype=torch.bool)
    for i, (k, v, pos) in enumerate(sp):
        m = int(k.shape[0])
        keys[i // 2, i % 2, :m], values[i // 2, i % 2, :m], positions[i // 2, i % 2, :m] = k, v, pos
        valid[i // 2, i % 2, :m] = True
    sparse = RaggedTidalStore.from_ragged(RaggedStore.from_dense(keys, values, positions, valid,
                                                                 counts=1 + torch.rand(2, 2, L, generator=g)),
                                          "sparse", 16, shared)
    # the decode token reaches both layers
    step = _next_position(select) + 5
    for s in (select, sparse):
        _append_step(s, g, step)
    q = torch.randn(2, 4, 1, D, generator=g)
    spec = AttentionSpec(scaling=D ** -0.5, count_bias=True)
    select.attend(q, spec)
    sel = shared["tidal"]
    assert sel.newest == step and sel.positions.shape == (2, 2, 16)
    for b in range(2):
        for h in range(2):
            k, _, pos = select.head(b, h)
            i = b * 2 + h
            c = select.counts[int(select.offsets[i]):int(select.offsets[i]) + int(k.shape[0])].double()
            logits = (q[b, 2 * h:2 * h + 2, 0].double() @ k.double().T) * D ** -0.5 + c.log()
            p = torch.softmax(logits, -1).amax(0)
            n = int(k.shape[0])
            forced = {n - 1}
            rest = sorted((j for j in range(n) if j not in forced), key=lambda j: (-float(p[j]), j))
            chosen = sorted(forced | set(rest[:15])) if n > 16 else list(range(n))
            want = [-1] * (16 - len(chosen)) + [int(pos[j]) for j in chosen]
            assert sel.positions[b, h].tolist() == want, (b, h)
    q2 = torch.randn(2, 4, 1, D, generator=g)
    out = sparse.attend(q2, spec)
    assert sparse.sparse_steps == 1
    slots = []
    for b in range(2):
        row = []
        for h in range(2):
            _, _, pos = sparse.head(b, h)
            n = int(pos.shape[0])
            mine = set(sel.positions[b, h].tolist())
            hit = [j for j in range(n) if int(pos[j]) in mine]
            other = [j for j in range(n) if j not in hit]
            take = sorted(hit + other[len(other) - max(0, min(16, n) - len(hit)):]) if n > 16 else list(range(n))
            assert n - 1 in take
            want = [-1] * (16 - len(take)) + take
            assert sparse.last_read[b, h].tolist() == want, (b, h)
            row.append(take)
        slots.append(row)
    assert (out.double() - attention_rows_ref(q2, sparse, slots)).abs().max() < 1e-5
    # a stale selection (another step's token) reads everything
    _append_step(sparse, g, step + 1)
    sparse.attend(q2, spec)
    assert sparse.last_read is None and sparse.sparse_steps == 1


def test_a_uniform_sparse_layer_reads_a_per_head_selection():
    """A row kept whole stays uniform while another layer is per head: the
    published positions (``-1`` in front for short heads) still read right."""
    shared: dict = {}
    src, g = _ragged([[40, 10]], seed=2, counts=False)
    select = RaggedTidalStore.from_ragged(src, "select", 16, shared)
    base = UniformStore()
    base.append(torch.randn(1, 2, 60, D, generator=g), torch.randn(1, 2, 60, D, generator=g), 0)
    sparse = TidalStore.from_uniform(base, "sparse", 16, shared)
    step = 200
    for s in (select, sparse):
        _append_step(s, g, step)
    q = torch.randn(1, 4, 1, D, generator=g)
    select.attend(q, AttentionSpec(scaling=D ** -0.5))
    sel = shared["tidal"]
    assert sel.positions[0, 1, :5].tolist() == [-1] * 5  # 11 slots: all of them, padded in front
    sparse.attend(q, AttentionSpec(scaling=D ** -0.5))
    read = sparse.last_read
    assert read is not None and read.shape == (1, 2, 16) and int(read[0, 0, -1]) == 60
    held = sparse.column("positions")
    for h in range(2):
        got = set(held[0, h, read[0, h]].tolist())
        assert set(x for x in sel.positions[0, h].tolist() if x >= 0) & set(held[0, h].tolist()) <= got


# ------------------------------------------------------------------ MagicPIG


def _lsh_head_ref(q, store, b, hq, g, scaling):
    """float64 MagicPIG estimate of one query head over its kv head's slots:
    sinks and window exact, colliding slots weighted by 1/p, log(count) added."""
    h = hq // g
    i = b * store.heads + h
    k, v, _ = store.head(b, h)
    n = int(k.shape[0])
    off = int(store.offsets[i])
    codes = store.codes[off:off + n]
    qc = kvc.ops.simhash(q, store.planes, store.K, group=g)[b, hq, 0]
    qq = q[b, hq, 0].double()
    logw, idx = [], []
    for j in range(n):
        kk = k[j].double()
        x = scaling * float(qq @ kk)
        if not (j < store.sinks or j >= n - store.window):
            if int((codes[j] == qc).sum()) < store.hits:
                continue
            y = kk - store.center[b, h].double()
            cos = float(qq @ y) / (float(qq.norm()) * float(y.norm()))
            u = 1 - math.acos(max(-1.0, min(1.0, cos))) / math.pi
            p = u ** store.K
            below = sum(math.comb(store.L, t) * p ** t * (1 - p) ** (store.L - t) for t in range(store.hits))
            x -= math.log1p(-below)
        if store.counts is not None:
            x += math.log(float(store.counts[off + j]))
        logw.append(x)
        idx.append(j)
    w = torch.tensor(logw, dtype=torch.float64)
    return torch.softmax(w, 0) @ v[idx].double(), len(idx)


def _check_codes(store):
    for b in range(store.batch):
        for h in range(store.heads):
            k = store.head(b, h)[0]
            i = b * store.heads + h
            off, n = int(store.offsets[i]), int(k.shape[0])
            ref, margin = codes_ref(k[None, None], store.planes[h:h + 1], store.K, store.center[b, h][None, None])
            clear = margin[0, 0] > 1e-4
            assert torch.equal(store.codes[off:off + n].long()[clear], ref[0, 0][clear]), (b, h)


def test_lsh_tables_follow_appends_and_the_estimate_matches_float64():
    ragged, g = _ragged([[150, 40], [0, 200]], slack=2)
    store = RaggedLSHStore.from_ragged(ragged, K=4, L=20, hits=2, sinks=4, window=8, seed=3)
    # the center is the mean of each head's kept keys (an empty head's is 0)
    for b, h in ((0, 0), (1, 1)):
        assert torch.allclose(store.center[b, h], store.head(b, h)[0].mean(0), atol=1e-6)
    assert torch.equal(store.center[1, 0], torch.zeros(D))
    _check_codes(store)
    pos = _next_position(store)
    for step in range(6):  # reallocations move the codes with their rows
        _append_step(store, g, pos + step)
    _check_codes(store)
    q = torch.randn(2, 4, 1, D, generator=g) * 2
    out = store.attend(q, AttentionSpec(scaling=D ** -0.5, count_bias=True))
    assert store.sampled_steps == 1
    reads = 0
    for b in range(2):
        for hq in range(4):
            ref, nread = _lsh_head_ref(q, store, b, hq, 2, D ** -0.5)
            reads += nread
            assert (out[b, 0, hq].double() - ref).abs().max() < 1e-5, (b, hq)
    read, offered = store.read_counts()
    assert read == reads and offered == 2 * sum(store.head_lengths()) and read < offered


def test_a_recompressed_lsh_layer_keeps_its_center_and_recomputes_codes():
    ragged, _ = _ragged([[50, 30]], seed=4)
    first = RaggedLSHStore.from_ragged(ragged, K=4, L=10, hits=2, sinks=2, window=4, seed=9)
    again, _ = _ragged([[20, 25]], seed=5)
    second = RaggedLSHStore.from_ragged(again, K=4, L=10, hits=2, sinks=2, window=4, seed=9, center=first.center)
    assert torch.equal(second.planes, first.planes) and torch.equal(second.center, first.center)
    _check_codes(second)


# --------------------------------------------------------------- composition


EVICTORS = {
    "adakv": lambda: kvc.AdaKV(ratio=0.5),
    "ems": lambda: kvc.EMS(ratio=0.5),
}
READERS = {
    "quest": (lambda b: Quest(token_budget=b, page=8, dense_layers=1), RaggedPagedStore, "sparse_steps"),
    "tidal": (lambda b: TidalDecode(token_budget=b, selection_layers=(1,)), RaggedTidalStore, "sparse_steps"),
    "magicpig": (lambda b: MagicPIG(sinks=4, window=b, dense_layers=1), RaggedLSHStore, "sampled_steps"),
}


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("evictor", sorted(EVICTORS))
def test_composed_with_a_per_head_evictor(tiny_model, evictor, reader):
    """Left-padded batch of two: a budget covering every head reproduces the
    evictor alone token for token; a small one reads sparsely in the layers
    after the dense ones, over the evictor's per-head layers."""
    make, store_type, counter = READERS[reader]
    ids, mask = _batch()
    alone = _generate(tiny_model, ids, mask, EVICTORS[evictor]())
    assert torch.equal(_generate(tiny_model, ids, mask, EVICTORS[evictor]() + make(512)), alone)
    method = EVICTORS[evictor]() + make(32)
    cache = KVCache(method)
    out = _generate(tiny_model, ids, mask, method, cache)
    assert out.shape == alone.shape
    sparse_layers = [layer.store for layer in cache.layers[1:]]
    assert all(type(s) is store_type for s in sparse_layers), [type(s).__name__ for s in sparse_layers]
    assert all(getattr(s, counter) > 0 for s in sparse_layers if not (reader == "tidal" and s.role == "select"))
    if evictor == "ems":
        assert all(s.counts is not None for s in sparse_layers)  # merged slots, weighed by their counts
    # the reader holds what the evictor kept (no slot comes back)
    ref_cache = KVCache(EVICTORS[evictor]())
    _generate(tiny_model, ids, mask, EVICTORS[evictor](), ref_cache)
    assert [layer.head_lengths() for layer in cache.layers] == [layer.head_lengths() for layer in ref_cache.layers]


def test_a_long_generation_under_a_recompressing_evictor_keeps_the_reader_current(tiny_model):
    """EMS re-merges every interval into a new per-head layer: Quest takes it
    over again each time, its bounds current and its budget held."""
    g = torch.Generator().manual_seed(13)
    ids = torch.randint(5, 500, (1, 40), generator=g)
    method = kvc.EMS(budget=48) + Quest(token_budget=32, page=8, dense_layers=0)
    cache = KVCache(method)
    out = _generate(tiny_model, ids, torch.ones_like(ids), method, cache, new=80)
    assert out.shape == (1, 120)
    interval = method.interval
    assert interval > 0
    for layer in cache.layers:
        store = layer.store
        assert type(store) is RaggedPagedStore and store.sparse_steps > 0
        assert sum(store.head_lengths()) <= 2 * 48 + 2 * interval
        _check_bounds(store)
