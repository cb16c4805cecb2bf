"""Attention in torch for the cases the C kernel does not cover.

Prefill and multi-token chunks run here (SDPA), and so does every step of a
layer whose model asks for a logit softcap or learned sink logits (eager:
SDPA has neither). The mask is built from slot indices and token positions,
never from a mask the model made, because a compressed layer's slots are not
the model's token grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import AttentionSpec


def build_mask(B: int, q: int, n: int, device, kv_start=None, key_valid=None, window=None, key_pos=None,
               query_pos=None):
    """Boolean ``[B, 1, q, n]`` mask (True = attend) or None when plain causal
    attention over the slots is exact.

    The queries sit at the last ``q`` slots, so causality is by slot index.
    ``kv_start`` ``[B]`` masks leading (padding or filler) slots,
    ``key_valid`` ``[B, n]`` any slot; ``window`` with ``key_pos`` ``[B, n]``
    and ``query_pos`` ``[B, q]`` (token positions) masks keys at distance
    ``>= window`` (sliding-window layers). A query row that would see nothing
    sees itself, so padded rows never produce NaN.
    """
    padded = key_valid is not None or (kv_start is not None and bool(kv_start.any()))
    if not padded and window is None:
        return None
    j = torch.arange(n, device=device)
    slot = torch.arange(q, device=device) + (n - q)
    mask = (j[None, :] <= slot[:, None])[None].expand(B, q, n)
    if key_valid is not None:
        mask = mask & key_valid[:, None, :]
    elif kv_start is not None:
        mask = mask & (j[None, :] >= kv_start[:, None])[:, None, :]
    if window is not None:
        dist = query_pos[:, :, None].to(torch.int64) - key_pos[:, None, :].to(torch.int64)
        mask = mask & (dist < window)
    mask = mask | (j[None, :] == slot[:, None])[None]
    return mask[:, None]


def rows_attention(query, key, value, spec: AttentionSpec, kv_start, window=None, key_pos=None, query_pos=None):
    """:func:`masked_attention` of a left-padded batch (``kv_start`` ``[B]``
    leading padded slots), each row over its own slots as it runs alone: its
    real queries over its slots from ``kv_start[b]`` on, with the mask it
    has alone. One call over the padded batch is not the same sum: SDPA's
    CPU kernels block the keys from slot 0, so a row's blocks (and the
    online softmax's rescaling) depend on its padding (the cached keys
    1e-7 apart from the row alone on the tiny test model, 4e-5 on the
    default one), which a greedy decode or a later selection can amplify.
    A padded query sees only itself, as with :func:`build_mask`. Shapes as
    :func:`masked_attention`; returns ``[B, q, Hq, Dv]``."""
    B, Hq, q, _ = query.shape
    Hkv, n = int(key.shape[1]), int(key.shape[2])
    g = Hq // Hkv
    out = query.new_empty((B, q, Hq, int(value.shape[3])))
    for b, s in enumerate(kv_start.tolist()):
        qs = min(q, max(0, s - (n - q)))  # the chunk's padded queries come first
        if qs:
            # a padded query's output is its own slot's value (the only key it sees)
            own = value[b, :, n - q : n - q + qs].transpose(0, 1)  # [qs, Hkv, Dv]
            out[b, :qs] = (own.repeat_interleave(g, 1) if g > 1 else own).to(out.dtype)
        if qs >= q:
            continue
        mask = build_mask(1, q - qs, n - s, query.device, kv_start=kv_start.new_zeros(1), window=window,
                          key_pos=None if key_pos is None else key_pos[b : b + 1, s:],
                          query_pos=None if query_pos is None else query_pos[b : b + 1, qs:])
        out[b, qs:] = masked_attention(query[b : b + 1, :, qs:].contiguous(), key[b : b + 1, :, s:].contiguous(),
                                       value[b : b + 1, :, s:].contiguous(), spec, mask)[0]
    return out


def masked_attention(query, key, value, spec: AttentionSpec, mask=None, bias=None):
    """Attention of ``query`` ``[B, Hq, q, D]`` over ``key``/``value``
    ``[B, Hkv, n, D]`` with ``mask`` from :func:`build_mask` (None: causal over
    the slots); ``bias`` ``[B, Hkv, n]`` is added to the logits (log merge
    counts). Returns ``[B, q, Hq, D]``."""
    B, Hq, q, _ = query.shape
    n = key.shape[2]
    Hkv = key.shape[1]
    if spec.softcap is None and spec.sinks is None and bias is None:
        causal = mask is None and q > 1
        if mask is None and q > 1 and q != n:
            i = torch.arange(q, device=query.device)[:, None] + (n - q)
            mask = torch.arange(n, device=query.device)[None, :] <= i
            causal = False
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=spec.dropout, is_causal=causal, scale=spec.scaling,
            enable_gqa=Hq != Hkv,
        )
        return out.transpose(1, 2).contiguous()
    # Eager path: softcap and sink logits are not expressible in SDPA.
    g = Hq // Hkv
    k = key.repeat_interleave(g, 1) if g > 1 else key
    v = value.repeat_interleave(g, 1) if g > 1 else value
    logits = torch.matmul(query, k.transpose(-1, -2)).float() * spec.scaling
    if spec.softcap is not None:
        logits = torch.tanh(logits / spec.softcap) * spec.softcap
    if bias is not None:
        logits = logits + (bias.repeat_interleave(g, 1) if g > 1 else bias)[:, :, None, :].float()
    if mask is None:
        j = torch.arange(n, device=query.device)
        i = torch.arange(q, device=query.device)[:, None] + (n - q)
        mask = (j[None, :] <= i)[None, None]
    logits = logits.masked_fill(~mask, float("-inf"))
    if spec.sinks is not None:
        # learned per-head sink logit: a softmax column that carries no value
        sink = spec.sinks.to(logits.dtype).reshape(1, Hq, 1, 1).expand(B, Hq, q, 1)
        probs = torch.softmax(torch.cat([logits, sink], -1), -1)[..., :n]
    else:
        probs = torch.softmax(logits, -1)
    if spec.dropout:
        probs = F.dropout(probs, p=spec.dropout, training=True)
    out = torch.matmul(probs.to(v.dtype), v)
    return out.transpose(1, 2).contiguous()


def padded_head_attention(query, keys, values, start, spec: AttentionSpec, heads: int, bias=None):
    """Attention of ``query`` ``[B, Hq, q, D]`` (the last ``q`` slots) over
    per-head slots padded on the left: ``keys``/``values`` ``[B*H, 1, M, D]``
    with head ``i``'s slots from column ``start[i]`` on, ``bias`` ``[B*H, M]``
    added to the logits (log merge counts) or None. For the model options the
    C kernels lack (softcap, sinks); one head at a time, as each has its own
    sinks. Returns ``[B, q, Hq, D]`` in the query's dtype."""
    B, Hq, q, D = query.shape
    H = heads
    qh = query.reshape(B * H, Hq // H, q, D)
    M = int(keys.shape[2])
    j = torch.arange(M, device=query.device)
    slot = torch.arange(q, device=query.device) + (M - q)
    mask = ((j[None, :] <= slot[:, None])[None] & (j[None, None, :] >= start[:, None, None]))
    mask = (mask | (j[None, :] == slot[:, None])[None])[:, None]
    bias = None if bias is None else bias[:, None]
    sinks = None if spec.sinks is None else spec.sinks.reshape(H, Hq // H).repeat(B, 1)
    sub = AttentionSpec(scaling=spec.scaling, softcap=spec.softcap, dropout=spec.dropout)
    out = []
    for r in range(B * H):
        s = sub if sinks is None else AttentionSpec(scaling=spec.scaling, softcap=spec.softcap,
                                                    sinks=sinks[r], dropout=spec.dropout)
        out.append(masked_attention(qh[r : r + 1], keys[r : r + 1], values[r : r + 1], s, mask[r : r + 1],
                                    None if bias is None else bias[r : r + 1]))
    # [B*H, q, G, D] -> [B, q, Hq, D]
    res = torch.cat(out, 0).reshape(B, H, q, Hq // H, D).permute(0, 2, 1, 3, 4).reshape(B, q, Hq, D)
    return res.to(query.dtype)
