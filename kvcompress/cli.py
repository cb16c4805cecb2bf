"""Command line: ``python -m kvcompress demo`` (more commands come with the eval harness)."""

from __future__ import annotations

import argparse
import time


def _demo(args) -> int:
    import torch
    from tqdm.auto import tqdm

    import kvcompress as kvc
    from kvcompress.tasks import passkey_prompt

    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("loading the default model (SmolLM2-135M-Instruct, offline) ...", flush=True)
    model, tok = kvc.load_default_model()
    filler = open(args.text, encoding="utf-8").read() if args.text else None
    prompt = passkey_prompt(tok, args.tokens, args.depth, filler_text=filler, seed=args.seed)
    ids = prompt.input_ids
    budget = args.budget
    methods = [None, kvc.StreamingLLM(budget=budget), kvc.SnapKV(budget=budget), kvc.PyramidKV(budget=budget),
               kvc.Knorm(budget=budget), kvc.H2O(budget=budget), kvc.TOVA(budget=budget), kvc.VATP(budget=budget)]
    rows = []
    for method in tqdm(methods, desc="methods", unit="method"):
        name = "full cache" if method is None else method.describe()
        start = time.perf_counter()
        if method is None:
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=args.new_tokens, do_sample=False, return_dict_in_generate=True)
            cache = out.past_key_values
            held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
            full = held
        else:
            with kvc.compress(model, method) as session:
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=args.new_tokens, do_sample=False,
                                     return_dict_in_generate=True)
            stats = session.cache.stats()
            held, full = stats.total_bytes, stats.full_bytes
        seconds = time.perf_counter() - start
        text = tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
        rows.append((name, prompt.answered(text), held, full, seconds, text.strip().replace("\n", " ")[:40]))
    print(f"\npasskey {prompt.key} hidden at depth {args.depth} of {args.tokens} filler tokens "
          f"(prompt {ids.shape[1]} tokens), budget {budget} slots per kv head\n")
    print("| method | answer ok | cache MiB | vs full | generate s | output |")
    print("|---|:---:|---:|---:|---:|---|")
    for name, ok, held, full, sec, text in rows:
        print(f"| {name} | {'yes' if ok else 'no'} | {held / 2**20:.2f} | {full / held:.1f}x | {sec:.1f} | {text!r} |")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kvcompress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="passkey retrieval with each method vs the full cache")
    demo.add_argument("--tokens", type=int, default=1500, help="filler tokens (default 1500)")
    demo.add_argument("--depth", type=float, default=0.5, help="needle depth in [0, 1] (default 0.5)")
    demo.add_argument("--budget", type=int, default=256, help="kept slots per kv head (default 256)")
    demo.add_argument("--new-tokens", type=int, default=12, help="tokens to generate (default 12)")
    demo.add_argument("--text", help="filler text file (default: a synthetic sentence)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)
