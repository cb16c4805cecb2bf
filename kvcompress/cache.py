"""The compressed KV cache that plain ``model.generate()`` uses.

``KVCache`` is a transformers ``Cache`` made of ``CompressedLayer`` objects.
A layer keeps its slots in a store (``kvcompress.stores``: uniform
``[B, H, n, D]`` until a head-wise method gives heads different lengths, then
ragged ``[Σ n_h, D]``), decides with the method when to compress, and routes
attention to the store. The bytes reported are the bytes the tensors occupy.

Two lengths matter and are kept apart:

* ``seen`` (logical): tokens the layer has processed. ``get_seq_length()``
  reports it so RoPE positions stay right after eviction.
* ``n`` (physical): slots held. ``get_mask_sizes()`` reports it.

Batch rows are independent: left padding is recorded per row (``kv_start``),
a row whose real tokens fit its target is never compressed, and rows that
keep fewer slots than others in a uniform layer are filled at the front with
masked filler slots, so each row generates what it would alone. (One
exception: a per-head packed layer that re-compresses while decoding keeps
as many newest slots in full precision as every row allows, so a row's
precision, not its kept slots, can depend on the batch.)
"""

from __future__ import annotations

import copy
import math
import threading
from dataclasses import dataclass, field, replace

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .errors import KVCompressError, KVCompressUnsupportedError
from .methods.base import LayerView, Method
from .stores import (AttentionSpec, LSHStore, MiniCacheStore, PackedStore, PagedStore, RaggedLSHStore,
                     RaggedPackedStore, RaggedPagedStore, RaggedStore, RaggedTidalStore, SharedStore, TidalStore,
                     UniformStore)
from .packing_choices import PackingChoices
from .recurrent import RecurrentStates, check_chunk, check_layer_kinds
from .states import check_batch_index, check_layer_index, check_repeats, check_states
from .stores.keep_rows import arrange_rows, pick_rows_of
from .stores.packed_ragged import layout_problem

# The attention function runs right after ``update()`` of the same layer in the
# same thread; this is how it finds the cache (transformers does not pass the
# cache to attention functions).
_pending = threading.local()

_NO_CROP = (
    "kvcompress.KVCache cannot be cropped (evicted tokens cannot be restored); "
    "assisted/speculative decoding is not supported"
)


def take_pending(layer_idx: int, keys, values=None) -> "KVCache | None":
    """Return the cache whose ``update()`` just returned ``keys`` (and
    ``values``) for ``layer_idx``.

    Matching the very tensor object guards against a stale entry left by a
    forward whose attention was not ours. Keys that match with values that
    do not are refused: the layer would attend over the values it holds,
    not the ones the model made from them (DiffLlama splits them in two).
    """
    entry = getattr(_pending, "entry", None)
    _pending.entry = None
    if entry is None or entry[1] != layer_idx:
        return None
    if entry[2] is not keys:
        # our attention function runs, but over keys the model made from the
        # cache's (JetMoE repeats them per expert): remembered for the refusal
        entry[0]._transformed = layer_idx
        return None
    if values is not None and entry[3] is not values:
        raise KVCompressUnsupportedError(
            f"module: layer {layer_idx}'s attention received values other than those the cache returned (the "
            f"model changes them between its cache and its attention, as DiffLlama's differential attention "
            f"splits them); a compressed layer attends over the values it holds")
    return entry[0]


def _storage_bytes(t: torch.Tensor | None) -> tuple[int, int]:
    if t is None:
        return 0, 0
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def _fill_front(rows: list[torch.Tensor], H: int, device) -> tuple[torch.Tensor, list[int]]:
    """Stack per-row index sets ``[H, k_b]`` into ``[B, H, K]`` with
    ``K - k_b`` filler slots (index 0) in front; return them and the filler
    counts (the rows' new leading masked slots)."""
    K = max(int(r.shape[1]) for r in rows)
    out, fill = [], []
    for r in rows:
        pad = K - int(r.shape[1])
        fill.append(pad)
        out.append(torch.cat([torch.zeros((H, pad), dtype=torch.int64, device=device), r.to(device)], 1))
    return torch.stack(out), fill


def padding_of_chunk(padding_mask, q: int, batch: int, first: bool) -> torch.Tensor | None:
    """Check the 2-D padding mask ``[batch, seen]`` (True = real token) of a
    ``q``-token chunk and return the first chunk's left padding ``[batch]``
    (int64, on the mask's device); None for a later chunk. Raises
    ``ValueError`` naming ``attention_mask`` for right padding, holes, or
    padding in a later chunk. Reads nothing else, so a forward can be refused
    before any layer has stored its chunk (``KVCache.check_mask``)."""
    if padding_mask.ndim != 2 or padding_mask.shape[0] != batch or padding_mask.shape[1] < q:
        raise ValueError(
            f"attention_mask: expected a 2-D mask [batch={batch}, tokens>={q}], got shape "
            f"{tuple(padding_mask.shape)}"
        )
    chunk = padding_mask[:, -q:].to(torch.bool)
    if not first:
        if not bool(chunk.all()):
            whole = padding_mask.to(torch.bool)
            lead = (~whole).to(torch.int64).cumprod(dim=1).sum(dim=1)  # each row's leading padding
            left = torch.arange(whole.shape[1], device=whole.device)[None, :] >= lead[:, None]
            if torch.equal(whole, left):
                # left padding that outlasts the first chunk (generate(prefill_chunk_size=) below it)
                seen_before = int(padding_mask.shape[1]) - q
                raise ValueError(
                    f"attention_mask: a row's left padding ({int(lead.max())} tokens) runs past the first "
                    f"chunk the cache took ({seen_before if seen_before else q} tokens); the cache needs each "
                    f"row's padding inside its first chunk: prefill in one chunk, or with "
                    f"generate(prefill_chunk_size=) at least the longest padding")
            raise ValueError(
                "attention_mask: a continuation chunk must not contain padding "
                "(pad only the first prompt, on the left)"
            )
        return None
    pad = (~chunk).sum(dim=1)
    expected = torch.arange(q, device=chunk.device)[None, :] >= pad[:, None]
    if not torch.equal(chunk, expected):
        raise ValueError(
            "attention_mask: kvcompress supports left padding only "
            "(set tokenizer.padding_side = 'left')"
        )
    return pad


class TokenLog:
    """The token ids a ``KVCache`` was fed, for methods with
    ``Method.needs_tokens`` (FastGen): ``ids`` int64 ``[B, T]``, ``T`` the
    tokens seen (left padding included), so the token of a slot at position
    ``p`` of row ``b`` is ``ids[b, p]``. One per cache, shared by its layers
    (a few bytes per token and row, not per layer or head).

    ``hf.compress`` records every forward's ``input_ids`` before its layers
    run; a forward without them (``inputs_embeds``) makes the log unknown for
    good (``lookup`` then returns None).
    """

    def __init__(self):
        self.ids = None
        self.unknown = False

    def clear(self) -> None:
        self.__init__()

    def append(self, input_ids) -> None:
        if input_ids is None or self.unknown:
            self.unknown, self.ids = True, None
            return
        ids = input_ids.detach().to(torch.int64)
        if ids.ndim != 2 or (self.ids is not None and ids.shape[0] != self.ids.shape[0]):
            self.unknown, self.ids = True, None
            return
        self.ids = ids.clone() if self.ids is None else torch.cat([self.ids, ids.to(self.ids.device)], 1)

    def index_batch(self, idx: torch.Tensor) -> None:
        if self.ids is not None:
            self.ids = self.ids.index_select(0, idx.to(self.ids.device))

    def lookup(self, positions):
        """int64 ``[B, H, n]`` token ids of slots at ``positions`` ``[B, H,
        n]`` (any integer dtype), or None when the log does not cover them."""
        if self.ids is None or positions is None or positions.shape[0] != self.ids.shape[0]:
            return None
        B, T = self.ids.shape
        if positions.numel() and int(positions.max()) >= T:
            return None
        pos = positions.reshape(B, -1).to(device=self.ids.device, dtype=torch.int64).clamp(0, max(T - 1, 0))
        return self.ids.gather(1, pos).reshape(positions.shape).to(positions.device)


class CompressedLayer(PackingChoices, CacheLayerMixin):
    """One layer of a ``KVCache``.

    Attributes
    ----------
    store : kvcompress.stores.LayerStore
        Holds the slots and attends over them.
    kv_start : torch.Tensor
        ``[B]`` int64 leading masked slots per row of a uniform store (left
        padding, or filler for rows that keep fewer slots).
    seen : int
        Logical number of tokens processed (padding included).
    window : int or None
        Sliding window the model's attention uses on this layer.
    head_budgets : torch.Tensor or None
        ``[B, H]`` int64 decode-time slots per head of a per-head layer.
    recent_q : torch.Tensor or None
        ``[B, Hq, <= method.held_queries(), D]`` latest queries, for
        decode-time re-scoring.
    """

    is_compileable = False
    is_sliding = False

    def __init__(self, layer_idx: int, method: Method, num_layers: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.method = method
        self.num_layers = num_layers
        self.store = UniformStore()
        #: (kv heads, key channels, value channels) of the first update; None before it
        self.kv_widths: tuple[int, int, int] | None = None
        self.seen = 0
        self.kv_start: torch.Tensor | None = None
        self._start: list[int] = []  # kv_start on the host
        self._pad: list[int] = []  # left padding of each row's first chunk (host)
        self._pad_known = False  # whether _pad came from a mask (not assumed none: attention not ours)
        self.window: int | None = None
        self.last_chunk = 0
        # decode steps since the last prefill chunk (LayerView.steps)
        self.decode_steps = 0
        self.head_budgets: torch.Tensor | None = None
        self._share: torch.Tensor | None = None  # [B, H] float64 head shares (host)
        self._budgets_host: torch.Tensor | None = None  # host copy of head_budgets, flat
        # latest queries in a ring: [B, Hq, held, D], next write slot, filled
        self._qbuf: torch.Tensor | None = None
        self._qpos = 0
        self._qn = 0
        # state the cache's layers share (TidalDecode's token selection);
        # KVCache gives every layer its own dict
        self.shared: dict = {}
        # defers_prefill methods: each row's target here over its mean
        # target when method.layer_targets last ran (None: the mean)
        self._scale: list[float] | None = None
        # the cache's token ids (Method.needs_tokens); KVCache sets it
        self.token_log: TokenLog | None = None
        # per-head method state (LayerView.head_state): name -> [B, H] int64
        self.head_state: dict = {}
        # method.lookahead: the prefill's last queries [B, Hq, <= T, D] and
        # the method's statistic of all of them, held until the first decode
        # step compresses the layer
        self._waiting: torch.Tensor | None = None
        self._statistic: torch.Tensor | None = None
        # method.lookahead_room: targets are this many times larger during the
        # early compression (None otherwise), and whether the first decode
        # step still has to bring the heads down to the real targets
        self._inflate: float | None = None
        self._room_pending = False
        #: lookahead_room rows that fit their room at the prompt and wait whole while another
        #: row's compression made the layer per-head: b -> (its held queries [1, Hq, w, D], its
        #: lookahead statistic over its own slots [S, n_b] or None), compressed as alone at the
        #: first decode step (_leave_room)
        self._room_whole: dict | None = None
        # a packed layer that still re-selects while decoding (_repacks): the
        # queries of the calls since its last re-compression, [B, Hq, q, D]
        # each (its re-selection observes them all at once; see _queue)
        self._rebudget = False
        # the row targets the per-head budgets were last set for (_refresh_budgets)
        self._budget_targets: list[int] | None = None
        # per row whether the evictor kept it whole, from the per-head
        # compression (_become_ragged) until _to_packed reads it
        self._kept_whole: list[bool] | None = None
        # a per-head layer with rounds whose rows chose apart at its first
        # pack: per row (rotation or None, feedback triangle or None), what
        # every later round packs the row with
        self._ragged_choices: list | None = None
        # a per-head layer with rounds: per row whether no compression has
        # taken a slot of it yet (it packs as a uniform layer alone does),
        # None when no row is so
        self._whole_rounds: list[bool] | None = None
        # the rows the last per-head re-compression took (None: all), for a packed round's layout
        self._round_rows: list[bool] | None = None
        self._pending: list = []
        #: a uniform packed layer with rounds and slot state: per row, how many of the newest
        #: pending queries its state has not accumulated yet (each row at its own rounds, as
        #: alone), and how many of them no round has held yet (_hold); see _repack_round
        self._unseen: list[int] | None = None
        self._fresh = 0
        self._round_observe = None
        self._init_choices()

    def __repr__(self) -> str:
        return (f"CompressedLayer({self.layer_idx}, seen={self.seen}, window={self.window}, "
                f"store={self.store!r})")

    # ------------------------------------------------------------ views
    @property
    def ragged(self) -> RaggedStore | None:
        """The per-head store, or None while the layer is uniform."""
        return self.store if isinstance(self.store, RaggedStore) else None

    @property
    def keys(self):
        return self.store.keys if isinstance(self.store, UniformStore) and self.store.batch else None

    @keys.setter
    def keys(self, value):  # CacheLayerMixin.__init__ assigns it
        pass

    @property
    def values(self):
        return self.store.values if isinstance(self.store, UniformStore) and self.store.batch else None

    @values.setter
    def values(self, value):
        pass

    @property
    def positions(self):
        """``[B, H, n]`` int32 token index of each slot (uniform store)."""
        return self.store.column("positions") if isinstance(self.store, UniformStore) else None

    @property
    def state(self) -> dict:
        """Per-slot method state ``name -> [B, H, n]`` (uniform store)."""
        if not isinstance(self.store, UniformStore) or not self.store.batch:
            return {}
        return {k: v for k, v in self.store.columns.items() if k != "positions"}

    @property
    def n(self) -> int:
        """Slots held by the longest head."""
        if isinstance(self.store, UniformStore):
            return self.store.n
        return self.store.max_length()

    @property
    def capacity(self) -> int:
        return self.store.capacity

    @property
    def batch_size(self) -> int:
        return self.store.batch

    def head_lengths(self) -> list[int]:
        return self.store.head_lengths()

    def tensors(self) -> list[torch.Tensor]:
        extra = [t for t in (self.kv_start, self.head_budgets, self._share, self._budgets_host, self._qbuf,
                             self._waiting,
                             self._statistic, self._rot_q, self._clip_q)
                 if t is not None] + list(self._pending)
        extra += list(self.head_state.values())
        if self.layer_idx == 0 and self.token_log is not None and self.token_log.ids is not None:
            extra.append(self.token_log.ids)  # the cache's one token log, counted with its first layer
        return self.store.tensors() + extra

    # ------------------------------------------------------------ HF protocol
    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        # what later updates must match (states.check_states)
        self.kv_widths = (int(key_states.shape[1]), int(key_states.shape[3]), int(value_states.shape[3]))
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = int(key_states.shape[2])
        self.store.append(key_states, value_states, self.seen)
        self.seen += q
        self.last_chunk = q
        self.decode_steps = 0 if q > 1 else self.decode_steps + 1
        if isinstance(self.store, UniformStore):
            return self.store.keys, self.store.values
        if isinstance(self.store, SharedStore) and isinstance(self.store.source.store, UniformStore):
            return self.store.source.store.keys, self.store.source.store.values
        # Only the "kvcompress" attention reads a per-head layer (through
        # the store); hand back the chunk so nothing else is copied.
        return key_states, value_states

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
        log = self.token_log
        if log is not None and self.layer_idx == 0:
            log.clear()
        self.__init__(self.layer_idx, self.method, self.num_layers)
        self.token_log = log

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._index_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._index_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.store.batch:
            return
        idx = torch.arange(self.store.batch).repeat_interleave(repeats)
        self._index_batch(idx)

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(_NO_CROP)

    def offload(self):
        raise NotImplementedError("kvcompress.KVCache does not support offloading")

    def prefetch(self):
        raise NotImplementedError("kvcompress.KVCache does not support offloading")

    def _index_batch(self, idx: torch.Tensor) -> None:
        """Rows ``idx`` of the batch in that order (beam search, batch selection)."""
        if not self.store.batch:
            return
        host = idx.detach().to("cpu", torch.int64)
        if self.layer_idx == 0 and self.token_log is not None:
            self.token_log.index_batch(host)  # one log per cache: its first layer reorders it
        self.store.index_batch(idx)
        dev = self.kv_start.device if self.kv_start is not None else idx.device
        if self.kv_start is not None:
            self.kv_start = self.kv_start.index_select(0, host.to(dev))
        self._start = [self._start[i] for i in host.tolist()] if self._start else []
        self._pad = [self._pad[i] for i in host.tolist()] if self._pad else []
        if self.head_budgets is not None:
            self.head_budgets = self.head_budgets.index_select(0, host.to(self.head_budgets.device))
            self._share = self._share.index_select(0, host)
            self._budgets_host = self.head_budgets.reshape(-1).cpu()
            self._budget_targets = None  # the next check follows the reordered rows' targets
        if self._qbuf is not None:
            self._qbuf = self._qbuf.index_select(0, host.to(self._qbuf.device))
        if self._waiting is not None:
            self._waiting = self._waiting.index_select(0, host.to(self._waiting.device))
        if self._rot_q is not None:
            self._rot_q = self._rot_q.index_select(0, host.to(self._rot_q.device))
        if self._clip_q is not None:
            self._clip_q = self._clip_q.index_select(0, host.to(self._clip_q.device))
        if self._row_choices is not None:
            self._row_choices = [self._row_choices[i] for i in host.tolist()]
        if self._ragged_choices is not None:
            self._ragged_choices = [self._ragged_choices[i] for i in host.tolist()]
        if self._weights_later is not None:
            self._weights_later = [self._weights_later[i] for i in host.tolist()]
        if self._whole_rounds is not None:
            self._whole_rounds = [self._whole_rounds[i] for i in host.tolist()]
        if self._kept_whole is not None:
            self._kept_whole = [self._kept_whole[i] for i in host.tolist()]
        if self._row_qmom is not None:
            # a row repeated (beam search) goes on from its moment so far, in copies
            self._row_qmom = [copy.deepcopy(self._row_qmom[i]) for i in host.tolist()]
        self._pending = [q.index_select(0, host.to(q.device)) for q in self._pending]
        if self._unseen is not None:
            self._unseen = [self._unseen[i] for i in host.tolist()]
        if self._statistic is not None:
            self._statistic = self._statistic.index_select(0, host.to(self._statistic.device))
        if self._scale is not None:
            self._scale = [self._scale[i] for i in host.tolist()]
        self.head_state = {k: v.index_select(0, host.to(v.device)) for k, v in self.head_state.items()}

    # -------------------------------------------------------------- padding
    def set_padding(self, padding_mask, q: int, four_d=None) -> torch.Tensor:
        """Record the left padding of a new chunk; return ``kv_start`` ``[B]``.

        ``padding_mask`` is the 2-D bool mask ``[B, seen]`` generate() passes
        (True = real token) or None; ``four_d`` a 4-D mask ``[B, 1, q, n]``
        (bool or additive) from which the padding of a first chunk is read.
        """
        B = self.store.batch
        device = self.store.tensors()[0].device
        first = self.kv_start is None
        if first:
            self._pad_known = padding_mask is not None or four_d is not None
        if four_d is not None and first:
            # A slot is padding when no later query sees it (a padded query
            # row may see itself or, in some masks, everything; the token
            # after a real one always sees it, whatever the window).
            allowed = (four_d if four_d.dtype == torch.bool else four_d == 0)[:, 0]  # [B, q, n]
            nq, n = allowed.shape[1], allowed.shape[2]
            later = (torch.arange(nq, device=allowed.device)[:, None] + (n - nq)) > torch.arange(
                n, device=allowed.device)[None, :]
            seen_later = (allowed & later[None]).any(dim=1)
            seen_later[:, -1] = True
            pad = (torch.cumprod((~seen_later).to(torch.int64), dim=1)).sum(dim=1)
            self._set_start(pad.to(device=device, dtype=torch.int64))
            return self.kv_start
        if padding_mask is None:
            if first:
                self._set_start(torch.zeros(B, dtype=torch.int64, device=device))
            return self.kv_start
        pad = padding_of_chunk(padding_mask, q, B, first)
        if first:
            self._set_start(pad.to(device=device, dtype=torch.int64))
        return self.kv_start

    def _set_start(self, pad: torch.Tensor) -> None:
        self.kv_start = pad
        self._start = [int(x) for x in pad.tolist()]
        self._pad = list(self._start)

    def _update_start(self, starts: list[int]) -> None:
        self._start = list(starts)
        self.kv_start = torch.tensor(starts, dtype=torch.int64, device=self.kv_start.device)

    # ------------------------------------------------------- held queries
    @property
    def recent_q(self):
        """``[B, Hq, <= held, D]`` latest queries, oldest first (None: none held)."""
        if self._qbuf is None:
            return None
        if self._qn < self._qbuf.shape[2]:
            return self._qbuf[:, :, : self._qn]
        if self._qpos == 0:
            return self._qbuf
        return torch.cat([self._qbuf[:, :, self._qpos :], self._qbuf[:, :, : self._qpos]], 2)

    def _hold(self, queries, held: int) -> None:
        """Keep the latest ``held`` queries in a ring (a decode step writes one
        row, nothing is concatenated)."""
        q = int(queries.shape[2])
        if self._qbuf is None or q >= held:
            if self._qbuf is None:
                B, Hq, _, D = queries.shape
                self._qbuf = queries.new_empty((B, Hq, held, D))
            m = min(q, held)
            self._qbuf[:, :, :m] = queries[:, :, q - m :]
            self._qpos, self._qn = m % held, m
            return
        for i in range(q):
            self._qbuf[:, :, self._qpos] = queries[:, :, i]
            self._qpos = (self._qpos + 1) % held
        self._qn = min(held, self._qn + q)

    # ------------------------------------------------------------ attention
    def attend(self, query, spec: AttentionSpec):
        """Attention of ``query`` ``[B, Hq, q, D]`` over the held slots."""
        q = int(query.shape[2])
        query_pos = None
        if spec.window is not None:
            query_pos = torch.arange(self.seen - q, self.seen, device=query.device)[None].expand(query.shape[0], q)
        kv_start = self.kv_start if isinstance(self.store, (UniformStore, PackedStore, MiniCacheStore)) else None
        return self.store.attend(query, spec, kv_start=kv_start, query_pos=query_pos)

    # ---------------------------------------------------------- compression
    def _view(self, queries, scaling: float, phase: str) -> LayerView:
        return LayerView(
            layer_idx=self.layer_idx, num_layers=self.num_layers or (self.layer_idx + 1), queries=queries,
            keys=self.store.keys, values=self.store.values, kv_start=self.kv_start, scaling=scaling,
            state=self.state, phase=phase, steps=self.decode_steps if phase == "decode" else 0,
            tokens=self._tokens(self.store.column("positions")), head_state=dict(self.head_state),
            statistic=self._statistic,
        )

    def _tokens(self, positions):
        """Token ids of slots at ``positions`` ``[B, H, n]`` for a method with
        ``needs_tokens`` (else, or when unknown, None)."""
        if not self.method.needs_tokens or self.token_log is None:
            return None
        return self.token_log.lookup(positions)

    def _targets(self, ahead: int = 0) -> list[int]:
        """Slots each batch row may keep (its real tokens seen so far, and
        ``ahead`` decode steps more).

        After ``method.layer_targets`` (``defers_prefill``) a row keeps its
        share of the mean target: exactly the slots it was given while the
        mean stays (``budget=``), the same share of a growing mean
        (``ratio=``), never more than its tokens."""
        L = self.num_layers or (self.layer_idx + 1)
        out = []
        for b, p in enumerate(self._pad):
            real = self.seen - p
            # decode steps are one token each: the prompt is what came before them
            decoded = min(self.decode_steps, real)
            t = self.method.phase_target(self.layer_idx, L, real - decoded, decoded + ahead)
            if self._scale is not None and t < real:
                t = min(real, max(1, int(round(t * self._scale[b]))))
            if self._inflate is not None:
                t = min(real, int(math.ceil(t * self._inflate)))
            out.append(t)
        return out

    def _target_cap(self) -> int:
        """The most slots a row of this layer may keep while decoding (the
        largest target: a long prompt, then a long generation)."""
        L = self.num_layers or (self.layer_idx + 1)
        t = self.method.phase_target(self.layer_idx, L, 1 << 40, 1 << 40)
        return t if self._scale is None else max(int(round(t * k)) for k in self._scale)

    def _decode_cap(self) -> int:
        """Slots a uniform layer's buffers need until its next decode-time
        compression: the largest row target ``interval`` steps from now plus
        the ``interval`` slots appended meanwhile. A budget's target is fixed
        (the largest one it ever reaches); a ratio's grows with the tokens
        seen, so its cap is renewed at every compression instead of leaving
        the buffer's usual growth step (32 slots, 30% of a 100-slot head)."""
        ahead = self.method.interval
        if self.method.budget is not None:
            return self._target_cap() + ahead
        return max(self._targets(ahead), default=0) + ahead

    def set_layer_targets(self, targets: list[int] | None) -> None:
        """Keep ``targets[b]`` slots per head in row ``b`` from now on (the
        cache calls it with ``method.layer_targets``' answer; None: the
        method's mean target)."""
        if targets is None:
            self._scale = None
            return
        L = self.num_layers or (self.layer_idx + 1)
        scale = []
        for t, p in zip(targets, self._pad):
            mean = self.method.row_target(self.layer_idx, L, self.seen - p)
            scale.append(float(t) / mean if mean > 0 else 1.0)
        self._scale = scale

    def _held(self) -> list[int]:
        """Real slots each batch row of a uniform store holds."""
        return [self.store.n - s for s in self._start]

    @staticmethod
    def _groups(rows: list[int], targets: list[int], device):
        """Rows to compress grouped by target: ``(target, rows, row index
        tensor)``, so each group is one sub-batch call of the method."""
        for t in sorted({targets[b] for b in rows}):
            group = [b for b in rows if targets[b] == t]
            yield t, group, torch.tensor(group, device=device)

    def compress_after(self, queries, scaling: float) -> None:
        """:meth:`after_attention`, except that with ``method.lookahead`` a
        full-attention layer holds a prefill chunk's queries
        (a later chunk joins them: they stay the queries of the last slots)
        and compresses at the next decode step, after its attention, with
        those queries and the step's own as one chunk of the prefill plus one
        token."""
        if not self.method.lookahead or self.window is not None or queries is None:
            self.after_attention(queries, scaling)
            return
        # a plain uniform store: no compression has moved the layer elsewhere
        # yet (later ones re-score held slots and gather no statistic)
        first = type(self.store) is UniformStore
        chunk = int(queries.shape[2]) > 1
        if not chunk and self.method.lookahead_room is not None and (
                self._room_pending or (self._waiting is not None and not first)):
            self._leave_room(queries, scaling)
            return
        if not chunk and self._waiting is None:
            self.after_attention(queries, scaling)  # an ordinary decode step
            return
        if first and (chunk or self._statistic is not None):
            # every held chunk, then the decode step's query, folds into the statistic
            self._statistic = self.method.lookahead_statistic(self._view(queries, scaling, "prefill"),
                                                              self._statistic)
        if chunk:
            held = queries if self._waiting is None else torch.cat([self._waiting, queries], 2)
            keep = self.method.deferred_queries()
            if keep is not None and keep < int(held.shape[2]):
                held = held[:, :, -keep:].clone()  # a copy: a view would keep every query alive
            self._waiting = held
            if first and self.method.lookahead_room is not None:
                self._compress_in_room(scaling)
            return
        queries = torch.cat([self._waiting, queries], 2)
        self._waiting = None
        self.last_chunk = int(queries.shape[2])  # a prefill-phase compression of every held query
        try:
            self.after_attention(queries, scaling)
        finally:
            self.last_chunk = 1
            self._statistic = None

    def _compress_in_room(self, scaling: float) -> None:
        """``lookahead_room``: a layer whose rows hold more than the room
        (``lookahead_room`` times their targets) is compressed now, by the
        method's prefill rules with the statistic of every query so far, to
        the room; the first decode step finishes the job (:meth:`_leave_room`)."""
        self._inflate = float(self.method.lookahead_room)
        try:
            fits = [h <= t for h, t in zip(self._held(), self._targets())]
            if all(fits):
                return  # the prompt fits in the room: it waits whole, as with lookahead alone
            starts, waiting, statistic = list(self._start), self._waiting, self._statistic
            self.after_attention(self._waiting, scaling)
        finally:
            self._inflate = None
        self._waiting = self._statistic = None
        self._room_pending = type(self.store) is not UniformStore
        if self._room_pending and any(fits):
            # a row that fits its room waits whole, as alone, where its layer stays uniform and its
            # first decode step compresses it with every held query and the statistic
            self._room_whole = {b: (waiting[b : b + 1],
                                    None if statistic is None else statistic[b, :, starts[b]:].clone())
                                for b, f in enumerate(fits) if f}

    def _leave_room(self, queries, scaling: float) -> None:
        """The first decode step after a ``lookahead_room`` compression (or
        after a later turn's chunk, held meanwhile): the step's query joins
        the held ones and every head goes to its share of the row's target,
        with the slots that query reads most forced in."""
        step = queries
        if self._waiting is not None:
            queries = torch.cat([self._waiting, queries], 2)
            self._waiting = None
        self._room_pending = False
        self._hold(queries, self.method.held_queries())
        whole, self._room_whole = self._room_whole, None
        if self.head_budgets is None:
            return
        self._follow_targets(self._targets())
        if whole:
            self._compress_whole_rows(step, scaling, sorted(whole), room=whole)
            others = [b not in whole for b in range(self.store.batch)]
            if any(others):
                self._recompress_heads(scaling, local=True, rows=others)
            return
        self._recompress_heads(scaling, local=True)

    def after_attention(self, queries, scaling: float) -> None:
        """Compress once the layer's attention has run on ``queries``
        ``[B, Hq, q, D]`` (None for attention functions that are not ours)."""
        method = self.method
        if isinstance(self.store, SharedStore):
            return  # KVSharer: the source layer compresses (and packs) the slots this layer reads
        if method.packing is not None and self.window is None and method.cross_layer is not None:
            # MiniCache + KIVI: a merged pair is packed by the cache when it is
            # merged (its tail stays full precision), and a paired layer waits
            # for that (KVCache._merge_pair packs it as KIVI would when the
            # pair is not merged)
            mc = method.cross_layer
            if isinstance(self.store, MiniCacheStore):
                return
            if type(self.store) in (UniformStore, RaggedStore) and mc.in_pair(self.layer_idx, self.num_layers or 0):
                if method.evicts and type(self.store) is UniformStore:
                    self._compress(queries, scaling)  # an evictor first keeps its slots, as without the pair
                return
        if method.packing is not None and self.window is None:
            # Quantized layers: the first chunk is evicted or merged by the
            # method it composes with (if any, with its own prefill rules),
            # then moves into a packed store (its attention ran in full
            # precision); every later call packs the residual's whole groups,
            # and a layer that keeps its evictor's budget (_repacks) is
            # re-compressed and packed again once over it (_repack_round).
            self._gather_feedback(queries)
            if not isinstance(self.store, PackedStore):
                if method.evicts:
                    self._compress(queries, scaling)  # a demoting quantizer packs here (_demote)
                if not isinstance(self.store, PackedStore):
                    self._to_packed(method.packing, queries, scaling)
                self._drop_covered_ring()  # no row holds more than its target now
            elif self._rebudget:
                self._queue(queries)
                if self._over_budget():
                    self._repack_round(scaling, queries)
            self._settle(queries, scaling)
            return
        if method.packing is not None and self.window is not None and self._packs_window():
            # A sliding-window layer under a quantizer: it keeps the same
            # recent slots as unpacked (_slide), packed as on the other layers
            # (the prompt's attention ran in full precision). Whole key groups
            # leave once no later query sees them; the older slots of the
            # oldest group stay packed and attention masks them.
            self._gather_feedback(queries)
            if not isinstance(self.store, PackedStore):
                self._slide()
                self._to_packed(self._packing(), queries, scaling)
            # per row: a row whose target keeps fewer slots than another's sees fewer (_slide)
            keeps = self._window_keeps()
            first_visible = self.seen - keeps[0] if len(set(keeps)) == 1 else [self.seen - k for k in keeps]
            # a row packs its first group where its layer alone is packed (_packs_window): a row
            # shorter than residual + group, or whose ratio target is still smaller, waits
            self.store.first_pack_rows = self._window_ready(keeps)
            if self.store._np is not None:
                # row mode: a row packs only from the slots it still sees, as its layer alone holds no others
                self._drop_unseen(first_visible)
            self._settle(queries, scaling)
            self._drop_unseen(first_visible)
            return
        if self.window is not None and self._window_packable():
            # a sliding layer that keeps too few slots to pack yet (a short target that grows while
            # decoding) holds the queries its first pack's choices read, as a packed layer does
            self._hold_choice_queries(queries)
        before = self.store
        self._compress(queries, scaling)
        if self.window is None and type(self.store) in (UniformStore, RaggedStore):
            # a query-aware reader takes the layer's kept slots (all of them,
            # or what the evictor kept) once the method has compressed them,
            # and again after a per-head layer is re-compressed into a new
            # store; sliding layers hold only their window and read it whole
            self._to_reader(method, before)

    def _packs_window(self) -> bool:
        """Whether this sliding-window layer keeps its slots packed: once it
        is packed; before that, under a quantizer that does not demote (mixed
        precision keeps sliding layers whole, unscored), read sparsely or go
        with a cross-layer method (``depth``), when the layer keeps more
        slots than the residual plus a group (else the full-precision
        residual would hold more than the unpacked layer), and unless the
        quantizer leaves windows unpacked (``KIVI(pack_windows=False)``)."""
        if isinstance(self.store, PackedStore):
            return True
        return self._window_packable() and any(self._window_ready())

    def _window_ready(self, keeps: list[int] | None = None) -> list[bool]:
        """Per row whether its sliding-window layer alone keeps enough slots
        to be packed (``keeps``: :meth:`_window_keeps`, computed if None):
        more than ``residual + group``, else the full-precision residual
        would hold more than the unpacked layer."""
        _, group, residual, _ = self.method.packing
        return [k > residual + group for k in (self._window_keeps() if keeps is None else keeps)]

    def _window_packable(self) -> bool:
        """Whether this sliding-window layer packs once it keeps enough slots
        (:meth:`_packs_window`'s rule but for the count): its window can
        hold more than ``residual + group`` of them."""
        method = self.method
        if method.packing is None:
            return False
        _, group, residual, _ = method.packing
        return (not method.mixed_precision and not method.reads_sparsely and method.depth is None
                and bool(method.packs_windows) and self.window - 1 > residual + group)

    def _packing(self) -> tuple[int, int, int, int]:
        """``(bits, group, residual, value_bits)`` this layer packs with: the
        method's, or on a sliding-window layer the width of
        ``KIVI(pack_windows=2|4|8)``."""
        return self.method.packing if self.window is None else self.method.window_packing

    def _drop_unseen(self, first_visible) -> None:
        """A packed sliding-window layer forgets what no later query sees
        (``PackedStore.drop_unseen``; ``first_visible``: a token position, or
        one per row) and its ``kv_start`` moves by what left every row."""
        self.store.visible_from = first_visible
        dropped = self.store.drop_unseen(first_visible)
        if dropped:
            self._update_start([max(0, s - dropped) for s in self._start])

    def _window_keep(self) -> int:
        """Slots a sliding-window layer keeps: its most recent ``min(window -
        1, target)``, the most any row keeps (see :meth:`_slide`)."""
        return max(self._window_keeps())

    def _window_keeps(self) -> list[int]:
        """Per row the slots its sliding-window layer keeps alone: its most
        recent ``min(window - 1, target)`` (``[window - 1]`` before any row).
        Mixed precision (LowBits, MiKV, ZipCache) keeps what its evictor would
        drop, and scores no sliding layer: such a layer keeps its whole
        window, in full precision, whatever the target."""
        targets = self._targets()
        if self.method.mixed_precision:
            return [self.window - 1] * len(targets) or [self.window - 1]
        return [max(1, min(self.window - 1, t)) for t in targets] or [self.window - 1]

    def _to_reader(self, method: Method, before=None) -> None:
        """Move a full-attention uniform or per-head layer into the store of
        the method's sparse reader, if it has one and this layer is not one
        it keeps dense. ``before`` is the layer's previous store (MagicPIG
        keeps its key center across a re-compression)."""
        ragged = type(self.store) is RaggedStore
        if method.paging is not None:
            # Quest: pages with key bounds; decode steps read the pages they need
            budget, page, dense, gqa = method.paging
            if self.layer_idx >= dense:
                self.store = (RaggedPagedStore.from_ragged(self.store, page, budget, gqa) if ragged
                              else PagedStore.from_uniform(self.store, page, budget, gqa))
        elif method.tidal is not None:
            # TidalDecode: selection layers publish each decode step's tokens
            # in the cache's shared state, the layers after them read those
            tidal = method.tidal
            role = tidal.role(self.layer_idx, self.num_layers or (self.layer_idx + 1),
                              sliding=self.shared.get("sliding", ()))
            if role is not None:
                kind = RaggedTidalStore.from_ragged if ragged else TidalStore.from_uniform
                self.store = kind(self.store, role, tidal.token_budget, self.shared, tidal.gqa)
        elif method.lsh is not None and self.layer_idx >= method.lsh.dense_layers:
            # MagicPIG: hash the layer's keys once, then sample at every decode step
            pig = method.lsh
            seed = pig.seed * 1_000_003 + self.layer_idx
            if ragged:
                center = before.center if isinstance(before, RaggedLSHStore) and before.batch == self.store.batch \
                    else None
                self.store = RaggedLSHStore.from_ragged(self.store, pig.K, pig.L, pig.hits, pig.sinks, pig.window,
                                                        seed, center=center)
            else:
                self.store = LSHStore.from_uniform(self.store, pig.K, pig.L, pig.hits, pig.sinks, pig.window, seed,
                                                   kv_start=self.kv_start)

    def _to_packed(self, packing, queries=None, scaling: float | None = None, layout: list | None = None) -> None:
        """Move the layer's slots into the packed store of their layout
        (``queries`` ``[B, Hq, q, D]``: the call's, for ``rotate="auto"``;
        ``layout``: a round's rows that keep their sink block and residual,
        :meth:`_untouched_layout`)."""
        self._rebudget = self._repacks()
        if isinstance(self.store, UniformStore):
            # packs nothing until settle(), before which _settle decides the rotation
            # sliding layers keep no sinks: their window leaves the first tokens behind
            self.store = PackedStore.from_uniform(self.store, *packing, columns=self._rebudget,
                                                  rotation=self._rotation,
                                                  sinks=self.method.fp_sinks if self.window is None else 0,
                                                  value_clip=self._clip)
            # mixed precision with nothing dropped: every slot stays full precision
            self.store.pack_decoded = not self.method.mixed_precision
            self.store.rows_apart = self._rows_apart()
        elif self._rebudget and (self._ragged_choices is not None or self._rounds_choose_apart()):
            # a layer with rounds whose rows choose apart: at its first pack each row chooses as alone,
            # and every later round packs each row with what it chose; a row kept whole chooses at its
            # own first pack (_choose_rows), as a uniform layer of it alone does, or at its first round
            clip = self._value_clip(packing, queries, scaling, defer=True)
            whole = self._whole_rows()
            if self._ragged_choices is None:
                self._ragged_choices = self._choose_ragged_rows(packing, queries, scaling, defer=whole)
            elif None in self._ragged_choices or any(self._weights_later or ()):
                self._ragged_choices = self._round_choices(packing, queries, scaling, whole)
            self._whole_rounds = whole
            self.store = RaggedPackedStore.from_ragged(self.store, *packing, columns=True,
                                                       sinks=self.method.fp_sinks, value_clip=clip,
                                                       row_choices=self._ragged_choices, rows_apart=True,
                                                       whole_rows=self._whole_rounds, row_layout=layout)
            self._ragged_choices = self._sync_row_choices(self._ragged_choices)
        elif self._ragged_rows_apart():
            # a batch that packs once (no rounds): each row chooses its rotation and weights, as alone;
            # a row kept whole packs as alone too, on KIVI's schedule, and chooses at its first pack
            clip = self._value_clip(packing, queries, scaling, defer=True)
            whole = self._whole_rows()
            rows = self._choose_ragged_rows(packing, queries, scaling, defer=whole)
            self.store = RaggedPackedStore.from_ragged(self.store, *packing, columns=False,
                                                       sinks=self.method.fp_sinks, value_clip=clip,
                                                       row_choices=rows, whole_rows=whole)
            # a row that packs nothing yet and had nothing to test chooses before its first pack
            self._sync_row_choices(rows)
        else:
            # deferred, the rotation takes this call's queries at the settle that follows
            rotation = self._key_rotation(packing, queries, scaling, defer=True, hold=False)
            clip = self._value_clip(packing, queries, scaling, defer=True)
            # a layer with rounds: each row keeps its own newest slots in full precision, as alone
            # (a keep_rows round lays each row out as alone too, arrange_rows), and a row no
            # compression has touched packs as a uniform layer of it alone does
            self._whole_rounds = self._whole_rows() if self._rebudget else None
            self.store = RaggedPackedStore.from_ragged(self.store, *packing, columns=self._rebudget,
                                                       rotation=rotation, sinks=self.method.fp_sinks,
                                                       feedback=self._fix_feedback(), value_clip=clip,
                                                       rows_apart=self._rebudget, whole_rows=self._whole_rounds,
                                                       row_layout=layout)
            if self.store.packed_any():
                # short heads packed as part groups before any whole group
                # could be tested: they stay as they are
                if not self._rotation_decided:
                    self._decide_rotation(None)
                if not self._clip_decided:
                    self._decide_clip(False)
        self._kept_whole = None
        if not self._rebudget:
            # nothing is re-scored once packed: per-head budgets and held queries go
            self.head_budgets = self._qbuf = None

    def _ragged_rows_apart(self) -> bool:
        """Whether this per-head layer's rows each choose their rotation and
        key-feedback weights (``_choose_ragged_rows``): a batch of more than
        one row that is packed once, never re-compressed (no rounds), under
        ``rotate="auto"`` or ``feedback=True``, or with a row kept whole
        that packs as alone (:meth:`_whole_rows`)."""
        m = self.method
        return bool(self.store.batch > 1 and not self._rebudget
                    and (m.rotates_keys == "auto" or m.key_feedback or self._whole_rows() is not None))

    def _rounds_choose_apart(self) -> bool:
        """Whether this per-head layer with rounds, packing for the first
        time, lets each row choose its rotation and key-feedback weights
        (``_choose_ragged_rows``): a batch of more than one row under
        ``rotate="auto"`` or ``feedback=True``, nothing decided yet (a layer
        that packed uniform first decided for the batch then)."""
        m = self.method
        return bool(self.store.batch > 1 and (m.rotates_keys == "auto" or m.key_feedback)
                    and not self._rotation_decided and not self._feedback_decided)

    def _whole_rows(self) -> list[bool] | None:
        """Per row whether no compression has taken a slot of it
        (``_kept_whole``: at the prefill the rows the evictor kept whole, at
        a round those of them it left whole, :meth:`_repack_round`), where
        such a row packs as a uniform layer of it alone does
        (``RaggedPackedStore.from_ragged(whole_rows=...)``: KIVI's schedule,
        its full-precision residual its own; a layer with rounds, until its
        first); None where no row is so."""
        w = self._kept_whole
        if w is None or not any(w) or not isinstance(self.store, RaggedStore):
            return None
        return w

    def _rows_apart(self) -> bool:
        """Whether this uniform layer's packed store packs each row of a
        left-padded batch on its own schedule (``PackedStore.rows_apart``),
        so that a row's key groups and pack steps (and on a sliding-window
        layer, the groups it drops) are those it has alone: on a layer that
        packs while decoding, with no cross-layer method or sparse reader.
        A layer with rounds (``_rebudget``) is in row mode from its first
        pack in any batch of more than one row: each row packs again after
        its own rounds, and the rows a round leaves as they were keep their
        packed slots (``PackedStore.adopt_rows``). There
        each row also makes the layer's once-only choices (``rotate``,
        ``clip_values``, ``feedback``) itself, at its own first pack
        (``_choose_rows``), in a padded batch or not. Sliding layers too:
        the kernels mask each row's window (``kv_start`` of the ragged
        layout), in one call on the CPU, in joined calls elsewhere."""
        m = self.method
        return bool(not m.mixed_precision and m.depth is None and m.sparse is None)

    def _settle(self, queries, scaling: float) -> None:
        """Pack the packed store's whole residual groups (``settle``); a
        ``rotate="auto"`` layer that had nothing to pack so far decides its
        rotation first, once the residual overflows (a store that never packs
        while decoding, mixed precision's, holds no queries for it), as the
        other choices. In row mode each row decides at its own first pack
        (``_choose_rows``)."""
        store = self.store
        store.take_sinks(pad=self._start)  # first: the sinks are not among the keys the rotation is tested on
        m = self.method
        if self._rebudget and store.rows_apart:
            # rounds desynchronise the rows even without padding: row mode from the first pack
            store.start_rows(self._start, unpadded=True)
        if (m.rotates_keys or m.value_clip or m.key_feedback) and store.pack_decoded \
                and (store.start_rows(self._start, unpadded=True) or store.rows_to_choose()):
            # row mode (or a per-head layer packed once with a row that packed nothing then):
            # each row chooses at its own first pack, as it does alone
            self._choose_rows(queries, scaling)
            store.settle(pad=self._start)
            return
        if self.method.rotates_keys and not self._rotation_decided and store.pack_decoded and store.batch:
            rotation = self._key_rotation(self._packing(), queries, scaling, defer=True)
            if self._rotation_decided:
                store.set_rotation(rotation)
        if self.method.value_clip and not self._clip_decided and store.pack_decoded and store.batch:
            clip = self._value_clip(self._packing(), queries, scaling, defer=True)
            if self._clip_decided:
                store.set_value_clip(clip)
        if self.method.key_feedback and not store.packed_any() and store.pending() > 0:
            # the weights are fixed just before the store's first pack (in the
            # basis just decided): after a short prompt, the decode steps'
            # queries until then count too
            w = self._fix_feedback()
            if w is not None and store.feedback is not w:
                store.set_feedback(w)
        store.settle(pad=self._start)

    def _repacks(self) -> bool:
        """Whether this layer, once packed, keeps its evictor's budget while
        decoding: an evicting or merging method with a decode interval, on a
        full-attention layer, whose quantizer packs what it keeps (not a
        demoting one: MiKV, ZipCache, LowBits keep the rest at low bits),
        with no cross-layer method or sparse reader beside it."""
        m = self.method
        return bool(m.evicts and m.interval and not m.mixed_precision and m.depth is None and m.sparse is None
                    and self.window is None)

    def _over_budget(self) -> bool:
        """Whether a packed layer that keeps its budget (``_rebudget``) holds
        more than its targets allow: ``interval`` slots over after a decode
        step, one after a prefill chunk (the unpacked layers' rule)."""
        if isinstance(self.store, RaggedPackedStore):
            if self.head_budgets is None:
                return False
            self._refresh_budgets()
            slack = self.method.interval if self.last_chunk == 1 else 1
            return self._heads_over(slack, torch.tensor(self.store.head_lengths(), dtype=torch.int64))
        return any(self._due_rows())

    def _queue(self, queries) -> None:
        """Hold a packed layer's ``queries`` until its next round: all of them
        for a method with slot state (it accumulates their attention), else
        the calls that cover its held queries (none for StreamingLLM)."""
        if queries is None:
            return
        method = self.method
        keep = None if method.slot_state else method.held_queries()
        if keep == 0:
            return
        self._pending.append(queries)
        if keep is None:
            q = int(queries.shape[2])
            self._unseen = [u + q for u in (self._unseen or [0] * int(queries.shape[0]))]
            self._fresh += q
        if keep is not None and len(self._pending) > keep:
            del self._pending[: len(self._pending) - keep]  # each call holds at least one query
        if keep is not None and self._qbuf is not None and sum(int(p.shape[2]) for p in self._pending) >= keep:
            # the next round holds its queries from these alone (_hold overwrites every held row)
            # and nothing reads the ring before it: holding both kept the queries twice
            self._qbuf = None

    def _drop_covered_ring(self) -> None:
        """A packed layer that keeps its budget, with every row at its
        target (after its first pack or a round of every row), gives back its
        ring of held queries: each row's next round is ``interval`` or more
        queries away, all of them pending by then (:meth:`_queue` keeps the
        last ``held_queries()`` calls), and that round holds its queries
        from those alone. (Kept, the ring held them a second time.) The ring
        stays where a method holds more queries than its interval, or a row
        is still whole: its target is its tokens until the budget falls
        below them, and then drops at once (PyramidKV's deep layers), so its
        first round may come after fewer queries."""
        keep = None if self.method.slot_state else self.method.held_queries()
        if not (self._rebudget and keep and keep <= self.method.interval):
            return
        if all(t < self.seen - p for t, p in zip(self._targets(), self._pad)):
            self._qbuf = None

    def _repack_round(self, scaling: float, queries=None) -> None:
        """Re-compress a packed layer to its targets: its slots in full
        precision (the dequantized packed ones: what attention has read), the
        method's re-selection as on an unpacked layer, with the queries since
        the last round (slot state accumulates their attention here rather
        than at each step: the same sums, except that a slot packed since the
        last round is scored with its packed key), then the kept slots packed
        again. A kept slot's values pack to the same codes (a value group is
        one token's channels); its keys do when its key group comes back
        whole, and are re-quantized on the new group's grid otherwise. Behind
        a merging method an old key group with ``KIVI(keep_rows=...)``
        unchanged members keeps its place and its members their codes
        (``stores.keep_rows``). ``queries``: the call's own, for the
        once-only choices a round makes (the earlier calls' are held by
        then; the pending ones counted twice, and a round that another row
        took left fewer of them)."""
        pending = torch.cat(self._pending, 2) if self._pending else None
        self._pending = []
        old = self.store
        unseen, self._unseen = self._unseen, None
        if pending is not None and unseen is not None and type(old) is PackedStore and old.rows_apart:
            # slot state: each row due now accumulates the queries it has not yet accumulated, the
            # others keep theirs for their own round (as alone, where no round came); _observe
            Q = int(pending.shape[2])
            due = self._due_rows()
            self._round_observe = (pending, unseen, due)
            left = max((u for u, d in zip(unseen, due) if not d), default=0)
            if left:
                self._pending = [pending[:, :, Q - left :]]
                self._unseen = [0 if d else u for u, d in zip(unseen, due)]
            # what the held queries have not taken yet
            pending = pending[:, :, Q - self._fresh :] if self._fresh else None
        self._fresh = 0
        if self._ragged_choices is not None and isinstance(old, RaggedPackedStore):
            # a row kept whole that chose at its own first pack since (_choose_rows) packs with that
            for b, c in enumerate(self._ragged_choices):
                if c is None and old._choices is not None and old._choices[b] is not None:
                    rotated, tri, _ = old._choices[b]
                    self._ragged_choices[b] = (old.rotation if rotated else None, tri)
        # the rows no compression has taken a slot of: those this round leaves whole stay so
        was = self._whole_rounds if isinstance(old, RaggedPackedStore) else None
        before = old.head_lengths() if was is not None else None
        min_live = self.method.round_keeps_rows
        rows = None
        if min_live and isinstance(old, RaggedPackedStore):
            # arrange_rows reads the rows unpacked() reads: dequantized once
            rows = old._dequantized_rows()
            self.store = old.unpacked(rows)
        else:
            self.store = old.unpacked()
        # the round's first compression of a whole row is the one it makes alone (_first_compressions)
        self._kept_whole = was
        self._round_rows = None
        self._compress(pending, scaling)
        self._round_observe = None  # (taken by _compress's _observe)
        if self._round_rows is None or all(self._round_rows):
            self._drop_covered_ring()
        if was is not None and type(self.store) is RaggedStore:
            now, H = self.store.head_lengths(), self.store.heads
            self._kept_whole = [w and now[b * H : (b + 1) * H] == before[b * H : (b + 1) * H]
                                for b, w in enumerate(was)]
        if (type(old) is PackedStore and old._choices is not None and type(self.store) is RaggedStore
                and self._ragged_choices is None):
            # a uniform layer in row mode goes per-head: each row keeps the choices it made at its
            # first pack (None: not packed yet, it chooses at its own), as alone, where its layer
            # made them for it and keeps them
            self._ragged_choices = [None if c is None else (old.rotation if c[0] else None, c[1])
                                    for c in old._choices]
            # the layer's own choices serve no row (as after _choose_ragged_rows); a row that has
            # not chosen keeps its held queries for its own first pack
            held = self._rot_q
            self._decide_rotation(None)
            self._feedback, self._qmom = None, None
            if None in self._ragged_choices:
                self._rot_q = held
            else:
                self._feedback_decided, self._row_qmom = True, None
        layout = None
        if isinstance(old, RaggedPackedStore) and type(self.store) is RaggedStore:
            layout = self._untouched_layout(old)
        if rows is not None and type(self.store) is RaggedStore:
            # the old key groups that come through whole enough keep their
            # codes (stores.keep_rows); the rest is packed afresh
            # each row as alone: its own residual, its own groups kept or not
            # (a row the round left as it was keeps its layout, below; a row
            # whole until now packed as a uniform store, which alone keeps no groups)
            only = [(layout is None or layout[b] is None) and not (was and was[b]) for b in range(old.batch)]
            arranged = arrange_rows(old, self.store, min_live, rows, only=None if all(only) else only)
            if arranged is not None:
                self.store = arranged
        # the once-only choices made now take this call's queries (``queries``) beside the ones each
        # settle held: the pending ones are held already, and a round another row took cleared them
        self._to_packed(self.method.packing, queries, scaling, layout=layout)
        if type(old) is PackedStore and type(self.store) is PackedStore:
            if old._np is not None:
                # a uniform layer's rows the round left as they were keep their packed slots bit for
                # bit, and every row its once-only choices; the others pack at this step's settle
                due = self._round_rows or [True] * old.batch
                self.store.adopt_rows(old, [not d for d in due], self._start)
            else:
                # a round before the store entered row mode again (rounds of other rows on consecutive
                # steps): nothing packed to adopt, but every row keeps the choices it made (if any)
                self.store.carry_choices(old)
        if layout is not None:
            # those rows bit for bit as they were (not packed again from their dequantized slots)
            self.store.adopt_rows(old, [x is not None for x in layout])
        if type(old) is PackedStore and old._np is not None and isinstance(self.store, RaggedPackedStore):
            # a uniform layer in row mode went per-head: the rows this round left whole keep their
            # packed slots bit for bit (alone their layer is still that uniform store)
            whole = self._whole_rounds or [False] * old.batch
            self.store.adopt_uniform_rows(old, [w and not d for w, d in zip(whole, self._round_rows or whole)])

    def _untouched_layout(self, old) -> list | None:
        """Per row of a per-head packed layer's round, ``(sink slots, own
        residual slots)`` of ``old`` for a row the round left as it was (not
        due, :meth:`_recompress_heads`; a row kept whole too), else None;
        None when no row is so. Alone such a row's layer has no round now:
        its slots stay where they are, the newest ones in full precision
        until its residual fills (a row kept whole: a uniform layer's, until
        this step's settle)."""
        due = self._round_rows
        if due is None or all(due) or not old._rcols:
            return None
        sinks, own = old._row_sinks(), old._own_residual()
        # the row is adopted after (adopt_rows): its slots' order in unpacked() does not matter (a
        # keep_rows layout whose residual is older than a kept group comes back in token order)
        layout = [None if d or layout_problem(self.store, b, (sinks[b], own[b]), self.method.fp_sinks,
                                              adopted=True)
                  else (sinks[b], own[b]) for b, d in enumerate(due)]
        return None if all(x is None for x in layout) else layout

    def _compress(self, queries, scaling: float) -> None:
        """Evict or merge down to the method's targets (prefill and decode)."""
        method = self.method
        phase = "prefill" if self.last_chunk > 1 else "decode"
        uniform = isinstance(self.store, UniformStore)
        if uniform:
            for name in method.slot_state:
                self.store.add_column(name)
            if method.slot_state:
                self._observe(queries, scaling, phase)
        if uniform and method.budget is not None and self.store.limit is None:
            # decoding never needs more than the budget plus the slack
            self.store.limit = self._decode_cap()
        # sliding layers never re-score (they keep their most recent slots)
        held_q = method.held_queries() if method.interval and self.window is None else 0
        if held_q and queries is not None:
            self._hold(queries, held_q)
        if self.window is not None:
            self._slide()
            return
        if not uniform:
            # per-head layers keep each head's share; a prefill chunk
            # (multi-turn) re-compresses at once, decoding every interval
            if self.head_budgets is None:
                # compressed once (no interval): a row kept whole is still compressed the first
                # time by a later chunk, as its uniform layer alone is
                if phase == "prefill" and queries is not None and self._kept_whole is not None:
                    H, held, targets = self.store.heads, self.store.head_lengths(), self._targets()
                    firsts = [b for b, w in enumerate(self._kept_whole) if w and held[b * H] > targets[b]]
                    if firsts:
                        self._compress_whole_rows(queries, scaling, firsts)
                return
            self._refresh_budgets()
            over = self._rows_over(method.interval if phase == "decode" else 1)
            due = list(over)
            if phase == "prefill" and queries is not None and self._kept_whole is not None:
                # a later chunk (a second turn) takes a row kept whole over its target for the
                # first time: alone its layer is still uniform and compresses it with the chunk's
                # queries, as a prompt; the rows compressed before re-compress head by head
                firsts = [b for b, o in enumerate(over) if o and self._kept_whole[b]]
                if firsts:
                    self._compress_whole_rows(queries, scaling, firsts)
                    over = [o and b not in firsts for b, o in enumerate(over)]
            if any(over):
                self._recompress_heads(scaling, rows=over)
            if any(due):
                self._round_rows = due  # every row compressed now (a packed layer's round adopts the others)
            return
        if phase == "decode" and not method.interval:
            return
        targets = self._targets()
        # while decoding, the rows over their targets by the interval, each
        # on its own schedule as alone (a row that reached its target later
        # than the others waits for its own interval)
        due = self._due_rows(targets)
        if phase == "decode" and not any(due):
            return
        if method.ratio is not None:
            # a ratio's target grows: renewed at each compression, not each step
            self.store.limit = self._decode_cap()
        if not any(due):
            return
        rows = [b for b, d in enumerate(due) if d]
        view = self._view(queries if phase == "prefill" else self.recent_q, scaling, phase)
        self._round_rows = due
        if method.merges:
            if phase == "prefill":
                self._compact(view, rows, targets)
            else:
                self._to_ragged(targets)
                self._recompress_heads(scaling, rows=due)
        else:
            self._select(view, rows, targets)

    def _due_rows(self, targets: list[int] | None = None) -> list[bool]:
        """Per row whether :meth:`_compress` compresses it now: over its
        target (``targets``, default :meth:`_targets`) by the interval while
        decoding, by one slot at a prefill chunk."""
        over = self.method.interval - 1 if self.last_chunk == 1 else 0
        targets = self._targets() if targets is None else targets
        return [h > t + over for h, t in zip(self._held(), targets)]

    def _observe(self, queries, scaling: float, phase: str) -> None:
        """The method's slot state accumulates ``queries``; at a uniform
        packed layer's round (``_round_observe``, set by :meth:`_repack_round`)
        only the rows due, each with its own pending queries."""
        obs, self._round_observe = self._round_observe, None
        if obs is None:
            self.method.observe(self._view(queries, scaling, phase))
            return
        pending, unseen, due = obs
        Q, view = int(pending.shape[2]), self._view(None, scaling, phase)
        counts: dict[int, list[int]] = {}
        for b, (u, d) in enumerate(zip(unseen, due)):
            if d and u:
                counts.setdefault(u, []).append(b)
        for u, rows in counts.items():
            idx = torch.tensor(rows, dtype=torch.int64, device=pending.device)
            sub = replace(view.rows(idx), queries=pending.index_select(0, idx)[:, :, Q - u :])
            self.method.observe(sub)
            for name, t in sub.state.items():
                view.state[name].index_copy_(0, idx.to(t.device), t)

    def _slide(self) -> None:
        """A sliding-window layer keeps its most recent ``min(window - 1,
        target)`` slots: the window is all its attention can see, and the
        method's target shrinks it further (recent tokens only: a local layer
        is a StreamingLLM layer without sinks). Per row: the store keeps the
        most any row keeps, and a row whose own target keeps fewer (``ratio=``
        over rows of other lengths) masks its older slots as leading ones, as
        alone it drops them."""
        keeps = self._window_keeps()
        keep = max(keeps)
        drop = self.store.n - keep
        starts = self._start
        if drop > 0:
            self.store.drop_front(drop)
            starts = [max(0, s - drop) for s in starts]
        n = self.store.n
        starts = [max(s, n - k) for s, k in zip(starts, keeps)]
        if starts != self._start:
            self._update_start(starts)
        # Dropping moves a start offset; the buffer is rewritten once its
        # slack is used up, every `slack` steps. A buffer far larger than the
        # window (the prompt's) is given back at once.
        slack = max(1, min(16, self.window // 8))
        self.store.limit = keep + slack
        if self.store.capacity > keep + 2 * slack:
            self.store.shrink(keep + slack)

    def _select(self, view: LayerView, rows: list[int], targets: list[int]) -> None:
        """Evicting methods: rows in ``rows`` keep ``method.select``'s slots,
        the others every real slot."""
        B, H, n = (int(x) for x in view.keys.shape[:3])
        device = view.keys.device
        picked: dict[int, torch.Tensor] = {}
        for t, group, gidx in self._groups(rows, targets, device):
            sub = view.rows(gidx)
            idx = self.method.select(sub, t)
            for i, b in enumerate(group):
                picked[b] = idx[i]
            self._keep_head_state(sub.head_state, gidx, B, H)
        per_row = []
        for b in range(B):
            if b in picked:
                per_row.append(picked[b])
            else:
                per_row.append(torch.arange(self._start[b], n, device=device).expand(H, -1))
        if self.method.headwise:
            K = max(int(r.shape[1]) for r in per_row)
            full = torch.full((B, H, K), -1, dtype=torch.int64, device=device)
            for b, r in enumerate(per_row):
                full[b, :, : r.shape[1]] = r
            start = self.kv_start
            positions = self.store.column("positions")
            store = RaggedStore.from_selection(view.keys, view.values, positions, full, start)
            self._become_ragged(store, targets, picked)
            return
        if self.method.mixed_precision:
            self._demote(view, per_row, [b in picked for b in range(B)])
            return
        indices, fill = _fill_front(per_row, H, device)
        self.store.keep(indices)
        self._update_start(fill)

    def _keep_head_state(self, state: dict, rows: torch.Tensor, B: int, H: int, into: dict | None = None) -> None:
        """Store what a method wrote into a sub-batch view's ``head_state``
        (``[len(rows), H]``) at rows ``rows`` of the layer's (-1 elsewhere),
        or of ``into`` (``[B, H]`` tensors by name) where given."""
        into = self.head_state if into is None else into
        for name, v in state.items():
            full = into.get(name)
            if full is None or tuple(full.shape) != (B, H):
                full = torch.full((B, H), -1, dtype=torch.int64, device=v.device)
            full = full.clone()
            full[rows.to(v.device)] = v.to(torch.int64)
            into[name] = full

    def _demote(self, view: LayerView, per_row: list, compressed: list[bool]) -> None:
        """Mixed precision (``LowBits``, ``MiKV``, ``ZipCache``): each row's
        selected slots ``per_row[b]`` ``[H, k_b]`` stay in full precision (or
        are packed at the quantizer's ``high_bits``), its other real slots are
        packed at its ``bits``. A row the evictor left whole
        (``compressed[b]`` False) keeps every slot in full precision, as alone.

        One row is :meth:`PackedStore.from_split`'s layout. In a batch of
        more than one row each row is split as alone
        (:meth:`PackedStore.from_split_rows`, row mode): its own selected
        count, its low part's key groups from its own first low slot."""
        B, H, n = (int(x) for x in view.keys.shape[:3])
        device = view.keys.device
        bits, group, _, value_bits = self.method.packing
        rotated = None
        if B > 1 and self.method.rotates_keys == "auto" and not self._rotation_decided:
            rotation, rotated = self._split_rotations(view, compressed)
        else:
            rotation = self._key_rotation(self.method.packing, view.queries, view.scaling)
        # each row's real slots the evictor did not select, in token order
        ar = torch.arange(n, device=device).expand(H, n)
        low = []
        for b in range(B):
            if not compressed[b]:
                low.append(None)
                continue
            other = torch.ones((H, n), dtype=torch.bool, device=device)
            other[:, : self._start[b]] = False
            other.scatter_(1, per_row[b].to(device), False)
            low.append(ar[other].view(H, -1))
        full = [torch.sort(r.to(device), 1).values for r in per_row]
        high_bits = self.method.quant.high_bits
        if B > 1 or low[0] is None:
            self.store = PackedStore.from_split_rows(view.keys, view.values, full, low, compressed, bits, group,
                                                     high_bits=high_bits, value_bits=value_bits,
                                                     rotation=rotation, rotated=rotated)
            self._update_start(self.store._pads)
            return
        self.store = PackedStore.from_split(view.keys, view.values, full[0][None], low[0][None], bits, group,
                                            high_bits=high_bits, value_bits=value_bits, rotation=rotation)
        self._update_start([0])  # (a padded row's padding is not stored)

    def _compact(self, view: LayerView, rows: list[int], targets: list[int]) -> None:
        """Merging methods at prefill: compressed rows get ``method.compact``'s
        merged slots, the others every real slot (count 1, not scored yet)."""
        B, H, n = (int(x) for x in view.keys.shape[:3])
        device = view.keys.device
        positions = self.store.column("positions")
        parts: dict[int, tuple] = {}
        for t, group, gidx in self._groups(rows, targets, device):
            centers, merged, carried = self.method.compact(view.rows(gidx), t)
            pos = positions.index_select(0, gidx).gather(2, centers.clamp_min(0))
            for i, b in enumerate(group):
                parts[b] = (merged.keys[i], merged.values[i], pos[i], centers[i] >= 0, merged.counts[i].float(),
                            carried[i].float())
        C = max([int(p[0].shape[1]) for p in parts.values()] + [n - self._start[b] for b in range(B) if b not in parts])
        D, Dv = int(view.keys.shape[3]), int(view.values.shape[3])
        keys = view.keys.new_zeros((B, H, C, D))
        values = view.values.new_zeros((B, H, C, Dv))
        pos = positions.new_zeros((B, H, C))
        valid = torch.zeros((B, H, C), dtype=torch.bool, device=device)
        counts = torch.ones((B, H, C), device=device)
        carried = torch.full((B, H, C), float("nan"), device=device)
        for b in range(B):
            if b in parts:
                k, v, p, ok, c, s = parts[b]
                m = int(k.shape[1])
                keys[b, :, :m], values[b, :, :m], pos[b, :, :m], valid[b, :, :m] = k, v, p, ok
                counts[b, :, :m], carried[b, :, :m] = c, s
            else:
                m = n - self._start[b]
                keys[b, :, :m] = view.keys[b, :, self._start[b]:]
                values[b, :, :m] = view.values[b, :, self._start[b]:]
                pos[b, :, :m] = positions[b, :, self._start[b]:]
                valid[b, :, :m] = True
        interval = self.method.interval
        store = RaggedStore.from_dense(keys, values, pos, valid, counts=counts,
                                       scores=carried if interval else None, slack=interval)
        self._become_ragged(store, targets, parts)

    def _become_ragged(self, store: RaggedStore, targets: list[int], compressed) -> None:
        """Switch to per-head storage. Compressed rows keep the share each head
        got as their decode budget; rows kept whole may grow to their target
        (their targets grow with their tokens, :meth:`_refresh_budgets`)."""
        if self.state:
            raise NotImplementedError("per-slot method state on per-head storage")
        B, H = store.batch, store.heads
        lengths = torch.tensor(store.head_lengths(), dtype=torch.int64).view(B, H)
        for b in range(B):
            if b not in compressed:
                # its target: at a decode round a row may hold up to interval - 1 slots over it, and
                # it is due once over by the interval, as alone (its own length would delay that)
                lengths[b] = targets[b]
        self.store = store
        self._kept_whole = [b not in compressed for b in range(B)]
        # without a decode interval the layer is compressed once, at prefill
        self._set_shares(lengths, targets)
        self._update_start([0] * B)

    def _set_shares(self, budgets: torch.Tensor, targets: list[int]) -> None:
        """Remember each head's share of its row's target (``budgets`` ``[B, H]``
        host int64), so the per-head budgets follow the target as it moves
        (``ratio=``; a row kept whole, :meth:`_refresh_budgets`) and sum to
        ``H * target``."""
        if not self.method.interval:
            self.head_budgets = None
            return
        t = torch.tensor(targets, dtype=torch.float64).clamp_min(1)[:, None]
        self._share = budgets.double() / t
        self._budgets_host = budgets.reshape(-1).clone()
        self.head_budgets = budgets.to(self.store.k.device)
        self._budget_targets = list(targets)

    def _refresh_budgets(self) -> None:
        """Per-head budgets for the rows' current targets whenever one has
        moved (:meth:`_follow_targets`): a ratio's grows with every token,
        and under a budget a row the prefill kept whole (its target then:
        its tokens) grows with every token until it reaches the budget, as
        it does alone, where its layer is not compressed before that."""
        targets = self._targets()
        if targets != self._budget_targets:
            self._follow_targets(targets)

    def _follow_targets(self, targets: list[int]) -> None:
        """Per-head budgets for the rows' current targets: the shares times the
        target, rounded so that each row's heads sum to ``H * target``."""
        H = self.store.heads
        t = torch.tensor(targets, dtype=torch.float64)[:, None]
        want = self._share * t
        base = want.floor()
        extra = (t[:, 0] * self._share.sum(1) - base.sum(1)).round().long()
        order = (want - base).argsort(dim=1, descending=True, stable=True)
        bonus = torch.zeros_like(base).scatter_(1, order, (torch.arange(H)[None, :] < extra[:, None]).double())
        budgets = (base + bonus).long()
        self._budgets_host = budgets.reshape(-1)
        self.head_budgets = budgets.to(self.head_budgets.device)
        self._budget_targets = list(targets)

    def _to_ragged(self, targets: list[int]) -> None:
        """Move every real slot of a uniform layer to per-head storage."""
        keys, values = self.store.keys, self.store.values
        B, H, n = (int(x) for x in keys.shape[:3])
        valid = (torch.arange(n, device=keys.device)[None, None, :] >= self.kv_start[:, None, None]).expand(B, H, n)
        ones = torch.ones(valid.shape, device=keys.device)
        store = RaggedStore.from_dense(keys, values, self.store.column("positions"), valid,
                                       counts=ones if self.method.merges else None,
                                       scores=ones * float("nan") if self.method.merges else None)
        self.store = store
        self._set_shares(torch.tensor(targets, dtype=torch.int64).repeat_interleave(H).view(B, H), targets)
        self._update_start([0] * B)
        # no compression has taken a slot of any row yet (a prefill that compressed one went per-head
        # then, _compact): the re-compression that follows takes the rows due, the others stay whole
        # (a packed layer lays them out as alone, where their layer is still uniform: _whole_rows)
        self._kept_whole = [True] * B

    def _heads_over(self, slack: int, held=None) -> bool:
        """Whether a head holds ``slack`` slots over its budget (host-side
        lengths and budgets: no device synchronisation). ``held``: int64
        ``[B * H]`` slots per head, default the per-head store's lengths."""
        return any(self._rows_over(slack, held))

    def _rows_over(self, slack: int, held=None) -> list[bool]:
        """Per batch row whether one of its heads holds ``slack`` slots over
        its budget (see :meth:`_heads_over`)."""
        held = self.store._host_lengths if held is None else held
        over = (held - self._budgets_host >= slack).view(-1, self.store.heads).any(1)
        return over.tolist()

    def _recompress_heads(self, scaling: float, local: bool = False, rows: list[bool] | None = None) -> None:
        """Re-compress a per-head layer to ``head_budgets`` slots per head, one
        row per head: merging methods re-merge (``method.recompact``), the
        others re-select with the latest queries and their state. ``local``:
        the newest query's picks are forced in (``lookahead_room``).
        ``rows`` (per batch row, None: all): the rows re-compressed now, those
        over their budgets by the interval; the others keep their slots and
        state as they are, as each would alone, where its layer is not
        re-compressed before its own heads are over."""
        store = self.store
        B, H = store.batch, store.heads
        self._round_rows = rows
        state_before = dict(self.head_state)
        keys, values, pos, counts, carried, start = store.to_padded()
        lengths = torch.tensor(store.head_lengths(), dtype=torch.int64, device=keys.device)
        budgets = torch.minimum(self.head_budgets.reshape(-1), lengths)[:, None]
        q = self.recent_q
        queries = None if q is None else q.reshape(B * H, q.shape[1] // H, q.shape[2], q.shape[3])
        first = self._first_compressions(rows)
        targets = self._targets() if first else None
        due = [True] * B if rows is None else list(rows)
        # The method runs on the rows due only, as each runs alone: a call takes its smallest budget
        # for what every head keeps first (EMS's and KVMerger's window and sinks, select's forced
        # slots), where alone a row takes its own heads'. Due rows whose smallest budgets differ
        # are re-compressed in calls of their own; the others keep their slots and state.
        row_min = budgets.view(B, H).min(1).values.tolist()
        groups: dict[int, list[int]] = {}
        for r in range(B):
            if due[r]:
                groups.setdefault(int(row_min[r]), []).append(r)
        if not groups:
            return
        # token ids are looked up for the whole batch (the log's rows are the layer's)
        tokens = self._tokens(pos.view(B, H, -1)) if not self.method.merges else None
        tokens = None if tokens is None else tokens.reshape(B * H, -1)
        padded = (queries, keys, values, pos, counts, carried, start, budgets, tokens)
        made, states = {}, {}
        for members in groups.values():
            if len(members) == B:
                part_in = padded
            else:
                sel = torch.tensor([r * H + h for r in members for h in range(H)], dtype=torch.int64,
                                   device=keys.device)
                part_in = tuple(None if t is None else t.index_select(0, sel.to(t.device)) for t in padded)
            before = {k: v[members] for k, v in state_before.items()}
            part, state = self._recompress_call(members, *part_in, scaling, local,
                                                [i for i, r in enumerate(members) if r in first], targets, before)
            for i, r in enumerate(members):
                made[r], states[r] = (part, i), state
        if len(groups) == 1 and all(due):
            new, self.head_state = made[0][0], dict(states[0])
        else:
            new = pick_rows_of([made[r] if due[r] else (store, r) for r in range(B)])
            names = set(state_before) | {n for st in states.values() for n in st}
            dev = keys.device
            self.head_state = {}
            for name in names:
                per_row = []
                for r in range(B):
                    src, at = (states[r], made[r][1]) if due[r] else (state_before, r)
                    v = src.get(name)
                    per_row.append(torch.full((H,), -1, dtype=torch.int64, device=dev) if v is None
                                   else v[at].to(dev))
                self.head_state[name] = torch.stack(per_row)
        self.store = new
        if first:
            self._first_shares(first, targets)
        if self._kept_whole is not None and rows is not None:
            # a row re-compressed now (over its target) is no longer whole
            self._kept_whole = [w and not rows[b] for b, w in enumerate(self._kept_whole)]

    def _recompress_call(self, members: list[int], queries, keys, values, pos, counts, carried, start, budgets,
                         tokens, scaling: float, local: bool, first: list[int], targets, state: dict):
        """One call of the method over rows ``members`` of the padded
        per-head layer (:meth:`_recompress_heads`; the tensors hold their
        ``len(members) * H`` head rows, ``budgets`` ``[N, 1]``); the rows
        at indices ``first`` of ``members`` selected as alone
        (:meth:`_select_whole`, at ``targets``); ``state``: their per-head
        method state ``[len(members), H]``; ``tokens``: their slots' token
        ids ``[N, M]`` (None: unknown). Returns ``(RaggedStore of those
        rows, their state after the call)``."""
        H, method = self.store.heads, self.method
        B = len(members)
        if method.merges:
            extra = {"local": (pos, H)} if local else {}
            centers, merged, new_carried = method.recompact(queries, keys, values, counts, carried, start,
                                                            budgets, scaling, **extra)
            C = int(centers.shape[2])
            positions = pos[:, None].gather(2, centers.clamp_min(0))
            shape = (B, H, C)
            return RaggedStore.from_dense(
                merged.keys.reshape(B, H, C, -1), merged.values.reshape(B, H, C, -1), positions.reshape(shape),
                (centers >= 0).reshape(shape), counts=merged.counts.reshape(shape),
                scores=new_carried.reshape(shape), slack=method.interval,
            ), dict(state)
        view = LayerView(layer_idx=self.layer_idx, num_layers=self.num_layers or (self.layer_idx + 1),
                         queries=queries, keys=keys, values=values, kv_start=start, scaling=scaling, state={},
                         phase="decode", tokens=None if tokens is None else tokens.view(B * H, 1, -1),
                         head_state={k: v.reshape(B * H, 1) for k, v in state.items()})
        idx = method.select(view, budgets)  # [B*H, 1, k], -1 padded, into the left-padded rows
        state = {k: v.reshape(B, H) for k, v in view.head_state.items()}
        if first:
            idx = self._select_whole(idx, members, first, targets, keys, values, start, view.tokens, scaling,
                                     state)
        k = int(idx.shape[2])
        valid = ((idx >= 0) & (idx >= start[:, None, None])).reshape(B, H, k)
        pick = idx.clamp_min(0)
        take = lambda t: t.gather(2, pick[..., None].expand(-1, -1, -1, t.shape[3])).reshape(B, H, k, -1)  # noqa: E731
        return RaggedStore.from_dense(take(keys), take(values), pos[:, None].gather(2, pick).reshape(B, H, k),
                                      valid, slack=method.interval), state

    def _compress_whole_rows(self, queries, scaling: float, rows: list[int], room: dict | None = None) -> None:
        """Rows ``rows`` of a per-head layer, each kept whole so far (every
        head holds its real tokens), compressed by a later prefill chunk as
        each row's layer alone, still uniform, compresses it: one uniform
        view of the row's heads with the chunk's ``queries`` ``[B, Hq, q,
        D]`` (phase "prefill"), the method's ``select`` (per-head counts
        for a headwise method) or ``compact`` (merging) at the row's target;
        each head then keeps its share of that target, as after a first
        compression at the prompt. ``room`` (``lookahead_room``'s first
        decode step, ``queries`` the step's): per row its held prompt
        queries and lookahead statistic (:attr:`_room_whole`); the step's
        query folds into the statistic and joins the held ones, as alone."""
        store, method = self.store, self.method
        B, H = store.batch, store.heads
        keys, values, pos, counts, carried, start = store.to_padded()
        M = int(keys.shape[2])
        targets = self._targets()
        tokens = self._tokens(pos.view(B, H, M))
        parts = {}
        for b in rows:
            heads = slice(b * H, (b + 1) * H)
            k, v = keys[heads, 0][None], values[heads, 0][None]  # [1, H, M, D]
            p = pos[heads][None]
            kv_start = start[b * H : b * H + 1]  # whole: every head the same length
            row_q, statistic = queries[b : b + 1], self._statistic
            if room is not None:
                held, stat = room[b]
                if stat is not None:
                    # the row's statistic over its slots, right-aligned as they are, before this step's
                    prev = stat.new_zeros((1, int(stat.shape[0]), M))
                    prev[0, :, M - 1 - int(stat.shape[1]) : M - 1] = stat
                    fold = LayerView(layer_idx=self.layer_idx, num_layers=self.num_layers or (self.layer_idx + 1),
                                     queries=row_q, keys=k, values=v, kv_start=kv_start, scaling=scaling, state={},
                                     phase="prefill", steps=0, head_state={})
                    statistic = method.lookahead_statistic(fold, prev)
                row_q = torch.cat([held, row_q], 2)
            view = LayerView(layer_idx=self.layer_idx, num_layers=self.num_layers or (self.layer_idx + 1),
                             queries=row_q, keys=k, values=v, kv_start=kv_start, scaling=scaling,
                             state={}, phase="prefill", steps=0,
                             tokens=None if tokens is None else tokens[b : b + 1], head_state={},
                             statistic=statistic)
            if method.merges:
                centers, merged, scores = method.compact(view, int(targets[b]))
                C = int(centers.shape[2])
                parts[b] = RaggedStore.from_dense(
                    merged.keys.reshape(1, H, C, -1), merged.values.reshape(1, H, C, -1),
                    p.gather(2, centers.clamp_min(0)), centers >= 0, counts=merged.counts.float().reshape(1, H, C),
                    scores=scores.float().reshape(1, H, C) if method.interval else None, slack=method.interval)
            else:
                idx = method.select(view, int(targets[b]))  # [1, H, k], -1 padded
                parts[b] = RaggedStore.from_selection(k, v, p, idx, kv_start)
                self._keep_head_state(view.head_state, torch.tensor([b]), B, H)
        self.store = pick_rows_of([(parts[b], 0) if b in parts else (store, b) for b in range(B)])
        if self.head_budgets is not None:  # (none without decode-time compression)
            self._first_shares(rows, targets)
        self._kept_whole = [w and b not in parts for b, w in enumerate(self._kept_whole)]

    def _first_compressions(self, rows: list[bool] | None) -> list[int]:
        """The rows re-compressed now over their targets (``rows``; None, a
        ``lookahead_room`` step that brings every head to its share: none) that no
        compression has taken a slot of (``_kept_whole``) where the method
        compresses a uniform layer otherwise than head by head: a headwise
        evictor allocates its heads' budgets (AdaKV, HeadKV) or profiles
        them (FastGen). Alone such a row's layer is still uniform, and its
        first compression is that one. (A merging method makes its first
        one head by head alone too, ``_to_ragged``.)"""
        w, m = self._kept_whole, self.method
        if w is None or rows is None or m.merges or not m.headwise:
            return []
        return [b for b, whole in enumerate(w) if whole and rows[b]]

    def _select_whole(self, idx, members: list[int], first: list[int], targets: list[int], keys, values, start,
                      tokens, scaling: float, state: dict):
        """``idx`` ``[B*H, 1, k]`` (a per-head re-selection of rows
        ``members``) with the rows at indices ``first`` of ``members``
        (:meth:`_first_compressions`) selected as alone: one uniform view of
        the row's heads (whole, so of one length) and its integer target
        (``targets``, by layer row), the method's layer-wide selection, with
        the row's held queries. ``keys``, ``values``, ``start`` and
        ``tokens``: the per-head re-selection's left-padded rows; what the
        method writes to a row's per-head state goes to ``state``
        (``[B, H]`` tensors, -1 where a row has none)."""
        B, H = len(members), self.store.heads
        q = self.recent_q
        M = int(keys.shape[2])
        picks = {}
        for b in first:
            rows = slice(b * H, (b + 1) * H)
            r = members[b]
            sub = LayerView(layer_idx=self.layer_idx, num_layers=self.num_layers or (self.layer_idx + 1),
                            queries=None if q is None else q[r : r + 1],
                            keys=keys[rows].view(1, H, M, -1), values=values[rows].view(1, H, M, -1),
                            kv_start=start[rows][:1], scaling=scaling, state={}, phase="decode",
                            steps=self.decode_steps, tokens=None if tokens is None else tokens[rows].view(1, H, M),
                            head_state={})
            picks[b] = self.method.select(sub, int(targets[r]))[0]  # [H, k_b]
            self._keep_head_state(sub.head_state, torch.tensor([b]), B, H, into=state)
        K = max([int(idx.shape[2])] + [int(p.shape[1]) for p in picks.values()])
        out = torch.full((B, H, K), -1, dtype=idx.dtype, device=idx.device)
        out[..., : idx.shape[2]] = idx.view(B, H, -1)
        for b, p in picks.items():
            out[b] = -1
            out[b, :, : p.shape[1]] = p.to(idx.device)
        return out.view(B * H, 1, K)

    def _first_shares(self, first: list[int], targets: list[int]) -> None:
        """Rows ``first`` keep the per-head shares their first compression
        gave them of their ``targets`` (as :meth:`_become_ragged` does for a
        row the prefill compressed)."""
        H = self.store.heads
        lengths = torch.tensor(self.store.head_lengths(), dtype=torch.int64).view(-1, H)
        budgets = self._budgets_host.view(-1, H).clone()
        self._share = self._share.clone()
        for b in first:
            self._share[b] = lengths[b].double() / max(1, targets[b])
            budgets[b] = lengths[b]
        self._budgets_host = budgets.reshape(-1)
        self.head_budgets = budgets.to(self.head_budgets.device)


def _held(layer: CompressedLayer) -> tuple:
    """``(keys, values, positions, start, counts)`` of a uniform or per-head
    layer for ``MergedPair.merge``: a uniform layer's slots with its rows'
    leading masked slots (host list); a per-head layer's heads left-padded
    (``RaggedStore.to_padded``) with their ``[B, H]`` starts and merge counts."""
    s = layer.store
    if isinstance(s, UniformStore):
        return s.keys, s.values, s.column("positions"), list(layer._start), None
    k, v, pos, cnt, _, start = s.to_padded()
    B, H, M = s.batch, s.heads, int(k.shape[2])
    return (k.view(B, H, M, -1), v.view(B, H, M, -1), pos.view(B, H, M), start.view(B, H),
            None if s.counts is None else cnt.view(B, H, M))


@dataclass
class LayerStats:
    """Sizes of one cache layer.

    ``lengths`` holds the live slot count of each kv head, ``capacity`` the
    allocated slots per head, ``bytes`` what the layer's tensors occupy,
    ``full_bytes`` what transformers' own cache holds for it.
    """

    layer: int
    seen: int
    lengths: list[int]
    capacity: int
    bytes: int
    store: str = "uniform"
    window: int | None = None
    full_bytes: int = 0


@dataclass
class CacheStats:
    """Per-layer and total sizes of a ``KVCache``; ``str()`` is a table.

    ``full_bytes`` is what transformers' ``DynamicCache`` holds for the same
    tokens once decoding has started: every token on a global layer, the
    last ``window`` on a sliding-window layer.
    """

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
            "| layer | seen | window | store | slots per head | capacity | bytes |",
            "|---:|---:|---:|---|---|---:|---:|",
        ]
        for s in self.layers:
            heads = s.lengths if len(set(s.lengths)) > 1 else f"{s.lengths[0] if s.lengths else 0} x{len(s.lengths)}"
            win = "-" if s.window is None else s.window
            rows.append(f"| {s.layer} | {s.seen} | {win} | {s.store} | {heads} | {s.capacity} | {s.bytes:,} |")
        rows.append(
            f"total {self.total_bytes:,} bytes held vs {self.full_bytes:,} for transformers' full cache "
            f"({self.compression:.2f}x smaller)"
        )
        return "\n".join(rows)


class KVCache(RecurrentStates, Cache):
    """A transformers ``Cache`` that compresses each layer with ``method``.

    Parameters
    ----------
    method : kvcompress.methods.Method
        What to keep (e.g. ``SnapKV(ratio=0.5)``, ``StreamingLLM(budget=256)``).
    num_layers : int, optional
        Number of decoder layers; learnt from the model on first use.
    layer_types : list of str, optional
        The model's layer types as transformers names them
        (``recurrent.layer_kinds(model.config)``; ``compress()`` passes them).
        A hybrid model's ``conv`` / ``linear_attention`` layers keep their
        recurrent state as transformers does (``kvcompress.recurrent``);
        without the list they are learnt at their first call.
    attention_chunk : int, optional
        Tokens per chunk of ``chunked_attention`` layers (Llama 4's
        ``attention_chunk_size``): such a layer is served up to one chunk and
        refused by name past it.

    Notes
    -----
    Compression runs inside the ``"kvcompress"`` attention function, right
    after each layer's attention, because it needs that layer's queries; use
    ``kvcompress.compress(model, method)`` (or call ``kvcompress.enable(model)``
    once) so the model uses it. Query-free methods (``StreamingLLM``,
    ``Knorm``) also work with other attention functions for unpadded batches
    of models without sliding-window layers.
    """

    def __init__(self, method: Method, *, num_layers: int | None = None, layer_types=None,
                 attention_chunk: int | None = None):
        if not isinstance(method, Method):
            raise TypeError(
                f"method: expected a kvcompress method (e.g. kvcompress.SnapKV(ratio=0.5)), "
                f"got {type(method).__name__}"
            )
        if method.demotes and not method.evicts:
            raise ValueError(f"method: {method.describe()} packs what an evictor does not select; compose it, "
                             f"e.g. kvcompress.SnapKV(ratio=0.75) + kvcompress.{method.describe()}")
        if layer_types is not None and (isinstance(layer_types, str) or not all(
                isinstance(k, str) for k in layer_types)):
            raise TypeError(f"layer_types: expected a list of layer type names (str) or None, got {layer_types!r}")
        if attention_chunk is not None and (isinstance(attention_chunk, bool) or not isinstance(attention_chunk, int)
                                            or attention_chunk < 1):
            raise ValueError(f"attention_chunk: expected a positive int or None, got {attention_chunk!r}")
        check_layer_kinds(layer_types, method)
        super().__init__(layers=[])
        self.method = method
        self.num_layers = num_layers
        self.layer_types = None if layer_types is None else list(layer_types)
        self.attention_chunk = attention_chunk  # tokens per chunk of chunked-attention layers (Llama 4)
        self._states: dict = {}  # recurrent layers of a hybrid model: layer -> transformers' state holder
        self._transformed: int | None = None  # a layer whose attention got keys the model changed (take_pending)
        self._awaiting: int | None = None
        self.shared: dict = {}  # state every layer reads (TidalDecode's token selection)
        self.token_log = TokenLog()  # the token ids fed, for methods with needs_tokens (FastGen)
        # KVSharer sources waiting for their last reader: layer -> (queries, scaling)
        self._deferred: dict[int, tuple] = {}
        # defers_prefill methods: layers waiting for the last layer's prefill,
        # layer -> (latest queries, scaling), and their statistics
        self._prefill: dict[int, tuple] = {}
        self._stats: dict[int, object] = {}
        self._hidden: dict[int, object] = {}

    def __repr__(self) -> str:
        lengths = [layer.n for layer in self.layers if not self.holds_state(layer.layer_idx)]
        span = f"{min(lengths)}..{max(lengths)}" if lengths else "empty"
        seen = self.get_seq_length()
        states = f", recurrent layers={len(self._states)}" if self._states else ""
        return (
            f"KVCache({self.method.describe()}, layers={len(lengths)}{states}, seen={seen}, "
            f"slots per head={span}, bytes={self.memory_bytes():,})"
        )

    def check_mask(self, attention_mask, q: int, batch: int) -> None:
        """Refuse a forward's 2-D padding mask ``[batch, seen]`` for its
        ``q``-token chunk before any layer stores the chunk (the layers read
        the mask only when they attend, after ``update`` has stored it: a
        refusal there would leave the layers before it a chunk ahead). The
        forward pre-hook of ``kvcompress.enable`` / ``compress`` calls it;
        anything but a 2-D tensor is left to the layers."""
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2:
            return
        first = all(layer.kv_start is None for layer in self.layers)
        padding_of_chunk(attention_mask, q, batch, first)
        held = next((layer for layer in self.layers if layer._pad and layer._pad_known), None)
        if first or held is None or len(held._pad) != batch:
            return
        # A later chunk's mask may not hide tokens the cache holds as real:
        # the layers keep (or evicted, merged, packed) them, and honour only
        # the first prompt's left padding.
        seen, L = held.seen, int(attention_mask.shape[1])
        lo = max(0, seen + q - L)  # the first held position the mask covers
        if lo >= seen:
            return
        shown = attention_mask[:, L - q - (seen - lo) : L - q].to(torch.bool)
        pos = torch.arange(lo, seen, device=shown.device)
        hidden = (pos[None, :] >= torch.tensor(held._pad, device=shown.device)[:, None]) & ~shown
        if bool(hidden.any()):
            b, p = (int(x) for x in hidden.nonzero()[0])
            raise ValueError(
                f"attention_mask: hides token {p} of row {b}, which the cache already holds as a real token; "
                f"kvcompress honours only the first prompt's left padding (a later mask cannot mask earlier tokens)")

    # ------------------------------------------------------------ HF protocol
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        # before anything changes: a bad call leaves the cache as it was
        layer_idx = check_layer_index(layer_idx, self.num_layers)
        check_states(key_states, value_states, self.layers[layer_idx] if layer_idx < len(self.layers) else None)
        check_chunk(self.layer_types, self.attention_chunk, layer_idx,
                    self.layers[layer_idx].seen if layer_idx < len(self.layers) else 0, int(key_states.shape[2]))
        if self.method.packing is not None and key_states.shape[3] != value_states.shape[3]:
            raise KVCompressUnsupportedError(
                f"value_states: {self.method.describe()} packs keys and values of one head dim, and this model's "
                f"values have {value_states.shape[3]} channels against its keys' {key_states.shape[3]} (MiMo, "
                f"DeepSeek's multi-head latent attention); use a method that does not pack")
        if self._awaiting is not None:
            self._finish_without_queries(self._awaiting)
        while len(self.layers) <= layer_idx:
            self.layers.append(CompressedLayer(len(self.layers), self.method, self.num_layers))
            self.layers[-1].shared = self.shared
            self.layers[-1].token_log = self.token_log
        if self._deferred and layer_idx <= min(self._deferred):
            self._flush_deferred()
        if self._prefill and layer_idx <= min(self._prefill):
            # a new forward pass began before every layer had reported
            # (a model that skips layers, or a hook that did not run)
            self._finish_prefill()
        layer = self.layers[layer_idx]
        if self.method.sharing is not None and layer.seen == 0 and not layer.store.batch:
            if self.num_layers is not None:
                self._check_plan()
            self._share(layer, key_states, value_states)
        keys, values = layer.update(key_states, value_states)
        self._awaiting = layer_idx
        _pending.entry = (self, layer_idx, keys, values)
        return keys, values

    @property
    def wants_tokens(self) -> bool:
        """Whether the method reads slots' token ids (``Method.needs_tokens``)."""
        return self.method.needs_tokens

    def record_tokens(self, input_ids) -> None:
        """Log a forward's ``input_ids`` ``[B, q]`` (None: unknown tokens)
        before its layers run; ``hf.compress`` calls it."""
        self.token_log.append(input_ids)

    def _check_plan(self) -> None:
        """A plan naming layers the model does not have is refused (a source
        would otherwise wait for a reader that never attends)."""
        missing = sorted(t for t in self.method.sharing.pairs if t >= self.num_layers)
        if missing:
            raise ValueError(f"plan: layers {missing} do not exist (the model has {self.num_layers} layers)")

    def _flush_deferred(self) -> None:
        """Compress the KVSharer sources still waiting: a new forward pass
        began before their readers attended (a reader that did not use the
        "kvcompress" attention)."""
        for src in sorted(self._deferred):
            queries, scaling = self._deferred.pop(src)
            self.layers[src].after_attention(queries, scaling)

    def _share(self, layer: "CompressedLayer", key_states, value_states) -> None:
        """KVSharer: a target layer's first chunk; it reads its source
        layer's store from now on when the source holds this very chunk in a
        full-attention uniform store of the same shape (else, by rule, the
        layer keeps its own cache)."""
        src = self.method.sharing.source(layer.layer_idx)
        if src is None or src >= len(self.layers):
            return
        source = self.layers[src]
        store = source.store
        q = int(key_states.shape[2])
        if type(store) is not UniformStore or source.window is not None or source.seen != q or store.n != q:
            return
        if (store.keys.shape != key_states.shape or store.values.shape != value_states.shape
                or store.keys.dtype != key_states.dtype or store.keys.device != key_states.device):
            return
        layer.store = SharedStore(source)

    def _rows(self) -> int:
        """The cache's batch rows now (0 before any update)."""
        return max((layer.batch_size for layer in self.layers), default=0)

    def reorder_cache(self, beam_idx) -> None:
        rows = self._rows()
        if rows:
            idx = check_batch_index(beam_idx, rows, "beam_idx")
            super().reorder_cache(idx)
            self._index_states(idx.to("cpu", torch.int64))

    def batch_select_indices(self, indices) -> None:
        rows = self._rows()
        if rows:
            idx = check_batch_index(indices, rows, "indices")
            super().batch_select_indices(idx)
            self._index_states(idx.to("cpu", torch.int64))

    def batch_repeat_interleave(self, repeats: int) -> None:
        repeats = check_repeats(repeats)
        rows = self._rows()
        if rows:
            # one index for every layer, from the cache's rows: a layer reading
            # another's store (a MiniCache pair's second layer, a KVSharer
            # target) would find it already repeated and build a longer one
            idx = torch.arange(rows).repeat_interleave(repeats)
            super().batch_select_indices(idx)
            self._index_states(idx)

    def reset(self) -> None:
        super().reset()
        # each layer re-initialised itself with a dict of its own: the cache's
        # shared state (TidalDecode's selection) is emptied and shared again,
        # and nothing waits for a forward pass that will not come
        self.shared.clear()
        for layer in self.layers:
            layer.shared = self.shared
        self._deferred.clear()
        self._prefill.clear()
        self._stats.clear()
        self._hidden.clear()
        self._awaiting = self._transformed = None
        self._reset_states()

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        layer_idx = 0 if layer_idx is None else layer_idx
        if layer_idx < len(self.layers) and self.layers[layer_idx].seen:
            return self.layers[layer_idx].seen
        # a recurrent layer (a hybrid model's layer 0 may be one) counts what it
        # took, or, keeping its state itself, what the layers with keys took (a
        # layer with keys that has seen nothing: the others have not either)
        taken = self._states_seen(layer_idx)
        if taken is not None:
            return taken
        return max((layer.seen for layer in self.layers), default=0) if self.holds_state(layer_idx) else 0

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
    def attend(self, layer_idx: int, query, spec: AttentionSpec, padding_mask=None, four_d=None):
        """Called by the ``"kvcompress"`` attention function: record padding,
        attend over the layer's store, then let the layer compress with these
        queries ``[B, Hq, q, D]``. Returns ``[B, q, Hq, D]``."""
        layer = self._enter(layer_idx, query, spec, padding_mask, four_d)
        out = layer.attend(query, spec)
        sharing = self.method.sharing
        if self.method.defers_prefill and int(query.shape[2]) > 1 and not self._holds_packed():
            self._defer_prefill(layer, query, spec.scaling)
        elif sharing is not None and sharing.last_reader(layer_idx) is not None:
            # KVSharer: a source compresses once its last reader has attended
            # over what it attended over (see KVSharer, "with an evictor")
            self._deferred[layer_idx] = (query, spec.scaling)
        else:
            layer.compress_after(query, spec.scaling)
        if self._deferred:
            for src in [s for s in self._deferred if sharing.last_reader(s) <= layer_idx]:
                queries, scaling = self._deferred.pop(src)
                self.layers[src].after_attention(queries, scaling)
        if self.method.cross_layer is not None:
            self._merge_pair(layer_idx)
        return out

    # ------------------------------------------- deferred prefill (defers_prefill)
    def _holds_packed(self) -> bool:
        """Whether a layer holds a packed store. A layer-budget method reads
        its statistics from full-precision slots, so only a prefill before
        anything is packed is deferred; a later chunk (a second turn behind
        ``+ KIVI``) is compressed by each layer right after its attention,
        with the budgets of the first prefill, as a packed layer compresses
        a decode step."""
        return any(isinstance(layer.store, PackedStore) for layer in self.layers)

    def _defer_prefill(self, layer: "CompressedLayer", query, scaling: float) -> None:
        """Keep the layer's prefill whole for now: record the method's
        statistic of it and the latest queries its compression will need."""
        idx = layer.layer_idx
        # a sliding layer keeps its recent slots whatever it is given: no statistic
        self._stats[idx] = (None if layer.window is not None
                            else self.method.layer_statistic(layer._view(query, scaling, "prefill")))
        keep = self.method.deferred_queries()
        if keep is not None and keep < int(query.shape[2]):
            # a copy: a view would hold the whole chunk's queries alive
            query = query[:, :, -keep:].clone()
        self._prefill[idx] = (query, scaling)
        self._maybe_finish()

    def observe_hidden(self, layer_idx: int, before, attn_out) -> None:
        """Called by ``kvcompress.compress``' hooks (``method.needs_hidden``)
        once a decoder layer's attention returned ``attn_out`` ``[B, q, d]``
        for the residual stream ``before`` it; only a deferred prefill
        layer records it."""
        if layer_idx not in self._prefill or layer_idx in self._hidden:
            return
        layer = self.layers[layer_idx]
        q = int(before.shape[1])
        # a row's leading masked slots that fall inside this chunk are its padding
        pad = [max(0, s - (layer.n - q)) for s in layer._start]
        # a sliding layer takes no part in the budgets: no statistic
        self._hidden[layer_idx] = (None if layer.window is not None
                                   else self.method.hidden_statistic(before, before + attn_out, pad))
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        L = self.num_layers
        if L is None or len(self._prefill) < L:
            return
        if self.method.needs_hidden and len(self._hidden) < L:
            return
        self._finish_prefill()

    def _finish_prefill(self) -> None:
        """Every deferred layer has attended (and reported its hidden
        states): ask the method for each layer's targets, then compress
        each layer as it would have been right after its attention."""
        layers = sorted(self._prefill)
        if self.method.needs_hidden and any(i not in self._hidden for i in layers):
            missing = [i for i in layers if i not in self._hidden]
            self._prefill.clear()
            self._stats.clear()
            self._hidden.clear()
            raise KVCompressError(
                f"{type(self.method).__name__} needs each layer's hidden states (missing for layers {missing}), "
                "which the hooks of `with kvcompress.compress(model, method):` report; run generation inside it")
        first = self.layers[layers[0]]
        seen = [first.seen - p for p in first._pad]
        stats = [self._stats.pop(i, None) for i in layers]
        hidden = [self._hidden.pop(i, None) for i in layers] if self.method.needs_hidden else None
        sliding = [self.layers[i].window is not None for i in layers]
        targets = self.method.layer_targets(stats, hidden, seen, sliding)
        for n, i in enumerate(layers):
            layer = self.layers[i]
            layer.set_layer_targets(None if targets is None else targets[n])
            queries, scaling = self._prefill.pop(i)
            layer.after_attention(queries, scaling)
        self._hidden.clear()

    def _merge_pair(self, layer_idx: int) -> None:
        """MiniCache: once the deeper layer ``l`` of a pair has attended over
        its first chunk, layers ``l-1`` and ``l`` hold the same tokens in
        full precision; merge them into one shared pair. A pair whose layers
        slide, differ in shape, dtype or held tokens, or were merged
        already, stays as it is (documented rule, see ``MiniCache``)."""
        mc = self.method.cross_layer
        L = self.num_layers or self.layers[layer_idx].num_layers
        if L is None:
            raise KVCompressError("MiniCache pairs layers from the middle of the network: the cache needs "
                                  "num_layers (KVCache(method, num_layers=...), or run inside "
                                  "kvcompress.compress(model, method))")
        first = mc.partner(layer_idx, L)
        if first is None:
            return
        a, b = self.layers[first], self.layers[layer_idx]
        plain = (UniformStore, RaggedStore)
        if type(a.store) in plain and type(b.store) in plain:
            held = [_held(a), _held(b)]
            (ka, va), (kb, vb) = held[0][:2], held[1][:2]
            apart = (a.window is not None or b.window is not None or a.seen != b.seen or a._pad != b._pad
                     or ka.shape[:2] != kb.shape[:2] or ka.shape[3] != kb.shape[3] or va.shape[3] != vb.shape[3]
                     or ka.dtype != kb.dtype or ka.device != kb.device or ka.dtype != va.dtype)
        else:
            # merged already, or a partner in another store (a sliding layer KIVI packed
            # itself, a Gemma 3 pair of a local and a global layer)
            apart = True
        if apart:
            packing = self.method.packing
            for x in (a, b):
                if packing is not None and x.window is None and type(x.store) in plain:
                    # not merged: packed as the quantizer alone would (after_attention waited)
                    x._to_packed(packing)
                    x.store.settle(pad=x._start)
            return
        # an evictor composed with MiniCache has compressed both layers already
        # (each keeps its own tokens); what both keep is merged
        a.store, b.store = MiniCacheStore.merge_layers(held, float(mc.t), float(mc.retain))
        if mc.quant is not None:
            bits, group = mc.quant.packing[:2]  # one width (MiniCache refuses value_bits)
            a.store.pair.pack(bits, group)
        # nothing is re-selected once merged: held queries and per-head budgets go
        for x in (a, b):
            x._qbuf = x.head_budgets = x._share = None

    def _enter(self, layer_idx: int, query, spec: AttentionSpec, padding_mask, four_d) -> "CompressedLayer":
        """Check the layer's window against ``spec`` and record the chunk's
        padding; return the layer, ready to attend."""
        self._awaiting = None
        layer = self.layers[layer_idx]
        if self.num_layers is not None:
            layer.num_layers = self.num_layers
        if spec.window is not None and isinstance(layer.store, SharedStore):
            raise KVCompressUnsupportedError(
                f"sliding_window: layer {layer_idx} reads layer {layer.store.source.layer_idx}'s cache (KVSharer) but "
                "slides; leave sliding layers out of the plan")
        if spec.window is not None:
            if layer.window is None and layer.seen > layer.last_chunk:
                raise KVCompressUnsupportedError(
                    f"sliding_window: layer {layer_idx} started without a window and now has one "
                    f"({spec.window})"
                )
            if layer.window is None:  # TidalDecode moves selection off sliding layers
                self.shared.setdefault("sliding", set()).add(layer_idx)
            layer.window = spec.window
        elif layer.window is not None:
            raise KVCompressUnsupportedError(f"sliding_window: layer {layer_idx} slides over {layer.window} tokens but this "
                                  "call passed no window")
        layer.set_padding(padding_mask, int(query.shape[2]), four_d=four_d)
        return layer

    def _finish_without_queries(self, layer_idx: int) -> None:
        """The model's attention is not ours: compress with keys/values only."""
        self._awaiting = None
        layer = self.layers[layer_idx]
        if self._transformed == layer_idx and (self.method.needs_queries or self.method.sharing is not None
                                               or self.method.cross_layer is not None):
            raise KVCompressUnsupportedError(
                f"module: layer {layer_idx}'s attention received keys other than those the cache returned (the "
                f"model changes them between its cache and its attention: JetMoE repeats them per expert, "
                f"DeepSeek-V3 caches its latent KV and expands it), so "
                f"{self.method.describe()} cannot be given that layer's queries; use a method that needs no "
                f"queries (StreamingLLM, Knorm)")
        if layer.kv_start is None:
            layer.set_padding(None, layer.last_chunk)
        if self.method.sharing is not None and (self.method.evicts or self.method.packing is not None):
            raise KVCompressError(
                f"{self.method.describe()} compresses the layers other layers read inside the 'kvcompress' "
                "attention function: run generation inside `with kvcompress.compress(model, method):` or call "
                "`kvcompress.enable(model)` before passing a KVCache")
        if self.method.cross_layer is not None:
            raise KVCompressError(
                f"{self.method.describe()} merges pairs of layers inside the 'kvcompress' attention function: "
                "run generation inside `with kvcompress.compress(model, method):` or call "
                "`kvcompress.enable(model)` before passing a KVCache")
        from .hf import _active_models  # a session runs: this layer attended by itself

        if self.method.needs_queries and _active_models:
            raise KVCompressUnsupportedError(
                f"module: layer {layer_idx}'s attention never reached the 'kvcompress' attention function although "
                f"a compress() session is running, so {self.method.describe()} cannot be given its queries (the "
                f"model attends in that layer by itself); use a method that needs no queries (StreamingLLM, Knorm)")
        if self.method.needs_queries:
            raise KVCompressError(
                f"{type(self.method).__name__} needs the layer's queries, which only the 'kvcompress' "
                "attention function provides: run generation inside `with kvcompress.compress(model, "
                "method):` or call `kvcompress.enable(model)` before passing a KVCache"
            )
        layer.after_attention(None, 1.0)

    # ------------------------------------------------------------ accounting
    def read_fraction(self) -> float | None:
        """Share of the held real slots that sampled decode steps read
        (MagicPIG), over every layer, step and query head; None when no
        layer sampled."""
        counts = [c for c in (layer.store.read_counts() for layer in self.layers) if c is not None]
        offered = sum(o for _, o in counts)
        return sum(r for r, _ in counts) / offered if offered else None

    def memory_bytes(self) -> int:
        """Bytes the cache's tensors occupy (each storage counted once;
        recurrent layers' states included)."""
        seen: dict[int, int] = {}
        for t in [t for layer in self.layers for t in layer.tensors()] + [
                t for i in self._states for t in self._state_tensors(i)]:
            ptr, nbytes = _storage_bytes(t)
            seen[ptr] = nbytes
        return sum(seen.values())

    def stats(self) -> CacheStats:
        """Per-layer lengths and bytes, and what transformers' own cache holds."""
        out = CacheStats(method=self.method.describe())
        counted: set[int] = set()  # storages shared by layers (MiniCache pairs) count once, at the first
        carry = 0  # what a recurrent layer's slot holds (the token log, when layer 0 is recurrent)
        for layer in self.layers:
            if self.holds_state(layer.layer_idx):
                for t in layer.tensors():
                    ptr, size = _storage_bytes(t)
                    if ptr not in counted:
                        counted.add(ptr)
                        carry += size
                continue
            nbytes, carry = carry, 0
            for t in layer.tensors():
                ptr, size = _storage_bytes(t)
                if ptr not in counted:
                    counted.add(ptr)
                    nbytes += size
            full = self._full_bytes(layer)
            out.layers.append(LayerStats(layer.layer_idx, layer.seen, layer.head_lengths(), layer.capacity, nbytes,
                                         layer.store.kind, layer.window, full))
            out.full_bytes += full
        for i in sorted(self._states):
            # a hybrid model's recurrent layer: its state, as transformers' own cache holds it
            nbytes = sum(_storage_bytes(t)[1] for t in self._state_tensors(i))
            out.layers.append(LayerStats(i, self._states_seen(i), [], 0, nbytes, "recurrent", None, nbytes))
            out.full_bytes += nbytes
        out.layers.sort(key=lambda s: s.layer)
        return out

    @staticmethod
    def _full_bytes(layer: CompressedLayer) -> int:
        store = layer.store
        if not store.batch:
            return 0
        if isinstance(store, SharedStore):
            return KVCache._full_bytes(store.source)
        if isinstance(store, RaggedStore):
            width, item = store.k.shape[1] + store.v.shape[1], store.k.element_size()
        elif isinstance(store, (MiniCacheStore, PackedStore)):
            D, Dv, item = store.widths
            width = D + Dv
        else:
            width, item = store.keys.shape[3] + store.values.shape[3], store.keys.element_size()
        tokens = layer.seen if layer.window is None else min(layer.seen, layer.window)
        return store.batch * store.heads * tokens * width * item
