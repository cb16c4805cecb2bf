"""Shared pieces of the benchmark scripts: machine description, the exact
command line, and writing ``results/<name>.json`` + a ``RESULTS.md`` section."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

#: Attention shapes of the packed-attention benchmarks (bench_packed, ab_packed): (query heads, kv heads,
#: head dim). One kv head serves Hq / Hkv query rows, so the shapes differ in multiply-adds per byte read:
#: with GQA the step is bound by arithmetic on a CPU, without it (llama2, Llama-2-7B's) by memory.
#: gemma3: Gemma 3 270M's (one kv head of four query rows at D = 256).
PACKED_SHAPES = {"smollm2": (9, 3, 64), "llama8b": (32, 8, 128), "llama2": (32, 32, 128), "gemma3": (4, 1, 256)}


def machine() -> dict:
    """CPU model, core count, library versions and load average right now."""
    import numpy as np
    import torch

    from kvcompress import ops

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    info = dict(
        cpu=cpu, cores=os.cpu_count(), python=platform.python_version(), torch=torch.__version__,
        numpy=np.__version__, openmp=bool(ops._C.has_openmp), loadavg_at_start=[round(x, 2) for x in load],
        # which attention units the build runs here: the 16-lane x86-64-v4 ones, the packed AMX path
        wide_units=bool(ops._C._wide()), amx=bool(ops._C._amx()),
    )
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def machine_line(info: dict) -> str:
    """One Markdown sentence describing ``machine()``'s result."""
    extra = f", transformers {info['transformers']}" if "transformers" in info else ""
    return (f"Machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, torch {info['torch']}"
            f"{extra}, NumPy {info['numpy']}, OpenMP {'on' if info['openmp'] else 'off'}{_units(info)}; load average "
            f"at start {info['loadavg_at_start']}.")


def _units(info: dict) -> str:
    """The attention units a run used (absent from results written before 2026-12-03)."""
    if "wide_units" not in info:
        return ""
    units = "16-lane (x86-64-v4)" if info["wide_units"] else "8-lane"
    return f", attention units {units}, AMX path {'on' if info.get('amx') else 'off'}"


def command_line(script: str, argv=None) -> str:
    """The command that reproduces this run, relative to the repository root."""
    args = list(argv) if argv is not None else sys.argv[1:]
    rel = os.path.relpath(os.path.abspath(script), os.path.dirname(HERE))
    return "python " + " ".join(shlex.quote(a) for a in [rel] + args)


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def write_results(name: str, result: dict, lines: list[str], json_path: str | None = None) -> str:
    """Write ``result`` as JSON (default ``results/<name>.json``) and append
    ``lines`` (a Markdown section) to ``RESULTS.md``; return the JSON path."""
    path = json_path or os.path.join(HERE, "results", f"{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    results = os.path.join(HERE, "RESULTS.md")
    # a blank line before the new heading even when the file was edited by hand since
    gap = b""
    if os.path.exists(results) and os.path.getsize(results):
        with open(results, "rb") as f:
            f.seek(max(0, os.path.getsize(results) - 2))
            gap = b"" if f.read().endswith(b"\n\n") else b"\n"
    with open(results, "ab") as f:
        f.write(gap + ("\n".join(lines).rstrip("\n") + "\n\n").encode())
    return path


def time_pair(fc, ft, min_time, min_reps=5, max_reps=100):
    """Median seconds of ``fc`` and ``ft`` run alternately (so background
    load hits both alike) for ``min_time`` s and at least ``min_reps`` reps;
    returns ``(c_seconds, torch_seconds, reps)``."""
    fc()
    ft()
    tc, tt = [], []
    start = time.perf_counter()
    while len(tc) < max_reps and (len(tc) < min_reps or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fc()
        t1 = time.perf_counter()
        ft()
        t2 = time.perf_counter()
        tc.append(t1 - t0)
        tt.append(t2 - t1)
    return statistics.median(tc), statistics.median(tt), len(tc)


def time_many(fns: dict, min_time: float, min_reps: int = 5, max_reps: int = 200) -> tuple[dict, int]:
    """Median seconds of each callable, run one after the other in every rep."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    start = time.perf_counter()
    reps = 0
    while reps < max_reps and (reps < min_reps or time.perf_counter() - start < min_time):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
        reps += 1
    return {k: statistics.median(v) for k, v in times.items()}, reps


def memcpy_bandwidth(nbytes=256 << 20, reps=7, threads=1):
    """Bytes/s (read + write) of a large NumPy copy on ``threads`` threads:
    the machine's practical bandwidth limit at that thread count.

    With ``threads`` > 1 the copy is split into that many slices copied at
    once from a thread pool (``np.copyto`` releases the GIL), so a kernel on
    N threads is measured against a copy on N threads: a one-thread copy
    understates what N cores can move (on a 2-core Xeon VM, 26 GB/s on one
    thread, 28 on two; reads alone 17 and 32)."""
    import numpy as np
    from concurrent.futures import ThreadPoolExecutor

    if threads < 1:
        raise ValueError(f"threads: expected a positive count, got {threads}")
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    edges = [src.size * i // threads for i in range(threads + 1)]
    slices = [slice(a, b) for a, b in zip(edges, edges[1:])]
    with ThreadPoolExecutor(threads) as pool:
        def copy():
            if threads == 1:
                np.copyto(dst, src)
            else:
                list(pool.map(lambda s: np.copyto(dst[s], src[s]), slices))

        copy()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            copy()
            ts.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(ts)


def copy_references(threads) -> dict:
    """``memcpy_bandwidth`` at each thread count in ``threads`` (bytes/s)."""
    return {nt: memcpy_bandwidth(threads=nt) for nt in threads}


def copy_reference_line(bws: dict) -> str:
    """The RESULTS.md line naming the copy references of ``copy_references``."""
    return ("Reference bandwidth: 256 MiB NumPy copy (read + write), on as many threads as the kernel it is set "
            "against = " + ", ".join(f"{b / 1e9:.2f} GB/s on {nt} thread(s)" for nt, b in bws.items()) + ".")


def matmul_roof(threads: int, n: int = 256, reps: int = 21) -> float:
    """fp32 multiply-adds/s of torch's matmul on ``threads`` threads: the
    machine's practical compute limit, as ``memcpy_bandwidth`` is its
    bandwidth one (n x n x n, resident in cache; median of ``reps``)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        c = torch.empty(n, n)
        for _ in range(3):
            torch.mm(a, b, out=c)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            ts.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    return n ** 3 / statistics.median(ts)


def last_level_cache_bytes(default: int = 256 << 20) -> int:
    """Size of the largest CPU cache Linux reports (``default`` elsewhere)."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = os.listdir(base)
    except OSError:
        return default
    for entry in entries:
        try:
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
        try:
            best = max(best, int(text.rstrip("KMGkmg")) * scale)
        except ValueError:
            continue
    return best or default


def stream_copies(bytes_per_copy: int, llc: int, factor: float = 2.0) -> int:
    """Copies of a layer's tensors to cycle through so that, between two
    reads of the same copy, at least ``factor`` x ``llc`` other bytes are
    read: each read then comes from memory, as in a decode step, which reads
    every layer's cache once (a model's cache at these lengths is many times
    any cache), rather than from the cache a repeated call leaves warm."""
    if bytes_per_copy <= 0:
        raise ValueError(f"bytes_per_copy: must be > 0, got {bytes_per_copy}")
    return max(2, 1 + -(-int(factor * llc) // bytes_per_copy))


def step_clock():
    """A transformers logits processor that records the time of each call
    (``.times``): one per generated token, after its forward. Made here, not
    at import, so that benchmarks without transformers load this module
    without it."""
    from transformers import LogitsProcessor

    class StepClock(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    return StepClock()
