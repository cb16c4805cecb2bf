"""Head profiles: which attention heads copy from far back in the context.

Head-level methods (HeadKV; RazorAttention and TaskKV need the same kind of
statistic) give heads different budgets by what each head does. The
statistic comes from a short calibration run on the model itself, once per
model, and is saved and passed back (:class:`HeadProfile`), so nothing is
downloaded.

The run is data-free, after the induction-head probes of Olsson et al. and
RazorAttention: a random token sequence ``r`` of ``length`` tokens is
repeated, ``[bos] r r``, and every query ``i`` in the second copy (the
current token ``r[j]``, which already occurred at ``j``) is inspected in
every layer and query head:

* **copy**: the share of queries whose most-attended slot is ``j + 1``,
  the earlier occurrence's successor (the token the model is about to
  emit): the argmax hit rate the Retrieval Heads detector (Wu et al., which
  HeadKV uses) counts while a needle is copied;
* **induction**: the mean attention on ``j + 1``;
* **echo**: the mean attention on ``j`` (the earlier occurrence itself).

Our reading: Retrieval Heads scores with needle-in-a-haystack prompts from
natural text; a repeated random sequence asks for the same copying with no
text and no tokenizer (RazorAttention's probe). User texts can replace the
random tokens (``ids=``): the sequence is then ``ids`` repeated.

A fourth statistic serves TaskKV (format 2 of the saved profile):

* **semantic**: the head's distance from its layer's semantic centre. A
  query head's semantic vector is its mean contribution to the residual
  stream, ``W_O[:, head] . mean_t o_head(t)`` (the head's attention output
  projected by its slice of ``o_proj``, averaged over the tokens after the
  first and over the rows); the centre is the mean of the layer's vectors,
  and the statistic the Euclidean distance to it. It is measured on
  ``semantic_ids`` (the user's texts, as given) or, without them, on the
  same run as the other three.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = "kvcompress-head-profile/2"
#: formats :meth:`HeadProfile.from_dict` still reads (format 1 has no
#: ``semantic`` statistic: methods that need it refuse such a profile by name)
_READABLE = ("kvcompress-head-profile/1", FORMAT)
_STATS = ("copy", "induction", "echo", "semantic")


@dataclass
class HeadProfile:
    """Per-layer, per-query-head scores ``[L][Hq]`` (None for a layer whose
    attention weights the run could not read).

    Attributes
    ----------
    copy, induction, echo : list of (list of float or None)
        See the module docstring.
    sliding : list of int
        Layers with a sliding window (head-level budgets skip them: their
        attention cannot reach past the window whatever they keep).
    kv_heads : int
        Key/value heads per layer (query heads are grouped onto them in
        order, ``Hq // kv_heads`` each).
    meta : dict
        How the profile was made (model type, length, rows, seed).
    semantic : list of (list of float or None), or None
        Per layer and query head, the distance from the layer's semantic
        centre (module docstring); None in a profile saved in format 1.
    """

    copy: list
    induction: list
    echo: list
    sliding: list = field(default_factory=list)
    kv_heads: int = 0
    meta: dict = field(default_factory=dict)
    semantic: list | None = None

    def __post_init__(self) -> None:
        L = len(self.copy)
        if len(self.induction) != L or len(self.echo) != L:
            raise ValueError(f"profile: copy, induction and echo must cover the same {L} layers")
        if self.semantic is not None and len(self.semantic) != L:
            raise ValueError(f"profile: semantic must cover the same {L} layers as copy")
        if isinstance(self.kv_heads, bool) or not isinstance(self.kv_heads, int) or self.kv_heads < 1:
            raise ValueError(f"kv_heads: expected an int >= 1, got {self.kv_heads!r}")
        for name in _STATS:
            for li, row in enumerate(getattr(self, name) or []):
                if row is None:
                    continue
                if len(row) % self.kv_heads or not all(isinstance(x, (int, float)) and math.isfinite(x)
                                                       and x >= 0 for x in row):
                    raise ValueError(f"profile: {name}[{li}] must hold finite scores >= 0 for a multiple of "
                                     f"kv_heads={self.kv_heads} query heads")

    def __repr__(self) -> str:
        L = len(self.copy)
        known = [r for r in self.copy if r is not None]
        Hq = len(known[0]) if known else 0
        top = max((max(r) for r in known), default=0.0)
        return (f"HeadProfile(layers={L}, query heads={Hq}, kv heads={self.kv_heads}, sliding={len(self.sliding)}, "
                f"max copy={top:.2f}, {self.meta.get('model_type', '?')})")

    @property
    def num_layers(self) -> int:
        return len(self.copy)

    def kv_scores(self, which: str = "copy") -> torch.Tensor:
        """float64 ``[L, Hkv]``: each kv head's mean score over its query
        heads (0 for sliding layers and layers without scores)."""
        if which not in _STATS:
            raise ValueError(f"which: expected 'copy', 'induction', 'echo' or 'semantic', got {which!r}")
        rows = getattr(self, which)
        if rows is None:
            raise ValueError(f"profile: has no {which!r} head statistic (a profile saved in format 1, before "
                             f"kvcompress measured it); compute a new one with kvcompress.profile_heads(model)")
        out = torch.zeros(len(rows), self.kv_heads, dtype=torch.float64)
        for li, row in enumerate(rows):
            if row is None or li in self.sliding:
                continue
            out[li] = torch.tensor(row, dtype=torch.float64).view(self.kv_heads, -1).mean(1)
        return out

    # ------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        return dict(format=FORMAT, copy=self.copy, induction=self.induction, echo=self.echo,
                    sliding=list(self.sliding), kv_heads=self.kv_heads, meta=self.meta, semantic=self.semantic)

    @classmethod
    def from_dict(cls, d: dict) -> "HeadProfile":
        """A profile from :meth:`to_dict`'s dict, also one saved in format 1
        (its ``semantic`` is None)."""
        if not isinstance(d, dict) or d.get("format") not in _READABLE:
            raise ValueError(f"profile: not a {FORMAT} dict")
        return cls(d["copy"], d["induction"], d["echo"], list(d.get("sliding", [])), int(d["kv_heads"]),
                   dict(d.get("meta", {})), d.get("semantic"))

    def save(self, path) -> Path:
        """Write the profile as JSON; load it back with :meth:`load`."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict()), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path) -> "HeadProfile":
        """The profile :meth:`save` wrote to ``path``; a path that cannot be
        read or holds no profile's JSON is a ``ValueError`` naming ``profile``."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:  # missing, a folder, unreadable
            raise ValueError(f"profile: cannot read {str(path)!r}: {e.strerror or e}") from None
        try:
            data = json.loads(text)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"profile: {str(path)!r} is not a head profile's JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"profile: {str(path)!r} is not a head profile's JSON (an object), got "
                             f"{type(data).__name__}")
        return cls.from_dict(data)


def as_profile(profile) -> HeadProfile:
    """A ``HeadProfile`` from a profile, its dict, or a path to its JSON."""
    if isinstance(profile, HeadProfile):
        return profile
    if isinstance(profile, dict):
        return HeadProfile.from_dict(profile)
    if isinstance(profile, (str, Path)):
        return HeadProfile.load(profile)
    raise TypeError(f"profile: expected a HeadProfile, its dict or a JSON path, got {type(profile).__name__}")


def with_profile(method, model):
    """``method`` (a dataclass with a ``profile`` field) with a profile of
    ``model``: computed once when it has none, refused by name when the one
    it has was made for another number of layers. The ``prepare`` of
    head-profiled methods (HeadKV, RazorAttention)."""
    from dataclasses import replace

    if method.profile is None:
        return replace(method, profile=profile_heads(model))
    L = int(getattr(model.config, "num_hidden_layers", method.profile.num_layers))
    if method.profile.num_layers != L:
        raise ValueError(f"profile: made for {method.profile.num_layers} layers, the model has {L}")
    return method


def _random_ids(config, length: int, rows: int, seed: int) -> torch.Tensor:
    V = int(config.vocab_size)
    special = {getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    special = {int(x) for x in special if isinstance(x, int)}
    lo = min(V - 1, max(3, V // 100))  # the first ids are often control tokens
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(lo, V, (rows, length), generator=g)
    for s in special:
        ids[ids == s] = lo if s != lo else lo + 1
    return ids


def _attention_modules(model) -> list:
    """The model's attention modules in layer order (those with an
    ``o_proj`` and a ``layer_idx``, as transformers' decoder layers have)."""
    mods = {}
    for m in model.modules():
        li = getattr(m, "layer_idx", None)
        if isinstance(li, int) and isinstance(getattr(m, "o_proj", None), torch.nn.Linear):
            mods.setdefault(li, m)
    L = getattr(model.config, "num_hidden_layers", None) or (max(mods) + 1 if mods else 0)
    return [mods.get(li) for li in range(int(L))]


class _SemanticProbe:
    """Forward pre-hooks on every ``o_proj`` that add up, per layer, the
    attention output (the heads concatenated) over the tokens after the
    first and over the rows, in float64; ``distances()`` turns the sums
    into each query head's distance from its layer's semantic centre."""

    def __init__(self, model):
        self.mods = _attention_modules(model)
        self.sums = [None] * len(self.mods)
        self.count = [0] * len(self.mods)
        self.handles = []

    def __enter__(self):
        for li, m in enumerate(self.mods):
            if m is not None:
                self.handles.append(m.o_proj.register_forward_pre_hook(self._hook(li)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, li):
        def hook(module, args):
            x = args[0].detach().double()[:, 1:]  # [B, T - 1, Hq * D]: the first token is a sink
            s = x.sum((0, 1))
            self.sums[li] = s if self.sums[li] is None else self.sums[li] + s
            self.count[li] += int(x.shape[0] * x.shape[1])
        return hook

    def distances(self) -> list:
        out = []
        for li, m in enumerate(self.mods):
            D = getattr(m, "head_dim", None)
            if m is None or self.sums[li] is None or self.count[li] == 0 or not isinstance(D, int) or D < 1:
                out.append(None)
                continue
            W = m.o_proj.weight.detach().double()  # [hidden, Hq * D]
            Hq = W.shape[1] // D
            mean = (self.sums[li] / self.count[li]).to(W.device).view(Hq, D)
            # head h's mean contribution to the residual stream: W[:, hD:(h+1)D] @ mean_h
            vec = torch.einsum("rhd,hd->hr", W.view(W.shape[0], Hq, D), mean)
            out.append((vec - vec.mean(0)).norm(dim=1).tolist())
        return out


@torch.no_grad()
def profile_heads(model, ids=None, *, length: int = 256, rows: int = 4, seed: int = 0,
                  semantic_ids=None) -> HeadProfile:
    """Score every attention head of ``model`` on repeated token sequences.

    Parameters
    ----------
    model : transformers model
        Any decoder-only model; it runs with transformers' eager attention
        for this call (restored after), so attention weights can be read.
    ids : token ids ``[rows, n]`` or ``[n]``, optional
        Sequences to repeat instead of random tokens.
    length, rows, seed
        Random sequences: ``rows`` sequences of ``length`` tokens (ids from
        the top 99% of the vocabulary, special tokens excluded).
    semantic_ids : token ids ``[rows, n]`` or ``[n]``, optional
        Texts (as given, not repeated) whose head outputs give the
        ``semantic`` statistic; by default the run's own sequences.

    Returns
    -------
    HeadProfile
        Scores per layer and query head (see the module docstring).
    """
    from .calibrate import _sliding_layers
    from .hf import _active_models, _set_attn

    config = model.config
    for name, v, least in (("length", length, 4), ("rows", rows, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ValueError(f"{name}: expected an int >= {least}, got {v!r}")
    if ids is None:
        seqs = _random_ids(config, length, rows, seed)
    else:
        seqs = torch.as_tensor(ids)
        if seqs.ndim == 1:
            seqs = seqs[None]
        if seqs.ndim != 2 or seqs.shape[1] < 4 or seqs.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ids: expected token ids [rows, n >= 4] or [n], got shape {tuple(seqs.shape)}")
        seqs = seqs.long()
    m = int(seqs.shape[1])
    bos = getattr(config, "bos_token_id", None)
    prefix = [int(bos)] if isinstance(bos, int) else []
    o = len(prefix)
    device = next(model.parameters()).device
    full = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(seqs.shape[0], o), seqs, seqs], 1).to(device)
    previous = config._attn_implementation
    # (kvcompress.enable alone leaves the model on our attention: that is no session)
    if id(model) in _active_models:
        raise RuntimeError("profile_heads: run it outside a kvcompress.compress() session")
    if semantic_ids is not None:
        sem = torch.as_tensor(semantic_ids)
        sem = sem[None] if sem.ndim == 1 else sem
        if sem.ndim != 2 or sem.shape[1] < 2 or sem.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"semantic_ids: expected token ids [rows, n >= 2] or [n], got shape "
                             f"{tuple(sem.shape)}")
    probe = _SemanticProbe(model)
    _set_attn(model, "eager")
    try:
        with probe:
            out = model(input_ids=full, output_attentions=True, use_cache=False)
    finally:
        _set_attn(model, previous)
    if semantic_ids is not None:
        probe = _SemanticProbe(model)
        with probe:
            model(input_ids=sem.long().to(device), use_cache=False)
    # query i = o + m + j reads token r[j]; its earlier copy is at o + j, the successor at o + j + 1
    j = torch.arange(1, m - 1, device=device)
    qi = o + m + j
    scores = {"copy": [], "induction": [], "echo": []}
    Hq = kv = None
    for att in out.attentions:
        if att is None:
            for v in scores.values():
                v.append(None)
            continue
        a = att.double()[:, :, qi]  # [B, Hq, m-2, T]
        succ = a.gather(3, (o + j + 1)[None, None, :, None].expand(a.shape[0], a.shape[1], -1, 1))[..., 0]
        same = a.gather(3, (o + j)[None, None, :, None].expand(a.shape[0], a.shape[1], -1, 1))[..., 0]
        hit = (a.argmax(-1) == (o + j + 1)[None, None]).double()
        scores["copy"].append(hit.mean((0, 2)).tolist())
        scores["induction"].append(succ.mean((0, 2)).tolist())
        scores["echo"].append(same.mean((0, 2)).tolist())
        Hq = int(a.shape[1])
    if Hq is None:
        raise RuntimeError("profile_heads: the model returned no attention weights")
    kv = int(getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", Hq))
    meta = dict(model_type=getattr(config, "model_type", None), length=m, rows=int(seqs.shape[0]),
                seed=None if ids is not None else seed, source="ids" if ids is not None else "random",
                semantic="semantic_ids" if semantic_ids is not None else "run")
    return HeadProfile(scores["copy"], scores["induction"], scores["echo"], sorted(_sliding_layers(config)), kv,
                       meta, probe.distances())


__all__ = ["HeadProfile", "profile_heads", "as_profile", "with_profile"]
