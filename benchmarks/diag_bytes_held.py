"""What a compressed cache holds beyond its kept tokens, in token-equivalents.

Runs each method at one ratio on the first held-out single-needle case of
the suite (default model, chat template), generates a short greedy answer,
and prints the live slots per head (mean over layers) next to
``cache.memory_bytes()`` divided by one token's K and V over all layers
(``stats().full_bytes / seen``). The difference is decode room, held queries
and per-slot columns (benchmarks/RESULTS.md, "Decode room under ratio=").
The first column is the same measure right after the prefill (a run with one
new token): the full prompt for ``lookahead=True`` methods, which compress
only after the first decode step.

    python benchmarks/diag_bytes_held.py tova snapkv ems adakv streamingllm h2o
"""

from __future__ import annotations

import argparse

import torch

import kvcompress as kvc
from kvcompress import ruler
from kvcompress.methods import method_from_spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("methods", nargs="+", help="method specs, e.g. snapkv or ems:tau=0.8")
    ap.add_argument("--ratio", type=float, default=0.9, help="compression ratio (default 0.9)")
    ap.add_argument("--new-tokens", type=int, default=12, help="greedy answer length (default 12)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = kvc.load_default_model()
    case = ruler.make_case("niah_single", 1000, tok, split="heldout", index=0)
    ids = torch.tensor([ruler.render(case, tok, chat=True).chunks[0]])
    print(f"prompt {ids.shape[1]} tokens, ratio {args.ratio}, {args.new_tokens} new tokens")
    print(f"{'method':28s} {'after prefill':>13s} {'live/head':>9s} {'held (token-eq)':>15s}")
    for spec in args.methods:
        held = []
        for new in (1, args.new_tokens):
            with kvc.compress(model, method_from_spec(spec, ratio=args.ratio)) as session, torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)
            cache = session.cache
            per_token = cache.stats().full_bytes / cache.layers[0].seen
            held.append(cache.memory_bytes() / per_token)
        live = sum(sum(L.head_lengths()) / len(L.head_lengths()) for L in cache.layers) / len(cache.layers)
        print(f"{spec:28s} {held[0]:13.1f} {live:9.1f} {held[1]:15.1f}", flush=True)


if __name__ == "__main__":
    main()
