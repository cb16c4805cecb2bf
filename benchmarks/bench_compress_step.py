"""Compression-step cost per method, against SnapKV's, measured in the same run.

Prefills the default model on an N-token prompt once per method and repeat,
methods interleaved, and times what every layer spends in its compression
step (``CompressedLayer.after_attention``: scores, selection, gather or
merge, and the method's per-slot state; for per-layer budgets also the
statistics gathered as each layer attends) inside those runs. Head-profiled
methods (HeadKV, RazorAttention) are profiled once before timing; the
profile is a one-off cost per model, reported apart.

    python benchmarks/bench_compress_step.py --tokens 2048 --repeats 3 \\
        --methods snapkv,ems,h2o,adakv,headkv,keyformer,lagkv,razorattention
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import kvcompress as kvc
from kvcompress.cache import CompressedLayer, KVCache
from kvcompress.compat import cache_kwargs
from kvcompress.methods import method_from_spec

from _common import machine  # noqa: E402  (same folder: scripts run from it)

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--methods", default="snapkv,ems,h2o,adakv,headkv,keyformer,lagkv,razorattention")
    parser.add_argument("--out", default=str(HERE / "results" / "bench_compress_step.json"))
    args = parser.parse_args()
    specs = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "snapkv" not in specs:
        specs.insert(0, "snapkv")  # the reference every ratio is taken against

    info = machine()
    model, _ = kvc.load_default_model()
    ids = torch.randint(100, 40000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    methods, profile_s = {}, {}
    for spec in specs:
        t0 = time.perf_counter()
        methods[spec] = method_from_spec(spec, ratio=args.ratio).prepare(model)
        profile_s[spec] = time.perf_counter() - t0
    spent = {spec: [] for spec in specs}
    prefill = {spec: [] for spec in specs}
    # Per-layer budgets (DynamicKV, SqueezeAttention) also score every layer
    # when it attends (KVCache._defer_prefill) and read its hidden states
    # (observe_hidden) before the last layer compresses them all; those
    # count too. The last layer's _defer_prefill runs every layer's
    # after_attention inside it: only the outermost timed call adds.
    hooks = [(CompressedLayer, "after_attention"), (KVCache, "_defer_prefill"), (KVCache, "observe_hidden")]
    originals = [(cls, name, getattr(cls, name)) for cls, name in hooks]
    clock = [0.0]
    depth = [0]

    def timer(fn):
        def timed(self, *a, **kw):
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return fn(self, *a, **kw)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    clock[0] += time.perf_counter() - t0
        return timed

    for cls, name, fn in originals:
        setattr(cls, name, timer(fn))
    try:
        with torch.no_grad():
            model(ids[:, :256])  # warm-up
            for _ in range(args.repeats):
                for spec in specs:
                    with kvc.compress(model, methods[spec]) as session:
                        clock[0] = 0.0
                        t0 = time.perf_counter()
                        model(ids, **cache_kwargs(model, session.new_cache()))
                        prefill[spec].append(time.perf_counter() - t0)
                        spent[spec].append(clock[0])
    finally:
        for cls, name, fn in originals:
            setattr(cls, name, fn)
    ref = statistics.median(spent["snapkv"])
    rows = []
    for spec in specs:
        c, p = statistics.median(spent[spec]), statistics.median(prefill[spec])
        rows.append(dict(method=spec, describe=methods[spec].describe(), compression_s=c, vs_snapkv=c / ref,
                         prefill_s=p, step_fraction=c / p, prepare_s=profile_s[spec], runs=spent[spec]))
    result = dict(tokens=args.tokens, ratio=args.ratio, repeats=args.repeats, rows=rows, machine=info)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    lines = ["| method | compression step s | vs SnapKV | step / prefill | one-off prepare s |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['compression_s']:.3f} | {r['vs_snapkv']:.2f}x | "
                     f"{100 * r['step_fraction']:.1f}% | {r['prepare_s']:.1f} |")
    table = "\n".join(lines)
    print(table)
    command = (f"python benchmarks/bench_compress_step.py --tokens {args.tokens} --repeats {args.repeats} "
               f"--ratio {args.ratio} --methods {','.join(specs)}")
    with open(HERE / "RESULTS.md", "a") as f:
        f.write(
            f"## bench_compress_step ({time.strftime('%Y-%m-%dT%H:%M:%S')})\n\nCommand: `{command}`\n\n"
            f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}; default model "
            f"(SmolLM2-135M, fp32), ratio {args.ratio}, medians of {args.repeats} interleaved prefills per "
            f"method; 'prepare' is the one-off head profile where a method needs one.\n\n{table}\n\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
