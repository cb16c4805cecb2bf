"""What a layer decides at its first pack, and keeps: the choices of
``KIVI(rotate=..., feedback=..., clip_values=...)``.

A quantized layer packs its slots with three choices fixed once, when it
first packs, and kept through every later pack and re-pack: the rotation of
its keys (``rotate``; ``"auto"`` tests it on the newest queries), the
key-feedback weights (``feedback``, from the queries' second moment), and
whether its value groups take clipped ranges (``clip_values``; ``"auto"``
tests it, except behind an evictor). ``PackingChoices`` holds that state and
those decisions for ``cache.CompressedLayer``, which mixes it in and calls
them from ``_to_packed``, ``_settle`` and its re-compressions; everything
else about a layer (its store, its budgets, its rounds) stays in
``cache.py``. docs/design.md (the store protocol's ``PackedStore``)
describes each choice.
"""

from __future__ import annotations

import torch

from .stores import PackedStore, UniformStore
from .stores.feedback import QueryMoments, compact
from .stores.rotation import key_rotation, rotation_helps
from .stores.value_clip import value_clip_helps

# rotate="auto" and clip_values="auto" test on this many of the newest queries
_ROTATION_QUERIES = 32


class PackingChoices:
    """Mixin of :class:`kvcompress.cache.CompressedLayer`: the per-layer
    rotation, key-feedback and value-clipping choices (reads the layer's
    ``method``, ``store``, ``seen``, ``kv_start`` and ``_pad``)."""

    def _init_choices(self) -> None:
        """Every choice undecided (``CompressedLayer.__init__`` calls it)."""
        # KIVI(rotate=...): the rotation this layer's packed keys use, decided
        # at its first pack and kept through re-packs (None: unrotated)
        self._rotation: torch.Tensor | None = None
        self._rotation_decided = False
        # rotate="auto" with nothing packed yet: the newest queries so far,
        # [B, Hq, <= _ROTATION_QUERIES, D], for the decision at the first pack
        self._rot_q: torch.Tensor | None = None
        # KIVI(feedback=True): the queries' second moment until the first
        # pack, then the key-feedback weights every pack of the layer uses
        self._qmom: QueryMoments | None = None
        self._feedback: torch.Tensor | None = None
        self._feedback_decided = False
        # KIVI(clip_values=...): whether this layer's value groups take
        # clipped ranges, decided at its first pack and kept through
        # re-packs; "auto" holds the newest queries until then, as rotation
        # does, and reads the attention's output projection [hidden, Hq * Dv]
        # (set by kvcompress.compress; None: unweighted)
        self._clip = False
        self._clip_decided = False
        self._clip_q: torch.Tensor | None = None
        self.out_proj: torch.Tensor | None = None
        # row mode (PackedStore.rows_apart: a left-padded batch whose rows
        # pack on their own schedules): each row makes the three choices at
        # its own first pack, from its own queries and keys (_choose_rows);
        # per row None until then, then (rotated, clipped). Feedback=True
        # keeps each row's query moment from the first call on, so that a
        # row's weights are the ones it gets alone
        self._row_choices: list | None = None
        self._row_qmom: list[QueryMoments | None] | None = None
        # behind rounds with feedback=True: per row whether it packed part groups before it could
        # test the rotation (unrotated, without weights: _sync_row_choices) and takes its key-feedback
        # weights at its first round, as its layer alone fixes them then (_fix_feedback)
        self._weights_later: list[bool] | None = None

    def _key_rotation(self, packing, queries, scaling, defer: bool = False, hold: bool = True):
        """The rotation of this layer's packed keys (None: as they are),
        decided once, at the layer's first pack, and kept through re-packs.

        ``KIVI(rotate=True)`` always rotates. ``rotate="auto"`` rotates when
        that disturbs the attention of the newest queries (up to
        ``_ROTATION_QUERIES``: this call's and the held ones of earlier calls)
        over the keys about to be packed less
        (``stores.rotation.rotation_helps``). With nothing to pack yet and
        ``defer`` (a packed store that packs its residual later: a prompt
        shorter than ``residual + group``), the layer holds the queries and
        stays undecided (returns None), and ``_settle`` asks again before the
        store's first pack; otherwise, with no queries to test, it does not
        rotate. ``hold=False``: a deferred call does not hold ``queries``,
        because the ``_settle`` of the same update asks again with them (a
        new per-head packed store's, ``_to_packed``), so that they count
        once, not twice."""
        mode = self.method.rotates_keys
        if not mode or self._rotation_decided:
            return self._rotation
        store = self.store
        some = store.residual_keys() if isinstance(store, PackedStore) else \
            store.keys if isinstance(store, UniformStore) else store.k
        rot = key_rotation(int(some.shape[-1]), some.device)
        if mode == "auto":
            keys, _, start, counts = self._slots_to_pack(packing)
            if not keys.shape[2] and defer:
                if hold:
                    self._rotation_queries(queries)
                return None
            held = self._rotation_queries(queries)
            helps = False
            if held is not None and keys.shape[2] and store.batch:
                helps = rotation_helps(held, keys, rot, packing[0], packing[1],
                                       float(scaling if scaling is not None else keys.shape[-1] ** -0.5), start,
                                       counts)
            rot = rot if helps else None
        return self._decide_rotation(rot)

    def _decide_rotation(self, rot):
        """Fix the layer's rotation (None: unrotated) and drop the held queries."""
        self._rotation, self._rotation_decided, self._rot_q = rot, True, None
        return rot

    def _rotation_queries(self, queries):
        """The newest ``_ROTATION_QUERIES`` queries ``[B, Hq, <= W, D]`` of this
        call (``queries``, may be None) and of earlier calls, held until the
        rotation is decided; None while no call has passed queries."""
        self._rot_q = self._newest(self._rot_q, queries)
        return self._rot_q

    @staticmethod
    def _newest(held, queries):
        """``held`` ``[B, Hq, <= W, D]`` (or None) with this call's
        ``queries`` (may be None) appended, the newest ``_ROTATION_QUERIES`` kept."""
        if queries is None:
            return held
        queries = queries[:, :, -_ROTATION_QUERIES:]
        return queries if held is None else torch.cat([held, queries], 2)[:, :, -_ROTATION_QUERIES:]

    def _value_clip(self, packing, queries, scaling, defer: bool = False) -> bool:
        """Whether this layer's value groups take clipped ranges, decided
        once, at the layer's first pack, and kept through re-packs.

        ``KIVI(clip_values=True)`` always clips. ``"auto"`` clips when that
        carries less error into the residual stream for the newest queries
        (up to ``_ROTATION_QUERIES``) over the slots about to be packed
        (``stores.value_clip.value_clip_helps``, weighted by
        ``self.out_proj``). With nothing to pack yet and ``defer`` it holds
        the queries and stays undecided (returns False), as
        :meth:`_key_rotation` does; with no queries to test it does not
        clip. Behind a method that evicts or merges, ``"auto"`` does not
        clip: there the test's error over the kept slots falls when
        clipped, but KL to the full cache rose on both seeds, and deciding
        by the error against the full prompt's attention instead did not
        remove the loss (RESULTS, "Clipping behind an evictor")."""
        mode = self.method.value_clip
        if not mode or self._clip_decided:
            return self._clip
        if mode == "auto" and self.method.evicts:
            return self._decide_clip(False)
        if mode == "auto":
            # a layer with no evictor is uniform (or packed): no merge counts
            keys, values, start, _ = self._slots_to_pack(packing)
            held = self._clip_q = self._newest(self._clip_q, queries)
            if not keys.shape[2] and defer:
                return False
            helps = False
            if held is not None and keys.shape[2] and self.store.batch:
                helps = value_clip_helps(held, keys, values, packing[3], packing[1],
                                         float(scaling if scaling is not None else keys.shape[-1] ** -0.5),
                                         self.out_proj, start)
            return self._decide_clip(helps)
        return self._decide_clip(True)

    def _decide_clip(self, clip: bool) -> bool:
        """Fix whether the layer's values are clipped and drop the held queries."""
        self._clip, self._clip_decided, self._clip_q = bool(clip), True, None
        return self._clip

    def _slots_to_pack(self, packing):
        """``(keys [B, H, m, D], values [B, H, m, Dv], start, counts)``: the
        whole groups the layer's next pack takes (for a per-head layer, the
        newest ``m`` of every padded head), the padded slots in front of each
        head (int64 ``[B * H]``, or None; a per-head layer's sink block
        counts among them), and the slots' merge counts ``[B, H, m]`` (None
        for a uniform layer, which holds none): the attention that reads
        them adds ``log(count)`` to each slot's logit, so the rotation test
        weighs them so too (the clip test never runs behind an evictor)."""
        bits, group, residual, _ = packing
        store = self.store
        if isinstance(store, (PackedStore, UniformStore)):
            start = None if self.kv_start is None else self.kv_start.repeat_interleave(store.heads)
            if isinstance(store, PackedStore):
                # a packed store that has packed nothing yet: its residual's oldest groups
                if start is not None and store._sink_at is not None:
                    start = store.split_start(self.kv_start)[1].repeat_interleave(store.heads)
                m = store.pending()
                return store.residual_keys()[:, :, :m], store.residual_values()[:, :, :m], start, None
            m = max(0, int(store.n) - residual) // group * group
            return store.keys[:, :, :m], store.values[:, :, :m], start, None
        padded, padded_v, _, counts, _, start = store.to_padded()
        dense = padded.view(store.batch, store.heads, -1, padded.shape[-1])
        dense_v = padded_v.view(store.batch, store.heads, -1, padded_v.shape[-1])
        M = int(dense.shape[2])
        m = M // group * group  # the newest whole groups, right-aligned as to_padded gives them
        # a sink block (KIVI(sinks=...)) is never packed: its slots, each head's
        # first, are left out of the test as the padding before them is
        start = start + self.method.fp_sinks
        counts = counts.view(store.batch, store.heads, -1)[:, :, M - m :]
        return dense[:, :, M - m :], dense_v[:, :, M - m :], (start - (M - m)).clamp(min=0), counts

    def _gather_feedback(self, queries) -> None:
        """``KIVI(feedback=True)``: fold this call's queries ``[B, Hq, q,
        D]`` (the newest ``q`` of every row) into the layer's query moment
        until the key-feedback weights are fixed; a left-padded row's padded
        positions are left out."""
        if not self.method.key_feedback or self._feedback_decided or queries is None or not self.store.batch:
            return
        if self._row_choices is not None and None not in self._row_choices and not any(self._weights_later or ()):
            return  # row mode, every row decided
        q = int(queries.shape[2])
        hidden = [max(0, p - (self.seen - q)) for p in self._pad] if self._pad else None
        if self._row_choices is None:
            if self._qmom is None:
                self._qmom = QueryMoments(self.store.heads)
            self._qmom.add(queries, hidden)
        B = int(queries.shape[0])
        if B > 1:
            # a batch may pack its rows apart (row mode): each row's own
            # moment too, over its real queries only, shaped as they are alone
            if self._row_qmom is None:
                self._row_qmom = [QueryMoments(self.store.heads) for _ in range(B)]
            for b in range(B):
                h = hidden[b] if hidden else 0
                if self._row_qmom[b] is not None and h < q:
                    self._row_qmom[b].add(queries[b : b + 1, :, h:])

    def _fix_feedback(self):
        """The layer's key-feedback weights (``stores.feedback.compact``'s
        bfloat16 triangle; None: pack without feedback), fixed at the first
        call that packs and kept for every later pack and re-pack. Before a
        ``rotate="auto"`` layer has chosen its basis, or while it has seen
        no query, it gives None and stays undecided."""
        if not self.method.key_feedback or self._feedback_decided:
            return self._feedback
        if (self.method.rotates_keys and not self._rotation_decided) or self._qmom is None:
            return None
        w = self._qmom.weights(self._rotation)
        self._feedback = None if w is None else compact(w)
        self._feedback_decided, self._qmom, self._row_qmom = True, None, None
        return self._feedback

    def _choose_rows(self, queries, scaling) -> None:
        """Row mode (the layer's packed store packs each row of a
        left-padded batch on its own schedule): each row due to pack for the
        first time makes the layer's choices for itself, from its own real
        queries (held as :meth:`_key_rotation` and :meth:`_value_clip` hold
        them) and the keys and values it is about to pack, and from the
        second moment of its own queries, as it makes them alone; the store
        packs it so (``PackedStore.set_row_choice``). Rows not due yet keep
        holding their queries."""
        store, method = self.store, self.method
        if self._row_choices is None:
            self._row_choices = [None] * store.batch
            self._qmom = None  # the batch's moment serves no row
        elif None not in self._row_choices:
            return
        rot_auto = method.rotates_keys == "auto"
        clip_auto = method.value_clip == "auto"
        if rot_auto:
            self._rot_q = self._newest(self._rot_q, queries)
        if clip_auto:
            self._clip_q = self._newest(self._clip_q, queries)
        bits, group, _, value_bits = self._packing()
        for b, due in enumerate(store.row_dues()):
            if not due or self._row_choices[b] is not None:
                continue
            keys, values = store.row_pending(b)
            s = float(scaling if scaling is not None else keys.shape[-1] ** -0.5)
            rot = self._row_rotation(b, keys, bits, group, s)
            # behind an evictor "auto" does not clip (see _value_clip)
            clip = bool(method.value_clip) and not (clip_auto and method.evicts)
            if clip and clip_auto:
                held = self._row_queries(self._clip_q, b)
                clip = held is not None and value_clip_helps(held, keys, values, value_bits, group, s,
                                                             self.out_proj)
            tri = self._row_weights(b, rot)
            if self._row_qmom is not None:
                self._row_qmom[b] = None
            self._row_choices[b] = (rot is not None, clip)
            store.set_row_choice(b, rot, tri, clip)
        if all(c is not None for c in self._row_choices):
            self._rot_q = self._clip_q = None
            later = self._weights_later or [False] * store.batch
            self._row_qmom = None if self._row_qmom is None or not any(later) else \
                [q if w else None for q, w in zip(self._row_qmom, later)]

    def _row_queries(self, held, b: int):
        """Row ``b``'s real queries ``[1, Hq, <= W, D]`` among the batch's
        held newest ``held`` ``[B, Hq, W, D]`` (its padding is their front:
        the row has seen ``seen`` minus its padding real queries); None if none."""
        if held is None:
            return None
        k = min(int(held.shape[2]), self.seen - (self._pad[b] if self._pad else 0))
        return held[b : b + 1, :, held.shape[2] - k :] if k > 0 else None

    def _row_rotation(self, b: int, keys, bits: int, group: int, scaling: float, start=None, counts=None):
        """Row ``b``'s key rotation (None: unrotated), as it chooses alone:
        ``rotate=True``'s, or ``"auto"``'s test (``rotation_helps``) on the
        row's own real held queries over ``keys`` ``[1, H, m, D]`` (no whole
        group to test: unrotated), ``start`` and ``counts`` as that test
        takes them."""
        mode = self.method.rotates_keys
        if not mode:
            return None
        rot = key_rotation(int(keys.shape[-1]), keys.device)
        if mode == "auto":
            held = self._row_queries(self._rot_q, b)
            if not keys.shape[2] or held is None or not rotation_helps(held, keys, rot, bits, group, scaling,
                                                                       start, counts):
                return None
        return rot

    def _hold_choice_queries(self, queries) -> None:
        """A layer that will pack but does not yet (a sliding layer whose
        window keeps too few slots): this call's queries join the ones its
        first pack decides on, ``rotate="auto"``'s and ``clip_values="auto"``'s
        newest and ``feedback``'s moment, as they do on a layer packed from
        the prompt on (a left-padded batch's row mode, where another row
        packs already, holds them too)."""
        if queries is None:
            return
        self._gather_feedback(queries)
        if self.method.rotates_keys == "auto" and not self._rotation_decided:
            self._rot_q = self._newest(self._rot_q, queries)
        if self.method.value_clip == "auto" and not self._clip_decided:
            self._clip_q = self._newest(self._clip_q, queries)

    def _split_rotations(self, view, compressed: list[bool]):
        """Mixed precision in a batch (``CompressedLayer._demote``) with
        ``rotate="auto"``: ``(rotation or None, rotated per row)``. Each row
        the evictor compressed tests the rotation as it does alone
        (:meth:`_key_rotation` over its layer's first whole groups): on its
        own real held queries over the whole groups of its own real slots.
        A row left whole packs nothing and does not rotate."""
        bits, group, residual, _ = self.method.packing
        self._rot_q = self._newest(self._rot_q, view.queries)
        keys = view.keys
        s = float(view.scaling if view.scaling is not None else keys.shape[-1] ** -0.5)
        n, rotated = int(keys.shape[2]), []
        for b, c in enumerate(compressed):
            start = self._start[b]
            m = max(0, n - start - residual) // group * group
            rot = self._row_rotation(b, keys[b : b + 1, :, start : start + m], bits, group, s) if c else None
            rotated.append(rot is not None)
        rot = key_rotation(int(keys.shape[-1]), keys.device) if any(rotated) else None
        return self._decide_rotation(rot), rotated

    def _row_weights(self, b: int, rotation):
        """Row ``b``'s key-feedback triangle (``compact``) from its own query
        moment, in the basis of ``rotation``; None without feedback or queries."""
        if not self.method.key_feedback or self._row_qmom is None or self._row_qmom[b] is None:
            return None
        w = self._row_qmom[b].weights(rotation)
        return None if w is None else compact(w)

    def _sync_row_choices(self, rows: list) -> list:
        """``rows`` (``_choose_ragged_rows``' per-row choices) with the rows
        the new per-head store decided for itself (a row left to choose
        later that packed part groups: unrotated, without weights) as it
        decided them; the layer's ``_row_choices`` follow. Behind rounds
        with ``feedback=True`` such a row takes its weights at its first
        round (``_weights_later``, :meth:`_round_choices`), as its layer
        alone, which decided the rotation then but not the weights."""
        store = self.store
        if store._choices is None:
            return rows
        out = list(rows)
        for b, (c, made) in enumerate(zip(rows, store._choices)):
            if c is None and made is not None:
                out[b] = (None, None)
                if self._row_choices is not None:
                    self._row_choices[b] = (False, self._clip)
                if self.method.key_feedback and self._rebudget:
                    # alone its layer decided the rotation (nothing to test) but not the weights,
                    # which it fixes at its first round, from every query until then
                    if self._weights_later is None:
                        self._weights_later = [False] * store.batch
                    self._weights_later[b] = True
        return out

    def _round_choices(self, packing, queries, scaling, whole) -> list:
        """``_ragged_choices`` for a round of a layer whose rows chose apart,
        where a row kept whole never packed (so never chose) and is
        compressed now: it chooses here, on its kept slots and its own held
        queries and query moment (``_choose_ragged_rows`` for it alone), as
        its layer alone decides at its first round what no pack decided
        before. Rows still whole (``whole``) keep waiting for their first
        pack, and so does a row that has not chosen (no whole group to test
        yet) where this round leaves it as it was (``_round_rows``: alone
        its layer has no round now); the others keep their choices. A row
        of ``_weights_later`` that this round touches takes its key-feedback
        weights now, from its own query moment, unrotated."""
        due = self._round_rows
        later = self._weights_later
        if later is not None:
            # a row that packed part groups unrotated takes its weights at its first round, as alone
            out = list(self._ragged_choices)
            for b, w in enumerate(later):
                if w and (due is None or bool(due[b])):
                    out[b] = (None, self._row_weights(b, None))
                    later[b] = False
                    if self._row_qmom is not None:
                        self._row_qmom[b] = None
            self._ragged_choices = out
            if not any(later):
                self._weights_later = None
        need = [c is None and not (whole and whole[b]) and (due is None or bool(due[b]))
                for b, c in enumerate(self._ragged_choices)]
        if not any(need):
            return self._ragged_choices
        before = self._row_choices
        rows = self._choose_ragged_rows(packing, queries, scaling, defer=[not n for n in need])
        if before is not None:
            self._row_choices = [c if n else p for p, c, n in zip(before, self._row_choices, need)]
        return [r if n else c for c, r, n in zip(self._ragged_choices, rows, need)]

    def _choose_ragged_rows(self, packing, queries, scaling, defer=None) -> list:
        """A per-head layer about to be packed once (``_ragged_rows_apart``):
        per row ``(rotation or None, feedback triangle or None)``, what the
        row chooses alone. Its rotation test (``rotate="auto"``) runs on its
        own real held queries and its own heads' newest whole groups, as
        :meth:`_slots_to_pack` gives them for the row alone (its longest
        head sets how many); its weights come from its own query moment
        (``_row_qmom``) in its basis. Under ``"auto"`` a row with no whole
        group to test is None instead, as its layer alone stays undecided:
        it chooses at its first pack (:meth:`_choose_rows`; behind rounds,
        or at its first round), unless the new store packs part groups of
        it now, which it packs unrotated and without weights, as alone
        (:meth:`_sync_row_choices`).
        ``defer`` (per row, or None): rows kept whole, which pack later as a
        uniform layer alone does and choose then (:meth:`_choose_rows`):
        None for them, and they keep holding their queries and moments.
        The layer's own choices are then fixed, and serve no row."""
        method, store = self.method, self.store
        bits, G = packing[0], packing[1]
        B, H = store.batch, store.heads
        rot_auto = method.rotates_keys == "auto"
        held = self._rot_q
        if rot_auto:
            self._rot_q = self._newest(self._rot_q, queries)
        padded, _, _, counts, _, start = store.to_padded()
        D = int(padded.shape[-1])
        dense = padded.view(B, H, -1, D)
        M = int(dense.shape[2])
        counts = counts.view(B, H, -1)
        s = float(scaling if scaling is not None else D ** -0.5)
        rows = []
        for b in range(B):
            if defer is not None and defer[b]:
                rows.append(None)
                continue
            lead = start[b * H : (b + 1) * H]
            m = (M - int(lead.min())) // G * G if H else 0  # the row's longest head, in whole groups
            first = (lead + method.fp_sinks - (M - m)).clamp(min=0)
            if rot_auto and not m:
                # nothing to test: alone its layer stays undecided and tests at its first pack (or
                # round), so the row chooses then (_choose_rows); if it packs part groups now,
                # unrotated and without weights (RaggedPackedStore.from_ragged, read back by
                # _sync_row_choices)
                rows.append(None)
                continue
            rot = self._row_rotation(b, dense[b : b + 1, :, M - m :], bits, G, s, first, counts[b : b + 1, :, M - m :])
            rows.append((rot, self._row_weights(b, rot)))
        self._row_choices = [None if c is None else (c[0] is not None, self._clip) for c in rows]  # clipping is the layer's
        self._decide_rotation(None)
        self._feedback, self._qmom = None, None
        if None in rows:
            # the settle that follows (_choose_rows) holds this call's queries, once
            self._rot_q = held
            if self._row_qmom is not None:
                self._row_qmom = [q if c is None else None for q, c in zip(self._row_qmom, rows)]
        else:
            self._feedback_decided, self._row_qmom = True, None
        return rows

