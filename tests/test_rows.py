"""The packed attention's few-rows path (csrc/attention_rows.c) against float64.

On an x86-64-v4 CPU with the wide units built, ``ops.packed_attention`` runs
the whole-tile stretch of a kv head's packed slots in loops of its own when
the unit of work has at most 256 / D query rows (GQA ratio times queries:
4 at D = 64, 2 at D = 128, 1 at D = 256), D is 64, 128 or 256, a code row is
whole 16-byte pieces at both code widths and G is a multiple of 16. The query and the output row are permuted
to the order the codes lie in their bytes, so the products are added in
another order than the tile loops'. Each case checks the result against the
float64 reference of test_attention_packed.py within twice torch's own
error in the query dtype, that the path ran (in fp32 its bits differ from
the vector units'), and the invariants the op promises on any path: the
same bits for any thread count, for strided inputs and for either layout.
Without the path (no x86-64-v4, or a build without the wide units) only the
switch is checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvcompress import _C, ops
from test_attention import DTYPE_IDS, DTYPES, assert_switch, queries, randn, switched
from test_attention_packed import (WIDTH_PAIRS, Packed, assert_engine_ragged_equals_uniform,
                                   assert_engine_threads_bit_identical, assert_fp32_no_floor, check, pack_ragged, pack_uniform, run, run_w, spaced,
                                   uniform_case, widths_case)

ROWS = _C._rows()
needs_rows = pytest.mark.skipif(not ROWS, reason="no few-rows path here (not x86-64-v4, or no wide units)")


@pytest.fixture(autouse=True)
def _restore_threads():
    n = ops.get_num_threads()
    yield
    ops.set_num_threads(n)


@pytest.fixture(autouse=True)
def _no_amx():
    """On an AMX CPU the AMX path takes these stretches first."""
    with switched(_C._set_amx, False):
        yield


def rows(flag: bool):
    return switched(_C._set_rows, flag)


def both(fn):
    """fn() with the few-rows path allowed, then forbidden."""
    with rows(True):
        a = fn()
    with rows(False):
        v = fn()
    return a, v


def test_switch():
    """The hook reports and restores its setting; forbidding always wins."""
    assert_switch(_C._set_rows, _C._rows, ROWS)


CASES = [  # (B, Hq, Hkv, q, n, r, D, G)
    (1, 6, 6, 1, 2100, 128, 128, 32),  # Llama-2-7B's head dim, one row
    (2, 3, 3, 1, 1000, 5, 64, 32),  # D = 64, batch 2
    (1, 2, 2, 1, 1500, 3, 256, 128),  # D = 256 (Gemma 3), G = 128
    (1, 3, 3, 1, 777, 9, 128, 64),  # n % 32 != 0: tiles after the stretch
    (1, 2, 2, 1, 900, 16, 128, 48),  # G = 48: pieces across value groups, key groups of 48
    (1, 9, 3, 1, 2100, 128, 64, 32),  # SmolLM2's decode shape: 3 rows
    (1, 8, 2, 1, 1000, 5, 64, 32),  # GQA 4 at D = 64: 4 rows, the most
    (2, 4, 2, 1, 900, 7, 128, 32),  # GQA 2 at D = 128: 2 rows, one pass over the values
    (1, 8, 2, 1, 1000, 5, 128, 32),  # GQA 4 at D = 128 (Llama-3-8B's): 4 rows, two passes
    (1, 3, 1, 1, 900, 7, 128, 48),  # 3 rows at D = 128, G = 48: two passes, pieces across groups
    (2, 2, 1, 1, 700, 5, 256, 32),  # 2 rows at D = 256, batch 2: two passes of 8 vectors
    (1, 3, 1, 1, 800, 4, 256, 64),  # 3 rows at D = 256: four passes of 4 vectors
    (1, 4, 1, 1, 1500, 3, 256, 128),  # Gemma 3 270M's decode shape: 4 rows at D = 256
    (1, 3, 3, 3, 700, 9, 64, 32),  # a 3-query chunk: 3 rows
]
@needs_rows
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "B{}Hq{}Hkv{}q{}n{}r{}D{}G{}".format(*s))
@pytest.mark.parametrize("bits,value_bits", WIDTH_PAIRS, ids=lambda w: f"{w}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matches_reference(shape, bits, value_bits, dtype):
    q, pk, rk, rv = widths_case(*shape, bits, value_bits, dtype)
    G = shape[-1]
    got, vec = both(lambda: run_w(q, pk, rk, rv, bits, value_bits, G))
    check(got, q, pk, rk, rv, f"{shape} {bits}/{value_bits} {dtype}")
    if dtype == torch.float32:
        assert not torch.equal(got, vec), "the few-rows path did not run"


@needs_rows
@pytest.mark.parametrize("Hq", [2, 8], ids=["1row", "4rows"])
@pytest.mark.parametrize("bits,G", [(4, 32), (4, 128), (2, 32), (8, 32)])
def test_long_decode_fp32_without_floor(bits, G, Hq):
    """6,000 slots of zero-centred values: within 2x torch's fp32 error, no
    floor, with one row per kv head and with four (two passes over the values)."""
    q, pk, rk, rv = uniform_case(1, Hq, 2, 1, 6000, 3, 128, G, bits, torch.float32)
    with rows(True):
        got = run(q, pk, rk, rv, bits, G)
    assert_fp32_no_floor(got, q, pk, rk, rv, "few-rows")


@needs_rows
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kv_start_counts_and_scale(dtype):
    """Left padding that starts mid-tile (the stretch begins at the next
    multiple of 32, the tiles before it run on the vector units), merged-slot
    counts, and logits in the hundreds (the softmax rescales per chunk)."""
    B, H, nq, n, r, D, G = 3, 2, 1, 1200, 6, 128, 32
    q, pk, rk, rv = uniform_case(B, H, H, nq, n, r, D, G, 4, dtype)
    kv_start = torch.tensor([0, 45, 1190])
    counts = torch.rand(B, H, n, generator=torch.Generator().manual_seed(3)) * 5 + 0.05
    for scaling in (None, 30.0):
        kw = dict(kv_start=kv_start, counts=counts) | ({} if scaling is None else {"scaling": scaling})
        with rows(True):
            got = run(q, pk, rk, rv, 4, G, **kw)
        check(got, q, pk, rk, rv, f"{dtype} scaling={scaling}", **kw)
        # padded slots are never read
        pk2 = Packed(**pk.__dict__)
        pk2.vm, pk2.vs, c2 = pk.vm.clone(), pk.vs.clone(), counts.clone()
        pk2.vm[1, :, :45] = pk2.vs[1, :, :45] = c2[1, :, :45] = float("nan")
        with rows(True):
            assert torch.equal(run(q, pk2, rk, rv, 4, G, **(kw | {"counts": c2})), got)


@needs_rows
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ragged_with_empty_heads(bits, dtype):
    B, H, nq, D, G = 2, 2, 1, 128, 32
    pk = pack_ragged([3000, 0, 777, 64], D, bits, G, seed=5)
    q = queries(B, H, nq, D, dtype, seed=3)
    rk, rv = randn((B, H, 4, D), dtype, 8), randn((B, H, 4, D), dtype, 9)
    counts = torch.from_numpy(np.random.default_rng(1).integers(1, 9, size=pk.N)).float()
    counts[pk.vm[:, 0].isnan()] = float("nan")  # unused rows: never read
    with rows(True):
        got = run(q, pk, rk, rv, bits, G, counts=counts)
    check(got, q, pk, rk, rv, f"{bits} bits {dtype}", counts=counts)


@needs_rows
def test_ragged_equals_uniform():
    assert_engine_ragged_equals_uniform(rows(True), B=2, Hq=3, Hkv=3, D=128)


@needs_rows
def test_threads_bit_identical():
    assert_engine_threads_bit_identical(rows(True), Hq=3, Hkv=3, D=128)


@needs_rows
@pytest.mark.parametrize("bits,value_bits", [(4, 4), (2, 8), (8, 2)])
def test_strides_do_not_change_bits(bits, value_bits):
    """Strided codes, scales and mins (as a store writing into slices makes:
    code bytes, key scales along the channels and value scales along the
    groups not contiguous) give the bits of contiguous copies, and the path
    ran on both."""
    q, _, rk, rv = uniform_case(2, 3, 3, 1, 700, 3, 128, 32, bits, torch.float32)
    pk = pack_uniform(randn((2, 3, 700, 128), seed=2, scale=1.5), randn((2, 3, 700, 128), seed=3), bits, 32,
                      value_bits=value_bits)
    strided = Packed(kc=spaced(pk.kc, 3), km=pk.km.transpose(2, 3).contiguous().transpose(2, 3),
                     ks=spaced(pk.ks, 3), vc=spaced(pk.vc, 3), vm=spaced(pk.vm, 3),
                     vs=pk.vs.transpose(2, 3).contiguous().transpose(2, 3))
    assert not any(x.is_contiguous() for x in strided.args())
    want, vec = both(lambda: run_w(q, pk, rk, rv, bits, value_bits, 32))
    got = both(lambda: run_w(q, strided, rk, rv, bits, value_bits, 32))[0]
    assert torch.equal(got, want)
    assert not torch.equal(want, vec), "the few-rows path did not run"


@needs_rows
@pytest.mark.parametrize("Hq,Hkv,nq,D,G,bits", [
    (10, 2, 1, 128, 32, 4),  # GQA 5 at D = 128: 5 rows, above the 4 it holds
    (5, 1, 1, 256, 32, 4),  # 5 rows at D = 256
    (5, 5, 5, 64, 32, 4),  # a 5-query chunk at D = 64: 5 rows, above 4
    (4, 4, 1, 96, 32, 4),  # D = 96
    (4, 4, 1, 128, 8, 4),  # G = 8
    (4, 4, 1, 64, 32, 8),  # 8-bit at D = 64: 64-byte rows, one piece
    (6, 3, 1, 64, 32, 2),  # 2-bit at D = 64: a 16-byte row, two rows per kv head
])
def test_other_shapes(Hq, Hkv, nq, D, G, bits):
    """Shapes the path does not take give the vector units' bits exactly;
    the ones it does take, checked against the reference."""
    q, pk, rk, rv = uniform_case(1, Hq, Hkv, nq, 500, 5, D, G, bits, torch.float32)
    a, v = both(lambda: run(q, pk, rk, rv, bits, G))
    nrows = Hq // Hkv * nq
    takes = D in (64, 128, 256) and nrows <= 4 and G % 16 == 0 and D * bits % 128 == 0
    assert torch.equal(a, v) != takes
    check(a, q, pk, rk, rv, f"Hq={Hq} Hkv={Hkv} q={nq} D={D} G={G} {bits} bits")
