"""Time the per-layer tests of ``KIVI(rotate="auto", clip_values="auto")``.

A layer's first pack runs, once per layer, ``rotation.packing_divergences``
(keys packed both ways, the newest queries' KL divergence) and
``value_clip.value_clip_errors`` (values packed both ways, the error the
output projection carries into the residual stream), each of which packs
the layer's prompt twice; ``ops.pack_values(clip=True)`` is timed alone
too. Shapes are the default model's (3 kv heads, 9 query heads, D = 64, the
newest 32 queries, hidden 576) over ``--slots`` prompt slots, random inputs
(the keys' channels scaled 0.2..3, as RoPE'd keys spread unevenly). One
thread; the median of ``--reps`` calls after one untimed call, the four
calls taken in turn in every rep (``_common.time_many``).

    python benchmarks/bench_auto_tests.py                    # 1K and 8K slots
    PYTHONPATH=OTHER_CHECKOUT python benchmarks/bench_auto_tests.py   # another build, same command

Prints a table; ``--json FILE`` writes the timings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import command_line, machine, machine_line, now, time_many  # noqa: E402

from kvcompress import ops  # noqa: E402
from kvcompress.stores.rotation import key_rotation, packing_divergences  # noqa: E402
from kvcompress.stores.value_clip import value_clip_errors  # noqa: E402


def case(m: int, reps: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 9, 32, 64, generator=g)
    k = torch.randn(1, 3, m, 64, generator=g) * torch.linspace(0.2, 3, 64)
    v = torch.randn(1, 3, m, 64, generator=g)
    w = torch.randn(576, 576, generator=g)
    rot = key_rotation(64, "cpu")
    fns = {
        "rotation_ms": lambda: packing_divergences(q, k, rot, 2, 32, 0.125),
        "clip_ms": lambda: value_clip_errors(q, k, v, 2, 32, 0.125, w),
        "pack_values_clip_ms": lambda: ops.pack_values(v, 2, 32, clip=True),
        "pack_values_ms": lambda: ops.pack_values(v, 2, 32),
    }
    times, _ = time_many(fns, 0.0, min_reps=reps, max_reps=reps)
    return {"slots": m, **{name: t * 1e3 for name, t in times.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", default="1024,8192", help="comma-separated prompt slots per head")
    ap.add_argument("--reps", type=int, default=7, help="timed calls per case (median)")
    ap.add_argument("--json", help="write the timings here")
    args = ap.parse_args(argv)
    try:
        slots = [int(x) for x in args.slots.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--slots: expected comma-separated integers, got {args.slots!r}")
    if not slots or min(slots) < 32:
        ap.error(f"--slots: each must be >= 32 (one group), got {args.slots!r}")
    if args.reps < 1:
        ap.error(f"--reps: must be >= 1, got {args.reps}")
    torch.set_num_threads(1)
    ops.set_num_threads(1)
    info = machine()
    rows = [case(m, args.reps) for m in slots]
    print(f"{now()}  {machine_line(info)}")
    print(f"Command: `{command_line(__file__, argv)}`  (kvcompress from {ops.__file__})")
    print("| slots | packing_divergences ms | value_clip_errors ms | pack_values(clip) ms | pack_values ms |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['slots']} | {r['rotation_ms']:.1f} | {r['clip_ms']:.1f} | {r['pack_values_clip_ms']:.1f} | "
              f"{r['pack_values_ms']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": now(), "machine": info, "kvcompress": ops.__file__,
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
