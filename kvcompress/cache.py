"""The compressed KV cache that plain ``model.generate()`` uses.

``KVCache`` is a transformers ``Cache``. Each layer holds its slots in a
``[B, H, capacity, D]`` buffer pair of which the first ``n`` slots are live;
appends write into the slack and only a full buffer is reallocated, so a
decode step does not copy the whole layer. After compression a layer holds
exactly what was kept: the bytes reported are the bytes allocated.

Two lengths matter and are kept apart:

* ``seen`` (logical): tokens the layer has processed. ``get_seq_length()``
  reports it so RoPE positions stay right after eviction.
* ``n`` (physical): slots held. ``get_mask_sizes()`` reports it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import ops
from .errors import KVCompressError
from .methods.base import LayerView, Method
from .ragged import RaggedStore

# The attention function runs right after ``update()`` of the same layer in the
# same thread; this is how it finds the cache (transformers does not pass the
# cache to attention functions).
_pending = threading.local()

_NO_CROP = (
    "kvcompress.KVCache cannot be cropped (evicted tokens cannot be restored); "
    "assisted/speculative decoding is not supported"
)


def take_pending(layer_idx: int, keys) -> "KVCache | None":
    """Return the cache whose ``update()`` just returned ``keys`` for ``layer_idx``.

    Matching the very tensor object guards against a stale entry left by a
    forward whose attention was not ours.
    """
    entry = getattr(_pending, "entry", None)
    _pending.entry = None
    if entry is None or entry[1] != layer_idx or entry[2] is not keys:
        return None
    return entry[0]


def _own(t: torch.Tensor) -> torch.Tensor:
    if t.untyped_storage().nbytes() > t.numel() * t.element_size():
        return t.contiguous() if not t.is_contiguous() else t.clone()
    return t


def _storage_bytes(t: torch.Tensor | None) -> tuple[int, int]:
    if t is None:
        return 0, 0
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


class CompressedLayer(CacheLayerMixin):
    """One layer of a ``KVCache`` (uniform storage: same slot count per head).

    Attributes
    ----------
    keys, values : torch.Tensor
        ``[B, H, n, D]`` views of the live slots.
    kv_start : torch.Tensor
        ``[B]`` int64 leading padded slots per row (left padding).
    seen : int
        Logical number of tokens processed.
    budget : int or None
        Slot target kept during decoding (decode-policy methods).
    state : dict
        Per-slot method state, ``name -> [B, H, n]`` float32.
    positions : torch.Tensor
        ``[B, H, n]`` int32 token index (in the logical sequence) of each slot.
    """

    is_compileable = False
    is_sliding = False

    def __init__(self, layer_idx: int, interval: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        # decode-policy slack: a layer never holds more than budget + interval
        self._interval = interval
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None
        self.n = 0
        self.seen = 0
        self.kv_start: torch.Tensor | None = None
        self.budget: int | None = None
        self.state: dict[str, torch.Tensor] = {}
        self.positions: torch.Tensor | None = None
        self.last_chunk = 0
        # per-head storage once a head-wise method has compressed the layer
        self.ragged: RaggedStore | None = None
        # merging methods with a decode interval: slots each head keeps
        # ([B, H] int64) and the latest queries ([B, Hq, <= window, D]) that
        # score the slots at the next re-compression
        self.head_budgets: torch.Tensor | None = None
        self.recent_q: torch.Tensor | None = None

    # ------------------------------------------------------------ HF protocol
    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.append(key_states, value_states)
        if self.ragged is not None:
            # Only the "kvcompress" attention reads a ragged layer (from
            # self.ragged); hand back the chunk so nothing else is copied.
            return key_states, value_states
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length, *args, **kwargs) -> tuple[int, int]:
        # transformers < 5.3 passes cache_position (a tensor), later a length.
        q = query_length if isinstance(query_length, int) else int(query_length.shape[0])
        return self.n + q, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.layer_idx, self._interval)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._index_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._index_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._kbuf is None:
            return
        idx = torch.arange(self._kbuf.shape[0], device=self._kbuf.device).repeat_interleave(repeats)
        self._index_batch(idx)

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(_NO_CROP)

    def offload(self):
        raise NotImplementedError("kvcompress.KVCache does not support offloading")

    def prefetch(self):
        raise NotImplementedError("kvcompress.KVCache does not support offloading")

    # --------------------------------------------------------------- storage
    @property
    def capacity(self) -> int:
        if self.ragged is not None:
            return int(self.ragged.caps.max()) if self.ragged.caps.numel() else 0
        return 0 if self._kbuf is None else int(self._kbuf.shape[2])

    @property
    def batch_size(self) -> int:
        return self.ragged.batch if self.ragged is not None else int(self.keys.shape[0])

    def _set_views(self) -> None:
        self.keys = self._kbuf[:, :, : self.n]
        self.values = self._vbuf[:, :, : self.n]

    def _index_batch(self, idx: torch.Tensor) -> None:
        if self.ragged is not None:
            raise NotImplementedError("beam search / batch reordering is not supported on a layer with "
                                      "per-head lengths (head-wise methods such as AdaKV)")
        if self._kbuf is None:
            return
        idx = idx.to(self._kbuf.device)
        self._kbuf = self._kbuf.index_select(0, idx)
        self._vbuf = self._vbuf.index_select(0, idx)
        self.kv_start = self.kv_start.index_select(0, idx)
        self.positions = self.positions.index_select(0, idx)
        self.state = {k: v.index_select(0, idx) for k, v in self.state.items()}
        if self.head_budgets is not None:
            self.head_budgets = self.head_budgets.index_select(0, idx)
            self.recent_q = self.recent_q.index_select(0, idx.to(self.recent_q.device))
        self._set_views()

    def _grow(self, need: int) -> None:
        """Reallocate to hold ``need`` slots, with slack for later appends."""
        new_cap = need + max(32, self.capacity // 16)
        if self.budget is not None and need <= self.budget + self._interval:
            # A decode policy never lets the layer outgrow this: memory stays flat.
            new_cap = min(new_cap, self.budget + self._interval)
        B, H, _, D = self._kbuf.shape
        kbuf = self._kbuf.new_empty((B, H, new_cap, D))
        vbuf = self._vbuf.new_empty((B, H, new_cap, self._vbuf.shape[3]))
        kbuf[:, :, : self.n] = self._kbuf[:, :, : self.n]
        vbuf[:, :, : self.n] = self._vbuf[:, :, : self.n]
        self._kbuf, self._vbuf = kbuf, vbuf

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        q = int(key_states.shape[2])
        self.last_chunk = q
        if self.ragged is not None:
            self.ragged.append(key_states, value_states, self.seen)
            self.seen += q
            self.n = int(self.ragged.lengths.max())
            return
        if self._kbuf is None:
            # First chunk: keep the projection output as is (no copy) unless it
            # is a view into a larger buffer (fused QKV projections), so the
            # bytes held are the bytes reported.
            self._kbuf, self._vbuf = _own(key_states), _own(value_states)
            self.n = q
        else:
            if key_states.shape[0] != self._kbuf.shape[0] or key_states.shape[1] != self._kbuf.shape[1]:
                raise ValueError(
                    f"key_states: expected batch {self._kbuf.shape[0]} and {self._kbuf.shape[1]} kv "
                    f"heads as earlier updates of layer {self.layer_idx}, got {tuple(key_states.shape)}"
                )
            if self.n + q > self.capacity:
                self._grow(self.n + q)
            self._kbuf[:, :, self.n : self.n + q] = key_states
            self._vbuf[:, :, self.n : self.n + q] = value_states
            self.n += q
        for name, t in self.state.items():
            self.state[name] = torch.cat([t, t.new_zeros(t.shape[:2] + (q,))], dim=2)
        new_pos = torch.arange(self.seen, self.seen + q, dtype=torch.int32, device=key_states.device)
        new_pos = new_pos.expand(key_states.shape[0], key_states.shape[1], q)
        self.positions = new_pos.clone() if self.positions is None else torch.cat([self.positions, new_pos], 2)
        self.seen += q
        self._set_views()

    def keep(self, indices: torch.Tensor, ragged: bool = False) -> None:
        """Keep only the slots ``indices`` ``[B, H, k]`` (ascending) of every head.

        With ``ragged`` (head-wise methods: ``-1`` pads heads that keep fewer)
        the layer moves to per-head storage: each head then holds exactly its
        own slots, pads of left-padded rows dropped.
        """
        if ragged:
            self._become_ragged(RaggedStore.from_selection(self.keys, self.values, self.positions, indices,
                                                           self.kv_start))
            return
        k_new, v_new = ops.gather(self.keys, self.values, indices)
        pad = (indices[:, 0, :] < self.kv_start[:, None]).sum(dim=1)
        self.state = {name: t.gather(2, indices) for name, t in self.state.items()}
        self.positions = self.positions.gather(2, indices)
        self._kbuf, self._vbuf = k_new, v_new
        self.n = int(indices.shape[2])
        self.kv_start = pad.to(torch.int64)
        self._set_views()

    def keep_merged(self, centers: torch.Tensor, merged, carried=None, slack: int = 0) -> None:
        """Replace the layer by merged slots: ``centers`` ``[B, H, C]`` (-1
        padded) are the kept slots, ``merged`` an ``ops.EvictMergeResult``
        holding their merged keys, values and counts, ``carried`` optional
        ``[B, H, C]`` scores kept for a later re-compression; each head gets
        ``slack`` free rows for appends."""
        positions = self.positions.gather(2, centers.clamp_min(0))
        self._become_ragged(RaggedStore.from_dense(merged.keys, merged.values, positions, centers >= 0,
                                                   counts=merged.counts, scores=carried, slack=slack))

    def to_ragged(self) -> None:
        """Move every valid slot to per-head storage (left padding dropped)."""
        B, H, n = self.keys.shape[:3]
        valid = (torch.arange(n, device=self.keys.device)[None, None, :] >= self.kv_start[:, None, None])
        valid = valid.expand(B, H, n)
        ones = torch.ones(valid.shape, device=self.keys.device)
        self._become_ragged(RaggedStore.from_dense(self.keys, self.values, self.positions, valid, counts=ones,
                                                   scores=ones * float("nan")))

    def recompress(self, method, scaling: float) -> None:
        """Re-compress a per-head layer to ``head_budgets`` slots per head:
        ``method.recompact`` scores every held slot with the recent queries
        and the carried scores, then evicts/merges (merging methods)."""
        store = self.ragged
        B, H = store.batch, store.heads
        keys, values, pos, counts, carried, start = store.to_padded()
        budgets = torch.minimum(self.head_budgets.reshape(-1), store.lengths)[:, None]
        q = self.recent_q
        group = q.shape[1] // H
        queries = q.reshape(B * H, group, q.shape[2], q.shape[3])
        centers, merged, new_carried = method.recompact(queries, keys, values, counts, carried, start,
                                                        budgets, scaling)
        C = int(centers.shape[2])
        positions = pos[:, None].gather(2, centers.clamp_min(0))
        shape = (B, H, C)
        self._become_ragged(RaggedStore.from_dense(
            merged.keys.reshape(B, H, C, -1), merged.values.reshape(B, H, C, -1), positions.reshape(shape),
            (centers >= 0).reshape(shape), counts=merged.counts.reshape(shape),
            scores=new_carried.reshape(shape), slack=method.interval,
        ))

    def _become_ragged(self, store: RaggedStore) -> None:
        if self.state:
            raise NotImplementedError("per-slot method state on per-head storage")
        self.ragged = store
        self._kbuf = self._vbuf = self.keys = self.values = self.positions = None
        self.kv_start = torch.zeros_like(self.kv_start)
        self.n = int(store.lengths.max()) if store.lengths.numel() else 0

    # ------------------------------------------------------------ accounting
    def tensors(self) -> list[torch.Tensor]:
        extra = [t for t in (self.head_budgets, self.recent_q) if t is not None]
        if self.ragged is not None:
            return self.ragged.tensors() + [self.kv_start] + extra
        out = [self._kbuf, self._vbuf, self.kv_start, self.positions, *self.state.values(), *extra]
        return [t for t in out if t is not None]

    def head_lengths(self) -> list[int]:
        if self.ragged is not None:
            return [int(x) for x in self.ragged.lengths.tolist()]
        heads = 0 if self._kbuf is None else int(self._kbuf.shape[1])
        return [self.n] * heads


@dataclass
class LayerStats:
    """Sizes of one cache layer.

    ``lengths`` holds the live slot count of each kv head, ``capacity`` the
    allocated slots per head, ``bytes`` what the layer's tensors occupy.
    """

    layer: int
    seen: int
    lengths: list[int]
    capacity: int
    bytes: int


@dataclass
class CacheStats:
    """Per-layer and total sizes of a ``KVCache``; ``str()`` is a table."""

    method: str
    layers: list[LayerStats] = field(default_factory=list)
    full_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers)

    @property
    def compression(self) -> float:
        """Full-cache bytes over bytes held (``inf`` when nothing is held)."""
        return self.full_bytes / self.total_bytes if self.total_bytes else float("inf")

    def __str__(self) -> str:
        rows = [
            f"KVCache stats — {self.method}",
            "| layer | seen | slots per head | capacity | bytes |",
            "|---:|---:|---|---:|---:|",
        ]
        for s in self.layers:
            heads = s.lengths if len(set(s.lengths)) > 1 else f"{s.lengths[0] if s.lengths else 0} x{len(s.lengths)}"
            rows.append(f"| {s.layer} | {s.seen} | {heads} | {s.capacity} | {s.bytes:,} |")
        rows.append(
            f"total {self.total_bytes:,} bytes held vs {self.full_bytes:,} for the full cache "
            f"({self.compression:.2f}x smaller)"
        )
        return "\n".join(rows)


class KVCache(Cache):
    """A transformers ``Cache`` that compresses each layer with ``method``.

    Parameters
    ----------
    method : kvcompress.methods.Method
        What to keep (e.g. ``SnapKV(ratio=0.5)``, ``StreamingLLM(budget=256)``).
    num_layers : int, optional
        Number of decoder layers; learnt from the model on first use.

    Notes
    -----
    Compression runs inside the ``"kvcompress"`` attention function, right
    after each layer's attention, because it needs that layer's queries; use
    ``kvcompress.compress(model, method)`` (or call ``kvcompress.enable(model)``
    once) so the model uses it. Query-free methods (``StreamingLLM``,
    ``Knorm``) also work with other attention functions for unpadded batches.
    """

    def __init__(self, method: Method, *, num_layers: int | None = None):
        if not isinstance(method, Method):
            raise TypeError(
                f"method: expected a kvcompress method (e.g. kvcompress.SnapKV(ratio=0.5)), "
                f"got {type(method).__name__}"
            )
        super().__init__(layers=[])
        self.method = method
        self.num_layers = num_layers
        self._awaiting: int | None = None

    def __repr__(self) -> str:
        lengths = [layer.n for layer in self.layers]
        span = f"{min(lengths)}..{max(lengths)}" if lengths else "empty"
        seen = self.get_seq_length()
        return (
            f"KVCache({self.method.describe()}, layers={len(self.layers)}, seen={seen}, "
            f"slots per head={span}, bytes={self.memory_bytes():,})"
        )

    # ------------------------------------------------------------ HF protocol
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self._awaiting is not None:
            self._finish_without_queries(self._awaiting)
        if key_states.ndim != 4:
            raise ValueError(f"key_states: expected [B, H, q, D], got shape {tuple(key_states.shape)}")
        while len(self.layers) <= layer_idx:
            self.layers.append(CompressedLayer(len(self.layers), getattr(self.method, "interval", 0)))
        layer = self.layers[layer_idx]
        keys, values = layer.update(key_states, value_states)
        self._awaiting = layer_idx
        _pending.entry = (self, layer_idx, keys)
        return keys, values

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        layer_idx = 0 if layer_idx is None else layer_idx
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].seen

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        if layer_idx >= len(self.layers):
            q = query_length if isinstance(query_length, int) else int(query_length.shape[0])
            return q, 0
        return self.layers[layer_idx].get_mask_sizes(query_length)

    @property
    def is_compileable(self) -> bool:
        return False

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(_NO_CROP)

    # ---------------------------------------------------------- compression
    def after_attention(self, layer_idx: int, queries, scaling: float) -> None:
        """Compress ``layer_idx`` once its attention has run (called by the
        ``"kvcompress"`` attention function with the layer's queries
        ``[B, Hq, q, D]``)."""
        self._awaiting = None
        layer = self.layers[layer_idx]
        method = self.method
        if layer.head_budgets is not None:
            self._keep_decode_budget(layer, queries, scaling)
            return
        if layer.ragged is not None:
            # Per-head storage has no uniform view to score; without a decode
            # interval a head-wise method compresses a layer once, at its
            # first prefill.
            return
        n_chunk = layer.last_chunk
        phase = "prefill" if n_chunk > 1 else "decode"
        if phase == "decode" and not method.decode_policy:
            return
        view = LayerView(
            layer_idx=layer_idx,
            num_layers=self.num_layers or (layer_idx + 1),
            queries=queries,
            keys=layer.keys,
            values=layer.values,
            kv_start=layer.kv_start,
            scaling=scaling,
            state=layer.state,
            phase=phase,
        )
        for name in method.slot_state:
            if name not in layer.state:
                layer.state[name] = torch.zeros(layer.keys.shape[:3], dtype=torch.float32, device=layer.keys.device)
        method.init_state(view)
        if phase == "prefill":
            target = method.target_length(layer.n - n_chunk, n_chunk, layer_idx, view.num_layers)
            if method.decode_policy:
                layer.budget = target
            interval = getattr(method, "interval", 0) if method.merges else 0
            if layer.n > target:
                if method.merges:
                    centers, merged, carried = method.compact(view, target)
                    layer.keep_merged(centers, merged, carried if interval else None, slack=interval)
                else:
                    layer.keep(method.select(view, target), ragged=method.headwise)
            if interval:
                B, H = int(view.keys.shape[0]), int(view.keys.shape[1])
                if layer.ragged is not None:
                    # adaptive heads keep the share the prefill gave them
                    layer.head_budgets = layer.ragged.lengths.reshape(B, H).clone()
                else:
                    # a prompt that fitted keeps growing up to the method's budget
                    keep = target if method.budget is None else max(target, method.budget)
                    layer.head_budgets = torch.full((B, H), keep, dtype=torch.int64, device=queries.device)
                layer.recent_q = queries[:, :, -method.held_queries():].clone()
        elif layer.budget is not None and layer.n >= layer.budget + method.interval:
            layer.keep(method.select(view, layer.budget))

    def _keep_decode_budget(self, layer: CompressedLayer, queries, scaling: float) -> None:
        """Merging methods with an ``interval``: once the heads hold
        ``interval`` slots over their budget, re-compress the layer."""
        method = self.method
        layer.recent_q = torch.cat([layer.recent_q, queries], 2)[:, :, -method.held_queries():].contiguous()
        if layer.ragged is None:
            # the prompt fitted the budget: the layer is still uniform
            if layer.n - int(layer.head_budgets.max()) < method.interval:
                return
            layer.to_ragged()
        elif int((layer.ragged.lengths - layer.head_budgets.reshape(-1)).max()) < method.interval:
            return
        layer.recompress(method, scaling)

    def set_padding(self, layer_idx: int, padding_mask, q: int) -> torch.Tensor:
        """Record the left padding of a new chunk and return ``kv_start`` ``[B]``.

        ``padding_mask`` is the 2-D bool mask ``[B, seen]`` generate() passes
        (True = real token) or None.
        """
        layer = self.layers[layer_idx]
        B = layer.batch_size
        device = layer.kv_start.device if layer.kv_start is not None else layer.keys.device
        first = layer.kv_start is None
        if padding_mask is None:
            if first:
                layer.kv_start = torch.zeros(B, dtype=torch.int64, device=device)
            return layer.kv_start
        if padding_mask.ndim != 2 or padding_mask.shape[0] != B or padding_mask.shape[1] < q:
            raise ValueError(
                f"attention_mask: expected a 2-D mask [batch={B}, tokens>={q}], got shape "
                f"{tuple(padding_mask.shape)}"
            )
        chunk = padding_mask[:, -q:].to(device=device, dtype=torch.bool)
        if first:
            pad = (~chunk).sum(dim=1)
            expected = torch.arange(q, device=device)[None, :] >= pad[:, None]
            if not torch.equal(chunk, expected):
                raise ValueError(
                    "attention_mask: kvcompress supports left padding only "
                    "(set tokenizer.padding_side = 'left')"
                )
            layer.kv_start = pad.to(torch.int64)
        elif not bool(chunk.all()):
            raise ValueError(
                "attention_mask: a continuation chunk must not contain padding "
                "(pad only the first prompt, on the left)"
            )
        return layer.kv_start

    def _finish_without_queries(self, layer_idx: int) -> None:
        """The model's attention is not ours: compress with keys/values only."""
        self._awaiting = None
        layer = self.layers[layer_idx]
        if layer.kv_start is None:
            layer.kv_start = torch.zeros(layer.keys.shape[0], dtype=torch.int64, device=layer.keys.device)
        if self.method.needs_queries:
            raise KVCompressError(
                f"{type(self.method).__name__} needs the layer's queries, which only the 'kvcompress' "
                "attention function provides: run generation inside `with kvcompress.compress(model, "
                "method):` or call `kvcompress.enable(model)` before passing a KVCache"
            )
        self.after_attention(layer_idx, None, 1.0)

    # ------------------------------------------------------------ accounting
    def memory_bytes(self) -> int:
        """Bytes the cache's tensors occupy (each storage counted once)."""
        seen: dict[int, int] = {}
        for layer in self.layers:
            for t in layer.tensors():
                ptr, nbytes = _storage_bytes(t)
                seen[ptr] = nbytes
        return sum(seen.values())

    def stats(self) -> CacheStats:
        """Per-layer lengths and bytes, and the full cache's size for comparison."""
        out = CacheStats(method=self.method.describe())
        for layer in self.layers:
            nbytes = sum(_storage_bytes(t)[1] for t in layer.tensors())
            out.layers.append(
                LayerStats(layer.layer_idx, layer.seen, layer.head_lengths(), layer.capacity, nbytes)
            )
            if layer.ragged is not None:
                r = layer.ragged
                out.full_bytes += r.batch * r.heads * layer.seen * (r.k.shape[1] + r.v.shape[1]) * r.k.element_size()
            elif layer._kbuf is not None:
                B, H, _, D = layer._kbuf.shape
                item = layer._kbuf.element_size()
                out.full_bytes += B * H * layer.seen * (D + layer._vbuf.shape[3]) * item
        return out
