"""A row of a left-padded batch holds what it holds alone, bit for bit.

The cache is driven directly (``KVCache.update`` and ``attend``, as the
``"kvcompress"`` attention function drives it), with keys, values and
queries drawn per row: each row's stream is the same in the batch and
alone, so any difference is the cache's own. (Through a model the rows'
projections differ by a rounding already: a decode step's GEMM over three
rows is not its GEMV over one, ``tests/test_batches.py``.)

Rows of 96, 60 and 120 tokens at budget 64 desynchronise the rounds: the
60-token row is kept whole at prefill and reaches its budget plus the
interval 4 steps after the others, so every one of its rounds comes while
the other rows are not due, and theirs while it is not. Rows of 150, 40,
131 and 14 tokens pad the per-head layers' re-scoring to other lengths
than alone (``RaggedStore.to_padded``: the batch's longest head), where a
sum over a row's slots must not depend on where they start.

Mixed precision (``mikv``, ``zipcache``, ``lowbits``) splits each row as
alone (``PackedStore.from_split_rows``): its own selected count, its low
part's groups from its own first low slot, a row left whole in full
precision.
"""

from __future__ import annotations

import pytest
import torch

import kvcompress as kvc
from kvcompress.methods import method_from_spec
from kvcompress.stores import PackedStore, RaggedPackedStore, RaggedStore
from kvcompress.stores.base import AttentionSpec

H, HQ, D, LAYERS = 2, 4, 16, 2
STEPS = 40
# (row lengths, stream seed): the 60-token row reaches its budget 4 steps
# after the others; the 14-token one packs (and takes its sinks) long after
CASES = [((96, 60, 120), 0), ((150, 40, 131, 14), 1)]


def _streams(seed: int, lengths):
    """Per row ``(keys, values, queries)``: ``[LAYERS, H, n + STEPS, D]`` and
    ``[LAYERS, HQ, n + STEPS, D]``, the prompt's then one per decode step."""
    out = []
    for b, n in enumerate(lengths):
        g = torch.Generator().manual_seed(1000 * seed + b)
        T = n + STEPS
        out.append((torch.randn(LAYERS, H, T, D, generator=g), torch.randn(LAYERS, H, T, D, generator=g),
                    torch.randn(LAYERS, HQ, T, D, generator=g)))
    return out


def _held(layer, b: int):
    """What row ``b`` of ``layer`` holds: the packed layout of a per-head
    packed layer (sink slots, packed rows per head, own residual; None for
    any other store) and per head ``(positions, keys, values)`` as a
    re-compression reads them back (``unpacked()``, a uniform packed
    layer's ``dequantized()``), positions from the row's first token."""
    s, pad = layer.store, layer._pad[b]
    if isinstance(s, RaggedPackedStore):
        layout = (s._row_sinks()[b], s._host_lengths[b * H : (b + 1) * H].tolist(), s._own_residual()[b])
        if s.positions is None:
            return layout, []  # packed once (interval=0): nothing is read back, attention tells
        held = s.unpacked()
        return layout, [_head(*held.head(b, h)[:3], pad) for h in range(H)]
    if isinstance(s, RaggedStore):
        return None, [_head(*s.head(b, h)[:3], pad) for h in range(H)]
    keys, values = s.dequantized() if isinstance(s, PackedStore) else (s.keys, s.values)
    start, n = layer._start[b], int(keys.shape[2])
    # a packed uniform layer keeps positions only behind rounds (its columns)
    cols = s._cols if isinstance(s, PackedStore) else {"positions": s.column("positions")}
    pos = None if not cols else cols["positions"][b, :, start:n]
    return None, [_head(keys[b, h, start:], values[b, h, start:], None if pos is None else pos[h], pad)
                  for h in range(H)]


def _head(keys, values, positions, pad: int):
    # copies: a uniform store's slots are views of buffers later steps write into
    return None if positions is None else (positions.long() - pad).tolist(), keys.clone(), values.clone()


def _run(spec: str, streams, rows: list[int], window: int | None = None, budget: int = 64,
         ratio: float | None = None):
    """Drive a cache of ``rows`` (left-padded) through the prompt and
    ``STEPS`` decode steps; per step, per layer, ``(attention output of each
    row [HQ, q, D] for its real queries, _held of each row)``. ``window``:
    layer 0 slides over that many tokens (a hybrid model's local layer).
    ``ratio``: the method's ratio instead of ``budget``."""
    method = method_from_spec(spec, ratio=ratio) if ratio is not None else method_from_spec(spec, budget=budget)
    types = None if window is None else ["sliding_attention"] + ["full_attention"] * (LAYERS - 1)
    cache = kvc.KVCache(method, num_layers=LAYERS, layer_types=types)
    n = [int(streams[b][0].shape[2]) - STEPS for b in rows]
    T = max(n)
    specs = [AttentionSpec(scaling=D**-0.5, window=window if layer == 0 else None) for layer in range(LAYERS)]
    record = []
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, m in enumerate(n):
        mask[i, T - m :] = 1
    for step in range(STEPS + 1):
        per_layer = []
        for layer in range(LAYERS):
            if step == 0:
                k = torch.zeros(len(rows), H, T, D)
                v = torch.zeros(len(rows), H, T, D)
                q = torch.zeros(len(rows), HQ, T, D)
                for i, (b, m) in enumerate(zip(rows, n)):
                    k[i, :, T - m :] = streams[b][0][layer, :, :m]
                    v[i, :, T - m :] = streams[b][1][layer, :, :m]
                    q[i, :, T - m :] = streams[b][2][layer, :, :m]
            else:
                at = [m + step - 1 for m in n]
                k = torch.stack([streams[b][0][layer, :, t : t + 1] for b, t in zip(rows, at)])
                v = torch.stack([streams[b][1][layer, :, t : t + 1] for b, t in zip(rows, at)])
                q = torch.stack([streams[b][2][layer, :, t : t + 1] for b, t in zip(rows, at)])
            cache.update(k, v, layer)
            out = cache.attend(layer, q, specs[layer], padding_mask=mask)  # [B, q, HQ, D]
            outs = [out[i, (T - m if step == 0 else 0) :] for i, m in enumerate(n)]
            per_layer.append((outs, [_held(cache.layers[layer], i) for i in range(len(rows))]))
        record.append(per_layer)
        mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], 1)
    return record


# every evicting and merging family (uniform, per-head, with slot state,
# token-aware, merging), quantized alone, and packed behind per-head rounds
SPECS = ["snapkv", "h2o", "pyramidkv", "streamingllm", "tova", "knorm", "lagkv", "keyformer", "vatp", "scope",
         "adakv", "fastgen", "ems", "kvmerger", "kvcrush", "kivi:bits=2:group=8:residual=16:sinks=4",
         "adakv+kivi:bits=2:group=8:residual=16:sinks=4", "ems+kivi:bits=2:group=8:residual=8:sinks=4",
         "ems+kivi:bits=4:sinks=4", "ems+kivi:bits=2:group=8:residual=8:keep_rows=2",
         "ems+kivi:bits=2:rotate=auto:feedback=true:clip_values=auto:sinks=4",
         "adakv+kivi:bits=2:group=8:residual=16:rotate=auto:feedback=true:sinks=4",
         "ems:interval=0+kivi:bits=2:group=8:residual=16:rotate=auto:feedback=true:sinks=4",
         "kivi:bits=2:group=8:residual=16:rotate=auto:feedback=true:clip_values=auto:sinks=4",
         # a uniform evictor's packed layer with rounds (row mode, rows a round leaves adopted),
         # with slot state (each row accumulates its own pending queries at its own rounds)
         "snapkv+kivi:bits=2:group=8:residual=16", "pyramidkv+kivi:bits=4:group=8:residual=16:sinks=4",
         "snapkv+kivi:bits=2:group=8:residual=16:rotate=auto:feedback=true:clip_values=auto:sinks=4",
         "h2o+kivi:bits=2:group=8:residual=8", "keyformer+kivi:bits=2:group=8:residual=8",
         "vatp+kivi:bits=4:group=8:residual=8:sinks=4",
         # mixed precision: each row split as alone (row mode), its own high part and rotation;
         # probed global scores over each row's own real positions
         "mikv:bits=2:group=8", "mikv:bits=2:group=8:rotate=auto",
         "zipcache:bits=2:group=8:high_bits=none:rotate=auto",
         "snapkv+lowbits:bits=2:group=8:high_bits=4:value_bits=4", "ems:global_mode=probe"]

#: packed specs: their attention is compared within 1e-6, not bit for bit
PACKED = ("kivi", "mikv", "zipcache", "lowbits")


def _compare(spec: str, lengths, seed: int, budget: int = 64, ratio: float | None = None,
             window: int | None = None) -> int:
    """Every row of the batch against the row alone (see the test below);
    returns how many held states (and with ``window``, attention outputs)
    were compared. With ``window`` (layer 0 slides) only attention is
    compared: a packed sliding layer keeps a row's masked oldest slots
    (before the window, in a kept key group) in another form than alone."""
    streams = _streams(seed, lengths)
    packed = any(name in spec for name in PACKED)
    batch = _run(spec, streams, list(range(len(lengths))), window=window, budget=budget, ratio=ratio)
    compared = 0
    for b in range(len(lengths)):
        alone = _run(spec, streams, [b], window=window, budget=budget, ratio=ratio)
        for step, (mine, theirs) in enumerate(zip(batch, alone)):
            for layer, ((ob, hb), (oa, ha)) in enumerate(zip(mine, theirs)):
                where = (spec, b, step, layer)
                if packed:
                    assert (ob[b] - oa[0]).abs().max() < 1e-6, where
                else:
                    assert torch.equal(ob[b], oa[0]), where
                if window is not None:
                    compared += 1
                    continue
                xb, xa = hb[b], ha[0]
                if xb[0] is not None and xa[0] is not None:
                    assert xb[0] == xa[0], where + (xb[0], xa[0])
                    compared += 1
                for h, ((pb, kb, vb), (pa, ka, va)) in enumerate(zip(xb[1], xa[1])):
                    assert pb == pa or pb is None or pa is None, where + (h,)
                    assert torch.equal(kb, ka) and torch.equal(vb, va), where + (h,)
                    compared += 1
    return compared


@pytest.mark.parametrize("lengths, seed", CASES)
@pytest.mark.parametrize("spec", SPECS)
def test_rows_of_a_padded_batch_hold_bit_for_bit_what_they_hold_alone(spec, lengths, seed):
    """After every step every row holds, per layer, the layout it holds
    alone and per head the same slots with the same bits, and attends as
    alone: bit for bit, and over a packed layer within 1e-6 (the packed
    kernels' row mode sums a row's residual in other vector lanes than
    alone). Before: a padded prefill's attention was one SDPA call, 1e-7
    apart from alone in every row with padding; the 60-token row's first
    compression gave AdaKV's heads equal shares; a packed round packed the
    rows it left as they were again from their dequantized slots (their
    residual past ``residual`` packed at once, scales an ulp apart, a
    ``keep_rows`` layout regrouped) and laid out the 60-token row's first
    round by ``keep_rows``."""
    assert _compare(spec, lengths, seed) > 100  # most steps of every row


# Cases a random hunt (random compositions, intervals, budgets and batch shapes) found apart, each
# with what was wrong: (spec, budget, lengths, stream seed)
HUNTED = [
    # a row kept whole, not due at another row's round, lost its pending sink block where the
    # round's layout kept it as it was (RaggedPackedStore.from_ragged(row_layout=...), _sinks_due)
    ("ems:interval=4+kivi:bits=4:group=16:residual=8:sinks=4", 48, (16, 59), 397),
    # a uniform layer going per-head at a decode round (a merging method, _to_ragged) did not mark
    # the rows it left whole, so their first round was laid out by keep_rows, unlike alone
    ("ems:interval=4+kivi:bits=8:group=8:residual=32", 48, (39, 15), 490),
    # a per-head round ran the method on every row: a call takes its smallest budget for the
    # forced window and sinks, which a short row kept whole set for the others
    ("ems:interval=4", 48, (195, 129, 7), 471),
    ("kvmerger:interval=4+kivi:bits=4:group=8:residual=16:sinks=4", 48, (24, 100, 13, 136), 498),
    # a uniform layer in row mode going per-head chose the rows' key-feedback weights again
    ("ems:interval=4+kivi:bits=2:group=8:residual=32:feedback=true", 64, (56, 35, 45), 222),
    # ... and packed the rows it left whole again from their dequantized slots (scales an ulp apart)
    ("kvmerger:interval=16+kivi:bits=8:group=8:residual=8", 64, (57, 21, 56), 447),
    # ... and a row whose whole layout packs more than it had (groups filled since) was packed again
    ("adakv:interval=8+kivi:bits=2:group=16:residual=16", 64, (47, 37, 33, 39), 582),
    # a headwise evictor's layer going per-head at a decode round gave a row it left whole its
    # length as budget, not its target, so that row's own first round came late (unpacked too)
    ("adakv:interval=16", 48, (43, 32), 81),
    ("fastgen:interval=16+kivi:bits=8:group=8:residual=32:sinks=4:rotate=auto:clip_values=auto", 48, (43, 32), 81),
    # a row kept whole whose first pack comes with its first round chose its rotation on the held
    # queries plus the pending ones, which a round of another row had cleared (alone: counted twice)
    ("adakv:interval=16+kivi:bits=4:group=16:residual=32:rotate=auto:feedback=true", 32, (82, 25), 78),
    # ... where the rows had chosen their rotation at their own first pack, the layer went on to
    # choose one for the batch at the next settle and raised (the layer's flags were not carried)
    ("fastgen:interval=4+kivi:bits=8:group=8:residual=8:rotate=auto:clip_values=auto", 64, (50, 24), 1),
    ("ems:interval=8+kivi:bits=2:group=8:residual=16:rotate=auto:feedback=true:sinks=4", 64, (50, 24, 61), 2),
    # a row a round left as it was, whose keep_rows layout holds residual slots older than a kept
    # group, was packed again from unpacked() (token order, merged slots last): now adopted as it was
    ("ems:interval=4+kivi:bits=4:group=8:residual=16:rotate=auto:feedback=true", 64, (53, 75), 360),
    ("ems:interval=4+kivi:bits=4:group=8:residual=16", 64, (53, 75), 360),
]


@pytest.mark.parametrize("spec, budget, lengths, seed", HUNTED)
def test_rows_hold_what_they_hold_alone_where_a_hunt_found_them_apart(spec, budget, lengths, seed):
    """Compositions, intervals, budgets and shapes a random hunt over the
    per-head methods found apart from alone (each fails on c625c0a, the
    rotation case on this session's first build of row mode behind rounds)."""
    assert _compare(spec, lengths, seed, budget) > 50


# ``ratio=`` cases a hunt found apart (each fails on 582ddb7): a short row compressed by its ratio to
# fewer slots than a key group has nothing to test rotate="auto" on; alone its layer stays undecided
# and tests at its first pack, where the batch row decided unrotated at once; and alone counted the
# prefill's queries twice (held by _to_packed's deferred test, again by the settle that follows)
HUNTED_RATIO = [
    ("ems+kivi:bits=4:group=8:residual=16:rotate=auto:feedback=true", 0.3, (10, 83), 743),
    ("ems+kivi:bits=2:group=16:residual=16:rotate=auto:sinks=4", 0.7, (30, 120, 138), 110),
    ("adakv:interval=8+kivi:bits=2:group=8:residual=8:rotate=auto", 0.3, (11, 11, 31), 423),
    # ... and such a row chose at another row's round, which left it as it was (alone: no round then)
    ("adakv:interval=8+kivi:bits=2:group=16:residual=16:rotate=auto:sinks=4", 0.5, (140, 31, 138), 648),
    ("fastgen+kivi:bits=2:group=16:residual=16:rotate=auto:sinks=4", 0.7, (63, 33, 107), 835),
    # packed once (interval=0), a row holding no more than its sink block packs nothing: alone its
    # layer tests the rotation at its first pack, where the batch row decided unrotated at once
    ("adakv:interval=0+kivi:bits=2:group=16:residual=16:rotate=auto:sinks=4", 0.7, (15, 39), 51),
    ("adakv:interval=0+kivi:bits=2:group=16:residual=16:rotate=auto:sinks=4", 0.7, (15, 58, 48), 600),
    ("adakv:interval=0+kivi:bits=4:group=8:residual=16:rotate=auto:feedback=true:sinks=4", 0.7, (15, 58, 48), 600),
    # ... and its sink block was the batch's (its shortest head's of any row), not its own
    ("ems:interval=0+kivi:bits=2:group=16:residual=16:rotate=auto:sinks=4", 0.7, (11, 8), 131),
    ("adakv:interval=0+kivi:bits=2:group=16:residual=16:rotate=auto:sinks=4", 0.7, (8, 90, 99), 155),
    ("adakv:interval=0+kivi:bits=4:group=8:residual=8:sinks=4", 0.7, (8, 90, 99), 155),
    # behind rounds with feedback, a row that packed part groups unrotated before it could test the
    # rotation took no weights ever; alone its layer fixes them at its first round
    ("ems+kivi:bits=4:group=8:residual=16:rotate=auto:feedback=true", 0.85, (47, 26, 82, 136), 874),
    # a uniform layer's round on the step after another row's round (the store not in row mode again
    # yet) dropped the rows' once-only choices: a row packed without the weights it chose
    ("snapkv+kivi:bits=4:group=8:residual=16:feedback=true", 0.85, (127, 30), 1),
    # a uniform layer's row with fewer real slots than sinks when the batch took the sink block kept
    # padding in its block and packed from the next slot; alone it takes its first `sinks` slots as its
    # block just before its own first pack (PackedStore._fill_blocks)
    ("snapkv+kivi:bits=4:group=8:residual=16:sinks=4", 0.5, (51, 90, 109, 6), 527),
    ("tova+kivi:bits=2:group=8:residual=8:sinks=2:clip_values=true", 0.7, (76, 130, 89, 5), 209),
    ("snapkv:interval=0+kivi:bits=2:group=16:residual=16:rotate=auto:sinks=4", 0.7, (6, 71, 19, 140), 760),
    ("tova+kivi:bits=4:group=8:residual=16:sinks=4:feedback=true", 0.3, (5, 5, 140), 198),
]


@pytest.mark.parametrize("spec, ratio, lengths, seed", HUNTED_RATIO)
def test_rows_of_a_ratio_hold_what_they_hold_alone_where_a_hunt_found_them_apart(spec, ratio, lengths, seed):
    """Rows of other lengths at a ratio: each row holds and reads what it
    holds alone where a hunt found a short row's rotation choice apart."""
    assert _compare(spec, lengths, seed, ratio=ratio) > 20


@pytest.mark.parametrize("spec", ["snapkv", "ems", "kivi:bits=2:group=8:residual=16", "kivi:bits=4",
                                  "ems+kivi:bits=2:group=8:residual=16", "adakv+kivi:bits=4:group=8:residual=16"])
def test_rows_beside_a_sliding_layer_attend_as_alone(spec):
    """A hybrid cache whose first layer slides over 48 tokens, rows of 96,
    60, 120 and 20 tokens: every row attends as alone at every step, bit
    for bit where nothing is packed, within 1e-6 packed. The 20-token row
    is shorter than the window: alone its sliding layer stays unpacked
    until it keeps more than ``residual + group`` slots, and in a batch its
    row now waits as long (``PackedStore.first_pack_rows``; before, it
    packed its first group one step earlier, 0.1 apart at that step)."""
    assert _compare(spec, (96, 60, 120, 20), 2, window=48) > 100


@pytest.mark.parametrize("spec", ["snapkv", "ems", "mikv:bits=2:group=8", "snapkv+kivi:bits=2:group=8:residual=8",
                                  "snapkv+kivi:bits=4:group=8:residual=8:rotate=auto:feedback=true"])
def test_rows_of_other_targets_slide_as_alone(spec):
    """``ratio=`` over rows of other lengths gives each row its own target,
    and a sliding layer keeps each row's ``min(window - 1, target)`` newest
    slots, as alone (before: the most any row keeps, so a short row's
    sliding layer saw older tokens than alone, its packed window grouped
    from another slot). Rows of 96, 60, 120 and 20 tokens at ratio 0.5
    keep 47, 30, 47 and 10 of a 48-token window; every row attends as
    alone at every step, bit for bit unpacked, within 1e-6 packed."""
    assert _compare(spec, (96, 60, 120, 20), 3, ratio=0.5, window=48) > 100


@pytest.mark.parametrize("spec", ["pyramidkv+kivi:bits=2:group=16:residual=16",
                                  "pyramidkv+kivi:bits=2:group=16:residual=16:rotate=auto:sinks=4"])
def test_a_short_row_packs_its_window_when_its_target_lets_it_as_alone(spec):
    """A hunted case: PyramidKV gives the sliding first layer more than the
    mean, so under ``ratio=`` a 10-token row's target there grows by about
    one slot per step, and its layer alone is packed (``_packs_window``)
    once it keeps ``residual + group + 1`` slots while still holding one
    fewer: it packs its first group then. In the batch the row waited until
    it held one more (0.43 apart from step 25); now it packs when its own
    target lets its layer alone (``PackedStore.first_pack_rows``)."""
    assert _compare(spec, (102, 81, 137, 10), 954, ratio=0.5, window=48) > 100
