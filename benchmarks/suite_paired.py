"""Paired differences between rows of RULER-style suite runs.

Every row of ``kvcompress eval --suite`` records each case's score with its
task, length and seed, so two rows that ran on the same cases (possibly in
different runs, even different virtual environments, as kvpress's rows) are
compared case by case: the mean difference, a bootstrap interval over cases
that keeps the pairs (``kvcompress.intervals.paired``), and on how many cases
each side scored higher. Rows of different models are refused.

    python benchmarks/suite_paired.py RUN_A/suite.json:ems:lookahead=True@0.9 RUN_B/suite.json:kvpress:CAM@0.9 \
        [MORE_ROWS ...] [--tasks niah_single,qa]

Each row is ``FILE:METHOD@RATIO`` (``@RATIO`` left out for a row without one,
such as the full cache). ``FILE`` may join runs of the same row on other
tasks, ``A.json+B.json`` (``kvcompress.suite.join_tasks``: runs sharing a task are refused). The first row is the reference: every other row is
printed as that row minus the reference, over the cases both ran. A row
whose cases differ from the reference's is compared on the cases they
share, and the table says how many those are.
"""

from __future__ import annotations

import argparse

from kvcompress import suite
from kvcompress.intervals import paired


def parse_row(text: str) -> tuple[str, str, float | None]:
    """``FILE:METHOD@RATIO`` -> (file, method, ratio); the file may be ``A.json+B.json``."""
    path, sep, rest = text.partition(".json:")
    if not sep:
        raise ValueError(f"rows: expected FILE.json:METHOD[@RATIO], got {text!r}")
    method, at, ratio = rest.rpartition("@") if "@" in rest else (rest, "", "")
    return path + ".json", method, float(ratio) if at else None


def _model(run: dict) -> tuple:
    """What makes two runs the same model (the name may carry a tokenizer path)."""
    m = run["model"]
    return tuple(m.get(k) for k in ("architecture", "layers", "q_heads", "kv_heads", "head_dim"))


def cases_of(path: str, method: str, ratio: float | None, tasks: set[str] | None) -> tuple[dict, tuple]:
    """``(task, length, seed) -> score`` of one row, and the run's model."""
    run = suite.read_result(path)
    for row in run["rows"]:
        if row["method"] == method and (ratio is None or row.get("ratio") == ratio):
            return ({(c["task"], c["length"], c["seed"]): float(c["score"]) for c in row["cases"]
                     if tasks is None or c["task"] in tasks}, _model(run))
    have = sorted({(r["method"], r.get("ratio")) for r in run["rows"]}, key=str)
    dropped = f" (left out by the join, not in every run: {run['dropped']})" if run.get("dropped") else ""
    raise ValueError(f"rows: {path} has no row {method!r} at ratio {ratio}; it has {have}{dropped}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rows", nargs="+", help="FILE.json:METHOD@RATIO; the first is the reference")
    ap.add_argument("--tasks", default=None, help="comma-separated tasks to compare on (default: all)")
    args = ap.parse_args()
    if len(args.rows) < 2:
        ap.error("rows: give a reference and at least one row to compare with it")
    tasks = set(args.tasks.split(",")) if args.tasks else None
    specs = [parse_row(r) for r in args.rows]
    ref, model = cases_of(*specs[0], tasks)
    name = lambda s: f"{s[1]} @ {s[2]}" if s[2] is not None else s[1]  # noqa: E731
    print(f"reference: {name(specs[0])} ({specs[0][0]}), {len(ref)} cases, mean {sum(ref.values()) / len(ref):.3f}")
    print()
    print("| row | cases | mean | minus reference (95% paired interval) | higher / lower |")
    print("|---|---:|---:|---:|---:|")
    for spec in specs[1:]:
        other, other_model = cases_of(*spec, tasks)
        if other_model != model:
            raise ValueError(f"rows: {spec[0]} ran {other_model!r}, the reference {model!r}: not the same cases")
        keys = sorted(set(ref) & set(other))
        if not keys:
            raise ValueError(f"rows: {name(spec)} shares no case with the reference")
        a, b = [other[k] for k in keys], [ref[k] for k in keys]
        p = paired(a, b)
        higher = sum(x > y for x, y in zip(a, b))
        print(f"| {name(spec)} | {len(keys)} | {sum(a) / len(a):.3f} | {p['mean']:+.3f} ({p['low']:+.3f} to "
              f"{p['high']:+.3f}) | {higher} / {p['lower']} |")


if __name__ == "__main__":
    main()
