"""LSH-sampled decode attention (MagicPIG).

An ``LSHStore`` is a :class:`UniformStore` that also holds, per slot, the
SimHash codes of its key (``L`` tables of ``K`` bits, int32 ``[B, H, capacity,
L]``) under random hyperplanes fixed per layer (``seed``), the keys centered
by their prefill mean. Codes are computed for the whole layer when it moves
into the store (after its prefill, and after the eviction of a method it is
composed with) and for each appended chunk afterwards, never recomputed: a
later eviction moves them with their slots. A decode step (one query per row) hashes the query and runs
``ops.lsh_attention``: sinks and a recent window read exactly, every other
slot only when its codes collide with the query's in ``hits`` tables, weighted
by the inverse of that probability. Prefill chunks and attention options the
op lacks (softcap, sinks, windows) read every slot.
"""

from __future__ import annotations

import torch

from .. import ops
from .base import AttentionSpec
from .ragged import RaggedStore, segments
from .uniform import UniformStore, sparse_step


class LSHStore(UniformStore):
    """Uniform slots with SimHash tables over their keys.

    Attributes
    ----------
    K, L, hits, sinks, window : int
        Bits per table, tables, collisions needed, exact leading and trailing slots.
    planes : torch.Tensor
        float32 ``[H, L * K, D]`` Gaussian hyperplanes (seeded per layer).
    center : torch.Tensor
        float32 ``[B, H, D]`` mean of each head's real prefill keys.
    codes : torch.Tensor
        int32 ``[B, H, n, L]`` view of the live slots' codes.
    """

    kind = "lsh"

    def __init__(self, K: int, L: int, hits: int, sinks: int, window: int):
        super().__init__()
        self.K, self.L, self.hits, self.sinks, self.window = K, L, hits, sinks, window
        self.planes = self.center = None
        self._codes: torch.Tensor | None = None
        self.sampled_steps = 0
        # slots read and real slots offered, summed over sampled steps and
        # query heads (tensors: no device sync per step)
        self._read = self._offered = None

    @classmethod
    def from_uniform(cls, store: UniformStore, K: int, L: int, hits: int, sinks: int, window: int, seed: int,
                     kv_start=None) -> "LSHStore":
        """Take over a uniform store's buffers (no copy), draw the layer's
        hyperplanes from ``seed`` and hash every slot."""
        new = cls(K, L, hits, sinks, window)
        new._adopt(store)
        keys = new.keys
        B, H, n, D = (int(x) for x in keys.shape)
        g = torch.Generator().manual_seed(int(seed))
        new.planes = torch.randn(H, L * K, D, generator=g).to(keys.device)
        real = torch.ones(B, 1, n, 1, dtype=torch.float32, device=keys.device)
        if kv_start is not None:
            real = (torch.arange(n, device=keys.device)[None, :] >= kv_start.to(keys.device)[:, None]).float()
            real = real[:, None, :, None]
        new.center = ((keys.float() * real).sum(2) / real.sum(2).clamp(min=1.0)).contiguous()
        new._codes = torch.empty(B, H, new.capacity, L, dtype=torch.int32, device=keys.device)
        new._codes[:, :, new.lo : new.lo + n] = ops.simhash(keys, new.planes, K, center=new.center)
        return new

    def __repr__(self) -> str:
        shape = None if self._k is None else tuple(self.keys.shape)
        return (f"LSHStore(slots={shape}, K={self.K}, L={self.L}, hits={self.hits}, sinks={self.sinks}, "
                f"window={self.window}, sampled_steps={self.sampled_steps})")

    def read_counts(self) -> tuple[int, int] | None:
        """``(slots read, real slots held)`` summed over the sampled decode
        steps and query heads (None before the first)."""
        if self._read is None:
            return None
        return int(self._read), int(self._offered)

    @property
    def codes(self) -> torch.Tensor:
        return self._codes[:, :, self.lo : self.lo + self.n]

    def tensors(self) -> list:
        return super().tensors() + [t for t in (self._codes, self.planes, self.center, self._read, self._offered)
                                    if t is not None]

    def _realloc(self, cap: int) -> None:
        lo, n = self.lo, self.n
        super()._realloc(cap)
        if self._codes is not None:
            new = self._codes.new_empty((self._codes.shape[0], self._codes.shape[1], cap, self.L))
            new[:, :, :n] = self._codes[:, :, lo : lo + n]
            self._codes = new

    def append(self, keys, values, first_position: int) -> None:
        super().append(keys, values, first_position)
        q = int(keys.shape[2])
        end = self.lo + self.n
        self._codes[:, :, end - q : end] = ops.simhash(keys, self.planes, self.K, center=self.center)

    def keep(self, indices) -> None:
        """Keep slots ``indices`` ``[B, H, k]`` (an evictor composed with
        MagicPIG re-selecting while decoding): their codes move with them,
        the hyperplanes and the prefill center stay."""
        codes = self.codes.gather(2, indices[..., None].expand(-1, -1, -1, self.L))
        super().keep(indices)
        self._codes = codes

    def index_batch(self, idx) -> None:
        super().index_batch(idx)
        idx = idx.to(self._codes.device)
        self._codes = self._codes.index_select(0, idx)
        self.center = self.center.index_select(0, idx)

    def attend(self, query, spec: AttentionSpec, kv_start=None, query_pos=None):
        if sparse_step(query, spec) and self.n > self.sinks + self.window:
            g = int(query.shape[1]) // self.heads
            qcodes = ops.simhash(query, self.planes, self.K, group=g)
            self.sampled_steps += 1
            out, reads = ops.lsh_attention(query, self.keys, self.values, self.codes, qcodes, self.K,
                                           hits=self.hits, sinks=self.sinks, window=self.window, center=self.center,
                                           scaling=spec.scaling, kv_start=kv_start, return_reads=True)
            B, Hq = int(query.shape[0]), int(query.shape[1])
            real = B * self.n - (kv_start.sum() if kv_start is not None else 0)
            read, offered = reads.sum(dtype=torch.int64), Hq * real
            self._read = read if self._read is None else self._read + read
            self._offered = offered if self._offered is None else self._offered + offered
            return out
        return super().attend(query, spec, kv_start=kv_start, query_pos=query_pos)


class RaggedLSHStore(RaggedStore):
    """Per-head slots (a head-wise or merging evictor's layer) with SimHash
    tables over their keys: MagicPIG on what the evictor kept.

    Each head's slots are hashed when the layer moves into the store, under
    the layer's hyperplanes and centered by the mean of that head's kept keys
    (the uniform store's center is the mean of its prefill keys: here the
    kept ones are what the evictor left of the prefill), and every appended
    slot as it arrives. The codes are one more row column (``[R, L]``) that
    moves with its rows. A re-compression builds a new layer (merged keys are
    new keys), which is hashed again with the same hyperplanes and the
    center carried over (``center=``), so a token kept through it keeps its
    codes. Decode steps run ``ops.lsh_attention`` on the ragged layout, the
    sinks and window of each head read exactly and merge counts weighing
    their slots.
    Built from a layer's ``RaggedStore`` with ``from_ragged`` (no copy).

    Attributes
    ----------
    K, L, hits, sinks, window, planes, center
        As :class:`LSHStore` (``center`` float32 ``[B, H, D]``).
    codes : torch.Tensor
        int32 ``[R, L]`` codes of every row (garbage beyond a head's length).
    """

    kind = "lsh-ragged"
    row_state = RaggedStore.row_state + ("codes",)

    @classmethod
    def from_ragged(cls, store: RaggedStore, K: int, L: int, hits: int, sinks: int, window: int, seed: int,
                    center=None) -> "RaggedLSHStore":
        """Take over a ragged store's buffers (no copy), draw the layer's
        hyperplanes from ``seed`` and hash every live slot; ``center`` ``[B,
        H, D]`` (from the layer's earlier store) is kept when given."""
        new = cls.__new__(cls)
        new._adopt(store)
        new.K, new.L, new.hits, new.sinks, new.window = K, L, hits, sinks, window
        new.sampled_steps = 0
        new._read = new._offered = None
        D, H = int(new.k.shape[1]), new.heads
        g = torch.Generator().manual_seed(int(seed))
        new.planes = torch.randn(H, L * K, D, generator=g).to(new.k.device)
        head, _ = segments(new.lengths)
        rows = new.live_rows()
        if center is None:
            N = new.batch * H
            total = torch.zeros((N, D), dtype=torch.float32, device=new.k.device)
            total.index_add_(0, head, new.k[rows].float())
            center = total / new.lengths.clamp_min(1)[:, None].float()
            center = center.view(new.batch, H, D)
        new.center = center.contiguous()
        new.codes = torch.zeros((int(new.k.shape[0]), L), dtype=torch.int32, device=new.k.device)
        new._hash(rows, head)
        return new

    def _hash(self, rows, head) -> None:
        """Codes of ``rows`` (of heads ``head``, flat ``b * H + h``), each
        under its own head's hyperplanes and center: one ``ops.simhash`` call
        per kv head over the rows it owns."""
        H = self.heads
        for h in range(H):
            mine = rows[head % H == h]
            if mine.numel() == 0:
                continue
            b = head[head % H == h] // H
            # the rows of one kv head, each with its batch row's center: hash
            # them as a batch of one-slot rows
            x = self.k[mine].view(-1, 1, 1, self.k.shape[1])
            codes = ops.simhash(x, self.planes[h : h + 1], self.K, center=self.center[b, h][:, None])
            self.codes[mine] = codes.view(-1, self.L)

    def __repr__(self) -> str:
        return (f"RaggedLSHStore({self._layout_repr()}, K={self.K}, "
                f"L={self.L}, hits={self.hits}, sinks={self.sinks}, window={self.window}, "
                f"merged={self.counts is not None}, sampled_steps={self.sampled_steps})")

    def read_counts(self) -> tuple[int, int] | None:
        if self._read is None:
            return None
        return int(self._read), int(self._offered)

    def tensors(self) -> list:
        return super().tensors() + [t for t in (self.planes, self.center, self._read, self._offered)
                                    if t is not None]

    def append(self, keys, values, first_position: int) -> None:
        super().append(keys, values, first_position)
        B, H, q = int(keys.shape[0]), int(keys.shape[1]), int(keys.shape[2])
        rows = ((self.offsets + self.lengths - q)[:, None] + torch.arange(q, device=self.offsets.device)).reshape(-1)
        self.codes[rows] = ops.simhash(keys, self.planes, self.K, center=self.center).reshape(B * H * q, self.L)

    def index_batch(self, idx) -> None:
        super().index_batch(idx)
        self.center = self.center.index_select(0, idx.to(self.center.device))

    def attend(self, query, spec: AttentionSpec, kv_start=None, query_pos=None):
        if (sparse_step(query, spec) and query.dtype == self.k.dtype
                and self.max_length() > self.sinks + self.window):
            g = int(query.shape[1]) // self.heads
            qcodes = ops.simhash(query, self.planes, self.K, group=g)
            self.sampled_steps += 1
            out, reads = ops.lsh_attention(query, self.k, self.v, self.codes, qcodes, self.K, hits=self.hits,
                                           sinks=self.sinks, window=self.window, center=self.center,
                                           scaling=spec.scaling, return_reads=True, offsets=self.offsets,
                                           lengths=self.lengths, counts=self.counts if spec.count_bias else None)
            read, offered = reads.sum(dtype=torch.int64), g * self.lengths.sum()
            self._read = read if self._read is None else self._read + read
            self._offered = offered if self._offered is None else self._offered + offered
            return out
        return super().attend(query, spec, kv_start=kv_start, query_pos=query_pos)
