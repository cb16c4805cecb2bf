"""Quantization methods: KIVI (packed low-bit keys and values)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Method


@dataclass
class KIVI(Method):
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
      step); a group whose max equals its min is stored exactly;
    * the residual holds between ``residual`` and ``residual + group - 1``
      tokens: once it reaches ``residual + group`` the oldest whole groups are
      packed. A prefill therefore packs everything but its last ``residual``
      tokens (rounded to whole groups), never the whole prompt, and its own
      attention runs in full precision (as the paper's prefill does);
    * attention reads the packed bits directly (``ops.packed_attention``):
      per query and key group the channel scales are folded into the query,
      so no dequantized copy of the cache exists;
    * nothing is evicted (``ratio`` is 0); sliding-window layers (Gemma 2/3)
      keep their few hundred window slots in full precision;
    * ``bits`` defaults to 4 (the paper's near-lossless setting; its headline
      2-bit setting loses about 1 point on LongBench for Mistral-7B).

    Bytes per token and head: ``2 * D * bits / 8`` for the codes, ``2 * 4 *
    D / group`` for the key mins/scales, ``2 * 4 * ceil(D / group)`` for the
    value mins/scales, plus the residual window in the model's dtype.
    """

    ratio: float | None = None
    bits: int = 4
    group: int = 32
    residual: int = 128
    needs_queries: ClassVar[bool] = False
    evicts: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.budget is None and self.ratio is None:
            self.ratio = 0.0  # built by name with neither: nothing is evicted
        super().__post_init__()

    def _check_fields(self) -> None:
        if self.budget is not None or self.ratio:
            raise ValueError(
                f"KIVI quantizes and evicts nothing: budget/ratio must not be given (got budget={self.budget!r}, "
                f"ratio={self.ratio!r}); compose it with an eviction method to evict as well")
        self._check_int("bits", self.bits, 2)
        if self.bits not in (2, 4, 8):
            raise ValueError(f"bits: must be 2, 4 or 8, got {self.bits}")
        self._check_int("group", self.group, 1)
        self._check_int("residual", self.residual, 0)

    @property
    def packing(self) -> tuple[int, int, int]:
        """``(bits, group, residual)`` of the packed store the layers use."""
        return self.bits, self.group, self.residual

    def describe(self) -> str:
        return f"KIVI(bits={self.bits}, group={self.group}, residual={self.residual})"

    def __repr__(self) -> str:
        # budget, ratio and interval mean nothing for a method that keeps every token
        return self.describe()
