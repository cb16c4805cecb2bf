"""Generation with each compression method vs the full cache: time, memory, bytes held.

For each prompt length and each configuration (the plain model with
transformers' DynamicCache, then each method inside ``kvcompress.compress``)
one run is:

* prefill: one ``model(prompt, cache=cache, logits_to_keep=1)``
  forward, compression included (it runs inside the forward, right after each
  layer's attention), plus the argmax of the last logits. Timed as a whole.
* decode: ``--new-tokens`` greedy steps ``model(next_token,
  cache=cache)`` + argmax, each timed on its own; the table shows
  the median (and mean: decode-policy methods re-compress every ``interval``
  steps, which the median hides).
* compression: the time spent inside ``CompressedLayer.after_attention`` (scoring,
  selection, gather), summed over layers, in the prefill and in the decode
  steps; it is part of the times above.
* memory: the process's peak RSS during the run (``VmHWM`` after resetting
  the high-water mark through ``/proc/self/clear_refs``), and that peak minus
  the RSS just before the run (after ``gc`` and ``malloc_trim``).
* bytes: storage held by the cache after the last step (``memory_bytes()``
  for kvcompress, the key/value tensors for the DynamicCache), and its mean
  and peak over the decode steps (read after each step, outside its time):
  a layer that keeps its budget every ``interval`` tokens holds a saw-tooth,
  so the last step alone depends on where the run stops in it.
* others' CPU: mean cores used by other processes during the run (from
  ``/proc/stat``), since the machine may be shared.

Ratios are against the full cache measured in the same run, same prompt. The
prompt is the first N tokens of ``--text``; a prompt is cut so that prompt +
new tokens fits the model's ``max_position_embeddings``. A warm-up pass runs
every configuration once on a short prompt, untimed. Batch 1, float32,
``torch.inference_mode()``.

    python benchmarks/bench_generate.py                       # 1K/4K/8K, all methods
    python benchmarks/bench_generate.py --quick --no-write    # smoke run

Writes benchmarks/results/bench_generate.json and appends a section to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import kvcompress as kvc
from kvcompress import ops
from kvcompress.cache import CompressedLayer
from kvcompress.compat import cache_kwargs, output_cache
from kvcompress.methods import method_from_spec
from kvcompress.model import load_model

from _common import command_line, machine, machine_line, now, write_results  # noqa: E402  (same folder)

HERE = os.path.dirname(os.path.abspath(__file__))
# the packaged Shakespeare: the first ~40K tokens of "tiny shakespeare"
DEFAULT_TEXT = str(Path(kvc.__file__).resolve().parent / "data" / "shakespeare.txt")
DEFAULT_METHODS = "streamingllm,snapkv,pyramidkv,knorm,h2o,tova,vatp,adakv,ems"
FULL = "full"
MiB = 1 << 20


# ----------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0: ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def check_peak_reset() -> None:
    """Fail early where resetting the high-water mark does not work: the
    per-config peaks would then all be the process's overall peak."""
    reset_peak_rss()
    block = bytearray(256 * MiB)  # zero-filled: every page is touched
    high = peak_rss_bytes()
    del block
    trim_heap()
    reset_peak_rss()
    after = peak_rss_bytes()
    if not after < high - 128 * MiB:
        raise RuntimeError(
            f"resetting the peak RSS via /proc/self/clear_refs does not work here (VmHWM {high / MiB:.0f} MiB "
            f"before, {after / MiB:.0f} MiB after); per-config peaks would be wrong"
        )


_libc = None


def trim_heap() -> None:
    """Collect garbage and hand free heap pages back to the OS, so the RSS
    before a run does not include what the previous run freed."""
    global _libc
    gc.collect()
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
        except OSError:
            _libc = False
    if _libc and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


# ----------------------------------------------------------------- CPU share

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_counters() -> tuple[float, float, float, float]:
    """(wall s, busy CPU s of the whole machine, steal s, CPU s of this process)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    t = os.times()
    return time.perf_counter(), (user + nice + system + irq + softirq) / _HZ, steal / _HZ, t.user + t.system


def others_load(start, end) -> tuple[float, float]:
    """Mean cores used by other processes, and mean cores stolen by the
    hypervisor, between two ``cpu_counters()``: the CPU is shared, so a run
    with a high value was slowed down by someone else."""
    wall = end[0] - start[0]
    others = (end[1] - start[1]) - (end[3] - start[3])
    return max(0.0, others) / wall, (end[2] - start[2]) / wall


# ----------------------------------------------------------------- compression time


class CompressionTimer:
    """Wraps ``owner.name`` (by default ``CompressedLayer.after_attention``: scoring,
    selection, gather of one layer) to add up the time spent in it, so the
    prefill and decode times can be split into model and compression."""

    def __init__(self, owner=CompressedLayer, name: str = "after_attention"):
        self.seconds = 0.0
        self._owner, self._name = owner, name
        self._original = None

    def __enter__(self):
        self._original = original = getattr(self._owner, self._name)
        timer = self

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                timer.seconds += time.perf_counter() - t0

        setattr(self._owner, self._name, timed)
        return self

    def __exit__(self, *exc):
        setattr(self._owner, self._name, self._original)

    def take(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s


# ----------------------------------------------------------------- runs


def cache_bytes(cache) -> tuple[int, int | None]:
    """(bytes held, kvcompress's own full-cache estimate or None)."""
    if isinstance(cache, kvc.KVCache):
        return cache.memory_bytes(), cache.stats().full_bytes
    storages = {}
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values()), None


def make_method(spec: str, budget: int | None, ratio: float | None):
    """The method of ``spec``; ``SPEC@N`` gives it budget N whatever
    ``--budget``/``--ratio`` say (settings compared at different budgets in
    one run)."""
    spec, at, own = spec.partition("@")
    if at:
        try:
            budget, ratio = int(own), None
        except ValueError:
            raise ValueError(f"{spec}@{own}: the budget after '@' must be an integer") from None
        if budget < 1:
            raise ValueError(f"{spec}@{own}: the budget after '@' must be at least 1")
    return method_from_spec(spec, budget=budget, ratio=ratio)


def run_once(model, ids: torch.Tensor, method, new_tokens: int, timer: CompressionTimer,
             global_timer: CompressionTimer) -> dict:
    """Prefill ``ids`` ``[1, T]`` and decode ``new_tokens`` greedy steps;
    return times, memory and the generated tokens."""
    trim_heap()
    before = rss_bytes()
    reset_peak_rss()
    counters = cpu_counters()
    session = kvc.compress(model, method) if method is not None else contextlib.nullcontext()
    with session, torch.inference_mode():
        cache = session.new_cache() if method is not None else None
        t0 = time.perf_counter()
        out = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        prefill = time.perf_counter() - t0
        prefill_compress = timer.take()
        prefill_global = global_timer.take()
        cache = output_cache(out)
        del out
        tokens = [int(token)]
        steps, held_steps = [], []
        for _ in range(new_tokens):
            t0 = time.perf_counter()
            out = model(input_ids=token, **cache_kwargs(model, cache), use_cache=True)
            token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            steps.append(time.perf_counter() - t0)
            cache = output_cache(out)
            del out
            held_steps.append(cache_bytes(cache)[0])
            tokens.append(int(token))
    decode_compress = timer.take()
    peak = peak_rss_bytes()
    others, steal = others_load(counters, cpu_counters())
    held, full_estimate = cache_bytes(cache)
    if method is not None:
        slots = [layer.n for layer in cache.layers]
        seen = cache.get_seq_length()
    else:
        slots = [int(layer.keys.shape[2]) for layer in cache.layers]
        seen = slots[0]
    del cache
    return dict(
        prefill_s=prefill, prefill_compress_s=prefill_compress, prefill_global_s=prefill_global,
        decode_compress_s=decode_compress,
        decode_step_s=steps, rss_before=before, peak_rss=peak, cache_bytes=held,
        cache_bytes_mean=statistics.fmean(held_steps) if held_steps else held,
        cache_bytes_peak=max(held_steps, default=held),
        full_bytes_estimate=full_estimate, tokens=tokens, seen=seen, slots_min=min(slots), slots_max=max(slots),
        others_cores=others, steal_cores=steal,
    )


def summarize(runs: list[dict]) -> dict:
    """Medians over repeats (decode: over all steps of all repeats)."""
    steps = [s for r in runs for s in r["decode_step_s"]]
    return dict(
        prefill_s=statistics.median(r["prefill_s"] for r in runs),
        prefill_compress_s=statistics.median(r["prefill_compress_s"] for r in runs),
        prefill_global_s=statistics.median(r["prefill_global_s"] for r in runs),
        decode_compress_ms_per_token=1e3 * statistics.fmean(
            r["decode_compress_s"] / len(r["decode_step_s"]) if r["decode_step_s"] else 0.0 for r in runs
        ),
        decode_ms_median=1e3 * statistics.median(steps) if steps else float("nan"),
        decode_ms_mean=1e3 * statistics.fmean(steps) if steps else float("nan"),
        decode_ms_max=1e3 * max(steps) if steps else float("nan"),
        rss_before=int(statistics.median(r["rss_before"] for r in runs)),
        peak_rss=int(statistics.median(r["peak_rss"] for r in runs)),
        peak_delta=int(statistics.median(r["peak_rss"] - r["rss_before"] for r in runs)),
        cache_bytes=runs[-1]["cache_bytes"], full_bytes_estimate=runs[-1]["full_bytes_estimate"],
        cache_bytes_mean=runs[-1]["cache_bytes_mean"], cache_bytes_peak=runs[-1]["cache_bytes_peak"],
        seen=runs[-1]["seen"], slots_min=runs[-1]["slots_min"], slots_max=runs[-1]["slots_max"],
        tokens=runs[-1]["tokens"], others_cores=max(r["others_cores"] for r in runs),
    )


# ----------------------------------------------------------------- report


def table_lines(records: list[dict]) -> list[str]:
    lines = [
        "| prompt | config | prefill s | ×full | compression s | global score s | decode ms/tok median | ×full | decode mean "
        "| compression ms/tok | peak RSS MiB | peak − before MiB | cache MiB | ×full | cache MiB mean / peak over steps "
        "| slots/head | tokens = full | others' CPU |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in records:
        slots = str(r["slots_min"]) if r["slots_min"] == r["slots_max"] else f"{r['slots_min']}–{r['slots_max']}"
        lines.append(
            f"| {r['tokens_prompt']} | {r['config']} | {r['prefill_s']:.2f} | {r['prefill_ratio']:.2f} | "
            f"{r['prefill_compress_s']:.2f} | {r['prefill_global_s']:.2f} | {r['decode_ms_median']:.1f} | {r['decode_ratio']:.2f} | "
            f"{r['decode_ms_mean']:.1f} | {r['decode_compress_ms_per_token']:.2f} | "
            f"{r['peak_rss'] / MiB:.0f} | {r['peak_delta'] / MiB:.0f} | {r['cache_bytes'] / MiB:.2f} | "
            f"{r['bytes_ratio']:.3f} | {r['cache_bytes_mean'] / MiB:.2f} / {r['cache_bytes_peak'] / MiB:.2f} | {slots} | {r['tokens_match']}/{r['tokens_total']} | {r['others_cores']:.2f} |"
        )
    return lines


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a packaged model (smollm2, the default, or gemma3) or a model folder")
    ap.add_argument("--tokens", default="1024,4096,8192", help="comma-separated prompt lengths")
    ap.add_argument("--methods", default=DEFAULT_METHODS,
                    help=f"comma-separated method specs (default {DEFAULT_METHODS}); options after colons, "
                         "e.g. ems:global_mode=probe; SPEC@N runs SPEC at budget N")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--budget", type=int, default=None, help="kept slots per kv head (default 256)")
    size.add_argument("--ratio", type=float, default=None, help="fraction of the prompt removed")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy decode steps after the prefill")
    ap.add_argument("--repeats", type=int, default=1, help="runs per configuration (interleaved)")
    ap.add_argument("--warmup-tokens", type=int, default=512, help="prompt length of the warm-up pass")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and kvcompress threads")
    ap.add_argument("--text", default=DEFAULT_TEXT, help="text file the prompts are cut from")
    ap.add_argument("--beyond-context", action="store_true",
                    help="do not cut prompts to max_position_embeddings (timing runs past the trained context)")
    ap.add_argument("--quick", action="store_true", help="512 tokens, snapkv and h2o, 4 new tokens")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--json", default=None,
                    help="write the JSON here instead of results/bench_generate.json (a focused run beside the "
                         "main table)")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.methods, args.new_tokens, args.warmup_tokens = "512", "snapkv,h2o", 4, 256
    if args.budget is None and args.ratio is None:
        args.budget = 256
    args.tokens = [int(x) for x in args.tokens.split(",") if x]
    args.methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
    for m in args.methods:
        try:
            make_method(m, args.budget, args.ratio)
        except ValueError as e:
            ap.error(f"--methods: {e}")
    for name in ("new_tokens", "repeats", "warmup_tokens", "threads"):
        if getattr(args, name) < (0 if name == "new_tokens" else 1):
            ap.error(f"--{name.replace('_', '-')}: too small")
    if not args.tokens or min(args.tokens) < 2:
        ap.error("--tokens: give prompt lengths >= 2")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not os.path.exists(args.text):
        print(f"bench_generate: skipped, prompt text {args.text} not found (pass --text FILE)")
        return None
    if not os.path.exists("/proc/self/clear_refs"):
        print("bench_generate: skipped, needs Linux /proc/self/clear_refs to measure per-run peak RSS")
        return None
    check_peak_reset()
    torch.set_num_threads(args.threads)
    ops.set_num_threads(args.threads)
    info = machine()
    info["threads"] = args.threads

    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    model_name = "SmolLM2-135M-Instruct" if args.model in (None, "smollm2") else \
        "Gemma 3 270M" if args.model == "gemma3" else os.path.basename(str(args.model).rstrip("/"))
    print(f"model loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    max_pos = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    need = max(args.tokens + [args.warmup_tokens])
    # ~4 characters per token; tokenize a bit more than needed, cut exactly.
    all_ids = tok(text[: 6 * need + 1000], return_tensors="pt").input_ids
    if all_ids.shape[1] < need:
        all_ids = tok(text, return_tensors="pt").input_ids
    prompts = []
    for n in args.tokens:
        use = n
        if max_pos and n + args.new_tokens > max_pos and not args.beyond_context:
            use = max_pos - args.new_tokens
            print(f"prompt {n}: cut to {use} tokens so that prompt + {args.new_tokens} new tokens fit "
                  f"max_position_embeddings={max_pos}", flush=True)
        if all_ids.shape[1] < use:
            raise SystemExit(f"--text: {args.text} has only {all_ids.shape[1]} tokens, {use} needed")
        prompts.append((n, all_ids[:, :use].contiguous()))

    configs = [(FULL, None)] + [(m, make_method(m, args.budget, args.ratio)) for m in args.methods]
    warm = all_ids[:, : args.warmup_tokens].contiguous()
    runs: dict[tuple[int, str], list[dict]] = {}
    with CompressionTimer() as timer, CompressionTimer(ops, "global_scores") as global_timer:
        for name, method in tqdm(configs, desc="warm-up", file=sys.stdout):
            run_once(model, warm, method, min(2, args.new_tokens), timer, global_timer)
        bar = tqdm(total=len(prompts) * args.repeats * len(configs), desc="runs", file=sys.stdout)
        for n, ids in prompts:
            for rep in range(args.repeats):
                for name, method in configs:
                    bar.set_postfix_str(f"{ids.shape[1]} tok {name}")
                    r = run_once(model, ids, method, args.new_tokens, timer, global_timer)
                    runs.setdefault((n, name), []).append(r)
                    steps = r["decode_step_s"]
                    med = 1e3 * statistics.median(steps) if steps else float("nan")
                    bar.write(
                        f"{ids.shape[1]:>5} tok  {name:<13} rep {rep}  prefill {r['prefill_s']:7.2f} s "
                        f"(compression {r['prefill_compress_s']:6.2f})  decode {med:7.1f} ms/tok  peak "
                        f"{r['peak_rss'] / MiB:6.0f} MiB (+{(r['peak_rss'] - r['rss_before']) / MiB:.0f})  cache "
                        f"{r['cache_bytes'] / MiB:7.2f} MiB  others {r['others_cores']:.2f} cores"
                    )
                    bar.update(1)
        bar.close()

    records = []
    for n, ids in prompts:
        full = summarize(runs[(n, FULL)])
        for name, method in configs:
            s = summarize(runs[(n, name)])
            match = sum(a == b for a, b in zip(s["tokens"], full["tokens"]))
            records.append(dict(
                tokens_requested=n, tokens_prompt=int(ids.shape[1]), config=name,
                method=method.describe() if method is not None else "full cache (DynamicCache)",
                **s,
                prefill_ratio=s["prefill_s"] / full["prefill_s"],
                decode_ratio=s["decode_ms_median"] / full["decode_ms_median"],
                bytes_ratio=s["cache_bytes"] / full["cache_bytes"],
                tokens_match=match, tokens_total=len(full["tokens"]),
                runs=[{k: v for k, v in r.items() if k != "tokens"} for r in runs[(n, name)]],
            ))
    lines = table_lines(records)
    print("\n".join(lines))

    command = command_line(__file__, argv)
    size = f"budget={args.budget}" if args.budget is not None else f"ratio={args.ratio}"
    if any("@" in m for m in args.methods):
        size += " (SPEC@N: budget N)"
    result = dict(
        command=command, date=now(), machine=info, model=f"{model_name} (float32)",
        max_position_embeddings=max_pos, beyond_context=args.beyond_context, text=os.path.basename(args.text),
        size=size,
        new_tokens=args.new_tokens, repeats=args.repeats, warmup_tokens=args.warmup_tokens, records=records,
    )
    if args.no_write:
        return result
    section = [
        f"## bench_generate ({result['date']})",
        "",
        f"Command: `{command}`",
        "",
        machine_line(info) + f" Threads: {args.threads}.",
        "",
        f"Model {model_name} (float32), batch 1, prompts = first N tokens of "
        f"{result['text']}, methods with {size} and default parameters, {args.new_tokens} greedy decode steps, "
        f"{args.repeats} run(s) per configuration after one warm-up pass ({args.warmup_tokens}-token prompt). "
        "Prefill s = one forward over the prompt (compression included, logits of the last position only) "
        "+ argmax. Decode ms/tok = median (and mean) of the per-step times of `model(next_token, "
        "cache=cache)` + argmax. Compression s and ms/tok: time inside `CompressedLayer.after_attention` "
        "(scoring, selection, gather; all layers) during the prefill, and per decode step on average; "
        "global score s: the part of it spent in `ops.global_scores` (EMS). "
        "Peak RSS = process VmHWM during the run (reset via /proc/self/clear_refs before it); peak − before = growth over the RSS just before the run. Cache MiB = "
        "storage held by the cache after the last step (mean / peak: over the decode steps, read after each). "
        "×full = ratio to the full-cache (DynamicCache) row of "
        "the same prompt. Tokens = full: generated tokens (prefill's + decode steps') equal to the full "
        "cache's, position by position. Others' CPU = mean cores used by other processes during the run "
        f"(from /proc/stat; the machine has {info['cores']} cores and is shared, so a run with a high value was "
        "slowed down by someone else).",
        *(["", f"Prompts longer than max_position_embeddings={max_pos} were not cut (`--beyond-context`): "
               "their times are valid, their generated tokens are past the model's trained context."]
          if args.beyond_context else []),
        "",
        *lines,
    ]
    name = "bench_generate_quick" if args.quick else "bench_generate"
    path = write_results(name, result, section, json_path=args.json)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
