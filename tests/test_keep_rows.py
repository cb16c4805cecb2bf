"""Decode-time rounds of a merging method + KIVI keep the packed rows they
leave unchanged (``stores.keep_rows``, ``KIVI(keep_rows=...)``): the kept
key groups' unchanged members keep their codes, the placeholders weigh
nothing in attention, and the store gives back exactly the round's slots."""

from __future__ import annotations

import pytest
import torch

import kvcompress as kvc
from kvcompress.cache import CompressedLayer
from kvcompress.stores import AttentionSpec, RaggedPackedStore, RaggedStore
from kvcompress import ops
from kvcompress.stores.keep_rows import arrange, arrange_rows
from kvcompress.stores.rotation import key_rotation

G, R, D = 16, 8, 32


def _old_store(bits, sinks, rotated, seed=0, dtype=torch.float32, device="cpu", rows_apart=False):
    """A per-head packed store with positions and merge counts (B = 2, H = 2)."""
    ragged = _old_slots(seed, dtype, device)
    rot = key_rotation(D, device) if rotated else None
    return RaggedPackedStore.from_ragged(ragged, bits, G, R, columns=True, rotation=rot, sinks=sinks,
                                         rows_apart=rows_apart)


def _old_slots(seed=0, dtype=torch.float32, device="cpu"):
    """The slots of :func:`_old_store`, a RaggedStore (B = 2, H = 2)."""
    g = torch.Generator().manual_seed(seed)
    B, H = 2, 2
    lengths = [90, 61, 120, 77]
    C = max(lengths)
    keys = (torch.randn(B, H, C, D, generator=g) * torch.linspace(0.3, 3.0, D)).to(dtype)
    values = torch.randn(B, H, C, D, generator=g).to(dtype)
    valid = torch.arange(C)[None, None, :] < torch.tensor(lengths).view(B, H, 1)
    positions = (torch.arange(C, dtype=torch.int32) * 2).expand(B, H, C).clone()
    counts = torch.randint(1, 4, (B, H, C), generator=g).float()
    counts[..., -R - 2 :] = 1.0  # the newest slots unmerged: the residual takes them
    scores = torch.rand(B, H, C, generator=g)
    return RaggedStore.from_dense(*(t.to(device) for t in (keys, values, positions, valid)),
                                  counts=counts.to(device), scores=scores.to(device))


def _round(old, seed=1, drop=0.15, merge=0.05, new=20):
    """What a merging method's round could return from ``old.unpacked()``:
    each slot dropped (probability ``drop``), merged into (``merge``: its
    count and key change) or left as it is; the sink block always kept; then
    ``new`` decoded slots (``drop`` and ``new`` may be per batch row).
    Returns (kept store, {(head, position): unchanged})."""
    g = torch.Generator().manual_seed(seed)
    u = old.unpacked()
    B, H = u.batch, u.heads
    heads, same = [], {}
    for i in range(B * H):
        o, n = int(u.offsets[i]), int(u.lengths[i])
        k, v = u.k[o : o + n].cpu().clone(), u.v[o : o + n].cpu().clone()
        pos, cnt = u.positions[o : o + n].cpu().clone(), u.counts[o : o + n].cpu().clone()
        roll = torch.rand(n, generator=g)
        p_drop = drop[i // H] if isinstance(drop, (list, tuple)) else drop
        keep = (roll >= p_drop) | (torch.arange(n) < old._r0)
        changed = (roll < p_drop + merge) & keep & (torch.arange(n) >= old._r0)
        k[changed] = (0.5 * (k[changed].float() + torch.randn(int(changed.sum()), D, generator=g))).to(k.dtype)
        cnt[changed] += 2
        last, m = int(pos.max()), new[i // H] if isinstance(new, (list, tuple)) else new
        k = torch.cat([k[keep], torch.randn(m, D, generator=g).to(k.dtype)])
        v = torch.cat([v[keep], torch.randn(m, D, generator=g).to(v.dtype)])
        pos = torch.cat([pos[keep], torch.arange(last + 1, last + 1 + m, dtype=torch.int32)])
        cnt = torch.cat([cnt[keep], torch.ones(m)])
        for p, c in zip(pos.tolist(), (~changed[keep]).tolist() + [False] * m):
            same[(i, p)] = c
        heads.append((k, v, pos, cnt))
    M = max(len(h[2]) for h in heads)
    keys, values = torch.zeros(B, H, M, D, dtype=u.k.dtype), torch.zeros(B, H, M, D, dtype=u.k.dtype)
    positions, counts = torch.zeros(B, H, M, dtype=torch.int32), torch.ones(B, H, M)
    valid = torch.zeros(B, H, M, dtype=torch.bool)
    for i, (k, v, pos, cnt) in enumerate(heads):
        b, h, n = i // H, i % H, len(pos)
        keys[b, h, :n], values[b, h, :n], positions[b, h, :n], counts[b, h, :n] = k, v, pos, cnt
        valid[b, h, :n] = True
    dev = u.k.device
    return RaggedStore.from_dense(*(t.to(dev) for t in (keys, values, positions, valid)), counts=counts.to(dev),
                                  slack=4), same


def _reference(store_slots: RaggedStore, query, spec):
    """float64 attention of ``query`` [B, Hq, 1, D] over each head's slots, log count added with
    count_bias: ``[B, 1, Hq, D]``, as the stores return it."""
    B, Hq = int(query.shape[0]), int(query.shape[1])
    H = store_slots.heads
    out = torch.zeros(B, Hq, 1, D, dtype=torch.float64)
    for b in range(B):
        for hq in range(Hq):
            i = b * H + hq // (Hq // H)
            o, n = int(store_slots.offsets[i]), int(store_slots.lengths[i])
            k, v = store_slots.k[o : o + n].double(), store_slots.v[o : o + n].double()
            logit = k @ query[b, hq, 0].double() * spec.scaling
            if spec.count_bias:
                logit = logit + store_slots.counts[o : o + n].double().log()
            out[b, hq, 0] = torch.softmax(logit, 0) @ v
    return out.transpose(1, 2)


@pytest.mark.parametrize("bits,sinks,rotated", [(2, 0, False), (2, 2, True), (4, 0, True), (2, 3, False)])
@pytest.mark.parametrize("min_live", [1, 8])
@pytest.mark.parametrize("backend", ["c", "torch"])
def test_a_round_keeps_the_codes_of_unchanged_rows(bits, sinks, rotated, min_live, backend):
    old = _old_store(bits, sinks, rotated)
    kept, same = _round(old)
    arranged = arrange(old, kept, min_live, backend=backend)
    assert arranged is not None
    new = RaggedPackedStore.from_ragged(arranged, bits, G, R, columns=True, rotation=old.rotation, sinks=sinks)
    # the slot counts are the round's: placeholders are not slots
    assert new.head_lengths() == kept.head_lengths()
    assert new._r0 == old._r0
    # every unchanged member of an old group with min_live of them kept its code row (and the
    # group its range); a group with two holes or more is always kept
    old_code, old_group = {}, {}
    for i, (o, n) in enumerate(zip(old.offsets.tolist(), old.lengths.tolist())):
        for row in range(o, o + n):
            key = (i, int(old.positions[row]))
            old_code.setdefault(key, old._kc[row])
            old_group.setdefault(key, row // G)
    members = {}
    for key, unchanged in same.items():
        if unchanged and key in old_group:
            members.setdefault(old_group[key], []).append(key)
    kept_codes = total = 0
    must_keep = [m for m in members.values() if len(m) >= min_live and G - len(m) >= 2]
    assert len(must_keep) >= 4, "the case must keep groups"
    new_code = {}
    for i, (o, n) in enumerate(zip(new.offsets.tolist(), new.lengths.tolist())):
        for row in range(o, o + n):
            if float(new.counts_bias[row]) >= 1e-30:
                new_code.setdefault((i, int(new.positions[row])), new._kc[row])
    for m in must_keep:
        for key in m:
            total += 1
            kept_codes += bool(torch.equal(new_code[key], old_code[key]))
    assert kept_codes == total
    # unpacked(): exactly the round's slots, unchanged ones at their old values, counts whole
    back = new.unpacked()
    assert back.head_lengths() == kept.head_lengths()
    u_old = old.unpacked()
    for i in range(kept.batch * kept.heads):
        o, n = int(kept.offsets[i]), int(kept.lengths[i])
        want = dict(zip(kept.positions[o : o + n].tolist(), kept.counts[o : o + n].tolist()))
        bo, bn = int(back.offsets[i]), int(back.lengths[i])
        got = dict(zip(back.positions[bo : bo + bn].tolist(), back.counts[bo : bo + bn].tolist()))
        assert got.keys() == want.keys()
        assert all(abs(got[p] - want[p]) <= 1e-6 * want[p] for p in want)
        uo, un = int(u_old.offsets[i]), int(u_old.lengths[i])
        before = {p: u_old.k[uo + j] for j, p in enumerate(u_old.positions[uo : uo + un].tolist())}
        for j, p in enumerate(back.positions[bo : bo + bn].tolist()):
            if any(same.get((i, p)) and (i, p) in mk for mk in must_keep):
                assert torch.allclose(back.k[bo + j], before[p], rtol=0, atol=1e-5)


def _one_row(store: RaggedStore, b: int) -> RaggedStore:
    """Batch row ``b`` of a RaggedStore as a store of its own, rebuilt from
    its left-padded dense copy (slots, positions, counts, carried scores)."""
    keys, values, pos, counts, scores, start = store.to_padded()
    H, M = store.heads, int(pos.shape[1])
    sl = slice(b * H, (b + 1) * H)
    valid = torch.arange(M)[None, :] >= start[sl][:, None]
    shape = (1, H, M)
    return RaggedStore.from_dense(keys[sl, 0].reshape(*shape, -1), values[sl, 0].reshape(*shape, -1),
                                  pos[sl].reshape(shape), valid.reshape(shape), counts=counts[sl].reshape(shape),
                                  scores=None if store.scores is None else scores[sl].reshape(shape))


@pytest.mark.parametrize("bits,sinks,rotated", [(2, 0, False), (2, 2, True), (4, 3, False)])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("backend", ["c", "torch"])
def test_a_batch_round_lays_each_row_out_as_alone(bits, sinks, rotated, seed, backend):
    """``arrange_rows``: a round of a batch whose rows keep their own
    residual (``from_ragged(rows_apart=True)``) lays each row out as
    ``arrange`` does for that row alone (its groups kept or not whatever
    the other row's are), so the batch packed again holds, row by row, bit
    for bit what each row alone holds after its own round: segments, codes,
    scales, counts, positions and its own residual."""
    rot = key_rotation(D, "cpu") if rotated else None
    kw = dict(columns=True, rotation=rot, sinks=sinks)
    slots = _old_slots(seed)
    old = RaggedPackedStore.from_ragged(slots, bits, G, R, rows_apart=True, **kw)
    # seed 0: both rows keep groups; 1, 2: one row loses most of its slots, so that no group of it keeps
    # enough members (alone: refused, packed afresh), while the other keeps its groups
    drop = [[0.1, 0.15], [0.1, 0.9], [0.9, 0.2]][seed]
    kept, _ = _round(old, seed=seed + 5, drop=drop)
    laid = arrange_rows(old, kept, 8, backend=backend)
    batch = RaggedPackedStore.from_ragged(kept if laid is None else laid, bits, G, R, rows_apart=True, **kw)
    kept_rows = []
    for b in range(kept.batch):
        old_b = RaggedPackedStore.from_ragged(_one_row(slots, b), bits, G, R, **kw)
        kept_b = _one_row(kept, b)
        laid_b = arrange(old_b, kept_b, 8, backend=backend)
        kept_rows.append(laid_b is not None)
        alone = RaggedPackedStore.from_ragged(kept_b if laid_b is None else laid_b, bits, G, R, **kw)
        assert batch._r0 == alone._r0 and batch._own_residual()[b] == alone.r, (b, batch, alone)
        for h in range(kept.heads):
            i, n = b * kept.heads + h, int(alone.lengths[h])
            o, o1 = int(batch.offsets[i]), int(alone.offsets[h])
            assert int(batch.lengths[i]) == n, (b, h)
            for name in ("_kc", "_vc", "_vmin", "_vsc", "positions", "counts_bias", "counts_plain"):
                assert torch.equal(getattr(batch, name)[o : o + n], getattr(alone, name)[o1 : o1 + n]), (name, b, h)
            for name in ("_kmin", "_ksc"):
                assert torch.equal(getattr(batch, name)[o // G : (o + n) // G],
                                   getattr(alone, name)[o1 // G : (o1 + n) // G]), (name, b, h)
        end = batch._r0 + batch.r
        assert torch.equal(batch._rk[b, :, end - alone.r : end], alone._rk[0, :, alone._r0 : alone._r0 + alone.r])
    assert any(kept_rows) == (laid is not None)
    assert kept_rows == [p < 0.5 for p in drop], kept_rows  # the cases are what they claim


@pytest.mark.parametrize("count_bias", [True, False])
@pytest.mark.parametrize("rotated", [False, True])
def test_placeholders_weigh_nothing_in_attention(count_bias, rotated):
    old = _old_store(2, 2, rotated, seed=4)
    kept, _ = _round(old, seed=5, drop=0.3)
    new = RaggedPackedStore.from_ragged(arrange(old, kept, 1), 2, G, R, columns=True, rotation=old.rotation,
                                        sinks=2)
    holes = int((new.counts_bias < 1e-30).sum())
    assert holes > 20 and f"(+{holes} placeholder rows)" in repr(new)
    query = torch.randn(2, 4, 1, D, generator=torch.Generator().manual_seed(6))
    spec = AttentionSpec(scaling=0.3, count_bias=count_bias)
    want = _reference(new.unpacked(), query, spec)  # the slots the store holds, dequantized
    got = new.attend(query, spec).double()  # the kernel, placeholders included
    assert (got - want).abs().max() < 2e-5
    # the padded path (two queries, causal: not the kernel's decode call) too
    q2 = torch.cat([query, query], 2)
    assert (new.attend(q2, spec).double()[:, 1:] - want).abs().max() < 2e-5  # the newest sees every slot
    # with weight, the placeholders would move the output: the comparison can fail
    heavy = RaggedPackedStore.from_ragged(arrange(old, kept, 1), 2, G, R, columns=True, rotation=old.rotation,
                                          sinks=2)
    heavy.counts_bias[heavy.counts_bias < 1e-30] = 1.0
    heavy.counts_plain[heavy.counts_plain < 1e-30] = 1.0
    assert (heavy.attend(query, spec).double() - want).abs().max() > 1e-3


def test_a_round_that_moves_the_sink_block_packs_everything_again():
    old = _old_store(2, 2, False)
    kept, _ = _round(old)
    # drop head 0's first sink: the block would move, so no arrangement
    o = int(kept.offsets[0])
    keep = torch.ones(int(kept.lengths[0]), dtype=torch.bool)
    keep[0] = False
    B, H = kept.batch, kept.heads
    parts = [kept.head(b, h) for b in range(B) for h in range(H)]
    counts = [kept.counts[int(kept.offsets[i]) : int(kept.offsets[i]) + int(kept.lengths[i])] for i in range(B * H)]
    parts[0] = tuple(t[keep] for t in parts[0])
    counts[0] = counts[0][keep]
    M = max(len(p[2]) for p in parts)
    keys, values = torch.zeros(B, H, M, D), torch.zeros(B, H, M, D)
    pos, cnt = torch.zeros(B, H, M, dtype=torch.int32), torch.ones(B, H, M)
    valid = torch.zeros(B, H, M, dtype=torch.bool)
    for i, ((k, v, p), c) in enumerate(zip(parts, counts)):
        n = len(p)
        keys[i // H, i % H, :n], values[i // H, i % H, :n], pos[i // H, i % H, :n] = k, v, p
        cnt[i // H, i % H, :n] = c
        valid[i // H, i % H, :n] = True
    assert o == 0 and arrange(old, RaggedStore.from_dense(keys, values, pos, valid, counts=cnt), 1) is None
    # no merge counts (not a merging method's round): no arrangement either
    plain = RaggedStore.from_dense(keys, values, pos, valid)
    assert arrange(old, plain, 1) is None


def test_keep_rows_option():
    assert kvc.KIVI(bits=2).keep_rows is None  # half a group
    assert "keep_rows" not in kvc.KIVI(bits=2).describe()
    assert (kvc.EMS(budget=64) + kvc.KIVI(bits=2, group=8)).round_keeps_rows == 4
    assert "keep_rows=0" in kvc.KIVI(bits=2, keep_rows=0).describe()
    with pytest.raises(ValueError, match="keep_rows"):
        kvc.KIVI(bits=2, keep_rows=-1)
    with pytest.raises(TypeError, match="keep_rows"):
        kvc.KIVI(bits=2, keep_rows=1.5)
    assert (kvc.EMS(budget=64) + kvc.KIVI(bits=2)).round_keeps_rows == 16
    assert (kvc.EMS(budget=64) + kvc.KIVI(bits=2, keep_rows=0)).round_keeps_rows == 0
    # only merging methods: their packed rows carry the counts placeholders need
    assert (kvc.SnapKV(budget=64) + kvc.KIVI(bits=2)).round_keeps_rows == 0
    assert (kvc.AdaKV(budget=64) + kvc.KIVI(bits=2)).round_keeps_rows == 0
    assert kvc.KIVI(bits=2).round_keeps_rows == 0
    # set where no round would read it: refused by name, not ignored
    with pytest.raises(ValueError, match="keep_rows: .*SnapKV does not merge"):
        kvc.SnapKV(budget=64) + kvc.KIVI(bits=2, keep_rows=8)
    assert (kvc.SnapKV(budget=64) + kvc.KIVI(bits=2, keep_rows=0)).round_keeps_rows == 0  # off is fine anywhere
    with pytest.raises(ValueError, match="keep_rows: LowBits packs once"):
        kvc.LowBits(bits=2, keep_rows=8)  # (MiKV and ZipCache have no such field)


@pytest.mark.slow
def test_rounds_of_a_generation_keep_their_groups(tiny_model, monkeypatch):
    """EMS + KIVI-2 on a real generation: at every round of every layer, a
    packed group that holds placeholders is an old group kept in place: its
    members all come from one old group, keep their key codes, and the group
    its range (min and scale); the layer's slot counts stay within the budget
    and interval. Rounds without this path (``keep_rows=0``) hold no such
    group, so the count below would be zero. A round dequantizes the old
    layer once: ``unpacked()`` and ``arrange`` read the same rows."""
    seen = {"rounds": 0, "kept groups": 0, "dequantized": 0}
    repack = CompressedLayer._repack_round
    dequantize = RaggedPackedStore._dequantized_rows

    def counted(self):
        seen["dequantized"] += 1
        return dequantize(self)

    def rows(store):
        for i, (o, n) in enumerate(zip(store.offsets.tolist(), store.lengths.tolist())):
            for row in range(o, o + n):
                yield i, row

    def spy(self, scaling, *args):
        old = self.store
        before = {}
        if isinstance(old, RaggedPackedStore):
            for i, row in rows(old):
                before.setdefault((i, int(old.positions[row])), (old._kc[row].clone(), row // G2))
            old_min, old_scale = old._kmin.clone(), old._ksc.clone()
        calls = seen["dequantized"]
        repack(self, scaling, *args)
        assert seen["dequantized"] - calls == isinstance(old, RaggedPackedStore)
        new = self.store
        seen["rounds"] += 1
        assert max(new.head_lengths()) <= 48 + 16  # budget + interval
        hole = new.counts_bias < 1e-30
        for i, (o, n) in enumerate(zip(new.offsets.tolist(), new.lengths.tolist())):
            for g0 in range(o, o + n, G2):
                if not bool(hole[g0 : g0 + G2].any()):
                    continue
                members = [r for r in range(g0, g0 + G2) if not bool(hole[r])]
                was = [before[(i, int(new.positions[r]))] for r in members]
                assert len({g for _, g in was}) == 1
                assert all(torch.equal(new._kc[r], code) for r, (code, _) in zip(members, was))
                g = was[0][1]
                assert torch.allclose(new._kmin[g0 // G2], old_min[g], rtol=1e-6, atol=1e-6)
                assert torch.allclose(new._ksc[g0 // G2], old_scale[g], rtol=1e-5, atol=1e-7)
                seen["kept groups"] += 1

    G2 = 16
    monkeypatch.setattr(CompressedLayer, "_repack_round", spy)
    monkeypatch.setattr(RaggedPackedStore, "_dequantized_rows", counted)
    method = kvc.EMS(budget=48) + kvc.KIVI(bits=2, group=G2, residual=16, keep_rows=8)
    ids = torch.randint(3, 512, (1, 200), generator=torch.Generator().manual_seed(7))
    with kvc.compress(tiny_model, method):
        tiny_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=96,
                            min_new_tokens=96, do_sample=False, pad_token_id=0)
    assert seen["rounds"] >= 20
    assert seen["kept groups"] >= 10, seen


def _same_store(a: RaggedStore, b: RaggedStore) -> None:
    """Every buffer of two ragged stores equal bit for bit (NaN where NaN)."""
    for name in ("k", "v", "offsets", "lengths", "caps", "positions", "counts", "scores", "_host_lengths",
                 "_host_caps"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is None:
            continue
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x.view(torch.int16) if x.dtype == torch.bfloat16 else x,
                           y.view(torch.int16) if y.dtype == torch.bfloat16 else y) or (
            x.is_floating_point() and bool(((x == y) | (x.isnan() & y.isnan())).all())), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,sinks,rotated", [(2, 0, False), (2, 2, True), (4, 3, False), (8, 0, True)])
def test_the_c_plan_lays_out_what_the_torch_plan_does(bits, sinks, rotated, dtype):
    """``ops.keep_rows_plan`` (the CPU path) against the tensor-operation
    plan (every other device), over rounds that drop, merge and keep in
    different shares and every ``min_live``: the same layout bit for bit, or
    both refused."""
    laid = refused = 0
    for seed in range(3):
        old = _old_store(bits, sinks, rotated, seed=seed, dtype=dtype)
        for drop, merge in ((0.15, 0.05), (0.02, 0.0), (0.4, 0.2)):
            kept, _ = _round(old, seed=seed + 10, drop=drop, merge=merge)
            rows = old._dequantized_rows()
            for min_live in (0, 1, 8, G - 1, G):
                a = arrange(old, kept, min_live, rows, backend="c")
                b = arrange(old, kept, min_live, rows, backend="torch")
                assert (a is None) == (b is None), (seed, drop, min_live)
                if a is None:
                    refused += 1
                    continue
                laid += 1
                _same_store(a, b)
    assert laid >= 30 and refused >= 1, (laid, refused)


def test_keep_rows_plan_checks_its_arguments():
    old = _old_store(2, 0, False)
    kept, _ = _round(old)
    kd, vd = old._dequantized_rows()
    D_ = int(kept.k.shape[1])
    args = dict(o_offsets=old.offsets, o_lengths=old.lengths, o_pos=old.positions, o_counts_bias=old.counts_bias,
                o_counts_plain=old.counts_plain, o_keys=kd, o_values=vd, o_min=old._kmin.view(-1, D_),
                o_step=old._ksc.view(-1, D_), n_offsets=kept.offsets, n_lengths=kept.lengths, n_pos=kept.positions,
                n_counts=kept.counts, n_keys=kept.k, n_values=kept.v, n_grid=kept.k.float())
    opts = dict(group=G, bits=2, min_live=1, sinks=0, sinks_asked=0, residual=R, slack=4)

    def plan(**change):
        a = dict(args)
        o = dict(opts)
        for k, v in change.items():
            (o if k in o else a)[k] = v
        return ops.keep_rows_plan(*a.values(), **o)

    good = plan()
    assert good is not None and int(good.lengths.sum()) == int(good.dst.shape[0])
    bad_len = old.lengths.clone()
    bad_len[1] = int(old._kc.shape[0])
    with pytest.raises(ValueError, match="o_lengths: value .* runs past the buffer"):
        plan(o_lengths=bad_len)
    bad_off = kept.offsets.clone()
    bad_off[0] = -1
    with pytest.raises(ValueError, match="n_offsets: value -1 at 0 is outside"):
        plan(n_offsets=bad_off)
    twice = kept.lengths.clone()
    twice[:] = int(kept.k.shape[0]) // 2 + 1
    with pytest.raises(ValueError, match="n_lengths: the segments hold"):
        plan(n_offsets=torch.zeros_like(kept.offsets), n_lengths=twice)
    with pytest.raises(ValueError, match="o_min: .* key groups of 8 rows"):
        plan(group=8)
    with pytest.raises(TypeError, match="n_keys: expected dtype"):
        plan(n_keys=kept.k.double())
    with pytest.raises(TypeError, match="n_values"):
        plan(n_values=kept.v.bfloat16())  # the keys' dtype
    with pytest.raises(ValueError, match="bits"):
        plan(bits=9)
    with pytest.raises(ValueError, match="backend: expected"):
        arrange(old, kept, 1, backend="cuda")


def test_keep_rows_plan_survives_any_layout():
    """Segments in any order and overlapping, repeated and negative
    positions, merge counts of every kind: a plan or a refusal, its rows
    inside the new buffers, and the interpreter alive."""
    g = torch.Generator().manual_seed(5)
    old = _old_store(2, 0, False)
    kept, _ = _round(old)
    kd, vd = old._dequantized_rows()
    Ro, Rn = int(kd.shape[0]), int(kept.k.shape[0])
    for trial in range(60):
        N = int(old.offsets.shape[0])
        o_len = torch.randint(0, Ro // N + 1, (N,), generator=g)
        o_off = torch.stack([torch.randint(0, Ro - int(n) + 1, (1,), generator=g)[0] for n in o_len])
        n_len = torch.randint(0, Rn // N + 1, (N,), generator=g)
        n_off = torch.stack([torch.randint(0, Rn - int(n) + 1, (1,), generator=g)[0] for n in n_len])
        o_pos = torch.randint(-3, 40, (Ro,), generator=g, dtype=torch.int32)
        n_pos = torch.randint(-3, 40, (Rn,), generator=g, dtype=torch.int32)
        counts = torch.randint(1, 3, (Rn,), generator=g).float()
        p = ops.keep_rows_plan(o_off, o_len, o_pos, old.counts_bias, old.counts_plain, kd, vd,
                               old._kmin.view(-1, D), old._ksc.view(-1, D), n_off, n_len, n_pos, counts,
                               kept.k, kept.v, kept.k, group=G, bits=2, min_live=trial % 3, sinks=trial % 2,
                               sinks_asked=trial % 4, residual=trial % 9, slack=trial % 5)
        if p is None:
            continue
        S, M = int(p.take.shape[0]), int(p.dst.shape[0])
        assert S == int(n_len.sum()) and int(p.lengths.sum()) == M
        assert bool((p.take >= 0).all()) and bool((p.take < Rn).all())
        rows = M + N * (trial % 5)
        assert bool((p.dst >= 0).all()) and bool((p.dst < rows).all()) and p.dst.unique().numel() == M


@pytest.mark.slow
def test_a_generation_with_the_c_plan_is_the_torch_plans(tiny_model, monkeypatch):
    """EMS + KIVI-2 with every option that touches the layout (rotation,
    sinks, feedback), left-padded batch of two: the logits of every step are
    the same bit for bit whichever plan lays the rounds out."""

    import kvcompress.cache as cache_mod

    method = kvc.EMS(budget=48) + kvc.KIVI(bits=2, group=16, residual=16, keep_rows=8, rotate=True, sinks=2,
                                            feedback=True)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 512, (2, 160), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :30], mask[1, :30] = 0, 0
    calls = {"c": 0, "torch": 0}

    def run(backend):
        def counted(*a, **k):
            out = arrange_rows(*a, **k, backend=backend)
            calls[backend] += out is not None
            return out

        monkeypatch.setattr(cache_mod, "arrange_rows", counted)
        with kvc.compress(tiny_model, method):
            out = tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64, min_new_tokens=64,
                                      do_sample=False, pad_token_id=0, output_scores=True,
                                      return_dict_in_generate=True)
        return out.sequences, torch.stack(out.scores)

    # one torch thread: with two, MKL's matmuls may round differently as the
    # allocator's layout shifts between two generations (on tiny Gemma 2, 2-6 of
    # 40 first compressed forwards differed from the next; 0 of 40 on one
    # thread or with MKL_CBWR=COMPATIBLE), which is not what this compares
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seq_c, scores_c = run("c")
        seq_t, scores_t = run("torch")
    finally:
        torch.set_num_threads(threads)
    assert calls["c"] >= 6 and calls["c"] == calls["torch"], calls  # rounds laid out, not refused
    assert torch.equal(seq_c, seq_t)
    assert torch.equal(scores_c, scores_t)
