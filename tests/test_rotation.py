"""KIVI(rotate=True): keys packed in an orthogonally rotated basis, against
float64 references and against the eager path over the same slots."""

from __future__ import annotations

import math

import pytest
import torch

import kvcompress as kvc
from kvcompress import ops
from kvcompress import testing as T
from kvcompress.methods import KIVI, method_from_spec
from kvcompress.stores import AttentionSpec, PackedStore, RaggedPackedStore, RaggedStore
from kvcompress.stores.masked import build_mask, masked_attention
from kvcompress.stores.rotation import _CACHE, key_rotation, rotate, unrotate

from test_kivi import _attention64, _group_bound, check_float64


@pytest.mark.parametrize("D", [1, 2, 8, 64, 80, 96, 128, 256])
def test_key_rotation_is_orthogonal_fixed_and_shared(D):
    rot = key_rotation(D, "cpu")
    assert rot.shape == (D, D) and rot.dtype == torch.float32
    eye = rot.double() @ rot.double().T
    assert torch.allclose(eye, torch.eye(D, dtype=torch.float64), atol=1e-6)
    if D & (D - 1) == 0:  # Hadamard: every entry +-1/sqrt(D), rows of equal weight
        assert torch.allclose(rot.abs(), torch.full((D, D), D**-0.5))
    assert key_rotation(D, "cpu") is rot  # one tensor per (D, device): its bytes count once
    _CACHE.pop((D, "cpu"))
    assert torch.equal(key_rotation(D, "cpu"), rot)  # rebuilt the same (seeded where not Hadamard)
    with pytest.raises(ValueError, match="head_dim"):
        key_rotation(0, "cpu")


def test_rotate_option():
    k = KIVI(bits=2, rotate=True)
    assert k.rotates_keys and not KIVI(bits=2).rotates_keys
    assert repr(k) == "KIVI(bits=2, group=32, residual=128, rotate=True)"
    assert method_from_spec("kivi:bits=2:rotate=true") == k
    assert (kvc.SnapKV(budget=64) + k).rotates_keys and not kvc.SnapKV(budget=64).rotates_keys
    assert k.packing == KIVI(bits=2).packing  # same store geometry and bytes
    with pytest.raises(TypeError, match="rotate"):
        KIVI(rotate=1)
    mikv = kvc.MiKV(ratio=0.75, rotate=True)
    assert mikv.quant == kvc.LowBits(bits=2, high_bits=8, rotate=True) and mikv.rotates_keys
    assert "rotate=True" in repr(mikv) and "rotate='auto'" in repr(kvc.ZipCache(ratio=0.5, rotate="auto"))
    with pytest.raises(TypeError, match="rotate"):
        kvc.ZipCache(ratio=0.5, rotate="yes")
    with pytest.raises(ValueError, match="without rotate"):
        kvc.MiniCache() + KIVI(bits=4, rotate=True)


def _rotated_store(dtype, value_bits=None, bits=2, D=32, G=16, R=32, n=130, seed=1):
    torch.manual_seed(seed)
    B, Hkv = 2, 2
    keys = (torch.randn(B, Hkv, n, D) * torch.linspace(0.2, 3, D)).to(dtype)
    values = torch.randn(B, Hkv, n, D).to(dtype)
    store = PackedStore(bits, G, R, value_bits)
    store.rotation = key_rotation(D, "cpu")
    store.append(keys, values, 0)
    store.settle()
    return store, keys, values


def test_set_rotation_only_before_anything_is_packed():
    """``set_rotation`` (``rotate="auto"`` deciding at the first pack) takes
    a rotation while nothing is packed, and the next ``settle`` packs with
    it; once codes exist it refuses another basis (codes of two bases never
    share a store) and accepts the one it has."""
    torch.manual_seed(4)
    D, G, R = 32, 16, 32
    rot = key_rotation(D, "cpu")
    store = PackedStore(2, G, R)
    keys, values = torch.randn(1, 2, 40, D), torch.randn(1, 2, 40, D)
    store.append(keys, values, 0)
    assert store.pending() == 0 and not store.packed_any()
    store.set_rotation(rot)
    store.append(torch.randn(1, 2, 10, D), torch.randn(1, 2, 10, D), 40)
    assert store.pending() == 16
    store.settle()
    assert store.packed_any() and store.rotation is rot
    kc, _, _ = ops.pack_keys(rotate(keys[:, :, :16], rot), 2, G)
    assert torch.equal(store._kc[:, :, :16], kc)
    with pytest.raises(RuntimeError, match="already packed"):
        store.set_rotation(None)
    store.set_rotation(rot)  # the basis it already has


@pytest.mark.parametrize("D", [16, 64, 128, 48])
def test_rotate_is_the_product_row_by_row(D):
    """``rotate(x, R)`` is ``x @ R`` (within float32's rounding of the
    float64 product: the Hadamard matrix as a Walsh-Hadamard transform, a
    seeded orthogonal one for D = 48 in float64), ``unrotate`` its inverse,
    and each row's bits are those it gets alone or beside any other rows (a
    float32 matrix product's sums depend on how many rows it multiplies, so
    a batch row's keys would pack otherwise than alone)."""
    rot = key_rotation(D, "cpu")
    g = torch.Generator().manual_seed(D)
    x = torch.randn(257, D, generator=g) * torch.linspace(0.1, 4, D)
    want = x.double() @ rot.double()
    got = rotate(x, rot)
    assert got.dtype == torch.float32
    eps = torch.finfo(torch.float32).eps
    assert bool(((got.double() - want).abs() <= 8 * eps * want.abs().amax(1, keepdim=True)).all())
    back = unrotate(got, rot)
    assert (back - x).abs().max() <= 8 * eps * x.abs().max()
    for rows in (slice(0, 1), slice(5, 6), slice(3, 40), slice(100, 257)):
        assert torch.equal(rotate(x[rows], rot), got[rows]) and torch.equal(unrotate(got[rows], rot), back[rows])
    assert torch.equal(rotate(x.view(257, 1, D), rot).view(257, D), got)
    assert rotate(x.bfloat16(), rot).dtype == torch.bfloat16  # the input's dtype back


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_the_packed_codes_are_those_of_the_rotated_keys(bits):
    """The store packs ``k @ R`` (codes, mins and scales equal to packing the
    rotated keys directly), dequantizes back into the model's basis within
    the bound of the rotated groups, and keeps the residual exactly."""
    store, keys, values = _rotated_store(torch.float32, bits=bits)
    m, G, rot = store.n_packed, store.group, store.rotation
    assert m > 0 and repr(store).count("rotated keys") == 1
    kr = rotate(keys[:, :, :m].float(), rot)
    kc, kmin, ksc = ops.pack_keys(kr, bits, G)
    assert torch.equal(store._kc[:, :, :m], kc)
    assert torch.equal(store._kmin[:, :, : m // G], kmin) and torch.equal(store._ksc[:, :, : m // G], ksc)
    k, v = store.dequantized()
    assert torch.equal(k[:, :, m:], keys[:, :, m:]) and torch.equal(v[:, :, m:], values[:, :, m:])
    back = k[:, :, :m].double() @ rot.double()  # the dequantized keys in the rotated basis
    bound = _group_bound(kr, bits, G, per_channel=True)
    assert bool(((back - kr.double()).abs() <= bound * (1 + 1e-5) + 1e-5).all())
    # the rotation is worth its place: where queries weigh most the channels whose keys spread
    # widest (the same channel profile, as in real models), 2-bit logits err less rotated
    if bits == 2:
        plain = PackedStore(bits, G, store.residual)
        plain.append(keys, values, 0)
        plain.settle()
        q = torch.randn(64, keys.shape[-1], dtype=torch.float64) * torch.linspace(0.2, 3, keys.shape[-1])
        err = lambda kk: float(((kk[:, :, :m].double() - keys[:, :, :m].double()) @ q.T).pow(2).mean())  # noqa: E731
        assert err(k) < 0.8 * err(plain.dequantized()[0])


def _kernel_calls(monkeypatch, one_call):
    """Read rotated stores in one kernel call (the CPU's way) or in joined
    calls (the other devices' way, here on the CPU); returns the list that
    records each ``ops.packed_attention`` call."""
    import kvcompress.stores.packed as packed_store

    monkeypatch.setattr(packed_store, "one_call", lambda query: one_call)
    calls, real = [], ops.packed_attention

    def counted(*a, **k):
        calls.append(k.get("residual_query") is not None)
        return real(*a, **k)

    monkeypatch.setattr(ops, "packed_attention", counted)
    return calls


ONE_CALL = pytest.mark.parametrize("one_call", [True, False], ids=["one-call", "joined"])


@ONE_CALL
@pytest.mark.parametrize("value_bits", [None, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotated_attention_equals_float64_over_the_dequantized_slots(dtype, value_bits, one_call, monkeypatch):
    """Packed part with the rotated query, residual with the query as it is
    (one kernel call with ``residual_query``, or two joined by their
    log-sum-exps): within twice torch's own error of float64 attention over
    the dequantized slots, with padded rows and GQA; prefill chunks (several
    queries) and softcaps (the eager path) too."""
    calls = _kernel_calls(monkeypatch, one_call)
    store, _, _ = _rotated_store(dtype, value_bits, bits=4)
    B, Hkv, D = 2, 2, 32
    Hq = 6
    store.append(torch.randn(B, Hkv, 3, D).to(dtype), torch.randn(B, Hkv, 3, D).to(dtype), 130)
    for q_len, kv_start in ((1, torch.tensor([0, 7])), (3, torch.tensor([5, 0])), (1, torch.tensor([0, 120]))):
        q = torch.randn(B, Hq, q_len, D).to(dtype)
        k, v = check_float64(store, q, kv_start, dtype)
        assert calls == ([True] if one_call else [False, False]), calls
        calls.clear()
    # softcap: the eager path over the same slots
    capped = store.attend(q, AttentionSpec(scaling=D**-0.5, softcap=5.0), kv_start=kv_start)
    ref_capped = _attention64(q, k, v, D**-0.5, kv_start, softcap=5.0)
    assert (capped.double() - ref_capped).abs().max().item() < (1e-5 if dtype == torch.float32 else 2e-2)


def test_rotated_sliding_window_step_equals_the_eager_window():
    """A sliding-window decode step (leading slots masked) over rotated keys
    equals the eager path's windowed attention over the dequantized slots."""
    store, _, _ = _rotated_store(torch.float32, bits=4, n=200)
    B, D, window = 2, 32, 90
    store.append(torch.randn(B, 2, 1, D), torch.randn(B, 2, 1, D), 200)
    q = torch.randn(B, 4, 1, D)
    spec = AttentionSpec(scaling=D**-0.5, window=window)
    query_pos = torch.full((B, 1), 200)
    out = store.attend(q, spec, kv_start=torch.tensor([0, 3]), query_pos=query_pos)
    k, v = store.dequantized()
    key_pos = torch.arange(store.n)[None].expand(B, store.n)
    mask = build_mask(B, 1, store.n, "cpu", kv_start=torch.tensor([0, 3]), window=window, key_pos=key_pos,
                      query_pos=query_pos)
    ref = masked_attention(q.double(), k.double(), v.double(), AttentionSpec(scaling=D**-0.5), mask)
    assert (out.double() - ref).abs().max().item() < 1e-5
    full = store.attend(q, AttentionSpec(scaling=D**-0.5), kv_start=torch.tensor([0, 3]))
    assert (full - out).abs().max().item() > 1e-3  # the window does mask slots here


def _ragged(seed=5, D=16):
    """A RaggedStore of 2 x 2 heads of different lengths (one empty), merge counts."""
    g = torch.Generator().manual_seed(seed)
    B, H, C = 2, 2, 90
    lengths = [70, 0, 45, 90]
    keys = torch.randn(B, H, C, D, generator=g) * torch.linspace(0.3, 2, D)
    values = torch.randn(B, H, C, D, generator=g)
    valid = torch.zeros(B, H, C, dtype=torch.bool)
    for i, n in enumerate(lengths):
        valid[i // H, i % H, :n] = True
    positions = torch.arange(C, dtype=torch.int32).expand(B, H, C).contiguous()
    counts = torch.randint(1, 4, (B, H, C), generator=g).float()
    return RaggedStore.from_dense(keys, values, positions, valid, counts=counts)


@ONE_CALL
def test_rotated_per_head_layer_equals_its_padded_reference(one_call, monkeypatch):
    """A per-head packed layer (an empty head, merge counts, a residual)
    packed rotated: the kernel (one call, or two joined) equals float64
    attention over the padded dequantized copy, with and without the
    log-count bias."""
    calls = _kernel_calls(monkeypatch, one_call)
    D = 16
    store = RaggedPackedStore.from_ragged(_ragged(D=D), 4, 8, 0, rotation=key_rotation(D, "cpu"))
    store.append(torch.randn(2, 2, 2, D), torch.randn(2, 2, 2, D), 90)
    q = torch.randn(2, 4, 1, D)
    for bias in (True, False):
        spec = AttentionSpec(scaling=D**-0.5, count_bias=bias)
        out = store.attend(q, spec)
        keys, values, start, logc = store.padded(bias)
        ref = _padded64(q, keys, values, start, logc, D**-0.5)
        assert (out.double() - ref).abs().max().item() < 1e-5, bias
        assert calls == ([True] if one_call else [False, False]), calls
        calls.clear()


def _padded64(q, keys, values, start, logc, scaling):
    """float64 attention of one query per head over [B*H, 1, M, D] left-padded
    copies (``start`` leading slots masked, ``logc`` added); [B, 1, Hq, D]."""
    B, Hq, _, D = q.shape
    N = keys.shape[0]
    H = N // B
    g = Hq // H
    k, v = keys[:, 0].double().view(B, H, -1, D), values[:, 0].double().view(B, H, -1, D)
    logits = torch.einsum("bhgd,bhnd->bhgn", q.double().view(B, H, g, D), k) * scaling
    logits = logits + logc.double().view(B, H, 1, -1)
    M = k.shape[2]
    live = torch.arange(M)[None] >= start.view(-1, 1)
    logits = logits.masked_fill(~live.view(B, H, 1, M), -math.inf)
    w = torch.softmax(logits, -1).nan_to_num(0.0)
    return torch.einsum("bhgn,bhnd->bhgd", w, v).reshape(B, Hq, D)[:, None]


@pytest.mark.parametrize("make", [
    lambda: KIVI(bits=2, group=8, residual=8, rotate=True),
    lambda: kvc.SnapKV(budget=48) + KIVI(bits=4, group=8, residual=8, rotate=True),
    lambda: kvc.EMS(budget=48) + KIVI(bits=4, group=8, residual=8, rotate=True),
    lambda: kvc.MiKV(budget=48, group=8, rotate=True),
    lambda: kvc.ZipCache(budget=48, group=8, high_bits=None, rotate=True),
], ids=["kivi2", "snapkv+kivi4", "ems+kivi4", "mikv2+8", "zipcache2"])
def test_kernel_generation_equals_the_eager_path_over_the_same_slots(tiny_lm, make, monkeypatch):
    """Generation through the kernel (rotated query on the packed part) gives
    the logits of the eager path (dequantized keys rotated back, the query as
    it is), for a left-padded batch whose evictors keep their budget in rounds."""
    import kvcompress.stores.packed as packed_store
    import kvcompress.stores.packed_ragged as ragged_store

    model, tok, _ = tiny_lm
    torch.manual_seed(6)
    ids = torch.randint(5, 250, (2, 120))
    mask = torch.ones_like(ids)
    mask[1, :25] = 0

    def run():
        with kvc.compress(model, make()) as session:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False,
                                 pad_token_id=tok.eos_token_id, output_logits=True, return_dict_in_generate=True)
        return out, session.cache

    out, cache = run()
    assert all(layer.store.rotation is not None for layer in cache.layers)
    monkeypatch.setattr(packed_store, "kernel_reads", lambda query, residual: False)
    monkeypatch.setattr(ragged_store, "kernel_reads", lambda query, residual: False)
    eager, _ = run()
    assert torch.equal(out.sequences, eager.sequences)
    for step, (a, b) in enumerate(zip(out.logits, eager.logits)):
        err = float((a - b).abs().max())
        assert err <= 1e-4 * max(1.0, float(b.abs().max())), f"step {step}: logits differ by {err:.3g}"


def test_rotated_8_bits_track_the_full_cache_and_a_long_residual_is_exact(tiny_lm):
    """8-bit rotated keys are close to lossless (teacher-forced KL < 1e-3),
    and with the residual covering the prompt nothing is packed: plain
    greedy tokens and logits."""
    model, _, _ = tiny_lm
    torch.manual_seed(3)
    ids = torch.randint(5, 250, (1, 200))
    with T.method_context(model, None) as new:
        tokens, full = T.greedy(model, new(), ids, 13, keep_logits=True)
    with T.method_context(model, KIVI(bits=8, group=8, residual=16, rotate=True)) as new:
        _, logits = T.greedy(model, new(), ids, 13, force=tokens, keep_logits=True)
    p = torch.log_softmax(full.double(), -1)
    kl = float((p.exp() * (p - torch.log_softmax(logits.double(), -1))).sum(-1).mean())
    assert kl < 1e-3, kl
    with T.method_context(model, KIVI(bits=2, residual=256, rotate=True)) as new:
        exact, logits = T.greedy(model, new(), ids, 13, keep_logits=True)
    assert exact == tokens and torch.allclose(logits, full, atol=1e-5, rtol=1e-5)


def test_unpacked_gives_the_keys_back_in_the_models_basis():
    """What a decode-time re-selection reads (``unpacked()``) is the keys the
    kernel attends to, rotated back: within the bound of the rotated groups
    for packed slots, exact for residual ones, uniform and per head."""
    from kvcompress.stores import UniformStore

    torch.manual_seed(8)
    B, H, D, n = 2, 2, 16, 53
    rot = key_rotation(D, "cpu")
    keys, values = torch.randn(B, H, n, D) * torch.linspace(0.3, 3, D), torch.randn(B, H, n, D)
    pos = torch.arange(n, dtype=torch.int32).expand(B, H, n).clone()
    store = PackedStore.from_uniform(UniformStore.from_parts(keys.clone(), values.clone(), {"positions": pos}),
                                     2, 8, 12, columns=True, rotation=rot)
    store.settle()
    m = store.n_packed
    back = store.unpacked()
    assert m > 0 and torch.equal(back.keys[:, :, m:], keys[:, :, m:])
    kr = keys[:, :, :m].double() @ rot.double()
    bound = _group_bound(kr, 2, 8, per_channel=True)
    assert bool(((back.keys[:, :, :m].double() @ rot.double() - kr).abs() <= bound * (1 + 1e-5) + 1e-5).all())
    # per head: the dequantized rows of each head rotated back, within the same kind of bound
    ragged = _ragged(D=D)
    packed = RaggedPackedStore.from_ragged(ragged, 2, 8, 4, columns=True, rotation=rot)
    again = packed.unpacked()
    assert again.head_lengths() == ragged.head_lengths()
    for i, n_h in enumerate(ragged.head_lengths()):
        if not n_h:
            continue
        b, h = divmod(i, 2)
        want, got = ragged.head(b, h)[0].double(), again.head(b, h)[0].double()
        r = packed.r
        assert torch.equal(got[n_h - r :], want[n_h - r :])  # the residual's newest slots, as they came
        step = ((want @ rot.double()).amax(0) - (want @ rot.double()).amin(0)) / 3  # a head's widest 2-bit step
        assert bool((((got - want) @ rot.double()).abs()[: n_h - r] <= step / 2 + 1e-5).all())


def test_rotation_helps_tells_the_two_kinds_of_layer_apart():
    """``rotate="auto"``'s test: rotation wins where queries weigh most the
    channels whose keys spread widest, and loses where the heavy channels
    barely move within a group (low RoPE frequencies, as on Gemma 3's global
    layers) and the moving ones are light: rotating mixes the moving ones
    into every channel."""
    from kvcompress.stores.rotation import packing_divergences, rotation_helps

    g = torch.Generator().manual_seed(11)
    B, H, Hq, W, m, D = 1, 2, 4, 16, 256, 32
    rot = key_rotation(D, "cpu")
    profile = torch.linspace(0.2, 3, D)
    keys = torch.randn(B, H, m, D, generator=g) * profile
    queries = torch.randn(B, Hq, W, D, generator=g) * profile
    assert rotation_helps(queries, keys, rot, 2, 32, D**-0.5)
    steady = torch.cat([4 + 0.01 * torch.randn(B, H, m, D // 2, generator=g),
                        2 * torch.randn(B, H, m, D // 2, generator=g)], -1)
    weigh = torch.cat([torch.full((D // 2,), 3.0), torch.full((D // 2,), 0.1)])
    q2 = torch.randn(B, Hq, W, D, generator=g) * weigh
    assert not rotation_helps(q2, steady, rot, 2, 32, D**-0.5)
    # padding is masked and packs as the head's first real key: its content changes neither divergence
    start = torch.tensor([40, 0])
    noisy = keys.clone()
    noisy[0, 0, :40] = 1e3
    tidy = keys.clone()
    tidy[0, 0, :40] = keys[0, 0, 40]
    a = packing_divergences(queries, noisy, rot, 2, 32, D**-0.5, start)
    b = packing_divergences(queries, tidy, rot, 2, 32, D**-0.5, start)
    assert a == pytest.approx(b, rel=1e-6) and min(a) > 0
    assert packing_divergences(queries, noisy, rot, 2, 32, D**-0.5)[0] > 1.2 * a[0]  # unmasked, it would matter


@pytest.mark.parametrize("bits,merged", [(2, False), (4, False), (8, False), (2, True)])
def test_packing_divergences_match_a_float64_reference(bits, merged):
    """The divergences against the definition in float64 loops: per query
    row, KL from softmax of the exact logits to softmax of the packed keys'
    (log-softmax differences in float64), padding masked, merge counts
    adding log(count) to both; 8 bits too, where the divergence is small
    enough that fp32 log-softmaxes would lose it."""
    from kvcompress.stores.rotation import packing_divergences, rotate, unrotate

    g = torch.Generator().manual_seed(5)
    B, H, Hq, W, m, D = 2, 2, 4, 8, 96, 32
    rot = key_rotation(D, "cpu")
    keys = torch.randn(B, H, m, D, generator=g) * torch.linspace(0.2, 3, D)
    queries = torch.randn(B, Hq, W, D, generator=g)
    start = torch.tensor([0, 33, 5, 0])
    scaling = D**-0.5
    counts = torch.ones(B, H, m)
    if merged:  # a few slots that absorbed hundreds of tokens, as EMS's merges leave
        counts.view(-1)[torch.randperm(B * H * m, generator=g)[:12]] = 300.0

    def ref(packed):
        total, rows = 0.0, 0
        for b in range(B):
            for h in range(Hq):
                kh = h // (Hq // H)
                s = int(start[b * H + kh])
                k, pk = keys[b, kh, s:].double(), packed[b, kh, s:].double()
                for t in range(W):
                    q = queries[b, h, t].double()
                    bias = counts[b, kh, s:].double().log()
                    lp = torch.log_softmax(k @ q * scaling + bias, 0)
                    lpa = torch.log_softmax(pk @ q * scaling + bias, 0)
                    total += float((lp.exp() * (lp - lpa)).sum())
                    rows += 1
        return total / rows

    def packed(x):
        # padding packs as the head's first real key, as packing_divergences does
        x = x.clone()
        for b in range(B):
            for h in range(H):
                s = int(start[b * H + h])
                x[b, h, :s] = x[b, h, s]
        return ops.unpack_keys(*ops.pack_keys(x.contiguous(), bits, 32), bits, 32), x

    plain, filled = packed(keys)
    rotated = unrotate(packed(rotate(filled, rot))[0], rot)
    got = packing_divergences(queries, keys, rot, bits, 32, scaling, start, counts if merged else None)
    want = (ref(plain), ref(rotated))
    if merged:  # the counts matter
        assert packing_divergences(queries, keys, rot, bits, 32, scaling, start)[0] != pytest.approx(want[0], rel=1e-2)
    assert min(want) > 0
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("make", [
    lambda: KIVI(bits=2, group=8, residual=8, rotate="auto"),
    lambda: kvc.EMS(budget=48) + KIVI(bits=2, group=8, residual=8, rotate="auto"),
], ids=["kivi2", "ems+kivi2"])
def test_auto_decides_once_per_layer_and_keeps_its_choice(tiny_lm, make):
    """``rotate="auto"``: every layer decides at its first pack, from the
    prompt's newest queries, and its store uses that choice through every
    later pack and re-selection round; the choice is the one
    ``rotation_helps`` makes on the same keys and queries."""
    from kvcompress.cache import CompressedLayer
    from kvcompress.stores.rotation import rotation_helps

    model, _, _ = tiny_lm
    torch.manual_seed(12)
    ids = torch.randint(5, 250, (1, 150))
    seen = {}
    real = CompressedLayer._key_rotation

    def spy(self, packing, queries, scaling, **kw):
        first = not self._rotation_decided
        out = real(self, packing, queries, scaling, **kw)
        if first and type(self.store) is PackedStore and queries is not None:
            keys = self.store.residual_keys()[:, :, : self.store.pending()]
            want = rotation_helps(queries[:, :, -32:], keys, key_rotation(16, "cpu"), packing[0], packing[1], scaling)
            seen[self.layer_idx] = (out is not None, want)
        return out

    CompressedLayer._key_rotation = spy
    try:
        with T.method_context(model, make()) as new:
            cache = new()
            T.greedy(model, cache, ids, 40)
    finally:
        CompressedLayer._key_rotation = real
    assert repr(make()).count("rotate='auto'") == 1
    for layer in cache.layers:
        assert layer._rotation_decided and (layer.store.rotation is layer._rotation)
    assert len(seen) == (len(cache.layers) if isinstance(make(), KIVI) else 0)
    for idx, (got, want) in seen.items():
        assert got == want, idx


def test_auto_with_a_short_prompt_decides_at_the_first_pack_while_decoding(tiny_lm, monkeypatch):
    """``rotate="auto"`` with a prompt shorter than ``residual + group``:
    nothing is packed at prefill, so each layer holds its newest queries and
    each row of the batch decides just before the first decode step that
    packs its own residual, on its own group about to be packed (its
    prompt's first real keys) and its own real queries: row 0 (12 tokens)
    after 12 decode steps, row 1 (8 real tokens after 4 padded) after 16.
    Forced either way, generation equals ``rotate=True`` or
    ``rotate=False`` bit for bit."""
    from transformers import DynamicCache

    import kvcompress.packing_choices as choices

    model, tok, _ = tiny_lm
    torch.manual_seed(21)
    ids = torch.randint(5, 250, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    kivi = lambda rotate: KIVI(bits=2, group=8, residual=16, rotate=rotate)  # noqa: E731

    def run(method):
        with kvc.compress(model, method) as session:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False,
                                 pad_token_id=tok.eos_token_id, output_logits=True, return_dict_in_generate=True)
        return out, session.cache

    calls = []
    real = choices.rotation_helps

    def spy(queries, keys, rot, bits, group, scaling, start=None, counts=None):
        assert counts is None and start is None  # one row's real slots: no merge counts, no padding
        got = real(queries, keys, rot, bits, group, scaling)
        calls.append((queries.clone(), keys.clone(), got))  # views of buffers that move on
        return got

    monkeypatch.setattr(choices, "rotation_helps", spy)
    _, cache = run(kivi("auto"))
    layers = cache.layers
    assert len(calls) == 2 * len(layers)  # row 0's decisions, every layer's, then row 1's
    Hq = model.config.num_attention_heads
    for b, pad in enumerate((0, 4)):
        # the row's prompt alone, plain: a padded row's prefill attends over its own slots as alone
        # (stores.masked.rows_attention), so its keys are those bit for bit
        full = DynamicCache()
        with torch.inference_mode():
            model(ids[b : b + 1, pad:], use_cache=True, **T.cache_kwargs(model, full))
        for layer, (queries, keys, got) in zip(layers, calls[b * len(layers) : (b + 1) * len(layers)]):
            store = layer.store
            assert layer._row_choices[b] is not None and layer._rot_q is None and store._np[b] > 0
            assert store.row_choice(b)[0] == got
            # the row's real queries up to the step whose residual overflows (24 = 16 + 8)
            assert tuple(queries.shape) == (1, Hq, 24, 16)
            ref = full.layers[layer.layer_idx].keys
            assert torch.equal(keys[0], ref[0, :, :8])

    for forced, same in ((True, True), (False, False)):
        monkeypatch.setattr(choices, "rotation_helps", lambda *a, forced=forced, **k: forced)
        out, cache = run(kivi("auto"))
        assert all((layer.store.rotation is not None) == forced for layer in cache.layers)
        want, _ = run(kivi(same))
        assert torch.equal(out.sequences, want.sequences)
        assert all(torch.equal(a, b) for a, b in zip(out.logits, want.logits)), forced


@ONE_CALL
@pytest.mark.parametrize("high_bits", [None, 8])
def test_rotated_mixed_precision_equals_float64_over_the_dequantized_slots(high_bits, one_call, monkeypatch):
    """Mixed precision with rotated keys: the low-bit part (and the high-bit
    one) read with the rotated query, the residual with the query as it is
    (in the low part's call, or a call of its own), parts joined by
    log-sum-exp, within twice torch's error of float64 attention over the
    dequantized slots, padded rows included."""
    calls = _kernel_calls(monkeypatch, one_call)
    torch.manual_seed(13)
    B, H, Hq, n, D, G = 2, 2, 4, 70, 16, 8
    keys, values = torch.randn(B, H, n, D) * torch.linspace(0.3, 3, D), torch.randn(B, H, n, D)
    perm = torch.stack([torch.stack([torch.randperm(n) for _ in range(H)]) for _ in range(B)])
    full_idx, low_idx = perm[:, :, :20].sort(-1).values, perm[:, :, 20:].sort(-1).values
    rot = key_rotation(D, "cpu")
    store = PackedStore.from_split(keys, values, full_idx, low_idx, 2, G, high_bits=high_bits, rotation=rot)
    store.append(torch.randn(B, H, 2, D), torch.randn(B, H, 2, D), n)
    assert store.n_packed == n - 20 and (store.n_high == (20 if high_bits else 0))
    k, v = store.dequantized()
    # the low part's codes are those of the rotated keys
    low = torch.gather(keys, 2, low_idx[..., None].expand(B, H, n - 20, D)).float()
    kc, _, _ = ops.pack_keys(rotate(low, rot), 2, G)
    assert torch.equal(store._kc[:, :, : n - 20], kc)
    q = torch.randn(B, Hq, 1, D)
    kv_start = torch.tensor([0, 5])
    spec = AttentionSpec(scaling=D**-0.5)
    out = store.attend(q, spec, kv_start=kv_start)
    ref = _attention64(q, k, v, spec.scaling, kv_start)
    mask = build_mask(B, 1, k.shape[2], "cpu", kv_start=kv_start)
    torch_err = (masked_attention(q, k, v, spec, mask).double() - ref).abs().max().item()
    assert (out.double() - ref).abs().max().item() <= 2 * torch_err + 1e-6
    parts = 1 + (high_bits is not None)
    assert calls == ([True] + [False] * (parts - 1) if one_call else [False] * (parts + 1)), calls
