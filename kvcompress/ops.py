"""Python face of the C ops in ``kvcompress._C``.

Every function accepts torch tensors, NumPy arrays or any other object that
implements ``__dlpack__``, in CPU memory or, with a CUDA build
(``KVCOMPRESS_CUDA=1``, see :data:`has_cuda`), on one CUDA device; CUDA work
runs on the producer's current stream. Outputs are
allocated here, with the framework of the main input (``torch.empty`` on the
input's device for torch tensors, NumPy otherwise), and filled by the C core.
Inputs may have any strides. Errors are :class:`KVCompressValueError` /
:class:`KVCompressTypeError` whose message names the offending argument.

torch is never imported by this module unless a torch tensor is passed in.
Results are bit-identical for any thread count (see :func:`set_num_threads`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from kvcompress import _C
from kvcompress.errors import KVCompressTypeError, KVCompressValueError

__all__ = [
    "window_scores",
    "keyformer_scores",
    "vector_norm",
    "pool1d",
    "lagkv_scores",
    "select_topk",
    "gather",
    "set_num_threads",
    "get_num_threads",
    "evict_merge",
    "EvictMergeResult",
    "span_merge",
    "SpanMerge",
    "attention",
    "packed_attention",
    "page_bounds",
    "page_scores",
    "attention_pages",
    "simhash",
    "lsh_attention",
    "slerp_merge",
    "slerp_restore",
    "minicache_attention",
    "SlerpMerge",
    "global_scores",
    "probe_positions",
    "head_budgets",
    "pack_keys",
    "pack_values",
    "unpack_keys",
    "unpack_values",
    "packed_row_bytes",
    "Packed",
    "has_cuda",
    "cuda_device_count",
    "kvcrush_pick",
    "KVCrushPick",
    "kvmerger_sets",
    "KVMergerSets",
    "gauss_merge",
    "GaussMerge",
    "actqkv_scores",
    "pooled_counts",
    "row_cosine",
    "fastgen_recovery",
]

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64,
              "uint8": np.uint8}


def _is_torch(x) -> bool:
    mod = type(x).__module__
    return mod == "torch" or mod.startswith("torch.")


def _prepare(x):
    """An input as the C ops read it. Tensors that require grad cannot be
    exported through DLPack; the ops are not differentiable anyway, so hand
    over a detached view. A view with torch's negative bit (``x.conj().imag``)
    exports its un-negated memory: hand over the values it shows."""
    if _is_torch(x):
        if x.requires_grad:
            x = x.detach()
        if x.is_neg():
            x = x.resolve_neg()
    return x


def _out(x, name: str):
    """A caller's output tensor, refused by name where the C ops cannot write
    what it shows: a view with torch's negative bit (DLPack exports the
    un-negated memory, so every value would land negated), or a tensor that
    requires grad (written in place behind autograd, which may have saved
    it for a backward pass)."""
    if x is not None and _is_torch(x):
        if x.is_neg():
            raise KVCompressValueError(f"{name}: a view with torch's negative bit (such as x.conj().imag) cannot "
                                       f"be written through DLPack; pass a plain tensor")
        if x.requires_grad:
            raise KVCompressValueError(f"{name}: requires grad, and the op writes it in place outside autograd; "
                                       f"pass a tensor that does not require grad")
    return x


def _shape(x, name: str, ndim: int, dims: str) -> tuple:
    if _is_torch(x) or isinstance(x, np.ndarray):
        shape = tuple(x.shape)
    elif hasattr(x, "__dlpack__"):
        # array-likes usually know their shape; asking the producer for a
        # capsule just to read it is the fallback
        shape = getattr(x, "shape", None)
        shape = tuple(shape) if isinstance(shape, (tuple, list)) else _C._describe(x, name)[0]
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


def _empty_like_dtype(like, shape, name: str = "keys"):
    """Output with the same dtype as `like` (which may be bfloat16), the
    argument `name`."""
    if _is_torch(like):
        import torch

        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if isinstance(like, np.ndarray):
        return np.empty(shape, dtype=like.dtype)
    dtype = _C._describe(like, name)[1]
    if dtype not in _NP_DTYPES:
        raise KVCompressTypeError(
            f"{name}: cannot allocate a NumPy output of dtype {dtype}; pass the outputs or torch tensors"
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


def _real(x, name: str, what: str = "a float") -> float:
    """A real-number argument as a Python float (bools are not numbers here;
    an int too large for a float is a value error, not an OverflowError)."""
    if isinstance(x, bool) or not isinstance(x, (int, float, np.floating, np.integer)):
        raise KVCompressTypeError(f"{name}: expected {what}, got {type(x).__name__}")
    try:
        return float(x)
    except OverflowError:
        raise KVCompressValueError(f"{name}: {x} is out of range for a float") from None


def _py_int(x):
    """NumPy integers as Python ints; anything else as it is, for the C op to
    check (type and range, once, with the argument's name)."""
    return int(x) if isinstance(x, np.integer) else x


def _choice(x, name: str, options: tuple) -> None:
    """A string option; compared only once known to be a string, so arrays
    passed by mistake neither broadcast the comparison nor warn."""
    if not (isinstance(x, str) and x in options):
        raise KVCompressValueError(f"{name}: expected {options[0]!r} or {options[1]!r}, got {x!r}")


def _kmax(k, T: int) -> int:
    """max(k) clipped to [0, T], the width of select_topk's output; 0 when k
    is not an integer array this module can read (sparse, meta, a failing
    producer...): the C op then reports what is wrong with k, before it
    looks at the output."""
    if _is_torch(k):
        import torch

        readable = k.layout == torch.strided and k.device.type in ("cpu", "cuda") and \
            k.dtype in (torch.int32, torch.int64) and k.numel() > 0
        return max(0, min(int(k.max()), T)) if readable else 0
    if not isinstance(k, np.ndarray):
        try:
            k = np.from_dlpack(k)
        except Exception:  # noqa: BLE001 - any producer failure; _C asks again and names it
            return 0
    return max(0, min(int(k.max()), T)) if k.dtype.kind in "iu" and k.size else 0


def _scaling(scaling, D: int) -> float:
    """The `scaling` argument: None means 1/sqrt(D) (1 for D = 0); a real number otherwise."""
    if scaling is None:
        return 1.0 / math.sqrt(D) if D > 0 else 1.0
    return _real(scaling, "scaling")


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
    _choice(gqa, "gqa", ("mean", "max"))
    qs = _shape(queries, "queries", 4, "[B, Hq, Tq, D]")
    ks = _shape(keys, "keys", 4, "[B, Hkv, Tk, D]")
    scaling = _scaling(scaling, qs[3])
    out = _empty(keys, (ks[0], ks[1], ks[2]), "float32")
    _C.window_scores(
        _prepare(queries), _prepare(keys), out, scaling, gqa == "max", _as_int64(kv_start, "kv_start", keys)
    )
    return out


def keyformer_scores(queries, keys, *, tau=1.0, noise=1.0, seed=0, layer=0, step=0, scaling=None, kv_start=None):
    """Keyformer's score of every key: noisy, tempered attention summed over queries.

    Parameters
    ----------
    queries : tensor ``[B, Hq, Tq, D]`` (float32, float16 or bfloat16)
        Queries of the last ``Tq`` key positions: query ``i`` sits at key
        position ``p_i = Tk - Tq + i`` and sees keys ``s <= j <= p_i``
        (``s = kv_start[b]``). ``Tq <= Tk``.
    keys : tensor ``[B, Hkv, Tk, D]``, same dtype as `queries`
        ``Hq`` a multiple of ``Hkv``; query head ``h`` uses kv head
        ``h // (Hq // Hkv)``.
    tau : float > 0
        Softmax temperature of every query of this call.
    noise : float >= 0
        Scale of the Gumbel noise added to the logits; 0 draws none.
    seed, layer, step : int >= 0
        Words of the noise's counter-based hash (with the query head, the
        key's offset ``j - s`` and the query's offset ``p_i - s``): the same
        words give the same noise, on every backend and thread count.
    scaling : float, optional
        Logit scale; default ``1 / sqrt(D)``.
    kv_start : int64 tensor ``[B]``, optional
        Leading padded key positions per batch row; those keys score 0 and
        take no part in any softmax.

    Returns
    -------
    float32 tensor ``[B, Hkv, Tk]``
        ``mean over the query heads h of kv head hk of sum_i softmax_j(z_ij)``
        with ``z_ij = (scaling * q_i . k_j + noise * G) / tau``, ``G`` the
        standard Gumbel sample ``-log(-log(u))`` of ``u`` drawn from
        ``hash(seed, layer, h, j - s, p_i - s, step)`` (csrc/keyformer_math.h).
        Sums are float32, the noise is computed in float64.
    """
    qs = _shape(queries, "queries", 4, "[B, Hq, Tq, D]")
    ks = _shape(keys, "keys", 4, "[B, Hkv, Tk, D]")
    scaling = _scaling(scaling, qs[3])
    out = _empty(keys, (ks[0], ks[1], ks[2]), "float32")
    _C.keyformer_scores(
        _prepare(queries), _prepare(keys), out, scaling, _real(tau, "tau"), _real(noise, "noise"), _py_int(seed),
        _py_int(layer), _py_int(step), _as_int64(kv_start, "kv_start", keys),
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
    s = _shape(x, "x", 4, "[B, H, T, D]")
    out = _empty(x, s[:3], "float32")
    _C.vector_norm(_prepare(x), out, _py_int(ord))
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
    _choice(mode, "mode", ("max", "avg"))
    s = _shape(scores, "scores", 3, "[B, H, T]")
    out = _empty(scores, s, "float32")
    _C.pool1d(_prepare(scores), out, _py_int(kernel), mode == "avg")
    return out


def lagkv_scores(keys, values, *, lag, sinks=0, kv_start=None, per_chunk=False):
    """LagKV token scores (arXiv 2504.04704): lag-relative spread of keys and values.

    Per batch row ``b`` and head, the tokens after the padding
    (``kv_start[b]``) and the first `sinks` valid tokens are cut into chunks
    of `lag` tokens. With ``m`` whole chunks, chunks ``0 .. m-2`` are scored
    (``M = m - 1`` of them; none when ``m < 2``); chunk ``c`` is normalised by
    chunk ``c + 1``, its lag reference. The last whole chunk and the partial
    one after it (together the tail) have no reference.

    For token ``j`` of a scored chunk and x its key (then its value): every
    channel ``d`` is min-max normalised by the reference chunk,
    ``xn_d = (x_d - lo_d) / (hi_d - lo_d)`` (0 where ``hi_d == lo_d``), and
    ``std(x) = sqrt(sum_d (xn_d - mean(xn))^2 / (D - 1))``. The raw score is
    ``softmax_chunk(std(K))[j] + softmax_chunk(std(V))[j]``, the softmax
    taken over the `lag` tokens of the chunk (so it lies in (0, 2]).

    Parameters
    ----------
    keys : tensor ``[B, H, T, D]`` (float32, float16 or bfloat16), ``D >= 2``
    values : tensor ``[B, H, T, Dv]``, same dtype as `keys`, ``Dv >= 2``
    lag : int >= 1
        Chunk length, and the distance to the reference chunk.
    sinks : int >= 0
        Leading valid tokens that are never scored.
    kv_start : int64 tensor ``[B]``, optional
        Leading padded positions per batch row (left padding).
    per_chunk : bool
        False: the raw score. True: a priority ``-(r * M + (M - 1 - c))``,
        with ``r`` the token's rank by raw score inside its chunk ``c`` (0 =
        highest, ties to the lower index), so that a top-k over the row
        (:func:`select_topk`) takes the same number of tokens from every
        scored chunk, the newer chunks taking the one extra where the count
        does not divide (the paper keeps a fixed share of each chunk).
        Exact while ``T < 2**24``.

    Returns
    -------
    float32 tensor ``[B, H, T]``
        The score of each scored token; ``+inf`` for the sinks and the tail
        (always kept), ``-inf`` for padding. A NaN raw score (non-finite
        inputs) stays NaN in both modes. Accumulated in float32.
    """
    ks = _shape(keys, "keys", 4, "[B, H, T, D]")
    _shape(values, "values", 4, "[B, H, T, Dv]")
    out = _empty(keys, (ks[0], ks[1], ks[2]), "float32")
    _flag(per_chunk, "per_chunk")
    _C.lagkv_scores(_prepare(keys), _prepare(values), out, _py_int(sinks), _py_int(lag), per_chunk,
                    _as_int64(kv_start, "kv_start", keys))
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
    if isinstance(k, bool):
        raise KVCompressTypeError("k: expected an int or an integer tensor [B, H], got bool")
    if isinstance(k, (int, np.integer)):
        k = int(k)
        if k < 1 or k > s[2]:
            raise KVCompressValueError(f"k: {k} is outside [1, T] = [1, {s[2]}]")
        kmax = k
    else:
        k = _as_int64(k, "k", scores)
        _shape(k, "k", 2, "[B, H]")
        kmax = _kmax(k, s[2])
    out = _empty(scores, (s[0], s[1], kmax), "int64")
    _C.select_topk(_prepare(scores), out, k, _py_int(sinks), _py_int(window), _as_int64(kv_start, "kv_start", scores))
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
    _C.gather(_prepare(keys), _prepare(values), _prepare(indices), _out(out_keys, "out_keys"),
              _out(out_values, "out_values"))
    return out_keys, out_values


#: True when this build has the CUDA backend (``KVCOMPRESS_CUDA=1``).
has_cuda: bool = bool(_C.has_cuda)


def cuda_device_count() -> int:
    """CUDA devices the ops can use: 0 in a CPU-only build or without a driver."""
    return _C.cuda_device_count()


def set_num_threads(n: int) -> None:
    """Threads used by every C op (OpenMP). Results do not depend on it."""
    _C.set_num_threads(n)


def get_num_threads() -> int:
    """Threads used by every C op (1 when built without OpenMP)."""
    return _C.get_num_threads()


class EvictMergeResult(NamedTuple):
    """Outputs of :func:`evict_merge` (shapes with ``C`` = centers per head)."""

    keys: object  #: ``[B, H, C, D]``, dtype of the input keys
    values: object  #: ``[B, H, C, Dv]``, dtype of the input keys
    counts: object  #: ``[B, H, C]`` float32 or int32: 1 + tokens merged in, 0 past ``C_h``
    scores: object  #: ``[B, H, C]`` float32: merged weight ``S_c + sum S_j``, 0 past ``C_h``
    tau: object  #: ``[B, H]`` float32: the threshold actually used
    assign: object  #: ``[B, H, T]`` int64 or None: -1 padding, 0 evicted, ``c + 1`` in center ``c``


def evict_merge(keys, values, scores, centers, tau=None, *, kv_start=None, counts_dtype="float32",
                return_assign=False):
    """Evict-then-merge with the zero class (EMS steps 4-6 in docs/design.md).

    Per batch row and kv head, every token that is neither a center nor
    padding joins the center whose key has the highest cosine similarity with
    its own (ties to the lowest center; a zero key has cosine 0 with all). If
    that best cosine is below the head's threshold ``tau_h`` the token is
    evicted (class 0), otherwise it is merged into the center, weighted by the
    scores::

        v_c <- (S_c v_c + sum_j S_j v_j) / (S_c + sum_j S_j)
        k_c <- |k_c| * normalize(S_c u_c + sum_j S_j u_j),  u = k / |k|

    Eviction and merging are one scatter, so heads with any mix of the two
    run in the same pass. Sums are float32 in ascending token order and each
    output is rounded once. A center that merged nothing is copied bit for
    bit (``tau=inf`` is exactly plain eviction: :func:`gather` of the
    centers). When a center's weight sum is 0 its rows stay unchanged; when
    the merged key direction cancels out (norm <= 1e-6 of the weight sum) or
    the center key is zero, its key stays unchanged.

    Parameters
    ----------
    keys : tensor ``[B, H, T, D]`` (float32, float16 or bfloat16)
        Kv-head keys (post-RoPE); any strides.
    values : tensor ``[B, H, T, Dv]``, same dtype as `keys`
    scores : float32 tensor ``[B, H, T]``
        Importance weights, finite and >= 0 on every valid slot.
    centers : int64 tensor ``[B, H, C]``
        Kept slots of each head in strictly ascending order, each in
        ``[kv_start[b], T)``; a head with ``C_h < C`` centers has -1 in its
        last ``C - C_h`` entries (as :func:`select_topk` returns them).
    tau : None, float or float32 tensor ``[B, H]``
        Similarity threshold per head: ``inf`` evicts every non-center,
        ``-inf`` merges every non-center, NaN (or None for all heads) picks
        the adaptive threshold: the mean over the head's candidates of their
        best cosine.
    kv_start : int64 tensor ``[B]``, optional
        Leading padded slots per batch row: never centers, never merged.
    counts_dtype : {"float32", "int32"}
    return_assign : bool
        Also return the class of every slot.

    Returns
    -------
    EvictMergeResult
        ``(keys, values, counts, scores, tau, assign)``; rows past a head's
        ``C_h`` are zero. Outputs use the framework and device of `keys`.
    """
    _choice(counts_dtype, "counts_dtype", ("float32", "int32"))
    ks = _shape(keys, "keys", 4, "[B, H, T, D]")
    vs = _shape(values, "values", 4, "[B, H, T, Dv]")
    centers = _as_int64(centers, "centers", keys)
    cs = _shape(centers, "centers", 3, "[B, H, C]")
    B, H, T, D = ks
    C = cs[2]
    if tau is None or (isinstance(tau, (int, float, np.integer, np.floating)) and not isinstance(tau, bool)):
        value = math.nan if tau is None else _real(tau, "tau")
        if abs(value) > float(np.finfo(np.float32).max):
            # past float32's range: a cosine never reaches (or always exceeds)
            # it, exactly like +-inf, which float32 can hold
            value = math.copysign(math.inf, value)
        if _is_torch(keys):
            import torch

            tau = torch.full((B, H), value, dtype=torch.float32, device=keys.device)
        else:
            tau = np.full((B, H), value, dtype=np.float32)
    elif isinstance(tau, bool) or not hasattr(tau, "__dlpack__"):
        raise KVCompressTypeError(f"tau: expected None, a float or a float32 tensor [B, H], got {type(tau).__name__}")
    out_keys = _empty_like_dtype(keys, (B, H, C, D))
    out_values = _empty_like_dtype(keys, (B, H, C, vs[3]))
    counts = _empty(keys, (B, H, C), counts_dtype)
    out_scores = _empty(keys, (B, H, C), "float32")
    tau_used = _empty(keys, (B, H), "float32")
    assign = _empty(keys, (B, H, T), "int64") if _flag(return_assign, "return_assign") else None
    _C.evict_merge(
        _prepare(keys), _prepare(values), _prepare(scores), _prepare(centers), _prepare(tau),
        _as_int64(kv_start, "kv_start", keys), out_keys, out_values, counts, out_scores, tau_used, assign,
    )
    return EvictMergeResult(out_keys, out_values, counts, out_scores, tau_used, assign)


class SpanMerge(NamedTuple):
    """Outputs of :func:`span_merge`."""

    keys: object  #: ``[B, H, D]``, dtype of the input keys
    values: object  #: ``[B, H, Dv]``, dtype of the input keys
    counts: object  #: ``[B, H]`` float32: the summed count of the span (0 when empty)


def span_merge(keys, values, lo, hi, *, counts=None):
    """Count-weighted mean of one contiguous span of slots per (row, head).

    RazorAttention's compensation token: per batch row ``b`` and kv head
    ``h`` the slots ``j`` in ``[lo[b, h], hi[b, h])`` fold into one key,
    one value and one count::

        W      = sum_j c_j
        key    = sum_j c_j k_j / W
        value  = sum_j c_j v_j / W
        count  = W

    with ``c_j = counts[b, h, j]`` (1 for every slot when `counts` is None).
    Sums are float64 in ascending ``j``; the mean is rounded once to float32
    and then to the storage dtype; CPU and CUDA agree bit for bit. An empty
    span gives zero rows and count 0.

    Parameters
    ----------
    keys : tensor ``[B, H, T, D]`` (float32, float16 or bfloat16)
    values : tensor ``[B, H, T, Dv]``, same dtype as `keys`
    lo, hi : int64 tensors ``[B, H]`` (or int sequences)
        The span of each head, ``0 <= lo <= hi <= T`` (checked).
    counts : float32 tensor ``[B, H, T]``, optional
        Weights (merge counts): every count inside a span must be finite and
        ``> 0`` (checked); slots outside the spans are never read.

    Returns
    -------
    SpanMerge
        ``(keys [B, H, D], values [B, H, Dv], counts [B, H] float32)``,
        in the framework and on the device of `keys`.
    """
    ks = _shape(keys, "keys", 4, "[B, H, T, D]")
    vs = _shape(values, "values", 4, "[B, H, T, Dv]")
    lo = _as_int64(lo, "lo", keys)
    hi = _as_int64(hi, "hi", keys)
    B, H = ks[0], ks[1]
    out_keys = _empty_like_dtype(keys, (B, H, ks[3]))
    out_values = _empty_like_dtype(keys, (B, H, vs[3]))
    out_counts = _empty(keys, (B, H), "float32")
    _C.span_merge(_prepare(keys), _prepare(values), None if counts is None else _prepare(counts), _prepare(lo),
                  _prepare(hi), out_keys, out_values, out_counts)
    return SpanMerge(out_keys, out_values, out_counts)


class KVMergerSets(NamedTuple):
    """Outputs of :func:`kvmerger_sets`."""

    sims: object  #: ``[B, H, T]`` float32: cosine of each candidate key with the previous one, NaN elsewhere
    runs: object  #: ``[B, H, T]`` int64: first slot of the slot's merging set, -1 outside the candidates


def kvmerger_sets(keys, *, threshold, sinks=0, window=0, kv_start=None):
    """KVMerger's merging sets (arXiv 2407.08454, Algorithm 1): runs of
    consecutive slots whose key is similar to its neighbour's.

    Per batch row ``b`` and head, with ``s = kv_start[b]``, the candidates
    are the slots ``[lo, hi)``, ``lo = min(s + sinks, T)``, ``hi = max(lo,
    T - window)`` (sinks and the recent window never join a set). For a
    candidate ``j > lo``, ``sims[j] = cos(k_{j-1}, k_j)`` (fp32 sums in
    channel order; 0 when either key is zero) and ``j`` joins the set of
    ``j - 1`` when ``sims[j] > threshold``, else starts a new one (a NaN
    cosine starts a new one). ``runs[j]`` is the first slot of ``j``'s set.

    Parameters
    ----------
    keys : tensor ``[B, H, T, D]`` (float32, float16 or bfloat16)
    threshold : float
        Finite; a cosine must exceed it (strictly) to join the set.
    sinks, window : int >= 0
        First valid slots and last slots kept out of every set.
    kv_start : int64 tensor ``[B]``, optional
        Leading padded slots per batch row.

    Returns
    -------
    KVMergerSets
        ``(sims [B, H, T] float32, runs [B, H, T] int64)``, in the framework
        and on the device of `keys`.
    """
    ks = _shape(keys, "keys", 4, "[B, H, T, D]")
    sims = _empty(keys, (ks[0], ks[1], ks[2]), "float32")
    runs = _empty(keys, (ks[0], ks[1], ks[2]), "int64")
    _C.kvmerger_sets(_prepare(keys), sims, runs, _py_int(sinks), _py_int(window), _real(threshold, "threshold"),
                     _as_int64(kv_start, "kv_start", keys))
    return KVMergerSets(sims, runs)


class GaussMerge(NamedTuple):
    """Outputs of :func:`gauss_merge` (shapes with ``C`` = centers per head)."""

    keys: object  #: ``[B, H, C, D]``, dtype of the input keys
    values: object  #: ``[B, H, C, Dv]``, dtype of the input keys
    counts: object  #: ``[B, H, C]`` float32: tokens each output row stands for, 0 past ``C_h``
    assign: object  #: ``[B, H, T]`` int64 or None: -1 padding, 0 dropped, ``i + 1`` in center ``i``


def gauss_merge(keys, values, scores, centers, runs, *, sigma, counts=None, kv_start=None, return_assign=False):
    """KVMerger's Gaussian-kernel merge of each merging set into its pivot.

    Per batch row and head, the kept slots ``centers`` (ascending, -1 padded
    at the end, as :func:`select_topk` returns them) each give one output
    row. A center ``j`` with ``runs[j] = r >= 0`` belongs to the merging set
    ``r`` (:func:`kvmerger_sets`); the set's **pivot** is its center of
    highest score (ties to the lower slot). The pivot ``p`` absorbs every
    slot ``t`` of its set that is not a center::

        w_t = count_t * exp(-|k_p - k_t|^2 / (2 sigma^2)),   w_p = count_p
        k_p <- sum w_t k_t / sum w_t,   v_p <- sum w_t v_t / sum w_t
        count_p <- sum count_t

    (the sums over ``p`` and the slots it absorbs; fp32 in ascending slot
    order, each output rounded once). Every other center, and a pivot that
    absorbs nothing, is copied bit for bit with its count. A non-center slot
    whose set holds no center (or that is in no set) is dropped.

    Parameters
    ----------
    keys : tensor ``[B, H, T, D]`` (float32, float16 or bfloat16)
    values : tensor ``[B, H, T, Dv]``, same dtype as `keys`
    scores : float32 tensor ``[B, H, T]``
        Picks each set's pivot among its centers.
    centers : int64 tensor ``[B, H, C]``
        Strictly ascending slots in ``[kv_start[b], T)``, then only -1.
    runs : int64 tensor ``[B, H, T]``
        Each slot's set as :func:`kvmerger_sets` names it: -1, the slot
        itself, or the previous slot's set.
    sigma : float > 0
        Width of the Gaussian kernel.
    counts : float32 tensor ``[B, H, T]``, optional
        Tokens each slot already stands for (finite, > 0); 1 each without.
    kv_start : int64 tensor ``[B]``, optional
        Leading padded slots per batch row (never centers).
    return_assign : bool
        Also return where every slot went.

    Returns
    -------
    GaussMerge
        ``(keys, values, counts, assign)``; rows past a head's centers are
        zero. Outputs use the framework and device of `keys`.
    """
    ks = _shape(keys, "keys", 4, "[B, H, T, D]")
    vs = _shape(values, "values", 4, "[B, H, T, Dv]")
    centers = _as_int64(centers, "centers", keys)
    runs = _as_int64(runs, "runs", keys)
    cs = _shape(centers, "centers", 3, "[B, H, C]")
    B, H, T, D = ks
    C = cs[2]
    _flag(return_assign, "return_assign")
    out_keys = _empty_like_dtype(keys, (B, H, C, D))
    out_values = _empty_like_dtype(keys, (B, H, C, vs[3]))
    out_counts = _empty(keys, (B, H, C), "float32")
    assign = _empty(keys, (B, H, T), "int64") if return_assign else None
    _C.gauss_merge(_prepare(keys), _prepare(values), _prepare(scores), _prepare(centers), _prepare(runs),
                   None if counts is None else _prepare(counts), _real(sigma, "sigma"),
                   _as_int64(kv_start, "kv_start", keys), out_keys, out_values, out_counts, assign)
    return GaussMerge(out_keys, out_values, out_counts, assign)


def _attention_out(queries, rows, row, ragged, scaling, out):
    """Argument handling shared by attention and packed_attention.

    Checks the ranks of `queries` ``[B, Hq, q, D]`` and of the layer tensors
    `rows` (name -> tensor: ``[N, row]`` in the ragged layout, else
    ``[B, Hkv, n, row]``); fills in the default scaling and allocates `out`
    ``[B, q, Hq, D]`` when None.

    Returns
    -------
    (scaling, out)
    """
    qs = _shape(queries, "queries", 4, "[B, Hq, q, D]")
    for name, x in rows.items():
        if ragged:
            _shape(x, name, 2, f"[N, {row}]")
        else:
            _shape(x, name, 4, f"[B, Hkv, n, {row}]")
    scaling = _scaling(scaling, qs[3])
    if out is None:
        shape = (qs[0], qs[2], qs[1], qs[3])
        if _is_torch(queries):
            import torch

            out = torch.empty(shape, dtype=queries.dtype, device=queries.device)
        elif isinstance(queries, np.ndarray):
            out = np.empty(shape, dtype=queries.dtype)
        else:
            dtype = _C._describe(queries, "queries")[1]
            if dtype not in ("float32", "float16"):
                raise KVCompressTypeError(f"queries: cannot allocate a NumPy output of dtype {dtype}; pass torch tensors")
            out = np.empty(shape, dtype=_NP_DTYPES[dtype])
    return scaling, out


def _layout_args(queries, kv_start, offsets, lengths, counts) -> tuple:
    """The layout arguments closing both attention ``_C`` calls: kv_start,
    offsets, lengths as int64 in `queries`' framework, counts."""
    return (
        _as_int64(kv_start, "kv_start", queries), _as_int64(offsets, "offsets", queries),
        _as_int64(lengths, "lengths", queries), _prepare(counts) if counts is not None else None,
    )


def attention(queries, keys, values, *, scaling=None, kv_start=None, offsets=None, lengths=None, counts=None):
    """Attention of the newest ``q`` tokens over one (compressed) layer.

    The queries are the last ``q`` slots of every head (a decode step, or a
    chunk just appended): query ``i`` sees the head's slots ``s0 .. n_h - q + i``
    (everything before the chunk, causal inside it). Online softmax in
    float32; long heads are split into fixed blocks combined by log-sum-exp,
    so results are bit-identical for any thread count.

    Parameters
    ----------
    queries : tensor ``[B, Hq, q, D]`` (float32, float16 or bfloat16)
        Query head ``h`` reads kv head ``h // (Hq // Hkv)`` (GQA).
    keys, values : tensors, same dtype as `queries`, any strides
        Uniform layout: ``[B, Hkv, n, D]`` (``n >= q``).
        Ragged layout (with `offsets` and `lengths`): ``[N, D]``; the slots of
        head ``(b, h)`` are rows ``offsets[b*Hkv + h] .. + lengths[b*Hkv + h] - 1``.
    scaling : float, optional
        Logit scale; default ``1 / sqrt(D)``.
    kv_start : int64 tensor ``[B]``, optional (uniform only)
        Leading padded slots of each batch row; masked (``s0 = kv_start[b]``).
    offsets, lengths : int64 tensors ``[B * Hkv]``, optional (ragged only)
        Segments inside ``[0, N)``, pairwise disjoint, in any order, with any
        unused rows between them. A length is 0 (empty head: its queries
        get zeros) or at least ``q``.
    counts : float32 or int32 tensor ``[B, Hkv, n]`` / ``[N]``, optional
        Merge counts (finite, > 0; merged slots have >= 1) of the slots;
        ``log(count)`` is added to the slot's logit (a slot standing for c
        merged tokens weighs c).

    Returns
    -------
    tensor ``[B, q, Hq, D]``, dtype of `queries`
        The layout the Hugging Face attention functions return; a query that
        sees no slot gets zeros.
    """
    ragged = offsets is not None or lengths is not None
    scaling, out = _attention_out(queries, {"keys": keys, "values": values}, "D", ragged, scaling, None)
    _C.attention(
        _prepare(queries), _prepare(keys), _prepare(values), out, scaling,
        *_layout_args(queries, kv_start, offsets, lengths, counts),
    )
    return out


def packed_attention(queries, key_codes, key_mins, key_scales, value_codes, value_mins, value_scales,
                     residual_keys, residual_values, *, bits, group, scaling=None, kv_start=None,
                     offsets=None, lengths=None, counts=None, out=None, return_lse=False, value_bits=None,
                     residual_query=None, residual_counts=None, residual_hidden=None):
    """Attention of the newest ``q`` tokens over a KIVI-packed layer plus its residual window.

    The layout is the contract of ``docs/packed.md``: ``bits``-wide codes
    (``per = 8 // bits`` per byte, element ``c`` in byte ``c // per`` at bit
    ``(c % per) * bits``), keys quantized per channel in groups of ``group``
    tokens, values per token in groups of ``group`` channels, each group with
    a float32 ``min`` and ``scale`` (``x ~ min + scale * code``). The logical
    sequence of a head is its ``n_h`` packed slots, then the ``r`` residual
    slots; the queries are the last ``q`` residual slots (``r >= q``), so
    query ``i`` sees every packed slot and residual slots ``0 .. r - q + i``.
    With ``r = 0`` the queries come after the layer and every query sees every
    packed slot: a packed part read on its own, to be joined with other parts
    through ``return_lse`` (two precisions in one head, see ``MiKV``).
    No dequantized copy is made: key logits use the query scaled per (token
    group, channel) against the codes, values the softmax weights scaled per
    (token, channel group). Online softmax in float32, long heads split into
    fixed blocks combined by log-sum-exp: bit-identical for any thread count.

    Parameters
    ----------
    queries : tensor ``[B, Hq, q, D]`` (float32, float16 or bfloat16)
        Query head ``h`` reads kv head ``h // (Hq // Hkv)`` (GQA).
    key_codes, value_codes : uint8 tensors, any strides
        Uniform layout: ``[B, Hkv, n, Db]`` with ``Db = ceil(D * bits / 8)``
        (``value_bits`` for the values). Ragged layout (with `offsets` and
        `lengths`): ``[N, Db]``.
    key_mins, key_scales : float32 tensors
        Uniform: ``[B, Hkv, ceil(n / group), D]``; ragged: ``[ceil(N / group), D]``
        (head ``i`` uses rows ``offsets[i] // group ...``).
    value_mins, value_scales : float32 tensors
        Uniform: ``[B, Hkv, n, ceil(D / group)]``; ragged: ``[N, ceil(D / group)]``.
    residual_keys, residual_values : tensors ``[B, Hkv, r, D]``, dtype of `queries`
        The full-precision window after the packed slots (``r >= q``, or
        ``r = 0``: none, see above).
    bits : {2, 4, 8}
        Width of the key codes, and of the value codes unless `value_bits`.
    group : int >= 1
        ``G``: tokens per key group, channels per value group.
    scaling : float, optional
        Logit scale; default ``1 / sqrt(D)``.
    kv_start : int64 tensor ``[B]``, optional
        Leading masked slots of each batch row, counted over the logical
        sequence (packed, then residual), in ``[0, n + r]`` (ragged: in
        ``[0, n_h + r]`` for every head of the row: a row-mode store
        masks a sliding window's oldest group so).
    offsets, lengths : int64 tensors ``[B * Hkv]``, optional (ragged only)
        The packed slots of head ``(b, h)`` are rows ``offsets[b*Hkv + h] ..
        + lengths[b*Hkv + h] - 1``; every offset a multiple of `group`,
        segments inside ``[0, N)`` and pairwise disjoint; a length may be 0.
    counts : float32 tensor ``[B, Hkv, n]`` / ``[N]``, optional
        Counts (finite, > 0) of the packed slots; ``log(count)`` is added to
        the slot's logit. Merged slots have counts >= 1; a per-head packed
        layer splits one slot's count over the copies that fill its last
        key group. Residual slots count 1 unless `residual_counts`.
    out : tensor ``[B, q, Hq, D]``, dtype of `queries`, optional
        Written in place and returned; allocated when omitted.
    return_lse : bool
        Also return each row's log-sum-exp ``log sum_j w_j`` (natural log,
        scaled logits plus log counts) as float32 ``[B, Hq, q]``; ``-inf`` for a
        query that sees no slot. Two parts' outputs ``o1, o2`` join exactly as
        ``(e1 o1 + e2 o2) / (e1 + e2)`` with ``e = exp(lse - max(lse1, lse2))``.
    value_bits : {2, 4, 8}, optional
        Width of the value codes (rows of ``ceil(D * value_bits / 8)`` bytes)
        when it differs from the keys' (``KIVI(bits=4, value_bits=2)``);
        default `bits`.
    residual_query : tensor ``[B, Hq, q, D]``, dtype of `queries`, optional (CPU only)
        The queries the residual slots are read with (default `queries`):
        rotated keys (``KIVI(rotate=True)``) read the packed part with
        ``q @ R`` and the residual, kept as it came, with ``q``, in one call.
    residual_counts : float32 tensor ``[B, Hkv, r]``, optional
        Counts (finite, > 0) of the residual slots, as `counts` are of the
        packed ones: a per-head packed layer's sink block (the residual's
        front) keeps the merge counts of its slots (``KIVI(sinks=...)``
        behind EMS).
    residual_hidden : int64 tensor ``[B * Hkv, 2]``, optional (CPU only)
        Head ``(b, h)`` sees none of its residual rows ``lo <= j < hi``,
        ``(lo, hi) = residual_hidden[b*Hkv + h]``, ``0 <= lo <= hi <= r``;
        its packed slots and other residual rows stay seen. Either layout.
        ``PackedStore``'s row mode: the residual buffers a left-padded batch
        shares hold, between a row's sink block and its own residual, rows
        that other rows still need.

    Returns
    -------
    tensor ``[B, q, Hq, D]``, dtype of `queries`
        A query that sees no slot gets zeros. With `return_lse`, the tuple
        ``(out, lse)``.
    """
    ragged = offsets is not None or lengths is not None
    scaling, out = _attention_out(queries, {"key_codes": key_codes, "value_codes": value_codes}, "Db", ragged,
                                  scaling, out)
    qs = _shape(queries, "queries", 4, "[B, Hq, q, D]")
    lse = _empty(queries, (qs[0], qs[1], qs[2]), "float32") if _flag(return_lse, "return_lse") else None
    for name, arg in (("residual_query", residual_query), ("residual_hidden", residual_hidden)):
        if arg is not None and _is_torch(queries) and queries.device.type != "cpu":
            raise NotImplementedError(f"{name}: the CPU kernel's; on other devices read the parts in separate "
                                      "calls (return_lse) and join them, or read a dequantized copy")
    _C.packed_attention(
        *(_prepare(x) for x in (queries, key_codes, key_mins, key_scales, value_codes, value_mins, value_scales,
                                residual_keys, residual_values)),
        _out(out, "out"), lse, _py_int(bits), None if value_bits is None else _py_int(value_bits), _py_int(group),
        scaling,
        *_layout_args(queries, kv_start, offsets, lengths, counts),
        None if residual_query is None else _prepare(residual_query),
        None if residual_counts is None else _prepare(residual_counts),
        None if residual_hidden is None else _prepare(residual_hidden),
    )
    return (out, lse) if lse is not None else out


def probe_positions(T: int, probe: float) -> np.ndarray:
    """Query positions used by ``global_scores(..., probe=probe)``.

    With ``h = ceil(probe * T / 2)``: the last ``min(h, T)`` positions, plus
    a strided sample of the ``m`` positions before them with stride
    ``ceil(m / min(h, m))``, anchored at ``m - 1`` (so ``m - 1``,
    ``m - 1 - stride``, ... down to 0). About ``probe * T`` positions in all;
    ``probe = 1`` gives every position.

    Returns
    -------
    int64 ndarray ``[n]``, strictly increasing, in ``[0, T)``
    """
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)):
        raise KVCompressTypeError(f"T: expected an int, got {type(T).__name__}")
    if not 0 <= T < 2**63:
        raise KVCompressValueError(f"T: expected a position count in [0, 2**63), got {T}")
    T = int(T)
    fraction = _real(probe, "probe", "a float in (0, 1]")
    if not 0.0 < fraction <= 1.0:
        raise KVCompressValueError(f"probe: expected a fraction in (0, 1], got {probe!r}")
    half = math.ceil(fraction * T / 2)
    n_last = min(half, T)
    m = T - n_last
    n_strided = min(half, m)
    strided = np.arange(m - 1, -1, -math.ceil(m / n_strided), dtype=np.int64)[::-1] if n_strided else np.zeros(0, np.int64)
    return np.concatenate([strided, np.arange(m, T, dtype=np.int64)])


def global_scores(queries, keys, *, scaling=None, gqa="mean", kv_start=None, q_pos=None, probe=None):
    """EMS global score: mean attention each key receives from the queries that see it.

    Parameters
    ----------
    queries : tensor ``[B, Hq, Tq, D]`` (float32, float16 or bfloat16)
        Post-RoPE queries; query ``i`` sits at key position ``q_pos[i]`` and
        attends causally to keys ``kv_start[b] <= j <= q_pos[i]``.
    keys : tensor ``[B, Hkv, T, D]``, same dtype as `queries`
        ``Hq`` must be a positive multiple of ``Hkv``; query head ``h`` uses kv
        head ``h // (Hq // Hkv)``.
    scaling : float, optional
        Logit scale; default ``1 / sqrt(D)``.
    gqa : {"mean", "max"}
        How the ``Hq // Hkv`` query heads of a kv head are combined.
    kv_start : int64 tensor ``[B]``, optional
        Leading padded key positions per batch row (left padding). Those keys
        score 0 and are excluded from every softmax; a query at a padded
        position is ignored (it is not counted either).
    q_pos : integer tensor or sequence ``[Tq]``, optional
        Strictly increasing key positions of the queries, each in ``[0, T)``.
        Default: the last ``Tq`` positions, so ``Tq == T`` is the exact score
        over every query.
    probe : float in (0, 1], optional
        Needs ``Tq == T`` and no `q_pos`: only the queries at
        :func:`probe_positions` ``(T, probe)`` are used (about ``probe * T`` of
        them: the latest half dense, the rest strided). Cost scales with it.
        With `kv_start`, row ``b`` uses its own real positions' sample
        (``kv_start[b] + probe_positions(T - kv_start[b], probe)``), so that a
        left-padded row scores as it does alone.

    Returns
    -------
    float32 tensor ``[B, Hkv, T]``
        ``G[j] = sum_{i: q_pos[i] >= j} A[i, j] / #{i: q_pos[i] >= j}`` with
        ``A`` the causal softmax of ``scaling * q . k``, reduced over the query
        heads of each kv head; 0 for padded keys and keys no query sees.
        Computed exactly in float32 without the ``Tq x T`` matrix; NaN in an
        input propagates to the scores it touches.
    """
    _choice(gqa, "gqa", ("mean", "max"))
    qs = _shape(queries, "queries", 4, "[B, Hq, Tq, D]")
    ks = _shape(keys, "keys", 4, "[B, Hkv, T, D]")
    scaling = _scaling(scaling, qs[3])
    if probe is not None:
        if q_pos is not None:
            raise KVCompressValueError("probe: cannot be combined with q_pos (probe picks the positions)")
        if qs[2] != ks[2]:
            raise KVCompressValueError(f"probe: needs a query at every position (Tq == T), got Tq={qs[2]}, T={ks[2]}")
        split = _probe_rows(queries, keys, scaling, gqa, kv_start, probe, ks)
        if split is not None:
            return split
        pos = probe_positions(ks[2], probe)
        if len(pos) < qs[2]:
            if _is_torch(queries):
                import torch

                queries = queries.index_select(2, torch.from_numpy(pos).to(queries.device))
                q_pos = torch.from_numpy(pos).to(keys.device) if _is_torch(keys) else pos
            else:
                queries = np.take(queries if isinstance(queries, np.ndarray) else np.from_dlpack(queries), pos, axis=2)
                q_pos = pos
    out = _empty(keys, (ks[0], ks[1], ks[2]), "float32")
    _C.global_scores(
        _prepare(queries), _prepare(keys), out, scaling, gqa == "max",
        _as_int64(kv_start, "kv_start", keys), _as_int64(q_pos, "q_pos", keys),
    )
    return out


def _probe_rows(queries, keys, scaling, gqa, kv_start, probe, ks):
    """:func:`global_scores` with ``probe`` over a left-padded batch: the
    rows of each padding length scored apart over their own real positions
    (the probe sample of ``T - kv_start[b]`` positions, as the row scores
    alone, not of the padded ``T``), padded keys 0. None where no row is
    padded, or ``kv_start`` is not host-readable ints within ``[0, T]`` (the
    one call below then takes it, and reports what is wrong)."""
    if kv_start is None:
        return None
    try:
        starts = np.asarray(kv_start.cpu() if _is_torch(kv_start) else kv_start)
    except (TypeError, ValueError, RuntimeError):
        return None
    T = ks[2]
    if (starts.ndim != 1 or starts.shape[0] != ks[0] or starts.dtype.kind not in "iu" or not starts.any()
            or (starts < 0).any() or (starts > T).any()):
        return None
    torch_in = _is_torch(queries) and _is_torch(keys)
    if not torch_in and not (isinstance(queries, np.ndarray) and isinstance(keys, np.ndarray)):
        return None
    if torch_in:
        import torch

        out = torch.zeros((ks[0], ks[1], T), dtype=torch.float32, device=keys.device)
    else:
        out = np.zeros((ks[0], ks[1], T), dtype=np.float32)
    for s in np.unique(starts).tolist():
        if s >= T:
            continue  # an all-padding row: every key scores 0
        rows = np.flatnonzero(starts == s)
        idx = torch.from_numpy(rows).to(keys.device) if torch_in else rows
        q = queries.index_select(0, idx.to(queries.device)) if torch_in else queries[rows]
        k = keys.index_select(0, idx) if torch_in else keys[rows]
        sub = global_scores(q[:, :, s:], k[:, :, s:], scaling=scaling, gqa=gqa, probe=probe)
        if torch_in:
            out[idx, :, s:] = sub
        else:
            out[rows, :, s:] = sub
    return out


def head_budgets(scores, budget, *, alpha=0.2, floor=0, kv_start=None, mode="adaptive"):
    """Per-head kept-slot counts for a layer (AdaKV allocation).

    Parameters
    ----------
    scores : float32 tensor ``[B, H, T]``
        Higher is better; ``-inf`` marks slots that may not be kept. NaN is an
        error. Slots the caller force-keeps (sinks, window) should score
        ``+inf`` so that they are counted first.
    budget : int >= 0
        Mean slots per head: a row's budgets sum to ``H * budget`` whenever the
        bounds below allow it.
    alpha : float in [0, 1]
        Weight of the uniform share: head ``h`` targets
        ``(1 - alpha) * n_h + alpha * budget``, where ``n_h`` is how many of
        the layer's top ``H * budget`` scores (over all heads; ties go to the
        lower head, then the lower position) fall in head ``h``.
    floor : int >= 0
        Minimum per head (clipped to ``T``), e.g. the forced sinks + window.
    kv_start : int64 tensor ``[B]``, optional
        Leading padded positions per batch row: never selectable.
    mode : {"adaptive", "uniform"}
        "uniform" ignores the scores: every head gets
        ``min(max(budget, floor), T)``.

    Returns
    -------
    int64 tensor ``[B, H]``
        Each head gets between ``min(floor, T)`` and its count of selectable
        slots (or the floor, if larger). Targets are rounded by largest
        remainder (ties to the lower head) so that they sum to
        ``H * min(budget, T)`` clipped to what the bounds allow; a head
        clipped by a bound passes the difference on to the heads furthest
        from their targets, again ties to the lower head. Passes straight to
        :func:`select_topk` as its ``k`` (with ``floor`` >= its forced keeps).
    """
    _choice(mode, "mode", ("adaptive", "uniform"))
    for name, v in (("budget", budget), ("floor", floor)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise KVCompressTypeError(f"{name}: expected an int, got {type(v).__name__}")
        if v < 0:
            raise KVCompressValueError(f"{name}: must be >= 0, got {v}")
    if not 0.0 <= _real(alpha, "alpha") <= 1.0:
        raise KVCompressValueError(f"alpha: expected a value in [0, 1], got {alpha!r}")
    s = _shape(scores, "scores", 3, "[B, H, T]")
    out = _empty(scores, (s[0], s[1]), "int64")
    if mode == "uniform":
        out[...] = min(max(int(budget), int(floor)), s[2])
        return out
    _C.head_budgets(_prepare(scores), out, int(budget), float(alpha), int(floor), _as_int64(kv_start, "kv_start", scores))
    return out


# ---------------------------------------------------------------- packed KV (docs/packed.md)


class Packed(NamedTuple):
    """Outputs of :func:`pack_keys` / :func:`pack_values` (``Db`` =
    :func:`packed_row_bytes` ``(D, bits)``)."""

    codes: object  #: uint8 ``[B, H, n, Db]``: the codes of token ``j`` in row ``j``
    mins: object  #: float32: keys ``[B, H, ceil(n/G), D]``, values ``[B, H, n, ceil(D/G)]``
    scales: object  #: float32, shape of `mins`: ``(max - min) / (2**bits - 1)``, 0 for a constant group


def _flag(x, name: str) -> bool:
    """A bool option, refused by name otherwise (a tensor's truth value may raise)."""
    if not isinstance(x, bool):
        raise KVCompressTypeError(f"{name}: expected a bool, got {type(x).__name__}")
    return x


def _int_arg(x, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise KVCompressTypeError(f"{name}: expected an int, got {type(x).__name__}")
    return int(x)


def _bits(bits) -> int:
    bits = _int_arg(bits, "bits")
    if bits not in (2, 4, 8):
        raise KVCompressValueError(f"bits: expected 2, 4 or 8, got {bits}")
    return bits


def _group(group) -> int:
    group = _int_arg(group, "group")
    if group < 1:
        raise KVCompressValueError(f"group: must be >= 1, got {group}")
    return group


def packed_row_bytes(D: int, bits: int) -> int:
    """Bytes of one packed row of ``D`` codes: ``ceil(D * bits / 8)``.

    Code ``c`` of a row sits in byte ``c // (8 // bits)``, bits
    ``(c % (8 // bits)) * bits`` upwards (the first code in the low bits);
    the unused high bits of the last byte are 0.
    """
    D = _int_arg(D, "D")
    if D < 0:
        raise KVCompressValueError(f"D: must be >= 0, got {D}")
    return (D * _bits(bits) + 7) // 8


def _float_dtype(dtype) -> str:
    """A float dtype given as a string, torch dtype or NumPy dtype -> its name."""
    if isinstance(dtype, str):
        name = dtype
    elif type(dtype).__module__ == "torch":
        name = str(dtype).removeprefix("torch.")
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = repr(dtype)
    if name not in ("float32", "float16", "bfloat16"):
        raise KVCompressValueError(f"dtype: expected float32, float16 or bfloat16, got {dtype!r}")
    return name


def _pack(x, name: str, values: bool, bits, group, codes, mins, scales, feedback=None, feedback_index=None,
          clip=False) -> Packed:
    B, H, n, D = _shape(x, name, 4, "[B, H, n, D]")
    bits, group = _bits(bits), _group(group)
    groups = (B, H, n, -(-D // group)) if values else (B, H, -(-n // group), D)
    if codes is None:
        codes = _empty(x, (B, H, n, packed_row_bytes(D, bits)), "uint8")
    if mins is None:
        mins = _empty(x, groups, "float32")
    if scales is None:
        scales = _empty(x, groups, "float32")
    _C.pack(_prepare(x), _out(codes, "codes"), _out(mins, "mins"), _out(scales, "scales"), values, bits, group,
            None if feedback is None else _prepare(feedback),
            None if feedback_index is None else _prepare(feedback_index), clip)
    return Packed(codes, mins, scales)


def pack_keys(keys, bits, group, *, codes=None, mins=None, scales=None, feedback=None,
              feedback_index=None) -> Packed:
    """Quantize keys per channel over groups of ``G`` tokens (KIVI).

    For each head, token group ``t`` (tokens ``t*G .. min(n, (t+1)*G) - 1``;
    the last one may be short) and channel ``c``: ``min`` and ``max`` of the
    group, ``scale = (max - min) / (2**bits - 1)`` and, per token ``j``,
    ``code = rint((x - min) / scale)`` clamped to ``[0, 2**bits - 1]``, all
    in float32 with ties to even (the same bits on the CPU and on CUDA). A
    group whose max equals its min gets ``scale = 0`` and codes 0, and so
    round-trips exactly; otherwise :func:`unpack_keys` is within
    ``scale / 2`` (plus float32 rounding) of every input element.

    Parameters
    ----------
    keys : tensor ``[B, H, n, D]`` (float32, float16 or bfloat16), any strides
        Every element must be finite, of magnitude at most ``FLT_MAX / 2``
        (about 1.7e38, so that a group's ``max - min`` stays finite): NaN,
        +-Inf or a larger value raises :class:`KVCompressValueError` naming
        the first such element (row-major), and nothing is written.
    bits : {2, 4, 8}
    group : int >= 1
        ``G``, tokens per group (``G > n`` makes one short group).
    codes : uint8 tensor ``[B, H, n, Db]``, optional
        ``Db =`` :func:`packed_row_bytes` ``(D, bits)``.
    mins, scales : float32 tensors ``[B, H, ceil(n/G), D]``, optional
        Outputs may be strided views (slices of a larger store): only their
        elements are written. They must be writable and overlap nothing.
        Each one omitted is allocated with the framework and device of `keys`.
    feedback : float32 tensor ``[F, D, D]``, optional
        Key feedback (GPTQ's update, with queries as its inputs): each group
        is quantized channel after channel, and channel ``c``'s rounding
        error ``e_j = x[j, c] - dequant(code)`` is carried into the channels
        not yet quantized, ``x[j, c'] -= e_j * w[c, c']`` for ``c' > c``
        (one fused multiply-add, rounded once; clamped to ``+-FLT_MAX / 2``); each
        channel's min, scale and codes come from its values after those
        updates. With ``w[c, c'] = U[c, c'] / U[c, c]``, ``U`` the upper
        Cholesky factor of ``(Q^T Q + damping)^-1`` for queries ``Q``
        (:func:`kvcompress.stores.feedback.feedback_weights`), the error of
        the logits ``q . k`` falls instead of each key's own. Only the strict
        upper triangle is read; every element must be finite. Group
        ``(b, h, t)`` uses ``feedback[feedback_index[b, h, t]]``, or
        ``feedback[h]`` without an index (then ``F == H``). The bound on the
        round-trip error above then holds for the updated values, not the
        inputs. On CUDA ``min(G, n) * D * 5 + 4 * min(G, n) + 8`` bytes must
        fit 48 KiB.
    feedback_index : int64 tensor ``[B, H, ceil(n/G)]``, optional
        Each in ``[0, F)``; only with `feedback`.

    Returns
    -------
    Packed
        ``(codes, mins, scales)``.
    """
    return _pack(keys, "keys", False, bits, group, codes, mins, scales, feedback, feedback_index)


def pack_values(values, bits, group, *, codes=None, mins=None, scales=None, clip=False) -> Packed:
    """Quantize values per token over groups of ``G`` channels (KIVI).

    As :func:`pack_keys`, but a group is channels ``u*G .. min(D, (u+1)*G) - 1``
    of one token (the last one may be short).

    With ``clip=True`` each group's range is clipped for the least squared
    error instead of spanning min..max: among the 45 ranges ``[min + a*f*r,
    max - b*f*r]`` (``r = max - min``, ``f = 0.05``, ``a, b >= 0``, ``a + b
    <= 8``, so at most 40% of the range is cut), the first of least squared
    error (``a`` outer, ``b`` inner; ``a = b = 0`` is min..max, kept on a
    tie; the error is measured in steps of the range, the same on every CPU
    and GPU build: docs/packed.md); elements outside it take the end codes.
    Same layout, codes and :func:`unpack_values`. The round trip is then no
    longer within ``scale / 2`` of every element, but each group's squared
    error is at most min/max's (but for float rounding next to a rounding
    tie).

    Parameters
    ----------
    values : tensor ``[B, H, n, D]`` (float32, float16 or bfloat16), any strides
        Every element must be finite, of magnitude at most ``FLT_MAX / 2``
        (else it raises, naming the element, and nothing is written).
    bits : {2, 4, 8}
    group : int >= 1
        ``G``, channels per group.
    codes : uint8 tensor ``[B, H, n, Db]``, optional
        ``Db =`` :func:`packed_row_bytes` ``(D, bits)``.
    mins, scales : float32 tensors ``[B, H, n, ceil(D/G)]``, optional
        Writable, possibly strided outputs; allocated when omitted.
    clip : bool
        Clipped ranges (above). On CUDA a row of ``D`` float32 values must
        fit 48 KiB of shared memory (``D <= 12288``).

    Returns
    -------
    Packed
        ``(codes, mins, scales)``.
    """
    if not isinstance(clip, bool):
        raise KVCompressTypeError(f"clip: expected True or False, got {clip!r}")
    return _pack(values, "values", True, bits, group, codes, mins, scales, clip=clip)


def _unpack(codes, mins, scales, values: bool, bits, group, D, out, dtype):
    B, H, n, Db = _shape(codes, "codes", 4, "[B, H, n, Db]")
    bits, group = _bits(bits), _group(group)
    if out is None:
        name = _float_dtype(dtype)
        if name == "bfloat16" and not _is_torch(codes):
            raise KVCompressTypeError("dtype: bfloat16 outputs need torch tensors (NumPy has no bfloat16); pass out")
        if D is None:
            D = Db * 8 // bits if values else _shape(mins, "mins", 4, "[B, H, ceil(n/G), D]")[3]
        else:
            D = _int_arg(D, "head_dim")
            if D < 0 or (D * bits + 7) // 8 != Db:
                raise KVCompressValueError(
                    f"head_dim: {D} does not match codes: a row of D codes takes ceil(D * {bits} / 8) bytes, "
                    f"codes have {Db}"
                )
        out = _empty(codes, (B, H, n, D), name)
    _C.unpack(_prepare(codes), _prepare(mins), _prepare(scales), _out(out, "out"), values, bits, group)
    return out


def unpack_keys(codes, mins, scales, bits, group, *, out=None, dtype="float32"):
    """Dequantize packed keys: ``x = min + scale * code`` (see :func:`pack_keys`).

    The product and sum are computed exactly enough (double, one rounding to
    float32, then to the output dtype) that the result has the same bits on
    every CPU and on CUDA.

    Parameters
    ----------
    codes : uint8 tensor ``[B, H, n, Db]``
    mins, scales : float32 tensors ``[B, H, ceil(n/G), D]``
    bits : {2, 4, 8}
    group : int >= 1
        ``G``, tokens per group, as packed.
    out : tensor ``[B, H, n, D]`` (float32, float16 or bfloat16), optional
        Writable, possibly strided; allocated when omitted.
    dtype : {"float32", "float16", "bfloat16"} or a torch/NumPy dtype
        Dtype of an allocated `out` (bfloat16 needs torch tensors).

    Returns
    -------
    tensor ``[B, H, n, D]``
        `out`, in the framework and device of `codes` when allocated.
    """
    return _unpack(codes, mins, scales, False, bits, group, None, out, dtype)


def unpack_values(codes, mins, scales, bits, group, *, head_dim=None, out=None, dtype="float32"):
    """Dequantize packed values: ``x = min + scale * code`` (see :func:`pack_values`).

    Parameters
    ----------
    codes : uint8 tensor ``[B, H, n, Db]``
    mins, scales : float32 tensors ``[B, H, n, ceil(D/G)]``
    bits : {2, 4, 8}
    group : int >= 1
        ``G``, channels per group, as packed.
    head_dim : int, optional
        ``D``, when `out` is omitted: ``Db`` bytes hold any ``D`` with
        ``ceil(D * bits / 8) = Db``; default ``Db * 8 // bits`` (give it when
        ``D`` is not a multiple of ``8 // bits``).
    out : tensor ``[B, H, n, D]`` (float32, float16 or bfloat16), optional
        Writable, possibly strided; allocated when omitted.
    dtype : {"float32", "float16", "bfloat16"} or a torch/NumPy dtype
        Dtype of an allocated `out` (bfloat16 needs torch tensors).

    Returns
    -------
    tensor ``[B, H, n, D]``
        `out`, in the framework and device of `codes` when allocated.
    """
    if out is not None and head_dim is not None:
        raise KVCompressValueError("head_dim: give head_dim or out, not both (out's last dim is D)")
    return _unpack(codes, mins, scales, True, bits, group, head_dim, out, dtype)


# --------------------------------------------------------------------- pages
def _heads_first(first, n_heads: int, like):
    """`first` of the ragged :func:`page_bounds`: a Python int for every head
    becomes an int64 ``[N]`` in `like`'s framework and device; tensors go
    down as they are, for the C op to check."""
    if isinstance(first, (int, np.integer)) and not isinstance(first, bool):
        if _is_torch(like):
            import torch

            return torch.full((n_heads,), int(first), dtype=torch.int64, device=like.device)
        return np.full((n_heads,), int(first), dtype=np.int64)
    return _as_int64(first, "first", like)


def page_bounds(keys, kmin, kmax, page_size, first, last=None, *, offsets=None, lengths=None,
                page_offsets=None):
    """Per-page, per-channel key bounds of some pages of a layer (in place).

    Page ``p`` of a head is its slots ``p * P .. min((p + 1) * P, n) - 1``.
    For the pages written ``kmin[.., p] = min_j keys[.., j]`` and ``kmax[..,
    p] = max_j keys[.., j]`` channel by channel, in float32; other pages are
    not touched, so an append recomputes only the pages it changed. A NaN
    key makes both bounds of its channel NaN.

    Uniform layout: pages ``first .. last - 1`` of every head.
    Ragged layout (with `offsets`, `lengths` and `page_offsets`; `last` is
    None): head ``i`` (``= b * H + h``) owns key rows ``offsets[i] ..
    offsets[i] + lengths[i] - 1`` and has ``ceil(lengths[i] / P)`` pages;
    its pages ``first[i] ..`` (to its newest) are written, page ``p``'s bounds
    to row ``page_offsets[i] + p`` of `kmin` and `kmax`.

    Parameters
    ----------
    keys : tensor (float32, float16 or bfloat16), any strides
        Uniform ``[B, H, n, D]``; ragged ``[R, D]``.
    kmin, kmax : float32 tensors, written
        Uniform ``[B, H, Np, D]``, ``Np >= last``; ragged ``[Rp, D]``, the
        written rows inside ``Rp`` and no row written by two heads.
    page_size : int >= 1
    first : int, or (ragged) int64 tensor ``[N]``
        Uniform: ``0 <= first <= last``. Ragged: per head, in ``[0,
        ceil(lengths[i] / P)]`` (a Python int is every head's).
    last : int, uniform only
        ``(last - 1) * P < n``.
    offsets, lengths, page_offsets : int64 tensors ``[N]``, ragged only
        ``lengths >= 0``; key rows inside ``R``.
    """
    P = _int_arg(page_size, "page_size")
    if offsets is None:
        if lengths is not None or page_offsets is not None:
            raise KVCompressValueError("offsets: the ragged layout needs offsets, lengths and page_offsets")
        if last is None:
            raise KVCompressValueError("last: required for the uniform layout")
        _shape(keys, "keys", 4, "[B, H, n, D]")
        _C.page_bounds(_prepare(keys), kmin, kmax, P, _int_arg(first, "first"), _int_arg(last, "last"),
                       None, None, None)
        return
    if last is not None:
        raise KVCompressValueError("last: must be None with the ragged layout (each head's pages run from "
                                   "first to its newest)")
    for name, x in (("lengths", lengths), ("page_offsets", page_offsets)):
        if x is None:
            raise KVCompressValueError(f"{name}: the ragged layout needs offsets, lengths and page_offsets")
    _shape(keys, "keys", 2, "[R, D]")
    offsets = _as_int64(offsets, "offsets", keys)
    n_heads = _shape(offsets, "offsets", 1, "[N]")[0]
    _C.page_bounds(_prepare(keys), kmin, kmax, P, _heads_first(first, n_heads, keys), None, offsets,
                   _as_int64(lengths, "lengths", keys), _as_int64(page_offsets, "page_offsets", keys))


def page_scores(query, kmin, kmax, num_pages, page_size, *, gqa="max", kv_start=None, out=None, lengths=None,
                page_offsets=None):
    """Quest's page scores: the largest logit a query could reach on each page.

    For query head ``hq`` of kv head ``h`` and page ``p``:
    ``u = sum_c max(q_c * kmax[.., p, c], q_c * kmin[.., p, c])`` (an upper
    bound of ``q . k`` for every key of the page), summed over channels in
    order in float32; a kv head's score is the max (``gqa="max"``) or mean
    (``"mean"``) of ``u`` over its query heads.

    Uniform layout: column ``p`` is page ``p``; pages holding only padding
    (``(p + 1) * P <= kv_start[b]``) score ``-inf``.
    Ragged layout (with `lengths` and `page_offsets`): head ``i = b * H + h``
    has ``np_i = ceil(lengths[i] / P) <= num_pages`` pages, page ``p``'s bounds
    in row ``page_offsets[i] + p``; its scores are right-aligned, column
    ``num_pages - np_i + p`` holding page ``p``'s and the columns before
    ``num_pages - np_i`` ``-inf``: every head's newest page is the last column
    (``select_topk(.., window=1)`` forces it), its first page column
    ``num_pages - np_i`` (a per-row start forces it).

    Parameters
    ----------
    query : tensor ``[B, Hq, D]`` (float32, float16 or bfloat16)
        The decode step's queries (post-RoPE).
    kmin, kmax : float32 tensors (:func:`page_bounds`)
        Uniform ``[B, H, Np, D]``; ragged ``[Rp, D]``.
    num_pages : int
        Columns of the result: uniform, the pages scored (``<= Np``);
        ragged, at least every head's page count.
    page_size : int >= 1
    gqa : {"max", "mean"}
    kv_start : int64 ``[B]``, optional, uniform only
        Leading padded slots of each row.
    out : float32 tensor ``[B, H, num_pages]``, optional
    lengths, page_offsets : int64 tensors ``[B * H]``, ragged only
        Slots of each head (``H = lengths.numel() // B``), and the bound row
        of its page 0.

    Returns
    -------
    float32 tensor ``[B, H, num_pages]``
    """
    _choice(gqa, "gqa", ("max", "mean"))
    qs = _shape(query, "query", 3, "[B, Hq, D]")
    num_pages = _int_arg(num_pages, "num_pages")
    P = _int_arg(page_size, "page_size")
    if not 1 <= P < 2**31:
        raise KVCompressValueError(f"page_size: must be in [1, 2**31), got {P}")
    ragged = page_offsets is not None or lengths is not None
    if ragged:
        if page_offsets is None or lengths is None:
            raise KVCompressValueError(f"{'lengths' if lengths is None else 'page_offsets'}: the ragged "
                                       "layout needs both lengths and page_offsets")
        if kv_start is not None:
            raise KVCompressValueError("kv_start: only for the uniform layout (a ragged head holds no padding)")
        _shape(kmin, "kmin", 2, "[Rp, D]")
        if num_pages < 0:
            raise KVCompressValueError(f"num_pages: must be >= 0, got {num_pages}")
        lengths = _as_int64(lengths, "lengths", query)
        n_heads = _shape(lengths, "lengths", 1, "[B * H]")[0]
        if qs[0] == 0 or n_heads % qs[0] != 0:
            raise KVCompressValueError(f"lengths: {n_heads} entries is not B * H for the batch size "
                                       f"B = {qs[0]} of query")
        if out is None:
            out = _empty(query, (qs[0], n_heads // qs[0], num_pages), "float32")
        _C.page_scores(_prepare(query), _prepare(kmin), _prepare(kmax), _out(out, "out"), 0 if gqa == "max" else 1,
                       None, lengths,
                       _as_int64(page_offsets, "page_offsets", query), P)
        return out
    ks = _shape(kmin, "kmin", 4, "[B, H, Np, D]")
    if not 0 <= num_pages <= ks[2]:
        raise KVCompressValueError(f"num_pages: must be in [0, {ks[2]}] (the pages kmin bounds), got {num_pages}")
    if out is None:
        out = _empty(query, (qs[0], ks[1], num_pages), "float32")
    first_page = None
    if kv_start is not None:
        first_page = _as_int64(kv_start, "kv_start", query)
        # integers become pages; anything else goes down as it is, for the C side to name its dtype
        if str(getattr(first_page, "dtype", "")) in ("torch.int64", "int64"):
            first_page = first_page // P
    _C.page_scores(_prepare(query), _prepare(kmin), _prepare(kmax), _out(out, "out"), 0 if gqa == "max" else 1,
                   first_page, None, None, P)
    return out


def attention_pages(queries, keys, values, pages, page_size, *, scaling=None, kv_start=None, counts=None,
                    offsets=None, lengths=None):
    """Decode attention that reads only the listed pages of a layer.

    Head ``(b, h)`` attends over the slots of pages ``pages[b, h]`` (page
    ``p`` = its slots ``p * P .. min((p + 1) * P, n_h) - 1``), read in place
    by index: nothing is gathered into a copy. Online softmax in float32 as
    :func:`attention`, which it equals bit for bit when every page is listed.

    Parameters
    ----------
    queries : tensor ``[B, Hq, 1, D]``
        One query per row: the layer's newest slot.
    keys, values : tensors, dtype of `queries`, any strides
        Uniform ``[B, Hkv, n, D]``; ragged (with `offsets` and `lengths`)
        ``[N, D]``, head ``(b, h)``'s slots being rows ``offsets[b*Hkv + h] ..
        + lengths[b*Hkv + h] - 1``.
    pages : int64 tensor ``[B, Hkv, k]``, contiguous
        Per head, strictly ascending page indices ending with the head's
        newest page ``(n_h - 1) // P`` (it holds the query). Ragged: a list
        may start with any number of negative entries (skipped: they pad
        heads reading fewer than ``k`` pages); an empty head lists only
        those and gets zeros; every other head reads at least one page.
    page_size : int >= 1
    scaling : float, optional
        Default ``1 / sqrt(D)``.
    kv_start : int64 ``[B]``, optional, uniform only
        Leading padded slots, masked.
    counts : float32 or int32, optional
        Merge counts, uniform ``[B, Hkv, n]`` / ragged ``[N]``: ``log(count)``
        joins the logit. Not scanned (that would read every slot): they must
        be finite and > 0 on the slots read.
    offsets, lengths : int64 tensors ``[B * Hkv]``, ragged only
        As in :func:`attention`.

    Returns
    -------
    tensor ``[B, 1, Hq, D]``, dtype of `queries`
    """
    ragged = offsets is not None or lengths is not None
    scaling, out = _attention_out(queries, {"keys": keys, "values": values}, "D", ragged, scaling, None)
    _C.attention_pages(_prepare(queries), _prepare(keys), _prepare(values), out, scaling,
                       _as_int64(kv_start, "kv_start", queries), _as_int64(pages, "pages", queries),
                       _int_arg(page_size, "page_size"), _prepare(counts) if counts is not None else None,
                       _as_int64(offsets, "offsets", queries), _as_int64(lengths, "lengths", queries))
    return out


# ---------------------------------------------------------------- LSH (MagicPIG)
def simhash(x, planes, K, *, center=None, group=1, out=None):
    """SimHash codes: ``L`` tables of ``K`` sign bits of random projections.

    ``codes[b, h, j, t] = sum_k [planes[h // group, t*K + k] . (x[b, h, j] -
    center[b, h // group]) > 0] << k``, dot products in float32.

    Parameters
    ----------
    x : tensor ``[B, H, n, D]`` (float32, float16 or bfloat16)
        Keys (``group=1``) or queries (``group`` = query heads per kv head).
    planes : float32 tensor ``[Hk, L * K, D]``
        Hyperplanes of each kv head (``Hk = H // group``).
    K : int in [1, 30]
        Bits per table.
    center : float32 tensor ``[B, Hk, D]``, optional
        Subtracted before hashing (MagicPIG centers the keys).
    group : int
    out : int32 tensor ``[B, H, n, L]``, optional

    Returns
    -------
    int32 tensor ``[B, H, n, L]``
    """
    xs = _shape(x, "x", 4, "[B, H, n, D]")
    ps = _shape(planes, "planes", 3, "[Hk, L * K, D]")
    K = _int_arg(K, "K")
    if not 1 <= K <= 30:
        raise KVCompressValueError(f"K: must be in [1, 30], got {K}")
    if ps[1] % K:
        raise KVCompressValueError(f"planes: {ps[1]} planes is not a multiple of K = {K}")
    L = ps[1] // K
    if out is None:
        out = _empty(x, (xs[0], xs[1], xs[2], L), "int32")
    _C.simhash(_prepare(x), _prepare(planes), _prepare(center), _out(out, "out"), K, L, _int_arg(group, "group"))
    return out


def lsh_attention(queries, keys, values, codes, query_codes, K, *, hits=2, sinks=4, window=64, center=None,
                  scaling=None, kv_start=None, return_lse=False, return_reads=False, offsets=None, lengths=None,
                  counts=None):
    """MagicPIG's decode attention estimated from the keys that collide with the query.

    Per query head: the first ``sinks`` real slots and the last ``window``
    slots are read exactly; any other slot is read only when its SimHash codes
    agree with the query's in at least ``hits`` of the ``L`` tables, and then
    weighted by ``1 / p``, ``p = P[Binomial(L, u^K) >= hits]`` with ``u = 1 -
    angle(q, k - center) / pi`` its probability of being read (importance
    sampling). Output = the weighted softmax average of the values read.
    ``exp(lse)`` is an unbiased estimate of the full softmax normaliser
    ``sum_j exp(scaling * q . k_j)`` over random hyperplanes (with `counts`:
    ``sum_j count_j * exp(scaling * q . k_j)``).

    Parameters
    ----------
    queries : tensor ``[B, Hq, 1, D]``
    keys, values : tensors, dtype of `queries`, any strides
        Uniform layout: ``[B, H, n, D]``. Ragged layout (with `offsets` and
        `lengths`): ``[R, D]``; slot ``j`` of head ``i = b*H + h`` is row
        ``offsets[i] + j``, ``j < lengths[i]``.
    codes : int32 ``[B, H, n, L]`` / ragged ``[R, L]``
        :func:`simhash` of the keys, centered (ragged: row ``r``'s codes).
    query_codes : int32 ``[B, Hq, 1, L]`` (:func:`simhash` of the queries, ``group = Hq // H``)
    K : int
        Bits per table the codes were made with.
    hits : int
        Tables a key must share with the query to be sampled (MagicPIG: 2).
    sinks, window : ints
        Slots always read exactly at the start (after padding; ragged: a
        head's first slots) and the end (a head's last slots).
    center : float32 ``[B, H, D]``, optional
        The key center the codes were made with (ragged: ``H = N // B``).
    scaling : float, optional
    kv_start : int64 ``[B]``, optional (uniform only)
    return_lse : bool
        Also return the float32 ``[B, Hq]`` log normaliser estimate.
    return_reads : bool
        Also return the int32 ``[B, Hq]`` number of slots each query head
        read (sinks, window and sampled).
    offsets, lengths : int64 ``[N]``, ``N = B * H``, optional (ragged only)
        Segments inside ``[0, R)``, pairwise disjoint, in any order, unused
        rows between them allowed. An empty head (length 0) gives zeros,
        ``lse = -inf`` and 0 reads.
    counts : float32 or int32 ``[B, H, n]`` / ragged ``[R]``, optional
        Merge counts (finite, > 0): ``log(count_j)`` joins slot ``j``'s
        log-weight, static and sampled alike, so the output estimates the
        count-weighted softmax average :func:`attention` computes with the
        same counts.

    Returns
    -------
    tensor ``[B, 1, Hq, D]``, then ``lse`` with ``return_lse``, then
    ``reads`` with ``return_reads`` (a tuple when either is asked for)
    """
    qs = _shape(queries, "queries", 4, "[B, Hq, 1, D]")
    ragged = offsets is not None or lengths is not None
    if ragged:  # the ragged ranks, named as the binding names them
        _shape(keys, "keys", 2, "[R, D]")
        _shape(values, "values", 2, "[R, D]")
    scaling, out = _attention_out(queries, {"keys": keys, "values": values}, "D", ragged, scaling, None)
    lse = _empty(queries, (qs[0], qs[1]), "float32") if _flag(return_lse, "return_lse") else None
    reads = _empty(queries, (qs[0], qs[1]), "int32") if _flag(return_reads, "return_reads") else None
    _C.lsh_attention(_prepare(queries), _prepare(keys), _prepare(values), codes, query_codes, center, out, lse,
                     reads, *_layout_args(queries, kv_start, offsets, lengths, counts), _int_arg(sinks, "sinks"),
                     _int_arg(window, "window"), _int_arg(K, "K"), _int_arg(hits, "hits"), scaling)
    extra = tuple(t for t in (lse, reads) if t is not None)
    return (out,) + extra if extra else out


class SlerpMerge(NamedTuple):
    """Result of :func:`slerp_merge`: the shared direction ``[B, H, n, D]``
    (dtype of the inputs), the per-layer norms ``[B, H, n, 2]`` float32 and
    the normalised angular distance ``[B, H, n]`` float32 in ``[0, 1]``."""

    dir: object
    norms: object
    dist: object


def slerp_merge(x1, x2, t: float = 0.6, *, out_dir=None, out_norms=None, out_dist=None) -> SlerpMerge:
    """MiniCache's merge of two layers' vectors into one direction per token.

    Per token ``(b, h, j)``: ``u_i = x_i / |x_i|``, ``Omega`` the angle
    between ``u_1`` and ``u_2`` (``2 atan2(|u1 - u2|, |u1 + u2|)``) and
    ``dir = sin((1-t) Omega) / sin Omega * u_1 + sin(t Omega) / sin Omega *
    u_2`` (SLERP; ``t = 0`` gives ``u_1`` and ``t = 1`` ``u_2`` bit for bit;
    below ``sin Omega = 1e-6`` the renormalised linear blend). A zero vector
    takes the other's direction (its own reconstruction is 0). ``norms[...,
    i] = |x_{i+1}|``, ``dist = Omega / pi``. Math in float32, ``dir``
    rounded once.

    Parameters
    ----------
    x1, x2 : tensors ``[B, H, n, D]`` (float32, float16 or bfloat16, same dtype)
        The same tokens' keys (or values) in layers ``l-1`` and ``l``.
    t : float in [0, 1]
        Interpolation towards ``x2`` (the paper's default 0.6).
    out_dir, out_norms, out_dist : optional outputs

    Returns
    -------
    SlerpMerge
    """
    xs = _shape(x1, "x1", 4, "[B, H, n, D]")
    t = _real(t, "t")
    if not 0.0 <= t <= 1.0:
        raise KVCompressValueError(f"t: must be in [0, 1], got {t}")
    if out_dir is None:
        out_dir = _empty_like_dtype(x1, xs, "x1")
    if out_norms is None:
        out_norms = _empty(x1, (xs[0], xs[1], xs[2], 2), "float32")
    if out_dist is None:
        out_dist = _empty(x1, (xs[0], xs[1], xs[2]), "float32")
    _C.slerp_merge(_prepare(x1), _prepare(x2), _out(out_dir, "out_dir"), _out(out_norms, "out_norms"),
                   _out(out_dist, "out_dist"), t)
    return SlerpMerge(out_dir, out_norms, out_dist)


def slerp_restore(dir, norms, slots, which: int, out, *, kept=None, kept_slots=None):
    """One layer's view of a merged pair, written into ``out`` in place.

    ``out[b, h, slots[b, h, i]] = norms[b, h, i, which] * dir[b, h, i]``
    (float32 product, rounded once) and ``out[b, h, kept_slots[b, h, i]] =
    kept[b, h, i]`` (retained tokens, copied bit for bit); a slot of -1 is
    padding (nothing written), and other rows of ``out`` are left as they
    are.

    Parameters
    ----------
    dir : tensor ``[B, H, m, D]`` (float32, float16 or bfloat16)
    norms : float32 tensor ``[B, H, m, 2]``
    slots : int32 or int64 tensor ``[B, H, m]``, values in ``[-1, T)``
    which : 0 or 1
        The layer: ``0`` is ``l-1`` (``x1`` of :func:`slerp_merge`), ``1`` is ``l``.
    out : tensor ``[B, H, T, D]``, dtype of ``dir``
    kept : tensor ``[B, H, r, D]``, optional (default: none)
    kept_slots : int32 or int64 tensor ``[B, H, r]``, with ``kept``

    Returns
    -------
    out
    """
    ds = _shape(dir, "dir", 4, "[B, H, m, D]")
    if (kept is None) != (kept_slots is None):
        raise KVCompressValueError("kept, kept_slots: give both or neither")
    if kept is None:
        kept = _empty_like_dtype(dir, (ds[0], ds[1], 0, ds[3]), "dir")
        kept_slots = _empty(dir, (ds[0], ds[1], 0), "int64")
    _C.slerp_restore(_prepare(dir), _prepare(norms), _prepare(slots), _prepare(kept), _prepare(kept_slots),
                     _out(out, "out"),
                     _int_arg(which, "which"))
    return out


def minicache_attention(queries, dir_k, dir_v, norms_k, norms_v, slots, which: int, *, keys=None, values=None,
                        kept_slots=None, tail_keys=None, tail_values=None, counts=None, kept_counts=None,
                        scaling=None):
    """Decode attention over one layer's view of a MiniCache pair, read in place.

    For query head ``hq`` (kv head ``h = hq // (Hq // H)``) the rows are the
    merged tokens (``slots >= 0``; key ``norms_k[..., which] * dir_k``, value
    ``norms_v[..., which] * dir_v``, logit plus ``log counts[..., which]``),
    the whole tokens (``kept_slots >= 0``; logit plus ``log kept_counts``) and
    the tail; output the softmax-weighted sum of the values (online softmax
    in float32). Equal, up to rounding, to :func:`attention` over the view
    :func:`slerp_restore` writes (which rounds each key once more).

    Parameters
    ----------
    queries : tensor ``[B, Hq, 1, D]`` (float32, float16 or bfloat16)
    dir_k, dir_v : tensors ``[B, H, m, D]`` / ``[B, H, m, Dv]``, dtype of ``queries``
    norms_k, norms_v : float32 tensors ``[B, H, m, 2]``
    slots : int32 or int64 ``[B, H, m]``; a negative slot is padding (skipped)
    which : 0 or 1
    keys, values, kept_slots : ``[B, H, w, D]``, ``[B, H, w, Dv]``, int ``[B, H, w]``, optional
    tail_keys, tail_values : ``[B, H, t, D]``, ``[B, H, t, Dv]``, optional
    counts : float32 ``[B, H, m, 2]``, kept_counts : float32 ``[B, H, w]``, optional
        Merge counts (> 0), added as ``log`` to the logits.
    scaling : float, default ``D ** -0.5``

    Returns
    -------
    tensor ``[B, 1, Hq, Dv]``
    """
    qs = _shape(queries, "queries", 4, "[B, Hq, 1, D]")
    ds = _shape(dir_k, "dir_k", 4, "[B, H, m, D]")
    vs = _shape(dir_v, "dir_v", 4, "[B, H, m, Dv]")
    if (keys is None) != (values is None) or (keys is None) != (kept_slots is None):
        raise KVCompressValueError("keys, values, kept_slots: give all three or none")
    if (tail_keys is None) != (tail_values is None):
        raise KVCompressValueError("tail_keys, tail_values: give both or neither")
    if keys is None:
        keys = _empty_like_dtype(queries, (ds[0], ds[1], 0, qs[3]), "queries")
        values = _empty_like_dtype(queries, (ds[0], ds[1], 0, vs[3]), "queries")
        kept_slots = _empty(queries, (ds[0], ds[1], 0), "int64")
    if tail_keys is None:
        tail_keys = _empty_like_dtype(queries, (ds[0], ds[1], 0, qs[3]), "queries")
        tail_values = _empty_like_dtype(queries, (ds[0], ds[1], 0, vs[3]), "queries")
    out = _empty_like_dtype(queries, (qs[0], 1, qs[1], vs[3]), "queries")
    _C.minicache_attention(_prepare(queries), _prepare(dir_k), _prepare(dir_v), _prepare(norms_k), _prepare(norms_v),
                           _prepare(slots), _prepare(keys), _prepare(values), _prepare(kept_slots),
                           _prepare(tail_keys), _prepare(tail_values), counts, kept_counts, out,
                           _int_arg(which, "which"), _scaling(scaling, qs[3]))
    return out


#: anchor names of :func:`kvcrush_pick`, in the C op's enum order
KVCRUSH_ANCHORS = ("alternate", "random", "mean")


class KVCrushPick(NamedTuple):
    """Result of :func:`kvcrush_pick`."""

    picks: object
    """int64 ``[B, G]``: one representative slot per bucket, -1 where a row
    has fewer candidates than buckets."""
    dist: object
    """int64 ``[B, T]``: Hamming distance of each candidate's signature to
    the anchor; -1 for padding and kept slots."""


def kvcrush_pick(mass, kept, groups, *, anchor="alternate", seed=0, kv_start=None) -> KVCrushPick:
    """KVCrush's bucket representatives (arXiv 2503.00022).

    Per batch row ``b`` with ``s = kv_start[b]`` and ``n = T - s`` valid slots:

    * each head's threshold is its mean mass over the valid slots,
      ``thr_h = sum_{j >= s} mass[b, h, j] / n`` (``1 / n`` when `mass` is an
      attention distribution), and slot ``j``'s signature bit ``h`` is
      ``mass[b, h, j] > thr_h``;
    * candidates are the valid slots with ``kept[b, j] == 0`` (``m`` of
      them); their distance is the Hamming distance of the signature to the
      anchor: ``"alternate"`` (bit ``h`` = ``h mod 2``), ``"random"`` (a
      counter-based draw from `seed`, the same on every backend) or
      ``"mean"`` (the majority bit of each head over the candidates);
    * ranked by ``(distance, slot)``, the candidates are cut into ``G =
      groups`` buckets of equal size (rank ranges ``[floor(g m / G),
      floor((g + 1) m / G))``) and the first of each bucket is its
      representative. With ``m <= G`` every candidate is picked.

    Parameters
    ----------
    mass : float32 tensor ``[B, H, T]``
        Attention mass each head pays to each slot (KVCrush: query heads).
    kept : uint8 or bool tensor ``[B, T]``
        1 for slots the importance policy keeps (never candidates).
    groups : int in ``[0, T]``
        Number of buckets ``G``.
    anchor : {"alternate", "random", "mean"}
    seed : int >= 0
        Seed of the ``"random"`` anchor.
    kv_start : int64 tensor ``[B]``, optional
        Leading padded slots per row (left padding): never candidates, and
        not counted in the threshold.

    Returns
    -------
    KVCrushPick
        ``picks`` int64 ``[B, G]`` in bucket order (-1 padded) and ``dist``
        int64 ``[B, T]``.
    """
    if not (isinstance(anchor, str) and anchor in KVCRUSH_ANCHORS):
        raise KVCompressValueError(f"anchor: expected one of {KVCRUSH_ANCHORS}, got {anchor!r}")
    ms = _shape(mass, "mass", 3, "[B, H, T]")
    G = _int_arg(groups, "groups")
    if not 0 <= G <= ms[2]:
        # checked before the outputs are allocated: G sizes one of them
        raise KVCompressValueError(f"groups: must be in [0, T] = [0, {ms[2]}], got {G}")
    if _is_torch(kept):
        import torch

        if kept.dtype == torch.bool:
            kept = kept.to(torch.uint8)
    elif isinstance(kept, np.ndarray) and kept.dtype == np.bool_:
        kept = kept.astype(np.uint8)
    picks = _empty(mass, (ms[0], G), "int64")
    dist = _empty(mass, (ms[0], ms[2]), "int64")
    _C.kvcrush_pick(_prepare(mass), _prepare(kept), picks, dist, KVCRUSH_ANCHORS.index(anchor), _py_int(seed),
                    _as_int64(kv_start, "kv_start", mass))
    return KVCrushPick(picks, dist)
def actqkv_scores(queries, keys, *, scaling=None, kv_start=None, return_weights=False):
    """ActQKV scores (arXiv 2502.13542): one activation-aware probe query per
    head scores every key.

    For each batch row and query head, the real window queries ``q_i`` (those
    at key positions ``>= kv_start[b]``; query ``i`` sits at key position
    ``Tk - W + i``) give, per channel ``d``, the mean ``mu_d`` and the
    population variance ``var_d``; with ``eps = mean_d(var_d) / 100``, query
    ``i``'s activation bias is ``bias_i = mean_d (q_i,d - mu_d)^2 / (var_d +
    eps)``, its weight ``w_i = bias_i / sum(bias)`` (``1/m`` when every bias
    is 0), and the probe ``sum_i w_i q_i``. Head ``h`` scores key ``j`` with
    ``softmax_j(scaling * probe . k_j)`` over the real keys; a kv head's
    score is the mean over its query heads.

    Parameters
    ----------
    queries : tensor ``[B, Hq, W, D]`` (float32, float16 or bfloat16), ``D >= 1``
        The window: the queries of the last ``W <= Tk`` key positions.
    keys : tensor ``[B, Hkv, Tk, D]``, same dtype as `queries`
        ``Hq`` a multiple of ``Hkv``; query head ``h`` uses kv head
        ``h // (Hq // Hkv)``.
    scaling : float, optional
        Logit scale; default ``1 / sqrt(D)``.
    kv_start : int64 tensor ``[B]``, optional
        Leading padded key positions per row (left padding): those keys score
        0 and padded window queries take weight 0.
    return_weights : bool
        Also return the activation weights.

    Returns
    -------
    float32 tensor ``[B, Hkv, Tk]``
        The scores (0 everywhere for a row without a real window query);
        with ``return_weights``, also float32 ``[B, Hq, W]`` weights.
        Accumulated in float32.
    """
    qs = _shape(queries, "queries", 4, "[B, Hq, W, D]")
    ks = _shape(keys, "keys", 4, "[B, Hkv, Tk, D]")
    _flag(return_weights, "return_weights")
    scaling = _scaling(scaling, qs[3])
    out = _empty(keys, (ks[0], ks[1], ks[2]), "float32")
    weights = _empty(queries, (qs[0], qs[1], qs[2]), "float32")
    _C.actqkv_scores(_prepare(queries), _prepare(keys), out, weights, scaling,
                     _as_int64(kv_start, "kv_start", keys))
    return (out, weights) if return_weights else out
def pooled_counts(scores, k):
    """How many of each row's ``k`` highest scores, pooled over layers, each
    layer holds (DynamicKV's per-layer budgets).

    Per batch row ``b``: take the ``k[b]`` largest of ``scores[b]`` (all
    layers' candidates together) and count them per layer; ties at the
    ``k``-th largest value go to the lower layer first. ``-inf`` entries
    (padding) rank below every finite score. CPU and CUDA agree exactly.

    Parameters
    ----------
    scores : float32 tensor ``[B, L, M]``
        ``M`` candidate scores per layer (``-inf`` padded). NaN is an error.
    k : int or int64 tensor ``[B]``
        Entries kept per row, ``0 <= k <= L * M`` (checked).

    Returns
    -------
    int64 tensor ``[B, L]``
        Per row, the counts (they sum to ``k[b]``).
    """
    s = _shape(scores, "scores", 3, "[B, L, M]")
    if isinstance(k, bool):
        raise KVCompressTypeError("k: expected an int or an int64 tensor [B], got bool")
    if isinstance(k, (int, np.integer)):
        if not 0 <= int(k) <= s[1] * s[2]:
            raise KVCompressValueError(f"k: {int(k)} is outside [0, L * M] = [0, {s[1] * s[2]}]")
        if _is_torch(scores):
            import torch

            k = torch.full((s[0],), int(k), dtype=torch.int64, device=scores.device)
        else:
            k = np.full((s[0],), int(k), dtype=np.int64)
    k = _as_int64(k, "k", scores)
    out = _empty(scores, (s[0], s[1]), "int64")
    _C.pooled_counts(_prepare(scores), _prepare(k), out)
    return out


def row_cosine(x, y):
    """Cosine similarity of each row of ``x`` with the same row of ``y``
    (SqueezeAttention: a token's hidden state before and after attention).

    ``out[n] = x[n] . y[n] / (|x[n]| |y[n]|)``, 0 when either row is zero;
    float32 sums (CPU in ascending channel order; CUDA within rounding).

    Parameters
    ----------
    x, y : tensor ``[N, D]`` (float32, float16 or bfloat16, the same dtype)

    Returns
    -------
    float32 tensor ``[N]``
    """
    s = _shape(x, "x", 2, "[N, D]")
    _shape(y, "y", 2, "[N, D]")
    out = _empty(x, (s[0],), "float32")
    _C.row_cosine(_prepare(x), _prepare(y), out)
    return out


def fastgen_recovery(queries, keys, rung, rungs: int, *, scaling=None, kv_start=None):
    """FastGen's attention recovery: the share of a window's attention that
    each policy of a nested ladder keeps.

    Parameters
    ----------
    queries : tensor ``[B, Hq, Tq, D]`` (float32, float16 or bfloat16)
        Queries of the last ``Tq`` key positions: query ``i`` sits at key
        position ``p_i = Tk - Tq + i`` and sees keys ``s <= j <= p_i``
        (``s = kv_start[b]``). ``Tq <= Tk``.
    keys : tensor ``[B, Hkv, Tk, D]``, same dtype as `queries`
        ``Hq`` a multiple of ``Hkv``; query head ``h`` uses kv head
        ``h // (Hq // Hkv)``.
    rung : uint8 tensor ``[B, Hkv, Tk]``
        The cheapest policy that keeps each slot: policy ``p`` keeps the
        slots with ``rung <= p``; a rung ``>= rungs`` is kept by none.
    rungs : int in ``[1, 16]``
        Number of policies ``P``.
    scaling : float, optional
        Logit scale; default ``1 / sqrt(D)``.
    kv_start : int64 tensor ``[B]``, optional
        Leading padded key positions per batch row (never attended).

    Returns
    -------
    float32 tensor ``[B, Hkv, P]``
        ``out[b, hk, p]``: the mean, over the window's queries that see a
        key and the query heads of kv head ``hk``, of the softmax mass on
        slots with ``rung <= p`` (1 where no query sees a key). For a
        policy ``C`` with mass ``m`` a query's re-normalised attention over
        ``C`` differs from the full one by ``2 (1 - m)`` in L1, so ``m >= T``
        is FastGen's recovery criterion. Float32 accumulation.
    """
    qs = _shape(queries, "queries", 4, "[B, Hq, Tq, D]")
    ks = _shape(keys, "keys", 4, "[B, Hkv, Tk, D]")
    _shape(rung, "rung", 3, "[B, Hkv, Tk]")
    P = _int_arg(rungs, "rungs")
    if not 1 <= P <= 16:
        raise KVCompressValueError(f"rungs: expected 1 to 16 policies, got {P}")
    out = _empty(keys, (ks[0], ks[1], P), "float32")
    _C.fastgen_recovery(_prepare(queries), _prepare(keys), _prepare(rung), out, _scaling(scaling, qs[3]),
                        _as_int64(kv_start, "kv_start", keys))
    return out


class KeepRowsPlan(NamedTuple):
    """Outputs of :func:`keep_rows_plan`."""

    take: object  #: ``[S]`` int64: the kept store's row of each kept slot (head by head, in order)
    dst: object  #: ``[S + P]`` int64: each kept slot's row in the new flat buffers, then each placeholder's
    lengths: object  #: ``[N]`` int64: rows per head
    ph_base: object  #: ``[P]`` int64: the kept row whose value (and grid key) a placeholder repeats
    ph_last: object  #: ``[P]`` int64: the kept row whose position a placeholder takes
    ph_keys: object  #: ``[P, D]`` float32: each placeholder's key on the packing grid


def keep_rows_plan(o_offsets, o_lengths, o_pos, o_counts_bias, o_counts_plain, o_keys, o_values, o_min, o_step,
                   n_offsets, n_lengths, n_pos, n_counts, n_keys, n_values, n_grid, *, group, bits, min_live,
                   sinks, sinks_asked, residual, slack):
    """Layout of a decode-time round that keeps a per-head packed layer's
    unchanged key groups in place (``stores.keep_rows``; the rules are in
    ``csrc/keep_rows.h``). Host bookkeeping on CPU tensors, one call.

    Parameters
    ----------
    o_offsets, o_lengths : int64 ``[N]``
        The old packed layer's segments (first row, packed rows in use).
    o_pos : int32 ``[Ro]``; o_counts_bias, o_counts_plain : float32 ``[Ro]``
        Its rows' positions and counts with and without merge counts.
    o_keys, o_values : ``[Ro, D]`` (float32, float16 or bfloat16)
        Its rows dequantized.
    o_min, o_step : float32 ``[Ro / group, D]``
        Its key groups' minimum and step (on the packing grid).
    n_offsets, n_lengths : int64 ``[N]``; n_pos : int32 ``[Rn]``; n_counts : float32 ``[Rn]``
        The kept slots (a ragged store) and their merge counts.
    n_keys, n_values : ``[Rn, D]``, ``o_keys``' dtype
    n_grid : float32 ``[Rn, D]``
        The kept keys on the packing grid (rotated when the layer rotates keys).
    group, bits, min_live : int
        Key group size, key bits, and the unchanged members a group needs.
    sinks, sinks_asked, residual : int
        The old layer's sink block, the sinks asked for, its residual.
    slack : int
        Free rows per head in the new buffers.

    Returns
    -------
    KeepRowsPlan or None
        None when the layout is refused (no group kept, or the sink block or
        the residual would change).
    """
    o_lengths = _as_int64(o_lengths, "o_lengths", o_keys)
    o_offsets = _as_int64(o_offsets, "o_offsets", o_keys)
    n_offsets = _as_int64(n_offsets, "n_offsets", o_keys)
    n_lengths = _as_int64(n_lengths, "n_lengths", o_keys)
    Ro = _shape(o_pos, "o_pos", 1, "[Ro]")[0]
    Rn = _shape(n_pos, "n_pos", 1, "[Rn]")[0]
    N = _shape(o_offsets, "o_offsets", 1, "[N]")[0]
    D = _shape(o_keys, "o_keys", 2, "[Ro, D]")[1]
    take = _empty(o_keys, (Rn + Ro,), "int64")
    dst = _empty(o_keys, (Rn + Ro,), "int64")
    lengths = _empty(o_keys, (N,), "int64")
    ph_base = _empty(o_keys, (Ro,), "int64")
    ph_last = _empty(o_keys, (Ro,), "int64")
    ph_keys = _empty(o_keys, (Ro, D), "float32")
    info = _empty(o_keys, (3,), "int64")
    _C.keep_rows_plan(*(_prepare(x) for x in (o_offsets, o_lengths, o_pos, o_counts_bias, o_counts_plain, o_keys,
                                              o_values, o_min, o_step, n_offsets, n_lengths, n_pos, n_counts, n_keys,
                                              n_values, n_grid)),
                      group, bits, min_live, sinks, sinks_asked, residual, slack,
                      take, dst, lengths, ph_base, ph_last, ph_keys, info)
    M, P, ok = (int(x) for x in info)
    if not ok:
        return None
    return KeepRowsPlan(take[:M - P], dst[:M], lengths, ph_base[:P], ph_last[:P], ph_keys[:P])
