"""The contract every compression method follows.

A method is a small dataclass. The cache calls it once per layer after the
layer's attention has run on a multi-token chunk (prefill), and, for methods
with a decode policy, again whenever a layer outgrows its budget by
``interval`` tokens during decoding. The method only *scores* and *chooses*;
the cache does the storage (gather into compact tensors) and the C ops do the
arithmetic.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from .. import ops


@dataclass
class LayerView:
    """What a method sees of one layer when it is asked to compress it.

    Attributes
    ----------
    layer_idx, num_layers : int
        Position of the layer in the model.
    queries : torch.Tensor
        ``[B, Hq, q, D]`` post-RoPE queries of the chunk that just ran. They sit
        at the *last* ``q`` slots of ``keys``.
    keys, values : torch.Tensor
        ``[B, Hkv, n, D]`` every slot the layer holds now (old slots first,
        then the chunk).
    kv_start : torch.Tensor
        ``[B]`` int64, number of leading padded (invalid) slots of each row.
    scaling : float
        Softmax scale of the attention, usually ``D ** -0.5``.
    state : dict
        Per-slot method state (``name -> [B, Hkv, n]`` float32), kept aligned
        with the slots by the cache (gathered on eviction, zero-extended on
        append). Methods read and write it in place.
    phase : str
        ``"prefill"`` (a chunk of more than one token) or ``"decode"``.
    """

    layer_idx: int
    num_layers: int
    queries: Any
    keys: Any
    values: Any
    kv_start: Any
    scaling: float
    state: dict
    phase: str

    @property
    def length(self) -> int:
        return int(self.keys.shape[2])


@dataclass
class Method:
    """Base class of compression methods.

    Exactly one of ``budget`` (kept slots per kv head, sinks and windows
    included) or ``ratio`` (fraction of the prompt removed, ``0 <= ratio < 1``)
    must be given.
    """

    budget: int | None = None
    ratio: float | None = None

    #: ``True`` when ``score`` needs the chunk's queries
    needs_queries: ClassVar[bool] = True
    #: ``True`` when the method keeps layers within budget during decoding
    decode_policy: ClassVar[bool] = False
    #: names of per-slot state tensors the method keeps
    slot_state: ClassVar[tuple[str, ...]] = ()
    #: ``True`` when heads keep different numbers of slots (per-head storage)
    headwise: ClassVar[bool] = False
    #: ``True`` when the method merges evicted tokens (``compact`` instead of ``select``)
    merges: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if (self.budget is None) == (self.ratio is None):
            raise ValueError(
                f"{type(self).__name__}: give exactly one of budget= (kept slots per kv head) "
                f"or ratio= (fraction of the prompt removed); got budget={self.budget!r}, "
                f"ratio={self.ratio!r}"
            )
        if self.budget is not None:
            if isinstance(self.budget, bool) or not isinstance(self.budget, int):
                raise TypeError(f"budget: expected an int, got {type(self.budget).__name__}")
            if self.budget <= 0:
                raise ValueError(f"budget: must be >= 1, got {self.budget}")
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
                raise TypeError(f"ratio: expected a float, got {type(self.ratio).__name__}")
            if not (0.0 <= float(self.ratio) < 1.0) or math.isnan(self.ratio):
                raise ValueError(f"ratio: must satisfy 0 <= ratio < 1, got {self.ratio}")
        self._check_fields()

    # ----------------------------------------------------------------- hooks
    def _check_fields(self) -> None:
        """Validate method-specific fields (override)."""

    @staticmethod
    def _check_int(name: str, value: Any, minimum: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
        if value < minimum:
            raise ValueError(f"{name}: must be >= {minimum}, got {value}")

    def layer_budget(self, layer_idx: int, num_layers: int, mean_budget: float) -> float:
        """Budget of one layer given the mean budget; uniform by default."""
        return mean_budget

    def target_length(self, n_before: int, n_chunk: int, layer_idx: int, num_layers: int) -> int:
        """Slots a layer keeps after a prefill chunk of ``n_chunk`` tokens.

        ``n_before`` slots were held before the chunk. With ``ratio`` the
        chunk itself is compressed by the ratio and the old slots are kept (in
        count, not necessarily identity).
        """
        if self.budget is not None:
            mean = float(self.budget)
        else:
            mean = n_before + int(n_chunk * (1.0 - float(self.ratio)))
        if mean >= n_before + n_chunk:
            # Everything fits in the mean budget: no layer is compressed, even
            # where a per-layer schedule (PyramidKV) would give it fewer slots.
            return n_before + n_chunk
        target = int(round(self.layer_budget(layer_idx, num_layers, mean)))
        return max(1, target)

    def init_state(self, view: LayerView) -> None:
        """Update per-slot state after a chunk was appended (override)."""

    def score(self, view: LayerView):
        """Return ``[B, Hkv, n]`` float32 scores; higher means keep."""
        raise NotImplementedError

    def forced(self, view: LayerView, keep: int) -> tuple[int, int]:
        """(sinks, window): first valid and last slots always kept."""
        return 0, 0

    def select(self, view: LayerView, keep: int):
        """Return kept slot indices ``[B, Hkv, keep]`` int64, ascending."""
        scores = self.score(view)
        sinks, window = self.forced(view, keep)
        return ops.select_topk(scores, keep, sinks=sinks, window=window, kv_start=view.kv_start)

    def compact(self, view: LayerView, keep: int):
        """Merging methods: return ``(centers [B, Hkv, C] int64 (-1 padded),
        ops.EvictMergeResult, carried [B, Hkv, C] float32 or None)`` for a
        layer keeping ``keep`` slots per head; ``carried`` is the score each
        kept slot takes to a decode-time re-compression."""
        raise NotImplementedError

    # ----------------------------------------------------------------- misc
    def describe(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None:
                parts.append(f"{f.name}={v}")
        return f"{type(self).__name__}({', '.join(parts)})"


@dataclass
class DecodeMethod(Method):
    """A method that also keeps each layer within budget while decoding.

    When a layer holds more than ``budget + interval`` slots after a decode
    step, it is re-compressed to ``budget`` with the scores carried forward.
    A gather every ``interval`` steps instead of every step amortises the copy.
    """

    interval: int = 16
    decode_policy: ClassVar[bool] = True

    def _check_fields(self) -> None:
        super()._check_fields()
        self._check_int("interval", self.interval, 1)


__all__ = ["LayerView", "Method", "DecodeMethod"]
