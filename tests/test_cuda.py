"""CPU/CUDA consistency: every op of the C core on the same inputs on both
backends, compared under a per-op bound.

Integer outputs (indices, budgets, classes, counts) must be equal, bit-copy
ops (gather, max pooling) and the exactly rounded pack/unpack bit-identical. Float outputs must stay within
twice the error torch itself makes in the input dtype, measured against a
float64 reference (the same bound the CPU tests use), and never NaN.

Every test here needs a CUDA device and a build with KVCOMPRESS_CUDA=1;
without them they skip with the reason.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import kvcompress
from kvcompress import KVCompressValueError, ops
from kvcompress import _C
from reference import pool1d_ref, vector_norm_ref, window_scores_ref
from test_attention import attention_ref, ragged_layout
from test_attention import randn as attn_randn
from test_attention_packed import (check_lse, lse_ref, one_query_at_a_time, pack_ragged, pack_uniform, packed_ref,
                                   uniform_case)
from test_budget import head_budgets_ref
from test_fastgen import recovery_ref
from test_keyformer import keyformer_ref
from test_kvmerger import _walk, merge_ref, sets_ref
from test_lagkv import assert_scores_close, lagkv_ref, rank_priority
from test_merge import AMBIG, check_against_reference, evict_merge_ref, make_inputs, mixed_tau
from test_ops import DTYPE_IDS, DTYPES, assert_within_bound, make
from test_quant import PACK, UNPACK, ref_pack
from test_score_global import global_scores_ref
from test_span import random_spans, span_merge_ref
from test_actqkv import actqkv_ref, assert_close_2x


def _skip_reason():
    if not _C.has_cuda:
        return "kvcompress was built without CUDA (rebuild with KVCOMPRESS_CUDA=1)"
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    if _C.cuda_device_count() == 0:
        return "no CUDA device visible to kvcompress"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]

DEV = "cuda"


def cuda(x):
    return None if x is None else x.to(DEV)


def cpu(x):
    return None if x is None else x.cpu()


def both(fn, *args, **kw):
    """fn on the CPU inputs and on copies on the GPU; (cpu result, gpu result on the CPU)."""
    out_cpu = fn(*args, **kw)
    gargs = [cuda(a) if isinstance(a, torch.Tensor) else a for a in args]
    gkw = {k: cuda(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    out_gpu = fn(*gargs, **gkw)
    torch.cuda.synchronize()
    if type(out_gpu) is tuple:
        return out_cpu, tuple(cpu(t) for t in out_gpu)
    if isinstance(out_gpu, tuple):  # a NamedTuple of results
        return out_cpu, type(out_gpu)(*[cpu(t) for t in out_gpu])
    assert out_gpu.device.type == "cuda"
    return out_cpu, out_gpu.cpu()


def same_bits(x, y):
    assert x.shape == y.shape and x.dtype == y.dtype
    if x.dtype in (torch.float16, torch.bfloat16):
        return torch.equal(x.view(torch.int16), y.view(torch.int16))
    if x.dtype == torch.float32:
        return torch.equal(x.view(torch.int32), y.view(torch.int32))
    return torch.equal(x, y)


# ---------------------------------------------------------------- scores

SCORE_SHAPES = [  # B, Hq, Hkv, Tq, Tk, D
    (1, 1, 1, 1, 1, 8),
    (2, 4, 2, 5, 37, 24),
    (2, 6, 2, 32, 300, 64),
    (1, 9, 3, 64, 1500, 64),
    (3, 4, 4, 7, 129, 33),
]


@pytest.mark.parametrize("shape", SCORE_SHAPES, ids=lambda s: "B{}Hq{}Hkv{}Tq{}Tk{}D{}".format(*s))
@pytest.mark.parametrize("gqa", ["mean", "max"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_window_scores(shape, gqa, dtype):
    B, Hq, Hkv, Tq, Tk, D = shape
    q = make((B, Hq, Tq, D), dtype, seed=1)
    k = make((B, Hkv, Tk, D), dtype, seed=2)
    kv_start = torch.tensor([min(b * 3, Tk - 1) for b in range(B)], dtype=torch.int64)
    for ks in (None, kv_start):
        _, got = both(ops.window_scores, q, k, gqa=gqa, kv_start=ks)
        ref = window_scores_ref(q, k, gqa=gqa, kv_start=ks)
        same = window_scores_ref(q, k, gqa=gqa, kv_start=ks, dtype=dtype)
        assert_within_bound(got, ref, same)


@pytest.mark.parametrize("shape", SCORE_SHAPES[:3] + SCORE_SHAPES[4:], ids=lambda s: "B{}Hq{}Hkv{}Tq{}Tk{}D{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_keyformer_scores(shape, dtype):
    """The same counter-based noise on both backends: each within the bound
    of the float64 recomputation that re-derives the noise in NumPy."""
    B, Hq, Hkv, Tq, Tk, D = shape
    q = make((B, Hq, Tq, D), dtype, seed=3)
    k = make((B, Hkv, Tk, D), dtype, seed=4)
    kv_start = torch.tensor([min(b * 3, Tk - 1) for b in range(B)], dtype=torch.int64)
    for ks in (None, kv_start):
        for kw in (dict(tau=1.4, noise=1.0, seed=5, layer=2, step=3), dict(tau=1.0, noise=0.0)):
            out_cpu, got = both(ops.keyformer_scores, q, k, kv_start=ks, **kw)
            ref = keyformer_ref(q, k, kv_start=ks, **kw)
            same = keyformer_ref(q, k, kv_start=ks, dtype=dtype, **kw)
            assert_within_bound(got, ref, same)
            assert_within_bound(out_cpu, ref, same)


@pytest.mark.parametrize("layout", ["contig", "transposed", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_vector_norm(layout, dtype):
    x = make((2, 3, 77, 40), dtype, layout=layout, seed=3)
    for ord_ in (1, 2):
        out_cpu, got = both(ops.vector_norm, x, ord=ord_)
        assert_within_bound(got, vector_norm_ref(x, ord_), vector_norm_ref(x, ord_, dtype=dtype))
        torch.testing.assert_close(got, out_cpu, rtol=2e-6, atol=0)


@pytest.mark.parametrize("kernel", [1, 5, 7, 31])
def test_pool1d(kernel):
    s = torch.rand(2, 3, 200, generator=torch.Generator().manual_seed(kernel))
    mx_cpu, mx = both(ops.pool1d, s, kernel, mode="max")
    assert same_bits(mx, mx_cpu)
    assert torch.equal(mx, pool1d_ref(s, kernel).to(torch.float32))
    _, avg = both(ops.pool1d, s, kernel, mode="avg")
    assert_within_bound(avg, pool1d_ref(s, kernel, "avg"), pool1d_ref(s, kernel, "avg", dtype=torch.float32))


@pytest.mark.parametrize("shape", [(1, 1, 16, 8, 8, 4, 0), (2, 3, 70, 16, 12, 8, 3), (2, 2, 1000, 64, 64, 128, 4),
                                   (3, 2, 40, 33, 17, 5, 1)], ids=lambda s: "B{}H{}T{}D{}Dv{}lag{}s{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_lagkv_scores(shape, dtype):
    B, H, T, D, Dv, lag, sinks = shape
    k = make((B, H, T, D), dtype, seed=4)
    v = make((B, H, T, Dv), dtype, layout="transposed", seed=5)
    kv_start = torch.tensor([min(b * 3, T) for b in range(B)], dtype=torch.int64)
    for ks in (None, kv_start):
        _, got = both(ops.lagkv_scores, k, v, lag=lag, sinks=sinks, kv_start=ks)
        assert_scores_close(got, lagkv_ref(k, v, lag, sinks, ks), lagkv_ref(k, v, lag, sinks, ks, dtype=dtype))
        # the GPU's ranks are those of its own raw scores
        _, pri = both(ops.lagkv_scores, k, v, lag=lag, sinks=sinks, kv_start=ks, per_chunk=True)
        assert torch.equal(pri, rank_priority(got, lag, sinks, ks))


# ---------------------------------------------------------------- selection

@pytest.mark.parametrize("T", [1, 17, 300, 5000, 70000])
@pytest.mark.parametrize("ties", [False, True])
def test_select_topk(T, ties):
    g = torch.Generator().manual_seed(T)
    B, H = 2, 3
    s = torch.rand(B, H, T, generator=g)
    if ties:
        s = (s * 4).floor()  # a handful of values: the lower index must win every tie
    kv_start = torch.tensor([0, T // 3], dtype=torch.int64)
    sinks, window = min(2, T), min(3, T)
    for k in (1, T // 2, T):
        k = max(k, sinks + window) if T >= sinks + window else T
        cpu_out, got = both(ops.select_topk, s, k, sinks=sinks, window=window, kv_start=kv_start)
        assert torch.equal(got, cpu_out)
    per_row = torch.randint(min(T, sinks + window), T + 1, (B, H), generator=g)
    cpu_out, got = both(ops.select_topk, s, per_row, sinks=sinks, window=window)
    assert torch.equal(got, cpu_out)


def test_select_topk_nan_raises():
    s = torch.rand(1, 2, 50, device=DEV)
    s[0, 1, 7] = float("nan")
    with pytest.raises(KVCompressValueError, match="scores: contains NaN"):
        ops.select_topk(s, 5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gather(dtype):
    k = make((2, 3, 90, 24), dtype, layout="transposed", seed=4)
    v = make((2, 3, 90, 40), dtype, seed=5)
    idx = torch.randint(0, 90, (2, 3, 33), generator=torch.Generator().manual_seed(6))
    (ck, cv), (gk, gv) = both(ops.gather, k, v, idx)
    assert same_bits(gk, ck) and same_bits(gv, cv)


@pytest.mark.parametrize("shape", [(1, 1, 1, 8, 8), (2, 3, 90, 24, 40), (1, 8, 3000, 128, 128)],
                         ids=lambda s: "B{}H{}T{}D{}Dv{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_span_merge(shape, dtype):
    """Double sums of exact products in ascending order on both backends:
    the GPU's compensation tokens equal the CPU's bit for bit."""
    B, H, T, D, Dv = shape
    k = make((B, H, T, D), dtype, layout="transposed", seed=4)
    v = make((B, H, T, Dv), dtype, seed=5)
    lo, hi = random_spans(B, H, T, seed=6)
    counts = torch.rand(B, H, T, generator=torch.Generator().manual_seed(7)) * 20 + 0.5
    for c in (None, counts):
        cpu_res, got = both(ops.span_merge, k, v, lo, hi, counts=c)
        assert same_bits(got.keys, cpu_res.keys) and same_bits(got.values, cpu_res.values)
        assert same_bits(got.counts, cpu_res.counts)
        ref = span_merge_ref(k, v, lo, hi, c)
        same = span_merge_ref(k, v, lo, hi, c, dtype=dtype)
        assert_within_bound(got.keys, ref[0], same[0], "keys")
        assert_within_bound(got.values, ref[1], same[1], "values")


@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("shape", [(1, 4, 50), (2, 8, 600), (3, 3, 20000)])
def test_head_budgets(alpha, shape):
    g = torch.Generator().manual_seed(shape[2])
    s = torch.rand(shape, generator=g)
    s[0, 0, :5] = float("-inf")
    s = (s * 64).floor() / 64  # ties across heads
    kv_start = torch.tensor([b * 2 for b in range(shape[0])], dtype=torch.int64)
    for budget in (1, shape[2] // 4, shape[2]):
        out_cpu, got = both(ops.head_budgets, s, budget, alpha=alpha, floor=2, kv_start=kv_start)
        assert torch.equal(got, out_cpu)
        assert np.array_equal(got.numpy(), head_budgets_ref(s, budget, alpha, 2, kv_start))


def test_head_budgets_nan_raises():
    s = torch.rand(1, 2, 50, device=DEV)
    s[0, 0, 3] = float("nan")
    with pytest.raises(KVCompressValueError, match="scores: NaN"):
        ops.head_budgets(s, 10)


# ---------------------------------------------------------------- EMS

@pytest.mark.parametrize("shape", [(1, 2, 40, 2, 5, 16), (2, 6, 300, 3, 64, 64), (1, 3, 2000, 3, 128, 64)],
                         ids=lambda s: "B{}Hq{}T{}Hkv{}Tq{}D{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_global_scores(shape, dtype):
    B, Hq, T, Hkv, Tq, D = shape
    q = make((B, Hq, Tq, D), dtype, seed=7)
    k = make((B, Hkv, T, D), dtype, seed=8)
    kv_start = torch.tensor([b * 5 for b in range(B)], dtype=torch.int64)
    q_pos = torch.from_numpy(np.sort(np.random.default_rng(0).choice(T, Tq, replace=False)))
    for ks, qp in ((None, None), (kv_start, None), (kv_start, q_pos)):
        for gqa in ("mean", "max"):
            _, got = both(ops.global_scores, q, k, gqa=gqa, kv_start=ks, q_pos=qp)
            ref = global_scores_ref(q, k, gqa=gqa, kv_start=ks, q_pos=qp)
            same = global_scores_ref(q, k, gqa=gqa, kv_start=ks, q_pos=qp, dtype=dtype)
            assert_within_bound(got, ref, same)


def assert_classes_agree(got, cpu_res, keys, values, scores, centers, tau, kv_start):
    """GPU and CPU classes are equal wherever fp32 can decide them. The GPU's
    similarities round like the CPU's FMA clones (merge.cu), the baseline
    clone's without FMA, so whichever clone this CPU ran, a class may differ
    only where the best cosine is within AMBIG of tau or of the runner-up
    (by the float64 reference); counts follow the classes."""
    ref = evict_merge_ref(keys, values, scores, centers, tau if tau is not None else math.nan, kv_start)
    g, c = got.assign.numpy(), cpu_res.assign.numpy()
    for b, h, j in np.argwhere(g != c):
        best, second, t = ref["best"][b, h, j], ref["second"][b, h, j], ref["tau"][b, h]
        assert abs(best - t) <= AMBIG or best - second <= AMBIG, (
            f"assign[{b}, {h}, {j}]: GPU {g[b, h, j]}, CPU {c[b, h, j]} "
            f"(best {best:.6f}, second {second:.6f}, tau {t:.6f})"
        )
    if np.array_equal(g, c):
        assert torch.equal(got.counts, cpu_res.counts)


@pytest.mark.parametrize("shape", [(1, 1, 30, 8), (2, 3, 200, 64), (1, 2, 3000, 128)],
                         ids=lambda s: "B{}H{}T{}D{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_evict_merge(shape, dtype):
    B, H, T, D = shape
    kv_start = torch.tensor([b * 3 for b in range(B)], dtype=torch.int64)
    keys, values, scores, centers = make_inputs(B, H, T, D, dtype, kv_start=kv_start)
    for tau in (None, mixed_tau(B, H), math.inf):
        kw = dict(kv_start=kv_start, return_assign=True)
        cpu_res, got = both(ops.evict_merge, keys, values, scores, centers, tau, **kw)
        assert_classes_agree(got, cpu_res, keys, values, scores, centers, tau, kv_start)
        check_against_reference(got, keys, values, scores, centers, tau if tau is not None else math.nan,
                                kv_start, dtype=dtype)
        if isinstance(tau, float) and tau == math.inf:  # plain eviction copies the centers bit for bit
            assert same_bits(got.keys, cpu_res.keys) and same_bits(got.values, cpu_res.values)


# ---------------------------------------------------------------- attention

ATTN_UNIFORM = [  # B, Hq, Hkv, q, n, D
    (1, 4, 4, 1, 1, 64),
    (2, 8, 2, 1, 37, 40),
    (2, 6, 2, 5, 300, 64),
    (1, 32, 8, 1, 5000, 128),
    (2, 9, 3, 40, 70, 64),
    (1, 4, 1, 1, 3000, 256),
]


@pytest.mark.parametrize("shape", ATTN_UNIFORM, ids=lambda s: "B{}Hq{}Hkv{}q{}n{}D{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_attention_uniform(shape, dtype):
    B, Hq, Hkv, q, n, D = shape
    qs = attn_randn((B, Hq, q, D), dtype, 1)
    k = attn_randn((B, Hkv, n, D), dtype, 2)
    v = attn_randn((B, Hkv, n, D), dtype, 3)
    counts = torch.randint(1, 5, (B, Hkv, n), generator=torch.Generator().manual_seed(4)).to(torch.float32)
    kv_start = torch.tensor([min(b * 7, n - q) for b in range(B)], dtype=torch.int64)
    for ks, c in ((None, None), (kv_start, None), (kv_start, counts)):
        _, got = both(ops.attention, qs, k, v, kv_start=ks, counts=c)
        ref = attention_ref(qs, k, v, kv_start=ks, counts=c)
        same = attention_ref(qs, k, v, kv_start=ks, counts=c, dtype=dtype)
        assert_within_bound(got, ref, same)


@pytest.mark.parametrize("nq", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_attention_ragged(nq, dtype):
    B, Hkv, g, D = 2, 3, 4, 64
    lengths = [0, 5, 300, 4100, 64, 9][: B * Hkv]
    lengths = [n if n == 0 or n >= nq else nq for n in lengths]
    k, v, offsets, lens = ragged_layout(lengths, D, dtype)
    qs = attn_randn((B, Hkv * g, nq, D), dtype, 5)
    counts = torch.randint(1, 4, (k.shape[0],), generator=torch.Generator().manual_seed(6)).to(torch.int32)
    for c in (None, counts):
        _, got = both(ops.attention, qs, k, v, offsets=offsets, lengths=lens, counts=c)
        ref = attention_ref(qs, k, v, offsets=offsets, lengths=lens, counts=c)
        same = attention_ref(qs, k, v, offsets=offsets, lengths=lens, counts=c, dtype=dtype)
        assert_within_bound(got, ref, same)


def test_attention_strided_cache():
    """A view into a larger preallocated cache (the layout generate() uses)."""
    big_k = attn_randn((1, 8, 4096, 128), torch.float16, 1)
    big_v = attn_randn((1, 8, 4096, 128), torch.float16, 2)
    k, v = big_k[:, :, :3001], big_v[:, :, :3001]
    qs = attn_randn((1, 32, 1, 128), torch.float16, 3)
    cpu_out, got = both(ops.attention, qs, k, v)
    assert_within_bound(got, attention_ref(qs, k, v), attention_ref(qs, k, v, dtype=torch.float16))


# ---------------------------------------------------------------- packed KV

PACK_SHAPES = [  # B, H, n, D, G
    (1, 1, 1, 1, 1),
    (2, 3, 13, 7, 4),
    (1, 2, 70, 130, 32),
    (2, 8, 600, 128, 128),
    (1, 2, 5, 64, 1),
]


@pytest.mark.parametrize("shape", PACK_SHAPES, ids=lambda s: "B{}H{}n{}D{}G{}".format(*s))
@pytest.mark.parametrize("kind", ["keys", "values"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pack_unpack(shape, kind, bits, dtype):
    B, H, n, D, G = shape
    x = make((B, H, n, D), dtype, layout="transposed", seed=bits) * 3
    cpu_res, got = both(PACK[kind], x, bits, G)
    for a, b in zip(cpu_res, got):
        assert same_bits(a, b)
    assert same_bits(got.codes, torch.from_numpy(ref_pack(x, bits, G, kind)[0]))
    kw = {"head_dim": D} if kind == "values" else {}
    for out_dtype in DTYPES:
        back_cpu, back = both(UNPACK[kind], *cpu_res, bits, G, dtype=out_dtype, **kw)
        assert same_bits(back, back_cpu)


FEEDBACK_SHAPES = [(1, 1, 1, 1, 1), (2, 3, 13, 7, 4), (1, 2, 70, 64, 32), (2, 3, 600, 128, 64)]


@pytest.mark.parametrize("shape", FEEDBACK_SHAPES, ids=lambda s: "B{}H{}n{}D{}G{}".format(*s))
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pack_keys_with_feedback(shape, bits, dtype):
    """Key feedback (quant.h): the GPU's codes, mins and scales are the CPU's
    bit for bit, with and without a feedback index; a group too large for
    the kernel's shared memory is refused by name."""
    B, H, n, D, G = shape
    x = make((B, H, n, D), dtype, layout="transposed", seed=bits) * 3
    g = torch.Generator().manual_seed(bits)
    w = torch.triu(torch.randn(H + 1, D, D, generator=g) * 0.4, diagonal=1)
    cpu_res, got = both(ops.pack_keys, x, bits, G, feedback=w[:H].contiguous())
    for a, b in zip(cpu_res, got):
        assert same_bits(a, b)
    index = torch.randint(0, H + 1, (B, H, -(-n // G)), generator=g)
    cpu_res, got = both(ops.pack_keys, x, bits, G, feedback=w, feedback_index=index)
    for a, b in zip(cpu_res, got):
        assert same_bits(a, b)
    if shape == FEEDBACK_SHAPES[-1]:
        with pytest.raises(KVCompressValueError, match="feedback: on CUDA a key group"):
            ops.pack_keys(cuda(x), bits, 128, feedback=cuda(w[:H].contiguous()))


@pytest.mark.parametrize("shape", FEEDBACK_SHAPES, ids=lambda s: "B{}H{}n{}D{}G{}".format(*s))
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pack_values_with_clipped_ranges(shape, bits, dtype):
    """Clipped value ranges (quant.h): the GPU searches the same 45 ranges
    over the row it copies to shared memory and picks the CPU's, bit for
    bit; a row too long for shared memory is refused by name."""
    B, H, n, D, G = shape
    x = make((B, H, n, D), dtype, layout="transposed", seed=bits) * 3
    cpu_res, got = both(ops.pack_values, x, bits, G, clip=True)
    for a, b in zip(cpu_res, got):
        assert same_bits(a, b)
    if shape == FEEDBACK_SHAPES[-1]:
        with pytest.raises(KVCompressValueError, match="clip: on CUDA a value row of 12289 channels"):
            ops.pack_values(cuda(torch.zeros(1, 1, 1, 12289)), bits, G, clip=True)


@pytest.mark.parametrize("kind", ["keys", "values"])
def test_pack_strided_outputs(kind):
    """Slices of larger device buffers: written where they are, nowhere else."""
    B, H, n, D, G, bits = 2, 3, 21, 40, 8, 4
    x = make((B, H, n, D), torch.bfloat16, seed=11)
    want = PACK[kind](x, bits, G)
    codes_buf = torch.full((B, H, n + 5, 2 * want.codes.shape[3]), 0xAB, dtype=torch.uint8, device=DEV)
    g = want.mins.shape
    mins_buf = torch.full((B, H, g[2] + 3, g[3] + 2), -7.0, device=DEV)
    scales_buf = torch.full((B, H + 2, g[2], g[3]), -9.0, device=DEV)
    codes, mins, scales = codes_buf[:, :, 2:2 + n, ::2], mins_buf[:, :, 1:1 + g[2], 2:], scales_buf[:, 1:1 + H]
    PACK[kind](cuda(x), bits, G, codes=codes, mins=mins, scales=scales)
    assert torch.equal(codes.cpu(), want.codes) and torch.equal(mins.cpu(), want.mins)
    assert torch.equal(scales.cpu(), want.scales)
    assert (codes_buf[:, :, :2] == 0xAB).all() and (codes_buf[:, :, 2 + n:] == 0xAB).all()
    assert (codes_buf[..., 1::2] == 0xAB).all() and (mins_buf[:, :, 0] == -7).all()
    assert (mins_buf[..., :2] == -7).all() and (scales_buf[:, 0] == -9).all() and (scales_buf[:, 1 + H:] == -9).all()
    out_buf = torch.full((B, H, n, 2 * D), 5.0, dtype=torch.float16, device=DEV)
    UNPACK[kind](codes, mins, scales, bits, G, out=out_buf[..., 1::2])
    kw = {"head_dim": D} if kind == "values" else {}
    assert same_bits(out_buf[..., 1::2].cpu(), UNPACK[kind](*want, bits, G, dtype=torch.float16, **kw))
    assert (out_buf[..., ::2] == 5).all()


@pytest.mark.parametrize("kind", ["keys", "values"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pack_nonfinite_refused(kind, dtype):
    x = make((2, 3, 50, 16), dtype, seed=12).to(DEV)
    x[1, 2, 40, 3] = float("inf")
    x[1, 1, 9, 15] = float("nan")
    codes = torch.full((2, 3, 50, 8), 0x5A, dtype=torch.uint8, device=DEV)
    g = (2, 3, 7, 16) if kind == "keys" else (2, 3, 50, 2)
    mins, scales = torch.full(g, 3.0, device=DEV), torch.full(g, 4.0, device=DEV)
    with pytest.raises(KVCompressValueError, match=rf"^{kind}: element \[1, 1, 9, 15\] is nan; .*nothing was written"):
        PACK[kind](x, 4, 8, codes=codes, mins=mins, scales=scales)
    torch.cuda.synchronize()
    assert (codes == 0x5A).all() and (mins == 3).all() and (scales == 4).all()


# ---------------------------------------------------------------- packed attention

PACKED_UNIFORM = [  # B, Hq, Hkv, q, n, r, D, G
    (1, 4, 4, 1, 64, 1, 64, 32),
    (2, 8, 2, 1, 700, 5, 128, 32),
    (2, 6, 2, 4, 37, 9, 40, 16),
    (1, 6, 3, 3, 50, 3, 24, 7),
    (2, 4, 2, 40, 90, 45, 33, 32),
    (1, 32, 8, 1, 5000, 32, 128, 64),
    (1, 4, 1, 1, 3000, 2, 256, 128),
]


@pytest.fixture(params=["auto", "generic"])
def packed_kernel(request, monkeypatch):
    """Each packed-attention case on the kernel the op picks (the tiled one
    for decode-sized problems with aligned rows) and on the generic kernel
    forced through KVCOMPRESS_CUDA_PACKED_KERNEL."""
    if request.param == "generic":
        monkeypatch.setenv("KVCOMPRESS_CUDA_PACKED_KERNEL", "generic")
    else:
        monkeypatch.delenv("KVCOMPRESS_CUDA_PACKED_KERNEL", raising=False)
    return request.param


@pytest.mark.parametrize("shape", PACKED_UNIFORM, ids=lambda s: "B{}Hq{}Hkv{}q{}n{}r{}D{}G{}".format(*s))
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_packed_attention_uniform(shape, bits, dtype, packed_kernel):
    B, Hq, Hkv, q, n, r, D, G = shape
    qs, pk, rk, rv = uniform_case(*shape, bits, dtype)
    counts = torch.randint(1, 5, (B, Hkv, n), generator=torch.Generator().manual_seed(4)).to(torch.float32)
    kv_start = torch.tensor([min(b * 7, n + r - 1) for b in range(B)], dtype=torch.int64)
    for ks, c in ((None, None), (kv_start, None), (kv_start, counts)):
        _, got = both(ops.packed_attention, qs, *pk.args(), rk, rv, bits=bits, group=G, kv_start=ks, counts=c)
        ref = packed_ref(qs, pk, rk, rv, kv_start=ks, counts=c)
        same = packed_ref(qs, pk, rk, rv, kv_start=ks, counts=c, dtype=dtype)
        assert_within_bound(got, ref, same)


@pytest.mark.parametrize("nq", [1, 4])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_packed_attention_ragged(nq, bits, dtype, packed_kernel):
    B, Hkv, g, D, G, r = 2, 3, 4, 64, 32, nq + 2
    pk = pack_ragged([0, 5, 300, 4100, 64, 9], D, bits, G)
    qs = attn_randn((B, Hkv * g, nq, D), dtype, 5)
    rk, rv = attn_randn((B, Hkv, r, D), dtype, 6), attn_randn((B, Hkv, r, D), dtype, 7)
    counts = torch.randint(1, 4, (pk.N,), generator=torch.Generator().manual_seed(6)).to(torch.float32)
    # each row's masked prefix (a row-mode sliding window's): row 0 holds a head of 0 packed slots (limit r),
    # row 1's reaches past its 9-slot head into the residual
    kv_start = torch.tensor([min(2, r), 9 + r - nq], dtype=torch.int64)
    for ks, c in ((None, None), (None, counts), (kv_start, None), (kv_start, counts)):
        _, got = both(ops.packed_attention, qs, *pk.args(), rk, rv, bits=bits, group=G, offsets=pk.offsets,
                      lengths=pk.lengths, counts=c, kv_start=ks)
        ref = packed_ref(qs, pk, rk, rv, counts=c, kv_start=ks)
        same = packed_ref(qs, pk, rk, rv, counts=c, kv_start=ks, dtype=dtype)
        assert_within_bound(got, ref, same)


@pytest.mark.parametrize("r", [0, 5], ids=["alone", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_packed_attention_lse_and_no_residual(r, dtype, packed_kernel):
    """return_lse, and a packed part with no residual (every query sees
    every packed slot): the GPU's lse against float64, its output against
    the one-query-at-a-time reference."""
    B, Hq, Hkv, nq, n, D, G = 2, 8, 2, 3, 700, 64, 32
    qs, pk, _, _ = uniform_case(B, Hq, Hkv, nq, n, 1, D, G, 4, dtype)
    rk, rv = attn_randn((B, Hkv, r, D), dtype, 6), attn_randn((B, Hkv, r, D), dtype, 7)
    kv_start = torch.tensor([0, 45])
    _, (got, lse) = both(ops.packed_attention, qs, *pk.args(), rk, rv, bits=4, group=G, kv_start=kv_start,
                         return_lse=True)
    check_lse(lse, lse_ref(qs, pk, rk, kv_start=kv_start, all_visible=r == 0))
    ref_fn = one_query_at_a_time if r == 0 else packed_ref
    assert_within_bound(got, ref_fn(qs, pk, rk, rv, kv_start=kv_start),
                        ref_fn(qs, pk, rk, rv, kv_start=kv_start, dtype=dtype))


@pytest.mark.parametrize("bits,value_bits", [(4, 2), (2, 8)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_packed_attention_value_bits(bits, value_bits, dtype, packed_kernel):
    """Values at their own width on the GPU against float64."""
    B, Hq, Hkv, nq, n, r, D, G = 2, 8, 2, 3, 700, 5, 64, 32
    qs = attn_randn((B, Hq, nq, D), dtype, 3)
    k = attn_randn((B, Hkv, n, D), torch.float32, 4) * 1.5
    v = attn_randn((B, Hkv, n, D), torch.float32, 5)
    pk = pack_uniform(k, v, bits, G, value_bits=value_bits)
    rk, rv = attn_randn((B, Hkv, r, D), dtype, 6), attn_randn((B, Hkv, r, D), dtype, 7)
    kv_start = torch.tensor([0, 45])
    _, got = both(ops.packed_attention, qs, *pk.args(), rk, rv, bits=bits, value_bits=value_bits, group=G,
                  kv_start=kv_start)
    assert_within_bound(got, packed_ref(qs, pk, rk, rv, kv_start=kv_start),
                        packed_ref(qs, pk, rk, rv, kv_start=kv_start, dtype=dtype))


# decode-sized problems the tiled kernel takes: 1, <= 4 and <= 8 rows per kv
# head, head_dim 64/128/256, G 32..256, residuals that cross tile (128-slot)
# boundaries, none at all, and two query positions with their causal limits
PACKED_DECODE = [  # B, Hq, Hkv, q, n, r, D, G
    (2, 16, 2, 1, 1000, 7, 128, 32),
    (3, 8, 8, 1, 777, 130, 64, 64),
    (1, 8, 2, 2, 400, 40, 128, 32),
    (1, 4, 1, 1, 513, 0, 256, 256),
    (2, 6, 2, 1, 300, 300, 64, 128),
]


@pytest.mark.parametrize("shape", PACKED_DECODE, ids=lambda s: "B{}Hq{}Hkv{}q{}n{}r{}D{}G{}".format(*s))
@pytest.mark.parametrize("bits,value_bits", [(2, 2), (4, 4), (8, 8), (4, 2), (2, 8)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_packed_attention_decode_shapes(shape, bits, value_bits, dtype, packed_kernel):
    """Both kernels against float64 on decode shapes, with padding that
    starts mid-tile, past a whole tile, and inside the residual."""
    B, Hq, Hkv, nq, n, r, D, G = shape
    qs = attn_randn((B, Hq, nq, D), dtype, 3)
    k = attn_randn((B, Hkv, n, D), torch.float32, 4) * 1.5 + attn_randn((1, 1, 1, D), torch.float32, 8)
    v = attn_randn((B, Hkv, n, D), torch.float32, 5)
    pk = pack_uniform(k, v, bits, G, value_bits=value_bits)
    rk, rv = attn_randn((B, Hkv, r, D), dtype, 6), attn_randn((B, Hkv, r, D), dtype, 7)
    choices = [45, 200, n + (r - nq) // 2]  # mid-tile, past a tile, inside the residual
    starts = [torch.tensor([choices[(b + k) % 3] for b in range(B)]) for k in range(3)]
    counts = torch.randint(1, 5, (B, Hkv, n), generator=torch.Generator().manual_seed(9)).to(torch.float32)
    for ks, c in ((None, None), (starts[0], counts), (starts[1], None), (starts[2], counts)):
        _, got = both(ops.packed_attention, qs, *pk.args(), rk, rv, bits=bits, value_bits=value_bits, group=G,
                      kv_start=ks, counts=c)
        assert_within_bound(got, packed_ref(qs, pk, rk, rv, kv_start=ks, counts=c),
                            packed_ref(qs, pk, rk, rv, kv_start=ks, counts=c, dtype=dtype))


def test_packed_attention_unaligned_rows_take_the_generic_kernel():
    """Code rows that are not 16-byte aligned (views one byte into wider
    buffers) are refused by the tiled kernel's 16-byte loads: the op must
    still answer, through the generic kernel, what it answers for the
    aligned copy."""
    B, Hq, Hkv, nq, n, r, D, G, bits = 2, 8, 2, 1, 600, 5, 128, 32, 4
    qs, pk, rk, rv = uniform_case(B, Hq, Hkv, nq, n, r, D, G, bits, torch.float32)
    g_args = [cuda(a) for a in pk.args()]
    views = list(g_args)
    for i in (0, 3):  # key and value codes
        c = g_args[i]
        buf = torch.zeros(c.shape[:-1] + (c.shape[-1] + 17,), dtype=torch.uint8, device=DEV)
        buf[..., 1:1 + c.shape[-1]] = c
        views[i] = buf[..., 1:1 + c.shape[-1]]
    gq, grk, grv = cuda(qs), cuda(rk), cuda(rv)
    aligned = ops.packed_attention(gq, *g_args, grk, grv, bits=bits, group=G)
    shifted = ops.packed_attention(gq, *views, grk, grv, bits=bits, group=G)
    ref = packed_ref(qs, pk, rk, rv)
    same = packed_ref(qs, pk, rk, rv, dtype=torch.float32)
    assert_within_bound(aligned.cpu(), ref, same)
    assert_within_bound(shifted.cpu(), ref, same)


# ---------------------------------------------------------------- pages (Quest)

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_page_bounds_and_scores(dtype):
    from test_quest import bounds_ref

    keys = attn_randn((2, 3, 101, 40), dtype, 5)
    q = attn_randn((2, 6, 40), dtype, 6)
    P, pages = 16, 7

    def run(k, qq, start):
        kmin = torch.empty(2, 3, pages, 40, device=k.device)
        kmax = torch.empty_like(kmin)
        ops.page_bounds(k, kmin, kmax, P, 0, pages)
        return kmin, kmax, ops.page_scores(qq, kmin, kmax, pages, P, kv_start=start)

    start = torch.tensor([0, 33])
    (cmin, cmax, cs), (gmin, gmax, gs) = both(lambda k, qq, st: run(k, qq, st), keys, q, start)
    lo, hi = bounds_ref(keys, P)
    # min/max are exact on both backends; the scores sum channels in the same order with the same roundings
    assert same_bits(gmin, cmin) and same_bits(gmax, cmax) and torch.equal(cmin.double(), lo)
    assert same_bits(gs, cs) and (gs[1, :, :2] == -math.inf).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_attention_pages(dtype):
    from test_quest import paged_attention_ref

    B, Hq, Hkv, n, D, P = 2, 8, 2, 333, 64, 16
    qs = attn_randn((B, Hq, 1, D), dtype, 1)
    k = attn_randn((B, Hkv, n, D), dtype, 2)
    v = attn_randn((B, Hkv, n, D), dtype, 3)
    g = torch.Generator().manual_seed(7)
    pages = torch.stack([torch.stack([torch.cat([torch.randperm(20, generator=g)[:6].sort().values,
                                                 torch.tensor([20])]) for _ in range(Hkv)]) for _ in range(B)])
    kv_start = torch.tensor([0, 29])
    _, got = both(ops.attention_pages, qs, k, v, pages, P, kv_start=kv_start)
    ref = paged_attention_ref(qs, k, v, pages, P, kv_start)
    same = paged_attention_ref(qs, k, v, pages, P, kv_start, dtype=dtype)
    assert_within_bound(got, ref, same)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ragged_page_bounds_and_scores(dtype):
    """Ragged layout: bounds exact and the same bits on both backends, the
    right-aligned scores the same floats (same channel order)."""
    from test_quest import bound_rows, ragged_bounds_ref

    P, D, lengths_l = 16, 40, [101, 0, 17, 64]  # B = 2, H = 2
    keys, _, offsets, lengths = ragged_layout(lengths_l, D, dtype, seed=5)
    keys = keys.t().contiguous().t()
    page_offsets, Rp = bound_rows(lengths_l, P, seed=5)
    q = attn_randn((2, 6, D), dtype, 6)
    first = torch.tensor([2, 0, 1, 0])

    def run(k, qq, off, ln, po, fi):
        kmin = torch.full((Rp, D), 7.0, device=k.device)
        kmax = torch.full_like(kmin, 7.0)
        ops.page_bounds(k, kmin, kmax, P, 0, offsets=off, lengths=ln, page_offsets=po)
        ops.page_bounds(k, kmin, kmax, P, fi, offsets=off, lengths=ln, page_offsets=po)  # redo some pages
        return kmin, kmax, ops.page_scores(qq, kmin, kmax, 8, P, lengths=ln, page_offsets=po)

    (cmin, cmax, cs), (gmin, gmax, gs) = both(run, keys, q, offsets, lengths, page_offsets, first)
    assert same_bits(gmin, cmin) and same_bits(gmax, cmax) and same_bits(gs, cs)
    for (lo, _), po, n in zip(ragged_bounds_ref(keys, offsets, lengths, P), page_offsets.tolist(), lengths_l):
        assert torch.equal(cmin[po:po + -(-n // P)].double(), lo)
    assert (gs[0, 1] == -math.inf).all() and (gs[1, 0, :6] == -math.inf).all() and torch.isfinite(gs[1, 0, 6:]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ragged_attention_pages(dtype):
    """Ragged paged attention against float64, with counts, GQA, an empty
    head and padded lists; every page listed equals the GPU's ragged
    attention bit for bit."""
    from test_quest import ragged_paged_attention_ref, random_ragged_pages

    B, Hq, Hkv, D, P = 2, 8, 2, 64, 16
    lengths_l = [333, 0, 40, 700]
    k, v, offsets, lengths = ragged_layout(lengths_l, D, dtype, seed=2)
    qs = attn_randn((B, Hq, 1, D), dtype, 1)
    counts = torch.randint(1, 4, (k.shape[0],), generator=torch.Generator().manual_seed(3)).float()
    pages = random_ragged_pages(lengths_l, Hkv, P, 7, seed=7, pad=(-1,))
    _, got = both(ops.attention_pages, qs, k, v, pages, P, counts=counts, offsets=offsets, lengths=lengths)
    ref = ragged_paged_attention_ref(qs, k, v, pages, P, offsets, lengths, counts)
    same = ragged_paged_attention_ref(qs, k, v, pages, P, offsets, lengths, counts, dtype=dtype)
    assert_within_bound(got, ref, same)
    everything = random_ragged_pages(lengths_l, Hkv, P, 44, seed=0)
    _, g_all = both(ops.attention_pages, qs, k, v, everything, P, counts=counts, offsets=offsets, lengths=lengths)
    _, g_dense = both(ops.attention, qs, k, v, counts=counts, offsets=offsets, lengths=lengths)
    assert same_bits(g_all, g_dense)


# ---------------------------------------------------------------- LSH (MagicPIG)

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_simhash_and_lsh_attention(dtype):
    from test_magicpig import _case, lsh_ref

    q, k, v, planes, center = _case(dtype=dtype)
    # codes: the same signs (both backends sum the projection in the same lane order)
    _, gcodes = both(ops.simhash, k, planes, 4, center=center)
    ccodes = ops.simhash(k, planes, 4, center=center)
    assert (gcodes == ccodes).float().mean() > 0.999
    qcodes = ops.simhash(q, planes, 4, group=2)
    kv_start = torch.tensor([0, 31])
    (_, _, creads), (got, lse, reads) = both(ops.lsh_attention, q, k, v, ccodes, qcodes, 4, hits=2, sinks=4,
                                             window=16, center=center, scaling=0.25, kv_start=kv_start,
                                             return_lse=True, return_reads=True)
    ref, ref_lse = lsh_ref(q, k, v, ccodes, qcodes, 4, 2, 4, 16, center, 0.25, kv_start)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert (got.double() - ref).abs().max() < tol and (lse.double() - ref_lse).abs().max() < 1e-3
    assert torch.equal(reads.cpu(), creads)  # the same codes collide on both backends


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_lsh_attention_ragged_with_counts(dtype):
    """Ragged heads (one empty, segments shuffled) with merge counts; the
    uniform layout with counts too: both backends collide the same codes."""
    from test_magicpig import _case, _ragged, lsh_ref

    q, k, v, planes, center = _case(dtype=dtype)
    codes = ops.simhash(k, planes, 4, center=center)
    qcodes = ops.simhash(q, planes, 4, group=2)
    counts = torch.rand(2, 2, 300, generator=torch.Generator().manual_seed(5)) * 4 + 0.5
    kr, vr, cr, nr, offsets, lengths = _ragged([300, 0, 11, 187], k, v, codes, counts, strided=True)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    kw = {"hits": 2, "sinks": 4, "window": 16, "center": center, "scaling": 0.25, "return_lse": True,
          "return_reads": True}
    (_, _, creads), (got, lse, reads) = both(ops.lsh_attention, q, kr, vr, cr, qcodes, 4, offsets=offsets,
                                             lengths=lengths, counts=nr, **kw)
    ref, ref_lse = lsh_ref(q, kr, vr, cr, qcodes, 4, 2, 4, 16, center, 0.25, counts=nr, offsets=offsets,
                           lengths=lengths)
    fin = torch.isfinite(ref_lse)
    assert (got.double() - ref).abs().max() < tol and (lse.double()[fin] - ref_lse[fin]).abs().max() < 1e-3
    assert torch.equal(torch.isinf(lse), ~fin) and torch.equal(reads.cpu(), creads)
    (_, _, creads), (got, lse, reads) = both(ops.lsh_attention, q, k, v, codes, qcodes, 4, counts=counts,
                                             kv_start=torch.tensor([0, 31]), **kw)
    ref, ref_lse = lsh_ref(q, k, v, codes, qcodes, 4, 2, 4, 16, center, 0.25, torch.tensor([0, 31]), counts=counts)
    assert (got.double() - ref).abs().max() < tol and (lse.double() - ref_lse).abs().max() < 1e-3
    assert torch.equal(reads.cpu(), creads)


# ---------------------------------------------------------------- MiniCache (SLERP merge)

@pytest.mark.parametrize("t", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_slerp_merge_and_restore(dtype, t):
    from test_minicache import slerp_ref

    x1 = make((2, 3, 37, 64), dtype, "strided", seed=1)
    x2 = make((2, 3, 37, 64), dtype, seed=2)
    x2[0, 0, 3] = x1[0, 0, 3]  # parallel: the linear fallback
    x2[0, 0, 4] = -x1[0, 0, 4]  # antipodal
    x2[0, 0, 5] = 0  # a zero vector
    c, g = both(ops.slerp_merge, x1, x2, t)
    e, norms, dist = slerp_ref(x1, x2, t)
    # the same branches and math; sinf/atan2f may differ by an ulp
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert (g.dir.double() - c.dir.double()).abs().max() <= tol
    torch.testing.assert_close(g.norms, c.norms, rtol=1e-6, atol=0)
    torch.testing.assert_close(g.dist, c.dist, rtol=0, atol=1e-6)
    assert_within_bound(g.dir[:, :, 6:], e[:, :, 6:], e[:, :, 6:].to(dtype), "dir")
    slots = torch.arange(37).flip(0)[:30].sort().values.expand(2, 3, 30).contiguous()
    kept_slots = torch.tensor([i for i in range(37) if i not in set(slots[0, 0].tolist())]).expand(2, 3, 7)
    kept = make((2, 3, 7, 64), dtype, seed=3)
    for which in (0, 1):
        base = torch.full((2, 3, 40, 64), 3.0, dtype=dtype)
        want = ops.slerp_restore(c.dir[:, :, :30], c.norms[:, :, :30], slots, which, base.clone(), kept=kept,
                                 kept_slots=kept_slots)
        got = ops.slerp_restore(cuda(c.dir[:, :, :30]), cuda(c.norms[:, :, :30]), cuda(slots), which, cuda(base),
                                kept=cuda(kept), kept_slots=cuda(kept_slots))
        torch.cuda.synchronize()
        assert same_bits(got.cpu(), want)  # one fp32 product, rounded once, on both


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("per_head", [False, True], ids=["rows", "heads"])
def test_minicache_attention(dtype, per_head):
    """The in-place decode attention: the same rows, order and online
    softmax on both backends, and the float64 reference of the CPU test."""
    from test_minicache import _in_place_ref

    B, H, D = 2, 2, 32
    g = torch.Generator().manual_seed(50)
    k1, v1, k2, v2 = (make((B, H, 12, D), dtype, seed=51 + i) for i in range(4))
    pos1 = torch.stack([torch.randperm(16, generator=g)[:12].sort().values for _ in range(B * H)]).view(B, H, 12)
    pos2 = torch.stack([torch.randperm(16, generator=g)[:12].sort().values for _ in range(B * H)]).view(B, H, 12)
    counts = (1 + torch.rand(B, H, 12, generator=g)) if per_head else None
    starts = torch.tensor([[0, 2], [1, 0]]) if per_head else [0, 2]
    pair = kvcompress.stores.MergedPair.merge([(k1, v1, pos1.int(), starts, counts),
                                               (k2, v2, pos2.int(), starts, counts)], 0.6, 0.2)
    tk, tv = make((B, H, 3, D), dtype, seed=56), make((B, H, 3, D), dtype, seed=57)
    q = make((B, 2 * H, 1, D), dtype, seed=58)
    cargs = dict(counts=pair.counts[0], kept_counts=pair.counts[1][0]) if per_head else {}
    wk, wv, ws = pair.whole[0]
    c, got = both(ops.minicache_attention, q, pair.dir_k, pair.dir_v, pair.norms_k, pair.norms_v, pair.slots[0], 0,
                  keys=wk, values=wv, kept_slots=ws, tail_keys=tk, tail_values=tv, **cargs)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert (got.double() - c.double()).abs().max() <= tol
    # both within the CPU test's bounds of float64 over the rows as stored
    tail = kvcompress.stores.UniformStore()
    tail.append(tk, tv, 16)
    ref = _in_place_ref(q, pair, 0, tail, D ** -0.5, per_head)
    bound = 2e-6 if dtype == torch.float32 else (2e-3 if dtype == torch.float16 else 1.6e-2)
    for out in (c, got):
        assert float((out.double() - ref).abs().max()) <= bound


# ---------------------------------------------------------------- boundary

def test_mixed_devices_rejected():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(KVCompressValueError, match=r"keys: is on cuda:0 but queries is on cpu"):
        ops.window_scores(q, q.to(DEV))
    s = torch.rand(1, 2, 40, device=DEV)
    with pytest.raises(KVCompressValueError, match="kv_start: is on cpu but scores is on cuda:0"):
        ops.select_topk(s, 5, kv_start=torch.zeros(1, dtype=torch.int64))


def test_bad_index_on_device_rejected():
    k = torch.randn(1, 2, 10, 8, device=DEV)
    idx = torch.zeros(1, 2, 3, dtype=torch.int64, device=DEV)
    idx[0, 1, 2] = 10
    with pytest.raises(KVCompressValueError, match=r"indices: value 10 at \[0, 1, 2\]"):
        ops.gather(k, k, idx)


def test_side_stream_ordering():
    """Ops run on torch's current stream: work queued before on a side stream
    is seen, and work queued after sees the result, without synchronising."""
    s = torch.cuda.Stream()
    x = torch.randn(4, 8, 4096, 64, device=DEV)
    with torch.cuda.stream(s):
        y = x * 2  # queued on s
        n = ops.vector_norm(y)
        z = n + 1  # reads the op's output on s
    s.synchronize()
    torch.testing.assert_close(z.cpu(), (x * 2).cpu().norm(dim=-1) + 1, rtol=1e-5, atol=1e-5)


def test_legacy_dlpack_path():
    """Producers without the C exchange table go through __dlpack__(stream=1)."""
    prev = _C._use_exchange_api(False)
    try:
        x = torch.randn(2, 3, 50, 16, device=DEV)
        torch.testing.assert_close(ops.vector_norm(x).cpu(), x.cpu().norm(dim=-1), rtol=1e-5, atol=1e-6)
    finally:
        _C._use_exchange_api(prev)


# ---------------------------------------------------------------- end to end

def _generate(model, ids, method, device):
    model.to(device)
    with kvcompress.compress(model, method):
        out = model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                             max_new_tokens=24, do_sample=False)
    return out.cpu()


GPU_METHODS = {
    "snapkv": lambda: kvcompress.SnapKV(budget=64),
    "ems": lambda: kvcompress.EMS(budget=64),
    "kivi4": lambda: kvcompress.KIVI(bits=4, group=32, residual=64),
    # evict, then pack what is kept: uniform (SnapKV) and per-head merged (EMS) packed stores
    "snapkv+kivi4": lambda: kvcompress.SnapKV(budget=64) + kvcompress.KIVI(bits=4, group=32, residual=64),
    # slot state (H2O's accumulated attention) carried through packing and re-selection rounds
    "h2o+kivi4": lambda: kvcompress.H2O(budget=64) + kvcompress.KIVI(bits=4, group=32, residual=64),
    "ems+kivi4": lambda: kvcompress.EMS(budget=64) + kvcompress.KIVI(bits=4, group=32, residual=64),
    # mixed precision: the selected slots at 8 bits, the rest at 2 (two packed widths joined by lse)
    "mikv2+8": lambda: kvcompress.MiKV(budget=64, bits=2, high_bits=8),
    # 4-bit keys, 2-bit values, uniform and per-head
    "kivi4v2": lambda: kvcompress.KIVI(bits=4, value_bits=2, group=32, residual=64),
    "ems+kivi4v2": lambda: kvcompress.EMS(budget=64) + kvcompress.KIVI(bits=4, value_bits=2, group=32, residual=64),
    # keys packed in the Hadamard basis: the packed part and the residual in two calls, uniform and per-head
    "kivi2rot": lambda: kvcompress.KIVI(bits=2, group=32, residual=64, rotate=True),
    "ems+kivi4rot": lambda: kvcompress.EMS(budget=64) + kvcompress.KIVI(bits=4, group=32, residual=64, rotate=True),
    "mikv2+8rot": lambda: kvcompress.MiKV(budget=64, bits=2, high_bits=8, rotate=True),  # three parts joined
    # the first 4 slots in full precision at the residual's front: one call, rotated two (with the block)
    "kivi2sinks": lambda: kvcompress.KIVI(bits=2, group=32, residual=64, sinks=4),
    "snapkv+kivi2rotsinks": lambda: kvcompress.SnapKV(budget=128) + kvcompress.KIVI(bits=2, group=32, residual=64,
                                                                                  rotate=True, sinks=4),
    # a block per head behind a merging evictor (the residual's front of the per-head packed store)
    "ems+kivi2rotsinks": lambda: kvcompress.EMS(budget=128) + kvcompress.KIVI(bits=2, group=32, residual=64,
                                                                              rotate=True, sinks=4),
    # keys rounded with query-weighted error feedback (ops.pack_keys(feedback=...)), uniform and per-head
    "kivi2fb": lambda: kvcompress.KIVI(bits=2, group=32, residual=64, rotate=True, sinks=4, feedback=True),
    "ems+kivi2fb": lambda: kvcompress.EMS(budget=128) + kvcompress.KIVI(bits=2, group=32, residual=64,
                                                                        feedback=True),
    # value groups over clipped ranges, chosen per layer by the output projection, uniform and per-head
    "kivi2clip": lambda: kvcompress.KIVI(bits=2, group=32, residual=64, sinks=4, clip_values="auto"),
    "ems+kivi2clip": lambda: kvcompress.EMS(budget=128) + kvcompress.KIVI(bits=2, group=32, residual=64,
                                                                          clip_values=True),
    # sparse decoding over pages, alone and over what an evictor keeps
    "quest": lambda: kvcompress.Quest(token_budget=64, dense_layers=1),
    "snapkv+quest": lambda: kvcompress.SnapKV(budget=128) + kvcompress.Quest(token_budget=64),
    "tidaldecode": lambda: kvcompress.TidalDecode(token_budget=48, selection_layers=(1,)),
    "magicpig": lambda: kvcompress.MagicPIG(K=4, L=30, window=16, dense_layers=1),
    # the three readers over per-head (AdaKV) and merged (EMS) layers
    "adakv+quest": lambda: kvcompress.AdaKV(budget=128) + kvcompress.Quest(token_budget=64, page=8),
    "ems+tidaldecode": lambda: kvcompress.EMS(budget=128) + kvcompress.TidalDecode(token_budget=48,
                                                                                   selection_layers=(1,)),
    "ems+magicpig": lambda: kvcompress.EMS(budget=128) + kvcompress.MagicPIG(K=4, L=30, window=16, dense_layers=1),
    # cross-layer: two merged pairs, reconstructed for every attention call
    "minicache": lambda: kvcompress.MiniCache(start_layer=0, t=0.6, retain=0.1),
    "snapkv+minicache": lambda: kvcompress.SnapKV(budget=64) + kvcompress.MiniCache(start_layer=0),
    "minicache+kivi4": lambda: kvcompress.MiniCache(start_layer=2) + kvcompress.KIVI(bits=4, group=32, residual=64),
    # a layer reading another layer's cache
    "kvsharer": lambda: kvcompress.KVSharer(plan="2>0/3>1"),
    "kvcrush": lambda: kvcompress.KVCrush(budget=64, alpha=0.25, window=8),
    "kvmerger": lambda: kvcompress.KVMerger(budget=64, sigma=0.5),
    # the probe-query scores (ops.actqkv_scores) at prefill and every re-selection
    "actqkv": lambda: kvcompress.ActQKV(budget=64),
    # per-layer budgets decided after the whole prefill (ops.pooled_counts, ops.row_cosine)
    "dynamickv": lambda: kvcompress.DynamicKV(budget=64),
    "squeezeattention": lambda: kvcompress.SqueezeAttention(budget=64),
    # per-head policies from a recovery comparison, token ids from the log
    "fastgen": lambda: kvcompress.FastGen(budget=64, recovery=0.5, special=range(3, 30), punct=range(30, 110)),
}


@pytest.mark.parametrize("method", sorted(GPU_METHODS))
def test_generate_tiny_model_gpu_equals_cpu(tiny_model, method):
    model = tiny_model
    ids = torch.randint(3, model.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(0))
    make = GPU_METHODS[method]
    try:
        got = [_generate(model, ids, make(), d) for d in ("cpu", DEV)]
    finally:
        model.to("cpu")
    assert torch.equal(got[0], got[1])


PACKED_GPU_METHODS = ["kivi4", "snapkv+kivi4", "h2o+kivi4", "ems+kivi4", "mikv2+8", "kivi4v2", "ems+kivi4v2",
                      "kivi2rot", "ems+kivi4rot", "mikv2+8rot", "kivi2sinks", "snapkv+kivi2rotsinks",
                      "ems+kivi2rotsinks", "kivi2fb", "ems+kivi2fb"]


@pytest.fixture(scope="module")
def tiny_model_d64():
    """The tiny model's shape with head_dim 64 and 4 query heads per kv head,
    so decode steps take the tiled packed kernel (the tiny model's head_dim 16
    takes the generic one)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("method", PACKED_GPU_METHODS)
def test_generate_tiled_packed_gpu_equals_cpu(tiny_model_d64, method):
    """Greedy generate() over packed stores whose decode attention runs the
    tiled kernel on the GPU: the same tokens on both devices."""
    model = tiny_model_d64
    ids = torch.randint(3, model.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(1))
    try:
        got = [_generate(model, ids, GPU_METHODS[method](), d) for d in ("cpu", DEV)]
    finally:
        model.to("cpu")
    assert torch.equal(got[0], got[1])


def _generate_padded(model, rows, method, device, n=40):
    """Greedy generate() of ``n`` tokens from left-padded ``rows`` on ``device``."""
    from generation import left_pad

    ids, mask = left_pad(rows)
    model.to(device)
    with kvcompress.compress(model, method):
        out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out.cpu()


@pytest.mark.parametrize("case", ["sliding", "whole", "rounds"])
def test_padded_rows_apart_gpu_equals_cpu(tiny_model, case):
    """Row mode where the kernel takes no ``residual_hidden``: a sliding
    layer's decode step in two calls (the packed part masked by the ragged
    layout's ``kv_start``), behind a per-head evictor a row kept whole on
    its own schedule (segments, own residuals and sink block in three
    calls), and behind one with rounds rows that take sink blocks of
    different lengths (the block call reads each row's sinks moved to its
    end, ``kv_start`` masking the rest, a whole block for a row that takes
    none): the same tokens on both devices."""
    from generation import random_ids, tiny_sliding_mistral

    if case == "sliding":
        model, lengths = tiny_sliding_mistral(), (100, 30, 61)
        make = lambda: kvcompress.KIVI(bits=2, group=8, residual=8)  # noqa: E731
    elif case == "whole":
        model, lengths = tiny_model, (150, 60, 131, 14)
        make = lambda: kvcompress.EMS(budget=64, interval=0) + kvcompress.KIVI(  # noqa: E731
            bits=2, group=8, residual=8, rotate="auto", sinks=4, feedback=True)
    else:
        # test_batches' rows behind rounds: their layers take 4, 0 and 0 or 4 sinks per row
        model, lengths = tiny_model, (150, 97, 131)
        make = lambda: kvcompress.EMS(budget=64) + kvcompress.KIVI(bits=2, sinks=4)  # noqa: E731
    rows = [random_ids(n, (0 if case == "rounds" else 90) + n) for n in lengths]
    try:
        got = [_generate_padded(model, rows, make(), d) for d in ("cpu", DEV)]
    finally:
        model.to("cpu")
    assert torch.equal(got[0], got[1])


@pytest.mark.slow
def test_generate_default_model_gpu_equals_cpu(default_model, shakespeare):
    """Greedy fp32 generate() with EMS on the default model: the same tokens on both devices."""
    model, tok = default_model
    ids = tok(shakespeare[:20000], return_tensors="pt").input_ids[:, :1500]
    try:
        got = [_generate(model, ids, kvcompress.EMS(budget=128), d) for d in ("cpu", DEV)]
    finally:
        model.to("cpu")
    assert torch.equal(got[0], got[1])


# ---------------------------------------------------------------- KVCrush

@pytest.mark.parametrize("shape", [(1, 1, 1, 0, 0), (2, 4, 37, 5, 10), (3, 32, 1500, 64, 300), (2, 70, 200, 9, 50)],
                         ids=lambda s: "B{}H{}T{}G{}kept{}".format(*s))
@pytest.mark.parametrize("anchor", ["alternate", "random", "mean"])
def test_kvcrush_pick(shape, anchor):
    from test_kvcrush import _mass, pick_ref

    B, H, T, G, n_kept = shape
    g = torch.Generator().manual_seed(T)
    starts = [min(b * 3, T) for b in range(B)]
    mass = _mass(B, H, T, seed=H, kv_start=starts)
    kept = torch.zeros(B, T, dtype=torch.uint8)
    for b in range(B):
        kept[b, starts[b] + torch.randperm(T - starts[b], generator=g)[:n_kept]] = 1
    for ks in (None, torch.tensor(starts)):
        want, got = both(ops.kvcrush_pick, mass, kept, G, anchor=anchor, seed=5, kv_start=ks)
        # the same thresholds (summed in slot order), so the same bits and picks
        assert torch.equal(got.picks, want.picks) and torch.equal(got.dist, want.dist)
        if T <= 200:
            assert want.picks.tolist() == pick_ref(mass, kept, G, anchor, 5, ks)[0]


@pytest.mark.parametrize("shape", [(1, 1, 1, 8, 8, 0, 0), (2, 3, 90, 24, 40, 2, 4), (1, 4, 2000, 128, 128, 4, 16)],
                         ids=lambda s: "B{}H{}T{}D{}Dv{}s{}w{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kvmerger_sets_and_gauss_merge(shape, dtype):
    """Both ops sum in the same order on both backends: the GPU's cosines and
    sets are the CPU's, and its merges are within the float64 bound."""
    B, H, T, D, Dv, sinks, window = shape
    k = _walk(B, H, T, D, seed=4, dtype=dtype)
    v = make((B, H, T, Dv), dtype, seed=5)
    g = torch.Generator().manual_seed(6)
    scores = torch.rand(B, H, T, generator=g)
    counts = torch.randint(1, 4, (B, H, T), generator=g).float()
    kv_start = torch.tensor([min(b * 3, T - 1) for b in range(B)], dtype=torch.int64)
    cpu_sets, sets = both(ops.kvmerger_sets, k, threshold=0.6, sinks=sinks, window=window, kv_start=kv_start)
    torch.testing.assert_close(sets.sims, cpu_sets.sims, atol=1e-6, rtol=1e-5, equal_nan=True)
    near = ((cpu_sets.sims - 0.6).abs() < 1e-5).any()
    if not near:
        assert torch.equal(sets.runs, cpu_sets.runs)
    if T <= 100:
        s64, r64 = sets_ref(k, 0.6, sinks, window, kv_start)
        assert torch.isnan(sets.sims).equal(torch.isnan(s64))
    keep = max(1, (T - int(kv_start.max())) // 4)
    centers = ops.select_topk(scores, keep, sinks=min(sinks, keep), kv_start=kv_start)
    runs = cpu_sets.runs
    for c in (None, counts):
        cpu_res, got = both(ops.gauss_merge, k, v, scores, centers, runs, sigma=1.5, counts=c, kv_start=kv_start,
                            return_assign=True)
        assert torch.equal(got.assign, cpu_res.assign) and torch.equal(got.counts, cpu_res.counts)
        # fp32 sums that differ in their last bits (the devices contract
        # multiply-adds differently) can round to neighbouring bf16 values:
        # one bf16 ulp (2^-7 relative at most) is above a 1e-3 tolerance, so
        # the devices may differ by one ulp of the output dtype, no more (an
        # H200 run had 1 of 256,000 bf16 values one ulp apart)
        rtol = max(1e-3, torch.finfo(dtype).eps)
        torch.testing.assert_close(got.keys.float(), cpu_res.keys.float(), atol=1e-5, rtol=rtol)
        torch.testing.assert_close(got.values.float(), cpu_res.values.float(), atol=1e-5, rtol=rtol)
        if T <= 100:
            ref = merge_ref(k, v, scores, centers, runs, 1.5, c)
            same = merge_ref(k, v, scores, centers, runs, 1.5, c, dtype=dtype)
            assert_within_bound(got.keys, ref[0], same[0], "keys")
            assert_within_bound(got.values, ref[1], same[1], "values")
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 5, 4), (2, 4, 2, 8, 40, 16), (3, 6, 3, 16, 16, 33),
                                   (2, 8, 2, 32, 3000, 128)], ids=lambda s: "B{}Hq{}Hkv{}W{}Tk{}D{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_actqkv_scores(shape, dtype):
    B, Hq, Hkv, W, Tk, D = shape
    q = make((B, Hq, W, D), dtype, seed=6) * 2
    k = make((B, Hkv, Tk, D), dtype, layout="transposed", seed=7)
    kv_start = torch.tensor([min(b * 5, Tk) for b in range(B)], dtype=torch.int64)
    for ks in (None, kv_start):
        _, (got, w) = both(ops.actqkv_scores, q, k, kv_start=ks, return_weights=True)
        ref, wref = actqkv_ref(q, k, kv_start=ks)
        same, wsame = actqkv_ref(q, k, kv_start=ks, dtype=torch.float32)
        assert not torch.isnan(got).any() and not torch.isnan(w).any()
        assert_close_2x(w, wref, wsame)
        assert_close_2x(got, ref, same, floor=2e-6)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 40), (2, 32, 4096)], ids=lambda s: "B{}L{}M{}".format(*s))
def test_pooled_counts(shape):
    """The same 32 counting passes on integer keys: equal counts, ties to the lower layer."""
    from test_layerbudget import pooled_counts_ref

    B, L, M = shape
    g = torch.Generator().manual_seed(8)
    s = (torch.randn(B, L, M, generator=g) * 3).round()  # many ties
    s[torch.rand(B, L, M, generator=g) < 0.2] = float("-inf")
    k = torch.randint(0, L * M + 1, (B,), generator=g)
    cpu_res, got = both(ops.pooled_counts, s, k)
    assert torch.equal(got, cpu_res)
    assert torch.equal(cpu_res, pooled_counts_ref(s, k))


@pytest.mark.parametrize("shape", [(1, 1), (37, 64), (4096, 576)], ids=lambda s: "N{}D{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_row_cosine(shape, dtype):
    from test_layerbudget import row_cosine_ref

    x = make(shape, dtype, seed=9)
    y = make(shape, dtype, seed=10)
    cpu_res, got = both(ops.row_cosine, x, y)
    assert_within_bound(got, row_cosine_ref(x, y), row_cosine_ref(x, y, dtype=torch.float32 if dtype ==
                                                                   torch.float32 else dtype), "cos")
    assert (got - cpu_res).abs().max() <= 1e-5
@pytest.mark.parametrize("shape", SCORE_SHAPES, ids=lambda s: "B{}Hq{}Hkv{}Tq{}Tk{}D{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fastgen_recovery(shape, dtype):
    """FastGen's per-rung attention mass: both backends within the bound of
    the float64 loop."""
    B, Hq, Hkv, Tq, Tk, D = shape
    if Tk > 300:
        Tq = 8  # the float64 loop visits every query row
    q = make((B, Hq, Tq, D), dtype, seed=5)
    k = make((B, Hkv, Tk, D), dtype, seed=6)
    rung = torch.randint(0, 6, (B, Hkv, Tk), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)
    kv_start = torch.tensor([min(b * 3, Tk - 1) for b in range(B)], dtype=torch.int64)
    for ks in (None, kv_start):
        out_cpu, got = both(ops.fastgen_recovery, q, k, rung, 5, kv_start=ks)
        ref = recovery_ref(q, k, rung, 5, kv_start=ks)
        same = recovery_ref(q, k, rung, 5, kv_start=ks, dtype=dtype)
        assert_within_bound(got, ref, same)
        assert_within_bound(out_cpu, ref, same)


@pytest.mark.parametrize("bits,sinks", [(2, 0), (2, 2), (4, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_keep_rows_layout(bits, sinks, dtype):
    """A round's keep_rows layout has no CUDA kernel: on a CUDA layer
    ``stores.keep_rows.arrange`` takes its tensor-operation plan, and that
    lays out what the C plan lays out on the same layer copied to the CPU,
    bit for bit (host bookkeeping: both only move and compare rows); the op
    itself refuses CUDA tensors, naming itself."""
    from kvcompress.stores.keep_rows import arrange
    from test_keep_rows import _old_store, _round, _same_store
    from test_packed_sequences import store_on as _store_on

    laid = 0
    for seed in range(2):
        old = _old_store(bits, sinks, False, seed=seed, dtype=dtype, device=DEV)
        kept, _ = _round(old, seed=seed + 3)
        old_cpu, kept_cpu = _store_on(old, "cpu"), _store_on(kept, "cpu")
        for min_live in (1, 8, 16):
            got = arrange(old, kept, min_live)
            want = arrange(old_cpu, kept_cpu, min_live, backend="c")
            assert (got is None) == (want is None)
            if got is not None:
                laid += 1
                _same_store(_store_on(got, "cpu"), want)
    assert laid >= 3
    rows = old._dequantized_rows()
    with pytest.raises(TypeError, match="keep_rows_plan: has no CUDA kernel"):
        ops.keep_rows_plan(old.offsets, old.lengths, old.positions, old.counts_bias, old.counts_plain, *rows,
                           old._kmin, old._ksc, kept.offsets, kept.lengths, kept.positions, kept.counts, kept.k,
                           kept.v, kept.k.float(), group=16, bits=bits, min_live=1, sinks=0, sinks_asked=0,
                           residual=8, slack=4)


@pytest.mark.parametrize("seed", range(12))
def test_packed_stores_through_random_sequences(seed):
    """The random sequences of tests/test_packed_sequences.py (appends, the
    attention after each, settles, beam reorders, rounds with and without
    keep_rows) with the stores' tensors on the GPU: every slot where its
    token went in within the bound, and the CUDA kernels' attention within
    twice torch's own error of float64 over the stores' dequantized slots."""
    from test_packed_sequences import run_per_head, run_uniform

    run_uniform(seed, DEV)
    run_per_head(seed, DEV)
