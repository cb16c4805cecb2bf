"""Every method on every attention variant transformers ships, on tiny random models.

One tiny decoder (hidden 64, 4 layers, head dim 16, GQA where the family has
it, vocab 300, no download) per family, covering the attention variants a
compressed cache has to reproduce:

- plain causal attention (llama, qwen3, phi3, olmo2), fused QKV projections
  (gpt_neox, gpt2), absolute position embeddings (gpt2);
- sliding windows, global (mistral: every layer) or per layer through
  ``config.layer_types`` (qwen2, gemma2, gemma3, gpt_oss, cohere2, granite_swa);
- attention logit softcapping (gemma2, ``softcap=`` to the attention function);
- learned attention sinks (gpt_oss and granite_swa, ``s_aux=``);
- layers without rotary embeddings (cohere2's global layers, one NoPE layer in
  granite_swa) and a non-default scaling (granite_swa's ``attention_multiplier``).

Every prompt (200 tokens, batch of 2, left padded: one row has 120 real
tokens) is longer than the sliding window (64), so a cache that ignores the
window attends to tokens transformers masks out.

For each family and each evicting method (``kvcompress.methods.EVICTING``):

1. ``budget >= prompt`` reproduces plain greedy ``model.generate()`` token for
   token, and its logits at every step;
2. a compressed run (``SnapKV``/``StreamingLLM``/``EMS`` at budget 32, and
   ``SnapKV`` at 128, between the window and the prompt) holds no more bytes
   than transformers' own ``DynamicCache(config=...)`` holds for the same
   generation (which keeps only the window on sliding layers).

A module that is not causal, and attention keyword arguments the cache
cannot honour (``position_bias``, sparse ``indices``), are refused by name.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import transformers
from transformers import DynamicCache

import kvcompress as kvc
from kvcompress.compat import cache_kwargs
from kvcompress.methods import EVICTING, REGISTRY
from kvcompress.stores import PackedStore
from generation import tiny_auto

WINDOW = 64
PROMPT = 200
SHORT = 120  # real tokens of the left-padded row
NEW = 12
VOCAB = 300
PAD = 0

_SLIDING_HALF = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]

_DECODER = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
    pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    # larger weights than the 0.02 default, so that attention is peaked and a
    # token outside the window (or a missing sink/softcap) changes the logits
    initializer_range=0.1,
)

#: family -> (config class, model class, config kwargs, what it exercises)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_DECODER), "causal, GQA"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(_DECODER, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0,
                   layer_types=_SLIDING_HALF),
              "sliding layers from config.layer_types"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_DECODER), "q/k norm"),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_DECODER, sliding_window=WINDOW),
                "config.sliding_window on every layer (no layer_types)"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               # scaling 1 and larger weights: attention logits reach the cap, so it changes the logits
               dict(_DECODER, sliding_window=WINDOW, layer_types=_SLIDING_HALF, attn_logit_softcapping=50.0,
                    final_logit_softcapping=30.0, query_pre_attn_scalar=1, initializer_range=0.2),
               "sliding + attention logit softcapping (eager reference)"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(_DECODER, sliding_window=WINDOW, layer_types=_SLIDING_HALF, query_pre_attn_scalar=16),
               "hybrid sliding/global, per-layer rope"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_DECODER), "fused qkv projection"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(_DECODER), "q/k norm over all heads"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, max_position_embeddings=1024, pad_token_id=PAD, bos_token_id=1,
                      eos_token_id=2, initializer_range=0.1),
                 "fused qkv, partial rotary, no GQA, cache.update without kwargs"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=1024, pad_token_id=PAD,
                  bos_token_id=1, eos_token_id=2, initializer_range=0.1),
             "absolute positions, Conv1D fused qkv, no GQA"),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(_DECODER, sliding_window=WINDOW, layer_types=_SLIDING_HALF, num_local_experts=2,
                     num_experts_per_tok=1, rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
                "learned sinks (s_aux) + sliding (eager reference)"),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM",
                dict(_DECODER, sliding_window=WINDOW, layer_types=_SLIDING_HALF),
                "sliding layers with rope, global layers without (NoPE)"),
    "granite_swa": ("GraniteSWAConfig", "GraniteSWAForCausalLM",
                    dict(_DECODER, sliding_window=WINDOW, layer_types=_SLIDING_HALF, attention_multiplier=0.2,
                         layer_rope_theta=[10000.0, 10000.0, 10000.0, 0]),
                    "sinks + sliding + NoPE layer + attention_multiplier scaling (transformers > 5.0)"),
}

#: the heaviest families (MoE / eager-only references) run their all-method sweep in the slow set
SLOW_FAMILIES: set[str] = set()

METHODS = sorted(EVICTING)
COMPRESSED = {
    "snapkv": lambda: kvc.SnapKV(budget=32),
    # above the window, below the prompt: a sliding layer still needs no more than its window
    "snapkv128": lambda: kvc.SnapKV(budget=128),
    "streamingllm": lambda: kvc.StreamingLLM(budget=32),
    "ems": lambda: kvc.EMS(budget=40),
}


def _build(family: str):
    config_name, model_name, kwargs, _ = FAMILIES[family]
    config_cls = getattr(transformers, config_name, None)
    model_cls = getattr(transformers, model_name, None)
    if config_cls is None or model_cls is None:
        pytest.skip(f"{family}: transformers {transformers.__version__} has no {config_name}/{model_name}")
    try:
        config = config_cls(**kwargs)
        torch.manual_seed(0)
        model = model_cls(config)
    except Exception as e:  # noqa: BLE001 - report why the family cannot run here
        pytest.skip(f"{family}: cannot build a tiny {model_name} on transformers {transformers.__version__}: "
                    f"{type(e).__name__}: {e}")
    if "eager reference" in FAMILIES[family][3]:
        # transformers 5.0 runs these through SDPA, which drops the softcap
        # and the sinks without a word; eager attention honours them
        model.set_attn_implementation("eager")
    return model.float().eval()


def _prompts():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB, (2, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    ids[0, : PROMPT - SHORT] = PAD
    mask[0, : PROMPT - SHORT] = 0
    return ids, mask


def _generate(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                              do_sample=False, pad_token_id=PAD, return_dict_in_generate=True, output_logits=True,
                              **kw)


def transformers_cache_bytes(cache) -> int:
    """Bytes a transformers cache holds: each layer's keys/values, every
    underlying storage counted once (a sliding layer's tensors are views into
    larger storages, and the whole storage stays allocated)."""
    storages: dict[int, int] = {}
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


class Arch:
    """A family's model, its prompts and plain generate()'s output, built once."""

    def __init__(self, family: str):
        self.family = family
        self.model = _build(family)
        self.ids, self.mask = _prompts()
        self._ref = None
        self._ref_bytes = None

    @property
    def ref(self):
        if self._ref is None:
            cache = DynamicCache(config=self.model.config)
            self._ref = _generate(self.model, self.ids, self.mask, **cache_kwargs(self.model, cache))
            self._ref_bytes = transformers_cache_bytes(cache)
        return self._ref

    @property
    def ref_bytes(self) -> int:
        self.ref
        return self._ref_bytes


_ARCHS: dict[str, Arch] = {}


@pytest.fixture(scope="module")
def archs():
    yield _ARCHS
    _ARCHS.clear()


def _arch(archs, family) -> Arch:
    if family not in archs:
        archs[family] = Arch(family)
    return archs[family]


def _family_params():
    out = []
    for family in FAMILIES:
        marks = [pytest.mark.slow] if family in SLOW_FAMILIES else []
        out.append(pytest.param(family, marks=marks, id=family))
    return out


def _sliding_layers(model) -> list[int]:
    types = getattr(model.config, "layer_types", None)
    if types is not None:
        return [i for i, t in enumerate(types) if t == "sliding_attention"]
    if getattr(model.config, "sliding_window", None) is not None:
        return list(range(model.config.num_hidden_layers))
    return []


# ---------------------------------------------------------------- the reference


@pytest.mark.parametrize("family", _family_params())
def test_reference_sees_the_variant(archs, family):
    """The tiny model really has the variant under test (the configs would
    otherwise silently fall back to plain attention), and the prompt outlasts
    the window."""
    arch = _arch(archs, family)
    model = arch.model
    sliding = _sliding_layers(model)
    expect_sliding = family in ("qwen2", "mistral", "gemma2", "gemma3", "gpt_oss", "cohere2", "granite_swa")
    assert bool(sliding) == expect_sliding, (family, sliding)
    if sliding:
        assert model.config.sliding_window == WINDOW < PROMPT
        # transformers' own cache keeps only the window on those layers
        cache = DynamicCache(config=model.config)
        assert [i for i, layer in enumerate(cache.layers) if getattr(layer, "is_sliding", False)] == sliding
    if family == "gemma2":
        assert model.config.attn_logit_softcapping == 50.0
    if family in ("gpt_oss", "granite_swa"):
        sinks = [m.sinks for m in model.modules() if hasattr(m, "sinks") and isinstance(m.sinks, torch.Tensor)]
        assert len(sinks) == model.config.num_hidden_layers
    ref = arch.ref
    assert ref.sequences.shape == (2, PROMPT + NEW)
    assert all(torch.isfinite(step).all() for step in ref.logits)


def _without(model, variant: str) -> None:
    """Switch ``variant`` off in ``model`` (in place)."""
    for layer in model.model.layers:
        attn = layer.self_attn
        if variant == "softcap":
            attn.attn_logit_softcapping = None
        elif variant == "sinks":
            attn.sinks.data.fill_(-1e4)
        elif getattr(attn, "sliding_window", None):
            attn.sliding_window = 10_000
    if variant == "window":
        model.config.sliding_window = 10_000


@pytest.mark.parametrize("family, variant", [
    ("mistral", "window"), ("qwen2", "window"), ("gemma3", "window"), ("gemma2", "softcap"),
    ("gpt_oss", "sinks"), ("granite_swa", "sinks"),
])
def test_the_variant_changes_the_logits(family, variant):
    """The suite has teeth: switching the variant off moves the reference's
    logits by far more than the identity test's tolerance, so a cache that
    ignores it fails there."""
    model = _build(family)
    ids, mask = _prompts()
    ref = _generate(model, ids, mask, **cache_kwargs(model, DynamicCache(config=model.config)))
    _without(model, variant)
    out = _generate(model, ids, mask, **cache_kwargs(model, DynamicCache(config=model.config)))
    moved = max(float((a - b).abs().max()) for a, b in zip(out.logits, ref.logits))
    scale = max(1.0, max(float(b.abs().max()) for b in ref.logits))
    assert moved > 100 * 1e-4 * scale, f"{family}: without its {variant} the logits move by only {moved:.3g}"


# ------------------------------------------------------------ identity (budget >= prompt)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", _family_params())
def test_budget_above_prompt_reproduces_generate(archs, family, method):
    arch = _arch(archs, family)
    ref = arch.ref
    with kvc.compress(arch.model, REGISTRY[method](budget=1024)) as session:
        out = _generate(arch.model, arch.ids, arch.mask)
    assert session.cache is not None and len(session.cache.layers) == arch.model.config.num_hidden_layers
    diff = (out.sequences != ref.sequences).nonzero().tolist()
    assert not diff, (
        f"{family} / {method}: tokens differ from plain generate() at (row, position) {diff[:6]}; "
        f"generated (both rows) {out.sequences[:, PROMPT:].tolist()} vs {ref.sequences[:, PROMPT:].tolist()}"
    )
    for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
        scale = float(b.abs().max())
        err = float((a - b).abs().max())
        assert err <= 1e-4 * max(1.0, scale), f"{family} / {method}: step {step} logits differ by {err:.3g}"


#: query-aware readers whose read budget covers the prompt: every layer moves
#: into its reader's store (dense_layers=0), and the tokens must not change
READERS = {
    "quest": lambda: kvc.Quest(token_budget=1024, dense_layers=0),
    "tidaldecode": lambda: kvc.TidalDecode(token_budget=1024, selection_layers=(0,)),
    "magicpig": lambda: kvc.MagicPIG(window=1024, dense_layers=0),
}


@pytest.mark.parametrize("method", sorted(READERS))
@pytest.mark.parametrize("family", _family_params())
def test_readers_covering_the_prompt_reproduce_generate(archs, family, method):
    arch = _arch(archs, family)
    with kvc.compress(arch.model, READERS[method]()) as session:
        out = _generate(arch.model, arch.ids, arch.mask)
    layers = session.cache.layers
    full = [layer for layer in layers if layer.window is None]
    # sliding layers keep their uniform window; a full-attention layer moves into the reader's store
    assert all(layer.store.kind == "uniform" for layer in layers if layer.window is not None)
    assert not full or {layer.store.kind for layer in full} & {"paged", "tidal", "lsh"}, \
        f"{family} / {method}: no full-attention layer moved into the reader's store"
    diff = (out.sequences != arch.ref.sequences).nonzero().tolist()
    assert not diff, f"{family} / {method}: tokens differ from plain generate() at (row, position) {diff[:6]}"
    for step, (a, b) in enumerate(zip(out.logits, arch.ref.logits)):
        err = float((a - b).abs().max())
        assert err <= 1e-4 * max(1.0, float(b.abs().max())), f"{family} / {method}: step {step} logits differ"


def test_tidaldecode_moves_a_sliding_selection_layer_to_the_next_full_one(archs):
    """Gemma 3's layout (sliding, full, sliding, full): selection asked at
    the sliding layer 0 happens at layer 1, and layer 3 reads its choice."""
    arch = _arch(archs, "gemma3")
    method = kvc.TidalDecode(token_budget=32, selection_layers=(0,))
    with kvc.compress(arch.model, method) as session:
        _generate(arch.model, arch.ids, arch.mask)
    layers = session.cache.layers
    assert [layer.window is not None for layer in layers] == [True, False, True, False]
    assert [layer.store.kind for layer in layers] == ["uniform", "tidal", "uniform", "tidal"]
    assert (layers[1].store.role, layers[3].store.role) == ("select", "sparse")
    assert layers[3].store.sparse_steps == NEW - 1 and layers[3].store.last_read.shape[-1] == 32


MIXED = {"mikv": kvc.MiKV, "zipcache": kvc.ZipCache}


@pytest.mark.parametrize("method", sorted(MIXED))
@pytest.mark.parametrize("family", _family_params())
def test_mixed_precision_above_prompt_reproduces_generate(archs, family, method):
    """MiKV / ZipCache with a budget above the prompt demote nothing: the
    layers attend through the packed store's kernel over full-precision
    slots only, and generate plain generate()'s tokens."""
    arch = _arch(archs, family)
    ref = arch.ref
    with kvc.compress(arch.model, MIXED[method](budget=1024, high_bits=None)) as session:
        out = _generate(arch.model, arch.ids, arch.mask)
    assert all(isinstance(layer.store, PackedStore) == (layer.window is None) for layer in session.cache.layers)
    assert torch.equal(out.sequences, ref.sequences), (family, method)
    for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
        err = float((a - b).abs().max())
        assert err <= 1e-4 * max(1.0, float(b.abs().max())), f"{family} / {method}: step {step} logits differ by {err:.3g}"


PACKING = {
    "snapkv+kivi": lambda: kvc.SnapKV(budget=32) + kvc.KIVI(bits=4, group=8, residual=8),
    "ems+kivi": lambda: kvc.EMS(budget=40) + kvc.KIVI(bits=4, group=8, residual=8),
    "ems+kivi-rotated": lambda: kvc.EMS(budget=40) + kvc.KIVI(bits=2, group=8, residual=8, rotate=True),
    "snapkv+kivi-sinks": lambda: kvc.SnapKV(budget=32) + kvc.KIVI(bits=2, group=8, residual=8, sinks=4),
    # a block per head behind a merging, per-head evictor
    "ems+kivi-sinks": lambda: kvc.EMS(budget=40) + kvc.KIVI(bits=2, group=8, residual=8, sinks=4),
    # keys rounded with query-weighted error feedback, uniform and per-head
    "kivi-feedback": lambda: kvc.KIVI(bits=2, group=8, residual=8, rotate="auto", sinks=4, feedback=True),
    "ems+kivi-feedback": lambda: kvc.EMS(budget=40) + kvc.KIVI(bits=2, group=8, residual=8, feedback=True),
    # value ranges clipped where the output projection says it helps: every
    # family's projection is found (o_proj, dense, c_proj, ...), uniform and per-head
    "kivi-clip-auto": lambda: kvc.KIVI(bits=2, group=8, residual=8, sinks=4, clip_values="auto"),
    "ems+kivi-clip-auto": lambda: kvc.EMS(budget=40) + kvc.KIVI(bits=2, group=8, residual=8, clip_values="auto"),
    "mikv-rotated": lambda: kvc.MiKV(budget=32, group=8, rotate=True),
    "mikv": lambda: kvc.MiKV(budget=32, group=8),  # its selected slots at 8 bits: two packed widths
    "zipcache-fp": lambda: kvc.ZipCache(budget=32, group=8, high_bits=None),
}


@pytest.mark.parametrize("method", sorted(PACKING))
@pytest.mark.parametrize("family", _family_params())
def test_packing_methods_run_on_every_family(archs, family, method):
    """Evict-then-pack and mixed precision on every family's variant
    (softcap, sinks, windows, NoPE, fused projections): finite logits, and
    every layer packed but the sliding ones under mixed precision (which
    scores no sliding layer, so has nothing to demote there)."""
    arch = _arch(archs, family)
    with kvc.compress(arch.model, PACKING[method]()) as session:
        out = _generate(arch.model, arch.ids, arch.mask)
    assert out.sequences.shape == (2, PROMPT + NEW)
    assert all(bool(torch.isfinite(x).all()) for x in out.logits)
    mixed = method in ("mikv", "mikv-rotated", "zipcache-fp")
    for layer in session.cache.layers:
        assert isinstance(layer.store, PackedStore) == (layer.window is None or not mixed), (family, method, layer)
        rows = range(layer.store.batch)
        if "feedback" in method:
            assert all(layer.store.row_choice(b)[1] is not None for b in rows), (family, method, layer)
        if "clip" in method:
            if layer._row_choices is not None:  # row mode: every row decided, and packs as it decided
                assert all(c is not None and layer.store.row_choice(b)[2] == c[1]
                           for b, c in enumerate(layer._row_choices)), (family, method, layer)
            else:
                assert layer._clip_decided and layer.store.value_clip == layer._clip, (family, method, layer)


SLIDING = [f for f, spec in FAMILIES.items() if "sliding_window" in spec[2]]


SLIDING_PACKED = {
    "kivi": (lambda G, R: kvc.KIVI(bits=4, group=G, residual=R), WINDOW - 1),
    "kivi-rotated": (lambda G, R: kvc.KIVI(bits=2, group=G, residual=R, rotate=True), WINDOW - 1),
    # the full-attention layers keep their first 4 slots in full precision, the sliding ones none
    "kivi-sinks": (lambda G, R: kvc.KIVI(bits=2, group=G, residual=R, sinks=4), WINDOW - 1),
    # every layer, sliding ones included, rounds its keys with its own queries' weights
    "kivi-feedback": (lambda G, R: kvc.KIVI(bits=2, group=G, residual=R, feedback=True), WINDOW - 1),
    # every layer's value groups over clipped ranges: same bytes, same kernel
    "kivi-clip": (lambda G, R: kvc.KIVI(bits=2, group=G, residual=R, clip_values=True), WINDOW - 1),
    # a budget below the window: the sliding layers keep their 32 newest slots, packed
    "snapkv+kivi": (lambda G, R: kvc.SnapKV(budget=32) + kvc.KIVI(bits=4, group=G, residual=R), 32),
}


@pytest.mark.parametrize("method", sorted(SLIDING_PACKED))
@pytest.mark.parametrize("family", SLIDING)
def test_kivi_packs_sliding_windows_and_reads_them_as_the_eager_path(archs, family, method, monkeypatch):
    """A quantizer packs the sliding layers too. Each keeps the slots it
    keeps unpacked (its newest ``min(window - 1, target)``), whole packed
    groups plus the residual, holding at most ``keep + group - 1``, and its
    attention (the kernel with the slots it no longer sees masked as leading
    ones, or the eager path for softcaps and sinks) gives the logits of the
    eager path over the same dequantized slots, where ``build_mask`` applies
    the window by token position."""
    import kvcompress.stores.packed as packed_store

    arch = _arch(archs, family)
    G, R = 8, 8
    make, keep = SLIDING_PACKED[method]
    with kvc.compress(arch.model, make(G, R)) as session:
        out = _generate(arch.model, arch.ids, arch.mask)
    cfg = arch.model.config
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    window_fp32 = 2 * cfg.num_key_value_heads * (WINDOW - 1) * D * 4 * 2  # two rows
    sliding = 0
    for layer in session.cache.layers:
        s = layer.store
        assert isinstance(s, PackedStore), (family, layer)
        if layer.window is None:
            assert s.n_sinks == (4 if method == "kivi-sinks" else 0), (family, s)
            continue
        assert s.sinks == s.n_sinks == 0, (family, s)
        sliding += 1
        # per row (a batch whose rows pack apart, row mode, holds each row's own counts)
        rows = range(s.batch)
        held = s._np or [s.n_packed] * s.batch
        full = [s.r - x for x in s._rs] if s._np is not None else [s.r] * s.batch
        assert all(p > 0 and p % G == 0 and R <= f < R + G for p, f in zip(held, full)), (family, s)
        assert s.first_position + s.n == layer.seen and s.visible_from == layer.seen - keep, (family, s)
        assert s.first_position > s.visible_from - G and s.n <= keep + G - 1, (family, s, layer.seen)
        # the packed buffers stay the window's size however long the layer runs, and the bytes held
        # are theirs plus the residual's: codes, fp32 mins and scales, the fp32 residual buffer
        cap, rcap = int(s._kc.shape[2]), int(s._rk.shape[2])
        assert cap <= WINDOW + 4 * G, (family, s, cap)
        H = cfg.num_key_value_heads
        bits = 2 if s.rotation is not None or method in ("kivi-sinks", "kivi-feedback", "kivi-clip") else 4
        assert all(s.row_choice(b)[2] == (method == "kivi-clip") for b in rows), (family, s)
        assert all((s.row_choice(b)[1] is not None) == (method == "kivi-feedback") for b in rows), (family, s)
        fb = sum(s.row_choice(b)[1] is not None for b in rows) if s._choices is not None else s.feedback is not None
        packed = (2 * H * cap * (D * bits // 8 * 2 + 2 * 4 * math.ceil(D / G)) + 2 * 2 * H * (cap // G) * D * 4
                  + (D * D * 4 if s.rotation is not None else 0)  # one rotation matrix, shared by the layers
                  + H * D * (D - 1) * fb)  # feedback weights: bf16 triangles, one per row in row mode
        # in row mode, once the kernel has read it (not on the eager path: softcap), the call's per-head
        # arrays too: int64 offsets, lengths and [., 2] residual holes per head, each row's residual start
        args = 8 * 4 * s.batch * H + 8 * s.batch if s._row_args is not None else 0
        assert sum(t.untyped_storage().nbytes() for t in s.tensors()) == packed + 2 * 2 * H * rcap * D * 4 + args
        assert packed + 2 * 2 * H * rcap * D * 4 < window_fp32, (family, s)
    assert sliding == len(_sliding_layers(arch.model)) > 0
    # the same generation through the eager path over dequantized slots
    monkeypatch.setattr(packed_store, "kernel_reads", lambda query, residual: False)
    with kvc.compress(arch.model, make(G, R)):
        eager = _generate(arch.model, arch.ids, arch.mask)
    assert torch.equal(out.sequences, eager.sequences), family
    for step, (a, b) in enumerate(zip(out.logits, eager.logits)):
        err = float((a - b).abs().max())
        assert err <= 1e-4 * max(1.0, float(b.abs().max())), f"{family}: step {step} logits differ by {err:.3g}"


@pytest.mark.parametrize("family", SLIDING)
def test_packed_sliding_layers_see_what_unpacked_ones_keep(archs, family):
    """The slots a packed sliding layer lets a query see are the ones the
    same method keeps unpacked: ``SnapKV(budget=32) + KIVI(bits=8)`` (sliding
    layers keep their 32 newest slots, packed) generates what
    ``SnapKV(budget=32)`` does (sliding layers keep them in fp32), its
    logits within 8-bit rounding (measured at most 0.0075 of the largest;
    letting the packed sliding layers see their whole window instead gives
    0.26-1.4), until a near tie flips."""
    arch = _arch(archs, family)
    with kvc.compress(arch.model, kvc.SnapKV(budget=32)):
        ref = _generate(arch.model, arch.ids, arch.mask)
    with kvc.compress(arch.model, kvc.SnapKV(budget=32) + kvc.KIVI(bits=8, group=8, residual=8)) as session:
        out = _generate(arch.model, arch.ids, arch.mask)
    assert any(layer.window is not None and isinstance(layer.store, PackedStore) for layer in session.cache.layers)
    for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
        err = float((a - b).abs().max())
        assert err <= 0.03 * max(1.0, float(b.abs().max())), f"{family}: step {step} logits differ by {err:.3g}"
        if not torch.equal(a.argmax(-1), b.argmax(-1)):
            # only a near tie may flip (granite_swa, step 10: a gap of 0.001 against an error of 0.012);
            # the steps after it are fed different tokens
            top = b.topk(2, -1).values
            assert float((top[:, 0] - top[:, 1]).min()) <= 2 * err, f"{family}: step {step} picks another token"
            break


@pytest.mark.parametrize("family", SLIDING)
def test_unpacked_windows_keep_the_full_caches_slots(archs, family):
    """``KIVI(pack_windows=False)``: the full-attention layers are packed,
    and each sliding layer keeps its newest slots unpacked, at most
    ``window - 1``, their keys and values those of transformers' own cache
    for the same prompt (to float rounding: a layer's input went through
    our attention function below it, not transformers'; a 2-bit code would
    be off by a tenth of the range)."""
    from transformers import DynamicCache

    from kvcompress.compat import cache_kwargs
    from kvcompress.stores import UniformStore

    arch = _arch(archs, family)
    with kvc.compress(arch.model, kvc.KIVI(bits=2, group=8, residual=8, pack_windows=False)) as session:
        with torch.no_grad():
            cache = session.new_cache()
            arch.model(input_ids=arch.ids, attention_mask=arch.mask, use_cache=True,
                       **cache_kwargs(arch.model, cache))
    full = DynamicCache()
    with torch.no_grad():
        arch.model(input_ids=arch.ids, attention_mask=arch.mask, use_cache=True, **cache_kwargs(arch.model, full))
    sliding = 0
    for i, layer in enumerate(cache.layers):
        if layer.window is None:
            assert isinstance(layer.store, PackedStore), (family, i)
            continue
        sliding += 1
        s = layer.store
        assert type(s) is UniformStore and 0 < s.n <= layer.window - 1, (family, i, s)
        torch.testing.assert_close(s.keys, full.layers[i].keys[:, :, -s.n :], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(s.values, full.layers[i].values[:, :, -s.n :], rtol=1e-4, atol=1e-5)
    assert sliding == len(_sliding_layers(arch.model)) > 0


@pytest.mark.parametrize("family", SLIDING)
def test_windows_packed_at_a_width_of_their_own(archs, family):
    """``KIVI(bits=2, pack_windows=4)``: full-attention layers pack at 2
    bits, sliding layers at 4 (keys and values), and every packed value of
    a sliding layer is within half a 4-bit step of transformers' own value
    for the same slot (2 bits would be five times coarser); the whole
    generation runs, and the cache holds more than at 2 bits everywhere and
    less than with the windows unpacked."""
    from transformers import DynamicCache

    from kvcompress.compat import cache_kwargs

    arch = _arch(archs, family)

    def prefill(method):
        with kvc.compress(arch.model, method) as session:
            with torch.no_grad():
                cache = session.new_cache()
                arch.model(input_ids=arch.ids, attention_mask=arch.mask, use_cache=True,
                           **cache_kwargs(arch.model, cache))
        return cache

    cache = prefill(kvc.KIVI(bits=2, group=8, residual=8, pack_windows=4))
    full = DynamicCache()
    with torch.no_grad():
        arch.model(input_ids=arch.ids, attention_mask=arch.mask, use_cache=True, **cache_kwargs(arch.model, full))
    packed_windows = 0
    for i, layer in enumerate(cache.layers):
        s = layer.store
        assert isinstance(s, PackedStore), (family, i)
        if layer.window is None:
            assert (s.bits, s.value_bits) == (2, 2), (family, i)
            continue
        assert (s.bits, s.value_bits) == (4, 4), (family, i)
        if not s.n_packed:
            continue
        packed_windows += 1
        _, values = s.dequantized()
        want = full.layers[i].values[:, :, -s.n :]
        for b in range(int(want.shape[0])):
            live = slice(max(0, s.n - int(arch.mask[b].sum())), s.n_packed)  # the row's real packed slots
            v, w = values[b, :, live], want[b, :, live]
            groups = w.reshape(*w.shape[:-1], -1, 8)  # group=8 channels per value group
            half = (groups.amax(-1) - groups.amin(-1)) / 15 / 2 + 1e-4
            err = (v - w).abs().reshape(groups.shape).amax(-1)
            assert bool((err <= half).all()), (family, i, float((err - half).max()))
    assert packed_windows > 0, family
    two = prefill(kvc.KIVI(bits=2, group=8, residual=8)).memory_bytes()
    unpacked = prefill(kvc.KIVI(bits=2, group=8, residual=8, pack_windows=False)).memory_bytes()
    assert two < cache.memory_bytes() < unpacked, (two, cache.memory_bytes(), unpacked)
    with kvc.compress(arch.model, kvc.KIVI(bits=2, group=8, residual=8, pack_windows=4)):
        out = _generate(arch.model, arch.ids, arch.mask)
    assert out.sequences.shape == (2, PROMPT + NEW)


def test_pack_windows_is_checked_and_refused_where_meaningless():
    assert "pack_windows=False" in repr(kvc.KIVI(bits=2, pack_windows=False))
    assert "pack_windows=4" in repr(kvc.KIVI(bits=2, pack_windows=4))
    assert "pack_windows" not in repr(kvc.KIVI(bits=2))
    for bad in (4.0, "4", None):
        with pytest.raises(TypeError, match=f"pack_windows: expected True, False or a width of 2, 4 or 8 bits, "
                                            f"got {re.escape(repr(bad))}"):
            kvc.KIVI(pack_windows=bad)
    for bad in (0, 3, 16):
        with pytest.raises(ValueError, match=f"pack_windows: a width must be 2, 4 or 8 bits, got {bad}"):
            kvc.KIVI(pack_windows=bad)
    with pytest.raises(ValueError, match=r"keeps sliding-window layers unpacked; give KIVI\(bits=2.*without "
                                         r"pack_windows=4"):
        kvc.SnapKV(budget=64) + kvc.MiniCache() + kvc.KIVI(bits=2, pack_windows=4)
    kvc.SnapKV(budget=64) + kvc.MiniCache() + kvc.KIVI(bits=2, pack_windows=False)  # what it does anyway
    with pytest.raises(ValueError, match="pack_windows: LowBits never packs sliding-window layers"):
        kvc.methods.LowBits(bits=2, pack_windows=4)
    m = kvc.methods.method_from_spec("ems+kivi:bits=2:pack_windows=8", budget=64)
    assert m.packs_windows is True and m.window_packing == (8, 32, 128, 8) and m.packing == (2, 32, 128, 2)
    assert kvc.KIVI(bits=2).window_packing == kvc.KIVI(bits=2).packing
    with pytest.raises(ValueError, match="pack_windows: LowBits never packs sliding-window layers"):
        kvc.methods.LowBits(bits=2, pack_windows=False)
    m = kvc.methods.method_from_spec("snapkv+kivi:bits=2:pack_windows=false", budget=64)
    assert m.packs_windows is False and kvc.SnapKV(budget=64).packs_windows is True


# ------------------------------------------------------------ memory vs transformers' cache


@pytest.mark.parametrize("method", sorted(COMPRESSED))
@pytest.mark.parametrize("family", _family_params())
def test_compressed_cache_holds_no_more_than_transformers(archs, family, method):
    arch = _arch(archs, family)
    full = arch.ref_bytes
    with kvc.compress(arch.model, COMPRESSED[method]()) as session:
        out = _generate(arch.model, arch.ids, arch.mask)
    assert out.sequences.shape == (2, PROMPT + NEW)
    held = session.cache.memory_bytes()
    assert held > 0
    if not any(layer.n < min(layer.seen, layer.window or layer.seen) - 1 for layer in session.cache.layers):
        # every layer is a sliding layer whose window is below the budget:
        # nothing is compressed, and the layer holds its window plus the
        # append slack and int32 positions (slack <= window / 8)
        assert held <= 1.25 * full, (held, full)
        return
    assert held <= full, (
        f"{family} / {method}: the compressed cache holds {held:,} bytes after generation, transformers' "
        f"DynamicCache(config=...) holds {full:,}\n{session.cache.stats()}"
    )


def test_transformers_bytes_count_storages_once():
    """The yardstick: a sliding layer of transformers' cache is a view into a
    larger storage after the prefill, and that storage is what is held."""
    config = transformers.MistralConfig(**dict(_DECODER, sliding_window=WINDOW))
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config).eval()
    ids = torch.randint(3, VOCAB, (1, PROMPT))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache))
    layer = cache.layers[0]
    assert layer.keys.shape[2] == WINDOW - 1
    per_token = 2 * config.num_key_value_heads * config.head_dim * 4
    assert transformers_cache_bytes(cache) == config.num_hidden_layers * PROMPT * per_token
    assert math.prod(layer.keys.shape) * 4 * 2 * config.num_hidden_layers < transformers_cache_bytes(cache)


# ------------------------------------------------------------ refused by name


def test_bidirectional_attention_is_refused_by_name():
    """A module with ``is_causal = False`` (Gemma 3 with
    ``use_bidirectional_attention``) attends to later tokens; a cache that
    scores and evicts causally cannot serve it, so generation under
    ``compress()`` must fail and say why instead of running causal attention."""
    config = transformers.Gemma3TextConfig(**dict(_DECODER, sliding_window=WINDOW, layer_types=_SLIDING_HALF,
                                                  query_pre_attn_scalar=16, use_bidirectional_attention=True))
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config).eval()
    assert not model.model.layers[0].self_attn.is_causal
    ids, mask = _prompts()
    with kvc.compress(model, kvc.SnapKV(budget=32)):
        with pytest.raises((NotImplementedError, ValueError), match=r"(?i)causal|bidirectional"):
            _generate(model, ids, mask)


@pytest.mark.parametrize("model_type, where", [("bloom", "modeling_bloom"), ("git", "GitSelfAttention")])
def test_models_that_attend_outside_the_attention_interface_are_refused_by_name(model_type, where):
    """Bloom computes its attention itself (its modeling module never looks
    up transformers' attention interface), and so does GIT's text decoder
    (its module imports the interface for the vision tower only): each would
    attend over whatever the cache returns, which for a packed layer is not
    its keys. Before: KIVI crashed in Bloom's own attention with a shape
    error, and every method in GIT's."""
    model = _tiny_auto(model_type)
    with pytest.raises(kvc.KVCompressUnsupportedError, match=f"computes its attention itself.*{where}"):
        kvc.compress(model, kvc.KIVI(bits=4))


def test_a_layer_whose_attention_bypasses_ours_in_a_session_says_so():
    """Inside compress(), a layer whose attention never reaches the
    'kvcompress' function (here the model is switched back to SDPA behind
    the session's back) cannot give a query-scored method its queries; the
    refusal names the layer instead of telling the user to run inside
    compress(), where they are."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_DECODER)).eval()
    ids, mask = _prompts()
    with kvc.compress(model, kvc.SnapKV(budget=32)):
        model.set_attn_implementation("sdpa")
        with pytest.raises(kvc.KVCompressUnsupportedError, match="layer 0's attention never reached"):
            _generate(model, ids, mask)


def _jetmoe():
    return transformers.JetMoeForCausalLM(transformers.JetMoeConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        kv_channels=16, intermediate_size=128, num_local_experts=2, num_experts_per_tok=2, pad_token_id=PAD))


def _deepseek_v3():
    return transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**dict(
        _DECODER, head_dim=8, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=2, num_experts_per_tok=1, n_shared_experts=1,
        moe_intermediate_size=64, first_k_dense_replace=4, n_group=1, topk_group=1)))


@pytest.mark.parametrize("build", [_jetmoe, _deepseek_v3], ids=["jetmoe", "deepseek_v3"])
def test_keys_changed_between_cache_and_attention_are_refused_for_query_methods(build):
    """JetMoE repeats the keys the cache returns per expert before its
    attention call; DeepSeek-V3 caches its latent KV and expands it to keys
    and values after the cache. Either way the attention function cannot
    match the keys to the cache and never sees a compressed layer's
    queries: a method that needs them is refused, naming the layer (it used
    to say "run generation inside compress()", which it was); a query-free
    method still runs."""
    torch.manual_seed(0)
    model = build().float().eval()
    if build is _deepseek_v3:
        import inspect

        if "expand_kv" not in inspect.getsource(type(model.model.layers[0].self_attn).forward):
            pytest.skip(f"transformers {transformers.__version__} caches DeepSeek-V3's full keys, not its latents")
    ids, mask = _prompts()
    with kvc.compress(model, kvc.SnapKV(budget=32)):
        with pytest.raises(kvc.KVCompressUnsupportedError, match="layer 0's attention received keys other"):
            _generate(model, ids, mask)
    with kvc.compress(model, kvc.StreamingLLM(budget=32)) as session:
        _generate(model, ids, mask)
    assert all(layer.n <= 32 + NEW for layer in session.cache.layers)


def _tiny_auto(model_type, **extra):
    return tiny_auto(model_type, **dict(_DECODER, **extra))


@pytest.mark.slow
def test_the_cache_counts_the_text_decoders_layers():
    """MOSS-Transcribe-Diarize's top config counts other layers than its text
    decoder has: the session's cache takes the decoder's count, so every
    attention layer is accepted (it refused layer 4 of "4 layers") and
    nothing evicted gives generate()'s tokens."""
    model = _tiny_auto("moss_transcribe_diarize")
    ids, mask = _prompts()
    ref = _generate(model, ids, mask)
    with kvc.compress(model, kvc.SnapKV(budget=PROMPT + NEW)):
        out = _generate(model, ids, mask)
    assert torch.equal(out.sequences, ref.sequences)


def test_kv_shared_layers_are_refused_by_name():
    """Gemma 3n's last layers attend over the keys and values an earlier
    layer's cache.update returned. KIVI gave other tokens than generate()
    with nothing packed (a packed layer returns the new chunk), and a
    compressed layer's kept slots would be masked as the last positions."""
    model = _tiny_auto("gemma3n_text", num_hidden_layers=6, vocab_size_per_layer_input=VOCAB,
                       hidden_size_per_layer_input=16, num_kv_shared_layers=2,
                       layer_types=["sliding_attention", "full_attention"] * 3, sliding_window=16, laurel_rank=8,
                       altup_num_inputs=2, activation_sparsity_pattern=[0.0] * 6)
    with pytest.raises(kvc.KVCompressUnsupportedError, match=r"layers \[4, 5\] reuse another layer's keys"):
        kvc.compress(model, kvc.KIVI(bits=4))


def test_values_changed_between_cache_and_attention_are_refused_by_name():
    """DiffLlama's differential attention attends twice, over two halves of
    the values the cache returned: a compressed layer attends over the
    values it holds, so it gave the wrong output even with nothing evicted
    (generate()'s tokens differed); now every method is refused by name at
    the first attention call."""
    model = _tiny_auto("diffllama")
    ids, mask = _prompts()
    for method in (kvc.SnapKV(budget=PROMPT + NEW), kvc.StreamingLLM(budget=PROMPT + NEW), kvc.KIVI(bits=4)):
        # (transformers 5.0's DiffLlama attends by itself: refused when the session starts)
        with pytest.raises(kvc.KVCompressUnsupportedError,
                           match="layer 0's attention received values other|computes its attention itself"):
            with kvc.compress(model, method):
                _generate(model, ids, mask)


def test_per_head_dynamic_masks_are_refused_by_name():
    """Doge turns the mask into one of each head's own, computed from the
    values; kvcompress passes only the padding mask (Doge failed with an
    IndexError inside its own mask code)."""
    model = _tiny_auto("doge")
    with pytest.raises(kvc.KVCompressUnsupportedError, match="DogeForCausalLM builds a dynamic attention mask"):
        kvc.compress(model, kvc.SnapKV(budget=32))


def test_models_with_a_cache_of_their_own_kind_are_refused_by_name():
    """MiniMax keeps a linear-attention cache class of its own
    (``_supports_default_dynamic_cache()`` is False): transformers refused
    our cache mid-generate; compress() now refuses the model by name."""
    model = _tiny_auto("minimax")
    with pytest.raises(kvc.KVCompressUnsupportedError, match="MiniMax.*cache of its own kind"):
        kvc.compress(model, kvc.SnapKV(budget=32))


def test_values_wider_than_keys_evict_but_refuse_packing():
    """MiMo-V2-Flash hands the cache values of ``v_head_dim`` channels beside
    keys of ``head_dim``: eviction above the prompt reproduces generate();
    packing (whose kernel reads one head dim) is refused by name before the
    layer changes. Before, KIVI crashed in torch.cat on such a model."""
    model = _tiny_auto("mimo_v2_flash", v_head_dim=24)
    ids, mask = _prompts()
    ref = _generate(model, ids, mask)
    with kvc.compress(model, kvc.SnapKV(budget=PROMPT + NEW)):
        out = _generate(model, ids, mask)
    assert torch.equal(out.sequences, ref.sequences)
    for method in (kvc.KIVI(bits=4), kvc.SnapKV(budget=32) + kvc.KIVI(bits=4)):
        with kvc.compress(model, method) as session:
            with pytest.raises(kvc.KVCompressUnsupportedError, match="value_states.*24 channels.*16"):
                _generate(model, ids, mask)
        assert all(layer.seen == 0 for layer in session.cache.layers)


@pytest.mark.parametrize("kwarg", ["position_bias", "indices"])
def test_unsupported_attention_kwargs_are_refused_by_name(kwarg):
    """transformers hands variant-specific tensors to the attention function
    as keyword arguments (T5-style ``position_bias``, DeepSeek sparse
    ``indices``); the "kvcompress" attention must refuse one it does not
    implement, naming it, rather than drop it silently."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_DECODER)).eval()
    kvc.enable(model)
    attention = ALL_ATTENTION_FUNCTIONS[kvc.hf.ATTN_NAME]
    module = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 8, 16)
    k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    extra = torch.zeros(1, 4, 8, 8) if kwarg == "position_bias" else torch.zeros(1, 8, 4, dtype=torch.long)
    with pytest.raises((NotImplementedError, ValueError, TypeError), match=kwarg):
        attention(module, q, k, v, None, dropout=0.0, scaling=0.25, **{kwarg: extra})


def test_stats_compare_with_what_transformers_holds_on_sliding_layers():
    """stats().full_bytes is what DynamicCache holds once decoding has
    started: the last `window` tokens of a sliding layer, not every token."""
    config = transformers.MistralConfig(**dict(_DECODER, sliding_window=WINDOW))
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config).eval()
    ids = torch.randint(3, VOCAB, (1, PROMPT))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
              do_sample=False, pad_token_id=0)
    ref = DynamicCache(config=model.config)
    model.generate(**kw, **cache_kwargs(model, ref))
    with kvc.compress(model, kvc.SnapKV(ratio=0.5)) as session:
        model.generate(**kw)
    stats = session.cache.stats()
    assert stats.full_bytes == transformers_cache_bytes(ref)
    assert stats.compression == pytest.approx(stats.full_bytes / session.cache.memory_bytes())


@pytest.mark.parametrize("family", _family_params())
def test_minicache_full_retention_reproduces_generate_and_skips_sliding_pairs(archs, family):
    """MiniCache(start_layer=0, retain=1) pairs layers (0, 1) and (2, 3) and
    keeps every token whole, so the tokens are plain generate()'s; a pair
    with a sliding-window layer is never merged (both layers stay uniform)."""
    arch = _arch(archs, family)
    with kvc.compress(arch.model, kvc.MiniCache(start_layer=0, retain=1.0)) as session:
        out = _generate(arch.model, arch.ids, arch.mask)
    layers = session.cache.layers
    sliding = set(_sliding_layers(arch.model))
    for a in (0, 2):
        paired = a not in sliding and a + 1 not in sliding
        kinds = {layers[a].store.kind, layers[a + 1].store.kind}
        assert kinds == ({"minicache"} if paired else {"uniform"}), (family, a, kinds)
    diff = (out.sequences != arch.ref.sequences).nonzero().tolist()
    assert not diff, f"{family} / minicache: tokens differ from plain generate() at (row, position) {diff[:6]}"
    for step, (a, b) in enumerate(zip(out.logits, arch.ref.logits)):
        err = float((a - b).abs().max())
        assert err <= 1e-4 * max(1.0, float(b.abs().max())), f"{family} / minicache: step {step} logits differ"


@pytest.mark.parametrize("family", _family_params())
def test_kvsharer_plan_matches_a_reference_cache(archs, family):
    """KVSharer(plan=3>1): layer 3 attends over layer 1's cache, as in
    transformers' own cache whose layer-3 update hands back layer 1's
    tensors; where either layer slides nothing is shared (plain generate())."""
    from test_kvsharer import ShareRef

    arch = _arch(archs, family)
    with kvc.compress(arch.model, kvc.KVSharer(plan={3: 1})) as session:
        out = _generate(arch.model, arch.ids, arch.mask)
    sliding = set(_sliding_layers(arch.model))
    shared = not ({1, 3} & sliding)
    assert session.cache.layers[3].store.kind == ("shared" if shared else "uniform")
    if shared:
        ref = _generate(arch.model, arch.ids, arch.mask,
                        **cache_kwargs(arch.model, ShareRef({3: 1}, config=arch.model.config)))
    else:
        ref = arch.ref
    diff = (out.sequences != ref.sequences).nonzero().tolist()
    assert not diff, f"{family} / kvsharer: tokens differ from the reference at (row, position) {diff[:6]}"
    for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
        err = float((a - b).abs().max())
        assert err <= 1e-4 * max(1.0, float(b.abs().max())), f"{family} / kvsharer: step {step} logits differ"


# ------------------------------------------------- rows of other targets beside sliding layers

ROW_RATIOS = {
    "snapkv": lambda: kvc.SnapKV(ratio=0.5),
    "snapkv+kivi": lambda: kvc.SnapKV(ratio=0.5) + kvc.KIVI(bits=4, group=8, residual=8),
    "mikv": lambda: kvc.MiKV(ratio=0.6, bits=2, group=16),
}


@pytest.mark.parametrize("method", sorted(ROW_RATIOS))
@pytest.mark.parametrize("family", ["gemma2", "mistral"])
def test_rows_of_other_ratios_generate_as_alone(family, method):
    """``ratio=`` over left-padded rows of 90, 61, 120 and 30 tokens: each
    row's sliding layers keep its own ``min(window - 1, target)`` newest
    slots and its full layers its own selection, so every row generates
    the tokens it generates alone, logits within float rounding (a decode
    step's GEMM over four rows against its GEMV over one). Gemma 2 reads
    the compressed layers on the eager path (softcap); Mistral's every
    layer slides. All six cases fail on the build before (582ddb7): a
    sliding layer kept the most any row keeps, and mixed precision promoted
    a short row's slots to the longest row's count."""
    from generation import greedy, random_ids

    model = _build(family)
    lengths = [90, 61, 120, 30]
    rows = [random_ids(n, 100 + i, high=VOCAB) for i, n in enumerate(lengths)]
    T = max(lengths)
    ids = torch.full((len(rows), T), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    kw = dict(n=12, output_logits=True, return_dict_in_generate=True)
    out, _ = greedy(model, ids, mask, method=ROW_RATIOS[method](), **kw)
    for i, r in enumerate(rows):
        alone, _ = greedy(model, r[None], method=ROW_RATIOS[method](), **kw)
        assert torch.equal(out.sequences[i, T:], alone.sequences[0, len(r):]), (family, method, i)
        for step, (a, b) in enumerate(zip(out.logits, alone.logits)):
            err = float((a[i] - b[0]).abs().max())
            assert err <= 1e-4 * max(1.0, float(b[0].abs().max())), (family, method, i, step, err)
