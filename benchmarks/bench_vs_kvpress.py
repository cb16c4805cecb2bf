"""NVIDIA kvpress vs kvcompress on the default model, same prompts and settings, one run.

(a) Kept-set overlap per layer x kv head for SnapKV, StreamingLLM, Knorm and
    observed attention (kvpress ObservedAttentionPress vs our H2O), with our
    settings first at their defaults and then aligned step by step to kvpress's.
(b) Passkey accuracy and fidelity (KL, top-1) via ``kvcompress.testing``, which
    runs a kvpress press as a callable context manager with a DynamicCache.
(c) Compression-step time inside the prefill (hooks timed directly) and
    prefill + ``--new-tokens`` greedy decode time, full cache included.
(d) Bytes the cache holds after the prefill.

kvpress 0.5.5 pins transformers <5.3, so this runs in its own virtualenv:

    make bench-kvpress                                    # creates .venv-kvpress, then runs this
    .venv-kvpress/bin/python benchmarks/bench_vs_kvpress.py [--quick]

How kept sets are recovered (no scoring is re-implemented): for kvpress, the
press's ``compress`` is wrapped; inside the hook the press's own ``score()`` is
called (via ``dataclasses.replace`` for each ratio) and the same
``scores.topk(compute_n_kept(k_len, ratio))`` as ``ScorerPress.compress`` is
taken; for the press's own ratio the recorded indices are checked to
reproduce, bit for bit, the keys kvpress stored. For kvcompress, the method's
``select`` (what the cache calls) is wrapped the same way and, for the ratio
that ran, checked against ``cache.layers[i].positions``. So one prefill per
method gives the kept sets at every ratio; compression happens after each
layer's attention, so it never changes what later layers see in a prefill.

Generation: every run goes through ``kvcompress.testing.greedy``, which passes
positions ``T + i`` explicitly, as kvpress's own pipeline does. (Plain
``model.generate`` under ``with press(model):`` is also position-correct with
transformers 5.2, because generate advances ``cache_position`` by itself
instead of reading the shrunken cache length: checked on a 1500-token prompt,
where the rotary positions were 1500, 1501, ... and the tokens were identical to
the explicit loop.)
"""

from __future__ import annotations

import os

# The GGUF loader draws progress bars with tqdm, which reads TQDM_* at import.
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import importlib.metadata  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import kvcompress as kvc  # noqa: E402
from kvcompress import testing  # noqa: E402
from kvcompress.cache import CompressedLayer  # noqa: E402
from kvcompress.compat import cache_kwargs, pop_cache  # noqa: E402

from _common import command_line, machine, machine_line, now, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
SHARED_TEXT = Path(kvc.__file__).resolve().parent / "data" / "shakespeare.txt"  # the packaged text
NAME = "bench_vs_kvpress"


# --------------------------------------------------------------------- methods


class Eager:
    """``press(model)`` under eager attention (ObservedAttentionPress reads the
    attention weights, which only the eager attention returns). ``press=None``
    gives the full cache under eager attention, the baseline for timing it."""

    def __init__(self, press=None):
        self.press = press

    @contextlib.contextmanager
    def __call__(self, model):
        previous = model.config._attn_implementation
        model.set_attn_implementation("eager")
        try:
            with self.press(model) if self.press is not None else contextlib.nullcontext():
                yield
        finally:
            model.set_attn_implementation(previous)


@dataclasses.dataclass
class H2OSeenMean(kvc.H2O):
    """Benchmark-only variant of our H2O: the accumulated attention of each slot
    divided by the number of queries that saw it (``n - j`` in a single-chunk,
    unpadded prefill), which is kvpress ObservedAttentionPress's normalisation.
    Used only to show that this normalisation is the whole difference."""

    def score(self, view):
        acc = view.state["acc"]
        n = acc.shape[-1]
        return acc / torch.arange(n, 0, -1, dtype=acc.dtype, device=acc.device)


def press_inner(press):
    return press.press if isinstance(press, Eager) else press


def fresh(press):
    """A copy of ``press`` without instance-level wrappers."""
    if isinstance(press, Eager):
        return Eager(fresh(press.press)) if press.press is not None else Eager()
    return dataclasses.replace(press)


#: --families: the families to run (None: all)
ONLY: list[str] | None = None


def families(ratio: float):
    """(family, kvpress press, [(label, our method)]) with the last of ours
    matched to kvpress's definition as closely as our API allows."""
    return [f for f in _families(ratio) if ONLY is None or f[0] in ONLY]


def _families(ratio: float):
    import kvpress

    return [
        ("SnapKV", kvpress.SnapKVPress(compression_ratio=ratio, window_size=64, kernel_size=5), [
            ("SnapKV() defaults: window 32, kernel 7, max pool", kvc.SnapKV(ratio=ratio)),
            ("window 64, kernel 5, max pool", kvc.SnapKV(ratio=ratio, window=64, kernel=5, pool="max")),
            ("window 64, kernel 5, avg pool (= kvpress)",
             kvc.SnapKV(ratio=ratio, window=64, kernel=5, pool="avg")),
        ]),
        ("StreamingLLM", kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=4), [
            ("StreamingLLM(sinks=4) (= kvpress)", kvc.StreamingLLM(ratio=ratio, sinks=4)),
        ]),
        ("Knorm", kvpress.KnormPress(compression_ratio=ratio), [
            ("Knorm() (= kvpress)", kvc.Knorm(ratio=ratio)),
        ]),
        ("LagKV", kvpress.LagKVPress(compression_ratio=ratio, n_sink=4, lag_size=128), [
            ("LagKV() defaults: sinks 4, lag 128, per-chunk shares (= kvpress)", kvc.LagKV(ratio=ratio)),
        ]),
        ("LagKV, global top-k", kvpress.LagKVPress(compression_ratio=ratio, n_sink=4, lag_size=128,
                                                  cross_scoring=True), [
            ("LagKV(per_chunk=False): global top-k of the raw scores (= kvpress)",
             kvc.LagKV(ratio=ratio, per_chunk=False)),
        ]),
        ("Observed attention / H2O", Eager(kvpress.ObservedAttentionPress(compression_ratio=ratio)), [
            ("H2O() defaults: recent=0.5, summed attention", kvc.H2O(ratio=ratio)),
            ("H2O(recent=0), summed attention", kvc.H2O(ratio=ratio, recent=0.0)),
            ("H2O(recent=0), sum / queries that saw the slot (= kvpress; benchmark-only subclass)",
             H2OSeenMean(ratio=ratio, recent=0.0)),
        ]),
    ]


def press_label(press) -> str:
    inner = press_inner(press)
    fields = {f.name: getattr(inner, f.name) for f in dataclasses.fields(inner)}
    args = ", ".join(f"{k}={v}" for k, v in fields.items())
    return f"{type(inner).__name__}({args})" + (" [eager]" if isinstance(press, Eager) else "")


# --------------------------------------------------------- kept-set recording


class KvpressKept:
    """Records the slots a kvpress ``ScorerPress`` keeps in each layer, at every
    ratio in ``ratios``, using the press's own ``score()`` and top-k."""

    def __init__(self, press, ratios):
        from kvpress.utils import compute_n_kept

        inner = press_inner(press)
        self.kept: dict[int, dict[float, torch.Tensor]] = {}
        self.gaps: dict[int, dict[float, torch.Tensor]] = {}
        self.mismatched: list[int] = []
        original = inner.compress
        own_ratio = inner.compression_ratio

        def compress(module, hidden_states, keys, values, attentions, kwargs):
            k_len = keys.shape[2]
            rec, gaps = {}, {}
            for r in ratios:
                scores = dataclasses.replace(inner, compression_ratio=r).score(
                    module, hidden_states, keys, values, attentions, kwargs)
                k = compute_n_kept(k_len, r)
                rec[r] = scores.topk(k, dim=-1).indices
                # How close the choice was: relative gap between kvpress's k-th
                # and (k+1)-th scores, per kv head (0 = a tie at the boundary).
                if k < k_len:
                    top = scores.float().topk(k + 1, dim=-1).values
                    gaps[r] = ((top[..., k - 1] - top[..., k]) / top[..., k - 1].abs().clamp_min(1e-30))[0]
            out_k, out_v = original(module, hidden_states, keys, values, attentions, kwargs)
            idx = rec[own_ratio]
            again = keys.gather(2, idx[..., None].expand(-1, -1, -1, keys.shape[3]))
            if not torch.equal(again, out_k):
                self.mismatched.append(module.layer_idx)
            self.kept[module.layer_idx] = {r: v.sort(dim=-1).values for r, v in rec.items()}
            self.gaps[module.layer_idx] = gaps
            return out_k, out_v

        inner.compress = compress


class OursKept:
    """Records the slots a kvcompress method keeps in each layer at every ratio
    in ``ratios`` by wrapping ``method.select`` (what the cache calls)."""

    def __init__(self, method, ratios):
        self.kept: dict[int, dict[float, torch.Tensor]] = {}
        original = method.select

        def select(view, keep):
            rec = {}
            for r in ratios:
                k_r = dataclasses.replace(method, ratio=r).row_target(view.layer_idx, view.num_layers,
                                                                      view.length)
                rec[r] = original(view, k_r)
            self.kept[view.layer_idx] = rec
            return original(view, keep)

        method.select = select

    def mismatched(self, cache, ratio) -> list[int]:
        return [i for i, layer in enumerate(cache.layers)
                if not torch.equal(layer.positions.long(), self.kept[i][ratio])]


def prefill(model, method, ids):
    """Prefill ``ids`` with ``method`` (None, ours, or a press); return the cache."""
    with testing.method_context(model, method) as new_cache, torch.inference_mode():
        cache = new_cache()
        model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    return cache


def overlap_cells(ours: torch.Tensor, theirs: torch.Tensor, n: int):
    """Per kv head: |ours ∩ theirs| / |ours| and Jaccard, for ``[1, H, k]`` index sets."""
    a = torch.zeros(ours.shape[1], n, dtype=torch.bool).scatter_(1, ours[0], True)
    b = torch.zeros(theirs.shape[1], n, dtype=torch.bool).scatter_(1, theirs[0], True)
    inter = (a & b).sum(-1).double()
    union = (a | b).sum(-1).double()
    return (inter / a.sum(-1)).tolist(), (inter / union).tolist()


def part_a(model, prompts, ratios, log):
    primary = ratios[0]
    rows = []
    checks = []
    for family, press, ours in families(primary):
        cells = {(label, r): [] for label, _ in ours for r in ratios}
        for p_idx, ids in enumerate(prompts):
            n = ids.shape[1]
            theirs = fresh(press)
            rec_t = KvpressKept(theirs, ratios)
            prefill(model, theirs, ids)
            checks.append(dict(side="kvpress", family=family, prompt=p_idx, layers=len(rec_t.kept),
                               mismatched_layers=rec_t.mismatched))
            for label, method in ours:
                method = dataclasses.replace(method)
                rec_o = OursKept(method, ratios)
                cache = prefill(model, method, ids)
                checks.append(dict(side="kvcompress", family=family, variant=label, prompt=p_idx,
                                   layers=len(rec_o.kept), mismatched_layers=rec_o.mismatched(cache, primary)))
                for r in ratios:
                    for layer in sorted(rec_t.kept):
                        o, t = rec_o.kept[layer][r], rec_t.kept[layer][r]
                        frac, jac = overlap_cells(o, t, n)
                        gap = rec_t.gaps[layer].get(r)
                        for h, (f, j) in enumerate(zip(frac, jac)):
                            cells[(label, r)].append(dict(
                                prompt=p_idx, layer=layer, head=h, overlap=f, jaccard=j, kept_ours=int(o.shape[2]),
                                kept_kvpress=int(t.shape[2]), gap=None if gap is None else float(gap[h])))
            log(f"(a) {family}: prompt {p_idx} ({n} tokens) done")
        for label, method in ours:
            for r in ratios:
                cs = cells[(label, r)]
                worst = min(cs, key=lambda c: c["overlap"])
                rows.append(dict(
                    family=family, kvpress=press_label(dataclasses.replace(press_inner(press), compression_ratio=r))
                    + (" [eager]" if isinstance(press, Eager) else ""),
                    ours=label, ours_method=dataclasses.replace(method, ratio=r).describe(), ratio=r,
                    cells=len(cs), mean_overlap=statistics.fmean(c["overlap"] for c in cs),
                    min_overlap=worst["overlap"], min_at=dict(prompt=worst["prompt"], layer=worst["layer"],
                                                              head=worst["head"]),
                    mean_jaccard=statistics.fmean(c["jaccard"] for c in cs),
                    identical=sum(c["overlap"] == 1.0 for c in cs) / len(cs),
                    same_count=all(c["kept_ours"] == c["kept_kvpress"] for c in cs),
                    differing_cells=sum(c["overlap"] < 1.0 for c in cs),
                    max_gap_where_differing=max((c["gap"] for c in cs if c["overlap"] < 1.0 and c["gap"] is not None),
                                                default=None),
                    median_gap=statistics.median(c["gap"] for c in cs) if cs[0]["gap"] is not None else None,
                    per_layer_mean=[statistics.fmean(c["overlap"] for c in cs if c["layer"] == layer)
                                    for layer in sorted({c["layer"] for c in cs})],
                ))
    return rows, checks


# ------------------------------------------------------------ (b) quality


def part_b(model, tok, ratios, text, args, log):
    fid_texts = passages(text, args.fidelity_texts, args.fidelity_context * 8, seed=1)
    depths = tuple(args.depths)
    rows = []

    def run(family, side, label, method, ratio):
        t0 = time.perf_counter()
        pk = testing.passkey_accuracy(model, tok, method, lengths=(args.passkey_filler,), depths=depths,
                                      filler_text=text, seed=0)
        row = dict(family=family, side=side, method=label, ratio=ratio, passkey=pk.accuracy,
                   passkey_cases=[dict(depth=c.depth, key=c.key, answer=c.answer, ok=c.ok,
                                       prompt_tokens=c.prompt_tokens, cache_bytes=c.cache_bytes)
                                  for c in pk.cases],
                   passkey_cache_bytes=pk.cache_bytes)
        if method is not None:
            fid = testing.fidelity(model, tok, method, fid_texts, context_tokens=args.fidelity_context,
                                   k=args.fidelity_k)
            row.update(kl=fid.kl, kl_max=fid.kl_max, top1=fid.top1)
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        log(f"(b) {label} ratio={ratio}: passkey {pk.accuracy:.2f}" +
            (f", KL {row['kl']:.4f}, top-1 {row['top1']:.2f}" if "kl" in row else "") + f" [{row['seconds']:.0f} s]")

    run("full cache", "-", "full cache", None, 0.0)
    for r in ratios:
        for family, press, ours in families(r):
            run(family, "kvpress", press_label(press), press, r)
            # matched settings; for H2O the closest built-in (recent=0) and our default
            for label, method in (ours[:2] if family == "Observed attention / H2O" else ours[-1:]):
                run(family, "kvcompress", method.describe(), method, r)
    return rows


# ------------------------------------------------------- (c)+(d) timing, bytes


def kv_bytes(cache) -> int:
    """Bytes of the live key/value slots (what both libraries must keep)."""
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
    return total


def part_cd(model, ratio, ids, args, log):
    full = [("full cache", "-", "full cache (SDPA)", None), ("full cache", "-", "full cache (eager)", Eager())]
    configs = list(full)
    for family, press, ours in families(ratio):
        label, method = ours[-1] if family != "Observed attention / H2O" else ours[1]
        configs.append((family, "kvcompress", method.describe(), method))
        configs.append((family, "kvpress", press_label(press), press))

    spent = {"prefill": 0.0, "decode": 0.0}
    original_after = CompressedLayer.after_attention

    def timed_after(self, queries, scaling):
        t0 = time.perf_counter()
        original_after(self, queries, scaling)
        spent["prefill" if queries is not None and queries.shape[2] > 1 else "decode"] += time.perf_counter() - t0

    def time_press_hook(press):
        inner = press_inner(press)
        original = type(inner).forward_hook

        def forward_hook(module, inputs, kwargs, output):
            t0 = time.perf_counter()
            out = original(inner, module, inputs, kwargs, output)
            spent["prefill" if kwargs["hidden_states"].shape[1] > 1 else "decode"] += time.perf_counter() - t0
            return out

        # BasePress.__call__ registers self.forward_hook: the instance attribute wins.
        inner.forward_hook = forward_hook

    for _, side, _, m in configs:
        if side == "kvpress":
            time_press_hook(m)

    runs = {label: [] for _, _, label, _ in configs}
    T = ids.shape[1]
    CompressedLayer.after_attention = timed_after
    try:
        with torch.inference_mode():
            model(input_ids=ids[:, :128], logits_to_keep=1)  # warm-up
        for rep in range(args.repeats):
            for family, side, label, method in configs:
                stamps, info = [], {}

                def hook(module, a, kwargs, output):
                    stamps.append(time.perf_counter())
                    if len(stamps) == 1:
                        cache = pop_cache(dict(kwargs))
                        info.update(bytes=testing.cache_bytes(cache), kv_bytes=kv_bytes(cache),
                                    slots=statistics.fmean(int(layer.keys.shape[2]) for layer in cache.layers))
                        stamps.append(time.perf_counter())  # resume: the byte count is not timed

                spent["prefill"] = spent["decode"] = 0.0
                handle = model.register_forward_hook(hook, with_kwargs=True)
                try:
                    with testing.method_context(model, method) as new_cache:
                        cache = new_cache()
                        t0 = time.perf_counter()
                        tokens, _ = testing.greedy(model, cache, ids, args.new_tokens)
                        t1 = time.perf_counter()
                finally:
                    handle.remove()
                paused = stamps[1] - stamps[0]
                runs[label].append(dict(
                    prefill_s=stamps[0] - t0, decode_s=t1 - stamps[1], total_s=t1 - t0 - paused,
                    compress_prefill_s=spent["prefill"], compress_decode_s=spent["decode"],
                    new_tokens=len(tokens), **info))
            log(f"(c) repeat {rep + 1}/{args.repeats} done")
    finally:
        CompressedLayer.after_attention = original_after

    rows = []
    for family, side, label, method in configs:
        rs = runs[label]
        med = {k: statistics.median(r[k] for r in rs)
               for k in ("prefill_s", "decode_s", "total_s", "compress_prefill_s", "compress_decode_s")}
        rows.append(dict(family=family, side=side, method=label, ratio=0.0 if method is None else ratio,
                         tokens=T, eager=isinstance(method, Eager), **med, bytes=rs[0]["bytes"],
                         kv_bytes=rs[0]["kv_bytes"], slots=rs[0]["slots"], new_tokens=rs[0]["new_tokens"], runs=rs))
    return rows


# --------------------------------------------------------------------- text


def passages(text: str, n: int, chars: int, *, seed: int) -> list[str]:
    rnd = random.Random(seed)
    return [text[s: s + chars] for s in (rnd.randrange(0, len(text) - chars) for _ in range(n))]


def prompts_from(tok, text: str, lengths, seed: int = 0):
    out = []
    for i, T in enumerate(lengths):
        (chunk,) = passages(text, 1, T * 8, seed=seed + i)
        ids = tok(chunk, add_special_tokens=False)["input_ids"]
        if len(ids) < T:
            raise ValueError(f"--text: a {T * 8}-character passage has only {len(ids)} tokens, need {T}")
        out.append(torch.tensor([ids[:T]]))
    return out


# ----------------------------------------------------------------- report


EXPLAIN = {
    "SnapKV": (
        "kvpress SnapKVPress (0.5.5) scores slot j by the softmax attention of the last `window_size` (64) "
        "queries averaged over those queries, applies `avg_pool1d(kernel_size=5, padding=2)` (zero padding counted) "
        "per query head, then takes the mean over the GQA group; the window is left out of the pooling and given "
        "the score max+1, so it is always kept; kept count `int(n*(1-ratio))`. Our SnapKV computes the same "
        "attention in C (GQA mean first, which commutes with average pooling) and always keeps the last `window` "
        "slots, but its defaults are window 32, kernel 7 and max pooling. The rows align one setting at a time: "
        "window and kernel first, then pooling. Once all three match: {matched}. Caveat: when the kept count is "
        "below the window (short prompts), kvpress's top-k chooses arbitrarily among the window's tied max+1 "
        "scores, while we keep the most recent slots."
    ),
    "StreamingLLM": (
        "Both keep the first 4 tokens and the last `int(n*(1-ratio)) - 4`. kvpress does this by setting the "
        "scores of slots 4..4+n_pruned to 0 and the others to 1, then taking the top-k: {matched}."
    ),
    "Knorm": (
        "Both score `-||k_j||_2` of the post-RoPE keys in float32 and keep the top `int(n*(1-ratio))`: {matched}. "
        "Exact ties are real here: in layer 0 the keys are projections of the token embeddings, so a token that "
        "occurs twice has the same key norm at both positions (RoPE preserves norms). When such a tie falls on the "
        "top-k boundary, `torch.topk` (kvpress) and our `select_topk` (ties to the lower index) may keep different "
        "copies."
    ),
    "LagKV": (
        "Both follow the LagKV paper: after 4 sinks, chunks of 128 tokens are min-max normalised per channel by "
        "the next chunk, a token scores softmax_chunk(std(K)) + softmax_chunk(std(V)) (kvpress halves the sum, "
        "which ranks the same), the last whole chunk and the partial one are kept whole, and a prompt shorter "
        "than sinks + 2 lags keeps its sinks and newest tokens. kvpress turns the scores into each token's rank in "
        "its chunk divided by 128 and takes a global top-k, so every chunk keeps the same number of tokens; where "
        "the count does not divide, `torch.topk` picks which chunks keep one more among equal ranks, while we "
        "give them to the newest chunks. Our scores are float32 C, theirs PyTorch in the model dtype (float32 "
        "here); a channel whose reference chunk is constant gives NaN there and 0 here (not met on these "
        "prompts, whose keys are never constant over 128 tokens): {matched}."
    ),
    "LagKV, global top-k": (
        "kvpress `cross_scoring=True` keeps the global top-k of the raw scores (averaged instead of summed), "
        "with sinks and tail scored 1; ours (`per_chunk=False`) the same with sinks and tail forced: {matched}."
    ),
    "Observed attention / H2O": (
        "kvpress ObservedAttentionPress needs eager attention. It scores slot j by the attention it receives from "
        "*all* prompt queries, divided by the number of queries that can see it (`n - j`) and averaged over the "
        "GQA group, with no forced window. Our H2O adds up that attention (H2O's definition, and it keeps doing "
        "so while decoding) and by default reserves `recent=0.5` of the budget for the most recent slots. We allow "
        "recent=0, but we have no option for the mean: a sum favours early slots because more queries see them, "
        "a mean favours late ones. A subclass written for this benchmark divides our sum by `n - j` (last row), "
        "and then: {matched}. So the normalisation and the recent window account for the whole difference."
    ),
}


def describe_matched(rows) -> str:
    out = []
    for r in rows:
        d = (f"ratio {r['ratio']}: mean overlap {r['mean_overlap']:.4f}, min {r['min_overlap']:.4f}, "
             f"{r['differing_cells']} of {r['cells']} layer x head cells differ")
        if r["differing_cells"] and r["max_gap_where_differing"] is not None:
            g = r["max_gap_where_differing"]
            d += (" (all of them exact ties in kvpress's scores at the top-k boundary, which its top-k breaks "
                  "arbitrarily)" if g == 0 else
                  f" (in those cells kvpress's k-th and (k+1)-th scores are at most {g:.1e} apart relative to the "
                  f"score, against a median boundary gap of {r['median_gap']:.1e} over all cells: near-ties that "
                  "float32 rounding decides, between kvpress's PyTorch ops and our C kernels)")
        out.append(d)
    return "; ".join(out)


def fmt_bytes(b: float) -> str:
    return f"{b / 2**20:.2f}"


def report(result, args) -> list[str]:
    a, b, cd = result["overlap"], result["quality"], result["timing"]
    v = result["versions"]
    cmd = result["command"]
    make = f"make bench-kvpress{' ARGS=' + repr(' '.join(result['argv'])) if result['argv'] else ''}"
    how = (f"`{make}`, which runs `{cmd}`" if result["via_make"] else
           f"`{cmd}` (`{make}` creates .venv-kvpress and runs the same)")
    lines = [
        f"## {NAME} ({result['date']})",
        "",
        f"Command: {how}; total {result['seconds']:.0f} s, model load included.",
        "",
        machine_line(result["machine"]),
        f"kvpress {v['kvpress']}, transformers {v['transformers']}, torch {v['torch']}, kvcompress {v['kvcompress']}. "
        f"Default model (SmolLM2-135M-Instruct, fp32, 30 layers, 3 kv heads); text `{result['text']}`.",
        "",
    ]
    if a:
        ok_t = all(not c["mismatched_layers"] for c in result["overlap_checks"] if c["side"] == "kvpress")
        ok_o = all(not c["mismatched_layers"] for c in result["overlap_checks"] if c["side"] == "kvcompress")
        lines += [
            f"### (a) Kept-set overlap, {len(result['overlap_prompt_tokens'])} prompts of "
            f"{', '.join(map(str, result['overlap_prompt_tokens']))} tokens",
            "",
            "Per layer x kv head: overlap = |ours ∩ kvpress| / |kept|, Jaccard = |∩| / |∪|; mean and minimum over "
            "prompts x 30 layers x 3 kv heads; \"identical\" = fraction of cells with exactly the same set. "
            f"Recorded kept sets reproduce what was stored: kvpress {'yes' if ok_t else 'NO'} (keys bit-equal), "
            f"kvcompress {'yes' if ok_o else 'NO'} (`positions`), at ratio {args.ratios[0]}; the other ratio "
            "comes from the same prefill through the same score/top-k code.",
            "",
            "| method | kvpress | ours | ratio | mean overlap | min overlap (prompt/layer/head) | mean Jaccard "
            "| identical |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in a:
            at = r["min_at"]
            lines.append(f"| {r['family']} | {r['kvpress']} | {r['ours']} | {r['ratio']} | {r['mean_overlap']:.4f} | "
                         f"{r['min_overlap']:.4f} ({at['prompt']}/{at['layer']}/{at['head']}) | "
                         f"{r['mean_jaccard']:.4f} | {100 * r['identical']:.1f}% |")
        lines += ["", "Why they differ:", ""]
        for family, text in EXPLAIN.items():
            matched = [r for r in a if r["family"] == family and "(= kvpress" in r["ours"]]
            if not matched:
                continue
            lines.append(f"- **{family}.** " + text.format(matched=describe_matched(matched)))
        lines.append("")
    if b:
        lines += [
            "### (b) Passkey and fidelity (kvcompress.testing)",
            "",
            f"Passkey: {args.passkey_filler} filler tokens at depths {', '.join(map(str, args.depths))} "
            f"(~{b[0]['passkey_cases'][0]['prompt_tokens']} prompt tokens), 8 greedy tokens. Fidelity: "
            f"{args.fidelity_texts} passage(s) of {args.fidelity_context} tokens, {args.fidelity_k} teacher-forced steps "
            "vs the full cache: mean KL(full ‖ method) in nats and top-1 agreement. Both libraries run through the "
            "same loop with explicit positions (kvpress: its press as a context manager over a DynamicCache). "
            "Our settings are the matched ones from (a); for H2O, the closest built-in setting (recent=0) and our "
            "default (recent=0.5), since the exact kvpress normalisation is not an option of ours.",
            "",
            "| method | library | settings | ratio | passkey | KL nats | top-1 |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        for r in b:
            kl = f"{r['kl']:.4f}" if "kl" in r else "0"
            top1 = f"{r['top1']:.3f}" if "top1" in r else "1"
            lines.append(f"| {r['family']} | {r['side']} | {r['method']} | {r['ratio']} | "
                         f"{sum(c['ok'] for c in r['passkey_cases'])}/{len(r['passkey_cases'])} | {kl} | {top1} |")
        lines.append("")
    if cd:
        base = {r["method"]: r for r in cd if r["side"] == "-"}
        sdpa, eager = base["full cache (SDPA)"], base["full cache (eager)"]
        T = cd[0]["tokens"]
        lines += [
            f"### (c) Time: {T}-token prefill + {args.new_tokens} greedy tokens, ratio {args.time_ratio}",
            "",
            f"Medians of {args.repeats} interleaved repeats. \"compression step\" = time inside the compression hooks "
            "during the prefill, measured directly (ours: `CompressedLayer.after_attention`; kvpress: `press.forward_hook`, "
            "which for SnapKV includes re-projecting the window's queries). Overhead = prefill minus the full-cache "
            "prefill with the same attention (SDPA; eager for ObservedAttentionPress). All runs use "
            "`kvcompress.testing.greedy` (explicit positions T+i, like kvpress's pipeline). Decode-phase work of "
            "our decode-policy methods (StreamingLLM, H2O accumulate/re-compress every 16 tokens) is in \"decode "
            "compression\". Run-to-run spread of the full SDPA prefill: "
            f"{min(r['prefill_s'] for r in sdpa['runs']):.2f}-{max(r['prefill_s'] for r in sdpa['runs']):.2f} s; "
            "prefill differences smaller than that are noise, the directly timed compression step is not.",
            "",
            "| method | library | settings | prefill s | compression step s | prefill overhead | decode s "
            f"({args.new_tokens - 1} steps) | decode compression s | prefill + decode s |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in cd:
            ref = eager if r["eager"] else sdpa
            over = "—" if r["side"] == "-" else f"{r['prefill_s'] - ref['prefill_s']:+.2f} s"
            lines.append(f"| {r['family']} | {r['side']} | {r['method']} | {r['prefill_s']:.2f} | "
                         f"{r['compress_prefill_s']:.3f} | {over} | {r['decode_s']:.2f} | "
                         f"{r['compress_decode_s']:.3f} | {r['total_s']:.2f} |")
        lines += [
            "",
            f"### (d) Cache held after the {T}-token prefill, ratio {args.time_ratio}",
            "",
            "\"held\" = bytes of every storage the cache references (kvpress: the DynamicCache's key/value "
            "tensors; ours: `memory_bytes()`, which also counts int32 `positions`, `kv_start` and H2O's float32 "
            "scores); \"K/V\" = bytes of the live key/value slots only. Second table: largest cache over the (b) "
            "passkey cases at each ratio, after 8 generated tokens. There ours holds more than kvpress because our "
            "first decode append reserves slack (32 slots per layer; for decode-policy methods at most "
            "budget + interval), so later steps append without copying, whereas the DynamicCache `torch.cat`s "
            "the whole layer every step and stays exact.",
            "",
            "| method | library | settings | slots per layer | held MiB | K/V MiB | held / full |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        for r in cd:
            if r["method"] == "full cache (eager)":
                continue
            lines.append(f"| {r['family']} | {r['side']} | {r['method']} | {r['slots']:.0f} | {fmt_bytes(r['bytes'])} | "
                         f"{fmt_bytes(r['kv_bytes'])} | {r['bytes'] / sdpa['bytes']:.3f} |")
        if b:
            lines += ["", "| method | library | settings | ratio | passkey cache MiB |", "|---|---|---|---:|---:|"]
            for r in b:
                lines.append(f"| {r['family']} | {r['side']} | {r['method']} | {r['ratio']} | "
                             f"{fmt_bytes(r['passkey_cache_bytes'])} |")
        lines.append("")
    return lines


# --------------------------------------------------------------------- main


def parse_floats(s):
    return [float(x) for x in s.split(",") if x.strip()]


def parse_ints(s):
    return [int(x) for x in s.split(",") if x.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default=None,
                        help="text file for prompts and passkey filler (default: the text kvcompress ships)")
    parser.add_argument("--ratios", type=parse_floats, default=[0.5, 0.75],
                        help="compression ratios (fraction removed); the first is the one that runs in (a)")
    parser.add_argument("--overlap-tokens", type=parse_ints, default=[1024, 1024, 1024],
                        help="prompt lengths for (a), one prompt each, from different offsets of the text")
    parser.add_argument("--passkey-filler", type=int, default=1000)
    parser.add_argument("--depths", type=parse_floats, default=[0.1, 0.5, 0.9])
    parser.add_argument("--fidelity-texts", type=int, default=1)
    parser.add_argument("--fidelity-context", type=int, default=512)
    parser.add_argument("--fidelity-k", type=int, default=16)
    parser.add_argument("--time-tokens", type=int, default=1536)
    parser.add_argument("--time-ratio", type=float, default=0.5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default="abcd", help="subset of a, b, c (c includes d)")
    parser.add_argument("--families", default=None,
                        help="';'-separated subset of the families, e.g. 'LagKV;LagKV, global top-k' "
                             "(default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run; writes nothing unless --write")
    parser.add_argument("--write", action="store_true", help="with --quick: write results anyway")
    args = parser.parse_args()
    if args.quick:
        args.overlap_tokens, args.passkey_filler, args.depths = [200, 300], 200, [0.5]
        args.fidelity_texts, args.fidelity_context, args.fidelity_k = 1, 128, 4
        args.time_tokens, args.new_tokens, args.repeats = 256, 4, 1
    write = not args.quick or args.write
    global ONLY
    ONLY = None if args.families is None else [f.strip() for f in args.families.split(";") if f.strip()]

    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.1f} s] {msg}", flush=True)

    text_path = Path(args.text) if args.text else (SHARED_TEXT if SHARED_TEXT.exists() else None)
    text = text_path.read_text(encoding="utf-8") if text_path else kvc.tasks.default_text()
    info = machine()
    versions = {p: importlib.metadata.version(p) for p in ("kvpress", "transformers", "torch", "kvcompress")}
    model, tok = kvc.load_default_model()
    log(f"model loaded; versions {versions}")

    cmd = command_line(__file__)
    exe = Path(sys.executable)
    if exe.is_relative_to(HERE.parent):
        cmd = str(exe.relative_to(HERE.parent)) + cmd[len("python"):]
    result = dict(date=now(), command=cmd, argv=sys.argv[1:], via_make="MAKELEVEL" in os.environ,
                  machine=info, versions=versions,
                  text=str(text_path) if text_path else "kvcompress packaged text", args=vars(args),
                  overlap=[], overlap_checks=[], quality=[], timing=[])
    if "a" in args.parts:
        prompts = prompts_from(tok, text, args.overlap_tokens)
        result["overlap_prompt_tokens"] = [int(p.shape[1]) for p in prompts]
        result["overlap"], result["overlap_checks"] = part_a(model, prompts, args.ratios, log)
    if "b" in args.parts:
        result["quality"] = part_b(model, tok, args.ratios, text, args, log)
    if "c" in args.parts or "d" in args.parts:
        (ids,) = prompts_from(tok, text, [args.time_tokens], seed=100)
        result["timing"] = part_cd(model, args.time_ratio, ids, args, log)
    result["seconds"] = time.perf_counter() - t_start
    lines = report(result, args)
    print("\n".join(lines))
    if write:
        # a subset of the families must not overwrite the full comparison's JSON
        slug = None if ONLY is None else "_".join("".join(c if c.isalnum() else "-" for c in f.lower()).strip("-")
                                                  for f in ONLY)
        path = write_results(NAME, result, lines,
                             json_path=None if slug is None else str(HERE / "results" / f"{NAME}_{slug}.json"))
        log(f"wrote {path} and appended to {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
