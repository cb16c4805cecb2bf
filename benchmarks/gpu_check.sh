#!/usr/bin/env bash
# The GPU checks in one command, for a short lease of a GPU machine: the
# CPU/GPU consistency suite (tests/test_cuda.py) and bench_cuda's decode
# attention and packed-attention tables (same-run ratios against a
# device-to-device copy, SDPA and the generic packed kernel).
#
#   benchmarks/gpu_check.sh [--build] [--ops] [OUT_DIR]
#
# Run from the repository root on the GPU machine. Without --build the
# extension must already be there, built with KVCOMPRESS_CUDA=1 for that
# machine's Python (building it elsewhere for the same CPython version and
# carrying kvcompress/_C.cpython-3XY-*.so saves the ~2 minutes the build
# takes on 16 cores). --ops adds bench_cuda's table of the other ops.
# OUT_DIR (default gpu_check_out) receives build.log, bench.log, the bench's
# JSON and tests.log. Learned on leases of an H200:
# - pytest-xdist spreads the suite over the cores (53 s instead of minutes);
#   pytest-benchmark refuses to load beside it, so it is switched off;
# - one BLAS/OpenMP thread per worker, or the workers' CPU references
#   oversubscribe the cores;
# - the repository root goes on PYTHONPATH for the benchmarks.
set -uo pipefail
build=0 ops=0 out=gpu_check_out
for a in "$@"; do
    case "$a" in
        --build) build=1 ;;
        --ops) ops=1 ;;
        -*) echo "gpu_check.sh: unknown option $a" >&2; exit 2 ;;
        *) out="$a" ;;
    esac
done
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=${PYTHON:-python3}
t0=$(date +%s)
nvidia-smi -L 2>/dev/null || echo "gpu_check.sh: nvidia-smi not found" >&2
if [ "$build" = 1 ]; then
    KVCOMPRESS_CUDA=1 KVCOMPRESS_CUDA_ARCHS="${KVCOMPRESS_CUDA_ARCHS:-90}" "$PY" setup.py -q build_ext --inplace \
        > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
    echo "build: $(( $(date +%s) - t0 )) s"
fi
"$PY" -c "from kvcompress import _C; import sys; sys.exit(0 if _C.has_cuda and _C.cuda_device_count() else 3)" \
    || { echo "gpu_check.sh: kvcompress is not built with CUDA, or sees no GPU (use --build)" >&2; exit 3; }
parts=attention,packed
[ "$ops" = 1 ] && parts=ops,$parts
timeout 300 "$PY" benchmarks/bench_cuda.py --parts "$parts" --lengths 4096,16384,65536 --batches 1,8 \
    --reps 20 --rounds 5 --out "$out/bench_cuda.json" 2>&1 | tee "$out/bench.log"
bench=$?
echo "bench: $(( $(date +%s) - t0 )) s"
workers=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))
timeout 400 "$PY" -m pytest -q -p no:cacheprovider -p no:benchmark -n "$workers" -rf tests/test_cuda.py \
    2>&1 | tee "$out/tests.log" | tail -30
tests=$?
echo "tests: $(( $(date +%s) - t0 )) s"
[ "$bench" = 0 ] && [ "$tests" = 0 ]
