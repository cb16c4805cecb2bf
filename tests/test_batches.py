"""Batches and decoding options: each row of a left-padded batch generates
what it generates alone, beam search runs on per-head layers, 4-D masks
record their padding, and attention options we cannot honour are refused by
name."""

import pytest
import torch

import kvcompress as kvc
from kvcompress.compat import cache_kwargs
from kvcompress.hf import attention_spec
from kvcompress.methods import EVICTING, MIXED_PRECISION, REGISTRY
from generation import greedy, left_pad, random_ids, tiny_sliding_mistral


def _gen(model, method, ids, mask, n=10, **kw):
    out, session = greedy(model, ids, mask, method=method, n=n, **kw)
    return out if session is None else (out, session.cache)


@pytest.mark.parametrize("name", sorted(EVICTING + MIXED_PRECISION))
def test_short_rows_generate_what_they_generate_alone(tiny_model, name):
    """Rows shorter than the budget (and than sinks + window) keep every
    token, in a batch with a row that is compressed."""
    short, long_ = random_ids(20, 1), random_ids(140, 2)
    ids, mask = left_pad([short, long_])
    method = REGISTRY[name](budget=64)
    out, cache = _gen(tiny_model, method, ids, mask)
    alone, _ = _gen(tiny_model, method, short[None], torch.ones(1, 20, dtype=torch.long))
    assert torch.equal(out[0, -30:], alone[0])
    for layer in cache.layers:
        H = layer.store.heads
        lengths = layer.head_lengths()
        # the short row holds its 20 + 9 real slots (no pad), the long row is compressed
        real = [n - (layer.kv_start[0].item() if layer.ragged is None else 0) for n in lengths[:H]]
        assert real == [29] * H, (name, layer.layer_idx, lengths)


def test_ems_on_a_row_shorter_than_its_forced_keeps(tiny_model):
    ids, mask = left_pad([random_ids(20, 3), random_ids(100, 4)])
    out, cache = _gen(tiny_model, kvc.EMS(budget=64), ids, mask, n=6)
    assert out.shape == (2, 106)
    alone, _ = _gen(tiny_model, kvc.EMS(budget=64), ids[:1, 80:], mask[:1, 80:], n=6)
    assert torch.equal(out[0, 80:], alone[0])


def test_pyramidkv_row_result_does_not_depend_on_itsleft_pad(tiny_model):
    short = random_ids(18, 5)
    method = kvc.PyramidKV(budget=48)
    alone, cache = _gen(tiny_model, method, short[None], torch.ones(1, 18, dtype=torch.long))
    assert all(layer.n == 18 + 9 for layer in cache.layers)  # nothing compressed alone
    ids, mask = left_pad([short, random_ids(140, 6), random_ids(140, 7)])
    out, _ = _gen(tiny_model, method, ids, mask)
    assert torch.equal(out[0, -28:], alone[0])


@pytest.mark.parametrize("evictor", ["ems", "adakv", "snapkv"])
def test_packed_rows_compressed_once_generate_what_they_generate_alone(tiny_model, evictor):
    """Evict, then pack, compressing once (``interval=0``): every kept slot
    is packed at prefill, each head's key groups start at its own first
    kept slot and the residual starts empty, so nothing a row packs depends
    on the other rows: both rows of a left-padded batch, each compressed,
    generate what they generate alone over 40 tokens (two packs of new
    groups). With rounds the rows share the residual's length (README,
    "Choices worth knowing")."""
    make = lambda: REGISTRY[evictor](budget=48, interval=0) + kvc.KIVI(  # noqa: E731
        bits=2, group=16, residual=16, **({"sinks": 4, "rotate": True} if evictor == "ems" else {}))
    rows = [random_ids(150, 21), random_ids(97, 22)]
    ids, mask = left_pad(rows)
    out = _gen(tiny_model, make(), ids, mask, n=40)[0]
    for i, row in enumerate(rows):
        alone = _gen(tiny_model, make(), row[None], torch.ones(1, len(row), dtype=torch.long), n=40)[0]
        assert torch.equal(out[i, -40:], alone[0, -40:]), (evictor, i)


@pytest.mark.parametrize("kw", [dict(bits=2, group=16, residual=16),
                                dict(bits=4, value_bits=2, group=8, residual=4, rotate=True, clip_values=True),
                                dict(bits=2, group=16, residual=16, sinks=4, rotate=True),
                                dict(bits=2, group=16, residual=16, evictor="snapkv")])
def test_kivi_rows_generate_what_they_generate_alone(tiny_model, kw):
    """A uniform KIVI layer packs each row of a left-padded batch on its
    own schedule: its key groups start at its first real token and it
    packs when its own residual fills, so over 40 tokens (several packs)
    every row generates what it generates alone and holds as many packed
    slots (before, the padded rows' groups held other tokens than alone
    and their first greedy tokens differed within 10 to 13 steps). With a
    sink block (each row's own first 4 tokens), and behind an evictor that
    compresses once, where the short row, kept whole, has masked filler
    slots in front."""
    kw = dict(kw)
    evictor = kw.pop("evictor", None)

    def make():
        quant = kvc.KIVI(**kw)
        return quant if evictor is None else REGISTRY[evictor](budget=120, interval=0) + quant

    rows = [random_ids(150, 21), random_ids(97, 22), random_ids(131, 23)]
    ids, mask = left_pad(rows)
    out, cache = _gen(tiny_model, make(), ids, mask, n=40)
    for i, row in enumerate(rows):
        alone, solo = _gen(tiny_model, make(), row[None], torch.ones(1, len(row), dtype=torch.long), n=40)
        assert torch.equal(out[i, -40:], alone[0, -40:]), (kw, i)
        for layer, one in zip(cache.layers, solo.layers):
            assert layer.store._np[i] == one.store.n_packed > 0, (i, layer.store, one.store)


@pytest.mark.parametrize("kw", [dict(bits=2, group=16, residual=16, rotate="auto", sinks=4, feedback=True,
                                     clip_values="auto"),
                                dict(bits=2, group=8, residual=48, rotate="auto", feedback=True, clip_values="auto")],
                         ids=["recipe", "short-rows-decide-later"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "same-length"])
def test_kivi_rows_choose_what_they_choose_alone(tiny_model, kw, padded):
    """``rotate`` and ``clip_values`` ``"auto"`` and ``feedback=True`` are
    decided once per layer, at its first pack; in a batch each row decides
    them itself, at its own first pack, from its own queries and keys
    (before, one decision and one query moment served every row, so a
    row's codes depended on the others). So every row chooses, holds the
    feedback weights of, packs and generates what it does alone: the
    README's 2-bit recipe, and a long residual that some rows fill only
    while decoding, in a left-padded batch and in one of equal lengths."""
    from kvcompress.stores.feedback import expand

    lengths = [150, 97, 131] if padded else [120, 120, 120]
    rows = [random_ids(n, 31 + i) for i, n in enumerate(lengths)]
    ids, mask = left_pad(rows)
    out, cache = _gen(tiny_model, kvc.KIVI(**kw), ids, mask, n=40)
    rotated = clipped = 0
    for i, row in enumerate(rows):
        alone, solo = _gen(tiny_model, kvc.KIVI(**kw), row[None], torch.ones(1, len(row), dtype=torch.long), n=40)
        assert torch.equal(out[i, -40:], alone[0, -40:]), (kw, i)
        for layer, one in zip(cache.layers, solo.layers):
            s, o = layer.store, one.store
            D = int(s._rk.shape[-1])
            assert s._np[i] == o.n_packed > 0, (i, s, o)
            is_rot, tri, clip = s._choices[i]
            assert is_rot == (one._rotation is not None) and clip == one._clip, (i, s, o)
            # the weights from the row's own queries, alone's up to float rounding of the moment
            assert torch.allclose(expand(tri, D), expand(o.feedback, D), rtol=2**-7, atol=1e-6), (i, layer.layer_idx)
            rotated, clipped = rotated + is_rot, clipped + clip
            # the row's packed keys decode to what alone's do
            k, _ = s.dequantized()
            k1, _ = o.dequantized()
            m = o.n_packed
            got = k[i, :, int(mask.shape[1]) - len(row) :][:, :m]
            assert torch.allclose(got, k1[0, :, :m], atol=1e-5), (i, layer.layer_idx)
    assert rotated and clipped  # both choices were taken somewhere, so the rows' flags were read


def test_kivi_rows_choose_apart_through_beam_search(tiny_model):
    """Beam search reorders and repeats rows (``reorder_cache``): each
    beam carries its row's choices, held queries and query moment, so a
    left-padded batch's rows, one of which chooses while decoding (a
    residual of 48 slots), beam-search what they beam-search alone under
    the 2-bit recipe."""
    kw = dict(bits=2, group=8, residual=48, rotate="auto", sinks=4, feedback=True, clip_values="auto")
    rows = [random_ids(90, 41), random_ids(40, 42)]
    ids, mask = left_pad(rows)
    out, cache = _gen(tiny_model, kvc.KIVI(**kw), ids, mask, n=30, num_beams=2, num_return_sequences=2)
    for i, row in enumerate(rows):
        alone, _ = _gen(tiny_model, kvc.KIVI(**kw), row[None], torch.ones(1, len(row), dtype=torch.long), n=30,
                        num_beams=2, num_return_sequences=2)
        assert torch.equal(out[2 * i : 2 * i + 2, -30:], alone[:, -30:]), i
    assert all(None not in layer._row_choices for layer in cache.layers)


@pytest.mark.parametrize("evictor", ["ems", "adakv"])
def test_per_head_packed_rows_choose_what_they_choose_alone(tiny_model, evictor):
    """Behind a per-head evictor that compresses once (``interval=0``),
    each row of a batch chooses its own rotation (``rotate="auto"``, tested
    on its own queries and its heads' newest whole groups) and its own
    key-feedback weights (its own query moment), so it packs and generates
    what it does alone (before, one test and one moment served the batch):
    the 2-bit recipe with sinks, 40 tokens."""
    from kvcompress.stores.feedback import expand

    make = lambda: REGISTRY[evictor](budget=64, interval=0) + kvc.KIVI(  # noqa: E731
        bits=2, group=8, residual=8, rotate="auto", sinks=4, feedback=True)
    rows = [random_ids(150, 51), random_ids(97, 52), random_ids(131, 53)]
    ids, mask = left_pad(rows)
    out, cache = _gen(tiny_model, make(), ids, mask, n=40)
    rotated = 0
    for i, row in enumerate(rows):
        alone, solo = _gen(tiny_model, make(), row[None], torch.ones(1, len(row), dtype=torch.long), n=40)
        assert torch.equal(out[i, -40:], alone[0, -40:]), (evictor, i)
        for layer, one in zip(cache.layers, solo.layers):
            s, o = layer.store, one.store
            is_rot, tri, _ = s.row_choice(i)
            assert is_rot == (o.rotation is not None), (i, layer.layer_idx, s, o)
            D = int(s._rk.shape[-1])
            assert (tri is None) == (o.feedback is None), (i, layer.layer_idx)
            if tri is not None:
                assert torch.allclose(expand(tri, D), expand(o.feedback, D), rtol=2**-7, atol=1e-6), i
            rotated += is_rot
    assert 0 < rotated < 3 * len(cache.layers)  # rows and layers chose both ways


@pytest.mark.parametrize("evictor", ["ems", "adakv"])
@pytest.mark.parametrize("kw", [dict(bits=2, group=8, residual=8),
                                dict(bits=2, group=8, residual=8, rotate="auto", sinks=4, feedback=True)],
                         ids=["kivi2", "recipe"])
@pytest.mark.parametrize("one_call", [True, False], ids=["one call", "joined"])
def test_a_row_kept_whole_behind_a_per_head_evictor_packs_as_alone(tiny_model, evictor, kw, one_call, monkeypatch):
    """A row whose prompt fits the budget is kept whole by the evictor:
    alone its layer is never evicted and packs on KIVI's schedule, keeping
    its newest tokens in full precision, and chooses rotation and weights
    at that first pack. In a batch with compressed rows (one per-head
    store, ``interval=0``) it now does the same: it holds as many packed
    slots and residual slots as alone after every row's 40 tokens, makes
    the same choices, and generates the same tokens (before, its heads were
    packed whole with the compressed rows, residual empty). The 14-token
    row packs nothing at prefill and chooses during decoding. "joined": as
    where the kernel takes no ``residual_hidden`` (CUDA), a decode step
    reads segments, own residuals and sink block in three calls."""
    import kvcompress.stores.packed as packed_store
    from kvcompress.stores.feedback import expand

    if not one_call:
        monkeypatch.setattr(packed_store, "one_call", lambda query: False)

    make = lambda: REGISTRY[evictor](budget=64, interval=0) + kvc.KIVI(**kw)  # noqa: E731
    rows = [random_ids(150, 71), random_ids(60, 72), random_ids(131, 73), random_ids(14, 74)]
    ids, mask = left_pad(rows)
    out, cache = _gen(tiny_model, make(), ids, mask, n=40)
    for i, row in enumerate(rows):
        alone, solo = _gen(tiny_model, make(), row[None], torch.ones(1, len(row), dtype=torch.long), n=40)
        assert torch.equal(out[i, -40:], alone[0, -40:]), (evictor, i)
        if len(row) > 64:
            continue
        for layer, one in zip(cache.layers, solo.layers):
            s, o = layer.store, one.store
            assert type(o).__name__ == "PackedStore" and type(s).__name__ == "RaggedPackedStore", (s, o)
            held = s.head_lengths()[i * s.heads : (i + 1) * s.heads]
            assert s._np[i] == o.n_packed > 0 and held == [o.n] * s.heads, (i, s, o)
            assert s._own_residual()[i] + s._r0 == o.r + o._r0, (i, s, o)
            assert "not packed yet" not in repr(s), s  # every row has packed by now
            is_rot, tri, _ = s.row_choice(i)
            assert is_rot == (o.rotation is not None), (i, layer.layer_idx)
            assert (tri is None) == (o.feedback is None), (i, layer.layer_idx)
            if tri is not None:
                D = int(s._rk.shape[-1])
                assert torch.allclose(expand(tri, D), expand(o.feedback, D), rtol=2**-7, atol=1e-6), i


@pytest.mark.parametrize("spec", ["ems+kivi:bits=2", "ems+kivi:bits=4", "ems+kivi:bits=2:keep_rows=0",
                                  "adakv+kivi:bits=2", "ems+kivi:bits=2:rotate=auto:feedback=true",
                                  "adakv+kivi:bits=2:rotate=auto:feedback=true", "ems+kivi:bits=2:sinks=4",
                                  "ems+kivi:bits=2:sinks=4:joined"])
def test_rows_behind_an_evictor_with_rounds_keep_their_own_residual(tiny_model, spec, monkeypatch):
    """Behind a per-head evictor that keeps its budget while decoding
    (rounds every 16 steps), each row keeps in full precision the newest
    slots its own heads allow (``from_ragged(rows_apart=True)``), not the
    fewest any row's heads allow, and a merging method's round keeps a
    row's unchanged key groups exactly when it would alone
    (``arrange_rows``, EMS's default ``keep_rows``): every row generates
    what it generates alone over 40 tokens (two rounds) and holds bit for
    bit its packed codes and placeholders and as many full-precision slots
    (with one residual length for the batch every case fails, and with one
    keep_rows layout decision for the batch both EMS cases with it). Under
    ``rotate="auto"`` and ``feedback=True`` each row also makes the
    layer's once-only choices at its first pack as alone, and every round
    packs it so, its keep_rows rounds on its own basis (with one choice for
    the batch the two cases fail; with the batch's basis for every row's
    round, the EMS one). Under ``sinks=4`` each row keeps the sink block
    it keeps alone (one row of these takes none alone; with one block for
    the batch, the shortest, both cases fail), also where the kernel takes
    no ``residual_hidden`` (``joined``: CUDA's reading, on the CPU)."""
    from kvcompress.stores.feedback import expand
    from kvcompress.stores.keep_rows import is_placeholder

    from kvcompress.methods import method_from_spec

    if spec.endswith(":joined"):
        import kvcompress.stores.packed as packed_store

        spec = spec[: -len(":joined")]
        monkeypatch.setattr(packed_store, "one_call", lambda query: False)
    # prompts where the cases below tell the fixes apart (rows of the rotated case choose both ways)
    seed = 2000 if "rotate" in spec else 0
    rows = [random_ids(n, seed + n) for n in (150, 97, 131)]
    ids, mask = left_pad(rows)
    out, cache = _gen(tiny_model, method_from_spec(spec, budget=64), ids, mask, n=40)
    for i, row in enumerate(rows):
        alone, solo = _gen(tiny_model, method_from_spec(spec, budget=64), row[None],
                           torch.ones(1, len(row), dtype=torch.long), n=40)
        assert torch.equal(out[i, -40:], alone[0, -40:]), (spec, i)
        for layer, one in zip(cache.layers, solo.layers):
            s, o = layer.store, one.store
            assert layer._rebudget and s._own_residual()[i] == o.r and s._row_sinks()[i] == o._r0, (i, s, o)
            # its own sink block (a merged sink slot's average may round apart by an ulp) and counts
            assert torch.allclose(s._rk[i, :, : o._r0], o._rk[0, :, : o._r0], rtol=1e-6, atol=1e-7), (i, s, o)
            block = lambda st, b: torch.ones(st.heads, o._r0) if st._sink_counts is None else (  # noqa: E731
                st._sink_counts[b, :, : o._r0])
            assert torch.equal(block(s, i), block(o, 0)), (i, s, o)
            assert s.head_lengths()[i * s.heads : (i + 1) * s.heads] == o.head_lengths(), (i, s, o)
            is_rot, tri, _ = s.row_choice(i)
            assert is_rot == (o.rotation is not None) and (tri is None) == (o.feedback is None), (i, s, o)
            if tri is not None:
                D = int(s._rk.shape[-1])
                assert torch.allclose(expand(tri, D), expand(o.feedback, D), rtol=2**-7, atol=1e-6), i
            for h in range(s.heads):
                j, n = i * s.heads + h, int(o.lengths[h])
                a, a1 = int(s.offsets[j]), int(o.offsets[h])
                assert int(s.lengths[j]) == n and torch.equal(s._kc[a : a + n], o._kc[a1 : a1 + n]), (i, h)
                assert torch.equal(is_placeholder(s.counts_bias[a : a + n]),
                                   is_placeholder(o.counts_bias[a1 : a1 + n])), (i, h)


@pytest.fixture(scope="module")
def tiny_sliding():
    """A randomly initialised 3-layer Mistral whose every layer slides over 64 tokens (eager attention)."""
    return tiny_sliding_mistral()


@pytest.mark.parametrize("kw", [dict(bits=2, group=8, residual=8),
                                dict(bits=2, group=8, residual=8, rotate="auto", feedback=True,
                                     clip_values="auto")], ids=["kivi2", "recipe"])
def test_sliding_kivi_rows_generate_what_they_generate_alone(tiny_sliding, kw):
    """A packed sliding-window layer packs each row of a left-padded batch
    on its own schedule too: a row shorter than the window starts its key
    groups at its first real token (not at the window's first slot), and
    drops its own groups as the window passes them, so over 50 tokens (the
    window passes every prompt) each row generates what it generates alone
    and holds as many packed slots (before: 10 of these 18 rows differed)."""
    for lengths in ([60, 37, 50], [100, 30, 61], [45, 45, 20]):
        rows = [random_ids(n, 60 + n) for n in lengths]
        ids, mask = left_pad(rows)
        out, cache = _gen(tiny_sliding, kvc.KIVI(**kw), ids, mask, n=50)
        for i, row in enumerate(rows):
            alone, solo = _gen(tiny_sliding, kvc.KIVI(**kw), row[None], torch.ones(1, len(row), dtype=torch.long),
                               n=50)
            assert torch.equal(out[i, -50:], alone[0, -50:]), (lengths, i)
            for layer, one in zip(cache.layers, solo.layers):
                assert layer.window is not None and layer.store._np[i] == one.store.n_packed > 0, (i, layer.store)


def test_sliding_rows_generate_as_alone_where_the_kernel_takes_no_residual_hidden(tiny_sliding, monkeypatch):
    """Where the kernel takes no ``residual_hidden`` (the CUDA kernels; here
    the CPU's, made to read as they do) a sliding layer still packs each
    row on its own schedule: a decode step reads each row's packed part and
    own residual in two calls, the window's oldest slots masked by the
    packed call's ragged ``kv_start`` and the residual call's. Every row
    generates what it generates alone and holds as many packed slots."""
    import kvcompress.stores.packed as packed_store

    monkeypatch.setattr(packed_store, "one_call", lambda query: False)
    rows = [random_ids(n, 80 + n) for n in (100, 30, 61)]
    ids, mask = left_pad(rows)
    out, cache = _gen(tiny_sliding, kvc.KIVI(bits=2, group=8, residual=8), ids, mask, n=50)
    for i, row in enumerate(rows):
        alone, solo = _gen(tiny_sliding, kvc.KIVI(bits=2, group=8, residual=8), row[None],
                           torch.ones(1, len(row), dtype=torch.long), n=50)
        assert torch.equal(out[i, -50:], alone[0, -50:]), i
        for layer, one in zip(cache.layers, solo.layers):
            assert layer.window is not None and layer.store._np[i] == one.store.n_packed > 0, (i, layer.store)


@pytest.mark.parametrize("name", ["ems", "adakv", "snapkv", "h2o"])
def test_beam_search_with_budget_above_prompt_equals_plain_beam_search(tiny_model, name):
    ids = random_ids(40, 8)[None]
    mask = torch.ones_like(ids)
    ref = _gen(tiny_model, None, ids, mask, n=8, num_beams=3)
    out, cache = _gen(tiny_model, REGISTRY[name](budget=500), ids, mask, n=8, num_beams=3)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name", ["ems", "adakv"])
def test_beam_search_runs_on_per_head_layers(tiny_model, name):
    ids = random_ids(120, 9)[None]
    mask = torch.ones_like(ids)
    method = REGISTRY[name](budget=48, interval=4)
    out, cache = _gen(tiny_model, method, ids, mask, n=12, num_beams=3)
    assert out.shape == (1, 132)
    layer = cache.layers[0]
    assert layer.ragged is not None and layer.ragged.batch == 3
    assert max(layer.head_lengths()) < 48 * 2 + 4


def test_four_d_mask_records_the_padding(tiny_model):
    """A 4-D mask on the first chunk: pad slots are recorded as such, so a
    prefill compression never keeps them."""
    ids, mask2 = left_pad([random_ids(30, 10), random_ids(60, 11)])
    T = ids.shape[1]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    allowed = causal[None] & mask2.bool()[:, None, :]
    allowed = allowed | torch.eye(T, dtype=torch.bool)[None]
    four_d = torch.zeros(2, 1, T, T).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    with kvc.compress(tiny_model, kvc.SnapKV(budget=32, window=8)) as session:
        cache = session.new_cache()
        with torch.no_grad():
            tiny_model(ids, attention_mask=four_d, position_ids=(mask2.cumsum(1) - 1).clamp_min(0),
                       **cache_kwargs(tiny_model, cache))
    for layer in cache.layers:
        pos = layer.positions
        start = layer.kv_start.tolist()
        assert start[1] == 0 and start[0] == 2  # row 0: 30 real tokens < 32, two filler slots
        assert (pos[0, :, start[0]:] >= 30).all()  # no pad token kept


class _Module:
    is_causal = True


@pytest.mark.parametrize("kwargs, name", [
    ({"position_bias": torch.zeros(1)}, "position_bias"),
    ({"is_causal": False}, "is_causal"),
    ({"cu_seq_lens_q": torch.zeros(2)}, "cu_seq_lens_q"),
    ({"output_attentions": True}, "output_attentions"),
    ({"attention_chunk_size": 8}, "attention_chunk_size"),
    ({"s_aux": torch.zeros(3)}, "s_aux"),
    ({"sliding_window": 0}, "sliding_window"),
    ({"softcap": -1.0}, "softcap"),
])
def test_attention_options_we_cannot_honour_are_refused_by_name(kwargs, name):
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(kvc.KVCompressError, match=name):
        attention_spec(_Module(), q, 0.0, None, kwargs)


def test_honoured_options_are_read():
    q = torch.zeros(1, 4, 2, 8)
    spec = attention_spec(_Module(), q, 0.0, 0.5, {"sliding_window": 64, "softcap": 50.0, "s_aux": torch.ones(4),
                                                   "position_ids": torch.zeros(1), "output_attentions": False})
    assert (spec.window, spec.softcap, spec.scaling) == (64, 50.0, 0.5) and spec.sinks.shape == (4,)
    assert not spec.plain


def _row_steps(model, method, ids, mask, n: int, b: int):
    """Greedy tokens ``[B, n]`` of ``method`` and, after every forward, per
    layer what row ``b`` holds: its real slots per kv head and, while its
    layer is packed, ``(sink slots, packed slots, full-precision residual)``
    (of its longest head in row mode)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from kvcompress.stores import PackedStore, RaggedPackedStore

    steps = []

    class Record(LogitsProcessor):
        def __call__(self, input_ids, scores):
            row = []
            for layer in session.cache.layers:
                s, H = layer.store, layer.store.heads
                if hasattr(s, "offsets"):  # a per-head store, packed or not
                    heads = s.head_lengths()[b * H : (b + 1) * H]
                else:
                    heads = [s.n - (layer._start[b] if layer._start else 0)] * H
                packed = None
                if isinstance(s, RaggedPackedStore) and s._np is not None:
                    packed = (s._row_sinks()[b], s._np[b], s._own_residual()[b])
                elif type(s) is PackedStore:
                    # row mode: the row's own packed count and residual
                    packed = (s._r0, s.n_packed, s.r) if s._np is None else (s._r0, s._np[b], s.r - s._rs[b])
                row.append((heads, packed))
            steps.append(row)
            return scores

    with kvc.compress(model, method) as session:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([Record()]))
    return out[:, ids.shape[1]:], steps


@pytest.mark.parametrize("spec", ["ems", "snapkv", "adakv", "headkv", "ems+kivi:bits=2:group=8:residual=16:sinks=4",
                                  "ems+kivi:bits=2:group=8:residual=8:sinks=4",
                                  "adakv+kivi:bits=2:group=8:residual=16:sinks=4",
                                  "snapkv+kivi:bits=2:group=8:residual=16", "h2o+kivi:bits=2:group=8:residual=8"])
def test_rows_that_fit_their_budget_are_compressed_on_their_own_schedule(tiny_model, spec):
    """Behind an evictor with rounds (every 16 steps), a row whose prompt
    fits the budget keeps every token until its own heads are over the
    budget by the interval, and is then compressed to the budget, as alone
    (before: its heads' budgets stayed at its prompt length, so every batch
    round cut it back to that, and a round of the other rows compressed it
    as soon as it was over the budget at all). Packed, it holds what a
    uniform ``PackedStore`` of it alone holds until its first round: sinks
    once it holds ``sinks + residual + group`` slots (the 14-token row
    takes them while decoding under the second KIVI), whole groups on
    KIVI's schedule. Every row generates what it generates alone over 40
    tokens and, after every step, holds as many slots per head. A headwise
    evictor (AdaKV, HeadKV) compresses such a row the first time with its
    layer-wide selection, which gives its heads their own budgets, as alone
    (before: the equal shares of a row kept whole). A uniform evictor's
    packed layer (SnapKV, H2O + KIVI) packs each row on its own schedule,
    leaves the rows a round does not compress as they were and accumulates
    H2O's state per row at the row's own rounds (before: one packing
    schedule for the batch, every row packed again at every round)."""
    from kvcompress.methods import method_from_spec

    for lengths in ((150, 40, 131, 14), (96, 60, 120)):
        rows = [random_ids(n, 300 + n) for n in lengths]
        ids, mask = left_pad(rows)
        for i, row in enumerate(rows):
            out, batch = _row_steps(tiny_model, method_from_spec(spec, budget=64), ids, mask, 40, i)
            alone, solo = _row_steps(tiny_model, method_from_spec(spec, budget=64), row[None],
                                     torch.ones(1, len(row), dtype=torch.long), 40, 0)
            assert torch.equal(out[i], alone[0]), (spec, lengths, i)
            for step, (mine, theirs) in enumerate(zip(batch, solo)):
                for layer, ((h1, p1), (h2, p2)) in enumerate(zip(mine, theirs)):
                    assert h1 == h2, (spec, lengths, i, step, layer, h1, h2)
                    if len(row) <= 64 and p2 is not None and len(set(h2)) == 1 and p1 is not None:
                        # alone still a uniform packed layer: the row packs as it does
                        assert p1 == p2, (spec, lengths, i, step, layer, p1, p2)




def test_left_pad_lays_rows_out_as_a_left_padding_tokenizer():
    """``kvcompress.testing.left_pad``: each row's ids at the end of its line,
    zeros and mask 0 before them; no rows is refused by name."""
    from kvcompress.testing import left_pad as lay_out

    ids, mask = lay_out([torch.tensor([5, 6, 7]), torch.tensor([9])])
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="rows"):
        lay_out([])


@pytest.mark.parametrize("spec", ["snapkv", "ems", "kivi:bits=4:group=8:residual=16"])
def test_a_padded_prefill_gives_each_row_its_own_cache_bit_for_bit(tiny_model, spec):
    """The prompt's forward of a left-padded batch attends row by row over
    each row's own slots (``stores.masked.rows_attention``), so every layer
    caches for each row the keys and values it caches alone, bit for bit
    (one SDPA call over the padded batch is 1e-7 apart from layer 1 on: its
    blocks of keys start at the padding). The budget holds every prompt."""
    from kvcompress.methods import method_from_spec

    rows = [random_ids(n, 700 + n) for n in (96, 60, 120, 14)]
    ids, mask = left_pad(rows)
    T = ids.shape[1]

    def prefill(ids, mask):
        method = method_from_spec(spec) if spec.startswith("kivi") else method_from_spec(spec, budget=256)
        with kvc.compress(tiny_model, method) as session:
            cache = session.new_cache()
            with torch.no_grad():
                tiny_model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0),
                           **cache_kwargs(tiny_model, cache))
        return [layer.store.dequantized() if hasattr(layer.store, "dequantized") else (layer.keys, layer.values)
                for layer in cache.layers]

    batch = prefill(ids, mask)
    for b, row in enumerate(rows):
        alone = prefill(row[None], torch.ones(1, len(row), dtype=torch.long))
        for layer, ((kb, vb), (ka, va)) in enumerate(zip(batch, alone)):
            pad = T - len(row)
            assert torch.equal(kb[b, :, pad:], ka[0]) and torch.equal(vb[b, :, pad:], va[0]), (b, layer)


def test_a_round_of_some_rows_reads_their_token_ids(tiny_model, monkeypatch):
    """A per-head round runs the method on the rows due only
    (``_recompress_heads``); FastGen classes slots by their token ids, which
    the layer's token log gives for the whole batch: the rows of a partial
    round still get theirs (looked up for the batch, then taken), the ids
    of their own slots."""
    from kvcompress.methods import FastGen

    seen = []
    select = FastGen.select

    def spy(self, view, keep):
        if not isinstance(keep, int):  # a decode-time round
            seen.append((int(view.keys.shape[0]), None if view.tokens is None else view.tokens.clone(),
                         view.keys.shape[2]))
        return select(self, view, keep)

    monkeypatch.setattr(FastGen, "select", spy)
    rows = [random_ids(n, 900 + n) for n in (150, 40, 131)]
    ids, mask = left_pad(rows)
    with kvc.compress(tiny_model, kvc.FastGen(budget=64, interval=4)):
        tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=30, min_new_tokens=30,
                            do_sample=False, pad_token_id=0)
    H = tiny_model.config.num_key_value_heads
    partial = [s for s in seen if s[0] < len(rows) * H]
    assert partial, "no round left a row out"
    for _, tokens, _ in partial:
        assert tokens is not None and bool((tokens >= 0).any())


TWO_TURNS = {
    "adakv": lambda: kvc.AdaKV(budget=36),
    "ems": lambda: kvc.EMS(budget=36),
    "kvmerger": lambda: kvc.KVMerger(budget=36),
    "headkv": lambda: kvc.HeadKV(budget=36),
    "ems:interval=0": lambda: kvc.EMS(budget=36, interval=0),
    "adakv:interval=0": lambda: kvc.AdaKV(budget=36, interval=0),
    "ems+kivi": lambda: kvc.EMS(budget=36) + kvc.KIVI(bits=4, group=8, residual=8),
    "adakv+kivi": lambda: kvc.AdaKV(budget=36) + kvc.KIVI(bits=4, group=8, residual=8),
}


@pytest.mark.parametrize("name", sorted(TWO_TURNS))
def test_a_second_turn_compresses_a_row_kept_whole_as_alone(tiny_model, name):
    """Two turns (the cache passed back with 9 more tokens) on a left-padded
    batch of a 40-token row, compressed at its prompt, which makes the layer
    per-head, and a 25-token row that fits the budget until the second turn:
    that row's first compression, by the second turn's chunk, is the one its
    layer alone makes (uniform there, with the chunk's queries), so it
    generates what it generates alone in both turns (it was re-compressed
    head by head with the held queries, and differed)."""
    from kvcompress.compat import output_cache

    long_, short = random_ids(40, 41), random_ids(25, 42)
    extra = torch.stack([random_ids(9, 43), random_ids(9, 44)])

    def turns(rows, more):
        ids, mask = left_pad(rows)
        T = int(ids.shape[1])
        args = dict(max_new_tokens=8, min_new_tokens=8, pad_token_id=0, do_sample=False, return_dict_in_generate=True)
        with kvc.compress(tiny_model, TWO_TURNS[name]()) as session:
            one = tiny_model.generate(input_ids=ids, attention_mask=mask, **args)
            ids2 = torch.cat([one.sequences, more], 1)
            mask2 = torch.cat([mask, torch.ones(len(rows), int(ids2.shape[1]) - T, dtype=torch.long)], 1)
            two = tiny_model.generate(input_ids=ids2, attention_mask=mask2, **args,
                                      **cache_kwargs(tiny_model, output_cache(one)))
        return one.sequences[:, T:], two.sequences[:, ids2.shape[1]:], session.cache

    batch_one, batch_two, cache = turns([long_, short], extra)
    alone_one, alone_two, _ = turns([short], extra[1:])
    # the long row made the layers per-head
    assert any(layer.store.kind in ("ragged", "ragged-packed") for layer in cache.layers)
    assert torch.equal(batch_one[1], alone_one[0]) and torch.equal(batch_two[1], alone_two[0]), name
