"""Do ``rotate="auto"`` and ``clip_values="auto"`` decide the same on a
sample of a long prompt's slots as on all of them?

For each of ``--prompts`` prompts of ``--tokens`` tokens (the packaged text
at spread offsets) it captures every full-attention layer's queries, keys
and values, and runs both per-layer tests (``packing_divergences``,
``value_clip_errors``) on what a layer's first pack takes (all but the
``--residual`` newest slots, whole groups of 32, at ``--bits``) with the
newest 32 queries: once on every slot, then on samples of whole groups of at
most ``--cap`` slots (evenly spaced groups; the newest groups). It prints how
often each sample's decision agrees with the full test's, the largest
relative margin of a disagreement, and the time of both::

    python benchmarks/diag_auto_subsample.py --model smollm2 --tokens 8192 --prompts 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from kvcompress import ops
from kvcompress import testing as T
from kvcompress.model import load_model
from kvcompress.stores.rotation import key_rotation, packing_divergences
from kvcompress.stores.value_clip import output_projection, value_clip_errors

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diag_rotation_layers import _capture  # noqa: E402  (same folder)


def _samples(m: int, group: int, cap: int) -> dict[str, torch.Tensor]:
    """Slot indices of each sample of the ``m`` slots (whole groups)."""
    groups = m // group
    keep = max(1, cap // group)
    if groups <= keep:
        return {}
    spread = torch.linspace(0, groups - 1, keep).round().long().unique()
    newest = torch.arange(groups - keep, groups)

    def slots(g):
        return (g[:, None] * group + torch.arange(group)[None, :]).reshape(-1)

    return {"spread": slots(spread), "newest": slots(newest)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--cap", type=int, default=2048)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ops.set_num_threads(1)
    model, tok = load_model(args.model)
    text = T.default_text()
    G = 32
    stats: dict[tuple[str, str], list] = {}
    times: dict[str, list[float]] = {}
    for p in range(args.prompts):
        offset = p * (len(text) - args.tokens * 6) // max(1, args.prompts - 1) if args.prompts > 1 else 0
        ids = tok(text[offset:], return_tensors="pt").input_ids[:, : args.tokens]
        attn = [layer.self_attn for layer in model.model.layers]
        for idx, (q, k, v, window, scaling) in sorted(_capture(model, ids).items()):
            if window is not None:
                continue
            n = int(k.shape[2])
            m = (n - args.residual) // G * G
            qs = q[:, :, -32:]
            rot = key_rotation(int(k.shape[-1]), k.device)
            w = output_projection(attn[idx])
            cases = {"all": torch.arange(m), **_samples(m, G, args.cap)}
            decided = {}
            for name, sl in cases.items():
                ks, vs = k[:, :, sl].contiguous(), v[:, :, sl].contiguous()
                t0 = time.perf_counter()
                rp, rr = packing_divergences(qs, ks, rot, args.bits, G, scaling)
                t1 = time.perf_counter()
                cp, cc = value_clip_errors(qs, ks, vs, args.bits, G, scaling, w)
                t2 = time.perf_counter()
                times.setdefault(name, []).extend([t1 - t0, t2 - t1])
                decided[name] = ((rr < rp, (rr - rp) / rp), (cc < cp, (cc - cp) / cp))
            for name in cases:
                if name == "all":
                    continue
                for t, test in enumerate(("rotate", "clip")):
                    full, margin = decided["all"][t]
                    stats.setdefault((name, test), []).append((decided[name][t][0] == full, abs(margin)))
            print(f"prompt {p} layer {idx:2d} m={m}: rotate {decided['all'][0][1]:+.3f} "
                  + " ".join(f"{k_}:{d[0][1]:+.3f}" for k_, d in decided.items() if k_ != "all")
                  + f" | clip {decided['all'][1][1]:+.3f} "
                  + " ".join(f"{k_}:{d[1][1]:+.3f}" for k_, d in decided.items() if k_ != "all"), flush=True)
    print()
    for (name, test), xs in sorted(stats.items()):
        agree = sum(a for a, _ in xs)
        worst = max((mg for a, mg in xs if not a), default=0.0)
        print(f"{name:7s} {test:6s}: agrees {agree}/{len(xs)}, largest full-test margin of a disagreement {worst:.3f}")
    for name, ts in times.items():
        print(f"time {name}: {sum(ts) / len(ts) * 1e3:.1f} ms per test")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
