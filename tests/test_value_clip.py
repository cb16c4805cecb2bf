"""Clipped value ranges: ``ops.pack_values(clip=True)`` against a NumPy
reference written here from its contract (the 45 candidate ranges, the
float32 steps, the squared error summed in index order), bit for bit, and the
properties the choice must have (never worse than min/max per group, a
constant group exact, any thread count the same bits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvcompress import ops
from kvcompress.errors import KVCompressValueError

from test_quant import f32, randn, same_bits

STEPS, MOST = 8, np.float32(0.4)


def _codes(x, mn, sc, L):
    """kvc_quant_code over [N, g] with per-row (min, scale) [N, 1], float32."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        q = np.rint((x - mn) / sc).astype(np.float32)
    q = np.where(np.isnan(q), np.float32(0), np.clip(q, 0, L))
    return np.where(sc > 0, q, 0).astype(np.float32)


def _deq(mn, sc, code):
    return (mn.astype(np.float64) + sc.astype(np.float64) * code.astype(np.float64)).astype(np.float32)


def _criterion(x, lo, sc, L):
    """Per row: t = (x - lo) * (1 / scale) in float32, r = t - clamp(rint(t)),
    r^2 exact in float64 into lane i % 8 in index order (accumulate, not a
    pairwise sum), the lanes summed in order, times scale^2."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        inv = (np.float32(1) / sc).astype(np.float32)
        t = ((x - lo).astype(np.float32) * inv).astype(np.float32)
        c = np.rint(t).astype(np.float32)
        c = np.where(c > L, L, c)
        c = np.where(c >= 0, c, np.float32(0)).astype(np.float32)
        r = (t - c).astype(np.float32).astype(np.float64)
    sq = r * r
    s = np.zeros((x.shape[0], 1))
    for j in range(8):
        lane = sq[:, j::8]
        if lane.shape[1]:
            s = s + np.add.accumulate(lane, axis=1)[:, -1:]
    with np.errstate(invalid="ignore", over="ignore"):
        return s * (sc.astype(np.float64) * sc.astype(np.float64))


def ref_clip_groups(x, bits):
    """(min, scale) [N, 1] of the clipped range of every row of x [N, g] float32."""
    L = np.float32(2**bits - 1)
    mn0, mx = x.min(1, keepdims=True), x.max(1, keepdims=True)
    r = (mx - mn0).astype(np.float32)
    best_mn = (mn0 + np.float32(0)).astype(np.float32)
    best_sc = np.where(mx == best_mn, np.float32(0), (mx - best_mn) / L).astype(np.float32)
    with np.errstate(invalid="ignore"):
        best = _criterion(x, best_mn, best_sc, L)
    live = best_sc > 0
    f = np.float32(MOST / np.float32(STEPS))
    for a in range(STEPS + 1):
        for b in range(STEPS + 1 - a):
            if a + b == 0:
                continue
            fa, fb = np.float32(np.float32(a) * f), np.float32(np.float32(b) * f)
            lo = ((mn0.astype(np.float64) + r.astype(np.float64) * np.float64(fa)).astype(np.float32)
                  + np.float32(0)).astype(np.float32)
            hi = (mx.astype(np.float64) - r.astype(np.float64) * np.float64(fb)).astype(np.float32)
            sc = np.where(hi == lo, np.float32(0), (hi - lo) / L).astype(np.float32)
            e = _criterion(x, lo, sc, L)
            with np.errstate(invalid="ignore"):
                take = live & (e < best)
            best = np.where(take, e, best)
            best_mn, best_sc = np.where(take, lo, best_mn), np.where(take, sc, best_sc)
    return best_mn, best_sc


def ref_pack_clipped(v, bits, G):
    """(codes [B, H, n, D] before bit packing, mins, scales [B, H, n, ceil(D/G)])."""
    x = f32(v)
    B, H, n, D = x.shape
    U = -(-D // G)
    L = np.float32(2**bits - 1)
    mins = np.zeros((B, H, n, U), np.float32)
    scales = np.zeros((B, H, n, U), np.float32)
    codes = np.zeros((B, H, n, D), np.uint8)
    for u in range(U):
        c0, c1 = u * G, min(D, (u + 1) * G)
        rows = x[..., c0:c1].reshape(-1, c1 - c0)
        mn, sc = ref_clip_groups(rows, bits)
        mins[..., u] = mn.reshape(B, H, n)
        scales[..., u] = sc.reshape(B, H, n)
        codes[..., c0:c1] = _codes(rows, mn, sc, L).astype(np.uint8).reshape(B, H, n, c1 - c0)
    return codes, mins, scales


def _heavy(shape, dtype, seed):
    """Gaussian values with a few large outliers per row (what clipping is for)."""
    x = randn(shape, torch.float64, seed)
    g = torch.Generator().manual_seed(seed + 1)
    hit = torch.rand(shape, generator=g, dtype=torch.float64) < 0.03
    return torch.where(hit, x * 8, x).to(dtype)


def _unpacked_codes(codes, bits, D):
    per = 8 // bits
    c = codes.numpy().astype(np.uint32)
    out = np.stack([(c >> (i * bits)) & (2**bits - 1) for i in range(per)], -1)
    return out.reshape(*c.shape[:-1], -1)[..., :D].astype(np.uint8)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,G", [((1, 2, 7, 64), 32), ((2, 3, 5, 40), 16), ((1, 1, 9, 33), 8), ((1, 2, 3, 5), 32)])
def test_matches_reference_bit_for_bit(bits, dtype, shape, G):
    v = _heavy(shape, dtype, seed=bits * 7 + shape[3])
    codes, mins, scales = ops.pack_values(v, bits, G, clip=True)
    rc, rm, rs = ref_pack_clipped(v, bits, G)
    assert same_bits(mins, torch.from_numpy(rm))
    assert same_bits(scales, torch.from_numpy(rs))
    assert np.array_equal(_unpacked_codes(codes, bits, shape[3]), rc)


def test_reference_clips_some_groups():
    # the bit-for-bit test means something only if the search moves ranges:
    # at 2 bits every heavy-tailed group of 32 is clipped, at 4 bits some, at
    # 8 bits (fine enough that the tails cost little) none
    v = _heavy((2, 3, 16, 64), torch.float32, seed=3)
    moved = {}
    for bits in (2, 4, 8):
        _, mins, scales = ops.pack_values(v, bits, 32, clip=True)
        _, mins0, scales0 = ops.pack_values(v, bits, 32)
        moved[bits] = ((mins != mins0) | (scales != scales0)).float().mean().item()
    assert moved[2] > 0.9 and 0.1 < moved[4] < 0.9 and moved[8] < 0.1


@pytest.mark.parametrize("bits", [2, 4])
def test_never_worse_than_min_max_per_group(bits):
    v = _heavy((2, 3, 20, 64), torch.float32, seed=11)
    G = 32

    def group_err(packed):
        out = ops.unpack_values(*packed, bits, G, head_dim=64).double()
        return ((out - v.double()) ** 2).reshape(2, 3, 20, 2, G).sum(-1)

    clipped, plain = group_err(ops.pack_values(v, bits, G, clip=True)), group_err(ops.pack_values(v, bits, G))
    # the search measures r = t - rint(t) in steps, which differs from the
    # unpacked error only next to a rounding tie
    assert (clipped <= plain * (1 + 1e-5)).all()
    assert clipped.sum() < (0.9 if bits == 2 else 0.97) * plain.sum()  # heavy tails: clipping pays


def test_constant_and_tiny_groups_exact():
    v = torch.zeros(1, 2, 4, 64)
    v[0, 0] = 3.25
    v[0, 1, :, 32:] = -1.5
    v[0, 1, 2, 5] = 1e-40  # a subnormal range: its scale underflows
    codes, mins, scales = ops.pack_values(v, 2, 32, clip=True)
    out = ops.unpack_values(codes, mins, scales, 2, 32, head_dim=64)
    const = torch.ones(1, 2, 4, 64, dtype=torch.bool)
    const[0, 1, 2, :32] = False
    assert torch.equal(out[const], v[const])
    assert (scales[0, 0] == 0).all()


def test_same_bits_for_any_thread_count():
    v = _heavy((2, 3, 33, 64), torch.bfloat16, seed=5)
    before = ops.get_num_threads()
    try:
        ops.set_num_threads(1)
        one = ops.pack_values(v, 2, 32, clip=True)
        ops.set_num_threads(2)
        two = ops.pack_values(v, 2, 32, clip=True)
    finally:
        ops.set_num_threads(before)
    for a, b in zip(one, two):
        assert same_bits(a, b)


def test_strided_input_and_outputs():
    big = _heavy((1, 3, 10, 96), torch.float32, seed=8)
    v = big[:, :, ::2, 16:80]  # non-contiguous
    codes = torch.zeros(1, 3, 5, 16, dtype=torch.uint8)
    mins = torch.zeros(1, 3, 5, 4)
    scales = torch.zeros(1, 3, 5, 4)
    ops.pack_values(v, 2, 32, codes=codes, mins=mins[..., ::2], scales=scales[..., 1::2], clip=True)
    rc, rm, rs = ref_pack_clipped(v.contiguous(), 2, 32)
    assert same_bits(mins[..., ::2], torch.from_numpy(rm)) and (mins[..., 1::2] == 0).all()
    assert same_bits(scales[..., 1::2], torch.from_numpy(rs)) and (scales[..., ::2] == 0).all()
    assert np.array_equal(_unpacked_codes(codes, 2, 64), rc)


def test_nan_refused_nothing_written():
    v = _heavy((1, 2, 3, 64), torch.float32, seed=1)
    v[0, 1, 2, 7] = float("nan")
    mins = torch.full((1, 2, 3, 2), 5.0)
    with pytest.raises(KVCompressValueError, match=r"values: element \[0, 1, 2, 7\] is nan"):
        ops.pack_values(v, 2, 32, mins=mins, clip=True)
    assert (mins == 5.0).all()


# ---------------------------------------------------------------- the per-layer choice


def _outlier_values(n=96, D=32, H=2, seed=0):
    """Values [1, H, n, D]: Gaussian channels, and channel 0 an outlier of
    magnitude 8 (random sign) in about 30% of the tokens: clipping cuts it
    there, and narrows the other channels' steps."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(1, H, n, D, generator=g, dtype=torch.float64)
    hit = torch.rand(1, H, n, generator=g, dtype=torch.float64) < 0.3
    sign = torch.where(torch.rand(1, H, n, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)
    v[..., 0] = torch.where(hit, 8.0 * sign, v[..., 0])
    return v.float()


def _ref_errors(q, k, v, bits, G, scaling, w):
    """The residual-stream error of packing v both ways, written from the
    definition: per query head and query, softmax weights over the slots,
    the weighted sum of each slot's value error, the heads' errors side by
    side through w (None: identity), squared and summed; float64 loops."""
    B, Hq, W, D = q.shape
    H = k.shape[1]
    out = []
    for clip in (False, True):
        vh = ops.unpack_values(*ops.pack_values(v.contiguous(), bits, G, clip=clip), bits, G, head_dim=v.shape[3])
        total = 0.0
        for b in range(B):
            for t in range(W):
                row = []
                for h in range(Hq):
                    kh = h // (Hq // H)
                    p = torch.softmax(k[b, kh].double() @ q[b, h, t].double() * scaling, 0)
                    row.append(p @ (vh[b, kh].double() - v[b, kh].double()))
                e = torch.cat(row)
                if w is not None:
                    e = w.double() @ e
                total += float(e @ e)
        out.append(total)
    return tuple(out)


def test_errors_match_a_reference_written_from_the_definition():
    from kvcompress.stores.value_clip import value_clip_errors

    v = _outlier_values()
    g = torch.Generator().manual_seed(4)
    k = torch.randn(1, 2, 96, 16, generator=g)
    q = torch.randn(1, 4, 6, 16, generator=g)
    w = torch.randn(40, 4 * 32, generator=g)
    for weights in (None, w):
        got = value_clip_errors(q, k, v, 2, 32, 0.25, weights)
        want = _ref_errors(q, k, v, 2, 32, 0.25, weights)
        assert got == pytest.approx(want, rel=1e-5)  # fp32 sums, float64 after (value_clip_errors)


def test_the_output_projection_can_reverse_the_choice():
    """Unweighted, clipping lowers the attention output's error (the
    Gaussian channels gain more than the outlier channel loses); when the
    output projection reads only the outlier channel, which min..max keeps
    nearly exact, min..max wins."""
    from kvcompress.stores.value_clip import value_clip_errors, value_clip_helps

    v = _outlier_values()
    g = torch.Generator().manual_seed(4)
    k = torch.randn(1, 2, 96, 16, generator=g) * 0.3
    q = torch.randn(1, 4, 8, 16, generator=g)
    plain, clipped = value_clip_errors(q, k, v, 2, 32, 0.25)
    assert clipped < 0.9 * plain and value_clip_helps(q, k, v, 2, 32, 0.25)
    w = torch.zeros(4, 4 * 32)
    for h in range(4):
        w[h, h * 32] = 1.0  # each output reads one head's outlier channel
    plain, clipped = value_clip_errors(q, k, v, 2, 32, 0.25, w)
    assert clipped > 1.1 * plain and not value_clip_helps(q, k, v, 2, 32, 0.25, w)


def test_padding_slots_take_no_weight():
    from kvcompress.stores.value_clip import value_clip_errors

    v = _outlier_values(n=64)
    g = torch.Generator().manual_seed(2)
    k = torch.randn(1, 2, 64, 16, generator=g)
    q = torch.randn(1, 2, 4, 16, generator=g)
    start = torch.tensor([16, 0])
    masked = value_clip_errors(q, k, v, 2, 32, 0.25, None, start)
    v2 = v.clone()
    v2[0, 0, :16] = 100.0 * torch.randn(16, 32, generator=g)  # what padding holds does not matter
    assert value_clip_errors(q, k, v2, 2, 32, 0.25, None, start) == pytest.approx(masked, rel=1e-12)
    assert value_clip_errors(q, k, v2, 2, 32, 0.25, None) != pytest.approx(masked, rel=1e-3)


def test_output_projection_of_each_module_kind():
    from kvcompress.stores.value_clip import output_projection
    from transformers.pytorch_utils import Conv1D

    class Attn(torch.nn.Module):
        pass

    a = Attn()
    assert output_projection(a) is None
    a.o_proj = torch.nn.Linear(8, 6, bias=False)
    assert output_projection(a) is a.o_proj.weight
    b = Attn()
    b.c_proj = Conv1D(6, 8)  # GPT-2: weight [in, out]
    assert output_projection(b).shape == (6, 8) and torch.equal(output_projection(b), b.c_proj.weight.t())


def test_the_option_is_checked_and_refused_where_unsupported():
    import kvcompress as kvc
    from kvcompress.methods import KIVI, LowBits, method_from_spec

    assert "clip_values='auto'" in repr(KIVI(bits=2, clip_values="auto"))
    assert "clip_values" not in repr(KIVI(bits=2))
    with pytest.raises(TypeError, match="clip_values: expected True, False or 'auto', got 'yes'"):
        KIVI(clip_values="yes")
    with pytest.raises(ValueError, match="clip_values: LowBits"):
        LowBits(bits=2, clip_values=True)
    with pytest.raises(ValueError, match="without clip_values"):
        kvc.MiniCache() + KIVI(bits=2, clip_values=True)
    m = method_from_spec("ems+kivi:bits=2:clip_values=auto", budget=64)
    assert m.value_clip == "auto" and kvc.EMS(budget=64).value_clip is False


# ---------------------------------------------------------------- in a cache


def test_a_clipped_layer_packs_the_full_caches_values_clipped(tiny_lm):
    """With ``clip_values=True`` every layer's packed value groups are
    ``pack_values(clip=True)`` of the full cache's values, bit for bit, and
    the cache holds exactly the bytes of the unclipped one."""
    from transformers import DynamicCache

    from kvcompress.compat import cache_kwargs
    from kvcompress.methods import KIVI
    from kvcompress.stores import PackedStore
    from test_sinks import _padded_batch, generate_padded

    model, tok, _ = tiny_lm
    _, cache = generate_padded(model, tok, KIVI(bits=2, group=8, residual=8, clip_values=True))
    _, plain = generate_padded(model, tok, KIVI(bits=2, group=8, residual=8))
    ids, mask = _padded_batch()
    full = DynamicCache()
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
              **cache_kwargs(model, full))
    clipped_any = False
    for i, layer in enumerate(cache.layers):
        s = layer.store
        assert isinstance(s, PackedStore) and "clipped values" in repr(s)
        assert all(s.row_choice(b)[2] for b in range(s.batch))  # every row's own choice (row mode)
        m = min(s.n_packed, int(ids.shape[1]) // 8 * 8)
        want = ops.pack_values(full.layers[i].values[:1, :, :m].contiguous(), 2, 8, clip=True)
        assert torch.equal(s._vc[:1, :, :m], want.codes), i
        assert same_bits(s._vmin[:1, :, :m], want.mins) and same_bits(s._vsc[:1, :, :m], want.scales), i
        base = ops.pack_values(full.layers[i].values[:1, :, :m].contiguous(), 2, 8)
        clipped_any |= not torch.equal(base.mins, want.mins)
    assert clipped_any
    assert cache.memory_bytes() == plain.memory_bytes()


def test_auto_decides_each_layer_from_its_prompt(tiny_lm, monkeypatch):
    """``clip_values="auto"``: each layer clips exactly when the reference
    residual-stream error (written above from the definition) of its
    prompt's newest 32 queries over the slots of its first pack, weighted by
    that layer's ``o_proj``, is lower clipped; the choice holds for every
    later pack."""
    from transformers import DynamicCache

    import kvcompress as kvc
    from kvcompress.cache import CompressedLayer
    from kvcompress.compat import cache_kwargs
    from kvcompress.methods import KIVI

    model, tok, _ = tiny_lm
    seen = {}
    real = CompressedLayer.after_attention

    def spy(self, queries, scaling):
        if queries is not None and self.layer_idx not in seen:
            seen[self.layer_idx] = (queries.detach().clone(), scaling)
        return real(self, queries, scaling)

    monkeypatch.setattr(CompressedLayer, "after_attention", spy)
    torch.manual_seed(9)
    ids = torch.randint(5, 250, (1, 100))
    with kvc.compress(model, KIVI(bits=2, group=8, residual=8, clip_values="auto")) as session:
        model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
    full = DynamicCache()
    with torch.no_grad():
        model(ids, use_cache=True, **cache_kwargs(model, full))
    m = (100 - 8) // 8 * 8  # the prompt's first pack: all but the residual, whole groups
    for i, layer in enumerate(session.cache.layers):
        q, scaling = seen[i]
        w = model.model.layers[i].self_attn.o_proj.weight.detach()
        plain, clipped = _ref_errors(q[:, :, -32:], full.layers[i].keys[:, :, :m], full.layers[i].values[:, :, :m],
                                     2, 8, scaling, w)
        assert layer._clip_decided and layer._clip == (clipped < plain) == layer.store.value_clip, i
        assert layer.store.n_packed > m  # packed again while decoding, the same way


def test_auto_does_not_clip_behind_an_evictor(tiny_lm, monkeypatch):
    """Behind a method that evicts or merges (EMS here: per-head, merge
    counts), ``clip_values="auto"`` decides not to clip without running
    its test, on every layer, while ``rotate="auto"`` still tests each
    layer's kept slots with their merge counts; ``clip_values=True`` still
    clips there. The same prompt without an evictor runs the clip test on
    every layer."""
    import kvcompress as kvc
    import kvcompress.packing_choices as C
    from kvcompress.methods import KIVI

    model, tok, _ = tiny_lm
    clip_tests, rot_counts = [], []
    real_clip, real_rot = C.value_clip_helps, C.rotation_helps

    def clip_spy(*a, **kw):
        clip_tests.append(a)
        return real_clip(*a, **kw)

    def rot_spy(*a, **kw):
        rot_counts.append(a[7] if len(a) > 7 else kw.get("counts"))
        return real_rot(*a, **kw)

    monkeypatch.setattr(C, "value_clip_helps", clip_spy)
    monkeypatch.setattr(C, "rotation_helps", rot_spy)
    ids = torch.randint(5, 250, (1, 120), generator=torch.Generator().manual_seed(3))
    quant = dict(bits=2, group=8, residual=8, rotate="auto")
    with kvc.compress(model, kvc.EMS(budget=48, interval=0) + KIVI(**quant, clip_values="auto")) as session:
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.eos_token_id)
    layers = session.cache.layers
    assert not clip_tests
    for layer in layers:
        assert layer._clip_decided and not layer._clip and not layer.store.value_clip
        assert layer._rotation_decided
    assert len(rot_counts) == len(layers) and all(c is not None and bool((c > 1).any()) for c in rot_counts)
    with kvc.compress(model, kvc.EMS(budget=48, interval=0) + KIVI(**quant, clip_values=True)) as session:
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.eos_token_id)
    assert all(layer.store.value_clip for layer in session.cache.layers)
    with kvc.compress(model, KIVI(**quant, clip_values="auto")) as session:
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.eos_token_id)
    assert len(clip_tests) == len(session.cache.layers)
