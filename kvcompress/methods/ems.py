"""EMS: evict-then-merge with global-local importance (our reading of arXiv 2412.08521)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import ops
from .base import LayerView, Method

_HEAD_BUDGETS = ("uniform", "adaptive")
_GLOBAL_MODES = ("exact", "probe")


@dataclass
class EMS(Method):
    """EMS: keep the most important tokens per head, merge the similar rest into them.

    Per layer, after the prefill's attention (queries ``[B, Hq, T, D]``):

    1. Global score ``G_j``: mean causal attention token j receives from the
       queries after it (``ops.global_scores``; ``global_mode="probe"`` uses the
       last ``probe/2`` of the queries plus a strided sample of ``probe/2``).
       The mean (not the sum) removes the bias towards early tokens.
    2. Local score ``L_j``: mean attention from the last ``window`` queries.
    3. ``S = lam * G / sum(G) + (1 - lam) * L / sum(L)``, the sums over the
       tokens that are neither sinks nor in the window.
    4. Per head keep the first ``sinks`` tokens, the last ``window`` and the
       top tokens by S: these are the class centers. Budgets are ``budget``
       per head (``head_budget="uniform"``) or shared across the layer's
       heads as in AdaKV (``"adaptive"``, floor ``alpha`` of the uniform share).
    5. Every other token goes to the center whose key is most cosine-similar,
       or to class 0 (evicted) when that similarity is below the head's
       threshold ``tau`` (``None``: the head's mean best similarity;
       ``float("inf")``: evict only). Values merge weighted by S, keys merge
       by direction and keep the center's norm (``ops.evict_merge``).
    6. With ``merge_bias`` a slot standing for c tokens adds ``log(c)`` to
       its attention logit, so a merged slot weighs like the tokens it replaced.
    With ``kernel > 1`` the centers are chosen on S max-pooled over
    ``kernel`` neighbouring tokens (as SnapKV), so a multi-token span such
    as a number survives whole; merge weights stay each token's own S.

    Defaults come from the ablations in benchmarks/RESULTS.md (default model,
    budgets 64/128/256): ``lam=1`` (global only) beat 0.5, 0.75, 0.9 and 0
    on KL and passkey; adaptive heads beat uniform; merging with the
    log-count bias beat evicting (tau=inf) and merging without the bias; the
    exact global score beat the probe; ``kernel=7`` pooling wins passkey at
    large budgets but loses KL, so it is off.

    A compressed layer is stored per head (``[Σ n_h, D]`` plus counts), read
    by the C attention kernel.

    7. Decoding: every ``interval`` generated tokens (0: never) each head is
       brought back to the slots the prefill gave it. There is no global score
       for tokens scored without the whole prefill's queries, so the score of
       a held slot is ``lam * C / sum(C) + (1 - lam) * L / sum(L)`` with ``C``
       the score it was kept with (carried forward; a token appended since
       carries its own ``L``) and ``L`` the mean attention it received from
       the last ``min(window, interval)`` queries (the layer holds those
       queries: ``[B, Hq, min(window, interval), D]``). The same
       select-then-evict/merge runs on the held slots; values merge weighted
       by score times count, and counts add up, so a slot always knows how
       many tokens it stands for.
    """

    window: int = 32
    sinks: int = 4
    lam: float = 1.0
    tau: float | None = None
    head_budget: str = "adaptive"
    alpha: float = 0.2
    merge_bias: bool = True
    global_mode: str = "exact"
    probe: float = 0.1
    gqa: str = "mean"
    interval: int = 16
    kernel: int = 1

    headwise = True
    merges = True

    def _check_fields(self) -> None:
        self._check_int("window", self.window, 1)
        self._check_int("sinks", self.sinks, 0)
        self._check_int("interval", self.interval, 0)
        self._check_int("kernel", self.kernel, 1)
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel: must be odd, got {self.kernel}")
        for name, lo, hi in (("lam", 0.0, 1.0), ("alpha", 0.0, 1.0), ("probe", 0.0, 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
            if not lo <= float(v) <= hi:
                raise ValueError(f"{name}: must be in [{lo}, {hi}], got {v}")
        if self.probe == 0:
            raise ValueError("probe: must be > 0")
        if self.tau is not None:
            if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or math.isnan(self.tau):
                raise ValueError(f"tau: expected None (adaptive) or a number, got {self.tau!r}")
        if self.head_budget not in _HEAD_BUDGETS:
            raise ValueError(f"head_budget: expected one of {_HEAD_BUDGETS}, got {self.head_budget!r}")
        if self.global_mode not in _GLOBAL_MODES:
            raise ValueError(f"global_mode: expected one of {_GLOBAL_MODES}, got {self.global_mode!r}")
        if self.gqa not in ("mean", "max"):
            raise ValueError(f"gqa: expected 'mean' or 'max', got {self.gqa!r}")
        if not isinstance(self.merge_bias, bool):
            raise TypeError(f"merge_bias: expected a bool, got {type(self.merge_bias).__name__}")

    def min_budget(self) -> int:
        return self.sinks + self.window

    def _forced_text(self) -> str:
        return f"sinks={self.sinks} + window={self.window}"

    @property
    def count_bias(self) -> bool:
        return self.merge_bias

    def forced(self, view: LayerView, keep: int) -> tuple[int, int]:
        w = min(self.window, int(view.queries.shape[2]), view.length, keep)
        return min(self.sinks, keep - w), w

    def score(self, view: LayerView):
        """``[B, Hkv, T]`` float32 combined score S (sinks and window included, unnormalised there)."""
        T = view.length
        q = view.queries
        if q.shape[2] != T:
            raise ValueError(f"queries: EMS scores a whole prefill (got {q.shape[2]} queries for {T} slots)")
        G = ops.global_scores(q, view.keys, scaling=view.scaling, gqa=self.gqa, kv_start=view.kv_start,
                              probe=float(self.probe) if self.global_mode == "probe" else None)
        w = min(self.window, T)
        L = ops.window_scores(q[:, :, -w:], view.keys, scaling=view.scaling, gqa=self.gqa, kv_start=view.kv_start)
        return self._combine(G, L, self._candidates(view.kv_start, T, self.sinks, w))

    def _combine(self, G, L, cand):
        """``lam * G / sum(G) + (1 - lam) * L / sum(L)``, the sums over ``cand``."""
        lam = float(self.lam)
        G = G / (G * cand).sum(-1, keepdim=True).clamp_min(1e-30)
        L = L / (L * cand).sum(-1, keepdim=True).clamp_min(1e-30)
        return lam * G + (1.0 - lam) * L

    @staticmethod
    def _candidates(start, T: int, sinks: int, w: int):
        """``[R, 1, T]`` True for valid slots (at or after ``start`` ``[R]``)
        that are neither among the first ``sinks`` nor the last ``w``."""
        j = torch.arange(T, device=start.device)
        return ((j >= start[:, None] + sinks) & (j < T - w))[:, None]

    def held_queries(self) -> int:
        """Latest queries a layer keeps for decode-time re-compression."""
        return min(self.window, self.interval)

    def compact(self, view: LayerView, keep: int):
        sinks, w = self.forced(view, keep)
        scores = self.score(view)
        ranked = scores  # selection score: S max-pooled over neighbouring tokens when kernel > 1
        head = view.length - w
        if self.kernel > 1 and head > 0:
            ranked = scores.clone()
            ranked[..., :head] = ops.pool1d(scores[..., :head], self.kernel, mode="max")
        valid = (view.length - view.kv_start).clamp_min(1)  # real tokens per row
        if self.head_budget == "adaptive":
            forced = ranked.clone()
            forced[..., head:] = float("inf")
            k = ops.head_budgets(forced, keep, alpha=float(self.alpha), floor=sinks + w, kv_start=view.kv_start)
        else:
            k = torch.full(scores.shape[:2], keep, dtype=torch.int64, device=scores.device)
        k = torch.minimum(k, valid[:, None])  # a padded slot is never a center
        centers = ops.select_topk(ranked, k, sinks=sinks, window=w, kv_start=view.kv_start)
        # merge weights are each token's own S, not the pooled one
        merged = ops.evict_merge(view.keys, view.values, scores, centers, self._tau(), kv_start=view.kv_start)
        return centers, merged, ranked.gather(2, centers.clamp_min(0))

    def _tau(self):
        return None if self.tau is None else float(self.tau)

    def recompact(self, queries, keys, values, counts, carried, start, budgets, scaling):
        """Decode-time re-compression of held slots (step 7), one row per head.

        Shapes: ``queries [N, G, q, D]`` (the latest queries of the row's
        ``G`` query heads, sitting at its last ``q`` slots), ``keys``/``values``
        ``[N, 1, M, D]`` left-padded by ``start [N]``, ``counts``/``carried``
        ``[N, M]`` float32 (carried NaN: not scored yet), ``budgets [N, 1]``
        int64. Returns ``(centers [N, 1, C], EvictMergeResult whose counts
        are tokens represented, carried scores [N, 1, C])``.
        """
        M = int(keys.shape[2])
        L = ops.window_scores(queries, keys, scaling=scaling, gqa=self.gqa, kv_start=start)
        w = max(1, min(self.window, int(budgets.min())))
        sinks = min(self.sinks, max(0, int(budgets.min()) - w))
        C = torch.where(torch.isnan(carried[:, None]), L, carried[:, None])
        S = self._combine(C, L, self._candidates(start, M, sinks, w))
        centers = ops.select_topk(S, budgets, sinks=sinks, window=w, kv_start=start)
        merged = ops.evict_merge(keys, values, S * counts[:, None], centers, self._tau(), kv_start=start,
                                 return_assign=True)
        # a merged slot stands for every token its members stood for
        members = merged.assign > 0
        slot = (merged.assign - 1).clamp_min(0)
        total = torch.zeros_like(merged.counts).scatter_add_(2, slot, counts[:, None] * members)
        return centers, merged._replace(counts=total), S.gather(2, centers.clamp_min(0))
