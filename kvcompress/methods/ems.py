"""EMS: evict-then-merge with global-local importance (our reading of arXiv 2412.08521)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import ops
from .base import LayerView, Method

_HEAD_BUDGETS = ("uniform", "adaptive")
_GLOBAL_MODES = ("exact", "probe")
_COMBINE = ("sum", "max")
_HEAD_ALLOC = ("selection", "window")


def _ordered_sum(x):
    """``x.sum(-1, keepdim=True)`` added from the first slot on (float64,
    then rounded; on the CPU one at a time): a left-padded row's leading
    zeros change nothing, so a row sums as it does alone. ``sum`` groups a
    row's slots by their place in its vector lanes, which the padding
    shifts (1 ulp apart, then a merged key or value 1e-7 apart)."""
    return torch.cumsum(x, -1, dtype=torch.float64)[..., -1:].to(x.dtype)


@dataclass
class EMS(Method):
    """EMS: keep the most important tokens per head, merge the similar rest into them.

    Per layer, after the prefill's attention (queries ``[B, Hq, T, D]``):

    1. Global score ``G_j``: mean causal attention token j receives from the
       queries after it (``ops.global_scores``; ``global_mode="probe"`` uses the
       last ``probe/2`` of the queries plus a strided sample of ``probe/2``).
       The mean (not the sum) removes the bias towards early tokens.
    2. Local score ``L_j``: mean attention from the last ``obs`` queries
       (``None``: the last ``window``).
    3. ``S = lam * G / sum(G) + (1 - lam) * L / sum(L)`` (``combine="sum"``)
       or ``max(lam * G / sum(G), (1 - lam) * L / sum(L))`` (``"max"``), the
       sums over the tokens that are neither sinks nor in the window.
    4. Per head keep the first ``sinks`` tokens, the last ``window``, then
       the **local picks**: ``local_share`` of the remaining budget goes to the
       tokens with the highest ``L`` max-pooled over ``local_kernel``
       neighbours, averaged over the layer's heads (``local_heads="layer"``,
       so every head keeps them) or per head (``"own"``); the rest of the
       budget goes to the top tokens by S (max-pooled over ``kernel`` when
       ``kernel > 1``). These are the class centers. Budgets are ``budget``
       per head (``head_budget="uniform"``) or shared across the layer's
       heads as in AdaKV (``"adaptive"``, floor ``alpha`` of the uniform share).
       ``head_alloc="selection"`` (default) allocates on the selection score
       with the local picks already forced, so the heads' budgets come out
       nearly equal (standard deviation 3 slots at budget 64 on SmolLM2,
       against AdaKV's 12); ``"window"`` allocates first, as AdaKV does, on
       the last ``window`` queries' pooled attention, then gives each head
       ``local_share`` of its own room in local picks. On both development
       texts (8 passages each, KL@16 at budgets 64 / 128) ``"window"`` was
       within noise of the default: +0.008 / +0.004 nats on Shakespeare,
       -0.028 / -0.010 on the licences, every interval across 0, so the
       default stays (benchmarks/RESULTS.md, "EMS's head allocation").
    5. Every other token goes to the center whose key is most cosine-similar,
       or to class 0 (evicted) when that similarity is below ``tau``
       (default 0.8; ``None``: each head's mean best similarity;
       ``float("inf")``: evict only). Values merge weighted by S, keys merge
       by direction and keep the center's norm (``ops.evict_merge``).
    6. With ``merge_bias`` a slot standing for c tokens adds ``log(c)`` to
       its attention logit, so a merged slot weighs like the tokens it replaced.

    Why the local picks (issue 19): the global score measures what later
    text attends to, which is what a language model predicts next (EMS has
    the lowest KL of our methods), but a question asks for a token the rest
    of the text ignored, such as a number hidden in filler; with S alone
    EMS answered 0 of 10 development single-needle cases at ratio 0.75 where
    SnapKV and TOVA answered 9. Development-seed ablations
    (``kvcompress eval --suite ruler --split dev``, SmolLM2, 1,000 tokens;
    benchmarks/RESULTS.md "EMS retrieval ablations"): ``local_share`` 0.5
    took the needle from 0 to 9/10 at 0.75 and beat ``combine="max"``
    (1/10), pooling S (``kernel=7``, 0/10), uniform heads and evict-only;
    at 0.9 only picks shared across the layer's heads from the **last**
    query (``local_heads="layer"``, ``obs=1``, as TOVA scores) kept the
    needle (4/8 vs 0/8); ``local_kernel=7`` keeps the whole number (kernel 1:
    5/8 at 0.75); ``local_share=0.75`` beat 0.5 on multi-key (3/8 vs 0/8);
    ``window=16`` beat 32 and 8 at ratio 0.5. Global only for S (``lam=1``),
    adaptive heads, merging with the log-count bias and the exact global
    score come from the earlier fidelity ablations (KL and passkey).

    Why ``tau=0.8`` (issue 19): the adaptive threshold (a head's mean best
    cosine, 0.54-0.85 with median 0.75 on SmolLM2, median 0.81 on Gemma 3's
    full layers) merges about half of the evicted tokens. On two
    development texts (the packaged Shakespeare and four licences other than
    the held-out GPL-3: MPL-2.0, GFDL-1.3, Apache-2.0, LGPL-2.1), 8 passages
    each, KL@16 at budgets 64 / 128, a fixed 0.8 was the only setting
    lower than adaptive on both: -0.028 / -0.006 nats on Shakespeare (lower
    on 6 / 5 of 8) and -0.062 / -0.034 on the licences (6 / 7 of 8);
    0.9, 0.95 and evict-only (``inf``) helped on the licences and hurt on
    Shakespeare (+0.04..+0.09). Retrieval does not hinge on it: evict-only
    and merging scored the same in the retrieval rounds.
    (benchmarks/RESULTS.md "EMS's merge threshold".)

    A compressed layer is stored per head (``[Σ n_h, D]`` plus counts), read
    by the C attention kernel.

    7. Decoding: every ``interval`` generated tokens (0: never) each head is
       brought back to the slots the prefill gave it. There is no global score
       for tokens scored without the whole prefill's queries, so the score of
       a held slot is ``lam * C / sum(C) + (1 - lam) * L / sum(L)`` with ``C``
       the score it was kept with (carried forward; a token appended since
       carries its own ``L``) and ``L`` the mean attention it received from
       the last ``min(obs or window, window, interval)`` queries (the layer
       holds ``[B, Hq, min(window, interval), D]`` of them). The same
       select-then-evict/merge runs on the held slots (no local picks: the
       carried score of a local pick is its S); values merge weighted by
       score times count, and counts add up, so a slot always knows how many
       tokens it stands for.
    8. A later prefill chunk on a layer that nothing was compressed in yet
       (the first turn fit the budget) brings no queries for the earlier
       slots: the global score is then the mean over the chunk's queries.
    9. ``lookahead=True`` (any method, see ``Method.lookahead``): the first
       compression waits for the first decode step, so the local picks come
       from the first generated token's query. The global score's sums are
       gathered chunk by chunk while waiting (``lookahead_statistic``), so the
       layer holds its last ``window`` queries, not the whole prefill's.
    10. ``lookahead_room=h`` (with ``lookahead=True``; ours, not the paper's)
       bounds the wait: a first prefill chunk that leaves a row more than
       ``h`` times its target is compressed at once by steps 1-6 to ``h``
       times the target, with the statistic of every query (the slots EMS
       without lookahead keeps at that budget). At the first decode step
       each head goes to its share of the target by step 7's re-compression,
       except that ``local_share`` of each head's room is first forced to the
       held tokens that step's query reads most (``L`` from the last ``obs``
       queries, laid out by token, max-pooled over ``local_kernel`` tokens
       and, with ``local_heads="layer"``, averaged over the row's heads by
       token, since the heads now hold different tokens): the local picks of
       step 4, from the first generated token's query. A prompt within ``h``
       times the target waits whole, as with ``lookahead`` alone.
    """

    window: int = 16
    sinks: int = 4
    lam: float = 1.0
    tau: float | None = 0.8
    head_budget: str = "adaptive"
    alpha: float = 0.2
    merge_bias: bool = True
    global_mode: str = "exact"
    probe: float = 0.1
    gqa: str = "mean"
    interval: int = 16
    kernel: int = 1
    combine: str = "sum"
    local_share: float = 0.75
    obs: int | None = 1
    local_heads: str = "layer"
    local_kernel: int = 7
    head_alloc: str = "selection"

    headwise = True
    merges = True
    rescores_lookahead = True

    def _check_fields(self) -> None:
        self._check_int("window", self.window, 1)
        self._check_int("sinks", self.sinks, 0)
        self._check_int("interval", self.interval, 0)
        self._check_int("kernel", self.kernel, 1)
        if self.obs is not None:
            self._check_int("obs", self.obs, 1)
        self._check_int("local_kernel", self.local_kernel, 1)
        for name in ("kernel", "local_kernel"):
            if getattr(self, name) % 2 == 0:
                raise ValueError(f"{name}: must be odd, got {getattr(self, name)}")
        for name, lo, hi in (("lam", 0.0, 1.0), ("alpha", 0.0, 1.0), ("probe", 0.0, 1.0), ("local_share", 0.0, 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
            if not lo <= float(v) <= hi:
                raise ValueError(f"{name}: must be in [{lo}, {hi}], got {v}")
        if self.probe == 0:
            raise ValueError("probe: must be > 0")
        if self.tau is not None:
            if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or math.isnan(self.tau):
                raise ValueError(f"tau: expected None (adaptive) or a number, got {self.tau!r}")
        if self.head_budget not in _HEAD_BUDGETS:
            raise ValueError(f"head_budget: expected one of {_HEAD_BUDGETS}, got {self.head_budget!r}")
        if self.global_mode not in _GLOBAL_MODES:
            raise ValueError(f"global_mode: expected one of {_GLOBAL_MODES}, got {self.global_mode!r}")
        if self.head_alloc not in _HEAD_ALLOC:
            raise ValueError(f"head_alloc: expected one of {_HEAD_ALLOC}, got {self.head_alloc!r}")
        if self.local_heads not in ("own", "layer"):
            raise ValueError(f"local_heads: expected 'own' or 'layer', got {self.local_heads!r}")
        if self.combine not in _COMBINE:
            raise ValueError(f"combine: expected one of {_COMBINE}, got {self.combine!r}")
        if self.gqa not in ("mean", "max"):
            raise ValueError(f"gqa: expected 'mean' or 'max', got {self.gqa!r}")
        if not isinstance(self.merge_bias, bool):
            raise TypeError(f"merge_bias: expected a bool, got {type(self.merge_bias).__name__}")

    def min_budget(self) -> int:
        return self.sinks + self.window

    def _forced_text(self) -> str:
        return f"sinks={self.sinks} + window={self.window}"

    @property
    def count_bias(self) -> bool:
        return self.merge_bias

    def forced(self, view: LayerView, keep: int) -> tuple[int, int]:
        w = min(self.window, int(view.queries.shape[2]), view.length, keep)
        return min(self.sinks, keep - w), w

    def score(self, view: LayerView):
        """``[B, Hkv, T]`` float32 combined score S (sinks and window included, unnormalised there)."""
        return self._combine(*self._parts(view))

    def _parts(self, view: LayerView):
        """``(G, L, candidates)``: global and local scores ``[B, Hkv, T]`` and
        the ``[B, 1, T]`` mask of slots they are normalised over."""
        T = view.length
        q = view.queries
        if view.statistic is not None:
            # lookahead: sums and counts gathered over the queries of the
            # held chunks and of the first decode step
            G = view.statistic[:, :-1] / view.statistic[:, -1:].clamp_min(1.0)
            Hkv = int(view.keys.shape[1])
            if G.shape[1] != Hkv:  # gqa="max": per query head, the largest of each group
                G = G.view(G.shape[0], Hkv, -1, T).amax(2)
        else:
            # a later prefill chunk on a layer nothing was compressed in yet
            # (the first turn fit the budget) has only the queries at hand
            whole = q.shape[2] == T
            G = ops.global_scores(q, view.keys, scaling=view.scaling, gqa=self.gqa, kv_start=view.kv_start,
                                  q_pos=None if whole else torch.arange(T - q.shape[2], T, device=view.keys.device),
                                  probe=float(self.probe) if self.global_mode == "probe" and whole else None)
        w = min(self.window, T)
        o = min(self.obs or self.window, T)
        L = ops.window_scores(q[:, :, -o:], view.keys, scaling=view.scaling, gqa=self.gqa, kv_start=view.kv_start)
        return G, L, self._candidates(view.kv_start, T, self.sinks, w)

    def _combine(self, G, L, cand):
        """``lam * G / sum(G) + (1 - lam) * L / sum(L)`` (``combine="max"``: the
        larger of the two terms), the sums over ``cand``."""
        lam = float(self.lam)
        G = G / _ordered_sum(G * cand).clamp_min(1e-30)
        L = L / _ordered_sum(L * cand).clamp_min(1e-30)
        if self.combine == "max":
            return torch.maximum(lam * G, (1.0 - lam) * L)
        return lam * G + (1.0 - lam) * L

    @staticmethod
    def _candidates(start, T: int, sinks: int, w: int):
        """``[R, 1, T]`` True for valid slots (at or after ``start`` ``[R]``)
        that are neither among the first ``sinks`` nor the last ``w``."""
        j = torch.arange(T, device=start.device)
        return ((j >= start[:, None] + sinks) & (j < T - w))[:, None]

    def held_queries(self) -> int:
        """Latest queries a layer keeps for decode-time re-compression."""
        return min(self.window, self.interval)

    def deferred_queries(self) -> int | None:
        # lookahead with the exact global score: the statistic stands for
        # every query, and the window, the local picks and the decode-time
        # re-scoring read at most the last `window`
        return self.window if self.global_mode == "exact" else None

    def lookahead_statistic(self, view: LayerView, previous):
        """``[B, Hkv + 1, T]`` float32 (``gqa="max"``: ``[B, Hq + 1, T]``, as
        the group's largest mean is taken at the end): for each slot, the sum
        over the chunk's queries (and ``previous`` chunks') of the attention
        they give it, averaged over the GQA group (``global_scores`` of the
        chunk, a mean over the ``T - max(j, T - q)`` chunk queries that see
        slot j, times that count), and in the last row that count. ``_parts``
        divides the two: the global score over every query held, which is
        every query of the layer unless an earlier chunk went uncompressed
        (then, as without lookahead, the queries since). None with
        ``global_mode="probe"`` (its sample is drawn from the whole prefill,
        so every query is held instead)."""
        if self.global_mode != "exact":
            return None
        T, q = view.length, int(view.queries.shape[2])
        pos = torch.arange(T - q, T, device=view.keys.device)
        keys = view.keys
        if self.gqa == "max":  # each query head on its own: a copy of the keys per query head, for this call
            keys = keys.repeat_interleave(int(view.queries.shape[1]) // int(keys.shape[1]), 1)
        mean = ops.global_scores(view.queries, keys, scaling=view.scaling, gqa="mean", kv_start=view.kv_start,
                                 q_pos=pos)
        j = torch.arange(T, device=view.keys.device)
        count = (T - torch.clamp(j, min=T - q)).float()
        total = torch.cat([mean * count, count.expand(mean.shape[0], 1, T)], 1)
        if previous is not None:
            total[..., : previous.shape[-1]] += previous
        return total

    def compact(self, view: LayerView, keep: int):
        sinks, w = self.forced(view, keep)
        G, L, cand = self._parts(view)
        scores = self._combine(G, L, cand)
        head = view.length - w
        ranked = self._pooled(scores, head)  # selection score: S max-pooled over neighbours when kernel > 1
        valid = (view.length - view.kv_start).clamp_min(1)  # real tokens per row
        if self.head_budget == "adaptive" and self.head_alloc == "window":
            k = torch.minimum(self._window_budgets(view, cand, head, keep, sinks + w), valid[:, None])
            chosen = self._local_picks(ranked, L, cand, head, k - sinks - w)
        else:
            room = torch.full(scores.shape[:2], keep - sinks - w, dtype=torch.int64, device=scores.device)
            chosen = self._local_picks(ranked, L, cand, head, room)
            if self.head_budget == "adaptive":
                forced = chosen.clone()
                forced[..., head:] = float("inf")
                k = ops.head_budgets(forced, keep, alpha=float(self.alpha), floor=sinks + w,
                                     kv_start=view.kv_start)
            else:
                k = torch.full(scores.shape[:2], keep, dtype=torch.int64, device=scores.device)
            k = torch.minimum(k, valid[:, None])  # a padded slot is never a center
        centers = ops.select_topk(chosen, k, sinks=sinks, window=w, kv_start=view.kv_start)
        # merge weights are each token's own S, not the pooled one
        merged = ops.evict_merge(view.keys, view.values, scores, centers, self._tau(), kv_start=view.kv_start)
        return centers, merged, ranked.gather(2, centers.clamp_min(0))

    def _window_budgets(self, view: LayerView, cand, head: int, keep: int, floor: int):
        """``[B, H]`` int64 AdaKV allocation (``head_alloc="window"``): from
        the mean attention of the last ``window`` queries, max-pooled over
        ``local_kernel``, before any local pick is forced (forcing the layer's
        local picks first leaves few slots to share, so heads get nearly
        equal budgets)."""
        w = view.length - head
        A = ops.window_scores(view.queries[:, :, -w:], view.keys, scaling=view.scaling, gqa=self.gqa,
                              kv_start=view.kv_start)
        # sinks and window are kept in every head: counted first (padding is never selectable)
        A = self._pooled(A.masked_fill(~cand, 0.0), head, self.local_kernel).masked_fill(~cand, float("inf"))
        return ops.head_budgets(A, keep, alpha=float(self.alpha), floor=floor, kv_start=view.kv_start)

    def _local_picks(self, ranked, L, cand, head: int, room):
        """``ranked`` with each head's first ``local_share * room[b, h]``
        local picks (``room`` ``[B, H]``: slots past sinks and window; at
        most the fewest candidates of any row) set to ``+inf``: the layer's
        (or the head's) ranking of ``L`` max-pooled over ``local_kernel``,
        candidates only. The tokens the last ``obs`` queries read most are
        kept whatever their global score; sinks are zeroed before pooling,
        so their large attention does not pick their neighbours."""
        if head <= 0:
            return ranked
        local = self._pooled(L.masked_fill(~cand, 0.0), head, self.local_kernel)[..., :head]
        if self.local_heads == "layer":  # every head keeps what the layer's window reads
            local = local.mean(1, keepdim=True).expand_as(local)
        limit = cand[..., :head].sum(-1).min()
        return self._force(ranked, local.masked_fill(~cand[..., :head], float("-inf")), room, limit)

    def _force(self, ranked, local, room, limit):
        """``ranked`` with the ``local_share * room`` best of ``local``
        ``[R, H, head]`` (-inf: not a candidate) in each row and head set to
        ``+inf``, at most ``limit`` of them (a tensor broadcast over
        ``room``)."""
        m = (float(self.local_share) * room.clamp_min(0).double()).floor().long()
        m = torch.minimum(m, limit.to(m.device).long())
        top = int(m.max())
        if top <= 0:
            return ranked
        # [R, H, top], best first. Max-pooling repeats a value over neighbours, so
        # ties are common: a stable sort takes the lowest-indexed, on every
        # device (topk's pick among ties differs between CPU and CUDA)
        idx = local.sort(dim=-1, descending=True, stable=True).indices[..., :top]
        take = torch.arange(top, device=idx.device) < m[..., None]
        chosen = ranked.clone()
        chosen.scatter_(2, idx, torch.where(take, float("inf"), ranked.gather(2, idx)))
        return chosen

    def _local_by_token(self, L, cand, head: int, pos, heads: int):
        """``[N, 1, head]`` local ranking of held slots whose heads keep
        different tokens (``lookahead_room``'s re-compression; rows are the
        ``heads`` heads of each batch row in turn, ``pos`` ``[N, M]`` the
        token of each slot): each head's ``L`` laid out by token, max-pooled
        over ``local_kernel`` neighbouring tokens, averaged over the row's
        heads by token (``local_heads="layer"``; a head that does not hold a
        token adds 0, as a zeroed sink does), then read back at each slot's
        token. -inf: not a candidate."""
        N = int(L.shape[0])
        pos = pos.clamp_min(0).long()
        P = int(pos.max()) + 1
        grid = L.new_zeros((N, P)).scatter_add_(1, pos, L[:, 0].masked_fill(~cand[:, 0], 0.0))
        grid = grid.view(N // heads, heads, P)
        if self.local_kernel > 1:
            grid = ops.pool1d(grid.contiguous(), self.local_kernel, mode="max")
        if self.local_heads == "layer":
            grid = grid.mean(1, keepdim=True).expand(-1, heads, -1)
        local = grid.reshape(N, P).gather(1, pos)[:, None, :head]
        return local.masked_fill(~cand[..., :head], float("-inf"))

    def _pooled(self, scores, head: int, kernel: int | None = None):
        """``scores`` max-pooled over ``kernel`` (default: ``self.kernel``)
        neighbours in the first ``head`` slots."""
        kernel = self.kernel if kernel is None else kernel
        if kernel <= 1 or head <= 0:
            return scores
        out = scores.clone()
        out[..., :head] = ops.pool1d(scores[..., :head], kernel, mode="max")
        return out

    def _tau(self):
        return None if self.tau is None else float(self.tau)

    def recompact(self, queries, keys, values, counts, carried, start, budgets, scaling, local=None):
        """Decode-time re-compression of held slots (step 7), one row per head.

        Shapes: ``queries [N, G, q, D]`` (the latest queries of the row's
        ``G`` query heads, sitting at its last ``q`` slots), ``keys``/``values``
        ``[N, 1, M, D]`` left-padded by ``start [N]``, ``counts``/``carried``
        ``[N, M]`` float32 (carried NaN: not scored yet), ``budgets [N, 1]``
        int64. ``local=(positions [N, M], heads)``: the first decode step
        after a ``lookahead_room`` compression, which also forces each head's
        ``local_share`` of its room to the slots the newest query reads most
        (:meth:`_local_by_token`), as a prefill compression does with its
        last query. Returns ``(centers [N, 1, C], EvictMergeResult whose
        counts are tokens represented, carried scores [N, 1, C])``.
        """
        M = int(keys.shape[2])
        if self.obs:
            queries = queries[:, :, -self.obs:]
        L = ops.window_scores(queries, keys, scaling=scaling, gqa=self.gqa, kv_start=start)
        w = max(1, min(self.window, int(budgets.min())))
        sinks = min(self.sinks, max(0, int(budgets.min()) - w))
        C = torch.where(torch.isnan(carried[:, None]), L, carried[:, None])
        cand = self._candidates(start, M, sinks, w)
        S = self._combine(C, L, cand)
        chosen = S
        if local is not None and M - w > 0:
            ranking = self._local_by_token(L, cand, M - w, *local)
            chosen = self._force(S, ranking, budgets - sinks - w, cand[..., : M - w].sum(-1))
        centers = ops.select_topk(chosen, budgets, sinks=sinks, window=w, kv_start=start)
        merged = ops.evict_merge(keys, values, S * counts[:, None], centers, self._tau(), kv_start=start,
                                 return_assign=True)
        # a merged slot stands for every token its members stood for
        members = merged.assign > 0
        slot = (merged.assign - 1).clamp_min(0)
        total = torch.zeros_like(merged.counts).scatter_add_(2, slot, counts[:, None] * members)
        return centers, merged._replace(counts=total), S.gather(2, centers.clamp_min(0))
