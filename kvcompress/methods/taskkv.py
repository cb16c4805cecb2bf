"""TaskKV: heads far from their layer's semantic centre keep every token."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .. import ops
from .base import LayerView
from .window import SnapKV


@dataclass
class TaskKV(SnapKV):
    """TaskKV (He et al., "Task-KV: Task-aware KV Cache Optimization via
    Semantic Differentiation of Attention Heads", arXiv 2501.15113): the
    heads whose outputs lie far from the semantic centre of the heads
    (*heterogeneous heads*) keep their whole cache; every other head keeps
    the attention sinks, a recent window and a few *middle activations*.

    **Paper.** Each head's output gives it a semantic vector; the heads'
    centre is their mean, and a *semantic separator* marks the heads far
    from it as heterogeneous. Those carry the task's semantics and keep the
    full cache; the others aggregate and focus information and keep only
    sinks, recent tokens and middle activations (the most attended tokens
    between them), so the total fits the budget.

    **Our reading, and every choice made.**

    * **Semantic vectors** come from a :class:`kvcompress.heads.HeadProfile`
      (its ``semantic`` statistic, :func:`kvcompress.heads.profile_heads`):
      a query head's vector is its mean contribution to the residual stream
      (its attention output through its slice of ``o_proj``, averaged over
      the tokens after the first), the centre is the mean over the heads of
      the **layer**, the statistic the Euclidean distance. A kv head's
      distance is the mean of its query heads'. The paper measures the
      heads on the input itself ("task-aware"); we measure them once per
      model on texts the user gives (``profile_heads(model,
      semantic_ids=...)``; the evaluation uses the packaged text), so one
      profile serves a task. Distances are divided by their layer's mean,
      so heads of different layers compare.
    * **Separator**: the top ``ceil(hetero * n)`` of the ``n`` kv heads of
      the full-attention layers by that ratio (ties to the lower layer,
      then the lower head) are heterogeneous: a fraction, as
      RazorAttention's retrieval heads; the paper's threshold rule is not
      reproduced. Sliding-window layers have none (their attention cannot
      reach past the window whatever they keep).
    * **Budgets**: a heterogeneous head keeps every token (the paper's full
      budget); any other keeps ``budget`` (or ``ratio``'s kept count):
      its first ``sinks`` real tokens, the last ``window`` and, between
      them, the middle activations: the top tokens by SnapKV's score (the
      mean attention of the last ``window`` queries, max-pooled over
      ``kernel`` tokens), which reuses ``ops.window_scores``. A layer holds
      more than ``H * budget`` (``whole_heads``), stored per head.
    * **Decoding**: each head keeps its share of its row's target as in
      every per-head method; with ``budget=`` a heterogeneous head's share
      stays at its prefill length (RazorAttention's rule; a prompt that fit
      the budget gives every head the budget).
    * **profile** ``None``: computed when a ``kvcompress.compress`` session
      starts (``prepare``) on random tokens; the evaluation computes one per
      run with the packaged text as ``semantic_ids``. A profile saved
      before the ``semantic`` statistic existed (format 1) is refused by
      name.

    Parameters
    ----------
    profile : HeadProfile, dict, path or None
    hetero : float in [0, 1]
        Fraction of the full-attention kv heads kept whole. Default 0.1: on
        16 development passages (two licence texts, both models, budget 128)
        0.05 was worse (+0.031 nats KL@16) and 0.2 slightly better (-0.014)
        at 41% more bytes on SmolLM2, a memory trade-off left to the user
        (benchmarks/RESULTS.md, "The other open choices on two development texts").
    sinks : int >= 0
        Leading real tokens every other head keeps.
    window, kernel, pool, gqa
        SnapKV's recent window and middle-activation scores.
    """

    profile: Any = None
    hetero: float = 0.1
    sinks: int = 4

    headwise: ClassVar[bool] = True
    whole_heads: ClassVar[bool] = True

    def _check_fields(self) -> None:
        super()._check_fields()
        self._check_float("hetero", self.hetero, at_least=0.0, at_most=1.0)
        self._check_int("sinks", self.sinks, 0)
        if self.profile is not None:
            from ..heads import as_profile

            self.profile = as_profile(self.profile)
            if self.profile.semantic is None:
                raise ValueError("profile: has no 'semantic' head statistic (a profile saved in format 1, before "
                                 "kvcompress measured it); TaskKV needs it: compute a new one with "
                                 "kvcompress.profile_heads(model)")

    def min_budget(self) -> int:
        return self.sinks + self.window

    def _forced_text(self) -> str:
        return f"sinks={self.sinks} plus the window, window={self.window}"

    def prepare(self, model) -> "TaskKV":
        """The method with a profile of ``model`` (computed once when none was given)."""
        from ..heads import with_profile

        return with_profile(self, model)

    # ------------------------------------------------------------ heads
    def distances(self) -> torch.Tensor:
        """float64 ``[L, Hkv]``: each kv head's semantic distance over its
        layer's mean (0 for sliding layers and layers without scores)."""
        d = self.profile.kv_scores("semantic")
        mean = d.mean(1, keepdim=True)
        return torch.where(mean > 0, d / torch.where(mean > 0, mean, 1), torch.zeros_like(d))

    def heterogeneous_heads(self) -> torch.Tensor:
        """bool ``[L, Hkv]``: the kv heads that keep their whole cache."""
        if self.profile is None:
            raise ValueError("profile: TaskKV needs a head profile; run inside kvcompress.compress(model, method) "
                             "or pass profile=kvcompress.profile_heads(model)")
        d = self.distances()
        sliding = set(self.profile.sliding)
        rows = self.profile.semantic
        heads = [(float(d[li, h]), li, h) for li in range(d.shape[0])
                 if rows[li] is not None and li not in sliding for h in range(d.shape[1])]
        k = math.ceil(float(self.hetero) * len(heads))
        heads.sort(key=lambda t: (-t[0], t[1], t[2]))
        out = torch.zeros(d.shape, dtype=torch.bool)
        for _, li, h in heads[:k]:
            out[li, h] = True
        return out

    #: the name every ``whole_heads`` method answers (RazorAttention's too):
    #: the kv heads kept whole
    retrieval_heads = heterogeneous_heads

    # ------------------------------------------------------------ selection
    def forced(self, view: LayerView, keep: int) -> tuple[int, int]:
        w = min(self._window(view), keep)
        return min(self.sinks, keep - w), w

    def select(self, view: LayerView, keep):
        """A prefill chunk: heterogeneous heads keep every real slot, the
        others ``keep``; at decoding (per-head counts, or the first
        compression of a prompt that fit the budget) the counts are used as
        given. ``[B, Hkv, k]`` int64, -1 padded."""
        if not isinstance(keep, int) or view.phase != "prefill":
            return super().select(view, keep)
        scores = self.score(view)
        B, H = int(scores.shape[0]), int(scores.shape[1])
        r = self.heterogeneous_heads()
        if view.layer_idx >= r.shape[0]:
            raise ValueError(f"profile: has {r.shape[0]} layers, asked for layer {view.layer_idx}")
        if r.shape[1] != H:
            raise ValueError(f"profile: {r.shape[1]} kv heads per layer, the cache has {H}")
        whole = r[view.layer_idx].to(scores.device)[None, :].expand(B, H)
        real = (view.length - view.kv_start.to(scores.device)).clamp_min(1)[:, None].expand(B, H)
        k = torch.where(whole, real, torch.full_like(real, keep).minimum(real))
        sinks, window = self.forced(view, keep)
        return ops.select_topk(scores, k, sinks=sinks, window=window, kv_start=view.kv_start)

    def describe(self) -> str:
        text = super().describe()
        return text.replace(f"profile={self.profile}", "profile") if self.profile is not None else text

    def __repr__(self) -> str:
        return self.describe()
