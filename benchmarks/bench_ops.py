"""Time each C op of kvcompress against a straightforward torch version.

Both run on the same inputs in the same process, interleaved rep by rep (so
background load hits both alike); the table reports median wall times, the
ratio torch/C (> 1: C is faster) and the effective bandwidth (bytes the op
must read + write, divided by its time) next to a 256 MiB NumPy copy measured
in the same run, which is what a memory-bound op could reach.

    python benchmarks/bench_ops.py                 # threads 1 and all cores
    python benchmarks/bench_ops.py --threads 2 --quick

Writes benchmarks/results/bench_ops.json and appends a section to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import os

import torch

from kvcompress import ops

from _common import command_line, copy_reference_line, copy_references, machine, machine_line, now, time_pair, write_results  # noqa: E402,E501

HERE = os.path.dirname(os.path.abspath(__file__))
B, HQ, HKV, D, WINDOW = 1, 9, 3, 64, 32


# ----------------------------------------------------------------- torch baselines


def torch_window_scores(q, k, scaling):
    """SnapKV/H2O as usually written: matmul in the model dtype, causal mask,
    softmax in fp32, mean over queries and over the GQA group."""
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = hq // hkv
    logits = (q.reshape(b, hkv, g * tq, d) @ k.transpose(-1, -2)).view(b, hkv, g, tq, tk) * scaling
    pos = torch.arange(tq)[:, None] + (tk - tq)
    logits = logits.masked_fill(torch.arange(tk)[None, :] > pos, float("-inf"))
    attn = torch.softmax(logits, dim=-1, dtype=torch.float32)
    return attn.mean(dim=3).mean(dim=2)


def torch_vector_norm(x, ord):
    return torch.linalg.vector_norm(x, ord=ord, dim=-1, dtype=torch.float32)


def torch_pool1d(s, kernel):
    b, h, t = s.shape
    return torch.nn.functional.max_pool1d(s.view(b * h, 1, t), kernel, stride=1, padding=kernel // 2).view(b, h, t)


def torch_select_topk(s, k, sinks, window):
    s = s.clone()
    s[..., :sinks] = float("inf")
    s[..., s.shape[-1] - window :] = float("inf")
    return s.topk(k, dim=-1).indices.sort(dim=-1).values


def torch_gather(keys, values, idx):
    e = idx[..., None].expand(-1, -1, -1, keys.shape[-1])
    return torch.gather(keys, 2, e), torch.gather(values, 2, e)


# ----------------------------------------------------------------- timing




def nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts)


# ----------------------------------------------------------------- cases


def cases(quick):
    g = torch.Generator().manual_seed(0)
    lengths = [1024, 4096] if quick else [1024, 4096, 16384]
    for dtype in (torch.float32, torch.bfloat16):
        dn = str(dtype).replace("torch.", "")
        for t in lengths + [("h2o", 1024), ("h2o", 4096)][: 1 if quick else 2]:
            h2o = isinstance(t, tuple)
            t = t[1] if h2o else t
            tq = t if h2o else WINDOW
            q = torch.randn(B, tq, HQ, D, generator=g).to(dtype).transpose(1, 2)  # HF layout
            k = torch.randn(B, HKV, t, D, generator=g).to(dtype)
            sc = 1 / math.sqrt(D)
            out = torch.empty(B, HKV, t)
            yield dict(
                op="window_scores", case=f"T={t} Tq={tq}" + (" (H2O)" if h2o else ""), dtype=dn,
                c=lambda q=q, k=k: ops.window_scores(q, k), torch=lambda q=q, k=k, sc=sc: torch_window_scores(q, k, sc),
                bytes=nbytes(q, k, out),
            )
        for t in lengths:
            x = torch.randn(B, HKV, t, D, generator=g).to(dtype)
            out = torch.empty(B, HKV, t)
            for o in (2, 1):
                yield dict(
                    op="vector_norm", case=f"T={t} ord={o}", dtype=dn,
                    c=lambda x=x, o=o: ops.vector_norm(x, ord=o), torch=lambda x=x, o=o: torch_vector_norm(x, o),
                    bytes=nbytes(x, out),
                )
        for t in lengths:
            keys = torch.randn(B, HKV, t, D, generator=g).to(dtype)
            values = torch.randn(B, HKV, t, D, generator=g).to(dtype)
            n = t // 4
            idx = torch.sort(torch.rand(B, HKV, t, generator=g).argsort(dim=-1)[..., :n], dim=-1).values
            yield dict(
                op="gather", case=f"T={t} n={n}", dtype=dn,
                c=lambda keys=keys, values=values, idx=idx: ops.gather(keys, values, idx),
                torch=lambda keys=keys, values=values, idx=idx: torch_gather(keys, values, idx),
                bytes=2 * 2 * n * D * keys.element_size() * B * HKV + nbytes(idx),
            )
    for t in lengths:
        s = torch.rand(B, HKV, t, generator=g)
        yield dict(
            op="pool1d", case=f"T={t} kernel=7 max", dtype="float32",
            c=lambda s=s: ops.pool1d(s, 7), torch=lambda s=s: torch_pool1d(s, 7), bytes=2 * nbytes(s),
        )
        k = t // 4
        yield dict(
            op="select_topk", case=f"T={t} k={k} sinks=4 window=32", dtype="float32",
            c=lambda s=s, k=k: ops.select_topk(s, k, sinks=4, window=WINDOW),
            torch=lambda s=s, k=k: torch_select_topk(s, k, 4, WINDOW),
            bytes=nbytes(s) + B * HKV * k * 8,
        )


# ----------------------------------------------------------------- report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}", help="comma-separated thread counts (both libraries)")
    ap.add_argument("--min-time", type=float, default=0.4, help="seconds per case and thread count (at least 5 reps)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    threads = sorted({int(x) for x in args.threads.split(",")})
    info = machine()
    bws = copy_references(threads)  # the copy on as many threads as the kernel it is set against
    records = []
    for nt in threads:
        torch.set_num_threads(nt)
        ops.set_num_threads(nt)
        for c in cases(args.quick):
            tc, tt, reps = time_pair(c["c"], c["torch"], args.min_time)
            rec = dict(
                op=c["op"], case=c["case"], dtype=c["dtype"], threads=nt, reps=reps, c_ms=tc * 1e3, torch_ms=tt * 1e3,
                ratio=tt / tc, bytes=c["bytes"], c_GBps=c["bytes"] / tc / 1e9, torch_GBps=c["bytes"] / tt / 1e9,
            )
            records.append(rec)
            print(
                f"{nt}t {rec['op']:<14}{rec['case']:<32}{rec['dtype']:<9} C {rec['c_ms']:9.3f} ms  torch {rec['torch_ms']:9.3f} ms"
                f"  x{rec['ratio']:6.2f}  C {rec['c_GBps']:6.2f} GB/s",
                flush=True,
            )
    command = command_line(__file__, argv)
    result = dict(command=command, date=now(), machine=info,
                  memcpy_GBps={nt: b / 1e9 for nt, b in bws.items()}, records=records)
    if args.no_write:
        return result
    lines = [
        f"## bench_ops ({result['date']})",
        "",
        f"Command: `{command}`",
        "",
        machine_line(info),
        copy_reference_line(bws),
        "Times are medians of interleaved reps; ratio = torch / C (> 1: C faster); "
        "GB/s = bytes the op must read + write / time.",
        "",
        "| threads | op | case | dtype | C ms | torch ms | torch/C | C GB/s | % of copy |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['threads']} | {r['op']} | {r['case']} | {r['dtype']} | {r['c_ms']:.3f} | {r['torch_ms']:.3f} | "
            f"{r['ratio']:.2f} | {r['c_GBps']:.2f} | {100 * r['c_GBps'] * 1e9 / bws[r['threads']]:.0f}% |"
        )
    write_results("bench_ops", result, lines)
    return result


if __name__ == "__main__":
    main()
