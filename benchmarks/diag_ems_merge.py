"""Which of EMS's merges cost fidelity: ``kvcompress`` with EMS's merge step gated.

EMS merges every evicted token whose key has cosine >= ``tau`` with its most
similar kept key into that kept slot (``ops.evict_merge``). This diagnostic
evicts some of those tokens instead, by one of three rules, and runs the
``kvcompress`` command line after ``--`` unchanged otherwise:

* ``--gate value --limit C``: a token merges only when its **value** also has
  cosine >= C with the value of the key-nearest kept slot;
* ``--gate distance --limit P``: a token merges into its key-nearest kept slot
  when ``|k_j - k_c| <= P |k_c|`` (norms count, not only directions), whatever
  its cosine;
* ``--gate local``: nothing merges into a **local pick** (the tokens EMS keeps
  because the prompt's last query reads them most); a token whose nearest
  kept key is a local pick is evicted.

A token is evicted by zeroing its key in the copy handed to
``ops.evict_merge``: a zero key has cosine 0 with every kept key, below any
threshold used here, and an evicted token contributes nothing to a merge.
A diagnostic, not a method: nothing in the package changes.

    python benchmarks/diag_ems_merge.py --gate local -- \\
        eval --tasks fidelity --budgets 64,128 --fidelity-texts 8 --methods ems --threads 1 --out DIR
"""

from __future__ import annotations

import argparse
import sys

import torch

from kvcompress import ops
from kvcompress.cli import main as kvcompress_main
from kvcompress.methods import ems as E


def _nearest(evict_merge, keys, values, scores, centers, kv_start):
    """Per token of keys [B, H, T, D]: the slot of the kept key (centers
    [B, H, C], -1 padded) it would merge into, as evict_merge (the
    unpatched ops.evict_merge) assigns it with no threshold, by its own
    cosines and ties; and whether it is a real token (not padding) that is
    not kept, the tokens a gate can evict."""
    a = evict_merge(keys, values, scores, centers, float("-inf"), kv_start=kv_start, return_assign=True).assign
    slot = torch.gather(centers, 2, (a - 1).clamp_min(0))  # assign: -1 padding, c + 1 in center c
    own = torch.arange(int(keys.shape[2]), device=keys.device)
    return slot, (a > 0) & (slot != own)


def _row(x, slot):
    """x [B, H, T, D] at slot [B, H, T]."""
    return torch.gather(x, 2, slot[..., None].expand(-1, -1, -1, x.shape[-1]))


def patch(gate: str, limit: float | None, counts: list) -> None:
    evict_merge = ops.evict_merge
    force = E.EMS._force
    local = {}

    def gated(keys, values, scores, centers, tau=None, *, kv_start=None, **kw):
        picks = local.pop("picks", None)
        if gate == "local" and picks is None:  # decode re-compression: no local picks
            return evict_merge(keys, values, scores, centers, tau, kv_start=kv_start, **kw)
        slot, free = _nearest(evict_merge, keys, values, scores, centers, kv_start)
        if gate == "value":
            v = values.float()
            vn = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            evict = (vn * _row(vn, slot)).sum(-1) < limit
        elif gate == "distance":
            k = keys.float()
            kc = _row(k, slot)
            evict = (k - kc).norm(dim=-1) > limit * kc.norm(dim=-1)
            tau = 1e-6  # every token within the distance merges, whatever its cosine
        else:
            evict = torch.gather(picks, 2, slot)
        evict &= free
        counts[0] += int(evict.sum())
        counts[1] += int(free.sum())
        if evict.any():
            keys = keys.clone()
            keys[evict] = 0
        return evict_merge(keys, values, scores, centers, tau, kv_start=kv_start, **kw)

    def forced(self, ranked, lc, room, limit_):
        chosen = force(self, ranked, lc, room, limit_)
        h = int(lc.shape[-1])
        picks = torch.zeros(chosen.shape, dtype=torch.bool, device=chosen.device)
        # a local pick is a candidate that _force raised to +inf
        picks[..., :h] = (chosen[..., :h] == float("inf")) & (ranked[..., :h] != float("inf"))
        local["picks"] = picks
        return chosen

    ops.evict_merge = gated
    E.EMS._force = forced


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gate", choices=("value", "distance", "local"), required=True)
    ap.add_argument("--limit", type=float, help="value: the value cosine; distance: the relative key distance")
    args = ap.parse_args(argv[:cut])
    if args.gate != "local" and args.limit is None:
        ap.error(f"--gate {args.gate} needs --limit")
    counts = [0, 0]
    patch(args.gate, args.limit, counts)
    rc = kvcompress_main(argv[cut + 1:])
    print(f"tokens the gate evicts (whatever tau says): {counts[0]} of {counts[1]} not kept "
          f"({counts[0] / max(counts[1], 1):.1%})", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
