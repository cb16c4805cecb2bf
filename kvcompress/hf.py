"""Hugging Face transformers integration.

``compress(model, method)`` switches the model to the ``"kvcompress"``
attention function, makes ``generate()`` use a fresh ``KVCache`` unless one is
passed, and undoes all of it on exit. The attention function reads what the
model asks of its attention (sliding window, softcap, sink logits; anything
else it cannot honour is refused by name), routes the call to the cache
layer's store, and then lets the layer compress with the queries of that very
call, before the next layer runs.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
from dataclasses import replace

import torch

from .cache import KVCache, take_pending
from .compat import CACHE_NAMES, cache_kwarg, cache_kwargs, decoder_config, pop_cache
from .errors import KVCompressUnsupportedError, KVCompressValueError
from .methods.base import Method
from .recurrent import check_layer_kinds, chunk_size, layer_kinds
from .stores import AttentionSpec
from .stores.masked import build_mask, masked_attention
from .stores.value_clip import output_projection

ATTN_NAME = "kvcompress"
_registry_lock = threading.Lock()
_active_models: set[int] = set()
# methods with needs_hidden: the decoder layer's input (the residual stream)
# waiting for its attention's output, and the cache the attention used
_hidden = threading.local()


def _attention_mask_fn(*args, attention_mask=None, **kwargs):
    """Mask function registered for ``"kvcompress"``.

    Layers can hold different numbers of slots (per-layer budgets), so one
    4-D mask cannot serve them all: we pass the 2-D padding mask
    ``[B, tokens seen]`` through and each layer builds its own mask.
    """
    return attention_mask


# Keyword arguments a model's attention call may carry that change nothing
# for a causal decoder over our slots (bookkeeping, or read elsewhere).
_HARMLESS = frozenset({
    "position_ids", "cache_position", "use_cache", "output_hidden_states", "output_router_logits",
    "num_items_in_batch", "return_dict", "layer_idx", "past_key_value", "past_key_values", "cache",
    "position_embeddings", "token_type_ids", "max_length_q", "max_length_k",
})


# Options attention_spec reads itself (honoured or refused below).
_HANDLED = frozenset({"sliding_window", "softcap", "s_aux", "is_causal", "position_bias", "cu_seq_lens_q",
                      "cu_seq_lens_k", "output_attentions", "seq_idx"})


def _refuse(name: str, why: str):
    raise KVCompressUnsupportedError(f"{name}: {why}; kvcompress refuses it rather than ignore it")


def attention_spec(module, query, dropout, scaling, kwargs) -> AttentionSpec:
    """Read everything the model asks of its attention besides q, k, v.

    Sliding windows, logit softcapping and learned sink logits are honoured;
    anything else that would change the result (bidirectional attention,
    position biases, packed sequences, attention weights as output, unknown
    options) is refused by name.
    """
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap")
    sinks = kwargs.get("s_aux")
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if not is_causal:
        _refuse("is_causal", "this attention is not causal (bidirectional/encoder attention)")
    if kwargs.get("position_bias") is not None:
        _refuse("position_bias", "a position bias over the full token grid cannot address compressed slots")
    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
        _refuse("cu_seq_lens_q", "packed (varlen) sequences are not supported")
    if kwargs.get("output_attentions"):
        _refuse("output_attentions", "the compressed attention returns no attention weights")
    if kwargs.get("seq_idx") is not None:
        _refuse("seq_idx", "packed sequences are not supported")
    for name, value in kwargs.items():
        if value is None or value is False or name in _HARMLESS or name in _HANDLED:
            continue
        _refuse(name, f"unknown attention option from {type(module).__name__}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise KVCompressValueError(f"sliding_window: expected a positive int, got {window!r}")
    if softcap is not None:
        softcap = float(softcap)
        if not softcap > 0:
            raise KVCompressValueError(f"softcap: expected a positive number, got {softcap}")
    if sinks is not None and (not torch.is_tensor(sinks) or sinks.numel() != query.shape[1]):
        raise KVCompressValueError(f"s_aux: expected one sink logit per query head ({query.shape[1]}), got "
                              f"{getattr(sinks, 'shape', type(sinks).__name__)}")
    return AttentionSpec(scaling=float(scaling), softcap=softcap, sinks=sinks, window=window,
                         dropout=float(dropout or 0.0))


def kvcompress_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention function registered as ``"kvcompress"`` with transformers.

    Shapes: ``query [B, Hq, q, D]``, ``key``/``value`` ``[B, Hkv, n, D]`` (the
    slots a uniform layer holds, new chunk last; a per-head layer returns the
    chunk only and attends from its store). Returns ``([B, q, Hq, D], None)``.
    """
    spec = attention_spec(module, query, dropout, scaling, kwargs)
    layer_idx = getattr(module, "layer_idx", None)
    cache = take_pending(layer_idx, key, value) if layer_idx is not None else None
    four_d = attention_mask if attention_mask is not None and attention_mask.ndim == 4 else None
    if cache is not None and four_d is not None and four_d.shape[1] != 1:
        # a mask of each head's own (Doge's dynamic mask) is more than padding
        raise KVCompressUnsupportedError(
            f"attention_mask: layer {layer_idx} passes a mask per attention head {tuple(four_d.shape)} (Doge's "
            f"dynamic mask); kvcompress reads a 4-D mask only for its padding, one row for all heads")
    if cache is None:
        # No kvcompress cache (use_cache=False, or another Cache class): the
        # keys are the whole sequence, so the 2-D padding mask's last n
        # columns are theirs.
        n, q = key.shape[2], query.shape[2]
        if four_d is not None:
            mask = four_d if four_d.dtype == torch.bool else four_d == 0
        else:
            valid = None if attention_mask is None else attention_mask[:, -n:].to(torch.bool)
            pos = torch.arange(n, device=query.device)[None].expand(query.shape[0], n)
            mask = build_mask(query.shape[0], q, n, query.device, key_valid=valid, window=spec.window,
                              key_pos=pos, query_pos=pos[:, n - q:])
        return masked_attention(query, key, value, spec, mask), None
    if cache.num_layers is None:
        cache.num_layers = getattr(getattr(module, "config", None), "num_hidden_layers", None)
    spec = replace(spec, count_bias=cache.method.count_bias)
    layer = cache.layers[layer_idx]
    if layer.out_proj is None and cache.method.value_clip == "auto" and not layer._clip_decided:
        layer.out_proj = _output_projection(module)
    if four_d is not None and layer.n != layer.seen:
        raise ValueError("attention_mask: a 4-D mask cannot address a compressed layer; pass the 2-D padding mask")
    out = cache.attend(layer_idx, query, spec, padding_mask=None if four_d is not None else attention_mask,
                       four_d=four_d)
    _hidden.cache = cache
    return out, None


def _output_projection(module) -> torch.Tensor:
    """The attention's output projection, which ``KIVI(clip_values="auto")``
    weighs the values' error by; refused by name where there is none."""
    w = output_projection(module)
    if w is None:
        raise KVCompressUnsupportedError(
            f"clip_values: 'auto' weighs the values' error by the attention's output projection, and "
            f"{type(module).__name__} has none named o_proj, out_proj, dense or c_proj; give clip_values=True or False")
    return w


def _keep_input(layer_idx: int, module, args, kwargs):
    """Forward pre-hook of a decoder layer: remember its input, the residual
    stream before its attention."""
    h = kwargs.get("hidden_states", args[0] if args else None)
    _hidden.entry = (layer_idx, h)
    _hidden.cache = None


def _report_hidden(layer_idx: int, module, args, output):
    """Forward hook of a decoder layer's attention module: hand the cache the
    residual stream before the attention and the attention's output."""
    entry = getattr(_hidden, "entry", None)
    cache = getattr(_hidden, "cache", None)
    _hidden.entry = _hidden.cache = None
    if entry is None or entry[0] != layer_idx or cache is None or entry[1] is None:
        return
    out = output[0] if isinstance(output, tuple) else output
    cache.observe_hidden(layer_idx, entry[1], out)


# what transformers' decoder layers call their attention module
_ATTN_NAMES = ("self_attn", "attn", "attention")


def hidden_hooks(model) -> list:
    """Install the hooks a ``needs_hidden`` method reads hidden states with:
    on every decoder layer (a module whose attention submodule, named
    ``self_attn``, ``attn`` or ``attention`` as transformers' families name
    it, carries a ``layer_idx``), its input and its attention's output.
    Returns the handles (``handle.remove()`` undoes each)."""
    handles = []
    for module in model.modules():
        attn = idx = None
        for name in _ATTN_NAMES:
            attn = getattr(module, name, None)
            idx = getattr(attn, "layer_idx", None)
            if isinstance(attn, torch.nn.Module) and isinstance(idx, int) and not isinstance(idx, bool):
                break
        else:
            continue
        handles.append(module.register_forward_pre_hook(functools.partial(_keep_input, idx), with_kwargs=True))
        handles.append(attn.register_forward_hook(functools.partial(_report_hidden, idx)))
    if not handles:
        raise KVCompressUnsupportedError(
            f"model: {type(model).__name__} has no decoder layers with an attention module carrying `layer_idx`; "
            "methods that read hidden states (SqueezeAttention) cannot hook it")
    return handles


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
    The attention is exact (SDPA) whatever cache is used. The first call
    also installs a forward pre-hook (kept, a no-op for other caches) that
    checks a ``KVCache``'s padding mask before any layer stores the chunk.
    """
    register()
    previous = model.config._attn_implementation
    _set_attn(model, ATTN_NAME)
    if vars(model).get("_kvcompress_mask_hook") is None:
        model._kvcompress_mask_hook = model.register_forward_pre_hook(_mask_hook, with_kwargs=True)
    return previous


def _check_forward(cache, args, kwargs, model=None) -> None:
    """Refuse a forward for ``cache`` before its first layer stores the chunk:
    a model of another depth than the one the cache has layers for, or a
    padding mask the layers would refuse (``KVCache.check_mask``); a call
    whose tokens or mask are not keyword tensors is left to the layers."""
    config = getattr(model, "config", None)
    depth = None if config is None else _decoder_layers(config)
    if cache.layers and cache.num_layers is not None and depth is not None and depth != cache.num_layers:
        raise ValueError(f"cache: holds the layers of a {cache.num_layers}-layer model, and this model has {depth}; "
                         "use a fresh cache per model")
    x = kwargs.get("input_ids")
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None and args and isinstance(args[0], torch.Tensor):
        x = args[0]
    mask = kwargs.get("attention_mask")
    if isinstance(x, torch.Tensor) and x.ndim >= 2 and mask is not None:
        cache.check_mask(mask, int(x.shape[1]), int(x.shape[0]))


def _mask_hook(module, args, kwargs):
    """Forward pre-hook ``enable`` installs: a ``KVCache`` passed to the
    model has its padding mask checked first (a refused forward changes
    nothing)."""
    cache = next((kwargs[n] for n in CACHE_NAMES if kwargs.get(n) is not None), None)
    if isinstance(cache, KVCache):
        _check_forward(cache, args, kwargs, module)
    return None


def _record_tokens(cache, args, kwargs) -> None:
    """A ``KVCache`` whose method reads token ids (``Method.needs_tokens``)
    logs the forward's ``input_ids`` before any layer runs (the cache itself
    only sees keys and values)."""
    if isinstance(cache, KVCache) and cache.wants_tokens:
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            ids = args[0]
        cache.record_tokens(ids)


def _cache_position(model) -> int | None:
    """Index of the cache among ``model.forward``'s positional parameters
    (None if it has none there)."""
    name = cache_kwarg(model)
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - C-implemented forward
        return None
    return params.index(name) if name in params else None


def _decoder_layers(config) -> int | None:
    """Decoder layers of a model's config: its text decoder's, for a model
    whose top config describes more (speech or vision models)."""
    text = decoder_config(config)
    n = getattr(text, "num_hidden_layers", None)
    return n if n is not None else getattr(config, "num_hidden_layers", None)


_ATTENDS_ITSELF: dict[type, bool] = {}


def _attends_itself(model) -> str | None:
    """The name of a transformers module class of ``model`` whose forward
    writes the cache (``cache.update``) but never looks up the attention
    interface, or None. Read from the class's source once per class."""
    module = sys.modules.get(type(model).__module__)
    if module is not None and module.__name__.startswith("transformers.") and \
            not hasattr(module, "ALL_ATTENTION_FUNCTIONS"):
        return module.__name__  # its modeling file never imports the interface (Bloom, MPT)
    for m in model.modules():
        cls = type(m)
        if cls not in _ATTENDS_ITSELF:
            verdict = False
            forward = inspect.unwrap(cls.forward)  # past deprecate_kwarg's wrapper
            if cls.__module__.startswith("transformers.") and "update" in getattr(forward, "__code__",
                                                                                  _NO_CODE).co_names:
                try:
                    src = inspect.getsource(forward)
                except (OSError, TypeError):  # pragma: no cover - no source: trust it
                    src = ""
                verdict = (".update(" in src and "attention_interface" not in src
                           and "ALL_ATTENTION_FUNCTIONS" not in src)
            _ATTENDS_ITSELF[cls] = verdict
        if _ATTENDS_ITSELF[cls]:
            return cls.__name__
    return None


_NO_CODE = (lambda: None).__code__


def _check_model(model) -> None:
    """Refuse, by name, models whose attention or cache kvcompress cannot serve."""
    name = type(model).__name__
    own = _attends_itself(model)
    if own is not None:
        # such a model attends itself, over whatever the cache returns: a
        # compressed layer's placeholder keys, a packed layer's nothing. (Its
        # `_supports_attention_backend` says less: Qwen3.5's and Jamba's is
        # False for their recurrent layers while their attention layers call
        # the interface; GIT's is True for its vision tower's sake.)
        raise KVCompressUnsupportedError(
            f"model: {name} computes its attention itself ({own} never calls transformers' attention "
            f"interface), and kvcompress attends over compressed layers through that interface")
    if any(callable(getattr(m, "prepare_dynamic_mask", None)) for m in model.modules()):
        # its attention layers turn the mask into one of each head's own, from
        # the values (Doge): a mask our padding-only mask function does not give
        raise KVCompressUnsupportedError(
            f"model: {name} builds a dynamic attention mask for each head from its values "
            f"(prepare_dynamic_mask), and kvcompress passes the attention only the padding mask")
    text = decoder_config(model.config)
    modes = list(getattr(text, "kv_sharing_modes", None) or [])
    shared = [i for i, mode in enumerate(modes) if mode == "reuse"]
    if shared or (getattr(text, "num_kv_shared_layers", 0) or 0) > 0:
        # such a layer attends over the tensors another layer's cache.update
        # returned: a compressed or packed layer returns its own slots or only
        # the new chunk, and the reader's mask is built for the full sequence
        raise KVCompressUnsupportedError(
            f"model: {name}'s layers {shared or 'past num_kv_shared_layers'} reuse another layer's keys and values "
            f"(KV sharing, as Gemma 3n does), which a compressed layer cannot hand them")
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    if callable(supports) and not supports():
        raise KVCompressUnsupportedError(
            f"model: {name} keeps a cache of its own kind, not transformers' Cache of key and value layers "
            f"(_supports_default_dynamic_cache() is False), so a KVCache cannot stand in for it")


#: generate() arguments that turn on assisted decoding, which crops the cache
_ASSISTED = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")


class CompressionSession:
    """Context manager returned by :func:`compress`.

    Attributes
    ----------
    model : transformers.PreTrainedModel
    method : kvcompress.methods.Method
    cache : KVCache or None
        The cache of the most recent ``generate()`` call in the session, or
        of the most recent forward call that brought no cache of its own.

    A forward call inside the session (``model(**inputs)``) that passes no
    cache and does not turn caching off gets a fresh ``KVCache`` of the
    session's method, as ``generate()`` does: its output carries that cache,
    to pass to the next call. A cache passed explicitly (ours or a
    transformers one) is used as it is.
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
        # KVSharer(calibration=...) computes its sharing plan on this model
        self.method = method.prepare(model)
        self.cache: KVCache | None = None
        self._previous: str | None = None
        self._saved_generate = None
        self._hook = None
        self._active = False
        self._hooks: list = []
        self._cache_at = _cache_position(model)
        # a hybrid model's recurrent layers, and the layer types we refuse, known before any call
        self._layer_types = layer_kinds(model.config)
        check_layer_kinds(self._layer_types, self.method)
        _check_model(model)

    def __repr__(self) -> str:
        state = "active" if self._active else "closed"
        return f"CompressionSession({self.method.describe()}, {state}, cache={self.cache!r})"

    def new_cache(self) -> KVCache:
        """A fresh ``KVCache`` for this session's method (e.g. for a forward call)."""
        return KVCache(self.method, num_layers=_decoder_layers(self.model.config),
                       layer_types=self._layer_types, attention_chunk=chunk_size(self.model.config))

    def _generate(self, original, *args, **kwargs):
        # The cache may come as `cache=` (newer transformers) or
        # `past_key_values=`; either way it is passed on under the name this
        # model takes, so no deprecation path runs, and it is session.cache.
        for name in _ASSISTED:
            if kwargs.get(name) is not None:
                raise KVCompressUnsupportedError(
                    f"{name}: assisted (speculative) decoding crops the cache back after every rejected draft, "
                    f"and a compressed cache cannot be cropped (evicted, merged or packed tokens cannot be "
                    f"restored); run it outside compress()")
        # transformers would build a cache of that kind beside ours and refuse
        # the pair, naming a `cache` argument the caller never passed; it may
        # come as the keyword, in a generation_config= or in the model's own
        config = kwargs.get("generation_config")
        config_name = "generation_config.cache_implementation"
        if config is None:
            config, config_name = getattr(self.model, "generation_config", None), \
                "model.generation_config.cache_implementation"
        for name, value in (("cache_implementation", kwargs.get("cache_implementation")),
                            (config_name, getattr(config, "cache_implementation", None))):
            if value is not None and kwargs.get("use_cache") is not False:
                raise KVCompressValueError(
                    f"{name}: compress() supplies the cache (a KVCache of {self.method.describe()}); "
                    f"drop {name}={value!r} (set it to None), or run generate() outside the session "
                    f"(kvcompress.KIVI packs the cache in low bits)")
        cache = pop_cache(kwargs)
        if cache is None and kwargs.get("use_cache") is not False:
            cache = self.new_cache()
        if isinstance(cache, KVCache):
            self.cache = cache
        if cache is not None:
            kwargs.update(cache_kwargs(self.model, cache))
        return original(*args, **kwargs)

    def _before_forward(self, module, args, kwargs):
        """Forward pre-hook of the session's model: a call without a cache
        (and with caching on) gets a fresh ``KVCache``, which becomes
        ``session.cache``; then a method that reads token ids logs them."""
        cache = next((kwargs[n] for n in CACHE_NAMES if kwargs.get(n) is not None), None)
        if cache is None and self._caches(args, kwargs):
            cache = self.new_cache()
            self.cache = cache
            kwargs = {k: v for k, v in kwargs.items() if k not in CACHE_NAMES}
            kwargs.update(cache_kwargs(self.model, cache))
            _check_forward(cache, args, kwargs)
            _record_tokens(cache, args, kwargs)
            return args, kwargs
        _record_tokens(cache, args, kwargs)
        return None

    def _caches(self, args, kwargs) -> bool:
        """Whether a forward call without a cache would have transformers
        make one (``use_cache`` on, by the call or else by the config), with
        no positional argument in the cache's place."""
        use = kwargs.get("use_cache")
        if use is None:
            use = getattr(self.model.config, "use_cache", True)
        if not use:
            return False
        return self._cache_at is None or len(args) <= self._cache_at

    def __enter__(self) -> "CompressionSession":
        key = id(self.model)
        if key in _active_models:
            raise RuntimeError("model: a kvcompress.compress() session is already active on this model")
        if self.method.needs_hidden:
            self._hooks = hidden_hooks(self.model)
        self._previous = enable(self.model)
        self._saved_generate = vars(self.model).get("generate")
        original = self.model.generate
        self.model.generate = functools.wraps(original)(functools.partial(self._generate, original))
        self._hook = self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        _active_models.add(key)
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            if self._saved_generate is not None:
                self.model.generate = self._saved_generate
            else:
                vars(self.model).pop("generate", None)
            _set_attn(self.model, self._previous)
        finally:
            for handle in self._hooks:
                handle.remove()
            self._hooks = []
            _active_models.discard(id(self.model))
            self._active = False


def compress(model, method: Method) -> CompressionSession:
    """Run ``model`` with a compressed KV cache inside a ``with`` block.

    >>> with kvcompress.compress(model, kvcompress.SnapKV(ratio=0.5)) as session:
    ...     out = model.generate(**inputs, max_new_tokens=64)
    >>> print(session.cache.stats())
    """
    return CompressionSession(model, method)
