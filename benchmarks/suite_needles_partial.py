"""Needle-task scores from ``kvcompress eval --suite`` checkpoints, finished or not.

A suite run writes ``suite.partial.jsonl`` (one line per case) as it goes;
this reads one or more of them (runs of the same cases with different
methods), keeps the needle tasks, counts only the cases every row has, and
prints their scores with the suite's intervals (``kvcompress.suite``'s
choice: Wilson for pass/fail tasks, bootstrap otherwise). The full cache is
taken from the first file.

    python benchmarks/suite_needles_partial.py A/suite.partial.jsonl B/suite.partial.jsonl
"""

from __future__ import annotations

import json
import sys

from kvcompress.intervals import bootstrap, wilson
from kvcompress.suite import _binary

TASKS = ("niah_single", "niah_multikey", "niah_multivalue")


def load(paths: list[str]) -> dict:
    """``{row: {task: [(case, score, bytes, full_bytes)]}}`` from the checkpoints."""
    rows: dict = {}
    for path in paths:
        with open(path) as f:
            lines = [json.loads(line) for line in f]
        for rec in lines[1:]:  # the first line is the run's header
            for key, r in rec["rows"].items():
                if key.startswith("full@") and path != paths[0]:
                    continue  # the full cache ran in every process: count it once
                rows.setdefault(key, {}).setdefault(r["task"], []).append(
                    (rec["case"], r["score"], r.get("bytes"), r.get("full_bytes")))
    return rows


def table(rows: dict) -> str:
    common = {t: set.intersection(*[{c for c, *_ in rows[k].get(t, [])} for k in rows]) for t in TASKS}
    out = ["cases per task: " + str({t: len(common[t]) for t in TASKS}),
           "| method | ratio | " + " | ".join(TASKS) + " | full/held bytes |",
           "|---|---:|" + "---:|" * len(TASKS) + "---:|"]
    for k in sorted(rows, key=lambda k: (k.split("@")[0] != "full", k.split("@")[1], k)):
        m, ratio = k.split("@")
        cells, ratios = [], []
        for t in TASKS:
            recs = [x for x in rows[k].get(t, []) if x[0] in common[t]]
            sc = [s for _, s, _, _ in recs]
            ratios += [fb / b for _, _, b, fb in recs if b and fb]
            lo, hi = wilson(round(sum(sc)), len(sc)) if _binary(t) else bootstrap(sc)
            cells.append(f"{sum(sc) / len(sc):.2f} ({lo:.2f}–{hi:.2f})")
        held = f"{sum(ratios) / len(ratios):.1f}x" if ratios else "1.0x"
        out.append(f"| {'full cache' if m == 'full' else m} | {'–' if ratio == 'None' else ratio} | "
                   + " | ".join(cells) + f" | {held} |")
    return "\n".join(out)


def main(argv=None) -> int:
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        sys.exit("usage: suite_needles_partial.py CHECKPOINT.jsonl [CHECKPOINT.jsonl ...]")
    print(table(load(paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
