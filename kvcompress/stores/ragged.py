"""Ragged (per-head length) storage of one cache layer.

Head-wise methods keep a different number of slots in each kv head. Padding
every head to the longest would hold bytes for slots that do not exist
(kvpress masks instead); here a layer holds one ``[R, D]`` buffer for keys
and one for values, head ``i = b * H + h`` owning rows ``offsets[i] ..
offsets[i] + caps[i] - 1`` of which the first ``lengths[i]`` are live. The
C attention kernel reads this layout directly (``ops.attention`` with
``offsets``/``lengths``).
"""

from __future__ import annotations

import torch

from .. import ops
from .base import AttentionSpec, LayerStore
from .masked import padded_head_attention

_C_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def segments(lengths, total: int | None = None):
    """Items of consecutive segments of ``lengths`` (int64 ``[N]``) items:
    ``(segment, within)``, int64 ``[sum(lengths)]``, each item's segment and
    its index inside it. ``total`` (the sum, when the host knows it) spares
    a device synchronisation."""
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths, output_size=total)
    within = torch.arange(seg.numel(), device=lengths.device) - (torch.cumsum(lengths, 0) - lengths)[seg]
    return seg, within


class RaggedStore(LayerStore):
    """Per-head slots of one layer in flat buffers.

    Attributes
    ----------
    k, v : torch.Tensor
        ``[R, D]`` / ``[R, Dv]`` rows; ``R = caps.sum()``.
    offsets, lengths, caps : torch.Tensor
        int64 ``[B * H]``: first row, live slots and allocated slots per head.
    positions : torch.Tensor
        int32 ``[R]`` token index of each row (garbage beyond a head's length).
    batch, heads : int
    """

    kind = "ragged"
    #: per-row tensors (first dim ``R``) that move with their rows on a
    #: reallocation or a batch reorder; subclasses add their own
    row_state: tuple[str, ...] = ("counts", "scores")

    def __init__(self, k, v, offsets, lengths, caps, positions, batch: int, heads: int):
        self.k, self.v = k, v
        self.offsets, self.lengths, self.caps = offsets, lengths, caps
        self.positions = positions
        self.batch, self.heads = batch, heads
        # lengths mirrored on the host: a decode step reads them without a
        # device synchronisation
        self._host_lengths = lengths.detach().to("cpu", copy=True)
        self._host_caps = caps.detach().to("cpu", copy=True)
        #: float32 ``[R]`` tokens merged into each slot (merging methods), else None
        self.counts: torch.Tensor | None = None
        #: float32 ``[R]`` importance carried to the next re-compression (NaN:
        #: appended since, not scored yet), else None
        self.scores: torch.Tensor | None = None

    @classmethod
    def from_dense(cls, keys, values, positions, valid, counts=None, scores=None, slack: int = 0) -> "RaggedStore":
        """Pack ``keys``/``values`` ``[B, H, C, D]``, int32 ``positions`` and
        optional float32 merge ``counts`` and carried ``scores`` ``[B, H, C]``
        keeping the slots where ``valid`` ``[B, H, C]`` is True (in order).
        Each head gets ``slack`` free rows for appends."""
        B, H = int(keys.shape[0]), int(keys.shape[1])
        lengths = valid.sum(-1).reshape(-1)
        caps = lengths + slack
        offsets = torch.cumsum(caps, 0) - caps
        rank = torch.cumsum(valid.to(torch.int64), -1) - 1
        # the kept slots' flat indices, then one index_select / index_copy_
        # per tensor: a boolean mask over [B, H, C, D], or a 2-D index put,
        # costs several times as much
        sel = valid.reshape(-1).nonzero().squeeze(1)
        rows = (offsets.view(B, H, 1) + rank).reshape(-1).index_select(0, sel)
        R = int(caps.sum())
        k = keys.new_zeros((R, keys.shape[3]))
        v = values.new_zeros((R, values.shape[3]))
        pos = positions.new_zeros((R,))
        k.index_copy_(0, rows, keys.reshape(-1, keys.shape[3]).index_select(0, sel))
        v.index_copy_(0, rows, values.reshape(-1, values.shape[3]).index_select(0, sel))
        pos.index_copy_(0, rows, positions.reshape(-1).index_select(0, sel))
        store = cls(k, v, offsets, lengths, caps, pos, B, H)
        for name, t in (("counts", counts), ("scores", scores)):
            if t is not None:
                flat = t.new_ones((R,), dtype=torch.float32)
                flat.index_copy_(0, rows, t.reshape(-1).index_select(0, sel).to(torch.float32))
                setattr(store, name, flat)
        return store

    @classmethod
    def from_selection(cls, keys, values, positions, indices, kv_start) -> "RaggedStore":
        """Keep ``indices`` ``[B, H, k]`` (ascending, ``-1`` padded) of the
        uniform ``keys``/``values`` ``[B, H, n, D]``; slots before
        ``kv_start[b]`` (left padding) are dropped, so no head holds a pad."""
        valid = (indices >= 0) & (indices >= kv_start[:, None, None])
        idx = indices.clamp_min(0)
        pick = lambda t: t.gather(2, idx[..., None].expand(-1, -1, -1, t.shape[3]))  # noqa: E731
        return cls.from_dense(pick(keys), pick(values), positions.gather(2, idx), valid)

    def _adopt(self, store: "RaggedStore") -> None:
        """Take over another ragged store's buffers and layout (no copy): how
        a layer's kept slots move into a query-aware reader's store."""
        for name in ("k", "v", "offsets", "lengths", "caps", "positions", "batch", "heads", "_host_lengths",
                     "_host_caps", "counts", "scores"):
            setattr(self, name, getattr(store, name))

    # ---------------------------------------------------------------- append
    def _grow(self, need: torch.Tensor) -> None:
        """Reallocate so head i holds ``need[i]`` rows; capacities grow by an
        eighth (at least 16 rows): geometric, so appends cost O(1) amortised,
        while the slack stays small next to the kept slots."""
        caps = torch.maximum(need, self.caps + torch.clamp(self.caps // 8, min=16))
        offsets = torch.cumsum(caps, 0) - caps
        R = int(caps.sum())
        # rows of every live slot, old and new places
        src = self.live_rows()
        dst = src - self.offsets.repeat_interleave(self.lengths) + offsets.repeat_interleave(self.lengths)
        k = self.k.new_empty((R, self.k.shape[1]))
        v = self.v.new_empty((R, self.v.shape[1]))
        pos = self.positions.new_zeros((R,))
        k[dst] = self.k[src]
        v[dst] = self.v[src]
        pos[dst] = self.positions[src]
        for name in self.row_state:
            old = getattr(self, name)
            if old is not None:
                new = old.new_ones((R,) + tuple(old.shape[1:]))
                new[dst] = old[src]
                setattr(self, name, new)
        self.k, self.v, self.positions = k, v, pos
        self.offsets, self.caps = offsets, caps
        self._host_caps = caps.detach().to("cpu", copy=True)

    def append(self, keys, values, first_position: int) -> None:
        """Append a chunk ``[B, H, q, D]`` to every head (positions
        ``first_position ..``). Copies the layer only when a head is full."""
        B, H, q = int(keys.shape[0]), int(keys.shape[1]), int(keys.shape[2])
        if B != self.batch or H != self.heads:
            raise ValueError(f"key_states: expected batch {self.batch} and {self.heads} kv heads, "
                             f"got {tuple(keys.shape)}")
        need = self.lengths + q
        if bool((self._host_lengths + q > self._host_caps).any()):
            self._grow(need)
        steps = torch.arange(q, device=self.offsets.device)
        rows = ((self.offsets + self.lengths)[:, None] + steps[None, :]).reshape(-1)
        self.k[rows] = keys.reshape(B * H * q, keys.shape[3]).to(self.k.dtype)
        self.v[rows] = values.reshape(B * H * q, values.shape[3]).to(self.v.dtype)
        self.positions[rows] = (steps + first_position).to(torch.int32).repeat(B * H)
        if self.counts is not None:
            self.counts[rows] = 1.0
        if self.scores is not None:
            self.scores[rows] = float("nan")
        self.lengths = need
        self._host_lengths += q

    def aligned_rows(self):
        """Each head's rows right-aligned in ``[B * H, M]`` (``M`` the
        longest head): ``(rows, live, start)``, ``rows`` int64 (0 where
        ``live`` is False), ``live`` bool, ``start`` int64 ``[B * H]`` the
        first live column of each head (``M - lengths``)."""
        M = self.max_length()
        start = M - self.lengths
        col = torch.arange(M, device=self.offsets.device)[None, :]
        live = col >= start[:, None]
        rows = (self.offsets[:, None] + col - start[:, None]).clamp_min(0)
        return torch.where(live, rows, torch.zeros_like(rows)), live, start

    def to_padded(self):
        """Left-padded dense copy for re-scoring, one row per head.

        Returns ``(keys [N, 1, M, D], values [N, 1, M, Dv], positions [N, M]
        int32, counts [N, M], scores [N, M], start [N])`` with ``N = B * H``,
        ``M`` the longest head and head ``i``'s slots in the last
        ``lengths[i]`` columns (``start[i] = M - lengths[i]`` pads, zero
        filled). ``counts`` are ones and ``scores`` NaN where not held.
        """
        N = self.batch * self.heads
        rows, live, start = self.aligned_rows()
        M = int(rows.shape[1])

        def take(t, fill):
            out = t.index_select(0, rows.reshape(-1)).reshape((N, M) + tuple(t.shape[1:]))
            mask = live.reshape((N, M) + (1,) * (t.ndim - 1))
            return torch.where(mask, out, torch.full_like(out, fill))

        keys, values = take(self.k, 0)[:, None], take(self.v, 0)[:, None]
        counts = take(self.counts, 1.0) if self.counts is not None else torch.ones((N, M), device=self.k.device)
        nan = float("nan")
        scores = take(self.scores, nan) if self.scores is not None else torch.full((N, M), nan, device=self.k.device)
        return keys, values, take(self.positions, 0), counts, scores, start

    # ------------------------------------------------------------ inspection
    def live_rows(self) -> torch.Tensor:
        """int64 ``[sum(lengths)]`` rows of the live slots, head by head."""
        head, within = segments(self.lengths)
        return self.offsets[head] + within

    def head(self, b: int, h: int):
        """``(keys [n, D], values [n, Dv], positions [n])`` views of one head's live slots."""
        i = b * self.heads + h
        start, n = int(self.offsets[i]), int(self.lengths[i])
        return self.k[start : start + n], self.v[start : start + n], self.positions[start : start + n]

    def tensors(self) -> list[torch.Tensor]:
        out = [self.k, self.v, self.offsets, self.lengths, self.caps, self.positions]
        out += [t for t in (self._host_lengths, self._host_caps) if t is not None]  # host mirrors
        return out + [t for t in (getattr(self, name) for name in self.row_state) if t is not None]

    def _layout_repr(self) -> str:
        """``batch=.., heads=.., slots per head=lo..hi`` for the reprs."""
        n = self._host_lengths
        span = f"{int(n.min())}..{int(n.max())}" if n.numel() else "empty"
        return f"batch={self.batch}, heads={self.heads}, slots per head={span}"

    def __repr__(self) -> str:
        return (f"RaggedStore({self._layout_repr()}, rows={int(self.k.shape[0])}, "
                f"merged={self.counts is not None})")

    def head_lengths(self) -> list[int]:
        return [int(x) for x in self._host_lengths.tolist()]

    @property
    def capacity(self) -> int:
        return int(self.caps.max()) if self.caps.numel() else 0

    def max_length(self) -> int:
        return int(self._host_lengths.max()) if self._host_lengths.numel() else 0

    # ------------------------------------------------------------- reorder
    def index_batch(self, idx) -> None:
        """Rows ``idx`` ``[B']`` of the batch, in that order (beam search):
        each new head copies its old head's rows, slack included."""
        idx = idx.to(self.offsets.device)
        H = self.heads
        src_head = (idx[:, None] * H + torch.arange(H, device=idx.device)[None, :]).reshape(-1)
        caps = self.caps[src_head]
        offsets = torch.cumsum(caps, 0) - caps
        head, within = segments(caps)
        src = self.offsets[src_head][head] + within
        self.k, self.v, self.positions = self.k[src], self.v[src], self.positions[src]
        for name in self.row_state:
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[src])
        host_idx = (idx.cpu()[:, None] * H + torch.arange(H)[None, :]).reshape(-1)
        self.lengths = self.lengths[src_head]
        self._host_lengths = self._host_lengths[host_idx]
        self.offsets, self.caps = offsets, caps
        self._host_caps = self._host_caps[host_idx]
        self.batch = int(idx.numel())

    # ----------------------------------------------------------- attention
    def attend(self, query, spec: AttentionSpec, kv_start=None, query_pos=None):
        """Only the C kernel reads this layout; a model option it lacks
        (softcap, sinks) runs on a padded copy in torch instead."""
        counts = self.counts if spec.count_bias else None
        if spec.plain and spec.window is None and query.dtype in _C_DTYPES and self.k.dtype == query.dtype:
            return ops.attention(query, self.k, self.v, scaling=spec.scaling, offsets=self.offsets,
                                 lengths=self.lengths, counts=counts)
        if spec.window is not None:
            raise NotImplementedError("a sliding-window layer is never stored per head")
        keys, values, _, cnt, _, start = self.to_padded()
        bias = torch.log(cnt) if counts is not None else None
        return padded_head_attention(query, keys, values, start, spec, self.heads, bias)
