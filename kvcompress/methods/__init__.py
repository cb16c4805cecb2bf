"""Compression methods (dataclasses); see ``base.Method`` for the contract."""

import dataclasses

from .accumulated import H2O, TOVA, VATP
from .actqkv import ActQKV
from .base import DecodeMethod, LayerView, Method
from .ems import EMS
from .fastgen import FastGen
from .headkv import HeadKV
from .keyformer import Keyformer
from .kvcrush import KVCrush
from .kvmerger import KVMerger
from .kvsharer import KVSharer
from .lagkv import LagKV
from .layerbudget import DynamicKV, SqueezeAttention
from .minicache import MiniCache
from .quant import KIVI, LowBits, MiKV, ZipCache
from .razor import RazorAttention
from .scope import SCOPE
from .simple import Knorm, StreamingLLM
from .sparse import MagicPIG, Quest, TidalDecode
from .taskkv import TaskKV
from .window import AdaKV, PyramidKV, SnapKV

#: Methods by lower-case name, as the command line spells them.
REGISTRY: dict[str, type[Method]] = {
    cls.__name__.lower(): cls for cls in (EMS, StreamingLLM, SnapKV, PyramidKV, AdaKV, Knorm, LagKV, H2O, TOVA, VATP,
                                           Keyformer, KIVI, LowBits, MiKV, ZipCache, Quest, TidalDecode, MagicPIG,
                                           MiniCache, KVSharer, HeadKV, RazorAttention, KVCrush,
                                           KVMerger, ActQKV, TaskKV, DynamicKV, SqueezeAttention,
                                           SCOPE, FastGen)
}


#: Mixed-precision methods: they select like an evictor (and take a budget or
#: ratio) but pack the unselected tokens instead of dropping them, once, after
#: the prefill; their memory is not bounded while decoding.
MIXED_PRECISION: tuple[str, ...] = ("mikv", "zipcache")

#: Names of the methods that evict or merge (they take a budget or ratio and
#: keep it while decoding).
EVICTING: tuple[str, ...] = tuple(name for name, cls in REGISTRY.items()
                                  if cls.evicts and name not in MIXED_PRECISION)


def method_from_name(name: str, *, budget: int | None = None, ratio: float | None = None, **options) -> Method:
    """Build a registered method by name (case-insensitive), e.g.
    ``method_from_name("snapkv", budget=128)``."""
    try:
        cls = REGISTRY[name.strip().lower()]
    except KeyError:
        raise ValueError(f"methods: unknown method {name!r}; choose from {', '.join(REGISTRY)}") from None
    return cls(budget=budget, ratio=ratio, **options)


def _option_value(text: str):
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(low)
        except ValueError:
            pass
    return text.strip()


def parse_method_spec(spec: str) -> tuple[str, dict]:
    """Split ``"name:opt=value:opt=value"`` (e.g. ``"ems:lam=1:tau=inf"``) into
    the registered name and its options (ints, floats, ``inf``, ``true``/
    ``false``, ``none`` or strings)."""
    name, *parts = spec.strip().split(":")
    name = name.strip().lower()
    if "+" in spec:
        raise ValueError(f"methods: {spec!r} composes methods: split it on '+' (see method_from_spec)")
    if name not in REGISTRY:
        raise ValueError(f"methods: unknown method {name!r} in {spec!r}; choose from {', '.join(REGISTRY)}")
    cls = REGISTRY[name]
    allowed = {f.name for f in dataclasses.fields(cls)} - {"budget", "ratio", "quant", "sparse", "depth"}
    options = {}
    for part in parts:
        key, eq, value = part.partition("=")
        key = key.strip()
        # command lines are lower-cased on the way in: MagicPIG's K and L are k and l there
        key = {a.lower(): a for a in allowed}.get(key.lower(), key) if key not in allowed else key
        if not eq or not key:
            raise ValueError(f"methods: expected option=value after ':' in {spec!r}, got {part!r}")
        if key not in allowed:
            raise ValueError(f"methods: {cls.__name__} has no option {key!r} (in {spec!r}); "
                             f"options: {', '.join(sorted(allowed)) or 'none'}")
        if key in options:
            raise ValueError(f"methods: option {key!r} is given twice in {spec!r}")
        options[key] = _option_value(value)
    return name, options


def spec_evicts(spec: str) -> bool:
    """Whether a command-line spec (``"snapkv"``, ``"ems+kivi:bits=2"``)
    evicts or merges, i.e. takes a budget or ratio."""
    return REGISTRY[parse_method_spec(spec.split("+", 1)[0])[0]].evicts


def method_from_spec(spec: str, *, budget: int | None = None, ratio: float | None = None) -> Method:
    """Build a method from a command-line spec such as ``"ems:tau=inf"``.

    A method that keeps every token (``KIVI``) ignores ``budget`` and
    ``ratio``, so one grid of settings can list it beside evicting methods.
    ``"evictor+quantizer"`` (``"snapkv+kivi:bits=2"``) packs the evictor's
    kept slots: the budget or ratio goes to the evictor.
    """
    if "+" in spec and any(not part.strip() for part in spec.split("+")):
        raise ValueError(f"methods: {spec!r}: a method is missing around '+' (e.g. 'snapkv+kivi:bits=4')")
    if spec.count("+") == 2:
        # evictor+minicache+quantizer
        head, _, last = spec.rpartition("+")
        if not getattr(REGISTRY.get(parse_method_spec(head.partition("+")[2])[0]), "takes_quant", False):
            raise ValueError(f"methods: {spec!r}: compose at most two methods (evictor+quantizer or "
                             "evictor+reader), or three as evictor+minicache+quantizer")
        try:
            return method_from_spec(head, budget=budget, ratio=ratio) + method_from_spec(last)
        except (TypeError, ValueError) as e:
            raise ValueError(f"methods: {spec!r}: {e}") from None
    if "+" in spec:
        first, _, second = spec.partition("+")
        if "+" in second:
            raise ValueError(f"methods: {spec!r}: compose at most two methods (evictor+quantizer or "
                             "evictor+reader), or three as evictor+minicache+quantizer")
        takes_quant = getattr(REGISTRY[parse_method_spec(first)[0]], "takes_quant", False)
        if not (spec_evicts(first) or takes_quant) or spec_evicts(second):
            raise ValueError(f"methods: {spec!r}: write evictor+quantizer, e.g. 'snapkv+kivi:bits=4', "
                             f"evictor+reader, e.g. 'snapkv+quest:token_budget=256', evictor+minicache or minicache+kivi "
                             f"(methods that keep every "
                             f"token: {', '.join(n for n, c in REGISTRY.items() if not c.evicts)})")
        evictor = method_from_spec(first, budget=budget, ratio=ratio)
        quant = method_from_spec(second)
        try:
            return evictor + quant
        except (TypeError, ValueError) as e:
            raise ValueError(f"methods: {spec!r}: {e}") from None
    name, options = parse_method_spec(spec)
    if not REGISTRY[name].evicts:
        budget = ratio = None
    try:
        return method_from_name(name, budget=budget, ratio=ratio, **options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"methods: {spec!r}: {e}") from None


__all__ = [
    "Method", "DecodeMethod", "LayerView", "REGISTRY", "EVICTING", "MIXED_PRECISION", "method_from_name",
    "method_from_spec",
    "parse_method_spec", "spec_evicts",
    "EMS", "StreamingLLM", "SnapKV", "PyramidKV", "AdaKV", "Knorm", "LagKV", "H2O", "TOVA", "VATP", "Keyformer",
    "KIVI", "LowBits", "MiKV", "ZipCache", "Quest", "TidalDecode", "MagicPIG", "MiniCache", "KVSharer", "HeadKV",
    "RazorAttention", "KVCrush", "KVMerger", "ActQKV", "TaskKV",
    "DynamicKV", "SqueezeAttention", "SCOPE", "FastGen",
]
