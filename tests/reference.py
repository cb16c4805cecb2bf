"""Straightforward torch implementations of the C ops, for the tests.

Each function computes in the dtype it is given (float64 for the reference,
the input dtype for the "what would torch itself get" error baseline) and
follows the op's definition literally, without any of the C core's tricks.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def as_torch(x):
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    return x


def window_scores_ref(queries, keys, *, scaling=None, gqa="mean", kv_start=None, dtype=torch.float64):
    q = as_torch(queries).to(dtype)
    k = as_torch(keys).to(dtype)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    g = Hq // Hkv if Hkv else 1
    if scaling is None:
        scaling = 1.0 / math.sqrt(D) if D else 1.0
    k_rep = k.repeat_interleave(g, dim=1)  # head h uses kv head h // g
    logits = (q @ k_rep.transpose(-1, -2)) * scaling  # [B, Hq, Tq, Tk]
    pos = torch.arange(Tq) + (Tk - Tq)
    j = torch.arange(Tk)
    start = torch.zeros(B, dtype=torch.int64) if kv_start is None else as_torch(kv_start).to(torch.int64)
    allowed = (j[None, None, :] <= pos[None, :, None]) & (j[None, None, :] >= start[:, None, None])
    allowed = allowed[:, None]  # [B, 1, Tq, Tk]
    logits = logits.masked_fill(~allowed, float("-inf"))
    attn = torch.softmax(logits, dim=-1)
    attn = torch.where(allowed, attn, torch.zeros((), dtype=dtype))  # rows with no key: 0, not NaN
    per_head = attn.mean(dim=2) if Tq > 0 else torch.zeros(B, Hq, Tk, dtype=dtype)
    grouped = per_head.reshape(B, Hkv, g, Tk)
    return grouped.mean(dim=2) if gqa == "mean" else grouped.amax(dim=2)


def vector_norm_ref(x, ord=2, dtype=torch.float64):
    return torch.linalg.vector_norm(as_torch(x).to(dtype), ord=ord, dim=-1)


def pool1d_ref(scores, kernel, mode="max", dtype=torch.float64):
    s = as_torch(scores).to(dtype)
    B, H, T = s.shape
    flat = s.reshape(B * H, 1, T)
    if mode == "max":
        out = torch.nn.functional.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        out = torch.nn.functional.avg_pool1d(
            flat, kernel, stride=1, padding=kernel // 2, count_include_pad=True
        )
    return out.reshape(B, H, T)


def select_topk_ref(scores, k, *, sinks=0, window=0, kv_start=None):
    """Row by row with Python sets and a stable sort: the definition itself."""
    s = as_torch(scores).to(torch.float64).numpy()
    B, H, T = s.shape
    if isinstance(k, int):
        kk = np.full((B, H), k, dtype=np.int64)
    else:
        kk = as_torch(k).to(torch.int64).numpy()
    start = np.zeros(B, dtype=np.int64) if kv_start is None else as_torch(kv_start).to(torch.int64).numpy()
    kmax = int(kk.max()) if kk.size else (k if isinstance(k, int) else 0)
    out = np.full((B, H, kmax), -1, dtype=np.int64)
    for b in range(B):
        st = int(start[b])
        forced = set(range(st, min(st + sinks, T))) | set(range(max(T - window, 0), T))
        for h in range(H):
            rest = [j for j in range(T) if j not in forced]
            # rank: valid before padded, then score descending, then index ascending
            rest.sort(key=lambda j: (j < st, -s[b, h, j], j))
            kept = sorted(forced | set(rest[: int(kk[b, h]) - len(forced)]))
            out[b, h, : len(kept)] = kept
    return torch.from_numpy(out)


def gather_ref(keys, values, indices):
    k = as_torch(keys)
    v = as_torch(values)
    idx = as_torch(indices).to(torch.int64)
    ko = torch.take_along_dim(k, idx[..., None], dim=2)
    vo = torch.take_along_dim(v, idx[..., None], dim=2)
    return ko, vo
