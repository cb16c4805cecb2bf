"""MagicPIG: SimHash codes against a float64 recomputation (also after
appends), the sampled attention against a float64 reference of the same
sampling rule (uniform and ragged layers, with and without merge counts), the
normaliser estimate unbiased over random hyperplanes, and generate()."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import kvcompress as kvc
from kvcompress import KVCompressTypeError, KVCompressValueError, ops
from kvcompress.cache import KVCache
from kvcompress.methods import MagicPIG, method_from_spec
from kvcompress.stores import LSHStore
from test_quest import _batch, _generate


def codes_ref(x, planes, K, center=None, group=1):
    """float64 codes and the smallest |projection| of each (b, h, j) (ties at 0 are not pinned)."""
    B, H, n, D = x.shape
    xd = x.double()
    if center is not None:
        xd = xd - center.double().repeat_interleave(group, 1)[:, :, None]
    p = planes.double().repeat_interleave(group, 0)  # [H, L*K, D]
    proj = torch.einsum("bhnd,hpd->bhnp", xd, p)
    L = planes.shape[1] // K
    bits = (proj > 0).long().reshape(B, H, n, L, K)
    codes = (bits << torch.arange(K)).sum(-1)
    return codes, proj.abs().reshape(B, H, n, L, K).amin(-1)


def lsh_ref(q, k, v, codes, qcodes, K, hits, sinks, window, center, scaling, kv_start=None, *, counts=None,
            offsets=None, lengths=None, return_reads=False):
    """float64: the included slots and their importance weights (plus log counts), then the weighted softmax.

    Uniform ``k, v [B, H, n, D]``, ``codes [B, H, n, L]``, ``counts [B, H, n]``;
    ragged (``offsets``, ``lengths``): ``[R, D]``, ``[R, L]``, ``[R]``, head
    ``b*H + h`` the rows ``offsets[i] .. + lengths[i]``."""
    B, Hq, _, D = q.shape
    H = len(offsets) // B if offsets is not None else k.shape[1]
    g = Hq // H
    L = codes.shape[-1]
    out = torch.zeros(B, 1, Hq, D, dtype=torch.float64)
    lse = torch.full((B, Hq), -math.inf, dtype=torch.float64)
    reads = torch.zeros(B, Hq, dtype=torch.int64)
    for b in range(B):
        for hq in range(Hq):
            h = hq // g
            if offsets is None:
                s0 = 0 if kv_start is None else int(kv_start[b])
                kh, vh, ch = k[b, h], v[b, h], codes[b, h]
                nh = counts[b, h] if counts is not None else None
            else:
                i, s0 = b * H + h, 0
                rows = slice(int(offsets[i]), int(offsets[i]) + int(lengths[i]))
                kh, vh, ch = k[rows], v[rows], codes[rows]
                nh = counts[rows] if counts is not None else None
            n = kh.shape[0]
            qq = q[b, hq, 0].double()
            cc = center[b, h].double() if center is not None else torch.zeros(D, dtype=torch.float64)
            logw, idx = [], []
            for j in range(s0, n):
                kk = kh[j].double()
                x = scaling * float(qq @ kk)
                if nh is not None:
                    x += math.log(float(nh[j]))
                if not (j < s0 + sinks or j >= n - window):
                    if int((ch[j] == qcodes[b, hq, 0]).sum()) < hits:
                        continue
                    y = kk - cc
                    cos = float(qq @ y) / (float(qq.norm()) * float(y.norm()))
                    u = 1 - math.acos(max(-1.0, min(1.0, cos))) / math.pi
                    p = u ** K
                    below = sum(math.comb(L, i) * p ** i * (1 - p) ** (L - i) for i in range(hits))
                    x -= math.log1p(-below)
                logw.append(x)
                idx.append(j)
            reads[b, hq] = len(idx)
            if not idx:
                continue
            w = torch.tensor(logw, dtype=torch.float64)
            lse[b, hq] = torch.logsumexp(w, 0)
            out[b, 0, hq] = torch.softmax(w, 0) @ vh[idx].double()
    return (out, lse, reads) if return_reads else (out, lse)


def reads_ref(codes, qcodes, hits, sinks, window, kv_start):
    """Slots each query head reads: its static ones plus the keys colliding in ``hits`` tables."""
    B, H, n, _ = codes.shape
    Hq = qcodes.shape[1]
    out = torch.zeros(B, Hq, dtype=torch.int64)
    for b in range(B):
        s0 = int(kv_start[b])
        for hq in range(Hq):
            h = hq // (Hq // H)
            out[b, hq] = sum(1 for j in range(s0, n) if j < s0 + sinks or j >= n - window
                             or int((codes[b, h, j] == qcodes[b, hq, 0]).sum()) >= hits)
    return out


def _case(B=2, H=2, Hq=4, n=300, D=16, K=4, L=20, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, n, D, generator=g).to(dtype)
    v = torch.randn(B, H, n, D, generator=g).to(dtype)
    q = (torch.randn(B, Hq, 1, D, generator=g) * 2).to(dtype)
    planes = torch.randn(H, L * K, D, generator=g)
    center = k.float().mean(2)
    return q, k, v, planes, center


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_simhash_codes_equal_float64_signs(dtype):
    q, k, _, planes, center = _case(dtype=dtype)
    for x, c, group in ((k, center, 1), (q, None, 2)):
        got = ops.simhash(x, planes, 4, center=c, group=group)
        ref, margin = codes_ref(x, planes, 4, c, group)
        clear = margin > 1e-4  # a projection this close to 0 may round either way in fp32
        assert clear.float().mean() > 0.99
        assert torch.equal(got.long()[clear], ref[clear])


def test_tables_follow_appends_and_equal_a_recomputation():
    q, k, v, _, _ = _case(B=1, n=100)
    base = kvc.stores.UniformStore()
    base.append(k, v, 0)
    store = LSHStore.from_uniform(base, 4, 20, 2, 4, 16, seed=3)
    g = torch.Generator().manual_seed(1)
    pos = 100
    for q_len in (1, 1, 5, 1, 40, 1):
        store.append(torch.randn(1, 2, q_len, 16, generator=g), torch.randn(1, 2, q_len, 16, generator=g), pos)
        pos += q_len
    ref, margin = codes_ref(store.keys, store.planes, 4, store.center)
    clear = margin > 1e-4
    assert store.codes.shape == (1, 2, pos, 20) and torch.equal(store.codes.long()[clear], ref[clear])
    # the center is the mean of the prefill keys, not of later ones
    assert torch.allclose(store.center, k.mean(2), atol=1e-6)


@pytest.mark.parametrize("sinks,window", [(0, 0), (4, 16)])
def test_sampled_attention_matches_a_float64_reference(sinks, window):
    q, k, v, planes, center = _case()
    codes = ops.simhash(k, planes, 4, center=center)
    qcodes = ops.simhash(q, planes, 4, group=2)
    kv_start = torch.tensor([0, 31])
    out, lse, reads = ops.lsh_attention(q, k, v, codes, qcodes, 4, hits=2, sinks=sinks, window=window,
                                        center=center, scaling=0.25, kv_start=kv_start, return_lse=True,
                                        return_reads=True)
    ref, ref_lse = lsh_ref(q, k, v, codes, qcodes, 4, 2, sinks, window, center, 0.25, kv_start)
    assert (out.double() - ref).abs().max() < 1e-5
    assert (lse.double() - ref_lse).abs().max() < 1e-4
    assert reads.dtype == torch.int32 and torch.equal(reads.long(), reads_ref(codes, qcodes, 2, sinks, window,
                                                                             kv_start))
    assert int(reads.min()) > sinks + window and int(reads.max()) < 300 - 31  # sampled some, not all
    # the other outputs do not depend on asking for the count
    alone = ops.lsh_attention(q, k, v, codes, qcodes, 4, hits=2, sinks=sinks, window=window, center=center,
                              scaling=0.25, kv_start=kv_start)
    assert torch.equal(alone, out)


def test_everything_read_exactly_is_plain_attention():
    q, k, v, planes, center = _case()
    codes = ops.simhash(k, planes, 4, center=center)
    qcodes = ops.simhash(q, planes, 4, group=2)
    out = ops.lsh_attention(q, k, v, codes, qcodes, 4, sinks=0, window=300, center=center, scaling=0.25)
    assert (out - ops.attention(q, k, v, scaling=0.25)).abs().max() < 1e-5


def test_normaliser_estimate_is_unbiased_over_hyperplanes():
    """E[exp(lse)] = sum_j exp(s q.k_j) over random hyperplanes: the mean of
    300 independent estimates lies within 4 standard errors of 1."""
    q, k, v, _, center = _case(B=1, H=1, Hq=2, n=400, D=16)
    exact = torch.logsumexp(0.25 * (q[0, :, 0].double() @ k[0, 0].double().T), -1)
    est = []
    for seed in range(300):
        planes = torch.randn(1, 4 * 30, 16, generator=torch.Generator().manual_seed(seed))
        codes = ops.simhash(k, planes, 4, center=center)
        qcodes = ops.simhash(q, planes, 4, group=2)
        _, lse = ops.lsh_attention(q, k, v, codes, qcodes, 4, hits=2, sinks=4, window=16, center=center,
                                   scaling=0.25, return_lse=True)
        est.append(torch.exp(lse[0].double() - exact))
    est = torch.stack(est)
    mean, se = est.mean(0), est.std(0) / math.sqrt(len(est))
    assert (se > 0).all() and ((mean - 1).abs() < 4 * se).all(), (mean, se)


def _ragged(lengths, *tensors, gap=3, seed=0, strided=False):
    """Head ``i = b*H + h``'s first ``lengths[i]`` slots of each uniform
    ``[B, H, n, ...]`` tensor as rows of one ``[R, ...]`` buffer: segments in a
    shuffled order with ``gap`` unused rows between them (NaN, or -1 for
    integers: a read of one would show). ``strided``: every buffer a view
    with doubled strides. Returns the buffers, then offsets and lengths."""
    B, H = tensors[0].shape[:2]
    order = np.random.default_rng(seed).permutation(B * H)
    offsets = torch.zeros(B * H, dtype=torch.int64)
    pos = gap
    for i in order:
        offsets[i] = pos
        pos += int(lengths[i]) + gap
    bufs = []
    for t in tensors:
        fill = float("nan") if t.dtype.is_floating_point else -1
        buf = torch.full((pos,) + tuple(t.shape[3:]), fill, dtype=t.dtype)
        for i in range(B * H):
            buf[int(offsets[i]):int(offsets[i]) + int(lengths[i])] = t[i // H, i % H, :int(lengths[i])]
        if strided:
            big = torch.zeros(buf.shape + (2,), dtype=t.dtype)[..., 0]
            big.copy_(buf)
            buf = big
        bufs.append(buf)
    return (*bufs, offsets, torch.as_tensor(lengths, dtype=torch.int64))


@pytest.mark.parametrize("use_counts", [False, True], ids=["plain", "counts"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_ragged_matches_a_float64_reference(dtype, strided, use_counts):
    """Heads of different lengths (one empty, one shorter than sinks + window),
    GQA, segments shuffled with unused rows between them."""
    q, k, v, planes, center = _case(dtype=dtype)
    codes = ops.simhash(k, planes, 4, center=center)
    qcodes = ops.simhash(q, planes, 4, group=2)
    counts = torch.rand(2, 2, 300, generator=torch.Generator().manual_seed(5)) * 4 + 0.5
    lengths = [300, 0, 11, 187]
    kr, vr, cr, nr, offsets, lengths = _ragged(lengths, k, v, codes, counts, strided=strided)
    if strided:
        assert not kr.is_contiguous() and not cr.is_contiguous() and not nr.is_contiguous()
    nr = nr if use_counts else None
    out, lse, reads = ops.lsh_attention(q, kr, vr, cr, qcodes, 4, hits=2, sinks=4, window=16, center=center,
                                        scaling=0.25, return_lse=True, return_reads=True, offsets=offsets,
                                        lengths=lengths, counts=nr)
    ref, ref_lse, ref_reads = lsh_ref(q, kr, vr, cr, qcodes, 4, 2, 4, 16, center, 0.25, counts=nr,
                                      offsets=offsets, lengths=lengths, return_reads=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (out.double() - ref).abs().max() < tol
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert (lse.double()[fin] - ref_lse[fin]).abs().max() < 1e-4
    assert torch.equal(reads.long(), ref_reads)
    # the empty head (b=0, h=1 -> query heads 2, 3): zeros, -inf, nothing read
    assert torch.equal(out[0, 0, 2:].float(), torch.zeros(2, 16)) and (lse[0, 2:] == -math.inf).all()
    assert (reads[0, 2:] == 0).all()
    # the short head reads all of its 11 slots; the long ones sampled some, not all
    assert (reads[1, :2] == 11).all() and 20 < int(reads[0, :2].min()) and int(reads[0, :2].max()) < 300


@pytest.mark.parametrize("use_counts", [False, True], ids=["plain", "counts"])
@pytest.mark.parametrize("kv_start", [None, [0, 31]], ids=["full", "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ragged_heads_of_the_uniform_layer_give_the_uniform_op_bit_for_bit(dtype, kv_start, use_counts):
    """The same slots in either layout, the same arithmetic: out, lse and
    reads identical. A padded row's heads become segments of its real slots."""
    q, k, v, planes, center = _case(dtype=dtype)
    codes = ops.simhash(k, planes, 4, center=center)
    qcodes = ops.simhash(q, planes, 4, group=2)
    counts = (torch.rand(2, 2, 300, generator=torch.Generator().manual_seed(6)) * 3 + 1) if use_counts else None
    s0 = [0, 0] if kv_start is None else kv_start
    kw = {"hits": 2, "sinks": 4, "window": 16, "center": center, "scaling": 0.25, "return_lse": True,
          "return_reads": True}
    want = ops.lsh_attention(q, k, v, codes, qcodes, 4, kv_start=None if kv_start is None else torch.tensor(s0),
                             counts=counts, **kw)
    # drop each row's padding: head (b, h) keeps slots s0[b] .. 299
    shift = lambda t: torch.stack([torch.cat([t[b, :, s0[b]:], t[b, :, :s0[b]]], 1) for b in range(2)])
    lengths = [300 - s0[i // 2] for i in range(4)]
    tensors = [shift(t) for t in (k, v, codes)] + ([shift(counts)] if use_counts else [])
    parts = _ragged(lengths, *tensors, seed=1)
    got = ops.lsh_attention(q, *parts[:3], qcodes, 4, offsets=parts[-2], lengths=parts[-1],
                            counts=parts[3] if use_counts else None, **kw)
    for x, y in zip(got, want):
        assert x.dtype == y.dtype and torch.equal(x, y)


@pytest.mark.parametrize("count_dtype", [torch.float32, torch.int32], ids=["f32", "i32"])
def test_everything_read_exactly_with_counts_is_attention_with_counts(count_dtype):
    q, k, v, planes, center = _case()
    codes = ops.simhash(k, planes, 4, center=center)
    qcodes = ops.simhash(q, planes, 4, group=2)
    g = torch.Generator().manual_seed(7)
    counts = (torch.rand(2, 2, 300, generator=g) * 5 + 0.5) if count_dtype == torch.float32 \
        else torch.randint(1, 9, (2, 2, 300), generator=g, dtype=torch.int32)
    out = ops.lsh_attention(q, k, v, codes, qcodes, 4, sinks=0, window=300, center=center, scaling=0.25,
                            counts=counts)
    want = ops.attention(q, k, v, scaling=0.25, counts=counts)
    assert (out - want).abs().max() < 1e-5 and (out - ops.attention(q, k, v, scaling=0.25)).abs().max() > 1e-3
    kr, vr, cr, nr, offsets, lengths = _ragged([300, 0, 57, 180], k, v, codes, counts)
    out = ops.lsh_attention(q, kr, vr, cr, qcodes, 4, sinks=300, window=0, center=center, scaling=0.25,
                            offsets=offsets, lengths=lengths, counts=nr)
    want = ops.attention(q, kr, vr, scaling=0.25, offsets=offsets, lengths=lengths, counts=nr)
    assert (out - want).abs().max() < 1e-5


def test_normaliser_estimate_with_counts_is_unbiased_over_hyperplanes():
    """E[exp(lse)] = sum_j c_j exp(s q.k_j) per ragged head (two heads of
    different lengths, merge counts): the mean of 300 independent estimates
    lies within 4 standard errors of 1."""
    q, k, v, _, center = _case(B=1, H=2, Hq=4, n=400, D=16)
    counts = torch.rand(1, 2, 400, generator=torch.Generator().manual_seed(8)) * 6 + 1
    lengths = [400, 250]
    exact = torch.stack([torch.logsumexp(0.25 * (q[0, hq, 0].double() @ k[0, hq // 2, :lengths[hq // 2]].double().T)
                                         + counts[0, hq // 2, :lengths[hq // 2]].double().log(), -1)
                         for hq in range(4)])
    est = []
    for seed in range(300):
        planes = torch.randn(2, 4 * 30, 16, generator=torch.Generator().manual_seed(seed))
        codes = ops.simhash(k, planes, 4, center=center)
        qcodes = ops.simhash(q, planes, 4, group=2)
        kr, vr, cr, nr, offsets, lens = _ragged(lengths, k, v, codes, counts)
        _, lse = ops.lsh_attention(q, kr, vr, cr, qcodes, 4, hits=2, sinks=4, window=16, center=center,
                                   scaling=0.25, return_lse=True, offsets=offsets, lengths=lens, counts=nr)
        est.append(torch.exp(lse[0].double() - exact))
    est = torch.stack(est)
    mean, se = est.mean(0), est.std(0) / math.sqrt(len(est))
    assert (se > 0).all() and ((mean - 1).abs() < 4 * se).all(), (mean, se)


def test_bad_layouts_and_counts_are_refused_by_name():
    q, k, v, planes, center = _case()
    codes = ops.simhash(k, planes, 4, center=center)
    qcodes = ops.simhash(q, planes, 4, group=2)
    kr, vr, cr, offsets, lengths = _ragged([300, 0, 57, 180], k, v, codes)
    R = kr.shape[0]
    ragged = {"offsets": offsets, "lengths": lengths}

    def refused(match, *args, exc=KVCompressValueError, **kw):
        with pytest.raises(exc, match=match):
            ops.lsh_attention(*args, **kw)

    uni = (q, k, v, codes, qcodes, 4)
    rag = (q, kr, vr, cr, qcodes, 4)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        c = torch.ones(2, 2, 300)
        c[1, 0, 7] = bad
        refused(r"counts: value at \[1, 0, 7\] is .*expected a finite count > 0", *uni, counts=c)
        c = torch.ones(R)
        c[int(offsets[2]) + 3] = bad
        refused(r"counts: value at row .* \(head 2\) is .*expected a finite count > 0", *rag, counts=c, **ragged)
    c = torch.ones(2, 2, 300)
    c[1, 0, 7] = 0.0
    ops.lsh_attention(*uni, counts=c, kv_start=torch.tensor([0, 8]))  # padding's counts are not read
    c = torch.full((R,), float("nan"))
    for o, n in zip(offsets.tolist(), lengths.tolist()):
        c[o:o + n] = 1.0
    ops.lsh_attention(*rag, counts=c, **ragged)  # nor the unused rows'
    refused(r"counts: expected shape \[B, H, n\]", *uni, counts=torch.ones(2, 2, 299))
    refused(r"counts: expected shape \[R\]", *rag, counts=torch.ones(R - 1), **ragged)
    refused(r"counts: expected a 1-D", *rag, counts=torch.ones(2, 2, 300), **ragged)
    refused(r"counts: .*float64", *uni, counts=torch.ones(2, 2, 300, dtype=torch.float64), exc=TypeError)
    refused(r"lengths: the ragged layout needs both offsets and lengths", *rag, offsets=offsets)
    refused(r"offsets: the ragged layout needs both offsets and lengths", *rag, lengths=lengths)
    refused(r"kv_start: only for the uniform layout", *rag, kv_start=torch.tensor([0, 1]), **ragged)
    refused(r"codes: expected shape \[R, L\]", q, kr, vr, cr[:-1], qcodes, 4, **ragged)
    refused(r"values: expected shape \[R, D\]", q, kr, vr[:-1], cr, qcodes, 4, **ragged)
    refused(r"keys: expected a 2-D tensor \[R, D\]", *uni, **ragged)
    refused(r"offsets: segment .* of head 3 .* outside the .* rows of keys", *rag, offsets=offsets + (
        torch.tensor([0, 0, 0, R])), lengths=lengths)
    over = offsets.clone()
    over[3] = over[0] + 1
    refused(r"offsets: segments of heads .* overlap", *rag, offsets=over, lengths=lengths)
    refused(r"lengths: value -1 of head 1", *rag, offsets=offsets, lengths=torch.tensor([300, -1, 57, 180]))
    refused(r"lengths: expected shape \[B \* H\]", *rag, offsets=offsets, lengths=lengths[:3])
    refused(r"offsets: 3 entries is not B \* H", *rag, offsets=offsets[:3], lengths=lengths[:3])
    refused(r"queries: 4 heads is not a multiple of the 3 kv heads", *rag,
            offsets=torch.tensor([0, 10, 20, 30, 40, 50]), lengths=torch.tensor([5] * 6))
    refused(r"center: expected shape \[B, H, D\]", *rag, center=center[:, :1], **ragged)
    refused(r"one query per row", torch.cat([q, q], 2), kr, vr, cr, torch.cat([qcodes, qcodes], 2), 4, **ragged)


def test_bad_arguments_are_refused_by_name():
    q, k, v, planes, center = _case()
    codes = ops.simhash(k, planes, 4, center=center)
    qcodes = ops.simhash(q, planes, 4, group=2)
    with pytest.raises(KVCompressValueError, match="planes: .* not a multiple of K"):
        ops.simhash(k, planes[:, :7], 4)
    with pytest.raises(KVCompressValueError, match="planes: 2 heads x group 1"):
        ops.simhash(q, planes, 4)
    with pytest.raises(KVCompressValueError, match="one query per row"):
        ops.lsh_attention(torch.cat([q, q], 2), k, v, codes, torch.cat([qcodes, qcodes], 2), 4)
    with pytest.raises(KVCompressValueError, match="K"):
        ops.simhash(k, planes, 31)


def test_options_and_composition():
    assert repr(MagicPIG()) == "MagicPIG(K=8, L=75, hits=2, sinks=4, window=64, dense_layers=2)"
    assert method_from_spec("magicpig:K=6:L=40").lsh.L == 40
    with pytest.raises(ValueError, match="evicts nothing"):
        MagicPIG(budget=64)
    with pytest.raises(ValueError, match="hits"):
        MagicPIG(L=2, hits=3)
    with pytest.raises(ValueError, match="K"):
        MagicPIG(K=40)
    composed = kvc.SnapKV(ratio=0.5) + MagicPIG(L=40)
    assert composed.lsh.L == 40 and composed.paging is None and composed.tidal is None
    assert method_from_spec("snapkv+magicpig:l=40", ratio=0.5).lsh.L == 40
    for evictor in (kvc.EMS(ratio=0.5), kvc.KVMerger(ratio=0.5)):  # per-head layers, merges (test_sparse_ragged)
        assert (evictor + MagicPIG()).lsh == MagicPIG()
    with pytest.raises(TypeError, match="evicting_method \\+ reader"):
        MagicPIG() + kvc.SnapKV(ratio=0.5)


def test_window_covering_the_layer_reproduces_generate_with_left_padding(tiny_model):
    ids, mask = _batch(11)
    assert torch.equal(_generate(tiny_model, ids, mask, MagicPIG(window=300, dense_layers=0)),
                       _generate(tiny_model, ids, mask))


def test_sampling_runs_in_the_sparse_layers(tiny_model):
    ids, mask = _batch(12)
    method = MagicPIG(K=4, L=30, window=16, dense_layers=1)
    cache = KVCache(method, num_layers=4)
    out = _generate(tiny_model, ids, mask, method, cache)
    assert out.shape == (2, 270)
    assert [layer.store.kind for layer in cache.layers] == ["uniform", "lsh", "lsh", "lsh"]
    assert all(layer.store.sampled_steps == 9 and layer.store.n == 269 for layer in cache.layers[1:])
    # the share read: summed over the 9 sampled steps (260..268 slots, 45 of them padding in row 1)
    offered = 4 * sum(2 * n - 45 for n in range(261, 270))  # 4 query heads
    counts = [layer.store.read_counts() for layer in cache.layers]
    assert counts[0] is None and all(o == offered and 16 * 4 * 2 * 9 <= r < o for r, o in counts[1:])
    assert cache.read_fraction() == sum(r for r, _ in counts[1:]) / (3 * offered)
    # the center is the mean of the prefill's real keys (the padded row's padding left out)
    store = cache.layers[1].store
    assert torch.allclose(store.center[0], store.keys[0, :, :260].mean(1), atol=1e-5)
    assert torch.allclose(store.center[1], store.keys[1, :, 45:260].mean(1), atol=1e-5)


def test_command_line_spells_k_and_l_in_lower_case():
    assert method_from_spec("magicpig:k=10:l=150").describe() == method_from_spec("magicpig:K=10:L=150").describe()
    assert (method_from_spec("magicpig:k=10:l=150").K, method_from_spec("magicpig:k=10:l=150").L) == (10, 150)


def test_composed_with_an_evictor_the_tables_index_the_kept_slots(tiny_model):
    """Exact window covering the kept slots: SnapKV's own generation. Then a
    long generation with SnapKV re-selecting every interval inside the LSH
    stores: the codes moved with their slots and equal a recomputation."""
    ids, mask = _batch(11)
    snap = _generate(tiny_model, ids, mask, kvc.SnapKV(ratio=0.5, window=8))
    assert torch.equal(_generate(tiny_model, ids, mask, kvc.SnapKV(ratio=0.5, window=8)
                                 + MagicPIG(window=300, dense_layers=0)), snap)

    g = torch.Generator().manual_seed(13)
    ids = torch.randint(5, 500, (1, 20), generator=g)
    method = kvc.SnapKV(budget=48, window=8) + MagicPIG(K=4, L=30, sinks=4, window=8, dense_layers=0)
    cache = KVCache(method, num_layers=4)
    out = _generate(tiny_model, ids, torch.ones_like(ids), method, cache, new=80)
    assert out.shape == (1, 100)
    for layer in cache.layers:
        store = layer.store
        assert store.kind == "lsh" and store.n <= 48 + 16 and store.sampled_steps > 0
        ref, margin = codes_ref(store.keys, store.planes, 4, center=store.center)
        sure = margin > 1e-4  # sign bits of projections this close to 0 may differ in float32
        assert torch.equal(store.codes.long()[sure], ref[sure]) and sure.float().mean() > 0.99


def test_flags_are_refused_by_name_unless_bool():
    q, k, v, planes, center = _case()
    codes = ops.simhash(k, planes, 4, center=center)
    qcodes = ops.simhash(q, planes, 4, group=2)
    for name in ("return_lse", "return_reads"):
        for bad in (torch.zeros(0), torch.tensor(True), 1, "yes", None):
            with pytest.raises(KVCompressTypeError, match=f"{name}: expected a bool"):
                ops.lsh_attention(q, k, v, codes, qcodes, 4, **{name: bad})
