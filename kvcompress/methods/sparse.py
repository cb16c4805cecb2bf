"""Query-aware sparse decoding: the whole (or an evicted) cache is kept and
each decode step reads only the part its query needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import KeepsEveryToken

_GQA = ("max", "mean")


@dataclass
class Quest(KeepsEveryToken):
    """Quest: read only the pages whose keys can matter to the current query.

    Paper (Tang et al., "Quest: Query-Aware Sparsity for Efficient
    Long-Context LLM Inference", ICML 2024): the KV cache is split into pages
    of ``page`` tokens, each with the per-channel minimum and maximum of its
    keys; at every decode step a page's criticality is the upper bound
    ``sum_c max(q_c * max_c, q_c * min_c)`` of the logit its keys can reach,
    and attention reads only the top ``token_budget / page`` pages. Nothing
    is evicted: memory is the full cache plus the bounds, and the saving is in
    what each step reads. The first two layers run dense (the paper's
    layers 0 and 1 show little sparsity).

    Our reading and choices:

    * the bounds are kept current on every append (only the pages a chunk
      touched are recomputed) and recomputed once after an eviction moves
      the slots;
    * GQA models share one page selection per kv head (the kernel reads each
      kv head's pages once for its query heads): the page score is the max
      over the group's query heads (``gqa="max"``: a page any query head
      needs is read; ``"mean"`` is the alternative), where the paper, on MHA
      models, selects per head;
    * the first page holding a real token (attention sinks) and the newest
      page (it holds the query itself) are always read; ties between page
      scores go to the lower page index;
    * prefill chunks, and decode steps of layers no longer than
      ``token_budget``, read every slot (as the paper's prefill does);
      sliding-window layers (Gemma 2/3) hold only their window and read it
      whole; softcapped or sink-logit attention reads every slot (the sparse
      kernel does not implement those options);
    * composed with an evicting method (``SnapKV(ratio=0.5) +
      Quest(token_budget=256)``) the pages are cut over the kept slots, so
      the evictor bounds memory and Quest the reads; after a head-wise or
      merging evictor (``AdaKV``, ``EMS``: heads of different lengths) each
      kv head's pages cut its own slots, a head with no more pages than the
      budget reads them all, and a merged slot's ``log(count)`` joins its
      logit in the attention over the pages (not the page score: the bound
      ranks keys, as the paper's does).

    Parameters
    ----------
    token_budget : int
        Slots a decode step reads at most (``token_budget // page`` pages, at
        least 2).
    page : int
        Slots per page (the paper's default 16).
    dense_layers : int
        Leading layers that always read every slot (the paper: 2).
    gqa : {"max", "mean"}
        How a kv head's page score combines its query heads.
    """

    token_budget: int = 1024
    page: int = 16
    dense_layers: int = 2
    gqa: str = "max"
    _keeps: ClassVar[str] = "evicts nothing (it chooses what each decode step reads; use token_budget=)"

    def _check_fields(self) -> None:
        super()._check_fields()
        self._check_int("page", self.page, 1)
        self._check_int("token_budget", self.token_budget, 1)
        if self.token_budget < 2 * self.page:
            raise ValueError(f"token_budget: must be at least two pages ({2 * self.page} slots with page="
                             f"{self.page}): the first and the newest page are always read; got "
                             f"{self.token_budget}")
        self._check_int("dense_layers", self.dense_layers, 0)
        if self.gqa not in _GQA:
            raise ValueError(f"gqa: expected one of {_GQA}, got {self.gqa!r}")

    @property
    def paging(self) -> tuple[int, int, int, str]:
        return self.token_budget, self.page, self.dense_layers, self.gqa

    def describe(self) -> str:
        return (f"Quest(token_budget={self.token_budget}, page={self.page}, dense_layers={self.dense_layers}"
                + (f", gqa={self.gqa!r}" if self.gqa != "max" else "") + ")")

    def __repr__(self) -> str:
        return self.describe()


@dataclass
class TidalDecode(KeepsEveryToken):
    """TidalDecode: a few layers pick the tokens, the layers after them read only those.

    Paper (Yang et al., "TidalDecode: Fast and Accurate LLM Decoding with
    Position Persistent Sparse Attention", 2024): the tokens with the highest
    attention scores overlap strongly across consecutive layers, so full
    attention is computed only in the first layers and in a few **token
    selection layers**; a selection layer keeps the top ``token_budget``
    tokens of its attention and the sparse layers after it attend over
    exactly those positions ("position persistent"), until the next
    selection layer re-selects (the paper re-selects once, at a middle layer,
    to correct the drift of the selection; layers 0-1 dense, selection at
    layer 2 and 13 of 32 on Llama-3-8B).

    Our reading and choices:

    * ``selection_layers="auto"`` is layer 2 and layer ``round(0.4 * L)``
      (13 of 32, the paper's Llama-3 setting, scaled): layers before the
      first one read densely, a selection layer attends densely and then
      selects, every later layer reads the latest selection;
    * a selection layer's score is the decode query's softmax attention
      (``ops.window_scores`` over one query); GQA models keep one token set
      per kv head, the group's probabilities reduced by ``gqa`` (``"max"``
      by default: a token any query head needs is kept), where the paper, on
      Llama-3's GQA, selects per kv head as well;
    * the newest token (the query's own) is always read; ties go to the
      lower position;
    * prefill chunks read densely (the paper's prefill is dense); so do
      sliding-window layers (Gemma 2/3: they hold only their window) and
      softcapped or sink-logit attention;
    * hybrid models (not in the paper): a selection layer that slides hands
      its role to the first full-attention layer after it, so on Gemma 3
      (full attention at layers 5, 11, 17 of 18) ``"auto"`` (2 and 7)
      selects at 5 and 11 and layer 17 reads; a sliding layer's window is
      not the whole context, so its attention cannot choose for the
      full-attention layers;
    * nothing is evicted; composed with an evictor
      (``SnapKV(ratio=0.5) + TidalDecode(token_budget=256)``) each layer
      holds its own tokens, so the selection is published as **token
      positions** and a sparse head reads the selected positions it still
      holds, topped up with its newest other slots to the same count (the
      paper has no eviction; topping up keeps every sparse step's reads at
      ``token_budget`` and always includes the recent tokens, which eviction
      keeps in every layer);
    * after a head-wise or merging evictor (``AdaKV``, ``EMS``) each kv head
      selects among its own slots (a head holding no more than
      ``token_budget`` publishes them all), a merged slot's ``log(count)``
      joins its logit in the selection score as in the attention, and a
      sparse head reads as above.

    Parameters
    ----------
    token_budget : int
        Tokens a sparse layer reads per kv head.
    selection_layers : "auto" or tuple of ints or str
        Layer indices that select (ascending), e.g. ``(2, 13)``; on the
        command line ``selection_layers=2/13``.
    gqa : {"max", "mean"}
    """

    token_budget: int = 256
    selection_layers: object = "auto"
    gqa: str = "max"
    _keeps: ClassVar[str] = "evicts nothing (it chooses what each decode step reads; use token_budget=)"

    def _check_fields(self) -> None:
        super()._check_fields()
        self._check_int("token_budget", self.token_budget, 1)
        if self.gqa not in _GQA:
            raise ValueError(f"gqa: expected one of {_GQA}, got {self.gqa!r}")
        sel = self.selection_layers
        if isinstance(sel, str) and sel != "auto":
            try:
                sel = tuple(int(x) for x in sel.split("/"))
            except ValueError:
                raise ValueError(f"selection_layers: expected 'auto', layer indices such as (2, 13) or "
                                 f"'2/13', got {self.selection_layers!r}") from None
        if isinstance(sel, int) and not isinstance(sel, bool):
            sel = (sel,)
        if sel != "auto":
            if not isinstance(sel, (tuple, list)) or not sel or any(
                    isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in sel) or list(sel) != sorted(set(sel)):
                raise ValueError(f"selection_layers: expected strictly ascending layer indices >= 0, got "
                                 f"{self.selection_layers!r}")
            sel = tuple(sel)
        self.selection_layers = sel

    def selection(self, num_layers: int) -> tuple[int, ...]:
        """The selection layers of a model with ``num_layers`` layers."""
        if self.selection_layers != "auto":
            return self.selection_layers
        return tuple(sorted({min(2, num_layers - 1), min(num_layers - 1, round(0.4 * num_layers))}))

    def role(self, layer_idx: int, num_layers: int, sliding=()) -> str | None:
        """``"select"``, ``"sparse"`` or None (dense) for a full-attention
        layer. ``sliding``: the sliding-window layers before it (hybrid
        models); a selection layer that slides hands its role to the first
        full-attention layer after it."""
        moved = []
        for s in self.selection(num_layers):
            while s in sliding and s < layer_idx:
                s += 1
            moved.append(s)
        if layer_idx in moved:
            return "select"
        return "sparse" if layer_idx > moved[0] else None

    @property
    def tidal(self) -> "TidalDecode":
        return self

    def describe(self) -> str:
        sel = self.selection_layers if self.selection_layers == "auto" else "/".join(map(str, self.selection_layers))
        return (f"TidalDecode(token_budget={self.token_budget}, selection_layers={sel!r}"
                + (f", gqa={self.gqa!r}" if self.gqa != "max" else "") + ")")

    def __repr__(self) -> str:
        return self.describe()


@dataclass
class MagicPIG(KeepsEveryToken):
    """MagicPIG: attention estimated from the keys a locality-sensitive hash samples.

    Paper (Chen et al., "MagicPIG: LSH Sampling for Efficient LLM
    Generation", ICLR 2025): attention is not always sparse enough for top-k
    selection to be accurate, so MagicPIG *samples*: SimHash tables (``L``
    tables of ``K`` random-hyperplane sign bits) index the keys, a key
    colliding with the query in at least 2 tables is sampled, and the
    attention output is estimated by importance sampling, each sampled key
    weighted by the inverse of its collision probability; attention sinks
    and a local window are computed exactly, and the hashing and sampled
    attention run on the CPU (ours: the C core).

    Our reading and choices:

    * keys are centered by their prefill mean per head before hashing (the
      paper centers keys so that the angle reflects the attention logit);
      the collision probability of a key is computed from the angle between
      the query and the centered key: ``u = 1 - theta / pi`` per bit,
      ``u^K`` per table, ``P[Binomial(L, u^K) >= hits]`` overall, so the
      estimate of the softmax normaliser is unbiased (tested on a float64
      reference over many seeds);
    * the output is the self-normalised estimate (weighted values over the
      weighted normaliser), as the paper uses;
    * hyperplanes are fixed per layer (``seed`` + layer index) and shared
      by the batch; codes are computed once per key (prefill, then each
      appended token);
    * ``K=8, L=75`` (one of the paper's settings; its longest contexts use
      10 / 150), ``sinks=4, window=64`` and the first two layers dense (the
      paper keeps layer 0 and one middle layer dense on Llama);
    * prefill chunks, sliding-window layers and softcapped or sink-logit
      attention read every slot;
    * it keeps every token; composed with an evictor
      (``SnapKV(ratio=0.5) + MagicPIG()``) the tables index the kept slots
      (the center is their mean) and a decode-time re-selection of the
      evictor moves each slot's codes with it; after a head-wise or merging
      evictor (``AdaKV``, ``EMS``) each kv head's center is the mean of its
      own kept keys, a merged slot's ``log(count)`` joins its log-weight (the
      estimate is then of the count-weighted attention the merge stands
      for), and a layer the evictor re-compresses is hashed again with the
      same hyperplanes and center (merged keys are new keys).
    """

    K: int = 8
    L: int = 75
    hits: int = 2
    sinks: int = 4
    window: int = 64
    dense_layers: int = 2
    seed: int = 0
    _keeps: ClassVar[str] = "evicts nothing (it samples what each decode step reads)"

    def _check_fields(self) -> None:
        super()._check_fields()
        self._check_int("K", self.K, 1)
        if self.K > 30:
            raise ValueError(f"K: at most 30 bits per table, got {self.K}")
        self._check_int("L", self.L, 1)
        self._check_int("hits", self.hits, 1)
        if self.hits > self.L:
            raise ValueError(f"hits: a key cannot collide in more than L={self.L} tables, got hits={self.hits}")
        for name in ("sinks", "window", "dense_layers", "seed"):
            self._check_int(name, getattr(self, name), 0)

    @property
    def lsh(self) -> "MagicPIG":
        return self

    def describe(self) -> str:
        return (f"MagicPIG(K={self.K}, L={self.L}, hits={self.hits}, sinks={self.sinks}, window={self.window}, "
                f"dense_layers={self.dense_layers})")

    def __repr__(self) -> str:
        return self.describe()
