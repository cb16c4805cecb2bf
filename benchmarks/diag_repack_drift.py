"""How much a key's error grows when a packed layer is re-packed round after
round (decode-time re-compression of ``evictor + KIVI``).

A round reads the layer's keys back dequantized, drops some slots, appends
new full-precision ones and packs everything again, as
``CompressedLayer._repack_round`` does on a uniform layer. A key whose key
group keeps the same members packs to the same codes; one whose group now
mixes slots of two old groups is re-quantized on the new group's grid. This
script takes random keys (Gaussian, a tenth of the channels 4x wider, as
keys' outlier channels are), runs ``--rounds`` rounds that each evict
``--evict`` random slots and append as many new ones, and prints the RMS
error of the slots that were there from the start against their original
keys, beside the error of packing those same keys once::

    python benchmarks/diag_repack_drift.py [--bits 2 4] [--rounds 8] [--evict 16]

Random evictions are the worst case (every group mixes); an evictor that
mostly drops the newest tokens leaves the old groups whole.
"""

from __future__ import annotations

import argparse

import torch

from kvcompress import ops


def _keys(n: int, D: int, g: torch.Generator) -> torch.Tensor:
    wide = 1 + 3 * (torch.rand(D, generator=g) < 0.1)
    return torch.randn(1, 1, n, D, generator=g) * wide


def drift(bits: int, rounds: int, evict: int, n: int = 128, D: int = 64, G: int = 32, seed: int = 0):
    """``(error packed once, error after the rounds)``, RMS over the
    original slots that survived every round."""
    g = torch.Generator().manual_seed(seed)
    orig = _keys(n, D, g)
    full = {i: orig[0, 0, i] for i in range(n)}
    ids, nxt = list(range(n)), n
    cur = ops.unpack_keys(*ops.pack_keys(orig, bits, G), bits, G)
    for _ in range(rounds):
        keep = sorted(torch.randperm(len(ids), generator=g)[: len(ids) - evict].tolist())
        cur, ids = cur[:, :, keep], [ids[k] for k in keep]
        new = _keys(evict, D, g)
        full.update({nxt + j: new[0, 0, j] for j in range(evict)})
        ids, nxt = ids + list(range(nxt, nxt + evict)), nxt + evict
        cur = ops.unpack_keys(*ops.pack_keys(torch.cat([cur, new], 2), bits, G), bits, G)
    ref = torch.stack([full[i] for i in ids])[None, None]
    old = torch.tensor([i < n for i in ids])
    once = ops.unpack_keys(*ops.pack_keys(ref, bits, G), bits, G)
    rms = lambda x: float((x - ref).pow(2).mean(-1).sqrt()[0, 0][old].mean())  # noqa: E731
    return rms(once), rms(cur)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--evict", type=int, default=16)
    args = ap.parse_args(argv)
    print("| bits | key RMS error, packed once | after rounds | ratio |")
    print("|---:|---:|---:|---:|")
    for bits in args.bits:
        once, after = drift(bits, args.rounds, args.evict)
        print(f"| {bits} | {once:.4f} | {after:.4f} | {after / once:.2f}x |")


if __name__ == "__main__":
    main()
