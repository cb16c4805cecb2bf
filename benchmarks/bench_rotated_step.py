"""What rotated keys and a sink block cost a decode step: one layer's attention read, timed.

``KIVI(rotate=True)`` packs ``k @ R`` and keeps the residual as it came, so a
step reads the packed part with ``q @ R`` and the residual with ``q``. On the
CPU the kernel takes both queries in one call (``residual_query``); other
devices read the residual in a second call and join the two by their
log-sum-exps. This times ``PackedStore.attend`` for one decode query at a
packed layer of the given shape, three ways, round-robin in the same run
(each way's median over the rounds):

* ``plain``: unrotated keys (one call);
* ``one call``: rotated keys, the kernel's residual query;
* ``joined``: rotated keys, two calls and the join (the non-CPU path, forced);

and with ``--sinks S`` (``KIVI(sinks=S)``: the first S slots in full
precision at the residual's front) three more:

* ``sinks``: unrotated keys, the block read in the same call;
* ``sinks apart``: the block read by a call of its own and joined (the path
  of a batch whose padding reaches past the packed part, forced);
* ``rotated sinks``: rotated keys, one call.

Ratios are against ``plain``; a model's step pays the difference once per
packed layer (30 on the default model)::

    python benchmarks/bench_rotated_step.py --slots 1024,8192 --threads 2 [--sinks 4] --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from _common import command_line, machine, machine_line
from kvcompress import ops
from kvcompress.stores import AttentionSpec, PackedStore, UniformStore
from kvcompress.stores import packed as packed_store
from kvcompress.stores.rotation import key_rotation


def _store(n, heads, D, bits, residual, rotation, sinks=0, apart=False, seed=0):
    """A packed layer of ``n`` slots (whole groups packed, ``residual`` or
    fewer in full precision, ``sinks`` in its sink block, read apart with
    ``apart``) with model-like keys (per-channel scales)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, heads, n, D, generator=g) * torch.linspace(0.2, 4.0, D)
    v = torch.randn(1, heads, n, D, generator=g)
    cols = {"positions": torch.arange(n, dtype=torch.int32).expand(1, heads, n).contiguous()}
    s = PackedStore.from_uniform(UniformStore.from_parts(k, v, cols), bits, 32, residual, rotation=rotation,
                                 sinks=sinks)
    s.settle()
    if apart:
        s._sinks_in_call = False
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", default="1024,8192", help="comma-separated layer lengths (default 1024,8192)")
    ap.add_argument("--heads", type=int, default=3, help="kv heads (default 3, the default model's)")
    ap.add_argument("--query-heads", type=int, default=9, help="query heads (default 9)")
    ap.add_argument("--head-dim", type=int, default=64, help="head size (default 64)")
    ap.add_argument("--bits", type=int, default=2, help="key and value bits (default 2)")
    ap.add_argument("--residual", type=int, default=128, help="residual slots (default 128)")
    ap.add_argument("--rounds", type=int, default=2000, help="timed rounds per shape (default 2000)")
    ap.add_argument("--threads", type=int, default=2, help="kernel threads (default 2)")
    ap.add_argument("--sinks", type=int, default=0, help="also time a sink block of this many slots (default 0)")
    ap.add_argument("--json", default=None, help="write the timings here")
    args = ap.parse_args(argv)
    ops.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    D, spec = args.head_dim, AttentionSpec(scaling=args.head_dim ** -0.5)
    rot = key_rotation(D, "cpu")
    real_one_call = packed_store.one_call
    rows = []
    for n in [int(x) for x in args.slots.split(",")]:
        plain = _store(n, args.heads, D, args.bits, args.residual, None)
        rotated = _store(n, args.heads, D, args.bits, args.residual, rot)
        q = torch.randn(1, args.query_heads, 1, D)

        def way(store, one):
            def f():
                packed_store.one_call = lambda query: one
                store.attend(q, spec)
            return f

        ways = {"plain": way(plain, True), "one call": way(rotated, True), "joined": way(rotated, False)}
        if args.sinks:
            S = args.sinks
            ways["sinks"] = way(_store(n, args.heads, D, args.bits, args.residual, None, S), True)
            ways["sinks apart"] = way(_store(n, args.heads, D, args.bits, args.residual, None, S, True), True)
            ways["rotated sinks"] = way(_store(n, args.heads, D, args.bits, args.residual, rot, S), True)
        times = {k: [] for k in ways}
        try:
            for f in ways.values():
                for _ in range(50):
                    f()
            for _ in range(args.rounds):
                for k, f in ways.items():
                    t0 = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t0)
        finally:
            packed_store.one_call = real_one_call
        med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
        rows.append({"slots": n, "packed": plain.n_packed, "residual": plain.r, "median_us": med})
    info = machine()
    print(machine_line(info))
    print(f"\n`{command_line(__file__, argv)}`\n")
    names = list(rows[0]["median_us"])
    print("| slots (packed + residual) | plain µs | " + " | ".join(f"{k} µs | ×plain" for k in names[1:]) + " |")
    print("|---|---:|" + "---:|---:|" * (len(names) - 1))
    for r in rows:
        m = r["median_us"]
        cells = " | ".join(f"{m[k]:.1f} | {m[k] / m['plain']:.2f}" for k in names[1:])
        print(f"| {r['slots']} ({r['packed']} + {r['residual']}) | {m['plain']:.1f} | {cells} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "command": command_line(__file__, argv), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
