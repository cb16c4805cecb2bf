"""Methods that need no queries: StreamingLLM and Knorm."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from .base import LayerView, Method


@dataclass
class StreamingLLM(Method):
    """StreamingLLM: keep the first ``sinks`` tokens and the most recent ones.

    With ``budget`` B a layer holds ``sinks`` attention sinks plus a window of
    ``B - sinks`` recent tokens, during prefill and (every ``interval`` tokens)
    during decoding, so memory stays flat however long generation runs.
    ``budget`` must exceed ``sinks``.
    """

    sinks: int = 4
    needs_queries = False

    def _check_fields(self) -> None:
        super()._check_fields()
        self._check_int("sinks", self.sinks, 0)

    def min_budget(self) -> int:
        return self.sinks + 1

    def _forced_text(self) -> str:
        return f"sinks={self.sinks} plus at least one recent token"

    def score(self, view: LayerView):
        return torch.zeros(view.keys.shape[:3], dtype=torch.float32, device=view.keys.device)

    def forced(self, view: LayerView, keep: int) -> tuple[int, int]:
        sinks = min(self.sinks, keep)
        return sinks, keep - sinks


@dataclass
class Knorm(Method):
    """Knorm: keep the keys with the smallest L2 norm (score ``-||k_j||_2``).

    Low-norm keys tend to receive high attention (Devoto et al., 2024).
    ``skip_layers`` lists layers left uncompressed (the paper skips 0 and 1).
    """

    skip_layers: tuple[int, ...] = ()
    needs_queries = False

    def _check_fields(self) -> None:
        self.skip_layers = tuple(self.skip_layers)
        for layer in self.skip_layers:
            self._check_int("skip_layers", layer, 0)

    def target_length(self, n_before: int, n_chunk: int, layer_idx: int, num_layers: int) -> int:
        if layer_idx in self.skip_layers:
            return n_before + n_chunk
        return super().target_length(n_before, n_chunk, layer_idx, num_layers)

    def score(self, view: LayerView):
        scores = ops.vector_norm(view.keys, ord=2)
        return scores.neg_()
