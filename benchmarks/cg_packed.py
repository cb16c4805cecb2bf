"""A fixed workload of ``ops.packed_attention`` for instruction counts.

Two decode calls (q = 1) over one layer of SmolLM2's attention shape (9 query
heads, 3 kv heads, D = 64) holding ``--slots`` packed slots plus a 130-slot
fp32 residual, on one thread, so that callgrind's counts are per call and
stable (wall-clock timing on a shared machine is not):

    CFLAGS=-g python setup.py build_ext --inplace   # line tables, same -O3 code
    valgrind --tool=callgrind --dump-instr=yes --toggle-collect='pa_unit*' \\
        python benchmarks/cg_packed.py
    callgrind_annotate --auto=yes callgrind.out.*

Prints the output shape only.
"""

from __future__ import annotations

import argparse

import torch

from kvcompress import ops


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", type=int, default=4096, help="packed slots per kv head")
    ap.add_argument("--bits", type=int, default=4, choices=(2, 4, 8))
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--calls", type=int, default=2)
    args = ap.parse_args(argv)
    ops.set_num_threads(1)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D = 1, 9, 3, 64
    k = torch.randn(B, Hkv, args.slots, D, generator=g)
    v = torch.randn(B, Hkv, args.slots, D, generator=g)
    pk, pv = ops.pack_keys(k, args.bits, args.group), ops.pack_values(v, args.bits, args.group)
    rk, rv = torch.randn(B, Hkv, 130, D, generator=g), torch.randn(B, Hkv, 130, D, generator=g)
    q = torch.randn(B, Hq, 1, D, generator=g)
    for _ in range(args.calls):
        out = ops.packed_attention(q, pk.codes, pk.mins, pk.scales, pv.codes, pv.mins, pv.scales, rk, rv,
                                   bits=args.bits, group=args.group)
    print(tuple(out.shape))


if __name__ == "__main__":
    main()
