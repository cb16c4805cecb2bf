"""KIVI: the packed store against float64 references, and generation."""

from __future__ import annotations

import math

import pytest
import torch

import kvcompress as kvc
from kvcompress import testing as T
from kvcompress.methods import KIVI, method_from_spec
from kvcompress.stores import AttentionSpec, PackedStore
from kvcompress.stores import packed as packed_store
from kvcompress.stores.masked import build_mask, masked_attention


def test_kivi_options():
    assert KIVI().packing == (4, 32, 128, 4)
    assert method_from_spec("kivi:bits=2:group=16").packing == (2, 16, 128, 2)
    assert repr(KIVI(bits=2)) == KIVI(bits=2).describe() == "KIVI(bits=2, group=32, residual=128)"
    with pytest.raises(ValueError, match="bits: must be 2, 4 or 8"):
        KIVI(bits=3)
    with pytest.raises(ValueError, match="evicts nothing"):
        KIVI(ratio=0.5)
    with pytest.raises(ValueError, match="evicts nothing"):
        KIVI(budget=64)
    with pytest.raises(ValueError, match="group"):
        KIVI(group=0)
    with pytest.raises(TypeError, match="residual"):
        KIVI(residual=1.5)
    k42 = KIVI(bits=4, value_bits=2)
    assert k42.packing == (4, 32, 128, 2) and repr(k42) == "KIVI(bits=4, value_bits=2, group=32, residual=128)"
    assert method_from_spec("kivi:bits=4:value_bits=2") == k42
    with pytest.raises(ValueError, match="value_bits: must be None"):
        KIVI(value_bits=3)
    with pytest.raises(TypeError, match="value_bits"):
        KIVI(value_bits=2.0)
    with pytest.raises(ValueError, match="value_bits"):
        kvc.MiniCache() + KIVI(bits=4, value_bits=2)
    # a quantizer keeps every token: no rounds of its own, and none behind a cross-layer method
    with pytest.raises(ValueError, match="interval: KIVI evicts nothing"):
        KIVI(bits=2, interval=3)
    with pytest.raises(ValueError, match="interval: LowBits"):
        kvc.SnapKV(ratio=0.5) + kvc.LowBits(bits=2, interval=0)
    assert (kvc.EMS(ratio=0.5, interval=64) + KIVI(bits=2)).interval == 64
    for cross in (kvc.MiniCache(), kvc.EMS(ratio=0.5) + kvc.MiniCache(), kvc.KVSharer(plan={3: 1}),
                  kvc.EMS(ratio=0.5) + kvc.KVSharer(plan={3: 1})):
        with pytest.raises(ValueError, match="keep_rows: .* no layer has any"):
            cross + KIVI(bits=2, keep_rows=3)


def _group_bound(x: torch.Tensor, bits: int, group: int, per_channel: bool) -> torch.Tensor:
    """Per-element bound (max - min) / (2^bits - 1) / 2 of the element's group, float64."""
    x = x.double()
    B, H, n, D = x.shape
    bound = torch.empty_like(x)
    if per_channel:  # keys: groups of `group` tokens, per channel
        for t0 in range(0, n, group):
            seg = x[:, :, t0 : t0 + group]
            bound[:, :, t0 : t0 + group] = ((seg.amax(2, keepdim=True) - seg.amin(2, keepdim=True)) / 2).expand_as(seg)
    else:  # values: groups of `group` channels, per token
        for c0 in range(0, D, group):
            seg = x[..., c0 : c0 + group]
            bound[..., c0 : c0 + group] = ((seg.amax(-1, keepdim=True) - seg.amin(-1, keepdim=True)) / 2).expand_as(seg)
    return bound / (2**bits - 1)


def check_float64(store, q, kv_start, dtype):
    """``store.attend(q)`` within twice torch's own error (doing this
    attention in ``dtype`` on the same dequantized slots) of float64
    attention over the store's dequantized slots; returns them ``(k, v)``."""
    spec = AttentionSpec(scaling=q.shape[-1] ** -0.5)
    out = store.attend(q, spec, kv_start=kv_start)
    k, v = store.dequantized()
    ref = _attention64(q, k, v, spec.scaling, kv_start)
    mask = build_mask(int(q.shape[0]), int(q.shape[2]), k.shape[2], "cpu", kv_start=kv_start)
    torch_err = (masked_attention(q, k.to(dtype), v.to(dtype), spec, mask).double() - ref).abs().max().item()
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 * torch_err + (1e-6 if dtype == torch.float32 else 1e-2), (q.shape, kv_start, err, torch_err)
    return k, v


def _attention64(q, k, v, scaling, kv_start=None, softcap=None):
    """float64 softmax attention of the last q slots (causal), GQA; [B, q, Hq, D]."""
    B, Hq, nq, D = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    g = Hq // Hkv
    k = k.double().repeat_interleave(g, 1)
    v = v.double().repeat_interleave(g, 1)
    logits = torch.einsum("bhqd,bhnd->bhqn", q.double(), k) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    j = torch.arange(n)
    mask = j[None, :] <= (torch.arange(nq) + n - nq)[:, None]
    mask = mask[None, None].expand(B, Hq, nq, n).clone()
    if kv_start is not None:
        mask &= (j[None, :] >= kv_start[:, None])[:, None, None, :]
    logits = logits.masked_fill(~mask, -math.inf)
    return torch.einsum("bhqn,bhnd->bqhd", torch.softmax(logits, -1), v)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("D, group", [(24, 32), (20, 8), (16, 5)])
def test_store_packs_whole_groups_within_the_bound(bits, D, group):
    torch.manual_seed(bits * 100 + D)
    B, H, n, R = 2, 2, 150, 40
    keys = torch.randn(B, H, n, D) * torch.linspace(0.1, 4, D)  # channel outliers, as KIVI assumes
    values = torch.randn(B, H, n, D)
    store = PackedStore(bits, group, R)
    store.append(keys, values, 0)
    assert store.n_packed == 0 and store.r == n  # nothing packed before the attention ran
    store.settle()
    m = (n - R) // group * group
    assert store.n_packed == m and store.r == n - m and R <= store.r < R + group
    k, v = store.dequantized()
    assert k.shape == keys.shape and v.shape == values.shape
    # the residual is kept exactly, the packed slots within half a step of their group
    assert torch.equal(k[:, :, m:], keys[:, :, m:]) and torch.equal(v[:, :, m:], values[:, :, m:])
    eps = 1e-5
    kb = _group_bound(keys[:, :, :m], bits, group, per_channel=True)
    vb = _group_bound(values[:, :, :m], bits, group, per_channel=False)
    assert bool(((k[:, :, :m].double() - keys[:, :, :m].double()).abs() <= kb * (1 + eps) + eps).all())
    assert bool(((v[:, :, :m].double() - values[:, :, :m].double()).abs() <= vb * (1 + eps) + eps).all())
    # decode steps: the residual fills to R + group, then one more group is packed
    for step in range(group + 1):
        store.append(torch.randn(B, H, 1, D), torch.randn(B, H, 1, D), n + step)
        store.settle()
        assert R <= store.r < R + group and store.n == n + step + 1
    assert store.n_packed == m + group * ((n - m + group + 1 - R) // group)


@pytest.mark.parametrize("value_bits", [None, 2, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_attention_equals_float64_over_the_dequantized_slots(dtype, value_bits):
    torch.manual_seed(1)
    B, Hkv, Hq, n, D = 2, 2, 6, 130, 32
    store = PackedStore(4, 16, 32, value_bits)
    values = torch.randn(B, Hkv, n, D).to(dtype)
    store.append(torch.randn(B, Hkv, n, D).to(dtype), values, 0)
    store._orig_values = values
    store.settle()
    store.append(torch.randn(B, Hkv, 1, D).to(dtype), torch.randn(B, Hkv, 1, D).to(dtype), n)
    q = torch.randn(B, Hq, 1, D).to(dtype)
    kv_start = torch.tensor([0, 7])
    spec = AttentionSpec(scaling=D**-0.5)
    out = store.attend(q, spec, kv_start=kv_start)
    k, v = store.dequantized()
    if value_bits is not None:
        # the values were packed at their own width: within that width's bound
        m = store.n_packed
        assert store._vc.shape[-1] == math.ceil(D * value_bits / 8)
        raw = store._orig_values[:, :, :m].double()
        assert ((v[:, :, :m].double() - raw).abs() <= _group_bound(raw, value_bits, 16, False) * (1 + 1e-5)
                + (1e-6 if dtype == torch.float32 else 1e-2)).all()
    ref = _attention64(q, k, v, spec.scaling, kv_start)
    # torch's own error doing this attention in this dtype, on the same dequantized slots
    mask = build_mask(B, 1, k.shape[2], "cpu", kv_start=kv_start)
    torch_err = (masked_attention(q, k.to(dtype), v.to(dtype), spec, mask).double() - ref).abs().max().item()
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 * torch_err + (1e-6 if dtype == torch.float32 else 1e-2)
    # options the packed kernel lacks (softcap) go through the eager path on the same slots
    capped = store.attend(q, AttentionSpec(scaling=D**-0.5, softcap=5.0), kv_start=kv_start)
    ref_capped = _attention64(q, k, v, spec.scaling, kv_start, softcap=5.0)
    assert (capped.double() - ref_capped).abs().max().item() < (1e-5 if dtype == torch.float32 else 2e-2)
    assert (ref_capped - ref).abs().max().item() > 1e-3  # the cap does change this attention


@pytest.mark.parametrize("bits,value_bits,sinks", [(2, None, 0), (4, 2, 0), (2, None, 4)])
def test_bytes_held_match_the_formula(tiny_lm, bits, value_bits, sinks):
    model, tok, _ = tiny_lm
    ids = torch.randint(5, 250, (1, 300))
    method = KIVI(bits=bits, group=16, residual=32, value_bits=value_bits, sinks=sinks)
    vbits = bits if value_bits is None else value_bits
    with T.method_context(model, method) as new:
        cache = new()
        T.greedy(model, cache, ids, 1)
    cfg = model.config
    H, D = cfg.num_key_value_heads, cfg.head_dim
    for layer in cache.layers:
        s = layer.store
        assert isinstance(s, PackedStore)
        m = (300 - sinks - 32) // 16 * 16
        assert s.n_packed == m and s.n_sinks == sinks
        codes = H * m * (math.ceil(D * bits / 8) + math.ceil(D * vbits / 8))
        packed = codes + 2 * H * (m // 16) * D * 4 + 2 * H * m * math.ceil(D / 16) * 4
        # the residual buffer after the prefill: the sink block (in full precision), then R + G slots
        residual = 2 * H * (sinks + 32 + 16) * D * 4
        assert sum(t.untyped_storage().nbytes() for t in s.tensors()) == packed + residual
    full = 2 * cfg.num_hidden_layers * H * 300 * D * 4
    assert cache.memory_bytes() < full / 2


def test_decoding_allocates_at_most_an_eighth_more_than_it_packed(tiny_lm):
    """Packed buffers grow by an eighth (at least 4 groups) when decoding
    packs past them, not by half: the bytes held track the bytes in use."""
    model, tok, _ = tiny_lm
    ids = torch.randint(5, 250, (1, 600))
    with T.method_context(model, KIVI(bits=4, group=16, residual=32)) as new:
        cache = new()
        T.greedy(model, cache, ids, 240)
    for layer in cache.layers:
        s = layer.store
        cap = int(s._kc.shape[2])
        assert s.n_packed > 600 - 48 + 160  # decoding packed at least 10 more groups
        assert s.n_packed <= cap <= s.n_packed + max(4 * 16, s.n_packed // 8) + 16


@pytest.mark.parametrize("options", [dict(residual=10**6), dict(group=4096), dict(residual=10**6, group=4096)],
                         ids=["residual", "group", "both"])
def test_a_residual_or_group_longer_than_the_run_allocates_only_what_it_holds(tiny_model, options):
    """Nothing is packed before the residual holds residual + group slots,
    so such a run is plain generate(); and its store holds what the default
    one holds on the same short run, not residual + group rows per head (a
    group of a million tokens once reserved 512 MB for 60 tokens)."""
    ids = torch.randint(3, 512, (2, 50), generator=torch.Generator().manual_seed(0))
    plain = tiny_model.generate(ids, max_new_tokens=10, do_sample=False)
    held = {}
    for name, method in (("default", KIVI(bits=2)), ("long", KIVI(bits=2, **options))):
        with kvc.compress(tiny_model, method) as session:
            out = tiny_model.generate(ids, max_new_tokens=10, do_sample=False)
        assert torch.equal(out, plain)
        assert all(layer.store.n_packed == 0 for layer in session.cache.layers)
        held[name] = session.cache.memory_bytes()
    assert held["long"] == held["default"]
    # a per-head layer pads each head to whole groups: bounded by the largest group taken
    with pytest.raises(ValueError, match="group: must be <= 4096"):
        KIVI(group=4097)
    with kvc.compress(tiny_model, kvc.EMS(budget=24) + KIVI(bits=2, **options)) as session:
        tiny_model.generate(ids, max_new_tokens=10, do_sample=False)
    assert all(layer.store.kind == "ragged-packed" for layer in session.cache.layers)
    rows = sum(int(layer.store._rk.shape[2]) for layer in session.cache.layers)
    assert rows <= len(session.cache.layers) * (60 + packed_store.RESIDUAL_ROOM)


def test_more_bits_track_the_full_cache_closer(tiny_lm):
    """Teacher-forced KL to the full cache falls with the bit width; 8 bits is
    close to lossless and residual >= prompt is the full cache exactly."""
    model, tok, _ = tiny_lm
    torch.manual_seed(3)
    ids = torch.randint(5, 250, (1, 200))
    with T.method_context(model, None) as new:
        tokens, full = T.greedy(model, new(), ids, 13, keep_logits=True)
    kls = {}
    for bits in (2, 4, 8):
        with T.method_context(model, KIVI(bits=bits, group=8, residual=16)) as new:
            _, logits = T.greedy(model, new(), ids, 13, force=tokens, keep_logits=True)
        p = torch.log_softmax(full.double(), -1)
        kls[bits] = float((p.exp() * (p - torch.log_softmax(logits.double(), -1))).sum(-1).mean())
    assert kls[8] < kls[4] < kls[2] and kls[8] < 1e-3, kls
    # value_bits: equal to bits changes no bit; 2-bit values under 8-bit keys cost what 2-bit values cost
    # (on this random model the values dominate: 2-bit keys add almost nothing to 2-bit values)
    logit = {}
    for vb in (None, 4, 2):
        with T.method_context(model, KIVI(bits=8 if vb == 2 else 4, value_bits=vb, group=8, residual=16)) as new:
            _, logit[vb] = T.greedy(model, new(), ids, 13, force=tokens, keep_logits=True)
    assert torch.equal(logit[4], logit[None])
    kl82 = float((p.exp() * (p - torch.log_softmax(logit[2].double(), -1))).sum(-1).mean())
    assert kls[4] < kl82 and abs(kl82 - kls[2]) < 0.2 * kls[2], (kl82, kls)
    with T.method_context(model, KIVI(bits=2, residual=256)) as new:
        exact, logits = T.greedy(model, new(), ids, 13, keep_logits=True)
    assert exact == tokens and torch.allclose(logits, full, atol=1e-5, rtol=1e-5)


def test_padding_content_does_not_matter(tiny_lm):
    """A left-padded row's generation does not depend on what sits in its
    padded slots (they are masked and never widen a group's range)."""
    model, tok, _ = tiny_lm
    torch.manual_seed(4)
    long = torch.randint(5, 250, (1, 120))
    short = torch.randint(5, 250, (1, 90))
    outs = []
    for pad_id in (0, 200):
        ids = torch.cat([long, torch.cat([torch.full((1, 30), pad_id), short], 1)])
        mask = torch.ones_like(ids)
        mask[1, :30] = 0
        with kvc.compress(model, KIVI(bits=4, group=8, residual=16)):
            out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                 pad_token_id=tok.eos_token_id, output_logits=True, return_dict_in_generate=True)
        outs.append(torch.stack(out.logits))
    # bit for bit: the padded slots' content reaches nothing
    assert torch.equal(outs[0], outs[1])


def test_eval_and_suite_run_kivi_once(tiny_lm, tmp_path):
    """A method that keeps every token is one row, whatever the budgets or
    ratios, in both evaluations; its bytes are below the full cache's."""
    import json

    from kvcompress import cli, suite

    model, tok, folder = tiny_lm
    out = tmp_path / "eval"
    args = ["eval", "--model", str(folder), "--methods", "kivi:bits=4:group=8:residual=16,snapkv:window=8",
            "--budgets", "16,32", "--tasks", "ppl", "--ppl-context", "96", "--ppl-tokens", "8", "--ppl-windows", "1",
            "--no-progress", "--out", str(out)]
    assert cli.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    # only rows without a budget (levels, no curve) still plot, on every scale
    from kvcompress.plots import plot_scores

    results["config"]["tasks"] = ["fidelity", "ppl"]
    for r in rows:
        r["fidelity"] = dict(kl=0.0 if r["method"] == "full" else 1e-3, top1=1.0)
    assert plot_scores(dict(results, rows=rows[:2]), tmp_path / "levels.png").exists()
    # thirty methods (the default list): the legend goes beside the panels, without a warning
    # (inside the first panel it squeezed the axes to nothing: constrained_layout warned)
    import warnings

    many = [rows[0]] + [dict(r, method=f"{r['method']}#{i}") for i in range(15) for r in rows[2:]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot_scores(dict(results, rows=many), tmp_path / "many.png").exists()
    assert [(r["method"], r["budget"]) for r in rows] == [
        ("full", None), ("kivi:bits=4:group=8:residual=16", None), ("snapkv:window=8", 16), ("snapkv:window=8", 32)]
    cfg = suite.SuiteConfig(methods=["kivi:group=8:residual=16", "tova"], ratios=[0.5, 0.9], tasks=["niah_single"],
                            lengths=[200], cases=1, split="dev")
    res = suite.run_suite(model, tok, cfg, progress=False)
    assert [(r["method"], r["ratio"]) for r in res["rows"]] == [
        ("full", None), ("kivi:group=8:residual=16", None), ("tova", 0.5), ("tova", 0.9)]
    assert res["rows"][1]["bytes"] < res["rows"][0]["bytes"]
    suite.plot(res, tmp_path / "suite.png")  # a row without a ratio is drawn as a level


@pytest.mark.parametrize("keep", [None, 37])
def test_sliding_store_drops_whole_groups_and_masks_the_rest(keep):
    """A sliding window over a packed store, step by step: whole key groups
    leave once no later query sees them (the rest of the buffer moves, bit for
    bit), and one query's attention masks the slots of the oldest group that
    its window no longer sees: float64 attention over the dequantized slots
    the window sees, within 2x torch's own fp32 error. With ``keep`` the
    layer keeps only its newest ``keep`` slots (a budget under the window):
    ``visible_from`` hides the older ones as well."""
    torch.manual_seed(7)
    B, Hkv, Hq, D, G, R, W = 2, 2, 4, 32, 8, 16, 60
    K = W - 1 if keep is None else keep
    store = PackedStore(4, G, R)
    n0 = 100
    store.append(torch.randn(B, Hkv, n0, D), torch.randn(B, Hkv, n0, D), 0)
    store.settle()
    kv_start = torch.tensor([0, 5])  # row 1's five leading slots are padding, until the window passes them
    seen, dropped_any = n0, False
    store.visible_from = seen - 1 - K  # the prompt's last query sees the K slots before it
    for step in range(3 * G + 3):
        if step:
            store.append(torch.randn(B, Hkv, 1, D), torch.randn(B, Hkv, 1, D), seen)
            seen += 1
        assert store.first_position + store.n == seen
        q = torch.randn(B, Hq, 1, D)
        query_pos = torch.full((B, 1), seen - 1)
        spec = AttentionSpec(scaling=D**-0.5, window=W)
        out = store.attend(q, spec, kv_start=kv_start, query_pos=query_pos)
        k, v = store.dequantized()
        pos = torch.arange(store.first_position, seen)
        # the window sees positions seen - W .. seen - 1; the kept slots, the K before the query
        start = torch.maximum(kv_start, ((pos < seen - W) | (pos < seen - 1 - K)).sum().expand(B))
        ref = _attention64(q, k, v, spec.scaling, start)
        mask = build_mask(B, 1, store.n, "cpu", kv_start=start)
        torch_err = (masked_attention(q, k, v, spec, mask).double() - ref).abs().max().item()
        assert (out.double() - ref).abs().max().item() <= 2 * torch_err + 1e-6, step
        if int(start.min()) > 0:
            # the masked slots matter: attending to them too changes the result
            assert (_attention64(q, k, v, spec.scaling, kv_start) - ref).abs().max().item() > 1e-4
        store.settle()
        before = store.dequantized()
        first = store.first_position
        store.visible_from = seen - K  # what the layer sets after each step (CompressedLayer.after_attention)
        m = store.drop_unseen(seen - K)
        assert m % G == 0 and store.first_position == first + m
        # the oldest group still holds a slot the next query sees
        assert store.first_position > seen - K - G and store.n <= K + G - 1
        after = store.dequantized()
        assert torch.equal(after[0], before[0][:, :, m:]) and torch.equal(after[1], before[1][:, :, m:])
        if m:
            dropped_any = True
            kv_start = (kv_start - m).clamp(min=0)
    assert dropped_any
