"""What differs between the transformers releases we support (5.0 to the newest 5.x).

The cache argument of ``forward()``/``generate()`` was renamed from
``past_key_values`` to ``cache`` (the old name warns with a ``FutureWarning``
and leaves ``forward`` in 5.40). Every call we make goes through
:func:`cache_kwargs`, so it uses whichever name the model's ``forward``
takes and never triggers the deprecation path.
"""

from __future__ import annotations

import inspect

#: names under which a model may take its cache, newest first
CACHE_NAMES = ("cache", "past_key_values")

_by_class: dict[type, str] = {}


def cache_kwarg(model) -> str:
    """The keyword ``model.forward`` takes its cache by: ``"cache"`` on newer
    transformers, ``"past_key_values"`` on older ones."""
    cls = type(model)
    name = _by_class.get(cls)
    if name is None:
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover - C-implemented forward
            params = {}
        name = "cache" if "cache" in params else "past_key_values"
        _by_class[cls] = name
    return name


def decoder_config(config):
    """The config of a model's text decoder (``get_text_config(decoder=True)``),
    or ``config`` itself where there is no such reading: what the cache's
    layers are counted, typed and sized by in vision and speech models too."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` for a ``model(...)`` or ``model.generate(...)`` call."""
    return {cache_kwarg(model): cache}


def pop_cache(kwargs: dict):
    """Remove and return the cache from call ``kwargs`` under either name.

    Raises ``ValueError`` when both names are given (transformers does too).
    """
    given = [name for name in CACHE_NAMES if kwargs.get(name) is not None]
    if len(given) > 1:
        raise ValueError("cache: pass the cache as `cache=` or `past_key_values=`, not both")
    cache = None
    for name in CACHE_NAMES:
        value = kwargs.pop(name, None)
        if value is not None:
            cache = value
    return cache


def output_cache(output):
    """The cache a model or ``generate()`` output carries, under either name,
    without touching the deprecated attribute on newer releases."""
    fields = getattr(type(output), "__dataclass_fields__", {})
    for name in CACHE_NAMES:
        if name in fields:
            return getattr(output, name)
    return None
