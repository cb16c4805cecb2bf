"""EMS decode-time re-compression (step 7) on a tiny random Llama.

Each re-compression is checked against a float64 recomputation from the
slots the layer held just before it (window attention of the recent
queries, carried scores, top-k, cosine assignment with the zero class,
score x count weighted merge), and the long-run properties: bounded memory,
every token accounted for when everything merges.
"""

import copy
import functools
import math

import pytest
import torch

import kvcompress as kvc
from kvcompress.cache import CompressedLayer
from kvcompress.methods import EMS

# uniform head budgets (the per-head checks below expect every head to keep the same count)
# and the S-only selection (no local picks: tests/test_ems_local.py checks those)
UEMS = functools.partial(EMS, head_budget="uniform", local_share=0.0, obs=None)

BUDGET, WINDOW, SINKS, INTERVAL = 16, 4, 2, 8


def _ids(length=60, seed=5, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (batch, length), generator=g)


def _generate(model, method, ids, new_tokens, mask=None):
    mask = torch.ones_like(ids) if mask is None else mask
    with kvc.compress(model, method) as session:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0)
    return session.cache


def _recompress64(before, method):
    """Float64 re-compression of one layer from the held slots ``before``
    (captured from ``to_padded`` and the layer): per head, the expected
    ``(positions, keys, values, counts, carried)``."""
    keys, values, pos, counts, carried, start, queries, budgets, scaling = before
    out = []
    for i in range(keys.shape[0]):
        s = int(start[i])
        K, V = keys[i, 0, s:].double(), values[i, 0, s:].double()
        P, c, C = pos[i, s:], counts[i, s:].double(), carried[i, s:].double()
        n, k = K.shape[0], int(budgets[i])
        Q = queries[i].double()  # [G, q, D]: the last min(window, interval) queries
        q = Q.shape[1]
        assert q == min(method.window, method.interval)
        logits = scaling * Q @ K.T  # [G, q, n]
        causal = torch.arange(n)[None, :] <= (torch.arange(q) + n - q)[:, None]
        L = torch.softmax(logits.masked_fill(~causal, -math.inf), -1).mean((0, 1))
        w = min(method.window, int(budgets.min()))
        sinks = min(method.sinks, int(budgets.min()) - w)
        cand = torch.zeros(n, dtype=torch.bool)
        cand[sinks : n - w] = True
        C = torch.where(torch.isnan(C), L, C)
        S = method.lam * C / C[cand].sum() + (1 - method.lam) * L / L[cand].sum()
        free = sorted(torch.nonzero(cand).flatten().tolist(), key=lambda j: -float(S[j]))[: k - sinks - w]
        centers = sorted(list(range(sinks)) + free + list(range(n - w, n)))
        others = [j for j in range(n) if j not in centers]
        u = K / K.norm(dim=1, keepdim=True)
        cos = u[others] @ u[centers].T
        best, arg = cos.max(1)
        tau = float(best.mean()) if method.tau is None else method.tau
        wt = S * c
        k_acc = {ci: wt[j] * u[j] for ci, j in enumerate(centers)}
        v_acc = {ci: wt[j] * V[j] for ci, j in enumerate(centers)}
        w_acc = {ci: wt[j] for ci, j in enumerate(centers)}
        n_acc = {ci: c[j] for ci, j in enumerate(centers)}
        for r, j in enumerate(others):
            if float(best[r]) < tau:
                continue
            ci = int(arg[r])
            k_acc[ci] = k_acc[ci] + wt[j] * u[j]
            v_acc[ci] = v_acc[ci] + wt[j] * V[j]
            w_acc[ci] = w_acc[ci] + wt[j]
            n_acc[ci] = n_acc[ci] + c[j]
        ks = torch.stack([K[j].norm() * k_acc[ci] / k_acc[ci].norm() for ci, j in enumerate(centers)])
        vs = torch.stack([v_acc[ci] / w_acc[ci] for ci in range(len(centers))])
        ns = torch.stack([n_acc[ci] for ci in range(len(centers))])
        out.append((P[centers], ks, vs, ns, S[centers]))
    return out


@pytest.fixture
def captured(monkeypatch):
    """Record every re-compression: the held slots before, the store after."""
    calls = []
    original = CompressedLayer._recompress_heads

    def spy(self, scaling, rows=None):
        before = self.ragged.to_padded() + (self.recent_q.reshape(-1, self.recent_q.shape[1] // self.ragged.heads,
                                                                  *self.recent_q.shape[2:]).clone(),
                                            torch.minimum(self.head_budgets.reshape(-1), self.ragged.lengths),
                                            scaling)
        original(self, scaling, rows=rows)
        after = copy.copy(self.ragged)  # later appends write into the live store
        for name in ("k", "v", "positions", "offsets", "lengths", "counts", "scores"):
            setattr(after, name, getattr(self.ragged, name).clone())
        calls.append((before, after))

    monkeypatch.setattr(CompressedLayer, "_recompress_heads", spy)
    return calls


@pytest.mark.parametrize("tau", [None, math.inf, -math.inf], ids=["adaptive", "evict", "merge-all"])
@pytest.mark.parametrize("lam", [0.5, 1.0])
@pytest.mark.parametrize("window", [WINDOW, 12], ids=["window<interval", "window>interval"])
def test_recompression_matches_float64(tiny_model, captured, tau, lam, window):
    method = UEMS(budget=BUDGET, window=window, sinks=SINKS, interval=INTERVAL, tau=tau, lam=lam)
    _generate(tiny_model, method, _ids(), 2 * INTERVAL + 1)
    layers = tiny_model.config.num_hidden_layers
    assert len(captured) == 2 * layers  # two rounds, every layer
    for before, store in captured:
        expected = _recompress64(before, method)
        for i, (pos, k, v, counts, carried) in enumerate(expected):
            b, h = divmod(i, store.heads)
            hk, hv, hp = store.head(b, h)
            start, n = int(store.offsets[i]), int(store.lengths[i])
            assert hp.tolist() == pos.tolist()
            torch.testing.assert_close(hk.double(), k, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(hv.double(), v, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(store.counts[start : start + n].double(), counts)
            torch.testing.assert_close(store.scores[start : start + n].double(), carried, rtol=1e-4, atol=1e-7)
            if tau == math.inf:
                assert bool((counts == 1).all())


def test_memory_stays_flat_and_merging_everything_keeps_every_token(tiny_model):
    method = UEMS(budget=BUDGET, window=WINDOW, sinks=SINKS, interval=INTERVAL, tau=-math.inf)
    sizes = set()
    for new in (INTERVAL + 1, 3 * INTERVAL + 1, 9 * INTERVAL + 1):
        cache = _generate(tiny_model, method, _ids(), new)
        sizes.add(cache.memory_bytes())
        for layer in cache.layers:
            store = layer.ragged
            assert store.lengths.tolist() == [BUDGET] * store.lengths.numel()  # right after a round
            assert store.caps.tolist() == [BUDGET + INTERVAL] * store.caps.numel()
            seen = layer.seen
            for i in range(store.lengths.numel()):
                start, n = int(store.offsets[i]), int(store.lengths[i])
                assert float(store.counts[start : start + n].sum()) == seen
                assert store.positions[start : start + n].tolist()[-WINDOW:] == list(range(seen - WINDOW, seen))
    assert len(sizes) == 1, sizes


def test_no_interval_appends_without_recompressing(tiny_model):
    cache = _generate(tiny_model, UEMS(budget=BUDGET, window=WINDOW, sinks=SINKS, interval=0), _ids(), 21)
    for layer in cache.layers:
        assert layer.ragged.lengths.tolist() == [BUDGET + 20] * layer.ragged.lengths.numel()
        assert layer.head_budgets is None and layer.recent_q is None


def test_tokens_before_the_first_round_match_no_interval(tiny_model):
    ids = _ids()
    mask = torch.ones_like(ids)

    def run(interval):
        with kvc.compress(tiny_model, UEMS(budget=BUDGET, window=WINDOW, sinks=SINKS, interval=interval)):
            return tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3 * INTERVAL,
                                       min_new_tokens=3 * INTERVAL, do_sample=False, pad_token_id=0)

    a, b = run(INTERVAL), run(0)
    n = ids.shape[1] + INTERVAL + 1  # the step that triggers a round still reads the old slots
    assert torch.equal(a[:, :n], b[:, :n])


def test_prompt_within_budget_is_compressed_once_decoding_outgrows_it(tiny_model):
    cache = _generate(tiny_model, UEMS(budget=40, window=WINDOW, sinks=SINKS, interval=INTERVAL, tau=-math.inf),
                      _ids(length=30), 19)  # 30 + 18 appended = 40 + INTERVAL
    for layer in cache.layers:
        assert layer.ragged is not None
        assert layer.ragged.lengths.tolist() == [40] * layer.ragged.lengths.numel()
        counts = layer.ragged.counts[layer.ragged.live_rows()].view(-1, 40)
        assert counts.sum(1).tolist() == [48.0] * counts.shape[0]


def test_left_padded_batch_recompresses_real_tokens_only(tiny_model):
    ids = _ids(length=40)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    cache = _generate(tiny_model, UEMS(budget=BUDGET, window=WINDOW, sinks=SINKS, interval=INTERVAL,
                                      tau=-math.inf), ids, INTERVAL + 1, mask=mask)
    for layer in cache.layers:
        store = layer.ragged
        for h in range(store.heads):
            for b, real in ((0, 40 + INTERVAL), (1, 31 + INTERVAL)):
                i = b * store.heads + h
                start, n = int(store.offsets[i]), int(store.lengths[i])
                assert float(store.counts[start : start + n].sum()) == real
                assert int(store.positions[start : start + n].min()) >= (9 if b else 0)


@pytest.mark.parametrize("bad, err", [(-1, ValueError), (True, TypeError), (2.0, TypeError)])
def test_interval_is_validated(bad, err):
    with pytest.raises(err, match="interval"):
        UEMS(budget=8, interval=bad)


def test_padded_copy_holds_each_head_right_aligned(tiny_model):
    cache = _generate(tiny_model, EMS(budget=BUDGET, window=WINDOW, sinks=SINKS, interval=0,
                                      head_budget="adaptive", alpha=0.0, lam=0.0), _ids(), 3)
    for layer in cache.layers:
        store = layer.ragged
        keys, values, pos, counts, scores, start = store.to_padded()
        M = int(store.lengths.max())
        assert keys.shape[:3] == (store.batch * store.heads, 1, M) and bool((start == M - store.lengths).all())
        for i in range(store.batch * store.heads):
            hk, hv, hp = store.head(*divmod(i, store.heads))
            s = int(start[i])
            assert torch.equal(keys[i, 0, s:], hk) and torch.equal(values[i, 0, s:], hv)
            assert torch.equal(pos[i, s:], hp)
            assert bool((keys[i, 0, :s] == 0).all()) and bool(torch.isnan(scores[i]).all())
            rows = store.live_rows()[int(store.lengths[:i].sum()):][: int(store.lengths[i])]
            assert torch.equal(counts[i, s:], store.counts[rows])
