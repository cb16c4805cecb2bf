"""KVCrush: the C op against a float64 loop, and the method's kept sets on a
tiny random Llama against a float64 recomputation from the model's own
queries and keys."""

from __future__ import annotations

import pytest
import torch

import kvcompress as kvc
from kvcompress import KVCompressTypeError, KVCompressValueError, ops
from kvcompress.methods import REGISTRY, KVCrush, LayerView, SnapKV, method_from_spec

from generation import greedy, prefill
from model_refs import layer_qkv, window_attention64

ANCHORS = ("alternate", "random", "mean")
_M64 = (1 << 64) - 1
_G = 0x9E3779B97F4A7C15


# ------------------------------------------------------------------ reference


def _mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def random_anchor(seed, H):
    """The "random" anchor: top bit of mix(mix(seed + G) + h)."""
    first = _mix64((seed + _G) & _M64)
    return [_mix64((first + h) & _M64) >> 63 for h in range(H)]


def pick_ref(mass, kept, G, anchor="alternate", seed=0, kv_start=None, last=False):
    """(picks [B][G], dist [B][T]) by the definition, in float64 with Python
    lists and a sort. `last=True` is a deliberately wrong variant (the last
    rank of every bucket), to show the comparisons can fail."""
    m64 = torch.as_tensor(mass).to(torch.float64)
    kept = torch.as_tensor(kept).bool()
    B, H, T = m64.shape
    picks, dists = [], []
    for b in range(B):
        s = 0 if kv_start is None else int(kv_start[b])
        row_p, row_d = [-1] * G, [-1] * T
        if T - s > 0:
            thr = [float(m64[b, h, s:].sum()) / (T - s) for h in range(H)]
            bits = {j: [int(float(m64[b, h, j]) > thr[h]) for h in range(H)]
                    for j in range(s, T) if not kept[b, j]}
            cand = sorted(bits)
            m = len(cand)
            if anchor == "alternate":
                a = [h % 2 for h in range(H)]
            elif anchor == "random":
                a = random_anchor(seed, H)
            else:
                a = [int(2 * sum(bits[j][h] for j in cand) > m) for h in range(H)]
            for j in cand:
                row_d[j] = sum(x != y for x, y in zip(bits[j], a))
            ranked = sorted(cand, key=lambda j: (row_d[j], j))
            if m <= G:
                row_p[:m] = ranked
            else:
                for g in range(G):
                    lo, hi = g * m // G, (g + 1) * m // G
                    row_p[g] = ranked[hi - 1 if last else lo]
        picks.append(row_p)
        dists.append(row_d)
    return picks, dists


# ------------------------------------------------------------------------ op


def _mass(B, H, T, seed=0, kv_start=None):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, H, T, generator=g) ** 3  # skewed, like attention
    if kv_start is not None:
        for b, s in enumerate(kv_start):
            m[b, :, :s] = 0.0
    return m / m.sum(-1, keepdim=True)


@pytest.mark.parametrize("anchor", ANCHORS)
@pytest.mark.parametrize("B, H, T, G, n_kept", [
    (1, 4, 40, 5, 10), (3, 8, 97, 12, 20), (2, 1, 17, 3, 0), (2, 6, 30, 28, 5), (2, 5, 33, 0, 4),
    (1, 70, 50, 7, 9),  # more heads than a 64-bit word
])
def test_pick_matches_a_float64_loop(anchor, B, H, T, G, n_kept):
    g = torch.Generator().manual_seed(T + H)
    starts = [int(x) for x in torch.randint(0, T // 3, (B,), generator=g)]
    starts[0] = 0
    mass = _mass(B, H, T, seed=H, kv_start=starts)
    kept = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        kept[b, starts[b] + torch.randperm(T - starts[b], generator=g)[:n_kept]] = True
    ks = torch.tensor(starts)
    got = ops.kvcrush_pick(mass, kept, G, anchor=anchor, seed=7, kv_start=ks)
    want_p, want_d = pick_ref(mass, kept, G, anchor, 7, ks)
    assert got.picks.tolist() == want_p
    assert got.dist.tolist() == want_d
    if G and T - max(starts) - n_kept > G:
        wrong, _ = pick_ref(mass, kept, G, anchor, 7, ks, last=True)
        assert got.picks.tolist() != wrong


def test_pick_strided_inputs_and_seeds():
    mass = _mass(2, 6, 45, seed=3).transpose(1, 2).contiguous().transpose(1, 2)  # strided [B, H, T]
    kept = torch.zeros(2, 90, dtype=torch.uint8)[:, ::2]
    kept[:, 40:] = 1
    for seed in (0, 1, 2**40):
        got = ops.kvcrush_pick(mass, kept, 6, anchor="random", seed=seed)
        want_p, want_d = pick_ref(mass, kept, 6, "random", seed)
        assert got.picks.tolist() == want_p and got.dist.tolist() == want_d
    # the seed changes the anchor
    assert random_anchor(0, 16) != random_anchor(1, 16)


def test_pick_numpy_and_empty():
    import numpy as np

    mass = _mass(2, 3, 12).numpy()
    kept = np.zeros((2, 12), dtype=np.bool_)
    got = ops.kvcrush_pick(mass, kept, 3, anchor="mean")
    assert got.picks.tolist() == pick_ref(mass, kept, 3, "mean")[0]
    # a row that is all padding picks nothing
    got = ops.kvcrush_pick(_mass(1, 3, 5), torch.zeros(1, 5, dtype=torch.uint8), 2, kv_start=torch.tensor([5]))
    assert got.picks.tolist() == [[-1, -1]] and got.dist.tolist() == [[-1] * 5]
    assert ops.kvcrush_pick(torch.zeros(0, 3, 5), torch.zeros(0, 5, dtype=torch.uint8), 2).picks.shape == (0, 2)


def test_pick_rejects_bad_arguments():
    mass = _mass(2, 3, 10)
    kept = torch.zeros(2, 10, dtype=torch.uint8)
    with pytest.raises(KVCompressValueError, match="anchor"):
        ops.kvcrush_pick(mass, kept, 2, anchor="median")
    with pytest.raises(KVCompressTypeError, match="groups"):
        ops.kvcrush_pick(mass, kept, 2.0)
    with pytest.raises(KVCompressValueError, match="groups"):
        ops.kvcrush_pick(mass, kept, -1)
    with pytest.raises(KVCompressValueError, match="groups"):
        ops.kvcrush_pick(mass, kept, 11)
    with pytest.raises(KVCompressValueError, match="seed"):
        ops.kvcrush_pick(mass, kept, 2, seed=-1)
    with pytest.raises(KVCompressTypeError, match="mass"):
        ops.kvcrush_pick(mass.double(), kept, 2)
    with pytest.raises(KVCompressTypeError, match="kept"):
        ops.kvcrush_pick(mass, kept.float(), 2)
    with pytest.raises(KVCompressValueError, match="kept"):
        ops.kvcrush_pick(mass, kept[:, :9], 2)
    with pytest.raises(KVCompressValueError, match="mass"):
        ops.kvcrush_pick(mass[0], kept, 2)
    with pytest.raises(KVCompressValueError, match="kv_start"):
        ops.kvcrush_pick(mass, kept, 2, kv_start=torch.tensor([0, 11]))


# -------------------------------------------------------------------- method


def _prompt(batch=1, length=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (batch, length), generator=g)


def _generate(model, ids, mask=None, n=10):
    return greedy(model, ids, mask, n=n)[0]


def _topk(scores, k, forced, start):
    """Forced slots plus the best others: score descending, then slot."""
    rest = sorted((j for j in range(start, len(scores)) if j not in forced), key=lambda j: (-float(scores[j]), j))
    return set(forced) | set(rest[:k - len(forced)])


def kept_ref(q, k, budget, *, alpha, anchor, window, kernel, start=0, seed=0, last=False):
    """The slots one row keeps, from float64 queries/keys of one layer
    (``q`` [Hq, T, D], ``k`` [Hkv, T, D]) and nothing of the library."""
    T = k.shape[1]
    mass = window_attention64(q[None, :, -window:], k[None], torch.tensor([start]))[0]  # [Hq, T]
    imp = mass.mean(0)
    head = T - window
    if kernel > 1:
        pooled = torch.nn.functional.max_pool1d(imp[None, None, :head], kernel, 1, kernel // 2)[0, 0]
        imp = torch.cat([pooled, imp[head:]])
    G = max(0, min(int(alpha * budget), budget - window))
    base = _topk(imp, budget - G, set(range(T - window, T)), start)
    kept = torch.zeros(1, T, dtype=torch.bool)
    kept[0, sorted(base)] = True
    picks, _ = pick_ref(mass[None], kept, G, anchor, seed, [start], last=last)
    return sorted(base | {p for p in picks[0] if p >= 0})


@pytest.mark.parametrize("budget, alpha, kernel, anchor", [
    (24, 0.25, 1, "alternate"), (40, 0.5, 5, "random"), (12, 0.3, 3, "mean"), (20, 0.0, 1, "alternate"),
    (30, 0.4, 1, "mean"), (24, 0.25, 3, "random"),
])
def test_prefill_keeps_what_a_float64_recomputation_chooses(tiny_model, budget, alpha, kernel, anchor):
    ids = _prompt(batch=2, length=64)
    window = 6
    method = KVCrush(budget=budget, alpha=alpha, anchor=anchor, window=window, kernel=kernel, seed=3)
    cache = prefill(tiny_model, method, ids)
    mutated = 0
    for li, (q, k, _) in enumerate(layer_qkv(tiny_model, ids)):
        layer = cache.layers[li]
        assert layer.n == budget
        for b in range(2):
            want = kept_ref(q[b], k[b], budget, alpha=alpha, anchor=anchor, window=window, kernel=kernel, seed=3)
            for h in range(k.shape[1]):  # the same slots for every kv head
                assert layer.positions[b, h].tolist() == want, (li, b, h)
                torch.testing.assert_close(layer.keys[b, h].double(), k[b, h, want], rtol=1e-5, atol=1e-5)
            if alpha:
                wrong = kept_ref(q[b], k[b], budget, alpha=alpha, anchor=anchor, window=window, kernel=kernel,
                                 seed=3, last=True)
                mutated += wrong != want
    # the comparison discriminates: the wrong representative rule differs
    assert mutated > 0 or not alpha


def _view(B=2, Hq=4, Hkv=2, n=50, D=8, w=6, seed=0, kv_start=None):
    g = torch.Generator().manual_seed(seed)
    return LayerView(layer_idx=0, num_layers=1, queries=torch.randn(B, Hq, w, D, generator=g),
                     keys=torch.randn(B, Hkv, n, D, generator=g), values=torch.randn(B, Hkv, n, D, generator=g),
                     kv_start=kv_start, scaling=D ** -0.5, state={}, phase="prefill")


@pytest.mark.parametrize("kernel", [1, 5])
def test_alpha_zero_is_layer_shared_snapkv(kernel):
    """alpha=0 keeps SnapKV's selection made once for the layer: the window
    attention of every query head averaged, then pooled before the window."""
    ks = torch.tensor([0, 7])
    view = _view(kv_start=ks)
    got = KVCrush(budget=20, alpha=0.0, window=6, kernel=kernel).select(view, 20)
    mass = ops.window_scores(view.queries, view.keys, kv_start=ks)  # per kv head, mean over its group
    layer = mass.mean(1, keepdim=True)
    if kernel > 1:
        layer[..., :-6] = ops.pool1d(layer[..., :-6].contiguous(), kernel)
    want = ops.select_topk(layer, 20, window=6, kv_start=ks)
    assert torch.equal(got, want.expand(-1, 2, -1))
    if kernel == 1:
        # ... which is SnapKV's own per-head score averaged over the kv heads
        snap = SnapKV(budget=20, window=6, kernel=1).score(view).mean(1, keepdim=True)
        assert torch.equal(got[:, :1], ops.select_topk(snap, 20, window=6, kv_start=ks))
    # and alpha > 0 keeps the same window but different slots
    other = KVCrush(budget=20, alpha=0.5, window=6, kernel=kernel).select(view, 20)
    assert not torch.equal(other, got)
    assert set(range(44, 50)) <= set(other[1, 0].tolist())


def test_budget_above_prompt_is_identity(tiny_model):
    ids = _prompt(length=40)
    ref = _generate(tiny_model, ids)
    with kvc.compress(tiny_model, KVCrush(budget=200, window=4)) as session:
        out = _generate(tiny_model, ids)
    assert torch.equal(out, ref)
    assert all(layer.n == layer.seen == 40 + 9 for layer in session.cache.layers)


@pytest.mark.parametrize("anchor", ANCHORS)
def test_left_padded_rows_keep_and_generate_as_alone(tiny_model, anchor):
    short, long_ = _prompt(length=45, seed=3)[0], _prompt(length=70, seed=4)[0]
    ids = torch.zeros(2, 70, dtype=torch.long)
    mask = torch.zeros(2, 70, dtype=torch.long)
    ids[0, 25:], mask[0, 25:] = short, 1
    ids[1], mask[1] = long_, 1
    method = KVCrush(budget=24, alpha=0.4, anchor=anchor, window=4, kernel=3, interval=0)
    batch = prefill(tiny_model, method, ids, mask)
    alone = prefill(tiny_model, method, short[None])
    qkv = layer_qkv(tiny_model, ids, mask)
    for li in range(len(batch.layers)):
        # positions index the padded prompt
        assert (batch.layers[li].positions[0] - 25).tolist() == alone.layers[li].positions[0].tolist()
        q, k, _ = qkv[li]
        want = kept_ref(q[0], k[0], 24, alpha=0.4, anchor=anchor, window=4, kernel=3, start=25)
        assert batch.layers[li].positions[0, 0].tolist() == want
    with kvc.compress(tiny_model, method):
        out = _generate(tiny_model, ids, mask)
    with kvc.compress(tiny_model, method):
        solo = _generate(tiny_model, short[None])
    assert torch.equal(out[0, 70:], solo[0, 45:])


def test_decoding_keeps_the_budget(tiny_model):
    ids = _prompt(length=50, seed=8)
    with kvc.compress(tiny_model, KVCrush(budget=20, window=4, interval=4)) as session:
        _generate(tiny_model, ids, n=12)
    for layer in session.cache.layers:
        assert 20 <= layer.n < 20 + 4


@pytest.mark.parametrize("kw, exc, name", [
    (dict(budget=16, alpha=1.0), ValueError, "alpha"),
    (dict(budget=16, alpha=-0.1), ValueError, "alpha"),
    (dict(budget=16, alpha=float("nan")), ValueError, "alpha"),
    (dict(budget=16, alpha="0.5"), TypeError, "alpha"),
    (dict(budget=16, anchor="median"), ValueError, "anchor"),
    (dict(budget=16, anchor=1), TypeError, "anchor"),
    (dict(budget=16, seed=-1), ValueError, "seed"),
    (dict(budget=16, window=0), ValueError, "window"),
    (dict(budget=16, kernel=4), ValueError, "kernel"),
    (dict(budget=16, pool="min"), ValueError, "pool"),
    (dict(budget=8, window=16), ValueError, "budget"),
    (dict(), ValueError, "budget"),
])
def test_bad_options_name_the_option(kw, exc, name):
    with pytest.raises(exc, match=name):
        KVCrush(**kw)


def test_registered_and_built_from_a_spec():
    assert REGISTRY["kvcrush"] is KVCrush and kvc.KVCrush is KVCrush
    m = method_from_spec("kvcrush:alpha=0.25", ratio=0.5)
    assert (m.alpha, m.anchor, m.ratio) == (0.25, "alternate", 0.5)
    m = method_from_spec("kvcrush:alpha=0.5:anchor=random:seed=3", budget=64)
    assert (m.alpha, m.anchor, m.seed, m.budget) == (0.5, "random", 3, 64)
    assert m.describe() == "KVCrush(budget=64, alpha=0.5, anchor=random, seed=3, window=16, kernel=13, pool=max)"
    with pytest.raises(ValueError, match="anchor"):
        method_from_spec("kvcrush:anchor=median", budget=64)


def test_cli_methods_spec(tiny_lm, tmp_path, capsys):
    import json

    from kvcompress import cli

    _, _, folder = tiny_lm
    out = tmp_path / "kvcrush"
    args = ["eval", "--model", str(folder), "--methods", "kvcrush:alpha=0.25:window=4", "--budgets", "24",
            "--tasks", "ppl", "--ppl-context", "48", "--ppl-tokens", "8", "--ppl-windows", "1", "--no-progress",
            "--out", str(out)]
    assert cli.main(args) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert any("KVCrush" in json.dumps(r) or "kvcrush" in json.dumps(r) for r in rows[1:])
    assert cli.main(["eval", "--methods", "kvcrush:anchor=median"]) == 2
    assert "anchor" in capsys.readouterr().err
