"""Decode attention over a KIVI-packed layer against full-precision attention.

One decode step (q = 1) of ``ops.packed_attention`` (2, 4 and 8 bits, group
32, a 128-slot full-precision residual) and of ``ops.attention`` over the
same number of slots in float32 and bfloat16, for SmolLM2-135M's attention
shape (Hq=9, Hkv=3, D=64), a Llama-3-8B-like one (Hq=32, Hkv=8, D=128) and,
with ``--shapes``, a Llama-2-7B-like one without GQA (Hq=Hkv=32, D=128: the
model KIVI's paper evaluates), n = 4K .. 64K slots. All variants of a case
run interleaved rep by rep, so background load hits them alike; the table
gives medians, the speed-up of each packed width over fp32 and bf16
attention, and the packed kernel's bandwidth on the bytes it reads (codes +
mins/scales + residual) next to a 256 MiB NumPy copy on as many threads,
measured in the same run (read + write bytes / time), and its rate of the
multiply-adds a decode step needs (2 x Hq x n x D: the logits and the
weighted values, what fp32/bf16 attention does too) next to torch's fp32
matmul at the same thread count (``_common.matmul_roof``): whichever share
is higher says what bounds the kernel.

Each case is timed twice. **In cache**: every call reads the same layer, so
the caches hold it between calls (at 16K slots the fp32 layer is 25 MiB on
SmolLM2's shape); this flatters fp32 and bf16 attention, whose layers are
4-8x the packed one. **Streamed** (unless ``--no-stream``): each variant
cycles through copies of the layer (``_common.stream_copies``), so that
twice the last-level cache is read between two reads of one copy and every
byte comes from memory, as in a decode step, which reads each layer's cache
once per token (a model's whole cache at these lengths is many times any
CPU cache: 30 layers x 25 MiB on SmolLM2 at 16K).

    python benchmarks/bench_packed.py
    python benchmarks/bench_packed.py --quick --no-write

Writes benchmarks/results/bench_packed.json and appends a section to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse

import torch

from kvcompress import ops

from _common import (PACKED_SHAPES, command_line, copy_reference_line, copy_references,  # noqa: E402
                     last_level_cache_bytes, machine, machine_line, matmul_roof, now, stream_copies, time_many,
                     write_results)

SHAPES = PACKED_SHAPES  # _common.py says what each is
DEFAULT_SHAPES = "smollm2,llama8b"
GROUP, RESIDUAL = 32, 128


def case(shape: str, n: int, g: torch.Generator, llc: int | None = None):
    """``(fns, read, streamed)``: per variant (fp32, bf16, each packed width) a
    callable that runs one decode step on the same layer every time, the
    bytes it reads, and (with ``llc``, the last-level cache's bytes) a
    callable that reads the next of ``stream_copies`` copies of the layer on
    each call, so that its bytes come from memory (``None`` without ``llc``)."""
    Hq, Hkv, D = SHAPES[shape]
    q = torch.randn(1, Hq, 1, D, generator=g)
    k = torch.randn(1, Hkv, n, D, generator=g)
    v = torch.randn(1, Hkv, n, D, generator=g)
    m = n - RESIDUAL
    # per variant: the tensors a step reads and the call on them
    layer, call, read = {}, {}, {}
    for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        layer[name] = (q.to(dt), k.to(dt), v.to(dt))
        call[name] = lambda qd, kd, vd: ops.attention(qd, kd, vd)
        read[name] = 2 * k.numel() * layer[name][1].element_size()
    for bits, vbits in WIDTHS:
        key = width_key(bits, vbits)
        pk = ops.pack_keys(k[:, :, :m], bits, GROUP)
        pv = ops.pack_values(v[:, :, :m], vbits, GROUP)
        rk, rv = k[:, :, m:].contiguous(), v[:, :, m:].contiguous()
        layer[key] = (q, *pk, *pv, rk, rv)
        call[key] = lambda *args, bits=bits, vbits=vbits: ops.packed_attention(*args, bits=bits, group=GROUP,
                                                                              value_bits=vbits)
        read[key] = sum(t.numel() * t.element_size() for t in (*pk, *pv, rk, rv))
        # the packed kernel computes what it should (against fp32 over the dequantized slots)
        kd = torch.cat([ops.unpack_keys(*pk, bits, GROUP), rk], 2)
        vd = torch.cat([ops.unpack_values(*pv, vbits, GROUP, head_dim=D), rv], 2)
        err = (call[key](*layer[key]) - ops.attention(q, kd, vd)).abs().max().item()
        assert err < 1e-4, (shape, n, key, err)
    fns = {name: (lambda f=call[name], a=layer[name]: f(*a)) for name in layer}
    if llc is None:
        return fns, read, None
    copies = stream_copies(sum(t.numel() * t.element_size() for a in layer.values() for t in a), llc)
    streamed = {}
    for name, args in layer.items():
        ring = [args] + [tuple(t.clone() for t in args) for _ in range(copies - 1)]
        streamed[name] = _ring_call(call[name], ring)
    return fns, read, streamed


def _ring_call(f, ring: list):
    """A callable that runs ``f`` on the next argument tuple of ``ring`` each call."""
    state = [0]

    def step():
        args = ring[state[0]]
        state[0] = (state[0] + 1) % len(ring)
        return f(*args)

    step.copies = len(ring)
    return step


#: (key bits, value bits) of the packed rows timed: KIVI-2/4/8 and 4-bit keys with 2-bit values
WIDTHS = [(2, 2), (4, 4), (8, 8), (4, 2)]


def width_key(bits: int, vbits: int) -> str:
    return f"{bits}-bit" if bits == vbits else f"{bits}/{vbits}-bit"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds per case (at least 5 reps)")
    ap.add_argument("--quick", action="store_true", help="n = 4K and 16K only, for a smoke run")
    ap.add_argument("--no-stream", action="store_true",
                    help="time the same layer only (in cache), not also the streamed copies")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES,
                    help=f"comma-separated attention shapes of {', '.join(SHAPES)} (default {DEFAULT_SHAPES})")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if not shapes or unknown:
        ap.error(f"--shapes: expected names among {', '.join(SHAPES)}, got {args.shapes!r}")
    try:
        threads = sorted({int(x) for x in args.threads.split(",")})
    except ValueError:
        threads = []
    if not threads or min(threads) < 1:
        ap.error(f"--threads: expected positive integers like 1,2, got {args.threads!r}")
    lengths = [4096, 16384] if args.quick else [4096, 16384, 65536]
    info = machine()
    llc = None if args.no_stream else last_level_cache_bytes()
    # the copy on as many threads as the kernel it is set against
    bws = copy_references(threads)
    print("memcpy (read + write) " + ", ".join(f"{nt}t {b / 1e9:.2f} GB/s" for nt, b in bws.items()), flush=True)
    roofs = {nt: matmul_roof(nt) for nt in threads}
    print("matmul " + ", ".join(f"{nt}t {r / 1e9:.1f} G multiply-adds/s" for nt, r in roofs.items()), flush=True)
    g = torch.Generator().manual_seed(0)
    records = []
    for shape in shapes:
        for n in lengths:
            fns, read, streamed = case(shape, n, g, llc)
            for nt in threads:
                torch.set_num_threads(nt)
                ops.set_num_threads(nt)
                t, reps = time_many(fns, args.min_time)
                ts, sreps = time_many(streamed, args.min_time) if streamed else (None, 0)
                Hq, _, D = SHAPES[shape]
                bw = bws[nt]
                fmas = 2 * Hq * n * D  # logits and weighted values of one decode step
                for bits, vbits in WIDTHS:
                    key = width_key(bits, vbits)
                    rec = dict(shape=shape, n=n, threads=nt, bits=bits, value_bits=vbits, reps=reps,
                               packed_us=t[key] * 1e6,
                               fp32_us=t["fp32"] * 1e6, bf16_us=t["bf16"] * 1e6, vs_fp32=t["fp32"] / t[key],
                               vs_bf16=t["bf16"] / t[key], bytes_read=read[key],
                               GBps=read[key] / t[key] / 1e9, copy_share=read[key] / t[key] / bw,
                               fma_share=fmas / t[key] / roofs[nt], bf16_fma_share=fmas / t["bf16"] / roofs[nt])
                    line = (f"{shape} n={n} {nt}t {key} {rec['packed_us']:8.1f} us  fp32 {rec['fp32_us']:8.1f}  "
                            f"bf16 {rec['bf16_us']:8.1f}  x{rec['vs_fp32']:.2f} / x{rec['vs_bf16']:.2f}  "
                            f"{rec['GBps']:.2f} GB/s ({100 * rec['copy_share']:.0f}% of copy)  "
                            f"multiply-adds {100 * rec['fma_share']:.0f}% of matmul (bf16 attention "
                            f"{100 * rec['bf16_fma_share']:.0f}%)")
                    if ts:
                        rec["stream"] = dict(copies=streamed[key].copies, reps=sreps, packed_us=ts[key] * 1e6,
                                             fp32_us=ts["fp32"] * 1e6, bf16_us=ts["bf16"] * 1e6,
                                             vs_fp32=ts["fp32"] / ts[key], vs_bf16=ts["bf16"] / ts[key],
                                             GBps=read[key] / ts[key] / 1e9, copy_share=read[key] / ts[key] / bw)
                        st = rec["stream"]
                        line += (f"  | streamed {st['packed_us']:.1f} us x{st['vs_fp32']:.2f} / x{st['vs_bf16']:.2f} "
                                 f"{100 * st['copy_share']:.0f}% of copy")
                    records.append(rec)
                    print(line, flush=True)
    command = command_line(__file__, argv)
    result = dict(command=command, date=now(), machine=info, group=GROUP, residual=RESIDUAL, llc_bytes=llc,
                  memcpy_GBps={nt: b / 1e9 for nt, b in bws.items()},
                  matmul_Gfma={nt: r / 1e9 for nt, r in roofs.items()}, records=records)
    if args.no_write:
        return result
    lines = [
        f"## bench_packed ({result['date']})",
        "",
        f"Command: `{command}`",
        "",
        machine_line(info),
        copy_reference_line(bws) + " Reference compute: "
        "torch fp32 matmul (256^3) = " + ", ".join(f"{r / 1e9:.1f} G multiply-adds/s on {nt} thread(s)"
                                                   for nt, r in roofs.items()) + ".",
        f"Decode step (q = 1), B=1; packed: group {GROUP}, the last {RESIDUAL} slots in fp32; fp32 / bf16: "
        "ops.attention over the same n slots. Medians of interleaved reps; x = fp32 (or bf16) time / packed "
        "time; GB/s = bytes the packed kernel reads (codes, mins, scales, residual) / time; % of matmul = "
        "the step's 2 x Hq x n x D multiply-adds / time / the matmul rate (packed, then bf16 attention).",
        "",
        "**In cache**: every call reads the same layer, so whatever of the case's layers (all variants "
        "together) the caches keep from one rep to the next is read from them: all of it at SmolLM2's shape up "
        "to 16K slots (55 MiB), less where the case outgrows the last-level cache.",
        "",
        "| shape | n | threads | bits | packed us | fp32 us | bf16 us | vs fp32 | vs bf16 | GB/s | % of copy "
        "| % of matmul | bf16: % of matmul |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(f"| {r['shape']} | {r['n']} | {r['threads']} | {width_key(r['bits'], r['value_bits'])} | "
                     f"{r['packed_us']:.1f} | "
                     f"{r['fp32_us']:.1f} | {r['bf16_us']:.1f} | {r['vs_fp32']:.2f} | {r['vs_bf16']:.2f} | "
                     f"{r['GBps']:.2f} | {100 * r['copy_share']:.0f}% | {100 * r['fma_share']:.0f}% | "
                     f"{100 * r['bf16_fma_share']:.0f}% |")
    if llc:
        lines += [
            "",
            f"**Streamed**: each variant cycles through copies of the layer, so that at least twice the "
            f"last-level cache ({llc / 2**20:.0f} MiB as Linux reports it) is read between two reads of the "
            "same copy, as in a decode step, which reads every layer's cache once per token: every byte comes "
            "from memory. Same reps, interleaved the same way.",
            "",
            "| shape | n | threads | bits | copies | packed us | fp32 us | bf16 us | vs fp32 | vs bf16 | GB/s "
            "| % of copy |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in records:
            st = r["stream"]
            lines.append(f"| {r['shape']} | {r['n']} | {r['threads']} | {width_key(r['bits'], r['value_bits'])} | "
                         f"{st['copies']} | {st['packed_us']:.1f} | {st['fp32_us']:.1f} | {st['bf16_us']:.1f} | "
                         f"{st['vs_fp32']:.2f} | {st['vs_bf16']:.2f} | {st['GBps']:.2f} | "
                         f"{100 * st['copy_share']:.0f}% |")
    write_results("bench_packed", result, lines)
    return result


if __name__ == "__main__":
    main()
