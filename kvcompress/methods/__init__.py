"""Compression methods (dataclasses); see ``base.Method`` for the contract."""

from .accumulated import H2O, TOVA, VATP
from .base import DecodeMethod, LayerView, Method
from .simple import Knorm, StreamingLLM
from .window import PyramidKV, SnapKV

__all__ = [
    "Method", "DecodeMethod", "LayerView",
    "StreamingLLM", "SnapKV", "PyramidKV", "Knorm", "H2O", "TOVA", "VATP",
]
