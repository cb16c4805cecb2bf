"""Seeded random sequences of operations on the packed stores, checked after
every step against a shadow of what went in.

The other store tests follow one path each (a prefill, a few decode steps,
one option). Here each case draws a shape and a set of options (bits, value
bits, group, residual, sinks, rotated keys, clipped values, left padding,
dtype) and then a sequence of the calls a cache makes: appends of one token
or a chunk, the attention that follows each, ``settle`` with the rows'
padding, beam-search reorders with repeated rows, and decode-time rounds (read
back, keep some slots, pack again; for the per-head store with merges, with
and without ``keep_rows``). After every step:

- every slot a row holds is where its token went in, in order: the sink
  block and the residual bit for bit, a packed slot within half a
  quantization step of the widest range its group could have (the range of
  its channel over the row's tokens for keys, in the packing basis; of its
  token over the channels for values); the packed part is whole groups and
  the residual within ``[residual, residual + group)`` once it packs;
- the kernel's attention (``store.attend``) agrees with a float64 attention
  over the store's dequantized slots within twice torch's own error in the
  same dtype, with the rows' padding masked and, for a chunk, causally; and
  on another thread count it gives the same bits (a quarter of the steps).

The shadow is independent of the store: plain tensors of the keys and
values appended, reordered and cut as the calls say.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from kvcompress import ops
from kvcompress.stores import PackedStore, RaggedPackedStore, RaggedStore, UniformStore
from kvcompress.stores.base import AttentionSpec
from kvcompress.stores.feedback import compact, feedback_weights
from kvcompress.stores.keep_rows import arrange
from kvcompress.stores.masked import build_mask, masked_attention
from kvcompress.stores.packed_ragged import RaggedPackedStore
from test_kivi import _attention64

CASES = 40  # per store kind; each a few dozen steps (about 6 s in all)


def _orthogonal(D: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64, generator=g))
    return q.to(torch.float32)


def _same_on_other_threads(attend, out) -> None:
    """``attend()`` again on a different thread count gives ``out`` bit for
    bit (the kernel's split does not depend on it)."""
    before = ops.get_num_threads()
    ops.set_num_threads(1 if before > 1 else 2)
    try:
        again = attend()
    finally:
        ops.set_num_threads(before)
    assert torch.equal(again, out), "another thread count changed the output"


def _tol(dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2e-2


def _key_bound(keys, real, bits, rotation):
    """Half a step of the widest range a key group of these tokens can
    have: ``[..., D]`` per channel, over the row's real tokens (``real``:
    bool ``[..., n]``), in the packing basis."""
    k = keys.double()
    if rotation is not None:
        k = k @ rotation.double()
    big = torch.finfo(torch.float64).max
    hi = k.masked_fill(~real[..., None], -big).amax(-2)
    lo = k.masked_fill(~real[..., None], big).amin(-2)
    return ((hi - lo).clamp(min=0) / (2**bits - 1) / 2)[..., None, :]


def _value_bound(values, bits):
    v = values.double()
    return (v.amax(-1, keepdim=True) - v.amin(-1, keepdim=True)) / (2**bits - 1) / 2


def store_on(store, device):
    """A copy of a store with every tensor (and dict of tensors) on `device`
    (here the checks' side, the CPU; test_cuda.py moves stores both ways)."""
    out = copy.copy(store)
    for name, value in vars(store).items():
        if isinstance(value, torch.Tensor):
            setattr(out, name, value.to(device))
        elif isinstance(value, dict) and all(isinstance(t, torch.Tensor) for t in value.values()):
            setattr(out, name, {k: t.to(device) for k, t in value.items()})
    return out


def _steps(c, rounds: float, chunks: float) -> None:
    """20 to 59 random steps of case ``c``, each checked: a beam reorder
    (1 in 10, batches of more than one row), a decode-time round (share
    ``rounds``), else a decode step, or with share ``chunks`` a chunk of 2 to
    5 tokens (a next turn's prompt), with its attention and ``settle``."""
    rng = c.rng
    for _ in range(rng.randrange(20, 60)):
        op = rng.random()
        if op < 0.1 and c.B > 1:
            c.reorder()
        elif rounds and op < 0.1 + rounds:
            c.round()
        else:
            q = 1 if op < 1 - chunks else rng.randrange(2, 6)
            c.append(q)
            c.attend(q)
            c.settle()
        c.check()


# --------------------------------------------------------------- uniform
class _UniformCase:
    """A PackedStore and its shadow: ``keys``/``values`` ``[B, H, n, D]`` as
    appended, ``pads`` leading padded slots per row."""

    def __init__(self, seed: int, device: str = "cpu"):
        rng = random.Random(seed)
        self.rng, self.dev = rng, torch.device(device)
        self.g = torch.Generator().manual_seed(seed)
        self.B = rng.choice([1, 2, 3])
        self.H = rng.choice([1, 2])
        self.Hq = self.H * rng.choice([1, 3])
        self.D = rng.choice([16, 32, 64])
        self.G = rng.choice([8, 16, 32])
        self.R = rng.choice([4, 16, 40])
        self.bits = rng.choice([2, 4, 8])
        self.vbits = rng.choice([None, None, 2, 4, 8])
        self.sinks = rng.choice([0, 0, 2, 4])
        self.rotation = _orthogonal(self.D, self.g) if rng.random() < 0.3 else None
        self.clip = rng.random() < 0.2
        self.dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16])
        # decode-time rounds (an evictor that keeps its budget): the store
        # comes from a UniformStore with its columns, as the cache makes it
        self.rounds = rng.random() < 0.4
        # each row of a padded batch on its own schedule (what a KIVI layer
        # allows when nothing else ties the rows; the store starts it only
        # without sinks); drawn apart so the cases above keep their draws
        self.rows_apart = not self.rounds and random.Random(seed + 7_777).random() < 0.5
        self.store = None if self.rounds else PackedStore(self.bits, self.G, self.R, self.vbits)
        if self.store is not None:
            self.store.sinks, self.store.value_clip = self.sinks, self.clip
            self.store.rows_apart = self.rows_apart
            self.store.rotation = None if self.rotation is None else self.rotation.to(self.dev)
        self.keys = self.values = None
        self.pads = [0] * self.B
        self.pos = 0

    def describe(self) -> str:
        return (f"B={self.B} H={self.H} Hq={self.Hq} D={self.D} G={self.G} R={self.R} bits={self.bits}/"
                f"{self.vbits} sinks={self.sinks} rotated={self.rotation is not None} clip={self.clip} "
                f"{self.dtype} pads={self.pads} rows_apart={self.rows_apart}")

    def _tokens(self, q):
        # channel outliers, as KIVI assumes, so that groups differ in range
        scale = torch.linspace(0.2, 3.0, self.D)
        k = (torch.randn(self.B, self.H, q, self.D, generator=self.g) * scale).to(self.dtype)
        v = torch.randn(self.B, self.H, q, self.D, generator=self.g).to(self.dtype)
        return k, v

    def append(self, q: int, pads=None):
        k, v = self._tokens(q)
        if pads is not None:
            self.pads = pads
            # what a padded slot holds must not matter: garbage of a wide range
            for b, p in enumerate(pads):
                k[b, :, :p] = 1e3 * torch.randn(self.H, p, self.D, generator=self.g).to(self.dtype)
        if self.store is None:
            first = UniformStore()
            # a store adopts its first chunk's tensors (a model's fresh projections): not the shadow's
            first.append(k.to(self.dev, copy=True), v.to(self.dev, copy=True), self.pos)
            self.store = self._from_uniform(first)
        else:
            self.store.append(k.to(self.dev), v.to(self.dev), self.pos)
        self.keys = k if self.keys is None else torch.cat([self.keys, k], 2)
        self.values = v if self.values is None else torch.cat([self.values, v], 2)
        self.pos += q

    def _from_uniform(self, uniform) -> PackedStore:
        rotation = None if self.rotation is None else self.rotation.to(self.dev)
        return PackedStore.from_uniform(uniform, self.bits, self.G, self.R, self.vbits, columns=True,
                                        rotation=rotation, sinks=self.sinks, value_clip=self.clip)

    def round(self):
        """A uniform layer's decode-time round: every slot read back
        (``unpacked``), the same number kept in every head, packed again."""
        u = self.store.unpacked()
        n = u.n
        K = self.rng.randrange(max(1, n // 2), n + 1)
        idx = torch.stack([torch.stack([torch.randperm(n, generator=self.g)[:K].sort().values
                                        for _ in range(self.H)]) for _ in range(self.B)])
        u.keep(idx.to(self.dev))
        self.keys, self.values = u.keys.cpu().clone(), u.values.cpu().clone()
        self.store = self._from_uniform(u)
        self.settle()

    def kv_start(self):
        return torch.tensor(self.pads, dtype=torch.int64) if any(self.pads) else None

    def attend(self, q: int):
        query = torch.randn(self.B, self.Hq, q, self.D, generator=self.g).to(self.dtype)
        scaling = self.D**-0.5
        spec = AttentionSpec(scaling=scaling)
        ks = self.kv_start()

        def attend():
            return self.store.attend(query.to(self.dev), spec, kv_start=None if ks is None else ks.to(self.dev)).cpu()

        out = attend()
        if self.rng.random() < 0.25:
            _same_on_other_threads(attend, out)
        k, v = (t.cpu() for t in self.store.dequantized())
        ref = _attention64(query, k, v, scaling, ks)
        n = int(k.shape[2])
        mask = build_mask(self.B, q, n, "cpu", kv_start=ks)
        torch_err = (masked_attention(query, k, v, spec, mask).double() - ref).abs().max().item()
        err = (out.double() - ref).abs().max().item()
        assert err <= 2 * torch_err + _tol(self.dtype), (err, torch_err)

    def settle(self):
        self.store.settle(pad=self.pads if any(self.pads) else None)

    def reorder(self):
        idx = torch.tensor([self.rng.randrange(self.B) for _ in range(self.B)])
        self.store.index_batch(idx.to(self.dev))
        self.keys, self.values = self.keys.index_select(0, idx), self.values.index_select(0, idx)
        self.pads = [self.pads[i] for i in idx.tolist()]

    def check(self):
        st = self.store
        n = int(self.keys.shape[2])
        assert st.n == n and st.batch == self.B
        assert st.n_packed % self.G == 0
        rows = st._np is not None
        assert not rows or self.rows_apart  # (a reorder may leave no row padded)
        if st.n_packed and not rows:
            assert self.R <= st.r < self.R + self.G
        k, v = (t.cpu() for t in st.dequantized())
        assert k.shape == self.keys.shape and k.dtype == self.dtype
        # which logical slots are packed: the sink block sits at _sink_at[b]
        # in the logical order, the packed part is the rest's first n_packed;
        # in row mode a row's packed part is its first _np[b] real tokens
        real = torch.arange(n)[None, :] >= torch.tensor(self.pads)[:, None]  # [B, n]
        packed = torch.zeros(self.B, n, dtype=torch.bool)
        for b in range(self.B):
            rest = torch.arange(n)
            if st.n_sinks:
                at = st._sink_at[b]
                rest = torch.cat([rest[:at], rest[at + st.n_sinks:]])
            if rows:
                # the row's own packed slots: the first real ones after its sink block
                p, m = min(self.pads[b], len(rest)), st._np[b]
                full_precision = len(rest) - p - m
                assert m % self.G == 0 and (not m or self.R <= full_precision < self.R + self.G), (b, m, p)
                packed[b, rest[p : p + m]] = True
                continue
            packed[b, rest[: st.n_packed]] = True
        full = real & ~packed
        fk, fv = full[:, None, :, None].expand_as(k), full[:, None, :, None].expand_as(v)
        assert torch.equal(k[fk], self.keys[fk]) and torch.equal(v[fv], self.values[fv])
        if not st.n_packed:
            return
        pk = (packed & real)[:, None, :].expand(self.B, self.H, n)
        eps = _tol(self.dtype)
        # keys, in the basis they were packed in (dequantized() turned them back)
        kb = _key_bound(self.keys, real[:, None, :].expand(self.B, self.H, n), self.bits, self.rotation)
        ko, kd = self.keys.double(), k.double()
        if self.rotation is not None:
            rot = self.rotation.double()
            ko, kd = ko @ rot, kd @ rot
        scale = ko.abs().amax().item()
        slack = eps * (1 + scale) * (4 if self.rotation is not None else 1)
        kerr = (kd - ko).abs() - kb.expand_as(ko) * (1 + 1e-5)
        assert bool((kerr[pk] <= slack).all()), kerr[pk].max().item()
        if not self.clip:  # clipped value ranges give up the bound for their outliers
            vbits = self.vbits or self.bits
            verr = (v.double() - self.values.double()).abs() - _value_bound(self.values, vbits) * (1 + 1e-5)
            assert bool((verr[pk] <= eps * (1 + self.values.double().abs().amax().item())).all())


@pytest.mark.parametrize("seed", range(CASES))
def test_uniform_packed_store_through_random_sequences(seed):
    run_uniform(seed)


def run_uniform(seed: int, device: str = "cpu") -> None:
    """One uniform case (also run on CUDA by tests/test_cuda.py)."""
    c = _UniformCase(seed, device)
    rng = c.rng
    prompt = rng.randrange(1, 3 * c.R + 4 * c.G + c.sinks)
    # rounds re-select every row's slots alike: their cases have no padding
    pads = [rng.randrange(0, max(1, prompt // 3)) if c.B > 1 and not c.rounds else 0 for _ in range(c.B)]
    c.append(prompt, pads)
    try:
        c.attend(min(prompt, 4)) if c.store.r >= min(prompt, 4) else None
        c.settle()
        c.check()
        _steps(c, rounds=0.1 if c.rounds else 0.0, chunks=0.2)
    except AssertionError as e:
        raise AssertionError(f"{c.describe()}: {e}") from e


def _rows_case(seed: int):
    """A left-padded batch in row mode beside one single-row store per row,
    fed only that row's real tokens: ``(rng, g, batch, solos, pads, dims, T,
    choices)``; ``choices`` (or None: the store's own serve every row) are
    each row's ``(rotation, feedback triangle, clip)``, which the batch
    takes at the row's first pack (``set_row_choice``) and its solo store
    holds from the start."""
    rng = random.Random(50_000 + seed)
    g = torch.Generator().manual_seed(50_000 + seed)
    B, H = rng.choice([2, 3]), rng.choice([1, 2])
    dims = dict(B=B, H=H, Hq=H * rng.choice([1, 3]), D=rng.choice([16, 32, 64]),
                dtype=rng.choice([torch.float32, torch.float32, torch.bfloat16]))
    G, R, bits, vbits = rng.choice([8, 16, 32]), rng.choice([4, 16, 40]), rng.choice([2, 4, 8]), \
        rng.choice([None, 2, 4, 8])
    rotation = _orthogonal(dims["D"], g) if rng.random() < 0.3 else None
    clip = rng.random() < 0.2
    sinks = rng.choice([0, 0, 2, 4])

    def make(rot=rotation, tri=None, cl=clip):
        st = PackedStore(bits, G, R, vbits)
        st.rows_apart, st.rotation, st.feedback, st.value_clip, st.sinks = True, rot, tri, cl, sinks
        return st

    T = rng.randrange(2, 3 * R + 4 * G + sinks)
    pads = [rng.randrange(0, T) for _ in range(B)]
    pads[rng.randrange(B)] = 0  # the longest row fills the batch, as left padding has it
    choices = None
    if rng.random() < 0.5:
        # each row its own rotation, feedback weights and clipping (drawn apart from the tokens)
        gc = torch.Generator().manual_seed(70_000 + seed)
        rot = _orthogonal(dims["D"], gc)
        choices = []
        for _ in range(B):
            x = torch.randn(dims["H"], 3 * dims["D"], dims["D"], generator=gc, dtype=torch.float64)
            tri = compact(feedback_weights(x.transpose(1, 2) @ x)) if rng.random() < 0.5 else None
            choices.append((rot if rng.random() < 0.5 else None, tri, rng.random() < 0.4))
        return rng, g, make(None, None, False), [make(*c) for c in choices], pads, dims, T, choices
    return rng, g, make(), [make() for _ in range(B)], pads, dims, T, None


def _take_row_choices(batch, pads, choices) -> None:
    """As the layer does (``CompressedLayer._settle``): with per-row
    ``choices`` drawn, each row takes its own just before its first pack."""
    if choices is None:
        return
    batch.take_sinks(pad=pads)
    if batch.start_rows(pads, unpadded=True):
        for b, due in enumerate(batch.row_dues()):
            if due and (batch._choices is None or batch._choices[b] is None):
                batch.set_row_choice(b, *choices[b])


def _random_steps(rng, B: int, count: int, p_reorder: float, step, reorder) -> None:
    """``count`` random steps of a row-mode harness: with probability
    ``p_reorder`` a beam reorder with repeated rows (``reorder(idx)``), else
    a decode step (``step(1)``) or, 15% of the time, a chunk of 2-5 tokens."""
    for _ in range(count):
        op = rng.random()
        if op < p_reorder:
            reorder([rng.randrange(B) for _ in range(B)])
        else:
            step(1 if op < 0.85 else rng.randrange(2, 6))


def _rows_tokens(g, dims, q):
    scale = torch.linspace(0.2, 3.0, dims["D"])
    shape = (dims["B"], dims["H"], q, dims["D"])
    k = (torch.randn(shape, generator=g) * scale).to(dims["dtype"])
    return k, torch.randn(shape, generator=g).to(dims["dtype"])


@pytest.mark.parametrize("one_call", [True, False], ids=["one call", "joined"])
@pytest.mark.parametrize("seed", range(16))
def test_padded_rows_hold_and_read_what_each_row_does_alone(seed, one_call, monkeypatch):
    """Row mode (``PackedStore.rows_apart``): after every step each row of a
    left-padded batch holds bit for bit what a store of that row alone
    holds (same packed slots, same codes, same residual, dequantized), and
    reads the same attention (within float rounding: the batch reads its
    rows in the per-head layout), through decode steps, chunks and beam
    reorders with repeated rows, with and without a sink block, and with
    each row's own rotation, feedback weights and clipping, set at its
    first pack, where the store's serve no row. Read in one
    kernel call (``residual_hidden``, the CPU's) or as where the kernel
    lacks it (CUDA): packed part, residual and sink block in calls of their
    own joined by log-sum-exp."""
    import kvcompress.stores.packed as packed_store

    if not one_call:
        monkeypatch.setattr(packed_store, "one_call", lambda query: False)
    rng, g, batch, solos, pads, dims, T, choices = _rows_case(seed)
    spec = AttentionSpec(scaling=dims["D"] ** -0.5)
    tol = _tol(dims["dtype"])

    def feed(q, first=False):
        k, v = _rows_tokens(g, dims, q)
        if first:
            for b, p in enumerate(pads):  # padded slots hold garbage of a wide range
                k[b, :, :p] = 1e3
        batch.append(k, v, 0)
        for b, st in enumerate(solos):
            p = pads[b] if first else 0
            st.append(k[b : b + 1, :, p:], v[b : b + 1, :, p:], 0)
        query = torch.randn(dims["B"], dims["Hq"], q, dims["D"], generator=g).to(dims["dtype"])
        if q <= min(T - p for p in pads):
            out = batch.attend(query, spec, kv_start=torch.tensor(pads)).double()
            for b, st in enumerate(solos):
                alone = st.attend(query[b : b + 1], spec).double()
                assert (out[b : b + 1] - alone).abs().max().item() <= tol * (1 + alone.abs().max().item()), b
        _take_row_choices(batch, pads, choices)
        batch.settle(pad=pads)
        for st in solos:
            st.settle()
        if choices is not None and batch._choices is not None:
            for b, c in enumerate(batch._choices):
                assert c is None or c == (choices[b][0] is not None, choices[b][1], choices[b][2]), b
            done = [b for b in range(dims["B"]) if batch._np[b]]
            if done:  # a row that has packed keeps its choice
                with pytest.raises(RuntimeError, match="set_row_choice: row"):
                    batch.set_row_choice(done[0], None, None, False)
        k_all, v_all = batch.dequantized()
        # row mode starts at the first settle that packs (with a row padded: a
        # reorder may have left none); until then every row holds its tokens unpacked
        assert batch._np is not None or not batch.n_packed or not any(pads)
        packed = batch._np or [batch.n_packed] * dims["B"]
        for b, st in enumerate(solos):
            # (a sink block may be taken earlier in the batch: it is full precision either way)
            assert packed[b] == st.n_packed and batch.n - pads[b] == st.n, (b, batch, st)
            ks, vs = st.dequantized()
            assert torch.equal(k_all[b, :, pads[b]:], ks[0]) and torch.equal(v_all[b, :, pads[b]:], vs[0]), b

    def reorder(idx):
        batch.index_batch(torch.tensor(idx))
        solos[:] = [copy.deepcopy(solos[i]) for i in idx]
        pads[:] = [pads[i] for i in idx]
        if choices is not None:
            choices[:] = [choices[i] for i in idx]

    def step(n):
        nonlocal T
        T += n
        feed(n)

    feed(T, first=True)
    _random_steps(rng, dims["B"], rng.randrange(20, 50), 0.1, step, reorder)


@pytest.mark.parametrize("one_call", [True, False], ids=["one call", "joined"])
@pytest.mark.parametrize("seed", range(12))
def test_sliding_rows_hold_and_read_what_each_row_does_alone(seed, one_call, monkeypatch):
    """Row mode on a sliding-window layer: each row of a left-padded batch
    starts its key groups at its first real token and drops its own groups
    once the window has passed them (``drop_unseen``), so after every step
    it holds bit for bit what a store of that row alone holds, fed only its
    tokens, and a decode step (one kernel call, the window's oldest slots
    masked per row by the ragged layout's ``kv_start``) or a chunk (the
    eager path) reads the same attention within float rounding, through
    beam reorders, with each row's own choices where drawn. Where the
    kernel takes no ``residual_hidden`` (CUDA; "joined") a decode step
    reads the packed part and the residual in two calls, the window's
    prefix split between their ``kv_start``."""
    import kvcompress.stores.packed as packed_store

    if not one_call:
        monkeypatch.setattr(packed_store, "one_call", lambda query: False)
    rng, g, batch, solos, pads, dims, T, choices = _rows_case(seed)
    G, R = batch.group, batch.residual
    for st in [batch, *solos]:
        st.sinks = 0  # sliding layers keep none
    keep = R + G + 1 + rng.randrange(0, 3 * G)  # _packs_window: more than the residual and a group
    window = keep + 1
    spec = AttentionSpec(scaling=dims["D"] ** -0.5, window=window)
    tol = _tol(dims["dtype"])
    first = list(pads)  # each row's first real token position (its solo store's position 0)
    start = list(pads)  # the layer's kv_start: the padding still in the logical order

    def feed(q, initial=False):
        nonlocal T
        k, v = _rows_tokens(g, dims, q)
        batch.append(k, v, T - q)
        for b, st in enumerate(solos):
            p = start[b] if initial else 0
            st.append(k[b : b + 1, :, p:], v[b : b + 1, :, p:], T - q - first[b] + p)
        query = torch.randn(dims["B"], dims["Hq"], q, dims["D"], generator=g).to(dims["dtype"])
        if q <= min(T - f for f in first):
            pos = torch.arange(T - q, T)[None].expand(dims["B"], q)
            out = batch.attend(query, spec, kv_start=torch.tensor(start), query_pos=pos).double()
            for b, st in enumerate(solos):
                alone = st.attend(query[b : b + 1], spec, query_pos=pos[b : b + 1] - first[b]).double()
                assert (out[b : b + 1] - alone).abs().max().item() <= tol * (1 + alone.abs().max().item()), b
        _take_row_choices(batch, start, choices)
        batch.settle(pad=start)
        batch.visible_from = T - keep
        d = batch.drop_unseen(T - keep)
        start[:] = [max(0, s - d) for s in start]
        for b, st in enumerate(solos):
            st.settle()
            st.visible_from = T - keep - first[b]
            st.drop_unseen(T - keep - first[b])
        k_all, v_all = batch.dequantized()
        packed = batch._np or [batch.n_packed] * dims["B"]
        for b, st in enumerate(solos):
            assert packed[b] == st.n_packed, (b, batch, st)
            ks, vs = st.dequantized()
            n = int(ks.shape[2])
            assert torch.equal(k_all[b, :, batch.n - n :], ks[0]) and torch.equal(v_all[b, :, batch.n - n :], vs[0]), b

    def reorder(idx):
        batch.index_batch(torch.tensor(idx))
        solos[:] = [copy.deepcopy(solos[i]) for i in idx]
        for lst in (first, start, pads) + ((choices,) if choices is not None else ()):
            lst[:] = [lst[i] for i in idx]

    def step(n):
        nonlocal T
        T += n
        feed(n)

    T = T if T > max(pads) else max(pads) + 1
    feed(T, initial=True)
    _random_steps(rng, dims["B"], rng.randrange(30, 70), 0.08, step, reorder)
    assert batch._np is not None or not batch.n_packed  # row mode, once anything packed


def test_row_choices_are_refused_outside_row_mode_and_after_a_rows_pack():
    """``set_row_choice`` names what is wrong: a store not in row mode (no
    batch has come to its first pack yet), or a row that has packed
    already; the store is left as it was."""
    st = PackedStore(2, 8, 8)
    st.rows_apart = True
    st.append(torch.randn(2, 1, 12, 16), torch.randn(2, 1, 12, 16), 0)
    assert not st.start_rows([0, 4])  # 12 slots: no row past residual + group yet
    with pytest.raises(RuntimeError, match="not in row mode"):
        st.set_row_choice(0, None, None, True)
    assert st._choices is None
    st.append(torch.randn(2, 1, 8, 16), torch.randn(2, 1, 8, 16), 12)
    assert st.start_rows([0, 4]) and st.row_dues() == [8, 8]
    st.set_row_choice(0, None, None, True)
    st.set_row_choice(0, None, None, False)  # nothing packed: the choice may still change
    st.settle([0, 4])
    assert st._np == [8, 8] and st.row_choice(0) == (False, None, False)
    with pytest.raises(RuntimeError, match="row 0 has packed"):
        st.set_row_choice(0, None, None, True)
    assert st.row_choice(0) == (False, None, False)


def test_carried_choices_are_each_rows_own_and_refused_from_another_batch():
    """``carry_choices`` gives a new store (a round's, not in row mode yet)
    each row's once-only choices from the store before it (row 0 rotated,
    row 1 clipped; the new store's own are neither) and the rotation they
    read; a store of another batch is refused by name and the new store
    keeps its own choices."""
    from kvcompress.stores.rotation import key_rotation

    old = PackedStore(2, 8, 8)
    old.rows_apart = True
    old.append(torch.randn(2, 1, 20, 16), torch.randn(2, 1, 20, 16), 0)
    assert old.start_rows([0, 4])
    rot = key_rotation(16, torch.device("cpu"))
    old.set_row_choice(0, rot, None, False)
    old.set_row_choice(1, None, None, True)
    new = PackedStore(2, 8, 8)
    new.append(torch.randn(2, 1, 20, 16), torch.randn(2, 1, 20, 16), 0)
    assert new.row_choice(0) == new.row_choice(1) == (False, None, False)
    new.carry_choices(old)
    assert new.row_choice(0) == (True, None, False) and new.row_choice(1) == (False, None, True)
    assert torch.equal(new.rotation, rot)
    other = PackedStore(2, 8, 8)
    other.append(torch.randn(3, 1, 20, 16), torch.randn(3, 1, 20, 16), 0)
    with pytest.raises(ValueError, match="carry_choices: old must be a store of the same batch"):
        other.carry_choices(old)
    assert other._choices is None and other.rotation is None


@pytest.mark.parametrize("seed", range(6))
def test_per_head_rows_with_their_own_choices_hold_and_read_what_each_row_does_alone(seed):
    """``RaggedPackedStore.from_ragged(row_choices=...)``: each row's heads
    are packed with that row's rotation and feedback weights, bit for bit
    what ``from_ragged`` of that row alone with its choice holds, also
    after decode steps pack the residual (``_pack_oldest``, per-head weights
    through ``feedback_index``), and each row reads the same attention
    within float rounding (rotated rows with ``q @ R``, in one call or
    joined), with a sink block and merge counts."""
    import kvcompress.stores.packed as packed_store
    from kvcompress.stores.ragged import RaggedStore

    rng = random.Random(90_000 + seed)
    g = torch.Generator().manual_seed(90_000 + seed)
    B, H, D, G, R = 3, 2, 16, 8, rng.choice([4, 8])
    bits, S = rng.choice([2, 4]), rng.choice([0, 2])
    C = 60
    keys, values = torch.randn(B, H, C, D, generator=g) * torch.linspace(0.3, 3, D), torch.randn(B, H, C, D,
                                                                                                  generator=g)
    valid = torch.zeros(B, H, C, dtype=torch.bool)
    for i in range(B * H):
        valid[i // H, i % H, : rng.randrange(20, C)] = True
    positions = (torch.arange(C, dtype=torch.int32) * 2).expand(B, H, C).contiguous()
    counts = torch.randint(1, 4, (B, H, C), generator=g).float()
    rot = _orthogonal(D, g)
    choices = []
    for b in range(B):
        x = torch.randn(H, 3 * D, D, generator=g, dtype=torch.float64)
        tri = compact(feedback_weights(x.transpose(1, 2) @ x)) if b != 1 else None
        choices.append((rot if b != 2 else None, tri))

    def store_of(rows):
        return RaggedStore.from_dense(keys[rows], values[rows], positions[rows], valid[rows], counts=counts[rows])

    batch = RaggedPackedStore.from_ragged(store_of(slice(None)), bits, G, R, sinks=S, row_choices=choices)
    solos = [RaggedPackedStore.from_ragged(store_of(slice(b, b + 1)), bits, G, R, sinks=S, rotation=c[0],
                                           feedback=c[1]) for b, c in enumerate(choices)]
    assert "rotated keys in rows [0, 1]" in repr(batch) and "key feedback in rows [0, 2]" in repr(batch)
    spec = AttentionSpec(scaling=D ** -0.5, count_bias=True)

    def check():
        for b, st in enumerate(solos):
            for h in range(H):
                i, n = b * H + h, int(st.lengths[h])
                o, o1 = int(batch.offsets[i]), int(st.offsets[h])
                assert int(batch.lengths[i]) == n, (b, h)
                for name in ("_kc", "_vc", "_vmin", "_vsc"):
                    assert torch.equal(getattr(batch, name)[o : o + n], getattr(st, name)[o1 : o1 + n]), (name, b, h)
                for name in ("_kmin", "_ksc"):
                    got = getattr(batch, name)[o // G : (o + n) // G]
                    assert torch.equal(got, getattr(st, name)[o1 // G : (o1 + n) // G]), (name, b, h)
        query = torch.randn(B, 2 * H, 1, D, generator=g)
        for one in (True, False):
            packed_store.one_call, saved = (lambda q: one), packed_store.one_call
            try:
                out = batch.attend(query, spec).double()
                for b, st in enumerate(solos):
                    alone = st.attend(query[b : b + 1], spec).double()
                    assert (out[b : b + 1] - alone).abs().max().item() <= 1e-5 * (1 + alone.abs().max().item()), b
            finally:
                packed_store.one_call = saved

    check()
    for _ in range(3 * (R + G)):
        k, v = torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
        batch.append(k, v, 0)
        batch.settle()
        for b, st in enumerate(solos):
            st.append(k[b : b + 1], v[b : b + 1], 0)
            st.settle()
        check()


def _packed_as_alone(batch, st, b: int, h: int, uniform: bool = False, extra=()) -> None:
    """Head ``h`` of row ``b`` of ``batch`` (a ``RaggedPackedStore``) holds bit
    for bit the packed rows (codes, value ranges, and the per-row columns
    ``extra``) and key-group ranges that head ``h`` of the row's one-row
    store ``st`` holds: a uniform ``PackedStore`` (``uniform``: a row kept
    whole) or a ``RaggedPackedStore``."""
    G, i = batch.group, b * batch.heads + h
    n, o = int(batch.lengths[i]), int(batch.offsets[i])
    if uniform:
        assert n == st.n_packed == batch._np[b], (b, h, n, st)
        theirs, o1 = (lambda name: getattr(st, name)[0, h]), 0  # noqa: E731
    else:
        assert n == int(st.lengths[h]), (b, h)
        theirs, o1 = (lambda name: getattr(st, name)), int(st.offsets[h])  # noqa: E731
    if not n:
        return
    for name in ("_kc", "_vc", "_vmin", "_vsc", *extra):
        assert torch.equal(getattr(batch, name)[o : o + n], theirs(name)[o1 : o1 + n]), (name, b, h)
    for name in ("_kmin", "_ksc"):
        assert torch.equal(getattr(batch, name)[o // G : (o + n) // G], theirs(name)[o1 // G : (o1 + n) // G]), (
            name, b, h)


def _full_precision_as_alone(batch, st, b: int, columns=()) -> None:
    """Row ``b`` of ``batch`` (row mode) holds bit for bit the sink block and
    full-precision residual (with the residual columns ``columns``) that its
    one-row store ``st`` holds, and as many slots in each."""
    block = batch._row_sinks()[b]
    assert block == st._r0, (b, block, st)
    own, end = batch._own_residual()[b], batch._r0 + batch.r
    assert own == st.r, (b, own, st.r)
    pairs = [(batch._rk, st._rk), (batch._rv, st._rv)] + [(batch._rcols[c], st._rcols[c]) for c in columns]
    for mine, theirs in pairs:
        assert torch.equal(mine[b, :, end - own : end], theirs[0, :, st._r0 : st._r0 + st.r]), b
    for mine, theirs in pairs[:2]:
        assert torch.equal(mine[b, :, :block], theirs[0, :, :block]), b  # its own sink block


def _reads_as_alone(batch, solos, query, plain, capped):
    """Each row of ``batch`` reads the attention its one-row store ``solos[b]``
    reads, within float rounding: in one kernel call, in joined calls (as
    where the kernel takes no ``residual_hidden``) and eagerly (``capped``:
    a softcap the kernel lacks)."""
    import kvcompress.stores.packed as packed_store

    for spec, one in ((plain, True), (plain, False), (capped, True)):
        packed_store.one_call, saved = (lambda q: one), packed_store.one_call
        try:
            out = batch.attend(query, spec).double()
            for b, st in enumerate(solos):
                alone = st.attend(query[b : b + 1], spec).double()
                assert (out[b : b + 1] - alone).abs().max().item() <= 1e-5 * (1 + alone.abs().max().item()), (
                    b, spec.softcap, one)
        finally:
            packed_store.one_call = saved


@pytest.mark.parametrize("seed", range(8))
def test_whole_rows_hold_and_read_what_each_row_does_alone(seed):
    """``from_ragged(whole_rows=...)``: a row the evictor kept whole packs
    as a uniform ``PackedStore`` of that row alone does (KIVI's schedule:
    nothing at first, then its residual's whole groups past ``residual +
    group - 1``, its newest slots in full precision), with the choice it
    makes at its first pack (``set_row_choice``), while the compressed rows
    pack as ``from_ragged`` of each alone. After every decode step (and a
    beam reorder that repeats an undecided row) each row holds bit for
    bit what its one-row store holds (packed codes,
    scales, its own residual) and reads the same attention within float
    rounding: in one kernel call (``residual_hidden`` masks the residual
    rows that are not a row's own), in joined calls, and eagerly (softcap:
    ``padded()`` weighs those rows at zero)."""
    rng = random.Random(91_000 + seed)
    g = torch.Generator().manual_seed(91_000 + seed)
    B, H, D, G, R = 4, 2, 16, 8, rng.choice([4, 8])
    bits, S = rng.choice([2, 4]), rng.choice([0, 2])
    C = 60
    keys = torch.randn(B, H, C, D, generator=g) * torch.linspace(0.3, 3, D)
    values = torch.randn(B, H, C, D, generator=g)
    whole = [False, True, False, True]
    # row 1 packs at once; row 3 too on odd seeds (two rows due at the first settle, from different
    # residual rows), else (fewer than S + R + G slots) only while decoding
    short = seed % 2 == 0
    n_whole = {1: rng.randrange(S + R + G, C - 4),
               3: rng.randrange(S + 1, S + R + G) if short else rng.randrange(S + R + G, C)}
    valid = torch.zeros(B, H, C, dtype=torch.bool)
    counts = torch.randint(1, 4, (B, H, C), generator=g).float()
    for b in range(B):
        for h in range(H):
            valid[b, h, : n_whole[b] if whole[b] else rng.randrange(20, C)] = True
        if whole[b]:
            counts[b] = 1.0
    positions = (torch.arange(C, dtype=torch.int32) * 2).expand(B, H, C).contiguous()
    rot = _orthogonal(D, g)

    def tri():
        x = torch.randn(H, 3 * D, D, generator=g, dtype=torch.float64)
        return compact(feedback_weights(x.transpose(1, 2) @ x))

    # compressed rows choose now, whole rows at their first pack (row 1 rotated, row 3 not)
    later = [None, (rot, tri()), None, (None, tri() if seed % 2 else None)]
    choices = [None if whole[b] else ((rot if b == 0 else None), (tri() if seed % 3 else None)) for b in range(B)]

    def store_of(rows):
        return RaggedStore.from_dense(keys[rows], values[rows], positions[rows], valid[rows], counts=counts[rows])

    batch = RaggedPackedStore.from_ragged(store_of(slice(None)), bits, G, R, sinks=S, row_choices=choices,
                                          whole_rows=whole)
    assert "rows [1, 3] not packed yet" in repr(batch) and "full_precision per row" in repr(batch)
    solos = []
    for b in range(B):
        if whole[b]:
            st = PackedStore(bits, G, R)
            st.sinks = S
            st.append(keys[b : b + 1, :, : n_whole[b]], values[b : b + 1, :, : n_whole[b]], 0)
        else:
            st = RaggedPackedStore.from_ragged(store_of(slice(b, b + 1)), bits, G, R, sinks=S,
                                               rotation=choices[b][0], feedback=choices[b][1])
        solos.append(st)

    def settle():
        for b in range(B):
            if whole[b] and batch.row_dues()[b] and batch._choices[b] is None:
                batch.set_row_choice(b, *later[b], False)
        batch.settle()
        for b, st in enumerate(solos):
            if whole[b] and st.pending() > 0 and not st.packed_any():
                st.set_rotation(later[b][0])
                st.set_feedback(later[b][1])
            st.settle()

    plain = AttentionSpec(scaling=D ** -0.5, count_bias=True)
    capped = AttentionSpec(scaling=D ** -0.5, count_bias=True, softcap=30.0)

    def check():
        assert batch.head_lengths() == [st.head_lengths()[h] for st in solos for h in range(H)]
        assert batch.pending() == max(batch.row_dues())
        for b, st in enumerate(solos):
            for h in range(H):
                _packed_as_alone(batch, st, b, h, uniform=whole[b])
            own = batch._own_residual()[b]
            if whole[b]:
                assert own + batch._r0 == st.r + st._r0, b
                mine = batch._rk[b, :, batch._r0 + batch.r - own : batch._r0 + batch.r]
                assert torch.equal(mine, st._rk[0, :, st._r0 + st.r - own : st._r0 + st.r]), b
        _reads_as_alone(batch, solos, torch.randn(B, 2 * H, 1, D, generator=g), plain, capped)

    settle()
    check()
    waiting = [b for b in (1, 3) if not batch._np[b]]
    assert (f"rows {waiting} not packed yet" in repr(batch)) if waiting else "not packed" not in repr(batch)
    decided = 0
    orig = list(range(B))  # each row's row before the beam reorder
    flip = rng.randrange(1, R + G)
    for step in range(3 * (R + G)):
        if step == flip:
            # beam search: row 2 dropped, row 3 twice (undecided on even seeds), row 1 first
            idx = [1, 3, 3, 0]
            batch.index_batch(torch.tensor(idx))
            solos, whole, later, orig = ([x[i] for i in idx] for x in (solos, whole, later, orig))
            solos = [copy.deepcopy(st) for st in solos]
        k, v = torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
        batch.append(k, v, 0)
        for b, st in enumerate(solos):
            st.append(k[b : b + 1], v[b : b + 1], 0)
        settle()
        check()
        decided += batch._choices[orig.index(3)] is not None
    assert batch._np[1] > 0 and (0 < decided < 3 * (R + G) if short else decided == 3 * (R + G))
    assert batch.row_choice(0)[0] and not batch.row_choice(1)[0] and not batch.row_choice(2)[0]


def _merged_heads(rng, g, B: int, H: int, C: int, D: int, held: tuple, unmerged: tuple):
    """Random per-head slots ``[B, H, C, D]`` for ``RaggedStore.from_dense``:
    ``(keys, values, valid, counts)``, each head holding its first
    ``randrange(*held)`` slots with merge counts 1-3, its newest
    ``randrange(*unmerged)`` of them of count 1."""
    keys = torch.randn(B, H, C, D, generator=g) * torch.linspace(0.3, 3, D)
    values = torch.randn(B, H, C, D, generator=g)
    valid = torch.zeros(B, H, C, dtype=torch.bool)
    counts = torch.randint(1, 4, (B, H, C), generator=g).float()
    for b in range(B):
        for h in range(H):
            n = rng.randrange(*held)
            valid[b, h, :n] = True
            counts[b, h, max(0, n - rng.randrange(*unmerged)) : n] = 1.0
    return keys, values, valid, counts


@pytest.mark.parametrize("seed", range(8))
def test_rows_apart_keep_their_own_newest_slots_as_alone(seed):
    """``from_ragged(columns=True, rows_apart=True)`` (a layer with rounds):
    each row keeps in its residual the newest slots ``_recent_kept`` allows
    its own heads (before: the fewest any row's heads allowed), so after
    every decode step each row holds bit for bit what ``from_ragged`` of
    that row alone holds (packed codes and scales, its own residual with
    positions and carried scores, and its own sink block: on odd seeds
    row 1 holds so few slots that alone it takes fewer sinks than the
    others), reads the same attention within float rounding (one call,
    joined, eager), and gives back the same slots from ``unpacked()``,
    what the next round re-compresses."""
    rng = random.Random(92_000 + seed)
    g = torch.Generator().manual_seed(92_000 + seed)
    B, H, D, G, R = 3, 2, 16, 8, rng.choice([4, 8, 16])
    bits, S = rng.choice([2, 4]), rng.choice([0, 2])
    few = seed % 2 == 1
    if few:
        R, S = 16, 4
    C = 60
    # a trailing run of count-1 slots of the row's own length: the residual a row can keep
    keys, values, valid, counts = _merged_heads(rng, g, B, H, C, D, (12, C), (1, 20))
    if few:
        # row 1: every head short and unmerged, so alone its residual leaves at most one sink
        valid[1] = False
        for h in range(H):
            n = rng.randrange(12, R + 2)
            valid[1, h, :n], counts[1, h] = True, 1.0
    positions = (torch.arange(C, dtype=torch.int32) * 2).expand(B, H, C).contiguous()
    scores = torch.rand(B, H, C, generator=g)

    def store_of(rows):
        return RaggedStore.from_dense(keys[rows], values[rows], positions[rows], valid[rows], counts=counts[rows],
                                      scores=scores[rows])

    batch = RaggedPackedStore.from_ragged(store_of(slice(None)), bits, G, R, columns=True, sinks=S, rows_apart=True)
    solos = [RaggedPackedStore.from_ragged(store_of(slice(b, b + 1)), bits, G, R, columns=True, sinks=S)
             for b in range(B)]
    shared = RaggedPackedStore.from_ragged(store_of(slice(None)), bits, G, R, columns=True, sinks=S)
    if len({st.r for st in solos}) > 1 and all(st._r0 == solos[0]._r0 for st in solos):
        assert "full_precision per row" in repr(batch)
        assert batch._own_residual() == [st.r for st in solos] != [shared.r] * B
    if few:
        # alone, row 1 takes fewer sinks than another row: so does it here
        assert solos[1]._r0 < max(st._r0 for st in solos) == batch._r0
        assert f"sinks={[st._r0 for st in solos]} per row of {S}" in repr(batch)
    spec = AttentionSpec(scaling=D ** -0.5, count_bias=True)
    capped = AttentionSpec(scaling=D ** -0.5, count_bias=True, softcap=30.0)

    def check():
        assert batch.head_lengths() == [n for st in solos for n in st.head_lengths()]
        for b, st in enumerate(solos):
            for h in range(H):
                _packed_as_alone(batch, st, b, h, extra=("positions", "counts_bias", "counts_plain"))
            _full_precision_as_alone(batch, st, b, columns=("positions",))
        _reads_as_alone(batch, solos, torch.randn(B, 2 * H, 1, D, generator=g), spec, capped)
        back = batch.unpacked()
        for b, st in enumerate(solos):
            alone = st.unpacked()
            for h in range(H):
                i, n = b * H + h, int(back._host_lengths[b * H + h])
                assert n == int(alone._host_lengths[h]), (b, h)
                o, o1 = int(back.offsets[i]), int(alone.offsets[h])
                for name in ("k", "v", "positions", "counts", "scores"):
                    x, y = getattr(back, name)[o : o + n], getattr(alone, name)[o1 : o1 + n]
                    assert torch.equal(x, y) or (name == "scores" and torch.equal(x.isnan(), y.isnan())
                                                 and torch.equal(x.nan_to_num(), y.nan_to_num())), (name, b, h)

    check()
    for step in range(2 * (R + G)):
        k, v = torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
        batch.append(k, v, 2 * C + step)  # after every prompt position
        batch.settle()
        for b, st in enumerate(solos):
            st.append(k[b : b + 1], v[b : b + 1], 2 * C + step)
            st.settle()
        check()


@pytest.mark.parametrize("seed", range(8))
def test_whole_rows_behind_rounds_pack_as_a_uniform_store_alone(seed):
    """``from_ragged(columns=True, rows_apart=True, whole_rows=...)`` (a
    layer with rounds, before a row's first): a row no compression has
    touched holds what a uniform ``PackedStore`` of it alone holds: its
    ``sinks`` oldest slots as its sink block once it holds ``sinks +
    residual + group`` (row 1 at once, row 2 while decoding:
    ``take_sinks``), whole groups packed on KIVI's schedule, the rest in
    full precision; a compressed row holds what ``from_ragged`` of it alone
    holds. On odd seeds no row has a sink block at first, so the first one
    taken grows the block. After every decode step each row holds bit for
    bit what its one-row store holds and reads the same attention within
    float rounding (one call, joined, eager), and ``unpacked()`` gives a
    whole row's slots back in token order."""
    rng = random.Random(93_000 + seed)
    g = torch.Generator().manual_seed(93_000 + seed)
    B, H, D, G, R = 3, 2, 16, 8, rng.choice([4, 8])
    bits, S = rng.choice([2, 4]), rng.choice([2, 4])
    grow = seed % 2 == 1
    C = 60
    keys = torch.randn(B, H, C, D, generator=g) * torch.linspace(0.3, 3, D)
    values = torch.randn(B, H, C, D, generator=g)
    whole = [False, True, True]
    n_whole = {1: rng.randrange(S + 1, S + R + G) if grow else rng.randrange(S + R + G, C - 4),
               2: rng.randrange(S + 1, S + R + G)}
    valid = torch.zeros(B, H, C, dtype=torch.bool)
    counts = torch.randint(1, 4, (B, H, C), generator=g).float()
    for h in range(H):
        # row 0 compressed: on odd seeds every head short and unmerged, so that it takes no sinks
        n = rng.randrange(R // 2 + 1, R + 1) if grow else rng.randrange(20, C)
        valid[0, h, :n] = True
        counts[0, h, max(0, n - rng.randrange(1, 20)) : n] = 1.0
        if grow:
            counts[0, h] = 1.0
    for b in (1, 2):
        valid[b, :, : n_whole[b]], counts[b] = True, 1.0
    positions = (torch.arange(C, dtype=torch.int32) * 2).expand(B, H, C).contiguous()

    def store_of(rows):
        return RaggedStore.from_dense(keys[rows], values[rows], positions[rows], valid[rows], counts=counts[rows])

    batch = RaggedPackedStore.from_ragged(store_of(slice(None)), bits, G, R, columns=True, sinks=S,
                                          rows_apart=True, whole_rows=whole)
    solos = [RaggedPackedStore.from_ragged(store_of(slice(0, 1)), bits, G, R, columns=True, sinks=S)]
    for b in (1, 2):
        st = PackedStore(bits, G, R)
        st.sinks = S
        st.append(keys[b : b + 1, :, : n_whole[b]], values[b : b + 1, :, : n_whole[b]], 0)
        solos.append(st)
    assert batch._r0 == (0 if grow else S) and "take theirs later" in repr(batch), batch
    plain = AttentionSpec(scaling=D ** -0.5, count_bias=True)
    capped = AttentionSpec(scaling=D ** -0.5, count_bias=True, softcap=30.0)

    def settle():
        # as the layer does: sinks first, then the whole groups
        for st in (batch, *solos):
            st.take_sinks()
            st.settle()

    def check():
        assert batch.head_lengths() == [n for st in solos for n in st.head_lengths()]
        back = batch.unpacked()
        for b, st in enumerate(solos):
            _full_precision_as_alone(batch, st, b)
            for h in range(H):
                _packed_as_alone(batch, st, b, h, uniform=whole[b])
                i = b * H + h
                if whole[b]:
                    # unpacked(): the whole row's slots in token order, as the uniform store reads them
                    m, a = int(back._host_lengths[i]), int(back.offsets[i])
                    k1, v1 = st.dequantized()
                    assert m == int(k1.shape[2]), (b, h, m)
                    assert torch.equal(back.k[a : a + m], k1[0, h]) and torch.equal(back.v[a : a + m], v1[0, h])
        _reads_as_alone(batch, solos, torch.randn(B, 2 * H, 1, D, generator=g), plain, capped)

    settle()
    check()
    took = False
    for step in range(3 * (R + G)):
        k, v = torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
        batch.append(k, v, 2 * C + step)
        for b, st in enumerate(solos):
            st.append(k[b : b + 1], v[b : b + 1], 2 * C + step)
        settle()
        check()
        took |= batch._r0 == S and grow
    assert batch._sinks_due is None and all(st._r0 == S for st in solos[1:])
    assert took or not grow


@pytest.mark.parametrize("seed", range(6))
def test_a_round_adopts_the_rows_it_leaves_as_they_were(seed):
    """A packed round packs every row again from ``unpacked()``. With
    ``row_layout`` (each kept row's sink block and own residual as they
    were, which may hold up to ``residual + group - 1`` slots where a fresh
    layout keeps ``residual``) and ``adopt_rows``, a kept row holds bit for
    bit what it held: codes, scales, counts, positions, residual and sink
    block, its slots read back the same and its attention the same within
    float rounding; packed again without them its residual would shrink
    (and its scales may round apart). A row laid out otherwise is refused
    by name."""
    rng = random.Random(94_000 + seed)
    g = torch.Generator().manual_seed(94_000 + seed)
    B, H, D, G, R, S = 3, 2, 16, 8, 8, 4
    bits = rng.choice([2, 4])
    C = 64
    keys, values, valid, counts = _merged_heads(rng, g, B, H, C, D, (30, C), (R + G, 24))  # the newest unmerged
    positions = (torch.arange(C, dtype=torch.int32) * 2).expand(B, H, C).contiguous()
    old = RaggedPackedStore.from_ragged(RaggedStore.from_dense(keys, values, positions, valid, counts=counts),
                                        bits, G, R, columns=True, sinks=S, rows_apart=True)
    for step in range(rng.randrange(1, G)):  # residuals past `residual`, not yet a group over
        old.append(torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g), 2 * C + step)
        old.settle()
    keep = [True, False, True] if seed % 2 else [False, True, True]
    before = copy.deepcopy(old)
    layout = [(old._row_sinks()[b], old._own_residual()[b]) if k else None for b, k in enumerate(keep)]
    assert any(own > R for _, own in (x for x in layout if x)), layout  # what a fresh layout would pack

    def packed_again(row_layout):
        return RaggedPackedStore.from_ragged(old.unpacked(), bits, G, R, columns=True, sinks=S, rows_apart=True,
                                             row_layout=row_layout)

    fresh = packed_again(None)
    new = packed_again(layout)
    new.adopt_rows(old, keep)
    back_old, back_new = before.unpacked(), new.unpacked()
    q = torch.randn(B, 2 * H, 1, D, generator=g)
    spec = AttentionSpec(scaling=D ** -0.5, count_bias=True)
    out_old, out_new = before.attend(q, spec), new.attend(q, spec)
    for b, k in enumerate(keep):
        if not k:
            continue
        assert new._own_residual()[b] == before._own_residual()[b] > fresh._own_residual()[b] == R
        assert new._row_sinks()[b] == before._row_sinks()[b]
        for h in range(H):
            i = b * H + h
            a, n = int(new.offsets[i]), int(new.lengths[i])
            o = int(before.offsets[i])
            assert n == int(before.lengths[i])
            for name in ("_kc", "_vc", "_vmin", "_vsc", "counts_bias", "counts_plain", "positions"):
                assert torch.equal(getattr(new, name)[a : a + n], getattr(before, name)[o : o + n]), (b, h, name)
            for name in ("_kmin", "_ksc"):
                got, was = getattr(new, name), getattr(before, name)
                assert torch.equal(got[a // G : (a + n) // G], was[o // G : (o + n) // G]), (b, h, name)
            for x, y in zip(back_new.head(b, h)[:3], back_old.head(b, h)[:3]):
                assert torch.equal(x, y), (b, h)
        assert (out_new[b] - out_old[b]).abs().max() < 1e-6
    # packed again without the layout, a row whose residual held more than `residual` cannot be adopted
    b = next(b for b, x in enumerate(layout) if x and x[1] > R)
    with pytest.raises(ValueError, match=f"adopt_rows: row {b} is laid out otherwise"):
        fresh.adopt_rows(old, [i == b for i in range(B)])


def test_a_row_packed_once_with_nothing_packed_takes_its_own_sinks_and_chooses_at_its_first_pack():
    """Packed once (no ``columns``), a batch row whose heads hold no more
    slots than ``sinks`` keeps them all as its sink block, as alone (before:
    the batch's block, as long as the shortest head of any row allowed), and
    a row left to choose (``row_choices`` None) packs nothing until the
    batch's first pack of its residual, before which ``set_row_choice``
    gives it the rotation its layer alone takes there (``set_rotation``).
    Each row attends as alone within 1e-6 before and after that pack; a row
    that chose, or packs with the store's choices, is refused by name."""
    from kvcompress.stores.rotation import key_rotation

    g = torch.Generator().manual_seed(4242)
    H, D, G, R, S, C = 2, 16, 8, 8, 4, 20
    keys, values = torch.randn(2, H, C, D, generator=g), torch.randn(2, H, C, D, generator=g)
    pos = torch.arange(C, dtype=torch.int32).expand(2, H, C).contiguous()
    valid = torch.ones(2, H, C, dtype=torch.bool)
    valid[0, :, 3:] = False  # row 0: 3 slots per head, all sinks alone
    valid[1, 0, :2] = False  # row 1: 18 and 20
    spec = AttentionSpec(scaling=D ** -0.5, count_bias=True)
    rot = key_rotation(D, torch.device("cpu"))

    def store_of(rows, **kw):
        st = RaggedStore.from_dense(keys[rows], values[rows], pos[rows], valid[rows])
        return RaggedPackedStore.from_ragged(st, 4, G, R, sinks=S, **kw)

    batch = store_of([0, 1], row_choices=[None, (None, None)])
    alone = [store_of([0]), store_of([1])]
    assert batch._row_sinks() == [3, 4] and alone[0]._r0 == 3 and alone[1]._r0 == 4
    packed = batch._host_lengths.tolist()  # packed rows per head
    assert batch.rows_to_choose() and packed[:H] == [0] * H and all(packed[H:])
    with pytest.raises(RuntimeError, match="row 1 packs with choices made already"):
        batch.set_row_choice(1, rot, None, False)

    def same(step):
        q = torch.randn(2, 2 * H, 1, D, generator=g)
        got = batch.attend(q, spec)
        for b, st in enumerate(alone):
            assert (got[b] - st.attend(q[b : b + 1], spec)[0]).abs().max() < 1e-6, (step, b)

    same(-1)
    step = 0
    while batch.pending() == 0:
        k, v = torch.randn(2, H, 1, D, generator=g), torch.randn(2, H, 1, D, generator=g)
        for st in (batch, *alone):
            st.append(k if st is batch else k[alone.index(st) : alone.index(st) + 1],
                      v if st is batch else v[alone.index(st) : alone.index(st) + 1], C + step)
        step += 1
        if batch.pending() == 0:
            for st in (batch, *alone):
                st.settle()
            same(step)
    keys0, _ = batch.row_pending(0)
    assert batch.row_dues() == [R, R] and torch.equal(keys0, alone[0].residual_keys()[:, :, :R])
    batch.set_row_choice(0, rot, None, False)
    alone[0].set_rotation(rot)
    assert not batch.rows_to_choose() and batch.row_choice(0)[0] and not batch.row_choice(1)[0]
    for st in (batch, *alone):
        st.settle()
    assert batch._host_lengths[:H].tolist() == [G] * H
    same(step)
    with pytest.raises(RuntimeError, match="row 0 packs with choices made already"):
        batch.set_row_choice(0, None, None, False)


def test_whole_rows_are_refused_where_a_row_was_not_kept_whole():
    """``from_ragged(whole_rows=...)`` names the argument for a store with
    columns (a layer that re-compresses), a flag count other than the
    batch's, a whole row whose heads differ or hold merged slots, and
    ``row_choices`` leaves undecided only whole rows (but behind rounds,
    ``rows_apart``, and packed once, no ``columns``, where a row chooses at
    its own first pack); ``rows_apart`` (each
    row's own residual) is named without ``columns``, which keep no
    residual."""
    keys = torch.randn(2, 2, 16, 8)
    pos = torch.arange(16, dtype=torch.int32).expand(2, 2, 16).contiguous()
    valid = torch.ones(2, 2, 16, dtype=torch.bool)
    store = RaggedStore.from_dense(keys, keys, pos, valid)
    ragged = valid.clone()
    ragged[1, 1, 10:] = False
    merged = torch.ones(2, 2, 16)
    merged[1, 0, 3] = 2.0
    cases = [(store, dict(whole_rows=[False, True], columns=True), "whole_rows"),
             (store, dict(whole_rows=[True]), "whole_rows"),
             (RaggedStore.from_dense(keys, keys, pos, ragged), dict(whole_rows=[False, True]), "different numbers"),
             (RaggedStore.from_dense(keys, keys, pos, valid, counts=merged), dict(whole_rows=[False, True]),
              "merged slots"),
             (store, dict(columns=True, row_choices=[None, None]), "row_choices"),
             (store, dict(rows_apart=True), "rows_apart")]
    for st, kw, match in cases:
        with pytest.raises(ValueError, match=match):
            RaggedPackedStore.from_ragged(st, 4, 8, 4, **kw)


def test_per_head_row_choices_are_refused_beside_store_wide_ones_or_of_another_batch():
    """``from_ragged(row_choices=...)`` names the argument when it comes
    with store-wide ``rotation`` or ``feedback``, or does not give one
    choice per row."""
    from kvcompress.stores.ragged import RaggedStore

    keys = torch.randn(2, 1, 16, 8)
    store = RaggedStore.from_dense(keys, keys, torch.arange(16, dtype=torch.int32).expand(2, 1, 16).contiguous(),
                                   torch.ones(2, 1, 16, dtype=torch.bool))
    for kw in (dict(row_choices=[(None, None)]), dict(row_choices=[(None, None)] * 2, rotation=torch.eye(8))):
        with pytest.raises(ValueError, match="row_choices"):
            RaggedPackedStore.from_ragged(store, 4, 8, 0, **kw)


# -------------------------------------------------------------- per head
class _RaggedCase:
    """A RaggedPackedStore and its shadow: per head ``b * H + h`` the
    positions, keys ``[L, D]``, values and merge counts of its slots in
    order."""

    def __init__(self, seed: int, device: str = "cpu"):
        rng = random.Random(10_000 + seed)
        self.rng, self.dev = rng, torch.device(device)
        self.g = torch.Generator().manual_seed(10_000 + seed)
        self.B = rng.choice([1, 2, 3])
        self.H = rng.choice([1, 2, 3])
        self.Hq = self.H * rng.choice([1, 2])
        self.D = rng.choice([16, 32, 64])
        self.G = rng.choice([8, 16, 32])
        self.R = rng.choice([0, 4, 16])
        self.bits = rng.choice([2, 4, 8])
        self.vbits = rng.choice([None, None, 2, 4, 8])
        self.sinks = rng.choice([0, 0, 2, 4])
        self.rotation = _orthogonal(self.D, self.g) if rng.random() < 0.3 else None
        self.clip = rng.random() < 0.2
        self.merged = rng.random() < 0.6
        self.columns = rng.random() < 0.8
        self.dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16])
        self.pos = 200
        self.scale = torch.linspace(0.2, 3.0, self.D)
        N = self.B * self.H
        self.heads = []
        for _ in range(N):
            L = rng.randrange(1, 90)
            pos = sorted(rng.sample(range(self.pos), L))
            k = (torch.randn(L, self.D, generator=self.g) * self.scale).to(self.dtype)
            v = torch.randn(L, self.D, generator=self.g).to(self.dtype)
            c = torch.ones(L)
            if self.merged:
                for j in range(L):
                    if rng.random() < 0.3:
                        c[j] = rng.choice([2.0, 3.0, 5.0])
            self.heads.append([pos, k, v, c])
        self.store = self._pack(self._ragged(), columns=self.columns)
        # without columns every slot is packed, the sink block aside, and
        # the last one repeated to a whole group: which slot each packed row
        # of a head holds (decoding packs onto the end)
        s, G = self.store._r0, self.G
        self.rowmap = [list(range(s, len(h[0]))) + [len(h[0]) - 1] * (-(len(h[0]) - s) % G) for h in self.heads]

    def describe(self) -> str:
        return (f"B={self.B} H={self.H} Hq={self.Hq} D={self.D} G={self.G} R={self.R} bits={self.bits}/"
                f"{self.vbits} sinks={self.sinks} rotated={self.rotation is not None} clip={self.clip} "
                f"merged={self.merged} columns={self.columns} {self.dtype} "
                f"lengths={[len(h[0]) for h in self.heads]}")

    def _ragged(self) -> RaggedStore:
        B, H, D = self.B, self.H, self.D
        C = max(len(h[0]) for h in self.heads)
        keys = torch.zeros(B, H, C, D, dtype=self.dtype)
        values = torch.zeros(B, H, C, D, dtype=self.dtype)
        positions = torch.zeros(B, H, C, dtype=torch.int32)
        counts = torch.ones(B, H, C)
        valid = torch.zeros(B, H, C, dtype=torch.bool)
        for i, (pos, k, v, c) in enumerate(self.heads):
            b, h, L = i // H, i % H, len(pos)
            keys[b, h, :L], values[b, h, :L] = k, v
            positions[b, h, :L] = torch.tensor(pos, dtype=torch.int32)
            counts[b, h, :L], valid[b, h, :L] = c, True
        d = self.dev
        return RaggedStore.from_dense(keys.to(d), values.to(d), positions.to(d), valid.to(d),
                                      counts=counts.to(d) if self.merged else None)

    def _pack(self, ragged, columns: bool) -> RaggedPackedStore:
        rotation = None if self.rotation is None else self.rotation.to(self.dev)
        return RaggedPackedStore.from_ragged(ragged, self.bits, self.G, self.R, self.vbits, columns=columns,
                                             rotation=rotation, sinks=self.sinks, value_clip=self.clip)

    def attend(self, q: int = 1):
        st = self.store
        query = torch.randn(self.B, self.Hq, q, self.D, generator=self.g).to(self.dtype)
        scaling = self.D**-0.5
        count_bias = self.merged and self.rng.random() < 0.7
        spec = AttentionSpec(scaling=scaling, count_bias=count_bias)
        out = st.attend(query.to(self.dev), spec).cpu()
        if self.rng.random() < 0.25:
            _same_on_other_threads(lambda: st.attend(query.to(self.dev), spec).cpu(), out)
        keys, values, start, logc = (t.cpu() for t in st.padded(count_bias))
        # float64 per query head over its kv head's columns start.. (log counts added)
        # queries are the last q slots of every head (causal)
        ref = torch.zeros(self.B, q, self.Hq, self.D, dtype=torch.float64)
        g, n = self.Hq // self.H, int(keys.shape[2])
        for b in range(self.B):
            for hq in range(self.Hq):
                i = b * self.H + hq // g
                s = int(start[i])
                for j in range(q):
                    e = n - q + j + 1
                    logits = (keys[i, 0, s:e].double() @ query[b, hq, j].double()) * scaling + logc[i, s:e].double()
                    ref[b, j, hq] = torch.softmax(logits, 0) @ values[i, 0, s:e].double()
        eager = st.attend(query.to(self.dev), AttentionSpec(scaling=scaling, count_bias=count_bias,
                                                            softcap=1e9)).cpu()
        torch_err = (eager.double() - ref).abs().max().item()
        err = (out.double() - ref).abs().max().item()
        assert err <= 2 * torch_err + _tol(self.dtype), (err, torch_err)

    def append(self, q: int = 1):
        k = (torch.randn(self.B, self.H, q, self.D, generator=self.g) * self.scale).to(self.dtype)
        v = torch.randn(self.B, self.H, q, self.D, generator=self.g).to(self.dtype)
        self.store.append(k.to(self.dev), v.to(self.dev), self.pos)
        for i, head in enumerate(self.heads):
            b, h = i // self.H, i % self.H
            head[0] = head[0] + list(range(self.pos, self.pos + q))
            head[1] = torch.cat([head[1], k[b, h]])
            head[2] = torch.cat([head[2], v[b, h]])
            head[3] = torch.cat([head[3], torch.ones(q)])
        self.pos += q

    def settle(self):
        before = self.store.r
        self.store.settle()
        m = before - self.store.r  # the oldest m residual slots went onto every head's packed rows
        for i, (pos, *_rest) in enumerate(self.heads):
            self.rowmap[i] += list(range(len(pos) - before, len(pos) - before + m))

    def reorder(self):
        idx = [self.rng.randrange(self.B) for _ in range(self.B)]
        self.rowmap = [list(self.rowmap[b * self.H + h]) for b in idx for h in range(self.H)]
        self.store.index_batch(torch.tensor(idx, device=self.dev))
        self.heads = [[list(x) if j == 0 else x.clone() for j, x in enumerate(self.heads[b * self.H + h])]
                      for b in idx for h in range(self.H)]

    def round(self):
        """A decode-time round as a merging method makes it: every slot read
        back, some dropped, some merged into a neighbour (new key and value,
        counts summed), the rest packed again; with keep_rows (merge counts
        only) the old groups that come through keep their codes."""
        u = store_on(self.store.unpacked(), "cpu")
        heads = []
        for i in range(self.B * self.H):
            o, L = int(u.offsets[i]), int(u.lengths[i])
            pos = u.positions[o: o + L].tolist()
            k, v = u.k[o: o + L].clone(), u.v[o: o + L].clone()
            c = u.counts[o: o + L].clone() if u.counts is not None else torch.ones(L)
            keep = [True] * L
            for j in range(L - 1):
                if self.rng.random() < 0.15:
                    keep[j] = False
                    if self.merged and self.rng.random() < 0.5:  # merged into the next slot
                        w = c[j] / (c[j] + c[j + 1])
                        k[j + 1] = (w * k[j].float() + (1 - w) * k[j + 1].float()).to(self.dtype)
                        v[j + 1] = (w * v[j].float() + (1 - w) * v[j + 1].float()).to(self.dtype)
                        c[j + 1] += c[j]
            sel = torch.tensor([j for j in range(L) if keep[j]])
            heads.append([[pos[j] for j in sel.tolist()], k[sel], v[sel], c[sel]])
        self.heads = heads
        kept = self._ragged()
        if self.merged and self.rng.random() < 0.5:
            arranged = arrange(self.store, kept, self.rng.choice([1, max(1, self.G // 2), self.G]))
            if arranged is not None:
                kept = arranged
        self.store = self._pack(kept, columns=True)

    def check(self):
        st = self.store
        assert st.head_lengths() == [len(h[0]) for h in self.heads]
        s, r, eps = st._r0, st.r, _tol(self.dtype)
        if self.columns:
            u = store_on(st.unpacked(), "cpu")
        else:
            keys, values, start, _ = (t.cpu() for t in st.padded(False))
        rk, rv = st._rk.cpu(), st._rv.cpu()
        for i, (pos, k, v, c) in enumerate(self.heads):
            b, h, L = i // self.H, i % self.H, len(pos)
            # the sink block holds the head's first slots, bit for bit
            assert torch.equal(rk[b, h, :s], k[:s]) and torch.equal(rv[b, h, :s], v[:s])
            if self.columns:
                # the residual holds r of the head's slots of count 1 bit for bit: its newest,
                # or after a keep_rows round the newest of those not in a kept group
                at = {p: j for j, p in enumerate(pos)}
                rows = [at[p] for p in st._rcols["positions"][b, h, s: s + r].tolist()]
                assert len(set(rows)) == r and all(c[j] == 1 for j in rows)
                assert torch.equal(rk[b, h, s: s + r], k[rows]) and torch.equal(rv[b, h, s: s + r], v[rows])
            else:
                assert torch.equal(rk[b, h, s: s + r], k[L - r:]) and torch.equal(rv[b, h, s: s + r], v[L - r:])
            if self.columns:
                o = int(u.offsets[i])
                assert int(u.lengths[i]) == L and u.positions[o: o + L].tolist() == pos
                assert all(a < b for a, b in zip(pos, pos[1:])), "unpacked() is not in token order"
                if st._merged:
                    assert torch.allclose(u.counts[o: o + L], c, rtol=1e-5), (u.counts[o: o + L], c)
                kd, vd = u.k[o: o + L], u.v[o: o + L]
            else:
                # the packed rows hold the slots rowmap says, copies included
                rows = torch.tensor(self.rowmap[i], dtype=torch.int64)
                a = int(start[i])
                assert a + len(rows) == keys.shape[2] - s - r
                k, v = k[rows], v[rows]
                kd, vd = keys[i, 0, a: a + len(rows)], values[i, 0, a: a + len(rows)]
                L = len(rows)
            if not L:
                continue  # every slot in the sink block
            real = torch.ones(L, dtype=torch.bool)
            kb = _key_bound(k, real, self.bits, self.rotation)[0]
            ko, kk = k.double(), kd.double()
            if self.rotation is not None:
                ko, kk = ko @ self.rotation.double(), kk @ self.rotation.double()
            slack = eps * (1 + ko.abs().amax().item()) * (4 if self.rotation is not None else 1)
            assert bool(((kk - ko).abs() <= kb * (1 + 1e-5) + slack).all()), ((kk - ko).abs() - kb).max()
            if not self.clip:
                vb = _value_bound(v, self.vbits or self.bits)
                vslack = eps * (1 + v.double().abs().amax().item())
                assert bool(((vd.double() - v.double()).abs() <= vb * (1 + 1e-5) + vslack).all())


@pytest.mark.parametrize("seed", range(CASES))
def test_per_head_packed_store_through_random_sequences(seed):
    run_per_head(seed)


@pytest.mark.parametrize("seed", [158, 378])
def test_per_head_sequences_that_found_a_defect(seed):
    """Seeds that found one: after a keep_rows round a kept key group could
    hold a slot newer than a residual one, and unpacked() returned that
    head's slots out of token order (the next round read them so)."""
    run_per_head(seed)


def run_per_head(seed: int, device: str = "cpu") -> None:
    """One per-head case (also run on CUDA by tests/test_cuda.py)."""
    c = _RaggedCase(seed, device)
    try:
        c.check()
        c.attend()
        _steps(c, rounds=0.15 if c.columns else 0.0, chunks=0.1)
    except AssertionError as e:
        raise AssertionError(f"{c.describe()}: {e}") from e


@pytest.mark.parametrize("seed", range(6))
def test_a_uniform_round_adopts_the_rows_it_leaves_as_they_were(seed):
    """A uniform packed layer's round (``from_uniform`` of ``unpacked()``)
    with ``PackedStore.adopt_rows``: a row the round leaves as it was holds
    bit for bit what it held in row mode (packed count, codes, scales, its
    own residual; packed again from its dequantized slots, its scales round
    an ulp apart and codes may flip), reads its slots back the same and
    attends the same within float rounding; the other rows pack at the next
    settle, as packed afresh. Every row keeps its once-only choice. A store
    that is not in row mode is refused by name."""
    rng = random.Random(95_000 + seed)
    g = torch.Generator().manual_seed(95_000 + seed)
    B, H, D, G, R = 3, 2, 16, 8, 8
    S = rng.choice([0, 4])
    bits = rng.choice([2, 4])
    n = 60
    pad = [rng.randrange(0, 20) for _ in range(B)]
    pad[rng.randrange(B)] = 0
    keys, values = torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g)
    for b, p in enumerate(pad):
        keys[b, :, :p] = values[b, :, :p] = 0
    positions = torch.arange(n, dtype=torch.int32).expand(B, H, n).contiguous()
    old = PackedStore.from_uniform(UniformStore.from_parts(keys, values, {"positions": positions}), bits, G, R,
                                   columns=True, sinks=S)
    old.rows_apart = True
    assert old.start_rows(pad, unpadded=True) or S  # (with sinks: once the block is taken, below)
    old.settle(pad)
    for step in range(rng.randrange(1, 3 * G)):  # rows' residuals anywhere in [R, R + G)
        old.append(torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g), n + step)
        old.settle(pad)
    assert old._np is not None and all(old._np)
    keep = [True, False, True] if seed % 2 else [False, True, True]
    before = copy.deepcopy(old)

    def packed_again():
        new = PackedStore.from_uniform(old.unpacked(), bits, G, R, columns=True, sinks=S)
        new.rows_apart = True
        return new

    new = packed_again()
    took = new.adopt_rows(old, keep, pad)
    new.settle(pad)
    fresh = packed_again()
    fresh.start_rows(pad, unpadded=True)
    fresh.settle(pad)
    assert took == keep
    back_old, back_new = before.dequantized(), new.dequantized()
    q = torch.randn(B, 2 * H, 1, D, generator=g)
    spec = AttentionSpec(scaling=D ** -0.5)
    kv_start = torch.tensor(pad)
    out_old, out_new = before.attend(q, spec, kv_start=kv_start), new.attend(q, spec, kv_start=kv_start)
    for b, k in enumerate(keep):
        m = before._np[b]
        if not k:
            assert new._np[b] == fresh._np[b] and new.r - new._rs[b] == fresh.r - fresh._rs[b] < R + G
            continue
        assert new._np[b] == m and new.r - new._rs[b] == before.r - before._rs[b]
        for name, hi in (("_kc", m), ("_vc", m), ("_vmin", m), ("_vsc", m), ("_kmin", m // G), ("_ksc", m // G)):
            assert torch.equal(getattr(new, name)[b, :, :hi], getattr(before, name)[b, :, :hi]), (b, name)
        assert torch.equal(back_new[0][b], back_old[0][b]) and torch.equal(back_new[1][b], back_old[1][b])
        assert (out_new[b] - out_old[b]).abs().max() < 1e-6
    with pytest.raises(ValueError, match="adopt_rows"):
        packed_again().adopt_rows(packed_again(), keep, pad)


def test_adopt_uniform_rows_refuses_a_store_it_cannot_read_by_name():
    """``RaggedPackedStore.adopt_uniform_rows`` takes a row-mode uniform
    store of the same batch, heads and group, one flag per row; anything
    else is refused naming ``old`` before any buffer is touched."""
    g = torch.Generator().manual_seed(3)
    B, H, n, D, G = 2, 2, 40, 16, 8
    keys, values = torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g)
    positions = torch.arange(n, dtype=torch.int32).expand(B, H, n).contiguous()
    valid = torch.ones(B, H, n, dtype=torch.bool)
    ragged = RaggedPackedStore.from_ragged(RaggedStore.from_dense(keys, values, positions, valid), 2, G, G,
                                           columns=True, rows_apart=True)
    before = ragged._kc.clone()
    uniform = PackedStore.from_uniform(UniformStore.from_parts(keys, values, {"positions": positions}), 2, G, G,
                                       columns=True)
    uniform.settle()  # packed, but not in row mode
    for old, rows in ((uniform, [True, True]), (ragged, [True, True])):
        with pytest.raises(ValueError, match="adopt_uniform_rows: old must be a row-mode uniform store"):
            ragged.adopt_uniform_rows(old, rows)
    rows_mode = PackedStore.from_uniform(UniformStore.from_parts(keys, values, {"positions": positions}), 2, G, G,
                                         columns=True)
    rows_mode.rows_apart = True
    assert rows_mode.start_rows([0, 0], unpadded=True)
    rows_mode.settle([0, 0])
    assert ragged.adopt_uniform_rows(rows_mode, [False, False]) == [False, False]  # a store it can read
    with pytest.raises(ValueError, match="adopt_uniform_rows: .* one flag per row"):
        ragged.adopt_uniform_rows(rows_mode, [True])
    assert torch.equal(ragged._kc, before)
