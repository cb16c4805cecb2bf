"""Per layer: does clipping the value groups' ranges lower the attention
output's error for the newest queries?

Runs one prompt (``--tokens`` tokens of the packaged text from character
``--offset``) through the model and, on every full-attention layer, packs the
prompt's values at 2 bits after ``--sinks`` exact tokens (whole groups of 32
channels per token) two ways: KIVI's min/max, and each group's range clipped
for least squared error (``diag_kivi2.py --clip-values``). Keys stay exact.
For the last 32 queries it prints the mean squared error of the attention
output against the exact one, relative to the output's mean square, both
ways, and which is lower: the measure a per-layer choice like
``rotate="auto"`` would use. With ``--weighted`` the error is taken after
the layer's output projection ``o_proj`` (what reaches the residual stream,
``KIVI(clip_values="auto")``'s measure, ``stores.value_clip``), and
``--sliding`` adds the sliding-window layers (each query over its window).
A diagnostic (the real kernel never dequantizes)::

    python benchmarks/diag_value_clip_layers.py --model gemma3 [--weighted] [--sliding]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import kvcompress as kvc
from kvcompress import ops
from kvcompress.model import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diag_kivi2 import _clipped_values  # noqa: E402  (same folder)
from diag_rotation_layers import _capture  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 (default) or gemma3")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--offset", type=int, default=20000, help="first character of the prompt in the text")
    ap.add_argument("--sinks", type=int, default=4, help="first tokens left exact (default 4)")
    ap.add_argument("--weighted", action="store_true", help="the error after the layer's o_proj")
    ap.add_argument("--sliding", action="store_true", help="sliding-window layers too")
    args = ap.parse_args(argv)
    model, tok = load_model(args.model)
    text = (Path(kvc.__file__).resolve().parent / "data" / "shakespeare.txt").read_text()[args.offset:]
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
    G, bits, S = 32, 2, args.sinks
    total = [0.0, 0.0]
    layers = model.model.layers
    where = "after o_proj" if args.weighted else "of the attention output"
    print(f"{args.model}, {ids.shape[1]} tokens, 2-bit values after {S} sinks, last 32 queries per layer, error {where}")
    for idx, (q, k, v, window, scaling) in sorted(_capture(model, ids).items()):
        if window is not None and not args.sliding:
            continue  # sliding layers: see diag_kivi2.py --sliding-full
        n, D = int(q.shape[2]), int(q.shape[3])
        rep = q.shape[1] // k.shape[1]
        m = (n - S) // G * G
        part = v[:, :, S : S + m].contiguous()
        plain, clipped = v.clone(), v.clone()
        plain[:, :, S : S + m] = ops.unpack_values(*ops.pack_values(part, bits, G), bits, G, head_dim=D,
                                                   dtype=v.dtype)
        clipped[:, :, S : S + m] = _clipped_values(part, bits, G)
        logits = q[:, :, -32:].double() @ k.double().repeat_interleave(rep, 1).transpose(-1, -2) * scaling
        pos, qpos = torch.arange(n)[None, :], torch.arange(n - 32, n)[:, None]
        hidden = pos > qpos
        if window is not None:
            hidden |= pos <= qpos - window
        p = logits.masked_fill(hidden, float("-inf")).softmax(-1)
        w = layers[idx].self_attn.o_proj.weight.double() if args.weighted else None

        def out(vals):
            o = p @ vals.double().repeat_interleave(rep, 1)  # [1, Hq, 32, D]
            return o if w is None else o.transpose(1, 2).reshape(1, 32, -1) @ w.T

        exact = out(v)
        ref = exact.pow(2).mean().item()
        errs = [(out(x) - exact).pow(2).mean().item() / ref for x in (plain, clipped)]
        total = [t + e for t, e in zip(total, errs)]
        print(f"layer {idx:2d}{' (sliding)' if window is not None else ''}  min/max {errs[0]:.3e}  clipped {errs[1]:.3e}  ratio {errs[1] / errs[0]:.2f}  "
              f"lower: {'clipped' if errs[1] < errs[0] else 'min/max'}")
    print(f"summed relative error: min/max {total[0]:.3e}, clipped {total[1]:.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
