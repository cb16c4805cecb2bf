"""MiniCache's cross-layer store: two adjacent layers share one merged pair.

A ``MergedPair`` holds what two layers ``(l-1, l)`` keep of their prefill
after MiniCache merged them (``docs/design.md``, "MiniCache"):

* per merged token and kv head one shared key direction and one shared value
  direction (the SLERP of the two layers' unit vectors, dtype of the cache)
  and each layer's key and value norms (float32 ``[B, H, m, 2]`` each);
* per layer the tokens it keeps whole (``[B, H, w, D]`` keys and values): the
  retained ones (the largest angular distances) and, composed with an
  evictor, the tokens the other layer did not keep;
* the slot of every merged token in each layer's view and of every whole
  token in its layer's (int32, -1 padding: heads hold different counts).

Each of the two layers has a ``MiniCacheStore`` that references the same
pair (its bytes are counted once: ``KVCache.memory_bytes`` and ``stats``
de-duplicate storages) and a uniform tail of its own for every token after
the prefill, which is never merged. A decode step reads the merged form in
place (``ops.minicache_attention``); other calls (prefill chunks, a packed
pair, softcap or sinks) reconstruct the layer's view into a scratch buffer
(``ops.slerp_restore``: norm x direction for merged tokens, the whole ones
copied) followed by the tail and run the usual attention over it.
"""

from __future__ import annotations

import torch

from .. import ops
from ..errors import KVCompressUnsupportedError
from .base import AttentionSpec, LayerStore
from .masked import build_mask, masked_attention, padded_head_attention
from .uniform import _C_DTYPES, UniformStore, c_decode_ok


def _compact(mask, n: int):
    """Indices ``[B, H, n]`` of the True entries of ``mask`` ``[B, H, L]``
    in ascending order, -1 padded (each (b, h) has at most ``n``)."""
    L = int(mask.shape[-1])
    key = torch.where(mask, torch.arange(L, device=mask.device), L)
    idx = key.sort(dim=-1).values[..., :n]
    return torch.where(idx < L, idx, -1)


def _flag(shape, idx, device):
    """Bool ``shape`` ``[B, H, L]`` with the entries ``idx`` (-1: none) set."""
    L = shape[-1]
    out = torch.zeros(shape[:-1] + (L + 1,), dtype=torch.bool, device=device)
    out.scatter_(2, torch.where(idx >= 0, idx, L), True)
    return out[..., :L]


class MergedPair:
    """The merged prefill of two adjacent layers (shared by their stores).

    Every (b, h) has its own counts (an evictor keeps different tokens per
    layer and head), so the lists are padded to the longest; a padding entry
    has slot -1 and is never read.

    Attributes
    ----------
    dir_k, dir_v : torch.Tensor
        ``[B, H, m, D]`` / ``[B, H, m, Dv]`` shared directions of the merged tokens.
    norms_k, norms_v : torch.Tensor
        float32 ``[B, H, m, 2]``: ``[..., 0]`` layer ``l-1``, ``[..., 1]`` layer ``l``.
    slots : list
        ``[slots of layer l-1, slots of layer l]``, each int32 ``[B, H, m]``:
        where a merged token sits in that layer's view (-1 padding).
    whole : list
        Per layer ``(keys, values, slots)``: the tokens it keeps unmerged
        (``[B, H, w, D]``, int32 ``[B, H, w]`` slots, -1 padding): the
        retained ones and, composed with an evictor, those the other layer
        did not keep.
    n : list
        Slots of each layer's view (the slots it held when merged).
    retained : torch.Tensor
        Host int64 ``[B, H]``: tokens retained by distance (bookkeeping of
        the merge, counted in the bytes as everything held is).
    """

    def __init__(self, dir_k, dir_v, norms_k, norms_v, slots, whole, n, retained, starts=None, counts=None):
        self.dir_k, self.dir_v, self.norms_k, self.norms_v = dir_k, dir_v, norms_k, norms_v
        self.slots, self.whole, self.n, self.retained = slots, whole, n, retained
        # per-head layers (after a head-wise or merging evictor): each layer's
        # [B, H] first live slot per head, and merge counts
        # (float32 [B, H, m, 2] of the merged tokens, [B, H, w] of each layer's whole ones)
        self.starts, self.counts = starts, counts
        self.packing: tuple[int, int] | None = None
        self._packed: dict | None = None
        # index_batch is called once by each of the two layers; the first of
        # each pair of calls applies it
        self._calls = [0, 0]
        self._applied = 0

    @classmethod
    def merge(cls, held, t: float, retain: float) -> "MergedPair":
        """Merge two layers' held slots: ``held`` is ``[(keys, values,
        positions, start, counts), ...]`` for layers ``l-1`` and ``l`` (``[B,
        H, n_i, D]`` keys and values, int ``[B, H, n_i]`` token positions
        ascending per head, leading masked slots ``start``: a host list per
        row, or an int64 ``[B, H]`` tensor per head for per-head layers, and
        float32 ``[B, H, n_i]`` merge counts or None).

        The tokens both layers hold (the same position in both) are merged
        with SLERP parameter ``t``, except, per (b, h), the ``ceil(retain *
        shared)`` of largest angular distance, which stay whole in both
        layers; a token's distance is the larger of its key's and its
        value's. Tokens only one layer holds stay whole in it."""
        held = [tuple(h) + (None,) * (5 - len(h)) for h in held]  # counts are optional
        (ka, va, pa, sa_, ca), (kb, vb, pb, sb_, cb) = held
        B, H = int(ka.shape[0]), int(ka.shape[1])
        na, nb = int(ka.shape[2]), int(kb.shape[2])
        device = ka.device
        T = 1 + max(int(pa.max()) if na else 0, int(pb.max()) if nb else 0)
        per_head = isinstance(sa_, torch.Tensor) or isinstance(sb_, torch.Tensor)

        def heads_start(start):
            if isinstance(start, torch.Tensor):
                return start.to(device=device, dtype=torch.int64)
            return torch.tensor(start, dtype=torch.int64, device=device)[:, None].expand(B, H).contiguous()

        def slot_map(pos, start, n):
            """``[B, H, T]`` slot of each token position in the layer (-1: not held)."""
            st = heads_start(start)
            valid = torch.arange(n, device=device)[None, None, :] >= st[..., None]
            m = torch.full((B, H, T + 1), -1, dtype=torch.int64, device=device)
            m.scatter_(2, torch.where(valid, pos.long(), T), torch.arange(n, device=device).expand(B, H, n))
            return m[..., :T], valid

        map_a, valid_a = slot_map(pa, sa_, na)
        map_b, valid_b = slot_map(pb, sb_, nb)
        shared = (map_a >= 0) & (map_b >= 0)
        count = shared.sum(-1)  # [B, H]
        C = int(count.max()) if count.numel() else 0
        tok = _compact(shared, C)
        ok = tok >= 0
        at_a = torch.where(ok, map_a.gather(2, tok.clamp_min(0)), -1)
        at_b = torch.where(ok, map_b.gather(2, tok.clamp_min(0)), -1)
        k1, v1 = ops.gather(ka, va, at_a.clamp_min(0))
        k2, v2 = ops.gather(kb, vb, at_b.clamp_min(0))
        mk, mv = ops.slerp_merge(k1, k2, t), ops.slerp_merge(v1, v2, t)
        want = torch.ceil(count.double() * retain - 1e-9).long()
        kept = torch.zeros((B, H, C), dtype=torch.bool, device=device)
        if C and int(want.max()) > 0:
            # a head asking none while others ask some keeps one (more exact,
            # never less); padding entries rank last and are dropped by `ok`
            dist = torch.where(ok, torch.maximum(mk.dist, mv.dist), -1.0)
            sel = ops.select_topk(dist, want.clamp(1, C))
            kept = _flag((B, H, C), sel, device) & ok
        merged = ok & ~kept
        M = int(merged.sum(-1).max()) if merged.numel() else 0
        mi = _compact(merged, M)
        pick = mi.clamp_min(0)
        rows = lambda x: x.gather(2, pick[..., None].expand(-1, -1, -1, int(x.shape[3])))  # noqa: E731
        slots = [torch.where(mi >= 0, at.gather(2, pick), -1) for at in (at_a, at_b)]
        whole, whole_counts = [], []
        for (k, v, _, _, c), valid, sl, n in ((held[0], valid_a, slots[0], na), (held[1], valid_b, slots[1], nb)):
            mask = valid & ~_flag((B, H, n), sl, device)
            w = _compact(mask, int(mask.sum(-1).max()) if mask.numel() else 0)
            wk, wv = ops.gather(k, v, w.clamp_min(0))
            whole.append((wk, wv, w.to(torch.int32)))
            whole_counts.append(None if c is None else c.float().gather(2, w.clamp_min(0)))
        counts = None
        if ca is not None or cb is not None:
            ones = lambda n: torch.ones((B, H, n), device=device)  # noqa: E731
            ca_, cb_ = (ones(na) if ca is None else ca.float()), (ones(nb) if cb is None else cb.float())
            merged_counts = torch.stack([ca_.gather(2, slots[0].clamp_min(0)), cb_.gather(2, slots[1].clamp_min(0))],
                                        -1)
            whole_counts = [ones(int(w[2].shape[2])) if c is None else c for w, c in zip(whole, whole_counts)]
            counts = (merged_counts, whole_counts)
        starts = [heads_start(sa_), heads_start(sb_)] if per_head else None
        return cls(rows(mk.dir), rows(mv.dir), rows(mk.norms), rows(mv.norms), [x.to(torch.int32) for x in slots],
                   whole, [na, nb], (kept.sum(-1)).cpu(), starts, counts)

    # ------------------------------------------------------------ packing
    def pack(self, bits: int, group: int) -> None:
        """Quantize the pair's directions and whole tokens with KIVI's rules
        (``ops.pack_keys``: keys per channel over ``group`` tokens;
        ``ops.pack_values``: values per token over ``group`` channels); the
        norms and slots stay as they are. ``restore`` unpacks them."""
        self.packing = (bits, group)
        self._dtype = self.dir_k.dtype
        self._widths = (int(self.dir_k.shape[3]), int(self.dir_v.shape[3]))
        pk = lambda x: tuple(ops.pack_keys(x, bits, group))  # noqa: E731
        pv = lambda x: tuple(ops.pack_values(x, bits, group))  # noqa: E731
        self._packed = {"dir_k": pk(self.dir_k), "dir_v": pv(self.dir_v),
                        "whole": [(pk(k), pv(v)) for k, v, _ in self.whole]}
        # only the codes are held from now on
        self.dir_k = self.dir_v = None
        self.whole = [(None, None, s) for _, _, s in self.whole]

    def _unpacked(self, which: int):
        """(dir_k, dir_v, whole keys, whole values) of layer ``which`` in the cache's dtype."""
        if self._packed is None:
            wk, wv, _ = self.whole[which]
            return self.dir_k, self.dir_v, wk, wv
        bits, group = self.packing
        dt = str(self._dtype).replace("torch.", "")
        uk = lambda p: ops.unpack_keys(*p, bits, group, dtype=dt)  # noqa: E731
        uv = lambda p, d: ops.unpack_values(*p, bits, group, head_dim=d, dtype=dt)  # noqa: E731
        D, Dv = self._widths
        wk, wv = self._packed["whole"][which]
        return uk(self._packed["dir_k"]), uv(self._packed["dir_v"], Dv), uk(wk), uv(wv, Dv)

    def tensors(self) -> list:
        if self._packed is not None:
            parts = [*self._packed["dir_k"], *self._packed["dir_v"]]
            for k, v in self._packed["whole"]:
                parts += [*k, *v]
            return parts + [self.norms_k, self.norms_v, *self.slots, self.whole[0][2], self.whole[1][2]] + \
                self._extra()
        return [self.dir_k, self.dir_v, self.norms_k, self.norms_v, *self.slots, *self.whole[0], *self.whole[1]] + \
            self._extra()

    def _extra(self) -> list:
        out = list(self.starts or []) + ([self.retained] if isinstance(self.retained, torch.Tensor) else [])
        if self.counts is not None:
            out += [self.counts[0], *self.counts[1]]
        return out

    def view_counts(self, which: int, tail: UniformStore):
        """float32 ``[B, H, n + tail]`` merge counts of layer ``which``'s view
        (1 for the tail and for slots outside the heads' live ranges)."""
        B, H = int(self.norms_k.shape[0]), int(self.norms_k.shape[1])
        N = self.n[which] + (tail.n if tail.batch else 0)
        # one extra column takes the padding entries (slot -1), then is dropped
        out = torch.ones((B, H, N + 1), device=self.norms_k.device)
        if self.counts is not None:
            merged, whole = self.counts
            for slots, vals in ((self.slots[which], merged[..., which]), (self.whole[which][2], whole[which])):
                out.scatter_(2, torch.where(slots >= 0, slots.long(), N), vals)
        return out[..., :N]

    def restore(self, which: int, tail: UniformStore):
        """Layer ``which``'s (0: ``l-1``, 1: ``l``) keys and values ``[B, H,
        n + tail, D]``: its view of the pair, then the tail's slots. Slots
        the layer masks (padding, an evictor's filler) are zero."""
        n = self.n[which]
        extra = tail.n if tail.batch else 0
        dk, dv, wk, wv = self._unpacked(which)
        ws = self.whole[which][2]
        B, H = int(dk.shape[0]), int(dk.shape[1])
        k_out = wk.new_zeros((B, H, n + extra, int(wk.shape[3])))
        v_out = wv.new_zeros((B, H, n + extra, int(wv.shape[3])))
        ops.slerp_restore(dk, self.norms_k, self.slots[which], which, k_out, kept=wk, kept_slots=ws)
        ops.slerp_restore(dv, self.norms_v, self.slots[which], which, v_out, kept=wv, kept_slots=ws)
        if extra:
            k_out[:, :, n:] = tail.keys
            v_out[:, :, n:] = tail.values
        return k_out, v_out

    def index_batch(self, idx, which: int) -> None:
        """Reorder batch rows once for the two layers that share the pair."""
        self._calls[which] += 1
        if self._calls[which] <= self._applied:
            return
        self._applied += 1
        pick = lambda x: None if x is None else x.index_select(0, idx.to(x.device))  # noqa: E731
        self.dir_k, self.dir_v, self.norms_k, self.norms_v = map(pick, (self.dir_k, self.dir_v, self.norms_k,
                                                                       self.norms_v))
        self.slots = [pick(x) for x in self.slots]
        self.whole = [tuple(map(pick, w)) for w in self.whole]
        if self._packed is not None:
            self._packed = {"dir_k": tuple(map(pick, self._packed["dir_k"])),
                            "dir_v": tuple(map(pick, self._packed["dir_v"])),
                            "whole": [(tuple(map(pick, k)), tuple(map(pick, v))) for k, v in self._packed["whole"]]}
        self.retained = self.retained.index_select(0, idx.cpu())
        if self.starts is not None:
            self.starts = [pick(x) for x in self.starts]
        if self.counts is not None:
            self.counts = (pick(self.counts[0]), [pick(x) for x in self.counts[1]])


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
        packed = "" if self.pair.packing is None else f", packed={self.pair.packing[0]} bits"
        return (f"MiniCacheStore(layer {'l-1' if self.which == 0 else 'l'} of a pair, "
                f"merged={int(self.pair.norms_k.shape[2])}, whole={int(self.pair.whole[self.which][2].shape[2])}, "
                f"tail={self.tail.n}{packed})")

    @classmethod
    def merge_layers(cls, held: list, t: float, retain: float):
        """The two stores of a merged pair from what layers ``l-1`` and ``l``
        hold (``MergedPair.merge``'s ``held``)."""
        pair = MergedPair.merge(held, t, retain)
        return cls(pair, 0), cls(pair, 1)

    # ------------------------------------------------------------ geometry
    @property
    def batch(self) -> int:
        return int(self.pair.norms_k.shape[0])

    @property
    def heads(self) -> int:
        return int(self.pair.norms_k.shape[1])

    @property
    def n(self) -> int:
        return self.pair.n[self.which] + self.tail.n

    @property
    def widths(self) -> tuple[int, int, int]:
        """``(D, Dv, bytes per element)`` of the layer's keys and values."""
        p = self.pair
        if p._packed is not None:
            return p._widths[0], p._widths[1], torch.empty((), dtype=p._dtype).element_size()
        return int(p.dir_k.shape[3]), int(p.dir_v.shape[3]), p.dir_k.element_size()

    def max_length(self) -> int:
        return self.n

    def head_lengths(self) -> list[int]:
        if self.pair.starts is not None:
            # per-head layers: each head's live slots (its prefix of the view is padding)
            if not hasattr(self, "_live"):
                self._live = (self.pair.n[self.which] - self.pair.starts[self.which]).reshape(-1).cpu()
            return (self._live + self.tail.n).tolist()
        return [self.n] * (self.batch * self.heads)

    def tensors(self) -> list:
        return self.pair.tensors() + self.tail.tensors()

    # ------------------------------------------------------------- writing
    def append(self, keys, values, first_position: int) -> None:
        self.tail.append(keys, values, first_position)

    def index_batch(self, idx) -> None:
        self.pair.index_batch(idx, self.which)
        self.tail.index_batch(idx)
        self.__dict__.pop("_live", None)

    # ----------------------------------------------------------- attention
    def attend(self, query, spec: AttentionSpec, kv_start=None, query_pos=None):
        if spec.window is not None:
            # sliding layers are never paired (KVCache._merge_pair)
            raise KVCompressUnsupportedError("sliding_window: a layer of a MiniCache pair cannot slide")
        p = self.pair
        if (int(query.shape[2]) == 1 and spec.plain and p._packed is None and query.dtype in _C_DTYPES
                and query.dtype == p.dir_k.dtype and int(p.dir_k.shape[2]) > 0):
            # a decode step reads the merged form in place; with nothing merged
            # (full retention) the view is the layer's own slots, which the
            # regular kernels read below, so it is exactly the uncompressed layer
            return self._attend_in_place(query, spec)
        keys, values = self.pair.restore(self.which, self.tail)
        if self.pair.starts is not None:
            return self._attend_heads(query, spec, keys, values)
        if c_decode_ok(query, keys, values, spec):
            return ops.attention(query, keys, values, scaling=spec.scaling, kv_start=kv_start)
        mask = build_mask(int(query.shape[0]), int(query.shape[2]), int(keys.shape[2]), query.device,
                          kv_start=kv_start)
        return masked_attention(query, keys, values, spec, mask)

    def _attend_heads(self, query, spec: AttentionSpec, keys, values):
        """Per-head layers: head ``(b, h)``'s slots are ``start[b, h] ..`` of
        its row of the view (the tail after them), read as segments of the
        flat view by the ragged C kernel (merge counts as its log-count
        bias), or per head in torch for options the kernel lacks."""
        B, H, N, D = (int(x) for x in keys.shape)
        Dv = int(values.shape[3])
        start = self.pair.starts[self.which].reshape(-1)
        counts = self.pair.view_counts(self.which, self.tail).reshape(-1) if spec.count_bias else None
        if spec.plain and query.dtype in _C_DTYPES and keys.dtype == query.dtype:
            offsets = torch.arange(B * H, device=keys.device) * N + start
            return ops.attention(query, keys.reshape(B * H * N, D), values.reshape(B * H * N, Dv),
                                 scaling=spec.scaling, offsets=offsets, lengths=N - start, counts=counts)
        bias = None if counts is None else torch.log(counts.view(B * H, N))
        return padded_head_attention(query, keys.view(B * H, 1, N, D), values.view(B * H, 1, N, Dv), start, spec, H,
                                     bias)

    def _attend_in_place(self, query, spec: AttentionSpec):
        """``ops.minicache_attention`` over the pair's merged and whole rows
        and the tail: no reconstructed copy. The lists hold live slots only
        (padding, filler and per-head prefixes were left out when merging),
        so nothing needs masking."""
        p = self.pair
        wk, wv, ws = p.whole[self.which]
        tail = self.tail
        tk, tv = (tail.keys, tail.values) if tail.batch and tail.n else (None, None)
        counts = kept = None
        if spec.count_bias and p.counts is not None:
            counts, kept = p.counts[0], p.counts[1][self.which]
        return ops.minicache_attention(query, p.dir_k, p.dir_v, p.norms_k, p.norms_v, p.slots[self.which], self.which,
                                       keys=wk, values=wv, kept_slots=ws, tail_keys=tk, tail_values=tv, counts=counts,
                                       kept_counts=kept, scaling=spec.scaling)
