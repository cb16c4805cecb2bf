"""A left-padded batch under a uniform packed layer (full-attention and, on
the CPU, sliding-window layers): each row on its own schedule, with its own
once-only choices (row mode, ``PackedStore.rows_apart``), against every row
on the batch's shared one, paired in the same run. Behind a per-head
evictor that packs once (``ems:interval=0+kivi:...``), "apart" also lets a
row that fits its budget pack on its own schedule as alone
(``RaggedPackedStore.from_ragged(whole_rows=...)``), "shared" packs it
with the compressed rows at once; behind one with rounds (``ems+kivi``),
"apart" keeps each row's own residual and sink block, lays each row's
``keep_rows`` round out alone (``from_ragged(rows_apart=True)``,
``arrange_rows``) and packs a row no compression has touched as a uniform
layer of it alone (``whole_rows``), and a round leaves the rows that are
not due bit for bit as they were (``row_layout``, ``adopt_rows``), "shared"
one residual length, sink block and layout for the batch, every row packed
again at every round. Behind a uniform evictor with rounds
(``snapkv+kivi``, ``h2o+kivi``), "apart" packs each row on its own schedule
from the first pack, a round leaves the rows that are not due bit for bit
as they were (``PackedStore.adopt_rows``) and slot state accumulates each
row's queries at its own rounds; "shared" one schedule for the batch, every
row packed again at every round. The evictor's own per-row schedule (each
row re-compressed once its own heads are over) holds in both modes.

For each mode the script generates greedily from one batch of prompts of
different lengths (cut from the same text at different offsets, left-padded)
and reports:

- decode ms per step of the batch: the time between consecutive calls of a
  logits processor (one decode forward each), median over every step of
  every repeat, the two modes' runs interleaved;
- prefill ms: from the call of ``generate()`` to the first logits processor
  call (the prompt's forward, where each layer makes its once-only choices
  for the rows that pack at once), median over the repeats;
- how many rows generate exactly what they generate alone (each row run on
  its own once, in row mode; a row alone has no padding, so both modes give
  it the same tokens), and the first step where each row differs.

Run (about 4 minutes on 2 cores)::

    python benchmarks/bench_padded_batch.py --methods kivi:bits=2,kivi:bits=4 --repeats 4
    python benchmarks/bench_padded_batch.py --lengths 1024,700,900,300 \
        --methods "ems:interval=0+kivi:bits=2@512,adakv:interval=0+kivi:bits=4@512"
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LogitsProcessorList

import kvcompress as kvc
from kvcompress import ops
import kvcompress.cache as cache_module
from kvcompress.cache import CompressedLayer
from kvcompress.stores import RaggedPackedStore
from kvcompress.stores.keep_rows import arrange
from kvcompress.methods import method_from_spec
from kvcompress.model import load_model
from kvcompress.testing import left_pad

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import command_line, machine, machine_line, now, step_clock, write_results  # noqa: E402  (same folder)

DEFAULT_TEXT = str(Path(kvc.__file__).resolve().parent / "data" / "shakespeare.txt")
SHARED = CompressedLayer._rows_apart
SHARED_WHOLE = CompressedLayer._whole_rows
FROM_RAGGED = RaggedPackedStore.from_ragged.__func__
ARRANGE_ROWS = cache_module.arrange_rows
UNTOUCHED = CompressedLayer._untouched_layout


def _one_residual(cls, *args, **kwargs):
    kwargs["rows_apart"] = False  # behind rounds, one residual length for the batch, as before
    if kwargs.get("columns"):
        kwargs["whole_rows"] = None  # and a row no compression has touched packed with the others
    return FROM_RAGGED(cls, *args, **kwargs)


def _one_layout(old, kept, min_live, rows=None, *, backend=None, only=None):
    return arrange(old, kept, min_live, rows, backend=backend)  # one keep_rows layout for the batch, as before


def _packed_again(self, old):
    return None  # a round packs every row again from its dequantized slots, as before (no adopt_rows)


def _shared_schedule(self) -> bool:
    return False  # every row packs on the batch's schedule, as before row mode


def _no_whole_rows(self):
    return None  # a row kept whole is packed with the compressed rows at once, as before


def generate(model, ids, mask, method, n: int, apart: bool):
    """Greedy ``generate()`` of exactly ``n`` tokens; returns ``(decode step
    seconds [n - 1], new tokens [B, n], prefill seconds)``."""
    CompressedLayer._rows_apart = SHARED if apart else _shared_schedule
    CompressedLayer._whole_rows = SHARED_WHOLE if apart else _no_whole_rows
    RaggedPackedStore.from_ragged = classmethod(FROM_RAGGED if apart else _one_residual)
    cache_module.arrange_rows = ARRANGE_ROWS if apart else _one_layout
    CompressedLayer._untouched_layout = UNTOUCHED if apart else _packed_again
    clock = step_clock()
    start = time.perf_counter()
    try:
        with kvc.compress(model, method):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
    finally:
        CompressedLayer._rows_apart = SHARED
        CompressedLayer._whole_rows = SHARED_WHOLE
        RaggedPackedStore.from_ragged = classmethod(FROM_RAGGED)
        cache_module.arrange_rows = ARRANGE_ROWS
        CompressedLayer._untouched_layout = UNTOUCHED
    steps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    return steps, out[:, ids.shape[1]:], clock.times[0] - start


def first_difference(a, b):
    diff = (a != b).nonzero()
    return int(diff[0]) if len(diff) else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a packaged model (smollm2, the default, or gemma3) or a folder")
    ap.add_argument("--lengths", default="1024,700,900,520", help="comma-separated prompt lengths of the rows")
    ap.add_argument("--methods", default="kivi:bits=2,kivi:bits=4",
                    help="comma-separated method specs (SPEC@N: at budget N)")
    ap.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per generation")
    ap.add_argument("--repeats", type=int, default=3, help="timed pairs per method (interleaved)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and kvcompress threads")
    ap.add_argument("--text", default=DEFAULT_TEXT, help="text file the prompts are cut from")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens: at least 2 (a decode step lies between two tokens)")
    if not os.path.exists(args.text):
        print(f"bench_padded_batch: skipped, prompt text {args.text} not found (pass --text FILE)")
        return None
    torch.set_num_threads(args.threads)
    ops.set_num_threads(args.threads)
    info = machine()
    info["threads"] = args.threads
    model, tok = load_model(args.model)
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    all_ids = tok(text[: 6 * sum(lengths) + 1000], return_tensors="pt").input_ids[0]
    rows, at = [], 0
    for n in lengths:
        rows.append(all_ids[at : at + n])
        at += n
    ids, mask = left_pad(rows)

    records = []
    for spec in args.methods.split(","):
        name, at, budget = spec.partition("@")  # SPEC@N: at budget N (an evictor's)
        method = method_from_spec(name, budget=int(budget) if at else None)
        alone = [generate(model, r[None], torch.ones(1, len(r), dtype=torch.long), method, args.new_tokens, True)[1][0]
                 for r in tqdm(rows, desc=f"{spec}: rows alone", leave=False)]
        times, prefill = {True: [], False: []}, {True: [], False: []}
        same = {}
        for rep in tqdm(range(args.repeats), desc=f"{spec}: pairs", leave=False):
            for apart in ((True, False) if rep % 2 == 0 else (False, True)):
                steps, out, first = generate(model, ids, mask, method, args.new_tokens, apart)
                times[apart].append(steps)
                prefill[apart].append(first)
                same[apart] = [first_difference(out[i], alone[i]) for i in range(len(rows))]
        rec = dict(method=spec, lengths=lengths, new_tokens=args.new_tokens)
        for apart, name in ((True, "apart"), (False, "shared")):
            rec[f"{name}_ms"] = 1e3 * statistics.median([t for run in times[apart] for t in run])
            rec[f"{name}_runs_ms"] = [1e3 * statistics.median(run) for run in times[apart]]
            rec[f"{name}_first_difference"] = same[apart]
            rec[f"{name}_prefill_ms"] = 1e3 * statistics.median(prefill[apart])
        rec["ratio"] = rec["apart_ms"] / rec["shared_ms"]
        rec["prefill_ratio"] = rec["apart_prefill_ms"] / rec["shared_prefill_ms"]
        records.append(rec)
        print(f"{spec}: {rec['apart_ms']:.1f} ms/step apart, {rec['shared_ms']:.1f} shared "
              f"({rec['ratio']:.3f}x), prefill {rec['apart_prefill_ms']:.0f} / {rec['shared_prefill_ms']:.0f} ms "
              f"({rec['prefill_ratio']:.3f}x); first differences from alone: apart {rec['apart_first_difference']}, "
              f"shared {rec['shared_first_difference']}", flush=True)

    def rows_alone(firsts):
        return f"{sum(f is None for f in firsts)}/{len(firsts)}"

    lines = [f"## bench_padded_batch ({now()})", "", "```bash", command_line(__file__, argv), "```", "",
             machine_line(info) + f" {args.threads} thread(s).", "",
             f"One left-padded batch of {len(lengths)} rows ({', '.join(map(str, lengths))} tokens), "
             f"{args.new_tokens} greedy tokens. Decode ms per batch step, median over the steps of "
             f"{args.repeats} interleaved pairs of runs; prefill ms (to the first token), median over the "
             "runs; rows that generate what they generate alone (first differing step of the others).", "",
             "| method | rows apart, ms/step | shared schedule, ms/step | apart / shared | prefill apart / shared, "
             "ms | rows as alone, apart | rows as alone, shared |", "|---|---:|---:|---:|---|---|---|"]
    for r in records:
        lines.append(f"| `{r['method']}` | {r['apart_ms']:.1f} | {r['shared_ms']:.1f} | {r['ratio']:.3f} | "
                     f"{r['apart_prefill_ms']:.0f} / {r['shared_prefill_ms']:.0f} ({r['prefill_ratio']:.3f}x) | "
                     f"{rows_alone(r['apart_first_difference'])} {r['apart_first_difference']} | "
                     f"{rows_alone(r['shared_first_difference'])} {r['shared_first_difference']} |")
    result = dict(machine=info, command=command_line(__file__, argv), records=records)
    if not args.no_write:
        write_results("bench_padded_batch", result, lines)
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
