"""Layer stores: how one cache layer holds its slots and attends over them.

``UniformStore`` (``[B, H, n, D]``, equal counts per head), ``RaggedStore``
(``[Σ n_h, D]`` per-head segments) and ``PackedStore`` (KIVI-style packed
bits plus a full-precision residual) implement :class:`LayerStore`. See
``docs/design.md`` for the protocol and how to add a store.
"""

from .base import AttentionSpec, LayerStore
from .lsh import LSHStore
from .minicache import MergedPair, MiniCacheStore
from .packed import PackedStore
from .packed_ragged import RaggedPackedStore
from .paged import PagedStore
from .ragged import RaggedStore
from .shared import SharedStore
from .tidal import TidalStore
from .uniform import UniformStore

__all__ = ["AttentionSpec", "LSHStore", "LayerStore", "MergedPair", "MiniCacheStore", "PackedStore", "PagedStore",
           "RaggedPackedStore", "RaggedStore", "SharedStore",
           "TidalStore", "UniformStore"]
