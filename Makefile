# The two commands a user needs (see README):
#   make run    set up .venv and run the main job
#   make test   set up .venv, install the real test data, lint, type-check, build the docs, run the tests
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= runs/synthetic
RUN_ARGS ?=

.PHONY: run test venv data lint typecheck pytest portability portable-subset docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch 2.13.0 first (a CPU wheel on this disk), then the library (pure Python, a normal install)
# with a torch range that 2.13.0 satisfies, so pip keeps it, then the reproduction harness
# (repro/, the package metanorm-repro: the experiments and `metanorm reproduce`), which needs it.
$(VENV)/.installed: pyproject.toml repro/pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev,plots,sklearn,pandas]"
	$(BIN)/pip install -q -e "./repro[test]"
	touch $@

venv: $(VENV)/.installed

run: venv
	$(BIN)/metanorm reproduce synthetic --out $(OUT) $(RUN_ARGS)

data: venv
	bash scripts/install-data.sh $(BIN)/python

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

# the documentation site (Sphinx + furo + MyST), warnings (a broken cross-reference) are errors
docs: venv
	$(BIN)/python -m sphinx -b html -W --keep-going -n -q docs site

pytest: venv
	$(BIN)/python -m pytest -q

test: venv data lint typecheck docs pytest portable-subset

# the tests under other numerics than this CPU's own: ATen's generic kernels, oneDNN limited to
# SSE4.1 (convolutions), MKL's compatible code path (BLAS), with 1 and with 2 threads. What passes
# here and under `make pytest` holds on other machines (AMD AVX2, Intel AVX-512, other BLAS paths).
PORTABLE_NUMERICS := ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_CBWR=COMPATIBLE
PORTABILITY_TESTS ?=
portability: venv data
	$(PORTABLE_NUMERICS) OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider $(PORTABILITY_TESTS)
	$(PORTABLE_NUMERICS) OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q -p no:cacheprovider $(PORTABILITY_TESTS)

# part of make test: the numerics-sensitive tests (layers, metrics, algebra, residualizer,
# properties, the harness's models, examples) once more with those numerics on one thread (about 70 s)
PORTABLE_SUBSET := tests/nn tests/metrics tests/test_linalg.py tests/preprocessing \
	tests/properties repro/tests/models tests/examples tests/test_probe.py tests/test_readme.py
portable-subset: venv data
	$(PORTABLE_NUMERICS) OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider $(PORTABLE_SUBSET)

clean:
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache build
