"""Per-layer choice of clipped value ranges (``KIVI(clip_values="auto")``).

Clipping a value group's range for the least squared error
(``ops.pack_values(clip=True)``) lowers each token's own error, but the
error of a clipped outlier channel has the same sign for every token:
attention's weighted average does not shrink it as it shrinks rounding
noise, and the attention's output projection may weigh that channel
heavily. So the test is the error that reaches the residual stream. For
the newest queries ``q`` of the layer (after every slot to be packed) and
``p_q`` their attention over those slots, the error of packing is

    E = sum_q || W_o . concat_heads( sum_t p_q[t] (v^_t - v_t) ) ||^2

with ``W_o`` the output projection ``[hidden, Hq * Dv]``; clipping is kept
when its ``E`` is the smaller. Without ``W_o`` (a cache driven without a
model) the plain attention-output error is compared, which alone picks
clipping on most of the default model's layers, where it raises perplexity
(RESULTS, "Clipped value ranges and unpacked windows").

Behind a method that evicts or merges the cache does not run the test and
does not clip: there ``E`` over the kept slots falls when clipped on most
layers, and the later queries' ``E`` agrees, but KL to the full cache rose
on both seeds; the eviction's own error and the clipped values' add up
(against the full prompt's attention clipping gains far less), and even
deciding by that total error did not remove the loss (RESULTS, "Clipping
behind an evictor").
"""

from __future__ import annotations

import torch

__all__ = ["output_projection", "value_clip_errors", "value_clip_helps"]

# what transformers' attention modules call their output projection
_OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj")


def output_projection(module) -> torch.Tensor | None:
    """The output projection weight ``[hidden, Hq * Dv]`` of an attention
    module (``o_proj``, ``out_proj``, ``dense``: a ``Linear``; ``c_proj``:
    GPT-2's ``Conv1D``, stored transposed), or None when it has none."""
    for name in _OUT_NAMES:
        proj = getattr(module, name, None)
        w = getattr(proj, "weight", None)
        if not isinstance(w, torch.Tensor) or w.ndim != 2:
            continue
        if type(proj).__name__ == "Conv1D":  # weight [in, out]
            return w.t()
        return w
    return None


def value_clip_errors(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bits: int, group: int,
                      scaling: float, out_proj: torch.Tensor | None = None,
                      start: torch.Tensor | None = None) -> tuple[float, float]:
    """``(plain, clipped)``: the error ``E`` above of packing ``values`` over
    min..max and over clipped ranges.

    ``queries`` ``[B, Hq, W, D]`` come after every slot; ``keys`` ``[B, H,
    m, D]`` and ``values`` ``[B, H, m, Dv]`` are the slots about to be
    packed, the first ``start[b * H + h]`` of each head (int64 ``[B * H]``,
    optional) padding, masked. ``out_proj`` ``[hidden, Hq * Dv]`` or None
    (the identity). Attention here is plain softmax of ``scaling * q . k``
    over the packed slots (no softcap: the same for both ways of packing;
    no merge counts: the cache runs this test only without an evictor).
    """
    from .. import ops

    B, Hq, W, D = (int(x) for x in queries.shape)
    H, m, Dv = int(keys.shape[1]), int(keys.shape[2]), int(values.shape[3])
    if m == 0 or W == 0:
        return 0.0, 0.0
    rep = Hq // H
    # fp32 up to the weighted errors (the softmax and the m-slot sums),
    # float64 after: within about 1e-6 of a float64 computation of E, in
    # about half its time (RESULTS, "Faster per-layer tests: clipped ranges
    # searched side by side"); a decision that close is a tie either way
    q = queries.float().reshape(B, H, rep * W, D)
    logits = q @ keys.float().transpose(-1, -2)
    logits.mul_(float(scaling))
    if start is not None:
        s = start.to(device=keys.device, dtype=torch.int64).view(B, H)
        pad = torch.arange(m, device=keys.device)[None, None, :] < s[:, :, None]  # [B, H, m]
        logits.masked_fill_(pad[:, :, None, :], float("-inf"))
    p = torch.softmax(logits, -1)
    if start is not None:
        p = p.nan_to_num_(0.0)  # an all-padding head: no weight
    v = values.float().contiguous()
    diffs = v.new_empty(B, H, m, 2 * Dv)
    for i, clip in enumerate((False, True)):
        part = diffs[..., i * Dv : (i + 1) * Dv]
        ops.unpack_values(*ops.pack_values(v, bits, group, clip=clip), bits, group, out=part)
        part.sub_(v)
    both = (p @ diffs).double()  # [B, H, rep * W, 2 Dv]: min..max's errors, then the clipped ones
    w = None if out_proj is None else out_proj.detach().to(device=keys.device, dtype=torch.float64)

    def error(clip: bool) -> float:
        err = both[..., Dv:] if clip else both[..., :Dv]
        # [B, H, rep, W, Dv] -> [B, W, Hq * Dv], query head h * rep + r first
        err = err.reshape(B, H, rep, W, Dv).permute(0, 3, 1, 2, 4).reshape(B, W, Hq * Dv)
        if w is not None:
            err = err @ w.t()
        return float(err.pow(2).sum())

    return error(False), error(True)


def value_clip_helps(queries, keys, values, bits: int, group: int, scaling: float, out_proj=None,
                     start=None) -> bool:
    """Whether clipped value ranges carry less error into the residual
    stream than min..max for these queries (:func:`value_clip_errors`)."""
    plain, clipped = value_clip_errors(queries, keys, values, bits, group, scaling, out_proj, start)
    return clipped < plain
