"""ops.global_scores (EMS global score) against a float64 reference that
materialises the attention matrix.

Error bound as in test_ops.py: the C op's max abs error against float64 is at
most 2x the error of the same computation done by torch in the input dtype,
plus an absolute floor of 1e-6 (scaled by the output magnitude above 1).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvcompress import KVCompressTypeError, KVCompressValueError, ops
from reference import as_torch
from test_ops import DTYPE_IDS, DTYPES, assert_within_bound, make


def global_scores_ref(queries, keys, *, scaling=None, gqa="mean", kv_start=None, q_pos=None, dtype=torch.float64):
    """The definition, literally: A = masked softmax, column sums over the
    queries that see each key, divided by how many there are."""
    q = as_torch(queries).to(dtype)
    k = as_torch(keys).to(dtype)
    B, Hq, Tq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    g = Hq // Hkv if Hkv else 1
    if scaling is None:
        scaling = 1.0 / math.sqrt(D) if D else 1.0
    pos = torch.arange(T - Tq, T) if q_pos is None else as_torch(q_pos).to(torch.int64)
    start = torch.zeros(B, dtype=torch.int64) if kv_start is None else as_torch(kv_start).to(torch.int64)
    logits = (q @ k.repeat_interleave(g, dim=1).transpose(-1, -2)) * scaling  # [B, Hq, Tq, T]
    j = torch.arange(T)
    allowed = (j[None, None, :] <= pos[None, :, None]) & (j[None, None, :] >= start[:, None, None])  # [B, Tq, T]
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    attn = torch.where(allowed[:, None], torch.softmax(logits, dim=-1), torch.zeros((), dtype=dtype))
    colsum = attn.sum(dim=2)  # [B, Hq, T]
    count = allowed.sum(dim=1).to(dtype)  # [B, T]: valid queries that see key j
    per_head = torch.where(count[:, None] > 0, colsum / count.clamp(min=1)[:, None], torch.zeros((), dtype=dtype))
    grouped = per_head.reshape(B, Hkv, g, T)
    return grouped.mean(dim=2) if gqa == "mean" else grouped.amax(dim=2)


SHAPES = [(2, 1, 64), (2, 7, 40), (2, 33, 17), (1, 130, 64), (2, 257, 24)]  # (B, T, D)
RATIOS = [(2, 2), (6, 2), (8, 2)]  # (Hq, Hkv): GQA 1, 3, 4


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}D{}".format(*s))
@pytest.mark.parametrize("heads", RATIOS, ids=lambda h: f"g{h[0] // h[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_exact_matches_reference(shape, heads, dtype):
    B, T, D = shape
    Hq, Hkv = heads
    q = make((B, Hq, T, D), dtype, "transposed", seed=1)  # HF queries are transposed views
    k = make((B, Hkv, T, D), dtype, "contig", seed=2) * 2
    got = ops.global_scores(q, k)
    assert got.dtype == torch.float32 and tuple(got.shape) == (B, Hkv, T)
    ref = global_scores_ref(q, k)
    assert_within_bound(got, ref, global_scores_ref(q, k, dtype=dtype), f"{shape} {heads} {dtype}")


@pytest.mark.parametrize("gqa", ["mean", "max"])
@pytest.mark.parametrize("layout", ["contig", "transposed", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_padding_gqa_layouts(gqa, layout, dtype):
    B, Hq, Hkv, T, D = 4, 6, 2, 41, 24
    q = make((B, Hq, T, D), dtype, layout, seed=3)
    k = make((B, Hkv, T, D), dtype, layout, seed=4)
    kv_start = torch.tensor([0, 5, 40, 41])  # one valid key; all padding
    got = ops.global_scores(q, k, gqa=gqa, kv_start=kv_start, scaling=0.3)
    ref = global_scores_ref(q, k, gqa=gqa, kv_start=kv_start, scaling=0.3)
    same = global_scores_ref(q, k, gqa=gqa, kv_start=kv_start, scaling=0.3, dtype=dtype)
    assert_within_bound(got, ref, same, f"{gqa} {layout}")
    assert (got[1, :, :5] == 0).all() and (got[2, :, :40] == 0).all() and (got[3] == 0).all()
    assert torch.equal(got[2, :, 40], torch.ones(Hkv))  # the only key: attention 1 from its only query


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_query_subsets(dtype):
    B, Hq, Hkv, T, D = 2, 6, 2, 300, 32
    q_all = make((B, Hq, T, D), dtype, seed=5)
    k = make((B, Hkv, T, D), dtype, seed=6) * 2
    kv_start = torch.tensor([0, 30])
    g = torch.Generator().manual_seed(7)
    # arbitrary increasing positions, some of them in row 1's padding
    pos = torch.sort(torch.randperm(T - 20, generator=g)[:50]).values
    got = ops.global_scores(q_all[:, :, pos], k, q_pos=pos, kv_start=kv_start)
    ref = global_scores_ref(q_all[:, :, pos], k, q_pos=pos, kv_start=kv_start)
    same = global_scores_ref(q_all[:, :, pos], k, q_pos=pos, kv_start=kv_start, dtype=dtype)
    assert_within_bound(got, ref, same, "random q_pos")
    assert (got[:, :, int(pos[-1]) + 1 :] == 0).all()  # keys no query sees
    # default positions: the last Tq; a list works as q_pos too
    tail = q_all[:, :, -40:]
    got = ops.global_scores(tail, k)
    assert torch.equal(got, ops.global_scores(tail, k, q_pos=list(range(T - 40, T))))
    assert_within_bound(got, global_scores_ref(tail, k), global_scores_ref(tail, k, dtype=dtype), "last Tq")


def test_probe():
    B, Hq, Hkv, T, D = 2, 6, 2, 500, 64
    q = make((B, Hq, T, D), torch.bfloat16, "transposed", seed=8)
    k = make((B, Hkv, T, D), torch.bfloat16, seed=9)
    pos = ops.probe_positions(T, 0.2)
    # the documented rule: last 50 dense, then stride ceil(450 / 50) = 9 from 449 down
    assert list(pos[-50:]) == list(range(450, 500)) and list(pos[:-50]) == list(range(449, -1, -9))[::-1]
    got = ops.global_scores(q, k, probe=0.2)
    assert torch.equal(got, ops.global_scores(q[:, :, pos], k, q_pos=pos))
    ref = global_scores_ref(q[:, :, pos], k, q_pos=pos)
    assert_within_bound(got, ref, global_scores_ref(q[:, :, pos], k, q_pos=pos, dtype=torch.bfloat16), "probe")
    # numpy inputs go through the same slicing
    qn, kn = q.float().numpy(), k.float().numpy()
    assert np.array_equal(ops.global_scores(qn, kn, probe=0.2), ops.global_scores(q.float(), k.float(), probe=0.2).numpy())
    # probe = 1 is every query; small T keeps at least one of each kind
    assert torch.equal(ops.global_scores(q, k, probe=1.0), ops.global_scores(q, k))
    assert list(ops.probe_positions(1, 0.01)) == [0]
    assert list(ops.probe_positions(10, 0.3)) == [3, 7, 8, 9]  # h = 2: stride ceil(8 / 2)


def test_long_sequence_accuracy_and_groups():
    # enough queries for many query groups and chunks per head
    q = make((1, 3, 1500, 64), seed=10)
    k = make((1, 1, 1500, 64), seed=11) * 3
    for gqa in ("mean", "max"):
        got = ops.global_scores(q, k, gqa=gqa)
        ref = global_scores_ref(q, k, gqa=gqa)
        same = global_scores_ref(q, k, gqa=gqa, dtype=torch.float32)
        assert_within_bound(got, ref, same, gqa)
        # relative error too: scores are small, so the absolute floor alone says little
        rel_c = ((got.double() - ref).abs() / ref).max().item()
        rel_t = ((same.double() - ref).abs() / ref).max().item()
        assert rel_c <= 2 * rel_t, (rel_c, rel_t)


def test_first_key_matches_window_scores():
    # key 0 is seen by every query, so G_0 is window_scores' mean over all queries
    q = make((1, 4, 90, 16), seed=12)
    k = make((1, 2, 90, 16), seed=13)
    torch.testing.assert_close(ops.global_scores(q, k)[..., 0], ops.window_scores(q, k)[..., 0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_numpy(dtype):
    q = make((2, 4, 11, 16), fw="numpy", seed=14).astype(dtype)
    k = make((2, 2, 11, 16), fw="numpy", seed=15).astype(dtype)
    got = ops.global_scores(q, k, kv_start=np.array([0, 3]), gqa="max")
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    tdt = torch.float32 if dtype == np.float32 else torch.float16
    ref = global_scores_ref(q, k, kv_start=np.array([0, 3]), gqa="max")
    assert_within_bound(got, ref, global_scores_ref(q, k, kv_start=np.array([0, 3]), gqa="max", dtype=tdt))


@pytest.mark.parametrize(
    "qshape,kshape",
    [
        ((0, 4, 3, 8), (0, 2, 5, 8)),  # B = 0
        ((2, 0, 0, 8), (2, 0, 0, 8)),  # no heads, no tokens
        ((2, 4, 0, 8), (2, 2, 5, 8)),  # no queries: scores 0
        ((2, 4, 5, 0), (2, 2, 5, 0)),  # D = 0: uniform attention
    ],
)
def test_zero_size(qshape, kshape):
    q, k = torch.zeros(qshape), torch.zeros(kshape)
    got = ops.global_scores(q, k)
    assert tuple(got.shape) == kshape[:3]
    torch.testing.assert_close(got.double(), global_scores_ref(q, k), rtol=1e-6, atol=1e-7)


def test_nan_propagates_like_window_scores():
    q = make((1, 4, 12, 8), seed=16)
    k = make((1, 2, 12, 8), seed=17)
    q[0, 0, 5, 3] = float("nan")  # query 5 of kv head 0's group
    got = ops.global_scores(q, k)
    assert torch.isnan(got[0, 0, :6]).all() and torch.isfinite(got[0, 0, 6:]).all()
    assert torch.isfinite(got[0, 1]).all()
    ws = ops.window_scores(q, k)
    assert torch.equal(torch.isnan(ws), torch.isnan(got))


def test_bad_inputs():
    q = torch.zeros(1, 4, 6, 8)
    k = torch.zeros(1, 2, 6, 8)
    cases = [
        (dict(q_pos=[0, 1, 2, 2, 4, 5]), KVCompressValueError, "q_pos: must be strictly increasing"),
        (dict(q_pos=[0, 1, 2, 5, 4, 3]), KVCompressValueError, "q_pos: must be strictly increasing"),
        (dict(q_pos=[-1, 1, 2, 3, 4, 5]), KVCompressValueError, r"q_pos: value -1 at 0 is outside \[0, T\)"),
        (dict(q_pos=[0, 1, 2, 3, 4, 6]), KVCompressValueError, r"q_pos: value 6 at 5 is outside"),
        (dict(q_pos=[0, 1, 2]), KVCompressValueError, r"q_pos: expected shape \[Tq\] = \[6\]"),
        (dict(q_pos=torch.arange(6.0)), KVCompressTypeError, "q_pos"),
        (dict(q_pos=torch.arange(6), probe=0.5), KVCompressValueError, "probe: cannot be combined"),
        (dict(probe=0.0), KVCompressValueError, r"probe: expected a fraction in \(0, 1\]"),
        (dict(probe=1.5), KVCompressValueError, "probe"),
        (dict(probe="half"), KVCompressTypeError, "probe"),
        (dict(gqa="sum"), KVCompressValueError, "gqa"),
        (dict(scaling=float("inf")), KVCompressValueError, "scaling"),
        (dict(scaling="1"), KVCompressTypeError, "scaling"),
        (dict(kv_start=torch.tensor([7])), KVCompressValueError, "kv_start"),
    ]
    for kwargs, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            ops.global_scores(q, k, **kwargs)
    with pytest.raises(KVCompressValueError, match="probe: needs a query at every position"):
        ops.global_scores(q[:, :, :3], k, probe=0.5)
    with pytest.raises(KVCompressValueError, match="queries: 7 queries but only 6 keys"):
        ops.global_scores(torch.zeros(1, 4, 7, 8), k)
    with pytest.raises(KVCompressValueError, match="not a positive multiple"):
        ops.global_scores(torch.zeros(1, 3, 6, 8), k)
    with pytest.raises(KVCompressValueError, match="not a positive multiple"):
        ops.global_scores(torch.zeros(1, 0, 6, 8), k)
    with pytest.raises(KVCompressTypeError, match="keys: dtype"):
        ops.global_scores(q, k.half())
    with pytest.raises(KVCompressValueError, match="head dim"):
        ops.global_scores(q, torch.zeros(1, 2, 6, 9))
    with pytest.raises(KVCompressValueError, match="queries: expected a 4-D"):
        ops.global_scores(q[0], k)


def test_bit_identical_for_any_thread_count():
    if not ops._C.has_openmp:
        pytest.skip("built without OpenMP: a single thread is all there is")
    q = make((2, 9, 700, 64), torch.bfloat16, "transposed", seed=18)
    k = make((2, 3, 700, 64), torch.bfloat16, seed=19)
    kv_start = torch.tensor([0, 37])
    n0 = ops.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            ops.set_num_threads(n)
            results.append(
                [
                    ops.global_scores(q, k, kv_start=kv_start),
                    ops.global_scores(q, k, gqa="max", probe=0.3),
                ]
            )
    finally:
        ops.set_num_threads(n0)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("T", [14, 40, 131, 1100])
def test_a_left_padded_row_scores_as_alone_bit_for_bit(T):
    """A row of a left-padded batch (``kv_start`` leading padded keys and
    queries) scores bit for bit as the row alone, whatever its padding and
    the other rows: the column sums run in query groups laid out from the
    row's own first real query (before: groups from the padded batch's
    first query, up to 3e-8 apart)."""
    g = torch.Generator().manual_seed(T)
    q = torch.randn(1, 4, T, 16, generator=g)
    k = torch.randn(1, 2, T, 16, generator=g)
    alone = ops.global_scores(q, k, scaling=0.25, kv_start=torch.zeros(1, dtype=torch.int64))
    for pad in (1, 3, 8, 19, 33, 200):
        qp = torch.cat([torch.randn(1, 4, pad, 16, generator=g), q], 2)
        kp = torch.cat([torch.randn(1, 2, pad, 16, generator=g), k], 2)
        other = torch.randn(1, 4, T + pad, 16, generator=g), torch.randn(1, 2, T + pad, 16, generator=g)
        got = ops.global_scores(torch.cat([qp, other[0]]), torch.cat([kp, other[1]]), scaling=0.25,
                                kv_start=torch.tensor([pad, 0]))
        assert torch.equal(got[0, :, pad:], alone[0]), pad
        assert bool((got[0, :, :pad] == 0).all())


@pytest.mark.parametrize("T", [14, 131, 1100])
def test_a_left_padded_row_probes_its_own_positions(T):
    """With ``probe``, a left-padded row scores bit for bit as the row alone:
    its probe sample is that of its own ``T`` real positions, not of the
    padded batch's (before: ZipCache and EMS(global_mode="probe") scored a
    padded row with other queries than alone, and kept other slots). Rows
    of the same padding share a call; a row of padding only scores 0;
    NumPy inputs take the same path."""
    g = torch.Generator().manual_seed(T)
    q = torch.randn(1, 4, T, 16, generator=g)
    k = torch.randn(1, 2, T, 16, generator=g)
    alone = ops.global_scores(q, k, scaling=0.25, probe=0.2)
    for pad in (1, 19, 200):
        qp = torch.cat([torch.randn(1, 4, pad, 16, generator=g), q], 2)
        kp = torch.cat([torch.randn(1, 2, pad, 16, generator=g), k], 2)
        other = torch.randn(2, 4, T + pad, 16, generator=g), torch.randn(2, 2, T + pad, 16, generator=g)
        qs, ks = torch.cat([qp, other[0], qp]), torch.cat([kp, other[1], kp])
        start = torch.tensor([pad, 0, T + pad, pad])
        got = ops.global_scores(qs, ks, scaling=0.25, kv_start=start, probe=0.2)
        assert torch.equal(got[0, :, pad:], alone[0]) and torch.equal(got[3], got[0]), pad
        assert bool((got[0, :, :pad] == 0).all()) and bool((got[2] == 0).all())
        # the unpadded row is the batch call's own
        assert torch.equal(got[1], ops.global_scores(other[0][:1], other[1][:1], scaling=0.25, probe=0.2)[0])
        npy = ops.global_scores(qs.numpy(), ks.numpy(), scaling=0.25, kv_start=start.numpy(), probe=0.2)
        assert np.array_equal(npy, got.numpy())
