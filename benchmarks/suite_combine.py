"""Combine RULER-style suite runs made on the same cases into one table.

Rows that need different environments (kvpress's presses run in
``.venv-kvpress``, which pins an older transformers) or that were added later
(more ratios, more methods) are run separately on the same seeds and joined
here; ``kvcompress.suite.combine`` checks that every row ran the same cases
and reports how often the runs' full caches scored alike.

    python benchmarks/suite_combine.py RUN1/suite.json RUN2/suite.json \\
        [--tasks niah_single,niah_multikey,qa] [--rename 'ems:tau=0.8=>ems'] \\
        [--methods ems,kvpress:CAM] --out DIR

An argument ``A.json+B.json`` is first joined into one run
(``kvcompress.suite.join_tasks``: the same rows run on different tasks).

writes DIR/suite.json, DIR/suite.md and DIR/suite.png (with matplotlib).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvcompress import suite


def _load(path: Path) -> dict:
    """``suite.read_result``, saying which rows a joined run left out."""
    run = suite.read_result(path)
    if run.get("dropped"):
        print(f"{path}: rows not in every joined run, left out: "
              + ", ".join(f"{m} @ {r}" for m, r in run["dropped"]), file=sys.stderr)
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="suite.json files, the first one's full cache is kept")
    parser.add_argument("--tasks", help="comma-separated tasks to score on (default: those every run has)")
    parser.add_argument("--rename", action="append", default=[], metavar="OLD=>NEW",
                        help="relabel a method's rows, e.g. 'ems:tau=0.8=>ems' (repeatable)")
    parser.add_argument("--methods", help="comma-separated rows to keep (labels after --rename), in that order")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    args = parser.parse_args(argv)
    try:
        rename = {}
        for item in args.rename:
            old, sep, new = item.partition("=>")
            if not sep or not old or not new:
                raise ValueError(f"--rename: expected OLD=>NEW, got {item!r}")
            rename[old] = new
        runs = [_load(p) for p in args.results]
        merged = suite.combine(runs, args.tasks.split(",") if args.tasks else None, rename=rename,
                               methods=args.methods.split(",") if args.methods else None)
    except (OSError, ValueError) as e:
        print(f"suite_combine: {e}", file=sys.stderr)
        return 2
    paths = suite.write_outputs(merged, args.out)
    print(suite.describe(merged) + "\n\n" + suite.markdown(merged))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
