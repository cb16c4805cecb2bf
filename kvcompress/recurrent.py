"""The recurrent layers of hybrid models, kept as transformers keeps them.

Hybrid models (Qwen3.5, Qwen3-Next, LFM2, Jamba, Nemotron-H, ...) mix
attention layers with layers that carry a fixed-size state instead of keys
and values: a causal convolution's last inputs, a linear-attention or SSM
recurrence. Those layers ask the cache for their state
(``cache.get_conv_state(layer_idx)``, ``update_recurrent_state(...)``, ...);
they have nothing to evict, merge or pack, so a ``KVCache`` holds each in
transformers' own ``LinearAttentionLayer`` and compresses only the
attention layers. :class:`RecurrentStates` is the part of ``KVCache`` that
answers those calls; the layer types come from the model's config
(:func:`layer_kinds`) or are learnt at the first call.

Layer types transformers names (``cache_utils.get_layer_types_and_kwargs``):
``full_attention`` and ``sliding_attention`` hold keys and values, and so
does ``chunked_attention`` (Llama 4) while its tokens fit one chunk; ``conv``
and ``linear_attention`` hold a state; ``dummy`` layers hold nothing; every
other type (:data:`REFUSED_TYPES`: a state and attention in one layer,
indexed or model-compressed attention, or a type not known here) is refused
by name.
"""

from __future__ import annotations

import torch

from .compat import decoder_config
from .errors import KVCompressUnsupportedError

#: layer types whose cache is a fixed-size state, no keys or values
STATE_TYPES = frozenset({"conv", "linear_attention"})
#: layer types that hold keys and values a KVCache layer serves (a chunked
#: layer while its tokens fit one chunk: ``KVCache.update`` refuses past it)
ATTENTION_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
#: layer types with no cache of their own (Nemotron-H's MLP-only layers;
#: Gemma 3n's KV-shared ones are refused by ``compress()`` from the config)
NO_CACHE_TYPES = frozenset({"dummy"})
#: layer types refused, and why
REFUSED_TYPES = {
    "hybrid": "a recurrent state and attention in one layer, as Falcon-H1 has",
    "hybrid_sliding": "a recurrent state and sliding attention in one layer",
    "indexed_attention": "sparse attention over indexer-picked keys (DeepSeek-V3.2)",
    "compressed_sparse_attention": "attention over a compressed cache of the model's own (DeepSeek-V4)",
    "heavily_compressed_attention": "attention over a compressed cache of the model's own (DeepSeek-V4)",
}


def layer_kinds(config) -> list[str] | None:
    """The layer types of ``config``'s decoder as transformers reads them
    (None where this transformers release has no such reading and the config
    lists none)."""
    text = decoder_config(config)
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:  # releases before hybrid caches: the config's own list, if any
        kinds = getattr(text, "layer_types", None)
        return list(kinds) if kinds else None
    try:
        kinds, _ = get_layer_types_and_kwargs(text)
    except Exception:  # a config this reading does not cover: learnt at the first call instead
        return None
    return list(kinds) if kinds else None


def chunk_size(config) -> int | None:
    """Tokens per chunk of a model's chunked-attention layers (Llama 4's
    ``attention_chunk_size``), or None."""
    text = decoder_config(config)
    size = getattr(text, "attention_chunk_size", None)
    return int(size) if isinstance(size, int) and size > 0 else None


def check_chunk(kinds, chunk, layer_idx: int, seen: int, q: int) -> None:
    """Refuse a chunked-attention layer's update that would take its tokens
    past the first chunk: from there on its queries see only their own
    chunk, a mask kvcompress does not build (before it, the layer attends as
    a full one)."""
    if kinds is None or layer_idx >= len(kinds) or kinds[layer_idx] != "chunked_attention":
        return
    if chunk is None or seen + q > chunk:
        raise KVCompressUnsupportedError(
            f"layer_types: layer {layer_idx} attends within chunks of {chunk} tokens (Llama 4's chunked "
            f"attention) and this update takes it to {seen + q}; kvcompress serves such layers up to one chunk")


def check_layer_kinds(kinds, method) -> None:
    """Refuse, by name, layer types a ``KVCache`` cannot serve and methods
    that need every layer to hold keys and values."""
    if kinds is None:
        return
    for kind in dict.fromkeys(kinds):
        if kind in ATTENTION_TYPES or kind in STATE_TYPES or kind in NO_CACHE_TYPES:
            continue
        at = [i for i, k in enumerate(kinds) if k == kind]
        why = REFUSED_TYPES.get(kind, "a layer type kvcompress does not know")
        raise KVCompressUnsupportedError(
            f"layer_types: layers {at} are {kind!r} ({why}); kvcompress does not compress such layers")
    if kinds and all(k in STATE_TYPES for k in kinds):
        raise KVCompressUnsupportedError(
            f"layer_types: every layer is {sorted(set(kinds))} (a recurrent model such as Mamba): there are no "
            f"keys and values to compress")
    if any(k in STATE_TYPES for k in kinds):
        refuse_with_states(method, [i for i, k in enumerate(kinds) if k in STATE_TYPES])


def refuse_with_states(method, layers) -> None:
    """Methods that read or pair every layer's keys cannot run beside
    recurrent layers (``layers``), which hold none."""
    from .methods.sparse import TidalDecode

    why = None
    if method.cross_layer is not None:
        why = "merges the caches of adjacent layers"
    elif method.sharing is not None:
        why = "lets layers read other layers' caches"
    elif method.defers_prefill:
        why = "sets each layer's budget from every layer's prefill"
    elif isinstance(method, TidalDecode) or isinstance(method.sparse, TidalDecode):
        why = "selects tokens at fixed layers for the layers after them"
    if why is not None:
        raise KVCompressUnsupportedError(
            f"method: {method.describe()} {why}, and layers {list(layers)} of this model hold a recurrent state, "
            f"not keys and values (a hybrid model); use a method that compresses each layer on its own")


class RecurrentStates:
    """Recurrent layers' states of a hybrid model (mixed into ``KVCache``):
    the ``Cache`` calls those layers make, answered by transformers'
    ``LinearAttentionLayer`` per layer index in ``self._states``."""

    _states: dict
    layer_types: list | None

    def _state_layer(self, layer_idx: int):
        """The recurrent layer ``layer_idx``'s state holder, made at its first call."""
        layer = self._states.get(layer_idx)
        if layer is None:
            from transformers.cache_utils import LinearAttentionLayer

            if not self._states:
                refuse_with_states(self.method, [layer_idx])
            layer = self._states[layer_idx] = LinearAttentionLayer()
        return layer

    def holds_state(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` is a recurrent layer (holds a state, no
        keys): one that asked for its state, or one the config types so (a
        model may keep such a layer's state itself, as RecurrentGemma does)."""
        kinds = self.layer_types
        return layer_idx in self._states or (kinds is not None and 0 <= layer_idx < len(kinds)
                                             and kinds[layer_idx] in STATE_TYPES)

    # the calls a recurrent layer makes (transformers' Cache API)
    def get_conv_state(self, layer_idx: int, state_idx: int = 0):
        layer = self._state_layer(layer_idx)
        return layer.conv_states[state_idx] if layer.has_previous_state[state_idx] else None

    def update_conv_state(self, conv_states, layer_idx: int, state_idx: int = 0, **kwargs):
        return self._state_layer(layer_idx).update_conv_state(conv_states, state_idx, **kwargs)

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0):
        layer = self._state_layer(layer_idx)
        return layer.recurrent_states[state_idx] if layer.has_previous_state[state_idx] else None

    def update_recurrent_state(self, recurrent_states, layer_idx: int, state_idx: int = 0, **kwargs):
        return self._state_layer(layer_idx).update_recurrent_state(recurrent_states, state_idx, **kwargs)

    def increase_count(self, layer_idx: int, state_idx: int) -> None:
        self._state_layer(layer_idx).increase_count(state_idx)

    def is_recording_past(self, layer_idx: int) -> bool:
        return False  # past states are recorded for assisted decoding, which a compressed cache refuses

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        return 0

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        if layer_idx is None:
            if not self._states:
                raise ValueError("has_previous_state: this cache holds no recurrent layer")
            layer_idx = max(self._states)
        layer = self._states.get(layer_idx)
        if layer is None:
            return False
        if state_idx is None:
            return all(layer.has_previous_state.values())
        return bool(layer.has_previous_state[state_idx])

    # what the cache does to every layer, done to the states too
    def _states_seen(self, layer_idx: int) -> int | None:
        """Tokens recurrent layer ``layer_idx`` has taken (None: not a recurrent layer)."""
        layer = self._states.get(layer_idx)
        return None if layer is None else int(layer.get_seq_length())

    def _index_states(self, idx: torch.Tensor) -> None:
        """Rows ``idx`` of every state, in that order (beam search, batch selection)."""
        for layer in self._states.values():
            for store in (layer.conv_states, layer.recurrent_states):
                for i, t in store.items():
                    if isinstance(t, torch.Tensor):
                        store[i] = t.index_select(0, idx.to(t.device))

    def _reset_states(self) -> None:
        for layer in self._states.values():
            layer.reset()

    def _state_tensors(self, layer_idx: int) -> list[torch.Tensor]:
        layer = self._states.get(layer_idx)
        if layer is None:
            return []
        return [t for store in (layer.conv_states, layer.recurrent_states) for t in store.values()
                if isinstance(t, torch.Tensor)]
