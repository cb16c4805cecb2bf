"""Median decode ms per step of one left-padded batch under one method: a
whole process per measurement, so that two builds can be timed in turn
(the other build on ``PYTHONPATH``, with its own compiled extension)::

    git worktree add /tmp/base 5965d2d && (cd /tmp/base && python setup.py build_ext --inplace)
    for i in 1 2 3; do
        python benchmarks/time_padded_steps.py "ems+kivi:bits=2:sinks=4@256"
        (cd /tmp && PYTHONPATH=/tmp/base python /path/to/benchmarks/time_padded_steps.py "ems+kivi:bits=2:sinks=4@256")
    done

The default model (SmolLM2-135M, fp32), rows cut from the packaged text
(``--lengths``, left-padded), 64 greedy tokens; prints the median time
between consecutive calls of a logits processor (one decode forward each).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from transformers import LogitsProcessorList

import kvcompress as kvc
from kvcompress.methods import method_from_spec

from _common import step_clock  # noqa: E402  (same folder: scripts run from it)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec", help="a method spec, SPEC@N for budget N")
    ap.add_argument("--lengths", default="1024,700,900,250", help="comma-separated prompt lengths of the rows")
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    spec, at, budget = args.spec.partition("@")
    lengths = [int(x) for x in args.lengths.split(",")]
    model, tok = kvc.load_default_model()
    text = (Path(kvc.__file__).resolve().parent / "data" / "shakespeare.txt").read_text()
    ids_all = tok(text[:200_000], return_tensors="pt").input_ids[0]
    rows = [ids_all[1000 * i : 1000 * i + n] for i, n in enumerate(lengths)]
    # the tokenizer pads (load_default_model sets padding_side="left"): no kvcompress helper, so that an
    # older build on PYTHONPATH runs this too
    batch = tok.pad({"input_ids": [r.tolist() for r in rows]}, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    clock = step_clock()
    with kvc.compress(model, method_from_spec(spec, budget=int(budget) if at else None)):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                       min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.eos_token_id,
                       logits_processor=LogitsProcessorList([clock]))
    steps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    print(f"{statistics.median(steps) * 1000:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
