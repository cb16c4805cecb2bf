"""The evaluation harness behind ``python -m kvcompress eval``.

Every method × setting (budget or ratio) runs the same tasks on the same
inputs as the full cache, which is always the first row:

- ``passkey``: a 5-digit key hidden at each depth of filler of each length;
  exact match of the first number generated;
- ``fidelity``: KL(full ‖ compressed) of the next-token distribution and
  top-1 agreement over ``k`` teacher-forced decode steps;
- ``ppl``: perplexity of continuations read after a compressed context.

:func:`run_eval` returns a JSON-ready dict (schema ``SCHEMA``);
:func:`markdown` renders its table and :func:`write_outputs` saves JSON,
Markdown and PNG plots.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import testing as T
from .intervals import bootstrap
from .methods import REGISTRY, method_from_spec, spec_evicts

SCHEMA = "kvcompress.eval/1"
TASKS = ("passkey", "fidelity", "ppl")


def normal_spec(spec: str) -> str:
    """A method spec with surrounding spaces dropped and each method name
    lower-cased; option values (a profile's file path) stay as given."""
    parts = []
    for part in spec.strip().split("+"):
        name, sep, rest = part.partition(":")
        parts.append(name.strip().lower() + sep + rest)
    return "+".join(parts)


def _check_list(name: str, values, empty_ok: bool = False) -> None:
    """A list option given at all must hold something (unless ``empty_ok``),
    each item once (a repeated item would run, and in the suite count, its
    cases twice)."""
    if values is None:
        return
    if len(values) == 0 and not empty_ok:
        raise ValueError(f"{name}: need at least one value, got an empty list")
    seen = set()
    for v in values:
        if v in seen:
            raise ValueError(f"{name}: {v!r} is given twice")
        seen.add(v)


@dataclass
class EvalConfig:
    """What to run. ``budgets`` xor ``ratios`` give the settings of every method."""

    # every registered method that runs on its own (LowBits is composed: "snapkv+lowbits")
    methods: list[str] = field(default_factory=lambda: [m for m in REGISTRY if m != "lowbits"])
    budgets: list[int] | None = field(default_factory=lambda: [64, 128, 256])
    ratios: list[float] | None = None
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    lengths: list[int] = field(default_factory=lambda: [1000, 2000])
    depths: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    max_new_tokens: int = 8
    fidelity_texts: int = 4
    fidelity_context: int = 1024
    k: int = 16
    ppl_context: int = 1024
    ppl_tokens: int = 128
    ppl_windows: int = 4
    text: str | None = None
    seed: int = 0

    def __post_init__(self):
        if (self.budgets is None) == (self.ratios is None):
            raise ValueError("budgets, ratios: give exactly one of them")
        self.methods = [normal_spec(m) for m in self.methods if m.strip()]
        if not self.methods:
            raise ValueError("methods: need at least one method")
        for name in ("methods", "budgets", "ratios", "lengths", "depths"):
            _check_list(name, getattr(self, name))
        for m in self.methods:
            method_from_spec(m, ratio=0.5)  # unknown names and bad options fail here, not mid-run
        for t in self.tasks:
            if t not in TASKS:
                raise ValueError(f"tasks: unknown task {t!r}; choose from {', '.join(TASKS)}")
        if not self.tasks:
            raise ValueError("tasks: need at least one task")
        if self.budgets is not None and any(b < 1 for b in self.budgets):
            raise ValueError(f"budgets: must be >= 1, got {self.budgets}")
        for m in self.methods:
            for b in self.budgets or ():
                method_from_spec(m, budget=b)  # a budget below a method's sinks + window
        if self.ratios is not None and any(not 0 <= r < 1 for r in self.ratios):
            raise ValueError(f"ratios: must be in [0, 1), got {self.ratios}")
        if any(not 0 <= d <= 1 for d in self.depths):
            raise ValueError(f"depths: must be in [0, 1], got {self.depths}")
        if any(n < 1 for n in self.lengths):
            raise ValueError(f"lengths: must be >= 1, got {self.lengths}")
        # the rest fail here rather than after the model has loaded
        for name, value, least in (("max_new_tokens", self.max_new_tokens, 1),
                                   ("fidelity_texts", self.fidelity_texts, 1),
                                   ("fidelity_context", self.fidelity_context, 1), ("k", self.k, 1),
                                   ("ppl_context", self.ppl_context, 1), ("ppl_tokens", self.ppl_tokens, 2),
                                   ("ppl_windows", self.ppl_windows, 1)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
            if value < least:
                raise ValueError(f"{name}: must be >= {least}, got {value}")
        if self.text is not None and not Path(self.text).is_file():
            raise ValueError(f"text: no such file: {self.text}")

    @classmethod
    def quick(cls, **overrides) -> "EvalConfig":
        """The ``--quick`` preset: four methods × three budgets, small tasks
        (about 2 minutes for the default model on 2 CPU cores)."""
        base = dict(methods=["ems", "snapkv", "h2o", "streamingllm"], budgets=[64, 128, 256], lengths=[1000],
                    depths=[0.1, 0.5, 0.9], fidelity_texts=1, fidelity_context=512, k=8, ppl_context=512,
                    ppl_tokens=64, ppl_windows=1)
        base.update(overrides)
        return cls(**base)

    @property
    def axis(self) -> str:
        return "budget" if self.budgets is not None else "ratio"

    def settings(self) -> list:
        return list(self.budgets if self.budgets is not None else self.ratios)


def _model_info(model, name: str | None) -> dict:
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None)
    return dict(
        name=name or getattr(cfg, "name_or_path", None) or type(model).__name__,
        architecture=type(model).__name__, layers=getattr(cfg, "num_hidden_layers", None),
        q_heads=heads, kv_heads=getattr(cfg, "num_key_value_heads", heads),
        head_dim=getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else None),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
    )


def _rows(config: EvalConfig):
    yield "full", None, None
    for name in config.methods:
        method = method_from_spec(name) if not _evicts(name) else None
        if method is not None:
            # keeps every token: one row, whatever the budgets or ratios
            yield name, None, method
            continue
        for value in config.settings():
            kw = {config.axis: value}
            yield name, value, method_from_spec(name, **kw)


def _semantic_ids(tokenizer):
    """Packaged-text token ids for the head profile's ``semantic`` statistic
    (None without a tokenizer: the profile's own run is used)."""
    if tokenizer is None:
        return None
    from .calibrate import calibration_ids

    return calibration_ids(tokenizer)


def _calibrated(method, model, tokenizer, plans: dict):
    """``method`` with what it learns from the model computed once per
    evaluation (``plans`` is the memo), not once per case: a ``KVSharer(share=k)``
    (or ``calibration=``) in it gets its plan, calibrated once per ``(share,
    threshold)`` on the packaged text (our development text, never the
    evaluation's), so every setting of a row shares the same layers; a
    method with ``profile=None`` (HeadKV) gets the model's head profile, its
    ``semantic`` statistic (TaskKV) measured on the packaged text; every
    method gets what it takes from the tokenizer (``Method.with_tokenizer``:
    FastGen's special and punctuation ids)."""
    if method is not None and tokenizer is not None:
        method = method.with_tokenizer(tokenizer)
    if method is not None and getattr(method, "profile", False) is None:
        from .heads import profile_heads

        if "heads" not in plans:
            plans["heads"] = profile_heads(model, semantic_ids=_semantic_ids(tokenizer))
        method = dataclasses.replace(method, profile=plans["heads"])
    share = None if method is None else method.sharing
    if share is None or share.pairs or not (share.share or share.calibration is not None):
        return method
    from .calibrate import calibrate_kvsharer, calibration_ids

    key = (share.share, share.threshold)
    if key not in plans:
        ids = share.calibration if share.calibration is not None else calibration_ids(tokenizer)
        plans[key] = calibrate_kvsharer(model, ids, share.share, threshold=share.threshold).plan
    resolved = dataclasses.replace(share, plan=plans[key], calibration=None, share=0)
    return resolved if method is share else dataclasses.replace(method, depth=resolved)


def _evicts(spec: str) -> bool:
    return spec_evicts(spec)


def run_eval(model, tokenizer, config: EvalConfig, *, model_name: str | None = None, progress: bool = True) -> dict:
    """Run ``config`` on ``model``; return the results as a JSON-ready dict.

    Rows: ``{"method", "label", "budget", "ratio", "seconds", "cache_bytes",
    "compression", "passkey"?, "fidelity"?, "ppl"?, "read_fraction"?}`` (the last for
    methods that sample what they read, MagicPIG); the first row is the
    full cache (``method == "full"``). See ``SCHEMA`` and the README.
    """
    import torch

    text = Path(config.text).read_text(encoding="utf-8") if config.text else None
    grid = [(n, d) for n in config.lengths for d in config.depths] if "passkey" in config.tasks else []
    refs, windows = [], []
    plans: dict = {}
    rows_spec = [(name, value, _calibrated(method, model, tokenizer, plans)) for name, value, method in _rows(config)]
    n_fid = config.fidelity_texts if "fidelity" in config.tasks else 0
    n_ppl = config.ppl_windows if "ppl" in config.tasks else 0
    total = len(rows_spec) * (len(grid) + n_fid + n_ppl) + n_fid
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="eval", unit="run")

    def tick(label: str):
        if bar is not None:
            bar.set_postfix_str(label[:40], refresh=False)
            bar.update()

    started = time.perf_counter()
    if n_fid:
        texts = T.sample_passages(text or T.default_text(), n_fid, config.fidelity_context * 8, seed=config.seed)
        for t in texts:
            refs.append(T.fidelity_reference(model, tokenizer, t, context_tokens=config.fidelity_context, k=config.k))
            tick("full-cache references")
    if n_ppl:
        windows = T.perplexity_windows(tokenizer, text, context_tokens=config.ppl_context,
                                       continuation_tokens=config.ppl_tokens, windows=n_ppl, seed=config.seed)
    rows = []
    full_bytes: list[int] = []
    try:
        for name, value, method in rows_spec:
            label = T.method_name(method)
            short = "full cache" if method is None else name if value is None else f"{name} {config.axis}={value}"
            t0 = time.perf_counter()
            row = dict(method=name, label=label, budget=None, ratio=None)
            if value is not None:
                row[config.axis] = value
            held, passkeys = [], []
            if grid:
                cases = []
                for i, (n, d) in enumerate(grid):
                    case = T.passkey_case(model, tokenizer, method, n, d, filler_text=text, seed=config.seed + i,
                                          max_new_tokens=config.max_new_tokens)
                    cases.append(case)
                    held.append(case.cache_bytes)
                    tick(short)
                passkeys = cases
                result = T.PasskeyResult(label, cases)
                row["passkey"] = dict(accuracy=result.accuracy, cases=[dataclasses.asdict(c) for c in cases])
            if refs:
                cases = []
                for ref in refs:
                    cases.append(T.fidelity_case(model, method, ref))
                    tick(short)
                fid = T.fidelity_result(label, config.k, cases)
                per_text = [kl for kl, _ in fid.per_text]
                # every text has k steps, so the mean of per-text means is the mean KL
                # and resampling texts gives its interval
                low, high = bootstrap(per_text)
                row["fidelity"] = dict(kl=fid.kl, kl_low=low, kl_high=high, kl_max=fid.kl_max, top1=fid.top1,
                                       k=fid.k, texts=len(cases), per_text_kl=per_text)
            if windows:
                nll, count, per_window = 0.0, 0, []
                for ids in windows:
                    w_nll, w_count = T.perplexity_window(model, method, ids, config.ppl_context)
                    nll += w_nll
                    count += w_count
                    per_window.append(w_nll / w_count)
                    tick(short)
                ppl = T.perplexity_result(label, nll, count, len(windows))
                # windows have equal lengths: exp of the resampled mean NLL per token
                low, high = bootstrap(per_window)
                row["ppl"] = dict(ppl=ppl.ppl, ppl_low=math.exp(low), ppl_high=math.exp(high), nll=ppl.nll,
                                  tokens=ppl.tokens, windows=ppl.windows, per_window_nll=per_window)
            if method is None:
                full_bytes = held
            reads = [c.read_fraction for c in passkeys if c.read_fraction is not None]
            if reads:  # a sampling reader (MagicPIG): the share of held slots its decode steps read
                row["read_fraction"] = sum(reads) / len(reads)
            row["cache_bytes"] = max(held) if held else None
            row["compression"] = (
                sum(f / h for f, h in zip(full_bytes, held)) / len(held) if held and full_bytes else None
            )
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
    finally:
        if bar is not None:
            bar.close()
    cfg = dataclasses.asdict(config)
    return dict(
        schema=SCHEMA,
        created=datetime.datetime.now().isoformat(timespec="seconds"),
        kvcompress=_version(),
        model=_model_info(model, model_name),
        machine=dict(python=platform.python_version(), torch=torch.__version__, cores=os.cpu_count(),
                     threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine()),
        config=cfg,
        seconds=time.perf_counter() - started,
        rows=rows,
    )


def _version() -> str:
    from . import __version__

    return __version__


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def _interval(d: dict, key: str, spec: str) -> str:
    # results written before intervals existed have no low/high
    if d.get(f"{key}_low") is None or d[key] == d[f"{key}_low"] == d[f"{key}_high"]:
        return _fmt(d[key], spec)
    return f"{_fmt(d[key], spec)} ({_fmt(d[f'{key}_low'], spec)}–{_fmt(d[f'{key}_high'], spec)})"


def markdown(results: dict) -> str:
    """The results table (one row per method × setting, full cache first)."""
    cfg = results["config"]
    axis = "budget" if cfg.get("budgets") is not None else "ratio"
    tasks = cfg["tasks"]
    head = ["method", axis]
    if "passkey" in tasks:
        head.append("passkey")
    if "fidelity" in tasks:
        head += [f"KL@{cfg['k']}", "top-1"]
    if "ppl" in tasks:
        head.append("ppl")
    if "passkey" in tasks:
        head += ["cache MiB", "vs full"]
    sampled = any(row.get("read_fraction") is not None for row in results["rows"])
    if sampled:  # MagicPIG: the share of the held slots its decode steps read
        head.append("read")
    head.append("s")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|"]
    for row in results["rows"]:
        cells = ["full cache" if row["method"] == "full" else row["method"], _fmt(row.get(axis), "")]
        if "passkey" in tasks:
            cells.append(_fmt(row["passkey"]["accuracy"], ".2f"))
        if "fidelity" in tasks:
            cells += [_interval(row["fidelity"], "kl", ".4f"), _fmt(row["fidelity"]["top1"], ".3f")]
        if "ppl" in tasks:
            cells.append(_interval(row["ppl"], "ppl", ".3f"))
        if "passkey" in tasks:
            mib = row["cache_bytes"] / 2**20 if row["cache_bytes"] is not None else None
            cells += [_fmt(mib, ".2f"), _fmt(row["compression"], ".1f") + ("x" if row["compression"] else "")]
        if sampled:
            cells.append(_fmt(row.get("read_fraction"), ".1%"))
        cells.append(_fmt(row["seconds"], ".1f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(results: dict) -> str:
    """One paragraph saying what was run, for above the table."""
    cfg, model = results["config"], results["model"]
    parts = [f"Model {model['name']} ({model['layers']} layers, {model['kv_heads']} kv heads, {model['dtype']})."]
    if "passkey" in cfg["tasks"]:
        parts.append(f"Passkey: filler lengths {cfg['lengths']} tokens × depths {cfg['depths']}, exact match.")
    if "fidelity" in cfg["tasks"]:
        parts.append(f"Fidelity: {cfg['fidelity_texts']} texts, {cfg['fidelity_context']}-token context, "
                     f"KL(full‖method) in nats and top-1 agreement over {cfg['k']} teacher-forced decode steps, "
                     "KL with a 95% bootstrap interval over texts.")
    if "ppl" in cfg["tasks"]:
        parts.append(f"Perplexity: {cfg['ppl_windows']} windows, {cfg['ppl_context']}-token compressed context, "
                     f"next {cfg['ppl_tokens']} tokens, with a 95% bootstrap interval over windows.")
    parts.append("Budget = kept slots per kv head; ratio = fraction of the prompt removed. "
                 "\"vs full\": full-cache bytes / bytes held after the passkey run (mean over prompts).")
    return " ".join(parts)


def write_outputs(results: dict, out_dir) -> list[Path]:
    """Write ``results.json``, ``results.md`` and the PNG plots (when
    matplotlib is installed) into ``out_dir``; return the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md"]
    paths[0].write_text(json.dumps(results, indent=1))
    paths[1].write_text(describe(results) + "\n\n" + markdown(results) + "\n")
    from .plots import plot_passkey_heatmap, plot_scores

    try:
        plots = (plot_scores(results, out / "scores.png"), plot_passkey_heatmap(results, out / "passkey.png"))
    except ModuleNotFoundError as e:
        if e.name != "matplotlib":
            raise
        return paths
    return paths + [p for p in plots if p is not None]
