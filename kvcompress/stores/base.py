"""The store protocol: what holds one layer's slots and attends over them.

A cache layer (``kvcompress.cache.CompressedLayer``) keeps its slots in one
store and swaps the store when a method changes the layout (a head-wise
method turns a uniform layer into a ragged one). The attention function only
routes to the layer, the layer to its store: nothing outside a store reads
its buffers. See ``docs/design.md`` for how to add a store.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AttentionSpec:
    """Everything a model's attention call asks for besides q, k and v.

    Attributes
    ----------
    scaling : float
        Logit scale.
    softcap : float or None
        Logit soft-capping ``c * tanh(logit / c)`` (Gemma 2).
    sinks : torch.Tensor or None
        ``[Hq]`` learned sink logits that join each softmax without a value
        (gpt-oss ``s_aux``).
    window : int or None
        Sliding window: a key at distance ``>= window`` from the query is
        invisible.
    dropout : float
        Attention dropout (training only).
    count_bias : bool
        Add ``log(count)`` of merged slots to their logits.
    """

    scaling: float
    softcap: float | None = None
    sinks: Any = None
    window: int | None = None
    dropout: float = 0.0
    count_bias: bool = False

    @property
    def plain(self) -> bool:
        """True when the C kernel computes this attention exactly."""
        return self.softcap is None and self.sinks is None and not self.dropout


class LayerStore(ABC):
    """One layer's slots, in some layout.

    Every store holds, per (batch row, kv head), a sequence of slots with a
    key, a value and named per-slot columns (``positions``: int32 token index;
    merging methods add ``counts`` and ``scores``; methods with state add their
    own float32 columns). Slots keep token order within a head.
    """

    #: short name shown in ``repr`` and ``stats()``
    kind: str = "store"
    #: batch rows and kv heads (attributes or properties of each store)
    batch: int
    heads: int

    @abstractmethod
    def append(self, keys, values, first_position: int) -> None:
        """Append a chunk ``[B, H, q, D]`` at token positions ``first_position ..``."""

    @abstractmethod
    def attend(self, query, spec: AttentionSpec, kv_start=None, query_pos=None):
        """Attention of ``query`` ``[B, Hq, q, D]`` (the last ``q`` slots) over
        the held slots; returns ``[B, q, Hq, D]``."""

    @abstractmethod
    def head_lengths(self) -> list[int]:
        """Live slots of each (row, head), row-major, read on the host without
        synchronising a device."""

    @abstractmethod
    def tensors(self) -> list:
        """Every tensor the store holds (for byte accounting)."""

    @abstractmethod
    def index_batch(self, idx) -> None:
        """Reorder / repeat batch rows (beam search)."""

    def read_counts(self) -> tuple[int, int] | None:
        """``(slots read, real slots held)`` summed over the decode steps
        that sampled (MagicPIG's ``LSHStore``); None for stores whose reads
        are fixed by their budget or that read every slot."""
        return None

    @property
    def capacity(self) -> int:
        """Allocated slots of the largest head."""
        return max(self.head_lengths(), default=0)
