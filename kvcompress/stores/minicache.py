"""MiniCache's cross-layer store: two adjacent layers share one merged pair.

A ``MergedPair`` holds what two layers ``(l-1, l)`` keep of their prefill
after MiniCache merged them (``docs/design.md``, "MiniCache"):

* per merged token and kv head one shared key direction and one shared value
  direction (the SLERP of the two layers' unit vectors, dtype of the cache)
  and each layer's key and value norms (float32 ``[B, H, m, 2]`` each);
* the retained tokens (the largest angular distances) whole, in each layer
  (``[B, H, r, D]`` keys and values per layer);
* the slot of every merged and retained token in the prefill (int32).

Each of the two layers has a ``MiniCacheStore`` that references the same
pair (its bytes are counted once: ``KVCache.memory_bytes`` and ``stats``
de-duplicate storages) and a uniform tail of its own for every token after
the prefill, which is never merged. Attention reconstructs the layer's view
into a scratch buffer per call (``ops.slerp_restore``: norm x direction for
merged tokens, the retained ones copied) followed by the tail, and runs the
uniform store's attention over it; reading the merged form directly in the
attention kernel is not built.
"""

from __future__ import annotations

import math

import torch

from .. import ops
from .base import AttentionSpec, LayerStore
from .masked import build_mask, masked_attention
from .uniform import UniformStore, c_decode_ok


class MergedPair:
    """The merged prefill of two adjacent layers (shared by their stores).

    Attributes
    ----------
    dir_k, dir_v : torch.Tensor
        ``[B, H, m, D]`` / ``[B, H, m, Dv]`` shared directions of the merged tokens.
    norms_k, norms_v : torch.Tensor
        float32 ``[B, H, m, 2]``: ``[..., 0]`` layer ``l-1``, ``[..., 1]`` layer ``l``.
    slots : torch.Tensor
        int32 ``[B, H, m]`` prefill slot of each merged token (ascending).
    kept_slots : torch.Tensor
        int32 ``[B, H, r]`` prefill slot of each retained token (ascending).
    kept : list
        ``[(keys, values), (keys, values)]``: the retained tokens ``[B, H, r,
        D]`` of layer ``l-1`` and of layer ``l``, exact.
    n : int
        Prefill slots of each layer (padding included).
    """

    def __init__(self, dir_k, dir_v, norms_k, norms_v, slots, kept_slots, kept, n: int):
        self.dir_k, self.dir_v, self.norms_k, self.norms_v = dir_k, dir_v, norms_k, norms_v
        self.slots, self.kept_slots, self.kept, self.n = slots, kept_slots, kept, n
        # index_batch is called once by each of the two layers; the first of
        # each pair of calls applies it
        self._calls = [0, 0]
        self._applied = 0

    @classmethod
    def merge(cls, k1, v1, k2, v2, kv_start, t: float, retain: float) -> "MergedPair":
        """Merge layer ``l-1``'s ``k1, v1`` and layer ``l``'s ``k2, v2`` (each
        ``[B, H, n, D]``, the same tokens) with SLERP parameter ``t``; per row
        ``b`` the ``ceil(retain * real_b)`` real tokens of largest angular
        distance stay whole (``real_b = n - kv_start[b]``), every row keeping
        the batch's largest such count ``r`` (a row that asked fewer keeps
        more exact tokens, never fewer). A token's distance is the larger of
        its key's and its value's, so one slot list serves keys and values."""
        B, H, n = (int(x) for x in k1.shape[:3])
        mk = ops.slerp_merge(k1, k2, t)
        mv = ops.slerp_merge(v1, v2, t)
        starts = [0] * B if kv_start is None else [int(s) for s in kv_start.tolist()]
        r = min(n, max((math.ceil(retain * (n - s) - 1e-9) for s in starts), default=0))
        device = k1.device
        if r > 0:
            dist = torch.maximum(mk.dist, mv.dist)
            kept_slots = ops.select_topk(dist, r, kv_start=kv_start)
        else:
            kept_slots = torch.zeros((B, H, 0), dtype=torch.int64, device=device)
        merged = torch.ones((B, H, n), dtype=torch.bool, device=device)
        merged.scatter_(2, kept_slots, False)
        slots = torch.arange(n, device=device).expand(B, H, n)[merged].view(B, H, n - r)
        dir_k, dir_v = ops.gather(mk.dir, mv.dir, slots)
        pick2 = slots[..., None].expand(B, H, n - r, 2)
        norms_k, norms_v = mk.norms.gather(2, pick2), mv.norms.gather(2, pick2)
        kept = [ops.gather(k1, v1, kept_slots), ops.gather(k2, v2, kept_slots)]
        return cls(dir_k, dir_v, norms_k, norms_v, slots.to(torch.int32), kept_slots.to(torch.int32), kept, n)

    @property
    def retained(self) -> int:
        return int(self.kept_slots.shape[2])

    def tensors(self) -> list:
        return [self.dir_k, self.dir_v, self.norms_k, self.norms_v, self.slots, self.kept_slots,
                *self.kept[0], *self.kept[1]]

    def restore(self, which: int, tail: UniformStore):
        """Layer ``which``'s (0: ``l-1``, 1: ``l``) keys and values ``[B, H, n
        + tail, D]``: the prefill reconstructed, then the tail's slots."""
        B, H = int(self.dir_k.shape[0]), int(self.dir_k.shape[1])
        extra = tail.n if tail.batch else 0
        k_out = self.dir_k.new_empty((B, H, self.n + extra, int(self.dir_k.shape[3])))
        v_out = self.dir_v.new_empty((B, H, self.n + extra, int(self.dir_v.shape[3])))
        k_keep, v_keep = self.kept[which]
        ops.slerp_restore(self.dir_k, self.norms_k, self.slots, which, k_out, kept=k_keep,
                          kept_slots=self.kept_slots)
        ops.slerp_restore(self.dir_v, self.norms_v, self.slots, which, v_out, kept=v_keep,
                          kept_slots=self.kept_slots)
        if extra:
            k_out[:, :, self.n:] = tail.keys
            v_out[:, :, self.n:] = tail.values
        return k_out, v_out

    def index_batch(self, idx, which: int) -> None:
        """Reorder batch rows once for the two layers that share the pair."""
        self._calls[which] += 1
        if self._calls[which] <= self._applied:
            return
        self._applied += 1
        idx = idx.to(self.dir_k.device)
        pick = lambda x: x.index_select(0, idx)  # noqa: E731
        self.dir_k, self.dir_v, self.norms_k, self.norms_v = map(pick, (self.dir_k, self.dir_v, self.norms_k,
                                                                       self.norms_v))
        self.slots, self.kept_slots = pick(self.slots), pick(self.kept_slots)
        self.kept = [tuple(map(pick, kv)) for kv in self.kept]


class MiniCacheStore(LayerStore):
    """One layer of a MiniCache pair: its view of the shared ``MergedPair``
    (``which`` 0 for layer ``l-1``, 1 for layer ``l``) plus a uniform tail of
    the tokens that came after the merge (decoded tokens, later chunks)."""

    kind = "minicache"

    def __init__(self, pair: MergedPair, which: int):
        self.pair = pair
        self.which = which
        self.tail = UniformStore()

    def __repr__(self) -> str:
        return (f"MiniCacheStore(layer {'l-1' if self.which == 0 else 'l'} of a pair, prefill={self.pair.n}, "
                f"retained={self.pair.retained}, tail={self.tail.n})")

    @classmethod
    def merge_layers(cls, first: UniformStore, second: UniformStore, kv_start, t: float, retain: float):
        """The two stores of a merged pair, from the uniform stores of layers
        ``l-1`` and ``l`` holding the same tokens."""
        pair = MergedPair.merge(first.keys, first.values, second.keys, second.values, kv_start, t, retain)
        return cls(pair, 0), cls(pair, 1)

    # ------------------------------------------------------------ geometry
    @property
    def batch(self) -> int:
        return int(self.pair.dir_k.shape[0])

    @property
    def heads(self) -> int:
        return int(self.pair.dir_k.shape[1])

    @property
    def n(self) -> int:
        return self.pair.n + self.tail.n

    @property
    def widths(self) -> tuple[int, int, int]:
        """``(D, Dv, bytes per element)`` of the layer's keys and values."""
        d = self.pair.dir_k
        return int(d.shape[3]), int(self.pair.dir_v.shape[3]), d.element_size()

    def max_length(self) -> int:
        return self.n

    def head_lengths(self) -> list[int]:
        return [self.n] * (self.batch * self.heads)

    def tensors(self) -> list:
        return self.pair.tensors() + self.tail.tensors()

    # ------------------------------------------------------------- writing
    def append(self, keys, values, first_position: int) -> None:
        self.tail.append(keys, values, first_position)

    def index_batch(self, idx) -> None:
        self.pair.index_batch(idx, self.which)
        self.tail.index_batch(idx)

    # ----------------------------------------------------------- attention
    def attend(self, query, spec: AttentionSpec, kv_start=None, query_pos=None):
        if spec.window is not None:
            # sliding layers are never paired (KVCache._merge_pair)
            raise AssertionError("a MiniCache pair has no sliding window")
        keys, values = self.pair.restore(self.which, self.tail)
        if c_decode_ok(query, keys, values, spec):
            return ops.attention(query, keys, values, scaling=spec.scaling, kv_start=kv_start)
        mask = build_mask(int(query.shape[0]), int(query.shape[2]), int(keys.shape[2]), query.device,
                          kv_start=kv_start)
        return masked_attention(query, keys, values, spec, mask)
