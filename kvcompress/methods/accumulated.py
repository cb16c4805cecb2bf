"""Methods scored by attention accumulated over queries: H2O, TOVA, VATP."""

from __future__ import annotations

from dataclasses import dataclass

from .. import ops
from .base import LayerView, Method


def accumulate_attention(view: LayerView, name: str = "acc") -> None:
    """Add the chunk's attention column sums to the slot state ``name``.

    ``window_scores`` returns the mean over the chunk's queries; times the
    chunk length that is the sum ``sum_i A[i, j]`` that H2O accumulates.
    """
    q = int(view.queries.shape[2])
    mean = ops.window_scores(view.queries, view.keys, scaling=view.scaling, kv_start=view.kv_start)
    view.state[name].add_(mean, alpha=float(q))


@dataclass
class H2O(Method):
    """Heavy-Hitter Oracle: accumulated attention, split heavy / recent.

    Each slot's score is ``sum_i A[i, j]`` over every query that has seen it,
    prompt and generated tokens alike (carried across re-compressions). A
    layer keeps ``recent`` of its budget as the most recent slots and the rest
    as the highest-scoring older slots; during decoding it is re-compressed
    whenever it exceeds its budget by ``interval`` slots.
    """

    recent: float = 0.5
    slot_state = ("acc",)

    def _check_fields(self) -> None:
        super()._check_fields()
        if isinstance(self.recent, bool) or not isinstance(self.recent, (int, float)):
            raise TypeError(f"recent: expected a fraction in [0, 1], got {self.recent!r}")
        if not (0.0 <= float(self.recent) <= 1.0):
            raise ValueError(f"recent: must be in [0, 1], got {self.recent}")

    def observe(self, view: LayerView) -> None:
        accumulate_attention(view)

    def score(self, view: LayerView):
        return view.state["acc"]

    def forced(self, view: LayerView, keep: int) -> tuple[int, int]:
        return 0, min(keep, int(round(keep * float(self.recent))))


@dataclass
class TOVA(Method):
    """Token Omission Via Attention: keep what the newest query attends to.

    Score of slot j: attention of the newest token's query, averaged over all
    query heads of the layer, so every kv head keeps the same slots. During
    decoding the layer holds the newest query for the re-selection.
    """

    def held_queries(self) -> int:
        return 1

    def deferred_queries(self) -> int:
        return 1

    def score(self, view: LayerView):
        newest = view.queries[:, :, -1:]
        per_head = ops.window_scores(newest, view.keys, scaling=view.scaling, kv_start=view.kv_start)
        return per_head.mean(dim=1, keepdim=True).expand_as(per_head).contiguous()


@dataclass
class VATP(Method):
    """Value-Aware Token Pruning: accumulated attention times ``||v_j||_1``.

    A token that receives attention but carries a small value vector
    contributes little to the output. The first ``sinks`` (20) tokens are
    always kept, as in the paper.
    """

    sinks: int = 20
    slot_state = ("acc",)

    def _check_fields(self) -> None:
        self._check_int("sinks", self.sinks, 0)

    def min_budget(self) -> int:
        return self.sinks + 1

    def _forced_text(self) -> str:
        return f"sinks={self.sinks} plus at least one other token"

    def observe(self, view: LayerView) -> None:
        accumulate_attention(view)

    def score(self, view: LayerView):
        return view.state["acc"] * ops.vector_norm(view.values, ord=1)

    def forced(self, view: LayerView, keep: int) -> tuple[int, int]:
        return min(self.sinks, keep), 0
