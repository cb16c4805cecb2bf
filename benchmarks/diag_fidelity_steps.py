"""Where a KL@k difference between two methods comes from, step by step.

``kvcompress eval --tasks fidelity`` reports each method's KL@k as the mean
over passages of the mean over k teacher-forced decode steps. This script
runs the same passages (``testing.sample_passages`` with the eval's seed and
sizes, the full cache's greedy continuation as the reference) and keeps the
KL of every step, then, for each method against the first (``--ref``):

* the mean difference, and the share of it carried by the steps that
  differ most in its direction (sorted, cumulative);
* on how many steps the method is lower, and the median step KL of each;
* for those steps, the passage, the step, the token the full cache
  predicts there (with its probability) and the text just before it.

    python benchmarks/diag_fidelity_steps.py --text /usr/share/common-licenses/GPL-3 \\
        --methods ems,tova,adakv --budget 64 [--passages 8] [--json out.json]
    python benchmarks/diag_fidelity_steps.py ... --from-json out.json   # tables again, methods not re-run

A diagnosis, not a score: it reads the same passages the eval reads, so it
must not be used to choose a method's settings on a held-out text.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", required=True, help="text file the passages are cut from")
    ap.add_argument("--methods", required=True, help="comma-separated method specs; the first is the reference")
    ap.add_argument("--budget", type=int, default=64, help="slots per kv head (default 64)")
    ap.add_argument("--passages", type=int, default=8, help="passages, as the eval's --fidelity-texts (default 8)")
    ap.add_argument("--context", type=int, default=1024, help="context tokens (default 1024)")
    ap.add_argument("-k", type=int, default=16, help="decode steps compared (default 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top", type=int, default=8, help="largest differences listed per method (default 8)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the per-step KL here")
    ap.add_argument("--from-json", help="per-step KL written by --json: only the references are re-run")
    args = ap.parse_args(argv)
    if len(args.methods.split(",")) < 2:
        ap.error("--methods: need a reference and at least one other method")
    return args


def main(argv=None):
    args = parse_args(argv)
    import torch

    import kvcompress as kvc
    from kvcompress import ops, testing
    from kvcompress.methods import method_from_spec

    torch.set_num_threads(args.threads)
    ops.set_num_threads(args.threads)
    text = Path(args.text).read_text()
    specs = args.methods.split(",")
    methods = [method_from_spec(s, budget=args.budget) for s in specs]  # bad specs fail before the model loads
    model, tok = kvc.load_default_model()
    passages = testing.sample_passages(text, args.passages, args.context * 8, seed=args.seed)
    steps, refs = {}, []
    with torch.inference_mode():
        for p in passages:
            refs.append(testing.fidelity_reference(model, tok, p, context_tokens=args.context, k=args.k))
        saved = json.loads(Path(args.from_json).read_text())["steps"] if args.from_json else {}
        for spec, m in zip(specs, methods):
            if spec in saved:
                steps[spec] = saved[spec]
            else:
                steps[spec] = [[float(x) for x in testing.fidelity_case(model, m, r)[0]] for r in refs]
            flat = [x for row in steps[spec] for x in row]
            print(f"{spec}: KL@{args.k} {sum(flat) / len(flat):.4f}", file=sys.stderr, flush=True)

    ref = specs[0]
    base = [x for row in steps[ref] for x in row]
    print(f"Per-step KL@{args.k}, budget {args.budget}, {args.passages} passages of {args.text}; "
          f"differences are method − {ref}.\n")
    print("| method | KL@k | median step | − ref | steps lower | share of the difference in the top 1 / 3 / 5 / 10 steps |")
    print("|---|---:|---:|---:|---:|---|")
    events = {}
    for spec in specs:
        flat = [x for row in steps[spec] for x in row]
        mean = sum(flat) / len(flat)
        if spec == ref:
            print(f"| {spec} | {mean:.3f} | {statistics.median(flat):.3f} | – | – | – |")
            continue
        diff = [(b - x, i) for i, (b, x) in enumerate(zip(base, flat))]
        total = sum(d for d, _ in diff)
        # the steps that differ most in the direction of the mean difference first
        diff.sort(key=lambda e: e[0] if total >= 0 else -e[0], reverse=True)
        shares = []
        for n in (1, 3, 5, 10):
            shares.append(f"{sum(d for d, _ in diff[:n]) / total:.2f}" if total else "–")
        lower = sum(1 for d, _ in diff if d > 0)
        print(f"| {spec} | {mean:.3f} | {statistics.median(flat):.3f} | {-total / len(flat):+.3f} | "
              f"{lower} of {len(flat)} | {' / '.join(shares)} |")
        events[spec] = diff[: args.top]

    for spec, top in events.items():
        print(f"\nLargest differences in the direction of the mean, {ref} − {spec} (passage, step: the full "
              f"cache's next token, its probability, the text before it):\n")
        for d, i in top:
            p, s = divmod(i, args.k)
            r = refs[p]
            toks = [int(t) for t in torch.as_tensor(r.tokens).reshape(-1).tolist()]
            prob = torch.softmax(r.logits[1 + s].float(), -1).max().item()
            before = tok.decode((r.ids[0].tolist() + toks[: 1 + s])[-12:])
            print(f"- passage {p}, step {s}: {d:+.2f} nats ({ref} {steps[ref][p][s]:.2f}, {spec} "
                  f"{steps[spec][p][s]:.2f}): {tok.decode([toks[1 + s]])!r} (p = {prob:.2f}) after "
                  f"{before!r}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(config=vars(args), steps=steps), indent=1))


if __name__ == "__main__":
    main()
