"""Paged storage for query-aware sparse decoding (Quest).

A ``PagedStore`` is a :class:`UniformStore` whose live slots are cut into
pages of ``page`` slots (page ``p`` = live slots ``p * P .. (p + 1) * P - 1``,
the last page possibly short) with per-page, per-channel key minimum and
maximum in float32. The bounds follow every append (only the pages the chunk
touched are recomputed: ``ops.page_bounds``) and are recomputed in full only
when the slots move (an eviction's ``keep``, a reallocation that shifts the
live range).

A decode step (one query per row) that would read more than ``token_budget``
slots scores every page with Quest's bound (``ops.page_scores``), keeps the
top ``token_budget // page`` pages of each kv head with the first real page
and the newest page always read (``ops.select_topk``), and attends over just
those pages by index (``ops.attention_pages``): nothing is copied. Prefill
chunks, short layers and attention options the kernel lacks (softcap,
sinks, sliding windows) read everything, as :class:`UniformStore` does.

A batch whose rows hold leading padding (left-padded prompts, or an
evictor's filler in front of a row that kept fewer slots) reads row by row,
as each row's layer alone reads: its pages cut from its first real slot,
with their own bounds, and its own read count. One grid and count for the
batch would make a padded row read fewer slots, or other pages, than alone.
"""

from __future__ import annotations

import torch

from .. import ops
from .base import AttentionSpec
from .ragged import RaggedStore
from .uniform import UniformStore, dense_row, front_padded, padded_starts, read_count, sparse_step


class PagedStore(UniformStore):
    """Uniform slots in pages of ``page`` with per-page key bounds.

    Attributes
    ----------
    page : int
        Slots per page (``P``).
    token_budget : int
        Slots a decode step reads at most (``token_budget // page`` pages,
        at least 2: the first and the newest).
    gqa : {"max", "mean"}
        How a kv head's page score is reduced over its query heads.
    kmin, kmax : torch.Tensor
        ``[B, H, pages, D]`` float32 views of the bounds of the live pages.
    last_pages : torch.Tensor or None
        ``[B, H, k]`` int64 pages the last sparse step read (None after a
        dense step): for inspection and tests. In a batch whose rows hold
        leading padding the pages of each row's own grid (cut from its first
        real slot), ``-1`` in front where a row read fewer, all ``-1`` where
        it read every slot.
    """

    kind = "paged"

    def __init__(self, page: int, token_budget: int, gqa: str = "max"):
        super().__init__()
        self.page = int(page)
        self.token_budget = int(token_budget)
        self.gqa = gqa
        self._kmin: torch.Tensor | None = None
        self._kmax: torch.Tensor | None = None
        self._bounded = 0  # live slots whose pages have current bounds
        self._bounds_lo = 0  # the `lo` those bounds were computed at
        self.last_pages: torch.Tensor | None = None
        self.sparse_steps = 0
        self._rows: dict = {}  # padded rows: b -> (validity key, kmin, kmax, slots bounded)
        self._moves = 0  # bumped whenever slots move in place of being appended (keep, index_batch)
        self._row_mode = False  # padded rows seen: bounds per row (_rows), none for the batch

    @classmethod
    def from_uniform(cls, store: UniformStore, page: int, token_budget: int, gqa: str = "max") -> "PagedStore":
        """Take over a uniform store's buffers (no copy) and bound its pages."""
        new = cls(page, token_budget, gqa)
        new._adopt(store)
        new._sync_bounds()
        return new

    def __repr__(self) -> str:
        shape = None if self._k is None else tuple(self.keys.shape)
        return (f"PagedStore(slots={shape}, page={self.page}, token_budget={self.token_budget}, "
                f"pages={self.num_pages}, sparse_steps={self.sparse_steps})")

    # ------------------------------------------------------------ geometry
    @property
    def num_pages(self) -> int:
        return -(-self.n // self.page)

    @property
    def kmin(self) -> torch.Tensor:
        return self._kmin[:, :, : self.num_pages]

    @property
    def kmax(self) -> torch.Tensor:
        return self._kmax[:, :, : self.num_pages]

    def tensors(self) -> list:
        rows = [t for entry in self._rows.values() for t in entry[1:3] if t is not None]
        return super().tensors() + [t for t in (self._kmin, self._kmax, self.last_pages) if t is not None] + rows

    # -------------------------------------------------------------- bounds
    def _bound_rows(self, pages: int) -> None:
        """Make room for `pages` rows of bounds (geometric growth, old rows kept)."""
        have = 0 if self._kmin is None else int(self._kmin.shape[2])
        if pages <= have and self._kmin.shape[:2] == self._k.shape[:2]:
            return
        B, H, D = int(self._k.shape[0]), int(self._k.shape[1]), int(self._k.shape[3])
        cap = max(pages, have + have // 2, 4)
        kmin = torch.empty((B, H, cap, D), dtype=torch.float32, device=self._k.device)
        kmax = torch.empty_like(kmin)
        if have and self._kmin.shape[:2] == (B, H):
            kmin[:, :, :have] = self._kmin
            kmax[:, :, :have] = self._kmax
        self._kmin, self._kmax = kmin, kmax

    def _sync_bounds(self) -> None:
        """Bring the bounds up to the live slots: the pages from the first
        one not known to be complete, or all of them when the slots moved."""
        if self._k is None or self.n == 0 or self._row_mode:
            self._bounded = 0
            return
        if self._bounds_lo != self.lo or self._bounded > self.n:
            self._bounded = 0
        self._bounds_lo = self.lo
        pages = self.num_pages
        self._bound_rows(pages)
        first = self._bounded // self.page
        if first < pages:
            ops.page_bounds(self.keys, self._kmin, self._kmax, self.page, first, pages)
        self._bounded = self.n

    def append(self, keys, values, first_position: int) -> None:
        # a reallocation that moves the live slots to the front changes `lo`,
        # which _sync_bounds notices
        super().append(keys, values, first_position)
        self._sync_bounds()

    def keep(self, indices) -> None:
        super().keep(indices)
        self._moves += 1
        self._rows = {}
        self._bounded = 0
        self._sync_bounds()

    def drop_front(self, m: int) -> None:
        super().drop_front(m)
        self._sync_bounds()

    def shrink(self, cap: int) -> None:
        super().shrink(cap)
        self._sync_bounds()

    def index_batch(self, idx) -> None:
        super().index_batch(idx)
        self._moves += 1
        self._rows = {}
        if self._kmin is not None:
            idx = idx.to(self._kmin.device)
            self._kmin = self._kmin.index_select(0, idx)
            self._kmax = self._kmax.index_select(0, idx)

    # ---------------------------------------------------- padded rows
    def _row_bounds(self, b: int, start: int):
        """``[1, H, pages, D]`` bounds of row ``b``'s pages cut from its first
        real slot ``start``, as the row's layer alone cuts them; kept per row
        and brought up to date from the first page not known to be complete
        (recomputed whole when the row's slots moved)."""
        keys = self.keys[b : b + 1, :, start:]
        n, P = int(keys.shape[2]), self.page
        pages = -(-n // P)
        entry = self._rows.get(b)
        if entry is None or entry[0] != (self.lo, start, self._moves) or entry[3] > n:
            entry = ((self.lo, start, self._moves), None, None, 0)
        key, kmin, kmax, bounded = entry
        if kmin is None or int(kmin.shape[2]) < pages:
            cap = max(pages, 4 if kmin is None else int(kmin.shape[2]) * 3 // 2)
            grown = torch.empty((1, self.heads, cap, int(keys.shape[3])), dtype=torch.float32, device=keys.device)
            grown_max = torch.empty_like(grown)
            if kmin is not None and bounded:
                have = -(-bounded // P)
                grown[:, :, :have], grown_max[:, :, :have] = kmin[:, :, :have], kmax[:, :, :have]
            kmin, kmax = grown, grown_max
        first = bounded // P
        if first < pages:
            ops.page_bounds(keys, kmin, kmax, P, first, pages)
        self._rows[b] = (key, kmin, kmax, n)
        return kmin[:, :, :pages], kmax[:, :, :pages]

    def _attend_rows(self, query, spec: AttentionSpec, starts: list[int]):
        """A decode step of a batch whose rows hold leading padding: each row
        reads what its layer alone reads, pages cut from its first real slot
        and its own read count (one count and slot-0 pages for the whole
        batch would make a padded row read fewer slots, or other pages, than
        alone)."""
        outs, read = [], []
        P = self.page
        for b, start in enumerate(starts):
            q = query[b : b + 1]
            keys, values = self.keys[b : b + 1, :, start:], self.values[b : b + 1, :, start:]
            n = int(keys.shape[2])
            pages = None
            if n > self.token_budget:
                total = -(-n // P)
                k = read_count(max(2, self.token_budget // P), total)
                if k is not None:
                    kmin, kmax = self._row_bounds(b, start)
                    scores = ops.page_scores(q[:, :, -1], kmin, kmax, total, P, gqa=self.gqa)
                    pages = ops.select_topk(scores, k, sinks=1, window=1)
            if pages is None:
                outs.append(dense_row(q, keys, values, spec))
            else:
                outs.append(ops.attention_pages(q, keys, values, pages.contiguous(), P, scaling=spec.scaling))
            read.append(pages)
        if any(r is not None for r in read):
            self.sparse_steps += 1
            self.last_pages = front_padded(read, self.heads, query.device)  # pages of each row's own grid
        return torch.cat(outs, 0)

    # ----------------------------------------------------------- attention
    def pages_to_read(self, query, kv_start=None):
        """The pages a decode query ``[B, Hq, 1, D]`` reads: ``[B, H, k]``
        int64, ascending, the first real page and the newest always in; None
        when every page fits the token budget."""
        total = self.num_pages
        first = kv_start // self.page if kv_start is not None else None
        k = read_count(max(2, self.token_budget // self.page), total, first)
        if k is None:
            return None
        scores = ops.page_scores(query[:, :, -1], self.kmin, self.kmax, total, self.page, gqa=self.gqa,
                                 kv_start=kv_start)
        return ops.select_topk(scores, k, sinks=1, window=1, kv_start=first)

    def attend(self, query, spec: AttentionSpec, kv_start=None, query_pos=None):
        self.last_pages = None
        if sparse_step(query, spec) and self.n > self.token_budget:
            starts = padded_starts(kv_start)
            if starts is not None:
                if not self._row_mode:
                    # the batch's bounds (pages cut from slot 0) serve no row now
                    self._row_mode, self._kmin, self._kmax, self._bounded = True, None, None, 0
                return self._attend_rows(query, spec, starts)
            if self._row_mode:
                self._row_mode, self._rows = False, {}
                self._sync_bounds()
            pages = self.pages_to_read(query, kv_start)
            if pages is not None:
                self.last_pages = pages
                self.sparse_steps += 1
                return ops.attention_pages(query, self.keys, self.values, pages.contiguous(), self.page,
                                           scaling=spec.scaling, kv_start=kv_start)
        return super().attend(query, spec, kv_start=kv_start, query_pos=query_pos)


class RaggedPagedStore(RaggedStore):
    """Per-head slots (a head-wise or merging evictor's layer) in pages of
    ``page`` with per-page key bounds: Quest on what the evictor kept.

    Head ``i``'s pages cut its own live slots (page ``p`` = its slots ``p * P
    .. min((p + 1) * P, lengths[i]) - 1``); its bounds are rows
    ``page_offsets[i] ..`` of the flat ``kmin``/``kmax`` buffers, room for
    ``ceil(caps[i] / P)`` pages, so an append recomputes only the pages it
    touched and a reallocation (which moves every head) recomputes them all.
    A decode step scores each head's pages (``ops.page_scores``, right
    aligned so that the newest page is the last column), keeps its top
    ``token_budget // page`` with its first and newest page forced
    (``ops.select_topk``) and attends over them in place
    (``ops.attention_pages`` on the ragged layout, merge counts included).
    A head holding no more pages than that reads all of them.
    Built from a layer's ``RaggedStore`` with ``from_ragged`` (no copy).

    Attributes
    ----------
    page, token_budget, gqa
        As :class:`PagedStore`.
    kmin, kmax : torch.Tensor
        float32 ``[Rp, D]`` bounds of every head's pages.
    page_offsets : torch.Tensor
        int64 ``[B * H]`` first bound row of each head.
    last_pages : torch.Tensor or None
        int64 ``[B, H, k]`` pages the last sparse step read, ``-1`` in front
        where a head has fewer pages; None after a dense step.
    """

    kind = "paged-ragged"

    @classmethod
    def from_ragged(cls, store: RaggedStore, page: int, token_budget: int, gqa: str = "max") -> "RaggedPagedStore":
        """Take over a ragged store's buffers (no copy) and bound its pages."""
        new = cls.__new__(cls)
        new._adopt(store)
        new.page, new.token_budget, new.gqa = int(page), int(token_budget), gqa
        new.last_pages = None
        new.sparse_steps = 0
        new._bound_all()
        return new

    def __repr__(self) -> str:
        return (f"RaggedPagedStore({self._layout_repr()}, page={self.page}, "
                f"token_budget={self.token_budget}, merged={self.counts is not None}, "
                f"sparse_steps={self.sparse_steps})")

    def tensors(self) -> list:
        return super().tensors() + [t for t in (self.kmin, self.kmax, self.page_offsets, self.last_pages)
                                    if t is not None]

    def _pages(self, n: torch.Tensor) -> torch.Tensor:
        return (n + self.page - 1) // self.page

    def _bound(self, first) -> None:
        ops.page_bounds(self.k, self.kmin, self.kmax, self.page, first, offsets=self.offsets, lengths=self.lengths,
                        page_offsets=self.page_offsets)

    def _bound_all(self) -> None:
        """Room for every head's page capacity, and every page bounded."""
        cap_pages = self._pages(self.caps)
        self.page_offsets = torch.cumsum(cap_pages, 0) - cap_pages
        rows = int(self._pages(self._host_caps).sum())
        D = int(self.k.shape[1])
        self.kmin = torch.empty((rows, D), dtype=torch.float32, device=self.k.device)
        self.kmax = torch.empty_like(self.kmin)
        self._bound(0)

    def append(self, keys, values, first_position: int) -> None:
        old_caps = self.caps
        before = self.lengths
        super().append(keys, values, first_position)
        if self.caps is not old_caps:
            self._bound_all()  # the heads moved: every page has new rows
        else:
            self._bound(before // self.page)

    def index_batch(self, idx) -> None:
        super().index_batch(idx)
        self._bound_all()

    def pages_to_read(self, query):
        """The pages a decode query ``[B, Hq, 1, D]`` reads: int64 ``[B, H,
        k]``, each head's ascending after ``-1`` padding, its first and newest
        page always in; None when every head's pages fit the budget."""
        P = self.page
        counts = self._pages(self._host_lengths)  # host mirror: no device synchronisation
        M = int(counts.max()) if counts.numel() else 0
        k = max(2, self.token_budget // P)
        if k >= M:
            return None
        scores = ops.page_scores(query[:, :, -1], self.kmin, self.kmax, M, P, gqa=self.gqa, lengths=self.lengths,
                                 page_offsets=self.page_offsets)
        N = self.batch * self.heads
        start = (M - counts).to(self.k.device)  # first real (right-aligned) column of each head
        cols = ops.select_topk(scores.view(N, 1, M), k, sinks=1, window=1, kv_start=start)
        pages = cols.view(N, k) - start[:, None]
        return pages.clamp_min(-1).view(self.batch, self.heads, k)

    def attend(self, query, spec: AttentionSpec, kv_start=None, query_pos=None):
        self.last_pages = None
        if sparse_step(query, spec) and query.dtype == self.k.dtype and self.max_length() > self.token_budget:
            pages = self.pages_to_read(query)
            if pages is not None:
                self.last_pages = pages
                self.sparse_steps += 1
                return ops.attention_pages(query, self.k, self.v, pages.contiguous(), self.page, scaling=spec.scaling,
                                           counts=self.counts if spec.count_bias else None, offsets=self.offsets,
                                           lengths=self.lengths)
        return super().attend(query, spec, kv_start=kv_start, query_pos=query_pos)
