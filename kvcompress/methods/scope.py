"""SCOPE: separate budgets for the prompt and for the generated tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import ops
from .base import LayerView, Method

_STRATEGIES = ("slide", "adaptive", "discontinuous")


@dataclass
class SCOPE(Method):
    """SCOPE (arXiv 2412.13649): the prompt is compressed once, by a prefill
    method, and kept; the generated tokens have a budget of their own.

    Paper (Wu et al., ACL 2025) and the authors' code (``model/kv_utils.py``
    of Linking-ai/SCOPE): compressing the prompt too hard hurts long-output
    reasoning, and the tokens the decoding steps attend to drift away from the
    prompt's heavy hitters, so the two phases get separate cache pools. The
    prefill pool is what an existing method (SnapKV, PyramidKV, H2O,
    StreamingLLM, ...) keeps of the prompt, and it is never touched again. The
    decoding pool holds at most ``β1`` generated tokens: the last ``β2`` and
    the ``β1 - β2`` older generated tokens the *current* step's query attends
    to most (the code scores with the newest query's softmax attention over
    the whole cache, not an accumulated sum). Strategies:

    * ``slide``: the pool has a fixed size ``β1`` and is re-selected at every
      decoding step;
    * ``adaptive``: the heavy-hitter part grows by one slot every ``δ``
      steps, ``β2 + (t - 1) // δ`` at decoding step ``t`` (the code sets
      ``δ = (T - β2) // (β1 - β2)`` for an output of ``T`` tokens, so the
      pool reaches ``β1`` at the end of the output);
    * ``discontinuous``: adaptive sizes, but the heavy hitters are re-selected
      only every ``δ`` steps (fewer top-k selections and memory moves); in
      between, new tokens are appended.

    Our reading (every choice):

    * ``budget`` / ``ratio`` is the **prefill** budget, applied by the prefill
      method to the prompt exactly as that method alone would (PyramidKV's
      per-layer schedule included); a ``ratio`` is a share of the prompt only.
      The evaluation's budgets and ratios therefore set the prefill pool;
      ``decode`` (the paper's ``β1``) and ``recent`` (``β2``) are slots per kv
      head.
    * A row's target is ``prefill part + decoding part``:
      ``min(t, pool(t))`` for the ``t`` tokens generated since the last
      prefill chunk (``Method.phase_target``), with ``pool(t) =
      decode`` (slide) or ``recent + min(decode - recent, (t - 1) // every)``
      (adaptive, discontinuous; capped at ``decode`` so a layer never holds
      more than the prefill budget + ``decode`` + ``interval - 1`` slots per
      head, where the paper's pool only reaches ``β1`` at the planned output
      length). ``every`` is the paper's ``δ``.
    * Re-selection: the layer is re-selected once a row holds ``interval``
      slots over its target (the library's rule). ``interval`` defaults to 1
      for ``slide`` and ``adaptive`` (the paper re-selects every step) and is
      ``every`` for ``discontinuous``, which is exactly that strategy (the
      paper skips ``δ`` steps, then re-selects; ours re-selects once ``every``
      tokens have piled up over the pool's size).
    * Which slots are the prompt's: a uniform layer keeps its slots in token
      order and the prefill pool is never evicted, so in a decode-time
      re-selection with target ``keep`` the first ``keep - pool-part`` real
      slots of each row are the prefill pool. They are passed to
      ``ops.select_topk`` as forced leading keeps (``sinks``), the last
      ``recent`` slots as the forced window, and the rest is the top of
      ``ops.window_scores`` of the newest query (its softmax over every held
      slot, prompt included, as in the code; the query heads of a GQA group
      are averaged, where the code keeps one cache per query head). No
      per-slot state and no new per-token op.
    * A later prefill chunk (a new turn) is a prefill: the prefill method
      compresses everything the layer holds (the previous turns' prefill and
      decoding pools and the new chunk) to the prefill budget, and the
      decoding pool starts again.
    * ``interval=0`` never re-selects while decoding (the code's "None":
      prefill-only compression, the cache grows).
    * Defaults: ``decode=128, recent=decode // 2`` (the paper's ``β1 = 512,
      β2 = 256`` quartered, for prefill budgets of 64-256 rather than 2048),
      ``every=15`` (the code's ``δ`` for those and a 4K-token output).
      Sliding-window layers (Gemma) keep their window as for every method.

    Parameters
    ----------
    budget, ratio
        Exactly one: the prefill pool (kept prompt slots per kv head), or the
        fraction of the prompt removed. With a method instance as ``prefill``
        they may be left out and are taken from it.
    prefill : str or Method
        The prefill method: a registered name (``"snapkv"``, ``"pyramidkv"``,
        ``"h2o"``, ``"streamingllm"``, ...; built with its default options) or
        an instance (``SnapKV(budget=256, window=32)``), whose budget or ratio
        must then agree with SCOPE's. It must evict with the same slots in
        every head (not per head, not merging, not composed).
    decode : int
        ``β1``: most generated tokens a row keeps per kv head.
    recent : int or None
        ``β2``: the most recent generated tokens always kept, ``0 <= recent
        <= decode`` (``recent == decode``: a plain recent window, no heavy
        hitters; the code requires ``β1 > β2``); ``None``: ``decode // 2``.
    strategy : {"slide", "adaptive", "discontinuous"}
    every : int
        ``δ``: steps per extra heavy-hitter slot (adaptive, discontinuous) and
        steps between re-selections (discontinuous).
    interval : int or None
        Decode-time slack; ``None``: 1, or ``every`` for ``discontinuous``
        (any other value is refused there).
    """

    prefill: Any = "snapkv"
    # the paper's β1 = 512 with β2 = 256 (both quartered for budgets of 64-256 here)
    decode: int = 128
    recent: int | None = None
    strategy: str = "slide"
    # the paper's δ for β1 = 512, β2 = 256 and 4K-token outputs: (4096 - 256) // 256
    every: int = 15
    interval: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.prefill, Method) and self.budget is None and self.ratio is None:
            self.budget, self.ratio = self.prefill.budget, self.prefill.ratio
        if self.strategy == "discontinuous":
            self._check_int("every", self.every, 1)
            if self.interval is not None and self.interval != self.every:
                raise ValueError(f"interval: strategy='discontinuous' re-selects every `every` steps "
                                 f"(every={self.every}); got interval={self.interval}: change every instead")
        if self.interval is None:
            self.interval = self._default_interval()
        super().__post_init__()

    def _check_fields(self) -> None:
        self._check_int("decode", self.decode, 1)
        if self.recent is None:
            self.recent = self.decode // 2
        self._check_int("recent", self.recent, 0)
        if self.recent > self.decode:
            raise ValueError(f"recent: must be <= decode (the decoding pool keeps at most decode={self.decode} "
                             f"generated tokens), got recent={self.recent}")
        self._check_int("every", self.every, 1)
        if not isinstance(self.strategy, str) or self.strategy not in _STRATEGIES:
            raise ValueError(f"strategy: expected one of {_STRATEGIES}, got {self.strategy!r}")
        for name in ("quant", "sparse", "depth"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name}: SCOPE re-selects its decoding pool at every step; it does not compose "
                                 f"with {getattr(self, name).describe()}")
        self._inner = self._resolve_prefill()

    def _resolve_prefill(self) -> Method:
        """The prefill method, with SCOPE's budget or ratio."""
        from . import REGISTRY  # the registry imports this module

        p = self.prefill
        if isinstance(p, str):
            cls = REGISTRY.get(p.strip().lower())
            if cls is None or cls is SCOPE or not cls.evicts:
                raise ValueError(f"prefill: {p!r} is not an evicting method; choose one of "
                                 f"{', '.join(n for n, c in REGISTRY.items() if c.evicts and c is not SCOPE)}")
            p = cls(budget=self.budget, ratio=self.ratio)
        elif not isinstance(p, Method):
            raise TypeError(f"prefill: expected a method name or a kvcompress method such as "
                            f"kvcompress.SnapKV(budget=256), got {type(p).__name__}")
        elif (p.budget, p.ratio) != (self.budget, self.ratio):
            raise ValueError(f"prefill: {p.describe()} has another budget or ratio than SCOPE "
                             f"(budget={self.budget}, ratio={self.ratio}); give it once")
        if isinstance(p, SCOPE) or not p.evicts or p.headwise or p.merges or p.across_layers or p.whole_heads:
            raise ValueError(f"prefill: {p.describe()} cannot be SCOPE's prefill method: it must evict with the "
                             "same slots in every head, e.g. SnapKV, PyramidKV, H2O, TOVA or StreamingLLM")
        if p.defers_prefill or p.needs_hidden or p.needs_tokens:
            # SCOPE runs the prefill method's selection itself, layer by
            # layer: budgets decided after the whole prefill (DynamicKV,
            # SqueezeAttention) or token ids would be silently lost
            raise ValueError(f"prefill: {p.describe()} sets its budgets from the whole prefill or reads token ids; "
                             "SCOPE's prefill method must decide each layer alone, e.g. SnapKV, PyramidKV, H2O, "
                             "TOVA or StreamingLLM")
        if p.quant is not None or p.sparse is not None or p.depth is not None or p.mixed_precision:
            raise ValueError(f"prefill: {p.describe()} is composed; give SCOPE a plain evicting method")
        return p

    # ------------------------------------------------------------ budgets
    def min_budget(self) -> int:
        return self._inner.min_budget()

    def _forced_text(self) -> str:
        return f"its prefill method {self._inner.describe()} keeps {self._inner._forced_text()}"

    def pool(self, t: int) -> int:
        """Decoding-pool size after ``t`` generated tokens (``t >= 1``)."""
        if self.strategy == "slide":
            return self.decode
        return self.recent + min(self.decode - self.recent, max(0, t - 1) // self.every)

    def decode_slots(self, t: int) -> int:
        """Generated slots a row keeps after ``t`` generated tokens."""
        return min(t, self.pool(t)) if t > 0 else 0

    def layer_budget(self, layer_idx: int, num_layers: int, mean_budget: float) -> float:
        return self._inner.layer_budget(layer_idx, num_layers, mean_budget)

    def row_target(self, layer_idx: int, num_layers: int, seen: int) -> int:
        """The prefill method's target for ``seen`` prompt tokens."""
        return self._inner.row_target(layer_idx, num_layers, seen)

    def phase_target(self, layer_idx: int, num_layers: int, prompt: int, decoded: int) -> int:
        """The prefill pool of ``prompt`` tokens plus the decoding pool after
        ``decoded`` generated ones."""
        return self._inner.row_target(layer_idx, num_layers, prompt) + self.decode_slots(decoded)

    # ------------------------------------------------------------ the layer's calls
    @property
    def slot_state(self) -> tuple[str, ...]:
        # the prefill method's own state (H2O's accumulated attention), kept
        # at every call so the prefill pool is chosen exactly as alone
        return self._inner.slot_state

    def held_queries(self) -> int:
        return 1  # the newest query scores the decoding pool

    def observe(self, view: LayerView) -> None:
        self._inner.observe(view)

    def select(self, view: LayerView, keep):
        """Prefill: the prefill method's selection. Decoding: the first
        ``keep - decode_slots(steps)`` real slots (the prefill pool), the last
        ``recent`` slots and the top of the newest query's attention among
        the generated slots between them (``[B, Hkv, keep]`` int64)."""
        if view.phase == "prefill":
            return self._inner.select(view, keep)
        if not isinstance(keep, int):
            raise NotImplementedError("SCOPE keeps the same slots in every head")
        kept_prefill = keep - self.decode_slots(view.steps)
        scores = ops.window_scores(view.queries[:, :, -1:], view.keys, scaling=view.scaling,
                                   kv_start=view.kv_start)
        return ops.select_topk(scores, keep, sinks=kept_prefill, window=min(self.recent, keep - kept_prefill),
                               kv_start=view.kv_start)

    def _default_interval(self) -> int:
        # the interval __post_init__ fills in, and describe() leaves out
        return self.every if self.strategy == "discontinuous" else 1

    def describe(self) -> str:
        text = super().describe()
        if isinstance(self.prefill, Method):
            text = text.replace(f"prefill={self.prefill}", f"prefill={self.prefill.describe()}")
        return text


__all__ = ["SCOPE"]
