"""Needle-task scores from ``kvcompress eval --suite`` checkpoints, finished or not.

A suite run writes ``suite.partial.jsonl`` (one line per case) as it goes;
this reads one or more of them (runs of the same cases with different
methods), keeps the needle tasks, counts only the cases every row has, and
prints their scores with the suite's intervals (Wilson for pass/fail tasks,
bootstrap for multi-value). The full cache is taken from the first file.

    python benchmarks/suite_needles_partial.py A/suite.partial.jsonl B/suite.partial.jsonl
"""
import json
import sys

from kvcompress.intervals import wilson, bootstrap
if len(sys.argv) < 2:
    sys.exit("usage: suite_needles_partial.py CHECKPOINT.jsonl [CHECKPOINT.jsonl ...]")
rows = {}
for path in sys.argv[1:]:
    with open(path) as f:
        lines = [json.loads(l) for l in f]
    for rec in lines[1:]:
        for key, r in rec["rows"].items():
            if key.startswith("full@") and path != sys.argv[1]:
                continue  # the full cache ran in every process: count it once
            rows.setdefault(key, {}).setdefault(r["task"], []).append((rec["case"], r["score"], r.get("bytes"), r.get("full_bytes")))
tasks = ["niah_single", "niah_multikey", "niah_multivalue"]
# only cases every row has
common = {t: set.intersection(*[{c for c, *_ in rows[k].get(t, [])} for k in rows]) for t in tasks}
print("cases per task:", {t: len(common[t]) for t in tasks})
order = sorted(rows, key=lambda k: (k.split("@")[0] != "full", k.split("@")[1], k))
print("| method | ratio | " + " | ".join(tasks) + " | full/held bytes |")
print("|---|---:|" + "---:|" * len(tasks) + "---:|")
seen = set()
for k in order:
    m, ratio = k.split("@")
    if k in seen: continue
    seen.add(k)
    cells = []
    ratios = []
    for t in tasks:
        sc = [s for c, s, b, fb in rows[k].get(t, []) if c in common[t]]
        ratios += [fb / b for c, s, b, fb in rows[k].get(t, []) if c in common[t] and b and fb]
        mean = sum(sc) / len(sc)
        lo, hi = wilson(round(sum(sc)), len(sc)) if t != "niah_multivalue" else bootstrap(sc)
        cells.append(f"{mean:.2f} ({lo:.2f}–{hi:.2f})")
    rb = f"{sum(ratios)/len(ratios):.1f}x" if ratios else "1.0x"
    print(f"| {'full cache' if m == 'full' else m} | {'–' if ratio == 'None' else ratio} | " + " | ".join(cells) + f" | {rb} |")
