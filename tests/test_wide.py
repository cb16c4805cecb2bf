"""The attention ops' 16-lane x86-64-v4 units against their 8-lane units.

Where the clones are built and the CPU is x86-64-v4, ``ops.attention`` and
``ops.packed_attention`` run a unit of work built for x86-64-v4 with 16-lane
tile loops instead of the cloned unit with 8-lane halves (csrc/kvc.h,
KVC_WIDE). Every output lane is the same chain of the same operations on both
paths, so the outputs must be equal bit for bit: each case here runs once with
the wide units forbidden (``_C._set_wide(False)``) and once allowed, over the
layouts, dtypes, head dims, GQA ratios, chunk lengths, group sizes and code
widths the kernels branch on. The float64 references of test_attention.py and
test_attention_packed.py check the values themselves (on whichever path the
CPU takes). On a CPU without x86-64-v4, or a build without the wide units,
only the switch itself is checked. The packed attention's AMX path
(test_amx.py) and its few-rows path (test_rows.py) add in other orders: both
are off here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvcompress import _C, ops
from test_attention import assert_switch, queries, randn, switched
from test_attention_packed import pack_ragged, pack_uniform, run, uniform_case

WIDE = _C._wide()
needs_wide = pytest.mark.skipif(not WIDE, reason="this CPU or build runs no wide units (not x86-64-v4)")


@pytest.fixture(autouse=True)
def vector_units_only():
    """The wide and cloned vector units are compared, not the AMX path nor
    the few-rows path."""
    with switched(_C._set_amx, False), switched(_C._set_rows, False):
        yield


def wide(flag: bool):
    return switched(_C._set_wide, flag)


def both(fn, threads=(1, 2)):
    """``fn()`` on the 8-lane and the 16-lane units, at each thread count:
    every result equal to the first, bit for bit."""
    outs = []
    prev = ops.get_num_threads()
    try:
        for t in threads:
            ops.set_num_threads(t)
            for flag in (False, True):
                with wide(flag):
                    outs.append((flag, t, fn()))
    finally:
        ops.set_num_threads(prev)
    first = outs[0][2]
    for flag, t, out in outs[1:]:
        assert torch.equal(out, first), (
            f"wide={flag} threads={t}: max |diff| {(out.float() - first.float()).abs().max().item():.3g}")
    return first


def test_switch():
    """The hook reports and restores its setting; forbidding always wins."""
    assert_switch(_C._set_wide, _C._wide, WIDE)


@needs_wide
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("Hq,Hkv,D", [(1, 1, 16), (4, 1, 64), (9, 3, 64), (6, 2, 80), (2, 1, 80), (2, 2, 96), (8, 8, 128),
                                     (4, 1, 256)])
@pytest.mark.parametrize("nq,n", [(1, 1), (1, 37), (1, 700), (5, 300), (40, 1100)])
def test_attention_uniform(dtype, Hq, Hkv, D, nq, n):
    B = 2
    q = queries(B, Hq, nq, D, dtype, seed=n + nq)
    k = randn((B, Hkv, n, D), dtype, seed=n + 1)
    v = randn((B, Hkv, n, D), dtype, seed=n + 2)
    kw = {}
    if n > nq + 3:
        kw["kv_start"] = torch.tensor([0, 3])
        kw["counts"] = torch.from_numpy(np.random.default_rng(n).integers(1, 6, size=(B, Hkv, n))).float()
    out = both(lambda: ops.attention(q, k, v, **kw))
    assert torch.isfinite(out).all()


@needs_wide
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("nq", [1, 3])
def test_attention_ragged_with_empty_heads(dtype, nq):
    B, Hq, D = 2, 6, 64  # 3 kv heads: len(lengths) = B * 3
    lengths = [0, 500, nq, 0, 31, 260]
    offsets = np.cumsum([0] + [L + 2 for L in lengths[:-1]])
    N = int(offsets[-1] + lengths[-1] + 2)
    k, v = randn((N, D), dtype, seed=3), randn((N, D), dtype, seed=4)
    counts = torch.from_numpy(np.random.default_rng(0).integers(1, 6, size=N)).float()
    q = queries(B, Hq, nq, D, dtype, seed=5)
    off, ln = torch.from_numpy(offsets).long(), torch.tensor(lengths, dtype=torch.int64)
    out = both(lambda: ops.attention(q, k, v, offsets=off, lengths=ln, counts=counts))
    # the empty heads' queries (kv heads 0 and 3: query heads 0-1 of row 0, 0-1 of row 1) get zeros
    assert out[0, :, 0:2].abs().max() == 0 and out[1, :, 0:2].abs().max() == 0


@needs_wide
@pytest.mark.parametrize("bits,value_bits", [(2, 2), (4, 4), (8, 8), (4, 2), (2, 8)])
@pytest.mark.parametrize("G", [8, 16, 32, 48, 64])
@pytest.mark.parametrize("D", [64, 80, 128])
def test_packed_uniform(bits, value_bits, G, D):
    B, Hq, Hkv, nq, n, r = 2, 9, 3, 1, 700, 130
    q, pk, rk, rv = uniform_case(B, Hq, Hkv, nq, n, r, D, G, bits, torch.float32, seed=G + D)
    if value_bits != bits:
        k = randn((B, Hkv, n, D), seed=G + D + 2, scale=1.5) + randn((1, 1, 1, D), seed=G + D + 5)
        v = randn((B, Hkv, n, D), seed=G + D + 3)
        pk = pack_uniform(k, v, bits, G, value_bits=value_bits)
    counts = torch.from_numpy(np.random.default_rng(G).integers(1, 9, size=(B, Hkv, n))).float()
    out = both(lambda: run(q, pk, rk, rv, bits, G, counts=counts, kv_start=torch.tensor([0, 5]),
                           value_bits=value_bits))
    assert torch.isfinite(out).all()


@needs_wide
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("D", [64, 80, 96, 128])
@pytest.mark.parametrize("g", [1, 2, 4])
def test_packed_query_rows(g, D, bits):
    """Each GQA ratio g is its own number of rows sharing a code row (NR):
    the value sums of 1 and 2 rows once fused the output's rescaling
    (acc * alpha) and a slot's product (w * v) the other way round in the
    two units, and only from 5 channel blocks (D = 80) on."""
    B, Hkv, n, m = 1, 2, 600, 500
    k, v = randn((B, Hkv, n, D), seed=D + g), randn((B, Hkv, n, D), seed=D + g + 1)
    q = randn((B, g * Hkv, 1, D), seed=D + g + 2)
    pk, pv = ops.pack_keys(k[:, :, :m], bits, 32), ops.pack_values(v[:, :, :m], bits, 32)
    rk, rv = k[:, :, m:].contiguous(), v[:, :, m:].contiguous()
    out = both(lambda: ops.packed_attention(q, *pk, *pv, rk, rv, bits=bits, group=32, value_bits=bits))
    assert torch.isfinite(out).all()


@needs_wide
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("nq", [1, 4, 20])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packed_ragged_chunks(dtype, nq, bits):
    B, Hq, Hkv, D, G = 2, 6, 2, 64, 32
    lengths = [0, 900, 33, 300]
    pk = pack_ragged(lengths, D, bits, G, seed=nq)
    q = queries(B, Hq, nq, D, dtype, seed=nq + 7)
    rk, rv = randn((B, Hkv, nq + 3, D), dtype, 8), randn((B, Hkv, nq + 3, D), dtype, 9)
    counts = torch.from_numpy(np.random.default_rng(nq).integers(1, 9, size=pk.N)).float()
    counts[pk.vm[:, 0].isnan()] = float("nan")  # unused rows: never read
    out = both(lambda: run(q, pk, rk, rv, bits, G, counts=counts))
    assert torch.isfinite(out).all()
