"""Every causal-LM model type of the installed transformers, tiny and random, under ``compress()``.

For each name in transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (200 on
5.25.0) a model is built from ``AutoConfig.for_model(name, **TINY)`` (4 layers,
hidden 64, 4 heads, 2 kv heads, head dim 16, vocab 256; no weights, no
download) in a child process of its own (memory and time bounded), and on a
left-padded batch of two 60-token prompts, 6 greedy tokens:

* ``ref``: plain ``generate()`` with transformers' own cache;
* ``above``: ``SnapKV(budget=256)`` (nothing evicted): ``=`` when its tokens
  are ``ref``'s;
* ``snap16``: ``SnapKV(budget=16)`` (compressed: ``~``, tokens may differ);
* ``kivi4``: ``KIVI(bits=4)`` (the prompt fits the full-precision residual,
  so ``=`` is expected).

A kvcompress refusal by name is ``R: <message>``, any other exception
``E: <type>: <message>`` (a defect). Models that cannot be built from the
tiny config (``SKIP``) or whose plain ``generate()`` fails on it
(``REFFAIL``) are listed apart: they say nothing about kvcompress.

    python benchmarks/sweep_families.py --out DIR            # about 35 min on 2 cores
    python benchmarks/sweep_families.py --only lfm2,jamba    # a few names
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=512)


def one(name: str) -> dict:
    """The row of one model type (run in a child process)."""
    import logging
    import warnings

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import kvcompress as kvc

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)  # transformers' notes on reference kernels
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 250, (2, 60), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :20], mask[0, :20] = 0, 0
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(name, **TINY)).float().eval()
    except Exception as e:  # noqa: BLE001 - the tiny config does not fit this family
        return {"name": name, "status": "SKIP", "why": f"{type(e).__name__}: {e}"[:200]}
    kw = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    try:
        with torch.no_grad():
            ref = model.generate(ids, **kw)
    except Exception as e:  # noqa: BLE001 - transformers' own generate fails on it
        return {"name": name, "status": "REFFAIL", "why": f"{type(e).__name__}: {e}"[:200]}
    row = {"name": name, "status": "RUN"}
    for col, method in (("above", kvc.SnapKV(budget=256)), ("snap16", kvc.SnapKV(budget=16)),
                        ("kivi4", kvc.KIVI(bits=4))):
        try:
            with torch.no_grad(), kvc.compress(model, method):
                out = model.generate(ids, **kw)
            row[col] = "=" if torch.equal(out, ref) else "~"
        except kvc.KVCompressError as e:
            row[col] = "R: " + str(e)[:160]
        except Exception as e:  # noqa: BLE001 - a defect: reported, not raised
            row[col] = f"E: {type(e).__name__}: {e}"[:200]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated model types (default: every causal-LM type)")
    ap.add_argument("--timeout", type=int, default=120, help="seconds per model type (default 120)")
    ap.add_argument("--out", help="folder for sweep.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the child process's model type
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one)))
        return 0
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = args.only.split(",") if args.only else sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    rows = []
    for i, name in enumerate(names):
        try:
            # 8 GB of address space: a family that ignores the tiny sizes fails alone
            cmd = ["bash", "-c", 'ulimit -v 8000000; exec "$0" "$@"', sys.executable, __file__, "--one", name]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                  env=dict(os.environ, OMP_NUM_THREADS="1"))
            lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
            row = json.loads(lines[-1]) if lines else {"name": name, "status": "DIED",
                                                       "why": done.stderr.strip()[-200:]}
        except subprocess.TimeoutExpired:
            row = {"name": name, "status": "DIED", "why": f"over {args.timeout} s"}
        rows.append(row)
        cells = (" | ".join(row[c][:60] for c in ("above", "snap16", "kivi4")) if row["status"] == "RUN"
                 else row.get("why", "")[:120])
        print(f"[{i + 1}/{len(names)}] {row['status']:7} {name}: {cells}", flush=True)
    ran = [r for r in rows if r["status"] == "RUN"]
    print(f"\n{len(names)} model types: {len(ran)} ran, "
          + ", ".join(f"{k} {v}" for k, v in collections.Counter(r["status"] for r in rows).items() if k != "RUN"))
    for col in ("above", "snap16", "kivi4"):
        tally = collections.Counter(r[col][0] for r in ran)
        print(f"{col}: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.items())))
    bad = [r["name"] for r in ran if any(r[c].startswith("E") for c in ("above", "snap16", "kivi4"))
           or r["above"] == "~" or r["kivi4"] == "~"]
    print("defects (an exception, or other tokens with nothing evicted):", ", ".join(bad) or "none")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "sweep.json"), "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
