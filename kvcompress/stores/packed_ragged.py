"""Per-head packed storage: what an evicting or merging method kept, KIVI-
packed head by head, plus a uniform full-precision residual window.

This is the store of a composition such as ``EMS(ratio=0.5) + KIVI(bits=4)``
on a layer whose heads keep different numbers of slots (head-wise budgets,
merging). The kept slots of head ``i`` are packed into its own segment of
flat buffers (the ragged layout of ``docs/packed.md``: every segment starts
at a multiple of ``group``, so key groups never straddle heads), and
``ops.packed_attention`` reads them with ``offsets``/``lengths``/``counts``.

A head's kept slots rarely fill whole key groups. Its last slot is therefore
repeated up to the next multiple of ``group`` and the copies share that
slot's count: ``c`` becomes ``c / (copies + 1)`` on each of the ``copies + 1``
identical slots, whose weights ``count * exp(logit)`` add up to exactly the
original one (the copies equal the slot, so its group's min and max, and
every code, are unchanged). Decoded tokens enter the residual window and are
packed a whole group at a time onto the end of every head's segment, which
is why segments stay group-aligned.

Behind a merging method, a decode-time round keeps each key group that
comes through with enough unchanged members in place, its other rows
placeholders of merge count ``keep_rows.TINY`` that weigh nothing
(``stores/keep_rows.py``): the store's slot counts and :meth:`unpacked`
leave them out, its bytes include them.

With ``KIVI(sinks=S)`` each head's first S kept slots (its oldest: an
evictor keeps slots in token order, and EMS keeps the first tokens of every
head) stay in full precision as a sink block at the front of the residual's
buffers, ``[B, H, S, D]``, read in the same kernel call as the residual.
A block slot that absorbed merged tokens keeps its merge count: the kernel
adds the residual slots' log counts (``residual_counts``, 1 past the block).
In a batch whose rows keep their own residual (row mode behind rounds), and
in a batch packed once, each row takes the block it takes alone,
``_sinks_rows[b]`` slots at the block's front; the block's other rows are
masked for it with its foreign residual rows (one hole, ``residual_hidden``).
"""

from __future__ import annotations

import torch

from .. import ops
from .base import AttentionSpec
from .feedback import expand
from .keep_rows import TINY, is_placeholder
from .masked import padded_head_attention
from . import packed as packed_store
from .packed import PackedStore, join_parts, kernel_reads
from .ragged import RaggedStore, segments
from .rotation import rotate, unrotate


class RaggedPackedStore(PackedStore):
    """Per-head packed segments ``[Σ cap_h, Db]`` and a ``[B, H, r, D]``
    residual window shared by the heads.

    Attributes
    ----------
    offsets, lengths, caps : torch.Tensor
        int64 ``[B * H]``: first row, packed rows in use (multiples of
        ``group``, repeated last slots included) and rows allocated per head.
    counts_bias, counts_plain : torch.Tensor
        float32 ``[R]``: the count of each packed row with and without the
        method's merge counts (both carry the split of a repeated slot).
    """

    kind = "ragged-packed"

    def __init__(self, bits: int, group: int, residual: int, value_bits: int | None = None):
        super().__init__(bits, group, residual, value_bits)
        self.offsets = self.lengths = self.caps = None
        self.counts_bias = self.counts_plain = None
        self._host_lengths = self._host_caps = None
        self._real = None  # host int64 [B*H]: kept or decoded slots per head, copies excluded
        self._slack = group
        #: int32 / float32 ``[R]`` token index and carried score of each packed
        #: row (a copy takes its slot's): what a decode-time re-compression
        #: reads back (:meth:`unpacked`); ``scores`` None without carried scores
        self.positions = self.scores = None
        self._merged = False  # whether the slots carry merge counts (a merging method)
        #: with columns: the residual's ``positions`` (int32) and carried
        #: ``scores`` (float32, NaN: not scored yet) ``[B, H, rcap]``, by
        #: residual slot (heads may hold different tokens there)
        self._rcols: dict | None = None
        #: ``KIVI(sinks=S)``'s S; the block taken (``n_sinks``) may be shorter
        self.sinks_asked = 0
        #: float32 ``[B, H, n_sinks]`` merge counts of the block's slots, None
        #: when all are 1; ``_rc``: ``[B, H, >= n_sinks + r]`` the residual
        #: counts the kernel reads (the block's, then ones), built when needed
        self._sink_counts = self._rc = None
        #: row mode's ``residual_hidden``, with the device, block and ``_rs`` it was built for
        self._hidden = None
        #: row mode behind rounds: per row the sink slots it takes alone (the
        #: block's first ones; ``_r0`` is the most any row takes), None when
        #: every row takes ``_r0``
        self._sinks_rows: list[int] | None = None
        #: row mode behind rounds: per row whether it is a row kept whole
        #: that takes its sink block later (:meth:`take_sinks`), None when none is
        self._sinks_due: list[bool] | None = None

    @classmethod
    def from_ragged(cls, store, bits: int, group: int, residual: int,
                    value_bits: int | None = None, columns: bool = False,
                    rotation: torch.Tensor | None = None, sinks: int = 0,
                    feedback: torch.Tensor | None = None, value_clip: bool = False,
                    row_choices: list | None = None, whole_rows: list | None = None,
                    rows_apart: bool = False, row_layout: list | None = None) -> "RaggedPackedStore":
        """Pack a :class:`~kvcompress.stores.RaggedStore`'s live slots (and
        its merge counts) head by head. Without ``columns`` every slot is
        packed and the residual starts empty. ``columns``: keep each row's
        position and carried score too, so that :meth:`unpacked` can give them
        back, and leave each head's newest ``r`` kept slots in the residual,
        in full precision as KIVI keeps its newest tokens: ``r`` is
        ``residual`` or fewer, as many as every head holds with a merge count
        of 1 (the residual has no counts). ``rotation``: pack keys as
        ``k @ rotation`` (see :class:`~kvcompress.stores.PackedStore`).
        ``sinks``: keep each head's first ``sinks`` kept slots in full
        precision (fewer when a head holds fewer beside its residual), with
        their merge counts. ``feedback``: key-feedback weights
        (``stores.feedback.compact``'s triangle; see
        :class:`~kvcompress.stores.PackedStore`), each head's groups rounded
        with its kv head's. ``value_clip``: pack value groups over clipped
        ranges (``ops.pack_values(clip=True)``). ``row_choices`` (a batch
        whose rows chose apart, ``PackingChoices._choose_ragged_rows``): per row
        ``(rotation or None, feedback triangle or None)``, in place of
        ``rotation`` and ``feedback``, each row's heads packed (and later
        read) its own way; None for a row that chooses at its first pack
        (:meth:`set_row_choice`): a row of ``whole_rows``, or with
        ``rows_apart`` or packed once (no ``columns``) one with no whole
        group to test its rotation on, which packs unrotated and without
        weights if it packs part groups now (the layer reads ``_choices``
        back); packed once, a row that packs nothing now chooses before the
        batch's first pack of its residual (:meth:`set_row_choice`; if
        nothing chooses, it packs unrotated and without weights). ``whole_rows`` (a store
        packed once, no ``columns``): per row whether the method kept it
        whole, every head holding the row's every token. Such a row packs as
        a uniform :class:`PackedStore` of it alone would, on KIVI's schedule:
        nothing now, all of its slots after the sink block go to the
        residual, and each :meth:`settle` packs its residual's whole groups
        past ``residual + group - 1`` (row mode: every row packs on its own
        schedule, the residual rows that are not a row's own masked for it,
        ``residual_hidden``). ``rows_apart`` (with ``columns``, a batch of
        more than one row): each row keeps in its residual the newest slots
        ``_recent_kept`` allows its own heads, as it does alone, not the
        fewest any row's heads allow (row mode again). ``row_layout`` (with
        ``rows_apart``; a round that left some rows as they were): per row
        None or ``(s_b, r_b)``, the row's sink block and own residual as
        they were, where a fresh layout would pack the part of its residual
        past ``residual`` now, which alone it packs only once its residual
        fills (a row of ``whole_rows`` too: its layout before the step's
        :meth:`settle`). Such a row is laid out only in size: its slots are
        then taken, bit for bit, from the store it was unpacked from
        (:meth:`adopt_rows`), whose order ``unpacked()`` does not keep (a
        ``keep_rows`` layout's residual may be older than a kept group)."""
        new = cls(bits, group, residual, value_bits)
        new.rotation = rotation
        new.feedback = feedback
        new.value_clip = bool(value_clip)
        B, H = store.batch, store.heads
        whole = _whole_heads(store, whole_rows, columns, rows_apart)
        if row_choices is not None:
            if rotation is not None or feedback is not None or len(row_choices) != B:
                raise ValueError("row_choices: one (rotation, feedback) per row, in place of rotation and feedback")
            # rows that choose later: a row kept whole, at its first pack; behind rounds (rows_apart) another
            # row too (rotate="auto" with no whole group to test, which alone leaves its layer undecided)
            undecided = [c is None and (whole is None or not bool(whole[b * H])) for b, c in enumerate(row_choices)]
            if any(undecided) and columns and not rows_apart:
                raise ValueError("row_choices: None only for a row of whole_rows, with rows_apart, or packed "
                                 "once (columns=False): a row that chooses at its first pack or round")
            new._choices = [None if c is None else (c[0] is not None, c[1], new.value_clip) for c in row_choices]
            new.rotation = next((c[0] for c in row_choices if c is not None and c[0] is not None), None)
        else:
            undecided = []
        new.sinks_asked = int(sinks)
        G = group
        dev = store.k.device
        r = _recent_kept(store, residual) if columns else 0
        n_min = int(store._host_lengths.min()) if store._host_lengths.numel() else 0
        s = max(0, min(int(sinks), n_min - r))
        per_row = None  # row mode with columns: each row's own residual length
        s_heads = s  # each head's sink slots
        if rows_apart and not columns:
            raise ValueError("rows_apart: each row keeps its own residual only with columns=True")
        if row_layout is not None and (not rows_apart or len(row_layout) != B):
            raise ValueError("row_layout: one entry per row, with rows_apart=True")
        whole_cols = None  # rows kept whole behind rounds (columns): KIVI's schedule, as alone
        if columns and whole is not None:
            whole_cols, whole = whole, None
        sinks_rows = None  # per row, the sink block it takes alone (where rows may differ)
        if columns and rows_apart and B > 1:
            per_row = _recent_kept_rows(store, residual)
            lengths_host = store._host_lengths.view(B, H)
            # each row's sink block as alone; the buffers hold the longest
            sinks_rows = [max(0, min(int(sinks), int(lengths_host[b].min()) - per_row[b])) for b in range(B)]
            if whole_cols is not None:
                new._whole_layout(whole_cols.view(B, H)[:, 0].tolist(), lengths_host[:, 0].tolist(), int(sinks),
                                  per_row, sinks_rows)
            for b, kept in enumerate(row_layout or ()):
                if kept is not None:
                    sinks_rows[b], per_row[b] = _kept_layout(store, b, kept, int(sinks))
                    # a row kept whole that holds no sink block yet still waits for it, also where
                    # _whole_layout gave it one now: it takes the block at this step's take_sinks
                    wait = bool(sinks) and whole_cols is not None and bool(whole_cols[b * H]) and not sinks_rows[b]
                    if wait and new._sinks_due is None:
                        new._sinks_due = [False] * B
                    if new._sinks_due is not None:
                        new._sinks_due[b] = wait
            if new._sinks_due is not None and not any(new._sinks_due):
                new._sinks_due = None
            r = max(per_row)
        elif not columns and whole is None and B > 1 and sinks:
            # packed once: each row's sink block as alone (its own shortest head, not the batch's, bounds
            # it), the block's rows past a row's own masked for it (residual_hidden)
            lengths_host = store._host_lengths.view(B, H)
            sinks_rows = [max(0, min(int(sinks), int(lengths_host[b].min()))) if H else 0 for b in range(B)]
        if sinks_rows is not None:
            # the buffers hold the longest block; per-row blocks only where the rows' differ
            s = max(sinks_rows)
            if min(sinks_rows) < s:
                new._sinks_rows = sinks_rows
                s_heads = torch.tensor(sinks_rows, dtype=torch.int64).repeat_interleave(H)
        r_heads = torch.tensor(per_row, dtype=torch.int64).repeat_interleave(H) if per_row is not None else r
        n_host = store._host_lengths.to(torch.int64) - r_heads - s_heads
        n = n_host.to(dev)
        rr = 0  # row mode: the residual every whole row's slots (after the block) fill, right-aligned
        if whole is not None:
            rr = int(n_host[whole].max()) if bool(whole.any()) else 0
            held = n_host.clone()
            n_host = torch.where(whole, torch.zeros_like(n_host), n_host)  # a whole row packs nothing now
            n = n_host.to(dev)
        for b, later in enumerate(undecided):
            if later and bool((n_host[b * H : (b + 1) * H] > 0).any()):
                # it packs part groups now: unrotated, without weights, as alone (its layer decides so)
                new._choices[b] = (False, None, new.value_clip)
        padded_host = (n_host + G - 1) // G * G
        padded = padded_host.to(dev)
        caps_host = padded_host + G
        caps = caps_host.to(dev)
        offsets = torch.cumsum(caps, 0) - caps
        R = int(caps_host.sum())
        total = int(padded_host.sum())
        head, t = segments(padded, total)
        last = n[head] - 1
        s_dev = s_heads.to(dev) if torch.is_tensor(s_heads) else s
        lead = s_dev[head] if torch.is_tensor(s_dev) else s  # each packed row's head's sink block comes first
        src = store.offsets[head] + lead + torch.minimum(t, last)
        dst = offsets[head] + t
        D, Dv = int(store.k.shape[1]), int(store.v.shape[1])
        if D != Dv:
            raise NotImplementedError(f"packing keys of {D} and values of {Dv} channels")
        k = store.k.new_zeros((R, D))
        v = store.v.new_zeros((R, Dv))
        # index_select / index_copy_: a 2-D advanced index costs ~4x the time
        k.index_copy_(0, dst, store.k.index_select(0, src))
        v.index_copy_(0, dst, store.v.index_select(0, src))
        # the last kept slot and its copies share its count
        share = torch.where(t >= last, 1.0 / (padded[head] - last).to(torch.float32),
                            torch.ones((), device=dev))
        merged = store.counts[src] if store.counts is not None else torch.ones(total, device=dev)
        new.counts_plain = torch.ones(R, device=dev)
        new.counts_bias = torch.ones(R, device=dev)
        # a placeholder row of a kept key group (stores.keep_rows) weighs nothing either way
        hole = is_placeholder(merged)
        new.counts_plain.index_copy_(0, dst, torch.where(hole, TINY, share))
        new.counts_bias.index_copy_(0, dst, merged * share)
        new._merged = store.counts is not None
        if columns:
            new.positions = store.positions.new_zeros((R,))
            new.positions.index_copy_(0, dst, store.positions[src])
        if columns and store.scores is not None:
            new.scores = torch.full((R,), float("nan"), device=dev)
            new.scores.index_copy_(0, dst, store.scores[src].float())
        # every segment is whole groups (caps // G of them), each rounded with its kv head's weights
        weights, fb_index = new._head_weights(D, caps // G, B, H)
        kc, kmin, ksc = ops.pack_keys(new._flat_codes_keys(k, segments(caps, R)[0], H).view(1, 1, R, D), bits, G,
                                      feedback=weights, feedback_index=fb_index)
        vc, vmin, vsc = ops.pack_values(v.view(1, 1, R, D), new.value_bits, G, clip=new.value_clip)
        new._kc, new._kmin, new._ksc = kc[0, 0], kmin[0, 0], ksc[0, 0]
        new._vc, new._vmin, new._vsc = vc[0, 0], vmin[0, 0], vsc[0, 0]
        new.offsets, new.lengths, new.caps = offsets, padded, caps
        new._host_lengths, new._host_caps = padded_host.clone(), caps_host
        new._real = n_host.clone()
        if bool(hole.any()):
            new._real -= torch.bincount(head[hole & (t <= last)], minlength=B * H).cpu()
        # room for the residual to fill towards its next pack, at most a group ahead: behind an
        # evictor that keeps its budget a round comes every `interval` slots, long before a
        # small budget's residual fills, and PackedStore.append grows the buffer as tokens come
        # (it held 128 + G slots per head for 3 kept ones at ratio 0.99)
        cap = s + max(r, rr) + min(G, packed_store.RESIDUAL_ROOM)
        new._rk = store.k.new_empty((B, H, cap, D))
        new._rv = store.v.new_empty((B, H, cap, D))
        if columns:
            new._rcols = {"positions": store.positions.new_zeros((B, H, cap))}
            if store.scores is not None:
                new._rcols["scores"] = torch.full((B, H, cap), float("nan"), device=dev)
        # each head's first s slots (the sink block), then its newest r (after its n packed ones), in order
        # (row mode: each row's own newest, _rows_residual)
        for first, count, at in ((store.offsets, s, 0), (store.offsets + s_dev + n, 0 if per_row else r, s)):
            if not count:
                continue
            rows = (first[:, None] + torch.arange(count, device=dev)).reshape(-1)
            if at == 0 and new._sinks_rows is not None:
                # a row's block rows past its own sinks: copies of the store's
                # first row (finite, masked for the row, weighing 1 in the counts)
                within = torch.arange(count, device=dev)[None, :] < s_dev[:, None]
                rows = torch.where(within, rows.view(-1, count), 0).reshape(-1)
            new._rk[:, :, at : at + count] = store.k.index_select(0, rows).view(B, H, count, D)
            new._rv[:, :, at : at + count] = store.v.index_select(0, rows).view(B, H, count, D)
            if columns:
                new._rcols["positions"][:, :, at : at + count] = store.positions[rows].view(B, H, count)
                if store.scores is not None:
                    new._rcols["scores"][:, :, at : at + count] = store.scores[rows].view(B, H, count)
            if at == 0 and store.counts is not None:
                block = store.counts[rows].view(B, H, count)
                if new._sinks_rows is not None:
                    block = torch.where(within.view(B, H, count), block, torch.ones((), device=dev))
                new._sink_counts = None if bool((block == 1).all()) else block.clone()
        new._r0, new.r = s, r
        if whole is not None:
            # a whole row's every slot after the block, the other rows' none
            new._rows_residual(store, store.offsets + s, [int(held[b * H]) if bool(whole[b * H]) else 0
                                                          for b in range(B)], s)
        elif per_row is not None:
            new._rows_residual(store, store.offsets + s_dev + n, per_row, s)
        return new

    def _whole_layout(self, whole: list, lengths: list, S: int, per_row: list, sinks_rows: list) -> None:
        """``from_ragged(columns=True, rows_apart=True, whole_rows=...)``: a
        row kept whole (``lengths[b]`` slots per head) behind rounds is laid
        out as a uniform :class:`PackedStore` of it alone holds it before
        its first round, in ``per_row`` (own residual) and ``sinks_rows`` in
        place: with ``S`` sinks once it holds ``S + residual + group``
        slots (``take_sinks``) and then every whole group past ``residual +
        group - 1`` packed; with fewer, nothing (no sink block yet: it takes
        one while decoding, :meth:`take_sinks`, ``_sinks_due``). A row that
        still makes its choices (``row_choices`` None for it) packs its
        groups in the settle that follows instead, after choosing on them
        (``CompressedLayer._choose_rows``), as alone."""
        G, R = self.group, self.residual
        due = [False] * len(whole)
        for b, w in enumerate(whole):
            if w:
                P = max(0, (int(lengths[b]) - S - R) // G * G)
                sinks_rows[b] = S if P else 0
                if self._choices is not None and self._choices[b] is None:
                    # the row makes its choices at its first pack (the settle that follows,
                    # on the groups it packs, as alone): nothing packed here
                    P = 0
                per_row[b] = int(lengths[b]) - sinks_rows[b] - P
                due[b] = bool(S) and not sinks_rows[b]
        self._sinks_due = due if any(due) else None

    def take_sinks(self, pad=None) -> None:
        """Row mode: each row kept whole that has no sink block yet
        (``_sinks_due``) takes its ``sinks`` oldest residual slots as its
        block once its own residual holds ``sinks + residual + group``, as a
        uniform :class:`PackedStore` of it alone does, before its first
        pack. A per-head store takes no other sinks while decoding."""
        if self._sinks_due is None:
            return
        S, need = self.sinks_asked, self.sinks_asked + self.residual + self.group
        own = self._own_residual()
        for b, wait in enumerate(self._sinks_due):
            if wait and own[b] >= need:
                self._take_row_sinks(b, S)
        if not any(self._sinks_due):
            self._sinks_due = None

    def _take_row_sinks(self, b: int, S: int) -> None:
        """Row ``b``'s ``S`` oldest own residual slots become its sink block
        (the block grows to ``S`` rows first where it is shorter; its new
        rows are masked for every other row)."""
        if self._r0 < S:
            self._grow_block(S)
        at = self._r0 + self._rs[b]
        for buf in (self._rk, self._rv, *(self._rcols or {}).values()):
            buf[b, :, :S] = buf[b, :, at : at + S].clone()
        self._rs[b] += S  # the slots moved are no longer the row's residual
        sinks = self._row_sinks()
        sinks[b] = S
        self._sinks_rows = None if all(x == self._r0 for x in sinks) else sinks
        self._sinks_due[b] = False

    def _grow_block(self, S: int) -> None:
        """The sink block's buffers ``S`` rows long (rows added at its end,
        masked for every row until one takes them)."""
        o, extra = self._r0, S - self._r0
        sinks = self._row_sinks()

        def grow(t, fill):
            gap = t.new_full(tuple(t.shape[:2]) + (extra,) + tuple(t.shape[3:]), fill)
            return torch.cat([t[:, :, :o], gap, t[:, :, o:]], 2)

        self._rk, self._rv = grow(self._rk, 0), grow(self._rv, 0)
        if self._rcols is not None:
            self._rcols = {k: grow(t, float("nan") if k == "scores" else 0) for k, t in self._rcols.items()}
        if self._sink_counts is not None:
            self._sink_counts = grow(self._sink_counts, 1.0)
        self._rc = None
        self._r0, self._sinks_rows = S, sinks

    def row_dues(self) -> list[int]:
        """The base class's, where a row waiting for its sink block
        (``_sinks_due``) counts its ``sinks`` oldest residual slots out, as
        a uniform store of it alone does before it takes them. Out of row
        mode (packed once, every row's residual filled alike since the
        pack) every row packs the next settle's slots (:meth:`pending`)."""
        if self._np is None:
            return [self.pending()] * self.batch
        due = super().row_dues()
        if self._sinks_due is None:
            return due
        G, R, S = self.group, self.residual, self.sinks_asked
        return [max(0, (self.r - h - S - R) // G * G) if wait else d
                for d, h, wait in zip(due, self._rs, self._sinks_due)]

    def _rows_residual(self, store, first, counts: list[int], s: int) -> None:
        """Row mode's start: the ``counts[b]`` slots of each head of row
        ``b`` from row ``first[head]`` of ``store`` on go to the end of the
        residual's first ``max(counts)`` rows (after the sink block), with
        their positions and carried scores where the store keeps them; the
        rows before them are masked for the row (``_rs``). ``_np``: per row
        the packed rows its longest head holds."""
        B, H = self.batch, self.heads
        D = int(self._rk.shape[3])
        rr = max(counts, default=0)
        self._rs, self._np, self._pads = [], [], [0] * B
        # rows nobody's: zeros, so that an eager read (padded()) weighs finite values at 0
        self._rk[:, :, s : s + rr] = 0
        self._rv[:, :, s : s + rr] = 0
        if self._rcols is not None:
            self._rcols["positions"][:, :, s : s + rr] = 0
            if "scores" in self._rcols:
                self._rcols["scores"][:, :, s : s + rr] = float("nan")
        for b, m in enumerate(counts):
            if m:
                idx = (first[b * H : (b + 1) * H, None] + torch.arange(m, device=first.device)).reshape(-1)
                at = slice(s + rr - m, s + rr)
                self._rk[b, :, at] = store.k.index_select(0, idx).view(H, m, D)
                self._rv[b, :, at] = store.v.index_select(0, idx).view(H, m, -1)
                if self._rcols is not None:
                    self._rcols["positions"][b, :, at] = store.positions[idx].view(H, m)
                    if "scores" in self._rcols:
                        self._rcols["scores"][b, :, at] = store.scores[idx].view(H, m)
            self._rs.append(rr - m)
            self._np.append(int(self._host_lengths[b * H : (b + 1) * H].max()) if H else 0)
        self.r, self.n_packed = rr, max(self._np, default=0)

    def unpacked(self, rows=None) -> RaggedStore:
        """Every head's slots in full precision as a
        :class:`~kvcompress.stores.RaggedStore` (its dequantized packed slots,
        then the residual), with positions, carried scores and, for a merging
        method, merge counts: what a decode-time re-compression reads. A
        repeated last slot becomes one slot again with its copies' counts
        summed (the count it had before packing); placeholder rows are left
        out. In token order: a sink block comes first (each head's oldest
        kept slots), and after a ``keep_rows`` round a residual slot older
        than a kept group's takes its place by position. ``rows`` is
        ``_dequantized_rows()`` when the caller has it."""
        if self.positions is None:
            raise RuntimeError("RaggedPackedStore.unpacked: the store keeps no positions")
        B, H, _, D = (int(x) for x in self._rk.shape)
        s, dev = self._r0, self._rk.device
        N, r = B * H, self.r + s  # the block and the residual: the buffers' first s + r slots
        kd, vd = self._dequantized_rows() if rows is None else rows
        head, src, keep = self._packed_rows()
        M = int(self._real.max()) if N else 0
        # each kept row's column: kept rows before it in its own head
        kept_before = torch.cumsum(keep.to(torch.int64), 0) - keep.to(torch.int64)
        seg_first = torch.cumsum(self.lengths, 0) - self.lengths  # each head's first item
        within = kept_before - kept_before[seg_first[head]]
        rows = torch.zeros((N, M), dtype=torch.int64, device=dev)
        rows[head[keep], within[keep]] = src[keep]
        live = torch.arange(M, device=dev)[None, :] < self._real.to(dev)[:, None]
        # in token order: a round that kept groups in place (keep_rows) packs
        # the slots it re-packs after them, older ones among them
        late = torch.iinfo(torch.int64).max
        pos = self.positions[rows]
        order = torch.argsort(torch.where(live, pos.to(torch.int64), late), dim=1, stable=True)
        rows, pos = rows.gather(1, order), pos.gather(1, order)
        # the split count back whole: count * share / share
        counts = (self.counts_bias / self.counts_plain)[rows]
        resid_counts = self._residual_counts(True, r).reshape(N, r)
        rpos = self._rcols["positions"][:, :, :r].reshape(N, r)

        def cat(packed, resid):
            # block, packed part, residual: token order
            return torch.cat([resid[:, :s], packed, resid[:, s:]], 1)

        flat = rows.reshape(-1)  # index_select: a 2-D index costs ~4x the time on these small tensors
        keys = cat(kd.index_select(0, flat).view(N, M, D), self._rk[:, :, :r].reshape(N, r, D))
        values = cat(vd.index_select(0, flat).view(N, M, D), self._rv[:, :, :r].reshape(N, r, D))
        rvalid = torch.ones((N, r), dtype=torch.bool, device=dev)
        hid = self._hidden_rows(dev)
        if hid is not None:
            # row mode: the residual rows that are not a row's own are no slots of its heads
            col = torch.arange(r, device=dev)[None, :]
            rvalid = (col < hid[:, :1]) | (col >= hid[:, 1:])
        valid = cat(live, rvalid)
        positions = cat(pos, rpos)
        count = cat(counts, resid_counts) if self._merged else None
        scores = None
        if self.scores is not None:
            scores = cat(self.scores[rows], self._rcols["scores"][:, :, :r].reshape(N, r))
        if M and r > s:
            # A keep_rows round keeps old key groups in place and fills the
            # residual with the newest of the other slots, so a kept group
            # may hold a slot newer than a residual one: then token order
            # over the whole head (the block holds the oldest slots and stays first)
            newest = torch.where(live, pos.to(torch.int64), -1).amax(1)
            oldest = torch.where(rvalid[:, s:], rpos[:, s:].to(torch.int64), late).amin(1)
            if bool((oldest < newest).any()):
                order = torch.argsort(torch.where(valid, positions.to(torch.int64), late), dim=1, stable=True)
                keys = keys.gather(1, order[..., None].expand(-1, -1, D))
                values = values.gather(1, order[..., None].expand(-1, -1, D))
                valid, positions = valid.gather(1, order), positions.gather(1, order)
                count = None if count is None else count.gather(1, order)
                scores = None if scores is None else scores.gather(1, order)
        shape = (B, H, M + r)
        return RaggedStore.from_dense(keys.view(*shape, D), values.view(*shape, D), positions.view(shape),
                                      valid.view(shape), counts=None if count is None else count.view(shape),
                                      scores=None if scores is None else scores.view(shape))

    # ------------------------------------------------------------ geometry
    def head_lengths(self) -> list[int]:
        own, block = self._own_residual(), self._row_sinks()
        return [int(x) + own[i // self.heads] + block[i // self.heads] for i, x in enumerate(self._real.tolist())]

    def _row_sinks(self) -> list[int]:
        """Per row the sink block slots that are its own (the block's first)."""
        return list(self._sinks_rows) if self._sinks_rows is not None else [self._r0] * self.batch

    def max_length(self) -> int:
        return max(self.head_lengths(), default=self.r + self._r0)

    def _own_residual(self) -> list[int]:
        """Per row the residual slots that are its own: ``r``, less the rows
        masked for it in row mode."""
        return [self.r - h for h in self._rs] if self._rs is not None else [self.r] * self.batch

    @property
    def n(self) -> int:
        return self.max_length()

    @property
    def capacity(self) -> int:
        """Slots the longest head has room for: its packed rows' allocation
        and the full-precision rows (sink block and residual)."""
        packed = int(self._host_caps.max()) if self._host_caps is not None and self._host_caps.numel() else 0
        return max(self.max_length(), packed + (int(self._rk.shape[2]) if self._rk is not None else 0))

    def tensors(self) -> list:
        return [t for t in (self._kc, self._kmin, self._ksc, self._vc, self._vmin, self._vsc, self.counts_bias,
                            self.counts_plain, self.offsets, self.lengths, self.caps, self._rk, self._rv,
                            self.positions, self.scores, *(self._rcols or {}).values(), self.rotation,
                            self.feedback, self._sink_counts, self._rc, self._host_lengths, self._host_caps,
                            self._real, *(c[1] for c in self._choices or () if c is not None),
                            *(t for t in self._hidden or () if isinstance(t, torch.Tensor)))
                if t is not None]

    def __repr__(self) -> str:
        n = self._real
        span = f"{int(n.min())}..{int(n.max())}" if n is not None and n.numel() else "empty"
        vb = f", value_bits={self.value_bits}" if self.value_bits != self.bits else ""
        vb += self._choices_repr(("rotated keys", "key feedback"))  # value clipping is the store's, below
        if self._np is not None:  # row mode: the rows kept whole that have packed nothing yet
            waiting = [b for b, packed in enumerate(self._np) if not packed]
            vb += f", rows {waiting} not packed yet" if waiting else ""
        vb += ", clipped values" if self.value_clip else ""
        if self.sinks_asked:
            taken = self._r0 if self._sinks_rows is None else f"{self._sinks_rows} per row"
            vb += f", sinks={taken}" + (f" of {self.sinks_asked}" if self._sinks_rows is not None
                                         or self._r0 != self.sinks_asked else "")
            if self._sinks_due is not None:
                vb += f" (rows {[b for b, w in enumerate(self._sinks_due) if w]} take theirs later)"
        holes = int(is_placeholder(self.counts_bias).sum()) if self.counts_bias is not None else 0
        span += f" (+{holes} placeholder rows)" if holes else ""
        return (f"RaggedPackedStore(bits={self.bits}{vb}, group={self.group}, residual={self.residual}, "
                f"batch={self.batch}, heads={self.heads}, packed per head={span}, "
                + (f"full_precision per row={self._own_residual()})" if self._rs is not None
                   else f"full_precision={self.r})"))

    # ------------------------------------------------------------- writing
    def append(self, keys, values, first_position: int) -> None:
        super().append(keys, values, first_position)
        if self._rcols is None:
            return
        q, cap, end = int(keys.shape[2]), int(self._rk.shape[2]), self._r0 + self.r
        self._rcols = {name: _fit(t, cap) for name, t in self._rcols.items()}
        pos = self._rcols["positions"]
        pos[:, :, end - q : end] = torch.arange(first_position, first_position + q, dtype=pos.dtype,
                                                device=pos.device)
        if "scores" in self._rcols:
            self._rcols["scores"][:, :, end - q : end] = float("nan")  # not scored yet

    def _drop_oldest(self, m: int) -> None:
        """The base class's, with the residual's columns moved alike (a sink
        block's stay in front)."""
        o = self._r0
        kept = None if self._rcols is None else {
            k: torch.cat([t[:, :, :o], t[:, :, o + m : o + self.r]], 2) for k, t in self._rcols.items()}
        super()._drop_oldest(m)
        if kept is not None:
            cap = int(self._rk.shape[2])
            self._rcols = {k: _fit(t, cap) for k, t in kept.items()}

    def _head_weights(self, D: int, groups, B: int, H: int):
        """``(weights, feedback_index)`` for ``ops.pack_keys`` over every
        head's segment of ``groups[i]`` key groups, in head order: each
        head's kv head's weights (``[H, D, D]``), or with per-row choices
        its row's (``[B * H, D, D]``, zeros for a row without: KIVI's
        rounding); ``(None, None)`` without feedback."""
        dev = groups.device
        if self._choices is None:
            if self.feedback is None:
                return None, None
            return expand(self.feedback, D), torch.repeat_interleave(torch.arange(B * H, device=dev) % H,
                                                                     groups).view(1, 1, -1)
        tris = [c[1] if c is not None else None for c in self._choices]
        if all(t is None for t in tris):
            return None, None
        w = torch.zeros((B * H, D, D), dtype=torch.float32, device=dev)
        for b, t in enumerate(tris):
            if t is not None:
                w[b * H : (b + 1) * H] = expand(t, D)
        return w, torch.repeat_interleave(torch.arange(B * H, device=dev), groups).view(1, 1, -1)

    def _flat_codes_keys(self, keys, head, H: int):
        """``keys`` ``[R, D]`` as they are packed, row ``i`` of head
        ``head[i]`` (int64 ``[R]``, ``H`` kv heads per batch row): rotated
        (float32) when its batch row's keys are (every row's, or per-row
        choices'), else unchanged."""
        if self.rotation is None:
            return keys
        mask = self._rotated_rows(keys.device)
        if mask is None:
            return rotate(keys, self.rotation, torch.float32)
        return torch.where(mask.view(-1)[head // H][:, None], rotate(keys, self.rotation, torch.float32),
                           keys.float())

    def packed_any(self) -> bool:
        """Whether any head holds a packed slot."""
        return self._host_lengths is not None and bool(self._host_lengths.sum())

    def _pack_oldest(self, m: int) -> None:
        """Pack the ``m`` oldest residual slots onto the end of every head's
        segment (each segment stays a whole number of groups)."""
        self._pack_heads([m] * self.batch, [0] * self.batch)

    def _pack_heads(self, due: list[int], first: list[int]) -> None:
        """Pack ``due[b]`` residual slots of every head of row ``b`` (whole
        groups), from residual row ``first[b]`` on (after the sink block),
        onto the end of the head's segment: one flat pack of every head's
        run, so that each head takes its own weights."""
        B, H, _, D = (int(x) for x in self._rk.shape)
        N, G, o = B * H, self.group, self._r0
        dev = self._rk.device
        m_host = torch.tensor(due, dtype=torch.int64).repeat_interleave(H)
        if not bool(m_host.any()):
            return
        if bool((self._host_lengths + m_host > self._host_caps).any()):
            self._grow(int(m_host.max()))
        runs = [(b, o + f, m) for b, (f, m) in enumerate(zip(first, due)) if m]
        flat = torch.cat([self._rk[b, :, a : a + m].reshape(H * m, D) for b, a, m in runs])
        flat_v = torch.cat([self._rv[b, :, a : a + m].reshape(H * m, -1) for b, a, m in runs])
        m_dev = m_host.to(dev)
        weights, fb_index = self._head_weights(D, m_dev // G, B, H)
        heads = torch.arange(N, device=dev).repeat_interleave(m_dev)
        P = int(heads.shape[0])
        kc, kmin, ksc = ops.pack_keys(self._flat_codes_keys(flat, heads, H).view(1, 1, P, D), self.bits, G,
                                      feedback=weights, feedback_index=fb_index)
        vc, vmin, vsc = ops.pack_values(flat_v.view(1, 1, P, -1), self.value_bits, G, clip=self.value_clip)
        # each packed row's place: its head's segment end, then its index in the head's run
        seg, t = segments(m_dev, P)
        rows = (self.offsets + self.lengths)[seg] + t
        gseg, gt = segments(m_dev // G, P // G)
        grows = (self.offsets + self.lengths)[gseg] // G + gt
        # index_copy_: a 2-D advanced index put costs several times as much
        self._kc.index_copy_(0, rows, kc.reshape(P, -1))
        self._vc.index_copy_(0, rows, vc.reshape(P, -1))
        self._vmin.index_copy_(0, rows, vmin.reshape(P, -1).to(self._vmin.dtype))
        self._vsc.index_copy_(0, rows, vsc.reshape(P, -1).to(self._vsc.dtype))
        self._kmin.index_copy_(0, grows, kmin.reshape(P // G, D).to(self._kmin.dtype))
        self._ksc.index_copy_(0, grows, ksc.reshape(P // G, D).to(self._ksc.dtype))
        self.counts_bias.index_fill_(0, rows, 1.0)
        self.counts_plain.index_fill_(0, rows, 1.0)
        if self._rcols is not None:
            self.positions.index_copy_(0, rows, torch.cat([self._rcols["positions"][b, :, a : a + m].reshape(-1)
                                                           for b, a, m in runs]))
            if self.scores is not None:
                self.scores.index_copy_(0, rows, torch.cat([self._rcols["scores"][b, :, a : a + m].reshape(-1)
                                                            for b, a, m in runs]))
        self.lengths = self.lengths + m_dev
        self._host_lengths += m_host
        self._real += m_host
        self.n_packed += max(due)

    def _settle_rows(self) -> None:
        """Row mode's settle (``from_ragged(whole_rows=...)``): each row
        packs the whole groups of its own residual past ``residual + group -
        1`` slots, as it does alone; then the residual rows that every row
        has packed (or never held) leave the buffers."""
        due = self.row_dues()
        if not any(due):
            return
        self._pack_heads(due, self._rs)
        self._rows_packed(due)

    def start_rows(self, pad, unpadded: bool = False) -> bool:
        """Whether a row still makes its choices at its own first pack (a row
        kept whole, ``from_ragged(whole_rows=...)``, that has not chosen):
        the layer then calls ``_choose_rows`` before :meth:`settle`. Other
        row-mode stores (each row's own residual behind rounds) pack with
        the choices they were made with."""
        return self._np is not None and self._choices is not None and None in self._choices

    def rows_to_choose(self) -> bool:
        """Whether a row still makes its choices (:meth:`set_row_choice`)
        before it packs, out of row mode: packed once, a row that packed
        nothing then (``from_ragged(row_choices=...)`` None for it)."""
        return self._np is None and self._choices is not None and None in self._choices

    def settle(self, pad=None) -> None:
        """Pack whole residual groups: in row mode each row its own
        (:meth:`_settle_rows`), else every head's at once. A per-head store
        holds no padded slot, so ``pad`` changes nothing."""
        if self._np is not None:
            self._settle_rows()
            return
        super().settle(pad)

    def row_pending(self, b: int):
        """``(keys, values)`` ``[1, H, m, D]`` of the residual slots row
        ``b``'s next settle packs (row mode: the base class's; packed once,
        the residual's oldest :meth:`pending` slots, as for every row)."""
        if self._np is not None:
            return super().row_pending(b)
        m = self.pending()
        return self.residual_keys()[b : b + 1, :, :m], self.residual_values()[b : b + 1, :, :m]

    def set_row_choice(self, b: int, rotation, feedback, clip: bool) -> None:
        """Row mode: row ``b`` (one that packs nothing yet, a whole row)
        packs its keys as ``k @ rotation`` rounded with ``feedback`` (see
        :meth:`PackedStore.set_row_choice`); the rows that packed already
        keep their choices, the store's where none were given per row. The
        value groups of every row follow the store's ``value_clip``.
        Packed once (no row mode): only a row left to choose
        (``from_ragged(row_choices=...)`` None for it) that has packed
        nothing, before the settle that packs its first group."""
        if self._np is None:
            H = self.heads
            if self._choices is None or self._choices[b] is not None:
                raise RuntimeError(f"RaggedPackedStore.set_row_choice: row {b} packs with choices made already")
            if bool(self._host_lengths[b * H : (b + 1) * H].any()):
                raise RuntimeError(f"RaggedPackedStore.set_row_choice: row {b} has packed slots already")
            self._put_choice(b, rotation, feedback, self.value_clip)
            return
        if self._choices is None and self._np is not None:
            self._choices = [(self.rotation is not None, self.feedback, self.value_clip)] * self.batch
        super().set_row_choice(b, rotation, feedback, clip)

    def _grow(self, m: int) -> None:
        """Room for ``m`` more rows per head: the slack doubles each time, so
        decoding moves the segments O(log steps) times."""
        G = self.group
        self._slack = max(self._slack * 2, (m + G - 1) // G * G)
        caps_host = self._host_lengths + self._slack
        dev = self.offsets.device
        caps = caps_host.to(dev)
        offsets = torch.cumsum(caps, 0) - caps
        total = int(self._host_lengths.sum())
        head, t = segments(self.lengths, total)
        self._move(self.offsets[head] + t, offsets[head] + t, int(caps_host.sum()))
        self.offsets, self.caps, self._host_caps = offsets, caps, caps_host

    def _move(self, src, dst, R: int) -> None:
        """New buffers of ``R`` rows with rows ``src`` copied to ``dst``
        (group-aligned runs: key groups move with their first row)."""
        G = self.group

        def moved(old, rows_src, rows_dst, n_rows, fill):
            new = old.new_full((n_rows,) + tuple(old.shape[1:]), fill)
            new[rows_dst] = old[rows_src]
            return new

        first = src % G == 0
        gsrc, gdst = src[first] // G, dst[first] // G
        self._kc, self._vc = moved(self._kc, src, dst, R, 0), moved(self._vc, src, dst, R, 0)
        self._vmin, self._vsc = moved(self._vmin, src, dst, R, 0), moved(self._vsc, src, dst, R, 0)
        self.counts_bias = moved(self.counts_bias, src, dst, R, 1)
        self.counts_plain = moved(self.counts_plain, src, dst, R, 1)
        if self.positions is not None:
            self.positions = moved(self.positions, src, dst, R, 0)
        if self.scores is not None:
            self.scores = moved(self.scores, src, dst, R, float("nan"))
        self._kmin, self._ksc = moved(self._kmin, gsrc, gdst, R // G, 0), moved(self._ksc, gsrc, gdst, R // G, 0)

    def index_batch(self, idx) -> None:
        """Rows ``idx`` ``[B']`` of the batch, in that order (beam search)."""
        dev = self.offsets.device
        idx = idx.to(dev)
        H = self.heads
        src_head = (idx[:, None] * H + torch.arange(H, device=dev)[None, :]).reshape(-1)
        host_idx = (idx.cpu()[:, None] * H + torch.arange(H)[None, :]).reshape(-1)
        caps = self.caps[src_head]
        offsets = torch.cumsum(caps, 0) - caps
        R = int(self._host_caps[host_idx].sum())
        head, t = segments(caps, R)
        src = self.offsets[src_head][head] + t
        self._move(src, torch.arange(R, device=dev), R)
        self.offsets, self.caps, self.lengths = offsets, caps, self.lengths[src_head]
        self._host_caps, self._host_lengths = self._host_caps[host_idx], self._host_lengths[host_idx]
        self._real = self._real[host_idx]
        rows = idx.cpu().tolist()
        if self._choices is not None:
            self._choices, self._rot_mask = [self._choices[i] for i in rows], None
        if self._np is not None:
            self._np, self._rs, self._pads = ([x[i] for i in rows] for x in (self._np, self._rs, self._pads))
        if self._sinks_rows is not None:
            self._sinks_rows = [self._sinks_rows[i] for i in rows]
        if self._sinks_due is not None:
            self._sinks_due = [self._sinks_due[i] for i in rows]
        self._rk, self._rv = self._rk.index_select(0, idx), self._rv.index_select(0, idx)
        if self._sink_counts is not None:
            self._sink_counts, self._rc = self._sink_counts.index_select(0, idx), None
        if self._rcols is not None:
            self._rcols = {k: t.index_select(0, idx) for k, t in self._rcols.items()}

    def adopt_uniform_rows(self, old: PackedStore, rows: list[bool]) -> list[bool]:
        """Rows ``b`` with ``rows[b]`` (kept whole, ``from_ragged(whole_rows=
        ...)``, laid out as a uniform store of the row alone) take their
        packed slots bit for bit from ``old``, the row-mode uniform
        :class:`PackedStore` the layer held before it went per-head: the
        codes and scales of every head's ``old._np[b]`` oldest packed slots
        (the layout may pack more after them: groups the row's residual has
        filled since). Packing them again from their dequantized slots
        rounds scales an ulp apart; alone the row's layer is still that
        uniform store. A row laid out otherwise (fewer packed slots or
        another sink block: it waits for its choice) is packed as it is.
        Returns per row whether it was adopted."""
        if type(old) is not PackedStore or old._np is None or old.batch != self.batch or old.heads != self.heads \
                or old.group != self.group or len(rows) != self.batch:
            raise ValueError("adopt_uniform_rows: old must be a row-mode uniform store of the same batch, heads "
                             "and group, one flag per row")
        H, G = self.heads, self.group
        sinks = self._row_sinks()
        offsets = self.offsets.tolist()
        took = []
        for b, take in enumerate(rows):
            m = old._np[b]
            # (its whole layout may pack more: the groups its residual filled since, which the
            # settle of this step packs alone too, from the same full-precision slots)
            ok = bool(take and m and sinks[b] == old._r0
                      and all(int(self._host_lengths[b * H + h]) >= m for h in range(H)))
            took.append(ok)
            if not ok:
                continue
            for h in range(H):
                o = offsets[b * H + h]
                for name in ("_kc", "_vc", "_vmin", "_vsc"):
                    getattr(self, name)[o : o + m] = getattr(old, name)[b, h, :m]
                for name in ("_kmin", "_ksc"):
                    getattr(self, name)[o // G : (o + m) // G] = getattr(old, name)[b, h, : m // G]
        return took

    def adopt_rows(self, old: "RaggedPackedStore", rows: list[bool]) -> None:
        """Rows ``b`` with ``rows[b]`` as ``old`` holds them, bit for bit:
        their heads' packed segments (codes, scales, counts, positions and
        carried scores, placeholder rows included), sink block and own
        residual. A round packs every row afresh from its dequantized slots,
        and a row the round left as it was (``from_ragged(row_layout=...)``,
        the same sink block, residual and kept slots) would come back with
        scales an ulp apart, or, after a ``keep_rows`` round, its slots
        regrouped in token order; alone it has no round then."""
        B, H, G = self.batch, self.heads, self.group
        if old.batch != B or old.heads != H or old.group != G or len(rows) != B:
            raise ValueError("adopt_rows: old must be a store of the same batch, heads and group, one flag per row")
        mine, theirs = self._own_residual(), old._own_residual()
        s_new, s_old = self._row_sinks(), old._row_sinks()
        for b, take in enumerate(rows):
            if take and (mine[b] != theirs[b] or s_new[b] != s_old[b]
                         or not torch.equal(self._real[b * H : (b + 1) * H], old._real[b * H : (b + 1) * H])):
                raise ValueError(f"adopt_rows: row {b} is laid out otherwise in old (sinks, residual or slots)")
        if not any(rows):
            return
        take = torch.tensor([bool(x) for x in rows]).repeat_interleave(H)
        dev = self.offsets.device
        take_dev = take.to(dev)
        caps_host = torch.where(take, old._host_caps, self._host_caps)
        lengths_host = torch.where(take, old._host_lengths, self._host_lengths)
        caps = caps_host.to(dev)
        offsets = torch.cumsum(caps, 0) - caps
        R = int(caps_host.sum())
        lengths = torch.where(take_dev, old.lengths, self.lengths)
        head, t = segments(lengths, int(lengths_host.sum()))
        from_old = take_dev[head]
        src = torch.where(from_old, old.offsets[head], self.offsets[head]) + t
        dst = offsets[head] + t
        first = t % G == 0  # key groups move with their first row
        gdst = dst[first] // G

        # one index per source: an old row's index is into old's buffers, a new row's into ours
        def spliced(a, b_, fill, group=False):
            if a is None:
                return None
            n = R // G if group else R
            out = a.new_full((n,) + tuple(a.shape[1:]), fill)
            d, sel, srcs = (gdst, from_old[first], src[first] // G) if group else (dst, from_old, src)
            if bool((~sel).any()):
                out.index_copy_(0, d[~sel], a.index_select(0, srcs[~sel]))
            if bool(sel.any()):
                out.index_copy_(0, d[sel], b_.index_select(0, srcs[sel]))
            return out

        self._kc, self._vc = spliced(self._kc, old._kc, 0), spliced(self._vc, old._vc, 0)
        self._vmin, self._vsc = spliced(self._vmin, old._vmin, 0), spliced(self._vsc, old._vsc, 0)
        self._kmin, self._ksc = spliced(self._kmin, old._kmin, 0, True), spliced(self._ksc, old._ksc, 0, True)
        self.counts_bias = spliced(self.counts_bias, old.counts_bias, 1)
        self.counts_plain = spliced(self.counts_plain, old.counts_plain, 1)
        self.positions = spliced(self.positions, old.positions, 0)
        if self.scores is not None or old.scores is not None:
            nan = float("nan")
            mine_s = self.scores if self.scores is not None else torch.full_like(self.counts_bias, nan)
            theirs_s = old.scores if old.scores is not None else torch.full_like(old.counts_bias, nan)
            self.scores = spliced(mine_s, theirs_s, nan)
        self.offsets, self.caps, self.lengths = offsets, caps, lengths
        self._host_caps, self._host_lengths = caps_host, lengths_host.clone()
        self._real = torch.where(take, old._real, self._real)
        # the sink block and own residual: the buffers' rows the row holds, at its place in each
        for b, adopt in enumerate(rows):
            if not adopt:
                continue
            r_b, sb = mine[b], s_new[b]
            at_new, at_old = self._r0 + self.r - r_b, old._r0 + old.r - r_b
            for buf, src_buf in ((self._rk, old._rk), (self._rv, old._rv),
                                 *(((self._rcols[k], old._rcols[k]) for k in self._rcols) if self._rcols else ())):
                buf[b, :, :sb] = src_buf[b, :, :sb]
                buf[b, :, at_new : at_new + r_b] = src_buf[b, :, at_old : at_old + r_b]
            if old._sink_counts is not None or self._sink_counts is not None:
                if self._sink_counts is None:
                    self._sink_counts = torch.ones(tuple(self._rk.shape[:2]) + (self._r0,), device=dev)
                self._sink_counts[b, :, :sb] = (old._sink_counts[b, :, :sb] if old._sink_counts is not None
                                                else 1.0)
        if self._np is not None:
            self._np = [int(self._host_lengths[b * H : (b + 1) * H].max()) if H else 0 for b in range(B)]
            self.n_packed = max(self._np, default=0)
        if old._choices is not None or self._choices is not None:
            # an adopted row's packed slots are read the way they were packed
            own = self._choices or [(self.rotation is not None, self.feedback, self.value_clip)] * B
            was = old._choices or [(old.rotation is not None, old.feedback, old.value_clip)] * B
            self._choices = [was[b] if take_b else own[b] for b, take_b in enumerate(rows)]
        self._rc = self._hidden = None
        self._rot_mask = None

    # ----------------------------------------------------------- attention
    def _packed_rows(self):
        """Every head's packed rows in buffer order: ``(head, rows, first)``,
        int64 ``[P]`` head and row of each, and bool ``first``: False on the
        rows that repeat the position of the row before them in their head, a
        last kept slot's copies (the group's fill, ``from_ragged``) and a kept
        group's placeholders (``stores.keep_rows``), which are no slots of
        their own."""
        head, t = segments(self.lengths, int(self._host_lengths.sum()))
        rows = self.offsets[head] + t
        pos = self.positions[rows]
        first = torch.ones_like(t, dtype=torch.bool)
        first[1:] = (t[1:] == 0) | (pos[1:] != pos[:-1])
        return head, rows, first

    def _dequantized_rows(self):
        """Every row of the flat buffers dequantized: ``(keys [R, D], values
        [R, D])`` in the residual's dtype (slack rows included)."""
        D, G, dtype = int(self._rk.shape[3]), self.group, self._rk.dtype
        R = int(self._kc.shape[0])
        if self._choices is None:
            kd = self._unpack_keys(self._kc.view(1, 1, R, -1), self._kmin.view(1, 1, R // G, D),
                                   self._ksc.view(1, 1, R // G, D), self.bits, dtype)[0, 0]
        else:
            # each row's heads rotated back as they were packed (slack rows: any way)
            kd = ops.unpack_keys(self._kc.view(1, 1, R, -1), self._kmin.view(1, 1, R // G, D),
                                 self._ksc.view(1, 1, R // G, D), self.bits, G)[0, 0]
            if self.rotation is not None:
                head = segments(self.caps, R)[0]
                mask = self._rotated_rows(kd.device).view(-1)[head // self.heads][:, None]
                kd = torch.where(mask, unrotate(kd, self.rotation, torch.float32), kd)
            kd = kd.to(dtype)
        vd = ops.unpack_values(self._vc.view(1, 1, R, -1), self._vmin.view(1, 1, R, -1),
                               self._vsc.view(1, 1, R, -1), self.value_bits, G, head_dim=D, dtype=dtype)[0, 0]
        return kd, vd

    def padded(self, count_bias: bool = True):
        """Dequantized per-head copy, left-padded: ``(keys [B*H, 1, M + r, D],
        values, start [B*H], log_counts [B*H, M + r])`` with head ``i``'s
        packed rows (repeated last slots included) in columns ``start[i] ..
        M - 1`` and the residual (a sink block, then the residual window)
        after them; for tests and the model options the kernel lacks
        (softcap, sink logits)."""
        B, H, _, D = (int(x) for x in self._rk.shape)
        N, r, dtype = B * H, self._r0 + self.r, self._rk.dtype  # a sink block is the residual's front
        kd, vd = self._dequantized_rows()
        M = int(self._host_lengths.max()) if N else 0
        start = M - self.lengths
        col = torch.arange(M, device=kd.device)[None, :]
        live = col >= start[:, None]
        rows = torch.where(live, self.offsets[:, None] + col - start[:, None], torch.zeros_like(col))
        counts = self.counts_bias if count_bias else self.counts_plain
        keys = torch.where(live[..., None], kd[rows], torch.zeros((), dtype=dtype, device=kd.device))
        values = torch.where(live[..., None], vd[rows], torch.zeros((), dtype=dtype, device=kd.device))
        logc = torch.where(live, torch.log(counts[rows]), torch.zeros((), device=kd.device))
        keys = torch.cat([keys, self._rk[:, :, :r].reshape(N, r, D)], 1)[:, None]
        values = torch.cat([values, self._rv[:, :, :r].reshape(N, r, D)], 1)[:, None]
        rlog = torch.log(self._residual_counts(count_bias, r))
        hid = self._hidden_rows(kd.device)
        if hid is not None:
            # row mode: the residual rows that are not a row's own weigh nothing for it
            col = torch.arange(r, device=kd.device)[None, :]
            rlog = torch.where((col >= hid[:, :1]) & (col < hid[:, 1:]), float("-inf"), rlog.reshape(N, r))
        logc = torch.cat([logc, rlog.reshape(N, r)], 1)
        return keys, values, start, logc

    def _hidden_rows(self, device):
        """``residual_hidden`` ``[B * H, 2]`` of the kernel call (row mode,
        or packed once with per-row sink blocks), per head the rows of the
        sink block and residual that are not its row's own, one stretch:
        the block's rows past the row's sinks, then the residual rows before
        its own; None when every row's are all."""
        if self._sinks_rows is None and (self._rs is None or not any(self._rs)):
            return None
        block, own = self._row_sinks(), self._hidden_before()
        key = (torch.device(device), self._r0, tuple(own), tuple(block))  # built again when one moves
        if self._hidden is None or self._hidden[0] != key:
            o = self._r0
            hid = torch.tensor([[s, o + x] for s, x in zip(block, own)],
                               dtype=torch.int64).repeat_interleave(self.heads, 0)
            self._hidden = (key, hid.to(device))
        return self._hidden[1]

    def _hidden_before(self) -> list[int]:
        """Per row the residual rows before its own (row mode's ``_rs``; out
        of it, where only the sink block differs by row, none)."""
        return list(self._rs) if self._rs is not None else [0] * self.batch

    def dequantized(self):
        raise NotImplementedError("a per-head packed layer has no [B, H, n, D] form: use padded()")

    def attend(self, query, spec: AttentionSpec, kv_start=None, query_pos=None):
        if spec.window is not None:
            raise NotImplementedError("a sliding-window layer is never packed")
        q = int(query.shape[2])
        counts = self.counts_bias if spec.count_bias else self.counts_plain
        hidden = self._hidden_rows(query.device)
        if (spec.plain and kernel_reads(query, self._rk) and q <= min(self._own_residual(), default=self.r)
                and (hidden is None or packed_store.one_call(query) or q == 1)):
            if hidden is not None and not packed_store.one_call(query):
                return self._attend_joined_rows(query, spec.scaling, counts, spec.count_bias)
            # a sink block is read as the residual's oldest slots; in row mode
            # (residual_hidden) each row's own residual after it
            rk, rv = self._rk[:, :, : self._r0 + self.r], self._rv[:, :, : self._r0 + self.r]
            pq, rotated = self._packed_query(query)
            residual_query = query if rotated else None
            if rotated and not packed_store.one_call(query):
                # the packed segments with q @ R, the residual (kept as it came) with q
                return self._attend_joined_heads(query, rk, rv, spec.scaling, counts)
            return ops.packed_attention(pq, self._kc, self._kmin, self._ksc, self._vc, self._vmin, self._vsc,
                                        rk, rv, bits=self.bits, value_bits=self.value_bits, group=self.group,
                                        scaling=spec.scaling, offsets=self.offsets, lengths=self.lengths,
                                        counts=counts, residual_query=residual_query, residual_hidden=hidden,
                                        residual_counts=self._kernel_residual_counts(spec.count_bias))
        keys, values, start, logc = self.padded(spec.count_bias)
        return padded_head_attention(query, keys, values, start, spec, self.heads, logc)

    def _attend_joined_rows(self, query, scaling, counts, count_bias: bool):
        """Row mode's decode step where the kernel takes no
        ``residual_hidden`` (CUDA): every head's packed segments (``q @ R``
        on rotated rows), each row's own residual (``kv_start`` masks the
        rows that are not its own) and the sink block with its merge counts,
        three calls joined by their log-sum-exps. One query per row: a
        block read on its own would be masked causally for a chunk."""
        B, H, o, r = self.batch, self.heads, self._r0, self.r
        widths = dict(bits=self.bits, value_bits=self.value_bits, group=self.group, scaling=scaling)
        none = self._rk[:, :, :0]
        parts = [ops.packed_attention(self._packed_query(query)[0], self._kc, self._kmin, self._ksc, self._vc,
                                      self._vmin, self._vsc, none, none, offsets=self.offsets, lengths=self.lengths,
                                      counts=counts, return_lse=True, **widths)]
        empty = self._no_packed(B, H)
        own = torch.tensor(self._hidden_before(), dtype=torch.int64, device=query.device)
        parts.append(ops.packed_attention(query, *empty, self._rk[:, :, o : o + r], self._rv[:, :, o : o + r],
                                          kv_start=own, return_lse=True, **widths))
        if o:
            bk, bv, bc = self._rk[:, :, :o], self._rv[:, :, :o], self._kernel_residual_counts(count_bias, o)
            lead = None
            if self._sinks_rows is not None:
                # each row's sinks moved to the block's end, so that kv_start
                # masks the rows past them (a prefix now)
                bk, bv, bc, lead = self._block_right_aligned(bk, bv, bc)
            parts.append(ops.packed_attention(query, *empty, bk, bv, residual_counts=bc, kv_start=lead,
                                              return_lse=True, **widths))
        return join_parts(parts, query.dtype)

    def _block_right_aligned(self, bk, bv, bc):
        """The sink block ``[B, H, o, D]`` (and its counts ``[B, H, o]`` or
        None) with each row's own sinks at its end, and ``kv_start`` ``[B]``:
        the rows before them, which are not the row's."""
        o, dev = self._r0, bk.device
        block = torch.tensor(self._row_sinks(), dtype=torch.int64, device=dev)
        lead = o - block
        # column j of row b reads block row j - lead[b] (masked where negative)
        src = (torch.arange(o, device=dev)[None, :] - lead[:, None]).clamp_min(0)
        idx = src[:, None, :, None]
        bk = bk.gather(2, idx.expand(-1, bk.shape[1], -1, bk.shape[3]))
        bv = bv.gather(2, idx.expand(-1, bv.shape[1], -1, bv.shape[3]))
        if bc is not None:
            bc = bc.gather(2, src[:, None, :].expand(-1, bc.shape[1], -1)).contiguous()
        return bk, bv, bc, lead

    def _no_packed(self, B: int, H: int) -> tuple:
        """An empty packed part ``[B, H, 0, ...]`` in the uniform layout, for
        a kernel call that reads residual rows only."""
        return tuple(t.new_empty((B, H, 0) + tuple(t.shape[1:]))
                     for t in (self._kc, self._kmin, self._ksc, self._vc, self._vmin, self._vsc))

    def _residual_counts(self, count_bias: bool, r: int):
        """float32 ``[B, H, r]`` counts of the buffers' first ``r`` residual
        slots (sink block, then the window): the block's merge counts with
        ``count_bias``, else ones."""
        rc = self._kernel_residual_counts(count_bias, r)
        if rc is None:
            return torch.ones(tuple(self._rk.shape[:2]) + (r,), device=self._rk.device)
        return rc

    def _kernel_residual_counts(self, count_bias: bool, r: int | None = None):
        """The ``residual_counts`` of a kernel call over the sink block and
        the residual window (``r`` slots, default both whole), or None when
        every one counts 1 (no merged slot in the block, or no count bias)."""
        if self._sink_counts is None or not count_bias:
            return None
        r = self._r0 + self.r if r is None else r
        if self._rc is None or self._rc.shape[2] < r:
            s = self._r0
            self._rc = torch.ones(tuple(self._rk.shape[:2]) + (r + self.group,), device=self._rk.device)
            self._rc[:, :, :s] = self._sink_counts
        return self._rc[:, :, :r]

    def _attend_joined_heads(self, query, rk, rv, scaling, counts):
        """Rotated keys where the kernel takes no ``residual_query`` (not
        ``one_call``): every head's packed segment read with the rotated
        query and no residual, the residual with the query as it is (an
        empty packed part of the uniform layout), joined through their
        log-sum-exps."""
        o1, l1 = ops.packed_attention(self._packed_query(query)[0], self._kc, self._kmin, self._ksc, self._vc,
                                      self._vmin, self._vsc, rk[:, :, :0], rv[:, :, :0], bits=self.bits,
                                      value_bits=self.value_bits, group=self.group, scaling=scaling,
                                      offsets=self.offsets, lengths=self.lengths, counts=counts, return_lse=True)
        empty = self._no_packed(int(rk.shape[0]), int(rk.shape[1]))
        o2, l2 = ops.packed_attention(query, *empty, rk, rv, bits=self.bits, value_bits=self.value_bits,
                                      group=self.group, scaling=scaling, return_lse=True,
                                      residual_counts=self._kernel_residual_counts(counts is self.counts_bias))
        return join_parts([(o1, l1), (o2, l2)], query.dtype)


def _fit(t, cap: int):
    """Residual column ``t`` ``[B, H, c]`` with room for ``cap`` slots (its
    first ``c`` kept; new room NaN for scores, 0 for positions)."""
    have = int(t.shape[2])
    if have >= cap:
        return t
    fill = float("nan") if t.is_floating_point() else 0
    return torch.cat([t, t.new_full(t.shape[:2] + (cap - have,), fill)], 2)


def _whole_heads(store, whole_rows, columns: bool, rows_apart: bool):
    """``from_ragged``'s ``whole_rows`` as a host bool ``[B * H]`` per head
    (None: not given), checked: one flag per row, ``columns`` only with
    ``rows_apart``, and a whole row's heads all hold the same slots, none
    merged."""
    if whole_rows is None:
        return None
    B, H = store.batch, store.heads
    if (columns and not rows_apart) or len(whole_rows) != B:
        raise ValueError("whole_rows: one flag per row, for a store packed once (columns=False) or one whose "
                         "rows keep their own residual (columns=True, rows_apart=True)")
    lengths = store._host_lengths.view(B, H)
    for b, w in enumerate(whole_rows):
        if not w:
            continue
        if bool((lengths[b] != lengths[b, 0]).any()):
            raise ValueError(f"whole_rows: row {b}'s heads hold different numbers of slots, so it was not kept whole")
        if store.counts is not None and int(lengths[b, 0]):
            n = int(lengths[b, 0])
            idx = (store.offsets[b * H : (b + 1) * H, None] + torch.arange(n, device=store.offsets.device))
            if bool((store.counts[idx.reshape(-1)] != 1).any()):
                raise ValueError(f"whole_rows: row {b} holds merged slots, so it was not kept whole")
    return torch.tensor([bool(w) for w in whole_rows], dtype=torch.bool).repeat_interleave(H)


def layout_problem(store, b: int, kept, sinks: int, adopted: bool = False) -> str | None:
    """Why ``store`` (a :class:`~kvcompress.stores.RaggedStore`) cannot lay
    out its row ``b`` as ``kept = (s_b, r_b)`` (``from_ragged``'s
    ``row_layout[b]``), or None: ``s_b <= sinks``, both within the row's
    every head, and its ``r_b`` newest slots of merge count 1 (the residual
    holds no counts). ``adopted``: the row's slots come from the store it
    was unpacked from (``RaggedPackedStore.adopt_rows``), which held them so;
    only the sizes must fit (``unpacked()`` gives a ``keep_rows`` layout's
    slots back in token order, merged ones last, not as they lie)."""
    s_b, r_b = (int(x) for x in kept)
    H = store.heads
    n = store._host_lengths[b * H : (b + 1) * H]
    if not 0 <= s_b <= sinks or r_b < 0 or s_b + r_b > int(n.min()):
        return (f"row_layout: row {b} keeps {s_b} sinks and {r_b} residual slots, more than it holds "
                f"({int(n.min())}) or sinks={sinks} allows")
    if r_b and store.counts is not None and not adopted:
        ends = (store.offsets + store.lengths)[b * H : (b + 1) * H]
        tail = store.counts[(ends - r_b)[:, None] + torch.arange(r_b, device=store.counts.device)]
        if bool((tail != 1).any()):
            return f"row_layout: row {b}'s {r_b} newest slots hold merged ones (the residual has no counts)"
    return None


def _kept_layout(store, b: int, kept, sinks: int) -> tuple[int, int]:
    """``from_ragged``'s ``row_layout[b]``, checked (:func:`layout_problem`;
    the row is adopted after, ``adopt_rows``)."""
    problem = layout_problem(store, b, kept, sinks, adopted=True)
    if problem is not None:
        raise ValueError(problem)
    return int(kept[0]), int(kept[1])


def _recent_kept_rows(store, residual: int) -> list[int]:
    """:func:`_recent_kept` of each batch row alone: at most ``residual`` and
    what each of its heads keeps, and only its heads' trailing slots of
    merge count 1 (a cumulative product from the newest back)."""
    B, H = store.batch, store.heads
    out = []
    for b in range(B):
        n = store._host_lengths[b * H : (b + 1) * H]
        r = min(residual, int(n.min())) if n.numel() else 0
        if r and store.counts is not None:
            dev = store.counts.device
            ends = (store.offsets + store.lengths)[b * H : (b + 1) * H]
            whole = store.counts[(ends - r)[:, None] + torch.arange(r, device=dev)] == 1
            r = int(torch.cumprod(whole.flip(1).to(torch.int64), 1).sum(1).min())
        out.append(r)
    return out


def _recent_kept(store, residual: int) -> int:
    """How many of each head's newest kept slots a packed layer can hold in
    its residual: at most ``residual`` and what every head keeps, and only
    slots with a merge count of 1 (the residual window holds no counts): the
    fewest any batch row takes alone."""
    return min(_recent_kept_rows(store, residual), default=0)
