"""Compression methods (dataclasses); see ``base.Method`` for the contract."""

from .accumulated import H2O, TOVA, VATP
from .base import DecodeMethod, LayerView, Method
from .ems import EMS
from .simple import Knorm, StreamingLLM
from .window import AdaKV, PyramidKV, SnapKV

#: Methods by lower-case name, as the command line spells them.
REGISTRY: dict[str, type[Method]] = {
    cls.__name__.lower(): cls for cls in (EMS, StreamingLLM, SnapKV, PyramidKV, AdaKV, Knorm, H2O, TOVA, VATP)
}


def method_from_name(name: str, *, budget: int | None = None, ratio: float | None = None, **options) -> Method:
    """Build a registered method by name (case-insensitive), e.g.
    ``method_from_name("snapkv", budget=128)``."""
    try:
        cls = REGISTRY[name.strip().lower()]
    except KeyError:
        raise ValueError(f"methods: unknown method {name!r}; choose from {', '.join(REGISTRY)}") from None
    return cls(budget=budget, ratio=ratio, **options)


__all__ = [
    "Method", "DecodeMethod", "LayerView", "REGISTRY", "method_from_name",
    "EMS", "StreamingLLM", "SnapKV", "PyramidKV", "AdaKV", "Knorm", "H2O", "TOVA", "VATP",
]
