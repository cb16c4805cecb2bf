"""How fast this CPU issues the 512-bit operations the packed attention is made of.

The few-rows path (``csrc/attention_rows_span.h``) spends, per packed slot,
one shift and one ``vpermps`` table lookup per 16 codes, and one
multiply-add per 16 codes per query row (keys and values alike). Whether a
kernel is near what the machine allows is a question of how many of those
the core retires per nanosecond, which differs between CPUs and between
cloud VMs of one CPU: this probe measures it. It compiles a small C file of
inline-assembly loops with the system's ``gcc`` (``-march=x86-64-v4``) into
a temporary directory, runs it, and prints nanoseconds per operation:

    python benchmarks/probe_vector_rates.py [--iters 100000000]

- ``fma chain``: dependent ``vfmadd231ps`` (the latency);
- ``fma x12``: twelve independent chains (the issue rate);
- ``vpermps``, ``vpsrld``: eight independent ones per iteration;
- ``perm + fma``: one of each, independent;
- ``shift + perm + fma``: a code vector as the path unpacks and uses it
  (the shift feeds the lookup, the lookup the multiply-add).

Nothing here touches ``kvcompress``: it needs gcc and an x86-64 CPU with
AVX-512 (it exits with a message naming what is missing otherwise).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile

#: (name, registers written, one iteration's instructions) — each loop body
#: repeats `count` operations; the C driver divides by it.
LOOPS = [
    ("fma chain", 1, ["vfmadd231ps %%zmm0,%%zmm1,%%zmm2"]),
    ("fma x12", 12, [f"vfmadd231ps %%zmm0,%%zmm1,%%zmm{r}" for r in range(2, 14)]),
    ("vpermps", 8, [f"vpermps %%zmm0,%%zmm1,%%zmm{r}" for r in range(2, 10)]),
    ("vpsrld", 8, [f"vpsrld ${4 * (r % 8)},%%zmm1,%%zmm{r}" for r in range(2, 10)]),
    ("perm + fma", 8, [x for r in range(8) for x in (f"vpermps %%zmm0,%%zmm1,%%zmm{2 + r}",
                                                     f"vfmadd231ps %%zmm0,%%zmm1,%%zmm{10 + r}")]),
    ("shift + perm + fma", 8, [x for r in range(8) for x in (f"vpsrld ${4 * r},%%zmm1,%%zmm{2 + r % 4}",
                                                             f"vpermps %%zmm0,%%zmm{2 + r % 4},%%zmm{6 + r % 4}",
                                                             f"vfmadd231ps %%zmm0,%%zmm{6 + r % 4},%%zmm{10 + r}")]),
]


def c_source() -> str:
    """The driver: one timed inline-assembly loop per entry of LOOPS,
    printing "name<TAB>ns per operation"."""
    parts = ["#include <stdio.h>\n#include <stdlib.h>\n#include <time.h>\n",
             "static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);"
             " return t.tv_sec + t.tv_nsec * 1e-9; }\n",
             "int main(int argc, char **argv) {\n  long n = argc > 1 ? atol(argv[1]) : 100000000; double t0;\n",
             '  __asm__ volatile("vxorps %%zmm0,%%zmm0,%%zmm0\\n vxorps %%zmm1,%%zmm1,%%zmm1" ::: "xmm0", "xmm1");\n']
    clobbers = ", ".join(f'"xmm{r}"' for r in range(2, 18))
    for name, count, body in LOOPS:
        asm = "".join(f"{ins}\\n" for ins in body)
        parts.append(f'  t0 = now();\n  __asm__ volatile("mov %0, %%rcx\\n1:\\n{asm}sub $1, %%rcx\\njnz 1b\\n"'
                     f' :: "r"(n) : "rcx", "cc", {clobbers});\n'
                     f'  printf("{name}\\t%.4f\\n", (now() - t0) * 1e9 / ((double)n * {count}));\n')
    parts.append("  return 0;\n}\n")
    return "".join(parts)


def problem() -> str | None:
    """Why the probe cannot run here, or None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"needs an x86-64 CPU, this is {platform.machine()}"
    if shutil.which("gcc") is None:
        return "needs gcc on PATH"
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return "cannot read /proc/cpuinfo to check for AVX-512"
    if " avx512f" not in flags:
        return "needs a CPU with AVX-512 (avx512f not in /proc/cpuinfo)"
    return None


def measure(iters: int) -> dict[str, float]:
    """{loop name: ns per operation}, compiled and run in a temporary directory."""
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "probe.c"), os.path.join(tmp, "probe")
        with open(src, "w") as f:
            f.write(c_source())
        subprocess.run(["gcc", "-O2", "-march=x86-64-v4", src, "-o", exe], check=True, capture_output=True)
        out = subprocess.run([exe, str(iters)], check=True, capture_output=True, text=True).stdout
    return {name: float(ns) for name, ns in (line.split("\t") for line in out.strip().splitlines())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=100_000_000, help="iterations per loop (default %(default)s)")
    args = ap.parse_args(argv)
    if args.iters < 1000:
        ap.error(f"--iters: at least 1000, got {args.iters}")
    why = problem()
    if why:
        print(f"probe_vector_rates: {why}", file=sys.stderr)
        return 2
    rates = measure(args.iters)
    chain = rates["fma chain"]
    print("| loop | ns each (a pair or triple in the mixed loops) | cycles, if an FMA's latency is 4 |")
    print("|---|---:|---:|")
    for name, ns in rates.items():
        print(f"| {name} | {ns:.3f} | {4 * ns / chain:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
