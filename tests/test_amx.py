"""The packed attention's AMX path (csrc/attention_amx.c) against float64.

On a CPU with AMX (Intel Xeon from Sapphire Rapids on, with Linux granting
the tile state) and a build with the wide units, ``ops.packed_attention``
with 2-, 4- or 8-bit keys and values (each), a head dim and a group size that
are multiples of 32 runs the whole-tile stretch of each head's packed slots on AMX int8
tile products: each fp32 multiplier as four int8 digits of a 31-bit fixed
point, exact int32 sums, combined in fp32 in another order than the vector
units. Each case checks the AMX result against the float64
reference of test_attention_packed.py within twice torch's own error in the
query dtype, that the path ran (in fp32 its bits differ from the vector
units'), and the invariants the op promises on any path: the same bits for
any thread count, for strided inputs and for either layout. Without AMX only
the switch is checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvcompress import _C, ops
from test_attention import DTYPE_IDS, DTYPES, assert_switch, queries, randn, switched
from test_attention_packed import (WIDTH_PAIRS, Packed, assert_engine_ragged_equals_uniform,
                                   assert_engine_threads_bit_identical, assert_fp32_no_floor, check, pack_ragged, pack_uniform, run, run_w, spaced,
                                   uniform_case, widths_case)

AMX = _C._amx()
needs_amx = pytest.mark.skipif(not AMX, reason="no AMX path here (CPU, kernel permission or build)")


@pytest.fixture(autouse=True)
def _restore_threads():
    n = ops.get_num_threads()
    yield
    ops.set_num_threads(n)


def amx(flag: bool):
    return switched(_C._set_amx, flag)


def both(fn):
    """fn() with the AMX path allowed, then forbidden."""
    with amx(True):
        a = fn()
    with amx(False):
        v = fn()
    return a, v


def test_switch():
    """The hook reports and restores its setting; forbidding always wins."""
    assert_switch(_C._set_amx, _C._amx, AMX)


CASES = [  # (B, Hq, Hkv, q, n, r, D, G)
    (1, 9, 3, 1, 3000, 128, 64, 32),  # SmolLM2's decode shape
    (1, 32, 8, 1, 2100, 128, 128, 32),  # a Llama-like one, GQA 4
    (2, 7, 1, 1, 1000, 5, 64, 64),  # GQA 7: rows in two passes (4 + 3)
    (1, 9, 3, 3, 900, 16, 64, 32),  # a 3-query chunk at GQA 3: 9 rows, three passes (4 + 4 + 1)
    (1, 4, 4, 3, 777, 9, 32, 32),  # a chunk, D = 32, n % 32 != 0
    (1, 6, 2, 1, 1500, 3, 256, 128),  # D = 256, G = 128
    (2, 8, 2, 2, 600, 40, 96, 32),  # D = 96: a lone last block, batch 2
]




@needs_amx
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "B{}Hq{}Hkv{}q{}n{}r{}D{}G{}".format(*s))
@pytest.mark.parametrize("bits,value_bits", WIDTH_PAIRS, ids=lambda w: f"{w}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matches_reference(shape, bits, value_bits, dtype):
    q, pk, rk, rv = widths_case(*shape, bits, value_bits, dtype)
    G = shape[-1]
    got, vec = both(lambda: run_w(q, pk, rk, rv, bits, value_bits, G))
    check(got, q, pk, rk, rv, f"{shape} {bits}/{value_bits} {dtype}")
    if dtype == torch.float32:
        assert not torch.equal(got, vec), "the AMX path did not run"


@needs_amx
@pytest.mark.parametrize("bits,G", [(4, 32), (4, 128), (2, 32), (8, 32)])
def test_long_decode_fp32_without_floor(bits, G):
    """6,000 slots of zero-centred values: within 2x torch's fp32 error, no floor."""
    q, pk, rk, rv = uniform_case(1, 8, 2, 1, 6000, 3, 128, G, bits, torch.float32)
    with amx(True):
        got = run(q, pk, rk, rv, bits, G)
    assert_fp32_no_floor(got, q, pk, rk, rv, "AMX")


@needs_amx
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kv_start_counts_and_scale(dtype):
    """Left padding that starts mid-tile (the stretch begins at the next
    multiple of 32, the tiles before it run on the vector units), merged-slot
    counts, and logits in the hundreds (the softmax rescales per chunk)."""
    B, Hq, Hkv, nq, n, r, D, G = 3, 8, 2, 1, 1200, 6, 64, 32
    q, pk, rk, rv = uniform_case(B, Hq, Hkv, nq, n, r, D, G, 4, dtype)
    kv_start = torch.tensor([0, 45, 1190])
    counts = torch.rand(B, Hkv, n, generator=torch.Generator().manual_seed(3)) * 5 + 0.05
    for scaling in (None, 30.0):
        kw = dict(kv_start=kv_start, counts=counts) | ({} if scaling is None else {"scaling": scaling})
        with amx(True):
            got = run(q, pk, rk, rv, 4, G, **kw)
        check(got, q, pk, rk, rv, f"{dtype} scaling={scaling}", **kw)
        # padded slots are never read
        pk2 = Packed(**pk.__dict__)
        pk2.vm, pk2.vs, c2 = pk.vm.clone(), pk.vs.clone(), counts.clone()
        pk2.vm[1, :, :45] = pk2.vs[1, :, :45] = c2[1, :, :45] = float("nan")
        with amx(True):
            assert torch.equal(run(q, pk2, rk, rv, 4, G, kv_start=kv_start, counts=c2,
                                   **({} if scaling is None else {"scaling": scaling})), got)


@needs_amx
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ragged_with_empty_heads(bits, dtype):
    B, Hq, Hkv, nq, D, G = 2, 6, 2, 1, 64, 32
    pk = pack_ragged([3000, 0, 777, 64], D, bits, G, seed=5)
    q = queries(B, Hq, nq, D, dtype, seed=3)
    rk, rv = randn((B, Hkv, 4, D), dtype, 8), randn((B, Hkv, 4, D), dtype, 9)
    counts = torch.from_numpy(np.random.default_rng(1).integers(1, 9, size=pk.N)).float()
    counts[pk.vm[:, 0].isnan()] = float("nan")  # unused rows: never read
    with amx(True):
        got = run(q, pk, rk, rv, bits, G, counts=counts)
    check(got, q, pk, rk, rv, f"{bits} bits {dtype}", counts=counts)


@needs_amx
def test_ragged_equals_uniform():
    assert_engine_ragged_equals_uniform(amx(True), B=2, Hq=8, Hkv=2, D=128)


@needs_amx
def test_threads_bit_identical():
    assert_engine_threads_bit_identical(amx(True), Hq=6, Hkv=2, D=64)


@needs_amx
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_strides_do_not_change_bits(bits):
    """Strided codes, scales and mins (as a store writing into slices makes)
    give the bits of contiguous copies on the AMX path too."""
    q, pk, rk, rv = uniform_case(2, 8, 2, 1, 700, 3, 64, 32, bits, torch.float32)
    with amx(True):
        want = run(q, pk, rk, rv, bits, 32)
        strided = Packed(kc=spaced(pk.kc, 3), km=pk.km.transpose(2, 3).contiguous().transpose(2, 3),
                         ks=spaced(pk.ks, 2), vc=spaced(pk.vc, 3), vm=spaced(pk.vm, 3),
                         vs=pk.vs.transpose(2, 3).contiguous().transpose(2, 3))
        assert not any(x.is_contiguous() for x in strided.args())
        got = ops.packed_attention(q, *strided.args(), rk, rv, bits=bits, group=32)
    assert torch.equal(got, want)


@needs_amx
@pytest.mark.parametrize("bits,value_bits,D,G", [(8, 8, 48, 16), (4, 8, 64, 16), (4, 4, 48, 16), (2, 4, 64, 16)])
def test_other_shapes_take_the_vector_units(bits, value_bits, D, G):
    """Shapes the AMX path does not cover (D or G not a multiple of 32) give
    the vector units' bits exactly."""
    q, _, rk, rv = uniform_case(1, 6, 2, 1, 500, 3, D, G, bits, torch.float32)
    pk = pack_uniform(randn((1, 2, 500, D), seed=2, scale=1.5), randn((1, 2, 500, D), seed=3), bits, G,
                      value_bits=value_bits)
    a, v = both(lambda: ops.packed_attention(q, *pk.args(), rk, rv, bits=bits, value_bits=value_bits, group=G))
    assert torch.equal(a, v)
