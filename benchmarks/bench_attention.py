"""Decode attention (q = 1) of kvcompress.ops.attention against torch SDPA.

SmolLM2-135M's attention shape (B=1, Hq=9, Hkv=3, D=64) over caches of
n = 1K..64K slots, float32 and bfloat16, 1 and 2 threads:

* uniform: one ``[B, Hkv, n, D]`` cache; torch runs
  ``F.scaled_dot_product_attention(..., enable_gqa=True)`` on the same tensors;
* ragged: the same total size split unevenly over the kv heads
  (n/2, n, 3n/2 slots) in one ``[N, D]`` buffer with unused rows between the
  segments; torch runs SDPA head by head over views of the segments (what a
  cache without a ragged kernel would have to do).

Both run interleaved rep by rep (background load hits both alike); the table
reports median times, torch/C (> 1: C faster), and the effective bandwidth
(bytes of K + V read / time) next to a 256 MiB NumPy copy measured in the
same run (read + write bytes / time), which bounds a memory-bound kernel.

    python benchmarks/bench_attention.py
    python benchmarks/bench_attention.py --quick --no-write

Writes benchmarks/results/bench_attention.json and appends a section to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from kvcompress import ops

from _common import command_line, copy_reference_line, copy_references, machine, machine_line, now, time_pair, write_results  # noqa: E402,E501

B, HQ, HKV, D = 1, 9, 3, 64
GAP = 64  # unused rows between ragged segments




def ragged_cache(n, dtype, g):
    """Per-head lengths n/2, n, 3n/2 (total 3n) in one buffer with gaps."""
    lengths = [n // 2, n, 3 * n - n // 2 - n]
    offsets, pos = [], 0
    for ln in lengths:
        offsets.append(pos)
        pos += ln + GAP
    k = torch.randn(pos, D, generator=g).to(dtype)
    v = torch.randn(pos, D, generator=g).to(dtype)
    return k, v, torch.tensor(offsets), torch.tensor(lengths)


def torch_ragged(q, k, v, offsets, lengths):
    """SDPA over each kv head's segment, as [B, 1, Hq, D]."""
    g = HQ // HKV
    outs = []
    for h in range(HKV):
        o, n = int(offsets[h]), int(lengths[h])
        kh, vh = k[o:o + n][None, None], v[o:o + n][None, None]
        outs.append(F.scaled_dot_product_attention(q[:, h * g:(h + 1) * g], kh, vh, enable_gqa=True))
    return torch.cat(outs, dim=1).transpose(1, 2)


def cases(quick):
    g = torch.Generator().manual_seed(0)
    lengths = [1024, 4096] if quick else [1024, 4096, 16384, 65536]
    for dtype in (torch.float32, torch.bfloat16):
        dn = str(dtype).replace("torch.", "")
        for n in lengths:
            q = torch.randn(B, 1, HQ, D, generator=g).to(dtype).transpose(1, 2)  # HF layout
            k = torch.randn(B, HKV, n, D, generator=g).to(dtype)
            v = torch.randn(B, HKV, n, D, generator=g).to(dtype)
            kv_bytes = 2 * k.numel() * k.element_size()
            yield dict(
                layout="uniform", n=n, dtype=dn, bytes=kv_bytes,
                c=lambda q=q, k=k, v=v: ops.attention(q, k, v),
                torch=lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2),
            )
            del k, v
            kr, vr, off, ln = ragged_cache(n, dtype, g)
            yield dict(
                layout="ragged", n=n, dtype=dn, bytes=kv_bytes,
                c=lambda q=q, kr=kr, vr=vr, off=off, ln=ln: ops.attention(q, kr, vr, offsets=off, lengths=ln),
                torch=lambda q=q, kr=kr, vr=vr, off=off, ln=ln: torch_ragged(q, kr, vr, off, ln),
            )


def check(c):
    """Both sides compute the same thing (bf16 outputs differ by rounding)."""
    a, b = c["c"]().float(), c["torch"]().float()
    err = (a - b).abs().max().item()
    assert err < (2e-2 if c["dtype"] == "bfloat16" else 1e-4), (c["layout"], c["n"], c["dtype"], err)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (both libraries)")
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds per case and thread count (at least 5 reps)")
    ap.add_argument("--quick", action="store_true", help="n = 1K and 4K only, for a smoke run")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    threads = sorted({int(x) for x in args.threads.split(",")})
    info = machine()
    bws = copy_references(threads)  # the copy on as many threads as the kernel it is set against
    print("memcpy (read + write) " + ", ".join(f"{nt}t {b / 1e9:.2f} GB/s" for nt, b in bws.items()), flush=True)
    records = []
    for nt in threads:
        torch.set_num_threads(nt)
        ops.set_num_threads(nt)
        bw = bws[nt]
        for c in cases(args.quick):
            check(c)
            tc, tt, reps = time_pair(c["c"], c["torch"], args.min_time, max_reps=200)
            rec = dict(
                layout=c["layout"], n=c["n"], dtype=c["dtype"], threads=nt, reps=reps, c_us=tc * 1e6,
                torch_us=tt * 1e6, ratio=tt / tc, kv_bytes=c["bytes"], c_GBps=c["bytes"] / tc / 1e9,
                torch_GBps=c["bytes"] / tt / 1e9,
            )
            records.append(rec)
            print(
                f"{nt}t {rec['layout']:<8} n={rec['n']:<6} {rec['dtype']:<9} C {rec['c_us']:9.1f} us  "
                f"torch {rec['torch_us']:9.1f} us  x{rec['ratio']:6.2f}  C {rec['c_GBps']:6.2f} GB/s "
                f"({100 * rec['c_GBps'] * 1e9 / bw:.0f}% of copy)",
                flush=True,
            )
    command = command_line(__file__, argv)
    result = dict(command=command, date=now(), machine=info, shape=dict(B=B, Hq=HQ, Hkv=HKV, D=D, q=1),
                  memcpy_GBps={nt: b / 1e9 for nt, b in bws.items()}, records=records)
    if args.no_write:
        return result
    lines = [
        f"## bench_attention ({result['date']})",
        "",
        f"Command: `{command}`",
        "",
        machine_line(info),
        copy_reference_line(bws),
        f"Decode step (q = 1), B={B}, Hq={HQ}, Hkv={HKV}, D={D}. Uniform: torch = SDPA with enable_gqa on the "
        "same [B, Hkv, n, D] cache. Ragged: the same 3n slots split n/2, n, 3n/2 over the kv heads in one "
        "[N, D] buffer; torch = SDPA per head over the segments. Times are medians of interleaved reps; "
        "torch/C > 1: C faster; GB/s = bytes of K + V read / time.",
        "",
        "| threads | layout | n | dtype | C us | torch us | torch/C | C GB/s | % of copy |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['threads']} | {r['layout']} | {r['n']} | {r['dtype']} | {r['c_us']:.1f} | {r['torch_us']:.1f} | "
            f"{r['ratio']:.2f} | {r['c_GBps']:.2f} | {100 * r['c_GBps'] * 1e9 / bws[r['threads']]:.0f}% |"
        )
    write_results("bench_attention", result, lines)
    return result


if __name__ == "__main__":
    main()
