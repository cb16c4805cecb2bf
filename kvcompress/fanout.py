"""One prefill feeding several compressed caches (for evaluation).

A prefill that arrives as one chunk attends only to itself, and every
method compresses a layer *after* that layer's attention, so the prefill's
hidden states, logits and the keys/values each layer sees are the same
whatever the method. :class:`FanoutCache` runs that forward once: each
layer's keys and values go into every child cache, attention is computed
once (from the first child's store), and then each child compresses the
layer with the same queries. Each child then decodes on its own.

For a table of M methods this replaces M prefills by one; the test
``tests/test_ruler.py::test_fanout_matches_separate_runs`` checks that the
generated tokens equal separate runs.
"""

from __future__ import annotations

from .cache import KVCache, _pending
from .errors import KVCompressUnsupportedError, KVCompressValueError


class FanoutCache(KVCache):
    """A cache that forwards a single-chunk prefill to ``children``
    (``list[KVCache]``, each with its own method). Use it for exactly one
    forward call, then decode with each child."""

    def __init__(self, children: list[KVCache]):
        if not children or not all(isinstance(c, KVCache) for c in children):
            raise TypeError("children: expected a non-empty list of kvcompress.KVCache")
        super().__init__(children[0].method, num_layers=children[0].num_layers)
        self.children = list(children)
        self._used = False

    def __repr__(self) -> str:
        return f"FanoutCache({len(self.children)} caches: {', '.join(c.method.describe() for c in self.children)})"

    @property
    def layers(self):
        return self.children[0].layers if hasattr(self, "children") else []

    @layers.setter
    def layers(self, value):  # Cache.__init__ assigns it; the children own the layers
        pass

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if any(c.get_seq_length(layer_idx) for c in self.children) or (self._used and layer_idx == 0):
            raise KVCompressValueError("FanoutCache: takes one prefill chunk; decode with each child cache")
        if layer_idx == 0:
            self._used = True
        out = None
        for c in self.children:
            keys, values = c.update(key_states, value_states, layer_idx, *args, **kwargs)
            out = out or (keys, values)
        _pending.entry = (self, layer_idx, out[0], out[1])
        return out

    def _state_layer(self, layer_idx: int):
        # one state cannot be handed to several children, which then decode apart
        raise KVCompressUnsupportedError(
            f"FanoutCache: layer {layer_idx} holds a recurrent state (a hybrid model); prefill each cache on "
            f"its own")

    def attend(self, layer_idx: int, query, spec, padding_mask=None, four_d=None):
        if self.num_layers is not None:
            for c in self.children:
                c.num_layers = self.num_layers
        layers = [c._enter(layer_idx, query, spec, padding_mask, four_d) for c in self.children]
        out = layers[0].attend(query, spec)
        for c, layer in zip(self.children, layers):
            layer.compress_after(query, spec.scaling)
            if c.method.cross_layer is not None:
                c._merge_pair(layer_idx)  # MiniCache: as KVCache.attend does
        return out

    @property
    def wants_tokens(self) -> bool:
        return any(c.wants_tokens for c in self.children)

    def record_tokens(self, input_ids) -> None:
        for c in self.children:
            if c.wants_tokens:
                c.record_tokens(input_ids)

    def memory_bytes(self) -> int:
        return sum(c.memory_bytes() for c in self.children)
