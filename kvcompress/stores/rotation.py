"""The orthogonal rotation packed keys may be quantized in (``KIVI(rotate=True)``).

Attention reads keys only through ``q . k``, and for an orthogonal ``R``
``(q R) . (k R) = q . k``: a store may pack ``k R`` and give the kernel
``q R`` for the packed part, and attention is unchanged up to float rounding.
What changes is the quantization error. KIVI packs keys per channel in groups
of tokens, so a channel's step follows its spread; queries and keys put their
energy in the same few channels, so the coarsest steps land where the query
weighs most. A Hadamard rotation spreads both over every channel, and the
logit error follows the average channel rather than the product of the two
profiles (QuaRot's and SpinQuant's rotation, applied here to KIVI's
per-channel groups). On the default model it takes KIVI-2 from
+17.5% to +7.8% perplexity at the same bytes; on Gemma 3's global layers,
whose slowly turning RoPE channels are almost constant within a group and
pack almost exactly as they are, it does the opposite, so
:func:`rotation_helps` lets a layer choose (benchmarks/RESULTS.md, "KIVI-2
with rotated keys").
"""

from __future__ import annotations

import functools

import torch

_CACHE: dict[tuple[int, str], torch.Tensor] = {}


def _hadamard(D: int) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of order D (a power of two), float64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < D:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / D ** 0.5


def _seeded_orthogonal(D: int) -> torch.Tensor:
    """A fixed random orthogonal matrix of order D, float64: the Q of a QR
    factorisation of a seeded Gaussian matrix, columns signed so that R's
    diagonal is positive (the same matrix on every machine and run)."""
    g = torch.Generator().manual_seed(0x6B7663)
    q, r = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64, generator=g))
    return q * torch.sign(torch.diagonal(r))[None, :]


def key_rotation(head_dim: int, device) -> torch.Tensor:
    """The ``[D, D]`` float32 orthogonal matrix a rotating packed store uses
    for keys of ``head_dim`` channels on ``device``: the normalised Hadamard
    matrix when D is a power of two (every model transformers ships with
    RoPE so far), else a fixed seeded random orthogonal matrix. One tensor
    per (D, device), shared by every layer (its bytes count once)."""
    D = int(head_dim)
    if D < 1:
        raise ValueError(f"head_dim: must be >= 1, got {head_dim}")
    key = (D, str(torch.device(device)))
    rot = _CACHE.get(key)
    if rot is None:
        m = _hadamard(D) if D & (D - 1) == 0 else _seeded_orthogonal(D)
        rot = _CACHE[key] = m.to(device=device, dtype=torch.float32)
    return rot


def rotate(x: torch.Tensor, rot: torch.Tensor, dtype=None) -> torch.Tensor:
    """``x @ rot`` over the last axis of ``x`` ``[..., D]``, returned as
    ``dtype`` (default: ``x``'s), each row the same whatever the rows
    beside it: a float32 matrix product's sums depend on how many rows it
    multiplies (the kernel's blocking), so a batch row's keys would round
    otherwise than alone. :func:`key_rotation`'s Hadamard matrix is applied
    as a fast Walsh-Hadamard transform (sums and differences, float32, then
    the scale: the same operations on every row), any other ``rot`` in
    float64 (exact products; the rounding to float32 hides the order of the
    sums but for values within 1e-16 of a rounding boundary)."""
    return _apply(x, rot, False).to(x.dtype if dtype is None else dtype)


def rotate_queries(query: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """``query @ rot`` in one float32 product, for reading rotated packed
    keys at every decode step. A query's rotation only shapes the step's
    attention output, which the kernels sum in their own order anyway (a
    batch row within float rounding of alone), and one product costs a
    fraction of :func:`rotate`'s transform, whose row-by-row bits are for
    the keys a store packs and keeps."""
    return (query.float() @ rot).to(query.dtype)


def unrotate(x: torch.Tensor, rot: torch.Tensor, dtype=None) -> torch.Tensor:
    """``x @ rot.T``: the inverse of :func:`rotate` (``rot`` is orthogonal),
    row by row as it."""
    return _apply(x, rot, True).to(x.dtype if dtype is None else dtype)


def _apply(x: torch.Tensor, rot: torch.Tensor, transpose: bool) -> torch.Tensor:
    D = int(rot.shape[0])
    if _is_hadamard(rot):
        # the Sylvester matrix is symmetric: x @ H = x @ H.T
        return _walsh_hadamard(x.float()) * _hadamard_scale(D)
    r = rot.double()
    return (x.double() @ (r.T if transpose else r)).float()


def _is_hadamard(rot: torch.Tensor) -> bool:
    """Whether ``rot`` is :func:`key_rotation`'s Hadamard matrix (cached per
    order and device)."""
    D = int(rot.shape[0])
    return D & (D - 1) == 0 and any(rot is m for m in _CACHE.values())


@functools.lru_cache(maxsize=None)
def _hadamard_scale(D: int) -> float:
    """``1 / sqrt(D)`` as the float32 entries of :func:`key_rotation`'s matrix hold it."""
    return float(torch.tensor(D ** -0.5, dtype=torch.float32))


def _walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """``x @ H`` for the unnormalised Sylvester-Hadamard matrix ``H`` of order
    ``D = x.shape[-1]`` (a power of two): log2(D) butterfly passes of
    elementwise sums and differences, each exactly rounded."""
    shape, D = x.shape, int(x.shape[-1])
    y = x.reshape(-1, D)
    h = 1
    while h < D:
        y = y.view(-1, D // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack([a + b, a - b], 2)
        h *= 2
    return y.reshape(shape)


def rotation_helps(queries: torch.Tensor, keys: torch.Tensor, rot: torch.Tensor, bits: int, group: int,
                   scaling: float, start: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> bool:
    """Whether packing ``keys`` rotated by ``rot`` disturbs the attention of
    ``queries`` less than packing them as they are (``KIVI(rotate="auto")``):
    the two divergences of :func:`packing_divergences` compared."""
    plain, rotated = packing_divergences(queries, keys, rot, bits, group, scaling, start, counts)
    return rotated < plain


def packing_divergences(queries: torch.Tensor, keys: torch.Tensor, rot: torch.Tensor, bits: int, group: int,
                        scaling: float, start: torch.Tensor | None = None,
                        counts: torch.Tensor | None = None) -> tuple[float, float]:
    """``(plain, rotated)``: how much packing ``keys`` as they are, and
    rotated by ``rot``, disturbs the attention of ``queries``.

    ``queries`` ``[B, Hq, W, D]`` come after every key (the newest prompt
    tokens: a layer's residual holds them, so its packed keys all precede
    them); ``keys`` ``[B, H, m, D]``, the first ``start[b * H + h]`` slots of
    each head (``start`` int64 ``[B * H]``, optional) padding, masked and
    replaced by the head's first real key before packing so they widen no
    group; ``counts`` ``[B, H, m]`` (optional) are the slots' merge counts,
    each adding ``log(count)`` to its logits both ways, as the packed
    attention does. The measure is the mean KL divergence from each query's
    attention over the exact keys to its attention over the packed ones,
    both ways of packing at ``bits`` in groups of ``group`` tokens (KIVI's
    keys). Which way is better differs by layer: on Gemma 3 rotation helps
    most sliding layers and hurts the three global ones 4-15x (RESULTS,
    "KIVI-2 with rotated keys").
    """
    from .. import ops

    B, Hq, W, D = (int(x) for x in queries.shape)
    H, m = int(keys.shape[1]), int(keys.shape[2])
    if m == 0 or W == 0:
        return 0.0, 0.0
    k = keys.float()
    mask = None
    if start is not None:
        s = start.to(device=k.device, dtype=torch.int64).view(B, H)
        col = torch.arange(m, device=k.device)
        mask = col[None, None, :] < s[:, :, None]  # [B, H, m] padding
        first = torch.gather(k, 2, s.clamp(max=m - 1)[:, :, None, None].expand(B, H, 1, D))
        k = torch.where(mask[..., None], first, k)
    q = queries.float().reshape(B, H, (Hq // H) * W, D)
    # KL(p || p~) with p~ = p e^d / sum(p e^d), d the logits' change, is
    # log sum(p e^(d - c)) for c = sum(p d): written so (log1p of sums of
    # expm1, d taken as q . (packed - exact) directly), fp32 elementwise work
    # keeps the divergence's own relative precision, which the difference of
    # two log-softmaxes, as small as it is, loses in anything but float64.
    # Within 1e-5 of a float64 computation of the definition, in under half
    # its time (RESULTS, "Faster per-layer tests: clipped ranges
    # searched side by side")
    logits = q @ k.transpose(-1, -2)
    logits.mul_(float(scaling))
    if counts is not None:
        logits.add_(counts.to(device=k.device, dtype=torch.float32).log()[:, :, None, :])
    if mask is not None:
        logits.masked_fill_(mask[:, :, None, :], float("-inf"))
    p = torch.softmax(logits, -1)
    if mask is not None:
        p.nan_to_num_(0.0)  # a head of padding only: no weight

    def divergence(packed_keys):
        d = q @ (packed_keys - k).transpose(-1, -2)
        d.mul_(float(scaling))
        if mask is not None:
            d.masked_fill_(mask[:, :, None, :], 0.0)  # no weight there, and no 0 x inf
        c = (p * d).sum(-1, keepdim=True, dtype=torch.float64)
        d.sub_(c.float())
        z = (p * torch.expm1(d)).sum(-1, dtype=torch.float64)  # sum p e^(d - c) - 1; padding: p = 0
        return float(torch.log1p(z).mean())

    def packed(x):
        codes, mins, scales = ops.pack_keys(x.contiguous(), bits, group)
        return ops.unpack_keys(codes, mins, scales, bits, group)

    return divergence(packed(k)), divergence(unrotate(packed(rotate(k, rot)), rot))
