"""Python face of the C ops in ``kvcompress._C``.

Every function accepts torch tensors, NumPy arrays or any other object that
implements ``__dlpack__`` (CPU memory; CUDA needs a CUDA build). Outputs are
allocated here, with the framework of the main input (``torch.empty`` on the
input's device for torch tensors, NumPy otherwise), and filled by the C core.
Inputs may have any strides. Errors are :class:`KVCompressValueError` /
:class:`KVCompressTypeError` whose message names the offending argument.

torch is never imported by this module unless a torch tensor is passed in.
Results are bit-identical for any thread count (see :func:`set_num_threads`).
"""

from __future__ import annotations

import math
import operator

import numpy as np

from kvcompress import _C
from kvcompress.errors import KVCompressTypeError, KVCompressValueError

__all__ = [
    "window_scores",
    "vector_norm",
    "pool1d",
    "select_topk",
    "gather",
    "set_num_threads",
    "get_num_threads",
]

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64}


def _is_torch(x) -> bool:
    mod = type(x).__module__
    return mod == "torch" or mod.startswith("torch.")


def _prepare(x):
    """Tensors that require grad cannot be exported through DLPack; the ops
    are not differentiable anyway, so hand over a detached view."""
    if _is_torch(x) and x.requires_grad:
        return x.detach()
    return x


def _shape(x, name: str, ndim: int, dims: str) -> tuple:
    if _is_torch(x) or isinstance(x, np.ndarray):
        shape = tuple(x.shape)
    elif hasattr(x, "__dlpack__"):
        # array-likes usually know their shape; asking the producer for a
        # capsule just to read it is the fallback
        shape = getattr(x, "shape", None)
        shape = tuple(shape) if isinstance(shape, (tuple, list)) else _C._describe(x)[0]
    else:
        raise KVCompressTypeError(
            f"{name}: expected a tensor or array supporting DLPack (__dlpack__), got {type(x).__name__}"
        )
    if len(shape) != ndim:
        raise KVCompressValueError(f"{name}: expected a {ndim}-D tensor {dims}, got {len(shape)}-D")
    return shape


def _empty(like, shape, dtype: str):
    """Uninitialised output of `shape` in `like`'s framework and device."""
    if _is_torch(like):
        import torch

        return torch.empty(shape, dtype=getattr(torch, dtype), device=like.device)
    return np.empty(shape, dtype=_NP_DTYPES[dtype])


def _empty_like_dtype(like, shape):
    """Output with the same dtype as `like` (which may be bfloat16)."""
    if _is_torch(like):
        import torch

        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if isinstance(like, np.ndarray):
        return np.empty(shape, dtype=like.dtype)
    dtype = _C._describe(like)[1]
    if dtype not in _NP_DTYPES:
        raise KVCompressTypeError(
            f"keys: cannot allocate a NumPy output of dtype {dtype}; pass out_keys/out_values or torch tensors"
        )
    return np.empty(shape, dtype=_NP_DTYPES[dtype])


def _as_int64(x, name: str, like):
    """None, ints, sequences and integer arrays/tensors -> int64 in `like`'s framework.

    Non-integer arrays are passed through so the C side reports their dtype."""
    if x is None:
        return None
    if _is_torch(x):
        import torch

        if x.dtype in (torch.int8, torch.int16, torch.int32, torch.uint8):
            return x.to(torch.int64)
        return x
    if isinstance(x, np.ndarray):
        return x.astype(np.int64) if x.dtype.kind in "iu" and x.dtype != np.int64 else x
    if hasattr(x, "__dlpack__"):
        return x
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as e:  # pragma: no cover - exotic inputs
        raise KVCompressTypeError(f"{name}: expected integers, got {type(x).__name__}") from e
    if arr.dtype.kind not in "iu":
        raise KVCompressTypeError(f"{name}: expected integers, got {type(x).__name__} of {arr.dtype}")
    arr = arr.astype(np.int64)
    if _is_torch(like):
        import torch

        return torch.from_numpy(arr).to(like.device)
    return arr


def window_scores(queries, keys, *, scaling=None, gqa="mean", kv_start=None):
    """Attention that a window of the latest queries pays to every key.

    Parameters
    ----------
    queries : tensor ``[B, Hq, Tq, D]`` (float32, float16 or bfloat16)
        Queries of the last ``Tq`` key positions: query ``i`` sits at key
        position ``Tk - Tq + i`` and attends causally. ``Tq <= Tk``.
    keys : tensor ``[B, Hkv, Tk, D]``, same dtype as `queries`
        ``Hq`` must be a multiple of ``Hkv``; query head ``h`` uses kv head
        ``h // (Hq // Hkv)`` (the Hugging Face ``repeat_kv`` convention).
    scaling : float, optional
        Logit scale; default ``1 / sqrt(D)``.
    gqa : {"mean", "max"}
        How the ``Hq // Hkv`` query heads of a kv head are combined.
    kv_start : int64 tensor ``[B]``, optional
        Leading padded key positions per batch row (left padding). Those keys
        score 0 and are excluded from every softmax; a query that sees no
        valid key contributes 0.

    Returns
    -------
    float32 tensor ``[B, Hkv, Tk]``
        ``reduce_heads(mean_i softmax_j(scaling * q_i . k_j))``, accumulated in
        float32 with a max-shifted softmax.
    """
    if gqa not in ("mean", "max"):
        raise KVCompressValueError(f"gqa: expected 'mean' or 'max', got {gqa!r}")
    qs = _shape(queries, "queries", 4, "[B, Hq, Tq, D]")
    ks = _shape(keys, "keys", 4, "[B, Hkv, Tk, D]")
    if scaling is None:
        scaling = 1.0 / math.sqrt(qs[3]) if qs[3] > 0 else 1.0
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float, np.floating, np.integer)):
        raise KVCompressTypeError(f"scaling: expected a float, got {type(scaling).__name__}")
    out = _empty(keys, (ks[0], ks[1], ks[2]), "float32")
    _C.window_scores(
        _prepare(queries), _prepare(keys), out, float(scaling), gqa == "max", _as_int64(kv_start, "kv_start", keys)
    )
    return out


def vector_norm(x, ord=2):
    """Norm of every token vector.

    Parameters
    ----------
    x : tensor ``[B, H, T, D]`` (float32, float16 or bfloat16)
    ord : {1, 2}
        1: sum of absolute values (value norms, VATP); 2: Euclidean (key norms).

    Returns
    -------
    float32 tensor ``[B, H, T]``
    """
    if isinstance(ord, bool) or ord not in (1, 2):
        raise KVCompressValueError(f"ord: expected 1 or 2, got {ord!r}")
    s = _shape(x, "x", 4, "[B, H, T, D]")
    out = _empty(x, s[:3], "float32")
    _C.vector_norm(_prepare(x), out, int(ord))
    return out


def pool1d(scores, kernel, mode="max"):
    """Same-size 1-D pooling along the token axis.

    Parameters
    ----------
    scores : float32 tensor ``[B, H, T]``
    kernel : int
        Odd window size >= 1; padding ``kernel // 2`` on both sides.
    mode : {"max", "avg"}
        "max" equals ``max_pool1d(kernel, stride=1, padding=kernel // 2)``
        (padding ignored); "avg" equals ``avg_pool1d`` with the same padding
        and ``count_include_pad=True`` (always divides by `kernel`).

    Returns
    -------
    float32 tensor ``[B, H, T]``
    """
    if mode not in ("max", "avg"):
        raise KVCompressValueError(f"mode: expected 'max' or 'avg', got {mode!r}")
    try:
        kernel = operator.index(kernel)
    except TypeError:
        raise KVCompressTypeError(f"kernel: expected an int, got {type(kernel).__name__}") from None
    if kernel < 1 or kernel % 2 == 0:
        raise KVCompressValueError(f"kernel: expected an odd size >= 1, got {kernel}")
    s = _shape(scores, "scores", 3, "[B, H, T]")
    out = _empty(scores, s, "float32")
    _C.pool1d(_prepare(scores), out, kernel, mode == "avg")
    return out


def select_topk(scores, k, *, sinks=0, window=0, kv_start=None):
    """Per-head top-k token indices with forced keeps.

    Parameters
    ----------
    scores : float32 tensor ``[B, H, T]``
        Higher is better. NaN is an error.
    k : int or integer tensor ``[B, H]``
        Slots kept per head (1 <= k <= T), including the forced keeps.
    sinks : int
        Always keep the first `sinks` valid tokens ``kv_start[b] ..
        kv_start[b] + sinks - 1`` (clipped to T).
    window : int
        Always keep the last `window` tokens ``T - window .. T - 1``.
    kv_start : int64 tensor ``[B]``, optional
        Leading padded positions per batch row; they rank below every valid
        token and are taken only when k exceeds the number of valid tokens.

    Returns
    -------
    int64 tensor ``[B, H, kmax]``
        Kept indices in ascending order; ``kmax`` is `k` or ``max(k)``, and a
        head with a smaller k has -1 in its trailing entries. The remaining
        slots go to the highest scores, ties to the lower index.
    """
    s = _shape(scores, "scores", 3, "[B, H, T]")
    for name, v in (("sinks", sinks), ("window", window)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise KVCompressTypeError(f"{name}: expected an int, got {type(v).__name__}")
    if isinstance(k, bool):
        raise KVCompressTypeError("k: expected an int or an integer tensor [B, H], got bool")
    if isinstance(k, (int, np.integer)):
        k = int(k)
        if k < 1 or k > s[2]:
            raise KVCompressValueError(f"k: {k} is outside [1, T] = [1, {s[2]}]")
        kmax = k
    else:
        k = _as_int64(k, "k", scores)
        ks = _shape(k, "k", 2, "[B, H]")
        if ks[0] * ks[1] == 0:
            kmax = 0
        elif _is_torch(k) or isinstance(k, np.ndarray):
            kmax = int(k.max())
        else:
            kmax = int(np.from_dlpack(k).max())
        kmax = max(0, min(kmax, s[2]))
    out = _empty(scores, (s[0], s[1], kmax), "int64")
    _C.select_topk(_prepare(scores), out, k, int(sinks), int(window), _as_int64(kv_start, "kv_start", scores))
    return out


def gather(keys, values, indices, *, out_keys=None, out_values=None):
    """Gather the kept tokens of keys and values.

    Parameters
    ----------
    keys : tensor ``[B, H, T, D]`` (float32, float16 or bfloat16)
    values : tensor ``[B, H, T, Dv]``, same dtype as `keys`
        (``Dv`` may differ from ``D``; usually they are equal.)
    indices : int32 or int64 tensor ``[B, H, n]``
        Token indices, each in ``[0, T)``; -1 padding is not allowed here.
    out_keys, out_values : tensor ``[B, H, n, D]`` / ``[B, H, n, Dv]``, optional
        Writable outputs of the same dtype that overlap no input; allocated
        (contiguous) when omitted.

    Returns
    -------
    (keys_out, values_out) : tensors ``[B, H, n, D]`` and ``[B, H, n, Dv]``
    """
    ks = _shape(keys, "keys", 4, "[B, H, T, D]")
    vs = _shape(values, "values", 4, "[B, H, T, Dv]")
    ix = _shape(indices, "indices", 3, "[B, H, n]")
    if out_keys is None:
        out_keys = _empty_like_dtype(keys, (ix[0], ix[1], ix[2], ks[3]))
    if out_values is None:
        out_values = _empty_like_dtype(keys, (ix[0], ix[1], ix[2], vs[3]))
    _C.gather(_prepare(keys), _prepare(values), _prepare(indices), out_keys, out_values)
    return out_keys, out_values


def set_num_threads(n: int) -> None:
    """Threads used by every C op (OpenMP). Results do not depend on it."""
    _C.set_num_threads(n)


def get_num_threads() -> int:
    """Threads used by every C op (1 when built without OpenMP)."""
    return _C.get_num_threads()
