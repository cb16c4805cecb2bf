"""MiniCache: depth-wise compression by merging adjacent layers' caches."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from .base import KeepsEveryToken


@dataclass
class MiniCache(KeepsEveryToken):
    """MiniCache: adjacent layers share one direction per token, each keeps its norms.

    Paper (Liu et al., "MiniCache: KV Cache Compression in Depth Dimension
    for Large Language Models", NeurIPS 2024, arXiv 2405.14366): the KV
    states of adjacent layers from the middle of the network to the end are
    highly similar in direction, so each pair ``(l-1, l)`` is merged: per
    token, the key (and separately the value) vectors ``x1`` (layer ``l-1``)
    and ``x2`` (layer ``l``) become one shared direction ``e = SLERP(x1/|x1|,
    x2/|x2|; t) = sin((1-t) Omega)/sin Omega * u1 + sin(t Omega)/sin Omega *
    u2`` (``Omega`` the angle between them) plus each layer's magnitude
    ``|x1|, |x2|``; layer ``i`` then reads ``|x_i| * e``. Tokens whose
    directions differ most (angular distance ``d = Omega / pi``) are not
    merged but retained whole in each layer (the paper's retention
    threshold, ``gamma = 0.05``); the paper's interpolation is ``t = 0.6``.

    Our reading and choices:

    * **pairs**: ``(s, s+1), (s+2, s+3), ...`` with ``s = start_layer``
      (default ``num_layers // 2``, the paper's middle) while both layers
      exist; pairs do not overlap, and an odd last layer stays alone;
    * **retention by fraction**: per batch row and kv head the ``ceil(retain
      * shared tokens)`` tokens with the largest distance stay whole in both
      layers (the paper ranks by distance and keeps a small share,
      ``retain=0.05`` by default); a token's distance is the larger of its
      key's and its value's, so keys and values share one slot list; when
      some heads ask none and others some, each keeps at least one (more
      exact, never less);
    * **when**: once, right after the deeper layer's first attention (the
      prefill: both layers' prompt K/V exist then, and both prefill
      attentions ran in full precision); every later token (decoded, or a
      later chunk) is appended unmerged to each layer's own tail;
    * **exactness**: ``retain=1`` keeps every token whole, so generation is
      exactly plain ``generate()``; with ``t=0`` the shared direction is
      layer ``l-1``'s own (bit for bit), so layer ``l-1`` reads ``|x1| *
      x1/|x1|`` (its keys to float rounding) and layer ``l`` reads its norm
      along ``l-1``'s direction; ``t=1`` is the mirror image. Zero vectors
      take the other layer's direction (their own reconstruction is 0);
      ``sin Omega < 1e-6`` uses the renormalised linear blend;
    * **not paired**: sliding-window layers (Gemma 2/3, Mistral) and pairs
      whose layers differ in heads, head size, dtype or held tokens: such a
      pair keeps both layers as they are;
    * **storage and bytes**: per merged token and kv head one key and one
      value direction in the cache's dtype plus four float32 norms and an
      int32 slot; per retained token its key and value in each layer plus an
      int32 slot (``kvcompress.stores.MiniCacheStore``); the shared tensors
      are counted once;
    * **attention**: a decode step reads the merged form in place (C
      ``minicache_attention``); prefill chunks, packed pairs and softcap or
      sink logits reconstruct the layer's view into a scratch buffer (C
      ``slerp_restore``) and run the usual attention over it;
    * **with an evictor** (``SnapKV(ratio=0.5) + MiniCache()``, i.e.
      ``depth=``): each layer evicts exactly as alone at prefill; then the
      tokens both layers of a pair kept (same position) are merged and
      retained as above, and a token only one layer kept stays whole in it.
      Heads then share different numbers of tokens, so the pair's lists are
      padded to the longest head (the padding is counted in the bytes).
      Merged layers are not re-compressed while decoding (their tails grow,
      as with ``+ KIVI``); the other layers keep the evictor's budget.
      When the two layers kept few common tokens the pair can hold more
      bytes than the two layers did (padding, tails' slack). Per-head
      evictors (AdaKV, EMS) work the same way on each head's kept slots; a
      merged token keeps each layer's EMS merge count (the log-count bias of
      that layer's attention);
    * **with a quantizer** (``MiniCache() + KIVI(bits=4)``, i.e. ``quant=``):
      layers outside pairs are packed as by KIVI alone; a pair's directions
      and whole tokens are packed with KIVI's rules (keys per channel over
      ``group`` tokens, values per token over ``group`` channels) once it is
      merged (a paired layer is not packed before), the norms stay float32,
      and attention unpacks them into the scratch view. The tails (tokens
      after the merge) stay in full precision (KIVI's decode-time packing of
      a pair's tail is not built);
    * all three (``EMS(ratio=0.5) + MiniCache() + KIVI(bits=4)``): every
      layer is evicted as alone; unpaired layers are then packed as with
      ``EMS + KIVI``, paired ones merged, then packed as above;
    * sparse readers are refused by name.

    Parameters
    ----------
    start_layer : int or None
        First layer of the first pair (default: ``num_layers // 2``).
    t : float in [0, 1]
        SLERP interpolation towards the deeper layer.
    retain : float in [0, 1]
        Share of each row's tokens kept whole in both layers.
    """

    start_layer: int | None = None
    t: float = 0.6
    retain: float = 0.05
    _keeps: ClassVar[str] = "merges adjacent layers instead of evicting (use t= and retain=)"
    #: ``MiniCache() + KIVI(bits=4)`` packs the merged pairs and the other layers
    takes_quant: ClassVar[bool] = True

    def _check_fields(self) -> None:
        super()._check_fields()
        if self.start_layer is not None:
            self._check_int("start_layer", self.start_layer, 0)
        for name in ("t", "retain"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
            if math.isnan(v) or not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1], got {v}")
        if self.sparse is not None:
            raise ValueError("MiniCache does not compose with sparse readers (a merged pair is not paged)")

    def _check_quant(self) -> None:
        self._check_packer()
        if getattr(self.quant, "value_bits", None) is not None:
            raise ValueError(f"quant: MiniCache's merged pair packs keys and values at one width; give "
                             f"{self.quant.describe()} without value_bits")
        if getattr(self.quant, "rotate", False):
            raise ValueError(f"quant: MiniCache's merged pair packs its keys' directions unrotated; give "
                             f"{self.quant.describe()} without rotate")
        if self.fp_sinks:
            raise ValueError(f"quant: MiniCache's merged pair keeps no sink block; give "
                             f"{self.quant.describe()} without sinks")
        if self.key_feedback:
            raise ValueError(f"quant: MiniCache's merged pair packs without key feedback; give "
                             f"{self.quant.describe()} without feedback")
        if self.value_clip:
            raise ValueError(f"quant: MiniCache's merged pair packs its values over their min..max; give "
                             f"{self.quant.describe()} without clip_values")

    @property
    def cross_layer(self) -> "MiniCache":
        return self

    def first_layer(self, num_layers: int) -> int:
        return num_layers // 2 if self.start_layer is None else self.start_layer

    def partner(self, layer_idx: int, num_layers: int) -> int | None:
        """Layer ``l-1`` when ``layer_idx`` is the deeper layer ``l`` of a pair, else None."""
        s = self.first_layer(num_layers)
        if layer_idx <= s or layer_idx >= num_layers or (layer_idx - s) % 2 == 0:
            return None
        return layer_idx - 1

    def describe(self) -> str:
        start = "" if self.start_layer is None else f"start_layer={self.start_layer}, "
        text = f"MiniCache({start}t={self.t}, retain={self.retain})"
        return text if self.quant is None else f"{text} + {self.quant.describe()}"

    def in_pair(self, layer_idx: int, num_layers: int) -> bool:
        """Whether ``layer_idx`` is either layer of a pair."""
        return self.partner(layer_idx, num_layers) is not None or self.partner(layer_idx + 1, num_layers) == layer_idx

    def __repr__(self) -> str:
        return self.describe()
