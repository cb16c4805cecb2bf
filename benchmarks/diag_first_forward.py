"""How often the first compressed forward of a process differs from the next.

Each of ``--processes`` fresh interpreters builds tiny Gemma 2 (the
architecture suite's random model), runs two forwards over a left-padded
batch of two under ``--method`` (or none), and says whether the first one's
last logits equal the second's bit for bit. Thread counts and ``MKL_CBWR``
are the interpreters' environment (RESULTS.md, "Two runs in one process can
differ by MKL's rounding, not by the cache").

    python benchmarks/diag_first_forward.py --method snapkv --processes 40
    MKL_CBWR=COMPATIBLE python benchmarks/diag_first_forward.py --method snapkv
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import sys, torch
sys.path.insert(0, {tests!r})
import test_architectures as TA
import kvcompress as kvc
from kvcompress import ops
torch.set_num_threads({torch_threads}); ops.set_num_threads({kvc_threads})
methods = {{
    "none": None,
    "snapkv": lambda: kvc.SnapKV(budget=48),
    "kivi": lambda: kvc.KIVI(bits=2, group=16, residual=16),
    "ems+kivi": lambda: kvc.EMS(budget=48) + kvc.KIVI(bits=2, group=16, residual=16, rotate="auto", sinks=2,
                                                       feedback=True),
}}
model = TA._build("gemma2")
g = torch.Generator().manual_seed(3)
ids = torch.randint(3, TA.VOCAB, (2, 160), generator=g)
mask = torch.ones_like(ids)
ids[1, :40], mask[1, :40] = 0, 0
make = methods[{method!r}]
outs = []
for _ in range(2):
    with torch.inference_mode():
        if make is None:
            outs.append(model(input_ids=ids, attention_mask=mask).logits[:, -1])
        else:
            with kvc.compress(model, make()):
                outs.append(model(input_ids=ids, attention_mask=mask, use_cache=True).logits[:, -1])
print("differs" if not torch.equal(outs[0], outs[1]) else "same")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="snapkv", choices=["none", "snapkv", "kivi", "ems+kivi"])
    parser.add_argument("--processes", type=int, default=40)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--kvc-threads", type=int, default=2)
    args = parser.parse_args()
    if args.processes < 1:
        parser.error("--processes: must be at least 1")
    code = CHILD.format(tests=str(HERE.parent / "tests"), torch_threads=args.torch_threads,
                        kvc_threads=args.kvc_threads, method=args.method)
    differ = 0
    for i in range(args.processes):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
        if out.returncode != 0:
            sys.stderr.write(out.stderr)
            return 1
        differ += out.stdout.strip().endswith("differs")
        print(f"\r{i + 1}/{args.processes} processes, {differ} first forwards differ", end="", flush=True)
    print()
    print(f"method {args.method}, torch threads {args.torch_threads}, kvcompress threads {args.kvc_threads}, "
          f"MKL_CBWR={os.environ.get('MKL_CBWR', 'unset')}: the first forward differed from the second in "
          f"{differ} of {args.processes} processes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
