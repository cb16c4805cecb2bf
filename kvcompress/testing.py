"""Accuracy checks for compressed caches, to call from your own tests.

Each measure runs the model once with the full cache and once per method,
batch size 1, greedy, through one decoding loop that passes explicit
positions, so it serves three kinds of ``method``:

- ``None``: the full cache (a transformers ``DynamicCache``);
- a :class:`kvcompress.Method` (run under :func:`kvcompress.compress`);
- any callable ``method(model)`` returning a context manager, e.g. a
  kvpress press; a ``DynamicCache`` is used under it.

>>> from kvcompress.testing import passkey_accuracy, assert_passkey
>>> result = passkey_accuracy(model, tokenizer, kvc.SnapKV(ratio=0.5), lengths=(1000,))
>>> assert_passkey(result, min_accuracy=1.0)

The first token after a prompt is predicted by the prefill, whose attention
sees every token whatever the method (compression happens after each layer's
attention), so fidelity and perplexity only score predictions made from the
compressed cache.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from .compat import cache_kwargs
from .methods.base import Method
from .tasks import default_text, passkey_prompt, special_prefix

__all__ = [
    "PasskeyCase", "PasskeyResult", "FidelityResult", "PerplexityResult",
    "method_name", "method_context", "greedy", "cache_bytes",
    "passkey_case", "passkey_accuracy",
    "FidelityReference", "fidelity_reference", "fidelity_case", "fidelity", "fidelity_result", "fidelity_texts",
    "sample_passages",
    "perplexity_windows", "perplexity_window", "perplexity", "perplexity_result",
    "assert_passkey", "assert_fidelity", "assert_perplexity", "assert_compressed",
]


# ----------------------------------------------------------------- running a method


def method_name(method) -> str:
    """A short label: ``"full cache"``, ``Method.describe()``, or the class name."""
    if method is None:
        return "full cache"
    if isinstance(method, Method):
        return method.describe()
    ratio = getattr(method, "compression_ratio", None)
    name = type(method).__name__
    return f"{name}(compression_ratio={ratio})" if ratio is not None else name


@contextlib.contextmanager
def method_context(model, method):
    """Context in which ``model`` runs with ``method``; yields a function that
    returns a fresh cache to pass as the model's cache argument."""
    from transformers import DynamicCache

    def dynamic():
        return DynamicCache(config=model.config)

    if method is None:
        yield dynamic
    elif isinstance(method, Method):
        from .hf import compress

        with compress(model, method) as session:
            yield session.new_cache
    elif callable(method):
        with method(model):
            yield dynamic
    else:
        raise TypeError(
            f"method: expected None, a kvcompress.Method or a callable returning a context manager, "
            f"got {type(method).__name__}"
        )


def cache_bytes(cache) -> int:
    """Bytes of storage a cache holds (each storage counted once)."""
    if hasattr(cache, "memory_bytes"):
        return int(cache.memory_bytes())
    seen, total = set(), 0
    for layer in getattr(cache, "layers", ()):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is None or not hasattr(t, "untyped_storage"):
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def left_pad(rows):
    """Left-pad 1-D token id tensors into ``(input_ids [B, T], attention_mask
    [B, T])``, as a tokenizer with ``padding_side="left"`` does (pad id 0):
    the batch layout kvcompress serves."""
    import torch

    if not rows:
        raise ValueError("rows: expected at least one 1-D tensor of token ids")
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    return ids, mask


def _check_ids(input_ids):
    import torch

    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[0] != 1:
        shape = tuple(input_ids.shape) if hasattr(input_ids, "shape") else type(input_ids).__name__
        raise ValueError(f"input_ids: expected a [1, T] tensor (batch size 1), got {shape}")
    if input_ids.shape[1] < 2:
        raise ValueError("input_ids: need at least 2 tokens")


def greedy(model, cache, input_ids, new_tokens: int, *, force: Sequence[int] | None = None,
           eos_token_id: int | None = None, keep_logits: bool = False):
    """Prefill ``input_ids`` ``[1, T]`` into ``cache``, then decode ``new_tokens``.

    Positions are passed explicitly (``T + i``), so a cache that dropped
    tokens still gets the right rotary positions. With ``force`` the tokens
    fed are ``force[i]`` (teacher forcing) instead of the argmax.

    Returns ``(tokens, logits)``: the ``new_tokens`` argmax tokens (the first
    from the prefill) and, with ``keep_logits``, a float32 ``[new_tokens, V]``
    tensor of the logits that chose them (else ``None``). Stops early at
    ``eos_token_id`` when not forced.
    """
    import torch

    _check_ids(input_ids)
    if new_tokens < 1:
        raise ValueError(f"new_tokens: must be >= 1, got {new_tokens}")
    if force is not None and len(force) < new_tokens - 1:
        raise ValueError(f"force: need {new_tokens - 1} tokens, got {len(force)}")
    T = input_ids.shape[1]
    device = model.device
    tokens, rows = [], []
    with torch.inference_mode():
        out = model(input_ids=input_ids.to(device), **cache_kwargs(model, cache), use_cache=True,
                    position_ids=torch.arange(T, device=device)[None], logits_to_keep=1)
        for i in range(new_tokens):
            logits = out.logits[0, -1].float()
            tokens.append(int(logits.argmax()))
            if keep_logits:
                rows.append(logits.clone())
            if i == new_tokens - 1:
                break
            nxt = force[i] if force is not None else tokens[-1]
            if force is None and eos_token_id is not None and nxt == eos_token_id:
                break
            out = model(input_ids=torch.tensor([[nxt]], device=device), **cache_kwargs(model, cache), use_cache=True,
                        position_ids=torch.tensor([[T + i]], device=device))
    return tokens, (torch.stack(rows) if keep_logits else None)


def _bar(total: int, progress, desc: str):
    if not progress:
        return contextlib.nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def _text(text: str | None) -> str:
    return default_text() if text is None else text


# ----------------------------------------------------------------- passkey


@dataclass
class PasskeyCase:
    """One passkey prompt: where the key was hidden and what came back."""

    n_filler: int
    depth: float
    key: str
    answer: str
    ok: bool
    prompt_tokens: int
    cache_bytes: int
    #: share of the held slots the decode steps read, for methods that sample (MagicPIG)
    read_fraction: float | None = None


@dataclass
class PasskeyResult:
    """Passkey retrieval over a grid of filler lengths × depths."""

    method: str
    cases: list[PasskeyCase] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        """Fraction of cases answered exactly (``nan`` when there are none)."""
        return sum(c.ok for c in self.cases) / len(self.cases) if self.cases else math.nan

    @property
    def cache_bytes(self) -> int:
        """Largest cache held over the cases, in bytes."""
        return max((c.cache_bytes for c in self.cases), default=0)

    def failures(self) -> list[PasskeyCase]:
        return [c for c in self.cases if not c.ok]

    def __repr__(self) -> str:
        ok = sum(c.ok for c in self.cases)
        return (f"PasskeyResult({self.method}: {ok}/{len(self.cases)} answered, accuracy {self.accuracy:.3f}, "
                f"cache {self.cache_bytes / 2**20:.2f} MiB)")


def passkey_case(model, tokenizer, method, n_filler: int, depth: float, *, filler_text: str | None = None,
                 seed: int = 0, max_new_tokens: int = 8) -> PasskeyCase:
    """Hide a 5-digit key at ``depth`` of ``n_filler`` filler tokens, generate
    ``max_new_tokens`` greedily with ``method``, check the first number."""
    prompt = passkey_prompt(tokenizer, n_filler, depth, filler_text=_text(filler_text), seed=seed)
    with method_context(model, method) as new_cache:
        cache = new_cache()
        tokens, _ = greedy(model, cache, prompt.input_ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id)
        held = cache_bytes(cache)
        read = cache.read_fraction() if hasattr(cache, "read_fraction") else None
    answer = tokenizer.decode(tokens, skip_special_tokens=True)
    return PasskeyCase(n_filler, depth, prompt.key, answer.strip(), prompt.answered(answer),
                       int(prompt.input_ids.shape[1]), held, read)


def passkey_accuracy(model, tokenizer, method=None, *, lengths: Iterable[int] = (1000,),
                     depths: Iterable[float] = (0.1, 0.5, 0.9), filler_text: str | None = None, seed: int = 0,
                     max_new_tokens: int = 8, progress: bool = False) -> PasskeyResult:
    """Passkey retrieval with ``method`` over ``lengths`` × ``depths``.

    ``filler_text`` defaults to the Shakespeare excerpt shipped with the
    package; each case takes its filler from a seeded offset (``seed`` + case
    index), the same for every method.
    """
    grid = [(n, d) for n in lengths for d in depths]
    result = PasskeyResult(method_name(method))
    with _bar(len(grid), progress, "passkey") as bar:
        for i, (n, d) in enumerate(grid):
            result.cases.append(passkey_case(model, tokenizer, method, n, d, filler_text=filler_text,
                                             seed=seed + i, max_new_tokens=max_new_tokens))
            if bar is not None:
                bar.update()
    return result


# ----------------------------------------------------------------- fidelity


@dataclass
class FidelityResult:
    """Next-token agreement with the full cache over ``k`` decode steps.

    ``kl`` is the mean KL(full ‖ compressed) in nats of the next-token
    distributions, ``top1`` the fraction of steps where the compressed argmax
    equals the full cache's; ``per_text`` holds ``(kl, top1)`` per text.
    """

    method: str
    k: int
    kl: float
    kl_max: float
    top1: float
    per_text: list[tuple[float, float]] = field(default_factory=list)

    def __repr__(self) -> str:
        return (f"FidelityResult({self.method}: KL {self.kl:.4f} nats (max {self.kl_max:.4f}), "
                f"top-1 {self.top1:.3f} over {self.k} steps × {len(self.per_text)} texts)")


def _context_ids(tokenizer, text: str, tokens: int, what: str):
    import torch

    prefix = special_prefix(tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(prefix) + len(ids) < tokens:
        raise ValueError(f"{what}: text has {len(ids)} tokens, need {tokens - len(prefix)}")
    return torch.tensor([(prefix + ids)[:tokens]])


@dataclass
class FidelityReference:
    """The full cache's run on one text: context ``ids`` ``[1, C]``, its
    ``k + 1`` greedy ``tokens`` and their float32 ``logits`` ``[k + 1, V]``."""

    ids: object
    tokens: list[int]
    logits: object

    @property
    def k(self) -> int:
        return len(self.tokens) - 1


def fidelity_reference(model, tokenizer, text: str, *, context_tokens: int = 512, k: int = 16) -> FidelityReference:
    """Run the full cache on the first ``context_tokens`` tokens of ``text``
    and record ``k + 1`` greedy tokens with their logits."""
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    ids = _context_ids(tokenizer, text, context_tokens, "texts")
    with method_context(model, None) as new_cache:
        tokens, logits = greedy(model, new_cache(), ids, k + 1, keep_logits=True)
    return FidelityReference(ids, tokens, logits)


def fidelity_case(model, method, reference: FidelityReference):
    """``(kl per step, top-1 agreement per step)``, float64 tensors ``[k]``.

    ``method`` reads the reference's context and then its tokens (teacher
    forcing); its next-token distributions at those ``k`` decode steps are
    compared with the full cache's.
    """
    with method_context(model, method) as new_cache:
        _, logits = greedy(model, new_cache(), reference.ids, reference.k + 1, force=reference.tokens,
                           keep_logits=True)
    return step_kl(reference.logits[1:], logits[1:], reference.tokens[1:])


def step_kl(ref_logits, logits, tokens):
    """Per-step ``KL(ref || other)`` in nats and top-1 agreement with
    ``tokens`` (the reference's greedy picks), float64 tensors ``[k]``, from
    logits ``[k, V]`` of the same steps."""
    import torch

    p = torch.log_softmax(ref_logits.double(), -1)
    q = torch.log_softmax(logits.double(), -1)
    kl = (p.exp() * (p - q)).sum(-1).clamp_min(0.0)
    agree = (q.argmax(-1) == torch.as_tensor(tokens, device=q.device)).double()
    return kl, agree


def fidelity(model, tokenizer, method, texts: Sequence[str] | None = None, *, n_texts: int = 2,
             context_tokens: int = 512, k: int = 16, seed: int = 0, references=None,
             progress: bool = False) -> FidelityResult:
    """Fidelity of ``method`` to the full cache (see :func:`fidelity_case`).

    ``texts`` defaults to ``n_texts`` passages cut at seeded offsets from
    the packaged Shakespeare excerpt. Pass ``references`` (from
    :func:`fidelity_reference`) to reuse the full-cache runs across methods.
    """
    if references is None:
        texts = fidelity_texts(texts, n_texts, context_tokens, seed)
        references = [fidelity_reference(model, tokenizer, t, context_tokens=context_tokens, k=k) for t in texts]
    if not references:
        raise ValueError("texts: need at least one text")
    cases = []
    with _bar(len(references), progress, "fidelity") as bar:
        for ref in references:
            cases.append(fidelity_case(model, method, ref))
            if bar is not None:
                bar.update()
    return fidelity_result(method_name(method), references[0].k, cases)


def fidelity_result(method: str, k: int, cases) -> FidelityResult:
    """Per-text ``(kl, agree)`` tensors from :func:`fidelity_case` → :class:`FidelityResult`."""
    import torch

    kl_all = torch.cat([kl for kl, _ in cases])
    agree_all = torch.cat([agree for _, agree in cases])
    per_text = [(float(kl.mean()), float(agree.mean())) for kl, agree in cases]
    return FidelityResult(method, k, float(kl_all.mean()), float(kl_all.max()), float(agree_all.mean()), per_text)


def fidelity_texts(texts, n_texts: int, context_tokens: int, seed: int) -> list[str]:
    """``texts`` checked, or ``n_texts`` seeded passages of the packaged text."""
    if texts is None:
        return sample_passages(default_text(), n_texts, context_tokens * 8, seed=seed)
    if isinstance(texts, str):
        raise TypeError("texts: expected a sequence of strings, got one str")
    if not texts:
        raise ValueError("texts: need at least one text")
    return list(texts)


def sample_passages(text: str, n: int, chars: int, *, seed: int = 0) -> list[str]:
    """``n`` passages of ``chars`` characters from seeded offsets of ``text``."""
    if len(text) < chars:
        raise ValueError(f"text: {len(text)} characters, need at least {chars}")
    rnd = random.Random(seed)
    return [text[s : s + chars] for s in (rnd.randrange(0, len(text) - chars + 1) for _ in range(n))]


# ----------------------------------------------------------------- perplexity


@dataclass
class PerplexityResult:
    """Perplexity of continuations read after a compressed context.

    ``nll`` is the mean negative log-likelihood (nats/token) over ``tokens``
    predicted tokens; ``ppl = exp(nll)``.
    """

    method: str
    ppl: float
    nll: float
    tokens: int
    windows: int

    def __repr__(self) -> str:
        return (f"PerplexityResult({self.method}: ppl {self.ppl:.3f} over {self.tokens} tokens in "
                f"{self.windows} windows)")


def perplexity_window(model, method, ids, context_tokens: int) -> tuple[float, int]:
    """Summed NLL (nats) and token count for one window ``ids`` ``[1, C + L]``.

    The first ``C = context_tokens`` tokens are prefilled (and compressed);
    the continuation is then read in one chunk and its tokens ``2..L`` are
    scored (token 1 is predicted by the prefill, from the full context).
    """
    import torch

    _check_ids(ids)
    C = context_tokens
    L = ids.shape[1] - C
    if C < 1 or L < 2:
        raise ValueError(f"context_tokens: need 1 <= context_tokens <= T - 2, got {C} for T={ids.shape[1]}")
    device = model.device
    with method_context(model, method) as new_cache, torch.inference_mode():
        cache = new_cache()
        model(input_ids=ids[:, :C].to(device), **cache_kwargs(model, cache), use_cache=True,
              position_ids=torch.arange(C, device=device)[None], logits_to_keep=1)
        out = model(input_ids=ids[:, C:].to(device), **cache_kwargs(model, cache), use_cache=True,
                    position_ids=torch.arange(C, C + L, device=device)[None])
    logp = torch.log_softmax(out.logits[0, :-1].double(), -1)
    target = ids[0, C + 1:].to(logp.device)
    return float(-logp.gather(-1, target[:, None]).sum()), L - 1


def perplexity_windows(tokenizer, text: str | None = None, *, context_tokens: int = 1024,
                       continuation_tokens: int = 128, windows: int = 2, seed: int = 0) -> list:
    """``windows`` token windows ``[1, context_tokens + continuation_tokens]``
    at seeded offsets of ``text`` (default: the packaged Shakespeare excerpt)."""
    import torch

    if windows < 1:
        raise ValueError(f"windows: must be >= 1, got {windows}")
    if context_tokens < 1 or continuation_tokens < 2:
        raise ValueError(f"context_tokens, continuation_tokens: need >= 1 and >= 2, got "
                         f"{context_tokens}, {continuation_tokens}")
    prefix = special_prefix(tokenizer)  # e.g. <bos>, which Gemma needs first
    ids = tokenizer(_text(text), add_special_tokens=False)["input_ids"]
    span = context_tokens + continuation_tokens
    if len(ids) < span - len(prefix):
        raise ValueError(f"text: {len(ids)} tokens, need context_tokens + continuation_tokens = {span}")
    rnd = random.Random(seed)
    starts = [rnd.randrange(0, len(ids) - (span - len(prefix)) + 1) for _ in range(windows)]
    return [torch.tensor([prefix + ids[s : s + span - len(prefix)]]) for s in starts]


def perplexity(model, tokenizer, method=None, text: str | None = None, *, context_tokens: int = 1024,
               continuation_tokens: int = 128, windows: int = 2, seed: int = 0,
               progress: bool = False) -> PerplexityResult:
    """Perplexity of ``continuation_tokens``-token continuations after
    ``context_tokens`` compressed tokens, over ``windows`` windows of
    ``text`` (see :func:`perplexity_windows` and :func:`perplexity_window`)."""
    chunks = perplexity_windows(tokenizer, text, context_tokens=context_tokens,
                                continuation_tokens=continuation_tokens, windows=windows, seed=seed)
    nll, count = 0.0, 0
    with _bar(len(chunks), progress, "perplexity") as bar:
        for ids in chunks:
            w_nll, w_count = perplexity_window(model, method, ids, context_tokens)
            nll += w_nll
            count += w_count
            if bar is not None:
                bar.update()
    return perplexity_result(method_name(method), nll, count, len(chunks))


def perplexity_result(method: str, nll: float, count: int, windows: int) -> PerplexityResult:
    """Summed NLL over ``count`` tokens → :class:`PerplexityResult`."""
    mean = nll / count
    return PerplexityResult(method, math.exp(mean), mean, count, windows)


# ----------------------------------------------------------------- assertions


def assert_passkey(result: PasskeyResult, min_accuracy: float = 1.0) -> None:
    """Fail, listing every missed case, when accuracy < ``min_accuracy``."""
    if not result.cases:
        raise AssertionError(f"{result.method}: no passkey cases were run")
    if result.accuracy + 1e-12 < min_accuracy:
        lines = [f"  {c.n_filler} filler tokens, depth {c.depth}: key {c.key}, answered {c.answer!r}"
                 for c in result.failures()]
        raise AssertionError(
            f"{result.method}: passkey accuracy {result.accuracy:.3f} < {min_accuracy} "
            f"({len(lines)} of {len(result.cases)} missed):\n" + "\n".join(lines)
        )


def assert_fidelity(result: FidelityResult, *, max_kl: float | None = None, min_top1: float | None = None) -> None:
    """Fail when the mean KL exceeds ``max_kl`` or top-1 agreement is below ``min_top1``."""
    problems = []
    if max_kl is not None and not result.kl <= max_kl:
        problems.append(f"mean KL {result.kl:.4f} nats > {max_kl}")
    if min_top1 is not None and not result.top1 >= min_top1:
        problems.append(f"top-1 agreement {result.top1:.3f} < {min_top1}")
    if problems:
        per = ", ".join(f"({kl:.4f}, {t:.2f})" for kl, t in result.per_text)
        raise AssertionError(f"{result.method}: " + "; ".join(problems) + f" — per text (KL, top-1): {per}")


def assert_perplexity(result: PerplexityResult, baseline: PerplexityResult, *, max_increase: float = 0.1) -> None:
    """Fail when ``result.ppl`` exceeds ``baseline.ppl`` by more than ``max_increase`` (relative)."""
    if result.tokens != baseline.tokens:
        raise ValueError(f"baseline: scored {baseline.tokens} tokens, result {result.tokens}; not comparable")
    limit = baseline.ppl * (1.0 + max_increase)
    if not result.ppl <= limit:
        raise AssertionError(
            f"{result.method}: perplexity {result.ppl:.3f} > {limit:.3f} "
            f"({baseline.method} {baseline.ppl:.3f} + {100 * max_increase:.0f}%)"
        )


def assert_compressed(cache, min_ratio: float) -> None:
    """Fail unless a :class:`kvcompress.KVCache` holds at most ``1/min_ratio``
    of the bytes a full cache of the same tokens would."""
    stats = cache.stats()
    ratio = stats.full_bytes / max(1, stats.total_bytes)
    if not ratio >= min_ratio:
        raise AssertionError(
            f"cache holds {stats.total_bytes} bytes for {stats.full_bytes} full-cache bytes: "
            f"{ratio:.2f}x < {min_ratio}x\n{stats}"
        )
