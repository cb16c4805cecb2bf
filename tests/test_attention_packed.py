"""ops.packed_attention (attention over a KIVI-packed layer plus a
full-precision residual window, docs/packed.md) against a float64
reference over the dequantized slots.

The packed inputs come from a small reference packer written here from the
contract (the C pack op is not used). The reference dequantizes them in
float64 and runs plain softmax attention over the logical sequence
(packed slots, then residual slots) with the same causal, kv_start and
counts rules. Error bound as in test_attention: at most 2x the error torch
makes running the same attention in the query dtype (the dequantized K/V
rounded to that dtype), plus the same small absolute floor.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvcompress import ops
from kvcompress.errors import KVCompressTypeError, KVCompressValueError
from test_attention import DTYPE_IDS, DTYPES, _head_attention, assert_within_bound, queries, randn

BITS = [2, 4, 8]
U8 = torch.uint8


@pytest.fixture(autouse=True)
def _restore_threads():
    n = ops.get_num_threads()
    yield
    ops.set_num_threads(n)


# ---------------------------------------------------------------- reference packer


def _affine(x, lo, hi, bits):
    """Codes of x (float32) in groups with minimum lo, maximum hi (broadcast):
    scale = (hi - lo) / (2^bits - 1), code = rint((x - lo) / scale) clamped;
    a constant group has scale 0 and codes 0."""
    top = 2**bits - 1
    scale = (hi - lo) / top
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    code = torch.where(scale > 0, torch.round((x - lo) / safe), torch.zeros_like(x)).clamp(0, top)
    return code.to(torch.uint8), scale


def pack_codes(codes, bits):
    """[..., D] codes -> [..., ceil(D * bits / 8)] uint8, little end first."""
    per = 8 // bits
    D = codes.shape[-1]
    Db = -(-D * bits // 8)
    pad = torch.zeros(*codes.shape[:-1], Db * per - D, dtype=torch.int64)
    c = torch.cat([codes.to(torch.int64), pad], dim=-1).reshape(*codes.shape[:-1], Db, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed, D, bits):
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    c = (packed.to(torch.int64)[..., None] >> shifts) & (2**bits - 1)
    return c.reshape(*packed.shape[:-1], -1)[..., :D]


def quantize_keys(k, bits, G):
    """k [..., n, D] -> codes [..., n, D], mins, scales [..., ceil(n/G), D]
    (per channel over groups of G tokens; the last group may be short)."""
    k = k.to(torch.float32)
    n = k.shape[-2]
    codes, mins, scales = [], [], []
    for t0 in range(0, n, G):
        seg = k[..., t0:t0 + G, :]
        lo, hi = seg.amin(-2, keepdim=True), seg.amax(-2, keepdim=True)
        c, s = _affine(seg, lo, hi, bits)
        codes.append(c)
        mins.append(lo)
        scales.append(s)
    if not codes:
        shape = k.shape[:-2] + (0, k.shape[-1])
        return torch.zeros(shape, dtype=torch.uint8), torch.zeros(shape), torch.zeros(shape)
    return torch.cat(codes, -2), torch.cat(mins, -2), torch.cat(scales, -2)


def quantize_values(v, bits, G):
    """v [..., n, D] -> codes [..., n, D], mins, scales [..., n, ceil(D/G)]
    (per token over groups of G channels; the last group may be short)."""
    v = v.to(torch.float32)
    D = v.shape[-1]
    codes, mins, scales = [], [], []
    for u0 in range(0, D, G):
        seg = v[..., u0:u0 + G]
        lo, hi = seg.amin(-1, keepdim=True), seg.amax(-1, keepdim=True)
        c, s = _affine(seg, lo, hi, bits)
        codes.append(c)
        mins.append(lo)
        scales.append(s)
    return torch.cat(codes, -1), torch.cat(mins, -1), torch.cat(scales, -1)


def dequant_keys(codes, mins, scales, G):
    """float64 [..., n, D] from per-channel token groups."""
    n = codes.shape[-2]
    idx = torch.arange(n) // G
    return mins.double()[..., idx, :] + scales.double()[..., idx, :] * codes.double()


def dequant_values(codes, mins, scales, G):
    D = codes.shape[-1]
    idx = torch.arange(D) // G
    return mins.double()[..., idx] + scales.double()[..., idx] * codes.double()


class Packed:
    """One packed layer (uniform or ragged) with its float64 dequantization."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def args(self):
        return (self.kc, self.km, self.ks, self.vc, self.vm, self.vs)

    def flat(self):
        """A uniform layer's six tensors as one ragged layer: every [B, Hkv,
        ...] tensor flattened to rows (kv head (b, h)'s n slots at offset
        (b * Hkv + h) * n, its n / G key groups likewise)."""
        return tuple(t.reshape(-1, t.shape[-1]) for t in self.args())


def pack_uniform(k, v, bits, G, value_bits=None):
    """k, v [B, Hkv, n, D] -> the uniform packed layer (values at
    `value_bits` when given)."""
    D = k.shape[-1]
    vbits = bits if value_bits is None else value_bits
    kq, km, ks = quantize_keys(k, bits, G)
    vq, vm, vs = quantize_values(v, vbits, G)
    return Packed(kc=pack_codes(kq, bits), km=km, ks=ks, vc=pack_codes(vq, vbits), vm=vm, vs=vs,
                  k64=dequant_keys(kq, km, ks, G), v64=dequant_values(vq, vm, vs, G), D=D)


def pack_ragged(lengths, D, bits, G, seed=0, gap=1, shuffle=True, scale=1.0):
    """Per-head slots of the given lengths, quantized per head and placed in
    one buffer at offsets that are multiples of G, in a shuffled order with
    `gap` unused groups between segments; unused min/scale rows are NaN and
    unused codes random (the op must never read them)."""
    H = len(lengths)
    order = np.random.default_rng(seed).permutation(H) if shuffle else np.arange(H)
    offsets = np.zeros(H, dtype=np.int64)
    pos = gap * G
    for i in order:
        offsets[i] = pos
        pos += -(-lengths[i] // G) * G + gap * G
    N = pos
    T = -(-N // G)
    U = -(-D // G)
    Db = -(-D * bits // 8)
    gen = torch.Generator().manual_seed(seed + 100)
    kc = torch.randint(0, 256, (N, Db), generator=gen, dtype=torch.uint8)
    vc = torch.randint(0, 256, (N, Db), generator=gen, dtype=torch.uint8)
    km, ks = torch.full((T, D), float("nan")), torch.full((T, D), float("nan"))
    vm, vs = torch.full((N, U), float("nan")), torch.full((N, U), float("nan"))
    k64, v64 = [], []
    for i, n in enumerate(lengths):
        o = int(offsets[i])
        k = randn((n, D), seed=seed + 3 * i + 1, scale=scale) + 0.5
        v = randn((n, D), seed=seed + 3 * i + 2)
        p = pack_uniform(k, v, bits, G)
        kc[o:o + n], vc[o:o + n], vm[o:o + n], vs[o:o + n] = p.kc, p.vc, p.vm, p.vs
        km[o // G:o // G + p.km.shape[0]], ks[o // G:o // G + p.ks.shape[0]] = p.km, p.ks
        k64.append(p.k64)
        v64.append(p.v64)
    return Packed(kc=kc, km=km, ks=ks, vc=vc, vm=vm, vs=vs, k64=k64, v64=v64, D=D,
                  offsets=torch.from_numpy(offsets), lengths=torch.tensor(lengths, dtype=torch.int64), N=N)


# ---------------------------------------------------------------- reference attention


def packed_ref(q, pk, rk, rv, scaling=None, kv_start=None, counts=None, dtype=torch.float64, q2=None,
               res_counts=None, res_hidden=None):
    """[B, q, Hq, D] in `dtype` over the logical sequence of every head: its
    dequantized packed slots (float64, then rounded to `dtype`), then the
    residual slots (with ``res_counts`` [B, Hkv, r], their log counts added
    to their logits). Ragged when pk has offsets. With ``q2`` the residual
    slots are read by ``q2`` (``residual_query``): plain attention with the
    query [q, q2] over keys [k, 0] (packed) and [0, k] (residual), so each
    part meets only its own query. With ``res_hidden`` [B * Hkv, 2] a head's
    residual rows ``lo <= j < hi`` are seen by no query (written out as a
    visibility matrix: every query sees the packed slots from ``kv_start``
    on, and residual row ``j`` outside ``[lo, hi)`` when ``j <= r - q + i``)."""
    B, Hq, nq, D = q.shape
    Hkv = rk.shape[1]
    g = Hq // Hkv
    scaling = 1 / math.sqrt(D) if scaling is None else scaling
    ragged = hasattr(pk, "offsets")
    out = torch.zeros(B, nq, Hq, D, dtype=dtype)
    for b in range(B):
        for hk in range(Hkv):
            i = b * Hkv + hk
            if ragged:
                kp, vp, s0 = pk.k64[i], pk.v64[i], 0 if kv_start is None else int(kv_start[b])
                o, n = int(pk.offsets[i]), int(pk.lengths[i])
                c = None if counts is None else counts[o:o + n]
            else:
                kp, vp = pk.k64[b, hk], pk.v64[b, hk]
                s0 = 0 if kv_start is None else int(kv_start[b])
                c = None if counts is None else counts[b, hk]
            rkh, rvh = rk[b, hk], rv[b, hk]
            rch = None if res_counts is None else res_counts[b, hk]
            n = kp.shape[0]
            kh = torch.cat([kp.to(dtype), rkh.to(dtype)])
            vh = torch.cat([vp.to(dtype), rvh.to(dtype)])
            qh = q[b, hk * g:(hk + 1) * g].to(dtype)
            if q2 is not None:
                r = rkh.shape[0]
                kh = torch.cat([torch.cat([kh[:n], torch.zeros(n, D, dtype=dtype)], 1),
                                torch.cat([torch.zeros(r, D, dtype=dtype), kh[n:]], 1)])
                vh = torch.cat([vh, torch.zeros_like(vh)], 1)  # as wide as the query; the pad's output is dropped
                qh = torch.cat([qh, q2[b, hk * g:(hk + 1) * g].to(dtype)], -1)
            logc = None
            if c is not None or rch is not None:
                r = rkh.shape[0]
                logc = torch.cat([torch.zeros(n, dtype=torch.float64) if c is None else torch.log(c.double()),
                                  torch.zeros(r, dtype=torch.float64) if rch is None
                                  else torch.log(rch.double())])
            if res_hidden is None:
                out[b, :, hk * g:(hk + 1) * g] = _head_attention(qh, kh, vh, scaling, s0, logc, dtype)[..., :D]
                continue
            r = rkh.shape[0]
            j, lim = torch.arange(n + r)[None, :], (n + r - nq + torch.arange(nq))[:, None]
            lo, hi = n + int(res_hidden[i, 0]), n + int(res_hidden[i, 1])
            seen = (j >= s0) & ((j < n) | (((j < lo) | (j >= hi)) & (j <= lim)))  # [q, n + r]
            logits = (qh @ kh.T) * scaling + (0 if logc is None else logc.to(dtype))
            logits = logits.masked_fill(~seen, float("-inf"))
            rows = seen.any(1)
            p = torch.softmax(logits[:, rows], dim=-1)
            head = torch.zeros(nq, g, kh.shape[1] if q2 is None else vh.shape[1], dtype=dtype)
            head[rows] = (p @ vh).transpose(0, 1)
            out[b, :, hk * g:(hk + 1) * g] = head[..., :D]
    return out


def check(got, q, pk, rk, rv, what="", **kw):
    assert got.dtype == q.dtype and tuple(got.shape) == (q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    ref = packed_ref(q, pk, rk, rv, **kw)
    same = packed_ref(q, pk, rk, rv, dtype=q.dtype, **kw)
    assert_within_bound(got, ref, same, what)


def run(q, pk, rk, rv, bits, G, **kw):
    if hasattr(pk, "offsets"):
        kw.setdefault("offsets", pk.offsets)
        kw.setdefault("lengths", pk.lengths)
    return ops.packed_attention(q, *pk.args(), rk, rv, bits=bits, group=G, **kw)


def uniform_case(B, Hq, Hkv, nq, n, r, D, G, bits, dtype, seed=0):
    q = queries(B, Hq, nq, D, dtype, seed=seed + 1)
    # keys with a per-channel offset, as real keys have
    k = randn((B, Hkv, n, D), seed=seed + 2, scale=1.5) + randn((1, 1, 1, D), seed=seed + 5)
    v = randn((B, Hkv, n, D), seed=seed + 3)
    pk = pack_uniform(k, v, bits, G)
    rk = randn((B, Hkv, r, D), dtype, seed + 6, scale=1.5)
    rv = randn((B, Hkv, r, D), dtype, seed + 7)
    return q, pk, rk, rv


WIDTH_PAIRS = [(4, 4), (2, 2), (4, 2), (2, 4), (8, 8), (8, 2), (4, 8)]  # (key bits, value bits)


def widths_case(B, Hq, Hkv, nq, n, r, D, G, bits, value_bits, dtype):
    """uniform_case with values at value_bits (the key/value width pairs of
    the packed attention's engines, test_amx.py and test_rows.py)."""
    q, pk, rk, rv = uniform_case(B, Hq, Hkv, nq, n, r, D, G, bits, dtype)
    if value_bits != bits:
        k = randn((B, Hkv, n, D), seed=2, scale=1.5) + randn((1, 1, 1, D), seed=5)
        pk = pack_uniform(k, randn((B, Hkv, n, D), seed=3), bits, G, value_bits=value_bits)
    return q, pk, rk, rv


def run_w(q, pk, rk, rv, bits, value_bits, G, **kw):
    """run with keys at bits and values at value_bits."""
    return ops.packed_attention(q, *pk.args(), rk, rv, bits=bits, value_bits=value_bits, group=G, **kw)


def assert_engine_ragged_equals_uniform(path, B, Hq, Hkv, D):
    """Under `path` (a context manager switching an engine on), the same
    4-bit packed slots as a uniform and as a ragged layer give the same bits."""
    nq, n, r, G = 1, 640, 5, 32
    q, pk, rk, rv = uniform_case(B, Hq, Hkv, nq, n, r, D, G, 4, torch.float32)
    with path:
        u = run(q, pk, rk, rv, 4, G)
        g = ops.packed_attention(q, *pk.flat(), rk, rv, bits=4, group=G, offsets=torch.arange(B * Hkv) * n,
                                 lengths=torch.full((B * Hkv,), n))
    assert torch.equal(u, g)


def assert_engine_threads_bit_identical(path, Hq, Hkv, D):
    """Under `path`, 1, 2 and 3 threads give the same bits (5,000 slots, left padding)."""
    q, pk, rk, rv = uniform_case(2, Hq, Hkv, 1, 5000, 3, D, 32, 4, torch.float32)
    outs = []
    with path:
        for nt in (1, 2, 3):
            ops.set_num_threads(nt)
            outs.append(run(q, pk, rk, rv, 4, 32, kv_start=torch.tensor([0, 100])))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


def assert_fp32_no_floor(got, q, pk, rk, rv, what):
    """got (fp32) within 2x torch's own fp32 error of the float64 reference,
    with no absolute floor (long decodes: the engines' tightest check)."""
    ref = packed_ref(q, pk, rk, rv)
    same = packed_ref(q, pk, rk, rv, dtype=torch.float32)
    err_c, err_t = (got.double() - ref).abs().max().item(), (same.double() - ref).abs().max().item()
    assert err_c <= 2 * err_t, f"{what} error {err_c:.3g} > 2 x torch error {err_t:.3g}"


# ---------------------------------------------------------------- the packer itself


@pytest.mark.parametrize("bits", BITS)
def test_reference_packer_round_trip(bits):
    """The packer follows the contract: byte layout, error <= scale / 2."""
    k, v = randn((2, 3, 37, 40), seed=1), randn((2, 3, 37, 40), seed=2)
    kq, km, ks = quantize_keys(k, bits, 16)
    assert km.shape == (2, 3, 3, 40) and kq.max() <= 2**bits - 1
    packed = pack_codes(kq, bits)
    assert packed.shape == (2, 3, 37, -(-40 * bits // 8))
    assert torch.equal(unpack_codes(packed, 40, bits), kq.to(torch.int64))
    idx = torch.arange(37) // 16
    err = (dequant_keys(kq, km, ks, 16) - k.double()).abs()
    assert (err <= ks.double()[..., idx, :] / 2 + 1e-6).all()
    vq, vm, vs = quantize_values(v, bits, 16)
    assert vm.shape == (2, 3, 37, 3)
    err = (dequant_values(vq, vm, vs, 16) - v.double()).abs()
    assert (err <= vs.double()[..., torch.arange(40) // 16] / 2 + 1e-6).all()
    # a constant group: scale 0, codes 0, exact
    c = torch.full((1, 1, 4, 8), 3.25)
    cq, cm, cs = quantize_keys(c, bits, 4)
    assert (cs == 0).all() and (cq == 0).all() and torch.equal(dequant_keys(cq, cm, cs, 4), c.double())


# ---------------------------------------------------------------- uniform

UNIFORM_SHAPES = [  # (B, Hq, Hkv, q, n, r, D, G)
    (1, 4, 4, 1, 64, 1, 64, 32),  # decode, no GQA
    (2, 8, 2, 1, 700, 5, 128, 32),  # decode, GQA 4, split blocks, 700 % 32 != 0
    (2, 6, 2, 4, 37, 9, 40, 16),  # chunk, short last token and channel groups
    (1, 6, 3, 3, 50, 3, 24, 7),  # G % 16 != 0 (groups across vectors), r == q
    (2, 4, 2, 40, 90, 45, 33, 32),  # three query tiles (no split), odd D
    (1, 2, 1, 1, 0, 4, 16, 8),  # nothing packed yet
]


@pytest.mark.parametrize("shape", UNIFORM_SHAPES, ids=lambda s: "B{}Hq{}Hkv{}q{}n{}r{}D{}G{}".format(*s))
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_uniform_matches_reference(shape, bits, dtype):
    B, Hq, Hkv, nq, n, r, D, G = shape
    q, pk, rk, rv = uniform_case(*shape, bits, dtype)
    got = run(q, pk, rk, rv, bits, G)
    check(got, q, pk, rk, rv, f"{shape} bits={bits} {dtype}")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("G", [1, 5, 16, 64, 128])
def test_group_sizes(bits, G):
    """Groups of one slot / one channel up to groups wider than D."""
    q, pk, rk, rv = uniform_case(2, 4, 2, 2, 150, 3, 72, G, bits, torch.float32, seed=G)
    check(run(q, pk, rk, rv, bits, G, scaling=0.2), q, pk, rk, rv, f"G={G}", scaling=0.2)


@pytest.mark.parametrize("bits,G", [(2, 32), (4, 128), (8, 48)])
def test_long_decode_fp32_without_floor(bits, G):
    """fp32 over thousands of slots of zero-centred values: the 2x bound
    holds without the absolute floor (raw codes, all >= 0, would make the
    sums of w * min and w * scale * code cancel)."""
    B, Hq, Hkv, nq, n, r, D = 1, 8, 2, 1, 6000, 3, 128
    q, pk, rk, rv = uniform_case(B, Hq, Hkv, nq, n, r, D, G, bits, torch.float32)
    got = run(q, pk, rk, rv, bits, G)
    ref = packed_ref(q, pk, rk, rv)
    same = packed_ref(q, pk, rk, rv, dtype=torch.float32)
    err_c, err_t = (got.double() - ref).abs().max().item(), (same.double() - ref).abs().max().item()
    assert err_c <= 2 * err_t, f"C error {err_c:.3g} > 2 x torch error {err_t:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kv_start_padding(dtype):
    """Left padding over the logical sequence, also reaching into the residual."""
    B, Hq, Hkv, nq, n, r, D, G, bits = 4, 6, 2, 4, 45, 6, 24, 16, 4
    q, pk, rk, rv = uniform_case(B, Hq, Hkv, nq, n, r, D, G, bits, dtype)
    # row 2: 2 residual slots padded; row 3: queries 0 and 1 see nothing
    kv_start = torch.tensor([0, 7, n + 2, n + r - nq + 2])
    # counts below 1 too: a per-head packed layer splits a slot's count over copies
    counts = torch.rand(B, Hkv, n, generator=torch.Generator().manual_seed(3)) * 5 + 0.05
    got = run(q, pk, rk, rv, bits, G, kv_start=kv_start, counts=counts, scaling=0.3)
    check(got, q, pk, rk, rv, str(dtype), kv_start=kv_start, counts=counts, scaling=0.3)
    assert (got[3, :2] == 0).all() and (got[3, 2:] != 0).any()
    # padded slots are never read: per-token value groups, counts, residual rows
    pk.vm[1, :, :7] = pk.vs[1, :, :7] = float("nan")
    pk.vm[2:, :] = pk.vs[2:, :] = float("nan")
    counts[1, :, :7] = counts[2:] = float("nan")
    pk.km[2:] = pk.ks[2:] = float("nan")
    rk[2, :, :2] = rv[2, :, :2] = float("nan")
    rk[3, :, :4] = rv[3, :, :4] = float("nan")
    assert torch.equal(run(q, pk, rk, rv, bits, G, kv_start=kv_start, counts=counts, scaling=0.3), got)


def test_padding_whole_row():
    q, pk, rk, rv = uniform_case(2, 4, 2, 1, 9, 2, 16, 4, 8, torch.float32)
    got = run(q, pk, rk, rv, 8, 4, kv_start=torch.tensor([11, 0]))
    assert (got[0] == 0).all() and (got[1] != 0).any()


# ---------------------------------------------------------------- ragged

RAGGED_LENGTHS = {  # per (b, h) packed lengths for B=2, Hkv=2, q as keyed
    1: [5, 0, 700, 1],
    3: [33, 64, 0, 17],
    20: [1000, 20, 0, 300],
    40: [40, 0, 257, 41],  # three query tiles: no split
}


@pytest.mark.parametrize("nq", sorted(RAGGED_LENGTHS))
@pytest.mark.parametrize("use_counts", [False, True], ids=["plain", "counts"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ragged_matches_reference(nq, use_counts, bits, dtype):
    lengths = RAGGED_LENGTHS[nq]
    B, Hq, Hkv, D, G = 2, 6, 2, (48 if nq != 20 else 64), (16 if nq != 3 else 12)
    r = nq + 3
    pk = pack_ragged(lengths, D, bits, G, seed=nq)
    q = queries(B, Hq, nq, D, dtype, seed=nq + 7)
    rk, rv = randn((B, Hkv, r, D), dtype, 8), randn((B, Hkv, r, D), dtype, 9)
    counts = None
    if use_counts:
        counts = torch.from_numpy(np.random.default_rng(nq).integers(1, 9, size=pk.N)).float()
        counts[pk.vm[:, 0].isnan()] = float("nan")  # unused rows: never read
    got = run(q, pk, rk, rv, bits, G, counts=counts)
    check(got, q, pk, rk, rv, f"q={nq} bits={bits} {dtype} counts={use_counts}", counts=counts)


def test_ragged_equals_uniform():
    """The same packed slots stored both ways give the same bits."""
    B, Hq, Hkv, nq, n, r, D, G, bits = 2, 6, 2, 3, 640, 5, 64, 32, 4
    q, pk, rk, rv = uniform_case(B, Hq, Hkv, nq, n, r, D, G, bits, torch.bfloat16)
    counts = torch.randint(1, 5, (B, Hkv, n), generator=torch.Generator().manual_seed(0)).float()
    offsets = torch.arange(B * Hkv) * n  # n is a multiple of G
    lengths = torch.full((B * Hkv,), n)
    ragged = pk.flat()
    for c in (None, counts):
        u = run(q, pk, rk, rv, bits, G, counts=c)
        g = ops.packed_attention(q, *ragged, rk, rv, bits=bits, group=G, offsets=offsets, lengths=lengths,
                                 counts=None if c is None else c.reshape(-1))
        assert torch.equal(u, g)


def test_ragged_all_heads_empty():
    """Nothing packed at all: plain attention over the residual."""
    B, Hq, Hkv, nq, r, D = 2, 4, 2, 2, 5, 32
    pk = pack_ragged([0, 0, 0, 0], D, 4, 8)
    q = queries(B, Hq, nq, D, torch.float32)
    rk, rv = randn((B, Hkv, r, D), seed=4), randn((B, Hkv, r, D), seed=5)
    got = run(q, pk, rk, rv, 4, 8)
    check(got, q, pk, rk, rv)
    torch.testing.assert_close(got, ops.attention(q, rk, rv), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- counts


def test_counts_of_one_equal_no_counts():
    q, pk, rk, rv = uniform_case(2, 6, 2, 3, 300, 4, 64, 32, 2, torch.float32)
    plain = run(q, pk, rk, rv, 2, 32)
    assert torch.equal(run(q, pk, rk, rv, 2, 32, counts=torch.ones(2, 2, 300)), plain)
    counts = torch.ones(2, 2, 300)
    counts[:, :, 5] = 4.0
    assert not torch.equal(run(q, pk, rk, rv, 2, 32, counts=counts), plain)


@pytest.mark.parametrize("layout", ["uniform", "ragged"])
@pytest.mark.parametrize("nq", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_residual_counts_match_reference(layout, nq, dtype):
    """``residual_counts`` add each residual slot's log count to its logit,
    as ``counts`` do for the packed slots (a per-head layer's sink block
    keeps its merge counts), with padding, packed counts and rotated-key
    queries beside them."""
    B, Hq, Hkv, D, G, bits, r = 2, 6, 2, 32, 8, 2, nq + 6
    g = torch.Generator().manual_seed(nq)
    rc = torch.randint(1, 7, (B, Hkv, r), generator=g).float() / 2  # 0.5 .. 3: a split count may be below 1
    rk, rv = randn((B, Hkv, r, D), dtype, 8, scale=1.5), randn((B, Hkv, r, D), dtype, 9)
    q = queries(B, Hq, nq, D, dtype, seed=3)
    q2 = queries(B, Hq, nq, D, dtype, seed=4)
    if layout == "ragged":
        pk = pack_ragged([20, 0, 9, 33], D, bits, G, seed=2)
        counts = torch.from_numpy(np.random.default_rng(1).integers(1, 9, size=pk.N)).float()
        kw = dict(counts=counts)
    else:
        _, pk, _, _ = uniform_case(B, Hq, Hkv, nq, 40, r, D, G, bits, dtype)
        kw = dict(kv_start=torch.tensor([0, 43]))  # row 1's padding reaches into the residual
    for extra in ({}, {"q2": q2}):
        got = run(q, pk, rk, rv, bits, G, residual_counts=rc,
                  **kw, **({"residual_query": q2} if extra else {}))
        check(got, q, pk, rk, rv, f"{layout} q={nq} {dtype}", res_counts=rc, **kw, **extra)
    plain = run(q, pk, rk, rv, bits, G, **kw)
    assert torch.equal(run(q, pk, rk, rv, bits, G, residual_counts=torch.ones(B, Hkv, r), **kw), plain)
    assert not torch.equal(run(q, pk, rk, rv, bits, G, residual_counts=rc, **kw), plain)


@pytest.mark.parametrize("layout", ["uniform", "ragged"])
@pytest.mark.parametrize("nq,n,r", [(1, 40, 7), (3, 40, 9), (1, 300, 200)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_residual_hidden_matches_reference(layout, nq, n, r, dtype):
    """``residual_hidden`` hides a stretch of each head's residual rows and
    nothing else: against the float64 reference without them, beside
    padding, residual counts and residual queries; a hole at the front, in
    the middle (a row mode's sink block before it), none, and one that
    reaches the queries (the head sees its packed part and its first rows),
    for a decode step over split blocks that lie wholly in the hole. Empty
    holes change no bit, and the result is the same on one thread and two."""
    B, Hq, Hkv, D, G, bits = 2, 6, 2, 32, 8, 4
    g = torch.Generator().manual_seed(nq + r)
    rk, rv = randn((B, Hkv, r, D), dtype, 8, scale=1.5), randn((B, Hkv, r, D), dtype, 9)
    rc = torch.randint(1, 7, (B, Hkv, r), generator=g).float() / 2
    q, q2 = queries(B, Hq, nq, D, dtype, seed=3), queries(B, Hq, nq, D, dtype, seed=4)
    rs = torch.tensor([[0, 0], [0, r // 2], [2, r], [4, r - nq]], dtype=torch.int64)
    if layout == "ragged":
        pk = pack_ragged([n // 2, 0, n, 9], D, bits, G, seed=2)
        kw = dict(counts=torch.from_numpy(np.random.default_rng(1).integers(1, 9, size=pk.N)).float())
    else:
        _, pk, _, _ = uniform_case(B, Hq, Hkv, nq, n, r, D, G, bits, dtype)
        kw = dict(kv_start=torch.tensor([3, n + r // 4]))  # row 1's padding reaches into its hole
    for extra in ({}, {"q2": q2}, {"res_counts": rc}):
        call = dict(kw, residual_hidden=rs)
        if "q2" in extra:
            call["residual_query"] = q2
        if "res_counts" in extra:
            call["residual_counts"] = rc
        got = run(q, pk, rk, rv, bits, G, **call)
        check(got, q, pk, rk, rv, f"{layout} q={nq} n={n} r={r} {dtype} {sorted(extra)}", res_hidden=rs,
              **kw, **extra)
        ops.set_num_threads(1 if ops.get_num_threads() > 1 else 2)
        assert torch.equal(run(q, pk, rk, rv, bits, G, **call), got)
    plain = run(q, pk, rk, rv, bits, G, **kw)
    empty = torch.tensor([[0, 0], [3, 3], [r, r], [1, 1]], dtype=torch.int64)
    assert torch.equal(run(q, pk, rk, rv, bits, G, residual_hidden=empty, **kw), plain)
    assert not torch.equal(run(q, pk, rk, rv, bits, G, residual_hidden=rs, **kw), plain)


@pytest.mark.parametrize("nq,r", [(1, 7), (3, 9), (1, 200)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ragged_kv_start_masks_each_heads_leading_slots(nq, r, dtype):
    """``kv_start`` in the ragged layout (a row-mode store's sliding window
    masks the oldest slots of each row's packed part so; the CUDA kernels'
    in test_cuda.py): row ``b``'s heads see none of their first ``kv_start[b]`` logical
    slots (packed, then residual), against the float64 reference; a prefix
    inside the packed part, one past it (a head of 0 or 9 packed slots), one
    reaching the queries, beside counts, a hidden residual stretch and split
    blocks (300 slots), the same bits on 1 and 2 threads; zeros change no
    bit; out of range is refused by name."""
    B, Hq, Hkv, D, G, bits = 2, 6, 2, 32, 8, 4
    rk, rv = randn((B, Hkv, r, D), dtype, 8, scale=1.5), randn((B, Hkv, r, D), dtype, 9)
    q = queries(B, Hq, nq, D, dtype, seed=3)
    pk = pack_ragged([40, 0, 300, 9], D, bits, G, seed=2)
    counts = torch.from_numpy(np.random.default_rng(1).integers(1, 9, size=pk.N)).float()
    for ks in ([5, 3], [r // 2 + 1, 9 + r // 2], [r - nq, 9 + r - nq], [0, 9]):
        kv_start = torch.tensor(ks, dtype=torch.int64)
        for kw in ({}, {"counts": counts}):
            got = run(q, pk, rk, rv, bits, G, kv_start=kv_start, **kw)
            check(got, q, pk, rk, rv, f"q={nq} r={r} {dtype} {ks} {sorted(kw)}", kv_start=kv_start, **kw)
            ops.set_num_threads(1 if ops.get_num_threads() > 1 else 2)
            assert torch.equal(run(q, pk, rk, rv, bits, G, kv_start=kv_start, **kw), got)
        hidden = torch.tensor([[0, 2], [0, 0], [1, r - nq], [0, 0]], dtype=torch.int64)
        got = run(q, pk, rk, rv, bits, G, kv_start=kv_start, residual_hidden=hidden)
        check(got, q, pk, rk, rv, f"q={nq} r={r} {dtype} {ks} hidden", kv_start=kv_start, res_hidden=hidden)
    plain = run(q, pk, rk, rv, bits, G)
    assert torch.equal(run(q, pk, rk, rv, bits, G, kv_start=torch.zeros(B, dtype=torch.int64)), plain)
    assert not torch.equal(run(q, pk, rk, rv, bits, G, kv_start=torch.tensor([5, 3])), plain)
    # row 0's second head holds no packed slot: its limit is r
    with pytest.raises(KVCompressValueError, match=r"kv_start: value .* at batch 0 is outside \[0, n_h \+ r\]"):
        run(q, pk, rk, rv, bits, G, kv_start=torch.tensor([r + 1, 0]))
    with pytest.raises(KVCompressValueError, match="kv_start: 1 entries, expected B = 2"):
        run(q, pk, rk, rv, bits, G, kv_start=torch.tensor([0]))


# ---------------------------------------------------------------- threads, strides, frameworks


@pytest.mark.parametrize("nq", [1, 20, 40])
def test_threads_bit_identical(nq):
    q, pk, rk, rv = uniform_case(2, 6, 2, nq, 3000, nq + 2, 64, 32, 4, torch.bfloat16)
    pr = pack_ragged([3000, 0, 777, 64], 64, 2, 16, seed=5)
    qf = q.float()
    rkf, rvf = rk.float(), rv.float()
    counts = torch.rand(pr.N, generator=torch.Generator().manual_seed(0)) * 4 + 1
    results = []
    for nt in (1, 2, 3):
        ops.set_num_threads(nt)
        results.append((run(q, pk, rk, rv, 4, 32, kv_start=torch.tensor([0, 100])),
                        run(qf, pr, rkf, rvf, 2, 16, counts=counts)))
    for u, r in results[1:]:
        assert torch.equal(u, results[0][0]) and torch.equal(r, results[0][1])


def test_large_split_blocks():
    """A long decode step (40K slots over its heads: split-K blocks of 2048
    slots, kvc_at_block_slots) stays within the float64 bound and gives the
    same bits on 1 and 2 threads; kv_start puts the first block mid-way."""
    q, pk, rk, rv = uniform_case(1, 6, 2, 1, 20000, 3, 64, 32, 4, torch.float32, seed=7)
    start = torch.tensor([2100])
    outs = []
    for nt in (1, 2):
        ops.set_num_threads(nt)
        outs.append(run(q, pk, rk, rv, 4, 32, kv_start=start))
    assert torch.equal(outs[0], outs[1])
    check(outs[0], q, pk, rk, rv, kv_start=start)


def test_batch_rows_independent():
    """A row's result does not depend on the other rows of the batch."""
    pr = pack_ragged([900, 3, 0, 40, 2000, 2], 32, 4, 16)
    q = queries(3, 6, 2, 32, torch.float32)
    rk, rv = randn((3, 2, 4, 32), seed=3), randn((3, 2, 4, 32), seed=4)
    full = run(q, pr, rk, rv, 4, 16)
    one = ops.packed_attention(q[1:2], *pr.args(), rk[1:2], rv[1:2], bits=4, group=16,
                               offsets=pr.offsets[2:4], lengths=pr.lengths[2:4])
    assert torch.equal(full[1:2], one)


def spaced(x, dim):
    """x as every other element of a buffer twice as long along dim."""
    shape = list(x.shape)
    shape[dim] *= 2
    big = torch.zeros(shape, dtype=x.dtype)
    sl = [slice(None)] * x.dim()
    sl[dim] = slice(1, None, 2)
    big[tuple(sl)] = x
    return big[tuple(sl)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_strides_do_not_change_bits(dtype):
    """Strided views of every input (as a store writing into slices makes)
    give the bits of contiguous copies."""
    B, Hq, Hkv, nq, n, r, D, G, bits = 2, 6, 2, 2, 100, 3, 40, 8, 4
    q, pk, rk, rv = uniform_case(B, Hq, Hkv, nq, n, r, D, G, bits, dtype)
    want = run(q, pk, rk, rv, bits, G)
    strided = Packed(kc=spaced(pk.kc, 3), km=pk.km.transpose(2, 3).contiguous().transpose(2, 3),
                     ks=spaced(pk.ks, 2), vc=spaced(pk.vc, 2), vm=spaced(pk.vm, 3),
                     vs=pk.vs.transpose(2, 3).contiguous().transpose(2, 3))
    assert not any(x.is_contiguous() for x in strided.args())
    got = ops.packed_attention(q, *strided.args(), spaced(rk, 3), rv.transpose(2, 3).contiguous().transpose(2, 3),
                               bits=bits, group=G)
    assert torch.equal(got, want)


def test_out_argument_and_numpy():
    q, pk, rk, rv = uniform_case(2, 4, 2, 2, 40, 3, 16, 8, 4, torch.float32)
    want = run(q, pk, rk, rv, 4, 8)
    out = torch.full((2, 2, 4, 16), float("nan"))
    assert run(q, pk, rk, rv, 4, 8, out=out) is out and torch.equal(out, want)
    got = ops.packed_attention(q.numpy(), *(x.numpy() for x in pk.args()), rk.numpy(), rv.numpy(),
                               bits=np.int64(4), group=np.int32(8), kv_start=np.array([0, 0]))
    assert isinstance(got, np.ndarray) and np.array_equal(got, want.numpy())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_residual_rows_round_trip(dtype):
    """One residual slot per head and nothing packed: the output is its
    value row, so every 16-bit pattern goes through the conversions."""
    D = 64
    heads = 65536 // D
    v = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).reshape(1, heads, 1, D)
    q = torch.zeros(1, heads, 1, D, dtype=dtype)
    pk = pack_uniform(torch.zeros(1, heads, 0, D), torch.zeros(1, heads, 0, D), 8, 4)
    got = ops.packed_attention(q, *pk.args(), torch.zeros_like(v), v, bits=8, group=4)
    want = v.transpose(1, 2)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))  # -0 == 0


@pytest.mark.parametrize("nq,n", [(0, 5), (2, 0)])
def test_zero_size(nq, n):
    q, pk, rk, rv = uniform_case(2, 4, 2, nq, n, 2, 16, 4, 4, torch.float32)
    got = run(q, pk, rk, rv, 4, 4)
    assert tuple(got.shape) == (2, nq, 4, 16)
    if nq:
        check(got, q, pk, rk, rv)
    empty = (torch.zeros(0, 8, dtype=U8), torch.zeros(0, 16), torch.zeros(0, 16), torch.zeros(0, 8, dtype=U8),
             torch.zeros(0, 4), torch.zeros(0, 4))
    none = torch.zeros(0, dtype=torch.int64)
    got = ops.packed_attention(torch.zeros(0, 4, 1, 16), *empty, torch.zeros(0, 2, 1, 16), torch.zeros(0, 2, 1, 16),
                               bits=4, group=4, offsets=none, lengths=none)
    assert tuple(got.shape) == (0, 1, 4, 16)
    got = ops.packed_attention(torch.zeros(1, 4, 1, 16), *empty, torch.zeros(1, 2, 1, 16), torch.ones(1, 2, 1, 16),
                               bits=4, group=4, offsets=torch.zeros(2, dtype=torch.int64),
                               lengths=torch.zeros(2, dtype=torch.int64))
    assert (got == 1).all()


def test_large_logits_stable():
    q, pk, rk, rv = uniform_case(1, 3, 1, 1, 600, 2, 16, 32, 8, torch.float32)
    got = run(q, pk, rk, rv, 8, 32, scaling=40.0)
    assert torch.isfinite(got).all()
    check(got, q, pk, rk, rv, scaling=40.0)


# ---------------------------------------------------------------- bad inputs


def _uniform_args():
    q, pk, rk, rv = uniform_case(2, 4, 2, 2, 10, 3, 8, 4, 4, torch.float32)
    return dict(queries=q, key_codes=pk.kc, key_mins=pk.km, key_scales=pk.ks, value_codes=pk.vc,
                value_mins=pk.vm, value_scales=pk.vs, residual_keys=rk, residual_values=rv, bits=4, group=4)


def _ragged_args():
    pr = pack_ragged([10, 4, 0, 8], 8, 4, 4, gap=0, shuffle=False)  # offsets 0, 12, 16, 16; N = 24
    q = queries(2, 4, 2, 8, torch.float32)
    return dict(queries=q, key_codes=pr.kc, key_mins=pr.km, key_scales=pr.ks, value_codes=pr.vc,
                value_mins=pr.vm, value_scales=pr.vs, residual_keys=randn((2, 2, 3, 8)),
                residual_values=randn((2, 2, 3, 8), seed=2), bits=4, group=4, offsets=pr.offsets,
                lengths=pr.lengths)


def _call(a):
    a = dict(a)
    pos = [a.pop(k) for k in ("queries", "key_codes", "key_mins", "key_scales", "value_codes", "value_mins",
                              "value_scales", "residual_keys", "residual_values")]
    return ops.packed_attention(*pos, **a)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(bits=3), KVCompressValueError, "bits"),
        (lambda a: a.update(bits=2), KVCompressValueError, "key_codes.*bytes"),
        (lambda a: a.update(bits=4.0), KVCompressTypeError, "bits"),
        (lambda a: a.update(group=0), KVCompressValueError, "group"),
        (lambda a: a.update(group=2), KVCompressValueError, "key_mins.*token groups"),
        (lambda a: a.update(key_codes=a["key_codes"].to(torch.int32)), KVCompressTypeError, "key_codes.*uint8"),
        (lambda a: a.update(value_codes=a["value_codes"][..., :3]), KVCompressValueError, "value_codes"),
        (lambda a: a.update(key_mins=a["key_mins"].double()), KVCompressTypeError, "key_mins.*float32"),
        (lambda a: a.update(key_scales=a["key_scales"][:, :, :2]), KVCompressValueError, "key_scales"),
        (lambda a: a.update(value_mins=a["value_mins"][..., :1], value_scales=a["value_scales"][..., :1]),
         KVCompressValueError, "value_mins.*channel groups"),
        (lambda a: a.update(value_scales=a["value_scales"].half()), KVCompressTypeError, "value_scales"),
        (lambda a: a.update(value_scales=a["value_scales"][:, :, :9]), KVCompressValueError, "value_scales"),
        (lambda a: a.update(residual_keys=a["residual_keys"].half()), KVCompressTypeError, "residual_keys.*dtype"),
        (lambda a: a.update(residual_values=a["residual_values"][:, :, :2]), KVCompressValueError, "residual_values"),
        (lambda a: a.update(residual_keys=a["residual_keys"][:, :, :1], residual_values=a["residual_values"][:, :, :1]),
         KVCompressValueError, "residual_keys.*fewer"),
        (lambda a: a.update(queries=queries(2, 3, 2, 8, torch.float32)), KVCompressValueError, "queries.*multiple"),
        (lambda a: a.update(queries=queries(3, 4, 2, 8, torch.float32)), KVCompressValueError, "key_codes"),
        (lambda a: a.update(queries=queries(2, 4, 2, 8, torch.float64)), KVCompressTypeError, "queries"),
        (lambda a: a.update(kv_start=torch.tensor([0, 14])), KVCompressValueError, "kv_start.*14"),
        (lambda a: a.update(kv_start=torch.tensor([-1, 0])), KVCompressValueError, "kv_start"),
        (lambda a: a.update(kv_start=torch.tensor([0])), KVCompressValueError, "kv_start"),
        (lambda a: a.update(counts=torch.ones(2, 2, 9)), KVCompressValueError, "counts"),
        (lambda a: a.update(counts=torch.ones(2, 2, 10, dtype=torch.int32)), KVCompressTypeError, "counts"),
        (lambda a: a.update(counts=torch.ones(2, 2, 10) * 0.0), KVCompressValueError, "counts.*0.*> 0"),
        (lambda a: a.update(counts=-torch.ones(2, 2, 10)), KVCompressValueError, "counts.*-1"),
        (lambda a: a.update(counts=torch.ones(2, 2, 10).index_fill(2, torch.tensor([3]), float("nan"))),
         KVCompressValueError, "counts.*nan"),
        (lambda a: a.update(residual_counts=torch.ones(2, 2, 4)), KVCompressValueError, "residual_counts.*shape"),
        (lambda a: a.update(residual_counts=torch.ones(2, 2, 3, dtype=torch.float64)), KVCompressTypeError,
         "residual_counts"),
        (lambda a: a.update(residual_counts=torch.ones(2, 2, 3).index_fill(2, torch.tensor([1]), 0.0)),
         KVCompressValueError, "residual_counts.*\\[0, 0, 1\\].*> 0"),
        (lambda a: a.update(residual_counts=torch.full((2, 2, 3), float("nan"))), KVCompressValueError,
         "residual_counts.*nan"),
        (lambda a: a.update(scaling=float("inf")), KVCompressValueError, "scaling"),
        (lambda a: a.update(residual_hidden=torch.tensor([[0, 0], [0, 0], [1, 4], [0, 0]])), KVCompressValueError,
         "residual_hidden.*\\[1, 4\\) at head 2.*\\[0, 3\\]"),
        (lambda a: a.update(residual_hidden=torch.tensor([[0, 0], [-1, 0], [0, 0], [0, 0]])), KVCompressValueError,
         "residual_hidden"),
        (lambda a: a.update(residual_hidden=torch.tensor([[0, 0], [2, 1], [0, 0], [0, 0]])), KVCompressValueError,
         "residual_hidden.*\\[2, 1\\)"),
        (lambda a: a.update(residual_hidden=torch.zeros(2, 2, dtype=torch.int64)), KVCompressValueError,
         "residual_hidden.*B \\* Hkv"),
        (lambda a: a.update(residual_hidden=torch.zeros(4, 3, dtype=torch.int64)), KVCompressValueError,
         "residual_hidden.*shape"),
        (lambda a: a.update(residual_hidden=torch.zeros(4, dtype=torch.int64)), KVCompressValueError,
         "residual_hidden"),
        (lambda a: a.update(residual_hidden=torch.zeros(4, 2, dtype=torch.int32)), KVCompressTypeError,
         "residual_hidden"),
        (lambda a: a.update(offsets=torch.tensor([0, 12, 16, 16])), KVCompressValueError, "key_codes.*2-D"),
        (lambda a: a.update(out=torch.zeros(2, 2, 4, 7)), KVCompressValueError, "out"),
        (lambda a: a.update(out=torch.zeros(2, 2, 4, 8, dtype=torch.float16)), KVCompressTypeError, "out"),
    ],
)
def test_bad_uniform_inputs(mutate, exc, match):
    a = _uniform_args()
    assert _call(a).shape == (2, 2, 4, 8)
    mutate(a)
    with pytest.raises(exc, match=match):
        _call(a)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(offsets=torch.tensor([0, 13, 16, 16])), KVCompressValueError, "offsets.*multiple"),
        (lambda a: a.update(offsets=torch.tensor([0, 8, 16, 16])), KVCompressValueError, "offsets.*overlap"),
        (lambda a: a.update(offsets=torch.tensor([0, 12, 16, 20])), KVCompressValueError, "offsets.*outside"),
        (lambda a: a.update(offsets=torch.tensor([-4, 12, 16, 16])), KVCompressValueError, "offsets"),
        (lambda a: a.update(offsets=torch.tensor([0, 12, 16])), KVCompressValueError, "lengths"),
        (lambda a: a.update(offsets=torch.tensor([0, 12, 16, 16, 20]), lengths=torch.tensor([1, 1, 1, 1, 1])),
         KVCompressValueError, "offsets.*B \\* Hkv"),
        (lambda a: a.update(lengths=torch.tensor([10, 4, -1, 8])), KVCompressValueError, "lengths"),
        (lambda a: a.update(lengths=None), KVCompressValueError, "lengths"),
        (lambda a: a.update(offsets=torch.tensor([0.0, 12, 16, 16])), KVCompressTypeError, "offsets"),
        # (a ragged layout takes kv_start since row mode's sliding windows: within each head's n_h + r)
        (lambda a: a.update(kv_start=torch.tensor([0, 1000])), KVCompressValueError,
         "kv_start: value 1000 at batch 1 is outside"),
        (lambda a: a.update(kv_start=torch.tensor([0, -1])), KVCompressValueError, "kv_start: value -1"),
        (lambda a: a.update(kv_start=torch.tensor([0.0, 0.0])), KVCompressTypeError, "kv_start"),
        (lambda a: a.update(key_mins=a["key_mins"][:5], key_scales=a["key_scales"][:5]),
         KVCompressValueError, "key_mins.*token groups"),
        (lambda a: a.update(value_mins=a["value_mins"][:23]), KVCompressValueError, "value_mins"),
        (lambda a: a.update(value_codes=a["value_codes"][:, :3]), KVCompressValueError, "value_codes"),
        (lambda a: a.update(counts=torch.ones(23)), KVCompressValueError, "counts"),
        (lambda a: a.update(counts=torch.ones(24).index_fill(0, torch.tensor([13]), 0.0)),
         KVCompressValueError, "counts.*row 13"),
        (lambda a: a.update(counts=torch.ones(24).index_fill(0, torch.tensor([2]), float("inf"))),
         KVCompressValueError, "counts"),
    ],
)
def test_bad_ragged_inputs(mutate, exc, match):
    a = _ragged_args()
    assert _call(a).shape == (2, 2, 4, 8)
    mutate(a)
    with pytest.raises(exc, match=match):
        _call(a)


def test_unused_rows_not_checked():
    a = _ragged_args()
    counts = torch.ones(24)
    counts[10] = float("nan")  # after head 0's 10 slots, before head 1's offset
    counts[11] = 0.0
    _call(dict(a, counts=counts))


# ---------------------------------------------------------------- lse, and a packed part on its own (r = 0)


def lse_ref(q, pk, rk, scaling=None, kv_start=None, counts=None, all_visible=False):
    """float64 ``[B, Hq, q]`` log-sum-exp of the scaled logits (plus log
    counts) each query sees; -inf for a query that sees nothing. With
    `all_visible` every query sees every packed slot (the r = 0 rule)."""
    B, Hq, nq, D = q.shape
    Hkv = rk.shape[1]
    g = Hq // Hkv
    scaling = 1 / math.sqrt(D) if scaling is None else scaling
    ragged = hasattr(pk, "offsets")
    out = torch.full((B, Hq, nq), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for hk in range(Hkv):
            i = b * Hkv + hk
            if ragged:
                kp, s0 = pk.k64[i], 0
                o, n = int(pk.offsets[i]), int(pk.lengths[i])
                c = None if counts is None else counts[o:o + n]
            else:
                kp, s0 = pk.k64[b, hk], 0 if kv_start is None else int(kv_start[b])
                c = None if counts is None else counts[b, hk]
            kh = torch.cat([kp.double(), rk[b, hk].double()])
            n_all = kh.shape[0]
            logits = (q[b, hk * g:(hk + 1) * g].double() @ kh.T) * scaling  # [g, q, n]
            if c is not None:
                logits[..., : kp.shape[0]] += torch.log(c.double())
            j = torch.arange(n_all)
            lim = torch.full((nq,), n_all - 1) if all_visible else n_all - nq + torch.arange(nq)
            visible = (j[None, :] <= lim[:, None]) & (j[None, :] >= s0)
            out[b, hk * g:(hk + 1) * g] = torch.logsumexp(logits.masked_fill(~visible, float("-inf")), -1)
    return out


def one_query_at_a_time(q, pk, rk, rv, **kw):
    """The r = 0 reference: each query alone sees every packed slot (a
    single query's causal limit is the last slot)."""
    return torch.cat([packed_ref(q[:, :, i:i + 1], pk, rk, rv, **kw) for i in range(q.shape[2])], 1)


def check_lse(lse, ref, what=""):
    assert lse.dtype == torch.float32 and lse.shape == ref.shape, what
    assert torch.equal(lse.isinf(), ref.isinf()), what
    fin = ref.isfinite()
    torch.testing.assert_close(lse[fin].double(), ref[fin], rtol=1e-5, atol=2e-4, msg=what)


@pytest.mark.parametrize("shape", UNIFORM_SHAPES[:5], ids=lambda s: "B{}Hq{}Hkv{}q{}n{}r{}D{}G{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_return_lse_uniform(shape, dtype):
    """lse is the float64 log-sum-exp over what each query sees, and asking
    for it leaves the output's bits alone."""
    B, Hq, Hkv, nq, n, r, D, G = shape
    q, pk, rk, rv = uniform_case(*shape, 4, dtype)
    kv_start = torch.tensor([0, n // 3 + 1][:B])
    out, lse = run(q, pk, rk, rv, 4, G, kv_start=kv_start, return_lse=True)
    assert torch.equal(out, run(q, pk, rk, rv, 4, G, kv_start=kv_start))
    check_lse(lse, lse_ref(q, pk, rk, kv_start=kv_start), f"{shape} {dtype}")


def test_return_lse_ragged_counts_and_empty_heads():
    lengths = [40, 0, 17, 64]
    B, Hq, Hkv, nq, D, G = 2, 6, 2, 3, 48, 16
    pk = pack_ragged(lengths, D, 2, G, seed=3)
    q = queries(B, Hq, nq, D, torch.float32, seed=5)
    counts = torch.from_numpy(np.random.default_rng(1).integers(1, 9, size=pk.N)).float()
    for r in (nq + 2, 0):
        rk, rv = randn((B, Hkv, r, D), seed=8), randn((B, Hkv, r, D), seed=9)
        out, lse = run(q, pk, rk, rv, 2, G, counts=counts, return_lse=True)
        check_lse(lse, lse_ref(q, pk, rk, counts=counts, all_visible=r == 0), f"r={r}")
        if r == 0:
            # the empty head's queries see nothing: zeros and -inf
            assert torch.equal(out[:, :, 3:6][0], torch.zeros_like(out[:, :, 3:6][0]))
            assert torch.isneginf(lse[0, 3:6]).all() and lse[1].isfinite().all()
            ref = one_query_at_a_time(q, pk, rk, rv, counts=counts)
            same = one_query_at_a_time(q, pk, rk, rv, counts=counts, dtype=torch.float32)
            assert_within_bound(out, ref, same, "ragged r=0")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("nq", [1, 5, 20])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_no_residual_every_query_sees_every_slot(bits, nq, dtype):
    """r = 0: the queries follow the packed part, none is causally cut."""
    B, Hq, Hkv, n, D, G = 2, 8, 2, 300, 64, 32
    q, pk, _, _ = uniform_case(B, Hq, Hkv, nq, n, 1, D, G, bits, dtype, seed=nq)
    rk = rv = torch.zeros(B, Hkv, 0, D, dtype=dtype)
    kv_start = torch.tensor([0, 45])
    out, lse = run(q, pk, rk, rv, bits, G, kv_start=kv_start, return_lse=True)
    ref = one_query_at_a_time(q, pk, rk, rv, kv_start=kv_start)
    same = one_query_at_a_time(q, pk, rk, rv, kv_start=kv_start, dtype=dtype)
    assert_within_bound(out, ref, same, f"bits={bits} q={nq}")
    check_lse(lse, lse_ref(q, pk, rk, kv_start=kv_start, all_visible=True))
    # every row masked: zeros and -inf
    out, lse = run(q, pk, rk, rv, bits, G, kv_start=torch.tensor([n, 0]), return_lse=True)
    assert not out[0].any() and torch.isneginf(lse[0]).all() and lse[1].isfinite().all()


def test_two_parts_join_through_lse():
    """Attention over one layer equals its two halves (one with the
    residual, one packed alone) joined by their lse: the mixed-precision
    read."""
    B, Hq, Hkv, nq, D, G = 2, 6, 2, 3, 64, 16
    q, lo, rk, rv = uniform_case(B, Hq, Hkv, nq, 96, nq + 4, D, G, 2, torch.float32, seed=1)
    _, hi, _, _ = uniform_case(B, Hq, Hkv, nq, 40, 1, D, G, 8, torch.float32, seed=2)
    none = torch.zeros(B, Hkv, 0, D)
    o1, l1 = run(q, lo, rk, rv, 2, G, return_lse=True)
    o2, l2 = run(q, hi, none, none, 8, G, return_lse=True)
    m = torch.maximum(l1, l2)
    e1, e2 = (l1 - m).exp().transpose(1, 2)[..., None], (l2 - m).exp().transpose(1, 2)[..., None]
    joined = (e1 * o1 + e2 * o2) / (e1 + e2)
    # float64 reference over the union: hi's slots, then lo's packed slots, then the residual
    k = torch.cat([hi.k64, lo.k64, rk.double()], 2)
    v = torch.cat([hi.v64, lo.v64, rv.double()], 2)
    ref = torch.zeros(B, nq, Hq, D, dtype=torch.float64)
    g = Hq // Hkv
    for b in range(B):
        for hk in range(Hkv):
            ref[b, :, hk * g:(hk + 1) * g] = _head_attention(q[b, hk * g:(hk + 1) * g].double(), k[b, hk], v[b, hk],
                                                              1 / math.sqrt(D), 0, None, torch.float64)
    torch.testing.assert_close(joined.double(), ref, rtol=1e-5, atol=1e-5)


def test_return_lse_flag_checked():
    q, pk, rk, rv = uniform_case(1, 2, 1, 1, 32, 1, 16, 8, 4, torch.float32)
    with pytest.raises(KVCompressTypeError, match="return_lse"):
        run(q, pk, rk, rv, 4, 8, return_lse=torch.zeros(0))


# ---------------------------------------------------------------- keys and values at different widths


@pytest.mark.parametrize("bits,value_bits", [(4, 2), (8, 2), (2, 4), (8, 4)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("D,G", [(64, 32), (40, 16), (24, 7)])
def test_value_bits(bits, value_bits, dtype, D, G):
    """Value codes of their own width (rows of ceil(D * value_bits / 8)
    bytes) against float64 over the dequantized slots, uniform and ragged."""
    B, Hq, Hkv, nq, n, r = 2, 6, 2, 3, 150, 5
    q = queries(B, Hq, nq, D, dtype, seed=3)
    k = randn((B, Hkv, n, D), seed=4, scale=1.5) + randn((1, 1, 1, D), seed=5)
    v = randn((B, Hkv, n, D), seed=6)
    pk = pack_uniform(k, v, bits, G, value_bits=value_bits)
    assert pk.vc.shape[-1] == -(-D * value_bits // 8) != pk.kc.shape[-1]
    rk, rv = randn((B, Hkv, r, D), dtype, 7), randn((B, Hkv, r, D), dtype, 8)
    kv_start = torch.tensor([0, 33])
    got = run(q, pk, rk, rv, bits, G, value_bits=value_bits, kv_start=kv_start)
    check(got, q, pk, rk, rv, f"K{bits}V{value_bits} {dtype}", kv_start=kv_start)
    if G == 32:
        # the same slots in the ragged layout give the same bits
        ragged = pk.flat()
        offsets, lengths = torch.arange(B * Hkv) * n // G * G, torch.full((B * Hkv,), n)
        if n % G:
            # segments must start on group boundaries: lay each head out in its own padded block
            step = -(-n // G) * G
            rows = lambda x, per: torch.cat([torch.cat([h, h[-1:].expand(per - h.shape[0], -1)])  # noqa: E731
                                             for h in x.reshape(B * Hkv, -1, x.shape[-1])])
            ragged = (rows(pk.kc, step), pk.km.reshape(-1, D), pk.ks.reshape(-1, D), rows(pk.vc, step),
                      rows(pk.vm, step), rows(pk.vs, step))
            offsets = torch.arange(B * Hkv) * step
        g = ops.packed_attention(q, *ragged, rk, rv, bits=bits, value_bits=value_bits, group=G, offsets=offsets,
                                 lengths=lengths)
        assert torch.equal(g, run(q, pk, rk, rv, bits, G, value_bits=value_bits))


def test_value_bits_same_as_bits_changes_nothing():
    q, pk, rk, rv = uniform_case(2, 6, 2, 3, 300, 4, 64, 32, 4, torch.bfloat16)
    assert torch.equal(run(q, pk, rk, rv, 4, 32, value_bits=4), run(q, pk, rk, rv, 4, 32))


@pytest.mark.parametrize("value_bits,exc,match", [
    (3, KVCompressValueError, "value_bits: expected 2, 4 or 8"),
    (4, KVCompressValueError, "value_codes: rows of 16 bytes, expected ceil\\(D \\* value_bits / 8\\) = 32"),
    ("2", KVCompressTypeError, "value_bits"),
])
def test_value_bits_refused(value_bits, exc, match):
    q, pk, rk, rv = uniform_case(1, 2, 1, 1, 64, 1, 64, 32, 4, torch.float32)
    pk = pack_uniform(torch.randn(1, 1, 64, 64), torch.randn(1, 1, 64, 64), 4, 32, value_bits=2)
    with pytest.raises(exc, match=match):
        run(q, pk, rk, rv, 4, 32, value_bits=value_bits)


# ---------------------------------------------------------------- residual queries of their own


@pytest.mark.parametrize("shape", UNIFORM_SHAPES, ids=lambda s: "B{}Hq{}Hkv{}q{}n{}r{}D{}G{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_residual_query_uniform(shape, dtype):
    """``residual_query``: the packed slots meet ``queries``, the residual
    ``residual_query`` (rotated keys' read in one call), within the bound of
    the float64 reference; with padding reaching into the residual too."""
    B, Hq, Hkv, nq, n, r, D, G = shape
    q, pk, rk, rv = uniform_case(*shape, 2, dtype)
    q2 = queries(B, Hq, nq, D, dtype, seed=41)
    kv_start = torch.tensor([0, n + 1][:B]).clamp(max=n + r - nq)
    got = run(q, pk, rk, rv, 2, G, kv_start=kv_start, residual_query=q2, scaling=0.4)
    ref = packed_ref(q, pk, rk, rv, kv_start=kv_start, scaling=0.4, q2=q2)
    same = packed_ref(q, pk, rk, rv, kv_start=kv_start, scaling=0.4, dtype=dtype, q2=q2)
    assert_within_bound(got, ref, same, f"{shape} {dtype}")
    if r:  # it matters: the plain call differs
        assert not torch.equal(got, run(q, pk, rk, rv, 2, G, kv_start=kv_start, scaling=0.4))
    # the queries themselves as residual queries: the plain call's bits
    assert torch.equal(run(q, pk, rk, rv, 2, G, kv_start=kv_start, residual_query=q.clone(), scaling=0.4),
                       run(q, pk, rk, rv, 2, G, kv_start=kv_start, scaling=0.4))


@pytest.mark.parametrize("nq", [1, 3, 40])
def test_residual_query_ragged_counts_threads(nq):
    """Per-head packed segments (an empty head, counts) with residual
    queries of their own, split-K blocks over a long head: float64 bound,
    and the same bits on 1, 2 and 3 threads."""
    lengths = [2500, 0, 33, 300]
    B, Hq, Hkv, D, G, r = 2, 6, 2, 64, 16, nq + 4
    pk = pack_ragged(lengths, D, 4, G, seed=nq)
    q, q2 = queries(B, Hq, nq, D, torch.float32, seed=2), queries(B, Hq, nq, D, torch.float32, seed=3)
    rk, rv = randn((B, Hkv, r, D), seed=8), randn((B, Hkv, r, D), seed=9)
    counts = torch.from_numpy(np.random.default_rng(nq).integers(1, 9, size=pk.N)).float()
    outs = []
    for nt in (1, 2, 3):
        ops.set_num_threads(nt)
        outs.append(run(q, pk, rk, rv, 4, G, counts=counts, residual_query=q2))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    assert_within_bound(outs[0], packed_ref(q, pk, rk, rv, counts=counts, q2=q2),
                        packed_ref(q, pk, rk, rv, counts=counts, dtype=torch.float32, q2=q2), f"q={nq}")


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda a: a.update(residual_query=queries(2, 4, 1, 8, torch.float32)), KVCompressValueError, "residual_query"),
    (lambda a: a.update(residual_query=queries(2, 4, 2, 16, torch.float32)), KVCompressValueError,
     "residual_query"),
    (lambda a: a.update(residual_query=queries(2, 4, 2, 8, torch.bfloat16)), KVCompressTypeError, "residual_query"),
    (lambda a: a.update(residual_query=torch.zeros(2, 4, 2)), KVCompressValueError, "residual_query"),
])
@pytest.mark.parametrize("layout", ["uniform", "ragged"])
def test_bad_residual_query(mutate, exc, match, layout):
    a = _uniform_args() if layout == "uniform" else _ragged_args()
    a["residual_query"] = queries(2, 4, 2, 8, torch.float32, seed=9)
    assert _call(a).shape == (2, 2, 4, 8)
    mutate(a)
    with pytest.raises(exc, match=match):
        _call(a)


def test_residual_query_refused_off_the_cpu():
    """Only the CPU kernel takes residual queries: other devices are refused
    by name before anything runs (a meta tensor stands in for a GPU one)."""
    a = _uniform_args()
    a["queries"] = a["queries"].to("meta")
    a["residual_query"] = a["queries"]
    with pytest.raises(NotImplementedError, match="residual_query"):
        _call(a)


def test_residual_hidden_refused_off_the_cpu():
    """Only the CPU kernel takes a hidden stretch of residual rows: other
    devices are refused by name before anything runs (a meta tensor stands
    in for a GPU one; the store joins calls there instead)."""
    a = _uniform_args()
    a["queries"] = a["queries"].to("meta")
    a["residual_hidden"] = torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(NotImplementedError, match="residual_hidden"):
        _call(a)
