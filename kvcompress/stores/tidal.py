"""Position-persistent sparse decoding (TidalDecode): a few selection layers
choose tokens with full attention, the layers after them read only those.

A ``TidalStore`` is a :class:`UniformStore` with a role. At a decode step
(one query per row) over more than ``token_budget`` slots:

* a **selection** layer attends densely, then scores every slot with the
  query's softmax attention (``ops.window_scores`` over one query, the GQA
  group reduced by ``gqa``), keeps the top ``token_budget`` slots per kv head
  with the newest one forced (``ops.select_topk``) and publishes them in the
  cache's shared state;
* a **sparse** layer reads only the published slots, in place
  (``ops.attention_pages`` with pages of one slot).

The selection is valid only for the step that made it (same slot count and
batch): otherwise, and for prefill chunks, softcap, sinks or windows, a layer
reads every slot. Every layer holds the same tokens (nothing is evicted), so
a slot index means the same token in all of them.
"""

from __future__ import annotations

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
        The cache's state shared by its layers; ``shared["tidal"]`` is
        ``(n, batch, indices [B, H, k] int64)`` of the last selection.
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

    def _select(self, query, spec: AttentionSpec, kv_start):
        k = read_count(self.token_budget, self.n, kv_start)
        if k is None:
            self.shared.pop("tidal", None)  # every slot fits: the sparse layers read them all
            return
        scores = ops.window_scores(query, self.keys, scaling=spec.scaling, gqa=self.gqa, kv_start=kv_start)
        chosen = ops.select_topk(scores, k, sinks=0, window=1, kv_start=kv_start)
        self.shared["tidal"] = (self.n, self.batch, chosen.contiguous())

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
        if sel is not None and sel[0] == self.n and sel[1] == self.batch:
            self.last_read = sel[2]
            self.sparse_steps += 1
            return ops.attention_pages(query, self.keys, self.values, sel[2], 1, scaling=spec.scaling,
                                       kv_start=kv_start)
        return super().attend(query, spec, kv_start=kv_start, query_pos=query_pos)
