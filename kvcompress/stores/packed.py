"""Packed storage: KIVI-style low-bit keys and values plus a full-precision
residual window (layout: ``docs/packed.md``).

The oldest slots of every head are packed, keys per channel in groups of
``group`` tokens and values per token in groups of ``group`` channels; the
newest slots stay in full precision in a residual window. ``settle()`` packs
whole groups once the residual holds ``residual + group`` slots, so it always
keeps between ``residual`` and ``residual + group - 1`` slots (a prefill packs
everything but its last ``residual`` tokens rounded to whole groups, never
the whole prompt). Attention reads the packed bits directly
(``ops.packed_attention``); nothing dequantizes the layer.
"""

from __future__ import annotations

import math

import torch

from .. import ops
from .base import AttentionSpec, LayerStore
from .feedback import expand
from .masked import build_mask, masked_attention
from .rotation import rotate, rotate_queries, unrotate


def kernel_reads(query, residual) -> bool:
    """Whether ``ops.packed_attention`` runs for this query and residual
    (CPU, or CUDA in a CUDA build; the kernel's dtypes)."""
    dev = query.device.type
    return ((dev == "cpu" or (dev == "cuda" and bool(ops._C.has_cuda))) and query.dtype in _KERNEL_DTYPES
            and residual.dtype == query.dtype)


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Most residual rows a packed store allocates ahead of the tokens that fill
#: them (the usual residual + group, 160 rows, is far below it)
RESIDUAL_ROOM = 1024


class PackedStore(LayerStore):
    """``[B, H, n_packed]`` packed slots followed by ``[B, H, r, D]`` residual
    slots, every head the same length. In row mode (``rows_apart``, a
    left-padded batch: see :meth:`settle`) each row holds its own packed
    count and residual start within those buffers, and the logical length
    ``n`` (padding included) stays the same for every row.

    Parameters
    ----------
    bits : int
        2, 4 or 8 bits per key element (and per value element without
        ``value_bits``).
    group : int
        Tokens per key group and channels per value group.
    residual : int
        Slots kept in full precision (at least; see the module docstring).
    value_bits : int, optional
        2, 4 or 8 bits per value element; default ``bits``.

    With ``rotation`` (a ``[D, D]`` orthogonal float32 matrix, set by
    ``from_uniform``) the packed keys are those of ``k @ rotation`` and the
    packed part is read with ``q @ rotation``; the residual holds the keys as
    they came (see ``kvcompress/stores/rotation.py``).
    """

    kind = "packed"

    def __init__(self, bits: int, group: int, residual: int, value_bits: int | None = None):
        self.bits, self.group, self.residual = bits, group, residual
        self.value_bits = bits if value_bits is None else int(value_bits)
        self.n_packed = 0  # packed slots per head, a multiple of group
        self.r = 0  # residual slots per head
        self.first_position = 0
        self._kc = self._kmin = self._ksc = None  # codes [B,H,cap,Db] u8; [B,H,cap/G,D] f32
        self._vc = self._vmin = self._vsc = None  # codes [B,H,cap,Db] u8; [B,H,cap,ceil(D/G)] f32
        self._rk = self._rv = None  # residual [B,H,rcap,D]
        #: False for mixed precision (LowBits/MiKV/ZipCache): the residual holds the
        #: selected slots (or, with high_bits, the tokens after them) and is never packed
        self.pack_decoded = True
        #: mixed precision with high_bits: the selected slots packed at high_bits,
        #: between the low-bit part and the residual (read on their own, joined by lse)
        self.high_bits = None
        self.n_high = 0
        self._hi = None  # (key codes, mins, scales, value codes, mins, scales), the low part's layout
        #: a sliding-window layer's first token position that queries may see
        #: (None: every slot): the layer keeps its most recent slots, and the
        #: slots before this one that share a key group with kept ones stay
        #: packed but are masked as leading slots (see drop_unseen)
        self.visible_from = None
        #: row mode on a sliding-window layer: per row whether a row that has
        #: packed nothing may pack, as its layer alone stays unpacked until
        #: it keeps more than ``residual + group`` slots (its target's
        #: ``min(window - 1, target)``, ``CompressedLayer._packs_window``,
        #: which under ``ratio=`` may be one more than it holds yet); set by
        #: the layer before each settle; None: no such wait
        self.first_pack_rows: list[bool] | None = None
        #: per-slot columns ``name -> [B, H, cap]`` by logical slot (positions
        #: and the evictor's slot state), kept only when the layer re-selects
        #: its slots while decoding (``from_uniform(..., columns=True)``)
        self._cols: dict | None = None
        #: ``[D, D]`` float32 orthogonal matrix the packed keys were rotated by
        #: before packing (``KIVI(rotate=True)``), or None
        self.rotation: torch.Tensor | None = None
        #: key-feedback weights packs round keys with (``KIVI(feedback=True)``):
        #: ``stores.feedback.compact``'s bfloat16 triangle ``[H, D (D - 1) / 2]``,
        #: expanded for each ``ops.pack_keys(feedback=...)`` call; or None
        self.feedback: torch.Tensor | None = None
        #: whether value groups are packed over clipped ranges
        #: (``KIVI(clip_values=...)``, ``ops.pack_values(clip=True)``)
        self.value_clip = False
        #: ``KIVI(sinks=S)``: the first S logical slots of every head stay in
        #: full precision, never packed (see take_sinks). Once taken they are
        #: the first ``_r0`` slots of the residual's buffers, the residual
        #: after them; ``_sink_at``: per row, the logical slot the block
        #: starts at; ``_sinks_in_call``: whether every row's padding lies in
        #: the packed part, so that one kernel call reads packed part, block
        #: and residual with the padding still a prefix
        self.sinks = 0
        self._r0 = 0
        self._sink_at: list[int] | None = None
        self._sinks_in_call = False
        #: whether a left-padded batch may pack each row on its own schedule
        #: (set by the layer where nothing else makes a row's codes depend on
        #: the other rows, see settle). Once it does ("row mode"), per row:
        #: ``_np`` its packed slots (a multiple of group, from its first real
        #: token), ``_rs`` the residual row its residual starts at (the rows
        #: before it are masked), ``_pads`` the padded logical slots in front
        #: of its packed part (with a sink block: of what follows the block)
        self.rows_apart = False
        self._np: list[int] | None = None
        #: row mode of mixed precision with high_bits (from_split_rows): per
        #: row its slots in the high part, from its first one; else None
        self._nh: list[int] | None = None
        self._rs: list[int] | None = None
        self._pads: list[int] | None = None
        #: row mode's kernel arguments, built once per change of _np / _rs
        #: (and of the packed buffers' capacity or device)
        self._row_args = None
        self._hi_args = None  # the high part's, as _row_args (_attend_high_rows)
        #: per row, the padded slots at the front of its sink block (a row
        #: with fewer real tokens than sinks when the block was taken); in
        #: row mode such a row takes that many of its oldest residual slots
        #: into the block just before its own first pack, as alone it takes
        #: its sinks then (:meth:`_fill_blocks`); None while no row's block
        #: holds padding, so that one kernel call can read the block
        self._block_pad: list[int] | None = None
        #: row mode's per-row choices (set by the layer, :meth:`set_row_choice`,
        #: each row's at its own first pack): per row None (undecided, nothing
        #: packed) or ``(rotated, feedback triangle or None, clipped)``; None
        #: while the store's ``rotation``, ``feedback`` and ``value_clip``
        #: serve every row
        self._choices: list | None = None
        self._rot_mask = None  # _rotated_rows' mask, built once per change of _choices

    def __repr__(self) -> str:
        high = f", high_bits={self.high_bits}, high={self.n_high}" if self.high_bits else ""
        vb = f", value_bits={self.value_bits}" if self.value_bits != self.bits else ""
        seen = ""
        if self.visible_from is not None:  # a sliding-window layer: the positions it holds, those queries see
            seen = (f", positions={self.first_position}..{self.first_position + self.n - 1}"
                    f", visible_from={self.visible_from}")
        vb += self._choices_repr(("rotated keys", "key feedback", "clipped values"))
        if self.sinks:
            vb += f", sinks={self.sinks}" + ("" if self._r0 else " (not taken yet)")
        packed, full = self.n_packed, self.r
        if self._np is not None:  # row mode: each row's own counts
            packed, full = self._np, [self.r - s for s in self._rs]
            if self._nh is not None and self.high_bits:
                high = f", high_bits={self.high_bits}, high={self._nh}"
        return (f"PackedStore(bits={self.bits}{vb}, group={self.group}, residual={self.residual}, "
                f"batch={self.batch}, heads={self.heads}, packed={packed}{high}, full_precision={full}{seen})")

    @classmethod
    def from_split(cls, keys, values, full_idx, low_idx, bits: int, group: int,
                   high_bits: int | None = None, value_bits: int | None = None,
                   rotation: torch.Tensor | None = None) -> "PackedStore":
        """Mixed precision: slots ``low_idx`` ``[B, H, m]`` of ``keys``/``values``
        ``[B, H, n, D]`` packed at ``bits`` (``m`` need not be a multiple of
        ``group``), slots ``full_idx`` ``[B, H, K]`` kept as the full-precision
        residual, or with ``high_bits`` packed at that width (the residual then
        starts empty and takes the generated tokens); nothing is packed later
        (``pack_decoded`` is False). The logical order, which ``kv_start``
        counts, is low part, high part, residual. ``value_bits`` is the low
        part's value width (default ``bits``); the high part packs both
        halves at ``high_bits``. ``rotation``: both packed parts' keys are
        packed as ``k @ rotation`` (see the class)."""
        new = cls(bits, group, 0, value_bits)
        new.rotation = rotation
        new.pack_decoded = False
        if high_bits is None:
            new._rk, new._rv = ops.gather(keys, values, full_idx)
            new.r = int(full_idx.shape[2])
        else:
            new.high_bits = int(high_bits)
            B, H, _, D = (int(x) for x in keys.shape)
            new._rk = keys.new_empty((B, H, 16, D))
            new._rv = values.new_empty((B, H, 16, int(values.shape[3])))
            new.n_high = int(full_idx.shape[2])
            if new.n_high:
                hk, hv = ops.gather(keys, values, full_idx)
                new._hi = (*ops.pack_keys(new._codes_keys(hk), new.high_bits, group),
                           *ops.pack_values(hv, new.high_bits, group))
        m = int(low_idx.shape[2])
        if m:
            lk, lv = ops.gather(keys, values, low_idx)
            new._kc, new._kmin, new._ksc = ops.pack_keys(new._codes_keys(lk), bits, group)
            new._vc, new._vmin, new._vsc = ops.pack_values(lv, new.value_bits, group)
            new.n_packed = m
        return new

    @classmethod
    def from_split_rows(cls, keys, values, full: list, low: list, packs_full: list[bool], bits: int, group: int,
                        high_bits: int | None = None, value_bits: int | None = None,
                        rotation: torch.Tensor | None = None, rotated: list[bool] | None = None) -> "PackedStore":
        """Mixed precision in a batch, each row as it is split alone (row
        mode): row ``b``'s slots ``low[b]`` ``[H, m_b]`` (None: none) packed
        at ``bits`` from its own first low slot, its slots ``full[b]``
        ``[H, k_b]`` packed at ``high_bits`` where ``packs_full[b]`` (a row
        the evictor compressed, with ``high_bits`` set), else kept in full
        precision as the newest slots of the shared residual, after residual
        rows the row does not see (``_rs``). Per row ``_np`` (low slots,
        any count: a row's last key group may be short, as alone), ``_nh``
        (high slots) and ``_pads`` (the logical slots in front of its packed
        part that its layer's ``kv_start`` masks; none is stored), so that
        every row holds the groups and slots it holds alone (:meth:`from_split`),
        whatever the other rows select or how long they are. Nothing is
        packed later (``pack_decoded`` False). ``rotated`` (per row, with
        ``rotation``): the rows whose keys, both parts', are packed as ``k @
        rotation`` (``rotate="auto"`` chosen per row); None: every row's
        where ``rotation`` is set."""
        B, H, _, D = (int(x) for x in keys.shape)
        for name, rows in (("full", full), ("low", low), ("packs_full", packs_full), ("rotated", rotated)):
            if rows is not None and len(rows) != B:
                raise ValueError(f"PackedStore.from_split_rows: {name}: one entry per row of the batch ({B}), "
                                 f"got {len(rows)}")
        new = cls(bits, group, 0, value_bits)
        new.rotation = rotation
        new.pack_decoded = False
        if rotation is not None and rotated is not None:
            new._choices = [(bool(f), None, False) for f in rotated]
        G = int(group)
        hb = None if high_bits is None else int(high_bits)
        new.high_bits = hb
        np_, nh, vis = [], [], []
        for b in range(B):
            m = 0 if low[b] is None else int(low[b].shape[1])
            k = 0 if full[b] is None else int(full[b].shape[1])
            high = hb is not None and packs_full[b]
            np_.append(m)
            nh.append(k if high else 0)
            vis.append(0 if high else k)
        R = max(vis)
        # the residual's rows a row does not see come first: its own slots end where every row's do
        new._rk = keys.new_zeros((B, H, max(R, 16), D))
        new._rv = values.new_zeros((B, H, max(R, 16), int(values.shape[3])))
        new.r = R
        new._np, new._nh, new._rs = np_, (nh if hb is not None else None), [R - v for v in vis]
        total = max(m + h + v for m, h, v in zip(np_, nh, vis))
        new._pads = [total - (m + h + v) for m, h, v in zip(np_, nh, vis)]
        new.n_packed, new.n_high = max(np_), max(nh)
        new._reserve(new.n_packed)
        if new.n_high:
            cap = (new.n_high + G - 1) // G * G
            new._hi = _zero_part(B, H, cap, D, int(values.shape[3]), hb, hb, G, keys.device)
        for b in range(B):
            row = slice(b, b + 1)
            turn = rotation is not None and (rotated is None or rotated[b])
            codes_keys = (lambda k: rotate(k, rotation, torch.float32)) if turn else (lambda k: k)  # noqa: E731
            if np_[b]:
                lk, lv = ops.gather(keys[row], values[row], low[b][None])
                _write_part((new._kc, new._kmin, new._ksc, new._vc, new._vmin, new._vsc), b,
                            (*ops.pack_keys(codes_keys(lk), bits, G),
                             *ops.pack_values(lv, new.value_bits, G)))
            if nh[b] or vis[b]:
                fk, fv = ops.gather(keys[row], values[row], full[b][None])
                if nh[b]:
                    _write_part(new._hi, b, (*ops.pack_keys(codes_keys(fk), hb, G),
                                             *ops.pack_values(fv, hb, G)))
                else:
                    new._rk[b, :, R - vis[b] : R] = fk[0]
                    new._rv[b, :, R - vis[b] : R] = fv[0]
        return new

    @classmethod
    def from_uniform(cls, store, bits: int, group: int, residual: int,
                     value_bits: int | None = None, columns: bool = False,
                     rotation: torch.Tensor | None = None, sinks: int = 0,
                     value_clip: bool = False) -> "PackedStore":
        """Take over a uniform store's slots as the residual (no copy; call
        :meth:`settle` to pack). ``columns``: keep the store's per-slot
        columns too, so that :meth:`unpacked` can give them back.
        ``rotation``: pack keys as ``k @ rotation`` (see the class).
        ``sinks``: keep the first ``sinks`` slots of every head in full
        precision (:meth:`take_sinks`; not on sliding-window layers).
        ``value_clip``: pack value groups over clipped ranges."""
        new = cls(bits, group, residual, value_bits)
        new.rotation = rotation
        new.value_clip = bool(value_clip)
        new.sinks = int(sinks)
        if store.batch:
            new._rk, new._rv = store.keys, store.values
            new.r = int(store.n)
            new.first_position = int(store.column("positions")[0, 0, 0]) if store.n else 0
            if columns:
                new._cols = {name: t.clone() for name, t in store.columns.items()}
        return new

    def unpacked(self):
        """A :class:`~kvcompress.stores.UniformStore` of every slot in
        full precision (the dequantized packed part, then the residual) with
        the per-slot columns: what a decode-time re-selection reads. Needs
        ``from_uniform(..., columns=True)``."""
        from .uniform import UniformStore

        if self._cols is None:
            raise RuntimeError("PackedStore.unpacked: the store keeps no per-slot columns")
        keys, values = self.dequantized()
        return UniformStore.from_parts(keys.contiguous(), values.contiguous(),
                                       {name: t[:, :, : self.n] for name, t in self._cols.items()})

    # ------------------------------------------------------------ geometry
    @property
    def batch(self) -> int:
        return 0 if self._rk is None else int(self._rk.shape[0])

    @property
    def heads(self) -> int:
        return 0 if self._rk is None else int(self._rk.shape[1])

    @property
    def n(self) -> int:
        if self._np is not None:
            # row mode: every row's padding, sink block, packed and residual slots add up alike
            high = self._nh[0] if self._nh is not None else 0
            return self._pads[0] + self._r0 + self._np[0] + high + self.r - self._rs[0]
        return self.n_packed + self.n_high + self.r + self.n_sinks

    @property
    def n_sinks(self) -> int:
        """Slots per head in the full-precision sink block (0 until taken)."""
        return self._r0

    def max_length(self) -> int:
        return self.n

    @property
    def widths(self) -> tuple[int, int, int]:
        """``(D, Dv, bytes per element)`` of the layer's full-precision keys and values."""
        return int(self._rk.shape[3]), int(self._rv.shape[3]), self._rk.element_size()

    def head_lengths(self) -> list[int]:
        return [self.n] * (self.batch * self.heads)

    @property
    def capacity(self) -> int:
        """Slots per head the buffers hold room for: packed rows (low and
        high bits) and full-precision rows (sinks and residual), as
        ``LayerStats.capacity`` reports allocated slots."""
        rows = sum(int(t.shape[2]) for t in (self._kc, self._hi[0] if self._hi else None, self._rk)
                   if t is not None)
        return max(self.n, rows)

    def tensors(self) -> list:
        rows = [c[1] for c in self._choices or () if c is not None]  # each row's feedback triangle
        # the kernel's per-head rows and holes, built once per shape (_row_args, _hi_args)
        args = [t for t in (*(self._row_args or ()), *(self._hi_args or ())) if isinstance(t, torch.Tensor)]
        return [t for t in (self._kc, self._kmin, self._ksc, self._vc, self._vmin, self._vsc, self._rk, self._rv,
                            *(self._hi or ()), *(self._cols or {}).values(), self.rotation, self.feedback, *rows,
                            *args)
                if t is not None]

    # ------------------------------------------------------------- writing
    def append(self, keys, values, first_position: int) -> None:
        B, H, q, D = (int(x) for x in keys.shape)
        if self._rk is None:
            self.first_position = first_position
            # room for the residual to fill before its first pack, but not
            # ahead of need for a residual or group longer than any run:
            # past RESIDUAL_ROOM the buffer grows as tokens come
            rows = max(q, min(self.residual + self.group, q + RESIDUAL_ROOM))
            self._rk = keys.new_empty((B, H, rows, D))
            self._rv = values.new_empty((B, H, rows, int(values.shape[3])))  # values may be wider (MiMo)
        elif B != self.batch or H != self.heads:
            raise ValueError(f"key_states: expected batch {self.batch} and {self.heads} kv heads as earlier "
                             f"updates of this layer, got {tuple(keys.shape)}")
        end = self._r0 + self.r  # the sink block, if any, then the residual
        if end + q > self._rk.shape[2]:
            # geometric growth: a residual that is never packed (mixed precision) grows every step
            extra = max(q, self.r // 2, 16)
            grow = lambda t: torch.cat([t[:, :, :end], t.new_empty((B, H, extra, t.shape[3]))], 2)  # noqa: E731
            self._rk, self._rv = grow(self._rk), grow(self._rv)
        self._rk[:, :, end : end + q] = keys
        self._rv[:, :, end : end + q] = values
        if self._cols is not None:
            self._append_columns(q, first_position)
        self.r += q

    def _append_columns(self, q: int, first_position: int) -> None:
        """Columns of ``q`` appended slots: their positions, zero state
        (buffers grow by half, so a generation reallocates them O(log n) times)."""
        n = self.n
        cap = int(self._cols["positions"].shape[2])
        if n + q > cap:
            cap = n + q + max(16, n // 2)
            self._cols = {name: torch.cat([t[:, :, :n], t.new_zeros(t.shape[:2] + (cap - n,))], 2)
                          for name, t in self._cols.items()}
        for name, t in self._cols.items():
            if name == "positions":
                t[:, :, n : n + q] = torch.arange(first_position, first_position + q, dtype=t.dtype,
                                                  device=t.device)
            else:
                t[:, :, n : n + q] = 0

    def settle(self, pad=None) -> None:
        """Pack whole groups of the oldest residual slots while more than
        ``residual + group - 1`` are held (call after the layer's attention).

        ``pad`` (host ints, one per row) are leading padded slots: before the
        first pack they take the row's first real slot, so padding never
        widens a group's range (it stays masked in attention). With
        ``rows_apart`` a padded batch instead enters row mode at its first
        pack (:meth:`_settle_rows`): each row's groups start at its first
        real token and it packs when its own residual fills.
        """
        self.take_sinks(pad)
        if self.start_rows(pad):
            self._settle_rows()
            return
        m = self.pending()
        if m <= 0:
            return
        if pad is not None and not self.n_packed:
            if self._sink_at is not None:
                # the padding of the rest, which is packed
                pad = self.split_start(torch.tensor(pad, dtype=torch.int64))[1].tolist()
            o = self._r0
            for b, p in enumerate(pad):
                if 0 < p < self.r:
                    self._rk[b, :, o : o + p] = self._rk[b, :, o + p : o + p + 1]
                    self._rv[b, :, o : o + p] = self._rv[b, :, o + p : o + p + 1]
        self._pack_oldest(m)
        self._drop_oldest(m)

    def start_rows(self, pad, unpadded: bool = False) -> bool:
        """Enter row mode if this settle is its first pack (:meth:`_rows_due`;
        after :meth:`take_sinks`); whether the store is in row mode. The
        layer calls it before :meth:`settle` to make each row's choices at
        the row's own first pack (:meth:`set_row_choice`), and then with
        ``unpadded`` also for a batch of more than one row without padding
        (whose rows pack alike, but choose apart)."""
        if unpadded and self.batch > 1 and (pad is None or not len(pad)):
            pad = [0] * self.batch
        if self._np is None and self._rows_due(pad, unpadded):
            # nothing packed yet; each row's real tokens (after its sink
            # block, if taken) start at its padding
            start = self._sink_at if self._r0 else pad
            self._pads = [min(int(p), self.r) for p in start]
            self._np, self._rs = [0] * self.batch, list(self._pads)
        return self._np is not None

    def _rows_due(self, pad, unpadded: bool = False) -> bool:
        """Whether this settle starts row mode: the layer allows it
        (``rows_apart``), some row is padded (or ``unpadded`` and the batch
        has more than one row), nothing is packed yet and this settle packs
        (until then no row would pack either way)."""
        padded = pad is not None and (any(int(p) for p in pad) or (unpadded and self.batch > 1))
        return bool(self.rows_apart and padded and self.pack_decoded
                    and self._rk is not None and not self.n_packed and (self._r0 or not self.sinks)
                    and self._hi is None and self.pending() > 0)

    def _settle_rows(self) -> None:
        """Row mode's settle: each row packs the whole groups of its own
        residual past ``residual + group - 1`` slots, from its first real
        token, so its key groups hold the tokens they hold when the row runs
        alone and it packs at the same steps; then the residual rows that
        every row has packed (or that are padding) leave the buffers."""
        due = self.row_dues()
        if not any(due):
            return
        self._fill_blocks(due)
        self._reserve(max(p + m for p, m in zip(self._np, due)))
        for b, m in enumerate(due):
            if m:
                self._pack(slice(b, b + 1), self._rs[b], self._np[b], m, *self._row_choice(b))
        self._rows_packed(due)

    def _fill_blocks(self, due: list[int]) -> None:
        """Row mode: a row whose sink block holds padding (``_block_pad``)
        and packs now takes its oldest residual slots into the block in its
        place, so that the block holds its first ``sinks`` real slots, as
        alone its layer takes them just before its first pack; the logical
        order stays (the block starts that many slots later, its padding
        moves to the front of the rest: ``_sink_at``, ``_pads``)."""
        if self._block_pad is None:
            return
        S = self._r0  # the block's rows; the residual's follow them
        for b, (m, bp) in enumerate(zip(due, self._block_pad)):
            if not m or not bp:
                continue
            at = S + self._rs[b]
            for buf in (self._rk, self._rv):
                buf[b, :, :S] = torch.cat([buf[b, :, bp:S], buf[b, :, at : at + bp]], 1)
            self._rs[b] += bp
            self._pads[b] += bp
            self._sink_at[b] += bp
            self._block_pad[b] = 0
        self._row_args = None
        if not any(self._block_pad):
            self._block_pad = None

    def _rows_packed(self, due: list[int]) -> None:
        """Row mode, once each row has packed its ``due`` slots: its packed
        and masked counts move on, and the residual rows that every row has
        packed (or never held) leave the buffers."""
        for b, m in enumerate(due):
            self._np[b] += m
            self._rs[b] += m
        self.n_packed = max(self._np)
        self._row_args = None
        d = min(self._rs)
        if d:
            self._drop_oldest(d)
            self._rs = [s - d for s in self._rs]

    def adopt_rows(self, old: "PackedStore", rows: list[bool], pad) -> list[bool]:
        """A round of a uniform layer with rounds (``from_uniform(...,
        columns=True)`` of the round's kept slots, nothing packed yet): the
        rows in ``rows``, which the round left as they were, take their
        packed slots bit for bit from ``old`` (the store before the round,
        in row mode), so that they hold what they hold alone, where no round
        came; the others pack at the next :meth:`settle`, as after their own
        round alone. Enters row mode (``pad``: the layer's leading padded
        slots per row) and takes the sink block first. Returns per row
        whether it was adopted: a row whose sink block was taken in one
        store and not in the other, or that packed nothing, packs as the
        others (its packed slots, if any, again from their dequantized
        values)."""
        if old._np is None or old.batch != self.batch or old._hi is not None:
            raise ValueError("PackedStore.adopt_rows: old must be a row-mode store of the same batch")
        self.carry_choices(old)
        self.take_sinks(pad)
        took = [bool(a and m and self._r0 == old._r0) for a, m in zip(rows, old._np)]
        if not any(took) or not self.start_rows(pad, unpadded=True):
            return [False] * self.batch
        G = self.group
        took = [t and self.r - s >= m for t, s, m in zip(took, self._rs, old._np)]
        due = [m if t else 0 for t, m in zip(took, old._np)]
        self._reserve(max(due))
        for b, m in enumerate(due):
            if m:
                for name, hi in (("_kc", m), ("_vc", m), ("_vmin", m), ("_vsc", m), ("_kmin", m // G),
                                 ("_ksc", m // G)):
                    getattr(self, name)[b, :, :hi] = getattr(old, name)[b, :, :hi]
        self._rows_packed(due)
        return took

    def carry_choices(self, old: "PackedStore") -> None:
        """The per-row once-only choices of ``old`` (a store of the same
        batch before a round), which each row made at its first pack and
        keeps as its own (also where ``old`` was laid out again by an earlier
        round and is not in row mode yet, so that :meth:`adopt_rows` has no
        packed slots to take)."""
        if old._choices is not None:
            if len(old._choices) != self.batch:
                raise ValueError("PackedStore.carry_choices: old must be a store of the same batch")
            self._choices, self._rot_mask = list(old._choices), None
            self.rotation = old.rotation if self.rotation is None else self.rotation

    def row_dues(self) -> list[int]:
        """Row mode: the slots each row's next settle packs, its residual's
        whole groups past ``residual + group - 1`` (a row that has packed
        nothing, once ``first_pack_rows`` lets it where that is set; a row
        whose sink block holds padding, past the slots that fill it first,
        ``_fill_blocks``; none in a store that packs nothing while decoding,
        mixed precision's)."""
        if not self.pack_decoded:
            return [0] * self.batch
        G, R = self.group, self.residual
        # a row whose block holds padding takes that many of its residual slots into it first
        bp = self._block_pad or [0] * self.batch
        due = [max(0, (self.r - s - p - R) // G * G) for s, p in zip(self._rs, bp)]
        if self.first_pack_rows is not None:
            due = [0 if not packed and not ready else d
                   for d, packed, ready in zip(due, self._np, self.first_pack_rows)]
        return due

    def row_pending(self, b: int):
        """Row mode: ``(keys, values)`` ``[1, H, m, D]`` of the residual
        slots row ``b``'s next settle packs (``m``: its :meth:`row_dues`)."""
        m, o = self.row_dues()[b], self._r0 + self._rs[b]
        if self._block_pad is not None:
            o += self._block_pad[b]  # the slots that go to its sink block first (_fill_blocks)
        return self._rk[b : b + 1, :, o : o + m], self._rv[b : b + 1, :, o : o + m]

    def set_row_choice(self, b: int, rotation, feedback, clip: bool) -> None:
        """Row mode: row ``b`` packs its keys as ``k @ rotation`` (None: as
        they are), rounds them with the key-feedback triangle ``feedback``
        (None: without) and packs its value groups over clipped ranges if
        ``clip``: the choices the row makes alone, at its first pack, so
        only before it packs (the other rows keep theirs). From the first
        call on, no row takes the store-wide choices."""
        if self._np is None:
            raise RuntimeError("PackedStore.set_row_choice: the store is not in row mode (start_rows)")
        if self._np[b]:
            raise RuntimeError(f"PackedStore.set_row_choice: row {b} has packed slots already, with its choices")
        if self._choices is None:
            self._choices = [None] * self.batch
        self._put_choice(b, rotation, feedback, bool(clip))

    def _put_choice(self, b: int, rotation, feedback, clip: bool) -> None:
        """Record row ``b``'s choices (checked by the caller)."""
        if rotation is not None:
            self.rotation = rotation  # one matrix (key_rotation's) for every rotated row
        self._choices[b] = (rotation is not None, feedback, clip)
        self._rot_mask = None

    def rows_to_choose(self) -> bool:
        """Whether a row still makes its choices (``set_row_choice``) before
        it packs, out of row mode (a per-head store packed once,
        ``RaggedPackedStore``); never here."""
        return False

    def row_choice(self, b: int) -> tuple[bool, torch.Tensor | None, bool]:
        """``(rotated, feedback triangle or None, clipped)``: how row ``b``'s
        slots are packed (its own choices in row mode, else the store's)."""
        if self._choices is None:
            return self.rotation is not None, self.feedback, self.value_clip
        return self._choices[b] or (False, None, False)

    def _row_choice(self, b: int):
        """``(rotation, feedback weights, clip)`` row ``b`` packs with, for :meth:`_pack`."""
        rotated, tri, clip = self.row_choice(b)
        return self.rotation if rotated else None, None if tri is None else expand(tri, int(self._rk.shape[-1])), clip

    def take_sinks(self, pad=None) -> None:
        """Move the first ``sinks`` slots of every head to the front of the
        residual's buffers, out of what is packed, once, when the residual
        first holds enough to pack a group after them (before anything is
        packed).

        ``pad`` (host ints, one per row) are leading padded slots. A row's
        sink block starts at its first real slot (``_sink_at``), or ends at
        its last one when it has fewer than ``sinks``, so that the row's
        padded slots stay a prefix of the rest (and of the block in the
        second case); ``split_start`` splits ``kv_start`` between the two.
        When every row's padding lies in the part packed now, one kernel call
        reads packed part, block and residual in that order
        (``_sinks_in_call``); otherwise the block is read by a call of its
        own. The logical order, which ``kv_start``, the per-slot columns,
        :meth:`dequantized` and :meth:`unpacked` count, stays the original one."""
        S = self.sinks
        if (not S or self._r0 or self.n_packed or not self.pack_decoded or self._rk is None
                or self.r < S + self.residual + self.group):
            return
        pads = [0] * self.batch if pad is None else [int(p) for p in pad]
        at = [min(p, self.r - S) for p in pads]
        for b, a in enumerate(at):
            for buf in (self._rk, self._rv):
                block = buf[b, :, a : a + S].clone()
                # the row's slots before its block move up behind it, the ones after stay
                buf[b, :, S : a + S] = buf[b, :, :a].clone()
                buf[b, :, :S] = block
        self._r0, self._sink_at = S, at
        self.r -= S
        m = self.pending()  # what the settle() in progress packs
        block_pad = [max(0, p - a) for p, a in zip(pads, at)]
        self._block_pad = block_pad if any(block_pad) else None
        self._sinks_in_call = self._block_pad is None and all(p <= m for p in pads)

    def sink_block(self):
        """``(keys, values)`` ``[B, H, n_sinks, D]`` of the sink block, the
        front of the residual's buffers (no slots before it is taken)."""
        return self._rk[:, :, : self._r0], self._rv[:, :, : self._r0]

    def split_start(self, kv_start):
        """``(sink block's, rest's)`` masked prefixes ``[B]`` from a logical
        ``kv_start`` ``[B]`` (None: no padding): the padding before a row's
        sink block masks the rest's prefix, the padding past it the sink
        block's (see :meth:`take_sinks`)."""
        if kv_start is None:
            return None, None
        ks = kv_start.to(torch.int64)
        at = torch.tensor(self._sink_at, dtype=torch.int64, device=ks.device)
        main = torch.minimum(ks, at)
        return (ks - main).clamp(max=self.n_sinks), main + (ks - at - self.n_sinks).clamp(min=0)

    def pending(self) -> int:
        """How many of the oldest residual slots the next :meth:`settle` packs."""
        if not self.pack_decoded or self._rk is None:
            return 0
        if self._np is not None:  # row mode: the most any row packs next
            return max(self.row_dues())
        due = self.sinks if self.sinks and not self._r0 and not self.n_packed else 0  # take_sinks comes first
        return max(0, (self.r - due - self.residual) // self.group * self.group)

    def residual_keys(self) -> torch.Tensor:
        """The full-precision keys ``[B, H, r, D]`` of the residual, oldest first."""
        return self._rk[:, :, self._r0 : self._r0 + self.r]

    def residual_values(self) -> torch.Tensor:
        """The full-precision values ``[B, H, r, Dv]`` of the residual, oldest first."""
        return self._rv[:, :, self._r0 : self._r0 + self.r]

    def packed_any(self) -> bool:
        """Whether any slot is packed (the rotation is then fixed)."""
        return bool(self.n_packed or self._hi is not None)

    def set_rotation(self, rotation: torch.Tensor | None) -> None:
        """Pack keys as ``k @ rotation`` from now on: only before anything is
        packed (``rotate="auto"`` deciding at the first :meth:`settle` that packs)."""
        if rotation is not self.rotation and self.packed_any():
            raise RuntimeError("PackedStore.set_rotation: keys are already packed in another basis")
        self.rotation = rotation

    def set_feedback(self, weights: torch.Tensor | None) -> None:
        """Round keys with these key-feedback weights (``stores.feedback.compact``'s
        triangle) from now on: only before anything is packed, so that every
        packed group of the layer was rounded alike."""
        if weights is not self.feedback and self.packed_any():
            raise RuntimeError("PackedStore.set_feedback: keys are already packed without these weights")
        self.feedback = weights

    def set_value_clip(self, clip: bool) -> None:
        """Pack value groups over clipped ranges (``ops.pack_values(clip=True)``)
        from now on: only before anything is packed, so that every packed
        value group of the layer was ranged alike."""
        if bool(clip) != self.value_clip and self.packed_any():
            raise RuntimeError("PackedStore.set_value_clip: values are already packed the other way")
        self.value_clip = bool(clip)

    def _pack_oldest(self, m: int) -> None:
        """Pack the ``m`` oldest residual slots (whole groups) after the packed ones."""
        self._reserve(self.n_packed + m)
        self._pack(slice(None), 0, self.n_packed, m, self.rotation, self._feedback_weights(), self.value_clip)
        self.n_packed += m

    def _pack(self, rows: slice, s: int, p0: int, m: int, rotation, feedback, clip: bool) -> None:
        """Pack residual slots ``s .. s + m`` (after the sink block) of batch
        rows ``rows`` into packed slots ``p0 .. p0 + m`` (whole groups, room
        reserved): keys as ``k @ rotation`` (None: as they are), rounded with
        ``feedback`` (:meth:`_feedback_weights`), value groups over clipped
        ranges if ``clip``."""
        G, o = self.group, self._r0 + s
        keys = self._rk[rows, :, o : o + m]
        ops.pack_keys(keys if rotation is None else rotate(keys, rotation, torch.float32), self.bits, G,
                      codes=self._kc[rows, :, p0 : p0 + m], mins=self._kmin[rows, :, p0 // G : (p0 + m) // G],
                      scales=self._ksc[rows, :, p0 // G : (p0 + m) // G], feedback=feedback)
        ops.pack_values(self._rv[rows, :, o : o + m], self.value_bits, G, codes=self._vc[rows, :, p0 : p0 + m],
                        mins=self._vmin[rows, :, p0 : p0 + m], scales=self._vsc[rows, :, p0 : p0 + m],
                        clip=clip)

    def _feedback_weights(self):
        """``[H, D, D]`` float32 weights for ``ops.pack_keys`` (None without feedback)."""
        return None if self.feedback is None else expand(self.feedback, int(self._rk.shape[-1]))

    def _codes_keys(self, keys):
        """``keys`` ``[..., D]`` as they are packed: rotated (float32) when
        the store rotates keys, else unchanged."""
        return keys if self.rotation is None else rotate(keys, self.rotation, torch.float32)

    def _unpack_keys(self, codes, mins, scales, bits: int, dtype):
        """``ops.unpack_keys`` in the model's basis, as ``dtype`` (rotated
        codes unpack in float32 and rotate back)."""
        if self.rotation is None:
            return ops.unpack_keys(codes, mins, scales, bits, self.group, dtype=dtype)
        keys = ops.unpack_keys(codes, mins, scales, bits, self.group)
        mask = self._rotated_rows(keys.device)
        if mask is None:
            return unrotate(keys, self.rotation, dtype)
        return torch.where(mask, unrotate(keys, self.rotation, dtype), keys.to(dtype))

    def _choices_repr(self, names) -> str:
        """The ``repr`` words for the packing choices ``names`` (the first of
        ``"rotated keys"``, ``"key feedback"``, ``"clipped values"``): with
        per-row choices the rows that took each, else the store's."""
        if self._choices is None:
            on = (self.rotation is not None, self.feedback is not None, self.value_clip)
            return "".join(f", {name}" for name, yes in zip(names, on) if yes)
        out = ""
        for i, name in enumerate(names):
            # (the feedback entry is a tensor or None, the others bools)
            rows = [b for b, c in enumerate(self._choices) if c is not None and (c[i] is not None if i == 1 else c[i])]
            out += f", {name} in rows {rows}" if rows else ""
        return out

    def _rotated_rows(self, device):
        """Row mode with per-row choices: a ``[B, 1, 1, 1]`` bool mask of the
        rows whose keys are packed rotated; None when the store's rotation
        serves every row."""
        if self._choices is None:
            return None
        if self._rot_mask is None or self._rot_mask.device != torch.device(device):
            flags = [c is not None and c[0] for c in self._choices]
            self._rot_mask = torch.tensor(flags, device=device)[:, None, None, None]
        return self._rot_mask

    def _packed_query(self, query):
        """``(query, rotated)``: the queries the packed part is read with,
        ``q @ rotation`` on the rows whose keys are packed rotated, and
        whether any row's are (the residual, kept as it came, is then read
        with ``query`` as it is)."""
        if self.rotation is None or not self.packed_any():
            return query, False
        if self._choices is None:
            return rotate_queries(query, self.rotation), True
        if not any(c is not None and c[0] for c in self._choices):
            return query, False
        return torch.where(self._rotated_rows(query.device), rotate_queries(query, self.rotation), query), True

    def _drop_oldest(self, m: int) -> None:
        """Remove the ``m`` oldest residual slots (just packed); a sink block
        in front of them stays."""
        G, o = self.group, self._r0
        left = self.r - m
        # (row mode may hold more: other rows' slots, or a row's still waiting for its sink block)
        cap = o + max(self.residual + G, left)
        if self._rk.shape[2] > cap + G:
            # a prefill's buffer: give it back, the residual never needs more
            def shrink(t):
                kept = torch.cat([t[:, :, :o], t[:, :, o + m : o + self.r]], 2)
                return torch.cat([kept, t.new_empty(t.shape[:2] + (cap - o - left,) + t.shape[3:])], 2)

            self._rk, self._rv = shrink(self._rk), shrink(self._rv)
        else:
            # the source overlaps the destination: copy through a temporary
            self._rk[:, :, o : o + left] = self._rk[:, :, o + m : o + self.r].clone()
            self._rv[:, :, o : o + left] = self._rv[:, :, o + m : o + self.r].clone()
        self.r = left

    def drop_unseen(self, first_visible) -> int:
        """Forget the packed key groups whose every slot lies before token
        position ``first_visible`` (a sliding-window layer: no later query
        sees them; an int, or per row a list, where rows see windows of
        their own lengths); returns the slots dropped, a multiple of ``group``.

        The slots of the oldest group that the window no longer sees but whose
        group still holds visible ones stay, and :meth:`attend` masks them
        (they share the group's channel scales, so the group leaves whole).
        The packed part moves to the front of its buffers: at most a window's
        worth of packed bytes, once per ``group`` decoded tokens."""
        G = self.group
        if self._np is not None:
            return self._drop_unseen_rows(first_visible)
        if not isinstance(first_visible, int):
            first_visible = min(first_visible)  # what every row no longer sees
        m = min(self.n_packed, max(0, first_visible - self.first_position) // G * G)
        if m <= 0 or not self.pack_decoded:
            return 0
        self._drop_packed_front(slice(None), m, self.n_packed)
        self.n_packed -= m
        self.first_position += m
        return m

    def _drop_packed_front(self, rows: slice, m: int, n: int) -> None:
        """Move packed slots ``m .. n`` (whole groups) of batch rows ``rows``
        to the front of the packed buffers, forgetting the first ``m``."""
        G = self.group
        for name, lo, hi in (("_kc", m, n), ("_vc", m, n), ("_vmin", m, n), ("_vsc", m, n),
                             ("_kmin", m // G, n // G), ("_ksc", m // G, n // G)):
            buf = getattr(self, name)
            # the source overlaps the destination: copy through a temporary
            buf[rows, :, : hi - lo] = buf[rows, :, lo:hi].clone()

    def _drop_unseen_rows(self, first_visible: int) -> int:
        """Row mode's :meth:`drop_unseen`: each row forgets its own packed
        groups that lie wholly before ``first_visible`` (its groups start at
        its first real token, ``_pads[b]`` logical slots in), so it keeps the
        groups it keeps alone; the slots a row drops become masked slots in
        front of its packed part (``_pads``), and the logical prefix every
        row has dropped or padded leaves the store (returned, as the layer's
        ``kv_start`` moves by it).

        A row with nothing packed before ``first_visible`` (a row whose own
        window is shorter than another's, or that has packed nothing yet)
        also stops counting the residual slots before it (``_rs``): alone
        its layer dropped them, so they must not fill the groups it packs
        next (``row_dues``), nor start them; the residual rows no row
        counts leave the buffers."""
        G = self.group
        fv = [first_visible] * self.batch if isinstance(first_visible, int) else first_visible
        drops = [min(n, max(0, f - self.first_position - p) // G * G) for n, p, f in zip(self._np, self._pads, fv)]
        for b, m in enumerate(drops):
            if m:
                self._drop_packed_front(slice(b, b + 1), m, self._np[b])
                self._np[b] -= m
                self._pads[b] += m
        if any(drops):
            self.n_packed, self._row_args = max(self._np), None
        for b, f in enumerate(fv):
            # (a row with packed slots left keeps a visible one among them: nothing of its residual is unseen)
            x = 0 if self._np[b] else min(self.r - self._rs[b], max(0, f - self.first_position - self._pads[b]))
            if x:
                self._pads[b] += x
                self._rs[b] += x
                self._row_args = None
        r = min(self._rs)
        if r:
            self._drop_oldest(r)
            self._rs = [s - r for s in self._rs]
            self._row_args = None
        d = min(self._pads)
        if d > 0:
            self._pads = [p - d for p in self._pads]
            self.first_position += d
        return d

    def _reserve(self, need: int) -> None:
        """Packed buffers for ``need`` slots (grown by an eighth, group-aligned)."""
        have = 0 if self._kc is None else int(self._kc.shape[2])
        if self._kc is not None and need <= have:
            return
        G = self.group
        # Grow by an eighth (at least 4 groups): a prefill's packed part is
        # large and decoding adds a group every G steps, so half again (the
        # usual amortised growth) held up to 45% more bytes than in use for a
        # whole generation (bench_quantized_cache at 8K); an eighth still
        # copies the packed part only every ~n/8 decoded tokens.
        # an empty part (the kernel reads zero slots) holds nothing: 4 groups
        # would be 4 x group rows reserved for a group that may never fill
        cap = 0 if need == 0 and have == 0 else max(need, have + max(4 * G, have // 8))
        cap = (cap + G - 1) // G * G
        B, H, _, D = (int(x) for x in self._rk.shape)
        names = ("_kc", "_kmin", "_ksc", "_vc", "_vmin", "_vsc")
        for name, new in zip(names, _zero_part(B, H, cap, D, D, self.bits, self.value_bits, G, self._rk.device)):
            old = getattr(self, name)
            if old is not None:
                new[:, :, : old.shape[2]] = old
            setattr(self, name, new)

    def index_batch(self, idx) -> None:
        if self._rk is None:
            return
        idx = idx.to(self._rk.device)
        for name in ("_kc", "_kmin", "_ksc", "_vc", "_vmin", "_vsc", "_rk", "_rv"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, idx))
        if self._hi is not None:
            self._hi = tuple(t.index_select(0, idx) for t in self._hi)
        if self._sink_at is not None:
            self._sink_at = [self._sink_at[i] for i in idx.tolist()]
        if self._block_pad is not None:
            self._block_pad = [self._block_pad[i] for i in idx.tolist()]
        if self._np is not None:
            host = idx.tolist()
            self._np, self._rs, self._pads = ([x[i] for i in host] for x in (self._np, self._rs, self._pads))
            if self._nh is not None:
                self._nh = [self._nh[i] for i in host]
            self._row_args = None
            if self._choices is not None:
                self._choices, self._rot_mask = [self._choices[i] for i in host], None
            if self.first_pack_rows is not None:
                self.first_pack_rows = [self.first_pack_rows[i] for i in host]
        if self._cols is not None:
            self._cols = {name: t.index_select(0, idx) for name, t in self._cols.items()}

    # ----------------------------------------------------------- attention
    def _packed_views(self):
        p, G = self.n_packed, self.group
        if self._kc is None:
            return None
        # a mixed-precision store's packed part may end in a short key group
        t = (p + G - 1) // G
        return (self._kc[:, :, :p], self._kmin[:, :, :t], self._ksc[:, :, :t],
                self._vc[:, :, :p], self._vmin[:, :, :p], self._vsc[:, :, :p])

    def dequantized(self):
        """Full-precision ``(keys, values)`` ``[B, H, n, D]`` of every slot, in
        the logical order (low part, high part, residual): for tests and the
        paths the packed kernel does not cover."""
        if self._np is not None:
            return self._dequantized_row_mode()
        o = self._r0
        rk, rv = self._rk[:, :, o : o + self.r], self._rv[:, :, o : o + self.r]
        ks, vs = [], []
        for part, kb, vb in ((self._packed_views() if self.n_packed else None, self.bits, self.value_bits),
                             (self._hi, self.high_bits, self.high_bits)):
            if part is not None:
                k, v = self._unpack_part(part, kb, vb, rv)
                ks.append(k)
                vs.append(v)
        keys, values = (rk, rv) if not ks else (torch.cat(ks + [rk], 2), torch.cat(vs + [rv], 2))
        return self._with_sink_block(keys, values)

    def _unpack_part(self, part, key_bits: int, value_bits: int, residual_values):
        """A packed part's ``(codes, mins, scales)`` of keys then values as
        full-precision ``(keys, values)`` in the residual's dtype."""
        kc, kmin, ksc, vc, vmin, vsc = part
        dtype = residual_values.dtype
        return (self._unpack_keys(kc, kmin, ksc, key_bits, dtype),
                ops.unpack_values(vc, vmin, vsc, value_bits, self.group, head_dim=int(residual_values.shape[3]),
                                  dtype=dtype))

    def _with_sink_block(self, keys, values):
        """``keys``/``values`` ``[B, H, n - n_sinks, D]`` in the logical order
        but for the sink block, with each row's block back where
        :meth:`take_sinks` took it from (unchanged without a block)."""
        o = self._r0
        if not o:
            return keys, values
        rows = [[(t[b, :, :a], s[b, :, :o], t[b, :, a:]) for b, a in enumerate(self._sink_at)]
                for t, s in ((keys, self._rk), (values, self._rv))]
        return tuple(torch.stack([torch.cat(parts, 1) for parts in r]) for r in rows)

    def _dequantized_row_mode(self):
        """Row mode's :meth:`dequantized`: per row its padding (zeros,
        masked by the layer's ``kv_start``), its packed slots unpacked (then
        its high part's, mixed precision), its residual, with its sink block
        back where :meth:`take_sinks` took it."""
        o = self._r0
        rk, rv = self._rk[:, :, o : o + self.r], self._rv[:, :, o : o + self.r]
        keys = values = hk = hv = None
        if self.n_packed:
            keys, values = self._unpack_part(self._packed_views(), self.bits, self.value_bits, rv)
        if self._nh is not None and self.n_high:
            hk, hv = self._unpack_part(self._hi, self.high_bits, self.high_bits, rv)
        nh = self._nh if self._nh is not None else [0] * self.batch
        out_k, out_v = [], []
        for b, (p, m, h, s) in enumerate(zip(self._pads, self._np, nh, self._rs)):
            for out, res, packed, high in ((out_k, rk, keys, hk), (out_v, rv, values, hv)):
                parts = [res.new_zeros((res.shape[1], p, res.shape[3]))]
                if m:
                    parts.append(packed[b, :, :m])
                if h:
                    parts.append(high[b, :, :h])
                out.append(torch.cat(parts + [res[b, :, s:]], 1))
        return self._with_sink_block(torch.stack(out_k), torch.stack(out_v))

    def _rows_one_call(self, query) -> bool:
        """Whether row mode reads a step in one kernel call: on the CPU
        (``residual_hidden``), unless a row's sink block holds padding."""
        return one_call(query) and (not self._r0 or self._block_pad is None)

    def _attend_rows(self, query, scaling: float, kv_start=None, first_visible=None):
        """Row mode's kernel path: every row's packed slots in the per-head
        layout over the uniform buffers (head ``(b, h)`` at offset ``(b H +
        h) cap``, its row's length), then the residual buffers with each
        row's rows before its own residual hidden (``residual_hidden``:
        between its sink block, if any, and its residual), in one call on
        the CPU. Where the kernel takes no ``residual_hidden`` (CUDA), or a
        sink block holds padding, the residual is a second call masked by
        ``kv_start`` and the block a third (:meth:`split_start`), joined by
        log-sum-exp. The layer's ``kv_start`` (the padding, logical order)
        is read only for such a block: no other padded slot is stored.
        ``first_visible`` (token positions ``[B]`` or an int; a sliding
        window's decode step): each row's slots before it are masked, a
        prefix of its packed part past its own ``_pads`` (``kv_start`` of
        the ragged layout) and, once the window has passed that part, of its
        own residual (the second call's ``kv_start``)."""
        B, H, o = self.batch, self.heads, self._r0
        if self._kc is None:
            self._reserve(0)  # zero-slot buffers, once: the kernel reads an empty packed part
        dev, cap = query.device, int(self._kc.shape[2])
        if self._row_args is None or self._row_args[0] != (cap, dev):
            hidden = torch.tensor([[o, o + s] for s in self._rs], dtype=torch.int64)
            self._row_args = ((cap, dev), *_head_rows(self._np, H, cap, dev), hidden.repeat_interleave(H, 0).to(dev),
                              torch.tensor(self._rs, dtype=torch.int64, device=dev))
        offsets, lengths, hidden, starts = self._row_args[1:]
        flat = _flat((self._kc, self._kmin, self._ksc, self._vc, self._vmin, self._vsc))
        pq, rotated = self._packed_query(query)
        widths = dict(bits=self.bits, group=self.group, value_bits=self.value_bits, scaling=scaling)
        high = self._attend_high_rows(pq, scaling)
        if self._rows_one_call(query):
            # the block, if any, is the residual's front, read with the query as it is, as the residual is
            main = ops.packed_attention(pq, *flat, self._rk[:, :, : o + self.r], self._rv[:, :, : o + self.r],
                                        offsets=offsets, lengths=lengths, residual_hidden=hidden,
                                        residual_query=query if rotated else None,
                                        kv_start=self._row_leading(first_visible), return_lse=high is not None,
                                        **widths)
            return main if high is None else join_parts([main, high], query.dtype)
        rk, rv = self._rk[:, :, o : o + self.r], self._rv[:, :, o : o + self.r]
        empty = tuple(t[:, :, :0] for t in self._packed_views())
        packed_start = None
        if first_visible is not None:
            # a sliding window's decode step (no sink block): each row's masked
            # prefix split between its packed part and its own residual
            lead = self._row_lead(first_visible)
            packed_start = torch.tensor([min(s, n) for s, n in zip(lead, self._np)], dtype=torch.int64,
                                        device=dev)
            starts = torch.tensor([min(h + max(0, s - n), self.r) for s, n, h in zip(lead, self._np, self._rs)],
                                  dtype=torch.int64, device=dev)
        parts = [ops.packed_attention(query, *empty, rk, rv, kv_start=starts, return_lse=True, **widths)]
        if self.n_packed:
            none = rk[:, :, :0]
            parts.append(ops.packed_attention(pq, *flat, none, none, offsets=offsets, lengths=lengths,
                                              kv_start=packed_start, return_lse=True, **widths))
        if o:
            parts.append(self._attend_sinks(query, scaling, self.split_start(kv_start)[0]))
        if high is not None:
            parts.append(high)
        return join_parts(parts, query.dtype)

    def _attend_high_rows(self, pq, scaling: float):
        """Row mode of mixed precision with ``high_bits``: ``(out, lse)`` of
        every row's high part on its own (per-head layout over the ``_hi``
        buffers, its row's ``_nh`` slots; read with the packed part's
        queries ``pq``), or None where no row packed one."""
        if self._nh is None or not self.n_high:
            return None
        key = (int(self._hi[0].shape[2]), pq.device, tuple(self._nh))
        if self._hi_args is None or self._hi_args[0] != key:
            # built once per change of the counts (a beam reorder), as _row_args
            self._hi_args = (key, *_head_rows(self._nh, self.heads, key[0], pq.device))
        offsets, lengths = self._hi_args[1:]
        none = self._rk[:, :, :0]
        return ops.packed_attention(pq, *_flat(self._hi), none, none, offsets=offsets, lengths=lengths,
                                    bits=self.high_bits, group=self.group, scaling=scaling, return_lse=True)

    def _row_leading(self, first_visible):
        """Row mode: ``kv_start`` ``[B]`` for the one kernel call (ragged
        layout: packed part, then every residual row) that masks each row's
        slots before token position ``first_visible`` (an int or ``[B]``;
        None: none). A row's padding is not stored, so only what lies past
        its ``_pads`` is masked; past its packed part, the hidden residual
        rows count too."""
        if first_visible is None:
            return None
        out = []
        for b, s in enumerate(self._row_lead(first_visible)):
            out.append(s if s <= self._np[b] else min(s + self._rs[b], self._np[b] + self._r0 + self.r))
        return torch.tensor(out, dtype=torch.int64) if any(out) else None

    def _row_lead(self, first_visible) -> list[int]:
        """Row mode: per row how many of its own slots (packed, then its own
        residual) lie before token position ``first_visible`` (an int or
        ``[B]``); its padding is not stored, so only what lies past its
        ``_pads`` counts."""
        fv = torch.as_tensor(first_visible, dtype=torch.int64).reshape(-1).expand(self.batch).tolist()
        return [max(0, f - self.first_position - self._pads[b]) for b, f in enumerate(fv)]

    def attend(self, query, spec: AttentionSpec, kv_start=None, query_pos=None):
        q = int(query.shape[2])
        # (a sink block read by a call of its own would be masked causally for a chunk)
        if (self._np is not None and spec.plain and kernel_reads(query, self._rk)
                and q <= min(self.r - s for s in self._rs)):
            if spec.window is None and self.visible_from is None and (
                    q == 1 or not self._r0 or self._rows_one_call(query)):
                return self._attend_rows(query, spec.scaling, kv_start)
            if q == 1 and query_pos is not None and not self._r0:
                # a sliding window's decode step: what neither the window nor the layer lets it see is masked
                first = query_pos[:, 0].to(torch.int64).cpu()
                first = first - (spec.window - 1) if spec.window is not None else torch.zeros_like(first)
                if self.visible_from is not None:
                    first = torch.maximum(first, torch.as_tensor(self.visible_from, dtype=torch.int64))
                return self._attend_rows(query, spec.scaling, kv_start, first_visible=first)
        # a sliding window reaches the kernel for one query at a time: the
        # slots it no longer sees are all leading ones, masked like padding
        windowed = spec.window is not None
        if self.visible_from is not None:
            kv_start = self._leading(query, self.visible_from, kv_start)
        # a sink block read by a call of its own would be masked causally
        # for a chunk of queries: such chunks take the eager path
        apart = self._r0 and not self._sinks_in_call
        if (self._np is None and spec.plain and kernel_reads(query, self._rk) and q <= self.r and (q == 1 or not apart)
                and (not windowed or (q == 1 and query_pos is not None and self._hi is None))):
            if self._kc is None:
                self._reserve(0)  # zero-slot buffers, once: the kernel reads an empty packed part
            # one call reads the sink block as the residual's oldest slots
            lo = self._r0 if apart else 0
            rk, rv = self._rk[:, :, lo : self._r0 + self.r], self._rv[:, :, lo : self._r0 + self.r]
            if windowed:
                # keys at distance >= window from the query (build_mask's rule)
                kv_start = self._leading(query, query_pos[:, 0].to(torch.int64) - (spec.window - 1), kv_start)
            sink_start = None
            if apart:
                # in one call the padding lies in the packed part, before the block: kv_start as it is
                sink_start, kv_start = self.split_start(kv_start)
            pq, residual_query = query, None
            if self.rotation is not None and self.packed_any():
                # the packed part with q @ R, the residual (kept as it came) with q
                if not one_call(query):
                    return self._attend_joined(query, rk, rv, spec.scaling, kv_start, sink_start)
                pq, residual_query = rotate_queries(query, self.rotation), query
            if self._hi is not None:
                return self._attend_two_widths(pq, rk, rv, spec.scaling, kv_start, residual_query)
            if not apart:
                return ops.packed_attention(pq, *self._packed_views(), rk, rv, bits=self.bits, group=self.group,
                                            value_bits=self.value_bits, scaling=spec.scaling, kv_start=kv_start,
                                            residual_query=residual_query)
            # the sink block is a second call's residual, joined by log-sum-exp
            main = ops.packed_attention(pq, *self._packed_views(), rk, rv, bits=self.bits, group=self.group,
                                        value_bits=self.value_bits, scaling=spec.scaling, kv_start=kv_start,
                                        residual_query=residual_query, return_lse=True)
            return join_parts([main, self._attend_sinks(query, spec.scaling, sink_start)], query.dtype)
        # softcap / sink logits / windows: the eager path over a dequantized copy
        keys, values = self.dequantized()
        key_pos = None
        if spec.window is not None:
            key_pos = torch.arange(self.first_position, self.first_position + self.n,
                                   device=query.device)[None].expand(query.shape[0], self.n)
        mask = build_mask(int(query.shape[0]), q, self.n, query.device, kv_start=kv_start, window=spec.window,
                          key_pos=key_pos, query_pos=query_pos)
        return masked_attention(query, keys, values, spec, mask)

    def _leading(self, query, first_visible, kv_start):
        """``kv_start`` ``[B]`` raised to the slots before token position
        ``first_visible`` (an int or ``[B]``): they are all leading ones, since
        slot ``i`` holds position ``first_position + i``."""
        unseen = torch.as_tensor(first_visible, dtype=torch.int64, device=query.device) - self.first_position
        unseen = unseen.clamp(min=0, max=self.n).expand(int(query.shape[0]))
        return unseen if kv_start is None else torch.maximum(kv_start.to(torch.int64), unseen)

    def _attend_two_widths(self, query, rk, rv, scaling, kv_start, residual_query=None):
        """Mixed precision with ``high_bits``: the low part with the residual
        and the high part on its own (every query after it), each by
        ``ops.packed_attention``, joined exactly through their log-sum-exps.
        ``kv_start`` counts the logical order low, high, residual, so a row's
        masked prefix splits into the two calls' prefixes. ``residual_query``:
        the residual's own queries (rotated keys: ``query`` is the rotated one)."""
        p, h = self.n_packed, self.n_high
        start_lo = start_hi = None
        if kv_start is not None:
            ks = kv_start.to(torch.int64)
            lo = ks.clamp(max=p)
            start_hi = (ks - p).clamp(min=0, max=h)
            start_lo = lo + (ks - p - h).clamp(min=0)  # a masked residual prefix follows a fully masked low part
        o1, l1 = ops.packed_attention(query, *self._packed_views(), rk, rv, bits=self.bits, group=self.group,
                                      value_bits=self.value_bits, scaling=scaling, kv_start=start_lo,
                                      return_lse=True, residual_query=residual_query)
        none = rk[:, :, :0]
        o2, l2 = ops.packed_attention(query, *self._hi, none, none, bits=self.high_bits, group=self.group,
                                      scaling=scaling, kv_start=start_hi, return_lse=True)
        return join_parts([(o1, l1), (o2, l2)], query.dtype)

    def _attend_sinks(self, query, scaling, sink_start):
        """``(out, lse)`` of the sink block alone (full precision, the query
        as it is: the block was never rotated), masked by ``sink_start``."""
        empty = tuple(t[:, :, :0] for t in self._packed_views())
        return ops.packed_attention(query, *empty, *self.sink_block(), bits=self.bits, group=self.group,
                                    value_bits=self.value_bits, scaling=scaling, kv_start=sink_start,
                                    return_lse=True)

    def _attend_joined(self, query, rk, rv, scaling, kv_start, sink_start=None):
        """Rotated keys where the kernel takes no ``residual_query`` (not
        :func:`one_call`): each packed part (the low-bit one, and a mixed
        precision store's high-bit one) read with the rotated query and no
        residual, the residual with the query as it is and no packed part,
        joined exactly through their log-sum-exps. ``kv_start`` counts the
        order low part, high part, residual (with a sink block, the rest's
        prefix: ``rk``/``rv`` start with the block when one call reads it,
        else ``sink_start`` masks the block's own call, see :meth:`split_start`)."""
        p, h = self.n_packed, self.n_high
        starts = [None, None, None]
        if kv_start is not None:
            ks = kv_start.to(torch.int64)
            starts = [ks.clamp(max=p), (ks - p).clamp(min=0, max=h), (ks - p - h).clamp(min=0)]
        none, rq = rk[:, :, :0], rotate_queries(query, self.rotation)
        parts = []
        low = self._packed_views()  # attend reserved zero-slot buffers if nothing was packed
        if p:
            parts.append(ops.packed_attention(rq, *low, none, none, bits=self.bits, group=self.group,
                                              value_bits=self.value_bits, scaling=scaling, kv_start=starts[0],
                                              return_lse=True))
        if self._hi is not None:
            parts.append(ops.packed_attention(rq, *self._hi, none, none, bits=self.high_bits, group=self.group,
                                              scaling=scaling, kv_start=starts[1], return_lse=True))
        empty = tuple(t[:, :, :0] for t in low)
        parts.append(ops.packed_attention(query, *empty, rk, rv, bits=self.bits, group=self.group,
                                          value_bits=self.value_bits, scaling=scaling, kv_start=starts[2],
                                          return_lse=True))
        if self._r0 and not self._sinks_in_call:
            parts.append(self._attend_sinks(query, scaling, sink_start))
        return join_parts(parts, query.dtype)


def _zero_part(B: int, H: int, cap: int, D: int, Dv: int, key_bits: int, value_bits: int, group: int,
               device) -> tuple:
    """Zeroed packed buffers for ``cap`` slots (a multiple of ``group``) of
    ``B x H`` heads: key codes ``[B, H, cap, Db]``, mins and scales ``[B, H,
    cap / G, D]``, value codes ``[B, H, cap, Dbv]``, mins and scales ``[B, H,
    cap, ceil(Dv / G)]``, in that order."""
    vg = math.ceil(Dv / group)

    def z(shape, dtype):
        return torch.zeros(shape, dtype=dtype, device=device)

    return (z((B, H, cap, ops.packed_row_bytes(D, key_bits)), torch.uint8),
            z((B, H, cap // group, D), torch.float32), z((B, H, cap // group, D), torch.float32),
            z((B, H, cap, ops.packed_row_bytes(Dv, value_bits)), torch.uint8),
            z((B, H, cap, vg), torch.float32), z((B, H, cap, vg), torch.float32))


def _head_rows(counts: list[int], heads: int, cap: int, device):
    """``(offsets, lengths)`` of the per-head layout over uniform ``[B, H,
    cap, .]`` buffers (row mode): head ``(b, h)`` starts at row ``(b H + h)
    cap`` of the flattened buffers and holds ``counts[b]`` slots."""
    return (torch.arange(len(counts) * heads, dtype=torch.int64, device=device) * cap,
            torch.tensor(counts, dtype=torch.int64).repeat_interleave(heads).to(device))


def _flat(part) -> list:
    """Packed buffers ``[B, H, cap, .]`` as the per-head layout's ``[B H cap, .]``."""
    return [t.reshape((-1,) + tuple(t.shape[3:])) for t in part]


def _write_part(dest, b: int, part) -> None:
    """Row ``b`` of the packed buffers ``dest`` (key codes, mins, scales,
    value codes, mins, scales; ``[B, H, cap, .]``) takes the one-row packed
    ``part`` (``[1, H, m, .]``, its key groups ``[1, H, ceil(m / G), D]``)
    from its first slot."""
    for d, t in zip(dest, part):
        d[b, :, : t.shape[2]] = t[0]


def one_call(query) -> bool:
    """Whether rotated keys' packed part and residual are read in one kernel
    call (``ops.packed_attention(residual_query=...)``, the CPU kernel's),
    as unrotated ones are; elsewhere they are separate calls joined by
    :func:`join_parts` (``PackedStore._attend_joined``)."""
    return query.device.type == "cpu"


def join_parts(parts, dtype):
    """Disjoint parts' attention outputs ``[B, q, Hq, D]`` joined exactly
    through their log-sum-exps ``[B, Hq, q]``: ``parts`` is a list of
    ``(out, lse)`` pairs from ``ops.packed_attention(..., return_lse=True)``;
    a row that sees nothing in any part gets zeros."""
    lse = torch.stack([lse for _, lse in parts])  # [P, B, Hq, q]
    m = lse.amax(0)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # a row that sees nothing: every weight 0
    w = (lse - m).exp()
    w = (w / w.sum(0).clamp(min=torch.finfo(torch.float32).tiny)).transpose(2, 3)[..., None]  # [P, B, q, Hq, 1]
    out = w[0] * parts[0][0].float()
    for i in range(1, len(parts)):
        out = out + w[i] * parts[i][0].float()
    return out.to(dtype)
