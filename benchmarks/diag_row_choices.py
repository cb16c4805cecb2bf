"""Do batch rows generate what they generate alone when a KIVI layer makes
once-only choices (``rotate="auto"``, ``clip_values="auto"``,
``feedback=True``), or slides (``--sliding``)?

On the tiny random test Llama (``tests/conftest.py``'s, built here from its
config: no download), or with ``--sliding`` a tiny Mistral of the same size
whose every layer slides over 64 tokens (``tests/generation.py``'s), for
each method, each batch shape (left-padded rows of different lengths, and
rows of one length) and each seed, the script generates greedily from the
batch and from every row alone, and counts the rows whose tokens are the
same. Run it on two builds to compare them (the other build on
``PYTHONPATH``, with its own compiled extension)::

    python benchmarks/diag_row_choices.py
    python benchmarks/diag_row_choices.py --sliding
    python benchmarks/diag_row_choices.py \
        --methods "ems:interval=0+kivi:bits=2:group=8:residual=8:rotate=auto:sinks=4:feedback=true@64"
    git worktree add /tmp/base19 78dffbe && (cd /tmp/base19 && python setup.py build_ext --inplace)
    PYTHONPATH=/tmp/base19 python benchmarks/diag_row_choices.py      # and --sliding
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import kvcompress as kvc
from kvcompress.methods import method_from_spec
from kvcompress.testing import left_pad

# the test suite's tiny sliding Mistral, one definition (tests/generation.py)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from generation import tiny_sliding_mistral  # noqa: E402

METHODS = ("kivi:bits=2:group=16:residual=16:rotate=auto:sinks=4:feedback=true:clip_values=auto,"
           "kivi:bits=2:group=8:residual=48:rotate=auto:feedback=true:clip_values=auto")
SHAPES = ("150/97/131", "120/120/120", "200/64/170/90")
# --sliding: rows shorter and longer than the 64-token window, 50 tokens past every prompt
SLIDING_METHODS = ("kivi:bits=2:group=8:residual=8,"
                   "kivi:bits=2:group=8:residual=8:rotate=auto:feedback=true:clip_values=auto")
SLIDING_SHAPES = ("60/37/50", "100/30/61", "45/45/20")


def tiny_llama() -> LlamaForCausalLM:
    """The test suite's tiny GQA Llama: 4 layers, 2 kv heads, D = 16, float32, seed 0."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def build(spec: str):
    """The method of ``spec``; ``SPEC@N``: at budget N (an evictor's), ``SPEC@0.N``: at ratio 0.N."""
    spec, at, size = spec.partition("@")
    if at and "." in size:
        return method_from_spec(spec, ratio=float(size))
    return method_from_spec(spec, budget=int(size) if at else None)


def greedy(model, ids, mask, method, n: int) -> torch.Tensor:
    """The ``n`` greedy tokens ``[B, n]`` of ``model.generate`` under ``method``."""
    with kvc.compress(model, method):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sliding", action="store_true", help="the tiny sliding-window Mistral and its defaults")
    ap.add_argument("--methods", default=None,
                    help="comma-separated method specs (SPEC@N: at budget N, SPEC@0.N: at ratio 0.N)")
    ap.add_argument("--shapes", default=None, help="comma-separated row lengths, '/' between rows")
    ap.add_argument("--seeds", type=int, default=3, help="prompt seeds per shape")
    ap.add_argument("--new-tokens", type=int, default=None, help="greedy tokens per generation (40; --sliding: 50)")
    ap.add_argument("--show", action="store_true", help="name each row that differs from alone")
    args = ap.parse_args(argv)
    args.methods = args.methods or (SLIDING_METHODS if args.sliding else METHODS)
    args.shapes = args.shapes or ",".join(SLIDING_SHAPES if args.sliding else SHAPES)
    args.new_tokens = args.new_tokens or (50 if args.sliding else 40)
    model = tiny_sliding_mistral() if args.sliding else tiny_llama()
    total = {}
    cases = [(spec, shape, seed) for spec in args.methods.split(",") for shape in args.shapes.split(",")
             for seed in range(args.seeds)]
    for spec, shape, seed in tqdm(cases, desc="batches"):
        lengths = [int(x) for x in shape.split("/")]
        g = torch.Generator().manual_seed(100 * seed + 31)
        rows = [torch.randint(3, 512, (n,), generator=g) for n in lengths]
        ids, mask = left_pad(rows)
        out = greedy(model, ids, mask, build(spec), args.new_tokens)
        same = total.setdefault(spec, [0, 0])
        for i, r in enumerate(rows):
            alone = greedy(model, r[None], torch.ones(1, len(r), dtype=torch.long), build(spec), args.new_tokens)
            same[0] += bool(torch.equal(out[i], alone[0]))
            same[1] += 1
            if args.show and not torch.equal(out[i], alone[0]):
                print(f"{spec}: shape {shape}, seed {seed}, row {i} ({len(r)} tokens) differs from alone")
    for spec, (eq, n) in total.items():
        print(f"{spec}: {eq}/{n} rows generate what they generate alone")
    return total


if __name__ == "__main__":
    main()
