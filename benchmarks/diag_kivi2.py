"""Where KIVI-2's perplexity loss comes from: a fake-quantized simulation.

The packed store is patched so that attention runs over a dequantized copy
built from the original full-precision rows, which lets single factors be
switched off: ``--sinks S`` keeps the first S tokens of every head out of
quantization (full precision; the key groups then start at token S),
``--quantize keys|values|both`` picks which half is quantized, and
``--key-bits`` / ``--value-bits`` give the halves different widths. Two
key quantizers other than KIVI's min/max (same codes per element): ``--clip``
takes each (group, channel)'s range with the least squared error among
ranges shrunk from min/max by up to 40% at either end; ``--outliers K`` keeps
the K elements of each (group, channel) farthest from its median exact and
takes the range over the rest (KVQuant's dense-and-sparse split);
``--pre-rope THETA`` quantizes the keys before rotary embedding (KVQuant's
pre-RoPE keys): each row is rotated back by its position with base THETA
(the default RoPE of Llama-style models, rotate-half layout; KIVI evicts
nothing, so a row's index is its position), quantized, then rotated again. With
``--sinks 0 --quantize both`` this reproduces ``kivi:bits=...`` of
``kvcompress eval`` exactly (the check that the simulation is faithful).
A diagnostic, not a method: the real kernel never dequantizes.

    python benchmarks/diag_kivi2.py --sinks 0 --quantize both -- \\
        eval --tasks ppl --ppl-windows 8 --methods kivi:bits=2 --threads 1 --no-progress --out DIR

Everything after ``--`` is the ``kvcompress`` command line.
"""

from __future__ import annotations

import argparse
import sys

import torch

from kvcompress import ops
from kvcompress.cli import main as kvcompress_main
from kvcompress.stores import packed as P
from kvcompress.stores.masked import build_mask, masked_attention


def _groups(k, G):
    """The whole key groups of k [B, H, n, D] as float64 [B, H, n // G, G, D]."""
    B, H, n, D = k.shape
    m = n // G * G
    return k[:, :, :m].reshape(B, H, m // G, G, D).double()


def _with_tail(k, groups, bits, G):
    """k [B, H, n, D] with its whole groups replaced by `groups` [B, H, n // G,
    G, D] and a short last group quantized by KIVI's min/max (ops)."""
    B, H, n, D = k.shape
    m = n // G * G
    out = k.clone()
    out[:, :, :m] = groups.reshape(B, H, m, D).to(k.dtype)
    if m < n:
        kc, kmin, ksc = ops.pack_keys(k[:, :, m:].contiguous(), bits, G)
        out[:, :, m:] = ops.unpack_keys(kc, kmin, ksc, bits, G, dtype=k.dtype)
    return out


def _minmax(x, lo, hi, bits):
    """x fake-quantized to 2^bits levels spanning [lo, hi] (codes clamped)."""
    L = (1 << bits) - 1
    sc = ((hi - lo) / L).clamp(min=1e-30)
    return lo + sc * ((x - lo) / sc).round().clamp(0, L)


def _clipped_keys(k, bits, G, steps=8, most=0.4):
    """Fake-quantized keys [B, H, n, D] per channel in groups of G tokens with
    each group's range [lo, hi] chosen to minimise the squared error among
    lo = min + a * range, hi = max - b * range, a, b in {0, most/steps, ...}."""
    x = _groups(k, G)
    mn, mx = x.amin(3, keepdim=True), x.amax(3, keepdim=True)
    rng = mx - mn
    best, err = None, None
    for a in range(steps + 1):
        for b in range(steps + 1 - a):
            y = _minmax(x, mn + rng * (most * a / steps), mx - rng * (most * b / steps), bits)
            e = ((y - x) ** 2).sum(3, keepdim=True)
            if best is None:
                best, err = y, e
            else:
                take = e < err
                best, err = torch.where(take, y, best), torch.where(take, e, err)
    return _with_tail(k, best, bits, G)


def _sparse_keys(k, bits, G, keep):
    """Fake-quantized keys [B, H, n, D] per channel in groups of G tokens with
    the `keep` elements of each (group, channel) farthest from the group's
    median kept exact and the range taken over the rest (dense and sparse)."""
    x = _groups(k, G)
    dev = (x - x.median(3, keepdim=True).values).abs()
    idx = dev.topk(keep, dim=3).indices
    out_mask = torch.zeros_like(x, dtype=torch.bool).scatter_(3, idx, True)
    inner_lo = torch.where(out_mask, torch.full_like(x, float("inf")), x).amin(3, keepdim=True)
    inner_hi = torch.where(out_mask, torch.full_like(x, float("-inf")), x).amax(3, keepdim=True)
    y = _minmax(x, inner_lo, inner_hi, bits)
    return _with_tail(k, torch.where(out_mask, x, y), bits, G)


def _rotate(k, first, theta, sign):
    """k [B, H, n, D] rotated by ``sign`` times the RoPE angles of positions
    first .. first + n - 1 (base ``theta``, rotate-half layout), in float64."""
    n, D = int(k.shape[2]), int(k.shape[3])
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(first, first + n, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], 1), sign * torch.cat([ang.sin(), ang.sin()], 1)
    x = k.double()
    half = torch.cat([-x[..., D // 2:], x[..., : D // 2]], -1)
    return (x * cos + half * sin).to(k.dtype)


def _fake(k, v, kbits, vbits, G, which, clip=False, outliers=0, pre_rope=None, first=0):
    """Dequantized copies of k, v [B, H, n, D] (only `which` quantized; keys
    by `_clipped_keys` or `_sparse_keys` when asked, else KIVI's min/max;
    with ``pre_rope`` (a RoPE base) the keys, whose first row sits at position
    ``first``, are quantized before rotary embedding)."""
    if pre_rope is not None and which in ("keys", "both"):
        kq, _ = _fake(_rotate(k, first, pre_rope, -1.0), v, kbits, vbits, G, "keys", clip, outliers)
        k = _rotate(kq, first, pre_rope, 1.0)
        which = "values" if which == "both" else "none"
    if which in ("keys", "both") and (clip or outliers):
        k = _sparse_keys(k, kbits, G, outliers) if outliers else _clipped_keys(k, kbits, G)
        which = "values" if which == "both" else "none"
    if which in ("keys", "both"):
        kc, kmin, ksc = ops.pack_keys(k, kbits, G)
        k = ops.unpack_keys(kc, kmin, ksc, kbits, G, dtype=k.dtype)
    if which in ("values", "both"):
        vc, vmin, vsc = ops.pack_values(v, vbits, G)
        v = ops.unpack_values(vc, vmin, vsc, vbits, G, head_dim=int(v.shape[3]), dtype=v.dtype)
    return k, v


def patch(sinks: int, which: str, key_bits: int | None, value_bits: int | None, clip: bool = False,
          outliers: int = 0, pre_rope: float | None = None) -> None:
    pack_oldest = P.PackedStore._pack_oldest

    def keep_originals(self, m):
        ok, ov = self._rk[:, :, :m].clone(), self._rv[:, :, :m].clone()
        prev = getattr(self, "_orig", None)
        self._orig = (ok, ov) if prev is None else (torch.cat([prev[0], ok], 2), torch.cat([prev[1], ov], 2))
        pack_oldest(self, m)

    def attend(self, query, spec, kv_start=None, query_pos=None):
        rk, rv = self._rk[:, :, : self.r], self._rv[:, :, : self.r]
        keys, values = rk, rv
        if self.n_packed:
            ok, ov = self._orig
            s = min(sinks, int(ok.shape[2]))
            qk, qv = _fake(ok[:, :, s:].contiguous(), ov[:, :, s:].contiguous(), key_bits or self.bits,
                           value_bits or self.bits, self.group, which, clip, outliers, pre_rope, s)
            keys = torch.cat([ok[:, :, :s], qk, rk], 2)
            values = torch.cat([ov[:, :, :s], qv, rv], 2)
        mask = build_mask(int(query.shape[0]), int(query.shape[2]), int(keys.shape[2]), query.device,
                          kv_start=kv_start, window=spec.window, key_pos=None, query_pos=query_pos)
        return masked_attention(query, keys, values, spec, mask)

    P.PackedStore._pack_oldest = keep_originals
    P.PackedStore.attend = attend


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sinks", type=int, default=0, help="first tokens kept in full precision (default 0)")
    ap.add_argument("--quantize", choices=("keys", "values", "both"), default="both")
    ap.add_argument("--key-bits", type=int, choices=(2, 4, 8), help="key width (default: the method's bits)")
    ap.add_argument("--value-bits", type=int, choices=(2, 4, 8), help="value width (default: the method's bits)")
    ap.add_argument("--clip", action="store_true", help="keys: each group's range chosen for least squared error")
    ap.add_argument("--outliers", type=int, default=0,
                    help="keys: elements per (group, channel) farthest from its median kept exact")
    ap.add_argument("--pre-rope", type=float, metavar="THETA",
                    help="keys: quantized before rotary embedding with base THETA (SmolLM2: 100000)")
    args = ap.parse_args(argv[:cut])
    patch(args.sinks, args.quantize, args.key_bits, args.value_bits, args.clip, args.outliers, args.pre_rope)
    return kvcompress_main(argv[cut + 1:])


if __name__ == "__main__":
    sys.exit(main())
