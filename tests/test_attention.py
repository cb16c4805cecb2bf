"""ops.attention (decode/chunk attention over a uniform or ragged layer)
against a float64 reference computed here on the same slots.

Error bound (docs/design.md, "Numerics"): the C op's max abs error against
float64 is at most 2x the error of torch SDPA in the same dtype where SDPA
applies (uniform layout, no counts), else 2x the error of the same
reference computed by torch in the input dtype; plus a small absolute floor
(1e-6, scaled by the output magnitude when that exceeds 1) so that cases
exact in fp32 do not demand bit-equality.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kvcompress import ops
from kvcompress.errors import KVCompressTypeError, KVCompressValueError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
RATIOS = [(2, 2), (6, 2), (8, 2)]  # (Hq, Hkv): GQA 1, 3, 4


@pytest.fixture(autouse=True)
def _restore_threads():
    n = ops.get_num_threads()
    yield
    ops.set_num_threads(n)


@contextlib.contextmanager
def switched(hook, flag: bool):
    """A kernel-path test hook of _C (``_set_wide``, ``_set_amx``) set to
    flag for the block, then back to what it was."""
    prev = hook(flag)
    try:
        yield
    finally:
        hook(prev)


def assert_switch(hook, state, native: bool):
    """hook (a _C ``_set_*`` test hook) reports and restores its setting,
    state() (its ``_C._*`` query) follows it, and forbidding always wins:
    native is what state() says when the path is allowed."""
    with switched(hook, False):
        assert state() is False
        assert hook(True) is False
        assert state() is native
        hook(False)
    assert state() is native


def randn(shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def queries(B, Hq, q, D, dtype, seed=1):
    """HF layout: [B, q, Hq, D] in memory, seen as [B, Hq, q, D]."""
    return randn((B, q, Hq, D), dtype, seed).transpose(1, 2)


# ---------------------------------------------------------------- reference


def _head_attention(qh, kh, vh, scaling, s0, logc, dtype):
    """qh [g, q, D], kh/vh [n, D] of one kv head, in `dtype`; query i sees
    s0 .. n - q + i. Returns [q, g, D] (zeros for rows that see nothing)."""
    g, q, D = qh.shape
    n = kh.shape[0]
    out = torch.zeros(q, g, D, dtype=dtype)
    if n == 0 or q == 0:
        return out
    logits = (qh @ kh.T) * scaling
    if logc is not None:
        logits = logits + logc.to(dtype)
    j = torch.arange(n)
    lim = (n - q + torch.arange(q))[:, None]
    visible = (j[None, :] <= lim) & (j[None, :] >= s0)
    logits = logits.masked_fill(~visible, float("-inf"))
    seen = visible.any(dim=1)
    if not seen.any():
        return out
    p = torch.softmax(logits[:, seen], dim=-1)
    out[seen] = (p @ vh).transpose(0, 1)
    return out


def attention_ref(q, k, v, scaling=None, kv_start=None, offsets=None, lengths=None, counts=None,
                  dtype=torch.float64):
    """[B, q, Hq, D] in `dtype` (float64: the exact reference; the input
    dtype: what torch computes at that precision)."""
    q, k, v = (torch.as_tensor(np.asarray(x)) if isinstance(x, np.ndarray) else x for x in (q, k, v))
    B, Hq, nq, D = q.shape
    scaling = 1 / math.sqrt(D) if scaling is None else scaling
    ragged = offsets is not None
    Hkv = len(offsets) // B if ragged else k.shape[1]
    g = Hq // Hkv
    out = torch.zeros(B, nq, Hq, D, dtype=dtype)
    for b in range(B):
        for hk in range(Hkv):
            if ragged:
                i = b * Hkv + hk
                o, n = int(offsets[i]), int(lengths[i])
                kh, vh, s0 = k[o:o + n], v[o:o + n], 0
                c = None if counts is None else torch.as_tensor(counts)[o:o + n]
            else:
                kh, vh = k[b, hk], v[b, hk]
                s0 = 0 if kv_start is None else int(kv_start[b])
                c = None if counts is None else torch.as_tensor(counts)[b, hk]
            logc = None if c is None else torch.log(c.to(torch.float64))
            qh = q[b, hk * g:(hk + 1) * g]
            out[b, :, hk * g:(hk + 1) * g] = _head_attention(
                qh.to(dtype), kh.to(dtype), vh.to(dtype), scaling, s0, logc, dtype)
    return out


def sdpa(q, k, v, kv_start=None, scale=None):
    """torch SDPA in the input dtype over the uniform layout, [B, q, Hq, D];
    rows that see no key (NaN in SDPA) are set to 0."""
    B, Hq, nq, D = q.shape
    n = k.shape[2]
    j = torch.arange(n)
    mask = j[None, :] <= (n - nq + torch.arange(nq))[:, None]
    mask = mask[None, None].expand(B, 1, nq, n)
    if kv_start is not None:
        mask = mask & (j[None, None, None, :] >= torch.as_tensor(kv_start)[:, None, None, None])
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=scale)
    return torch.nan_to_num(o.transpose(1, 2), nan=0.0)


def to_f64(x):
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x)).to(torch.float64)
    return x.to(torch.float64)


def assert_within_bound(got, ref64, torch_same_dtype, what=""):
    got, ref64, same = to_f64(got), to_f64(ref64), to_f64(torch_same_dtype)
    assert got.shape == ref64.shape, what
    assert torch.isfinite(got).all(), what
    if got.numel() == 0:
        return
    err_c = (got - ref64).abs().max().item()
    err_t = (same - ref64).abs().max().item()
    floor = 1e-6 * max(1.0, ref64.abs().max().item())
    assert err_c <= 2 * err_t + floor, f"{what}: C error {err_c:.3g} > 2 x torch error {err_t:.3g} + {floor:.1g}"


def ragged_layout(lengths, D, dtype, gap=3, seed=0, shuffle=True):
    """One [N, D] buffer per K and V with the given per-head lengths, segments
    in a shuffled order with `gap` unused (NaN-filled) rows between them."""
    H = len(lengths)
    order = np.random.default_rng(seed).permutation(H) if shuffle else np.arange(H)
    offsets = np.zeros(H, dtype=np.int64)
    pos = gap
    for i in order:
        offsets[i] = pos
        pos += lengths[i] + gap
    N = pos
    k = randn((N, D), dtype, seed + 1)
    v = randn((N, D), dtype, seed + 2)
    unused = torch.ones(N, dtype=torch.bool)
    for o, n in zip(offsets, lengths):
        unused[o:o + n] = False
    k[unused] = float("nan")  # the kernel must never read capacity rows
    v[unused] = float("nan")
    return k, v, torch.from_numpy(offsets), torch.tensor(lengths, dtype=torch.int64)


# ---------------------------------------------------------------- uniform vs SDPA

UNIFORM_SHAPES = [  # (B, q, n, D)
    (2, 1, 1, 64),
    (2, 1, 37, 40),
    (2, 5, 37, 24),
    (1, 16, 300, 64),
    (2, 40, 70, 33),  # three query tiles: no split
    (1, 1, 5000, 64),  # many split blocks
]


@pytest.mark.parametrize("shape", UNIFORM_SHAPES, ids=lambda s: "B{}q{}n{}D{}".format(*s))
@pytest.mark.parametrize("heads", RATIOS, ids=lambda h: f"g{h[0] // h[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_uniform_matches_sdpa(shape, heads, dtype):
    B, nq, n, D = shape
    Hq, Hkv = heads
    q = queries(B, Hq, nq, D, dtype)
    k = randn((B, Hkv, n, D), dtype, 2, scale=2.0)
    v = randn((B, Hkv, n, D), dtype, 3)
    got = ops.attention(q, k, v)
    assert got.dtype == dtype and tuple(got.shape) == (B, nq, Hq, D)
    assert_within_bound(got, attention_ref(q, k, v), sdpa(q, k, v), f"{shape} {heads} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_uniform_kv_start_padding(dtype):
    B, Hq, Hkv, nq, n, D = 3, 6, 2, 4, 45, 24
    q = queries(B, Hq, nq, D, dtype)
    k = randn((B, Hkv, n, D), dtype, 2)
    v = randn((B, Hkv, n, D), dtype, 3)
    kv_start = torch.tensor([0, 7, n - nq + 2])  # last row: queries 0 and 1 see nothing
    got = ops.attention(q, k, v, kv_start=kv_start, scaling=0.3)
    ref = attention_ref(q, k, v, scaling=0.3, kv_start=kv_start)
    assert_within_bound(got, ref, sdpa(q, k, v, kv_start, scale=0.3), str(dtype))
    assert (got[2, :2] == 0).all() and (got[2, 2:] != 0).any()
    # padded slots are never read
    k[1, :, :7] = float("nan")
    v[1, :, :7] = float("nan")
    assert torch.equal(ops.attention(q, k, v, kv_start=kv_start, scaling=0.3), got)


def test_uniform_padding_whole_row():
    q = queries(2, 4, 1, 16, torch.float32)
    k, v = randn((2, 2, 9, 16)), randn((2, 2, 9, 16), seed=4)
    got = ops.attention(q, k, v, kv_start=torch.tensor([9, 0]))
    assert (got[0] == 0).all()
    assert_within_bound(got[1:], attention_ref(q[1:], k[1:], v[1:]), sdpa(q[1:], k[1:], v[1:]))


# ---------------------------------------------------------------- ragged

RAGGED_LENGTHS = {  # per (b, h) lengths for B=2, Hkv=2, q as keyed
    1: [5, 0, 300, 1],
    3: [3, 70, 0, 17],
    20: [5000, 20, 0, 613],  # split path, q <= 32
    40: [40, 0, 257, 41],  # no split (three query tiles)
}


@pytest.mark.parametrize("nq", sorted(RAGGED_LENGTHS))
@pytest.mark.parametrize("use_counts", [False, True], ids=["plain", "counts"])
@pytest.mark.parametrize("heads", RATIOS, ids=lambda h: f"g{h[0] // h[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ragged_matches_reference(nq, use_counts, heads, dtype):
    lengths = RAGGED_LENGTHS[nq]
    B, D = 2, 40 if nq != 20 else 64
    Hq, Hkv = heads
    k, v, offsets, lengths_t = ragged_layout(lengths, D, dtype, seed=nq)
    q = queries(B, Hq, nq, D, dtype, seed=nq + 7)
    counts = None
    if use_counts:
        counts = torch.from_numpy(np.random.default_rng(nq).integers(1, 9, size=k.shape[0])).float()
    got = ops.attention(q, k, v, offsets=offsets, lengths=lengths_t, counts=counts)
    assert got.dtype == dtype and tuple(got.shape) == (B, nq, Hq, D)
    ref = attention_ref(q, k, v, offsets=offsets, lengths=lengths_t, counts=counts)
    same = attention_ref(q, k, v, offsets=offsets, lengths=lengths_t, counts=counts, dtype=dtype)
    assert_within_bound(got, ref, same, f"q={nq} {heads} {dtype} counts={use_counts}")
    g = Hq // Hkv
    for i, n in enumerate(lengths):
        if n == 0:  # an empty head: zeros
            b, hk = divmod(i, Hkv)
            assert (got[b, :, hk * g:(hk + 1) * g] == 0).all()


def test_ragged_equals_uniform():
    """The same slots stored both ways give the same bits."""
    B, Hq, Hkv, nq, n, D = 2, 6, 2, 3, 600, 64
    q = queries(B, Hq, nq, D, torch.float32)
    k, v = randn((B, Hkv, n, D), seed=2), randn((B, Hkv, n, D), seed=3)
    counts = torch.randint(1, 5, (B, Hkv, n), generator=torch.Generator().manual_seed(0)).float()
    offsets = torch.arange(B * Hkv) * n
    lengths = torch.full((B * Hkv,), n)
    for c in (None, counts):
        u = ops.attention(q, k, v, counts=c)
        r = ops.attention(q, k.reshape(-1, D), v.reshape(-1, D), offsets=offsets, lengths=lengths,
                          counts=None if c is None else c.reshape(-1))
        assert torch.equal(u, r)


# ---------------------------------------------------------------- counts


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_uniform_counts(dtype):
    B, Hq, Hkv, nq, n, D = 2, 6, 2, 2, 333, 24
    q = queries(B, Hq, nq, D, dtype)
    k, v = randn((B, Hkv, n, D), dtype, 2), randn((B, Hkv, n, D), dtype, 3)
    counts = torch.randint(1, 20, (B, Hkv, n), generator=torch.Generator().manual_seed(1)).float()
    kv_start = torch.tensor([0, 11])
    got = ops.attention(q, k, v, counts=counts, kv_start=kv_start)
    ref = attention_ref(q, k, v, counts=counts, kv_start=kv_start)
    same = attention_ref(q, k, v, counts=counts, kv_start=kv_start, dtype=dtype)
    assert_within_bound(got, ref, same, str(dtype))
    # int32 counts are read as the same values
    assert torch.equal(ops.attention(q, k, v, counts=counts.int(), kv_start=kv_start), got)
    # counts change the result
    assert not torch.equal(ops.attention(q, k, v, kv_start=kv_start), got)


def test_counts_of_one_equal_no_counts():
    q = queries(2, 6, 3, 64, torch.float32)
    k, v = randn((2, 2, 700, 64), seed=2), randn((2, 2, 700, 64), seed=3)
    ones = torch.ones(2, 2, 700)
    assert torch.equal(ops.attention(q, k, v, counts=ones), ops.attention(q, k, v))
    kr, vr, off, ln = ragged_layout([700, 0, 20, 5], 64, torch.float32)
    plain = ops.attention(q, kr, vr, offsets=off, lengths=ln)
    assert torch.equal(ops.attention(q, kr, vr, offsets=off, lengths=ln, counts=torch.ones(kr.shape[0])), plain)


def test_counts_equal_duplicated_slots():
    """A slot with count c weighs like c identical slots."""
    q = queries(1, 3, 1, 16, torch.float64).float()
    k, v = randn((1, 1, 6, 16), seed=2), randn((1, 1, 6, 16), seed=3)
    counts = torch.tensor([[[3.0, 1, 2, 1, 1, 1]]])
    idx = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4, 5])
    dup = ops.attention(q, k[:, :, idx], v[:, :, idx])
    torch.testing.assert_close(ops.attention(q, k, v, counts=counts), dup, rtol=2e-6, atol=2e-7)


# ---------------------------------------------------------------- threads, layouts, frameworks


@pytest.mark.parametrize("nq", [1, 20, 40])
def test_threads_bit_identical(nq):
    B, Hq, Hkv, D = 2, 6, 2, 64
    q = queries(B, Hq, nq, D, torch.bfloat16)
    k, v = randn((B, Hkv, 5000, D), torch.bfloat16, 2), randn((B, Hkv, 5000, D), torch.bfloat16, 3)
    kr, vr, off, ln = ragged_layout([5000, 0, 777, 64], D, torch.float32, seed=5)
    counts = torch.rand(kr.shape[0], generator=torch.Generator().manual_seed(0)) * 4 + 1
    results = []
    for nt in (1, 2, 3):
        ops.set_num_threads(nt)
        results.append((ops.attention(q, k, v, kv_start=torch.tensor([0, 100])),
                        ops.attention(q.float(), kr, vr, offsets=off, lengths=ln, counts=counts)))
    for u, r in results[1:]:
        assert torch.equal(u, results[0][0]) and torch.equal(r, results[0][1])


def test_large_split_blocks():
    """A long decode step (40K slots over its heads: split-K blocks of 2048
    slots, kvc_at_block_slots) stays within the float64 bound and gives the
    same bits on 1 and 2 threads; kv_start puts the first block mid-way."""
    q = queries(1, 6, 1, 64, torch.float32)
    k, v = randn((1, 2, 20000, 64), torch.float32, 2), randn((1, 2, 20000, 64), torch.float32, 3)
    start = torch.tensor([2100])
    outs = []
    for nt in (1, 2):
        ops.set_num_threads(nt)
        outs.append(ops.attention(q, k, v, kv_start=start))
    assert torch.equal(outs[0], outs[1])
    assert_within_bound(outs[0], attention_ref(q, k, v, kv_start=start),
                        attention_ref(q, k, v, kv_start=start, dtype=torch.float32), "2048-slot blocks")


def test_batch_rows_independent():
    """A row's result does not depend on the other rows of the batch."""
    q = queries(3, 6, 2, 32, torch.float32)
    kr, vr, off, ln = ragged_layout([900, 3, 0, 40, 2000, 2], 32, torch.float32)
    full = ops.attention(q, kr, vr, offsets=off, lengths=ln)
    one = ops.attention(q[1:2], kr, vr, offsets=off[2:4], lengths=ln[2:4])
    assert torch.equal(full[1:2], one)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_non_contiguous(dtype):
    B, Hq, Hkv, nq, n, D = 2, 6, 2, 3, 50, 24
    big_q = randn((B, Hq, 2 * nq, 2 * D), dtype, 1)
    q = big_q[:, :, ::2, ::2]
    k = randn((B, n, Hkv, D), dtype, 2).transpose(1, 2)  # [B, Hkv, n, D] with n outer
    v = randn((B, Hkv, n, 2 * D), dtype, 3)[..., 1::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    got = ops.attention(q, k, v)
    assert_within_bound(got, attention_ref(q, k, v), sdpa(q, k, v), str(dtype))
    assert torch.equal(got, ops.attention(q.contiguous(), k.contiguous(), v.contiguous()))
    # ragged rows as strided views of wider buffers
    kr, vr, off, ln = ragged_layout([30, 9, 0, 50], 2 * D, dtype)
    ks, vs = kr[:, ::2], vr[:, D:]
    got = ops.attention(q, ks, vs, offsets=off, lengths=ln)
    ref = attention_ref(q, ks, vs, offsets=off, lengths=ln)
    assert_within_bound(got, ref, attention_ref(q, ks, vs, offsets=off, lengths=ln, dtype=dtype))
    assert torch.equal(got, ops.attention(q, ks.contiguous(), vs.contiguous(), offsets=off, lengths=ln))


@pytest.mark.parametrize("D", [64, 24])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_every_half_value_round_trips(D, dtype):
    """One slot per head: the output is its value row, so every 16-bit
    pattern goes through the kernel's conversions and back unchanged."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    n_rows = 65536 // D + 1
    bits = torch.cat([bits, bits[: n_rows * D - 65536]])
    v = bits.view(dtype).reshape(1, n_rows, 1, D)
    q = torch.zeros(1, n_rows, 1, D, dtype=dtype)
    got = ops.attention(q, torch.zeros_like(v), v)
    want = v.transpose(1, 2)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))  # -0 == 0


@pytest.mark.parametrize("D", [64, 96])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_strides_do_not_change_bits(D, dtype):
    """Rows read in place (unit stride) and rows converted first (strided)
    go through the same arithmetic."""
    B, Hq, Hkv, nq, n = 2, 6, 2, 2, 300
    q = queries(B, Hq, nq, D, dtype)
    k = randn((B, Hkv, n, 2 * D), dtype, 2)
    v = randn((B, Hkv, n, 2 * D), dtype, 3)
    ks, vs = k[..., ::2], v[..., 1::2]
    want = ops.attention(q, ks.contiguous(), vs.contiguous())
    assert torch.equal(ops.attention(q, ks, vs), want)
    assert torch.equal(ops.attention(q, ks.contiguous(), vs), want)
    assert torch.equal(ops.attention(q, ks, vs.contiguous()), want)
    assert_within_bound(want, attention_ref(q, ks, vs), sdpa(q, ks, vs), str(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_numpy_inputs(dtype):
    q = queries(2, 4, 2, 16, torch.float32).numpy().astype(dtype)
    k = randn((2, 2, 30, 16), seed=2).numpy().astype(dtype)
    v = randn((2, 2, 30, 16), seed=3).numpy().astype(dtype)
    got = ops.attention(q, k, v, kv_start=np.array([0, 4]))
    assert isinstance(got, np.ndarray) and got.dtype == dtype and got.shape == (2, 2, 4, 16)
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    assert_within_bound(got, attention_ref(tq, tk, tv, kv_start=[0, 4]), sdpa(tq, tk, tv, torch.tensor([0, 4])))
    kr = k.reshape(-1, 16)
    got = ops.attention(q, kr, v.reshape(-1, 16), offsets=np.array([0, 30, 60, 90]), lengths=[30, 2, 0, 25],
                        counts=np.full(120, 2, dtype=np.int32))
    assert isinstance(got, np.ndarray)
    ref = attention_ref(tq, torch.from_numpy(kr), torch.from_numpy(v.reshape(-1, 16)), offsets=[0, 30, 60, 90],
                        lengths=[30, 2, 0, 25])  # uniform counts cancel out
    torch.testing.assert_close(to_f64(got), ref, rtol=0, atol=2e-3 if dtype == np.float16 else 1e-6)


@pytest.mark.parametrize(
    "qshape,kshape",
    [
        ((0, 4, 1, 8), (0, 2, 5, 8)),  # B = 0
        ((2, 0, 1, 8), (2, 0, 5, 8)),  # no heads
        ((2, 4, 0, 8), (2, 2, 5, 8)),  # no queries
        ((2, 4, 1, 0), (2, 2, 5, 0)),  # D = 0
    ],
)
def test_zero_size(qshape, kshape):
    got = ops.attention(torch.zeros(qshape), torch.zeros(kshape), torch.zeros(kshape))
    assert tuple(got.shape) == (qshape[0], qshape[2], qshape[1], qshape[3])
    got = ops.attention(torch.zeros(qshape), torch.zeros(0, qshape[3]), torch.zeros(0, qshape[3]),
                        offsets=torch.zeros(qshape[0] * 2, dtype=torch.int64),
                        lengths=torch.zeros(qshape[0] * 2, dtype=torch.int64))
    assert tuple(got.shape) == (qshape[0], qshape[2], qshape[1], qshape[3])
    assert (got == 0).all()


def test_large_logits_stable():
    """Max-shifted online softmax: logits of 1e4 do not overflow."""
    q = queries(1, 3, 1, 16, torch.float32) * 100
    k, v = randn((1, 1, 600, 16), seed=2) * 100, randn((1, 1, 600, 16), seed=3)
    got = ops.attention(q, k, v)
    assert_within_bound(got, attention_ref(q, k, v), sdpa(q, k, v))


# ---------------------------------------------------------------- bad inputs


def _ragged_args():
    q = queries(2, 4, 2, 8, torch.float32)
    k, v = randn((40, 8)), randn((40, 8), seed=2)
    return q, k, v, torch.tensor([0, 10, 20, 30]), torch.tensor([10, 5, 0, 10])


def _uniform_args():
    q = queries(2, 4, 2, 8, torch.float32)
    return q, randn((2, 2, 6, 8)), randn((2, 2, 6, 8), seed=2)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(offsets=torch.tensor([0, 10, 20, 35])), KVCompressValueError, "offsets"),
        (lambda a: a.update(offsets=torch.tensor([-1, 10, 20, 30])), KVCompressValueError, "offsets"),
        (lambda a: a.update(offsets=torch.tensor([0, 8, 20, 30])), KVCompressValueError, "offsets.*overlap"),
        (lambda a: a.update(offsets=torch.tensor([30, 10, 20, 5])), KVCompressValueError, "offsets.*overlap"),
        (lambda a: a.update(offsets=torch.tensor([0, 10, 20])), KVCompressValueError, "lengths"),
        (lambda a: a.update(offsets=torch.tensor([0, 10, 20, 30, 36]),
                            lengths=torch.tensor([2, 2, 2, 2, 2])), KVCompressValueError, "offsets.*B \\* Hkv"),
        (lambda a: a.update(lengths=torch.tensor([10, 5, -1, 10])), KVCompressValueError, "lengths"),
        (lambda a: a.update(lengths=torch.tensor([10, 1, 0, 10])), KVCompressValueError, "lengths.*fewer"),
        (lambda a: a.update(lengths=torch.tensor([10, 5, 0, 11])), KVCompressValueError, "offsets"),
        (lambda a: a.update(offsets=torch.tensor([0.0, 10, 20, 30])), KVCompressTypeError, "offsets"),
        (lambda a: a.update(lengths=None), KVCompressValueError, "lengths"),
        (lambda a: a.update(kv_start=torch.tensor([0, 0])), KVCompressValueError, "kv_start"),
        (lambda a: a.update(counts=torch.ones(39)), KVCompressValueError, "counts"),
        (lambda a: a.update(counts=torch.ones(40, dtype=torch.float64)), KVCompressTypeError, "counts"),
        (lambda a: a.update(counts=torch.ones(40).index_fill(0, torch.tensor([31]), 0.0)),
         KVCompressValueError, "counts.*> 0"),
        (lambda a: a.update(counts=torch.ones(40).index_fill(0, torch.tensor([31]), -0.5)),
         KVCompressValueError, "counts.*-0.5"),
        (lambda a: a.update(counts=torch.ones(40).index_fill(0, torch.tensor([3]), float("nan"))),
         KVCompressValueError, "counts.*nan"),
        (lambda a: a.update(counts=torch.ones(40).index_fill(0, torch.tensor([3]), float("inf"))),
         KVCompressValueError, "counts"),
        (lambda a: a.update(keys=randn((40, 9))), KVCompressValueError, "keys"),
        (lambda a: a.update(values=randn((41, 8))), KVCompressValueError, "values"),
        (lambda a: a.update(values=randn((40, 8), torch.float16)), KVCompressTypeError, "values"),
        (lambda a: a.update(keys=randn((2, 2, 10, 8))), KVCompressValueError, "keys"),
        (lambda a: a.update(queries=queries(2, 3, 2, 8, torch.float32)), KVCompressValueError, "queries"),
    ],
)
def test_bad_ragged_inputs(mutate, exc, match):
    q, k, v, off, ln = _ragged_args()
    a = dict(queries=q, keys=k, values=v, offsets=off, lengths=ln)
    assert ops.attention(**a).shape == (2, 2, 4, 8)
    mutate(a)
    with pytest.raises(exc, match=match):
        ops.attention(a.pop("queries"), a.pop("keys"), a.pop("values"), **a)


def test_unused_capacity_counts_not_checked():
    q, k, v, off, ln = _ragged_args()
    counts = torch.ones(40)
    counts[15:20] = float("nan")  # between segments 1 and 2: never read
    counts[20:30] = 0.0  # head 2 is empty
    ops.attention(q, k, v, offsets=off, lengths=ln, counts=counts)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(queries=queries(2, 4, 7, 8, torch.float32)), KVCompressValueError, "queries.*7"),
        (lambda a: a.update(queries=queries(2, 3, 2, 8, torch.float32)), KVCompressValueError, "queries.*multiple"),
        (lambda a: a.update(queries=queries(3, 4, 2, 8, torch.float32)), KVCompressValueError, "keys.*batch"),
        (lambda a: a.update(queries=queries(2, 4, 2, 9, torch.float32)), KVCompressValueError, "keys.*head dim"),
        (lambda a: a.update(queries=torch.zeros(2, 4, 8)), KVCompressValueError, "queries.*4-D"),
        (lambda a: a.update(queries=queries(2, 4, 2, 8, torch.float16)), KVCompressTypeError, "keys.*dtype"),
        (lambda a: a.update(queries=torch.zeros(2, 4, 2, 8, dtype=torch.float64)), KVCompressTypeError, "queries"),
        (lambda a: a.update(queries=torch.zeros(2, 4, 2, 8, dtype=torch.int32)), KVCompressTypeError, "queries"),
        (lambda a: a.update(values=randn((2, 2, 5, 8))), KVCompressValueError, "values"),
        (lambda a: a.update(keys=[[1.0]]), KVCompressTypeError, "keys"),
        (lambda a: a.update(kv_start=torch.tensor([0, 7])), KVCompressValueError, "kv_start"),
        (lambda a: a.update(kv_start=torch.tensor([0])), KVCompressValueError, "kv_start"),
        (lambda a: a.update(counts=torch.ones(2, 2, 5)), KVCompressValueError, "counts"),
        (lambda a: a.update(counts=-torch.ones(2, 2, 6) * 0.9), KVCompressValueError, "counts.*-0.9"),
        (lambda a: a.update(counts=torch.zeros(2, 2, 6, dtype=torch.int32)), KVCompressValueError, "counts"),
        (lambda a: a.update(scaling="x"), KVCompressTypeError, "scaling"),
        (lambda a: a.update(scaling=float("nan")), KVCompressValueError, "scaling"),
    ],
)
def test_bad_uniform_inputs(mutate, exc, match):
    q, k, v = _uniform_args()
    a = dict(queries=q, keys=k, values=v)
    assert ops.attention(**a).shape == (2, 2, 4, 8)
    mutate(a)
    with pytest.raises(exc, match=match):
        ops.attention(a.pop("queries"), a.pop("keys"), a.pop("values"), **a)


def test_padded_counts_not_checked():
    q, k, v = _uniform_args()
    counts = torch.ones(2, 2, 6)
    counts[1, :, :2] = float("nan")  # padded slots of row 1
    ops.attention(q, k, v, counts=counts, kv_start=torch.tensor([0, 2]))
    with pytest.raises(KVCompressValueError, match=r"counts.*\[1, 0, 0\]"):
        ops.attention(q, k, v, counts=counts)
