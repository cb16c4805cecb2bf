"""LagKV: an attention-free method scored by lag-relative spread of keys and values."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from .base import LayerView, Method

#: Above every chunk score (raw scores lie in (0, 2], per-chunk priorities
#: are <= 0), so tail slots outrank scored ones; plus the slot index, so the
#: newest tail slots outrank older ones when the budget cannot hold the tail.
_TAIL_BASE = 4.0


@dataclass
class LagKV(Method):
    """LagKV (Liang et al., arXiv 2504.04704): keep the tokens whose keys and
    values stand out against the chunk that follows them.

    **Paper.** After ``S`` attention sinks the cache is cut into partitions
    of ``L`` tokens (the lag); the remainder joins the sliding window.
    Partition ``p`` is judged against partition ``p + 1``: every channel of
    its keys is min-max normalised with the per-channel min and max of the
    next partition's keys, ``K̄ = (K - min) / (max - min)``, and the same for
    values. A token scores ``softmax(std(K̄)) + softmax(std(V̄))``, the
    standard deviation taken over channels and the softmax over the tokens
    of the partition. Each partition keeps its top share of tokens; the last
    whole partition (it has no reference yet) and the remainder are kept
    whole, and so are the sinks. The method never looks at attention.

    **Our reading, and every choice made.**

    * The scores are :func:`kvcompress.ops.lagkv_scores` (C, float32
      accumulation), with ``std`` the sample standard deviation (``D - 1``
      in the denominator, as ``torch.std`` in the authors' code and in
      kvpress). A channel whose reference is constant normalises to 0 (the
      paper's formula divides by zero there; both reference implementations
      produce NaN).
    * **Budget.** Kept slots per kv head = ``budget`` (or ``int(seen * (1 -
      ratio))``), as for every method here: sinks and the tail (last whole
      chunk plus the partial one) are taken first, and what is left is
      spread over the scored chunks. With ``per_chunk=True`` (default, the
      paper's per-partition top-k) every chunk keeps its own top ``q`` or
      ``q + 1`` tokens, ``q = left // chunks``, the newer chunks taking the
      ``+1``; with ``per_chunk=False`` the layer keeps the global top tokens
      by raw score (each chunk's softmax sums to 2, so chunks stay
      comparable; kvpress calls this ``cross_scoring``).
    * When the budget cannot hold the sinks and the tail, the row keeps the
      sinks and its newest slots (StreamingLLM); so does a prompt shorter
      than ``sinks + 2 * lag``, which has no scored chunk. The smallest
      ``budget`` accepted is ``sinks + 1``.
    * **GQA.** The scores use only the keys and values of each kv head, so
      there is nothing to reduce over a query group.
    * **Padding.** Chunks start after each row's padding (``kv_start``) and
      its sinks, so a left-padded row is chunked exactly as it would be
      alone.
    * **Decoding.** With ``interval > 0`` a layer that grows ``interval``
      slots past its target is scored again over the slots it holds, in
      slot order: after an eviction the chunks are made of the surviving
      slots, not of contiguous positions. The paper instead compresses each
      partition once, when its reference has arrived, and lets the cache
      grow by ``ratio * L`` tokens per ``L``; we keep the budget fixed while
      decoding, as every method here does. ``interval=0`` turns it off.

    Parameters
    ----------
    budget, ratio
        Exactly one: kept slots per kv head, or fraction of the tokens removed.
    sinks : int >= 0
        Leading tokens always kept (the paper's ``S``; kvpress's default 4).
    lag : int >= 2
        Chunk length ``L`` (kvpress's default 128; the authors' code uses
        128 to 1024).
    per_chunk : bool
        Spread the budget evenly over the chunks (True, the paper) or take a
        global top-k by raw score (False).
    """

    sinks: int = 4
    lag: int = 128
    per_chunk: bool = True

    needs_queries = False

    def _check_fields(self) -> None:
        self._check_int("sinks", self.sinks, 0)
        self._check_int("lag", self.lag, 2)
        if not isinstance(self.per_chunk, bool):
            raise TypeError(f"per_chunk: expected a bool, got {type(self.per_chunk).__name__}")

    def min_budget(self) -> int:
        return self.sinks + 1

    def _forced_text(self) -> str:
        return f"sinks={self.sinks} plus at least one recent token"

    def score(self, view: LayerView):
        """``[B, Hkv, n]`` float32: sinks ``+inf``, tail ``4 + slot``, scored
        slots their raw score or per-chunk priority, padding ``-inf``."""
        scores = ops.lagkv_scores(view.keys, view.values, lag=self.lag, sinks=self.sinks,
                                  kv_start=view.kv_start, per_chunk=self.per_chunk)
        n = view.length
        pos = torch.arange(n, device=scores.device)
        start = view.kv_start.to(scores.device) if view.kv_start is not None else torch.zeros(
            scores.shape[0], dtype=torch.int64, device=scores.device)
        first = (start + self.sinks).clamp_max(n)  # first slot after each row's sinks
        tail = torch.isposinf(scores) & (pos >= first[:, None])[:, None, :]
        ramp = (pos.to(torch.float32) + _TAIL_BASE).expand_as(scores)
        return torch.where(tail, ramp, scores)

    def forced(self, view: LayerView, keep: int) -> tuple[int, int]:
        return min(self.sinks, keep), 0
