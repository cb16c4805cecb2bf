"""Build script for the C extension ``kvcompress._C``.

Metadata lives in pyproject.toml; this file only describes the extension,
because its flags depend on the compiler and on environment switches:

``KVCOMPRESS_DEBUG=1``     -O0 -g instead of -O3.
``KVCOMPRESS_SANITIZE=1``  AddressSanitizer + UndefinedBehaviorSanitizer. Load
                           the result with ``LD_PRELOAD=$(gcc -print-file-name=libasan.so)``
                           since the Python interpreter itself is not instrumented.
``KVCOMPRESS_CUDA``        ``1`` asks for the CUDA backend (not built yet: warns),
                           ``auto``/unset/``0`` builds the CPU extension only.

No torch at build time, no pybind11, no ``-march=native`` (wheels must run on
any x86-64/aarch64 machine; hot loops use GCC function multiversioning).
"""

import glob
import os
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, LinkError

HERE = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_request():
    value = os.environ.get("KVCOMPRESS_CUDA", "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        sys.stderr.write(
            "warning: KVCOMPRESS_CUDA=1 was requested but the CUDA backend (csrc/cuda) "
            "is not part of this version yet; building the CPU extension only.\n"
        )
    return value


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
            cflags += ["-O0", "-g"] if _env_flag("KVCOMPRESS_DEBUG") else ["-O3"]
            ldflags = []
            if _env_flag("KVCOMPRESS_SANITIZE"):
                san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
                cflags += san
                ldflags += san
            omp = ["-fopenmp"]
        probe = "#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
        if not self._probe(probe, omp):
            sys.stderr.write("warning: the compiler does not support OpenMP; ops run single-threaded\n")
            omp = []
            if not msvc:
                cflags.append("-Wno-unknown-pragmas")
        for ext in self.extensions:
            ext.extra_compile_args = cflags + omp
            ext.extra_link_args = ldflags + omp
        super().build_extensions()


_cuda_request()

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
