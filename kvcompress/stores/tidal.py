"""Position-persistent sparse decoding (TidalDecode): a few selection layers
choose tokens with full attention, the layers after them read only those.

A ``TidalStore`` is a :class:`UniformStore` with a role. At a decode step
(one query per row) over more than ``token_budget`` slots:

* a **selection** layer attends densely, then scores every slot with the
  query's softmax attention (``ops.window_scores`` over one query, the GQA
  group reduced by ``gqa``), keeps the top ``token_budget`` slots per kv head
  with the newest one forced (``ops.select_topk``) and publishes their
  **token positions** in the cache's shared state;
* a **sparse** layer reads, per kv head, its own slots holding those
  positions, in place (``ops.attention_pages`` with pages of one slot).

When nothing is evicted every layer holds the same tokens and the sparse
layer reads exactly the selected slots. Composed with an evictor
(``SnapKV(ratio=0.5) + TidalDecode(...)``) each layer keeps its own tokens,
so a selected position may be missing from a later layer: that head then
reads the positions it holds and tops up with its newest other slots, so it
reads as many slots as without eviction (``min(token_budget, real slots)``).

The selection is valid only for the step that made it (same newest token
position and batch): otherwise, and for prefill chunks, softcap, sinks or
windows, a layer reads every slot.

A batch whose rows hold leading padding (left-padded prompts, or an
evictor's filler) selects and reads row by row, each row over its own real
slots with its own count, as its layer alone does; a row whose slots fit
the budget selects nothing and its sparse layers read all of theirs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import ops
from .base import AttentionSpec
from .ragged import RaggedStore
from .uniform import UniformStore, dense_row, front_padded, padded_starts, read_count, sparse_step

SELECT, SPARSE = "select", "sparse"


def published(store) -> list:
    """The selection a selection layer last published, while it is still
    the cache's current one: its tensors count in the bytes of the layer
    that made it (the sparse layers only read it)."""
    sel = store.shared.get("tidal")
    if store.role != SELECT or sel is None or sel is not getattr(store, "_published", None):
        return []
    return [sel.slots, sel.positions]


class TidalStore(UniformStore):
    """Uniform slots that select (or read) the tokens of a decode step.

    Attributes
    ----------
    role : {"select", "sparse"}
    token_budget : int
        Slots a sparse layer reads per kv head.
    shared : dict
        The cache's state shared by its layers; ``shared["tidal"]`` is the
        last :class:`TidalSelection`.
    last_read : torch.Tensor or None
        The slots the last sparse step read (None after a dense step).
    """

    kind = "tidal"

    def __init__(self, role: str, token_budget: int, shared: dict, gqa: str = "max"):
        super().__init__()
        self.role = role
        self.token_budget = int(token_budget)
        self.shared = shared
        self.gqa = gqa
        self.last_read = None
        self.sparse_steps = 0

    @classmethod
    def from_uniform(cls, store: UniformStore, role: str, token_budget: int, shared: dict,
                     gqa: str = "max") -> "TidalStore":
        new = cls(role, token_budget, shared, gqa)
        new._adopt(store)
        return new

    def tensors(self) -> list:
        return super().tensors() + published(self) + ([self.last_read] if self.last_read is not None else [])

    def __repr__(self) -> str:
        shape = None if self._k is None else tuple(self.keys.shape)
        return (f"TidalStore({self.role}, slots={shape}, token_budget={self.token_budget}, "
                f"sparse_steps={self.sparse_steps})")

    def _newest(self) -> int:
        """Position of the newest slot (the decode step's token), the same in
        every layer of a step."""
        return int(self._cols["positions"][0, 0, self.lo + self.n - 1])

    def _select(self, query, spec: AttentionSpec, kv_start):
        k = read_count(self.token_budget, self.n, kv_start)
        if k is None:
            self.shared.pop("tidal", None)  # every slot fits: the sparse layers read them all
            return
        scores = ops.window_scores(query, self.keys, scaling=spec.scaling, gqa=self.gqa, kv_start=kv_start)
        chosen = ops.select_topk(scores, k, sinks=0, window=1, kv_start=kv_start).contiguous()
        positions = self.column("positions").gather(2, chosen)
        self.shared["tidal"] = self._published = TidalSelection(self._newest(), self.batch, chosen, positions)

    def _own_slots(self, sel: "TidalSelection", kv_start):
        """``[B, H, k]`` int64 ascending: this layer's slots holding the
        selected positions, topped up with its newest other real slots up to
        ``k = min(token_budget, real slots)``; None when that reads every slot."""
        k = read_count(self.token_budget, self.n, kv_start)
        if k is None:
            return None
        return _selected_first(self.column("positions"), sel.positions, k, kv_start)

    # ---------------------------------------------------- padded rows
    # A batch whose rows hold leading padding (or filler in front of a row
    # that kept fewer slots) selects and reads row by row, each row as its
    # layer alone does: one read count for the batch, capped by its
    # most-padded row, would make the other rows read fewer slots.

    def _select_rows(self, query, spec: AttentionSpec, starts: list[int]) -> None:
        """Each row's top ``token_budget`` real slots, or none (``rows[b]``
        False: the row's slots all fit, its sparse layers read them all)."""
        picks = []
        for b, start in enumerate(starts):
            keys = self.keys[b : b + 1, :, start:]
            k = read_count(self.token_budget, int(keys.shape[2]))
            if k is None:
                picks.append(None)
                continue
            scores = ops.window_scores(query[b : b + 1], keys, scaling=spec.scaling, gqa=self.gqa)
            picks.append(ops.select_topk(scores, k, sinks=0, window=1) + start)  # slots of the layer
        if all(p is None for p in picks):
            self.shared.pop("tidal", None)
            return
        slots = front_padded(picks, self.heads, query.device)
        positions = self.column("positions").gather(2, slots.clamp_min(0)).masked_fill(slots < 0, -1)
        self.shared["tidal"] = self._published = TidalSelection(self._newest(), self.batch, slots, positions,
                                              tuple(p is not None for p in picks))

    def _read_rows(self, query, spec: AttentionSpec, sel: "TidalSelection", starts: list[int]):
        """Each row reads its own slots of the selected positions (topped up
        with its newest), or all of them where its selection row read
        everything (``sel.rows``) or its slots fit the budget."""
        outs, reads = [], []
        for b, start in enumerate(starts):
            q = query[b : b + 1]
            keys, values = self.keys[b : b + 1, :, start:], self.values[b : b + 1, :, start:]
            n = int(keys.shape[2])
            k = read_count(self.token_budget, n)
            read = None
            if k is not None and (sel.rows is None or sel.rows[b]):
                read = _selected_first(self.column("positions")[b : b + 1, :, start:], sel.positions[b : b + 1], k)
            outs.append(dense_row(q, keys, values, spec) if read is None
                        else ops.attention_pages(q, keys, values, read, 1, scaling=spec.scaling))
            reads.append(None if read is None else read + start)
        if any(r is not None for r in reads):
            self.sparse_steps += 1
            self.last_read = front_padded(reads, self.heads, query.device)
        return torch.cat(outs, 0)

    def attend(self, query, spec: AttentionSpec, kv_start=None, query_pos=None):
        self.last_read = None
        step = sparse_step(query, spec) and self.n > self.token_budget
        starts = padded_starts(kv_start) if step else None
        if self.role == SELECT:
            out = super().attend(query, spec, kv_start=kv_start, query_pos=query_pos)
            if step and starts is not None:
                self._select_rows(query, spec, starts)
            elif step:
                self._select(query, spec, kv_start)
            else:
                self.shared.pop("tidal", None)
            return out
        sel = self.shared.get("tidal") if step else None
        if sel is not None and sel.newest == self._newest() and sel.batch == self.batch:
            if starts is not None or sel.rows is not None:
                return self._read_rows(query, spec, sel, starts or [0] * self.batch)
            read = self._own_slots(sel, kv_start)
            if read is not None:
                self.last_read = read
                self.sparse_steps += 1
                return ops.attention_pages(query, self.keys, self.values, read, 1, scaling=spec.scaling,
                                           kv_start=kv_start)
        return super().attend(query, spec, kv_start=kv_start, query_pos=query_pos)


def _selected_first(positions, selected, k: int, kv_start=None) -> torch.Tensor:
    """``[B, H, k]`` int64 ascending: the slots whose position (``positions``
    ``[B, H, n]``, ascending per head) is among ``selected`` (``[B, H, s]``,
    ascending, ``-1`` matching none), topped up with the newest other slots;
    slots before ``kv_start[b]`` (padding) never (``k`` leaves them room)."""
    pos, want = positions.to(torch.int64), selected.to(torch.int64)
    n = int(pos.shape[2])
    at = torch.searchsorted(want, pos).clamp_max(want.shape[2] - 1)
    hit = want.gather(2, at) == pos
    slot = torch.arange(n, device=pos.device)
    rank = hit.to(torch.int64) * (n + 1) + slot
    if kv_start is not None:
        rank = rank.masked_fill(slot < kv_start.to(pos.device)[:, None, None], -1)
    return rank.topk(k, dim=-1).indices.sort(dim=-1).values.contiguous()


class TidalSelection(NamedTuple):
    """A selection layer's choice for one decode step.

    Attributes
    ----------
    newest : int
        Position of the step's token (the step it is valid for).
    batch : int
    slots : torch.Tensor
        int64 ``[B, H, k]`` ascending slot indices in the selection layer,
        ``-1`` in front where a row selected fewer (rows selected apart,
        ``rows``; a ragged selection layer's count from each head's first
        slot).
    positions : torch.Tensor
        int32 ``[B, H, k]`` the token positions those slots hold, ascending,
        ``-1`` in front where a head selected fewer.
    rows : tuple of bool or None
        Rows selected apart (a padded batch, :meth:`TidalStore._select_rows`):
        per row whether it selected; a row that did not held no more slots
        than the budget, and its sparse layers read all of theirs, as alone.
        None: every row selected.
    """

    newest: int
    batch: int
    slots: torch.Tensor | None
    positions: torch.Tensor
    rows: tuple | None = None


class RaggedTidalStore(RaggedStore):
    """Per-head slots (a head-wise or merging evictor's layer) that select
    (or read) the tokens of a decode step: TidalDecode on what the evictor kept.

    The roles and the hand-off are :class:`TidalStore`'s; the slots of each
    head are laid right-aligned in ``[B * H, M]`` (``M`` the longest head),
    so its newest slot is the last column and its first real one column
    ``M - lengths[i]``.

    * A **selection** layer attends densely (the ragged kernel), then scores
      each head's slots with the decode query's softmax attention in float32
      (torch over a right-aligned copy of the layer's keys, ``log(count)``
      joining a merged slot's logit as it does in the attention), the GQA
      group reduced by ``gqa``, and publishes the top ``token_budget`` slots'
      **positions** per head, the newest forced; a head with fewer slots
      publishes them all, ``-1`` in front.
    * A **sparse** layer reads per head its slots holding selected positions,
      topped up with its newest other slots to ``min(token_budget, its
      slots)`` (as a uniform sparse layer after an eviction), by index in
      place (``ops.attention_pages``, pages of one slot, merge counts
      included).
    Built from a layer's ``RaggedStore`` with ``from_ragged`` (no copy).
    """

    kind = "tidal-ragged"

    @classmethod
    def from_ragged(cls, store: RaggedStore, role: str, token_budget: int, shared: dict,
                    gqa: str = "max") -> "RaggedTidalStore":
        new = cls.__new__(cls)
        new._adopt(store)
        new.role, new.token_budget, new.shared, new.gqa = role, int(token_budget), shared, gqa
        new.last_read = None
        new.sparse_steps = 0
        return new

    def tensors(self) -> list:
        return super().tensors() + published(self) + ([self.last_read] if self.last_read is not None else [])

    def __repr__(self) -> str:
        return (f"RaggedTidalStore({self.role}, {self._layout_repr()}, "
                f"token_budget={self.token_budget}, merged={self.counts is not None}, "
                f"sparse_steps={self.sparse_steps})")

    def _newest(self) -> int:
        """Position of the step's token: the last slot of the first head
        (every head holds it once the step is appended)."""
        return int(self.positions[int(self.offsets[0]) + int(self._host_lengths[0]) - 1])

    def _select(self, query, spec: AttentionSpec) -> None:
        M = self.max_length()
        if M <= self.token_budget:
            self.shared.pop("tidal", None)  # every head's slots fit: the sparse layers read them all
            return
        B, H = self.batch, self.heads
        N, g, D = B * H, int(query.shape[1]) // H, int(query.shape[3])
        rows, real, start = self.aligned_rows()
        logits = torch.bmm(query[:, :, 0].reshape(N, g, D).float(), self.k[rows].float().transpose(1, 2))
        logits = logits * spec.scaling
        if spec.count_bias and self.counts is not None:
            logits = logits + self.counts[rows].log()[:, None, :]
        logits = logits.masked_fill(~real[:, None, :], float("-inf"))
        probs = torch.softmax(logits, -1).nan_to_num(0.0)  # an empty head has no slot to weigh
        scores = probs.amax(1) if self.gqa == "max" else probs.mean(1)
        cols = ops.select_topk(scores.view(N, 1, M).contiguous(), self.token_budget, sinks=0, window=1,
                               kv_start=start).view(N, -1)
        within = cols - start[:, None]
        held = within >= 0
        positions = torch.where(held, self.positions[rows.gather(1, cols)].to(torch.int64), -1)
        k = int(cols.shape[1])
        self.shared["tidal"] = self._published = TidalSelection(self._newest(), B, within.clamp_min(-1).view(B, H, k),
                                              positions.to(torch.int32).view(B, H, k))

    def _own_slots(self, sel: "TidalSelection"):
        """int64 ``[B, H, k]``: each head's slots holding the selected
        positions, topped up with its newest other slots, ascending after
        ``-1`` padding (a head with fewer than ``k`` slots reads them all);
        None when every head fits the budget."""
        M = self.max_length()
        if M <= self.token_budget:
            return None
        B, H = self.batch, self.heads
        rows, real, start = self.aligned_rows()
        pos = torch.where(real, self.positions[rows].to(torch.int64), -2)  # -2 matches no selection (pads are -1)
        want = sel.positions.reshape(B * H, -1).to(torch.int64)
        at = torch.searchsorted(want, pos).clamp_max(want.shape[1] - 1)
        hit = (want.gather(1, at) == pos) & real
        col = torch.arange(M, device=pos.device)[None, :]
        rank = torch.where(real, hit.to(torch.int64) * (M + 1) + col, -1)
        rank[:, -1] = 2 * (M + 1)  # the newest slot holds the query itself
        top = rank.topk(self.token_budget, dim=-1).indices.sort(dim=-1).values
        return (top - start[:, None]).clamp_min(-1).view(B, H, -1).contiguous()

    def attend(self, query, spec: AttentionSpec, kv_start=None, query_pos=None):
        self.last_read = None
        step = sparse_step(query, spec) and query.dtype == self.k.dtype and self.max_length() > self.token_budget
        if self.role == SELECT:
            out = super().attend(query, spec, kv_start=kv_start, query_pos=query_pos)
            if step:
                self._select(query, spec)
            else:
                self.shared.pop("tidal", None)
            return out
        sel = self.shared.get("tidal") if step else None
        if sel is not None and sel.newest == self._newest() and sel.batch == self.batch:
            read = self._own_slots(sel)
            if read is not None:
                self.last_read = read
                self.sparse_steps += 1
                return ops.attention_pages(query, self.k, self.v, read, 1, scaling=spec.scaling,
                                           counts=self.counts if spec.count_bias else None, offsets=self.offsets,
                                           lengths=self.lengths)
        return super().attend(query, spec, kv_start=kv_start, query_pos=query_pos)
