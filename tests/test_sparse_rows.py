"""The sparse readers of uniform layers (Quest, TidalDecode) on left-padded
batches: each row reads what it reads alone.

A row's layer alone holds no padding, so its pages are cut from its first
real token and it reads ``token_budget`` of its own slots. In a padded
batch the rows share one buffer, with padding (or an evictor's filler) in
front of the shorter ones; reading with one count for the whole batch, or
pages cut from the buffer's first slot, would make a padded row read fewer
slots, or other pages, than alone. These tests record every sparse read of
every layer at every decode step and compare a batch's rows with the same
prompts alone.
"""

import pytest
import torch

import kvcompress as kvc
from kvcompress.stores.paged import PagedStore
from kvcompress.stores.tidal import TidalStore
from generation import greedy, left_pad, random_ids

N_NEW = 8


def _record(monkeypatch):
    """Capture, per decode step and layer, what each sparse store read:
    Quest's pages or TidalDecode's slots per row (``-1`` padding dropped),
    None where the row read every slot."""
    log = []

    def wrap(cls, field, slots):
        attend = cls.attend

        def recorded(self, query, spec, kv_start=None, query_pos=None):
            out = attend(self, query, spec, kv_start=kv_start, query_pos=query_pos)
            if int(query.shape[2]) == 1:
                read = getattr(self, field)
                rows = []
                for b in range(int(query.shape[0])):
                    # TidalDecode lists slots of the layer: counted from the row's first real one
                    shift = int(kv_start[b]) if slots and kv_start is not None else 0
                    if read is None or bool((read[b] < 0).all()):
                        rows.append(None)
                    else:
                        rows.append([sorted(int(x) - shift for x in head if x >= 0) for head in read[b]])
                log.append((id(self), rows))
            return out

        monkeypatch.setattr(cls, "attend", recorded)

    wrap(PagedStore, "last_pages", slots=False)
    wrap(TidalStore, "last_read", slots=True)
    return log


def _by_layer(log, row):
    """The reads of one row, per store in the order the steps met them."""
    order, reads = [], {}
    for key, rows in log:
        if key not in reads:
            order.append(key)
            reads[key] = []
        reads[key].append(rows[row])
    return [reads[k] for k in order]


METHODS = {
    "quest": lambda: kvc.Quest(token_budget=40, page=8, dense_layers=1),
    "quest-odd-pages": lambda: kvc.Quest(token_budget=37, page=7, dense_layers=0),
    "tidal": lambda: kvc.TidalDecode(token_budget=40, selection_layers=(1,)),
    "snapkv+quest": lambda: kvc.SnapKV(budget=96) + kvc.Quest(token_budget=40, page=8, dense_layers=1),
    "snapkv+tidal": lambda: kvc.SnapKV(budget=96) + kvc.TidalDecode(token_budget=40, selection_layers=(1,)),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_padded_rows_read_what_they_read_alone(tiny_model, name, monkeypatch):
    """Rows of 150, 93, 36 and 30 tokens (the third outgrows the budget of
    40 after a few steps, the last fits it throughout): every row reads the
    same pages or slots at every decode step as alone, and generates the
    same tokens with the same logits."""
    prompts = [random_ids(150, 11), random_ids(93, 12), random_ids(36, 13), random_ids(30, 14)]
    log = _record(monkeypatch)
    ids, mask = left_pad(prompts)
    out, _ = greedy(tiny_model, ids, mask, method=METHODS[name](), n=N_NEW, output_logits=True,
                    return_dict_in_generate=True)
    batch_log = list(log)
    for b, prompt in enumerate(prompts):
        log.clear()
        alone, _ = greedy(tiny_model, prompt[None], method=METHODS[name](), n=N_NEW, output_logits=True,
                          return_dict_in_generate=True)
        assert torch.equal(out.sequences[b, -N_NEW:], alone.sequences[0, -N_NEW:]), (name, b)
        for step, (x, y) in enumerate(zip(out.logits, alone.logits)):
            torch.testing.assert_close(x[b], y[0], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{name} row {b} step {step}: {m}")
        mine = _by_layer(batch_log, b)
        assert mine == _by_layer(log, 0), (name, b)
        if b == 0:
            # the long row really read sparsely
            assert any(r is not None for layer in mine for r in layer), name


def test_a_padded_quest_layer_holds_bounds_per_row_only(tiny_model):
    """In a padded batch a Quest layer keeps bounds per row (cut from each
    row's first real slot), not also the batch's, and counts them in its
    bytes; the bounds are the rows' keys' per-page minimum and maximum."""
    prompts = [random_ids(120, 21), random_ids(70, 22)]
    ids, mask = left_pad(prompts)
    _, session = greedy(tiny_model, ids, mask, method=kvc.Quest(token_budget=24, page=8, dense_layers=1), n=4)
    cache = session.cache
    for layer in cache.layers[1:]:
        store = layer.store
        assert type(store) is PagedStore and store._row_mode and store._kmin is None
        held = {id(t) for t in store.tensors()}
        for b, start in enumerate(layer.kv_start.tolist()):
            _, kmin, kmax, n = store._rows[b]
            keys = store.keys[b, :, start:].double()
            assert n == keys.shape[1]
            for p in range(-(-n // 8)):
                page = keys[:, p * 8 : (p + 1) * 8]
                assert torch.equal(kmin[0, :, p].double(), page.amin(1)) and torch.equal(kmax[0, :, p].double(),
                                                                                          page.amax(1))
            assert id(kmin) in held and id(kmax) in held
