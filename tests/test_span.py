"""ops.span_merge (RazorAttention's compensation token) against a float64
torch reference: shapes, dtypes, strided layouts, empty spans, weights, and
the checks at the boundary (bad lo/hi, bad counts)."""

import pytest
import torch

from kvcompress import ops
from test_ops import DTYPE_IDS, DTYPES, assert_within_bound, make


def span_merge_ref(keys, values, lo, hi, counts=None, dtype=torch.float64):
    """Per (b, h): the count-weighted mean of slots [lo, hi) computed in
    `dtype` (float64: the reference; the input dtype: torch's own error)."""
    B, H, T, D = keys.shape
    Dv = values.shape[3]
    k, v = keys.to(dtype), values.to(dtype)
    c = torch.ones(B, H, T, dtype=dtype) if counts is None else counts.to(dtype)
    ok = torch.zeros(B, H, D, dtype=dtype)
    ov = torch.zeros(B, H, Dv, dtype=dtype)
    oc = torch.zeros(B, H, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            lo_, hi_ = int(lo[b, h]), int(hi[b, h])
            if hi_ == lo_:
                continue
            w = c[b, h, lo_:hi_]
            W = w.sum()
            ok[b, h] = (w[:, None] * k[b, h, lo_:hi_]).sum(0) / W
            ov[b, h] = (w[:, None] * v[b, h, lo_:hi_]).sum(0) / W
            oc[b, h] = counts[b, h, lo_:hi_].double().sum() if counts is not None else hi_ - lo_
    return ok, ov, oc


def random_spans(B, H, T, seed, empty=0.2):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, T + 1, (B, H), generator=g)
    b = torch.randint(0, T + 1, (B, H), generator=g)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    lo[0, 0], hi[0, 0] = 0, T  # a whole row
    if B * H > 1:
        hi[-1, -1] = lo[-1, -1]  # an empty span
    return lo, hi


SHAPES = [(1, 1, 1, 8, 8), (2, 3, 17, 64, 64), (3, 2, 40, 16, 24), (1, 4, 300, 128, 128)]  # B, H, T, D, Dv


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}T{}D{}Dv{}".format(*s))
@pytest.mark.parametrize("layout", ["contig", "transposed", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("weighted", [False, True])
def test_span_merge_against_float64(shape, layout, dtype, weighted):
    B, H, T, D, Dv = shape
    k = make((B, H, T, D), dtype, layout, seed=1)
    v = make((B, H, T, Dv), dtype, layout, seed=2)
    lo, hi = random_spans(B, H, T, seed=3)
    counts = None
    if weighted:
        g = torch.Generator().manual_seed(4)
        counts = torch.randint(1, 50, (B, H, T), generator=g).float() * torch.rand(B, H, T, generator=g).add(0.5)
    got = ops.span_merge(k, v, lo, hi, counts=counts)
    ref = span_merge_ref(k, v, lo, hi, counts)
    same = span_merge_ref(k, v, lo, hi, counts, dtype=dtype)
    assert got.keys.dtype == dtype and got.values.dtype == dtype and got.counts.dtype == torch.float32
    assert got.keys.shape == (B, H, D) and got.values.shape == (B, H, Dv) and got.counts.shape == (B, H)
    assert_within_bound(got.keys, ref[0], same[0], "keys")
    assert_within_bound(got.values, ref[1], same[1], "values")
    torch.testing.assert_close(got.counts.double(), ref[2], rtol=1e-6, atol=0)
    empty = lo == hi
    assert (got.keys[empty] == 0).all() and (got.values[empty] == 0).all() and (got.counts[empty] == 0).all()


def test_span_merge_float32_is_one_rounding_of_the_float64_mean():
    """In float32 the result is the float64 mean rounded once."""
    k = make((2, 2, 33, 16), torch.float32, seed=5)
    v = make((2, 2, 33, 8), torch.float32, seed=6)
    counts = torch.rand(2, 2, 33, generator=torch.Generator().manual_seed(7)) * 9 + 0.1
    lo = torch.tensor([[0, 4], [10, 32]])
    hi = torch.tensor([[33, 20], [11, 33]])
    got = ops.span_merge(k, v, lo, hi, counts=counts)
    ref = span_merge_ref(k, v, lo, hi, counts)
    assert torch.equal(got.keys, ref[0].float()) and torch.equal(got.values, ref[1].float())
    # a single-slot span is the slot itself, bit for bit
    assert torch.equal(got.keys[1, 0], k[1, 0, 10]) and torch.equal(got.values[1, 1], v[1, 1, 32])


def test_span_merge_results_do_not_depend_on_threads():
    k = make((2, 3, 200, 64), torch.bfloat16, seed=8)
    v = make((2, 3, 200, 64), torch.bfloat16, seed=9)
    lo, hi = random_spans(2, 3, 200, seed=10)
    ops.set_num_threads(1)
    try:
        one = ops.span_merge(k, v, lo, hi)
    finally:
        ops.set_num_threads(torch.get_num_threads())
    many = ops.span_merge(k, v, lo, hi)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_span_merge_empty_shapes():
    for B, H, T in [(0, 2, 5), (2, 0, 5), (2, 2, 0)]:
        k = torch.randn(B, H, T, 4)
        z = torch.zeros(B, H, dtype=torch.int64)
        out = ops.span_merge(k, k, z, z)
        assert out.keys.shape == (B, H, 4) and (out.counts == 0).all()
    # D = 0: counts still summed
    k = torch.randn(1, 1, 5, 0)
    out = ops.span_merge(k, torch.randn(1, 1, 5, 3), torch.tensor([[1]]), torch.tensor([[4]]))
    assert out.keys.shape == (1, 1, 0) and float(out.counts) == 3.0


def test_span_merge_lists_and_int32_spans():
    k = make((1, 2, 6, 4), torch.float32, seed=11)
    a = ops.span_merge(k, k, [[0, 2]], [[3, 6]])
    b = ops.span_merge(k, k, torch.tensor([[0, 2]], dtype=torch.int32), torch.tensor([[3, 6]], dtype=torch.int32))
    assert torch.equal(a.keys, b.keys)


@pytest.mark.parametrize("lo, hi, msg", [
    ([[-1, 0]], [[2, 2]], "lo: value -1 at [0, 0]"),
    ([[0, 7]], [[2, 7]], "lo: value 7 at [0, 1] is outside [0, T] = [0, 6]"),
    ([[3, 0]], [[2, 2]], "hi: value 2 at [0, 0] is outside [lo, T] = [3, 6]"),
    ([[0, 0]], [[2, 9]], "hi: value 9 at [0, 1]"),
])
def test_span_merge_refuses_spans_outside_the_row(lo, hi, msg):
    k = torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError) as e:
        ops.span_merge(k, k, lo, hi)
    assert msg in str(e.value)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_span_merge_refuses_bad_counts_inside_a_span_only(bad):
    k = torch.randn(1, 2, 6, 4)
    counts = torch.ones(1, 2, 6)
    counts[0, 1, 5] = bad
    ops.span_merge(k, k, [[0, 0]], [[6, 5]], counts=counts)  # slot 5 of head 1 is outside its span: fine
    with pytest.raises(ValueError, match=r"counts: value .* at \[0, 1, 5\] .* not a finite count > 0"):
        ops.span_merge(k, k, [[0, 0]], [[6, 6]], counts=counts)


def test_span_merge_refuses_bad_shapes_and_dtypes():
    k = torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError, match="values"):
        ops.span_merge(k, torch.randn(1, 2, 5, 4), [[0, 0]], [[1, 1]])
    with pytest.raises(TypeError, match="values"):
        ops.span_merge(k, k.half(), [[0, 0]], [[1, 1]])
    with pytest.raises((TypeError, ValueError), match="counts"):
        ops.span_merge(k, k, [[0, 0]], [[1, 1]], counts=torch.ones(1, 2, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="lo"):
        ops.span_merge(k, k, [[0, 0, 0]], [[1, 1, 1]])
    with pytest.raises(ValueError, match="counts"):
        ops.span_merge(k, k, [[0, 0]], [[1, 1]], counts=torch.ones(1, 2, 5))
