"""Decode-time rounds that keep a per-head packed layer's unchanged rows.

A packed layer that keeps its merging method's budget while decoding
(``EMS(...) + KIVI(...)``) is re-compressed every ``interval`` slots over its
target: its slots are read back dequantized, the method re-merges them, and
the kept slots are packed again. Packed in order, every kept slot after the
first change of its head lands in a new key group and is re-quantized on that
group's grid, and at 2 bits that error grows round after round (RESULTS,
"Evict, then pack, and keep the budget while decoding"). Yet a round leaves
most packed rows as they were: 82% of them are held afterwards with the same
merge count, 12% are gone and 5% were merged into (RESULTS, "Keeping the
packed rows through a round").

:func:`arrange` lays the round's kept slots out so that
:meth:`RaggedPackedStore.from_ragged` packs each old key group that still has
``min_live`` unchanged members in its old place and on its old grid, so
those members keep their codes. The group's other rows become
**placeholders**: rows whose merge count is :data:`TINY`, so that their
weight in attention, ``count * exp(logit)``, is ``exp(logit - 85)``, below
float32's resolution beside any real slot's. Packing a group again finds,
channel by channel, its minimum and maximum over its rows: one placeholder
holds the old minimum wherever no member reaches it, another the old
maximum, so the range, the step and every member's codes come out the same
(up to the float rounding of the rotation when keys are rotated); further
placeholders repeat a member. A group with fewer unchanged members, the
members that changed (merged into) and the residual's survivors are packed
afresh after the kept groups, as before. Each placeholder takes a previous
row's position, so :meth:`RaggedPackedStore.unpacked` drops it as it drops a
repeated slot's copies, and the store's slot counts leave it out: budgets
are kept in real slots. Placeholders are real bytes (a 2-bit row at D = 64
is 48 bytes, an fp32 residual row 512).

Only merging methods take this path (their packed layers carry merge counts,
which placeholders need); a round whose layout would move the sink block or
the residual packs everything again, as before. In a batch whose rows keep
their own residual (``from_ragged(rows_apart=True)``), :func:`arrange_rows`
decides row by row, as each row decides alone.
"""

from __future__ import annotations

import copy

import torch

from .ragged import RaggedStore, segments
from .rotation import rotate, unrotate

#: a placeholder row's merge count (log: -85.2; float32's smallest normal is 1.2e-38)
TINY = 1e-37
#: merge counts below this mark placeholder rows
TINY_BELOW = 1e-30


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` for an int64 ``index`` along the first dim: one
    ``index_select`` (a 2-D advanced index costs about four times as much
    on the small tensors of a round)."""
    return x.index_select(0, index)


def is_placeholder(counts: torch.Tensor) -> torch.Tensor:
    """Which of ``counts`` mark placeholder rows."""
    return counts < TINY_BELOW


def arrange(old, kept: RaggedStore, min_live: int, rows=None, *, backend: str | None = None) -> RaggedStore | None:
    """The round's kept slots ``kept`` (a :class:`RaggedStore` with merge
    counts, what the method returned from ``old.unpacked()``) laid out for
    ``RaggedPackedStore.from_ragged(columns=True)`` so that every key group
    of ``old`` (a :class:`~kvcompress.stores.RaggedPackedStore` with
    positions) that keeps at least ``min_live`` unchanged members is packed
    again in place, its other rows placeholders. An unchanged member is a
    slot held at the same position with the same merge count and bit for bit
    the keys and values it was read back with. Per head: the sink block,
    the kept groups in their old order, then every other slot by position.
    ``rows`` is ``old._dequantized_rows()`` when the caller has it (the
    round's ``unpacked()`` read the same rows). None when no group is kept
    or the layout would change the store's sink block or residual (then the
    round packs everything again).

    ``backend``: ``"c"`` (``ops.keep_rows_plan``, one call; CPU tensors) or
    ``"torch"`` (tensor operations, any device); None picks C on the CPU.
    The two give the same layout bit for bit (``tests/test_keep_rows.py``);
    at the default model's shape a round's layout takes 0.5-0.6 ms with the
    C plan against 1.7-1.9 ms in tensor operations (RESULTS, "A round's
    layout in one C call")."""
    if kept.counts is None or old.positions is None or not old.packed_any():
        return None
    if backend is None:
        backend = "c" if kept.k.device.type == "cpu" else "torch"
    if backend not in ("c", "torch"):
        raise ValueError(f"backend: expected 'c', 'torch' or None, got {backend!r}")
    kd, vd = old._dequantized_rows() if rows is None else rows
    # every kept row on the packing grid (rotated keys when the layer rotates
    # them): one product, which both plans read
    grid = kept.k.float() if old.rotation is None else rotate(kept.k, old.rotation, torch.float32)
    lo, step = old._kmin.float(), old._ksc.float()
    if backend == "c":
        plan = _plan_c(old, kept, min_live, kd, vd, grid, lo, step)
        return None if plan is None else _assemble(old, kept, plan)
    found = _plan_torch(old, kept, min_live, kd, vd, grid, lo, step)
    if found is None:
        return None
    from .packed_ragged import _recent_kept

    plan, rest = found
    out = _assemble(old, kept, plan)
    # from_ragged's sink block and residual must be the ones laid out here
    N = kept.batch * kept.heads
    r = _recent_kept(out, old.residual)
    n_min = int(out._host_lengths.min()) if N else 0
    s = max(0, min(int(old.sinks_asked), n_min - r))
    if s != int(old._r0) or bool((rest < r).any()):
        return None
    return out


def arrange_rows(old, kept: RaggedStore, min_live: int, rows=None, *,
                 backend: str | None = None, only: list | None = None) -> RaggedStore | None:
    """:func:`arrange` for a batch whose rows each take their own residual
    (``RaggedPackedStore.from_ragged(rows_apart=True)``): each row laid out
    as :func:`arrange` lays it out for that row alone, so that a row keeps
    its unchanged key groups exactly when it would alone, whatever the other
    rows' layouts; a row refused keeps the round's slots as they came (all
    packed afresh, as alone). Each row takes its own sink block, as alone
    (``from_ragged``'s per-row sinks): :func:`arrange` checks a row that
    keeps groups against its old one. None when no row keeps a group. One
    row: :func:`arrange` itself. ``only`` (per row): the rows to lay out,
    the others keep the round's slots as they came (a row the round left as
    it was, which keeps its old layout: ``from_ragged(row_layout=...)``)."""
    B, H = kept.batch, kept.heads
    if B <= 1 and only is None:
        return arrange(old, kept, min_live, rows, backend=backend)
    rows = old._dequantized_rows() if rows is None else rows
    parts, kept_any = [], False
    for b in range(B):
        mine = _row_of(kept, b)
        if only is not None and not only[b]:
            parts.append(mine)
            continue
        laid = arrange(_old_row(old, b), mine, min_live, rows, backend=backend)
        kept_any |= laid is not None
        parts.append(mine if laid is None else laid)
    return _cat_rows(parts, H) if kept_any else None


def _old_row(old, b: int):
    """Row ``b`` of a per-head packed store, as :func:`arrange` reads it: the
    same flat buffers, its heads' segments only (a shallow copy)."""
    H = old.heads
    view = copy.copy(old)
    sl = slice(b * H, (b + 1) * H)
    view.offsets, view.lengths, view.caps = old.offsets[sl], old.lengths[sl], old.caps[sl]
    view._host_lengths, view._host_caps, view._real = old._host_lengths[sl], old._host_caps[sl], old._real[sl]
    view._rk, view._rv = old._rk[b : b + 1], old._rv[b : b + 1]  # batch 1 (nothing here reads them)
    view._r0, view._sinks_rows = old._row_sinks()[b], None  # the row's own sink block
    if old._choices is not None:
        # rows that chose apart: the row's own basis is the packing grid
        view.rotation = old.rotation if old.row_choice(b)[0] else None
        view._choices, view._rot_mask = [old._choices[b]], None
    return view


def _row_of(store: RaggedStore, b: int) -> RaggedStore:
    """Row ``b`` of a :class:`RaggedStore` as a store of its own (its heads'
    rows copied, slack included), with merge counts and carried scores."""
    H = store.heads
    sl = slice(b * H, (b + 1) * H)
    caps = store.caps[sl]
    head, t = segments(caps, int(store._host_caps[sl].sum()))
    src = store.offsets[sl][head] + t
    out = RaggedStore(_rows(store.k, src), _rows(store.v, src), torch.cumsum(caps, 0) - caps,
                      store.lengths[sl].clone(), caps.clone(), _rows(store.positions, src), 1, H)
    out.counts = None if store.counts is None else _rows(store.counts, src)
    out.scores = None if store.scores is None else _rows(store.scores, src)
    return out


def _cat_rows(parts: list, H: int) -> RaggedStore:
    """One-row :class:`RaggedStore` s as the rows of one batch, in order
    (merge counts 1 and scores NaN for a part without them, where another
    has them)."""
    shift, offsets = 0, []
    for p in parts:
        offsets.append(p.offsets + shift)
        shift += int(p.k.shape[0])
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    out = RaggedStore(cat("k"), cat("v"), torch.cat(offsets), cat("lengths"), cat("caps"), cat("positions"),
                      len(parts), H)
    for name, fill in (("counts", 1.0), ("scores", float("nan"))):
        if any(getattr(p, name) is not None for p in parts):
            setattr(out, name, torch.cat([p.k.new_full((int(p.k.shape[0]),), fill, dtype=torch.float32)
                                          if getattr(p, name) is None else getattr(p, name).float() for p in parts]))
    return out


def splice_rows(old: RaggedStore, new: RaggedStore, take_new: list[bool]) -> RaggedStore:
    """A batch whose row ``b`` is ``new``'s where ``take_new[b]``, else
    ``old``'s (its slots, merge counts and carried scores as they were)."""
    return pick_rows_of([(new if t else old, b) for b, t in enumerate(take_new)])


def pick_rows_of(sources: list) -> RaggedStore:
    """A batch whose row ``b`` is row ``i`` of store ``s`` for ``(s, i) =
    sources[b]`` (stores of one head count): its slots, merge counts and
    carried scores."""
    return _cat_rows([_row_of(s, i) for s, i in sources], sources[0][0].heads)


def _slack(kept: RaggedStore) -> int:
    """Free rows every head of ``kept`` has: the new layout gives each as many."""
    N = kept.batch * kept.heads
    return int((kept._host_caps - kept._host_lengths).min()) if N else 0


def _plan_c(old, kept, min_live, kd, vd, grid, lo, step):
    """The layout by ``ops.keep_rows_plan``: (take, dst, lengths, ph_base,
    ph_last, ph_keys), or None when refused."""
    from .. import ops

    D = int(kept.k.shape[1])
    return ops.keep_rows_plan(
        old.offsets, old.lengths, old.positions, old.counts_bias, old.counts_plain, kd, vd, lo.view(-1, D),
        step.view(-1, D), kept.offsets, kept.lengths, kept.positions, kept.counts, kept.k, kept.v, grid,
        group=old.group, bits=old.bits, min_live=int(min_live), sinks=int(old._r0),
        sinks_asked=int(old.sinks_asked), residual=int(old.residual), slack=_slack(kept))


def _plan_torch(old, kept, min_live, kd, vd, grid, lo, step):
    """The layout by tensor operations (any device): ``(plan, rest)``, the
    plan as :func:`_plan_c` gives it and ``rest`` int64 ``[N]`` the slots
    per head packed afresh; None when refused before the residual check."""
    G, dev = old.group, kept.k.device
    N, D = kept.batch * kept.heads, int(kept.k.shape[1])
    # ---- the old packed rows, a repeated slot's copies left out
    head_o, rows_o, first = old._packed_rows()
    rows_o, head_o = rows_o[first], head_o[first]
    pos_o = old.positions[rows_o].to(torch.int64)
    # ---- the kept slots (gathered once), matched to old packed rows by (head, position)
    total_n = int(kept._host_lengths.sum())
    head_n, t_n = segments(kept.lengths, total_n)
    rows_n = kept.offsets[head_n] + t_n
    k_n, v_n = _rows(kept.k, rows_n), _rows(kept.v, rows_n)
    pos_n = kept.positions[rows_n].to(torch.int64)
    count_n = kept.counts[rows_n]
    span = int(torch.maximum(pos_o.max(), pos_n.max() if total_n else pos_o.max())) + 1
    key_o, order = torch.sort(head_o * span + pos_o)
    key_n = head_n * span + pos_n
    at = torch.searchsorted(key_o, key_n).clamp_max(key_o.numel() - 1)
    matched = key_o[at] == key_n
    orow = rows_o[order[at]]  # the old packed row of each kept slot (garbage where not matched)
    same = (matched & (count_n == old.counts_bias[orow] / old.counts_plain[orow])
            & (k_n == _rows(kd, orow)).all(1) & (v_n == _rows(vd, orow)).all(1))
    # ---- groups that keep enough unchanged members, and their placeholders
    n_groups = int(old._kmin.shape[0])
    gid = torch.where(same, orow // G, torch.zeros_like(orow))
    live = torch.bincount(gid[same], minlength=n_groups)
    keep_g = live >= max(1, int(min_live))
    member = same & keep_g[gid]
    top = float((1 << old.bits) - 1)
    hi = lo + top * step
    cand = torch.nonzero(member).flatten()  # members so far (a group may still be dropped below)
    g_m = gid[cand]
    kr = _rows(grid, _rows(rows_n, cand))
    near = 0.25 * _rows(step, g_m).clamp_min(1e-30)
    # members at each end of their group's range, per channel
    ends = torch.zeros((2, n_groups, D), dtype=torch.float32, device=dev)
    ends[0].index_add_(0, g_m, ((kr - _rows(lo, g_m)).abs() <= near).float())
    ends[1].index_add_(0, g_m, ((kr - _rows(hi, g_m)).abs() <= near).float())
    need_lo, need_hi = ends[0] == 0, ends[1] == 0
    holes = G - live
    # one hole cannot hold a channel's minimum and its maximum both
    keep_g &= ~((holes == 1) & (need_lo & need_hi).any(1))
    member = same & keep_g[gid]
    if not bool(member.any()):
        return None
    # ---- the sink block: slots older than every old packed row that were not packed
    first = torch.full((N,), -1, dtype=torch.int64, device=dev)
    first.scatter_reduce_(0, head_o, pos_o, "amin", include_self=False)
    lead = ~member & ~matched & (pos_n < first[head_n])
    if bool((torch.bincount(head_n[lead], minlength=N) != int(old._r0)).any()):
        return None
    rest = ~member & ~lead
    # ---- the items of the new layout: kept slots, then one placeholder per hole of a kept group
    kept_ids = torch.nonzero(keep_g).flatten()
    g_rank = torch.zeros(n_groups, dtype=torch.int64, device=dev)
    g_rank[kept_ids] = torch.arange(kept_ids.numel(), device=dev)  # groups are in head, then row order
    # a member's slot inside its group: its old row's rank among the group's members
    idx_m = torch.nonzero(member).flatten()
    m_rows, g_mm = orow[idx_m], gid[idx_m]
    m_order = torch.sort(m_rows).indices
    live_k = live[kept_ids]
    m_slot = torch.empty_like(m_rows)
    m_slot[m_order] = torch.arange(m_rows.numel(), device=dev) - (torch.cumsum(live_k, 0) - live_k)[
        g_rank[g_mm[m_order]]]
    section = torch.where(lead, 0, torch.where(member, 1, 2))
    sub = torch.where(lead, t_n, pos_n)
    sub[idx_m] = g_rank[g_mm] * G + m_slot
    # placeholders: per kept group, G - live rows after its members
    holes_k = holes[kept_ids]
    n_ph = int(holes_k.sum())
    ph_g = torch.repeat_interleave(kept_ids, holes_k, output_size=n_ph)
    ph_i = segments(holes_k, n_ph)[1]
    # kept slot index of each kept group's first and last member (by old
    # row: members are sorted by it, so a group's run starts and ends there)
    ends_at = torch.cumsum(live_k, 0)
    base_of = idx_m[m_order[ends_at - live_k]]
    last_of = idx_m[m_order[ends_at - 1]]
    ph_rank = g_rank[ph_g]
    base, last = base_of[ph_rank], last_of[ph_rank]
    b = _rows(grid, _rows(rows_n, base))
    one = (holes_k == 1)[ph_rank]
    lo_p, hi_p, nl, nh = (_rows(x, ph_g) for x in (lo, hi, need_lo, need_hi))
    ph_k = torch.where((ph_i == 0)[:, None], torch.where(nl, lo_p, torch.where(one[:, None] & nh, hi_p, b)),
                       torch.where((ph_i == 1)[:, None] & nh, hi_p, b))
    ph_head = head_n[base]
    # ---- everything in its order: (head, section, place), flat per head
    big = 1 << 40
    order_key = torch.cat([head_n * 3 * big + section * big + sub,
                           ph_head * 3 * big + big + ph_rank * G + live[ph_g] + ph_i])
    heads = torch.cat([head_n, ph_head])
    order = torch.argsort(order_key)
    heads = heads[order]
    lengths = torch.bincount(heads, minlength=N)
    # rows are in head order: each item's row is its rank plus its head's slack before it
    dst = torch.empty_like(order)
    dst[order] = torch.arange(order.numel(), device=dev) + _slack(kept) * heads
    plan = (rows_n, dst, lengths, _rows(rows_n, base), _rows(rows_n, last), ph_k)
    return plan, torch.bincount(head_n[rest], minlength=N)


def _assemble(old, kept: RaggedStore, plan) -> RaggedStore:
    """The new :class:`RaggedStore` from a plan: ``take`` int64 ``[S]`` the
    kept store's row of each kept slot, ``dst`` ``[S + P]`` the new row of
    each kept slot and then of each placeholder, ``lengths`` ``[N]``, and
    per placeholder the kept rows it copies (``ph_base``: value;
    ``ph_last``: position) and its key on the packing grid (``ph_keys``
    float32 ``[P, D]``, rotated back here)."""
    take, dst, lengths, ph_base, ph_last, ph_k = plan
    dev = kept.k.device
    slack = _slack(kept)
    caps = lengths + slack
    offsets = torch.cumsum(caps, 0) - caps
    R = int(caps.sum())
    n_ph = int(ph_k.shape[0])
    if old.rotation is not None:
        ph_k = unrotate(ph_k, old.rotation, torch.float32)

    S = int(take.shape[0])
    d_kept, d_ph = dst[:S], dst[S:]

    def flat(x, ph, fill):
        out = x.new_full((R,) + tuple(x.shape[1:]), fill)
        out.index_copy_(0, d_kept, _rows(x, take))
        return out.index_copy_(0, d_ph, ph.to(x.dtype))

    out = RaggedStore(flat(kept.k, ph_k, 0), flat(kept.v, _rows(kept.v, ph_base), 0), offsets, lengths, caps,
                      flat(kept.positions, _rows(kept.positions, ph_last), 0), kept.batch, kept.heads)
    out.counts = flat(kept.counts.float(), torch.full((n_ph,), TINY, device=dev), 1.0)
    if kept.scores is not None:
        out.scores = flat(kept.scores.float(), torch.full((n_ph,), float("nan"), device=dev), 1.0)
    return out
