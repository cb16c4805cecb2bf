"""ops.evict_merge (csrc/merge.c) against an independent float64 reference.

The reference materialises the whole cosine matrix, takes the argmax and
forms the weighted sums in float64. Bounds: fp32 outputs within 1e-5 of the
magnitude of the terms that were summed (the sum's condition, so cancelling
values do not demand more than fp32 can give); fp16/bf16 outputs, rounded once
from fp32, within one ulp of the output dtype plus that fp32 term. Exactness
(plain eviction at tau=inf, thread counts, per-head independence) is checked
bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvcompress import ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
RTOL32 = 1e-5
AMBIG = 1e-5  # cosines this close (to each other or to tau) may go either way in fp32
MANT_EMIN = {torch.float32: (23, -126), torch.float16: (10, -14), torch.bfloat16: (7, -126)}


# ------------------------------------------------------------------ reference


def _f64(x):
    if isinstance(x, np.ndarray):
        return x.astype(np.float64)
    return x.detach().to(torch.float64).cpu().numpy()


def evict_merge_ref(keys, values, scores, centers, tau, kv_start=None, assign=None):
    """float64 evict-then-merge. `assign` ([B, H, T], optional) replaces the
    reference's own classes (after they were checked) so that the sums are
    compared term for term. Returns a dict of float64/int64 arrays, with
    `kmag`/`vmag`: per-element magnitude of the summed terms."""
    K, V, S = _f64(keys), _f64(values), _f64(scores)
    cen = np.asarray(centers if isinstance(centers, np.ndarray) else centers.cpu().numpy())
    tau = _f64(tau) if not isinstance(tau, float) else np.full(K.shape[:2], tau)
    B, H, T, D = K.shape
    C, Dv = cen.shape[2], V.shape[3]
    out = {
        "keys": np.zeros((B, H, C, D)), "values": np.zeros((B, H, C, Dv)), "counts": np.zeros((B, H, C)),
        "scores": np.zeros((B, H, C)), "tau": np.zeros((B, H)), "assign": np.full((B, H, T), -1),
        "kmag": np.zeros((B, H, C, D)), "vmag": np.zeros((B, H, C, Dv)),
        "best": np.full((B, H, T), np.nan), "second": np.full((B, H, T), np.nan), "cos": {},
    }
    for b in range(B):
        s0 = 0 if kv_start is None else int(kv_start[b])
        for h in range(H):
            cs = [int(c) for c in cen[b, h] if c >= 0]
            cand = [j for j in range(s0, T) if j not in set(cs)]
            k, v, s = K[b, h], V[b, h], S[b, h]
            kn = np.linalg.norm(k, axis=1)
            U = np.divide(k, kn[:, None], out=np.zeros_like(k), where=kn[:, None] > 0)
            cls = np.zeros(T, dtype=np.int64)
            if cs and cand:
                cos = U[cand] @ U[cs].T
                best, arg = cos.max(axis=1), cos.argmax(axis=1)
                out["cos"][b, h] = (cand, cos)
                out["best"][b, h, cand] = best
                srt = np.sort(cos, axis=1)
                out["second"][b, h, cand] = srt[:, -2] if len(cs) > 1 else -np.inf
                t = tau[b, h]
                if math.isnan(t):
                    t = best.mean()
                cls[cand] = np.where(best >= t, arg + 1, 0)
            else:
                t = tau[b, h] if not math.isnan(tau[b, h]) else math.nan
            out["tau"][b, h] = t
            if assign is not None:
                cls[s0:] = np.asarray(assign[b, h, s0:])
            for i, c in enumerate(cs):
                cls[c] = i + 1
            cls[:s0] = -1
            out["assign"][b, h] = cls
            for i, c in enumerate(cs):
                mem = [j for j in range(s0, T) if cls[j] == i + 1 and j != c]
                w = np.array([s[c]] + [s[j] for j in mem])
                rows = [c] + mem
                W = w.sum()
                out["counts"][b, h, i] = 1 + len(mem)
                out["scores"][b, h, i] = W
                out["keys"][b, h, i], out["values"][b, h, i] = k[c], v[c]
                if not mem or W == 0:
                    continue
                out["values"][b, h, i] = (w[:, None] * v[rows]).sum(0) / W
                out["vmag"][b, h, i] = (w[:, None] * np.abs(v[rows])).sum(0) / W
                d = (w[:, None] * U[rows]).sum(0)
                n = np.linalg.norm(d)
                if kn[c] > 0 and n > 1e-6 * W:
                    out["keys"][b, h, i] = kn[c] * d / n
                    out["kmag"][b, h, i] = kn[c] * (w[:, None] * np.abs(U[rows])).sum(0) / n
    return out


def _ulp(x, dtype):
    mant, emin = MANT_EMIN[dtype]
    ax = np.abs(x)
    e = np.floor(np.log2(np.where(ax > 0, ax, 1.0)))
    e = np.where(ax > 0, np.maximum(e, emin), emin)
    return np.exp2(e - mant)


def _assert_close(got, ref, mag, dtype, what):
    got = _f64(got)
    assert got.shape == ref.shape, what
    bound = RTOL32 * (mag + np.abs(ref))
    if dtype != torch.float32:
        bound = bound + _ulp(ref, dtype)
    err = np.abs(got - ref)
    bad = ~(err <= bound)
    assert not bad.any(), f"{what}: {bad.sum()} elements off, worst {err[bad].max():.3g} at {np.argwhere(bad)[0]}"


def _check_assign(res, ref):
    """C's classes equal the reference's except where fp32 cannot decide:
    best cosine within AMBIG of tau, or a runner-up within AMBIG."""
    assert res.assign is not None, "call evict_merge with return_assign=True"
    got = np.asarray(res.assign.cpu().numpy() if isinstance(res.assign, torch.Tensor) else res.assign)
    diff = np.argwhere(got != ref["assign"])
    for b, h, j in diff:
        best, second, tau = ref["best"][b, h, j], ref["second"][b, h, j], ref["tau"][b, h]
        near_tau = abs(best - tau) <= AMBIG
        near_tie = best - second <= AMBIG
        assert (near_tau or near_tie) and got[b, h, j] >= 0, (
            f"assign[{b}, {h}, {j}] = {got[b, h, j]}, reference {ref['assign'][b, h, j]} "
            f"(best {best:.6f}, second {second:.6f}, tau {tau:.6f})"
        )
    assert len(diff) <= max(1, got.size // 100)
    return got


def check_against_reference(res, keys, values, scores, centers, tau, kv_start=None, dtype=torch.float32):
    ref0 = evict_merge_ref(keys, values, scores, centers, tau, kv_start)
    np.testing.assert_allclose(_f64(res.tau), ref0["tau"], rtol=1e-6, atol=1e-6, equal_nan=True)
    got_assign = _check_assign(res, ref0)
    ref = evict_merge_ref(keys, values, scores, centers, tau, kv_start, assign=got_assign)
    assert np.array_equal(_f64(res.counts), ref["counts"])
    _assert_close(res.scores, ref["scores"], ref["scores"], torch.float32, "scores")
    _assert_close(res.values, ref["values"], ref["vmag"], dtype, "values")
    _assert_close(res.keys, ref["keys"], ref["kmag"], dtype, "keys")
    return ref


def same_bits(x, y):
    """Bitwise equality (NaN == NaN), torch or NumPy."""
    x = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x.contiguous()
    y = torch.from_numpy(np.ascontiguousarray(y)) if isinstance(y, np.ndarray) else y.contiguous()
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if x.is_floating_point():
        view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[x.element_size()]
        x, y = x.view(view), y.view(view)
    return torch.equal(x, y)


# ------------------------------------------------------------------ inputs


def clustered_keys(shape, dtype=torch.float32, seed=0, n_proto=5):
    """Keys around a few prototype directions, with varied norms, so that
    merges, evictions and the adaptive threshold all occur."""
    g = torch.Generator().manual_seed(seed)
    B, H, T, D = shape
    proto = torch.randn(B, H, n_proto, D, generator=g)
    z = torch.randint(0, n_proto, (B, H, T), generator=g)
    k = torch.gather(proto, 2, z[..., None].expand(B, H, T, D)) + 0.6 * torch.randn(shape, generator=g)
    k = k * (0.5 + torch.rand(B, H, T, 1, generator=g))
    return k.to(dtype)


def make_inputs(B, H, T, D, dtype=torch.float32, seed=0, k=None, kv_start=None, sinks=1, window=2, Dv=None):
    g = torch.Generator().manual_seed(seed + 100)
    keys = clustered_keys((B, H, T, D), dtype, seed)
    values = torch.randn(B, H, T, Dv or D, generator=g).to(dtype)
    scores = torch.rand(B, H, T, generator=g)
    if kv_start is not None:
        for b in range(B):
            scores[b, :, : int(kv_start[b])] = 0.0
    kk = k if k is not None else max(sinks + window, T // 4)
    centers = ops.select_topk(scores, kk, sinks=sinks, window=window, kv_start=kv_start)
    return keys, values, scores, centers


def mixed_tau(B, H):
    cycle = [math.inf, -math.inf, 0.35, math.nan, 0.0, math.nan]
    return torch.tensor([[cycle[(b * H + h) % len(cycle)] for h in range(H)] for b in range(B)], dtype=torch.float32)


# ------------------------------------------------------------------ tests


SHAPES = [  # (B, H, T, D, k)
    (2, 3, 37, 13, 9),
    (2, 2, 150, 64, 40),  # C crosses the 16-center blocks
    (1, 4, 5, 7, 5),  # every slot a center
    (2, 1, 64, 1, 8),  # D = 1: cosines are +-1, ties everywhere
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}T{}D{}k{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matches_reference_mixed_heads(shape, dtype):
    B, H, T, D, k = shape
    keys, values, scores, centers = make_inputs(B, H, T, D, dtype, seed=1, k=k)
    tau = mixed_tau(B, H)
    res = ops.evict_merge(keys, values, scores, centers, tau, return_assign=True)
    assert res.keys.dtype == dtype and res.values.dtype == dtype
    assert tuple(res.keys.shape) == (B, H, centers.shape[2], D)
    assert res.counts.dtype == torch.float32 and res.scores.dtype == torch.float32
    assert res.assign.dtype == torch.int64 and tuple(res.assign.shape) == (B, H, T)
    check_against_reference(res, keys, values, scores, centers, tau, dtype=dtype)
    fixed = ~torch.isnan(tau)
    assert torch.equal(res.tau[fixed], tau[fixed])
    a = res.assign
    inf_heads, minus_inf_heads = tau == math.inf, tau == -math.inf
    assert ((a[inf_heads] == 0) | (a[inf_heads] > 0)).all()
    assert (a[minus_inf_heads] > 0).all()  # no padding here: everything merged
    # each head is independent: per-head calls give the same bits
    for h in range(H):
        one = ops.evict_merge(keys[:, h:h + 1], values[:, h:h + 1], scores[:, h:h + 1], centers[:, h:h + 1],
                              tau[:, h:h + 1])
        for x, y in zip(one[:5], res[:5]):
            assert same_bits(x, y[:, h:h + 1])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_tau_inf_is_plain_eviction(dtype):
    B, H, T, D = 2, 3, 41, 19
    keys, values, scores, centers = make_inputs(B, H, T, D, dtype, seed=2, k=torch.tensor([[7, 9, 4], [9, 5, 9]]))
    res = ops.evict_merge(keys, values, scores, centers, math.inf, return_assign=True, counts_dtype="int32")
    for b in range(B):
        for h in range(H):
            c = centers[b, h]
            c = c[c >= 0]
            n = len(c)
            assert torch.equal(res.keys[b, h, :n], keys[b, h, c])  # bit for bit
            assert torch.equal(res.values[b, h, :n], values[b, h, c])
            assert torch.equal(res.scores[b, h, :n], scores[b, h, c])
            assert (res.counts[b, h, :n] == 1).all() and (res.counts[b, h, n:] == 0).all()
            assert (res.keys[b, h, n:] == 0).all() and (res.values[b, h, n:] == 0).all()
            assert (res.scores[b, h, n:] == 0).all()
            expect = torch.zeros(T, dtype=torch.int64)
            expect[c] = torch.arange(1, n + 1)
            assert torch.equal(res.assign[b, h], expect)
    assert res.counts.dtype == torch.int32
    assert torch.equal(res.tau, torch.full((B, H), math.inf))
    # uniform k: the same as ops.gather, all rows
    _, _, _, c9 = make_inputs(B, H, T, D, dtype, seed=2, k=9)
    res9 = ops.evict_merge(keys, values, scores, c9, math.inf)
    gk, gv = ops.gather(keys, values, c9)
    assert torch.equal(res9.keys, gk) and torch.equal(res9.values, gv)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_left_padding_and_variable_centers(dtype):
    B, H, T, D = 2, 3, 48, 24
    kv_start = torch.tensor([0, 13])
    k = torch.tensor([[10, 6, 3], [8, 10, 3]])
    keys, values, scores, centers = make_inputs(B, H, T, D, dtype, seed=3, k=k, kv_start=kv_start, sinks=1, window=2)
    assert (centers[1][centers[1] >= 0] >= 13).all()
    scores[1, :, :13] = float("nan")  # padded slots are never read
    tau = mixed_tau(B, H)
    res = ops.evict_merge(keys, values, scores, centers, tau, kv_start=kv_start, return_assign=True)
    ref = check_against_reference(res, keys, values, scores, centers, tau, kv_start, dtype)
    assert (res.assign[1, :, :13] == -1).all() and (res.assign[0] >= 0).all()
    assert (res.counts.sum(-1) <= torch.tensor([T, T - 13])[:, None]).all()
    for b in range(B):
        for h in range(H):
            n = int(k[b, h])
            assert (res.counts[b, h, n:] == 0).all() and (res.keys[b, h, n:] == 0).all()
    # -inf heads merged every valid slot
    minus = (tau == -math.inf)
    assert np.array_equal(ref["counts"].sum(-1)[minus.numpy()], (T - kv_start[:, None].expand(B, H))[minus].numpy())


def test_long_rows_cross_chunks():
    """Token chunks of the similarity phase (256) with padding ending on a chunk boundary."""
    B, H, T, D = 2, 2, 560, 32
    kv_start = torch.tensor([0, 256])
    keys, values, scores, centers = make_inputs(B, H, T, D, seed=11, k=70, kv_start=kv_start)
    tau = torch.tensor([[math.nan, 0.3], [math.nan, -math.inf]])
    res = ops.evict_merge(keys, values, scores, centers, tau, kv_start=kv_start, return_assign=True)
    check_against_reference(res, keys, values, scores, centers, tau, kv_start)


def test_head_without_centers_and_adaptive_edge_cases():
    B, H, T, D = 1, 3, 12, 8
    keys, values, scores, _ = make_inputs(B, H, T, D, seed=4)
    centers = torch.full((B, H, 4), -1, dtype=torch.int64)
    centers[0, 1, :2] = torch.tensor([3, 7])
    centers[0, 2] = torch.tensor([0, 1, 2, 3])
    res = ops.evict_merge(keys, values, scores, centers, None, return_assign=True)
    assert torch.isnan(res.tau[0, 0])  # no center: nothing to compare with
    assert (res.assign[0, 0] == 0).all() and (res.counts[0, 0] == 0).all() and (res.keys[0, 0] == 0).all()
    assert torch.isfinite(res.tau[0, 1:]).all()
    check_against_reference(res, keys, values, scores, centers, math.nan)
    # no candidate at all: adaptive tau is NaN, centers copied
    res = ops.evict_merge(keys[..., :4, :], values[..., :4, :], scores[..., :4], centers[:, 2:3].expand(1, 3, 4).contiguous())
    assert torch.isnan(res.tau).all()
    assert torch.equal(res.keys, keys[..., :4, :]) and (res.counts == 1).all()


def test_degenerate_weights_and_directions():
    D = 4
    e = torch.eye(D)
    # one center; slot 1 has the opposite key, slot 2 a zero key (cosine 0)
    keys = torch.stack([2 * e[0], -e[0], torch.zeros(D)])[None, None]
    values = torch.arange(3 * D, dtype=torch.float32).reshape(1, 1, 3, D)
    scores = torch.tensor([[[1.0, 1.0, 2.0]]])
    res = ops.evict_merge(keys, values, scores, torch.tensor([[[0]]]), -math.inf, return_assign=True)
    assert res.assign.tolist() == [[[1, 1, 1]]] and res.counts.item() == 3 and res.scores.item() == 4
    assert torch.equal(res.keys[0, 0, 0], keys[0, 0, 0])  # directions cancel: key kept
    assert torch.allclose(res.values[0, 0, 0], (values[0, 0, 0] + values[0, 0, 1] + 2 * values[0, 0, 2]) / 4)

    # center 2 and its member weigh 0: rows unchanged; a zero key ties -> lowest center
    keys = torch.stack([e[0], e[0] + e[1], e[2], e[2] - 0.1 * e[0], torch.zeros(D)])[None, None]
    values = torch.randn(1, 1, 5, D, generator=torch.Generator().manual_seed(0))
    scores = torch.tensor([[[1.0, 1.0, 0.0, 0.0, 1.0]]])
    centers = torch.tensor([[[0, 2]]])
    res = ops.evict_merge(keys, values, scores, centers, -math.inf, return_assign=True)
    assert res.assign.tolist() == [[[1, 1, 2, 2, 1]]]
    assert torch.equal(res.counts, torch.tensor([[[3.0, 2.0]]])) and torch.equal(res.scores, torch.tensor([[[3.0, 0.0]]]))
    assert torch.equal(res.keys[0, 0, 1], keys[0, 0, 2]) and torch.equal(res.values[0, 0, 1], values[0, 0, 2])
    check_against_reference(res, keys, values, scores, centers, -math.inf)

    # a zero center key stays zero; its values still merge
    keys[0, 0, 2] = 0
    res = ops.evict_merge(keys, values, scores + 1, centers, -math.inf, return_assign=True)
    assert torch.equal(res.keys[0, 0, 1], torch.zeros(D)) and not torch.equal(res.values[0, 0, 1], values[0, 0, 2])
    check_against_reference(res, keys, values, scores + 1, centers, -math.inf)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_non_contiguous_inputs(layout):
    B, H, T, D = 2, 3, 33, 17
    keys, values, scores, centers = make_inputs(B, H, T, D, seed=5, k=7)
    if layout == "transposed":
        k2 = keys.transpose(1, 2).contiguous().transpose(1, 2)
        v2 = values.transpose(1, 2).contiguous().transpose(1, 2)
        s2 = scores.transpose(1, 2).contiguous().transpose(1, 2)
        c2 = centers.transpose(0, 1).contiguous().transpose(0, 1)
        t2 = mixed_tau(B, H).t().contiguous().t()
    else:
        k2 = torch.zeros(B, H, 2 * T, 3 * D)[:, :, ::2, ::3]
        k2.copy_(keys)
        v2 = torch.zeros(B, 2 * H, T, 2 * D)[:, ::2, :, ::2]
        v2.copy_(values)
        s2 = torch.zeros(B, H, 2 * T)[..., ::2]
        s2.copy_(scores)
        c2 = torch.zeros(B, H, 14, dtype=torch.int64)[..., ::2]
        c2.copy_(centers)
        t2 = torch.zeros(B, 2 * H)[:, ::2]
        t2.copy_(mixed_tau(B, H))
    assert not (k2.is_contiguous() or v2.is_contiguous() or s2.is_contiguous() or c2.is_contiguous())
    want = ops.evict_merge(keys, values, scores, centers, mixed_tau(B, H), return_assign=True)
    got = ops.evict_merge(k2, v2, s2, c2, t2, return_assign=True)
    for x, y in zip(got, want):
        assert same_bits(x, y)
    check_against_reference(got, keys, values, scores, centers, mixed_tau(B, H))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_numpy_inputs(dtype):
    B, H, T, D = 2, 2, 29, 11
    keys, values, scores, centers = make_inputs(B, H, T, D, seed=6, k=6, Dv=5, kv_start=[0, 2])
    kn, vn = keys.numpy().astype(dtype), values.numpy().astype(dtype)
    tau = mixed_tau(B, H).numpy()
    res = ops.evict_merge(kn, vn, scores.numpy(), centers.numpy(), tau, kv_start=np.array([0, 2]),
                          return_assign=True)
    for x in res:
        assert isinstance(x, np.ndarray)
    assert res.keys.dtype == dtype and res.values.shape == (B, H, 6, 5)
    tdt = torch.float32 if dtype == np.float32 else torch.float16
    check_against_reference(res, kn, vn, scores.numpy(), centers.numpy(), tau, np.array([0, 2]), tdt)
    # same bits as the torch path
    tres = ops.evict_merge(torch.from_numpy(kn), torch.from_numpy(vn), scores, centers, torch.from_numpy(tau),
                           kv_start=torch.tensor([0, 2]), return_assign=True)
    for x, y in zip(res, tres):
        assert same_bits(x, y)
    # scalar tau, python-list centers
    a = ops.evict_merge(kn, vn, scores.numpy(), centers.numpy().tolist(), 0.25)
    b = ops.evict_merge(kn, vn, scores.numpy(), centers.numpy(), np.full((B, H), 0.25, np.float32))
    for x, y in zip(a[:5], b[:5]):
        assert same_bits(x, y)
    assert a.assign is None


def test_requires_grad_and_int32_centers():
    keys, values, scores, centers = make_inputs(1, 2, 20, 8, seed=7, k=5)
    a = ops.evict_merge(keys.requires_grad_(), values, scores, centers.to(torch.int32), 0.1)
    b = ops.evict_merge(keys.detach(), values, scores, centers, 0.1)
    for x, y in zip(a[:5], b[:5]):
        assert same_bits(x, y)


@pytest.fixture
def restore_threads():
    n = ops.get_num_threads()
    yield
    ops.set_num_threads(n)


def test_bit_identical_for_any_thread_count(restore_threads):
    if not ops._C.has_openmp:
        pytest.skip("built without OpenMP: a single thread is all there is")
    B, H, T, D = 2, 5, 300, 64
    keys, values, scores, centers = make_inputs(B, H, T, D, torch.bfloat16, seed=8, k=40, kv_start=[0, 7])
    tau = mixed_tau(B, H)
    runs = []
    for n in (1, 2, 3):
        ops.set_num_threads(n)
        runs.append(ops.evict_merge(keys, values, scores, centers, tau, kv_start=torch.tensor([0, 7]),
                                    return_assign=True))
    for other in runs[1:]:
        for x, y in zip(runs[0], other):
            assert same_bits(x, y)


def test_zero_sizes():
    keys, values, scores, _ = make_inputs(2, 3, 10, 4, seed=9)
    c0 = torch.zeros(2, 3, 0, dtype=torch.int64)
    res = ops.evict_merge(keys, values, scores, c0, None, return_assign=True)
    assert res.keys.shape == (2, 3, 0, 4) and (res.assign == 0).all() and torch.isnan(res.tau).all()
    res = ops.evict_merge(keys[:, :0], values[:, :0], scores[:, :0], c0[:, :0], 0.5)
    assert res.keys.shape == (2, 0, 0, 4)
    res = ops.evict_merge(keys[..., :0], values[..., :0], scores, torch.tensor([[[0, 5, -1]] * 3] * 2), -math.inf)
    assert res.keys.shape == (2, 3, 3, 0) and torch.equal(res.counts[..., 2], torch.zeros(2, 3))


# ------------------------------------------------------------------ bad inputs


def _base():
    keys, values, scores, centers = make_inputs(2, 2, 16, 8, seed=10, k=4, kv_start=torch.tensor([0, 3]))
    return dict(keys=keys, values=values, scores=scores, centers=centers, tau=0.2, kv_start=torch.tensor([0, 3]))


def _call(**kw):
    a = _base()
    a.update(kw)
    return ops.evict_merge(a["keys"], a["values"], a["scores"], a["centers"], a["tau"], kv_start=a["kv_start"])


def _centers_with(b, h, row):
    c = _base()["centers"].clone()
    c[b, h] = torch.tensor(row)
    return c


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(centers=_centers_with(0, 1, [0, 5, 16, -1])), ValueError, r"centers: value 16 at \[0, 1, 2\] is outside"),
        (dict(centers=_centers_with(0, 0, [0, 5, -2, -1])), ValueError, r"centers: value -2 .* outside"),
        (dict(centers=_centers_with(0, 0, [0, 7, 5, 9])), ValueError, r"centers: value 5 at \[0, 0, 2\] is not above"),
        (dict(centers=_centers_with(1, 1, [4, 4, 8, 9])), ValueError, r"centers: value 4 at \[1, 1, 1\] is not above"),
        (dict(centers=_centers_with(1, 0, [2, 4, 8, 9])), ValueError, r"centers: value 2 .* padded slot \(kv_start\[1\] = 3\)"),
        (dict(centers=_centers_with(0, 0, [1, -1, 8, -1])), ValueError, r"centers: value 8 .* follows -1"),
        (dict(centers=torch.zeros(2, 2, 4)), TypeError, "centers: expected dtype int64"),
        (dict(centers=torch.zeros(2, 3, 4, dtype=torch.int64)), ValueError, r"centers: expected shape \[B, H, C\]"),
        (dict(centers=torch.zeros(2, 4, dtype=torch.int64)), ValueError, "centers: expected a 3-D"),
        (dict(values=torch.zeros(2, 2, 15, 8)), ValueError, r"values: expected shape \[B, H, T, Dv\]"),
        (dict(values=torch.zeros(2, 2, 16, 8, dtype=torch.float16)), TypeError, "values: dtype float16 does not match"),
        (dict(keys=torch.zeros(2, 2, 16, 8, dtype=torch.int32)), TypeError, "keys: expected dtype"),
        (dict(keys=torch.zeros(2, 2, 16)), ValueError, "keys: expected a 4-D"),
        (dict(scores=torch.zeros(2, 2, 16, dtype=torch.float64)), TypeError, "scores: expected dtype float32"),
        (dict(scores=torch.zeros(2, 2, 17)), ValueError, r"scores: expected shape \[B, H, T\]"),
        (dict(tau=torch.zeros(2, 3)), ValueError, r"tau: expected shape \[B, H\]"),
        (dict(tau=torch.zeros(2, 2, dtype=torch.float64)), TypeError, "tau: expected dtype float32"),
        (dict(tau="adaptive"), TypeError, "tau: expected None, a float"),
        (dict(tau=True), TypeError, "tau: expected None, a float"),
        (dict(kv_start=torch.tensor([0, 17])), ValueError, "kv_start: value 17"),
        (dict(kv_start=torch.tensor([0])), ValueError, "kv_start: expected shape"),
    ],
)
def test_bad_inputs(kw, exc, match):
    with pytest.raises(exc, match=match):
        _call(**kw)


@pytest.mark.parametrize("bad", [float("nan"), -0.5, float("inf")])
def test_bad_scores(bad):
    s = _base()["scores"].clone()
    s[1, 0, 9] = bad
    with pytest.raises(ValueError, match=r"scores: value .* at \[1, 0, 9\] is not a finite weight >= 0"):
        _call(scores=s)
    s = _base()["scores"].clone()
    s[1, 0, 1] = bad  # a padded slot (kv_start[1] = 3): ignored
    _call(scores=s)


def test_bad_options():
    a = _base()
    with pytest.raises(ValueError, match="counts_dtype"):
        ops.evict_merge(a["keys"], a["values"], a["scores"], a["centers"], counts_dtype="int64")
    with pytest.raises(TypeError, match="keys: expected a tensor"):
        ops.evict_merge([[1.0]], a["values"], a["scores"], a["centers"])
    with pytest.raises(TypeError, match=r"evict_merge\(\) takes 12"):
        ops._C.evict_merge(a["keys"])
