"""The contract every compression method follows (the method protocol).

A method is a small dataclass. It scores and decides; the cache does the
storage and the C ops the arithmetic. The cache calls, per layer:

* :meth:`Method.observe` after every attention call (prefill chunk or decode
  step), so per-slot state such as H2O's accumulated attention stays current;
* :meth:`Method.phase_target` (by default :meth:`Method.row_target`) for the
  slots a batch row may keep;
* :meth:`Method.select` (evicting methods) or :meth:`Method.compact` (merging
  methods, ``merges = True``) when a row holds more than that after a prefill
  chunk, or more than that plus ``interval`` slots after a decode step;
* :meth:`Method.recompact` for a merging method's decode-time re-merge of a
  per-head layer;
* :meth:`Method.held_queries` for how many of the latest queries a layer
  keeps so that a decode-time re-selection can score with them.

The cache never branches on a method's class; everything it needs is
declared here. See docs/design.md ("Adding a method").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .. import ops


@dataclass
class LayerView:
    """What a method sees of one layer when it is asked to compress it.

    Attributes
    ----------
    layer_idx, num_layers : int
        Position of the layer in the model.
    queries : torch.Tensor
        ``[B, Hq, q, D]`` post-RoPE queries of the chunk that just ran. They sit
        at the *last* ``q`` slots of ``keys``.
    keys, values : torch.Tensor
        ``[B, Hkv, n, D]`` every slot the layer holds now (old slots first,
        then the chunk).
    kv_start : torch.Tensor
        ``[B]`` int64, number of leading padded (invalid) slots of each row.
    scaling : float
        Softmax scale of the attention, usually ``D ** -0.5``.
    state : dict
        Per-slot method state (``name -> [B, Hkv, n]`` float32), kept aligned
        with the slots by the cache (gathered on eviction, zero-extended on
        append). Methods read and write it in place.
    phase : str
        ``"prefill"`` (a chunk of more than one token) or ``"decode"``.
    steps : int
        Decode steps the layer has run since its last prefill chunk, this
        one included (1 at the first generated token's step; 0 while a
        prefill chunk is observed). Keyformer's temperature schedule and
        noise read it.
    tokens : torch.Tensor or None
        ``[B, Hkv, n]`` int64 token id of every slot, for methods with
        ``needs_tokens`` (FastGen's special and punctuation tokens); None
        when the cache was not fed token ids (``inputs_embeds``, a forward
        outside ``kvcompress.compress``) or the method does not ask.
    head_state : dict
        Per-head method state ``name -> [B, Hkv]`` int64 (FastGen's policy
        per head): what a prefill ``select`` writes here the layer keeps
        (rows it did not compress hold -1, reordered with the batch) and
        hands back to decode-time re-selections of the per-head layer, one
        row per head (``[B * Hkv, 1]``).
    """

    layer_idx: int
    num_layers: int
    queries: Any
    keys: Any
    values: Any
    kv_start: Any
    scaling: float
    state: dict
    phase: str
    steps: int = 0
    tokens: Any = None
    head_state: dict = field(default_factory=dict)
    #: ``lookahead``: what :meth:`Method.lookahead_statistic` gathered over
    #: the held prefill's queries (a ``[B, ...]`` tensor), None otherwise
    statistic: Any = None

    @property
    def length(self) -> int:
        return int(self.keys.shape[2])

    def rows(self, idx) -> "LayerView":
        """The same view restricted to batch rows ``idx`` (int64 tensor)."""
        pick = lambda t: None if t is None else t.index_select(0, idx.to(t.device))  # noqa: E731
        return dataclasses.replace(
            self, queries=pick(self.queries), keys=pick(self.keys), values=pick(self.values),
            kv_start=pick(self.kv_start), state={k: pick(v) for k, v in self.state.items()}, tokens=pick(self.tokens),
            head_state={k: pick(v) for k, v in self.head_state.items()}, statistic=pick(self.statistic),
        )


@dataclass
class Method:
    """Base class of compression methods.

    Exactly one of ``budget`` (kept slots per kv head, sinks and windows
    included) or ``ratio`` (fraction of the tokens removed, ``0 <= ratio <
    1``) must be given.

    During decoding every method keeps its budget: once a layer holds
    ``interval`` slots more than its target, it is re-compressed to the
    target, re-scored with the latest queries it holds (``held_queries``) and
    any per-slot state it carries. The target of a batch row is ``budget``
    (per layer for schedules such as PyramidKV), or with ``ratio`` the share
    ``int(seen * (1 - ratio))`` of the tokens the row has seen; a row whose
    tokens all fit is kept whole. ``interval=0`` turns decode-time
    re-compression off (the layer then grows while decoding). Composed with a
    quantizer that packs what it keeps (``+ KIVI(...)``), a round reads the
    packed slots back dequantized and packs the kept ones again; keys whose
    key group changes are re-quantized at each round, which at 2 bits costs
    more than ``interval=0`` (see the README).
    """

    budget: int | None = None
    ratio: float | None = None
    interval: int = 16

    #: ``True`` when ``score`` needs the chunk's queries
    needs_queries: ClassVar[bool] = True
    #: names of per-slot state columns (float32) the method keeps
    slot_state: ClassVar[tuple[str, ...]] = ()
    #: ``True`` when heads keep different numbers of slots (per-head storage)
    headwise: ClassVar[bool] = False
    #: ``True`` when heads' budgets are shared out over the whole model
    #: (HeadKV): a layer may hold more or less than ``H * target``, the model
    #: holds ``L * H * target`` (up to rounding)
    across_layers: ClassVar[bool] = False
    #: ``True`` when some heads keep every token whatever the budget
    #: (RazorAttention's retrieval heads): a layer then holds its other heads'
    #: budgets plus those heads' lengths, more than ``H * target``
    whole_heads: ClassVar[bool] = False
    #: ``True`` when the method merges evicted tokens (``compact``/``recompact``)
    merges: ClassVar[bool] = False
    #: ``True`` when ``recompact(..., local=)`` can force the slots a new
    #: query reads most (``lookahead_room``)
    rescores_lookahead: ClassVar[bool] = False
    #: ``False`` for methods that keep every token (quantizers): they take no
    #: budget or ratio and the evaluation runs them once, not per setting
    evicts: ClassVar[bool] = True
    #: a quantizer (``KIVI``) that packs the slots this method keeps:
    #: ``SnapKV(ratio=0.5, quant=KIVI(bits=4))``, also written
    #: ``SnapKV(ratio=0.5) + KIVI(bits=4)`` (see :meth:`__add__`)
    quant: "Method | None" = None
    #: a query-aware reader (``Quest``, ``TidalDecode``, ``MagicPIG``) that
    #: decodes sparsely over the slots this method keeps:
    #: ``SnapKV(ratio=0.5, sparse=Quest(token_budget=256))``, also written
    #: ``SnapKV(ratio=0.5) + Quest(token_budget=256)``
    sparse: "Method | None" = None
    #: a cross-layer method (``MiniCache``) that merges adjacent layers of what
    #: this evictor keeps: ``SnapKV(ratio=0.5, depth=MiniCache())``, also
    #: written ``SnapKV(ratio=0.5) + MiniCache()``
    depth: "Method | None" = None
    #: ``True``: a layer is first compressed after the attention of the first
    #: decode step (the first generated token's query joins the prompt's
    #: queries as the newest) instead of right after the prefill's, so the
    #: first two generated tokens read the whole prompt, as with kvpress's
    #: decoding presses (see :meth:`_check_lookahead`)
    lookahead: bool = False
    #: with ``lookahead=True``, a bound on what a layer holds while it waits:
    #: a first prefill chunk that leaves a row more than ``lookahead_room``
    #: times its target is compressed at once to that many slots, and the
    #: first decode step re-compresses them to the target with that step's
    #: query (methods with ``rescores_lookahead``; see
    #: :meth:`_check_lookahead`). None: the whole prompt waits
    lookahead_room: float | None = None
    #: quantizers only: ``True`` when composed, the evictor's unselected slots
    #: are kept at low bits instead of evicted (``LowBits``)
    demotes: ClassVar[bool] = False
    #: ``True`` when a layer's prefill budget depends on other layers
    #: (DynamicKV, SqueezeAttention): the cache then defers every layer's
    #: prefill compression until the last layer has attended (and, with
    #: ``needs_hidden``, reported its hidden states), gathering
    #: :meth:`layer_statistic` per layer, and asks :meth:`layer_targets` for
    #: each layer's slots; the full prompt cache is held until then
    defers_prefill: ClassVar[bool] = False
    #: ``True`` when :meth:`hidden_statistic` needs each decoder layer's
    #: residual stream before and after its attention
    #: (``kvcompress.compress`` installs forward hooks for it)
    needs_hidden: ClassVar[bool] = False
    #: ``True`` when the method reads each slot's token id
    #: (``LayerView.tokens``): the cache then records the model's
    #: ``input_ids`` (FastGen's special and punctuation policies)
    needs_tokens: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if (self.budget is None) == (self.ratio is None):
            raise ValueError(
                f"{type(self).__name__}: give exactly one of budget= (kept slots per kv head) "
                f"or ratio= (fraction of the prompt removed); got budget={self.budget!r}, "
                f"ratio={self.ratio!r}"
            )
        if self.budget is not None:
            if isinstance(self.budget, bool) or not isinstance(self.budget, int):
                raise TypeError(f"budget: expected an int, got {type(self.budget).__name__}")
            if self.budget <= 0:
                raise ValueError(f"budget: must be >= 1, got {self.budget}")
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
                raise TypeError(f"ratio: expected a float, got {type(self.ratio).__name__}")
            if not (0.0 <= float(self.ratio) < 1.0) or math.isnan(self.ratio):
                raise ValueError(f"ratio: must satisfy 0 <= ratio < 1, got {self.ratio}")
        self._check_int("interval", self.interval, 0)
        self._check_lookahead()
        self._check_fields()
        self._check_quant()
        self._check_sparse()
        self._check_depth()
        if self.budget is not None and self.budget < self.min_budget():
            raise ValueError(
                f"budget: {type(self).__name__} always keeps {self.min_budget()} slots per head "
                f"({self._forced_text()}), so budget={self.budget} is too small; give budget >= "
                f"{self.min_budget()} or shrink those options"
            )

    # ----------------------------------------------------------------- hooks
    def _check_lookahead(self) -> None:
        """``lookahead=True`` holds each layer's whole prefill and its last
        :meth:`deferred_queries` prefill queries (all of them by default, ``[B,
        Hq, T, D]``: 1.5x the layer's K/V on a 3:1 GQA model) until the first
        decode step, then compresses as if the prefill had been one token
        longer: the peak is the full cache's, as with kvpress's decoding presses.
        It needs a method that reads queries and compresses each layer on its
        own right after that layer's attention."""
        if not isinstance(self.lookahead, bool):
            raise TypeError(f"lookahead: expected a bool, got {type(self.lookahead).__name__}")
        self._check_room()
        if not self.lookahead:
            return
        name = type(self).__name__
        if not self.evicts or not self.needs_queries:
            why = "evicts nothing" if not self.evicts else "does not read queries"
            raise ValueError(f"lookahead: {name} {why}, so it would change nothing")
        if self.defers_prefill:
            raise ValueError(f"lookahead: {name} already waits for every layer's prefill; lookahead is not "
                             "supported with it")
        if self.depth is not None:
            raise ValueError(f"lookahead: not supported with cross-layer methods ({self.depth.describe()})")

    def _check_room(self) -> None:
        """``lookahead_room=h`` bounds the wait of ``lookahead=True``: a layer
        whose first prefill chunk leaves a row more than ``h`` times its
        target keeps ``h`` times the target at once (the method's own
        prefill compression), and at the first decode step each head goes
        to its share of the target, re-scored with the carried scores and,
        forced in, the slots that step's query reads most. A prompt that
        fits in ``h`` times the target waits whole, as with ``lookahead``
        alone. Later turns hold their chunk until the next decode step."""
        room = self.lookahead_room
        if room is None:
            return
        if isinstance(room, bool) or not isinstance(room, (int, float)) or not math.isfinite(room):
            raise TypeError(f"lookahead_room: expected a finite number > 1 or None, got {room!r}")
        name = type(self).__name__
        if not self.lookahead:
            raise ValueError("lookahead_room: bounds what a layer holds while lookahead=True waits for the "
                             "first decode step; give lookahead=True with it")
        if room <= 1:
            raise ValueError(f"lookahead_room: must be > 1 (the target is what is kept after the wait), got {room}")
        if not self.rescores_lookahead:
            raise ValueError(f"lookahead_room: {name} cannot re-score held slots with the first generated "
                             "token's query; use lookahead=True alone")
        if not self.interval:
            raise ValueError("lookahead_room: needs interval > 0 (the first decode step re-compresses the "
                             "heads as decode-time re-compression does)")
        for extra in (self.quant, self.sparse):
            if extra is not None:
                raise ValueError(f"lookahead_room: not supported with {extra.describe()}")

    def _check_fields(self) -> None:
        """Validate method-specific fields (override)."""

    def _check_quant(self) -> None:
        q = self.quant
        if q is None:
            return
        if not isinstance(q, Method) or q.evicts or q.packing is None:
            raise TypeError(f"quant: expected a quantizer such as kvcompress.KIVI(bits=4), got {q!r}")
        if not self.evicts:
            raise ValueError(f"quant: {type(self).__name__} keeps every token itself; give quant= to an "
                             "evicting or merging method")
        if getattr(q, "keep_rows", None) and not self.merges:
            raise ValueError(f"keep_rows: {q.describe()} keeps packed rows through the decode-time rounds of a "
                             f"merging method (EMS, KVMerger, ...); {type(self).__name__} does not merge, so its "
                             "rounds pack everything again: leave keep_rows unset")
        if q.demotes and (self.headwise or self.merges):
            raise ValueError(f"quant: {q.describe()} keeps the evictor's slots in one full-precision window of "
                             f"equal length per head; {type(self).__name__} gives heads different lengths or "
                             "merges: use an evictor such as SnapKV, H2O or TOVA")

    def _check_sparse(self) -> None:
        r = self.sparse
        if r is None:
            return
        if not isinstance(r, Method) or r.evicts or not r.reads_sparsely:
            raise TypeError(f"sparse: expected a query-aware reader such as kvcompress.Quest(token_budget=256), "
                            f"kvcompress.TidalDecode(...) or kvcompress.MagicPIG(), got {r!r}")
        if not self.evicts:
            raise ValueError(f"sparse: {type(self).__name__} keeps every token itself; give sparse= to an "
                             "evicting method")
        if self.quant is not None:
            raise ValueError(f"sparse: {r.describe()} does not read packed layers (quant={self.quant.describe()})")

    def _check_depth(self) -> None:
        d = self.depth
        if d is None:
            return
        if self.defers_prefill:
            raise ValueError(f"depth: {type(self).__name__} sets each layer's budget after the whole prefill; "
                             f"cross-layer methods ({d.describe()}) are not supported with it")
        if not isinstance(d, Method) or (d.cross_layer is None and d.sharing is None) or d.depth is not None:
            raise TypeError(f"depth: expected a cross-layer method such as kvcompress.MiniCache() or "
                            f"kvcompress.KVSharer(plan=...), got {d!r}")
        if not self.evicts:
            raise ValueError(f"depth: {type(self).__name__} keeps every token itself; give depth= to an evicting "
                             "method")
        if self.quant is not None or self.sparse is not None:
            extra = (self.quant or self.sparse).describe()
            raise ValueError(f"depth: {d.describe()} does not compose with {extra} here; write "
                             f"evictor + {d.describe()} + quantizer (the quantizer packs every layer's slots), "
                             "sparse readers are not supported")
        wq = d.quant
        if wq is not None and not isinstance(getattr(wq, "pack_windows", True), bool):
            # _packs_window: behind a cross-layer method sliding layers stay unpacked
            raise ValueError(f"quant: {type(self).__name__} + {type(d).__name__} keeps sliding-window layers "
                             f"unpacked; give {wq.describe()} without pack_windows={wq.pack_windows!r}")

    @property
    def paging(self) -> tuple[int, int, int, str] | None:
        """``(token_budget, page, dense_layers, gqa)`` when decode steps read
        pages sparsely (``kvcompress.stores.PagedStore``), else None."""
        return None if self.sparse is None else self.sparse.paging

    @property
    def lsh(self):
        """The ``MagicPIG`` method when decode steps sample keys by LSH
        (``kvcompress.stores.LSHStore``), else None."""
        return None if self.sparse is None else self.sparse.lsh

    @property
    def reads_sparsely(self) -> bool:
        """Whether this is (or composes with) a query-aware reader: Quest,
        TidalDecode or MagicPIG."""
        return self.paging is not None or self.tidal is not None or self.lsh is not None

    @property
    def cross_layer(self):
        """The ``MiniCache`` method when adjacent layers are merged into one
        shared store (``kvcompress.stores.MiniCacheStore``), else None."""
        return None if self.depth is None else self.depth.cross_layer

    @property
    def sharing(self):
        """The ``KVSharer`` method when some layers read another layer's cache
        (``kvcompress.stores.SharedStore``), else None."""
        return None if self.depth is None else self.depth.sharing

    def with_tokenizer(self, tokenizer) -> "Method":
        """The method with what it needs from ``tokenizer`` filled in (the
        evaluation calls it once per row; FastGen takes its special and
        punctuation token ids here). Default: ``self``."""
        return self

    def prepare(self, model) -> "Method":
        """The method to run on ``model`` (``kvcompress.compress`` calls it
        once): ``KVSharer(calibration=...)`` computes its plan here, also
        when composed (``SnapKV(ratio=0.5) + KVSharer(calibration=ids)``)."""
        if self.depth is None:
            return self
        depth = self.depth.prepare(model)
        return self if depth is self.depth else dataclasses.replace(self, depth=depth)

    @property
    def tidal(self):
        """The ``TidalDecode`` method when layers share one decode-time token
        selection (``kvcompress.stores.TidalStore``), else None."""
        return None if self.sparse is None else self.sparse.tidal

    @property
    def packing(self) -> tuple[int, int, int, int] | None:
        """``(bits, group, residual, value_bits)`` when layers keep their
        slots packed (``kvcompress.stores.PackedStore``), else None."""
        if self.quant is not None:
            return self.quant.packing
        # SnapKV(...) + MiniCache() + KIVI(...): the quantizer rides on the cross-layer method
        return None if self.depth is None else self.depth.packing

    @property
    def rotates_keys(self) -> bool | str:
        """Whether the packed keys are quantized after an orthogonal rotation
        (``KIVI(rotate=True)``; ``"auto"``: decided per layer; see
        ``kvcompress.stores.rotation``)."""
        if self.quant is not None:
            return self.quant.rotates_keys
        return False if self.depth is None else self.depth.rotates_keys

    @property
    def fp_sinks(self) -> int:
        """First slots of every head a packed layer keeps in full precision
        (``KIVI(sinks=...)``), 0 without a quantizer."""
        if self.quant is not None:
            return self.quant.fp_sinks
        return 0 if self.depth is None else self.depth.fp_sinks

    @property
    def key_feedback(self) -> bool:
        """Whether packed keys are rounded with query-weighted error feedback
        (``KIVI(feedback=True)``; see ``kvcompress.stores.feedback``)."""
        if self.quant is not None:
            return self.quant.key_feedback
        return False if self.depth is None else self.depth.key_feedback

    @property
    def value_clip(self) -> bool | str:
        """Whether packed value groups take clipped ranges (``KIVI(clip_values=...)``;
        ``"auto"``: decided per layer; see ``kvcompress.stores.value_clip``)."""
        if self.quant is not None:
            return self.quant.value_clip
        return False if self.depth is None else self.depth.value_clip

    @property
    def round_keeps_rows(self) -> int:
        """Unchanged members a packed key group needs to keep its codes
        through a decode-time round of a merging method (``KIVI(keep_rows=...)``;
        see ``kvcompress.stores.keep_rows``); 0 without a quantizer, or when
        this method does not merge."""
        if self.quant is None or not self.merges:
            return 0
        return self.quant.min_live_rows

    @property
    def packs_windows(self) -> bool:
        """Whether a quantizer packs sliding-window layers too
        (``KIVI(pack_windows=...)``; True without one)."""
        if self.quant is not None:
            return self.quant.packs_windows
        return True if self.depth is None else self.depth.packs_windows

    @property
    def window_packing(self) -> tuple[int, int, int, int] | None:
        """:attr:`packing` of sliding-window layers (``KIVI(pack_windows=4)``:
        their own width), None without a quantizer."""
        if self.quant is not None:
            return self.quant.window_packing
        return None if self.depth is None else self.depth.window_packing

    @property
    def mixed_precision(self) -> bool:
        """Whether the slots this method does not select are kept at low bits
        (its quantizer demotes) rather than evicted."""
        return self.quant is not None and self.quant.demotes

    def __add__(self, other):
        """``evictor + quantizer``: the evictor with ``quant=quantizer`` (the
        kept slots are packed), e.g. ``EMS(ratio=0.5) + KIVI(bits=4)``."""
        if not isinstance(other, Method):
            return NotImplemented
        if (self.cross_layer is self or self.sharing is self) and other.packing is not None \
                and not other.demotes and not other.evicts:
            # MiniCache() + KIVI(bits=4), KVSharer(plan=...) + KIVI(bits=4)
            if self.quant is not None:
                raise ValueError(f"{self.describe()} already packs its slots")
            return dataclasses.replace(self, quant=other)
        if self.sharing is self or (other.sharing is other and not self.evicts):
            raise TypeError(f"cannot compose {self.describe()} + {other.describe()}: KVSharer composes with an "
                            f"evictor before it (SnapKV(ratio=0.5) + KVSharer(plan=...)) or a quantizer after it "
                            f"(KVSharer(plan=...) + KIVI(bits=4)); it does not compose with sparse readers or "
                            f"MiniCache")
        if other.sharing is other:
            if self.depth is not None:
                raise ValueError(f"{self.describe()} already shares or merges layers with {self.depth.describe()}")
            if self.quant is not None or self.sparse is not None:
                raise ValueError(f"cannot compose {self.describe()} + {other.describe()}: compose the evictor "
                                 f"with KVSharer first, then the quantizer (evictor + KVSharer + KIVI); sparse "
                                 f"readers are not supported")
            return dataclasses.replace(self, depth=other)
        if self.cross_layer is not None and self.depth is None:
            raise TypeError(f"cannot compose {self.describe()} + {other.describe()}: MiniCache composes with an "
                            f"evictor before it (SnapKV(ratio=0.5) + {self.describe()}) or a quantizer after it "
                            f"({self.describe()} + KIVI(bits=4)); it does not compose with sparse readers")
        if other.cross_layer is not None:
            if self.sharing is not None:
                raise TypeError(f"cannot compose {self.describe()} + {other.describe()}: KVSharer and MiniCache "
                                "do not compose")
            if not self.evicts:
                raise TypeError(f"cannot compose {self.describe()} + {other.describe()}: MiniCache composes with "
                                "an evicting method, e.g. SnapKV(ratio=0.5) + MiniCache()")
            if self.depth is not None:
                raise ValueError(f"{self.describe()} already merges layers with {self.depth.describe()}")
            return dataclasses.replace(self, depth=other)
        if self.depth is not None:
            if other.packing is None or other.evicts:
                raise TypeError(f"cannot compose {self.describe()} + {other.describe()}: {self.depth.describe()} "
                                "composed with an evictor does not compose with a sparse reader as well")
            # evictor + MiniCache (or KVSharer) + quantizer: every layer's slots are packed
            return dataclasses.replace(self, depth=self.depth + other)
        if not self.evicts or other.evicts:
            raise TypeError(f"cannot compose {self.describe()} + {other.describe()}: write "
                            "evicting_method + quantizer, e.g. EMS(ratio=0.5) + KIVI(bits=4), or "
                            "evicting_method + reader, e.g. SnapKV(ratio=0.5) + Quest(token_budget=256)")
        if other.reads_sparsely:
            if self.sparse is not None:
                raise ValueError(f"{self.describe()} already reads sparsely with {self.sparse.describe()}")
            return dataclasses.replace(self, sparse=other)
        if self.quant is not None:
            raise ValueError(f"{self.describe()} already packs its slots with {self.quant.describe()}")
        return dataclasses.replace(self, quant=other)

    def min_budget(self) -> int:
        """Slots the method always keeps (sinks + window); a smaller
        ``budget`` is refused when the method is built."""
        return 1

    def _forced_text(self) -> str:
        return "its forced keeps"

    @staticmethod
    def _check_int(name: str, value: Any, minimum: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
        if value < minimum:
            raise ValueError(f"{name}: must be >= {minimum}, got {value}")

    @staticmethod
    def _check_float(name: str, value: Any, *, above: float | None = None, at_least: float | None = None,
                     at_most: float | None = None) -> float:
        """Validate a real-valued option (ints accepted, bools and NaN/inf
        refused) against optional bounds; returns it as a float."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"{name}: must be finite, got {value}")
        if above is not None and not v > above:
            raise ValueError(f"{name}: must be > {above}, got {value}")
        if at_least is not None and not v >= at_least:
            raise ValueError(f"{name}: must be >= {at_least}, got {value}")
        if at_most is not None and not v <= at_most:
            raise ValueError(f"{name}: must be <= {at_most}, got {value}")
        return v

    def layer_budget(self, layer_idx: int, num_layers: int, mean_budget: float) -> float:
        """Budget of one layer given the mean budget; uniform by default."""
        return mean_budget

    def row_target(self, layer_idx: int, num_layers: int, seen: int) -> int:
        """Slots a batch row keeps in a layer once it has seen ``seen`` real
        tokens.

        When the mean budget (``budget``, or ``int(seen * (1 - ratio))``)
        covers every token nothing is compressed, even where a per-layer
        schedule (PyramidKV) would give this layer fewer slots.
        """
        if self.budget is not None:
            mean = float(self.budget)
        else:
            mean = float(int(seen * (1.0 - float(self.ratio))))
        if mean >= seen:
            return seen
        # a per-layer share above the row's tokens (PyramidKV's shallow layers) keeps them all
        return min(seen, max(1, int(round(self.layer_budget(layer_idx, num_layers, mean)))))

    def phase_target(self, layer_idx: int, num_layers: int, prompt: int, decoded: int) -> int:
        """Slots a batch row keeps once it has seen ``prompt`` real tokens up
        to its last prefill chunk and ``decoded`` tokens decoded one at a time
        since (what the cache asks). One budget for every token by default:
        ``row_target`` of ``prompt + decoded``; a method with a separate
        decoding budget (SCOPE) overrides it."""
        return self.row_target(layer_idx, num_layers, prompt + decoded)

    def held_queries(self) -> int:
        """Latest queries a layer keeps for decode-time re-scoring (0: none)."""
        return 0

    # ------------------------------------------- deferred prefill (defers_prefill)
    def deferred_queries(self) -> int | None:
        """Latest prefill queries a deferred layer keeps until its compression
        (None: all of them); fewer hold less memory while the other layers run
        (``defers_prefill``) or until the first decode step (``lookahead``)."""
        return None

    def lookahead_statistic(self, view: LayerView, previous):
        """``lookahead``: a ``[B, ...]`` tensor summarising the queries of a
        held chunk (``view.queries``, at the last slots of ``view.keys``),
        folded into ``previous`` (None for the first chunk; a later chunk and
        the first decode step's query follow). The cache hands the result to
        the compression as ``LayerView.statistic``, and then holds only the
        last :meth:`deferred_queries` queries, so a method that needs every
        query's contribution (EMS's global score) need not hold them all.
        Default None: nothing gathered."""
        return None

    def layer_statistic(self, view: LayerView) -> Any:
        """``defers_prefill`` methods: what :meth:`layer_targets` needs of one
        layer, computed right after its prefill attention (``view`` holds the
        chunk's queries and every slot)."""
        return None

    def hidden_statistic(self, before, after, pad: list[int]) -> Any:
        """``needs_hidden`` methods: what :meth:`layer_targets` needs of one
        layer's residual stream ``before`` its attention and ``after`` adding
        the attention's output (``[B, q, d]``); ``pad[b]`` leading tokens of
        row ``b`` are padding."""
        return None

    def layer_targets(self, stats: list, hidden: list | None, seen: list[int],
                      sliding: list[bool]) -> list[list[int]] | None:
        """``defers_prefill`` methods: slots ``[layer][row]`` each deferred
        layer keeps (layers in model order; rows with ``seen[b]`` real
        tokens), from their :meth:`layer_statistic` and (``needs_hidden``)
        :meth:`hidden_statistic`; None keeps :meth:`row_target`. Decoding
        keeps each layer's share of the row's target (see ``CompressedLayer``).
        ``sliding[j]`` is True for a sliding-window layer: it keeps only its
        most recent slots whatever it is given (its statistics, both, are
        None, never computed), so a budget moved to it would be lost."""
        return None

    def observe(self, view: LayerView) -> None:
        """Update per-slot state after an attention call (override)."""

    def score(self, view: LayerView):
        """Return ``[B, Hkv, n]`` float32 scores; higher means keep."""
        raise NotImplementedError(f"{type(self).__name__} does not define score()")

    def forced(self, view: LayerView, keep: int) -> tuple[int, int]:
        """(sinks, window): first valid and last slots always kept."""
        return 0, 0

    def select(self, view: LayerView, keep):
        """Kept slot indices ``[B, Hkv, k]`` int64, ascending.

        ``keep`` is an int (slots per head) or an int64 ``[B, Hkv]`` tensor of
        per-head counts (then heads with fewer are ``-1`` padded at the end).
        """
        scores = self.score(view)
        k_min = keep if isinstance(keep, int) else int(keep.min())
        sinks, window = self.forced(view, k_min)
        return ops.select_topk(scores, keep, sinks=sinks, window=window, kv_start=view.kv_start)

    def compact(self, view: LayerView, keep: int):
        """Merging methods: return ``(centers [B, Hkv, C] int64 (-1 padded),
        ops.EvictMergeResult, carried [B, Hkv, C] float32)`` for a layer
        keeping ``keep`` slots per head; ``carried`` is the score each kept
        slot takes to a decode-time re-compression."""
        raise NotImplementedError(f"{type(self).__name__} does not merge")

    def recompact(self, queries, keys, values, counts, carried, start, budgets, scaling):
        """Merging methods: decode-time re-merge of a per-head layer, one row
        per head (shapes in :meth:`kvcompress.methods.EMS.recompact`)."""
        raise NotImplementedError(f"{type(self).__name__} does not merge")

    @property
    def count_bias(self) -> bool:
        """Whether attention adds ``log(count)`` of merged slots to their logits."""
        return False

    # ----------------------------------------------------------------- misc
    def _default_interval(self) -> int:
        """The ``interval`` ``describe()`` leaves out (the method's default)."""
        return 16

    def describe(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if (v is not None and not (f.name == "interval" and v == self._default_interval())
                    and not (f.name == "lookahead" and not v) and f.name not in ("quant", "sparse", "depth")):
                parts.append(f"{f.name}={v}")
        text = f"{type(self).__name__}({', '.join(parts)})"
        for extra in (self.quant, self.sparse, self.depth):
            if extra is not None:
                text += f" + {extra.describe()}"
        return text


@dataclass
class KeepsEveryToken(Method):
    """Base of the methods that evict nothing themselves (quantizers, sparse
    readers): built with neither ``budget`` nor ``ratio`` (``ratio`` becomes
    0), and refusing either with the reason ``_keeps`` gives."""

    ratio: float | None = None
    needs_queries: ClassVar[bool] = False
    evicts: ClassVar[bool] = False
    #: what the method does instead of evicting, for the refusal
    _keeps: ClassVar[str] = "evicts nothing"

    def __post_init__(self) -> None:
        if self.budget is None and self.ratio is None:
            self.ratio = 0.0  # built by name with neither: nothing is evicted
        super().__post_init__()

    def _check_packer(self) -> None:
        """``quant=`` of a cross-layer method that keeps every token
        (MiniCache, KVSharer): a plain quantizer, never a demoting one."""
        q = self.quant
        if q is None:
            return
        if not isinstance(q, Method) or q.evicts or q.packing is None or q.demotes:
            raise TypeError(f"quant: expected a quantizer such as kvcompress.KIVI(bits=4), got {q!r}")
        if getattr(q, "keep_rows", None) is not None:
            # CompressedLayer._repacks: no layer re-packs while decoding behind a cross-layer method
            raise ValueError(f"keep_rows: {q.describe()} keeps packed rows through the decode-time rounds of a "
                             f"merging method, and behind {type(self).__name__} no layer has any; leave "
                             "keep_rows unset")

    def _check_fields(self) -> None:
        if self.budget is not None or self.ratio:
            raise ValueError(
                f"{type(self).__name__} {self._keeps}: budget/ratio must not be given (got budget={self.budget!r}, "
                f"ratio={self.ratio!r}); compose it with an eviction method to evict as well")


#: kept for code written against the first releases: every method now keeps
#: its budget while decoding, so this is ``Method`` itself
DecodeMethod = Method


__all__ = ["LayerView", "Method", "KeepsEveryToken", "DecodeMethod"]
