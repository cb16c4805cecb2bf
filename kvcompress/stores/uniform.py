"""Uniform storage: every head of a layer holds the same number of slots.

Slots live in ``[B, H, capacity, D]`` buffers; the live ones are
``lo .. lo + n``. Appends write into the slack after them and only a full
buffer is reallocated; dropping the oldest slots (a sliding window) moves
``lo`` and copies nothing until the slack runs out. Per-slot columns
(positions, method state) are ``[B, H, capacity]`` buffers that move with the
slots.
"""

from __future__ import annotations

import torch

from .. import ops
from .base import AttentionSpec, LayerStore
from .masked import build_mask, masked_attention, rows_attention

_C_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself unless it views a larger buffer (fused QKV projections):
    the bytes held must be the bytes reported."""
    if t.untyped_storage().nbytes() > t.numel() * t.element_size():
        return t.contiguous() if not t.is_contiguous() else t.clone()
    return t


def c_decode_ok(query, keys, values, spec: AttentionSpec) -> bool:
    """Decode steps (one query) on CPU tensors of a supported dtype with no
    option the C kernel lacks."""
    return (spec.plain and int(query.shape[2]) == 1 and query.device.type == "cpu" and query.dtype in _C_DTYPES
            and keys.dtype == query.dtype == values.dtype and keys.shape[-1] == values.shape[-1]
            and keys.shape[2] >= 1)


def sparse_step(query, spec: AttentionSpec) -> bool:
    """A decode step (one query per row) with no option the sparse readers
    (Quest, TidalDecode, MagicPIG) lack: softcap, sinks, windows. (Merge
    counts are no such option: a uniform layer holds none, and the ragged
    readers pass theirs to the kernels.)"""
    return int(query.shape[2]) == 1 and spec.plain and spec.window is None


def read_count(k: int, total: int, first=None) -> int | None:
    """How many of ``total`` units (slots or pages) a sparse step reads per
    head when it may read ``k``: at most what the most-padded row holds
    (units before ``first[b]`` are padding), None when that covers every
    row's real units (the step then reads densely)."""
    if first is not None:
        k = min(k, total - int(first.max()))
    if k < 1 or k >= total - (0 if first is None else int(first.min())):
        return None
    return k


def padded_starts(kv_start) -> list[int] | None:
    """Each row's first real slot when some row holds leading padding (a
    left-padded batch, or filler in front of a row that kept fewer slots),
    else None. The sparse readers of uniform layers then read row by row:
    the rows' layers alone hold no padding."""
    if kv_start is None:
        return None
    starts = [int(x) for x in kv_start.tolist()]
    return starts if any(starts) else None


def dense_row(query, keys, values, spec: AttentionSpec):
    """A decode step of one row over all its slots ``keys``/``values`` ``[1,
    H, n, D]`` (no padding): what :meth:`UniformStore.attend` computes for
    the row alone."""
    if c_decode_ok(query, keys, values, spec):
        return ops.attention(query, keys, values, scaling=spec.scaling)
    mask = build_mask(1, int(query.shape[2]), int(keys.shape[2]), query.device)
    return masked_attention(query, keys, values, spec, mask)


def front_padded(rows: list, heads: int, device) -> torch.Tensor:
    """Rows' ``[1, H, k_b]`` int64 slot lists (None: the row read every
    slot) as one ``[B, H, max k_b]``, ``-1`` in front of the shorter ones
    (all ``-1`` for a None)."""
    width = max(int(r.shape[2]) for r in rows if r is not None)
    return torch.stack([torch.nn.functional.pad(r[0], (width - int(r.shape[2]), 0), value=-1) if r is not None
                        else torch.full((heads, width), -1, dtype=torch.int64, device=device) for r in rows])


class UniformStore(LayerStore):
    """``[B, H, n, D]`` slots with equal counts per head.

    Attributes
    ----------
    keys, values : torch.Tensor
        ``[B, H, n, D]`` views of the live slots.
    columns : dict
        ``name -> [B, H, n]`` views of the per-slot columns; ``positions``
        (int32 token index) is always present.
    limit : int or None
        Capacity the buffers never outgrow while it suffices (budget plus
        decode slack), so memory stays flat during decoding.
    """

    kind = "uniform"

    def __init__(self):
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._cols: dict[str, torch.Tensor] = {}
        self.lo = 0
        self.n = 0
        self.limit: int | None = None

    @classmethod
    def from_parts(cls, keys, values, columns: dict) -> "UniformStore":
        """A store holding ``keys``/``values`` ``[B, H, n, D]`` (taken as they
        are) and the per-slot ``columns`` ``name -> [B, H, n]`` (copied)."""
        new = cls()
        new._k, new._v = keys, values
        new._cols = {name: t.clone() for name, t in columns.items()}
        new.n = int(keys.shape[2])
        return new

    def __repr__(self) -> str:
        shape = None if self._k is None else tuple(self.keys.shape)
        return f"UniformStore(slots={shape}, capacity={self.capacity}, columns={sorted(self._cols)})"

    # ------------------------------------------------------------ geometry
    @property
    def batch(self) -> int:
        return 0 if self._k is None else int(self._k.shape[0])

    @property
    def heads(self) -> int:
        return 0 if self._k is None else int(self._k.shape[1])

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else int(self._k.shape[2])

    @property
    def keys(self) -> torch.Tensor:
        return self._k[:, :, self.lo : self.lo + self.n]

    @property
    def values(self) -> torch.Tensor:
        return self._v[:, :, self.lo : self.lo + self.n]

    @property
    def columns(self) -> dict:
        return {name: t[:, :, self.lo : self.lo + self.n] for name, t in self._cols.items()}

    def column(self, name: str) -> torch.Tensor:
        return self._cols[name][:, :, self.lo : self.lo + self.n]

    def add_column(self, name: str, dtype=torch.float32) -> None:
        """A zero-filled per-slot column (method state)."""
        if name not in self._cols:
            self._cols[name] = torch.zeros(self._k.shape[:3], dtype=dtype, device=self._k.device)

    def head_lengths(self) -> list[int]:
        return [self.n] * (self.batch * self.heads)

    def tensors(self) -> list:
        return [t for t in (self._k, self._v, *self._cols.values()) if t is not None]

    def _adopt(self, store: "UniformStore") -> None:
        """Take over another uniform store's buffers and live range (no copy):
        how a layer's slots move into a subclass after their prefill."""
        self._k, self._v, self._cols = store._k, store._v, store._cols
        self.lo, self.n, self.limit = store.lo, store.n, store.limit

    # ------------------------------------------------------------- writing
    def _realloc(self, cap: int) -> None:
        """Move the live slots to the front of new buffers of ``cap`` slots."""
        B, H = self._k.shape[:2]
        lo, n = self.lo, self.n

        def move(t):
            new = t.new_zeros((B, H, cap) + tuple(t.shape[3:])) if t.ndim == 3 else t.new_empty(
                (B, H, cap, t.shape[3]))
            new[:, :, :n] = t[:, :, lo : lo + n]
            return new

        self._k, self._v = move(self._k), move(self._v)
        self._cols = {name: move(t) for name, t in self._cols.items()}
        self.lo = 0

    def _make_room(self, q: int) -> None:
        need = self.n + q
        if self.lo + need <= self.capacity:
            return
        cap = self.capacity
        if need > cap:
            cap = need + max(32, cap // 16)
            if self.limit is not None and need <= self.limit:
                cap = min(cap, self.limit)
        self._realloc(cap)

    def append(self, keys, values, first_position: int) -> None:
        B, H, q = int(keys.shape[0]), int(keys.shape[1]), int(keys.shape[2])
        pos = torch.arange(first_position, first_position + q, dtype=torch.int32, device=keys.device)
        if self._k is None:
            # first chunk: keep the projection's output as it is (no copy)
            self._k, self._v = _own(keys), _own(values)
            self._cols = {"positions": pos.expand(B, H, q).clone()}
            self.n = q
            return
        if B != self.batch or H != self.heads:
            raise ValueError(f"key_states: expected batch {self.batch} and {self.heads} kv heads as earlier "
                             f"updates of this layer, got {tuple(keys.shape)}")
        self._make_room(q)
        end = self.lo + self.n
        self._k[:, :, end : end + q] = keys
        self._v[:, :, end : end + q] = values
        for name, t in self._cols.items():
            t[:, :, end : end + q] = pos if name == "positions" else 0
        self.n += q

    def keep(self, indices) -> None:
        """Keep slots ``indices`` ``[B, H, k]`` (ascending, into the live slots)."""
        k_new, v_new = ops.gather(self.keys, self.values, indices)
        self._cols = {name: t.gather(2, indices) for name, t in self.columns.items()}
        self._k, self._v = k_new, v_new
        self.lo, self.n = 0, int(indices.shape[2])

    def drop_front(self, m: int) -> None:
        """Forget the ``m`` oldest slots of every head (no copy)."""
        m = min(m, self.n)
        self.lo += m
        self.n -= m

    def shrink(self, cap: int) -> None:
        """Reallocate to ``cap >= n`` slots (give back a larger buffer)."""
        self._realloc(max(cap, self.n))

    def index_batch(self, idx) -> None:
        if self._k is None:
            return
        idx = idx.to(self._k.device)
        self._k = self._k.index_select(0, idx)
        self._v = self._v.index_select(0, idx)
        self._cols = {name: t.index_select(0, idx) for name, t in self._cols.items()}

    # ----------------------------------------------------------- attention
    def attend(self, query, spec: AttentionSpec, kv_start=None, query_pos=None):
        keys, values = self.keys, self.values
        q = int(query.shape[2])
        if c_decode_ok(query, keys, values, spec) and (spec.window is None
                                                       or self._all_in_window(query_pos, spec.window)):
            # A decode step reads the whole layer for one query: the C kernel
            # is 2-3x faster than SDPA in fp32, ~20x in bf16 on CPU
            # (benchmarks/bench_attention.py). Sliding layers have already
            # dropped the slots their window no longer sees.
            return ops.attention(query, keys, values, scaling=spec.scaling, kv_start=kv_start)
        key_pos = self.column("positions")[:, 0] if spec.window is not None else None
        if q > 1 and kv_start is not None and int(query.shape[0]) > 1 and bool(kv_start.any()):
            # a prefill chunk of a left-padded batch: each row as alone (rows_attention)
            return rows_attention(query, keys, values, spec, kv_start, window=spec.window, key_pos=key_pos,
                                  query_pos=query_pos)
        mask = build_mask(int(query.shape[0]), q, self.n, query.device, kv_start=kv_start, window=spec.window,
                          key_pos=key_pos, query_pos=query_pos)
        return masked_attention(query, keys, values, spec, mask)

    def _all_in_window(self, query_pos, window: int) -> bool:
        oldest = int(self._cols["positions"][0, 0, self.lo]) if self.n else 0
        return query_pos is not None and int(query_pos.min()) - oldest < window
