"""Layer stores: how one cache layer holds its slots and attends over them.

``UniformStore`` (``[B, H, n, D]``, equal counts per head), ``RaggedStore``
(``[Σ n_h, D]`` per-head segments) and ``PackedStore`` (KIVI-style packed
bits plus a full-precision residual) implement :class:`LayerStore`; the
query-aware readers extend the first two (``PagedStore`` /
``RaggedPagedStore``, ``TidalStore`` / ``RaggedTidalStore``, ``LSHStore`` /
``RaggedLSHStore``). See
``docs/design.md`` for the protocol and how to add a store.
"""

from .base import AttentionSpec, LayerStore
from .lsh import LSHStore, RaggedLSHStore
from .minicache import MergedPair, MiniCacheStore
from .packed import PackedStore
from .packed_ragged import RaggedPackedStore
from .paged import PagedStore, RaggedPagedStore
from .ragged import RaggedStore
from .shared import SharedStore
from .tidal import RaggedTidalStore, TidalStore
from .uniform import UniformStore

__all__ = ["AttentionSpec", "LSHStore", "LayerStore", "MergedPair", "MiniCacheStore", "PackedStore", "PagedStore",
           "RaggedLSHStore", "RaggedPackedStore", "RaggedPagedStore", "RaggedStore", "RaggedTidalStore", "SharedStore",
           "TidalStore", "UniformStore"]
