"""Hugging Face transformers integration.

``compress(model, method)`` switches the model to the ``"kvcompress"``
attention function, makes ``generate()`` use a fresh ``KVCache`` unless one is
passed, and undoes all of it on exit. The attention function runs SDPA over
the slots the cache returns and then lets the cache compress the layer with
the queries of that very call, before the next layer runs.
"""

from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F

from . import ops
from .cache import KVCache, take_pending
from .compat import cache_kwargs, pop_cache
from .methods.base import Method

ATTN_NAME = "kvcompress"
_registry_lock = threading.Lock()
_active_models: set[int] = set()


def _attention_mask_fn(*args, attention_mask=None, **kwargs):
    """Mask function registered for ``"kvcompress"``.

    Layers can hold different numbers of slots (per-layer budgets), so one
    4-D mask cannot serve them all: we pass the 2-D padding mask
    ``[B, tokens seen]`` through and each layer builds its own mask.
    """
    return attention_mask


def _sdpa(query, key, value, scaling, kv_start=None, key_valid=None, dropout=0.0):
    """SDPA over ``key``/``value`` ``[B, Hkv, n, D]`` for queries ``[B, Hq, q, D]``
    sitting at the last ``q`` slots; masks slots before ``kv_start[b]`` (or
    where ``key_valid`` ``[B, n]`` is False). Returns ``[B, q, Hq, D]``."""
    B, Hq, q, _ = query.shape
    n = key.shape[2]
    gqa = Hq != key.shape[1]
    padded = key_valid is not None or (kv_start is not None and bool(kv_start.any()))
    mask = None
    is_causal = False
    if not padded:
        if q == n and q > 1:
            is_causal = True
        elif q > 1:
            i = torch.arange(q, device=query.device)[:, None] + (n - q)
            mask = torch.arange(n, device=query.device)[None, :] <= i
    else:
        j = torch.arange(n, device=query.device)
        pos = torch.arange(q, device=query.device) + (n - q)
        causal = j[None, :] <= pos[:, None]
        valid = key_valid if key_valid is not None else j[None, :] >= kv_start[:, None]
        mask = causal[None] & valid[:, None, :]
        # A padded query row would see no key at all (NaN rows poison the
        # cache of later layers); let it see itself.
        mask = mask | (j[None, :] == pos[:, None])[None]
        mask = mask[:, None]
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, scale=scaling,
        enable_gqa=gqa,
    )
    return out.transpose(1, 2).contiguous()


def kvcompress_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention function registered as ``"kvcompress"`` with transformers.

    Shapes: ``query [B, Hq, q, D]``, ``key``/``value`` ``[B, Hkv, n, D]`` (the
    slots the cache holds, new chunk last). Returns ``([B, q, Hq, D], None)``.
    """
    layer_idx = getattr(module, "layer_idx", None)
    cache = take_pending(layer_idx, key) if layer_idx is not None else None
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if attention_mask is not None and attention_mask.ndim == 4:
        if cache is not None and cache.layers[layer_idx].n != cache.layers[layer_idx].seen:
            raise ValueError(
                "attention_mask: a 4-D mask cannot address a compressed layer; pass the 2-D padding mask"
            )
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
        ).transpose(1, 2).contiguous()
        if cache is not None:
            cache.set_padding(layer_idx, None, query.shape[2])
            cache.after_attention(layer_idx, query, scaling)
        return out, None
    if cache is None:
        # No kvcompress cache (use_cache=False, or another Cache class): plain
        # attention with the padding mask, whose last n columns match the keys.
        valid = None
        if attention_mask is not None:
            valid = attention_mask[:, -key.shape[2]:].to(torch.bool)
        return _sdpa(query, key, value, scaling, key_valid=valid, dropout=dropout), None
    if cache.num_layers is None:
        cache.num_layers = getattr(module.config, "num_hidden_layers", None)
    kv_start = cache.set_padding(layer_idx, attention_mask, query.shape[2])
    store = cache.layers[layer_idx].ragged
    if store is not None:
        # per-head lengths: only the C kernel reads this layout
        counts = store.counts if getattr(cache.method, "merge_bias", False) else None
        out = ops.attention(query, store.k, store.v, scaling=scaling, offsets=store.offsets, lengths=store.lengths,
                            counts=counts)
        cache.after_attention(layer_idx, query, scaling)
        return out, None
    if _fused_ok(query, key, value, dropout):
        # A decode step reads the whole layer for one query: the C kernel
        # (online softmax over the held slots) is 2-3x faster than SDPA in
        # fp32 and ~20x in bf16 on CPU (benchmarks/bench_attention.py).
        out = ops.attention(query, key, value, scaling=scaling, kv_start=kv_start)
    else:
        out = _sdpa(query, key, value, scaling, kv_start=kv_start, dropout=dropout)
    cache.after_attention(layer_idx, query, scaling)
    return out, None


_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fused_ok(query, key, value, dropout) -> bool:
    """Decode steps (one query) on CPU tensors of a supported dtype, no dropout."""
    return (
        query.shape[2] == 1 and not dropout and query.device.type == "cpu"
        and query.dtype in _FUSED_DTYPES and key.dtype == query.dtype == value.dtype
        and key.shape[-1] == value.shape[-1] and key.shape[2] >= 1
    )


def register() -> None:
    """Register the ``"kvcompress"`` attention and mask functions (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    with _registry_lock:
        AttentionInterface.register(ATTN_NAME, kvcompress_attention)
        AttentionMaskInterface.register(ATTN_NAME, _attention_mask_fn)


def _set_attn(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # pragma: no cover - transformers without the setter
        model.config._attn_implementation = name


def enable(model) -> str:
    """Switch ``model`` to the ``"kvcompress"`` attention; return the previous one.

    Needed only when passing a ``KVCache`` yourself outside ``compress()``.
    The attention is exact (SDPA) whatever cache is used.
    """
    register()
    previous = model.config._attn_implementation
    _set_attn(model, ATTN_NAME)
    return previous


class CompressionSession:
    """Context manager returned by :func:`compress`.

    Attributes
    ----------
    model : transformers.PreTrainedModel
    method : kvcompress.methods.Method
    cache : KVCache or None
        The cache used by the most recent ``generate()`` call in the session.
    """

    def __init__(self, model, method: Method):
        if not isinstance(method, Method):
            raise TypeError(
                f"method: expected a kvcompress method (e.g. kvcompress.SnapKV(ratio=0.5)), "
                f"got {type(method).__name__}"
            )
        if not hasattr(model, "generate") or not hasattr(model, "config"):
            raise TypeError(f"model: expected a transformers generative model, got {type(model).__name__}")
        self.model = model
        self.method = method
        self.cache: KVCache | None = None
        self._previous: str | None = None
        self._saved_generate = None
        self._active = False

    def __repr__(self) -> str:
        state = "active" if self._active else "closed"
        return f"CompressionSession({self.method.describe()}, {state}, cache={self.cache!r})"

    def new_cache(self) -> KVCache:
        """A fresh ``KVCache`` for this session's method (e.g. for a forward call)."""
        return KVCache(self.method, num_layers=getattr(self.model.config, "num_hidden_layers", None))

    def _generate(self, original, *args, **kwargs):
        # The cache may come as `cache=` (newer transformers) or
        # `past_key_values=`; either way it is passed on under the name this
        # model takes, so no deprecation path runs, and it is session.cache.
        cache = pop_cache(kwargs)
        if cache is None:
            cache = self.new_cache()
        if isinstance(cache, KVCache):
            self.cache = cache
        kwargs.update(cache_kwargs(self.model, cache))
        return original(*args, **kwargs)

    def __enter__(self) -> "CompressionSession":
        key = id(self.model)
        if key in _active_models:
            raise RuntimeError("model: a kvcompress.compress() session is already active on this model")
        self._previous = enable(self.model)
        self._saved_generate = vars(self.model).get("generate")
        original = self.model.generate
        self.model.generate = functools.wraps(original)(functools.partial(self._generate, original))
        _active_models.add(key)
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._saved_generate is not None:
                self.model.generate = self._saved_generate
            else:
                vars(self.model).pop("generate", None)
            _set_attn(self.model, self._previous)
        finally:
            _active_models.discard(id(self.model))
            self._active = False


def compress(model, method: Method) -> CompressionSession:
    """Run ``model`` with a compressed KV cache inside a ``with`` block.

    >>> with kvcompress.compress(model, kvcompress.SnapKV(ratio=0.5)) as session:
    ...     out = model.generate(**inputs, max_new_tokens=64)
    >>> print(session.cache.stats())
    """
    return CompressionSession(model, method)
