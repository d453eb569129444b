# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv first,
# installing CPU torch 2.13.0 alone before anything else (so nothing pulls a CUDA torch).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.muxc-installed

.PHONY: setup demo test test-all bench bench-kernels bench-plan bench-pipeline clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: setup  # the training service on the shipped config (README: Training service)
	rm -rf out/train-demo  # a fresh run each time (muxc train refuses to overwrite a run)
	$(VENV)/bin/muxc train examples/train-demo.toml --out out/train-demo

test: setup
	$(PY) -m pytest -q

test-all: setup  # also the tests marked slow (coverage duplicates, the kernel matrix)
	$(PY) -m pytest -q -m "slow or not slow"

# Benchmarks are the checkout's `bench` package (not installed): run from this directory.
bench: setup
	$(PY) -m bench.e2e

bench-kernels: setup
	$(PY) -m bench.kernels --quick

bench-plan: setup
	$(PY) -m bench.plan

bench-pipeline: setup
	$(PY) -m bench.pipeline

clean:
	rm -rf $(VENV) out .pytest_cache
