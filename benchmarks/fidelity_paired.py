"""Paired differences between methods from ``kvcompress eval`` fidelity runs.

Each method's KL@k in ``results.json`` has a bootstrap interval over texts,
but every method ran on the same passages, so two methods are compared
better by the per-passage difference: its mean, a bootstrap interval over
passages (``kvcompress.intervals.paired``) and on how many passages the
method is lower. Several runs on the same passages (same text, seed,
number of passages, context and k) can be joined; the first run that has
a (method, budget) row gives it.

    python benchmarks/fidelity_paired.py RUN1/results.json [RUN2/results.json ...] --ref ems

prints one markdown table: per row its KL@k with interval and, beside it,
the row minus the reference method at the same budget (``--ref-budget N``:
at budget N, for settings that hold about the same memory at different
budgets).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvcompress.intervals import paired

# what makes two runs' passages the same ones
_SAME = ("text", "fidelity_texts", "fidelity_context", "k", "seed")


def load_rows(results: list[dict]) -> list[dict]:
    """Rows with a fidelity result from runs on the same passages, first run
    first; a (method, budget) pair seen earlier is skipped. Raises
    ValueError when the runs' passages or models differ."""
    if not results:
        raise ValueError("results: need at least one run")
    first = results[0]
    rows, seen = [], set()
    for i, run in enumerate(results):
        for key in _SAME:
            if run["config"].get(key) != first["config"].get(key):
                raise ValueError(f"results[{i}]: config {key}={run['config'].get(key)!r} differs from the first "
                                 f"run's {first['config'].get(key)!r}: not the same passages")
        if run["model"].get("name") != first["model"].get("name"):
            raise ValueError(f"results[{i}]: model {run['model'].get('name')!r} differs from the first run's "
                             f"{first['model'].get('name')!r}")
        for row in run["rows"]:
            key = (row["method"], row.get("budget"), row.get("ratio"))
            if "fidelity" in row and key not in seen and row["method"] != "full":
                seen.add(key)
                rows.append(row)
    return rows


def table(rows: list[dict], ref: str, ref_budget: int | None = None) -> str:
    """Markdown: method, budget, KL@k (interval), the row minus ``ref`` at
    the same budget (paired bootstrap interval; passages lower), or at
    ``ref_budget`` for every row when given (settings that hold about the
    same memory at different budgets)."""
    refs = {(r.get("budget"), r.get("ratio")): r for r in rows if r["method"] == ref}
    if not refs:
        raise ValueError(f"ref: no row of method {ref!r}; rows: {sorted({r['method'] for r in rows})}")
    if ref_budget is not None:
        if (ref_budget, None) not in refs:
            raise ValueError(f"ref_budget: no row of method {ref!r} at budget {ref_budget}; "
                             f"its budgets: {sorted(b for b, _ in refs if b is not None)}")
        refs = {(r.get("budget"), r.get("ratio")): refs[(ref_budget, None)] for r in rows}
    k = rows[0]["fidelity"]["k"]
    out = [f"| method | budget | KL@{k} | − {ref} (paired) |", "|---|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (r.get("budget") or 0, r.get("ratio") or 0)):
        f = r["fidelity"]
        at = r.get("budget") if r.get("budget") is not None else f"ratio {r.get('ratio')}"
        cell = f"{f['kl']:.3f} ({f['kl_low']:.3f}–{f['kl_high']:.3f})"
        base = refs.get((r.get("budget"), r.get("ratio")))
        if r is base or base is None:
            diff = "–"
        else:
            p = paired(f["per_text_kl"], base["fidelity"]["per_text_kl"])
            diff = f"{p['mean']:+.3f} ({p['low']:+.3f}..{p['high']:+.3f}); lower on {p['lower']}/{p['n']}"
        out.append(f"| {r['method']} | {at} | {cell} | {diff} |")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.json files of `kvcompress eval`")
    parser.add_argument("--ref", default="ems", help="method the others are compared with (default: ems)")
    parser.add_argument("--ref-budget", type=int, metavar="N",
                        help="compare every row with --ref at budget N (default: at the row's own budget)")
    args = parser.parse_args(argv)
    try:
        rows = load_rows([json.loads(p.read_text()) for p in args.results])
        print(table(rows, args.ref, args.ref_budget))
    except (OSError, KeyError, ValueError) as e:
        print(f"fidelity_paired: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
