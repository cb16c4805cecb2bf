"""ActQKV: an activation-aware probe query built from the window scores the cache."""

from __future__ import annotations

from dataclasses import dataclass

from .. import ops
from .base import LayerView, Method
from .window import QueryWindow


@dataclass
class ActQKV(QueryWindow, Method):
    """ActQKV (Xiao et al., arXiv 2502.13542): fold the latest queries into
    one probe query per head, weighted by how strongly each one is
    activated, and keep the keys that probe attends to.

    **Paper.** A sliding window of queries is monitored with a token-level
    indicator, the *Activation Bias*: how far a token's query activation
    deviates from the window's statistics. Tokens with a large bias are the
    window's anchor tokens; the probe query is built from the window with
    those tokens emphasised and retrieves the relevant key-value pairs by
    inner product. At decoding, a *dynamic KV cut-off* sets how many pairs
    each layer recalls from the information density (entropy) of the
    retrieval scores. The authors' code builds on InfLLM (block retrieval
    with the initial and local tokens always kept).

    **Our reading, and every choice made.**

    * **Activation bias** (:func:`kvcompress.ops.actqkv_scores`, C and CUDA):
      per query head, over the real window queries ``q_i``: per channel mean
      ``mu_d`` and population variance ``var_d``; ``bias_i = mean_d (q_i,d -
      mu_d)^2 / (var_d + eps)``, ``eps = mean_d(var_d) / 100`` (the
      regulariser the authors' code adds to the variance in its deviation
      measure, so a nearly constant channel does not blow a rounding-level
      deviation up). We could not read the paper's equation itself; this is
      our reading of "deviation of a token's activation from the window".
    * **Probe query**: ``probe = sum_i w_i q_i`` with ``w_i = bias_i /
      sum(bias)`` (the window mean when every bias is 0, e.g. a window of
      one query). Weights proportional to the bias (rather than a softmax
      over it) make the anchor tokens dominate without a temperature to
      tune. The probe is one vector per query head (the cache keeps
      per-head keys, so retrieval is per head, not over the concatenated
      heads the authors' block index uses).
    * **Scores**: ``softmax_j(scaling * probe . k_j)`` over the row's real
      keys, averaged over the query heads of each kv head (GQA). The
      probe stands for the whole window, so it scores every key, the
      window's own included.
    * **Kept set**: the first ``sinks`` real tokens and the last ``window``
      slots (InfLLM's initial and local tokens, which the authors keep
      outside retrieval), plus the top probe scores; token granularity, not
      InfLLM's blocks (this library keeps tokens).
    * **Budget**: uniform (``budget`` or ``ratio`` as for every method).
      Not built: the dynamic cut-off. In the authors' code it shrinks the
      number of blocks a layer retrieves from offloaded memory per step
      (``k_min + (k_max - k_min) * f(entropy)``); it saves transfer and
      attention work, not cache memory, so in a cache that evicts it would
      only keep fewer tokens than the budget allows.
    * **Decoding**: with ``interval > 0`` a layer ``interval`` slots over
      its target is re-scored with the queries it holds (the latest
      ``min(window, interval)``), as SnapKV does.
    * **Padding**: padded window queries get weight 0 and padded keys score
      0, so a left-padded row scores as it would alone.

    Parameters
    ----------
    budget, ratio
        Exactly one: kept slots per kv head, or fraction of the tokens removed.
    window : int >= 1
        Queries folded into the probe, and recent slots always kept
        (SnapKV's tuned window here; the paper's window is InfLLM's local
        window, thousands of tokens). 8, 32 and 64 were within noise of 16
        on 16 development passages (two licence texts, both models, budget
        128; benchmarks/RESULTS.md, "The other open choices on two development texts").
    sinks : int >= 0
        Leading real tokens always kept (InfLLM's initial tokens).
    kernel : odd int >= 1
        Max-pool the probe scores of the slots before the window over
        ``kernel`` neighbours before the top-k (SnapKV's pooling); 1: the
        paper's token scores. Not in the paper: token scores keep a
        number's most attended digits and drop the rest. Default 13, chosen
        on development data (benchmarks/RESULTS.md, "ActQKV's pooling"): on
        the RULER-style suite's development seeds (SmolLM2, 1,000 tokens, 10
        cases) single needle + multi-key went from 0.40 to 0.65 at ratio
        0.75 (kernel 7: 0.55) and from 0.20 to 0.35 at 0.9; KL@16 on a
        development licence text (Apache-2.0, budget 128, both models, 8
        passages) moved by -0.046 (-0.270..+0.162), within noise.
    """

    window: int = 16
    sinks: int = 4
    kernel: int = 13

    def _check_fields(self) -> None:
        self._check_int("window", self.window, 1)
        self._check_int("sinks", self.sinks, 0)
        self._check_kernel()

    def min_budget(self) -> int:
        return self.sinks + self.window

    def _forced_text(self) -> str:
        return f"sinks={self.sinks} plus the window, window={self.window}"

    def score(self, view: LayerView):
        """``[B, Hkv, n]`` float32 probe attention of every slot."""
        w = self._window(view)
        scores = ops.actqkv_scores(view.queries[:, :, -w:], view.keys, scaling=view.scaling,
                                   kv_start=view.kv_start)
        return self._pool_before_window(scores, view, w)

    def forced(self, view: LayerView, keep: int) -> tuple[int, int]:
        w = min(self._window(view), keep)
        return min(self.sinks, keep - w), w
