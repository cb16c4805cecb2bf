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
        return super().tensors() + [t for t in (self._codes, self.planes, self.center) if t is not None]

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
