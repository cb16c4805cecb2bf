"""MagicPIG's sampled decode step against dense attention over the same layer.

One decode step (q = 1) over n = 16K, 32K and 64K slots: the dense kernel
(``ops.attention``) against MagicPIG's whole step (``LSHStore.attend``: the
query's SimHash codes, then ``ops.lsh_attention``, which scans every slot's
L codes and reads the keys and values of the sinks, the window and the keys
that collide), with the scan-and-read op timed on its own and the share of
slots it read. The keys are Gaussian, so the share read is what random
hyperplanes give unrelated keys (``K=8, L=75``: about 3%); a model's keys,
closer to its queries, are read more often (see the eval's ``read``
column). Shapes: SmolLM2-135M's attention (Hq=9, Hkv=3, D=64) and a
Llama-3-8B-like one (Hq=32, Hkv=8, D=128), float32 and bfloat16. All
variants of a case run interleaved rep by rep.

    python benchmarks/bench_magicpig.py
    python benchmarks/bench_magicpig.py --quick --no-write

Writes benchmarks/results/bench_magicpig.json and appends a section to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse

import torch

from kvcompress import ops
from kvcompress.stores import AttentionSpec, LSHStore, UniformStore

from _common import command_line, machine, machine_line, now, write_results  # noqa: E402
from bench_quest import SHAPES, add_sweep_args, sweep  # noqa: E402


def case(shape: str, n: int, dtype, K: int, L: int, g: torch.Generator):
    Hq, Hkv, D = SHAPES[shape]
    q = torch.randn(1, Hq, 1, D, generator=g).to(dtype)
    k = torch.randn(1, Hkv, n, D, generator=g).to(dtype)
    v = torch.randn(1, Hkv, n, D, generator=g).to(dtype)
    base = UniformStore()
    base.append(k, v, 0)
    store = LSHStore.from_uniform(base, K, L, 2, 4, 64, seed=0)
    spec = AttentionSpec(scaling=D ** -0.5)
    qcodes = ops.simhash(q, store.planes, K, group=Hq // Hkv)
    fns = {
        "dense": lambda: ops.attention(q, k, v),
        "magicpig": lambda: store.attend(q, spec),
        "lsh only": lambda: ops.lsh_attention(q, k, v, store.codes, qcodes, K, hits=2, sinks=4, window=64,
                                              center=store.center, scaling=spec.scaling),
    }
    out, reads = ops.lsh_attention(q, k, v, store.codes, qcodes, K, hits=2, sinks=4, window=64,
                                   center=store.center, scaling=spec.scaling, return_reads=True)
    # the store's step is the op on the query's own codes
    assert torch.equal(store.attend(q, spec), out)
    return fns, float(reads.double().mean()) / n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--K", type=int, default=8, help="bits per table")
    ap.add_argument("--L", type=int, default=75, help="tables")
    add_sweep_args(ap)
    args = ap.parse_args(argv)
    info = machine()
    records = []
    for rec, t, read in sweep(args, lambda shape, n, dtype, g: case(shape, n, dtype, args.K, args.L, g)):
        rec.update(K=args.K, L=args.L, dense_us=t["dense"] * 1e6, magicpig_us=t["magicpig"] * 1e6,
                   lsh_us=t["lsh only"] * 1e6, speedup=t["dense"] / t["magicpig"], read=read)
        records.append(rec)
        print(f"{rec['shape']} {rec['dtype']} n={rec['n']} {rec['threads']}t dense {rec['dense_us']:9.1f} us  "
              f"magicpig {rec['magicpig_us']:9.1f} (lsh op {rec['lsh_us']:9.1f})  x{rec['speedup']:.2f}  "
              f"read {100 * read:.1f}%", flush=True)
    command = command_line(__file__, argv)
    result = dict(command=command, date=now(), machine=info, records=records)
    if args.no_write:
        return result
    lines = [
        f"## bench_magicpig ({result['date']})",
        "",
        f"Command: `{command}`",
        "",
        machine_line(info),
        f"Decode step (q = 1), B=1, K={args.K}, L={args.L}, hits 2, sinks 4, window 64, Gaussian keys and "
        "queries. dense = ops.attention over all n slots; magicpig = LSHStore.attend (query codes + "
        "ops.lsh_attention); lsh op = ops.lsh_attention alone; read = share of the slots the step read "
        "(mean over query heads). Medians of interleaved reps; x = dense / magicpig.",
        "",
        "| shape | dtype | n | threads | dense us | magicpig us | lsh op us | x dense | read |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['n']} | {r['threads']} | {r['dense_us']:.1f} | "
                     f"{r['magicpig_us']:.1f} | {r['lsh_us']:.1f} | {r['speedup']:.2f} | {100 * r['read']:.1f}% |")
    write_results("bench_magicpig", result, lines)
    return result


if __name__ == "__main__":
    main()
