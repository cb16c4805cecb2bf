"""What a model (or generate()) hands the cache, checked once at the
boundary (``KVCache.update``, and the row indices of ``reorder_cache``,
``batch_select_indices`` and ``batch_repeat_interleave``), before any layer
state changes.

The stores assume what is checked here: four-dimensional key and value
states of one floating dtype and device, with the batch, kv heads and
tokens of the keys on the values, and, on a layer that holds slots, the
dtype, device, head dims and kv heads of its earlier updates and its current
batch (beam search reorders and repeats rows between updates). A bad call
raises naming the argument and leaves the cache as it was; without these
checks some mistakes reached torch as shape errors in the middle of a write,
others were cast silently into the layer's buffers (another dtype), and a
negative ``layer_idx`` updated the last layer.
"""

from __future__ import annotations

import torch


def check_layer_index(layer_idx, num_layers: int | None) -> int:
    """``layer_idx`` as an int in ``[0, num_layers)`` (any int >= 0 while
    the cache does not know the model's depth)."""
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
        try:
            layer_idx = int(layer_idx.__index__())  # NumPy and 0-d integer tensors
        except (AttributeError, TypeError, ValueError, RuntimeError):
            raise TypeError(f"layer_idx: expected an int, got {type(layer_idx).__name__}") from None
    if layer_idx < 0 or (num_layers is not None and layer_idx >= num_layers):
        span = f"0..{num_layers - 1} (the model's {num_layers} layers)" if num_layers is not None else ">= 0"
        raise ValueError(f"layer_idx: expected {span}, got {layer_idx}")
    return layer_idx


def check_states(key_states, value_states, layer=None) -> None:
    """Raise TypeError / ValueError naming the argument unless
    ``key_states`` ``[B, H, q, D]`` and ``value_states`` ``[B, H, q, Dv]``
    fit together and fit ``layer`` (a ``CompressedLayer``; None or one that
    holds nothing yet: any sizes)."""
    for name, t in (("key_states", key_states), ("value_states", value_states)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name}: expected [B, H, q, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    ks, vs = tuple(key_states.shape), tuple(value_states.shape)
    if min(ks) == 0:
        raise ValueError(f"key_states: expected at least one row, kv head, token and channel, got shape {ks}")
    if vs[:3] != ks[:3] or vs[3] == 0:
        raise ValueError(f"value_states: expected the batch, kv heads and tokens of key_states {ks[:3]} and at "
                         f"least one channel, got shape {vs}")
    if value_states.dtype != key_states.dtype:
        raise TypeError(f"value_states: expected key_states' dtype {key_states.dtype}, got {value_states.dtype}")
    if value_states.device != key_states.device:
        raise ValueError(f"value_states: expected key_states' device {key_states.device}, "
                         f"got {value_states.device}")
    widths = getattr(layer, "kv_widths", None)
    if widths is None:
        return
    where = f"as earlier updates of layer {layer.layer_idx}"
    if key_states.dtype != layer.dtype:
        raise TypeError(f"key_states: expected {layer.dtype} {where}, got {key_states.dtype}")
    if key_states.device != layer.device:
        raise ValueError(f"key_states: expected device {layer.device} {where}, got {key_states.device}")
    heads, d, dv = widths
    if ks[1] != heads or ks[3] != d:
        raise ValueError(f"key_states: expected {heads} kv heads of {d} channels {where}, got shape {ks}")
    if vs[3] != dv:
        raise ValueError(f"value_states: expected {dv} channels {where}, got shape {vs}")
    batch = layer.store.batch
    if batch and ks[0] != batch:
        raise ValueError(f"key_states: expected batch {batch} (the layer's rows now), got shape {ks}")


def check_batch_index(idx, batch: int, name: str):
    """``idx``, rows of a cache of ``batch`` rows (beam search's reorders,
    batch selection), as a 1-D integer tensor of at least one index in
    ``[0, batch)``; checked before any layer moves a row, so that a bad index
    cannot leave some layers (or the token log) reordered and others not."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name}: expected a 1-D integer torch.Tensor of row indices, got {type(idx).__name__}")
    if idx.ndim != 1 or idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
        raise TypeError(f"{name}: expected a 1-D integer tensor of row indices, got {idx.dtype} of shape "
                        f"{tuple(idx.shape)}")
    if not idx.numel():
        raise ValueError(f"{name}: expected at least one row index, got none")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= batch:
        raise ValueError(f"{name}: expected row indices in [0, {batch}) (the cache's rows), got {lo}..{hi}")
    return idx


def check_repeats(repeats) -> int:
    """``batch_repeat_interleave``'s ``repeats`` as an int >= 1."""
    if isinstance(repeats, bool) or not isinstance(repeats, int):
        raise TypeError(f"repeats: expected an int >= 1, got {type(repeats).__name__}")
    if repeats < 1:
        raise ValueError(f"repeats: expected an int >= 1, got {repeats}")
    return repeats
