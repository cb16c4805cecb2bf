"""Per-layer budgets decided from the whole prefill: DynamicKV and SqueezeAttention.

Both give each layer its own number of slots (the model keeps
``L * H * budget`` in all, up to rounding) from what every layer did with
the prompt, and SnapKV's selection then keeps each layer's slots. They use
one mechanism of the cache (``Method.defers_prefill``): no layer is
compressed until the last layer has attended over the prompt (and, for
SqueezeAttention, reported its hidden states); each layer's
``layer_statistic`` / ``hidden_statistic`` is gathered on the way and
``layer_targets`` answers every layer's slots at once. Peak memory during
the prefill is therefore the full prompt cache (as with transformers' own
cache), plus each layer's last ``window`` queries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import ops
from .base import LayerView
from .window import SnapKV


def apportion(want: list[float], total: int, lo: int, hi: int) -> list[int]:
    """Integers near ``want`` that sum to ``total``, each in ``[lo, hi]``.

    Values outside the bounds are clamped and the difference spread over the
    others in proportion to their values (repeated until nothing moves);
    the fractional parts are then rounded by largest remainder, ties to the
    lower index. Needs ``n * lo <= total <= n * hi``.
    """
    n = len(want)
    x = [min(max(float(w), lo), hi) for w in want]
    for _ in range(n + 1):
        diff = total - sum(x)
        if abs(diff) < 1e-9:
            break
        free = [i for i in range(n) if (x[i] < hi if diff > 0 else x[i] > lo)]
        if not free:
            break
        weight = sum(x[i] for i in free)
        for i in free:
            share = x[i] / weight if weight > 0 else 1.0 / len(free)
            x[i] = min(max(x[i] + diff * share, lo), hi)
    base = [min(hi, max(lo, int(math.floor(v + 1e-9)))) for v in x]
    rest = total - sum(base)
    order = sorted(range(n), key=lambda i: (-(x[i] - base[i]), i))
    for i in order:
        if rest == 0:
            break
        if rest > 0 and base[i] < hi:
            base[i] += 1
            rest -= 1
        elif rest < 0 and base[i] > lo:
            base[i] -= 1
            rest += 1
    return base


@dataclass
class _LayerBudgets(SnapKV):
    """Shared base: SnapKV's scores and selection, per-layer targets decided
    after the whole prefill (``defers_prefill``). Budgets are per batch row:
    each row's layers share ``L * budget`` by that row's own statistics, so
    a row gives what it gives alone."""

    defers_prefill = True

    def _means(self, seen: list[int], num_layers: int) -> list[int]:
        """Each row's mean target per layer (the uniform budget)."""
        return [self.row_target(0, num_layers, s) for s in seen]

    def layer_targets(self, stats, hidden, seen, sliding):
        # Only the full-attention layers share the budget: a sliding layer
        # keeps its most recent slots whatever it is given, so slots moved to
        # it would be lost and the full layers left short (Gemma 3 270M: 15
        # of 18 layers slide). Sliding layers are given the mean, as SnapKV
        # gives them.
        L = len(sliding)
        full = [j for j in range(L) if not sliding[j]]
        if not full:
            return None
        sub = self._full_targets([stats[j] for j in full], None if hidden is None else [hidden[j] for j in full],
                                 seen)
        if sub is None:
            return None
        means = self._means(seen, L)
        out = [list(means) for _ in range(L)]
        for n, j in enumerate(full):
            out[j] = sub[n]
        return out

    def _full_targets(self, stats, hidden, seen) -> list[list[int]] | None:
        """Slots ``[layer][row]`` of the full-attention layers alone (in model
        order), which share ``len(layers) * mean`` per row."""
        raise NotImplementedError


@dataclass
class DynamicKV(_LayerBudgets):
    """DynamicKV: layers' budgets follow how much of the window's attention
    mass their best tokens hold, refreshed every few layers.

    Paper (Zhou et al., "DynamicKV: Task-Aware Adaptive KV Cache Compression
    for Long Context LLMs", arXiv 2412.14838): with budget ``bs`` per layer
    and a per-layer maximum ``r_max * bs``, each layer scores its prompt
    tokens by the attention of the last window queries (pooled, as SnapKV)
    and temporarily keeps its top ``r_max * bs`` candidates; every ``m``
    layers the candidates of all layers so far are pooled, a global top-k
    (``k`` = the budget of those layers together) counts how many each layer
    holds, and those counts, normalised to the total budget, become the
    layers' budgets: earlier layers are cut again.

    Our reading and choices:

    * **scores**: SnapKV's (``window`` last queries, GQA ``gqa``, pooled with
      ``kernel``), the very scores each layer then selects with, so a layer's
      kept slots are SnapKV's at that layer's budget;
    * **candidates** of layer l, row b: per kv head its top
      ``c = min(ceil(r_max * s_b), prefix_b)`` scores over the slots before
      the window (the window is always kept and is not pooled), ``s_b =
      target_b - window`` the selectable budget per head and ``prefix_b``
      the row's real tokens before the window; the layer offers ``H * c``
      candidates (all heads pooled: a layer's budget is one number, its
      heads keep the same count);
    * **refresh** every ``refresh`` layers (after layers ``refresh - 1``,
      ``2 refresh - 1``, ... and after the last): the pooled top-k over
      layers ``0..l`` with ``k = (l + 1) * H * s_b`` (``ops.pooled_counts``,
      ties to the lower layer) gives each layer's count ``n_j``; a layer
      offers only its ``n_j`` best candidates at the next refresh, so a
      layer that was cut is never given more (the paper's earlier layers
      are cut again, never regrown: their slots are gone). The counts at
      the last refresh sum to ``L * H * s_b``;
    * **budgets**: layer j keeps ``window + n_j / H`` slots per head, rounded
      by largest remainder so the model keeps exactly ``L * target_b`` per
      head (``apportion``); each layer keeps at least the window (SnapKV's
      ``min_budget``) and at most the row's tokens;
    * because our cache compresses after the last layer has attended (not
      layer by layer), the refresh schedule is replayed there with the same
      arithmetic; the paper's lower peak memory during prefill is not
      reproduced (we hold the full prompt cache until then);
    * budgets are per batch row; decoding keeps each layer's share of the
      row's target (``CompressedLayer._targets``);
    * **hybrid models** (Gemma 2/3): only the full-attention layers take
      part (candidates, refreshes counted over them, the ``n_full * target``
      they share); a sliding layer keeps its recent slots whatever it is
      given, so budget moved to it would be lost. It keeps the mean target
      (within its window), as under SnapKV;
    * **r_max** and **refresh** defaults (2.0 and 4) are our choices: the
      values the paper used could not be confirmed from its text here.

    Parameters
    ----------
    budget, ratio, window, kernel, pool, gqa
        As ``SnapKV``; ``budget`` is the mean per layer.
    r_max : float >= 1
        A layer's candidates per head, as a multiple of the selectable budget.
    refresh : int >= 1
        Layers between two refreshes of the budgets (the paper's ``m``).
    """

    r_max: float = 2.0
    refresh: int = 4

    def _check_fields(self) -> None:
        super()._check_fields()
        self._check_float("r_max", self.r_max, at_least=1.0)
        self._check_int("refresh", self.refresh, 1)

    def layer_statistic(self, view: LayerView):
        """``(scores [B, H, c] float32 descending, -inf padded, c_b [B])``:
        per kv head the row's candidate scores (see the class docstring);
        ``c_b = 0`` for a row kept whole."""
        B, H, n = (int(x) for x in view.keys.shape[:3])
        w = self._window(view)
        start = [0] * B if view.kv_start is None else [int(s) for s in view.kv_start.tolist()]
        c = []
        for b in range(B):
            real = n - start[b]
            mean = self.row_target(view.layer_idx, view.num_layers, real)
            prefix = max(0, real - w)
            c.append(0 if mean >= real or prefix == 0 else min(prefix, math.ceil(self.r_max * max(0, mean - w))))
        cmax = max(c)
        if cmax == 0:
            return torch.full((B, H, 0), float("-inf")), c
        scores = self.score(view)[..., : n - w].contiguous()
        keep = torch.tensor([[max(1, cb)] * H for cb in c], dtype=torch.int64, device=scores.device)
        # the candidates end before the window: a row whose padding reaches past them (fewer real
        # tokens than the window, kept whole, c_b = 0) has none
        start = None if view.kv_start is None else view.kv_start.clamp(max=n - w)
        idx = ops.select_topk(scores, keep, kv_start=start)  # [B, H, cmax], -1 padded
        vals = scores.gather(2, idx.clamp_min(0))
        vals = vals.masked_fill(idx < 0, float("-inf"))
        vals[torch.tensor(c, device=vals.device) == 0] = float("-inf")
        return vals.sort(dim=2, descending=True).values.cpu(), c

    def _full_targets(self, stats, hidden, seen):
        L = len(stats)
        B = len(seen)
        means = self._means(seen, L)
        H = int(stats[0][0].shape[1])
        # flatten each layer's candidates over heads, best first: [B, L, H * cmax]
        M = max(int(s[0].shape[1]) * int(s[0].shape[2]) for s in stats)
        if M == 0:
            return None
        cand = torch.full((B, L, M), float("-inf"))
        for j, (vals, _) in enumerate(stats):
            flat = vals.reshape(B, -1)
            cand[:, j, : flat.shape[1]] = flat.sort(dim=1, descending=True).values
        sel = [max(0, m - self.window) for m in means]  # selectable budget per head
        offered = torch.tensor([[int(stats[j][1][b]) * H for j in range(L)] for b in range(B)], dtype=torch.int64)
        ranks = torch.arange(M)[None, None, :]
        ends = sorted({min(L, r) for r in range(self.refresh, L + self.refresh, self.refresh)} | {L})
        for end in ends:
            pool = cand[:, :end].masked_fill(ranks >= offered[:, :end, None], float("-inf"))
            k = torch.tensor([min(end * H * sel[b], int(offered[b, :end].sum())) for b in range(B)],
                             dtype=torch.int64)
            offered[:, :end] = ops.pooled_counts(pool, k)
        targets = [[0] * B for _ in range(L)]
        for b in range(B):
            if means[b] >= seen[b]:
                for j in range(L):
                    targets[j][b] = seen[b]
                continue
            want = [self.window + float(offered[b, j]) / H for j in range(L)]
            got = apportion(want, L * means[b], min(self.window, means[b]), seen[b])
            for j in range(L):
                targets[j][b] = got[j]
        return targets


def kmeans_1d(values: list[float], k: int = 3, iters: int = 100) -> list[int]:
    """Cluster of each value by Lloyd's k-means in float64 (one dimension).

    Deterministic start: the centroids are the sorted values at ranks
    ``floor((2i + 1) n / (2k))`` (the 1/6, 1/2 and 5/6 quantiles for k = 3);
    a value joins the nearest centroid (ties to the lower cluster); an empty
    cluster keeps its centroid; stops when no assignment changes.
    """
    n = len(values)
    order = sorted(values)
    cent = [float(order[min(n - 1, (2 * i + 1) * n // (2 * k))]) for i in range(k)]
    assign = [-1] * n
    for _ in range(iters):
        new = [min(range(k), key=lambda c: (abs(v - cent[c]), c)) for v in values]
        if new == assign:
            break
        assign = new
        for c in range(k):
            members = [v for v, a in zip(values, assign) if a == c]
            if members:
                cent[c] = math.fsum(members) / len(members)
    return assign


@dataclass
class SqueezeAttention(_LayerBudgets):
    """SqueezeAttention: layers whose attention changes the hidden states
    least keep fewer slots; the others share what they free.

    Paper (Wang et al., "SqueezeAttention: 2D Management of KV-Cache in LLM
    Inference via Layer-wise Optimal Budget", arXiv 2404.04793): a layer's
    importance is the cosine similarity of the prompt's hidden states before
    and after its self-attention (high similarity: attention inserted
    little); the layers are clustered by it (k-means, 3 groups), the group
    with the highest similarity gets ``p * b_init`` slots per layer, the
    freed slots go evenly to the other layers, and a sequence-wise method
    (the paper pairs it with StreamingLLM, H2O and a sliding window) evicts
    within each layer's budget.

    Our reading and choices:

    * **similarity** of layer l, row b: the mean over the row's real prompt
      tokens of ``cos(x_t, x_t + a_t)``, ``x_t`` the decoder layer's input
      (the residual stream) and ``a_t`` its attention module's output
      (``ops.row_cosine``, float32; the mean in float64). For models with a
      norm after attention (Gemma) ``a_t`` is the attention's output before
      that norm. The authors' code (hetailang/SqueezeAttention,
      ``Longbench/utils_hh/modify_llama.py``) computes the same per-token
      cosine (the decoder layer's input against input + attention output,
      prefill tokens only);
    * **clustering**: ``kmeans_1d`` (3 clusters, float64, deterministic
      quantile start; see there) of the L similarities of the row; the
      cluster with the highest centroid is cut, the other two form the
      paper's other group. Fewer than 3 layers, or all layers in the cut
      cluster: uniform budgets;
    * **budgets**: the cut layers keep ``p * b`` per head (``b`` the row's
      mean target), the others ``b + n_cut (1 - p) b / (L - n_cut)``,
      rounded by largest remainder to ``L * b`` in all (``apportion``), each
      at least SnapKV's ``min_budget`` (the window) and at most the row's
      tokens (what a layer cannot hold goes to the others);
    * **hybrid models** (Gemma 2/3): only the full-attention layers are
      clustered and share ``n_full * b``; sliding layers keep the mean
      target within their window, as under SnapKV;
    * **sequence-wise method**: SnapKV's scores and selection (the library's
      default evictor) rather than the paper's three; per batch row budgets;
    * **p** default 0.85, chosen on 16 development passages (two licence
      texts, both packaged models, budget 128) among 0.3, 0.6 and 0.85:
      paired KL against 0.3 −0.116 (−0.272…+0.014), 0.6 −0.100; the
      paper's value could not be confirmed from its text here. That the
      best of them cuts so little says moving slots away from the layers
      attention changes least does not help these two small models;
    * needs the hidden states: run inside ``kvcompress.compress`` (it hooks
      the decoder layers); a ``KVCache`` used without those hooks raises.

    Parameters
    ----------
    budget, ratio, window, kernel, pool, gqa
        As ``SnapKV``; ``budget`` is the mean per layer.
    p : float in (0, 1]
        Budget of the least important layers, as a fraction of the mean.
    """

    p: float = 0.85

    needs_hidden = True

    def _check_fields(self) -> None:
        super()._check_fields()
        self._check_float("p", self.p, above=0.0, at_most=1.0)

    def hidden_statistic(self, before, after, pad):
        """``[B]`` float64: per row the mean cosine over its real tokens."""
        B, q, d = (int(x) for x in before.shape)
        cos = ops.row_cosine(before.reshape(B * q, d), after.reshape(B * q, d)).reshape(B, q).double().cpu()
        return torch.tensor([float(cos[b, min(pad[b], q - 1):].mean()) for b in range(B)], dtype=torch.float64)

    def _full_targets(self, stats, hidden, seen):
        L = len(hidden)
        means = self._means(seen, L)
        targets = [[0] * len(seen) for _ in range(L)]
        for b, (mean, real) in enumerate(zip(means, seen)):
            want = [float(mean)] * L
            if mean < real and L >= 3:
                sims = [float(h[b]) for h in hidden]
                assign = kmeans_1d(sims, 3)
                cents = {}
                for c in set(assign):
                    members = [s for s, a in zip(sims, assign) if a == c]
                    cents[c] = math.fsum(members) / len(members)
                top = max(cents, key=lambda c: (cents[c], -c))
                cut = [i for i in range(L) if assign[i] == top]
                if 0 < len(cut) < L:
                    extra = len(cut) * (1.0 - float(self.p)) * mean / (L - len(cut))
                    want = [float(self.p) * mean if i in cut else mean + extra for i in range(L)]
            got = [real] * L if mean >= real else apportion(want, L * mean, min(self.min_budget(), mean), real)
            for j in range(L):
                targets[j][b] = got[j]
        return targets
