"""Compression overhead at prefill: SnapKV on a long prompt vs plain prefill.

Runs the default model's forward on an N-token prompt with the ordinary SDPA
attention and DynamicCache, and with ``kvcompress.compress(model,
SnapKV(ratio=0.5))``, interleaved, and reports median times, the overhead
ratio, and the time spent inside the cache's compression step (scores,
selection, gather) measured directly in the same runs.

    python benchmarks/bench_prefill.py --tokens 4096 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import kvcompress as kvc
from kvcompress.cache import CompressedLayer
from kvcompress.compat import cache_kwargs

from _common import machine  # noqa: E402  (same folder: scripts run from it)

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--out", default=str(HERE / "results" / "bench_prefill.json"))
    args = parser.parse_args()

    info = machine()
    model, _ = kvc.load_default_model()
    ids = torch.randint(100, 40000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    method = kvc.SnapKV(ratio=args.ratio)
    spent = []
    original = CompressedLayer.after_attention

    def timed(self, *a, **kw):
        t0 = time.perf_counter()
        original(self, *a, **kw)
        spent[-1] += time.perf_counter() - t0

    CompressedLayer.after_attention = timed
    plain, ours = [], []
    with torch.no_grad():
        model(ids[:, :256])  # warm-up
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model(ids)
            plain.append(time.perf_counter() - t0)
            with kvc.compress(model, method) as session:
                spent.append(0.0)
                t0 = time.perf_counter()
                model(ids, **cache_kwargs(model, session.new_cache()))
                ours.append(time.perf_counter() - t0)
    CompressedLayer.after_attention = original
    p, o, c = statistics.median(plain), statistics.median(ours), statistics.median(spent)
    result = {
        "tokens": args.tokens, "method": method.describe(), "repeats": args.repeats,
        "prefill_plain_s": p, "prefill_snapkv_s": o, "overhead": o / p - 1.0,
        "compression_s": c, "compression_fraction": c / p, "runs_plain": plain, "runs_snapkv": ours,
        "machine": info,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    table = "\n".join([
        "| prompt tokens | plain prefill s | SnapKV prefill s | end-to-end overhead | compression step s | step / plain prefill |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {args.tokens} | {p:.2f} | {o:.2f} | {100 * (o / p - 1):+.1f}% | {c:.3f} | {100 * c / p:.2f}% |",
    ])
    print(table)
    command = f"python benchmarks/bench_prefill.py --tokens {args.tokens} --repeats {args.repeats}"
    with open(HERE / "RESULTS.md", "a") as f:
        f.write(
            f"## bench_prefill ({time.strftime('%Y-%m-%dT%H:%M:%S')})\n\nCommand: `{command}`\n\n"
            f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}; default model "
            f"(SmolLM2-135M, fp32), {method.describe()}, medians of {args.repeats} interleaved runs.\n\n"
            f"{table}\n\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
