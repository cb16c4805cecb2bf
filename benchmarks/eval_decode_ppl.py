"""Perplexity of a continuation read one token at a time after a short prompt.

``kvcompress eval``'s perplexity prefills 1,024 tokens and reads the
continuation in one chunk, so a quantizer packs at prefill only. A chat turn
is the other shape: a short prompt, then a long generation during which the
cache fills and the quantizer packs as it decodes. This benchmark scores that
shape: for each of ``--windows`` seeded windows of ``--text`` it prefills
``--context`` tokens, then feeds the next ``--tokens`` tokens one decode step
at a time (teacher forcing, ``testing.greedy(force=...)``) and scores each
step's logits on the true next token, from the second token on as
``kvcompress eval`` does (the first is predicted by the prefill, from the
full context). The windows are ``kvcompress eval``'s for the same
``--context``, ``--tokens``, ``--windows`` and ``--seed``, so at its defaults
(1,024 and 128) the two differ only in reading the continuation one step
at a time rather than in one chunk. Every method gets the same windows.
Prints perplexity with a 95% bootstrap interval over windows, the change
against the full cache, the paired change in NLL per token against the
``--ref`` method (windows resampled; how many windows are lower), and with
``--json`` writes the per-window NLLs; ``--table FILE`` prints the tables of
a written JSON again (with its own or another ``--ref``)::

    python benchmarks/eval_decode_ppl.py --methods kivi:bits=2,kivi:bits=2:rotate=auto \\
        --context 64 --tokens 512 --windows 8 --json benchmarks/results/decode_ppl.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from kvcompress import ops
from kvcompress import testing as T
from kvcompress.intervals import bootstrap, paired
from kvcompress.methods import method_from_spec
from kvcompress.model import load_model


def window_nll(model, method, ids, context: int) -> tuple[float, int]:
    """Summed NLL (nats) and count of the continuation tokens ``2..L`` of
    ``ids`` ``[1, C + L]`` (``C = context``), read one token per decode step
    after prefilling the first ``C``; token 1, predicted by the prefill, is
    not scored (as ``testing.perplexity_window``)."""
    target = ids[0, context:].tolist()
    L = len(target)
    with T.method_context(model, method) as new:
        _, logits = T.greedy(model, new(), ids[:, :context], L, force=target[:-1], keep_logits=True)
    logp = torch.log_softmax(logits[1:].double(), -1)
    return float(-logp.gather(-1, torch.tensor(target[1:])[:, None]).sum()), L - 1


def print_table(result: dict, ref: str | None) -> None:
    """The Markdown table of a run (``result`` as ``--json`` writes it)."""
    rows = result["rows"]
    if ref is not None and ref not in rows:
        raise SystemExit(f"--ref: {ref!r} is not a method of this run ({', '.join(rows)})")
    full = rows["full cache"]["nll_per_token"]
    full_mean = sum(full) / len(full)
    print(f"{result['model']}: {result['windows']} windows, {result['context']}-token prompt, next "
          f"{result['tokens']} tokens read one step at a time (tokens 2.. scored)\n")
    head = "| method | ppl (95% interval) | vs full |" + (f" NLL/token vs {ref} (95% interval), lower |" if ref else "")
    print(head + "\n|---|---:|---:|" + ("---|" if ref else ""))
    for name, row in rows.items():
        v = row["nll_per_token"]
        mean = sum(v) / len(v)
        lo, hi = bootstrap(v) if len(v) > 1 else (mean, mean)
        change = "–" if name == "full cache" else f"{100 * (math.exp(mean - full_mean) - 1):+.1f}%"
        line = f"| {name} | {math.exp(mean):.3f} ({math.exp(lo):.3f}–{math.exp(hi):.3f}) | {change} |"
        if ref:
            if name == ref:
                line += " – |"
            else:
                d = paired(v, rows[ref]["nll_per_token"])
                line += f" {d['mean']:+.4f} ({d['low']:+.4f}..{d['high']:+.4f}), {d['lower']}/{d['n']} |"
        print(line)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="a packaged model (smollm2, gemma3) or a model folder")
    ap.add_argument("--methods", default=None, help="comma-separated method specs (as kvcompress eval)")
    ap.add_argument("--context", type=int, default=64, help="prompt tokens per window (default 64)")
    ap.add_argument("--tokens", type=int, default=512, help="tokens read one step at a time (default 512)")
    ap.add_argument("--windows", type=int, default=8, help="windows of the text (default 8)")
    ap.add_argument("--text", default=None, help="text file (default: the packaged Shakespeare excerpt)")
    ap.add_argument("--seed", type=int, default=0, help="window offsets' seed (default 0)")
    ap.add_argument("--threads", type=int, default=None, help="torch and kvcompress threads (default: torch's)")
    ap.add_argument("--json", default=None, help="write the per-window NLLs here")
    ap.add_argument("--ref", default=None, help="a method of --methods: paired change of the others against it")
    ap.add_argument("--table", default=None, help="print the tables of this --json file and exit")
    args = ap.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            result = json.load(f)
        print_table(result, args.ref or result.get("ref"))
        return 0
    if not args.methods:
        ap.error("--methods: required (unless --table)")
    if args.context < 1 or args.tokens < 3 or args.windows < 1:
        ap.error("--context, --tokens, --windows: need >= 1, >= 3, >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
        ops.set_num_threads(args.threads)
    specs = [s for s in args.methods.split(",") if s]
    if args.ref is not None and args.ref not in specs:
        ap.error(f"--ref: {args.ref!r} is not one of --methods")
    methods = [method_from_spec(s) for s in specs]  # bad specs fail before the model loads
    text = None
    if args.text is not None:
        try:
            text = Path(args.text).read_text(encoding="utf-8")
        except OSError as e:
            ap.error(f"--text: cannot read {args.text}: {e}")
    model, tok = load_model(args.model)
    windows = T.perplexity_windows(tok, text, context_tokens=args.context, continuation_tokens=args.tokens,
                                   windows=args.windows, seed=args.seed)
    rows = {}
    for name, method in [("full cache", None)] + list(zip(specs, methods)):
        t0 = time.perf_counter()
        nll = [window_nll(model, method, ids, args.context) for ids in windows]
        per_token = [s / n for s, n in nll]
        rows[name] = {"nll_per_token": per_token, "seconds": time.perf_counter() - t0}
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    result = {"model": args.model, "context": args.context, "tokens": args.tokens, "windows": args.windows,
              "seed": args.seed, "ref": args.ref, "command": "python " + " ".join(sys.argv), "rows": rows}
    print()
    print_table(result, args.ref)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
