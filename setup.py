"""Build script for the C extension ``kvcompress._C``.

Metadata lives in pyproject.toml; this file only describes the extension,
because its flags depend on the compiler and on environment switches:

``KVCOMPRESS_DEBUG=1``     -O0 -g instead of -O3.
``KVCOMPRESS_SANITIZE=1``  AddressSanitizer + UndefinedBehaviorSanitizer, at -O1 (a
                           sanitized -O3 build of the multiversioned kernels takes
                           minutes). Load the result with ``LD_PRELOAD="$(gcc
                           -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)"``
                           since the Python interpreter itself is not instrumented
                           (``make sanitize-test`` does all of it).
``KVCOMPRESS_ISA``         ``x86-64-v4``, ``x86-64-v3`` or ``x86-64``: build only that
                           one of the three load-time clones of the hot loops (GCC,
                           x86-64), to test each clone's results on one machine
                           (``make isa-test``); the CPU must support it.
``KVCOMPRESS_CUDA``        ``1`` builds the CUDA backend too (csrc/cuda/*.cu with nvcc,
                           cudart linked statically; fails without nvcc), ``auto``
                           builds it when nvcc is found, unset/``0`` builds the CPU
                           extension only (the default).
``KVCOMPRESS_CUDA_ARCHS``  compute capabilities to compile for, default ``80,90``
                           (each as SASS, plus PTX of the newest for later GPUs).

No torch at build time, no pybind11, no ``-march=native`` (wheels must run on
any x86-64/aarch64 machine; hot loops use GCC function multiversioning).
"""

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, LinkError

HERE = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_nvcc():
    """Path of nvcc: $CUDA_HOME/bin, then PATH; None when absent."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_nvcc():
    """nvcc to build the CUDA backend with, or None for a CPU-only build."""
    value = os.environ.get("KVCOMPRESS_CUDA", "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return None
    nvcc = _find_nvcc()
    if value == "auto":
        return nvcc
    if value not in ("1", "true", "yes", "on"):
        sys.exit(f"error: KVCOMPRESS_CUDA={value!r}: expected 1, auto or 0")
    if nvcc is None:
        sys.exit("error: KVCOMPRESS_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
    return nvcc


def _cuda_lib_dir(nvcc):
    """Folder of libcudart_static.a: next to nvcc's toolkit, else the usual
    install roots (nvcc may be a wrapper script outside the toolkit)."""
    roots = [os.environ.get("CUDA_HOME"), os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
             "/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    subs = ("lib64", os.path.join("targets", "x86_64-linux", "lib"),
            os.path.join("targets", "sbsa-linux", "lib"), "lib")
    for root in filter(None, roots):
        for sub in subs:
            if os.path.isfile(os.path.join(root, sub, "libcudart_static.a")):
                return os.path.join(root, sub)
    sys.exit("error: libcudart_static.a not found (set CUDA_HOME to the CUDA toolkit)")


def _cuda_gencode():
    archs = [a.strip() for a in os.environ.get("KVCOMPRESS_CUDA_ARCHS", "80,90").split(",") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        sys.exit("error: KVCOMPRESS_CUDA_ARCHS: expected compute capabilities like 80,90")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    newest = max(archs, key=int)
    return flags + [f"-gencode=arch=compute_{newest},code=compute_{newest}"]


def _compile_cuda(nvcc, build_temp):
    """Compile csrc/cuda/*.cu in parallel; returns the object files."""
    sources = sorted(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
    out_dir = os.path.join(build_temp, "cuda")
    os.makedirs(out_dir, exist_ok=True)
    flags = ["-std=c++17", "-O3", "-DKVC_WITH_CUDA", "-I" + os.path.join(HERE, "csrc"),
             "-Xcompiler", "-fPIC,-fvisibility=hidden"] + _cuda_gencode()

    def one(src):
        obj = os.path.join(out_dir, os.path.basename(src) + ".o")
        cmd = [nvcc] + flags + ["-c", src, "-o", obj]
        sys.stderr.write(" ".join(cmd) + "\n")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CompileError(f"nvcc failed on {src}:\n{proc.stdout}{proc.stderr}")
        return obj

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return list(pool.map(one, sources))


def _parallel_compile(compiler):
    """Make `compiler` compile an extension's sources in parallel: distutils
    compiles them one after another, and the -O3 multiversioned (plus, for
    CI, sanitized) build is the slow part of every install and CI run."""
    serial = compiler.compile
    jobs = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)

    def compile(sources, *args, **kwargs):
        if jobs <= 1 or len(sources) <= 1:
            return serial(sources, *args, **kwargs)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            groups = list(pool.map(lambda src: serial([src], *args, **kwargs), sources))
        return [obj for group in groups for obj in group]

    compiler.compile = compile


class BuildExt(build_ext):
    """build_ext that picks flags by probing the compiler."""

    def _probe(self, source, extra_args):
        """True if `source` compiles and links with `extra_args`."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "probe.c")
            with open(path, "w") as f:
                f.write(source)
            try:
                objs = self.compiler.compile([path], output_dir=tmp, extra_postargs=extra_args)
                self.compiler.link_executable(
                    objs, os.path.join(tmp, "probe"), extra_postargs=extra_args
                )
            except (CompileError, LinkError, CCompilerError, OSError):
                return False
        return True

    def build_extensions(self):
        msvc = self.compiler.compiler_type == "msvc"
        if msvc:
            cflags = ["/std:c11", "/W3"] + (["/Od", "/Zi"] if _env_flag("KVCOMPRESS_DEBUG") else ["/O2"])
            omp = ["/openmp"]
            ldflags = []
        else:
            cflags = [
                "-std=c11",
                "-Wall",
                "-Wextra",
                # ISO C mode turns contraction off; the kernels want FMAs where
                # the target has them (results stay thread-count independent).
                "-ffp-contract=fast",
                # errno is never read; lets sqrtf vectorise
                "-fno-math-errno",
                "-fvisibility=hidden",
            ]
            if _env_flag("KVCOMPRESS_DEBUG"):
                cflags += ["-O0", "-g"]
            elif _env_flag("KVCOMPRESS_SANITIZE"):
                cflags += ["-O1"]
            else:
                cflags += ["-O3"]
            ldflags = []
            isa = os.environ.get("KVCOMPRESS_ISA", "").strip()
            if isa:
                levels = {"x86-64-v4": 4, "x86-64-v3": 3, "x86-64": 0}
                if isa not in levels:
                    sys.exit(f"error: KVCOMPRESS_ISA={isa!r}: expected one of {', '.join(levels)}")
                cflags.append(f"-DKVC_ISA={levels[isa]}")
            if _env_flag("KVCOMPRESS_SANITIZE"):
                san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
                cflags += san
                # the packed attention's wide unit (three head sizes inlined)
                # is past GCC's variable-tracking limit, which it notes on
                # every build before retrying without: say so up front
                cflags.append("-fno-var-tracking-assignments")
                ldflags += san
            omp = ["-fopenmp"]
        probe = "#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
        if not self._probe(probe, omp):
            sys.stderr.write("warning: the compiler does not support OpenMP; ops run single-threaded\n")
            omp = []
            if not msvc:
                cflags.append("-Wno-unknown-pragmas")
        nvcc = _cuda_nvcc()
        cuda_objs, cuda_libs = [], []
        if nvcc:
            cuda_objs = _compile_cuda(nvcc, self.build_temp)
            cflags.append("-DKVC_WITH_CUDA")
            # static cudart: the wheel needs a driver, not a toolkit
            cuda_libs = ["-L" + _cuda_lib_dir(nvcc), "-lcudart_static", "-lrt", "-lpthread", "-ldl",
                         "-lstdc++"]
        _parallel_compile(self.compiler)
        for ext in self.extensions:
            ext.extra_compile_args = cflags + omp
            ext.extra_objects = cuda_objs
            ext.extra_link_args = ldflags + omp + cuda_libs
        super().build_extensions()



setup(
    ext_modules=[
        Extension(
            "kvcompress._C",
            sources=sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.c"))),
            include_dirs=["csrc"],
            depends=sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.h"))),
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
