"""Median decode ms per step of one left-padded batch under one method: a
whole process per measurement, so that two builds can be timed in turn
(the other build on ``PYTHONPATH``, with its own compiled extension)::

    git worktree add /tmp/base 5965d2d && (cd /tmp/base && python setup.py build_ext --inplace)
    for i in 1 2 3; do
        python benchmarks/time_padded_steps.py "ems+kivi:bits=2:sinks=4@256"
        (cd /tmp && PYTHONPATH=/tmp/base python /path/to/benchmarks/time_padded_steps.py "ems+kivi:bits=2:sinks=4@256")
    done

The default model (SmolLM2-135M, fp32; ``--model gemma3``: Gemma 3 270M),
rows cut from the packaged text (``--lengths``, left-padded), 64 greedy
tokens; prints the median time between consecutive calls of a logits
processor (one decode forward each). ``SPEC@N`` runs at budget N,
``SPEC@0.N`` at ratio 0.N. ``--alone`` also generates every row on its own
and prints, per row, the first step where the batch's tokens differ from
alone's (None: none)::

    python benchmarks/time_padded_steps.py "snapkv@0.5" --model gemma3 --lengths 700,450,600,300 --alone
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import LogitsProcessorList

import kvcompress as kvc
from kvcompress.methods import method_from_spec

from _common import step_clock  # noqa: E402  (same folder: scripts run from it)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec", help="a method spec, SPEC@N for budget N")
    ap.add_argument("--lengths", default="1024,700,900,250", help="comma-separated prompt lengths of the rows")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--model", default=None, help="a packaged model: smollm2 (the default) or gemma3")
    ap.add_argument("--alone", action="store_true", help="also each row alone: where its tokens first differ")
    args = ap.parse_args()
    spec, at, size = args.spec.partition("@")
    lengths = [int(x) for x in args.lengths.split(",")]
    model, tok = kvc.load_model(args.model) if args.model else kvc.load_default_model()
    tok.padding_side = "left"

    def method():
        if at and "." in size:
            return method_from_spec(spec, ratio=float(size))
        return method_from_spec(spec, budget=int(size) if at else None)

    text = (Path(kvc.__file__).resolve().parent / "data" / "shakespeare.txt").read_text()
    ids_all = tok(text[:200_000], return_tensors="pt").input_ids[0]
    rows = [ids_all[1000 * i : 1000 * i + n] for i, n in enumerate(lengths)]
    # the tokenizer pads (load_default_model sets padding_side="left"): no kvcompress helper, so that an
    # older build on PYTHONPATH runs this too
    batch = tok.pad({"input_ids": [r.tolist() for r in rows]}, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pad = tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id
    clock = step_clock()
    with kvc.compress(model, method()):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                             min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=pad,
                             logits_processor=LogitsProcessorList([clock]))
    steps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    print(f"{statistics.median(steps) * 1000:.2f}")
    if args.alone:
        firsts = []
        for i, r in enumerate(rows):
            with kvc.compress(model, method()):
                one = model.generate(input_ids=r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long),
                                     max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                     do_sample=False, pad_token_id=pad)
            diff = (out[i, ids.shape[1]:] != one[0, len(r):]).nonzero()
            firsts.append(int(diff[0]) if len(diff) else None)
        print(f"rows as alone {sum(f is None for f in firsts)}/{len(rows)}, first differences {firsts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
