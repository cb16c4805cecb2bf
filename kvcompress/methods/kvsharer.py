"""KVSharer: later layers reuse the cache of dissimilar earlier layers."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from .base import KeepsEveryToken


def parse_plan(plan) -> dict[int, int]:
    """``{target: source}`` from ``"9>2/11>4"`` (the command line's
    spelling: target layer > the layer whose cache it reads), a dict, or
    pairs ``((9, 2), (11, 4))``; empty for None or ``""``."""
    if plan is None or plan == "":
        return {}
    if isinstance(plan, str):
        pairs = []
        for part in plan.replace(" ", "").split("/"):
            target, sep, source = part.partition(">")
            if not sep or not target.isdigit() or not source.isdigit():
                raise ValueError(f"plan: expected 'target>source' pairs separated by '/', e.g. '9>2/11>4'; "
                                 f"got {plan!r}")
            pairs.append((int(target), int(source)))
    elif isinstance(plan, dict):
        pairs = list(plan.items())
    else:
        try:
            pairs = [tuple(p) for p in plan]
        except TypeError:
            raise TypeError(f"plan: expected 'target>source/...', a dict or (target, source) pairs, got "
                            f"{type(plan).__name__}") from None
    out: dict[int, int] = {}
    for pair in pairs:
        if len(pair) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair):
            raise TypeError(f"plan: expected (target, source) pairs of ints, got {pair!r}")
        target, source = pair
        if not 0 <= source < target:
            raise ValueError(f"plan: layer {target} can read only an earlier layer's cache, got source {source}")
        if target in out:
            raise ValueError(f"plan: layer {target} is given two sources ({out[target]} and {source})")
        out[target] = source
    chained = sorted(set(out) & set(out.values()))
    if chained:
        raise ValueError(f"plan: layers {chained} both read another layer's cache and are read (no chains)")
    return out


@dataclass
class KVSharer(KeepsEveryToken):
    """KVSharer: a layer attends over another, dissimilar layer's KV cache.

    Paper (Yang et al., "KVSharer: Efficient Inference via Layer-Wise
    Dissimilar KV Cache Sharing", arXiv 2410.18517): counter-intuitively,
    sharing the cache of *dissimilar* layers keeps the output better than
    sharing similar ones. A calibration run gives each layer's KV cache;
    pairs of layers are ranked by the Euclidean distance of their (averaged)
    caches, most dissimilar first, and a pair is accepted (the later layer
    then reads the earlier layer's cache) while the last hidden states of
    the calibration run stay above a cosine similarity threshold with the
    original's, until ``share`` layers share. Nothing is trained.

    Our reading and choices:

    * **plan** ``{target: source}``, ``source < target`` (the source's cache
      exists when the target runs), no chains (a source is never a target);
      given directly (``plan="9>2/11>4"``) or computed from ``calibration``
      token ids by :func:`kvcompress.calibrate_kvsharer` when a
      ``kvcompress.compress(model, ...)`` session starts (``prepare``);
    * a target layer stores nothing: in the prefill and every decode step it
      attends with its own queries over the source's slots (the paper
      replaces the cache in both phases); a plan that shares nothing is plain
      ``generate()``;
    * **calibration** (see :func:`kvcompress.calibrate_kvsharer`): a layer's
      representative is the mean over tokens (and rows) of its keys and of
      its values, concatenated; candidate pairs are all ``(source, target)``
      with ``source < target`` ranked by Euclidean distance, descending; a
      candidate is tried only when its target is not yet sharing and neither
      layer is on the other side of an accepted pair; it is kept when the
      mean cosine similarity of the last hidden states over the calibration
      tokens is at least ``threshold``;
    * **not shared** (the target keeps its own cache, by rule): a source or
      target with a sliding window, or a target whose chunk differs in shape
      or dtype from the source's; a target that turns out to slide while
      sharing is refused (``KVCompressUnsupportedError``);
    * **with an evictor** (``SnapKV(ratio=0.5) + KVSharer(plan=...)``, i.e.
      ``depth=``): every layer that keeps its own cache is compressed as
      alone; a source layer's compression waits until the last layer reading
      it has attended, so each target attends, in every call, over exactly
      the slots its source attended over (prefill: the whole chunk; decode:
      the kept slots plus the new token), then the source evicts and the
      targets read what it keeps from then on. Targets hold nothing, so the
      bytes of a shared layer are saved on top of the eviction;
    * **with a quantizer** (``KVSharer(plan=...) + KIVI(bits=4)``, or
      ``evictor + KVSharer + KIVI``): the layers that keep their own cache
      are packed as the quantizer (after the evictor) would pack them, with
      the same wait for a source; targets read the packed source directly;
    * composing needs the ``"kvcompress"`` attention function (run inside
      ``kvcompress.compress``); sparse readers and MiniCache are refused.

    Parameters
    ----------
    plan : str, dict, pairs or None
        Which layer reads which (``"target>source/..."``).
    calibration : token ids or None
        ``[B, n]`` (or ``[n]``) ids for the calibration helper.
    share : int
        Layers to share when calibrating.
    threshold : float
        Minimum cosine similarity of the last hidden states when calibrating.
    """

    plan: Any = None
    calibration: Any = None
    share: int = 0
    threshold: float = 0.9
    _keeps: ClassVar[str] = "shares whole layers' caches instead of evicting (use plan= or calibration=)"
    #: ``KVSharer(plan=...) + KIVI(bits=4)`` packs the layers that keep a cache
    takes_quant: ClassVar[bool] = True

    def _check_fields(self) -> None:
        super()._check_fields()
        self._pairs = parse_plan(self.plan)
        self._check_int("share", self.share, 0)
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or \
                math.isnan(self.threshold):
            raise TypeError(f"threshold: expected a float, got {self.threshold!r}")
        if (self.calibration is not None or self.share) and self.plan is not None:
            raise ValueError("KVSharer: give plan= or calibration=/share=, not both")
        if self.calibration is not None:
            # checked here, not only after the model has loaded, where the calibration run reads it
            from ..calibrate import _ids

            _ids(self.calibration, "cpu")
        if self.sparse is not None or self.depth is not None:
            raise ValueError("KVSharer does not compose with sparse readers or MiniCache")

    def _check_quant(self) -> None:
        self._check_packer()

    @property
    def pairs(self) -> dict[int, int]:
        """``{target: source}``."""
        return dict(self._pairs)

    @property
    def sharing(self) -> "KVSharer":
        return self

    def source(self, layer_idx: int) -> int | None:
        """The layer whose cache ``layer_idx`` reads, or None."""
        return self._pairs.get(layer_idx)

    def last_reader(self, layer_idx: int) -> int | None:
        """The deepest layer that reads ``layer_idx``'s cache, or None when
        no layer does (the cache delays a source's compression until then)."""
        readers = [t for t, s in self._pairs.items() if s == layer_idx]
        return max(readers) if readers else None

    def prepare(self, model) -> "KVSharer":
        """The method with its plan: calibrated on ``model`` when built with
        ``calibration=`` (once), else itself."""
        if self.calibration is None:
            if self.share and not self._pairs:
                raise ValueError(f"share: KVSharer(share={self.share}) needs calibration= token ids to choose its "
                                 "layers (e.g. kvcompress.calibration_ids(tokenizer), our packaged text) or a "
                                 "plan=; `kvcompress eval` calibrates on its text by itself")
            return self
        from ..calibrate import calibrate_kvsharer

        plan = calibrate_kvsharer(model, self.calibration, self.share, threshold=self.threshold)
        return replace(self, plan=plan.plan, calibration=None, share=0)

    def describe(self) -> str:
        if self.calibration is not None:
            text = f"KVSharer(calibration=..., share={self.share}, threshold={self.threshold})"
        else:
            plan = "/".join(f"{t}>{s}" for t, s in sorted(self._pairs.items()))
            text = f"KVSharer(plan={plan or 'none'})"
        return text if self.quant is None else f"{text} + {self.quant.describe()}"

    def __repr__(self) -> str:
        return self.describe()
