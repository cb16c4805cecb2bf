"""Which key groups a decode-time round of ``evictor + KIVI`` could leave as
they are, on a real run.

A round (``CompressedLayer._repack_round``) reads a per-head packed layer
back dequantized, lets the method re-select or re-merge, and packs the kept
slots again. A key group whose members come back the same (same tokens, same
merge counts, same order) packs to the same codes; any other kept key is
re-quantized on a new grid, which is where 2-bit rounds drift. This script
wraps the round and counts, over every round of every layer:

* ``whole``: the new store's key groups that equal an old one (the rounds as
  they are: kept slots are packed back in order, so one change in a head
  shifts every later group);
* ``intact``: the old store's key groups whose every member is still held
  unchanged afterwards, packed or in the residual (an upper bound for any
  re-pack that kept undamaged groups in place instead of shifting them);
* ``re-quantized``: the new store's packed rows whose token was packed
  before the round (the rest are packed for the first time);
* the old packed rows (a repeated slot once) that are held afterwards with
  the same merge count, that are no longer held, and that are held with
  another count (merged into): what a round that keeps unchanged rows in
  place could keep (``KIVI(keep_rows=...)``; run with ``keep_rows=0`` for the
  rounds as they were before it, which pack everything again).

Everything after ``--`` is the ``kvcompress`` command line, e.g.::

    python benchmarks/diag_repack_groups.py -- eval --tasks fidelity --budgets 128 -k 128 \\
        --fidelity-texts 2 --fidelity-context 1024 --methods ems+kivi:bits=2:rotate=auto:sinks=4 --threads 1
"""

from __future__ import annotations

import collections
import sys

from kvcompress import cache as C
from kvcompress.cli import main as kvcompress_main
from kvcompress.stores.packed_ragged import RaggedPackedStore


def _groups(store) -> set:
    """(head, positions, merge counts) of every packed key group."""
    G, out = store.group, set()
    for h, (o, n) in enumerate(zip(store.offsets.tolist(), store.lengths.tolist())):
        for g in range(o, o + n, G):
            out.add((h, tuple(store.positions[g : g + G].tolist()), tuple(store.counts_bias[g : g + G].tolist())))
    return out


def _held(store) -> dict:
    """(head, position) -> merge count of every slot the store holds (residual and sink block: count 1
    unless the block carries counts; the block's own counts are compared as held)."""
    held = {}
    for h, (o, n) in enumerate(zip(store.offsets.tolist(), store.lengths.tolist())):
        for p, c in zip(store.positions[o : o + n].tolist(), store.counts_bias[o : o + n].tolist()):
            held[(h, p)] = c
    rpos = store._rcols["positions"][0]
    for h in range(int(rpos.shape[0])):
        for p in rpos[h, : store.r + store._r0].tolist():
            held.setdefault((h, p), 1.0)
    return held


def patch(stats: collections.Counter) -> None:
    real_round = C.CompressedLayer._repack_round

    def counted(self, scaling, *args):
        old = self.store
        before = _groups(old) if isinstance(old, RaggedPackedStore) and old.batch == 1 else None
        real_round(self, scaling, *args)
        new = self.store
        if before is None or not isinstance(new, RaggedPackedStore):
            return
        after, held = _groups(new), _held(new)
        was_packed = {(h, p) for h, pos, _ in before for p in pos}
        stats["rounds"] += 1
        stats["new groups"] += len(after)
        stats["whole"] += len(after & before)
        stats["old groups"] += len(before)
        stats["intact"] += sum(all(held.get((h, p)) == c for p, c in zip(pos, cnt)) for h, pos, cnt in before)
        old_rows = {(h, p): c for h, pos, cnt in before for p, c in zip(pos, cnt)}
        stats["old rows"] += len(old_rows)
        stats["rows kept"] += sum(held.get(key) == c for key, c in old_rows.items())
        stats["rows dropped"] += sum(key not in held for key in old_rows)
        rows = {(h, p) for h, pos, _ in after for p in pos}
        stats["packed rows"] += len(rows)
        stats["re-quantized"] += len(rows & was_packed)

    C.CompressedLayer._repack_round = counted


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rest = argv[argv.index("--") + 1 :] if "--" in argv else argv
    stats: collections.Counter = collections.Counter()
    patch(stats)
    code = kvcompress_main(rest)
    if not stats["rounds"]:
        print("no per-head packed round ran (batch 1, an evictor + KIVI with a decode interval)")
        return code or 1
    print(f"rounds {stats['rounds']}: new groups equal to an old one {stats['whole']}/{stats['new groups']} "
          f"({stats['whole'] / stats['new groups']:.1%}); old groups intact {stats['intact']}/{stats['old groups']} "
          f"({stats['intact'] / stats['old groups']:.1%}); packed rows re-quantized "
          f"{stats['re-quantized']}/{stats['packed rows']} ({stats['re-quantized'] / stats['packed rows']:.1%})")
    kept, dropped, rows = stats["rows kept"], stats["rows dropped"], stats["old rows"]
    print(f"old packed rows (a repeated slot once): held afterwards with the same merge count {kept}/{rows} "
          f"({kept / rows:.1%}), no longer held {dropped} ({dropped / rows:.1%}), held with another count "
          f"(merged into) {rows - kept - dropped} ({(rows - kept - dropped) / rows:.1%})")
    return code


if __name__ == "__main__":
    sys.exit(main())
