"""Seeded random-argument fuzzing of every public function of kvcompress.ops
and every callable of kvcompress._C.

Each call starts from a valid call (built per op; for _C, the exact arguments
ops passes down, recorded through a proxy) and breaks zero, one or two
arguments: wrong types, None, wrong ndim or shape, zero-size dims, negative or
huge ints, NaN/Inf, permuted, stepped, negative and zero (overlapping)
strides, read-only outputs, wrong dtypes, meta-device and sparse tensors,
lying or broken DLPack producers, wrong argument counts. Every call must
return or raise TypeError/ValueError (the KVCompressError classes derive from
them); anything else, a warning, a hang or a dead process is a failure.

The calls run in a child interpreter that logs each call before making it,
so a crash (segfault, sanitizer abort) fails the test with the call that
caused it. Run this file under `make sanitize-test` to catch memory errors
that do not crash.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# calls per child; each child fuzzes all the functions of one module.
# KVCOMPRESS_FUZZ_SEED explores other seeds (the default keeps CI repeatable).
CALLS = 1500
SEED = int(os.environ.get("KVCOMPRESS_FUZZ_SEED", "0"))
TIMEOUT_S = 240


def _child_env():
    """The child must import the very kvcompress the tests run against (an
    in-place build, an editable install or the sanitized copy)."""
    import kvcompress

    root = os.path.dirname(os.path.dirname(os.path.abspath(kvcompress.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


@pytest.mark.parametrize("target", ["ops", "_C"])
def test_fuzz_random_arguments_never_crash(target):
    cmd = [sys.executable, "-X", "faulthandler", os.path.abspath(__file__), target, str(SEED), str(CALLS)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=_child_env())
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        decode = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        out, err, rc = decode(e.stdout), decode(e.stderr), f"timeout after {TIMEOUT_S} s"
    calls = [line for line in out.splitlines() if line.startswith("CALL ")]
    fails = [line for line in out.splitlines() if line.startswith("FAIL ")]
    assert not fails, "\n".join(fails[:20])
    assert rc == 0 and "FUZZ-DONE" in out, (
        f"child ended ({rc}) during: {calls[-1] if calls else '(no call yet)'}\n"
        f"--- stderr (tail) ---\n{err[-6000:]}"
    )


# --------------------------------------------------------------------------- child


def _child(target: str, seed: int, n_calls: int) -> int:
    import inspect
    import random
    import warnings

    import numpy as np
    import torch

    from kvcompress import _C, ops
    from kvcompress.errors import KVCompressError

    rng = random.Random(seed)
    torch.manual_seed(seed)
    _C.set_num_threads(2)
    FLOATS = [torch.float32, torch.float16, torch.bfloat16]
    BAD_DTYPES = [torch.int8, torch.uint8, torch.float64, torch.bool, torch.int32, torch.int64,
                  torch.float16, torch.bfloat16, torch.float32, torch.complex64]
    HUGE = [-(2**63), 2**63, 2**64, 10**400, -(10**400), 2**40, -(2**40), 2**31, -1, 0]
    # probe_positions(T) allocates ~T positions: 2**31 is a slow 16 GB
    # request, not a bug; sizes it cannot represent must still be refused
    HUGE_SIZE = [-(2**63), 2**63, 2**64, 10**400, -(2**40), -1, 0]
    current = {"name": ""}

    # ------------------------------------------------------------- producers

    class Liar:
        """A DLPack producer whose `shape` attribute disagrees with its data."""

        def __init__(self, t, shape):
            self._t, self.shape = t, shape

        def __dlpack__(self, *args, **kwargs):
            return self._t.__dlpack__(*args, **kwargs)

        def __dlpack_device__(self):
            return self._t.__dlpack_device__()

    class BadProducer:
        """__dlpack__ raises, returns a non-capsule or a consumed capsule."""

        def __init__(self, mode):
            self.mode = mode
            self.shape = (1, 1, 1, 1)

        def __dlpack__(self, *args, **kwargs):
            if self.mode == "raise":
                raise RuntimeError("producer failed")
            if self.mode == "int":
                return 3
            cap = torch.zeros(2).__dlpack__()
            np.from_dlpack(type("C", (), {"__dlpack__": lambda s, **k: cap,
                                          "__dlpack_device__": lambda s: (1, 0)})())
            return cap  # renamed to used_dltensor* by NumPy

        def __dlpack_device__(self):
            return (1, 0)

    class BadBool:
        def __bool__(self):
            raise ValueError("no truth value")

    def desc(x):
        if isinstance(x, torch.Tensor):
            try:
                strides = list(x.stride())
            except (RuntimeError, NotImplementedError):
                strides = x.layout
            return f"torch.{str(x.dtype)[6:]}{list(x.shape)}s{strides}@{x.device.type}"
        if isinstance(x, np.ndarray):
            st = [s // x.itemsize for s in x.strides] if x.itemsize else list(x.strides)
            return f"np.{x.dtype}{list(x.shape)}s{st}{'' if x.flags.writeable else 'ro'}"
        if isinstance(x, Liar):
            return f"Liar(shape={x.shape}, {desc(x._t)})"
        if isinstance(x, BadProducer):
            return f"BadProducer({x.mode})"
        r = repr(x)
        return r if len(r) <= 60 else r[:57] + "..."

    # ------------------------------------------------------- valid arguments

    def dim(lo=0):
        return rng.choice([lo, 1, 1, 2, 3, 5] if lo == 0 else [lo, lo, lo + 1, lo + 2, 5])

    def fl(shape, dtype):
        return (torch.randn(shape) * 2).to(dtype)

    def fw(t):
        """Sometimes as NumPy (no bfloat16 there)."""
        if t.dtype != torch.bfloat16 and rng.random() < 0.25:
            return t.numpy()
        return t

    def kv_start(B, T):
        if rng.random() < 0.6:
            return None
        v = [rng.randint(0, T) for _ in range(B)]
        return v if rng.random() < 0.3 else torch.tensor(v, dtype=torch.int64)

    def b_window_scores(gl=False):
        B, Hkv, g, T, D = dim(), dim(), rng.choice([1, 2]), dim(), dim()
        Tq = rng.randint(0, T)
        dt = rng.choice(FLOATS)
        kw = {"scaling": rng.choice([None, 0.5]), "gqa": rng.choice(["mean", "max"]),
              "kv_start": kv_start(B, T)}
        if gl:
            if rng.random() < 0.3 and Tq:
                kw["q_pos"] = sorted(rng.sample(range(T), Tq))
            elif rng.random() < 0.2:
                Tq = T
                kw["probe"] = rng.choice([0.25, 0.5, 1.0])
        return [fw(fl([B, Hkv * g, Tq, D], dt)), fw(fl([B, Hkv, T, D], dt))], kw

    def b_keyformer_scores():
        B, Hkv, g, T, D = dim(), dim(), rng.choice([1, 2]), dim(), dim()
        dt = rng.choice(FLOATS)
        kw = {"tau": rng.choice([1.0, 0.5, 2.0]), "noise": rng.choice([0.0, 1.0]), "seed": rng.choice([0, 7, 2**62]),
              "layer": rng.randint(0, 3), "step": rng.randint(0, 5), "scaling": rng.choice([None, 0.5]),
              "kv_start": kv_start(B, T)}
        return [fw(fl([B, Hkv * g, rng.randint(0, T), D], dt)), fw(fl([B, Hkv, T, D], dt))], kw

    def b_fastgen_recovery():
        B, Hkv, g, T, D = dim(), dim(), rng.choice([1, 2]), dim(), dim()
        dt = rng.choice(FLOATS)
        P = rng.choice([1, 4, 5, 16])
        rung = torch.randint(0, P + 2, (B, Hkv, T), dtype=torch.uint8)
        kw = {"scaling": rng.choice([None, 0.5]), "kv_start": kv_start(B, T)}
        return [fw(fl([B, Hkv * g, rng.randint(0, T), D], dt)), fw(fl([B, Hkv, T, D], dt)), fw(rung), P], kw

    def b_vector_norm():
        return [fw(fl([dim(), dim(), dim(), dim()], rng.choice(FLOATS)))], {"ord": rng.choice([1, 2])}

    def b_pool1d():
        return [fw(fl([dim(), dim(), dim()], torch.float32)), rng.choice([1, 3, 5])], \
            {"mode": rng.choice(["max", "avg"])}

    def b_lagkv_scores():
        B, H, T, D, Dv = dim(), dim(), dim(), dim(2), dim(2)
        dt = rng.choice(FLOATS)
        kw = {"lag": rng.choice([1, 2, 3, 8]), "sinks": rng.choice([0, 1, 4]), "kv_start": kv_start(B, T),
              "per_chunk": rng.random() < 0.5}
        return [fw(fl([B, H, T, D], dt)), fw(fl([B, H, T, Dv], dt))], kw

    def b_actqkv_scores():
        B, Hkv, g, T, D = dim(), dim(), rng.choice([1, 2]), dim(), dim(1)
        dt = rng.choice(FLOATS)
        kw = {"scaling": rng.choice([None, 0.5]), "kv_start": kv_start(B, T), "return_weights": rng.random() < 0.5}
        return [fw(fl([B, Hkv * g, rng.randint(0, T), D], dt)), fw(fl([B, Hkv, T, D], dt))], kw

    def b_select_topk():
        B, H, T = dim(), dim(), dim(1)
        sinks, window = rng.choice([(0, 0), (0, 0), (1, 0), (0, 1), (1, 1)])
        lo = min(T, sinks + window) or 1
        if rng.random() < 0.5:
            k = rng.randint(lo, T)
        else:
            k = torch.randint(lo, T + 1, (B, H))
            k = k if rng.random() < 0.8 else k.to(torch.int32)
        return [fw(fl([B, H, T], torch.float32)), k], \
            {"sinks": sinks, "window": window, "kv_start": None if sinks + window else kv_start(B, T)}

    def b_gather():
        B, H, T, D, Dv, n = dim(), dim(), dim(1), dim(), dim(), dim()
        dt = rng.choice(FLOATS)
        idx = torch.randint(0, T, (B, H, n))
        if rng.random() < 0.3:
            idx = idx.to(torch.int32)
        kw = {}
        if rng.random() < 0.3:
            kw = {"out_keys": torch.empty(B, H, n, D, dtype=dt), "out_values": torch.empty(B, H, n, Dv, dtype=dt)}
        return [fw(fl([B, H, T, D], dt)), fw(fl([B, H, T, Dv], dt)), fw(idx)], kw

    def b_evict_merge():
        B, H, T, D, Dv = dim(), dim(), dim(1), dim(), dim()
        C = rng.randint(0, T)
        dt = rng.choice(FLOATS)
        centers = torch.full((B, H, C), -1, dtype=torch.int64)
        for b in range(B):
            for h in range(H):
                c = rng.randint(0, C)
                centers[b, h, :c] = torch.tensor(sorted(rng.sample(range(T), c)), dtype=torch.int64)
        tau = rng.choice([None, 0.5, float("inf"), -float("inf"), torch.rand(B, H)])
        return [fw(fl([B, H, T, D], dt)), fw(fl([B, H, T, Dv], dt)), fw(torch.rand(B, H, T)), fw(centers), tau], \
            {"counts_dtype": rng.choice(["float32", "int32"]), "return_assign": rng.random() < 0.5}

    def b_span_merge():
        B, H, T, D, Dv = dim(), dim(), dim(), dim(), dim()
        dt = rng.choice(FLOATS)
        a, b = torch.randint(0, T + 1, (B, H)), torch.randint(0, T + 1, (B, H))
        kw = {}
        if rng.random() < 0.5:
            kw["counts"] = torch.rand(B, H, T) * 4 + 0.5
        return [fw(fl([B, H, T, D], dt)), fw(fl([B, H, T, Dv], dt)), fw(torch.minimum(a, b)),
                fw(torch.maximum(a, b))], kw

    def b_kvmerger_sets():
        B, H, T, D = dim(), dim(), dim(), dim()
        kw = {"threshold": rng.choice([-0.5, 0.0, 0.7, 1.0]), "sinks": rng.choice([0, 1, 4]),
              "window": rng.choice([0, 1, 3]), "kv_start": kv_start(B, T)}
        return [fw(fl([B, H, T, D], rng.choice(FLOATS)))], kw

    def b_gauss_merge():
        B, H, T, D, Dv = dim(), dim(), dim(), dim(), dim()
        dt = rng.choice(FLOATS)
        keys = fl([B, H, T, D], dt)
        runs = ops.kvmerger_sets(keys, threshold=rng.choice([-0.5, 0.5, 1.0]), sinks=rng.choice([0, 1]),
                                 window=rng.choice([0, 2])).runs
        C = rng.randint(0, T)
        centers = torch.full((B, H, C), -1, dtype=torch.int64)
        for b in range(B):
            for h in range(H):
                c = rng.randint(0, C)
                centers[b, h, :c] = torch.tensor(sorted(rng.sample(range(T), c)), dtype=torch.int64)
        kw = {"sigma": rng.choice([0.5, 1.0, 5.0]), "return_assign": rng.random() < 0.5}
        if rng.random() < 0.5:
            kw["counts"] = torch.rand(B, H, T) * 4 + 0.5
        return [fw(keys), fw(fl([B, H, T, Dv], dt)), fw(torch.rand(B, H, T)), fw(centers), fw(runs)], kw

    def b_attention():
        B, Hkv, g, q, D = dim(), dim(1), rng.choice([1, 2]), dim(), dim()
        dt = rng.choice(FLOATS)
        queries = fw(fl([B, Hkv * g, q, D], dt))
        kw = {"scaling": rng.choice([None, 0.3])}
        if rng.random() < 0.5:
            n = q + dim()
            keys, values = fl([B, Hkv, n, D], dt), fl([B, Hkv, n, D], dt)
            kw["kv_start"] = kv_start(B, n - q) if rng.random() < 0.5 else None
            if rng.random() < 0.3:
                kw["counts"] = torch.randint(1, 4, (B, Hkv, n)).to(rng.choice([torch.float32, torch.int32]))
        else:
            lens = [rng.choice([0, q, q + 2]) for _ in range(B * Hkv)]
            offs, pos = [], 0
            for ln in lens:
                offs.append(pos)
                pos += ln + rng.choice([0, 1])
            keys, values = fl([pos, D], dt), fl([pos, D], dt)
            kw["offsets"], kw["lengths"] = torch.tensor(offs), torch.tensor(lens)
            if rng.random() < 0.3:
                kw["counts"] = torch.randint(1, 4, (pos,)).to(torch.float32)
        return [queries, fw(keys), fw(values)], kw

    def b_packed_attention():
        B, Hkv, g, q, D = dim(), dim(1), rng.choice([1, 2]), dim(), dim(1)
        bits, G = rng.choice([2, 4, 8]), rng.choice([1, 3, 16])
        dt = rng.choice(FLOATS)
        Db, U, r = -(-D * bits // 8), -(-D // G), q + rng.randint(0, 2)
        kw = {"bits": bits, "group": G, "scaling": rng.choice([None, 0.3])}

        def codes(shape):
            return fw(torch.randint(0, 256, shape, dtype=torch.uint8))

        def f32(shape):
            return fw(torch.rand(shape) + 0.5)

        if rng.random() < 0.5:
            n = dim()
            T = -(-n // G)
            packed = [codes([B, Hkv, n, Db]), f32([B, Hkv, T, D]), f32([B, Hkv, T, D]), codes([B, Hkv, n, Db]),
                      f32([B, Hkv, n, U]), f32([B, Hkv, n, U])]
            kw["kv_start"] = kv_start(B, n + r)
            if rng.random() < 0.3:
                kw["counts"] = torch.randint(1, 4, (B, Hkv, n)).to(torch.float32)
        else:
            lens = [rng.choice([0, 1, G + 1]) for _ in range(B * Hkv)]
            offs, pos = [], 0
            for ln in lens:
                offs.append(pos)
                pos += -(-ln // G) * G + rng.choice([0, G])
            T = -(-pos // G)
            packed = [codes([pos, Db]), f32([T, D]), f32([T, D]), codes([pos, Db]), f32([pos, U]), f32([pos, U])]
            kw["offsets"], kw["lengths"] = torch.tensor(offs), torch.tensor(lens)
            if rng.random() < 0.3:
                kw["counts"] = torch.randint(1, 4, (pos,)).to(torch.float32)
        if rng.random() < 0.3:
            kw["residual_counts"] = f32([B, Hkv, r])
        return [fw(fl([B, Hkv * g, q, D], dt)), *packed, fw(fl([B, Hkv, r, D], dt)), fw(fl([B, Hkv, r, D], dt))], kw

    def b_pages():
        # at least one row, head and slot (empty ones come from the mutations)
        B, H, n, D, P = dim(1), dim(1), dim(1), dim(), rng.choice([1, 3, 16])
        pages = -(-n // P)
        return B, H, n, D, P, pages

    def b_page_bounds():
        B, H, n, D, P, pages = b_pages()
        first = rng.randint(0, pages)
        out = [fw(torch.empty(B, H, pages + rng.randint(0, 1), D)) for _ in range(2)]
        return [fw(fl([B, H, n, D], rng.choice(FLOATS))), *out, P, first, rng.randint(first, pages)], {}

    def b_page_scores():
        B, H, n, D, P, pages = b_pages()
        g = rng.choice([1, 2])
        bounds = [fw(fl([B, H, pages, D], torch.float32)) for _ in range(2)]
        return [fw(fl([B, H * g, D], rng.choice(FLOATS))), *bounds, rng.randint(0, pages), P], \
            {"gqa": rng.choice(["max", "mean"]), "kv_start": kv_start(B, n)}

    def b_attention_pages():
        B, H, n, D, P, pages = b_pages()
        g, dt = rng.choice([1, 2]), rng.choice(FLOATS)
        k = rng.randint(1, pages)
        sel = torch.stack([torch.stack([torch.tensor(sorted(rng.sample(range(pages - 1), k - 1)) + [pages - 1])
                                        for _ in range(H)]) for _ in range(B)])
        kw = {"scaling": rng.choice([None, 0.3]), "kv_start": kv_start(B, n) if rng.random() < 0.5 else None}
        if rng.random() < 0.3:
            kw["counts"] = torch.randint(1, 4, (B, H, n)).to(rng.choice([torch.float32, torch.int32]))
        return [fw(fl([B, H * g, 1, D], dt)), fw(fl([B, H, n, D], dt)), fw(fl([B, H, n, D], dt)), fw(sel), P], kw

    def b_simhash():
        B, Hk, n, D = dim(1), dim(1), dim(), dim()
        g, K, L = rng.choice([1, 2]), rng.choice([1, 3, 30]), rng.choice([1, 4])
        kw = {"group": g}
        if rng.random() < 0.5:
            kw["center"] = torch.randn(B, Hk, D)
        return [fw(fl([B, Hk * g, n, D], rng.choice(FLOATS))), fw(torch.randn(Hk, L * K, D)), K], kw

    def b_lsh_attention():
        B, H, n, D = dim(1), dim(1), dim(), dim()
        g, K, L, dt = rng.choice([1, 2]), rng.choice([1, 3]), rng.choice([1, 4]), rng.choice(FLOATS)
        codes = torch.randint(0, 2**K, (B, H, n, L), dtype=torch.int32)
        qcodes = torch.randint(0, 2**K, (B, H * g, 1, L), dtype=torch.int32)
        kw = {"hits": rng.randint(1, L), "sinks": rng.randint(0, 2), "window": rng.randint(0, 3),
              "kv_start": kv_start(B, n) if rng.random() < 0.5 else None, "return_lse": rng.random() < 0.5}
        if rng.random() < 0.5:
            kw["center"] = torch.randn(B, H, D)
        if rng.random() < 0.4:  # ragged: a segment of rows per head, some empty, gaps between
            lens = [rng.choice([0, 1, n, n + 2]) for _ in range(B * H)]
            offs, pos = [], 0
            for ln in lens:
                offs.append(pos)
                pos += ln + rng.choice([0, 1])
            kw["kv_start"] = None
            kw["offsets"], kw["lengths"] = torch.tensor(offs, dtype=torch.int64), torch.tensor(lens)
            if rng.random() < 0.4:
                kw["counts"] = torch.randint(1, 4, (pos,)).to(rng.choice([torch.float32, torch.int32]))
            return [fw(fl([B, H * g, 1, D], dt)), fw(fl([pos, D], dt)), fw(fl([pos, D], dt)),
                    fw(torch.randint(0, 2**K, (pos, L), dtype=torch.int32)), fw(qcodes), K], kw
        if rng.random() < 0.3:
            kw["counts"] = torch.randint(1, 4, (B, H, n)).to(rng.choice([torch.float32, torch.int32]))
        return [fw(fl([B, H * g, 1, D], dt)), fw(fl([B, H, n, D], dt)), fw(fl([B, H, n, D], dt)), fw(codes),
                fw(qcodes), K], kw

    def b_slerp_merge():
        B, H, n, D = dim(), dim(), dim(), dim()
        dt = rng.choice(FLOATS)
        return [fw(fl([B, H, n, D], dt)), fw(fl([B, H, n, D], dt)), rng.choice([0.0, 0.6, 1.0])], {}

    def b_slerp_restore():
        B, H, m, r, D = dim(), dim(), dim(), dim(), dim()
        T = m + r + rng.choice([0, 2])
        dt = rng.choice(FLOATS)
        kw = {}
        if T and rng.random() < 0.7:
            kw = {"kept": fw(fl([B, H, r, D], dt)), "kept_slots": fw(torch.randint(0, T, (B, H, r)))}
        slots = torch.randint(0, max(T, 1), (B, H, m)) if T else torch.zeros((B, H, 0), dtype=torch.int64)
        if not T:
            m = 0
            kw = {}
        return [fw(fl([B, H, m, D], dt)), fw(torch.rand(B, H, m, 2)), fw(slots.to(rng.choice([torch.int32, torch.int64]))),
                rng.choice([0, 1]), fw(torch.zeros(B, H, T, D, dtype=dt))], kw

    def b_minicache_attention():
        B, H, m, w, t, D = dim(), dim(1), dim(), dim(), dim(), dim()
        g, dt = rng.choice([1, 2]), rng.choice(FLOATS)
        slots = torch.randint(-1, 5, (B, H, m)).to(rng.choice([torch.int32, torch.int64]))
        kw = {"scaling": rng.choice([None, 0.3])}
        if rng.random() < 0.5:
            kw.update(keys=fw(fl([B, H, w, D], dt)), values=fw(fl([B, H, w, D], dt)),
                      kept_slots=fw(torch.randint(-1, 5, (B, H, w))))
            if rng.random() < 0.5:
                kw["kept_counts"] = torch.rand(B, H, w) + 0.5
        if rng.random() < 0.5:
            kw.update(tail_keys=fw(fl([B, H, t, D], dt)), tail_values=fw(fl([B, H, t, D], dt)))
        if rng.random() < 0.3:
            kw["counts"] = torch.rand(B, H, m, 2) + 0.5
        return [fw(fl([B, H * g, 1, D], dt)), fw(fl([B, H, m, D], dt)), fw(fl([B, H, m, D], dt)),
                fw(torch.rand(B, H, m, 2)), fw(torch.rand(B, H, m, 2)), fw(slots), rng.choice([0, 1])], kw

    def b_head_budgets():
        B, H, T = dim(), dim(), dim()
        return [fw(fl([B, H, T], torch.float32)), rng.randint(0, T + 1)], \
            {"alpha": rng.choice([0.0, 0.2, 1.0]), "floor": rng.randint(0, 2), "kv_start": kv_start(B, T),
             "mode": rng.choice(["adaptive", "adaptive", "uniform"])}

    def b_pack():
        B, H, n, D = dim(), dim(), dim(), dim()
        return [fw(fl([B, H, n, D], rng.choice(FLOATS))), rng.choice([2, 4, 8]), rng.choice([1, 2, 3, 32])], {}

    def b_pack_keys():
        B, H, n, D = dim(), dim(), dim(), dim()
        G = rng.choice([1, 2, 3, 32])
        kw = {}
        if rng.random() < 0.5:
            F = H if rng.random() < 0.6 else dim()
            w = torch.randn(F, D, D) * rng.choice([0.1, 1.0, 1e30])
            if rng.random() < 0.1 and w.numel():
                w[0, 0, -1] = float(rng.choice(["nan", "inf"]))
            kw["feedback"] = fw(w)
            if rng.random() < 0.4:
                kw["feedback_index"] = fw(torch.randint(-1, F + 1, (B, H, -(-n // G))))
        return [fw(fl([B, H, n, D], rng.choice(FLOATS))), rng.choice([2, 4, 8]), G], kw

    def b_unpack(values):
        B, H, n, D = dim(), dim(), dim(), dim()
        bits, G = rng.choice([2, 4, 8]), rng.choice([1, 2, 3, 32])
        p = (ops.pack_values if values else ops.pack_keys)(fl([B, H, n, D], torch.float32), bits, G)
        dt = rng.choice(FLOATS)
        kw = {"dtype": rng.choice(["float32", "float16", "bfloat16", dt])}
        if values and rng.random() < 0.5:
            kw["head_dim"] = D
        if rng.random() < 0.3:
            kw = {"out": torch.empty(B, H, n, D, dtype=dt)}
        return [fw(p.codes), fw(p.mins), fw(p.scales), bits, G], kw

    def b_probe_positions():
        return [rng.randint(0, 50), rng.choice([0.1, 0.5, 1.0])], {}

    def b_kvcrush_pick():
        B, H, T = dim(), dim(), dim()
        kept = fw((torch.rand(B, T) < 0.3).to(rng.choice([torch.uint8, torch.bool])))
        kw = {"anchor": rng.choice(["alternate", "random", "mean"]), "seed": rng.choice([0, 7, 2**62]),
              "kv_start": kv_start(B, T)}
        return [fw(fl([B, H, T], torch.float32).abs()), kept, rng.choice([0, 1, 2, 5])], kw

    def b_cast():
        n = dim()
        src = fw(fl([n], rng.choice(FLOATS)))
        return [src, fw(torch.empty(n, dtype=rng.choice(FLOATS)))], {}

    def b_pooled_counts():
        B, L, M = dim(), dim(), dim()
        s = fl([B, L, M], torch.float32)
        if rng.random() < 0.3:
            s = s.masked_fill(torch.rand(B, L, M) < 0.3, float("-inf"))
        if rng.random() < 0.3:
            s = s.round()  # ties
        k = rng.randint(0, L * M) if rng.random() < 0.5 else torch.randint(0, L * M + 1, (B,))
        return [fw(s), k], {}

    def b_row_cosine():
        N, D = dim(), dim()
        dt = rng.choice(FLOATS)
        return [fw(fl([N, D], dt)), fw(fl([N, D], dt))], {}

    BUILDERS = {
        "window_scores": b_window_scores,
        "global_scores": lambda: b_window_scores(gl=True),
        "keyformer_scores": b_keyformer_scores,
        "vector_norm": b_vector_norm,
        "pool1d": b_pool1d,
        "lagkv_scores": b_lagkv_scores,
        "select_topk": b_select_topk,
        "gather": b_gather,
        "evict_merge": b_evict_merge,
        "span_merge": b_span_merge,
        "attention": b_attention,
        "packed_attention": b_packed_attention,
        "page_bounds": b_page_bounds,
        "page_scores": b_page_scores,
        "attention_pages": b_attention_pages,
        "simhash": b_simhash,
        "lsh_attention": b_lsh_attention,
        "slerp_merge": b_slerp_merge,
        "slerp_restore": b_slerp_restore,
        "minicache_attention": b_minicache_attention,
        "head_budgets": b_head_budgets,
        "probe_positions": b_probe_positions,
        "pack_keys": b_pack_keys,
        "pack_values": b_pack,
        "unpack_keys": lambda: b_unpack(False),
        "unpack_values": lambda: b_unpack(True),
        "packed_row_bytes": lambda: ([dim(), rng.choice([2, 4, 8])], {}),
        "set_num_threads": lambda: ([rng.choice([1, 2])], {}),
        "_cast": b_cast,
        "_describe": lambda: ([fw(fl([dim()] * rng.randint(0, 4), rng.choice(FLOATS)))], {}),
        "_use_exchange_api": lambda: ([rng.choice([True, False])], {}),
        "kvcrush_pick": b_kvcrush_pick,
        "kvmerger_sets": b_kvmerger_sets,
        "gauss_merge": b_gauss_merge,
        "actqkv_scores": b_actqkv_scores,
        "pooled_counts": b_pooled_counts,
        "row_cosine": b_row_cosine,
        "fastgen_recovery": b_fastgen_recovery,
    }

    def random_value():
        r = rng.random()
        if r < 0.5:
            nd = rng.randint(0, 5)
            return fw(fl([dim() for _ in range(nd)], rng.choice(FLOATS + BAD_DTYPES[:4])))
        return rng.choice([None, 0, 1, -1, 2**40, 0.5, float("nan"), True, "mean", [0, 1], object()])

    def generic_args(fn):
        """Random arguments for the parameters of fn's signature."""
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            params = []
        args, kw = [], {}
        for p in params:
            if p.kind == p.KEYWORD_ONLY:
                if rng.random() < 0.5:
                    kw[p.name] = random_value()
            elif p.default is p.empty or rng.random() < 0.5:
                args.append(random_value())
        return args, kw

    # ---------------------------------------------------------------- breaking

    def break_tensor(t):
        if isinstance(t, torch.Tensor) and (t.device.type != "cpu" or t.layout != torch.strided):
            return rng.choice([None, t])  # broken already (second mutation)
        if isinstance(t, np.ndarray):
            if rng.random() < 0.3:
                if t.ndim and rng.random() < 0.5:
                    return np.flip(t, axis=rng.randrange(t.ndim))  # negative strides
                ro = t.copy()
                ro.setflags(write=False)
                return ro
            t = torch.from_numpy(t.copy())
        kind = rng.choice(["type", "ndim", "zero", "dtype", "dtype", "perm", "step", "expand", "shape",
                           "values", "meta", "sparse", "liar", "producer"])
        nd = t.dim()
        if kind == "type":
            return rng.choice([None, 0, 1.5, "x", [1, 2], [[0.5]], object(), b"ab", {}, BadBool()])
        if kind == "ndim":
            return rng.choice([t[None], t.reshape(-1), t[0] if nd and t.shape[0] else t[None, None],
                               torch.tensor(1.0, dtype=t.dtype)])
        if kind == "zero" and nd:
            return t.narrow(rng.randrange(nd), 0, 0)
        if kind == "dtype":
            return t.to(rng.choice(BAD_DTYPES))
        if kind == "perm" and nd >= 2:  # same shape, permuted memory order
            i, j = rng.sample(range(nd), 2)
            return t.transpose(i, j).contiguous().transpose(i, j)
        if kind == "step" and nd:
            d = rng.randrange(nd)
            big = list(t.shape)
            big[d] *= 2
            return torch.zeros(big, dtype=t.dtype)[(slice(None),) * d + (slice(None, None, 2),)]
        if kind == "expand" and nd:  # stride 0: aliased elements
            d = rng.randrange(nd)
            if t.shape[d] > 0:
                return t.narrow(d, 0, 1).expand(t.shape)
        if kind == "shape" and nd:
            shape = list(t.shape)
            shape[rng.randrange(nd)] += rng.choice([-1, 1, 3])
            return torch.zeros([max(s, 0) for s in shape], dtype=t.dtype)
        if kind == "values" and t.numel():
            t = t.clone(memory_format=torch.contiguous_format)
            if t.is_floating_point():
                t.view(-1)[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf"), -float("inf"), 1e30])
            elif t.dtype != torch.bool and not t.is_complex():
                info = torch.iinfo(t.dtype)
                v = rng.choice([info.min, info.max, -1, -2, 7, 1000])
                t.view(-1)[rng.randrange(t.numel())] = min(max(v, info.min), info.max)
            return t
        if kind == "meta":
            return torch.empty(t.shape, dtype=t.dtype, device="meta")
        if kind == "sparse" and nd and t.dtype != torch.bool:
            return t.to_sparse()
        if kind == "liar":
            return Liar(rng.choice([t, torch.zeros(3), t[None]]), rng.choice([tuple(t.shape), (1, 1, 1, 1), (2, 2, 2)]))
        if kind == "producer":
            return BadProducer(rng.choice(["raise", "int", "used"]))
        return rng.choice([None, torch.zeros(2, 2, 2, dtype=t.dtype)])

    def break_value(v):
        if isinstance(v, (torch.Tensor, np.ndarray)):
            return break_tensor(v)
        if isinstance(v, bool):
            return rng.choice([None, 2, "no", BadBool(), torch.tensor(True)])
        if isinstance(v, int):
            huge = HUGE_SIZE if current["name"] == "probe_positions" else HUGE
            return rng.choice(huge + [True, 1.5, "3", None, np.int64(3), float("nan"), torch.tensor(2)])
        if isinstance(v, float):
            return rng.choice([float("nan"), float("inf"), -float("inf"), -0.0, 1e308, True, None, "x", 1j, 3,
                               np.float32("nan"), torch.tensor(0.5)])
        if isinstance(v, str):
            return rng.choice(["", "MEAN", None, 1, "max "])
        if isinstance(v, list):
            return rng.choice([[], [[1]], ["a"], [2**70], [-1] * max(len(v), 1), None, v + [0]])
        if v is None:
            return random_value()
        return rng.choice([None, 0, "x"])

    def mutate(args, kw, fn):
        """Break 0-2 arguments, or the argument count."""
        args, kw = list(args), dict(kw)
        r = rng.random()
        if r < 0.12:
            return args, kw, "valid"
        if r < 0.22:
            how = rng.choice(["drop", "extra", "none", "kw"])
            if how == "drop" and args:
                args.pop(rng.randrange(len(args)))
            elif how == "extra":
                args.append(random_value())
            elif how == "none":
                args, kw = [], {}
            else:
                kw["bogus"] = 1
            return args, kw, f"arity:{how}"
        names = []
        for _ in range(1 if r < 0.85 else 2):
            slots = [("a", i) for i in range(len(args))] + [("k", k) for k in kw]
            params = []
            try:
                params = [p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY]
            except (TypeError, ValueError):
                pass
            slots += [("k", p) for p in params if p not in kw]
            if not slots:
                break
            where, key = rng.choice(slots)
            if where == "a":
                args[key] = break_value(args[key])
                names.append(f"arg{key}")
            else:
                kw[key] = break_value(kw.get(key))
                names.append(key)
        return args, kw, "broke:" + ",".join(names)

    # ------------------------------------------------------------- recording

    class Recorder:
        """Stands in for ops._C to capture the arguments ops passes down."""

        def __init__(self, real):
            self._real, self.calls = real, []

        def __getattr__(self, name):
            attr = getattr(self._real, name)
            if callable(attr) and not isinstance(attr, type):
                def call(*a, **k):
                    self.calls.append((name, a))
                    return attr(*a, **k)
                return call
            return attr

    # _C functions that ops reaches under other names
    C_VIA = {"pack": ("pack_keys", "pack_values"), "unpack": ("unpack_keys", "unpack_values")}

    def valid_c_args(name):
        if name in ("_cast", "_describe", "_use_exchange_api", "set_num_threads"):
            return BUILDERS[name]()[0]
        via = rng.choice(C_VIA[name]) if name in C_VIA else name
        if via not in BUILDERS:
            return []
        rec = Recorder(_C)
        ops._C = rec
        try:
            a, k = BUILDERS[via]()
            getattr(ops, via)(*a, **k)
        except (TypeError, ValueError):
            pass
        finally:
            ops._C = _C
        mine = [c for c in rec.calls if c[0] == name]
        return list(mine[-1][1]) if mine else None

    # -------------------------------------------------------------- the loop

    if target == "ops":
        names = [n for n in ops.__all__ if callable(getattr(ops, n))]
        module = ops
    else:
        names = [n for n in dir(_C) if callable(getattr(_C, n)) and not isinstance(getattr(_C, n), type)]
        module = _C
    ok = raised = 0
    for i in range(n_calls):
        name = names[i % len(names)] if i < len(names) else rng.choice(names)
        fn = getattr(module, name)
        current["name"] = name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # building bad arguments may warn; the call may not
            if target == "ops":
                args, kw = BUILDERS[name]() if name in BUILDERS else generic_args(fn)
            else:
                args, kw = valid_c_args(name), {}
                if args is None:
                    args, kw = generic_args(fn)
            args, kw, how = mutate(args, kw, fn)
        line = f"CALL {i} {target}.{name}({', '.join(map(desc, args))}" + \
            "".join(f", {k}={desc(v)}" for k, v in kw.items()) + f") [{how}]"
        print(line, flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                fn(*args, **kw)
                ok += 1
            except (TypeError, ValueError, KVCompressError):
                raised += 1
            except Exception as e:  # noqa: BLE001 - any other type is the finding
                print(f"FAIL {line[5:]} raised {type(e).__name__}: {str(e)[:300]}", flush=True)
        if name == "set_num_threads":
            _C.set_num_threads(2)
    print(f"FUZZ-DONE ok={ok} raised={raised}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
