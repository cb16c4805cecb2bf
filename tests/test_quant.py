"""ops.pack_keys / pack_values / unpack_keys / unpack_values (the packed KV
layout of docs/packed.md) against a NumPy reference written here from the
contract.

Every step of the contract is exactly rounded (fp32 subtraction, division
and rint; min/max; the dequantization product is exact in float64), so the
reference must match bit for bit: codes, mins, scales and unpacked values.
The round trip is also checked against the inputs in float64: per element
within ``scale / 2`` plus fp32 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvcompress import _C, ops
from kvcompress.errors import KVCompressTypeError, KVCompressValueError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
BITS = [2, 4, 8]
KINDS = ["keys", "values"]
EPS32 = 2.0**-23

PACK = {"keys": ops.pack_keys, "values": ops.pack_values}
UNPACK = {"keys": ops.unpack_keys, "values": ops.unpack_values}


@pytest.fixture(autouse=True)
def _restore_threads():
    n = ops.get_num_threads()
    yield
    ops.set_num_threads(n)


def randn(shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def f32(x) -> np.ndarray:
    """The fp32 values of a tensor (exact for fp16/bf16)."""
    return x.detach().to(torch.float32).numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)


# ---------------------------------------------------------------- reference


def _group_slices(size, G):
    return [slice(s, min(size, s + G)) for s in range(0, size, G)]


def ref_pack(x, bits, G, kind):
    """(codes uint8 [B, H, n, Db], mins, scales, per-element min, per-element scale)
    following docs/packed.md step by step in float32."""
    x = f32(x)
    B, H, n, D = x.shape
    L = np.float32(2**bits - 1)
    axis = 2 if kind == "keys" else 3
    slices = _group_slices(x.shape[axis], G)
    mn = np.stack([x[(slice(None),) * axis + (s,)].min(axis=axis) for s in slices], axis=axis) if slices else \
        np.zeros((B, H, 0, D) if kind == "keys" else (B, H, n, 0), np.float32)
    mx = np.stack([x[(slice(None),) * axis + (s,)].max(axis=axis) for s in slices], axis=axis) if slices else mn
    mn = (mn + np.float32(0)).astype(np.float32)  # -0 is stored as +0
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        scale = np.where(mx == mn, np.float32(0), (mx - mn) / L).astype(np.float32)
    # per-element group parameters
    reps = [s.stop - s.start for s in slices]
    mn_e = np.repeat(mn, reps, axis=axis) if slices else np.zeros_like(x)
    sc_e = np.repeat(scale, reps, axis=axis) if slices else np.zeros_like(x)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        q = np.rint((x - mn_e) / sc_e).astype(np.float32)
        q = np.where(np.isnan(q), np.float32(0), np.clip(q, 0, L))
    code = np.where(sc_e > 0, q, 0).astype(np.uint8)
    per = 8 // bits
    Db = (D * bits + 7) // 8
    padded = np.zeros((B, H, n, Db * per), np.uint8)
    padded[..., :D] = code
    padded = padded.reshape(B, H, n, Db, per).astype(np.uint32)
    codes = np.zeros((B, H, n, Db), np.uint32)
    for i in range(per):
        codes |= padded[..., i] << (i * bits)
    return codes.astype(np.uint8), mn, scale, mn_e, sc_e, code


def ref_unpack_f32(code, mn_e, sc_e):
    """min + scale * code rounded once to float32 (the product is exact in float64)."""
    return (mn_e.astype(np.float64) + sc_e.astype(np.float64) * code.astype(np.float64)).astype(np.float32)


def to_dtype(a32: np.ndarray, dtype):
    return torch.from_numpy(np.ascontiguousarray(a32)).to(dtype)


def same_bits(a, b):
    a = torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a
    b = torch.as_tensor(np.asarray(b)) if not isinstance(b, torch.Tensor) else b
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    if a.dtype in (torch.float16, torch.bfloat16):
        return torch.equal(a.view(torch.int16), b.view(torch.int16))
    if a.dtype == torch.float32:
        return torch.equal(a.view(torch.int32), b.view(torch.int32))
    return torch.equal(a, b)


def check_round_trip(x, back, mn_e, sc_e, bits):
    """|back - x| <= scale / 2 + fp32 rounding, per element, in float64."""
    x64 = f32(x).astype(np.float64)
    got = f32(back).astype(np.float64)
    rng = sc_e.astype(np.float64) * (2**bits - 1)
    bound = sc_e.astype(np.float64) / 2 + 4 * EPS32 * (rng + np.abs(x64))
    err = np.abs(got - x64)
    assert (err <= bound).all(), f"round trip error {err.max():.3g} over bound at {np.unravel_index((err - bound).argmax(), err.shape)}"


# ---------------------------------------------------------------- against the reference

SHAPES = [  # B, H, n, D, G
    (1, 1, 1, 1, 1),
    (2, 3, 13, 7, 4),  # n % G != 0, D % G != 0, D odd
    (1, 2, 5, 64, 32),  # keys: G > n, one short group
    (2, 2, 33, 40, 1),  # G = 1: every group constant
    (1, 1, 8, 9, 16),  # values: G > D
    (1, 2, 70, 130, 32),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}n{}D{}G{}".format(*s))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matches_reference(shape, kind, bits, dtype):
    B, H, n, D, G = shape
    x = randn((B, H, n, D), dtype, seed=bits + n, scale=3.0)
    x[..., :1] *= 40  # an outlier channel
    codes, mins, scales = PACK[kind](x, bits, G)
    rcodes, rmin, rscale, mn_e, sc_e, code = ref_pack(x, bits, G, kind)
    assert codes.dtype == torch.uint8 and mins.dtype == scales.dtype == torch.float32
    assert same_bits(codes, torch.from_numpy(rcodes))
    assert same_bits(mins, torch.from_numpy(rmin))
    assert same_bits(scales, torch.from_numpy(rscale))
    kw = {"head_dim": D} if kind == "values" else {}
    back = UNPACK[kind](codes, mins, scales, bits, G, **kw)
    assert back.dtype == torch.float32 and back.shape == x.shape
    ref32 = ref_unpack_f32(code, mn_e, sc_e)
    assert same_bits(back, torch.from_numpy(ref32))
    check_round_trip(x, back, mn_e, sc_e, bits)
    for out_dtype in (torch.float16, torch.bfloat16):
        low = UNPACK[kind](codes, mins, scales, bits, G, dtype=out_dtype, **kw)
        assert same_bits(low, to_dtype(ref32, out_dtype))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", BITS)
def test_wide_range_and_tiny_range(kind, bits):
    """Magnitudes from 1e-30 to 1e37 in one tensor, and a range so small
    that its scale underflows to 0 (codes 0, like a constant group)."""
    x = randn((1, 2, 9, 12), seed=4) * torch.tensor([1e-30, 1e-5, 1.0, 1e5, 1e20, 1e37]).repeat(2)
    codes, mins, scales = PACK[kind](x, bits, 3)
    rcodes, rmin, rscale, mn_e, sc_e, _ = ref_pack(x, bits, 3, kind)
    assert same_bits(codes, torch.from_numpy(rcodes))
    assert same_bits(scales, torch.from_numpy(rscale)) and same_bits(mins, torch.from_numpy(rmin))
    check_round_trip(x, UNPACK[kind](codes, mins, scales, bits, 3, **({"head_dim": 12} if kind == "values" else {})),
                     mn_e, sc_e, bits)
    tiny = torch.zeros(1, 1, 2, 2)
    tiny.view(torch.int32)[0, 0, 1] = 5  # 5 * 2^-149: (max - min) / 15 and / 3 round to 0
    tiny.view(torch.int32)[0, 0, 0, 1] = 5
    if bits == 8 or bits == 4:
        codes, mins, scales = PACK[kind](tiny, bits, 2)
        assert (scales == 0).all() and (codes == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_huge_values_at_the_bound(kind):
    """|x| = FLT_MAX / 2 is accepted (max - min is then exactly FLT_MAX);
    one ulp more is refused."""
    half = np.float32(np.finfo(np.float32).max / 2)
    x = torch.tensor([[[[half, -half], [-half, half]]]])
    codes, mins, scales = PACK[kind](x, 8, 2)
    assert torch.isfinite(scales).all() and scales.max().item() == float(np.finfo(np.float32).max / 255)
    back = UNPACK[kind](codes, mins, scales, 8, 2, **({"head_dim": 2} if kind == "values" else {}))
    assert torch.equal(back, x)
    x.view(torch.int32)[0, 0, 1, 1] += 1
    with pytest.raises(KVCompressValueError, match=rf"{kind}: element \[0, 0, 1, 1\] is 1.7\d*e\+38"):
        PACK[kind](x, 8, 2)
    bf = torch.full((1, 1, 2, 2), 2e38, dtype=torch.bfloat16)
    with pytest.raises(KVCompressValueError, match=rf"{kind}: element \[0, 0, 0, 0\]"):
        PACK[kind](bf, 4, 2)


# ---------------------------------------------------------------- byte layout by hand


def test_byte_layout_values_2bit():
    # one group of 6 channels: min 0, max 3, scale 1; 1.5 and 2.5 round to even
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, 1.5, 2.5]).reshape(1, 1, 1, 6)
    codes, mins, scales = ops.pack_values(x, 2, 6)
    # codes 0, 1, 2, 3 | 2, 2: byte 0 = 0 | 1 << 2 | 2 << 4 | 3 << 6, byte 1 = 2 | 2 << 2
    assert codes.flatten().tolist() == [0xE4, 0x0A]
    assert mins.flatten().tolist() == [0.0] and scales.flatten().tolist() == [1.0]
    back = ops.unpack_values(codes, mins, scales, 2, 6, head_dim=6)
    assert back.flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 2.0, 2.0]


def test_byte_layout_keys_4bit():
    # G = 2 tokens; channel 0: 0, 15 (scale 1); channel 1: 5, 5 (constant);
    # channel 2: -1, 14 (scale 1)
    x = torch.tensor([[0.0, 5.0, -1.0], [15.0, 5.0, 14.0]]).reshape(1, 1, 2, 3)
    codes, mins, scales = ops.pack_keys(x, 4, 2)
    assert codes[0, 0].tolist() == [[0x00, 0x00], [0x0F, 0x0F]]  # codes (0, 0, 0) and (15, 0, 15)
    assert mins[0, 0].tolist() == [[0.0, 5.0, -1.0]] and scales[0, 0].tolist() == [[1.0, 0.0, 1.0]]
    assert torch.equal(ops.unpack_keys(codes, mins, scales, 4, 2), x)


def test_byte_layout_8bit_and_unused_bits():
    x = torch.tensor([0.0, 255.0, 17.0]).reshape(1, 1, 1, 3)
    codes, mins, scales = ops.pack_values(x, 8, 3)
    assert codes.flatten().tolist() == [0, 255, 17]
    # 2 bits, D = 3: the last byte's top two bits are unused, written 0, ignored on unpack
    y = torch.tensor([0.0, 3.0, 1.0]).reshape(1, 1, 1, 3)
    codes, mins, scales = ops.pack_values(y, 2, 3)
    assert codes.flatten().tolist() == [0 | 3 << 2 | 1 << 4]
    codes |= 0xC0
    assert torch.equal(ops.unpack_values(codes, mins, scales, 2, 3, head_dim=3), y)


def test_packed_row_bytes():
    assert [ops.packed_row_bytes(D, 2) for D in (0, 1, 4, 5, 128)] == [0, 1, 1, 2, 32]
    assert [ops.packed_row_bytes(D, 4) for D in (0, 1, 2, 3, 128)] == [0, 1, 1, 2, 64]
    assert ops.packed_row_bytes(7, 8) == 7
    with pytest.raises(KVCompressValueError, match="bits: expected 2, 4 or 8, got 3"):
        ops.packed_row_bytes(8, 3)
    with pytest.raises(KVCompressValueError, match="D: must be >= 0"):
        ops.packed_row_bytes(-1, 2)
    with pytest.raises(KVCompressTypeError, match="D: expected an int"):
        ops.packed_row_bytes(2.0, 2)


# ---------------------------------------------------------------- constant groups, zeros


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_constant_groups_exact(kind, bits, dtype):
    G = 4
    x = randn((2, 2, 8, 8), dtype, seed=7)
    # make every other group constant (0.1, a value with no short binary form)
    if kind == "keys":
        x[:, :, 0:4, ::2] = x[:, :, 0:1, ::2]
        x[:, :, 4:8, 1::2] = torch.tensor(0.1, dtype=dtype)
    else:
        x[:, :, ::2, 0:4] = x[:, :, ::2, 0:1]
        x[:, :, 1::2, 4:8] = torch.tensor(0.1, dtype=dtype)
    codes, mins, scales = PACK[kind](x, bits, G)
    back = UNPACK[kind](codes, mins, scales, bits, G, dtype=dtype)
    const = scales == 0
    assert const.sum().item() == 32
    if kind == "keys":
        ex = const.repeat_interleave(G, dim=2)
        assert torch.equal(back[ex], x[ex])
    else:
        ex = const.repeat_interleave(G, dim=3)
        assert torch.equal(back[ex], x[ex])


def test_signed_zeros():
    """A group of -0 and +0 is constant; its min is stored as +0."""
    x = torch.tensor([[-0.0, 0.0], [0.0, -0.0]]).reshape(1, 1, 2, 2)
    for kind in KINDS:
        codes, mins, scales = PACK[kind](x, 4, 2)
        assert (codes == 0).all() and (scales == 0).all()
        assert (mins.view(torch.int32) == 0).all()  # +0 bits


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", BITS)
def test_strided_outputs_written_only_in_place(kind, bits):
    """Outputs as slices of larger buffers (the store's case): the slices get
    what a fresh call gives, everything around them stays as it was."""
    B, H, n, D, G = 2, 3, 11, 10, 4
    x = randn((B, H, n, D), torch.bfloat16, seed=bits)
    want = PACK[kind](x, bits, G)
    Db = ops.packed_row_bytes(D, bits)
    gshape = list(want.mins.shape)
    codes_buf = torch.full((B, H, n + 9, 2 * Db + 3), 0xAB, dtype=torch.uint8)
    mins_buf = torch.full((B, H + 1, gshape[2] + 5, 2 * gshape[3]), -7.0)
    scales_buf = torch.full((B + 1, H, gshape[2] + 2, gshape[3] + 1), -9.0)
    codes = codes_buf[:, :, 4:4 + n, 1:1 + 2 * Db:2]
    mins = mins_buf[:, 1:, 3:3 + gshape[2], ::2]
    scales = scales_buf[1:, :, 2:, 1:]
    before = codes_buf.clone(), mins_buf.clone(), scales_buf.clone()
    got = PACK[kind](x, bits, G, codes=codes, mins=mins, scales=scales)
    assert got.codes is codes and got.mins is mins and got.scales is scales
    assert torch.equal(codes, want.codes) and torch.equal(mins, want.mins) and torch.equal(scales, want.scales)
    for buf, view, old in zip((codes_buf, mins_buf, scales_buf), (codes, mins, scales), before):
        mask = torch.ones_like(buf, dtype=torch.bool)
        idx = torch.zeros_like(buf, dtype=torch.bool)
        idx.as_strided(view.shape, view.stride(), view.storage_offset()).fill_(True)
        mask &= ~idx
        assert torch.equal(buf[mask], old[mask])
    # unpack into a strided view of a larger buffer, in every float dtype
    for dtype in DTYPES:
        out_buf = torch.full((B, H, n + 2, 2 * D), 5.0, dtype=dtype)
        out = out_buf[:, :, 1:1 + n, ::2]
        res = UNPACK[kind](codes, mins, scales, bits, G, out=out)
        assert res is out
        assert torch.equal(out, UNPACK[kind](want.codes, want.mins, want.scales, bits, G, dtype=dtype,
                                             **({"head_dim": D} if kind == "values" else {})))
        assert (out_buf[:, :, 0] == 5).all() and (out_buf[:, :, n + 1] == 5).all() and (out_buf[..., 1::2] == 5).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_strided_inputs(kind, dtype):
    """HF layout [B, n, H, D] seen as [B, H, n, D], and a non-unit channel stride."""
    x = randn((2, 9, 3, 24), dtype, seed=3).transpose(1, 2)
    y = randn((2, 3, 9, 48), dtype, seed=4)[..., ::2]
    for t in (x, y):
        a, b = PACK[kind](t, 4, 8), PACK[kind](t.contiguous(), 4, 8)
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    c = PACK[kind](x.contiguous(), 2, 8)
    # strided codes/mins/scales as unpack inputs
    codes = torch.zeros(c.codes.shape[:-1] + (2 * c.codes.shape[-1],), dtype=torch.uint8)[..., ::2]
    codes.copy_(c.codes)
    mins, scales = c.mins.transpose(1, 2).contiguous().transpose(1, 2), c.scales.transpose(0, 1).contiguous().transpose(0, 1)
    kw = {"head_dim": 24} if kind == "values" else {}
    assert torch.equal(UNPACK[kind](codes, mins, scales, 2, 8, **kw), UNPACK[kind](*c, 2, 8, **kw))


@pytest.mark.parametrize("kind", KINDS)
def test_batch_rows_independent(kind):
    x = randn((3, 2, 10, 16), seed=5)
    full = PACK[kind](x, 4, 4)
    for b in range(3):
        one = PACK[kind](x[b:b + 1], 4, 4)
        assert all(torch.equal(u[b:b + 1], v) for u, v in zip(full, one))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_numpy(kind, dtype):
    x = randn((2, 2, 7, 12), seed=6).numpy().astype(dtype)
    codes, mins, scales = PACK[kind](x, 4, 4)
    assert isinstance(codes, np.ndarray) and codes.dtype == np.uint8 and mins.dtype == np.float32
    t = PACK[kind](torch.from_numpy(x), 4, 4)
    assert np.array_equal(codes, t.codes.numpy()) and np.array_equal(mins, t.mins.numpy())
    back = UNPACK[kind](codes, mins, scales, 4, 4, dtype=dtype)
    assert isinstance(back, np.ndarray) and back.dtype == dtype
    if kind == "values":
        with pytest.raises(KVCompressTypeError, match="dtype: bfloat16 outputs need torch tensors"):
            UNPACK[kind](codes, mins, scales, 4, 4, dtype="bfloat16")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(0, 2, 5, 8), (1, 0, 5, 8), (1, 2, 0, 8), (1, 2, 5, 0)])
def test_empty(kind, shape):
    x = torch.zeros(shape)
    codes, mins, scales = PACK[kind](x, 2, 4)
    B, H, n, D = shape
    assert codes.shape == (B, H, n, (D * 2 + 7) // 8)
    assert mins.shape == ((B, H, -(-n // 4), D) if kind == "keys" else (B, H, n, -(-D // 4)))
    out = torch.empty(shape)
    assert UNPACK[kind](codes, mins, scales, 2, 4, out=out).shape == shape


# ---------------------------------------------------------------- threads


@pytest.mark.parametrize("kind", KINDS)
def test_threads_bit_identical(kind):
    if not _C.has_openmp:
        pytest.skip("built without OpenMP: one thread only")
    x = randn((2, 3, 301, 64), torch.bfloat16, seed=8)
    results = []
    for nt in (1, 2, 3):
        ops.set_num_threads(nt)
        run = []
        for bits in BITS:
            p = PACK[kind](x, bits, 32)
            run += list(p) + [UNPACK[kind](*p, bits, 32, dtype=torch.float16)]
        results.append(run)
    for run in results[1:]:
        assert all(same_bits(a, b) for a, b in zip(run, results[0]))


# ---------------------------------------------------------------- refused inputs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("threads", [1, 2])
def test_nonfinite_refused_outputs_untouched(kind, bad, dtype, threads):
    ops.set_num_threads(threads)
    x = randn((2, 3, 40, 16), dtype, seed=9)
    x[1, 2, 33, 5] = bad
    x[1, 0, 7, 9] = bad  # the first in row-major order is the one named
    x[1, 2, 3, 1] = float("nan")
    codes = torch.full((2, 3, 40, 8), 0x5A, dtype=torch.uint8)
    gshape = (2, 3, 5, 16) if kind == "keys" else (2, 3, 40, 2)
    mins, scales = torch.full(gshape, 3.0), torch.full(gshape, 4.0)
    word = "nan" if bad != bad else ("inf" if bad > 0 else "-inf")
    with pytest.raises(KVCompressValueError, match=rf"^{kind}: element \[1, 0, 7, 9\] is {word}; .*nothing was written"):
        PACK[kind](x, 4, 8, codes=codes, mins=mins, scales=scales)
    assert (codes == 0x5A).all() and (mins == 3.0).all() and (scales == 4.0).all()


# ---------------------------------------------------------------- bad arguments


def _x():
    return torch.zeros(1, 2, 5, 6)


BAD_PACK = [
    (lambda: ops.pack_keys(_x(), 3, 2), KVCompressValueError, "bits: expected 2, 4 or 8, got 3"),
    (lambda: ops.pack_values(_x(), True, 2), KVCompressTypeError, "bits: expected an int, got bool"),
    (lambda: ops.pack_keys(_x(), 4, 0), KVCompressValueError, "group: must be >= 1, got 0"),
    (lambda: ops.pack_keys(_x(), 4, 2.0), KVCompressTypeError, "group: expected an int, got float"),
    (lambda: ops.pack_keys(torch.zeros(2, 5, 6), 4, 2), KVCompressValueError, r"keys: expected a 4-D tensor"),
    (lambda: ops.pack_values(torch.zeros(1, 2, 5, 6, dtype=torch.int32), 4, 2), KVCompressTypeError,
     "values: expected dtype float32, float16 or bfloat16, got int32"),
    (lambda: ops.pack_keys(_x(), 4, 2, codes=torch.zeros(1, 2, 5, 4, dtype=torch.uint8)), KVCompressValueError,
     r"codes: expected shape \[B, H, n, Db\] = \[1, 2, 5, 3\], got \[1, 2, 5, 4\]"),
    (lambda: ops.pack_keys(_x(), 4, 2, codes=torch.zeros(1, 2, 5, 3, dtype=torch.int8)), KVCompressTypeError,
     "codes: expected dtype uint8, got int8"),
    (lambda: ops.pack_keys(_x(), 4, 2, mins=torch.zeros(1, 2, 2, 6)), KVCompressValueError,
     r"mins: expected shape \[B, H, ceil\(n/G\), D\] = \[1, 2, 3, 6\], got \[1, 2, 2, 6\]"),
    (lambda: ops.pack_values(_x(), 4, 4, scales=torch.zeros(1, 2, 5, 1)), KVCompressValueError,
     r"scales: expected shape \[B, H, n, ceil\(D/G\)\] = \[1, 2, 5, 2\], got \[1, 2, 5, 1\]"),
    (lambda: ops.pack_values(_x(), 4, 4, scales=torch.zeros(1, 2, 5, 2, dtype=torch.float16)), KVCompressTypeError,
     "scales: expected dtype float32, got float16"),
    (lambda: ops.pack_values(_x(), 4, 4, mins=torch.zeros(1, 2, 5, 2, dtype=torch.float64)), KVCompressTypeError,
     "mins: expected dtype float32, got float64"),
]


def _read_only_codes():
    c = np.zeros((1, 2, 5, 3), np.uint8)
    c.flags.writeable = False
    return ops.pack_keys(_x().numpy(), 4, 2, codes=c)


def _aliased():
    m = torch.zeros(1, 2, 3, 6)
    return ops.pack_keys(_x(), 4, 2, mins=m, scales=m)


def _in_place():
    x = _x()
    return ops.pack_values(x, 8, 6, mins=x[..., :1])


BAD_PACK += [
    (_read_only_codes, KVCompressValueError, "codes: output is read-only"),
    (_aliased, KVCompressValueError, "mins: output must not overlap scales"),
    (_in_place, KVCompressValueError, "mins: output must not overlap values"),
    (lambda: _C.pack(_x(), torch.zeros(1, 2, 5, 3, dtype=torch.uint8), torch.zeros(1, 2, 3, 6),
                     torch.zeros(1, 2, 3, 6), False, 5, 2, None, None, False), KVCompressValueError,
     "bits: expected 2, 4 or 8, got 5"),
    (lambda: _C.pack(_x(), torch.zeros(1, 2, 5, 3, dtype=torch.uint8), torch.zeros(1, 2, 3, 6),
                     torch.zeros(1, 2, 3, 6), False, 4, -1, None, None, False), KVCompressValueError,
     "group: must be >= 1, got -1"),
    (lambda: _C.pack(_x(), torch.zeros(1, 2, 5, 3, dtype=torch.uint8), torch.zeros(1, 2, 3, 6),
                     torch.zeros(1, 2, 3, 6), 0, 4, 2, None, None, False), KVCompressTypeError,
     "values: expected a bool, got int"),
    (lambda: _C.pack(_x(), None, None, None, False, 4), TypeError, r"pack\(\) takes 10 positional arguments"),
    (lambda: _C.pack(_x(), torch.zeros(1, 2, 5, 3, dtype=torch.uint8), torch.zeros(1, 2, 3, 6),
                     torch.zeros(1, 2, 3, 6), False, 4, 2, None, None, True), KVCompressValueError,
     r"clip: keys take no clipped ranges \(values only\)"),
    (lambda: ops.pack_values(_x(), 4, 2, clip=1), KVCompressTypeError, "clip: expected True or False, got 1"),
]


@pytest.mark.parametrize("fn, exc, match", BAD_PACK)
def test_bad_pack_arguments(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def _packed(kind="keys"):
    return PACK[kind](torch.zeros(1, 2, 5, 6), 4, 2)


BAD_UNPACK = [
    (lambda: ops.unpack_keys(*_packed(), 8, 2), KVCompressValueError,
     r"codes: last dim 3 is not Db = ceil\(D \* bits / 8\) = 6 for D = 6 \(of out\) and bits = 8"),
    (lambda: ops.unpack_keys(*_packed(), 4, 3), KVCompressValueError,
     r"mins: expected shape \[B, H, ceil\(n/G\), D\] = \[1, 2, 2, 6\], got \[1, 2, 3, 6\]"),
    (lambda: ops.unpack_keys(*_packed(), 4, 2, out=torch.zeros(1, 2, 4, 6)), KVCompressValueError,
     r"out: expected shape \[B, H, n, D\] = \[1, 2, 5, 6\], got \[1, 2, 4, 6\]"),
    (lambda: ops.unpack_keys(*_packed(), 4, 2, out=torch.zeros(1, 2, 5, 6, dtype=torch.int64)), KVCompressTypeError,
     "out: expected dtype float32, float16 or bfloat16, got int64"),
    (lambda: ops.unpack_keys(*_packed(), 4, 2, dtype="float64"), KVCompressValueError,
     "dtype: expected float32, float16 or bfloat16, got 'float64'"),
    (lambda: ops.unpack_keys(_packed()[0].float(), *_packed()[1:], 4, 2), KVCompressTypeError,
     "codes: expected dtype uint8, got float32"),
    (lambda: ops.unpack_values(*_packed("values"), 4, 2, head_dim=9), KVCompressValueError,
     r"head_dim: 9 does not match codes: a row of D codes takes ceil\(D \* 4 / 8\) bytes, codes have 3"),
    (lambda: ops.unpack_values(*_packed("values"), 4, 2, head_dim=6, out=torch.zeros(1, 2, 5, 6)),
     KVCompressValueError, "head_dim: give head_dim or out, not both"),
    (lambda: ops.unpack_values(*_packed("values"), 4, 4, head_dim=6), KVCompressValueError,
     r"mins: expected shape \[B, H, n, ceil\(D/G\)\] = \[1, 2, 5, 2\], got \[1, 2, 5, 3\]"),
    (lambda: ops.unpack_values(*_packed("values"), 6, 2), KVCompressValueError, "bits: expected 2, 4 or 8, got 6"),
    (lambda: ops.unpack_values(*_packed("values"), 4, 0), KVCompressValueError, "group: must be >= 1, got 0"),
]


def _unpack_overlap():
    c, m, s = _packed()
    return ops.unpack_keys(c, m, s, 4, 2, out=m.view(1, 2, 3, 6)[:, :, :1].expand(1, 2, 5, 6))


BAD_UNPACK += [
    (_unpack_overlap, KVCompressValueError, "out: output has overlapping elements"),
    (lambda: _C.unpack(*_packed(), torch.zeros(1, 2, 5, 6), False, 3, 2), KVCompressValueError,
     "bits: expected 2, 4 or 8, got 3"),
]


@pytest.mark.parametrize("fn, exc, match", BAD_UNPACK)
def test_bad_unpack_arguments(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()
