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
``--levels A,B`` (2 bits) places the four levels of each (group, channel) at
min + {0, A, B, 1} x range instead of KIVI's thirds (a fixed non-uniform grid, as
KVQuant's non-uniform datatype is one per layer); ``--lloyd`` fits the two inner
levels of every (group, channel) to its own elements (Lloyd's iterations with
the ends at min and max: a bound on any non-uniform grid, at two more floats per
group and channel); with ``--outliers K`` both fit the levels to the rest;
``--pre-rope THETA`` quantizes the keys before rotary embedding (KVQuant's
pre-RoPE keys): each row is rotated back by its position with base THETA
(the default RoPE of Llama-style models, rotate-half layout; KIVI evicts
nothing, so a row's index is its position), quantized, then rotated again; ``--rotate`` quantizes the keys after a
Hadamard rotation of their channels (QuaRot's; ``KIVI(rotate=True)`` does this
for real), ``--rotate-values`` quantizes the values after the same rotation
(QuaRot rotates values too; attention's output is then rotated back, which is
exact: softmax weights are a linear combination), ``--clip-values`` takes each value group's range as
``--clip`` does for keys, and ``--key-layout token`` packs keys per token in groups of
channels, as values are. With
``--sinks 0 --quantize both`` this reproduces ``kivi:bits=...`` of
``kvcompress eval`` exactly (the check that the simulation is faithful).
A diagnostic, not a method: the real kernel never dequantizes.

Sliding-window layers are read by the real kernel, at the method's own bits
and group, with none of the switches above: on Gemma 3 (15 of 18 layers
slide) ``--quantize values`` still packs the sliding layers' keys, and
``--value-bits``, ``--rotate-values`` or ``--clip-values`` change only the 3
global layers' values, so a Gemma 3 breakdown by half needs real methods
(``kivi:bits=8:value_bits=2``) instead. ``--sliding-full`` leaves the
sliding layers unpacked, in full precision, so that only the global layers
are quantized: by the method's real kernels (its own ``rotate``,
``sinks`` and ``feedback``) when no switch above is given, else by the
simulation with those switches.

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
from kvcompress.stores.rotation import _hadamard as sylvester_hadamard


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


def _clipped(x, dim, bits, steps=8, most=0.4):
    """x fake-quantized in groups along ``dim``, each group's range [lo, hi]
    chosen to minimise the squared error among lo = min + a * range,
    hi = max - b * range, a, b in {0, most/steps, ...}, a + b <= most."""
    mn, mx = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    rng = mx - mn
    best, err = None, None
    for a in range(steps + 1):
        for b in range(steps + 1 - a):
            y = _minmax(x, mn + rng * (most * a / steps), mx - rng * (most * b / steps), bits)
            e = ((y - x) ** 2).sum(dim, keepdim=True)
            if best is None:
                best, err = y, e
            else:
                take = e < err
                best, err = torch.where(take, y, best), torch.where(take, e, err)
    return best


def _clipped_keys(k, bits, G):
    """Fake-quantized keys [B, H, n, D] per channel in groups of G tokens,
    each group's range chosen by `_clipped`."""
    return _with_tail(k, _clipped(_groups(k, G), 3, bits), bits, G)


def _clipped_values(v, bits, G):
    """Fake-quantized values [B, H, n, D] per token in groups of G channels
    (D a multiple of G), each group's range chosen by `_clipped`."""
    B, H, n, D = v.shape
    return _clipped(v.reshape(B, H, n, D // G, G).double(), 4, bits).reshape(B, H, n, D).to(v.dtype)


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


def _nearest(x, lv):
    """Each element of x [..., G, 1] replaced by the nearest of lv [..., 1, L]."""
    return torch.gather(lv.expand(*x.shape[:-1], lv.shape[-1]), -1, (x - lv).abs().argmin(-1, keepdim=True))


def _level_keys(k, bits, G, levels=None, iters=20, keep=0):
    """Fake-quantized 2-bit keys [B, H, n, D] per channel in groups of G
    tokens on four levels min + {0, A, B, 1} x range (``levels = (A, B)``), or
    with the inner two fitted per (group, channel) by Lloyd's iterations
    (``levels = None``), the ends at min and max either way. With ``keep``,
    the `keep` elements of each (group, channel) farthest from its median
    stay exact and the levels are fitted to the rest (as `_sparse_keys`)."""
    if bits != 2:
        raise ValueError(f"bits: non-uniform levels are simulated at 2 bits only, got {bits}")
    x = _groups(k, G).transpose(3, 4).unsqueeze(-1)  # [B, H, t, D, G, 1]
    out = torch.zeros_like(x, dtype=torch.bool)
    if keep:
        dev = (x - x.median(4, keepdim=True).values).abs()
        out.scatter_(4, dev.topk(keep, dim=4).indices, True)
    inner = ~out
    mn = torch.where(out, torch.full_like(x, float("inf")), x).amin(4, keepdim=True)
    mx = torch.where(out, torch.full_like(x, float("-inf")), x).amax(4, keepdim=True)
    rng = mx - mn
    a, b = levels if levels is not None else (1 / 3, 2 / 3)
    lv = torch.cat([mn, mn + a * rng, mn + b * rng, mx], -1)  # [B, H, t, D, 1, 4]
    if levels is None:
        for _ in range(iters):
            near = (x - lv).abs().argmin(-1, keepdim=True)  # [..., G, 1]
            for i in (1, 2):
                hit = ((near == i) & inner).double()
                cnt = hit.sum(4, keepdim=True)
                mean = (hit * x).sum(4, keepdim=True) / cnt.clamp(min=1)
                lv[..., i : i + 1] = torch.where(cnt > 0, mean, lv[..., i : i + 1])
            lv = lv.sort(-1).values
    y = torch.where(out, x, _nearest(x, lv)).squeeze(-1).transpose(3, 4)
    return _with_tail(k, y, bits, G)


def _gptq_keys(k, bits, G, hess, damp=0.01, order=False):
    """Fake-quantized keys [B, H, n, D] per channel in groups of G tokens,
    channel after channel, each channel's rounding error spread over the
    channels not yet quantized so that the logit error q . (k - k^) is least
    for queries of second moment ``hess`` [B, H, D, D] (GPTQ's update with
    queries as the inputs; SQuat's query-aware key quantization)."""
    x = _groups(k, G).clone()  # [B, H, t, G, D]
    D = int(x.shape[-1])
    Hm = hess.double().clone()
    dg = torch.diagonal(Hm, dim1=-2, dim2=-1)
    perm = None
    if order:
        perm = dg.argsort(-1, descending=True)  # [B, H, D]
        Hm = torch.gather(torch.gather(Hm, -1, perm[..., None, :].expand_as(Hm)), -2,
                          perm[..., :, None].expand_as(Hm))
        x = torch.gather(x, -1, perm[:, :, None, None, :].expand_as(x))
        dg = torch.diagonal(Hm, dim1=-2, dim2=-1)
    Hm = Hm + damp * dg.mean(-1)[..., None, None] * torch.eye(D, dtype=Hm.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hm)), upper=True)  # [B, H, D, D]
    for c in range(D):
        col = x[..., c]  # [B, H, t, G]
        lo, hi = col.amin(-1, keepdim=True), col.amax(-1, keepdim=True)
        q = _minmax(col, lo, hi, bits)
        err = (col - q) / U[:, :, None, None, c, c]
        x[..., c] = q
        if c + 1 < D:
            x[..., c + 1:] -= err[..., None] * U[:, :, None, None, c, c + 1:]
    if perm is not None:
        inv = perm.argsort(-1)
        x = torch.gather(x, -1, inv[:, :, None, None, :].expand_as(x))
    return _with_tail(k, x, bits, G)


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


def _hadamard(D):
    """The orthonormal Hadamard matrix of order D, float64 (the package's
    ``KIVI(rotate=True)`` matrix; this simulation takes powers of two only)."""
    if D < 1 or D & (D - 1):
        raise ValueError(f"--rotate: the head size must be a power of two, got {D}")
    return sylvester_hadamard(D)


CLIP_VALUES = False  # --clip-values
CLIP_VALUE_LAYERS = None  # --clip-value-layers: the layers --clip-values acts on (None: all)


def _fake(k, v, kbits, vbits, G, which, clip=False, outliers=0, pre_rope=None, first=0, levels=False,
          rotate=False, key_layout="channel", rotate_values=False, hess=None, order=False, clip_values=None):
    """Dequantized copies of k, v [B, H, n, D] (only `which` quantized; keys
    by `_clipped_keys` or `_sparse_keys` when asked, else KIVI's min/max;
    with ``pre_rope`` (a RoPE base) the keys, whose first row sits at position
    ``first``, are quantized before rotary embedding; ``levels``: False for
    KIVI's even levels, a pair (A, B) or None for `_level_keys`; ``rotate``:
    the keys are quantized after a Hadamard rotation of their channels and
    rotated back, as q . k = (H q) . (H k); ``key_layout="token"``: keys
    quantized per token in groups of G channels, as values are);
    ``rotate_values``: the values quantized after a Hadamard rotation of
    their channels and rotated back); ``clip_values``: the value groups'
    ranges clipped (None: ``--clip-values``)."""
    clip_values = CLIP_VALUES if clip_values is None else clip_values
    if rotate_values and which in ("values", "both"):
        h = _hadamard(int(v.shape[3]))
        _, vq = _fake(k, (v.double() @ h).to(v.dtype), kbits, vbits, G, "values")
        v = (vq.double() @ h.T).to(v.dtype)
        which = "keys" if which == "both" else "none"
    if pre_rope is not None and which in ("keys", "both"):
        kq, _ = _fake(_rotate(k, first, pre_rope, -1.0), v, kbits, vbits, G, "keys", clip, outliers,
                      levels=levels, rotate=rotate, key_layout=key_layout)
        k = _rotate(kq, first, pre_rope, 1.0)
        which = "values" if which == "both" else "none"
    if rotate and which in ("keys", "both"):
        h = _hadamard(int(k.shape[3]))
        hr = None if hess is None else h.T @ hess.double() @ h
        kq, _ = _fake((k.double() @ h).to(k.dtype), v, kbits, vbits, G, "keys", clip, outliers, None,
                      first, levels, False, key_layout, hess=hr, order=order)
        k = (kq.double() @ h.T).to(k.dtype)
        which = "values" if which == "both" else "none"
    if key_layout == "token" and which in ("keys", "both"):
        kc, kmin, ksc = ops.pack_values(k.contiguous(), kbits, G)
        k = ops.unpack_values(kc, kmin, ksc, kbits, G, head_dim=int(k.shape[3]), dtype=k.dtype)
        which = "values" if which == "both" else "none"
    if which in ("keys", "both") and levels is not False:
        k = _level_keys(k, kbits, G, levels, keep=outliers)
        which = "values" if which == "both" else "none"
    if which in ("keys", "both") and (clip or outliers):
        k = _sparse_keys(k, kbits, G, outliers) if outliers else _clipped_keys(k, kbits, G)
        which = "values" if which == "both" else "none"
    if which in ("keys", "both") and hess is not None:
        k = _gptq_keys(k, kbits, G, hess, order=order)
        which = "values" if which == "both" else "none"
    if which in ("keys", "both"):
        kc, kmin, ksc = ops.pack_keys(k, kbits, G)
        k = ops.unpack_keys(kc, kmin, ksc, kbits, G, dtype=k.dtype)
    if which in ("values", "both") and clip_values:
        v = _clipped_values(v, vbits, G)
    elif which in ("values", "both"):
        vc, vmin, vsc = ops.pack_values(v, vbits, G)
        v = ops.unpack_values(vc, vmin, vsc, vbits, G, head_dim=int(v.shape[3]), dtype=v.dtype)
    return k, v


def patch(sinks: int, which: str, key_bits: int | None, value_bits: int | None, clip: bool = False,
          outliers: int = 0, pre_rope: float | None = None, levels=False, rotate: bool = False,
          key_layout: str = "channel", rotate_values: bool = False, gptq: bool = False, order: bool = False) -> None:
    pack_oldest, real_attend = P.PackedStore._pack_oldest, P.PackedStore.attend

    def keep_originals(self, m):
        ok, ov = self._rk[:, :, :m].clone(), self._rv[:, :, :m].clone()
        prev = getattr(self, "_orig", None)
        self._orig = (ok, ov) if prev is None else (torch.cat([prev[0], ok], 2), torch.cat([prev[1], ov], 2))
        pack_oldest(self, m)

    def attend(self, query, spec, kv_start=None, query_pos=None):
        if spec.window is not None:
            # a sliding layer (Gemma 2/3, Mistral) drops the groups its window
            # has passed: it is read by the real kernel, with no factor off
            return real_attend(self, query, spec, kv_start, query_pos)
        rk, rv = self._rk[:, :, : self.r], self._rv[:, :, : self.r]
        keys, values = rk, rv
        if self.n_packed:
            ok, ov = self._orig
            s = min(sinks, int(ok.shape[2]))
            qk, qv = _fake(ok[:, :, s:].contiguous(), ov[:, :, s:].contiguous(), key_bits or self.bits,
                           value_bits or self.bits, self.group, which, clip, outliers, pre_rope, s, levels,
                           rotate, key_layout, rotate_values, getattr(self, "_hess", None) if gptq else None,
                           order, CLIP_VALUES and (CLIP_VALUE_LAYERS is None
                                                   or getattr(self, "_layer_idx", None) in CLIP_VALUE_LAYERS))
            keys = torch.cat([ok[:, :, :s], qk, rk], 2)
            values = torch.cat([ov[:, :, :s], qv, rv], 2)
        mask = build_mask(int(query.shape[0]), int(query.shape[2]), int(keys.shape[2]), query.device,
                          kv_start=kv_start, window=spec.window, key_pos=None, query_pos=query_pos)
        return masked_attention(query, keys, values, spec, mask)

    from kvcompress import cache as C
    settle = C.CompressedLayer._settle

    def settle_and_hold(self, queries, scaling):
        store = self.store
        store._layer_idx = self.layer_idx
        if gptq and queries is not None and not hasattr(store, "_hess"):
            # the prompt's queries (the call that packs first): never those read after it
            B, Hq, n, D = queries.shape
            qg = queries.double().reshape(B, store.heads, Hq // store.heads, n, D).reshape(B, store.heads, -1, D)
            store._hess = qg.transpose(2, 3) @ qg / qg.shape[2]
            if not getattr(P, "_said", 0):
                print("hess from", tuple(queries.shape), file=sys.stderr)
                P._said = 1
        settle(self, queries, scaling)

    C.CompressedLayer._settle = settle_and_hold
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
    ap.add_argument("--levels", metavar="A,B",
                    help="keys at 2 bits: levels at min + {0, A, B, 1} x range (KIVI: 1/3, 2/3)")
    ap.add_argument("--lloyd", action="store_true",
                    help="keys at 2 bits: the two inner levels fitted per (group, channel)")
    ap.add_argument("--rotate", action="store_true",
                    help="keys: quantized after a Hadamard rotation of their channels (QuaRot's rotation)")
    ap.add_argument("--sliding-full", action="store_true",
                    help="sliding-window layers kept unpacked, in full precision (only the global layers packed)")
    ap.add_argument("--clip-values", action="store_true",
                    help="values: each group's range chosen for least squared error (as --clip for keys)")
    ap.add_argument("--clip-value-layers", metavar="I,J,...",
                    help="--clip-values on these layers only (default: every layer)")
    ap.add_argument("--rotate-values", action="store_true",
                    help="values: quantized after a Hadamard rotation of their channels")
    ap.add_argument("--key-layout", choices=("channel", "token"), default="channel",
                    help="keys per channel in groups of G tokens (KIVI) or per token in groups of G channels")
    ap.add_argument("--feedback", action="store_true",
                    help="keys: error feedback across channels weighted by the prompt's queries (GPTQ's update)")
    ap.add_argument("--feedback-order", action="store_true",
                    help="--feedback: channels in order of falling query energy (GPTQ's act-order)")
    args = ap.parse_args(argv[:cut])
    global CLIP_VALUES, CLIP_VALUE_LAYERS
    CLIP_VALUES = args.clip_values
    if args.clip_value_layers is not None:
        if not args.clip_values:
            ap.error("--clip-value-layers: needs --clip-values")
        try:
            CLIP_VALUE_LAYERS = {int(x) for x in args.clip_value_layers.split(",") if x.strip()}
        except ValueError:
            ap.error(f"--clip-value-layers: expected layer numbers like 3,4,5, got {args.clip_value_layers!r}")
    if args.sliding_full:
        from kvcompress import cache as C

        C.CompressedLayer._packs_window = lambda self: False  # the unpacked layer's own path: full precision
        switches = [a for a in ("sinks", "key_bits", "value_bits", "clip", "outliers", "pre_rope", "levels", "lloyd",
                                "rotate", "rotate_values", "clip_values", "feedback", "feedback_order")
                    if getattr(args, a) not in (None, False, 0)]
        if not switches and args.quantize == "both" and args.key_layout == "channel":
            # no switch: the method's real kernels (its own rotate, sinks
            # and feedback) on the global layers
            return kvcompress_main(argv[cut + 1:])
    levels = False
    if args.levels is not None:
        try:
            levels = tuple(float(x) for x in args.levels.split(","))
        except ValueError:
            levels = ()
        if len(levels) != 2 or not 0.0 < levels[0] < levels[1] < 1.0:
            ap.error(f"--levels: expected A,B with 0 < A < B < 1, got {args.levels!r}")
    if args.lloyd:
        if levels is not False:
            ap.error("--lloyd: not with --levels")
        levels = None
    if levels is not False and args.clip:
        ap.error("--levels / --lloyd: not with --clip")
    if (args.rotate or args.key_layout == "token") and (args.clip or args.outliers or levels is not False):
        ap.error("--rotate / --key-layout token: not with --clip, --outliers, --levels or --lloyd")
    patch(args.sinks, args.quantize, args.key_bits, args.value_bits, args.clip, args.outliers, args.pre_rope,
          levels, args.rotate, args.key_layout, args.rotate_values, args.feedback, args.feedback_order)
    return kvcompress_main(argv[cut + 1:])


if __name__ == "__main__":
    sys.exit(main())
