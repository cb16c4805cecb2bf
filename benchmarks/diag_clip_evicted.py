"""Behind an evictor, what does clipping the packed value groups do to the
attention's error, and would ``clip_values="auto"``'s test see it?

For each fidelity passage (the eval's: ``--texts`` passages of
``--context`` tokens, ``--seed``), runs ``--spec`` at ``--budget`` and
records, on every layer, what the clip test would read at the layer's first
pack (since ``clip_values="auto"`` no longer tests behind an evictor, the
diagnostic collects it itself): the newest 32 queries, the kept slots
(``to_padded``: keys, values, merge counts, padding), how many of each
head's newest slots are packed, and the prompt's full keys and values from
before the evictor ran. The full cache then reads the context and the
reference's ``--k`` next tokens in one prefill, which gives every layer's
queries at those ``k`` later positions.

Every error is taken after the layer's output projection, summed over the
queries, in float64, with the packed slots' values packed at the method's
value width with min..max ("plain") or clipped ranges ("clip"); keys exact:

* **test**: the newest queries' error over the packed slots alone (softmax
  over them, log-count bias), against exact values: what the clip test
  computes without an evictor;
* **later**: the same for the later queries;
* **later vs full**: the later queries' attention over every kept slot
  (sinks, packed and unpacked slots) against their attention over the
  full prompt: the eviction's error and the values' together;
* **newest vs full**: the same for the newest queries (a test the cache
  could run at the first pack).

It prints each layer's numbers, how often each test's choice agrees with
"later vs full", and the mean relative change of "later vs full" that each
way of choosing gives over never clipping. A diagnostic (it packs and
unpacks with ``ops``)::

    python benchmarks/diag_clip_evicted.py --texts 4 --seed 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import kvcompress.cache as C
from kvcompress import ops
from kvcompress import testing as T
from kvcompress.methods import method_from_spec
from kvcompress.model import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diag_rotation_layers import _capture  # noqa: E402  (same folder)

SPEC = "ems:interval=64+kivi:bits=2:rotate=auto:sinks=4:feedback=true:clip_values=auto"


def _record(model, method, ref):
    """``{layer: (newest queries, full (keys, values), to_padded(), m,
    value bits, group, scaling, out_proj)}`` at each layer's first pack, from a
    teacher-forced run of ``method`` on ``ref``."""
    got, full = {}, {}
    real_clip, real_compress = C.CompressedLayer._value_clip, C.CompressedLayer._compress

    def clip(self, packing, queries, scaling, defer=False):
        i = self.layer_idx
        if i not in got and i in full and hasattr(self.store, "to_padded") and not self._clip_decided:
            keys = self._slots_to_pack(packing)[0]
            held = self._newest(self._clip_q, queries)
            if held is not None and keys.shape[2]:
                s = float(scaling if scaling is not None else keys.shape[-1] ** -0.5)
                got[i] = (held.detach().clone(), full[i], self.store.to_padded(), int(keys.shape[2]), packing[3],
                          packing[1], s, self.out_proj)
        return real_clip(self, packing, queries, scaling, defer)

    def compress(self, *a, **kw):
        if self.layer_idx not in full and hasattr(self.store, "keys"):
            full[self.layer_idx] = (self.store.keys.detach().clone(), self.store.values.detach().clone())
        return real_compress(self, *a, **kw)

    C.CompressedLayer._value_clip, C.CompressedLayer._compress = clip, compress
    try:
        T.fidelity_case(model, method, ref)
    finally:
        C.CompressedLayer._value_clip, C.CompressedLayer._compress = real_clip, real_compress
    return got


def _errors(queries, full, kept, m, bits, group, scaling, out_proj, sinks):
    """``{(measure, way): error}`` for ``queries`` ``[1, Hq, W, D]``: measure
    "packed" (softmax over the packed slots, against exact values) or
    "full" (softmax over every kept slot, against the full prompt's
    attention); way "exact", "plain" or "clip" (the packed slots' values)."""
    kf, vf = (t[:1].double() for t in full)  # [1, H, n, D]
    keys, values, _, counts, _, start = kept  # [H, 1, M, D], ..., [H, M], [H]
    H, M = int(keys.shape[0]), int(keys.shape[2])
    q = queries.double()
    Hq, W, D = int(q.shape[1]), int(q.shape[2]), int(q.shape[3])
    rep = Hq // H
    q = q.reshape(H, rep * W, D)
    full_out = torch.softmax(scaling * q @ kf[0].transpose(-1, -2), -1) @ vf[0]  # [H, rep W, Dv]
    vk = values[:, 0].float()
    logits = scaling * q @ keys[:, 0].double().transpose(-1, -2) + counts.double().log()[:, None, :]
    idx = torch.arange(M)[None, :]
    pad = idx < start[:, None]
    # each head's newest m slots are packed, never its sinks (the first `sinks` after its padding)
    packed_slot = (idx >= M - m) & (idx >= start[:, None] + sinks)
    p_all = torch.softmax(logits.masked_fill(pad[:, None, :], float("-inf")), -1)
    p_packed = torch.softmax(logits.masked_fill(~packed_slot[:, None, :], float("-inf")), -1).nan_to_num(0.0)
    vals = {"exact": vk}
    for way, clip in (("plain", False), ("clip", True)):
        packed = ops.unpack_values(*ops.pack_values(vk[None].contiguous(), bits, group, clip=clip), bits, group)[0]
        vals[way] = torch.where(packed_slot[:, :, None], packed, vk)
    w = out_proj.detach().double()

    def err(a, b):
        e = (a - b).reshape(H, rep, W, -1).permute(2, 0, 1, 3).reshape(W, -1)
        return float((e @ w.t()).pow(2).sum())

    out = {}
    for way, v in vals.items():
        out[("packed", way)] = err(p_packed @ v.double(), p_packed @ vk.double())
        out[("full", way)] = err(p_all @ v.double(), full_out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--spec", default=SPEC)
    ap.add_argument("--budget", type=int, default=96)
    ap.add_argument("--texts", type=int, default=4)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ops.set_num_threads(1)
    model, tok = load_model(args.model)
    method = method_from_spec(args.spec, budget=args.budget)
    texts = T.sample_passages(T.default_text(), args.texts, args.context * 8, seed=args.seed)
    choosers = ("never", "always", "test", "later", "newest vs full", "later vs full")
    agree = {c: 0 for c in choosers}
    change = {c: [] for c in choosers}  # per text: mean over layers of the relative change of "later vs full"
    share, total = [0.0, 0.0], 0
    for i, text in enumerate(texts):
        ref = T.fidelity_reference(model, tok, text, context_tokens=args.context, k=args.k)
        rec = _record(model, method, ref)
        seq = torch.cat([ref.ids, torch.tensor([ref.tokens[: args.k]])], 1)
        caught = _capture(model, seq)
        n = int(ref.ids.shape[1])
        rel = {c: [] for c in choosers}
        for layer, (queries, full, kept, m, bits, group, scaling, w) in sorted(rec.items()):
            later = caught[layer][0][:, :, n:]
            new = _errors(queries, full, kept, m, bits, group, scaling, w, method.fp_sinks)
            old = _errors(later, full, kept, m, bits, group, scaling, w, method.fp_sinks)
            lp, lc = old[("full", "plain")], old[("full", "clip")]
            picks = {"never": False, "always": True,
                     "test": new[("packed", "clip")] < new[("packed", "plain")],
                     "later": old[("packed", "clip")] < old[("packed", "plain")],
                     "newest vs full": new[("full", "clip")] < new[("full", "plain")],
                     "later vs full": lc < lp}
            for c, pick in picks.items():
                agree[c] += int(pick == picks["later vs full"])
                rel[c].append(((lc if pick else lp) - lp) / lp)
            share[0] += old[("full", "exact")]
            share[1] += lp
            total += 1
            print(f"text {i} layer {layer:2d} m={m:4d} | test: plain {new[('packed', 'plain')]:.3e} clip "
                  f"{new[('packed', 'clip')]:.3e} | later: plain {old[('packed', 'plain')]:.3e} clip "
                  f"{old[('packed', 'clip')]:.3e} | later vs full: exact values {old[('full', 'exact')]:.3e} "
                  f"plain {lp:.3e} clip {lc:.3e} | newest vs full: plain {new[('full', 'plain')]:.3e} "
                  f"clip {new[('full', 'clip')]:.3e}", flush=True)
        for c in choosers:
            change[c].append(sum(rel[c]) / max(1, len(rel[c])))
    print(f"\n{total} layer cases; the eviction's share of 'later vs full' (plain): {share[0] / share[1]:.2f}")
    print("| choice by | agrees with 'later vs full' | 'later vs full' vs never clipping, mean over layers, "
          "per text |")
    print("|---|---:|---|")
    for c in choosers:
        xs = change[c]
        print(f"| {c} | {agree[c]}/{total} | {sum(xs) / len(xs):+.3f} ({', '.join(f'{x:+.3f}' for x in xs)}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
