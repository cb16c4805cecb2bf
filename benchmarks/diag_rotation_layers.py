"""Per layer: does a Hadamard rotation make KIVI's packed keys better or worse?

Runs one prompt (``--tokens`` tokens of ``--text``, from character
``--offset``) through the model, takes each layer's prompt keys and queries
as its attention saw them, packs the keys (whole groups of ``--group``) at
``--bits`` both as they are and rotated (``kvcompress.stores.rotation``), and
prints for the last 64 queries of each layer:

* the mean squared error of their logits over the packed keys (before
  scaling), unrotated and rotated, and the ratio;
* the mean KL divergence of their attention over the packed keys (exact keys
  against packed ones; a sliding layer's over its window), both ways.

``KIVI(rotate="auto")`` decides with the second measure, on the keys a layer
packs and its newest 32 queries. A diagnostic (it packs and unpacks with
``ops`` to measure errors; the real kernel never dequantizes)::

    python benchmarks/diag_rotation_layers.py --model gemma3 --bits 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import kvcompress as kvc
from kvcompress import ops
from kvcompress import testing as T
from kvcompress.cache import CompressedLayer
from kvcompress.model import load_model
from kvcompress.stores.rotation import key_rotation

DEFAULT_TEXT = str(Path(kvc.__file__).resolve().parent / "data" / "shakespeare.txt")


def _capture(model, ids):
    """``{layer: (queries [B, Hq, n, D], keys [B, H, n, D], values [B, H, n, D], window, scaling)}``
    of the prompt."""
    got = {}
    real = CompressedLayer.after_attention

    def grab(self, queries, scaling):
        if self.layer_idx not in got and queries is not None:
            got[self.layer_idx] = (queries.detach().clone(), self.store.keys.detach().clone(),
                                   self.store.values.detach().clone(), self.window, scaling)
        return real(self, queries, scaling)

    CompressedLayer.after_attention = grab
    try:
        # KIVI-8 with a residual longer than the prompt: every layer stays full precision and unpacked
        with T.method_context(model, kvc.KIVI(bits=8, residual=int(ids.shape[1]) + 64)) as new:
            T.greedy(model, new(), ids, 1)
    finally:
        CompressedLayer.after_attention = real
    return got


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 (default) or gemma3")
    ap.add_argument("--bits", type=int, choices=(2, 4, 8), default=2)
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--offset", type=int, default=20000, help="first character of the prompt in --text")
    ap.add_argument("--text", default=DEFAULT_TEXT)
    args = ap.parse_args(argv)
    model, tok = load_model(args.model)
    text = Path(args.text).read_text()[args.offset:]
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
    G, bits = args.group, args.bits

    def packed(x):
        codes, mins, scales = ops.pack_keys(x.contiguous(), bits, G)
        return ops.unpack_keys(codes, mins, scales, bits, G)

    print(f"{args.model}, {ids.shape[1]} tokens, {bits}-bit keys in groups of {G}; last 64 queries per layer")
    print("layer kind   logit MSE: plain   rotated  ratio   attention KL: plain  rotated  ratio")
    for idx, (q, k, _, window, scaling) in sorted(_capture(model, ids).items()):
        B, Hq, _, D = q.shape
        H = k.shape[1]
        m = k.shape[2] // G * G
        kk = k[:, :, :m].float()
        rot = key_rotation(D, "cpu")
        err_plain = packed(kk) - kk
        err_rot = packed(kk @ rot) @ rot.T - kk
        qq = q[:, :, -64:].float().reshape(B, H, Hq // H * 64, D)
        mse = [float((qq @ e.transpose(-1, -2)).pow(2).mean()) for e in (err_plain, err_rot)]

        def kl(err):
            exact = (qq @ kk.transpose(-1, -2)) * scaling
            approx = exact + (qq @ err.transpose(-1, -2)) * scaling
            if window is not None:
                exact, approx = exact[..., -window:], approx[..., -window:]
            p, pa = torch.log_softmax(exact.double(), -1), torch.log_softmax(approx.double(), -1)
            return float((p.exp() * (p - pa)).sum(-1).mean())

        kls = [kl(err_plain), kl(err_rot)]
        kind = "slide" if window is not None else "full "
        print(f"{idx:5d} {kind}  {mse[0]:16.4f} {mse[1]:9.4f} {mse[1] / mse[0]:6.2f}   "
              f"{kls[0]:19.4f} {kls[1]:8.4f} {kls[1] / kls[0]:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
