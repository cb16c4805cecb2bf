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
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import ops
from .base import AttentionSpec
from .uniform import UniformStore, read_count, sparse_step

SELECT, SPARSE = "select", "sparse"


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
        self.shared["tidal"] = TidalSelection(self._newest(), self.batch, chosen, positions)

    def _own_slots(self, sel: "TidalSelection", kv_start):
        """``[B, H, k]`` int64 ascending: this layer's slots holding the
        selected positions, topped up with its newest other real slots up to
        ``k = min(token_budget, real slots)``; None when that reads every slot."""
        k = read_count(self.token_budget, self.n, kv_start)
        if k is None:
            return None
        pos = self.column("positions").to(torch.int64)  # [B, H, n], ascending per head
        want = sel.positions.to(torch.int64)  # [B, H, k_sel], ascending
        at = torch.searchsorted(want, pos).clamp_max(want.shape[2] - 1)
        hit = want.gather(2, at) == pos
        slot = torch.arange(self.n, device=pos.device)
        # selected slots first, then the newest; padding never (read_count leaves room)
        rank = hit.to(torch.int64) * (self.n + 1) + slot
        if kv_start is not None:
            rank = rank.masked_fill(slot < kv_start.to(pos.device)[:, None, None], -1)
        return rank.topk(k, dim=-1).indices.sort(dim=-1).values.contiguous()

    def attend(self, query, spec: AttentionSpec, kv_start=None, query_pos=None):
        self.last_read = None
        step = sparse_step(query, spec) and self.n > self.token_budget
        if self.role == SELECT:
            out = super().attend(query, spec, kv_start=kv_start, query_pos=query_pos)
            if step:
                self._select(query, spec, kv_start)
            else:
                self.shared.pop("tidal", None)
            return out
        sel = self.shared.get("tidal") if step else None
        if sel is not None and sel.newest == self._newest() and sel.batch == self.batch:
            read = self._own_slots(sel, kv_start)
            if read is not None:
                self.last_read = read
                self.sparse_steps += 1
                return ops.attention_pages(query, self.keys, self.values, read, 1, scaling=spec.scaling,
                                           kv_start=kv_start)
        return super().attend(query, spec, kv_start=kv_start, query_pos=query_pos)


class TidalSelection(NamedTuple):
    """A selection layer's choice for one decode step.

    Attributes
    ----------
    newest : int
        Position of the step's token (the step it is valid for).
    batch : int
    slots : torch.Tensor
        int64 ``[B, H, k]`` ascending slot indices in the selection layer.
    positions : torch.Tensor
        int32 ``[B, H, k]`` the token positions those slots hold.
    """

    newest: int
    batch: int
    slots: torch.Tensor
    positions: torch.Tensor
