"""CUDA kernels: time and effective bandwidth of every op, against a
device-to-device copy measured in the same run, and decode attention over
an fp16 cache at 4K-64K slots against torch's scaled_dot_product_attention
over the same (full) cache, and decode attention over a KIVI-packed cache
(2/4/8 bits) against both.

* copy: ``dst.copy_(src)`` of a 1 GiB buffer; its bandwidth counts bytes
  read + written, the usual way of quoting it.
* an op's effective bandwidth: the bytes it must move at least (each input
  read once, each output written once) over its time. ``% copy`` is that
  over the copy's bandwidth.
* times: CUDA events around ``--reps`` back-to-back calls through the public
  ``kvcompress.ops`` functions (argument checks and launch included), after
  warm-up; the median of ``--rounds`` such means. Decode attention is also
  timed as replays of a CUDA graph holding ``--reps`` calls, which removes the
  host-side launch overhead (tens of microseconds per call in Python, for
  torch's SDPA as for us) that bounds the eager numbers at small sizes.
* decode attention: q = 1, Hq = 32, Hkv = 8, D = 128, fp16, uniform cache
  without padding; SDPA gets the same K/V ([B, Hkv, n, D], enable_gqa).
* packed decode attention: the kernel the op picks for the shape (the tiled
  one here) and, in the same run, the generic kernel
  (``KVCOMPRESS_CUDA_PACKED_KERNEL=generic``), both against the
  dequantized cache.
* ``--parts ops,attention,packed`` picks which of the three tables to run.

Needs a CUDA device and a build with ``KVCOMPRESS_CUDA=1``::

    KVCOMPRESS_CUDA=1 pip install --no-build-isolation -e .
    python benchmarks/bench_cuda.py --out benchmarks/results/bench_cuda.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

from kvcompress import _C, ops

GiB = 1 << 30


def timed(fn, reps, rounds, warmup=3):
    """Median over `rounds` of the mean time of `reps` back-to-back calls, seconds."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    means = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        means.append(start.elapsed_time(end) / 1e3 / reps)
    return statistics.median(means)


def graph_timed(fn, reps, rounds):
    """Per-call device time of `reps` calls captured in one CUDA graph and
    replayed: what the kernels take once host-side launch overhead is gone.
    None when `fn` cannot be captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
    except RuntimeError as e:  # capture refused: report it, keep the eager numbers
        print(f"(CUDA graph capture failed: {e})", file=sys.stderr)
        return None
    return timed(graph.replay, 1, rounds) / reps


def copy_bandwidth(reps, rounds):
    src = torch.empty(GiB, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), reps, rounds)
    return 2 * GiB / t


def nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def op_cases(gen):
    """(name, shape text, fn, bytes moved at least)."""
    dev, f16 = "cuda", torch.float16
    cases = []

    B, Hq, Hkv, Tq, T, D = 1, 32, 8, 32, 16384, 128
    q = torch.randn(B, Hq, Tq, D, device=dev, generator=gen).to(f16)
    k = torch.randn(B, Hkv, T, D, device=dev, generator=gen).to(f16)
    out = torch.empty(B, Hkv, T, device=dev)
    cases.append(("window_scores", f"q {Tq}, keys {T}, Hq {Hq}/{Hkv}, D {D}, fp16",
                  lambda: ops.window_scores(q, k), nbytes(q, k, out)))
    cases.append(("vector_norm", f"[{B}, {Hkv}, {T}, {D}] fp16", lambda: ops.vector_norm(k), nbytes(k, out)))
    s = torch.rand(B, Hkv, T, device=dev, generator=gen)
    cases.append(("pool1d (max, 7)", f"[{B}, {Hkv}, {T}]", lambda: ops.pool1d(s, 7), 2 * nbytes(s)))
    kk = 2048
    cases.append(("select_topk", f"[{B}, {Hkv}, {T}], k {kk}",
                  lambda: ops.select_topk(s, kk, sinks=4, window=32), nbytes(s) + B * Hkv * kk * 8))
    idx = ops.select_topk(s, kk, sinks=4, window=32)
    cases.append(("gather", f"{kk} of {T} rows, K and V", lambda: ops.gather(k, k, idx),
                  2 * 2 * B * Hkv * kk * D * 2 + nbytes(idx)))
    cases.append(("head_budgets", f"[{B}, {Hkv}, {T}], budget {kk}",
                  lambda: ops.head_budgets(s, kk), nbytes(s)))
    Tg = 4096
    qg = torch.randn(B, Hq, Tg, D, device=dev, generator=gen).to(f16)
    kg = k[:, :, :Tg]
    cases.append(("global_scores", f"all {Tg} queries x {Tg} keys, Hq {Hq}/{Hkv}, D {D}",
                  lambda: ops.global_scores(qg, kg), nbytes(qg, kg) + B * Hkv * Tg * 4))
    Tm, C = 4096, 1024
    sm = s[:, :, :Tm].contiguous()
    centers = ops.select_topk(sm, C, sinks=4, window=32)
    km = k[:, :, :Tm]
    cases.append(("evict_merge", f"T {Tm}, {C} centers, D {D}, fp16",
                  lambda: ops.evict_merge(km, km, sm, centers),
                  2 * nbytes(km) + nbytes(sm, centers) + 2 * B * Hkv * C * D * 2))
    return cases


def decode_case(B, Hq, Hkv, n, D, gen):
    """fp16 decode step on the GPU: q ``[B, Hq, 1, D]``, k and v ``[B, Hkv, n, D]``."""
    q = torch.randn(B, Hq, 1, D, device="cuda", generator=gen).to(torch.float16)
    k = torch.randn(B, Hkv, n, D, device="cuda", generator=gen).to(torch.float16)
    v = torch.randn(B, Hkv, n, D, device="cuda", generator=gen).to(torch.float16)
    return q, k, v


def attention_rows(lengths, batches, reps, rounds, copy_bw, gen):
    rows = []
    Hq, Hkv, D = 32, 8, 128
    for B in batches:
        for n in lengths:
            q, k, v = decode_case(B, Hq, Hkv, n, D, gen)
            ours = ops.attention(q, k, v)
            ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2)
            err = (ours.float() - ref.float()).abs().max().item()
            ours_fn = lambda: ops.attention(q, k, v)  # noqa: E731
            sdpa_fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
            t_ours, t_sdpa = timed(ours_fn, reps, rounds), timed(sdpa_fn, reps, rounds)
            g_ours, g_sdpa = graph_timed(ours_fn, reps, rounds), graph_timed(sdpa_fn, reps, rounds)
            moved = nbytes(q, k, v) + B * Hq * D * 2
            row = {"B": B, "slots": n, "kv_mib": nbytes(k, v) / (1 << 20),
                   "ours_us": t_ours * 1e6, "sdpa_us": t_sdpa * 1e6,
                   "ours_gbs": moved / t_ours / 1e9, "sdpa_gbs": moved / t_sdpa / 1e9,
                   "ours_pct_copy": 100 * moved / t_ours / copy_bw,
                   "speedup_vs_sdpa": t_sdpa / t_ours, "max_abs_diff_vs_sdpa": err}
            if g_ours and g_sdpa:
                row.update({"graph_ours_us": g_ours * 1e6, "graph_sdpa_us": g_sdpa * 1e6,
                            "graph_ours_pct_copy": 100 * moved / g_ours / copy_bw,
                            "graph_sdpa_pct_copy": 100 * moved / g_sdpa / copy_bw,
                            "graph_speedup_vs_sdpa": g_sdpa / g_ours})
            rows.append(row)
    return rows


def packed_rows(lengths, batches, reps, rounds, copy_bw, gen, group=32, residual=128):
    """Decode attention over a KIVI-packed fp16 layer (2/4/8 bits, the last
    `residual` slots in fp16) against ops.attention and SDPA over the same
    number of fp16 slots; bandwidth on the bytes the packed kernel reads."""
    rows = []
    Hq, Hkv, D = 32, 8, 128
    for B in batches:
        for n in lengths:
            q, k, v = decode_case(B, Hq, Hkv, n, D, gen)
            m = n - residual
            rk, rv = k[:, :, m:].contiguous(), v[:, :, m:].contiguous()
            fp16_fn = lambda: ops.attention(q, k, v)  # noqa: E731
            sdpa_fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
            t_fp16, t_sdpa = graph_timed(fp16_fn, reps, rounds), graph_timed(sdpa_fn, reps, rounds)
            for bits in (2, 4, 8):
                pk = ops.pack_keys(k[:, :, :m], bits, group)
                pv = ops.pack_values(v[:, :, :m], bits, group)
                args = (q, *pk, *pv, rk, rv)
                fn = lambda args=args, bits=bits: ops.packed_attention(*args, bits=bits, group=group)  # noqa: E731
                kd = torch.cat([ops.unpack_keys(*pk, bits, group).to(torch.float16), rk], 2)
                vd = torch.cat([ops.unpack_values(*pv, bits, group, head_dim=D).to(torch.float16), rv], 2)
                want = ops.attention(q, kd, vd).float()
                err = (fn().float() - want).abs().max().item()
                t = graph_timed(fn, reps, rounds) or timed(fn, reps, rounds)
                # the generic kernel on the same problem, same run (the op picks
                # the tiled one for this shape)
                os.environ["KVCOMPRESS_CUDA_PACKED_KERNEL"] = "generic"
                try:
                    err_generic = (fn().float() - want).abs().max().item()
                    t_generic = graph_timed(fn, reps, rounds) or timed(fn, reps, rounds)
                finally:
                    del os.environ["KVCOMPRESS_CUDA_PACKED_KERNEL"]
                read = nbytes(q, *pk, *pv, rk, rv) + B * Hq * D * 2
                row = {"B": B, "slots": n, "bits": bits, "packed_us": t * 1e6,
                       "packed_gbs": read / t / 1e9, "packed_pct_copy": 100 * read / t / copy_bw,
                       "generic_us": t_generic * 1e6, "generic_pct_copy": 100 * read / t_generic / copy_bw,
                       "vs_generic": t_generic / t,
                       "max_abs_diff_vs_dequantized": max(err, err_generic)}
                if t_fp16 and t_sdpa:
                    row.update({"fp16_us": t_fp16 * 1e6, "sdpa_us": t_sdpa * 1e6,
                                "vs_fp16": t_fp16 / t, "vs_sdpa": t_sdpa / t})
                rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="4096,8192,16384,32768,65536")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--parts", default="ops,attention,packed",
                    help="comma-separated subset of ops, attention, packed (packed needs attention's rows "
                         "for its fp16 / SDPA columns: it times them itself)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if not (_C.has_cuda and torch.cuda.is_available()):
        sys.exit("bench_cuda: needs a CUDA device and kvcompress built with KVCOMPRESS_CUDA=1")
    gen = torch.Generator(device="cuda").manual_seed(0)
    dev = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth(args.reps // 5 or 1, args.rounds)
    print(f"device: {dev}; device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)\n")

    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    if not parts or parts - {"ops", "attention", "packed"}:
        sys.exit(f"bench_cuda: --parts takes ops, attention and packed, not {args.parts!r}")
    op_rows = []
    if "ops" in parts:
        print("| op | problem | time (us) | effective GB/s | % of copy |")
        print("|---|---|---:|---:|---:|")
    for name, shape, fn, moved in (op_cases(gen) if "ops" in parts else []):
        t = timed(fn, args.reps, args.rounds)
        row = {"op": name, "problem": shape, "us": t * 1e6, "gbs": moved / t / 1e9,
               "pct_copy": 100 * moved / t / copy_bw}
        op_rows.append(row)
        print(f"| {name} | {shape} | {row['us']:.1f} | {row['gbs']:.0f} | {row['pct_copy']:.0f}% |")

    lengths = [int(x) for x in args.lengths.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    att = attention_rows(lengths, batches, args.reps, args.rounds, copy_bw, gen) if "attention" in parts else []
    if att:
        print("\nDecode attention, fp16, Hq 32 / Hkv 8, D 128, q = 1 (SDPA over the same cache)\n")
        print("| B | slots | K+V MiB | ours (us) | ours GB/s | % of copy | SDPA (us) | SDPA GB/s | SDPA / ours | max |diff| |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in att:
            print(f"| {r['B']} | {r['slots']} | {r['kv_mib']:.0f} | {r['ours_us']:.1f} | {r['ours_gbs']:.0f} | "
                  f"{r['ours_pct_copy']:.0f}% | {r['sdpa_us']:.1f} | {r['sdpa_gbs']:.0f} | "
                  f"{r['speedup_vs_sdpa']:.2f} | {r['max_abs_diff_vs_sdpa']:.1e} |")
    if att and all("graph_ours_us" in r for r in att):
        print("\nThe same, timed as CUDA-graph replays (device time without launch overhead)\n")
        print("| B | slots | ours (us) | % of copy | SDPA (us) | SDPA % of copy | SDPA / ours |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for r in att:
            print(f"| {r['B']} | {r['slots']} | {r['graph_ours_us']:.1f} | {r['graph_ours_pct_copy']:.0f}% | "
                  f"{r['graph_sdpa_us']:.1f} | {r['graph_sdpa_pct_copy']:.0f}% | {r['graph_speedup_vs_sdpa']:.2f} |")
    packed = packed_rows(lengths, batches, args.reps, args.rounds, copy_bw, gen) if "packed" in parts else []
    print("\nDecode attention over a KIVI-packed fp16 layer (group 32, last 128 slots fp16), CUDA-graph replays;"
          "\nfp16 / SDPA: the same number of slots unpacked\n")
    print("| B | slots | bits | packed (us) | GB/s read | % of copy | generic kernel (us) | generic / packed | "
          "fp16 ours (us) | SDPA (us) | vs ours fp16 | vs SDPA | max |diff| |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in packed:
        print(f"| {r['B']} | {r['slots']} | {r['bits']} | {r['packed_us']:.1f} | {r['packed_gbs']:.0f} | "
              f"{r['packed_pct_copy']:.0f}% | {r['generic_us']:.1f} | {r['vs_generic']:.2f} | "
              f"{r.get('fp16_us', float('nan')):.1f} | {r.get('sdpa_us', float('nan')):.1f} | "
              f"{r.get('vs_fp16', float('nan')):.2f} | {r.get('vs_sdpa', float('nan')):.2f} | "
              f"{r['max_abs_diff_vs_dequantized']:.1e} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": dev, "copy_gbs": copy_bw / 1e9, "torch": torch.__version__,
                       "ops": op_rows, "attention": att, "packed_attention": packed,
                       "reps": args.reps, "rounds": args.rounds}, f, indent=1)
    if any(not math.isfinite(r["max_abs_diff_vs_sdpa"]) or r["max_abs_diff_vs_sdpa"] > 1e-2 for r in att):
        sys.exit("bench_cuda: decode attention disagrees with SDPA")
    if any(not math.isfinite(r["max_abs_diff_vs_dequantized"]) or r["max_abs_diff_vs_dequantized"] > 1e-2
           for r in packed):
        sys.exit("bench_cuda: packed attention disagrees with attention over the dequantized cache")


if __name__ == "__main__":
    main()
