"""C ops against the float64 references in tests/reference.py.

Error bound for floating outputs (docs/design.md, "Numerics"): the C op's max abs
error against float64 must be at most 2x the error of the same computation
done by torch in the input dtype, plus a small absolute floor (1e-6, scaled by
the output magnitude when that exceeds 1) so that exact-in-fp32 cases, where
torch's own error is 0, do not demand bit-equality.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from kvcompress import ops
from reference import gather_ref, pool1d_ref, select_topk_ref, vector_norm_ref, window_scores_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def make(shape, dtype=torch.float32, layout="contig", seed=0, fw="torch"):
    """A random tensor of `shape` whose memory layout is `layout`:
    contig, transposed (axes 1 and 2 swapped in memory) or strided (every
    other element along the last two axes)."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    if layout == "contig":
        x = torch.randn(shape, generator=g).to(dtype)
    elif layout == "transposed":
        perm = list(shape)
        perm[1], perm[2] = perm[2], perm[1]
        x = torch.randn(perm, generator=g).to(dtype).transpose(1, 2)
    elif layout == "strided":
        big = list(shape)
        big[-1] *= 2
        big[-2] *= 2
        x = torch.randn(big, generator=g).to(dtype)[..., ::2, ::2] if len(shape) > 1 else None
    else:
        raise AssertionError(layout)
    assert tuple(x.shape) == shape
    if fw == "numpy":
        assert dtype != torch.bfloat16
        return x.numpy()
    return x


def to_f64(x):
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x)).to(torch.float64)
    return x.to(torch.float64)


def assert_within_bound(got, ref64, torch_same_dtype, what=""):
    got = to_f64(got)
    ref64 = to_f64(ref64)
    assert got.shape == ref64.shape
    assert torch.isfinite(got).all(), what
    if got.numel() == 0:
        return
    err_c = (got - ref64).abs().max().item()
    err_t = (to_f64(torch_same_dtype) - ref64).abs().max().item()
    floor = 1e-6 * max(1.0, ref64.abs().max().item())
    assert err_c <= 2 * err_t + floor, f"{what}: C error {err_c:.3g} > 2 x torch error {err_t:.3g} + {floor:.1g}"


# ---------------------------------------------------------------- window_scores

WS_SHAPES = [  # (B, Tq, Tk, D)
    (2, 1, 1, 64),
    (2, 7, 7, 40),
    (2, 3, 33, 64),
    (1, 32, 257, 24),
    (2, 257, 257, 64),  # H2O-style: every query
]
RATIOS = [(2, 2), (6, 2), (8, 2)]  # (Hq, Hkv): GQA 1, 3, 4


@pytest.mark.parametrize("shape", WS_SHAPES, ids=lambda s: "B{}Tq{}Tk{}D{}".format(*s))
@pytest.mark.parametrize("heads", RATIOS, ids=lambda h: f"g{h[0] // h[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_window_scores_matches_reference(shape, heads, dtype):
    B, Tq, Tk, D = shape
    Hq, Hkv = heads
    q = make((B, Hq, Tq, D), dtype, "transposed", seed=1)  # HF queries are transposed views
    k = make((B, Hkv, Tk, D), dtype, "contig", seed=2) * 2
    got = ops.window_scores(q, k)
    assert got.dtype == torch.float32 and tuple(got.shape) == (B, Hkv, Tk)
    ref = window_scores_ref(q, k)
    same = window_scores_ref(q, k, dtype=dtype)
    assert_within_bound(got, ref, same, f"window_scores {shape} {heads} {dtype}")


@pytest.mark.parametrize("gqa", ["mean", "max"])
@pytest.mark.parametrize("layout", ["contig", "transposed", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_window_scores_padding_gqa_layouts(gqa, layout, dtype):
    B, Hq, Hkv, Tq, Tk, D = 3, 6, 2, 9, 40, 24
    q = make((B, Hq, Tq, D), dtype, layout, seed=3)
    k = make((B, Hkv, Tk, D), dtype, layout, seed=4)
    kv_start = torch.tensor([0, 5, 35])  # last row: early queries see no key at all
    got = ops.window_scores(q, k, gqa=gqa, kv_start=kv_start, scaling=0.3)
    ref = window_scores_ref(q, k, gqa=gqa, kv_start=kv_start, scaling=0.3)
    same = window_scores_ref(q, k, gqa=gqa, kv_start=kv_start, scaling=0.3, dtype=dtype)
    assert_within_bound(got, ref, same, f"{gqa} {layout}")
    assert (got[1, :, :5] == 0).all() and (got[2, :, :35] == 0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_window_scores_numpy(dtype):
    q = make((2, 4, 5, 16), fw="numpy", seed=5).astype(dtype)
    k = make((2, 2, 11, 16), fw="numpy", seed=6).astype(dtype)
    got = ops.window_scores(q, k, kv_start=np.array([0, 3]))
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    tdt = torch.float32 if dtype == np.float32 else torch.float16
    ref = window_scores_ref(q, k, kv_start=np.array([0, 3]))
    same = window_scores_ref(q, k, kv_start=np.array([0, 3]), dtype=tdt)
    assert_within_bound(got, ref, same)


def test_window_scores_long_rows_accuracy():
    # long rows exercise the chunked (two-level) accumulation over queries
    q = make((1, 3, 300, 64), seed=7)
    k = make((1, 1, 1100, 64), seed=8) * 3
    got = ops.window_scores(q, k, gqa="max")
    assert_within_bound(got, window_scores_ref(q, k, gqa="max"), window_scores_ref(q, k, gqa="max", dtype=torch.float32))


@pytest.mark.parametrize(
    "qshape,kshape",
    [
        ((0, 4, 3, 8), (0, 2, 5, 8)),  # B = 0
        ((2, 0, 3, 8), (2, 0, 5, 8)),  # no heads
        ((2, 4, 0, 8), (2, 2, 0, 8)),  # no tokens
        ((2, 4, 0, 8), (2, 2, 5, 8)),  # no queries: scores 0
        ((2, 4, 3, 0), (2, 2, 5, 0)),  # D = 0: uniform attention
    ],
)
def test_window_scores_zero_size(qshape, kshape):
    q, k = torch.zeros(qshape), torch.zeros(kshape)
    got = ops.window_scores(q, k)
    assert tuple(got.shape) == (kshape[0], kshape[1], kshape[2])
    torch.testing.assert_close(got.double(), window_scores_ref(q, k), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- vector_norm

NORM_SHAPES = [(2, 3, 1, 64), (2, 3, 7, 40), (1, 2, 33, 24), (2, 3, 257, 64), (1, 1, 5, 1)]


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contig", "transposed", "strided"])
@pytest.mark.parametrize("ord", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_vector_norm_matches_reference(shape, layout, ord, dtype):
    x = make(shape, dtype, layout, seed=9) * 3
    got = ops.vector_norm(x, ord=ord)
    assert got.dtype == torch.float32 and tuple(got.shape) == shape[:3]
    assert_within_bound(got, vector_norm_ref(x, ord), vector_norm_ref(x, ord, dtype=dtype))


def test_vector_norm_numpy_and_zero_size():
    x = make((2, 3, 9, 16), fw="numpy", seed=10).astype(np.float16)
    got = ops.vector_norm(x, ord=1)
    assert isinstance(got, np.ndarray)
    assert_within_bound(got, vector_norm_ref(x, 1), vector_norm_ref(x, 1, dtype=torch.float16))
    for shape in [(0, 3, 4, 8), (2, 0, 4, 8), (2, 3, 0, 8)]:
        assert tuple(ops.vector_norm(torch.zeros(shape)).shape) == shape[:3]
    assert (ops.vector_norm(torch.ones(2, 3, 4, 0)) == 0).all()


# ---------------------------------------------------------------- pool1d


@pytest.mark.parametrize("T", [1, 2, 7, 33, 257, 5000])
@pytest.mark.parametrize("kernel", [1, 3, 7, 9])
@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("layout", ["contig", "transposed", "strided"])
def test_pool1d_matches_reference(T, kernel, mode, layout):
    s = make((2, 3, T), torch.float32, layout, seed=11)
    got = ops.pool1d(s, kernel, mode=mode)
    assert_within_bound(got, pool1d_ref(s, kernel, mode), pool1d_ref(s, kernel, mode, dtype=torch.float32))
    if mode == "max":  # max is exact
        assert torch.equal(got, pool1d_ref(s, kernel, mode, dtype=torch.float32))


def test_pool1d_numpy_and_zero_size():
    s = make((1, 2, 20), fw="numpy", seed=12)
    got = ops.pool1d(s, 5, mode="avg")
    assert isinstance(got, np.ndarray)
    assert_within_bound(got, pool1d_ref(s, 5, "avg"), pool1d_ref(s, 5, "avg", dtype=torch.float32))
    for shape in [(0, 2, 5), (2, 0, 5), (2, 3, 0)]:
        assert tuple(ops.pool1d(torch.zeros(shape), 3).shape) == shape


# ---------------------------------------------------------------- select_topk


def distinct_scores(shape, seed, layout="contig"):
    """Scores without ties (a permutation of exactly representable values)."""
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(shape))
    vals = (torch.randperm(n, generator=g).to(torch.float32) - n / 2) / 8
    if layout == "contig":
        return vals.reshape(shape)
    if layout == "transposed":
        return vals.reshape(shape[0], shape[2], shape[1]).transpose(1, 2)
    big = torch.zeros(shape[0], shape[1], 2 * shape[2])
    big[..., ::2] = vals.reshape(shape)
    return big[..., ::2]


@pytest.mark.parametrize("T", [1, 7, 33, 257, 3000])
@pytest.mark.parametrize("layout", ["contig", "transposed", "strided"])
@pytest.mark.parametrize("sinks,window", [(0, 0), (2, 0), (0, 3), (4, 5)])
def test_select_topk_matches_reference(T, layout, sinks, window):
    s = distinct_scores((2, 3, T), seed=T, layout=layout)
    for k in sorted({1, T // 3, T // 2, T}):
        if k < 1 or min(sinks, T) + min(window, T) > k:
            continue
        got = ops.select_topk(s, k, sinks=sinks, window=window)
        assert got.dtype == torch.int64 and tuple(got.shape) == (2, 3, k)
        assert torch.equal(got, select_topk_ref(s, k, sinks=sinks, window=window)), (k, sinks, window)


@pytest.mark.parametrize("T", [10, 64, 1000])
def test_select_topk_padding_and_variable_k(T):
    B, H = 3, 4
    s = distinct_scores((B, H, T), seed=7 + T)
    kv_start = torch.tensor([0, 3, T - 2])  # last row has only 2 valid tokens
    g = torch.Generator().manual_seed(T)
    k = torch.randint(6, T + 1, (B, H), generator=g)
    k[0, 0] = T  # keep everything
    k[2, 1] = 7  # more than the valid tokens: padded ones fill in
    got = ops.select_topk(s, k, sinks=2, window=3, kv_start=kv_start)
    ref = select_topk_ref(s, k, sinks=2, window=3, kv_start=kv_start)
    assert tuple(got.shape) == (B, H, int(k.max()))
    assert torch.equal(got, ref)
    # int32 k and numpy inputs give the same answer
    got_np = ops.select_topk(s.numpy(), k.to(torch.int32).numpy(), sinks=2, window=3, kv_start=kv_start.numpy())
    assert np.array_equal(got_np, ref.numpy())


def test_select_topk_ties_lower_index_wins():
    s = torch.tensor([[[1.0, 3.0, 3.0, 2.0, 3.0, 0.0, -0.0, 3.0]]])
    assert ops.select_topk(s, 2).tolist() == [[[1, 2]]]
    assert ops.select_topk(s, 4).tolist() == [[[1, 2, 4, 7]]]
    assert ops.select_topk(s, 6).tolist() == [[[0, 1, 2, 3, 4, 7]]]
    # +0 and -0 tie, so the lower index (5) wins
    assert ops.select_topk(s, 7).tolist() == [[[0, 1, 2, 3, 4, 5, 7]]]
    flat = torch.zeros(2, 2, 50)
    assert torch.equal(ops.select_topk(flat, 10, window=3), select_topk_ref(flat, 10, window=3))
    many = torch.randint(0, 4, (2, 3, 300), generator=torch.Generator().manual_seed(0)).float()
    assert torch.equal(ops.select_topk(many, 77, sinks=4), select_topk_ref(many, 77, sinks=4))


def test_select_topk_special_values():
    s = torch.tensor([[[float("-inf"), 1e30, -1e30, float("inf"), 5.0, 1e-40, -1e-40]]])
    ref = select_topk_ref(s, 4)
    assert torch.equal(ops.select_topk(s, 4), ref)
    for k in range(1, 8):
        assert torch.equal(ops.select_topk(s, k), select_topk_ref(s, k))


def test_select_topk_zero_size():
    assert tuple(ops.select_topk(torch.zeros(0, 3, 5), 2).shape) == (0, 3, 2)
    assert tuple(ops.select_topk(torch.zeros(2, 0, 5), 2).shape) == (2, 0, 2)
    assert tuple(ops.select_topk(torch.zeros(2, 0, 5), torch.zeros(2, 0, dtype=torch.int64)).shape) == (2, 0, 0)


# ---------------------------------------------------------------- gather


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["contig", "transposed", "strided"])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("T,n,D", [(1, 1, 64), (33, 7, 40), (257, 100, 64), (20, 0, 24)])
def test_gather_matches_reference(dtype, layout, idx_dtype, T, n, D):
    B, H = 2, 3
    k = make((B, H, T, D), dtype, layout, seed=13)
    v = make((B, H, T, D), dtype, layout, seed=14)
    g = torch.Generator().manual_seed(15)
    idx = torch.randint(0, T, (B, H, n), generator=g).to(idx_dtype)
    ko, vo = ops.gather(k, v, idx)
    kr, vr = gather_ref(k, v, idx)
    assert ko.dtype == dtype and ko.is_contiguous() and vo.is_contiguous()
    assert torch.equal(ko, kr) and torch.equal(vo, vr)


def test_gather_into_given_outputs_and_numpy():
    k = make((1, 2, 9, 8), seed=16)
    v = make((1, 2, 9, 6), seed=17)  # values may have their own head dim
    idx = torch.tensor([[[8, 0, 3], [1, 1, 2]]])
    ok = torch.empty(1, 2, 3, 8)
    ov = torch.empty(1, 3, 2, 6).transpose(1, 2)  # strided output is fine
    ko, vo = ops.gather(k, v, idx, out_keys=ok, out_values=ov)
    assert ko is ok and vo is ov
    kr, vr = gather_ref(k, v, idx)
    assert torch.equal(ok, kr) and torch.equal(ov, vr)
    kn, vn = ops.gather(k.numpy().astype(np.float16), v.numpy().astype(np.float16), idx.numpy())
    assert isinstance(kn, np.ndarray) and kn.dtype == np.float16
    assert np.array_equal(kn, kr.numpy().astype(np.float16))
    ko, vo = ops.gather(torch.zeros(0, 2, 5, 4), torch.zeros(0, 2, 5, 4), torch.zeros(0, 2, 3, dtype=torch.int64))
    assert tuple(ko.shape) == (0, 2, 3, 4)
    ko, vo = ops.gather(torch.zeros(1, 2, 5, 0), torch.zeros(1, 2, 5, 0), torch.zeros(1, 2, 3, dtype=torch.int64))
    assert tuple(vo.shape) == (1, 2, 3, 0)


# ---------------------------------------------------------------- threads


@pytest.fixture
def restore_threads():
    n = ops.get_num_threads()
    yield
    ops.set_num_threads(n)


def _run_all_ops(seed):
    q = make((2, 9, 200, 64), torch.bfloat16, "transposed", seed=seed)
    k = make((2, 3, 700, 64), torch.bfloat16, seed=seed + 1)
    v = make((2, 3, 700, 64), torch.bfloat16, seed=seed + 2)
    kv_start = torch.tensor([0, 11])
    ws = ops.window_scores(q, k, kv_start=kv_start)
    ws_max = ops.window_scores(q[:, :, -32:], k.float(), gqa="max") if False else ops.window_scores(
        q[:, :, -32:], k, gqa="max"
    )
    nk = ops.vector_norm(k, ord=2)
    nv = ops.vector_norm(v, ord=1)
    pooled = ops.pool1d(ws, 7, mode="avg")
    kk = torch.full((2, 3), 100)
    kk[1, 2] = 40
    sel = ops.select_topk(pooled + ws_max, kk, sinks=4, window=32, kv_start=kv_start)
    ko, vo = ops.gather(k, v, sel.clamp(min=0))
    return [ws, ws_max, nk, nv, pooled, sel, ko, vo]


def test_bit_identical_for_any_thread_count(restore_threads):
    if not ops._C.has_openmp:
        pytest.skip("built without OpenMP: a single thread is all there is")
    results = []
    for n in (1, 2, 3):
        ops.set_num_threads(n)
        assert ops.get_num_threads() == n
        results.append([r.contiguous().view(torch.uint8) if r.dtype != torch.int64 else r for r in _run_all_ops(20)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_repeatable_calls_are_identical():
    a = _run_all_ops(30)
    b = _run_all_ops(30)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_num_threads_validation(restore_threads):
    with pytest.raises(ValueError, match="n: expected a thread count"):
        ops.set_num_threads(0)
    with pytest.raises(TypeError):
        ops.set_num_threads("2")


def test_all_combinations_smoke():
    # every dtype x framework x op on tiny inputs (catches dispatch holes)
    for dtype, fw in itertools.product(DTYPES, ["torch", "numpy"]):
        if fw == "numpy" and dtype == torch.bfloat16:
            continue
        x = make((1, 2, 5, 8), dtype, "contig", seed=40, fw=fw)
        assert ops.window_scores(x, x).shape == (1, 2, 5)
        assert ops.vector_norm(x).shape == (1, 2, 5)
        ko, vo = ops.gather(x, x, np.zeros((1, 2, 3), dtype=np.int64) if fw == "numpy" else torch.zeros(1, 2, 3, dtype=torch.int64))
        assert ko.shape == (1, 2, 3, 8)
