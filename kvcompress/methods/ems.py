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

    A compressed layer is stored per head (``[Σ n_h, D]`` plus counts), read
    by the C attention kernel. Compression runs once per layer, at the first
    prefill; generated tokens are appended (no decode-time re-compression yet).
    """

    window: int = 32
    sinks: int = 4
    lam: float = 0.5
    tau: float | None = None
    head_budget: str = "uniform"
    alpha: float = 0.2
    merge_bias: bool = True
    global_mode: str = "exact"
    probe: float = 0.1
    gqa: str = "mean"

    headwise = True
    merges = True

    def _check_fields(self) -> None:
        self._check_int("window", self.window, 1)
        self._check_int("sinks", self.sinks, 0)
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
        cand = self._candidates(view, w)
        lam = float(self.lam)
        G = G / (G * cand).sum(-1, keepdim=True).clamp_min(1e-30)
        L = L / (L * cand).sum(-1, keepdim=True).clamp_min(1e-30)
        return lam * G + (1.0 - lam) * L

    def _candidates(self, view: LayerView, w: int):
        """``[B, 1, T]`` True for valid tokens that are neither sinks nor in the window."""
        T = view.length
        j = torch.arange(T, device=view.keys.device)
        start = view.kv_start[:, None, None]
        return (j >= start + self.sinks) & (j < T - w)

    def compact(self, view: LayerView, keep: int):
        sinks, w = self.forced(view, keep)
        scores = self.score(view)
        valid = (view.length - view.kv_start).clamp_min(1)  # real tokens per row
        if self.head_budget == "adaptive":
            ranked = scores.clone()
            ranked[..., view.length - w:] = float("inf")
            k = ops.head_budgets(ranked, keep, alpha=float(self.alpha), floor=sinks + w, kv_start=view.kv_start)
        else:
            k = torch.full(scores.shape[:2], keep, dtype=torch.int64, device=scores.device)
        k = torch.minimum(k, valid[:, None])  # a padded slot is never a center
        centers = ops.select_topk(scores, k, sinks=sinks, window=w, kv_start=view.kv_start)
        tau = None if self.tau is None else float(self.tau)
        merged = ops.evict_merge(view.keys, view.values, scores, centers, tau, kv_start=view.kv_start)
        return centers, merged
