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
the residual packs everything again, as before.
"""

from __future__ import annotations

import torch

from .ragged import RaggedStore, segments
from .rotation import rotate, unrotate

#: a placeholder row's merge count (log: -85.2; float32's smallest normal is 1.2e-38)
TINY = 1e-37
#: merge counts below this mark placeholder rows
TINY_BELOW = 1e-30


def is_placeholder(counts: torch.Tensor) -> torch.Tensor:
    """Which of ``counts`` mark placeholder rows."""
    return counts < TINY_BELOW


def arrange(old, kept: RaggedStore, min_live: int) -> RaggedStore | None:
    """The round's kept slots ``kept`` (a :class:`RaggedStore` with merge
    counts, what the method returned from ``old.unpacked()``) laid out for
    ``RaggedPackedStore.from_ragged(columns=True)`` so that every key group
    of ``old`` (a :class:`~kvcompress.stores.RaggedPackedStore` with
    positions) that keeps at least ``min_live`` unchanged members is packed
    again in place, its other rows placeholders. An unchanged member is a
    slot held at the same position with the same merge count and bit for bit
    the keys and values it was read back with. Per head: the sink block,
    the kept groups in their old order, then every other slot by position.
    None when no group is kept or the layout would change the store's sink
    block or residual (then the round packs everything again)."""
    from .packed_ragged import _recent_kept

    if kept.counts is None or old.positions is None or not old.packed_any():
        return None
    G, dev = old.group, kept.k.device
    N, D = kept.batch * kept.heads, int(kept.k.shape[1])
    # ---- the old packed rows, a repeated slot's copies left out
    total_o = int(old._host_lengths.sum())
    head_o, t_o = segments(old.lengths, total_o)
    rows_o = old.offsets[head_o] + t_o
    pos_o = old.positions[rows_o].to(torch.int64)
    copy = torch.zeros_like(t_o, dtype=torch.bool)
    copy[1:] = (t_o[1:] > 0) & (pos_o[1:] == pos_o[:-1])
    rows_o, head_o, pos_o = rows_o[~copy], head_o[~copy], pos_o[~copy]
    count_o = (old.counts_bias / old.counts_plain)[rows_o]
    kd, vd = old._dequantized_rows()
    # ---- the kept slots, matched to old packed rows by (head, position)
    total_n = int(kept._host_lengths.sum())
    head_n, t_n = segments(kept.lengths, total_n)
    rows_n = kept.offsets[head_n] + t_n
    pos_n = kept.positions[rows_n].to(torch.int64)
    count_n = kept.counts[rows_n]
    span = int(torch.maximum(pos_o.max(), pos_n.max() if total_n else pos_o.max())) + 1
    key_o, order = torch.sort(head_o * span + pos_o)
    key_n = head_n * span + pos_n
    at = torch.searchsorted(key_o, key_n).clamp_max(key_o.numel() - 1)
    matched = key_o[at] == key_n
    orow = rows_o[order[at]]  # the old packed row of each kept slot (garbage where not matched)
    same = (matched & (count_n == count_o[order[at]]) & (kept.k[rows_n] == kd[orow]).all(1)
            & (kept.v[rows_n] == vd[orow]).all(1))
    # ---- groups that keep enough unchanged members, and their placeholders
    n_groups = int(old._kmin.shape[0])
    gid = torch.where(same, orow // G, torch.zeros_like(orow))
    live = torch.bincount(gid[same], minlength=n_groups)
    keep_g = live >= max(1, int(min_live))
    member = same & keep_g[gid]
    top = float((1 << old.bits) - 1)
    lo, step = old._kmin.float(), old._ksc.float()
    hi = lo + top * step
    kr = kept.k[rows_n[member]].float()
    if old.rotation is not None:
        kr = rotate(kr, old.rotation, torch.float32)
    g_m = gid[member]
    near = 0.25 * step[g_m].clamp_min(1e-30)
    reach_lo = torch.zeros((n_groups, D), dtype=torch.float32, device=dev)
    reach_hi = torch.zeros((n_groups, D), dtype=torch.float32, device=dev)
    reach_lo.index_add_(0, g_m, ((kr - lo[g_m]).abs() <= near).float())  # members at each end, per channel
    reach_hi.index_add_(0, g_m, ((kr - hi[g_m]).abs() <= near).float())
    need_lo, need_hi = reach_lo == 0, reach_hi == 0
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
    m_rows = orow[member]
    m_order = torch.argsort(m_rows)
    m_slot = torch.empty_like(m_rows)
    rank_in = torch.arange(m_rows.numel(), device=dev) - (torch.cumsum(live[keep_g], 0) - live[keep_g])[
        g_rank[gid[member][m_order]]]
    m_slot[m_order] = rank_in
    section = torch.where(lead, 0, torch.where(member, 1, 2))
    sub = torch.where(lead, t_n, pos_n)
    sub[member] = g_rank[gid[member]] * G + m_slot
    # placeholders: per kept group, G - live rows after its members
    ph_g = torch.repeat_interleave(kept_ids, holes[kept_ids])
    ph_i = segments(holes[kept_ids], int(holes[kept_ids].sum()))[1]
    # each kept group's first member (lowest old row) and last member
    first_m = torch.full((n_groups,), 1 << 62, dtype=torch.int64, device=dev)
    first_m.scatter_reduce_(0, gid[member], m_rows, "amin")
    last_row = torch.full((n_groups,), -1, dtype=torch.int64, device=dev)
    last_row.scatter_reduce_(0, gid[member], m_rows, "amax")
    # kept slot index of each group's first and last member (by old row)
    slot_of_row = torch.full((int(old._kc.shape[0]),), -1, dtype=torch.int64, device=dev)
    slot_of_row[m_rows] = torch.nonzero(member).flatten()
    base = slot_of_row[first_m[ph_g]]
    last = slot_of_row[last_row[ph_g]]
    b = kept.k[rows_n[base]].float()
    if old.rotation is not None:
        b = rotate(b, old.rotation, torch.float32)
    one = holes[ph_g] == 1
    lo_p, hi_p, nl, nh = lo[ph_g], hi[ph_g], need_lo[ph_g], need_hi[ph_g]
    ph_k = torch.where((ph_i == 0)[:, None], torch.where(nl, lo_p, torch.where(one[:, None] & nh, hi_p, b)),
                       torch.where((ph_i == 1)[:, None] & nh, hi_p, b))
    if old.rotation is not None:
        ph_k = unrotate(ph_k, old.rotation, torch.float32)
    ph_head = head_n[base]
    # ---- everything in its order: (head, section, place), then dense per head
    big = 1 << 40
    order_key = torch.cat([head_n * 3 * big + section * big + sub,
                           ph_head * 3 * big + big + g_rank[ph_g] * G + live[ph_g] + ph_i])
    ks = torch.cat([kept.k[rows_n], ph_k.to(kept.k.dtype)])
    vs = torch.cat([kept.v[rows_n], kept.v[rows_n[base]]])
    ps = torch.cat([kept.positions[rows_n], kept.positions[rows_n[last]]])
    cs = torch.cat([count_n, torch.full((ph_g.numel(),), TINY, device=dev)])
    ss = None
    if kept.scores is not None:
        ss = torch.cat([kept.scores[rows_n], torch.full((ph_g.numel(),), float("nan"), device=dev)])
    heads = torch.cat([head_n, ph_head])
    order = torch.argsort(order_key)
    heads = heads[order]
    lengths = torch.bincount(heads, minlength=N)
    M = int(lengths.max()) if N else 0
    within = torch.arange(heads.numel(), device=dev) - (torch.cumsum(lengths, 0) - lengths)[heads]
    B, H = kept.batch, kept.heads
    dense = lambda x, fill: x.new_full((N * M,) + tuple(x.shape[1:]), fill).index_copy_(  # noqa: E731
        0, heads * M + within, x[order]).view(B, H, M, *x.shape[1:])
    valid = torch.zeros(N * M, dtype=torch.bool, device=dev)
    valid[heads * M + within] = True
    slack = int((kept._host_caps - kept._host_lengths).min()) if N else 0
    out = RaggedStore.from_dense(dense(ks, 0), dense(vs, 0), dense(ps, 0), valid.view(B, H, M),
                                 counts=dense(cs, 1.0), scores=None if ss is None else dense(ss, float("nan")),
                                 slack=slack)
    # from_ragged's sink block and residual must be the ones laid out here
    r = _recent_kept(out, old.residual)
    n_min = int(out._host_lengths.min()) if N else 0
    s = max(0, min(int(old.sinks_asked), n_min - r))
    if s != int(old._r0) or bool((torch.bincount(head_n[rest], minlength=N) < r).any()):
        return None
    return out
