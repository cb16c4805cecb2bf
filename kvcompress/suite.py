"""``python -m kvcompress eval --suite ruler``: the RULER-style suite with intervals.

For every case (a task, a length, a seed of a split) the prompt's first chunk
is prefilled once for every kvcompress method and ratio together
(:class:`kvcompress.fanout.FanoutCache`); each method's cache then answers on
its own (greedy, up to the task's token limit or the first line break after
some text), and later turns of a multi-turn case are appended to that same
cache. The full cache is a child that never evicts (checked against
transformers' ``DynamicCache`` in the tests). Rows from other libraries
(kvpress presses, ``kvpress:NAME``) run their own prefill per case.

Scores: each turn scores the fraction of its answers found in the text
generated; a case scores the mean over its turns. Task scores come with a
95% Wilson interval when every case is pass/fail (one answer, one turn),
else a percentile bootstrap; the suite score is the mean of the task
scores, with a bootstrap that resamples cases within each task.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import ruler
from .eval import _check_list, normal_spec
from .intervals import bootstrap, wilson
from .methods import method_from_spec, spec_evicts

SCHEMA = "kvcompress.suite/1"


class CheckpointError(ValueError):
    """A ``--out`` folder's ``suite.partial.jsonl`` that this run cannot resume."""
QUICK_TASKS = ("niah_single", "niah_multikey", "qa", "multiturn")


@dataclass
class SuiteConfig:
    """What :func:`run_suite` runs.

    ``methods`` are kvcompress specs (``"ems"``, ``"snapkv:kernel=1"``) or
    ``"kvpress:PressName"``; each runs at every ratio in ``ratios``. The full
    cache is always the first row.
    """

    methods: list[str] = field(default_factory=lambda: ["ems", "snapkv", "adakv", "tova", "h2o", "streamingllm"])
    ratios: list[float] = field(default_factory=lambda: [0.5, 0.75, 0.9])
    tasks: list[str] = field(default_factory=lambda: list(ruler.TASKS))
    lengths: list[int] = field(default_factory=lambda: [1000])
    cases: int = 20
    split: str = "heldout"
    chat: bool | None = None

    def __post_init__(self):
        self.methods = [normal_spec(m) for m in self.methods if m.strip()]
        for name in ("methods", "ratios", "lengths", "tasks"):
            # no methods: the full cache alone (suite_combine's runs)
            _check_list(name, getattr(self, name), empty_ok=name in ("methods", "ratios"))
        for m in self.methods:
            if not m.startswith("kvpress:"):
                method_from_spec(m, ratio=0.5)  # unknown names and bad options fail here
        if any(m.startswith("kvpress:") for m in self.methods):
            try:
                import kvpress  # noqa: F401
            except ImportError as e:
                raise ValueError(f"methods: kvpress rows need the kvpress package ({e}); pip install kvpress, "
                                 "or leave the kvpress: rows out") from None
        for t in self.tasks:
            if t not in ruler.TASKS:
                raise ValueError(f"tasks: unknown task {t!r}; choose from {', '.join(ruler.TASKS)}")
        if not self.tasks:
            raise ValueError("tasks: need at least one task")
        if any(not 0 < r < 1 for r in self.ratios):
            raise ValueError(f"ratios: must be in (0, 1), got {self.ratios}")
        if self.methods and not self.ratios:
            raise ValueError("ratios: need at least one ratio")
        if any(n < 64 for n in self.lengths) or not self.lengths:
            raise ValueError(f"lengths: need lengths >= 64 tokens, got {self.lengths}")
        if self.cases < 1:
            raise ValueError(f"cases: must be >= 1, got {self.cases}")
        if self.split not in ruler.SPLITS:
            raise ValueError(f"split: expected one of {ruler.SPLITS}, got {self.split!r}")

    @classmethod
    def quick(cls, **overrides) -> "SuiteConfig":
        """``--quick``: 4 tasks x 5 cases at 1,000 tokens, EMS and SnapKV at
        ratios 0.5 and 0.9 (under 5 minutes for the default model on 2 cores)."""
        base = dict(methods=["ems", "snapkv"], ratios=[0.5, 0.9], tasks=list(QUICK_TASKS), lengths=[1000], cases=5)
        base.update(overrides)
        return cls(**base)


def _kvpress(name: str, ratio: float, prompt_tokens: int):
    """A kvpress press as a callable context manager (``press(model)``).

    Scorer presses compress the prefill by ``ratio``. CAM is a decoding press
    in kvpress (it merges evicted values into their neighbours while
    generating): it runs per step (``compression_interval=1``, the paper's
    setting) with TOVA as its scorer and a target of the slots the ratio
    keeps of this prompt, so the first answer token still reads the whole
    prompt and every later one reads the merged cache.
    """
    import kvpress

    presses = {n.lower(): n for n in dir(kvpress) if n.endswith("Press")}
    key = name.lower()
    if not key.endswith("press"):
        key += "press"
    if key not in presses:
        raise ValueError(f"methods: kvpress has no press {name!r}; it has {', '.join(sorted(presses.values()))}")
    cls = getattr(kvpress, presses[key])
    if key == "adakvpress":
        # head-wise wrappers around a scorer press, as kvpress's leaderboard runs them
        return cls(press=kvpress.ExpectedAttentionPress(compression_ratio=ratio))
    if key == "criticaladakvpress":
        # CriticalKV weighs scores by the value norm itself; kvpress warns when the
        # inner press does it too
        return cls(press=kvpress.ExpectedAttentionPress(compression_ratio=ratio, use_vnorm=False))
    if key == "campress":
        keep = max(1, round((1.0 - ratio) * prompt_tokens))
        return cls(base_press=kvpress.TOVAPress(), target_size=keep, compression_interval=1)
    return cls(compression_ratio=ratio)


def _rows(config: SuiteConfig):
    yield "full", None
    for m in config.methods:
        if not m.lower().startswith("kvpress:") and not spec_evicts(m):
            yield m, None  # keeps every token (KIVI): one row
            continue
        for r in config.ratios:
            yield m, r


def _stop(tokenizer, ids: list[int], stop_ids, turn) -> bool:
    """Stop at an end token; for a list answer (``turn.item``) once the text
    holds as many items as answers or a blank line after some text; else at
    the first line break after the first letter or digit."""
    if ids and ids[-1] in stop_ids:
        return True
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if turn.item and len(re.findall(turn.item, text)) >= len(turn.answers):
        return True
    first = next((i for i, ch in enumerate(text) if ch.isalnum()), None)
    return first is not None and ("\n\n" if turn.item else "\n") in text[first:]


def _decode(model, tokenizer, cache, first: int, pos: int, turn, stop_ids, kwargs_of):
    """Greedy from ``first`` (already chosen) at position ``pos``; returns
    ``(tokens, next position)``; the last token returned is not in the cache."""
    import torch

    out = [first]
    while len(out) < turn.max_new_tokens and not _stop(tokenizer, out, stop_ids, turn):
        logits = model(input_ids=torch.tensor([[out[-1]]], device=model.device), **kwargs_of(cache), use_cache=True,
                       position_ids=torch.tensor([[pos]], device=model.device)).logits
        pos += 1
        out.append(int(logits[0, -1].argmax()))
    return out, pos


def _chunk(model, cache, ids: list[int], pos: int, kwargs_of) -> int:
    """Prefill ``ids`` at positions ``pos...``; return the argmax of the last logits."""
    import torch

    logits = model(input_ids=torch.tensor([ids], device=model.device), **kwargs_of(cache), use_cache=True,
                   position_ids=torch.arange(pos, pos + len(ids), device=model.device)[None], logits_to_keep=1).logits
    return int(logits[0, -1].argmax())


def _answer_turns(model, tokenizer, case, rendered, cache, first: int, pos: int, kwargs_of):
    """Run every turn of ``case`` on ``cache`` (the first chunk already
    prefilled, ``first`` its next token); return per-turn (text, score)."""
    out, last = [], None
    for t, turn in enumerate(case.turns):
        if t:
            # the last generated token is not yet in the cache: feed it with the next chunk
            first = _chunk(model, cache, [last] + rendered.chunks[t], pos, kwargs_of)
            pos += 1 + len(rendered.chunks[t])
        toks, pos = _decode(model, tokenizer, cache, first, pos, turn, rendered.stop_ids, kwargs_of)
        last = toks[-1]
        text = tokenizer.decode(toks, skip_special_tokens=True)
        out.append((text, case.score(t, text)))
    return out


def run_suite(model, tokenizer, config: SuiteConfig, *, model_name: str | None = None, progress: bool = True,
              checkpoint=None) -> dict:
    """Run ``config`` on ``model``; return a JSON-ready dict (schema ``SCHEMA``).

    With ``checkpoint`` (a path) every finished case is appended to that
    JSON-lines file, and the cases it already holds are not run again, so an
    interrupted run continues where it stopped. The file names the config
    and model it belongs to; another run's file is refused. It is removed
    once the run completes.
    """
    import torch
    import transformers
    from transformers import DynamicCache

    from . import testing as T
    from .cache import KVCache
    from .compat import cache_kwargs
    from .eval import _calibrated, _model_info, _version
    from .fanout import FanoutCache
    from .hf import compress
    from .methods import StreamingLLM

    if config.chat and not ruler.has_chat_template(tokenizer):
        raise ValueError("chat: this tokenizer has no chat template; pass chat=False (--no-chat)")
    kwargs_of = lambda c: cache_kwargs(model, c)  # noqa: E731
    specs = list(_rows(config))
    ours = [(m, r) for m, r in specs if m == "full" or not m.lower().startswith("kvpress:")]
    theirs = [(m, r) for m, r in specs if (m, r) not in ours]
    num_layers = getattr(model.config, "num_hidden_layers", None)
    methods, plans = {}, {}
    for m, r in ours:
        # the full cache: a child that never evicts (ratio 0 keeps every token); the
        # children skip prepare(): what a method learns from the model is computed here, once
        methods[(m, r)] = StreamingLLM(ratio=0.0, sinks=0) if m == "full" else _calibrated(
            method_from_spec(m, ratio=r), model, tokenizer, plans)
    records = {s: [] for s in specs}
    grid = [(task, n, i) for n in config.lengths for task in config.tasks for i in range(config.cases)]
    done, log = _open_checkpoint(checkpoint, config, model_name or type(model).__name__, specs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(grid), desc="ruler", unit="case", initial=sum(1 for g in grid if _case_key(g) in done))
    started = time.perf_counter()
    try:
        with compress(model, methods[("full", None)]), torch.inference_mode():
            for task, n, i in grid:
                if _case_key((task, n, i)) in done:
                    for spec in specs:
                        records[spec].append(done[_case_key((task, n, i))][_row_key(spec)])
                    continue
                marks = {spec: len(records[spec]) for spec in specs}
                case = ruler.make_case(task, n, tokenizer, split=config.split, index=i)
                rendered = ruler.render(case, tokenizer, chat=config.chat)
                ids = rendered.chunks[0]
                children = [KVCache(methods[s], num_layers=num_layers) for s in ours]
                first = _chunk(model, FanoutCache(children), ids, 0, kwargs_of)
                full_bytes = None
                for s, cache in zip(ours, children):
                    turns = _answer_turns(model, tokenizer, case, rendered, cache, first, len(ids), kwargs_of)
                    full_bytes = full_bytes or cache.stats().full_bytes
                    # the full row stands for transformers' DynamicCache: its bytes, not our store's slack
                    held = full_bytes if s[0] == "full" else cache.memory_bytes()
                    records[s].append(_record(case, turns, held, full_bytes, len(ids)))
                for m, r in theirs:
                    press = _kvpress(m.split(":", 1)[1], r, len(ids))
                    with _press_session(model, press):
                        cache = DynamicCache(config=model.config)
                        first = _chunk(model, cache, ids, 0, kwargs_of)
                        turns = _answer_turns(model, tokenizer, case, rendered, cache, first, len(ids), kwargs_of)
                    records[(m, r)].append(_record(case, turns, T.cache_bytes(cache), full_bytes, len(ids)))
                if log is not None:
                    line = dict(case=_case_key((task, n, i)),
                                rows={_row_key(spec): records[spec][marks[spec]] for spec in specs})
                    log.write(json.dumps(line) + "\n")
                    log.flush()
                if bar is not None:
                    bar.set_postfix_str(f"{task} {n}", refresh=False)
                    bar.update()
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    if checkpoint is not None:
        Path(checkpoint).unlink(missing_ok=True)
    rows = [_summarise(m, r, records[(m, r)], config) for m, r in specs]
    return dict(
        schema=SCHEMA, created=datetime.datetime.now().isoformat(timespec="seconds"), kvcompress=_version(),
        model=_model_info(model, model_name),
        machine=dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                     cores=os.cpu_count(), threads=torch.get_num_threads()),
        config=asdict(config), chat=ruler.has_chat_template(tokenizer) if config.chat is None else config.chat,
        seconds=time.perf_counter() - started, rows=rows,
    )


def _case_key(g) -> str:
    task, n, i = g
    return f"{task}@{n}#{i}"


def _row_key(spec) -> str:
    return f"{spec[0]}@{spec[1]}"


def _open_checkpoint(path, config: SuiteConfig, model_name: str, specs):
    """``(finished cases {case key: {row key: record}}, file to append to)``."""
    if path is None:
        return {}, None
    path = Path(path)
    header = dict(schema=SCHEMA + "/checkpoint", config=asdict(config), model=model_name,
                  rows=[_row_key(s) for s in specs])
    done = {}
    if path.exists() and path.stat().st_size:
        with path.open(encoding="utf-8") as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        try:
            first = json.loads(lines[0])
            entries = []
            for line in lines[1:]:
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut short by the interruption: that case runs again
        except (json.JSONDecodeError, IndexError):
            raise CheckpointError(f"checkpoint: {path} is not a suite checkpoint") from None
        if first != json.loads(json.dumps(header)):
            raise CheckpointError(f"checkpoint: {path} belongs to another run (config, model or rows differ); "
                             "remove it or choose another --out")
        done = {e["case"]: e["rows"] for e in entries}
        with path.open("w", encoding="utf-8") as f:  # drop a cut-short last line
            f.write("\n".join([lines[0]] + [json.dumps(e) for e in entries]) + "\n")
        return done, path.open("a", encoding="utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    log = path.open("w", encoding="utf-8")
    log.write(json.dumps(header) + "\n")
    log.flush()
    return done, log


@contextlib.contextmanager
def _press_session(model, press):
    # ObservedAttentionPress reads attention weights, which only eager attention returns
    from .hf import _set_attn

    name = type(press).__name__
    previous = model.config._attn_implementation
    _set_attn(model, "eager" if name == "ObservedAttentionPress" else "sdpa")
    inner = _text_model(model)
    if any(getattr(getattr(layer, "self_attn", None), "is_sliding", False) for layer in getattr(inner, "layers", ())):
        # kvpress compresses only the full-attention layers of Gemma 3, but
        # checks for the multimodal class alone: on Gemma3ForCausalLM it would
        # shrink the sliding layers too, whose masks transformers sizes from
        # the tokens seen, and fail at the first decode step ("size of tensor a
        # (128) must match ... (512)"). Apply its own rule to any sliding layer.
        hook = press.forward_hook

        def forward_hook(module, input, kwargs, output):
            return output if getattr(module, "is_sliding", False) else hook(module, input, kwargs, output)

        press.forward_hook = forward_hook
    rope = getattr(inner, "rotary_emb", None)
    patched = rope is not None and hasattr(rope, "full_attention_inv_freq")
    if patched:
        # presses that rotate keys themselves (ExpectedAttention, the AdaKV
        # pair around it) call the model's rotary embedding without the layer
        # type Gemma 3's requires; they only see full-attention layers (above)
        rope_forward = rope.forward

        def forward(x, position_ids, layer_type=None, **kwargs):
            return rope_forward(x, position_ids, layer_type=layer_type or "full_attention", **kwargs)

        rope.forward = forward
    try:
        with press(model):
            yield
    finally:
        _set_attn(model, previous)
        if patched:
            del rope.forward


def _text_model(model):
    # the decoder stack kvpress hooks: model.model, or its language_model (multimodal classes)
    inner = getattr(model, "model", None)
    return getattr(inner, "language_model", inner)


def _record(case, turns, held: int, full: int | None, prompt: int) -> dict:
    return dict(task=case.task, length=case.length, seed=case.seed, prompt_tokens=prompt,
                score=sum(s for _, s in turns) / len(turns), answers=[t.answers for t in case.turns],
                generated=[text for text, _ in turns], bytes=held, full_bytes=full)


def _binary(task: str) -> bool:
    return task in ("niah_single", "niah_multikey", "qa")


def _summarise(method: str, ratio, recs: list[dict], config: SuiteConfig) -> dict:
    tasks = {}
    for task in config.tasks:
        for n in config.lengths:
            scores = [r["score"] for r in recs if r["task"] == task and r["length"] == n]
            if not scores:
                continue
            mean = sum(scores) / len(scores)
            if _binary(task):
                lo, hi = wilson(round(sum(scores)), len(scores))
                how = "wilson"
            else:
                lo, hi = bootstrap(scores)
                how = "bootstrap"
            tasks[f"{task}@{n}"] = dict(score=mean, low=lo, high=hi, n=len(scores), interval=how)
    keys = [f"{r['task']}@{r['length']}" for r in recs]
    scores = [r["score"] for r in recs]
    suite = sum(t["score"] for t in tasks.values()) / len(tasks)
    lo, hi = bootstrap(scores, strata=keys)
    held = [r["bytes"] for r in recs]
    ratios = [r["full_bytes"] / r["bytes"] for r in recs if r["full_bytes"] and r["bytes"]]
    return dict(method=method, ratio=ratio, suite=dict(score=suite, low=lo, high=hi), tasks=tasks,
                bytes=sum(held) / len(held), compression=sum(ratios) / len(ratios) if ratios else None, cases=recs)


# --------------------------------------------------------------------- output


def _cell(d: dict) -> str:
    return f"{d['score']:.2f} ({d['low']:.2f}–{d['high']:.2f})"


def markdown(results: dict) -> str:
    """One row per method × ratio: suite score and each task's score, all
    with 95% intervals, and the bytes held relative to the full cache."""
    rows = results["rows"]
    keys = list(rows[0]["tasks"])
    head = ["method", "ratio", "suite"] + keys + ["full/held bytes"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(head) - 2)]
    for r in rows:
        name = "full cache" if r["method"] == "full" else r["method"]
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:g}"
        comp = f"{r['compression']:.1f}x" if r["compression"] else "–"
        if r["method"].lower().startswith("kvpress:") and "AdaKV" in r["method"]:
            comp += " (masked)"
        cells = [name, ratio, _cell(r["suite"])] + [_cell(r["tasks"][k]) for k in keys] + [comp]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(results: dict) -> str:
    cfg, model = results["config"], results["model"]
    return (f"Model {model['name']} ({model['layers']} layers, {model['kv_heads']} kv heads). "
            f"Tasks {', '.join(cfg['tasks'])} at {cfg['lengths']} tokens, {cfg['cases']} {cfg['split']} cases each, "
            f"{'chat template' if results['chat'] else 'plain prompt'}; greedy. Scores: fraction of answers found; "
            f"95% intervals (Wilson for pass/fail tasks, bootstrap otherwise; suite: bootstrap over cases within "
            f"tasks). Ratio = fraction of the prompt removed; last column: full-cache bytes / bytes held after the "
            f"case (mean over cases). {results['seconds']:.0f} s" + _combined(results) + ".")


def _combined(results: dict) -> str:
    if "combined" not in results:
        return ""
    text = f" over {len(results['combined'])} runs combined on the same cases"
    for a in results["full_agreement"]:
        notes = ([f"transformers {a['transformers']}"] if a.get("transformers") else []) + \
            ([f"tokenizer {a['tokenizer']}"] if a.get("tokenizer") else [])
        under = f" ({', '.join(notes)})" if notes else ""
        text += f"; run {a['result'] + 1}'s full cache{under} scored the same on {a['agreement']:.0%} of cases"
    return text


def plot(results: dict, path, x: str = "ratio") -> str | None:
    """Suite score vs ``x``, one line per method with its interval, the full
    cache as the ceiling band. ``x="ratio"``: the compression ratio asked
    for; ``x="bytes"``: the measured full-cache bytes / bytes held (log
    scale), which compares methods that hold different bytes at the same
    ratio (kvpress leaves Gemma 3's sliding layers whole)."""
    from .plots import _pyplot

    if x not in ("ratio", "bytes"):
        raise ValueError(f"x: expected 'ratio' or 'bytes', got {x!r}")
    plt = _pyplot()
    rows = results["rows"]
    full = rows[0]["suite"]
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    ax.axhspan(full["low"], full["high"], color="black", alpha=0.08)
    ax.axhline(full["score"], color="black", linestyle="--", linewidth=1, label="full cache")
    for r in rows[1:]:
        if r["ratio"] is None:  # a method that keeps every token: a level, not a curve
            ax.axhline(r["suite"]["score"], linestyle=":", linewidth=1, label=r["method"], color="C7")
    key = "ratio" if x == "ratio" else "compression"  # the row field on the x axis
    for name in dict.fromkeys(r["method"] for r in rows[1:] if r["ratio"] is not None):
        pts = sorted((r[key], r["suite"]) for r in rows if r["method"] == name)
        xs = [p[0] for p in pts]
        ys = [p[1]["score"] for p in pts]
        err = [[y - p[1]["low"] for y, p in zip(ys, pts)], [p[1]["high"] - y for y, p in zip(ys, pts)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
    if x == "ratio":
        ax.set_xlabel("compression ratio (fraction of the prompt removed)")
    else:
        ax.set_xscale("log")
        ticks = [t for t in (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32) if t <= max(2.0, ax.get_xlim()[1])]
        ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("full-cache bytes / bytes held (measured)")
    ax.set_ylabel("suite score")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{results['model']['name']}: RULER-style suite ({results['config']['split']} seeds)", fontsize=9)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


#: how ``kvcompress eval --tokenizer DIR`` marks the model name of its run
#: (``"<model>, tokenizer <dir>"``); combine reads it back
TOKENIZER_TAG = ", tokenizer "


def _base_model(result: dict) -> str:
    """The model a run used, without the ``--tokenizer`` it may have taken
    (cli names such a run ``"<model>, tokenizer <dir>"``): runs that differ
    only there are combinable, their full rows' agreement says whether it
    mattered."""
    return result["model"]["name"].split(TOKENIZER_TAG)[0]


def _tokenizer_note(result: dict) -> str | None:
    name = result["model"]["name"]
    return name.split(TOKENIZER_TAG, 1)[1] if TOKENIZER_TAG in name else None


def _check_runs(results: list[dict], same: tuple[str, ...]) -> None:
    """Refuses, by name, an empty list, a result of another schema, or a run
    whose config ``same`` keys or model differ from the first run's."""
    if not results:
        raise ValueError("results: need at least one suite result")
    for i, r in enumerate(results):
        if r.get("schema") != SCHEMA:
            raise ValueError(f"results[{i}]: not a {SCHEMA} result (schema {r.get('schema')!r})")
    first = results[0]
    for i, r in enumerate(results[1:], 1):
        for key in same:
            if r["config"][key] != first["config"][key]:
                raise ValueError(f"results[{i}]: {key} {r['config'][key]!r} differs from {first['config'][key]!r}")
        if _base_model(r) != _base_model(first):
            raise ValueError(f"results[{i}]: model {r['model']['name']!r} differs from {first['model']['name']!r}")


def combine(results: list[dict], tasks: list[str] | None = None, rename: dict[str, str] | None = None,
            methods: list[str] | None = None) -> dict:
    """Rows of several :func:`run_suite` results on the same cases as one
    result, re-scored on ``tasks`` (default: the tasks all of them ran).

    ``rename`` maps a row's method label to another (``{"ems:tau=0.8":
    "ems"}``: the same configuration run before and after it became the
    default); ``methods`` keeps only those rows (labels after renaming), in
    that order. Both apply before the duplicate check; a label either names
    that is not a row of any result is refused by name.

    Runs must share the model, split and lengths; a case is the same case
    in every run (same task, length and seed), which is checked. The first
    run's full-cache row is the full row; the others' full rows must agree
    with it case by case (``full_agreement``: the fraction of cases with the
    same score, e.g. a run under another transformers version). Rows are
    re-summarised from their cases, so suite scores and intervals are those
    of the chosen tasks. A method and ratio present twice is an error.
    """
    _check_runs(results, ("split", "lengths"))
    first = results[0]
    common = [t for t in first["config"]["tasks"] if all(t in r["config"]["tasks"] for r in results)]
    tasks = list(tasks) if tasks else common
    for t in tasks:
        if t not in common:
            raise ValueError(f"tasks: {t!r} was not run by every result (common: {', '.join(common)})")
    cases = min(r["config"]["cases"] for r in results)
    config = SuiteConfig(methods=[], ratios=[], tasks=tasks, lengths=list(first["config"]["lengths"]), cases=cases,
                         split=first["config"]["split"], chat=first["config"]["chat"])

    def keep(recs):
        # the first ``cases`` cases of each kept task and length, in run order
        out, seen = [], {}
        for c in recs:
            k = (c["task"], c["length"])
            if c["task"] in tasks and seen.get(k, 0) < cases:
                seen[k] = seen.get(k, 0) + 1
                out.append(c)
        return out

    full = keep(first["rows"][0]["cases"])
    seeds = [(c["task"], c["length"], c["seed"]) for c in full]
    order = {k: j for j, k in enumerate(seeds)}
    rename = dict(rename or {})
    present = {row["method"] for r in results for row in r["rows"]}
    for old in rename:
        if old not in present:
            raise ValueError(f"rename: {old!r} is not a row of any result")
    labels = {rename.get(m, m) for m in present}
    for m in methods or ():
        if m not in labels:
            raise ValueError(f"methods: {m!r} is not a row of any result")
    rows, seen, agreement = [_summarise("full", None, full, config)], set(), []
    for i, r in enumerate(results):
        for row in r["rows"]:
            if row["method"] != "full":
                label = rename.get(row["method"], row["method"])
                if methods is not None and label not in methods:
                    continue
                row = dict(row, method=label)
            recs = keep(row["cases"])
            # in the first run's case order (a joined run may list its tasks in another order)
            recs.sort(key=lambda c: order.get((c["task"], c["length"], c["seed"]), len(order)))
            if [(c["task"], c["length"], c["seed"]) for c in recs] != seeds:
                raise ValueError(f"results[{i}]: row {row['method']} @ {row['ratio']} ran other cases")
            if row["method"] == "full":
                if i:
                    same = sum(a["score"] == b["score"] for a, b in zip(recs, full)) / len(full)
                    agreement.append(dict(result=i, agreement=same, transformers=r["machine"].get("transformers"),
                                          tokenizer=_tokenizer_note(r)))
                continue
            key = (row["method"], row["ratio"])
            if key in seen:
                raise ValueError(f"results[{i}]: {row['method']} @ {row['ratio']} is in an earlier result too")
            seen.add(key)
            rows.append(_summarise(row["method"], row["ratio"], recs, config))
    # one block per method (in order of first appearance), ratios ascending,
    # however the runs split them
    config.methods = (list(methods) if methods is not None
                      else list(dict.fromkeys(row["method"] for row in rows[1:])))
    order = {m: i for i, m in enumerate(config.methods)}
    rows[1:] = sorted(rows[1:], key=lambda row: (order[row["method"]], -1.0 if row["ratio"] is None else row["ratio"]))
    config.ratios = sorted({r for _, r in seen if r is not None})
    return dict(schema=SCHEMA, created=datetime.datetime.now().isoformat(timespec="seconds"),
                kvcompress=first["kvcompress"], model=first["model"], machine=first["machine"], config=asdict(config),
                chat=first["chat"], seconds=sum(r["seconds"] for r in results), rows=rows,
                combined=[r["created"] for r in results], full_agreement=agreement)


def join_tasks(results: list[dict]) -> dict:
    """One result from runs of the same rows on different tasks (e.g. a run
    of three tasks and a later run of two more): every row's cases are
    concatenated, tasks in run order, and re-summarised, so its suite score
    and interval are over all the tasks.

    The runs must share the model, split, lengths, case count and chat
    setting and must not share a task; anything else is refused by name.
    Only the rows (method and ratio) every run holds are kept: the others
    would score on fewer tasks, and are listed under ``dropped``. The result
    can go to :func:`combine` like any run.
    """
    _check_runs(results, ("split", "lengths", "cases", "chat"))
    first = results[0]
    tasks: list[str] = []
    for i, r in enumerate(results):
        shared = [t for t in r["config"]["tasks"] if t in tasks]
        if shared:
            raise ValueError(f"results[{i}]: task {shared[0]!r} is in an earlier result too")
        tasks += r["config"]["tasks"]
    held = [{(row["method"], row["ratio"]) for row in r["rows"]} for r in results]
    keys = [(row["method"], row["ratio"]) for row in first["rows"] if all((row["method"], row["ratio"]) in h
                                                                          for h in held)]
    dropped = sorted(set().union(*held) - set(keys), key=str)
    if keys[:1] != [("full", None)]:
        raise ValueError("results: every run needs its full-cache row")
    fc = first["config"]
    # the kept rows' methods and ratios (a dropped row is in no config)
    config = SuiteConfig(methods=list(dict.fromkeys(m for m, _ in keys[1:])),
                         ratios=sorted({r for _, r in keys if r is not None}), tasks=tasks,
                         lengths=list(fc["lengths"]), cases=fc["cases"], split=fc["split"], chat=fc["chat"])
    rows = []
    for method, ratio in keys:
        recs = [c for r in results for row in r["rows"] if (row["method"], row["ratio"]) == (method, ratio)
                for c in row["cases"]]
        rows.append(_summarise(method, ratio, recs, config))
    return dict(schema=SCHEMA, created=datetime.datetime.now().isoformat(timespec="seconds"),
                kvcompress=first["kvcompress"], model=first["model"], machine=first["machine"], config=asdict(config),
                chat=first["chat"], seconds=sum(r["seconds"] for r in results), rows=rows,
                joined=[r["created"] for r in results], dropped=[list(k) for k in dropped])


def read_result(path) -> dict:
    """A saved suite result: ``suite.json``, or ``A.json+B.json`` (runs of the
    same rows on different tasks, joined by :func:`join_tasks`, whose
    ``dropped`` lists the rows not every run had)."""
    files = [f + ".json" for f in str(path)[: -len(".json")].split(".json+")] if "+" in str(path) else [str(path)]
    runs = [json.loads(Path(f).read_text()) for f in files]
    return runs[0] if len(runs) == 1 else join_tasks(runs)


def write_outputs(results: dict, out_dir) -> list:
    """``suite.json``, ``suite.md``, and with matplotlib ``suite.png`` (score
    vs ratio) and ``suite_bytes.png`` (score vs bytes held) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "suite.json", out / "suite.md"]
    paths[0].write_text(json.dumps(results, indent=1))
    paths[1].write_text(describe(results) + "\n\n" + markdown(results) + "\n")
    try:
        paths.append(plot(results, out / "suite.png"))
        paths.append(plot(results, out / "suite_bytes.png", x="bytes"))
    except ModuleNotFoundError as e:
        if e.name != "matplotlib":
            raise
    return paths




__all__ = ["SCHEMA", "SuiteConfig", "run_suite", "combine", "markdown", "describe", "plot", "write_outputs"]
