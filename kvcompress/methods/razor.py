"""RazorAttention: retrieval heads keep everything, the others a window and a compensation token."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .. import ops
from .base import LayerView, Method


@dataclass
class RazorAttention(Method):
    """RazorAttention: retrieval heads keep the whole cache, every other head
    keeps its sinks, a recent window and one compensation token.

    Paper (Tang et al., "RazorAttention: Efficient KV Cache Compression
    Through Retrieval Heads", ICLR 2025, arXiv 2407.15891, Algorithm 1):
    *retrieval heads* (echo heads, which attend to the earlier occurrence of
    the current token, and induction heads, which attend to the token after
    it), found by a data-free probe on repeated random tokens, keep the full
    cache; every other head keeps the first ``N0`` sink tokens and a recent
    buffer ``L_h = max(S0, N / C)`` and folds every token it drops into ONE
    compensation token ``k^ = mean of the dropped keys``, ``v^ = mean of
    the dropped values``, which attention counts ``d`` times (its
    exp-score multiplied by the ``d`` tokens it stands for). Defaults:
    the top 1% echo heads and the top 14% induction heads are protected,
    ``N0 = 4``.

    Our reading and choices:

    * **heads**: the ``induction`` and ``echo`` scores of a
      :class:`kvcompress.heads.HeadProfile` (repeated random tokens, no
      text: :func:`kvcompress.heads.profile_heads`). The query heads of the
      model's full-attention layers (``profile.sliding`` and layers without
      scores excluded) are ranked by ``induction``, highest first (ties to
      the lower layer, then the lower head), and the top
      ``ceil(induction * n)`` of the ``n`` heads are induction heads;
      likewise ``ceil(echo * n)`` echo heads by ``echo``. Our cache stores
      kv heads, so a kv head is a **retrieval head** when any of its query
      heads is one (query heads are grouped onto kv heads in order).
    * **budget**: ``budget`` (or ``ratio``'s kept count) is ``L_h``, the
      slots a non-retrieval head keeps: its first ``sinks`` real slots, the
      compensation slot and the most recent ``keep - sinks - 1`` slots, so
      ``min_budget() = sinks + 2``. The paper's ``max(S0, N / C)`` is a
      budget rule; ours is the library's ``budget=``/``ratio=``. A head
      holding no more than ``keep`` real slots keeps them all (no
      compensation slot). When a ``ratio`` target is below ``sinks + 2`` the
      sinks shrink first (to ``keep - 2``, not below 0; ``keep = 1`` is the
      compensation slot alone).
    * **compensation**: the mean of the dropped span ``[start + sinks,
      n - (keep - sinks - 1))`` (:func:`kvcompress.ops.span_merge`, float64
      sums), kept at the index of the last dropped slot so slots stay in
      token order; its count is the number of tokens it stands for and
      attention adds ``log(count)`` to its logit (``count_bias``), which
      is the paper's ``d * exp(score)``.
    * **layers hold more than ``H * target``**: retrieval heads keep every
      token, so a layer holds the non-retrieval heads' budgets plus its
      retrieval heads' lengths (``whole_heads``).
    * **decoding** (every ``interval`` tokens, :meth:`recompact`): a head
      over its budget keeps its first ``sinks`` slots, one compensation slot
      (the count-weighted mean of everything between the sinks and the most
      recent ``budget - sinks - 1`` slots, the old compensation slot with
      its count ``d`` included, so the compensation token stays the exact
      mean of every token it absorbed), and those recent slots. The
      decode-time re-merge has no layer index, so retrieval heads are not
      special there: every head keeps its share of the row's target, as
      every per-head method does (``CompressedLayer._set_shares``): with
      ``ratio=`` a retrieval head's share (its prefill length over the
      target) follows the growing target, so it keeps every token; with
      ``budget=`` it stays at its prefill length and older tokens past that
      fold into a compensation token of its own.
    * **profile** ``None``: :func:`profile_heads` runs when a
      ``kvcompress.compress`` session starts (``prepare``; the evaluation
      computes it once per run), 4 random sequences of 256 tokens.

    Parameters
    ----------
    profile : HeadProfile, dict, path or None
    sinks : int >= 0
        First real slots every non-retrieval head keeps (``N0``).
    induction, echo : float in [0, 1]
        Fractions of the full-attention query heads protected by each score.
    """

    profile: Any = None
    sinks: int = 4
    induction: float = 0.14
    echo: float = 0.01

    headwise: ClassVar[bool] = True
    merges: ClassVar[bool] = True
    whole_heads: ClassVar[bool] = True

    def _check_fields(self) -> None:
        self._check_int("sinks", self.sinks, 0)
        for name in ("induction", "echo"):
            self._check_float(name, getattr(self, name), at_least=0.0, at_most=1.0)
        if self.profile is not None:
            from ..heads import as_profile

            self.profile = as_profile(self.profile)

    def min_budget(self) -> int:
        return self.sinks + 2

    def _forced_text(self) -> str:
        return f"sinks={self.sinks} + one compensation slot + one recent slot"

    @property
    def count_bias(self) -> bool:
        return True

    def prepare(self, model) -> "RazorAttention":
        """The method with a profile of ``model`` (computed once when none was given)."""
        from ..heads import with_profile

        return with_profile(self, model)

    # ------------------------------------------------------------ heads
    def _top(self, which: str, fraction: float) -> set:
        """``(layer, kv head)`` of the top ``ceil(fraction * n)`` of the ``n``
        full-attention query heads by the profile's ``which`` score (ties to
        the lower layer, then the lower head), each named by its kv head."""
        prof = self.profile
        rows = getattr(prof, which)
        sliding = set(prof.sliding)
        heads = [(float(x), li, h, len(row) // prof.kv_heads) for li, row in enumerate(rows)
                 if row is not None and li not in sliding for h, x in enumerate(row)]
        k = math.ceil(float(fraction) * len(heads))
        heads.sort(key=lambda t: (-t[0], t[1], t[2]))
        return {(li, h // g) for _, li, h, g in heads[:k]}

    def retrieval_heads(self) -> torch.Tensor:
        """bool ``[L, Hkv]``: the kv heads that keep their whole cache."""
        if self.profile is None:
            raise ValueError("profile: RazorAttention needs a head profile; run inside kvcompress.compress(model, "
                             "method) or pass profile=kvcompress.profile_heads(model)")
        out = torch.zeros(self.profile.num_layers, self.profile.kv_heads, dtype=torch.bool)
        for li, hk in self._top("induction", self.induction) | self._top("echo", self.echo):
            out[li, hk] = True
        return out

    def _layer_heads(self, layer_idx: int, H: int) -> torch.Tensor:
        r = self.retrieval_heads()
        if layer_idx >= r.shape[0]:
            raise ValueError(f"profile: has {r.shape[0]} layers, asked for layer {layer_idx}")
        if r.shape[1] != H:
            raise ValueError(f"profile: {r.shape[1]} kv heads per layer, the cache has {H}")
        return r[layer_idx]

    # ------------------------------------------------------------ merging
    def _fold(self, keys, values, counts, start, keep, whole):
        """One compensation slot per head: ``keys``/``values`` ``[B, H, n, D]``,
        ``counts`` ``[B, H, n]`` float32 or None, ``start`` int64 ``[B, H]``
        (first real slot), ``keep`` int64 ``[B, H]`` (slots a head may keep),
        ``whole`` bool ``[B, H]`` (heads kept whole whatever their length).
        Returns ``(centers [B, H, C] -1 padded, EvictMergeResult)``."""
        B, H, n = (int(x) for x in keys.shape[:3])
        device = keys.device
        real = n - start
        fold = ~whole & (real > keep)
        s = torch.clamp(torch.clamp(keep - 2, min=0), max=self.sinks)  # sinks of a folding head
        recent = keep - s - 1
        lo = torch.where(fold, start + s, torch.zeros_like(start))
        hi = torch.where(fold, n - recent, torch.zeros_like(start))
        merged = ops.span_merge(keys, values, lo, hi, counts=counts)
        width = torch.where(fold, keep, real)
        C = int(width.max()) if width.numel() else 0
        j = torch.arange(C, device=device)[None, None, :]
        idx = torch.where(fold[..., None] & (j >= s[..., None]), n - keep[..., None] + j, start[..., None] + j)
        idx = torch.where(j < width[..., None], idx, torch.full_like(idx, -1))
        pick = idx.clamp_min(0)
        take = lambda t: t.gather(2, pick[..., None].expand(-1, -1, -1, t.shape[3]))  # noqa: E731
        out_k, out_v = take(keys), take(values)
        c = torch.ones((B, H, n), device=device) if counts is None else counts.float()
        out_c = c.gather(2, pick)
        comp = fold[..., None] & (j == s[..., None])
        out_k = torch.where(comp[..., None], merged.keys[:, :, None, :], out_k)
        out_v = torch.where(comp[..., None], merged.values[:, :, None, :], out_v)
        out_c = torch.where(comp, merged.counts[:, :, None], out_c)
        pad = idx < 0
        out_k = out_k.masked_fill(pad[..., None], 0)
        out_v = out_v.masked_fill(pad[..., None], 0)
        out_c = out_c.masked_fill(pad, 0)
        nan = torch.full((B, H), float("nan"), device=device)
        return idx, ops.EvictMergeResult(out_k, out_v, out_c, out_c.clone(), nan, None)

    def compact(self, view: LayerView, keep: int):
        """Prefill: retrieval heads keep every real slot; any other head
        holding more than ``keep`` real slots keeps its sinks, the
        compensation slot and the most recent ``keep - sinks - 1`` slots.
        Returns ``(centers [B, H, C], EvictMergeResult, carried NaN [B, H, C])``."""
        B, H = (int(x) for x in view.keys.shape[:2])
        whole = self._layer_heads(view.layer_idx, H).to(view.keys.device)[None, :].expand(B, H)
        start = view.kv_start[:, None].expand(B, H).to(torch.int64)
        k = torch.full((B, H), int(keep), dtype=torch.int64, device=view.keys.device)
        centers, merged = self._fold(view.keys, view.values, None, start, k, whole)
        return centers, merged, torch.full(centers.shape, float("nan"), device=centers.device)

    def recompact(self, queries, keys, values, counts, carried, start, budgets, scaling):
        """Decode-time re-merge, one row per head (``keys``/``values``
        ``[N, 1, M, D]`` left-padded by ``start [N]``, ``counts [N, M]``,
        ``budgets [N, 1]``): a row over its budget keeps its first ``sinks``
        real slots, one compensation slot (the count-weighted mean of every
        slot between the sinks and the most recent ``budget - sinks - 1``,
        a compensation slot among them with its count) and those recent
        slots; other rows are kept as they are. Retrieval heads are not
        special here (there is no layer index): each head keeps its share of
        its row's target (see the class docstring). Queries and carried
        scores are not used. Returns ``(centers [N, 1, C], EvictMergeResult,
        carried NaN [N, 1, C])``."""
        N = int(keys.shape[0])
        st = start.to(torch.int64)[:, None]
        whole = torch.zeros((N, 1), dtype=torch.bool, device=keys.device)
        centers, merged = self._fold(keys, values, counts[:, None], st, budgets.to(torch.int64), whole)
        return centers, merged, torch.full(centers.shape, float("nan"), device=centers.device)

    def describe(self) -> str:
        text = super().describe()
        return text.replace(f"profile={self.profile}", "profile") if self.profile is not None else text

    def __repr__(self) -> str:
        return self.describe()
