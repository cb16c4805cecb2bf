"""A left-padded batch's prefill: each row's attention over its own slots
(``stores.masked.rows_attention``, as the row runs alone) against one SDPA
call over the padded batch (what the cache did before), paired in one run.

For each mode: the forward's median time over interleaved repeats, and how
far each row's cached keys and values are from the row's prefill alone
(0: bit for bit). The default model (SmolLM2-135M, fp32) under SnapKV with a
budget above every prompt, so the cache holds every slot and the prefill's
attention is all that differs::

    python benchmarks/bench_padded_prefill.py --lengths 1024,700,900,520 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import kvcompress as kvc
from kvcompress.compat import cache_kwargs
from kvcompress.stores import masked, uniform
from kvcompress.testing import left_pad

from _common import machine  # noqa: E402  (same folder: scripts run from it)

HERE = Path(__file__).resolve().parent


def one_call(query, key, value, spec, kv_start, window=None, key_pos=None, query_pos=None):
    """The padded batch in one SDPA call (the cache's prefill before rows_attention)."""
    B, _, q, _ = query.shape
    mask = masked.build_mask(B, q, int(key.shape[2]), query.device, kv_start=kv_start, window=window,
                             key_pos=key_pos, query_pos=query_pos)
    return masked.masked_attention(query, key, value, spec, mask)


def prefill(model, ids, mask, method):
    """``(seconds, per layer (keys, values) [B, H, n, D])`` of one forward under ``method``."""
    with kvc.compress(model, method) as session:
        cache = session.new_cache()
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=pos, **cache_kwargs(model, cache))
        dt = time.perf_counter() - t0
    return dt, [(layer.keys, layer.values) for layer in cache.layers]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="1024,700,900,520", help="comma-separated prompt lengths of the rows")
    ap.add_argument("--repeats", type=int, default=5, help="timed pairs (interleaved)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    info = machine()
    model, _ = kvc.load_default_model()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(100, 40000, (n,), generator=g) for n in lengths]
    ids, mask = left_pad(rows)
    T = max(lengths)
    method = kvc.SnapKV(budget=T + 64)
    modes = {"each row": uniform.rows_attention, "one call": one_call}
    times = {m: [] for m in modes}
    held = {}
    prefill(model, ids[:, -64:], mask[:, -64:], method)  # warm-up
    try:
        for _ in range(args.repeats):
            for name, fn in modes.items():
                uniform.rows_attention = fn
                dt, kv = prefill(model, ids, mask, method)
                times[name].append(dt)
                held[name] = kv
    finally:
        uniform.rows_attention = modes["each row"]
    alone = [prefill(model, r[None], torch.ones(1, len(r), dtype=torch.long), method)[1] for r in rows]
    lines = ["| mode | prefill s (median) | vs one call | largest distance of a row's keys and values from alone |",
             "|---|---:|---:|---:|"]
    base = statistics.median(times["one call"])
    for name in modes:
        far = 0.0
        for b, n in enumerate(lengths):
            for (k, v), (ka, va) in zip(held[name], alone[b]):
                far = max(far, float((k[b, :, T - n:] - ka[0]).abs().max()),
                          float((v[b, :, T - n:] - va[0]).abs().max()))
        med = statistics.median(times[name])
        lines.append(f"| {name} | {med:.3f} | {med / base:.2f}x | {far:.2g} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        command = f"python benchmarks/bench_padded_prefill.py --lengths {args.lengths} --repeats {args.repeats}"
        with open(HERE / "RESULTS.md", "a") as f:
            f.write(f"## bench_padded_prefill ({time.strftime('%Y-%m-%dT%H:%M:%S')})\n\nCommand: `{command}`\n\n"
                    f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}; default model "
                    f"(SmolLM2-135M, fp32), {method.describe()}, rows {args.lengths} left-padded, medians of "
                    f"{args.repeats} interleaved runs.\n\n{table}\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
