"""What a blocked byte order of 4-bit codes would save in the packed decode attention's inner loops.

Builds ``probe_code_layout.c`` with ``gcc -O3 -march=native`` in a temporary
folder and runs it. At D = 128 and one query row per kv slot (a model
without GQA, where the packed kernel is bound by its unpacking), it times the
key logits and the weighted values of one decode step over 4-bit codes in
two byte orders: the current one (byte b holds channels 2b and 2b + 1,
docs/packed.md) and a blocked one (byte b of each 32-channel block holds
channels b and b + 16), with the unpacking the library's wide units do for
the first and a zero-extending load plus two table lookups for the second.
Both give the same bits (checked before timing). Prints the best of
``--reps`` times of each and their ratio.

    python benchmarks/probe_code_layout.py
    python benchmarks/probe_code_layout.py --lengths 4096,16384 --heads 1,32 --reps 30

A measurement for a design decision, not library code: nothing in
``kvcompress`` calls it, and the library's packed format is unchanged.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="4096,16384", help="comma-separated slot counts (multiples of 16)")
    ap.add_argument("--heads", default="1,32", help="comma-separated kv head counts per call (a layer's work)")
    ap.add_argument("--reps", type=int, default=30, help="timed repetitions; the best of them is reported")
    args = ap.parse_args(argv)
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
        heads = [int(x) for x in args.heads.split(",")]
    except ValueError:
        ap.error(f"--lengths/--heads: expected comma-separated integers, got {args.lengths!r} / {args.heads!r}")
    if any(n <= 0 or n % 16 for n in lengths):
        ap.error(f"--lengths: each must be a positive multiple of 16, got {args.lengths!r}")
    if any(h <= 0 for h in heads):
        ap.error(f"--heads: each must be positive, got {args.heads!r}")
    if args.reps <= 0:
        ap.error(f"--reps: must be positive, got {args.reps}")
    if "avx512f" not in cpu_flags():
        print("this CPU has no AVX-512: nothing to measure", file=sys.stderr)
        return 2
    cc = shutil.which("gcc")
    if cc is None:
        print("gcc not found", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "probe")
        subprocess.run([cc, "-O3", "-march=native", "-Wall", "-o", exe, os.path.join(HERE, "probe_code_layout.c")],
                       check=True)
        for h in heads:
            for n in lengths:
                run = subprocess.run([exe, str(n), str(h), str(args.reps)])
                if run.returncode:
                    return run.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
