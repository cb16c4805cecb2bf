"""HeadKV: per-head budgets from a profile of what each head does."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .. import ops
from .base import LayerView
from .window import SnapKV


def _fill(counts: torch.Tensor, cap: int) -> torch.Tensor:
    """``counts`` (int64 ``[H]``) with no head over ``cap`` slots (a row's
    tokens): what capped heads cannot hold goes to the others in proportion
    to their counts (largest remainder, ties to the lower head), so the
    layer keeps ``min(H * cap, sum(counts))``."""
    c = counts.clone()
    for _ in range(int(c.numel())):
        over = c > cap
        excess = int((c[over] - cap).sum())
        c[over] = cap
        room = ~(c >= cap)
        if excess == 0 or not room.any():
            break
        w = c[room].double()
        want = w / w.sum() * excess if w.sum() > 0 else torch.full_like(w, excess / w.numel())
        give = want.floor().long()
        rest = excess - int(give.sum())
        order = sorted(range(int(w.numel())), key=lambda i: (-(float(want[i]) - float(give[i])), i))
        for i in order[:rest]:
            give[i] += 1
        c[room] += give
    return c


@dataclass
class HeadKV(SnapKV):
    """HeadKV: heads that copy from the context keep more, across all layers.

    Paper (Fu et al., "Not All Heads Matter: A Head-Level KV Cache
    Compression Method with Integrated Retrieval and Reasoning", ICLR 2025,
    arXiv 2410.19258): each head's importance ``s_h`` comes from a
    Retrieval-Heads style needle test, run once per model; scores are
    normalised over *every* head of the model, sharpened ``p_h ∝ s_h^temp``;
    each head gives up ``base // beta`` of its selectable budget ``base``
    (the budget less the observation window) to one pool for the whole model,
    and gets back ``round(p_h * pool)``, so important heads in any layer keep
    more. Tokens are then chosen per head by SnapKV's scores.

    Our reading and choices:

    * **head scores**: the ``copy`` score of a :class:`kvcompress.heads.HeadProfile`
      (the argmax hit rate on the earlier occurrence's successor in repeated
      random sequences, :func:`kvcompress.heads.profile_heads`): the
      retrieval (copy-paste) statistic, with no text and no download. The
      paper's reasoning-augmented variant (R2) needs reasoning QA data we do
      not ship; not built;
    * **kv heads**: our cache stores kv heads, so a kv head's score is the
      mean of its query heads' (grouped-query models);
    * **beta** as in the paper (``floor(base / beta)`` of each head's
      selectable budget is pooled; the paper sweeps 1.005-10). Default 2,
      chosen on two development texts (SmolLM2, KL@16 over 8 passages at
      budgets 64 and 128, beta 1.01 / 1.25 / 2 / 5): 2 has the lowest KL at
      128 on both (paired against 1.25: -0.065 and -0.051 nats, intervals
      below 0) and is tied-lowest at 64 (benchmarks/RESULTS.md);
      sliding-window layers take no part (they keep their window), nor do
      layers the profile could not score (each head keeps the budget);
      every other layer pools, a layer whose heads all score 0 included
      (it gets nothing back), so the model holds ``L * H * budget`` up to
      rounding;
    * the ``budget`` (or ``ratio``'s kept count) is the mean per head; the
      pool is spread over the layers' heads in proportion to ``p_h``, so a
      layer can hold more or less than the budget (``across_layers``); a
      head's count is capped at the row's tokens and what it cannot hold
      goes to the layer's other heads in proportion to their counts (a layer
      whose heads all fit keeps every token; its surplus is not moved to
      other layers, which are compressed already);
    * **profile** ``None``: :func:`profile_heads` runs when a
      ``kvcompress.compress`` session starts (``prepare``), 4 random
      sequences of 256 tokens; pass a saved profile to skip that;
    * decoding: each head keeps its share of the row's target (as AdaKV).

    Parameters
    ----------
    profile : HeadProfile, dict, path or None
    beta : float >= 1
        Each head pools ``floor(base / beta)`` of its ``base = keep - window``
        selectable slots; the pool is shared out by score.
    temp : float > 0
        Sharpening exponent on the normalised scores.
    window, kernel, pool, gqa
        SnapKV's selection within each head.
    """

    profile: Any = None
    beta: float = 2.0
    temp: float = 1.0

    headwise = True
    across_layers = True

    def _check_fields(self) -> None:
        super()._check_fields()
        self._check_float("beta", self.beta, at_least=1.0)
        self._check_float("temp", self.temp, above=0.0)
        if self.profile is not None:
            from ..heads import as_profile

            self.profile = as_profile(self.profile)

    def prepare(self, model) -> "HeadKV":
        """The method with a profile of ``model`` (computed once when none was given)."""
        from ..heads import with_profile

        return with_profile(self, model)

    def shares(self) -> torch.Tensor:
        """float64 ``[L, Hkv]``: each head's share ``p_h`` of the pool (sums
        to 1 over the heads of the pooled layers, :meth:`_pooled_layers`)."""
        s = self.profile.kv_scores("copy")
        full = torch.zeros(s.shape[0], dtype=torch.bool)
        full[sorted(self._pooled_layers(s.shape[0]))] = True
        p = s.clamp_min(0) ** float(self.temp)
        p[~full] = 0
        total = p.sum()
        if not total > 0:  # no head copies: the pool is spread evenly
            p = full[:, None].double().expand_as(p).clone()
            total = p.sum()
        return p / total

    def _pooled_layers(self, L: int) -> set:
        """Layers whose heads share the pool: full-attention layers with copy
        scores (a sliding layer keeps its window, and a layer whose attention
        the profile could not read has no score to share by)."""
        rows, sliding = self.profile.copy, set(self.profile.sliding)
        return {i for i in range(L) if i not in sliding and rows[i] is not None}

    def head_counts(self, layer_idx: int, keep: int, window: int) -> torch.Tensor:
        """int64 ``[Hkv]`` slots per head of layer ``layer_idx`` for a mean of
        ``keep`` per head (window included)."""
        if self.profile is None:
            raise ValueError("profile: HeadKV needs a head profile; run inside kvcompress.compress(model, method) "
                             "or pass profile=kvcompress.profile_heads(model)")
        p = self.shares()
        if layer_idx >= p.shape[0]:
            raise ValueError(f"profile: has {p.shape[0]} layers, asked for layer {layer_idx}")
        # every scored full-attention layer's heads give to the pool, whatever
        # their scores: a layer whose heads all score 0 (as layer 0 often
        # does) gives its share and gets back nothing, so the model's total
        # stays L * H * keep up to rounding (counting only layers with a
        # positive score lost that share); a layer the profile could not
        # score takes no part and keeps `keep` per head
        pooled_layers = self._pooled_layers(p.shape[0])
        if layer_idx not in pooled_layers:
            return torch.full((p.shape[1],), max(keep, window), dtype=torch.int64)
        L_full = len(pooled_layers)
        base = max(0, keep - window)
        pooled = math.floor(base / float(self.beta))
        total = pooled * L_full * p.shape[1]
        counts = torch.round(p[layer_idx] * total + (base - pooled)).long() + window
        return counts

    def select(self, view: LayerView, keep):
        """An int ``keep`` (prefill): each head keeps its profile count; per-head
        counts (a decode-time re-selection) are used as given."""
        if not isinstance(keep, int):
            return super().select(view, keep)
        scores = self.score(view)
        sinks, window = self.forced(view, keep)
        H = int(scores.shape[1])
        counts = self.head_counts(view.layer_idx, keep, window).to(scores.device)
        if counts.numel() != H:
            raise ValueError(f"profile: {counts.numel()} kv heads in layer {view.layer_idx}, the cache has {H}")
        valid = (view.length - view.kv_start).clamp_min(1).tolist()
        k = torch.stack([_fill(counts.cpu(), int(n)) for n in valid]).to(scores.device)
        return ops.select_topk(scores, k, sinks=sinks, window=window, kv_start=view.kv_start)

    def describe(self) -> str:
        prof = "profile" if self.profile is not None else "profile=None"
        text = super().describe()
        return text.replace(f"profile={self.profile}", prof) if self.profile is not None else text

    def __repr__(self) -> str:
        return self.describe()
