"""Key feedback for packed keys (``KIVI(feedback=True)``): the logit error, not the key error.

Attention reads a key only through ``q . k``. KIVI rounds each key channel
on its own, so the error ``e = k - k^`` of a token is whatever rounding left
in each channel, and the logit error ``q . e`` weighs it by the query.
Quantizing a group channel after channel and carrying each channel's error
into the channels not yet quantized, with GPTQ's weights computed from the
queries' second moment ``M = E[q q^T]`` instead of a layer's inputs, lowers
``E[(q . e)^2] = e^T M e`` rather than ``|e|^2`` (GPTQ, Frantar et al. 2023,
applied to keys with queries as inputs, as SQuat, Wang et al. 2025, does with
a query subspace). The codes, scales and the kernel that reads them are
KIVI's: only which codes the packer picks changes (``ops.pack_keys(...,
feedback=w)``).

``M`` comes from the queries a layer has seen when it first packs (the
prompt's, or a short prompt's and its first decode steps'), per kv head,
summed over the query heads that share it and over the batch's real (not
left-padded) positions. A rotated layer's weights are those of the rotated
queries ``q R``, as its packed keys are ``k R``.

A store holds the weights compactly (:func:`compact`: the strict upper
triangle in bfloat16, ``D (D - 1)`` bytes per kv head, a quarter of the
float32 square) and expands them for each pack (:func:`expand`): the weights
only steer rounding, and bfloat16's 8 significant bits move a carried error
by less than 0.4% of itself.
"""

from __future__ import annotations

import torch

_TRIU: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

#: GPTQ's damping: this fraction of the mean diagonal of M is added to it,
#: so that directions no query has taken still get a finite, small weight.
DAMPING = 0.01


class QueryMoments:
    """Running second moment of a layer's queries, per kv head.

    ``add(queries, hidden)`` folds ``queries [B, Hq, q, D]`` in, leaving
    out each row's first ``hidden[b]`` (its left padding: the call's
    queries are the row's newest ``q``, so a pad ``p`` over a sequence of
    ``n`` hides ``max(0, p - (n - q))`` of them); ``sum [Hkv, D, D]``
    float64 and ``count`` (queries folded, per kv head) hold the total."""

    def __init__(self, kv_heads: int):
        self.kv_heads = int(kv_heads)
        self.sum: torch.Tensor | None = None
        self.count = 0

    def __repr__(self) -> str:
        d = None if self.sum is None else int(self.sum.shape[-1])
        return f"QueryMoments(kv_heads={self.kv_heads}, head_dim={d}, queries={self.count})"

    def add(self, queries, hidden=None) -> None:
        """Fold in ``queries [B, Hq, q, D]``; ``hidden`` (int per batch row,
        or None) is how many of each row's first queries are padding."""
        B, Hq, q, D = (int(x) for x in queries.shape)
        if Hq % self.kv_heads:
            raise ValueError(f"queries: {Hq} heads are not a multiple of {self.kv_heads} kv heads")
        x = queries.detach().to(torch.float64)
        if hidden is not None:
            keep = torch.arange(q, device=x.device)[None, :] >= torch.as_tensor(
                hidden, device=x.device, dtype=torch.int64).reshape(-1, 1)
            x = x * keep[:, None, :, None]
            n = int(keep.sum()) * (Hq // self.kv_heads)
        else:
            n = B * q * (Hq // self.kv_heads)
        x = x.reshape(B, self.kv_heads, Hq // self.kv_heads * q, D).transpose(0, 1).reshape(self.kv_heads, -1, D)
        m = x.transpose(1, 2) @ x
        self.sum = m if self.sum is None else self.sum + m
        self.count += n

    def weights(self, rotation=None) -> torch.Tensor | None:
        """``feedback_weights`` of the mean moment (in the basis of
        ``rotation [D, D]`` when given), or None before any query."""
        if self.sum is None or self.count == 0:
            return None
        m = self.sum / self.count
        if rotation is not None:
            r = rotation.to(device=m.device, dtype=torch.float64)
            m = r.T @ m @ r
        return feedback_weights(m)


def feedback_weights(moment, damping: float = DAMPING) -> torch.Tensor:
    """``w [H, D, D]`` float32 for ``ops.pack_keys(feedback=w)`` from query
    second moments ``moment [H, D, D]`` (symmetric, positive semi-definite):
    ``U`` the upper Cholesky factor of ``(M + damping * mean(diag M) * I)^-1``
    and ``w[c, c'] = U[c, c'] / U[c, c]`` (strict upper triangle; the rest
    0). Computed in float64; a moment whose diagonal is all 0 gives w = 0,
    plain KIVI rounding."""
    m = torch.as_tensor(moment).to(torch.float64)
    if m.dim() != 3 or m.shape[1] != m.shape[2]:
        raise ValueError(f"moment: expected [H, D, D], got {tuple(m.shape)}")
    D = int(m.shape[1])
    eye = torch.eye(D, dtype=torch.float64, device=m.device)
    lam = damping * torch.diagonal(m, dim1=1, dim2=2).mean(1)
    lam = torch.where(lam > 0, lam, torch.ones_like(lam))  # all-zero moment: identity, so w = 0
    a = m + lam[:, None, None] * eye
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(a)), upper=True)
    w = torch.triu(u / torch.diagonal(u, dim1=1, dim2=2)[:, :, None], diagonal=1)
    return w.to(torch.float32).contiguous()


def _triu(D: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (D, str(torch.device(device)))
    idx = _TRIU.get(key)
    if idx is None:
        rows, cols = torch.triu_indices(D, D, 1, device=device)
        idx = _TRIU[key] = (rows, cols)
    return idx


def compact(weights) -> torch.Tensor:
    """``[H, D (D - 1) / 2]`` bfloat16: the strict upper triangle of
    ``weights [H, D, D]``, row by row (what a store holds)."""
    rows, cols = _triu(int(weights.shape[-1]), weights.device)
    return weights[:, rows, cols].to(torch.bfloat16).contiguous()


def expand(tri, head_dim: int) -> torch.Tensor:
    """``[H, D, D]`` float32 weights for ``ops.pack_keys(feedback=...)`` from
    :func:`compact`'s triangle (zeros on and below the diagonal)."""
    D = int(head_dim)
    rows, cols = _triu(D, tri.device)
    out = torch.zeros((int(tri.shape[0]), D, D), dtype=torch.float32, device=tri.device)
    out[:, rows, cols] = tri.to(torch.float32)
    return out
