"""Keyformer: accumulated Gumbel-noised, tempered attention plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass

from .. import ops
from .base import LayerView, Method


@dataclass
class Keyformer(Method):
    """Keyformer (Adnan et al., MLSys 2024, arXiv 2403.09054): key tokens by a
    noisy, tempered score accumulated over steps, plus a recent window.

    **The paper.** The cache keeps ``w`` recent tokens and ``k - w`` "key
    tokens". A token's score is the softmax of the attention logits with
    Gumbel noise added and a temperature, ``f(x_j) = exp((x_j + g_j) / tau)
    / sum_m exp((x_m + g_m) / tau)``, ``g ~ Gumbel(0, 1)``, which the paper
    calls logit regularisation: it makes up for the probability mass of the
    evicted tokens and keeps the choice from locking onto early winners.
    ``tau`` rises linearly from ``tau_init`` to ``tau_end`` over the
    generated tokens (``tau_t = tau_init + t (tau_end - tau_init) / T``,
    ``T`` the generation length). Scores accumulate over the prompt and every
    generation step (per layer, like H2O's accumulated attention); after the
    prompt and at each step the cache keeps the ``w`` most recent tokens and
    the ``k - w`` others with the highest accumulated score.

    **Our reading.** Slot ``j``'s score is ``acc_j = sum over every query
    that has seen it of (1 / g) sum_{h of its kv head} softmax_j((s q_h . k_j
    + noise * G) / tau)``, computed by :func:`kvcompress.ops.keyformer_scores`
    and carried across re-compressions like H2O's ``acc`` (state column
    ``acc``). Each kv head keeps ``min(window, keep)`` recent slots and its
    highest-scoring others; during decoding the layer is re-compressed every
    ``interval`` steps (the shared decode policy).

    Choices:

    * **Temperature.** Prefill chunks (more than one token) score at
      ``tau_init``: the paper's schedule runs over generated tokens. Decode
      step ``t`` (``t = 1`` for the first generated token's query, counted
      per layer since the last prefill chunk, ``LayerView.steps``) scores at
      ``tau_init + (tau_end - tau_init) * min(t, tau_steps) / tau_steps``:
      our generation length ``T`` is the option ``tau_steps`` (the method
      does not know ``max_new_tokens``), after which ``tau`` stays at
      ``tau_end``.
    * **Noise, deterministic.** ``G`` is a standard Gumbel sample drawn from
      a counter-based hash of ``(seed, layer, query head, key slot - kv_start,
      query slot - kv_start, step)`` in C (``csrc/keyformer_math.h``; step
      ``0`` for prefill, ``t`` while decoding), not from torch's RNG: runs
      repeat exactly, on CPU and CUDA, with any thread count, and a batch row
      draws what it would alone (offsets count from the row's first real
      slot). Slots are positions in the layer's buffer, so after an eviction
      the same key may draw from another counter: the noise is fresh at
      every step anyway, as in the paper.
    * **GQA.** The query heads of a kv head each get their own noise and
      softmax; their scores are averaged (as H2O's accumulated attention).
    * **Reductions.** ``noise=0`` scores the tempered attention ``softmax(s
      q.k / tau)``; with ``noise=0``, ``tau_init = tau_end = 1`` the method
      is H2O's accumulated attention (up to float32 rounding) with a fixed recent window of
      ``window`` slots (H2O here splits its budget by the ``recent``
      fraction instead).
    * **Padding.** Keys before ``kv_start`` score 0 and take no part in any
      softmax; padded queries add nothing.

    Parameters
    ----------
    budget, ratio
        Exactly one: kept slots per kv head, or fraction of the tokens removed.
    window : int >= 0
        Recent slots always kept (the paper's ``w``). Default 32: 16 and 64
        were within noise of it on 16 development passages
        (benchmarks/RESULTS.md, "The other open choices on two development texts").
    tau_init, tau_end : float > 0
        Temperature of the prompt and the first generated token, and the one
        reached after ``tau_steps`` generated tokens (paper: 1 and 2).
    tau_steps : int >= 1
        Generated tokens over which the temperature rises.
    noise : float >= 0
        Scale of the Gumbel noise (1: the paper's standard Gumbel; 0: none).
    seed : int >= 0
        Seed of the noise's hash.
    """

    window: int = 32
    tau_init: float = 1.0
    tau_end: float = 2.0
    tau_steps: int = 128
    noise: float = 1.0
    seed: int = 0

    slot_state = ("acc",)

    def _check_fields(self) -> None:
        self._check_int("window", self.window, 0)
        self._check_int("tau_steps", self.tau_steps, 1)
        self._check_int("seed", self.seed, 0)
        if self.seed >= 2**63:
            raise ValueError(f"seed: must be < 2**63, got {self.seed}")
        for name in ("tau_init", "tau_end"):
            self._check_float(name, getattr(self, name), above=0.0)
        self._check_float("noise", self.noise, at_least=0.0)

    def min_budget(self) -> int:
        return max(1, self.window)

    def _forced_text(self) -> str:
        return f"the recent window, window={self.window}"

    def temperature(self, step: int) -> float:
        """Temperature of decode step ``step`` (0: a prefill chunk)."""
        t0, t1 = float(self.tau_init), float(self.tau_end)
        if step <= 0:
            return t0
        return t0 + (t1 - t0) * min(step, self.tau_steps) / self.tau_steps

    def observe(self, view: LayerView) -> None:
        step = view.steps if view.phase == "decode" else 0
        inc = ops.keyformer_scores(
            view.queries, view.keys, tau=self.temperature(step), noise=float(self.noise), seed=self.seed,
            layer=view.layer_idx, step=step, scaling=view.scaling, kv_start=view.kv_start,
        )
        view.state["acc"].add_(inc)

    def score(self, view: LayerView):
        return view.state["acc"]

    def forced(self, view: LayerView, keep: int) -> tuple[int, int]:
        return 0, min(self.window, keep)
