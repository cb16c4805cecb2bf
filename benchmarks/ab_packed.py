"""Paired A/B of the packed decode attention of two builds, in one process.

Whole-run timings on a shared cloud machine drift by up to 2x between runs
(``bench_packed`` runs of the same build differ that much), so comparing a
kernel change by two runs is not reliable. This script loads two builds of
``kvcompress._C`` side by side (``ExtensionFileLoader``: each file is its own
module), points ``kvcompress.ops`` at one or the other call by call, and
times them alternately, with ``ops.attention`` in bfloat16 (code both builds
share) timed beside each call as a control: its two medians should agree.

One decode step (q = 1, B = 1, ``--threads`` threads, default 1) of
``ops.packed_attention`` (group 32, the last 128 slots in fp32) at SmolLM2's
attention shape (9 / 3 heads, D = 64) and a Llama-3-8B-like one (32 / 8,
D = 128) by default, or those of ``--shapes``, ``--lengths`` slots (default
4K and 16K); both builds' outputs are checked to agree within 1e-6 first. With ``--stream`` each call reads the
next of many copies of the packed layer (``_common.stream_copies``: twice
the last-level cache between two reads of one copy), so its bytes come from
memory as in a decode step over a whole model, not from the cache a
repeated call leaves warm (``bench_packed``'s "streamed" table). The thread count is set on each build
(every extension module keeps its own; before 2026-12-03 this script set it
on the package's build only, so the two builds ran on every core).

    python benchmarks/ab_packed.py BEFORE/kvcompress/_C*.so AFTER/kvcompress/_C*.so [--reps 30] [--threads 1]
    python benchmarks/ab_packed.py kvcompress/_C*.so --amx    # one build: AMX path off (A), on (B)
    python benchmarks/ab_packed.py kvcompress/_C*.so --rows --shapes llama2   # few-rows path off (A), on (B)
    python benchmarks/ab_packed.py A.so B.so --stream         # the layers read from memory
    python benchmarks/ab_packed.py A.so B.so --no-amx         # both builds' vector units

With ``--amx`` one build runs as both: A with its AMX path forbidden
(``_C._set_amx(False)``, the vector units), B with it allowed (on a CPU
without AMX the two are the same code). ``--rows`` does the same with the
few-rows path (``_C._set_rows``; it runs where a kv head has at most four
query rows: every shape here, ``llama2`` (32 / 32 heads, D = 128,
Llama-2-7B's) with one, ``gemma3`` (4 / 1, D = 256, Gemma 3 270M's) with four).
``--no-amx`` and ``--no-rows`` forbid a path in both builds.

Prints one line per case: medians of A and B, A/B, the median of the
per-rep ratios, and the control.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import statistics
import time
import types

import torch

from kvcompress import ops

from _common import PACKED_SHAPES, last_level_cache_bytes, stream_copies  # noqa: E402

SHAPES = PACKED_SHAPES  # _common.py says what each is
SWITCHES = {"amx": "_set_amx", "rows": "_set_rows"}
WIDTHS = ((2, 2), (4, 4), (8, 8), (4, 2))
GROUP, RESIDUAL = 32, 128


def load(path: str):
    """The extension module in ``path``, as its own module object (a build
    from before ``residual_hidden``, 2026-12-06, behind :func:`_before_hidden`)."""
    loader = importlib.machinery.ExtensionFileLoader("kvcompress._C", path)
    spec = importlib.util.spec_from_file_location("kvcompress._C", path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    fn = module.packed_attention
    if "residual_hidden" not in (getattr(fn, "__text_signature__", None) or fn.__doc__ or ""):
        return _before_hidden(module)
    return module


def _before_hidden(module):
    """An older build as ``ops`` calls it today: its ``packed_attention``
    takes one argument fewer (the trailing ``residual_hidden``, None in
    these timings). The extra Python call weighs on that build's side."""
    proxy = types.SimpleNamespace(**{k: getattr(module, k) for k in dir(module) if not k.startswith("__")})

    def packed_attention(*args):
        if args[-1] is not None:
            raise RuntimeError("ab_packed: this build takes no residual_hidden")
        return module.packed_attention(*args[:-1])

    proxy.packed_attention = packed_attention
    return proxy


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="the first build's _C extension file")
    ap.add_argument("b", nargs="?", help="the second build's _C extension file (not with --amx or --rows)")
    ap.add_argument("--amx", action="store_true",
                    help="time build a with its AMX path forbidden (A) and allowed (B)")
    ap.add_argument("--rows", action="store_true",
                    help="time build a with its few-rows path forbidden (A) and allowed (B)")
    ap.add_argument("--shapes", default="smollm2,llama8b",
                    help=f"comma-separated attention shapes of {', '.join(SHAPES)} (default %(default)s)")
    ap.add_argument("--reps", type=int, default=30, help="timed calls per build and case")
    ap.add_argument("--threads", type=int, default=1, help="threads of both builds (default 1)")
    ap.add_argument("--lengths", default="4096,16384", help="slots per head, comma-separated")
    ap.add_argument("--widths", default=",".join(f"{k}/{v}" for k, v in WIDTHS),
                    help="key/value code widths, comma-separated (default %(default)s)")
    ap.add_argument("--no-amx", action="store_true",
                    help="forbid both builds' AMX path: compare their vector units")
    ap.add_argument("--no-rows", action="store_true", help="forbid both builds' few-rows path")
    ap.add_argument("--stream", action="store_true",
                    help="cycle through copies of the packed layer so that its bytes come from memory")
    args = ap.parse_args(argv)
    path = [name for name in SWITCHES if getattr(args, name)]
    if len(path) > 1:
        ap.error("--amx and --rows: one path at a time")
    if bool(path) == (args.b is not None):
        ap.error("give two builds, or one build with --amx or --rows")
    for name in path:
        if getattr(args, f"no_{name}"):
            ap.error(f"--no-{name}: not with --{name}, which times that path against the vector units")
    shapes = [x for x in args.shapes.split(",") if x]
    if not shapes or any(x not in SHAPES for x in shapes):
        ap.error(f"--shapes: expected names among {', '.join(SHAPES)}, got {args.shapes!r}")
    try:
        widths = [tuple(int(x) for x in w.split("/")) for w in args.widths.split(",")]
    except ValueError:
        widths = []
    if not widths or any(len(w) != 2 or not set(w) <= {2, 4, 8} for w in widths):
        ap.error(f"--widths: expected key/value widths of 2, 4 or 8 like 4/4,8/2, got {args.widths!r}")
    if path:
        one = load(args.a)
        builds = (one, one)
        switch = getattr(one, SWITCHES[path[0]])
        prev_path = switch(True)

        def use(i):
            ops._C = builds[i]
            switch(i == 1)
    else:
        builds = (load(args.a), load(args.b))

        def use(i):
            ops._C = builds[i]
    installed = ops._C
    off = [SWITCHES[name] for name in SWITCHES if getattr(args, f"no_{name}")]
    prev = [[getattr(mod, hook)(False) for hook in off] for mod in builds]
    for mod in builds:
        mod.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print("| shape | n | bits (k/v) | A us | B us | A / B | per-rep median | bf16 control A / B us |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for shape in shapes:
        Hq, Hkv, D = SHAPES[shape]
        for n in (int(x) for x in args.lengths.split(",")):
            k, v = torch.randn(1, Hkv, n, D, generator=g), torch.randn(1, Hkv, n, D, generator=g)
            q, m = torch.randn(1, Hq, 1, D, generator=g), n - RESIDUAL
            qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
            for bits, vbits in widths:
                pk, pv = ops.pack_keys(k[:, :, :m], bits, GROUP), ops.pack_values(v[:, :, :m], vbits, GROUP)
                rk, rv = k[:, :, m:].contiguous(), v[:, :, m:].contiguous()
                ring = [(q, *pk, *pv, rk, rv)]
                if args.stream:
                    copies = stream_copies(sum(t.numel() * t.element_size() for t in ring[0]),
                                           last_level_cache_bytes())
                    ring += [tuple(t.clone() for t in ring[0]) for _ in range(copies - 1)]
                at = [0]

                def packed():
                    layer = ring[at[0]]
                    at[0] = (at[0] + 1) % len(ring)
                    return ops.packed_attention(*layer, bits=bits, group=GROUP, value_bits=vbits)

                outs = []
                for i in (0, 1):
                    use(i)
                    outs.append(packed())
                err = (outs[0] - outs[1]).abs().max().item()
                assert err < 1e-6, (shape, n, bits, vbits, err)
                t = {0: [], 1: []}
                control = {0: [], 1: []}
                for r in range(args.reps):
                    for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                        use(i)
                        t0 = time.perf_counter()
                        packed()
                        t[i].append(time.perf_counter() - t0)
                        t0 = time.perf_counter()
                        ops.attention(qb, kb, vb)
                        control[i].append(time.perf_counter() - t0)
                a, b = statistics.median(t[0]) * 1e6, statistics.median(t[1]) * 1e6
                per = statistics.median(x / y for x, y in zip(t[0], t[1]))
                ca, cb = statistics.median(control[0]) * 1e6, statistics.median(control[1]) * 1e6
                print(f"| {shape} | {n} | {bits}/{vbits} | {a:.0f} | {b:.0f} | {a / b:.2f}x | {per:.2f}x | "
                      f"{ca:.0f} / {cb:.0f} |", flush=True)
    ops._C = installed  # back to the package's own build
    if path:
        switch(prev_path)
    for mod, p in zip(builds, prev):
        for hook, was in zip(off, p):
            getattr(mod, hook)(was)


if __name__ == "__main__":
    main()
