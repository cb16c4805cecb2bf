"""KVSharer's store: a layer that reads another layer's cache.

A ``SharedStore`` holds nothing of its own: the layer it serves (the
*target*) attends with its own queries over the *source* layer's slots, and
its chunks are not stored (the source stored its own keys and values for
the same tokens). ``tensors()`` are the source's, so the bytes count once
(``KVCache.memory_bytes`` and ``stats`` de-duplicate storages; ``stats``
counts them at the source, which comes first).
"""

from __future__ import annotations

from .base import AttentionSpec, LayerStore


class SharedStore(LayerStore):
    """The target layer's view of ``source`` (a ``CompressedLayer``)."""

    kind = "shared"

    def __init__(self, source):
        self.source = source

    def __repr__(self) -> str:
        return f"SharedStore(reads layer {self.source.layer_idx}: {self.source.store!r})"

    @property
    def batch(self) -> int:
        return self.source.store.batch

    @property
    def heads(self) -> int:
        return self.source.store.heads

    @property
    def capacity(self) -> int:
        return self.source.store.capacity

    def max_length(self) -> int:
        return self.source.n

    def head_lengths(self) -> list[int]:
        return self.source.store.head_lengths()

    def tensors(self) -> list:
        return self.source.store.tensors()

    def append(self, keys, values, first_position: int) -> None:
        """Nothing to store: the source layer holds these tokens."""

    def index_batch(self, idx) -> None:
        """The source layer reorders its own store."""

    def attend(self, query, spec: AttentionSpec, kv_start=None, query_pos=None):
        # the source's own masking (its kv_start), the target's queries
        return self.source.attend(query, spec)
