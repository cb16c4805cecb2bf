"""Key feedback: ``ops.pack_keys(feedback=...)`` against a NumPy reference
written here from its contract, the weights of ``stores.feedback`` against
float64 linear algebra, and ``KIVI(feedback=True)`` in a cache: the weights
come from the real prompt queries, every packed group is the reference's,
and the kernels read it as the eager path does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kvcompress as kvc
from kvcompress import ops
from kvcompress.errors import KVCompressTypeError, KVCompressValueError
from kvcompress.methods import KIVI
from kvcompress.stores import PackedStore, RaggedPackedStore
from kvcompress.stores.feedback import QueryMoments, compact, expand, feedback_weights
from kvcompress.stores.rotation import rotate as rotated_keys

from test_quant import f32, randn, same_bits
from test_sinks import assert_same_generation, generate_padded

LIM = np.float64(np.finfo(np.float32).max) / 2


@pytest.fixture(autouse=True)
def _restore_threads():
    n = ops.get_num_threads()
    yield
    ops.set_num_threads(n)


def ref_feedback_pack(x, w, bits, G, index=None):
    """(codes as [B, H, n, D] uint8 before bit packing, mins, scales,
    adjusted values) of the feedback contract, step by step: per group and
    channel, min/max of the values after the earlier channels' updates,
    scale and code in float32, the error against the dequantized value, and
    x[j, c'] = x - e * w rounded once to float32 (the op's fmaf), clamped to
    FLT_MAX / 2. Here the product is exact in float64 and the difference is
    rounded to float64, then to float32: the same as one rounding except at
    a double-rounding tie (about 2^-29 of updates), which these seeded
    inputs do not meet."""
    x = f32(x).copy()
    w = f32(w)
    B, H, n, D = x.shape
    L = np.float32(2**bits - 1)
    T = -(-n // G)
    codes = np.zeros((B, H, n, D), np.uint8)
    mins = np.zeros((B, H, T, D), np.float32)
    scales = np.zeros((B, H, T, D), np.float32)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                f = h if index is None else int(index[b, h, t])
                rows = x[b, h, t * G : min(n, (t + 1) * G)]  # a view: updates land in x
                for c in range(D):
                    mn = np.float32(rows[:, c].min() + np.float32(0))
                    mx = rows[:, c].max()
                    sc = np.float32(0) if mx == mn else np.float32((mx - mn) / L)
                    mins[b, h, t, c], scales[b, h, t, c] = mn, sc
                    for j in range(rows.shape[0]):
                        if sc > 0:
                            q = np.float32(np.rint(np.float32(rows[j, c] - mn) / sc))
                            q = np.float32(min(max(q, 0), L))
                        else:
                            q = np.float32(0)
                        codes[b, h, t * G + j, c] = np.uint8(q)
                        deq = np.float32(np.float64(mn) + np.float64(sc) * np.float64(q))
                        e = np.float32(rows[j, c] - deq)
                        for c2 in range(c + 1, D):
                            r = np.float64(rows[j, c2]) - np.float64(e) * np.float64(w[f, c, c2])
                            rows[j, c2] = np.float32(min(max(r, -LIM), LIM))
    return codes, mins, scales, x


def unpacked_codes(packed, bits, D):
    """The per-element codes of a packed [B, H, n, Db] uint8 tensor."""
    c = packed.codes.numpy().astype(np.uint32)
    per = 8 // bits
    out = np.stack([(c >> (i * bits)) & (2**bits - 1) for i in range(per)], -1)
    return out.reshape(*c.shape[:3], -1)[..., :D].astype(np.uint8)


def _weights(H, D, seed=1, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return torch.triu(torch.randn(H, D, D, generator=g) * scale, diagonal=1)


SHAPES = [(1, 1, 5, 3, 4), (2, 3, 13, 7, 4), (1, 2, 70, 16, 32), (2, 2, 9, 8, 1), (1, 2, 5, 12, 32)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}n{}D{}G{}".format(*s))
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_feedback_pack_matches_the_reference_bit_for_bit(shape, bits, dtype):
    """Codes, mins and scales equal the contract's, step by step; unpacking
    is within scale / 2 of the adjusted values (the usual round-trip bound,
    for the values each channel was rounded from)."""
    B, H, n, D, G = shape
    x = randn((B, H, n, D), dtype, seed=sum(shape) + bits)
    w = _weights(H, D, seed=bits)
    got = ops.pack_keys(x, bits, G, feedback=w)
    codes, mins, scales, adj = ref_feedback_pack(x, w.numpy(), bits, G)
    assert np.array_equal(unpacked_codes(got, bits, D), codes)
    assert same_bits(got.mins, torch.from_numpy(mins)) and same_bits(got.scales, torch.from_numpy(scales))
    back = f32(ops.unpack_keys(*got, bits, G)).astype(np.float64)
    sc = np.repeat(scales.astype(np.float64), G, axis=2)[:, :, :n]
    assert (np.abs(back - adj) <= sc / 2 + 1e-6 * (np.abs(adj) + 1)).all()


def test_zero_weights_give_kivis_codes_and_the_index_picks_each_groups_factor():
    """w = 0 is plain KIVI, bit for bit; with ``feedback_index`` each group
    takes its own factor, as packing it alone with that factor does."""
    x = randn((2, 2, 40, 8), seed=3)
    plain = ops.pack_keys(x, 2, 8)
    zero = ops.pack_keys(x, 2, 8, feedback=torch.zeros(2, 8, 8))
    assert all(torch.equal(a, b) for a, b in zip(plain, zero))
    w = _weights(3, 8, seed=4)
    index = torch.tensor([[[0, 2, 1, 0, 2], [1, 1, 0, 2, 2]], [[2, 0, 0, 1, 1], [0, 1, 2, 0, 1]]])
    got = ops.pack_keys(x, 2, 8, feedback=w, feedback_index=index)
    for b in range(2):
        for h in range(2):
            for t in range(5):
                alone = ops.pack_keys(x[b : b + 1, h : h + 1, 8 * t : 8 * t + 8], 2, 8,
                                      feedback=w[int(index[b, h, t])][None])
                assert torch.equal(got.codes[b, h, 8 * t : 8 * t + 8], alone.codes[0, 0])
                assert torch.equal(got.mins[b, h, t], alone.mins[0, 0, 0])


def test_any_thread_count_gives_the_same_bits():
    x = randn((2, 3, 100, 24), seed=5)
    w = _weights(3, 24, seed=6)
    ops.set_num_threads(1)
    one = ops.pack_keys(x, 2, 16, feedback=w)
    ops.set_num_threads(2)
    two = ops.pack_keys(x, 2, 16, feedback=w)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_huge_weights_stay_in_range():
    """Weights that would carry an error past FLT_MAX are clamped to the
    range pack accepts: every min and scale stays finite."""
    x = randn((1, 1, 8, 6), seed=7) * 1e30
    w = torch.triu(torch.full((1, 6, 6), 3e38), diagonal=1)
    got = ops.pack_keys(x, 2, 4, feedback=w)
    assert bool(torch.isfinite(got.mins).all()) and bool(torch.isfinite(got.scales).all())
    _, mins, scales, _ = ref_feedback_pack(x, w.numpy(), 2, 4)
    assert same_bits(got.mins, torch.from_numpy(mins)) and same_bits(got.scales, torch.from_numpy(scales))


def test_the_logit_error_falls_for_the_queries_the_weights_come_from():
    """On keys and queries with a dominant shared direction (as real queries
    have), the weights of the queries' moment lower their mean squared
    logit error q . (k - k^) well below KIVI's rounding, in float64, while
    each key's own error rises (what is traded)."""
    g = torch.Generator().manual_seed(8)
    D, n, Hk = 32, 512, 2
    basis = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    spread = torch.logspace(1, -1.5, D, dtype=torch.float64)
    q = (torch.randn(Hk, 4 * n, D, generator=g, dtype=torch.float64) * spread) @ basis.T
    k = torch.randn(1, Hk, n, D, generator=g, dtype=torch.float64) @ basis.T * 2
    m = torch.stack([q[h].T @ q[h] / q.shape[1] for h in range(Hk)])
    w = feedback_weights(m)
    k32 = k.float()
    for bits in (2, 4):
        plain = ops.unpack_keys(*ops.pack_keys(k32, bits, 32), bits, 32).double()
        fb = ops.unpack_keys(*ops.pack_keys(k32, bits, 32, feedback=w), bits, 32).double()
        test_q = (torch.randn(Hk, n, D, generator=g, dtype=torch.float64) * spread) @ basis.T  # unseen queries
        err = lambda kh: float(((kh - k)[0] @ test_q.transpose(1, 2)).pow(2).mean())  # noqa: E731
        assert err(fb) < 0.5 * err(plain), (bits, err(fb), err(plain))
        assert float((fb - k).pow(2).mean()) > float((plain - k).pow(2).mean())


def test_feedback_weights_are_the_normalised_cholesky_factor_of_the_damped_inverse():
    """w = U / diag(U) above the diagonal, for U the upper factor with U^T U
    = (M + 0.01 mean(diag M) I)^-1 (NumPy, float64); an all-zero moment gives
    w = 0."""
    g = torch.Generator().manual_seed(9)
    a = torch.randn(3, 40, 16, generator=g, dtype=torch.float64)
    m = a.transpose(1, 2) @ a / 40
    w = feedback_weights(m).double()
    for h in range(3):
        damped = m[h] + 0.01 * torch.diagonal(m[h]).mean() * torch.eye(16, dtype=torch.float64)
        inv = np.linalg.inv(damped.numpy())
        u = np.linalg.cholesky(inv).T  # upper, u.T @ u = inv (NumPy's factorisation)
        assert np.allclose(np.triu(u / np.diag(u)[:, None], 1), w[h].numpy(), atol=1e-5)
        assert np.allclose(u.T @ u, inv, rtol=1e-9, atol=1e-9)
    assert torch.equal(feedback_weights(torch.zeros(2, 8, 8)), torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match=r"moment: expected \[H, D, D\], got \(8, 8\)"):
        feedback_weights(torch.eye(8))


def test_the_compact_triangle_holds_the_strict_upper_part_in_bfloat16():
    w = _weights(3, 10, seed=13) + torch.tril(torch.ones(10, 10))  # the lower part is not kept
    tri = compact(w)
    assert tri.dtype == torch.bfloat16 and tuple(tri.shape) == (3, 45)
    assert torch.equal(expand(tri, 10), torch.triu(w, 1).to(torch.bfloat16).float())


def test_query_moments_leave_padding_out_and_pool_each_kv_heads_queries():
    """The moment per kv head pools its query heads (GQA) over the real
    positions only, counted over calls."""
    g = torch.Generator().manual_seed(10)
    q1 = torch.randn(2, 4, 6, 8, generator=g)
    q2 = torch.randn(2, 4, 1, 8, generator=g)
    mom = QueryMoments(2)
    mom.add(q1, [0, 4])
    mom.add(q2, None)
    assert "queries=" in repr(mom) and mom.count == (6 + 2 + 2) * 2
    for h in range(2):
        rows = [q1[0, 2 * h : 2 * h + 2].reshape(-1, 8), q1[1, 2 * h : 2 * h + 2, 4:].reshape(-1, 8),
                q2[:, 2 * h : 2 * h + 2].reshape(-1, 8)]
        x = torch.cat(rows).double()
        assert torch.allclose(mom.sum[h], x.T @ x, atol=1e-10)
    with pytest.raises(ValueError, match="kv heads"):
        mom.add(torch.randn(1, 3, 2, 8), None)


BAD = [
    (dict(feedback=torch.zeros(3, 8, 8)), KVCompressValueError, "feedback: expected one factor per head"),
    (dict(feedback=torch.zeros(2, 8, 7)), KVCompressValueError, r"feedback: expected \[F, D, D\]"),
    (dict(feedback=torch.zeros(2, 8, 8, dtype=torch.float64)), KVCompressTypeError, "feedback: expected dtype"),
    (dict(feedback_index=torch.zeros(1, 2, 3, dtype=torch.int64)), KVCompressValueError,
     "feedback_index: given without feedback"),
    (dict(feedback=torch.zeros(2, 8, 8), feedback_index=torch.full((1, 2, 3), 2)), KVCompressValueError,
     r"feedback_index: value 2 at \[0, 0, 0\] is outside \[0, F\)"),
    (dict(feedback=torch.zeros(2, 8, 8), feedback_index=torch.zeros(1, 2, 2, dtype=torch.int64)),
     KVCompressValueError, "feedback_index"),
    (dict(feedback=torch.full((2, 8, 8), float("inf"))), KVCompressValueError,
     r"feedback: element \[0, 0, 0\] is inf; the weights must be finite"),
]


@pytest.mark.parametrize("kw,exc,match", BAD, ids=range(len(BAD)))
def test_bad_feedback_arguments_are_named_and_write_nothing(kw, exc, match):
    x = randn((1, 2, 20, 8), seed=11)
    codes = torch.full((1, 2, 20, 2), 7, dtype=torch.uint8)
    with pytest.raises(exc, match=match):
        ops.pack_keys(x, 2, 8, codes=codes, **kw)
    assert bool((codes == 7).all())


def test_values_take_no_feedback():
    from kvcompress import _C

    x = randn((1, 1, 4, 8), seed=12)
    out = [torch.empty(1, 1, 4, 2, dtype=torch.uint8), torch.empty(1, 1, 4, 1), torch.empty(1, 1, 4, 1)]
    with pytest.raises(KVCompressValueError, match="feedback: values take no feedback"):
        _C.pack(x, *out, True, 2, 8, torch.zeros(1, 8, 8), None, False)


def test_the_option_is_checked_and_refused_where_unsupported():
    assert "feedback=True" in repr(KIVI(bits=2, feedback=True))
    with pytest.raises(TypeError, match="feedback: expected True or False"):
        KIVI(feedback=1)
    with pytest.raises(ValueError, match="feedback: LowBits"):
        kvc.methods.LowBits(bits=2, feedback=True)
    with pytest.raises(ValueError, match="without feedback"):
        kvc.MiniCache() + KIVI(bits=2, feedback=True)


# ---------------------------------------------------------------- in a cache


def _spy_queries(monkeypatch):
    """Per layer, each call's ``(queries, pads, seen after it, packed slots
    per row after it)`` while the layer gathers its moment (the last entry
    is filled in by the ``_settle`` spy)."""
    from kvcompress.cache import CompressedLayer

    seen = {}
    real, settle = CompressedLayer._gather_feedback, CompressedLayer._settle

    def spy(self, queries):
        if queries is not None and not self._feedback_decided:
            seen.setdefault(self.layer_idx, []).append([queries.detach().clone(), list(self._pad), self.seen, None])
        return real(self, queries)

    def spy_settle(self, queries, scaling):
        out = settle(self, queries, scaling)
        calls = seen.get(self.layer_idx)
        if calls and calls[-1][3] is None:
            s = self.store
            calls[-1][3] = list(s._np) if s._np is not None else [s.n_packed] * s.batch
        return out

    monkeypatch.setattr(CompressedLayer, "_gather_feedback", spy)
    monkeypatch.setattr(CompressedLayer, "_settle", spy_settle)
    return seen


@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "rotated"])
def test_a_layer_packs_with_the_weights_of_its_prompts_real_queries(tiny_lm, rotate, monkeypatch):
    """On a left-padded batch each row's weights (row mode: each row packs,
    and chooses, on its own) are ``feedback_weights`` of the float64 moment
    of that row's real queries up to its own first pack, in the rotated
    basis when rotated; and each row's packed keys are the reference
    packing of its real tokens' keys in the full cache with those weights,
    bit for bit."""
    from transformers import DynamicCache

    from kvcompress.stores.rotation import key_rotation
    from kvcompress.compat import cache_kwargs

    model, tok, _ = tiny_lm
    seen = _spy_queries(monkeypatch)
    method = KIVI(bits=2, group=8, residual=8, rotate=rotate, feedback=True)
    out, cache = generate_padded(model, tok, method)
    from test_sinks import _padded_batch

    ids, mask = _padded_batch()
    full = DynamicCache()
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
              **cache_kwargs(model, full))
    T = int(ids.shape[1])
    for i, layer in enumerate(cache.layers):
        s = layer.store
        assert isinstance(s, PackedStore) and s._np is not None and "key feedback in rows [0, 1]" in repr(s), s
        H, D = s.heads, int(s._rk.shape[-1])
        rot = key_rotation(D, "cpu").double() if rotate else None
        for b, pad in enumerate((0, 25)):
            rotated, tri, _ = s.row_choice(b)
            assert rotated == rotate and tri is not None and any(t is tri for t in s.tensors()), (i, b)
            sums, count = torch.zeros(H, D, D, dtype=torch.float64), 0
            for q, pads, after, packed in seen[i]:
                n, g = int(q.shape[2]), q.shape[1] // H
                first = max(0, (pads[b] if pads else 0) - (after - n))
                for h in range(H):
                    x = q[b, h * g : (h + 1) * g, first:].reshape(-1, D).double()
                    sums[h] += x.T @ x
                count += (n - first) * g
                if packed[b]:
                    break  # the row's first pack: its weights are fixed just before it
            else:
                raise AssertionError(f"layer {i} row {b} never packed")
            m = sums / count
            if rot is not None:
                m = rot.T @ m @ rot
            # held as a bfloat16 triangle: the reference's, rounded alike (a last-bit tie may round apart)
            w = expand(tri, D)
            assert torch.allclose(w, expand(compact(feedback_weights(m)), D), rtol=2**-7, atol=1e-6), (i, b)
            # the packed groups of the row's prompt tokens from the full cache's
            # keys: row 1's groups start after its 25 padded slots
            m = min(s._np[b], (T - pad) // 8 * 8)
            assert m > 0, (i, b)
            keys = full.layers[i].keys[b : b + 1, :, pad : pad + m]
            if rot is not None:
                keys = rotated_keys(keys, key_rotation(D, "cpu"))  # as the store rotates them
            codes, _, _, _ = ref_feedback_pack(keys, w.numpy(), 2, 8)
            got = unpacked_codes(ops.Packed(s._kc[b : b + 1, :, :m], s._kmin[b : b + 1], s._ksc[b : b + 1]), 2, D)
            assert np.array_equal(got, codes), (i, b)
        # the rows' weights differ: each comes from its own queries
        assert not torch.equal(s.row_choice(0)[1], s.row_choice(1)[1]), i


def test_a_per_head_store_rounds_each_heads_groups_with_its_kv_heads_weights():
    """``RaggedPackedStore.from_ragged(feedback=...)``: every head's segment
    (its kept keys, the last repeated to whole groups) holds the codes and
    ranges of packing that segment alone with its kv head's weights."""
    from test_sinks_heads import G as G8, _ragged

    lengths = [40, 23, 9, 57, 16, 33]  # two rows of three kv heads
    ragged, keys, _, _ = _ragged(lengths, heads=3)
    D = int(keys.shape[-1])
    w = _weights(3, D, seed=14, scale=0.6)
    tri = compact(w)
    store = RaggedPackedStore.from_ragged(ragged, 2, G8, 0, feedback=tri)
    assert store.feedback is tri and "key feedback" in repr(store)
    for i, n in enumerate(lengths):
        b, h = divmod(i, 3)
        m = -(-n // G8) * G8
        seg = torch.cat([keys[b, h, :n], keys[b, h, n - 1 : n].expand(m - n, D)])
        want = ops.pack_keys(seg.view(1, 1, m, D), 2, G8, feedback=expand(tri, D)[h : h + 1].contiguous())
        o = int(store.offsets[i])
        assert torch.equal(store._kc[o : o + m], want.codes[0, 0]), i
        assert torch.equal(store._kmin[o // G8 : (o + m) // G8], want.mins[0, 0]), i
        other = ops.pack_keys(seg.view(1, 1, m, D), 2, G8, feedback=expand(tri, D)[(h + 1) % 3][None].contiguous())
        assert not torch.equal(other.codes, want.codes), i  # the weights matter: a wrong head would show


MAKERS = {
    "kivi2": lambda: KIVI(bits=2, group=8, residual=8, feedback=True),
    "kivi2-auto-sinks": lambda: KIVI(bits=2, group=8, residual=8, rotate="auto", sinks=4, feedback=True),
    "ems+kivi2-rotated": lambda: kvc.EMS(budget=48) + KIVI(bits=2, group=8, residual=8, rotate=True,
                                                               feedback=True),
    "snapkv+kivi4": lambda: kvc.SnapKV(budget=48) + KIVI(bits=4, group=8, residual=8, feedback=True),
}


@pytest.mark.parametrize("make", MAKERS.values(), ids=list(MAKERS))
def test_kernel_generation_equals_the_eager_path(tiny_lm, make, monkeypatch):
    """Generation through the kernels gives the eager path's logits over the
    same packed slots, and every layer (per-head ones included, through
    their re-packs) holds the feedback weights."""
    import kvcompress.stores.packed as packed_store
    import kvcompress.stores.packed_ragged as ragged_store

    model, tok, _ = tiny_lm
    out, cache = generate_padded(model, tok, make())
    for layer in cache.layers:
        s = layer.store
        assert isinstance(s, (PackedStore, RaggedPackedStore)), s
        if isinstance(s, PackedStore) and s._choices is not None:
            # row mode: each row's own weights
            assert all(s.row_choice(b)[1] is not None for b in range(s.batch)), s
        else:
            assert s.feedback is not None and s.feedback is layer._feedback, s
    monkeypatch.setattr(packed_store, "kernel_reads", lambda query, residual: False)
    monkeypatch.setattr(ragged_store, "kernel_reads", lambda query, residual: False)
    assert_same_generation(out, generate_padded(model, tok, make())[0])
