"""Quantization methods: KIVI (packed low-bit keys and values) and the
mixed-precision ones (LowBits, MiKV, ZipCache: what an evictor would drop is
packed instead)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .. import ops
from .accumulated import H2O
from .base import KeepsEveryToken, LayerView, Method


#: The largest ``group`` a quantizer takes.
MAX_GROUP = 4096


@dataclass
class KIVI(KeepsEveryToken):
    """KIVI: 2/4/8-bit keys and values with a full-precision residual window.

    Paper (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for
    KV Cache", ICML 2024): keys are quantized **per channel** (their outliers
    sit in fixed channels) in groups of ``group`` tokens along the sequence,
    values **per token** in groups of ``group`` channels, both with a min/max
    (asymmetric) affine code; the most recent ``residual`` tokens stay in full
    precision and are quantized a group at a time as new tokens arrive.

    Our reading and choices:

    * codes ``round((x - min) / scale)`` with ``scale = (max - min) /
      (2^bits - 1)`` in fp32, min and scale stored as fp32 (the paper keeps
      them in fp16; fp32 costs 4 more bytes per group and removes a rounding
      step); a group whose max equals its min is stored exactly; ``group``
      is at most 4096 (``MAX_GROUP``: a per-head layer pads each head to
      whole groups, so a larger one would hold that many rows per head);
    * the residual holds between ``residual`` and ``residual + group - 1``
      tokens: once it reaches ``residual + group`` the oldest whole groups are
      packed. A prefill therefore packs everything but its last ``residual``
      tokens (rounded to whole groups), never the whole prompt, and its own
      attention runs in full precision (as the paper's prefill does);
    * attention reads the packed bits directly (``ops.packed_attention``):
      per query and key group the channel scales are folded into the query,
      so no dequantized copy of the cache exists;
    * nothing is evicted (``ratio`` is 0); sliding-window layers (Gemma 2/3,
      Mistral, ...) pack their window the same way: key groups leave whole
      once the window has passed them, and attention masks the older slots
      of the oldest group (after an evictor, a sliding layer packs the newest
      slots it keeps);
    * ``bits`` defaults to 4 (the paper's near-lossless setting; its headline
      2-bit setting loses about 1 point on LongBench for Mistral-7B);
    * ``value_bits`` (not in the paper, which uses one width) packs the values
      at their own width: ``KIVI(bits=4, value_bits=2)`` keeps 4-bit keys and
      2-bit values. On the default model 2-bit values alone cost +0.8%
      perplexity and 2-bit keys alone +13.6% (``benchmarks/diag_kivi2.py``,
      RESULTS "Where KIVI-2's perplexity loss comes from"), so the keys
      decide 2-bit quality and this setting holds 80 bytes per token and head
      (D = 64) against 96 for KIVI-4 and 64 for KIVI-2;
    * ``rotate=True`` (not in the paper; QuaRot's rotation applied to KIVI's
      per-channel key groups) packs each key as ``k @ R`` with ``R`` the
      orthonormal Hadamard matrix of order D (a fixed seeded random
      orthogonal matrix when D is not a power of two), and the kernel reads
      the packed part with ``q @ R``: ``q . k`` is unchanged, only the
      quantization error moves. Same bytes (plus one shared ``D x D``
      matrix). Whether it helps depends on the layer: KIVI-2's perplexity
      loss falls from +17.5% to +7.8% on the default model but rises from
      +6.8% to +33% on Gemma 3, whose global layers' slowly turning RoPE
      channels pack almost exactly unrotated (RESULTS, "KIVI-2 with rotated
      keys"). ``rotate="auto"`` decides per layer at its first pack: it packs
      the keys both ways and keeps the way whose attention, for the layer's
      newest 32 queries, diverges less from the exact one
      (``stores.rotation.rotation_helps``); +7.9% and +7.2% on the two
      models. After a prompt shorter than ``residual + group`` nothing is
      packed at prefill: the layer holds its newest queries and decides at
      the decode step whose residual overflows. The residual keeps the keys
      as they came, so a decode step reads the packed part with ``q @ R``
      and the residual with ``q``: one kernel call on the CPU
      (``ops.packed_attention(residual_query=...)``), two joined by their
      log-sum-exps elsewhere. Off by default (the paper's
      method); ``LowBits``, ``MiKV`` and ``ZipCache`` take it too (both
      packed widths rotated), ``MiniCache`` refuses it;
    * ``sinks`` (not in the paper; KVQuant's and IntactKV's attention-sink
      tokens kept exact) keeps the first ``sinks`` slots of every head in
      full precision, never packed: the first token's key is the attention
      sink, far from the others in many channels, and in KIVI's first key
      group it sets every channel's range, so the group's other 31 keys get
      coarse codes. The block sits at the front of the full-precision
      residual, so the same kernel call reads it (a call of its own, joined
      by log-sum-exp, when a padded row's padding reaches past the packed
      part or the row is shorter than ``sinks``). ``sinks=4`` was chosen
      on the development windows (1 and 16 did worse on Gemma 3, 32 no
      better on the default model): KIVI-2 +17.5% -> +12.5% perplexity
      on the default model, rotated +7.8% -> +4.4%, Gemma 3 +6.8% ->
      +3.1%. On 16 held-out windows the default model's KIVI-2 with
      ``rotate="auto"`` goes from +8.0% to +3.8% (RESULTS, "Attention
      sinks kept in full precision"). Off by default (the paper's method).
      Taken at the layer's first pack; sliding-window layers keep none
      (their window leaves the first tokens behind); mixed precision and
      ``MiniCache`` refuse it; in a left-padded batch a row whose real
      tokens are fewer than ``sinks`` keeps its padding's slots in the sink
      block, masked. Behind a per-head or merging evictor (``EMS``,
      ``AdaKV``, ...) the block holds each head's first ``sinks`` kept
      slots, taken when the layer is packed, with their merge counts
      (``ops.packed_attention(residual_counts=...)``); in a batch each row
      takes the block it takes alone (fewer sinks where a row's heads hold
      little beyond their residual);
    * ``feedback=True`` (not in the paper; GPTQ's error feedback with the
      queries as its inputs, as SQuat does for keys) packs each key group
      channel after channel and carries each channel's rounding error into
      the channels not yet rounded, weighted so that the error of the logits
      ``q . k`` falls rather than each key's own
      (``ops.pack_keys(feedback=...)``, ``stores.feedback``). The weights
      come from the second moment of the queries the layer has seen when it
      first packs (the prompt's; after a short prompt, also those of the
      decode steps until the residual overflows), per kv head, in the
      rotated basis on a rotated layer; they are kept through later packs
      and re-packs. Same codes, scales and kernel; the weights are held as
      their strict upper triangle in bfloat16, ``D * (D - 1)`` bytes per kv
      head and layer (0.35 MiB on the default model, 1.1 MiB on Gemma 3;
      counted in the cache's bytes). Sliding-window layers take it too;
      values are packed as without it. On 16 held-out windows of the
      default model it takes ``KIVI(bits=2, rotate="auto", sinks=4)`` from
      +3.8% to +1.6% perplexity (RESULTS, "Key feedback"). Off by default
      (the paper's method); mixed precision and ``MiniCache`` refuse it;
    * ``clip_values`` (not in the paper; the clipped ranges of weight
      quantizers such as OmniQuant's and AWQ's search, applied to KIVI's
      per-token value groups) packs each value group over a range clipped
      for the least squared error instead of its min..max
      (``ops.pack_values(clip=True)``: among 45 ranges cutting up to 40%,
      elements outside take the end codes). Same codes, scales, bytes and
      kernel. Whether it helps depends on the layer: a clipped outlier
      channel's error is the same sign for every token, so attention's
      average does not shrink it, and the output projection may weigh that
      channel heavily. Clipping every layer's values takes the default
      model's 2-bit values from +0.3% to +1.9% perplexity and Gemma 3's
      global layers' from +1.2% to -0.1% (RESULTS, "Clipped value ranges
      and unpacked windows").
      ``clip_values="auto"`` decides per layer at its first pack, as
      ``rotate="auto"`` does for keys, from the newest 32 queries: it clips
      when that lowers the error the layer's attention output carries into
      the residual stream, ``W_o . sum_t p_t (v^_t - v_t)`` summed over the
      queries (``stores.value_clip``; ``W_o`` is the attention's output
      projection, which ``kvcompress.compress`` hands the cache; without
      one, as when a cache is driven directly, the plain attention-output
      error, which alone picks clipping where it hurts). With ``bits=2,
      rotate="auto", sinks=4, feedback=True`` it takes held-out perplexity
      from +1.6% to +1.1% on the default model (``True``: +2.2%) and from
      +4.7% to +4.2% on Gemma 3; the choice costs 0.3 s of a 1K prefill
      and 2.5 s of an 8K one (+5%; RESULTS, "Faster per-layer tests").
      Behind a method that evicts or merges, ``"auto"`` does not clip (and
      costs nothing): there clipping raised KL to the full cache on both
      seeds, also when decided by each layer's error against the full
      prompt's attention (RESULTS, "Clipping behind an evictor");
      ``True`` still clips. Off by default (the paper's method); mixed
      precision and ``MiniCache`` refuse it;
    * ``pack_windows=False`` (ours) leaves sliding-window layers (Gemma 2/3,
      Mistral, ...) unpacked: each keeps its window, at most ``window - 1``
      slots per head, in full precision, as without a quantizer, and only
      full-attention layers are packed. A window's bytes are bounded
      however long the context, while a full-attention layer's grow with
      it, so at long contexts this costs little memory for the quality of
      the sliding layers: on Gemma 3 (15 of 18 layers slide over 512
      tokens) it takes the recommended 2-bit setting from +4.7% to +1.1%
      held-out perplexity (+0.8% with ``clip_values="auto"``), for 7.8 MiB
      more whatever the context (RESULTS, "Clipped value ranges and
      unpacked windows"). ``pack_windows=2|4|8`` packs sliding layers'
      keys and values at that width instead of ``bits``/``value_bits``
      (their rotation, feedback and clipping as on the other layers): a
      window's packed part is small next to its full-precision residual,
      so 4 bits there cost little more than 2, and on Gemma 3 they keep
      most of what unpacked windows gain (RESULTS, "Sliding windows at a
      width of their own").
      On by default: sliding layers are packed like the others.
    * ``keep_rows`` (ours; behind a merging method such as EMS, which keeps
      its budget while decoding by re-merging a packed layer every
      ``interval`` slots): at such a round, a key group of which at least
      ``keep_rows`` members come through unchanged keeps its place, its range
      and their codes, and its other rows become placeholders that weigh
      nothing (``stores.keep_rows``); the rest is packed afresh. Packing
      every kept slot again re-quantizes nearly all of them on new grids,
      and at 2 bits that error grows round after round. Default ``None``:
      half a group; 0 packs everything again at every round (as before
      2026-12-05). With EMS + KIVI-2 at EMS's default interval it takes KL
      to the full cache from 0.175 to 0.144 on development passages and
      from 0.302 to 0.221 on held-out ones (11/12 and 12/12 lower) for 2%
      more bytes and about 2 ms per layer and round (RESULTS, "Keeping the
      packed rows through a round", "A cheaper ``keep_rows`` round").

    * in a batch (``rows_apart``: a layer that is not re-compressed while
      decoding, sliding-window layers included on the CPU), each row packs on its own
      schedule, from its first real token (and a sliding layer drops its
      own groups as its window passes them), and makes the once-only
      choices above (``rotate`` and ``clip_values`` ``"auto"``,
      ``feedback=True``'s weights) itself, at its own first pack, from its
      own queries and keys: it packs, and generates, what it does alone.
      Behind a per-head evictor that packs once (``interval=0``) each row
      makes the choices itself too; with rounds (``interval > 0``) they
      are the batch's.

    Bytes per token and head: ``D * (bits + value_bits) / 8`` for the codes,
    ``2 * 4 * D / group`` for the key mins/scales, ``2 * 4 * ceil(D /
    group)`` for the value mins/scales, plus the residual window (and the
    sink block: ``2 * sinks * D`` elements per head) in the model's dtype.
    """

    bits: int = 4
    group: int = 32
    residual: int = 128
    value_bits: int | None = None
    rotate: bool | str = False
    sinks: int = 0
    feedback: bool = False
    clip_values: bool | str = False
    pack_windows: bool | int = True
    keep_rows: int | None = None
    _keeps: ClassVar[str] = "quantizes and evicts nothing"

    def _check_fields(self) -> None:
        super()._check_fields()
        self._check_int("bits", self.bits, 2)
        if self.bits not in (2, 4, 8):
            raise ValueError(f"bits: must be 2, 4 or 8, got {self.bits}")
        if self.value_bits is not None:
            self._check_int("value_bits", self.value_bits, 2)
            if self.value_bits not in (2, 4, 8):
                raise ValueError(f"value_bits: must be None (= bits), 2, 4 or 8, got {self.value_bits}")
        self._check_int("group", self.group, 1)
        if self.group > MAX_GROUP:
            # a per-head layer pads every head to whole groups: a huge group is
            # that many rows per head, whatever the head keeps
            raise ValueError(f"group: must be <= {MAX_GROUP} (tokens per key group; the papers use 32 to 128), "
                             f"got {self.group}")
        self._check_int("residual", self.residual, 0)
        self._check_int("sinks", self.sinks, 0)
        if not isinstance(self.feedback, bool):
            raise TypeError(f"feedback: expected True or False, got {self.feedback!r}")
        if not isinstance(self.pack_windows, bool):
            if type(self.pack_windows) is not int:
                raise TypeError(f"pack_windows: expected True, False or a width of 2, 4 or 8 bits, got "
                                f"{self.pack_windows!r}")
            if self.pack_windows not in (2, 4, 8):
                raise ValueError(f"pack_windows: a width must be 2, 4 or 8 bits, got {self.pack_windows}")
        if self.keep_rows is not None:
            self._check_int("keep_rows", self.keep_rows, 0)
        if not isinstance(self.clip_values, bool) and self.clip_values != "auto":
            raise TypeError(f"clip_values: expected True, False or 'auto', got {self.clip_values!r}")
        _check_rotate(self)
        if self.interval != 16:
            # a quantizer keeps every token: a composition's rounds are its evictor's
            raise ValueError(f"interval: {type(self).__name__} evicts nothing and has no rounds of its own; give "
                             f"interval= to the evictor it follows (EMS(ratio=0.5, interval=64) + KIVI(bits=2)), "
                             f"got interval={self.interval!r}")

    @property
    def packing(self) -> tuple[int, int, int, int]:
        """``(bits, group, residual, value_bits)`` of the packed store the
        layers use (``value_bits`` filled in)."""
        return self.bits, self.group, self.residual, self.bits if self.value_bits is None else self.value_bits

    @property
    def rotates_keys(self) -> bool | str:
        """Whether packed keys are quantized in the rotated basis: ``rotate``
        (True, False or ``"auto"``, decided per layer)."""
        return self.rotate

    @property
    def fp_sinks(self) -> int:
        """First slots of every head the packed store keeps in full precision (``sinks``)."""
        return self.sinks

    @property
    def key_feedback(self) -> bool:
        """Whether packed keys are rounded with query-weighted error feedback (``feedback``)."""
        return self.feedback

    @property
    def value_clip(self) -> bool | str:
        """Whether packed value groups take clipped ranges (``clip_values``:
        True, False or ``"auto"``, decided per layer)."""
        return self.clip_values

    @property
    def packs_windows(self) -> bool:
        """Whether sliding-window layers are packed too (``pack_windows``)."""
        return self.pack_windows is not False

    @property
    def min_live_rows(self) -> int:
        """Unchanged members a key group needs to keep its codes through a
        decode-time round behind a merging method (``keep_rows``, default
        half a group; 0: none)."""
        return self.group // 2 if self.keep_rows is None else self.keep_rows

    @property
    def window_packing(self) -> tuple[int, int, int, int]:
        """:attr:`packing` of sliding-window layers: a width of its own for
        keys and values with ``pack_windows=2|4|8``, else the same."""
        if isinstance(self.pack_windows, bool):
            return self.packing
        return self.pack_windows, self.group, self.residual, self.pack_windows

    def _value_text(self) -> str:
        return "" if self.value_bits is None else f", value_bits={self.value_bits}"

    def describe(self) -> str:
        sinks = f", sinks={self.sinks}" if self.sinks else ""
        fb = ", feedback=True" if self.feedback else ""
        fb += f", clip_values={self.clip_values!r}" if self.clip_values else ""
        fb += "" if self.pack_windows is True else f", pack_windows={self.pack_windows!r}"
        fb += "" if self.keep_rows is None else f", keep_rows={self.keep_rows}"
        return (f"KIVI(bits={self.bits}{self._value_text()}, group={self.group}, residual={self.residual}"
                f"{_rotate_text(self)}{sinks}{fb})")

    def __repr__(self) -> str:
        # budget, ratio and interval mean nothing for a method that keeps every token
        return self.describe()


@dataclass(repr=False)
class LowBits(KIVI):
    """Keep what an evictor would drop, at ``bits`` bits (mixed precision).

    Not used alone: ``SnapKV(ratio=0.75) + LowBits(bits=2)`` keeps the quarter
    SnapKV selects in full precision and packs the other three quarters at 2
    bits (KIVI's layout and kernel), where SnapKV alone would evict them.
    :class:`MiKV` and :class:`ZipCache` are this with their papers' importance
    (each builds its own from its ``bits``, ``group``, ``high_bits`` and
    ``rotate``; another ``quant=`` is refused).

    ``high_bits`` (2, 4 or 8, at least ``bits``; default None: full
    precision) packs the selected tokens too, at that width:
    ``SnapKV(ratio=.75) + LowBits(bits=2, high_bits=8)`` holds every prompt
    token in packed bits, the selected quarter at 8.

    Our choices:

    * the selected tokens and every later token stay in full precision (the
      residual window of ``ops.packed_attention``), the others are packed once,
      after the prefill; nothing is demoted or evicted while decoding;
    * with ``high_bits`` the selected tokens are packed once, after the
      prefill, in the same layout (keys per channel in groups of ``group`` of
      the selected tokens, in token order, values per token); the tokens
      generated later stay in full precision. Attention reads the two packed
      widths with two calls of ``ops.packed_attention`` (the low part with the
      full-precision window, the high part alone) joined exactly through
      their log-sum-exps, so nothing is dequantized;
    * a sliding-window layer (Mistral, Gemma 2/3, ...) is never scored, so
      it demotes nothing and evicts nothing: it keeps its whole window
      (``window - 1`` slots) in full precision, whatever the target;
    * the evictor must keep the same number of slots in every head (SnapKV,
      H2O, TOVA, StreamingLLM, Knorm, PyramidKV; not AdaKV or EMS), because
      the full-precision part is one ``[B, H, r, D]`` window;
    * in a batch each row is split as it is alone: its own selected count,
      its own other tokens packed in groups from its first one, and a row
      the evictor leaves whole (shorter than the budget) kept in full
      precision; ``rotate="auto"`` is decided per row. So a left-padded row
      holds and reads what it holds alone, with ``ratio=`` too.
    """

    bits: int = 2
    residual: int = 0
    high_bits: int | None = None
    #: the evictor's dropped tokens are packed, not evicted
    demotes: ClassVar[bool] = True

    def _check_fields(self) -> None:
        super()._check_fields()
        if self.residual:
            raise ValueError(f"residual: LowBits keeps the evictor's selection in full precision and has no "
                             f"residual window of its own, got residual={self.residual}")
        if self.sinks:
            raise ValueError(f"sinks: LowBits keeps the evictor's selection (sinks included, when selected) in "
                             f"full precision or high_bits and packs the rest once; it keeps no sink block, "
                             f"got sinks={self.sinks}")
        if self.feedback:
            raise ValueError("feedback: LowBits packs its two widths without key feedback, got feedback=True")
        if self.clip_values:
            raise ValueError(f"clip_values: LowBits packs its values over their min..max, got "
                             f"clip_values={self.clip_values!r}")
        if self.keep_rows is not None:
            raise ValueError(f"keep_rows: LowBits packs once and never re-packs while decoding, got "
                             f"keep_rows={self.keep_rows}")
        if self.pack_windows is not True:
            raise ValueError("pack_windows: LowBits never packs sliding-window layers (it scores none, so "
                             "demotes nothing there); leave pack_windows at True")
        _check_high_bits(self)

    def describe(self) -> str:
        high = "" if self.high_bits is None else f", high_bits={self.high_bits}"
        return f"LowBits(bits={self.bits}{self._value_text()}, group={self.group}{high}{_rotate_text(self)})"


def _check_rotate(m) -> None:
    """``rotate``: True, False or ``"auto"``."""
    if not isinstance(m.rotate, bool) and m.rotate != "auto":
        raise TypeError(f"rotate: expected True, False or 'auto', got {m.rotate!r}")


def _rotate_text(m) -> str:
    """``rotate`` as ``describe()`` shows it (nothing when off)."""
    return f", rotate={m.rotate!r}" if m.rotate else ""


def _check_high_bits(m) -> None:
    """``high_bits``: None, or 2/4/8 and at least ``bits``."""
    hb = m.high_bits
    if hb is None:
        return
    if isinstance(hb, bool) or not isinstance(hb, int) or hb not in (2, 4, 8):
        raise ValueError(f"high_bits: must be None (full precision), 2, 4 or 8, got {hb!r}")
    if hb < m.bits:
        raise ValueError(f"high_bits: must be at least bits={m.bits} (the selected tokens never get less "
                         f"precision than the rest), got {hb}")


class _MixedPrecision:
    """MiKV and ZipCache: an evictor's selection whose rest is packed by a
    :class:`LowBits` quantizer built from ``bits``, ``group`` and
    ``high_bits``."""

    def __post_init__(self) -> None:
        derived = LowBits(bits=self.bits, group=self.group, high_bits=self.high_bits, rotate=self.rotate)
        q = self.quant
        if q is not None and not getattr(q, "_derived", False) and q != derived:
            # the quantizer is this method's own bits, group, high_bits and rotate: another one
            # would pack (or evict) otherwise than the method says it does
            given = q.describe() if isinstance(q, Method) else repr(q)
            raise ValueError(f"quant: {type(self).__name__} packs what it demotes with {derived.describe()}, "
                             f"built from its bits, group, high_bits and rotate; set those instead of "
                             f"quant={given}")
        # (re)built from the fields: dataclasses.replace(m, bits=4) carries the old one along
        object.__setattr__(derived, "_derived", True)
        self.quant = derived
        super().__post_init__()

    def _check_fields(self) -> None:
        super()._check_fields()
        _check_high_bits(self)
        _check_rotate(self)

    def _size(self) -> str:
        return f"budget={self.budget}" if self.budget is not None else f"ratio={self.ratio}"

    def _high(self) -> str:
        return f", high_bits={self.high_bits}{_rotate_text(self)}"

    def _tail(self) -> str:
        """The evictor's settings that change what is kept, where not the defaults."""
        text = ", lookahead=True" if self.lookahead else ""
        return text + ("" if self.lookahead_room is None else f", lookahead_room={self.lookahead_room}")

    def __repr__(self) -> str:
        return self.describe()


@dataclass(repr=False)
class MiKV(_MixedPrecision, H2O):
    """MiKV: H2O's heavy hitters at high precision (8 bits), the rest at low precision.

    Paper (Yang et al., "No Token Left Behind: Reliable KV Cache Compression
    via Importance-Aware Mixed Precision Quantization", 2024): an eviction
    policy's importance (H2O's accumulated attention with a recent window)
    splits each head's cache; instead of evicting the unimportant tokens it
    keeps them at low precision (2-4 bits), and the important ones at high
    precision, with the outlier channels of queries and keys balanced before
    quantizing the important ones.

    Our reading and choices: ``ratio``/``budget`` say how many tokens drop to
    ``bits`` (as they would be evicted by :class:`H2O` with the same
    ``recent`` split); the important ones are packed at ``high_bits`` (8 by
    default, the paper's INT8 "high precision"; None keeps them in the
    model's own precision) in the same layout, without the outlier balancing
    (keys are quantized per channel, which already gives outlier channels
    their own scale). ``high_bits=8`` was chosen on the packaged
    (development) text: at ratio 0.75 it holds 2.6x fewer bytes than full
    precision with the same KL@16 (0.0836 against 0.0838 at 2 bits, 0.0007
    both at 4 bits) and passkeys (RESULTS "The selected tokens at 4 or 8
    bits"). The low-precision tokens use KIVI's
    packing (keys per channel in groups of ``group`` tokens, values per
    token), read directly by ``ops.packed_attention``. The split is made once,
    after the prefill; generated tokens stay in full precision. See
    :class:`LowBits` for the batch rule. ``rotate`` packs both widths' keys
    rotated, as :class:`KIVI`'s (default off).
    """

    bits: int = 2
    group: int = 32
    high_bits: int | None = 8
    rotate: bool | str = False

    def describe(self) -> str:
        return (f"MiKV({self._size()}, bits={self.bits}{self._high()}, group={self.group}, recent={self.recent}"
                f"{self._tail()})")


@dataclass(repr=False)
class ZipCache(_MixedPrecision, Method):
    """ZipCache: normalised-attention saliency decides each token's precision.

    Paper (He et al., "ZipCache: Accurate and Efficient KV Cache Quantization
    with Salient Token Identification", NeurIPS 2024): a token's saliency is
    the attention it receives summed over the queries that can see it,
    divided by their number (plain accumulated attention favours early
    tokens, which more queries see); it is estimated from a few probe queries
    (about 10%: recent and random ones). Salient tokens are quantized at more
    bits (4), the rest at fewer (2), with channel-separable token-wise
    quantization.

    Our reading and choices: saliency is :func:`kvcompress.ops.global_scores`
    (the mean attention a key receives from the queries after it, exactly the
    normalised score) over ``probe`` of the prompt's queries (its last half
    plus a strided, not random, sample of the rest: ``ops.probe_positions``),
    GQA groups averaged; ``ratio``/``budget`` say how many tokens are not
    salient. Salient tokens are packed at ``high_bits`` (8 by default; the
    paper's 4 is ``high_bits=4``; None keeps them in the model's own
    precision), the others at ``bits``, both in KIVI's layout (keys per
    channel, values per token; the paper's channel-separable token-wise keys
    are not built); the ``window`` newest prompt tokens are always salient.
    ``high_bits=8`` was chosen on the packaged (development) text: at ratio
    0.75 and 2 bits its KL@16 equals full precision's (0.0621 against 0.0619)
    at 2.6x fewer bytes, where 4 bits gave 0.0694 (intervals overlapping)
    at 3.1x fewer (RESULTS "The selected tokens at 4 or 8 bits"). See :class:`LowBits` for what happens while decoding and in a
    batch. ``rotate`` packs both widths' keys rotated, as :class:`KIVI`'s
    (default off).
    """

    bits: int = 2
    group: int = 32
    high_bits: int | None = 8
    probe: float = 0.1
    window: int = 8
    rotate: bool | str = False

    def _check_fields(self) -> None:
        super()._check_fields()
        self._check_int("window", self.window, 0)
        p = self.probe
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < float(p) <= 1.0:
            raise ValueError(f"probe: expected a fraction in (0, 1], got {p!r}")

    def min_budget(self) -> int:
        return self.window + 1

    def _forced_text(self) -> str:
        return f"the window={self.window} newest tokens plus at least one other"

    def score(self, view: LayerView):
        return ops.global_scores(view.queries, view.keys, scaling=view.scaling, kv_start=view.kv_start,
                                 probe=float(self.probe))

    def forced(self, view: LayerView, keep: int) -> tuple[int, int]:
        return 0, min(keep, self.window)

    def describe(self) -> str:
        return (f"ZipCache({self._size()}, bits={self.bits}{self._high()}, group={self.group}, probe={self.probe}, "
                f"window={self.window}{self._tail()})")
